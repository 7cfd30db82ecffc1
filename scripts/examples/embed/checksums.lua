-- checksums.lua: run by scripts/examples/embed/host.c, which provides the
-- C module "host".  A Pool checksums the words: each task calls the host's
-- C function in a worker process.  The workers are forks of the host, so
-- its C code is there; the task reaches it through its upvalue `host`, a
-- loaded module, which travels by name.
local mp = require "multiprocessing"
local host = require "host"

local words = {...}
if #words == 0 then words = {"alpha", "beta", "gamma", "delta"} end

local function checksum(w)
  -- host.role() is set by the host's at-fork hook (luamp_atfork)
  return {sum = host.checksum(w), pid = mp.current_process().pid,
          role = host.role()}
end

local me = mp.current_process()
local pool <close> = mp.Pool(2)
local results = pool:map(checksum, words)     -- in the order of words

local in_workers = true
for i, w in ipairs(words) do
  local r = results[i]
  print(string.format("%-8s %08x", w, r.sum))
  assert(r.sum == host.checksum(w), "a worker computed another checksum")
  if r.pid == me.pid or r.role ~= "worker" then in_workers = false end
end
print(string.format("computed by the pool's workers: %s; here: %s, %d forks",
  tostring(in_workers), host.role(), host.forks()))
pool:terminate()

print(string.format("%s: %d words in %s (pid %d), luamp %s, %d CPUs",
  host.name, #words, me.name, me.pid, mp.version, mp.cpu_count()))
