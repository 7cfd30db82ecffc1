-- The specs' own redis-server and worker daemons.  Nothing depends on a
-- server already running: each start makes a temporary directory, runs
-- redis-server there on a unix socket only (--port 0), with the AOF on
-- (fsynced at every write where a spec needs a kill -9 to lose nothing
-- acknowledged) and no RDB snapshots, and waits until it answers.  stop() kills it and
-- removes the directory; restart() starts it again on the same directory
-- (the AOF is replayed).  Worker daemons run as their own process groups
-- (setsid): each is a "host" that a spec can freeze, thaw or kill whole.
local H = require "helpers"
local core = require "multiprocessing.core"

local R = {}
R.worker = H.build .. "/luamp-worker"

local Server = {}
Server.__index = Server

local function wait_for(pred, timeout, what)
  local deadline = core.now() + timeout
  while not pred() do
    if core.now() > deadline then error("timed out waiting for " .. what, 2) end
    core.sleep(0.02)
  end
end

function Server:_spawn()
  local cmd = string.format("env -u LD_PRELOAD redis-server %s --unixsocket %s " ..
    "--unixsocketperm 700 --dir %s --appendonly yes --appendfsync %s --save '' " ..
    "--daemonize no --logfile %s/redis.log >/dev/null 2>&1 </dev/null & echo $!",
    self.bind and ("--port " .. self.port .. " --bind " .. self.bind .. " --protected-mode no")
      or "--port 0",
    H.q(self.sock), H.q(self.dir), self.fsync, H.q(self.dir))
  local out = H.sh(cmd)
  self.pid = assert(tonumber(out:match("%d+")), "redis-server did not start")
  wait_for(function()
    local ok, r = pcall(core.redis_connect, nil, nil, self.sock, 1)
    if ok then r:close() end
    return ok
  end, 10, "redis-server to answer")
end

-- opts.fsync: the AOF's appendfsync ("everysec" by default; "always"
-- where a spec kills the server and counts on every acknowledged write);
-- opts.bind, opts.port: also listen on TCP there.
function R.start(opts)
  opts = opts or {}
  local dir = H.sh("env -u LD_PRELOAD mktemp -d /tmp/luamp-redis.XXXXXX"):match("%S+")
  local s = setmetatable({dir = dir, sock = dir .. "/redis.sock", bind = opts.bind,
                          port = opts.port, fsync = opts.fsync or "everysec"}, Server)
  s.url = "unix://" .. s.sock
  s.workers = {}
  s:_spawn()
  return s
end

function Server:alive() return H.alive(self.pid) end

-- kill -9 (no shutdown, no final AOF rewrite).
function Server:kill9()
  H.sh("kill -9 " .. self.pid)
  wait_for(function() return not H.alive(self.pid) end, 10, "redis-server to die")
  os.remove(self.sock)
end

function Server:restart() self:_spawn() end

-- redis-cli against this server (output trimmed).
function Server:cli(args)
  local out = H.sh("env -u LD_PRELOAD redis-cli -s " .. H.q(self.sock) .. " " .. args)
  return (out:gsub("%s+$", ""))
end

-- Starts a worker daemon in its own process group; returns its pid
-- (= its group id).  opts: namespace, authkey (written to a file),
-- processes, lease, broker (default: this server), env (assignments put
-- before the command), netns (a network namespace to run it in).
function Server:start_worker(opts)
  opts = opts or {}
  local keyfile = self.dir .. "/key" .. (#self.workers + 1)
  H.write(keyfile, opts.authkey or "secret")
  local log = self.dir .. "/worker" .. (#self.workers + 1) .. ".log"
  local cmd = string.format("%ssetsid %s%s --broker %s --namespace %s --authkey-file %s " ..
    "--processes %d %s >%s 2>&1 </dev/null & echo $!", opts.env and opts.env .. " " or "",
    opts.netns and ("ip netns exec " .. H.q(opts.netns) .. " ") or "", H.q(R.worker),
    H.q(opts.broker or self.url), H.q(opts.namespace or "test"), H.q(keyfile),
    opts.processes or 2, opts.lease and ("--lease " .. opts.lease) or "", H.q(log))
  local pid = assert(tonumber(H.sh(cmd):match("%d+")))
  self.workers[#self.workers + 1] = pid
  return pid, log
end

-- Signals a daemon's whole process group (the "host").
function Server:signal_worker(pid, sig)
  H.sh("kill -" .. sig .. " -" .. pid)
end

-- n tasks, each its own task in Redis (apply_async), across 2 daemons of
-- 2 processes in namespace ns: every result reaches the caller exactly
-- once (its callback counted per item), every task ran exactly once
-- (each appends "item daemon-pid" to one file opened O_APPEND: one
-- write(2) per line, whole lines), both daemons served, and Redis is left
-- with no task, lease or dead letter.  Returns the seconds it took.
function Server:bulk(ns, n)
  local mp = require "multiprocessing"
  self:start_worker{namespace = ns, processes = 2}
  self:start_worker{namespace = ns, processes = 2}
  local pool <close> = mp.Pool{broker = self.url, namespace = ns, authkey = "secret", lease = 10}
  local ran = self.dir .. "/" .. ns .. ".ran"
  local calls, bad = {}, {}
  local function cb(x) calls[x] = (calls[x] or 0) + 1 end
  local function ecb(e) bad[#bad + 1] = tostring(e) end
  local function task(x)
    local f = io.open(ran, "a")
    f:write(x, " ", require("multiprocessing.core").getppid(), "\n")
    f:close()
    return x
  end
  local t0 = core.now()
  for i = 1, n do pool:apply_async(task, {i}, cb, ecb) end
  pool:close()
  pool:join()
  local secs = core.now() - t0
  assert(#bad == 0, "failed tasks: " .. table.concat(bad, "; ", 1, math.min(#bad, 5)))
  for i = 1, n do
    if calls[i] ~= 1 then error(string.format("result %d arrived %d times", i, calls[i] or 0)) end
  end
  local runs, daemons, lines = {}, {}, 0
  for line in io.lines(ran) do
    local x, ppid = line:match("^(%d+) (%d+)$")
    assert(x, "a torn line in the run log: " .. line)
    x = tonumber(x)
    runs[x] = (runs[x] or 0) + 1
    daemons[ppid] = true
    lines = lines + 1
  end
  for i = 1, n do
    if runs[i] ~= 1 then error(string.format("task %d ran %d times", i, runs[i] or 0)) end
  end
  assert(lines == n, "runs of tasks not submitted: " .. lines)
  assert(next(daemons, next(daemons)) ~= nil, "one daemon served every task")
  local P = "luamp:" .. ns .. ":"
  for _, c in ipairs {"LLEN " .. P .. "q", "ZCARD " .. P .. "leases", "LLEN " .. P .. "dead",
                      "EVAL " .. H.q("return #redis.call('KEYS', ARGV[1])") .. " 0 " ..
                      H.q(P .. "t:*")} do
    local v = self:cli(c)
    if v ~= "0" then error(c .. " is " .. v .. " after the run") end
  end
  return secs
end

function Server:stop()
  for _, pid in ipairs(self.workers) do H.sh("kill -9 -" .. pid .. " 2>/dev/null") end
  self.workers = {}
  if self.pid and H.alive(self.pid) then
    H.sh("kill -9 " .. self.pid)
    pcall(wait_for, function() return not H.alive(self.pid) end, 10, "redis-server to die")
  end
  if self.dir and self.dir:match("^/tmp/luamp%-redis%.") then H.sh("rm -rf " .. H.q(self.dir)) end
end

return R
