-- multiprocessing.manager_proxies: the proxy classes -- Lua tables whose
-- metamethods send each operation to the manager (dict, list, Namespace,
-- Value, Array, queues, locks and the rest, and any object served through
-- its methods) -- and how proxies travel through the codec.
--
-- Lifetime.  The server keeps an object while some process holds a
-- proxy of it (counted per process: a proxy collected here sends a
-- release with the next message), while a proxy of it is in transit
-- (encoded and not yet decoded), or while another managed object refers
-- to it.  See manager_server.lua.
local core = require "multiprocessing.core"

local raise, getpid, now = core.raise, core.getpid, core.now
local is_error, new_error = core.is_error, core.new_error
local unpack, select, type = table.unpack, select, type
local rawget, setmetatable, getmetatable = rawget, setmetatable, getmetatable
local util = require "multiprocessing.util"
local argerror, typeerror = util.argerror, util.typeerror
local state = require "multiprocessing.manager_state"
local client = require "multiprocessing.manager_client"

local REC_MT = state.REC_MT
local clients, client_for = client.clients, client.client_for
local post, rawcall, call, req, flush = client.post, client.rawcall,
  client.call, client.req, client.flush
local call1 = client.call1

local M = {}

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

local function proxy_for(cl, id, typeid, exposed, ptype)
  local p = cl.cache[id]
  if p then return p end
  local mt = proxy_classes[typeid]
  if typeid == "auto" then
    mt = ptype and M.user_classes[ptype] and M.user_classes[ptype](exposed) or
         M._auto_class(exposed)
  end
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
          token, mt.__exposed, mt.__ptype}
end

local function rebuild(s, untrusted)
  local uid, id = s[1], s[2]
  if untrusted and s[5] then
    -- (a keyless manager's peer may send its own proxies, never ones that
    -- would authenticate: the key could be relayed)
    raise("DecodeError", "a proxy of a manager with an authkey refused " ..
          "from an unauthenticated peer")
  end
  local server = state.serving[uid]
  -- an object record in the process serving it; elsewhere (a process that
  -- bound a server a child of it serves, or a child of the server) a proxy
  if server and server.serving_pid == getpid() then
    return server:rebuild_rec(s)
  end
  local cl = clients[uid] or
    client_for(uid, s[4], s[5] and core.tree_authkey or nil)
  local p = proxy_for(cl, id, s[3], s[8], s[9])
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
  util.checked_methods(methods, name, "proxy", function(v)
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

-- (d[k]: call1, no table made for the request; p[CL] and p[ID] are
-- always there, no need of rawget)
define("dict", "DictProxy", DictM, {
  __index = function(p, k)
    local m = DictM[k]
    if m then return m end
    return call1(p[CL], p[ID], "get", k)
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
  shutdown = function(p, immediate)
    if immediate ~= nil and type(immediate) ~= "boolean" then
      typeerror(1, "shutdown", "boolean", immediate)
    end
    call(cl_of(p), {0, rawget(p, ID), "shutdown", immediate, n = 4})
  end,
  is_shutdown = sync_method("is_shutdown"),
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
  if client.others_dirty(cl) then ok, err = pcall(flush, cl) end
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
  -- run here (see Barrier:wait in manager_waiting.lua)
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

-- Proxies of a typeid registered with a proxytype (Python's BaseProxy
-- subclass): the exposed methods as an AutoProxy's, then the proxytype's
-- own functions over them; p:_callmethod(name, ...) calls the object's
-- method (it must be exposed).  typeid -> maker(exposed) -> metatable.
M.user_classes = {}
function M.user_class(typeid, ptype, exposed0)
  local made = {}
  M.user_classes[typeid] = function(exposed)
    exposed = exposed or exposed0 or {}
    local sig = table.concat(exposed, ",")
    if made[sig] then return made[sig] end
    local methods = common{}
    local function callmethod(p, name, ...)
      local r = call(cl_of(p), req(rawget(p, ID), "call_method", name, ...))
      return unpack(r, 1, r.n)
    end
    for _, name in ipairs(exposed) do
      methods[name] = function(p, ...) return callmethod(p, name, ...) end
    end
    for k, f in pairs(ptype) do
      if type(k) == "string" and type(f) == "function" then methods[k] = f end
    end
    methods._callmethod = callmethod
    local mt = define("auto", typeid .. "Proxy", methods, {__index = methods})
    mt.__exposed, mt.__ptype = exposed, typeid
    proxy_classes.auto = nil
    made[sig] = mt
    return mt
  end
end

-- What manager_extra_proxies.lua builds its classes with.
M._kit = {define = define, common = common, sync_method = sync_method,
          cl_of = cl_of, ID = ID, call = call, req = req}

-- m:_debug_info() / proxy internals for tests
function M._proxy_id(p) return rawget(p, ID) end

return M
