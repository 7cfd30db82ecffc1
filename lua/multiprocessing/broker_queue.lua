-- multiprocessing.broker_queue: mp.Queue{broker = url, name =, authkey =}
-- and mp.JoinableQueue{...}: a queue in Redis that processes on any host
-- share.  (runtime/queue.c hands a constructor call with a broker option
-- over to this file.)
--
-- Keys, under P = "luamp:queue:" .. name .. ":":
--   P.."items"   list of entries "id|" .. mac .. payload (FIFO: RPUSH, LPOP)
--   P.."taken"   zset entry -> lease expiry (JoinableQueue: taken, not done)
--   P.."unfinished"  JoinableQueue: items put and not task_done()
--   P.."wake"    tokens that wake blocked getters (a hint only)
-- Each entry is signed as the Pool's envelopes are (HMAC-SHA256 under the
-- authkey over the queue's name and the payload) and checked before it is
-- decoded.  An entry that fails the check is moved to P.."dead" and the
-- get goes on to the next.
--
-- put returns once Redis has the item.  A JoinableQueue's get leases the
-- item: task_done() is the ack, and an item whose consumer died (or took
-- longer than the lease) goes back to the front of the queue when the
-- lease runs out -- at least once, as the Pool.  A plain Queue's get
-- takes the item for good, as Python's.
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
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if op == 'put' then              -- entry, joinable
  redis.call('RPUSH', P .. 'items', ARGV[3])
  if ARGV[4] == '1' then redis.call('INCR', P .. 'unfinished') end
  redis.call('LPUSH', P .. 'wake', '1')
  redis.call('LTRIM', P .. 'wake', 0, 63)
  return 1
elseif op == 'take' then         -- lease_ms (0: no lease)
  local lease = tonumber(ARGV[3])
  if lease > 0 then
    local back = redis.call('ZRANGEBYSCORE', P .. 'taken', '-inf', now, 'LIMIT', 0, 100)
    for i = #back, 1, -1 do
      redis.call('ZREM', P .. 'taken', back[i])
      redis.call('LPUSH', P .. 'items', back[i])
    end
  end
  local e = redis.call('LPOP', P .. 'items')
  if not e then return false end
  if lease > 0 then redis.call('ZADD', P .. 'taken', now + lease, e) end
  return e
elseif op == 'done' then         -- entry
  if redis.call('ZREM', P .. 'taken', ARGV[3]) == 1 then
    return redis.call('DECR', P .. 'unfinished')
  end
  return -1
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
  self._b:op("put", entry, self._joinable and "1" or "0")
end
Queue.put_nowait = Queue.put

-- The value of an entry, or nothing when its signature is wrong (it is
-- then dead-lettered).
local function open(self, entry)
  local at = entry:find("|", 1, true)
  local body = at and entry:sub(at + 1) or ""
  local payload = body:sub(MAC + 1)
  if #body < MAC or not hmac(self._key, "Q" .. self._name .. "\0" .. payload,
                             body:sub(1, MAC)) then
    self._b:pipeline({{"RPUSH", self._prefix .. "dead", entry},
                      {"ZREM", self._prefix .. "taken", entry}})
    io.stderr:write("luamp broker queue ", self._name,
                    ": dropped an entry that failed its signature check\n")
    return false
  end
  return true, decode(payload, TRUSTED)
end

-- get([block [, timeout]]): Empty when nothing came in time.
function Queue:get(block, timeout)
  check(self, "get")
  if block == nil then block = true end
  if timeout ~= nil and type(timeout) ~= "number" then
    argerror(2, "get", "timeout must be a number or nil")
  end
  local deadline = block and timeout and now() + math.max(timeout, 0)
  local lease = self._joinable and self._lease_ms or 0
  while true do
    local e = self._b:op("take", lease)
    if e then
      local ok, v = open(self, e)
      if ok then
        if self._joinable then self._taken[#self._taken + 1] = e end
        return v
      end
    elseif not block or (deadline and now() >= deadline) then
      raise("Empty", "the queue is empty")
    else
      local t = deadline and math.min(deadline - now(), 0.2) or 0.2
      t = math.max(t, 0.01)
      self._b:command({"BLPOP", self._prefix .. "wake", string.format("%.3f", t)}, t + 30)
    end
  end
end

function Queue:get_nowait() return self:get(false) end

function Queue:qsize()
  check(self, "qsize")
  return self._b:command({"LLEN", self._prefix .. "items"})
end
function Queue:empty() return self:qsize() == 0 end
function Queue:full() return false end

-- task_done(): the oldest item this process took and has not finished.
function Queue:task_done()
  check(self, "task_done")
  if not self._joinable then raise("ValueError", "task_done() on a Queue that is not joinable") end
  local e = table.remove(self._taken, 1)
  if e == nil then raise("ValueError", "task_done() called too many times") end
  self._b:op("done", e)
end

-- join([timeout]): until every item put was task_done() (by anyone).
function Queue:join(timeout)
  check(self, "join")
  if not self._joinable then raise("ValueError", "join() on a Queue that is not joinable") end
  local deadline = timeout and now() + math.max(timeout, 0)
  while (tonumber(self._b:command({"GET", self._prefix .. "unfinished"})) or 0) > 0 do
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
