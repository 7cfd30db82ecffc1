-- The argument fuzzer (issue 13 item 4): every public constructor and
-- method that takes numbers, called with NaN, +-inf, 2^63, the extreme
-- integers, huge sizes, negative counts and wrong types.  Each must raise
-- a clear error (a Lua argument error naming the call, or one of the
-- contract's error objects), never crash, never hang, never take memory
-- without bound.  Each case runs in a forked child with a time limit: a
-- crash or a hang is a failure of the case, not of the runner.
local core = require "multiprocessing.core"
local mp = require "multiprocessing"

local NaN, inf = 0 / 0, math.huge
local MININT, MAXINT = math.mininteger, math.maxinteger
-- floats with no integer representation
local NONINT = {NaN, inf, -inf, 2 ^ 63, -2 ^ 64, 1.5}
local function join(...)
  local t = {}
  for _, l in ipairs{...} do
    for _, v in ipairs(l) do t[#t + 1] = v end
  end
  return t
end
local NEG = {-1, MININT}
local WRONG = {"x", true}          -- ({} is an options table for most)
local INT_BAD = join(NONINT, WRONG)
local TIMEOUT_BAD = {NaN, "x", true, {}}
local LIMIT = 10                   -- seconds a case may take

local function describe_value(v)
  if v ~= v then return "NaN" end
  if type(v) == "string" then return string.format("%q", v) end
  if math.type(v) == "integer" and (v == MININT or v == MAXINT) then
    return v == MININT and "math.mininteger" or "math.maxinteger"
  end
  return tostring(v)
end

-- Whether err is a clear error: an argument error naming the call, or an
-- error object of the contract with a kind and a message.
local function clear(err)
  if type(err) == "table" then
    return type(err.kind) == "string" and type(err.message) == "string" and
           err.message ~= "" and err.message ~= "nil"
  end
  return type(err) == "string" and
         (err:find("bad argument #%d+ to '[%w_]+'") ~= nil or
          err:find("Array index") ~= nil or
          err:find("cannot set field") ~= nil)
end

-- Runs f(v) for each v of values in one forked child; returns, for each
-- value, "raised: <message>", "clear", "returned" or what became of the
-- child ("crashed (signal 11)", "hung").
local function run_case(f, values, must_raise, loose)
  local r, w = mp.Pipe(false)
  io.stdout:flush()
  local pid = core.fork()
  if pid == 0 then
    r:close()
    for i, v in ipairs(values) do
      local ok, err = pcall(f, v)
      local what
      if ok then what = "returned"
      elseif clear(err) or loose then what = "clear"
      else what = "unclear error: " .. tostring(err) end
      w:send({i, what})
    end
    core._exit(0)
  end
  w:close()
  local out, deadline = {}, core.now() + LIMIT
  local done = 0
  while done < #values do
    local left = deadline - core.now()
    if left <= 0 or not r:poll(left) then break end
    local ok, m = pcall(r.recv, r)
    if not ok then break end     -- EOF: the child is gone
    out[m[1]] = m[2]
    done = m[1]
  end
  local code = core.waitpid(pid, true)
  local fate
  if code == nil then
    core.kill(pid, "SIGKILL")
    core.waitpid(pid)
    fate = "hung"
  elseif code ~= 0 then
    fate = code < 0 and "crashed (signal " .. -code .. ")" or "exit " .. code
  end
  r:close()
  for i = 1, #values do
    if out[i] == nil then out[i] = fate or "no answer" end
    if out[i] == "returned" and not must_raise then out[i] = "clear" end
  end
  return out
end

local function check(cases, must_raise)
  local bad, n = {}, 0
  for _, c in ipairs(cases) do
    local res = run_case(c[2], c[3], must_raise, c.loose)
    for i, v in ipairs(c[3]) do
      n = n + 1
      if res[i] ~= "clear" then
        bad[#bad + 1] = string.format("%s with x = %s: %s", c[1],
                                      describe_value(v), res[i])
      end
    end
  end
  return bad, n
end

local function sq(x) return x * x end
local function in_pool(f)
  return function(x)
    local pool <close> = mp.Pool(1)
    return f(pool, x)
  end
end

describe("bad numbers and wrong types", function()
  local v, a = mp.Value("i", 1), mp.Array("i", 4)
  local sm = mp.SharedMemory{create = true, size = 64}
  local q, jq = mp.Queue(), mp.JoinableQueue()
  local l, sem, ev = mp.Lock(), mp.Semaphore(0), mp.Event()
  local cond, bar = mp.Condition(), mp.Barrier(2)
  local c1, c2 = mp.Pipe()
  teardown(function()
    sm:close()
    sm:unlink()
  end)

  it("raise a clear error from every constructor and method", function()
    -- (loose: must raise, but the map family's "bad option table for
    -- map" at pool.lua is not yet an argument error naming the call at
    -- the caller's line: issue 13 item 12's work)
    local cases = {
      {"Value('i', x)", function(x) return mp.Value("i", x) end,
       join(INT_BAD, {2 ^ 31, -2 ^ 31 - 1, MININT, MAXINT})},
      {"Value('B', x)", function(x) return mp.Value("B", x) end,
       join(INT_BAD, {-1, 256})},
      {"Value('d', x)", function(x) return mp.Value("d", x) end, WRONG},
      {"Value(x, 1)", function(x) return mp.Value(x, 1) end,
       {NaN, 1, "", "ii", "z", true}},
      {"Array('i', x)", function(x) return mp.Array("i", x) end,
       join(INT_BAD, NEG, {MAXINT, 1 << 40})},
      {"a[x]", function(x) return a[x] end, join(NONINT, NEG, {0, 6, MAXINT})},
      {"a[x] = 1", function(x) a[x] = 1 end,
       join(NONINT, NEG, {0, 5, MAXINT}, WRONG)},
      {"a[1] = x", function(x) a[1] = x end,
       join(INT_BAD, {2 ^ 31, MININT, MAXINT})},
      {"a:totable(1, x)", function(x) return a:totable(1, x) end, INT_BAD},
      {"v.value = x", function(x) v.value = x end, join(INT_BAD, {MAXINT})},
      {"v:add(x)", function(x) return v:add(x) end, join(INT_BAD, {MAXINT})},
      {"v:acquire(true, x)", function(x) return v:acquire(true, x) end,
       TIMEOUT_BAD},
      {"SharedMemory{size = x}", function(x)
         return mp.SharedMemory{create = true, size = x}
       end, join(INT_BAD, NEG, {0})},
      {"shm:read(x)", function(x) return sm:read(x) end,
       join(INT_BAD, NEG, {65, MAXINT})},
      {"shm:read(0, x)", function(x) return sm:read(0, x) end,
       join(INT_BAD, NEG, {65, MAXINT})},
      {"shm:write(x, 'ab')", function(x) return sm:write(x, "ab") end,
       join(INT_BAD, NEG, {63, MAXINT})},
      {"Queue(x)", function(x) return mp.Queue(x) end, join(INT_BAD, NEG)},
      {"Queue{capacity = x}", function(x) return mp.Queue{capacity = x} end,
       join(INT_BAD, NEG, {MAXINT, 1 << 41})},
      {"Queue{slots = x}", function(x) return mp.Queue{slots = x} end,
       join(INT_BAD, NEG, {MAXINT, 1 << 40})},
      {"JoinableQueue(x)", function(x) return mp.JoinableQueue(x) end,
       join(INT_BAD, NEG)},
      {"q:get(true, x)", function(x) return q:get(true, x) end, TIMEOUT_BAD},
      {"q:put(1, true, x)", function(x) return q:put(1, true, x) end,
       TIMEOUT_BAD},
      {"q:get(x)", function(x) return q:get(x) end, {NaN, 1, "x", {}}},
      {"jq:join(x)", function(x) return jq:join(x) end, TIMEOUT_BAD},
      {"Semaphore(x)", function(x) return mp.Semaphore(x) end,
       join(INT_BAD, NEG, {MAXINT, 1 << 32})},
      {"BoundedSemaphore(x)", function(x) return mp.BoundedSemaphore(x) end,
       join(INT_BAD, NEG, {MAXINT, 1 << 32})},
      {"sem:acquire(true, x)", function(x) return sem:acquire(true, x) end,
       TIMEOUT_BAD},
      {"l:acquire(true, x)", function(x) return l:acquire(true, x) end,
       TIMEOUT_BAD},
      {"ev:wait(x)", function(x) return ev:wait(x) end, TIMEOUT_BAD},
      {"cond:wait(x)", function(x)
         cond:acquire()
         return cond:wait(x)
       end, TIMEOUT_BAD},
      {"cond:wait_for(pred, x)", function(x)
         cond:acquire()
         return cond:wait_for(function() return false end, x)
       end, TIMEOUT_BAD},
      {"cond:notify(x)", function(x)
         cond:acquire()
         return cond:notify(x)
       end, INT_BAD},
      {"Barrier(x)", function(x) return mp.Barrier(x) end,
       join(INT_BAD, NEG, {0, MAXINT, (1 << 20) + 1})},
      {"Barrier(2, nil, x)", function(x) return mp.Barrier(2, nil, x) end,
       {NaN, "x", true}},
      {"barrier:wait(x)", function(x) return bar:wait(x) end, TIMEOUT_BAD},
      {"conn:poll(x)", function(x) return c1:poll(x) end, TIMEOUT_BAD},
      {"conn:recv_bytes(x)", function(x) return c1:recv_bytes(x) end,
       join(INT_BAD, NEG)},
      {"conn:send_bytes('abc', x)", function(x)
         return c1:send_bytes("abc", x)
       end, join(INT_BAD, NEG, {4, MAXINT})},
      {"conn:send_bytes('abc', 0, x)", function(x)
         return c1:send_bytes("abc", 0, x)
       end, join(INT_BAD, NEG, {4, MAXINT})},
      {"mp.wait({conn}, x)", function(x) return mp.wait({c1}, x) end, {NaN}},
      {"mp.Ext(x, 'a')", function(x) return mp.Ext(x, "a") end,
       join(INT_BAD, {-129, 128, MININT, MAXINT})},
      {"Pool(x)", function(x) return mp.Pool(x) end,
       join(INT_BAD, NEG, {0, 4097, MAXINT})},
      {"Pool{maxtasksperchild = x}", function(x)
         return mp.Pool{processes = 1, maxtasksperchild = x}
       end, join(INT_BAD, NEG, {0})},
      {"pool:map(f, t, x)", in_pool(function(pool, x)
         return pool:map(sq, {1, 2, 3}, x)
       end), join(NONINT, NEG, {0}, WRONG), loose = true},
      {"pool:map(f, t, {timeout = x})", in_pool(function(pool, x)
         return pool:map(sq, {1, 2, 3}, {timeout = x})
       end), {NaN, -1, -inf, "x", true}},
      {"pool:imap(f, t, x)", in_pool(function(pool, x)
         for _ in pool:imap(sq, {1, 2, 3}, x) do end
       end), join(NONINT, NEG, {0}, WRONG), loose = true},
      {"pool:imap_unordered(f, t, x)", in_pool(function(pool, x)
         for _ in pool:imap_unordered(sq, {1, 2, 3}, x) do end
       end), join(NONINT, NEG, {0}, WRONG), loose = true},
      {"pool:starmap(f, t, x)", in_pool(function(pool, x)
         return pool:starmap(sq, {{1}, {2}}, x)
       end), join(NONINT, NEG, {0}, WRONG), loose = true},
      {"r:get(x)", in_pool(function(pool, x)
         return pool:apply_async(core.sleep, {30}):get(x)
       end), {NaN}},
      {"r:wait(x)", in_pool(function(pool, x)
         return pool:apply_async(core.sleep, {30}):wait(x)
       end), {NaN}},
      {"p:join(x)", function(x)
         local p = mp.Process{target = core.sleep, args = {30}}
         p:start()
         local ok, err = pcall(p.join, p, x)
         p:kill()
         p:join()
         if not ok then error(err, 0) end
       end, TIMEOUT_BAD},
      {"Listener:accept(x)", function(x)
         local path = os.tmpname()
         os.remove(path)
         local listener <close> = mp.connection.Listener(path)
         return listener:accept(x)
       end, TIMEOUT_BAD},
      -- 2^37 doubles: 1 TiB of (sparse) shared memory, more than a Lua
      -- table holds (it grew a table until memory ran out)
      {"RawArray('d', 2^37):totable(1, x)", function(x)
         return mp.RawArray("d", 1 << 37):totable(1, x)
       end, {MAXINT, 1 << 37, (1 << 31) + 1}},
      {"RawArray('d', 2^37):totable()", function()
         return mp.RawArray("d", 1 << 37):totable()
       end, {"(none)"}},
    }
    local bad, n = check(cases, true)
    assert.is_true(n > 300, "only " .. n .. " calls")
    assert.same({}, bad)
  end)

  -- Timeouts below zero mean "do not wait" (Python's); huge sizes of
  -- what Lua cannot hold are refused at once.
  it("never hang or take memory without bound", function()
    local past = {-1, -inf, MININT, -1e300}
    local cases = {
      {"q:get(true, x)", function(x) return q:get(true, x) end, past},
      {"sem:acquire(true, x)", function(x) return sem:acquire(true, x) end, past},
      {"ev:wait(x)", function(x) return ev:wait(x) end, past},
      {"cond:wait(x)", function(x)
         cond:acquire()
         return cond:wait(x)
       end, past},
      {"barrier:wait(x)", function(x) return bar:wait(x) end, past},
      {"conn:poll(x)", function(x) return c2:poll(x) end, past},
      {"jq:join(x)", function(x)
         jq:put(1)
         return jq:join(x)
       end, past},
      {"mp.wait({conn}, x)", function(x) return mp.wait({c2}, x) end, past},
      {"r:wait(x)", in_pool(function(pool, x)
         return pool:apply_async(core.sleep, {30}):wait(x)
       end), past},
      {"Listener:accept(x)", function(x)
         local path = os.tmpname()
         os.remove(path)
         local listener <close> = mp.connection.Listener(path)
         return listener:accept(x)
       end, past},
      -- a chunksize beyond any input is one chunk (it overflowed: no feed)
      {"pool:imap(f, {1, 2, 3}, x) has 3 results", in_pool(function(pool, x)
         local got = {}
         for _, y in pool:imap(sq, {1, 2, 3}, x) do got[#got + 1] = y end
         assert(#got == 3 and got[3] == 9, "wrong results")
       end), {MAXINT, 1 << 62}},
      {"pool:imap_unordered(f, {1, 2, 3}, x) has 3 results",
       in_pool(function(pool, x)
         local n = 0
         for _ in pool:imap_unordered(sq, {1, 2, 3}, x) do n = n + 1 end
         assert(n == 3, "wrong results")
       end), {MAXINT, 1 << 62}},
    }
    local bad, n = check(cases, false)
    assert.is_true(n > 40)
    assert.same({}, bad)
  end)
end)
