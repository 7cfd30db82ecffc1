-- multiprocessing.connection: Pipe, Listener, Client and wait.
--
-- Connections are C handles (runtime/conn.c): framing, the HMAC
-- handshake and the waits are there.  This file is the policy: options,
-- the order of the handshake (as CPython: the server challenges first,
-- then answers the client's challenge), timeouts, and which objects
-- mp.wait understands.
local core = require "multiprocessing.core"

local C = {}
C.connection = C      -- mp.connection is this module

-- Seconds an authenticating peer has to complete the handshake (CPython's
-- CONNECTION_TIMEOUT); a client that connects and says nothing costs the
-- server this long at most.
C.CONNECTION_TIMEOUT = 20.0

-- mp.Pipe([duplex]) -> a, b
function C.Pipe(duplex)
  if type(duplex) == "table" then duplex = duplex.duplex end
  if duplex == nil then duplex = true end
  return core.Pipe(duplex)
end

local function check_authkey(authkey, argn, fname)
  if authkey ~= nil and type(authkey) ~= "string" then
    error(string.format("bad argument #%d to '%s' (authkey must be a " ..
      "string, got %s)", argn, fname, type(authkey)), 3)
  end
  if authkey == "" then authkey = nil end
  return authkey
end

-- Runs the handshake halves on a fresh connection; closes it on failure.
local function authenticate(conn, authkey, server, timeout)
  local ok, err = pcall(function()
    if server then
      core.deliver_challenge(conn, authkey, timeout)
      core.answer_challenge(conn, authkey, timeout)
    else
      core.answer_challenge(conn, authkey, timeout)
      core.deliver_challenge(conn, authkey, timeout)
    end
  end)
  if not ok then
    conn:close()
    error(err, 0)
  end
  core.set_trusted(conn)
  return conn
end

-- ---- Listener --------------------------------------------------------------

local Listener = {}
Listener.__index = function(self, k)
  if k == "address" then return self._address end
  return Listener[k]
end
Listener.__name = "multiprocessing.connection.Listener"
Listener.__tostring = function(self)
  local a = self._address
  if type(a) == "table" then a = a[1] .. ":" .. a[2] end
  return string.format("<Listener %s%s>", tostring(a):gsub("%z", "@"),
                       rawget(self, "_closed") and " (closed)" or "")
end

local listener_opts = {address = true, family = true, backlog = true,
                       authkey = true, timeout = true}
local anon = 0

-- mp.connection.Listener{address=, authkey=, backlog=, timeout=}
-- or Listener(address, family, backlog, authkey) as Python's.
-- address nil: an abstract Unix socket with a fresh name.
function C.Listener(opts, family, backlog, authkey)
  if type(opts) ~= "table" or opts[1] ~= nil then
    opts = {address = opts, family = family, backlog = backlog,
            authkey = authkey}
  end
  for k in pairs(opts) do
    if not listener_opts[k] then
      error("bad argument #1 to 'Listener' (unknown option '" ..
            tostring(k) .. "')", 2)
    end
  end
  local address = opts.address
  if address == nil then
    anon = anon + 1
    address = string.format("\0luamp-listener-%d-%d-%d", core.getpid(), anon,
                            math.random(0, 0x7fffffff))
  end
  local key = check_authkey(opts.authkey, 1, "Listener")
  local h = core.listen(address, opts.backlog)
  local self = setmetatable({_handle = h, _authkey = key,
                             _timeout = opts.timeout}, Listener)
  self._address = h:address()
  return self
end

-- listener:accept([timeout]) -> Connection.  With an authkey the HMAC
-- handshake runs first: AuthenticationError on a wrong key, TimeoutError
-- when the client does not complete it in time; the listener stays
-- usable either way.
function Listener:accept(timeout)
  local conn = self._handle:accept(timeout)
  local key = self._authkey
  if key then
    authenticate(conn, key, true, self._timeout or C.CONNECTION_TIMEOUT)
  end
  return conn
end

function Listener:close()
  rawset(self, "_closed", true)
  self._handle:close()
end
function Listener:fileno() return self._handle:fileno() end
-- the cqueues protocol: readable when accept() would not block (the
-- handshake of an authkey may still wait for the client)
function Listener:pollfd() return self._handle:fileno() end
function Listener:events() return "r" end
function Listener:timeout() return nil end
Listener.__close = Listener.close

-- mp.connection.Client(address, authkey [, timeout])
-- or Client{address=, authkey=, timeout=}; Python's family argument may
-- stand between address and authkey.
function C.Client(address, a2, a3, a4)
  local authkey, timeout
  if type(address) == "table" and address.address ~= nil then
    authkey, timeout = address.authkey, address.timeout
    address = address.address
  elseif a3 ~= nil and type(a2) == "string" and
         (a2 == "AF_INET" or a2 == "AF_UNIX" or a2 == "AF_INET6") then
    authkey, timeout = a3, a4          -- Client(address, family, authkey)
  else
    authkey, timeout = a2, a3
  end
  local key = check_authkey(authkey, 2, "Client")
  local t = timeout or C.CONNECTION_TIMEOUT
  local conn = core.connect(address, t)
  if key then authenticate(conn, key, false, t) end
  return conn
end

-- ---- wait --------------------------------------------------------------

-- What mp.wait understands, by object:
--   a Connection       its fd
--   a Process          its sentinel
--   an integer         an fd
--   anything with a method _wait_fd() -> fd [, ready [, hint]]: the
--     object is ready when fd is readable, or when ready(obj) (optional)
--     returns true -- checked before sleeping (a Connection's read-ahead
--     buffer).  With hint = true the fd only says "maybe" (e.g. a queue's
--     doorbell): after a wake-up ready(obj) decides, so there are no
--     false positives.
--   anything with fileno() (Listener, Python-style objects)
-- Queues join by providing _wait_fd.
local function wait_spec(obj)
  local t = type(obj)
  if t == "number" then
    local fd = math.tointeger(obj)
    if not fd or fd < 0 then
      error("bad argument #1 to 'wait' (bad file descriptor " ..
            tostring(obj) .. ")", 4)
    end
    return fd
  end
  if t == "table" or t == "userdata" then
    local ok, f = pcall(function() return obj._wait_fd end)
    if ok and f then return f(obj) end
    ok, f = pcall(function() return obj.sentinel end)
    if ok and type(f) == "number" then return f end
    ok, f = pcall(function() return obj.fileno end)
    if ok and f then return f(obj) end
  end
  error("bad argument #1 to 'wait' (cannot wait for a " .. t .. " value)", 4)
end

-- mp.wait(objects [, timeout]) -> the ready subset of objects, in their
-- order; an empty list on timeout.
function C.wait(objects, timeout)
  if type(objects) ~= "table" then
    error("bad argument #1 to 'wait' (table expected, got " ..
          type(objects) .. ")", 2)
  end
  local fds, readies, hints = {}, {}, {}
  local n = #objects
  for i = 1, n do
    local fd, ready, hint = wait_spec(objects[i])
    fds[i] = fd
    readies[i] = ready
    hints[i] = hint and ready ~= nil
  end
  local deadline = timeout and core.now() + math.max(timeout, 0)
  while true do
    local out = {}
    -- objects that know they are ready need no sleep
    for i = 1, n do
      if readies[i] and readies[i](objects[i]) then out[#out + 1] = i end
    end
    local left = 0
    if #out == 0 then
      left = deadline and math.max(deadline - core.now(), 0) or nil
    end
    local hit = core.wait_fds(fds, left)
    local seen = {}
    for _, i in ipairs(out) do seen[i] = true end
    for _, i in ipairs(hit) do
      if not hints[i] or readies[i](objects[i]) then seen[i] = true end
    end
    local ready = {}
    for i = 1, n do
      if seen[i] then ready[#ready + 1] = objects[i] end
    end
    if #ready > 0 or #hit == 0 or (deadline and core.now() >= deadline) then
      return ready
    end
    -- only hints fired and none was ready: wait again
  end
end

return C
