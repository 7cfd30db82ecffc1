-- multiprocessing.process: the identity of this process and its children.
local core = require "multiprocessing.core"

local P = {}

-- The object current_process() returns in the main program.
local main_process = {
  name = "MainProcess",
  daemon = false,
}

local function describe(self)
  return string.format("<%s name=%q pid=%d>",
    rawget(self, "_class") or "Process", self.name, self.pid or -1)
end

local identity_mt = {
  __index = function(self, k)
    if k == "pid" or k == "ident" then return core.getpid() end
  end,
  __tostring = describe,
}
setmetatable(main_process, identity_mt)

function P.current_process()
  return main_process
end

-- nil in the main program.
function P.parent_process()
  return nil
end

-- Live children of this process (none until Process objects exist).
function P.active_children()
  return {}
end

return P
