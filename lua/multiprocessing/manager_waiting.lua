-- multiprocessing.manager_waiting: the objects a manager serves that
-- make clients wait -- Queue, JoinableQueue, Lock, RLock, Semaphore,
-- BoundedSemaphore, Event, Condition, Barrier -- with their waiter lists,
-- parking (K.park) and what a dead client held (T.release_dead).
local core = require "multiprocessing.core"
local T = require "multiprocessing.manager_types"

local raise = core.raise
local pack, unpack = table.pack, table.unpack
local mtype, huge = math.type, math.huge
local K, types, PARKED = T.kernel, T.types, T.PARKED
local check_key, equal, timeout_arg, int_arg = T.check_key, T.equal,
  T.timeout_arg, T.int_arg

-- (each built-in type's metatable, registered under its typeid)
local function class(typeid)
  local mt = {__typeid = typeid}
  mt.__index = mt
  types[typeid] = mt
  return mt
end

-- ---- waiter lists ---------------------------------------------------------

-- FIFO of parked requests (or records holding one in .P); entries whose
-- request is done (answered, timed out, or its client died) are skipped.
local function wq_push(q, w) q[#q + 1] = w end

local function wq_pop(q)
  while q[1] ~= nil do
    local w = table.remove(q, 1)
    local P = w.P or w
    if not P.done then return w end
  end
  return nil
end

local function wq_live(q)
  local n = 0
  for _, w in ipairs(q) do
    if not (w.P or w).done then n = n + 1 end
  end
  return n
end

-- ---- Queue and JoinableQueue ---------------------------------------------

local Queue = class("Queue")
local JoinableQueue = class("JoinableQueue")
setmetatable(JoinableQueue, {__index = Queue})

function T.new_queue(maxsize, joinable)
  if type(maxsize) == "table" then maxsize = maxsize.maxsize end
  maxsize = maxsize == nil and 0 or int_arg(maxsize, "maxsize")
  return setmetatable({items = {}, head = 1, tail = 0, maxsize = maxsize,
                       getters = {}, putters = {}, unfinished = 0,
                       joiners = {}},
                      joinable and JoinableQueue or Queue)
end

local function q_size(self) return self.tail - self.head + 1 end
local function q_full(self)
  return self.maxsize > 0 and q_size(self) >= self.maxsize
end

local function q_push(self, v)
  local t = self.tail + 1
  self.tail = t
  self.items[t] = v
  self.unfinished = self.unfinished + 1
end

local function q_take(self)
  local h = self.head
  local v = self.items[h]
  self.items[h] = nil
  self.head = h + 1
  return v
end

-- Hands items to parked getters and space to parked putters until
-- neither can proceed.
local function q_settle(self)
  while true do
    local moved = false
    if q_size(self) > 0 and self.getters[1] then
      local P = wq_pop(self.getters)
      if P then
        K.resolve(P, q_take(self))
        moved = true
      end
    end
    if not q_full(self) and self.putters[1] then
      local w = wq_pop(self.putters)
      if w then
        q_push(self, w.v)
        K.resolve(w.P, nil)
        moved = true
      end
    end
    if not moved then return end
  end
end

local function shut_error(what)
  return core.new_error("ShutDown", what .. " on a queue that was shut down")
end

function Queue:put(C, v, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 3)
  if self.shut then error(shut_error("put"), 0) end
  if not q_full(self) then
    q_push(self, v)
    q_settle(self)
    return nil
  end
  if not block or timeout == 0 then raise("Full", "the queue is full") end
  local P = K.park(C, timeout, function(P)
    K.reject(P, core.new_error("Full", "the queue is full"))
  end)
  wq_push(self.putters, {P = P, v = v})
  return PARKED
end

function Queue:put_nowait(C, v) return Queue.put(self, C, v, false) end

function Queue:get(C, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 2)
  if q_size(self) > 0 then
    local v = q_take(self)
    q_settle(self)
    return v
  end
  if self.shut then error(shut_error("get"), 0) end
  if not block or timeout == 0 then raise("Empty", "the queue is empty") end
  local P = K.park(C, timeout, function(P)
    K.reject(P, core.new_error("Empty", "the queue is empty"))
  end)
  wq_push(self.getters, P)
  return PARKED
end

function Queue:get_nowait(C) return Queue.get(self, C, false) end
function Queue:qsize() return q_size(self) end
function Queue:empty() return q_size(self) == 0 end
function Queue:full() return q_full(self) end
function Queue:__tostring()
  return string.format("<Queue size=%d maxsize=%d>", q_size(self), self.maxsize)
end

-- Python 3.13's shutdown: later puts raise, gets drain then raise; the
-- parked getters (the queue is empty, or they would hold an item) and
-- putters are answered with ShutDown now.  immediate drops the items,
-- counting them done for join().
local function wake_joiners(self)
  local P = wq_pop(self.joiners)
  while P do
    K.resolve(P, nil)
    P = wq_pop(self.joiners)
  end
end

function Queue:shutdown(C, immediate)
  self.shut = true
  if immediate == true then   -- (the proxy checked its type)
    local n = q_size(self)
    self.items, self.head, self.tail = {}, 1, 0
    self.unfinished = math.max(self.unfinished - n, 0)
    if self.unfinished == 0 then wake_joiners(self) end
  end
  for _, list in ipairs {self.getters, self.putters} do
    local w = wq_pop(list)
    while w do
      K.reject(w.P or w, shut_error(list == self.getters and "get" or "put"))
      w = wq_pop(list)
    end
  end
end

function Queue:is_shutdown() return self.shut == true end

function JoinableQueue:task_done()
  if self.unfinished <= 0 then
    raise("ValueError", "task_done() called too many times")
  end
  self.unfinished = self.unfinished - 1
  if self.unfinished == 0 then wake_joiners(self) end
end

function JoinableQueue:join(C)
  if self.unfinished == 0 then return nil end
  wq_push(self.joiners, K.park(C, nil))
  return PARKED
end

-- A plain Queue counts unfinished tasks too (it costs nothing), but has
-- no task_done/join, as Python's queue.Queue proxy.
Queue.task_done, Queue.join = nil, nil

-- ---- Lock and RLock ----------------------------------------------------

-- owner: the client that holds it (nil when free); count: recursion
-- depth (RLock) or 1.  waiters: {C, n, grant(C)} in arrival order; grant
-- answers the parked request (or, for Condition.wait, goes on).
local Lock = class("Lock")
local RLock = class("RLock")

function T.new_lock(recursive)
  return setmetatable({owner = nil, count = 0, waiters = {}},
                      recursive and RLock or Lock)
end

local function lock_take(self, C, n)
  self.owner, self.count = C, n
  K.hold(C, self, n)
end

-- Passes a free lock to the next live waiter.
local function lock_handoff(self)
  while self.owner == nil do
    local w = wq_pop(self.waiters)
    if not w then return end
    lock_take(self, w.C, w.n)
    w.grant(w)
  end
end

local function lock_free(self)
  local C, n = self.owner, self.count
  self.owner, self.count = nil, 0
  if C then K.unhold(C, self, n) end
  lock_handoff(self)
end

-- Acquires for C with count n, calling grant(w) once held (now or later).
-- Returns true when held at once.
local function lock_acquire_for(self, C, n, P, grant)
  if self.owner == nil then
    lock_take(self, C, n)
    return true
  end
  wq_push(self.waiters, {C = C, n = n, P = P, grant = grant})
  return false
end

local function acquire(self, C, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 2)
  if getmetatable(self) == RLock and self.owner == C then
    self.count = self.count + 1
    K.hold(C, self, 1)
    return true
  end
  if self.owner == nil then
    lock_take(self, C, 1)
    return true
  end
  if not block or timeout == 0 then return false end
  local P = K.park(C, timeout, function(P) K.resolve(P, false) end)
  lock_acquire_for(self, C, 1, P, function(w) K.resolve(w.P, true) end)
  return PARKED
end

Lock.acquire, RLock.acquire = acquire, acquire

function Lock:release()
  -- as Python's Lock: any process may release it
  if self.owner == nil then raise("ValueError", "release unlocked lock") end
  lock_free(self)
end

function RLock:release(C)
  if self.owner ~= C then
    raise("ValueError", "cannot release un-acquired lock")
  end
  if self.count > 1 then
    self.count = self.count - 1
    K.unhold(C, self, 1)
  else
    lock_free(self)
  end
end

function Lock:locked() return self.owner ~= nil end
RLock.locked = Lock.locked
function Lock:__tostring()
  return "<Lock " .. (self.owner and "locked" or "unlocked") .. ">"
end
function RLock:__tostring()
  return string.format("<RLock %s count=%d>",
    self.owner and "owned" or "unowned", self.count)
end

-- ---- Semaphore and BoundedSemaphore ---------------------------------------

local Semaphore = class("Semaphore")
local BoundedSemaphore = class("BoundedSemaphore")
setmetatable(BoundedSemaphore, {__index = Semaphore})

function T.new_semaphore(value, bounded)
  value = value == nil and 1 or int_arg(value, "semaphore initial value", 0)
  return setmetatable({value = value, initial = value, waiters = {}},
                      bounded and BoundedSemaphore or Semaphore)
end

function Semaphore:acquire(C, block, timeout)
  if block == nil then block = true end
  timeout = timeout_arg(timeout, 2)
  if self.value > 0 then
    self.value = self.value - 1
    K.hold(C, self, 1)
    return true
  end
  if not block or timeout == 0 then return false end
  local P = K.park(C, timeout, function(P) K.resolve(P, false) end)
  wq_push(self.waiters, P)
  return PARKED
end

local function sem_settle(self)
  while self.value > 0 do
    local P = wq_pop(self.waiters)
    if not P then return end
    self.value = self.value - 1
    K.hold(P.C, self, 1)
    K.resolve(P, true)
  end
end

-- release([n]); a release by a client that holds none of it is allowed
-- (as Python's), it only cannot be undone when the client dies
function Semaphore:release(C, n)
  n = n == nil and 1 or int_arg(n, "n", 1)
  if getmetatable(self) == BoundedSemaphore and self.value + n > self.initial then
    raise("ValueError", "semaphore or lock released too many times")
  end
  self.value = self.value + n
  K.unhold(C, self, n)
  sem_settle(self)
end

function Semaphore:get_value() return self.value end
function Semaphore:__tostring()
  return string.format("<%s value=%d>", getmetatable(self).__typeid, self.value)
end

-- ---- releasing what a dead client held -------------------------------------

-- Called by the server for each lock-like object a vanished client held
-- (n: what it still held).
function T.release_dead(obj, C, n)
  local mt = getmetatable(obj)
  if mt == Lock or mt == RLock then
    if obj.owner == C then
      obj.owner, obj.count = nil, 0
      lock_handoff(obj)
    end
  elseif mt == types.Barrier then
    obj:_release_dead(C)
  elseif mt == Semaphore or mt == BoundedSemaphore then
    obj.value = obj.value + n
    if mt == BoundedSemaphore and obj.value > obj.initial then
      obj.value = obj.initial
    end
    sem_settle(obj)
  end
end

-- ---- Event --------------------------------------------------------------

local Event = class("Event")

function T.new_event() return setmetatable({flag = false, waiters = {}}, Event) end

function Event:set()
  self.flag = true
  local P = wq_pop(self.waiters)
  while P do
    K.resolve(P, true)
    P = wq_pop(self.waiters)
  end
end
function Event:clear() self.flag = false end
function Event:is_set() return self.flag end
function Event:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  if self.flag then return true end
  if timeout == 0 then return false end
  wq_push(self.waiters, K.park(C, timeout, function(P) K.resolve(P, false) end))
  return PARKED
end
function Event:__tostring()
  return "<Event " .. (self.flag and "set" or "unset") .. ">"
end

-- ---- Condition -------------------------------------------------------------

-- lock: a managed Lock or RLock object (its own RLock when none is
-- given).  wait releases it completely, parks, and on notify or timeout
-- re-acquires it (with the same recursion count) before answering.
local Condition = class("Condition")

function T.new_condition(lockrec)
  local lock
  if lockrec == nil then
    lock = T.new_lock(true)
  else
    local rec = K.rec_of(lockrec)
    local mt = rec and getmetatable(rec.obj)
    if mt ~= Lock and mt ~= RLock then
      raise("ValueError", "Condition: the lock must be a managed Lock or RLock")
    end
    lock = rec.obj
  end
  return setmetatable({lock = lock, waiters = {}}, Condition)
end

function Condition:acquire(C, block, timeout)
  return acquire(self.lock, C, block, timeout)
end
function Condition:release(C)
  return getmetatable(self.lock).release(self.lock, C)
end

local function check_owned(self, C, what)
  if self.lock.owner ~= C then
    raise("ValueError", "cannot " .. what .. " on un-acquired lock")
  end
end

function Condition:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  check_owned(self, C, "wait")
  local lock, count = self.lock, self.lock.count
  local w = {C = C, n = count}
  local function reacquire(result)
    -- back into the lock's queue; answered once held again
    w.result = result
    if lock_acquire_for(lock, C, count, w.P, function() K.resolve(w.P, result) end) then
      K.resolve(w.P, result)
    end
  end
  w.notify = function() reacquire(true) end
  w.P = K.park(C, timeout, function() w.notified = true; reacquire(false) end)
  -- a timed-out request stays parked until the lock is back
  w.P.keep_on_timeout = true
  wq_push(self.waiters, w)
  lock_free(lock)
  return PARKED
end

local function notify(self, C, n)
  check_owned(self, C, "notify")
  local q = self.waiters
  while n > 0 and q[1] do
    local w = table.remove(q, 1)
    if not w.P.done and not w.notified then
      w.notified = true
      K.unpark_timer(w.P)
      w.notify()
      n = n - 1
    end
  end
end

function Condition:notify(C, n)
  return notify(self, C, n == nil and 1 or int_arg(n, "n", 0))
end
function Condition:notify_all(C) return notify(self, C, huge) end
function Condition:__tostring()
  return string.format("<Condition waiters=%d>", wq_live(self.waiters))
end

-- ---- Barrier ----------------------------------------------------------------

-- count: parties arrived in this round; waiting: their parked requests.
-- A waiter timing out, an abort, a reset, a failing action or a waiting
-- client that dies breaks it: every waiter gets BrokenBarrierError (a
-- party that will never come must not hang the others).
local Barrier = class("Barrier")

function T.new_barrier(parties, action, timeout)
  if type(parties) == "table" and not K.rec_of(parties) then
    parties, action, timeout = parties.parties, parties.action, parties.timeout
  end
  parties = int_arg(parties, "parties", 1)
  if action ~= nil and type(action) ~= "function" then
    raise("ValueError", "Barrier: action must be a function")
  end
  return setmetatable({parties = parties, action = action,
                       timeout = timeout_arg(timeout, 3), count = 0,
                       waiting = {}, broken = false}, Barrier)
end

local function broken_error()
  return core.new_error("BrokenBarrierError", "the barrier is broken")
end

local function barrier_break(self)
  self.broken = true
  self.acting = nil
  local waiting = self.waiting
  self.waiting, self.count = {}, 0
  for _, P in ipairs(waiting) do
    if not P.done then K.reject(P, broken_error()) end
  end
end

local function barrier_release(self)
  local waiting = self.waiting
  self.waiting, self.count = {}, 0
  for _, P in ipairs(waiting) do
    if not P.done then K.resolve(P, P.index) end
  end
end

-- The completing process ran the action: ok releases the round, a
-- failure breaks the barrier.
function Barrier:finish_action(C, ok)
  if self.acting ~= C then error(broken_error(), 0) end
  self.acting = nil
  K.unhold(C, self, 1)
  if not ok then
    barrier_break(self)
    return false
  end
  barrier_release(self)
  return true
end

-- (T.release_dead: a process that died running the action)
function Barrier:_release_dead(C)
  if self.acting == C then barrier_break(self) end
end

function Barrier:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  if timeout == nil then timeout = self.timeout end
  if self.broken then error(broken_error(), 0) end
  if self.acting then error(broken_error(), 0) end
  local index = self.count + 1
  if index == self.parties then
    if self.action then
      -- The action runs in the process whose wait completed the round
      -- (as CPython runs it in one of the waiting threads): there the
      -- proxies it captured are proxies, here they would be the bare
      -- objects.  The others stay parked until that process reports
      -- (finish_action); its death breaks the barrier.
      self.acting = C
      K.hold(C, self, 1)
      return {"run action", self.action, index}
    end
    barrier_release(self)
    return index
  end
  self.count = index
  local P = K.park(C, timeout, function(P)
    K.reject(P, broken_error())
    barrier_break(self)
  end)
  P.index = index
  P.on_drop = function() if not self.broken then barrier_break(self) end end
  self.waiting[#self.waiting + 1] = P
  return PARKED
end

function Barrier:reset()
  if self.count > 0 then barrier_break(self) end
  self.broken = false
end

function Barrier:abort() barrier_break(self) end

Barrier.__get = function(self, _, k)
  if k == "parties" then return self.parties end
  if k == "n_waiting" then return self.count end
  if k == "broken" then return self.broken end
end

function Barrier:__tostring()
  return string.format("<Barrier parties=%d waiting=%d%s>", self.parties,
                       self.count, self.broken and " broken" or "")
end

return T
