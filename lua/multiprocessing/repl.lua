-- multiprocessing.repl: what the luamp REPL prints and completes.
--
-- The interactive loop itself is C (runtime/repl.c); it calls show() on a
-- chunk's results and complete() when Tab is pressed.  Both are plain Lua
-- so that a host embedding Lua can offer the same (require
-- "multiprocessing.repl").  Neither runs user code beyond the __tostring,
-- __name and __index values it finds in metatables.
local R = {}
local P = require "multiprocessing.pretty"

local keywords, is_name, has_tostring = P.keywords, P.is_name, P.has_tostring

-- ---- pretty printing ------------------------------------------------------

-- repl.pretty (documented) is multiprocessing.pretty's pretty
R.pretty = P.pretty

-- Prints a chunk's results as print does (tab-separated, one line), with
-- tables pretty-printed; other values as tostring shows them.
function R.show(opts, ...)
  local n = select("#", ...)
  local out = table.pack(...)
  for i = 1, n do
    if type(out[i]) == "table" and not has_tostring(out[i]) then
      out[i] = R.pretty(out[i], opts)
    end
  end
  print(table.unpack(out, 1, n))
end

-- ---- completion --------------------------------------------------------------

-- The field names reachable by indexing v: its own string keys (for
-- tables), the keys of its metatable's __index table (methods of
-- userdata and objects, followed through up to 8 levels of __index
-- tables, as classes inherit), and for the module the names it would
-- load lazily.
local function fields(v, into)
  into = into or {}
  local seen = {}
  for _ = 1, 8 do
    if seen[v] then break end
    if type(v) == "table" then
      seen[v] = true
      for k in next, v do
        if type(k) == "string" then into[k] = rawget(v, k) end
      end
      local names = rawget(v, "names")
      if type(names) == "function" and v == package.loaded.multiprocessing then
        local ok, list = pcall(names)
        if ok and type(list) == "table" then
          for _, k in ipairs(list) do
            if into[k] == nil then into[k] = rawget(v, k) or false end
          end
        end
      end
    end
    local mt = getmetatable(v)
    if type(mt) ~= "table" then break end
    local index = rawget(mt, "__index")
    if type(index) ~= "table" then break end
    v = index
  end
  return into
end

-- Looks a dotted path ("a.b.c") up from the globals without calling
-- functions other than __index metamethods; nil when any step fails.
local function lookup(path, env)
  local v = env
  for name in path:gmatch("[^.:]+") do
    if not is_name(name) and not keywords[name] then return nil end
    local ok, r = pcall(function() return v[name] end)
    if not ok or r == nil then return nil end
    v = r
  end
  return v
end

-- Candidates for the word before the cursor: "pri" -> globals and
-- keywords; "mp.Po" -> fields of mp; "q:pu" -> methods of q (functions
-- only).  Each candidate is the whole word as it would read once
-- completed, with "(" after functions.  Sorted.  After "." or ":" names
-- beginning with "_" (private by convention) only when the prefix does.
function R.complete(word, env)
  env = env or _G
  local base, sep, prefix = word:match("^(.*)([.:])([%w_]*)$")
  local pool = {}
  if base then
    if base == "" or base:find("[^%w_.:]") or base:find("[.:][.:]")
       or base:find(":.") then
      return {}
    end
    local v = lookup(base, env)
    if v == nil then return {} end
    if type(v) == "string" then v = string end
    pool = fields(v)
  else
    prefix = word
    if not word:match("^[%a_]?[%w_]*$") then return {} end
    pool = fields(env)
    for k in pairs(keywords) do pool[k] = pool[k] or true end
  end
  -- (an object's "_" fields and methods are its own business: offered
  -- only when the prefix asks for them; globals such as _G stay)
  local hide_private = base ~= nil and prefix:sub(1, 1) ~= "_"
  local out = {}
  for k, val in pairs(pool) do
    if (is_name(k) or (not base and keywords[k])) and
       not (hide_private and k:sub(1, 1) == "_") then
      if k:sub(1, #prefix) == prefix and (sep ~= ":" or type(val) == "function") then
        local suffix = type(val) == "function" and "(" or ""
        out[#out + 1] = (base and base .. sep or "") .. k .. suffix
      end
    end
  end
  table.sort(out)
  return out
end

return R
