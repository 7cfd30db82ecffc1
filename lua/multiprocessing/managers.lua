-- multiprocessing.managers: Manager, BaseManager and the proxies.
--
-- A manager is a server process (manager_server.lua) holding objects;
-- other processes use them through proxies: Lua tables whose metamethods
-- send each operation to the server.  This file is the client side: one
-- connection per manager per process, the proxy classes, how proxies
-- travel through the codec, and the manager objects that start, connect
-- to and shut down servers.
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
--
-- Lifetime.  The server keeps an object while some process holds a
-- proxy of it (counted per process: a proxy collected here sends a
-- release with the next message), while a proxy of it is in transit
-- (encoded and not yet decoded), or while another managed object refers
-- to it.  See manager_server.lua.
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
M.managers = M

-- Server side hooks (manager_server.lua): the servers this process runs
-- (uid -> Server), the client a reply is being encoded for, and the
-- metatable of the server's object records.
M._serving = {}
M._reply_to = nil
local REC_MT = {__name = "multiprocessing.ManagedObject"}
REC_MT.__tostring = function(rec)
  return string.format("<managed %s #%d>", rec.typeid, rec.id)
end
M._REC_MT = REC_MT

-- Seconds to wait for a manager to start, and for a shutdown.
M.START_TIMEOUT = 30
M.SHUTDOWN_TIMEOUT = 1.0

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
  local ok, err = pcall(c.send, c, msg)
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

-- A request: sent, then its answer awaited.  Answers to requests an
-- interrupt abandoned (older seq) are skipped.  An answer means every
-- write sent before the request is applied.
local function rawcall(cl, msg)
  local c = cl.conn
  if c == nil or cl.flush or cl.pid ~= getpid() then c = ready(cl) end
  local seq = cl.seq + 1
  cl.seq = seq
  msg[1] = seq
  local ok, err = pcall(c.send, c, msg)
  if not ok then send_failed(cl, err) end
  while true do
    local r
    ok, r = pcall(c.recv, c)
    if not ok then
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
    local rs = r[1]
    if rs == seq then
      if cl.dirty then clean(cl) end
      if r[2] == 0 then return r[3] end
      raise_reply(r)
    elseif rs == -1 then
      if cl.dirty then clean(cl) end
      raise_reply(r)
    end
  end
end

-- The fence: waits until the writes of every dirty client but except are
-- applied (one ping each).  An error (a dead manager, a write the server
-- refused) is raised once, after the other clients are done; Ctrl-C at
-- once (that client stays dirty).
local function flush(except)
  local pid = getpid()
  if dirty_pid ~= pid then
    dirty, n_dirty, dirty_pid, pending = {}, 0, pid, false
  end
  local err, list = nil, {}
  for cl in pairs(dirty) do list[#list + 1] = cl end
  for _, cl in ipairs(list) do
    if cl ~= except then
      local ok, e = true, nil
      if cl.dirty then ok, e = pcall(rawcall, cl, {0, 0, "ping"}) end
      if not ok and is_interrupt(e) then
        set_pending(true)
        error(e, 0)
      end
      clean(cl)
      if not ok then err = err or e end
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
  cl.conn, cl.pid = c, getpid()
  local ids = {}
  for id in pairs(cl.live) do ids[#ids + 1] = id end
  local info = rawcall(cl, {0, 0, "hello", getpid(), ids})
  if cl.uid and info.uid ~= cl.uid then
    lost(cl, "a different manager now serves that address")
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

-- ---- proxies -------------------------------------------------------------------

-- A proxy's own data sits under keys no user key can equal.
local ID, CL = setmetatable({}, {__name = "id"}), setmetatable({}, {__name = "client"})
M._ID, M._CL = ID, CL

local proxy_classes = {}   -- typeid (or auto signature) -> metatable

local function proxy_gc(p)
  local cl, id = rawget(p, CL), rawget(p, ID)
  local n = (cl.live[id] or 1) - 1
  if n > 0 then
    cl.live[id] = n
    return
  end
  cl.live[id] = nil
  if cl.conn and cl.pid == getpid() and not cl.dead then
    -- sent with the next message (a finalizer must not write: it may run
    -- in the middle of another send)
    cl.to_release[id] = true
    cl.flush = true
  end
end

local function proxy_for(cl, id, typeid, exposed)
  local p = cl.cache[id]
  if p then return p end
  local mt = proxy_classes[typeid]
  if typeid == "auto" then mt = M._auto_class(exposed) end
  if mt == nil then
    raise("DecodeError", "unknown managed type '" .. tostring(typeid) .. "'")
  end
  p = setmetatable({[ID] = id, [CL] = cl}, mt)
  cl.cache[id] = p
  cl.live[id] = (cl.live[id] or 0) + 1
  if cl.to_release[id] then cl.to_release[id] = nil end
  return p
end

-- Codec: proxies (and, in a server, its object records) travel as
-- {uid, id, typeid, address, keyed, held, token, exposed}.  A proxy
-- encoded by a client takes a transit token first, so its object stays
-- alive until the receiver adopts it.
--
-- The authkey never travels (keyed only says whether the manager has
-- one), as in Python: the receiver uses the key it already holds for that
-- manager -- the one this process (or the parent it was forked from)
-- started or connected it with -- or else the process tree's key
-- (core.tree_authkey, what managers use by default), and a process that
-- holds neither gets AuthenticationError on first use; connecting a
-- manager object with the right key (BaseManager{address=, authkey=}:
-- connect()) gives it.  Proxies are a trusted_only class: an untrusted
-- decode refuses them before anything connects.
local function reduce(x)
  if getmetatable(x) == REC_MT then return x.server:reduce_rec(x) end
  local cl, id = rawget(x, CL), rawget(x, ID)
  cl.tokens = cl.tokens + 1
  local token = string.format("%d.%d.%x", getpid(), cl.tokens,
                              math.floor(now() * 1e6))
  post(cl, {0, 0, "transit", id, token})
  local mt = getmetatable(x)
  return {cl.uid, id, mt.__typeid, cl.address, cl.authkey ~= nil, false,
          token, mt.__exposed}
end

local function rebuild(s, untrusted)
  local uid, id = s[1], s[2]
  if untrusted and s[5] then
    -- (a keyless manager's peer may send its own proxies, never ones that
    -- would authenticate: the key could be relayed)
    raise("DecodeError", "a proxy of a manager with an authkey refused " ..
          "from an unauthenticated peer")
  end
  local server = M._serving[uid]
  -- an object record in the process serving it; elsewhere (a process that
  -- bound a server a child of it serves, or a child of the server) a proxy
  if server and server.serving_pid == getpid() then
    return server:rebuild_rec(s)
  end
  local cl = clients[uid] or
    client_for(uid, s[4], s[5] and core.tree_authkey or nil)
  local p = proxy_for(cl, id, s[3], s[8])
  local adopt
  if s[7] ~= nil then adopt = {0, 0, "adopt", id, s[7]}
  elseif not s[6] then adopt = {0, 0, "adopt", id} end
  if adopt and not cl.dead then
    -- without the manager's key the proxy is still made: its first use
    -- raises the AuthenticationError (as Python's)
    local ok, err = pcall(post, cl, adopt)
    if not ok and not is_error(err, "AuthenticationError") then error(err, 0) end
  end
  return p
end

local codec_hooks = {reduce = reduce, rebuild = rebuild, trusted_only = true}
core.register_class("multiprocessing.Proxy", REC_MT, codec_hooks)

local function cl_of(p) return rawget(p, CL) end

-- Methods shared by every proxy.
local function common(methods)
  -- proxy:sync(): raises the error of a failed earlier write, if any
  methods.sync = function(p) call(cl_of(p), {0, 0, "ping"}) end
  return methods
end

local function sync_method(name)
  return function(p, ...) return call(cl_of(p), req(rawget(p, ID), name, ...)) end
end

local function post_method(name)
  return function(p, ...) post(cl_of(p), req(rawget(p, ID), name, ...)) end
end

local function apply_method(with_key)
  if with_key then
    return function(p, k, fn, ...)
      if type(fn) ~= "function" then
        typeerror(2, "apply", "function", fn)
      end
      return call(cl_of(p), req(rawget(p, ID), "apply", k, fn, ...))
    end
  end
  return function(p, fn, ...)
    if type(fn) ~= "function" then
      typeerror(1, "apply", "function", fn)
    end
    return call(cl_of(p), req(rawget(p, ID), "apply", fn, ...))
  end
end

-- Every proxy method checks its self first (d.keys() for d:keys() gets
-- "use d:keys(...)" at the caller's line); a method table shared by two
-- types (Lock, RLock) is wrapped once, and accepts any proxy whose
-- methods are these or inherit them.
local checked = setmetatable({}, {__mode = "k"})
local function check_selves(methods, name)
  if checked[methods] then return end
  checked[methods] = true
  require("multiprocessing.util").checked_methods(methods, name, "proxy", function(v)
    local mt = type(v) == "table" and getmetatable(v)
    local m = type(mt) == "table" and rawget(mt, "__methods")
    -- (a JoinableQueue's methods inherit a Queue's)
    while type(m) == "table" do
      if m == methods then return true end
      local up = getmetatable(m)
      m = type(up) == "table" and rawget(up, "__index")
    end
    return false
  end)
end

local function define(typeid, name, methods, mt)
  check_selves(methods, name)
  mt.__typeid = typeid
  mt.__name = name
  mt.__gc = proxy_gc
  mt.__tostring = mt.__tostring or function(p)
    return call(cl_of(p), {0, rawget(p, ID), "__tostring"})
  end
  mt.__methods = methods
  proxy_classes[typeid] = mt
  core.register_class("multiprocessing.Proxy", mt, codec_hooks)
  return mt
end

-- ---- dict --------------------------------------------------------------------

local function check_key(k, fname, argn)
  local t = type(k)
  if t == "string" or t == "boolean" or (t == "number" and k == k) then return end
  argerror(argn, fname, "dict key must be a string, number or boolean, got " ..
           (t == "number" and "NaN" or t))
end

local DictM = common{
  get = function(p, k, default)
    return call(cl_of(p), {0, rawget(p, ID), "get", k, default, n = 5})
  end,
  set = function(p, k, v)
    check_key(k, "set", 1)
    if v == nil then post(cl_of(p), {0, rawget(p, ID), "del", k})
    else post(cl_of(p), {0, rawget(p, ID), "set", k, v}) end
  end,
  pop = function(p, k, default)
    check_key(k, "pop", 1)
    return call(cl_of(p), {0, rawget(p, ID), "pop", k, default, n = 5})
  end,
  popitem = function(p)
    local kv = call(cl_of(p), {0, rawget(p, ID), "popitem"})
    if kv then return kv[1], kv[2] end
    return nil
  end,
  setdefault = function(p, k, default)
    check_key(k, "setdefault", 1)
    return call(cl_of(p), {0, rawget(p, ID), "setdefault", k, default, n = 5})
  end,
  update = function(p, t)
    if type(t) ~= "table" then
      typeerror(1, "update", "table", t)
    end
    post(cl_of(p), {0, rawget(p, ID), "update", t})
  end,
  clear = post_method("clear"),
  keys = sync_method("keys"),
  values = sync_method("values"),
  items = sync_method("items"),
  copy = sync_method("copy"),
  len = sync_method("len"),
  apply = apply_method(true),
}

local function snapshot_pairs(p)
  local s = call(cl_of(p), {0, rawget(p, ID), "snapshot"})
  local ks, vs, i = s[1], s[2], 0
  return function()
    i = i + 1
    local k = ks[i]
    if k ~= nil then return k, vs[i] end
  end, p, nil
end

define("dict", "DictProxy", DictM, {
  __index = function(p, k)
    local m = DictM[k]
    if m then return m end
    return call(cl_of(p), {0, rawget(p, ID), "get", k})
  end,
  __newindex = function(p, k, v)
    check_key(k, "__newindex", 2)
    if v == nil then post(cl_of(p), {0, rawget(p, ID), "del", k})
    else post(cl_of(p), {0, rawget(p, ID), "set", k, v}) end
  end,
  __len = function(p) return call(cl_of(p), {0, rawget(p, ID), "len"}) end,
  __pairs = snapshot_pairs,
})

-- ---- list --------------------------------------------------------------------

local function check_index(i, fname, argn)
  if math.type(i) == "integer" or (math.type(i) == "float" and math.tointeger(i)) then
    return
  end
  argerror(argn, fname, "integer index expected, got " ..
           (math.type(i) or type(i)))
end

local function seq_pairs(p)
  local s = call(cl_of(p), {0, rawget(p, ID), "snapshot"})
  local items, n, i = s[1], s[2], 0
  return function()
    if i < n then
      i = i + 1
      return i, items[i]
    end
  end, p, nil
end

-- The metamethods of a proxy of a sequence (list, Array) whose other
-- methods are M: integer indexes go to the referent, names to M.
local function seq_metamethods(M)
  return {
    __index = function(p, k)
      if type(k) == "number" then
        return call(cl_of(p), {0, rawget(p, ID), "get", k})
      end
      return M[k]
    end,
    __newindex = function(p, k, v)
      check_index(k, "__newindex", 2)
      post(cl_of(p), {0, rawget(p, ID), "set", k, v, n = 5})
    end,
    __len = function(p) return call(cl_of(p), {0, rawget(p, ID), "len"}) end,
    __pairs = seq_pairs,
  }
end

local ListM = common{
  append = function(p, v)
    post(cl_of(p), {0, rawget(p, ID), "append", v, n = 4})
  end,
  extend = function(p, t)
    if type(t) ~= "table" then
      typeerror(1, "extend", "table", t)
    end
    post(cl_of(p), {0, rawget(p, ID), "extend", t})
  end,
  insert = function(p, i, v)
    check_index(i, "insert", 1)
    post(cl_of(p), {0, rawget(p, ID), "insert", i, v, n = 5})
  end,
  pop = function(p, i)
    if i ~= nil then check_index(i, "pop", 1) end
    return call(cl_of(p), {0, rawget(p, ID), "pop", i, n = 4})
  end,
  remove = function(p, v)
    call(cl_of(p), {0, rawget(p, ID), "remove", v, n = 4})
  end,
  index = sync_method("index"),
  count = function(p, v)
    return call(cl_of(p), {0, rawget(p, ID), "count", v, n = 4})
  end,
  sort = function(p, how) call(cl_of(p), {0, rawget(p, ID), "sort", how}) end,
  reverse = post_method("reverse"),
  clear = post_method("clear"),
  copy = sync_method("copy"),
  len = sync_method("len"),
  apply = apply_method(true),
}

define("list", "ListProxy", ListM, seq_metamethods(ListM))

-- ---- Namespace ---------------------------------------------------------------

local function check_field(k, fname, argn)
  if type(k) ~= "string" then
    argerror(argn, fname, "field name must be a string, got " .. type(k))
  end
end

local NsM = common{
  get = function(p, k)
    check_field(k, "get", 1)
    return call(cl_of(p), {0, rawget(p, ID), "get", k})
  end,
  set = function(p, k, v)
    check_field(k, "set", 1)
    post(cl_of(p), {0, rawget(p, ID), "set", k, v, n = 5})
  end,
  copy = sync_method("copy"),
  apply = apply_method(true),
}

define("Namespace", "NamespaceProxy", NsM, {
  __index = function(p, k)
    local m = NsM[k]
    if m then return m end
    if type(k) ~= "string" then return nil end
    return call(cl_of(p), {0, rawget(p, ID), "get", k})
  end,
  __newindex = function(p, k, v)
    check_field(k, "__newindex", 2)
    post(cl_of(p), {0, rawget(p, ID), "set", k, v, n = 5})
  end,
  __pairs = snapshot_pairs,
})

-- ---- Value and Array -----------------------------------------------------------

local ValueM = common{
  get = sync_method("get"),
  set = function(p, v) post(cl_of(p), {0, rawget(p, ID), "set", v, n = 4}) end,
  apply = apply_method(false),
}

define("Value", "ValueProxy", ValueM, {
  __index = function(p, k)
    if k == "value" then return call(cl_of(p), {0, rawget(p, ID), "get"}) end
    if k == "typecode" then
      return call(cl_of(p), {0, rawget(p, ID), "__get", k})
    end
    return ValueM[k]
  end,
  __newindex = function(p, k, v)
    if k ~= "value" then
      error("cannot set field '" .. tostring(k) .. "' of a Value proxy " ..
            "(only 'value')", 2)
    end
    post(cl_of(p), {0, rawget(p, ID), "set", v, n = 4})
  end,
})

local ArrayM = common{
  copy = sync_method("copy"),
  totable = sync_method("copy"),
  len = sync_method("len"),
  apply = apply_method(true),
}

define("Array", "ArrayProxy", ArrayM, seq_metamethods(ArrayM))

-- ---- queues ---------------------------------------------------------------------

local QueueM = common{
  put = function(p, v, block, timeout)
    call(cl_of(p), {0, rawget(p, ID), "put", v, block, timeout, n = 6})
  end,
  get = function(p, block, timeout)
    return call(cl_of(p), {0, rawget(p, ID), "get", block, timeout, n = 5})
  end,
  put_nowait = function(p, v)
    call(cl_of(p), {0, rawget(p, ID), "put", v, false, n = 5})
  end,
  get_nowait = function(p)
    return call(cl_of(p), {0, rawget(p, ID), "get", false})
  end,
  qsize = sync_method("qsize"),
  empty = sync_method("empty"),
  full = sync_method("full"),
}
local JQueueM = setmetatable(common{
  task_done = sync_method("task_done"),
  join = sync_method("join"),
}, {__index = QueueM})

define("Queue", "QueueProxy", QueueM, {__index = QueueM})
define("JoinableQueue", "JoinableQueueProxy", JQueueM, {__index = JQueueM})

-- ---- synchronisation -------------------------------------------------------------

-- lock:with(fn, ...) runs fn holding it (released on error too);
-- local held <close> = lock:guard() holds it to the end of the scope.
local function scoped(methods)
  methods.with = function(p, fn, ...)
    p:acquire()
    local r = table.pack(pcall(fn, ...))
    p:release()
    if not r[1] then error(r[2], 0) end
    return unpack(r, 2, r.n)
  end
  methods.guard = function(p)
    p:acquire()
    return setmetatable({}, {__close = function() p:release() end})
  end
  return methods
end

local function acquire_method(p, block, timeout)
  return call(cl_of(p), {0, rawget(p, ID), "acquire", block, timeout, n = 5})
end

-- As the C locks' (fence.c): a failed fence never leaves the lock held;
-- the release goes first, then the fence's error.
local function release_method(p, ...)
  local cl = cl_of(p)
  local ok, err = true, nil
  if n_dirty > (cl.dirty and 1 or 0) then ok, err = pcall(flush, cl) end
  rawcall(cl, req(rawget(p, ID), "release", ...))
  if not ok then error(err, 0) end
end

local LockM = scoped(common{
  acquire = acquire_method,
  release = release_method,
  locked = sync_method("locked"),
})
define("Lock", "LockProxy", LockM, {__index = LockM})
define("RLock", "RLockProxy", LockM, {__index = LockM})

local SemM = scoped(common{
  acquire = acquire_method,
  release = release_method,
  get_value = sync_method("get_value"),
})
define("Semaphore", "SemaphoreProxy", SemM, {__index = SemM})
define("BoundedSemaphore", "BoundedSemaphoreProxy", SemM, {__index = SemM})

local EventM = common{
  set = sync_method("set"),
  clear = sync_method("clear"),
  is_set = sync_method("is_set"),
  wait = sync_method("wait"),
}
define("Event", "EventProxy", EventM, {__index = EventM})

local CondM = scoped(common{
  acquire = acquire_method,
  release = release_method,
  wait = sync_method("wait"),
  notify = sync_method("notify"),
  notify_all = sync_method("notify_all"),
  -- as Python's: the predicate runs here, between waits
  wait_for = function(p, pred, timeout)
    local deadline = timeout and now() + timeout
    local result = pred()
    while not result do
      local left
      if deadline then
        left = deadline - now()
        if left <= 0 then break end
      end
      p:wait(left)
      result = pred()
    end
    return result
  end,
})
define("Condition", "ConditionProxy", CondM, {__index = CondM})

local BarrierM = common{
  -- the wait that completes a round with an action gets the action to
  -- run here (see Barrier:wait in manager_types.lua)
  wait = function(p, timeout)
    local cl, id = cl_of(p), rawget(p, ID)
    local r = call(cl, {0, id, "wait", timeout, n = 4})
    if type(r) ~= "table" then return r end
    local ok, err = pcall(r[2])
    local fine = call(cl, {0, id, "finish_action", ok})
    if not ok then error(err, 0) end
    if not fine then raise("BrokenBarrierError", "the barrier is broken") end
    return r[3]
  end,
  reset = sync_method("reset"),
  abort = sync_method("abort"),
}
define("Barrier", "BarrierProxy", BarrierM, {
  __index = function(p, k)
    if k == "parties" or k == "n_waiting" or k == "broken" then
      return call(cl_of(p), {0, rawget(p, ID), "__get", k})
    end
    return BarrierM[k]
  end,
})

-- ---- any other object: its methods ---------------------------------------------

-- Proxies of objects served through their methods (a registered
-- callable's object): one class per set of method names.
function M._auto_class(exposed)
  if type(exposed) ~= "table" then exposed = {} end
  local sig = "auto:" .. table.concat(exposed, ",")
  local mt = proxy_classes[sig]
  if mt then return mt end
  local methods = common{}
  for _, name in ipairs(exposed) do
    if type(name) == "string" then
      methods[name] = function(p, ...)
        local r = call(cl_of(p), req(rawget(p, ID), "call_method", name, ...))
        return unpack(r, 1, r.n)
      end
    end
  end
  mt = define("auto", "AutoProxy", methods, {__index = methods})
  mt.__exposed = exposed
  proxy_classes.auto = nil
  proxy_classes[sig] = mt
  return mt
end

-- m:_debug_info() / proxy internals for tests
function M._proxy_id(p) return rawget(p, ID) end

-- ---- managers --------------------------------------------------------------------

local BaseManager = {_class_name = "BaseManager", _registry = {}}
M.BaseManager = BaseManager

local instance_mts = {}   -- class -> metatable of its instances

local function class_of(self)
  local mt = getmetatable(self)
  return mt and mt.__class
end

local counter = 0
local manager_opts = {address = true, authkey = true, shutdown_timeout = true}

local function new_instance(cls, opts)
  if opts ~= nil and type(opts) ~= "table" then
    typeerror(1, cls._class_name, "options table", opts)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not manager_opts[k] then
      argerror(1, cls._class_name, "unknown option '" .. tostring(k) .. "'")
    end
  end
  local authkey = opts.authkey
  if authkey ~= nil and authkey ~= false and type(authkey) ~= "string" then
    argerror(1, cls._class_name, "authkey must be a string, got " .. type(authkey))
  end
  if authkey == nil then
    -- as Python's: the process tree's key (made when the main process
    -- loaded the module), so every process of the tree can use the proxies
    -- without the key travelling
    authkey = core.tree_authkey
  elseif authkey == "" then
    raise("ValueError", cls._class_name .. ": authkey must not be empty " ..
          "(authkey = false turns authentication off)")
  elseif authkey == false then
    authkey = nil    -- no authentication (functions are then refused)
  end
  if opts.address ~= nil then
    connection._check_address(opts.address, cls._class_name)
  end
  local mt = instance_mts[cls]
  return setmetatable({address = opts.address, authkey = authkey, pid = nil,
                       _state = "initial", _shutdown_timeout =
                       opts.shutdown_timeout or M.SHUTDOWN_TIMEOUT}, mt)
end

-- Cls:extend([name]) -> a subclass with its own copy of the registry.
function BaseManager:extend(name)
  local base = self
  local registry = {}
  for k, v in pairs(base._registry) do registry[k] = v end
  local cls = setmetatable({_class_name = name or base._class_name,
                            _registry = registry},
                           {__index = base, __call = new_instance,
                            __tostring = function(c)
                              return "<class " .. c._class_name .. ">"
                            end})
  instance_mts[cls] = {
    __index = cls, __class = cls, __close = function(m) m:shutdown() end,
    __name = "multiprocessing.managers." .. cls._class_name,
    __tostring = function(m)
      return string.format("<%s %s address=%s pid=%s>", cls._class_name,
        m._state, m.address and address_text(m.address) or "nil",
        tostring(m.pid))
    end,
  }
  return cls
end

-- Cls:register(typeid [, callable [, opts]]): typeid becomes a method
-- m:typeid(...) that asks the server to call callable(...) and returns
-- a proxy of its result (a table or object; other values are returned
-- as they are).  The client side registers the name alone.
function BaseManager:register(typeid, callable, opts)
  if type(typeid) ~= "string" then
    argerror(1, "register", "typeid must be a string, got " .. type(typeid))
  end
  if callable ~= nil and type(callable) ~= "function" then
    local mt = getmetatable(callable)
    if not (mt and mt.__call) then
      typeerror(2, "register", "function", callable)
    end
  end
  local cls = rawget(self, "_registry") and self or class_of(self)
  if cls == BaseManager then
    error("register on a subclass: local QM = mp.managers.BaseManager:extend()", 2)
  end
  cls._registry[typeid] = {callable = callable}
  if not (type(opts) == "table" and opts.create_method == false) then
    rawset(cls, typeid, function(m, ...)
      return m:_create(typeid, ...)
    end)
  end
end

function BaseManager:_client()
  local cl = rawget(self, "_cl")
  if cl == nil then
    raise("ValueError", "the manager is not started or connected " ..
          "(call start() or connect() first)")
  end
  return cl
end

function BaseManager:_create(typeid, ...)
  return call(self:_client(), req(0, "create", typeid, ...))
end

-- The server side's registry: typeid -> {callable}
local function registry_of(self)
  local cls = class_of(self)
  local out = {}
  for k, v in pairs(cls._registry) do out[k] = v end
  return out
end

-- m:get_server() -> a server bound to m.address in this process; its
-- serve_forever() serves until a client asks for shutdown (or Ctrl-C).
function BaseManager:get_server()
  if self._state ~= "initial" then
    raise("ProcessError", "the manager is already " .. self._state)
  end
  local S = require "multiprocessing.manager_server"
  local server = S.new{registry = registry_of(self), address = self.address,
                       authkey = self.authkey}
  self.address = server.address
  return server
end

-- Finalizer of a started manager (owner only): made after the server's
-- fork, so at exit it runs before the exit joins children.
local function guard(self)
  return setmetatable({}, {__gc = function()
    if self._state == "started" and self._owner == getpid() then
      pcall(self.shutdown, self)
    end
  end})
end

-- m:start([initializer [, initargs]]): forks the server process.
function BaseManager:start(initializer, initargs)
  if self._state ~= "initial" then
    raise("ProcessError", "the manager is already " .. self._state)
  end
  if initializer ~= nil and type(initializer) ~= "function" then
    argerror(1, "start", "initializer must be a function")
  end
  local Process = require("multiprocessing.process").Process
  local registry = registry_of(self)
  local address, authkey = self.address, self.authkey
  local r, w = core.Pipe(false)
  local owner = getpid()
  counter = counter + 1
  local proc = Process{name = class_of(self)._class_name .. "-" .. counter,
                       daemon = true, target = function()
    r:close()
    -- Ctrl-C in the terminal is the owner's to handle (it shuts us down)
    core.set_signal("SIGINT", "ignore")
    -- keep no copy of the parent's other fds: a pipe's end held here
    -- would hide its end of file from its reader
    if core.detach_inherited_fds then core.detach_inherited_fds({w:fileno()}) end
    if initializer then initializer(unpack(initargs or {}, 1, (initargs or {}).n)) end
    local S = require "multiprocessing.manager_server"
    local ok, server = pcall(S.new, {registry = registry, address = address,
                                     authkey = authkey, owner_pid = owner})
    if not ok then
      w:send({err = is_error(server) and server or tostring(server)})
      w:close()
      return 1
    end
    w:send({address = server.address, uid = server.uid})
    w:close()
    server:serve_forever()
  end}
  local ok, err = pcall(proc.start, proc)
  w:close()
  if not ok then
    r:close()
    error(err, 0)
  end
  local got
  ok, err = pcall(function()
    if not r:poll(M.START_TIMEOUT) then
      raise("TimeoutError", "the manager process did not start in time")
    end
    got = r:recv()
  end)
  r:close()
  if not ok or got.err then
    if proc:is_alive() then proc:kill() end
    proc:join()
    proc:close()
    if ok then error(got.err, 0) end
    if is_error(err, "EOFError") then
      raise("ProcessError", "the manager process died while starting")
    end
    error(err, 0)
  end
  self.address, self.pid = got.address, proc.pid
  self._process, self._owner, self._state = proc, getpid(), "started"
  self._cl = client_for(got.uid, got.address, authkey)
  self._guard = guard(self)
  return self
end

-- m:connect(): uses a server started elsewhere (another program).
function BaseManager:connect()
  if self._state ~= "initial" then
    raise("ProcessError", "the manager is already " .. self._state)
  end
  if self.address == nil then
    raise("ValueError", "connect: the manager has no address")
  end
  local probe = setmetatable({uid = nil, address = self.address,
    authkey = self.authkey, pid = getpid(), seq = 0, live = {},
    cache = {}, to_release = {}, flush = false, tokens = 0}, Client)
  local c = hello(probe)
  local info = rawcall(probe, {0, 0, "hello", getpid(), {}})
  local cl = client_for(info.uid, self.address, self.authkey)
  cl.authkey = self.authkey   -- (a proxy decoded earlier may have guessed)
  if cl.conn and cl.pid == getpid() then
    pcall(c.close, c)
  else
    cl.conn, cl.pid, cl.seq, cl.dead = c, getpid(), probe.seq, nil
  end
  self.pid, self._cl, self._state = info.pid, cl, "connected"
  return self
end

-- m:sync(): raises the error of a failed earlier write of this process.
function BaseManager:sync()
  call(self:_client(), {0, 0, "ping"})
end

-- m:_debug_info() -> {objects=, pinned=, clients=, transits=} (after a
-- full collection in the server)
function BaseManager:_debug_info()
  return call(self:_client(), {0, 0, "info"})
end

-- m:shutdown(): the owner stops its server (asks, then terminates it if
-- it does not leave in shutdown_timeout seconds); a connected client asks
-- the server to stop.  Proxies then fail at once.  A forked child's copy
-- of its parent's manager only drops its own connection.
function BaseManager:shutdown()
  local cl = rawget(self, "_cl")
  local state = self._state
  if state == "started" and self._owner ~= getpid() then
    if cl and cl.pid == getpid() and cl.conn then
      pcall(cl.conn.close, cl.conn)
      cl.conn = nil
    end
    return
  end
  if state ~= "started" and state ~= "connected" then return end
  self._state = "shutdown"
  if cl then
    if not cl.dead and not (cl.conn and cl.pid == getpid() and
                            pcall(call, cl, {0, 0, "shutdown"})) then
      -- no usable connection here (at exit it may be finalized already):
      -- a short one for the request
      pcall(function()
        local c <close> = connection.Client(cl.address, cl.authkey)
        set_nofence(c)
        c:send({1, 0, "shutdown"})
        c:recv()
      end)
    end
    if cl.conn then pcall(cl.conn.close, cl.conn) end
    cl.conn = nil
    cl.dead = cl.dead or string.format("the manager at %s has shut down",
                                       address_text(cl.address))
    if cl.dirty then clean(cl) end
    clients[cl.uid] = nil
  end
  local proc = rawget(self, "_process")
  if proc then
    proc:join(self._shutdown_timeout)
    if proc:is_alive() then
      proc:terminate()
      proc:join(self._shutdown_timeout)
      if proc:is_alive() then
        proc:kill()
        proc:join()
      end
    end
    proc:close()
    self._process = nil
  end
end

-- Python's join(timeout): waits for the server process to end.
function BaseManager:join(timeout)
  local proc = rawget(self, "_process")
  if proc then proc:join(timeout) end
end

-- BaseManager is itself a class: BaseManager{...} works (nothing
-- registered), BaseManager:extend() makes subclasses.
do
  local cls = BaseManager:extend("BaseManager")
  for k, v in pairs(BaseManager) do
    if rawget(cls, k) == nil then rawset(cls, k, v) end
  end
  BaseManager = cls
  M.BaseManager = cls
end

-- ---- SyncManager: the types of Python's multiprocessing.Manager() ---------------

-- Server-side constructors (run in the manager process).
local function T() return require "multiprocessing.manager_types" end
local builtin = {
  dict = function(init) return T().new_dict(init) end,
  list = function(init) return T().new_list(init) end,
  Namespace = function(init) return T().new_namespace(init) end,
  Queue = function(maxsize) return T().new_queue(maxsize, false) end,
  JoinableQueue = function(maxsize) return T().new_queue(maxsize, true) end,
  Lock = function() return T().new_lock(false) end,
  RLock = function() return T().new_lock(true) end,
  Semaphore = function(v) return T().new_semaphore(v, false) end,
  BoundedSemaphore = function(v) return T().new_semaphore(v, true) end,
  Event = function() return T().new_event() end,
  Condition = function(lock) return T().new_condition(lock) end,
  Barrier = function(parties, action, timeout)
    return T().new_barrier(parties, action, timeout)
  end,
  Value = function(tc, v) return T().new_value(tc, v) end,
  Array = function(tc, init) return T().new_array(tc, init) end,
}

local SyncManager = BaseManager:extend("SyncManager")
for typeid, f in pairs(builtin) do SyncManager:register(typeid, f) end
-- a size the server cannot honour is refused here, before asking
rawset(SyncManager, "Array", function(m, tc, init)
  local n = math.type(init) == "float" and math.tointeger(init) or init
  if math.type(n) == "integer" then T().check_array_size(n, "Array") end
  return m:_create("Array", tc, init)
end)
M.SyncManager = SyncManager

-- mp.Manager([opts]) -> a started SyncManager
function M.Manager(opts)
  return SyncManager(opts):start()
end

-- Objects for a server's registered callables (Python's recipe serves a
-- queue.Queue): mp.managers.Queue() etc. make the object a manager
-- serves -- used in the process that runs (or starts) the server.
for typeid, f in pairs(builtin) do
  M[typeid] = function(...)
    require "multiprocessing.manager_server"   -- sets up the kernel
    return f(...)
  end
end

return M
