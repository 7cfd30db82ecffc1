-- multiprocessing.manager_set: the set a manager serves (Python 3.14's
-- SyncManager.set), as the server holds it (see manager_types.lua for the
-- conventions; the proxy is in manager_extra_proxies.lua).
--
-- Membership is by value, as Python's set, translated to what crosses
-- processes: every member arrives in the server as a fresh copy, so Lua's
-- identity cannot be the test.  A member's key is a canonical text:
--   * strings, booleans and numbers by value; a float with an integer
--     value is that integer (2.0 and 2 are one member, as Python's and as
--     Lua table keys); NaN is refused (it equals nothing);
--   * a plain table by contents, recursively (the same keys with equal
--     values; key order does not matter), so {1, 2} added twice is one
--     member; a cycle or a table nested deeper than MAX_DEPTH is refused;
--   * a managed object (a proxy) by identity: two proxies of the same
--     object are one member, two objects with equal contents are two;
--   * anything else (functions, the runtime's handles, Ext values...) is
--     refused: ValueError.  (A table with a metatable arrives as its
--     contents: the codec drops the metatable.)
-- Members keep the insertion order (pairs and copy list them in it).
local core = require "multiprocessing.core"
local T = require "multiprocessing.manager_types"

local raise = core.raise
local mtype = math.type
local K, types = T.kernel, T.types

local MAX_DEPTH = 32

local Set = {__typeid = "set"}
Set.__index = Set
types.set = Set

local canon

local function canon_table(t, depth)
  if depth > MAX_DEPTH then
    raise("ValueError", "set member nested deeper than " .. MAX_DEPTH ..
          " tables (or a cycle)")
  end
  local parts = {}
  for k, v in next, t do
    parts[#parts + 1] = canon(k, depth + 1) .. "=" .. canon(v, depth + 1)
  end
  table.sort(parts)
  return "{" .. table.concat(parts, ",") .. "}"
end

-- The canonical text of v (see the top); raises ValueError for what
-- cannot be a member.
function canon(v, depth)
  local t = type(v)
  if t == "string" then return "s" .. #v .. ":" .. v end
  if t == "boolean" then return v and "T" or "F" end
  if t == "number" then
    if v ~= v then raise("ValueError", "a set member cannot be NaN") end
    local i = mtype(v) == "integer" and v or math.tointeger(v)
    if i then return "i" .. i end
    return "f" .. string.format("%.17g", v)
  end
  if t == "table" then
    local rec = K.rec_of(v)
    if rec then return "r" .. rec.id end
    if getmetatable(v) == nil then return canon_table(v, depth or 0) end
  end
  raise("ValueError", "a set member must be a string, number, boolean, " ..
        "plain table or managed object, got " .. K.typename(v))
end

function T.new_set(init)
  local self = setmetatable({members = {}, order = {}, n = 0, count = 0}, Set)
  if init ~= nil then Set.update(self, nil, init) end
  return self
end

-- members: key -> {v, i}; order[i] = key or false (a removed member's
-- slot, compacted once they outnumber the live ones)
local function compact(self)
  local order, j = self.order, 0
  for i = 1, self.n do
    local k = order[i]
    if k then
      j = j + 1
      order[j] = k
      self.members[k][2] = j
    end
  end
  for i = j + 1, self.n do order[i] = nil end
  self.n = j
end

local function add(self, v)
  local k = canon(v)
  if self.members[k] then return end
  local n = self.n + 1
  self.n, self.count = n, self.count + 1
  self.order[n] = k
  self.members[k] = {v, n}
end

local function remove(self, v)
  local k = canon(v)
  local m = self.members[k]
  if not m then return false end
  self.members[k] = nil
  self.order[m[2]] = false
  self.count = self.count - 1
  if self.n > 16 and self.count * 2 < self.n then compact(self) end
  return true
end

function Set:add(_, v) add(self, v) end
function Set:discard(_, v) remove(self, v) end

function Set:remove(_, v)
  if not remove(self, v) then
    raise("KeyError", "set.remove: " .. K.show(v) .. " is not a member")
  end
end

function Set:has(_, v) return self.members[canon(v)] ~= nil end
function Set:len() return self.count end

-- update(seq | managed set): adds every item of a sequence, or the
-- members of another managed set
function Set:update(_, t)
  local rec = K.rec_of(t)
  if rec then
    if getmetatable(rec.obj) ~= Set then
      raise("ValueError", "update: expected a sequence or a managed set, " ..
            "got a managed " .. rec.typeid)
    end
    for _, v in ipairs(Set.copy(rec.obj)) do add(self, v) end
    return
  end
  if type(t) ~= "table" then
    raise("ValueError", "update: expected a sequence or a managed set, got " ..
          type(t))
  end
  for i = 1, t.n or #t do
    if t[i] == nil then
      raise("ValueError", "a set member must not be nil (item " .. i .. ")")
    end
    add(self, t[i])
  end
end

function Set:clear()
  self.members, self.order, self.n, self.count = {}, {}, 0, 0
end

-- pop() -> the oldest member, removed (KeyError when empty)
function Set:pop()
  for i = 1, self.n do
    local k = self.order[i]
    if k then
      local v = self.members[k][1]
      remove(self, v)
      return v
    end
  end
  raise("KeyError", "pop from an empty set")
end

-- copy() -> the members as a sequence, in insertion order
function Set:copy()
  local out, j = {}, 0
  for i = 1, self.n do
    local k = self.order[i]
    if k then
      j = j + 1
      out[j] = self.members[k][1]
    end
  end
  return out
end

function Set:__tostring()
  local parts = {}
  for _, v in ipairs(Set.copy(self)) do parts[#parts + 1] = K.show(v) end
  return "set{" .. table.concat(parts, ", ") .. "}"
end

T.set_canon = canon
return T
