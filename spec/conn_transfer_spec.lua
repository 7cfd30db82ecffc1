-- Connections beyond send/recv (issue 17): conn:recv_bytes_into into
-- shared buffers, and Connections and Listeners passed to other
-- processes of the tree (CPython's test_fd_transfer family).
local H = require "helpers"
local mp = require "multiprocessing"

local kind_of = H.kind_of

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
