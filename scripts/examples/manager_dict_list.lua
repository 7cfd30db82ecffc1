-- A dict and a list shared with a child process through a manager (the
-- Manager example of Python's documentation, in Lua): the child writes,
-- the parent reads what it wrote.
local mp = require "multiprocessing"

local function f(d, l)
  d[1] = "1"
  d["2"] = 2
  d[0.25] = false
  d.weather = "snow"
  l:reverse()
  l[4] = l[4] + 10
end

local m <close> = mp.Manager()
local d = m:dict()
d.yourname = "youmux"
local l = m:list{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

local p = mp.Process{target = f, args = {d, l}}
p:start()
p:join()

print(table.concat({d.yourname, d.weather, d:get("weather")}, " "))
print(d)    -- in insertion order, as Python's dict
print(l)
