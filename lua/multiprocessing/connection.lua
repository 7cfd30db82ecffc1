-- multiprocessing.connection: Pipe, Listener, Client and wait.
--
-- Connections are C handles (runtime/conn.c): framing, the HMAC
-- handshake and the waits are there.  This file is the policy: options,
-- the order of the handshake (as CPython: the server challenges first,
-- then answers the client's challenge), timeouts, and which objects
-- mp.wait understands.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local argerror, typeerror = util.argerror, util.typeerror

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

-- An empty key would be no key at all: refused, so that authentication
-- is never turned off by accident (nil is the way to have none).
local function check_authkey(authkey, argn, fname)
  if authkey ~= nil and type(authkey) ~= "string" then
    argerror(argn, fname, "authkey must be a string, got " .. util.typename(authkey))
  end
  if authkey == "" then
    core.raise("ValueError", fname .. ": authkey must not be empty (an " ..
               "empty key would turn authentication off; pass nil for none)")
  end
  return authkey
end

-- A NUL byte in a path or host name would cut it where the OS reads it
-- (an abstract Unix name, "\0...", is taken whole).
function C._check_address(address, fname)
  local what
  if type(address) == "string" then
    if address:sub(1, 1) ~= "\0" and address:find("\0", 1, true) then
      what = "a Unix socket path"
    end
  elseif type(address) == "table" and type(address[1]) == "string" and
         address[1]:find("\0", 1, true) then
    what = "a host name"
  end
  if what then
    core.raise("ValueError", fname .. ": address contains a NUL byte (" ..
               what .. " would be cut at it)")
  end
end

-- Runs the handshake halves on a fresh connection (the client's side);
-- closes it on failure.
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

-- Handshakes run side by side.  A peer that connects and then says
-- nothing, or trickles its bytes, must not hold the listener: each
-- accepted connection that must authenticate becomes a pending handshake
-- (a coroutine over non-blocking steps, with its own deadline), and the
-- listener's loop polls the listening socket and every pending handshake
-- together.  A peer may send at most 256 bytes per handshake message (as
-- CPython).  Finished connections queue in _done, failures in _failed
-- (accept raises them in turn; the manager's server drops them).

-- The server's half of the handshake (as CPython's: challenge the
-- client, then answer its challenge); yields while waiting for input.
local function server_handshake(conn, key)
  local function recv()
    while true do
      local m = conn:_recv_small()
      if m then return m end
      coroutine.yield()
    end
  end
  -- (the few bytes we send fit in a fresh socket's buffer: no wait)
  local challenge = core.hs_challenge()
  conn:send_bytes(challenge)
  local ok = core.hs_verify(key, challenge, recv())
  conn:send_bytes(ok and "#WELCOME#" or "#FAILURE#")
  if not ok then core.raise("AuthenticationError", "digest received was wrong") end
  conn:send_bytes(core.hs_answer(key, recv()))
  if recv() ~= "#WELCOME#" then
    core.raise("AuthenticationError", "digest sent was rejected")
  end
end

local function is_interrupt(e)
  return type(e) == "string" and e:find("interrupted!", 1, true) ~= nil
end

-- Runs p's handshake until it waits: "wait", "done" or "failed", err.
local function advance(p)
  local ok, err = coroutine.resume(p.co, p.conn, p.key)
  if ok and coroutine.status(p.co) == "suspended" then return "wait" end
  if ok then
    core.set_trusted(p.conn)
    return "done"
  end
  p.conn:close()
  return "failed", err
end

-- One round of the listener's loop: waits up to `left` seconds (nil:
-- without end) for a client or for input of a pending handshake, then
-- accepts what came and advances what can move.  Ctrl-C is raised once
-- the queues are consistent again.
local function service(self, left)
  local pend, done, failed = self._pending, self._done, self._failed
  local fds, wake = {self._handle:fileno()}, left and core.now() + left
  for i, p in ipairs(pend) do
    fds[i + 1] = p.fd
    if wake == nil or p.deadline < wake then wake = p.deadline end
  end
  local hit = core.wait_fds(fds, wake and math.max(wake - core.now(), 0))
  local ready = {}
  for _, i in ipairs(hit) do ready[i] = true end
  local interrupted
  local function settle(p, st, err)
    if st == "wait" then return true end
    if st == "done" then done[#done + 1] = p.conn
    elseif is_interrupt(err) then interrupted = err
    else failed[#failed + 1] = err end
    return false
  end
  local keep, t = {}, core.now()
  for i, p in ipairs(pend) do
    local st, err = "wait"
    if ready[i + 1] then
      st, err = advance(p)
    elseif t >= p.deadline then
      p.conn:close()
      st, err = "failed", core.new_error("TimeoutError", "the client did " ..
        "not complete the handshake in time")
    end
    if settle(p, st, err) then keep[#keep + 1] = p end
  end
  if ready[1] then
    -- every client queued by now (a bounded number per round)
    local key = self._authkey
    for _ = 1, 64 do
      local ok, conn = pcall(self._handle.accept, self._handle, 0)
      if not ok then
        if is_interrupt(conn) then interrupted = conn end
        break                    -- (TimeoutError: no one left)
      end
      if key == nil then
        done[#done + 1] = conn
      else
        local p = {conn = conn, fd = conn:fileno(), key = key,
                   co = coroutine.create(server_handshake),
                   deadline = core.now() + (self._timeout or C.CONNECTION_TIMEOUT)}
        if settle(p, advance(p)) then keep[#keep + 1] = p end
      end
    end
  end
  self._pending = keep
  if interrupted then error(interrupted, 0) end
end

-- For a server's own poll loop (the manager's): the fds to watch for
-- this listener and the time its next handshake expires (or nil).
function C._listener_watch(self)
  if self._pending[1] == nil then   -- (the usual case: no new table)
    local fds = self._watch1 or {self._handle:fileno()}
    self._watch1 = fds
    return fds, nil
  end
  local fds, wake = {self._handle:fileno()}, nil
  for i, p in ipairs(self._pending) do
    fds[i + 1] = p.fd
    if wake == nil or p.deadline < wake then wake = p.deadline end
  end
  return fds, wake
end

-- ... and the connections that finished their handshake by now (failed
-- handshakes are dropped).  Never waits.
function C._listener_take(self)
  service(self, 0)
  local done = self._done
  self._done, self._failed = {}, {}
  return done
end

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
      argerror(1, "Listener", "unknown option '" .. tostring(k) .. "'")
    end
  end
  local address = opts.address
  if address == nil then
    anon = anon + 1
    address = string.format("\0luamp-listener-%d-%d-%d", core.getpid(), anon,
                            math.random(0, 0x7fffffff))
  end
  C._check_address(address, "Listener")
  local key = check_authkey(opts.authkey, 1, "Listener")
  local h = core.listen(address, opts.backlog)
  local self = setmetatable({_handle = h, _authkey = key,
                             _timeout = opts.timeout, _pending = {},
                             _done = {}, _failed = {}}, Listener)
  self._address = h:address()
  return self
end

-- listener:accept([timeout]) -> Connection.  With an authkey the HMAC
-- handshake runs first: AuthenticationError on a wrong key, TimeoutError
-- when the client does not complete it in time; the listener stays
-- usable either way, and other clients' handshakes go on meanwhile.
function Listener:accept(timeout)
  if timeout ~= nil and type(timeout) ~= "number" then
    typeerror(1, "accept", "number", timeout)
  end
  local deadline = timeout and core.now() + math.max(timeout, 0)
  local last
  while true do
    if #self._done > 0 then return table.remove(self._done, 1) end
    if #self._failed > 0 then error(table.remove(self._failed, 1), 0) end
    local left = deadline and math.max(deadline - core.now(), 0)
    if last then core.raise("TimeoutError", "timed out") end
    service(self, left)
    last = left == 0
  end
end

function Listener:close()
  rawset(self, "_closed", true)
  for _, p in ipairs(self._pending) do p.conn:close() end
  for _, c in ipairs(self._done) do c:close() end
  self._pending, self._done, self._failed = {}, {}, {}
  self._handle:close()
end
function Listener:fileno() return self._handle:fileno() end
-- the cqueues protocol: readable when accept() would not block (the
-- handshake of an authkey may still wait for the client)
function Listener:pollfd() return self._handle:fileno() end
function Listener:events() return "r" end
function Listener:timeout() return nil end
Listener.__close = Listener.close

-- A Listener travels to other processes of the tree (send() on a duplex
-- Pipe; conn.c passes its socket with SCM_RIGHTS) with its address, key
-- and timeout; handshakes under way stay with the sender.
core.register_class("multiprocessing.connection.Listener", Listener, {
  reduce = function(self)
    if rawget(self, "_closed") then error("listener is closed", 0) end
    return {handle = self._handle, authkey = self._authkey,
            timeout = self._timeout, address = self._address}
  end,
  rebuild = function(s)
    return setmetatable({_handle = s.handle, _authkey = s.authkey,
                         _timeout = s.timeout, _address = s.address,
                         _pending = {}, _done = {}, _failed = {}}, Listener)
  end,
  trusted_only = true})

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
  C._check_address(address, "Client")
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
-- obj[k], or nil when indexing obj raises (a userdata without fields);
-- a Ctrl-C ("interrupted!") that lands in the pcall is raised on, not
-- taken for "no such field"
local function field(obj, k)
  local ok, v = pcall(function() return obj[k] end)
  if ok then return v end
  if v == "interrupted!" then error(v, 0) end
  return nil
end

local function wait_spec(obj)
  local t = type(obj)
  if t == "number" then
    local fd = math.tointeger(obj)
    if not fd or fd < 0 then
      argerror(1, "wait", "bad file descriptor " .. tostring(obj))
    end
    return fd
  end
  if t == "table" or t == "userdata" then
    local f = field(obj, "_wait_fd")
    if f then return f(obj) end
    f = field(obj, "sentinel")
    if type(f) == "number" then return f end
    f = field(obj, "fileno")
    if f then return f(obj) end
  end
  argerror(1, "wait", "cannot wait for a " .. util.typename(obj) .. " value")
end

-- mp.wait(objects [, timeout]) -> the ready subset of objects, in their
-- order; an empty list on timeout.
function C.wait(objects, timeout)
  if type(objects) ~= "table" then typeerror(1, "wait", "table", objects) end
  if timeout ~= nil then
    if type(timeout) ~= "number" then typeerror(2, "wait", "number or nil", timeout) end
    if timeout ~= timeout then argerror(2, "wait", "timeout is NaN") end
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

-- A Listener's methods check their self (listener.accept() for
-- listener:accept() is told so at the caller's line).
util.checked_methods(Listener, "Listener", "listener", function(v)
  return getmetatable(v) == Listener
end)
Listener.__close = Listener.close

return C
