-- The luamp command behaves as the stock lua5.4 interpreter does.
local H = require "helpers"

-- Runs the same arguments under lua5.4 and luamp; the program name in
-- messages is normalised.
local function both(args, stdin, env)
  local prefix = env and env .. " " or ""
  local lo, le, lc = H.sh(prefix .. "lua5.4 " .. args, stdin)
  local mo, me, mc = H.sh(prefix .. H.q(H.luamp) .. " " .. args, stdin)
  me = me:gsub(H.luamp:gsub("%p", "%%%0"), "lua5.4")
  return {out = lo, err = le, code = lc}, {out = mo, err = me, code = mc}
end

local function same(args, stdin, env)
  local l, m = both(args, stdin, env)
  assert.are.same(l, m)
  return m
end

local script
setup(function()
  script = H.write(os.tmpname() .. ".lua", [[
    print(select("#", ...), ...)
    for i = 0, #arg do io.write(tostring(arg[i]), ";") end
    print()
    print(arg[-1] ~= nil, arg[-2])
  ]])
end)
teardown(function() os.remove(script) end)

describe("luamp command line", function()
  it("passes script arguments as arg and ...", function()
    local m = same(H.q(script) .. " a 'b c' ''")
    assert.matches("^3\ta\tb c\t\n", m.out)
  end)

  it("runs -e chunks and the script in order", function()
    local m = same("-e 'x = 1' -e'x = x + 1' -e 'print(x)' " .. H.q(script) .. " z")
    assert.matches("^2\n1\tz", m.out)
  end)

  it("loads libraries with -l mod and -l g=mod", function()
    same("-l cjson -e 'print(type(cjson.encode))'")
    local m = same("-l J=cjson -e 'print(J.encode({1}), cjson)'")
    assert.equal("[1]\tnil\n", m.out)
  end)

  it("stops option handling at --", function()
    local m = same("-- -e")
    assert.equal(1, m.code)
    assert.matches("cannot open %-e", m.err)
  end)

  it("runs stdin for - with its arguments", function()
    local m = same("- x y", "print(arg[0], ...)")
    assert.equal("-\tx\ty\n", m.out)
  end)

  it("runs stdin when there is no script and stdin is not a terminal", function()
    assert.equal("42\n", same("", "print(42)").out)
  end)

  it("prints the version with -v, naming luamp and Lua", function()
    local out, _, code = H.luamp_run("-v")
    assert.equal(0, code)
    assert.matches("^luamp %d+%.%d+%.%d+ %-%- Lua 5%.4", out)
  end)

  it("honours LUA_INIT, LUA_INIT_5_4 and -E", function()
    assert.equal("init\n", same("-e ''", nil, "LUA_INIT='print(\"init\")'").out)
    assert.equal("54\n", same("-e ''", nil,
      "LUA_INIT='print(1)' LUA_INIT_5_4='print(54)'").out)
    local f = H.write(os.tmpname(), "print('from file')")
    assert.equal("from file\n", same("-e ''", nil, "LUA_INIT=@" .. f).out)
    os.remove(f)
    assert.equal("", same("-E -e ''", nil, "LUA_INIT='print(1)'").out)
    assert.equal("true\n", same("-E -e 'print(not package.path:find(\"nowhere\"))'",
      nil, "LUA_PATH='/nowhere/?.lua'").out)
  end)

  it("turns warnings on with -W", function()
    local m = same("-W -e 'warn(\"careful\")'")
    assert.matches("Lua warning: careful", m.err)
    assert.equal("", same("-e 'warn(\"quiet\")'").err)
  end)

  it("rejects bad options with the usage text and status 1", function()
    for _, args in ipairs {"-x", "-e", "-l", "-ix", "-Ex", "--x", "-e -v"} do
      local m = same(args)
      assert.equal(1, m.code)
      assert.matches("usage: lua5.4 %[options%]", m.err)
    end
  end)

  it("exits 1 with a traceback on an uncaught error", function()
    local m = same("-e 'local function f() error(\"boom\") end f()'")
    assert.equal(1, m.code)
    assert.matches("boom\nstack traceback:", m.err)
    m = same("-e 'x ='")
    assert.equal(1, m.code)
    assert.matches("unexpected symbol near <eof>", m.err)
  end)

  it("passes os.exit codes through", function()
    assert.equal(7, same("-e 'os.exit(7)'").code)
    assert.equal(0, same("-e 'os.exit(true)'").code)
    assert.equal(1, same("-e 'os.exit(false)'").code)
    assert.equal(3, same("-e 'io.write(\"x\") os.exit(3, true)'").code)
  end)

  it("prints error objects with their text and a traceback", function()
    local _, err, code = H.luamp_run(
      "-e 'error(require(\"multiprocessing\").new_error(\"ValueError\", \"bad\"))'")
    assert.equal(1, code)
    assert.matches("ValueError: bad\nstack traceback:", err)
  end)

  it("reads a transcript on stdin with -i as lua5.4 does", function()
    local input = "1+1\nx = 5\n=x\nfor i = 1, 2 do\nprint(i)\nend\n" ..
                  "error('e')\nreturn 1, 2\nlocal t = {\n}\n"
    local l, m = both("-i", input)
    assert.equal(l.out:gsub("^[^\n]*\n", ""), m.out:gsub("^[^\n]*\n", ""))
    assert.equal(l.err, m.err)
    assert.equal(0, m.code)
  end)

  it("interrupts a running script on SIGINT with status 1", function()
    local out, err, code = H.sh(H.q(H.luamp) ..
      " -e 'io.write(\"go\\n\") io.flush() while true do end' & " ..
      "pid=$!; sleep 0.3; kill -INT $pid; wait $pid")
    assert.equal("go\n", out)
    assert.equal(1, code)
    assert.matches("interrupted!", err)
  end)

  -- Sends SIGINT to a luamp script once for each "ready" line it printed
  -- (waiting for the line, at most 10 s each); returns its output and status.
  local function interrupt_each_ready(script, times)
    local f = os.tmpname()
    H.write(f, script)
    local out, err, code = H.sh(H.q(H.luamp) .. " " .. f .. " > " .. f .. ".out & " ..
      "pid=$!; for i in $(seq " .. times .. "); do t=0; " ..
      "while [ \"$(grep -c ready " .. f .. ".out)\" -lt $i ] && [ $t -lt 500 ]; " ..
      "do sleep 0.02; t=$((t+1)); done; sleep 0.05; kill -INT $pid; done; " ..
      "wait $pid; st=$?; cat " .. f .. ".out; exit $st")
    os.remove(f); os.remove(f .. ".out")
    return out, err, code
  end

  it("raises interrupted! at every SIGINT, as Python's KeyboardInterrupt", function()
    local out, err, code = interrupt_each_ready([[
      local n = 0
      for _ = 1, 3 do
        local ok, e = pcall(function()
          io.write("ready\n") io.flush()
          while true do end
        end)
        assert(not ok and e:match("interrupted!"), e)
        n = n + 1
      end
      print(n)
    ]], 3)
    assert.equal("", err)
    assert.equal("ready\nready\nready\n3\n", out)
    assert.equal(0, code)
  end)

  it("ends on a second SIGINT that finds the first not taken yet", function()
    -- the hook is the main thread's: a coroutine's busy loop never takes
    -- it, and the second Ctrl-C ends the process as in lua5.4
    local out, _, code = interrupt_each_ready([[
      coroutine.wrap(function()
        io.write("ready\nready\n") io.flush()
        while true do end
      end)()
    ]], 2)
    assert.equal("ready\nready\n", out)
    assert.equal(128 + 2, code)
  end)

  it("needs no file beside it to load multiprocessing", function()
    local dir = H.sh("mktemp -d"):gsub("\n", "")
    H.sh("cp " .. H.q(H.luamp) .. " " .. dir .. "/luamp")
    local out, err, code = H.sh("cd " .. dir .. " && LUA_PATH=/nowhere/?.lua " ..
      "LUA_CPATH=/nowhere/?.so ./luamp -e 'print(require(\"multiprocessing\").cpu_count() > 0)'")
    H.sh("rm -rf " .. dir)
    assert.equal("", err)
    assert.equal("true\n", out)
    assert.equal(0, code)
  end)
end)

describe("luamp REPL in a terminal", function()
  local term
  after_each(function() if term then term:close() end term = nil end)

  it("prints expressions, continues chunks and survives errors", function()
    term = H.terminal(H.luamp)
    term:wait_for("\n>$")
    term:type("1 + 41\n")
    term:wait_for("\n42\n>$")
    term:type("for i = 1, 2 do\n")
    term:wait_for("\n>>$")
    term:type("print('it', i) end\n")
    term:wait_for("it%s+2\n>$")
    term:type("error('oops')\n")
    term:wait_for("oops\nstack traceback:")
    term:type("=1, nil, 'x'\n")
    term:wait_for("1%s+nil%s+x\n>$")
  end)

  it("returns to the prompt on Ctrl-C, at the prompt and while running", function()
    term = H.terminal(H.luamp)
    term:wait_for("\n>$")
    term:type("half typed")
    term:send("C-c")
    term:type("print('fresh')\n")
    term:wait_for("\nfresh\n>$")
    term:type("while true do end\n")
    H.sleep(0.3)
    term:send("C-c")
    term:wait_for("interrupted!")
    term:type("print('alive')\n")
    term:wait_for("alive\n>$")
    term:send("C-d")
  end)

  it("takes every Ctrl-C while a chunk runs", function()
    term = H.terminal(H.luamp)
    term:wait_for("\n>$")
    term:type("for i = 1, 2 do print('caught', i, pcall(function() while true do end end)) end\n")
    H.sleep(0.3)
    term:send("C-c")
    term:wait_for("caught%s+1%s+false%s+[^\n]*interrupted!")
    H.sleep(0.2)
    term:send("C-c")
    term:wait_for("caught%s+2%s+false%s+[^\n]*interrupted!\n>$")
    term:type("print('alive')\n")
    term:wait_for("alive\n>$")
    term:send("C-d")
  end)
end)
