-- multiprocessing.broker_pool: the Pool beyond one machine --
-- mp.Pool{broker = url, ...} -- with the local Pool's methods, its tasks
-- run by worker daemons (multiprocessing.broker_worker) on any host that
-- reaches the same Redis.  Results come back as the local Pool's
-- AsyncResult (a Future too), so callbacks, waits and futures.wait work
-- unchanged.  The keys, the server-side script and the envelopes are in
-- multiprocessing.broker.
--
-- Delivery is at least once: a task runs again when the host running it
-- vanished (its lease expired) or its local worker died, up to
-- max_attempts; then it fails with WorkerLostError and is dead-lettered.
-- Exactly one result per task reaches the caller: the server drops an ack
-- of a superseded attempt (the script's fence), and this side drops any
-- result of a task it no longer waits for.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local broker = require "multiprocessing.broker"
local proto = require "multiprocessing.pool_proto"
local results = require "multiprocessing.pool_results"

local raise, argerror, typeerror = util.raise, util.argerror, util.typeerror
local now, encode, decode, new_error = core.now, core.encode, core.decode, core.new_error
local new_job, finish, settle_chunk = results.new_job, results.finish, results.settle_chunk
local OK, FAILED = proto.OK, proto.FAILED
local unpack = table.unpack
local TRUSTED = {trusted = true}

local M = {}
-- What a worker must speak to run a task: the codec is luamp's, the
-- bytecode Lua's own -- its version, format and the sizes and byte order
-- of its numbers, the bytes of string.dump's header that lua_load checks.
-- It heads a task's signed payload as a line of text, so a worker of
-- another format refuses the task before it decodes a byte of it.
do
  local h = string.dump(function() end)
  local function hex(a, b)
    return (h:sub(a, b):gsub(".", function(c) return string.format("%02x", c:byte()) end))
  end
  M.FORMAT = string.format("%s/luamp-%s (bytecode %s-%s)", _VERSION, core.version,
                           hex(5, 6), hex(13, 16))
end

local Pool = {}
Pool.__index = Pool
Pool.__name = "BrokerPool"

local OPTIONS = {broker = true, namespace = true, authkey = true, authkey_file = true,
                 max_attempts = true, lease = true, result_ttl = true,
                 username = true, password = true, password_file = true,
                 connect_timeout = true, processes = true}

local BATCH = 500             -- tasks per pipelined round trip

local function positive(opts, k, default, fname)
  local v = opts[k]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v <= 0 then
    argerror(1, fname, k .. " must be a positive number, got " .. tostring(v))
  end
  return v
end

function M.Pool(opts, fname)
  fname = fname or "Pool"
  for k in pairs(opts) do
    if not OPTIONS[k] then argerror(1, fname, "unknown option '" .. tostring(k) .. "'") end
  end
  local key = broker.authkey(opts, fname)
  local cfg = broker.config(opts, fname)
  local ns = opts.namespace or "luamp"
  if type(ns) ~= "string" or not ns:match("^[%w_%-%.]+$") then
    argerror(1, fname, "namespace must be a name of letters, digits, _ - ., got " .. tostring(ns))
  end
  local max = positive(opts, "max_attempts", 3, fname)
  if math.type(max) ~= "integer" then max = math.floor(max) end
  local prefix = "luamp:" .. ns .. ":"
  local cid = broker.random_id()
  local self = setmetatable({
    _b = broker.connect(cfg, prefix), _key = key, _prefix = prefix, _cid = cid,
    _rkey = prefix .. "r:" .. cid, _seq = 0, _tasks = {}, _ntasks = 0,
    _max = max, _lease_ms = math.floor(positive(opts, "lease", 30, fname) * 1000),
    _ttl = math.floor(positive(opts, "result_ttl", 3600, fname)),
    _n = opts.processes or 4, _state = "RUN", _jobs = setmetatable({}, {__mode = "k"}),
    _pending = {}, _next_reap = 0, _pid = core.getpid(), _broken = false,
  }, Pool)
  -- (a worker daemon's notice from before this pool is about it only
  -- when recent: a daemon started with it that gave up at once; a
  -- daemon that starts serving clears them)
  self._since = broker.server_ms(self._b) - 60000
  return self
end

-- A forked child that uses its parent's Pool is a client of its own: a
-- new client id (so its results never land in the parent's list, nor the
-- parent's in its), none of the parent's tasks to wait for.
local function own(self)
  if self._pid == core.getpid() then return end
  self._pid = core.getpid()
  self._cid = broker.random_id()
  self._rkey = self._prefix .. "r:" .. self._cid
  self._tasks, self._ntasks, self._pending, self._seq = {}, 0, {}, 0
end

local function check_running_or_closed(self, fname)
  if getmetatable(self) ~= Pool then argerror(1, fname, "Pool expected") end
  if self._state == "TERMINATE" then raise("ValueError", "Pool is terminated") end
end

local function check_running(self, fname)
  if getmetatable(self) ~= Pool then argerror(1, fname, "Pool expected") end
  if self._broken then raise("BrokenPoolError", self._broken) end
  if self._state ~= "RUN" then raise("ValueError", "Pool not running") end
end

-- ---------------------------------------------------------------------------
-- Submitting: each task is a hash and an id on the queue, written in
-- batches (one round trip each); rec is what its result settles.

-- Runtime handles (local queues, locks, Values, Manager proxies...) work
-- only within this host's process tree: one in a task's function (its
-- upvalues) or arguments is refused here, naming where it sits, rather
-- than failing on a worker host.  Loaded modules and the globals travel
-- by name and are not walked.
local modules
local function check_portable(v, path, seen)
  local t = type(v)
  if t == "userdata" then
    local mt = getmetatable(v)
    local name = type(mt) == "table" and rawget(mt, "__name") or "userdata"
    raise("EncodeError", string.format("%s at %s is a runtime handle of this host; " ..
          "it cannot travel through a broker (use a broker Queue, or pass plain data)",
          tostring(name), path))
  elseif (t ~= "table" and t ~= "function") or seen[v] then
    return
  end
  seen[v] = true
  if t == "function" then
    -- (a C function travels by name: its upvalues stay here)
    if debug.getinfo(v, "S").what == "C" then return end
    for i = 1, math.huge do
      local name, uv = debug.getupvalue(v, i)
      if name == nil then break end
      if name ~= "_ENV" then
        check_portable(uv, path .. " upvalue '" .. (name ~= "" and name or "?") .. "'", seen)
      end
    end
    return
  end
  if not modules then
    modules = {[_G] = true}
    for _, m in pairs(package.loaded) do modules[m] = true end
  end
  if modules[v] then return end
  for k, x in next, v do
    local tx = type(x)
    if tx == "table" or tx == "function" or tx == "userdata" then
      check_portable(x, path .. "[" .. (type(k) == "string" and string.format("%q", k)
                                        or tostring(k)) .. "]", seen)
    end
  end
end

local function check_task(f, args, what)
  local seen = {}
  check_portable(f, "function", seen)
  check_portable(args, what, seen)
end

-- (one step for Ctrl-C: a task is on the books -- pending, awaited,
-- counted -- whole or not at all; a half-recorded one would be a hash
-- in Redis that nothing queues, or a task counted that never runs, for
-- join to wait on forever)
local function record(self, rec, id, env)
  local p = self._pending
  p[#p + 1] = {"HSET", self._prefix .. "t:" .. id, "env", env, "att", 0,
               "max", self._max, "lease", self._lease_ms, "ttl", self._ttl}
  p[#p + 1] = {"LPUSH", self._prefix .. "q", id}
  self._tasks[id] = rec
  self._ntasks = self._ntasks + 1
  if #p >= 2 * BATCH then self:_flush() end
end

function Pool:_add(rec, task)
  own(self)
  self._seq = self._seq + 1
  local id = self._cid .. "." .. self._seq
  local env = broker.sign_task(self._key, id, M.FORMAT .. "\n" .. encode(task))
  core.shielded(record, self, rec, id, env)
  return id
end

-- Writes the pending tasks: when this returns they are in Redis's
-- socket, and Redis queues them whatever this process does next.  Their
-- replies are read with the next exchange's (Broker:send), so a submit
-- costs no round trip; a connection lost before then writes them again
-- (a task queued twice runs at least once, never zero times; its second
-- result is dropped).  Shielded: the tasks leave the pending list only
-- into the broker's unconfirmed ones.
local function flush(self)
  local p = self._pending
  if #p == 0 then return end
  self._pending = {}          -- (the broker holds them until confirmed)
  self._b:send(p)
end

function Pool:_flush()
  own(self)
  if #self._pending > 0 then core.shielded(flush, self) end
end

local function check_fn(f, fname)
  if type(f) ~= "function" then typeerror(1, fname, "function", f) end
end

local function task_options(x, fname, argn)
  if x == nil then return {} end
  if type(x) == "function" then return {callback = x} end
  if type(x) == "number" then return {chunksize = x} end
  if type(x) ~= "table" then typeerror(argn, fname, "table, number or nil", x) end
  return x
end

function Pool:_apply_async(f, args, opts, fname)
  check_running(self, fname)
  check_fn(f, fname)
  if args == nil then args = {} end
  if type(args) ~= "table" then typeerror(2, fname, "table", args) end
  check_task(f, args, "args")
  local job = new_job(self, "apply", opts)
  self:_add(job, {m = "apply", f = f, a = args, n = args.n or #args, t = opts.timeout})
  self:_flush()
  return job
end

function Pool:apply_async(f, args, opts, error_callback)
  opts = task_options(opts, "apply_async", 3)
  if error_callback then
    opts = {callback = opts.callback, error_callback = error_callback, timeout = opts.timeout}
  end
  return self:_apply_async(f, args, opts, "apply_async")
end

function Pool:apply(f, args, opts)
  return self:_apply_async(f, args, task_options(opts, "apply", 3), "apply"):get()
end

-- (futures.ProcessPoolExecutor's submit)
function Pool:_submit_future(f, args, n, timeout)
  args.n = n
  return self:_apply_async(f, args, {timeout = timeout}, "submit")
end

local function collect(iterable, fname)
  if type(iterable) == "function" then
    local items, n = {}, 0
    for v in iterable do n = n + 1 items[n] = v end
    return items, n
  end
  if type(iterable) ~= "table" then
    argerror(2, fname, "iterable must be a table or an iterator function, got " ..
             util.typename(iterable))
  end
  return iterable, iterable.n or #iterable
end

-- Chunks big enough that a map of a million tiny items is a few
-- thousand tasks, small enough that several hosts share a short one.
local function default_chunksize(n)
  return math.max(1, math.min(1000, (n + 127) // 128))
end

-- Submits items[1..n] in chunks; rec_of(first, count, chunk) makes each
-- chunk's record.
function Pool:_chunks(f, mode, items, n, chunksize, timeout, rec_of)
  local chunk = 0
  for first = 1, n, chunksize do
    local last = math.min(first + chunksize - 1, n)
    chunk = chunk + 1
    self:_add(rec_of(first, last - first + 1, chunk),
              {m = mode, f = f, a = table.move(items, first, last, 1, {}),
               n = last - first + 1, t = timeout})
  end
  self:_flush()
  return chunk
end

function Pool:_map_async(f, iterable, opts, mode, fname)
  check_running(self, fname)
  check_fn(f, fname)
  opts = task_options(opts, fname, 3)
  local items, n = collect(iterable, fname)
  if mode == "starmap" then
    for i = 1, n do
      if type(items[i]) ~= "table" then
        argerror(2, fname, string.format("item %d of iterable must be a table of arguments", i))
      end
    end
  end
  local cs = opts.chunksize or default_chunksize(n)
  if math.type(cs) ~= "integer" or cs < 1 then
    raise("ValueError", "Chunksize must be 1+, not " .. tostring(cs))
  end
  check_task(f, items, "iterable")
  local job = new_job(self, "map", opts)
  job._results = {n = n}
  job._left, job._items_done = 0, 0
  if opts.progress then
    -- (the local Pool's bar, on stderr when it is a terminal)
    job._progress = require("multiprocessing.progress").new(n)
  end
  job._left = self:_chunks(f, mode, items, n, cs, opts.timeout, function(first, count, chunk)
    return {job, first, count, chunk}
  end)
  if job._left == 0 then
    job._ok, job._value = true, job._results
    finish(job)
  end
  return job
end

local function with_callbacks(opts, callback, error_callback, fname)
  opts = task_options(opts, fname, 3)
  if callback or error_callback then
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.callback, o.error_callback = callback or o.callback, error_callback or o.error_callback
    return o
  end
  return opts
end

function Pool:map_async(f, it, opts, cb, ecb)
  return self:_map_async(f, it, with_callbacks(opts, cb, ecb, "map_async"), "map", "map_async")
end
function Pool:map(f, it, opts)
  return self:_map_async(f, it, opts, "map", "map"):get()
end
function Pool:starmap_async(f, it, opts, cb, ecb)
  return self:_map_async(f, it, with_callbacks(opts, cb, ecb, "starmap_async"), "starmap",
                         "starmap_async")
end
function Pool:starmap(f, it, opts)
  return self:_map_async(f, it, opts, "starmap", "starmap"):get()
end

-- imap / imap_unordered: for i, v in pool:imap(f, xs) do ... end; every
-- chunk is submitted at once, results are yielded as (index, value) in
-- order (imap) or as their chunks come (imap_unordered).
function Pool:_imap(f, iterable, opts, ordered, fname)
  check_running(self, fname)
  check_fn(f, fname)
  opts = task_options(opts, fname, 3)
  local items, n = collect(iterable, fname)
  local cs = opts.chunksize or 1
  check_task(f, items, "iterable")
  local it = {done = {}, arrived = {}, firsts = {}}
  local nchunks = self:_chunks(f, "map", items, n, cs, opts.timeout,
    function(first, count, chunk)
      it.firsts[chunk] = first
      return {imap = it, first = first, count = count, chunk = chunk}
    end)
  local k, j, cur = 0, 0, nil       -- chunks taken, item in chunk, chunk
  return function()
    while true do
      if cur and j < cur.count then
        j = j + 1
        return cur.first + j - 1, cur.values[j]
      end
      if k >= nchunks then return nil end
      local c
      if ordered then
        while not it.done[k + 1] do self:_pump(nil) end
        c = it.done[k + 1]
      else
        while #it.arrived == 0 do self:_pump(nil) end
        c = table.remove(it.arrived, 1)
      end
      k = k + 1
      if not c.ok then error(c.err, 0) end
      cur, j = c, 0
    end
  end
end

function Pool:imap(f, it, opts) return self:_imap(f, it, opts, true, "imap") end
function Pool:imap_unordered(f, it, opts) return self:_imap(f, it, opts, false, "imap_unordered") end

-- ---------------------------------------------------------------------------
-- Results: taken from this client's list, checked, settled.

local function settle(self, rec, status, a, b)
  if rec.imap then
    local c = {first = rec.first, count = rec.count, ok = status == OK}
    if status == OK then c.values = b else c.err = a end
    rec.imap.done[rec.chunk] = c
    rec.imap.arrived[#rec.imap.arrived + 1] = c
  elseif rec._kind == "apply" then
    if rec._done then return end
    rec._ok = status == OK
    rec._value = status == OK and b or {0, FAILED, a}
    finish(rec)
  elseif not rec[1]._done then
    if status == OK then settle_chunk(rec, OK, a, b)
    else settle_chunk(rec, FAILED, a, nil, 0) end
  end
end

function Pool:_fail(id, kind, msg)
  local rec = self._tasks[id]
  if not rec then return end
  self._tasks[id] = nil
  self._ntasks = self._ntasks - 1
  settle(self, rec, FAILED, new_error(kind, msg, {task = id}))
end

-- A worker daemon of this namespace gave up (its notice: "ms|worker|
-- reason", plain text from Redis, shown and never decoded): as Python's
-- BrokenProcessPool, every task this pool waits for fails with
-- BrokenPoolError naming the worker and the reason, its tasks leave
-- Redis (a host that holds one finishes it, its result fenced out), and
-- the pool takes no more.
function Pool:_break(notice)
  local wid, reason = notice:match("^%d+|([^|]*)|(.*)$")
  local function printable(x) return (tostring(x):sub(1, 400):gsub("[^%g ]", "?")) end
  local msg = string.format("worker %s gave up: %s -- the pool is broken, its tasks " ..
                            "cannot run", printable(wid), printable(reason))
  self._broken = msg
  local cmds, ids = {}, {}
  for id in pairs(self._tasks) do
    ids[#ids + 1] = id
    cmds[#cmds + 1] = {"DEL", self._prefix .. "t:" .. id}
    cmds[#cmds + 1] = {"ZREM", self._prefix .. "leases", id}
  end
  if #cmds > 0 then pcall(self._b.pipeline, self._b, cmds, 5) end
  core.shielded(function()
    for _, id in ipairs(ids) do self:_fail(id, "BrokenPoolError", msg) end
  end)
end

function Pool:_entry(entry)
  local tag, id, att, payload = broker.open_result(self._key, entry)
  if tag == nil then
    io.stderr:write("luamp broker: dropped a malformed result entry\n")
    return
  end
  if tag == "D" then
    local kind = payload:match("^rejected") and "AuthenticationError" or "WorkerLostError"
    return self:_fail(id, kind, string.format("task %s failed after %s attempt(s) (%s); " ..
                      "it is in the dead-letter list", id, att, payload))
  end
  if payload == nil then
    self._b:command({"RPUSH", self._prefix .. "dead", id .. "|" .. att ..
                     "|result failed its signature check"})
    return self:_fail(id, "AuthenticationError", "the result of task " .. id ..
                      " failed its signature check (wrong authkey or tampered)")
  end
  local rec = self._tasks[id]
  if not rec then return end            -- a duplicate: the first one won
  self._tasks[id] = nil
  self._ntasks = self._ntasks - 1
  local ok, r = pcall(decode, payload, TRUSTED)
  if not ok then
    return settle(self, rec, FAILED, new_error("DecodeError", "result of task " .. id ..
                  ": " .. tostring(r)))
  end
  settle(self, rec, r[1], r[2], r[3])
end

-- Takes the results there are; waits until deadline (now()-based; nil:
-- until one comes; 0: not at all) for one when there are none.  Nothing
-- is popped before it is recorded: the entries are read (LRANGE), settled,
-- then trimmed off -- this client is its list's only reader and producers
-- only append, so LTRIM k -1 drops exactly the k read.  A Ctrl-C (or a
-- lost connection) anywhere in between leaves them to be read again, and
-- a second reading is dropped as a duplicate.  The wait itself is a
-- BLMOVE of the list onto itself, which pops nothing either.
function Pool:_pump(deadline)
  self:_flush()
  local b, rkey = self._b, self._rkey
  if now() >= self._next_reap then
    self._next_reap = now() + 1
    local r = b:op("reap", self._since)
    if type(r) == "table" and r[2] and not self._broken then return self:_break(r[#r]) end
  end
  local got
  if deadline == 0 then
    got = b:command({"LRANGE", rkey, 0, 999}, 30)
  else
    -- (one round trip: the BLMOVE returns at once when there are
    -- results, else when one comes or at t; the server runs the LRANGE
    -- right after it)
    local t = deadline and deadline - now() or 1
    t = math.max(0.01, math.min(t, 1))
    local rs = b:pipeline({{"BLMOVE", rkey, rkey, "LEFT", "LEFT", string.format("%.3f", t)},
                           {"LRANGE", rkey, 0, 999}}, t + 30)
    for i = 1, 2 do
      if core.is_error(rs[i]) then error(rs[i], 0) end
    end
    got = rs[2]
  end
  if #got > 0 then
    -- (each result recorded whole: Ctrl-C cannot land between taking
    -- its task off the books and settling its job)
    core.shielded(function()
      for i = 1, #got do self:_entry(got[i]) end
    end)
    b:command({"LTRIM", rkey, #got, -1}, 30)
  end
end

local unarm, arm    -- (below, with the event-loop fd)
function Pool:poll()
  unarm(self)
  self:_pump(0)
  -- (re-armed for a loop that watches the fd without asking again)
  if self._w and self._state ~= "TERMINATE" then arm(self) end
end

-- Event loops: the fd is a second Redis connection's, with a BLMOVE of
-- this client's result list onto itself pending on it (it pops
-- nothing): readable when a result arrives, or when the BLMOVE's own
-- timeout -- at most the second between two reaps of expired leases --
-- ends it.  fileno() only arms it; poll() takes the BLMOVE's reply when
-- the fd is readable and then collects the results without waiting.
local function watch(self)
  local w = self._w
  if not w or w.pid ~= core.getpid() then
    w = broker.connect(self._b.cfg, self._prefix)
    self._w, self._warmed = w, false
  end
  return w
end

function arm(self)
  local w = watch(self)
  if not w.r then                     -- (lost: its BLMOVE went with it)
    w.unconf, w.written, self._warmed = {}, 0, false
  end
  if not self._warmed then
    local t = math.max(0.01, math.min(self._next_reap - now(), 1))
    w:send({{"BLMOVE", self._rkey, self._rkey, "LEFT", "LEFT", string.format("%.3f", t)}})
    self._warmed = true
  end
  return w.r:fileno()
end

function Pool:fileno()
  check_running_or_closed(self, "fileno")
  own(self)
  return arm(self)
end
Pool.pollfd = Pool.fileno
function Pool:events() return "r" end
-- (the seconds until poll() is due anyway: the next reap)
function Pool:timeout()
  return math.max(self._next_reap - now(), 0)
end

-- Takes the watch's reply when it has come (never waits for it).
function unarm(self)
  local w = self._w
  if not (self._warmed and w and w.pid == core.getpid() and w.r) then return end
  if #core.wait_fds({w.r:fileno()}, 0) == 0 then return end
  self._warmed = false
  w:_run(true, nil)
end

-- (futures.wait / as_completed over this and local pools: this pool has
-- no fd to wait on -- its results come by BLPOP -- so the wait on the
-- others' fds is cut into slices of 20 ms, between which it is pumped)
function Pool:_wait_set()
  return now() + 0.02
end

-- ---------------------------------------------------------------------------
-- Futures' needs: running (unknown here: a task is running or queued on
-- some host), cancel (drops the task from Redis if no host took it).

function Pool:_running() return false end

function Pool:_cancel_jobs(jobs)
  local set = {}
  for _, j in ipairs(jobs) do set[j] = true end
  local cmds, ids = {}, {}
  for id, rec in pairs(self._tasks) do
    if set[rec] or set[rec[1]] then
      ids[#ids + 1] = id
      cmds[#cmds + 1] = {"LREM", self._prefix .. "q", 0, id}
    end
  end
  if #cmds == 0 then return end
  self:_flush()
  local replies = self._b:pipeline(cmds, 30)
  for i, id in ipairs(ids) do
    if replies[i] == 1 then
      local rec = self._tasks[id]
      self._tasks[id] = nil
      self._ntasks = self._ntasks - 1
      self._b:command({"DEL", self._prefix .. "t:" .. id})
      local job = rec._kind and rec or rec[1]
      job:_set_cancelled()
    end
  end
end

function Pool:_cancel_pending()
  local jobs = {}
  for _, rec in pairs(self._tasks) do jobs[#jobs + 1] = rec._kind and rec or rec[1] end
  self:_cancel_jobs(jobs)
end

function Pool:close()
  if self._state == "RUN" then self._state = "CLOSE" end
end

-- Waits for every task submitted (after close, as Python's).
function Pool:join()
  if self._state == "RUN" then raise("ValueError", "Pool is still running") end
  while self._ntasks > 0 and self._state ~= "TERMINATE" do self:_pump(nil) end
end

-- Stops waiting; the tasks not taken yet are deleted (a host running one
-- finishes it, its result fenced out).
function Pool:terminate()
  if self._state == "TERMINATE" then return end
  self._state = "TERMINATE"
  local cmds = {}
  for id in pairs(self._tasks) do
    cmds[#cmds + 1] = {"DEL", self._prefix .. "t:" .. id}
    cmds[#cmds + 1] = {"ZREM", self._prefix .. "leases", id}
  end
  self._tasks, self._ntasks, self._pending = {}, 0, {}
  pcall(function()
    if #cmds > 0 then self._b:pipeline(cmds, 5) end
    self._b:command({"DEL", self._rkey}, 5)
  end)
  self._b:close()
  if self._w then self._w:close() end
end

Pool.__close = Pool.terminate
Pool.__tostring = function(self)
  return string.format("<Pool broker %s state=%s>", self._prefix, self._state)
end

return M
