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
 * Lua instruction (after a return in progress delivers its results).  C code blocked in a system call sees EINTR and the same
 * hook (luamp_interrupted in sys.c).  The disposition goes back to default
 * so that a second Ctrl-C kills a program stuck in C code. */
static void on_sigint(int sig) {
  const int mask = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
  signal(sig, SIG_DFL);
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
  /* back to what was there: the default for scripts, the REPL's own
   * handler between its chunks */
  sigaction(SIGINT, &old, NULL);
  lua_remove(L, base);
  return status;
}
