-- multiprocessing.pool: the Pool's public face -- mp.Pool(), checking
-- arguments and submitting tasks (apply, map, starmap, imap and their
-- _async forms).  The rest lives beside it: pool_worker (the workers),
-- pool_results (AsyncResult), progress (the bar), pool_owner (the class
-- and the owner's machinery), pool_events (futures, event loops).
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

local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local proto = require "multiprocessing.pool_proto"
local worker = require "multiprocessing.pool_worker"
local results = require "multiprocessing.pool_results"
local progress = require "multiprocessing.progress"
local Pool = require "multiprocessing.pool_events"

local encode, now = core.encode, core.now
local upvalue_snapshot, upvalues_same = core.upvalue_snapshot, core.upvalues_same
local table_new = core.table_new
local new_error = core.new_error
local getpid = core.pid or core.getpid
local argerror, typeerror = util.argerror, util.typeerror
-- (errors of a public call: led by the caller's file:line)
local raise = util.raise
local APPLY, MAP, STARMAP, MAP1, STARMAP1 = proto.APPLY, proto.MAP,
  proto.STARMAP, proto.MAP1, proto.STARMAP1
local APPLYV, FLAT_MAX = proto.APPLYV, proto.FLAT_MAX
local NO_OPTIONS, ORPHAN, CANCEL_RING = proto.NO_OPTIONS, proto.ORPHAN,
  proto.CANCEL_RING
local AsyncResult, new_job, finish = results.AsyncResult, results.new_job,
  results.finish
local new_apply = results.new_apply
local unpack, rawmt = table.unpack, debug.getmetatable
local new_imap = results.new_imap
local new_progress, spawn_worker = progress.new, worker.spawn
local check_running = Pool._check_running

local M = {}

local INLINE_MAX = 512       -- function encodings up to this travel inline
local FBLOBS_MAX = 1024      -- stored encodings the owner remembers

local pool_count = 0

local function check_function(f, argn, fname)
  if type(f) ~= "function" then typeerror(argn, fname, "function", f) end
end

function M.Pool(opts, initializer, initargs, maxtasksperchild)
  if type(opts) == "table" and opts.broker ~= nil then
    -- beyond one machine: tasks go through Redis to worker daemons
    return require("multiprocessing.broker_pool").Pool(opts)
  end
  local n, method
  if type(opts) == "table" then
    n = opts.processes
    -- Python's Pool(context=): a context (mp.get_context) or a method name
    method = opts.context ~= nil and
             require("multiprocessing.context").method_of(opts.context, "Pool")
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
    _workers = {}, _tasks = {}, _timeouts = {}, _tag = 1, _pending = {},
    _jobs = setmetatable({}, {__mode = "k"}),
    _fblobs = {}, _nfblobs = 0, _fcache = setmetatable({}, {__mode = "k"}),
    _timed = 0, _next_check = 0, _start_method = method or nil,
  }, Pool)
  for slot = 0, n - 1 do self._started[slot + 1] = -1 end
  self._put = self._tq._put_task     -- (looked up once, not per task)
  -- (a worker that cannot start -- fork failed, an initializer the fork
  -- server cannot be sent -- takes the ones started down with it)
  local ok, err = pcall(function()
    for slot = 0, n - 1 do spawn_worker(self, slot) end
  end)
  if not ok then
    pcall(self.terminate, self)
    error(err, 0)
  end
  return self
end

-- The task's function reference.  The codec's encoding of f (bytecode and
-- the upvalues' current values) goes inline the first time; when the same
-- encoding is sent again -- the same function, unchanged upvalues -- it is
-- put in the store once and tasks carry only its place.  A map sends its
-- function with many tasks, so it is stored at once (stored = true).
-- Encodings too big to copy into every task are always stored.
local store_blob
local function fref_of(self, f, stored)
  local c = self._fcache[f]
  -- unchanged since the last submission: the same encoding, stored now
  -- (fixed: a function without upvalues has nothing that could change)
  if c and (c.fixed or c.snap and upvalues_same(f, c.snap)) then
    if c.ref then return c.ref end
    if not stored and c.inline_left > 0 then
      c.inline_left = c.inline_left - 1
      return c.blob
    end
    c.ref = store_blob(self, c.blob)
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
  c = {blob = blob, snap = upvalue_snapshot(f), inline_left = 1,
       fixed = debug.getinfo(f, "u").nups == 0}
  self._fcache[f] = c
  if not stored and #blob <= INLINE_MAX then return blob end
  c.ref = store_blob(self, blob)
  return c.ref
end
Pool._fref = fref_of

-- Appends an encoding to the store, once.
function store_blob(self, blob)
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
  if not core.is_error(err, "EncodeError") then return err end
  local path, root, from = {}, "iterable", 2
  if mode == APPLYV then
    -- (an APPLYV's arguments are the message's items 8 ..)
    if math.type(err.path[1]) ~= "integer" or err.path[1] < 8 then return err end
    path[1], root = err.path[1] - 7, "args"
  elseif err.path[1] ~= 4 then return err
  elseif mode == APPLY then root = "args"
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
Pool._rename_path = rename_path

-- Puts one task on the queue: {tag, function, mode, items, n, timed,
-- function length when stored}; rec is what the reply settles.  With
-- last: the task's items are items[first..last], sent as a slice of the
-- caller's table (no table cut for the chunk).  An apply of up to
-- FLAT_MAX arguments (in a plain table) goes as an APPLYV (_put_apply).
local book, put_apply
local function submit(self, rec, fref, mode, items, n, first, timeout, last)
  if mode == APPLY and n <= FLAT_MAX and rawmt(items) == nil then
    return put_apply(self, rec, fref, timeout, n, unpack(items, 1, n))
  end
  local tag = self._tag
  local f, flen = fref, nil
  if type(fref) ~= "string" then f, flen = fref[1], fref[2] end
  local ok, err
  if last then
    ok, err = pcall(self._tq._put_slice, self._tq, tag, 4, first, last,
                    tag, f, mode, items, n, timeout and true or false, flen)
  else
    ok, err = pcall(self._put, self._tq, tag,
                    tag, f, mode, items, n, timeout and true or false, flen)
  end
  if not ok then error(rename_path(err, mode, first), 0) end
  return book(self, tag, rec, timeout)
end
Pool._submit = submit

-- An apply of the n arguments ...: {tag, function, APPLYV, false, n,
-- timed, function length, ...}, the arguments items of the message
-- itself (no table made for them here, none decoded in the worker).
function put_apply(self, rec, fref, timeout, n, ...)
  local tag = self._tag
  local f, flen = fref, nil
  if type(fref) ~= "string" then f, flen = fref[1], fref[2] end
  local ok, err = pcall(self._put, self._tq, tag, tag, f, APPLYV, false, n,
                        timeout and true or false, flen, ...)
  if not ok then error(rename_path(err, APPLYV, 1), 0) end
  return book(self, tag, rec, timeout)
end
Pool._put_apply = put_apply

-- The books of task tag, put on the queue for rec.
function book(self, tag, rec, timeout)
  self._tag = tag + 1
  self._tasks[tag] = rec
  if timeout then
    self._timeouts[tag] = timeout
    self._timed = (self._timed or 0) + 1
    -- a loop's fd re-arms in poll() only: its timer starts looking now
    if self._ev and not self._ev_slice then self:_ev_arm() end
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

-- Every DRAIN_MASK + 1 tasks, apply_async takes the results that are
-- there (and runs their callbacks).  A loop of apply_async calls
-- otherwise leaves every reply in the result queue until its first get:
-- 2e4 of them, ~0.9 MiB of ring, each page new to the workers that write
-- it and to the owner that reads it -- and a page touched the first time
-- by a process costs ~17-30 us on this kind of VM (shadow paging; a C
-- loop touching fresh pages), 0.5-1 us a task.  Taken as they come, the
-- queue empties, its positions restart at the ring's start (queue.c) and
-- its pages stay the few warm ones.  (The owner does the same work per
-- result either way.)
local DRAIN_MASK = 31

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
  job._tag = self:_submit(job, fref, APPLY, args, args.n or #args, 1, opts.timeout)
  if job._tag & DRAIN_MASK == 0 then self:_drain() end
  return job
end

-- The blocking calls (apply, map, starmap) wait with a guard: when the
-- wait ends in an error while their job is unfinished -- Ctrl-C, the only
-- way out of it -- nobody can have the job any more, so it is cancelled.
local Guard = {__close = function(g, err)
  if err ~= nil and not g.job._done then g.pool:_cancel_jobs({g.job}, true) end
end}

local function get_guarded(pool, job)
  local _ <close> = setmetatable({pool = pool, job = job}, Guard)
  return job:get()
end

local function is_pool(v) return rawmt(v) == Pool end

-- (apply_async checks its own self: pool.lua's wrapper, below, costs a
-- vararg call and a getmetatable per task.  The common call -- a
-- function, an argument table, no options, a running pool -- goes
-- straight to the queue.)
function Pool:apply_async(f, args, opts, error_callback)
  if rawmt(self) ~= Pool then
    util.selferror("apply_async", "Pool", "pool", self, is_pool)
  end
  if opts == nil and error_callback == nil and self._state == "RUN" and
     type(args) == "table" and self._owner == getpid() then
    local n = args.n or #args
    -- a function without upvalues whose encoding is stored (the cache's
    -- keys are functions: no type check), a plain argument table: the
    -- task is put here, its arguments the message's own items (what
    -- submit, put_apply and book do, without their three calls, a vararg
    -- one among them, and two C calls: callgrind, ~1k of the owner's
    -- ~20k instructions a task)
    local c = self._fcache[f]
    if c and c.fixed and c.ref and n <= FLAT_MAX and rawmt(args) == nil then
      local tag, ref = self._tag, c.ref
      local job = new_apply(self, tag)
      local ok, err = pcall(self._put, self._tq, tag, tag, ref[1], APPLYV,
                            false, n, false, ref[2], unpack(args, 1, n))
      if not ok then error(rename_path(err, APPLYV, 1), 0) end
      self._tag, self._tasks[tag] = tag + 1, job
      if tag & DRAIN_MASK == 0 then self:_drain() end
      return job
    end
    if type(f) == "function" then
      local tag = self._tag
      local job = new_apply(self, tag)
      submit(self, job, fref_of(self, f), APPLY, args, n, 1, nil)
      if tag & DRAIN_MASK == 0 then self:_drain() end
      return job
    end
  end
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
      -- (into, at: where the owner's _get_items puts the chunk's results)
      self:_submit({job, first, last - first + 1, chunk,
                    into = job._results, at = first - 1}, fref, mode,
                   items, last - first + 1, first, timeout, last)
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
-- values do not end the loop.  The loop's state is an iterator object
-- (pool_results.lua's IMap); this checks the call and says how a chunk
-- is queued.
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
  local fref, timeout = nil, opts.timeout
  local function submit(rec, payload, k, first)
    if chunksize == 1 then
      self:_submit(rec, fref, MAP1, payload[1], 1, first, timeout)
    else
      self:_submit(rec, fref, MAP, payload, k, first, timeout)
    end
  end
  local it = new_imap(self, job, ordered, next_item, chunksize,
                      math.max(4, 2 * self._n), submit)
  if opts.progress then
    job._progress = new_progress(type(iterable) == "table" and
                                 seq_len(iterable, fname) or nil, self._cancel)
  end
  fref = self:_fref(f, true)
  -- (the loop's closing value is the iterator: see pool_results.lua)
  return function() return it:next() end, nil, nil, it
end

function Pool:imap(f, iterable, opts)
  return self:_imap(f, iterable, opts, true, "imap")
end

function Pool:imap_unordered(f, iterable, opts)
  return self:_imap(f, iterable, opts, false, "imap_unordered")
end

-- Every public method checks its self first: pool.map(f, t), Python's
-- habit, gets "use pool:map(...)" at the caller's line, not an index error
-- deep in here.  (The private _methods are called by this file only.)
local function is_result(v) return rawmt(v) == AsyncResult end
local function check_selves(cls, clsname, var, is_cls, skip)
  local public = {}
  for k, f in pairs(cls) do
    if type(f) == "function" and not k:find("^_") and not skip[k] then
      public[k] = f
    end
  end
  util.checked_methods(public, clsname, var, is_cls)
  for k, f in pairs(public) do cls[k] = f end
end
check_selves(Pool, "Pool", "pool", is_pool, {apply_async = true})
check_selves(AsyncResult, "AsyncResult", "result", is_result, results.SELF_CHECKED)

M.AsyncResult = AsyncResult
return M
