-- process_class.lua: a Process subclass with its own init and run.
local mp = require "multiprocessing"

local MyProcess = mp.Process:extend()

function MyProcess:init(num)
  self.num = num
end

function MyProcess:run()
  print(string.format("process %d running in %s (pid %d)", self.num,
    mp.current_process().name, mp.current_process().pid))
end

for i = 1, 3 do
  local p = MyProcess(i)
  p:start()
  p:join()
end
