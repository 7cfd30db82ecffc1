-- A producer and a consumer through a Queue; nil marks the end (as
-- Python's `q.put(None)` sentinel).
local mp = require "multiprocessing"

local function producer(q)
  for i = 1, 5 do
    q:put({n = i, square = i * i})
  end
  q:put(nil)                      -- no more items
end

local function consumer(q, results)
  local count = 0
  for item in function() return q:get() end do   -- stops at the nil
    results:put(string.format("item %d: %d squared is %d", item.n, item.n,
                              item.square))
    count = count + 1
  end
  results:put(string.format("consumer saw the end after %d items", count))
  results:put(nil)
end

local q, results = mp.Queue(), mp.Queue()
local c = mp.Process{target = consumer, args = {q, results}}
local p = mp.Process{target = producer, args = {q}}
c:start()
p:start()
for line in function() return results:get() end do print(line) end
p:join()
c:join()
print("exit codes", p.exitcode, c.exitcode)
