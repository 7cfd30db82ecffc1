/*
 * host.c -- running a chunk for the luamp command: Ctrl-C, tracebacks and
 * error reports, shared by the command line (luamp.c) and the interactive
 * loop (repl.c), which both call here and never each other's internals.
 * Not part of libluamp.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "host.h"

const char *luamp_host_progname = "luamp";
#define progname luamp_host_progname
static lua_State *globalL = NULL;

/* ---- signals: Ctrl-C stops the running chunk ------------------------- */

/* Not at a return: the results reach the caller first, and the hook
 * raises at the caller's next instruction.  (lua.c's hook raises there
 * too, which drops what the call returned: an item a queue's get had
 * taken would be lost between the take and the caller.) */
static void stop_hook(lua_State *L, lua_Debug *ar) {
  if (ar->event == LUA_HOOKRET) return;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

/* The handler only installs a hook, which raises "interrupted!" at the next
 * Lua instruction (after a return in progress delivers its results).  C
 * code blocked in a system call sees EINTR and the same hook
 * (luamp_interrupted in sys.c), and takes it off as it raises.  The
 * handler stays in place, so every Ctrl-C raises again, as every Ctrl-C
 * raises KeyboardInterrupt in Python.  (lua.c puts the default back in
 * its handler, so its second Ctrl-C always kills.)  A Ctrl-C that finds
 * the previous one still pending -- the hook not run yet: the program is
 * in C code that does not look, in a coroutine (the hook is the main
 * thread's), or in a finalizer -- takes SIGINT's default action and ends
 * the process, as lua.c's second Ctrl-C does: a program stuck there can
 * still be stopped from the keyboard. */
static void on_sigint(int sig) {
  const int mask = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
  if (lua_gethook(globalL) == stop_hook) {
    signal(sig, SIG_DFL);
    raise(sig);  /* (blocked until this handler returns, then fatal) */
    return;
  }
  lua_sethook(globalL, stop_hook, mask, 1);
}

void luamp_host_sigint(void (*handler)(int), struct sigaction *old) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0; /* no SA_RESTART: blocked reads must see EINTR */
  sigaction(SIGINT, &sa, old);
}

/* ---- reporting ------------------------------------------------------ */

void luamp_host_message(const char *pname, const char *msg) {
  if (pname) fprintf(stderr, "%s: ", pname);
  fprintf(stderr, "%s\n", msg);
  fflush(stderr);
}

int luamp_host_report(lua_State *L, int status) {
  if (status != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    if (msg == NULL) msg = "(error object is not a string)";
    luamp_host_message(progname, msg);
    lua_pop(L, 1);
  }
  return status;
}

int luamp_host_docall(lua_State *L, int narg, int nres) {
  int status;
  int base = lua_gettop(L) - narg;
  lua_pushcfunction(L, luamp_msgh);
  lua_insert(L, base);
  struct sigaction old;
  globalL = L;
  luamp_host_sigint(on_sigint, &old);
  status = lua_pcall(L, narg, nres, base);
  /* back to what was there: the default for scripts (a Ctrl-C at exit,
   * where nothing could take it, ends the process as in lua5.4), the
   * REPL's own handler between its chunks */
  sigaction(SIGINT, &old, NULL);
  /* A Ctrl-C that came as the chunk ended found nothing to interrupt:
   * its hook must not fire in the REPL's next chunk. */
  if (lua_gethook(L) == stop_hook) lua_sethook(L, NULL, 0, 0);
  lua_remove(L, base);
  return status;
}
