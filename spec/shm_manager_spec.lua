-- mp.managers.SharedMemoryManager (issue 17): blocks and lists made
-- through it belong to its server and are unlinked at shutdown, or when
-- the owner or the server dies.  Only the names each test made are
-- counted (other specs use /dev/shm in parallel).
local H = require "helpers"
local mp = require "multiprocessing"

local err_of = H.err_of
local pit = it   -- cross-process (mp.Process)
local SMM = mp.managers.SharedMemoryManager

local function exists(name)
  local f = io.open("/dev/shm/" .. name, "rb")
  if f then f:close() return true end
  return false
end

local function all_gone(names, timeout)
  return H.eventually(function()
    for _, n in ipairs(names) do if exists(n) then return false end end
    return true
  end, timeout or 10)
end

describe("SharedMemoryManager", function()
  it("makes blocks and lists the server owns, unlinked by shutdown", function()
    local smm = SMM()
    assert.is_true(rawequal(smm, smm:start()))
    local a = smm:SharedMemory(64)
    local b = smm:SharedMemory(1.0 * 4096)
    local sl = smm:ShareableList{1, "two", 3.5}
    assert.equal(64, a.size)
    assert.equal(4096, b.size)
    a:write(0, "usable")
    assert.equal("usable", mp.SharedMemory(a.name):read(0, 6))
    assert.same({n = 3, 1, "two", 3.5}, sl:totable())
    -- the server holds them; this process gave its ownership up
    assert.is_false(a:untrack())
    local held = smm:_segments()
    table.sort(held)
    local want = {a.name, b.name, sl.shm.name}
    table.sort(want)
    assert.same(want, held)
    smm:shutdown()
    for _, n in ipairs(want) do assert.is_false(exists(n), n) end
    -- our mappings still work after the unlink, as Python's
    assert.equal("usable", a:read(0, 6))
    assert.equal("two", sl[2])
    a:close(); b:close(); sl.shm:close()
    smm:shutdown()   -- again: nothing to do
  end)

  it("is usable with <close>", function()
    local name
    do
      local smm <close> = SMM():start()
      name = smm:SharedMemory(16).name
      assert.is_true(exists(name))
    end
    assert.is_false(exists(name))
  end)

  pit("keeps a block a child made until the shutdown (Python's rule)", function()
    local smm <close> = SMM():start()
    local q = mp.Queue()
    local p = mp.Process{target = function()
      local c = smm:SharedMemory(32)
      c:write(0, "child")
      q:put(c)
    end}
    p:start()
    local c = q:get(true, 30)
    p:join(30)
    assert.equal(0, p.exitcode)
    assert.is_true(exists(c.name))      -- the child is gone, the block stays
    assert.equal("child", c:read(0, 5))
    smm:shutdown()
    assert.is_false(exists(c.name))
    c:close()
  end)

  it("leaves nothing in /dev/shm when its owner is killed", function()
    local path = os.tmpname() .. ".lua"
    H.write(path, [[
      local mp = require "multiprocessing"
      local smm = mp.managers.SharedMemoryManager():start()
      local a = smm:SharedMemory(64)
      local sl = smm:ShareableList{1, 2, 3}
      print(a.name, sl.shm.name, smm.pid)
      io.stdout:flush()
      os.execute("kill -9 " .. require("multiprocessing.core").getpid())
    ]])
    -- (not the last command: the subshell reports the SIGKILL in err)
    local out, err = H.sh(H.q(H.luamp) .. " " .. H.q(path) .. "; true")
    os.remove(path)
    local a, b, pid = out:match("^(psm_%x+)\t(psm_%x+)\t(%d+)\n$")
    assert.is_truthy(a, out .. err)
    assert.is_true(all_gone({a, b}, 15), "left in /dev/shm: " .. a .. " " .. b)
    assert.is_true(H.eventually(function() return not H.alive(tonumber(pid)) end, 15))
  end)

  it("leaves nothing in /dev/shm when its owner exits without shutdown()", function()
    local out, err, code = H.script([[
      local mp = require "multiprocessing"
      local smm = mp.managers.SharedMemoryManager():start()
      print(smm:SharedMemory(8).name, smm:ShareableList{1}.shm.name)
    ]])
    assert.equal(0, code, err)
    local a, b = out:match("^(psm_%x+)\t(psm_%x+)\n$")
    assert.is_truthy(a, out)
    assert.is_true(all_gone({a, b}, 15))
  end)

  it("leaves nothing in /dev/shm when its server is killed", function()
    local smm <close> = SMM():start()
    local a = smm:SharedMemory(64)
    local sl = smm:ShareableList{"x"}
    local names = {a.name, sl.shm.name}
    os.execute("kill -9 " .. smm.pid)
    assert.is_true(all_gone(names, 15))
    a:close(); sl.shm:close()
  end)

  it("raises clear errors for bad sizes and sequences, unstarted and shut-down managers", function()
    local smm = SMM()
    local err = err_of(smm.SharedMemory, smm, 10)
    assert.equal("ValueError", err.kind)
    assert.matches("SharedMemory: the SharedMemoryManager is not started", err.message)
    err = err_of(smm.ShareableList, smm, {1})
    assert.equal("ValueError", err.kind)
    assert.matches("ShareableList: the SharedMemoryManager is not started", err.message)
    smm:start()
    for _, bad in ipairs{0, -1, 1.5, "10", {}} do
      assert.matches("bad argument #1 to 'SharedMemory' %(size must be a positive integer",
                     tostring(err_of(smm.SharedMemory, smm, bad)))
    end
    assert.matches("bad argument #1 to 'ShareableList' %(table expected, got number%)",
                   tostring(err_of(smm.ShareableList, smm, 5)))
    assert.matches("bad argument #1 to 'ShareableList' %(item 1 is a function",
                   tostring(err_of(smm.ShareableList, smm, {print})))
    assert.matches("calling 'SharedMemory' on bad self",
                   tostring(err_of(smm.SharedMemory, 64)))
    -- nothing was made by the failed calls
    assert.same({}, smm:_segments())
    smm:shutdown()
    err = err_of(smm.SharedMemory, smm, 10)
    assert.equal("ValueError", err.kind)
    assert.matches("has shut down", err.message)
    assert.equal("ValueError", err_of(smm.ShareableList, smm, {1}).kind)

    -- without authentication its server may not attach what clients name
    local open <close> = SMM{authkey = false}:start()
    err = err_of(open.SharedMemory, open, 10)
    assert.equal("ValueError", err.kind)
    assert.matches("authkey = false cannot take blocks", err.message)
    assert.equal("ValueError", err_of(open.ShareableList, open, {1}).kind)
  end)
end)
