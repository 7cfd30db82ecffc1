-- Connections beyond send/recv (issue 17): conn:recv_bytes_into into
-- shared buffers, and Connections and Listeners passed to other
-- processes of the tree (CPython's test_fd_transfer family).
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local kind_of = H.kind_of

-- a duplex Pipe over a socketpair: its messages carry fds themselves
-- (SCM_RIGHTS); mp.Pipe() is two pipes, whose sends go through the keeper
local function socket_pipe() return core.Pipe(true, "socket") end

describe("conn:recv_bytes_into", function()
  it("writes a message into an Array('B') and returns its length", function()
    local a, b = mp.Pipe()
    local arr = mp.Array("B", 8)
    b:send_bytes("abc")
    assert.equal(3, a:recv_bytes_into(arr))
    assert.same({97, 98, 99, 0, 0, 0, 0, 0}, arr:totable())
    -- from a byte offset counted from 0, as send_bytes's
    b:send_bytes("xyz")
    assert.equal(3, a:recv_bytes_into(arr, 5))
    assert.same({97, 98, 99, 0, 0, 120, 121, 122}, arr:totable())
    -- an empty message fits anywhere, even at the end
    b:send_bytes("")
    assert.equal(0, a:recv_bytes_into(arr, 8))
    a:close(); b:close(); arr:close()
  end)

  it("writes into Array('c'), a RawArray, an int Array (bytes) and a SharedMemory", function()
    local a, b = mp.Pipe()
    local c = mp.Array("c", 4)
    b:send_bytes("hi")
    assert.equal(2, a:recv_bytes_into(c, 1))
    assert.equal("h", c[2])
    assert.equal("i", c[3])
    local raw = mp.RawArray("B", 3)
    b:send_bytes("\1\2\3")
    assert.equal(3, a:recv_bytes_into(raw))
    assert.same({1, 2, 3}, raw:totable())
    -- an Array of ints is bytes to it, as Python's array('i') buffer
    local ints = mp.Array("i", 2)
    b:send_bytes(string.pack("<i4<i4", 7, -9))
    assert.equal(8, a:recv_bytes_into(ints))
    assert.same({7, -9}, ints:totable())
    local shm = mp.SharedMemory{create = true, size = 16}
    b:send_bytes("shared")
    assert.equal(6, a:recv_bytes_into(shm, 10))
    assert.equal("shared", shm:read(10, 6))
    shm:close(); shm:unlink()
    a:close(); b:close()
  end)

  it("receives a message bigger than the read-ahead straight into place", function()
    local a, b = mp.Pipe()
    local n = 300000
    local shm = mp.SharedMemory{create = true, size = n + 1}
    local msg = string.rep("0123456789", n // 10)
    local p = mp.Process{target = function() b:send_bytes(msg) end}
    p:start()
    assert.equal(n, a:recv_bytes_into(shm, 1))
    assert.equal(msg, shm:read(1, n))
    p:join()
    shm:close(); shm:unlink()
  end)

  it("raises BufferTooShort with the whole message in err.value, buffer untouched", function()
    local a, b = mp.Pipe()
    local arr = mp.Array("B", 4)
    b:send_bytes("too long")
    local ok, err = pcall(a.recv_bytes_into, a, arr)
    assert.is_false(ok)
    assert.equal("BufferTooShort", err.kind)
    assert.equal("too long", err.value)
    assert.matches("recv_bytes_into", err.message)
    assert.same({0, 0, 0, 0}, arr:totable())
    -- the message was consumed: the stream stays in step
    b:send_bytes("ok")
    assert.equal(2, a:recv_bytes_into(arr))
    -- the room is what is left after the offset
    b:send_bytes("abc")
    err = select(2, pcall(a.recv_bytes_into, a, arr, 2))
    assert.equal("BufferTooShort", err.kind)
    assert.equal("abc", err.value)
    -- a big one too
    local big = string.rep("x", 200000)
    local p = mp.Process{target = function() b:send_bytes(big) end}
    p:start()
    err = select(2, pcall(a.recv_bytes_into, a, arr))
    p:join()
    assert.equal("BufferTooShort", err.kind)
    assert.equal(big, err.value)
    b:send_bytes("go")
    assert.equal(2, a:recv_bytes_into(arr))
  end)

  it("refuses wrong buffers, bad offsets, closed objects with errors naming the call", function()
    local a, b = mp.Pipe()
    local arr = mp.Array("B", 4)
    local function msg(...)
      local args = table.pack(...)
      return select(2, pcall(function() return a:recv_bytes_into(table.unpack(args, 1, args.n)) end))
    end
    assert.matches("bad argument #1 to 'recv_bytes_into' %(Array or SharedMemory expected, got string%)",
                   msg("buffer"))
    assert.matches("Array or SharedMemory expected, got no value", msg())
    assert.matches("Array or SharedMemory expected, got multiprocessing.Value", msg(mp.Value("i", 0)))
    assert.matches("bad argument #2 to 'recv_bytes_into' %(offset is negative%)", msg(arr, -1))
    assert.matches("bad argument #2 to 'recv_bytes_into' %(offset beyond the buffer's end%)", msg(arr, 5))
    assert.matches("number has no integer representation", msg(arr, 1.5))
    -- nothing was read by those: the message is still there
    b:send_bytes("ab")
    assert.equal(2, a:recv_bytes_into(arr, 2))
    local closed = mp.Array("B", 2)
    closed:close()
    local err = msg(closed)
    assert.equal("ValueError", err.kind)
    assert.matches("closed", err.message)
    local shm = mp.SharedMemory{create = true, size = 4}
    shm:close(); shm:unlink()
    assert.matches("SharedMemory is closed", msg(shm).message)
    -- on a write-only end, a closed connection
    local r, w = mp.Pipe(false)
    local k
    k, err = kind_of(function() return w:recv_bytes_into(arr) end)
    assert.equal("OSError", k)
    assert.matches("write%-only", err.message)
    a:close()
    k, err = kind_of(function() return a:recv_bytes_into(arr) end)
    assert.equal("OSError", k)
    assert.matches("closed", err.message)
    -- EOF as recv's
    w:close()
    assert.equal("EOFError", kind_of(function() return r:recv_bytes_into(arr) end))
    b:close(); r:close(); arr:close()
  end)
end)

-- CPython's test_fd_transfer family: a Connection or Listener sent to
-- another process of the tree arrives usable (its fd rides along with
-- SCM_RIGHTS over the Unix socket that carries the message).
describe("Connections and Listeners sent to other processes", function()
  it("one end of a Pipe, sent to a child, is used there", function()
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    do
      local a, b = mp.Pipe()
      local x, y = mp.Pipe()
      local p = mp.Process{target = function()
        local got = b:recv()
        got.conn:send("from the child through the passed end")
        got.conn:send(got.conn:recv() + 1)
      end}
      p:start()
      a:send({conn = x, note = "here"})
      x:close()      -- the child's copy is its own
      assert.equal("from the child through the passed end", y:recv())
      y:send(41)
      assert.equal(42, y:recv())
      p:join()
      assert.equal(0, p.exitcode)
      a:close(); b:close(); y:close()
    end
    assert.equal(fds, H.fd_count())
  end)

  it("a duplex Pipe's end (two fds) travels whole: over a socket in one SCM_RIGHTS message, over a Pipe", function()
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    do
      for _, carrier in ipairs {socket_pipe, mp.Pipe} do
        local a, b = carrier()
        local x, y = mp.Pipe()
        local p = mp.Process{target = function()
          local t = b:recv()
          -- both ways through the passed end, and the duplicate's too
          t[1]:send(t[1]:recv() + 1)
          t[2]:send("twice")
          b:send(tostring(t[1]))
        end}
        p:start()
        a:send({x, x})
        x:close()      -- the child's copies are its own
        y:send(41)
        assert.equal(42, y:recv())
        assert.equal("twice", y:recv())
        assert.matches("fds %d+ and %d+, duplex", a:recv())
        p:join()
        assert.equal(0, p.exitcode)
        y:close(); a:close(); b:close()
      end
      -- one SCM_RIGHTS message carries both fds: the raw message says 2
      local a, b = socket_pipe()
      local x, y = mp.Pipe()
      a:send(x)
      assert.equal("\xc1luampF\0\2", b:recv_bytes():sub(1, 9))
      a:close(); b:close(); x:close(); y:close()
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, H.fd_count())
  end)

  it("a Listener sent to a child accepts there; the key comes along", function()
    local a, b = mp.Pipe()
    local l = mp.connection.Listener{authkey = "secret"}
    local p = mp.Process{target = function()
      local l2 = b:recv()
      local c = l2:accept(10)
      c:send({c:recv(), "accepted by the child"})
      c:close(); l2:close()
    end}
    p:start()
    a:send(l)
    local c = mp.connection.Client(l.address, "secret")
    c:send("hi")
    assert.same({"hi", "accepted by the child"}, c:recv())
    p:join()
    assert.equal(0, p.exitcode)
    c:close(); l:close(); a:close(); b:close()
  end)

  it("a Client connection and an accepted one on a Unix path travel, and are trusted as before", function()
    local path = os.tmpname() .. ".sock"
    os.remove(path)
    local l = mp.connection.Listener{address = path, authkey = "k"}
    local a, b = mp.Pipe()
    local p = mp.Process{target = function()
      local t = b:recv()
      -- both authenticated: functions pass
      t.client:send(function() return "code ok" end)
      t.server:send(t.server:recv() * 2)
    end}
    p:start()
    local client = mp.Process{target = function()
      local c = mp.connection.Client(path, "k")
      local f = c:recv()
      c:send(21)
      assert(c:recv() == 42 and f() == "code ok")
      -- a Client connection passed back over an authenticated socket
      c:close()
    end}
    client:start()
    local server = l:accept(10)
    -- the child gets the accepted end twice: as server, and the client's
    -- functions go through it too
    a:send({server = server, client = server})
    p:join(); client:join()
    assert.equal(0, p.exitcode)
    assert.equal(0, client.exitcode)
    server:close(); l:close(); a:close(); b:close()
    os.remove(path)
  end)

  it("the same Connection twice in one message arrives as two working handles", function()
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    do
      local a, b = mp.Pipe()
      local x, y = mp.Pipe()
      a:send({x, x, {deep = x}})
      local t = b:recv()
      t[1]:send(1); t[2]:send(2); t[3].deep:send(3)
      assert.same({1, 2, 3}, {y:recv(), y:recv(), y:recv()})
      t[1]:close()
      t[3].deep:send("still open")
      assert.equal("still open", y:recv())
      t[2]:close(); t[3].deep:close()
      a:close(); b:close(); x:close(); y:close()
    end
    assert.equal(fds, H.fd_count())
  end)

  it("leaks no fd: messages never received, read raw, or whose decode fails (socket)", function()
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    do
      -- never received: the kernel drops them with the socket
      local a, b = socket_pipe()
      local x, y = mp.Pipe()
      for _ = 1, 20 do a:send({x, y}) end
      a:close(); b:close()
      -- received into the read-ahead, then the connection closed
      a, b = socket_pipe()
      for _ = 1, 20 do a:send({x, y}) end
      b:send("marker"); assert.equal("marker", a:recv())
      assert.is_table(b:recv())    -- reads ahead the other 19
      a:close(); b:close()
      -- read raw: its fds are closed
      a, b = socket_pipe()
      a:send(x)
      assert.is_string(b:recv_bytes())
      a:send(y)
      local buf = mp.Array("B", 100)
      assert.is_true(b:recv_bytes_into(buf) > 0)
      a:send({x, string.rep("z", 200)})
      assert.equal("BufferTooShort", kind_of(function() return b:recv_bytes_into(buf) end))
      buf:close()
      -- a decode that fails after a handle took its fd, and before
      local mt = {}
      mp.register_class("conn_transfer_spec.Bad", mt, {
        rebuild = function() error("no rebuild") end})
      a:send({x, setmetatable({}, mt)})
      assert.matches("no rebuild", tostring(select(2, pcall(b.recv, b))))
      a:send({setmetatable({}, mt), x})
      assert.matches("no rebuild", tostring(select(2, pcall(b.recv, b))))
      -- both ends still fine
      a:send(1); assert.equal(1, b:recv())
      a:close(); b:close(); x:close(); y:close()
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, H.fd_count())
  end)

  it("a receiver that died makes the send raise, never hang; nothing leaks (socket)", function()
    -- (a first start opens /dev/null for children's stdin, kept: not a leak)
    local warm = mp.Process{target = function() end}
    warm:start(); warm:join()
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    do
      local a, b = socket_pipe()
      local x, y = mp.Pipe()
      local p = mp.Process{target = function() b:recv(); os.exit(0) end}
      p:start()
      b:close()
      a:send(x)
      p:join()
      -- the child read one and died; the next sends find no reader
      local kind
      for _ = 1, 10000 do
        local ok, err = pcall(a.send, a, {x, y, string.rep("p", 1000)})
        if not ok then kind = err.kind break end
      end
      assert.equal("BrokenPipeError", kind)
      -- a child killed with messages unread: its fds go with it
      a, b = socket_pipe()
      -- (a sleep in the child, not os.execute: a shell forked by the
      -- child held b open, between its fork and its exec, past the kill)
      p = mp.Process{target = function() while true do H.sleep(1) end end}
      p:start()
      b:close()
      for _ = 1, 10 do a:send({x, y}) end
      p:kill(); p:join()
      assert.equal("BrokenPipeError", kind_of(function() a:send(x) end))
      a:close(); x:close(); y:close()
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, H.fd_count())
  end)

  it("as a Process argument it is inherited (fork)", function()
    local x, y = mp.Pipe()
    local p = mp.Process{target = function(c) c:send("inherited") end, args = {x}}
    p:start(); p:join()
    assert.equal("inherited", y:recv())
    x:close(); y:close()
  end)

  it("is refused on a connection whose peer did not authenticate, and when closed", function()
    local l = mp.connection.Listener()
    local client = mp.connection.Client(l.address)
    local server = l:accept(5)
    local x, y = mp.Pipe()
    local k, err = kind_of(function() client:send({x}) end)
    assert.equal("EncodeError", k)
    assert.matches("cannot encode multiprocessing.Connection: a Connection is not sent to a peer that did not authenticate at value%[1%]",
                   err.message)
    assert.matches("Listener is not sent", select(2, kind_of(function() server:send(l) end)).message)
    client:send("still in step"); assert.equal("still in step", server:recv())
    local c1, c2 = mp.Pipe()
    c1:close()
    local a, b = mp.Pipe()
    assert.matches("connection is closed at value%[1%]", select(2, kind_of(function() a:send({c1}) end)).message)
    local q = mp.Queue()
    assert.matches("connection is closed", select(2, kind_of(function() q:put(c1) end)).message)
    l:close()
    assert.matches("listener is closed", select(2, kind_of(function() a:send(l) end)).message)
    a:send("still in step"); assert.equal("still in step", b:recv())
    q:close(); client:close(); server:close(); c2:close(); a:close(); b:close(); x:close(); y:close()
  end)

  it("a handle is decoded only from the connection that carried its fd", function()
    local a, b = socket_pipe()
    local x, y = mp.Pipe()
    a:send(x)
    local raw = b:recv_bytes()
    -- the bytes alone, decoded trusted elsewhere: no fd, no object
    local k, err = kind_of(function() return mp.decode(raw:sub(10), {trusted = true}) end)
    assert.equal("DecodeError", k)
    assert.matches("arrives only in a message of the connection", err.message)
    -- untrusted: refused as any handle
    assert.equal("DecodeError", kind_of(function() return mp.decode(raw:sub(10)) end))
    a:close(); b:close(); x:close(); y:close()
  end)

  it("fds sent by an outsider to a Listener without a key are dropped by the kernel", function()
    local l = mp.connection.Listener()
    local addr = l.address
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    local py = [[
import socket, sys, os, struct
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1].replace("@", "\0", 1))
r, w = os.pipe()
payload = b"\xc1luampF\0\x01" + b"\x93\x01\x02\x03"
socket.send_fds(s, [struct.pack(">i", len(payload)) + payload], [r, w, r, w])
s.recv(1)
]]
    local tmp = os.tmpname()
    H.write(tmp, py)
    local p = mp.Process{target = function()
      os.execute("env -u LD_PRELOAD /usr/bin/python3 " .. H.q(tmp) .. " " ..
                 H.q((addr:gsub("%z", "@"))))
    end}
    p:start()
    local c = l:accept(10)
    -- 0xc1 is no MessagePack: refused (and no fd is read)
    assert.equal("DecodeError", kind_of(function() return c:recv() end))
    c:close()
    p:join()
    os.remove(tmp)
    assert.equal(fds, H.fd_count())
    l:close()
  end)
end)

-- Carriers that move only bytes (a Queue's shared ring, a one-way Pipe,
-- a Pool's task, mp.encode): the fd is parked with the program's fd
-- keeper under a random ticket the message carries (runtime/fdkeep.c).
describe("Connections and Listeners through Queues, one-way Pipes and Pools", function()
  it("a Connection and a Listener put in a Queue arrive usable in a child", function()
    collectgarbage(); collectgarbage()
    local fds = H.fd_count()
    do
      local x, y = mp.Pipe()
      local q = mp.Queue()
      local l = mp.connection.Listener{authkey = "k"}
      local p = mp.Process{target = function()
        local t = q:get()
        t.conn:send("via the queue " .. t.n)
        local c = t.l:accept(10)
        c:send("accepted in the child"); c:close()
      end}
      p:start()
      q:put({conn = x, n = 7, l = l})
      -- the sender holds nothing more for them
      assert.equal("via the queue 7", y:recv())
      local c = mp.connection.Client(l.address, "k")
      assert.equal("accepted in the child", c:recv())
      p:join()
      assert.equal(0, p.exitcode)
      c:close(); l:close(); q:close(); x:close(); y:close()
    end
    collectgarbage(); collectgarbage()
    assert.equal(fds, H.fd_count())
  end)

  it("as a Pool task's argument, through a one-way Pipe, and mp.encode/decode (trusted)", function()
    local x, y = mp.Pipe()
    local pool = mp.Pool(2)
    assert.equal("ok", pool:apply(function(c) c:send("from a worker"); return "ok" end, {x}))
    assert.equal("from a worker", y:recv())
    pool:close(); pool:join()
    local r, w = mp.Pipe(false)
    local p = mp.Process{target = function() w:send({x}) end}
    p:start(); p:join()
    local got = r:recv()[1]
    got:send("through a one-way pipe"); got:close()
    assert.equal("through a one-way pipe", y:recv())
    local s = mp.encode(x)
    assert.equal("DecodeError", kind_of(function() return mp.decode(s) end))
    local z = mp.decode(s, {trusted = true})
    z:send("decoded"); assert.equal("decoded", y:recv())
    z:close()
    -- a ticket is good once
    local k, err = kind_of(function() return mp.decode(s, {trusted = true}) end)
    assert.equal("DecodeError", k)
    assert.matches("received before", err.message)
    r:close(); w:close(); x:close(); y:close()
  end)

  it("the same Connection twice in one queued message: two working handles", function()
    local x, y = mp.Pipe()
    local q = mp.SimpleQueue()
    q:put({x, x})
    local t = q:get()
    t[1]:send(1); t[2]:send(2)
    assert.same({1, 2}, {y:recv(), y:recv()})
    assert.are_not.equal(t[1]:fileno(), t[2]:fileno())
    t[1]:close(); t[2]:close(); x:close(); y:close(); q:close()
  end)

  it("a receiver that dies never hangs the sender; the keeper ends with the program", function()
    local out, err, rc = H.script([[
      local mp = require "multiprocessing"
      local x, y = mp.Pipe()
      local q = mp.Queue()
      local p = mp.Process{target = function() q:get(); os.exit(3) end}
      p:start()
      q:put(x)               -- taken by a receiver that exits at once
      p:join()
      q:put({x, x})          -- never received
      for _ = 1, 50 do q:put(x) end
      print(p.exitcode, require("multiprocessing.core").getpid())
    ]])
    assert.equal(0, rc, err)
    local code, pid = out:match("^(%d+)\t(%d+)\n$")
    assert.equal("3", code)
    -- that program's keeper (named after its pid) ends soon after it
    local name = "@luamp-fdkeep-" .. pid .. "-"
    local gone = false
    for _ = 1, 50 do
      if not H.sh("cat /proc/net/unix"):find(name, 1, true) then
        gone = true
        break
      end
      os.execute("sleep 0.1")
    end
    assert.is_true(gone)
  end)

  it("through a Manager and back (an authenticated connection)", function()
    local m = mp.Manager()
    local x, y = mp.Pipe()
    local d = m:dict()
    d.c = x
    local back = d.c
    back:send("through the manager")
    assert.equal("through the manager", y:recv())
    back:close(); x:close(); y:close()
    m:shutdown()
  end)

  it("a keeper that was killed: its tickets are a DecodeError, the next send starts a new one", function()
    local core = require "multiprocessing.core"
    local x, y = mp.Pipe()
    local s = mp.encode(x)
    -- the keeper: the process holding the listening socket named after us
    local name = "@luamp-fdkeep-" .. core.getpid() .. "-"
    local inode
    for line in io.lines("/proc/net/unix") do
      if line:find(name, 1, true) and line:match("^%S+ %S+ %S+ (%S+)") == "00010000" then
        inode = line:match("(%d+) @")
      end
    end
    assert.is_string(inode)
    local keeper
    for pid in H.sh("ls /proc"):gmatch("%d+") do
      if tonumber(pid) ~= core.getpid() and
         H.sh("ls -l /proc/" .. pid .. "/fd 2>/dev/null"):find("socket:[" .. inode .. "]", 1, true) then
        keeper = pid
      end
    end
    assert.is_string(keeper)
    os.execute("kill -9 " .. keeper)
    for _ = 1, 50 do
      if not H.alive(keeper) then break end
      os.execute("sleep 0.05")
    end
    local k, err = kind_of(function() return mp.decode(s, {trusted = true}) end)
    assert.equal("DecodeError", k)
    assert.matches("fd keeper holding this object is gone", err.message)
    local z = mp.decode(mp.encode(x), {trusted = true})
    z:send("after a restart")
    assert.equal("after a restart", y:recv())
    z:close(); x:close(); y:close()
  end)

  it("a handle whose keeper is gone is a DecodeError naming that", function()
    local x, y = mp.Pipe()
    local s = mp.encode(x)
    -- the keeper's name sits at the end of the handle: point it elsewhere
    local bad = s:gsub("luamp%-fdkeep%-", "luamp-fdkeeX-")
    local k, err = kind_of(function() return mp.decode(bad, {trusted = true}) end)
    assert.equal("DecodeError", k)
    assert.matches("fd keeper holding this object is gone", err.message)
    assert.is_userdata(mp.decode(s, {trusted = true}))
    x:close(); y:close()
  end)
end)
