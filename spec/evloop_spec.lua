-- Event loops: fileno() and the cqueues protocol (pollfd, events,
-- timeout) on queues, connections, listeners, processes and the Pool,
-- driven by real host loops -- luv (libuv) and cqueues -- in this process.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local uv = require "luv"
local cqueues = require "cqueues"

local CLK_TCK = tonumber((H.sh("getconf CLK_TCK"))) or 100

-- This process's CPU time (utime + stime), in seconds.
local function cpu_seconds()
  local f = {}
  for x in H.slurp("/proc/self/stat"):match("^%d+ %b() (.*)$"):gmatch("%S+") do
    f[#f + 1] = x
  end
  -- (fields 14 and 15 of the file; 12 and 13 after pid and comm)
  return (tonumber(f[12]) + tonumber(f[13])) / CLK_TCK
end
-- A difference of two cpu_seconds() readings is off by up to a tick at
-- each end: a share is checked with that much slack (the second pass's
-- 100-task loops wait ~0.6 s, whose 5% is three ticks).
local TICK_SLACK = 2 / CLK_TCK

-- Whether fd is readable now, by poll(2) alone.
local function readable(fd, timeout)
  return #core.wait_fds({fd}, timeout or 0) > 0
end

-- Runs a host loop over watch = {{obj, on_ready}, ...} until an
-- on_ready calls stop() or limit seconds pass (an error).  "luv": one
-- uv poll handle per object on obj:fileno(); "cqueues": one coroutine
-- that cqueues.poll()s them all.  Returns how many times each on_ready
-- ran.  setup(stop), when given, runs inside the loop first.
local function drive(kind, watch, limit, setup)
  local stopped, failure = false, nil
  local runs = {}
  for i = 1, #watch do runs[i] = 0 end
  local function stop() stopped = true end
  local function call(i)
    runs[i] = runs[i] + 1
    local ok, e = pcall(watch[i][2], stop)
    if not ok then failure, stopped = e, true end
  end
  if kind == "luv" then
    local handles = {}
    local function close_all()
      for _, h in ipairs(handles) do
        if not h:is_closing() then h:close() end
      end
    end
    local guard = uv.new_timer()
    handles[1] = guard
    guard:start(math.floor(limit * 1000), 0, function()
      failure, stopped = failure or "the loop timed out", true
      close_all()
    end)
    for i, w in ipairs(watch) do
      local h = uv.new_poll(w[1]:fileno())
      handles[#handles + 1] = h
      h:start("r", function(err)
        if err then failure, stopped = err, true else call(i) end
        if stopped then close_all() end
      end)
    end
    if setup then
      local ok, e = pcall(setup, stop)
      if not ok then failure, stopped = e, true end
      if stopped then close_all() end
    end
    uv.run()
  else
    local deadline = core.now() + limit
    local cq = cqueues.new()
    cq:wrap(function()
      if setup then setup(stop) end
      local objs = {}
      for i, w in ipairs(watch) do objs[i] = w[1] end
      objs[#objs + 1] = 1.0        -- (a timeout: look at the clock)
      while not stopped do
        if core.now() > deadline then
          failure = "the loop timed out"
          break
        end
        for _, o in ipairs({cqueues.poll(table.unpack(objs))}) do
          for i, w in ipairs(watch) do
            if w[1] == o and not stopped then call(i) end
          end
        end
      end
    end)
    local ok, err = cq:loop()
    if not ok then failure = failure or err end
  end
  if failure then error(failure, 0) end
  return runs
end

-- Takes what is in q now (get_nowait until Empty), calling f on each.
local function take_all(q, f)
  while true do
    local ok, v = pcall(q.get_nowait, q)
    if not ok then
      assert(type(v) == "table" and v.kind == "Empty", tostring(v))
      return
    end
    f(v)
  end
end

-- (12 ms tasks on 2 workers: ~170 results a second.  The loop's CPU is
-- what each wake-up costs -- ~150 us for a result and its callback, much
-- of it the kernel's context switches on this VM -- so its share follows
-- the rate: with 8 ms tasks the cqueues loops used 3-4% and, with the
-- machine's load at 11, 5.5% now and then.)
local N = H.soak(1000)   -- (100 in the second pass; see H.soak)
local function nap(i)
  core.sleep(0.012)
  return i
end

for _, kind in ipairs {"luv", "cqueues"} do
  describe("Pool in a " .. kind .. " loop", function()
    it("runs " .. N .. " tasks to completion; the loop's process sleeps while it waits", function()
      local pool <close> = mp.Pool(2)
      local done, sum = 0, 0
      local c0, t0
      drive(kind, {{pool, function() pool:poll() end}}, 120, function(stop)
        for i = 1, N do
          pool:apply_async(nap, {i}, function(v)
            done, sum = done + 1, sum + v
            if done == N then stop() end
          end)
        end
        c0, t0 = cpu_seconds(), core.now()
      end)
      local cpu, wall = cpu_seconds() - c0, core.now() - t0
      assert.equal(N, done)
      assert.equal(N * (N + 1) // 2, sum)
      -- (generous: a busy-polling loop uses ~100%; the sanitizers make the
      -- loop's own work -- 1000 results and callbacks -- about 3x dearer)
      local share = H.sanitized() and 0.15 or 0.05
      assert.is_true(cpu < share * wall + TICK_SLACK, string.format(
        "the loop used %.2f s of CPU in %.2f s", cpu, wall))
    end)

    it("a worker SIGKILLed while the loop waits: the fd fires, its task fails with WorkerLostError", function()
      local pool <close> = mp.Pool(2)
      local q = mp.Queue()
      local err
      local r = pool:apply_async(function()
        q:put(mp.current_process().pid)
        core.sleep(60)
        return "never"
      end, nil, {error_callback = function(e) err = e end})
      local ok = pool:apply_async(function() return "fine" end)
      drive(kind, {
        {q, function() take_all(q, function(pid) core.kill(pid, "SIGKILL") end) end},
        {pool, function(stop)
          pool:poll()
          if err then stop() end
        end},
      }, 60)
      assert.equal("WorkerLostError", err.kind)
      assert.equal("WorkerLostError", H.err_of(r.get, r, 0).kind)
      assert.equal("fine", ok:get(10))
      -- the pool goes on (the worker was replaced)
      assert.equal(7, pool:apply(function() return 7 end))
    end)

    it("a task's deadline fires through the fd with no other event", function()
      local pool <close> = mp.Pool(1)
      local err
      local t0 = core.now()
      pool:apply_async(function() core.sleep(60) end, nil,
                       {timeout = 0.3, error_callback = function(e) err = e end})
      local runs = drive(kind, {{pool, function(stop)
        pool:poll()
        if err then stop() end
      end}}, 30)
      local took = core.now() - t0
      assert.equal("TimeoutError", err.kind)
      assert.is_true(took >= 0.3 and took < 10, "took " .. took)
      -- woken by the deadline and the worker's death, not by polling
      assert.is_true(runs[1] <= 20, "woken " .. runs[1] .. " times")
    end)
  end)
end

describe("a task deadline submitted while the luv loop already waits", function()
  it("fires through the fd with no other event", function()
    -- (luv asks for the fd once: the timed submit itself must arm the
    -- timer; cqueues arms at every cqueues.poll)
    local pool <close> = mp.Pool(1)
    local err
    local t0 = core.now()
    local kick = uv.new_timer()
    drive("luv", {{pool, function(stop)
      pool:poll()
      if err then stop() end
    end}}, 20, function()
      kick:start(50, 0, function()
        kick:close()
        pool:apply_async(function() core.sleep(60) end, nil,
                         {timeout = 0.3, error_callback = function(e) err = e end})
      end)
    end)
    assert.equal("TimeoutError", err.kind)
    assert.is_true(core.now() - t0 < 10)
  end)
end)

for _, kind in ipairs {"luv", "cqueues"} do
  describe("two pools and two queues in one " .. kind .. " loop", function()
    it("lose no wake-up over 10^4 events", function()
      local M = 2500                       -- per source: 4 sources
      local pa <close> = mp.Pool(1)
      local pb <close> = mp.Pool(1)
      local qa, qb = mp.Queue(), mp.Queue()
      local function producer(q, m)
        for i = 1, m do
          q:put(i)
          if i % 100 == 0 then core.sleep(0.002) end   -- empty now and then
        end
      end
      local procs = {}
      for i, q in ipairs {qa, qb} do
        procs[i] = mp.Process{target = producer, args = {q, M}}
      end
      local count = {0, 0, 0, 0}
      local sums = {0, 0, 0, 0}
      local total = 0
      local stop_loop
      local function got(k, v)
        count[k], sums[k] = count[k] + 1, sums[k] + v
        total = total + 1
        if total == 4 * M then stop_loop() end
      end
      -- pool tasks go in while the loop runs, 50 at a time
      local submitted = 0
      local function feed()
        for _ = 1, 50 do
          if submitted == M then return false end
          submitted = submitted + 1
          local i = submitted
          pa:apply_async(function(x) return x end, {i}, function(v) got(1, v) end)
          pb:apply_async(function(x) return x end, {i}, function(v) got(2, v) end)
        end
        return true
      end
      local feeder = kind == "luv" and uv.new_timer()
      drive(kind, {
        {pa, function() pa:poll() end},
        {pb, function() pb:poll() end},
        {qa, function() take_all(qa, function(v) got(3, v) end) end},
        {qb, function() take_all(qb, function(v) got(4, v) end) end},
      }, 120, function(stop)
        stop_loop = function()
          stop()
          if feeder and not feeder:is_closing() then feeder:close() end
        end
        for _, p in ipairs(procs) do p:start() end
        if feeder then
          feeder:start(1, 1, function() if not feed() then feeder:stop() end end)
        else
          cqueues.running():wrap(function()
            while feed() do cqueues.sleep(0.001) end
          end)
        end
      end)
      if feeder then
        if not feeder:is_closing() then feeder:close() end
        uv.run()
      end
      for _, p in ipairs(procs) do p:join(10) end
      assert.same({M, M, M, M}, count)
      local s = M * (M + 1) // 2
      assert.same({s, s, s, s}, sums)
    end)
  end)
end

describe("Queue:fileno()", function()
  for _, make in ipairs {"Queue", "JoinableQueue", "SimpleQueue"} do
    it(make .. ": readable exactly while a get would not block", function()
      local q = mp[make]()
      local fd = q:fileno()
      assert.equal(fd, q:pollfd())
      assert.equal("r", q:events())
      assert.is_false(readable(fd))
      assert.is_nil(q:timeout())
      local p = mp.Process{target = function(x) x:put("a") x:put("b") end, args = {q}}
      p:start()
      assert.is_true(readable(fd, 10))
      p:join()
      assert.equal(0, q:timeout())
      assert.equal("a", q:get())
      assert.is_true(readable(fd))          -- "b" is still there
      assert.equal("b", q:get())
      assert.is_false(readable(fd))         -- took the last: re-armed
      assert.is_true(q:empty())
      q:put("c")                            -- this process's put pokes too
      assert.is_true(readable(fd))
      assert.equal("c", q:get())
      assert.is_false(readable(fd))
      q:close()
    end)
  end

  it("two queues have two fds; each is woken by its own puts only", function()
    local a, b = mp.Queue(), mp.Queue()
    local fa, fb = a:fileno(), b:fileno()
    assert.are_not.equal(fa, fb)
    b:put(1)
    assert.is_false(readable(fa))
    assert.is_true(readable(fb))
    assert.equal(1, b:get_nowait())
    assert.is_false(readable(fb))
  end)

  it("an Empty from get_nowait re-arms after a stale wake-up", function()
    local q = mp.Queue()
    local fd = q:fileno()
    local other = mp.Process{target = function(x) x:put(1) end, args = {q}}
    other:start()
    other:join()
    assert.is_true(readable(fd))
    -- another consumer takes the item: the wake-up is stale
    local thief = mp.Process{target = function(x) x:get() end, args = {q}}
    thief:start()
    thief:join()
    assert.equal(0, thief.exitcode)
    assert.equal("Empty", H.err_of(q.get_nowait, q).kind)
    assert.is_false(readable(fd))
    q:put(2)
    assert.is_true(readable(fd))
  end)

  it("mp.wait and fileno() on one queue each get their wake-up", function()
    local q = mp.Queue()
    local fd = q:fileno()
    local p = mp.Process{target = function(x) core.sleep(0.2) x:put(1) end, args = {q}}
    p:start()
    local t = core.now()
    local ready = mp.connection.wait({q}, 10)
    assert.equal(1, #ready)
    assert.is_true(core.now() - t < 5, "mp.wait woke after " .. core.now() - t .. " s")
    assert.is_true(readable(fd, 5))
    p:join()
  end)

  it("works with cqueues.poll", function()
    local q = mp.Queue()
    assert.are_not.equal(q, (cqueues.poll(q, 0.05)))
    local p = mp.Process{target = function(x) core.sleep(0.1) x:put(1) end, args = {q}}
    p:start()
    assert.equal(q, cqueues.poll(q, 10))
    assert.equal(1, q:get_nowait())
    p:join()
  end)
end)

describe("Process:fileno()", function()
  it("is readable exactly when join would not block", function()
    local ev = mp.Event()
    local p = mp.Process{target = function(e) e:wait() end, args = {ev}}
    finally(function() ev:set() end)     -- (a failure must not leave it waiting)
    p:start()
    assert.equal(p.sentinel, p:fileno())
    assert.equal(p.sentinel, p:pollfd())
    assert.equal("r", p:events())
    assert.is_nil(p:timeout())
    assert.are_not.equal(p, (cqueues.poll(p, 0.2)))
    p:join(0)
    assert.is_true(p:is_alive())
    ev:set()
    assert.equal(p, cqueues.poll(p, 10))
    local t = core.now()
    p:join()
    assert.is_true(core.now() - t < 1)
    assert.equal(0, p.exitcode)
  end)
end)

describe("Connection and Listener", function()
  it("Connection: timeout() is 0 while messages wait in the read-ahead buffer", function()
    local a, b = mp.Pipe()
    assert.equal(a:fileno(), a:pollfd())
    assert.equal("r", a:events())
    assert.is_nil(a:timeout())
    assert.are_not.equal(a, (cqueues.poll(a, 0.05)))
    b:send(1)
    b:send(2)
    assert.equal(a, cqueues.poll(a, 5))
    assert.equal(1, a:recv())
    -- 2 was read ahead with 1: the fd no longer shows it, timeout does
    assert.is_false(readable(a:fileno()))
    assert.equal(0, a:timeout())
    assert.equal(a, cqueues.poll(a, 0.5))
    assert.equal(2, a:recv())
    assert.is_nil(a:timeout())
  end)

  it("Listener: readable when accept would not block", function()
    local l <close> = mp.connection.Listener()
    assert.equal(l:fileno(), l:pollfd())
    assert.equal("r", l:events())
    assert.is_nil(l:timeout())
    assert.are_not.equal(l, (cqueues.poll(l, 0.05)))
    local c = mp.connection.Client(l.address)
    assert.equal(l, cqueues.poll(l, 5))
    local s = l:accept(1)
    c:send("hi")
    assert.equal("hi", s:recv())
    c:close()
    s:close()
  end)
end)

-- A lost wake-up, made certain: the worker has finished dying before the
-- loop asks for the pool's fd again (cqueues calls pollfd() at every
-- cqueues.poll), and a dead worker's sentinel still open in its sibling
-- workers (they inherited it through fork).
describe("Pool fd: wake-ups are kept until pool:poll()", function()
  local function dead(pid)
    assert.is_true(H.eventually(function() return not H.alive(pid) end, 10))
  end

  it("pollfd() and fileno() do no work: a finished death stays readable for poll()", function()
    local pool <close> = mp.Pool(2)
    local q = mp.Queue()
    local err
    local fd = pool:fileno()
    pool:apply_async(function()
      q:put(mp.current_process().pid)
      core.sleep(60)
    end, nil, {error_callback = function(e) err = e end})
    local pid = q:get(true, 10)
    core.kill(pid, "SIGKILL")
    dead(pid)
    assert.equal(fd, pool:pollfd())          -- what cqueues does each round
    assert.equal(fd, pool:fileno())
    assert.is_nil(err)                       -- no callback outside poll()
    -- (waiting a little: /proc shows the zombie a moment before the
    -- kernel wakes the pidfd's pollers)
    assert.is_true(readable(fd, 5), "the death's wake-up was swallowed")
    pool:poll()
    assert.equal("WorkerLostError", err.kind)
  end)

  it("is quiet again after poll() handled a death, whichever worker died", function()
    local pool <close> = mp.Pool(3)
    local fd = pool:fileno()
    for round = 1, 3 do
      -- the oldest worker first: every younger one holds its sentinel
      local pid = H.worker_pids(pool)[1]
      core.kill(pid, "SIGKILL")
      dead(pid)
      assert.is_true(readable(fd, 10))
      pool:poll()
      assert.are_not.equal(pid, H.worker_pids(pool)[1])
      assert.is_false(readable(fd, 0.05),
        "round " .. round .. ": the fd stays readable after poll()")
    end
    assert.equal(5, pool:apply(function() return 5 end))
  end)

  for _, kind in ipairs {"luv", "cqueues"} do
    it(kind .. ": a death complete before the loop looks again wakes it", function()
      for _ = 1, 3 do
        local pool <close> = mp.Pool(2)
        local q = mp.Queue()
        local err
        pool:apply_async(function()
          q:put(mp.current_process().pid)
          core.sleep(60)
        end, nil, {error_callback = function(e) err = e end})
        local t0 = core.now()
        drive(kind, {
          {q, function() take_all(q, function(pid)
            core.kill(pid, "SIGKILL")
            dead(pid)
          end) end},
          {pool, function(stop)
            pool:poll()
            if err then stop() end
          end},
        }, 20)
        assert.equal("WorkerLostError", err.kind)
        assert.is_true(core.now() - t0 < 15)
      end
    end)
  end
end)

describe("EventSet", function()
  it("holds its own copy of each member: remove(key) works after the caller closed its fd", function()
    local es <close> = core.EventSet()
    local a, b = mp.Pipe()
    local key = es:add(a:fileno())
    assert.are_not.equal(a:fileno(), key)
    -- a child holds a copy of a's fd: closing ours does not end the file
    local ev = mp.Event()
    local p = mp.Process{target = function(e) e:wait(30) end, args = {ev}}
    finally(function() ev:set() p:join(10) end)
    p:start()
    b:send(1)
    assert.is_true(es:ready())
    a:close()
    es:remove(key)
    assert.is_false(es:ready())
    assert.matches("not a key", tostring(H.err_of(es.remove, es, key)))
    b:close()
  end)
end)

-- The executor's fd: ex:fileno() / cqueues.poll(ex), readable whenever
-- the executor has something to do; done callbacks run in ex:poll().
for _, kind in ipairs {"luv", "cqueues"} do
  describe("ProcessPoolExecutor in a " .. kind .. " loop", function()
    local futures = require "multiprocessing.futures"

    it(N .. " futures complete, callbacks run in ex:poll(); the loop's process sleeps while it waits", function()
      local ex <close> = futures.ProcessPoolExecutor(2)
      local done, sum, outside = 0, 0, 0
      local polling = false
      local c0, t0
      drive(kind, {{ex, function()
        polling = true
        ex:poll()
        polling = false
      end}}, 120, function(stop)
        for i = 1, N do
          ex:submit(nap, i):add_done_callback(function(f)
            if not polling then outside = outside + 1 end
            done, sum = done + 1, sum + f:result()
            if done == N then stop() end
          end)
        end
        c0, t0 = cpu_seconds(), core.now()
      end)
      local cpu, wall = cpu_seconds() - c0, core.now() - t0
      assert.equal(N, done)
      assert.equal(N * (N + 1) // 2, sum)
      assert.equal(0, outside)
      local share = H.sanitized() and 0.15 or 0.05
      assert.is_true(cpu < share * wall + TICK_SLACK, string.format(
        "the loop used %.2f s of CPU in %.2f s", cpu, wall))
    end)

    it("a worker SIGKILLed while the loop waits: the fd fires, its future fails with WorkerLostError", function()
      local ex <close> = futures.ProcessPoolExecutor(2)
      local q = mp.Queue()
      local f = ex:submit(function()
        q:put(mp.current_process().pid)
        core.sleep(60)
      end)
      local fine = ex:submit(function() return "fine" end)
      drive(kind, {
        {q, function() take_all(q, function(pid) core.kill(pid, "SIGKILL") end) end},
        {ex, function(stop)
          ex:poll()
          if f:done() then stop() end
        end},
      }, 60)
      assert.equal("WorkerLostError", f:exception(0).kind)
      assert.equal("fine", fine:result(10))
      assert.equal(7, ex:submit(function() return 7 end):result(10))
    end)

    it("max_tasks_per_child = 1: each worker leaves after a task and is replaced through the fd", function()
      local ex <close> = futures.ProcessPoolExecutor{max_workers = 2, max_tasks_per_child = 1}
      local M, done, pids = 60, 0, {}
      local runs = drive(kind, {{ex, function(stop)
        ex:poll()
        if done == M then stop() end
      end}}, 60, function()
        for i = 1, M do
          ex:submit(function(x) return x, core.getpid() end, i):add_done_callback(function(f)
            local _, pid = f:result()
            pids[pid] = true
            done = done + 1
          end)
        end
      end)
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.equal(M, done)
      assert.equal(M, n)
      -- woken for results and deaths (at most about 2 * M), not spinning on
      -- a dead worker's sentinel left in the set (500+ runs of a luv loop)
      assert.is_true(runs[1] <= 4 * M, "woken " .. runs[1] .. " times")
    end)

    it("a task deadline fires through the fd with no other event", function()
      local ex <close> = futures.ProcessPoolExecutor(1)
      local t0 = core.now()
      local f = ex:submit_with({timeout = 0.3}, function() core.sleep(60) end)
      local runs = drive(kind, {{ex, function(stop)
        ex:poll()
        if f:done() then stop() end
      end}}, 30)
      local took = core.now() - t0
      assert.equal("TimeoutError", f:exception(0).kind)
      assert.is_true(took >= 0.3 and took < 10, "took " .. took)
      assert.is_true(runs[1] <= 20, "woken " .. runs[1] .. " times")
    end)
  end)
end

describe("cqueues.poll on futures", function()
  local futures = require "multiprocessing.futures"

  it("waits on a queue and a future in one cqueues.poll", function()
    local ex <close> = futures.ProcessPoolExecutor(1)
    local q = mp.Queue()
    local f = ex:submit(function(x) core.sleep(0.2) return x * 2 end, 21)
    local p = mp.Process{target = function(out) out:put("hi") end, args = {q}}
    p:start()
    local got, answer = nil, nil
    local cq = cqueues.new()
    cq:wrap(function()
      local deadline = core.now() + 30
      while (got == nil or answer == nil) and core.now() < deadline do
        for _, o in ipairs({cqueues.poll(q, f, 1.0)}) do
          if o == q then take_all(q, function(v) got = v end)
          elseif o == f and f:done() then answer = f:result() end
        end
      end
    end)
    assert(cq:loop())
    p:join(10)
    assert.equal("hi", got)
    assert.equal(42, answer)
    -- a done future is ready at once, and needs no fd
    assert.is_nil(f:pollfd())
    assert.equal(0, f:timeout())
    assert.equal("r", f:events())
    assert.equal(f, cqueues.poll(f, 5))
  end)

  it("the executor's fd: ValueError once it is shut down; ex:timeout() is nil when idle", function()
    local ex = futures.ProcessPoolExecutor(1)
    assert.equal(ex:fileno(), ex:pollfd())
    assert.equal("r", ex:events())
    assert.is_nil(ex:timeout())
    ex:submit_with({timeout = 5}, function() core.sleep(0.2) end):result(10)
    ex:shutdown(true)
    assert.equal("ValueError", H.kind_of(ex.fileno, ex))
    assert.matches("ProcessPoolExecutor expected", tostring(H.err_of(ex.fileno, {})))
  end)
end)
