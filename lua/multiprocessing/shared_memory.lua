-- multiprocessing.shared_memory: named POSIX shared memory blocks,
-- compatible with Python's multiprocessing.shared_memory (runtime/shm.c),
-- and ShareableList, Python's fixed-length list laid out in one block.
--
-- SharedMemory{name =, create =, size =, track =} or
-- SharedMemory(name, create, size).  read(offset, len) and
-- write(offset, s) take byte offsets counted from 0, as Python's buf[i].
-- A tracked block is unlinked when its last owner (its creator, and any
-- process that called shm:track() and not shm:untrack()) exits or is
-- killed; the owners table and the tracker process are in runtime/shm.c.
--
-- ShareableList is policy over a SharedMemory's read/write (no C of its
-- own): every access is a bounds-checked read or write of the block, so
-- a block that is not a list (or a hostile one) gives errors, never a
-- crash.  The layout is Python's (3.11, Lib/multiprocessing/
-- shared_memory.py), so each side reads and writes the other's lists:
--
--   8 bytes            N, the number of items (native int64)
--   (N + 1) * 8 bytes  offsets of the items from the data area's start;
--                      offset N + 1 is the data area's size
--   data area          each item in its slot (8 bytes, or a string's
--                      8 * (len // 8 + 1))
--   N * 8 bytes        each item's struct format, NUL-padded: "q" (integer),
--                      "d" (float), "xxxxxxx?" (boolean in the slot's last
--                      byte), "xxxxxx?x" (None), "<n>s" (n bytes)
--   N bytes            each item's back transform: 0 as unpacked, 1 str
--                      (UTF-8), 2 bytes, 3 None
--
-- Lua strings that are valid UTF-8 are stored as str, others as bytes
-- (the codec's rule); both read back as Lua strings.  A slot never grows:
-- a string assigned later must fit the slot's allocation.  As Python's,
-- the list has no lock: concurrent writers of one item need one.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"

local SharedMemory = core.SharedMemory
local argerror, typeerror, raise = util.argerror, util.typeerror, util.raise
local spack, sunpack, mtype = string.pack, string.unpack, math.type
-- (locals: the reference spec reads the metamethods' upvalues as fields)
local type, tconcat, tostring = type, table.concat, tostring

local ALIGN = 8
local MAX_STRING = 9999991     -- its slot's format must fit 8 bytes ("9999999s")

local ShareableList = {}
local SL_MT = {__name = "multiprocessing.ShareableList"}

local function is_list(v)
  return getmetatable(v) == SL_MT
end

-- What an item is stored as: format, back-transform code, slot bytes.
-- Raises (naming fname and argument argn) for what the layout cannot hold.
local function item_format(v, fname, argn, what)
  local t = type(v)
  if t == "number" then
    if mtype(v) == "integer" then return "q", 0, ALIGN end
    return "d", 0, ALIGN
  elseif t == "boolean" then
    return "xxxxxxx?", 0, ALIGN
  elseif v == nil then
    return "xxxxxx?x", 3, ALIGN
  elseif t == "string" then
    if #v > MAX_STRING then
      raise("ValueError", string.format("%s: %s is a string of %d bytes; " ..
        "the layout holds at most %d", fname, what, #v, MAX_STRING))
    end
    if v:byte(-1) == 0 then
      raise("ValueError", string.format("%s: %s ends in a NUL byte, which " ..
        "the layout cannot keep (readers strip trailing NULs)", fname, what))
    end
    local slot = ALIGN * (#v // ALIGN + 1)
    return slot .. "s", utf8.len(v) and 1 or 2, slot
  end
  argerror(argn, fname, string.format("%s is a %s: a ShareableList holds " ..
    "integers, floats, booleans, strings and nil", what, util.typename(v)))
end

-- The bytes of v in a slot of format fmt.
local function packed(fmt, v)
  if fmt == "q" then return spack("=i8", v) end
  if fmt == "d" then return spack("=d", v) end
  if fmt == "xxxxxxx?" then return ("\0"):rep(7) .. (v and "\1" or "\0") end
  if fmt == "xxxxxx?x" then return ("\0"):rep(8) end
  return v .. ("\0"):rep(tonumber(fmt:sub(1, -2)) - #v)
end

-- ---- the list's geometry (fixed for its lifetime: N and the offsets) ---------

local function data_start(n) return (n + 2) * 8 end

local function formats_at(self)
  return data_start(self._n) + self._offs[self._n + 1]
end

-- Reads N and the offsets of an existing block, checking that they
-- describe a list that fits in it.
local function read_geometry(shm)
  local size = shm.size
  local function bad(why)
    raise("ValueError", string.format("ShareableList: block '%s' holds no " ..
      "ShareableList (%s)", shm.name, why))
  end
  if size < 16 then bad("only " .. size .. " bytes") end
  local n = sunpack("=i8", shm:read(0, 8))
  if n < 0 or n > (size - 16) // 17 then bad("item count " .. n) end
  local raw = shm:read(8, (n + 1) * 8)
  local offs, prev = {}, 0
  for i = 1, n + 1 do
    local o = sunpack("=i8", raw, (i - 1) * 8 + 1)
    if o < prev or (i == 1 and o ~= 0) then bad("offsets out of order") end
    offs[i], prev = o, o
  end
  if data_start(n) + offs[n + 1] + 9 * n > size then
    bad("its items go beyond the block's " .. size .. " bytes")
  end
  return n, offs
end

local function wrap(shm, n, offs)
  return setmetatable({shm = shm, _n = n, _offs = offs}, SL_MT)
end

-- ---- construction ----------------------------------------------------------------

local function create(seq, name)
  local n = seq.n or #seq
  if mtype(n) ~= "integer" or n < 0 then
    argerror(1, "ShareableList", "seq.n must be a non-negative integer")
  end
  local fmts, codes, offs, vals = {}, {}, {0}, {}
  for i = 1, n do
    local v = seq[i]
    local fmt, code, slot = item_format(v, "ShareableList", 1,
                                        "item " .. i)
    fmts[i], codes[i], vals[i] = fmt, code, v
    offs[i + 1] = offs[i] + slot
  end
  local size = data_start(n) + offs[n + 1] + 9 * n
  local shm = SharedMemory{name = name, create = true, size = size}
  local ok, err = pcall(function()
    local out = {spack("=i8", n)}
    for i = 1, n + 1 do out[#out + 1] = spack("=i8", offs[i]) end
    for i = 1, n do out[#out + 1] = packed(fmts[i], vals[i]) end
    for i = 1, n do out[#out + 1] = spack("c8", fmts[i]) end
    for i = 1, n do out[#out + 1] = spack("b", codes[i]) end
    shm:write(0, table.concat(out))
  end)
  if not ok then    -- (memory): no half-made block left behind
    pcall(shm.unlink, shm)
    shm:close()
    error(err, 0)
  end
  return wrap(shm, n, offs)
end

local function attach(shm)
  local n, offs = read_geometry(shm)
  return wrap(shm, n, offs)
end

-- ShareableList(seq [, {name =}]) makes a list (in a new block, named name
-- when given); ShareableList{name = n} or ShareableList(nil, {name = n})
-- attaches to an existing one.
local function new(_, seq, opts)
  if type(seq) == "table" and getmetatable(seq) == nil and opts == nil and
     seq[1] == nil and seq.n == nil and seq.name ~= nil then
    seq, opts = nil, seq       -- ShareableList{name = n}
  end
  local name
  if opts ~= nil then
    if type(opts) ~= "table" then typeerror(2, "ShareableList", "options table", opts) end
    for k in pairs(opts) do
      if k ~= "name" then
        argerror(seq == nil and 1 or 2, "ShareableList",
                 "unknown option '" .. tostring(k) .. "'")
      end
    end
    name = opts.name
    if name ~= nil and type(name) ~= "string" then
      argerror(seq == nil and 1 or 2, "ShareableList",
               "name must be a string, got " .. util.typename(name))
    end
  end
  if seq == nil then
    if name == nil then return create({}, nil) end
    return attach(SharedMemory(name))
  end
  if is_list(seq) then
    local copy = {n = #seq}
    for i = 1, copy.n do copy[i] = seq[i] end
    seq = copy
  elseif type(seq) ~= "table" then
    typeerror(1, "ShareableList", "table", seq)
  elseif getmetatable(seq) == nil and rawget(seq, "name") ~= nil then
    -- {1, 2, name = "x"}: a name that would be ignored, a list unnamed
    argerror(1, "ShareableList", "a sequence with a 'name' field (the " ..
             "name goes in the options: ShareableList(seq, {name = n}))")
  end
  return create(seq, name)
end
setmetatable(ShareableList, {__call = new})

-- ---- items ----------------------------------------------------------------------

local function check_self(self, fname)
  if not is_list(self) then
    util.selferror(fname, "ShareableList", "sl", self, is_list)
  end
end

-- The 1-based index at k: an integer (or an integral float) in 1..N;
-- reading allows N + 1 (nil, so that ipairs stops).
local function position(self, k, reading)
  local i = mtype(k) == "float" and math.tointeger(k) or k
  if mtype(i) ~= "integer" then
    raise("ValueError", "ShareableList index must be an integer, got " ..
          (type(k) == "number" and tostring(k) or util.typename(k)))
  end
  if reading and i == self._n + 1 then return nil end
  if i < 1 or i > self._n then
    raise("ValueError", string.format("ShareableList index %d out of " ..
          "range 1..%d", i, self._n))
  end
  return i
end

local function format_of(self, i)
  local f = self.shm:read(formats_at(self) + (i - 1) * 8, 8)
  return (f:gsub("%z+$", ""))
end

local function get(self, i)
  local shm, offs = self.shm, self._offs
  local fmt = format_of(self, i)
  local code = sunpack("b", shm:read(formats_at(self) + self._n * 8 + i - 1, 1))
  local at, slot = data_start(self._n) + offs[i], offs[i + 1] - offs[i]
  local len = fmt:match("^(%d+)s$")
  len = tonumber(len)
  if code == 3 then return nil end
  if len and len <= slot then
    local v = shm:read(at, len)
    if code == 1 or code == 2 then v = v:gsub("%z+$", "") end
    return v
  end
  if slot >= 8 then
    if fmt == "q" then return (sunpack("=i8", shm:read(at, 8))) end
    if fmt == "d" then return (sunpack("=d", shm:read(at, 8))) end
    if fmt == "xxxxxxx?" then return shm:read(at + 7, 1) ~= "\0" end
    if fmt == "xxxxxx?x" then return nil end
  end
  raise("ValueError", string.format("ShareableList: item %d of '%s' has " ..
        "format '%s', which Python's ShareableList does not write", i,
        shm.name, fmt))
end

-- Python's assignment rules: a number, boolean or nil takes the slot
-- (every slot has 8 bytes at least); a string must fit the slot, which
-- keeps its size.
local function set(self, i, v)
  local what = "item " .. i
  local fmt, code = item_format(v, "__newindex", 3, what)
  local offs = self._offs
  local slot = offs[i + 1] - offs[i]
  if type(v) == "string" then
    if #v > slot then
      raise("ValueError", string.format("ShareableList: a string of %d " ..
            "bytes exceeds item %d's storage (%d bytes)", #v, i, slot))
    end
    local cur = format_of(self, i)
    fmt = cur:match("^%d+s$") and cur or (slot .. "s")
  end
  local f = formats_at(self)
  self.shm:write(f + (i - 1) * 8, spack("c8", fmt))
  self.shm:write(f + self._n * 8 + i - 1, spack("b", code))
  self.shm:write(data_start(self._n) + offs[i], packed(fmt, v))
end

local methods = {}

-- sl:count(v) -> how many items equal v
function methods:count(v)
  check_self(self, "count")
  local c = 0
  for i = 1, self._n do
    if get(self, i) == v then c = c + 1 end
  end
  return c
end

-- sl:index(v) -> the first position of v (1-based); ValueError if absent
function methods:index(v)
  check_self(self, "index")
  for i = 1, self._n do
    if get(self, i) == v then return i end
  end
  raise("ValueError", string.format("ShareableList.index: %s is not in " ..
        "the list", type(v) == "string" and string.format("%q", v) or tostring(v)))
end

-- sl:totable() -> the items in a plain table, with n (nil items kept)
function methods:totable()
  check_self(self, "totable")
  local t = {n = self._n}
  for i = 1, self._n do t[i] = get(self, i) end
  return t
end

SL_MT.__index = function(self, k)
  if type(k) == "number" then
    local i = position(self, k, true)
    return i and get(self, i)
  end
  if k == "format" then     -- Python's: every item's format, joined
    local t = {}
    for i = 1, self._n do t[i] = format_of(self, i) end
    return tconcat(t)
  end
  return methods[k]
end

SL_MT.__newindex = function(self, k, v)
  if type(k) ~= "number" then
    raise("ValueError", "cannot set field '" .. tostring(k) ..
          "' of a ShareableList (only items 1..#sl)")
  end
  set(self, position(self, k, false), v)
end

SL_MT.__len = function(self) return self._n end

-- local sl <close> = ...: closes this process's mapping of the block (as
-- sl.shm:close(); the block is not unlinked)
SL_MT.__close = function(self) self.shm:close() end

-- pairs(sl): every position 1..#sl, nil items included
SL_MT.__pairs = function(self)
  local i = 0
  return function()
    i = i + 1
    if i <= self._n then return i, get(self, i) end
  end, self, nil
end

SL_MT.__tostring = function(self)
  if self.shm.closed then
    return string.format("ShareableList(name='%s', closed)", self.shm.name)
  end
  local t = {}
  for i = 1, self._n do
    local v = get(self, i)
    t[i] = type(v) == "string" and string.format("%q", v) or tostring(v)
  end
  return string.format("ShareableList({%s}, name='%s')", table.concat(t, ", "),
                       self.shm.name)
end

-- Through queues, pipes and as task arguments: its SharedMemory (a
-- handle: by name, checked to be the same block, refused by untrusted
-- decodes), attached again on arrival.
-- (init.lua registers the name before this file is loaded, so that a
-- process that never loaded it -- a pool worker forked earlier -- can
-- receive one.)
local function rebuild(state)
  if type(state) ~= "table" or getmetatable(state.shm) == nil then
    raise("DecodeError", "malformed ShareableList")
  end
  return attach(state.shm)
end
core.register_class("multiprocessing.ShareableList", SL_MT, {
  reduce = function(sl) return {shm = sl.shm} end,
  rebuild = rebuild, trusted_only = true,
})

return {
  SharedMemory = SharedMemory,
  ShareableList = ShareableList,
  _rebuild = rebuild,
}
