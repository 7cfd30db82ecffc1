-- multiprocessing.broker_queue: mp.Queue{broker = url, name =, authkey =}
-- and mp.JoinableQueue{...}: a queue in Redis that processes on any host
-- share.  (runtime/queue.c hands a constructor call with a broker option
-- over to this file.)
--
-- Keys, under P = "luamp:queue:" .. name .. ":":
--   P.."items"   list of entries "id|" .. mac .. payload (FIFO: RPUSH, LPOP)
--   P.."taken"   zset entry -> lease expiry (taken, not yet handed over;
--                JoinableQueue: taken, not done)
--   P.."held:"..cid  token .. "|" .. entry: the last take of a consumer
--                (one at a time; expires with the lease)
--   P.."wake"    tokens that wake blocked getters (a hint only)
-- A JoinableQueue's unfinished items are those in P.."items" and
-- P.."taken" (read in one step): an item leaves the count when it is
-- task_done() or dead-lettered, and no counter can drift from the items.
-- Each entry is signed as the Pool's envelopes are (HMAC-SHA256 under the
-- authkey over the queue's name and the payload) and checked before it is
-- decoded.  An entry that fails the check is moved to P.."dead" and the
-- get goes on to the next.
--
-- put returns once Redis has the item.  Every get leases the item it
-- pops (the pop and the lease are one step), so no item is lost between
-- the pop in Redis and the return to the caller: a plain Queue's get
-- acks it (a write, no wait) once it is decoded and about to be
-- returned; a JoinableQueue's task_done() is the ack.  A get whose take
-- failed half-way (Ctrl-C, a timeout, a lost connection, a decode error
-- before the ack) gives its item back to the front at once when it can
-- (a take carries a token naming it, and a retried take with the same
-- token gets the same item); an item whose consumer died (or overran the
-- lease) goes back to the front when the lease runs out.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local broker = require "multiprocessing.broker"

local raise, argerror = util.raise, util.argerror
local now, encode, decode, hmac = core.now, core.encode, core.decode, core.hmac_sha256
local TRUSTED = {trusted = true}
local MAC = 32

local M = {}

M.SCRIPT = [[
local op, P = ARGV[1], ARGV[2]
-- (the commands of an op checked against the caller's ACL before it
-- writes: Redis keeps what a script wrote before a refused command, and a
-- take refused after its LPOP would lose the item)
local I, K, W, H = P .. 'items', P .. 'taken', P .. 'wake', P .. 'held:x'
local WAKE = {{'lpush', W, 'x'}, {'ltrim', W, '0', '1'}}
local NEEDS = {
  put = {{{'rpush', I, 'x'}}, WAKE},
  take = {{{'zrangebyscore', K, '0', '1'}, {'zrem', K, 'x'}, {'lpush', I, 'x'}, {'get', H},
           {'zscore', K, 'x'}, {'lpop', I}, {'zadd', K, '0', 'x'}, {'set', H, 'x'}}},
  back = {{{'get', H}, {'zrem', K, 'x'}, {'lpush', I, 'x'}}, WAKE},
}
for _, list in ipairs(NEEDS[op] or {}) do
  for _, c in ipairs(list) do
    if not redis.acl_check_cmd(unpack(c)) then
      return redis.error_reply('NOPERM this Redis user may not run ' .. string.upper(c[1]) ..
                               ' on ' .. c[2] .. ' (luamp needs it to ' .. op .. ')')
    end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if op == 'put' then              -- entry
  redis.call('RPUSH', P .. 'items', ARGV[3])
  redis.call('LPUSH', P .. 'wake', '1')
  redis.call('LTRIM', P .. 'wake', 0, 63)
  return 1
elseif op == 'take' then         -- lease_ms, cid, token
  local lease, held, token = tonumber(ARGV[3]), P .. 'held:' .. ARGV[4], ARGV[5]
  local back = redis.call('ZRANGEBYSCORE', P .. 'taken', '-inf', now, 'LIMIT', 0, 100)
  for i = #back, 1, -1 do
    redis.call('ZREM', P .. 'taken', back[i])
    redis.call('LPUSH', P .. 'items', back[i])
  end
  local h = redis.call('GET', held)
  if h and string.sub(h, 1, #token + 1) == token .. '|' then   -- (a retry)
    local e = string.sub(h, #token + 2)
    if redis.call('ZSCORE', P .. 'taken', e) then return e end
  end
  local e = redis.call('LPOP', P .. 'items')
  if not e then return false end
  redis.call('ZADD', P .. 'taken', now + lease, e)
  redis.call('SET', held, token .. '|' .. e, 'PX', lease)
  return e
elseif op == 'back' then         -- cid, token, entry ('': the token's), acked
  local token, e = ARGV[4], ARGV[5]
  if e == '' then
    local h = redis.call('GET', P .. 'held:' .. ARGV[3])
    if not h or string.sub(h, 1, #token + 1) ~= token .. '|' then return 0 end
    e = string.sub(h, #token + 2)
  end
  if redis.call('ZREM', P .. 'taken', e) == 1 or ARGV[6] == '1' then
    redis.call('LPUSH', P .. 'items', e)
    redis.call('LPUSH', P .. 'wake', '1')
    redis.call('LTRIM', P .. 'wake', 0, 63)
    return 1
  end
  return 0
elseif op == 'done' then         -- entry
  return redis.call('ZREM', P .. 'taken', ARGV[3])
elseif op == 'unfinished' then
  return redis.call('LLEN', P .. 'items') + redis.call('ZCARD', P .. 'taken')
end
return redis.error_reply('luamp: unknown op ' .. tostring(op))
]]

local Queue = {}
Queue.__index = Queue
Queue.__name = "BrokerQueue"

local OPTIONS = {broker = true, name = true, authkey = true, authkey_file = true,
                 lease = true, username = true, password = true, password_file = true,
                 connect_timeout = true, maxsize = true}

function M.Queue(opts, joinable)
  local fname = joinable and "JoinableQueue" or "Queue"
  for k in pairs(opts) do
    if not OPTIONS[k] then argerror(1, fname, "unknown option '" .. tostring(k) .. "'") end
  end
  if opts.maxsize ~= nil and opts.maxsize > 0 then
    raise("ValueError", fname .. ": a broker queue has no maxsize")
  end
  local name = opts.name
  if type(name) ~= "string" or not name:match("^[%w_%-%.]+$") then
    argerror(1, fname, "name must be a name of letters, digits, _ - ., got " .. tostring(name))
  end
  local key = broker.authkey(opts, fname)
  local cfg = broker.config(opts, fname)
  local lease = opts.lease or 30
  if type(lease) ~= "number" or lease <= 0 then
    argerror(1, fname, "lease must be a positive number")
  end
  local prefix = "luamp:queue:" .. name .. ":"
  local b = broker.connect(cfg, prefix, M.SCRIPT)
  return setmetatable({_b = b, _key = key, _name = name, _prefix = prefix,
                       _joinable = joinable and true or false,
                       _lease_ms = math.floor(lease * 1000), _cid = broker.random_id(),
                       _seq = 0, _taken = {}, _closed = false, _pid = core.getpid()}, Queue)
end

local function check(self, fname)
  if getmetatable(self) ~= Queue then argerror(1, fname, "broker Queue expected") end
  if self._closed then raise("ValueError", "Queue is closed") end
  if self._pid ~= core.getpid() then
    -- a forked child: the items its parent took are the parent's to
    -- finish; its own ids are its own
    self._pid, self._taken, self._cid, self._seq = core.getpid(), {}, broker.random_id(), 0
  end
end

function Queue:put(v)
  check(self, "put")
  self._seq = self._seq + 1
  local payload = encode(v)
  local entry = self._cid .. "." .. self._seq .. "|" ..
                hmac(self._key, "Q" .. self._name .. "\0" .. payload) .. payload
  self._b:op("put", entry)
end
Queue.put_nowait = Queue.put

-- Moves a taken entry to the dead letters.
local function bury(self, entry)
  self._b:pipeline({{"RPUSH", self._prefix .. "dead", entry},
                    {"ZREM", self._prefix .. "taken", entry}})
end

-- The value of an entry, or nothing when its signature is wrong (it is
-- then dead-lettered; so is one that passes and fails to decode, whose
-- error is raised).
local function open(self, entry)
  local at = entry:find("|", 1, true)
  local body = at and entry:sub(at + 1) or ""
  local payload = body:sub(MAC + 1)
  if #body < MAC or not hmac(self._key, "Q" .. self._name .. "\0" .. payload,
                             body:sub(1, MAC)) then
    bury(self, entry)
    io.stderr:write("luamp broker queue ", self._name,
                    ": dropped an entry that failed its signature check\n")
    return false
  end
  local ok, v = pcall(decode, payload, TRUSTED)
  if not ok then
    if v ~= "interrupted!" then bury(self, entry) end
    error(v, 0)
  end
  return true, v
end

-- Gives back the item of a get that raised before its caller had it:
-- entry nil when the take's reply never came (the token names it).  A
-- failure here leaves it to the lease.
local function give_back(self, token, entry, acked)
  pcall(self._b.op, self._b, "back", self._cid, token, entry or "",
        acked and "1" or "0")
end

-- One take: false when the queue is empty; else true, and true and the
-- value (or false for an entry that failed its signature check).
local function take(self)
  self._seq = self._seq + 1
  local token = self._cid .. "." .. self._seq
  local ok, e = pcall(self._b.op_after_sent, self._b, "take", self._lease_ms,
                       self._cid, token)
  if not ok then give_back(self, token) error(e, 0) end
  if not e then return false end
  local acked = false
  local ok2, got, v = pcall(function()
    local good, v = open(self, e)
    if not good then return false end
    if self._joinable then
      self._taken[#self._taken + 1] = e
    else
      acked = true                 -- (from here the ack may reach Redis)
      self._b:send({{"ZREM", self._prefix .. "taken", e}})
    end
    -- (a Ctrl-C that came meanwhile: the item goes back, under stock
    -- lua5.4 too, whose hook would drop it at the return)
    core.check_interrupt()
    return true, v
  end)
  if not ok2 then
    if self._joinable and self._taken[#self._taken] == e then
      table.remove(self._taken)
    end
    give_back(self, token, e, acked)
    error(got, 0)
  end
  return true, got, v
end

local function get(self, block, deadline)
  while true do
    local e, ok, v = take(self)
    if e then
      if ok then return v end
    elseif not block or (deadline and now() >= deadline) then
      raise("Empty", "the queue is empty")
    else
      local t = deadline and math.min(deadline - now(), 0.2) or 0.2
      t = math.max(t, 0.01)
      self._b:command({"BLPOP", self._prefix .. "wake", string.format("%.3f", t)}, t + 30)
    end
  end
end

-- get([block [, timeout]]): Empty when nothing came in time.  The take
-- and the return are one step for Ctrl-C: the loop runs shielded (a
-- Ctrl-C ends only its waits, and a take cut there gives its item back),
-- and it is a tail call, so its results go straight to the caller, where
-- the Ctrl-C lands next (luamp's hook lets a return finish).  Either the
-- item is in the caller's hands or it is in the queue.
function Queue:get(block, timeout)
  check(self, "get")
  if block == nil then block = true end
  if timeout ~= nil and type(timeout) ~= "number" then
    argerror(2, "get", "timeout must be a number or nil")
  end
  return core.shielded(get, self, block, block and timeout and now() + math.max(timeout, 0))
end

function Queue:get_nowait() return self:get(false) end

function Queue:qsize()
  check(self, "qsize")
  return self._b:command({"LLEN", self._prefix .. "items"})
end
function Queue:empty() return self:qsize() == 0 end
function Queue:full() return false end

local function done(self)
  self._b:op("done", self._taken[1])
  table.remove(self._taken, 1)
end

-- task_done(): the oldest item this process took and has not finished.
function Queue:task_done()
  check(self, "task_done")
  if not self._joinable then raise("ValueError", "task_done() on a Queue that is not joinable") end
  if self._taken[1] == nil then raise("ValueError", "task_done() called too many times") end
  -- (the ack and the books in one step for Ctrl-C: an item acked stays
  -- on the books of none, one not acked stays on this process's)
  core.shielded(done, self)
end

-- join([timeout]): until every item put was task_done() (by anyone).
function Queue:join(timeout)
  check(self, "join")
  if not self._joinable then raise("ValueError", "join() on a Queue that is not joinable") end
  local deadline = timeout and now() + math.max(timeout, 0)
  while self._b:op("unfinished") > 0 do
    if deadline and now() >= deadline then return false end
    core.sleep(0.02)
  end
  return true
end

function Queue:close()
  if self._closed then return end
  self._closed = true
  self._b:close()
end
function Queue:join_thread() end
function Queue:cancel_join_thread() end

Queue.__close = Queue.close
Queue.__tostring = function(self)
  return string.format("<%s broker %s%s>", self._joinable and "JoinableQueue" or "Queue",
                       self._name, self._closed and " closed" or "")
end

return M
