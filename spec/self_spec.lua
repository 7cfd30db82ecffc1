-- Every method and metamethod of every handle type, called with a wrong
-- self, raises a Lua error and never crashes (issue 13 item 2, issue 14
-- item 1).  The methods are enumerated from the metatables, not listed
-- here, so a method added later is covered too.  Each call runs in a
-- forked child: a segfault is a failure of this spec, not a dead runner.
local core = require "multiprocessing.core"
local mp = require "multiprocessing"

-- Runs f(...) in a forked child; returns "raised", "returned", "hung" or
-- "signal N" / "exit N".
local function in_child(f, ...)
  local args = table.pack(...)
  io.stdout:flush()
  local pid = core.fork()
  if pid == 0 then
    local ok = pcall(f, table.unpack(args, 1, args.n))
    core._exit(ok and 3 or 0)
  end
  local deadline = core.now() + 10
  while true do
    local code = core.waitpid(pid, true)
    if code then
      if code == 0 then return "raised" end
      if code == 3 then return "returned" end
      if code < 0 then return "signal " .. -code end
      return "exit " .. code
    end
    if core.now() > deadline then
      core.kill(pid, "SIGKILL")
      core.waitpid(pid)
      return "hung"
    end
    core.sleep(0.001)
  end
end

-- name -> function of every method and metamethod of obj's type: the
-- metatable's functions, and the functions of its __index table (or of
-- the tables an __index function closes over: the method table of a
-- type with fields).
local function methods_of(obj)
  local mt = assert(getmetatable(obj))
  local out, seen = {}, {}
  local function add(name, f)
    if type(f) == "function" and not seen[name] then
      seen[name] = true
      out[#out + 1] = {name = name, f = f}
    end
  end
  for k, v in pairs(mt) do add(k, v) end
  local idx = rawget(mt, "__index")
  if type(idx) == "table" then
    for k, v in pairs(idx) do add(k, v) end
  elseif type(idx) == "function" then
    for i = 1, 255 do
      local n, u = debug.getupvalue(idx, i)
      if not n then break end
      if type(u) == "table" then
        for k, v in pairs(u) do add(k, v) end
      end
    end
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

local function label(v)
  local mt = getmetatable(v)
  local name = type(mt) == "table" and rawget(mt, "__name")
  return type(name) == "string" and name or type(v)
end

-- One instance of every C handle type.
local function instances()
  local objs = {}
  local function add(name, v) objs[#objs + 1] = {name = name, v = v} end
  add("Queue", mp.Queue())
  add("SimpleQueue", mp.SimpleQueue())
  add("JoinableQueue", mp.JoinableQueue())
  add("Lock", mp.Lock())
  add("RLock", mp.RLock())
  add("Semaphore", mp.Semaphore(2))
  add("BoundedSemaphore", mp.BoundedSemaphore(2))
  add("Event", mp.Event())
  add("Condition", mp.Condition())
  add("Barrier", mp.Barrier(2))
  add("Value", mp.Value("i", 1))
  add("Array", mp.Array("d", 3))
  add("RawValue", mp.RawValue("i", 1))
  add("RawArray", mp.RawArray("i", 2))
  add("SharedMemory", mp.SharedMemory{create = true, size = 64})
  local a, b = mp.Pipe()
  add("Connection", a)
  add("Connection (write end)", select(2, mp.Pipe(false)))
  add("Listener handle", core.listen("/tmp/luamp-self-" .. core.pid()))
  add("Store", core.Store())
  add("EventSet", core.EventSet())
  local p = mp.Process{target = function() end}
  p:start()
  p:join()
  add("Child", rawget(p, "_child"))
  local reg = debug.getregistry()
  add("ChildrenSentinel", reg["multiprocessing.ChildrenSentinel#"])
  local held = mp.Lock()
  add("guard", held:guard())
  add("Ext", mp.Ext(42, "x"))
  objs.keep = {b, p, held}
  return objs
end

-- Whether f is a method or metamethod of obj's type (a function shared by
-- several types accepts each of them: a Queue's close() closes a
-- JoinableQueue too).
local function has_function(obj, f)
  for _, m in ipairs(methods_of(obj)) do
    if m.f == f then return true end
  end
  return false
end

-- The wrong selves for method f of an object v: io.stdout, two luamp
-- objects of other types that do not share f (a Lock for a Queue, a Queue
-- for a Lock...), a table, nil, a number, a string ("nil" stands for nil).
local function wrong_selves(objs, v, f)
  local out = {io.stdout, {}, "nil", 42, "str"}
  local others = 0
  for _, want in ipairs{"Lock", "Queue", "JoinableQueue", "Value", "Array",
                        "Connection"} do
    for _, o in ipairs(objs) do
      if o.name == want and getmetatable(o.v) ~= getmetatable(v) and
         others < 2 and not has_function(o.v, f) then
        out[#out + 1] = o.v
        others = others + 1
      end
    end
  end
  return out
end

describe("a wrong self", function()
  local objs = instances()

  it("makes every method and metamethod of every C handle type raise", function()
    local bad, calls = {}, 0
    for _, o in ipairs(objs) do
      local ms = methods_of(o.v)
      assert.is_true(#ms > 0 or o.name == "Ext", o.name .. " has no methods")
      local list = {}
      for _, m in ipairs(ms) do
        for _, s in ipairs(wrong_selves(objs, o.v, m.f)) do
          if s == "nil" then s = nil end
          for _, args in ipairs{{n = 0}, {1, 1, 1, n = 3}} do
            list[#list + 1] = {m = m, s = s, args = args}
          end
        end
      end
      calls = calls + #list
      -- the whole type in one child; call by call when that fails
      local all = in_child(function()
        for _, c in ipairs(list) do
          if pcall(c.m.f, c.s, table.unpack(c.args, 1, c.args.n)) then
            return
          end
        end
        error("all raised")
      end)
      if all ~= "raised" then
        for _, c in ipairs(list) do
          local r = in_child(c.m.f, c.s, table.unpack(c.args, 1, c.args.n))
          if r ~= "raised" then
            bad[#bad + 1] = string.format("%s.%s(%s%s): %s", o.name,
              c.m.name, label(c.s), c.args.n > 0 and ", 1, 1, 1" or "", r)
          end
        end
      end
    end
    assert.is_true(calls > 500, "only " .. calls .. " calls")
    assert.same({}, bad)
  end)

  it("gives a Lua argument error naming the method and the expected type", function()
    local q = mp.Queue()
    local ok, err = pcall(function() q.close(io.stdout) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'close' %(multiprocessing.Queue, " ..
                   "JoinableQueue or SimpleQueue expected, got FILE%*%)", err)
    local v = mp.Value("i", 1)
    ok, err = pcall(function() getmetatable(v).__tostring(io.stdout) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to '__tostring' %(multiprocessing.Value " ..
                   "or Array expected, got FILE%*%)", err)
    local l = mp.Lock()
    ok, err = pcall(q.close, l)
    assert.is_false(ok)
    assert.matches("expected, got multiprocessing.Lock", err)
    assert.is_true(l:acquire())   -- not closed by the Queue's close()
    l:release()
    ok, err = pcall(function() q.task_done(q) end)
    assert.is_false(ok)   -- a plain Queue has no task_done: nil
    local jq = mp.JoinableQueue()
    ok, err = pcall(jq.task_done, q)
    assert.is_false(ok)
    assert.matches("multiprocessing.JoinableQueue expected, got " ..
                   "multiprocessing.Queue", err)
  end)

  -- The Lua classes over the C handles: a wrong self reaches Lua code,
  -- which may index it (an error) but must never crash or hang.  (Some
  -- still return quietly -- Pool.close({}), Process.is_alive({}): their
  -- own self checks belong with the Lua side's argument errors.)
  it("never crashes the methods of Process, Pool, Listener and manager proxies", function()
    local m = mp.Manager()
    local pool = mp.Pool(1)
    local listener = mp.connection.Listener("/tmp/luamp-self-l-" .. core.pid())
    local p = mp.Process{target = function() end}
    local classes = {
      {name = "Process", v = p, from = {mp.Process}},
      {name = "Pool", v = pool},
      {name = "Listener", v = listener},
      {name = "Manager", v = m},
    }
    for _, kind in ipairs{"dict", "list", "Lock", "Queue", "Value", "Event",
                          "Namespace"} do
      local proxy = kind == "Value" and m:Value("i", 1) or m[kind](m)
      classes[#classes + 1] = {name = kind .. " proxy", v = proxy,
                               from = {getmetatable(proxy).__methods}}
    end
    local bad, calls = {}, 0
    local selves = {io.stdout, {}, "nil", 42, "str", objs[4].v}
    for _, c in ipairs(classes) do
      local ms, seen = {}, {}
      local mt = getmetatable(c.v)
      for _, t in ipairs{mt, type(mt.__index) == "table" and mt.__index or {},
                         table.unpack(c.from or {})} do
        for k, f in pairs(t) do
          if type(f) == "function" and not seen[f] then
            seen[f] = true
            ms[#ms + 1] = {name = tostring(k), f = f}
          end
        end
      end
      table.sort(ms, function(a, b) return a.name < b.name end)
      for _, meth in ipairs(ms) do
        for _, s in ipairs(selves) do
          if s == "nil" then s = nil end
          calls = calls + 1
          local r = in_child(meth.f, s, 1, 1, 1)
          if r ~= "raised" and r ~= "returned" then
            bad[#bad + 1] = string.format("%s.%s(%s, 1, 1, 1): %s", c.name,
                                          meth.name, label(s), r)
          end
        end
      end
    end
    pool:terminate()
    listener:close()
    m:shutdown()
    assert.is_true(calls > 200, "only " .. calls .. " calls")
    assert.same({}, bad)
  end)
end)
