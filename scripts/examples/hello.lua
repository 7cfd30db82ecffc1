-- hello.lua: the module loads and reports this machine.
local mp = require "multiprocessing"
print(string.format("luamp %s: %d CPUs, running as %s (pid %d)",
  mp.version, mp.cpu_count(), mp.current_process().name,
  mp.current_process().pid))
