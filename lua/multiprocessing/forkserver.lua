-- multiprocessing.forkserver: the Lua side of the "forkserver" start
-- method.  C is mechanism (runtime/forkserver.c: the server, its
-- protocol, the status pipes); this file is policy: which start method is
-- current, starting (and restarting) this process's server with its
-- preload list, what a request carries, and what a child of the server
-- runs first.
--
-- A request's payload is one codec message {module =, fn =, arg =,
-- authkey =} (arg encoded on its own, decoded once the key is set): the
-- child requires module and calls module[fn](arg), which returns its exit
-- code.  So the function a child starts with is named,
-- not sent (Process sends multiprocessing.process._remote_main, the Pool
-- multiprocessing.pool_worker.main); what travels is arg: the target, its
-- upvalues and arguments, handles of shared objects.
local core = require "multiprocessing.core"
local util = require "multiprocessing.util"

local M = {}

local TRUSTED = {trusted = true}

-- The start method of Process and Pool objects that name none: nil until
-- set_start_method (then "fork" is what nil means).
local current = nil
-- The modules the server requires after it starts (set_start_method's
-- preload), and the server pid they were loaded into.
local preload, preloaded_in = {}, nil

-- (as Python's: a start under the default method fixes it, so that a
-- later set_start_method needs force)
function M.method()
  if current == nil then current = "fork" end
  return current
end
function M.method_set() return current end
function M.set_method(name) current = name end

-- Makes sure this process has a server with the preload list loaded: a
-- server started by the host (luamp_forkserver_start) or by an earlier
-- call is kept; one found dead by a start was forgotten there (that start
-- raised ProcessError), so a new one is started here.
-- (mine: the module's own files the server has loaded for this process)
local mine = {}
function M.ensure()
  local pid = core.forkserver_pid() or core.forkserver_start()
  if preloaded_in ~= pid then
    mine = {}
    if #preload > 0 then core.forkserver_preload(preload) end
    preloaded_in = pid
  end
  -- The module's files loaded here are loaded there too, once: the
  -- classes a payload's objects are rebuilt with (a manager's proxies)
  -- are registered by them.
  local missing
  for name in pairs(package.loaded) do
    if type(name) == "string" and not mine[name] and
       name:find("^multiprocessing%.") and name ~= "multiprocessing.repl" then
      missing = missing or {}
      missing[#missing + 1] = name
      mine[name] = true
    end
  end
  if missing then core.forkserver_preload(missing) end
  return pid
end

-- The preload list; loaded into a running server now.
function M.set_preload(names)
  preload = names
  preloaded_in = nil
  if core.forkserver_pid() then M.ensure() end
end

-- The managers this process uses whose key is not the tree's: uid ->
-- {address, authkey}.  A forked child inherits them (its proxies of those
-- managers log in with them); a child of the server gets them in its
-- payload, as Python's proxies carry their key while a process is spawned.
local function manager_keys()
  local mc = package.loaded["multiprocessing.manager_client"]
  local out
  for uid, cl in pairs(mc and mc.clients or {}) do
    if cl.authkey ~= nil and cl.authkey ~= core.tree_authkey and not cl.dead then
      out = out or {}
      out[uid] = {cl.address, cl.authkey}
    end
  end
  return out
end

-- Starts module[fn](arg) in a child of the server; returns its Child
-- handle (the same methods as core.spawn's).  root names arg in an
-- EncodeError ("cannot encode a thread at <root>.args[1]").
function M.spawn(module, fn, arg, root, daemon, ignore_sigint, die_with_parent)
  local ok, data = pcall(core.encode, arg)
  if not ok then
    local e = data
    if core.is_error(e, "EncodeError") then
      e.message = e.message:gsub(" at value", " at " .. root, 1) ..
        " (under the forkserver start method a target, its arguments " ..
        "and upvalues are encoded)"
    end
    error(e, 0)
  end
  M.ensure()
  -- (arg is decoded in the child once the tree's key is set: a manager's
  -- proxy connects as it is rebuilt)
  local payload = core.encode({module = module, fn = fn, arg = data,
                               authkey = core.tree_authkey, method = current,
                               preload = preload, keys = manager_keys()})
  return core.forkserver_spawn(payload, daemon, ignore_sigint, die_with_parent)
end

-- In a child of the server: what it runs (runtime/forkserver.c calls it
-- with the payload; its result is the exit code).  The payload comes from
-- the owner through the server's private socket: trusted.
function M.child_main(payload)
  local d = core.decode(payload, TRUSTED)
  -- the tree's key is the owner's (a manager made there accepts us)
  core.tree_authkey = d.authkey
  -- the start method and preload list are the owner's, as a forked child
  -- inherits them (its own children are forks of a server of its own)
  current, preload = d.method, d.preload
  if d.keys then
    local client_for = require("multiprocessing.manager_client").client_for
    for uid, k in pairs(d.keys) do client_for(uid, k[1], k[2]) end
  end
  local mod = require(d.module)
  return mod[d.fn](core.decode(d.arg, TRUSTED))
end

-- ---- set_start_method & co (Python's module functions) -------------------

local methods = {fork = true, forkserver = true}
M.all_methods = {"fork", "forkserver"}

function M.check_method(name, fname, argn)
  if type(name) ~= "string" then
    util.typeerror(argn or 1, fname, "string", name)
  end
  if not methods[name] then
    util.raise("ValueError", string.format(
      "cannot find context for '%s' (start methods: fork, forkserver)", name))
  end
end

return M
