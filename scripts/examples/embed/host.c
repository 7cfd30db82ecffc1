/*
 * host.c -- a C program that embeds Lua 5.4 with libluamp.
 *
 *     host SCRIPT [ARGS...]
 *
 * It opens a Lua state with the standard libraries, makes
 * require "multiprocessing" available (luamp_preload), registers a module
 * of its own written in C ("host", with host.checksum), hooks the forks
 * the runtime makes (luamp_atfork), and runs SCRIPT with ARGS as "..."
 * and the global arg, as lua5.4 would.  An uncaught error prints a
 * traceback and exits with status 1.  checksums.lua, beside this file,
 * runs a Pool whose tasks call host.checksum in the workers.
 *
 * The C function is registered as a module (package.loaded.host) rather
 * than a bare global so that Lua code handed to worker processes can refer
 * to it: functions written in C travel between processes by name.
 *
 * Built by the Makefile as build/examples/embed-host, against the shared
 * libluamp (the spec runs it on checksums.lua beside this file).
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "luamp.h"

static lua_State *mainL;

/* host.checksum(s) -> 32-bit FNV-1a of the bytes of s: stands for the
 * C code a real host would want its workers to run. */
static int host_checksum(lua_State *L) {
  size_t len;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < len; i++) {
    h ^= s[i];
    h *= 16777619u;
  }
  lua_pushinteger(L, (lua_Integer)h);
  return 1;
}

/* What a host does around forks, with luamp_atfork: here it only counts
 * the forks its state made and notes, in a child, that it is a worker (a
 * real host would close its listening sockets, forget its event loop or
 * database handles and reseed its generators in at_fork_child). */
static int forks_made;       /* by this process, since it started */
static int is_worker;

static void at_fork_parent(void *ud) {
  (void)ud;
  forks_made++;
}

static void at_fork_child(void *ud) {
  (void)ud;
  is_worker = 1;
  forks_made = 0;            /* the parent's count is not the child's */
}

/* host.role() -> "worker" in a process forked by the runtime, else "main" */
static int host_role(lua_State *L) {
  lua_pushstring(L, is_worker ? "worker" : "main");
  return 1;
}

/* host.forks() -> how many forks this process made */
static int host_forks(lua_State *L) {
  lua_pushinteger(L, forks_made);
  return 1;
}

static int open_host(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"checksum", host_checksum},
    {"role", host_role},
    {"forks", host_forks},
    {NULL, NULL}
  };
  luaL_newlib(L, funcs);
  lua_pushliteral(L, "embed-host " LUAMP_VERSION);
  lua_setfield(L, -2, "name");
  return 1;
}

/* Ctrl-C as lua.c answers it, so that blocking luamp calls end with
 * "interrupted!" (see "Ctrl-C" in luamp.h). */
static void stop(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

static void on_sigint(int sig) {
  signal(sig, SIG_DFL);  /* a second Ctrl-C kills */
  lua_sethook(mainL, stop,
              LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

static int traceback(lua_State *L) {
  const char *msg = luaL_tolstring(L, 1, NULL);  /* error objects too */
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Loads and runs the script under traceback with the arguments; pushed by
 * main as a C function so that memory errors are caught too. */
static int run(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  luaL_openlibs(L);
  luamp_preload(L);
  luaL_requiref(L, "host", open_host, 1);
  lua_pop(L, 1);
  lua_createtable(L, argc, 1);           /* arg, as lua5.4 makes it */
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");
  lua_pushcfunction(L, traceback);
  if (luaL_loadfile(L, argv[1]) != LUA_OK) return lua_error(L);
  for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
  if (lua_pcall(L, argc - 2, 0, -(argc - 2) - 2) != LUA_OK)
    return lua_error(L);
  return 0;
}

int main(int argc, char **argv) {
  struct sigaction sa;
  int status;
  if (argc < 2) {
    fprintf(stderr, "usage: %s script.lua [args]\n", argv[0]);
    return 2;
  }
  mainL = luaL_newstate();
  if (mainL == NULL) return 1;
  if (luamp_atfork(NULL, at_fork_parent, at_fork_child, NULL) != 0) return 1;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;      /* no SA_RESTART: waits must see EINTR */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  lua_pushcfunction(mainL, run);
  lua_pushinteger(mainL, argc);
  lua_pushlightuserdata(mainL, argv);
  status = lua_pcall(mainL, 2, 0, 0);
  if (status != LUA_OK) {
    fprintf(stderr, "%s: %s\n", argv[0], luaL_tolstring(mainL, -1, NULL));
    fflush(stderr);
  }
  lua_close(mainL);
  return status == LUA_OK ? 0 : 1;
}
