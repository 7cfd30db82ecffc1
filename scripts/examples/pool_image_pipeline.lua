-- pool_image_pipeline.lua: the "make thumbnails of a folder of images"
-- shape as a parallel file transform: eight grey-scale images (binary PGM
-- files) are made in a temporary directory; the workers each read one,
-- halve it (every 2x2 block becomes its average), write the thumbnail to
-- a new file and report its size, mean grey and checksum.  Python:
--   with Pool() as pool:
--       for info in pool.imap(make_thumbnail, paths): print(info)
local mp = require "multiprocessing"

local function fnv1a(s)                 -- 32-bit FNV-1a of a string
  local h = 2166136261
  for i = 1, #s do h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff end
  return h
end

-- the worker: reads path.pgm, writes path-thumb.pgm
local function make_thumbnail(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("a")
  f:close()
  local w, h, start = data:match("^P5\n(%d+) (%d+)\n255\n()")
  w, h = assert(tonumber(w), "not a PGM file: " .. path), tonumber(h)
  local tw, th = w // 2, h // 2
  local out, sum = {}, 0
  for y = 0, th - 1 do
    local row1 = start + 2 * y * w          -- offsets of the two rows
    local row2 = row1 + w
    for x = 0, tw - 1 do
      local a, b = data:byte(row1 + 2 * x, row1 + 2 * x + 1)
      local c, d = data:byte(row2 + 2 * x, row2 + 2 * x + 1)
      local v = (a + b + c + d + 2) // 4
      sum = sum + v
      out[y * tw + x + 1] = string.char(v)
    end
  end
  local pixels = table.concat(out)
  local thumb = path:gsub("%.pgm$", "-thumb.pgm")
  f = assert(io.open(thumb, "wb"))
  f:write(string.format("P5\n%d %d\n255\n", tw, th), pixels)
  f:close()
  return {w = w, h = h, tw = tw, th = th, mean = sum / (tw * th),
          fnv = fnv1a(pixels), thumb = thumb}
end

-- eight images of 320x240 with different patterns
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -m 700 " .. dir))
local paths = {}
for k = 1, 8 do
  local W, H = 320, 240
  local px = {}
  for y = 0, H - 1 do
    for x = 0, W - 1 do
      px[y * W + x + 1] = string.char((x * k + y * (9 - k) + (x * y) % 7) & 255)
    end
  end
  paths[k] = string.format("%s/image%d.pgm", dir, k)
  local f = assert(io.open(paths[k], "wb"))
  f:write(string.format("P5\n%d %d\n255\n", W, H), table.concat(px))
  f:close()
end

local pool <close> = mp.Pool()           -- one worker per CPU
local bytes = 0
for i, t in pool:imap(make_thumbnail, paths) do   -- in order, as each is done
  local f = assert(io.open(t.thumb, "rb"))
  bytes = bytes + f:seek("end")
  f:close()
  print(string.format("image%d.pgm %dx%d -> %dx%d  mean grey %6.2f  fnv1a %08x",
                      i, t.w, t.h, t.tw, t.th, t.mean, t.fnv))
  os.remove(t.thumb)
  os.remove(paths[i])
end
print(string.format("%d thumbnails, %d bytes written", #paths, bytes))
assert(os.remove(dir))
