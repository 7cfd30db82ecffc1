-- multiprocessing.pool_results: how results reach the caller --
-- AsyncResult (the Future of multiprocessing.futures too: a job's state,
-- how a worker's reply settles it, its callbacks, waiting for it) and the
-- imap iterator object that yields a job's results as they come.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local proto = require "multiprocessing.pool_proto"

local table_into, now, new_error = core.table_into, core.now, core.new_error
local unpack = table.unpack
local OK, FAILED = proto.OK, proto.FAILED
local argerror, typeerror, raise = util.argerror, util.typeerror, util.raise

local M = {}

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "AsyncResult"

local rawmt = debug.getmetatable

local function new_job(pool, kind, opts)
  -- every field a job will have, in one constructor (one allocation)
  local cb = opts and opts.callback or false
  local ecb = opts and opts.error_callback or false
  local job = setmetatable({_pool = pool, _kind = kind, _done = false,
                            _ok = false, _value = false, _nres = false,
                            _callback = cb, _error_callback = ecb,
                            _progress = false, _tag = false,
                            _plain = kind == "apply" and not cb and not ecb},
                           AsyncResult)
  if kind == "imap" then pool._jobs[job] = true end
  return job
end

-- An apply's job with no callbacks: 4 keys, one node array of 4 -- the
-- fields a reply of one value sets (_value, _done) are among them
-- (callgrind: each key of a constructor costs ~80 instructions, a table
-- resized when a key comes later ~600).  The rest read as the class's:
-- _kind "apply", _plain (nothing of callbacks or progress to run), and
-- what a reply of one value leaves them (_ok true, _nres 1; a failure
-- or several values set their own).  Every job the owner keeps costs
-- memory, and fresh memory costs page faults: ~16 us of CPU each on
-- this machine (a C loop touching 40 MiB), the owner's system time.
-- Missing fields (_callback, _progress, ...) read as the class's nil.
AsyncResult._kind, AsyncResult._plain = "apply", true
AsyncResult._ok, AsyncResult._nres = true, 1
local function new_apply(pool, tag)
  return setmetatable({_pool = pool, _tag = tag, _done = false,
                       _value = false}, AsyncResult)
end

local function run_callback(pool, f, v)
  local ok, err = xpcall(f, debug.traceback, v)
  if not ok then
    -- a failing callback is reported, and the pool goes on
    io.stderr:write("Exception in pool callback: ", tostring(err), "\n")
    io.stderr:flush()
    pool._callback_errors = (pool._callback_errors or 0) + 1
  end
end

-- An apply's value as a callback gets it (the first result) or its
-- error.  _value: with _nres set, the one result (_nres 1) or a table
-- of _nres results; without, a reply {tag, status, n, v1, ..., vn} or
-- {tag, FAILED, err} (the broker's pool and a cancelled future's).
local function apply_first(job)
  local n = job._nres
  if n == 1 then return job._value end
  if n then return job._value[1] end
  return job._value[job._ok and 4 or 3]
end

-- Marks job finished and runs its callback.
local function finish(job)
  if job._done then return end
  job._done = true
  if job._plain then return end
  if job._kind == "imap" then job._pool._jobs[job] = nil end
  if job._progress then job._progress:finish(job) end
  if job._ok then
    if job._callback then
      run_callback(job._pool, job._callback,
                   job._kind == "apply" and apply_first(job) or job._value)
    end
  elseif job._error_callback then
    run_callback(job._pool, job._error_callback,
                 job._kind == "apply" and apply_first(job) or job._value)
  end
  if job._done_callbacks then job:_run_done_callbacks() end
end

-- A chunk's outcome, from the worker's reply (or a made-up failure):
-- {tag, OK, n, results} or {tag, FAILED, err, partial results, count},
-- given as its items status, a, b, c.  The record is {job, first, count,
-- chunk [, bare]}.
local function settle_chunk(rec, status, a, b, c, tag)
  local ok = status == OK
  local job, first, count, chunk, bare
  if rec._kind then                 -- a map's item sent bare (submit_bare)
    job, first, count, bare = rec, tag - rec._tag0 + 1, 1, true
  else
    job, first, count, chunk, bare = rec[1], rec[2], rec[3], rec[4], rec[5]
  end
  -- (b is the job's result table itself when the results were decoded
  -- into it: the record's into and at, see the owner's drain)
  local got
  if ok then
    got = a
    if bare then job._results[first] = b          -- one item, sent bare
    elseif got > 0 and b ~= job._results then
      table_into(job._results, first, b, got)
    end
  else
    got = c or 0
    if got > 0 and b ~= job._results then table_into(job._results, first, b, got) end
    local err = a
    if type(err) == "table" and err.item then
      -- a result that could not travel: its index over the whole input
      err.message = string.format("%s at result[%d]%s", err.message,
                                  first + err.item - 1, err.rest)
      err.item, err.rest = nil, nil
    end
    if job._err == nil or first < job._err_at then
      job._err, job._err_at = err, first + got
    end
  end
  job._items_done = job._items_done + count
  job._left = job._left - 1
  if job._progress then job._progress:update(job) end
  if job._kind == "imap" then
    -- (the iterator harvests chunks by these; a map needs only the counts)
    if not ok then job._chunk_err[chunk] = a end
    job._chunk_done[chunk] = got
    return
  end
  if job._left == 0 then
    if job._err then job._ok, job._value = false, job._err
    else job._ok, job._value = true, job._results end
    finish(job)
  end
end

-- (get, result, ready, wait and done check their self here, not through
-- pool.lua's wrapper: they run once a task)
local function is_result(v) return rawmt(v) == AsyncResult end
local function bad_self(fname, v)
  util.selferror(fname, "AsyncResult", "result", v, is_result)
end

function AsyncResult:ready()
  if rawmt(self) ~= AsyncResult then bad_self("ready", self) end
  if not self._done then self._pool:_pump(0) end
  return self._done
end

-- A wait's timeout: nil (no limit) or a number (below 0 counts as 0).
local function check_timeout(timeout, argn, fname)
  if timeout == nil then return end
  if type(timeout) ~= "number" then typeerror(argn, fname, "number or nil", timeout) end
  if timeout ~= timeout then argerror(argn, fname, "timeout is NaN") end
end

local function wait(self, timeout)
  local deadline = timeout and now() + math.max(timeout, 0)
  while not self._done do
    if deadline and now() >= deadline then return false end
    self._pool:_pump(deadline)
  end
  return true
end

function AsyncResult:wait(timeout)
  if rawmt(self) ~= AsyncResult then bad_self("wait", self) end
  check_timeout(timeout, 1, "wait")
  return wait(self, timeout)
end

local function get(self, timeout)
  if timeout ~= nil then
    if not wait(self, timeout) then raise("TimeoutError", "result not ready in time") end
  elseif not self._done then
    -- (wait's loop, without its call and its deadline: a future's
    -- result() in a round trip comes here)
    local pool = self._pool
    repeat pool:_pump(nil) until self._done
  end
  local v = self._value
  if self._kind == "apply" then
    local n = self._nres
    if n == 1 then return v end
    if n then return unpack(v, 1, n) end
    if not self._ok then error(v[3], 0) end
    return unpack(v, 4, 3 + v[3])
  end
  if not self._ok then error(v, 0) end
  return v
end

function AsyncResult:get(timeout)
  if rawmt(self) ~= AsyncResult then bad_self("get", self) end
  if timeout ~= nil then check_timeout(timeout, 1, "get") end
  return get(self, timeout)
end

function AsyncResult:successful()
  if not self:ready() then raise("ValueError", "result is not ready") end
  return self._ok
end

-- The Future face of an AsyncResult (multiprocessing.futures): one result
-- type for Pool and executor alike.  A future is pending (queued), running
-- (a worker took one of its tasks), or done: finished, failed or
-- cancelled.  A cancelled one holds a CancelledError as its failure, so
-- get/result raise it and error callbacks receive it.

local function check_timeout(t, fname)
  if t ~= nil and (type(t) ~= "number" or t ~= t or t < 0) then
    argerror(1, fname, "timeout must be a non-negative number, got " ..
             (type(t) ~= "number" and type(t) or t ~= t and "NaN" or tostring(t)))
  end
end

-- Done callbacks: functions called with the future, and the waiters of
-- futures.wait/as_completed (tables the future appends itself to).  They
-- run in the owner, when the result is collected or the future cancelled;
-- one that raises is reported on stderr and the others still run.
function AsyncResult:_run_done_callbacks()
  local cbs = self._done_callbacks
  self._done_callbacks = false
  for i = 1, #cbs do
    local cb = cbs[i]
    if type(cb) == "table" then
      cb[#cb + 1] = self
    else
      local ok, err = xpcall(cb, debug.traceback, self)
      if not ok then
        io.stderr:write("exception calling callback for ", tostring(self), ": ",
                        tostring(err), "\n")
        io.stderr:flush()
      end
    end
  end
end

function AsyncResult:add_done_callback(fn)
  if type(fn) ~= "function" then
    typeerror(1, "add_done_callback", "function", fn)
  end
  if self._done then
    self._done_callbacks = {fn}
    self:_run_done_callbacks()
  else
    local cbs = self._done_callbacks
    if not cbs then cbs = {} self._done_callbacks, self._plain = cbs, false end
    cbs[#cbs + 1] = fn
  end
end

-- (a waiter: a table the future is appended to when done)
function AsyncResult:_add_waiter(w)
  if self._done then w[#w + 1] = self return end
  local cbs = self._done_callbacks
  if not cbs then cbs = {} self._done_callbacks, self._plain = cbs, false end
  cbs[#cbs + 1] = w
end

function AsyncResult:done()
  if rawmt(self) ~= AsyncResult then bad_self("done", self) end
  if not self._done then self._pool:_pump(0) end
  return self._done
end

function AsyncResult:cancelled()
  return self._cancelled == true
end

function AsyncResult:running()
  if self:ready() then return false end
  return self._pool:_running(self)
end

-- cancel(): only while pending (true), or when already cancelled;
-- cancel{force = true} also stops a running future: its worker is killed
-- and replaced.
function AsyncResult:cancel(opts)
  if opts ~= nil and type(opts) ~= "table" then
    typeerror(1, "cancel", "table", opts)
  end
  local force = opts ~= nil and opts.force
  if self._done then return self._cancelled == true end
  if self._kind == "imap" then return false end
  local pool = self._pool
  if not force and pool:_running(self) then return false end
  if self._done then return self._cancelled == true end
  pool:_cancel_jobs({self}, force, true)
  return self._cancelled == true
end

-- Marks an unfinished job cancelled (its tasks are off the books already).
function AsyncResult:_set_cancelled()
  if self._done then return end
  local err = new_error("CancelledError", "the future was cancelled")
  self._cancelled = true
  self._ok, self._nres = false, false
  self._value = self._kind == "apply" and {0, FAILED, err} or err
  finish(self)
end

function AsyncResult:result(timeout)
  if rawmt(self) ~= AsyncResult then bad_self("result", self) end
  if timeout ~= nil then
    check_timeout(timeout, "result")
  else
    -- (get's work in line for a round trip's future: its one value,
    -- without get's call)
    if not self._done then
      local pool = self._pool
      repeat pool:_pump(nil, self) until self._done
    end
    if self._nres == 1 and self._kind == "apply" then return self._value end
  end
  return get(self, timeout)
end

-- The error the task raised (nil when it succeeded); raises
-- CancelledError for a cancelled future, TimeoutError when not done in
-- time.
function AsyncResult:exception(timeout)
  check_timeout(timeout, "exception")
  if not wait(self, timeout) then raise("TimeoutError", "result not ready in time") end
  if self._ok then return nil end
  local err = self._kind == "apply" and apply_first(self) or self._value
  if self._cancelled then error(err, 0) end
  return err
end

AsyncResult.__tostring = function(self)
  local state = self._cancelled and "cancelled" or
                self._done and (self._ok and "finished" or "failed") or "pending"
  return string.format("<AsyncResult %s>", state)
end


-- ---------------------------------------------------------------------------
-- The imap iterators (CPython's IMapIterator and IMapUnorderedIterator):
-- one object per imap call, its loop's state in fields.  The input is
-- read ahead by a bounded number of chunks (feed), so an endless iterator
-- function works; results come as (index, value) so that nil values do
-- not end the loop.  The for loop's closing value is the object itself:
-- leaving the loop before the end (break, an error, Ctrl-C) cancels what
-- the loop will never take; on an error the workers running its tasks
-- are stopped too.

local IMap = {}
IMap.__index = IMap

-- job: the imap's AsyncResult; next_item() -> more, item; submit(rec,
-- payload, k, first) queues one chunk (the caller's Pool:_submit with the
-- function and mode); ahead: chunks read ahead.
function M.new_imap(pool, job, ordered, next_item, chunksize, ahead, submit)
  job._results, job._left, job._items_done = {}, 0, 0
  job._chunk_done, job._chunk_err, job._chunk_first = {}, {}, {}
  return setmetatable({
    pool = pool, job = job, ordered = ordered, next_item = next_item,
    chunksize = chunksize, ahead = ahead, submit = submit,
    fed = 0, chunks = 0, exhausted = false,
    -- items the caller has had (or that failed with their chunk); the
    -- read-ahead is bounded by fed - consumed, not by the chunks in
    -- flight, so that a slow consumer does not make results pile up
    -- without end
    consumed = 0, sizes = {},
    yielded_chunk = 1, yielded_item = 0,   -- ordered: position
    ready = {}, rlen = 0, rpos = 1,        -- unordered: indexes ready
    lost = {},         -- unordered: a failed chunk -> its items not run
    -- the error the input iterator raised: the items read before it are
    -- still sent and their results yielded, then it is raised (CPython's
    -- test_imap_handle_iterable_exception)
    input_err = nil,
  }, IMap)
end

-- Reads and queues chunks while the read-ahead allows.
function IMap:feed()
  local job, chunksize = self.job, self.chunksize
  if self.pool._state ~= "RUN" then self.exhausted = true end
  -- (divided, not multiplied: ahead * chunksize overflows for a huge
  -- chunksize, and the loop would never feed)
  while not self.exhausted and
        (self.fed - self.consumed) // chunksize < self.ahead do
    local payload, k = {}, 0
    local first = self.fed + 1
    while k < chunksize do
      local ok, more, v = pcall(self.next_item)
      if not ok then
        -- (Ctrl-C is not deferred)
        if more == "interrupted!" then error(more, 0) end
        self.input_err, self.exhausted = more, true
        break
      end
      if not more then self.exhausted = true break end
      k = k + 1
      payload[k] = v
    end
    if k == 0 then break end
    self.fed = self.fed + k
    local c = self.chunks + 1
    job._chunk_first[c] = first
    -- (into, at: where the owner's _get_items puts the chunk's results)
    self.submit({job, first, k, c, chunksize == 1 or nil,
                 into = chunksize > 1 and job._results or nil, at = first - 1},
                payload, k, first)
    self.chunks = c
    self.sizes[c] = k
    job._left = job._left + 1
  end
end

-- unordered: collect newly finished chunks' items; a harvested chunk
-- leaves _chunk_done, so each harvest costs only the chunks new since the
-- last one
function IMap:harvest()
  local job, ready, rlen = self.job, self.ready, self.rlen
  local done, firsts = job._chunk_done, job._chunk_first
  for c, count in pairs(done) do
    done[c] = nil
    local first = firsts[c]
    firsts[c] = nil
    for i = first, first + count - 1 do
      rlen = rlen + 1
      ready[rlen] = i
    end
    if job._chunk_err[c] then
      rlen = rlen + 1
      ready[rlen] = -c
      self.lost[c] = self.sizes[c] - count
    end
    self.sizes[c] = nil
  end
  self.rlen = rlen
end

-- The end of the results: the input's error, if it raised one.
function IMap:the_end()
  local job = self.job
  if job._broken then error(job._broken, 0) end
  if self.input_err ~= nil then
    local err = self.input_err
    self.input_err = nil
    if not job._done then job._ok, job._value = false, err finish(job) end
    error(err, 0)
  end
  if not job._done then job._ok, job._value = true, nil finish(job) end
  return nil
end

-- The next (index, value) in input order; nil, true when there is none
-- yet (the caller pumps and asks again).
function IMap:next_ordered()
  local job = self.job
  local c = self.yielded_chunk
  local count = job._chunk_done[c]
  if count ~= nil then
    if self.yielded_item < count then
      local k = self.yielded_item + 1
      self.yielded_item = k
      local idx = job._chunk_first[c] + k - 1
      local v = job._results[idx]
      job._results[idx] = nil
      return idx, v
    end
    local err = job._chunk_err[c]
    self.consumed = self.consumed + self.sizes[c]
    -- (a passed chunk's records go: an endless input keeps no trail)
    job._chunk_done[c], job._chunk_first[c], self.sizes[c] = nil, nil, nil
    self.yielded_chunk, self.yielded_item = c + 1, 0
    if err then
      job._chunk_err[c] = nil
      error(err, 0)
    end
    self:feed()
    return nil, true
  elseif self.exhausted and job._left == 0 and c > self.chunks then
    return self:the_end()
  end
  self.pool:_pump(nil)
  self:feed()
  return nil, true
end

-- The next (index, value) in completion order; nil, true when there is
-- none yet.
function IMap:next_unordered()
  local job = self.job
  self:harvest()
  local rpos = self.rpos
  if rpos <= self.rlen then
    local idx = self.ready[rpos]
    self.ready[rpos] = nil
    self.rpos = rpos + 1
    if idx < 0 then
      local err = job._chunk_err[-idx]
      self.consumed = self.consumed + self.lost[-idx]
      job._chunk_err[-idx], self.lost[-idx] = nil, nil
      error(err, 0)
    end
    self.consumed = self.consumed + 1
    local v = job._results[idx]
    job._results[idx] = nil
    return idx, v
  elseif self.exhausted and job._left == 0 then
    return self:the_end()
  end
  self.pool:_pump(nil)
  self:feed()
  return nil, true
end

-- The loop's next (index, value), nil at the end.
function IMap:next()
  self:feed()
  local step = self.ordered and self.next_ordered or self.next_unordered
  while true do
    local idx, v = step(self)
    if idx ~= nil or v == nil then return idx, v end
  end
end

IMap.__close = function(self, err)
  if not self.job._done then self.pool:_cancel_jobs({self.job}, err ~= nil) end
end

M.AsyncResult, M.new_job, M.new_apply, M.finish, M.settle_chunk =
  AsyncResult, new_job, new_apply, finish, settle_chunk
-- (the methods that check their own self: pool.lua's wrapper skips them)
M.SELF_CHECKED = {get = true, result = true, ready = true, wait = true, done = true}
return M
