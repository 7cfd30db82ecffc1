-- Process: start/join/exit codes, identity, classes, the fork discipline,
-- exit-time cleanup, at-fork hooks and the logger.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local function tmpfile()
  local p = os.tmpname()
  os.remove(p)
  return p
end

-- a prelude for H.script snippets
local PRE = "local mp = require 'multiprocessing'\n" ..
            "local core = require 'multiprocessing.core'\n"

local function alive(pid)
  return core.kill(pid, 0)
end

describe("Process", function()
  it("runs the target with its arguments in a child", function()
    local out = tmpfile()
    local p = mp.Process{target = function(path, a, b)
      local f = io.open(path, "w")
      f:write(tostring(a), " ", tostring(b), " ", core.getpid())
      f:close()
    end, args = {out, "A", 100}}
    assert.is_nil(p.pid)
    assert.is_nil(p.exitcode)
    p:start()
    assert.equal("integer", math.type(p.pid))
    assert.are_not.equal(core.getpid(), p.pid)
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal("A 100 " .. p.pid, H.slurp(out))
    assert.equal(p.pid, p.ident)
    os.remove(out)
  end)

  it("keeps nil arguments with args.n", function()
    local a, b = mp.Pipe()
    local p = mp.Process{target = function(x, y, z)
      b:send({x = x, y = y, z = z, n = select("#", x, y, z)})
    end, args = table.pack(1, nil, 3)}
    p:start()
    local v = a:recv()
    p:join()
    assert.same({x = 1, z = 3, n = 3}, v)
  end)

  it("uses the target's upvalues as they are (nothing serialized)", function()
    local a, b = mp.Pipe()
    local co = coroutine.create(function() end)   -- not encodable
    local t = {1, 2, 3}
    local p = mp.Process{target = function()
      b:send({type(co), #t, io.stdout ~= nil})
    end}
    p:start()
    assert.same({"thread", 3, true}, a:recv())
    p:join()
  end)

  it("gives Python's exit codes", function()
    local cases = {
      {function() end, 0},
      {function() os.exit(7) end, 7},
      {function() os.exit(true) end, 0},
      {function() os.exit(false) end, 1},
      {function() error("boom") end, 1},
      {function() error({}) end, 1},
      {function() core.kill(core.getpid(), "SIGKILL") core.sleep(5) end, -9},
      {function() core.kill(core.getpid(), "SIGUSR1") core.sleep(5) end, -10},
    }
    for i, c in ipairs(cases) do
      local p = mp.Process{target = c[1]}
      p:start()
      p:join()
      assert.equal(c[2], p.exitcode, "case " .. i)
    end
  end)

  it("prints an uncaught error's traceback on stderr", function()
    local out, err, code = H.script(PRE .. [[
      local function inner() error("boom in child") end
      local p = mp.Process{target = function() inner() end, name = "Failing"}
      p:start() p:join()
      print("exitcode", p.exitcode)
    ]])
    assert.equal(0, code)
    assert.equal("exitcode\t1\n", out)
    assert.matches("Process Failing:\n", err, 1, true)
    assert.matches("boom in child", err, 1, true)
    assert.matches("stack traceback:", err, 1, true)
    assert.matches("in upvalue 'inner'", err, 1, true)
    -- the parent's frames (the caller of start) are not in it
    assert.is_nil(err:find("in method 'start'", 1, true))
  end)

  it("terminates with SIGTERM and kills with SIGKILL", function()
    local p = mp.Process{target = function() core.sleep(30) end}
    p:start()
    assert.is_true(p:is_alive())
    p:terminate()
    p:join()
    assert.equal(-15, p.exitcode)
    assert.is_false(p:is_alive())
    local q = mp.Process{target = function() core.sleep(30) end}
    q:start()
    q:kill()
    q:join()
    assert.equal(-9, q.exitcode)
    -- terminate/kill of a finished process is harmless
    q:terminate()
    q:kill()
  end)

  it("interrupts with SIGINT: 'interrupted!' in the child, exit code 1", function()
    local e = mp.Event()
    -- busy in Lua code (daemons: should this fail, they go at exit)
    local p = mp.Process{daemon = true, target = function() e:set() while true do end end}
    p:start()
    assert.is_true(e:wait(10))
    p:interrupt()
    p:join(10)
    assert.equal(1, p.exitcode)
    -- blocked in a queue's get (C code), and one that catches it itself
    local q, a, b = mp.Queue(), mp.Pipe()
    e:clear()
    local r = mp.Process{daemon = true, target = function()
      local ok, err = pcall(function() e:set() return q:get() end)
      b:send(tostring(err))
      os.exit(ok and 0 or 5)
    end}
    r:start()
    assert.is_true(e:wait(10))
    core.sleep(0.1)
    r:interrupt()
    assert.is_true(a:poll(10))
    assert.equal("interrupted!", a:recv())
    r:join(10)
    assert.equal(5, r.exitcode)
    -- interrupting a finished process is harmless
    r:interrupt()
    assert.equal(5, r.exitcode)
    -- a process that was never started
    local kind = H.kind_of(mp.Process{target = print}.interrupt,
                           mp.Process{target = print})
    assert.equal("ProcessError", kind)
  end)

  it("join(timeout) returns after the timeout while the child runs", function()
    local p = mp.Process{target = function() core.sleep(30) end}
    p:start()
    local t0 = core.now()
    p:join(0.2)
    local dt = core.now() - t0
    assert.is_true(dt >= 0.19 and dt < 2, "waited " .. dt)
    assert.is_nil(p.exitcode)
    assert.is_true(p:is_alive())
    p:join(0)
    p:kill()
    p:join()
    assert.equal(-9, p.exitcode)
  end)

  it("has Python's names, daemon flag and text form", function()
    local p = mp.Process{target = function() end}
    assert.matches("^Process%-%d+$", p.name)
    assert.is_false(p.daemon)
    assert.matches("^<Process name=\"Process%-%d+\" parent=%d+ initial>$",
      tostring(p))
    local q = mp.Process{target = function() core.sleep(5) end,
                         name = "Worker1", daemon = true}
    assert.equal("Worker1", q.name)
    assert.is_true(q.daemon)
    q:start()
    assert.matches("^<Process name=\"Worker1\" pid=%d+ parent=%d+ started daemon>$",
      tostring(q))
    q:terminate()
    q:join()
    assert.matches("stopped exitcode=%-15 daemon>$", tostring(q))
    q:close()
    assert.matches("closed", tostring(q))
    local n1 = tonumber(mp.Process{}.name:match("%d+"))
    local n2 = tonumber(mp.Process{}.name:match("%d+"))
    assert.equal(n1 + 1, n2)
    assert.equal("function", type(mp.Process(function() end)._target))
  end)

  it("gives the sentinel: an fd readable once the child ends", function()
    local p = mp.Process{target = function() core.sleep(0.2) end}
    p:start()
    local s = p.sentinel
    assert.equal("integer", math.type(s))
    assert.same({}, mp.wait({s}, 0))
    assert.same({s}, mp.wait({s}, 10))
    p:join()
    assert.equal(0, p.exitcode)
  end)

  it("gives a ready sentinel when first asked for it after join", function()
    local p = mp.Process{target = function() end}
    p:start()
    p:join()
    local s = p.sentinel
    assert.equal("integer", math.type(s))
    assert.same({s}, mp.wait({s}, 0))
    assert.equal(s, p.sentinel)
    p:close()
  end)

  it("takes on its identity in forks made before it asked for it", function()
    -- a started child that has not asked who it is yet forks: raw
    -- (core.fork) and through a Pool; both see it as their parent
    local a, b = mp.Pipe()
    local p = mp.Process{name = "Kid", target = function()
      local pid = core.fork()
      if pid == 0 then
        b:send({"raw", mp.current_process().name})
        core._exit(0)
      end
      core.waitpid(pid)
      local pool = mp.Pool(1)
      b:send({"pool", pool:apply(function()
        return mp.parent_process().name
      end)})
      pool:terminate()
      b:send({"self", mp.current_process().name, mp.parent_process().name})
    end}
    p:start()
    local got = {}
    for _ = 1, 3 do
      local v = a:recv()
      got[v[1]] = {table.unpack(v, 2)}
    end
    p:join()
    assert.same({raw = {"Kid"}, pool = {"Kid"}, self = {"Kid", "MainProcess"}},
                got)
  end)

  it("knows who it is in the child, and its parent", function()
    local a, b = mp.Pipe()
    local p = mp.Process{name = "Kid", target = function()
      local me, parent = mp.current_process(), mp.parent_process()
      b:send({me.name, me.pid, me.daemon, me == mp.current_process(),
              parent.name, parent.pid, parent:is_alive(),
              #mp.active_children()})
    end}
    p:start()
    local v = a:recv()
    p:join()
    assert.same({"Kid", p.pid, false, true, "MainProcess", core.getpid(), true, 0}, v)
    assert.equal("MainProcess", mp.current_process().name)
    assert.is_nil(mp.parent_process())
  end)

  it("names grandchildren after their parent (Process-N:M)", function()
    local a, b = mp.Pipe()
    local p = mp.Process{target = function()
      local q = mp.Process{target = function()
        b:send({mp.current_process().name, mp.parent_process().name})
      end}
      q:start()
      q:join()
    end}
    p:start()
    local v = a:recv()
    p:join()
    assert.equal(p.name .. ":1", v[1])
    assert.equal(p.name, v[2])
  end)

  it("lists and reaps active children", function()
    local ps = {}
    for i = 1, 3 do
      ps[i] = mp.Process{target = function() core.sleep(i == 1 and 0 or 30) end}
      ps[i]:start()
    end
    H.eventually(function() return #mp.active_children() == 2 end)
    local live = mp.active_children()
    assert.equal(2, #live)
    for _, p in ipairs(live) do assert.is_true(p == ps[2] or p == ps[3]) end
    assert.equal(0, ps[1].exitcode)
    for i = 2, 3 do ps[i]:terminate() ps[i]:join() end
    assert.same({}, mp.active_children())
  end)

  -- (the Process started last is kept in a slot of its own while it is
  -- the only one not joined: process.lua's S.last)
  it("keeps listing the child started last, its object dropped", function()
    local pid
    do
      local p = mp.Process{target = function() core.sleep(30) end}
      p:start()
      pid = p.pid
    end
    collectgarbage()
    collectgarbage()
    local live = mp.active_children()
    assert.equal(1, #live)
    assert.equal(pid, live[1].pid)
    local q = mp.Process{target = function() core.sleep(30) end}
    q:start()
    assert.equal(2, #mp.active_children())
    q:terminate()
    q:join()
    assert.equal(1, #mp.active_children())
    live[1]:terminate()
    live[1]:join()
    assert.same({}, mp.active_children())
  end)

  it("reaps a child whose Process object was dropped", function()
    local pid
    do
      local p = mp.Process{target = function() end}
      p:start()
      pid = p.pid
    end
    collectgarbage()
    collectgarbage()
    H.eventually(function()
      mp.active_children()
      local q = mp.Process{target = function() end}
      q:start()
      q:join()
      return H.zombies() == 0
    end)
    assert.equal(0, H.zombies())
    assert.is_false(alive(pid))
  end)

  it("keeps exitcode after close and refuses to be used closed", function()
    local p = mp.Process{target = function() os.exit(3) end}
    p:start()
    p:join()
    p:close()
    p:close()   -- idempotent
    assert.equal(3, p.exitcode)
    for _, m in ipairs {"start", "join", "terminate", "kill", "interrupt",
                        "is_alive"} do
      local ok, e = pcall(p[m], p)
      assert.is_false(ok)
      assert.equal("ValueError", e.kind, m)
    end
    local ok, e = pcall(function() return p.sentinel end)
    assert.is_false(ok)
    assert.equal("ValueError", e.kind)
  end)

  it("can be used as a <close> variable (joins at the end of the scope)", function()
    local p2
    do
      local p <close> = mp.Process{target = function() core.sleep(0.1) end}
      p:start()
      p2 = p
    end
    assert.equal(0, p2.exitcode)
    -- an error leaving the scope terminates the child instead of waiting
    local ok = pcall(function()
      local p <close> = mp.Process{target = function() core.sleep(30) end}
      p:start()
      p2 = p
      error("leaving")
    end)
    assert.is_false(ok)
    assert.equal(-15, p2.exitcode)
  end)
end)

describe("Process classes", function()
  it("subclass with init and run (the seed's MyProcess)", function()
    local a, b = mp.Pipe()
    local MyProcess = mp.Process:extend()
    function MyProcess:init(num)
      self.num = num
    end
    function MyProcess:run()
      b:send({self.num, mp.current_process().name})
    end
    local p = MyProcess(7)
    p:start()
    assert.same({7, p.name}, a:recv())
    p:join()
    assert.equal(0, p.exitcode)
    assert.is_nil(rawget(MyProcess, "num"))
  end)

  it("subclasses of subclasses, base init, class names", function()
    local a, b = mp.Pipe()
    local Base = mp.Process:extend("Base")
    function Base:init(x) mp.Process.init(self, {name = "B" .. x}) self.x = x end
    function Base:run() b:send(self:describe()) end
    function Base:describe() return "base " .. self.x end
    local Derived = Base:extend()
    function Derived:describe() return "derived " .. self.x .. " " .. self.name end
    local p = Derived(2)
    p:start()
    assert.equal("derived 2 B2", a:recv())
    p:join()
    assert.matches("^<Base name=\"B2\"", tostring(p))
    -- the default run still calls a target given to the base init
    local q = mp.Process:extend()()
    mp.Process.init(q, {target = function() b:send("target ran") end})
    q:start()
    assert.equal("target ran", a:recv())
    q:join()
  end)
end)

describe("Process misuse", function()
  it("raises Python's errors", function()
    local p = mp.Process{target = function() core.sleep(30) end}
    local ok, e = pcall(p.join, p)
    assert.is_false(ok)
    assert.equal("ProcessError", e.kind)
    assert.matches("started", e.message)
    p:start()
    ok, e = pcall(p.start, p)
    assert.is_false(ok)
    assert.equal("ProcessError", e.kind)
    assert.matches("twice", e.message)
    ok, e = pcall(p.close, p)
    assert.is_false(ok)
    assert.equal("ValueError", e.kind)
    assert.matches("still running", e.message)
    p:kill()
    p:join()
    p:close()
  end)

  it("rejects bad options with argument errors", function()
    assert.has_error(function() mp.Process{target = 42} end)
    assert.has_error(function() mp.Process{args = "x"} end)
    assert.has_error(function() mp.Process{targt = print} end)
    assert.has_error(function() mp.Process(42) end)
    local ok, e = pcall(mp.Process, {arg = {}})
    assert.is_false(ok)
    assert.matches("unknown option 'arg'", e)
  end)

  it("does not let a daemon have children", function()
    local a, b = mp.Pipe()
    local p = mp.Process{daemon = true, target = function()
      local ok, e = pcall(function() mp.Process{target = print}:start() end)
      b:send({ok, e.kind})
    end}
    p:start()
    assert.same({false, "ProcessError"}, a:recv())
    p:join()
  end)

  it("does not let a child join or signal its siblings", function()
    local a, b = mp.Pipe()
    local sib = mp.Process{target = function() core.sleep(30) end}
    sib:start()
    local p = mp.Process{target = function()
      local r = {}
      for _, m in ipairs {"join", "terminate", "kill", "interrupt", "start"} do
        local ok, e = pcall(sib[m], sib)
        r[#r + 1] = (not ok) and e.kind or "ok"
      end
      collectgarbage()
      b:send(r)
    end}
    p:start()
    assert.same({"ProcessError", "ProcessError", "ProcessError", "ProcessError",
                  "ProcessError"}, a:recv())
    p:join()
    assert.is_true(sib:is_alive())
    sib:kill()
    sib:join()
  end)
end)

describe("the fork discipline", function()
  it("flushes buffered output before the fork (printed once)", function()
    local path = tmpfile()
    local out, err, code = H.script(PRE .. [[
      io.write("x")
      local f = assert(io.open(arg[1], "w"))
      f:write("y")
      local p = mp.Process{target = function() io.write("c") f:write("z") end}
      p:start() p:join()
      f:close()
      io.write("\n")
    ]], H.q(path))
    assert.equal(0, code, err)
    assert.equal("xc\n", out)
    assert.equal("yz", H.slurp(path))
    os.remove(path)
  end)

  -- (luamp_flush_stdio looks for pending output before it calls
  -- fflush(NULL): every kind of stream the io library makes counts)
  it("flushes output pending in any stream before the fork", function()
    local path, path2 = tmpfile(), tmpfile()
    local out, err, code = H.script(PRE .. [[
      local f = assert(io.open(arg[1], "w+"))
      f:write("ab") f:seek("set", 0) assert(f:read(1) == "a")
      f:write("c")                   -- after a read: pending in r+ mode
      local pw = assert(io.popen("cat >> " .. arg[2], "w"))
      pw:write("p")
      -- (the child's own output makes it flush at its exit: what it
      -- inherited unflushed would be written twice)
      local p = mp.Process{target = function() io.write("k") end}
      p:start() p:join()
      f:close() pw:close()
    ]], H.q(path) .. " " .. H.q(path2))
    assert.equal(0, code, err)
    assert.equal("k", out)
    assert.equal("ac", H.slurp(path))
    assert.equal("p", H.slurp(path2))
    os.remove(path) os.remove(path2)
  end)

  it("flushes the child's own output before it leaves", function()
    local out = H.script(PRE .. [[
      local p = mp.Process{target = function() io.write("no newline") end}
      p:start() p:join()
      local q = mp.Process{target = function() io.write("then exit ") os.exit(0) end}
      q:start() q:join()
      local r = mp.Process{target = function()
        io.write("then error ") error("x") end}
      r:start() r:join()
    ]])
    assert.equal("no newlinethen exit then error ", out)
  end)

  it("does not run the parent's finalizers in the child", function()
    local out, err = H.script(PRE .. [[
      MAIN = core.getpid()
      KEEP = setmetatable({}, {__gc = function()
        io.write("finalized in ", core.getpid() == MAIN and "parent" or "child", "\n")
      end})
      local path = os.tmpname() os.remove(path)
      local l = mp.connection.Listener(path)
      local d = mp.Process{daemon = true, target = function() core.sleep(30) end}
      d:start()
      local p = mp.Process{target = function()
        l = nil
        collectgarbage() collectgarbage()
      end}
      p:start() p:join()
      print("socket file kept:", os.rename(path, path) == true)
      print("daemon alive:", d:is_alive())
      -- a child that closes its Lua state on exit runs the finalizers of
      -- its own copy, but touches nothing of the parent's
      local q = mp.Process{target = function() os.exit(0, true) end}
      q:start() q:join()
      print("daemon still alive:", d:is_alive(), q.exitcode)
      l:close()
      print("socket file removed:", os.rename(path, path) == nil)
    ]])
    assert.equal("socket file kept:\ttrue\ndaemon alive:\ttrue\n" ..
      "finalized in child\n" ..
      "daemon still alive:\ttrue\t0\nsocket file removed:\ttrue\n" ..
      "finalized in parent\n", out, err)
  end)

  it("gives children /dev/null as stdin (input is never read twice)", function()
    local path = os.tmpname() .. ".lua"
    H.write(path, PRE .. [[
      local function child() io.write(tostring(io.read("l")), "\n") end
      local p = mp.Process{target = child}
      p:start() p:join()
      io.write(io.read("l"), "\n")      -- buffers the rest of the input
      local q = mp.Process{target = child}
      q:start() q:join()
      io.write(io.read("l"), "\n")
    ]])
    local out = H.luamp_run(H.q(path), "line1\nline2\n")
    os.remove(path)
    assert.equal("nil\nline1\nnil\nline2\n", out)
  end)

  it("never dies of SIGPIPE: a write to a gone peer is BrokenPipeError", function()
    local out, err, code = H.script(PRE .. [[
      local a, b = mp.Pipe(false)
      a:close()
      local ok, e = pcall(b.send_bytes, b, "x")
      print(ok, e.kind)
      local c, d = mp.Pipe()
      d:close()
      ok, e = pcall(c.send, c, "x")
      print(ok, e.kind)
      local p = mp.Process{target = function()
        local r, w = mp.Pipe(false) r:close()
        local ok2, e2 = pcall(w.send_bytes, w, "x")
        os.exit((not ok2 and e2.kind == "BrokenPipeError") and 5 or 6)
      end}
      p:start() p:join() print(p.exitcode)
    ]])
    assert.equal(0, code, err)
    assert.equal("false\tBrokenPipeError\nfalse\tBrokenPipeError\n5\n", out)
  end)

  it("unblocks signals in the child and restores SIGCHLD", function()
    -- luamp started with SIGTERM blocked and SIGCHLD ignored (inherited
    -- through exec, as from a careless host)
    local script = os.tmpname() .. ".lua"
    H.write(script, PRE .. [[
      local function status(pid, field)
        for l in io.lines("/proc/" .. pid .. "/status") do
          local v = l:match("^" .. field .. ":%s*(%x+)")
          if v then return v end
        end
      end
      print("parent blocked", status(core.getpid(), "SigBlk"))
      local a, b = mp.Pipe()
      local p = mp.Process{target = function()
        b:send(status(core.getpid(), "SigBlk"))
        core.sleep(30)
      end}
      p:start()
      print("child blocked", a:recv())
      p:terminate() p:join()
      print("exitcode", p.exitcode)
    ]])
    local out, err = H.sh("env -u LD_PRELOAD /usr/bin/python3 -c " .. H.q(
      "import os, signal, sys\n" ..
      "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n" ..
      "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n" ..
      "os.execv(sys.argv[1], sys.argv[1:])") .. " " .. H.q(H.luamp) .. " " ..
      H.q(script))
    os.remove(script)
    assert.equal("parent blocked\t0000000000004000\n" ..
      "child blocked\t0000000000000000\nexitcode\t-15\n", out, err)
  end)

  it("makes every fd close-on-exec", function()
    local out, err = H.script(PRE .. [[
      -- fd -> flags of this process's fds, read through a shell
      local function fds()
        local tmp = os.tmpname()
        os.execute("grep -H flags /proc/" .. core.getpid() .. "/fdinfo/* >" .. tmp)
        local t = {}
        for l in io.lines(tmp) do
          local fd, flags = l:match("fdinfo/(%d+):flags:%s*(%d+)")
          t[tonumber(fd)] = tonumber(flags, 8)
        end
        os.remove(tmp)
        return t
      end
      local before = fds()
      local a, b = mp.Pipe()
      local c, d = mp.Pipe(false)
      local l = mp.connection.Listener{address = {"127.0.0.1", 0}}
      local u = mp.connection.Listener()
      local cl = mp.connection.Client(l.address)
      local sv = l:accept()
      local p = mp.Process{target = function() core.sleep(30) end}
      p:start()
      local _ = p.sentinel
      local new, bad = 0, 0
      for fd, flags in pairs(fds()) do
        if not before[fd] then
          new = new + 1
          if flags & 0x80000 == 0 then bad = bad + 1 end
        end
      end
      p:kill() p:join()
      print(new, bad)
    ]])
    -- 4 (a duplex Pipe: two pipes) + 2 + 2 listeners + 2 connected +
    -- sentinel + /dev/null (children's stdin)
    assert.equal("12\t0\n", out, err)
  end)

  it("runs at-fork hooks in order (before reversed), errors reported", function()
    local out, err = H.script(PRE .. [[
      local log = {}
      local r, w = mp.Pipe(false)
      for i = 1, 2 do
        mp.register_at_fork{
          before = function() log[#log + 1] = "before" .. i end,
          after_in_parent = function() log[#log + 1] = "parent" .. i end,
          after_in_child = function() w:send("child" .. i) end,
        }
      end
      mp.register_at_fork{after_in_parent = function() error("hook failed") end}
      local p = mp.Process{target = function() end}
      p:start() p:join()
      print(table.concat(log, " "), r:recv(), r:recv(), p.exitcode)
      print(pcall(mp.register_at_fork, {}))
      print(pcall(mp.register_at_fork, {before = 1}))
    ]])
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal("before2 before1 parent1 parent2\tchild1\tchild2\t0", lines[1])
    assert.matches("^false\t.*at least one", lines[2])
    assert.matches("^false\t.*must be a function", lines[3])
    assert.matches("error in at%-fork hook %(ignored%):.*hook failed", err)
  end)

  it("lets at-fork hooks in a started child know who it is", function()
    local out, err = H.script(PRE .. [[
      local r, w = mp.Pipe(false)
      mp.register_at_fork{after_in_child = function()
        w:send(mp.current_process().name)
      end}
      local p = mp.Process{name = "Kid", target = function() end}
      p:start() p:join()
      print(r:recv(), p.exitcode)
    ]])
    assert.equal("Kid\t0\n", out, err)
  end)

  it("lets Ctrl-C (SIGINT) end a child's run with 'interrupted!' (exit code 1)", function()
    local out, err = H.script(PRE .. [[
      local p = mp.Process{target = function() while true do end end}
      p:start()
      core.sleep(0.2)
      core.kill(p.pid, "SIGINT")
      p:join(10)
      print(p.exitcode)
    ]])
    assert.equal("1\n", out)
    assert.matches("interrupted!", err)
  end)

  it("lets Ctrl-C interrupt a join in the parent", function()
    local out, err = H.script(PRE .. [[
      local parent = core.getpid()
      local p = mp.Process{daemon = true, target = function() core.sleep(30) end}
      p:start()
      local k = mp.Process{target = function()
        core.sleep(0.3) core.kill(parent, "SIGINT") end}
      k:start()
      local t0 = core.now()
      print(pcall(p.join, p))
      print(core.now() - t0 < 10, p:is_alive())
      k:join()
    ]])
    assert.equal("false\tinterrupted!\ntrue\ttrue\n", out, err)
  end)

  it("works with a pipe sentinel where pidfds are missing", function()
    local out, err = H.script(PRE .. [[
      local p = mp.Process{target = function() core.sleep(0.2) os.exit(4) end}
      p:start()
      local s = p.sentinel
      print(#mp.wait({s}, 0), #mp.wait({s}, 10))
      p:join()
      local q = mp.Process{target = function() core.sleep(30) end}
      q:start() q:join(0.1) print(q.exitcode) q:terminate() q:join()
      print(p.exitcode, q.exitcode)
    ]], nil, "LUAMP_NO_PIDFD=1")
    assert.equal("0\t1\nnil\n4\t-15\n", out, err)
  end)
end)

describe("exit", function()
  -- the main program ends (three ways) while a daemon child and a
  -- non-daemon child run: the daemon is terminated, the other joined
  local body = PRE .. [[
    local flag = arg[1]
    local nd = mp.Process{target = function()
      core.sleep(0.3)
      local f = io.open(flag, "w") f:write("done") f:close()
    end}
    nd:start()
    local d = mp.Process{daemon = true, target = function() core.sleep(60) end}
    d:start()
    print(d.pid)
    io.stdout:flush()
    if arg[2] == "exit" then os.exit(3) end
    if arg[2] == "error" then error("main failed") end
  ]]
  for _, how in ipairs {"end", "exit", "error"} do
    for _, interp in ipairs {"luamp", "lua5.4"} do
      it("terminates daemons and joins the others (" .. how .. ", " .. interp .. ")", function()
        local flag = tmpfile()
        local path = os.tmpname() .. ".lua"
        H.write(path, body)
        local cmd
        if interp == "luamp" then
          cmd = H.q(H.luamp)
        else
          cmd = "LUA_CPATH=" .. H.q(H.build .. "/?.so") .. " " .. H.lua54
        end
        local t0 = core.now()
        local out, err, code = H.sh(cmd .. " " .. H.q(path) .. " " ..
                                    H.q(flag) .. " " .. how)
        local dt = core.now() - t0
        os.remove(path)
        assert.equal(({["end"] = 0, exit = 3, error = 1})[how], code, err)
        assert.equal("done", H.slurp(flag))
        os.remove(flag)
        local dpid = tonumber(out:match("%d+"))
        assert.is_false(alive(dpid))
        assert.is_true(dt < 30, "took " .. dt)
      end)
    end
  end

  it("kills a daemon that ignores SIGTERM after a grace period", function()
    local t0 = core.now()
    local out, err, code = H.script(PRE .. [[
      local r, w = mp.Pipe(false)
      local d = mp.Process{daemon = true, target = function()
        core.set_signal("SIGTERM", "ignore")
        w:send("ready")
        while true do core.sleep(0.05) end
      end}
      d:start()
      r:recv()
      print(d.pid)
    ]])
    local dt = core.now() - t0
    assert.equal(0, code, err)
    local dpid = tonumber(out:match("%d+"))
    assert.is_false(alive(dpid))
    assert.is_true(dt > 1.9 and dt < 20, "took " .. dt)
  end)
end)

describe("caught signals", function()
  it("flags a signal set to catch; a forked child has it at its default", function()
    local out, err, code = H.script(PRE .. [[
      core.set_signal("SIGUSR1", "catch")
      print(core.signal_caught("SIGUSR1"))
      core.kill(mp.current_process().pid, "SIGUSR1")
      print(core.signal_caught("SIGUSR1"), core.signal_caught("SIGUSR1"))
      local p = mp.Process{target = function()
        core.kill(mp.current_process().pid, "SIGUSR1")
        core.sleep(5)
      end}
      p:start() p:join()
      print(p.exitcode)
      core.set_signal("SIGUSR1", "default")
    ]])
    assert.equal(0, code, err)
    assert.equal("false\ntrue\tfalse\n-10\n", out)
  end)
end)

describe("lifecycle", function()
  it("10^3 start/join cycles leave no zombie and no fd", function()
    -- (earlier tests' finished children are reaped first, and what they
    -- held collected, so that it is not counted as freed by the loop)
    -- One start first: the runtime opens /dev/null once, on the first
    -- start, for children's stdin (run alone, the loop counted it).
    local f = function() end
    local warm = mp.Process{target = f}
    warm:start()
    warm:join()
    mp.active_children()
    collectgarbage()
    collectgarbage()
    local fds, z = H.fd_count(), H.zombies()
    for _ = 1, H.soak(1000) do
      local p = mp.Process{target = f}
      p:start()
      p:join()
      assert(p.exitcode == 0)
    end
    collectgarbage()
    collectgarbage()
    assert.equal(fds, H.fd_count())
    assert.equal(z, H.zombies())
    assert.same({}, mp.active_children())
  end)

  H.once(it, "gives freed heap back before forking (children do not map it)", function()
    -- 200k small tables, dropped: malloc keeps their ~30 MiB mapped
    -- unless it is trimmed, and every fork would copy its page tables
    if H.sanitized() then
      pending("ASan's allocator keeps freed memory in quarantine")
      return
    end
    local out, err = H.script(PRE .. [[
      local t = {}
      for i = 1, 200000 do t[i] = {i, tostring(i)} end
      t = nil
      collectgarbage() collectgarbage()
      local p = mp.Process{target = function() end}
      p:start() p:join()
      for l in io.lines("/proc/self/status") do
        local kib = l:match("^RssAnon:%s*(%d+)")
        if kib then print(kib) end
      end
    ]])
    local kib = tonumber(out)
    assert(kib, err)
    assert.is_true(kib < 8192, "RssAnon " .. kib .. " KiB after the fork")
  end)

  it("joined processes hold no fd, even before they are collected", function()
    mp.active_children()
    collectgarbage()
    collectgarbage()
    local fds = H.fd_count()
    local keep = {}
    for i = 1, 50 do
      keep[i] = mp.Process{target = function() end}
      keep[i]:start()
      keep[i]:join()
    end
    assert.equal(fds, H.fd_count())
    assert.equal(50, #keep)
  end)

  it("closing processes releases their sentinels at once", function()
    mp.active_children()
    collectgarbage()
    collectgarbage()
    local fds = H.fd_count()
    for _ = 1, 50 do
      local p = mp.Process{target = function() end}
      p:start()
      local _ = p.sentinel
      p:join()
      p:close()
    end
    assert.equal(fds, H.fd_count())
  end)
end)

describe("logging", function()
  it("logs '[LEVEL/ProcessName] message' to stderr", function()
    local out, err = H.script(PRE .. [[
      local log = mp.get_logger()
      log:warning("no handler yet")
      log:info("not shown")
      mp.log_to_stderr("INFO")
      assert(mp.get_logger() == log)
      log:info("hello %d", 42)
      log:debug("not shown")
      local p = mp.Process{name = "Worker", target = function()
        mp.get_logger():warning("from the child")
      end}
      p:start() p:join()
      log:set_level("DEBUG")
      log:debug("debug now")
      log:critical("bad")
      print(pcall(log.set_level, log, "LOUD"))
    ]])
    assert.matches("^no handler yet\n", err)
    assert.matches("%[INFO/MainProcess%] hello 42\n", err)
    assert.matches("%[WARNING/Worker%] from the child\n", err)
    assert.matches("%[DEBUG/MainProcess%] debug now\n", err)
    assert.matches("%[CRITICAL/MainProcess%] bad\n", err)
    assert.matches("%[INFO/Worker%] process exiting with exitcode 0\n", err)
    assert.is_nil(err:find("not shown", 1, true))
    assert.matches("^false\t.*level expected", out)
  end)

  -- (issue 18: a child's start writes nothing it need not -- every page it
  -- writes is copied; logger:log checked its arguments with type() and
  -- math.tointeger, each a page of code and a string-cache write, in every
  -- child, for records nobody was to see)
  it("a child starting with logging off does not call the logger", function()
    local out, err, code = H.script(PRE .. [[
      local log = mp.get_logger()
      local calls = 0
      log.log = function() calls = calls + 1 end
      local p = mp.Process{target = function() os.exit(calls) end}
      p:start() p:join()
      print(p.exitcode, calls)
    ]])
    assert.equal(0, code, err)
    assert.equal("0\t0\n", out)
  end)

  -- (issue 18: every page a forked child reads costs it a fault of the
  -- hypervisor's own here, ~5 us; its start no longer reads the globals
  -- table, package.loaded and util for the logger, nor looks self.run up
  -- again: the parent found it a moment before the fork)
  -- (start() finds whether the child's exit record is to be logged before
  -- the fork; a run() that changes the logger's level is asked again)
  it("a child whose run turns logging on logs its exit, one that leaves it off does not", function()
    local out, err, code = H.script(PRE .. [[
      local on = mp.Process{name = "On", target = function() mp.log_to_stderr("INFO") end}
      local off = mp.Process{name = "Off", target = function() end}
      on:start() on:join() off:start() off:join()
      print(on.exitcode, off.exitcode)
    ]])
    assert.equal(0, code, err)
    assert.equal("0\t0\n", out)
    assert.matches("%[INFO/On%] process exiting with exitcode 0\n", err)
    assert.is_nil(err:find("Off", 1, true))
  end)

  it("a child starts in a program that took xpcall out of its globals", function()
    local out, err, code = H.script(PRE .. [[
      local p = mp.Process{target = function() io.write("ran\n") end}
      xpcall = nil
      p:start() p:join()
      print(p.exitcode)
    ]])
    assert.equal(0, code, err)
    assert.equal("ran\n0\n", out)
  end)
end)

-- issue 13 items 9 and 12
describe("Process identity and misuse (issue 13)", function()
  it("current_process():is_alive() is true, in the main process and a pool worker", function()
    assert.is_true(mp.current_process():is_alive())
    local pool <close> = mp.Pool(1)
    assert.same({true, "Pool"}, pool:apply(function()
      local me = mp.current_process()
      return {me:is_alive(), me.name:match("^Pool")}
    end))
  end)

  it("active_children() lists a pool's workers while they run", function()
    local pool = mp.Pool(2)
    local kids = mp.active_children()
    local pids = {}
    for _, p in ipairs(kids) do
      if tostring(p.name):match("^Pool%d+%-Worker%-%d$") then
        pids[#pids + 1] = p.pid
        assert.is_true(p:is_alive())
        assert.is_true(p.daemon)
      end
    end
    table.sort(pids)
    local want = {}
    for _, w in pairs(pool._workers) do want[#want + 1] = w.pid end
    table.sort(want)
    assert.same(want, pids)
    pool:terminate()
    for _, p in ipairs(mp.active_children()) do
      assert.is_nil(tostring(p.name):match("^Pool%d+%-Worker"))
    end
    -- the objects handed out before say the worker is gone
    for _, p in ipairs(kids) do
      if tostring(p.name):match("^Pool") then
        assert.is_false(p:is_alive())
        assert.is_number(p.exitcode)
      end
    end
  end)

  it("p.start() (a dot-call) says to use p:start(...) at the caller's line", function()
    local p = mp.Process(function() end)
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() p.start() end)
    assert.is_false(ok)
    assert.matches("process_spec%.lua:" .. line .. ": calling 'start' on bad self " ..
                   "%(Process expected, got nil; use p:start%(%.%.%.%)%)", err)
    line = debug.getinfo(1, "l").currentline + 1
    ok, err = pcall(function() mp.Process{target = 5} end)
    assert.is_false(ok)
    assert.matches("process_spec%.lua:" .. line .. ": bad argument #1 to 'Process' " ..
                   "%(target must be a function, got number%)", err)
    p:start()
    p:join()
    assert.equal(0, p.exitcode)
  end)
end)
