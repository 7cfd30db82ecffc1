/* C tests of the embedding interface: a host that links libluamp can load
 * the module, both eagerly and through package.preload, and run a Pool
 * whose tasks are its own C functions ("C workers"), driven from C. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"
#include "tap.h"
#include "luatest.h"

static void test_preload(void) {
  lua_State *L = bare_state();
  luamp_preload(L);
  CHECK(run(L, "mp = require 'multiprocessing'"));
  CHECK(run(L, "assert(mp.cpu_count() >= 1)"));
  CHECK(run(L, "assert(mp.version == '" LUAMP_VERSION "')"));
  lua_close(L);
}

static void test_requiref(void) {
  lua_State *L = bare_state();
  luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 0);
  lua_pop(L, 1);
  CHECK(run(L, "local mp = require 'multiprocessing'; "
               "assert(mp.current_process().name == 'MainProcess')"));
  lua_close(L);
}

/* mp.encode from the main thread of the first state that loaded the
 * module finds its encoder box without reading its upvalue (a cache in
 * codec.c): states opened and closed in turn, encoding from their main
 * threads and from a coroutine, each get their own right bytes, and a
 * state opened after the first closed (perhaps at its address) does not
 * find the closed state's box. */
static void test_states_and_encoder_box(void) {
  static const char *enc =
      "local mp = require 'multiprocessing'\n"
      "local s = mp.encode({id = 12345, tags = {'x', 'y'}})\n"
      "assert(mp.decode(s).id == 12345 and mp.decode(s).tags[2] == 'y')\n"
      "assert(coroutine.wrap(function() return mp.encode({1, 2}) end)() "
      "== '\\x92\\x01\\x02')\n";
  lua_State *a = bare_state(), *b = bare_state(), *c;
  luamp_preload(a);
  luamp_preload(b);
  CHECK(run(a, enc));
  CHECK(run(b, enc));
  CHECK(run(a, enc));
  lua_close(a);
  CHECK(run(b, enc));
  for (int i = 0; i < 3; i++) {
    c = bare_state();
    luamp_preload(c);
    CHECK(run(c, enc));
    CHECK(run(b, enc));
    lua_close(c);
  }
  CHECK(run(b, enc));
  lua_close(b);
}

static void test_version(void) {
  CHECK(strcmp(luamp_version(), LUAMP_VERSION) == 0);
}

/* ---- a Pool of C workers ------------------------------------------------ */

/* The host's C module: work.square(n) -> n*n, work.whoami() -> pid, and
 * work.collatz(n) -> the number of steps from n to 1, a CPU-bound task. */
static int work_square(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  lua_pushinteger(L, n * n);
  return 1;
}

static int work_whoami(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

static int work_collatz(lua_State *L) {
  uint64_t n = (uint64_t)luaL_checkinteger(L, 1);
  lua_Integer steps = 0;
  luaL_argcheck(L, n >= 1, 1, "must be positive");
  while (n != 1) {
    n = (n & 1) ? 3 * n + 1 : n / 2;
    steps++;
  }
  lua_pushinteger(L, steps);
  return 1;
}

/* A C function that no loaded module holds. */
static int not_in_a_module(lua_State *L) {
  lua_pushboolean(L, 1);
  return 1;
}

static int open_work(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"square", work_square}, {"whoami", work_whoami},
    {"collatz", work_collatz}, {NULL, NULL}
  };
  luaL_newlib(L, funcs);
  return 1;
}

static int c_collatz_steps(uint64_t n) {
  int steps = 0;
  while (n != 1) {
    n = (n & 1) ? 3 * n + 1 : n / 2;
    steps++;
  }
  return steps;
}

/* Children of this process, from /proc: all of them and the zombies. */
static void count_children(int *all, int *zombies) {
  DIR *d = opendir("/proc");
  struct dirent *e;
  pid_t me = getpid();
  *all = *zombies = 0;
  CHECK(d != NULL);
  while ((e = readdir(d)) != NULL) {
    char path[300], buf[512], state;
    const char *rp;
    FILE *f;
    int ppid;
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
    f = fopen(path, "r");
    if (f == NULL) continue;            /* gone meanwhile */
    if (fgets(buf, sizeof buf, f) != NULL &&
        (rp = strrchr(buf, ')')) != NULL &&
        sscanf(rp + 1, " %c %d", &state, &ppid) == 2 && ppid == me) {
      (*all)++;
      if (state == 'Z') (*zombies)++;
    }
    fclose(f);
  }
  closedir(d);
}

/* Calls obj:name(...) with the nargs values on top of the stack, under
 * lua_pcall; leaves nresults results, or prints the error and fails. */
static void call_method(lua_State *L, const char *name, int nargs, int nresults) {
  int obj = lua_gettop(L) - nargs;      /* the object sits below the args */
  lua_getfield(L, obj, name);
  lua_pushvalue(L, obj);
  lua_rotate(L, obj + 1, 2);            /* method, obj, args... */
  if (lua_pcall(L, nargs + 1, nresults, 0) != LUA_OK) {
    printf("# %s: %s\n", name, luaL_tolstring(L, -1, NULL));
    CHECK(!"method call failed");
  }
}

static void test_pool_of_c_workers(void) {
  const int n = 40;
  int all, zombies, pool_idx, res;
  lua_State *L = bare_state();
  luamp_preload(L);
  luaL_requiref(L, "work", open_work, 1);       /* package.loaded.work */
  lua_pop(L, 1);

  count_children(&all, &zombies);
  CHECK(all == 0);

  /* pool = require("multiprocessing").Pool(2) */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing");
  CHECK(lua_pcall(L, 1, 1, 0) == LUA_OK);
  lua_getfield(L, -1, "Pool");
  lua_pushinteger(L, 2);
  CHECK(lua_pcall(L, 1, 1, 0) == LUA_OK);
  pool_idx = lua_gettop(L);
  count_children(&all, &zombies);
  CHECK(all == 2 && zombies == 0);

  /* results = pool:map(work.collatz, {1..n}): the task is the C function
   * itself, found by name (package.loaded.work.collatz) in the workers */
  lua_pushvalue(L, pool_idx);
  CHECK(lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE) == LUA_TTABLE);
  lua_getfield(L, -1, "work");
  lua_getfield(L, -1, "collatz");
  lua_replace(L, -3);
  lua_pop(L, 1);                                /* pool, collatz */
  lua_createtable(L, n, 0);
  for (int i = 1; i <= n; i++) {
    lua_pushinteger(L, 1000 + i);
    lua_rawseti(L, -2, i);
  }
  call_method(L, "map", 2, 1);
  res = lua_gettop(L);
  CHECK(lua_type(L, res) == LUA_TTABLE);
  CHECK(luaL_len(L, res) == n);
  for (int i = 1; i <= n; i++) {
    CHECK(lua_rawgeti(L, res, i) == LUA_TNUMBER);
    CHECK(lua_tointeger(L, -1) == c_collatz_steps(1000 + (uint64_t)i));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  /* the same C functions called by a Lua task, and the pids they ran in */
  lua_pushvalue(L, pool_idx);
  lua_setglobal(L, "pool");
  CHECK(run(L,
    "local work = require 'work'\n"
    "local r = pool:map(function(x) return {work.square(x), work.whoami()} end,\n"
    "                   {1, 2, 3, 4, 5, 6, 7, 8}, 1)\n"
    "local me = work.whoami()\n"
    "for i, v in ipairs(r) do\n"
    "  assert(v[1] == i * i, 'square of ' .. i)\n"
    "  assert(v[2] ~= me, 'a task ran in the host')\n"
    "end\n"
    "assert(pool:apply(work.square, {-9}) == 81)"));
  /* a C worker's error comes back as a RemoteError with its message */
  CHECK(run(L,
    "local ok, e = pcall(pool.map, pool, require('work').collatz, {5, 0})\n"
    "assert(not ok and e.kind == 'RemoteError', tostring(e))\n"
    "assert(e.message:find('must be positive', 1, true), e.message)"));
  /* a C function no loaded module holds cannot travel: a clear error */
  lua_pushvalue(L, pool_idx);
  lua_pushcfunction(L, not_in_a_module);
  lua_setglobal(L, "unregistered");
  CHECK(run(L,
    "local u = unregistered\n"
    "local ok, e = pcall(pool.map, pool, function(x) return u() end, {1})\n"
    "assert(not ok and e.kind == 'EncodeError', tostring(e))\n"
    "assert(e.message:find('C function', 1, true), e.message)\n"));
  lua_pop(L, 1);

  /* pool:terminate(): every worker killed and reaped, no zombie left */
  lua_pushvalue(L, pool_idx);
  call_method(L, "terminate", 0, 0);
  count_children(&all, &zombies);
  CHECK(zombies == 0);
  CHECK(all == 0);
  lua_close(L);
  count_children(&all, &zombies);
  CHECK(all == 0);
}

static const struct tap_test tests[] = {
  {"preload", test_preload},
  {"luaL_requiref", test_requiref},
  {"version", test_version},
  {"several states, each with its encoder box", test_states_and_encoder_box},
  {"a Pool of C workers, driven from C", test_pool_of_c_workers},
  {NULL, NULL}
};

int main(void) { return tap_run(tests); }
