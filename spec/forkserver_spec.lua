-- Start methods: set_start_method / get_start_method / get_context, and
-- the "forkserver" method (runtime/forkserver.c, forkserver.lua): children
-- forked by a server process, with target, args and upvalues encoded,
-- globals the server's, exit codes and signals as under fork.  The
-- threaded-host demonstration is spec/c/test_forkserver.c.  Managers under
-- forkserver: their server process is a child of the fork server.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local PRE = "local mp = require 'multiprocessing'\n" ..
            "local core = require 'multiprocessing.core'\n"

local fsctx = mp.get_context("forkserver")

describe("start methods", function()
  it("lists fork and forkserver; fork is the default", function()
    assert.same({"fork", "forkserver"}, mp.get_all_start_methods())
    local out, err, rc = H.script(PRE .. [[
      print(mp.get_start_method(true))
      local ctx = mp.get_context("forkserver")     -- changes nothing global
      print(ctx.get_start_method(), ctx:get_start_method())
      print(mp.get_start_method(true))
      print(mp.get_start_method())
      print(mp.get_context().get_start_method())
    ]])
    assert.equal(0, rc, err)
    assert.equal("nil\nforkserver\tforkserver\nnil\nfork\nfork\n", out)
  end)

  it("set_start_method: once, unless forced, as Python", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      print(mp.get_start_method())
      local ok, e = pcall(mp.set_start_method, "fork")
      print(ok, e.kind, e.message)
      mp.set_start_method("fork", {force = true})
      print(mp.get_start_method())
      mp.set_start_method("forkserver", true)
      print(mp.get_start_method())
      mp.set_start_method(nil, {force = true})
      print(mp.get_start_method(true))
      -- a start under the default fixes it (Python's get_context())
      local p = mp.Process{target = function() end}
      p:start() p:join()
      print(pcall(mp.set_start_method, "forkserver"))
    ]])
    assert.equal(0, rc, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal("forkserver", lines[1])
    assert.matches("^false\tProcessError\tcontext has already been set", lines[2])
    assert.equal("fork", lines[3])
    assert.equal("forkserver", lines[4])
    assert.equal("nil", lines[5])
    assert.matches("^false\tProcessError: context has already been set", lines[6])
  end)

  it("rejects unknown methods and wrong types, naming the call", function()
    local kind, e = H.kind_of(mp.set_start_method, "spawn", true)
    assert.equal("ValueError", kind)
    assert.matches("cannot find context for 'spawn'", e.message)
    kind, e = H.kind_of(mp.get_context, "threads")
    assert.equal("ValueError", kind)
    e = H.err_of(mp.set_start_method, 42)
    assert.matches("bad argument #1 to 'set_start_method' %(string expected, got number%)", e)
    e = H.err_of(mp.get_context, {})
    assert.matches("bad argument #1 to 'get_context' %(string expected, got table%)", e)
    e = H.err_of(mp.set_start_method, "fork", "yes")
    assert.matches("bad argument #2 to 'set_start_method' %(table or boolean expected, got string%)", e)
    e = H.err_of(mp.set_start_method, "fork", {forse = true})
    assert.matches("unknown option 'forse'", e)
    e = H.err_of(mp.set_start_method, "forkserver", {preload = "cjson", force = true})
    assert.matches("bad argument #2 to 'set_start_method' %(table expected, got string%)", e)
    e = H.err_of(mp.set_forkserver_preload, {1})
    assert.matches("preload%[1%] must be a module name, got number", e)
    e = H.err_of(mp.Pool, {processes = 1, context = 5})
    assert.matches("bad argument #1 to 'Pool' %(context must be a context", e)
    -- (nothing above changed the method of this process)
    assert.is_nil(mp.get_start_method(true) == "forkserver" or nil)
  end)

  it("context objects expose every constructor and function", function()
    for _, name in ipairs{"Process", "Pool", "Queue", "JoinableQueue",
        "SimpleQueue", "Lock", "RLock", "Semaphore", "BoundedSemaphore",
        "Event", "Condition", "Barrier", "Value", "Array", "RawValue",
        "RawArray", "SharedMemory", "Manager", "Pipe", "cpu_count",
        "current_process", "parent_process", "active_children", "wait",
        "get_logger", "log_to_stderr", "get_context", "get_start_method",
        "set_start_method", "get_all_start_methods",
        "set_forkserver_preload", "encode", "decode"} do
      assert.is_not_nil(fsctx[name], name)
      assert.is_not_nil(mp.get_context("fork")[name], name)
    end
    assert.equal(fsctx, mp.get_context("forkserver"))
    assert.equal(mp.get_context("fork"), fsctx:get_context("fork"))
    assert.matches('context "forkserver"', tostring(fsctx))
    local q = fsctx.Queue()
    q:put(1)
    assert.equal(1, q:get())
  end)
end)

describe("forkserver Process", function()
  it("runs target, args and upvalues; globals are the server's", function()
    local q = mp.Queue()
    local x = 40
    FS_SPEC_GLOBAL = "owner's"
    local p = fsctx.Process{target = function(a, b)
      q:put({x + a, b, FS_SPEC_GLOBAL, type(string.format),
             mp.current_process().name, mp.parent_process().pid,
             mp.parent_process():is_alive(), core.getppid()})
    end, args = {2, "two"}, name = "Named"}
    p:start()
    local v = q:get(true, 10)
    p:join(10)
    FS_SPEC_GLOBAL = nil
    assert.equal(0, p.exitcode)
    assert.equal(42, v[1])
    assert.equal("two", v[2])
    assert.is_nil(v[3])                 -- the server's globals: not set there
    assert.equal("function", v[4])
    assert.equal("Named", v[5])
    assert.equal(core.getpid(), v[6])   -- the parent is the owner...
    assert.is_true(v[7])
    assert.equal(core.forkserver_pid(), v[8])   -- ...the server forked it
  end)

  it("reports exit codes, errors and signals as under fork", function()
    local function run(f)
      local p = fsctx.Process{target = f}
      p:start()
      p:join(10)
      return p.exitcode, p
    end
    assert.equal(0, run(function() end))
    assert.equal(7, run(function() os.exit(7) end))
    local out, err, rc = H.script(PRE .. [[
      local p = mp.get_context("forkserver").Process{target = function()
        error("boom in child") end}
      p:start() p:join() print(p.exitcode)
    ]])
    assert.equal(0, rc, err)
    assert.equal("1\n", out)
    assert.matches("boom in child", err)
    local p = fsctx.Process{target = function() while true do core.sleep(1) end end}
    p:start()
    assert.is_true(p:is_alive())
    assert.is_nil(p.exitcode)
    p:join(0.1)
    assert.is_true(p:is_alive())
    assert.same({}, mp.wait({p.sentinel}, 0.1))
    p:terminate()
    assert.same({p.sentinel}, mp.wait({p.sentinel}, 10))
    p:join(10)
    assert.equal(-15, p.exitcode)
    p = fsctx.Process{target = function() while true do core.sleep(1) end end}
    p:start()
    p:kill()
    p:join(10)
    assert.equal(-9, p.exitcode)
    p:close()
  end)

  it("rebuilds a Process class with its methods and fields", function()
    local q = mp.Queue()
    local My = fsctx.Process:extend("MyProc")
    function My:init(n) self.n = n end
    function My:twice() return self.n * 2 end
    function My:run() q:put({self:twice(), tostring(mp.current_process()):match("^<(%w+)")}) end
    local p = My(21)
    p:start()
    local v = q:get(true, 10)
    p:join(10)
    assert.same({42, "MyProc"}, v)
  end)

  it("shares queues, locks, Values, Arrays and SharedMemory made after the server", function()
    local q, lock, v = mp.Queue(), mp.Lock(), mp.Value("i", 0)
    local a, e = mp.Array("d", {1.5, 2.5}), mp.Event()
    local shm = mp.SharedMemory{create = true, size = 16}
    local ps = {}
    for i = 1, 4 do
      ps[i] = fsctx.Process{target = function(name)
        local sh = mp.SharedMemory{name = name}   -- (by name)
        for _ = 1, 100 do lock:with(function() v.value = v.value + 1 end) end
        a[1] = a[1] + 0   -- (readable)
        sh:write(i - 1, string.char(64 + i))
        e:wait(10)
        sh:close()
        q:put(i)
      end, args = {shm.name}}
      ps[i]:start()
    end
    e:set()
    local got = {}
    for _ = 1, 4 do got[#got + 1] = q:get(true, 10) end
    for _, p in ipairs(ps) do p:join(10); assert.equal(0, p.exitcode) end
    table.sort(got)
    assert.same({1, 2, 3, 4}, got)
    assert.equal(400, v.value)
    assert.equal("ABCD", shm:read(0, 4))
    shm:close(); shm:unlink()
  end)

  it("passes manager proxies (the tree's key is the owner's)", function()
    local m <close> = mp.Manager()
    local d = m:dict()
    local p = fsctx.Process{target = function() d.x = 5 end}
    p:start()
    p:join(10)
    assert.equal(0, p.exitcode)
    assert.equal(5, d.x)
  end)

  it("ends a child's run on Ctrl-C with \"interrupted!\" and exit code 1", function()
    local out, err, rc = H.script(PRE .. [[
      local ev = mp.Event()
      local p = mp.get_context("forkserver").Process{target = function()
        ev:set() while true do core.sleep(0.05) end end}
      p:start() ev:wait(10) core.kill(p.pid, "SIGINT") p:join(10)
      print(p.exitcode)
    ]])
    assert.equal(0, rc, err)
    assert.equal("1\n", out)
    assert.matches("interrupted!", err)
  end)

  it("raises \"interrupted!\" in a child at every Ctrl-C, as under fork", function()
    local out, err, rc = H.script(PRE .. [[
      local q = mp.Queue()
      local p = mp.get_context("forkserver").Process{daemon = true, target = function()
        local n = 0
        for _ = 1, 3 do
          local ok, e = pcall(function()
            q:put("ready")
            while true do end
          end)
          assert(not ok and e:match("interrupted!"), e)
          n = n + 1
        end
        q:put(n)
      end}
      p:start()
      for _ = 1, 3 do
        assert(q:get(true, 10) == "ready")
        core.sleep(0.05)
        core.kill(p.pid, "SIGINT")
      end
      print(q:get(true, 10)) p:join(10) print(p.exitcode)
    ]])
    assert.equal(0, rc, err)
    assert.equal("3\n0\n", out)
  end)

  it("raises EncodeError naming an unencodable upvalue", function()
    local co = coroutine.create(print)
    local t = {inner = {co = co}}
    local p = fsctx.Process{target = function() return t end}
    local kind, e = H.kind_of(p.start, p)
    assert.equal("EncodeError", kind)
    assert.matches("cannot encode a thread at process.target{upvalue 't' of " ..
                   "function at [^}]+}.inner.co", e.message)
    p = fsctx.Process{target = print, args = {co}}
    kind, e = H.kind_of(p.start, p)
    assert.equal("EncodeError", kind)
    assert.matches("at process.args%[1%]", e.message)
    -- the object was not started
    assert.is_nil(p.pid)
  end)

  it("Ctrl-C during a start raises \"interrupted!\" and leaves no child", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      local spid, me = core.forkserver_pid(), core.getpid()
      local p = mp.Process{target = function() end}
      p:start() p:join()              -- (the server has loaded what it needs)
      core.kill(spid, "SIGSTOP")      -- the answer comes after the Ctrl-C
      if core.fork() == 0 then
        core.sleep(0.3) core.kill(me, "SIGINT")
        core.sleep(0.3) core.kill(spid, "SIGCONT")
        core._exit(0)
      end
      p = mp.Process{target = function() core.sleep(30) end}
      local ok, e = pcall(p.start, p)
      print(ok, tostring(e):match("interrupted!"), p.pid)
      local function kids()
        local f = io.popen("env -u LD_PRELOAD ps -o pid= --ppid " .. spid)
        local n = 0
        for _ in f:lines() do n = n + 1 end
        f:close()
        return n
      end
      local t0 = core.now()
      while kids() > 0 and core.now() - t0 < 5 do core.sleep(0.05) end
      print(kids(), #mp.active_children())
      p = mp.Process{target = function() os.exit(2) end}
      p:start() p:join() print(p.exitcode)
    ]])
    assert.equal(0, rc, err)
    assert.equal("false\tinterrupted!\tnil\n0\t0\n2\n", out)
  end)

  it("restarts a killed server: that start raises ProcessError, the next works", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      local pid1 = core.forkserver_pid()
      core.kill(pid1, "SIGKILL")
      core.sleep(0.2)
      local p = mp.Process{target = function() end}
      local ok, e = pcall(p.start, p)
      print(ok, e.kind, e.message)
      p = mp.Process{target = function() os.exit(3) end}
      p:start() p:join()
      print(p.exitcode, core.forkserver_pid() ~= pid1)
    ]])
    assert.equal(0, rc, err)
    assert.matches("^false\tProcessError\tthe fork server %(pid %d+%) is gone", out)
    assert.matches("\n3\ttrue\n$", out)
  end)

  it("a child outliving a killed server stays alive, stoppable and joinable", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      local ev = mp.Event()
      local p = mp.Process{target = function() ev:set() core.sleep(30) end}
      p:start() ev:wait(10)
      local s = p.sentinel
      core.kill(core.forkserver_pid(), "SIGKILL")
      core.sleep(0.2)
      print(p:is_alive(), p.exitcode, #mp.wait({s}, 0.1))
      p:terminate() p:join(10)
      -- (the status went with the server: 255, as Python's forkserver)
      print(p:is_alive(), p.exitcode, #mp.wait({s}, 0))
    ]])
    assert.equal(0, rc, err)
    assert.equal("true\tnil\t0\nfalse\t255\t1\n", out)
  end)

  it("the server dies with its owner and leaves no zombie or fd behind", function()
    local out, err, rc = H.script(PRE .. [[
      local ctx = mp.get_context("forkserver")
      local p = ctx.Process{target = function() end}
      p:start() p:join()
      print(core.forkserver_pid())
    ]])
    assert.equal(0, rc, err)
    local spid = assert(tonumber(out:match("%d+")))
    assert.is_true(H.eventually(function() return not H.alive(spid) end))
    -- in this process: fds and zombies stay level over many starts
    local p = fsctx.Process{target = function() end}
    p:start() p:join(10)
    collectgarbage()
    local fds = H.fd_count()
    for _ = 1, 30 do
      p = fsctx.Process{target = function() end}
      p:start() p:join(10)
      assert.equal(0, p.exitcode)
    end
    collectgarbage()
    assert.equal(fds, H.fd_count())
    assert.equal(0, H.zombies())
  end)

  it("children keep the owner's start method (their children use a server of their own)", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      local q = mp.Queue()
      local p = mp.Process{target = function()
        local c = mp.Process{target = function()
          q:put(mp.parent_process().pid == core.getppid())
        end}
        c:start() c:join()
        q:put(mp.get_start_method(true))
        q:put(core.forkserver_pid() ~= nil)
      end}
      p:start() p:join()
      print(p.exitcode, q:get(true, 10), q:get(true, 10), q:get(true, 10))
    ]])
    assert.equal(0, rc, err)
    assert.equal("0\tfalse\tforkserver\ttrue\n", out)
  end)

  it("is never shared with a forked child, which starts its own", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      local spid = core.forkserver_pid()
      local q = mp.Queue()
      local fork = mp.get_context("fork")
      -- a fork-method child holds no copy of the owner's socket...
      local c = fork.Process{target = function()
        q:put(core.forkserver_pid() or "none")
        -- ...and starts a server of its own when it uses forkserver
        local p = mp.Process{target = function() q:put(core.getppid()) end}
        p:start() p:join()
        q:put(core.forkserver_pid())
        core.sleep(3)
      end}
      c:start()
      local a, b, d = q:get(true, 10), q:get(true, 10), q:get(true, 10)
      print(a, b == d and d ~= spid)
      -- so stopping the server ends it now, while that child still runs
      core.forkserver_stop()          -- (which reaps it: no zombie left)
      print(core.kill(spid, 0), c:is_alive())
      c:terminate() c:join()
    ]])
    assert.equal(0, rc, err)
    assert.equal("none\ttrue\nfalse\ttrue\n", out)
  end)

  it("preloads modules into the server; a bad one is a clear error", function()
    local dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p " .. dir)
    H.write(dir .. "/fs_preload_mod.lua", "FS_PRELOADED = 42\nreturn {}\n")
    local out, err, rc = H.script(PRE .. [[
      package.path = ]] .. string.format("%q", dir .. "/?.lua;") .. [[ .. package.path
      local ok, e = pcall(mp.set_start_method, "forkserver", {preload = {"no_such_mod_xyz"}})
      print(ok, e.kind, e.message:match("module 'no_such_mod_xyz' not found") ~= nil)
      mp.set_start_method("forkserver", {preload = {"fs_preload_mod"}, force = true})
      local q = mp.Queue()
      local p = mp.Process{target = function() q:put(FS_PRELOADED) end}
      p:start() print(q:get(true, 10)) p:join()
    ]], nil, "LUA_PATH=" .. H.q(dir .. "/?.lua;;"))
    os.execute("rm -rf " .. dir)
    assert.equal(0, rc, err)
    assert.equal("false\tProcessError\ttrue\n42\n", out)
  end)
end)

describe("forkserver Pool", function()
  it("maps, and replaces a killed worker", function()
    local k = 3
    local pool = fsctx.Pool(2)
    assert.same({3, 6, 9, n = 3}, pool:map(function(v) return v * k end, {1, 2, 3}))
    local before = H.worker_pids(pool)
    assert.equal(2, #before)
    core.kill(before[1], "SIGKILL")
    H.eventually(function()
      pool:poll()
      local now = H.worker_pids(pool)
      return #now == 2 and now[1] ~= before[1] and now[2] ~= before[1]
    end, 10)
    assert.same({2, 4, n = 2}, pool:map(function(v) return v * 2 end, {1, 2}))
    local pids = pool:map(function()
      return {core.getppid(), mp.parent_process().pid, mp.parent_process():is_alive()}
    end, H.range(4))
    for i = 1, 4 do
      assert.same({core.forkserver_pid(), core.getpid(), true}, pids[i])
    end
    pool:close()
    pool:join()
  end)

  it("runs the initializer; an unencodable one is an EncodeError", function()
    local co = coroutine.create(print)
    local kind, e = H.kind_of(fsctx.Pool, {processes = 1, initializer = function() return co end})
    assert.equal("EncodeError", kind)
    assert.matches("at pool.initializer{upvalue 'co'", e.message)
    local pool = mp.Pool{processes = 1, context = "forkserver",
                         initializer = function(v) INIT_V = v end, initargs = {5}}
    assert.same({5, n = 1}, pool:map(function() return INIT_V end, {1}))
    pool:terminate()
  end)
end)

-- The parent of pid, from /proc (nil once it is gone).
local function ppid_of(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("%) %a (%d+)"))
end

describe("forkserver Manager", function()
  it("ctx.Manager() starts its server through the fork server; proxies, authkey, <close>", function()
    local mpid
    do
      local m <close> = fsctx.Manager{authkey = "sekrit"}
      mpid = m.pid
      -- a child of the fork server: the caller never forked
      assert.equal(core.forkserver_pid(), ppid_of(m.pid))
      local d, q, lock = m:dict(), m:Queue(), m:Lock()
      d.x = 1
      local p = fsctx.Process{target = function()
        lock:acquire() d.y = d.x + 1 q:put("hi") lock:release()
      end}
      p:start() p:join(10)
      assert.equal(0, p.exitcode)
      assert.equal(2, d.y)
      assert.equal("hi", q:get(true, 10))
      assert.equal("sekrit", m.authkey)
      -- another key is refused
      local other = mp.managers.SyncManager{address = m.address, authkey = "nope"}
      assert.is_false(pcall(other.connect, other))
    end
    assert.is_true(H.eventually(function() return not H.alive(mpid) end))
  end)

  it("SharedMemoryManager and m:Pool under forkserver; shutdown unlinks", function()
    local smm = mp.managers.SharedMemoryManager{context = fsctx}:start()
    assert.equal(core.forkserver_pid(), ppid_of(smm.pid))
    local shm = smm:SharedMemory(64)
    local name = shm.name
    shm:write(0, "abc")
    shm:close()
    smm:shutdown()
    assert.is_false(pcall(mp.SharedMemory, {name = name}))
    local m <close> = fsctx.Manager()
    local pool = m:Pool(2)
    assert.same({2, 4, 6}, {table.unpack(pool:map(function(v) return v * 2 end, {1, 2, 3}), 1, 3)})
    pool:close() pool:join()
  end)

  it("a failed start raises its error; bad contexts name the call", function()
    local m <close> = fsctx.Manager()
    local kind, e = H.kind_of(fsctx.Manager, {address = m.address})
    assert.equal("OSError", kind)
    assert.matches("in use", e.message)
    kind, e = H.kind_of(mp.managers.SyncManager, {context = 5})
    assert.matches("SyncManager", tostring(e.message or e))
    assert.matches("context", tostring(e.message or e))
    kind, e = H.kind_of(fsctx.Manager, 5)
    assert.matches("Manager", tostring(e.message or e))
  end)

  it("under set_start_method: mp.Manager() too; the server ends with an owner killed by SIGKILL", function()
    local out, err, rc = H.script(PRE .. [[
      mp.set_start_method("forkserver")
      local m = mp.Manager()
      local d = m:dict()
      d.x = 4
      local f = io.open("/proc/" .. m.pid .. "/stat")
      local ppid = tonumber(f:read("a"):match("%) %a (%d+)")) f:close()
      print(m.pid, d.x, ppid == core.forkserver_pid())
      io.stdout:flush()
      core.kill(core.getpid(), "SIGKILL")
    ]])
    assert.equal("", err)
    assert.is_true(rc ~= 0)
    local mpid, x, via = out:match("^(%d+)\t(%d+)\t(%a+)\n$")
    assert.equal("4", x)
    assert.equal("true", via)
    assert.is_true(H.eventually(function() return not H.alive(tonumber(mpid)) end, 10))
  end)

  it("encodes the initializer and registered callables; an unencodable one is an EncodeError", function()
    local QM = mp.managers.BaseManager:extend("QM")
    local base = 10
    QM:register("get", function() return INIT_V + base end)
    local m = QM{context = "forkserver"}
    local co = coroutine.create(print)
    local kind, e = H.kind_of(m.start, m, function() return co end)
    assert.equal("EncodeError", kind)
    assert.matches("upvalue 'co'", e.message)
    assert.equal(0, #mp.active_children())
    m:start(function(v) INIT_V = v end, {5})
    assert.equal(core.forkserver_pid(), ppid_of(m.pid))
    assert.equal(15, m:get())
    m:shutdown()
  end)

  it("leaves no fd or zombie behind over many starts", function()
    do local m <close> = fsctx.Manager() end
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    for i = 1, 5 do
      local m <close> = fsctx.Manager()
      local d = m:dict()
      d.x = i
      assert.equal(i, d.x)
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, H.fd_count())
    assert.equal(0, H.zombies())
  end)

  it("the server ends with an owner that exits without shutdown", function()
    local out, err, rc = H.script(PRE .. [[
      local m = mp.get_context("forkserver").Manager()
      print(m.pid)
    ]])
    assert.equal(0, rc, err)
    local mpid = assert(tonumber(out:match("%d+")))
    assert.is_true(H.eventually(function() return not H.alive(mpid) end, 10))
  end)
end)
