-- multiprocessing.broker_worker: the worker daemon of a host
-- (luamp-worker --broker URL --namespace NS --authkey-file F --processes N)
-- and mp.current_task().
--
-- The daemon runs a local Pool and feeds it from Redis: it claims tasks
-- (each with a lease), checks each envelope's signature before decoding
-- a byte of it, hands the task to its local Pool, and acks the signed
-- result.  The daemon -- never the busy worker -- renews the leases of
-- everything its workers hold, every lease/3 seconds, so a CPU-bound
-- task keeps its lease as long as its host lives; a host that vanishes
-- stops renewing and its tasks go to other hosts when the lease runs
-- out.  A local worker that dies is seen at once by the local Pool
-- (WorkerLostError) and its task goes back to the queue (or to the
-- dead-letter list after max_attempts).  Every ack carries the attempt
-- number, and the server drops one that is not the current attempt's:
-- a host that was frozen past its lease cannot deliver a second result.
local core = require "multiprocessing.core"
local broker = require "multiprocessing.broker"
local proto = require "multiprocessing.pool_proto"

local now, encode, decode = core.now, core.encode, core.decode
local OK, FAILED = proto.OK, proto.FAILED
local TRUSTED = {trusted = true}

local M = {}

-- The task this process runs ({id =, attempt =}), or nil outside a
-- broker's task.  (A field of the module table: the task wrapper that
-- sets it travels to the local worker, where it finds this module.)
M._current = nil

function M.current_task()
  local t = M._current
  return t and {id = t.id, attempt = t.attempt} or nil
end

local function log(self, fmt, ...)
  if self.quiet then return end
  io.stderr:write(string.format("[luamp-worker %d] " .. fmt .. "\n", core.getpid(), ...))
  io.stderr:flush()
end

-- f wrapped so that mp.current_task() knows the task it runs for.
local function wrap(f, id, att)
  local task = {id = id, attempt = att}
  local mod = M
  return function(...)
    mod._current = task
    return f(...)
  end
end

-- Starts the claimed task on the local Pool; returns its record, or nil
-- when the task was refused (bad signature, foreign format).
local function start(self, id, att, env)
  local payload = broker.open_task(self.key, id, env)
  if payload == nil then
    log(self, "task %s failed its signature check: dead-lettered, not decoded", id)
    self.b:op("reject", id, "rejected: the task failed its signature check")
    return nil
  end
  -- (the format line first: a task of another Lua or luamp is refused
  -- before a byte of its codec's bytes is decoded)
  local rec = {id = id, att = att}
  local format = require("multiprocessing.broker_pool").FORMAT
  local nl = payload:find("\n", 1, true)
  local theirs = nl and nl <= 200 and payload:sub(1, nl - 1)
  local ok, task
  if theirs == format then
    ok, task = pcall(decode, payload:sub(nl + 1), TRUSTED)
  else
    if theirs and theirs:find("[^%g ]") then theirs = nil end
    ok, task = false, string.format("task made by %s, this worker runs %s",
                                    theirs or "an unknown format", format)
  end
  if not ok then
    local msg = tostring(type(task) == "table" and task.message or task)
    if msg:match("^cannot load module") or msg:match("^module '.-' has no field") then
      -- (a C function or module named by the task that this host lacks;
      -- require's search list stays out of the message)
      msg = msg:gsub(":?\n.*", "") .. " (C functions and modules travel by name: " ..
            "each must be loadable on the worker's host)"
    end
    rec.failed = core.new_error("DecodeError", "worker cannot run task " .. id .. ": " .. msg)
    return rec
  end
  local f = wrap(task.f, id, att)
  local opts = {timeout = task.t}
  rec.mode = task.m
  local pool = self.pool
  local sok, ar = pcall(function()
    if task.m == "apply" then
      local a = task.a
      a.n = task.n
      return pool:apply_async(f, a, opts)
    end
    opts.chunksize = task.n
    task.a.n = task.n
    if task.m == "starmap" then return pool:starmap_async(f, task.a, opts) end
    return pool:map_async(f, task.a, opts)
  end)
  if not sok then rec.failed = ar else rec.ar = ar end
  return rec
end

-- The signed result of a finished task (or nil: it goes back to the
-- queue, its local worker having died).
local function result_of(self, rec)
  local out
  if rec.failed then
    out = {FAILED, rec.failed}
  else
    local r = table.pack(pcall(rec.ar.get, rec.ar, 0))
    if r[1] then
      if rec.mode == "apply" then
        out = {OK, false, {0, OK, r.n - 1, table.unpack(r, 2, r.n)}}
      else
        out = {OK, r[2].n or #r[2], r[2]}
      end
    else
      local err = r[2]
      if core.is_error(err, "WorkerLostError") then return nil, err end
      out = {FAILED, err}
    end
  end
  local ok, payload = pcall(encode, out)
  if not ok then payload = encode({FAILED, payload}) end
  return broker.sign_result(self.key, rec.id, rec.att, payload)
end

-- The acks (or, for a lost local worker, nacks) of the finished tasks:
-- every ack in one "acks" op (one script call), first; each nack an op
-- of its own.  where[i] says where recs[i]'s reply is: {op, index in
-- the acks op's list of replies or nil}.
local function finish(self, recs)
  local acks, ops, where = {"acks"}, {}, {}
  for i, rec in ipairs(recs) do
    self.inflight[rec.id] = nil
    self.n = self.n - 1
    local res, err = result_of(self, rec)
    if res == nil then
      log(self, "task %s attempt %d: %s", rec.id, rec.att, tostring(err.message))
      ops[#ops + 1] = {"nack", rec.id, rec.att, "worker lost: " .. tostring(err.message)}
      where[i] = {#ops}
    else
      acks[#acks + 1], acks[#acks + 2], acks[#acks + 3] = rec.id, rec.att, res
      where[i] = {0, (#acks - 1) // 3}
    end
  end
  if #acks > 1 then
    table.insert(ops, 1, acks)
    for _, w in pairs(where) do w[1] = w[1] + 1 end
  end
  return ops, where
end

local function finished(self, recs, where, replies)
  for i, rec in ipairs(recs) do
    local w = where[i]
    local reply = replies[w[1]]
    if core.is_error(reply) then error(reply, 0) end
    if w[2] and reply[w[2]] == 0 then
      log(self, "task %s attempt %d: result dropped (a later attempt owns the task)",
          rec.id, rec.att)
    end
  end
end

local function beat(self)
  local args = {}
  for id, rec in pairs(self.inflight) do
    args[#args + 1] = id
    args[#args + 1] = rec.att
  end
  if #args > 0 then self.b:op("beat", table.unpack(args)) end
  self.next_beat = now() + self.beat
end

-- Starts the tasks of a claim's reply (asked: how many it asked for);
-- returns how many.
local function take(self, got, asked)
  if core.is_error(got) then error(got, 0) end
  -- (fewer than asked: the queue ran dry -- the next round claims again
  -- only with acks to send, or after its wait)
  self.dry = #got // 4 < asked
  local claimed = 0
  for i = 1, #got, 4 do
    local rec = start(self, got[i], got[i + 1], got[i + 2])
    -- (renewals come at a third of the shortest lease held)
    local b = math.max(got[i + 3] / 3000, 0.05)
    if b < self.beat then self.beat, self.next_beat = b, math.min(self.next_beat, now() + b) end
    if rec then
      self.inflight[rec.id] = rec
      self.n = self.n + 1
      claimed = claimed + 1
    end
  end
  return claimed
end

-- One round: results in, tasks claimed, leases renewed, then a wait.
local function step(self)
  local ready = {}
  if self.n > 0 then self.pool:poll() end
  for _, rec in pairs(self.inflight) do
    if rec.failed or rec.ar._done then ready[#ready + 1] = rec end
  end
  local ops, where = finish(self, ready)
  local free = self.slots - self.n
  local claimed = 0
  -- acks and the next claim in one round trip (a claim whose reply a
  -- lost connection swallowed is claimed again; the tasks of the first
  -- go to a host when their lease runs out -- at least once)
  local claim = free > 0 and (#ops > 0 or not self.dry)
  if claim then ops[#ops + 1] = {"claim", free, self.lease_ms, self.wid} end
  self.dry = false
  local replies = self.b:ops(ops)
  finished(self, ready, where, replies)
  if claim then claimed = take(self, replies[#ops], free) end
  if now() >= self.next_beat then beat(self) end
  if claimed > 0 then return end
  local wait = math.max(0.01, math.min(self.next_beat - now(), 1))
  if self.n == 0 then
    -- (a wait for the queue that takes nothing: its last id moved onto
    -- its own tail; the claim written behind it takes it, in the same
    -- round trip)
    local q = self.prefix .. "q"
    local got = self.b:ops({{"claim", self.slots, self.lease_ms, self.wid}},
                           {"BLMOVE", q, q, "RIGHT", "RIGHT", string.format("%.3f", wait)}, wait)
    take(self, got[1], self.slots)
  else
    local fs = {}
    for _, rec in pairs(self.inflight) do
      if rec.ar then fs[#fs + 1] = rec.ar end
    end
    if #fs == 0 then return end
    local futures = require "multiprocessing.futures"
    futures.wait(fs, {timeout = free > 0 and math.min(wait, 0.05) or wait,
                      return_when = "FIRST_COMPLETED"})
  end
end

-- A graceful stop (SIGTERM): what has finished is acked, the local Pool
-- is stopped (its workers killed mid-task), and every task still held
-- -- running or prefetched -- is released: queued again at once for
-- another host, without waiting for its lease nor counting an attempt.
local function stop(self)
  local ready, rest = {}, {}
  if self.n > 0 then pcall(self.pool.poll, self.pool) end
  for _, rec in pairs(self.inflight) do
    if rec.failed or rec.ar._done then ready[#ready + 1] = rec
    else rest[#rest + 1] = rec end
  end
  self.pool:terminate()
  local ops, where = finish(self, ready)
  for _, rec in ipairs(rest) do ops[#ops + 1] = {"release", rec.id, rec.att} end
  -- (a broker down now gets connect_timeout, not the daemon's forever;
  -- then the tasks go to other hosts after their lease)
  self.b.cfg.connect_timeout = math.min(self.b.cfg.connect_timeout, broker.CONNECT_TIMEOUT)
  local replies = self.b:ops(ops)
  finished(self, ready, where, replies)
  log(self, "stopped: %d result(s) acked, %d task(s) handed back", #ready, #rest)
  self.b:close()
end

-- A daemon that cannot go on -- its Redis user refused a command it
-- needs (NOPERM), or any other error but Ctrl-C -- fails loudly: it
-- hands back every task it holds (queued again at once, for a host that
-- can run it; a refused hand-back leaves them to their lease), leaves a
-- notice that fails the waiting clients' tasks (BrokenPoolError naming
-- the reason, rather than a wait for a worker that will never come), and
-- raises.
local function give_up(self, cfg, err)
  local reason = core.is_error(err) and (err.redis or err.message) or err
  reason = tostring(reason):gsub("^luamp%-worker: ", "")
  if reason:match("NOPERM") then
    reason = reason .. " (Redis user " .. (cfg.username or "default") ..
             "; the README's minimal ACL lists what a worker needs)"
  end
  log(self, "giving up: %s", reason)
  if self.pool then pcall(self.pool.terminate, self.pool) end
  if self.b then
    local ops = {}
    for id, rec in pairs(self.inflight) do ops[#ops + 1] = {"release", id, rec.att} end
    self.b.cfg.connect_timeout = math.min(self.b.cfg.connect_timeout, broker.CONNECT_TIMEOUT)
    if #ops > 0 then pcall(self.b.ops, self.b, ops) end
    self.b:close()
  end
  broker.post_notice(cfg, self.prefix, self.wid, reason)
  local e = core.new_error("BrokenPoolError", "worker " .. self.wid .. " gave up: " .. reason)
  error(e, 0)
end

-- Runs the daemon: opts {broker =, namespace =, authkey = | authkey_file =,
-- processes =, lease = (claim lease of seconds before a task's own
-- lease counts, default 30), quiet =}.  Returns after a SIGTERM (see
-- stop), raises on an error.
function M.serve(opts)
  local fname = "luamp-worker"
  local key = broker.authkey(opts, fname)
  local cfg = broker.config(opts, fname)
  cfg.connect_timeout = opts.connect_timeout or math.huge  -- a daemon waits for its broker
  local ns = opts.namespace or "luamp"
  local prefix = "luamp:" .. ns .. ":"
  local n = opts.processes or core.cpu_count()
  local lease = opts.lease or 30
  local self = {
    key = key, prefix = prefix, b = false, quiet = opts.quiet,
    -- (prefetch: tasks claimed beyond those running, waiting in the
    -- local Pool's queue -- fewer round trips for tiny tasks; their
    -- leases are renewed as the running ones')
    inflight = {}, n = 0, slots = n + (opts.prefetch or 4 * n), dry = false,
    lease_ms = math.floor(lease * 1000), beat = math.max(lease / 3, 0.05),
    next_beat = 0, wid = nil,
  }
  local f = io.open("/etc/hostname")
  self.wid = (f and f:read("l") or "host") .. ":" .. core.getpid()
  if f then f:close() end
  -- (every command it will need checked first: a user that lacks one
  -- fails here, before it takes a task)
  local ok, err = pcall(function()
    self.b = broker.connect(cfg, prefix)
    self.b:op("check")
    -- (the notices of daemons that gave up are stale now that one serves)
    self.b:command({"DEL", prefix .. "notices"})
  end)
  if not ok then
    if err == "interrupted!" then error(err, 0) end
    give_up(self, cfg, err)
  end
  -- (caught before the local Pool starts; its workers start with the
  -- default again)
  core.set_signal("SIGTERM", "catch")
  local pool_mod = require "multiprocessing.pool"
  self.pool = pool_mod.Pool(n)
  log(self, "serving namespace %s with %d processes", ns, n)
  ok, err = pcall(function()
    while not core.signal_caught("SIGTERM") do step(self) end
  end)
  if not ok then
    if err == "interrupted!" then error(err, 0) end
    give_up(self, cfg, err)
  end
  stop(self)
end

-- The command line of luamp-worker.
function M.main(argv)
  local opts, i = {}, 1
  local usage = "usage: luamp-worker --broker URL --namespace NS --authkey-file F " ..
                "[--processes N] [--prefetch N] [--lease S] [--quiet]"
  while argv[i] do
    local a = argv[i]
    local function val()
      i = i + 1
      if argv[i] == nil then io.stderr:write(usage, "\n") os.exit(2) end
      return argv[i]
    end
    if a == "--broker" then opts.broker = val()
    elseif a == "--namespace" then opts.namespace = val()
    elseif a == "--authkey-file" then opts.authkey_file = val()
    elseif a == "--processes" then opts.processes = math.tointeger(tonumber(val()))
    elseif a == "--lease" then opts.lease = tonumber(val())
    elseif a == "--prefetch" then opts.prefetch = math.tointeger(tonumber(val()))
    elseif a == "--quiet" then opts.quiet = true
    elseif a == "--help" or a == "-h" then print(usage) os.exit(0)
    else io.stderr:write("luamp-worker: unknown argument ", a, "\n", usage, "\n") os.exit(2) end
    i = i + 1
  end
  if not opts.broker then io.stderr:write(usage, "\n") os.exit(2) end
  local ok, err = pcall(M.serve, opts)
  if ok then os.exit(0) end
  io.stderr:write("luamp-worker: ", tostring(err), "\n")
  os.exit(1)
end

return M
