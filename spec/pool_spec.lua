-- Pool: construction, the apply and map families, AsyncResult, imap's
-- iterators, functions as tasks, function shipping, errors, callbacks and
-- the life cycle (close, join, terminate, <close>, __gc).  Worker deaths,
-- timeouts and leaks are in pool_faults_spec.lua.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local err_of, alive, range, worker_pids = H.err_of, H.alive, H.range, H.worker_pids

local kind_of = H.kind_of

local function store_bytes(pool)
  return tonumber(tostring(pool._store):match("(%d+) bytes"))
end

describe("Pool construction", function()
  it("takes a count or an options table; default cpu_count workers", function()
    local p <close> = mp.Pool(3)
    assert.equal(3, #worker_pids(p))
    assert.matches("<Pool state=RUN pool_size=3>", tostring(p), 1, true)
    local q <close> = mp.Pool{processes = 2}
    assert.equal(2, #worker_pids(q))
    local d <close> = mp.Pool()
    assert.equal(mp.cpu_count(), #worker_pids(d))
    -- the workers really run at once: cpu_count tasks meet at a barrier
    local n = mp.cpu_count()
    local b = mp.Barrier(n)
    local rs = {}
    for i = 1, n do rs[i] = d:apply_async(function() return b:wait(10) end) end
    local seen = {}
    for i = 1, n do seen[rs[i]:get(20)] = true end
    for i = 1, n do assert.is_true(seen[i]) end
  end)

  it("accepts a float with an integer value", function()
    local p <close> = mp.Pool(2.0)
    assert.equal(2, #worker_pids(p))
  end)

  it("rejects bad values with clear errors", function()
    assert.equal("ValueError", kind_of(mp.Pool, 0))
    assert.equal("ValueError", kind_of(mp.Pool, -3))
    assert.equal("ValueError", kind_of(mp.Pool, {processes = 0}))
    assert.matches("processes must be an integer", tostring(err_of(mp.Pool, 1.5)))
    assert.matches("processes must be an integer", tostring(err_of(mp.Pool, "four")))
    assert.equal("ValueError", kind_of(mp.Pool, {processes = 1, initializer = 5}))
    assert.equal("ValueError", kind_of(mp.Pool, {processes = 1, maxtasksperchild = 0}))
    assert.equal("ValueError", kind_of(mp.Pool, {processes = 1, maxtasksperchild = 1.5}))
    assert.equal("ValueError", kind_of(mp.Pool, {processes = 1, maxtasksperchild = "x"}))
    assert.equal(0, H.zombies())
  end)

  it("runs initializer(initargs...) once in each worker", function()
    local ev = mp.Queue()
    local p <close> = mp.Pool{processes = 2, initializer = function(a, b, c)
      -- (_G: busted runs this file in an environment of its own)
      _G.POOL_INIT = (a or "nil") .. "/" .. tostring(b) .. "/" .. c
      ev:put(mp.current_process().pid)
    end, initargs = {n = 3, "x", nil, "z"}}
    local got = p:map(function() return _G.POOL_INIT end, range(20), 1)
    for i = 1, 20 do assert.equal("x/nil/z", got[i]) end
    local inits = {}
    for _ = 1, 2 do inits[#inits + 1] = ev:get(true, 5) end
    table.sort(inits)
    assert.same(worker_pids(p), inits)
    assert.is_true(ev:empty())
    -- the initializer ran in the workers, not here
    assert.is_nil(_G.POOL_INIT)
  end)

  it("positional initializer, initargs, maxtasksperchild as Python", function()
    local p <close> = mp.Pool(1, function(v) _G.POOL_POS = v end, {"pos"}, 3)
    assert.equal("pos", p:apply(function() return _G.POOL_POS end))
  end)
end)

describe("Pool apply", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  it("apply returns the task's results, all of them", function()
    assert.equal(3, pool:apply(function(a, b) return a + b end, {1, 2}))
    local a, b, c = pool:apply(function(x) return x, nil, x * 2 end, {21})
    assert.equal(21, a)
    assert.is_nil(b)
    assert.equal(42, c)
    assert.equal(0, select("#", pool:apply(function() end)))
    -- args.n keeps nil arguments
    assert.equal("nil,2,nil,3", pool:apply(function(...)
      local t = table.pack(...)
      for i = 1, t.n do t[i] = tostring(t[i]) end
      return table.concat(t, ",") .. "," .. t.n
    end, {n = 3, nil, 2, nil}))
  end)

  it("many arguments and results travel, nils kept; a bad one is named", function()
    -- (up to 64 arguments travel as the task message's own items, more
    -- as a table; one result as the reply's item, several as a table)
    for _, n in ipairs {1, 64, 65, 200} do
      local args = {n = n}
      for i = 1, n, 3 do args[i] = i end
      local t = table.pack(pool:apply(function(...) return ... end, args))
      assert.equal(n, t.n)
      for i = 1, n do assert.equal(i % 3 == 1 and i or nil, t[i]) end
      local r = pool:apply_async(function(...) return select("#", ...) end, args)
      assert.equal(n, r:get(20))
    end
    assert.is_nil(pool:apply(function() return nil end))
    assert.equal(1, select("#", pool:apply(function() return nil end)))
    assert.matches(" at result%[2%]$", err_of(pool.apply, pool,
                   function() return 1, io.stdout end).message)
    assert.matches(" at result%[1%]%.f$", err_of(pool.apply, pool,
                   function() return {f = io.stdout} end).message)
    assert.matches(" at args%[70%]$", err_of(pool.apply, pool, type,
                   {n = 80, [70] = io.stdout}).message)
    assert.matches(" at args%[7%]$", err_of(pool.apply_async, pool, type,
                   {n = 8, [7] = io.stdout}).message)
    -- a callback gets the first result, an error callback the error
    local got, failed = table.pack(), nil
    local r = pool:apply_async(function() return 5, 6 end, nil,
                               function(v, w) got = table.pack(v, w) end)
    local bad = pool:apply_async(error, {"no"}, nil, function(e) failed = e end)
    assert.same({5, 6}, {r:get(20)})
    assert.is_false(pcall(bad.get, bad, 20))
    assert.same({5, n = 2}, got)
    assert.equal("RemoteError", failed.kind)
  end)

  it("collects results in a shielded call that reuses its thread", function()
    -- (a thread made and collected per call was ~5% of a round trip's
    -- instructions in the owner)
    local co1 = core.shielded(coroutine.running)
    local co2 = core.shielded(coroutine.running)
    assert.equal(co1, co2)
    assert.are_not.equal(coroutine.running(), co1)
    -- a nested one runs in the outer one's thread (no Ctrl-C lands
    -- there: no thread to make); one that raised is not kept
    local inner
    local outer = core.shielded(function()
      inner = core.shielded(coroutine.running)
      return coroutine.running()
    end)
    assert.equal(inner, outer)
    assert.are_not.equal(coroutine.running(), outer)
    assert.is_false(pcall(core.shielded, function() error("x") end))
    assert.equal(3, select("#", core.shielded(function(...) return ... end, 1, nil, 3)))
    assert.equal(42, pool:apply(function() return 42 end))
  end)

  it("runs in a worker, not in the caller", function()
    local me = mp.current_process().pid
    local pid, ppid = pool:apply(function()
      return mp.current_process().pid, mp.parent_process().pid
    end)
    assert.are_not.equal(me, pid)
    assert.equal(me, ppid)
    assert.is_true(pool:apply(function() return mp.current_process().name end)
      :match("^Pool%d+%-Worker%-%d$") ~= nil)
  end)

  it("an apply_async in flight costs the owner little memory", function()
    -- (the owner keeps each job until its result is collected, and fresh
    -- memory costs page faults: ~16 us each, the owner's system time in
    -- make bench's apply_async row; 264 bytes a job before, 168 now)
    local args, n, rs = {1}, 4096, {}
    local function f(x) return x end
    pool:apply_async(f, args):get()
    for i = 1, n do rs[i] = false end
    collectgarbage("collect")
    local before = collectgarbage("count")
    for i = 1, n do rs[i] = pool:apply_async(f, args) end
    collectgarbage("collect")
    local per_job = (collectgarbage("count") - before) * 1024 / n
    for i = 1, n do assert.equal(1, rs[i]:get()) end
    assert.is_true(per_job < 216, per_job .. " bytes a job")
  end)

  it("apply_async of a function sent before goes straight to the queue", function()
    -- (every call is ~100-250 instructions of the owner's; main made 16
    -- calls an apply_async here, 10 now: the call itself, its checks,
    -- the job, the put)
    local function f(x) return x end
    local args, rs, calls = {1}, {}, 0
    for _ = 1, 3 do pool:apply_async(f, args):get() end   -- (stored now)
    debug.sethook(function() calls = calls + 1 end, "c")
    for i = 1, 100 do rs[i] = pool:apply_async(f, args) end
    debug.sethook()
    for i = 1, 100 do assert.equal(1, rs[i]:get()) end
    assert.is_true(calls <= 1100, calls / 100 .. " calls an apply_async")
  end)

  it("AsyncResult: ready, wait, get(timeout), successful", function()
    local go = mp.Event()
    local r = pool:apply_async(function(x) go:wait(30) return x * 10 end, {4})
    assert.is_false(r:ready())
    assert.equal("ValueError", kind_of(r.successful, r))
    local t0 = core.now()
    assert.is_false(r:wait(0.2))
    assert.is_true(core.now() - t0 >= 0.15)
    local err = err_of(r.get, r, 0.1)
    assert.equal("TimeoutError", err.kind)
    assert.is_false(r:ready())     -- a get that timed out leaves the task be
    go:set()
    assert.is_true(r:wait(20))
    assert.is_true(r:ready())
    assert.is_true(r:successful())
    assert.equal(40, r:get())
    assert.equal(40, r:get(0))    -- get again: the same value
    local bad = pool:apply_async(function() error("no") end)
    assert.is_true(bad:wait(20))
    assert.is_false(bad:successful())
    assert.equal("RemoteError", kind_of(bad.get, bad))
    assert.equal(0, select("#", pool:apply_async(function() end):get(20)))
  end)

  it("negative timeouts count as 0", function()
    local go = mp.Event()
    local r = pool:apply_async(function() go:wait(30) return 1 end)
    assert.is_false(r:wait(-1))
    assert.equal("TimeoutError", kind_of(r.get, r, -5))
    go:set()
    assert.equal(1, r:get())
  end)

  it("callbacks run in the caller's process with the result", function()
    local me = mp.current_process().pid
    local got, where = {}, {}
    local rs = {}
    for i = 1, 5 do
      rs[i] = pool:apply_async(function(x) return x * x end, {i}, function(v)
        got[#got + 1] = v
        where[#where + 1] = mp.current_process().pid
      end)
    end
    for i = 1, 5 do rs[i]:wait() end
    table.sort(got)
    assert.same({1, 4, 9, 16, 25}, got)
    for _, pid in ipairs(where) do assert.equal(me, pid) end
    -- the callback has run before wait returns
    local seen
    local r = pool:apply_async(function() return "x" end, nil, function(v) seen = v end)
    assert.is_true(r:wait(20))
    assert.equal("x", seen)
  end)

  it("error_callback gets the RemoteError; the options table form", function()
    local ok_seen, err_seen
    local r = pool:apply_async(function() error({code = 7}) end, nil,
      function(v) ok_seen = v end, function(e) err_seen = e end)
    r:wait()
    assert.is_nil(ok_seen)
    assert.equal("RemoteError", err_seen.kind)
    assert.equal(7, err_seen.value.code)
    local cb, ecb
    local r2 = pool:apply_async(function(a) return a + 1 end, {1},
      {callback = function(v) cb = v end, error_callback = function(e) ecb = e end})
    assert.equal(2, r2:get())
    assert.equal(2, cb)
    assert.is_nil(ecb)
    local r3 = pool:apply_async(function() error("bad", 0) end, nil,
      {error_callback = function(e) ecb = e end})
    r3:wait()
    assert.equal("bad", ecb.value)
  end)

  it("pool:poll() runs callbacks of finished tasks without waiting", function()
    local n = 0
    for _ = 1, 4 do
      pool:apply_async(function() return 1 end, nil, function() n = n + 1 end)
    end
    H.eventually(function() pool:poll() return n == 4 end, 20)
    assert.equal(4, n)
  end)

  it("apply_async takes in the results that came, every 32nd call", function()
    -- (nothing in flight from the tests before)
    assert.is_true(H.eventually(function()
      pool:poll()
      return next(pool._tasks) == nil and pool._rq:empty()
    end, 20))
    local n = 0
    local with_cb = pool:apply_async(function() return 1 end, nil,
                                     function() n = n + 1 end)
    -- (an argument table and no options: a plain job, see new_apply)
    local plain = pool:apply_async(function() return 7 end, {})
    assert.is_nil(rawget(plain, "_kind"))
    -- both replies are in the result queue; no pool call collected them
    assert.is_true(H.eventually(function() return pool._rq:qsize() == 2 end, 20))
    assert.equal(0, n)
    assert.is_false(rawget(plain, "_done"))
    for i = 1, 32 do pool:apply_async(function(x) return x end, {i}) end
    -- one of the 32 took them in: the callback ran, the plain one is done
    -- (its reply settled in C by the result queue's _collect)
    assert.equal(1, n)
    assert.is_true(rawget(plain, "_done"))
    assert.is_nil(pool._tasks[plain._tag])
    assert.equal(7, plain:get(0))
    assert.equal(1, with_cb:get(0))
  end)

  it("a task with a timeout submitted by a callback leaves the timeout books when its reply comes", function()
    assert.is_true(H.eventually(function()
      pool:poll()
      return next(pool._tasks) == nil and pool._rq:empty()
    end, 20))
    -- a plain reply, then one with a callback, in the result queue
    local plain = pool:apply_async(function() return 1 end, {})
    assert.is_nil(rawget(plain, "_kind"))
    assert.is_true(H.eventually(function() return pool._rq:qsize() == 1 end, 20))
    local fut
    pool:apply_async(function() return 2 end, nil, function()
      -- (a future's task with a timeout: a plain job on the books)
      fut = pool:_submit_future(function() return 3 end, {}, 0, 60)
      assert(rawget(fut, "_kind") == nil)
      H.eventually(function() return not pool._rq:empty() end, 20)
    end)
    assert.is_true(H.eventually(function() return pool._rq:qsize() == 2 end, 20))
    pool:poll()         -- one drain takes all three
    assert.is_true(rawget(plain, "_done"))
    assert.equal(3, fut:get(0))
    assert.equal(0, pool._timed)
    assert.is_nil(next(pool._timeouts))
  end)

  it("workers run under SCHED_BATCH; the owner under its own policy", function()
    -- (field 41 of /proc/PID/stat: 0 SCHED_OTHER, 3 SCHED_BATCH)
    local function policy()
      local f = assert(io.open("/proc/self/stat"))
      local s = f:read("a")
      f:close()
      local fields = {}
      for x in s:match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
      return tonumber(fields[39])
    end
    assert.equal(3, pool:apply(policy))
    assert.equal(0, policy())
  end)

  it("a callback that raises is reported on stderr; the pool goes on", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local pool <close> = mp.Pool(2)
      local r = pool:apply_async(function() return 1 end, nil, function(v)
        error("callback broke on " .. v)
      end)
      r:wait()
      print("ready", r:ready(), r:successful(), r:get())
      local r2 = pool:map_async(function(x) return x end, {1, 2}, nil, nil,
        function() end)
      r2:wait()
      local r3 = pool:apply_async(function() error("x") end, nil, nil, function(e)
        error("error callback broke too")
      end)
      r3:wait()
      print("after", pool:apply(function(a) return a * 2 end, {21}),
            #pool:map(function(x) return x end, {1, 2, 3}))
    ]])
    assert.equal(0, code, err)
    assert.equal("ready\ttrue\ttrue\t1\nafter\t42\t3\n", out)
    assert.matches("callback broke on 1", err)
    assert.matches("error callback broke too", err)
  end)

  it("bad arguments get clear errors", function()
    assert.matches("function expected, got nil", tostring(err_of(pool.apply, pool, nil)))
    assert.matches("function expected, got number", tostring(err_of(pool.apply_async, pool, 5)))
    assert.matches("args must be a table", tostring(err_of(pool.apply, pool, print, 5)))
    assert.equal("ValueError", kind_of(pool.apply_async, pool, print, {}, {timeout = -1}))
    assert.equal("ValueError", kind_of(pool.apply_async, pool, print, {}, {timeout = "x"}))
    assert.matches("bad option", tostring(err_of(pool.apply_async, pool, print, {}, 5)))
    -- still serving
    assert.equal(2, pool:apply(function() return 2 end))
  end)
end)

describe("Pool map family", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  it("map keeps order, nil results keep their positions, field n", function()
    local r = pool:map(function(x) return x * x end, {1, 2, 3})
    assert.same({1, 4, 9, n = 3}, r)
    local holes = pool:map(function(x) if x % 3 == 0 then return nil end return x end,
                           range(10))
    assert.equal(10, holes.n)
    for i = 1, 10 do
      if i % 3 == 0 then assert.is_nil(holes[i]) else assert.equal(i, holes[i]) end
    end
    local trailing = pool:map(function() return nil end, {1, 2})
    assert.equal(2, trailing.n)
    assert.is_nil(next(trailing, next(trailing)))  -- only n is there
    assert.same({n = 0}, pool:map(function(x) return x end, {}))
    -- big: many chunks, every position
    local big = pool:map(function(x) return x + 1 end, range(10000))
    assert.equal(10000, big.n)
    for i = 1, 10000 do assert.equal(i + 1, big[i]) end
  end)

  it("map takes an iterator function and honours iterable.n", function()
    local i = 0
    local r = pool:map(function(x) return x * 2 end, function()
      i = i + 1
      if i <= 5 then return i end
    end)
    assert.same({2, 4, 6, 8, 10, n = 5}, r)
    local withnil = pool:map(function(x) return x == nil end, {n = 3, 1, nil, 3})
    assert.same({false, true, false, n = 3}, withnil)
    assert.same({"A", "B", n = 2}, pool:map(string.upper, {"a", "b"}))
    assert.matches("iterable must be a table or an iterator function",
                   tostring(err_of(pool.map, pool, print, 5)))
  end)

  it("chunksize: a number or {chunksize = n}; bad values raise", function()
    for _, cs in ipairs {1, 3, 7, 100} do
      assert.same({1, 4, 9, 16, 25, 36, 49, n = 7},
        pool:map(function(x) return x * x end, range(7), cs))
      assert.same({1, 4, 9, 16, 25, 36, 49, n = 7},
        pool:map(function(x) return x * x end, range(7), {chunksize = cs}))
    end
    assert.equal("ValueError", kind_of(pool.map, pool, print, {1}, 0))
    assert.equal("ValueError", kind_of(pool.map, pool, print, {1}, {chunksize = -1}))
    assert.equal("ValueError", kind_of(pool.map, pool, print, {1}, {chunksize = 1.5}))
  end)

  it("the default chunksize is Python's: ceil(n / (4 * workers))", function()
    -- (white box: the number of chunks a map_async queued)
    local go = mp.Event()
    local f = function(x) go:wait(30) return x end
    local function chunks(n)
      local r = pool:map_async(f, range(n))
      local c = r._left
      return c, r
    end
    local cases = {[1] = 1, [7] = 7, [8] = 8, [9] = 5, [100] = 8, [1000] = 8, [1001] = 8}
    local rs = {}
    for n, expect in pairs(cases) do
      local c, r = chunks(n)
      -- Python: chunksize = ceil(n / 8); chunks = ceil(n / chunksize)
      local cs = (n + 7) // 8
      assert.equal((n + cs - 1) // cs, c)
      assert.equal(expect, c)
      rs[#rs + 1] = {r, n}
    end
    go:set()
    for _, x in ipairs(rs) do assert.equal(x[2], x[1]:get(30).n) end
  end)

  it("starmap unpacks argument lists (n honoured); results keep nils", function()
    local r = pool:starmap(function(a, b) return a and b and a * b end,
                           {{2, 3}, {4, 5}, {n = 2, nil, 1}, {6, 7}})
    assert.same({6, 20, nil, 42, n = 4}, r)
    local counts = pool:starmap(function(...) return select("#", ...) end,
                                {{}, {1}, {n = 3}, {1, 2}})
    assert.same({0, 1, 3, 2, n = 4}, counts)
    assert.same({n = 0}, pool:starmap(print, {}))
  end)

  it("map_async and starmap_async: callbacks, options table", function()
    local got
    local r = pool:map_async(function(x) return -x end, {1, 2, 3}, nil,
                             function(v) got = v end)
    assert.same({-1, -2, -3, n = 3}, r:get(20))
    assert.same({-1, -2, -3, n = 3}, got)
    local got2, err2
    local r2 = pool:starmap_async(function(a, b) return a .. b end,
      {{"a", "b"}, {"c", "d"}}, {chunksize = 1, callback = function(v) got2 = v end})
    assert.same({"ab", "cd", n = 2}, r2:get(20))
    assert.same({"ab", "cd", n = 2}, got2)
    local r3 = pool:map_async(function(x) if x == 2 then error("two") end return x end,
      {1, 2, 3}, {error_callback = function(e) err2 = e end})
    assert.is_true(r3:wait(20))
    assert.is_false(r3:successful())
    assert.equal("RemoteError", err2.kind)
    local empty_cb
    local r4 = pool:map_async(print, {}, nil, function(v) empty_cb = v end)
    assert.is_true(r4:ready())
    assert.same({n = 0}, r4:get())
    assert.same({n = 0}, empty_cb)
  end)

  it("a map error is raised after all chunks finished, the first one", function()
    local count = mp.Value("i", 0)
    local err = err_of(pool.map, pool, function(x)
      count:add(1)
      if x == 3 or x == 8 then error("item " .. x .. " failed") end
      return x
    end, range(12), 1)
    assert.equal("RemoteError", err.kind)
    assert.matches("item 3 failed", err.message)
    assert.matches("item 3 failed", tostring(err.value))
    -- every other chunk ran: 12 items, each incremented once
    assert.equal(12, count.value)
    -- in one chunk, the items after the failing one do not run (Python)
    count.value = 0
    err = err_of(pool.map, pool, function(x)
      count:add(1)
      if x == 2 then error("stop") end
    end, range(6), 6)
    assert.equal(2, count.value)
  end)

  it("imap yields (index, value) in order; nil values do not end the loop", function()
    local seen = {}
    for i, v in pool:imap(function(x) if x % 2 == 0 then return nil end return x * 10 end,
                          range(9)) do
      seen[#seen + 1] = {i, v}
    end
    assert.equal(9, #seen)
    for k = 1, 9 do
      assert.equal(k, seen[k][1])
      if k % 2 == 0 then assert.is_nil(seen[k][2]) else assert.equal(k * 10, seen[k][2]) end
    end
    local n = 0
    for _ in pool:imap(print, {}) do n = n + 1 end
    assert.equal(0, n)
    for cs = 1, 4 do
      local idx = {}
      for i, v in pool:imap(function(x) return x + 1 end, range(10), cs) do
        assert.equal(i + 1, v)
        idx[#idx + 1] = i
      end
      assert.same(range(10), idx)
    end
  end)

  it("imap is ordered even when later items finish first", function()
    local order = {}
    for i, v in pool:imap(function(x) core.sleep(x == 1 and 0.3 or 0) return x end,
                          range(6)) do
      assert.equal(i, v)
      order[#order + 1] = i
    end
    assert.same(range(6), order)
  end)

  it("imap_unordered yields in completion order, each index once", function()
    local order = {}
    for i, v in pool:imap_unordered(function(x)
      core.sleep(x == 1 and 0.5 or 0.01)
      return x * 2
    end, range(8)) do
      assert.equal(i * 2, v)
      order[#order + 1] = i
    end
    assert.equal(8, #order)
    assert.are_not.equal(1, order[1])     -- item 1 sleeps; others come first
    table.sort(order)
    assert.same(range(8), order)
    local seen = {}
    for i, v in pool:imap_unordered(function(x) return x end, range(50), 7) do
      assert.equal(i, v)
      assert.is_nil(seen[i])
      seen[i] = true
    end
    for i = 1, 50 do assert.is_true(seen[i]) end
  end)

  it("imap over an endless iterator reads ahead a bounded amount", function()
    for _, unordered in ipairs {false, true} do
      local consumed = 0
      local function naturals()
        consumed = consumed + 1
        return consumed
      end
      local it = unordered and pool:imap_unordered(function(x) return x * x end, naturals)
                 or pool:imap(function(x) return x * x end, naturals)
      local got = 0
      for i, v in it do
        assert.equal(i * i, v)
        got = got + 1
        if got == 100 then break end
      end
      assert.equal(100, got)
      -- read ahead: a few chunks per worker, not the whole (endless) input
      assert.is_true(consumed >= 100 and consumed <= 100 + 16, consumed)
      local consumed2 = 0
      for _, v in pool:imap(function(x) return x end, function()
        consumed2 = consumed2 + 1
        return consumed2
      end, 10) do
        if v == 55 then break end
      end
      assert.is_true(consumed2 >= 60 and consumed2 <= 60 + 16 * 10, consumed2)
    end
    -- the pool serves on after abandoned iterators
    assert.same({1, n = 1}, pool:map(function(x) return x end, {1}))
  end)

  it("an imap loop left early is not kept by the pool", function()
    local p <close> = mp.Pool(2)
    local function count(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end
    for _ = 1, 50 do
      for i in p:imap(function(x) return string.rep("x", 1000) .. x end, range(40)) do
        if i == 2 then break end
      end
    end
    -- the chunks in flight settle (apply waits behind them on the queue)
    assert.equal(1, p:apply(function() return 1 end))
    assert.is_true(H.eventually(function()
      p:poll()
      collectgarbage()
      return count(p._tasks) == 0 and count(p._jobs) == 0
    end, 10))
    -- an iterator still held stays, and finishes
    local it = p:imap(function(x) return x end, range(5))
    assert.same({1, 1}, {it()})
    collectgarbage()
    assert.equal(1, count(p._jobs))
    local n = 1
    for _ in it do n = n + 1 end
    assert.equal(5, n)
    assert.equal(0, count(p._jobs))
  end)

  it("an imap error is raised at its place; the rest still comes", function()
    local it = pool:imap(function(x)
      if x == 3 then error("three") end
      return x
    end, range(5))
    local got, errs = {}, {}
    while true do
      local ok, i, v = pcall(it)
      if not ok then errs[#errs + 1] = i
      elseif i == nil then break
      else got[#got + 1] = v end
    end
    assert.same({1, 2, 4, 5}, got)
    assert.equal(1, #errs)
    assert.equal("RemoteError", errs[1].kind)
    assert.matches("three", errs[1].message)
  end)

  it("leaving an imap loop early cancels the tasks it read ahead", function()
    -- item 1 comes at once; items 2.. take 0.3 s and then mark that they
    -- ran.  When the loop leaves after item 1, items 2 and 3 (most likely)
    -- are running and item 4 is read ahead, waiting in the queue.
    local function leave(how)
      local ran = mp.RawArray("q", 6)
      local f = function(x)
        if x > 1 then core.sleep(0.3) end
        ran[x] = 1
        return x
      end
      local ok, err = pcall(function()
        for _, v in pool:imap(f, range(6)) do
          if v == 1 then
            if how == "break" then break end
            error("enough")
          end
        end
      end)
      assert.equal(how == "break", ok, tostring(err))
      -- the queue is behind this map, and the 0.3 s tasks are over
      assert.same({7, n = 1}, pool:map(function(x) return x end, {7}))
      core.sleep(0.4)
      return ran:totable()
    end
    local ran = leave("break")
    -- break: what runs ends, what waits is dropped
    assert.same({1, 0, 0}, {ran[1], ran[4], ran[5]})
    -- an error (Ctrl-C is one) leaving the loop stops the running ones too
    ran = leave("error")
    assert.same({1, 0, 0, 0, 0, 0}, ran)
  end)

  it("imap yields a result as soon as it is there, also after the pool was idle", function()
    -- (a result drained while the pool's periodic checks were due used to
    -- wait for the next event: here the slow items' end, a second later)
    for _ = 1, 6 do
      core.sleep(0.06)
      local t0, first = core.now(), nil
      pcall(function()
        for _, v in pool:imap(function(x)
          if x > 1 then core.sleep(1) end
          return x
        end, range(4)) do
          first = core.now() - t0
          error("enough")      -- (an error leaving the loop stops the slow ones)
        end
      end)
      assert.is_true(first < 0.5, tostring(first))
    end
  end)

  it("progress = true: a plain final line on stderr when not a terminal", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local pool <close> = mp.Pool(2)
      local r = pool:map(function(x) return x end, {1, 2, 3, 4, 5}, {progress = true})
      io.write(r.n, "\n")
      for _ in pool:imap(function(x) return x end, {1, 2, 3}, {progress = true}) do end
    ]])
    assert.equal(0, code, err)
    assert.equal("5\n", out)
    assert.matches("^5/5 done in [%d.]+ s %([%d.]+ it/s%)\n3/3 done in", err)
  end)

  it("progress = true draws a bar on a terminal", function()
    local path = H.write(os.tmpname() .. ".lua", [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool <close> = mp.Pool(2)
      pool:map(function(x) core.sleep(0.01) return x end, (function()
        local t = {} for i = 1, 200 do t[i] = i end return t end)(),
        {progress = true, chunksize = 1})
      io.write("MAP DONE\n")
      io.read()
    ]])
    local t = H.terminal(H.luamp .. " " .. path, 100, 10)
    local ok, screen = pcall(t.wait_for, t, "MAP DONE", 30)
    t:close()
    os.remove(path)
    assert.is_true(ok, screen)
    assert.matches("%[##############################%] 200/200 [%d.]+ it/s in 0:%d%d", screen)
  end)
end)

describe("Pool tasks as functions", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  it("upvalues are copied by value when the task is submitted", function()
    local t = {v = "old"}
    local x = 1
    local go = mp.Event()
    local function f() go:wait(30) return t.v, x end
    local r1 = pool:apply_async(f)
    t.v, x = "new", 2
    local r2 = pool:apply_async(f)
    t.v, x = "newest", 3
    go:set()
    assert.same({"old", 1}, {r1:get(20)})
    assert.same({"new", 2}, {r2:get(20)})
    -- and a map over the same function sees the value at its submission
    local r3 = pool:map_async(function() return x end, range(4))
    x = 4
    assert.same({3, 3, 3, 3, n = 4}, r3:get(20))
    -- the same function again and again, upvalue changing each time
    local function g() return x end
    for k = 1, 20 do
      x = k
      assert.equal(k, pool:apply(g))
    end
  end)

  it("writes to upvalues stay in the worker", function()
    local counter = 0
    local function bump() counter = counter + 1 return counter end
    pool:map(bump, range(10))
    assert.equal(0, counter)
  end)

  it("module upvalues, standard library functions, nested functions", function()
    local cjson = require "cjson"
    local r = pool:map(function(s) return cjson.decode(s).a end,
                       {'{"a": 1}', '{"a": "two"}', '{"a": [3]}'})
    assert.same({1, "two", {3}, n = 3}, r)
    assert.same({"A", "B", n = 2}, pool:map(string.upper, {"a", "b"}))
    assert.same({2, 3, n = 2}, pool:map(math.sqrt, {4, 9}))
    assert.same({"1", "x", n = 2}, pool:map(tostring, {1, "x"}))
    assert.same({"ab", n = 1}, pool:starmap(string.rep, {{"ab", 1}}))
    local fmt = string.format
    local function helper(x) return fmt("<%s>", x) end
    local function outer(x) return helper(x) .. helper(x) end
    assert.same({"<1><1>", n = 1}, pool:map(outer, {1}))
    -- a recursive local function (an upvalue cycle)
    local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
    assert.same({55, 6765, n = 2}, pool:map(fib, {10, 20}))
    local mpm = mp
    assert.equal("function", pool:apply(function() return type(mpm.Pool) end))
  end)

  it("functions made after the pool started, and from loaded code", function()
    local f = load("return function(x) return x .. '!' end")()
    assert.equal("hi!", pool:apply(f, {"hi"}))
    local adders = {}
    for k = 1, 5 do adders[k] = function(x) return x + k end end
    for k = 1, 5 do assert.equal(10 + k, pool:apply(adders[k], {10})) end
  end)

  it("shared objects made before the pool travel as upvalues", function()
    local q = mp.Queue()
    local v = mp.Value("i", 0)
    pool:map(function(x) q:put(x) v:add(x) end, range(10))
    local s = 0
    for _ = 1, 10 do s = s + q:get(true, 5) end
    assert.equal(55, s)
    assert.equal(55, v.value)
  end)

  it("ships each distinct function once, not per task", function()
    local blob = string.rep("0123456789abcdef", 65536)   -- 1 MiB upvalue
    local function big(x) return #blob + x end
    -- (each encoding of a function is the same bytes: that is how the
    -- pool knows it has shipped it)
    assert.equal(mp.encode(big), mp.encode(big))
    local p <close> = mp.Pool(2)
    local before = store_bytes(p)
    local r = p:map(big, range(200), 1)
    assert.equal(200, r.n)
    assert.equal(#blob + 200, r[200])
    local once = store_bytes(p) - before
    assert.is_true(once >= #blob and once < #blob + 65536, once)
    -- the same function again: nothing new in the store
    for _ = 1, 20 do p:apply_async(big, {1}) end
    p:map(big, range(50), 1)
    assert.equal(before + once, store_bytes(p))
    -- a changed upvalue is a new function value: stored once more
    blob = blob:upper()
    assert.equal(#blob + 1, p:apply(big, {1}))
    local twice = store_bytes(p) - before
    assert.is_true(twice >= 2 * #blob and twice < 2 * #blob + 131072, twice)
    -- while the workers are busy, the queued tasks are small: 100 tasks
    -- of the 1 MiB function are a few KiB on the task queue
    local go = mp.Event()
    local held = {}
    for k = 1, 2 do held[k] = p:apply_async(function() go:wait(30) end) end
    H.eventually(function() return p._tq:qsize() == 0 end, 10)
    local r2 = p:map_async(big, range(100), 1)
    local queued = p._tq:_stats().bytes
    assert.is_true(queued > 0 and queued < 100 * 1024, queued)
    go:set()
    assert.equal(100, r2:get(30).n)
  end)

  it("functions that cannot be encoded: EncodeError naming the upvalue", function()
    local fh = io.stdout
    local err = err_of(pool.apply, pool, function() return fh end)
    assert.equal("EncodeError", err.kind)
    assert.matches("function", err.message)
    assert.matches("upvalue 'fh'", err.message)
    err = err_of(pool.map, pool, function() return fh end, {1})
    assert.equal("EncodeError", err.kind)
    assert.matches("upvalue 'fh'", err.message)
    assert.equal(1, pool:apply(function() return 1 end))
  end)
end)

describe("Pool errors", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  it("a task's error is a RemoteError with value and the worker's traceback", function()
    local function failing_task(x) error("bad input " .. x) end
    local err = err_of(pool.apply, pool, failing_task, {5})
    assert.equal("RemoteError", err.kind)
    assert.matches("bad input 5", err.message)
    assert.matches("bad input 5", err.value)
    assert.matches("stack traceback", err.traceback)
    assert.matches("pool_spec%.lua:%d+: in function", err.traceback)
    assert.matches("^RemoteError: .*bad input 5", tostring(err))
    assert.matches("stack traceback", tostring(err))
    -- the message once: tostring adds it in front of the traceback
    local _, times = tostring(err):gsub("bad input 5", "")
    assert.equal(1, times)
    assert.matches("^stack traceback:", err.traceback)
    -- a table error value arrives as it was
    err = err_of(pool.apply, pool, function() error({code = 42, why = {"nested"}}) end)
    assert.same({code = 42, why = {"nested"}}, err.value)
    assert.matches("table value", err.message)
    -- a contract error raised in the task
    err = err_of(pool.apply, pool, function() mp.Queue():get(false) end)
    assert.equal("RemoteError", err.kind)
    assert.equal("Empty", err.value.kind)
    assert.matches("^Empty: ", err.message)
    -- error(nil)
    err = err_of(pool.apply, pool, function() error() end)
    assert.equal("RemoteError", err.kind)
    assert.is_nil(err.value)
  end)

  it("a map task's traceback ends at the task, as an apply's does", function()
    local function failing_task(x) error("bad input " .. x) end
    local tbs = {}
    tbs.apply = err_of(pool.apply, pool, failing_task, {1}).traceback
    tbs.map = err_of(pool.map, pool, failing_task, {1, 2}).traceback
    tbs.starmap = err_of(pool.starmap, pool, failing_task, {{1}}).traceback
    for _, f in ipairs {"imap", "imap_unordered"} do
      tbs[f] = err_of(function()
        for _ in pool[f](pool, failing_task, {1}) do end
      end).traceback
    end
    for how, tb in pairs(tbs) do
      assert.matches("^stack traceback:\n" ..
                     "\t%[C%]: in function 'error'\n" ..
                     "\t[^\n]*pool_spec%.lua:%d+: in function <[^\n]*pool_spec%.lua:%d+>$",
                     tb, 1, how)
      assert.is_nil(tb:find("pool.lua", 1, true), how)
    end
    -- a C function as the task: its frame is left as it is
    local tb = err_of(pool.starmap, pool, error, {{"plain", 0}}).traceback
    assert.is_nil(tb:find("pool.lua", 1, true), tb)
    assert.matches("^stack traceback:\n", tb)
    -- frames of a nested pool's call above the task's stay
    tb = err_of(pool.apply, pool, function()
      local inner <close> = mp.Pool(1)
      return inner:map(error, {"deep"})
    end).traceback
    assert.matches("pool%.lua:%d+: in ", tb)
    assert.matches("pool_spec%.lua:%d+: in function <", tb)
  end)

  it("unencodable arguments: EncodeError naming the path; nothing is queued", function()
    local err = err_of(pool.apply, pool, type, {1, io.stdout})
    assert.equal("EncodeError", err.kind)
    assert.matches("args%[2%]", err.message)
    err = err_of(pool.apply_async, pool, type, {{file = io.stdout}})
    assert.matches("args%[1%]%.file", err.message)
    err = err_of(pool.map, pool, type, {1, 2, io.stdout, 4})
    assert.equal("EncodeError", err.kind)
    assert.matches("iterable%[3%]", err.message)
    err = err_of(pool.map, pool, type, {1, 2, 3, 4, {x = coroutine.create(print)}}, 2)
    assert.matches("iterable%[5%]%.x", err.message)
    err = err_of(pool.starmap, pool, select, {{1}, {2, io.stdout}}, 1)
    assert.matches("iterable%[2%]%[2%]", err.message)
    -- the path as data, from the caller's argument
    assert.same({2, 2}, err.path)
    assert.equal("cannot encode a userdata (FILE*)", err.reason)
    assert.same({1, ".file"}, err_of(pool.apply, pool, type, {{file = io.stdout}}).path)
    assert.same({5, ".x"}, err_of(pool.map, pool, type,
                                 {1, 2, 3, 4, {x = coroutine.create(print)}}, 2).path)
    local it = pool:imap(type, {1, io.stderr})
    err = err_of(it)
    assert.equal("EncodeError", err.kind)
    assert.matches("iterable%[2%]", err.message)
    assert.same({1, 2, n = 2}, pool:map(function(x) return x end, {1, 2}))
  end)

  it("unencodable results: EncodeError naming the result, the worker lives", function()
    local before = worker_pids(pool)
    local err = err_of(pool.apply, pool, function() return 1, io.stdout end)
    assert.equal("EncodeError", err.kind)
    assert.matches("result", err.message)
    err = err_of(pool.map, pool, function(x)
      if x == 3 then return {f = io.stdout} end
      return x
    end, range(4), 1)
    assert.equal("EncodeError", err.kind)
    assert.matches("result", err.message)
    assert.same(before, worker_pids(pool))
    assert.equal(7, pool:apply(function() return 7 end))
    assert.same(before, worker_pids(pool))
  end)
end)

describe("Pool life cycle", function()
  it("close: no new tasks (ValueError 'Pool not running'); join waits for the queued ones", function()
    local pool = mp.Pool(2)
    local rs = {}
    for i = 1, 10 do
      rs[i] = pool:apply_async(function(x) core.sleep(0.02) return x end, {i})
    end
    local m = pool:map_async(function(x) return x * 2 end, range(30))
    assert.equal("ValueError", kind_of(pool.join, pool))
    assert.matches("still running", tostring(err_of(pool.join, pool)))
    pool:close()
    pool:close()      -- twice is fine
    for _, f in ipairs {"apply", "apply_async", "map", "map_async", "starmap",
                        "starmap_async", "imap", "imap_unordered"} do
      local err = err_of(pool[f], pool, print, {})
      assert.equal("ValueError", err.kind, f)
      assert.equal("Pool not running", err.message, f)
    end
    local pids = worker_pids(pool)
    pool:join()
    for i = 1, 10 do
      assert.is_true(rs[i]:ready())
      assert.equal(i, rs[i]:get())
    end
    assert.equal(60, m:get()[30])
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    pool:join()       -- again: nothing to do
    pool:terminate()  -- after join: fine
    assert.equal(0, H.zombies())
  end)

  it("terminate stops the workers at once and fails what was pending", function()
    local pool = mp.Pool(2)
    local pids = worker_pids(pool)
    local slow = pool:apply_async(function() core.sleep(30) end)
    local m = pool:map_async(function() core.sleep(30) end, range(10))
    local t0 = core.now()
    pool:terminate()
    assert.is_true(core.now() - t0 < 5)
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    assert.is_true(slow:ready())
    assert.equal("BrokenPoolError", kind_of(slow.get, slow))
    assert.equal("BrokenPoolError", kind_of(m.get, m, 1))
    assert.equal("ValueError", kind_of(pool.apply, pool, print))
    pool:terminate()
    pool:close()
    pool:join()
    assert.equal(0, H.zombies())
  end)

  it("a <close> variable terminates the pool", function()
    local pids
    do
      local pool <close> = mp.Pool(2)
      pids = worker_pids(pool)
      assert.equal(2, pool:apply(function() return 2 end))
      for _, pid in ipairs(pids) do assert.is_true(alive(pid)) end
    end
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    -- also when the block leaves with an error
    local ok = pcall(function()
      local pool <close> = mp.Pool(1)
      pids = worker_pids(pool)
      error("leaving")
    end)
    assert.is_false(ok)
    for _, pid in ipairs(pids) do assert.is_false(alive(pid)) end
    assert.equal(0, H.zombies())
  end)

  it("a forgotten pool is terminated by the garbage collector", function()
    -- (made in a function of its own: a block's dead local stays on the
    -- stack, and so reachable, until its register is reused)
    local pids = (function()
      local pool = mp.Pool(2)
      pool:apply(function() end)
      return worker_pids(pool)
    end)()
    collectgarbage()
    collectgarbage()
    for _, pid in ipairs(pids) do
      assert.is_true(H.eventually(function() return not alive(pid) end, 5))
    end
    -- (the killed workers are reaped at the runtime's next fork)
    mp.Pool(1):terminate()
    assert.equal(0, H.zombies())
  end)

  it("workers that exit at the end of the script are not left behind", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local pool = mp.Pool(2)   -- never closed
      local pids = {}
      for _, w in pairs(pool._workers) do pids[#pids + 1] = w.pid end
      print(pool:apply(function() return "ok" end), table.concat(pids, " "))
    ]])
    assert.equal(0, code, err)
    local pids = {}
    for pid in out:match("^ok\t(.*)\n$"):gmatch("%d+") do pids[#pids + 1] = pid end
    assert.equal(2, #pids)
    for _, pid in ipairs(pids) do
      assert.is_true(H.eventually(function() return not alive(pid) end, 5))
    end
  end)

  it("a pool can only be used by the process that made it", function()
    local pool <close> = mp.Pool(1)
    local p = mp.Process{target = function()
      local ok, err = pcall(pool.apply, pool, print)
      os.exit(not ok and err.kind == "ProcessError" and 0 or 3)
    end}
    p:start()
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal(5, pool:apply(function() return 5 end))
  end)

  it("nested pools inside tasks", function()
    local pool <close> = mp.Pool(2)
    local r = pool:map(function(n)
      local inner <close> = mp.Pool(2)
      local sq = inner:map(function(x) return x * x end, range(n))
      local s = 0
      for i = 1, sq.n do s = s + sq[i] end
      return s
    end, {3, 10, 100})
    assert.same({14, 385, 338350, n = 3}, r)
    assert.equal(0, H.zombies())
  end)
end)

describe("Pool waits", function()
  -- A result already in the result queue when get/wait is called ends the
  -- wait at once, even while other tasks still run (the owner used to
  -- take it, then sleep until the next event: the other task's end, or
  -- the wait's whole timeout).
  it("a finished task's get does not wait for an unrelated running task", function()
    local pool <close> = mp.Pool(2)
    local ev = mp.Event()
    local slow = pool:apply_async(function() ev:wait(10); return "slow" end)
    local fast = pool:apply_async(function() return "fast" end)
    -- its result reaches the queue while the owner is not in a pool call
    -- (and the owner's periodic worker check is due)
    mp.Event():wait(0.3)
    local t = mp.now()
    assert.equal("fast", fast:get())
    assert.is_true(mp.now() - t < 2, "get waited for the other task")
    local t2 = mp.now()
    local quick = pool:apply_async(function() return 1 end)
    mp.Event():wait(0.3)
    assert.is_true(quick:wait(10))
    assert.is_true(mp.now() - t2 < 2.5, "wait(10) waited out its timeout")
    ev:set()
    assert.equal("slow", slow:get(10))
  end)
end)

-- issue 13 (items 10, 12, S7): misuse raises in the caller, at the
-- caller's line, naming the call; a dot-call for a method call says so.
describe("Pool misuse is told at the caller's line", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  -- the message f raises (a string: the position is in it)
  local function raised(f)
    local ok, err = pcall(f)
    assert.is_false(ok, "expected an error")
    assert.equal("string", type(err), tostring(err))
    return err
  end
  local function here() return debug.getinfo(2, "l").currentline end
  local function at(line) return "pool_spec%.lua:" .. line .. ": " end

  it("a dot-call (Python's habit) says to use a colon", function()
    local e, l = raised(function() pool.map(print, {1}) end), here()
    assert.matches(at(l) .. "calling 'map' on bad self %(Pool expected, got " ..
                   "function; use pool:map%(%.%.%.%)%)", e)
    e, l = raised(function() pool.apply(print) end), here()
    assert.matches(at(l) .. "calling 'apply' on bad self .*use pool:apply", e)
    local r = pool:apply_async(function() return 1 end)
    e, l = raised(function() r.get() end), here()
    assert.matches(at(l) .. "calling 'get' on bad self %(AsyncResult expected, " ..
                   "got nil; use r:get%(%.%.%.%)%)", e)
    assert.equal(1, r:get(10))
  end)

  it("bad arguments name the call and point at the caller", function()
    local e, l = raised(function() pool:apply(print, 5) end), here()
    assert.matches(at(l) .. "bad argument #2 to 'apply' %(args must be a table, got number%)", e)
    e, l = raised(function() pool:map({1, 2}, print) end), here()
    assert.matches(at(l) .. "bad argument #1 to 'map' %(function expected, got table%)", e)
    e, l = raised(function() pool:imap(print, 5) end), here()
    assert.matches(at(l) .. "bad argument #2 to 'imap' %(table or function expected, got number%)", e)
    e, l = raised(function() pool:apply_async(print, {}, 5) end), here()
    assert.matches(at(l) .. "bad argument #3 to 'apply_async' %(bad options", e)
    e, l = raised(function() pool:map_async(print, {1}, nil, 5) end), here()
    assert.matches(at(l) .. "bad argument #4 to 'map_async' %(function or nil expected", e)
    e, l = raised(function() mp.Pool("x") end), here()
    assert.matches(at(l) .. "bad argument #1 to 'Pool' %(processes must be an integer", e)
  end)

  it("map over a table that is not a sequence raises (not an empty result)", function()
    local e, l = raised(function() pool:map(print, {a = 1, b = 2}) end), here()
    assert.matches(at(l) .. "bad argument #2 to 'map' %(iterable must be a sequence", e)
    e, l = raised(function() pool:imap_unordered(print, {a = 1}) end), here()
    assert.matches(at(l) .. "bad argument #2 to 'imap_unordered' %(iterable must be a sequence", e)
    -- an empty table is an empty sequence still
    assert.equal(0, pool:map(print, {}).n)
  end)

  it("starmap's items that are not tables raise in the caller; no worker dies", function()
    local pids = worker_pids(pool)
    local e, l = raised(function() pool:starmap(math.max, {1, 2, 3}) end), here()
    assert.matches(at(l) .. "bad argument #2 to 'starmap' %(item 1 of iterable " ..
                   "must be a table of arguments, got number%)", e)
    e = raised(function() pool:starmap_async(math.max, {{1, 2}, "x"}) end)
    assert.matches("item 2 of iterable must be a table of arguments, got string", e)
    assert.same(pids, worker_pids(pool))
    assert.same({2, 4, n = 2}, pool:starmap(math.max, {{1, 2}, {4, 3}}))
  end)

  it("AsyncResult:get and wait refuse a timeout that is not a number", function()
    local r = pool:apply_async(function() return 7 end)
    local e, l = raised(function() r:get("x") end), here()
    assert.matches(at(l) .. "bad argument #1 to 'get' %(number or nil expected, got string%)", e)
    e, l = raised(function() r:wait({}) end), here()
    assert.matches(at(l) .. "bad argument #1 to 'wait' %(number or nil expected, got table%)", e)
    assert.matches("timeout is NaN", raised(function() r:get(0/0) end))
    assert.equal(7, r:get(10))
  end)

  it("mp.wait(objs, false) raises instead of waiting forever", function()
    local a, b = mp.Pipe()
    local t0 = core.now()
    local e, l = raised(function() mp.wait({a}, false) end), here()
    assert.matches(at(l) .. "bad argument #2 to 'wait' %(number or nil expected, got boolean%)", e)
    assert.is_true(core.now() - t0 < 5)
    b:send(1)
    assert.same({a}, mp.wait({a}, 5))
    a:close() b:close()
  end)

  it("a Listener's and a manager proxy's dot-calls are told too", function()
    local listener = mp.connection.Listener()
    local e, l = raised(function() listener.accept(0) end), here()
    assert.matches(at(l) .. "calling 'accept' on bad self %(Listener expected, " ..
                   "got number; use listener:accept%(%.%.%.%)%)", e)
    listener:close()
    local m <close> = mp.Manager()
    local d = m:dict()
    d.a = 1
    e, l = raised(function() d.keys() end), here()
    assert.matches(at(l) .. "calling 'keys' on bad self %(DictProxy expected, " ..
                   "got nil; use d:keys%(%.%.%.%)%)", e)
    local q = m:JoinableQueue()
    q:put(1)                           -- (inherited methods still accept it)
    e, l = raised(function() q.get() end), here()
    assert.matches(at(l) .. "calling 'get' on bad self", e)
    assert.equal(1, q:get())
    assert.same({"a"}, d:keys())
  end)
end)

describe("Pool: a callback that terminates its own pool", function()
  it("get still returns the result that had arrived", function()
    local pool = mp.Pool(2)
    local r = pool:apply_async(function() return 42 end, {}, function() pool:terminate() end)
    assert.equal(42, r:get(10))
    local pool2 = mp.Pool(2)
    local m = pool2:map_async(function(x) return x * 2 end, {1, 2, 3}, nil,
                              function() pool2:terminate() end)
    assert.same({2, 4, 6, n = 3}, m:get(10))
    assert.equal("<Pool state=TERMINATE pool_size=2>", tostring(pool2))
  end)
end)

-- issue 13 item 8
describe("Pool imap over an input iterator that raises", function()
  local pool
  setup(function() pool = mp.Pool(2) end)
  teardown(function() pool:terminate() end)

  -- CPython's exception_throwing_generator: 0, 1, ... and an error at when
  local function gen(total, when)
    local i = -1
    return function()
      i = i + 1
      if i == when then error("SayWhenError at " .. i, 0) end
      if i < total then return i end
    end
  end
  local function sqr(x) return x * x end

  for _, case in ipairs{{"imap", 1, gen, 10}, {"imap", 2, gen, 4},
                        {"imap_unordered", 1, gen, 10}, {"imap_unordered", 2, gen, 4}} do
    local method, chunksize, make, total = case[1], case[2], case[3], case[4]
    it(method .. " (chunksize " .. chunksize .. ") yields the items before the failure, then raises", function()
      local got = {}
      local ok, err = pcall(function()
        for _, v in pool[method](pool, sqr, make(total, 3), chunksize) do got[#got + 1] = v end
      end)
      assert.is_false(ok)
      assert.equal("SayWhenError at 3", err)
      table.sort(got)
      assert.same({0, 1, 4}, got)
      -- the pool goes on
      assert.same({1, 4, n = 2}, pool:map(sqr, {1, 2}))
    end)
  end
end)

-- issue 13 item 16
describe("Pool progress bar", function()
  it("fits a 40-column terminal, keeps prints on their own lines, counts iterator input, ends with the time taken", function()
    local path = H.write(os.tmpname() .. ".lua", [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool <close> = mp.Pool(2)
      local t = {} for i = 1, 60 do t[i] = i end
      pool:map(function(x)
        core.sleep(0.01)
        if x == 30 then print("worker says " .. x) end
        return x
      end, t, {progress = true, chunksize = 1})
      for i, v in pool:imap(function(x) core.sleep(0.01) return x end, t, {progress = true}) do
        if i == 20 then print("got " .. v) end
      end
      local n = 0
      for _ in pool:imap(function(x) core.sleep(0.01) return x end,
                         function() n = n + 1 if n <= 50 then return n end end,
                         {progress = true}) do end
      io.write("ALL DONE\n")
      io.read()
    ]])
    local t = H.terminal(H.luamp .. " " .. path, 40, 12)
    local ok, screen = pcall(t.wait_for, t, "ALL DONE", 60)
    t:close()
    os.remove(path)
    assert.is_true(ok, screen)
    local lines, bars = {}, 0
    for l in (screen .. "\n"):gmatch("([^\n]*)\n") do
      lines[#lines + 1] = l
      -- (the screen joins wrapped lines: one longer than 39 wrapped)
      assert.is_true(#l < 40, "a line wider than the terminal: " .. l)
      if l:find("it/s", 1, true) then bars = bars + 1 end
    end
    assert.equal(3, bars, screen)
    assert.is_true(screen:find("\nworker says 30\n", 1, true) ~= nil or
                   screen:find("^worker says 30\n") ~= nil, screen)
    assert.is_not_nil(screen:find("\ngot 20\n", 1, true), screen)
    assert.matches("\n%[#+%] 60/60 [%d.]+ it/s in 0:%d%d\n", screen)
    assert.matches("\n50 done [%d.]+ it/s in 0:%d%d\nALL DONE$", screen)
  end)

  it("counts iterator input when stderr is not a terminal", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local pool <close> = mp.Pool(2)
      local n = 0
      for _ in pool:imap(function(x) return x end,
                         function() n = n + 1 if n <= 7 then return n end end,
                         {progress = true}) do end
    ]])
    assert.equal(0, code, err)
    assert.equal("", out)
    assert.matches("^7 done in [%d.]+ s %([%d.]+ it/s%)\n$", err)
  end)
end)

-- issue 13 item 12: error objects too (a stock lua5.4 prints an uncaught
-- one's tostring alone)
describe("Error objects of a public call carry the caller's line", function()
  it("in the message, as error() puts it in a string, and in err.where", function()
    local pool = mp.Pool(1)
    pool:close()
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() pool:map(print, {1}) end)
    assert.is_false(ok)
    assert.equal("ValueError", err.kind)
    assert.matches("pool_spec%.lua:" .. line .. ": Pool not running$", err.message)
    assert.matches("pool_spec%.lua:" .. line .. "$", err.where)
    assert.matches("^ValueError: [^\n]*pool_spec%.lua:" .. line .. ": Pool not running",
                   tostring(err))
    -- called straight through pcall (a C function) there is no line
    assert.equal("Pool not running", select(2, pcall(pool.map, pool, print, {1})).message)
    pool:join()
    local p = mp.Process(function() end)
    p:start() p:join()
    line = debug.getinfo(1, "l").currentline + 1
    ok, err = pcall(function() p:start() end)
    assert.equal("ProcessError", err.kind)
    assert.matches("pool_spec%.lua:" .. line .. ": cannot start a process twice$", err.message)
  end)
end)
