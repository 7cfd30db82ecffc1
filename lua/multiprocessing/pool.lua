-- multiprocessing.pool: Pool, AsyncResult and the imap iterators.
--
-- Policy lives here; the mechanisms are C: workers are forked with
-- core.spawn, tasks travel through a shared-memory Queue (runtime/queue.c)
-- and results through another, functions are encoded by the codec.
--
-- Tasks.  Each task (one apply, or one chunk of a map) is put on the task
-- queue with a tag; a worker takes it with q:_get_slot(slot), which records
-- the tag in the worker's slot in the same step as the take.  So when a
-- worker dies, q:_taken(slot) names exactly the task it held: that task
-- fails with WorkerLostError (unless its result already arrived), the
-- worker is replaced, and every other task goes on.
--
-- Functions.  A task carries its function encoded by the codec (bytecode
-- and the upvalues' values at submission).  Small encodings travel inline;
-- bigger ones are appended once to a Store (a memfd the workers read) and
-- tasks carry only their offset.  Workers keep decoded functions by
-- content or offset, so each distinct function is decoded once per worker.
--
-- No threads: results are collected, callbacks run, dead workers are
-- replaced and overdue tasks are killed while the owner is inside a pool
-- call (map, get, wait, imap's iteration, join) or pool:poll().
local core = require "multiprocessing.core"
local process = require "multiprocessing.process"
local connection = require "multiprocessing.connection"
local util = require "multiprocessing.util"

local encode, decode, now = core.encode, core.decode, core.now
local upvalue_snapshot, upvalues_same = core.upvalue_snapshot, core.upvalues_same
local table_slice, table_into, table_new = core.table_slice, core.table_into,
                                           core.table_new
local unpack, pack = table.unpack, table.pack
local new_error = core.new_error
local getpid = core.pid or core.getpid
local shielded = core.shielded
local argerror, typeerror = util.argerror, util.typeerror
-- (errors of a public call: led by the caller's file:line)
local raise = util.raise

local M = {}

local INLINE_MAX = 512       -- function encodings up to this travel inline
local FCACHE_MAX = 512       -- decoded functions a worker keeps
local TRUSTED = {trusted = true}
local FBLOBS_MAX = 1024      -- stored encodings the owner remembers
local SLICE = 0.25           -- longest sleep while tasks have deadlines
-- task modes; MAP1 and STARMAP1 are chunks of one item sent bare (no
-- table around the item, none around its result)
local APPLY, MAP, STARMAP, MAP1, STARMAP1 = 1, 2, 3, 4, 5
local NO_OPTIONS = setmetatable({}, {__newindex = function()
  error("internal: options table is shared", 2)
end})
local OK, FAILED, INIT_FAILED = 0, 1, 2
-- the record of a task whose map failed before it was fully submitted
-- (its reply, when it comes, is dropped)
local ORPHAN = {}

-- ---------------------------------------------------------------------------
-- Worker side

-- the function of the chunk a worker runs (to name it in tracebacks)
local chunk_fn

local function traceback(e)
  -- the frames alone: the RemoteError's tostring puts its message first
  local tb = debug.traceback(nil, 2)
  local cut = tb:find("\n\t%[C%]: in function 'xpcall'")
  if cut then tb = tb:sub(1, cut - 1) end
  -- the worker's own frames below the task's (run_items's loop) are not
  -- the user's business; frames of pool.lua above the task's (a nested
  -- pool's call that raised) stay
  repeat
    local last = tb:match("\n([^\n]*)$")
    local drop = last and (last:find("multiprocessing/pool%.lua:%d+:") or
                           last == "\t(...tail calls...)")
    if drop then tb = tb:sub(1, #tb - #last - 1) end
  until not drop
  -- run_items calls the task's function as its local 'f': name it as an
  -- apply's traceback does
  if chunk_fn and tb:find("\n\t[^\n]*: in local 'f'$") then
    local info = debug.getinfo(chunk_fn, "S")
    if info.what == "C" then return {value = e, traceback = tb} end
    local name = string.format("in function <%s:%d>", info.short_src,
                               info.linedefined)
    tb = tb:sub(1, -#"in local 'f'" - 1) .. name
  end
  return {value = e, traceback = tb}
end

-- The error a caller sees for a task that raised e in a worker.
local function remote_error(caught)
  local e = caught.value
  local msg
  if type(e) == "string" then msg = e
  elseif core.is_error(e) then msg = e.kind .. ": " .. tostring(e.message)
  else msg = "(error object is a " .. type(e) .. " value)" end
  return new_error("RemoteError", msg, {value = e, traceback = caught.traceback})
end

-- Runs f over items 1..n of a chunk, results into out; returns ok, the
-- error, and how many items finished.  (No closure per chunk: the
-- progress is one upvalue shared by all chunks.)
local chunk_done = 0
local function run_items(f, items, n, out, star, stamp)
  if stamp or star then
    for k = 1, n do
      chunk_done = k - 1
      if stamp then stamp() end
      if star then
        local a = items[k]
        out[k] = f(unpack(a, 1, a.n or #a))
      else
        out[k] = f(items[k])
      end
    end
  else
    for k = 1, n do
      chunk_done = k - 1
      out[k] = f(items[k])
    end
  end
end

local function run_chunk(f, items, n, out, star, stamp)
  chunk_done = 0
  local ok, err = xpcall(run_items, traceback, f, items, n, out, star, stamp)
  return ok, err, chunk_done
end

-- Cancelled tasks.  A map or apply whose caller was interrupted (Ctrl-C),
-- or an imap whose for loop was left early, is cancelled
-- (Pool:_cancel_job): its tags go to a ring of CANCEL_RING words in
-- shared memory as runs of consecutive tags, each word (first tag <<
-- CANCEL_BITS) | count, one aligned 64-bit store, so a worker never reads
-- half of an entry; word 1 counts the runs written so far (0: none, the
-- worker's only check).  A worker skips a task whose tag is in the ring.
-- An entry overwritten before its tasks came up only means they run,
-- their results dropped.
local CANCEL_RING, CANCEL_BITS = 16, 24
-- (the word after the ring: 1 while the owner's progress bar is drawn;
-- see Progress)
local BAR = CANCEL_RING + 2
local CANCEL_MAX = (1 << CANCEL_BITS) - 1

local function is_cancelled(cancel, tag)
  for i = 2, CANCEL_RING + 1 do
    local w = cancel[i]
    if w ~= 0 then
      local first = w >> CANCEL_BITS
      if tag >= first and tag < first + (w & CANCEL_MAX) then return true end
    end
  end
  return false
end

local function worker_main(cfg)
  process._become_child(cfg.name, true)
  local tq, rq, store, slot = cfg.tq, cfg.rq, cfg.store, cfg.slot
  local starts, started, cancel = cfg.starts, cfg.started, cfg.cancel
  -- a task's print or io.write clears the owner's progress bar first, when
  -- one is drawn, so that its output is on a line of its own.  The clear
  -- goes to stdout ahead of the text, in stdout's buffer: both leave in
  -- one write, so the owner's redraw cannot come between them (it goes
  -- before, and is cleared, or after, on the next line).  Only when stdout
  -- is the terminal too: a file gets no escapes.
  local print0, write0, stdout = print, io.write, io.stdout
  local tty_out = core.isatty(1)
  local function clear()
    if cancel[BAR] ~= 0 and tty_out then
      cancel[BAR] = 0
      stdout:write("\r\27[K")
    end
  end
  print = function(...) clear() return print0(...) end
  io.write = function(...) clear() return write0(...) end
  if cfg.initializer then
    local a = cfg.initargs
    local ok, err = xpcall(cfg.initializer, traceback, unpack(a, 1, a.n or #a))
    if not ok then
      local e = remote_error(err)
      if not pcall(rq.put, rq, {-1, INIT_FAILED, e}) then
        rq:put({-1, INIT_FAILED, new_error("RemoteError", e.message,
                                           {traceback = e.traceback})})
      end
      return 1
    end
    started[slot + 1] = -1              -- the initializer is done
  end
  -- decoded functions, by their encoding (inline) or store offset
  local fns, nfns = {}, 0
  local function resolve(fr, flen)
    local f = fns[fr]
    if f == nil then
      -- the pool's own store or task message: trusted (bytecode)
      f = decode(flen and store:get(fr, flen) or fr, TRUSTED)
      if nfns >= FCACHE_MAX then fns, nfns = {}, 0 end
      fns[fr], nfns = f, nfns + 1
    end
    return f
  end
  local function apply_reply(tag, ok, ...)
    if ok then return {tag, OK, select("#", ...), ...} end
    return {tag, FAILED, remote_error((...))}
  end
  local stamp = function() starts[slot + 1] = now() end
  local done, limit = 0, cfg.maxtasks
  while true do
    local task = tq:_get_slot(slot)
    if not task then
      -- false: the pool is closing; tell the owner this worker took its
      -- sentinel, so that it is not replaced
      started[slot + 1] = -2
      break
    end
    local tag, mode, items, n = task[1], task[3], task[4], task[5]
    -- (a cancelled task is skipped: no reply, nobody waits for it)
    if cancel[1] == 0 or not is_cancelled(cancel, tag) then
      local f = resolve(task[2], task[7])
      local timed = task[6]
      if timed then
        starts[slot + 1] = now()
        started[slot + 1] = tag
      end
      local reply
      -- replies: {tag, OK, n, v1..vn} for apply, {tag, OK, n, results} for
      -- a chunk, {tag, FAILED, err [, partial results, count]}
      if mode == APPLY then
        reply = apply_reply(tag, xpcall(f, traceback, unpack(items, 1, n)))
      elseif mode == MAP1 or mode == STARMAP1 then
        local ok, v
        chunk_fn = f
        if mode == MAP1 then ok, v = xpcall(f, traceback, items)
        else ok, v = xpcall(f, traceback, unpack(items, 1, items.n or #items)) end
        chunk_fn = nil
        if ok then reply = {tag, OK, 1, v}
        else reply = {tag, FAILED, remote_error(v), nil, 0} end
      else
        local out = table_new(n)
        chunk_fn = f
        local ok, err, count = run_chunk(f, items, n, out, mode == STARMAP,
                                         timed and stamp or nil)
        chunk_fn = nil
        if ok then reply = {tag, OK, n, out}
        else reply = {tag, FAILED, remote_error(err), out, count} end
      end
      local ok, err = pcall(rq.put, rq, reply)
      if not ok then
        -- the result cannot travel: the task fails, the worker lives
        if core.is_error(err, "EncodeError") then
          -- name the result, not the reply's insides: an apply's k-th value
          -- (reply[3 + k]), a chunk's j-th item (reply[4][j], renumbered
          -- over the whole input by the owner)
          local msg, j, rest = err.message, nil, nil
          if mode == APPLY then
            msg = msg:gsub(" at value%[(%d+)%]", function(k)
              return string.format(" at result[%d]", tonumber(k) - 3)
            end, 1)
          elseif mode == MAP1 or mode == STARMAP1 then
            local head
            head, rest = msg:match("^(.-) at value%[4%](.*)$")
            if head then msg, j = head, "1" end
          else
            local head
            head, j, rest = msg:match("^(.-) at value%[4%]%[(%d+)%](.*)$")
            if head then msg = head end
          end
          err = new_error("EncodeError", msg)
          if j then err.item, err.rest = tonumber(j), rest end
        end
        rq:put({tag, FAILED, err})
      end
      done = done + 1
      if limit and done >= limit then break end
    end
  end
  return 0
end

-- ---------------------------------------------------------------------------
-- Results

local AsyncResult = {}
AsyncResult.__index = AsyncResult
AsyncResult.__name = "AsyncResult"

local function new_job(pool, kind, opts)
  -- every field a job will have, in one constructor (one allocation)
  local job = setmetatable({_pool = pool, _kind = kind, _done = false,
                            _ok = false, _value = false,
                            _callback = opts and opts.callback or false,
                            _error_callback = opts and opts.error_callback or false,
                            _progress = false},
                           AsyncResult)
  if kind == "imap" then pool._jobs[job] = true end
  return job
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

-- Marks job finished and runs its callback.
local function finish(job)
  if job._done then return end
  job._done = true
  if job._kind == "imap" then job._pool._jobs[job] = nil end
  if job._progress then job._progress:finish(job) end
  if job._ok then
    if job._callback then
      run_callback(job._pool, job._callback,
                   job._kind == "apply" and job._value[4] or job._value)
    end
  elseif job._error_callback then
    run_callback(job._pool, job._error_callback,
                 job._kind == "apply" and job._value[3] or job._value)
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
  local got
  if ok then
    got = a
    if bare then job._results[first] = b          -- one item, sent bare
    elseif got > 0 then table_into(job._results, first, b, got) end
  else
    got = c or 0
    if got > 0 then table_into(job._results, first, b, got) end
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

function AsyncResult:ready()
  if not self._done then self._pool:_pump(0) end
  return self._done
end

-- A wait's timeout: nil (no limit) or a number (below 0 counts as 0).
local function check_timeout(timeout, argn, fname)
  if timeout == nil then return end
  if type(timeout) ~= "number" then typeerror(argn, fname, "number or nil", timeout) end
  if timeout ~= timeout then argerror(argn, fname, "timeout is NaN") end
end

function AsyncResult:wait(timeout)
  check_timeout(timeout, 1, "wait")
  local deadline = timeout and now() + math.max(timeout, 0)
  while not self._done do
    if deadline and now() >= deadline then return false end
    self._pool:_pump(deadline)
  end
  return true
end

function AsyncResult:get(timeout)
  check_timeout(timeout, 1, "get")
  if not self:wait(timeout) then raise("TimeoutError", "result not ready in time") end
  local v = self._value
  if self._kind == "apply" then
    if not self._ok then error(v[3], 0) end
    return unpack(v, 4, 3 + v[3])
  end
  if not self._ok then error(v, 0) end
  return v
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
             tostring(t))
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
    if not cbs then cbs = {} self._done_callbacks = cbs end
    cbs[#cbs + 1] = fn
  end
end

-- (a waiter: a table the future is appended to when done)
function AsyncResult:_add_waiter(w)
  if self._done then w[#w + 1] = self return end
  local cbs = self._done_callbacks
  if not cbs then cbs = {} self._done_callbacks = cbs end
  cbs[#cbs + 1] = w
end

function AsyncResult:done()
  return self:ready()
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
  pool:_cancel_jobs({self}, force)
  return self._cancelled == true
end

-- Marks an unfinished job cancelled (its tasks are off the books already).
function AsyncResult:_set_cancelled()
  if self._done then return end
  local err = new_error("CancelledError", "the future was cancelled")
  self._cancelled = true
  self._ok = false
  self._value = self._kind == "apply" and {0, FAILED, err} or err
  finish(self)
end

function AsyncResult:result(timeout)
  check_timeout(timeout, "result")
  return self:get(timeout)
end

-- The error the task raised (nil when it succeeded); raises
-- CancelledError for a cancelled future, TimeoutError when not done in
-- time.
function AsyncResult:exception(timeout)
  check_timeout(timeout, "exception")
  if not self:wait(timeout) then raise("TimeoutError", "result not ready in time") end
  if self._ok then return nil end
  local err = self._kind == "apply" and self._value[3] or self._value
  if self._cancelled then error(err, 0) end
  return err
end

AsyncResult.__tostring = function(self)
  local state = self._cancelled and "cancelled" or
                self._done and (self._ok and "finished" or "failed") or "pending"
  return string.format("<AsyncResult %s>", state)
end

-- ---------------------------------------------------------------------------
-- Progress bar: stderr, redrawn at most 10 times a second on a terminal; a
-- plain final line otherwise.  On a terminal the line fits its width (a
-- line that wraps would make every redraw a new line), and output must
-- not run into it: while a bar is drawn, print and io.write clear it
-- first -- in this process (wrapped for the bar's life, the bar redrawn
-- after) and in the workers (wrapped for good, see worker_main: they
-- clear it when the pool's shared BAR word says it is drawn, and the
-- owner draws it again at its next update).  With an iterator function
-- as input (imap) the total is unknown: the count and the rate show.

local Progress = {}
Progress.__index = Progress

-- the terminal's width: $COLUMNS, else stty's answer about stderr
local function term_cols()
  local c = math.tointeger(tonumber(os.getenv("COLUMNS") or ""))
  if c and c > 0 then return c end
  local f = io.popen("stty size <&2 2>/dev/null")
  if f then
    local out = f:read("a") or ""
    f:close()
    c = math.tointeger(tonumber(out:match("^%d+ (%d+)") or ""))
    if c and c > 0 then return c end
  end
  return 80
end

local function clock(s)
  s = math.max(0, math.floor(s + 0.5))
  return string.format("%d:%02d", s // 60, s % 60)
end

-- The bar being drawn in this process (one at a time), and the print and
-- io.write it wrapped.
local drawn_bar, plain_print, plain_write

local function clear_bar()
  local bar = drawn_bar
  if bar and bar.drawn then
    io.stderr:write("\r\27[K")
    bar.drawn = false
    if bar.flag then bar.flag[BAR] = 0 end
  end
end

local function redraw_bar()
  local bar = drawn_bar
  if bar and not bar.drawn and not bar.ended then
    io.stdout:flush()
    bar:draw()
  end
end

local function bar_print(...)
  clear_bar()
  plain_print(...)
  redraw_bar()
end

local function bar_write(...)
  clear_bar()
  local r = plain_write(...)
  if select("#", ...) > 0 and tostring(select(select("#", ...), ...)):find("\n$") then
    redraw_bar()
  end
  return r
end

-- total: the number of items, nil when unknown; flag: the pool's shared
-- words (BAR says a bar is drawn, for the workers)
local function new_progress(total, flag)
  local self = setmetatable({total = total, t0 = now(), last = 0, done = 0,
                             tty = core.isatty(2), flag = flag,
                             drawn = false, ended = false}, Progress)
  if self.tty then
    self.cols = term_cols()
    if drawn_bar == nil then
      plain_print, plain_write = print, io.write
      print, io.write = bar_print, bar_write
    end
    drawn_bar = self
  end
  return self
end

-- The bar's line for done items, at most cols - 1 characters.
function Progress:line(done, final)
  local dt = now() - self.t0
  local rate = dt > 0 and done / dt or 0
  local total = self.total
  local tail = final and ("in " .. clock(dt)) or
               (total and "ETA " .. clock(rate > 0 and (total - done) / rate or 0) or
                clock(dt))
  local count = total and string.format("%d/%d", done, total) or (done .. " done")
  local text = string.format("%s %.1f it/s %s", count, rate, tail)
  local room = (self.cols or 80) - 1
  local width = total and math.min(30, room - #text - 3) or 0
  if width < 5 then return text:sub(1, room) end
  local fill = total > 0 and math.floor(width * done / total) or width
  if fill > width then fill = width end
  return string.format("[%s%s] %s", string.rep("#", fill),
                       string.rep(".", width - fill), text)
end

function Progress:draw()
  -- (the flag first: a worker printing from now on clears what comes)
  if self.flag then self.flag[BAR] = 1 end
  io.stderr:write("\r", self:line(self.done), "\27[K")
  io.stderr:flush()
  self.drawn = true
end

function Progress:update(job)
  self.done = job._items_done
  if not self.tty or self.ended then return end
  local t = now()
  -- (a worker that printed cleared the bar: drawn again now)
  if self.drawn and self.flag and self.flag[BAR] == 0 then self.drawn = false end
  if self.drawn and t - self.last < 0.1 then return end
  self.last = t
  self:draw()
end

-- The last line: the count, the rate and the time it took.
function Progress:finish(job)
  if self.ended then return end
  self.ended = true
  local done, dt = job._items_done, now() - self.t0
  self.done = done
  if self.tty then
    io.stderr:write("\r", self:line(done, true), "\27[K\n")
    if self.flag then self.flag[BAR] = 0 end
    if drawn_bar == self then
      drawn_bar = nil
      if print == bar_print then print = plain_print end
      if io.write == bar_write then io.write = plain_write end
    end
  else
    io.stderr:write(string.format("%s done in %.2f s (%.1f it/s)\n",
      self.total and done .. "/" .. self.total or tostring(done), dt,
      dt > 0 and done / dt or 0))
  end
  io.stderr:flush()
end

-- ---------------------------------------------------------------------------
-- Pool

local Pool = {}
Pool.__index = Pool
Pool.__name = "Pool"

local pool_count = 0

local function check_function(f, argn, fname)
  if type(f) ~= "function" then typeerror(argn, fname, "function", f) end
end

local function spawn_worker(self, slot)
  local name = string.format("%s-Worker-%d", self._name, slot + 1)
  local cfg = {
    tq = self._tq, rq = self._rq, store = self._store, slot = slot,
    starts = self._starts, started = self._started, cancel = self._cancel,
    initializer = self._initializer, initargs = self._initargs,
    maxtasks = self._maxtasks,
    name = name,
  }
  -- -3: in the initializer (the worker sets -1 once it returned)
  if self._initializer then self._started[slot + 1] = -3 end
  -- (workers die with their owner: a SIGKILLed owner leaves no orphans)
  local h = core.spawn(worker_main, cfg, true, true, true)
  -- (proc: the worker as mp.active_children() lists it)
  self._workers[slot] = {h = h, pid = h:pid(), sentinel = h:sentinel(),
                         proc = process._adopt(name, h)}
end

function M.Pool(opts, initializer, initargs, maxtasksperchild)
  local n
  if type(opts) == "table" then
    n = opts.processes
    initializer, initargs = opts.initializer, opts.initargs
    maxtasksperchild = opts.maxtasksperchild
  else
    n = opts
  end
  if n == nil then n = core.cpu_count() end
  if math.type(n) ~= "integer" then
    local i = math.tointeger(n)
    if not i then
      argerror(1, "Pool", "processes must be an integer, got " ..
               (type(n) == "number" and tostring(n) or util.typename(n)))
    end
    n = i
  end
  if n < 1 then raise("ValueError", "Number of processes must be at least 1") end
  if n > 4096 then raise("ValueError", "at most 4096 processes") end
  if initializer ~= nil and type(initializer) ~= "function" then
    raise("ValueError", "initializer must be a function")
  end
  if maxtasksperchild ~= nil and (math.type(maxtasksperchild) ~= "integer" or
                                  maxtasksperchild < 1) then
    raise("ValueError", "maxtasksperchild must be a positive integer")
  end
  if initargs ~= nil and type(initargs) ~= "table" then
    argerror(type(opts) == "table" and 1 or 3, "Pool",
             "initargs must be a table, got " .. util.typename(initargs))
  end
  pool_count = pool_count + 1
  local self = setmetatable({
    _n = n, _owner = getpid(), _state = "RUN", _name = "Pool" .. pool_count,
    _initializer = initializer, _initargs = initargs or {},
    _maxtasks = maxtasksperchild,
    _tq = core.Queue{slots = n}, _rq = core.Queue(), _store = core.Store(),
    _starts = core.RawArray("d", n), _started = core.RawArray("q", n),
    _cancel = core.RawArray("q", CANCEL_RING + 2),
    -- _jobs: the imap iterators not finished yet, weakly: one the caller
    -- dropped (a loop left with break) goes once its chunks in flight
    -- have settled (their task records hold it till then)
    _workers = {}, _tasks = {}, _timeouts = {}, _tag = 1,
    _jobs = setmetatable({}, {__mode = "k"}),
    _fblobs = {}, _nfblobs = 0, _fcache = setmetatable({}, {__mode = "k"}),
    _timed = 0, _next_check = 0,
  }, Pool)
  for slot = 0, n - 1 do self._started[slot + 1] = -1 end
  for slot = 0, n - 1 do spawn_worker(self, slot) end
  return self
end

local function check_running(self)
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

-- The task's function reference.  The codec's encoding of f (bytecode and
-- the upvalues' current values) goes inline the first time; when the same
-- encoding is sent again -- the same function, unchanged upvalues -- it is
-- put in the store once and tasks carry only its place.  A map sends its
-- function with many tasks, so it is stored at once (stored = true).
-- Encodings too big to copy into every task are always stored.
function Pool:_fref(f, stored)
  local c = self._fcache[f]
  -- unchanged since the last submission: the same encoding, stored now
  if c and c.snap and upvalues_same(f, c.snap) then
    if c.ref then return c.ref end
    if not stored and c.inline_left > 0 then
      c.inline_left = c.inline_left - 1
      return c.blob
    end
    c.ref = self:_store_blob(c.blob)
    return c.ref
  end
  local ok, blob = pcall(encode, f)
  if not ok then
    if core.is_error(blob, "EncodeError") then
      blob = new_error("EncodeError", (blob.message:gsub(" at value", " at function", 1)))
    end
    error(blob, 0)
  end
  if c and c.blob == blob then
    if c.ref then return c.ref end
    stored = true
  end
  c = {blob = blob, snap = upvalue_snapshot(f), inline_left = 1}
  self._fcache[f] = c
  if not stored and #blob <= INLINE_MAX then return blob end
  c.ref = self:_store_blob(blob)
  return c.ref
end

-- Appends an encoding to the store, once.
function Pool:_store_blob(blob)
  local ref = self._fblobs[blob]
  if not ref then
    if self._nfblobs >= FBLOBS_MAX then self._fblobs, self._nfblobs = {}, 0 end
    ref = {self._store:put(blob), #blob}
    self._fblobs[blob], self._nfblobs = ref, self._nfblobs + 1
  end
  return ref
end

-- An EncodeError about a task message, told in the caller's terms: the
-- items are slot 4 of the message, so its path {4, ...} becomes one from
-- the caller's args (apply) or iterable (map: the item's own index first).
local function rename_path(err, mode, first)
  if not core.is_error(err, "EncodeError") or err.path[1] ~= 4 then
    return err
  end
  local path, root, from = {}, "iterable", 2
  if mode == APPLY then root = "args"
  elseif mode == MAP1 or mode == STARMAP1 then path[1] = first
  elseif math.type(err.path[2]) == "integer" then
    path[1], from = first + err.path[2] - 1, 3
  else return err end
  table.move(err.path, from, #err.path, #path + 1, path)
  local where = {}
  for i, step in ipairs(path) do
    where[i] = math.type(step) == "integer" and "[" .. step .. "]" or step
  end
  return new_error("EncodeError", err.reason .. " at " .. root ..
                   table.concat(where), {reason = err.reason, path = path})
end

-- Puts one task on the queue: {tag, function, mode, items, n, timed,
-- function length when stored}; rec is what the reply settles.
function Pool:_submit(rec, fref, mode, items, n, first, timeout)
  local tag = self._tag
  local ok, err
  if type(fref) == "string" then
    ok, err = pcall(self._tq._put_task, self._tq, tag,
                    tag, fref, mode, items, n, timeout and true or false)
  else
    ok, err = pcall(self._tq._put_task, self._tq, tag,
                    tag, fref[1], mode, items, n, timeout and true or false, fref[2])
  end
  if not ok then error(rename_path(err, mode, first), 0) end
  self._tag = tag + 1
  self._tasks[tag] = rec
  if timeout then
    self._timeouts[tag] = timeout
    self._timed = (self._timed or 0) + 1
  end
  return tag
end

-- Options of apply_async's third argument and the map family's third.
local function task_options(x, what, fname)
  if type(x) == "table" then
    local t = x.timeout
    if t ~= nil and (type(t) ~= "number" or t ~= t or t < 0) then
      raise("ValueError", "timeout must be a non-negative number")
    end
    return x
  elseif x == nil then return NO_OPTIONS
  elseif what == "apply" and type(x) == "function" then return {callback = x}
  elseif what == "map" and math.type(x) == "integer" then return {chunksize = x}
  end
  argerror(3, fname, "bad options: table" .. (what == "apply" and
           " or callback" or " or chunksize") .. " expected, got " .. util.typename(x))
end

-- The options of a *_async call with its positional callbacks merged in.
local function with_callbacks(opts, callback, error_callback, fname)
  local o = task_options(opts, "map", fname)
  if callback == nil and error_callback == nil then return o end
  local t = {}
  for k, v in pairs(o) do t[k] = v end
  t.callback = t.callback or callback
  t.error_callback = t.error_callback or error_callback
  return t
end

local function check_args(args, fname)
  if args == nil then return {n = 0} end
  if type(args) ~= "table" then
    argerror(2, fname, "args must be a table, got " .. util.typename(args))
  end
  return args
end

local function check_callback(cb, argn, fname)
  if cb ~= nil and type(cb) ~= "function" then
    typeerror(argn, fname, "function or nil", cb)
  end
end

function Pool:_apply_async(f, args, opts, error_callback, fname)
  check_running(self)
  check_function(f, 1, fname)
  args = check_args(args, fname)
  opts = task_options(opts, "apply", fname)
  check_callback(opts.callback, 3, fname)
  check_callback(opts.error_callback, 3, fname)
  check_callback(error_callback, 4, fname)
  if error_callback then
    opts = {callback = opts.callback, error_callback = error_callback,
            timeout = opts.timeout}
  end
  local fref = self:_fref(f)
  local job = new_job(self, "apply", opts)
  self:_submit(job, fref, APPLY, args, args.n or #args, 1, opts.timeout)
  return job
end

-- The blocking calls (apply, map, starmap) wait with a guard: when the
-- wait ends in an error while their job is unfinished -- Ctrl-C, the only
-- way out of it -- nobody can have the job any more, so it is cancelled.
local Guard = {__close = function(g, err)
  if err ~= nil and not g.job._done then g.pool:_cancel_job(g.job, true) end
end}

local function get_guarded(pool, job)
  local _ <close> = setmetatable({pool = pool, job = job}, Guard)
  return job:get()
end

function Pool:apply_async(f, args, opts, error_callback)
  return self:_apply_async(f, args, opts, error_callback, "apply_async")
end

function Pool:apply(f, args, opts)
  return get_guarded(self, self:_apply_async(f, args, opts, nil, "apply"))
end

-- The length of a sequence given as an iterable (n honoured); a table
-- with keys but no items ({a = 1}) is refused rather than mapped to
-- nothing.
local function seq_len(t, fname)
  local n = t.n
  if n == nil then
    n = #t
    if n == 0 and next(t) ~= nil then
      argerror(2, fname, "iterable must be a sequence (keys 1..n) or an " ..
               "iterator function, got a table with key " .. tostring((next(t))))
    end
  elseif math.type(n) ~= "integer" or n < 0 then
    argerror(2, fname, "iterable's n must be a non-negative integer, got " ..
             tostring(n))
  end
  return n
end

-- The items of an iterable: a sequence (args.n honoured) or an iterator
-- function returning nil at the end.
local function collect(iterable, fname)
  if type(iterable) == "table" then return iterable, seq_len(iterable, fname) end
  if type(iterable) == "function" then
    local items, n = {}, 0
    for v in iterable do
      n = n + 1
      items[n] = v
    end
    return items, n
  end
  argerror(2, fname, "iterable must be a table or an iterator function, got " ..
           util.typename(iterable))
end

-- starmap's items are argument lists: one that is not a table is refused
-- here, in the caller, rather than failing in (and killing) a worker.
local function check_star_items(items, n, fname)
  for i = 1, n do
    local a = items[i]
    if type(a) ~= "table" then
      argerror(2, fname, string.format("item %d of iterable must be a table " ..
               "of arguments, got %s", i, util.typename(a)))
    end
  end
end

local function default_chunksize(n, workers)
  if n == 0 then return 1 end
  local c, extra = n // (workers * 4), n % (workers * 4)
  if extra > 0 then c = c + 1 end
  return c
end

function Pool:_map_async(f, iterable, opts, mode, fname)
  check_running(self)
  check_function(f, 1, fname)
  opts = task_options(opts, "map", fname)
  check_callback(opts.callback, 4, fname)
  check_callback(opts.error_callback, 5, fname)
  local items, n = collect(iterable, fname)
  if mode == STARMAP then check_star_items(items, n, fname) end
  local chunksize = opts.chunksize
  if chunksize == nil then
    chunksize = opts.timeout and 1 or default_chunksize(n, self._n)
  elseif math.type(chunksize) ~= "integer" or chunksize < 1 then
    raise("ValueError", "Chunksize must be 1+, not " .. tostring(chunksize))
  end
  local job = new_job(self, "map", opts)
  job._results = table_new(n, 1)
  job._results.n = n
  job._left, job._items_done = 0, 0
  if opts.progress then job._progress = new_progress(n, self._cancel) end
  local fref = self:_fref(f, true)
  local ok, err = pcall(self._submit_chunks, self, job, fref, mode, items, n,
                        chunksize, opts.timeout)
  if not ok then
    -- this map fails now; chunks already queued run, unheard
    for tag, r in pairs(self._tasks) do
      if r == job or r[1] == job then self._tasks[tag] = ORPHAN end
    end
    error(err, 0)
  end
  if job._left == 0 then
    job._ok, job._value = true, job._results
    finish(job)
  end
  return job
end

-- Queues items[1..n] one a task, sent bare, with no task record: the job
-- itself is the record of every one, its tags consecutive from job._tag0
-- (the item's index is tag - _tag0 + 1).  Without timeouts only.
local function submit_bare(self, job, fref, mode, items, n)
  local tq, tasks, tag0 = self._tq, self._tasks, self._tag
  local put = tq._put_task
  local f, flen = fref, nil
  if type(fref) ~= "string" then f, flen = fref[1], fref[2] end
  local m1 = mode == MAP and MAP1 or STARMAP1
  job._tag0 = tag0
  local i = 0
  local ok, err = pcall(function()
    for k = 1, n do
      i = k
      local tag = tag0 + k - 1
      put(tq, tag, tag, f, m1, items[k], 1, false, flen)
      tasks[tag] = job
    end
  end)
  -- (the tags of the items queued are used)
  self._tag = tag0 + (ok and n or i - 1)
  job._left = job._left + (ok and n or i - 1)
  if not ok then error(rename_path(err, m1, i), 0) end
end

-- Queues the chunks of a map: items[1..n] in chunks of chunksize.
function Pool:_submit_chunks(job, fref, mode, items, n, chunksize, timeout)
  if chunksize == 1 and not timeout then
    return submit_bare(self, job, fref, mode, items, n)
  end
  local chunk = 0
  for first = 1, n, chunksize do
    local last = first + chunksize - 1
    if last > n then last = n end
    chunk = chunk + 1
    if chunksize == 1 then
      self:_submit({job, first, 1, chunk, true}, fref,
                   mode == MAP and MAP1 or STARMAP1, items[first], 1, first, timeout)
    else
      self:_submit({job, first, last - first + 1, chunk}, fref, mode,
                   table_slice(items, first, last), last - first + 1, first, timeout)
    end
    job._left = job._left + 1
  end
end

function Pool:map_async(f, iterable, opts, callback, error_callback)
  return self:_map_async(f, iterable,
                         with_callbacks(opts, callback, error_callback, "map_async"),
                         MAP, "map_async")
end

function Pool:map(f, iterable, opts)
  return get_guarded(self, self:_map_async(f, iterable, opts, MAP, "map"))
end

function Pool:starmap_async(f, iterable, opts, callback, error_callback)
  return self:_map_async(f, iterable,
                         with_callbacks(opts, callback, error_callback, "starmap_async"),
                         STARMAP, "starmap_async")
end

function Pool:starmap(f, iterable, opts)
  return get_guarded(self, self:_map_async(f, iterable, opts, STARMAP, "starmap"))
end

-- imap and imap_unordered: for i, v in pool:imap(f, xs) do ... end.  The
-- input is read ahead by a bounded number of chunks, so an endless
-- iterator function works; results come as (index, value) so that nil
-- values do not end the loop.
function Pool:_imap(f, iterable, opts, ordered, fname)
  check_running(self)
  check_function(f, 1, fname)
  opts = task_options(opts, "map", fname)
  local chunksize = opts.chunksize or 1
  if math.type(chunksize) ~= "integer" or chunksize < 1 then
    raise("ValueError", "Chunksize must be 1+, not " .. tostring(chunksize))
  end
  local next_item
  if type(iterable) == "table" then
    local i, n = 0, seq_len(iterable, fname)
    next_item = function()
      if i >= n then return false end
      i = i + 1
      return true, iterable[i]
    end
  elseif type(iterable) == "function" then
    next_item = function()
      local v = iterable()
      if v == nil then return false end
      return true, v
    end
  else
    typeerror(2, fname, "table or function", iterable)
  end
  local job = new_job(self, "imap", opts)
  job._results, job._left, job._items_done = {}, 0, 0
  job._chunk_done, job._chunk_err = {}, {}
  if opts.progress then
    job._progress = new_progress(type(iterable) == "table" and
                                 seq_len(iterable, fname) or nil, self._cancel)
  end
  local fref = self:_fref(f, true)
  local ahead = math.max(4, 2 * self._n)
  local fed, chunks, exhausted = 0, 0, false
  -- items the caller has had (or that failed with their chunk); the
  -- read-ahead is bounded by fed - consumed, not by the chunks in flight,
  -- so that a slow consumer does not make results pile up without end
  local consumed, sizes = 0, {}
  local yielded_chunk, yielded_item = 1, 0     -- ordered: position
  local ready, rlen = {}, 0                     -- unordered: indexes ready
  local rpos = 1
  local pool = self
  -- the error the input iterator raised: the items read before it are
  -- still sent and their results yielded, then it is raised (CPython's
  -- test_imap_handle_iterable_exception)
  local input_err

  local function feed()
    if pool._state ~= "RUN" then exhausted = true end
    -- (divided, not multiplied: ahead * chunksize overflows for a huge
    -- chunksize, and the loop would never feed)
    while not exhausted and (fed - consumed) // chunksize < ahead do
      local payload, k = {}, 0
      local first = fed + 1
      while k < chunksize do
        local ok, more, v = pcall(next_item)
        if not ok then
          -- (Ctrl-C is not deferred)
          if more == "interrupted!" then error(more, 0) end
          input_err, exhausted = more, true
          break
        end
        if not more then exhausted = true break end
        k = k + 1
        payload[k] = v
      end
      if k == 0 then break end
      fed = fed + k
      job._chunk_first[chunks + 1] = first
      if chunksize == 1 then
        pool:_submit({job, first, 1, chunks + 1, true}, fref, MAP1, payload[1], 1,
                     first, opts.timeout)
      else
        pool:_submit({job, first, k, chunks + 1}, fref, MAP, payload, k, first,
                     opts.timeout)
      end
      chunks = chunks + 1
      sizes[chunks] = k
      job._left = job._left + 1
    end
  end

  -- unordered: collect newly finished chunks' items; a harvested chunk
  -- leaves _chunk_done, so each harvest costs only the chunks new since
  -- the last one
  local lost = {}        -- a failed chunk -> its items that did not run
  local function harvest()
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
        lost[c] = sizes[c] - count
      end
      sizes[c] = nil
    end
  end
  job._chunk_first = {}
  -- the end of the results: the input's error, if it raised one
  local function the_end()
    if job._broken then error(job._broken, 0) end
    if input_err ~= nil then
      local err = input_err
      input_err = nil
      if not job._done then job._ok, job._value = false, err finish(job) end
      error(err, 0)
    end
    if not job._done then job._ok, job._value = true, nil finish(job) end
    return nil
  end
  local function iter()
    feed()
    while true do
      if ordered then
        local count = job._chunk_done[yielded_chunk]
        if count ~= nil then
          if yielded_item < count then
            yielded_item = yielded_item + 1
            local idx = job._chunk_first[yielded_chunk] + yielded_item - 1
            local v = job._results[idx]
            job._results[idx] = nil
            return idx, v
          end
          local c = yielded_chunk
          local err = job._chunk_err[c]
          consumed = consumed + sizes[c]
          -- (a passed chunk's records go: an endless input keeps no trail)
          job._chunk_done[c], job._chunk_first[c], sizes[c] = nil, nil, nil
          yielded_chunk, yielded_item = c + 1, 0
          if err then
            job._chunk_err[yielded_chunk - 1] = nil
            error(err, 0)
          end
          feed()
        elseif exhausted and job._left == 0 and yielded_chunk > chunks then
          return the_end()
        else
          pool:_pump(nil)
          feed()
        end
      else
        harvest()
        if rpos <= rlen then
          local idx = ready[rpos]
          ready[rpos] = nil
          rpos = rpos + 1
          if idx < 0 then
            local err = job._chunk_err[-idx]
            consumed = consumed + lost[-idx]
            job._chunk_err[-idx], lost[-idx] = nil, nil
            error(err, 0)
          end
          consumed = consumed + 1
          local v = job._results[idx]
          job._results[idx] = nil
          return idx, v
        elseif exhausted and job._left == 0 then
          return the_end()
        else
          pool:_pump(nil)
          feed()
        end
      end
    end
  end
  -- the loop's closing value: leaving a for loop before the end (break,
  -- an error, Ctrl-C) cancels what the loop will never take; on an error
  -- the workers running its tasks are stopped too
  local closer = setmetatable({}, {__close = function(_, err)
    if not job._done then pool:_cancel_job(job, err ~= nil) end
  end})
  return iter, nil, nil, closer
end

function Pool:imap(f, iterable, opts)
  return self:_imap(f, iterable, opts, true, "imap")
end

function Pool:imap_unordered(f, iterable, opts)
  return self:_imap(f, iterable, opts, false, "imap_unordered")
end

-- ---------------------------------------------------------------------------
-- The owner's side of the machinery

-- Handles one message from the result queue, given as its items: an
-- apply's {tag, OK, n, v1..vn} or {tag, FAILED, err}, a chunk's (see
-- settle_chunk), an initializer's {-1, INIT_FAILED, err}.  Returns false
-- for no message.
-- The record of task tag, taken off the books (nil: failed already).
local function take(self, tag)
  local rec = self._tasks[tag]
  if rec == nil then return nil end        -- failed already (worker lost)
  self._tasks[tag] = nil
  if self._timeouts[tag] then
    self._timeouts[tag] = nil
    self._timed = self._timed - 1
  end
  return rec
end

local function handle(self, tag, status, a, b, c, ...)
  if tag == nil then return false end
  if type(tag) == "table" then             -- a reply of over 65535 items
    local m = tag
    local rec = take(self, m[1])
    if rec and rec ~= ORPHAN then
      if rec._kind == "apply" then
        rec._ok, rec._value = m[2] == OK, m
        finish(rec)
      else
        settle_chunk(rec, m[2], m[3], m[4], m[5], m[1])
      end
    end
    return true
  end
  if status == INIT_FAILED then
    self:_break("initializer failed in a worker: " .. tostring(a.message), a)
    return true
  end
  local rec = take(self, tag)
  if rec == nil or rec == ORPHAN then return true end
  if rec._kind == "apply" then             -- apply: the record is the job
    -- (the reply is its value: get unpacks v[4 .. 3 + v[3]])
    rec._ok, rec._value = status == OK, {tag, status, a, b, c, ...}
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

-- Takes every result that is there now; returns how many.
local function drain(self)
  local rq, n = self._rq, 0
  local get = rq._get_items
  -- (a callback run by handle may have terminated the pool: its queues
  -- are closed then, and what was taken so far is all there is)
  while not self._released and handle(self, get(rq)) do n = n + 1 end
  return n
end

-- (shielded: a Ctrl-C between taking a result and recording it would
-- lose it, and its get would wait forever)
function Pool:_drain()
  if self._released or self._rq:empty() then return 0 end
  return shielded(drain, self)
end

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

-- Cancels an unfinished job that nobody will wait for: its caller was
-- interrupted (Ctrl-C), or left an imap loop.  Its queued tasks are marked
-- for the workers to skip and results that still come are dropped; with
-- kill, the workers running its tasks are killed and replaced too (Ctrl-C
-- stops the work, as it stops a loop in the caller).  Never raises: it
-- runs while an error unwinds.
function Pool:_cancel_job(job, kill)
  if self._owner ~= getpid() or (self._state ~= "RUN" and self._state ~= "CLOSE") then
    return
  end
  pcall(self._drain, self)            -- what is there may finish it
  if job._progress then pcall(job._progress.finish, job._progress, job) end
  local pending, tags = {}, {}
  for tag, rec in pairs(self._tasks) do
    if rec == job or (rec ~= ORPHAN and not rec._kind and rec[1] == job) then
      pending[tag] = true
      tags[#tags + 1] = tag
    end
  end
  if job._kind == "imap" then
    job._done = true
    self._jobs[job] = nil
  end
  if #tags == 0 then return end
  for _, tag in ipairs(tags) do
    self._tasks[tag] = nil
    if self._timeouts[tag] then
      self._timeouts[tag] = nil
      self._timed = self._timed - 1
    end
  end
  -- the ring gets the tags as runs of consecutive ones (a map's are one
  -- run; an imap's may be interleaved with other calls' tasks)
  table.sort(tags)
  local cancel = self._cancel
  local i = 1
  while i <= #tags and tags[i] < 1 << (63 - CANCEL_BITS) do
    local first, n = tags[i], 1
    while i + n <= #tags and tags[i + n] == first + n and n < CANCEL_MAX do
      n = n + 1
    end
    local count = cancel[1]
    cancel[count % CANCEL_RING + 2] = (first << CANCEL_BITS) | n
    cancel[1] = count + 1
    i = i + n
  end
  if not kill then return end
  local killed = false
  for slot, w in pairs(self._workers) do
    local ok, tag = pcall(self._tq._taken, self._tq, slot)
    if ok and tag and pending[tag] then
      w.cancelled = tag
      pcall(w.h.signal, w.h, "SIGKILL")
      killed = true
    end
  end
  if killed then
    -- reap and replace them now: no zombie waits for the next call
    for _, w in pairs(self._workers) do
      if w.cancelled then pcall(w.h.wait, w.h, 5) end
    end
    pcall(self._check_workers, self)
  end
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
function Pool:_pump(deadline)
  if self._owner ~= getpid() then return end
  local t = now()
  local drained = self:_drain()
  if drained > 0 and t < (self._next_check or 0) then return end
  self._next_check = t + 0.05
  -- a lost task has settled: the caller may be waiting for just that
  if self:_check_workers() > 0 then return end
  local wake = deadline
  if (self._timed or 0) > 0 then
    local due = self:_check_timeouts()
    local slice = now() + SLICE
    if due and due < slice then slice = due end
    if not wake or slice < wake then wake = slice end
  end
  -- results came: the caller may have what it waits for (an imap's next
  -- chunk), so no sleep until the next result
  if drained > 0 then return end
  -- nothing can happen: do not sleep
  if deadline == 0 or next(self._workers) == nil or
     (next(self._tasks) == nil and deadline == nil and self._state ~= "CLOSE") then
    return
  end
  local objs = {self._rq}
  for _, w in pairs(self._workers) do objs[#objs + 1] = w.sentinel end
  local timeout = wake and math.max(wake - now(), 0) or nil
  connection.wait(objs, timeout)
  self:_drain()
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

-- The job of a task record.
local function job_of(rec)
  if rec == nil or rec == ORPHAN then return nil end
  if rec._kind then return rec end
  return rec[1]
end

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

-- Cancels the jobs of the list (unfinished futures): their tasks leave the
-- books and go to the cancel ring (workers skip them), and each job ends
-- cancelled.  With kill, workers running their tasks are killed and
-- replaced; without, a job with a running task is left alone.
function Pool:_cancel_jobs(jobs, kill)
  if self._owner ~= getpid() or (self._state ~= "RUN" and self._state ~= "CLOSE") then
    return
  end
  self:_drain()
  local running = {}            -- tag -> slot, for the tasks workers hold
  for slot in pairs(self._workers) do
    local tag = self._tq:_taken(slot)
    if tag and self._tasks[tag] then running[tag] = slot end
  end
  local want, untagged = {}, false
  for _, job in ipairs(jobs) do
    if not job._done then
      want[job] = true
      if not job._tag then untagged = true end
    end
  end
  if not kill then
    for tag in pairs(running) do
      local job = job_of(self._tasks[tag])
      if job then want[job] = nil end
    end
  end
  if next(want) == nil then return end
  local tags = {}
  if untagged then
    for tag, rec in pairs(self._tasks) do
      if want[job_of(rec) or false] then tags[#tags + 1] = tag end
    end
  else
    for job in pairs(want) do
      if self._tasks[job._tag] == job then tags[#tags + 1] = job._tag end
    end
  end
  local kill_slots = {}
  for _, tag in ipairs(tags) do
    self._tasks[tag] = nil
    if self._timeouts[tag] then
      self._timeouts[tag] = nil
      self._timed = self._timed - 1
    end
    if running[tag] then kill_slots[#kill_slots + 1] = running[tag] end
  end
  table.sort(tags)
  local cancel = self._cancel
  local i = 1
  while i <= #tags and tags[i] < 1 << (63 - CANCEL_BITS) do
    local first, n = tags[i], 1
    while i + n <= #tags and tags[i + n] == first + n and n < CANCEL_MAX do
      n = n + 1
    end
    local count = cancel[1]
    cancel[count % CANCEL_RING + 2] = (first << CANCEL_BITS) | n
    cancel[1] = count + 1
    i = i + n
  end
  for job in pairs(want) do job:_set_cancelled() end
  if #kill_slots > 0 then
    for _, slot in ipairs(kill_slots) do
      local w = self._workers[slot]
      w.cancelled = self._tq:_taken(slot)
      pcall(w.h.signal, w.h, "SIGKILL")
    end
    -- reaped and replaced now: no zombie waits for the next call
    for _, slot in ipairs(kill_slots) do
      local w = self._workers[slot]
      if w then pcall(w.h.wait, w.h, 5) end
    end
    self:_check_workers()
  end
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
  self:_cancel_jobs(jobs, false)
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
function Pool:timeout()
  local due = self._ev_due
  if due == nil then return nil end
  return math.max(due - now(), 0)
end

do
  local release = Pool._release
  function Pool:_release()
    release(self)
    if self._ev then self._ev:close() end
  end
end

-- Every public method checks its self first: pool.map(f, t), Python's
-- habit, gets "use pool:map(...)" at the caller's line, not an index error
-- deep in here.  (The private _methods are called by this file only.)
local function is_pool(v) return getmetatable(v) == Pool end
local function is_result(v) return getmetatable(v) == AsyncResult end
local function check_selves(cls, clsname, var, is_cls)
  local public = {}
  for k, f in pairs(cls) do
    if type(f) == "function" and not k:find("^_") then public[k] = f end
  end
  util.checked_methods(public, clsname, var, is_cls)
  for k, f in pairs(public) do cls[k] = f end
end
check_selves(Pool, "Pool", "pool", is_pool)
check_selves(AsyncResult, "AsyncResult", "result", is_result)

M.AsyncResult = AsyncResult
return M
