/*
 * value.c -- Value, Array, RawValue and RawArray: typed numbers in
 * shared memory.
 *
 * One arena holds the header, the lock (an RLock, as Python's default)
 * and the elements.  A Value is an Array of one element that shows it as
 * v.value.  Elements are read and written with relaxed atomic loads and
 * stores of their natural width, so a reader never sees a torn number;
 * consistency across several operations is what get_lock() is for.
 * Integer Values also have atomic add() and compare_and_swap() (beyond
 * Python), which need no lock at all.
 *
 * Typecodes are Python's array module's, with C's sizes on this platform
 * (l and L are 64-bit on LP64 Linux, as CPython's ctypes c_long there).
 * L and Q hold 64-bit unsigned numbers as Lua integers with the same bits
 * (string.pack's "J" convention): values above math.maxinteger read back
 * negative.
 */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "internal.h"

#define VALUE_TNAME "multiprocessing.Value"
#define ARRAY_TNAME "multiprocessing.Array"
#define MAX_BYTES ((size_t)1 << 40)

enum { LOCK_NONE, LOCK_OWN, LOCK_OBJECT };

/* Written once by the creator, then read-only, except the lock and the
 * elements (which the lock or the atomics guard, as the user chooses). */
struct vhdr {
  uint32_t typecode;        /* the character */
  uint32_t lockmode;        /* LOCK_*: none, lock below, a Lock object */
  uint64_t n;               /* elements */
  uint32_t is_array;
  uint32_t pad;
  struct luamp_lock lock;   /* used when lockmode == LOCK_OWN */
};
#define DATA_OFF (LUAMP_ARENA_HDR + ((sizeof(struct vhdr) + 15) & ~(size_t)15))
#define LOCK_OFF (LUAMP_ARENA_HDR + offsetof(struct vhdr, lock))

struct tc {
  char code;
  unsigned char size;
  char kind;              /* 'i' signed, 'u' unsigned, 'f' float, 'c' char */
  const char *ctype;
};

static const struct tc typecodes[] = {
  {'b', 1, 'i', "signed char"}, {'B', 1, 'u', "unsigned char"},
  {'h', 2, 'i', "short"}, {'H', 2, 'u', "unsigned short"},
  {'i', 4, 'i', "int"}, {'I', 4, 'u', "unsigned int"},
  {'l', sizeof(long), 'i', "long"}, {'L', sizeof(long), 'u', "unsigned long"},
  {'q', 8, 'i', "long long"}, {'Q', 8, 'u', "unsigned long long"},
  {'f', 4, 'f', "float"}, {'d', 8, 'f', "double"},
  {'c', 1, 'c', "char"},
  {0, 0, 0, NULL}
};

static const struct tc *find_tc(int code) {
  for (const struct tc *t = typecodes; t->code; t++)
    if (t->code == code) return t;
  return NULL;
}

static const struct tc *check_tc(lua_State *L, int idx) {
  size_t len;
  const char *s;
  if (lua_type(L, idx) != LUA_TSTRING) luaL_typeerror(L, idx, "string");
  s = lua_tolstring(L, idx, &len);
  const struct tc *t = len == 1 ? find_tc(s[0]) : NULL;
  if (t == NULL)
    luaL_argerror(L, idx, lua_pushfstring(L, "bad typecode '%s' (must be "
                  "b, B, h, H, i, I, l, L, q, Q, f, d or c)", s));
  return t;
}

/* ---- elements ----------------------------------------------------------------- */

static uint64_t load_bits(const void *p, int size) {
  switch (size) {
    case 1: return __atomic_load_n((const uint8_t *)p, __ATOMIC_RELAXED);
    case 2: return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
    case 4: return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
    default: return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
  }
}

static void store_bits(void *p, int size, uint64_t v) {
  switch (size) {
    case 1: __atomic_store_n((uint8_t *)p, (uint8_t)v, __ATOMIC_RELAXED); break;
    case 2: __atomic_store_n((uint16_t *)p, (uint16_t)v, __ATOMIC_RELAXED); break;
    case 4: __atomic_store_n((uint32_t *)p, (uint32_t)v, __ATOMIC_RELAXED); break;
    default: __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); break;
  }
}

static int cas_bits(void *p, int size, uint64_t old, uint64_t new) {
  switch (size) {
    case 1: { uint8_t o = (uint8_t)old; return __atomic_compare_exchange_n(
        (uint8_t *)p, &o, (uint8_t)new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    case 2: { uint16_t o = (uint16_t)old; return __atomic_compare_exchange_n(
        (uint16_t *)p, &o, (uint16_t)new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    case 4: { uint32_t o = (uint32_t)old; return __atomic_compare_exchange_n(
        (uint32_t *)p, &o, (uint32_t)new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    default: { uint64_t o = old; return __atomic_compare_exchange_n(
        (uint64_t *)p, &o, new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
  }
}

/* The integer that bits of an element of type t hold. */
static lua_Integer bits_to_int(const struct tc *t, uint64_t b) {
  if (t->kind == 'i') {
    int shift = 64 - 8 * t->size;   /* sign-extend */
    return (lua_Integer)((int64_t)(b << shift) >> shift);
  }
  return (lua_Integer)b;   /* unsigned: the same bits */
}

static void push_elem(lua_State *L, const struct tc *t, const void *p) {
  uint64_t b = load_bits(p, t->size);
  if (t->kind == 'f') {
    if (t->size == 4) {
      uint32_t u = (uint32_t)b;
      float f;
      memcpy(&f, &u, 4);
      lua_pushnumber(L, (lua_Number)f);
    } else {
      double d;
      memcpy(&d, &b, 8);
      lua_pushnumber(L, (lua_Number)d);
    }
  } else if (t->kind == 'c') {
    char c = (char)b;
    lua_pushlstring(L, &c, 1);
  } else {
    lua_pushinteger(L, bits_to_int(t, b));
  }
}

/* The integer at idx checked against the range of t, as bits. */
static uint64_t int_to_bits(lua_State *L, const struct tc *t, lua_Integer v,
                            int idx) {
  if (t->size < 8) {
    lua_Integer lo, hi;
    int bits = 8 * t->size;
    /* in range: the value survives truncation to the type (the bounds
     * are computed for the error only) */
    if (t->kind == 'i' ?
        (int64_t)((uint64_t)v << (64 - bits)) >> (64 - bits) == v :
        (uint64_t)v >> bits == 0)
      return (uint64_t)v;
    if (t->kind == 'i') {
      hi = ((lua_Integer)1 << (8 * t->size - 1)) - 1;
      lo = -hi - 1;
    } else {
      lo = 0;
      hi = ((lua_Integer)1 << (8 * t->size)) - 1;
    }
    if (v < lo || v > hi)
      luaL_argerror(L, idx, lua_pushfstring(L, "%I out of range for "
                    "typecode '%c' (%I..%I)", v, t->code, lo, hi));
  }
  return (uint64_t)v;
}

/* Checks the Lua value at idx for an element of type t, as bits. */
static uint64_t check_elem(lua_State *L, const struct tc *t, int idx) {
  if (t->kind == 'f') {
    lua_Number n = luaL_checknumber(L, idx);
    if (t->size == 4) {
      float f = (float)n;
      uint32_t u;
      memcpy(&u, &f, 4);
      return u;
    } else {
      double d = (double)n;
      uint64_t u;
      memcpy(&u, &d, 8);
      return u;
    }
  }
  if (t->kind == 'c') {
    size_t len;
    if (lua_type(L, idx) == LUA_TNUMBER) {
      lua_Integer v = luaL_checkinteger(L, idx);
      luaL_argcheck(L, v >= 0 && v <= 255, idx, "char code out of range 0..255");
      return (uint64_t)v;
    }
    {
      const char *s = luaL_checklstring(L, idx, &len);
      luaL_argcheck(L, len == 1, idx, "a one-byte string expected");
      return (unsigned char)s[0];
    }
  }
  if (lua_type(L, idx) != LUA_TNUMBER) luaL_typeerror(L, idx, "number");
  {
    /* (luaL_checkinteger only for its error: a float with no integer
     * value; every v.value = x of an integer Value comes here) */
    int isint;
    lua_Integer v = lua_tointegerx(L, idx, &isint);
    if (!isint) v = luaL_checkinteger(L, idx);
    return int_to_bits(L, t, v, idx);
  }
}

/* ---- objects -------------------------------------------------------------------- */

struct vobj {
  struct vhdr *h;
  const struct tc *t;
  char *data;
};

/* o->flags caches the typecode's entry (index + 1) in this process.
 * (vfrom and vcheck inline: v.value's get and set run them every time,
 * and a call returning the struct through memory was a third of their
 * cost) */
static inline __attribute__((always_inline)) struct vobj vfrom(
    struct luamp_obj *o) {
  struct vobj v;
  v.h = (struct vhdr *)o->p;
  if (o->flags == 0) o->flags = (int)(find_tc((int)v.h->typecode) - typecodes) + 1;
  v.t = &typecodes[o->flags - 1];
  v.data = o->arena->base + DATA_OFF;
  return v;
}

/* The types (registered at the end of the file) and the sets of them a
 * function accepts as self: the types it is registered on. */
static struct luamp_type value_type, array_type;
static const struct luamp_type *const both[] = {
  &value_type, &array_type, NULL
};
static const struct luamp_type *const value_only[] = {&value_type, NULL};
static const struct luamp_type *const array_only[] = {&array_type, NULL};

/* self, open */
static inline __attribute__((always_inline)) struct vobj vcheck(
    lua_State *L, int idx, const struct luamp_type *const *set) {
  return vfrom(luamp_obj_self(L, idx, set, NULL));
}

/* The lock option at idx (an options table {lock = ...}, or the lock
 * value itself when the options came as one table): LOCK_* and, for
 * LOCK_OBJECT, the lock object left at the top of the stack. */
static int lock_option(lua_State *L, int idx, int raw) {
  int mode = raw ? LOCK_NONE : LOCK_OWN;
  if (raw || lua_isnoneornil(L, idx)) return mode;
  if (luamp_is_plain_table(L, idx))
    lua_getfield(L, idx, "lock");
  else
    lua_pushvalue(L, idx);
  if (lua_isnil(L, -1) || (lua_isboolean(L, -1) && lua_toboolean(L, -1))) {
    mode = LOCK_OWN;
  } else if (lua_isboolean(L, -1)) {
    mode = LOCK_NONE;
  } else if (luamp_lock_test(L, -1) != NULL) {
    return LOCK_OBJECT;
  } else {
    luaL_argerror(L, idx, "lock must be true, false, a Lock or an RLock");
  }
  lua_pop(L, 1);
  return mode;
}

/* Makes the object: n elements of t, lockmode; the lock object (for
 * LOCK_OBJECT) at lockidx. */
static void new_value(lua_State *L, const struct tc *t, uint64_t n,
                      int is_array, int lockmode, int lockidx) {
  struct luamp_arena *a;
  struct vhdr *h;
  luamp_obj_alloc(L, is_array ? ARRAY_TNAME : VALUE_TNAME, 1);
  if (lockmode == LOCK_OBJECT) {
    lua_pushvalue(L, lockidx);
    lua_setiuservalue(L, -2, 1);
  }
  a = luamp_arena_new(L, is_array ? "luamp-array" : "luamp-value",
                      DATA_OFF + (size_t)n * t->size, LUAMP_KIND_VALUE);
  h = (struct vhdr *)(a->base + LUAMP_ARENA_HDR);
  h->typecode = (uint32_t)t->code;
  h->lockmode = (uint32_t)lockmode;
  h->n = n;
  h->is_array = is_array != 0;
  luamp_lock_init(&h->lock, 1);
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
}

/* Value(typecode, init, opts) / RawValue(typecode, init) */
static int value_new(lua_State *L, int raw) {
  static const char *const keys[] = {"typecode", "value", "lock", NULL};
  const struct tc *t;
  int lockmode;
  luamp_opts_args(L, keys);
  t = check_tc(L, 1);
  lockmode = lock_option(L, 3, raw);
  int lockidx = lua_gettop(L);
  struct vobj v;
  uint64_t bits = 0;
  if (!lua_isnoneornil(L, 2)) bits = check_elem(L, t, 2);
  new_value(L, t, 1, 0, lockmode, lockidx);
  v = vfrom(lua_touserdata(L, -1));
  store_bits(v.data, t->size, bits);
  return 1;
}

static int l_Value(lua_State *L) { return value_new(L, 0); }
static int l_RawValue(lua_State *L) { return value_new(L, 1); }

/* Array(typecode, size_or_sequence, opts) / RawArray(typecode, ...) */
static int array_new(lua_State *L, int raw) {
  static const char *const keys[] = {"typecode", "init", "lock", "size",
                                     NULL};
  const struct tc *t;
  int lockmode, lockidx, arr;
  if (luamp_opts_args(L, keys) && lua_isnil(L, 2)) lua_copy(L, 4, 2);
  lua_settop(L, 3);
  t = check_tc(L, 1);
  lockmode = lock_option(L, 3, raw);
  lockidx = lua_gettop(L);
  lua_Integer n;
  struct vobj v;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    n = luaL_checkinteger(L, 2);
    luaL_argcheck(L, n >= 0, 2, "negative size");
  } else if (lua_type(L, 2) == LUA_TSTRING && t->kind == 'c') {
    n = (lua_Integer)lua_rawlen(L, 2);
  } else if (lua_type(L, 2) == LUA_TTABLE) {
    n = luaL_len(L, 2);
  } else {
    return luaL_typeerror(L, 2, t->kind == 'c' ? "size, table or string"
                                               : "size or table");
  }
  luaL_argcheck(L, (uint64_t)n <= MAX_BYTES / t->size, 2, "size too large");
  new_value(L, t, (uint64_t)n, 1, lockmode, lockidx);
  arr = lua_gettop(L);
  v = vfrom(lua_touserdata(L, arr));
  if (lua_type(L, 2) == LUA_TSTRING) {
    memcpy(v.data, lua_tostring(L, 2), (size_t)n);
  } else if (lua_type(L, 2) == LUA_TTABLE) {
    for (lua_Integer i = 1; i <= n; i++) {
      lua_geti(L, 2, i);
      if (lua_isnil(L, -1))
        luaL_argerror(L, 2, lua_pushfstring(L, "element %I is nil", i));
      store_bits(v.data + (size_t)(i - 1) * t->size, t->size,
                 check_elem(L, t, lua_gettop(L)));
      lua_pop(L, 1);
    }
  }
  lua_settop(L, arr);
  return 1;
}

static int l_Array(lua_State *L) { return array_new(L, 0); }
static int l_RawArray(lua_State *L) { return array_new(L, 1); }

/* get_lock(): the lock, as an RLock object (the same one every time). */
static int v_get_lock(lua_State *L) {
  struct vobj v = vcheck(L, 1, both);
  if (v.h->lockmode == LOCK_NONE)
    luamp_raise(L, "ValueError", "this %s has no lock (lock=false or Raw%s)",
                v.h->is_array ? "Array" : "Value",
                v.h->is_array ? "Array" : "Value");
  if (lua_getiuservalue(L, 1, 1) == LUA_TNIL) {
    struct luamp_obj *o = lua_touserdata(L, 1);
    lua_pop(L, 1);
    luamp_lock_push(L, o->arena, LOCK_OFF);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, 1, 1);
  }
  return 1;
}

/* get_obj(): Python's synchronized wrapper hands out the raw ctypes
 * object behind it for lock-free access.  Here the object is its own raw
 * object: v.value, a[i], #a and totable never take the lock (each
 * element is one atomic load or store, see the top of this file), so the
 * same userdata serves both roles -- same memory, same identity, every
 * process of the tree. */
static int v_get_obj(lua_State *L) {
  vcheck(L, 1, both);
  lua_settop(L, 1);
  return 1;
}

static struct luamp_lock *v_lock(lua_State *L) {
  struct luamp_lock *l;
  v_get_lock(L);
  l = luamp_lock_test(L, -1);
  lua_pop(L, 1);
  return l;
}

static int v_acquire(lua_State *L) {
  LUAMP_FENCE(L);
  struct luamp_lock *l = v_lock(L);
  int block = lua_isnoneornil(L, 2) || lua_toboolean(L, 2);
  double deadline = block ? luamp_deadline_arg(L, 3) : 0;
  lua_pushboolean(L, luamp_lock_acquire(L, l, block, deadline));
  return 1;
}

static int v_enter(lua_State *L) {
  LUAMP_FENCE(L);
  luamp_lock_acquire(L, v_lock(L), 1, -1.0);
  return 0;
}

static int v_release(lua_State *L) {
  LUAMP_FENCE_RELEASE(L, v_release);
  luamp_lock_release(L, v_lock(L));
  return 0;
}

static struct vobj check_int_value(lua_State *L, const char *what) {
  struct vobj v = vcheck(L, 1, value_only);
  if (v.t->kind != 'i' && v.t->kind != 'u')
    luamp_raise(L, "ValueError", "%s needs an integer typecode, not '%c'",
                what, v.t->code);
  return v;
}

/* v:add(n) -> the new value, atomically; raises if it leaves the range */
static int v_add(lua_State *L) {
  struct vobj v = check_int_value(L, "add");
  lua_Integer n = luaL_checkinteger(L, 2);
  for (;;) {
    uint64_t old = load_bits(v.data, v.t->size), new;
    lua_Integer cur = bits_to_int(v.t, old), sum;
    if (v.t->size == 8 && v.t->kind == 'u') {
      uint64_t u;
      if (n >= 0 ? __builtin_add_overflow(old, (uint64_t)n, &u)
                 : __builtin_sub_overflow(old, (uint64_t)0 - (uint64_t)n, &u))
        luamp_raise(L, "ValueError", "add: result out of range for '%c'",
                    v.t->code);
      new = u;
      sum = (lua_Integer)u;
    } else {
      if (__builtin_add_overflow(cur, n, &sum))
        luamp_raise(L, "ValueError", "add: result out of range for '%c'",
                    v.t->code);
      new = int_to_bits(L, v.t, sum, 2);
    }
    if (cas_bits(v.data, v.t->size, old, new)) {
      lua_pushinteger(L, sum);
      return 1;
    }
  }
}

/* v:compare_and_swap(old, new) -> true when the value was old and is now new */
static int v_cas(lua_State *L) {
  struct vobj v = check_int_value(L, "compare_and_swap");
  uint64_t old = int_to_bits(L, v.t, luaL_checkinteger(L, 2), 2);
  uint64_t new = int_to_bits(L, v.t, luaL_checkinteger(L, 3), 3);
  lua_pushboolean(L, cas_bits(v.data, v.t->size, old, new));
  return 1;
}

/* close(), __close and __gc */
static int v_close(lua_State *L) {
  luamp_obj_close(L, luamp_self_of(L, 1, both));
  return 0;
}

/* Whether the key k (n bytes, NULL: not a string) is the literal lit: a
 * length test and a memcmp of constant size, which the compiler inlines
 * (a strcmp call was a tenth of the C side of v.value = v.value + 1). */
#define KEY_IS(k, n, lit) \
  ((k) != NULL && (n) == sizeof(lit) - 1 && memcmp((k), lit, sizeof(lit) - 1) == 0)

/* The key at idx as a string, NULL when it is neither a string nor a
 * number.  (No lua_type test first: a number key is converted in this
 * call's own stack slot, and no number reads as a field name.) */
static const char *str_key(lua_State *L, int idx, size_t *n) {
  *n = 0;
  return lua_tolstring(L, idx, n);
}

/* v.value, v.typecode, then the methods (upvalue 1) */
static int value_index(lua_State *L) {
  size_t n;
  const char *k = str_key(L, 2, &n);
  if (KEY_IS(k, n, "value")) {
    struct vobj v = vcheck(L, 1, value_only);
    push_elem(L, v.t, v.data);
    return 1;
  }
  if (KEY_IS(k, n, "typecode")) {
    struct vobj v = vcheck(L, 1, value_only);
    lua_pushlstring(L, &v.t->code, 1);
    return 1;
  }
  luamp_self(L, 1, &value_type);
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int value_newindex(lua_State *L) {
  struct vobj v = vcheck(L, 1, value_only);
  size_t n;
  const char *k = str_key(L, 2, &n);
  if (!KEY_IS(k, n, "value"))
    return luamp_raise(L, "ValueError", "cannot set field '%s' of a Value "
                       "(only 'value')", luaL_tolstring(L, 2, NULL));
  store_bits(v.data, v.t->size, check_elem(L, v.t, 3));
  return 0;
}

/* Index i at idx, checked: 0-based element offset, or -1 for #a + 1 on a
 * read (the end of the sequence, so that ipairs stops). */
static lua_Integer array_pos(lua_State *L, struct vobj *v, int idx,
                             int reading) {
  lua_Integer i;
  int isint;
  i = lua_tointegerx(L, idx, &isint);
  if (!isint) luamp_raise(L, "ValueError", "Array index must be an integer");
  if (reading && (uint64_t)i == v->h->n + 1) return -1;
  if (i < 1 || (uint64_t)i > v->h->n)
    luamp_raise(L, "ValueError", "Array index %I out of range 1..%I", i,
                (lua_Integer)v->h->n);
  return i - 1;
}

static int array_index(lua_State *L) {
  if (lua_type(L, 2) == LUA_TNUMBER) {
    struct vobj v = vcheck(L, 1, array_only);
    lua_Integer i = array_pos(L, &v, 2, 1);
    if (i < 0) return 0;
    push_elem(L, v.t, v.data + (size_t)i * v.t->size);
    return 1;
  }
  if (lua_type(L, 2) == LUA_TSTRING) {
    const char *k = lua_tostring(L, 2);
    if (strcmp(k, "value") == 0 || strcmp(k, "raw") == 0) {
      struct vobj v = vcheck(L, 1, array_only);
      if (v.t->kind == 'c') {
        size_t len = (size_t)v.h->n;
        if (k[0] == 'v') len = strnlen(v.data, len);   /* up to a NUL */
        lua_pushlstring(L, v.data, len);
        return 1;
      }
    }
    if (strcmp(k, "typecode") == 0) {
      struct vobj v = vcheck(L, 1, array_only);
      lua_pushlstring(L, &v.t->code, 1);
      return 1;
    }
  }
  luamp_self(L, 1, &array_type);
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int array_newindex(lua_State *L) {
  struct vobj v = vcheck(L, 1, array_only);
  if (lua_type(L, 2) == LUA_TNUMBER) {
    lua_Integer i = array_pos(L, &v, 2, 0);
    store_bits(v.data + (size_t)i * v.t->size, v.t->size,
               check_elem(L, v.t, 3));
    return 0;
  }
  if (lua_type(L, 2) == LUA_TSTRING && v.t->kind == 'c' &&
      (strcmp(lua_tostring(L, 2), "value") == 0 ||
       strcmp(lua_tostring(L, 2), "raw") == 0)) {
    /* Python's c_char arrays: .value/.raw take a byte string */
    size_t len;
    const char *s = luaL_checklstring(L, 3, &len);
    if (len > v.h->n)
      luaL_argerror(L, 3, lua_pushfstring(L, "string of %I bytes too long "
                    "for an Array of %I", (lua_Integer)len,
                    (lua_Integer)v.h->n));
    memcpy(v.data, s, len);
    if (len < v.h->n && lua_tostring(L, 2)[0] == 'v') v.data[len] = '\0';
    return 0;
  }
  return luamp_raise(L, "ValueError", "cannot set field '%s' of an Array",
                     luaL_tolstring(L, 2, NULL));
}

static int array_len(lua_State *L) {
  struct vobj v = vcheck(L, 1, array_only);
  lua_pushinteger(L, (lua_Integer)v.h->n);
  return 1;
}

/* a:totable([i [, j]]) -> a plain Lua sequence of the elements i..j */
static int array_totable(lua_State *L) {
  struct vobj v = vcheck(L, 1, array_only);
  lua_Integer n = (lua_Integer)v.h->n;
  lua_Integer i = luaL_optinteger(L, 2, 1), j = luaL_optinteger(L, 3, n);
  if (i < 1) i = 1;
  if (j > n) j = n;
  /* a Lua table holds at most 2^31 - 1 items: refuse more at once rather
   * than grow one until memory runs out */
  if (j >= i && j - i >= INT_MAX)
    luaL_argerror(L, 3, lua_pushfstring(L, "%I elements do not fit in a Lua "
                  "table (at most %d: take a range)", j - i + 1, INT_MAX));
  lua_createtable(L, j >= i ? (int)(j - i + 1) : 0, 0);
  for (lua_Integer k = i; k <= j; k++) {
    push_elem(L, v.t, v.data + (size_t)(k - 1) * v.t->size);
    lua_rawseti(L, -2, k - i + 1);
  }
  return 1;
}

/* The bytes of the Array at idx, for a receive that writes into it
 * (conn:recv_bytes_into): any typecode, as Python's buffer of it, and
 * without taking its lock (Python writes into get_obj()).  NULL when idx
 * holds no Array; ValueError when it is closed. */
char *luamp_array_bytes(lua_State *L, int idx, size_t *n) {
  struct vobj v;
  if (!luamp_is(L, idx, &array_type)) return NULL;
  v = vcheck(L, idx, array_only);
  *n = (size_t)v.h->n * v.t->size;
  return v.data;
}

static int v_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, both);
  int is_array = luamp_is(L, 1, &array_type);
  if (o->arena == NULL) {
    lua_pushstring(L, is_array ? "<Array (closed)>" : "<Value (closed)>");
    return 1;
  }
  {
    struct vobj v = vcheck(L, 1, both);
    const char *raw = v.h->lockmode == LOCK_NONE ? "Raw" : "";
    if (is_array) {
      lua_pushfstring(L, "<%sArray('%c', %I)>", raw, v.t->code,
                      (lua_Integer)v.h->n);
    } else {
      push_elem(L, v.t, v.data);
      lua_pushfstring(L, "<%sValue('%c', %s)>", raw, v.t->code,
                      luaL_tolstring(L, -1, NULL));
    }
  }
  return 1;
}

static void value_decode(lua_State *L, const char *p, size_t n) {
  luamp_lockable_decode(L, p, n, VALUE_TNAME, LUAMP_KINDS(LUAMP_KIND_VALUE),
                        1);
}

static void array_decode(lua_State *L, const char *p, size_t n) {
  luamp_lockable_decode(L, p, n, ARRAY_TNAME, LUAMP_KINDS(LUAMP_KIND_VALUE),
                        1);
}

static const struct luamp_handle_ops handle_ops[] = {
  {VALUE_TNAME, luamp_lockable_encode, value_decode},
  {ARRAY_TNAME, luamp_lockable_encode, array_decode},
};

static const luaL_Reg value_meth[] = {
  {"get_lock", v_get_lock}, {"get_obj", v_get_obj}, {"acquire", v_acquire},
  {"release", v_release}, {"_enter", v_enter}, {"_exit", v_release},
  {"close", v_close}, {"add", v_add}, {"compare_and_swap", v_cas},
  {NULL, NULL}
};
static const luaL_Reg array_meth[] = {
  {"get_lock", v_get_lock}, {"get_obj", v_get_obj}, {"acquire", v_acquire},
  {"release", v_release}, {"_enter", v_enter}, {"_exit", v_release},
  {"close", v_close}, {"totable", array_totable}, {NULL, NULL}
};
static const luaL_Reg value_mm[] = {
  {"__newindex", value_newindex},
  {"__gc", v_close}, {"__close", v_close},
  {"__tostring", v_tostring}, {NULL, NULL}
};
static const luaL_Reg array_mm[] = {
  {"__newindex", array_newindex}, {"__len", array_len},
  {"__gc", v_close}, {"__close", v_close},
  {"__tostring", v_tostring}, {NULL, NULL}
};
static struct luamp_type value_type = {
  VALUE_TNAME, value_meth, value_mm, value_index, 1, 0, 0
};
static struct luamp_type array_type = {
  ARRAY_TNAME, array_meth, array_mm, array_index, 1, 0, 0
};

int luamp_open_value(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"Value", l_Value}, {"RawValue", l_RawValue},
    {"Array", l_Array}, {"RawArray", l_RawArray},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  if (lua_getfield(L, -1, "methods") != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods");
  }
  luamp_newtype(L, &value_type);
  lua_setfield(L, -2, "Value");              /* core.methods.Value */
  luamp_newtype(L, &array_type);
  lua_setfield(L, -2, "Array");
  lua_pop(L, 1);
  luamp_register_handle(L, &handle_ops[0]);
  luamp_register_handle(L, &handle_ops[1]);
  return 0;
}
