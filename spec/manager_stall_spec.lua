-- A manager serves every client from one loop: a client that sends
-- requests and does not read its answers (stopped by SIGSTOP, or one
-- that only sends) must not stall the others -- its answers wait in the
-- server, which reads nothing more from it until they are written -- and
-- when it is resumed it gets every answer in order; killed, it leaves
-- nothing behind in the server.
local H = require "helpers"
local mp = require "multiprocessing"
local proxies = require "multiprocessing.manager_proxies"

describe("a manager and a client that does not read its answers", function()
  local m
  setup(function() m = mp.Manager() end)
  teardown(function() m:shutdown() end)

  -- A raw client in a child: connects, sends n gets of d.big (each answer
  -- 100 kB: a few fill its socket), says so on the pipe, stops itself
  -- (SIGSTOP); once continued reads the n answers and exits 0 when each
  -- is its own, in order.
  local function raw_client(d, n, key)
    local id = proxies._proxy_id(d)
    local want = d[key or "big"]
    local a, b = mp.Pipe()
    local p = mp.Process{target = function()
      local c = mp.connection.Client(m.address, m.authkey)
      for seq = 1, n do c:send({seq, id, "get", key or "big"}) end
      b:send("sent")
      os.execute("kill -STOP " .. mp.current_process().pid)
      for seq = 1, n do
        local r = c:recv()
        if r[1] ~= seq or r[2] ~= 0 or r[3] ~= want then os.exit(3) end
      end
      os.exit(0)
    end}
    p:start()
    assert.equal("sent", a:recv())
    return p
  end

  -- 1000 gets from another process; true when they all came within 60 s
  local function others_served(d)
    local p = mp.Process{target = function()
      local n = 0
      for _ = 1, 1000 do n = n + d.x end
      os.exit(n == 1000 and 0 or 3)
    end}
    p:start()
    p:join(60)
    if p:is_alive() then p:kill() p:join() return false end
    return p.exitcode == 0
  end

  local function stopped(pid)
    for _ = 1, 200 do
      local f = io.open("/proc/" .. pid .. "/stat")
      local st = f and f:read("a"):match("^%d+ %b() (%a)")
      if f then f:close() end
      if st == "T" then return true end
      H.sleep(0.02)
    end
    return false
  end

  it("serves the others while it is stopped, and answers it all once resumed", function()
    local d = m:dict()
    d.x, d.big = 1, string.rep("x", 100000)
    local p = raw_client(d, 40)
    assert.is_true(stopped(p.pid))
    assert.is_true(others_served(d))
    os.execute("kill -CONT " .. p.pid)
    p:join(60)
    assert.equal(0, p.exitcode)
  end)

  -- A client that sends gets one by one (each found alone, so the quick
  -- C path answers it) and never reads: once its socket is full the
  -- server keeps its answers and reads no more from it; it then blocks in
  -- its own sends (its fault alone); the others are served; killed, it
  -- is forgotten.
  it("does so for small answers given by the quick path too", function()
    local d = m:dict()
    d.x = 1
    local id = proxies._proxy_id(d)
    local before, quick = m:_debug_info().clients, m:_debug_info().quick
    local p = mp.Process{target = function()
      local c = mp.connection.Client(m.address, m.authkey)
      local sleep = require("multiprocessing.core").sleep
      for seq = 1, 1e6 do
        c:send({seq, id, "get", "x"})
        sleep(0.0005)
      end
    end}
    p:start()
    -- (until the server stops answering it: its answers are kept)
    local last, t0 = -1, mp.now()
    while mp.now() - t0 < 30 do
      H.sleep(0.5)
      local q = m:_debug_info().quick
      if q == last then break end
      last = q
    end
    assert.is_true(last - quick > 100, "quick answers: " .. (last - quick))
    assert.is_true(p:is_alive())
    assert.is_true(others_served(d))
    p:kill()
    p:join(10)
    t0 = mp.now()
    while m:_debug_info().clients ~= before and mp.now() - t0 < 10 do H.sleep(0.05) end
    assert.equal(before, m:_debug_info().clients)
  end)

  it("forgets it when it is killed while its answers wait", function()
    local d = m:dict()
    d.x, d.big = 1, string.rep("x", 100000)
    local before = m:_debug_info().clients
    local p = raw_client(d, 40)
    assert.is_true(stopped(p.pid))
    assert.is_true(others_served(d))
    p:kill()
    p:join(10)
    local t0 = mp.now()
    while m:_debug_info().clients ~= before and mp.now() - t0 < 10 do H.sleep(0.05) end
    assert.equal(before, m:_debug_info().clients)
    assert.equal(1, d.x)
  end)
end)
