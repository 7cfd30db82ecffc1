-- The Pool and Executor beyond one machine, on a real redis-server that
-- the spec starts itself (spec/redis_server.lua), with worker daemons
-- (build/luamp-worker) as separate process groups.
local H = require "helpers"
local R = require "redis_server"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local futures = require "multiprocessing.futures"
local broker = require "multiprocessing.broker"

local KEY = "secret"

describe("broker URLs and options", function()
  it("parses redis:// and unix:// URLs", function()
    local c = broker.parse_url("redis://u%40x:p%3Aw@example.org:6380/3", "Pool")
    assert.same({username = "u@x", password = "p:w", host = "example.org", port = 6380, db = 3}, c)
    c = broker.parse_url("redis://:pw@10.0.0.1", "Pool")
    assert.same({password = "pw", host = "10.0.0.1", port = 6379, db = 0}, c)
    c = broker.parse_url("unix:///run/redis.sock?db=2", "Pool")
    assert.same({path = "/run/redis.sock", db = 2}, c)
    local err = H.err_of(broker.parse_url, "http://x", "Pool")
    assert.equal("ValueError", err.kind)
    assert.matches("Pool: broker URL must be", err.message)
  end)

  it("refuses to start without an authkey", function()
    local err = H.err_of(mp.Pool, {broker = "unix:///nonexistent.sock"})
    assert.equal("ValueError", err.kind)
    assert.matches("needs an authkey", err.message)
    -- the worker daemon too, without one or with an empty key file
    local empty = H.write(os.tmpname(), "\n")
    for _, extra in ipairs {"", " --authkey-file " .. H.q(empty)} do
      local _, e, code = H.sh(H.q(R.worker) .. " --broker unix:///nonexistent.sock" ..
                              " --namespace x" .. extra)
      assert.equal(1, code)
      assert.matches("luamp%-worker: .*needs an authkey", e)
    end
    os.remove(empty)
  end)

  it("raises BrokenPoolError within the connect timeout when nothing answers", function()
    local t0 = mp.now()
    local err = H.err_of(mp.Pool, {broker = "unix:///nonexistent/redis.sock", authkey = KEY,
                                   connect_timeout = 0.5})
    assert.equal("BrokenPoolError", err.kind)
    assert.matches("unreachable", err.message)
    assert.is_true(mp.now() - t0 < 5)
    -- a TCP address that drops packets: the connect itself times out
    t0 = mp.now()
    err = H.err_of(mp.Pool, {broker = "redis://10.255.255.1:6379", authkey = KEY,
                             connect_timeout = 0.5})
    assert.equal("BrokenPoolError", err.kind)
    assert.is_true(mp.now() - t0 < 5)
  end)
end)

describe("Pool{broker =}", function()
  local s, pool
  setup(function()
    s = R.start()
    s:start_worker{processes = 2}
    pool = mp.Pool{broker = s.url, namespace = "test", authkey = KEY, lease = 5}
  end)
  teardown(function()
    if pool then pool:terminate() end
    if s then s:stop() end
  end)

  it("runs apply, map, starmap with closures and nils", function()
    local k = 10
    assert.same({13, 2}, {pool:apply(function(a, b) return a + b + k, 2 end, {1, 2})})
    local r = pool:map(function(x) return x * k end, {1, 2, 3})
    assert.same({10, 20, 30, n = 3}, r)
    r = pool:map(function(x) if x % 2 == 0 then return nil end return x end, H.range(5))
    assert.same({1, nil, 3, nil, 5, n = 5}, r)
    r = pool:starmap(function(a, b) return a .. b end, {{"a", "b"}, {"c", "d"}})
    assert.same({"ab", "cd", n = 2}, r)
    assert.same({n = 0}, pool:map(function(x) return x end, {}))
    -- (the progress bar is drawn on a terminal only; here it is accepted)
    assert.same({2, 4, n = 2}, pool:map(function(x) return 2 * x end, {1, 2}, {progress = true}))
  end)

  it("gives the task's id and attempt to mp.current_task()", function()
    local t = pool:apply(function() return mp.current_task() end)
    assert.equal(1, t.attempt)
    assert.matches("^%x+%.%d+$", t.id)
    assert.is_nil(mp.current_task())
  end)

  it("runs apply_async with callbacks and raises a task's error as RemoteError", function()
    local got, bad
    local a = pool:apply_async(function(x) return x + 1 end, {1}, function(v) got = v end)
    local b = pool:apply_async(function() error("boom") end, {}, {error_callback = function(e) bad = e end})
    assert.equal(2, a:get(10))
    local err = H.err_of(b.get, b, 10)
    assert.equal("RemoteError", err.kind)
    assert.matches("boom", err.message)
    assert.equal(2, got)
    assert.equal(err, bad)
    assert.is_true(a:successful())
    assert.is_false(b:successful())
  end)

  it("iterates imap in order and imap_unordered as results come", function()
    local seen = {}
    for i, v in pool:imap(function(x) return x * 2 end, H.range(20), 3) do seen[i] = v end
    for i = 1, 20 do assert.equal(2 * i, seen[i]) end
    local n, sum = 0, 0
    for _, v in pool:imap_unordered(function(x) return x end, H.range(10)) do
      n, sum = n + 1, sum + v
    end
    assert.equal(10, n)
    assert.equal(55, sum)
  end)

  it("runs a per-task timeout on the worker's host", function()
    local ar = pool:apply_async(function() while true do end end, {}, {timeout = 0.3})
    local err = H.err_of(ar.get, ar, 20)
    assert.equal("TimeoutError", err.kind)
    assert.equal(5, pool:apply(function() return 5 end))
  end)

  it("serves futures.ProcessPoolExecutor{broker =}", function()
    local ex = futures.ProcessPoolExecutor{broker = s.url, namespace = "test", authkey = KEY}
    local f = ex:submit(function(a, b) return a * b end, 6, 7)
    assert.equal(42, f:result(10))
    local out = {}
    for i, v in ex:map(function(x) return x + 1 end, {1, 2, 3}) do out[i] = v end
    assert.same({2, 3, 4}, out)
    local done = futures.wait({ex:submit(function() return 1 end)}, {timeout = 10})
    assert.equal(1, #done)
    -- with a local pool's futures in the same wait
    local lp <close> = mp.Pool(1)
    local fs = {lp:apply_async(function() return "local" end), ex:submit(function() return "remote" end)}
    done = futures.wait(fs, {timeout = 20})
    assert.equal(2, #done)
    local got = {}
    for f in futures.as_completed({ex:submit(function() return 1 end),
                                   lp:apply_async(function() return 2 end)}, 20) do
      got[#got + 1] = f:result()
    end
    table.sort(got)
    assert.same({1, 2}, got)
    ex:shutdown()
  end)

  -- As in pool_faults_spec: a hook raising "interrupted!" (what Ctrl-C
  -- does) at random instruction boundaries of gets, many times.
  it("loses no result to Ctrl-C at any instruction of a get", function()
    -- (only inside the get: one landing in this test's own code, outside
    -- its pcall, would end the test)
    local inside = false
    local function arm()
      debug.sethook(function()
        debug.sethook()
        if inside then error("interrupted!", 0) end
      end, "", math.random(1, 3000))
    end
    math.randomseed(7)
    local interrupts = 0
    for round = 1, 10 do
      local rs = {}
      for i = 1, 10 do rs[i] = pool:apply_async(function(x) return x end, {i}) end
      for i = 1, 10 do
        while true do
          local ok, v = pcall(function()
            arm()
            inside = true
            local v = rs[i]:get(30)
            inside = false
            return v
          end)
          inside = false
          debug.sethook()
          if ok then assert.equal(i, v) break end
          assert.equal("interrupted!", v, round .. ":" .. i)
          interrupts = interrupts + 1
        end
      end
    end
    assert.is_true(interrupts >= 3, "only " .. interrupts .. " interrupts")
  end)

  -- The same hook over submits and gets on one connection: every
  -- apply_async that returned gives its own result, exactly; one cut by
  -- the Ctrl-C left no half-recorded task (a hash nothing queues, or a
  -- task counted that never runs: join would wait forever); no reply is
  -- taken for another's (a wrong result, or a call stalled for the 30 s
  -- of a reply timeout).
  it("keeps results exact under Ctrl-C at any instruction of apply_async and get", function()
    local p <close> = mp.Pool{broker = s.url, namespace = "test", authkey = KEY, lease = 5}
    -- (landing in luamp's code only, as in broker_queue_spec)
    local function armed(f, ...)
      debug.sethook(function()
        debug.sethook()
        if debug.getinfo(2, "S").source:find("multiprocessing/", 1, true) then
          error("interrupted!", 0)
        end
      end, "", math.random(1, 800))
      local r = table.pack(pcall(f, ...))
      debug.sethook()
      return table.unpack(r, 1, r.n)
    end
    math.randomseed(17)
    local t0, interrupts, rs = mp.now(), 0, {}
    local function double(x) return 2 * x end
    local function get(i)
      while true do
        local ok, v = armed(rs[i].get, rs[i], 30)
        if ok then assert.equal(2 * i, v, "result " .. i) return end
        assert.equal("interrupted!", v, tostring(v))
        interrupts = interrupts + 1
      end
    end
    for i = 1, 200 do
      local ok, r = armed(p.apply_async, p, double, {i})
      if ok then rs[i] = r
      else
        assert.equal("interrupted!", r, tostring(r))
        interrupts = interrupts + 1
      end
      if i % 4 == 0 and rs[i - 2] then get(i - 2) end
    end
    for i = 1, 200 do if rs[i] then get(i) end end
    assert.is_true(interrupts >= 20, "only " .. interrupts .. " interrupts")
    -- every task on the books ran: join returns (its wait bounded here)
    p:close()
    while p._ntasks > 0 and mp.now() - t0 < 60 do p:_pump(mp.now() + 0.5) end
    assert.equal(0, p._ntasks)
    p:join()
    assert.equal("", s:cli("KEYS " .. H.q("luamp:test:t:" .. p._cid .. ".*")))
    assert.is_true(mp.now() - t0 < 25, "took " .. (mp.now() - t0) .. " s")
  end)

  it("ends a wait for a result on Ctrl-C", function()
    local t0 = mp.now()
    local out, err, code = H.script(string.format([[
      local mp = require "multiprocessing"
      local pool = mp.Pool{broker = %q, namespace = "nobody-serves", authkey = "k"}
      os.execute("(sleep 0.5; kill -INT " .. mp.current_process().pid .. ") &")
      pool:apply(function() return 1 end)
      print("returned")
    ]], s.url))
    assert.is_nil(out:match("returned"))
    assert.matches("interrupted!", err)
    assert.are_not.equal(0, code)
    assert.is_true(mp.now() - t0 < 20)
  end)

  it("serves a forked child through its parent's Pool without mixing results", function()
    -- the parent's result is in Redis while the child waits for its own
    local first = pool:apply_async(function() return "parent" end)
    local p = mp.Process{target = function()
      local ok = pool:apply(function()
        local t0 = mp.now()
        while mp.now() - t0 < 0.3 do end
        return "child"
      end) == "child"
      os.exit(ok and 0 or 3)
    end}
    p:start() p:join()
    assert.equal(0, p.exitcode)
    assert.equal("parent", first:get(5))
  end)

  it("refuses runtime handles of this host, naming where they sit", function()
    local lock = mp.Lock()
    local q = mp.Queue()
    local err = H.err_of(pool.apply, pool, function(x) return x end, {1, {inner = lock}})
    assert.equal("EncodeError", err.kind)
    assert.matches("multiprocessing.Lock at args%[2%]%[\"inner\"%]", err.message)
    err = H.err_of(pool.map, pool, function(x) q:put(x) end, {1, 2})
    assert.equal("EncodeError", err.kind)
    assert.matches("at function upvalue 'q'", err.message)
    err = H.err_of(pool.map, pool, function(x) return x end, {1, 2, lock})
    assert.matches("at iterable%[3%]", err.message)
    -- the standard library and loaded modules are fine
    assert.equal("ABC", pool:apply(function(s) return string.upper(s) end, {"abc"}))
  end)

  it("sends C functions by name; one the worker cannot resolve fails the task clearly", function()
    -- a C function the worker has: found by its name
    local upper = string.upper
    assert.equal("AB", pool:apply(function(x) return upper(x) end, {"ab"}))
    -- a C function of a module only this process has (an iterator made
    -- here, named by the module that holds it)
    package.loaded["only_here"] = {iter = string.gmatch("a", "a")}
    local it = package.loaded.only_here.iter
    local ar = pool:apply_async(function() return it end)
    local err = H.err_of(ar.get, ar, 20)
    package.loaded["only_here"] = nil
    assert.equal("DecodeError", err.kind)
    assert.matches("cannot run task %S+: cannot load module 'only_here': module 'only_here' " ..
                   "not found %(C functions and modules travel by name", err.message)
    assert.is_nil(err.message:find("no file", 1, true))   -- (not require's search list)
    -- a module the worker has, without that field
    local util = require "multiprocessing.util"
    util.only_here = string.gmatch("b", "b")
    local f = util.only_here
    err = H.err_of(pool.map, pool, function(x) return f, x end, {1, 2})
    util.only_here = nil
    assert.equal("DecodeError", err.kind)
    assert.matches("module 'multiprocessing.util' has no field 'only_here'", err.message)
    assert.matches("must be loadable on the worker", err.message)
    -- a C function of no loaded module: refused here, at the call
    local loose = string.gmatch("c", "c")
    err = H.err_of(pool.apply, pool, function() return loose end)
    assert.equal("EncodeError", err.kind)
    assert.matches("C function", err.message)
    -- and the pool serves on
    assert.equal(3, pool:apply(function() return 3 end))
  end)

  it("gives event loops an fd: readable when a result comes, poll() collects", function()
    local fd, got = pool:fileno(), nil
    assert.equal(fd, pool:pollfd())
    assert.equal("r", pool:events())
    assert.is_true(pool:timeout() <= 1)
    -- the fd taken once, as a libuv poll handle keeps it: poll() re-arms
    for round = 1, 2 do
      got = nil
      pool:apply_async(function(x) return x end, {round}, function(v) got = v end)
      local t0 = mp.now()
      while not got and mp.now() - t0 < 20 do
        mp.wait({fd}, 5)
        pool:poll()
      end
      assert.equal(round, got)
    end
    -- an idle pool's fd wakes for its reap (at most a second), not never
    local t0 = mp.now()
    assert.equal(1, #mp.wait({pool:fileno()}, 10))
    assert.is_true(mp.now() - t0 < 8)
    pool:poll()
    -- the executor's, and a future's
    local ex = futures.ProcessPoolExecutor{broker = s.url, namespace = "test", authkey = KEY}
    local fut = ex:submit(function() return 7 end)
    local res
    fut:add_done_callback(function(f) res = f:result() end)
    t0 = mp.now()
    while not res and mp.now() - t0 < 20 do
      mp.wait({ex:fileno()}, 5)
      ex:poll()
    end
    assert.equal(7, res)
    assert.equal("r", ex:events())
    ex:shutdown()
    -- a forked child arms its own connection, not its parent's
    local p = mp.Process{target = function()
      local cfd = pool:fileno()
      local v
      pool:apply_async(function() return "child" end, nil, function(x) v = x end)
      local t1 = mp.now()
      while not v and mp.now() - t1 < 20 do mp.wait({pool:fileno()}, 5) pool:poll() end
      os.exit((v == "child" and cfd ~= fd) and 0 or 3)
    end}
    p:start() p:join()
    assert.equal(0, p.exitcode)
  end)

  it("is refused by a worker of another bytecode format, with a clear error", function()
    local bp = require "multiprocessing.broker_pool"
    local saved = bp.FORMAT
    bp.FORMAT = "Lua 9.9/luamp-0"
    local ok, err = pcall(pool.apply, pool, function() return 1 end)
    bp.FORMAT = saved
    assert.is_false(ok)
    assert.equal("DecodeError", err.kind)
    assert.matches("task made by Lua 9.9/luamp%-0, this worker runs Lua 5.4", err.message)
  end)

  it("refuses a task of another format before decoding a byte of it", function()
    -- a task as a client of another Lua or luamp writes it, its signature
    -- good: the bytes after its format line are not this codec's (0xc1
    -- is never used in MessagePack), and are never read
    local id = "foreign" .. H.pid() .. ".1"
    local payload = "Lua 9.9/luamp-0 (bytecode 9900-04080878)\n\xc1\xc1 not ours"
    local r = core.redis_connect(nil, nil, s.sock, 5)
    r:command({"HSET", "luamp:test:t:" .. id, "env", broker.sign_task(KEY, id, payload),
               "att", 0, "max", 1, "lease", 5000, "ttl", 60})
    r:command({"LPUSH", "luamp:test:q", id})
    local got = r:command({"BLPOP", "luamp:test:r:foreign" .. H.pid(), 30}, 40)
    r:close()
    assert.is_truthy(got, "no result")
    local tag, rid, att, res = broker.open_result(KEY, got[2])
    assert.same({"R", id, "1"}, {tag, rid, att})
    local out = mp.decode(res, {trusted = true})
    assert.equal(require("multiprocessing.pool_proto").FAILED, out[1])
    assert.equal("DecodeError", out[2].kind)
    assert.matches("worker cannot run task " .. id .. ": task made by Lua 9.9/luamp%-0 " ..
                   "%(bytecode 9900%-04080878%), this worker runs Lua 5.4/luamp%-", out[2].message)
  end)

  it("refuses a result that fails its signature check without decoding it", function()
    local p2 <close> = mp.Pool{broker = s.url, namespace = "nobody-serves-r", authkey = KEY}
    local ar = p2:apply_async(function() return 1 end)
    local id = p2._cid .. ".1"
    -- forged: a function in it, a wrong MAC
    local OK = require("multiprocessing.pool_proto").OK
    local payload = mp.encode({OK, false, {0, OK, 1, function() return "forged" end}})
    local r = core.redis_connect(nil, nil, s.sock, 5)
    r:command({"RPUSH", "luamp:nobody-serves-r:r:" .. p2._cid,
               "R" .. id .. "|1|" .. string.rep("m", 32) .. payload})
    r:close()
    local err = H.err_of(ar.get, ar, 10)
    assert.equal("AuthenticationError", err.kind)
    assert.matches("result of task " .. id .. " failed its signature check", err.message)
    assert.matches(id .. "|1|result failed its signature check",
                   s:cli("LRANGE luamp:nobody-serves-r:dead 0 -1"), 1, true)
  end)

  it("refuses a foreign Redis connection in a forked child", function()
    local r = core.redis_connect(nil, nil, s.sock, 5)
    assert.equal("PONG", r:command({"PING"}))
    -- close-on-exec from the start (O_CLOEXEC is 02000000 in fdinfo's flags)
    local flags = H.slurp("/proc/self/fdinfo/" .. r:fileno()):match("flags:%s*(%d+)")
    assert.equal(1, (tonumber(flags, 8) >> 19) & 1)
    local p = mp.Process{target = function()
      local ok, err = pcall(r.command, r, {"PING"})
      os.exit(not ok and err.kind == "ValueError" and err.message:find("belongs to process") and 0 or 3)
    end}
    p:start() p:join()
    assert.equal(0, p.exitcode)
    assert.equal("PONG", r:command({"PING"}))
    -- pipelining: every reply, error replies as error objects
    local rs = r:pipeline({{"SET", "k", "v"}, {"GET", "k"}, {"INCR", "k"}, {"GET", "nokey"}})
    assert.equal("OK", rs[1])
    assert.equal("v", rs[2])
    assert.equal("RemoteError", rs[3].kind)
    assert.is_false(rs[4])
    r:close()
    assert.equal("ValueError", H.kind_of(r.command, r, {"PING"}))
  end)
end)
