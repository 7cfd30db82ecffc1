-- multiprocessing.pretty: Lua values shown as Lua source -- a string
-- quoted with readable escapes, a key as a name or in brackets, a table
-- laid out to a width (pretty).  Used by the REPL (repl.lua) and by the
-- manager server's __tostring of the objects it holds.  Runs no user code
-- beyond the __tostring values it finds in metatables.
local P = {}

local keywords = {}
for w in ([[and break do else elseif end false for function goto if in
            local nil not or repeat return then true until while]]):gmatch("%a+") do
  keywords[w] = true
end

local function is_name(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil and not keywords[s]
end

-- A string as Lua source, escapes readable (%q writes a newline as "\" plus
-- a real newline).
local function quote(s)
  return (string.format("%q", s):gsub("\\\n", "\\n"):gsub("\r", "\\r"))
end

local function scalar(v)
  if type(v) == "string" then return quote(v) end
  if math.type(v) == "float" and v ~= v then return "0/0" end
  if v == math.huge then return "math.huge" end
  if v == -math.huge then return "-math.huge" end
  return tostring(v)
end

local key_rank = {number = 1, string = 2, boolean = 3}

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  local ra, rb = key_rank[ta] or 4, key_rank[tb] or 4
  if ra ~= rb then return ra < rb end
  if ta == "number" or ta == "string" then return a < b end
  return tostring(a) < tostring(b)
end

-- The entries of t to show: the sequence part 1..n, then the other keys,
-- sorted (numbers, strings, booleans, the rest by tostring).
local function entries(t)
  local n = 0
  while rawget(t, n + 1) ~= nil do n = n + 1 end
  local others = {}
  for k in next, t do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then
      others[#others + 1] = k
    end
  end
  table.sort(others, key_less)
  return n, others
end

local function has_tostring(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__tostring") ~= nil
end

-- Renders v.  opts: width (columns), depth (levels of nesting shown),
-- items (entries shown per table).  The layout is one line when it fits
-- in the width, else one entry per line, indented by two spaces.
-- A table met again inside itself is shown as <cycle: PATH>, PATH being
-- the way from the value printed ("@") down to it.
function P.pretty(v, opts)
  opts = opts or {}
  local width = opts.width or 80
  local max_depth = opts.depth or 6
  local max_items = opts.items or 100
  local open = {}   -- tables being rendered (the current path) -> their path

  local render

  local function key_text(k)
    if is_name(k) then return k end
    if type(k) == "table" and not has_tostring(k) then
      return "[" .. tostring(k) .. "]"
    end
    return "[" .. scalar(k) .. "]"
  end

  local function child_path(path, k)
    if is_name(k) then return path .. "." .. k end
    return path .. "[" .. (type(k) == "string" and quote(k) or tostring(k)) .. "]"
  end

  -- x rendered for a place indented by indent, depth tables deep
  function render(x, indent, depth, path)
    if type(x) ~= "table" or has_tostring(x) then return scalar(x) end
    if open[x] then return "<cycle: " .. open[x] .. ">" end
    if next(x) == nil then return "{}" end
    if depth >= max_depth then return "{...}" end
    open[x] = path
    local n, others = entries(x)
    local parts, shown = {}, 0
    local inner = indent .. "  "
    for i = 1, n do
      if shown == max_items then break end
      parts[#parts + 1] = render(rawget(x, i), inner, depth + 1,
                                 path .. "[" .. i .. "]")
      shown = shown + 1
    end
    for _, k in ipairs(others) do
      if shown == max_items then break end
      parts[#parts + 1] = key_text(k) .. " = " ..
        render(rawget(x, k), inner, depth + 1, child_path(path, k))
      shown = shown + 1
    end
    local rest = n + #others - shown
    if rest > 0 then parts[#parts + 1] = "... (" .. rest .. " more)" end
    open[x] = nil
    local line = "{" .. table.concat(parts, ", ") .. "}"
    if #indent + #line <= width and not line:find("\n", 1, true) then
      return line
    end
    -- one entry per line, except that short sequence items share lines
    local lines, cur = {}, nil
    for i, p in ipairs(parts) do
      local packable = i <= math.min(n, shown) and not p:find("\n", 1, true)
      if cur and packable and #inner + #cur + #p + 2 <= width then
        cur = cur .. ", " .. p
      else
        if cur then lines[#lines + 1] = cur end
        cur = p
        if not packable then lines[#lines + 1] = cur; cur = nil end
      end
    end
    if cur then lines[#lines + 1] = cur end
    return "{\n" .. inner .. table.concat(lines, ",\n" .. inner) .. "\n" .. indent .. "}"
  end

  return render(v, "", 0, "@")
end

P.keywords, P.is_name, P.quote, P.has_tostring = keywords, is_name, quote,
  has_tostring
return P
