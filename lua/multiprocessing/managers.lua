-- multiprocessing.managers: Manager, BaseManager and SyncManager -- the
-- manager objects that start, connect to and shut down servers.
--
-- A manager is a server process (manager_server.lua) holding objects;
-- other processes use them through proxies: Lua tables whose metamethods
-- send each operation to the server.  This file is the client side: one
-- connection per manager per process, the proxy classes, how proxies
-- travel through the codec, and the manager objects that start, connect
-- to and shut down servers.  The rest of the client side lives beside it:
-- manager_client.lua (the connection), manager_proxies.lua (the proxies).
local core = require "multiprocessing.core"
local connection = require "multiprocessing.connection"

local raise, getpid, now = core.raise, core.getpid, core.now
local is_error, new_error = core.is_error, core.new_error
local unpack, select, type = table.unpack, select, type
local rawget, setmetatable, getmetatable = rawget, setmetatable, getmetatable
local set_nofence = core._set_nofence
local util = require "multiprocessing.util"
local argerror, typeerror = util.argerror, util.typeerror
local state = require "multiprocessing.manager_state"
local client = require "multiprocessing.manager_client"
local proxies = require "multiprocessing.manager_proxies"
require "multiprocessing.manager_extra_proxies"   -- (set, Pool: classes)

local Client, clients, client_for = client.Client, client.clients,
  client.client_for
local address_text, hello, clean = client.address_text, client.hello,
  client.clean
local rawcall, call, req = client.rawcall, client.call, client.req

local M = {}
M.managers = M

-- Seconds to wait for a manager to start, and for a shutdown.
M.START_TIMEOUT = 30
M.SHUTDOWN_TIMEOUT = 1.0

-- proxy internals, for tests
M._ID, M._CL, M._auto_class, M._proxy_id = proxies._ID, proxies._CL,
  proxies._auto_class, proxies._proxy_id

-- ---- managers --------------------------------------------------------------------

local BaseManager = {_class_name = "BaseManager", _registry = {}}
M.BaseManager = BaseManager

local instance_mts = {}   -- class -> metatable of its instances

local function class_of(self)
  local mt = getmetatable(self)
  return mt and mt.__class
end

local counter = 0
local manager_opts = {address = true, authkey = true, shutdown_timeout = true,
                      context = true}

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
  -- (Python's ctx: the start method of the server process)
  local method = require("multiprocessing.context").method_of(opts.context,
                                                             cls._class_name)
  local mt = instance_mts[cls]
  return setmetatable({address = opts.address, authkey = authkey, pid = nil,
                       _start_method = method,
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
-- as they are).  The client side registers the name alone.  Options, as
-- Python's: exposed (the method names a proxy may call; the server
-- refuses others), method_to_typeid (method name -> a registered typeid:
-- that method's result comes back as a proxy of that type rather than as
-- a copy), proxytype (a table of functions, the proxy's own methods,
-- which reach the object with p:_callmethod(name, ...)), create_method.
local register_opts = {create_method = true, exposed = true,
                       proxytype = true, method_to_typeid = true}

local function check_register_opts(typeid, opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then typeerror(3, "register", "options table", opts) end
  for k in pairs(opts) do
    if not register_opts[k] then
      argerror(3, "register", "unknown option '" .. tostring(k) .. "'")
    end
  end
  local exposed, m2t, ptype = opts.exposed, opts.method_to_typeid, opts.proxytype
  if exposed ~= nil then
    if type(exposed) ~= "table" then
      argerror(3, "register", "exposed must be a list of method names, got " ..
               type(exposed))
    end
    for i, name in ipairs(exposed) do
      if type(name) ~= "string" or name:sub(1, 1) == "_" then
        argerror(3, "register", string.format("exposed[%d] must be a method " ..
                 "name not starting with '_', got %s", i,
                 type(name) == "string" and "'" .. name .. "'" or type(name)))
      end
    end
  end
  if m2t ~= nil then
    if type(m2t) ~= "table" then
      argerror(3, "register", "method_to_typeid must be a table, got " .. type(m2t))
    end
    for k, v in pairs(m2t) do
      if type(k) ~= "string" or type(v) ~= "string" then
        argerror(3, "register", "method_to_typeid maps method names to " ..
                 "typeids (strings)")
      end
    end
  end
  if ptype ~= nil and type(ptype) ~= "table" then
    argerror(3, "register", "proxytype must be a table of methods, got " ..
             type(ptype))
  end
  if ptype ~= nil then proxies.user_class(typeid, ptype, exposed) end
  return {exposed = exposed, method_to_typeid = m2t, proxytype = ptype ~= nil}
end

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
  local o = check_register_opts(typeid, opts)
  cls._registry[typeid] = {callable = callable, exposed = o.exposed,
                           method_to_typeid = o.method_to_typeid,
                           proxytype = o.proxytype}
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

-- The channel a starting server answers on: under fork a one-way Pipe;
-- under forkserver a Queue (a handle any process of the tree attaches,
-- where a Pipe's fd would have to be parked with the fd keeper, itself a
-- fork of the caller).  ch.send(msg) is the server's; ch.recv(proc,
-- timeout) the owner's (nil: the server died first); ch.keep: the fd the
-- server keeps; ch.owner_done/ch.child_done: each side drops its end.
local function start_channel(forkserver)
  if forkserver then
    local q = core.Queue()
    local function nothing() end
    return {send = function(msg) q:put(msg) end, keep = nil,
      child_done = nothing, owner_done = function() q:close() end,
      recv = function(proc, timeout)
        local deadline = now() + timeout
        repeat
          local ok, got = pcall(q.get, q, true, 0.05)
          if ok then return got end
          if not is_error(got, "Empty") then error(got, 0) end
          if not proc:is_alive() then
            ok, got = pcall(q.get, q, false)   -- (sent, then ended)
            return ok and got or nil
          end
        until now() >= deadline
        raise("TimeoutError", "the manager process did not start in time")
      end}
  end
  local r, w = core.Pipe(false)
  return {send = function(msg) w:send(msg); w:close() end, keep = w:fileno(),
    child_done = function() r:close() end,
    owner_done = function() r:close(); w:close() end,
    recv = function(_, timeout)
      w:close()
      if not r:poll(timeout) then
        raise("TimeoutError", "the manager process did not start in time")
      end
      local ok, got = pcall(r.recv, r)
      if ok then return got end
      if is_error(got, "EOFError") then return nil end
      error(got, 0)
    end}
end

-- A started server ends with its owner, even one killed by SIGKILL: ->
-- a function telling whether the owner is gone.  A fork's owner is its
-- parent; a fork server's child watches a pidfd of its owner (opened
-- while the owner waits for its answer, so the pid is still the owner's).
local function owner_watch(owner, forkserver)
  if not forkserver then
    return function() return core.getppid() ~= owner end
  end
  local fd = core.pidfd(owner)
  if fd == nil then   -- (no pidfd support)
    return function() return not core.kill(owner, 0) end
  end
  return function() return #core.wait_fds({fd}, 0) > 0 end
end

-- m:start([initializer [, initargs]]): starts the server process (a fork
-- of the caller, or of the fork server under that start method).
function BaseManager:start(initializer, initargs)
  if self._state ~= "initial" then
    raise("ProcessError", "the manager is already " .. self._state)
  end
  if initializer ~= nil and type(initializer) ~= "function" then
    argerror(1, "start", "initializer must be a function")
  end
  local method = self._start_method
  local Process = method and
    require("multiprocessing.context").get_context(method).Process or
    require("multiprocessing.process").Process
  local forkserver = (method or
    require("multiprocessing.forkserver").method()) == "forkserver"
  local registry = registry_of(self)
  local address, authkey = self.address, self.authkey
  local ch = start_channel(forkserver)
  local owner = getpid()
  counter = counter + 1
  local proc = Process{name = class_of(self)._class_name .. "-" .. counter,
                       daemon = true, target = function()
    ch.child_done()
    -- Ctrl-C in the terminal is the owner's to handle (it shuts us down)
    core.set_signal("SIGINT", "ignore")
    -- keep no copy of the parent's other fds: a pipe's end held here
    -- would hide its end of file from its reader
    if core.detach_inherited_fds then
      core.detach_inherited_fds({ch.keep})
    end
    local owner_gone = owner_watch(owner, forkserver)
    if initializer then initializer(unpack(initargs or {}, 1, (initargs or {}).n)) end
    local S = require "multiprocessing.manager_server"
    local ok, server = pcall(S.new, {registry = registry, address = address,
                                     authkey = authkey, owner_gone = owner_gone})
    if not ok then
      ch.send({err = is_error(server) and server or tostring(server)})
      return 1
    end
    ch.send({address = server.address, uid = server.uid})
    server:serve_forever()
  end}
  local ok, err = pcall(proc.start, proc)
  if not ok then
    ch.owner_done()
    error(err, 0)
  end
  local got
  ok, err = pcall(function() got = ch.recv(proc, M.START_TIMEOUT) end)
  ch.owner_done()
  if not ok or got == nil or got.err then
    if proc:is_alive() then proc:kill() end
    proc:join()
    proc:close()
    if ok and got then error(got.err, 0) end
    if ok then
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
    cl.c_send, cl.c_recv = probe.c_send, probe.c_recv
  end
  self.pid, self._cl, self._state = info.pid, cl, "connected"
  return self
end

-- m:sync(): raises the error of a failed earlier write of this process.
function BaseManager:sync()
  call(self:_client(), {0, 0, "ping"})
end

-- m:_debug_info() -> {objects=, pinned=, clients=, transits=, drains=,
-- quick=} (after a full collection in the server; drains: see
-- manager_server.lua; quick: requests answered in C, runtime/conn.c)
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
local function T()
  require "multiprocessing.manager_containers"
  require "multiprocessing.manager_set"
  require "multiprocessing.manager_pool"
  return require "multiprocessing.manager_waiting"   -- (manager_types, loaded)
end
local builtin = {
  dict = function(init) return T().new_dict(init) end,
  list = function(init) return T().new_list(init) end,
  Namespace = function(init) return T().new_namespace(init) end,
  set = function(init) return T().new_set(init) end,
  Pool = function(...) return T().new_pool(...) end,
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

-- Python's SharedMemoryManager (shm_manager.lua, which gets BaseManager
-- from here rather than requiring this file)
M.SharedMemoryManager = require("multiprocessing.shm_manager")(BaseManager)

return M
