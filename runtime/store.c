/*
 * store.c -- an append-only byte store shared with forked children.
 *
 * The Pool ships each distinct function once per worker: the owner
 * appends the encoded function to the store once and sends only its
 * (offset, length) with every task; a worker reads it on first use and
 * keeps the decoded function.  The store is a memfd: children forked after
 * it was made share the file through their inherited descriptor and read
 * with pread, so it grows without anyone remapping anything, and it
 * disappears with the last process that holds it.
 *
 * Only the owner (the process that made the store) appends; everyone may
 * read.  Bytes are written before their offset is handed out, so a reader
 * never sees a partial record.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/random.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

#define STORE_TNAME "multiprocessing.Store"

struct store {
  int fd;          /* -1 once closed */
  pid_t owner;     /* the process that appends */
  int64_t size;    /* bytes appended (meaningful in the owner) */
  char name[40];   /* the memfd's name, random: "luamp-store-<hex>" */
};

static struct luamp_type store_type;   /* (at the end) */

static struct store *checkstore(lua_State *L) {
  struct store *s = luamp_self(L, 1, &store_type);
  if (s->fd < 0) luamp_raise(L, "ValueError", "store is closed");
  return s;
}

/* core.Store() -> a new, empty store owned by this process */
static int l_store(lua_State *L) {
  struct store *s = lua_newuserdatauv(L, sizeof *s, 0);
  s->fd = -1;       /* closed until the resource exists (liolib's order) */
  s->owner = luamp_pid();
  s->size = 0;
  luaL_setmetatable(L, STORE_TNAME);
  {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r) r ^= (uint64_t)luamp_now();
    snprintf(s->name, sizeof s->name, "luamp-store-%016llx", (unsigned long long)r);
  }
  s->fd = luamp_sys.memfd_create(s->name, MFD_CLOEXEC);
  if (s->fd < 0) luamp_raise_errno(L, "OSError", errno, "memfd_create");
  return 1;
}

/* store:put(s) -> offset (the owner only) */
static int store_put(lua_State *L) {
  struct store *s = checkstore(L);
  size_t n, done = 0;
  const char *data = luaL_checklstring(L, 2, &n);
  if (s->owner != luamp_pid())
    luamp_raise(L, "ValueError", "only the process that made a store appends");
  while (done < n) {
    ssize_t w = luamp_sys.pwrite(s->fd, data + done, n - done, s->size + (off_t)done);
    if (w < 0) {
      if (errno == EINTR) continue;
      luamp_raise_errno(L, "OSError", errno, "store write");
    }
    done += (size_t)w;
  }
  lua_pushinteger(L, s->size);
  s->size += (int64_t)n;
  return 1;
}

/* store:get(offset, length) -> string */
static int store_get(lua_State *L) {
  struct store *s = checkstore(L);
  lua_Integer off = luaL_checkinteger(L, 2), len = luaL_checkinteger(L, 3);
  luaL_Buffer b;
  char *p;
  size_t done = 0;
  luaL_argcheck(L, off >= 0, 2, "offset must be >= 0");
  luaL_argcheck(L, len >= 0 && len <= ((lua_Integer)1 << 40), 3,
                "length out of range");
  p = luaL_buffinitsize(L, &b, (size_t)len);
  while (done < (size_t)len) {
    ssize_t r = luamp_sys.pread(s->fd, p + done, (size_t)len - done, (off_t)off + (off_t)done);
    if (r < 0) {
      if (errno == EINTR) continue;
      luamp_raise_errno(L, "OSError", errno, "store read");
    }
    if (r == 0) luamp_raise(L, "ValueError", "store read beyond its end");
    done += (size_t)r;
  }
  luaL_pushresultsize(&b, (size_t)len);
  return 1;
}

/* store:close(); also __gc and __close.  Every process closes its own
 * descriptor; the file goes when the last one is closed. */
static int store_close(lua_State *L) {
  struct store *s = luamp_self(L, 1, &store_type);
  if (s->fd >= 0) {
    int fd = s->fd;
    s->fd = -1;     /* closed before the resource goes */
    luamp_sys.close(fd);
  }
  return 0;
}

static int store_tostring(lua_State *L) {
  struct store *s = luamp_self(L, 1, &store_type);
  if (s->fd < 0) lua_pushliteral(L, "Store (closed)");
  else lua_pushfstring(L, "Store (%d bytes)", (int)s->size);
  return 1;
}

/* ---- as a handle ------------------------------------------------------
 * A store travels to processes that did not inherit it (children of the
 * fork server) as "<pid> <fd> <name>": the receiver opens the memfd
 * through /proc/<pid>/fd/<fd> of the owner, and checks that the link
 * names the same memfd (a recycled pid or fd number is refused).  The
 * copy reads only (its owner field is the sender's). */
static void store_encode(lua_State *L, int idx) {
  struct store *s = luamp_self(L, idx, &store_type);
  if (s->fd < 0) luamp_raise(L, "EncodeError", "store is closed");
  lua_pushfstring(L, "%d %d %s", (int)s->owner, s->fd, s->name);
}

static void store_decode(lua_State *L, const char *p, size_t n) {
  char buf[128], path[64], link[128];
  int pid, fd;
  ssize_t k;
  struct store *s;
  if (n >= sizeof buf) luamp_raise(L, "DecodeError", "bad store handle");
  memcpy(buf, p, n);
  buf[n] = '\0';
  s = lua_newuserdatauv(L, sizeof *s, 0);
  s->fd = -1;
  s->size = 0;
  luaL_setmetatable(L, STORE_TNAME);
  if (sscanf(buf, "%d %d %39s", &pid, &fd, s->name) != 3)
    luamp_raise(L, "DecodeError", "bad store handle");
  s->owner = pid;
  snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, fd);
  k = readlink(path, link, sizeof link - 1);
  link[k > 0 ? k : 0] = '\0';
  if (k <= 0 || strncmp(link, "/memfd:", 7) != 0 ||
      strncmp(link + 7, s->name, strlen(s->name)) != 0 ||
      (link[7 + strlen(s->name)] != '\0' && link[7 + strlen(s->name)] != ' '))
    luamp_raise(L, "DecodeError", "the pool's store is gone (process %d)", pid);
  s->fd = luamp_sys.open(path, O_RDONLY | O_CLOEXEC, 0);
  if (s->fd < 0) luamp_raise_errno(L, "DecodeError", errno, "open store");
}

static const struct luamp_handle_ops store_ops = {
  STORE_TNAME, store_encode, store_decode
};

static const luaL_Reg store_meth[] = {
  {"put", store_put}, {"get", store_get}, {"close", store_close},
  {NULL, NULL}
};
static const luaL_Reg store_mm[] = {
  {"__gc", store_close}, {"__close", store_close},
  {"__tostring", store_tostring}, {NULL, NULL}
};
static struct luamp_type store_type = {
  STORE_TNAME, store_meth, store_mm, NULL, 0, 0, 0
};

int luamp_open_store(lua_State *L) {
  luamp_newtype(L, &store_type);
  lua_pop(L, 1);
  luamp_register_handle(L, &store_ops);
  lua_pushcfunction(L, l_store);
  lua_setfield(L, -2, "Store");
  return 0;
}
