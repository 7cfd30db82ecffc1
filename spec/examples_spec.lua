-- Every script in scripts/examples/ runs and prints what it should.
local H = require "helpers"

-- example file -> {args, check(out, err, code)}
local expected = {
  ["queue_producer_consumer.lua"] = function(out)
    assert.equal("item 1: 1 squared is 1\nitem 2: 2 squared is 4\n" ..
      "item 3: 3 squared is 9\nitem 4: 4 squared is 16\n" ..
      "item 5: 5 squared is 25\nconsumer saw the end after 5 items\n" ..
      "exit codes\t0\t0\n", out)
  end,
  ["queue_add_ten.lua"] = function(out)
    assert.equal("result:\t20\n", out)
  end,
  ["shared_counter.lua"] = function(out)
    assert.equal("counter\t2000\nhits\t750 750 750 750\nsum\t1000.0\n" ..
      "atomic\t10000\n", out)
  end,
  ["event_semaphore.lua"] = function(out)
    assert.equal("event set?\tfalse\nfinished\t1 2 3 4\n" ..
      "most inside at once\t2\nevent set?\ttrue\n", out)
  end,
  ["hello.lua"] = function(out)
    assert.matches("^luamp %d+%.%d+%.%d+: %d+ CPUs, running as MainProcess %(pid %d+%)\n$", out)
  end,
  ["process_pids.lua"] = function(out)
    local a, pa, na, b, pb, nb, main = out:match(
      "^worker A: pid (%d+), parent (%d+) %((Process%-%d+)%)\n" ..
      "worker B: pid (%d+), parent (%d+) %((Process%-%d+)%)\n" ..
      "main: pid (%d+); children exited with 0 and 0\n$")
    assert.is_not_nil(a, out)
    assert.are_not.equal(a, b)
    assert.are_not.equal(a, main)
    assert.equal(main, pa)
    assert.equal(main, pb)
    assert.equal("Process-1", na)
    assert.equal("Process-2", nb)
  end,
  ["process_class.lua"] = function(out)
    local pids = {}
    local i = 0
    for num, name, pid in out:gmatch("process (%d) running in (Process%-%d+) %(pid (%d+)%)\n") do
      i = i + 1
      assert.equal(tostring(i), num)
      assert.equal("Process-" .. i, name)
      pids[pid] = true
    end
    assert.equal(3, i, out)
    assert.equal(3, #out:gsub("[^\n]", ""))
  end,
  ["cpu_bound.lua"] = function(out)
    -- the exact sums (Python: sum(i*i for i in range(n)))
    assert.matches("^sum of i%*i for i < 1000000 = 333332833333500000\n" ..
      "sum of i%*i for i < 5000000 = 41666654166667500000\n" ..
      "sum of i%*i for i < 1000000 = 333332833333500000\n" ..
      "sum of i%*i for i < 5000000 = 41666654166667500000\n", out)
    local seq = tonumber(out:match("sequential: +([%d.]+) s\n"))
    local par = tonumber(out:match("4 processes: +([%d.]+) s %(%d+ CPUs%)\n"))
    local up = tonumber(out:match("speed%-up: +([%d.]+)x\n$"))
    assert.is_not_nil(seq, out)
    assert.is_not_nil(par, out)
    assert.is_not_nil(up, out)
    -- (no timing asserted: the machine may be busy)
  end,
  ["pipe_sender_receiver.lua"] = function(out)
    -- the two processes interleave freely; each side keeps its order
    local sent, received = {}, {}
    for l in out:gmatch("[^\n]+") do
      local s = l:match("^sending:  (.*)")
      if s then sent[#sent + 1] = s end
      local r = l:match("^received: (.*)")
      if r then received[#received + 1] = r end
    end
    local msgs = {"hello", "from", "the sender", "42"}
    assert.same(msgs, sent)
    assert.same(msgs, received)
    assert.matches("receiver: end of file, the sender is done\n", out)
    assert.matches("\nsender exited with 0, receiver with 0\n$", out)
  end,
  ["manager_dict_list.lua"] = function(out)
    assert.equal('youmux snow snow\n' ..
      '{yourname = "youmux", [1] = "1", ["2"] = 2, [0.25] = false, weather = "snow"}\n' ..
      '{9, 8, 7, 16, 5, 4, 3, 2, 1, 0}\n', out)
  end,
  ["manager_workers.lua"] = function(out)
    assert.equal("shared list: {1, 2, 3}\n" ..
      "shared dict: {worker1 = 1, worker2 = 4, worker3 = 9}\n", out)
  end,
}

describe("examples", function()
  local files = {}
  for f in io.popen("ls scripts/examples/*.lua"):lines() do
    files[#files + 1] = f:match("[^/]+$")
  end

  it("all have a check here", function()
    for _, f in ipairs(files) do
      assert.is_not_nil(expected[f], "no check for scripts/examples/" .. f)
    end
  end)

  for _, f in ipairs(files) do
    if expected[f] then
      it(f .. " runs", function()
        local out, err, code = H.luamp_run("scripts/examples/" .. f)
        assert.equal(0, code, err)
        expected[f](out, err)
      end)
    end
  end
end)

-- The embedding example: a C host (built as build/examples/embed-host)
-- running a script whose Pool tasks call the host's own C function.
describe("examples/embed", function()
  -- FNV-1a, as host.checksum computes it in C
  local function fnv1a(s)
    local h = 2166136261
    for i = 1, #s do
      h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff
    end
    return h
  end

  it("host.c runs checksums.lua: a Pool whose tasks call the host's C function", function()
    local out, err, code = H.sh(H.q(H.build .. "/examples/embed-host") ..
      " scripts/examples/embed/checksums.lua alpha 'two words' '' gamma")
    assert.equal(0, code, err)
    assert.equal("", err)
    local expect = {}
    for _, w in ipairs {"alpha", "two words", "", "gamma"} do
      expect[#expect + 1] = string.format("%-8s %08x\n", w, fnv1a(w))
    end
    -- the tasks ran in the workers (other pids, where the host's at-fork
    -- child hook ran); the parent hook counted the pool's two forks
    expect[#expect + 1] = "computed by the pool's workers: true; here: main, 2 forks\n"
    assert.equal(table.concat(expect), out:match("^(.-\n)embed%-host"))
    assert.matches("\nembed%-host %d+%.%d+%.%d+: 4 words in MainProcess %(pid %d+%), " ..
                   "luamp %d+%.%d+%.%d+, %d+ CPUs\n$", out)
  end)

  it("host.c's pool leaves no process behind", function()
    -- the host's children are listed by the script itself before it ends
    local path = H.write(os.tmpname() .. ".lua", [[
      local mp = require "multiprocessing"
      local host = require "host"
      local pool = mp.Pool(2)
      local pids = {}
      for _, w in pairs(pool._workers) do pids[#pids + 1] = w.pid end
      print(table.concat(pool:map(function(w) return host.checksum(w) end,
                                  {"a", "b"}), " "))
      pool:terminate()
      print(table.concat(pids, " "))
    ]])
    local out, err, code = H.sh(H.q(H.build .. "/examples/embed-host") .. " " .. H.q(path))
    os.remove(path)
    assert.equal(0, code, err)
    assert.equal(string.format("%d %d", fnv1a("a"), fnv1a("b")), out:match("^(.-)\n"))
    local n = 0
    for pid in out:match("\n([%d ]+)\n$"):gmatch("%d+") do
      n = n + 1
      assert.is_nil(io.open("/proc/" .. pid .. "/stat"), "worker " .. pid .. " is left")
    end
    assert.equal(2, n)
  end)

  it("host.c reports a script error with a traceback and status 1", function()
    local path = H.write(os.tmpname() .. ".lua",
      "local host = require 'host'\nhost.checksum({})\n")
    local out, err, code = H.sh(H.q(H.build .. "/examples/embed-host") .. " " .. H.q(path))
    os.remove(path)
    assert.equal(1, code)
    assert.equal("", out)
    assert.matches("bad argument #1 to 'checksum' %(string expected, got table%)", err)
    assert.matches("stack traceback:", err)
  end)
end)
