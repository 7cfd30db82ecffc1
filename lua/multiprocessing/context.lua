-- multiprocessing.context: start methods and context objects (Python's
-- multiprocessing.context), policy only.
--
-- Two start methods: "fork" (the default: a child is a fork of the
-- caller) and "forkserver" (a child is a fork of a small server process
-- started early; runtime/forkserver.c, multiprocessing/forkserver.lua).
-- mp.set_start_method chooses the method of every Process and Pool that
-- names none; mp.get_context(method) returns an object with the whole
-- module's API whose Process and Pool use that method, without changing
-- the global choice.
local fs = require "multiprocessing.forkserver"
local util = require "multiprocessing.util"

local require = require   -- (Context.__index: no globals table as upvalue)

local M = {}

local contexts = {}   -- method -> its context (one each, as Python's)

-- The options of set_start_method: {force =, preload =} or force itself.
local function options(fname, opts)
  if opts == nil then return false, nil end
  if type(opts) == "boolean" then return opts, nil end
  if type(opts) ~= "table" then
    util.typeerror(2, fname, "table or boolean", opts)
  end
  for k in pairs(opts) do
    if k ~= "force" and k ~= "preload" then
      util.argerror(2, fname, "unknown option '" .. tostring(k) .. "'")
    end
  end
  return opts.force and true or false, opts.preload
end

local function check_preload(fname, argn, list)
  if type(list) ~= "table" then util.typeerror(argn, fname, "table", list) end
  local out = {}
  for i = 1, #list do
    local name = list[i]
    if type(name) ~= "string" or name == "" or name:find("\n", 1, true) then
      util.argerror(argn, fname, "preload[" .. i .. "] must be a module " ..
                    "name, got " .. util.typename(name))
    end
    out[i] = name
  end
  return out
end

-- mp.set_forkserver_preload(names): modules the fork server requires
-- (loaded into a running server now, and into any server started later).
function M.set_forkserver_preload(list)
  fs.set_preload(check_preload("set_forkserver_preload", 1, list))
end

-- mp.set_start_method(method [, {force =, preload =} | force]).  As
-- Python: a second call raises unless force is set; force with a nil
-- method forgets the choice.  Choosing "forkserver" starts the server now
-- (call it early, while the process is small and single-threaded).
function M.set_start_method(method, opts)
  local force, preload = options("set_start_method", opts)
  if method == nil and force then
    fs.set_method(nil)
    return
  end
  fs.check_method(method, "set_start_method", 1)
  if fs.method_set() ~= nil and not force then
    util.raise("ProcessError", "context has already been set (pass " ..
               "{force = true} to change it)")
  end
  if preload ~= nil then
    fs.set_preload(check_preload("set_start_method", 2, preload))
  end
  if method == "forkserver" then fs.ensure() end
  fs.set_method(method)
end

-- mp.get_start_method([allow_none]): the current method.  As Python's,
-- asking fixes the default ("fork") unless allow_none is true, and then a
-- later set_start_method needs force.
function M.get_start_method(allow_none)
  local m = fs.method_set()
  if m == nil then
    if allow_none then return nil end
    fs.set_method("fork")
    m = "fork"
  end
  return m
end

function M.get_all_start_methods()
  return {fs.all_methods[1], fs.all_methods[2]}
end

-- ---- context objects -------------------------------------------------------

local Context = {}

local function make_context(method)
  local mp = require "multiprocessing"
  local ctx = {_name = method}
  local proc_cls = mp.Process:extend("Process")
  rawset(proc_cls, "_start_method", method)
  ctx.Process = proc_cls
  ctx.Pool = function(opts, initializer, initargs, maxtasksperchild)
    local o
    if type(opts) == "table" then
      o = {}
      for k, v in pairs(opts) do o[k] = v end
    else
      o = {processes = opts, initializer = initializer, initargs = initargs,
           maxtasksperchild = maxtasksperchild}
    end
    o.context = ctx
    return mp.Pool(o)
  end
  -- ctx.Manager([opts]): a started SyncManager whose server process is
  -- started with this method (Python's ctx.Manager)
  ctx.Manager = function(opts)
    if opts ~= nil and type(opts) ~= "table" then
      util.typeerror(1, "Manager", "options table", opts)
    end
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.context = ctx
    return mp.managers.SyncManager(o):start()
  end
  -- ctx.get_start_method() and ctx:get_start_method() both work
  ctx.get_start_method = function() return method end
  ctx.get_context = function(a, b)
    if a == ctx then a = b end
    return M.get_context(a)
  end
  return setmetatable(ctx, Context)
end

-- Everything else is the module's own (Queue, Lock, Value, Manager,
-- Pipe, SharedMemory, cpu_count, ...): the same objects work under every
-- start method.
Context.__index = function(_, k) return require("multiprocessing")[k] end
Context.__tostring = function(ctx)
  return string.format("<multiprocessing context %q>", ctx._name)
end
Context.__name = "multiprocessing.Context"

-- mp.get_context([method]): the context of method (nil: the current
-- method's, which fixes the default as get_start_method does).
function M.get_context(method)
  if method == nil then method = M.get_start_method() end
  fs.check_method(method, "get_context", 1)
  local ctx = contexts[method]
  if ctx == nil then
    ctx = make_context(method)
    contexts[method] = ctx
  end
  return ctx
end

-- The start method of a context given to Pool{context = ...} (a context
-- or a method name); nil when none was given.
function M.method_of(ctx, fname)
  if ctx == nil then return nil end
  if type(ctx) == "string" then
    fs.check_method(ctx, fname, 1)
    return ctx
  end
  if getmetatable(ctx) ~= Context then
    util.argerror(1, fname, "context must be a context (mp.get_context) " ..
                  "or a start method name, got " .. util.typename(ctx))
  end
  return ctx._name
end

return M
