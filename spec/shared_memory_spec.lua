-- SharedMemory: POSIX shared memory as Python's multiprocessing.shared_memory,
-- tested against Debian's /usr/bin/python3 both ways; only the creator
-- cleans up.
local H = require "helpers"
local mp = require "multiprocessing"

local pit = it   -- cross-process (mp.Process)

local our_fds = H.our_fds
local PY = H.python

local err_of = H.err_of

local function exists(name)
  local f = io.open("/dev/shm/" .. name, "rb")
  if f then f:close() return true end
  return false
end

describe("SharedMemory", function()
  it("creates, attaches by name, reads and writes", function()
    local a = mp.SharedMemory{create = true, size = 100}
    assert.matches("^psm_%x%x%x%x%x%x%x%x$", a.name)
    assert.equal(100, a.size)
    assert.is_true(exists(a.name))
    assert.equal(string.rep("\0", 100), a:read())
    assert.equal(5, a:write(10, "hello"))
    local b = mp.SharedMemory(a.name)
    assert.equal(100, b.size)
    assert.equal("hello", b:read(10, 5))
    assert.equal("hello" .. string.rep("\0", 85), b:read(10))
    b:write(0, "X")
    assert.equal("X", a:read(0, 1))
    assert.equal("", a:read(100, 0))
    b:close()
    a:close()
    assert.is_true(a.closed)
    assert.equal("ValueError", err_of(a.read, a, 0, 1).kind)
    assert.is_true(exists(a.name))
    a:unlink()
    assert.is_false(exists(a.name))
  end)

  it("takes a name and the positional form", function()
    local name = "luamp_spec_" .. H.pid()
    local a = mp.SharedMemory(name, true, 10)
    assert.equal(name, a.name)
    assert.matches(name, tostring(a))
    local ok, err = pcall(mp.SharedMemory, {name = name, create = true, size = 10})
    assert.is_false(ok)
    assert.equal("FileExistsError", err.kind)
    a:unlink()
    a:close()
    err = err_of(mp.SharedMemory, name)
    assert.equal("FileNotFoundError", err.kind)
    err = err_of(a.unlink, a)
    assert.equal("FileNotFoundError", err.kind)
  end)

  it("gives clear errors for bad input", function()
    assert.matches("different from zero", tostring(err_of(mp.SharedMemory, {create = true, size = 0})))
    assert.matches("positive", tostring(err_of(mp.SharedMemory, {create = true, size = -5})))
    assert.matches("can only be nil", tostring(err_of(mp.SharedMemory, {})))
    assert.matches("without '/'", tostring(err_of(mp.SharedMemory, {name = "a/b", create = true, size = 1})))
    assert.matches("without '/'", tostring(err_of(mp.SharedMemory, {name = "", create = true, size = 1})))
    assert.matches("number expected", tostring(err_of(mp.SharedMemory, {create = true, size = "big"})))
    local a <close> = mp.SharedMemory{create = true, size = 8}
    assert.matches("offset %-1 out of range", tostring(err_of(a.read, a, -1, 1)))
    assert.matches("go beyond", tostring(err_of(a.read, a, 4, 5)))
    assert.matches("go beyond", tostring(err_of(a.write, a, 6, "abc")))
    assert.matches("out of range", tostring(err_of(a.write, a, 9, "")))
    assert.matches("string expected", tostring(err_of(a.write, a, 0, {})))
    a:unlink()
  end)

  it("is unlinked when its creator exits, not when others do", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local a = mp.SharedMemory{create = true, size = 64}
      local keep = mp.SharedMemory{create = true, size = 64, track = false}
      a:write(0, "from the creator")
      print(a.name, keep.name)
    ]])
    assert.equal(0, code, err)
    local gone, kept = out:match("^(%S+)\t(%S+)\n$")
    assert.is_false(exists(gone))
    assert.is_true(exists(kept))
    -- an attaching process exits: the block stays
    out, err, code = H.script([[
      local mp = require "multiprocessing"
      local b = mp.SharedMemory((...))
      b:write(0, "visited")
    ]], kept)
    assert.equal(0, code, err)
    assert.is_true(exists(kept))
    local b = mp.SharedMemory(kept)
    assert.equal("visited", b:read(0, 7))
    b:unlink()
    assert.is_false(exists(kept))
  end)

  pit("is unlinked when a child that created it exits", function()
    local q = mp.Queue()
    local p = mp.Process{target = function()
      local a = mp.SharedMemory{create = true, size = 16}
      local b = mp.SharedMemory{create = true, size = 16, track = false}
      q:put({a.name, b.name})
    end}
    p:start(); p:join()
    assert.equal(0, p.exitcode)
    local names = q:get(false)
    assert.is_false(exists(names[1]))
    assert.is_true(exists(names[2]))
    mp.SharedMemory(names[2]):unlink()
  end)

  pit("is not unlinked by a child process that exits", function()
    local a = mp.SharedMemory{create = true, size = 16}
    local p = mp.Process{target = function() a:write(0, "child") end}
    p:start(); p:join()
    assert.equal(0, p.exitcode)
    assert.is_true(exists(a.name))
    assert.equal("child", a:read(0, 5))
    a:unlink()
  end)

  it("attaches to a block Python made, and Python to ours", function()
    -- Python creates and writes; luamp attaches, reads, writes back
    local py = os.tmpname() .. ".py"
    H.write(py, [[
import sys, time
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory(create=True, size=4096)
shm.buf[:11] = b"from python"
print(shm.name, flush=True)
for _ in range(200):
    if bytes(shm.buf[100:104]) == b"lua!":
        break
    time.sleep(0.05)
print(bytes(shm.buf[100:104]).decode(), flush=True)
shm.close()
shm.unlink()
]])
    local script = os.tmpname() .. ".lua"
    H.write(script, [[
      local mp = require "multiprocessing"
      local name = io.read("l")
      local b = mp.SharedMemory(name)
      print(b:read(0, 11), b.size)
      b:write(100, "lua!")
      b:close()
      io.read("a")     -- keep the pipe open until Python is done
    ]])
    local pyout = os.tmpname()
    local out, err, code = H.sh(PY .. " " .. H.q(py) .. " | tee " ..
      H.q(pyout) .. " | " .. H.q(H.luamp) .. " " .. H.q(script))
    local seen = H.slurp(pyout)
    os.remove(py); os.remove(script); os.remove(pyout)
    assert.equal(0, code, err)
    assert.equal("from python\t4096\n", out)
    assert.matches("^psm_%x+\nlua!\n$", seen)

    -- luamp creates and writes; Python attaches, reads, writes back
    local a = mp.SharedMemory{create = true, size = 1000}
    a:write(0, "from lua")
    local py2 = os.tmpname() .. ".py"
    H.write(py2, [[
import sys
from multiprocessing import shared_memory, resource_tracker
shm = shared_memory.SharedMemory(name=sys.argv[1])
# Python 3.11 tracks blocks it merely attaches to; keep it from unlinking ours
resource_tracker.unregister(shm._name, "shared_memory")
print(bytes(shm.buf[:8]).decode(), shm.size)
shm.buf[500:506] = b"python"
shm.close()
]])
    local o, e, code = H.sh(PY .. " " .. H.q(py2) .. " " .. a.name)
    os.remove(py2)
    assert.equal(0, code, e)
    assert.equal("from lua 1000\n", o)
    assert.equal("python", a:read(500, 6))
    assert.is_true(exists(a.name))
    a:unlink()
    a:close()
  end)

  it("leaves no fd and no /dev/shm entry after 10^4 blocks", function()
    collectgarbage()
    local fds, shm = our_fds(), H.shm_entries()
    for i = 1, 10000 do
      local a = mp.SharedMemory{create = true, size = 4096}
      a:write(0, tostring(i))
      local b = mp.SharedMemory(a.name)
      assert.equal(tostring(i), b:read(0, #tostring(i)))
      a:unlink()
      if i % 2 == 0 then a:close(); b:close() end
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, our_fds())
    assert.equal(shm, H.shm_entries())
  end)
end)

describe("SharedMemory names (issue 13)", function()
  it("refuses a name with a NUL byte instead of cutting it there", function()
    local name = "luamp_nul_" .. H.pid()
    local a = mp.SharedMemory{name = name, create = true, size = 8}
    a:write(0, "real")
    -- attaching to "<name>\0x" attached to <name> itself before
    local err = err_of(mp.SharedMemory, {name = name .. "\0x"})
    assert.equal("ValueError", err.kind)
    assert.matches("SharedMemory: name contains a NUL byte", err.message)
    err = err_of(mp.SharedMemory, name .. "\0", true, 8)
    assert.equal("ValueError", err.kind)
    err = err_of(mp.SharedMemory, {name = "\0" .. name, create = true, size = 8})
    assert.equal("ValueError", err.kind)
    assert.is_true(exists(name))
    assert.equal("real", a:read(0, 4))
    a:unlink()
    a:close()
  end)
end)
