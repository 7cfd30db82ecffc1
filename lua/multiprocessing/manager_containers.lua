-- multiprocessing.manager_containers: the containers a manager serves --
-- dict (an ordered map), list, Namespace, Value and Array -- as the
-- server holds them (see manager_types.lua for the conventions).
local core = require "multiprocessing.core"
local T = require "multiprocessing.manager_types"

local raise = core.raise
local pack, unpack = table.pack, table.unpack
local mtype, huge = math.type, math.huge
local K, types, PARKED = T.kernel, T.types, T.PARKED
local check_key, equal, timeout_arg, int_arg = T.check_key, T.equal,
  T.timeout_arg, T.int_arg

-- (each built-in type's metatable, registered under its typeid)
local function class(typeid)
  local mt = {__typeid = typeid}
  mt.__index = mt
  types[typeid] = mt
  return mt
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

return T
