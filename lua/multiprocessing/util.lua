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
  error(string.format("bad argument #%d to '%s' (level expected: a number " ..
    "or one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got %s)", argn, fname,
    type(v) == "string" and ("'" .. v .. "'") or type(v)), 3)
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
    error("bad argument #1 to 'add_handler' (function expected, got " ..
          type(handler) .. ")", 2)
  end
  self.handlers[#self.handlers + 1] = handler
end

function Logger:remove_handler(handler)
  for i = #self.handlers, 1, -1 do
    if self.handlers[i] == handler then table.remove(self.handlers, i) end
  end
end

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
  local me = require("multiprocessing.process").current_process()
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

return U
