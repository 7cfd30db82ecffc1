-- multiprocessing.futures: Python's concurrent.futures over the Pool.
--
-- An executor is a Pool with the Executor's manners: submit(fn, ...)
-- returns the Pool's own AsyncResult, which carries the Future methods
-- (result, exception, done, running, cancel, add_done_callback: see
-- pool.lua), so a user meets one result type whether it came from
-- pool:apply_async or ex:submit, and wait/as_completed take both.
--
-- What the Pool gives the executor beyond Python's: a dead worker fails
-- only the futures it held (WorkerLostError) instead of breaking the
-- executor; a per-task timeout (ex:submit_with{timeout = s}); a running
-- future can be stopped (cancel{force = true} kills and replaces its
-- worker).
--
-- No threads here either: results are collected, done callbacks run and
-- dead workers are replaced while the owner is inside a call of this
-- module or of the pool (result, wait, as_completed, a map loop, done,
-- ex:poll...).  Waiting on futures of several executors waits on all
-- their result queues and worker sentinels at once.
local core = require "multiprocessing.core"
local pool_mod = require "multiprocessing.pool"
local connection = require "multiprocessing.connection"

local proto = require "multiprocessing.pool_proto"

local AsyncResult = pool_mod.AsyncResult
local raise, now = core.raise, core.now
local pack = table.pack
local rawmt, setmt = debug.getmetatable, debug.setmetatable
local upvalues_same = core.upvalues_same
local getpid = core.pid or core.getpid
local FLAT_MAX, APPLYV = proto.FLAT_MAX, proto.APPLYV

local M = {
  FIRST_COMPLETED = "FIRST_COMPLETED",
  FIRST_EXCEPTION = "FIRST_EXCEPTION",
  ALL_COMPLETED = "ALL_COMPLETED",
  Future = AsyncResult,
}

local RETURN_WHEN = {FIRST_COMPLETED = true, FIRST_EXCEPTION = true,
                     ALL_COMPLETED = true}

local argerror = require("multiprocessing.util").argerror

-- (what a bad value was: a number shows itself, else its type)
local function shown(v)
  if type(v) ~= "number" then return type(v) end
  return v ~= v and "NaN" or tostring(v)
end

local function check_timeout(t, n, fname)
  if t ~= nil and (type(t) ~= "number" or t ~= t or t < 0) then
    argerror(n, fname, "timeout must be a non-negative number, got " .. shown(t))
  end
end

local function check_options(opts, n, fname, known)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    argerror(n, fname, "table expected, got " .. type(opts))
  end
  for k in pairs(opts) do
    if not known[k] then argerror(n, fname, "unknown option '" .. tostring(k) .. "'") end
  end
  return opts
end

-- ---------------------------------------------------------------------------
-- ProcessPoolExecutor

local Executor = {}
Executor.__index = Executor
Executor.__name = "ProcessPoolExecutor"

local EXECUTOR_OPTIONS = {max_workers = true, initializer = true, initargs = true,
                          max_tasks_per_child = true}

function M.ProcessPoolExecutor(opts)
  if type(opts) == "table" and opts.broker ~= nil then
    -- the same executor over a broker's Pool (multiprocessing.broker_pool)
    local o = {}
    for k, v in pairs(opts) do if k ~= "max_workers" then o[k] = v end end
    o.processes = opts.max_workers
    local pool = require("multiprocessing.broker_pool").Pool(o, "ProcessPoolExecutor")
    return setmetatable({_pool = pool, _shutdown = false}, Executor)
  end
  local n, o = opts, {}
  if type(opts) == "table" then
    o = check_options(opts, 1, "ProcessPoolExecutor", EXECUTOR_OPTIONS)
    n = o.max_workers
  elseif opts ~= nil and type(opts) ~= "number" then
    argerror(1, "ProcessPoolExecutor", "number or table expected, got " .. type(opts))
  end
  if n ~= nil and (math.tointeger(n) == nil or n < 1) then
    raise("ValueError", "max_workers must be an integer greater than 0")
  end
  if o.initargs ~= nil and type(o.initargs) ~= "table" then
    raise("ValueError", "initargs must be a table")
  end
  if o.max_tasks_per_child ~= nil and (math.tointeger(o.max_tasks_per_child) == nil
                                       or o.max_tasks_per_child < 1) then
    raise("ValueError", "max_tasks_per_child must be a positive integer")
  end
  local pool = pool_mod.Pool{processes = n, initializer = o.initializer,
                             initargs = o.initargs,
                             maxtasksperchild = o.max_tasks_per_child}
  return setmetatable({_pool = pool, _shutdown = false}, Executor)
end

local function check_self(self, fname)
  if rawmt(self) ~= Executor then
    argerror(1, fname, "ProcessPoolExecutor expected, got " .. type(self))
  end
end

local function check_submit(self, fn, n, fname)
  check_self(self, fname)
  if type(fn) ~= "function" then
    argerror(n, fname, "function expected, got " .. type(fn))
  end
  if self._shutdown then
    raise("ValueError", "cannot schedule new futures after shutdown")
  end
end

-- ex:submit(fn, ...): fn(...) in a worker; every argument is kept, nils
-- included.
function Executor:submit(fn, ...)
  if rawmt(self) == Executor and not self._shutdown then
    -- The common call -- a function submitted before, whose encoding is
    -- stored and unchanged, a running pool of this process -- puts its
    -- task here, as Pool:_submit_args would (a function in _fcache was
    -- checked when first submitted).  Not through _submit_args: its
    -- vararg call, select's and type's C calls and new_apply's call were
    -- ~1k of the owner's ~17k instructions of a round trip (callgrind).
    -- The job is new_apply's (pool_results.lua): 4 fields, the rest
    -- the class's; debug.setmetatable, as the table is new: setmetatable
    -- looks for a __metatable field first (~150 instructions).
    local pool = self._pool
    local c = pool._fcache
    c = c and c[fn]
    if c and c.ref and pool._state == "RUN" and (c.fixed or upvalues_same(fn, c.snap))
       and pool._owner == getpid() then
      local n = select("#", ...)
      if n <= FLAT_MAX then
        local tag, ref = pool._tag, c.ref
        local job = setmt({_pool = pool, _tag = tag, _done = false,
                           _value = false}, AsyncResult)
        local ok, err = pcall(pool._put, pool._tq, tag, tag, ref[1], APPLYV, false,
                              n, false, ref[2], ...)
        if not ok then error(pool._rename_path(err, APPLYV, 1), 0) end
        pool._tag, pool._tasks[tag] = tag + 1, job
        return job
      end
    end
  end
  if rawmt(self) ~= Executor or type(fn) ~= "function" or self._shutdown then
    check_submit(self, fn, 1, "submit")
  end
  local pool = self._pool
  -- (a broker's pool takes the arguments packed)
  if pool._submit_args then return pool:_submit_args(fn, nil, select("#", ...), ...) end
  return pool:_submit_future(fn, pack(...), select("#", ...))
end

local SUBMIT_OPTIONS = {timeout = true}

-- ex:submit_with({timeout = s}, fn, ...): submit with per-task options.
function Executor:submit_with(opts, fn, ...)
  opts = check_options(opts, 1, "submit_with", SUBMIT_OPTIONS)
  check_submit(self, fn, 2, "submit_with")
  local t = opts.timeout
  if t ~= nil and (type(t) ~= "number" or t ~= t or t < 0) then
    argerror(1, "submit_with", "timeout must be a non-negative number, got " .. shown(t))
  end
  local pool = self._pool
  if pool._submit_args then return pool:_submit_args(fn, t, select("#", ...), ...) end
  return pool:_submit_future(fn, pack(...), select("#", ...), t)
end

local MAP_OPTIONS = {timeout = true, chunksize = true, task_timeout = true}

-- for i, v in ex:map(fn, iterable [, {timeout =, chunksize =,
-- task_timeout =}]): every item is submitted at once (as Python's map
-- does), results come in order.  timeout counts from the call (Python's);
-- task_timeout is each task's own.  Leaving the loop early cancels the
-- items not started.
function Executor:map(fn, iterable, opts)
  check_submit(self, fn, 1, "map")
  opts = check_options(opts, 2, "map", MAP_OPTIONS)
  check_timeout(opts.timeout, 2, "map")
  local tt = opts.task_timeout
  if tt ~= nil and (type(tt) ~= "number" or tt ~= tt or tt < 0) then
    argerror(2, "map", "task_timeout must be a non-negative number, got " .. shown(tt))
  end
  local cs = opts.chunksize or 1
  if math.type(cs) ~= "integer" or cs < 1 then
    raise("ValueError", "chunksize must be an integer of 1 or more, not " .. tostring(cs))
  end
  local items, n
  if type(iterable) == "table" then
    items, n = iterable, iterable.n or #iterable
  elseif type(iterable) == "function" then
    items, n = {}, 0
    for v in iterable do n = n + 1 items[n] = v end
  else
    argerror(2, "map", "table or function expected, got " .. type(iterable))
  end
  local deadline = opts.timeout and now() + opts.timeout
  local pool = self._pool
  local fs = {}
  local ok, err = pcall(function()
    if cs == 1 then
      for i = 1, n do fs[i] = pool:_submit_future(fn, {items[i]}, 1, tt) end
    else
      for first = 1, n, cs do
        local last = math.min(first + cs - 1, n)
        fs[#fs + 1] = pool:map_async(fn, table.move(items, first, last, 1, {n = last - first + 1}),
                                     {chunksize = cs, timeout = tt})
      end
    end
  end)
  if not ok then
    pool:_cancel_jobs(fs, false, true)
    error(err, 0)
  end
  local i, k, chunk = 0, 0, nil       -- item, future, chunk results
  local finished = false
  local function iter()
    if i >= n then finished = true return nil end
    i = i + 1
    if cs == 1 then
      local t = deadline and math.max(deadline - now(), 0)
      -- (the future leaves fs once it gave its result: one that timed
      -- out is still cancelled by the closer)
      local v = fs[i]:result(t)
      fs[i] = nil
      return i, v
    end
    if not chunk or (i - 1) % cs == 0 then
      local t = deadline and math.max(deadline - now(), 0)
      chunk = fs[k + 1]:result(t)
      k = k + 1
      fs[k] = nil
    end
    return i, chunk[(i - 1) % cs + 1]
  end
  local closer = setmetatable({}, {__close = function()
    if not finished then
      local left = {}
      for _, f in pairs(fs) do left[#left + 1] = f end
      pool:_cancel_jobs(left, false, true)
    end
  end})
  return iter, nil, nil, closer
end

local SHUTDOWN_OPTIONS = {cancel_futures = true}

-- ex:shutdown([wait [, {cancel_futures = true}]]): no new futures; with
-- cancel_futures those not started are cancelled; with wait (the default)
-- returns once every future is done and the workers are gone.
function Executor:shutdown(wait, opts)
  check_self(self, "shutdown")
  if wait ~= nil and type(wait) ~= "boolean" then
    argerror(1, "shutdown", "boolean expected, got " .. type(wait))
  end
  opts = check_options(opts, 2, "shutdown", SHUTDOWN_OPTIONS)
  if wait == nil then wait = true end
  local pool = self._pool
  self._shutdown = true
  if opts.cancel_futures then pool:_cancel_pending() end
  pool:close()
  if wait then pool:join() end
end

-- ex:poll(): collects finished results and runs their callbacks without
-- waiting.
function Executor:poll()
  check_self(self, "poll")
  self._pool:poll()
end

-- Event loops: ex:fileno() is its pool's fd, readable whenever the
-- executor has something to do (a future's result came, a worker died, a
-- task's deadline passed); ex:poll() then does it without waiting and
-- runs the done callbacks.  pollfd, events and timeout: the cqueues
-- protocol, so cqueues.poll(ex) works.
function Executor:fileno()
  check_self(self, "fileno")
  if self._pool._released then
    raise("ValueError", "the executor is shut down and its workers are gone")
  end
  return self._pool:fileno()
end
Executor.pollfd = Executor.fileno
function Executor:events()
  check_self(self, "events")
  return self._pool:events()
end
function Executor:timeout()
  check_self(self, "timeout")
  return self._pool:timeout()
end

Executor.__close = function(self) self:shutdown(true) end
Executor.__tostring = function(self)
  return string.format("<ProcessPoolExecutor max_workers=%d%s>", self._pool._n,
                       self._shutdown and " shutdown" or "")
end

-- ---------------------------------------------------------------------------
-- Waiting for several futures

-- The distinct futures of fs, in their order; raises at the caller's
-- caller for a value that is not one.
local function futures_of(fs, fname)
  if type(fs) ~= "table" then
    argerror(1, fname, "table of futures expected, got " .. type(fs))
  end
  local list, seen = {}, {}
  for i = 1, fs.n or #fs do
    local f = fs[i]
    if getmetatable(f) ~= AsyncResult or f._kind == "imap" then
      argerror(1, fname, string.format("item %d is not a future (%s)", i,
               f == nil and "nil" or tostring(f)))
    end
    if not seen[f] then
      seen[f] = true
      list[#list + 1] = f
    end
  end
  return list
end

-- The distinct pools of the unfinished futures of list, each pumped once
-- without waiting (so what is there now is collected).
local function pools_of(list)
  local pools, seen = {}, {}
  for _, f in ipairs(list) do
    local p = f._pool
    if not f._done and not seen[p] then
      seen[p] = true
      pools[#pools + 1] = p
    end
  end
  for _, p in ipairs(pools) do p:_pump(0) end
  return pools
end

-- Makes progress on the pools: takes results (running done callbacks),
-- replaces dead workers; blocks until something happens or the deadline
-- (nil: no deadline).
local function progress(pools, deadline)
  if #pools == 1 then
    pools[1]:_pump(deadline)
    return
  end
  for _, p in ipairs(pools) do p:_pump(0) end
  local objs, wake = {}, deadline
  for _, p in ipairs(pools) do
    local due = p:_wait_set(objs)
    if due and (not wake or due < wake) then wake = due end
  end
  if #objs == 0 then return end
  connection.wait(objs, wake and math.max(wake - now(), 0) or nil)
  for _, p in ipairs(pools) do p:_pump(0) end
end

-- for f in futures.as_completed(fs [, timeout]): each future once, as it
-- completes (those already done first); TimeoutError when some are not
-- done by timeout seconds from the call.
function M.as_completed(fs, timeout)
  local list = futures_of(fs, "as_completed")
  check_timeout(timeout, 2, "as_completed")
  local deadline = timeout and now() + timeout
  local waiter, pos = {}, 1
  -- (what is there now is collected before the first future is yielded)
  local pools = pools_of(list)
  for _, f in ipairs(list) do f:_add_waiter(waiter) end
  local total = #list
  return function()
    if pos > total then return nil end
    while waiter[pos] == nil do
      if deadline and now() >= deadline then
        raise("TimeoutError", string.format("%d (of %d) futures unfinished",
              total - pos + 1, total))
      end
      progress(pools, deadline)
    end
    local f = waiter[pos]
    waiter[pos] = false
    pos = pos + 1
    return f
  end
end

local WAIT_OPTIONS = {timeout = true, return_when = true}

-- done, not_done = futures.wait(fs [, {timeout =, return_when =}]): two
-- sequences of the distinct futures of fs, in their order.
function M.wait(fs, opts)
  local list = futures_of(fs, "wait")
  opts = check_options(opts, 2, "wait", WAIT_OPTIONS)
  check_timeout(opts.timeout, 2, "wait")
  local when = opts.return_when or "ALL_COMPLETED"
  if not RETURN_WHEN[when] then
    argerror(2, "wait", "return_when must be FIRST_COMPLETED, FIRST_EXCEPTION " ..
             "or ALL_COMPLETED, got " .. tostring(when))
  end
  local deadline = opts.timeout and now() + opts.timeout
  local pools = pools_of(list)
  local waiter = {}
  for _, f in ipairs(list) do f:_add_waiter(waiter) end
  local seen = 0
  local function satisfied()
    if #waiter == #list then return true end
    if when == "FIRST_COMPLETED" then return #waiter > 0 end
    if when == "FIRST_EXCEPTION" then
      for i = seen + 1, #waiter do
        local f = waiter[i]
        if not f._ok and not f._cancelled then return true end
      end
      seen = #waiter
    end
    return false
  end
  while not satisfied() do
    if deadline and now() >= deadline then break end
    progress(pools, deadline)
  end
  local done, not_done = {}, {}
  for _, f in ipairs(list) do
    if f._done then done[#done + 1] = f else not_done[#not_done + 1] = f end
  end
  return done, not_done
end

return M
