-- m:set(init): Python 3.14's managed set, as a Lua proxy; membership by
-- value for plain data and tables, by identity for managed objects
-- (lua/multiprocessing/manager_set.lua).
local H = require "helpers"
local mp = require "multiprocessing"

local kind_of = H.kind_of

describe("m:set()", function()
  local m
  setup(function() m = mp.Manager() end)
  teardown(function() m:shutdown() end)

  it("adds, discards, removes and tests members", function()
    local s = m:set()
    assert.equal(0, #s)
    s:add("a") s:add(1) s:add(true) s:add("a")
    assert.equal(3, #s)
    assert.equal(3, s:len())
    assert.is_true(s:has("a"))
    assert.is_true(s:has(true))
    assert.is_false(s:has(false))
    s:discard("a")
    s:discard("never there")   -- nothing to do, no error
    assert.is_false(s:has("a"))
    s:remove(1)
    local kind, e = kind_of(s.remove, s, 1)
    assert.equal("KeyError", kind)
    assert.matches("set.remove: 1 is not a member", e.message, 1, true)
    assert.same({true}, s:copy())
    assert.equal(true, s:pop())
    assert.equal("KeyError", kind_of(s.pop, s))
  end)

  it("starts from a sequence and keeps insertion order", function()
    local s = m:set{"c", "a", "b", "a"}
    assert.same({"c", "a", "b"}, s:copy())
    local seen = {}
    for v, t in pairs(s) do
      assert.is_true(t)
      seen[#seen + 1] = v
    end
    assert.same({"c", "a", "b"}, seen)
    s:update{"d", "a"}
    assert.same({"c", "a", "b", "d"}, s:copy())
    s:update(m:set{"e"})
    assert.equal(5, #s)
    s:clear()
    assert.equal(0, #s)
    -- nil is no member (n is honoured, so it is seen)
    local kind, e = kind_of(m.set, m, table.pack(nil, 1))
    assert.equal("ValueError", kind)
    assert.matches("must not be nil (item 1)", e.message, 1, true)
  end)

  it("compares numbers as Lua keys: 2.0 is 2, floats by value", function()
    local s = m:set{2, 2.0, 0.5}
    assert.equal(2, #s)
    assert.is_true(s:has(2.0))
    assert.is_true(s:has(0.5))
    assert.equal("integer", math.type(s:copy()[1]))
  end)

  it("compares plain tables by contents, nested, whatever their key order", function()
    local s = m:set()
    s:add({1, 2})
    s:add({1, 2})
    s:add({x = 1, y = {true, "z"}})
    s:add({y = {true, "z"}, x = 1})
    assert.equal(2, #s)
    assert.is_true(s:has({1, 2}))
    assert.is_false(s:has({2, 1}))
    assert.is_false(s:has({1, 2, 3}))
    assert.is_true(s:has({x = 1, y = {true, "z"}}))
    s:discard({1, 2})
    assert.equal(1, #s)
  end)

  it("compares managed objects by identity", function()
    local s = m:set()
    local d, e = m:dict{a = 1}, m:dict{a = 1}
    s:add(d)
    s:add(d)
    assert.equal(1, #s)
    assert.is_true(s:has(d))
    assert.is_false(s:has(e))       -- equal contents, another object
    local back = s:copy()[1]
    back.b = 2                      -- the same object, through the set
    assert.equal(2, d.b)
    s:remove(d)
    assert.equal(0, #s)
  end)

  it("is shared: processes see each other's changes", function()
    local s = m:set()
    local ps = {}
    for i = 1, 4 do
      ps[i] = mp.Process{target = function()
        for j = 1, 25 do s:add(j) s:add("p" .. i) end
      end}
      ps[i]:start()
    end
    for i = 1, 4 do ps[i]:join(30) assert.equal(0, ps[i].exitcode) end
    assert.equal(29, #s)
    -- and it travels through a queue
    local q = mp.Queue()
    q:put(s)
    assert.is_true(q:get():has("p3"))
  end)

  it("rejects what cannot be a member, naming the call", function()
    local s = m:set()
    local ok, e = pcall(function() s:add(nil) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'add' %(a set member must not be nil%)", e)
    ok, e = pcall(function() s:has(0 / 0) end)
    assert.matches("bad argument #1 to 'has' %(a set member must not be NaN%)", e)
    ok, e = pcall(function() s:discard(print) end)
    assert.matches("bad argument #1 to 'discard' %(string, number, boolean " ..
                   "or table expected, got function%)", e)
    ok, e = pcall(function() s:update(5) end)
    assert.matches("bad argument #1 to 'update' %(table expected, got number%)", e)
    -- inside a table: found by the server
    local kind, err = kind_of(s.add, s, {f = print})
    assert.equal("ValueError", kind)
    assert.matches("a set member must be", err.message, 1, true)
    local cyc = {}
    cyc[1] = cyc
    assert.equal("ValueError", kind_of(s.add, s, cyc))
    -- the runtime's objects are no members, inside a table or not
    ok, e = pcall(function() s:add(mp.Queue()) end)
    assert.matches("bad argument #1 to 'add' %(string, number, boolean or " ..
                   "table expected, got multiprocessing.Queue%)", e)
    assert.equal("ValueError", kind_of(s.add, s, {lock = mp.Lock()}))
    -- not encodable at all
    assert.equal("EncodeError", kind_of(s.add, s, {io.stdout}))
    -- wrong self
    ok, e = pcall(function() s.add({}, 1) end)
    assert.is_false(ok)
    assert.matches("add", e)
    assert.equal(0, #s)
  end)

  it("fails clearly once the manager is gone", function()
    local m2 = mp.Manager()
    local s = m2:set{1}
    m2:shutdown()
    local kind = kind_of(s.add, s, 2)
    assert.is_truthy(kind == "EOFError" or kind == "ValueError", kind)
    assert.equal(0, H.zombies())
  end)
end)
