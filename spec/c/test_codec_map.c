/*
 * test_codec_map.c -- the encoder's identity map (a list scanned linearly
 * for the first MAP_LINEAR objects, then open addressing with linear
 * probing) against a plain model: objects registered, the map grown by
 * rehashing, then the last ones forgotten (a sequence that turned out not
 * to be one, the end of a message).  Every object kept must still be
 * found and every object forgotten must be gone: a lookup that misses a
 * kept object loses a shared reference, and a forgotten address left in
 * the map makes the next message's new object at that address look seen.
 * The map is static in codec.c, so this test compiles codec.c into itself.
 */
#include "../../runtime/codec.c"

#include "tap.h"

#include <lualib.h>

static uint64_t rng = 88172645463325252ULL;
static uint64_t next_rand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static void insert(struct encbox *b, const void *p) {
  CHECK(map_find(b, p) == 0);
  CHECK(map_add(b, p) == 0);
}

static int found(const struct encbox *b, const void *p) {
  return map_find(b, p) != 0;
}

static void truncate_keeps_lookups(void) {
  /* addresses like a heap's: close together, 16-byte aligned, so that
   * they cluster and wrap around the table's end */
  for (int trial = 0; trial < 3000; trial++) {
    struct encbox b;
    const void *ptrs[700];
    uint32_t n = 1 + (uint32_t)(next_rand() % 700), keep;
    uintptr_t base = 0x100000 + (uintptr_t)(next_rand() % 4096) * 16;
    memset(&b, 0, sizeof b);
    for (uint32_t i = 0; i < n; i++) {
      /* distinct: a random walk forward */
      base += 16 * (1 + next_rand() % 8);
      ptrs[i] = (const void *)base;
      insert(&b, ptrs[i]);
    }
    keep = (uint32_t)(next_rand() % (n + 1));
    map_truncate(&b, keep);
    CHECK(b.norder == keep);
    CHECK(b.hcount == (keep > MAP_LINEAR ? keep : 0));
    for (uint32_t i = 0; i < n; i++) {
      if (i < keep) {
        CHECK(found(&b, ptrs[i]));
        CHECK(map_find(&b, ptrs[i]) == i + 1);
      } else {
        CHECK(!found(&b, ptrs[i]));
      }
    }
    /* and to nothing, as at the end of every message */
    map_truncate(&b, 0);
    CHECK(b.hcount == 0);
    for (uint32_t i = 0; i < b.hcap; i++) CHECK(b.keys[i] == NULL);
    free(b.keys);
    free(b.vals);
    free(b.order);
    free(b.info);
  }
}

static int encode_top(lua_State *L) {
  size_t len;
  encode(L, NULL, 1, -1, NULL, 0, &len, NULL);
  return 0;
}

/* The encoder's loops leave their pairs on the stack (popping costs more
 * than pushing) and encode() resets it once: a C caller gets the stack it
 * had, after one pass, after two (a shared table), after a failure, and
 * for several values at once; the bytes decode to what was encoded. */
static void encode_leaves_the_stack(void) {
  static const char *const values[] = {
    "local t = {} for i = 1, 40 do t[i] = {i, {x = i}} end "
    "return {list = t, name = 'n', deep = {{{{1}}}}}",
    "local s = {1, 2} return {a = s, b = {s, s}, c = {[s] = s}}",
    "local t = {1, 2, 3} t.x = t return {t, t}",
    "return {1, 2, nil, 4, [10] = {{}}, [{}] = {1}}",
    NULL
  };
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  for (int i = 0; values[i]; i++) {
    size_t len;
    char *p;
    int top;
    CHECK(luaL_dostring(L, values[i]) == LUA_OK);
    lua_pushinteger(L, 7);   /* something above the value */
    top = lua_gettop(L);
    p = encode(L, NULL, -2, -1, NULL, 16, &len, NULL);
    CHECK(lua_gettop(L) == top);
    CHECK(len > 0 && p != NULL);
    luamp_decode(L, p + 16, len, 0);
    CHECK(lua_type(L, -1) == LUA_TTABLE);
    lua_settop(L, top);
    p = encode(L, NULL, top - 1, 2, NULL, 0, &len, NULL);   /* value, 7 */
    CHECK(lua_gettop(L) == top);
    CHECK(len > 1 && (unsigned char)p[0] == 0x92 &&
          (unsigned char)p[len - 1] == 7);
    lua_settop(L, 0);
  }
  /* a failure deep in a wide table: the error, and nothing else, left */
  CHECK(luaL_dostring(L, "local t = {} for i = 1, 30 do t[i] = {i} end "
                         "t[25][2] = coroutine.create(print) return t") ==
        LUA_OK);
  lua_pushcfunction(L, encode_top);
  lua_pushvalue(L, 1);
  CHECK(lua_pcall(L, 1, 0, 0) != LUA_OK);
  CHECK(lua_gettop(L) == 2);   /* the table, the error */
  lua_getfield(L, 2, "path");
  lua_rawgeti(L, -1, 1);
  CHECK(lua_tointeger(L, -1) == 25);
  lua_pop(L, 2);
  /* the encoder works on afterwards */
  {
    size_t len;
    lua_createtable(L, 0, 0);
    encode(L, NULL, -1, -1, NULL, 0, &len, NULL);
    CHECK(len == 1);
  }
  lua_close(L);
}

int main(void) {
  static const struct tap_test tests[] = {
    {"identity map: forgetting the last objects keeps the others findable", truncate_keeps_lookups},
    {"encode leaves the caller's stack as it found it", encode_leaves_the_stack},
    {NULL, NULL}
  };
  return tap_run(tests);
}
