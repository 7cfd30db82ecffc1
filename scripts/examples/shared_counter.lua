-- A Value and an Array incremented by two processes, every update under
-- the object's lock, as Python's `with v.get_lock(): v.value += 1`.
local mp = require "multiprocessing"

local counter = mp.Value("i", 0)
local hits = mp.Array("i", 4)         -- four zeros
local sum = mp.Value("d", 0.0)

local function work(step)
  for i = 1, 1000 do
    counter:get_lock():with(function()
      counter.value = counter.value + 1
    end)
    do
      local held <close> = hits:guard()   -- the same, as a scoped guard
      local slot = i % #hits + 1
      hits[slot] = hits[slot] + step
    end
    sum:with(function() sum.value = sum.value + 0.5 end)
  end
end

local p = mp.Process{target = work, args = {1}}
p:start()
work(2)                               -- the parent works too
p:join()

print("counter", counter.value)       -- 2000: no update lost
print("hits", table.concat(hits:totable(), " "))
print("sum", sum.value)
-- beyond Python: atomic add without a lock
local atomic = mp.RawValue("q", 0)
local q = mp.Process{target = function() for _ = 1, 5000 do atomic:add(1) end end}
q:start()
for _ = 1, 5000 do atomic:add(1) end
q:join()
print("atomic", atomic.value)
