-- The encoder against tables of every shape a program can make: built in
-- odd orders, with holes, integer keys in the hash part, tables as keys,
-- wide and deep at once.  An array is written exactly when the keys are
-- 1..n; everything round-trips; the stack the encoder uses stays bounded.
local mp = require "multiprocessing"
local enc, dec = mp.encode, mp.decode

-- keys exactly 1..n (the empty table counts: it is written as [])
local function is_seq(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  for i = 1, n do
    if rawget(t, i) == nil then return false end
  end
  return true
end

local function is_array_byte(b)
  return (b >= 0x90 and b <= 0x9f) or b == 0xdc or b == 0xdd
end

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
  local na, nb = 0, 0
  for k, v in pairs(a) do
    na = na + 1
    if type(k) ~= "table" and not same(v, rawget(b, k), seen) then
      return false
    end
  end
  for _ in pairs(b) do nb = nb + 1 end
  return na == nb
end

-- A table with keys 1..n made in one of several ways, some leaving
-- integer keys in the hash part, plus (sometimes) one more key.
local function shaped(rng, n, extra)
  local how, t = rng(6), nil
  if how == 1 then
    t = {}
    for i = 1, n do t[i] = i * 1.5 end
  elseif how == 2 then
    t = {}
    for i = n, 1, -1 do t[i] = "s" .. i end
  elseif how == 3 then      -- a hash part first, then the integers
    t = {a = 1, b = 2, c = 3, d = 4, e = 5, f = 6, g = 7}
    for i = 1, n do t[i] = i end
    for _, k in ipairs {"a", "b", "c", "d", "e", "f", "g"} do t[k] = nil end
  elseif how == 4 then      -- constructor array plus hash-part items
    t = {1, 2, [3] = 3, [4] = 4}
    for i = 5, n do t[i] = i end
    for i = n + 1, 4 do t[i] = nil end
  elseif how == 5 then      -- grown, then shrunk from the end
    t = {}
    for i = 1, n + 5 do t[i] = true end
    for i = n + 5, n + 1, -1 do t[i] = nil end
  else                      -- random insertion order
    t = {}
    local order = {}
    for i = 1, n do order[i] = i end
    for i = n, 2, -1 do
      local j = rng(i)
      order[i], order[j] = order[j], order[i]
    end
    for _, i in ipairs(order) do t[i] = i end
  end
  if extra == 1 then t.x = "extra"
  elseif extra == 2 then t[n + 2] = "gap"
  elseif extra == 3 and n > 1 then t[rng(n - 1)] = nil   -- a hole
  elseif extra == 4 then t["1"] = "string one"
  elseif extra == 5 then t[0] = "zero"
  elseif extra == 6 then t[1.5] = "float"
  end
  return t
end

describe("codec table shapes", function()
  it("writes an array exactly when the keys are 1..n, and round-trips", function()
    local seed = 12345
    local function rng(m)
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % m + 1
    end
    local arrays, maps = 0, 0
    for _ = 1, 3000 do
      local t = shaped(rng, rng(40) - 1, rng(10))
      local s = enc(t)
      local want = is_seq(t)
      assert.equal(want, is_array_byte(s:byte(1)))
      if want then arrays = arrays + 1 else maps = maps + 1 end
      assert.is_true(same(t, dec(s)))
      -- the same table nested inside a map and a sequence
      local outer = {t, {k = t, [2] = {t}}}
      assert.is_true(same(outer, dec(enc(outer))))
    end
    assert.is_true(arrays > 500 and maps > 500)
  end)

  it("sizes each header by the final count, whichever way the table goes", function()
    local function hex(str) return (str:gsub(".", function(c)
      return string.format("%02x", c:byte()) end)) end
    local function seq(n, rev)
      local t = {}
      if rev then for i = n, 1, -1 do t[i] = 0 end   -- keys in the hash part
      else for i = 1, n do t[i] = 0 end end
      return t
    end
    local function map(n, first)
      local t = {}
      if first then t[first] = 0 end
      for i = 1, n - (first and 1 or 0) do t["k" .. i] = 0 end
      return t
    end
    for _, c in ipairs {{15, "9f"}, {16, "dc0010"}, {17, "dc0011"},
                        {65535, "dcffff"}, {65536, "dd00010000"}} do
      local n, head = c[1], c[2]
      for _, rev in ipairs {false, true} do
        local s = mp.encode(seq(n, rev))
        assert.equal(head, hex(s:sub(1, #head // 2)), n)
        assert.equal(n, #mp.decode(s))
      end
      local mhead = head:gsub("^9", "8"):gsub("^dc", "de"):gsub("^dd", "df")
      for _, first in ipairs {false, 5, 2.5} do   -- first key int, float
        local m = map(n, first)
        local s = mp.encode(m)
        assert.equal(mhead, hex(s:sub(1, #mhead // 2)), n)
        assert.is_true(same(m, mp.decode(s)))
      end
    end
  end)

  it("encodes wide tables nested deep (the stack stays bounded)", function()
    local old = mp.codec_options().max_depth
    mp.codec_options {max_depth = 3000}
    local root = {}
    local node = root
    for i = 1, 2500 do
      for j = 1, 40 do node[j] = {j} end          -- wide: many tables
      node.name = "level" .. i
      node.kids = {}
      node = node.kids
    end
    local ok, s = pcall(enc, root)
    mp.codec_options {max_depth = old}
    assert.is_true(ok, tostring(s))
    local ok2, back = pcall(dec, s, {max_depth = 3000})
    assert.is_true(ok2, tostring(back))
    assert.equal("level2500", (function()
      local n, last = back, nil
      while n.name do last = n.name; n = n.kids end
      return last
    end)())
    assert.same({40}, back[40])
  end)

  it("keeps identity and error paths with tables as keys and values", function()
    local shared = {1, 2, 3}
    local k1, k2 = {"key"}, {"key2"}
    local t = {[k1] = shared, [k2] = {shared, shared}, list = {shared}}
    local back = dec(enc(t))
    local a
    for k, v in pairs(back) do
      if type(k) == "table" and k[1] == "key" then a = v end
    end
    assert.equal(a, back.list[1])
    -- a failure deep inside a wide sequence names its place
    local wide = {}
    for i = 1, 50 do wide[i] = {i, {name = "n" .. i}} end
    wide[37][2].bad = coroutine.create(function() end)
    local ok, err = pcall(enc, {data = wide})
    assert.is_false(ok)
    assert.equal(".data[37][2].bad", err.message:match(" at value(.*)$"))
    assert.same({".data", 37, 2, ".bad"}, err.path)
    -- and the encoder works normally afterwards
    assert.same({1, {2}}, dec(enc({1, {2}})))
  end)
end)
