-- Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier:
-- Python's semantics and errors, scoped use, processes on both sides,
-- holders and waiters killed.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local pit = it   -- cross-process (mp.Process)

local our_fds = H.our_fds

local err_of = H.err_of

local kind_of = H.kind_of

local function timed(f, ...)
  local t0 = core.now()
  local r = f(...)
  return r, core.now() - t0
end

local function within(dt, t)
  assert.is_true(dt >= t - 0.005 and dt < t + 0.05,
    string.format("took %.3f s, wanted %.3f s", dt, t))
end

local function start(f, ...)
  local p = mp.Process{target = f, args = table.pack(...)}
  p:start()
  return p
end

describe("Lock", function()
  it("acquires, releases, and reports", function()
    local l = mp.Lock()
    assert.is_false(l:locked())
    assert.is_true(l:acquire())
    assert.is_true(l:locked())
    assert.matches("held by " .. H.pid(), tostring(l))
    assert.is_false(l:acquire(false))
    local r, dt = timed(l.acquire, l, true, 0.2)
    assert.is_false(r)
    within(dt, 0.2)
    l:release()
    assert.matches("unlocked", tostring(l))
    assert.equal("ValueError", kind_of(l.release, l))
    assert.matches("released too many times", err_of(l.release, l).message)
  end)

  it("runs a function holding it with with(), on errors too", function()
    local l = mp.Lock()
    assert.same({3, "x"}, {l:with(function(a, b) return a + b, "x" end, 1, 2)})
    local err = err_of(l.with, l, function() error({code = 7}) end)
    assert.same({code = 7}, err)
    assert.is_false(l:locked())
    assert.is_true(l:acquire(false))
    l:release()
  end)

  it("holds it for a <close> scope with guard()", function()
    local l = mp.Lock()
    do
      local held <close> = l:guard()
      assert.is_true(l:locked())
    end
    assert.is_false(l:locked())
    pcall(function()
      local held <close> = l:guard()
      error("boom")
    end)
    assert.is_false(l:locked())
  end)

  it("checks its arguments", function()
    local l = mp.Lock()
    assert.matches("boolean expected", tostring(err_of(l.acquire, l, "yes")))
    assert.matches("number expected", tostring(err_of(l.acquire, l, true, {})))
    assert.matches("Lock or RLock expected", tostring(err_of(l.acquire, {})))
    assert.matches("Lock or RLock expected", tostring(err_of(l.acquire, io.stdout)))
    assert.matches("Semaphore expected", tostring(err_of(mp.Semaphore().release, l)))
    assert.matches("Event expected", tostring(err_of(mp.Event().set, io.stderr)))
    l:close()
    assert.equal("ValueError", kind_of(l.acquire, l))
    assert.matches("closed", tostring(l))
  end)

  pit("excludes other processes and may be released by another", function()
    local l = mp.Lock()
    local flag = mp.Value("i", 0)
    l:acquire()
    local p = start(function()
      flag.value = 1
      l:acquire()          -- waits for the parent's release
      flag.value = 2
      -- leaves holding it: the parent releases it (Python's Lock allows)
    end)
    H.eventually(function() return flag.value == 1 end)
    H.sleep(0.1)
    assert.equal(1, flag.value)
    l:release()
    p:join(10)
    assert.equal(0, p.exitcode)
    assert.equal(2, flag.value)
  end)

  pit("goes to the next acquirer when its holder is killed", function()
    local l = mp.Lock()
    local ready = mp.Event()
    local p = start(function()
      l:acquire()
      ready:set()
      core.sleep(60)
    end)
    assert.is_true(ready:wait(10))
    assert.is_false(l:acquire(false))
    p:kill()
    -- not reaped yet (a zombie): it holds nothing any more
    local r, dt = timed(l.acquire, l, true, 5)
    assert.is_true(r)
    assert.is_true(dt < 1, "took over after " .. dt)
    l:release()
    p:join()
  end)

  pit("is taken over by a non-blocking acquire after the holder died", function()
    local l = mp.Lock()
    local p = start(function() l:acquire() end)
    p:join()
    assert.is_true(l:acquire(false))
  end)

  it("interrupts a blocked acquire with Ctrl-C", function()
    local script = os.tmpname() .. ".lua"
    H.write(script, [[
      local mp = require "multiprocessing"
      local l = mp.Lock()
      l:acquire()
      io.write("ready\n") io.flush()
      print(pcall(l.acquire, l))
      print(pcall(l.acquire, l, true, 0.05))
    ]])
    local out, err = H.sh(H.q(H.luamp) .. " " .. H.q(script) ..
      " & pid=$!; sleep 0.5; kill -INT $pid; wait $pid")
    os.remove(script)
    assert.equal("ready\nfalse\tinterrupted!\ntrue\tfalse\n", out, err)
  end)
end)

describe("Ctrl-C", function()
  -- lua.c (and luamp) catch one SIGINT per chunk: one run per wait
  local cases = {
    event = "local e = mp.Event() block(e.wait, e) e:set() print(e:wait(0))",
    semaphore = "local s = mp.Semaphore(0) block(s.acquire, s) s:release() " ..
                "print(s:acquire(false))",
    condition = "local c = mp.Condition() " ..
                "block(c.with, c, function() return c:wait() end) " ..
                "print(c:acquire(false))",
    barrier = "local b = mp.Barrier(2) block(b.wait, b) print(b.n_waiting == 0)",
  }
  for name, code in pairs(cases) do
    it("interrupts a blocked " .. name .. " wait, which still works after", function()
      local script = os.tmpname() .. ".lua"
      H.write(script, [[
        local mp = require "multiprocessing"
        local function block(f, ...)
          io.write("ready\n") io.flush()
          print(pcall(f, ...))
        end
      ]] .. code)
      local out, err = H.sh(H.q(H.luamp) .. " " .. H.q(script) ..
        " & pid=$!; sleep 0.4; kill -INT $pid; wait $pid")
      os.remove(script)
      assert.equal("ready\nfalse\tinterrupted!\ntrue\n", out, err)
    end)
  end
end)

describe("RLock", function()
  it("is recursive and owned", function()
    local r = mp.RLock()
    assert.is_true(r:acquire())
    assert.is_true(r:acquire(false))
    assert.matches("depth 2", tostring(r))
    r:release()
    r:release()
    assert.equal("ValueError", kind_of(r.release, r))
    assert.matches("un%-acquired", err_of(r.release, r).message)
    r:with(function() r:with(function() end) end)
    assert.is_false(r:locked())
  end)

  pit("cannot be released by another process", function()
    local r = mp.RLock()
    r:acquire()
    local q = mp.Queue()
    local p = start(function()
      local ok, err = pcall(r.release, r)
      q:put({ok, err.kind, r:acquire(false)})
    end)
    assert.same({false, "ValueError", false}, q:get(true, 10))
    p:join()
    r:release()
  end)
end)

describe("Semaphore", function()
  it("counts", function()
    local s = mp.Semaphore(2)
    assert.equal(2, s:get_value())
    assert.is_true(s:acquire())
    assert.is_true(s:acquire(false))
    assert.is_false(s:acquire(false))
    local r, dt = timed(s.acquire, s, true, 0.15)
    assert.is_false(r)
    within(dt, 0.15)
    s:release(); s:release(); s:release()
    assert.equal(3, s:get_value())       -- a plain Semaphore is unbounded
    assert.equal(1, mp.Semaphore():get_value())
    assert.equal(4, mp.Semaphore{value = 4}:get_value())
    assert.equal(0, mp.Semaphore(0):get_value())
    assert.matches(">= 0", tostring(err_of(mp.Semaphore, -1)))
    assert.matches("number expected", tostring(err_of(mp.Semaphore, "two")))
  end)

  it("is bounded as a BoundedSemaphore", function()
    local s = mp.BoundedSemaphore(2)
    s:acquire()
    s:release()
    local err = err_of(s.release, s)
    assert.equal("ValueError", err.kind)
    assert.matches("released too many times", err.message)
    assert.equal(2, s:get_value())
    s:with(function() assert.equal(1, s:get_value()) end)
    assert.equal(2, s:get_value())
  end)

  pit("wakes a waiter in another process on release", function()
    local s = mp.Semaphore(0)
    local q = mp.Queue()
    local p = start(function() q:put(s:acquire(true, 10)) end)
    H.sleep(0.2)
    s:release()
    assert.is_true(q:get(true, 10))
    p:join()
  end)

  pit("gives back the units of a scoped holder that was killed", function()
    local s = mp.BoundedSemaphore(1)
    local ready = mp.Event()
    local p = start(function()
      s:with(function()
        ready:set()
        core.sleep(60)
      end)
    end)
    assert.is_true(ready:wait(10))
    assert.is_false(s:acquire(false))
    p:kill()
    local r, dt = timed(s.acquire, s, true, 5)
    assert.is_true(r)
    assert.is_true(dt < 1)
    p:join()
  end)

  pit("does not give back units taken without scope (signalling)", function()
    local s = mp.Semaphore(1)
    local p = start(function() s:acquire() end)   -- takes the token, exits
    p:join()
    assert.is_false(s:acquire(true, 0.3))
  end)
end)

describe("Event", function()
  it("sets, clears and waits", function()
    local e = mp.Event()
    assert.is_false(e:is_set())
    local r, dt = timed(e.wait, e, 0.1)
    assert.is_false(r)
    within(dt, 0.1)
    e:set()
    assert.is_true(e:is_set())
    assert.is_true(e:wait())
    assert.is_true(e:wait(0))
    e:clear()
    assert.is_false(e:wait(0))
    assert.matches("unset", tostring(e))
  end)

  pit("wakes every waiting process", function()
    local e = mp.Event()
    local q = mp.Queue()
    local ps = {}
    for i = 1, 3 do ps[i] = start(function() q:put(e:wait(10)) end) end
    H.sleep(0.2)
    e:set()
    for _ = 1, 3 do assert.is_true(q:get(true, 10)) end
    for i = 1, 3 do ps[i]:join() end
  end)
end)

describe("Condition", function()
  it("needs its lock held", function()
    local c = mp.Condition()
    assert.equal("ValueError", kind_of(c.wait, c, 0))
    assert.equal("ValueError", kind_of(c.notify, c))
    assert.equal("ValueError", kind_of(c.notify_all, c))
    c:acquire()
    local r, dt = timed(c.wait, c, 0.1)
    assert.is_false(r)
    within(dt, 0.1)
    c:notify()
    c:release()
    assert.matches("Lock or RLock expected", tostring(err_of(mp.Condition, 5)))
  end)

  it("works over a given Lock, held again after wait", function()
    local l = mp.Lock()
    local c = mp.Condition(l)
    c:with(function()
      assert.is_true(l:locked())
      c:wait(0.01)
      assert.is_true(l:locked())
    end)
    assert.is_false(l:locked())
    local r = mp.RLock()
    local c2 = mp.Condition{lock = r}
    r:acquire(); r:acquire()
    c2:wait(0.01)          -- lets go of both levels, takes both back
    r:release(); r:release()
    assert.equal("ValueError", kind_of(r.release, r))
  end)

  it("waits for a predicate", function()
    local c = mp.Condition()
    local n = 0
    c:acquire()
    local r, dt = timed(c.wait_for, c, function() n = n + 1 return n > 100 end, 0.1)
    assert.is_false(r)
    within(dt, 0.1)
    assert.equal("yes", c:wait_for(function() return "yes" end))
    c:release()
  end)

  pit("notifies one, then all, waiting processes", function()
    local c = mp.Condition()
    local woke = mp.Value("i", 0)
    local ps = {}
    for i = 1, 3 do
      ps[i] = start(function()
        c:with(function()
          if c:wait(10) then woke:add(1) end
        end)
      end)
    end
    H.eventually(function()
      return c:with(function() return true end) and woke.value == 0
    end)
    H.sleep(0.3)
    c:with(function() c:notify() end)
    assert.is_truthy(H.eventually(function() return woke.value == 1 end))
    H.sleep(0.1)
    assert.equal(1, woke.value)
    c:with(function() c:notify_all() end)
    assert.is_truthy(H.eventually(function() return woke.value == 3 end))
    for i = 1, 3 do ps[i]:join(); assert.equal(0, ps[i].exitcode) end
  end)

  pit("never gives a notification to a waiter that was killed", function()
    local c = mp.Condition()
    local woke = mp.Value("i", 0)
    local victim = start(function() c:with(function() c:wait() end) end)
    H.sleep(0.3)
    local live = start(function()
      c:with(function() if c:wait(10) then woke:add(1) end end)
    end)
    H.sleep(0.3)
    victim:kill(); victim:join()
    c:with(function() c:notify() end)
    assert.is_truthy(H.eventually(function() return woke.value == 1 end))
    live:join()
  end)
end)

describe("Barrier", function()
  it("checks its arguments and reports", function()
    assert.matches("parties", tostring(err_of(mp.Barrier, 0)))
    assert.matches("function expected", tostring(err_of(mp.Barrier, 2, 5)))
    local b = mp.Barrier{parties = 3}
    assert.equal(3, b.parties)
    assert.equal(0, b.n_waiting)
    assert.is_false(b.broken)
    local runs = 0
    local one = mp.Barrier(1, function() runs = runs + 1 end)
    assert.equal(1, one:wait())
    assert.equal(1, one:wait())
    assert.equal(2, runs)
  end)

  it("breaks on timeout, abort, and is reset", function()
    local b = mp.Barrier(2, nil, 0.1)
    local err, dt
    local t0 = core.now()
    err = err_of(b.wait, b)
    dt = core.now() - t0
    within(dt, 0.1)
    assert.equal("BrokenBarrierError", err.kind)
    assert.is_true(b.broken)
    assert.equal("BrokenBarrierError", kind_of(b.wait, b, 1))
    b:reset()
    assert.is_false(b.broken)
    b:abort()
    assert.is_true(b.broken)
  end)

  pit("releases all parties with indexes 1..n and runs the action once", function()
    local runs = mp.Value("i", 0)
    local b = mp.Barrier(3, function() runs:add(1) end)
    local q = mp.Queue()
    local ps = {}
    for i = 1, 2 do ps[i] = start(function() q:put(b:wait(10)) end) end
    local mine = b:wait(10)
    local got = {mine, q:get(true, 10), q:get(true, 10)}
    table.sort(got)
    assert.same({1, 2, 3}, got)
    assert.equal(1, runs.value)
    for i = 1, 2 do ps[i]:join() end
    -- and again, the barrier is reusable
    for i = 1, 2 do ps[i] = start(function() q:put(b:wait(10)) end) end
    b:wait(10)
    q:get(true, 10); q:get(true, 10)
    assert.equal(2, runs.value)
    for i = 1, 2 do ps[i]:join() end
  end)

  pit("breaks instead of hanging when a waiting party is killed", function()
    local b = mp.Barrier(3)
    local q = mp.Queue()
    local victim = start(function() b:wait() end)
    local other = start(function()
      local ok, err = pcall(b.wait, b)
      q:put(ok or err.kind)
    end)
    H.sleep(0.3)
    assert.equal(2, b.n_waiting)
    victim:kill(); victim:join()
    assert.equal("BrokenBarrierError", q:get(true, 10))
    other:join()
    b:reset()
    assert.is_false(b.broken)
    assert.equal(0, b.n_waiting)
  end)

  it("refuses to travel with its action to a process that lacks it", function()
    local b = mp.Barrier(2, print)
    assert.is_true(mp.decode(mp.encode(b), {trusted = true}) == b)
    local hex = mp.encode(b):gsub(".", function(c)
      return string.format("%02x", c:byte())
    end)
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local s = (...):gsub("..", function(h) return string.char(tonumber(h, 16)) end)
      local ok, e = pcall(mp.decode, s, {trusted = true})
      print(ok, e.kind, e.message:match("action") ~= nil)
    ]], hex)
    assert.equal(0, code, err)
    assert.equal("false\tDecodeError\ttrue\n", out)
  end)
end)

describe("synchronisation objects", function()
  it("travel as handles, keep identity, and reach other processes", function()
    local objs = {mp.Lock(), mp.RLock(), mp.Semaphore(3), mp.BoundedSemaphore(2),
                  mp.Event(), mp.Condition(), mp.Barrier(2)}
    local back = mp.decode(mp.encode(objs), {trusted = true})
    for i, o in ipairs(objs) do assert.is_true(back[i] == o) end
    objs[5]:set()
    local hex = mp.encode(objs):gsub(".", function(c)
      return string.format("%02x", c:byte())
    end)
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local s = (...):gsub("..", function(h) return string.char(tonumber(h, 16)) end)
      local o = mp.decode(s, {trusted = true})
      print(o[1]:acquire(false), o[3]:get_value(), o[5]:is_set())
      o[3]:acquire()
      o[6]:acquire(); o[6]:notify(); o[6]:release()
    ]], hex)
    assert.equal(0, code, err)
    assert.equal("true\t3\ttrue\n", out)
    assert.equal(2, objs[3]:get_value())
    -- the other process left holding the Lock: it is taken over
    assert.is_true(objs[1]:acquire(false))
  end)

  it("leave no fd or mapping after 10^4 create/destroy cycles", function()
    collectgarbage()
    local fds, arenas = our_fds(), core.arena_count()
    for i = 1, H.soak(10000) do
      local l = mp.Lock()
      l:acquire(); l:release()
      local c = mp.Condition(l)
      local e = mp.Event()
      e:set()
      if i % 2 == 0 then l:close(); c:close(); e:close() end
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, our_fds())
    assert.equal(arenas, core.arena_count())
  end)
end)

describe("internal locks held by a stopped process (issue 13 S5)", function()
  local function stopped(pid)
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then return false end
    local s = f:read("a")
    f:close()
    return s:match("%) (%a)") == "T"
  end

  -- sends SIGCONT after 6 s: without deadlines on internal locks, the
  -- timed calls below waited for it
  local function waker(pid)
    return start(function()
      H.sleep(6)
      os.execute("kill -CONT " .. pid .. " 2>/dev/null")
    end)
  end

  pit("Semaphore:acquire with a timeout returns in time", function()
    local s = mp.Semaphore(1)
    local p = start(function()
      core._stop_in_next_lock("SIGSTOP")
      s:with(function() end)   -- stops inside, holding the unit and the guard
    end)
    assert.is_truthy(H.eventually(function() return stopped(p.pid) end, 10))
    local w = waker(p.pid)
    local got, dt = timed(s.acquire, s, true, 0.5)
    assert.is_false(got)
    assert.is_true(dt < 3, "took " .. dt .. " s")
    assert.is_false(s:acquire(false))
    os.execute("kill -CONT " .. p.pid)
    p:join(10)
    assert.equal(0, p.exitcode)
    w:terminate(); w:join()
    assert.is_true(s:acquire(true, 5))
    s:release()
    assert.equal(1, s:get_value())
  end)

  pit("Condition:wait with a timeout returns in time", function()
    local c = mp.Condition()
    local p = start(function()
      c:acquire()
      -- the 2nd internal lock of wait(): after it let go of c's lock
      core._stop_in_next_lock("SIGSTOP", 2)
      c:wait(0.05)
      c:release()
    end)
    assert.is_truthy(H.eventually(function() return stopped(p.pid) end, 10))
    local w = waker(p.pid)
    assert.is_true(c:acquire(true, 5))
    local notified, dt = timed(c.wait, c, 0.2)
    assert.is_false(notified)
    assert.is_true(dt < 3, "took " .. dt .. " s")
    c:release()
    os.execute("kill -CONT " .. p.pid)
    p:join(10)
    assert.equal(0, p.exitcode)
    w:terminate(); w:join()
    -- still works: a notify reaches a waiter
    local q = mp.Queue()
    local r = start(function()
      c:acquire()
      q:put("waiting")
      q:put(c:wait(10))
      c:release()
    end)
    assert.equal("waiting", q:get(true, 10))
    c:acquire(); c:notify(); c:release()
    assert.is_true(q:get(true, 10))
    r:join(10)
  end)

  pit("Condition:wait leaves at its timeout while another waiter is stopped leaving", function()
    local c = mp.Condition()
    c:acquire()
    local p = start(function()
      c:acquire()   -- ours once the main process waits
      -- the 2nd internal lock of wait() is the one it takes to leave
      core._stop_in_next_lock("SIGSTOP", 2)
      c:wait(0.05)
      c:release()
    end)
    local w = waker(p.pid)
    local notified, dt = timed(c.wait, c, 1)
    assert.is_false(notified)
    assert.is_true(dt < 4, "took " .. dt .. " s")
    assert.is_true(stopped(p.pid))   -- it still holds the internal lock
    c:release()
    os.execute("kill -CONT " .. p.pid)
    p:join(10)
    assert.equal(0, p.exitcode)
    w:terminate(); w:join()
    -- the slot we left without the lock was settled: a notify reaches
    -- the next waiter
    local q = mp.Queue()
    local r = start(function()
      c:acquire()
      q:put("waiting")
      q:put(c:wait(10))
      c:release()
    end)
    assert.equal("waiting", q:get(true, 10))
    c:acquire(); c:notify(); c:release()
    assert.is_true(q:get(true, 10))
    r:join(10)
  end)

  pit("leaving Semaphore:with does not wait for a process stopped inside it", function()
    local s = mp.Semaphore(2)
    local p, w, t0
    s:with(function()
      p = start(function()
        core._stop_in_next_lock("SIGSTOP")
        s:with(function() end)   -- stops recording its unit
      end)
      assert.is_truthy(H.eventually(function() return stopped(p.pid) end, 10))
      w = waker(p.pid)
      t0 = core.now()
    end)   -- forgets our unit
    local dt = core.now() - t0
    assert.is_true(dt < 3, "took " .. dt .. " s")
    assert.equal(1, s:get_value())   -- ours is back, p holds one
    os.execute("kill -CONT " .. p.pid)
    p:join(10)
    assert.equal(0, p.exitcode)
    w:terminate(); w:join()
    assert.equal(2, s:get_value())
  end)

  pit("Barrier:wait with a timeout returns in time (entering)", function()
    local b = mp.Barrier(2)
    local p = start(function()
      core._stop_in_next_lock("SIGSTOP")
      local _ = b.n_waiting   -- stops holding the barrier's lock
    end)
    assert.is_truthy(H.eventually(function() return stopped(p.pid) end, 10))
    local w = waker(p.pid)
    local t0 = core.now()
    assert.equal("BrokenBarrierError", kind_of(b.wait, b, 0.2))
    local dt = core.now() - t0
    assert.is_true(dt < 3, "took " .. dt .. " s")
    os.execute("kill -CONT " .. p.pid)
    p:join(10)
    assert.equal(0, p.exitcode)
    w:terminate(); w:join()
    assert.is_true(b.broken)   -- as Python's: the timeout broke it
    b:reset()
    local r = start(function() b:wait(10) end)
    assert.is_truthy(b:wait(10))
    r:join(10)
    assert.equal(0, r.exitcode)
  end)

  pit("a party inside Barrier:wait leaves at its timeout", function()
    local b = mp.Barrier(3)
    local q = mp.Queue()
    local p = start(function()
      q:put("ready")
      while b.n_waiting ~= 1 do H.sleep(0.01) end
      core._stop_in_next_lock("SIGSTOP")
      local _ = b.n_waiting   -- stops holding the barrier's lock
    end)
    assert.equal("ready", q:get(true, 10))
    local w = waker(p.pid)
    local t0 = core.now()
    -- we are the waiting party
    assert.equal("BrokenBarrierError", kind_of(b.wait, b, 1))
    local dt = core.now() - t0
    assert.is_true(dt < 4, "took " .. dt .. " s")
    assert.is_true(stopped(p.pid))   -- it still holds the lock
    os.execute("kill -CONT " .. p.pid)
    p:join(10)
    assert.equal(0, p.exitcode)
    w:terminate(); w:join()
    -- what we left behind was settled by the next holder
    assert.is_true(b.broken)
    b:reset()
    assert.equal(0, b.n_waiting)
    local r1 = start(function() b:wait(10) end)
    local r2 = start(function() b:wait(10) end)
    assert.is_truthy(b:wait(10))
    r1:join(10); r2:join(10)
    assert.equal(0, r1.exitcode)
    assert.equal(0, r2.exitcode)
  end)
end)
