-- Pool faults, for real: workers killed (by us, by themselves, by a
-- signal, by os.exit) mid-task and mid-chunk, per-task timeouts, failing
-- initializers, maxtasksperchild, create/terminate cycles that must leave
-- nothing behind, and Ctrl-C in a script in the middle of a map.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local err_of, alive, range, worker_pids = H.err_of, H.alive, H.range, H.worker_pids

-- live children of this process (zombies included)
local function children()
  local out = H.sh("env -u LD_PRELOAD ps -o pid= --ppid " .. H.pid())
  local n = 0
  for _ in out:gmatch("%d+") do n = n + 1 end
  return n - 1    -- the ps itself (its shell execs it)
end

-- Drives an imap iterator to its end; returns the values by index and
-- the errors raised on the way.
local function drain(it)
  local got, errs = {}, {}
  while true do
    local ok, i, v = pcall(it)
    if not ok then errs[#errs + 1] = i
    elseif i == nil then break
    else got[i] = v == nil and "nil" or v end
  end
  return got, errs
end

describe("Pool worker loss", function()
  it("a worker SIGKILLed mid-task fails exactly its task; the rest completes", function()
    local pool <close> = mp.Pool(2)
    local q = mp.Queue()
    local victim = pool:apply_async(function()
      q:put(mp.current_process().pid)
      core.sleep(60)
      return "never"
    end)
    local others = {}
    for i = 1, 20 do
      others[i] = pool:apply_async(function(x) core.sleep(0.01) return x * 3 end, {i})
    end
    local m = pool:map_async(function(x) return x + 100 end, range(50))
    local pid = q:get(true, 10)
    assert.is_true(core.kill(pid, "SIGKILL"))
    local t0 = core.now()
    local err = err_of(victim.get, victim, 20)
    assert.is_true(core.now() - t0 < 10)
    assert.equal("WorkerLostError", err.kind)
    assert.matches("worker " .. pid .. " died %(signal 9%)", err.message)
    for i = 1, 20 do assert.equal(i * 3, others[i]:get(20)) end
    local r = m:get(20)
    for i = 1, 50 do assert.equal(i + 100, r[i]) end
    -- replaced: two workers, the dead one not among them; still serving
    assert.equal(2, #worker_pids(pool))
    for _, p in ipairs(worker_pids(pool)) do assert.are_not.equal(pid, p) end
    assert.equal(5050, (function()
      local s, t = 0, pool:map(function(x) return x end, range(100))
      for i = 1, 100 do s = s + t[i] end
      return s
    end)())
    assert.equal(0, H.zombies())
  end)

  -- a task that ends its own worker, each way a process can end
  local ways = {
    {"SIGKILL to itself", function() core.kill(mp.current_process().pid, "SIGKILL") core.sleep(5) end,
     "signal 9"},
    {"SIGSEGV to itself", function() core.kill(mp.current_process().pid, "SIGSEGV") core.sleep(5) end,
     -- (under make sanitize, ASan's handler turns the SIGSEGV into an abort)
     os.getenv("ASAN_OPTIONS") and "signal 6" or "signal 11"},
    {"SIGTERM to itself", function() core.kill(mp.current_process().pid, "SIGTERM") core.sleep(5) end,
     "signal 15"},
    {"os.exit(3)", function() os.exit(3) end, "exit code 3"},
    {"os.exit(true)", function() os.exit(true) end, "exit code 0"},
  }
  for _, w in ipairs(ways) do
    it("a task that dies by " .. w[1] .. " fails alone with WorkerLostError", function()
      local pool <close> = mp.Pool(2)
      local rs = {}
      for i = 1, 10 do
        rs[i] = pool:apply_async(function(x) core.sleep(0.01) return x end, {i})
      end
      local fatal = w[2]
      local bad = pool:apply_async(function() fatal() return "survived" end)
      for i = 11, 20 do
        rs[i] = pool:apply_async(function(x) core.sleep(0.01) return x end, {i})
      end
      local err = err_of(bad.get, bad, 20)
      assert.equal("WorkerLostError", err.kind)
      assert.matches(w[3], err.message, 1, true)
      for i = 1, 20 do assert.equal(i, rs[i]:get(20)) end
      assert.equal(42, pool:apply(function() return 42 end))
      assert.equal(2, #worker_pids(pool))
      assert.equal(0, H.zombies())
    end)
  end

  it("a worker lost mid-chunk fails exactly that chunk's items", function()
    local pool <close> = mp.Pool(2)
    local ran = mp.Value("i", 0)
    local function f(x)
      ran:add(1)
      if x == 8 then os.exit(7) end
      return x * 2
    end
    -- map: raises after every other chunk finished
    local err = err_of(pool.map, pool, f, range(20), 5)
    assert.equal("WorkerLostError", err.kind)
    assert.matches("exit code 7", err.message)
    -- items 1-8 and 11-20 ran; 9 and 10 (after 8 in its chunk) did not
    assert.equal(18, ran.value)
    -- imap: the chunk's five items are one error, all others arrive
    for _, unordered in ipairs {false, true} do
      ran.value = 0
      local it = unordered and pool:imap_unordered(f, range(20), 5) or pool:imap(f, range(20), 5)
      local got, errs = drain(it)
      assert.equal(1, #errs)
      assert.equal("WorkerLostError", errs[1].kind)
      local n = 0
      for i, v in pairs(got) do
        n = n + 1
        assert.equal(i * 2, v)
        assert.is_true(i <= 5 or i > 10)
      end
      assert.equal(15, n)
    end
    -- map_async: the error reaches the error callback
    local seen
    local r = pool:map_async(f, range(20), {chunksize = 5, error_callback = function(e) seen = e end})
    assert.is_true(r:wait(20))
    assert.is_false(r:successful())
    assert.equal("WorkerLostError", seen.kind)
    assert.same({2, 4, n = 2}, pool:map(function(x) return x * 2 end, {1, 2}))
    assert.equal(0, H.zombies())
  end)

  it("workers killed at random during a long map: only their tasks fail", function()
    local pool <close> = mp.Pool(3)
    local n, kills = 300, 0
    local it = pool:imap_unordered(function(x) core.sleep(0.003) return x end, range(n))
    local got, errs = {}, 0
    local count = 0
    while true do
      local ok, i, v = pcall(it)
      if not ok then
        assert.equal("WorkerLostError", i.kind)
        errs = errs + 1
      elseif i == nil then break
      else
        assert.equal(i, v)
        assert.is_nil(got[i])
        got[i] = true
        count = count + 1
        if count % 40 == 0 then
          local pids = worker_pids(pool)
          if core.kill(pids[count % #pids + 1], "SIGKILL") then kills = kills + 1 end
        end
      end
    end
    -- each kill failed at most the one task its worker held
    assert.is_true(kills >= 5)
    assert.is_true(errs <= kills, errs .. " errors for " .. kills .. " kills")
    assert.equal(n, count + errs)
    assert.equal(3, #worker_pids(pool))
    assert.equal(0, H.zombies())
  end)

  it("an idle worker killed is replaced and nothing fails", function()
    local pool <close> = mp.Pool(2)
    local before = worker_pids(pool)
    for _, pid in ipairs(before) do core.kill(pid, "SIGKILL") end
    local r = pool:map(function(x) return -x end, range(10))
    assert.equal(-10, r[10])
    -- (the map may finish on the first replacement before the pool has
    -- seen the second death: it does at one of its next calls)
    H.eventually(function()
      pool:poll()
      local now = worker_pids(pool)
      return #now == 2 and now[1] ~= before[1] and now[1] ~= before[2] and
             now[2] ~= before[1] and now[2] ~= before[2]
    end, 5)
    local after = worker_pids(pool)
    assert.equal(2, #after)
    for _, p in ipairs(after) do
      assert.are_not.equal(before[1], p)
      assert.are_not.equal(before[2], p)
    end
    assert.equal(0, H.zombies())
  end)

  it("join after close does not hang when a worker dies", function()
    local pool = mp.Pool(2)
    local q = mp.Queue()
    local slow = pool:apply_async(function() q:put(mp.current_process().pid) core.sleep(60) end)
    local quick = pool:map_async(function(x) return x end, range(10))
    local pid = q:get(true, 10)
    pool:close()
    core.kill(pid, "SIGKILL")
    local t0 = core.now()
    pool:join()
    assert.is_true(core.now() - t0 < 10)
    assert.equal("WorkerLostError", err_of(slow.get, slow, 0).kind)
    assert.equal(10, quick:get(0).n)
    assert.same({}, worker_pids(pool))
    assert.equal(0, H.zombies())
  end)
end)

describe("Pool per-task timeouts", function()
  it("apply_async{timeout}: the worker is killed, TimeoutError, a new worker serves", function()
    local pool <close> = mp.Pool(2)
    local before = worker_pids(pool)
    local t0 = core.now()
    local r = pool:apply_async(function() core.sleep(30) return "late" end, nil, {timeout = 0.3})
    local fine = pool:apply_async(function() core.sleep(0.05) return "on time" end, nil,
                                  {timeout = 5})
    local err = err_of(r.get, r, 20)
    local dt = core.now() - t0
    assert.equal("TimeoutError", err.kind)
    assert.matches("0.3 s timeout", err.message, 1, true)
    assert.is_true(dt >= 0.25 and dt < 3, dt)
    assert.equal("on time", fine:get(20))
    -- one worker was replaced
    local after = worker_pids(pool)
    assert.equal(2, #after)
    local same = 0
    for _, a in ipairs(after) do
      for _, b in ipairs(before) do if a == b then same = same + 1 end end
    end
    assert.equal(1, same)
    assert.equal(9, pool:apply(function() return 9 end))
    assert.equal(0, H.zombies())
  end)

  it("the timeout does not start while the task waits in the queue", function()
    local pool <close> = mp.Pool(1)
    local first = pool:apply_async(function() core.sleep(0.6) return 1 end)
    local second = pool:apply_async(function() core.sleep(0.1) return 2 end, nil, {timeout = 0.4})
    assert.equal(1, first:get(20))
    assert.equal(2, second:get(20))
  end)

  it("map{timeout}: only the overdue item fails, the timeout is per item", function()
    local pool <close> = mp.Pool(2)
    local ran = mp.Value("i", 0)
    local t0 = core.now()
    local err = err_of(pool.map, pool, function(x)
      if x == 3 then core.sleep(30) end
      core.sleep(0.02)
      ran:add(1)
      return x
    end, range(10), {timeout = 0.4})
    assert.equal("TimeoutError", err.kind)
    assert.is_true(core.now() - t0 < 5)
    assert.equal(9, ran.value)
    -- items of a chunk each get the full timeout
    local r = pool:map(function(x) core.sleep(0.15) return x end, range(6),
                       {timeout = 0.4, chunksize = 3})
    assert.same({1, 2, 3, 4, 5, 6, n = 6}, r)
    -- imap with a timeout
    local got, errs = drain(pool:imap(function(x)
      if x == 2 then core.sleep(30) end
      return x
    end, range(4), {timeout = 0.3}))
    assert.same({1, nil, 3, 4}, {got[1], got[2], got[3], got[4]})
    assert.equal(1, #errs)
    assert.equal("TimeoutError", errs[1].kind)
    assert.equal(0, H.zombies())
  end)

  it("get(timeout) is not a task timeout: the task goes on", function()
    local pool <close> = mp.Pool(1)
    local r = pool:apply_async(function() core.sleep(0.4) return "done" end)
    assert.equal("TimeoutError", err_of(r.get, r, 0.05).kind)
    assert.equal("done", r:get(20))
  end)
end)

describe("Pool initializer and maxtasksperchild", function()
  it("an initializer that raises breaks the pool: BrokenPoolError, no hang", function()
    local pool = mp.Pool{processes = 2, initializer = function(why) error("init " .. why) end,
                         initargs = {"boom"}}
    local t0 = core.now()
    local err = err_of(pool.apply, pool, function() return 1 end)
    assert.equal("BrokenPoolError", err.kind)
    assert.matches("init boom", err.message)
    assert.is_true(core.now() - t0 < 10)
    err = err_of(pool.map, pool, print, {1, 2})
    assert.equal("BrokenPoolError", err.kind)
    pool:terminate()
    pool:join()
    assert.equal(0, H.zombies())
  end)

  it("an initializer that exits the worker breaks the pool, no hang", function()
    local pool = mp.Pool{processes = 2, initializer = function() os.exit(5) end}
    local t0 = core.now()
    local err = err_of(pool.apply, pool, function() return 1 end, nil)
    assert.is_true(core.now() - t0 < 10)
    assert.equal("BrokenPoolError", err.kind)
    assert.matches("exit code 5", err.message)
    pool:terminate()
    assert.equal(0, H.zombies())
  end)

  it("an initializer failing in a recycled worker is reported, no hang", function()
    local starts = mp.Value("i", 0)
    local pool = mp.Pool{processes = 1, maxtasksperchild = 1, initializer = function()
      if starts:add(1) > 2 then error("third start refused") end
    end}
    local rs = {}
    for i = 1, 5 do rs[i] = pool:apply_async(function(x) return x end, {i}) end
    assert.equal(1, rs[1]:get(20))
    assert.equal(2, rs[2]:get(20))
    local err = err_of(rs[3].get, rs[3], 20)
    assert.equal("BrokenPoolError", err.kind)
    assert.matches("third start refused", err.message)
    for i = 4, 5 do assert.equal("BrokenPoolError", err_of(rs[i].get, rs[i], 20).kind) end
    pool:terminate()
    assert.equal(0, H.zombies())
  end)

  it("maxtasksperchild recycles workers; every task completes", function()
    local pool <close> = mp.Pool{processes = 2, maxtasksperchild = 2}
    local pids = pool:map(function() return mp.current_process().pid end, range(40), 1)
    assert.equal(40, pids.n)
    local distinct, per = 0, {}
    for i = 1, 40 do
      if not per[pids[i]] then distinct = distinct + 1 end
      per[pids[i]] = (per[pids[i]] or 0) + 1
    end
    assert.is_true(distinct >= 20, distinct)
    for _, n in pairs(per) do assert.is_true(n <= 2) end
    local rs = {}
    for i = 1, 30 do rs[i] = pool:apply_async(function(x) return x * x end, {i}) end
    for i = 1, 30 do assert.equal(i * i, rs[i]:get(20)) end
    assert.equal(2, #worker_pids(pool))
    -- chunks count as one task each
    local r = pool:map(function(x) return x end, range(100), 10)
    assert.equal(100, r.n)
    -- recycled workers are reaped by the pool's next call (or poll)
    assert.is_true(H.eventually(function() pool:poll() return H.zombies() == 0 end, 5))
  end)
end)

describe("Pool leaks", function()
  it("10^3 create/terminate cycles leave no process, fd or /dev/shm entry", function()
    -- warm up: the runtime makes some process-wide state on first use
    -- (the wake-up pipe of waits on queues: made by the first wait that
    -- sleeps, so a task that makes the owner wait -- a quick map may
    -- find its results there, and the pipe came mid-test: 9 fds, then 11)
    local warm = mp.Pool(1)
    warm:map(function(x) return x end, {1, 2})
    warm:apply(function() require("multiprocessing.core").sleep(0.3) end)
    warm:terminate()
    collectgarbage()
    local fds, shm = H.fd_count(), H.shm_entries()
    for i = 1, H.soak(1000) do
      local pool = mp.Pool(2)
      if i % 100 == 0 then
        assert.equal(i, pool:apply(function(x) return x end, {i}))
      end
      pool:terminate()
    end
    collectgarbage()
    collectgarbage()
    assert.equal(fds, H.fd_count())
    assert.equal(shm, H.shm_entries())
    assert.equal(0, H.zombies())
    assert.equal(0, children())
  end)

  it("close/join cycles with work leave nothing either", function()
    collectgarbage()
    collectgarbage()
    local fds, shm = H.fd_count(), H.shm_entries()
    for i = 1, H.soak(100) do
      local pool = mp.Pool(2)
      local r = pool:map(function(x) return x + i end, range(10))
      assert.equal(10 + i, r[10])
      pool:close()
      pool:join()
    end
    collectgarbage()
    collectgarbage()
    assert.equal(fds, H.fd_count())
    assert.equal(shm, H.shm_entries())
    assert.equal(0, H.zombies())
    assert.equal(0, children())
  end)
end)

describe("Pool and signals to the owner", function()
  -- lua.c's and luamp's SIGINT handler sets a hook on the main thread that
  -- raises "interrupted!" at the next instruction; the same hook set with
  -- a random count lands that error at random instruction boundaries,
  -- many times, reproducibly.
  it("Ctrl-C at any instruction of a get loses no result and breaks nothing", function()
    local pool <close> = mp.Pool(2)
    math.randomseed(7)
    local interrupts = 0
    for round = 1, 40 do
      local rs = {}
      for i = 1, 20 do rs[i] = pool:apply_async(function(x) return x end, {i}) end
      for i = 1, 20 do
        while true do
          local ok, v = pcall(function()
            H.arm_interrupt(2000)
            local v = rs[i]:get(5)
            debug.sethook()
            return v
          end)
          debug.sethook()
          if ok then
            assert.equal(i, v)
            break
          end
          -- an interrupted get is asked again; a lost result would be a
          -- TimeoutError here
          assert.equal("interrupted!", v, round .. ":" .. i)
          interrupts = interrupts + 1
        end
      end
    end
    assert.is_true(interrupts > 10, "only " .. interrupts .. " interrupts")
    assert.equal(2, #worker_pids(pool))
    assert.same({1, 4, 9, n = 3}, pool:map(function(x) return x * x end, {1, 2, 3}))
  end)

  -- A luamp script in a long map; returns its stderr, exit status and the
  -- pids of its workers (written by the script before the map).
  local function run_and_signal(sig, group)
    local pidfile = os.tmpname()
    local script = H.write(os.tmpname() .. ".lua", [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool = mp.Pool(2)
      local f = io.open(arg[1], "w")
      for _, w in pairs(pool._workers) do f:write(w.pid, "\n") end
      f:write(mp.current_process().pid, "\n")
      f:close()
      local t = {}
      for i = 1, 2000 do t[i] = i end
      pool:map(function(x) core.sleep(0.05) return x end, t, 1)
      print("map finished")
    ]])
    os.remove(pidfile)
    -- setsid: its own process group, as a terminal would make it
    local cmd = string.format(
      "setsid %s %s %s & p=$!; for i in $(seq 100); do [ -s %s ] && break; sleep 0.05; done; " ..
      "sleep 0.3; m=$(tail -1 %s); kill -%s %s$m; wait $p; echo status=$?",
      H.q(H.luamp), H.q(script), H.q(pidfile), H.q(pidfile), H.q(pidfile), sig,
      group and "-" or "")
    local out, err = H.sh(cmd)
    local pids = {}
    for l in io.lines(pidfile) do pids[#pids + 1] = tonumber(l) end
    os.remove(pidfile)
    os.remove(script)
    return out, err, tonumber(out:match("status=(%d+)")), pids
  end

  it("Ctrl-C (SIGINT to the script) ends the map with 'interrupted!'; no worker is left", function()
    local out, err, status, pids = run_and_signal("INT")
    assert.equal(3, #pids)
    assert.is_nil(out:match("map finished"))
    assert.matches("interrupted!", err)
    assert.are_not.equal(0, status)
    for i = 1, 2 do
      assert.is_true(H.eventually(function() return not alive(pids[i]) end, 5),
                     "worker " .. pids[i] .. " still runs")
    end
  end)

  it("Ctrl-C at a terminal (SIGINT to the whole process group) too", function()
    local out, err, status, pids = run_and_signal("INT", true)
    assert.is_nil(out:match("map finished"))
    assert.matches("interrupted!", err)
    assert.are_not.equal(0, status)
    for i = 1, 2 do
      assert.is_true(H.eventually(function() return not alive(pids[i]) end, 5),
                     "worker " .. pids[i] .. " still runs")
    end
  end)

  it("Ctrl-C caught by the script cancels the map: its work stops, the pool goes on", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool = mp.Pool(2)
      local ran = mp.Value("q", 0)
      local me = mp.current_process().pid
      local before = {}
      for _, w in pairs(pool._workers) do before[w.pid] = true end
      mp.Process{target = function() core.sleep(0.4) core.kill(me, "SIGINT") end}:start()
      local t = {}
      for i = 1, 200 do t[i] = i end
      -- chunks of 10 items of 0.05 s: a worker is mid-chunk at the signal
      local ok, e = pcall(pool.map, pool, function(x)
        core.sleep(0.05) ran:add(1) return x end, t, 10)
      print("map", ok, e)
      local n = ran.value
      core.sleep(0.5)
      print("ran after", n < 200, ran.value - n)
      print("again", table.concat(pool:map(function(x) return x * x end, {1, 2, 3}), ","))
      local live, replaced = 0, 0
      for _, w in pairs(pool._workers) do
        live = live + 1
        if not before[w.pid] then replaced = replaced + 1 end
      end
      print("workers", live, replaced)
      for pid in pairs(before) do
        if not pool._workers[pid] then
          local f = io.open("/proc/" .. pid .. "/stat")
          print("old worker", f and f:read("a"):match("^%d+ %b() (%a)") or "reaped")
          if f then f:close() end
        end
      end
      pool:terminate()
    ]])
    assert.equal(0, code, err)
    assert.matches("^map\tfalse\tinterrupted!\n", out)
    -- nothing of the cancelled map ran once the call was interrupted
    assert.matches("\nran after\ttrue\t0\n", out)
    assert.matches("\nagain\t1,4,9\n", out)
    -- the workers that were mid-chunk were killed, reaped and replaced
    local live, replaced = out:match("\nworkers\t(%d+)\t(%d+)\n")
    assert.equal("2", live)
    assert.is_true(tonumber(replaced) >= 1, out)
    for state in out:gmatch("old worker\t(%S+)") do assert.equal("reaped", state) end
  end)

  it("workers do not outlive an owner that was SIGKILLed", function()
    local _, _, _, pids = run_and_signal("KILL")
    for i = 1, 2 do
      assert.is_true(H.eventually(function() return not alive(pids[i]) end, 5),
                     "worker " .. pids[i] .. " still runs")
    end
  end)
end)

-- issue 13 item 17
describe("Pool collected while running", function()
  it("warns once on stderr (as Python's ResourceWarning) and its workers end", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local function forget()
        local pool = mp.Pool(2)
        pool:apply(function() end)
        local pids = {}
        for _, w in pairs(pool._workers) do pids[#pids + 1] = w.pid end
        return pids
      end
      local pids = forget()
      for _, pid in ipairs(forget()) do pids[#pids + 1] = pid end
      collectgarbage() collectgarbage()
      io.stderr:write("collected\n")
      -- (workers whose handles were finalized first are sent SIGKILL:
      -- they end a moment later)
      local gone, t0 = 0, mp.now()
      repeat
        gone = 0
        for _, pid in ipairs(pids) do
          local f = io.open("/proc/" .. pid .. "/stat")
          local s = f and f:read("a") or ""
          if f then f:close() end
          if s == "" or s:match("^%d+ %b() (%a)") == "Z" then gone = gone + 1 end
        end
      until gone == #pids or mp.now() - t0 > 10
      print(#pids, gone)
      -- a closed (or terminated) pool is not warned about
      local p = mp.Pool(1) p:close() p = nil
      collectgarbage() collectgarbage()
    ]])
    assert.equal(0, code, err)
    assert.equal("4\t4\n", out)
    local _, n = err:gsub("ResourceWarning: unclosed running multiprocessing pool", "")
    assert.equal(1, n, err)
    assert.matches("^ResourceWarning: unclosed running multiprocessing pool <Pool " ..
                   "state=RUN pool_size=2> collected; its workers are terminated now", err)
    assert.matches("collected\n$", err)
  end)
end)
