-- pool_starmap_download.lua: the "download these URLs in parallel" shape,
-- with file:// URLs to files made here instead of the network: starmap
-- calls fetch(url, dest) for each pair; each copy is checked by Adler-32.
-- Python:
--   with Pool(4) as pool:
--       sizes = pool.starmap(fetch, [(url, dest) for url, dest in jobs])
local mp = require "multiprocessing"

-- Adler-32 of a string (zlib's checksum)
local function adler32(s)
  local a, b = 1, 0
  for i = 1, #s do
    a = (a + s:byte(i)) % 65521
    b = (b + a) % 65521
  end
  return b << 16 | a
end

-- "downloads" url to dest; returns the size and checksum of what arrived
local function fetch(url, dest)
  local path = assert(url:match("^file://(.+)$"), "only file:// URLs here")
  local src = assert(io.open(path, "rb"))
  local body = src:read("a")
  src:close()
  local out = assert(io.open(dest, "wb"))
  out:write(body)
  out:close()
  return {size = #body, adler32 = adler32(body)}
end

-- the "server": a temporary directory with five files of known contents
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -m 700 " .. dir))
local jobs, names = {}, {}
for k = 1, 5 do
  local name = string.format("file%d.bin", k)
  local bytes, x = {}, k
  for i = 1, 20000 * k do               -- 20 kB, 40 kB, ... of a fixed pattern
    x = (x * 1103515245 + 12345) & 0x7fffffff
    bytes[i] = string.char(x >> 16 & 255)
  end
  local f = assert(io.open(dir .. "/" .. name, "wb"))
  f:write(table.concat(bytes))
  f:close()
  names[k] = name
  jobs[k] = {"file://" .. dir .. "/" .. name, dir .. "/copy-of-" .. name}
end

local pool <close> = mp.Pool(4)
local got = pool:starmap(fetch, jobs)

for k, r in ipairs(got) do
  -- the copy on disk is the same as what fetch saw
  local f = assert(io.open(jobs[k][2], "rb"))
  local copy = f:read("a")
  f:close()
  assert(#copy == r.size and adler32(copy) == r.adler32)
  print(string.format("%-10s %6d bytes  adler32 %08x", names[k], r.size, r.adler32))
end

for k = 1, #jobs do
  os.remove(dir .. "/" .. names[k])
  os.remove(jobs[k][2])
end
assert(os.remove(dir))
