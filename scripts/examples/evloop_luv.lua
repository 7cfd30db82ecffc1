-- evloop_luv.lua: a luv (libuv) program keeps serving a repeating timer
-- while 1000 Pool tasks complete.  The pool is one fd in the loop
-- (pool:fileno()); when it is readable, pool:poll() collects the results
-- and runs their callbacks, without ever blocking the loop.
local mp = require "multiprocessing"
local uv = require "luv"

local N = 1000
local pool = mp.Pool(2)

local function square(i)
  local t = os.clock() + 0.001     -- a millisecond of work
  while os.clock() < t do end
  return i * i
end

local done, sum, ticks = 0, 0, 0
local watcher = uv.new_poll(pool:fileno())
local timer = uv.new_timer()

watcher:start("r", function(err)
  assert(not err, err)
  pool:poll()                      -- results in: callbacks run here
end)
timer:start(10, 10, function() ticks = ticks + 1 end)

for i = 1, N do
  pool:apply_async(square, {i}, function(v)
    done, sum = done + 1, sum + v
    if done == N then              -- all in: let the loop end
      watcher:close()
      timer:close()
    end
  end)
end

uv.run()
print(string.format("%d tasks done, sum of squares = %d", done, sum))
print("the timer kept ticking meanwhile: " .. tostring(ticks > 0))
pool:close()
pool:join()
