-- multiprocessing.manager_kernel: what the objects a manager serves call
-- on their server (manager_types.lua's T.kernel) -- answering requests
-- (reply), parking a request until it can be answered or its timeout
-- passes (the timer heap the server's loop runs), what a client holds of
-- lock-like objects, running user code, checking that a value can be
-- stored, and showing values in __tostring.
local core = require "multiprocessing.core"
local T = require "multiprocessing.manager_types"
local state = require "multiprocessing.manager_state"
local pretty = require "multiprocessing.pretty"

local now = core.now
local is_error, new_error = core.is_error, core.new_error
local encode = core.encode
local REC_MT = state.REC_MT

local M = {}

local srv   -- the server this process runs (one per process)
function M.set_server(s) srv = s end
local K = T.kernel

-- A reply's message: one table, reused (a new one if a finalizer run by
-- the encoder replies meanwhile).
local out, out_busy = {0, 0, 0, 0}, false

local function reply(C, seq, status, v, extra)
  if seq == 0 or C.closed then return end
  local m = out_busy and {0, 0, 0, 0} or out
  local was_busy = out_busy
  out_busy = true
  state.reply_to = C
  m[1], m[2], m[3], m[4] = seq, status, v, extra
  local ok, err = pcall(C.send, C.conn, m)
  m[3], m[4] = nil, nil
  out_busy = was_busy
  state.reply_to = nil
  if ok then
    if err == true then M.block(C)   -- (queued: see M.block)
    elseif C.next_conn then M.switch(C) end
    return
  end
  if is_error(err, "EncodeError") then
    -- the result cannot travel: say so instead
    ok, err = pcall(C.send, C.conn, {seq, 2,
      "cannot send the result: " .. tostring(err.message)})
    if ok then
      if err == true then M.block(C) end
      return
    end
  end
  if tostring(err):find("reads none of its answers", 1, true) then
    io.stderr:write(string.format("manager: dropped the client of process %s: %s\n",
                                  tostring(C.pid), tostring(err)))
    io.stderr:flush()
  end
  -- (as Server:handle reports its internal errors: M.quick replies
  -- outside it)
  ok, err = pcall(srv.drop, srv, C, err)
  if not ok then
    io.stderr:write("manager: internal error: ", tostring(err), "\n")
    io.stderr:flush()
  end
end

local heap = {}   -- timers: {t = deadline, P = parked request}, min-heap

local function heap_push(e)
  local i = #heap + 1
  heap[i] = e
  while i > 1 do
    local p = i // 2
    if heap[p].t <= e.t then break end
    heap[i], heap[p] = heap[p], e
    i = p
  end
end

local function heap_pop()
  local top, n = heap[1], #heap
  local last = heap[n]
  heap[n] = nil
  n = n - 1
  if n > 0 then
    local i = 1
    heap[1] = last
    while true do
      local l, r, m = 2 * i, 2 * i + 1, i
      if l <= n and heap[l].t < heap[m].t then m = l end
      if r <= n and heap[r].t < heap[m].t then m = r end
      if m == i then break end
      heap[i], heap[m] = heap[m], heap[i]
      i = m
    end
  end
  return top
end

-- K.park(C, timeout, on_timeout) -> P: the request being served waits.
-- on_timeout(P) runs when timeout seconds pass first (it normally answers
-- P; a Condition re-queues instead).
function K.park(C, timeout, on_timeout)
  local P = {C = C, seq = C.cur_seq, done = false}
  if C.cur_seq ~= 0 then C.parked[C.cur_seq] = P end
  if timeout then
    P.deadline = now() + timeout
    P.on_timeout = on_timeout
    heap_push({t = P.deadline, P = P})
  end
  return P
end

function K.unpark_timer(P) P.deadline = nil end

local function finish(P)
  if P.done then return false end
  P.done = true
  P.deadline = nil
  P.C.parked[P.seq] = nil
  return true
end

function K.resolve(P, v)
  if finish(P) then reply(P.C, P.seq, 0, v) end
end

function K.reject(P, err)
  if finish(P) then reply(P.C, P.seq, 1, err) end
end

-- What a client holds of a lock-like object (released if it dies).
function K.hold(C, obj, n)
  C.locking[obj] = (C.locking[obj] or 0) + n
end

function K.unhold(C, obj, n)
  local have = C.locking[obj]
  if have then
    have = have - n
    C.locking[obj] = have > 0 and have or nil
  end
end

-- User code (apply's function, sort keys, a Barrier's action): its errors
-- are the referent's own and travel back as they are.
function K.call(fn, ...)
  local t = type(fn)
  if t ~= "function" then
    local mt = getmetatable(fn)
    if not (mt and mt.__call) then
      core.raise("ValueError", "expected a function, got " .. t)
    end
  end
  return fn(...)
end

-- (while checking, managed objects inside v are encoded as placeholders:
-- no hold or token is taken for an encoding that goes nowhere)
local CHECKING = {}

function K.check_storable(v)
  state.reply_to = CHECKING
  local ok, err = pcall(encode, v)
  state.reply_to = nil
  if not ok then
    error(is_error(err) and err or new_error("EncodeError", tostring(err)), 0)
  end
end

-- the record serving v (made on first use): a referent's method returns
-- it to hand out a proxy of another object it made (manager_pool.lua)
function K.rec_for(v) return srv:rec_for(v) end

function K.rec_of(v)
  if getmetatable(v) == REC_MT then return v end
  return nil
end

function K.typename(obj)
  local mt = getmetatable(obj)
  return type(mt) == "table" and (mt.__name or mt.__typeid) or type(obj)
end

function K.show(v)
  if getmetatable(v) == REC_MT then return tostring(v) end
  if type(v) == "table" and getmetatable(v) == nil then
    return pretty.pretty(v, {width = math.huge})
  end
  if type(v) == "string" then return pretty.quote(v) end
  return tostring(v)
end

function K.key_text(k)
  if pretty.is_name(k) then return k end
  return "[" .. K.show(k) .. "]"
end

-- xpcall handler: error objects stay as they are; any other value is
-- kept (value) with its text and the server's traceback (the frames
-- only: the message is not repeated in it).
function M.traceback(e)
  if is_error(e) then return e end
  local tb = debug.traceback("", 2):gsub("^\n", "")
  return {value = e, message = tostring(e), traceback = tb}
end

-- What xpcall returned on failure, as traceback() makes it: Lua calls
-- no handler for a memory error, which comes as its bare message.
function M.caught(r)
  if is_error(r) or (type(r) == "table" and r.message ~= nil) then return r end
  return {value = r, message = tostring(r)}
end

-- The usual request, run without Server:handle's layers (issue 18: the
-- receive/handle/handle1/run calls and two xpcalls were a third of the
-- server's instructions per dict get): a method of a typed (not "auto")
-- object from a client with no failed pipelined write to report: a
-- pipelined write (seq 0), or a request that needs no drain first (the
-- only client, or the one the poll found alone: Server:drain).  Anything
-- else returns false untouched, for Server:handle; so does anything odd.
local PARKED, MAX_ARGS = T.PARKED, 1000
local mtype, unpack = math.type, table.unpack
function M.quick(C, msg)
  if type(msg) ~= "table" or C.err then return false end
  local seq, id, meth = msg[1], msg[2], msg[3]
  if mtype(seq) ~= "integer" or seq < 0 or id == 0 or
     type(meth) ~= "string" then
    return false
  end
  local s = srv
  if seq ~= 0 and s.nclients > 1 and s.alone ~= C and not s.draining then
    return false
  end
  local rec = s.recs[id]
  if rec == nil or rec.typeid == "auto" then return false end
  local n = msg.n or #msg
  if mtype(n) ~= "integer" or n < 3 or n > MAX_ARGS + 3 then return false end
  local obj = rec.obj
  local mt = getmetatable(obj)
  local f = type(mt) == "table" and mt[meth]
  if type(f) ~= "function" or (meth ~= "__get" and meth:byte(1) == 95 and
                               meth ~= "__tostring") then
    return false
  end
  C.cur_seq = seq
  local ok, r = xpcall(f, M.traceback, obj, C, unpack(msg, 4, n))
  if ok then
    if r ~= PARKED then reply(C, seq, 0, r) end
    return true
  end
  r = M.caught(r)
  if not is_error(r) then r = r.value end
  if seq ~= 0 then reply(C, seq, 1, r); return true end
  -- a failed write: reported at the client's next request (Server:handle1)
  C.err, C.err_what, C.dropped = r, string.format("pipelined %s on " ..
    "managed object #%s failed", tostring(meth), tostring(id)), 0
  return true
end

-- Request "pipe" (id 0): an authenticated client hands the server one
-- end of a pair of pipes (manager_client.lua's hello); the answer goes on
-- its socket, then the client's requests come and are answered on the
-- pipes (M.switch).  A round trip over pipes costs the kernel about half
-- what it costs over a Unix socket on this kind of VM (issue 18: two C
-- processes on one CPU, polling 3 fds, 20-42k round trips/s over pipes,
-- 8-22k over a socketpair).
-- (Past PIPE_CLIENTS clients the server keeps their sockets: two fds
-- each instead of one.)
local PIPE_CLIENTS = 256
function M.op_pipe(_, C, conn)
  if not C.trusted or C.next_conn or type(conn) ~= "userdata" or
     getmetatable(conn) ~= getmetatable(C.conn) then
    return nil, "pipe: expected a connection, from an authenticated client"
  end
  if srv.nclients > PIPE_CLIENTS then
    pcall(conn.close, conn)
    return nil, "pipe: too many clients, keep the socket"
  end
  C.next_conn = conn
  return true
end

function M.switch(C)
  local new = C.next_conn
  C.next_conn = nil
  pcall(C.conn.close, C.conn)
  C.conn, C.fd, C.wfd = new, new:fileno(), new:_serve_mode()
  srv.dirty, srv.dirty_c = true, true
end

-- A client that does not read its answers (stopped, or only sending)
-- must not stall the others: its connection never waits to write (serve
-- mode, conn.c), and what the fd did not take waits in it.  Such a
-- client is blocked (C.blocked): the loop reads nothing more from it and polls its
-- fd for writing instead (fd + POLLOUT_FD), until its answers are out.
local POLLOUT_FD = 1 << 32
function M.block(C)
  if C.blocked then return end
  C.blocked = true
  srv.dirty, srv.dirty_c = true, true
end

function M.poll_fd(C)
  return C.blocked and C.wfd + POLLOUT_FD or C.fd
end

-- The loop found a blocked client's fd writable (or closed): its
-- answers go out; once all are, it is served again (the messages it had
-- sent meanwhile are still in its socket); a client gone is dropped.
function M.unblock(C)
  local ok, left = pcall(C.conn._flush_out, C.conn)
  if ok and left > 0 then return end
  C.blocked = nil
  srv.dirty, srv.dirty_c = true, true
  if not ok then return srv:drop(C, left) end
  if C.next_conn then M.switch(C) end
  if srv.buffered(C.conn) or C.conn:poll() then srv.more[C] = true end
end

-- The server loop's timers: parked requests whose timeout passed.
function M.run_timers()
  if heap[1] == nil then return end
  local t = now()
  while heap[1] and heap[1].t <= t do
    local e = heap_pop()
    local P = e.P
    if not P.done and P.deadline == e.t then
      P.deadline = nil
      if P.on_timeout then P.on_timeout(P) else K.resolve(P, nil) end
    end
  end
end

-- Seconds the serving loop may wait: 0 while a client has more to read,
-- else until the first timer or the listener's next wake-up (nil: none).
function M.next_timeout(more, lwake)
  local timeout = nil
  if next(more) then
    timeout = 0
  elseif heap[1] then
    timeout = math.max(heap[1].t - now(), 0)
  end
  if lwake then
    local t = math.max(lwake - now(), 0)
    if timeout == nil or t < timeout then timeout = t end
  end
  return timeout
end

M.K, M.reply, M.finish, M.CHECKING = K, reply, finish, CHECKING
M.heap, M.heap_pop = heap, heap_pop
return M
