-- multiprocessing.pool_worker: a pool's worker -- how it is started
-- (spawn) and its loop: take a task, run it, put its reply.
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
local process = require "multiprocessing.process"
local forkserver = require "multiprocessing.forkserver"
local proto = require "multiprocessing.pool_proto"

local decode, now, new_error = core.decode, core.now, core.new_error
local unpack = table.unpack
local APPLY, MAP1, STARMAP1, STARMAP = proto.APPLY, proto.MAP1, proto.STARMAP1,
                                       proto.STARMAP
local MAP, APPLYV = proto.MAP, proto.APPLYV
local OK, FAILED, INIT_FAILED = proto.OK, proto.FAILED, proto.INIT_FAILED
local SKIPPED = proto.SKIPPED
local CANCEL_RING, CANCEL_BITS, CANCEL_MAX, BAR = proto.CANCEL_RING,
  proto.CANCEL_BITS, proto.CANCEL_MAX, proto.BAR

local M = {}

local FCACHE_MAX = 512       -- decoded functions a worker keeps
local TRUSTED = {trusted = true}

-- the function of the chunk a worker runs (to name it in tracebacks)
local chunk_fn
-- the levels of the stack from run_chunk down, while it runs a chunk
-- (see chunk_stop)
local chunk_below
local chunk_stop

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
    local drop = last and (last:find("multiprocessing/pool_worker%.lua:%d+:") or
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
  return {value = e, traceback = tb, done = chunk_below and chunk_stop()}
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

-- Runs f over items 1..n of a chunk, results into out.  The loops keep
-- no count of the items done: an upvalue written per item was ~58 of a
-- small item's ~400 instructions (callgrind).  Where a chunk stopped is
-- read from the stack instead, by the message handler (chunk_stop).
local function run_items(f, items, n, out, star, stamp)
  if stamp or star then
    for k = 1, n do
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
      out[k] = f(items[k])
    end
  end
end

-- The depth of the stack, counted from this function's own level (1):
-- a binary search, so levels(), costs O(depth log depth), not a walk
-- per level (getinfo(n) walks n levels).
local getinfo, getlocal = debug.getinfo, debug.getlocal
local function levels()
  local lo, hi = 1, 2                 -- lo exists; find one that does not
  while getinfo(hi, "l") do lo, hi = hi, hi * 2 end
  while hi - lo > 1 do
    local mid = (lo + hi) // 2
    if getinfo(mid, "l") then lo = mid else hi = mid end
  end
  return lo
end

-- In the message handler: how many items of the chunk finished -- the
-- loop variable k of run_items's frame, less one.  That frame is found
-- by its distance from the bottom of the stack: run_chunk's frames
-- (chunk_below) and xpcall's under it.  nil when not found.
chunk_stop = function()
  -- (levels' numbering is this function's plus one; from the top:
  -- levels, this function, the handler, ..., run_items, xpcall, run_chunk
  -- and the chunk_below - 1 frames under it)
  local level = levels() - chunk_below - 2
  local info = level >= 1 and getinfo(level, "f")
  if not info or info.func ~= run_items then return nil end
  for i = 1, 255 do
    local name, v = getlocal(level, i)
    if name == nil then break end
    if name == "k" then return v - 1 end
  end
  return nil
end

-- (the stack under run_chunk is the same for every chunk: measured once)
local below
local function run_chunk(f, items, n, out, star, stamp)
  below = below or levels() - 1
  chunk_below = below
  local ok, err = xpcall(run_items, traceback, f, items, n, out, star, stamp)
  chunk_below = nil
  -- (no count: an error the handler did not see, memory or one in the
  -- handler itself -- none of the chunk's results are kept)
  return ok, err, not ok and type(err) == "table" and err.done or 0
end


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

-- A task's print or io.write clears the owner's progress bar first, when
-- one is drawn, so that its output is on a line of its own.  The clear
-- goes to stdout ahead of the text, in stdout's buffer: both leave in one
-- write, so the owner's redraw cannot come between them (it goes before,
-- and is cleared, or after, on the next line).  Only when stdout is the
-- terminal too: a file gets no escapes.
local function clear_bar_before_output(cancel)
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
end

-- Runs the pool's initializer; false (its error sent to the owner) when
-- it failed.
local function run_initializer(cfg)
  local a, rq = cfg.initargs, cfg.rq
  local ok, err = xpcall(cfg.initializer, traceback, unpack(a, 1, a.n or #a))
  if not ok then
    local e = remote_error(err)
    if not pcall(rq.put, rq, {-1, INIT_FAILED, e}) then
      rq:put({-1, INIT_FAILED, new_error("RemoteError", e.message,
                                         {traceback = e.traceback})})
    end
    return false
  end
  cfg.started[cfg.slot + 1] = -1        -- the initializer is done
  return true
end

-- Decoded functions, by their encoding (inline) or store offset: a
-- function resolve(fr, flen) with its cache.
local function new_resolver(store)
  local fns, nfns = {}, 0
  return function(fr, flen)
    local f = fns[fr]
    if f == nil then
      -- the pool's own store or task message: trusted (bytecode)
      f = decode(flen and store:get(fr, flen) or fr, TRUSTED)
      if nfns >= FCACHE_MAX then fns, nfns = {}, 0 end
      fns[fr], nfns = f, nfns + 1
    end
    return f
  end
end

-- An apply's reply (see pool_proto), put straight from its values: no
-- table for one result, none around the record (callgrind: a {tag, OK,
-- n, v} table encoded was ~1.8k of a small task's ~12.6k instructions in
-- a worker, most of it lua_next's walk of it).  Returns pcall's ok, err.
local function send_apply(rq, put_task, tag, ok, ...)
  if not ok then return pcall(rq.put, rq, {tag, FAILED, remote_error((...))}) end
  local n = select("#", ...)
  if n == 1 then return pcall(put_task, rq, 0, tag, OK, 1, ...) end
  return pcall(put_task, rq, 0, tag, OK, n, {...})
end

-- Runs an apply of a table of arguments or a bare item and puts its
-- reply; returns pcall's ok, err of the put.  (An APPLYV's arguments are
-- the task's own items: see worker_main.)
local function run_one(rq, put_task, f, tag, mode, items, n)
  if mode == APPLY then
    return send_apply(rq, put_task, tag, xpcall(f, traceback, unpack(items, 1, n)))
  end
  local ok, v
  chunk_fn = f
  if mode == MAP1 then ok, v = xpcall(f, traceback, items)
  else ok, v = xpcall(f, traceback, unpack(items, 1, items.n or #items)) end
  chunk_fn = nil
  if ok then return pcall(put_task, rq, 0, tag, OK, 1, v) end
  return pcall(rq.put, rq, {tag, FAILED, remote_error(v), nil, 0})
end

-- Runs one chunk; its reply: {tag, OK, n, results}, or {tag, FAILED,
-- err, partial results, count}.
local function run_task(f, tag, mode, items, n, stamp)
  -- the results go into the chunk's own table, each over the item it
  -- came from: a store into a slot that holds a value is Lua's fast path
  -- (into a new table's empty slot it is luaV_finishset, ~96 of a map
  -- item's ~860 instructions in a worker, callgrind), and no second table
  local out = items
  chunk_fn = f
  local ok, err, count = run_chunk(f, items, n, out, mode == STARMAP, stamp)
  chunk_fn = nil
  if ok then return {tag, OK, n, out} end
  for k = count + 1, n do out[k] = nil end   -- (the items not done)
  return {tag, FAILED, remote_error(err), out, count}
end

-- A reply that cannot travel: the task fails, the worker lives.  An
-- EncodeError names the result, not the reply's insides: an apply's k-th
-- value (reply[4], or reply[4][k] for several), a chunk's j-th item (reply[4][j], renumbered over
-- the whole input by the owner).
local function unsendable(err, mode)
  if not core.is_error(err, "EncodeError") then return err end
  local msg, j, rest = err.message, nil, nil
  if mode == APPLY or mode == APPLYV then
    -- (one result is item 4 of the reply; several are a table there)
    local head, k, tail = msg:match("^(.-) at value%[4%]%[(%d+)%](.*)$")
    if head then
      msg = string.format("%s at result[%s]%s", head, k, tail)
    else
      msg = msg:gsub(" at value%[4%]", " at result[1]", 1)
    end
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
  return err
end

local function worker_main(cfg)
  process._become_child(cfg.name, true, cfg.owner_pid)
  -- woken, a worker does not preempt its owner (see sys.c's
  -- l_sched_batch)
  core._sched_batch()
  -- (a worker forked by a task in a worker inherits its stack and the
  -- depth measured there)
  below = nil
  local tq, rq, slot = cfg.tq, cfg.rq, cfg.slot
  local starts, started, cancel = cfg.starts, cfg.started, cfg.cancel
  clear_bar_before_output(cancel)
  if cfg.initializer and not run_initializer(cfg) then return 1 end
  local resolve = new_resolver(cfg.store)
  local put_reply, get_slot, will_get = rq._put_task, tq._get_slot, tq._will_get
  local stamp = function() starts[slot + 1] = now() end
  local done, limit = 0, cfg.maxtasks
  -- A reply, put after the promise that this worker takes its next task
  -- at once: the owner's next task, often put before this worker is back
  -- in get, then wakes no other worker (see queue.c's q_will_get).
  local function put_task(q, ...)
    if not limit or done + 1 < limit then will_get(tq) end
    return put_reply(q, ...)
  end
  -- An APPLYV's reply from xpcall's results: one value goes as put_task
  -- puts it, without its vararg call (send_apply does the rest).
  local function reply_apply(tag, ok, ...)
    if not ok or select("#", ...) ~= 1 then return send_apply(rq, put_task, tag, ok, ...) end
    if not limit or done + 1 < limit then will_get(tq) end
    return pcall(put_reply, rq, 0, tag, OK, 1, ...)
  end
  -- (the cancel ring's first word read by its __index itself: indexing
  -- the RawArray from Lua goes through the metamethod call, ~600 of a
  -- round trip's ~8.5k worker instructions with callgrind)
  local cancel_at = debug.getmetatable(cancel).__index
  -- One task, given as the items of its message (no table decoded for
  -- it: callgrind put the task's table at ~1.4k of a small apply's ~9.3k
  -- instructions here, its making and filling and collecting): tag,
  -- function, mode, items, n, timed, function length, then an APPLYV's
  -- arguments.  Returns true to go on, false for the close sentinel (the
  -- message false), nil at maxtasksperchild.
  local function step(tag, fr, mode, items, n, timed, flen, ...)
    if not tag then return false end
    -- (a cancelled task is skipped, and said so: the owner may have
    -- found it taken -- running -- as it cancelled; see Pool:_cancel_jobs)
    if cancel_at(cancel, 1) ~= 0 and is_cancelled(cancel, tag) then
      pcall(rq.put, rq, {tag, SKIPPED})
      return true
    end
    local f = resolve(fr, flen)
    if timed then
      starts[slot + 1] = now()
      started[slot + 1] = tag
    end
    local ok, err
    if mode == APPLYV then
      ok, err = reply_apply(tag, xpcall(f, traceback, ...))
    elseif mode ~= MAP and mode ~= STARMAP then
      ok, err = run_one(rq, put_task, f, tag, mode, items, n)
    else
      local reply = run_task(f, tag, mode, items, n, timed and stamp or nil)
      if reply[2] == OK then
        -- a chunk's results: out[1..n] sent as a slice (no lua_next), the
        -- record tagged with the task's tag (the owner's _get_items puts
        -- them straight into the map's result table)
        ok, err = pcall(rq._put_slice, rq, tag, 4, 1, n, tag, OK, n, reply[4])
      else
        ok, err = pcall(rq.put, rq, reply)
      end
    end
    if not ok then rq:put({tag, FAILED, unsendable(err, mode)}) end
    done = done + 1
    if limit and done >= limit then return nil end
    return true
  end
  while true do
    local go = step(get_slot(tq, slot, nil, nil, true))
    if not go then
      -- false: the pool is closing; tell the owner this worker took its
      -- sentinel, so that it is not replaced
      if go == false then started[slot + 1] = -2 end
      break
    end
  end
  return 0
end

-- Starts the worker of slot for pool self (a new one or a replacement).
function M.spawn(self, slot)
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
  local h
  if (self._start_method or forkserver.method()) == "forkserver" then
    cfg.owner_pid = core.getpid()
    h = forkserver.spawn("multiprocessing.pool_worker", "main", cfg,
                         "pool", true, true, true)
  else
    h = core.spawn(worker_main, cfg, true, true, true)
  end
  -- (proc: the worker as mp.active_children() lists it)
  self._workers[slot] = {h = h, pid = h:pid(), sentinel = h:sentinel(),
                         proc = process._adopt(name, h)}
end

M.main = worker_main   -- (what a child of the fork server runs)

return M
