-- The manager's quick round trip (issue 18): d[k] is encoded by the
-- client's connection itself (conn:_request, conn:_reply) and a plain
-- dict get is answered by the server's loop in C (core._serve_gets).
-- Everything the quick path does not take goes the Lua way; these specs
-- check that both give the same answers, that odd and malformed
-- requests still get the Lua way's answers, and that a SIGKILL of
-- either side mid-round-trip gives the other an error or lets it serve
-- on, never a hang.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local proxies = require "multiprocessing.manager_proxies"

local now, sleep = core.now, core.sleep

-- H.spawn, the child's error returned as false and its kind.
local function spawn(fn)
  local wait, p = H.spawn(fn)
  return function()
    local r = table.pack(pcall(wait))
    if r[1] then return table.unpack(r, 2, r.n) end
    return false, tostring(r[2]):match("^(%w+):")
  end, p
end

-- MessagePack of a small non-negative integer (< 128), as a request's
-- seq and id are written.
local function fixint(n)
  assert(n >= 0 and n < 128)
  return string.char(n)
end

describe("the manager's quick round trip", function()
  local m
  setup(function() m = mp.Manager() end)
  teardown(function() m:shutdown() end)

  it("answers plain dict gets in the server's C loop", function()
    -- (before: no request was answered without the Lua dispatch, and
    -- _debug_info had no count of them)
    local d = m:dict()
    for i = 1, 10 do d[i] = i * i end
    local before = m:_debug_info().quick
    assert.is_number(before)
    local got = spawn(function()
      local s = 0
      for i = 1, 200 do s = s + d[i % 10 + 1] end
      return s
    end)
    assert.equal(20 * 385, got())
    assert.is_true(m:_debug_info().quick - before >= 150)
  end)

  it("gives every key and value type what d:get gives", function()
    local d = m:dict()
    local inner = m:list{1, 2}
    local keys = {1, -1, 0, 1 << 40, math.maxinteger, math.mininteger, "k",
                  ("k"):rep(31), ("k"):rep(40), 1.5, true, false, "é", ""}
    local values = {1, -1, 1 << 40, math.mininteger, 1.5, 0.1, 1e300, -0.0,
                    true, false, "", "abc", ("x"):rep(31), ("x"):rep(32),
                    "é", "\0bin\255", ("y"):rep(5000), ("z"):rep(70000),
                    {1, 2, {3}}, {a = {b = "c"}}}
    for i, k in ipairs(keys) do d[k] = values[(i - 1) % #values + 1] end
    d.inner = inner
    d.int_float = 3.0
    local function check(where)
      for i, k in ipairs(keys) do
        local want = values[(i - 1) % #values + 1]
        assert.same(want, d[k], where .. ": key " .. tostring(k))
        assert.equal(math.type(want), math.type(d[k]))
      end
      for i = #keys + 1, #values do d["v" .. i] = values[i] end
      for i = #keys + 1, #values do
        assert.same(values[i], d["v" .. i], where .. ": value #" .. i)
      end
      assert.equal("float", math.type(d.int_float))
      assert.is_nil(d.missing)
      assert.is_nil(d[12345])
      assert.same({1, 2}, {d.inner[1], d.inner[2]})
      d.inner:append(3)
      assert.equal(3, #d.inner)
      d.inner:pop()
    end
    check("owner")
    assert.is_true(spawn(function() check("child"); return true end)())
  end)

  it("sees the writes made before it, and reports a failed one", function()
    local d, l = m:dict(), m:list()
    for i = 1, 100 do
      d[i] = i
      assert.equal(i, d[i])
    end
    l[5] = 1                       -- pipelined: fails in the server
    local e = H.err_of(function() return d[1] end)
    assert.matches("pipelined", e.message)
    assert.equal(1, d[1])          -- reported once
    assert.is_true(spawn(function()
      l[7] = 1
      local e2 = H.err_of(function() return d[2] end)
      return e2.message:find("pipelined") ~= nil and d[2] == 2
    end)())
  end)

  it("reads what another process wrote before it said so", function()
    local d = m:dict()
    local a, b = mp.Pipe()
    local wait = spawn(function()
      for round = 1, 50 do
        local v = b:recv()
        if d.x ~= v then return "round " .. round .. ": " .. tostring(d.x) end
        b:send(true)
      end
      return "ok"
    end)
    for round = 1, 50 do
      local p = mp.Process{target = function()
        d.x = round                  -- pipelined, then the exit says so
      end}
      p:start()
      p:join()
      a:send(round)
      assert.is_true(a:recv())
    end
    assert.equal("ok", wait())
  end)

  it("answers malformed and odd requests as the Lua way does", function()
    local key = "quick-spec-key"
    local km <close> = mp.Manager{authkey = key}
    local d = km:dict()
    d[5] = 50
    local id = rawget(d, proxies._ID)
    local c <close> = mp.connection.Client(km.address, key)
    local function req(seq, rest)
      c:send_bytes("\x94" .. seq .. fixint(id) .. "\xa3get" .. rest)
    end
    req(fixint(1), fixint(5))
    assert.same({1, 0, 50}, c:recv())
    -- a request cut short, a byte MessagePack never uses, trailing bytes
    for _, bad in ipairs{"\x94\x02" .. fixint(id) .. "\xa3get",
                         "\x94\x03" .. fixint(id) .. "\xa3get\xc1",
                         "\x94\x04" .. fixint(id) .. "\xa3get\x05\x05",
                         "\x94\x05" .. fixint(id) .. "\xa3ge"} do
      c:send_bytes(bad)
      local r = c:recv()
      assert.equal(-1, r[1])
      assert.equal(2, r[2])
      assert.matches("cannot decode the request", r[3])
    end
    -- an object that does not exist, a list, a seq of 0 (no answer)
    c:send_bytes("\x94\x06\x7f\xa3get\x05")
    local r = c:recv()
    assert.same({6, 1}, {r[1], r[2]})
    assert.equal("ValueError", r[3].kind)
    local l = km:list{7, 8}
    c:send_bytes("\x94\x07" .. fixint(rawget(l, proxies._ID)) .. "\xa3get\x01")
    assert.same({7, 0, 7}, c:recv())
    req(fixint(0), fixint(5))
    -- two requests that arrive together
    req(fixint(8), fixint(5))
    req(fixint(9), "\xa1x")
    assert.same({8, 0, 50}, c:recv())
    assert.same({9, 0}, c:recv())
    assert.is_false(c:poll(0.2))   -- (nothing for the seq 0 get)
    assert.equal(50, d[5])
  end)

  it("moves an authenticated client on a Unix socket to a pair of pipes", function()
    -- (before: the client's connection stayed the socket, fd N, duplex)
    local mc = require "multiprocessing.manager_client"
    local function conn_of(mgr)
      for _, cl in pairs(mc.clients) do
        if cl.address == mgr.address and cl.conn then return cl.conn end
      end
    end
    m:dict().x = 1
    assert.matches("^Connection %(fds %d+ and %d+, duplex%)$", tostring(conn_of(m)))
    assert.is_true(spawn(function()
      local d = m:dict{a = 5}
      return d.a == 5 and tostring(conn_of(m)):find("fds %d+ and %d+") ~= nil
    end)())
    -- a keyless manager's and a TCP manager's clients keep their sockets
    local open <close> = mp.managers.SyncManager{authkey = false}:start()
    local od = open:dict{a = 1}
    assert.equal(1, od.a)
    assert.matches("^Connection %(fd %d+, duplex%)$", tostring(conn_of(open)))
    local tcp <close> = mp.Manager{address = {"127.0.0.1", 0}, authkey = "tcp-k"}
    local td = tcp:dict{a = 2}
    assert.equal(2, td.a)
    assert.matches("^Connection %(fd %d+, duplex%)$", tostring(conn_of(tcp)))
  end)

  it("refuses a move to pipes without a connection or a key", function()
    local key = "quick-spec-key-2"
    local km <close> = mp.Manager{authkey = key}
    local c <close> = mp.connection.Client(km.address, key)
    for i, bad in ipairs{"not a connection", 5, false} do
      c:send({i, 0, "pipe", bad})
      local r = c:recv()
      assert.same({i, 2}, {r[1], r[2]})
      assert.matches("pipe: expected a connection", r[3])
    end
    c:send({9, 0, "ping"})
    assert.same({9, 0, true}, c:recv())
    local open <close> = mp.managers.SyncManager{authkey = false}:start()
    local oc <close> = mp.connection.Client(open.address)
    local x, y = mp.Pipe()
    local ok = pcall(oc.send, oc, {1, 0, "pipe", x})
    if ok then           -- (sent: the keyless server refuses it)
      local r = oc:recv()
      assert.same({1, 2}, {r[1], r[2]})
    end
    x:close(); y:close()
    oc:send({2, 0, "ping"})
    assert.same({2, 0, true}, oc:recv())
  end)

  it("rejects bad arguments to the connection's quick methods", function()
    local a, b = mp.Pipe()
    assert.is_false(a:_request(0, 1, "get", 1))     -- (not sent)
    assert.is_false(a:_request(1, -1, "get", 1))
    assert.is_false(a:_request(1, 1, 7, 1))
    assert.is_false(a:_request(1, 1, "get", {}))
    assert.is_false(a:_request(1, 1, "get", 1.5))
    assert.is_false(a:_request(1, 1, "get", ("k"):rep(40)))
    assert.is_false(b:poll(0))
    assert.is_true(a:_request(3, 4, "get", "k"))
    assert.same({3, 4, "get", "k"}, b:recv())
    b:send({3, 0, "v"})
    assert.same({true, "v"}, {a:_reply(3)})
    b:send({2, 0, "v"})            -- another request's answer
    assert.same({false, {2, 0, "v"}}, {a:_reply(3)})
    b:send({3, 1, "oops"})
    assert.same({false, {3, 1, "oops"}}, {a:_reply(3)})
    b:send({3, 0})
    assert.same({true, nil}, {a:_reply(3)})
    b:send("not a reply")
    assert.same({false, "not a reply"}, {a:_reply(3)})
    assert.error_matches(function() a:_reply("x") end, "number expected")
    b:close()
    assert.equal("EOFError", H.kind_of(a._reply, a, 1))
    a:close()
    assert.error_matches(function() a:_request(1, 1, "get", 1) end, "closed")
    assert.error_matches(function()
      core._serve_gets({}, 0, {}, {}, 1, {}, {})
    end, "more clients than fds")
  end)

  it("gives a client an EOFError, not a hang, when the server is killed mid-round-trip", function()
    local km = mp.Manager()
    local d = km:dict()
    for i = 0, 99 do d[i] = i end
    local reader = spawn(function()
      local x
      for i = 1, 1e9 do x = d[i % 100] end
      return x
    end)
    sleep(0.3)
    core.kill(km.pid, "SIGKILL")
    local t0 = now()
    local ok, kind = reader()
    assert.is_false(ok)
    assert.equal("EOFError", kind)
    assert.is_true(now() - t0 < 5)
    assert.equal("EOFError", (H.kind_of(function() return d[1] end)))
    km:shutdown()
    assert.equal(0, H.zombies())
  end)

  it("serves on when a client is killed mid-round-trip", function()
    local d = m:dict()
    for i = 0, 99 do d[i] = i end
    local before = m:_debug_info().clients
    for _ = 1, 3 do
      local _, victim = spawn(function()
        local x
        for i = 1, 1e9 do x = d[i % 100] end
        return x
      end)
      local other = spawn(function()
        local s = 0
        for i = 1, 2000 do s = s + d[i % 100] end
        return s
      end)
      sleep(0.2)
      victim:kill()
      victim:join()
      assert.equal(99000, other())
      assert.equal(7, d[7])
    end
    assert.is_true(H.eventually(function()
      return m:_debug_info().clients == before
    end, 5))
  end)
end)
