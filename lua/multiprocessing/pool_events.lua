-- multiprocessing.pool_events: the Pool's methods for
-- multiprocessing.futures (submit one call, cancel, wait on several pools)
-- and for event loops (pool:fileno(), the cqueues protocol).
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local proto = require "multiprocessing.pool_proto"
local results = require "multiprocessing.pool_results"
local Pool = require "multiprocessing.pool_owner"

local now = core.now
local getpid = core.pid or core.getpid
local raise = util.raise
local APPLY, SLICE, FLAT_MAX = proto.APPLY, proto.SLICE, proto.FLAT_MAX
local APPLYV = proto.APPLYV
local upvalues_same = core.upvalues_same
local new_apply = results.new_apply
local check_running = Pool._check_running

-- ---------------------------------------------------------------------------
-- Support for multiprocessing.futures

-- Submits f(table.unpack(args, 1, n)) as one future; the job keeps its
-- tag, so cancelling it needs no search of the task records.
function Pool:_submit_future(f, args, n, timeout)
  check_running(self)
  local fref = self:_fref(f)
  local job = new_apply(self, self._tag)
  self:_submit(job, fref, APPLY, args, n, 1, timeout)
  return job
end

-- The same for f(...) with its n arguments given as they are (an
-- executor's submit: no table packed for them when they travel as the
-- task's own items).
function Pool:_submit_args(f, timeout, n, ...)
  -- the common call -- no timeout, a function whose encoding is stored
  -- and unchanged, a running pool -- puts the task here, as apply_async
  -- does (no check_running, _fref, _put_apply and book: four calls, one
  -- of them a vararg one)
  local c = self._fcache[f]
  if c and c.ref and not timeout and n <= FLAT_MAX and self._state == "RUN" and
     (c.fixed or upvalues_same(f, c.snap)) and self._owner == getpid() then
    local tag, ref = self._tag, c.ref
    local job = new_apply(self, tag)
    local ok, err = pcall(self._put, self._tq, tag, tag, ref[1], APPLYV, false,
                          n, false, ref[2], ...)
    if not ok then error(self._rename_path(err, APPLYV, 1), 0) end
    self._tag, self._tasks[tag] = tag + 1, job
    return job
  end
  check_running(self)
  local fref = self:_fref(f)
  local job = new_apply(self, self._tag)
  if n > FLAT_MAX then
    self:_submit(job, fref, APPLY, table.pack(...), n, 1, timeout)
  else
    self:_put_apply(job, fref, timeout, n, ...)
  end
  return job
end

local job_of = Pool._job_of

-- Whether a worker holds one of job's tasks now (a worker's slot keeps the
-- tag of the task it took last; a task whose reply came is off the books).
function Pool:_running(job)
  if self._owner ~= getpid() or self._released then return false end
  self:_drain()
  if job._done then return false end
  for slot in pairs(self._workers) do
    local tag = self._tq:_taken(slot)
    if tag and job_of(self._tasks[tag]) == job then return true end
  end
  return false
end

-- Every unfinished job that no worker runs now, cancelled.
function Pool:_cancel_pending()
  local jobs, seen = {}, {}
  for _, rec in pairs(self._tasks) do
    local job = job_of(rec)
    if job and not seen[job] and job._kind ~= "imap" then
      seen[job] = true
      jobs[#jobs + 1] = job
    end
  end
  self:_cancel_jobs(jobs, false, true)
end

-- What to wait for when waiting on several pools at once: appends the
-- result queue and the workers' sentinels to objs; returns the time by
-- which the pool must be pumped again (tasks with deadlines), or nil.
function Pool:_wait_set(objs)
  if self._owner ~= getpid() or self._released or next(self._workers) == nil then
    return nil
  end
  objs[#objs + 1] = self._rq
  for _, w in pairs(self._workers) do objs[#objs + 1] = w.sentinel end
  if (self._timed or 0) > 0 then return now() + SLICE end
  return nil
end

-- ---------------------------------------------------------------------------
-- Event loops: pool:fileno(), and the cqueues protocol
--
-- One fd (an EventSet: epoll over the result queue's fileno() pipe, the
-- workers' sentinels and a timerfd) that is readable while the pool has
-- something to do: a result came, a worker died, a task's deadline
-- passed.  The host loop then calls pool:poll(), which does it without
-- waiting and re-arms the set.
--
-- Arming (_ev_arm) only registers what there is to watch and never does
-- the work: fileno() and pollfd() arm (cqueues calls pollfd at every
-- cqueues.poll), and a death or deadline they handled there would run
-- its callback with no wake-up left for the loop -- the loop would sleep
-- on a quiet fd while the work it waits for was done behind its back.
-- So every condition stays visible on the fd until poll() deals with it:
-- a dead worker's sentinel stays in the set until poll() replaced the
-- worker, the timer stays at an overdue deadline until poll() killed the
-- task, and arming the result queue looks at it after registering (a put
-- between a drain and the re-arm is not missed).

-- The earliest deadline of a task that a worker runs now (a past one when
-- it is overdue: the timer then fires at once); kills nothing.
local function next_due(self)
  local due
  for slot, w in pairs(self._workers) do
    local tag = self._started[slot + 1]
    local timeout = tag >= 0 and self._tasks[tag] and self._timeouts[tag]
    if timeout and not w.killed_for then
      local d = self._starts[slot + 1] + timeout
      if not due or d < due then due = d end
    end
  end
  return due
end

-- Brings the set up to date with the pool's state as it is, doing none of
-- the pool's work.
function Pool:_ev_arm()
  local es, keys = self._ev, self._ev_keys
  self._rq:pollfd()                 -- armed for the next put
  local live = {}
  for _, w in pairs(self._workers) do live[w] = true end
  -- (the set keeps its own copy of each sentinel: a worker's handle is
  -- closed when it is replaced, and its entry still leaves here)
  for w, key in pairs(keys) do
    if not live[w] then
      es:remove(key)
      keys[w] = nil
    end
  end
  for w in pairs(live) do
    if not keys[w] then keys[w] = es:add(w.sentinel) end
  end
  -- the next task deadline; a timed task still queued has none yet (its
  -- clock starts in the worker), so while there are timed tasks the timer
  -- also fires every SLICE for the loop to arm again and look (a slice
  -- that has passed is renewed here: this look is what it was for)
  local due = next_due(self)
  if (self._timed or 0) > 0 then
    local slice = self._ev_slice
    if not slice or slice <= now() then
      slice = now() + SLICE
      self._ev_slice = slice
    end
    if not due or slice < due then due = slice end
  else
    self._ev_slice = nil          -- (a timed submit arms again: pool.lua)
  end
  if due ~= self._ev_due then es:set_timer(due) end   -- (set: 2 syscalls)
  self._ev_due = due
end

-- pool:poll()'s part: the work is done (dead workers replaced, overdue
-- tasks killed), then the set re-armed.
function Pool:_ev_sync()
  if self._released or self._owner ~= getpid() then return end
  self:_check_workers()
  if (self._timed or 0) > 0 then self:_check_timeouts() end
  self:_ev_arm()
end

-- pool:fileno() -> fd, readable when pool:poll() has work to do (a
-- closed pool still has results to deliver: only terminate ends it)
function Pool:fileno()
  if self._owner ~= getpid() then
    raise("ProcessError", "a pool can only be used by the process that made it")
  end
  if self._released then raise("ValueError", "Pool is terminated") end
  if not self._ev then
    local es = core.EventSet()
    self._ev, self._ev_keys = es, {}
    es:add(self._rq:fileno())
  end
  self:_ev_arm()
  return self._ev:fileno()
end

-- The cqueues protocol: cqueues.poll(pool) returns when pool:poll() has
-- work to do.
Pool.pollfd = Pool.fileno
function Pool:events() return "r" end
function Pool:timeout()
  local due = self._ev_due
  return due and math.max(due - now(), 0)
end

-- The cqueues protocol on a future (an AsyncResult): cqueues.poll(fut)
-- returns when its pool has something to do, at once when the future is
-- done; fut:done() (or result) then collects.  A done future has no fd
-- (nil: only the timeout counts), so polling it never needs the pool.
local AsyncResult = results.AsyncResult
function AsyncResult:pollfd()
  if self._done then return nil end
  return self._pool:fileno()
end
function AsyncResult:events() return "r" end
function AsyncResult:timeout()
  if self._done then return 0 end
  return self._pool:timeout()
end

do
  local release = Pool._release
  function Pool:_release()
    release(self)
    if self._ev then self._ev:close() end
  end
end

return Pool
