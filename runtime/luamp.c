/*
 * luamp.c -- the luamp command: a lua5.4-compatible interpreter with the
 * multiprocessing module preloaded.
 *
 * Options, exit statuses, the arg table, LUA_INIT and error reports follow
 * the stock lua5.4 interpreter, so that "luamp" can replace "lua5.4" in any
 * command line.  The host knows nothing about the module beyond
 * luamp_preload(); the interactive loop lives in repl.c, and running a
 * chunk (Ctrl-C, tracebacks, error reports) in host.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"
#include "host.h"

#define progname luamp_host_progname

static void print_version(void) {
  printf("luamp %s -- %s\n", LUAMP_VERSION, LUA_COPYRIGHT);
  fflush(stdout);
}

static void print_usage(const char *badoption) {
  fprintf(stderr, "%s: ", progname);
  if (badoption[1] == 'e' || badoption[1] == 'l')
    fprintf(stderr, "'%s' needs argument\n", badoption);
  else
    fprintf(stderr, "unrecognized option '%s'\n", badoption);
  fprintf(stderr,
    "usage: %s [options] [script [args]]\n"
    "Available options are:\n"
    "  -e stat   execute string 'stat'\n"
    "  -i        enter interactive mode after executing 'script'\n"
    "  -l mod    require library 'mod' into global 'mod'\n"
    "  -l g=mod  require library 'mod' into global 'g'\n"
    "  -v        show version information\n"
    "  -E        ignore environment variables\n"
    "  -W        turn warnings on\n"
    "  --        stop handling options\n"
    "  -         stop handling options and execute stdin\n",
    progname);
  fflush(stderr);
}

/* ---- running chunks --------------------------------------------------- */

static int dochunk(lua_State *L, int status) {
  if (status == LUA_OK) status = luamp_host_docall(L, 0, 0);
  return luamp_host_report(L, status);
}

static int dofile(lua_State *L, const char *name) {
  return dochunk(L, luaL_loadfile(L, name));
}

static int dostring(lua_State *L, const char *s, const char *name) {
  return dochunk(L, luaL_loadbuffer(L, s, strlen(s), name));
}

/* "-l mod" or "-l g=mod": global g (or mod) = require(mod) */
static int dolibrary(lua_State *L, const char *spec) {
  const char *eq = strchr(spec, '=');
  const char *modname = eq ? eq + 1 : spec;
  int status;
  lua_getglobal(L, "require");
  lua_pushstring(L, modname);
  status = luamp_host_docall(L, 1, 1);
  if (status == LUA_OK) {
    if (eq) lua_pushlstring(L, spec, (size_t)(eq - spec));
    else lua_pushstring(L, spec);
    lua_insert(L, -2);
    lua_setglobal(L, lua_tostring(L, -2));
    lua_pop(L, 1);
  }
  return luamp_host_report(L, status);
}

/* Pushes arg[1..n] for the script and returns n. */
static int pushargs(lua_State *L) {
  int n;
  if (lua_getglobal(L, "arg") != LUA_TTABLE)
    luaL_error(L, "'arg' is not a table");
  n = (int)luaL_len(L, -1);
  luaL_checkstack(L, n + 3, "too many arguments to script");
  for (int i = 1; i <= n; i++) lua_rawgeti(L, -i, i);
  lua_remove(L, -n - 1);
  return n;
}

static int handle_script(lua_State *L, char **argv) {
  const char *fname = argv[0];
  int status;
  /* "-" means stdin, unless it came after "--" */
  if (strcmp(fname, "-") == 0 && strcmp(argv[-1], "--") != 0) fname = NULL;
  status = luaL_loadfile(L, fname);
  if (status == LUA_OK) {
    int n = pushargs(L);
    status = luamp_host_docall(L, n, LUA_MULTRET);
  }
  return luamp_host_report(L, status);
}

/* ---- command line ------------------------------------------------------ */

enum { OPT_ERROR = 1, OPT_I = 2, OPT_V = 4, OPT_E = 8, OPT_LOWER_E = 16 };

/* Scans the options.  *script gets the index of the script name (or argc
 * when there is none); returns the OPT_ bits, OPT_ERROR with *script at the
 * offending option. */
static int scan_options(char **argv, int *script) {
  int flags = 0, i;
  for (i = 1; argv[i]; i++) {
    const char *a = argv[i];
    *script = i;
    if (a[0] != '-') return flags;             /* the script */
    if (a[1] == '\0') return flags;            /* "-": stdin */
    if (a[1] == '-') {                         /* "--" */
      if (a[2] != '\0') return flags | OPT_ERROR;
      *script = i + 1;
      return flags;
    }
    switch (a[1]) {
      case 'E': case 'W': case 'i': case 'v':
        if (a[2] != '\0') return flags | OPT_ERROR;
        if (a[1] == 'E') flags |= OPT_E;
        if (a[1] == 'i') flags |= OPT_I | OPT_V;
        if (a[1] == 'v') flags |= OPT_V;
        break;
      case 'e': case 'l':
        if (a[1] == 'e') flags |= OPT_LOWER_E;
        if (a[2] == '\0') {
          i++;
          if (argv[i] == NULL || argv[i][0] == '-') {
            *script = i - 1;
            return flags | OPT_ERROR;
          }
        }
        break;
      default:
        return flags | OPT_ERROR;
    }
  }
  *script = i;
  return flags;
}

/* Runs -e, -l and -W in command-line order, up to the script. */
static int run_options(lua_State *L, char **argv, int n) {
  for (int i = 1; i < n; i++) {
    char opt = argv[i][1];
    if (opt == 'e' || opt == 'l') {
      const char *extra = argv[i][2] ? argv[i] + 2 : argv[++i];
      int status = opt == 'e' ? dostring(L, extra, "=(command line)")
                              : dolibrary(L, extra);
      if (status != LUA_OK) return 0;
    } else if (opt == 'W') {
      lua_warning(L, "@on", 0);
    }
  }
  return 1;
}

/* arg[0] is the script, negative indices the interpreter and options,
 * positive ones the script's arguments; with no script arg[0] is the
 * interpreter. */
static void create_arg_table(lua_State *L, char **argv, int argc, int script) {
  if (script == argc) script = 0;
  lua_createtable(L, argc - script - 1, script + 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

/* LUA_INIT_5_4, else LUA_INIT: "@file" runs the file, anything else is
 * Lua code. */
#define INIT_VAR "LUA_INIT"
#define INIT_VAR_VERSION INIT_VAR "_" LUA_VERSION_MAJOR "_" LUA_VERSION_MINOR

static int handle_luainit(lua_State *L) {
  const char *name = "=" INIT_VAR_VERSION;
  const char *init = getenv(name + 1);
  if (init == NULL) {
    name = "=" INIT_VAR;
    init = getenv(name + 1);
  }
  if (init == NULL) return LUA_OK;
  if (init[0] == '@') return dofile(L, init + 1);
  return dostring(L, init, name);
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = (char **)lua_touserdata(L, 2);
  int script = argc;
  int flags = argv[0] ? scan_options(argv, &script) : 0;
  luaL_checkversion(L);
  if (flags & OPT_ERROR) {
    print_usage(argv[script]);
    return 0;
  }
  if (flags & OPT_V) print_version();
  if (flags & OPT_E) {
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
  }
  luaL_openlibs(L);
  luamp_preload(L);
  create_arg_table(L, argv, argc, script);
  lua_gc(L, LUA_GCRESTART);
  lua_gc(L, LUA_GCGEN, 0, 0);
  if (!(flags & OPT_E) && handle_luainit(L) != LUA_OK) return 0;
  if (!run_options(L, argv, script)) return 0;
  if (script < argc && handle_script(L, argv + script) != LUA_OK) return 0;
  if (flags & OPT_I) {
    luamp_repl(L);
  } else if (script == argc && !(flags & (OPT_LOWER_E | OPT_V))) {
    if (isatty(STDIN_FILENO)) {
      print_version();
      luamp_repl(L);
    } else if (dofile(L, NULL) != LUA_OK) {
      return 0;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

int main(int argc, char **argv) {
  int status, ok;
  lua_State *L = luaL_newstate();
  if (argv[0] && argv[0][0]) progname = argv[0];
  if (L == NULL) {
    luamp_host_message(progname, "cannot create state: not enough memory");
    return EXIT_FAILURE;
  }
  lua_gc(L, LUA_GCSTOP);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 1, 0);
  ok = lua_toboolean(L, -1);
  luamp_host_report(L, status);
  lua_close(L);
  return (ok && status == LUA_OK) ? EXIT_SUCCESS : EXIT_FAILURE;
}
