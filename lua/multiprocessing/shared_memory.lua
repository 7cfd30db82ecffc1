-- multiprocessing.shared_memory: named POSIX shared memory blocks,
-- compatible with Python's multiprocessing.shared_memory (runtime/shm.c).
--
-- SharedMemory{name =, create =, size =, track =} or
-- SharedMemory(name, create, size).  read(offset, len) and
-- write(offset, s) take byte offsets counted from 0, as Python's buf[i].
-- A tracked block is unlinked when its last owner (its creator, and any
-- process that called shm:track() and not shm:untrack()) exits or is
-- killed; the owners table and the tracker process are in runtime/shm.c.
local core = require "multiprocessing.core"

return {
  SharedMemory = core.SharedMemory,
}
