-- multiprocessing.pool_proto: the words the pool's files share -- task
-- modes, reply statuses, the cancel ring's layout (with the progress bar's
-- word after it, and writing tags into it) and the owner's placeholder
-- records.
local M = {}

-- task modes; MAP1 and STARMAP1 are chunks of one item sent bare (no
-- table around the item, none around its result); APPLYV is an apply
-- whose arguments follow the task's own fields in its message (items
-- 8 .. 7 + n: no table for them on either side), APPLY one whose
-- arguments travel as a table (more than FLAT_MAX of them)
M.APPLY, M.MAP, M.STARMAP, M.MAP1, M.STARMAP1, M.APPLYV = 1, 2, 3, 4, 5, 6
M.FLAT_MAX = 64
-- an apply's reply is (tag, OK, n, v) for one result and (tag, OK, n,
-- {v1, ..., vn}) for any other count, put with record tag 0 (the owner
-- looks up no destination for it); a bare item's is (tag, OK, 1, v)
-- reply statuses
M.OK, M.FAILED, M.INIT_FAILED = 0, 1, 2
-- (SKIPPED: a worker's reply for a task it found in the cancel ring)
M.SKIPPED = 3
-- options of a call that gave none
M.NO_OPTIONS = setmetatable({}, {__newindex = function()
  error("internal: options table is shared", 2)
end})
-- the record of a task whose map failed before it was fully submitted
-- (its reply, when it comes, is dropped)
M.ORPHAN = {}
M.SLICE = 0.25           -- longest sleep while tasks have deadlines

-- Cancelled tasks.  A map or apply whose caller was interrupted (Ctrl-C),
-- or an imap whose for loop was left early, is cancelled
-- (Pool:_cancel_jobs): its tags go to a ring of CANCEL_RING words in
-- shared memory as runs of consecutive tags, each word (first tag <<
-- CANCEL_BITS) | count, one aligned 64-bit store, so a worker never reads
-- half of an entry; word 1 counts the runs written so far (0: none, the
-- worker's only check).  A worker skips a task whose tag is in the ring.
-- An entry overwritten before its tasks came up only means they run,
-- their results dropped.
M.CANCEL_RING, M.CANCEL_BITS = 16, 24
-- (the word after the ring: 1 while the owner's progress bar is drawn;
-- see Progress)
M.BAR = M.CANCEL_RING + 2
M.CANCEL_MAX = (1 << M.CANCEL_BITS) - 1

-- Writes tags (a list, sorted here) into the ring cancel as runs of
-- consecutive ones (a map's are one run; an imap's may be interleaved
-- with other calls' tasks).
function M.cancel_tags(cancel, tags)
  local bits, max, ring = M.CANCEL_BITS, M.CANCEL_MAX, M.CANCEL_RING
  table.sort(tags)
  local i = 1
  while i <= #tags and tags[i] < 1 << (63 - bits) do
    local first, n = tags[i], 1
    while i + n <= #tags and tags[i + n] == first + n and n < max do
      n = n + 1
    end
    local count = cancel[1]
    cancel[count % ring + 2] = (first << bits) | n
    cancel[1] = count + 1
    i = i + n
  end
end

return M
