/*
 * errors.c -- the contract's error objects.
 *
 * A failure is raised as a table {kind=, message=[, errno=][, traceback=]
 * [, value=]} whose metatable gives tostring(err) == "<kind>: <message>",
 * followed by the remote traceback when there is one.  Errors are tables,
 * not strings, because callers branch on err.kind (Python's except
 * queue.Empty) and because remote errors carry the original value.
 * Every runtime failure in C goes through luamp_raise*; Lua code uses
 * core.raise / core.new_error, which share the same metatable.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "host.h"   /* luamp_msgh's other declaration: checked here */

static const char *const kinds[] = {
  "Empty", "Full", "TimeoutError", "EOFError", "BrokenPipeError",
  "ValueError", "ProcessError", "RemoteError", "WorkerLostError",
  "BrokenPoolError", "AuthenticationError", "EncodeError", "DecodeError",
  "BrokenBarrierError", "BufferTooShort", "FileExistsError",
  "FileNotFoundError", "OSError", "CancelledError", "ShutDown", "KeyError", NULL
};

static int valid_kind(const char *kind) {
  for (int i = 0; kinds[i]; i++)
    if (strcmp(kinds[i], kind) == 0) return 1;
  return 0;
}

void luamp_push_error(lua_State *L, const char *kind, const char *message) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, message);
  lua_setfield(L, -2, "message");
  luaL_setmetatable(L, LUAMP_ERROR_MT);
}

/* Whether a frame runs the library's own Lua code (multiprocessing/
 * NAME.lua, embedded or from LUA_PATH). */
static int is_ours(const lua_Debug *ar) {
  const char *s = ar->source, *slash = strrchr(s, '/');
  size_t n = strlen(s);
  return ar->what[0] != 'C' && s[0] == '@' && n > 4 &&
         strcmp(s + n - 4, ".lua") == 0 && slash != NULL &&
         slash - s >= 16 && memcmp(slash - 15, "multiprocessing", 15) == 0;
}

/* Pushes the user's position, "file:line", of a failure raised now: the
 * first frame above the raising C function that is not the library's;
 * nil when that frame is a C function (pcall(q.get, q)), which, as for
 * Lua's own errors, has no line. */
static void push_where(lua_State *L) {
  lua_Debug ar;
  for (int level = 1; lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "Sl", &ar);
    if (is_ours(&ar)) continue;
    if (ar.currentline > 0) {
      lua_pushfstring(L, "%s:%d", ar.short_src, ar.currentline);
      return;
    }
    break;
  }
  lua_pushnil(L);
}

/* Raises the error object kind with the message on top of the stack, led
 * by the user's "file:line: " (also in the field where), as error() leads
 * a string: a stock lua5.4 prints an uncaught error object's tostring
 * alone, with no traceback.  Replaces the message; returns with the
 * object on top, not raised. */
static void push_located_error(lua_State *L, const char *kind) {
  int msg = lua_gettop(L);
  push_where(L);                                   /* msg where */
  if (!lua_isnil(L, -1))
    lua_pushfstring(L, "%s: %s", lua_tostring(L, -1), lua_tostring(L, msg));
  else
    lua_pushvalue(L, msg);                         /* msg where text */
  luamp_push_error(L, kind, lua_tostring(L, -1));  /* msg where text err */
  lua_pushvalue(L, msg + 1);
  lua_setfield(L, -2, "where");                    /* (nil: no field) */
  lua_replace(L, msg);                             /* err where text */
  lua_settop(L, msg);
}

int luamp_raise(lua_State *L, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  push_located_error(L, kind);
  lua_error(L);
  __builtin_unreachable();
}

int luamp_raise_value(lua_State *L, const char *kind, int vidx,
                      const char *fmt, ...) {
  va_list ap;
  vidx = lua_absindex(L, vidx);
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  push_located_error(L, kind);
  lua_pushvalue(L, vidx);
  lua_setfield(L, -2, "value");
  lua_error(L);
  __builtin_unreachable();
}

/* The kind an errno gives, as Python's OSError(errno, ...) becomes the
 * subclass for that errno -- those of its subclasses the contract has:
 * a reset peer is a broken pipe here (no ConnectionResetError), and
 * ECONNREFUSED, EACCES and the rest stay OSError (the kinds are flat, so
 * a new one would escape every check for "OSError"). */
const char *luamp_errno_kind(int err) {
  switch (err) {
    case ENOENT: return "FileNotFoundError";
    case EEXIST: return "FileExistsError";
    case EPIPE: case ESHUTDOWN: case ECONNRESET: return "BrokenPipeError";
    case ETIMEDOUT: return "TimeoutError";
    default: return "OSError";
  }
}

int luamp_raise_errno(lua_State *L, const char *kind, int err,
                      const char *what) {
  if (kind == NULL || strcmp(kind, "OSError") == 0)
    kind = luamp_errno_kind(err);
  lua_pushfstring(L, "%s: %s", what, strerror(err));
  push_located_error(L, kind);
  lua_pushinteger(L, err);
  lua_setfield(L, -2, "errno");
  lua_error(L);
  __builtin_unreachable();
}

int luamp_raise_interrupt(lua_State *L) {
  /* The same message lua.c's hook raises, so hosts and users that match
   * on "interrupted!" see one thing whichever side noticed the signal.
   * The hook is the main thread's: cleared there too when L is another
   * thread (a wait in core.shielded's), or the same Ctrl-C would raise a
   * second time at the main thread's next instruction. */
  lua_State *main;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main = lua_tothread(L, -1);
  lua_pop(L, 1);
  /* (the interrupt hook as sys.c's luamp_interrupted knows it; not called
   * from here: sys.c calls this file) */
  if (main != NULL && main != L && lua_gethook(main) != NULL &&
      lua_gethookcount(main) == 1 &&
      lua_gethookmask(main) == (LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE |
                                LUA_MASKCOUNT))
    lua_sethook(main, NULL, 0, 0);
  lua_sethook(L, NULL, 0, 0);
  lua_pushliteral(L, "interrupted!");
  lua_error(L);
  __builtin_unreachable();
}

/* __tostring: "<kind>: <message>" and, when present, the traceback from
 * the process where the error happened. */
static int error_tostring(lua_State *L) {
  luaL_Buffer b;
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_buffinit(L, &b);
  lua_getfield(L, 1, "kind");
  luaL_addvalue(&b);
  luaL_addstring(&b, ": ");
  lua_getfield(L, 1, "message");
  if (!lua_isstring(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "?");
  }
  luaL_addvalue(&b);
  lua_getfield(L, 1, "traceback");
  if (lua_type(L, -1) == LUA_TSTRING && lua_rawlen(L, -1) > 0) {
    luaL_addchar(&b, '\n');
    luaL_addvalue(&b);
  } else {
    lua_pop(L, 1);
  }
  luaL_pushresult(&b);
  return 1;
}

/* core.new_error(kind, message [, fields]) -> error object */
static int l_new_error(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  const char *message = luaL_optstring(L, 2, "");
  if (!valid_kind(kind))
    return luaL_argerror(L, 1, lua_pushfstring(L, "unknown error kind '%s'",
                                               kind));
  luamp_push_error(L, kind, message);
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_settable(L, -4);
    }
  }
  return 1;
}

/* core.raise(kind, message [, fields]): raises the new error object */
static int l_raise(lua_State *L) {
  lua_settop(L, 3);
  l_new_error(L);
  return lua_error(L);
}

/* core.is_error(v [, kind]) -> boolean */
static int l_is_error(lua_State *L) {
  int ok = 0;
  if (lua_getmetatable(L, 1)) {
    luaL_getmetatable(L, LUAMP_ERROR_MT);
    ok = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (ok && !lua_isnoneornil(L, 2)) {
    lua_getfield(L, 1, "kind");
    ok = lua_rawequal(L, -1, 2);
    lua_pop(L, 1);
  }
  lua_pushboolean(L, ok);
  return 1;
}

int luamp_open_errors(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"new_error", l_new_error},
    {"raise", l_raise},
    {"is_error", l_is_error},
    {NULL, NULL}
  };
  if (luaL_newmetatable(L, LUAMP_ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "Error");
    lua_setfield(L, -2, "__name");
  }
  lua_setfield(L, -2, "Error");       /* core.Error = the metatable */
  luaL_setfuncs(L, funcs, 0);
  lua_createtable(L, (int)(sizeof kinds / sizeof kinds[0]) - 1, 0);
  for (int i = 0; kinds[i]; i++) {
    lua_pushstring(L, kinds[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "error_kinds");
  return 0;
}

/* LUAMP_ASSERT's failure (debug builds): says what and where, then
 * aborts -- an invariant the code relies on no longer holds, so going on
 * could corrupt shared memory other processes use. */
void luamp_assert_fail(const char *cond, const char *file, int line,
                       const char *func) {
  fprintf(stderr, "luamp: assertion failed: %s (%s:%d, %s)\n", cond, file,
          line, func);
  fflush(stderr);
  abort();
}

/* Message handler for lua_pcall: turns any error value into text with a
 * traceback.  Error objects with __tostring (the module's errors) keep
 * their text and get the traceback too, unlike lua.c, which drops it for
 * them.  One for the luamp host (host.c) and the children process.c
 * starts, so that an error reads the same from either. */
int luamp_msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)",
                            luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}
