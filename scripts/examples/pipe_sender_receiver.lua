-- pipe_sender_receiver.lua: a sender process writes messages and an end
-- marker into a Pipe; the receiver reads until the marker, then sees the
-- end of file once the sender has closed its end.
local mp = require "multiprocessing"

local END = "END"

local function sender(conn, messages)
  for _, m in ipairs(messages) do
    print("sending:  " .. tostring(m))
    io.stdout:flush()
    conn:send(m)
  end
  conn:send(END)
  conn:close()
end

local function receiver(conn, sender_end)
  -- this process's copy of the sending end (inherited through the fork):
  -- closed, or the end of file could never come
  sender_end:close()
  while true do
    local m = conn:recv()
    if m == END then break end
    print("received: " .. tostring(m))
    io.stdout:flush()
  end
  -- nothing more will come: the sender has closed its end
  local ok, err = pcall(conn.recv, conn)
  if not ok and mp.is_error(err, "EOFError") then
    print("receiver: end of file, the sender is done")
  end
end

local recv_end, send_end = mp.Pipe(false)
local messages = {"hello", "from", "the sender", 42}
local s = mp.Process{target = sender, args = {send_end, messages}}
local r = mp.Process{target = receiver, args = {recv_end, send_end}}
r:start()
s:start()
-- the parent keeps no copy of either end, or the receiver would never
-- see the end of file
send_end:close()
recv_end:close()
s:join()
r:join()
print(string.format("sender exited with %d, receiver with %d", s.exitcode,
  r.exitcode))
