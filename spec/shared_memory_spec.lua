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

  it("gives the errno of a failed open or unlink, as OSError's kin", function()
    local name = "luamp_spec_errno_" .. H.pid()
    local a = mp.SharedMemory(name, true, 10)
    local err = err_of(mp.SharedMemory, {name = name, create = true, size = 10})
    assert.equal("FileExistsError", err.kind)
    assert.equal(17, err.errno)                       -- EEXIST
    assert.matches("shared memory '" .. name .. "'", err.message, 1, true)
    a:unlink()
    err = err_of(mp.SharedMemory, name)
    assert.equal("FileNotFoundError", err.kind)
    assert.equal(2, err.errno)                        -- ENOENT
    err = err_of(a.unlink, a)
    assert.equal("FileNotFoundError", err.kind)
    assert.equal(2, err.errno)
    a:close()
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

  -- The leak checks' count (H.shm_entries): a block that another program
  -- makes and holds meanwhile -- another suite running beside this one --
  -- does not count; one a leak of ours leaves, held or not, does.
  it("counts in leak checks our leftover blocks, not other programs' live ones", function()
    local n0 = H.shm_entries()
    local name = string.format("psm_%08x", math.random(0, 0x7fffffff))
    local ready = os.tmpname()
    local script = H.write(os.tmpname() .. ".lua", string.format([[
      local mp = require "multiprocessing"
      local b = mp.SharedMemory{name = %q, create = true, size = 4096}
      io.open(%q, "w"):write("up"):close()
      require("multiprocessing.core").sleep(60)
    ]], name, ready))
    -- (its shell exits at once: not a process of this one's tree)
    local pid = tonumber(H.sh(string.format("%s %s >/dev/null 2>&1 </dev/null & echo $!",
                                            H.q(H.luamp), H.q(script))):match("%d+"))
    local ok, err = pcall(function()
      assert.is_true(H.eventually(function() return H.slurp(ready) == "up" end, 20))
      assert.is_true(exists(name))
      assert.equal(n0, H.shm_entries())
      -- ours, mapped; then unmapped and left behind; then unlinked
      local a = mp.SharedMemory{create = true, size = 4096, track = false}
      assert.equal(n0 + 1, H.shm_entries())
      a:close()
      assert.equal(n0 + 1, H.shm_entries())
      mp.SharedMemory(a.name):unlink()
      assert.equal(n0, H.shm_entries())
    end)
    H.sh("kill -9 " .. pid)
    H.eventually(function() return not H.alive(pid) end, 10)
    os.remove("/dev/shm/" .. name)
    os.remove(ready)
    os.remove(script)
    assert(ok, err)
  end)

  it("leaves no fd and no /dev/shm entry after 10^4 blocks", function()
    collectgarbage()
    local fds, shm = our_fds(), H.shm_entries()
    for i = 1, H.soak(10000) do
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

describe("SharedMemory of a killed owner (issue 13)", function()
  for _, how in ipairs{{"kill", -9}, {"terminate", -15}} do
    pit("is unlinked when a child that created it is killed (" .. how[1] .. ")", function()
      collectgarbage()
      local fds, zombies = our_fds(), H.zombies()
      local q = mp.Queue()
      local p = mp.Process{target = function()
        local a = mp.SharedMemory{create = true, size = 4096}
        local b = mp.SharedMemory{create = true, size = 4096, track = false}
        q:put({a.name, b.name})
        H.sleep(60)
      end}
      p:start()
      local names = q:get(true, 10)
      assert.is_true(exists(names[1]))
      p[how[1]](p)
      p:join(10)
      assert.equal(how[2], p.exitcode)
      -- gone when join returns (before: it stayed in /dev/shm for good)
      assert.is_false(exists(names[1]))
      assert.is_true(exists(names[2]))   -- untracked: the user's to unlink
      mp.SharedMemory(names[2]):unlink()
      q:close()
      collectgarbage(); collectgarbage()
      assert.equal(fds, our_fds())
      assert.equal(zombies, H.zombies())
    end)
  end

  pit("is kept while another live process owns it (track), and given up by untrack", function()
    local q, go = mp.Queue(), mp.Event()
    local p = mp.Process{target = function()
      local a = mp.SharedMemory{create = true, size = 64}
      local b = mp.SharedMemory{create = true, size = 64}
      a:write(0, "handed on")
      assert(b:untrack() == true)      -- b: ownership given up
      q:put({a.name, b.name})
      H.sleep(60)
    end}
    -- a second owner in another process: registers, then waits
    local r = mp.Queue()
    p:start()
    local names = q:get(true, 10)
    local c = mp.Process{target = function()
      local a = mp.SharedMemory(names[1])
      a:track()
      r:put("owned")
      go:wait(30)
    end}
    c:start()
    assert.equal("owned", r:get(true, 10))
    -- this process takes ownership of a too, and gives it up again
    local mine = mp.SharedMemory(names[1])
    mine:track()
    assert.is_true(mine:untrack())
    assert.is_false(mine:untrack())
    p:kill(); p:join(10)
    assert.equal(-9, p.exitcode)
    H.sleep(0.6)          -- the tracker's rounds too
    assert.is_true(exists(names[1]), "unlinked while c owned it")
    assert.equal("handed on", mine:read(0, 9))
    assert.is_true(exists(names[2]), "unlinked after untrack")
    -- the last owner killed: now it goes
    c:kill(); c:join(10)
    assert.is_false(exists(names[1]))
    assert.is_true(exists(names[2]))
    mp.SharedMemory(names[2]):unlink()
    mine:close()
  end)

  pit("is not unlinked for a dead owner once the name holds another block", function()
    local q = mp.Queue()
    local p = mp.Process{target = function()
      local a = mp.SharedMemory{create = true, size = 64}
      q:put(a.name)
      H.sleep(60)
    end}
    p:start()
    local name = q:get(true, 10)
    -- unlinked behind luamp's back (by Python, say) and made again
    os.remove("/dev/shm/" .. name)
    local again = mp.SharedMemory{name = name, create = true, size = 64, track = false}
    p:kill(); p:join(10)
    assert.is_true(exists(name))
    again:unlink()
  end)

  it("is unlinked when the whole program is SIGKILLed, its first process included", function()
    local out, err = H.sh(H.q(H.luamp) .. " -e " .. H.q([[
      local mp = require "multiprocessing"
      local a = mp.SharedMemory{create = true, size = 64}
      local q = mp.Queue()
      local p = mp.Process{target = function()
        local b = mp.SharedMemory{create = true, size = 64}
        q:put(b.name)
        require("multiprocessing.core").sleep(60)
      end, daemon = true}
      p:start()
      print(a.name, q:get(true, 10))
      io.stdout:flush()
      -- the child first, then this first process itself
      os.execute("kill -9 " .. p.pid .. " " .. mp.current_process().pid)
    ]]))
    local a, b = out:match("^(%S+)\t(%S+)\n$")
    assert.is_truthy(a, out .. err)
    -- the tracker notices the deaths within a few of its rounds
    assert.is_truthy(H.eventually(function()
      return not exists(a) and not exists(b)
    end, 5), "left in /dev/shm")
  end)
end)

describe("SharedMemory's tracker process (issue 13)", function()
  pit("holds no fd and no shared memory of the program", function()
    local r, w = mp.Pipe(false)
    local a = mp.SharedMemory{create = true, size = 1 << 20}   -- starts it
    local found, pids = 0, H.eventually(function()
      local o = H.sh("env -u LD_PRELOAD pgrep -x luamp-shmtrack")
      return o:match("%d") and o
    end, 5) or ""
    for pid in pids:gmatch("%d+") do
      local fds = H.sh("ls -l /proc/" .. pid .. "/fd 2>/dev/null")
      local maps = H.slurp("/proc/" .. pid .. "/maps") or ""
      if maps ~= "" then
        found = found + 1
        for target in fds:gmatch("%-> ([^\n]+)") do
          assert.equal("/dev/null", target)
        end
        local shared = 0
        for perms in maps:gmatch("%x+%-%x+ (%S+)") do
          if perms:sub(4, 4) == "s" then shared = shared + 1 end
        end
        assert.equal(1, shared, "shared mappings of tracker " .. pid)   -- its table
      end
    end
    assert.is_true(found >= 1, "no tracker running")
    -- the write end's only holder closes it: the reader sees EOF
    w:close()
    assert.equal("EOFError", select(2, pcall(r.recv, r)).kind)
    a:unlink()
  end)

  H.once(it, "does not keep the program's heap (a fork of it would, copy-on-write)", function()
    if H.sanitized() then
      pending("ASan's allocator is not the brk heap the tracker gives back")
      return
    end
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local t = {}
      for i = 1, 1000000 do t[i] = "item " .. i .. string.rep("x", 80) end
      local a = mp.SharedMemory{create = true, size = 64}   -- forks the tracker
      local function rss(pid)
        local f = io.open("/proc/" .. pid .. "/status")
        local kb = f and tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
        if f then f:close() end
        return kb
      end
      local p = io.popen("env -u LD_PRELOAD pgrep -n -x luamp-shmtrack")
      local pid = p:read("l")
      p:close()
      require("multiprocessing.core").sleep(0.3)
      print(rss("self"), rss(pid))
      a:unlink()
    ]])
    assert.equal(0, code, err)
    local mine, its = out:match("^(%d+)\t(%d+)\n$")
    assert.is_truthy(mine, out)
    mine, its = tonumber(mine), tonumber(its)
    assert.is_true(mine > 100000, "the program's heap is only " .. mine .. " kB")
    assert.is_true(its < mine / 2, "tracker " .. its .. " kB, program " .. mine .. " kB")
  end)
end)

describe("SharedMemory travelling (issue 17)", function()
  pit("goes through a Queue and a Pipe by name, arriving attached", function()
    local a = mp.SharedMemory{create = true, size = 64}
    a:write(0, "parent")
    local q, done = mp.Queue(), mp.Queue()
    local r, w = mp.Pipe(false)
    local p = mp.Process{target = function()
      local got = q:get(true, 30)
      got:write(6, " queue")
      local via_pipe = r:recv()
      via_pipe:write(12, " pipe")
      done:put({got.name, got.size, via_pipe:read(0, 17)})
      got:close(); via_pipe:close()
    end}
    p:start()
    q:put(a)
    w:send(a)
    local info = done:get(true, 30)
    p:join(30)
    assert.equal(0, p.exitcode)
    assert.same({a.name, 64, "parent queue pipe"}, info)
    assert.equal("parent queue pipe", a:read(0, 17))
    -- the receiver owned nothing: its exit unlinked nothing
    assert.is_true(exists(a.name))
    a:unlink(); a:close()
  end)

  it("goes to Pool tasks as an argument and comes back as a result", function()
    local a = mp.SharedMemory{create = true, size = 32}
    local pool <close> = mp.Pool(1)
    local s, size, back = pool:apply(function(shm)
      shm:write(0, "worker")
      return shm:read(0, 6), shm.size, shm
    end, {a})
    assert.equal("worker", s)
    assert.equal(32, size)
    assert.equal(a.name, back.name)
    assert.equal("worker", back:read(0, 6))
    -- a block the worker made arrives too (the worker owns it until it
    -- gives it up; then it is ours to unlink)
    local made = pool:apply(function()
      local b = mp.SharedMemory{create = true, size = 16}
      b:write(0, "made there")
      b:untrack()
      return b
    end)
    assert.equal("made there", made:read(0, 10))
    made:unlink(); made:close()
    a:unlink(); a:close()
  end)

  pit("goes as a Process argument and through a manager's dict", function()
    local a = mp.SharedMemory{create = true, size = 16}
    local p = mp.Process{target = function(shm, off) shm:write(off, "arg") end,
                         args = {a, 2}}
    p:start(); p:join(30)
    assert.equal(0, p.exitcode)
    assert.equal("arg", a:read(2, 3))
    assert.is_true(exists(a.name))       -- the child owned nothing
    local m <close> = mp.Manager()
    local d = m:dict()
    d.block = a
    local back = d.block
    assert.equal(a.name, back.name)
    back:write(0, "m")
    assert.equal("m", a:read(0, 1))
    back:close()
    a:unlink(); a:close()
  end)

  pit("never makes the receiver an owner: its death unlinks nothing", function()
    local a = mp.SharedMemory{create = true, size = 16}
    local q, ready = mp.Queue(), mp.Queue()
    local p = mp.Process{target = function()
      local got = q:get(true, 30)
      ready:put(got:read(0, 2))
      H.sleep(60)
    end}
    p:start()
    a:write(0, "ok")
    q:put(a)
    assert.equal("ok", ready:get(true, 30))
    p:kill(); p:join(30)
    H.sleep(0.5)    -- (the tracker's period is 0.2 s)
    assert.is_true(exists(a.name))
    a:unlink(); a:close()
  end)

  pit("lets a receiver take ownership with track()", function()
    local a = mp.SharedMemory{create = true, size = 16}
    local q, ready = mp.Queue(), mp.Queue()
    local p = mp.Process{target = function()
      local got = q:get(true, 30)
      got:track()
      ready:put(true)
      H.sleep(60)
    end}
    p:start()
    q:put(a)
    assert.is_true(ready:get(true, 30))
    assert.is_true(a:untrack())    -- the receiver is now the only owner
    p:kill(); p:join(30)
    assert.is_false(exists(a.name))
    a:close()
  end)

  it("refuses a closed or unlinked block at encode, naming where it sits", function()
    local a = mp.SharedMemory{create = true, size = 16}
    local name = a.name
    a:unlink()
    local err = err_of(mp.encode, {args = {1, a}})
    assert.equal("EncodeError", err.kind)
    assert.matches("SharedMemory '" .. name .. "' was unlinked", err.message)
    assert.matches("args%[2%]", err.message)
    a:close()
    err = err_of(function() mp.Queue():put(a) end)
    assert.equal("EncodeError", err.kind)
    assert.matches("SharedMemory '" .. name .. "' is closed", err.message)
  end)

  it("fails to decode when the block is gone or another took its name", function()
    local name = "luamp_travel_" .. H.pid()
    local a = mp.SharedMemory{name = name, create = true, size = 16}
    local bytes = mp.encode(a)
    a:unlink(); a:close()
    local err = err_of(mp.decode, bytes, {trusted = true})
    assert.equal("DecodeError", err.kind)
    assert.matches("shared memory '" .. name .. "' cannot be attached", err.message)
    -- made again under the same name: not the block that was sent
    local b = mp.SharedMemory{name = name, create = true, size = 16}
    err = err_of(mp.decode, bytes, {trusted = true})
    assert.equal("DecodeError", err.kind)
    assert.matches("is not the block that was sent", err.message)
    b:unlink(); b:close()
  end)

  it("is refused by an untrusted decode, and malformed handles fail cleanly", function()
    local a = mp.SharedMemory{create = true, size = 16}
    local err = err_of(mp.decode, mp.encode(a))
    assert.equal("DecodeError", err.kind)
    assert.matches("refused from an untrusted source", err.message)
    -- a handle whose bytes are not a block's (ext 6: type name, bytes)
    local tname = "multiprocessing.SharedMemory"
    for _, data in ipairs{"", string.rep("\0", 24), string.rep("\0", 24) .. "a/b",
                          string.rep("\0", 24) .. "a\0b", string.rep("\0", 24) .. string.rep("x", 251)} do
      local body = string.char(0xd9, #tname) .. tname .. string.char(0xc5) .. string.pack(">I2", #data) .. data
      local msg = string.char(0xc9) .. string.pack(">I4", #body) .. string.char(6) .. body
      err = err_of(mp.decode, msg, {trusted = true})
      assert.equal("DecodeError", err.kind)
      assert.matches("malformed SharedMemory handle", err.message)
    end
    -- well-formed, but naming no block
    local data = string.rep("\0", 24) .. "luamp_no_such_block_" .. H.pid()
    local body = string.char(0xd9, #tname) .. tname .. string.char(0xc4, #data) .. data
    local msg = string.char(0xc9) .. string.pack(">I4", #body) .. string.char(6) .. body
    err = err_of(mp.decode, msg, {trusted = true})
    assert.equal("DecodeError", err.kind)
    assert.matches("cannot be attached", err.message)
    a:unlink(); a:close()
  end)
end)
