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
local APPLY, SLICE, NO_OPTIONS = proto.APPLY, proto.SLICE, proto.NO_OPTIONS
local new_job = results.new_job
local check_running = Pool._check_running

-- ---------------------------------------------------------------------------
-- Support for multiprocessing.futures

-- Submits f(table.unpack(args, 1, n)) as one future; the job keeps its
-- tag, so cancelling it needs no search of the task records.
function Pool:_submit_future(f, args, n, timeout)
  check_running(self)
  local fref = self:_fref(f)
  local job = new_job(self, "apply", NO_OPTIONS)
  job._tag = self:_submit(job, fref, APPLY, args, n, 1, timeout)
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
-- waiting and re-arms the set (_ev_sync): the result queue registered for
-- the next put, the sentinels of replaced workers swapped, the timer set
-- to the next deadline.  Nothing is missed between poll's drain and the
-- re-arm: arming the queue looks at it after registering.

-- Brings the set up to date; the pool's state is settled (poll ran).
function Pool:_ev_sync()
  local es = self._ev
  if self._released or self._owner ~= getpid() then return end
  -- a dead worker is replaced now (poll's drain may have skipped the
  -- check), else its sentinel keeps the fd readable
  self:_check_workers()
  self._rq:pollfd()                 -- drained: armed for the next put
  local have, live = self._ev_fds, {}
  for _, w in pairs(self._workers) do live[w.pid] = w.sentinel end
  -- gone ones out first: a new sentinel may have the old one's number
  for pid, fd in pairs(have) do
    if live[pid] ~= fd then
      es:remove(fd)
      have[pid] = nil
    end
  end
  for pid, fd in pairs(live) do
    if not have[pid] then
      es:add(fd)
      have[pid] = fd
    end
  end
  -- the next task deadline; a timed task still queued has none yet (its
  -- clock starts in the worker), so look again after SLICE meanwhile
  local due
  if (self._timed or 0) > 0 then
    due = self:_check_timeouts()
    local slice = now() + SLICE
    if not due or slice < due then due = slice end
  end
  if due ~= self._ev_due then es:set_timer(due) end   -- (set: 2 syscalls)
  self._ev_due = due
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
    self._ev, self._ev_fds = es, {}
    es:add(self._rq:fileno())
  end
  self:_ev_sync()
  return self._ev:fileno()
end

-- The cqueues protocol: cqueues.poll(pool) returns when pool:poll() has
-- work to do.
Pool.pollfd = Pool.fileno
function Pool:events() return "r" end
-- (While jobs are unfinished a host loop also looks again after SLICE
-- without an event: a wake-up lost between a worker's death and the set's
-- re-arm -- seen once in ~10 cqueues runs, cause not found yet -- then
-- costs a quarter second instead of a hang.)
function Pool:timeout()
  local due = self._ev_due
  if due == nil then
    return next(self._jobs) ~= nil and SLICE or nil
  end
  return math.max(due - now(), 0)
end

do
  local release = Pool._release
  function Pool:_release()
    release(self)
    if self._ev then self._ev:close() end
  end
end

return Pool
