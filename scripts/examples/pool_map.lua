-- pool_map.lua: map over two names, then the chunked square-sum: the sum
-- of i*i for i in 1..N, split into ranges that the workers sum.  Python:
--   with Pool(2) as pool:
--       print(pool.map(greet, ["A", "B"]))
--       chunks = [range(lo, min(lo + size, N + 1)) for lo in range(1, N + 1, size)]
--       total = sum(pool.map(sum_squares, chunks))
local mp = require "multiprocessing"

local function greet(name)
  return "hello " .. name
end

local function sum_squares(range)        -- range = {first, last}
  local s = 0
  for i = range[1], range[2] do s = s + i * i end
  return s
end

local pool <close> = mp.Pool(2)

local greetings = pool:map(greet, {"A", "B"})
print(table.concat(greetings, ", ") .. " (" .. greetings.n .. " results)")

local N, SIZE = 2000000, 125000
local chunks = {}
for lo = 1, N, SIZE do chunks[#chunks + 1] = {lo, math.min(lo + SIZE - 1, N)} end
local partial = pool:map(sum_squares, chunks)
local total = 0
for _, s in ipairs(partial) do total = total + s end
print(string.format("%d chunks of %d: sum of i*i for i = 1..%d = %d",
                    #chunks, SIZE, N, total))
-- N(N+1)(2N+1)/6, computed without overflow: N(N+1) is even
local expected = (N * (N + 1) // 2) * (2 * N + 1) // 3
print("equals N(N+1)(2N+1)/6: " .. tostring(total == expected))
