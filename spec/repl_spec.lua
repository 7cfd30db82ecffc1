-- The REPL: what it prints and completes (multiprocessing.repl), and the
-- real thing driven in a terminal (tmux): editing, history, completion,
-- multi-line chunks, pretty printing, Ctrl-C and Ctrl-D.
local H = require "helpers"
local R = require "multiprocessing.repl"

local function contains(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end

describe("repl.pretty", function()
  it("prints sequences first, then keys sorted by type and value", function()
    local t = {10, 20, 30, zeta = 1, alpha = "a", [2.5] = true, [-1] = 0,
               ["not a name"] = 2, ["end"] = 3, [false] = 4}
    assert.equal('{10, 20, 30, [-1] = 0, [2.5] = true, alpha = "a", ' ..
                 '["end"] = 3, ["not a name"] = 2, zeta = 1, [false] = 4}',
                 R.pretty(t, {width = 200}))
  end)

  it("nests tables and quotes strings readably", function()
    assert.equal('{a = {b = {c = "x\\ny\\0"}}, list = {1, {2, {3}}}}',
                 R.pretty({a = {b = {c = "x\ny\0"}}, list = {1, {2, {3}}}}))
    assert.equal("{}", R.pretty({}))
    assert.equal("{1.0, 0/0, math.huge, -math.huge}",
                 R.pretty({1.0, 0/0, math.huge, -math.huge}))
  end)

  it("marks cycles with the path to the table they return to", function()
    local t = {name = "root", child = {}}
    t.self = t
    t.child.parent = t
    t.child.me = t.child
    assert.equal('{child = {me = <cycle: @.child>, parent = <cycle: @>}, ' ..
                 'name = "root", self = <cycle: @>}', R.pretty(t, {width = 200}))
    -- a table seen twice but not inside itself is printed twice
    local shared = {1}
    assert.equal("{{1}, {1}}", R.pretty({shared, shared}))
  end)

  it("stops at the depth limit and after the item limit", function()
    local deep = {{{{{"bottom"}}}}}
    assert.equal("{{{...}}}", R.pretty(deep, {depth = 2}))
    assert.equal('{{{{{"bottom"}}}}}', R.pretty(deep))
    local big = {}
    for i = 1, 250 do big[i] = i end
    big.extra = true
    local s = R.pretty(big, {width = 10000})
    assert.matches("^{1, 2, 3, .*, 100, %.%.%. %(151 more%)}$", s)
    assert.equal("{1, 2, ... (1 more)}", R.pretty({1, 2, 3}, {items = 2}))
  end)

  it("breaks what does not fit the width over indented lines", function()
    local t = {list = {}, name = "worker"}
    for i = 1, 30 do t.list[i] = i * 1000 end
    local s = R.pretty(t, {width = 40})
    local lines = {}
    for l in s:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal("{", lines[1])
    assert.equal("  list = {", lines[2])
    assert.equal("    1000, 2000, 3000, 4000, 5000, 6000,", lines[3])
    assert.equal('  name = "worker"', lines[#lines - 1])
    assert.equal("}", lines[#lines])
    for _, l in ipairs(lines) do assert.is_true(#l <= 40, l) end
  end)

  it("uses __tostring where a table has one and tostring for the rest", function()
    local obj = setmetatable({}, {__tostring = function() return "<obj>" end})
    assert.equal("<obj>", R.pretty(obj))
    assert.equal("{<obj>}", R.pretty({obj}))
    local err = require("multiprocessing").new_error("ValueError", "bad")
    assert.equal("{ValueError: bad}", R.pretty({err}))
    assert.matches("^{function: ", R.pretty({print}))
    assert.matches("^{file %(0x", R.pretty({io.stdout}))
  end)
end)

describe("repl.complete", function()
  local env = {
    print = print, pairs = pairs, prefix_one = 1, prefix_two = {},
    tbl = {alpha = 1, alps = function() end, beta = {gamma = 1}, [1] = "x"},
    s = "text", f = io.stdout,
    mp = require "multiprocessing",
  }
  local Base = {}
  Base.__index = Base
  function Base:push() end
  local Derived = setmetatable({}, {__index = Base})
  Derived.__index = Derived
  function Derived:pull() end
  env.obj = setmetatable({field = 1}, Derived)

  it("completes globals and keywords", function()
    assert.same({"prefix_one", "prefix_two"}, R.complete("pre", env))
    assert.same({"print("}, R.complete("pri", env))
    assert.same({"f", "false", "for", "function"}, R.complete("f", env))
    assert.same({"return"}, R.complete("ret", env))
  end)

  it("completes table fields, nested too", function()
    assert.same({"tbl.alpha", "tbl.alps("}, R.complete("tbl.al", env))
    assert.same({"tbl.beta.gamma"}, R.complete("tbl.beta.g", env))
    assert.same({}, R.complete("tbl.nothing.x", env))
  end)

  it("completes the module's lazily loaded names without loading them", function()
    local mp = env.mp
    local r = R.complete("mp.", env)
    for _, name in ipairs(mp.names()) do
      assert.is_true(contains(r, "mp." .. name) or contains(r, "mp." .. name .. "("),
                     name)
    end
    assert.is_true(contains(R.complete("mp.cur", env), "mp.current_process") or
                   contains(R.complete("mp.cur", env), "mp.current_process("))
  end)

  it("completes methods after ':' through the metatable's __index", function()
    assert.same({"f:write("}, R.complete("f:wr", env))
    assert.same({"s:upper("}, R.complete("s:up", env))
    assert.same({"obj:pull(", "obj:push("}, R.complete("obj:pu", env))
    -- ':' offers functions only; '.' offers fields too
    assert.same({}, R.complete("obj:fie", env))
    assert.same({"obj.field"}, R.complete("obj.fie", env))
  end)

  it("returns nothing for what is not a name path", function()
    for _, w in ipairs {"1.", "a..b", "x:y.z", "'str'.", ".", ":", "nil.", "a b"} do
      assert.same({}, R.complete(w, env), w)
    end
  end)

  it("never calls functions, only __index", function()
    local called = false
    env.trap = setmetatable({}, {__index = function(_, k)
      if k == "inner" then return {deep = 1} end
    end, __call = function() called = true end})
    assert.same({"trap.inner.deep"}, R.complete("trap.inner.d", env))
    env.bad = setmetatable({}, {__index = function() error("boom") end})
    assert.same({}, R.complete("bad.x.y", env))
    assert.is_false(called)
  end)
end)

-- ---- in a terminal ------------------------------------------------------

local term, home
local function start(opts)
  opts = opts or {}
  home = H.sh("mktemp -d"):gsub("\n", "")
  local bin = opts.bin or H.luamp
  -- the shell stays after luamp ends, to show its exit status; it ignores
  -- Ctrl-C itself (the terminal sends it to the whole foreground group)
  term = H.terminal(string.format(
    "env HOME=%s LANG=C.UTF-8 sh -c 'trap : INT; %s; echo \"[exit $?]\"; sleep 60'",
    home, bin))
  term:wait_for("\n>$")
  return term
end

local function restart()
  term:close()
  term = H.terminal(string.format(
    "env HOME=%s LANG=C.UTF-8 sh -c 'trap : INT; %s; echo \"[exit $?]\"; sleep 60'",
    home, H.luamp))
  term:wait_for("\n>$")
end

-- Types a line and waits until the REPL has taken it and shows the next
-- prompt, with the output matching the pattern `output` in between (none
-- by default) -- so that nothing is typed ahead of a prompt.
local function enter(text, output)
  term:type(text .. "\n")
  local echo = text:gsub("%s+$", ""):gsub("%p", "%%%0")
  return term:wait_for("\n>>? ?" .. echo .. "\n" ..
                       (output and output .. "\n" or "") .. ">>?$")
end

-- The children of pid: their pids (sorted) and how many are zombies.
local function children(pid)
  local out = H.sh("env -u LD_PRELOAD ps -o pid=,stat= --ppid " .. pid)
  local pids, zombies = {}, 0
  for child, stat in out:gmatch("(%d+)%s+(%S+)") do
    pids[#pids + 1] = tonumber(child)
    if stat:sub(1, 1) == "Z" then zombies = zombies + 1 end
  end
  table.sort(pids)
  return pids, zombies
end

local function gone(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return true end
  local s = f:read("a")
  f:close()
  return s:match("^%d+ %b() (%a)") == "Z"
end

-- The REPL's pid, asked at the prompt (mp must be loaded).
local function repl_pid()
  local screen = enter("='pid ' .. mp.current_process().pid", "pid %d+")
  return assert(tonumber(screen:match("pid (%d+)\n>$")))
end

H.once(describe, "REPL in a terminal", function()
  after_each(function()
    if term then term:close() end
    if home then H.sh("rm -rf " .. H.q(home)) end
    term, home = nil, nil
  end)

  it("recalls history across sessions from ~/.luamp_history", function()
    start()
    enter("x = 6 * 7")
    enter("   ")                          -- blank: not remembered
    enter("print('first session')", "first session")
    enter("print('first session')", "first session")  -- repeat: once
    term:send("C-d")
    term:wait_for("%[exit 0%]")
    local hist = H.slurp(home .. "/.luamp_history")
    assert.matches("x\\040=\\0406\\040%*\\0407", hist)
    local _, n = hist:gsub("first\\040session", "")
    assert.equal(1, n)
    assert.equal("-rw-------", H.sh("stat -c %A " .. H.q(home .. "/.luamp_history")):sub(1, 10))
    restart()
    term:send("Up")
    term:wait_for("\n> print%('first session'%)$")
    term:send("Up")
    term:wait_for("\n> x = 6 %* 7$")
    term:send("Enter")
    term:type("x\n")
    term:wait_for("\n42\n>$")
  end)

  it("edits the line: cursor keys, Ctrl-A/Ctrl-E, UTF-8 text", function()
    start()
    term:type("rint('ok')")
    term:send("C-a")
    term:type("p")
    term:send("C-e")
    term:send("Left")
    term:type(", 'é✓'")
    term:send("Enter")
    term:wait_for("\nok%s+é✓\n>$")
    term:type("#'é✓'\n")
    term:wait_for("\n5\n>$")
  end)

  it("completes globals, fields, module names and methods with Tab", function()
    start()
    enter("mp = require 'multiprocessing'")
    term:type("mp.cpu_c")
    term:send("Tab")
    term:wait_for("\n> mp%.cpu_count%($")
    term:type(") > 0\n")
    term:wait_for("\ntrue\n>$")
    enter("q = io.stdout")
    term:type("q:wr")
    term:send("Tab")
    term:wait_for("\n> q:write%($")
    term:type("'written\\n')\n")
    term:wait_for("\nwritten\nfile %(0x%x+%)\n>$")
    term:type("mp.")
    term:send("Tab")
    term:send("Tab")              -- second Tab lists the candidates
    local s = term:wait_for("mp%.current_process.*\n> mp%.$")
    assert.matches("mp%.cpu_count%(", s)
    assert.matches("mp%.active_children", s)
    term:send("C-u")
    term:type("collectgarb")
    term:send("Tab")
    term:wait_for("\n> collectgarbage%($")
  end)

  it("continues chunks with >>, prints several results and pretty tables", function()
    start()
    enter("function fact(n)")
    assert.matches("\n>>$", term:screen())
    enter("if n <= 1 then return 1 end")
    assert.matches("\n>>$", term:screen())
    enter("return n * fact(n - 1) end")
    assert.matches("\n>$", term:screen())
    enter("fact(5), 'five', nil", "120%s+five%s+nil")
    enter("t = {3, 2, 1, name = 'x', nested = {k = true}}; t.me = t")
    term:type("t\n")
    term:wait_for('\n{3, 2, 1, me = <cycle: @>, name = "x", nested = {k = true}}\n>$')
    term:type("=t.nested\n")
    term:wait_for("\n{k = true}\n>$")
  end)

  it("types functions that survive the codec, as Pool tasks will need", function()
    start()
    enter("mp = require 'multiprocessing'")
    enter("k = 3")
    enter("function triple(x) return x * k end")
    enter("copy = mp.decode(mp.encode(triple), {trusted = true})")
    enter("copy(14), copy ~= triple", "42%s+true")
  end)

  it("prints errors with a traceback and stays", function()
    start()
    term:type("local function f() error('deep') end f()\n")
    term:wait_for("stdin:1: deep\nstack traceback:.*\n>$")
    term:type("error(require('multiprocessing').new_error('ValueError', 'bad'))\n")
    term:wait_for("ValueError: bad\nstack traceback:.*\n>$")
    term:type("x = = 1\n")
    term:wait_for("unexpected symbol near '='\n>$")
    enter("print('still here')", "still here")
    term:wait_for("\nstill here\n>$")
  end)

  it("drops the chunk on Ctrl-C at either prompt and interrupts a running one", function()
    start()
    enter("for i = 1, 3 do")
    term:send("C-c")
    term:wait_for("\n>$")
    term:type("print('after')\n")          -- not glued to the dropped chunk
    term:wait_for("\nafter\n>$")
    term:type("t = {}; for i = 1, 1e9 do t[i % 100 + 1] = {i} end\n")
    H.sleep(0.3)
    term:send("C-c")
    term:wait_for("interrupted!\nstack traceback:.*\n>$")
    term:type("print('alive')\n")
    term:wait_for("\nalive\n>$")
    term:send("C-c")
    term:send("C-c")                       -- repeated Ctrl-C at the prompt
    term:type("1 + 1\n")
    term:wait_for("\n2\n>$")
  end)

  it("exits on Ctrl-D with status 0", function()
    start()
    term:type("x = 1")
    term:send("C-u")
    term:send("C-d")
    term:wait_for("%[exit 0%]")
  end)

  it("interrupts q:get() and p:join() with Ctrl-C and keeps both usable", function()
    start()
    enter("mp = require 'multiprocessing'")
    enter("q = mp.Queue()")
    term:type("q:get()\n")
    H.sleep(0.3)
    term:send("C-c")
    term:wait_for("interrupted!\nstack traceback:.*\n>$")
    enter("q:put(5)")
    enter("=q:get()", "5")
    enter("p = mp.Process{target = function() require('multiprocessing.core').sleep(30) end}")
    enter("p:start()")
    term:type("p:join()\n")
    H.sleep(0.3)
    term:send("C-c")
    -- the terminal's Ctrl-C reaches the child too (as in Python): it ends
    -- with "interrupted!" and status 1, and the REPL joins it cleanly
    term:wait_for("interrupted!\nstack traceback:.*\n>.*")
    term:type("p:join(); print('exit', p.exitcode)\n")
    term:wait_for("\nexit%s+1\n>$")
  end)

  it("runs functions typed at the prompt as Process targets", function()
    start()
    enter("mp = require 'multiprocessing'")
    enter("q = mp.Queue()")
    enter("function work(x) q:put(x * 2) end")
    enter("p = mp.Process{target = work, args = {21}}; p:start(); p:join()")
    enter("=q:get(), p.exitcode", "42%s+0")
  end)

  it("leaves no child behind on Ctrl-D", function()
    start()
    enter("mp = require 'multiprocessing'")
    enter("p = mp.Process{target = function() require('multiprocessing.core').sleep(60) end, daemon = true}")
    enter("p:start()")
    local screen = enter("='pid ' .. p.pid", "pid %d+")
    local pid = assert(tonumber(screen:match("pid (%d+)\n>$")))
    assert.equal(0, select(3, H.sh("kill -0 " .. pid)))
    term:send("C-d")
    term:wait_for("%[exit 0%]")
    assert.is_truthy(H.eventually(function()
      return select(3, H.sh("kill -0 " .. pid)) ~= 0
    end, 5))
  end)

  it("interrupts a long pool:map with Ctrl-C: its work stops, the pool goes on", function()
    start()
    enter("mp = require 'multiprocessing'; core = require 'multiprocessing.core'")
    enter("ran = mp.Value('q', 0)")    -- (globals the workers see: set before the pool)
    enter("pool = mp.Pool(2)")
    local pid = repl_pid()
    local workers, zombies = children(pid)
    assert.equal(2, #workers)
    -- 400 items of 50 ms on 2 workers: ten seconds of work
    term:type("r = pool:map(function(x) core.sleep(0.05) ran:add(1) return x end, " ..
              "(function() local t = {} for i = 1, 400 do t[i] = i end return t end)(), 5)\n")
    H.sleep(0.6)
    term:send("C-c")
    term:wait_for("interrupted!\nstack traceback:.*\n>$")
    -- the workers that were running its chunks were killed, reaped and
    -- replaced: two live children, no zombie, none orphaned
    local now_workers
    now_workers, zombies = children(pid)
    assert.equal(2, #now_workers)
    assert.equal(0, zombies)
    for _, w in ipairs(workers) do
      if not contains(now_workers, w) then assert.is_true(gone(w), "worker " .. w) end
    end
    -- nothing of the interrupted map runs any more
    enter("n = ran.value")
    H.sleep(0.3)
    enter("=n > 0 and n < 400, ran.value - n", "true%s+0")
    -- and the pool serves the next call at once, with the right results
    enter("=table.concat(pool:map(function(x) return x * x end, {1, 2, 3}), ',')", "1,4,9")
    enter("=pool", "<Pool state=RUN pool_size=2>")
    workers = children(pid)
    term:send("C-d")
    term:wait_for("%[exit 0%]")
    for _, w in ipairs(workers) do
      assert.is_truthy(H.eventually(function() return gone(w) end, 5), "worker " .. w)
    end
  end)

  it("runs functions typed at the prompt as Pool tasks; Ctrl-D leaves no worker", function()
    start()
    enter("mp = require 'multiprocessing'")
    enter("pool = mp.Pool(2)")
    enter("function sq(x) return x * x end")
    enter("=table.concat(pool:map(sq, {1, 2, 3, 4}), ' ')", "1 4 9 16")
    -- a local of the same chunk is an upvalue: it travels with the function
    enter("local k = 3; f = function(x) return x + k end")
    enter("=table.concat(pool:map(f, {1, 2, 3}), ' ')", "4 5 6")
    -- a function typed over several lines
    term:type("function cube(x)\n")
    term:wait_for("\n>>$")
    enter("return x * x * x end")
    enter("=table.concat(pool:map(cube, {1, 2, 3}), ' ')", "1 8 27")
    -- one that calls a function typed before, through an upvalue (the
    -- global sq was set after the pool forked its workers: they have none)
    enter("local sq = sq; g = function(a, b) return sq(a) + b end")
    enter("=table.concat(pool:starmap(g, {{1, 10}, {2, 20}, {3, 30}}), ' ')", "11 24 39")
    enter("=pool:apply(function(...) return select('#', ...), ... end, {7, 8})", "2%s+7%s+8")
    local pid = repl_pid()
    local workers = children(pid)
    assert.equal(2, #workers)
    term:send("C-d")
    term:wait_for("%[exit 0%]")
    for _, w in ipairs(workers) do
      assert.is_truthy(H.eventually(function() return gone(w) end, 5), "worker " .. w)
    end
  end)

  it("follows _PROMPT and _PROMPT2", function()
    start()
    term:type("_PROMPT, _PROMPT2 = 'lua% ', '...  '\n")
    term:wait_for("'%.%.%.  '\nlua%%$")
    term:type("do\n")
    term:wait_for("\n%.%.%.$")
    term:type("end\n")
    term:wait_for("\nlua%%$")
  end)

  it("works without libedit: plain lines, no history file", function()
    start({bin = H.build .. "/tests/luamp-noedit"})
    enter("for i = 1, 2 do")
    term:type("print(i * 10) end\n")
    term:wait_for("\n20\n>$")
    term:type("{1, {2}}\n")
    term:wait_for("\n{1, {2}}\n>$")
    term:type("half")
    term:send("C-c")
    term:type("print('fresh')\n")
    term:wait_for("\nfresh\n>$")
    term:send("C-d")
    term:wait_for("%[exit 0%]")
    assert.is_nil(io.open(home .. "/.luamp_history"))
  end)
end)

H.once(describe, "REPL on a pipe", function()
  it("prints as lua5.4 does: no pretty printing, no history", function()
    local home = H.sh("mktemp -d"):gsub("\n", "")
    local out, _, code = H.luamp_run("-i", "{1, 2}\n'str'\n", "HOME=" .. H.q(home))
    assert.equal(0, code)
    assert.matches("\n> {1, 2}\ntable: 0x%x+\n> 'str'\nstr\n> \n$", out)
    assert.is_nil(io.open(home .. "/.luamp_history"))
    H.sh("rm -rf " .. H.q(home))
  end)

  it("reports a chunk cut short by the end of input", function()
    local out, err, code = H.luamp_run("-i", "for i = 1, 2 do\n")
    local lout = H.sh("lua5.4 -i", "for i = 1, 2 do\n")
    assert.equal(0, code)
    assert.equal(lout:gsub("^[^\n]*\n", ""), out:gsub("^[^\n]*\n", ""))
    -- lua5.4 (5.4.4) prints "(null)" here; luamp says what is wrong
    assert.equal("stdin:1: 'end' expected near <eof>\n", err)
  end)
end)

-- issue 13 item 18
describe("repl.complete hides private names", function()
  it("offers an object's _ methods and fields only when asked for", function()
    local Cls = {}
    Cls.__index = Cls
    function Cls:run() end
    function Cls:_pump() end
    local env = {obj = setmetatable({_state = 1, size = 2}, Cls), _G = _G,
                 _VERSION = _VERSION}
    assert.same({"obj:run("}, R.complete("obj:", env))
    assert.same({"obj.run(", "obj.size"}, R.complete("obj.", env))
    assert.same({"obj:_pump("}, R.complete("obj:_", env))
    assert.same({"obj.__index", "obj._pump(", "obj._state"}, R.complete("obj._", env))
    -- globals named with "_" are Lua's own, offered as before
    assert.same({"_G", "_VERSION"}, R.complete("_", env))
  end)

  it("a Pool offers only its public methods", function()
    local mp = require "multiprocessing"
    local pool <close> = mp.Pool(1)
    local got = R.complete("pool:", {pool = pool})
    assert.is_true(contains(got, "pool:map("), table.concat(got, " "))
    for _, c in ipairs(got) do assert.is_nil(c:find(":_", 1, true), c) end
  end)
end)
