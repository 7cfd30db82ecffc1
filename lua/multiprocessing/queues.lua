-- multiprocessing.queues: Queue, JoinableQueue, SimpleQueue.
--
-- The queues are C (runtime/queue.c): a shared-memory ring, put encodes
-- and commits in the caller.  Queue(maxsize) or Queue{maxsize =,
-- capacity =}: capacity is the ring's size in bytes (default 4 GiB of
-- address space, only the backlog uses memory).
local core = require "multiprocessing.core"

return {
  Queue = core.Queue,
  JoinableQueue = core.JoinableQueue,
  SimpleQueue = core.SimpleQueue,
}
