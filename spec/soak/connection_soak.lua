-- Long runs for make soak (not part of make test): the biggest messages.
local H = require "helpers"
local mp = require "multiprocessing"

describe("connection soak", function()
  it("sends values of 1 GiB with send/recv both ways", function()
    local a, b = mp.Pipe()
    local size = 1 << 30
    local p = mp.Process{target = function()
      a:close()
      local s = b:recv()
      b:send({#s, s:sub(-4)})
      b:send(s)
    end}
    p:start()
    b:close()
    a:send(string.rep("wxyz", size // 4))
    assert.same({size, "wxyz"}, a:recv())
    local back = a:recv()
    assert.equal(size, #back)
    back = nil
    p:join()
    assert.equal(0, p.exitcode)
    collectgarbage()
  end)

  it("carries messages of 1 GiB with send_bytes/recv_bytes", function()
    -- (make test's Pipe spec sends 256 MiB)
    H.pipe_bytes_roundtrip(1 << 30)
  end)

  it("uses the 8-byte length form beyond 2 GiB", function()
    local a, b = mp.Pipe()
    local size = (1 << 31) + 8
    local p = mp.Process{target = function()
      a:close()
      local s = b:recv_bytes()
      b:send({#s, s:sub(1, 4), s:sub(-4)})
    end}
    p:start()
    b:close()
    -- (string.rep stops at 2 GiB; a concatenation does not)
    a:send_bytes(string.rep("0123", (1 << 29) - 1) .. "012301230123")
    assert.same({size, "0123", "0123"}, a:recv())
    p:join()
    assert.equal(0, p.exitcode)
  end)
end)
