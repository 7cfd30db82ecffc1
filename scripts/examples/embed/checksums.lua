-- checksums.lua: run by scripts/examples/embed/host.c, which provides the
-- C module "host".  Checksums words with the host's C function and says
-- where it ran.
local mp = require "multiprocessing"
local host = require "host"

local words = {...}
if #words == 0 then words = {"alpha", "beta", "gamma", "delta"} end

for _, w in ipairs(words) do
  print(string.format("%-8s %08x", w, host.checksum(w)))
end
-- What a Pool task will do with it: a closure that calls the host's C
-- function survives the codec (C functions travel by name) and runs.
local task = mp.decode(mp.encode(function(w) return host.checksum(w) end))
print(string.format("task(%q) = %08x", words[1], task(words[1])))

local me = mp.current_process()
print(string.format("%s: %d words in %s (pid %d), luamp %s, %d CPUs",
  host.name, #words, me.name, me.pid, mp.version, mp.cpu_count()))
