-- bench_table.lua [--build DIR] [FILTER]: make bench (FILTER: words
-- separated by "|", see selected).  Runs the raw C probes,
-- scripts/bench.lua under luamp and scripts/bench.py under Debian's
-- /usr/bin/python3, all in this one run, and prints tables: workload,
-- luamp, the references, ratios and the issue's target.
--
-- Two states of the machine (issue 18): "quiet" (as found) and "loaded"
-- (a bench_probes burn process keeps one core busy for the whole pass,
-- as a user's busy box does; the rows with a target only); one table
-- each.  BENCH_LOAD=0: the quiet
-- table only; BENCH_LOAD=1: the loaded one only; unset: both.
-- BENCH=rows | curves | all (default): the comparison rows, the scale
-- curves (quiet state only: workers, queued items, message size, live
-- processes), or both.
local cjson = require "cjson"

local build, filter = "build", nil
do
  local i = 1
  while arg[i] do
    if arg[i] == "--build" then build = arg[i + 1]; i = i + 1
    else filter = arg[i] end
    i = i + 1
  end
end
local PY = "/usr/bin/python3"
local luamp = build .. "/luamp"
local probes = build .. "/bench_probes"

-- The machines are shared and noisy, and noise only ever slows a run
-- down: every measurement is taken REPEAT times (BENCH_REPEAT, default
-- 3), luamp's and CPython's run of a workload back to back each time, and
-- the best rate of each side is kept.
local REPEAT = tonumber(os.getenv("BENCH_REPEAT") or "") or 3
local LOAD = os.getenv("BENCH_LOAD")
local WHAT = os.getenv("BENCH") or "all"
if WHAT ~= "rows" and WHAT ~= "curves" and WHAT ~= "all" then
  io.stderr:write("bench_table: BENCH must be rows, curves or all\n")
  os.exit(2)
end
local results = {}  -- "side:name" -> best record (of the current pass)

local LOWER = {KiB = true, ["B/item"] = true, ["KiB/proc"] = true}

local function collect(side, cmd)
  local p = assert(io.popen(cmd .. " 2>/dev/null"))
  for line in p:lines() do
    local ok, rec = pcall(cjson.decode, line)
    if ok and type(rec) == "table" and rec.name then
      local key = side .. ":" .. rec.name
      local best = results[key]
      -- (memory rows: lower is better)
      local lower = LOWER[rec.unit]
      if not best or (lower and rec.rate < best.rate) or
         (not lower and rec.rate > best.rate) then
        results[key] = rec
      end
    end
  end
  p:close()
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function names(cmd)
  local list, p = {}, assert(io.popen(cmd .. " --list 2>/dev/null"))
  for line in p:lines() do list[#list + 1] = line end
  p:close()
  return list
end
local lnames = names(luamp .. " scripts/bench.lua")
local pynames = {}
for _, n in ipairs(names(PY .. " scripts/bench.py")) do pynames[n] = true end

-- The footprint of a luamp parent in the start+join row (a state that
-- loaded the module): its private dirty KiB and its mappings, for the
-- row's floor (bench_probes fork_mem: a C fork from a process of that
-- footprint whose child only exits).  What a start+join costs above that
-- floor is luamp's: the pages parent and child write around the fork
-- (each a copy-on-write fault) and the work between fork and join.
local FOOT_KIB, FOOT_VMAS = 256, 36
do
  local p = io.popen(luamp .. " -e " .. q("require 'multiprocessing' " ..
    "local kib, n = 0, 0 " ..
    "for l in io.lines('/proc/self/smaps_rollup') do " ..
    "kib = kib + (tonumber(l:match('^Private_Dirty:%s*(%d+)')) or 0) end " ..
    "for _ in io.lines('/proc/self/maps') do n = n + 1 end " ..
    "print(kib, n)") .. " 2>/dev/null")
  local kib, n = p:read("n", "n")
  p:close()
  if kib and n then FOOT_KIB, FOOT_VMAS = math.tointeger(kib), math.tointeger(n) end
end

-- The raw C probe a workload is compared with runs right before it, so
-- that both see the machine in the same state.
local PROBE = {
  ["process.start_join"] = {"fork 3000", "fork_pidfd 3000",
    string.format("fork_mem %d %d 0 3000", FOOT_KIB, FOOT_VMAS),
    string.format("fork_mem %d %d 20 3000", FOOT_KIB, FOOT_VMAS)},
  ["pipe.pingpong"] = {"pipes 200000", "pingpong 200000"},
  ["pipe.stream_1mib"] = {"pipestream 2048", "stream 2048"},
  ["futures.submit_result_rtt"] = {"futex 100000", "futex_poll 100000"},
  ["pool.cpu_speedup_2w"] = "speedup",
}

-- FILTER: words separated by "|"; a workload is run when its name
-- contains one of them
local function selected(name)
  if not filter then return true end
  for word in filter:gmatch("[^|]+") do
    if name:find(word, 1, true) then return true end
  end
  return false
end

local function is_curve(name)
  return name:find("^curve%.") or name:find("^pool%.scale_")
end

-- One pass: every selected workload REPEAT times (curves only when asked;
-- only the names in the set `only` when given).
local function pass(curves, only)
  for _ = 1, REPEAT do
    if not curves and not only and selected("startup") then
      -- start-up of the three interpreters
      collect("luamp", probes .. " spawn startup 200 " .. luamp .. " -e ''")
      collect("lua5.4", probes .. " spawn startup 200 lua5.4 -e ''")
      collect("py", probes .. " spawn startup 50 " .. PY .. " -c ''")
      collect("luamp", probes .. " spawn startup_require 200 " .. luamp ..
        " -e " .. q("require 'multiprocessing'"))
      collect("py", probes .. " spawn startup_require 50 " .. PY ..
        " -c " .. q("import multiprocessing"))
    end
    -- the workloads, luamp's and CPython's of each back to back
    for _, name in ipairs(lnames) do
      if selected(name) and (not only or only[name]) and
         (not is_curve(name)) == not curves then
        local probe = PROBE[name]
        for _, cmd in ipairs(type(probe) == "table" and probe or {probe}) do
          collect("c", probes .. " " .. cmd)
        end
        collect("luamp", luamp .. " scripts/bench.lua " .. q("=" .. name))
        if pynames[name] then
          collect("py", PY .. " scripts/bench.py " .. q("=" .. name))
        end
      end
    end
  end
  -- the broker workloads (issue 16) once per pass, quiet and loaded (their
  -- targets hold in both): each run starts its own redis-server and
  -- workers, and Celery's and RQ's are slow
  if not curves and selected("broker") and (not only or only["broker.apply_async"]) then
    collect("luamp", "LUAMP_BUILD=" .. q(build) .. " " .. luamp .. " scripts/bench_broker.lua")
    collect("py", PY .. " scripts/bench_broker.py")
  end
end

-- A burn process on one core for the length of f(); killed by its pid.
local function loaded(f)
  -- (without the probe there is no burner, and the "loaded" table would
  -- be a second quiet one)
  local probe = io.open(probes)
  assert(probe, probes .. " is missing: make bench builds it")
  probe:close()
  -- (the burner also ends with this process: $PPID of popen's shell)
  local p = assert(io.popen(probes .. " burn 3600 $PPID >/dev/null 2>&1 & echo $!"))
  local pid = assert(math.tointeger(tonumber(p:read("l"))), "burn: no pid")
  p:close()
  local ok, err = pcall(f)
  os.execute("kill " .. pid .. " 2>/dev/null")
  if not ok then error(err, 0) end
end

-- {workload, luamp key, {reference label, side:key}..., target}; the
-- targets are issue 18's (round 2), met in both states
-- target = {ref index, minimum ratio}
local rows = {
  {"start-up (-e '')", "luamp:startup",
   {"CPython", "py:startup"}, {"lua5.4", "lua5.4:startup"}},
  {"start-up + require", "luamp:startup_require",
   {"CPython", "py:startup_require"}, {"lua5.4", "lua5.4:startup"}},
  {"require in a running state", "luamp:require", {"CPython", "py:require"}},
}
-- process and pipe rows (issue 4): against the raw C probes of this run
rows[#rows + 1] = {"process start+join", "luamp:process.start_join",
  {"C fork", "c:c.fork_exit_wait"}, {"CPython", "py:process.start_join"},
  target = {1, 0.6}}
-- start methods (issue 17): start+join from a 500 MiB heap, forkserver
-- against fork (target: 10x faster)
rows[#rows + 1] = {"start+join from a 500 MiB heap, forkserver",
  "luamp:process.start_join_500mib.forkserver",
  {"fork", "luamp:process.start_join_500mib.fork"}, target = {1, 10}}
-- ping-pong: against two raw C pipes (issue 18's floor), the raw C
-- socketpair beside it
rows[#rows + 1] = {"pipe ping-pong (small values)", "luamp:pipe.pingpong",
  {"C 2 pipes", "c:c.pipe_pingpong"}, {"CPython", "py:pipe.pingpong"},
  target = {1, 0.8}}
rows[#rows + 1] = {"pipe ping-pong, vs a socketpair", "luamp:pipe.pingpong",
  {"C socketpair", "c:c.socketpair_pingpong"}}
-- stream: against a raw C pipe grown to 1 MiB, the transport a duplex
-- Pipe uses since d11cd19 (best of REPEAT: the probe varies a lot on a
-- loaded machine), the raw C socketpair beside it
rows[#rows + 1] = {"pipe stream, 1 MiB send_bytes", "luamp:pipe.stream_1mib",
  {"C pipe", "c:c.pipe_stream"}, {"CPython", "py:pipe.stream_1mib"},
  target = {1, 0.8}}
rows[#rows + 1] = {"pipe stream, vs a socketpair", "luamp:pipe.stream_1mib",
  {"C socketpair", "c:c.socketpair_stream"}}
-- codec rows: luamp against lua-cjson (same run, same values) and CPython's
-- msgpack C extension
for _, v in ipairs {"record", "floats1e6", "ints1e6", "map1e5", "deep200"} do
  for _, dir in ipairs {"encode", "decode"} do
    local k = "codec." .. v .. "." .. dir
    rows[#rows + 1] = {"codec " .. v .. " " .. dir, "luamp:" .. k,
      {"cjson", "luamp:cjson." .. v .. "." .. dir}, {"py-msgpack", "py:" .. k},
      target = v == "record" and dir == "encode" and {1, 4} or nil}
  end
end
rows[#rows + 1] = {"codec floats1e6 decode", "luamp:codec.floats1e6.bytes.decode",
  target = {abs = 200}}
rows[#rows + 1] = {"codec ints1e6 decode", "luamp:codec.ints1e6.bytes.decode",
  target = {abs = 200}}
rows[#rows + 1] = {"codec record encode, identity tracking off",
  "luamp:codec.record.untracked.encode",
  {"tracked", "luamp:codec.record.encode"}}

-- manager rows (issue 7): 2*10^4 operations from child processes against
-- CPython's Manager; the round trip (dict get) against the raw C
-- socketpair ping-pong of this run.  CPython's increment is Lock + get +
-- set + release.
rows[#rows + 1] = {"manager dict set (child, 2e4)", "luamp:manager.dict_set",
  {"CPython", "py:manager.dict_set"}, target = {1, 3}}
rows[#rows + 1] = {"manager dict set inside an mp.Lock (child, 2e4)",
  "luamp:manager.dict_set_locked", {"CPython", "py:manager.dict_set_locked"}}
rows[#rows + 1] = {"manager dict get (round trips)", "luamp:manager.dict_get",
  {"CPython", "py:manager.dict_get"}, {"C socketpair", "c:c.socketpair_pingpong"},
  target = {1, 2}}
rows[#rows + 1] = {"manager list append (child)", "luamp:manager.list_append",
  {"CPython", "py:manager.list_append"}}
rows[#rows + 1] = {"manager atomic increment, 2 procs", "luamp:manager.apply_2procs",
  {"CPython (lock+get+set)", "py:manager.apply_2procs"}}
-- pool rows (issue 6)
rows[#rows + 1] = {"pool map 2e5, default chunks", "luamp:pool.map_default",
  {"CPython", "py:pool.map_default"}, target = {1, 3}}
rows[#rows + 1] = {"pool map 2e4, chunksize 1", "luamp:pool.map_chunksize1",
  {"CPython", "py:pool.map_chunksize1"}, target = {1, 10}}
rows[#rows + 1] = {"pool 2e4 apply_async", "luamp:pool.apply_async",
  {"CPython", "py:pool.apply_async"}, target = {1, 15}}
-- (its floor: two C processes taking the same tasks, in the same state
-- of the machine -- with one core burned, about 2/3 of a core each)
rows[#rows + 1] = {"pool CPU speed-up, 2 workers", "luamp:pool.cpu_speedup_2w",
  {"CPython", "py:pool.cpu_speedup_2w"}, {"C 2 procs", "c:c.cpu_speedup_2p"},
  target = {abs = 1.9}}
rows[#rows + 1] = {"pool idle worker USS", "luamp:pool.idle_worker_uss",
  {"CPython", "py:pool.idle_worker_uss"}, target = {max = 819.2}}
-- futures rows (issue 15)
rows[#rows + 1] = {"futures submit->result round trip", "luamp:futures.submit_result_rtt",
  {"CPython", "py:futures.submit_result_rtt"},
  {"C futex+poll", "c:c.futex_poll_pingpong"}, target = {1, 10}}
rows[#rows + 1] = {"futures 2e4 submits, then results", "luamp:futures.submit_2e4",
  {"CPython", "py:futures.submit_2e4"}, target = {1, 10}}
-- broker rows (issue 16): one local redis-server, 2 workers on each side
rows[#rows + 1] = {"broker 2e4 apply_async, 2 workers", "luamp:broker.apply_async",
  {"Celery", "py:celery.apply_async"}, {"RQ", "py:rq.apply_async"}, target = {1, 10}}
rows[#rows + 1] = {"broker map 1e6, default chunks", "luamp:broker.map_1e6",
  target = {abs = 1e5}}
rows[#rows + 1] = {"broker apply round trip", "luamp:broker.apply_rtt",
  {"Celery", "py:celery.apply_rtt"}}
-- queues, locks, shared values (issue 5)
for _, r in ipairs {
  {"queue small ints 1->1", "queue.ints_1to1", 20},
  {"queue small table 1->1", "queue.table_1to1", 5},
  {"queue ints 4 producers->1", "queue.ints_4to1"},
  {"queue 1 MiB items 1->1", "queue.1mib_1to1"},
  {"Value += 1 under lock, 2 procs", "value.locked_add_2procs", 5},
  {"Lock acquire+release, uncontended", "lock.pairs_uncontended"},
  {"empty queues per MiB of memory", "queue.empty_memory"},
} do
  rows[#rows + 1] = {r[1], "luamp:" .. r[2], {"CPython", "py:" .. r[2]},
    target = r[3] and {1, r[3]} or nil}
end

local function fmt(v)
  if not v then return "-" end
  if v >= 1e6 then return string.format("%.2fM", v / 1e6) end
  if v >= 1e4 then return string.format("%.1fk", v / 1e3) end
  if v >= 100 then return string.format("%.0f", v) end
  return string.format("%.2f", v)
end

local function print_rows(title)
  io.write("\n", title, "\n\n")
  io.write(string.format("%-34s %-14s %10s  %-26s %-26s %s\n", "workload", "unit",
    "luamp", "reference 1 (ratio)", "reference 2 (ratio)", "target"))
  io.write(string.rep("-", 124), "\n")
  for _, row in ipairs(rows) do
    local me = results[row[2]]
    local cells = {}
    for i = 3, 4 do
      local ref = row[i]
      if type(ref) == "table" and ref[2] then
        local r = results[ref[2]]
        cells[#cells + 1] = r and me and string.format("%s %s (%.2fx)", ref[1],
          fmt(r.rate), me.rate / r.rate) or (ref[1] .. " -")
      else
        cells[#cells + 1] = ""
      end
    end
    local target = ""
    if row.target and row.target.max then
      target = string.format("≤ %g %s: %s", row.target.max, me and me.unit or "",
        me and (me.rate <= row.target.max and "met" or "MISSED") or "n/a")
    elseif row.target and row.target.abs then
      target = string.format("≥ %g %s: %s", row.target.abs, me and me.unit or "",
        me and (me.rate >= row.target.abs and "met" or "MISSED") or "n/a")
    elseif row.target then
      local ref = results[row[2 + row.target[1]][2]]
      local ratio = me and ref and me.rate / ref.rate
      target = string.format("%s %.2fx vs %s: %s", "≥", row.target[2],
        row[2 + row.target[1]][1],
        ratio and (ratio >= row.target[2] and "met" or "MISSED") or "n/a")
    end
    if not filter or (me and row[1]:find(filter, 1, true)) or me then
      io.write(string.format("%-34s %-14s %10s  %-26s %-26s %s\n", row[1],
        me and me.unit or "-", me and fmt(me.rate) or "-", cells[1], cells[2],
        target))
    end
  end
  io.write("\nraw C: fork+exit+wait ", fmt(results["c:c.fork_exit_wait"] and
    results["c:c.fork_exit_wait"].rate), " procs/s, ping-pong over two pipes ",
    fmt(results["c:c.pipe_pingpong"] and results["c:c.pipe_pingpong"].rate),
    " round trips/s, over a socketpair ",
    fmt(results["c:c.socketpair_pingpong"] and results["c:c.socketpair_pingpong"].rate),
    " round trips/s; stream over a pipe ",
    fmt(results["c:c.pipe_stream"] and results["c:c.pipe_stream"].rate),
    ", over a socketpair ",
    fmt(results["c:c.socketpair_stream"] and results["c:c.socketpair_stream"].rate),
    " MiB/s\n")
  io.write("raw C fork with luamp's join (pidfd_open, poll, waitpid) ",
    fmt(results["c:c.fork_pidfd_wait"] and results["c:c.fork_pidfd_wait"].rate),
    " procs/s\n")
  do  -- the start+join row's floor (see FOOT_KIB)
    local me, floor = results["luamp:process.start_join"], results["c:c.fork_mem"]
    local w20 = results["c:c.fork_mem_writes"]
    io.write(string.format("start+join floor: raw C fork from luamp's footprint " ..
      "(%d KiB private dirty, %d mappings) %s procs/s%s; the same with 20 pages " ..
      "written by parent and child each after the fork %s procs/s " ..
      "(what a start+join costs above the floor is the pages it writes)\n",
      FOOT_KIB, FOOT_VMAS, fmt(floor and floor.rate),
      (me and floor) and string.format(" (luamp %.2fx of it)", me.rate / floor.rate) or "",
      fmt(w20 and w20.rate)))
  end
  io.write("raw C futex ping-pong (one wake-up each way, no spin) ",
    fmt(results["c:c.futex_pingpong"] and results["c:c.futex_pingpong"].rate),
    " round trips/s; with a Pool's hand-off (the worker polls 10 us ",
    "before it sleeps, a side is woken only when it sleeps) ",
    fmt(results["c:c.futex_poll_pingpong"] and results["c:c.futex_poll_pingpong"].rate),
    " round trips/s\n")
end

-- The scale curves: each point with its change from the point before
-- (for a rate: x more work per second; for memory: bytes per unit), and
-- "not linear" where the cost per unit grew by more than half.
local CURVES = {
  {"pool map 1e5 tasks, workers", "pool.scale_", {1, 2, 4, 8, 16, 32, 64}},
  {"queued small ints on one Queue", "curve.queue_items.", {1000, 10000, 100000, 1000000}},
  {"Pipe send_bytes, message KiB", "curve.msg_kib.", {1, 16, 256, 4096, 65536, 262144, 1048576}},
  {"... recv_bytes_into a SharedMemory", "curve.msg_into_kib.", {1, 16, 256, 4096, 65536, 262144, 1048576}},
  {"live processes (each on an Event)", "curve.live_procs.", {10, 100, 1000}},
}
local function print_curves()
  io.write("\nscale curves (quiet state)\n\n")
  io.write(string.format("%-36s %10s %12s %-12s %14s  %s\n", "curve", "x",
    "luamp", "unit", "CPython", "note"))
  io.write(string.rep("-", 100), "\n")
  for _, c in ipairs(CURVES) do
    local prev
    for _, x in ipairs(c[3]) do
      local me = results["luamp:" .. c[2] .. x]
      local py = results["py:" .. c[2] .. x]
      if me then
        local note = ""
        if prev then
          -- cost per unit: 1/rate for throughput, the value for memory
          local lower = LOWER[me.unit]
          local cost, pcost = lower and me.rate or 1 / me.rate,
                              lower and prev.rate or 1 / prev.rate
          if cost > 1.5 * pcost then
            note = string.format("not linear: cost per unit x%.1f", cost / pcost)
          end
        end
        io.write(string.format("%-36s %10s %12s %-12s %14s  %s\n", c[1], string.format("%d", x),
          fmt(me.rate), me.unit, py and fmt(py.rate) or "", note))
        prev = me
      end
    end
  end
end

local all = {}
local function keep(state)
  for k, v in pairs(results) do all[state .. ":" .. k] = v end
  results = {}
end
if WHAT ~= "curves" then
  if LOAD ~= "1" then
    pass(false)
    print_rows("quiet state (the machine as found)")
    keep("quiet")
  end
  if LOAD ~= "0" then
    -- (the rows with a target and their references only: the loaded
    -- state checks the targets, and make bench stays under ~15 minutes)
    local targeted = {}
    for _, row in ipairs(rows) do
      if row.target then
        for _, key in ipairs {row[2], type(row[3]) == "table" and row[3][2],
                              type(row[4]) == "table" and row[4][2]} do
          if key then targeted[key:gsub("^[^:]*:", "")] = true end
        end
      end
    end
    loaded(function() pass(false, targeted) end)
    print_rows("loaded state (a second process burning one core)")
    keep("loaded")
  end
end
if WHAT ~= "rows" then
  pass(true)
  print_curves()
  keep("curves")
end
results = all
local f = io.open(build .. "/bench-results.json", "w")
if f then f:write(cjson.encode(results), "\n") f:close() end
