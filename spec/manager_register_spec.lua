-- register(typeid, callable, {exposed =, method_to_typeid =, proxytype =})
-- with Python's semantics (managers.lua, manager_server.lua), and
-- m:Pool(n), a pool served by the manager.
local H = require "helpers"
local mp = require "multiprocessing"

local kind_of = H.kind_of

-- a class the server serves through its methods
local Counter = {}
Counter.__index = Counter
function Counter:inc(n) self.n = self.n + (n or 1) return self.n end
function Counter:get() return self.n end
function Counter:secret() return "hidden" end
function Counter:child() return setmetatable({n = self.n * 10}, Counter) end
function Counter:data() return {n = self.n} end
local function new_counter(n) return setmetatable({n = n or 0}, Counter) end

describe("register's options", function()
  local MyM, m
  setup(function()
    MyM = mp.managers.BaseManager:extend("MyM")
    MyM:register("Counter", new_counter, {
      exposed = {"inc", "get", "child", "data"},
      method_to_typeid = {child = "Counter"},
      proxytype = {double = function(p) return p:inc(p:get()) end},
    })
    MyM:register("Open", new_counter)
    MyM:register("Narrow", new_counter, {exposed = {"get"}})
    m = MyM():start()
  end)
  teardown(function() m:shutdown() end)

  it("exposed: the proxy has those methods, the server refuses others", function()
    local c = m:Narrow(5)
    assert.equal(5, c:get())
    assert.is_nil(c.inc)
    assert.is_nil(c.secret)
    -- every public method when exposed is not given (Python's AutoProxy)
    local o = m:Open(1)
    assert.equal("hidden", o:secret())
    assert.equal(2, o:inc())
  end)

  it("proxytype: its functions are the proxy's, _callmethod reaches the object", function()
    local c = m:Counter(3)
    assert.equal(6, c:double())
    assert.equal(7, c:inc())
    assert.equal(7, c:_callmethod("get"))
    local kind, e = kind_of(c._callmethod, c, "secret")
    assert.equal("ValueError", kind)
    assert.matches("method 'secret' is not exposed", e.message, 1, true)
    assert.is_nil(c.secret)
    assert.equal("CounterProxy", getmetatable(c).__name)
  end)

  it("method_to_typeid: that method's result comes back as a proxy", function()
    local c = m:Counter(2)
    local k = c:child()                     -- a proxy of a new Counter
    assert.equal(20, k:get())
    assert.equal(40, k:double())            -- the proxytype applies to it too
    assert.equal(2, c:get())                -- (another object)
    -- without it a result is a copy
    local d = c:data()
    assert.same({n = 2}, d)
    d.n = 99
    assert.equal(2, c:get())
  end)

  it("keeps all of it across processes and through queues", function()
    local c = m:Counter(0)
    local q = mp.Queue()
    local p = mp.Process{daemon = true, target = function()
      c:inc(5)
      q:put(c:double())
      q:put(c:child())
    end}
    p:start()
    assert.equal(10, q:get(true, 30))
    local k = q:get(true, 30)
    assert.equal(100, k:get())
    assert.equal(200, k:double())
    p:join(10)
    assert.equal(0, p.exitcode)
  end)

  it("rejects bad options, naming the call", function()
    local X = mp.managers.BaseManager:extend()
    local function msg(...)
      local args = table.pack(...)
      local ok, e = pcall(function() X:register(table.unpack(args, 1, args.n)) end)
      assert.is_false(ok)
      return e
    end
    assert.matches("bad argument #3 to 'register' %(options table expected, got string%)",
                   msg("a", new_counter, "x"))
    assert.matches("unknown option 'expose'", msg("a", new_counter, {expose = {}}))
    assert.matches("exposed must be a list of method names, got string",
                   msg("a", new_counter, {exposed = "inc"}))
    assert.matches("exposed%[2%] must be a method name not starting with '_', got '_x'",
                   msg("a", new_counter, {exposed = {"inc", "_x"}}))
    assert.matches("exposed%[1%] must be a method name .*got number",
                   msg("a", new_counter, {exposed = {1}}))
    assert.matches("method_to_typeid must be a table, got boolean",
                   msg("a", new_counter, {method_to_typeid = true}))
    assert.matches("method_to_typeid maps method names to typeids",
                   msg("a", new_counter, {method_to_typeid = {child = 1}}))
    assert.matches("proxytype must be a table of methods, got function",
                   msg("a", new_counter, {proxytype = print}))
    -- nothing was registered
    assert.is_nil(rawget(X, "a"))
  end)
end)

describe("m:Pool(n)", function()
  local m
  setup(function() m = mp.Manager() end)
  teardown(function() m:shutdown() end)

  it("runs apply, map, starmap and imap in the manager's workers", function()
    local pool = m:Pool(2)
    assert.equal(3, pool:apply(function(a, b) return a + b end, {1, 2}))
    local r = pool:map(function(x) return x * x end, {1, 2, 3}, 2)
    assert.same({1, 4, 9, n = 3}, r)
    r = pool:starmap(function(a, b) return a .. b end, {{"a", 1}, {"b", 2}})
    assert.same({"a1", "b2", n = 2}, r)
    local got = {}
    for i, v in pool:imap(function(x) return -x end, {1, 2, 3}) do got[i] = v end
    assert.same({-1, -2, -3}, got)
    local sum = 0
    for _, v in pool:imap_unordered(function(x) return x end, {1, 2, 3}) do sum = sum + v end
    assert.equal(6, sum)
    -- the workers are the server's children, not ours
    local pid = pool:apply(function() return require("multiprocessing.core").getppid() end)
    assert.equal(m.pid, pid)
    pool:close()
    pool:join()
  end)

  it("hands out AsyncResult proxies: get, wait, ready, successful, errors", function()
    local pool = m:Pool(1)
    local core = require "multiprocessing.core"
    local ar = pool:apply_async(function() core.sleep(0.3) return "late" end)
    assert.is_false(ar:ready())
    assert.equal("TimeoutError", kind_of(ar.get, ar, 0.05))
    assert.equal("ValueError", kind_of(ar.successful, ar))
    assert.is_true(ar:wait(10))
    assert.equal("late", ar:get(10))
    assert.is_true(ar:successful())
    local bad = pool:apply_async(function() error("boom") end)
    local kind, e = kind_of(bad.get, bad, 10)
    assert.equal("RemoteError", kind)
    assert.matches("boom", tostring(e))
    assert.is_false(bad:successful())
    kind = kind_of(pool.apply, pool, function() error("direct") end)
    assert.equal("RemoteError", kind)
    local mr = pool:map_async(function(x) return x + 1 end, {1, 2})
    assert.same({2, 3, n = 2}, mr:get(10))
    local sr = pool:starmap_async(function(a, b) return a * b end, {{2, 3}})
    assert.same({6, n = 1}, sr:get(10))
    pool:terminate()
    pool:join()
  end)

  it("serves other clients while a task runs (the server never waits)", function()
    local pool = m:Pool(1)
    local core = require "multiprocessing.core"
    local d = m:dict()
    local slow = pool:apply_async(function() core.sleep(1) return 1 end)
    local p = mp.Process{target = function()
      local t0 = core.now()
      d.x = pool:apply(function() return 2 end)   -- queued behind slow
      d.waited = core.now() - t0
    end}
    p:start()
    local t0 = core.now()
    d.y = 3                                  -- answered at once meanwhile
    assert.equal(3, d.y)
    assert.is_true(core.now() - t0 < 0.9)
    assert.equal(1, slow:get(30))
    p:join(30)
    assert.equal(0, p.exitcode)
    assert.equal(2, d.x)
    pool:close()
    pool:join()
  end)

  it("rejects bad calls, naming them", function()
    local pool = m:Pool(1)
    local function msg(f)
      local ok, e = pcall(f)
      assert.is_false(ok)
      return e
    end
    assert.matches("bad argument #1 to 'apply' %(function expected, got number%)",
                   msg(function() pool:apply(1) end))
    assert.matches("bad argument #2 to 'map' %(sequence expected, got nil%)",
                   msg(function() pool:map(print) end))
    assert.matches("bad argument #3 to 'map' %(chunksize must be a positive integer%)",
                   msg(function() pool:map(print, {1}, 0) end))
    assert.matches("bad argument #2 to 'imap' %(sequence expected, got string%)",
                   msg(function() pool:imap(print, "x") end))
    assert.matches("bad argument #1 to 'get' %(number expected, got string%)",
                   msg(function() pool:apply_async(print):get("x") end))
    -- an unencodable argument
    assert.equal("EncodeError", kind_of(pool.apply, pool, print, {io.stdout}))
    -- join before close, use after close
    assert.equal("ValueError", kind_of(pool.join, pool))
    pool:close()
    assert.equal("ValueError", kind_of(pool.apply, pool, print, {}))
    pool:join()
  end)

  it("lets a pool no process holds go, workers and all", function()
    local pool = m:Pool(2)
    local pids = pool:map(function() return require("multiprocessing.core").getpid() end,
                          {1, 2, 3, 4}, 1)
    pool:close()
    pool = nil
    local d = m:dict()
    for i = 1, pids.n do
      assert.is_true(H.eventually(function()
        collectgarbage()
        d.x = i                   -- (carries the release to the server)
        m:_debug_info()           -- (the server collects)
        return not H.alive(pids[i])
      end, 20), "worker " .. pids[i] .. " outlived its pool")
    end
  end)

  it("leaves no worker behind when the manager shuts down", function()
    local m2 = mp.Manager()
    local pool = m2:Pool(2)
    local pids = pool:map(function() return require("multiprocessing.core").getpid() end,
                          {1, 2, 3, 4}, 1)
    m2:shutdown()
    for i = 1, pids.n do
      assert.is_true(H.eventually(function() return not H.alive(pids[i]) end, 10),
                     "worker " .. pids[i] .. " outlived its manager")
    end
    assert.equal("EOFError", (kind_of(pool.apply, pool, print, {})))
    assert.equal(0, H.zombies())
  end)
end)
