-- bench.lua [FILTER]: luamp's side of make bench.  Prints one JSON line
-- per workload: {"name", "seconds", "rate", "unit"}.  scripts/bench.py does
-- the same workloads with CPython's multiprocessing; bench_table.lua runs
-- both and prints the comparison.  Workloads are added by name below.
local cjson = require "cjson"
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

-- Later issues add their workloads here (codec, process, pipe, queue...).

local _ = mp
for _, w in ipairs(W) do
  if not filter or w.name:find(filter, 1, true) then
    local count, secs = w.fn()
    io.write(cjson.encode({name = w.name, seconds = secs, rate = count / secs,
                           unit = w.unit}), "\n")
    io.flush()
  end
end
