-- core.Store: append-only bytes that forked children read (the Pool's
-- function store).
local H = require "helpers"
local core = require "multiprocessing.core"

describe("Store", function()
  it("appends and reads back at offsets, in the owner and in children", function()
    local s <close> = core.Store()
    local a = s:put("hello")
    local b = s:put(("\0x"):rep(50000))
    assert.equal(0, a)
    assert.equal(5, b)
    assert.equal("hello", s:get(a, 5))
    assert.equal(("\0x"):rep(50000), s:get(b, 100000))
    local path = os.tmpname()
    local pid = core.fork()
    if pid == 0 then
      local f = io.open(path, "w")
      f:write(s:get(b, 4), "|", s:get(a, 5))
      f:close()
      core._exit(0)
    end
    assert.equal(0, core.waitpid(pid))
    assert.equal("\0x\0x|hello", H.slurp(path))
    os.remove(path)
  end)

  it("lets only its owner append", function()
    local s <close> = core.Store()
    local path = os.tmpname()
    local pid = core.fork()
    if pid == 0 then
      local ok, err = pcall(s.put, s, "x")
      local f = io.open(path, "w")
      f:write(tostring(ok), " ", err.kind)
      f:close()
      core._exit(0)
    end
    core.waitpid(pid)
    assert.equal("false ValueError", H.slurp(path))
    os.remove(path)
  end)

  it("rejects reads beyond its end and use after close", function()
    local s = core.Store()
    s:put("abc")
    assert.has_error(function() s:get(2, 5) end)
    assert.has_error(function() s:get(-1, 1) end)
    s:close()
    s:close()
    local ok, err = pcall(s.get, s, 0, 1)
    assert.is_false(ok)
    assert.equal("ValueError", err.kind)
  end)

  it("leaves no fd behind", function()
    local before = H.fd_count()
    for _ = 1, 200 do
      local s <close> = core.Store()
      s:put("x")
    end
    assert.equal(before, H.fd_count())
  end)
end)
