-- The message codec: MessagePack with references, functions and names.
local H = require "helpers"
local mp = require "multiprocessing"
local enc, dec = mp.encode, mp.decode

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end
local function unhex(h)
  return (h:gsub("%s", ""):gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

-- Deep equality that follows identity: a[i] and b[i] must correspond one
-- to one (so shared references and cycles are compared too); NaN == NaN.
local function same(a, b, seen)
  seen = seen or {}
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then
    if a ~= a then return b ~= b end
    return a == b and math.type(a) == math.type(b)
  end
  if type(a) ~= "table" then return a == b end
  if seen[a] then return seen[a] == b end
  seen[a] = b
  for k, v in pairs(a) do
    local bk = k
    if type(k) == "table" then return false end -- not used as keys here
    if not same(v, b[bk], seen) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return getmetatable(a) == getmetatable(b)
end

-- Round trip through a trusted decode (functions, names, handles too).
local TRUSTED = {trusted = true}
local function rt(v) return dec(enc(v), TRUSTED) end

-- Random plain values (no functions, no shared tables).
local function random_value(rng, depth, opts)
  opts = opts or {}
  local r = rng(opts.no_nil and 2 or 1, depth > 0 and 11 or 8)
  if r == 1 then return nil
  elseif r == 2 then return rng(2) == 1
  elseif r == 3 then
    local mags = {1, 100, 40000, 2^31, 2^40}
    local v = rng(-mags[rng(#mags)], mags[rng(#mags)])
    return math.tointeger(v) or v
  elseif r == 4 then
    return ({math.mininteger, math.maxinteger, 0, -1, 127, 128, -32, -33,
             255, 256, 65535, 65536, -129, 2^31 - 1, -2^31})[rng(15)] // 1 | 0
  elseif r == 5 then
    local f = ({0.0, -0.0, 1.5, -2.25, 1e300, -1e-300, 3.0, 1 / 0, -1 / 0})[rng(9)]
    if opts.no_nan_inf and (f ~= f or f == 1 / 0 or f == -1 / 0) then return 0.5 end
    return f
  elseif r == 6 then
    local n = ({0, 1, 5, 31, 32, 255, 256, 70000})[rng(8)]
    return string.rep("a", n)
  elseif r == 7 then
    local t = {}
    for i = 1, rng(0, 20) do t[i] = string.char(rng(0, 255)) end
    return table.concat(t)
  elseif r == 8 then
    return ({"héllo", "日本語", "\u{1F600}", "\0with\0zeros"})[rng(4)]
  elseif r == 9 then -- sequence
    -- long sequences only near the leaves, so values stay small
    local t, n = {}, ({0, 1, 3, 15, 16, 17, 300})[rng(depth > 1 and 4 or 7)]
    for i = 1, n do
      local v = random_value(rng, depth - 1, {no_nil = true, no_nan_inf = opts.no_nan_inf})
      t[i] = v == nil and 0 or v
    end
    return t
  else -- map
    local t = {}
    for _ = 1, ({1, 2, 5, 15, 16, 40})[rng(depth > 1 and 3 or 6)] do
      local k
      local kr = rng(opts.string_keys and 1 or 4)
      if kr == 1 then k = "k" .. rng(1000)
      elseif kr == 2 then k = rng(-1000, 1000)
      elseif kr == 3 then k = rng(1, 1000) + 0.5
      else k = "key with spaces " .. rng(100) end
      t[k] = random_value(rng, depth - 1, {no_nil = true, no_nan_inf = opts.no_nan_inf})
    end
    return t
  end
end

local function seeded(seed)
  math.randomseed(seed)
  return math.random
end

describe("codec formats", function()
  it("writes integers in the smallest format", function()
    local cases = {
      [0] = "00", [127] = "7f", [128] = "cc80", [255] = "ccff", [256] = "cd0100",
      [65535] = "cdffff", [65536] = "ce00010000", [4294967295] = "ceffffffff",
      [4294967296] = "cf0000000100000000", [-1] = "ff", [-32] = "e0",
      [-33] = "d0df", [-128] = "d080", [-129] = "d1ff7f", [-32768] = "d18000",
      [-32769] = "d2ffff7fff", [-2147483648] = "d280000000",
      [-2147483649] = "d3ffffffff7fffffff",
    }
    for v, h in pairs(cases) do
      assert.equal(h, hex(enc(v)), tostring(v))
      assert.equal(v, dec(enc(v)))
    end
    assert.equal("cf7fffffffffffffff", hex(enc(math.maxinteger)))
    assert.equal("d38000000000000000", hex(enc(math.mininteger)))
  end)

  it("writes floats as float64 so math.type survives", function()
    assert.equal("cb3ff0000000000000", hex(enc(1.0)))
    assert.equal("float", math.type(rt(1.0)))
    assert.equal("float", math.type(rt(-0.0)))
    assert.equal(1 / 0, rt(1 / 0))
    assert.equal(-1 / 0, rt(-1 / 0))
    local nan = rt(0 / 0)
    assert.is_true(nan ~= nan)
    assert.equal(1 / (-0.0), 1 / rt(-0.0))
  end)

  it("reads float32", function()
    assert.equal(1.5, dec(unhex("ca3fc00000")))
    assert.equal("float", math.type(dec(unhex("ca3fc00000"))))
  end)

  it("reads uint64 above math.maxinteger as a float, never wrapped", function()
    local v = dec(unhex("cfffffffffffffffff"))
    assert.equal("float", math.type(v))
    assert.is_true(v > 0)
    assert.equal(2.0^64, v)
  end)

  it("writes valid UTF-8 as str and other bytes as bin", function()
    assert.equal("a3616263", hex(enc("abc")))
    assert.equal("a0", hex(enc("")))
    assert.equal("a6" .. hex("héllo"), hex(enc("héllo")))
    assert.equal("c402ff00", hex(enc("\xff\x00")))
    assert.equal("c403eda080", hex(enc("\xed\xa0\x80")))   -- a surrogate
    assert.equal("c402c0af", hex(enc("\xc0\xaf")))         -- overlong
    assert.equal("c404f4908080", hex(enc("\xf4\x90\x80\x80"))) -- > U+10FFFF
    assert.equal("a3000100", hex(enc("\0\1\0")))
    local s32, s256, s65536 = ("x"):rep(32), ("x"):rep(256), ("x"):rep(65536)
    assert.equal("d920", hex(enc(s32):sub(1, 2)))
    assert.equal("da0100", hex(enc(s256):sub(1, 3)))
    assert.equal("db00010000", hex(enc(s65536):sub(1, 5)))
    local b = ("\xff"):rep(256)
    assert.equal("c50100", hex(enc(b):sub(1, 3)))
    assert.equal("c600010000", hex(enc(("\xff"):rep(65536)):sub(1, 5)))
    for _, v in ipairs {s32, s256, s65536, b} do assert.equal(v, rt(v)) end
  end)

  it("writes sequences as arrays, the empty table as [], the rest as maps", function()
    assert.equal("90", hex(enc({})))
    assert.equal("93010203", hex(enc({1, 2, 3})))
    assert.equal("81a16101", hex(enc({a = 1})))
    local t16 = {}
    for i = 1, 16 do t16[i] = 0 end
    assert.equal("dc0010", hex(enc(t16):sub(1, 3)))
    local t65536 = {}
    for i = 1, 65536 do t65536[i] = 0 end
    assert.equal("dd00010000", hex(enc(t65536):sub(1, 5)))
    local m16 = {}
    for i = 1, 16 do m16["k" .. i] = i end
    assert.equal("de0010", hex(enc(m16):sub(1, 3)))
    local m65536 = {}
    for i = 1, 65536 do m65536["k" .. i] = i end
    assert.equal("df00010000", hex(enc(m65536):sub(1, 5)))
    assert.same(m65536, rt(m65536))
    -- holes make a map; keys built in reverse order still make an array
    local holes = {1, nil, 3}
    assert.equal("8", hex(enc(holes)):sub(1, 1))
    assert.same({[1] = 1, [3] = 3}, rt(holes))
    local rev = {}
    for i = 40, 1, -1 do rev[i] = i end
    assert.equal("dc0028", hex(enc(rev):sub(1, 3)))
    local mixed = {1, 2, x = 3}
    assert.same(mixed, rt(mixed))
    local keys = {[true] = 1, [1.5] = 2, [-3] = 3}
    assert.same(keys, rt(keys))
  end)

  it("reads every format family Python's msgpack can write", function()
    assert.same({1, "a", true, false}, dec(unhex("9401a161c3c2")))
    assert.same({x = {}}, dec(unhex("81a17880")))
    assert.equal("abc", dec(unhex("d903616263")))   -- str8
    assert.equal("abc", dec(unhex("da0003616263"))) -- str16
    assert.equal("abc", dec(unhex("db00000003616263")))
    assert.equal("abc", dec(unhex("c403616263")))   -- bin8
    assert.equal("abc", dec(unhex("c50003616263")))
    assert.equal("abc", dec(unhex("c600000003616263")))
    assert.same({1}, dec(unhex("dc000101")))
    assert.same({1}, dec(unhex("dd0000000101")))
    assert.same({a = 1}, dec(unhex("de0001a16101")))
    assert.same({a = 1}, dec(unhex("df00000001a16101")))
    assert.equal(-2, dec(unhex("d0fe")))
    assert.equal(-2, dec(unhex("d1fffe")))
    assert.equal(-2, dec(unhex("d2fffffffe")))
    assert.equal(-2, dec(unhex("d3fffffffffffffffe")))
  end)

  it("round-trips application ext values of every size as Ext objects", function()
    for _, n in ipairs {1, 2, 4, 8, 16, 0, 3, 255, 256, 70000} do
      local data = ("z"):rep(n)
      local x = mp.Ext(42, data)
      local s = enc(x)
      local first = s:byte(1)
      local expect = ({[1] = 0xd4, [2] = 0xd5, [4] = 0xd6, [8] = 0xd7, [16] = 0xd8})[n]
        or (n <= 255 and 0xc7 or n <= 65535 and 0xc8 or 0xc9)
      assert.equal(expect, first, "size " .. n)
      local y = dec(s)
      assert.equal(42, y.exttype)
      assert.equal(data, y.data)
      assert.equal(s, enc(y))
    end
    assert.has_error(function() mp.Ext(128, "x") end)
  end)

  it("decodes the timestamp ext (-1) to seconds and nanoseconds", function()
    local t32 = dec(unhex("d6ff5f5e1000"))
    assert.equal(-1, t32.exttype)
    assert.equal(0x5f5e1000, t32.seconds)
    assert.equal(0, t32.nanoseconds)
    local t64 = dec(unhex("d7ff" .. "00000004" .. "5f5e1000"))
    assert.equal(1, t64.nanoseconds)
    assert.equal(0x5f5e1000, t64.seconds)
    local t96 = dec(unhex("c70cff" .. "00000007" .. "ffffffffffffffff"))
    assert.equal(-1, t96.seconds)
    assert.equal(7, t96.nanoseconds)
    assert.equal("d6ff5f5e1000", hex(enc(t32)))
  end)
end)

describe("codec identity", function()
  it("keeps a table reached twice as one table", function()
    local shared = {1, 2}
    local v = rt({a = shared, b = shared, c = {shared}})
    assert.equal(v.a, v.b)
    assert.equal(v.a, v.c[1])
    assert.same({1, 2}, v.a)
  end)

  it("round-trips cycles", function()
    local t = {name = "root"}
    t.self = t
    t.kids = {{parent = t}, {parent = t}}
    local v = rt(t)
    assert.equal(v, v.self)
    assert.equal(v, v.kids[1].parent)
    assert.equal(v, v.kids[2].parent)
    local a, b = {}, {}
    a[1], b[1] = b, a
    local w = rt(a)
    assert.equal(w, w[1][1])
  end)

  it("writes plain data without any ext", function()
    local s = enc({{1}, {2}, {x = {3}}})
    assert.is_nil(s:find("[\xc7\xc8\xc9\xd4-\xd8]"))
  end)

  it("can be switched off (for measuring), failing on cycles", function()
    local t = {}
    t.t = t
    mp.codec_options {track = false}
    local ok, err = pcall(enc, t)
    mp.codec_options {track = true}
    assert.is_false(ok)
    assert.matches("nesting deeper", err.message)
    assert.is_true(mp.codec_options().track)
  end)
end)

describe("codec functions", function()
  it("sends closures with their upvalues copied", function()
    local base, list = 10, {1, 2, 3}
    local f = function(x)
      local s = base
      for _, v in ipairs(list) do s = s + v end
      return s + x
    end
    local g = rt(f)
    assert.equal(26, g(10))
    base = 100
    assert.equal(26, g(10))    -- a copy: the original's upvalue moved on
  end)

  it("sends recursive local functions", function()
    local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
    assert.equal(55, rt(fib)(10))
  end)

  it("rebinds _ENV to the receiver's globals", function()
    local f = load("return function() return tostring(_G ~= nil) .. type(print) end")()
    assert.equal("truefunction", rt(f)())
    local g = rt(function() return _ENV end)
    assert.equal(_G, g())
  end)

  it("sends standard library and module functions by name", function()
    assert.equal(string.format, rt(string.format))
    assert.equal(print, rt(print))
    assert.equal(math.floor, rt(math.floor))
    local cjson = require "cjson"
    local f = function(v) return cjson.encode(v) end
    assert.equal("[1,2]", rt(f)({1, 2}))
    local s = enc(f)
    assert.truthy(s:find("cjson", 1, true))
  end)

  it("refuses functions, names and globals from untrusted sources", function()
    for _, v in ipairs {function() end, print, _G} do
      local ok, err = pcall(dec, enc(v), {untrusted = true})
      assert.is_false(ok)
      assert.equal("DecodeError", err.kind)
      assert.matches("untrusted", err.message)
    end
    assert.same({1, {2}}, dec(enc({1, {2}}), {untrusted = true}))
  end)

  it("names the path to what cannot travel", function()
    local ok, err = pcall(enc, {1, {file = io.stdout}})
    assert.is_false(ok)
    assert.equal("EncodeError", err.kind)
    assert.equal("cannot encode a userdata (FILE*) at value[2].file", err.message)
    local co = coroutine.create(print)
    local f = function() return co end
    ok, err = pcall(enc, {work = f})
    assert.is_false(ok)
    assert.matches("cannot encode a thread at value%.work{upvalue 'co' of function at .-codec_spec%.lua:%d+}", err.message)
    ok, err = pcall(enc, {["odd key"] = {[3] = io.stderr}})
    assert.matches('%["odd key"%]%[3%]', err.message)
  end)

  it("gives the path and the reason of an EncodeError as data", function()
    local _, err = pcall(enc, {1, {file = io.stdout}})
    assert.same({2, ".file"}, err.path)
    assert.equal("cannot encode a userdata (FILE*)", err.reason)
    _, err = pcall(enc, {["odd key"] = {[3] = io.stderr}})
    assert.same({'["odd key"]', 3}, err.path)
    _, err = pcall(enc, io.stdout)
    assert.same({}, err.path)
    -- a deep path keeps its outer steps
    local deep = io.stdout
    for _ = 1, 100 do deep = {deep} end
    _, err = pcall(enc, deep)
    assert.equal("EncodeError", err.kind)
    assert.is_true(#err.path > 0 and #err.path <= 100)
    for _, step in ipairs(err.path) do assert.equal(1, step) end
  end)

  it("refuses C functions that no loaded module holds", function()
    local cfunc = coroutine.wrap(function() end)
    local ok, err = pcall(enc, {cfunc})
    assert.is_false(ok)
    assert.matches("C function", err.message)
  end)
end)

describe("codec classes", function()
  it("rebuilds registered classes with the receiver's metatable", function()
    local Point = {}
    Point.__index = Point
    function Point:norm2() return self.x * self.x + self.y * self.y end
    mp.register_class("spec.Point", Point)
    local p = setmetatable({x = 3, y = 4}, Point)
    local q = rt({p, p})
    assert.equal(25, q[1]:norm2())
    assert.equal(q[1], q[2])
    assert.equal(Point, getmetatable(q[1]))
  end)

  it("uses reduce and rebuild hooks", function()
    local Box = {}
    Box.__index = Box
    mp.register_class("spec.Box", Box, {
      reduce = function(b) return {b.v * 2} end,
      rebuild = function(s) return setmetatable({v = s[1] / 2, rebuilt = true}, Box) end,
    })
    local b = rt(setmetatable({v = 21}, Box))
    assert.equal(21, b.v)
    assert.is_true(b.rebuilt)
  end)

  it("runs a reducer once per message, even when the message repeats objects", function()
    local Counted = {}
    local calls = 0
    mp.register_class("spec.Counted", Counted, {
      reduce = function(o) calls = calls + 1 return {o.v} end,
      rebuild = function(s) return setmetatable({v = s[1]}, Counted) end,
    })
    local o = setmetatable({v = 1}, Counted)
    local shared = {}
    local back = rt({o, shared, shared, o})
    assert.equal(1, calls)
    assert.equal(back[1], back[4])
    assert.equal(back[2], back[3])
    assert.equal(1, back[1].v)
  end)

  it("drops unregistered metatables and keeps error objects", function()
    local t = rt(setmetatable({a = 1}, {__index = function() return "x" end}))
    assert.is_nil(getmetatable(t))
    assert.is_nil(t.b)
    local e = rt(mp.new_error("ValueError", "bad", {value = {1}}))
    assert.is_true(mp.is_error(e, "ValueError"))
    assert.equal("ValueError: bad", tostring(e))
    assert.same({1}, e.value)
  end)

  it("names the error of a failing rebuild, error objects included", function()
    local Fails = {}
    mp.register_class("spec.Fails", Fails, {
      rebuild = function() error(mp.new_error("ValueError", "no such record")) end,
    })
    local ok, err = pcall(dec, enc(setmetatable({}, Fails)))
    assert.is_false(ok)
    assert.equal("DecodeError", err.kind)
    assert.equal("rebuilding class 'spec.Fails' failed: ValueError: no such record at byte 6",
                 err.message)
    mp.register_class("spec.Fails", Fails, {rebuild = function() error("plain") end})
    ok, err = pcall(dec, enc(setmetatable({}, Fails)))
    assert.matches("failed: .*plain at byte 6$", err.message)
  end)

  it("refuses unknown classes on decode", function()
    local M = {}
    mp.register_class("spec.Unknown", M)
    local s = enc(setmetatable({}, M))
    s = s:gsub("spec%.Unknown", "spec.Unknowx")
    local ok, err = pcall(dec, s)
    assert.is_false(ok)
    assert.matches("not registered", err.message)
  end)
end)

describe("codec trust", function()
  it("decodes untrusted by default: a mutated function encoding is a DecodeError, never a crash", function()
    -- in a fresh process, so a crash fails this test instead of the runner
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local s = mp.encode(function(a, b)
        local t = {}
        for i = 1, a do t[i] = i * b end
        return #t
      end)
      math.randomseed(13)
      local n, decoded = 0, 0
      for _ = 1, 400 do
        -- two bytes of the bytecode changed; what a trusted decode gives
        -- is called, as a receiver would (a crash before this fix: Lua
        -- does not verify binary chunks)
        local i, j = math.random(8, #s), math.random(8, #s)
        local a, b = math.random(0, 255), math.random(0, 255)
        local m = s:sub(1, i - 1) .. string.char(a) .. s:sub(i + 1)
        m = m:sub(1, j - 1) .. string.char(b) .. m:sub(j + 1)
        local ok, f = pcall(mp.decode, m)
        if ok and type(f) == "function" then pcall(f, 3, 4) end
        if ok or not mp.is_error(f, "DecodeError") then
          decoded = decoded + 1
        elseif f.message:find("refused from an untrusted source at byte %d+$") then
          n = n + 1
        end
      end
      print("refused", n, "decoded", decoded)
    ]])
    assert.equal(0, code, "exit " .. code .. ": " .. out .. err)
    assert.equal("refused\t400\tdecoded\t0\n", out)
  end)

  it("refuses module names, globals and handles by default; trusted = true accepts them", function()
    local q = mp.Queue()
    local cjson = require "cjson"
    for _, case in ipairs {
      {print, "module reference"}, {_G, "globals table"},
      {q, "runtime object handle"}, {function() return 1 end, "function"},
    } do
      local v, what = case[1], case[2]
      local s = enc(v)
      if what then
        local ok, err = pcall(dec, s)
        assert.is_false(ok)
        assert.equal("DecodeError", err.kind)
        assert.matches("^" .. what .. " refused from an untrusted source at byte %d+$", err.message)
        ok, err = pcall(dec, s, {untrusted = true})
        assert.is_false(ok)
      end
      local back = dec(s, TRUSTED)
      if type(v) == "function" and what == "function" then
        assert.equal(1, back())
      elseif what then
        assert.is_true(back == v)
      end
    end
    -- a module held by a function goes by name: refused with the function
    local f = function() return cjson.encode({}) end
    assert.has_error(function() dec(enc(f)) end)
    assert.equal("{}", dec(enc(f), TRUSTED)())
    local ok, err = pcall(dec, enc(1), {trusted = true, untrusted = true})
    assert.is_false(ok)
    assert.matches("both trusted and untrusted", err)
    -- plain data and registered classes need no trust
    assert.same({1, {x = "y"}}, dec(enc({1, {x = "y"}})))
    assert.is_true(mp.is_error(dec(enc(mp.new_error("ValueError", "v"))), "ValueError"))
  end)

  it("refuses trusted_only classes from untrusted sources, before making anything", function()
    local Conn, made = {}, 0
    mp.register_class("spec.Connects", Conn, {
      rebuild = function(s) made = made + 1 return setmetatable(s, Conn) end,
      trusted_only = true,
    })
    local s = enc(setmetatable({to = "somewhere"}, Conn))
    local ok, err = pcall(dec, s)
    assert.is_false(ok)
    assert.equal("class 'spec.Connects' refused from an untrusted source at byte 6", err.message)
    assert.equal(0, made)
    assert.equal("somewhere", dec(s, TRUSTED).to)
    assert.equal(1, made)
  end)
end)

describe("codec ext types", function()
  it("reserves 1..7 for luamp: mp.Ext and the encoder refuse them", function()
    for t = 1, 7 do
      local ok, err = pcall(mp.Ext, t, "x")
      assert.is_false(ok)
      assert.matches("bad argument #1 to '[%w.]*Ext' %(exttype 1..7 is reserved", err)
      local fake = setmetatable({exttype = t, data = "x"}, getmetatable(mp.Ext(42, "")))
      local ok2, err2 = pcall(enc, {fake})
      assert.is_false(ok2)
      assert.equal("Ext type " .. t .. " is reserved (1..7 are luamp's own) at value[1]",
                   err2.message)
    end
    for _, t in ipairs {0, 8, -2, 127, -128} do
      assert.equal(t, dec(enc(mp.Ext(t, "x"))).exttype)
    end
  end)

  it("reads the globals only from an empty payload", function()
    assert.equal("c70004", hex(enc(_G)))
    assert.is_true(dec(unhex("c70004"), TRUSTED) == _G)
    for _, bad in ipairs {"d40400", "d7040000000000000000", "c7010441"} do
      local ok, err = pcall(dec, unhex(bad), TRUSTED)
      assert.is_false(ok, bad)
      assert.equal("DecodeError", err.kind)
      assert.matches("malformed globals %(payload not empty%) at byte %d+$", err.message)
    end
  end)

  it("makes only timestamps the decoder reads back", function()
    for _, ok_data in ipairs {"\0\0\0\1", ("\0"):rep(8), ("\0"):rep(12),
                              string.pack(">I4I8", 999999999, 5)} do
      local x = mp.Ext(-1, ok_data)
      assert.equal(ok_data, dec(enc(x)).data)
    end
    for _, bad in ipairs {"", "abc", ("\0"):rep(5), ("\0"):rep(16),
                          string.pack(">I4I8", 1000000000, 5),
                          string.pack(">I8", 0xffffffff << 34)} do
      local ok, err = pcall(mp.Ext, -1, bad)
      assert.is_false(ok, hex(bad))
      assert.matches("bad argument #2 to '[%w.]*Ext' %(malformed timestamp", err)
      local ok2, err2 = pcall(dec, "\xc7" .. string.char(#bad) .. "\xff" .. bad)
      assert.is_false(ok2, hex(bad))
      assert.matches("malformed timestamp", err2.message)
      local fake = setmetatable({exttype = -1, data = bad}, getmetatable(mp.Ext(42, "")))
      assert.has_error(function() enc(fake) end)
    end
  end)

  it("gives every DecodeError its byte offset", function()
    local Fails = {}
    mp.register_class("spec.Fails2", Fails, {rebuild = function() error("no") end})
    local M = {}
    mp.register_class("spec.Known", M)
    local unknown = enc(setmetatable({}, M)):gsub("spec%.Known", "spec.Knowx")
    local gone = H.script([[
      local mp = require "multiprocessing"
      io.write((mp.encode(mp.Queue()):gsub(".", function(c) return string.format("%02x", c:byte()) end)))
    ]])
    local cases = {
      {"\xc1"}, {"\x92\x01"}, {"\x01\x02"}, {""}, {"\x81\xc0\x01"},
      {("\x91"):rep(300) .. "\x01"},
      {"\xc7\x0d\x05\xab" .. "no.such.mod" .. "\xc0", TRUSTED},
      {"\xc7\x0b\x05\xa6string\xa4nope", TRUSTED},
      {"\xc7\x0a\x05\xa6string\xa3len", TRUSTED},
      {"\xc7\x07\x06\xa1x\xc4\x03abc", TRUSTED},
      {unhex(gone), TRUSTED},
      {unknown},
      {enc(setmetatable({}, Fails))},
      {"\xc7\x01\x04\x00", TRUSTED},
      {"\xd6\xff\x00\x00"},
    }
    for i, c in ipairs(cases) do
      local ok, err = pcall(dec, c[1], c[2])
      assert.is_false(ok, "case " .. i)
      assert.equal("DecodeError", err.kind, "case " .. i)
      assert.matches(" at byte %d+$", err.message, nil, false, "case " .. i)
    end
  end)
end)

describe("codec on bad input", function()
  local function bad(bytes, pattern, opts)
    local ok, err = pcall(dec, bytes, opts)
    if ok or err.kind ~= "DecodeError" then
      error("not a DecodeError for " .. hex(bytes:sub(1, 40)) .. ": " .. tostring(err))
    end
    if pattern then assert.matches(pattern, err.message) end
    return err
  end

  it("rejects every truncation of valid messages", function()
    local rng = seeded(7)
    for _ = 1, 60 do
      local s = enc(random_value(rng, 3))
      -- every prefix of small messages, 300 sampled prefixes of big ones
      local cuts = {}
      if #s <= 3000 then
        for i = 0, #s - 1 do cuts[#cuts + 1] = i end
      else
        for _ = 1, 300 do cuts[#cuts + 1] = rng(0, #s - 1) end
      end
      for _, i in ipairs(cuts) do
        local err = bad(s:sub(1, i))
        assert.is_truthy(err.message:find("truncated") or
                         err.message:find("longer than the input"), err.message)
      end
    end
  end)

  it("rejects 0xc1, trailing bytes and lengths beyond the input", function()
    bad("\xc1", "0xc1 at byte 0")
    bad("\x91\xc1", "at byte 1")
    bad("\x01\x02", "trailing bytes at byte 1")
    bad("", "truncated")
    bad("\xdd\xff\xff\xff\xff\x01", "longer than the input")
    bad("\xdf\xff\xff\xff\xff\x01\x01", "longer than the input")
    bad("\xdb\xff\xff\xff\xff", "truncated")
    bad("\xc6\x7f\xff\xff\xff", "truncated")
    bad("\xc9\xff\xff\xff\xff\x01", "truncated")
  end)

  it("rejects nil and NaN map keys", function()
    bad("\x81\xc0\x01", "nil map key")
    bad("\x81\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\x01", "NaN map key")
  end)

  it("limits nesting depth, configurably", function()
    local deep = ("\x91"):rep(300) .. "\x01"
    bad(deep, "too deep")
    -- DEF wrappers nested 100000 deep: the depth limit, not the C stack
    local defs = ("\xc9\x00\x00\x00\x00\x02"):rep(1)
    local nested = "\x01"
    for _ = 1, 20000 do
      nested = "\xc9" .. string.pack(">I4", #nested) .. "\x02" .. nested
    end
    assert.is_string(defs)
    bad(nested, "too deep")
    assert.has_error(function() mp.codec_options {max_depth = 10^6} end)
    assert.is_table(dec(deep, {max_depth = 400}))
    local d50 = ("\x91"):rep(50) .. "\x01"
    local ok = pcall(dec, d50, {max_depth = 10})
    assert.is_false(ok)
    local t = {}
    local node = t
    for _ = 1, 300 do node[1] = {} node = node[1] end
    local ok2, err = pcall(enc, t)
    assert.is_false(ok2)
    assert.matches("nesting deeper than 256", err.message)
    local old = mp.codec_options().max_depth
    mp.codec_options {max_depth = 1000}
    assert.equal(1000, mp.codec_options().max_depth)
    assert.is_table(rt(t))
    mp.codec_options {max_depth = old}
  end)

  it("rejects malformed luamp exts", function()
    bad("\xd5\x01\x00\x00", "malformed reference")     -- REF of 2 bytes
    bad("\xd6\x01\x00\x00\x00\x05", "unknown object")    -- REF without DEF
    bad("\xc7\x03\x03\xc4\x01\x00", "bytecode", TRUSTED) -- FUNC, bad bytecode
    bad("\xc7\x02\x05\x01\x02", "malformed name", TRUSTED) -- NAMED, wrong shape
    bad("\xc7\x0d\x05\xab" .. "no.such.mod" .. "\xc0", "cannot load module.* at byte 3$",
        TRUSTED)
    bad("\xc7\x07\x06\xa1x\xc4\x03abc", "unknown type at byte 3", TRUSTED) -- HANDLE
    bad("\xc7\x02\x02\x01\x01", "length")                -- DEF with 2 values
    bad("\xc7\x00\x03", "truncated", TRUSTED)            -- empty FUNC
    bad("\xd7\xff\x00\x00\x00\x00\xff\xff\xff\xff\x00", "trailing")
  end)

  it("leaks nothing when encoding fails midway", function()
    local big = {}
    for i = 1, 1000 do big[i] = ("x"):rep(100) end
    big[1001] = io.stdout
    collectgarbage("collect")
    local before = collectgarbage("count")
    for _ = 1, 200 do pcall(enc, big) end
    collectgarbage("collect")
    assert.is_true(collectgarbage("count") - before < 64)
  end)
end)

describe("codec property", function()
  it("round-trips random values", function()
    local rng = seeded(20261122)
    for i = 1, 400 do
      local v = random_value(rng, 4)
      local back = rt(v)
      assert.is_true(same(v, back), "value " .. i .. ": " .. hex(enc(v)):sub(1, 80))
    end
  end)

  it("round-trips random values with sharing, cycles and closures", function()
    local rng = seeded(99)
    for _ = 1, 100 do
      local pool = {}
      for j = 1, 6 do pool[j] = {tag = j} end
      for _, t in ipairs(pool) do
        for _ = 1, 3 do t[rng(1, 5)] = pool[rng(1, 6)] end
      end
      local k = rng(1, 100)
      local f = function(x) return x + k + #pool end
      pool[1].fn = f
      local back = rt(pool)
      -- identity structure: back[i][j] == back[m] exactly where pool's was
      for i = 1, 6 do
        for j = 1, 5 do
          local orig = pool[i][j]
          if orig then
            local m
            for x = 1, 6 do if pool[x] == orig then m = x end end
            assert.equal(back[m], back[i][j])
          end
        end
      end
      assert.equal(f(1), back[1].fn(1))
    end
  end)
end)

describe("codec interop", function()
  local corpus_file
  local values = {}

  setup(function()
    local rng = seeded(4242)
    for i = 1, 300 do
      values[i] = random_value(rng, 3, {no_nil = true})
    end
    values[#values + 1] = {math.maxinteger, math.mininteger, 2^53, -0.0}
  end)

  -- Length-prefixed messages in a file.
  local function write_msgs(path, msgs)
    local f = assert(io.open(path, "wb"))
    for _, m in ipairs(msgs) do f:write(string.pack(">s4", m)) end
    f:close()
  end
  local function read_msgs(path)
    local s, out, pos = H.slurp(path), {}, 1
    while pos <= #s do
      local m
      m, pos = string.unpack(">s4", s, pos)
      out[#out + 1] = m
    end
    return out
  end

  it("agrees with Python's msgpack both ways", function()
    corpus_file = os.tmpname()
    local back_file = os.tmpname()
    local msgs = {}
    for i, v in ipairs(values) do msgs[i] = enc(v) end
    write_msgs(corpus_file, msgs)
    local script = [[
import msgpack, struct, sys
data = open(sys.argv[1], "rb").read()
out = open(sys.argv[2], "wb")
pos = 0
while pos < len(data):
    (n,) = struct.unpack(">I", data[pos:pos + 4]); pos += 4
    v = msgpack.unpackb(data[pos:pos + n], strict_map_key=False); pos += n
    b = msgpack.packb(v)
    out.write(struct.pack(">I", len(b)) + b)
out.close()
]]
    local py = H.write(os.tmpname() .. ".py", script)
    local _, err, code = H.sh(H.python .. " " .. py .. " " .. corpus_file ..
      " " .. back_file)
    assert.equal(0, code, err)
    local back = read_msgs(back_file)
    assert.equal(#values, #back)
    for i, v in ipairs(values) do
      assert.is_true(same(v, dec(back[i])), "value " .. i .. ": " .. hex(msgs[i]):sub(1, 60))
    end
    os.remove(py); os.remove(back_file); os.remove(corpus_file)
  end)

  it("decodes Python's own output of every type", function()
    local py = [[
import msgpack, sys
v = {"int": [0, 1, -1, 127, 128, -33, 2**32, -2**40, 2**63 - 1],
     "float": [1.5, -0.0, 1e300], "str": "h\u00e9llo", "bytes": b"\xff\x00",
     "nested": {"a": [True, False, None]}, "empty": [], "emptymap": {},
     "bigarr": list(range(70000)), 7: "int key"}
sys.stdout.buffer.write(msgpack.packb(v))
]]
    local path = H.write(os.tmpname() .. ".py", py)
    local out, err, code = H.sh(H.python .. " " .. path)
    os.remove(path)
    assert.equal(0, code, err)
    local v = dec(out)
    assert.same({0, 1, -1, 127, 128, -33, 2^32 // 1, -(2^40) // 1, math.maxinteger}, v.int)
    assert.equal("float", math.type(v.float[1]))
    assert.equal("héllo", v.str)
    assert.equal("\xff\0", v.bytes)
    assert.same({true, false}, {v.nested.a[1], v.nested.a[2]})
    assert.equal(70000, #v.bigarr)
    assert.equal(69999, v.bigarr[70000])
    assert.equal("int key", v[7])
  end)

  it("agrees with lua-MessagePack both ways", function()
    local saved = package.path
    package.path = "/usr/share/lua/5.3/?.lua;" .. package.path
    local MP = require "MessagePack"
    package.path = saved
    local rng = seeded(555)
    for i = 1, 200 do
      local v = random_value(rng, 3, {no_nan_inf = false})
      assert.is_true(same(v, MP.unpack(enc(v))), "ours -> lua-MessagePack " .. i)
      assert.is_true(same(v, dec(MP.pack(v))), "lua-MessagePack -> ours " .. i)
    end
  end)
  -- (one number, boolean, nil or string under 32 bytes skips the
  -- encoder's set-up and the decoder's DEF slot: the same bytes, every
  -- caller, and an encode inside another's reducer keeps both intact)
  it("writes and reads a message of one scalar as any other", function()
    local cases = {
      {0, "00"}, {-32, "e0"}, {65536, "ce00010000"}, {math.mininteger, "d38000000000000000"},
      {1.0, "cb3ff0000000000000"}, {true, "c3"}, {false, "c2"}, {nil, "c0"},
      {("x"):rep(31), "bf" .. ("78"):rep(31)}, {("x"):rep(32), "d920" .. ("78"):rep(32)},
      {"h\xc3\xa9" .. ("x"):rep(28), "bf68c3a9" .. ("78"):rep(28)},
      {"\xff" .. ("x"):rep(30), "c41fff" .. ("78"):rep(30)},
    }
    local a, b = mp.Pipe()
    local q = mp.Queue()
    for i, c in ipairs(cases) do
      local v, h = c[1], c[2]
      assert.equal(h, hex(enc(v)), "case " .. i)
      assert.is_true(same(v, dec(unhex(h))), "case " .. i)
      a:send(v)
      q:put(v)
      assert.is_true(same(v, b:recv()), "pipe, case " .. i)
      assert.is_true(same(v, q:get()), "queue, case " .. i)
    end
    a:close(); b:close(); q:close()
    local Inner = {}
    mp.register_class("spec.Inner", Inner, {
      reduce = function(o) return {enc(o.v), enc("word"), o.v} end,
      rebuild = function(s) return setmetatable({s = s}, Inner) end,
    })
    local back = rt({setmetatable({v = 300}, Inner), 5, "tail"})
    assert.equal("cd012c", hex(back[1].s[1]))
    assert.equal("a4776f7264", hex(back[1].s[2]))
    assert.equal(300, back[1].s[3])
    assert.equal(5, back[2])
    assert.equal("tail", back[3])
    for _, m in ipairs {"\xcc\x05\x00", "\xa1a\x00", "\xc3\xc3", "\xcb" .. ("\0"):rep(9)} do
      local ok, err = pcall(dec, m)
      assert.is_false(ok)
      assert.equal("DecodeError", err.kind)
      assert.matches("trailing bytes at byte " .. (#m - 1), err.message, 1, true)
    end
  end)
  -- (mp.encode uses the state's box from its upvalue and leaves its
  -- stack to Lua; an encode of tables inside a reducer takes a box of its
  -- own; records wider than the encoder's stack window of 32 slots)
  it("encodes tables inside a reducer's encode, and wide records, as before", function()
    local Outer = {}
    mp.register_class("spec.OuterTables", Outer, {
      reduce = function(o) return {enc(o.t), enc({o.t, o.t}), o.t} end,
      rebuild = function(s) return setmetatable({s = s}, Outer) end,
    })
    local t = {id = 7, vals = {1.5, 2.5}, tags = {"x", "y"}}
    for _ = 1, 3 do
      local back = dec(enc({setmetatable({t = t}, Outer), t, "tail"}))
      assert.same(t, dec(back[1].s[1]))
      local pair = dec(back[1].s[2])
      assert.same(t, pair[1])
      assert.equal(pair[1], pair[2])           -- one table, twice
      assert.same(t, back[1].s[3])
      assert.same(t, back[2])
      assert.equal("tail", back[3])
    end
    local wide = {}
    for i = 1, 70 do wide["k" .. i] = {i, {i, "v" .. i}, {k = i}} end
    local list = {}
    for i = 1, 70 do list[i] = {n = i, inner = {i, i + 0.5}} end
    assert.same(wide, dec(enc(wide)))
    assert.same(list, dec(enc(list)))
    local ok, err = pcall(enc)
    assert.is_false(ok)
    assert.matches("bad argument #1 to '[%w.]*encode' %(value expected%)", err)
  end)
end)
