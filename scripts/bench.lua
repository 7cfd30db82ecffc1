-- bench.lua [FILTER | =NAME | --list]: luamp's side of make bench.  Prints
-- one JSON line per workload: {"name", "seconds", "rate", "unit"} (those
-- whose name contains FILTER, or the one named NAME); --list prints the
-- names.  scripts/bench.py does
-- the same workloads with CPython's multiprocessing; bench_table.lua runs
-- both and prints the comparison.  Workloads are added by name below.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local filter = arg[1]
local now = core.now

local W = {}   -- ordered list of {name, unit, fn}; fn returns count, seconds

local function add(name, unit, fn)
  W[#W + 1] = {name = name, unit = unit, fn = fn}
end

-- Times f(n) with n growing until one run takes at least min_secs.
local function timed(f, n, min_secs)
  min_secs = min_secs or 0.3
  while true do
    local t0 = now()
    f(n)
    local dt = now() - t0
    if dt >= min_secs or n >= 1e9 then return n, dt end
    n = n * math.max(2, math.ceil(min_secs / math.max(dt, 1e-6) * 1.2))
  end
end

-- ---- module ----------------------------------------------------------------

add("require", "requires/s", function()
  return timed(function(n)
    for _ = 1, n do
      for k in pairs(package.loaded) do
        if k == "multiprocessing" or k:match("^multiprocessing%.[^c]") then
          package.loaded[k] = nil
        end
      end
      require "multiprocessing"
    end
  end, 100)
end)

-- ---- process and pipe (issue 4) --------------------------------------------

-- Process start+join runs in a luamp of its own that loads only the
-- module: a fork costs more the more the forking process has mapped, and
-- the reference (bench_probes fork) is a bare C loop, not this harness.
local START_JOIN = [[
local mp = require "multiprocessing"
local now = require("multiprocessing.core").now
local function nothing() end
local n = 100
while true do
  local t0 = now()
  for _ = 1, n do
    local p = mp.Process{target = nothing}
    p:start()
    p:join()
  end
  local dt = now() - t0
  if dt >= 1.0 then print(n, dt) break end
  n = n * math.max(2, math.ceil(1.0 / math.max(dt, 1e-6) * 1.2))
end
]]
add("process.start_join", "procs/s", function()
  local f = assert(io.popen(arg[-1] .. " -e '" ..
                            START_JOIN:gsub("'", "'\\''") .. "'"))
  local n, dt = f:read("n", "n")
  f:close()
  return n, dt
end)

-- Process start+join from a 500 MiB Lua heap (issue 17), fork against
-- forkserver: a fork copies the page tables of the whole heap at every
-- start; a child of the fork server starts from the server's small heap
-- (the server is started before the heap is built, as set_start_method
-- at the top of a script does).
local START_JOIN_BIG = [[
local mp = require "multiprocessing"
local now = require("multiprocessing.core").now
local method = ...
mp.set_start_method(method)
local heap, chunk = {}, string.rep("x", 2^20 - 64)
for i = 1, 500 do heap[i] = chunk .. i end       -- 500 distinct MiB strings
local function nothing() end
local n = 10
while true do
  local t0 = now()
  for _ = 1, n do
    local p = mp.Process{target = nothing}
    p:start()
    p:join()
  end
  local dt = now() - t0
  if dt >= 1.0 then print(n, dt) break end
  n = n * math.max(2, math.ceil(1.0 / math.max(dt, 1e-6) * 1.2))
end
]]
for _, method in ipairs {"fork", "forkserver"} do
  add("process.start_join_500mib." .. method, "procs/s", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(START_JOIN_BIG)
    f:close()
    f = assert(io.popen(arg[-1] .. " " .. path .. " " .. method))
    local n, dt = f:read("n", "n")
    f:close()
    os.remove(path)
    return n, dt
  end)
end

-- round trips of a small value between two processes over mp.Pipe()
add("pipe.pingpong", "roundtrips/s", function()
  local a, b = mp.Pipe()
  local p = mp.Process{target = function()
    a:close()
    while true do
      local v = b:recv()
      if v == nil then break end
      b:send(v)
    end
  end}
  p:start()
  b:close()
  local n, dt = timed(function(n)
    for i = 1, n do
      a:send(i)
      a:recv()
    end
  end, 1000, 1.0)
  a:send(nil)
  p:join()
  a:close()
  return n, dt
end)

-- 1 MiB send_bytes messages from parent to child; MiB/s
add("pipe.stream_1mib", "MiB/s", function()
  local a, b = mp.Pipe()
  local chunk = string.rep("x", 2^20)
  local p = mp.Process{target = function()
    a:close()
    while true do
      local s = b:recv_bytes()
      if s == "" then b:send_bytes("k")      -- end of a timed run
      elseif s == "q" then break end
    end
  end}
  p:start()
  b:close()
  local n, dt = timed(function(n)
    for _ = 1, n do a:send_bytes(chunk) end
    a:send_bytes("")
    a:recv_bytes()
  end, 64, 1.0)
  a:send_bytes("q")
  p:join()
  a:close()
  return n, dt
end)

-- ---- codec (issue 3): luamp against lua-cjson on the same values ------

-- (lua-cjson is loaded by the workloads that use it: the others, the
-- process ones most, are not to fork a process that has it mapped)
local cjson_ok = package.searchpath("cjson", package.cpath) ~= nil
local RECORD = {id = 12345, name = "abcdefgh", vals = {1.5, 2.5, 3.5, 4.5},
                tags = {"x", "y", "z"}, ok = true}

local function floats(n)
  local t = {}
  for i = 1, n do t[i] = i + 0.25 end
  return t
end
local function ints(n)
  local t = {}
  for i = 1, n do t[i] = i * 7 end
  return t
end
local function strmap(n)
  local t = {}
  for i = 1, n do t["key" .. i] = i end
  return t
end
local function deep(levels)
  local root = {level = 0, name = "node"}
  local node = root
  for i = 1, levels do
    node.child = {level = i, name = "node", tags = {"a", "b"}}
    node = node.child
  end
  return root
end

-- Adds encode and decode workloads for value v with the codec codec()
-- returns (enc, dec, got when the workload runs); unit MiB/s reports MiB/s
-- of the encoded form, else items/s.  v may be a function making the value
-- on first use: big values are only built when their workload runs, so
-- the process workloads fork a small heap.
local function codec_pair(prefix, v, codec, unit, items, min_n)
  local s
  local function value(enc)
    if type(v) == "function" then v = v() end
    s = s or enc(v)
    return v, s
  end
  local function per()
    return unit == "MiB/s" and #s / 2^20 or items
  end
  add(prefix .. ".encode", unit, function()
    local enc = codec()
    local x = value(enc)
    local n, dt = timed(function(n) for _ = 1, n do enc(x) end end, min_n)
    return n * per(), dt
  end)
  add(prefix .. ".decode", unit, function()
    local enc, dec = codec()
    local _, e = value(enc)
    local n, dt = timed(function(n) for _ = 1, n do dec(e) end end, min_n)
    return n * per(), dt
  end)
end
local function luamp_codec() return mp.encode, mp.decode end
local function cjson_codec()
  local cjson = require "cjson"
  return cjson.encode, cjson.decode
end

-- memoized value makers
local function lazy(f, ...)
  local args, v = table.pack(...), nil
  return function()
    if v == nil then v = f(table.unpack(args, 1, args.n)) end
    return v
  end
end

local values = {
  {"record", RECORD, "objects/s", 1, 1000},
  {"floats1e6", lazy(floats, 1e6), "Mitems/s", 1, 1},
  {"ints1e6", lazy(ints, 1e6), "Mitems/s", 1, 1},
  {"map1e5", lazy(strmap, 1e5), "Mitems/s", 0.1, 1},
  {"deep200", lazy(deep, 200), "trees/s", 1, 10},
}
for _, v in ipairs(values) do
  codec_pair("codec." .. v[1], v[2], luamp_codec, v[3], v[4], v[5])
  if cjson_ok then
    codec_pair("cjson." .. v[1], v[2], cjson_codec, v[3], v[4], v[5])
  end
end
-- bulk throughput in MiB/s of MessagePack, for the absolute targets
codec_pair("codec.floats1e6.bytes", values[2][2], luamp_codec, "MiB/s", 0, 1)
codec_pair("codec.ints1e6.bytes", values[3][2], luamp_codec, "MiB/s", 0, 1)
-- the record with identity tracking off: what tracking costs
add("codec.record.untracked.encode", "objects/s", function()
  core.codec_options {track = false}
  local n, dt = timed(function(n) for _ = 1, n do mp.encode(RECORD) end end, 1000)
  core.codec_options {track = true}
  return n, dt
end)

-- ---- manager (issue 7) -----------------------------------------------------

-- Each workload runs its loop in child processes (as users do: the
-- manager's clients are other processes), timed there, 2*10^4 operations;
-- writes end with a sync so that all of them are done.
local MGR_N = 20000
local function manager_work(setup, body, procs)
  return function()
    local m = mp.Manager()
    local obj = setup(m)
    local ps, pipes = {}, {}
    procs = procs or 1
    for w = 1, procs do
      local a, b = mp.Pipe()
      pipes[w] = a
      ps[w] = mp.Process{target = function()
        b:recv()                       -- start together
        local t0 = now()
        body(obj, MGR_N // procs)
        b:send(now() - t0)
      end}
      ps[w]:start()
      b:close()
    end
    for w = 1, procs do pipes[w]:send("go") end
    local dt = 0
    for w = 1, procs do dt = math.max(dt, pipes[w]:recv()) end
    for w, p in ipairs(ps) do p:join(); pipes[w]:close() end
    m:shutdown()
    return MGR_N, dt
  end
end

add("manager.dict_set", "ops/s", manager_work(function(m) return m:dict() end,
  function(d, n)
    for i = 1, n do d[i] = i end
    d:sync()
  end))
-- the same writes each inside an mp.Lock: the release waits until the
-- write is applied (a round trip each, as CPython's writes)
add("manager.dict_set_locked", "ops/s", manager_work(function(m)
    return {m:dict(), mp.Lock()}
  end, function(o, n)
    local d, lock = o[1], o[2]
    local function set(i) d[i] = i end
    for i = 1, n do lock:with(set, i) end
  end))
add("manager.dict_get", "ops/s", manager_work(function(m)
    local d = m:dict()
    for i = 1, 100 do d[i] = i end
    return d
  end, function(d, n)
    local x
    for i = 1, n do x = d[i % 100 + 1] end
    return x
  end))
add("manager.list_append", "ops/s", manager_work(function(m) return m:list() end,
  function(l, n)
    for i = 1, n do l:append(i) end
    l:sync()
  end))
add("manager.apply_2procs", "ops/s", manager_work(function(m) return m:dict{n = 0} end,
  function(d, n)
    local inc = function(v) return v + 1 end
    for _ = 1, n do d:apply("n", inc) end
  end, 2))
-- ---- pool (issue 6) --------------------------------------------------------

local function double(x) return x * 2 end
local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

-- map of a tiny function over n items, default chunks, pool start and
-- shutdown included (as a user's script pays them)
local function pool_map(workers, n)
  return function()
    local xs = range(n)
    local t0 = now()
    local pool = mp.Pool(workers)
    local r = pool:map(double, xs)
    pool:close()
    pool:join()
    local dt = now() - t0
    assert(r[n] == 2 * n)
    return n, dt
  end
end
add("pool.map_default", "tasks/s", pool_map(nil, 200000))

add("pool.map_chunksize1", "tasks/s", function()
  local pool <close> = mp.Pool()
  local xs = range(20000)
  local t0 = now()
  local r = pool:map(double, xs, 1)
  local dt = now() - t0
  assert(r[20000] == 40000)
  return 20000, dt
end)

add("pool.apply_async", "tasks/s", function()
  local pool <close> = mp.Pool()
  local rs = {}
  local t0 = now()
  for i = 1, 20000 do rs[i] = pool:apply_async(double, {i}) end
  for i = 1, 20000 do assert(rs[i]:get() == 2 * i) end
  return 20000, now() - t0
end)

-- CPU-bound: 8 tasks of ~60 ms on one worker, then on two; the speed-up
-- is the median of 5 such pairs
local function spin(k)
  local x = 0
  for i = 1, k do x = x + i % 7 end
  return x
end
add("pool.cpu_speedup_2w", "x", function()
  local k = 1
  repeat                               -- size one task to ~60 ms here
    k = k * 2
    local t0 = now()
    spin(k)
    local dt = now() - t0
  until dt > 0.06
  local tasks = {}
  for i = 1, 8 do tasks[i] = k end
  local ratios = {}
  for run = 1, 5 do
    local t = {}
    for w = 1, 2 do
      local pool <close> = mp.Pool(w)
      pool:map(spin, {1, 1})           -- workers up and warm
      local t0 = now()
      pool:map(spin, tasks, 1)
      t[w] = now() - t0
    end
    ratios[run] = t[1] / t[2]
  end
  table.sort(ratios)
  return ratios[3], 1
end)

-- private memory (USS) of an idle worker after a 1000-task map
local function uss_kib(pid)
  local kib = 0
  local f = assert(io.open("/proc/" .. pid .. "/smaps_rollup"))
  for line in f:lines() do
    local v = line:match("^Private_%a+:%s+(%d+) kB")
    if v then kib = kib + tonumber(v) end
  end
  f:close()
  return kib
end
add("pool.idle_worker_uss", "KiB", function()
  local pool <close> = mp.Pool(2)
  pool:map(double, range(1000), 1)
  core.sleep(0.2)
  local sum, n = 0, 0
  for _, w in pairs(pool._workers) do
    sum, n = sum + uss_kib(w.pid), n + 1
  end
  return sum / n, 1
end)

-- scale curve: the same 10^5-task map with 1 to 64 workers on this machine
for _, w in ipairs {1, 2, 4, 8, 16, 32, 64} do
  add("pool.scale_" .. w, "tasks/s", pool_map(w, 100000))
end

-- ---- futures (issue 15) ------------------------------------------------------

-- submit -> result, one future at a time: the latency of one task.  A
-- true round trip (each submit waits for its result; bench.py's row is
-- the same).  It can beat bench_probes' plain futex ping-pong (one sleep
-- and one wake-up each way) because a worker polls 10 us before it
-- sleeps (queue.c): on a quiet machine the owner's next task often comes
-- within the poll, so a round trip pays one sleep, not two.  The fair
-- floor for that hand-off is bench_probes futex_poll.
add("futures.submit_result_rtt", "roundtrips/s", function()
  local futures = require "multiprocessing.futures"
  local ex <close> = futures.ProcessPoolExecutor()
  ex:submit(double, 0):result()
  return timed(function(n)
    for i = 1, n do assert(ex:submit(double, i):result() == 2 * i) end
  end, 500)
end)

-- 2e4 submits, then every result
add("futures.submit_2e4", "tasks/s", function()
  local futures = require "multiprocessing.futures"
  local ex <close> = futures.ProcessPoolExecutor()
  ex:submit(double, 0):result()
  local fs = {}
  local t0 = now()
  for i = 1, 20000 do fs[i] = ex:submit(double, i) end
  for i = 1, 20000 do assert(fs[i]:result() == 2 * i) end
  return 20000, now() - t0
end)

-- ---- queues, locks, shared values (issue 5) ---------------------------------

-- n items from `producers` child processes through one Queue to the parent
local function queue_run(n, producers, item)
  local q = mp.Queue()
  local per = n // producers
  local ps = {}
  for k = 1, producers do
    ps[k] = mp.Process{target = function()
      if item == nil then
        for i = 1, per do q:put(i) end
      else
        for _ = 1, per do q:put(item) end
      end
    end}
    ps[k]:start()
  end
  for _ = 1, per * producers do q:get() end
  for k = 1, producers do ps[k]:join() end
  q:close()
end

local SMALL = {id = 1, name = "abc", vals = {1.5, 2.5, 3.5}}

if mp.Process then
  add("queue.ints_1to1", "items/s", function()
    return timed(function(n) queue_run(n, 1) end, 20000, 1.0)
  end)
  add("queue.table_1to1", "items/s", function()
    return timed(function(n) queue_run(n, 1, SMALL) end, 20000, 1.0)
  end)
  add("queue.ints_4to1", "items/s", function()
    return timed(function(n) queue_run(n, 4) end, 20000, 1.0)
  end)
  add("queue.1mib_1to1", "items/s", function()
    local item = string.rep("x", 2^20)
    return timed(function(n) queue_run(n, 1, item) end, 64, 1.0)
  end)
  -- v.value = v.value + 1 under v's lock, two processes at once
  add("value.locked_add_2procs", "ops/s", function()
    local n, dt = timed(function(n)
      local v = mp.Value("i", 0)
      local per = n // 2
      local function work()
        local l = v:get_lock()
        for _ = 1, per do
          l:acquire()
          v.value = v.value + 1
          l:release()
        end
      end
      local p = mp.Process{target = work}
      p:start()
      work()
      p:join()
      assert(v.value == 2 * per)
    end, 20000, 1.0)
    return n, dt
  end)
end

add("lock.pairs_uncontended", "pairs/s", function()
  local l = mp.Lock()
  return timed(function(n)
    for _ = 1, n do l:acquire(); l:release() end
  end, 100000)
end)

-- memory of an empty queue: this process's proportional share of resident
-- memory (shared pages included) plus its page tables, over 1000 queues;
-- reported as queues per MiB (more is better)
local function mem_kib()
  local kib = 0
  local f = io.open("/proc/self/smaps_rollup")
  for line in f:lines() do
    local v = line:match("^Pss:%s+(%d+) kB")
    if v then kib = kib + tonumber(v) end
  end
  f:close()
  f = io.open("/proc/self/status")
  for line in f:lines() do
    local v = line:match("^VmPTE:%s+(%d+) kB")
    if v then kib = kib + tonumber(v) end
  end
  f:close()
  return kib
end

add("queue.empty_memory", "queues/MiB", function()
  collectgarbage()
  local before, qs = mem_kib(), {}
  for i = 1, 1000 do
    qs[i] = mp.Queue()
    qs[i]:put(i)       -- used once, then empty
    qs[i]:get()
  end
  collectgarbage()
  local kib = math.max(mem_kib() - before, 1)
  for i = 1, 1000 do qs[i]:close() end
  return 1000, kib / 1024
end)

-- ---- scale curves (issue 18) -------------------------------------------------
-- Each point is one workload "curve.<what>.<x>"; bench_table prints them
-- in a table of their own with the growth from point to point.

-- queued items: n small ints put on one Queue nobody reads yet (memory per
-- item, this process's PSS and page tables), then all taken back
for _, n in ipairs {1e3, 1e4, 1e5, 1e6} do
  add(string.format("curve.queue_items.%d", n), "B/item", function()
    collectgarbage()
    local before = mem_kib()
    local q = mp.Queue()
    for i = 1, n do q:put(i) end
    local kib = mem_kib() - before
    for _ = 1, n do q:get() end
    q:close()
    return math.max(kib, 0) * 1024 / n, 1
  end)
end

-- message size: send_bytes of one size from parent to child over mp.Pipe,
-- MiB/s (the largest size is BENCH_MAX_MIB, default 256; 1024 for 1 GiB)
local MAX_MIB = tonumber(os.getenv("BENCH_MAX_MIB") or "") or 256
for _, kib in ipairs {1, 16, 256, 4096, 65536, 262144, 1048576} do
  if kib <= MAX_MIB * 1024 then
    add(string.format("curve.msg_kib.%d", kib), "MiB/s", function()
      local a, b = mp.Pipe()
      local msg = string.rep("x", kib * 1024)
      local p = mp.Process{target = function()
        a:close()
        while true do
          local s = b:recv_bytes()
          if s == "" then b:send_bytes("k")
          elseif s == "q" then break end
        end
      end}
      p:start()
      b:close()
      local n, dt = timed(function(n)
        for _ = 1, n do a:send_bytes(msg) end
        a:send_bytes("")
        a:recv_bytes()
      end, math.max(1, 4096 // kib), 0.5)
      a:send_bytes("q")
      p:join()
      a:close()
      return n * kib / 1024, dt
    end)
  end
end

-- the same sizes received with recv_bytes_into a SharedMemory: no fresh
-- string per message (what the send_bytes curve's large sizes pay for)
for _, kib in ipairs {1, 16, 256, 4096, 65536, 262144, 1048576} do
  if kib <= MAX_MIB * 1024 then
    add(string.format("curve.msg_into_kib.%d", kib), "MiB/s", function()
      local a, b = mp.Pipe()
      local msg = string.rep("x", kib * 1024)
      local shm = mp.shared_memory.SharedMemory{create = true, size = kib * 1024}
      local p = mp.Process{target = function()
        a:close()
        while true do
          local k = b:recv_bytes_into(shm)
          if k == 0 then b:send_bytes("k")
          elseif k == 1 then break end
        end
      end}
      p:start()
      b:close()
      local n, dt = timed(function(n)
        for _ = 1, n do a:send_bytes(msg) end
        a:send_bytes("")
        a:recv_bytes()
      end, math.max(1, 4096 // kib), 0.5)
      a:send_bytes("q")
      p:join()
      a:close()
      shm:close(); shm:unlink()
      return n * kib / 1024, dt
    end)
  end
end

-- live processes: n children started, each blocked on one Event; memory
-- per process is the mean of their private memory (USS), the rate how
-- fast they started
for _, n in ipairs {10, 100, 1000} do
  add(string.format("curve.live_procs.%d", n), "KiB/proc", function()
    local ev, ps = mp.Event(), {}
    local t0 = now()
    for i = 1, n do
      ps[i] = mp.Process{target = function() ev:wait() end}
      ps[i]:start()
    end
    local started = now() - t0
    core.sleep(0.2)
    local kib = 0
    for i = 1, n do kib = kib + uss_kib(ps[i].pid) end
    ev:set()
    for i = 1, n do ps[i]:join() end
    io.stderr:write(string.format("%d live processes started in %.3f s\n",
                                  n, started))
    return kib / n, 1
  end)
end

local _ = mp
local exact = filter and filter:match("^=(.*)$")
for _, w in ipairs(W) do
  if filter == "--list" then
    io.write(w.name, "\n")
  elseif not filter or (exact and w.name == exact) or
         (not exact and w.name:find(filter, 1, true)) then
    collectgarbage("collect")
    local count, secs = w.fn()
    -- (names and units are plain ASCII: no escaping needed)
    io.write(string.format('{"name":"%s","seconds":%.17g,"rate":%.17g,"unit":"%s"}\n',
                           w.name, secs, count / secs, w.unit))
    io.flush()
  end
end
