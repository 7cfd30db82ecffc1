-- evloop_luv.lua: a luv (libuv) program keeps serving a repeating timer
-- while 1000 futures complete.  The executor is one fd in the loop
-- (ex:fileno()); when it is readable, ex:poll() collects the results and
-- runs the futures' done callbacks, without ever blocking the loop.
local futures = require "multiprocessing.futures"
local uv = require "luv"

local N = 1000
local ex = futures.ProcessPoolExecutor(2)

local function square(i)
  local t = os.clock() + 0.001     -- a millisecond of work
  while os.clock() < t do end
  return i * i
end

local done, sum, ticks = 0, 0, 0
local watcher = uv.new_poll(ex:fileno())
local timer = uv.new_timer()

watcher:start("r", function(err)
  assert(not err, err)
  ex:poll()                        -- results in: done callbacks run here
end)
timer:start(10, 10, function() ticks = ticks + 1 end)

for i = 1, N do
  ex:submit(square, i):add_done_callback(function(f)
    done, sum = done + 1, sum + f:result()
    if done == N then              -- all in: let the loop end
      watcher:close()
      timer:close()
    end
  end)
end

uv.run()
print(string.format("%d futures done, sum of squares = %d", done, sum))
print("the timer kept ticking meanwhile: " .. tostring(ticks > 0))
ex:shutdown()
