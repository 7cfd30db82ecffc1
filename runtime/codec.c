/*
 * codec.c -- the message codec: MessagePack with luamp's extensions.
 *
 * Every message between luamp processes goes through here: Lua value ->
 * bytes -> Lua value.  Plain data is standard MessagePack (Python's
 * msgpack reads it with default options); what plain MessagePack cannot
 * say travels in application ext types:
 *
 *   1 REF      fixext4: uint32 id of an object DEFined earlier in the message
 *   2 DEF      ext32 wrapping the first occurrence of an object that occurs
 *              again (shared tables, cycles, recursive closures); DEFs are
 *              numbered in order of appearance from 0
 *   3 FUNC     ext32: bin bytecode (lua_dump), uint nups, nups values
 *   4 GLOBALS  ext8, empty: the globals table (rebound to the receiver's); an
 *              _ENV upvalue with a metatable (a view of the globals, as a
 *              sandbox or busted makes) is rebound the same way
 *   5 NAMED    a loaded module or a function of one, by name: str module,
 *              then nil or str field; resolved with require on receipt
 *   6 HANDLE   a runtime object (queue, lock...): str type name, bin bytes
 *   7 CLASS    a table of a registered class: str class name, state value
 *
 * Identity costs one pointer-hash insert per table on the way out and
 * nothing on the way in: the encoder notes every table and function it
 * meets; only when one turns up twice does it encode the message a second
 * time, now wrapping exactly the shared objects in DEF.  Plain data never
 * pays on decode.
 *
 * Errors.  The encoder returns -1 up its recursion instead of raising, so
 * that each level can prepend its step to the path in the message
 * ("args[2].file") and no state is left half-updated; the top raises
 * EncodeError.  All encoder memory lives in a userdata (struct encbox)
 * anchored in the registry, so nothing leaks if Lua raises regardless
 * (memory errors).  The decoder holds no heap memory and raises
 * DecodeError directly; every message ends with the byte offset.
 *
 * Trust.  Lua does not verify binary chunks, so FUNC, NAMED (require),
 * GLOBALS and HANDLE (attach) are made only by a trusted decode, as are
 * classes registered trusted_only (manager proxies: they connect).
 * mp.decode is untrusted unless told {trusted = true}; the transports pass
 * their own flag (pipes and queues of the tree, authenticated peers
 * trusted), so the check is one branch on flags already in hand.
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum {
  EXT_REF = 1, EXT_DEF = 2, EXT_FUNC = 3, EXT_GLOBALS = 4, EXT_NAMED = 5,
  EXT_HANDLE = 6, EXT_CLASS = 7
};
#define EXT_TIMESTAMP (-1)
/* Ext types 1..7 are luamp's own (above): an mp.Ext may not take them. */
#define EXT_RESERVED(t) ((t) >= EXT_REF && (t) <= EXT_CLASS)

static inline uint32_t r32(const unsigned char *p);
static inline uint64_t r64(const unsigned char *p);

/* What is wrong with a timestamp payload (ext -1: 4, 8 or 12 bytes,
 * nanoseconds below 10^9), or NULL.  Shared by the decoder and by
 * mp.Ext / the encoder, so nothing is written that would not be read. */
static const char *timestamp_fault(const unsigned char *p, size_t n,
                                   int64_t *sec, uint32_t *nsec) {
  if (n == 4) {
    *sec = r32(p);
    *nsec = 0;
  } else if (n == 8) {
    uint64_t v = r64(p);
    *nsec = (uint32_t)(v >> 34);
    *sec = (int64_t)(v & 0x3ffffffffULL);
  } else if (n == 12) {
    *nsec = r32(p);
    *sec = (int64_t)r64(p + 4);
  } else {
    return "malformed timestamp (payload of 4, 8 or 12 bytes expected)";
  }
  if (*nsec > 999999999u)
    return "malformed timestamp (nanoseconds above 999999999)";
  return NULL;
}

#define DEFAULT_MAX_DEPTH 256
#define PATH_STEPS 32   /* steps of an EncodeError's path kept as data */
/* Each level of nesting takes a few hundred bytes of C stack in the
 * recursive encoder and decoder: the limit keeps that within 2 MiB. */
#define MAX_DEPTH_LIMIT 5000
#define EXT_MT "multiprocessing.Ext"

/* Process-wide default nesting limit (encode and decode). */
static int max_depth = DEFAULT_MAX_DEPTH;
/* Identity tracking can be switched off to measure what it costs (the
 * benchmark does); without it a shared table is copied and a cycle fails
 * at the depth limit. */
static int track_refs = 1;

/* Registry keys (addresses only). */
static const char box_key = 0;      /* the encoder's reusable encbox */
static const char nested_key = 0;   /* encbox of a nested encode */
static const char names_key = 0;    /* value -> {module, field} name cache */
static const char handles_key = 0;  /* tname -> lightuserdata ops */
static const char classes_key = 0;  /* metatable -> class name */
static const char classdefs_key = 0;/* class name -> {mt, reduce, rebuild} */
static const char dumps_key = 0;    /* closure -> its bytecode (weak keys) */

/* ======================================================================
 * Encoder memory
 * ====================================================================== */

#define SHARED_BIT 0x80000000u
#define DEFID_MASK 0x7fffffffu

/* Everything the encoder allocates.  One box per lua_State is reused
 * across calls (no malloc per message); a nested encode (from a class
 * reducer) gets a box of its own. */
struct encbox {
  unsigned char *buf;       /* reserve bytes, then the message */
  size_t len, cap;
  /* open-addressing set: table/function pointer -> ordinal + 1; used
   * only past MAP_LINEAR objects (empty, hcount 0, until then) */
  const void **keys;
  uint32_t *vals;
  uint32_t hcap, hcount;
  /* ordinal -> pointer; info: SHARED_BIT | (DEF id + 1 in pass 2) */
  const void **order;
  uint32_t *info;
  uint32_t norder, ocap;
  int busy;
  const void *globals;      /* the state's globals table (never changes) */
};

/* Up to this many objects in a message, identity lookups scan order[]. */
#define MAP_LINEAR 16

static int encbox_gc(lua_State *L);
static const luaL_Reg encbox_mm[] = {{"__gc", encbox_gc}, {NULL, NULL}};
static struct luamp_type encbox_type = {
  "multiprocessing.encbox", NULL, encbox_mm, NULL, 0, 0, 0
};
static struct luamp_type ext_type = {EXT_MT, NULL, NULL, NULL, 0, 0, 0};

/* The box of the state whose main thread is box_thread (the first state
 * that loaded the codec), for mp.encode called from that thread without
 * reading its upvalue (~30 instructions of a small record's ~4.9k).
 * encbox_gc forgets it: lua_close collects the box before the thread. */
static lua_State *box_thread;
static struct encbox *box_of_thread;

static int encbox_gc(lua_State *L) {
  struct encbox *b = luamp_self(L, 1, &encbox_type);
  if (b == box_of_thread) {
    box_thread = NULL;
    box_of_thread = NULL;
  }
  free(b->buf);
  free(b->keys);
  free(b->vals);
  free(b->order);
  free(b->info);
  memset(b, 0, sizeof *b);
  return 0;
}

static struct encbox *new_encbox(lua_State *L) {
  struct encbox *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  luamp_newtype(L, &encbox_type);
  lua_pop(L, 1);
  luaL_setmetatable(L, encbox_type.tname);
  return b;
}

static uint32_t ptr_hash(const void *p) {
  uint64_t x = (uint64_t)(uintptr_t)p;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 29;
  return (uint32_t)x;
}

/* Slot of p, or of the empty slot where it would go. */
static uint32_t map_slot(const struct encbox *b, const void *p) {
  uint32_t mask = b->hcap - 1, i = ptr_hash(p) & mask;
  while (b->keys[i] != NULL && b->keys[i] != p) i = (i + 1) & mask;
  return i;
}

static int map_grow(struct encbox *b) {
  uint32_t ncap = b->hcap ? b->hcap * 2 : 64;
  const void **okeys = b->keys;
  uint32_t *ovals = b->vals, ocap = b->hcap;
  const void **nk = calloc(ncap, sizeof *nk);
  uint32_t *nv = malloc(ncap * sizeof *nv);
  if (!nk || !nv) {
    free(nk);
    free(nv);
    return -1;
  }
  b->keys = nk;
  b->vals = nv;
  b->hcap = ncap;
  for (uint32_t i = 0; i < ocap; i++) {
    if (okeys[i]) {
      uint32_t s = map_slot(b, okeys[i]);
      b->keys[s] = okeys[i];
      b->vals[s] = ovals[i];
    }
  }
  free(okeys);
  free(ovals);
  return 0;
}

/* Ordinal + 1 of p, 0 when p has not been seen.  A message with few
 * objects (most messages) is searched linearly: nothing to hash, nothing
 * to clear afterwards. */
static uint32_t map_find(const struct encbox *b, const void *p) {
  uint32_t s;
  if (b->hcount == 0) {
    for (uint32_t o = 0; o < b->norder; o++)
      if (b->order[o] == p) return o + 1;
    return 0;
  }
  s = map_slot(b, p);
  return b->keys[s] ? b->vals[s] : 0;
}

/* Registers p (not yet seen) under the next ordinal: in order[], and in
 * the hash too once there are more than MAP_LINEAR objects (then the hash
 * holds them all).  -1 when out of memory, with nothing changed. */
static int map_add(struct encbox *b, const void *p) {
  uint32_t from;
  if (b->norder == b->ocap) {
    uint32_t ncap = b->ocap ? b->ocap * 2 : 64;
    const void **no = realloc(b->order, ncap * sizeof *no);
    uint32_t *ni;
    if (no == NULL) return -1;
    b->order = no;
    ni = realloc(b->info, ncap * sizeof *ni);
    if (ni == NULL) return -1;
    b->info = ni;
    b->ocap = ncap;
  }
  if (b->norder < MAP_LINEAR) {
    b->order[b->norder++] = p;
    return 0;
  }
  from = b->norder == MAP_LINEAR ? 0 : b->norder;
  while ((b->norder + 1) * 2 > b->hcap)
    if (map_grow(b) < 0) return -1;
  b->order[b->norder++] = p;
  for (uint32_t o = from; o < b->norder; o++) {
    uint32_t s = map_slot(b, b->order[o]);
    b->keys[s] = b->order[o];
    b->vals[s] = o + 1;
    b->hcount++;
  }
  return 0;
}

/* Empties slot i and closes the gap: each entry after it in its cluster
 * moves back into the gap unless its home slot lies cyclically in
 * (gap, its slot].  (Clearing the slot alone would cut the probe chains
 * of the entries after it: removal in reverse order of insertion is not
 * enough once the table has been rehashed in slot order by map_grow.) */
static void map_remove_slot(struct encbox *b, uint32_t i) {
  uint32_t mask = b->hcap - 1, j = i;
  b->keys[i] = NULL;
  for (;;) {
    uint32_t home;
    j = (j + 1) & mask;
    if (b->keys[j] == NULL) return;
    home = ptr_hash(b->keys[j]) & mask;
    if (i <= j ? (i < home && home <= j) : (i < home || home <= j)) continue;
    b->keys[i] = b->keys[j];
    b->vals[i] = b->vals[j];
    b->keys[j] = NULL;
    i = j;
  }
}

/* Forgets the objects registered after the first keep.  (Each removal
 * from the hash closes its gap, so the lookups of the others, and of the
 * next message's objects, stay right: a slot left holding a dead object's
 * address would make a new object at that address look seen.) */
static void map_truncate(struct encbox *b, uint32_t keep) {
  if (keep >= b->norder) return;
  if (b->hcount > 0) {   /* hashed, hcount == norder */
    uint32_t stop = keep > MAP_LINEAR ? keep : 0;
    if (stop == 0 && b->hcount * 4 >= b->hcap) {   /* most: wipe */
      memset(b->keys, 0, b->hcap * sizeof *b->keys);
      b->hcount = 0;
    }
    while (b->hcount > stop) {
      map_remove_slot(b, map_slot(b, b->order[b->hcount - 1]));
      b->hcount--;
    }
  }
  b->norder = keep;
}

/* ======================================================================
 * Encoder
 * ====================================================================== */

struct enc {
  lua_State *L;
  struct encbox *b;
  int depth;
  int pass;              /* 1; 2 when shared objects get DEF/REF */
  int nshared;           /* objects seen twice in pass 1 */
  uint32_t ndefs;        /* DEFs written so far in pass 2 */
  const void *globals;
  int names_checked;     /* the name cache was validated in this encode */
  int hooks;             /* hook results are cached (see hook_cached) */
  int stack_ok;          /* the Lua stack has room up to this index */
  uint32_t fast_cap;     /* enter_object's inline path takes objects while
                          * fewer than this are known: pass 1 with tracking
                          * on, min(MAP_LINEAR, room in order[]); else 0 */
  int oom;
  char msg[160];         /* innermost failure */
  char path[400];        /* steps from the root to it, built outwards */
  size_t pathlen;
  /* the same steps as data for the error's path field, innermost first:
   * each one's length in path, and the integer when it is an index */
  struct { size_t len; int isint; lua_Integer i; } steps[PATH_STEPS];
  int nsteps;
  const struct luamp_slice *slice;  /* enc_values: a value sent as a slice */
};

static int grow(struct enc *e, size_t need) {
  struct encbox *b = e->b;
  size_t ncap = b->cap ? b->cap : 256;
  unsigned char *nb;
  if (b->len + need < b->len) goto oom;
  while (ncap < b->len + need) {
    if (ncap > SIZE_MAX / 2) goto oom;
    ncap *= 2;
  }
  nb = realloc(b->buf, ncap);
  if (nb == NULL) goto oom;
  b->buf = nb;
  b->cap = ncap;
  return 0;
oom:
  e->oom = 1;
  snprintf(e->msg, sizeof e->msg, "not enough memory for a %zu-byte message",
           b->len + need);
  return -1;
}

#define ROOM(e, n) \
  do { \
    if ((e)->b->cap - (e)->b->len < (size_t)(n) && grow((e), (n)) < 0) \
      return -1; \
  } while (0)

static inline unsigned char *wp(struct enc *e) {
  return e->b->buf + e->b->len;
}

static inline void w8(unsigned char *p, unsigned v) { p[0] = (unsigned char)v; }
static inline void w16(unsigned char *p, unsigned v) {
  p[0] = (unsigned char)(v >> 8);
  p[1] = (unsigned char)v;
}
static inline void w32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}
static inline void w64(unsigned char *p, uint64_t v) {
  w32(p, (uint32_t)(v >> 32));
  w32(p + 4, (uint32_t)v);
}

static int fail(struct enc *e, const char *fmt, ...)
    LUAMP_PRINTF(2, 3);

static int fail(struct enc *e, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->msg, sizeof e->msg, fmt, ap);
  va_end(ap);
  return -1;
}

/* Prepends one step to the error path (the failure is inside it); isint:
 * the step is the index i. */
static void path_step_i(struct enc *e, const char *step, int isint,
                        lua_Integer i) {
  size_t n = strlen(step), room = sizeof e->path - 1;
  if (n > room) n = room;
  if (e->nsteps == PATH_STEPS) {   /* keep the outer steps */
    memmove(e->steps, e->steps + 1, (PATH_STEPS - 1) * sizeof e->steps[0]);
    e->nsteps--;
  }
  e->steps[e->nsteps].len = n;
  e->steps[e->nsteps].isint = isint;
  e->steps[e->nsteps].i = i;
  e->nsteps++;
  if (e->pathlen + n > room) e->pathlen = room - n;  /* drop the tail */
  memmove(e->path + n, e->path, e->pathlen);
  memcpy(e->path, step, n);
  e->pathlen += n;
  e->path[e->pathlen] = '\0';
}

static void path_step(struct enc *e, const char *step) {
  path_step_i(e, step, 0, 0);
}

/* The step for the index i: [i]. */
static void path_index(struct enc *e, lua_Integer i) {
  char step[32];
  snprintf(step, sizeof step, "[%lld]", (long long)i);
  path_step_i(e, step, 1, i);
}

/* Pushes the path as data: the steps from the root inwards, an integer
 * for an index, else the step's text as in the message (".name",
 * '["odd key"]', "{upvalue 'u' of function at f.lua:3}"). */
static void push_path(lua_State *L, struct enc *e) {
  size_t at = 0;
  lua_createtable(L, e->nsteps, 0);
  for (int k = e->nsteps - 1, n = 1; k >= 0; k--, n++) {
    size_t len = e->steps[k].len;
    if (at + len > e->pathlen) break;   /* (the text lost its tail) */
    if (e->steps[k].isint) lua_pushinteger(L, e->steps[k].i);
    else lua_pushlstring(L, e->path + at, len);
    lua_rawseti(L, -2, n);
    at += len;
  }
}

static int is_identifier(const char *s, size_t n) {
  static const char *const reserved[] = {
    "and", "break", "do", "else", "elseif", "end", "false", "for",
    "function", "goto", "if", "in", "local", "nil", "not", "or", "repeat",
    "return", "then", "true", "until", "while", NULL
  };
  if (n == 0 || n > 40) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (i > 0 && c >= '0' && c <= '9')))
      return 0;
  }
  for (int i = 0; reserved[i]; i++)
    if (strlen(reserved[i]) == n && memcmp(reserved[i], s, n) == 0) return 0;
  return 1;
}

/* The step for key at stack index k: .name, ["text"], [3] or [table]. */
static void path_key(struct enc *e, int k) {
  lua_State *L = e->L;
  char step[64];
  switch (lua_type(L, k)) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, k)) {
        path_index(e, lua_tointeger(L, k));
        return;
      }
      snprintf(step, sizeof step, "[%.14g]", lua_tonumber(L, k));
      break;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, k, &n);
      if (is_identifier(s, n))
        snprintf(step, sizeof step, ".%s", s);
      else
        snprintf(step, sizeof step, "[\"%.*s%s\"]", n > 30 ? 30 : (int)n, s,
                 n > 30 ? "..." : "");
      break;
    }
    default:
      snprintf(step, sizeof step, "[%s key]", luaL_typename(L, k));
  }
  path_step(e, step);
}

/* Writes v's bytes (at most 9) at p; returns how many. */
static LUAMP_INLINE size_t int_bytes(unsigned char *p, lua_Integer v) {
  if (v >= 0) {
    uint64_t u = (uint64_t)v;
    if (u < 128) { p[0] = (unsigned char)u; return 1; }
    else if (u <= 0xff) { p[0] = 0xcc; p[1] = (unsigned char)u; return 2; }
    else if (u <= 0xffff) { p[0] = 0xcd; w16(p + 1, (unsigned)u); return 3; }
    else if (u <= 0xffffffffu) { p[0] = 0xce; w32(p + 1, (uint32_t)u); return 5; }
    else { p[0] = 0xcf; w64(p + 1, u); return 9; }
  } else {
    if (v >= -32) { p[0] = (unsigned char)(int8_t)v; return 1; }
    else if (v >= INT8_MIN) { p[0] = 0xd0; p[1] = (unsigned char)(int8_t)v; return 2; }
    else if (v >= INT16_MIN) { p[0] = 0xd1; w16(p + 1, (uint16_t)(int16_t)v); return 3; }
    else if (v >= INT32_MIN) { p[0] = 0xd2; w32(p + 1, (uint32_t)(int32_t)v); return 5; }
    else { p[0] = 0xd3; w64(p + 1, (uint64_t)v); return 9; }
  }
}

static LUAMP_INLINE int put_int(struct enc *e, lua_Integer v) {
  ROOM(e, 9);
  e->b->len += int_bytes(wp(e), v);
  return 0;
}

static LUAMP_INLINE int put_float(struct enc *e, double d) {
  struct encbox *b = e->b;
  unsigned char *p;
  uint64_t u;
  ROOM(e, 9);
  p = b->buf + b->len;
  memcpy(&u, &d, 8);
  p[0] = 0xcb;
  w64(p + 1, u);
  b->len += 9;
  return 0;
}

/* Strict UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF), as
 * Python's msgpack expects of str. */
static int utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c;
    if (i + 8 <= n) {
      uint64_t w;
      memcpy(&w, s + i, 8);
      if ((w & 0x8080808080808080ULL) == 0) {
        i += 8;
        continue;
      }
    }
    c = s[i];
    if (c < 0x80) {
      i++;
    } else if (c < 0xc2) {
      return 0;
    } else if (c < 0xe0) {
      if (i + 1 >= n || (s[i + 1] & 0xc0) != 0x80) return 0;
      i += 2;
    } else if (c < 0xf0) {
      if (i + 2 >= n || (s[i + 1] & 0xc0) != 0x80 ||
          (s[i + 2] & 0xc0) != 0x80)
        return 0;
      if (c == 0xe0 && s[i + 1] < 0xa0) return 0;
      if (c == 0xed && s[i + 1] >= 0xa0) return 0;
      i += 3;
    } else if (c < 0xf5) {
      if (i + 3 >= n || (s[i + 1] & 0xc0) != 0x80 ||
          (s[i + 2] & 0xc0) != 0x80 || (s[i + 3] & 0xc0) != 0x80)
        return 0;
      if (c == 0xf0 && s[i + 1] < 0x90) return 0;
      if (c == 0xf4 && s[i + 1] >= 0x90) return 0;
      i += 4;
    } else {
      return 0;
    }
  }
  return 1;
}

/* str when text is valid UTF-8, bin otherwise. */
static LUAMP_NOINLINE int put_string_any(struct enc *e, const char *s,
                                         size_t n, int force_str) {
  unsigned char *p;
  int str;
  str = force_str || utf8_valid((const unsigned char *)s, n);
  if (n > 0xffffffffu) return fail(e, "string of %zu bytes is too long", n);
  ROOM(e, n + 5);
  p = wp(e);
  if (str) {
    if (n < 32) { p[0] = (unsigned char)(0xa0 | n); e->b->len += 1; }
    else if (n <= 0xff) { p[0] = 0xd9; p[1] = (unsigned char)n; e->b->len += 2; }
    else if (n <= 0xffff) { p[0] = 0xda; w16(p + 1, (unsigned)n); e->b->len += 3; }
    else { p[0] = 0xdb; w32(p + 1, (uint32_t)n); e->b->len += 5; }
  } else {
    if (n <= 0xff) { p[0] = 0xc4; p[1] = (unsigned char)n; e->b->len += 2; }
    else if (n <= 0xffff) { p[0] = 0xc5; w16(p + 1, (unsigned)n); e->b->len += 3; }
    else { p[0] = 0xc6; w32(p + 1, (uint32_t)n); e->b->len += 5; }
  }
  memcpy(wp(e), s, n);
  e->b->len += n;
  return 0;
}

/* put_string_any, with short ASCII text (most keys and words) copied as
 * it is checked, inline: two overlapping loads from each end cover any
 * length up to 31 without a byte loop.  (Bytes stored past the string
 * when it is not ASCII are overwritten by put_string_any.) */
static LUAMP_INLINE int put_string(struct enc *e, const char *s, size_t n,
                                   int force_str) {
  struct encbox *b = e->b;
  if (n < 32 && b->cap - b->len >= 40) {
    unsigned char *p = b->buf + b->len + 1;
    uint64_t acc = 0;
    if (n >= 8) {
      uint64_t a, z;
      memcpy(&a, s, 8);
      memcpy(&z, s + n - 8, 8);
      if (n > 16) {
        uint64_t c, d;
        memcpy(&c, s + 8, 8);
        memcpy(&d, s + n - 16, 8);
        memcpy(p + 8, &c, 8);
        memcpy(p + n - 16, &d, 8);
        acc = c | d;
      }
      memcpy(p, &a, 8);
      memcpy(p + n - 8, &z, 8);
      acc |= a | z;
    } else if (n >= 4) {
      uint32_t a, z;
      memcpy(&a, s, 4);
      memcpy(&z, s + n - 4, 4);
      memcpy(p, &a, 4);
      memcpy(p + n - 4, &z, 4);
      acc = a | z;
    } else if (n > 0) {
      unsigned char a = (unsigned char)s[0], m = (unsigned char)s[n / 2],
                    z = (unsigned char)s[n - 1];
      p[0] = a;
      p[n / 2] = m;
      p[n - 1] = z;
      acc = a | m | z;
    }
    if ((acc & 0x8080808080808080ULL) == 0) {
      p[-1] = (unsigned char)(0xa0 | n);
      b->len += n + 1;
      return 0;
    }
  }
  return put_string_any(e, s, n, force_str);
}

static int put_array_header(struct enc *e, lua_Unsigned n) {
  unsigned char *p;
  if (n > 0xffffffffu) return fail(e, "table with %llu items is too long",
                                   (unsigned long long)n);
  ROOM(e, 5);
  p = wp(e);
  if (n < 16) { p[0] = (unsigned char)(0x90 | n); e->b->len += 1; }
  else if (n <= 0xffff) { p[0] = 0xdc; w16(p + 1, (unsigned)n); e->b->len += 3; }
  else { p[0] = 0xdd; w32(p + 1, (uint32_t)n); e->b->len += 5; }
  return 0;
}

/* ext32 header whose length is patched by end_ext(); returns its offset. */
static int begin_ext(struct enc *e, int type, size_t *at) {
  ROOM(e, 6);
  *at = e->b->len;
  wp(e)[0] = 0xc9;
  wp(e)[5] = (unsigned char)(int8_t)type;
  e->b->len += 6;
  return 0;
}

static int end_ext(struct enc *e, size_t at) {
  size_t n = e->b->len - at - 6;
  if (n > 0xffffffffu) return fail(e, "object too big for one message");
  w32(e->b->buf + at + 1, (uint32_t)n);
  return 0;
}

/* Smallest ext header for a payload of n bytes, then the payload. */
static int put_ext(struct enc *e, int type, const void *data, size_t n) {
  unsigned char *p;
  if (n > 0xffffffffu) return fail(e, "ext payload too big");
  ROOM(e, n + 6);
  p = wp(e);
  switch (n) {
    case 1: p[0] = 0xd4; p[1] = (unsigned char)(int8_t)type; e->b->len += 2; break;
    case 2: p[0] = 0xd5; p[1] = (unsigned char)(int8_t)type; e->b->len += 2; break;
    case 4: p[0] = 0xd6; p[1] = (unsigned char)(int8_t)type; e->b->len += 2; break;
    case 8: p[0] = 0xd7; p[1] = (unsigned char)(int8_t)type; e->b->len += 2; break;
    case 16: p[0] = 0xd8; p[1] = (unsigned char)(int8_t)type; e->b->len += 2; break;
    default:
      if (n <= 0xff) {
        p[0] = 0xc7; p[1] = (unsigned char)n; p[2] = (unsigned char)(int8_t)type;
        e->b->len += 3;
      } else if (n <= 0xffff) {
        p[0] = 0xc8; w16(p + 1, (unsigned)n); p[3] = (unsigned char)(int8_t)type;
        e->b->len += 4;
      } else {
        p[0] = 0xc9; w32(p + 1, (uint32_t)n); p[5] = (unsigned char)(int8_t)type;
        e->b->len += 6;
      }
  }
  memcpy(wp(e), data, n);
  e->b->len += n;
  return 0;
}

static int put_ref(struct enc *e, uint32_t id) {
  unsigned char v[4];
  w32(v, id);
  return put_ext(e, EXT_REF, v, 4);
}

/* Identity.  Returns 1 when p was already in this message (a REF is
 * written), 0 when p is new (registered; in pass 2 a shared object gets a
 * DEF header, *def set to its offset, else SIZE_MAX), -1 on failure. */
static LUAMP_NOINLINE int enter_object_any(struct enc *e, const void *p,
                                           size_t *def) {
  struct encbox *b = e->b;
  uint32_t o;
  if (!track_refs) return 0;
  o = map_find(b, p);
  if (o) {
    o--;
    if (e->pass == 1) {
      if (!(b->info[o] & SHARED_BIT)) {
        b->info[o] |= SHARED_BIT;
        e->nshared++;
      }
      return put_ref(e, 0) < 0 ? -1 : 1;
    }
    if ((b->info[o] & DEFID_MASK) == 0)
      return fail(e, "the value changed while it was being encoded");
    return put_ref(e, (b->info[o] & DEFID_MASK) - 1) < 0 ? -1 : 1;
  }
  if (map_add(b, p) < 0) goto oom;
  o = b->norder - 1;
  if (e->pass == 1) {
    b->info[o] = 0;
    e->fast_cap = b->ocap < MAP_LINEAR ? b->ocap : MAP_LINEAR;
  } else if (b->info[o] & SHARED_BIT) {
    b->info[o] = SHARED_BIT | ++e->ndefs;
    if (begin_ext(e, EXT_DEF, def) < 0) return -1;
  }
  return 0;
oom:
  e->oom = 1;
  return fail(e, "not enough memory");
}

/* enter_object_any, with the common case inline: pass 1, few objects so
 * far, p not among them (one compare with e->fast_cap says the first). */
static LUAMP_INLINE int enter_object(struct enc *e, const void *p,
                                     size_t *def) {
  struct encbox *b = e->b;
  uint32_t n = b->norder;
  *def = SIZE_MAX;
  if (n < e->fast_cap) {
    for (uint32_t o = 0; o < n; o++)
      if (b->order[o] == p) return enter_object_any(e, p, def);
    b->order[n] = p;
    b->info[n] = 0;
    b->norder = n + 1;
    return 0;
  }
  return enter_object_any(e, p, def);
}

static int leave_object(struct enc *e, size_t def) {
  return def == SIZE_MAX ? 0 : end_ext(e, def);
}

/* Where the encoder can roll back to (a table that turned out not to be
 * a sequence after all). */
struct mark { size_t len; uint32_t norder, ndefs; };

static struct mark mark_here(const struct enc *e) {
  struct mark m = {e->b->len, e->b->norder, e->ndefs};
  return m;
}

static void roll_back(struct enc *e, struct mark m) {
  struct encbox *b = e->b;
  if (e->pass == 2)
    for (uint32_t o = m.norder; o < b->norder; o++) b->info[o] &= SHARED_BIT;
  map_truncate(b, m.norder);
  e->b->len = m.len;
  e->ndefs = m.ndefs;
}

static int enc_value(struct enc *e, int idx);
static LUAMP_INLINE int enc_typed(struct enc *e, int idx, int t);
static LUAMP_INLINE int enc_typed_in(lua_State *L, struct enc *e, int idx,
                                     int t);
static LUAMP_NOINLINE int enc_table(struct enc *e, int idx, int top);

/* ---- names of modules and their functions --------------------------- */

/* Fills the name cache (on the stack top) from package.loaded: module
 * tables by module name, the functions in them by module and field.  _G
 * contributes only its C functions: a Lua function stored in a global is
 * user code and travels as bytecode. */
static void build_names(lua_State *L, int cache) {
  int loaded;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  loaded = lua_gettop(L);
  for (int round = 0; round < 2; round++) {  /* _G last, filling gaps */
    lua_pushnil(L);
    while (lua_next(L, loaded)) {
      int is_g = lua_type(L, -2) == LUA_TSTRING &&
                 strcmp(lua_tostring(L, -2), "_G") == 0;
      if (lua_type(L, -2) == LUA_TSTRING && lua_istable(L, -1) &&
          is_g == round) {
        int mod = lua_gettop(L);
        if (!is_g) {
          lua_pushvalue(L, mod);
          if (lua_rawget(L, cache) == LUA_TNIL) {
            lua_pushvalue(L, mod);
            lua_createtable(L, 1, 0);
            lua_pushvalue(L, mod - 1);
            lua_rawseti(L, -2, 1);
            lua_rawset(L, cache);
          }
          lua_pop(L, 1);
        }
        lua_pushnil(L);
        while (lua_next(L, mod)) {
          if (lua_type(L, -2) == LUA_TSTRING && lua_isfunction(L, -1) &&
              (!is_g || lua_iscfunction(L, -1))) {
            lua_pushvalue(L, -1);
            if (lua_rawget(L, cache) == LUA_TNIL) {
              lua_pushvalue(L, -2);
              lua_createtable(L, 2, 0);
              lua_pushvalue(L, mod - 1);
              lua_rawseti(L, -2, 1);
              lua_pushvalue(L, -5);
              lua_rawseti(L, -2, 2);
              lua_rawset(L, cache);
            }
            lua_pop(L, 1);
          }
          lua_pop(L, 1);
        }
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
}

/* Counts package.loaded's entries: the cache is rebuilt when it changed. */
static lua_Integer count_loaded(lua_State *L) {
  lua_Integer n = 0;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pop(L, 1);
    n++;
  }
  lua_pop(L, 1);
  return n;
}

/* Makes sure the name cache is current (checked once per encode): it is
 * rebuilt when package.loaded has changed size. */
static int need_names(struct enc *e) {
  lua_State *L = e->L;
  lua_Integer n;
  int fresh;
  if (e->names_checked) return 0;
  if (!lua_checkstack(L, 20)) return fail(e, "Lua stack overflow");
  n = count_loaded(L);
  fresh = 0;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key) == LUA_TTABLE) {
    lua_rawgetp(L, -1, &names_key);
    fresh = lua_isinteger(L, -1) && lua_tointeger(L, -1) == n;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  if (!fresh) {
    lua_newtable(L);
    build_names(L, lua_gettop(L));
    lua_pushinteger(L, n);
    lua_rawsetp(L, -2, &names_key);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &names_key);
  }
  e->names_checked = 1;
  return 0;
}

/* Writes a NAMED ext when the value at idx is a loaded module or one of
 * its functions: returns 1 if written, 0 if it has no name, -1 on error. */
static int put_named(struct enc *e, int idx) {
  lua_State *L = e->L;
  size_t at, n;
  const char *s;
  int r = -1;
  if (need_names(e) < 0) return -1;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) != LUA_TTABLE) {
    lua_pop(L, 2);
    return 0;
  }
  lua_rawgeti(L, -1, 1);
  lua_rawgeti(L, -2, 2);
  if (begin_ext(e, EXT_NAMED, &at) < 0) goto done;
  s = lua_tolstring(L, -2, &n);
  if (put_string(e, s, n, 1) < 0) goto done;
  if (lua_isnil(L, -1)) {
    if (e->b->cap - e->b->len < 1 && grow(e, 1) < 0) goto done;
    wp(e)[0] = 0xc0;
    e->b->len++;
  } else {
    s = lua_tolstring(L, -1, &n);
    if (put_string(e, s, n, 1) < 0) goto done;
  }
  r = end_ext(e, at) < 0 ? -1 : 1;
done:
  lua_pop(L, 4);
  return r;
}

/* ---- tables ------------------------------------------------------------ */

/* The stack in the encoder's hot loops.  lua_settop costs about twice
 * what lua_pushvalue does, so the loops over a table's pairs do not pop:
 * a copy of the key is pushed for the next lua_next call, and only once
 * the stack is NEXT_WINDOW slots above the loop's base does the key move
 * back down to base.  Encoding a table (enc_typed) may likewise leave its
 * pairs above the stack top it found; enc_value is the clean variant, and
 * encode() resets the stack once at the end (mp.encode not even that: Lua
 * drops what a C function leaves under its result).  32: a record with a
 * few small tables in it stays inside one window (16 wrapped once per
 * record of the bench: a lua_copy and a lua_settop, ~50 instructions). */
#define NEXT_WINDOW 32

/* After the pair at k, k + 1 (the stack ending at top): the slot where
 * lua_next will leave the next pair. */
static LUAMP_INLINE int next_slot(lua_State *L, int base, int k, int top) {
  if (top < base + NEXT_WINDOW) {
    lua_pushvalue(L, k);
    return top + 1;
  }
  lua_copy(L, k, base);
  lua_settop(L, base);
  return base;
}

/* next_slot for the key count of a sequence (pushed as the integer it
 * is: lua_pushinteger costs less than lua_pushvalue). */
static LUAMP_INLINE int next_index(lua_State *L, int base, lua_Unsigned count,
                                   int top) {
  if (top >= base + NEXT_WINDOW) {
    lua_settop(L, base - 1);
    top = base - 1;
  }
  lua_pushinteger(L, (lua_Integer)count);
  return top + 1;
}

/* A table's header goes in front of its items before their count is
 * known: one byte is reserved, widened to 3 when the count reaches 16 and
 * to 5 at 65536 (the items so far move up: at most 65535 of them, once),
 * and filled in at the end. */
struct header { size_t at, len; lua_Unsigned widen; };

static LUAMP_INLINE int begin_header(struct enc *e, struct header *h) {
  ROOM(e, 1);
  h->at = e->b->len;
  h->len = 1;
  h->widen = 16;
  e->b->len += 1;
  return 0;
}

static LUAMP_NOINLINE int widen_header(struct enc *e, struct header *h,
                                       size_t len) {
  unsigned char *p;
  ROOM(e, len - h->len);
  p = e->b->buf + h->at;
  memmove(p + len, p + h->len, e->b->len - h->at - h->len);
  e->b->len += len - h->len;
  h->len = len;
  h->widen = len == 3 ? 65536 : 0;   /* (0: no count reaches it) */
  return 0;
}

/* After an item: the header has room for count items.  (One compare
 * with the next count that needs a wider header: 16, then 65536.) */
static LUAMP_INLINE int count_item(struct enc *e, struct header *h,
                                   lua_Unsigned count) {
  if (count == h->widen) return widen_header(e, h, count == 16 ? 3 : 5);
  return 0;
}

/* An array (map: a map) of count items; the empty table is an empty
 * array.  (end_header below: a header still of one byte, under 16 items,
 * is filled in inline.) */
static LUAMP_NOINLINE int end_header_wide(struct enc *e, struct header *h,
                                          lua_Unsigned count, int map) {
  unsigned char *p = e->b->buf + h->at;
  if (count > 0xffffffffu) return fail(e, "table with too many items");
  if (h->len == 3) {
    p[0] = map ? 0xde : 0xdc;
    w16(p + 1, (unsigned)count);
  } else {
    p[0] = map ? 0xdf : 0xdd;
    w32(p + 1, (uint32_t)count);
  }
  return 0;
}

static LUAMP_INLINE int end_header(struct enc *e, struct header *h,
                                   lua_Unsigned count, int map) {
  if (h->len != 1) return end_header_wide(e, h, count, map);
  e->b->buf[h->at] = (unsigned char)((map && count > 0 ? 0x80 : 0x90) | count);
  return 0;
}

/* The pairs of a map, in one pass, from base up, under the header h;
 * pushed: lua_next has already left the first pair at base.  Returns the
 * stack top it leaves, -1 on failure (as the table loops below: the
 * caller of a table's encoding learns its top without lua_gettop). */
static LUAMP_INLINE int enc_map(struct enc *e, int idx, int base,
                                struct header *h, int pushed) {
  lua_State *L = e->L;
  lua_Unsigned count = 0;
  int k = base, tk, tv, top;
  if (!pushed) lua_pushnil(L);
  while (pushed || lua_next(L, idx)) {
    pushed = 0;
    tk = lua_type(L, k);
    if (enc_typed_in(L, e, k, tk) < 0) {
      path_key(e, k);
      path_step(e, "(key)");
      lua_settop(L, base - 1);
      return -1;
    }
    tv = lua_type(L, k + 1);
    top = tv == LUA_TTABLE ?
              enc_table(e, k + 1, tk == LUA_TTABLE ? 0 : k + 1) :
          enc_typed_in(L, e, k + 1, tv) < 0 ? -1 :
          tk == LUA_TTABLE ? lua_gettop(L) : k + 1;
    if (top < 0) {
      path_key(e, k);
      lua_settop(L, base - 1);
      return -1;
    }
    if (count_item(e, h, ++count) < 0) return -1;
    k = next_slot(L, base, k, top);
  }
  /* (lua_next popped the key at k) */
  return end_header(e, h, count, 1) < 0 ? -1 : k - 1;
}

/* A table that is not a sequence in traversal order: a sequence in
 * another order (keys 1..n in the hash part) or a map. */
static int enc_table_general(struct enc *e, int idx) {
  lua_State *L = e->L;
  lua_Unsigned count = 0, n = lua_rawlen(L, idx);
  struct header h;
  int seq = 1;
  lua_pushnil(L);
  while (seq && lua_next(L, idx)) {
    lua_Integer k;
    lua_pop(L, 1);
    count++;
    if (!lua_isinteger(L, -1) || (k = lua_tointeger(L, -1)) < 1 ||
        (lua_Unsigned)k > n) {
      seq = 0;
      lua_pop(L, 1);
    }
  }
  if (begin_header(e, &h) < 0) return -1;
  if (!seq || count != n) return enc_map(e, idx, lua_gettop(L) + 1, &h, 0);
  for (lua_Unsigned i = 1; i <= n; i++) {
    int top = lua_gettop(L), t = lua_rawgeti(L, idx, (lua_Integer)i);
    int r = enc_typed(e, top + 1, t);
    lua_settop(L, top);
    if (r < 0) {
      path_index(e, (lua_Integer)i);
      return -1;
    }
    if (count_item(e, &h, i) < 0) return -1;
  }
  return end_header(e, &h, n, 0) < 0 ? -1 : lua_gettop(L);
}

/* The items of the table at idx, the stack free from base up (room for
 * NEXT_WINDOW + 2 slots), in one pass for the common shapes: keys 1..n
 * in traversal order (a table's array part comes out in order) make an
 * array; a first key that is no integer, or an integer key in a table
 * without t[1], makes a map.  Anything else (keys 1..n out of order, a
 * sequence with more keys) is rolled back and goes the general way.
 * (Only the whole traversal proves a sequence has no other key: no API
 * call tells the array part's size.) */
static LUAMP_INLINE int enc_table_body(struct enc *e, int idx, int base) {
  lua_State *L = e->L;
  struct mark m = mark_here(e);
  struct header h;
  lua_Unsigned count = 0;
  int k = base, t, isint, top;
  if (begin_header(e, &h) < 0) return -1;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    isint = lua_isinteger(L, k);
    if (!isint || (lua_Unsigned)lua_tointeger(L, k) != count + 1) {
      if (count == 0 && (!isint || lua_rawlen(L, idx) == 0))
        return enc_map(e, idx, base, &h, 1);
      lua_settop(L, base - 1);
      roll_back(e, m);
      return enc_table_general(e, idx);
    }
    t = lua_type(L, k + 1);
    top = t == LUA_TTABLE ? enc_table(e, k + 1, k + 1) :
          enc_typed_in(L, e, k + 1, t) < 0 ? -1 : k + 1;
    if (top < 0) {
      path_key(e, k);
      lua_settop(L, base - 1);
      return -1;
    }
    if (count_item(e, &h, ++count) < 0) return -1;
    k = next_index(L, base, count, top);
  }
  return end_header(e, &h, count, 0) < 0 ? -1 : k - 1;
}

/* Hook results (class reducers, handle encoders) are computed once per
 * message: the second pass reuses the first's, so a hook with side effects
 * (a proxy counting references) runs once per encode.  The cache is a
 * registry table keyed by the encoder's box, dropped when encoding ends. */
static int hook_cached(struct enc *e, int idx) {
  lua_State *L = e->L;
  if (!e->hooks) return 0;
  lua_rawgetp(L, LUA_REGISTRYINDEX, e->b);
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

/* Remembers the hook result on top (left there) for the object at idx. */
static void hook_store(struct enc *e, int idx) {
  lua_State *L = e->L;
  if (!e->hooks) {
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, e->b);
    e->hooks = 1;
  }
  lua_rawgetp(L, LUA_REGISTRYINDEX, e->b);
  lua_pushvalue(L, idx);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

/* Calls f(v) with v at idx under pcall; leaves 1 result. */
static int call_hook(struct enc *e, int fidx, int idx, const char *what) {
  lua_State *L = e->L;
  lua_pushvalue(L, fidx);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    fail(e, "%s failed: %s", what,
         lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(error object)");
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* A table with a metatable, which lua_getmetatable has pushed: Ext
 * objects, registered classes; others lose their metatable (documented).
 * Returns 1 when handled.  (Out of line: the plain table's path keeps a
 * small frame.) */
static LUAMP_NOINLINE int enc_with_metatable(struct enc *e, int idx) {
  lua_State *L = e->L;
  int mt = lua_gettop(L);
  luaL_getmetatable(L, EXT_MT);
  if (lua_rawequal(L, -1, mt)) {
    size_t n;
    const char *data;
    lua_Integer type;
    lua_pop(L, 2);
    lua_getfield(L, idx, "exttype");
    lua_getfield(L, idx, "data");
    type = lua_tointeger(L, -2);
    data = lua_tolstring(L, -1, &n);
    if (!lua_isinteger(L, -2) || type < -128 || type > 127 || data == NULL) {
      lua_pop(L, 2);
      return fail(e, "Ext object needs integer exttype in -128..127 and "
                     "string data");
    }
    if (EXT_RESERVED(type)) {
      lua_pop(L, 2);
      return fail(e, "Ext type %d is reserved (1..7 are luamp's own)",
                  (int)type);
    }
    if (type == EXT_TIMESTAMP) {
      int64_t sec;
      uint32_t nsec;
      const char *fault =
          timestamp_fault((const unsigned char *)data, n, &sec, &nsec);
      if (fault) {
        lua_pop(L, 2);
        return fail(e, "%s", fault);
      }
    }
    if (put_ext(e, (int)type, data, n) < 0) {
      lua_pop(L, 2);
      return -1;
    }
    lua_pop(L, 2);
    return 1;
  }
  lua_pop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &classes_key);
  lua_pushvalue(L, mt);
  if (lua_rawget(L, -2) != LUA_TSTRING) {
    lua_pop(L, 3);
    return 0;
  }
  {
    size_t at, n;
    const char *name = lua_tolstring(L, -1, &n);
    int r;
    if (begin_ext(e, EXT_CLASS, &at) < 0 || put_string(e, name, n, 1) < 0) {
      lua_pop(L, 3);
      return -1;
    }
    lua_rawgetp(L, LUA_REGISTRYINDEX, &classdefs_key);
    lua_pushvalue(L, -2);
    lua_rawget(L, -2);
    lua_getfield(L, -1, "reduce");
    if (lua_isfunction(L, -1)) {
      if (!hook_cached(e, idx)) {
        if (call_hook(e, lua_gettop(L), idx, "class reducer") < 0) {
          lua_settop(L, mt - 1);
          return -1;
        }
        hook_store(e, idx);
      }
      e->depth++;
      r = enc_value(e, lua_gettop(L));
      e->depth--;
    } else {
      r = enc_table_body(e, idx, lua_gettop(L) + 1);
    }
    lua_settop(L, mt - 1);
    if (r < 0 || end_ext(e, at) < 0) return -1;
  }
  return 1;
}

/* (top: the stack's top when the caller knows it, else 0.)  Returns the
 * stack top it leaves (pairs of the table's loops may stay above top),
 * -1 on failure. */
static LUAMP_NOINLINE int enc_table(struct enc *e, int idx, int top) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  size_t def;
  int r;
  if (top == 0) top = lua_gettop(L);
  if (p == e->globals)
    return put_ext(e, EXT_GLOBALS, "", 0) < 0 ? -1 : top;
  if (e->depth >= max_depth)
    return fail(e, "nesting deeper than %d levels", max_depth);
  /* room for this level's pairs and a few more levels (the room
   * lua_checkstack makes stays while this C call lasts) */
  if (top + NEXT_WINDOW + 16 > e->stack_ok) {
    if (!lua_checkstack(L, 4 * NEXT_WINDOW))
      return fail(e, "Lua stack overflow");
    e->stack_ok = top + 4 * NEXT_WINDOW;
  }
  r = enter_object(e, p, &def);
  if (r != 0) return r < 0 ? -1 : top;
  e->depth++;
  r = lua_getmetatable(L, idx) ? enc_with_metatable(e, idx) : 0;
  if (r == 0) r = enc_table_body(e, idx, top + 1);
  else if (r > 0) r = top;   /* (enc_with_metatable leaves top as it was) */
  e->depth--;
  if (r < 0 || leave_object(e, def) < 0) return -1;
  return r;
}

/* ---- functions ------------------------------------------------------------ */

static int dump_writer(lua_State *L, const void *p, size_t n, void *ud) {
  struct enc *e = ud;
  (void)L;
  if (e->b->cap - e->b->len < n && grow(e, n) < 0) return 1;
  memcpy(wp(e), p, n);
  e->b->len += n;
  return 0;
}

static void upvalue_step(struct enc *e, int fidx, const char *name) {
  lua_State *L = e->L;
  lua_Debug ar;
  char step[200];
  lua_pushvalue(L, fidx);
  lua_getinfo(L, ">S", &ar);
  snprintf(step, sizeof step, "{upvalue '%s' of function at %s:%d}",
           name && *name ? name : "?", ar.short_src, ar.linedefined);
  path_step(e, step);
}

/* An environment that is a view of the globals: a table with a metatable
 * (a sandbox inheriting through __index, or a test framework's proxy).
 * Only a plain table without metatable is taken as a self-contained
 * environment and copied. */
static int is_global_view(struct enc *e, int idx) {
  lua_State *L = e->L;
  if (!lua_getmetatable(L, idx)) return 0;
  lua_pop(L, 1);
  return 1;
}

/* The function at idx's bytecode, as bin32.  A closure's bytecode never
 * changes, so it is dumped once and kept (weakly) by closure: sending the
 * same function again -- a pool task after task -- copies it and encodes
 * only the upvalues. */
static int enc_bytecode(struct enc *e, int idx) {
  lua_State *L = e->L;
  size_t bin;
  int r;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &dumps_key);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) == LUA_TSTRING) {
    size_t n;
    const char *code = lua_tolstring(L, -1, &n);
    unsigned char *p;
    /* bin32 as on the first dump, so that every encoding of a function
     * is the same bytes (the Pool recognises a function it has already
     * shipped by its encoding) */
    ROOM(e, n + 5);
    p = wp(e);
    p[0] = 0xc6;
    w32(p + 1, (uint32_t)n);
    memcpy(p + 5, code, n);
    e->b->len += n + 5;
    lua_pop(L, 2);
  } else {
    lua_pop(L, 1);
    ROOM(e, 5);
    bin = e->b->len;
    wp(e)[0] = 0xc6;
    e->b->len += 5;
    lua_pushvalue(L, idx);
    r = lua_dump(L, dump_writer, e, 0);
    lua_pop(L, 1);
    if (r != 0) {
      lua_pop(L, 1);
      return e->oom ? -1 : fail(e, "cannot dump function");
    }
    if (e->b->len - bin - 5 > 0xffffffffu) {
      lua_pop(L, 1);
      return fail(e, "function too big");
    }
    w32(e->b->buf + bin + 1, (uint32_t)(e->b->len - bin - 5));
    lua_pushvalue(L, idx);
    lua_pushlstring(L, (const char *)e->b->buf + bin + 5, e->b->len - bin - 5);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  return 0;
}

static int enc_function(struct enc *e, int idx) {
  lua_State *L = e->L;
  size_t def, at;
  lua_Debug ar;
  int r;
  r = put_named(e, idx);
  if (r != 0) return r < 0 ? -1 : 0;
  if (lua_iscfunction(L, idx))
    return fail(e, "cannot encode a C function that is not a field of a "
                   "loaded module");
  if (e->depth >= max_depth)
    return fail(e, "nesting deeper than %d levels", max_depth);
  if (!lua_checkstack(L, 8)) return fail(e, "Lua stack overflow");
  r = enter_object(e, lua_topointer(L, idx), &def);
  if (r != 0) return r < 0 ? -1 : 0;
  if (begin_ext(e, EXT_FUNC, &at) < 0) return -1;
  if (enc_bytecode(e, idx) < 0) return -1;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  if (put_int(e, ar.nups) < 0) return -1;
  e->depth++;
  for (int i = 1; i <= ar.nups; i++) {
    const char *name = lua_getupvalue(L, idx, i);
    int v = lua_gettop(L);
    r = 0;
    /* a module held in an upvalue (local cjson = require "cjson") goes by
     * name; an environment inheriting from the globals is rebound to the
     * receiver's globals; other tables are copied */
    if (lua_istable(L, v) && lua_topointer(L, v) != e->globals) {
      if (name && strcmp(name, "_ENV") == 0 && is_global_view(e, v))
        r = put_ext(e, EXT_GLOBALS, "", 0) < 0 ? -1 : 1;
      else
        r = put_named(e, v);
    }
    if (r == 0) r = enc_value(e, v);
    if (r < 0) {
      upvalue_step(e, idx, name);
      lua_pop(L, 1);
      e->depth--;
      return -1;
    }
    lua_pop(L, 1);
  }
  e->depth--;
  if (end_ext(e, at) < 0) return -1;
  return leave_object(e, def);
}

/* ---- userdata --------------------------------------------------------------- */

static int handle_encode_call(lua_State *L) {
  const struct luamp_handle_ops *ops = lua_touserdata(L, 2);
  lua_settop(L, 1);
  ops->encode(L, 1);
  return 1;
}

static int enc_userdata(struct enc *e, int idx) {
  lua_State *L = e->L;
  const struct luamp_handle_ops *ops = NULL;
  const char *tname = NULL;
  if (luaL_getmetafield(L, idx, "__name") == LUA_TSTRING) {
    tname = lua_tostring(L, -1);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &handles_key);
    lua_pushvalue(L, -2);
    lua_rawget(L, -2);
    ops = lua_touserdata(L, -1);
    lua_pop(L, 2);
  } else {
    lua_pushnil(L);
  }
  if (ops == NULL) {
    fail(e, "cannot encode a userdata (%s)", tname ? tname : "no type name");
    lua_pop(L, 1);
    return -1;
  }
  {
    size_t at, n;
    const char *data;
    int r;
    if (!hook_cached(e, idx)) {
      lua_pushcfunction(L, handle_encode_call);
      lua_pushvalue(L, idx);
      lua_pushlightuserdata(L, (void *)ops);
      if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        if (lua_type(L, -1) == LUA_TTABLE) lua_getfield(L, -1, "message");
        else lua_pushvalue(L, -1);
        fail(e, "cannot encode %s: %s", tname,
             lua_isstring(L, -1) ? lua_tostring(L, -1) : "(error object)");
        lua_pop(L, 3);
        return -1;
      }
      hook_store(e, idx);
    }
    data = lua_tolstring(L, -1, &n);
    r = begin_ext(e, EXT_HANDLE, &at) < 0 ||
        put_string(e, tname, strlen(tname), 1) < 0 ||
        put_string(e, data ? data : "", data ? n : 0, 0) < 0 ||
        end_ext(e, at) < 0;
    lua_pop(L, 2);
    return r ? -1 : 0;
  }
}

/* ---- dispatch ------------------------------------------------------------------ */

static LUAMP_NOINLINE int enc_object(struct enc *e, int idx, int t) {
  switch (t) {
    case LUA_TTABLE: return enc_table(e, idx, 0) < 0 ? -1 : 0;
    case LUA_TFUNCTION: return enc_function(e, idx);
    case LUA_TUSERDATA: return enc_userdata(e, idx);
    case LUA_TLIGHTUSERDATA: return fail(e, "cannot encode a light userdata");
    default: return fail(e, "cannot encode a %s", lua_typename(e->L, t));
  }
}

/* The value at idx, whose type is t; scalars are written inline (in the
 * loops over a table's items), objects by enc_object.  (L is e->L: the
 * loops pass the one they hold in a register, not reloaded after each
 * API call.) */
static LUAMP_INLINE int enc_typed_in(lua_State *L, struct enc *e, int idx,
                                     int t) {
  switch (t) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) return put_int(e, lua_tointeger(L, idx));
      return put_float(e, lua_tonumber(L, idx));
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      return put_string(e, s, n, 0);
    }
    case LUA_TBOOLEAN:
    case LUA_TNIL:
      ROOM(e, 1);
      wp(e)[0] = t == LUA_TNIL ? 0xc0 : lua_toboolean(L, idx) ? 0xc3 : 0xc2;
      e->b->len++;
      return 0;
    case LUA_TTABLE:
      return enc_table(e, idx, 0) < 0 ? -1 : 0;
    default:
      return enc_object(e, idx, t);
  }
}

static LUAMP_INLINE int enc_typed(struct enc *e, int idx, int t) {
  return enc_typed_in(e->L, e, idx, t);
}

/* enc_typed, leaving the stack as it found it. */
static int enc_value(struct enc *e, int idx) {
  lua_State *L = e->L;
  int top = lua_gettop(L), r = enc_typed(e, idx, lua_type(L, idx));
  lua_settop(L, top);
  return r;
}

static struct encbox *get_box(lua_State *L) {
  struct encbox *b;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key);
  b = lua_touserdata(L, -1);
  if (b == NULL) {
    lua_pop(L, 1);
    b = new_encbox(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &box_key);
  }
  if (b->busy) {
    /* an encode inside an encode (a class reducer sending something) */
    lua_pop(L, 1);
    b = new_encbox(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &nested_key);
  }
  return b;
}

/* Keeps a big buffer from one huge message from staying forever. */
static void trim_box(struct encbox *b) {
  if (b->cap > ((size_t)4 << 20)) {
    free(b->buf);
    b->buf = NULL;
    b->cap = 0;
  }
  if (b->hcap > 4096) {
    free(b->keys);
    free(b->vals);
    b->keys = NULL;
    b->vals = NULL;
    b->hcap = 0;
  }
}

/* The values idx .. idx+count-1 as one array (count >= 0), or the one
 * value at idx (count < 0). */
/* Items first..last of the table at idx as an array, read with raw gets
 * in index order: a slice of the caller's sequence with no table made for
 * it, and no lua_next (about 100 of a small item's ~275 instructions in
 * enc_sequence_fast, callgrind).  A hole goes as nil.  The items are
 * fetched SLICE_BATCH at a time, one lua_settop per batch. */
#define SLICE_BATCH 32
static int enc_slice(struct enc *e, int idx, const struct luamp_slice *sl) {
  lua_State *L = e->L;
  lua_Unsigned n = sl->last < sl->first ? 0 :
                   (lua_Unsigned)sl->last - (lua_Unsigned)sl->first + 1;
  int top = lua_gettop(L) + 1, types[SLICE_BATCH];
  if (!lua_checkstack(L, SLICE_BATCH + 8)) return fail(e, "no room to encode");
  if (put_array_header(e, n) < 0) return -1;
  for (lua_Unsigned k = 0; k < n;) {
    int b = n - k < SLICE_BATCH ? (int)(n - k) : SLICE_BATCH;
    for (int j = 0; j < b; j++)
      types[j] = lua_rawgeti(L, idx, (lua_Integer)((lua_Unsigned)sl->first + k + j));
    for (int j = 0; j < b; j++)
      if (enc_typed(e, top + j, types[j]) < 0) {
        path_index(e, (lua_Integer)(k + j) + 1);
        lua_settop(L, top - 1);
        return -1;
      }
    lua_settop(L, top - 1);
    k += (lua_Unsigned)b;
  }
  return 0;
}

static int enc_values(struct enc *e, int idx, int t, int count) {
  lua_State *L = e->L;
  if (count < 0) return enc_typed(e, idx, t);
  if (put_array_header(e, (lua_Unsigned)count) < 0) return -1;
  for (int k = 0; k < count; k++)
    if ((e->slice && k + 1 == e->slice->at
             ? enc_slice(e, idx + k, e->slice)
             : enc_typed(e, idx + k, lua_type(L, idx + k))) < 0) {
      path_index(e, k + 1);
      return -1;
    }
  return 0;
}

/* A message that is one number, boolean, nil or string of under 32 bytes
 * (a queue of small ints, a pipe of words) is written by the same put_*
 * functions into a static buffer, without the state's box (a registry
 * look-up) or the tracking set-up: these values never fail, nest, repeat
 * or run hooks.  Measured with callgrind: a small integer's encode fell
 * from ~480 to ~70 instructions, a third of a q:put(i).  (Static: the
 * runtime runs no threads, and an encode's result is only good until the
 * next encode anyway.) */
#define SCALAR_RESERVE 16          /* the callers' largest headroom (12) */
static unsigned char scalar_buf[SCALAR_RESERVE + 48];

static int is_scalar(lua_State *L, int idx, int t) {
  return t == LUA_TNUMBER || t == LUA_TBOOLEAN || t == LUA_TNIL ||
         (t == LUA_TSTRING && lua_rawlen(L, idx) < 32);
}

/* (room: 9 bytes for a number, 1 + 31 for a short string, so put_* never
 * grows -- reallocs -- the static buffer) */
static char *encode_scalar(lua_State *L, int idx, int t, size_t reserve,
                           size_t *len) {
  struct encbox b;
  struct enc e;
  b.buf = scalar_buf;
  b.len = reserve;
  b.cap = sizeof scalar_buf;
  e.L = L;
  e.b = &b;
  (void)enc_typed(&e, idx, t);
  *len = b.len - reserve;
  return (char *)scalar_buf;
}

/* The same for a message of up to SCALARS_MAX values that are all such
 * scalars (the Pool's task and reply records: tag, function's place,
 * mode, counts and small arguments or results).  Callgrind: a task of
 * eight scalars cost ~1.25k instructions through the box and tracking
 * set-up, ~300 so.  NULL when a value is not a scalar. */
#define SCALARS_MAX 16
static unsigned char scalars_buf[SCALAR_RESERVE + 8 + SCALARS_MAX * 32];

static char *encode_scalars(lua_State *L, int idx, int count, size_t reserve,
                            size_t *len) {
  struct encbox b;
  struct enc e;
  int types[SCALARS_MAX];
  for (int k = 0; k < count; k++) {
    types[k] = lua_type(L, idx + k);
    if (!is_scalar(L, idx + k, types[k])) return NULL;
  }
  b.buf = scalars_buf;
  b.len = reserve;
  b.cap = sizeof scalars_buf;
  e.L = L;
  e.b = &b;
  (void)put_array_header(&e, (lua_Unsigned)count);
  for (int k = 0; k < count; k++) (void)enc_typed(&e, idx + k, types[k]);
  *len = b.len - reserve;
  return (char *)scalars_buf;
}

/* Sets e up for an encode into the box b, which is busy from now on;
 * the stack has room for 4 * NEXT_WINDOW slots above top. */
static LUAMP_INLINE void enc_begin(lua_State *L, struct enc *e,
                                   struct encbox *b,
                                   const struct luamp_slice *slice, int top) {
  e->L = L;
  e->slice = slice;
  e->depth = 0;
  e->nshared = 0;
  e->ndefs = 0;
  e->names_checked = 0;
  e->hooks = 0;
  e->oom = 0;
  e->msg[0] = e->path[0] = '\0';
  e->pathlen = 0;
  e->nsteps = 0;
  e->stack_ok = top + 4 * NEXT_WINDOW;
  e->b = b;
  b->busy = 1;
  trim_box(b);
  if (b->globals == NULL) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    b->globals = lua_topointer(L, -1);
    lua_pop(L, 1);
  }
  e->globals = b->globals;
}

/* The value at idx of type t (count < 0) or the count values from idx
 * after reserve bytes: pass 1, and pass 2 with DEF/REF when objects
 * repeat.  (work: the stack top the passes start from.) */
static LUAMP_INLINE int enc_passes(lua_State *L, struct enc *e, int idx,
                                   int t, int count, size_t reserve,
                                   int work) {
  int r;
  e->pass = 1;
  for (;;) {
    e->fast_cap = e->pass == 1 && track_refs ?
                      (e->b->ocap < MAP_LINEAR ? e->b->ocap : MAP_LINEAR) : 0;
    e->b->len = 0;
    r = e->b->cap < reserve + 64 ? grow(e, reserve + 64) : 0;
    if (r == 0) {
      e->b->len = reserve;
      /* (a table on top: enc_table is told so) */
      r = count < 0 && t == LUA_TTABLE ?
              (enc_table(e, idx, idx == work ? idx : 0) < 0 ? -1 : 0) :
              enc_values(e, idx, t, count);
    }
    if (e->b->hcount == 0) e->b->norder = 0;   /* (map_truncate's fast case) */
    else map_truncate(e->b, 0);
    if (r < 0 || e->pass == 2 || e->nshared == 0) return r;
    lua_settop(L, work);
    e->pass = 2;   /* objects repeat: once more with DEF/REF */
  }
}

/* Drops the hook cache; frees the box; on failure raises the
 * EncodeError ("<reason> at <root><path>"; both as data). */
static LUAMP_NOINLINE void enc_end_slow(lua_State *L, struct enc *e, int r,
                                        const char *root) {
  if (e->hooks) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, e->b);
  }
  e->b->busy = 0;
  if (r < 0) {
    luamp_push_error(L, "EncodeError", lua_pushfstring(L, "%s at %s%s", e->msg,
                     root ? root : "value", e->path));
    lua_pushstring(L, e->msg);
    lua_setfield(L, -2, "reason");
    push_path(L, e);
    lua_setfield(L, -2, "path");
    lua_error(L);
  }
}

static LUAMP_INLINE void enc_end(lua_State *L, struct enc *e, int r,
                                 const char *root) {
  if (r < 0 || e->hooks) enc_end_slow(L, e, r, root);
  else e->b->busy = 0;
}

/* The value at idx, of type t (count < 0), or the count values from idx
 * as one array; the stack is left as it was unless leave (mp.encode, which
 * returns what it pushes next: the stack above is dropped by Lua). */
static char *encode_typed(lua_State *L, struct encbox *box, int idx, int t,
                          int count, const struct luamp_slice *slice,
                          size_t reserve, size_t *len, const char *root,
                          int leave) {
  struct enc e;
  int top, work, r;
  if (count < 0 && reserve <= SCALAR_RESERVE) {
    if (is_scalar(L, idx, t)) return encode_scalar(L, idx, t, reserve, len);
  } else if (count <= SCALARS_MAX && !slice && reserve <= SCALAR_RESERVE) {
    char *data = encode_scalars(L, lua_absindex(L, idx), count, reserve, len);
    if (data) return data;
  }
  if (idx < 0) idx = lua_absindex(L, idx);
  if (!lua_checkstack(L, 4 * NEXT_WINDOW))
    luaL_checkstack(L, 4 * NEXT_WINDOW, "no room to encode");
  top = lua_gettop(L);
  /* (box: the state's box, known to the caller; a nested encode, which
   * finds it busy, gets one of its own and leaves it on the stack) */
  work = top;   /* (the box stays anchored below work) */
  if (!box || box->busy) {
    box = get_box(L);
    work++;
  }
  enc_begin(L, &e, box, slice, top);
  r = enc_passes(L, &e, idx, t, count, reserve, work);
  if (!leave || r < 0) lua_settop(L, top);
  enc_end(L, &e, r, root);
  *len = e.b->len - reserve;
  return (char *)e.b->buf;
}

static char *encode(lua_State *L, struct encbox *box, int idx, int count,
                    const struct luamp_slice *slice, size_t reserve,
                    size_t *len, const char *root) {
  return encode_typed(L, box, idx, count < 0 ? lua_type(L, idx) : LUA_TNONE,
                      count, slice, reserve, len, root, 0);
}

/* An integer or an ASCII string under 32 bytes: the bytes luamp_encode
 * writes for it, written at out (LUAMP_SMALL_MAX bytes); returns how
 * many, or 0 for any other value.  A queue's put of one small item:
 * ~80 of its ~160 instructions of encoding were the general scalar
 * path's set-up (callgrind). */
size_t luamp_encode_small(lua_State *L, int idx, unsigned char *out) {
  if (lua_isinteger(L, idx)) return int_bytes(out, lua_tointeger(L, idx));
  if (lua_type(L, idx) == LUA_TSTRING) {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    if (n >= 32) return 0;
    for (size_t i = 0; i < n; i++)
      if ((unsigned char)s[i] >= 0x80) return 0;   /* utf8_valid's task */
    out[0] = (unsigned char)(0xa0 | n);
    memcpy(out + 1, s, n);
    return n + 1;
  }
  return 0;
}

char *luamp_encode(lua_State *L, int idx, size_t reserve, size_t *len,
                   const char *root) {
  return encode(L, NULL, idx, -1, NULL, reserve, len, root);
}

char *luamp_encode_values(lua_State *L, int idx, int count, size_t reserve,
                          size_t *len, const char *root) {
  return encode(L, NULL, idx, count < 0 ? 0 : count, NULL, reserve, len, root);
}

char *luamp_encode_slice(lua_State *L, int idx, int count,
                         const struct luamp_slice *slice, size_t reserve,
                         size_t *len, const char *root) {
  return encode(L, NULL, idx, count < 0 ? 0 : count, slice, reserve, len, root);
}

/* ======================================================================
 * Decoder
 * ====================================================================== */

struct dec {
  lua_State *L;
  const unsigned char *start, *p, *end;
  int depth, maxdepth, flags;
  int refs;            /* stack slot of the DEF table (nil until needed) */
  uint32_t nslots;     /* DEFs seen so far */
  uint32_t pending;    /* DEF slot for the next table or function made */
  int stack_ok;        /* the Lua stack has room up to this index */
};

static void dec_fail(struct dec *d, const char *what) LUAMP_NORETURN;
static void dec_fail(struct dec *d, const char *what) {
  luamp_raise(d->L, "DecodeError", "%s at byte %d", what,
              (int)(d->p - d->start));
  __builtin_unreachable();
}

/* DecodeError about the object whose encoding starts at byte at (a
 * module, class or handle that cannot be made here): fmt as
 * lua_pushfstring's, then the offset, as every DecodeError has. */
static void dec_failf(struct dec *d, const unsigned char *at,
                      const char *fmt, ...) LUAMP_NORETURN;
static void dec_failf(struct dec *d, const unsigned char *at,
                      const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushvfstring(d->L, fmt, ap);
  va_end(ap);
  luamp_raise(d->L, "DecodeError", "%s at byte %d", lua_tostring(d->L, -1),
              (int)(at - d->start));
  __builtin_unreachable();
}

#define NEED(d, n) \
  do { \
    if ((size_t)((d)->end - (d)->p) < (size_t)(n)) \
      dec_fail((d), "truncated input"); \
  } while (0)

static inline uint32_t r16(const unsigned char *p) {
  return (uint32_t)p[0] << 8 | p[1];
}
static inline uint32_t r32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t r64(const unsigned char *p) {
  return (uint64_t)r32(p) << 32 | r32(p + 4);
}

static void dec_value(struct dec *d);

/* A freshly made table or function on top takes the pending DEF slot. */
static void take_slot(struct dec *d) {
  if (d->pending) {
    lua_pushvalue(d->L, -1);
    lua_rawseti(d->L, d->refs, d->pending);
    d->pending = 0;
  }
}

/* n free Lua stack slots for what the caller pushes (exts push several
 * values beyond the 4 enter() keeps per level). */
static void room(struct dec *d, int n) {
  if (!lua_checkstack(d->L, n)) dec_fail(d, "nesting too deep for the Lua stack");
}

/* A level of nesting, with 4 free stack slots; lua_checkstack (about
 * four times lua_gettop's cost) once per 64 slots: the room it makes
 * stays while the C call lasts. */
static void enter(struct dec *d) {
  int top = lua_gettop(d->L);
  if (++d->depth > d->maxdepth) dec_fail(d, "nesting too deep");
  if (top + 4 > d->stack_ok) {
    if (!lua_checkstack(d->L, 64))
      dec_fail(d, "nesting too deep for the Lua stack");
    d->stack_ok = top + 64;
  }
}

/* One item of an array: numbers inline (small ints, doubles, 16 and
 * 32-bit unsigned), as bulk arrays are mostly numbers. */
static LUAMP_INLINE void dec_item(struct dec *d) {
  const unsigned char *p = d->p;
  if (p < d->end && *p <= 0x7f) {
    lua_pushinteger(d->L, *p);
    d->p++;
  } else if (p + 9 <= d->end && *p == 0xcb) {
    uint64_t u = r64(p + 1);
    double f;
    memcpy(&f, &u, 8);
    lua_pushnumber(d->L, f);
    d->p += 9;
  } else if (p + 3 <= d->end && *p == 0xcd) {
    lua_pushinteger(d->L, r16(p + 1));
    d->p += 3;
  } else if (p + 5 <= d->end && *p == 0xce) {
    lua_pushinteger(d->L, r32(p + 1));
    d->p += 5;
  } else {
    dec_value(d);
  }
}

static void dec_array(struct dec *d, uint32_t n) {
  lua_State *L = d->L;
  if (n > (size_t)(d->end - d->p)) dec_fail(d, "array longer than the input");
  enter(d);
  lua_createtable(L, (int)n, 0);
  take_slot(d);
  for (uint32_t i = 1; i <= n; i++) {
    dec_item(d);
    lua_rawseti(L, -2, i);
  }
  d->depth--;
}

/* An array whose header is at d->p, its items set into the table at
 * tidx at keys at+1, at+2, ... (raw), which is pushed in its place.
 * Returns 0, having read nothing, when d->p holds no array. */
static int dec_array_into(struct dec *d, int tidx, lua_Integer at) {
  lua_State *L = d->L;
  const unsigned char *p = d->p;
  uint32_t n;
  if (p < d->end && *p >= 0x90 && *p <= 0x9f) {
    n = *p & 0x0f;
    d->p += 1;
  } else if (p + 3 <= d->end && *p == 0xdc) {
    n = r16(p + 1);
    d->p += 3;
  } else if (p + 5 <= d->end && *p == 0xdd) {
    n = r32(p + 1);
    d->p += 5;
  } else {
    return 0;
  }
  if (n > (size_t)(d->end - d->p)) dec_fail(d, "array longer than the input");
  enter(d);
  for (uint32_t i = 1; i <= n; i++) {
    dec_item(d);
    lua_rawseti(L, tidx, (lua_Integer)((lua_Unsigned)at + i));
  }
  d->depth--;
  lua_pushvalue(L, tidx);
  return 1;
}

static void dec_map(struct dec *d, uint32_t n) {
  lua_State *L = d->L;
  if (n > (size_t)(d->end - d->p) / 2) dec_fail(d, "map longer than the input");
  enter(d);
  lua_createtable(L, 0, (int)n);
  take_slot(d);
  for (uint32_t i = 0; i < n; i++) {
    const unsigned char *keypos = d->p;
    if (keypos < d->end && (*keypos & 0xe0) == 0xa0 &&
        (size_t)(d->end - keypos) > (size_t)(*keypos & 0x1f)) {
      /* short string key: no nil/NaN check needed */
      lua_pushlstring(L, (const char *)keypos + 1, *keypos & 0x1f);
      d->p += 1 + (*keypos & 0x1f);
    } else {
      dec_value(d);
      if (lua_isnil(L, -1) ||
          (lua_type(L, -1) == LUA_TNUMBER && isnan(lua_tonumber(L, -1)))) {
        d->p = keypos;
        dec_fail(d, lua_isnil(L, -1) ? "nil map key" : "NaN map key");
      }
    }
    dec_value(d);
    lua_rawset(L, -3);
  }
  d->depth--;
}

static void dec_string(struct dec *d, size_t n) {
  NEED(d, n);
  lua_pushlstring(d->L, (const char *)d->p, n);
  d->p += n;
}

/* Reads a str or bin header inside an ext payload; returns its bytes. */
static const unsigned char *dec_bytes(struct dec *d, size_t *n) {
  const unsigned char *s;
  unsigned c;
  NEED(d, 1);
  c = *d->p++;
  if (c >= 0xa0 && c <= 0xbf) *n = c & 0x1f;
  else if (c == 0xd9 || c == 0xc4) { NEED(d, 1); *n = *d->p++; }
  else if (c == 0xda || c == 0xc5) { NEED(d, 2); *n = r16(d->p); d->p += 2; }
  else if (c == 0xdb || c == 0xc6) { NEED(d, 4); *n = r32(d->p); d->p += 4; }
  else { d->p--; dec_fail(d, "malformed ext payload (expected bytes)"); }
  NEED(d, *n);
  s = d->p;
  d->p += *n;
  return s;
}

struct bcreader { const unsigned char *p; size_t n; };

static const char *bc_read(lua_State *L, void *ud, size_t *size) {
  struct bcreader *r = ud;
  (void)L;
  *size = r->n;
  r->n = 0;
  return *size ? (const char *)r->p : NULL;
}

static void dec_function(struct dec *d) {
  lua_State *L = d->L;
  struct bcreader rd;
  lua_Debug ar;
  lua_Integer nups;
  int f;
  rd.p = dec_bytes(d, &rd.n);
  enter(d);
  if (lua_load(L, bc_read, &rd, "=(luamp function)", "b") != LUA_OK) {
    lua_pop(L, 1);
    dec_fail(d, "malformed function bytecode");
  }
  f = lua_gettop(L);
  take_slot(d);
  dec_value(d);
  if (!lua_isinteger(L, -1)) dec_fail(d, "malformed function (upvalue count)");
  nups = lua_tointeger(L, -1);
  lua_pop(L, 1);
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  if (nups != ar.nups) dec_fail(d, "malformed function (upvalue count)");
  for (int i = 1; i <= ar.nups; i++) {
    dec_value(d);
    if (lua_setupvalue(L, f, i) == NULL) lua_pop(L, 1);
  }
  d->depth--;
}

static void dec_named(struct dec *d) {
  lua_State *L = d->L;
  const unsigned char *at = d->p;
  int top = lua_gettop(L);
  room(d, 6);
  dec_value(d);
  dec_value(d);
  if (lua_type(L, top + 1) != LUA_TSTRING ||
      !(lua_isnil(L, top + 2) || lua_type(L, top + 2) == LUA_TSTRING))
    dec_fail(d, "malformed name");
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, top + 1);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushvalue(L, top + 1);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
      dec_failf(d, at, "cannot load module '%s': %s",
                lua_tostring(L, top + 1),
                lua_isstring(L, -1) ? lua_tostring(L, -1) : "(error)");
    }
  }
  if (!lua_isnil(L, top + 2)) {
    if (!lua_istable(L, -1))
      dec_failf(d, at, "module '%s' is not a table", lua_tostring(L, top + 1));
    lua_pushvalue(L, top + 2);
    lua_rawget(L, -2);
    if (lua_isnil(L, -1))
      dec_failf(d, at, "module '%s' has no field '%s'",
                lua_tostring(L, top + 1), lua_tostring(L, top + 2));
  }
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
}

/* ops->decode(p, n) under lua_pcall: arguments ops, p (light
 * userdata) and n; nothing allocated to make the call. */
static int handle_decode_call(lua_State *L) {
  const struct luamp_handle_ops *ops = lua_touserdata(L, 1);
  const char *p = lua_touserdata(L, 2);
  ops->decode(L, p, (size_t)lua_tointeger(L, 3));
  return 1;
}

static void dec_handle(struct dec *d) {
  lua_State *L = d->L;
  const unsigned char *name, *data, *at = d->p;
  size_t nn, dn;
  const struct luamp_handle_ops *ops;
  room(d, 8);   /* (and what the type's decode pushes: LUA_MINSTACK) */
  name = dec_bytes(d, &nn);
  data = dec_bytes(d, &dn);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &handles_key);
  lua_pushlstring(L, (const char *)name, nn);
  lua_rawget(L, -2);
  ops = lua_touserdata(L, -1);
  lua_pop(L, 2);
  if (ops == NULL) dec_failf(d, at, "handle of an unknown type");
  /* the type's own DecodeError (an object gone, a closed one) gets the
   * offset too; anything else (memory, interrupt) passes as it is */
  lua_pushcfunction(L, handle_decode_call);
  lua_pushlightuserdata(L, (void *)ops);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)dn);
  if (lua_pcall(L, 3, 1, 0) != LUA_OK) {
    int err = lua_gettop(L);
    if (lua_type(L, err) == LUA_TTABLE) {
      int kind = lua_getfield(L, err, "kind");
      int msg = lua_getfield(L, err, "message");
      if (kind == LUA_TSTRING && msg == LUA_TSTRING &&
          strcmp(lua_tostring(L, -2), "DecodeError") == 0)
        dec_failf(d, at, "%s", lua_tostring(L, -1));
      lua_settop(L, err);
    }
    lua_error(L);
  }
}

static void dec_class(struct dec *d) {
  lua_State *L = d->L;
  size_t nn;
  const unsigned char *at = d->p, *name = dec_bytes(d, &nn);
  int top = lua_gettop(L), def;
  uint32_t slot = d->pending;
  room(d, 8);
  lua_pushlstring(L, (const char *)name, nn);           /* top + 1 */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &classdefs_key);
  lua_pushvalue(L, top + 1);
  if (lua_rawget(L, -2) != LUA_TTABLE)
    dec_failf(d, at, "class '%s' is not registered here",
              lua_tostring(L, top + 1));
  def = lua_gettop(L);
  /* a class whose rebuild connects, attaches or trusts (a manager proxy)
   * is never made from untrusted data, not even its state */
  if (d->flags & LUAMP_DECODE_UNTRUSTED) {
    if (lua_getfield(L, def, "trusted_only") != LUA_TNIL &&
        !(d->flags & LUAMP_DECODE_PEER))
      dec_failf(d, at, "class '%s' refused from an untrusted source",
                lua_tostring(L, top + 1));
    lua_pop(L, 1);
  }
  dec_value(d);                         /* the state; may take the slot */
  if (lua_getfield(L, def, "rebuild") == LUA_TFUNCTION) {
    lua_insert(L, -2);
    lua_pushboolean(L, d->flags & LUAMP_DECODE_UNTRUSTED);  /* untrusted */
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
      /* the error as tostring shows it (error objects have __tostring) */
      const char *why = luaL_tolstring(L, -1, NULL);
      dec_failf(d, at, "rebuilding class '%s' failed: %s",
                lua_tostring(L, top + 1), why);
    }
    if (slot) {
      lua_pushvalue(L, -1);
      lua_rawseti(L, d->refs, slot);
      d->pending = 0;
    }
  } else {
    lua_pop(L, 1);
    if (!lua_istable(L, -1)) dec_fail(d, "malformed class state");
    lua_getfield(L, def, "mt");
    lua_setmetatable(L, -2);
  }
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
}

static void push_ext_object(struct dec *d, int type, const unsigned char *p,
                            size_t n) {
  lua_State *L = d->L;
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, type);
  lua_setfield(L, -2, "exttype");
  lua_pushlstring(L, (const char *)p, n);
  lua_setfield(L, -2, "data");
  if (type == EXT_TIMESTAMP) {
    int64_t sec;
    uint32_t nsec;
    const char *fault = timestamp_fault(p, n, &sec, &nsec);
    if (fault) dec_fail(d, fault);
    lua_pushinteger(L, sec);
    lua_setfield(L, -2, "seconds");
    lua_pushinteger(L, nsec);
    lua_setfield(L, -2, "nanoseconds");
  }
  luaL_setmetatable(L, EXT_MT);
}

static void refuse_untrusted(struct dec *d, const char *what) {
  if (d->flags & LUAMP_DECODE_UNTRUSTED) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s refused from an untrusted source", what);
    dec_fail(d, msg);
  }
}

static void dec_ext(struct dec *d, int type, size_t n) {
  lua_State *L = d->L;
  const unsigned char *payload, *saved_end = d->end;
  NEED(d, n);
  payload = d->p;
  switch (type) {
    case EXT_REF: {
      uint32_t id;
      if (n != 4) dec_fail(d, "malformed reference");
      id = r32(payload);
      if (id >= d->nslots) dec_fail(d, "reference to an unknown object");
      d->p += 4;
      lua_rawgeti(L, d->refs, (lua_Integer)id + 1);
      return;
    }
    case EXT_DEF:
      if (d->nslots == UINT32_MAX - 1) dec_fail(d, "too many objects");
      if (lua_isnil(L, d->refs)) {
        lua_newtable(L);
        lua_replace(L, d->refs);
      }
      d->pending = ++d->nslots;
      d->end = payload + n;
      enter(d);          /* DEFs can nest: they count towards the depth */
      dec_value(d);
      d->depth--;
      if (d->pending) {  /* not a table or function: register as is */
        take_slot(d);
      }
      break;
    case EXT_FUNC:
      refuse_untrusted(d, "function");
      d->end = payload + n;
      dec_function(d);
      break;
    case EXT_GLOBALS:
      refuse_untrusted(d, "globals table");
      if (n != 0) dec_fail(d, "malformed globals (payload not empty)");
      lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
      return;
    case EXT_NAMED:
      refuse_untrusted(d, "module reference");
      d->end = payload + n;
      dec_named(d);
      break;
    case EXT_HANDLE:
      refuse_untrusted(d, "runtime object handle");
      d->end = payload + n;
      dec_handle(d);
      break;
    case EXT_CLASS:
      d->end = payload + n;
      enter(d);
      dec_class(d);
      d->depth--;
      break;
    default:
      d->p += n;
      push_ext_object(d, type, payload, n);
      return;
  }
  if (d->p != payload + n) dec_fail(d, "malformed ext payload (length)");
  d->end = saved_end;
}

static void dec_value(struct dec *d) {
  lua_State *L = d->L;
  const unsigned char *p;
  unsigned c;
  NEED(d, 1);
  c = *d->p++;
  if (c <= 0x7f) { lua_pushinteger(L, c); return; }
  if (c >= 0xe0) { lua_pushinteger(L, (int8_t)c); return; }
  if (c >= 0xa0 && c <= 0xbf) { dec_string(d, c & 0x1f); return; }
  if (c >= 0x90 && c <= 0x9f) { dec_array(d, c & 0x0f); return; }
  if (c >= 0x80 && c <= 0x8f) { dec_map(d, c & 0x0f); return; }
  p = d->p;
  switch (c) {
    case 0xc0: lua_pushnil(L); return;
    case 0xc2: lua_pushboolean(L, 0); return;
    case 0xc3: lua_pushboolean(L, 1); return;
    case 0xc4: case 0xd9: NEED(d, 1); d->p += 1; dec_string(d, p[0]); return;
    case 0xc5: case 0xda: NEED(d, 2); d->p += 2; dec_string(d, r16(p)); return;
    case 0xc6: case 0xdb: NEED(d, 4); d->p += 4; dec_string(d, r32(p)); return;
    case 0xc7: NEED(d, 2); d->p += 2; dec_ext(d, (int8_t)p[1], p[0]); return;
    case 0xc8: NEED(d, 3); d->p += 3; dec_ext(d, (int8_t)p[2], r16(p)); return;
    case 0xc9: NEED(d, 5); d->p += 5; dec_ext(d, (int8_t)p[4], r32(p)); return;
    case 0xca: {
      uint32_t u;
      float f;
      NEED(d, 4);
      u = r32(p);
      memcpy(&f, &u, 4);
      d->p += 4;
      lua_pushnumber(L, (lua_Number)f);
      return;
    }
    case 0xcb: {
      uint64_t u;
      double f;
      NEED(d, 8);
      u = r64(p);
      memcpy(&f, &u, 8);
      d->p += 8;
      lua_pushnumber(L, f);
      return;
    }
    case 0xcc: NEED(d, 1); d->p += 1; lua_pushinteger(L, p[0]); return;
    case 0xcd: NEED(d, 2); d->p += 2; lua_pushinteger(L, r16(p)); return;
    case 0xce: NEED(d, 4); d->p += 4; lua_pushinteger(L, r32(p)); return;
    case 0xcf: {
      uint64_t u;
      NEED(d, 8);
      u = r64(p);
      d->p += 8;
      /* above math.maxinteger: a float, never a wrapped negative */
      if (u > (uint64_t)INT64_MAX) lua_pushnumber(L, (lua_Number)u);
      else lua_pushinteger(L, (lua_Integer)u);
      return;
    }
    case 0xd0: NEED(d, 1); d->p += 1; lua_pushinteger(L, (int8_t)p[0]); return;
    case 0xd1: NEED(d, 2); d->p += 2; lua_pushinteger(L, (int16_t)r16(p)); return;
    case 0xd2: NEED(d, 4); d->p += 4; lua_pushinteger(L, (int32_t)r32(p)); return;
    case 0xd3: NEED(d, 8); d->p += 8; lua_pushinteger(L, (lua_Integer)r64(p)); return;
    case 0xd4: NEED(d, 1); d->p += 1; dec_ext(d, (int8_t)p[0], 1); return;
    case 0xd5: NEED(d, 1); d->p += 1; dec_ext(d, (int8_t)p[0], 2); return;
    case 0xd6: NEED(d, 1); d->p += 1; dec_ext(d, (int8_t)p[0], 4); return;
    case 0xd7: NEED(d, 1); d->p += 1; dec_ext(d, (int8_t)p[0], 8); return;
    case 0xd8: NEED(d, 1); d->p += 1; dec_ext(d, (int8_t)p[0], 16); return;
    case 0xdc: NEED(d, 2); d->p += 2; dec_array(d, r16(p)); return;
    case 0xdd: NEED(d, 4); d->p += 4; dec_array(d, r32(p)); return;
    case 0xde: NEED(d, 2); d->p += 2; dec_map(d, r16(p)); return;
    case 0xdf: NEED(d, 4); d->p += 4; dec_map(d, r32(p)); return;
    default:   /* 0xc1, never used */
      d->p--;
      dec_fail(d, "invalid byte 0xc1");
  }
}

/* Whether a message starting with byte c is one scalar (an integer,
 * float, nil, boolean, string or bin): it needs no DEF table's slot. */
static int scalar_byte(unsigned c) {
  return c <= 0x7f || c >= 0xe0 || (c >= 0xa0 && c <= 0xbf) || c == 0xc0 ||
         (c >= 0xc2 && c <= 0xc6) || (c >= 0xca && c <= 0xd3) ||
         (c >= 0xd9 && c <= 0xdb);
}


/* Pushes the value; keep_refs: the DEF table's slot stays below it (a
 * Lua function returning its top value need not close the gap). */
static void decode_with(lua_State *L, const char *p, size_t n, int flags,
                        int depth, int keep_refs) {
  struct dec d;
  luaL_checkstack(L, 8, "no room to decode");
  d.stack_ok = lua_gettop(L) + 8;
  d.L = L;
  d.start = d.p = (const unsigned char *)p;
  d.end = d.start + n;
  d.depth = 0;
  d.maxdepth = depth;
  d.flags = flags;
  d.nslots = 0;
  d.pending = 0;
  if (n > 0 && scalar_byte(d.start[0])) {
    /* (no slot pushed and removed: ~100 of a small int's ~210
     * instructions, measured with callgrind) */
    d.refs = 0;
    dec_value(&d);
    if (d.p != d.end) dec_fail(&d, "trailing bytes");
    return;
  }
  lua_pushnil(L);            /* the DEF table's slot */
  d.refs = lua_gettop(L);
  dec_value(&d);
  if (d.p != d.end) dec_fail(&d, "trailing bytes");
  if (!keep_refs) lua_remove(L, d.refs);
}

void luamp_decode(lua_State *L, const char *p, size_t n, int flags) {
  decode_with(L, p, n, flags, max_depth, 0);
}

/* luamp_decode for what luamp_encode_small writes (a message of one
 * integer or one fixstr, exactly n bytes): pushes it and returns 1;
 * anything else (and anything malformed) returns 0 and pushes nothing. */
int luamp_decode_small(lua_State *L, const char *p, size_t n) {
  const unsigned char *u = (const unsigned char *)p;
  unsigned c;
  if (n == 0) return 0;
  c = u[0];
  if (n == 1 && (c <= 0x7f || c >= 0xe0)) {
    lua_pushinteger(L, (int8_t)c >= 0 ? (lua_Integer)c : (int8_t)c);
    return 1;
  }
  if (c >= 0xa0 && c <= 0xbf) {
    if (n != 1 + (c & 0x1f)) return 0;
    lua_pushlstring(L, p + 1, n - 1);
    return 1;
  }
  switch (c) {
    case 0xcc: if (n != 2) return 0; lua_pushinteger(L, u[1]); return 1;
    case 0xcd: if (n != 3) return 0; lua_pushinteger(L, r16(u + 1)); return 1;
    case 0xce: if (n != 5) return 0; lua_pushinteger(L, r32(u + 1)); return 1;
    case 0xd0: if (n != 2) return 0; lua_pushinteger(L, (int8_t)u[1]); return 1;
    case 0xd1: if (n != 3) return 0; lua_pushinteger(L, (int16_t)r16(u + 1)); return 1;
    case 0xd2: if (n != 5) return 0; lua_pushinteger(L, (int32_t)r32(u + 1)); return 1;
    case 0xd3: if (n != 9) return 0; lua_pushinteger(L, (lua_Integer)r64(u + 1)); return 1;
    default: return 0;   /* 0xcf (may be a float) and the rest: the full path */
  }
}

int luamp_decode_items(lua_State *L, const char *p, size_t n, int flags) {
  return luamp_decode_items_into(L, p, n, flags, 0, 0, 0);
}

int luamp_decode_items_into(lua_State *L, const char *p, size_t n, int flags,
                            int into, int tidx, lua_Integer at) {
  const unsigned char *u = (const unsigned char *)p;
  uint32_t k, hdr;
  struct dec d;
  if (into > 0) tidx = lua_absindex(L, tidx);
  if (n >= 1 && u[0] >= 0x90 && u[0] <= 0x9f) {
    k = u[0] & 0x0f;
    hdr = 1;
  } else if (n >= 3 && u[0] == 0xdc) {
    k = r16(u + 1);
    hdr = 3;
  } else {
    decode_with(L, p, n, flags, max_depth, 0);
    return 1;
  }
  luaL_checkstack(L, (int)k + 8, "no room to decode");
  d.stack_ok = lua_gettop(L) + (int)k + 8;
  d.L = L;
  d.start = u;
  d.p = u + hdr;
  d.end = u + n;
  d.depth = 0;
  d.maxdepth = max_depth;
  d.flags = flags;
  d.nslots = 0;
  d.pending = 0;
  if (k > (size_t)(d.end - d.p)) dec_fail(&d, "array longer than the input");
  lua_pushnil(L);            /* the DEF table's slot */
  d.refs = lua_gettop(L);
  enter(&d);                 /* (the array's level) */
  for (uint32_t i = 0; i < k; i++)
    if (i + 1 != (uint32_t)into || !dec_array_into(&d, tidx, at)) dec_value(&d);
  if (d.p != d.end) dec_fail(&d, "trailing bytes");
  lua_remove(L, d.refs);
  return (int)k;
}

/* ======================================================================
 * Lua face
 * ====================================================================== */

void luamp_register_handle(lua_State *L, const struct luamp_handle_ops *ops) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &handles_key);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &handles_key);
  }
  lua_pushlightuserdata(L, (void *)ops);
  lua_setfield(L, -2, ops->tname);
  lua_pop(L, 1);
}

/* mp.encode(v) -> string.  Its upvalue is the state's encoder box (no
 * registry lookup per call). */
static int l_encode(lua_State *L) {
  size_t n;
  const char *s;
  int t = lua_type(L, 1);
  struct encbox *box = L == box_thread ? box_of_thread :
                           lua_touserdata(L, lua_upvalueindex(1));
  if (t == LUA_TTABLE && !box->busy) {
    /* encode_typed for a table in the state's box, on a stack that
     * encode_typed's scalar paths and box look-up have nothing to do */
    struct enc e;
    int top = lua_gettop(L), r;
    if (!lua_checkstack(L, 4 * NEXT_WINDOW))
      luaL_checkstack(L, 4 * NEXT_WINDOW, "no room to encode");
    enc_begin(L, &e, box, NULL, top);
    r = enc_passes(L, &e, 1, t, -1, 0, top);
    if (r < 0) lua_settop(L, top);
    enc_end(L, &e, r, NULL);
    lua_pushlstring(L, (const char *)box->buf, box->len);
    return 1;
  }
  if (t == LUA_TNONE) luaL_checkany(L, 1);
  s = encode_typed(L, box, 1, t, -1, NULL, 0, &n, NULL, 1);
  lua_pushlstring(L, s, n);
  return 1;
}

/* mp.decode(s [, {trusted = bool, max_depth = n}]) -> value.  Untrusted
 * unless told otherwise: bytecode is loaded (and Lua does not verify
 * binary chunks), modules required and handles attached only for data the
 * caller vouches for.  (untrusted = true, the default, is still
 * accepted.) */
static int l_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  int flags = LUAMP_DECODE_UNTRUSTED, depth = max_depth;
  if (!lua_isnoneornil(L, 2)) {
    int trusted, untrusted;
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "trusted");
    lua_getfield(L, 2, "untrusted");
    trusted = lua_toboolean(L, -2);
    untrusted = lua_toboolean(L, -1);
    luaL_argcheck(L, !(trusted && untrusted), 2,
                  "both trusted and untrusted set");
    if (trusted) flags = 0;
    if (lua_getfield(L, 2, "max_depth") != LUA_TNIL) {
      lua_Integer v = luaL_checkinteger(L, -1);
      luaL_argcheck(L, v >= 1 && v <= MAX_DEPTH_LIMIT, 2, "max_depth out of range");
      depth = (int)v;
    }
    lua_settop(L, 1);
  }
  decode_with(L, s, n, flags, depth, 1);
  return 1;
}

/* mp.register_class(name, mt [, {reduce = f, rebuild = g,
 * trusted_only = bool}]): tables with
 * metatable mt travel as class name + state and come back with the
 * receiver's metatable registered under the same name.  reduce(obj) gives
 * the state (default: the table's own fields); rebuild(state, untrusted)
 * makes the object (default: setmetatable(state, mt)).  trusted_only: the
 * rebuild connects, attaches or trusts; untrusted decodes refuse it. */
static int l_register_class(lua_State *L) {
  luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &classes_key);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 1);
  lua_rawset(L, -3);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &classdefs_key);
  lua_pushvalue(L, 1);
  lua_createtable(L, 0, 3);
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "mt");
  if (lua_istable(L, 3)) {
    lua_getfield(L, 3, "reduce");
    if (!lua_isnil(L, -1)) luaL_checktype(L, -1, LUA_TFUNCTION);
    lua_setfield(L, -2, "reduce");
    lua_getfield(L, 3, "rebuild");
    if (!lua_isnil(L, -1)) luaL_checktype(L, -1, LUA_TFUNCTION);
    lua_setfield(L, -2, "rebuild");
    /* trusted_only: its rebuild connects, attaches or trusts (a manager
     * proxy): refused by untrusted decodes */
    if (lua_getfield(L, 3, "trusted_only") != LUA_TNIL && lua_toboolean(L, -1)) {
      lua_pushboolean(L, 1);
      lua_setfield(L, -3, "trusted_only");
    }
    lua_pop(L, 1);
  }
  lua_rawset(L, -3);
  return 0;
}

/* ---- upvalue snapshots: would a function encode as before? ----------- */

/* The Pool resends a function with every task; when its upvalues still
 * hold the same values, its encoding has not changed (bytecode never
 * does) and need not be made again.  A snapshot records the upvalues whose
 * encoding depends only on their identity: nil, booleans, numbers,
 * strings, C functions, the globals (and _ENV views of them), loaded
 * module tables, and Lua functions whose own upvalues are such (kept at
 * snap[-i], to a depth of 4).  Any other upvalue (a plain table, whose
 * contents may change, or userdata) makes the function unsnapshotable. */
static int is_module_table(lua_State *L, int v) {
  int r = 0;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &names_key) == LUA_TTABLE) {
    lua_pushvalue(L, v);
    r = lua_rawget(L, -2) == LUA_TTABLE;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return r;
}

/* Pushes the snapshot of the function at f and returns 1, or pushes
 * nothing and returns 0. */
static int snapshot(lua_State *L, int f, int depth) {
  lua_Debug ar;
  int snap;
  const void *globals;
  if (depth > 4 || !lua_checkstack(L, 8)) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  globals = lua_topointer(L, -1);
  lua_pop(L, 1);
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  lua_createtable(L, ar.nups, 0);
  snap = lua_gettop(L);
  for (int i = 1; i <= ar.nups; i++) {
    const char *name = lua_getupvalue(L, f, i);
    int v = lua_gettop(L), ok = 1;
    switch (lua_type(L, v)) {
      case LUA_TNIL: case LUA_TBOOLEAN: case LUA_TNUMBER: case LUA_TSTRING:
        break;
      case LUA_TFUNCTION:
        if (!lua_iscfunction(L, v)) {
          ok = snapshot(L, v, depth + 1);
          if (ok) lua_rawseti(L, snap, -i);
        }
        break;
      case LUA_TTABLE:
        ok = lua_topointer(L, v) == globals ||
             (name && strcmp(name, "_ENV") == 0 && lua_getmetatable(L, v) &&
              (lua_pop(L, 1), 1)) ||
             is_module_table(L, v);
        break;
      default:
        ok = 0;
    }
    if (!ok) {
      lua_settop(L, snap - 1);
      return 0;
    }
    lua_rawseti(L, snap, i);
  }
  return 1;
}

static int same_as_snapshot(lua_State *L, int f, int snap, int depth) {
  lua_Debug ar;
  if (depth > 4 || !lua_checkstack(L, 6)) return 0;
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  for (int i = 1; i <= ar.nups; i++) {
    int same;
    lua_getupvalue(L, f, i);
    lua_rawgeti(L, snap, i);
    same = lua_rawequal(L, -1, -2);
    if (same && lua_type(L, -2) == LUA_TFUNCTION && !lua_iscfunction(L, -2)) {
      lua_rawgeti(L, snap, -i);
      same = lua_istable(L, -1) &&
             same_as_snapshot(L, lua_gettop(L) - 2, lua_gettop(L), depth + 1);
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
    if (!same) return 0;
  }
  return 1;
}

/* core.upvalue_snapshot(f) -> snapshot or nil */
static int l_upvalue_snapshot(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  if (!snapshot(L, 1, 0)) lua_pushnil(L);
  return 1;
}

/* core.upvalues_same(f, snapshot) -> boolean */
static int l_upvalues_same(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_pushboolean(L, same_as_snapshot(L, 1, 2, 0));
  return 1;
}

/* mp.codec_options{max_depth = n, track = bool} sets the process-wide
 * nesting limit and identity tracking; returns the current options. */
static int l_codec_options(lua_State *L) {
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (lua_getfield(L, 1, "max_depth") != LUA_TNIL) {
      lua_Integer v = luaL_checkinteger(L, -1);
      luaL_argcheck(L, v >= 1 && v <= MAX_DEPTH_LIMIT, 1, "max_depth out of range");
      max_depth = (int)v;
    }
    if (lua_getfield(L, 1, "track") != LUA_TNIL)
      track_refs = lua_toboolean(L, -1);
  }
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, max_depth);
  lua_setfield(L, -2, "max_depth");
  lua_pushboolean(L, track_refs);
  lua_setfield(L, -2, "track");
  return 1;
}

/* mp.Ext(exttype, data): an application ext value that round-trips.
 * Types 1..7 are luamp's own; a timestamp (-1) must be one the decoder
 * reads back. */
static int l_ext(lua_State *L) {
  lua_Integer t = luaL_checkinteger(L, 1);
  size_t n;
  const char *data = luaL_checklstring(L, 2, &n);
  luaL_argcheck(L, t >= -128 && t <= 127, 1, "exttype out of range -128..127");
  luaL_argcheck(L, !EXT_RESERVED(t), 1,
                "exttype 1..7 is reserved for luamp's own types");
  if (t == EXT_TIMESTAMP) {
    int64_t sec;
    uint32_t nsec;
    const char *fault =
        timestamp_fault((const unsigned char *)data, n, &sec, &nsec);
    if (fault) luaL_argerror(L, 2, fault);
  }
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, t);
  lua_setfield(L, -2, "exttype");
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "data");
  luaL_setmetatable(L, EXT_MT);
  return 1;
}

int luamp_open_codec(lua_State *L) {
  struct encbox *box;
  static const luaL_Reg funcs[] = {
    {"encode", l_encode},
    {"decode", l_decode},
    {"register_class", l_register_class},
    {"codec_options", l_codec_options},
    {"Ext", l_ext},
    {"upvalue_snapshot", l_upvalue_snapshot},
    {"upvalues_same", l_upvalues_same},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  box = get_box(L);
  if (box_thread == NULL) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    box_thread = lua_tothread(L, -1);
    box_of_thread = box;
    lua_pop(L, 1);
  }
  lua_pushcclosure(L, l_encode, 1);
  lua_setfield(L, -2, "encode");
  luamp_newtype(L, &ext_type);
  lua_pop(L, 1);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &dumps_key) != LUA_TTABLE) {
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &dumps_key);
  }
  lua_pop(L, 1);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &handles_key) != LUA_TTABLE) {
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &handles_key);
  }
  lua_pop(L, 1);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &classes_key) != LUA_TTABLE) {
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &classes_key);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &classdefs_key);
  }
  lua_pop(L, 1);
  /* the module's own error objects keep their kind and metatable */
  lua_pushcfunction(L, l_register_class);
  lua_pushliteral(L, LUAMP_ERROR_MT);
  luaL_getmetatable(L, LUAMP_ERROR_MT);
  lua_call(L, 2, 0);
  return 0;
}
