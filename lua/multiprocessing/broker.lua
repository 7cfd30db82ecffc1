-- multiprocessing.broker: what the Pool, Executor and worker daemons
-- beyond one machine share -- the Redis connection (URL, AUTH, SELECT,
-- reconnecting), the keys of a namespace, the server-side script that
-- makes every change of a task's state one atomic step, and the signed
-- envelopes.  C (runtime/redis.c) is mechanism; this file is policy.
--
-- Keys of namespace ns, under P = "luamp:" .. ns .. ":":
--   P.."q"        list of task ids waiting (LPUSH new, RPOP to claim;
--                 a retried task is RPUSHed, so it goes next)
--   P.."t:"..id   hash: env (the signed task), att (attempts started),
--                 max (max_attempts); deleted by the ack
--   P.."leases"   zset id -> lease expiry (server time, ms)
--   P.."r:"..cid  list of results for client cid (task ids are cid.."."..n)
--   P.."dead"     list of dead letters: "id|attempts|reason"
--   P.."notices"  list of "ms|worker|reason": daemons that gave up (a
--                 Redis user refused a command they need); a client
--                 that sees one newer than itself fails its tasks
-- (An idle daemon waits for P.."q" itself with a BLMOVE of its tail onto
-- its tail: that pops nothing, so submitting costs no extra command.)
--
-- Envelopes.  A task's env is HMAC-SHA256(authkey, "T" .. id .. "\0" ..
-- payload) followed by the payload (a line naming the format of the
-- client -- broker_pool.FORMAT -- then the codec's bytes); a result is
-- "R" .. id .. "|" .. attempt .. "|" .. mac .. payload, its mac over
-- "R" .. id .. "\0" .. attempt .. "\0" .. payload.  The MAC binds the
-- bytes to their task (a result cannot be replayed for another) and is
-- checked in constant time before a byte of the payload is decoded;
-- only then does the decoder accept functions.  A dead-letter notice
-- "D|id|attempts|reason" is unsigned and read as text only: it can fail
-- a task, never run code (and whoever can write to Redis can delete a
-- task anyway).
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"

local raise, argerror = util.raise, util.argerror
local now, shielded = core.now, core.shielded

local M = {}

M.CONNECT_TIMEOUT = 10      -- seconds a broker may stay unreachable

-- ---------------------------------------------------------------------------
-- URLs: redis://[user:pass@]host[:port][/db], unix:///path[?db=n]; user
-- and password may also come from the options (username, password,
-- password_file) or the environment (LUAMP_REDIS_USERNAME,
-- LUAMP_REDIS_PASSWORD).

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

function M.parse_url(url, fname)
  if type(url) ~= "string" then
    argerror(1, fname, "broker must be a URL string, got " .. util.typename(url))
  end
  local cfg = {}
  local path, query = url:match("^unix://(/[^?]*)%??(.*)$")
  if path then
    cfg.path = path
    cfg.db = tonumber(query:match("db=(%d+)") or "0")
    return cfg
  end
  local rest = url:match("^redis://(.*)$")
  if not rest then
    raise("ValueError", fname .. ": broker URL must be redis://[user:pass@]host:port/db " ..
          "or unix:///path, got " .. string.format("%q", url))
  end
  local auth, hostpart = rest:match("^(.*)@([^@]*)$")
  if not auth then hostpart = rest end
  if auth then
    local u, p = auth:match("^([^:]*):(.*)$")
    if u then cfg.username, cfg.password = unescape(u), unescape(p)
    else cfg.password = unescape(auth) end
    if cfg.username == "" then cfg.username = nil end
  end
  local hp, db = hostpart:match("^([^/]*)/?(%d*)$")
  if not hp then raise("ValueError", fname .. ": bad broker URL " .. string.format("%q", url)) end
  local host, port = hp:match("^%[(.+)%]:?(%d*)$")
  if not host then host, port = hp:match("^([^:]*):?(%d*)$") end
  cfg.host = host ~= "" and host or "127.0.0.1"
  cfg.port = tonumber(port ~= "" and port or "6379")
  cfg.db = tonumber(db ~= "" and db or "0")
  return cfg
end

-- The options every broker user takes: broker URL, credentials, timeout.
function M.config(opts, fname)
  local cfg = M.parse_url(opts.broker, fname)
  cfg.username = opts.username or cfg.username or os.getenv("LUAMP_REDIS_USERNAME")
  cfg.password = opts.password or cfg.password
  if not cfg.password and opts.password_file then
    local f, err = io.open(opts.password_file)
    if not f then raise("FileNotFoundError", fname .. ": password_file: " .. err) end
    cfg.password = f:read("l")
    f:close()
  end
  cfg.password = cfg.password or os.getenv("LUAMP_REDIS_PASSWORD")
  cfg.connect_timeout = opts.connect_timeout or M.CONNECT_TIMEOUT
  if type(cfg.connect_timeout) ~= "number" or cfg.connect_timeout <= 0 then
    raise("ValueError", fname .. ": connect_timeout must be a positive number")
  end
  return cfg
end

-- The authkey: there is no safe default on a shared broker.
function M.authkey(opts, fname)
  local key = opts.authkey
  if key == nil and opts.authkey_file then
    local f, err = io.open(opts.authkey_file, "rb")
    if not f then raise("FileNotFoundError", fname .. ": authkey_file: " .. err) end
    key = f:read("a"):gsub("\n$", "")
    f:close()
  end
  if type(key) ~= "string" or #key == 0 then
    raise("ValueError", fname .. ": a broker needs an authkey (a non-empty string): " ..
          "anyone who can write to it could otherwise run code on every worker")
  end
  return key
end

-- ---------------------------------------------------------------------------
-- The server-side script: every state change of a task in one atomic
-- step.  ARGV[1] is the operation, ARGV[2] the key prefix.
M.SCRIPT = [[
local op, P = ARGV[1], ARGV[2]
-- Every command an op may run is checked against the caller's ACL before
-- the op writes anything: Redis does not roll a script back, so a command
-- refused half-way would keep what came before it (a task popped and
-- never leased: lost).  A refused op changes nothing, and its error
-- names the command and the key.
local Q, L, D, T, R = P .. 'q', P .. 'leases', P .. 'dead', P .. 't:x', P .. 'r:x'
local DEAD = {{'zrem', L, 'x'}, {'del', T}, {'rpush', D, 'x'}, {'rpush', R, 'x'}}
local RETRY = {{'zrem', L, 'x'}, {'hmget', T, 'att'}, {'rpush', Q, 'x'}}
local REAP = {{'zrangebyscore', L, '0', '1'}}
local NEEDS = {
  claim = {REAP, RETRY, DEAD, {{'rpop', Q}, {'hmget', T, 'env'}, {'hincrby', T, 'att', '1'},
                               {'hset', T, 'worker', 'x'}, {'zadd', L, '0', 'x'}}},
  acks = {{{'hmget', T, 'att'}, {'zrem', L, 'x'}, {'del', T}, {'rpush', R, 'x'},
           {'expire', R, '1'}}},
  nack = {RETRY, DEAD, {{'hget', T, 'att'}}},
  release = {{{'hget', T, 'att'}, {'zrem', L, 'x'}, {'hincrby', T, 'max', '1'}, {'rpush', Q, 'x'}}},
  reject = {DEAD, {{'hget', T, 'att'}}},
  beat = {{{'hmget', T, 'att'}, {'zadd', L, 'XX', '0', 'x'}}},
  reap = {REAP, RETRY, DEAD, {{'lrange', P .. 'notices', '0', '-1'}}},
  -- (a worker daemon's start: every op it runs, and its plain commands)
  check = {{{'blmove', Q, Q, 'RIGHT', 'RIGHT', '0'}, {'rpush', P .. 'notices', 'x'},
            {'ltrim', P .. 'notices', '0', '1'}, {'expire', P .. 'notices', '1'}}},
}
local function refused(name)
  if not redis.acl_check_cmd('time') then return 'TIME' end
  for _, list in ipairs(NEEDS[name] or {}) do
    for _, c in ipairs(list) do
      if not redis.acl_check_cmd(unpack(c)) then return string.upper(c[1]) .. ' on ' .. c[2] end
    end
  end
end
local function check(name)
  local what = refused(name)
  if what then
    return 'NOPERM this Redis user may not run ' .. what .. ' (luamp needs it to ' .. name .. ')'
  end
end
if op == 'check' then
  for _, name in ipairs({'check', 'claim', 'acks', 'nack', 'release', 'reject', 'beat'}) do
    local e = check(name)
    if e then return redis.error_reply(e) end
  end
  return 1
end
do
  local e = check(op)
  if e then return redis.error_reply(e) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function client_of(id) return string.match(id, '^(.*)%.[^.]*$') or id end
-- a task leaves for good: dead letter and notice to its client
local function dead(id, att, reason)
  redis.call('ZREM', P .. 'leases', id)
  redis.call('DEL', P .. 't:' .. id)
  redis.call('RPUSH', P .. 'dead', id .. '|' .. att .. '|' .. reason)
  redis.call('RPUSH', P .. 'r:' .. client_of(id), 'D|' .. id .. '|' .. att .. '|' .. reason)
end
-- a task whose attempt ended without a result: retried or dead
local function retry(id, reason)
  redis.call('ZREM', P .. 'leases', id)
  local h = redis.call('HMGET', P .. 't:' .. id, 'att', 'max')
  if not h[1] then return end
  if tonumber(h[1]) >= tonumber(h[2]) then dead(id, h[1], reason)
  else redis.call('RPUSH', P .. 'q', id) end
end
-- a result in: the task leaves, its result goes to its client (0: the
-- attempt is not the current one -- fenced out)
local function ack(id, att, result)
  local k = P .. 't:' .. id
  local h = redis.call('HMGET', k, 'att', 'ttl')
  if h[1] ~= att then return 0 end
  redis.call('ZREM', P .. 'leases', id)
  redis.call('DEL', k)
  local r = P .. 'r:' .. client_of(id)
  redis.call('RPUSH', r, result)
  redis.call('EXPIRE', r, tonumber(h[2] or 3600))
  return 1
end
local function reap()
  local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(ids) do retry(id, 'lease expired') end
  return #ids
end
if op == 'claim' then            -- n, lease_ms, worker
  reap()
  local out = {}
  for _ = 1, tonumber(ARGV[3]) do
    local id = redis.call('RPOP', P .. 'q')
    if not id then break end
    local k = P .. 't:' .. id
    local h = redis.call('HMGET', k, 'env', 'lease')
    if h[1] then
      local att = redis.call('HINCRBY', k, 'att', 1)
      local lease = tonumber(h[2] or ARGV[4])
      redis.call('HSET', k, 'worker', ARGV[5])
      redis.call('ZADD', P .. 'leases', now + lease, id)
      out[#out + 1] = id
      out[#out + 1] = att
      out[#out + 1] = h[1]
      out[#out + 1] = lease
    end
  end
  return out
elseif op == 'acks' then         -- id1, attempt1, result1, id2...: a list of acks' replies
  local out = {}
  for i = 3, #ARGV, 3 do out[#out + 1] = ack(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
  return out
elseif op == 'nack' then         -- id, attempt, reason
  local id = ARGV[3]
  if redis.call('HGET', P .. 't:' .. id, 'att') ~= ARGV[4] then return 0 end
  retry(id, ARGV[5])
  return 1
elseif op == 'release' then      -- id, attempt: handed back unfinished by a
  -- host that stops (SIGTERM); queued next, and it does not count
  -- against max_attempts (the attempt number still grows: a fence)
  local id = ARGV[3]
  local k = P .. 't:' .. id
  if redis.call('HGET', k, 'att') ~= ARGV[4] then return 0 end
  redis.call('ZREM', P .. 'leases', id)
  redis.call('HINCRBY', k, 'max', 1)
  redis.call('RPUSH', P .. 'q', id)
  return 1
elseif op == 'reject' then       -- id, reason: a task that failed its check
  local id = ARGV[3]
  local att = redis.call('HGET', P .. 't:' .. id, 'att') or '0'
  dead(id, att, ARGV[4])
  return 1
elseif op == 'beat' then         -- id1, att1, id2, att2...
  local n = 0
  for i = 3, #ARGV, 2 do
    local h = redis.call('HMGET', P .. 't:' .. ARGV[i], 'att', 'lease')
    if h[1] == ARGV[i + 1] then
      redis.call('ZADD', P .. 'leases', 'XX', now + tonumber(h[2] or 30000), ARGV[i])
      n = n + 1
    end
  end
  return n
elseif op == 'reap' then         -- [since]: and the notices of daemons that gave up
  local n = reap()
  if not ARGV[3] then return n end
  local out = {n}
  for _, e in ipairs(redis.call('LRANGE', P .. 'notices', -20, -1)) do
    local ms = tonumber(string.match(e, '^(%d+)|'))
    if ms and ms >= tonumber(ARGV[3]) then out[#out + 1] = e end
  end
  return out
end
return redis.error_reply('luamp: unknown op ' .. tostring(op))
]]

-- ---------------------------------------------------------------------------
-- A broker connection: reconnects after a fork (by pid) and after a
-- lost connection, for at most connect_timeout seconds in a row; then
-- BrokenPoolError.  Error replies of commands raise RemoteError.
local Broker = {}
Broker.__index = Broker

local function is_broken(err)
  return core.is_error(err) and (err.kind == "BrokenPoolError" or
                                 err.kind == "TimeoutError")
end

-- script: the server-side script of the user (default M.SCRIPT, the
-- Pool's).
function M.connect(cfg, prefix, script)
  -- (unconf: commands sent whose replies are not read yet -- see send;
  -- written: how many of them the current connection carried)
  local b = setmetatable({cfg = cfg, prefix = prefix, r = false, sha = false,
                          script = script or M.SCRIPT, unconf = {}, written = 0,
                          pid = core.getpid()}, Broker)
  b:_reconnect(now() + cfg.connect_timeout)
  return b
end

-- One attempt at a connection ready for commands (AUTH, SELECT, script).
function Broker:_open(deadline)
  local cfg = self.cfg
  local r = core.redis_connect(cfg.host, cfg.port, cfg.path,
                               math.max(deadline - now(), 0.05))
  local ok, err = pcall(function()
    if cfg.password then
      if cfg.username then r:command({"AUTH", cfg.username, cfg.password}, 5)
      else r:command({"AUTH", cfg.password}, 5) end
    end
    if cfg.db and cfg.db ~= 0 then r:command({"SELECT", cfg.db}, 5) end
    self.sha = r:command({"SCRIPT", "LOAD", self.script}, 5)
  end)
  self.written = 0
  if not ok then
    r:close()
    if core.is_error(err) and err.kind == "RemoteError" then
      local text = tostring(err.redis)
      if text:match("^LOADING") or text:match("^BUSY") then
        -- (a restarted server still replaying its AOF: try again)
        raise("BrokenPoolError", "redis not ready: " .. text)
      end
      raise("BrokenPoolError", "redis refused the connection: " .. text)
    end
    error(err, 0)
  end
  self.r = r
end

function Broker:_reconnect(deadline)
  if self.r then self.r:close() self.r = false end
  while true do
    local ok, err = pcall(self._open, self, deadline)
    if ok then return end
    if not is_broken(err) or err.message:match("refused the connection") or
       now() >= deadline then
      if is_broken(err) and not err.message:match("refused the connection") then
        raise("BrokenPoolError", string.format("broker unreachable for %gs: %s",
              self.cfg.connect_timeout, err.message))
      end
      error(err, 0)
    end
    core.sleep(0.1)
  end
end

-- The commands sent and not confirmed yet: written on this connection
-- (again, on a new one), then -- when confirm -- their replies read; an
-- error reply among them raises.  Then fn(r, ...) when given.
local function run(self, confirm, fn, r, ...)
  local u = self.unconf
  if self.written < #u then
    r:send(table.move(u, self.written + 1, #u, 1, {}), 30)
    self.written = #u
  end
  if confirm and #u > 0 then
    local replies = r:receive(#u, 30)
    self.unconf, self.written = {}, 0
    for i = 1, replies.n do
      if core.is_error(replies[i]) then error(replies[i], 0) end
    end
  end
  if fn then return fn(r, ...) end
end

-- Runs fn(r) on a live connection, reconnecting and retrying on a lost
-- one.  Commands given here must be safe to repeat (the scripts' ops are:
-- a repeated ack or nack is fenced by the attempt).
function Broker:_with(fn, ...)
  return self:_run(true, fn, ...)
end

-- Every exchange on the connection runs shielded: a Ctrl-C cannot land
-- between a command written and its reply read, nor between a reply read
-- and the books (unconf, written) that say so -- either would leave a
-- reply on the session that the next command would take for its own (a
-- wrong item or result, or a wait for a reply that never comes).  Its
-- waits still end on Ctrl-C: redis.c then drops the connection, and what
-- unconf holds is written again on the next one.
local function exchange(self, confirm, fn, ...)
  local deadline
  if self.pid ~= core.getpid() then
    -- (a forked child: what its parent sent is the parent's)
    self.pid, self.unconf, self.written = core.getpid(), {}, 0
  end
  while true do
    if not self.r or self.r:owner() ~= core.getpid() then
      deadline = deadline or now() + self.cfg.connect_timeout
      self:_reconnect(deadline)
    end
    local ok, res = pcall(run, self, confirm, fn, self.r, ...)
    if ok then return res end
    if res == "interrupted!" then error(res, 0) end
    if not is_broken(res) then error(res, 0) end
    if self.r then self.r:close() self.r = false end
    deadline = deadline or now() + self.cfg.connect_timeout
  end
end

function Broker:_run(confirm, fn, ...)
  return shielded(exchange, self, confirm, fn, ...)
end

local function do_command(r, argv, timeout) return r:command(argv, timeout) end
local function do_pipeline(r, cmds, timeout) return r:pipeline(cmds, timeout) end

-- A blocking command's own wait plus a margin for the round trip.
function Broker:command(argv, timeout)
  return self:_with(do_command, argv, timeout)
end

function Broker:pipeline(cmds, timeout)
  return self:_with(do_pipeline, cmds, timeout)
end

-- Writes cmds to the server without waiting for their replies: once
-- this returns they are in the server's socket, and it runs them
-- whatever this process does next.  Their replies are read before the
-- next command's (an error reply then raises there); when the
-- connection is lost before that, they are written again on the next
-- one -- so they must be safe to repeat (at least once).
local function send(self, cmds)
  if self.pid ~= core.getpid() then
    self.pid, self.unconf, self.written = core.getpid(), {}, 0
  end
  local u = self.unconf
  table.move(cmds, 1, #cmds, #u + 1, u)
  exchange(self, #u >= 4096, nil)     -- (confirmed now and then: bounded)
end

-- (shielded: once cmds are in unconf they go out, now or with the next
-- exchange)
function Broker:send(cmds)
  shielded(send, self, cmds)
end

-- Runs the script's op (one atomic step) with its arguments.
function Broker:op(op, ...)
  local args = table.pack(...)
  return self:_with(function(r)
    local argv = {"EVALSHA", self.sha, 0, op, self.prefix}
    for i = 1, args.n do argv[#argv + 1] = args[i] end
    local ok, res = pcall(r.command, r, argv, 30)
    if not ok and core.is_error(res) and res.redis and res.redis:match("^NOSCRIPT") then
      -- (a restarted server forgot it)
      self.sha = r:command({"SCRIPT", "LOAD", self.script}, 5)
      argv[2] = self.sha
      return r:command(argv, 30)
    end
    if not ok then error(res, 0) end
    return res
  end)
end

-- Broker:op that writes its command behind those sent before (see send)
-- without waiting for their replies first: their replies and its own come
-- in the same round trip.  Their error replies raise after the op ran, so
-- only for a caller that can undo the op (the broker queue's take).
function Broker:op_after_sent(op, ...)
  local args = table.pack(...)
  return self:_run(false, function(r)
    local argv = {"EVALSHA", self.sha, 0, op, self.prefix}
    for i = 1, args.n do argv[#argv + 1] = args[i] end
    local n = #self.unconf
    r:send({argv}, 30)
    local res = r:receive(n + 1, 30)
    if n > 0 then
      self.unconf, self.written = {}, 0
      for i = 1, n do
        if core.is_error(res[i]) then error(res[i], 0) end
      end
    end
    res = res[n + 1]
    if core.is_error(res) then
      if not (res.redis and res.redis:match("^NOSCRIPT")) then error(res, 0) end
      self.sha = r:command({"SCRIPT", "LOAD", self.script}, 5)
      argv[2] = self.sha
      res = r:command(argv, 30)
    end
    return res
  end)
end

-- Runs several ops in one round trip (pipelined): ops is a list of
-- {op, args...}; returns their replies (error replies as error objects).
-- Only for ops that are safe to repeat (acks, nack, beat, claim).  wait,
-- when given, is a blocking command written first (its timeout: the
-- seconds it may block): the server runs the ops as soon as it ends,
-- and its reply is not returned (an error reply raises).
function Broker:ops(list, wait, seconds)
  if #list == 0 then return {} end
  local res = self:_with(function(r)
    local cmds = {wait}
    for _, o in ipairs(list) do
      local argv = {"EVALSHA", self.sha, 0, o[1], self.prefix}
      for k = 2, #o do argv[#argv + 1] = o[k] end
      cmds[#cmds + 1] = argv
    end
    local timeout = 30 + (seconds or 0)
    local res = r:pipeline(cmds, timeout)
    for i = 1, res.n do
      if core.is_error(res[i]) and tostring(res[i].redis):match("^NOSCRIPT") then
        self.sha = r:command({"SCRIPT", "LOAD", self.script}, 5)
        for _, c in ipairs(cmds) do
          if c[1] == "EVALSHA" then c[2] = self.sha end
        end
        return r:pipeline(cmds, timeout)
      end
    end
    return res
  end)
  if wait then
    if core.is_error(res[1]) then error(res[1], 0) end
    return table.move(res, 2, res.n, 1, {n = res.n - 1})
  end
  return res
end

function Broker:close()
  if self.r then self.r:close() self.r = false end
end

-- Tells the clients of a namespace that a worker daemon gave up (see
-- P.."notices"): on a connection of its own (the daemon's may be the one
-- that failed), stamped with the server's clock.  Best effort: a user
-- refused even this leaves no notice.  Returns true when it was written.
function M.post_notice(cfg, prefix, who, reason)
  local ok = pcall(function()
    local r = core.redis_connect(cfg.host, cfg.port, cfg.path, 5)
    local ok2, err = pcall(function()
      if cfg.password then
        r:command(cfg.username and {"AUTH", cfg.username, cfg.password}
                  or {"AUTH", cfg.password}, 5)
      end
      if cfg.db and cfg.db ~= 0 then r:command({"SELECT", cfg.db}, 5) end
      local tok, t = pcall(r.command, r, {"TIME"}, 5)
      local ms = math.floor(os.time() * 1000)
      if tok then ms = math.tointeger(tonumber(t[1])) * 1000 + math.tointeger(tonumber(t[2])) // 1000 end
      local k = prefix .. "notices"
      local rs = r:pipeline({{"RPUSH", k, ms .. "|" .. who .. "|" .. reason},
                             {"LTRIM", k, -100, -1}, {"EXPIRE", k, 3600}}, 5)
      if core.is_error(rs[1]) then error(rs[1], 0) end
    end)
    r:close()
    if not ok2 then error(err, 0) end
  end)
  return ok
end

-- The server's clock in ms (what notices are stamped with).
function M.server_ms(b)
  local t = b:command({"TIME"}, 5)
  return math.tointeger(tonumber(t[1])) * 1000 + math.tointeger(tonumber(t[2])) // 1000
end

-- ---------------------------------------------------------------------------
-- Envelopes (see the top of the file).
local hmac = core.hmac_sha256
local MAC = 32

function M.sign_task(key, id, payload)
  return hmac(key, "T" .. id .. "\0" .. payload) .. payload
end

-- The payload of a task env, or nil when its signature is wrong.
function M.open_task(key, id, env)
  if #env < MAC or not hmac(key, "T" .. id .. "\0" .. env:sub(MAC + 1), env:sub(1, MAC)) then
    return nil
  end
  return env:sub(MAC + 1)
end

function M.sign_result(key, id, att, payload)
  att = tostring(att)
  return "R" .. id .. "|" .. att .. "|" ..
         hmac(key, "R" .. id .. "\0" .. att .. "\0" .. payload) .. payload
end

-- A result entry: "R", id, attempt, payload (nil when its signature is
-- wrong); "D", id, attempts, reason for a dead letter; nil for anything
-- else.
function M.open_result(key, entry)
  local tag = entry:sub(1, 1)
  if tag == "D" then
    local id, att, reason = entry:match("^D|([^|]*)|([^|]*)|(.*)$")
    if id then return "D", id, att, reason end
    return nil
  end
  if tag ~= "R" then return nil end
  local id, att, at = entry:match("^R([^|]*)|(%d+)|()")
  if not id or #entry < at + MAC - 1 then return nil end
  local mac, payload = entry:sub(at, at + MAC - 1), entry:sub(at + MAC)
  if not hmac(key, "R" .. id .. "\0" .. att .. "\0" .. payload, mac) then
    return "R", id, att, nil
  end
  return "R", id, att, payload
end

-- Random hex: client ids.
function M.random_id()
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(8)
  f:close()
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

return M
