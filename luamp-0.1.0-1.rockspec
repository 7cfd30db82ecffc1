-- LuaRocks build of the multiprocessing module (the C runtime with its Lua
-- files).  In a checkout:  luarocks --lua-version=5.4 make
-- The luamp command, libluamp and luamp.h come with "make install".
rockspec_format = "3.0"
package = "luamp"
version = "0.1.0-1"
source = {
  -- luarocks make builds the checkout it runs in; a packed source rock
  -- (luarocks pack) carries the tree
  url = "file://.",
}
description = {
  summary = "Python's multiprocessing for Lua 5.4: Process, Pool, Queue, Pipe, Manager, shared memory",
  detailed = [[
    require "multiprocessing" gives Lua 5.4 the API of Python's
    multiprocessing module, with forked interpreters as workers and a C
    runtime (MessagePack messages, shared-memory queues, robust locks).
  ]],
  license = "MIT",
  labels = {"multiprocessing", "parallel", "fork"},
}
supported_platforms = {"linux"}
dependencies = {
  "lua >= 5.4, < 5.5",
}
build = {
  type = "make",
  build_target = "rock",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    BUILD = "build/rock",
  },
  install_target = "rock-install",
  install_variables = {
    INST_LIBDIR = "$(LIBDIR)",
    INST_LUADIR = "$(LUADIR)",
    BUILD = "build/rock",
  },
}
