-- multiprocessing.synchronize: Lock, RLock, Semaphore, BoundedSemaphore,
-- Event, Condition and Barrier.
--
-- Everything is C (runtime/sync.c): the objects, their constructors (an
-- options table works as Python's keywords) and methods, including the
-- scoped forms lock:with(fn, ...) and lock:guard() for <close> variables,
-- which must exist on objects decoded in a process that never loaded
-- this file.
local core = require "multiprocessing.core"

return {
  Lock = core.Lock,
  RLock = core.RLock,
  Event = core.Event,
  Semaphore = core.Semaphore,
  BoundedSemaphore = core.BoundedSemaphore,
  Condition = core.Condition,
  Barrier = core.Barrier,
}
