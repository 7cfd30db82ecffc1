-- multiprocessing.shared_memory: named POSIX shared memory blocks,
-- compatible with Python's multiprocessing.shared_memory (runtime/shm.c).
--
-- SharedMemory{name =, create =, size =, track =} or
-- SharedMemory(name, create, size).  read(offset, len) and
-- write(offset, s) take byte offsets counted from 0, as Python's buf[i].
local core = require "multiprocessing.core"

return {
  SharedMemory = core.SharedMemory,
}
