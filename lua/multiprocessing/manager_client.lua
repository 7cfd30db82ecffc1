-- multiprocessing.manager_client: a process's connection to a manager:
-- one client record per manager per process, requests and pipelined
-- writes on it, and the write fence (runtime/fence.c) that makes every
-- synchronisation point wait for this process's writes.
--
-- One connection per process.  A client record (Client) per manager is
-- shared by all proxies of that manager in the process.  It records the
-- pid that opened its connection: a forked child that inherited it
-- closes its copy of the fd and opens its own on first use, never
-- writing into its parent's stream.
--
-- Pipelined writes.  Operations that return nothing (d[k] = v, set,
-- update, clear, l[i] = v, append, extend, insert, reverse, ns.x = v,
-- v.value = x, a[i] = x) are sent without waiting for an answer; the
-- connection is ordered, so the next operation that waits for an answer
-- sees their effects.  A write that fails in the server (an index out of
-- range, a bad typecode value) is reported by the next operation of this
-- process on the same manager that waits for an answer -- any read,
-- pop, apply, a lock or queue call, proxy:sync() or m:sync() --
-- which raises that error instead of running; writes sent after the
-- failed one are discarded.  Errors the caller can see at once
-- (unencodable values, bad key types) are raised by the write itself.
--
-- Release semantics.  Pipelining must not let another process read an
-- old value after this one told it, by some other means, that it wrote a
-- new one: the server serves connections in no fixed order.  So every
-- synchronisation point of this process first waits until its writes are
-- applied: lock, semaphore and condition acquire/release/wait, event
-- set/wait, barrier wait, queue put, pipe send, spawn and a child's exit
-- (runtime/fence.c calls the flush below when core._writes_pending says
-- there are writes), and every call of this file that waits for an
-- answer (it flushes the other managers' writes first; its own are
-- ordered before it on the connection).  The flush pings each client
-- with writes since its last answer ("dirty"); a flush that fails raises
-- its error after the release at a release, before the operation
-- elsewhere.  The clients' own connections are marked (core._set_nofence)
-- so their sends, which carry the writes, are not sync points.
local core = require "multiprocessing.core"
local connection = require "multiprocessing.connection"

local raise, getpid, now = core.raise, core.getpid, core.now
local util = require "multiprocessing.util"
local argerror, typeerror = util.argerror, util.typeerror
local writes_pending, set_nofence = core._writes_pending, core._set_nofence
local is_error, new_error = core.is_error, core.new_error
local unpack, select, type = table.unpack, select, type
local rawget, setmetatable, getmetatable = rawget, setmetatable, getmetatable

local M = {}

local function address_text(a)
  if type(a) == "table" then return tostring(a[1]) .. ":" .. tostring(a[2]) end
  return (tostring(a):gsub("%z", "@"))
end

-- ---- clients: one connection per manager per process -----------------------

local clients = {}   -- uid -> Client
local Client = {}
Client.__index = Client

local function client_for(uid, address, authkey)
  local cl = clients[uid]
  if cl == nil then
    cl = setmetatable({
      uid = uid, address = address, authkey = authkey, pid = getpid(),
      conn = nil, seq = 0, dead = nil, tokens = 0,
      live = {},                                    -- id -> proxies here
      cache = setmetatable({}, {__mode = "v"}),     -- id -> proxy
      to_release = {}, flush = false,               -- ids to release
    }, Client)
    clients[uid] = cl
  end
  return cl
end

-- ---- the write fence (runtime/fence.c) -------------------------------------

-- The clients of this process (dirty_pid) with writes sent since their
-- last answer: not known to be applied yet.  A forked child starts with
-- none (it sent none of them; fence.c clears the C flag in the child).
local dirty, n_dirty, dirty_pid = {}, 0, nil
local pending = false   -- what this state told fence.c (changes only)

local function set_pending(on)
  if on ~= pending then
    pending = on
    writes_pending(on)
  end
end

local function mark_dirty(cl)
  local pid = getpid()
  if dirty_pid ~= pid then
    dirty, n_dirty, dirty_pid, pending = {}, 0, pid, false
  end
  cl.dirty = true
  if not dirty[cl] then
    dirty[cl] = true
    n_dirty = n_dirty + 1
    if n_dirty == 1 then set_pending(true) end
  end
end

-- cl's writes are applied (an answer came after them) or lost with it.
local function clean(cl)
  cl.dirty = false
  if dirty[cl] and dirty_pid == getpid() then
    dirty[cl] = nil
    n_dirty = n_dirty - 1
    if n_dirty == 0 then set_pending(false) end
  end
end

-- The manager is gone: every later call fails at once with this.
local function lost(cl, err)
  if cl.conn then pcall(cl.conn.close, cl.conn) end
  cl.conn = nil
  if cl.dirty then clean(cl) end
  if not cl.dead then
    local why = is_error(err) and err.message or tostring(err)
    cl.dead = string.format("the manager at %s is gone (it shut down or " ..
      "died): %s", address_text(cl.address), why)
  end
  raise("EOFError", cl.dead)
end

local function is_interrupt(err)
  return type(err) == "string" and err:find("interrupted!", 1, true) ~= nil
end

-- A connection whose stream an interrupt cut in the middle of a message
-- ("connection is broken"): dropped, the next call makes a new one (the
-- manager is not gone).
local function out_of_step(cl, err)
  if is_error(err) and tostring(err.message):find("connection is broken", 1, true) then
    pcall(cl.conn.close, cl.conn)
    cl.conn = nil
    error(err, 0)
  end
end

local hello

-- This process's connection to cl's manager, made on first use (and
-- after a fork); pending releases go first.
local function ready(cl)
  if cl.pid ~= getpid() then
    -- inherited through fork: that connection is the parent's
    if cl.conn then pcall(cl.conn.close, cl.conn) end
    cl.conn, cl.pid, cl.seq, cl.to_release, cl.flush = nil, getpid(), 0, {}, false
    cl.dirty = false
  end
  local c = cl.conn
  if c == nil then
    if cl.dead then raise("EOFError", cl.dead) end
    c = hello(cl)
  end
  if cl.flush then
    local ids, n = {0, 0, "release"}, 3
    for id in pairs(cl.to_release) do n = n + 1; ids[n] = id end
    cl.to_release, cl.flush = {}, false
    local ok, err = pcall(c.send, c, ids)
    if not ok then lost(cl, err) end
  end
  return c
end

local function send_failed(cl, err)
  if is_error(err, "EncodeError") or is_error(err, "ValueError") then
    error(err, 0)    -- nothing was written
  end
  if is_interrupt(err) then
    -- a message may be cut in the middle: this connection is done; the
    -- next call makes a new one
    pcall(cl.conn.close, cl.conn)
    cl.conn = nil
    error(err, 0)
  end
  out_of_step(cl, err)
  lost(cl, err)
end

-- A write: sent, not answered.
local function post(cl, msg)
  local c = cl.conn
  if c == nil or cl.flush or cl.pid ~= getpid() then c = ready(cl) end
  local ok, err = pcall(cl.c_send, c, msg)
  if not ok then send_failed(cl, err) end
  if not cl.dirty then mark_dirty(cl) end
end

local function raise_reply(r)
  local st, v = r[2], r[3]
  if st == 1 then error(v, 0) end
  if st == 3 then
    if is_error(v) then
      v.message = tostring(v.message) .. " (" .. tostring(r[4]) .. ")"
    elseif type(v) == "string" then
      v = v .. " (" .. tostring(r[4]) .. ")"
    end
    error(v, 0)
  end
  raise("RemoteError", tostring(v), r[4] and {traceback = r[4]} or nil)
end

-- The answer to request seq (sent).  Answers to requests an interrupt
-- abandoned (older seq) are skipped.  An answer means every write sent
-- before the request is applied.  (conn:_reply gives an ok answer's
-- value itself, no table made for it.)
local c_request, c_reply   -- (a connection's methods: set by hello)
local function await(cl, c, seq, ok, mine, r)   -- (ok...: a first try's)
  while true do
    if ok == nil then ok, mine, r = pcall(c_reply, c, seq) end
    if not ok then
      r = mine
      if is_interrupt(r) then
        -- the server forgets the request if it is still waiting
        pcall(c.send, c, {0, 0, "cancel", seq})
        error(r, 0)
      end
      -- (AuthenticationError: a client without a key met a keyed
      -- server's challenge; the manager is not gone)
      if is_error(r, "DecodeError") or is_error(r, "AuthenticationError") then
        error(r, 0)
      end
      out_of_step(cl, r)
      lost(cl, r)
    end
    if mine then
      if cl.dirty then clean(cl) end
      return r
    end
    local rs = r[1]
    if rs == seq then
      if cl.dirty then clean(cl) end
      if r[2] == 0 then return r[3] end
      raise_reply(r)
    elseif rs == -1 then
      if cl.dirty then clean(cl) end
      raise_reply(r)
    end
    ok = nil
  end
end

-- A request: sent, then its answer awaited.
local function rawcall(cl, msg)
  local c = cl.conn
  if c == nil or cl.flush or cl.pid ~= getpid() then c = ready(cl) end
  local seq = cl.seq + 1
  cl.seq = seq
  msg[1] = seq
  local ok, err = pcall(cl.c_send, c, msg)
  if not ok then send_failed(cl, err) end
  return await(cl, c, seq)
end

-- The fence: waits until the writes of every dirty client but except are
-- applied (one ping each).  An error (a dead manager, a write the server
-- refused) is raised once, after the other clients are done; Ctrl-C at
-- once (that client stays dirty).
local PING = {0, 0, "ping"}   -- (the fence's message; rawcall sets its seq)

-- One dirty client's ping: its error, if any (Ctrl-C is raised at once).
local function ping_one(cl)
  local ok, e = true, nil
  if cl.dirty then ok, e = pcall(rawcall, cl, PING) end
  if not ok and is_interrupt(e) then
    set_pending(true)
    error(e, 0)
  end
  clean(cl)
  if not ok then return e end
end

local function flush(except)
  local pid = getpid()
  if dirty_pid ~= pid then
    dirty, n_dirty, dirty_pid, pending = {}, 0, pid, false
  end
  local err
  if n_dirty == 1 then   -- (the usual case, one manager: no list made)
    local cl = next(dirty)
    if cl ~= except then err = ping_one(cl) end
  else
    local list = {}
    for cl in pairs(dirty) do list[#list + 1] = cl end
    for _, cl in ipairs(list) do
      if cl ~= except then
        local e = ping_one(cl)
        err = err or e
      end
    end
  end
  set_pending(n_dirty > 0)
  if err then error(err, 0) end
end
core._set_write_fence(function() flush(nil) end)

-- A request of the program is a sync point too: the writes made through
-- other managers are applied first (this one's are ordered before it).
local function call(cl, msg)
  if n_dirty > (cl.dirty and 1 or 0) then flush(cl) end
  return rawcall(cl, msg)
end

-- A request of one argument (d[k]), as call: one of small scalars (an
-- integer or short string key) is encoded by the connection itself
-- (conn:_request), with no table made; others go as rawcall's.
local function call1(cl, id, meth, a)
  if n_dirty > (cl.dirty and 1 or 0) then flush(cl) end
  local c = cl.conn
  if c == nil or cl.flush or cl.pid ~= getpid() then c = ready(cl) end
  -- (seq is used up before the request may go: a Ctrl-C landing between
  -- the send and a later bookkeeping step must not let the next request
  -- reuse it, taking this one's answer for its own)
  local seq = cl.seq + 1
  cl.seq = seq
  local ok, sent = pcall(c_request, c, seq, id, meth, a)
  if not ok then send_failed(cl, sent) end
  if not sent then return rawcall(cl, {0, id, meth, a}) end
  local mine, r
  ok, mine, r = pcall(c_reply, c, seq)
  if ok and mine then
    if cl.dirty then clean(cl) end
    return r
  end
  return await(cl, c, seq, ok, mine, r)
end

-- Connects and says hello: the server adopts what this process already
-- has proxies of (inherited through fork), and confirms it is the same
-- manager (a new one on the same address would not know our ids).
function hello(cl)
  local ok, c = pcall(connection.Client, cl.address, cl.authkey)
  if not ok then
    if is_error(c, "AuthenticationError") then error(c, 0) end
    lost(cl, c)
  end
  -- a keyless manager's replies are untrusted (no code) but hold proxies
  if cl.authkey == nil then core.set_trusted(c, "peer") end
  set_nofence(c)   -- (its sends carry the writes the fence waits for)
  core._set_spin(c)   -- (its answers are waited for polling, if a CPU is free)
  -- (its send and recv looked up once: not per message)
  cl.conn, cl.pid, cl.c_send, cl.c_recv = c, getpid(), c.send, c.recv
  c_request, c_reply = c._request, c._reply   -- (every connection's)
  local ids = {}
  for id in pairs(cl.live) do ids[#ids + 1] = id end
  local info = rawcall(cl, {0, 0, "hello", getpid(), ids})
  if cl.uid and info.uid ~= cl.uid then
    lost(cl, "a different manager now serves that address")
  end
  -- an authenticated client on a Unix socket moves to a pair of pipes
  -- (request "pipe", manager_kernel.lua: a round trip costs less)
  local made, mine, theirs = false, nil, nil
  if cl.authkey ~= nil and type(cl.address) == "string" then
    made, mine, theirs = pcall(core.Pipe, true)   -- (out of fds: no move)
  end
  if made then
    local ok, err = pcall(rawcall, cl, {0, 0, "pipe", theirs})
    theirs:close()
    if ok then
      pcall(c.close, c)
      c = mine
      set_nofence(c)
      core._set_spin(c)
      cl.conn, cl.c_send, cl.c_recv = c, c.send, c.recv
    else
      mine:close()
      if is_interrupt(err) then   -- (the server may have moved: start over)
        pcall(c.close, c)
        cl.conn = nil
      end
      if cl.conn == nil then error(err, 0) end
    end
  end
  return c
end

-- A request with arguments; field n when one of them is nil.
local function req(id, meth, ...)
  local n = select("#", ...)
  local m = {0, id, meth, ...}
  for i = 4, n + 3 do
    if m[i] == nil then
      m.n = n + 3
      break
    end
  end
  return m
end

-- Whether clients other than cl have writes the fence must wait for.
function M.others_dirty(cl) return n_dirty > (cl.dirty and 1 or 0) end

M.address_text, M.clients, M.Client, M.client_for = address_text, clients,
  Client, client_for
M.ready, M.post, M.rawcall, M.call, M.req, M.flush, M.lost =
  ready, post, rawcall, call, req, flush, lost
M.call1 = call1
M.hello, M.clean = hello, clean
return M
