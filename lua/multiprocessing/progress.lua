-- multiprocessing.progress: the progress bar of a map or imap (its
-- opts.progress).
--
-- Progress bar: stderr, redrawn at most 10 times a second on a terminal; a
-- plain final line otherwise.  On a terminal the line fits its width (a
-- line that wraps would make every redraw a new line), and output must
-- not run into it: while a bar is drawn, print and io.write clear it
-- first -- in this process (wrapped for the bar's life, the bar redrawn
-- after) and in the workers (wrapped for good, see worker_main: they
-- clear it when the pool's shared BAR word says it is drawn, and the
-- owner draws it again at its next update).  With an iterator function
-- as input (imap) the total is unknown: the count and the rate show.
local core = require "multiprocessing.core"
local proto = require "multiprocessing.pool_proto"

local now, BAR = core.now, proto.BAR

local M = {}

local Progress = {}
Progress.__index = Progress

-- the terminal's width: $COLUMNS, else stty's answer about stderr
local function term_cols()
  local c = math.tointeger(tonumber(os.getenv("COLUMNS") or ""))
  if c and c > 0 then return c end
  local f = io.popen("stty size <&2 2>/dev/null")
  if f then
    local out = f:read("a") or ""
    f:close()
    c = math.tointeger(tonumber(out:match("^%d+ (%d+)") or ""))
    if c and c > 0 then return c end
  end
  return 80
end

local function clock(s)
  s = math.max(0, math.floor(s + 0.5))
  return string.format("%d:%02d", s // 60, s % 60)
end

-- The bar being drawn in this process (one at a time), and the print and
-- io.write it wrapped.
local drawn_bar, plain_print, plain_write

local function clear_bar()
  local bar = drawn_bar
  if bar and bar.drawn then
    io.stderr:write("\r\27[K")
    bar.drawn = false
    if bar.flag then bar.flag[BAR] = 0 end
  end
end

local function redraw_bar()
  local bar = drawn_bar
  if bar and not bar.drawn and not bar.ended then
    io.stdout:flush()
    bar:draw()
  end
end

local function bar_print(...)
  clear_bar()
  plain_print(...)
  redraw_bar()
end

local function bar_write(...)
  clear_bar()
  local r = plain_write(...)
  if select("#", ...) > 0 and tostring(select(select("#", ...), ...)):find("\n$") then
    redraw_bar()
  end
  return r
end

-- total: the number of items, nil when unknown; flag: the pool's shared
-- words (BAR says a bar is drawn, for the workers)
local function new_progress(total, flag)
  local self = setmetatable({total = total, t0 = now(), last = 0, done = 0,
                             tty = core.isatty(2), flag = flag,
                             drawn = false, ended = false}, Progress)
  if self.tty then
    self.cols = term_cols()
    if drawn_bar == nil then
      plain_print, plain_write = print, io.write
      print, io.write = bar_print, bar_write
    end
    drawn_bar = self
  end
  return self
end

-- The bar's line for done items, at most cols - 1 characters.
function Progress:line(done, final)
  local dt = now() - self.t0
  local rate = dt > 0 and done / dt or 0
  local total = self.total
  local tail = final and ("in " .. clock(dt)) or
               (total and "ETA " .. clock(rate > 0 and (total - done) / rate or 0) or
                clock(dt))
  local count = total and string.format("%d/%d", done, total) or (done .. " done")
  local text = string.format("%s %.1f it/s %s", count, rate, tail)
  local room = (self.cols or 80) - 1
  local width = total and math.min(30, room - #text - 3) or 0
  if width < 5 then return text:sub(1, room) end
  local fill = total > 0 and math.floor(width * done / total) or width
  if fill > width then fill = width end
  return string.format("[%s%s] %s", string.rep("#", fill),
                       string.rep(".", width - fill), text)
end

function Progress:draw()
  -- (the flag first: a worker printing from now on clears what comes)
  if self.flag then self.flag[BAR] = 1 end
  io.stderr:write("\r", self:line(self.done), "\27[K")
  io.stderr:flush()
  self.drawn = true
end

function Progress:update(job)
  self.done = job._items_done
  if not self.tty or self.ended then return end
  local t = now()
  -- (a worker that printed cleared the bar: drawn again now)
  if self.drawn and self.flag and self.flag[BAR] == 0 then self.drawn = false end
  if self.drawn and t - self.last < 0.1 then return end
  self.last = t
  self:draw()
end

-- The last line: the count, the rate and the time it took.
function Progress:finish(job)
  if self.ended then return end
  self.ended = true
  local done, dt = job._items_done, now() - self.t0
  self.done = done
  if self.tty then
    io.stderr:write("\r", self:line(done, true), "\27[K\n")
    if self.flag then self.flag[BAR] = 0 end
    if drawn_bar == self then
      drawn_bar = nil
      if print == bar_print then print = plain_print end
      if io.write == bar_write then io.write = plain_write end
    end
  else
    io.stderr:write(string.format("%s done in %.2f s (%.1f it/s)\n",
      self.total and done .. "/" .. self.total or tostring(done), dt,
      dt > 0 and done / dt or 0))
  end
  io.stderr:flush()
end

M.new = new_progress
return M
