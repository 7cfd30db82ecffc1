/* C tests of the embedding interface: a host that links libluamp can load
 * the module, both eagerly and through package.preload. */
#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"
#include "tap.h"

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  CHECK(L != NULL);
  luaL_openlibs(L);
  return L;
}

static int run(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != LUA_OK) {
    printf("# lua error: %s\n", lua_tostring(L, -1));
    return 0;
  }
  return 1;
}

static void test_preload(void) {
  lua_State *L = new_state();
  luamp_preload(L);
  CHECK(run(L, "mp = require 'multiprocessing'"));
  CHECK(run(L, "assert(mp.cpu_count() >= 1)"));
  CHECK(run(L, "assert(mp.version == '" LUAMP_VERSION "')"));
  lua_close(L);
}

static void test_requiref(void) {
  lua_State *L = new_state();
  luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 0);
  lua_pop(L, 1);
  CHECK(run(L, "local mp = require 'multiprocessing'; "
               "assert(mp.current_process().name == 'MainProcess')"));
  lua_close(L);
}

static void test_version(void) {
  CHECK(strcmp(luamp_version(), LUAMP_VERSION) == 0);
}

static const struct tap_test tests[] = {
  {"preload", test_preload},
  {"luaL_requiref", test_requiref},
  {"version", test_version},
  {NULL, NULL}
};

int main(void) { return tap_run(tests); }
