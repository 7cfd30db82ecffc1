-- multiprocessing.manager_pool: the Pool a manager serves (Python's
-- SyncManager.Pool) and the AsyncResults it hands out, as the server
-- holds them (see manager_types.lua for the conventions; the proxies are
-- in manager_extra_proxies.lua).
--
-- The Pool lives in the server process: its workers are the server's
-- children.  The server is one event loop and must never wait for a
-- task, so every call submits asynchronously; a call that Python's
-- proxy would block in (apply, map, an AsyncResult's get or wait, join)
-- parks its request, and the result's done callback answers it.  The
-- callbacks run in pool:poll(), which the server's loop calls whenever a
-- pool's fd (readable when a result came in or a worker died) or its
-- timer wakes it (T.pool_fds, T.poll_pools).
local core = require "multiprocessing.core"
local T = require "multiprocessing.manager_types"

local raise, new_error = core.raise, core.new_error
local K, types, PARKED = T.kernel, T.types, T.PARKED
local timeout_arg = T.timeout_arg

local function class(typeid)
  local mt = {__typeid = typeid}
  mt.__index = mt
  types[typeid] = mt
  return mt
end

local MPool = class("Pool")
local MResult = class("AsyncResult")

-- the server's pools (watched by its loop) -> true; weak: a pool no
-- client holds a proxy of any more goes as a local one does (its
-- finalizer terminates the workers)
local live = setmetatable({}, {__mode = "k"})

-- ---- AsyncResult ------------------------------------------------------

-- {res = the pool's AsyncResult, waiters = {{P, mode}}, pool = MPool}
local function answer(P, res, mode)
  if mode == "wait" then return K.resolve(P, nil) end
  local ok, v = pcall(res.get, res, 0)
  if ok then K.resolve(P, v) else K.reject(P, v) end
end

local function new_result(mpool, res)
  local self = setmetatable({res = res, waiters = {}, pool = mpool}, MResult)
  mpool.pending = mpool.pending + 1
  res:add_done_callback(function()
    mpool.pending = mpool.pending - 1
    local ws = self.waiters
    self.waiters = {}
    for _, w in ipairs(ws) do
      if not w[1].done then answer(w[1], res, w[2]) end
    end
    if mpool.pending == 0 then mpool:_joined() end
  end)
  return self
end

local function park_on(self, C, timeout, mode)
  local P = K.park(C, timeout, function(P)
    if mode == "wait" then K.resolve(P, nil)
    else K.reject(P, new_error("TimeoutError", "the result is not ready")) end
  end)
  self.waiters[#self.waiters + 1] = {P, mode}
  return PARKED
end

function MResult:get(C, timeout)
  timeout = timeout_arg(timeout, 1)
  if self.res:ready() then return self.res:get(0) end
  if timeout == 0 then raise("TimeoutError", "the result is not ready") end
  return park_on(self, C, timeout, "get")
end

function MResult:wait(C, timeout)
  timeout = timeout_arg(timeout, 1)
  if self.res:ready() or timeout == 0 then return nil end
  return park_on(self, C, timeout, "wait")
end

function MResult:ready() return self.res:ready() end
function MResult:successful() return self.res:successful() end
function MResult:__tostring() return tostring(self.res) end

-- ---- Pool ------------------------------------------------------------------

function T.new_pool(...)
  local Pool = require("multiprocessing.pool").Pool
  local self = setmetatable({pool = Pool(...), pending = 0, joiners = {}},
                            MPool)
  live[self] = true
  return self
end

-- the async calls: an AsyncResult served to the caller
local function submit(self, how, f, a, chunksize)
  return new_result(self, self.pool[how](self.pool, f, a, chunksize))
end

function MPool:apply_async(_, f, args)
  return K.rec_for(submit(self, "apply_async", f, args))
end

function MPool:map_async(_, f, iterable, chunksize)
  return K.rec_for(submit(self, "map_async", f, iterable, chunksize))
end

function MPool:starmap_async(_, f, iterable, chunksize)
  return K.rec_for(submit(self, "starmap_async", f, iterable, chunksize))
end

-- the blocking ones: parked until the result is in
function MPool:apply(C, f, args)
  return MResult.get(submit(self, "apply_async", f, args), C)
end

function MPool:map(C, f, iterable, chunksize)
  return MResult.get(submit(self, "map_async", f, iterable, chunksize), C)
end

function MPool:starmap(C, f, iterable, chunksize)
  return MResult.get(submit(self, "starmap_async", f, iterable, chunksize), C)
end

function MPool:close() self.pool:close() end

function MPool:terminate()
  live[self] = nil
  self.pool:terminate()
  self:_joined()
end

-- join(): after close or terminate, once every result is in (Python's
-- join waits for the workers; they leave as soon as the queue is empty)
function MPool:join(C)
  if self.pool._state == "RUN" then
    raise("ValueError", "Pool is still running (join comes after close " ..
          "or terminate)")
  end
  if self.pending == 0 then
    self:_joined()
    return nil
  end
  self.joiners[#self.joiners + 1] = K.park(C, nil)
  return PARKED
end

function MPool:_joined()
  if self.pool._state == "RUN" then return end
  if self.pending == 0 or self.pool._state ~= "CLOSE" then
    live[self] = nil
    pcall(self.pool.join, self.pool)
    local js = self.joiners
    self.joiners = {}
    for _, P in ipairs(js) do K.resolve(P, nil) end
  end
end

function MPool:__tostring() return tostring(self.pool) end

-- ---- for the server's loop ----------------------------------------------------

-- fds to watch and the earliest timeout (nil: none) of the live pools
function T.pool_fds()
  if next(live) == nil then return nil end
  local fds, timeout = {}, nil
  for mp in pairs(live) do
    local ok, fd = pcall(mp.pool.fileno, mp.pool)
    if ok then
      fds[#fds + 1] = fd
      local t = mp.pool:timeout()
      if t and (timeout == nil or t < timeout) then timeout = t end
    else
      live[mp] = nil   -- terminated behind our back (broken)
    end
  end
  return fds, timeout
end

-- runs every live pool's finished callbacks (answers parked requests)
function T.poll_pools()
  for mp in pairs(live) do
    local ok = pcall(mp.pool.poll, mp.pool)
    if not ok then live[mp] = nil end
  end
end

-- the server is closing: its pools' workers go with it
function T.close_pools()
  for mp in pairs(live) do
    live[mp] = nil
    pcall(mp.pool.terminate, mp.pool)
  end
end

return T
