-- multiprocessing.util: the module's logger (Python's get_logger and
-- log_to_stderr).
--
-- One logger per process, named "multiprocessing", with Python's levels
-- (DEBUG 10, INFO 20, WARNING 30, ERROR 40, CRITICAL 50, and the module's
-- own SUBDEBUG 5 and SUBWARNING 25).  Until log_to_stderr (or add_handler)
-- gives it a handler it behaves as Python's logger with no handler:
-- WARNING and above go to stderr as the bare message, the rest nowhere.
-- log_to_stderr(level) adds a handler writing "[LEVEL/ProcessName] message"
-- to stderr.  A forked child inherits its parent's configuration.
--
-- It also holds the argument checks every Lua face of the module shares
-- (U.argerror, U.check_self, ...): misuse raises Lua's standard "bad
-- argument #n to 'name' (...)" at the user's line, found by walking the
-- stack past this library's own frames, so that a check may sit any number
-- of calls deep (pool:map -> _map_async -> check) and still point at the
-- caller.  The message is a string with "file:line:" in front, as error()
-- makes it, so a stock lua5.4 that prints an uncaught error prints where
-- (and U.raise puts it in an error object's message the same way).
local U = {}

local levels = {
  NOTSET = 0, SUBDEBUG = 5, DEBUG = 10, INFO = 20, SUBWARNING = 25,
  WARNING = 30, ERROR = 40, CRITICAL = 50,
}
local names = {}
for k, v in pairs(levels) do names[v] = k end
U.levels = levels

local function level_of(v, argn, fname)
  if type(v) == "number" then return math.tointeger(v) or math.floor(v) end
  if type(v) == "string" and levels[v:upper()] then return levels[v:upper()] end
  U.argerror(argn, fname, "level expected: a number or one of DEBUG, INFO, " ..
    "WARNING, ERROR, CRITICAL; got " ..
    (type(v) == "string" and ("'" .. v .. "'") or type(v)))
end

local function level_name(level)
  return names[level] or ("Level " .. tostring(level))
end

local Logger = {}
Logger.__index = Logger
Logger.__name = "multiprocessing.Logger"
Logger.__tostring = function(self)
  return string.format("<Logger %s (%s)>", self.name, level_name(self.level))
end

function Logger:set_level(level)
  self.level = level_of(level, 1, "set_level")
end

function Logger:get_effective_level()
  return self.level ~= 0 and self.level or levels.WARNING
end

function Logger:is_enabled_for(level)
  return level >= self:get_effective_level()
end

-- handler(record) gets {level=, levelname=, message=, process_name=, pid=}
function Logger:add_handler(handler)
  if type(handler) ~= "function" then
    U.typeerror(1, "add_handler", "function", handler)
  end
  self.handlers[#self.handlers + 1] = handler
end

function Logger:remove_handler(handler)
  for i = #self.handlers, 1, -1 do
    if self.handlers[i] == handler then table.remove(self.handlers, i) end
  end
end

local current_process   -- (see U._set_current_process)

-- logger:log(level, fmt, ...): fmt is formatted with string.format when
-- arguments follow it, else used as it is (tostring'd).
function Logger:log(level, fmt, ...)
  level = level_of(level, 1, "log")
  if not self:is_enabled_for(level) then return end
  local msg
  if select("#", ...) > 0 then
    msg = string.format(tostring(fmt), ...)
  else
    msg = tostring(fmt)
  end
  local me = current_process()
  local record = {level = level, levelname = level_name(level), message = msg,
                  process_name = me.name, pid = me.pid}
  if #self.handlers == 0 then
    -- Python's "last resort": warnings and worse, the bare message
    if level >= levels.WARNING then
      io.stderr:write(msg, "\n")
      io.stderr:flush()
    end
    return
  end
  for _, h in ipairs(self.handlers) do h(record) end
end

for name, level in pairs(levels) do
  if level > 0 then
    Logger[name:lower()] = function(self, fmt, ...)
      return self:log(level, fmt, ...)
    end
  end
end

-- The process a record names.  multiprocessing.process installs its
-- current_process here when it loads (it requires this file, so this file
-- does not require it back); until then this is the main process.
current_process = function()
  return {name = "MainProcess", pid = require("multiprocessing.core").getpid()}
end
function U._set_current_process(f) current_process = f end

local logger = setmetatable({name = "multiprocessing", level = 0,
                             handlers = {}}, Logger)

function U.get_logger()
  return logger
end

local function stderr_handler(record)
  io.stderr:write("[", record.levelname, "/", tostring(record.process_name),
                  "] ", record.message, "\n")
  io.stderr:flush()
end

-- Adds the stderr handler (once) and sets the level when given.
function U.log_to_stderr(level)
  local have = false
  for _, h in ipairs(logger.handlers) do
    if h == stderr_handler then have = true end
  end
  if not have then logger:add_handler(stderr_handler) end
  if level ~= nil then logger.level = level_of(level, 1, "log_to_stderr") end
  return logger
end

-- ---- argument checks -------------------------------------------------------

-- A frame of this library: a file multiprocessing/<name>.lua (the embedded
-- chunks are "@multiprocessing/pool.lua", installed ones a path ending so).
local function ours(info)
  return info.what ~= "C" and info.source:find("multiprocessing/[%w_]+%.lua$") ~= nil
end

-- The level, as error() counts it from the function calling user_level's
-- caller, of the first frame that is not this library's: the user's call.
-- (A C frame there, pcall say, leaves the message without a position, as
-- Lua's own luaL_argerror does.)
local function user_level()
  local level = 3               -- 1 user_level, 2 its caller (the raiser)
  while true do
    local info = debug.getinfo(level, "S")
    if info == nil or not ours(info) then return level - 1 end
    level = level + 1
  end
end

-- The name of v's type as Lua's luaL_typeerror says it (a __name wins).
function U.typename(v)
  local mt = getmetatable(v)
  if type(mt) == "table" and type(rawget(mt, "__name")) == "string" then
    return rawget(mt, "__name")
  end
  return type(v)
end

-- Raises "bad argument #n to 'fname' (msg)" at the user's line.
function U.argerror(n, fname, msg)
  error(string.format("bad argument #%d to '%s' (%s)", n, fname, msg), user_level())
end

-- Raises "bad argument #n to 'fname' (expected expected, got <type>)".
function U.typeerror(n, fname, expected, v)
  error(string.format("bad argument #%d to '%s' (%s expected, got %s)", n, fname,
                      expected, U.typename(v)), user_level())
end

-- The name the caller gave an object of class cls (a local or upvalue of
-- the user's function holding one), for "use pool:map(...)"; var otherwise.
local function name_in_caller(level, cls, var)
  local function is(v)
    return (type(v) == "table" or type(v) == "userdata") and cls(v)
  end
  for i = 1, 250 do
    local name, v = debug.getlocal(level + 1, i)
    if name == nil then break end
    if name:match("^[%a_][%w_]*$") and is(v) then return name end
  end
  local info = debug.getinfo(level + 1, "f")
  if info and info.func then
    for i = 1, 250 do
      local name, v = debug.getupvalue(info.func, i)
      if name == nil then break end
      if name:match("^[%a_][%w_]*$") and is(v) then return name end
    end
  end
  return var
end

-- Raises "calling 'fname' on bad self (Class expected, got <type>; use
-- var:fname(...))": nearly always obj.fname(...) written for
-- obj:fname(...), the Python habit.  is_cls(v) says whether v is one.
function U.selferror(fname, clsname, var, v, is_cls)
  local level = user_level()
  local name = is_cls and name_in_caller(level, is_cls, var) or var
  error(string.format("calling '%s' on bad self (%s expected, got %s; use %s:%s(...))",
                      fname, clsname, U.typename(v), name, fname), level)
end

-- Raises the error object {kind, message} (core.raise's) from a public
-- call, its message led by the user's "file:line: " as error() would lead
-- a string (a stock lua5.4 prints an uncaught error object's tostring
-- alone, no traceback): also in the field where.  Called through a C
-- function (pcall(pool.map, pool, ...)) there is no line, as for strings.
function U.raise(kind, msg, fields)
  local level = user_level()
  local info = debug.getinfo(level, "Sl")
  local where = info and info.currentline > 0 and
                (info.short_src .. ":" .. info.currentline) or nil
  local err = require("multiprocessing.core").new_error(kind,
    where and (where .. ": " .. msg) or msg, fields)
  if where then err.where = where end
  error(err, 0)
end

-- Wraps every function of the method table methods so that it checks its
-- self with is_cls(self) first (for classes whose methods are not hot).
function U.checked_methods(methods, clsname, var, is_cls)
  for k, f in pairs(methods) do
    if type(f) == "function" and type(k) == "string" and not k:find("^__") then
      methods[k] = function(self, ...)
        if not is_cls(self) then U.selferror(k, clsname, var, self, is_cls) end
        return f(self, ...)
      end
    end
  end
  return methods
end

return U
