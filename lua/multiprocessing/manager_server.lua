-- multiprocessing.manager_server: the manager's server -- one process,
-- one Lua state, no threads: an event loop over a listener and its
-- clients' connections.
--
-- Protocol (every message goes through the codec, framed as connections
-- frame them).  A client sends {seq, id, method, args...} (field n when
-- an argument is nil): id 0 addresses the manager itself (create, adopt,
-- release...), any other id a managed object ("referent").  seq 0 means
-- "no reply": the pipelined writes (d[k] = v, l:append(v)...).  Each
-- other request gets exactly one reply {seq, status, value, extra}:
--   status 0  ok, value is the result
--          1  the referent's own error: value is the error value itself
--          2  any other failure: value is a message, extra the traceback
--          3  an earlier pipelined write failed: value is its error, extra
--             says which write and how many later ones were discarded
-- {-1, 2, message} answers a request that could not even be decoded (its
-- seq is unknown); the client raises it from the call it is waiting in.
--
-- Pipelined writes.  A connection is ordered, so when the reply to a
-- request arrives, every write sent before it has been carried out.  The
-- first pipelined write that fails is remembered for its client; the
-- client's later pipelined writes are discarded (the program would have
-- stopped at the failing statement had it been synchronous) and its next
-- request is not carried out: it is answered with status 3 instead.
--
-- Blocking methods park their request (K.park) and the loop answers it
-- later; parked requests with a timeout sit in a binary heap ordered by
-- deadline, which sets the poll timeout.
--
-- Lifetime of managed objects.  Each object has a record {id, obj,
-- typeid} ("rec").  A rec is kept strongly (in `pinned`) while a client
-- connection holds it or a proxy of it is in transit; a rec stored inside
-- another object (a list in a dict) is referenced from there, so Lua's
-- own collector frees objects that nothing refers to, cycles included.
--   * hold: a client process has proxies of it.  The client adopts it
--     (message adopt) when it decodes a proxy, releases it (release) once
--     its last proxy was collected; a reply that carries a proxy adds the
--     hold itself.  A connection that closes drops all its holds.
--   * transit: a proxy encoded by a client (into a queue, a pipe, a pool
--     task) takes a token (message transit) that keeps the object alive
--     until some process decodes it and adopts that token.  Tokens may
--     arrive in either order relative to their adoption (different
--     connections), so an adoption that comes first is remembered.
local core = require "multiprocessing.core"
require "multiprocessing.manager_containers"
local T = require "multiprocessing.manager_waiting"   -- (manager_types, every type loaded)
local state = require "multiprocessing.manager_state"
local connection = require "multiprocessing.connection"

local PARKED, DICT = T.PARKED, T.types.dict
local now, getpid, serve_gets = core.now, core.getpid, core._serve_gets
local is_error, new_error = core.is_error, core.new_error
local unpack = table.unpack
local REC_MT = state.REC_MT

local S = {}

local BATCH = 256      -- messages served from one client before the others get a turn
local MAX_ARGS = 1000  -- arguments a request may carry

-- ---- the kernel the referents use (manager_kernel.lua) ----------------------

local srv   -- the server this process runs (one per process)
local kernel = require "multiprocessing.manager_kernel"
local reply, finish, CHECKING = kernel.reply, kernel.finish, kernel.CHECKING
local run_timers, next_timeout = kernel.run_timers, kernel.next_timeout
local traceback, caught, quick = kernel.traceback, kernel.caught, kernel.quick
local poll_fd, unblock = kernel.poll_fd, kernel.unblock
local K = kernel.K

-- ---- records ------------------------------------------------------------------

local Server = {}
Server.__index = Server
S.Server = Server

-- id -> rec, for as long as the rec exists (weak)
local function weak_values() return setmetatable({}, {__mode = "v"}) end

function Server:new_rec(obj, typeid, exposed)
  local id = self.next_id
  self.next_id = id + 1
  local rec = setmetatable({id = id, obj = obj, typeid = typeid,
                            exposed = exposed, server = self, holds = 0,
                            transit = 0}, REC_MT)
  self.recs[id] = rec
  self.rec_by_obj[obj] = rec
  return rec
end

local function keep(self, rec)
  if rec.holds + rec.transit > 0 then self.pinned[rec.id] = rec
  else self.pinned[rec.id] = nil end
end

function Server:hold(C, rec)
  if not C.holds[rec.id] then
    C.holds[rec.id] = rec
    rec.holds = rec.holds + 1
    keep(self, rec)
  end
end

function Server:unhold(C, id)
  local rec = C.holds[id]
  if rec then
    C.holds[id] = nil
    rec.holds = rec.holds - 1
    keep(self, rec)
  end
end

-- The rec serving v (a registered callable's result): managed types as
-- they are, plain tables as dicts, other objects through their methods.
function Server:rec_for(v)
  if getmetatable(v) == REC_MT then return v end
  local rec = self.rec_by_obj[v]
  if rec then return rec end
  local mt = getmetatable(v)
  if type(mt) == "table" and T.types[rawget(mt, "__typeid") or false] == mt then
    return self:new_rec(v, mt.__typeid)
  end
  if mt == nil then
    rec = self:new_rec(T.dict_of(v), "dict")
    self.rec_by_obj[v] = rec
    return rec
  end
  return self:new_rec(v, "auto", T.exposed(v))
end

-- rec as registered typeid serves it (an object served through its
-- methods): register's exposed, method_to_typeid and proxytype.
function Server:typed_rec(rec, typeid)
  local entry = self.registry[typeid]
  if rec.typeid ~= "auto" or entry == nil then return rec end
  if entry.exposed then rec.exposed = entry.exposed end
  rec.allowed = nil
  rec.m2t = entry.method_to_typeid
  if entry.proxytype then rec.ptype = typeid end
  return rec
end

-- A transit token for rec, taken by the server itself (a proxy encoded
-- other than into a reply).
function Server:transit(rec, token)
  if self.early[token] then
    self.early[token] = nil
    return
  end
  if self.transits[token] then return end
  self.transits[token] = rec
  rec.transit = rec.transit + 1
  keep(self, rec)
end

function Server:consume(token)
  local rec = self.transits[token]
  if rec then
    self.transits[token] = nil
    rec.transit = rec.transit - 1
    keep(self, rec)
    return rec
  end
  self.early[token] = true
  return nil
end

-- Reducing a rec for the wire (manager_proxies.lua's reducer calls this):
-- a reply holds it for its client; anything else takes a token.
function Server:reduce_rec(rec)
  local C = state.reply_to
  if C == CHECKING then return {} end
  local token
  if C then
    self:hold(C, rec)
  else
    self.token_n = self.token_n + 1
    token = "s" .. self.token_n
    self:transit(rec, token)
  end
  return {self.uid, rec.id, rec.typeid, self.address, self.authkey ~= nil,
          C ~= nil, token, rec.exposed, rec.ptype}
end

-- Decoding a proxy of this very server (a proxy stored into an object,
-- or passed as an argument): its rec.
function Server:rebuild_rec(state)
  local id, token = state[2], state[7]
  local rec = self.recs[id]
  if token then self:consume(token) end
  if rec == nil then
    core.raise("ValueError", string.format("managed object #%s no longer " ..
               "exists (its last reference was dropped)", tostring(id)))
  end
  return rec
end

-- ---- manager-level requests (id 0) ---------------------------------------------

local ops = {}

function ops.hello(self, C, pid, ids)
  C.pid = pid
  if type(ids) == "table" then
    for _, id in ipairs(ids) do
      local rec = self.recs[id]
      if rec then self:hold(C, rec) end
    end
  end
  return {uid = self.uid, pid = getpid(), address = self.address}
end

function ops.create(self, C, typeid, ...)
  local entry = self.registry[typeid]
  if type(typeid) ~= "string" or entry == nil or entry.callable == nil then
    return nil, string.format("unknown typeid '%s'", tostring(typeid))
  end
  local v = entry.callable(...)
  local t = type(v)
  if t == "table" or (t == "userdata" and getmetatable(v) ~= nil) then
    return self:typed_rec(self:rec_for(v), typeid)
  end
  return v
end

function ops.adopt(self, C, id, token)
  local rec
  if token ~= nil then rec = self:consume(token) end
  rec = rec or self.recs[id]
  if rec then self:hold(C, rec) end
end

function ops.transit(self, C, id, token)
  local rec = self.recs[id]
  if rec then self:transit(rec, token) end
end

function ops.release(self, C, ...)
  for i = 1, select("#", ...) do self:unhold(C, (select(i, ...))) end
end

function ops.cancel(self, C, seq)
  local P = C.parked[seq]
  if P and finish(P) and P.on_drop then P.on_drop(P) end
end

function ops.ping() return true end
ops.pipe = kernel.op_pipe   -- (a client's move to pipes)

function ops.shutdown(self)
  self.running = false
  return true
end

-- Counts for tests and debugging (after a full collection).
function ops.info(self)
  collectgarbage()
  collectgarbage()
  local objects, pinned, clients, transits = 0, 0, 0, 0
  for _ in pairs(self.recs) do objects = objects + 1 end
  for _ in pairs(self.pinned) do pinned = pinned + 1 end
  for _ in pairs(self.clients) do clients = clients + 1 end
  for _ in pairs(self.transits) do transits = transits + 1 end
  return {objects = objects, pinned = pinned, clients = clients, transits =
    transits, pid = getpid(), drains = self.drains, quick = core._quick()}
end

-- ---- dispatch ------------------------------------------------------------------

-- Runs one decoded request; returns status, value, extra (status nil when
-- parked or pipelined without error).
function Server:run(C, msg)
  local seq, id, meth = msg[1], msg[2], msg[3]
  local n = msg.n or #msg
  if math.type(n) ~= "integer" or n < 3 or n > MAX_ARGS + 3 then
    return 2, "malformed request (argument count)"
  end
  C.cur_seq = seq
  if id == 0 then
    local op = ops[meth]
    if op == nil then
      return 2, string.format("unknown manager request '%s'", tostring(meth))
    end
    local ok, r, err = xpcall(op, traceback, self, C, unpack(msg, 4, n))
    if not ok then
      r = caught(r)
      if is_error(r) then return 1, r end
      return 2, r.message, r.traceback
    end
    if err then return 2, err end
    return 0, r
  end
  -- a write after an unreported failed write is discarded
  if seq == 0 and C.err then
    C.dropped = C.dropped + 1
    return nil
  end
  local rec = self.recs[id]
  if rec == nil then
    return 1, new_error("ValueError", string.format("managed object #%s no " ..
      "longer exists (its last reference was dropped)", tostring(id)))
  end
  local obj = rec.obj
  local ok, r
  if rec.typeid == "auto" then
    if meth ~= "call_method" then
      return 2, string.format("unknown method '%s'", tostring(meth))
    end
    local name = msg[4]
    if not rec.allowed then   -- exposed, as a set
      rec.allowed = {}
      for _, m in ipairs(rec.exposed or {}) do rec.allowed[m] = true end
    end
    if not rec.allowed[name] then
      return 1, new_error("ValueError", string.format("method '%s' is not " ..
        "exposed by this '%s' proxy", tostring(name), rec.ptype or "auto"))
    end
    ok, r = xpcall(T.call_method, traceback, obj, unpack(msg, 4, n))
    local to = ok and rec.m2t and rec.m2t[name]
    if to then   -- method_to_typeid: the result as a proxy
      local v = r[1]
      local t = type(v)
      if t == "table" or (t == "userdata" and getmetatable(v) ~= nil) then
        ok, r = pcall(function()
          return table.pack(self:typed_rec(self:rec_for(v), to))
        end)
      end
    end
  else
    local f = type(meth) == "string" and getmetatable(obj)[meth]
    if type(f) ~= "function" or (meth:byte(1) == 95 and meth ~= "__get" and
                                 meth ~= "__tostring") then
      return 2, string.format("'%s' object has no method '%s'", rec.typeid,
                              tostring(meth))
    end
    ok, r = xpcall(f, traceback, obj, C, unpack(msg, 4, n))
  end
  if ok then
    if r == PARKED then return nil end
    return 0, r
  end
  r = caught(r)
  if is_error(r) then return 1, r end
  -- a plain error value (a string from user code): as it was raised
  return 1, r.value
end

-- The next request of C: the message; nil when it could not be decoded
-- (answered; the stream is still in step: the frame was read whole);
-- false when the connection ended (C is dropped).  The connection
-- decodes code (functions) only from an authenticated peer.
--
-- A client that did not authenticate (a manager without a key) is read
-- without waiting: half a message and a pause must not hold the loop,
-- and it may announce at most UNAUTH_MAX bytes.  INCOMPLETE then says
-- that the rest has not arrived yet.
local INCOMPLETE = {}
local UNAUTH_MAX = 256 * 1024 * 1024
S.UNAUTH_MAX = UNAUTH_MAX

function Server:receive(C, err)   -- (err: what recv raised, from serve)
  local ok, msg, v
  if err ~= nil then
    ok, msg = false, err
  elseif C.trusted then
    ok, msg = pcall(C.recv, C.conn)
  else
    ok, msg, v = pcall(C.conn._recv_nowait, C.conn, UNAUTH_MAX)
    if ok then
      if not msg then return INCOMPLETE end
      msg = v
    end
  end
  if ok then return msg end
  if is_error(msg, "DecodeError") then
    reply(C, -1, 2, "cannot decode the request: " .. tostring(msg.message))
    return nil
  end
  self:drop(C, msg)
  return false
end

-- Handles one request; a failure of the server's own code is answered
-- (and reported on stderr) instead of stopping the loop.
function Server:handle(C, msg)
  local ok, err = xpcall(self.handle1, debug.traceback, self, C, msg)
  if not ok then
    io.stderr:write("manager: internal error: ", tostring(err), "\n")
    io.stderr:flush()
    reply(C, -1, 2, "internal error in the manager: " .. tostring(err))
  end
end

function Server:handle1(C, msg)
  local seq = type(msg) == "table" and msg[1]
  if math.type(seq) ~= "integer" then
    return reply(C, -1, 2, "malformed request")
  end
  if seq ~= 0 and C.err and not (msg[2] == 0 and
                                 (msg[3] == "shutdown" or msg[3] == "info")) then
    -- report the failed pipelined write instead of running this request
    local err, what, dropped = C.err, C.err_what, C.dropped
    C.err, C.err_what, C.dropped = nil, nil, 0
    return reply(C, seq, 3, err, what .. (dropped > 0 and string.format(
      "; %d later write%s discarded", dropped, dropped == 1 and " was" or
      "s were") or ""))
  end
  -- (a ping, the write fence of manager_client.lua, reads nothing of
  -- others'; nor need a request of the only client the poll found ready:
  -- see drain)
  if seq ~= 0 and not self.draining and self.nclients > 1 and
     self.alone ~= C and not (msg[2] == 0 and msg[3] == "ping") then
    self:drain(C)
  end
  local status, v, extra = self:run(C, msg)
  if status == nil then return end
  if seq == 0 then
    if status ~= 0 and not C.err then
      if status == 2 then v = new_error("RemoteError", tostring(v)) end
      C.err, C.err_what, C.dropped = v, string.format("pipelined %s on " ..
        "managed object #%s failed", tostring(msg[3]), tostring(msg[2])), 0
    end
    return
  end
  reply(C, seq, status, v, extra)
end

-- ---- clients --------------------------------------------------------------------

function Server:add_client(conn, trusted)
  -- (send, recv: its methods, looked up once, not per message)
  local C = {conn = conn, fd = conn:fileno(), trusted = trusted, holds = {},
             send = conn.send, recv = conn.recv,
             locking = {}, parked = {}, err = nil, dropped = 0, cur_seq = 0,
             closed = false, wfd = conn:_serve_mode()}   -- (writes never wait)
  self.clients[C] = true
  self.nclients = self.nclients + 1
  self.dirty, self.dirty_c = true, true
  return C
end

-- Forgets a client whose connection ended: its parked requests are
-- dropped, what it held released, its objects unpinned.
function Server:drop(C)   -- (callers pass why too: unused)
  if C.closed then return end
  C.closed = true
  self.clients[C] = nil
  self.nclients = self.nclients - 1
  self.more[C] = nil
  self.dirty, self.dirty_c = true, true
  pcall(C.conn.close, C.conn)
  if C.err then
    io.stderr:write(string.format("manager: a pipelined write from process " ..
      "%s failed and was never reported: %s\n", tostring(C.pid),
      tostring(C.err)))
    io.stderr:flush()
  end
  for _, P in pairs(C.parked) do
    if finish(P) and P.on_drop then P.on_drop(P) end
  end
  for obj, n in pairs(C.locking) do T.release_dead(obj, C, n) end
  C.locking = {}
  for id in pairs(C.holds) do self:unhold(C, id) end
end

-- The clients whose handshake finished by now.  Handshakes run side by
-- side with serving (the listener keeps them pending between calls), so
-- a peer that connects and says nothing costs the others nothing; one
-- that failed to log in is dropped.
function Server:accept()
  local out = {}
  for _, conn in ipairs(connection._listener_take(self.listener)) do
    -- keyless: no code from the client, but the proxies it passes are made
    if self.authkey == nil then core.set_trusted(conn, "peer") end
    out[#out + 1] = self:add_client(conn, self.authkey ~= nil)
  end
  return out
end

-- Serves up to BATCH messages of C; true when more are buffered.
function Server:serve(C)
  local conn = C.conn
  -- (drained by another's request since the poll? answers queued: see M.block)
  if C.blocked or self.drains ~= self.polled_at and not conn:poll() then return false end
  for _ = 1, BATCH do
    local ok, msg = false, nil
    if C.trusted then ok, msg = pcall(C.recv, conn) end
    if not ok then msg = self:receive(C, msg) end
    if msg == false or msg == INCOMPLETE then
      self.alone = nil
      return false
    end
    if msg ~= nil and not quick(C, msg) then self:handle(C, msg) end
    self.alone = nil   -- (only its first message: see drain)
    if C.closed or C.blocked or not self.buffered(conn) then return false end
  end
  return true
end

-- Before a request that waits for an answer: every message that other
-- clients have already written is carried out first.  A process that
-- made pipelined writes and then told another process so by any other
-- means (a pipe, a queue, its exit) finished writing them before it did;
-- on a Unix socket, a write that returned is already in our receive
-- buffer, so draining what is readable now makes those writes visible to
-- the request (causal order across connections).  A client that keeps
-- writing is drained up to DRAIN_MSGS messages per request.
--   No drain is needed for the first message read from a client after a
-- poll that found no other client readable (and none with bytes read
-- ahead), if that client's fd came first in the poll: poll looks at the
-- fds in order, so the message was at least partly there when poll
-- looked at the others, and so was every write that returned before it
-- was sent, which would have made its connection readable.  (self.alone:
-- that client, until its first message is handled.  The loop puts a
-- client found alone first for the next poll: a client making requests
-- one after another saves a poll per round trip.)
local DRAIN_MSGS = 100000

function Server:drain(cur)
  self.draining = true
  self.drains = self.drains + 1
  if self.dirty_c then
    self.cfds, self.clist = {}, {}
    for C in pairs(self.clients) do
      self.clist[#self.clist + 1] = C
      self.cfds[#self.cfds + 1] = C.fd
    end
    self.dirty_c = false
  end
  local clist = self.clist
  local ok, ready = pcall(core.wait_fds, self.cfds, 0)
  if ok then
    local to_serve = {}
    for _, i in ipairs(ready) do to_serve[clist[i]] = true end
    for C in pairs(self.more) do to_serve[C] = true end
    for C in pairs(to_serve) do
      if C ~= cur and not C.closed and not C.blocked then
        local got = 0   -- (C.conn each time: a move to pipes changes it)
        repeat
          local msg = self:receive(C)
          if msg == false or msg == INCOMPLETE then break end
          if msg ~= nil then self:handle(C, msg) end
          got = got + 1
        until C.closed or got > DRAIN_MSGS or not C.conn:poll()
        if not (C.closed or self.buffered(C.conn)) then self.more[C] = nil end
      end
    end
  end
  self.draining = false
end

-- Serves the clients one poll found readable (the one client found alone, if
-- poll looked at it first: see drain; else first in the next poll); whether the listener's fds were.
function Server:serve_ready(ready, fds, list, nc, round)
  local more = self.more
  if ready.queued then ready.queued = false kernel.block(list[1]) end   -- (see M.block)
  local r1, solo = ready[1], nil
  if r1 and r1 <= nc and not (ready[2] and ready[2] <= nc) then
    local m = next(more)
    if m == nil or (m == list[r1] and next(more, m) == nil) then solo = r1 end
  end
  if solo == 1 then self.alone = list[1] end
  local listener = false
  for k = 1, #ready do local i = ready[k]   -- (ipairs: 3 calls more)
    if i > #fds then   -- a pool's: polled by the caller
    elseif i > nc then
      listener = true
    else
      local C = list[i]
      C.round = round
      if C.blocked then unblock(C)   -- (its fd was polled for writing)
      elseif not C.closed then more[C] = self:serve(C) or nil end
    end
    if not self.running then break end
  end
  self.alone = nil
  if solo and solo > 1 then
    list[1], list[solo] = list[solo], list[1]
    fds[1], fds[solo] = fds[solo], fds[1]
  end
  return listener
end

function Server:serve_forever()
  if self.running then error("the server is already serving", 2) end
  self.running = true
  -- the process that serves (the one that bound the server may fork a
  -- child to serve and stay a client; see rebuild in manager_proxies.lua)
  self.serving_pid = getpid()
  -- fds: the clients', then the listener's (its socket and the
  -- handshakes in progress)
  local fds, list, nc = {}, {}, 0
  local more, heap, ready_t = self.more, kernel.heap, {}
  local owner_check = 0   -- when to look at the owner again
  local round = 0         -- polls so far (C.round: served after that one)
  local ok, err = pcall(function()
    while self.running do
      local lfds, lwake = connection._listener_watch(self.listener)
      if self.dirty or #lfds > 1 or #fds ~= nc + 1 then
        fds, list = {}, {}
        for C in pairs(self.clients) do
          list[#list + 1] = C
          fds[#fds + 1] = poll_fd(C)
        end
        nc = #list
        for _, fd in ipairs(lfds) do fds[#fds + 1] = fd end
        self.dirty = false
      end
      local timeout = (lwake or next(more) or heap[1]) and
                      next_timeout(more, lwake) or nil
      -- the pools it serves (manager_pool.lua): their fds after ours
      local pfds, pt = T.pool_fds and T.pool_fds()
      if pt and (timeout == nil or pt < timeout) then timeout = pt end
      local wfds = fds
      if pfds then
        wfds = table.move(fds, 1, #fds, 1, {})
        table.move(pfds, 1, #pfds, #fds + 1, wfds)
      end
      if self.owner_gone then
        -- a started server ends with its owner, even one killed by
        -- SIGKILL (its finalizer never ran): checked each second, not on
        -- every request (a getppid per round trip was 1 of its 5 syscalls)
        local t = now()
        if t >= owner_check then
          if self.owner_gone() then break end
          owner_check = t + 1
        end
        if timeout == nil or timeout > 1 then timeout = 1 end
      end
      -- (polling first while a CPU is free; meanwhile the first
      -- client's plain dict gets are answered in C: conn.c)
      local ready = (pfds or nc == 0 or next(more)) and
        core.wait_fds(wfds, timeout, true, ready_t) or
        serve_gets(wfds, timeout, ready_t, list, nc, self.recs, DICT)
      self.polled_at = self.drains
      if pfds then T.poll_pools() end
      round = round + 1
      local listener = self:serve_ready(ready, fds, list, nc, round) or
                       (lwake ~= nil and now() >= lwake)
      if listener and self.running then
        for _, C in ipairs(self:accept()) do
          -- the handshake may have read the client's first request ahead
          if self.buffered(C.conn) then more[C] = true end
        end
      end
      for C in next, more do
        if C.round ~= round then
          if C.closed then more[C] = nil
          else more[C] = self:serve(C) or nil end
        end
      end
      if heap[1] then run_timers() end
    end
  end)
  self:close()
  if not ok then error(err, 0) end
end

-- Stops serving: the listener and every client connection close (the
-- clients' calls fail at once: the manager is gone).
function Server:close()
  self.running = false
  if T.close_pools then T.close_pools() end
  for C in pairs(self.clients) do
    C.closed = true
    pcall(C.conn.close, C.conn)
  end
  self.clients = {}
  pcall(self.listener.close, self.listener)
  state.serving[self.uid] = nil
end

-- Server.new{registry=, address=, authkey=}: binds the listener.
function S.new(opts)
  if srv and srv.running then
    error("this process already runs a manager server", 2)
  end
  -- (a client has 5 s to log in; the loop serves the others meanwhile)
  local listener = connection.Listener{address = opts.address,
                                       authkey = opts.authkey, timeout = 5}
  local self = setmetatable({
    listener = listener, address = listener.address, authkey = opts.authkey,
    registry = opts.registry or {}, owner_gone = opts.owner_gone, uid = string.format("%d-%x-%x", getpid(),
      math.floor(now() * 1e6), math.random(0, 0x7fffffff)),
    recs = weak_values(), rec_by_obj = setmetatable({}, {__mode = "k"}),
    pinned = {}, transits = {}, early = {}, clients = {}, next_id = 1,
    token_n = 0, dirty = true, dirty_c = true, running = false, more = {},
    draining = false, drains = 0, polled_at = 0, nclients = 0,
  }, Server)
  -- the read-ahead check of connections (mp.wait's protocol)
  local probe_a, probe_b = core.Pipe(true)
  self.buffered = select(2, probe_a:_wait_fd())
  probe_a:close(); probe_b:close()
  srv = self
  kernel.set_server(self)
  state.serving[self.uid] = self
  return self
end

return S
