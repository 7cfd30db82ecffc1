-- multiprocessing.manager_types: the objects a manager serves (its
-- "referents"): dict, list, Namespace, Value, Array, Queue,
-- JoinableQueue, Lock, RLock, Semaphore, BoundedSemaphore, Event,
-- Condition, Barrier, and any other Lua object through its methods.
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

-- The server's kernel; set by manager_server.lua: park(C, timeout,
-- on_timeout) -> P, resolve(P, v), reject(P, err), hold(C, obj, n),
-- unhold(C, obj, n), call(fn, ...) (runs user code; errors propagate
-- with a traceback), rec_of(v) (the record when v is a managed object's).
local K
function T.set_kernel(k) K = k end

local types = {}   -- typeid -> metatable of the server-side objects
T.types = types

local function class(typeid)
  local mt = {__typeid = typeid}
  mt.__index = mt
  types[typeid] = mt
  return mt
end

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

-- ---- dict: an ordered map ----------------------------------------------

-- vals holds the data (a plain table: k -> v); order lists the keys in
-- insertion order (as Python's dict), holes left by deletions are
-- compacted once they outnumber the live keys.  pos: k -> index in order.
local Dict = class("dict")
local HOLE = setmetatable({}, {__name = "hole"})

local function dict_insert(self, k, v)
  local vals = self.vals
  if vals[k] == nil then
    local n = self.n + 1
    self.n = n
    self.order[n] = k
    self.pos[k] = n
  end
  vals[k] = v
end

local function dict_compact(self)
  local keys, pos, j = self.order, self.pos, 0
  for i = 1, self.n do
    local k = keys[i]
    if k ~= HOLE then
      j = j + 1
      keys[j] = k
      pos[k] = j
    end
  end
  for i = j + 1, self.n do keys[i] = nil end
  self.n, self.holes = j, 0
end

local function dict_delete(self, k)
  local v = self.vals[k]
  if v == nil then return nil end
  self.vals[k] = nil
  local i = self.pos[k]
  self.pos[k] = nil
  if i == self.n then
    self.order[i] = nil
    self.n = i - 1
  else
    self.order[i] = HOLE
    self.holes = self.holes + 1
    if self.holes > 16 and self.holes * 2 > self.n then dict_compact(self) end
  end
  return v
end

-- Serves t itself (a registered callable's plain table: changes made
-- through proxies are seen by the server's own code, as Python's).
function T.dict_of(t)
  local self = setmetatable({vals = t, order = {}, pos = {}, n = 0, holes = 0},
                            Dict)
  local ks = {}
  for k in next, t do ks[#ks + 1] = k end
  -- a deterministic start: sequence keys first, then the rest sorted
  table.sort(ks, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "boolean" then return (not a) and b end
    return a < b
  end)
  for i, k in ipairs(ks) do
    check_key(k)
    self.order[i], self.pos[k] = k, i
  end
  self.n = #ks
  return self
end

function T.new_dict(init)
  local self = setmetatable({vals = {}, order = {}, pos = {}, n = 0, holes = 0},
                            Dict)
  if init ~= nil then Dict.update(self, nil, init) end
  return self
end

function Dict:get(_, k, default)
  local v = self.vals[k]
  if v == nil then return default end
  return v
end
Dict.__get = Dict.get

function Dict:set(_, k, v)
  k = check_key(k)
  if v == nil then dict_delete(self, k) else dict_insert(self, k, v) end
end

function Dict:del(_, k)
  dict_delete(self, check_key(k))
end

function Dict:pop(_, k, default)
  local v = dict_delete(self, check_key(k))
  if v == nil then return default end
  return v
end

-- popitem() -> {k, v} of the last inserted key (nil when empty)
function Dict:popitem()
  for i = self.n, 1, -1 do
    local k = self.order[i]
    if k ~= HOLE then return {k, dict_delete(self, k)} end
  end
  return nil
end

function Dict:setdefault(_, k, default)
  k = check_key(k)
  local v = self.vals[k]
  if v == nil and default ~= nil then
    dict_insert(self, k, default)
    return default
  end
  return v
end

-- update(t): t a table (its pairs; a sequence's 1..n in order) or another
-- managed dict.
function Dict:update(_, t)
  local rec = K.rec_of(t)
  if rec then
    local other = rec.obj
    if getmetatable(other) ~= Dict then
      raise("ValueError", "update: expected a table or a managed dict, got " ..
            "a managed " .. rec.typeid)
    end
    for i = 1, other.n do
      local k = other.order[i]
      if k ~= HOLE then dict_insert(self, k, other.vals[k]) end
    end
    return
  end
  if type(t) ~= "table" then
    raise("ValueError", "update: expected a table, got " .. type(t))
  end
  local n = #t
  for i = 1, n do dict_insert(self, i, t[i]) end
  for k, v in next, t do
    if not (mtype(k) == "integer" and k >= 1 and k <= n) then
      dict_insert(self, check_key(k), v)
    end
  end
end

function Dict:clear()
  self.vals, self.order, self.pos, self.n, self.holes = {}, {}, {}, 0, 0
end

function Dict:len() return self.n - self.holes end

function Dict:keys()
  local out, j, keys = {}, 0, self.order
  for i = 1, self.n do
    local k = keys[i]
    if k ~= HOLE then j = j + 1; out[j] = k end
  end
  return out
end

function Dict:values()
  local out, j, keys, vals = {}, 0, self.order, self.vals
  for i = 1, self.n do
    local k = keys[i]
    if k ~= HOLE then j = j + 1; out[j] = vals[k] end
  end
  return out
end

function Dict:items()
  local out, j, keys, vals = {}, 0, self.order, self.vals
  for i = 1, self.n do
    local k = keys[i]
    if k ~= HOLE then j = j + 1; out[j] = {k, vals[k]} end
  end
  return out
end

-- snapshot for pairs(): keys and values in two sequences
function Dict:snapshot()
  return {Dict.keys(self), Dict.values(self)}
end

function Dict:copy()
  local out = {}
  for k, v in next, self.vals do out[k] = v end
  return out
end

function Dict:apply(_, k, fn, ...)
  k = check_key(k)
  local new = K.call(fn, self.vals[k], ...)
  K.check_storable(new)
  if new == nil then dict_delete(self, k) else dict_insert(self, k, new) end
  return new
end

function Dict:__tostring()
  local parts = {}
  for i = 1, self.n do
    local k = self.order[i]
    if k ~= HOLE then
      parts[#parts + 1] = K.key_text(k) .. " = " .. K.show(self.vals[k])
    end
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- ---- list ----------------------------------------------------------------

-- items in a[1..n]; n is explicit because elements may be nil.
local List = class("list")

local function list_of(t)
  if t == nil then return setmetatable({a = {}, n = 0}, List) end
  if type(t) ~= "table" or K.rec_of(t) then
    raise("ValueError", "list: expected a sequence table, got " ..
          (type(t) == "table" and "a managed object" or type(t)))
  end
  local n = t.n
  if mtype(n) ~= "integer" or n < 0 then n = #t end
  local a = table.move(t, 1, n, 1, {})
  return setmetatable({a = a, n = n}, List)
end
T.new_list = list_of

-- 1-based index; negative counts from the end (-1: the last), as Python's.
local function norm_index(self, i, what)
  local j = mtype(i) == "integer" and i or (mtype(i) == "float" and math.tointeger(i))
  if not j then
    raise("ValueError", string.format("list index must be an integer, got %s",
          mtype(i) or type(i)))
  end
  if j < 0 then j = self.n + 1 + j end
  if what and (j < 1 or j > self.n) then
    raise("ValueError", what .. " index out of range")
  end
  return j
end

-- l[i]: nil outside 1..n, as a Lua table (ipairs stops there)
function List:get(_, i)
  local j = mtype(i) == "integer" and i or (mtype(i) == "float" and math.tointeger(i))
  if not j then return nil end
  if j < 0 then j = self.n + 1 + j end
  if j < 1 then return nil end
  return self.a[j]
end
List.__get = List.get

-- l[i] = v: 1..n replaces, n + 1 appends (as a Lua sequence grows)
function List:set(_, i, v)
  local j = norm_index(self, i)
  if j == self.n + 1 then
    self.n = j
  elseif j < 1 or j > self.n then
    raise("ValueError", "list assignment index out of range")
  end
  self.a[j] = v
end

function List:append(_, v)
  local n = self.n + 1
  self.n = n
  self.a[n] = v
end

function List:extend(_, t)
  local rec = K.rec_of(t)
  local src, m
  if rec then
    if getmetatable(rec.obj) ~= List then
      raise("ValueError", "extend: expected a table or a managed list, got " ..
            "a managed " .. rec.typeid)
    end
    src, m = rec.obj.a, rec.obj.n
  elseif type(t) == "table" then
    src, m = t, (mtype(t.n) == "integer" and t.n >= 0) and t.n or #t
  else
    raise("ValueError", "extend: expected a table, got " .. type(t))
  end
  table.move(src, 1, m, self.n + 1, self.a)
  self.n = self.n + m
end

-- insert(i, v): before position i; beyond either end clamps, as Python's
function List:insert(_, i, v)
  local n = self.n
  local j = norm_index(self, i)
  if j < 1 then j = 1 elseif j > n + 1 then j = n + 1 end
  local a = self.a
  table.move(a, j, n, j + 1)
  a[j] = v
  self.n = n + 1
end

function List:pop(_, i)
  local n = self.n
  if n == 0 then raise("ValueError", "pop from empty list") end
  local j = i == nil and n or norm_index(self, i, "pop")
  local a = self.a
  local v = a[j]
  table.move(a, j + 1, n, j)
  a[n] = nil
  self.n = n - 1
  return v
end

local function find(self, v, from, to)
  local a = self.a
  for i = from or 1, to or self.n do
    if equal(a[i], v) then return i end
  end
  return nil
end

function List:remove(_, v)
  local i = find(self, v)
  if not i then raise("ValueError", "list.remove(x): x not in list") end
  List.pop(self, nil, i)
end

-- index(v [, start [, stop]]) -> 1-based position; ValueError when absent
function List:index(_, v, start, stop)
  local from = start and math.max(norm_index(self, start), 1) or 1
  local to = stop and math.min(norm_index(self, stop), self.n) or self.n
  local i = find(self, v, from, to)
  if not i then raise("ValueError", "list.index(x): x not in list") end
  return i
end

function List:count(_, v)
  local c, a = 0, self.a
  for i = 1, self.n do
    if equal(a[i], v) then c = c + 1 end
  end
  return c
end

-- sort([lt]) / sort{key = f, reverse = bool}: stable (table.sort is not,
-- so positions break ties)
function List:sort(_, how)
  local key, lt, reverse
  if type(how) == "function" then
    lt = how
  elseif type(how) == "table" and not K.rec_of(how) then
    key, lt, reverse = how.key, how.lt, how.reverse
  elseif how ~= nil then
    raise("ValueError", "sort: expected a function or {key=, reverse=}, got " ..
          type(how))
  end
  local n, a = self.n, self.a
  local idx, keys = {}, {}
  for i = 1, n do
    idx[i] = i
    keys[i] = key and K.call(key, a[i]) or a[i]
  end
  local less = lt or function(x, y) return x < y end
  local ok, err = pcall(table.sort, idx, function(i, j)
    local x, y = keys[i], keys[j]
    if reverse then x, y = y, x end
    if less(x, y) then return true end
    if less(y, x) then return false end
    return i < j
  end)
  if not ok then
    if type(err) == "string" and err:find("invalid order function") then
      raise("ValueError", "sort: invalid order function")
    end
    error(err, 0)
  end
  local sorted = {}
  for i = 1, n do sorted[i] = a[idx[i]] end
  self.a = sorted
end

function List:reverse()
  local a, n = self.a, self.n
  for i = 1, n // 2 do a[i], a[n + 1 - i] = a[n + 1 - i], a[i] end
end

function List:clear() self.a, self.n = {}, 0 end
function List:len() return self.n end

function List:copy()
  return table.move(self.a, 1, self.n, 1, {})
end

-- for pairs(): the elements and their count
function List:snapshot()
  return {table.move(self.a, 1, self.n, 1, {}), self.n}
end

function List:apply(_, i, fn, ...)
  local j = norm_index(self, i, "apply")
  local new = K.call(fn, self.a[j], ...)
  K.check_storable(new)
  self.a[j] = new
  return new
end

function List:__tostring()
  local parts = {}
  for i = 1, self.n do parts[i] = K.show(self.a[i]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- ---- Namespace --------------------------------------------------------------

local Namespace = class("Namespace")

function T.new_namespace(init)
  local self = setmetatable({vals = {}}, Namespace)
  if init ~= nil then
    if type(init) ~= "table" then
      raise("ValueError", "Namespace: expected a table of fields, got " ..
            type(init))
    end
    for k, v in next, init do Namespace.set(self, nil, k, v) end
  end
  return self
end

local function check_field(k)
  if type(k) ~= "string" then
    raise("ValueError", "Namespace fields are strings, got " .. type(k))
  end
  return k
end

function Namespace:get(_, k) return self.vals[check_field(k)] end
Namespace.__get = Namespace.get
function Namespace:set(_, k, v) self.vals[check_field(k)] = v end
function Namespace:del(_, k) self.vals[check_field(k)] = nil end
function Namespace:copy()
  local out = {}
  for k, v in next, self.vals do out[k] = v end
  return out
end
function Namespace:snapshot()
  local ks, vs = {}, {}
  for k in next, self.vals do ks[#ks + 1] = k end
  table.sort(ks)
  for i, k in ipairs(ks) do vs[i] = self.vals[k] end
  return {ks, vs}
end
function Namespace:apply(_, k, fn, ...)
  check_field(k)
  local new = K.call(fn, self.vals[k], ...)
  K.check_storable(new)
  self.vals[k] = new
  return new
end
function Namespace:__tostring()
  local s = Namespace.snapshot(self)
  local parts = {}
  for i, k in ipairs(s[1]) do parts[i] = k .. "=" .. K.show(s[2][i]) end
  return "Namespace(" .. table.concat(parts, ", ") .. ")"
end

-- ---- Value and Array ---------------------------------------------------

-- Typecodes as Python's array module; integers are range-checked, floats
-- stored as floats, 'c' is a one-byte string.
local int_ranges = {
  b = {-128, 127}, B = {0, 255}, h = {-32768, 32767}, H = {0, 65535},
  i = {-2147483648, 2147483647}, I = {0, 4294967295},
  l = {math.mininteger, math.maxinteger}, L = {0, math.maxinteger},
  q = {math.mininteger, math.maxinteger}, Q = {0, math.maxinteger},
}

local function check_typecode(tc)
  if type(tc) ~= "string" or not (int_ranges[tc] or tc == "f" or tc == "d" or
                                  tc == "c") then
    raise("ValueError", "bad typecode " .. tostring(tc) ..
          " (must be b, B, h, H, i, I, l, L, q, Q, f, d or c)")
  end
  return tc
end

local function coerce(tc, v)
  local r = int_ranges[tc]
  if r then
    local i = mtype(v) == "integer" and v or (mtype(v) == "float" and math.tointeger(v))
    if not i then
      raise("ValueError", string.format("typecode '%s' holds integers, got %s",
            tc, mtype(v) or type(v)))
    end
    if i < r[1] or i > r[2] then
      raise("ValueError", string.format("%d out of range for typecode '%s'", i, tc))
    end
    return i
  elseif tc == "c" then
    if type(v) ~= "string" or #v ~= 1 then
      raise("ValueError", "typecode 'c' holds one-byte strings")
    end
    return v
  end
  if type(v) ~= "number" then
    raise("ValueError", string.format("typecode '%s' holds numbers, got %s",
          tc, type(v)))
  end
  return v + 0.0
end

local Value = class("Value")

function T.new_value(tc, v)
  check_typecode(tc)
  if v == nil then v = tc == "c" and "\0" or 0 end
  return setmetatable({tc = tc, v = coerce(tc, v)}, Value)
end

function Value:get() return self.v end
Value.__get = function(self, _, k)
  if k == "value" then return self.v end
  if k == "typecode" then return self.tc end
end
function Value:set(_, v) self.v = coerce(self.tc, v) end
function Value:apply(_, fn, ...)
  local new = coerce(self.tc, K.call(fn, self.v, ...))
  self.v = new
  return new
end
function Value:__tostring()
  return string.format("Value('%s', %s)", self.tc, K.show(self.v))
end

local Array = class("Array")

-- The largest Array the server can hold: a slot costs 16 bytes in a Lua
-- table, and a table's array holds fewer than 2^31.  A bigger one is
-- refused at once (checked by the client before asking, and here): the
-- server would otherwise fill memory slot by slot, serving no one, and
-- fail without a usable message.
local max_array
function T.max_array_size()
  if max_array == nil then
    local total
    local f = io.open("/proc/meminfo", "r")
    if f then
      local kb = f:read("a"):match("MemTotal:%s*(%d+)")
      f:close()
      total = kb and tonumber(kb) * 1024
    end
    max_array = math.min(total and total // 16 or 0x7fffffff, 0x7fffffff)
  end
  return max_array
end

-- Raises ValueError for a size the server cannot honour.
function T.check_array_size(n, where)
  local max = T.max_array_size()
  if n > max then
    raise("ValueError", string.format("%s: size %d is too large (at most " ..
          "%d elements fit this machine's memory)", where, n, max))
  end
end

function T.new_array(tc, init)
  check_typecode(tc)
  local a, n = {}, nil
  if type(init) == "number" then
    n = int_arg(init, "Array size", 0)
    T.check_array_size(n, "Array")
    local zero = coerce(tc, tc == "c" and "\0" or 0)
    for i = 1, n do a[i] = zero end
  elseif type(init) == "table" and not K.rec_of(init) then
    n = #init
    for i = 1, n do a[i] = coerce(tc, init[i]) end
  else
    raise("ValueError", "Array: expected a size or a sequence, got " ..
          type(init))
  end
  return setmetatable({tc = tc, a = a, n = n}, Array)
end

local function array_index(self, i)
  local j = mtype(i) == "integer" and i or (mtype(i) == "float" and math.tointeger(i))
  if not j or j < 1 or j > self.n then
    raise("ValueError", string.format("Array index %s out of range 1..%d",
          tostring(i), self.n))
  end
  return j
end

function Array:get(_, i)
  -- ipairs reads one past the end: nil there, as a table
  if mtype(i) == "integer" and i == self.n + 1 then return nil end
  return self.a[array_index(self, i)]
end
Array.__get = Array.get
function Array:set(_, i, v) self.a[array_index(self, i)] = coerce(self.tc, v) end
function Array:len() return self.n end
function Array:copy() return table.move(self.a, 1, self.n, 1, {}) end
function Array:snapshot() return {Array.copy(self), self.n} end
function Array:apply(_, i, fn, ...)
  local j = array_index(self, i)
  local new = coerce(self.tc, K.call(fn, self.a[j], ...))
  self.a[j] = new
  return new
end
function Array:__tostring()
  local parts = {}
  for i = 1, self.n do parts[i] = K.show(self.a[i]) end
  return string.format("Array('%s', {%s})", self.tc, table.concat(parts, ", "))
end

-- ---- waiter lists ---------------------------------------------------------

-- FIFO of parked requests (or records holding one in .P); entries whose
-- request is done (answered, timed out, or its client died) are skipped.
local function wq_push(q, w) q[#q + 1] = w end

local function wq_pop(q)
  while q[1] ~= nil do
    local w = table.remove(q, 1)
    local P = w.P or w
    if not P.done then return w end
  end
  return nil
end

local function wq_live(q)
  local n = 0
  for _, w in ipairs(q) do
    if not (w.P or w).done then n = n + 1 end
  end
  return n
end

-- ---- Queue and JoinableQueue ---------------------------------------------

local Queue = class("Queue")
local JoinableQueue = class("JoinableQueue")
setmetatable(JoinableQueue, {__index = Queue})

function T.new_queue(maxsize, joinable)
  if type(maxsize) == "table" then maxsize = maxsize.maxsize end
  maxsize = maxsize == nil and 0 or int_arg(maxsize, "maxsize")
  return setmetatable({items = {}, head = 1, tail = 0, maxsize = maxsize,
                       getters = {}, putters = {}, unfinished = 0,
                       joiners = {}},
                      joinable and JoinableQueue or Queue)
end

local function q_size(self) return self.tail - self.head + 1 end
local function q_full(self)
  return self.maxsize > 0 and q_size(self) >= self.maxsize
end

local function q_push(self, v)
  local t = self.tail + 1
  self.tail = t
  self.items[t] = v
  self.unfinished = self.unfinished + 1
end

local function q_take(self)
  local h = self.head
  local v = self.items[h]
  self.items[h] = nil
  self.head = h + 1
  return v
end

-- Hands items to parked getters and space to parked putters until
-- neither can proceed.
local function q_settle(self)
  while true do
    local moved = false
    if q_size(self) > 0 and self.getters[1] then
      local P = wq_pop(self.getters)
      if P then
        K.resolve(P, q_take(self))
        moved = true
      end
    end
    if not q_full(self) and self.putters[1] then
      local w = wq_pop(self.putters)
      if w then
        q_push(self, w.v)
        K.resolve(w.P, nil)
        moved = true
      end
    end
    if not moved then return end
  end
end

function Queue:put(C, v, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 3)
  if not q_full(self) then
    q_push(self, v)
    q_settle(self)
    return nil
  end
  if not block or timeout == 0 then raise("Full", "the queue is full") end
  local P = K.park(C, timeout, function(P)
    K.reject(P, core.new_error("Full", "the queue is full"))
  end)
  wq_push(self.putters, {P = P, v = v})
  return PARKED
end

function Queue:put_nowait(C, v) return Queue.put(self, C, v, false) end

function Queue:get(C, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 2)
  if q_size(self) > 0 then
    local v = q_take(self)
    q_settle(self)
    return v
  end
  if not block or timeout == 0 then raise("Empty", "the queue is empty") end
  local P = K.park(C, timeout, function(P)
    K.reject(P, core.new_error("Empty", "the queue is empty"))
  end)
  wq_push(self.getters, P)
  return PARKED
end

function Queue:get_nowait(C) return Queue.get(self, C, false) end
function Queue:qsize() return q_size(self) end
function Queue:empty() return q_size(self) == 0 end
function Queue:full() return q_full(self) end
function Queue:__tostring()
  return string.format("<Queue size=%d maxsize=%d>", q_size(self), self.maxsize)
end

function JoinableQueue:task_done()
  if self.unfinished <= 0 then
    raise("ValueError", "task_done() called too many times")
  end
  self.unfinished = self.unfinished - 1
  if self.unfinished == 0 then
    local P = wq_pop(self.joiners)
    while P do
      K.resolve(P, nil)
      P = wq_pop(self.joiners)
    end
  end
end

function JoinableQueue:join(C)
  if self.unfinished == 0 then return nil end
  wq_push(self.joiners, K.park(C, nil))
  return PARKED
end

-- A plain Queue counts unfinished tasks too (it costs nothing), but has
-- no task_done/join, as Python's queue.Queue proxy.
Queue.task_done, Queue.join = nil, nil

-- ---- Lock and RLock ----------------------------------------------------

-- owner: the client that holds it (nil when free); count: recursion
-- depth (RLock) or 1.  waiters: {C, n, grant(C)} in arrival order; grant
-- answers the parked request (or, for Condition.wait, goes on).
local Lock = class("Lock")
local RLock = class("RLock")

function T.new_lock(recursive)
  return setmetatable({owner = nil, count = 0, waiters = {}},
                      recursive and RLock or Lock)
end

local function lock_take(self, C, n)
  self.owner, self.count = C, n
  K.hold(C, self, n)
end

-- Passes a free lock to the next live waiter.
local function lock_handoff(self)
  while self.owner == nil do
    local w = wq_pop(self.waiters)
    if not w then return end
    lock_take(self, w.C, w.n)
    w.grant(w)
  end
end

local function lock_free(self)
  local C, n = self.owner, self.count
  self.owner, self.count = nil, 0
  if C then K.unhold(C, self, n) end
  lock_handoff(self)
end

-- Acquires for C with count n, calling grant(w) once held (now or later).
-- Returns true when held at once.
local function lock_acquire_for(self, C, n, P, grant)
  if self.owner == nil then
    lock_take(self, C, n)
    return true
  end
  wq_push(self.waiters, {C = C, n = n, P = P, grant = grant})
  return false
end

local function acquire(self, C, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 2)
  if getmetatable(self) == RLock and self.owner == C then
    self.count = self.count + 1
    K.hold(C, self, 1)
    return true
  end
  if self.owner == nil then
    lock_take(self, C, 1)
    return true
  end
  if not block or timeout == 0 then return false end
  local P = K.park(C, timeout, function(P) K.resolve(P, false) end)
  lock_acquire_for(self, C, 1, P, function(w) K.resolve(w.P, true) end)
  return PARKED
end

Lock.acquire, RLock.acquire = acquire, acquire

function Lock:release()
  -- as Python's Lock: any process may release it
  if self.owner == nil then raise("ValueError", "release unlocked lock") end
  lock_free(self)
end

function RLock:release(C)
  if self.owner ~= C then
    raise("ValueError", "cannot release un-acquired lock")
  end
  if self.count > 1 then
    self.count = self.count - 1
    K.unhold(C, self, 1)
  else
    lock_free(self)
  end
end

function Lock:locked() return self.owner ~= nil end
RLock.locked = Lock.locked
function Lock:__tostring()
  return "<Lock " .. (self.owner and "locked" or "unlocked") .. ">"
end
function RLock:__tostring()
  return string.format("<RLock %s count=%d>",
    self.owner and "owned" or "unowned", self.count)
end

-- ---- Semaphore and BoundedSemaphore ---------------------------------------

local Semaphore = class("Semaphore")
local BoundedSemaphore = class("BoundedSemaphore")
setmetatable(BoundedSemaphore, {__index = Semaphore})

function T.new_semaphore(value, bounded)
  value = value == nil and 1 or int_arg(value, "semaphore initial value", 0)
  return setmetatable({value = value, initial = value, waiters = {}},
                      bounded and BoundedSemaphore or Semaphore)
end

function Semaphore:acquire(C, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 2)
  if self.value > 0 then
    self.value = self.value - 1
    K.hold(C, self, 1)
    return true
  end
  if not block or timeout == 0 then return false end
  local P = K.park(C, timeout, function(P) K.resolve(P, false) end)
  wq_push(self.waiters, P)
  return PARKED
end

local function sem_settle(self)
  while self.value > 0 do
    local P = wq_pop(self.waiters)
    if not P then return end
    self.value = self.value - 1
    K.hold(P.C, self, 1)
    K.resolve(P, true)
  end
end

-- release([n]); a release by a client that holds none of it is allowed
-- (as Python's), it only cannot be undone when the client dies
function Semaphore:release(C, n)
  n = n == nil and 1 or int_arg(n, "n", 1)
  if getmetatable(self) == BoundedSemaphore and self.value + n > self.initial then
    raise("ValueError", "semaphore or lock released too many times")
  end
  self.value = self.value + n
  K.unhold(C, self, n)
  sem_settle(self)
end

function Semaphore:get_value() return self.value end
function Semaphore:__tostring()
  return string.format("<%s value=%d>", getmetatable(self).__typeid, self.value)
end

-- ---- releasing what a dead client held -------------------------------------

-- Called by the server for each lock-like object a vanished client held
-- (n: what it still held).
function T.release_dead(obj, C, n)
  local mt = getmetatable(obj)
  if mt == Lock or mt == RLock then
    if obj.owner == C then
      obj.owner, obj.count = nil, 0
      lock_handoff(obj)
    end
  elseif mt == types.Barrier then
    obj:_release_dead(C)
  elseif mt == Semaphore or mt == BoundedSemaphore then
    obj.value = obj.value + n
    if mt == BoundedSemaphore and obj.value > obj.initial then
      obj.value = obj.initial
    end
    sem_settle(obj)
  end
end

-- ---- Event --------------------------------------------------------------

local Event = class("Event")

function T.new_event() return setmetatable({flag = false, waiters = {}}, Event) end

function Event:set()
  self.flag = true
  local P = wq_pop(self.waiters)
  while P do
    K.resolve(P, true)
    P = wq_pop(self.waiters)
  end
end
function Event:clear() self.flag = false end
function Event:is_set() return self.flag end
function Event:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  if self.flag then return true end
  if timeout == 0 then return false end
  wq_push(self.waiters, K.park(C, timeout, function(P) K.resolve(P, false) end))
  return PARKED
end
function Event:__tostring()
  return "<Event " .. (self.flag and "set" or "unset") .. ">"
end

-- ---- Condition -------------------------------------------------------------

-- lock: a managed Lock or RLock object (its own RLock when none is
-- given).  wait releases it completely, parks, and on notify or timeout
-- re-acquires it (with the same recursion count) before answering.
local Condition = class("Condition")

function T.new_condition(lockrec)
  local lock
  if lockrec == nil then
    lock = T.new_lock(true)
  else
    local rec = K.rec_of(lockrec)
    local mt = rec and getmetatable(rec.obj)
    if mt ~= Lock and mt ~= RLock then
      raise("ValueError", "Condition: the lock must be a managed Lock or RLock")
    end
    lock = rec.obj
  end
  return setmetatable({lock = lock, waiters = {}}, Condition)
end

function Condition:acquire(C, block, timeout)
  return acquire(self.lock, C, block, timeout)
end
function Condition:release(C)
  return getmetatable(self.lock).release(self.lock, C)
end

local function check_owned(self, C, what)
  if self.lock.owner ~= C then
    raise("ValueError", "cannot " .. what .. " on un-acquired lock")
  end
end

function Condition:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  check_owned(self, C, "wait")
  local lock, count = self.lock, self.lock.count
  local w = {C = C, n = count}
  local function reacquire(result)
    -- back into the lock's queue; answered once held again
    w.result = result
    if lock_acquire_for(lock, C, count, w.P, function() K.resolve(w.P, result) end) then
      K.resolve(w.P, result)
    end
  end
  w.notify = function() reacquire(true) end
  w.P = K.park(C, timeout, function() w.notified = true; reacquire(false) end)
  -- a timed-out request stays parked until the lock is back
  w.P.keep_on_timeout = true
  wq_push(self.waiters, w)
  lock_free(lock)
  return PARKED
end

local function notify(self, C, n)
  check_owned(self, C, "notify")
  local q = self.waiters
  while n > 0 and q[1] do
    local w = table.remove(q, 1)
    if not w.P.done and not w.notified then
      w.notified = true
      K.unpark_timer(w.P)
      w.notify()
      n = n - 1
    end
  end
end

function Condition:notify(C, n)
  return notify(self, C, n == nil and 1 or int_arg(n, "n", 0))
end
function Condition:notify_all(C) return notify(self, C, huge) end
function Condition:__tostring()
  return string.format("<Condition waiters=%d>", wq_live(self.waiters))
end

-- ---- Barrier ----------------------------------------------------------------

-- count: parties arrived in this round; waiting: their parked requests.
-- A waiter timing out, an abort, a reset, a failing action or a waiting
-- client that dies breaks it: every waiter gets BrokenBarrierError (a
-- party that will never come must not hang the others).
local Barrier = class("Barrier")

function T.new_barrier(parties, action, timeout)
  if type(parties) == "table" and not K.rec_of(parties) then
    parties, action, timeout = parties.parties, parties.action, parties.timeout
  end
  parties = int_arg(parties, "parties", 1)
  if action ~= nil and type(action) ~= "function" then
    raise("ValueError", "Barrier: action must be a function")
  end
  return setmetatable({parties = parties, action = action,
                       timeout = timeout_arg(timeout, 3), count = 0,
                       waiting = {}, broken = false}, Barrier)
end

local function broken_error()
  return core.new_error("BrokenBarrierError", "the barrier is broken")
end

local function barrier_break(self)
  self.broken = true
  self.acting = nil
  local waiting = self.waiting
  self.waiting, self.count = {}, 0
  for _, P in ipairs(waiting) do
    if not P.done then K.reject(P, broken_error()) end
  end
end

local function barrier_release(self)
  local waiting = self.waiting
  self.waiting, self.count = {}, 0
  for _, P in ipairs(waiting) do
    if not P.done then K.resolve(P, P.index) end
  end
end

-- The completing process ran the action: ok releases the round, a
-- failure breaks the barrier.
function Barrier:finish_action(C, ok)
  if self.acting ~= C then error(broken_error(), 0) end
  self.acting = nil
  K.unhold(C, self, 1)
  if not ok then
    barrier_break(self)
    return false
  end
  barrier_release(self)
  return true
end

-- (T.release_dead: a process that died running the action)
function Barrier:_release_dead(C)
  if self.acting == C then barrier_break(self) end
end

function Barrier:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  if timeout == nil then timeout = self.timeout end
  if self.broken then error(broken_error(), 0) end
  if self.acting then error(broken_error(), 0) end
  local index = self.count + 1
  if index == self.parties then
    if self.action then
      -- The action runs in the process whose wait completed the round
      -- (as CPython runs it in one of the waiting threads): there the
      -- proxies it captured are proxies, here they would be the bare
      -- objects.  The others stay parked until that process reports
      -- (finish_action); its death breaks the barrier.
      self.acting = C
      K.hold(C, self, 1)
      return {"run action", self.action, index}
    end
    barrier_release(self)
    return index
  end
  self.count = index
  local P = K.park(C, timeout, function(P)
    K.reject(P, broken_error())
    barrier_break(self)
  end)
  P.index = index
  P.on_drop = function() if not self.broken then barrier_break(self) end end
  self.waiting[#self.waiting + 1] = P
  return PARKED
end

function Barrier:reset()
  if self.count > 0 then barrier_break(self) end
  self.broken = false
end

function Barrier:abort() barrier_break(self) end

Barrier.__get = function(self, _, k)
  if k == "parties" then return self.parties end
  if k == "n_waiting" then return self.count end
  if k == "broken" then return self.broken end
end

function Barrier:__tostring()
  return string.format("<Barrier parties=%d waiting=%d%s>", self.parties,
                       self.count, self.broken and " broken" or "")
end

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
