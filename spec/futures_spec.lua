-- multiprocessing.futures: ProcessPoolExecutor, the Future methods (on
-- the Pool's AsyncResult), as_completed and wait, cancellation (pending
-- and forced), done callbacks, shutdown, bad input, lost workers, leaks.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local futures = require "multiprocessing.futures"
local err_of, alive = H.err_of, H.alive

-- live children of this process (zombies included)
local function children()
  local out = H.sh("env -u LD_PRELOAD ps -o pid= --ppid " .. H.pid())
  local n = 0
  for _ in out:gmatch("%d+") do n = n + 1 end
  return n - 1    -- the ps itself (its shell execs it)
end

local function noop() end

local function sleeper(s, v)
  return function() core.sleep(s) return v end
end

describe("futures module", function()
  it("is mp.futures too, with the constants and CancelledError", function()
    assert.equal(futures, mp.futures)
    assert.equal("FIRST_COMPLETED", futures.FIRST_COMPLETED)
    assert.equal("FIRST_EXCEPTION", futures.FIRST_EXCEPTION)
    assert.equal("ALL_COMPLETED", futures.ALL_COMPLETED)
    assert.equal(mp.pool.AsyncResult, futures.Future)
    assert.equal("CancelledError", mp.new_error("CancelledError", "x").kind)
  end)
end)

describe("ProcessPoolExecutor", function()
  it("submit keeps every argument, nils included; the Future methods", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local f = ex:submit(function(...) return select("#", ...), ... end, 1, nil, 3, nil)
    assert.same({n = 5, 4, 1, nil, 3, nil}, table.pack(f:result(10)))
    assert.is_true(f:done())
    assert.is_false(f:running())
    assert.is_false(f:cancelled())
    assert.is_nil(f:exception())
    assert.is_false(f:cancel())              -- done: not cancellable
    local g = ex:submit(function() error({code = 7}) end)
    local e = g:exception(10)
    assert.equal("RemoteError", e.kind)
    assert.equal(7, e.value.code)
    assert.equal(e, err_of(g.result, g))
    assert.matches("<AsyncResult failed>", tostring(g))
  end)

  -- (from its third submission a function's encoding is stored, and
  -- submit puts its task in line: what that path must keep)
  it("submit of a function sent before: bad arguments named, upvalues seen, results whole", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local k = 10
    local function addk(x, y) return x + k, y end
    for i = 1, 4 do assert.equal(i + 10, ex:submit(addk, i):result(10)) end
    local co = coroutine.create(noop)
    local err = err_of(ex.submit, ex, addk, 1, co)
    assert.equal("EncodeError", err.kind)
    assert.matches(" at args%[2%]$", err.message)
    k = 20                                   -- a changed upvalue is sent anew
    assert.equal(21, ex:submit(addk, 1):result())
    assert.same({n = 2, 22, nil}, table.pack(ex:submit(addk, 2):result()))
    assert.same({n = 2, 23, "y"}, table.pack(ex:submit(addk, 3, "y"):result()))
    local f = ex:submit(addk, 4)
    assert.equal(24, f:result())
    assert.is_true(f:done())
    assert.equal(24, f:result())             -- done: the same value again
    assert.is_nil(f:exception())
    local g = ex:submit(addk, nil)
    assert.matches("attempt to perform arithmetic", err_of(g.result, g).message)
  end)

  it("takes max_workers, initializer, initargs, max_tasks_per_child", function()
    local ex <close> = futures.ProcessPoolExecutor{max_workers = 1,
      initializer = function(a, b) _G.INIT = a .. b end, initargs = {"x", "y"},
      max_tasks_per_child = 1}
    local pids = {}
    for i = 1, 3 do
      local init, pid = ex:submit(function() return _G.INIT, core.getpid() end):result(20)
      assert.equal("xy", init)
      pids[i] = pid
    end
    assert.are_not.equal(pids[1], pids[2])
    assert.are_not.equal(pids[2], pids[3])
  end)

  it("result and exception honour their timeouts", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local ev = mp.Event()
    local f = ex:submit(function() ev:wait() return 1 end)
    assert.equal("TimeoutError", err_of(f.result, f, 0.05).kind)
    assert.equal("TimeoutError", err_of(f.exception, f, 0).kind)
    ev:set()
    assert.equal(1, f:result(10))
  end)

  it("running() while a worker runs it; cancel() then fails", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local ev = mp.Event()
    local f = ex:submit(function() ev:wait() return "ok" end)
    assert.is_true(H.eventually(function() return f:running() end, 10))
    assert.is_false(f:cancel())
    assert.is_false(f:cancelled())
    ev:set()
    assert.equal("ok", f:result(10))
    assert.is_false(f:running())
  end)

  it("cancel() of a pending future: it never runs, result raises CancelledError", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local ev, q = mp.Event(), mp.Queue()
    local busy = ex:submit(function() ev:wait() return 1 end)
    local f = ex:submit(function() q:put("ran") return 2 end)
    local seen
    f:add_done_callback(function(x) seen = x end)
    assert.is_false(f:running())
    assert.is_true(f:cancel())
    assert.is_true(f:cancel())               -- again: still cancelled
    assert.is_true(f:cancelled() and f:done())
    assert.equal(f, seen)                    -- callbacks ran on cancel
    assert.equal("CancelledError", err_of(f.result, f).kind)
    assert.equal("CancelledError", err_of(f.exception, f).kind)
    assert.matches("<AsyncResult cancelled>", tostring(f))
    ev:set()
    assert.equal(1, busy:result(10))
    assert.equal(3, ex:submit(function() return 3 end):result(10))
    assert.is_true(q:empty())
  end)

  it("cancel{force = true} of a running future kills and replaces its worker", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local q = mp.Queue()
    local f = ex:submit(function() q:put(core.getpid()) core.sleep(60) return "never" end)
    local other = ex:submit(function() core.sleep(0.3) return "other" end)
    local pid = q:get(true, 10)
    assert.is_true(H.eventually(function() return f:running() end, 10))
    local calls = 0
    f:add_done_callback(function() calls = calls + 1 end)
    assert.is_true(f:cancel{force = true})
    assert.is_true(f:cancelled())
    assert.equal(1, calls)
    assert.is_false(alive(pid))
    assert.equal("CancelledError", err_of(f.result, f).kind)
    assert.equal("other", other:result(10))
    -- still two workers, the killed one not among them
    assert.equal(2, #H.worker_pids(ex._pool))
    for _, p in ipairs(H.worker_pids(ex._pool)) do assert.are_not.equal(pid, p) end
    assert.equal(9, ex:submit(function() return 9 end):result(10))
    assert.equal(0, H.zombies())
  end)

  -- (the race: a worker takes the task between the owner's look at what
  -- the workers hold and its write to the cancel ring; before the fix
  -- some 5% of these cancels said true while the task ran)
  it("a cancel that says true, made as an idle worker takes the task, means the task never runs", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local ran = mp.RawValue("i", 0)
    local said, n = {}, H.soak(300)
    for i = 1, n do
      local f = ex:submit(function(k) ran.value = k end, i)
      said[i] = f:cancel()
      if said[i] then
        assert.is_true(f:cancelled())
        assert.equal("CancelledError", err_of(f.result, f, 10).kind)
      else   -- (running; or skipped after all, its worker having seen the ring)
        local ok, e = pcall(f.result, f, 10)
        assert.is_true(ok or e.kind == "CancelledError")
      end
      assert.equal(i, ex:submit(function(k) return k end, i):result(10))
      if said[i] then
        assert.are_not.equal(i, ran.value, "cancel() said true, yet task " .. i .. " ran")
      end
    end
  end)

  it("a SIGKILLed worker fails only its own future with WorkerLostError", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local q = mp.Queue()
    local victim = ex:submit(function() q:put(core.getpid()) core.sleep(60) end)
    local fs = {}
    for i = 1, 20 do fs[i] = ex:submit(function(x) core.sleep(0.01) return x end, i) end
    local pid = q:get(true, 10)
    core.kill(pid, "SIGKILL")
    local e = victim:exception(20)
    assert.equal("WorkerLostError", e.kind)
    assert.matches("worker " .. pid .. " died", e.message)
    for i = 1, 20 do assert.equal(i, fs[i]:result(20)) end
    assert.equal(0, H.zombies())
  end)

  it("round trips one at a time go to one worker; the others sleep on (issue 15)", function()
    -- A task put while the worker that sent the last reply is on its way
    -- back to get wakes no one; one put while all sleep wakes the worker
    -- that went to sleep last (queue.c's wake_getter).  Before, the futex
    -- woke the worker asleep longest: 300 round trips on 4 workers
    -- changed worker 228-241 times (on 2 workers 98-246), each change a
    -- worker whose caches had gone cold; now 1-5, 21 with a core burned.
    local ex <close> = futures.ProcessPoolExecutor(4)
    local function pid() return require("multiprocessing.core").getpid() end
    for _ = 1, 20 do ex:submit(pid):result(10) end
    local last, changes = nil, 0
    for _ = 1, 300 do
      local p = ex:submit(pid):result(10)
      if last and p ~= last then changes = changes + 1 end
      last = p
    end
    assert.is_true(changes <= 75, changes .. " changes of worker in 300 round trips")
  end)

  it("submit_with{timeout} is a per-task timeout", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local f = ex:submit_with({timeout = 0.2}, function() core.sleep(60) end)
    local g = ex:submit_with({}, function(a, b) return a + b end, 2, 3)
    assert.equal("TimeoutError", f:exception(20).kind)
    assert.equal(5, g:result(20))
  end)

  it("map yields (i, v) in order, nils kept, with chunksize", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    for _, cs in ipairs {1, 3} do
      local got, n = {}, 0
      for i, v in ex:map(function(x) if x % 2 == 0 then return x * 10 end end,
                         {1, 2, 3, 4, 5, 6, 7}, {chunksize = cs}) do
        n = n + 1
        assert.equal(n, i)
        got[i] = v
      end
      assert.equal(7, n)
      assert.same({nil, 20, nil, 40, nil, 60, nil}, got)
    end
    local k, sum = 0, 0
    for _, v in ex:map(function(x) return x end, function()
      k = k + 1 if k <= 4 then return k end end) do sum = sum + v end
    assert.equal(10, sum)
  end)

  it("map: the item's error ends the loop; timeout counts from the call", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local ok, e = pcall(function()
      for _ in ex:map(function(x) if x == 2 then error("two") end return x end, {1, 2, 3}) do end
    end)
    assert.is_false(ok)
    assert.equal("RemoteError", e.kind)
    ok, e = pcall(function()
      for _ in ex:map(function(x) core.sleep(x) end, {0, 1.5}, {timeout = 0.3}) do end
    end)
    assert.is_false(ok)
    assert.equal("TimeoutError", e.kind)
  end)

  it("map: leaving the loop cancels the items not started", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local q = mp.Queue()
    for i in ex:map(function(x) q:put(x) core.sleep(0.05) return x end, H.range(50)) do
      if i == 2 then break end
    end
    ex:shutdown(true)
    local ran = 0
    while not q:empty() do q:get() ran = ran + 1 end
    assert.is_true(ran < 10, ran .. " items ran")
  end)

  it("map: a timeout cancels every item not started, the one waited for included", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local q = mp.Queue()
    local busy = ex:submit(sleeper(1, "busy"))
    local ok, e = pcall(function()
      for _ in ex:map(function(x) q:put(x) end, {1, 2, 3}, {timeout = 0.2}) do end
    end)
    assert.is_false(ok)
    assert.equal("TimeoutError", e.kind)
    assert.equal("busy", busy:result(20))
    ex:shutdown()
    assert.is_true(q:empty())
  end)

  it("submit after shutdown raises ValueError; shutdown(true) waits", function()
    local ex = futures.ProcessPoolExecutor(2)
    local f = ex:submit(sleeper(0.2, "late"))
    ex:shutdown()
    assert.is_true(f:done())
    assert.equal("late", f:result())
    local e = err_of(ex.submit, ex, function() end)
    assert.equal("ValueError", e.kind)
    assert.matches("after shutdown", e.message)
    assert.equal("ValueError", err_of(ex.map, ex, noop, {1}).kind)
    ex:shutdown()                              -- twice is harmless
  end)

  it("shutdown(false, {cancel_futures = true}) cancels what has not started", function()
    local ex = futures.ProcessPoolExecutor(1)
    local ev = mp.Event()
    local running = ex:submit(function() ev:wait() return "ran" end)
    assert.is_true(H.eventually(function() return running:running() end, 10))
    local pending = {}
    for i = 1, 5 do pending[i] = ex:submit(function() return i end) end
    ex:shutdown(false, {cancel_futures = true})
    for i = 1, 5 do assert.is_true(pending[i]:cancelled()) end
    assert.is_false(running:cancelled())
    ev:set()
    assert.equal("ran", running:result(10))
    ex:shutdown(true)
  end)

  it("<close> shuts down, waiting", function()
    local f
    do
      local ex <close> = futures.ProcessPoolExecutor(1)
      f = ex:submit(sleeper(0.1, 1))
    end
    assert.is_true(f:done())
    assert.equal(1, f:result())
  end)
end)

describe("done callbacks", function()
  it("run in the owner, with the future, before result returns", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local got = {}
    local f = ex:submit(sleeper(0.1, "v"))
    f:add_done_callback(function(x) got[#got + 1] = {x, core.getpid(), x:result()} end)
    f:add_done_callback(function() got[#got + 1] = "second" end)
    assert.equal("v", f:result(10))
    assert.equal(2, #got)
    assert.equal(f, got[1][1])
    assert.equal(H.pid(), got[1][2])
    assert.equal("v", got[1][3])
    assert.equal("second", got[2])
    -- added after done: called at once
    local late
    f:add_done_callback(function(x) late = x end)
    assert.equal(f, late)
  end)

  it("one that raises is logged on stderr and the others still run", function()
    local out, err, rc = H.script([[
      local futures = require "multiprocessing.futures"
      local ex <close> = futures.ProcessPoolExecutor(1)
      local f = ex:submit(function() return 1 end)
      local n = 0
      f:add_done_callback(function() error("cb boom") end)
      f:add_done_callback(function() n = n + 1 end)
      print(f:result(10), n)
    ]])
    assert.equal(0, rc, err)
    assert.equal("1\t1\n", out)
    assert.matches("exception calling callback for <AsyncResult finished>", err, 1, true)
    assert.matches("cb boom", err, 1, true)
  end)

  it("run through ex:poll() without waiting", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local seen
    local f = ex:submit(function() return 1 end)
    f:add_done_callback(function() seen = true end)
    assert.is_true(H.eventually(function() ex:poll() return seen end, 10))
  end)
end)

describe("as_completed and wait", function()
  it("as_completed yields each future once, as it completes", function()
    local ex <close> = futures.ProcessPoolExecutor(3)
    local slow = ex:submit(sleeper(1.2, "slow"))
    local mid = ex:submit(sleeper(0.4, "mid"))
    local fast = ex:submit(sleeper(0, "fast"))
    fast:result(10)
    local order = {}
    for f in futures.as_completed({slow, mid, fast, fast}, 20) do
      order[#order + 1] = f:result()
    end
    assert.same({"fast", "mid", "slow"}, order)
  end)

  it("as_completed raises TimeoutError for futures not done in time", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local fs = {ex:submit(sleeper(0, 1)), ex:submit(sleeper(30, 2))}
    local got = 0
    local ok, e = pcall(function()
      for _ in futures.as_completed(fs, 0.5) do got = got + 1 end
    end)
    assert.is_false(ok)
    assert.equal("TimeoutError", e.kind)
    assert.equal(1, got)
    fs[2]:cancel{force = true}
  end)

  it("wait: ALL_COMPLETED (the default), and a timeout", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local fs = {ex:submit(sleeper(0.1, 1)), ex:submit(sleeper(0.2, 2))}
    local done, not_done = futures.wait(fs)
    assert.equal(2, #done)
    assert.equal(0, #not_done)
    local long = ex:submit(sleeper(30))
    done, not_done = futures.wait({fs[1], long}, {timeout = 0.2})
    assert.same({fs[1]}, done)
    assert.same({long}, not_done)
    long:cancel{force = true}
  end)

  it("wait: FIRST_COMPLETED", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    local a, b = ex:submit(sleeper(0.1, 1)), ex:submit(sleeper(30, 2))
    local done, not_done = futures.wait({a, b}, {return_when = futures.FIRST_COMPLETED,
                                                 timeout = 20})
    assert.same({a}, done)
    assert.same({b}, not_done)
    b:cancel{force = true}
  end)

  it("wait: FIRST_EXCEPTION stops at a failure, else waits for all", function()
    local ex <close> = futures.ProcessPoolExecutor(3)
    local ok1 = ex:submit(sleeper(0, 1))
    local bad = ex:submit(function() core.sleep(0.2) error("x") end)
    local long = ex:submit(sleeper(30))
    local done, not_done = futures.wait({ok1, bad, long},
      {return_when = "FIRST_EXCEPTION", timeout = 20})
    assert.same({ok1, bad}, done)
    assert.same({long}, not_done)
    long:cancel{force = true}
    local c, d = ex:submit(sleeper(0.1, 1)), ex:submit(sleeper(0.2, 2))
    done, not_done = futures.wait({c, d}, {return_when = "FIRST_EXCEPTION"})
    assert.equal(2, #done)
    assert.equal(0, #not_done)
  end)

  it("wait and as_completed take futures of two executors and a Pool's AsyncResults", function()
    local ex1 <close> = futures.ProcessPoolExecutor(1)
    local ex2 <close> = futures.ProcessPoolExecutor(1)
    local pool <close> = mp.Pool(1)
    local fs = {ex1:submit(sleeper(0.3, "a")), ex2:submit(sleeper(0.1, "b")),
                pool:apply_async(function() core.sleep(0.2) return "c" end),
                pool:map_async(function(x) return x end, {7})}
    local done, not_done = futures.wait(fs, {timeout = 20})
    assert.equal(4, #done)
    assert.equal(0, #not_done)
    local got = {}
    for f in futures.as_completed({ex1:submit(sleeper(0.5, "x")),
                                   pool:apply_async(function() return "y" end)}, 20) do
      got[#got + 1] = f:result()
    end
    assert.same({"y", "x"}, got)
    -- and the Pool's AsyncResult is the Future
    local r = pool:apply_async(function() return 5 end)
    local seen
    r:add_done_callback(function(x) seen = x end)
    assert.equal(5, r:result(10))
    assert.equal(r, seen)
    assert.is_false(r:cancelled())
  end)
end)

describe("bad input gets clear errors at the caller's line", function()
  local ex
  setup(function() ex = futures.ProcessPoolExecutor(1) end)
  teardown(function() ex:shutdown() end)
  local here = "futures_spec%.lua:%d+: "

  it("submit of a non-function", function()
    assert.matches(here .. "bad argument #1 to 'submit' %(function expected, got number%)",
                   err_of(function() ex:submit(42) end))
    assert.matches(here .. "bad argument #2 to 'submit_with' %(function expected, got nil%)",
                   err_of(function() ex:submit_with({}) end))
    assert.matches(here .. "bad argument #1 to 'submit_with' %(unknown option 'timout'%)",
                   err_of(function() ex:submit_with({timout = 1}, noop) end))
    assert.matches(here .. "bad argument #1 to 'map' %(function expected",
                   err_of(function() ex:map("f", {}) end))
  end)

  it("wait or as_completed on a non-future", function()
    assert.matches(here .. "bad argument #1 to 'wait' %(item 2 is not a future",
                   err_of(function() futures.wait({ex:submit(noop), {}}) end))
    assert.matches(here .. "bad argument #1 to 'as_completed' %(table of futures expected",
                   err_of(function() futures.as_completed(7) end))
  end)

  it("negative or NaN timeouts", function()
    local f = ex:submit(noop)
    assert.matches(here .. "bad argument #1 to 'result' %(timeout must be a non%-negative number, got %-1",
                   err_of(function() f:result(-1) end))
    assert.matches(here .. "bad argument #1 to 'exception' %(timeout must be a non%-negative number, got NaN%)",
                   err_of(function() f:exception(0 / 0) end))
    assert.matches(here .. "bad argument #2 to 'wait' %(timeout must be",
                   err_of(function() futures.wait({f}, {timeout = -1}) end))
    assert.matches(here .. "bad argument #2 to 'as_completed' %(timeout must be",
                   err_of(function() futures.as_completed({f}, 0 / 0) end))
    assert.matches(here .. "bad argument #1 to 'submit_with' %(timeout must be",
                   err_of(function() ex:submit_with({timeout = -2}, noop) end))
  end)

  it("a timeout that is not a number says its type", function()
    local f = ex:submit(noop)
    assert.matches(here .. "bad argument #1 to 'result' %(timeout must be a non%-negative number, got string%)",
                   err_of(function() f:result("5") end))
    assert.matches(here .. "bad argument #2 to 'wait' %(timeout must be a non%-negative number, got string%)",
                   err_of(function() futures.wait({f}, {timeout = "1"}) end))
    assert.matches(here .. "bad argument #2 to 'map' %(task_timeout must be a non%-negative number, got NaN%)",
                   err_of(function() ex:map(noop, {}, {task_timeout = 0 / 0}) end))
  end)

  it("executor methods called with a bad self or a bad shutdown argument", function()
    for _, name in ipairs {"poll", "fileno", "timeout", "shutdown"} do
      assert.matches(here .. "bad argument #1 to '" .. name .. "' %(ProcessPoolExecutor expected, got nil%)",
                     err_of(function() ex[name](nil) end))
    end
    assert.matches(here .. "bad argument #1 to 'shutdown' %(boolean expected, got string%)",
                   err_of(function() ex:shutdown("yes") end))
    assert.equal(1, ex:submit(function() return 1 end):result(10))   -- still running
  end)

  it("return_when misspelt", function()
    assert.matches(here .. "bad argument #2 to 'wait' %(return_when must be FIRST_COMPLETED, " ..
                   "FIRST_EXCEPTION or ALL_COMPLETED, got FIRST_COMPLETE%)",
                   err_of(function() futures.wait({}, {return_when = "FIRST_COMPLETE"}) end))
  end)

  it("bad executor arguments", function()
    assert.equal("ValueError", err_of(futures.ProcessPoolExecutor, 0).kind)
    assert.equal("ValueError", err_of(futures.ProcessPoolExecutor, {max_workers = -1}).kind)
    assert.matches(here .. "bad argument #1 to 'ProcessPoolExecutor' %(unknown option 'workers'%)",
                   err_of(function() futures.ProcessPoolExecutor{workers = 2} end))
    assert.matches(here .. "bad argument #1 to 'add_done_callback' %(function expected",
                   err_of(function() ex:submit(noop):add_done_callback(1) end))
  end)
end)

describe("result collection (issue 15: q:_collect)", function()
  -- The owner takes its results with rq:_collect(tasks, timeouts, cls,
  -- pending [, seconds]): a plain job's one value (no callbacks, no
  -- timeout) is recorded in C as the reply is taken; any other reply is
  -- left in pending, in order, for the Lua side.
  local AsyncResult = futures.Future
  local function plain(tag)
    return setmetatable({_pool = false, _tag = tag, _done = false, _value = false},
                        AsyncResult)
  end

  it("records a plain job's value in one step; other replies wait in pending, in order", function()
    local q = core.Queue()
    local a, b, c = plain(1), plain(2), plain(3)
    local cb = plain(4)
    cb._plain = false                        -- (a done callback's mark)
    local tasks, timeouts, pend = {a, b, c, cb, plain(5), plain(6)}, {[6] = 1}, {}
    q:_put_task(0, 1, 0, 1, "one")
    q:_put_task(0, 2, 1, "boom")             -- a failure
    q:_put_task(0, 3, 0, 1, nil)             -- nil is a value too
    q:_put_task(0, 4, 0, 1, "cb")            -- a job with callbacks
    q:_put_task(0, 5, 0, 2, {"x", "y"})      -- two values
    q:_put_task(0, 6, 0, 1, "timed")         -- a job with a timeout
    q:_put_task(0, 9, 0, 1, "lost")          -- a tag off the books
    assert.equal(1, q:_collect(tasks, timeouts, AsyncResult, pend))
    assert.is_true(a._done)
    assert.equal("one", a._value)
    assert.is_nil(tasks[1])
    assert.same({{2, 1, "boom", n = 3}}, pend)
    assert.is_false(b._done)
    table.remove(pend, 1)
    assert.equal(1, q:_collect(tasks, timeouts, AsyncResult, pend))
    assert.is_true(c._done)
    assert.is_nil(c._value)
    assert.is_nil(tasks[3])
    for _, want in ipairs {{4, 0, 1, "cb", n = 4}, {5, 0, 2, {"x", "y"}, n = 4},
                           {6, 0, 1, "timed", n = 4}, {9, 0, 1, "lost", n = 4}} do
      assert.same({want}, pend)
      table.remove(pend, 1)
      assert.equal(0, q:_collect(tasks, timeouts, AsyncResult, pend))
    end
    assert.is_false(cb._done)
    assert.equal(cb, tasks[4])
    -- empty: nothing, at once
    assert.equal(0, q:_collect(tasks, timeouts, AsyncResult, pend))
    assert.same({}, pend)
    q:close()
  end)

  it("with seconds, waits that long for a reply (and no longer)", function()
    local q = core.Queue()
    local j = plain(1)
    local t0 = core.now()
    assert.equal(0, q:_collect({j}, {}, AsyncResult, {}, 0.1))
    local dt = core.now() - t0
    assert.is_true(dt >= 0.09 and dt < 5, "waited " .. dt)
    local p = mp.Process{target = function()
      core.sleep(0.1)
      q:_put_task(0, 1, 0, 1, 42)
    end}
    p:start()
    assert.equal(1, q:_collect({j}, {}, AsyncResult, {}, 30))
    assert.equal(42, j._value)
    p:join()
    assert.matches("table expected", tostring(err_of(q._collect, q, nil, {}, AsyncResult, {})))
    q:close()
  end)

  it("replies of every kind, taken in one drain, settle their futures in order", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local order = {}
    local fs = {
      ex:submit(function(x) return x end, 1),
      ex:submit(function() error("boom", 0) end),
      ex:submit(function() return 1, 2, 3 end),
      ex:submit(function(x) return x end, 4),
    }
    fs[4]:add_done_callback(function(f) order[#order + 1] = f:result() end)
    local last = ex:submit(function() return "last" end)
    -- (the worker runs them in turn; the owner takes them when it waits)
    assert.equal("last", last:result(30))
    assert.equal(1, fs[1]:result())
    assert.matches("boom", tostring(fs[2]:exception()))
    assert.same({1, 2, 3}, {fs[3]:result()})
    assert.same({4}, order)
  end)

  -- As pool_faults_spec's Ctrl-C test, for result() without a timeout:
  -- an interrupt at any instruction loses no reply, of either path.
  it("Ctrl-C at any instruction of result() loses no result", function()
    local ex <close> = futures.ProcessPoolExecutor(2)
    math.randomseed(15)
    local interrupts = 0
    for round = 1, 30 do
      local fs = {}
      for i = 1, 12 do
        -- every third one fails: its reply goes through pending
        fs[i] = ex:submit(function(x)
          if x % 3 == 0 then error(x, 0) end
          return x
        end, i)
      end
      for i = 1, 12 do
        while true do
          local ok, v = pcall(function()
            H.arm_interrupt(1500)
            local got, r = pcall(fs[i].result, fs[i])
            debug.sethook()
            if r == "interrupted!" then error(r, 0) end
            return {got, r}
          end)
          debug.sethook()
          if ok then
            if i % 3 == 0 then
              assert.is_false(v[1], round .. ":" .. i)
              assert.equal(i, v[2].value, round .. ":" .. i)
            else
              assert.same({true, i}, v, round .. ":" .. i)
            end
            break
          end
          assert.equal("interrupted!", v, round .. ":" .. i)
          interrupts = interrupts + 1
        end
      end
    end
    assert.is_true(interrupts > 10, "only " .. interrupts .. " interrupts")
  end)
end)

describe("executor lifecycles", function()
  it("leave no process, zombie or fd behind", function()
    local warm = futures.ProcessPoolExecutor(1)
    warm:submit(noop):result(10)
    warm:shutdown()
    collectgarbage()
    local fds, kids = H.fd_count(), children()
    for i = 1, 30 do
      local ex <close> = futures.ProcessPoolExecutor(2)
      assert.equal(i, ex:submit(function(x) return x end, i):result(20))
      if i % 3 == 0 then
        ex:submit(sleeper(30)):cancel{force = true}
      end
      if i % 5 == 0 then
        for _ = 1, 4 do ex:submit(sleeper(0.1)) end
        ex:shutdown(false, {cancel_futures = true})
      end
    end
    collectgarbage()
    collectgarbage()
    assert.equal(fds, H.fd_count())
    assert.equal(kids, children())
    assert.equal(0, H.zombies())
  end)
end)
