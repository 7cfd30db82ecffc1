-- Value, Array, RawValue, RawArray: typecodes, ranges, indexing, locks,
-- atomics, processes on both sides.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local pit = it   -- cross-process (mp.Process)

local our_fds = H.our_fds

local err_of = H.err_of

describe("Value", function()
  it("holds every typecode with its range", function()
    local cases = {
      {"b", -128, 127}, {"B", 0, 255}, {"h", -32768, 32767}, {"H", 0, 65535},
      {"i", -2147483648, 2147483647}, {"I", 0, 4294967295},
      {"l", math.mininteger, math.maxinteger},
      {"q", math.mininteger, math.maxinteger},
    }
    for _, c in ipairs(cases) do
      local tc, lo, hi = c[1], c[2], c[3]
      local v = mp.Value(tc)
      assert.equal(0, v.value)
      v.value = lo
      assert.equal(lo, v.value)
      v.value = hi
      assert.equal(hi, v.value)
      assert.equal("integer", math.type(v.value))
      if hi < math.maxinteger then
        assert.matches("out of range", tostring(err_of(function() v.value = hi + 1 end)))
        assert.matches("out of range", tostring(err_of(function() v.value = lo - 1 end)))
      end
      assert.equal(tc, v.typecode)
    end
    -- unsigned 64-bit: Lua's integers with the same bits
    local q = mp.Value("Q", -1)
    assert.equal(-1, q.value)
    assert.equal("18446744073709551615", string.format("%u", q.value):gsub("%-", ""))
    assert.equal(5, mp.Value("L", 5).value)
  end)

  it("holds floats and chars", function()
    local d = mp.Value("d", 1.5)
    assert.equal(1.5, d.value)
    d.value = 3
    assert.equal("float", math.type(d.value))
    local f = mp.Value("f", 0.1)
    assert.is_true(math.abs(f.value - 0.1) < 1e-7)
    assert.equal(0.0, mp.Value("d").value)
    local c = mp.Value("c", "x")
    assert.equal("x", c.value)
    c.value = 65
    assert.equal("A", c.value)
    assert.equal("\0", mp.Value("c").value)
    assert.matches("one%-byte string", tostring(err_of(mp.Value, "c", "xy")))
  end)

  it("gives clear errors for bad input", function()
    assert.matches("bad typecode 'x'", tostring(err_of(mp.Value, "x")))
    assert.matches("bad typecode 'ii'", tostring(err_of(mp.Value, "ii")))
    assert.matches("string expected", tostring(err_of(mp.Value, 5)))
    assert.matches("number expected", tostring(err_of(mp.Value, "i", "7")))
    assert.matches("no integer representation",
                   tostring(err_of(mp.Value, "i", 1.5)))
    assert.equal(3, mp.Value("i", 3.0).value)
    local v = mp.Value("i")
    assert.matches("only 'value'", tostring(err_of(function() v.other = 1 end)))
    assert.is_true(mp.is_error(err_of(function() v.other = 1 end), "ValueError"))
    assert.matches("Value or Array expected", tostring(err_of(v.get_lock, io.stdout)))
    assert.matches("Value expected", tostring(err_of(v.add, mp.Lock(), 1)))
    assert.matches("lock must be", tostring(err_of(mp.Value, "i", 0, {lock = 5})))
    v:close()
    assert.equal("ValueError", err_of(function() return v.value end).kind)
  end)

  it("has an RLock unless asked otherwise", function()
    local v = mp.Value("i", 1)
    local l = v:get_lock()
    assert.is_true(l == v:get_lock())
    assert.matches("RLock", tostring(l))
    l:acquire(); l:acquire(); l:release(); l:release()
    v:with(function() v.value = v.value + 1 end)
    assert.equal(2, v.value)
    do
      local g <close> = v:guard()
      assert.is_true(l:locked())
    end
    assert.is_false(l:locked())
    local own = mp.Lock()
    assert.is_true(mp.Value("i", 0, {lock = own}):get_lock() == own)
    local raw = mp.Value("i", 0, {lock = false})
    assert.equal("ValueError", err_of(raw.get_lock, raw).kind)
    assert.matches("RawValue", tostring(mp.RawValue("d", 1)))
    assert.equal("ValueError", err_of(mp.RawValue("i").get_lock, mp.RawValue("i")).kind)
    assert.equal(7, mp.Value{typecode = "i", value = 7, lock = false}.value)
  end)

  it("adds and compares-and-swaps atomically", function()
    local v = mp.Value("i", 10)
    assert.equal(15, v:add(5))
    assert.equal(12, v:add(-3))
    assert.is_true(v:compare_and_swap(12, 20))
    assert.is_false(v:compare_and_swap(12, 30))
    assert.equal(20, v.value)
    local b = mp.Value("b", 120)
    assert.matches("out of range", tostring(err_of(b.add, b, 10)))
    assert.equal(120, b.value)
    local u = mp.Value("Q", -2)          -- 2^64 - 2
    assert.equal(-1, u:add(1))
    assert.matches("out of range", tostring(err_of(u.add, u, 1)))
    local d = mp.Value("d", 1)
    assert.equal("ValueError", err_of(d.add, d, 1).kind)
    assert.equal("ValueError", err_of(d.compare_and_swap, d, 1, 2).kind)
  end)

  pit("counts exactly when two processes add under get_lock", function()
    local v = mp.Value("i", 0)
    local function work()
      for _ = 1, 20000 do
        v:get_lock():with(function() v.value = v.value + 1 end)
      end
    end
    local p = mp.Process{target = work}
    p:start()
    work()
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal(40000, v.value)
  end)

  pit("counts exactly with add() and no lock", function()
    local v = mp.RawValue("q", 0)
    local function work() for _ = 1, 50000 do v:add(1) end end
    local p = mp.Process{target = work}
    p:start()
    work()
    p:join()
    assert.equal(100000, v.value)
  end)
end)

describe("Array", function()
  it("indexes from 1, has a length and ipairs", function()
    local a = mp.Array("i", {10, 20, 30})
    assert.equal(3, #a)
    assert.equal(10, a[1])
    a[3] = 33
    local seen = {}
    for i, x in ipairs(a) do seen[i] = x end
    assert.same({10, 20, 33}, seen)
    assert.same({10, 20, 33}, a:totable())
    assert.same({20, 33}, a:totable(2))
    assert.same({20}, a:totable(2, 2))
    assert.is_nil(a[4])                  -- the end, as for a table
    assert.matches("out of range 1..3", tostring(err_of(function() return a[5] end)))
    assert.matches("out of range 1..3", tostring(err_of(function() return a[0] end)))
    assert.matches("out of range 1..3", tostring(err_of(function() a[4] = 1 end)))
    assert.matches("must be an integer", tostring(err_of(function() return a[1.5] end)))
    -- error objects of the contract, not strings
    assert.is_true(mp.is_error(err_of(function() return a[5] end), "ValueError"))
    assert.is_true(mp.is_error(err_of(function() a[0] = 1 end), "ValueError"))
    assert.is_true(mp.is_error(err_of(function() return a[1.5] end), "ValueError"))
    assert.is_true(mp.is_error(err_of(function() a.other = 1 end), "ValueError"))
    assert.matches("out of range", tostring(err_of(function() a[1] = 2^40 end)))
    local z = mp.Array("d", 4)
    assert.same({0.0, 0.0, 0.0, 0.0}, z:totable())
    assert.equal(0, #mp.Array("i", 0))
  end)

  it("gives clear errors for bad sizes and elements", function()
    assert.matches("negative size", tostring(err_of(mp.Array, "i", -1)))
    assert.matches("size or table", tostring(err_of(mp.Array, "i", "abc")))
    assert.matches("element 2 is nil", tostring(err_of(mp.Array, "i", {1, nil, 3, n = 3})))
    assert.matches("number expected", tostring(err_of(mp.Array, "i", {1, "x"})))
    assert.matches("bad typecode", tostring(err_of(mp.Array, "z", 3)))
    assert.matches("too large", tostring(err_of(mp.Array, "d", 2^50)))
  end)

  it("holds bytes as a 'c' Array", function()
    local a = mp.Array("c", "hello")
    assert.equal(5, #a)
    assert.equal("h", a[1])
    assert.equal("hello", a.value)
    a.value = "hi"
    assert.equal("hi", a.value)
    assert.equal("hi\0lo", a.raw)
    assert.matches("too long", tostring(err_of(function() a.value = "toolong" end)))
    assert.equal(3, #mp.Array("c", 3))
  end)

  it("has a lock unless raw", function()
    local a = mp.Array("d", 3)
    a:with(function() a[1] = 1 end)
    assert.matches("RLock", tostring(a:get_lock()))
    local raw = mp.RawArray("i", {1, 2})
    assert.equal("ValueError", err_of(raw.get_lock, raw).kind)
    assert.same({1, 2}, raw:totable())
    assert.same({0, 0}, mp.Array{typecode = "i", size = 2}:totable())
    assert.same({5}, mp.Array{typecode = "i", init = {5}}:totable())
    assert.same({5}, mp.RawArray{typecode = "i", init = {5}}:totable())
  end)

  pit("is shared with child processes", function()
    local a = mp.Array("i", 10)
    local ps = {}
    for k = 1, 2 do
      ps[k] = mp.Process{target = function()
        for _ = 1, 1000 do
          a:with(function()
            for i = 1, #a do a[i] = a[i] + k end
          end)
        end
      end}
      ps[k]:start()
    end
    for k = 1, 2 do ps[k]:join() end
    for i = 1, 10 do assert.equal(3000, a[i]) end
  end)
end)

describe("get_obj (issue 17)", function()
  pit("gives the object behind the lock: same memory, in every process", function()
    local v, a = mp.Value("i", 1), mp.Array("d", {1.5, 2.5})
    local rv, ra = v:get_obj(), a:get_obj()
    assert.is_true(rawequal(rv, v))
    assert.is_true(rawequal(ra, a))
    a:with(function() ra[2] = ra[2] * 2 end)
    assert.equal(5.0, a[2])
    local p = mp.Process{target = function()
      v:get_lock():with(function() v:get_obj().value = 41 end)
      a:get_obj()[1] = -1.5
    end}
    p:start(); p:join()
    assert.equal(0, p.exitcode)
    assert.equal(41, rv.value)
    assert.same({-1.5, 5.0}, ra:totable())
    -- raw ones too (Python's raw object has none; here it is itself)
    local raw = mp.RawArray("c", "ab")
    assert.equal("ab", raw:get_obj().value)
    assert.equal(7, mp.Value("i", 7, {lock = false}):get_obj().value)
  end)

  it("raises on a wrong self and on a closed object", function()
    local v = mp.Value("i", 1)
    assert.matches("bad argument #1 to 'get_obj' %(multiprocessing.Value or Array expected",
                   tostring(err_of(function() return v.get_obj(io.stdout) end)))
    assert.matches("Value or Array expected", tostring(err_of(v.get_obj, mp.Lock())))
    v:close()
    local err = err_of(v.get_obj, v)
    assert.equal("ValueError", err.kind)
    assert.matches("closed", err.message)
    local a = mp.Array("i", 2)
    a:close()
    assert.equal("ValueError", err_of(a.get_obj, a).kind)
  end)
end)

describe("Values as handles", function()
  it("keep identity and their lock", function()
    local l = mp.RLock()
    local v = mp.Value("i", 1, {lock = l})
    local a = mp.Array("d", {1, 2})
    local t = mp.decode(mp.encode({v, a, l}), {trusted = true})
    assert.is_true(t[1] == v and t[2] == a and t[3] == l)
    assert.is_true(t[1]:get_lock() == l)
  end)

  it("reach a process that attaches by handle", function()
    local own = mp.Lock()
    local v = mp.Value("i", 41, {lock = own})
    local a = mp.Array("i", {1, 2, 3})
    local hex = mp.encode({v, a}):gsub(".", function(c)
      return string.format("%02x", c:byte())
    end)
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local s = (...):gsub("..", function(h) return string.char(tonumber(h, 16)) end)
      local t = mp.decode(s, {trusted = true})
      t[1]:with(function() t[1].value = t[1].value + 1 end)
      t[2][2] = 20
      print(t[1].value, tostring(t[1]:get_lock()):match("^<(%a+)"), #t[2])
    ]], hex)
    assert.equal(0, code, err)
    assert.equal("42\tLock\t3\n", out)
    assert.equal(42, v.value)
    assert.same({1, 20, 3}, a:totable())
  end)

  it("leave no fd or mapping after 10^4 create/destroy cycles", function()
    collectgarbage()
    local fds, arenas = our_fds(), core.arena_count()
    for i = 1, H.soak(10000) do
      local v = mp.Value("i", i)
      local a = mp.Array("d", 16)
      v:get_lock():acquire()
      v:get_lock():release()
      a[16] = v.value
      if i % 2 == 0 then v:close(); a:close() end
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, our_fds())
    assert.equal(arenas, core.arena_count())
  end)
end)
