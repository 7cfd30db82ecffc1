-- multiprocessing.pool_owner: the Pool class and the owner's side of its
-- machinery -- collecting results, replacing dead workers, killing
-- overdue tasks, cancelling jobs, and close/terminate/join.  Submission
-- (multiprocessing.pool) and the futures and event-loop support
-- (multiprocessing.pool_events) add their methods to the same class.
--
-- No threads: results are collected, callbacks run, dead workers are
-- replaced and overdue tasks are killed while the owner is inside a pool
-- call (map, get, wait, imap's iteration, join) or pool:poll().
local core = require "multiprocessing.core"
local process = require "multiprocessing.process"
local connection = require "multiprocessing.connection"
local util = require "multiprocessing.util"
local proto = require "multiprocessing.pool_proto"
local worker = require "multiprocessing.pool_worker"
local results = require "multiprocessing.pool_results"

local now, new_error = core.now, core.new_error
local getpid = core.pid or core.getpid
local shielded = core.shielded
local raise = util.raise
local OK, FAILED, INIT_FAILED = proto.OK, proto.FAILED, proto.INIT_FAILED
local SKIPPED = proto.SKIPPED
local ORPHAN, SLICE = proto.ORPHAN, proto.SLICE
local finish, settle_chunk = results.finish, results.settle_chunk
local spawn_worker = worker.spawn

local Pool = {}
Pool.__index = Pool
Pool.__name = "Pool"

-- (raises unless the pool takes work, in the process that made it)
function Pool:_check_running()
  if self._state ~= "RUN" then
    if self._state == "BROKEN" then
      raise("BrokenPoolError", self._broken_msg or "the pool is broken")
    end
    raise("ValueError", "Pool not running")
  end
  if self._owner ~= getpid() then
    raise("ProcessError", "a pool can only be used by the process that made it")
  end
end

-- The record of task tag, taken off the books (nil: failed already).
local function take(self, tag)
  local rec = self._tasks[tag]
  if rec == nil then return nil end        -- failed already (worker lost)
  self._tasks[tag] = nil
  if self._timed > 0 and self._timeouts[tag] then
    self._timeouts[tag] = nil
    self._timed = self._timed - 1
  end
  return rec
end

-- Handles one message from the result queue, given as its items: an
-- apply's (tag, OK, n, v) or (tag, OK, n, {v1..vn}) or (tag, FAILED,
-- err) (see pool_proto), a chunk's (see settle_chunk), an initializer's
-- (-1, INIT_FAILED, err).  Returns false for no message.  (No varargs:
-- no message has more than five items.)
local function handle(self, tag, status, a, b, c)
  if status == nil then                    -- (every reply has a status)
    if tag == nil then return false end
    if type(tag) == "table" then           -- a reply of over 65535 items
      return handle(self, tag[1], tag[2], tag[3], tag[4], tag[5])
    end
  end
  if status == INIT_FAILED then
    self:_break("initializer failed in a worker: " .. tostring(a.message), a)
    return true
  end
  local rec = take(self, tag)
  if rec == nil or rec == ORPHAN then return true end
  if status == SKIPPED then                -- cancelled as it was taken
    local job = rec._kind and rec or rec[1]     -- (see job_of)
    if job and job._set_cancelled then job:_set_cancelled() end
    return true
  end
  if rec._kind == "apply" then             -- apply: the record is the job
    if status == OK then
      -- (new_apply's job reads _ok and _nres as true and 1 from its
      -- class; new_job's has them false)
      if a ~= 1 or rec._nres ~= 1 then rec._ok, rec._nres = true, a end
      rec._value = b
    else
      rec._ok, rec._value, rec._nres = false, {tag, status, a}, false
    end
    finish(rec)
  else
    settle_chunk(rec, status, a, b, c, tag)
  end
  return true
end

-- The same for a reply as a table.
function Pool:_handle(m)
  return handle(self, m[1], m[2], m[3], m[4], m[5])
end

-- Results are taken by rq:_collect (runtime/queue.c): a plain future's
-- or apply's one value is recorded there, in C; any other reply (a
-- failure, a chunk, several values, a job with callbacks or a timeout)
-- is left in self._pending, in order, and handled here.
local AsyncResult = results.AsyncResult

-- Handles the pending replies, then takes every result that is there
-- now; returns how many.
local function drain(self)
  local rq, pend, n = self._rq, self._pending, 0
  local tasks, timeouts = self._tasks, self._timeouts
  -- (a callback run by handle may have terminated the pool: its queues
  -- are closed then, and what was taken so far is all there is)
  while not self._released do
    local m = pend[1]
    if m ~= nil then
      table.remove(pend, 1)
      handle(self, m[1], m[2], m[3], m[4], m[5])
      n = n + 1
    else
      local k = rq:_collect(tasks, timeouts, AsyncResult, pend)
      if k == 0 and pend[1] == nil then break end
      n = n + k
    end
  end
  return n
end

-- (shielded: a Ctrl-C between taking a result and recording it would
-- lose it, and its get would wait forever; _collect's own are recorded
-- as they are taken, and what it leaves pending stays there)
local function drain_now(self, seconds)
  if self._released then return 0 end
  local pend = self._pending
  local n = self._rq:_collect(self._tasks, self._timeouts, AsyncResult, pend,
                              seconds)
  if pend[1] == nil then return n end
  return n + shielded(drain, self)
end
Pool._drain = drain_now

-- A task lost with its worker (or killed for its timeout).
function Pool:_fail_task(tag, err)
  return self:_handle({tag, FAILED, err})
end

local function describe_exit(code)
  if code == nil then return "an unknown status" end
  if code < 0 then return "signal " .. -code end
  return "exit code " .. code
end

-- Replaces dead workers and fails exactly the tasks they held; returns
-- how many it found.
local function check_workers(self)
  local dead, broken = 0, nil
  for slot, w in pairs(self._workers) do
    local code, gone = w.h:poll()
    if gone then
      dead = dead + 1
      local took_sentinel = self._started[slot + 1] == -2
      -- died in its initializer without a word (os.exit, a signal): after
      -- three such deaths in a row the pool is broken instead of
      -- replacing workers forever (Python's Pool loops here)
      if self._started[slot + 1] == -3 then
        self._init_deaths = (self._init_deaths or 0) + 1
        if self._init_deaths >= 3 then
          broken = string.format("initializer failed in a worker: worker %d died (%s) in it",
                                 w.pid, describe_exit(code))
        end
      else
        self._init_deaths = 0
      end
      self:_drain()                 -- its last results, if they came
      local tag = self._tq:_taken(slot)
      -- tag 0 is the close sentinel (plain puts carry tag 0): that worker
      -- left as asked, and the sentinels left over are for the others
      took_sentinel = took_sentinel or tag == 0
      if tag ~= nil and tag ~= 0 then
        if w.cancelled and w.cancelled ~= tag then
          -- it had finished the cancelled task and taken this one
          self:_fail_task(tag, new_error("WorkerLostError", string.format(
            "worker %d was killed to stop an interrupted call while it " ..
            "ran this task", w.pid)))
        elseif w.killed_for == tag then
          self:_fail_task(tag, new_error("TimeoutError", string.format(
            "task took longer than its %g s timeout; worker %d was killed",
            self._timeouts[tag] or 0, w.pid)))
        else
          self:_fail_task(tag, new_error("WorkerLostError", string.format(
            "worker %d died (%s) while running this task", w.pid,
            describe_exit(code))))
        end
      end
      if tag ~= nil then self._tq:_clear(slot) end
      process._disown(w.proc, code, w.pid)
      w.h:close()
      self._workers[slot] = nil
      self._started[slot + 1] = -1
      if broken then
        -- (no replacement: the pool breaks below)
      elseif self._state == "RUN" then
        spawn_worker(self, slot)
      elseif self._state == "CLOSE" and not took_sentinel and not self._tq:empty() then
        -- tasks are left and this worker did not leave for a sentinel
        -- (killed, or recycled by maxtasksperchild).  Its replacement
        -- gets a sentinel of its own: the dead one may have taken one
        -- in the instant before it died.  (A spare false is harmless.)
        self._tq:put(false)
        spawn_worker(self, slot)
      end
    end
  end
  if broken then self:_break(broken) end
  return dead
end

-- The job of a task record.
local function job_of(rec)
  if rec == nil or rec == ORPHAN then return nil end
  if rec._kind then return rec end
  return rec[1]
end
Pool._job_of = job_of

-- The tags of the jobs' tasks still on the books (a future's job keeps
-- its one tag: no search).
local function tags_of(self, want)
  local tags, untagged = {}, false
  for job in pairs(want) do
    if job._tag then
      if self._tasks[job._tag] == job then tags[#tags + 1] = job._tag end
    else
      untagged = true
    end
  end
  if untagged then
    for tag, rec in pairs(self._tasks) do
      local job = job_of(rec)
      if job and want[job] and not job._tag then tags[#tags + 1] = tag end
    end
  end
  return tags
end

-- Kills and replaces the workers of slots (slot -> the cancelled tag it
-- runs); `check` is how to call the worker check (pcall while unwinding).
local function kill_slots(self, slots, check)
  for slot, tag in pairs(slots) do
    local w = self._workers[slot]
    w.cancelled = tag
    pcall(w.h.signal, w.h, "SIGKILL")
  end
  -- reaped and replaced now: no zombie waits for the next call
  for slot in pairs(slots) do
    local w = self._workers[slot]
    if w then pcall(w.h.wait, w.h, 5) end
  end
  check(self._check_workers, self)
end

local function call(f, ...) return f(...) end

-- The one way jobs are cancelled: their queued tasks leave the books and
-- go to the cancel ring (workers skip them; results that still come are
-- dropped).  With kill, workers running their tasks are killed and
-- replaced.
--  * as_futures (Future.cancel, an executor's shutdown): a job that is
--    done, or (without kill) has a task running, is left alone; each
--    cancelled job ends cancelled.
--  * otherwise (nobody will wait for the job: its caller was interrupted
--    by Ctrl-C, or left an imap loop): its queued tasks go even while
--    others run, its progress bar ends, an imap job is done; and it never
--    raises, as it runs while an error unwinds.
-- The tasks workers hold now: tag -> slot.
local function taken(self)
  local running = {}
  for slot in pairs(self._workers) do
    local ok, tag = pcall(self._tq._taken, self._tq, slot)
    if ok and tag and self._tasks[tag] then running[tag] = slot end
  end
  return running
end

-- Leaves the jobs with a task in running out of want.
local function leave_running(self, want, running)
  for tag in pairs(running) do
    local job = job_of(self._tasks[tag])
    if job then want[job] = nil end
  end
end

function Pool:_cancel_jobs(jobs, kill, as_futures)
  if self._owner ~= getpid() or (self._state ~= "RUN" and self._state ~= "CLOSE") then
    return
  end
  local check = as_futures and call or pcall
  check(self._drain, self)            -- what is there may finish them
  local want = {}
  for _, job in ipairs(jobs) do
    if not (as_futures and job._done) then want[job] = true end
  end
  local keep = as_futures and not kill   -- running futures stay
  local running = taken(self)
  if keep then leave_running(self, want, running) end
  if next(want) == nil then return end
  -- The tags go to the ring, then the workers' taken slots are read again
  -- (a worker records its tag under the queue's lock, then reads the
  -- ring): a task not found taken then is skipped for sure.  One taken
  -- between the two reads runs, or is skipped -- its worker saw the ring
  -- -- and the worker's SKIPPED reply ends its job cancelled; so its job
  -- is left to that outcome, or, with kill, its worker killed.  (With
  -- one read before the ring, a worker could take the task between the
  -- two: cancel() said true and the task ran.)
  proto.cancel_tags(self._cancel, tags_of(self, want))
  for tag, slot in pairs(taken(self)) do running[tag] = slot end
  if keep then leave_running(self, want, running) end
  if not as_futures then
    for job in pairs(want) do
      if job._progress then pcall(job._progress.finish, job._progress, job) end
      if job._kind == "imap" then
        job._done = true
        self._jobs[job] = nil
      end
    end
  end
  if next(want) == nil then return end
  local tags, slots = tags_of(self, want), {}
  for _, tag in ipairs(tags) do
    self._tasks[tag] = nil
    if self._timeouts[tag] then
      self._timeouts[tag] = nil
      self._timed = self._timed - 1
    end
    if kill and running[tag] then slots[running[tag]] = tag end
  end
  if as_futures then
    for job in pairs(want) do job:_set_cancelled() end
  end
  if next(slots) then kill_slots(self, slots, check) end
end

-- Kills workers whose current task is overdue.
local function check_timeouts(self)
  local t = now()
  local wake
  for slot, w in pairs(self._workers) do
    local tag = self._started[slot + 1]
    local timeout = tag >= 0 and self._tasks[tag] and self._timeouts[tag]
    if timeout and not w.killed_for then
      local due = self._starts[slot + 1] + timeout
      if t >= due then
        w.killed_for = tag
        w.h:signal("SIGKILL")
      elseif not wake or due < wake then
        wake = due
      end
    end
  end
  return wake
end

-- (shielded: a dead worker's replacement, a task's failure and a worker
-- killed for its timeout are each done whole, whatever Ctrl-C does)
function Pool:_check_workers() return shielded(check_workers, self) end
function Pool:_check_timeouts() return shielded(check_timeouts, self) end

-- Makes progress: takes results, runs callbacks, replaces workers, kills
-- overdue tasks; sleeps until something happens or the deadline (nil:
-- until something happens; 0: do not sleep).
--
-- Where a round trip's time went (issue 18, perf and strace of 2e4
-- submit->result round trips): the owner made 5 system calls per round
-- trip besides the hand-off itself -- a wait4 per worker (dead workers
-- were looked for on every call that took no result), a read of mp.wait's
-- pipe and a poll -- and when it slept on that pipe the worker's put
-- paid an open of /proc/PID/fd/N, a write and a close to wake it.  Now
-- dead workers are looked for every CHECK_EVERY seconds, at once when a
-- sentinel fired in the last sleep, and on every pool:poll(); and the
-- owner first waits AWAIT seconds on the result queue's futex (one futex
-- call each side), then on mp.wait with the sentinels for the rest.
local CHECK_EVERY, AWAIT = 0.05, 0.002
--
-- The results there now are taken first, in the same call as the short
-- wait when there is none (rq:_collect, above): a round trip's owner
-- makes one C call for its result.  (A dead worker's last results are
-- taken by check_workers before it fails the worker's task.)
--
-- job (optional): a job the caller waits for; when its task is on the
-- books the pool has a task, and no next() is needed to know it (a C call,
-- ~200 instructions of a round trip).
function Pool:_pump(deadline, job)
  if self._owner ~= getpid() then return end
  local t = now()
  if deadline == 0 or self._maybe_dead or t >= (self._next_check or 0) then
    self._next_check, self._maybe_dead = t + CHECK_EVERY, false
    -- a lost task has settled: the caller may be waiting for just that
    if self:_check_workers() > 0 then
      drain_now(self)
      return
    end
  end
  local wake = deadline
  if self._timed > 0 then
    local due = self:_check_timeouts()
    local slice = now() + SLICE
    if due and due < slice then slice = due end
    if not wake or slice < wake then wake = slice end
  end
  -- nothing can happen: take what is there, do not sleep
  if deadline == 0 or next(self._workers) == nil or
     (not job or self._tasks[job._tag] ~= job) and next(self._tasks) == nil then
    local drained = drain_now(self)
    if drained > 0 or deadline == 0 or next(self._workers) == nil or
       (deadline == nil and self._state ~= "CLOSE") then
      return
    end
  else
    -- results came: the caller may have what it waits for (an imap's
    -- next chunk), so no sleep until the next result
    -- (drain_now's work in line: a round trip's owner comes here once)
    local left, pend = wake and wake - now() or AWAIT, self._pending
    if left >= AWAIT then left = AWAIT elseif left < 0 then left = 0 end
    local n = self._rq:_collect(self._tasks, self._timeouts, AsyncResult, pend, left)
    if pend[1] ~= nil then n = n + shielded(drain, self) end
    if n > 0 then return end
  end
  local rq = self._rq
  local objs = {rq}
  for _, w in pairs(self._workers) do objs[#objs + 1] = w.sentinel end
  local timeout = wake and math.max(wake - now(), 0) or nil
  local ready = connection.wait(objs, timeout)
  if ready[#ready] ~= nil and (#ready > 1 or ready[1] ~= rq) then
    self._maybe_dead = true         -- a sentinel fired: look at once
  end
  drain_now(self)
end

-- pool:poll(): runs callbacks of finished tasks without waiting.
function Pool:poll()
  self:_pump(0)
  if self._ev then self:_ev_sync() end
end

-- Every live job fails with err (terminate, a broken pool).
function Pool:_fail_all(err)
  for tag in pairs(self._tasks) do self:_fail_task(tag, err) end
  for job in pairs(self._jobs) do
    if not job._done then
      job._ok, job._value = false, err
      if job._kind == "imap" then job._broken = err end
      finish(job)
    end
  end
end

function Pool:_break(msg, cause)
  if self._state == "BROKEN" then return end
  self._state = "BROKEN"
  self._broken_msg = msg
  local err = new_error("BrokenPoolError", msg,
                        {value = cause, traceback = cause and cause.traceback})
  self:_kill_workers()
  self:_fail_all(err)
end

function Pool:_kill_workers()
  for slot, w in pairs(self._workers) do
    if w.h:pid() == nil then
      -- the handle was finalized before the pool (a pool dropped
      -- without terminate: its workers' handles, made after it, are
      -- finalized first); the worker still runs and is a child entry
      -- the runtime reaps later, so its pid is still its own
      core.kill(w.pid, "SIGKILL")
      process._disown(w.proc, nil, w.pid)
      self._workers[slot] = nil
    else
      w.h:signal("SIGTERM")
    end
  end
  local deadline = now() + 1
  for slot, w in pairs(self._workers) do
    local _, gone = w.h:poll()
    while not gone and now() < deadline do
      w.h:wait(math.max(deadline - now(), 0))
      _, gone = w.h:poll()
    end
    if not gone then
      w.h:signal("SIGKILL")
      w.h:wait()
    end
    process._disown(w.proc, (w.h:poll()), w.pid)
    w.h:close()
    self._workers[slot] = nil
  end
end

function Pool:close()
  if self._owner ~= getpid() then return end
  if self._state == "RUN" then
    self._state = "CLOSE"
    for _ = 1, self._n do self._tq:put(false) end
  end
end

function Pool:terminate()
  if self._owner ~= getpid() then return end
  if self._state == "TERMINATE" then return end
  local was = self._state
  self._state = "TERMINATE"
  self:_kill_workers()
  if was ~= "BROKEN" then
    self:_fail_all(new_error("BrokenPoolError", "the pool was terminated"))
  end
  self:_release()
end

function Pool:join()
  if self._owner ~= getpid() then
    raise("ProcessError", "a pool can only be joined by the process that made it")
  end
  if self._state == "RUN" then raise("ValueError", "Pool is still running") end
  -- terminate, or an earlier join, has released the queues: nothing to wait for
  if self._released then return end
  while next(self._workers) ~= nil do
    self:_pump(nil)
    self:_check_workers()
  end
  self:_drain()
  self:_release()
end

function Pool:_release()
  if self._released then return end
  self._released = true
  self._tq:close()
  self._rq:close()
  self._store:close()
end

Pool.__close = function(self) self:terminate() end
-- A pool collected while running was forgotten: its workers idled until
-- now.  They are terminated, and the first time the process is told, on
-- stderr, as Python's ResourceWarning does.
local warned_unclosed = false
Pool.__gc = function(self)
  if self._owner == getpid() and self._state ~= "TERMINATE" and not self._released then
    if self._state == "RUN" and not warned_unclosed then
      warned_unclosed = true
      pcall(function()
        io.stderr:write("ResourceWarning: unclosed running multiprocessing pool ",
          tostring(self), " collected; its workers are terminated now (call ",
          "pool:close() and pool:join(), or pool:terminate(), or hold it in ",
          "a local <close>)\n")
        io.stderr:flush()
      end)
    end
    pcall(self.terminate, self)
  end
end
Pool.__tostring = function(self)
  return string.format("<Pool state=%s pool_size=%d>", self._state, self._n)
end

return Pool
