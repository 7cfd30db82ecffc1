/*
 * module.c -- luaopen_multiprocessing: the C primitives plus the Lua parts.
 *
 * "multiprocessing.core" is the table of C primitives; each runtime file
 * contributes to it through its luamp_open_* function.  The public module
 * is lua/multiprocessing/init.lua, which requires the core.  The Lua files
 * are compiled into the library (build/luafiles.c), and
 * luaopen_multiprocessing registers them in package.preload, so the
 * module works from the luamp host, or from stock lua5.4 with only
 * multiprocessing.so on LUA_CPATH.  When the Lua files are on LUA_PATH
 * instead, require finds init.lua first and the core comes from the same
 * .so through the all-in-one C loader (luaopen_multiprocessing_core).
 */
#include <string.h>

#include "internal.h"

/* Each primitive adds its functions to the table on top of the stack. */
static int (*const primitives[])(lua_State *L) = {
  luamp_open_errors,
  luamp_open_sys,
  luamp_open_codec,
  luamp_open_arena,
  luamp_open_sync,
  luamp_open_value,
  luamp_open_shm,
  luamp_open_queue,
  luamp_open_process,
  luamp_open_conn,
  luamp_open_store,
  luamp_open_fence,
  luamp_open_evset,
  luamp_open_forkserver,
  luamp_open_redis,
  NULL
};

LUAMP_API int luaopen_multiprocessing_core(lua_State *L) {
  luaL_checkversion(L);  /* a host built on another Lua gets an error */
  lua_newtable(L);
  for (int i = 0; primitives[i]; i++) primitives[i](L);
  lua_pushliteral(L, LUAMP_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}

/* package.preload loader for embedded file i (upvalue 1). */
static int load_embedded(lua_State *L) {
  const struct luamp_luafile *f =
      &luamp_luafiles[lua_tointeger(L, lua_upvalueindex(1))];
  if (luaL_loadbufferx(L, f->source, f->size, f->chunkname, "t") != LUA_OK)
    return lua_error(L);
  lua_pushstring(L, f->module);
  lua_call(L, 1, 1);
  return 1;
}

/* Registers every embedded file in package.preload, unless something is
 * already there (a host may have preloaded its own version). */
static void preload_embedded(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (int i = 0; luamp_luafiles[i].module; i++) {
    if (lua_getfield(L, -1, luamp_luafiles[i].module) == LUA_TNIL) {
      lua_pushinteger(L, i);
      lua_pushcclosure(L, load_embedded, 1);
      lua_setfield(L, -3, luamp_luafiles[i].module);
    }
    lua_pop(L, 1);
  }
  if (lua_getfield(L, -1, "multiprocessing.core") == LUA_TNIL) {
    lua_pushcfunction(L, luaopen_multiprocessing_core);
    lua_setfield(L, -3, "multiprocessing.core");
  }
  lua_pop(L, 2);
}

LUAMP_API int luaopen_multiprocessing(lua_State *L) {
  int i;
  preload_embedded(L);
  for (i = 0; luamp_luafiles[i].module; i++)
    if (strcmp(luamp_luafiles[i].module, "multiprocessing.init") == 0) break;
  if (!luamp_luafiles[i].module)
    return luaL_error(L, "multiprocessing: init.lua missing from the build");
  lua_pushinteger(L, i);
  lua_pushcclosure(L, load_embedded, 1);
  lua_call(L, 0, 1);
  return 1;
}

LUAMP_API void luamp_preload(lua_State *L) {
  preload_embedded(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_multiprocessing);
  lua_setfield(L, -2, "multiprocessing");
  lua_pop(L, 1);
}

LUAMP_API const char *luamp_version(void) {
  return LUAMP_VERSION;
}
