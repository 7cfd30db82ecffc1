-- An Event starts four workers at once; a Semaphore lets at most two of
-- them into the "expensive" part at a time.
local mp = require "multiprocessing"
local sleep = require("multiprocessing.core").sleep   -- Ctrl-C interrupts it

local go = mp.Event()
local slots = mp.Semaphore(2)
local inside, most = mp.Value("i", 0), mp.Value("i", 0)
local done = mp.Queue()

local function worker(id)
  go:wait()                                   -- everyone starts together
  slots:with(function()
    local now = inside:add(1)
    -- remember the largest number of workers inside at once
    while true do
      local m = most.value
      if now <= m or most:compare_and_swap(m, now) then break end
    end
    sleep(0.05)                               -- the expensive part
    inside:add(-1)
  end)
  done:put(id)
end

local workers = {}
for id = 1, 4 do
  workers[id] = mp.Process{target = worker, args = {id}}
  workers[id]:start()
end
print("event set?", go:is_set())
go:set()
local finished = {}
for _ = 1, 4 do finished[#finished + 1] = done:get() end
table.sort(finished)
for id = 1, 4 do workers[id]:join() end
print("finished", table.concat(finished, " "))
print("most inside at once", most.value)     -- 2: the semaphore's value
print("event set?", go:is_set())
