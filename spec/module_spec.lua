-- require "multiprocessing": the module table, process identity and the
-- contract's error objects.
local H = require "helpers"
local mp = require "multiprocessing"

describe("the module", function()
  it("reports usable CPUs, affinity-aware", function()
    local n = mp.cpu_count()
    assert.equal("integer", math.type(n))
    assert.equal(tonumber((H.sh("nproc"))), n)
    local out = H.sh("taskset -c 0 " .. H.q(H.luamp) ..
      " -e 'print(require(\"multiprocessing\").cpu_count())'")
    assert.equal("1\n", out)
  end)

  it("describes the main process", function()
    local me = mp.current_process()
    assert.equal("MainProcess", me.name)
    assert.equal(H.pid(), me.pid)
    assert.equal(me.pid, me.ident)
    assert.is_false(me.daemon)
    assert.matches("MainProcess", tostring(me))
    assert.is_nil(mp.parent_process())
    assert.same({}, mp.active_children())
  end)

  it("lists its names, loaded or not", function()
    local names = mp.names()
    for _, n in ipairs {"cpu_count", "current_process", "parent_process",
                        "active_children", "Error", "is_error"} do
      assert.truthy(table.concat(names, " "):find(n, 1, true), n)
    end
  end)

  it("accepts freeze_support(), which has nothing to do (issue 17)", function()
    assert.equal(0, select("#", mp.freeze_support()))
    -- Python's idiom at the top of a main script, then processes as usual
    local out, err, code = H.sh(H.q(H.luamp) .. " -e 'local mp = require \"multiprocessing\" " ..
      "mp.freeze_support() local p = mp.Process{target = function() os.exit(3) end} " ..
      "p:start() p:join() print(p.exitcode)'")
    assert.equal("", err)
    assert.equal("3\n", out)
    assert.equal(0, code)
  end)

  it("loads in stock lua5.4 from multiprocessing.so alone", function()
    local out, err, code = H.sh("LUA_PATH='/nowhere/?.lua' LUA_CPATH=" ..
      H.q(H.build .. "/?.so") ..
      " " .. H.lua54 .. " -e 'local mp = require \"multiprocessing\" " ..
      "print(mp.cpu_count() > 0, mp.current_process().name)'")
    assert.equal("", err)
    assert.equal("true\tMainProcess\n", out)
    assert.equal(0, code)
  end)
end)

describe("error objects", function()
  it("carry kind and message and print as '<kind>: <message>'", function()
    local e = mp.new_error("Empty", "queue is empty")
    assert.equal("Empty", e.kind)
    assert.equal("queue is empty", e.message)
    assert.equal("Empty: queue is empty", tostring(e))
    assert.is_true(mp.is_error(e))
    assert.is_true(mp.is_error(e, "Empty"))
    assert.is_false(mp.is_error(e, "Full"))
    assert.is_false(mp.is_error({kind = "Empty"}))
    assert.is_false(mp.is_error("Empty"))
  end)

  it("raised by the runtime (C) lead their message with the user's file:line", function()
    local q = mp.Queue()
    local ok, e = pcall(function()
      q:get(true, 0.01)     -- this line
    end)
    local line = debug.getinfo(1, "l").currentline - 2
    assert.is_false(ok)
    assert.equal("Empty", e.kind)
    assert.equal("spec/module_spec.lua:" .. line, e.where)
    assert.equal("spec/module_spec.lua:" .. line .. ": queue is empty", e.message)
    -- through the library's own Lua code (SharedMemory{} is Lua over C)
    ok, e = pcall(function()
      mp.SharedMemory{name = "luamp-no-such-block-" .. mp.current_process().pid}
    end)
    line = debug.getinfo(1, "l").currentline - 2
    assert.equal("FileNotFoundError", e.kind)
    assert.equal("spec/module_spec.lua:" .. line, e.where)
    -- called straight from pcall (a C frame) there is no line, as for Lua's own
    ok, e = pcall(q.get, q, true, 0.01)
    assert.is_nil(e.where)
    assert.equal("queue is empty", e.message)
    q:close()
  end)

  it("append the remote traceback when there is one", function()
    local e = mp.new_error("RemoteError", "boom",
      {traceback = "stack traceback:\n\tx.lua:1", value = {1}})
    assert.equal("RemoteError: boom\nstack traceback:\n\tx.lua:1", tostring(e))
    assert.same({1}, e.value)
  end)

  it("are raised with pcall-able kinds", function()
    local ok, e = pcall(require("multiprocessing.core").raise, "TimeoutError", "late")
    assert.is_false(ok)
    assert.equal("TimeoutError", e.kind)
  end)

  it("know exactly the contract's kinds", function()
    local kinds = {"Empty", "Full", "TimeoutError", "EOFError",
      "BrokenPipeError", "ValueError", "ProcessError", "RemoteError",
      "WorkerLostError", "BrokenPoolError", "AuthenticationError",
      "EncodeError", "DecodeError", "BrokenBarrierError", "BufferTooShort",
      "FileExistsError", "FileNotFoundError", "OSError", "CancelledError",
      "ShutDown", "KeyError"}
    assert.same(kinds, mp.error_kinds)
    for _, k in ipairs(kinds) do
      assert.equal(k, mp.new_error(k, "m").kind)
    end
    assert.has_error(function() mp.new_error("NoSuchError", "m") end)
    assert.has_error(function() mp.new_error(nil, "m") end)
  end)

  it("come from one place each: the Lua side's argument errors from util", function()
    -- no Lua file but util.lua spells "bad argument #n to ..." itself
    local files = H.sh("ls lua/multiprocessing/*.lua")
    local n = 0
    for path in files:gmatch("[^\n]+") do
      n = n + 1
      if not path:find("util%.lua$") then
        assert.is_nil(H.slurp(path):find("bad argument", 1, true), path)
      end
    end
    assert.is_true(n > 5)
    -- and util's helpers make Lua's own message at the caller's line
    local util = require "multiprocessing.util"
    local ok, msg = pcall(function() util.typeerror(2, "f", "table", io.stdout) end)
    assert.is_false(ok)
    assert.matches("module_spec%.lua:%d+: bad argument #2 to 'f' %(table expected, got FILE%*%)$", msg)
  end)
end)

describe("interruptible waits", function()
  for _, interp in ipairs {"luamp", "lua5.4"} do
    it("end with 'interrupted!' on SIGINT under " .. interp, function()
      local cmd = interp == "luamp" and H.q(H.luamp) or
        ("LUA_CPATH=" .. H.q(H.build .. "/?.so") .. " " .. H.lua54)
      local out, err, code = H.sh(cmd ..
        " -e 'local c = require \"multiprocessing.core\" io.write(\"go\\n\") io.flush() " ..
        "local t = c.now() local ok, e = pcall(c.sleep, 30) " ..
        "print(ok, e, c.now() - t < 5)' & pid=$!; sleep 0.3; kill -INT $pid; wait $pid")
      assert.equal("", err)
      assert.equal(0, code)
      assert.equal("go\nfalse\tinterrupted!\ttrue\n", out)
    end)
  end

  it("sleep rejects bad arguments and treats negatives as zero", function()
    local core = require "multiprocessing.core"
    assert.has_error(function() core.sleep("x") end)
    assert.has_error(function() core.sleep(0 / 0) end)
    local t = core.now()
    core.sleep(-5)
    assert.is_true(core.now() - t < 0.1)
  end)
end)

-- The house's shape (issue 14): the Lua files depend on each other one
-- way, and each is small enough to hold one idea.
describe("the Lua files", function()
  local dir = "lua/multiprocessing/"
  -- name -> its source, for every lua/multiprocessing/*.lua
  local function sources()
    local src = {}
    for path in io.popen("ls " .. dir .. "*.lua"):lines() do
      local f = assert(io.open(path, "rb"))
      src[path:match("([%w_]+)%.lua$")] = f:read("a")
      f:close()
    end
    return src
  end

  -- The modules of this directory a source requires (at load or inside a
  -- function: either way the two files depend on each other).
  local function requires(text)
    local out = {}
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
      line = line:gsub("%-%-.*$", "")       -- comments do not count
      for name in line:gmatch("require%s*%(?%s*[\"']multiprocessing%.?([%w_]*)[\"']") do
        out[#out + 1] = name == "" and "init" or name
      end
    end
    return out
  end

  it("require no file that (through others) requires them back", function()
    local src = sources()
    assert.is_truthy(src.pool and src.managers, "run from the checkout's root")
    local deps = {}
    for name, text in pairs(src) do
      deps[name] = {}
      for _, d in ipairs(requires(text)) do
        if src[d] and d ~= name then deps[name][#deps[name] + 1] = d end
      end
    end
    -- depth-first; a file met again while it is on the path is a cycle
    local state, path = {}, {}
    local function visit(name)
      if state[name] == "done" then return end
      if state[name] == "open" then
        local from = 1
        while path[from] ~= name do from = from + 1 end
        local cycle = table.concat(path, " -> ", from) .. " -> " .. name
        error("require cycle: " .. cycle, 0)
      end
      state[name] = "open"
      path[#path + 1] = name
      for _, d in ipairs(deps[name]) do visit(d) end
      path[#path] = nil
      state[name] = "done"
    end
    local names = {}
    for name in pairs(src) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      local ok, err = pcall(visit, name)
      assert.is_true(ok, err)
    end
    -- (the parse sees what it must: pool.lua requires its parts)
    assert.is_truthy(table.concat(requires(src.pool), " "):find("pool_worker", 1, true))
  end)

  -- Functions longer than limit lines, as {line, n, text}: a function
  -- starts on a line with the keyword function (strings and comments
  -- aside) and no end, and ends at the first later line that is "end" at
  -- its indentation or less.  A comment block right above that says "long" is the
  -- reason that lets one pass.
  local function long_functions(text, limit)
    local lines = {}
    for l in (text .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
    local out = {}
    for i, l in ipairs(lines) do
      local code = l:gsub('"[^"]*"', '""'):gsub("'[^']*'", "''")
                    :gsub("%-%-.*$", "")
      local ind = code:match("^(%s*)%S")
      if ind and code:find("%f[%w_]function%f[^%w_]") and
         not code:find("%f[%w_]end%f[^%w_]") then
        local j = i + 1
        while lines[j] do
          local e = lines[j]:match("^(%s*)end%f[^%w_]")
          if e and #e <= #ind then break end
          j = j + 1
        end
        local k, why = i - 1, false
        while k > 0 and lines[k]:match("^%s*%-%-") do
          why = why or lines[k]:lower():find("long") ~= nil
          k = k - 1
        end
        if j - i + 1 > limit and not why then
          out[#out + 1] = {line = i, n = j - i + 1, text = code:match("^%s*(.-)%s*$")}
        end
      end
    end
    return out
  end

  it("hold no function longer than ~80 lines without a reason above it", function()
    local long = {}
    for name, text in pairs(sources()) do
      for _, f in ipairs(long_functions(text, 85)) do
        long[#long + 1] = string.format("%s.lua:%d: %d lines: %s", name,
                                        f.line, f.n, f.text)
      end
    end
    table.sort(long)
    assert.same({}, long)
    -- (the scan sees what it must)
    local probe = "local function f()\n" .. ("  x()\n"):rep(90) .. "end\n"
    assert.equal(1, #long_functions(probe, 85))
    assert.equal(0, #long_functions("-- long: a reason\n" .. probe, 85))
  end)

  it("are at most 700 lines each", function()
    local long = {}
    for name, text in pairs(sources()) do
      local _, lines = text:gsub("\n", "")
      if lines > 700 then long[#long + 1] = name .. ".lua: " .. lines end
    end
    table.sort(long)
    assert.same({}, long)
  end)
end)

describe("the C files", function()
  -- text of every runtime/*.c, by file name
  local function c_sources()
    local out = {}
    local p = assert(io.popen("ls runtime/*.c"))
    for path in p:lines() do
      local f = assert(io.open(path))
      out[path:match("[^/]+$")] = f:read("a")
      f:close()
    end
    p:close()
    return out
  end

  it("call each other one way only (no pair of files calls both ways)", function()
    local src = c_sources()
    assert.is_truthy(src["queue.c"], "run from the checkout's root")
    -- where each exported luamp_ function is defined (a definition starts
    -- a line, is not static and ends its line with its body's brace)
    local defined = {}
    for file, text in pairs(src) do
      for line in text:gmatch("[^\n]+") do
        if not line:find("^static") and not line:find("^%s") then
          local name = line:match("[%w_%*%s]-%f[%w_](luamp_[%w_]+)%s*%([^;]*%)%s*{%s*$")
          if name then defined[name] = file end
        end
      end
    end
    local uses = {}
    for file, text in pairs(src) do
      uses[file] = {}
      for name in text:gmatch("%f[%w_](luamp_[%w_]+)%s*%(") do
        local d = defined[name]
        if d and d ~= file then uses[file][d] = name end
      end
    end
    local both = {}
    for a, to in pairs(uses) do
      for b, fname in pairs(to) do
        if a < b and uses[b][a] then
          both[#both + 1] = string.format("%s (%s) <-> %s (%s)", a, fname, b, uses[b][a])
        end
      end
    end
    table.sort(both)
    assert.same({}, both)
  end)
end)
