-- docs/reference.md stays true: every example in it runs (and prints what
-- the page says it prints), and the page and the module name the same
-- public functions, methods and fields.
--
-- The page's conventions (see its introduction):
--   * a ```lua block is an example; the runner puts
--     `local mp = require "multiprocessing"` in front of it; a ```text
--     block right after it is its exact standard output, a ```stderr
--     block its exact standard error (without one: nothing);
--   * a "### " heading names entries in `backticks`: `prefix.name` or
--     `prefix:name` (what follows the name -- arguments, braces -- is
--     ignored, and so are spans without a prefix, such as `#a`).  The
--     prefix says which object it belongs to (PREFIXES below).
local H = require "helpers"
local mp = require "multiprocessing"

local DOC = "docs/reference.md"

-- ---------------------------------------------------------------------------
-- Reading the page

local function read_doc()
  local f = assert(io.open(DOC, "rb"))
  local text = f:read("a")
  f:close()
  return text
end

-- Examples: {code =, expected = string or nil, line =}
local function examples_of(text)
  local lines = {}
  for l in (text .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  local out, i = {}, 1
  while i <= #lines do
    local fence = lines[i]:match("^```(%w*)%s*$")
    if fence then
      local start, body = i, {}
      i = i + 1
      while i <= #lines and not lines[i]:match("^```%s*$") do
        body[#body + 1] = lines[i]
        i = i + 1
      end
      assert(i <= #lines, DOC .. ":" .. start .. ": unterminated code block")
      if fence == "lua" then
        local ex = {code = table.concat(body, "\n") .. "\n", line = start}
        -- then a ```text block (stdout) and/or a ```stderr block
        local kind = lines[i + 1] and lines[i + 1]:match("^```(%a+)%s*$")
        while kind == "text" or kind == "stderr" do
          local exp = {}
          i = i + 2
          while i <= #lines and not lines[i]:match("^```%s*$") do
            exp[#exp + 1] = lines[i]
            i = i + 1
          end
          local field = kind == "text" and "expected" or "expected_err"
          assert(ex[field] == nil, DOC .. ":" .. start .. ": two " .. kind .. " blocks")
          ex[field] = table.concat(exp, "\n") .. "\n"
          kind = lines[i + 1] and lines[i + 1]:match("^```(%a+)%s*$")
        end
        out[#out + 1] = ex
      end
    end
    i = i + 1
  end
  return out
end

-- Documented names: prefix -> {name -> heading line}
local function entries_of(text)
  local doc, n = {}, 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    local heading = line:match("^###%s+(.*)$")
    if heading then
      for span in heading:gmatch("`([^`]*)`") do
        local path = span:match("^([%a_][%w_.:]*)")
        local prefix, name
        if path then prefix, name = path:match("^(.-)[.:]([%a_][%w_]*)$") end
        if prefix and prefix ~= "" then
          doc[prefix] = doc[prefix] or {}
          doc[prefix][name] = n
        end
      end
    end
  end
  return doc
end

-- ---------------------------------------------------------------------------
-- The module's actual public names

-- Fields computed by an __index function, found in its source: Lua
-- functions by their `k == "name"` tests, C ones (runtime/*.c, listed in
-- C_INDEX) by their `strcmp(k, "name")` tests.  So a field added to an
-- __index function must be on the page too.
local function source_lines(path, first, last)
  local f = io.open(path, "r") or io.open("lua/" .. path, "r")
  if not f then return nil end
  local out, n = {}, 0
  for line in f:lines() do
    n = n + 1
    if n >= first and n <= last then out[#out + 1] = line end
  end
  f:close()
  return table.concat(out, "\n")
end

local function lua_index_fields(fn, into)
  local info = debug.getinfo(fn, "S")
  if info.what ~= "Lua" or info.source:sub(1, 1) ~= "@" then return end
  local body = source_lines(info.source:sub(2), info.linedefined, info.lastlinedefined)
  assert(body, "cannot read the source of " .. info.source)
  for name in body:gmatch('k%s*==%s*"([%a_][%w_]*)"') do into[name] = true end
end

-- C __index functions -> the kinds whose objects use them
local C_INDEX = {
  conn_index = {"Connection"},
  shm_index = {"SharedMemory"},
  barrier_index = {"Barrier"},
  value_index = {"Value", "RawValue"},
  array_index = {"Array", "RawArray"},
}

-- kind -> {name = true} for the fields C __index functions compute;
-- raises for an __index function in runtime/*.c that C_INDEX lacks
local function c_index_fields()
  local out = {}
  local files = io.popen("ls runtime/*.c")
  for path in files:lines() do
    local src = H.slurp(path)
    for fname, body in src:gmatch("\nstatic int ([%w_]+_index)%(lua_State %*L%) {(.-)\n}\n") do
      local kinds = C_INDEX[fname]
      assert(kinds, path .. ": " .. fname .. " is not in reference_spec's C_INDEX")
      for _, kind in ipairs(kinds) do
        out[kind] = out[kind] or {}
        for name in body:gmatch('strcmp%(k, "([%a_][%w_]*)"%)') do out[kind][name] = true end
        -- (value.c's length-first KEY_IS(k, n, "name"))
        for name in body:gmatch('KEY_IS%(k, n, "([%a_][%w_]*)"%)') do out[kind][name] = true end
      end
    end
  end
  files:close()
  return out
end

-- The public (not "_"-prefixed) string keys reachable from x: its own
-- keys when a table, then through its metatable: __methods (manager
-- proxies), an __index table (followed up its own __index chain, as
-- classes inherit) or the tables an __index function holds as upvalues
-- (the method tables of C objects and of Lua objects with computed
-- fields), plus the fields a Lua __index function tests for.  Fields
-- computed in C (conn.closed...) come from c_index_fields().
local function public_names(x)
  local names, seen = {}, {}
  local function add_keys(t)
    for k in next, t do
      if type(k) == "string" and not k:match("^_") then names[k] = true end
    end
  end
  local function walk(t)
    if type(t) ~= "table" or seen[t] then return end
    seen[t] = true
    add_keys(t)
    local mt = getmetatable(t)
    if type(mt) == "table" and type(rawget(mt, "__index")) == "table" then
      walk(rawget(mt, "__index"))
    end
  end
  if type(x) == "table" then add_keys(x) end
  local mt = getmetatable(x)
  if type(mt) ~= "table" then return names end
  local methods, index = rawget(mt, "__methods"), rawget(mt, "__index")
  if type(methods) == "table" then
    walk(methods)
  elseif type(index) == "table" then
    walk(index)
  elseif type(index) == "function" then
    for i = 1, 255 do
      local up, v = debug.getupvalue(index, i)
      if up == nil then break end
      if type(v) == "table" and v ~= x then walk(v) end
      -- a field name the C function compares keys with (v.value)
      if type(v) == "string" and v:match("^[%a][%w_]*$") then names[v] = true end
    end
    lua_index_fields(index, names)
  end
  -- computed fields of a Lua __index function (here or up the chain)
  local seen_fn = {}
  local t = type(index) == "table" and index or nil
  while t and not seen_fn[t] do
    seen_fn[t] = true
    local tmt = getmetatable(t)
    local up = type(tmt) == "table" and rawget(tmt, "__index")
    if type(up) == "function" then lua_index_fields(up, names) end
    t = type(up) == "table" and up or nil
  end
  if type(rawget(mt, "__index")) == "function" then lua_index_fields(rawget(mt, "__index"), names) end
  return names
end

-- prefix used in the page's headings -> the kinds of object it documents
local PREFIXES = {
  ["mp"] = {"module"},
  ["mp.connection"] = {"connection"},
  ["mp.managers"] = {"managers"},
  ["mp.pool"] = {"pool"},
  ["mp.futures"] = {"futures"},
  ["mp.shared_memory"] = {"shared_memory"},
  ["me"] = {"current_process"},
  ["parent"] = {"parent_process"},
  ["err"] = {"Error"},
  ["ext"] = {"Ext"},
  ["mp.Process"] = {"Process"},
  ["p"] = {"Process"},
  ["conn"] = {"Connection"},
  ["listener"] = {"Listener"},
  ["q"] = {"Queue", "JoinableQueue"},
  ["jq"] = {"JoinableQueue"},
  ["sq"] = {"SimpleQueue"},
  ["lock"] = {"Lock", "RLock"},
  ["sem"] = {"Semaphore", "BoundedSemaphore"},
  ["ev"] = {"Event"},
  ["cond"] = {"Condition"},
  ["b"] = {"Barrier"},
  ["v"] = {"Value", "RawValue"},
  ["a"] = {"Array", "RawArray"},
  ["shm"] = {"SharedMemory"},
  ["sl"] = {"ShareableList"},
  ["smm"] = {"SharedMemoryManager"},
  ["pool"] = {"Pool"},
  ["res"] = {"AsyncResult"},
  ["ex"] = {"ProcessPoolExecutor"},
  ["m"] = {"Manager"},
  ["server"] = {"ManagerServer"},
  ["proxy"] = {"DictProxy", "ListProxy", "NamespaceProxy", "ValueProxy",
               "ArrayProxy", "QueueProxy", "JoinableQueueProxy", "LockProxy",
               "RLockProxy", "SemaphoreProxy", "BoundedSemaphoreProxy",
               "EventProxy", "ConditionProxy", "BarrierProxy", "SetProxy",
               "PoolProxy", "AsyncResultProxy"},
  ["d"] = {"DictProxy"},
  ["l"] = {"ListProxy"},
  ["ns"] = {"NamespaceProxy"},
  ["mv"] = {"ValueProxy"},
  ["ma"] = {"ArrayProxy"},
  ["mq"] = {"QueueProxy", "JoinableQueueProxy"},
  ["ms"] = {"SetProxy"},
  ["mpool"] = {"PoolProxy"},
  ["mres"] = {"AsyncResultProxy"},
  ["mjq"] = {"JoinableQueueProxy"},
  ["mlock"] = {"LockProxy", "RLockProxy"},
  ["msem"] = {"SemaphoreProxy", "BoundedSemaphoreProxy"},
  ["mev"] = {"EventProxy"},
  ["mcond"] = {"ConditionProxy"},
  ["mbar"] = {"BarrierProxy"},
  ["logger"] = {"Logger"},
  ["repl"] = {"repl"},
  ["ctx"] = {"Context"},
}

-- Live objects of every kind, and what to release afterwards.
local function live_objects()
  local objs, cleanup = {}, {}
  local function keep(f) cleanup[#cleanup + 1] = f end
  objs.module = mp
  -- every lazy name loaded, so that the submodules below are the real ones
  for _, name in ipairs(mp.names()) do local _ = mp[name] end
  objs.connection = mp.connection
  objs.managers = mp.managers
  objs.pool = mp.pool
  objs.futures = mp.futures
  objs.shared_memory = mp.shared_memory
  objs.repl = require "multiprocessing.repl"
  objs.current_process = mp.current_process()
  objs.parent_process = require("multiprocessing.process")._make_parent(
    "MainProcess", H.pid())
  objs.Error = mp.new_error("OSError", "m",
                            {traceback = "t", value = 1, errno = 2})
  objs.Ext = mp.decode("\xd6\xff\x00\x00\x00\x10")
  local p = mp.Process{target = function() end}
  p:start(); p:join()
  objs.Process = p
  local a, b = mp.Pipe()
  objs.Connection = a
  keep(function() a:close(); b:close() end)
  objs.Listener = mp.connection.Listener()
  keep(function() objs.Listener:close() end)
  objs.Queue, objs.JoinableQueue, objs.SimpleQueue =
    mp.Queue(), mp.JoinableQueue(), mp.SimpleQueue()
  objs.Lock, objs.RLock = mp.Lock(), mp.RLock()
  objs.Semaphore, objs.BoundedSemaphore = mp.Semaphore(), mp.BoundedSemaphore()
  objs.Event, objs.Condition, objs.Barrier = mp.Event(), mp.Condition(), mp.Barrier(2)
  objs.Value, objs.RawValue = mp.Value("i", 1), mp.RawValue("i", 1)
  objs.Array, objs.RawArray = mp.Array("c", "xy"), mp.RawArray("c", "xy")
  objs.SharedMemory = mp.SharedMemory{create = true, size = 8}
  keep(function() objs.SharedMemory:close(); objs.SharedMemory:unlink() end)
  objs.SharedMemoryManager = mp.managers.SharedMemoryManager():start()
  keep(function() objs.SharedMemoryManager:shutdown() end)
  objs.ShareableList = mp.shared_memory.ShareableList{1}
  keep(function() objs.ShareableList.shm:close(); objs.ShareableList.shm:unlink() end)
  local pool = mp.Pool(1)
  objs.Pool = pool
  objs.AsyncResult = pool:apply_async(function() return 1 end)
  objs.AsyncResult:get(30)
  keep(function() pool:terminate() end)
  objs.ProcessPoolExecutor = mp.futures.ProcessPoolExecutor(1)
  keep(function() objs.ProcessPoolExecutor:shutdown() end)
  local m = mp.Manager()
  objs.Manager = m
  keep(function() m:shutdown() end)
  objs.DictProxy, objs.ListProxy, objs.NamespaceProxy = m:dict(), m:list(), m:Namespace()
  objs.ValueProxy, objs.ArrayProxy = m:Value("i", 1), m:Array("i", {1})
  objs.QueueProxy, objs.JoinableQueueProxy = m:Queue(), m:JoinableQueue()
  objs.SetProxy = m:set()
  objs.PoolProxy = m:Pool(1)
  objs.AsyncResultProxy = objs.PoolProxy:apply_async(function() return 1 end)
  objs.AsyncResultProxy:get(30)
  objs.LockProxy, objs.RLockProxy = m:Lock(), m:RLock()
  objs.SemaphoreProxy, objs.BoundedSemaphoreProxy = m:Semaphore(), m:BoundedSemaphore()
  objs.EventProxy, objs.ConditionProxy, objs.BarrierProxy = m:Event(), m:Condition(), m:Barrier(2)
  -- a server bound in this process, never served (its methods are
  -- internal: only the page's entries are checked against it)
  local QM = mp.managers.BaseManager:extend()
  objs.ManagerServer = QM{authkey = "k"}:get_server()
  keep(function() objs.ManagerServer:close() end)
  objs.Logger = mp.get_logger()
  objs.Context = mp.get_context("forkserver")
  return objs, cleanup
end

-- The kinds whose names are not enumerated (entries only checked to exist)
local NOT_ENUMERATED = {ManagerServer = true}

-- The module's names: mp.names(); submodules: their own public keys but
-- themselves (mp.connection.connection is listed on the page anyway).
local C_FIELDS   -- c_index_fields(), once
local function actual_names(kind, obj)
  if kind == "module" then
    local t = {}
    for _, k in ipairs(mp.names()) do t[k] = true end
    return t
  end
  local t = public_names(obj)
  C_FIELDS = C_FIELDS or c_index_fields()
  for name in pairs(C_FIELDS[kind] or {}) do t[name] = true end
  return t
end

local function exists(obj, name)
  local ok, v = pcall(function() return obj[name] end)
  return ok and v ~= nil
end

-- ---------------------------------------------------------------------------
-- Running the examples

local in_luamp = package.preload["multiprocessing"] ~= nil
local interpreter = in_luamp and H.q(H.luamp) or H.lua54

local function run_examples(examples)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. H.q(dir)))
  local script = {}
  for i, ex in ipairs(examples) do
    H.write(dir .. "/" .. i .. ".lua", 'local mp = require "multiprocessing"\n' .. ex.code)
    local base = H.q(dir .. "/" .. i)
    script[#script + 1] = string.format(
      "timeout -k 5 60 %s %s.lua >%s.out 2>%s.err </dev/null; echo $? >%s.rc",
      interpreter, base, base, base, base)
  end
  H.write(dir .. "/run.sh", table.concat(script, "\n") .. "\n")
  H.sh("sh " .. H.q(dir .. "/run.sh"))
  local results = {}
  for i = 1, #examples do
    local base = dir .. "/" .. i
    results[i] = {out = H.slurp(base .. ".out"), err = H.slurp(base .. ".err"),
                  rc = tonumber(H.slurp(base .. ".rc"))}
  end
  os.execute("rm -rf " .. H.q(dir))
  return results
end

-- ---------------------------------------------------------------------------

describe("docs/reference.md", function()
  local text = read_doc()
  local examples = examples_of(text)
  local doc = entries_of(text)

  it("has examples, most of them with their output", function()
    local with_output = 0
    for _, ex in ipairs(examples) do
      if ex.expected then with_output = with_output + 1 end
    end
    assert.is_true(#examples >= 40, "only " .. #examples .. " examples")
    assert.is_true(with_output >= #examples * 3 // 4)
  end)

  it("runs every example, which prints what the page shows", function()
    local results = run_examples(examples)
    local failures = {}
    for i, ex in ipairs(examples) do
      local r = results[i]
      local where = DOC .. ":" .. ex.line
      if r.rc ~= 0 then
        failures[#failures + 1] = string.format("%s: exit status %s\n%s%s",
          where, tostring(r.rc), r.out, r.err)
      elseif ex.expected and r.out ~= ex.expected then
        failures[#failures + 1] = string.format(
          "%s: printed\n%s\ninstead of\n%s", where, r.out, ex.expected)
      elseif r.err ~= (ex.expected_err or "") then
        failures[#failures + 1] = string.format(
          "%s: wrote on stderr\n%s\ninstead of\n%s", where, r.err, ex.expected_err)
      end
    end
    assert(#failures == 0, table.concat(failures, "\n----\n"))
  end)

  it("uses only known prefixes in its headings", function()
    for prefix in pairs(doc) do
      assert(PREFIXES[prefix], "unknown prefix '" .. prefix .. "' in headings")
    end
  end)

  it("lists every public name, and only names that exist", function()
    local objs, cleanup = live_objects()
    local ok, err = pcall(function()
      local missing, extra = {}, {}
      -- kind -> the names documented for it (through any of its prefixes)
      local documented = {}
      for prefix, kinds in pairs(PREFIXES) do
        for _, kind in ipairs(kinds) do
          documented[kind] = documented[kind] or {}
          for name in pairs(doc[prefix] or {}) do documented[kind][name] = true end
        end
      end
      for _, kinds in pairs(PREFIXES) do
        for _, kind in ipairs(kinds) do
          local obj = objs[kind]
          assert(obj ~= nil, "no live object for " .. kind)
          if not NOT_ENUMERATED[kind] then
            for name in pairs(actual_names(kind, obj)) do
              if not documented[kind][name] then
                missing[#missing + 1] = kind .. ": " .. name
              end
            end
          end
        end
      end
      for prefix, names in pairs(doc) do
        for name, line in pairs(names) do
          for _, kind in ipairs(PREFIXES[prefix] or {}) do
            if not (actual_names(kind, objs[kind])[name] or exists(objs[kind], name)) then
              extra[#extra + 1] = string.format("%s:%d: %s%s%s (%s)", DOC, line,
                prefix, ":", name, kind)
            end
          end
        end
      end
      local function uniq_sorted(t)
        local u, s = {}, {}
        for _, v in ipairs(t) do if not u[v] then u[v] = true; s[#s + 1] = v end end
        table.sort(s)
        return s
      end
      missing, extra = uniq_sorted(missing), uniq_sorted(extra)
      assert(#missing == 0, "public names the page does not list:\n  " ..
             table.concat(missing, "\n  "))
      assert(#extra == 0, "entries that name nothing:\n  " .. table.concat(extra, "\n  "))
    end)
    for i = #cleanup, 1, -1 do pcall(cleanup[i]) end
    assert(ok, err)
  end)

  it("sees missing and unknown names (the checker itself)", function()
    -- a name on a live object that the page lacks is found...
    local names = public_names(mp.Queue())
    assert.is_true(names.put and names.get_nowait and not names._wait_fd)
    local a = mp.Pipe()
    assert.is_true(public_names(a).recv_bytes)
    assert.is_nil(public_names(a).closed)          -- computed in C...
    assert.is_true(c_index_fields().Connection.closed)   -- ...found in its source
    assert.is_true(c_index_fields().Barrier.n_waiting)
    assert.is_true(exists(a, "closed"))
    -- fields a Lua __index function computes, from its source
    local l <close> = mp.connection.Listener()
    assert.is_true(public_names(l).address)
    assert.is_true(public_names(mp.current_process()).pid)
    assert.is_true(c_index_fields().Value.value)   -- v.value, from value.c
    assert.is_false(exists(a, "no_such_method"))
    -- ...and headings parse into prefix and name
    local d = entries_of("### `mp.Pool([n])` · `q:put(v)` · `#a` · `mp.connection.Client{}`\n")
    assert.equal(1, d.mp.Pool)
    assert.equal(1, d.q.put)
    assert.equal(1, d["mp.connection"].Client)
    assert.is_nil(d.a)
    local ex = examples_of("```lua\nprint(1)\n```\n```text\n1\n```\n```lua\nx()\n```\n" ..
                           "```lua\ny()\n```\n```stderr\ne\n```\n```text\no\n```\n")
    assert.equal(3, #ex)
    assert.equal("1\n", ex[1].expected)
    assert.is_nil(ex[2].expected)
    assert.equal("y()\n", ex[3].code)
    assert.equal("e\n", ex[3].expected_err)
    assert.equal("o\n", ex[3].expected)
  end)
end)
