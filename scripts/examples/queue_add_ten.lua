-- Two processes each take a number from a Queue, add 10, and put it back.
local mp = require "multiprocessing"

local function add_ten(q)
  local x = q:get()
  q:put(x + 10)
end

local q = mp.Queue()
q:put(0)
local workers = {}
for i = 1, 2 do
  workers[i] = mp.Process{target = add_ten, args = {q}}
  workers[i]:start()
end
for i = 1, 2 do workers[i]:join() end
print("result:", q:get())        -- 20: each process added 10 once
