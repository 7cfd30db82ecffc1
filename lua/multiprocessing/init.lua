-- multiprocessing: Python's multiprocessing for Lua 5.4.
--
-- This file assembles the public module.  The C primitives live in
-- "multiprocessing.core"; each object family has its own file under
-- lua/multiprocessing/ and is loaded the first time one of its names is
-- used, so that require "multiprocessing" stays cheap.
local core = require "multiprocessing.core"

-- The process tree's authentication key (Python's current_process().
-- authkey): made here, in the main process, before any fork, so every
-- process of the tree holds it.  Managers use it by default; a proxy's
-- encoding does not carry it (managers.lua).
if core.tree_authkey == nil then
  local f = io.open("/dev/urandom", "rb")
  local raw = f and f:read(32) or tostring(os.time()) .. tostring({}) .. os.clock()
  if f then f:close() end
  core.tree_authkey = raw:gsub(".", function(c) return string.format("%02x", c:byte()) end)
end

local M = {
  version = core.version,
  cpu_count = core.cpu_count,
  Error = core.Error,
  error_kinds = core.error_kinds,
  is_error = core.is_error,
  new_error = core.new_error,
  now = core.now,           -- seconds on a monotonic clock (for timings)
  encode = core.encode,
  decode = core.decode,
  register_class = core.register_class,
  codec_options = core.codec_options,
  Ext = core.Ext,
  -- Python's freeze_support() readies a frozen Windows executable; there
  -- is nothing to ready here, so ported code's call is accepted
  freeze_support = function() end,
}

-- A ShareableList travels as a registered class (shared_memory.lua); its
-- name is known from here on, so a process that has not loaded that file
-- yet (a pool worker forked before) can still receive one.
core.register_class("multiprocessing.ShareableList", {}, {
  rebuild = function(state)
    return require("multiprocessing.shared_memory")._rebuild(state)
  end,
  trusted_only = true,
})

-- name -> submodule that defines it (loaded on first access)
local lazy = {
  Process = "multiprocessing.process",
  current_process = "multiprocessing.process",
  parent_process = "multiprocessing.process",
  active_children = "multiprocessing.process",
  Lock = "multiprocessing.synchronize",
  RLock = "multiprocessing.synchronize",
  Semaphore = "multiprocessing.synchronize",
  BoundedSemaphore = "multiprocessing.synchronize",
  Event = "multiprocessing.synchronize",
  Condition = "multiprocessing.synchronize",
  Barrier = "multiprocessing.synchronize",
  Value = "multiprocessing.sharedctypes",
  Array = "multiprocessing.sharedctypes",
  RawValue = "multiprocessing.sharedctypes",
  RawArray = "multiprocessing.sharedctypes",
  SharedMemory = "multiprocessing.shared_memory",
  Queue = "multiprocessing.queues",
  JoinableQueue = "multiprocessing.queues",
  SimpleQueue = "multiprocessing.queues",
  shared_memory = "multiprocessing.shared_memory",
  register_at_fork = "multiprocessing.process",
  Pipe = "multiprocessing.connection",
  wait = "multiprocessing.connection",
  connection = "multiprocessing.connection",
  Manager = "multiprocessing.managers",
  managers = "multiprocessing.managers",
  Pool = "multiprocessing.pool",
  pool = "multiprocessing.pool",
  futures = "multiprocessing.futures",
  get_logger = "multiprocessing.util",
  set_start_method = "multiprocessing.context",
  get_start_method = "multiprocessing.context",
  get_all_start_methods = "multiprocessing.context",
  get_context = "multiprocessing.context",
  set_forkserver_preload = "multiprocessing.context",
  log_to_stderr = "multiprocessing.util",
  current_task = "multiprocessing.broker_worker",
}

setmetatable(M, {
  __index = function(t, k)
    local modname = lazy[k]
    if modname == nil then return nil end
    local mod = require(modname)
    local v = mod[k]
    if v == nil and modname == "multiprocessing." .. k then v = mod end
    rawset(t, k, v)
    return v
  end,
})

-- The names the module offers, loaded or not (for completion and docs).
function M.names()
  local names = {}
  for k in pairs(M) do names[#names + 1] = k end
  for k in pairs(lazy) do
    if rawget(M, k) == nil then names[#names + 1] = k end
  end
  table.sort(names)
  return names
end

return M
