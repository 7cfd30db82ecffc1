-- helpers.lua: what the specs share -- running commands, the interpreters
-- under test, counting processes, fds and /dev/shm entries, terminals.
local H = {}

H.build = os.getenv("LUAMP_BUILD") or "build"
H.luamp = os.getenv("LUAMP_BIN") or (H.build .. "/luamp")
-- the command for stock lua5.4 (with the sanitizer runtime preloaded when
-- the suite runs under make sanitize)
H.lua54 = os.getenv("LUAMP_LUA54") or "lua5.4"
-- Debian's CPython, the real peer for interop tests (without the sanitizer
-- runtime that make sanitize preloads, which would report Python's leaks)
H.python = "env -u LD_PRELOAD /usr/bin/python3"

function H.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
H.slurp = slurp

function H.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

function H.tmpname()
  return os.tmpname()
end

-- Runs a shell command line; returns stdout, stderr, exit code (128+N when
-- killed by signal N, as the shell reports it).
function H.sh(cmdline, stdin)
  local o, e = os.tmpname(), os.tmpname()
  local i
  local full = "(" .. cmdline .. ") >" .. o .. " 2>" .. e
  if stdin then
    i = os.tmpname()
    H.write(i, stdin)
    full = full .. " <" .. i
  else
    full = full .. " </dev/null"
  end
  local ok, how, code = os.execute(full)
  local out, err = slurp(o), slurp(e)
  os.remove(o); os.remove(e)
  if i then os.remove(i) end
  if how == "signal" then code = 128 + code end
  return out, err, ok and 0 or code
end

-- True when the build under test is instrumented by make sanitize (its
-- allocator is ASan's, not glibc's).
local sanitized
-- Sends one message of size bytes (from offset 1 of it: size - 1) over a
-- Pipe with send_bytes and checks what a child's recv_bytes got: its
-- length and both ends.  The message is built by two 32-way
-- concatenations, each one allocation of its result (string.rep would
-- fill a buffer as big and copy it).
function H.pipe_bytes_roundtrip(size)
  local mp, check = require "multiprocessing", require "luassert"
  local a, b = mp.Pipe()
  local p = mp.Process{target = function()
    a:close()
    local s = b:recv_bytes()
    b:send({#s, s:sub(1, 5), s:sub(-5)})
  end}
  p:start()
  b:close()
  local cat32 = load("local x = ... return " .. string.rep("x", 32, ".."))
  a:send_bytes(cat32(cat32(string.rep("abcd", size >> 12))), 1)
  check.same({size - 1, "bcdab", "dabcd"}, a:recv())
  p:join()
  check.equal(0, p.exitcode)
  collectgarbage()
end

function H.sanitized()
  if sanitized == nil then
    sanitized = H.sh("env -u LD_PRELOAD readelf -d " .. H.q(H.build .. "/libluamp.so")):find("libasan") ~= nil
  end
  return sanitized
end

-- Runs luamp with the given argument string.
function H.luamp_run(args, stdin, env)
  return H.sh((env and env .. " " or "") .. H.q(H.luamp) .. " " .. args, stdin)
end

-- Runs a Lua snippet in a fresh luamp process and returns out, err, code.
function H.script(code, args, env)
  local path = os.tmpname() .. ".lua"
  H.write(path, code)
  local out, err, rc = H.luamp_run(H.q(path) .. " " .. (args or ""), nil, env)
  os.remove(path)
  return out, err, rc
end

-- The number of open fds of this process.  Listed by a shell into a file:
-- io.popen's own pipe would be counted twice while popen has not yet
-- closed the child's end in this process.
function H.fd_count()
  local tmp = os.tmpname()
  os.execute("ls /proc/" .. H.pid() .. "/fd >" .. tmp)
  local n = 0
  for _ in io.lines(tmp) do n = n + 1 end
  os.remove(tmp)
  return n
end

function H.pid()
  return require("multiprocessing.core").getpid()
end

-- Children of this process that are zombies.
function H.zombies()
  -- (without the sanitizer runtime that make sanitize preloads: ps hangs
  -- under it)
  local out = H.sh("env -u LD_PRELOAD ps -o stat= --ppid " .. H.pid())
  local n = 0
  for stat in out:gmatch("%S+") do
    if stat:sub(1, 1) == "Z" then n = n + 1 end
  end
  return n
end

-- The /dev/shm entries a leak of this process (or of its children) could
-- have left: named as luamp names blocks by default -- psm_ and 8 hex
-- digits (SharedMemory, SharedMemoryManager, ShareableList; Python's
-- default names too) -- and not held open or mapped by a process outside
-- this one's tree.  So the blocks that other suites and programs make
-- meanwhile (their makers hold them) do not count, nor one that is gone
-- or let go by the time a second look ends (a maker between its close
-- and its unlink); a block of ours left behind does, held or not.
local function lines(cmd)
  local t = {}
  local p = io.popen("env -u LD_PRELOAD sh -c " .. H.q(cmd) .. " 2>/dev/null")
  for l in p:lines() do t[#t + 1] = l end
  p:close()
  return t
end

local function shm_ours()
  local names = {}
  for _, n in ipairs(lines("ls /dev/shm")) do
    if n:match("^psm_%x%x%x%x%x%x%x%x$") then names[n] = true end
  end
  if next(names) == nil then return names end
  -- this process's tree: pid -> parent from /proc/*/stat
  local parent, tree = {}, {}
  for _, l in ipairs(lines("cat /proc/[0-9]*/stat")) do
    local pid, ppid = l:match("^(%d+) .*%) %S+ (%d+)")
    if pid then parent[tonumber(pid)] = tonumber(ppid) end
  end
  local me = H.pid()
  local function ours(pid)
    local seen = 0
    while pid and pid > 1 and seen < 1000 do
      if pid == me or tree[pid] then return true end
      pid, seen = parent[pid], seen + 1
    end
    return false
  end
  -- held by someone else: an fd open on it, or a mapping of it
  local held = lines("find /proc/[0-9]*/fd -lname '/dev/shm/psm_*' -printf '%p %l\\n'; " ..
                     "grep -Ho '/dev/shm/psm_[0-9a-f]*' /proc/[0-9]*/maps")
  for _, l in ipairs(held) do
    local pid, name = l:match("^/proc/(%d+)/.-/dev/shm/(psm_%x+)")
    pid = tonumber(pid)
    if pid and names[name] then
      if ours(pid) then tree[pid] = true else names[name] = nil end
    end
  end
  return names
end

function H.shm_entries()
  local first = shm_ours()
  if next(first) == nil then return 0 end
  require("multiprocessing.core").sleep(0.2)
  local n = 0
  for name in pairs(shm_ours()) do
    if first[name] then n = n + 1 end
  end
  return n
end

-- A luamp (or other) program in a tmux terminal: type keys, read the
-- screen.
local Term = {}
Term.__index = Term

function H.terminal(cmdline, width, height)
  local name = "luamp-spec-" .. H.pid() .. "-" .. math.random(1, 1e9)
  local sock = "/tmp/" .. name .. ".tmux"
  local t = setmetatable({name = name, sock = sock}, Term)
  t:tmux(string.format("new-session -d -s %s -x %d -y %d %s", name,
    width or 100, height or 30, H.q(cmdline)))
  return t
end

function Term:tmux(args)
  return H.sh("tmux -S " .. self.sock .. " " .. args)
end

function Term:send(keys, literal)
  self:tmux("send-keys -t " .. self.name .. (literal and " -l " or " ") .. keys)
end

function Term:type(text)
  self:send(H.q(text), true)
end

-- The screen's text: wrapped lines joined, trailing blanks of each line
-- and blank lines at the end dropped (so a prompt reads "\n>$").
function Term:screen()
  local s = self:tmux("capture-pane -p -J -t " .. self.name)
  s = s:gsub("[ \t]+\n", "\n"):gsub("%s+$", "")
  return s
end

-- Waits until the screen matches pattern (a Lua pattern); returns the
-- screen, or fails the spec after the timeout.
function Term:wait_for(pattern, timeout)
  local deadline = os.time() + (timeout or 10)
  local s
  repeat
    s = self:screen()
    if s:find(pattern) then return s end
    H.sleep(0.05)
  until os.time() > deadline
  error("terminal never showed " .. pattern .. "; screen:\n" .. s, 2)
end

function Term:close()
  self:tmux("kill-server")
  os.remove(self.sock)
end

function H.sleep(s)
  require("multiprocessing.core").sleep(s)
end

-- Repeats f until it returns a true value or the timeout passes.
function H.eventually(f, timeout)
  local core = require "multiprocessing.core"
  local deadline = core.now() + (timeout or 5)
  repeat
    local v = f()
    if v then return v end
    core.sleep(0.01)
  until core.now() > deadline
  return f()
end

-- fds of this process that are luamp shared objects (memfds) or POSIX
-- shared memory: what a leak of ours would leave behind
function H.our_fds()
  local n = 0
  local p = io.popen("ls -l /proc/" .. H.pid() .. "/fd")
  for l in p:lines() do
    if l:find("memfd:luamp", 1, true) or l:find("/dev/shm/", 1, true) then
      n = n + 1
    end
  end
  p:close()
  return n
end

-- The error f(...) raises (the spec fails if it does not raise).
function H.err_of(f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error")
  return err
end

-- The kind of the error f(...) raises (an error object's kind, else the
-- error as text), and the error itself.
function H.kind_of(f, ...)
  local e = H.err_of(f, ...)
  return type(e) == "table" and e.kind or tostring(e), e
end

-- true while pid is a process that has not finished (zombies count as gone)
function H.alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local s = f:read("a")
  f:close()
  return s:match("^%d+ %b() (%a)") ~= "Z"
end

-- The size of a soak-sized loop: n in the first run of a spec, n // 10 in
-- the second (run_tests.lua runs every spec under luamp, then under stock
-- lua5.4 with LUAMP_SPEC_PASS=2: the runtime under test is the same C, so
-- the full count once is the check and the short one covers the loading).
function H.soak(n)
  return os.getenv("LUAMP_SPEC_PASS") == "2" and n // 10 or n
end

-- Arms a one-shot hook that raises "interrupted!" after 1..max
-- instructions (a random count), as lua.c's and luamp's SIGINT hook
-- raises at the next one: a Ctrl-C at random instruction boundaries, many
-- times, reproducibly (math.randomseed).  Not in the main chunk, nor in
-- this function (the error would leave the test).
function H.arm_interrupt(max)
  debug.sethook(function()
    debug.sethook()
    if debug.getinfo(2, "S").what ~= "main" and
       debug.getinfo(2, "f").func ~= H.arm_interrupt then
      error("interrupted!", 0)
    end
  end, "", math.random(1, max))
end

-- f(...) -- describe or it with its name and body -- in the first run of
-- a spec only: for tests that only run programs in child processes (the
-- luamp command, whose Lua files are the copy built into it), which the
-- second run (stock lua5.4 running busted) would run again unchanged.
function H.once(f, ...)
  if os.getenv("LUAMP_SPEC_PASS") ~= "2" then return f(...) end
end

-- Runs fn(...) in a child (mp.Process); returns a function that waits and returns
-- what fn returned (through a pipe), raising "kind: message" for its
-- error; and the process.
function H.spawn(fn, ...)
  local mp = require "multiprocessing"
  local a, b = mp.Pipe()
  local args = table.pack(...)
  local p = mp.Process{target = function()
    a:close()
    local r = table.pack(pcall(fn, table.unpack(args, 1, args.n)))
    if not r[1] and type(r[2]) == "table" then r[2] = r[2].kind .. ": " .. tostring(r[2].message) end
    b:send(r)
  end}
  p:start()
  b:close()
  return function()
    local r = a:recv()
    a:close()
    p:join()
    if not r[1] then error(r[2], 0) end
    return table.unpack(r, 2, r.n)
  end, p
end

-- {1, 2, ..., n}
function H.range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

-- pids of a pool's live workers, sorted (white box: its worker table)
function H.worker_pids(pool)
  local t = {}
  for _, w in pairs(pool._workers) do t[#t + 1] = w.pid end
  table.sort(t)
  return t
end

return H
