-- multiprocessing.manager_types: the model of the objects a manager
-- serves (its "referents"): their class registry, the server's kernel
-- they call, the argument checks they share, and any other Lua object
-- served through its methods.  The built-in types live beside it:
-- manager_containers.lua (dict, list, Namespace, Value, Array) and
-- manager_waiting.lua (Queue, JoinableQueue, Lock, RLock, Semaphore,
-- BoundedSemaphore, Event, Condition, Barrier), each returning this
-- module's table with its types added.
--
-- These run only inside the manager's server process (one Lua state, no
-- threads), so no method ever needs a lock: each runs to completion
-- between two messages.  A method that would block (Queue.get on an empty
-- queue, Lock.acquire on a held lock...) must not stop the event loop:
-- it parks the request with K.park and returns PARKED; whatever later
-- makes it proceed answers it with K.resolve / K.reject, and the loop's
-- timer answers it when its timeout passes.
--
-- Every method is called as method(obj, C, ...): C is the client (one
-- connection, i.e. one process) on whose behalf it runs.  Lock-like
-- objects record what each client holds (K.hold/K.unhold) so that a client
-- that dies has its locks released (see T.release_dead).
--
-- Values are stored as they arrive (plain Lua values); a managed object
-- stored inside another (a list in a dict) is stored as its server record,
-- which travels back to clients as a proxy (see manager_server.lua).
local core = require "multiprocessing.core"

local raise = core.raise
local pack, unpack = table.pack, table.unpack
local mtype, huge = math.type, math.huge

local T = {}
local PARKED = setmetatable({}, {__name = "multiprocessing.PARKED"})
T.PARKED = PARKED

-- The server's kernel, filled in by manager_server.lua: park(C, timeout,
-- on_timeout) -> P, resolve(P, v), reject(P, err), hold(C, obj, n),
-- unhold(C, obj, n), call(fn, ...) (runs user code; errors propagate
-- with a traceback), rec_of(v) (the record when v is a managed object's).
local K = {}
T.kernel = K

local types = {}   -- typeid -> metatable of the server-side objects
T.types = types

-- ---- helpers -----------------------------------------------------------

-- Keys a dict accepts.  Tables arrive as fresh copies (identity does not
-- cross processes), so they could never be found again: refused.
local function check_key(k)
  local t = type(k)
  if t == "string" or t == "boolean" then return k end
  if t == "number" then
    if k ~= k then raise("ValueError", "dict key is NaN") end
    -- as a Lua table: 2.0 and 2 are the same key
    if mtype(k) == "float" then return math.tointeger(k) or k end
    return k
  end
  raise("ValueError", "dict keys must be strings, numbers or booleans, got " ..
        (t == "table" and K.rec_of(k) and "a managed object" or t))
end
T.check_key = check_key

-- Value equality for list.index/remove/count: plain tables compare by
-- contents (they are always copies here), managed objects by identity.
local function equal(a, b, depth)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  if getmetatable(a) or getmetatable(b) then return false end
  depth = (depth or 0) + 1
  if depth > 100 then return false end
  for k, v in next, a do
    if not equal(v, rawget(b, k), depth) then return false end
  end
  for k in next, b do
    if rawget(a, k) == nil then return false end
  end
  return true
end

-- Timeouts as the contract: nil waits forever, negative counts as 0.
local function timeout_arg(t, argn)
  if t == nil then return nil end
  if type(t) ~= "number" then
    raise("ValueError", string.format("timeout (argument #%d) must be a " ..
          "number, got %s", argn, type(t)))
  end
  if t ~= t then raise("ValueError", "timeout is NaN") end
  return t < 0 and 0 or t
end

local function int_arg(v, name, min)
  local i = mtype(v) == "integer" and v or (mtype(v) == "float" and math.tointeger(v))
  if not i then
    raise("ValueError", string.format("%s must be an integer, got %s", name,
          mtype(v) or type(v)))
  end
  if min and i < min then
    raise("ValueError", string.format("%s must be >= %d", name, min))
  end
  return i
end
T.equal, T.timeout_arg, T.int_arg = equal, timeout_arg, int_arg

-- ---- any other object ------------------------------------------------------

-- A table with methods (a registered callable's own object): its methods
-- (functions reachable through its metatable's __index table, and its own
-- function fields), except names starting with "_".
local Auto = {__typeid = "auto"}
types.auto = Auto

function T.exposed(obj)
  local names, seen = {}, {}
  local function scan(t, depth)
    if depth > 8 then return end
    if type(t) == "table" then
      for k, v in next, t do
        if type(k) == "string" and type(v) == "function" and not seen[k] and
           k:sub(1, 1) ~= "_" then
          seen[k] = true
          names[#names + 1] = k
        end
      end
    end
    -- (a userdata's methods are in its metatable's __index)
    local mt = getmetatable(t)
    if type(mt) == "table" then scan(rawget(mt, "__index"), depth + 1) end
  end
  scan(obj, 0)
  table.sort(names)
  return names
end

-- call_method(name, ...) -> all results, packed
function T.call_method(obj, name, ...)
  local f = type(name) == "string" and name:sub(1, 1) ~= "_" and obj[name]
  if type(f) ~= "function" then
    local mt = getmetatable(f)
    if not (mt and mt.__call) then
      raise("RemoteError", string.format("'%s' object has no method '%s'",
            K.typename(obj), tostring(name)))
    end
  end
  return pack(K.call(f, obj, ...))
end

T.equal, T.unpack = equal, unpack

return T
