-- bench_broker.lua [FILTER]: luamp's broker workloads for make bench.  Starts
-- its own redis-server (temp dir, unix socket, AOF on with fsync every
-- second: Redis's default durability) and two worker daemons of 1 process
-- each (2 workers in all, as Celery's prefork -c 2), then prints one JSON
-- line per workload, as bench.lua.  scripts/bench_broker.py measures
-- Celery and RQ on the same kind of server.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local filter = arg[1]
local build = os.getenv("LUAMP_BUILD") or "build"
local now = core.now

local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  p:close()
  return out
end

local dir = sh("mktemp -d /tmp/luamp-bench-redis.XXXXXX"):match("%S+")
local sock = dir .. "/redis.sock"
local rpid = tonumber(sh(string.format("redis-server --port 0 --unixsocket %s --dir %s " ..
  "--appendonly yes --save '' --logfile %s/log >/dev/null 2>&1 </dev/null & echo $!",
  sock, dir, dir)):match("%d+"))
local workers = {}
local function cleanup()
  for _, pid in ipairs(workers) do os.execute("kill -9 -" .. pid .. " 2>/dev/null") end
  os.execute("kill -9 " .. rpid .. " 2>/dev/null")
  os.execute("rm -rf '" .. dir .. "'")
end

local ok, err = pcall(function()
  local deadline = now() + 10
  while not pcall(core.redis_connect, nil, nil, sock, 1) do
    assert(now() < deadline, "redis-server did not start")
    core.sleep(0.05)
  end
  local f = assert(io.open(dir .. "/key", "w"))
  f:write("bench-key")
  f:close()
  for _ = 1, 2 do
    workers[#workers + 1] = tonumber(sh(string.format("setsid %s/luamp-worker --broker " ..
      "unix://%s --namespace bench --authkey-file %s/key --processes 1 --quiet " ..
      ">/dev/null 2>&1 </dev/null & echo $!", build, sock, dir)):match("%d+"))
  end
  local pool <close> = mp.Pool{broker = "unix://" .. sock, namespace = "bench",
                               authkey = "bench-key"}
  pool:map(function(x) return x end, {1, 2, 3, 4}, 1)     -- both hosts up

  local function emit(name, count, secs, unit)
    if filter and not name:find(filter, 1, true) then return end
    io.write(string.format('{"name": "%s", "seconds": %.6f, "rate": %.3f, "unit": "%s"}\n',
      name, secs, count / secs, unit))
    io.flush()
  end

  do
    local n = 20000
    local t0 = now()
    local rs = {}
    for i = 1, n do rs[i] = pool:apply_async(function(x) return x + 1 end, {i}) end
    for i = 1, n do assert(rs[i]:get() == i + 1) end
    emit("broker.apply_async", n, now() - t0, "tasks/s")
  end
  do
    local n = 1000000
    local xs = {}
    for i = 1, n do xs[i] = i end
    local t0 = now()
    local r = pool:map(function(x) return x * 2 end, xs)
    assert(r[n] == 2 * n)
    emit("broker.map_1e6", n, now() - t0, "items/s")
  end
  do
    local n = 200
    local t0 = now()
    for _ = 1, n do pool:apply(function() return 1 end) end
    emit("broker.apply_rtt", n, now() - t0, "round trips/s")
  end
end)
cleanup()
if not ok then io.stderr:write(tostring(err), "\n") os.exit(1) end
