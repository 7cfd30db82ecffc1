-- multiprocessing.process: Process objects and the identity of this
-- process, its parent and its children.
--
-- A Process is a fork of the caller (core.spawn in runtime/process.c): the
-- target, its upvalues and its arguments are used as they are, nothing is
-- serialized.  Under the "forkserver" start method it is a fork of the
-- fork server instead (forkserver.lua), and what it needs travels through
-- the codec (P._snapshot here, rebuilt by P._remote_main).  The C side owns the fork discipline, the exit codes and the
-- registry that joins children at exit; this file is Python's policy:
-- names, daemon inheritance, the checks and their error messages, the
-- class mechanism (Process:extend()).
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local forkserver = require "multiprocessing.forkserver"

local getpid = core.pid       -- cached by the C side, right after forks too
-- (locals: a child's start reads no globals table)
local pcall, xpcall, rawget = pcall, xpcall, rawget
local raise = util.raise     -- (led by the caller's file:line)
local unpack = table.unpack

local P = {}

-- ---- this process's identity ---------------------------------------------

-- (this process is alive whatever asks: Python's current_process().is_alive())
local function self_alive() return true end

local main_process = {name = "MainProcess", daemon = false, _identity = "",
                      is_alive = self_alive}
setmetatable(main_process, {
  __index = function(_, k)
    if k == "pid" or k == "ident" then return getpid() end
  end,
  __tostring = function(self)
    return string.format("<_MainProcess name=%q pid=%d>", self.name, self.pid)
  end,
})

-- This process's identity, in one table, for the process S.owner.  A
-- child forked by start() writes nothing when it begins (every page a
-- child writes is a copy of its parent's): it finds S still describing its
-- parent and takes on its own identity in sync(), the first time it is
-- asked for it.  Fields: current (what current_process() returns);
-- starting, the Process being started (what a started child becomes);
-- parent, made on first use from parent_name and parent_pid; children,
-- the Process objects started here (Process -> true: strong references,
-- as Python's _children, so a running child's object is never collected);
-- counter, for default names (Process-<n>); starting_run,
-- starting_log, starting_log20 and starting_level, what start() found for
-- the child (see start), false when there is none.  All slots
-- exist from the start, so these writes allocate nothing, and start()'s
-- are never nil (a nil slot's write goes through luaV_finishset, which
-- also writes the table's own header: a second page).
-- adopted: Process objects standing for children that other parts of the
-- runtime forked themselves (Pool workers, see P._adopt), weakly: their
-- owner (the pool) holds them while they run.
local S = {current = main_process, starting = false, starting_run = false,
           starting_log = false, starting_log20 = false, starting_level = false,
           parent = nil,
           parent_name = nil, parent_pid = nil, children = nil, last = false,
           adopted = nil, counter = 0, owner = getpid(), remote = nil}

-- Makes S describe this process.  A process started by start() and the
-- forks it made before asking (core.take_started, runtime/process.c) take
-- on the identity of the Process started; any other fork (core.fork, a
-- host's fork) keeps its parent's, without its children.
local function sync()
  local me = getpid()
  if S.owner == me then return end
  if core.take_started() then
    local self = S.starting
    S.current, S.parent = self, nil
    S.parent_name, S.parent_pid = self._parent_name, self._parent_pid
  end
  S.children, S.last, S.adopted, S.counter, S.owner = nil, false, nil, 0, me
end

-- The children table, with S.last in it: the Process started last, kept
-- in a slot of S while it is the only one started and not joined (a
-- start+join loop then writes S's node and no other table: see S).
local function my_children()
  sync()
  local c, last = S.children, S.last
  if c == nil then
    c = {}
    S.children = c
  end
  if last then c[last], S.last = true, false end
  return c
end

-- ---- logging hooks -----------------------------------------------------------

-- The process's logger (util's one).  The level is checked first: a
-- child's start writes nothing it need not, and logger:log's checks of its
-- arguments call type() and friends.
local logger = util.get_logger()
local function log(level, fmt, ...)
  if logger:is_enabled_for(level) then logger:log(level, fmt, ...) end
end

-- ---- the class mechanism ---------------------------------------------------

local Process = {}
local props = {}    -- computed fields: name -> getter(self)
local EMPTY = setmetatable({n = 0}, {__newindex = function()
  error("attempt to modify the arguments of a Process", 2)
end})

local function check_closed(self)
  if rawget(self, "_closed") then
    raise("ValueError", "process object is closed")
  end
end

local function describe(self)
  local status
  sync()
  if rawget(self, "_closed") then
    status = "closed"
  elseif self == S.current then
    status = "started"
  elseif not rawget(self, "_child") then
    -- (an adopted child keeps its exit code once its owner let it go)
    local code = rawget(self, "_exitcode")
    status = code == nil and "initial" or "stopped exitcode=" .. tostring(code)
  else
    local code = self.exitcode
    if code == nil then status = "started"
    else status = "stopped exitcode=" .. tostring(code) end
  end
  local parts = {string.format("<%s name=%q", self._class_name, self.name)}
  if self.pid then parts[#parts + 1] = "pid=" .. self.pid end
  parts[#parts + 1] = "parent=" .. tostring(self._parent_pid)
  parts[#parts + 1] = status
  if self.daemon then parts[#parts + 1] = "daemon" end
  return table.concat(parts, " ") .. ">"
end

local function make_class(base, name)
  local cls = {_class_name = name or (base and base._class_name) or "Process"}
  local inst_mt = {
    __index = function(self, k)
      local get = props[k]
      if get then return get(self) end
      return cls[k]
    end,
    __tostring = describe,
    -- `local p <close> = mp.Process{...}`: joins it at the end of the
    -- scope (terminating it first when the scope ends with an error)
    __close = function(self, err)
      if rawget(self, "_closed") then return end
      if rawget(self, "_child") and self._parent_pid == getpid() then
        if err ~= nil and self:is_alive() then self:terminate() end
        self:join()
      end
      self:close()
    end,
    __name = "multiprocessing.Process",
  }
  rawset(cls, "_instance_mt", inst_mt)
  inst_mt._class = cls
  return setmetatable(cls, {
    __index = base,
    __call = function(c, ...)
      sync()
      S.counter = S.counter + 1
      -- every field the object will get, so that later assignments find
      -- their slot (no rehash, fewer pages written around forks); the
      -- identity ("2:1") and the default name ("Process-2:1") are made
      -- when first asked for (props), not for every process started
      local self = setmetatable({
        name = nil, daemon = S.current.daemon and true or false,
        pid = nil, _identity = nil, _id_parent = S.current._identity,
        _id_n = S.counter, _parent_pid = getpid(),
        _parent_name = S.current.name, _args = EMPTY, _target = nil,
        _child = nil, _exitcode = nil, _closed = nil,
      }, inst_mt)
      c.init(self, ...)
      return self
    end,
    __tostring = function(c) return "<class " .. c._class_name .. ">" end,
  })
end

-- mp.Process{target=, args=, name=, daemon=} or mp.Process(target, args)
local options = {target = true, args = true, name = true, daemon = true}
function Process.init(self, opts, args)
  if type(opts) == "function" then opts = {target = opts, args = args} end
  if opts == nil then return end
  local argerror, typename = util.argerror, util.typename
  if type(opts) ~= "table" then util.typeerror(1, "Process", "table", opts) end
  for k in pairs(opts) do
    if not options[k] then
      argerror(1, "Process", "unknown option '" .. tostring(k) .. "'")
    end
  end
  local t = opts.target
  if t ~= nil and type(t) ~= "function" then
    local mt = getmetatable(t)
    if not (type(mt) == "table" and mt.__call) then
      argerror(1, "Process", "target must be a function, got " .. typename(t))
    end
  end
  if opts.args ~= nil and type(opts.args) ~= "table" then
    argerror(1, "Process", "args must be a table, got " .. typename(opts.args))
  end
  if opts.name ~= nil and type(opts.name) ~= "string" and
     type(opts.name) ~= "number" then
    argerror(1, "Process", "name must be a string, got " .. typename(opts.name))
  end
  rawset(self, "_target", t)
  if opts.args then
    local a = opts.args
    rawset(self, "_args", {n = a.n or #a, unpack(a, 1, a.n or #a)})
  end
  if opts.name ~= nil then rawset(self, "name", tostring(opts.name)) end
  if opts.daemon ~= nil then rawset(self, "daemon", opts.daemon and true or false) end
end

-- A subclass: local MyProcess = mp.Process:extend() ... MyProcess(1):start()
-- Its init(self, ...) gets the constructor's arguments; name and daemon
-- have their defaults and may be set there (or through
-- mp.Process.init(self, {name = ..., daemon = ...})).
function Process:extend(name)
  local base = self
  if type(base) ~= "table" or not rawget(base, "_instance_mt") then
    util.argerror(1, "extend", "call it as Class:extend()")
  end
  local cls = make_class(base, name)
  if name == nil then rawset(cls, "_class_name", base._class_name) end
  return cls
end

-- The default run calls the target with the arguments.
function Process:run()
  local t = self._target
  if t ~= nil then
    local a = self._args
    local n = a.n or #a
    if n == 0 then t() else t(unpack(a, 1, n)) end
  end
end

local function traceback(e)
  local msg
  if type(e) == "string" then
    msg = e
  else
    local mt = getmetatable(e)
    if mt and mt.__tostring then msg = tostring(e)
    else msg = "(error object is a " .. type(e) .. " value)" end
  end
  -- the frames below xpcall are the parent's (the caller of start())
  local tb = debug.traceback(msg, 2)
  local cut = tb:find("\n\t%[C%]: in function 'xpcall'")
  return cut and tb:sub(1, cut - 1) or tb
end

-- Runs in the child (core.spawn calls it; its result is the exit code).
-- It writes nothing of its own (see S).
local function bootstrap(self)
  local run, log5 = S.starting_run, S.starting_log
  if not run then run, log5 = self.run, logger:is_enabled_for(5) end
  if log5 then logger:log(5, "child process calling self.run()") end
  local ok, err = xpcall(run, traceback, self)
  local code = 0
  if not ok then
    io.stdout:flush()
    io.stderr:write("Process ", tostring(self.name), ":\n", err, "\n")
    io.stderr:flush()
    code = 1
  end
  -- (start's answer for level 20 holds while run() left the logger's
  -- level and its is_enabled_for as they were)
  if S.starting_run and (rawget(logger, "level") or false) == S.starting_level and
     rawget(logger, "is_enabled_for") == nil then
    if S.starting_log20 then
      logger:log(20, "process exiting with exitcode %d", code)
    end
  else
    log(20, "process exiting with exitcode %d", code)
  end
  return code
end

-- Reaps finished children (Python's _cleanup), allocating nothing.
local function sweep()
  sync()
  local c = S.children
  if c == nil then return end
  for p in next, c do
    local h = rawget(p, "_child")
    local code, gone = nil, true
    if h and not rawget(p, "_closed") then code, gone = h:poll() end
    if gone then
      rawset(p, "_exitcode", code)
      S.children[p] = nil
    end
  end
end

-- What a child's bootstrap needs, found by start() before the fork: its
-- run method, whether the logger takes levels 5 and 20, and the logger's
-- level (the child would find the same a moment later, reading pages of
-- its own to do so: each one costs a child a fault, see S).  Should it
-- raise, the child looks again and fails there, as before.
--
-- start() keeps its calls two levels deep at most: each level of Lua
-- calls is a CallInfo of the interpreter's own, scattered over the heap,
-- and every page the parent writes between two forks costs it a fault
-- (start+join loop, perf record -e page-faults -d: the levels 3 below
-- start's were one page of their own).  So the run method is looked up
-- as the instance's __index does (its own field, else its class's,
-- through tables), and the logger's answers are kept for the level they
-- were found at (the child checks that level again, see bootstrap).
local plan_cache = {level = false, log5 = false, log20 = false}
local function logger_plan()
  return logger:is_enabled_for(5), logger:is_enabled_for(20)
end

function Process:start()
  check_closed(self)
  if rawget(self, "_child") then
    raise("ProcessError", "cannot start a process twice")
  end
  if self._parent_pid ~= getpid() then
    raise("ProcessError",
          "can only start a process object created by the current process")
  end
  sync()
  if S.current.daemon then
    raise("ProcessError", "daemonic processes are not allowed to have children")
  end
  local h
  if (self._start_method or forkserver.method()) == "forkserver" then
    h = forkserver.spawn("multiprocessing.process", "_remote_main",
                         P._snapshot(self), "process", self.daemon)
  else
    local run = rawget(self, "run")
    if run == nil then run = getmetatable(self)._class.run end
    local level, pc = rawget(logger, "level"), plan_cache
    if level ~= pc.level or rawget(logger, "is_enabled_for") ~= nil then
      local ok, log5, log20 = pcall(logger_plan)
      pc.level, pc.log5, pc.log20 = ok and level, ok and log5, ok and log20
      if not ok then run = nil end
    end
    S.starting, S.starting_run, S.starting_log = self, run or false, pc.log5
    S.starting_log20, S.starting_level = pc.log20, level or false
    h = core.spawn(bootstrap, self, self.daemon, false, false, true)
    -- (the child has its copies; here they are not to be kept)
    S.starting, S.starting_run = false, false
  end
  rawset(self, "_child", h)
  -- (S describes this process: sync() above; S.last: see my_children)
  local c = S.last and my_children() or S.children
  S.last = self
  if c ~= nil and next(c) ~= nil then
    sweep()     -- after the fork, while the child runs
  end
end

local function check_parent(self, what)
  if self._parent_pid ~= getpid() then
    raise("ProcessError", "can only " .. what .. " a child process")
  end
  if not rawget(self, "_child") then
    raise("ProcessError", "can only " .. what .. " a started process")
  end
end

local function finished(self, code)
  rawset(self, "_exitcode", code)
  if S.last == self and S.owner == getpid() then S.last = false
  else my_children()[self] = nil end
end

function Process:join(timeout)
  check_closed(self)
  check_parent(self, "join")
  local h = self._child
  local code = h:wait(timeout)
  local _, gone = h:poll()
  if gone then finished(self, code) end
end

function Process:is_alive()
  sync()
  if self == S.current then return true end
  check_closed(self)
  if not rawget(self, "_child") then return false end
  if self._parent_pid ~= getpid() then
    raise("ProcessError", "can only test a child process")
  end
  local code, gone = self._child:poll()
  if gone then finished(self, code) end
  return not gone
end

local function send(self, sig, what)
  check_closed(self)
  check_parent(self, what)
  self._child:signal(sig)
end

function Process:terminate() send(self, "SIGTERM", "terminate") end
function Process:kill() send(self, "SIGKILL", "kill") end
-- Python 3.14's interrupt(): SIGINT.  A child keeps the host's SIGINT
-- handler across the fork (after_fork_in_child in process.c), so its run
-- ends with "interrupted!" and exit code 1, as KeyboardInterrupt does.
function Process:interrupt() send(self, "SIGINT", "interrupt") end

function Process:close()
  if rawget(self, "_closed") then return end
  local h = rawget(self, "_child")
  if h and self._parent_pid == getpid() then
    if self:is_alive() then
      raise("ValueError", "Cannot close a process while it is still " ..
            "running. You should first call join() or terminate().")
    end
  end
  if h then
    rawset(self, "_exitcode", rawget(self, "_exitcode") or
           (self._parent_pid == getpid() and (h:poll())) or nil)
    rawset(self, "pid", h:pid())
    h:close()
  end
  my_children()[self] = nil
  rawset(self, "_closed", true)
end

-- Event loops: p:fileno() is the sentinel, readable exactly when join()
-- would not block; pollfd/events/timeout are the cqueues protocol.
function Process:fileno() return self.sentinel end
function Process:pollfd() return self.sentinel end
function Process:events() return "r" end
function Process:timeout() return nil end

props.exitcode = function(self)
  local h = rawget(self, "_child")
  if rawget(self, "_closed") or not h then return rawget(self, "_exitcode") end
  if self._parent_pid ~= getpid() then return nil end
  local code, gone = h:poll()
  if gone then finished(self, code) end
  return code
end

props.sentinel = function(self)
  check_closed(self)
  local h = rawget(self, "_child")
  if not h then raise("ValueError", "process not started") end
  return h:sentinel()
end

-- (a closed Process keeps its pid as a field; see close)
props.pid = function(self)
  local h = rawget(self, "_child")
  if h then return h:pid() end
  sync()
  if self == S.current then return getpid() end
  return nil
end

props.ident = function(self) return self.pid end

props._identity = function(self)
  local base, n = rawget(self, "_id_parent"), rawget(self, "_id_n")
  if n == nil then return nil end
  local id = base == "" and tostring(n) or base .. ":" .. n
  rawset(self, "_identity", id)
  return id
end

props.name = function(self)
  local id = self._identity
  if id == nil then return nil end
  local name = "Process-" .. id
  rawset(self, "name", name)
  return name
end

-- The public methods check their self (p.start() for p:start() gets "use
-- p:start(...)" at the caller's line); run and init are the user's to
-- override and call as they like, extend is the class's.
do
  local keep = {run = Process.run, init = Process.init, extend = Process.extend}
  util.checked_methods(Process, "Process", "p", function(v)
    local mt = getmetatable(v)
    return type(mt) == "table" and rawget(mt, "__name") == "multiprocessing.Process"
  end)
  for k, f in pairs(keep) do Process[k] = f end
end

-- Process is itself a class (mp.Process{...} constructs one).
do
  local cls = make_class(nil, "Process")
  for k, v in pairs(Process) do rawset(cls, k, v) end
  Process = cls
end
P.Process = Process

-- ---- module functions -------------------------------------------------------

function P.current_process()
  sync()
  return S.current
end

-- The parent of a child: name, pid, ident, is_alive(), join(timeout).
local ParentProcess = {}
ParentProcess.__index = ParentProcess
ParentProcess.__tostring = function(self)
  return string.format("<_ParentProcess name=%q parent=%d %s>", self.name,
    self.pid, self:is_alive() and "started" or "stopped")
end
ParentProcess.__name = "multiprocessing.ParentProcess"

function ParentProcess:is_alive()
  -- a child of the fork server: its parent is not its getppid()
  if self._remote then return core.kill(self.pid, 0) end
  -- a child whose parent died is re-parented: getppid() changes
  return core.getppid() == self.pid
end

function ParentProcess:join(timeout)
  local deadline = timeout and core.now() + math.max(timeout, 0)
  while self:is_alive() do
    if deadline and core.now() >= deadline then return end
    core.sleep(0.01)
  end
end

function P._make_parent(name, pid)
  return setmetatable({name = name, pid = pid, ident = pid, daemon = false},
                      ParentProcess)
end

function P.parent_process()
  sync()
  if S.parent == nil and S.parent_pid ~= nil then
    S.parent = P._make_parent(S.parent_name, S.parent_pid)
    S.parent._remote = S.remote
  end
  return S.parent
end

-- Reaps finished children (Python's _cleanup); returns the live ones.
function P.reap()
  local live = {}
  for p in pairs(my_children()) do
    local h = rawget(p, "_child")
    local code, gone = nil, true
    if h and not rawget(p, "_closed") then code, gone = h:poll() end
    if gone then finished(p, code) else live[#live + 1] = p end
  end
  return live
end

-- The live children: Processes started here and the children adopted
-- (Pool workers), as Python's, which lists its pools' workers too.
function P.active_children()
  local live = P.reap()
  if S.adopted then
    for p in pairs(S.adopted) do
      local ok, _, gone = pcall(p._child.poll, p._child)
      if ok and not gone then live[#live + 1] = p end
    end
  end
  table.sort(live, function(a, b) return a.pid < b.pid end)
  return live
end

-- For other parts of the runtime that fork their own children (the Pool's
-- workers, core.spawn handles they own and reap): a Process object
-- standing for the child h, daemonic, for active_children and the user.
-- The owner keeps it and calls P._disown(p) before it closes h.
function P._adopt(name, h)
  sync()
  local p = setmetatable({
    name = name, daemon = true, pid = nil, _identity = nil, _id_parent = nil,
    _id_n = nil, _parent_pid = getpid(), _parent_name = S.current.name,
    _args = EMPTY, _target = nil, _child = h, _exitcode = nil, _closed = nil,
  }, Process._instance_mt)
  local a = S.adopted
  if a == nil then
    a = setmetatable({}, {__mode = "k"})
    S.adopted = a
  end
  a[p] = true
  return p
end

-- The adopted child is gone (exit code code) and its handle about to close.
-- (It keeps its pid and exit code; without a handle it is not alive.)
function P._disown(p, code, pid)
  if S.adopted then S.adopted[p] = nil end
  local h = rawget(p, "_child")
  if h == nil then return end
  rawset(p, "pid", pid)
  rawset(p, "_exitcode", code)
  rawset(p, "_child", nil)
end

function P.register_at_fork(hooks)
  return core.register_at_fork(hooks)
end

-- For other parts of the runtime that fork their own workers (the Pool):
-- makes this process look like a child with the given name.  parent_pid:
-- the owner, for a child of the fork server (whose OS parent is the server).
function P._become_child(name, daemon, parent_pid)
  sync()
  local id = S.current._identity
  local me = {name = name, daemon = daemon and true or false,
              pid = getpid(), _identity = id == "" and "0" or id .. ":0",
              is_alive = self_alive}
  S.parent, S.parent_name = nil, S.current.name
  S.parent_pid, S.remote = parent_pid or core.getppid(), parent_pid ~= nil
  S.current = me
  S.children, S.last, S.adopted, S.counter = nil, false, nil, 0
  return me
end

-- ---- the forkserver start method -----------------------------------------

-- What a child of the fork server needs to become the Process self: its
-- class's own methods (a Process:extend() class), its fields, target and
-- arguments.  It travels through the codec (forkserver.lua).
local not_methods = {_instance_mt = true, _class_name = true,
                     _start_method = true}
function P._snapshot(self)
  local _ = self.name                 -- (made now: the child keeps it)
  local methods, fields = {}, {}
  local cls = getmetatable(self)._class
  while cls and cls ~= Process do
    for k, v in next, cls do
      if methods[k] == nil and not not_methods[k] then methods[k] = v end
    end
    cls = getmetatable(cls).__index
  end
  for k, v in next, self do
    if k ~= "_args" and k ~= "_target" then fields[k] = v end
  end
  local args = rawget(self, "_args")
  return {class_name = self._class_name, methods = methods, fields = fields,
          target = rawget(self, "_target"),
          args = args ~= EMPTY and args or nil,
          parent_name = S.current.name, parent_pid = getpid()}
end

-- In a child of the fork server: becomes the Process described by d and
-- runs it; returns the exit code.
function P._remote_main(d)
  local cls = Process
  if next(d.methods) ~= nil or d.class_name ~= "Process" then
    cls = make_class(Process, d.class_name)
    for k, v in pairs(d.methods) do rawset(cls, k, v) end
  end
  local self = d.fields
  self._args, self._target = d.args or EMPTY, d.target
  setmetatable(self, cls._instance_mt)
  S.current, S.parent, S.remote = self, nil, true
  S.parent_name, S.parent_pid = d.parent_name, d.parent_pid
  S.children, S.last, S.adopted = nil, false, nil
  S.counter, S.owner = 0, getpid()
  return bootstrap(self)
end

util._set_current_process(P.current_process)

return P
