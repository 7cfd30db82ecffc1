-- multiprocessing.manager_extra_proxies: the proxies of the newer
-- managed types -- set (Python 3.14), Pool and the AsyncResults it hands
-- out (Python's SyncManager.Pool) -- built with manager_proxies.lua's
-- kit.  Their server sides: manager_set.lua and manager_pool.lua.
local util = require "multiprocessing.util"
local proxies = require "multiprocessing.manager_proxies"

local argerror, typeerror = util.argerror, util.typeerror
local kit = proxies._kit
local define, common, sync_method = kit.define, kit.common, kit.sync_method
local cl_of, ID, call, req = kit.cl_of, kit.ID, kit.call, kit.req
local rawget, type = rawget, type

-- ---- set (Python 3.14's managed set; equality: manager_set.lua) -------------

local function check_member(v, fname)
  local t = type(v)
  if v == nil or v ~= v then
    argerror(1, fname, "a set member must not be " .. (v == nil and "nil" or "NaN"))
  end
  if t ~= "string" and t ~= "number" and t ~= "boolean" and t ~= "table" then
    typeerror(1, fname, "string, number, boolean or table", v)
  end
end

local function member_method(name, fname)
  return function(p, v)
    check_member(v, fname)
    return call(cl_of(p), {0, rawget(p, ID), name, v})
  end
end

local SetM = common{
  add = member_method("add", "add"),
  discard = member_method("discard", "discard"),
  remove = member_method("remove", "remove"),
  has = member_method("has", "has"),
  update = function(p, t)
    if type(t) ~= "table" then typeerror(1, "update", "table", t) end
    call(cl_of(p), {0, rawget(p, ID), "update", t})
  end,
  clear = sync_method("clear"),
  pop = sync_method("pop"),
  copy = sync_method("copy"),
  len = sync_method("len"),
}

define("set", "SetProxy", SetM, {
  __index = SetM,
  __len = function(p) return call(cl_of(p), {0, rawget(p, ID), "len"}) end,
  -- for v in pairs(s): each member (then true), from a snapshot
  __pairs = function(p)
    local items, i = call(cl_of(p), {0, rawget(p, ID), "copy"}), 0
    return function()
      i = i + 1
      if items[i] ~= nil then return items[i], true end
    end, p, nil
  end,
})

-- ---- Pool (served by the manager; see manager_pool.lua) ------------------------

local function check_call(fname, f, t, tname)
  if type(f) ~= "function" then
    local mt = getmetatable(f)
    if not (mt and mt.__call) then typeerror(1, fname, "function", f) end
  end
  if t ~= nil and type(t) ~= "table" then typeerror(2, fname, tname, t) end
end

local function check_chunksize(fname, c)
  if c ~= nil and not (math.type(c) == "integer" and c > 0) then
    argerror(3, fname, "chunksize must be a positive integer")
  end
end

local function pool_call(name, tname, required)
  return function(p, f, t, chunksize)
    check_call(name, f, t, tname)
    if required and t == nil then typeerror(2, name, tname, t) end
    check_chunksize(name, chunksize)
    return call(cl_of(p), req(rawget(p, ID), name, f, t, chunksize))
  end
end

-- imap and imap_unordered: the results of a map, then a for-loop
-- iterator over them yielding index, result (the server cannot stream)
local function imap(name)
  local map = pool_call("map", "sequence", true)
  return function(p, f, t, chunksize)
    check_call(name, f, t, "sequence")
    if t == nil then typeerror(2, name, "sequence", t) end
    local r, i = map(p, f, t, chunksize), 0
    return function()
      if i < r.n then
        i = i + 1
        return i, r[i]
      end
    end
  end
end

local PoolM = common{
  apply = pool_call("apply", "table"),
  apply_async = pool_call("apply_async", "table"),
  map = pool_call("map", "sequence", true),
  map_async = pool_call("map_async", "sequence", true),
  starmap = pool_call("starmap", "sequence", true),
  starmap_async = pool_call("starmap_async", "sequence", true),
  imap = imap("imap"),
  imap_unordered = imap("imap_unordered"),
  close = sync_method("close"),
  terminate = sync_method("terminate"),
  join = sync_method("join"),
}
define("Pool", "PoolProxy", PoolM, {__index = PoolM})

local function check_timeout(fname, t)
  if t ~= nil and type(t) ~= "number" then typeerror(1, fname, "number", t) end
end

local ResultM = common{
  get = function(p, timeout)
    check_timeout("get", timeout)
    return call(cl_of(p), req(rawget(p, ID), "get", timeout))
  end,
  wait = function(p, timeout)
    check_timeout("wait", timeout)
    call(cl_of(p), req(rawget(p, ID), "wait", timeout))
    return call(cl_of(p), req(rawget(p, ID), "ready"))
  end,
  ready = sync_method("ready"),
  successful = sync_method("successful"),
}
define("AsyncResult", "AsyncResultProxy", ResultM, {__index = ResultM})

return {}
