-- run_tests.lua [--build DIR] [--filter PATTERN] [--preload LIB]
-- Runs the whole suite: every spec file under luamp and under stock lua5.4
-- (each file in its own busted process with a time limit, so a hang is a
-- failure, not a stuck run; ONCE and BESIDE below say which run once and
-- which run side by side), and the C tests, in the background from the
-- start.  Ends with the one line "N passed, N failed" and exits non-zero
-- when anything failed.
local build, filter, preload = "build", nil, nil
do
  local i = 1
  while arg[i] do
    if arg[i] == "--build" then build = arg[i + 1]; i = i + 1
    elseif arg[i] == "--preload" then preload = arg[i + 1]; i = i + 1
    elseif arg[i] == "--filter" then filter = arg[i + 1]; i = i + 1
    else error("unknown option " .. arg[i]) end
    i = i + 1
  end
end

local SPEC_TIMEOUT, CTEST_TIMEOUT = 240, 120
local passed, failed, skipped = 0, 0, 0

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function lines_of(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok and 0 or code
end

local function list(cmd)
  local t = {}
  for l in io.popen(cmd):lines() do t[#t + 1] = l end
  table.sort(t)
  return t
end

-- Counts a TAP stream; prints the failures with their diagnostics.
local function tally(label, out, code, secs)
  local p, f, s = 0, 0, 0
  local showing = false
  for line in out:gmatch("[^\n]*") do
    if line:match("^ok %d+ %- # SKIP") then
      s = s + 1; showing = false
    elseif line:match("^ok %d+") then
      p = p + 1; showing = false
    elseif line:match("^not ok %d+") then
      f = f + 1; showing = true
      io.write("FAIL [", label, "] ", line, "\n")
    elseif showing and line:match("^#") then
      io.write("    ", line, "\n")
    end
  end
  if code ~= 0 and f == 0 then
    -- crashed, timed out or failed to load: one failure, with the tail
    f = 1
    io.write("FAIL [", label, "] exited with status ", tostring(code),
             code == 124 and " (timed out)" or "", "\n")
    io.write((out:sub(-3000):gsub("[^\n]+", "    %0")), "\n")
  end
  passed, failed, skipped = passed + p, failed + f, skipped + s
  io.write(string.format("%-46s %4d passed %4d failed%s%s\n", label, p, f,
    s > 0 and string.format(" %d skipped", s) or "",
    secs and string.format("  %3d s", secs) or ""))
  io.flush()
end

local abs_build = lines_of("cd " .. sh_quote(build) .. " && pwd"):gsub("\n", "")
-- stock lua5.4, with the sanitizer runtime preloaded in sanitizer builds
local lua54 = preload and ("env LD_PRELOAD=" .. sh_quote(preload) .. " lua5.4")
              or "lua5.4"
local env = table.concat({
  "LUAMP_BIN=" .. sh_quote(abs_build .. "/luamp"),
  "LUAMP_BUILD=" .. sh_quote(abs_build),
  "LUAMP_LUA54=" .. sh_quote(lua54),
}, " ")

local runners = {
  {name = "luamp", env = env, cmd = sh_quote(abs_build .. "/luamp")},
}
runners[#runners + 1] = {
  name = "lua5.4",
  env = env .. " LUAMP_SPEC_PASS=2 LUA_CPATH=" .. sh_quote(abs_build .. "/?.so;;") ..
        " LUA_PATH=" .. sh_quote("./lua/?.lua;./lua/?/init.lua;;"),
  cmd = lua54,
}

-- Specs of the build and packaging (make install, the rockspec), not of
-- an interpreter: they drive both interpreters themselves, so they run
-- under the first runner only.
-- So do specs that only run programs -- the luamp command (whose Lua
-- files are the copy built into it, whatever LUA_PATH says), the example
-- scripts under it, the embedding host, nm on the library: the second
-- runner would run the same programs again.
local ONCE = {["spec/install_spec.lua"] = true, ["spec/host_spec.lua"] = true,
              ["spec/examples_spec.lua"] = true, ["spec/embed_spec.lua"] = true}

-- Specs run beside another (the values in the background, one after
-- another, while the key runs), under every runner that runs them.  The
-- keys mostly sleep: evloop_spec's event loops through their 1000 short
-- tasks, broker_faults_spec's tests through leases and heartbeats,
-- futures_spec's through task deadlines and results.  Beside them run
-- specs that count nothing shared -- no /dev/shm entries; only their own
-- children and fds -- and time nothing tight: install_spec's builds (on
-- every core; the build dir it installs is up to date, make test builds
-- first), codec_spec and codec_shapes_spec (all CPU in one process),
-- broker_queue_spec and broker_spec (their own redis-servers; they wait
-- out leases too), self_spec, forkserver_spec and queue_shutdown_spec
-- (forks, their own children only).
local BESIDE = {["spec/evloop_spec.lua"] = {"spec/install_spec.lua", "spec/codec_shapes_spec.lua",
                                            "spec/self_spec.lua"},
                ["spec/broker_faults_spec.lua"] = {"spec/broker_queue_spec.lua", "spec/broker_spec.lua",
                                                   "spec/codec_spec.lua"},
                ["spec/futures_spec.lua"] = {"spec/forkserver_spec.lua", "spec/queue_shutdown_spec.lua"}}

-- Runs jobs ({label, cmd}, ...) one after another in the background, each
-- one's output to a file; finish(bg) waits for them and tallies each.
local function background(jobs)
  local dir = lines_of("mktemp -d"):gsub("\n", "")
  local script = {}
  for i, j in ipairs(jobs) do
    local f = sh_quote(dir .. "/" .. i)
    script[#script + 1] = string.format(
      "t0=$(date +%%s); { %s; } >%s.out 2>&1; echo $? $(($(date +%%s) - t0)) >%s.rc",
      j.cmd, f, f)
  end
  io.flush()
  return {dir = dir, jobs = jobs,
          p = assert(io.popen("exec >/dev/null; " .. table.concat(script, "; "), "r"))}
end

local function finish(bg)
  bg.p:close()
  for i, j in ipairs(bg.jobs) do
    local f = bg.dir .. "/" .. i
    local h = io.open(f .. ".out")
    local out = h and h:read("a") or ""
    if h then h:close() end
    h = io.open(f .. ".rc")
    local code, secs = (h and h:read("a") or ""):match("(%d+) (%d+)")
    if h then h:close() end
    tally(j.label, out, tonumber(code) or 1, tonumber(secs))
    os.remove(f .. ".out"); os.remove(f .. ".rc")
  end
  os.remove(bg.dir)
end

local function selected(spec)
  return not filter or spec:find(filter, 1, true)
end

local specs = list("ls spec/*_spec.lua")

-- The C tests (each its own program; they count only their own children
-- and fds) run in the background from the start, beside the specs.
local ctests = {}
for _, t in ipairs(list("ls " .. sh_quote(build) .. "/tests/test_* 2>/dev/null")) do
  if not filter or t:find(filter, 1, true) then
    ctests[#ctests + 1] = {label = "c " .. t:match("[^/]+$"),
      cmd = string.format("timeout -k 5 %d %s", CTEST_TIMEOUT, sh_quote(t))}
  end
end
local cbg = #ctests > 0 and background(ctests)

local done = {}     -- [runner index .. spec] = true once run
for ri, r in ipairs(runners) do
  local function runs(spec)
    return selected(spec) and (ri == 1 or not ONCE[spec]) and not done[ri .. spec]
  end
  local function command(spec)
    return string.format("%s timeout -k 5 %d %s /usr/bin/busted -o TAP %s 2>&1",
      r.env, SPEC_TIMEOUT, r.cmd, sh_quote(spec))
  end
  -- a spec listed beside a key that this runner runs waits for the key
  local function waits(spec)
    for key, list in pairs(BESIDE) do
      for _, o in ipairs(list) do
        if o == spec and runs(key) then return true end
      end
    end
    return false
  end
  for _, spec in ipairs(specs) do
    if runs(spec) and not waits(spec) then
      done[ri .. spec] = true
      local others = {}
      for _, o in ipairs(BESIDE[spec] or {}) do
        if runs(o) then
          others[#others + 1] = {label = r.name .. " " .. o .. " (beside)", cmd = command(o)}
          done[ri .. o] = true
        end
      end
      local bg = #others > 0 and background(others)
      local t0 = os.time()
      local out, code = lines_of(command(spec))
      tally(r.name .. " " .. spec, out, code, os.time() - t0)
      if bg then finish(bg) end
    end
  end
end

if cbg then finish(cbg) end

io.write(string.format("%d passed, %d failed\n", passed, failed))
os.exit(failed == 0 and passed > 0 and 0 or 1)
