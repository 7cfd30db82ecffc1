-- mp.shared_memory.ShareableList (issue 17): Python's layout, tested
-- against Debian's /usr/bin/python3 both ways; items, assignment rules,
-- errors, travelling.
local H = require "helpers"
local mp = require "multiprocessing"

local SL = mp.shared_memory.ShareableList
local err_of, PY = H.err_of, H.python

local function exists(name)
  local f = io.open("/dev/shm/" .. name, "rb")
  if f then f:close() return true end
  return false
end

local function drop(sl)
  pcall(sl.shm.unlink, sl.shm)
  sl.shm:close()
end

describe("ShareableList", function()
  it("holds integers, floats, booleans, strings and nil, 1-based", function()
    local sl = SL(table.pack(7, 2.5, true, false, nil, "héllo", "\255bin", ""))
    assert.matches("^psm_%x+$", sl.shm.name)
    assert.equal(8, #sl)
    assert.equal(7, sl[1]); assert.equal("integer", math.type(sl[1]))
    assert.equal(2.5, sl[2]); assert.equal("float", math.type(sl[2]))
    assert.is_true(sl[3]); assert.is_false(sl[4]); assert.is_nil(sl[5])
    assert.equal("héllo", sl[6]); assert.equal("\255bin", sl[7]); assert.equal("", sl[8])
    assert.is_nil(sl[9])                  -- #sl + 1: nil, so ipairs stops
    assert.equal("qdxxxxxxx?xxxxxxx?xxxxxx?x8s8s8s", sl.format)
    assert.same({n = 8, 7, 2.5, true, false, nil, "héllo", "\255bin", ""}, sl:totable())
    local seen = {}
    for i, v in pairs(sl) do seen[#seen + 1] = i .. "=" .. tostring(v) end
    assert.equal("1=7 2=2.5 3=true 4=false 5=nil 6=héllo 7=\255bin 8=",
                 table.concat(seen, " "))
    assert.equal(1, sl:count(nil))
    assert.equal(1, sl:count(7.0))        -- Lua's equality: 7 == 7.0
    assert.equal(0, sl:count("nope"))
    assert.equal(4, sl:index(false))
    assert.equal(6, sl:index("héllo"))
    local err = err_of(sl.index, sl, "nope")
    assert.equal("ValueError", err.kind)
    assert.matches('"nope" is not in the list', err.message)
    assert.matches("ShareableList%({7, 2.5, true, false, nil, \"héllo\"", tostring(sl))
    drop(sl)

    local empty = SL{}
    assert.equal(0, #empty)
    assert.equal(16, empty.shm.size)
    assert.equal("", empty.format)
    drop(empty)
    local also = SL()
    assert.equal(0, #also)
    drop(also)
  end)

  it("is Python's layout, byte for byte", function()
    local sl = SL{1, "abcdefgh", true}
    -- N, offsets {0, 8, 24, 32}, data, formats, codes
    local want = string.pack("=i8i8i8i8i8", 3, 0, 8, 24, 32) ..
      string.pack("=i8", 1) .. "abcdefgh" .. ("\0"):rep(8) .. ("\0"):rep(7) .. "\1" ..
      "q\0\0\0\0\0\0\0" .. "16s\0\0\0\0\0" .. "xxxxxxx?" .. "\0\1\0"
    assert.equal(#want, sl.shm.size)
    assert.equal(want, sl.shm:read())
    drop(sl)
  end)

  it("assigns with Python's size rules", function()
    local sl = SL{"sixteen bytes ok", 1, "x"}   -- slots 24, 8, 8
    sl[1] = 42                -- a number takes a string's slot
    assert.equal(42, sl[1])
    sl[1] = string.rep("y", 24)   -- the slot kept its 24 bytes
    assert.equal(string.rep("y", 24), sl[1])
    sl[2] = "8 bytes!"        -- a number's slot holds 8 bytes of string
    assert.equal("8 bytes!", sl[2])
    sl[2] = 2.5; assert.equal(2.5, sl[2])
    sl[2] = true; assert.is_true(sl[2])
    sl[2] = nil; assert.is_nil(sl[2])
    sl[3.0] = "z"             -- an integral float index is an index
    assert.equal("z", sl[3])
    assert.equal("24sxxxxxx?x8s", sl.format)

    local err = err_of(function() sl[2] = "nine byte" end)
    assert.equal("ValueError", err.kind)
    assert.matches("a string of 9 bytes exceeds item 2's storage %(8 bytes%)", err.message)
    err = err_of(function() sl[1] = "ends in NUL\0" end)
    assert.equal("ValueError", err.kind)
    assert.matches("ends in a NUL byte", err.message)
    for _, bad in ipairs{{}, print, io.stdout, coroutine.create(print)} do
      local msg = tostring(err_of(function() sl[1] = bad end))
      assert.matches("bad argument #3 to '__newindex' %(item 1 is a", msg)
      assert.matches("holds integers, floats, booleans, strings and nil", msg)
    end
    for _, i in ipairs{0, 4, -1} do
      err = err_of(function() sl[i] = 1 end)
      assert.equal("ValueError", err.kind)
      assert.is_truthy(err.message:find("ShareableList index " .. i .. " out of range 1..3", 1, true))
    end
    for _, i in ipairs{0, 5, -1} do
      err = err_of(function() return sl[i] end)
      assert.equal("ValueError", err.kind)
    end
    err = err_of(function() return sl[1.5] end)
    assert.equal("ValueError", err.kind)
    assert.matches("index must be an integer", err.message)
    err = err_of(function() sl.x = 1 end)
    assert.equal("ValueError", err.kind)
    assert.matches("cannot set field 'x'", err.message)
    -- nothing changed by the failed assignments
    assert.same({n = 3, string.rep("y", 24), nil, "z"}, sl:totable())
    drop(sl)
  end)

  it("attaches by name, and is made under a given name", function()
    local name = "luamp_sl_" .. H.pid()
    local sl = SL({10, "ten"}, {name = name})
    assert.equal(name, sl.shm.name)
    local other = SL{name = name}
    assert.same({n = 2, 10, "ten"}, other:totable())
    other[1] = 11
    assert.equal(11, sl[1])
    local third = SL(nil, {name = name})
    assert.equal(2, #third)
    do
      local scoped <close> = SL{name = name}
      assert.equal(11, scoped[1])
      third = scoped
    end
    assert.is_true(third.shm.closed)    -- <close> unmapped it, unlinked nothing
    assert.is_true(exists(name))
    assert.equal("FileExistsError", err_of(SL, {1}, {name = name}).kind)
    third.shm:close(); other.shm:close()
    drop(sl)
    assert.is_false(exists(name))
    assert.equal("FileNotFoundError", err_of(SL, {name = name}).kind)
  end)

  it("raises clear errors for bad arguments, a foreign block and a closed one", function()
    assert.matches("bad argument #1 to 'ShareableList' %(table expected, got number%)",
                   tostring(err_of(SL, 5)))
    assert.matches("bad argument #1 to 'ShareableList' %(item 2 is a function",
                   tostring(err_of(SL, {1, print})))
    assert.matches("bad argument #2 to 'ShareableList' %(unknown option 'size'%)",
                   tostring(err_of(SL, {1}, {size = 3})))
    assert.matches("bad argument #2 to 'ShareableList' %(options table expected",
                   tostring(err_of(SL, {1}, "name")))
    assert.matches("name must be a string", tostring(err_of(SL, {name = 5})))
    assert.matches("a sequence with a 'name' field", tostring(err_of(SL, {1, name = "x"})))
    local err = err_of(SL, {string.rep("x", 9999992)})
    assert.equal("ValueError", err.kind)
    assert.matches("at most 9999991", err.message)
    err = err_of(SL, {"x\0"})
    assert.equal("ValueError", err.kind)

    -- a block that is not a list: refused, however its bytes lie
    local shm = mp.SharedMemory{create = true, size = 64}
    for _, header in ipairs{string.pack("=i8", 1000), string.pack("=i8", -1),
                            string.pack("=i8i8i8", 1, 8, 0),
                            string.pack("=i8i8i8", 1, 0, 1000)} do
      shm:write(0, header .. ("\0"):rep(64 - #header))
      err = err_of(SL, {name = shm.name})
      assert.equal("ValueError", err.kind)
      assert.matches("block '" .. shm.name .. "' holds no ShareableList", err.message)
    end
    -- a well-formed list whose item has a format Python never writes
    shm:write(0, string.pack("=i8i8i8", 1, 0, 8) .. ("\0"):rep(8) .. "zz\0\0\0\0\0\0" .. "\0")
    local odd = SL{name = shm.name}
    err = err_of(function() return odd[1] end)
    assert.equal("ValueError", err.kind)
    assert.matches("format 'zz'", err.message)
    shm:unlink(); shm:close()
    odd.shm:close()
    local tiny = mp.SharedMemory{create = true, size = 8}
    assert.equal("ValueError", err_of(SL, {name = tiny.name}).kind)
    tiny:unlink(); tiny:close()

    local sl = SL{1, 2}
    sl.shm:close()
    err = err_of(function() return sl[1] end)
    assert.equal("ValueError", err.kind)
    assert.matches("closed", err.message)
    assert.equal("ValueError", err_of(function() sl[1] = 3 end).kind)
    assert.equal("ValueError", err_of(sl.count, sl, 1).kind)
    assert.matches("closed", tostring(sl))
    assert.matches("calling 'count' on bad self", tostring(err_of(sl.count, 5)))
    sl.shm:unlink()
  end)

  it("is read by Python's ShareableList(name=), and reads Python's", function()
    local sl = SL(table.pack(-7, 2.5, true, false, nil, "héllo", "\255\0bin", "",
                             string.rep("z", 8), math.maxinteger))
    local py = os.tmpname() .. ".py"
    H.write(py, [[
import sys
from multiprocessing import shared_memory, resource_tracker
sl = shared_memory.ShareableList(name=sys.argv[1])
# Python 3.11 tracks blocks it merely attaches to; keep it from unlinking ours
resource_tracker.unregister(sl.shm._name, "shared_memory")
print(repr(list(sl)), sl.format, len(sl), sl.shm.size)
sl[0] = "py"; sl[2] = 3.25; sl[4] = b"\x01\x02"; sl[8] = None; sl[1] = True
print(sl.count(None), sl.index(False))
sl.shm.close()
s2 = shared_memory.ShareableList([1, -2.0, "x", b"y\xff", None, True, "abcdefghij", 2**63 - 1])
resource_tracker.unregister(s2.shm._name, "shared_memory")
print(s2.shm.name, s2.shm.size)
s2.shm.close()
]])
    local out, err, code = H.sh(PY .. " " .. H.q(py) .. " " .. sl.shm.name)
    assert.equal(0, code, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal("[-7, 2.5, True, False, None, 'héllo', b'\\xff\\x00bin', '', " ..
                 "'zzzzzzzz', 9223372036854775807] qdxxxxxxx?xxxxxxx?xxxxxx?x8s8s8s16sq 10 " ..
                 sl.shm.size, lines[1])
    assert.equal("1 3", lines[2])
    -- Python's writes, read here
    assert.same({n = 10, "py", true, 3.25, false, "\1\2", "héllo", "\255\0bin", "",
                 nil, math.maxinteger}, sl:totable())
    -- Python's list, read and written here
    local name, size = lines[3]:match("^(psm_%x+) (%d+)$")
    assert.is_truthy(name, out)
    local theirs = SL{name = name}
    assert.equal(tonumber(size), theirs.shm.size)
    assert.same({n = 8, 1, -2.0, "x", "y\255", nil, true, "abcdefghij", math.maxinteger},
                theirs:totable())
    assert.equal("float", math.type(theirs[2]))
    -- the same items made here take the same bytes as Python's
    local ours = SL(table.pack(1, -2.0, "x", "y\255", nil, true, "abcdefghij", math.maxinteger))
    assert.equal(theirs.shm:read(), ours.shm:read())
    drop(ours)
    theirs[3] = "from lua"
    theirs[5] = 99
    H.write(py, [[
import sys
from multiprocessing import shared_memory, resource_tracker
sl = shared_memory.ShareableList(name=sys.argv[1])
resource_tracker.unregister(sl.shm._name, "shared_memory")
print(repr(list(sl)))
sl.shm.close()
]])
    out, err, code = H.sh(PY .. " " .. H.q(py) .. " " .. name)
    os.remove(py)
    assert.equal(0, code, err)
    assert.equal("[1, -2.0, 'from lua', b'y\\xff', 99, True, 'abcdefghij', 9223372036854775807]\n", out)
    drop(theirs)
    drop(sl)
  end)
end)

describe("ShareableList travelling", function()
  it("goes through queues and to pool tasks, attached on arrival", function()
    -- a pool forked before the shared_memory module was loaded
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local pool <close> = mp.Pool(1)
      local sl = mp.shared_memory.ShareableList{1, "two", 3.0}
      local back = pool:apply(function(l) l[1] = #l * 100; return l end, {sl})
      print(sl[1], back[2], back.shm.name == sl.shm.name)
      local q = mp.Queue()
      local p = mp.Process{target = function() local l = q:get(); l[2] = "dos" end}
      p:start(); q:put(sl); p:join()
      print(sl[2], p.exitcode)
      print(select(2, pcall(mp.decode, mp.encode(sl))).kind)
      sl.shm:close()
      print(select(2, pcall(mp.encode, {sl})).kind)
      sl.shm:unlink()
    ]])
    assert.equal(0, code, err)
    assert.equal("300\ttwo\ttrue\ndos\t0\nDecodeError\nEncodeError\n", out)
  end)
end)
