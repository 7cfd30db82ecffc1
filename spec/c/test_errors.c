/* C tests of errors.c: the one errno -> kind mapping, and what
 * luamp_raise_errno raises with it. */
#include <errno.h>

#include <lauxlib.h>
#include <lualib.h>

#include "internal.h"
#include "tap.h"

static void test_errno_kinds_follow_python(void) {
  CHECK(strcmp(luamp_errno_kind(ENOENT), "FileNotFoundError") == 0);
  CHECK(strcmp(luamp_errno_kind(EEXIST), "FileExistsError") == 0);
  CHECK(strcmp(luamp_errno_kind(EPIPE), "BrokenPipeError") == 0);
  CHECK(strcmp(luamp_errno_kind(ECONNRESET), "BrokenPipeError") == 0);
  CHECK(strcmp(luamp_errno_kind(ETIMEDOUT), "TimeoutError") == 0);
  /* kinds the contract does not have stay OSError */
  CHECK(strcmp(luamp_errno_kind(ECONNREFUSED), "OSError") == 0);
  CHECK(strcmp(luamp_errno_kind(EACCES), "OSError") == 0);
  CHECK(strcmp(luamp_errno_kind(EMFILE), "OSError") == 0);
}

static int raise_it(lua_State *L) {
  const char *kind = lua_tostring(L, 1);   /* nil: NULL */
  return luamp_raise_errno(L, kind, (int)lua_tointeger(L, 2), "open x");
}

/* The error object raise_it(kind, err) raises: its kind, errno and
 * message checked against the expectation. */
static void check_raised(lua_State *L, const char *kind, int err,
                         const char *want) {
  lua_pushcfunction(L, raise_it);
  if (kind) lua_pushstring(L, kind); else lua_pushnil(L);
  lua_pushinteger(L, err);
  CHECK(lua_pcall(L, 2, 1, 0) == LUA_ERRRUN);
  CHECK(lua_getfield(L, -1, "kind") == LUA_TSTRING);
  CHECK(strcmp(lua_tostring(L, -1), want) == 0);
  CHECK(lua_getfield(L, -2, "errno") == LUA_TNUMBER);
  CHECK(lua_tointeger(L, -1) == err);
  CHECK(lua_getfield(L, -3, "message") == LUA_TSTRING);
  CHECK(strncmp(lua_tostring(L, -1), "open x: ", 8) == 0);
  lua_pop(L, 4);
}

static void test_raise_errno_picks_the_kind(void) {
  lua_State *L = luaL_newstate();
  CHECK(L != NULL);
  luaL_openlibs(L);
  lua_newtable(L);
  luamp_open_errors(L);                 /* the metatable, as the module */
  lua_pop(L, 1);
  check_raised(L, "OSError", ENOENT, "FileNotFoundError");
  check_raised(L, NULL, EEXIST, "FileExistsError");
  check_raised(L, "OSError", EACCES, "OSError");
  /* a kind the caller chose is kept */
  check_raised(L, "ValueError", ENOENT, "ValueError");
  lua_close(L);
}

static const struct tap_test tests[] = {
  {"errno kinds follow Python's OSError subclasses",
   test_errno_kinds_follow_python},
  {"raise_errno picks the kind", test_raise_errno_picks_the_kind},
  {NULL, NULL}
};

int main(void) { return tap_run(tests); }
