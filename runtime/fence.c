/*
 * fence.c -- the write fence: manager writes are applied before this
 * process synchronises with another.
 *
 * A manager proxy's writes (d.k = v, l:append(v)...) are pipelined: sent
 * without waiting for the server (manager_client.lua).  That alone would let a
 * process write under a lock, release it, and have the next holder read
 * the old value from the server, whose loop had not reached the write
 * yet.  So every synchronisation point of this process -- releasing or
 * waiting on a lock, semaphore or condition, setting an event, a barrier
 * wait, a queue put, a pipe send, a spawn, a child's exit -- first makes
 * sure the writes it has sent are applied (release semantics, as a
 * memory fence orders stores before a lock release).
 *
 * C is mechanism, manager_client.lua is policy: the Lua side knows which
 * manager connections have unconfirmed writes, and sets
 * luamp_pending_writes while there are any; its flush function (stored
 * in the registry by core._set_write_fence) makes one round trip on each
 * and clears the flag.  A sync point costs one test of that flag when no
 * write is pending.
 *
 * The flag is process-wide and cleared in a forked child (the child sent
 * none of its parent's writes; manager_client.lua forgets them too).  A flush
 * never runs inside another (the flush itself talks to the managers over
 * connections marked as theirs, which are not sync points, but finalizers
 * may run anything).  In a program with several Lua states the flag
 * counts the states with writes waiting; a sync point runs its own
 * state's flush, which leaves the others' counts alone.
 */
#include <pthread.h>

#include "internal.h"

int luamp_pending_writes = 0;

static int flushing = 0;        /* a flush is running (no nesting) */
static const char FENCE_KEY = 'f';

/* (Written only when set: a forked child's every written page is a copy.) */
LUAMP_CHILD_PATH static void forget_in_child(void) {
  if (luamp_pending_writes != 0) luamp_pending_writes = 0;
}

/* Runs the fence function protected: 0 when done (or nothing to run),
 * else 1 with the error on top of the stack. */
int luamp_flush_writes_p(lua_State *L) {
  int st;
  if (flushing) return 0;
  luaL_checkstack(L, 2, "write fence");
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &FENCE_KEY) != LUA_TFUNCTION) {
    lua_pop(L, 1);
    return 0;
  }
  flushing = 1;
  st = lua_pcall(L, 0, 0, 0);
  flushing = 0;
  return st != LUA_OK;
}

void luamp_flush_writes(lua_State *L) {
  if (luamp_flush_writes_p(L)) lua_error(L);
}

/* A release must happen even when the flush fails (a dead manager, a
 * pipelined write the server refused, Ctrl-C): a lock left held would
 * hang every other process.  So the release runs, then the flush's error
 * is raised; an error of the release itself takes precedence. */
int luamp_flush_then_release(lua_State *L, lua_CFunction release) {
  int n = lua_gettop(L), failed, saved, st;
  failed = luamp_flush_writes_p(L);
  if (failed) lua_insert(L, 1);     /* the flush's error below the args */
  lua_pushcfunction(L, release);
  lua_insert(L, failed + 1);
  /* the release's own fence test must not bring us back here */
  saved = luamp_pending_writes;
  luamp_pending_writes = 0;
  st = lua_pcall(L, n, LUA_MULTRET, 0);
  luamp_pending_writes = saved;
  if (st != LUA_OK) return lua_error(L);
  if (failed) {
    lua_settop(L, 1);
    return lua_error(L);
  }
  return lua_gettop(L);
}

/* core._set_write_fence(fn): fn() is the flush (manager_client.lua) */
static int l_set_write_fence(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &FENCE_KEY);
  return 0;
}

/* core._writes_pending(bool): manager_client.lua says that its state now has
 * (true) or no longer has (false) writes waiting, on each change only.
 * The flag counts the states that have (a host may run several). */
static int l_writes_pending(lua_State *L) {
  if (lua_toboolean(L, 1)) luamp_pending_writes++;
  else if (luamp_pending_writes > 0) luamp_pending_writes--;
  return 0;
}

int luamp_open_fence(lua_State *L) {
  static int atfork_done = 0;
  static const luaL_Reg funcs[] = {
    {"_set_write_fence", l_set_write_fence},
    {"_writes_pending", l_writes_pending},
    {NULL, NULL}
  };
  if (!atfork_done) {
    pthread_atfork(NULL, NULL, forget_in_child);
    atfork_done = 1;
  }
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
