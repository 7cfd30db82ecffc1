-- mp.Queue{broker =} and mp.JoinableQueue{broker =}: queues in a real
-- redis-server that the spec starts itself.
local H = require "helpers"
local R = require "redis_server"
local mp = require "multiprocessing"
local core_sleep = require("multiprocessing.core").sleep

describe("Queue{broker =}", function()
  local s
  setup(function() s = R.start() end)
  teardown(function() if s then s:stop() end end)

  local function queue(name, opts, joinable)
    opts = opts or {}
    opts.broker, opts.name, opts.authkey = s.url, name, opts.authkey or "k"
    return joinable and mp.JoinableQueue(opts) or mp.Queue(opts)
  end

  it("is FIFO across processes; nil, tables and functions travel", function()
    local q <close> = queue("fifo")
    local p = mp.Process{target = function()
      q:put(1) q:put(nil) q:put({a = {1, 2}}) q:put(function(x) return x + 1 end)
      os.exit(0)
    end}
    p:start() p:join()
    assert.equal(1, q:get(true, 5))
    assert.is_nil(q:get(true, 5))
    assert.same({a = {1, 2}}, q:get(true, 5))
    assert.equal(3, q:get(true, 5)(2))
    assert.equal(0, q:qsize())
    assert.is_true(q:empty())
  end)

  it("raises Empty on timeout and get_nowait", function()
    local q <close> = queue("empty")
    assert.equal("Empty", H.kind_of(q.get_nowait, q))
    local t0 = mp.now()
    assert.equal("Empty", H.kind_of(q.get, q, true, 0.3))
    assert.is_true(mp.now() - t0 >= 0.25)
  end)

  it("keeps what a put returned for, even if the putter is SIGKILLed after", function()
    local q <close> = queue("kept")
    local p = mp.Process{target = function()
      q:put("x")
      os.execute("kill -9 $PPID")
    end}
    p:start() p:join()
    assert.equal(-9, p.exitcode)
    assert.equal("x", q:get(true, 5))
  end)

  it("returns an item not task_done() by a dead consumer after the lease", function()
    local jq <close> = queue("jobs", {lease = 0.5}, true)
    jq:put("job1")
    local p = mp.Process{target = function()
      jq:get(true, 5)              -- taken, never done
      os.execute("kill -9 $PPID")
    end}
    p:start() p:join()
    assert.equal(-9, p.exitcode)
    assert.is_false(jq:join(0.1))
    local t0 = mp.now()
    assert.equal("job1", jq:get(true, 10))
    assert.is_true(mp.now() - t0 >= 0.2)
    jq:task_done()
    assert.is_true(jq:join(5))
    assert.equal("ValueError", H.kind_of(jq.task_done, jq))
  end)

  -- A consumer that is SIGKILLed or gets Ctrl-C while the reply of its
  -- get is on the way: a script keeps the server busy for 1.5 s, so the
  -- get's pop runs in Redis only after the consumer died or gave up.
  -- Every item put must still come out (after the lease at worst).
  for _, sig in ipairs {"KILL", "INT"} do
    it("loses no item when its consumer gets SIG" .. sig .. " before get returns", function()
      -- (Ctrl-C: the get gives its item back at once, so a lease longer
      -- than the wait below shows it; SIGKILL: after the lease)
      local q <close> = queue("inflight-" .. sig, {lease = sig == "KILL" and 1 or 600})
      for i = 1, 3 do q:put(i) end
      local ready, go = mp.Event(), mp.Event()
      local p = mp.Process{target = function()
        q:qsize()                  -- (connected before the server is busy)
        ready:set()
        go:wait(10)
        q:get(true, 30)
        os.exit(0)
      end}
      p:start()
      assert.is_true(ready:wait(10))
      H.sh("env -u LD_PRELOAD redis-cli -s " .. H.q(s.sock) .. " EVAL " .. H.q([[
        local t = redis.call('TIME')
        local t0 = t[1] * 1000000 + t[2]
        repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - t0 > 1500000
        return 1]]) .. " 0 >/dev/null 2>&1 &")
      H.sleep(0.3)
      go:set()
      H.sleep(0.4)                 -- (its take is written, its reply not come)
      os.execute("kill -" .. sig .. " " .. p.pid)
      p:join(20)
      assert.are_not.equal(0, p.exitcode)
      local got = {}
      for _ = 1, 3 do got[#got + 1] = q:get(true, 10) end
      table.sort(got)
      assert.same({1, 2, 3}, got)
      assert.equal("Empty", H.kind_of(q.get, q, true, 1.5))
    end)
  end

  it("dead-letters a signed entry that fails to decode, and raises", function()
    local core = require "multiprocessing.core"
    local q <close> = queue("undecodable")
    local payload = "\255not an encoding"
    local entry = "forged.1|" .. core.hmac_sha256("k", "Q" .. "undecodable\0" .. payload) .. payload
    local r = core.redis_connect(nil, nil, s.sock, 5)
    r:command({"RPUSH", "luamp:queue:undecodable:items", entry})
    r:close()
    q:put("next")
    assert.is_not_nil(H.kind_of(q.get, q, true, 5))
    assert.equal("1", s:cli("LLEN luamp:queue:undecodable:dead"))
    assert.equal("next", q:get(true, 5))
    assert.equal("0", s:cli("ZCARD luamp:queue:undecodable:taken"))
  end)

  it("JoinableQueue: a dead-lettered entry is no longer unfinished, so join returns", function()
    local core = require "multiprocessing.core"
    local jq <close> = queue("jdead", nil, true)
    jq:put("tampered")             -- (put by a key holder, then changed in Redis)
    s:cli("EVAL " .. H.q([[
      local e = redis.call('LPOP', KEYS[1])
      redis.call('RPUSH', KEYS[1], string.sub(e, 1, -2) .. 'X')
      return 1]]) .. " 1 luamp:queue:jdead:items")
    local payload = "\255not an encoding"   -- signed, but not a value
    local r = core.redis_connect(nil, nil, s.sock, 5)
    r:command({"RPUSH", "luamp:queue:jdead:items", "forged.1|" ..
               core.hmac_sha256("k", "Q" .. "jdead\0" .. payload) .. payload})
    r:close()
    jq:put("good")
    assert.is_false(jq:join(0.2))
    assert.is_not_nil(H.kind_of(jq.get, jq, true, 5))  -- the undecodable one
    assert.equal("good", jq:get(true, 5))
    assert.is_false(jq:join(0.2))  -- "good" is taken, not done
    jq:task_done()
    assert.is_true(jq:join(5))
    assert.equal("2", s:cli("LLEN luamp:queue:jdead:dead"))
  end)

  it("drops a tampered entry and one signed with another key", function()
    local q <close> = queue("tamper")
    q:put("secret plan")
    s:cli("EVAL " .. H.q([[
      local e = redis.call('LPOP', KEYS[1])
      redis.call('RPUSH', KEYS[1], string.sub(e, 1, -2) .. 'X')
      return 1]]) .. " 1 luamp:queue:tamper:items")
    local other <close> = queue("tamper", {authkey = "other"})
    other:put("from a stranger")
    q:put("good")
    assert.equal("good", q:get(true, 5))
    assert.equal("2", s:cli("LLEN luamp:queue:tamper:dead"))
  end)

  it("ends a blocking get and a join on Ctrl-C", function()
    for _, wait in ipairs {"mp.Queue(o):get()", "local jq = mp.JoinableQueue(o) jq:put(1) jq:join()"} do
      local t0 = mp.now()
      local out, err, code = H.script(string.format([[
        local mp = require "multiprocessing"
        local o = {broker = %q, name = "nothing-comes", authkey = "k"}
        os.execute("(sleep 0.5; kill -INT " .. mp.current_process().pid .. ") &")
        %s
        print("returned")
      ]], s.url, wait))
      assert.is_nil(out:match("returned"), wait)
      assert.matches("interrupted!", err, 1, true)
      assert.are_not.equal(0, code)
      assert.is_true(mp.now() - t0 < 20)
    end
  end)

  -- Ctrl-C at a get: the item it took is the caller's or the queue's,
  -- never lost, never duplicated, never left taken (for its lease).  A
  -- hook raising "interrupted!" (what Ctrl-C does) at random instruction
  -- boundaries of gets, as in broker_spec -- in luamp's code only: landing
  -- in the caller's (this test's, busted's), after the get returned, the
  -- caller has the item (luamp's Ctrl-C too lets a return finish first).
  it("loses and duplicates no item to Ctrl-C at any instruction of a get", function()
    local q <close> = queue("ctrlc-hook")
    local N = 300
    for i = 1, N do q:put(i) end
    local sethook, getinfo, random = debug.sethook, debug.getinfo, math.random
    local function one()
      sethook(function()
        sethook()
        if getinfo(2, "S").source:find("multiprocessing/", 1, true) then
          error("interrupted!", 0)
        end
      end, "", random(1, 400))
      local v = q:get(true, 1)
      sethook()
      return v
    end
    math.randomseed(11)
    local seen, interrupts = {}, 0
    while true do
      local ok, v = pcall(one)
      debug.sethook()
      if ok then
        seen[v] = (seen[v] or 0) + 1
      elseif v == "interrupted!" then
        interrupts = interrupts + 1
      else
        assert.equal("Empty", v.kind, tostring(v))
        break
      end
    end
    for i = 1, N do assert.equal(1, seen[i], "item " .. i) end
    assert.is_true(interrupts > 0)
    assert.equal("0", s:cli("ZCARD luamp:queue:ctrlc-hook:taken"))
  end)

  -- The same for puts, between gets (whose acks wait on the connection to
  -- be read with the next exchange).  A put that returned is in the queue
  -- once; one that raised "interrupted!" is in it once or not at all (as
  -- Python's put, cut by KeyboardInterrupt); the gets see the items in
  -- order, each once; no reply is taken for another's (which would give
  -- a wrong item or error, or stall a call for the 30 s of a reply timeout).
  it("keeps exact contents under Ctrl-C at any instruction of puts and gets", function()
    local q <close> = queue("ctrlc-put")
    local N = 400
    local sethook, getinfo, random = debug.sethook, debug.getinfo, math.random
    local function armed(f, ...)
      sethook(function()
        sethook()
        if getinfo(2, "S").source:find("multiprocessing/", 1, true) then
          error("interrupted!", 0)
        end
      end, "", random(1, 300))
      local r = table.pack(pcall(f, ...))
      sethook()
      return table.unpack(r, 1, r.n)
    end
    math.randomseed(13)
    local t0 = mp.now()
    local put_ok, seen, order, interrupts = {}, {}, {}, 0
    local function record(v)
      assert.equal("number", type(v), tostring(v))
      seen[v] = (seen[v] or 0) + 1
      order[#order + 1] = v
    end
    for i = 1, N do
      local ok, e = armed(q.put, q, i)
      if ok then put_ok[i] = true
      else
        assert.equal("interrupted!", e, tostring(e))
        interrupts = interrupts + 1
      end
      if i % 2 == 0 then
        local ok2, v = armed(q.get, q, true, 0.05)
        if ok2 then record(v)
        elseif v ~= "interrupted!" then assert.equal("Empty", v.kind, tostring(v)) end
      end
    end
    while true do
      local ok, v = pcall(q.get, q, true, 1)
      if not ok then assert.equal("Empty", v.kind, tostring(v)) break end
      record(v)
    end
    for i = 1, N do
      if put_ok[i] then assert.equal(1, seen[i], "item " .. i)
      else assert.is_true((seen[i] or 0) <= 1, "item " .. i) end
    end
    for k = 2, #order do assert.is_true(order[k - 1] < order[k], "order at " .. k) end
    assert.is_true(interrupts > 0)
    assert.equal("0", s:cli("ZCARD luamp:queue:ctrlc-put:taken"))
    assert.is_true(mp.now() - t0 < 25, "took " .. (mp.now() - t0) .. " s")
  end)

  -- The same with real SIGINTs: consumer processes, each taking items in
  -- a loop until its Ctrl-C.  Each records what it got; an item whose get
  -- had returned when the Ctrl-C landed is still in the consumer's local
  -- (the error handler reads it there).  Every item is then recorded
  -- exactly once or still in the queue, and none is left taken.
  -- (the consumers are luamp processes whatever runs the spec: first
  -- pass only, see H.once)
  H.once(it, "loses and duplicates no item when SIGINTs hit processes doing gets", function()
    local q <close> = queue("ctrlc-sigint")
    local N = 3000
    for i = 1, N do q:put(i) end
    local dir = s.dir
    local code = string.format([[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local q = mp.Queue{broker = %q, name = "ctrlc-sigint", authkey = "k"}
      local log = io.open(%q, "a")
      log:setvbuf("no")
      local last
      local function record(v)
        core.shielded(function()
          if v ~= last then log:write(v, "\n") last = v end
        end)
      end
      local function body()
        io.open(arg[1], "w"):close()
        while true do
          local v = q:get(true, 5)
          record(v)
        end
      end
      local function handler(e)
        for level = 2, 60 do
          local info = debug.getinfo(level, "f")
          if not info then break end
          if info.func == body then
            for i = 1, 20 do
              local name, val = debug.getlocal(level, i)
              if name == nil then break end
              if name == "v" and val ~= nil then record(val) end
            end
          end
        end
        return e
      end
      local ok, e = xpcall(body, handler)
      io.stderr:write(tostring(e), "\n")
      os.exit(ok and 0 or 3)
    ]], s.url, dir .. "/got")
    local script = H.write(dir .. "/consumer.lua", code)
    math.randomseed(5)
    local interrupted = 0
    for round = 1, 20 do
      local ready = dir .. "/ready" .. round
      local pid = tonumber(H.sh(string.format("%s %s %s >%s/c%d.out 2>&1 </dev/null & echo $!",
        H.q(H.luamp), H.q(script), H.q(ready), dir, round)):match("%d+"))
      assert.is_true(H.eventually(function() return io.open(ready) ~= nil end, 20), H.slurp(dir .. "/c" .. round .. ".out"))
      core_sleep(math.random() * 0.15)
      H.sh("kill -INT " .. pid)
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 20), "round " .. round)
      if H.slurp(dir .. "/c" .. round .. ".out"):find("interrupted!", 1, true) then
        interrupted = interrupted + 1
      end
    end
    assert.is_true(interrupted >= 10, "only " .. interrupted .. " consumers interrupted")
    local seen = {}
    for line in io.lines(dir .. "/got") do
      local v = assert(tonumber(line), line)
      seen[v] = (seen[v] or 0) + 1
    end
    assert.equal("0", s:cli("ZCARD luamp:queue:ctrlc-sigint:taken"))
    while true do
      local ok, v = pcall(q.get, q, true, 0.5)
      if not ok then assert.equal("Empty", v.kind) break end
      seen[v] = (seen[v] or 0) + 1
    end
    for i = 1, N do assert.equal(1, seen[i], "item " .. i) end
  end)

  -- A user whose ACL lacks a command of the take: the get fails naming
  -- it and leaves the item in the queue (a script refused half-way keeps
  -- what it wrote: before, its LPOP had taken the item, lost for good).
  it("leaves the item in the queue when the user's ACL refuses a command of the get", function()
    local readme = H.slurp("README.md")
    local acl = assert(readme:match("\n(ACL SETUSER lworker .-[^\\])\n"), "README: no ACL")
    local argv = {}
    for w in acl:gsub("\\\n", " "):gmatch("%S+") do
      if w ~= "+zadd" then
        argv[#argv + 1] = (w == "lworker" and "qnozadd") or (w == ">PASSWORD" and ">qpass") or w
      end
    end
    local admin = require("multiprocessing.core").redis_connect(nil, nil, s.sock, 5)
    assert.equal("OK", admin:command(argv))
    admin:close()
    local q <close> = queue("noperm")
    q:put("kept")
    local limited <close> = queue("noperm", {username = "qnozadd", password = "qpass"})
    local err = H.err_of(limited.get, limited, true, 5)
    assert.matches("NOPERM", tostring(err))
    assert.matches("ZADD on luamp:queue:noperm:taken", tostring(err), 1, true)
    assert.equal(1, q:qsize())
    assert.equal("kept", q:get(true, 5))
  end)

  it("needs an authkey and a name", function()
    assert.equal("ValueError", H.kind_of(mp.Queue, {broker = s.url, name = "x"}))
    assert.matches("name", H.err_of(mp.Queue, {broker = s.url, authkey = "k"}))
  end)
end)
