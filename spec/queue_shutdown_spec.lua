-- q:shutdown([immediate]) on every queue type (Python 3.13's
-- queue.Queue.shutdown): later puts raise ShutDown, gets drain then raise,
-- immediate drops the items, and callers blocked in this or another
-- process wake; the same for a manager's Queue and JoinableQueue.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local kind_of = H.kind_of

local TYPES = {
  {"Queue", function() return mp.Queue() end},
  {"JoinableQueue", function() return mp.JoinableQueue() end},
  {"SimpleQueue", function() return mp.SimpleQueue() end},
}

-- a child that blocks in f(q) and reports the kind of the error that ended
-- the wait through a pipe; returns the process and the receiving end
local function blocked_child(q, f)
  local a, b = mp.Pipe()
  local ready = mp.Event()
  -- (a daemon: should the wake-up fail, the spec fails, and the child
  -- is terminated at exit instead of joined forever)
  local p = mp.Process{daemon = true, target = function()
    ready:set()
    local ok, e = pcall(f, q)
    b:send(ok and "returned" or (type(e) == "table" and e.kind or tostring(e)))
  end}
  p:start()
  assert.is_true(ready:wait(10))
  core.sleep(0.2)   -- well inside the wait by now
  return p, a
end

describe("q:shutdown()", function()
  for _, t in ipairs(TYPES) do
    local name, new = t[1], t[2]
    it(name .. ": later puts raise, gets drain then raise", function()
      local q = new()
      assert.is_false(q:is_shutdown())
      q:put(1) q:put(nil) q:put("three")
      q:shutdown()
      assert.is_true(q:is_shutdown())
      local kind, e = kind_of(q.put, q, 4)
      assert.equal("ShutDown", kind)
      assert.matches("put on a queue that was shut down", e.message, 1, true)
      assert.equal(1, q:get())
      assert.is_nil(q:get())
      assert.equal("three", q:get())
      kind, e = kind_of(q.get, q)
      assert.equal("ShutDown", kind)
      assert.matches("get on a queue that was shut down", e.message, 1, true)
      assert.is_true(q:empty())
      q:shutdown()   -- again: nothing changes
      assert.equal("ShutDown", kind_of(q.get, q))
      if name ~= "SimpleQueue" then
        assert.equal("ShutDown", kind_of(q.get_nowait, q))
        assert.equal("ShutDown", kind_of(q.get, q, true, 0.1))
        assert.equal("ShutDown", kind_of(q.put_nowait, q, 1))
        assert.equal("ShutDown", kind_of(q.put, q, 1, false))
      end
      q:close()
    end)

    it(name .. ": shutdown(true) drops the items and wakes", function()
      local q = new()
      for i = 1, 100 do q:put(string.rep("x", i * 100)) end
      q:shutdown(true)
      assert.is_true(q:empty())
      assert.equal("ShutDown", kind_of(q.get, q))
      if name ~= "SimpleQueue" then
        assert.equal(0, q:qsize())
        assert.equal(0, q:_stats().bytes)
      end
      q:close()
    end)

    it(name .. ": wakes a get blocked in another process", function()
      local q = new()
      local p, a = blocked_child(q, function(q) return q:get() end)
      q:shutdown()
      assert.is_true(a:poll(10), "the child did not wake")
      assert.equal("ShutDown", a:recv())
      p:join(10)
      assert.equal(0, p.exitcode)
      q:close()
    end)
  end

  it("wakes a put blocked on a full queue in another process", function()
    local q = mp.Queue(1)
    q:put("fills it")
    local p, a = blocked_child(q, function(q) q:put("waits") end)
    q:shutdown()
    assert.is_true(a:poll(10), "the child did not wake")
    assert.equal("ShutDown", a:recv())
    p:join(10)
    assert.equal(0, p.exitcode)
    -- the item before the shutdown is still there; nothing else came in
    assert.equal(1, q:qsize())
    assert.equal("fills it", q:get())
    assert.equal("ShutDown", kind_of(q.get, q))
  end)

  it("wakes a put with a timeout with ShutDown, not Full", function()
    local q = mp.Queue(1)
    q:put(1)
    local p, a = blocked_child(q, function(q) q:put(2, true, 30) end)
    q:shutdown()
    assert.is_true(a:poll(10))
    assert.equal("ShutDown", a:recv())
    p:join(10)
  end)

  it("JoinableQueue: shutdown(true) counts the dropped items done and wakes join", function()
    local q = mp.JoinableQueue()
    q:put(1) q:put(2) q:put(3)
    assert.equal(1, q:get())   -- taken, not done yet
    local p, a = blocked_child(q, function(q)
      assert(q:join(30))
      error({kind = "joined"})
    end)
    q:shutdown(true)
    assert.is_false(a:poll(0.3))   -- the one taken is still unfinished
    q:task_done()
    assert.is_true(a:poll(10), "join did not wake")
    assert.equal("joined", a:recv())
    p:join(10)
    assert.equal("ValueError", kind_of(q.task_done, q))
    assert.is_true(q:join(0))
  end)

  it("makes an empty queue ready for mp.wait and fileno (a get would not block)", function()
    local q = mp.Queue()
    assert.same({}, mp.wait({q}, 0))
    local fd = q:fileno()
    assert.is_nil(q:timeout())
    local p = mp.Process{target = function() core.sleep(0.2) q:shutdown() end}
    p:start()
    assert.same({q}, mp.wait({q}, 10))
    assert.equal(0, q:timeout())
    assert.is_number(fd)
    p:join(10)
    q:close()
  end)

  it("rejects bad arguments and closed queues with clear errors", function()
    local q = mp.Queue()
    local ok, e = pcall(function() q:shutdown("yes") end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'shutdown' %(boolean expected, got string%)", e)
    ok, e = pcall(function() q.shutdown(io.stdout) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'shutdown' %(multiprocessing.Queue", e)
    q:close()
    assert.equal("ValueError", kind_of(q.shutdown, q))
    assert.equal("ValueError", kind_of(q.is_shutdown, q))
  end)

  it("leaves no process and no fd behind", function()
    collectgarbage()
    local before = H.fd_count()
    for _ = 1, 5 do
      local q = mp.Queue()
      local p, a = blocked_child(q, function(q) return q:get() end)
      q:shutdown(true)
      assert.is_true(a:poll(10), "the child did not wake")
      assert.equal("ShutDown", a:recv())
      p:join(10)
      a:close()
      q:close()
      p:close()
    end
    collectgarbage()
    assert.equal(0, H.zombies())
    assert.equal(before, H.fd_count())
  end)
end)

describe("a managed queue's shutdown()", function()
  local m
  setup(function() m = mp.Manager() end)
  teardown(function() m:shutdown() end)

  for _, name in ipairs {"Queue", "JoinableQueue"} do
    it(name .. ": puts raise, gets drain then raise, immediate drops", function()
      local q = m[name](m)
      assert.is_false(q:is_shutdown())
      q:put(1) q:put(2)
      q:shutdown()
      assert.is_true(q:is_shutdown())
      local kind, e = kind_of(q.put, q, 3)
      assert.equal("ShutDown", kind)
      assert.matches("put on a queue that was shut down", e.message, 1, true)
      assert.equal("ShutDown", kind_of(q.put_nowait, q, 3))
      assert.equal(1, q:get())
      assert.equal(2, q:get_nowait())
      assert.equal("ShutDown", kind_of(q.get, q))
      assert.equal("ShutDown", kind_of(q.get_nowait, q))
      local r = m[name](m)
      for i = 1, 10 do r:put(i) end
      r:shutdown(true)
      assert.equal(0, r:qsize())
      assert.equal("ShutDown", kind_of(r.get, r, true, 5))
      if name == "JoinableQueue" then assert.is_nil(r:join()) end
    end)
  end

  it("wakes a get and a put blocked in other processes", function()
    local q, full = m:Queue(), m:Queue(1)
    full:put(0)
    local g, a = blocked_child(q, function(q) return q:get() end)
    local p, b = blocked_child(full, function(q) q:put(1) end)
    q:shutdown()
    full:shutdown()
    assert.is_true(a:poll(10) and b:poll(10), "a child did not wake")
    assert.equal("ShutDown", a:recv())
    assert.equal("ShutDown", b:recv())
    g:join(10) p:join(10)
    assert.equal(0, g.exitcode)
    assert.equal(0, p.exitcode)
  end)

  it("rejects a non-boolean with an argument error naming the call", function()
    local q = m:Queue()
    local ok, e = pcall(function() q:shutdown(1) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'shutdown' %(boolean expected, got number%)", e)
    assert.is_false(q:is_shutdown())
  end)
end)
