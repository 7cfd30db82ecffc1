-- process_pids.lua: two workers, each printing its name and pid.
local mp = require "multiprocessing"

local function worker(name)
  local me = mp.current_process()
  print(string.format("worker %s: pid %d, parent %d (%s)", name, me.pid,
    mp.parent_process().pid, me.name))
end

local p1 = mp.Process{target = worker, args = {"A"}}
local p2 = mp.Process{target = worker, args = {"B"}}
p1:start()
p1:join()      -- one after the other, so the output order is fixed
p2:start()
p2:join()
print(string.format("main: pid %d; children exited with %d and %d",
  mp.current_process().pid, p1.exitcode, p2.exitcode))
