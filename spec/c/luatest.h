/*
 * luatest.h -- what the C tests that run Lua share: a state with the
 * standard libraries (bare_state) or with the module preloaded too
 * (new_state), and run(), which runs a chunk and prints its error as a
 * TAP diagnostic.  Include after tap.h.
 */
#ifndef LUAMP_LUATEST_H
#define LUAMP_LUATEST_H

#include <stdio.h>

#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"

static inline lua_State *bare_state(void) {
  lua_State *L = luaL_newstate();
  CHECK(L != NULL);
  luaL_openlibs(L);
  return L;
}

static inline lua_State *new_state(void) {
  lua_State *L = bare_state();
  luamp_preload(L);
  return L;
}

/* 1 when code ran without error; else 0, the error printed. */
static inline int run(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != LUA_OK) {
    printf("# lua error: %s\n", lua_tostring(L, -1));
    return 0;
  }
  return 1;
}

#endif
