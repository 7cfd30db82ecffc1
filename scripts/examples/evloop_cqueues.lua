-- evloop_cqueues.lua: a cqueues coroutine waits on a Queue and on a
-- future in one cqueues.poll.  Queues, futures, executors and pools speak
-- the cqueues polling protocol (pollfd, events, timeout), so they can be
-- polled like sockets.
local mp = require "multiprocessing"
local futures = require "multiprocessing.futures"
local cqueues = require "cqueues"

local ex = futures.ProcessPoolExecutor(2)
local q = mp.Queue()

local producer = mp.Process{target = function(out)
  for i = 1, 3 do out:put("message " .. i) end
end, args = {q}}
producer:start()

local fut = ex:submit(function(a, b) return a + b end, 40, 2)

local loop = cqueues.new()
loop:wrap(function()
  local messages, answer = 0, nil
  while messages < 3 or answer == nil do
    for _, ready in ipairs({cqueues.poll(q, fut)}) do
      if ready == q then
        while not q:empty() do    -- take all that is there
          print("queue: " .. q:get())
          messages = messages + 1
        end
      elseif ready == fut and fut:done() then   -- done() collects
        answer = fut:result()
      end
    end
  end
  print("future: 40 + 2 = " .. answer)
end)
assert(loop:loop())

producer:join()
ex:shutdown()
