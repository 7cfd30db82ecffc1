-- Three workers append to a shared list and fill a shared dict.
local mp = require "multiprocessing"
local pretty = require("multiprocessing.repl").pretty

local function worker(n, shared_list, shared_dict)
  shared_list:append(n)
  shared_dict["worker" .. n] = n * n
end

local m <close> = mp.Manager()
local shared_list, shared_dict = m:list(), m:dict()
local workers = {}
for n = 1, 3 do
  workers[n] = mp.Process{target = worker, args = {n, shared_list, shared_dict}}
  workers[n]:start()
end
for _, w in ipairs(workers) do w:join() end

shared_list:sort()    -- the workers finish in any order
print("shared list: " .. tostring(shared_list))
print("shared dict: " .. pretty(shared_dict:copy()))
