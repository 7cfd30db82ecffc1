-- Long runs for make soak (not part of make test): the biggest messages
-- through a Queue, and many producers killed at random.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

describe("queue soak", function()
  it("carries a 1 GiB item from a child that exits before the get", function()
    local q = mp.Queue()
    local p = mp.Process{target = function()
      q:put(string.rep("wxyz", (1 << 30) // 4))
      q:put("after")
    end}
    p:start()
    p:join()
    assert.equal(0, p.exitcode)
    local s = q:get(false)
    assert.equal(1 << 30, #s)
    assert.equal("wxyz|wxyz", s:sub(1, 4) .. "|" .. s:sub(-4))
    s = nil
    assert.equal("after", q:get(false))
    collectgarbage()
    -- and the memory went back
    assert.is_true(q:_stats().resident <= 2 * 2^20 + 8192)
  end)

  it("takes 3 GiB of backlog in 64 MiB items, in order", function()
    local q = mp.Queue()
    local item = string.rep("m", 64 << 20)
    local p = mp.Process{target = function()
      for i = 1, 48 do q:put({i, item}) end
    end}
    p:start()
    p:join()
    assert.equal(0, p.exitcode)
    for i = 1, 48 do
      local m = q:get(false)
      assert.equal(i, m[1])
      assert.equal(64 << 20, #m[2])
    end
    collectgarbage()
  end)

  it("survives 1000 producers killed at random instants", function()
    local q = mp.Queue()
    local done = mp.Value("q", 0)
    for round = 1, 1000 do
      done.value = 0
      local p = mp.Process{target = function()
        local i = 0
        while true do
          i = i + 1
          q:put({i, string.rep("k", (i * 7919) % 300000)})
          done:add(1)
        end
      end}
      p:start()
      while done.value == 0 do core.sleep(0.001) end
      core.sleep(math.random() * 0.02)
      p:kill()
      p:join()
      local n, completed = 0, done.value
      while not q:empty() do
        local m = q:get(false)
        n = n + 1
        assert.equal(n, m[1], "round " .. round)
        assert.equal((n * 7919) % 300000, #m[2])
      end
      assert.is_true(n == completed or n == completed + 1)
    end
    assert.is_true(q:_stats().repairs > 0)
  end)
end)
