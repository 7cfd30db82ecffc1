-- multiprocessing.managers.SharedMemoryManager: a manager whose server
-- process owns the SharedMemory blocks (and ShareableLists) made through
-- it, and unlinks them when it shuts down -- Python's SharedMemoryManager.
--
-- The blocks are made in the calling process, as Python's are (so the
-- caller gets an ordinary SharedMemory, attached), then handed to the
-- server, which takes ownership with shm:track() (runtime/shm.c); only
-- then does the caller give its own ownership up (shm:untrack()).  At
-- every instant some live process owns the block, so it never leaks:
--   * shutdown() asks the server to unlink every block it holds, then
--     stops it (Python's SharedMemoryServer.shutdown);
--   * when the server dies in any other way -- its owner died (a started
--     server ends with its owner), or it was killed -- it was the blocks'
--     last owner, and the ownership table unlinks them (at its exit, at
--     its reap, or by the tracker process);
--   * when the caller dies before the server took the block, the caller
--     was its owner: the same table unlinks it.
-- A block made in a forked child through its parent's manager belongs to
-- the server too: it outlives the child, until the shutdown (Python's
-- rule).  A process that called shm:track() on a block keeps it from
-- being unlinked by the ownership table, not from shutdown()'s unlink.
--
-- This file gets BaseManager from managers.lua (which loads it) instead
-- of requiring it, so that the two files do not require each other.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"
local shared_memory = require "multiprocessing.shared_memory"

local SharedMemory, ShareableList = shared_memory.SharedMemory,
  shared_memory.ShareableList
local argerror, raise = util.argerror, util.raise
local getpid = core.getpid

-- ---- the server side (runs in the manager process) ------------------------------

local held = {}     -- name -> the SharedMemory this server owns

local function is_shm(v)
  return getmetatable(v) ~= nil and util.typename(v) == "multiprocessing.SharedMemory"
end

-- Takes ownership of a block made by a client (arrived attached).
local function track_segment(shm)
  if not is_shm(shm) then
    error("track_segment: a SharedMemory expected, got " .. util.typename(shm), 0)
  end
  shm:track()
  held[shm.name] = shm
  return true
end

-- Unlinks every block held (ones a user unlinked already are skipped).
local function unlink_segments()
  local n = 0
  for name, shm in pairs(held) do
    held[name] = nil
    if pcall(shm.unlink, shm) then n = n + 1 end
    shm:close()
  end
  return n
end

-- The names of the blocks held, sorted, one a line (Python's
-- list_segments; a string, since a table result would come as a proxy).
local function list_segments()
  local out = {}
  for name in pairs(held) do out[#out + 1] = name end
  table.sort(out)
  return table.concat(out, "\n")
end

-- ---- the client side -------------------------------------------------------------

local function is_smm(v)
  return type(v) == "table" and rawget(v, "_state") ~= nil
end

local function check_usable(self, fname)
  if not is_smm(self) then
    util.selferror(fname, "SharedMemoryManager", "smm", self, is_smm)
  end
  local state = self._state
  if state == "initial" then
    raise("ValueError", fname .. ": the SharedMemoryManager is not " ..
          "started (call start() first)")
  elseif state == "shutdown" then
    raise("ValueError", fname .. ": the SharedMemoryManager has shut down")
  elseif self.authkey == nil then
    -- its server decodes requests as untrusted, and rightly refuses to
    -- attach (then own and unlink) blocks named by unauthenticated peers
    raise("ValueError", fname .. ": a SharedMemoryManager with authkey " ..
          "= false cannot take blocks (its server must not attach " ..
          "blocks that unauthenticated clients name)")
  end
end

-- Hands shm to the server; on failure the block is unlinked (nobody
-- would own it) and the error raised.
local function hand_over(self, shm)
  local ok, err = pcall(self._create, self, "_track_segment", shm)
  if not ok then
    pcall(shm.unlink, shm)
    shm:close()
    error(err, 0)
  end
  shm:untrack()
end

return function(BaseManager)
  local SMM = BaseManager:extend("SharedMemoryManager")
  local hidden = {create_method = false}
  SMM:register("_track_segment", track_segment, hidden)
  SMM:register("_unlink_segments", unlink_segments, hidden)
  SMM:register("_list_segments", list_segments, hidden)

  -- smm:SharedMemory(size) -> a new block, owned by the server
  function SMM:SharedMemory(size)
    check_usable(self, "SharedMemory")
    local n = math.type(size) == "float" and math.tointeger(size) or size
    if math.type(n) ~= "integer" or n <= 0 then
      argerror(1, "SharedMemory", "size must be a positive integer, got " ..
               (type(size) == "number" and tostring(size) or util.typename(size)))
    end
    local shm = SharedMemory{create = true, size = n}
    hand_over(self, shm)
    return shm
  end

  -- smm:ShareableList(seq) -> a new list, its block owned by the server
  function SMM:ShareableList(seq)
    check_usable(self, "ShareableList")
    local sl = ShareableList(seq)
    hand_over(self, sl.shm)
    return sl
  end

  -- smm:_segments() -> the names of the blocks the server holds
  function SMM:_segments()
    check_usable(self, "_segments")
    local out = {}
    for name in self:_create("_list_segments"):gmatch("[^\n]+") do
      out[#out + 1] = name
    end
    return out
  end

  -- smm:shutdown(): unlinks the blocks made through the manager, then
  -- stops the server (a forked child's copy only drops its connection,
  -- as for every manager).
  local base_shutdown = BaseManager.shutdown
  function SMM:shutdown()
    local state = rawget(self, "_state")
    if (state == "started" and self._owner == getpid()) or state == "connected" then
      pcall(self._create, self, "_unlink_segments")
    end
    return base_shutdown(self)
  end

  return SMM
end
