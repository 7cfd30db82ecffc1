/*
 * handle.c -- one shape for every handle type, and one way to fetch self.
 *
 * Every object the runtime hands to Lua (a Queue, a Lock, a Connection, a
 * child process...) is a userdata whose type is a named metatable, made
 * here from a static struct luamp_type: its metamethods (metameth[]), its
 * methods (meth[], the __index table, or the upvalue of an __index
 * function for types with fields), __name for luaL_typeerror and
 * luaL_tolstring.  luaL_newmetatable's guard makes registration happen
 * once per Lua state.  Methods whose table has _enter get with() and
 * guard() (sync.c) added in the same step.
 *
 * Every method and metamethod fetches self with luamp_self/luamp_self_of
 * (liolib's tolstream idea): the exact type, or one of the types the
 * method is registered on, else "bad argument #1 to 'close'
 * (multiprocessing.Queue expected, got FILE*)".  No function ever takes
 * "any userdata": a close that accepted one is how a wrong self used to
 * become a segfault, or a Queue's close() quietly closing a Lock.
 *
 * The shared-memory objects (struct luamp_obj, arena.c) are checked by
 * their tag -- a per-process secret mixed with the type name, stored in
 * the object -- so the check of the hot methods (a queue put, a lock
 * acquire) needs no metatable look-up; it answers the same question.
 * Every other type is checked by metatable, as luaL_checkudata does.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#include "internal.h"

/* Set once per process (inherited by forks, which keep their objects). */
static uint64_t tag_secret;

static void init_tag_secret(void) {
  uint64_t r = 0;
  if (luamp_sys.getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
    /* no entropy yet: pid, time and an address (ASLR) */
    r = (((uint64_t)luamp_pid() << 40) ^ (uint64_t)(luamp_now() * 1e9) ^
         (uint64_t)(uintptr_t)&tag_secret) * 0x9e3779b97f4a7c15ULL;
  tag_secret = r | 1;
}

uint64_t luamp_obj_tag(const char *tname) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  uint64_t h = 0xcbf29ce484222325ULL;   /* FNV-1a */
  pthread_once(&once, init_tag_secret);
  for (; *tname; tname++) h = (h ^ (unsigned char)*tname) * 0x100000001b3ULL;
  return h ^ tag_secret;
}

/* Pushes the method table of the registered metatable at the top (its
 * __index, or upvalue 1 of an __index function; nil when it has none). */
static void push_methods(lua_State *L) {
  if (lua_getfield(L, -1, "__index") == LUA_TFUNCTION) {
    if (lua_getupvalue(L, -1, 1) == NULL) lua_pushnil(L);
    lua_remove(L, -2);
  }
}

void luamp_newtype(lua_State *L, struct luamp_type *t) {
  if (t->is_obj) {
    t->tag = luamp_obj_tag(t->tname);
    t->size = sizeof(struct luamp_obj);
  }
  if (luaL_newmetatable(L, t->tname)) {   /* sets __name */
    if (t->metameth) luaL_setfuncs(L, t->metameth, 0);
    if (t->meth) {
      lua_newtable(L);
      luaL_setfuncs(L, t->meth, 0);
      if (lua_getfield(L, -1, "_enter") != LUA_TNIL) {
        lua_pop(L, 1);
        luaL_setfuncs(L, luamp_scoped_methods, 0);
      } else {
        lua_pop(L, 1);
      }
      if (t->index) lua_pushcclosure(L, t->index, 1);
      lua_setfield(L, -2, "__index");
    }
  }
  push_methods(L);
  lua_remove(L, -2);
}

/* Whether the value at idx (p its userdata block, or NULL) is of type t. */
static int is_type(lua_State *L, int idx, void *p,
                   const struct luamp_type *t) {
  if (t->is_obj)
    return p != NULL && lua_rawlen(L, idx) == sizeof(struct luamp_obj) &&
           ((struct luamp_obj *)p)->tag == t->tag && t->tag != 0;
  if (!lua_getmetatable(L, idx)) return 0;   /* (a table type too) */
  luaL_getmetatable(L, t->tname);
  {
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return same;
  }
}

static void *self_error(lua_State *L, int idx,
                        const struct luamp_type *const *set) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  /* "multiprocessing.Lock or RLock": the common prefix once */
  for (int i = 0; set[i]; i++) {
    const char *name = set[i]->tname;
    if (i > 0) {
      luaL_addstring(&b, set[i + 1] ? ", " : " or ");
      if (strncmp(name, "multiprocessing.", 16) == 0) name += 16;
    }
    luaL_addstring(&b, name);
  }
  luaL_pushresult(&b);
  luaL_typeerror(L, idx, lua_tostring(L, -1));
  return NULL;   /* not reached: luaL_typeerror raises */
}

void *luamp_self_of(lua_State *L, int idx,
                    const struct luamp_type *const *set) {
  void *p = lua_touserdata(L, idx);
  for (int i = 0; set[i]; i++)
    if (is_type(L, idx, p, set[i])) return p;
  return self_error(L, idx, set);
}

void *luamp_self_slow(lua_State *L, int idx, const struct luamp_type *t) {
  const struct luamp_type *set[2] = {t, NULL};
  return luamp_self_of(L, idx, set);
}

int luamp_is(lua_State *L, int idx, const struct luamp_type *t) {
  return is_type(L, idx, lua_touserdata(L, idx), t);
}
