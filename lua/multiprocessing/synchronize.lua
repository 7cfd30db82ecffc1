-- multiprocessing.synchronize: Lock, RLock, Semaphore, BoundedSemaphore,
-- Event, Condition and Barrier.
--
-- The objects, their constructors and methods are C (runtime/sync.c);
-- this file adds the scoped forms, lock:with(fn, ...) and lock:guard()
-- for <close> variables, and Condition:wait_for.
local core = require "multiprocessing.core"

local S = {}

-- ---- scoped use, shared by every lock-like type ----------------------------

local function with(self, fn, ...)
  self:_enter()
  local r = table.pack(pcall(fn, ...))
  self:_exit()
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

-- The guard releases what it holds when its <close> variable goes out of
-- scope, on errors too.
local guard_mt = {
  __name = "multiprocessing.guard",
  __close = function(g)
    local held = g[1]
    if held then
      g[1] = nil
      held:_exit()
    end
  end,
}

local function guard(self)
  self:_enter()
  return setmetatable({self}, guard_mt)
end

-- Installs with/guard in the method tables of the named C types.
function S._scoped(names)
  for _, name in ipairs(names) do
    local m = core.methods[name]
    m.with = with
    m.guard = guard
  end
end

S._scoped {"Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition"}

-- Condition:wait_for(predicate, timeout): Python's loop, with a deadline
-- computed once.
function core.methods.Condition.wait_for(self, predicate, timeout)
  local result = predicate()
  if result then return result end
  local deadline = timeout and core.now() + math.max(timeout, 0)
  while not result do
    local waittime
    if deadline then
      waittime = deadline - core.now()
      if waittime <= 0 then break end
    end
    self:wait(waittime)
    result = predicate()
  end
  return result
end

-- ---- constructors (C; an options table works as Python's keywords) ---------

S.Lock = core.Lock
S.RLock = core.RLock
S.Event = core.Event
S.Semaphore = core.Semaphore
S.BoundedSemaphore = core.BoundedSemaphore
S.Condition = core.Condition
S.Barrier = core.Barrier

return S
