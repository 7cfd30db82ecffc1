-- pool_jsonlines.lua: count the fields and words of a big JSON-lines file
-- in parallel.  A file of 10^6 JSON objects (or as many as argument 1
-- says), one per line, is made in /tmp
-- (the workers write blocks of lines, imap hands them back in order); then
-- it is cut into byte ranges, workers parse the lines of their range with
-- lua-cjson and count, and imap_unordered hands the partial counts back as
-- each range is done, to be merged here.  Python:
--   with Pool() as pool:
--       for part in pool.imap_unordered(count_range, ranges): merge(total, part)
local mp = require "multiprocessing"
local cjson = require "cjson"      -- an upvalue of count_range: travels by name

local LINES = math.tointeger(tonumber(arg and arg[1])) or 1000000
local BLOCK = 50000                -- lines per task while making the file
local RANGE = 2 * 1024 * 1024      -- bytes per task while counting

local LEVELS = {"debug", "info", "info", "warn", "error"}
-- as JSON text: a word with escapes, and one that is not ASCII
local WORDS = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta",
  "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "\\\"quoted\\\"",
  "na\\u00efve"}

-- line i of the file: everything in it follows from i
local function make_line(i)
  local h = i * 2654435761 & 0xffffffff
  local words, x = {}, h
  for j = 1, 1 + (h >> 3 & 3) do
    -- the smaller of two random picks: the first words are the commonest
    x = (x * 1103515245 + 12345) & 0x7fffffff
    words[j] = WORDS[math.min(x >> 16 & 15, x >> 20 & 15) + 1]
  end
  return string.format('{"id":%d,"lvl":"%s","n":%d,"msg":"%s"}\n', i,
                       LEVELS[h % 5 + 1], h >> 20, table.concat(words, " "))
end

local path = os.tmpname()
-- removed when the script ends, an error included
local cleanup <close> = setmetatable({}, {__close = function() os.remove(path) end})

-- the worker: counts the lines that start in the range {first, last} (a
-- byte range of the file, from 0, last excluded)
local function count_range(range)
  local first, last = range[1], range[2]
  local f = assert(io.open(path, "rb"))
  f:seek("set", first)
  local block = f:read(last - first) or ""
  if block:sub(-1) ~= "\n" then block = block .. (f:read("L") or "") end
  if first > 0 then
    -- a line that started before first belongs to the previous range
    f:seek("set", first - 1)
    if f:read(1) ~= "\n" then block = block:match("\n(.*)$") or "" end
  end
  f:close()
  local c = {lines = 0, n = 0, levels = {}, words = {}}
  local levels, words = c.levels, c.words
  for line in block:gmatch("[^\n]+") do
    local rec = cjson.decode(line)
    c.lines = c.lines + 1
    c.n = c.n + math.tointeger(rec.n)   -- (cjson gives floats)
    levels[rec.lvl] = (levels[rec.lvl] or 0) + 1
    for w in rec.msg:gmatch("%S+") do words[w] = (words[w] or 0) + 1 end
  end
  return c
end

local pool <close> = mp.Pool()

-- make the file, in parallel too: imap gives the blocks of lines in order
local function make_block(first)
  local lines = {}
  for i = first, math.min(first + BLOCK - 1, LINES) do
    lines[#lines + 1] = make_line(i)
  end
  return table.concat(lines)
end
local out = assert(io.open(path, "wb"))
local firsts = {}
for first = 1, LINES, BLOCK do firsts[#firsts + 1] = first end
for _, block in pool:imap(make_block, firsts) do out:write(block) end
local size = out:seek("end")
out:close()

local ranges = {}
for first = 0, size - 1, RANGE do
  ranges[#ranges + 1] = {first, math.min(first + RANGE, size)}
end

local total = {lines = 0, n = 0, levels = {}, words = {}}
local function merge(into, from)
  for k, v in pairs(from) do into[k] = (into[k] or 0) + v end
end
for _, part in pool:imap_unordered(count_range, ranges) do
  total.lines, total.n = total.lines + part.lines, total.n + part.n
  merge(total.levels, part.levels)
  merge(total.words, part.words)
end

local function show(counts)
  local keys = {}
  for k in pairs(counts) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if counts[a] ~= counts[b] then return counts[a] > counts[b] end
    return a < b
  end)
  for i, k in ipairs(keys) do keys[i] = k .. " " .. counts[k] end
  return table.concat(keys, ", ")
end
print(string.format("%d lines (%.1f MB) in %d ranges", total.lines, size / 1e6, #ranges))
print("sum of n: " .. total.n)
print("levels: " .. show(total.levels))
print("words: " .. show(total.words))
