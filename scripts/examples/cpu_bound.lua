-- cpu_bound.lua: the same CPU-bound work done sequentially, then by four
-- processes at once; prints both times, the speed-up, and the speed-up to
-- expect: one per free core, up to four (the CPUs' idle time over half a
-- second before the run says how many cores other programs keep busy).
-- A few seconds of work, so that a timing is not a matter of luck;
-- `cpu_bound.lua N` sums N squares per task instead of 3*10^7 (the test
-- suite's shorter run).
local mp = require "multiprocessing"
local now = mp.now

-- the sum of i*i for i in [0, n), exactly: it outgrows 64-bit integers
-- at n = 5 * 10^6, so it is kept in two limbs of base 10^15
local BASE = 10^15 // 1
local function sum_squares(n)
  local hi, lo = 0, 0
  for i = 0, n - 1 do
    lo = lo + i * i
    if lo >= BASE then hi, lo = hi + 1, lo - BASE end
  end
  if hi == 0 then return tostring(lo) end
  return string.format("%d%015d", hi, lo)
end

local N = math.tointeger(tonumber(arg and arg[1])) or 3 * 10^7 // 1
local tasks = {N, N, N, N}

-- Returns the CPUs' total and idle time so far, and how many CPUs.
local function cpu_times()
  local f = io.open("/proc/stat")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local t = {}
  for n in s:match("^cpu ([^\n]*)"):gmatch("%d+") do t[#t + 1] = tonumber(n) end
  -- user nice system idle iowait irq softirq steal (guest time is in user)
  local total = 0
  for i = 1, math.min(#t, 8) do total = total + t[i] end
  local _, n = s:gsub("\ncpu%d+ ", "")
  return total, t[4] + (t[5] or 0), n
end
-- the cores free of other work now (Linux: how much of the CPUs'
-- time /proc/stat counts as idle over half a second; the load average
-- would still count, for a minute, a build that has just finished)
local ncpu = mp.cpu_count()
local free = ncpu
local total0, idle0 = cpu_times()
if total0 then
  mp.Event():wait(0.5)
  local total1, idle1, n = cpu_times()
  if total1 > total0 then
    -- the cores of the machine kept busy, on average
    local busy = (1 - (idle1 - idle0) / (total1 - total0)) * n
    free = math.max(1, math.min(ncpu, math.floor(ncpu - busy + 0.5)))
  end
end

local t0 = now()
local sequential = {}
for i, n in ipairs(tasks) do sequential[i] = sum_squares(n) end
local t_seq = now() - t0

t0 = now()
local procs, pipes = {}, {}
for i, n in ipairs(tasks) do
  local r, w = mp.Pipe(false)
  procs[i] = mp.Process{target = function() w:send(sum_squares(n)) end}
  procs[i]:start()
  w:close()
  pipes[i] = r
end
local parallel = {}
for i, p in ipairs(procs) do
  parallel[i] = pipes[i]:recv()
  p:join()
end
local t_par = now() - t0

for i, n in ipairs(tasks) do
  assert(parallel[i] == sequential[i])
  print(string.format("sum of i*i for i < %d = %s", n, parallel[i]))
end
print(string.format("sequential:        %.2f s", t_seq))
print(string.format("%d processes:       %.2f s (%d CPUs)", #tasks, t_par,
  mp.cpu_count()))
print(string.format("speed-up:          %.2fx", t_seq / t_par))
print(string.format("expected:          about %dx: %d processes on %d free core%s of %d " ..
  "(less while other programs run)", math.min(#tasks, free), #tasks, free,
  free == 1 and "" or "s", ncpu))
