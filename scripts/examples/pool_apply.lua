-- pool_apply.lua: apply_async over five tasks with a callback, then close
-- and join; apply returning 1 + 2.  Python:
--   pool = Pool(4)
--   for i in range(5): pool.apply_async(work, (i,), callback=done)
--   pool.close(); pool.join()
--   with Pool(2) as pool: print(pool.apply(add, (1, 2)))
local mp = require "multiprocessing"

local function work(i)
  return i * i, mp.current_process().pid
end

local pool = mp.Pool(4)
local got, results = {}, {}
for i = 0, 4 do
  -- the callback runs in this process, with the task's first result,
  -- while the pool is being waited on (here: in join)
  results[i] = pool:apply_async(work, {i}, function(sq) got[#got + 1] = sq end)
end
pool:close()          -- no more tasks
pool:join()           -- waits for the five; their callbacks have run

table.sort(got)
print("callbacks got: " .. table.concat(got, " "))
local me, elsewhere = mp.current_process().pid, true
for i = 0, 4 do
  local sq, pid = results[i]:get()        -- get() returns all the results
  print(string.format("work(%d) = %d", i, sq))
  elsewhere = elsewhere and pid ~= me
end
print("every task ran in a worker process: " .. tostring(elsewhere))

local add = function(a, b) return a + b end
local pool2 <close> = mp.Pool(2)          -- terminated at the end of the scope
print("apply(add, {1, 2}) = " .. pool2:apply(add, {1, 2}))
