/*
 * shm.c -- SharedMemory: named POSIX shared memory, as Python's
 * multiprocessing.shared_memory.
 *
 * Names and layout are Python's: the block is /dev/shm/<name> (shm_open
 * with a leading slash), exactly size bytes, default names "psm_" and 8
 * hex digits.  So a block made by Python attaches here by name and the
 * other way round.
 *
 * Cleanup is the creator's alone, as Python's resource tracker does it:
 * a block created here (with track ~= false) is unlinked when the process
 * that created it exits (atexit, or luamp_child_exit in a forked child),
 * unless unlink() was called before.  close()
 * only unmaps; no other process, and no garbage collection, ever unlinks
 * a block behind the user's back.  Forked children never unlink their
 * parent's blocks (the creator pid is recorded).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define SHM_TNAME "multiprocessing.SharedMemory"
#define NAME_MAX_LEN 250

struct shm {
  char *base;                  /* NULL when closed */
  size_t size;
  int unlinked;                /* unlink() was called through this object */
  char name[NAME_MAX_LEN + 2]; /* with the leading slash */
};

/* ---- blocks to unlink at exit ------------------------------------------------ */

/* Guards tracked: blocks this process created and has not unlinked yet. */
static pthread_mutex_t track_mu = PTHREAD_MUTEX_INITIALIZER;
struct tracked {
  struct tracked *next;
  pid_t pid;                   /* the creator: only it unlinks */
  char name[NAME_MAX_LEN + 2];
};
static struct tracked *tracked;

void luamp_shm_cleanup(void) {
  pid_t me = getpid();
  struct tracked *t, *next;
  pthread_mutex_lock(&track_mu);
  for (t = tracked; t; t = next) {
    next = t->next;
    if (t->pid == me) shm_unlink(t->name);
    free(t);
  }
  tracked = NULL;
  pthread_mutex_unlock(&track_mu);
}

static void register_atexit(void) {
  atexit(luamp_shm_cleanup);
}

static void track(const char *name) {
  struct tracked *t = malloc(sizeof *t);
  if (t == NULL) return;   /* then it is not cleaned up: never wrong */
  t->pid = getpid();
  snprintf(t->name, sizeof t->name, "%s", name);
  pthread_mutex_lock(&track_mu);
  t->next = tracked;
  tracked = t;
  pthread_mutex_unlock(&track_mu);
}

static void untrack(const char *name) {
  struct tracked **pp, *t;
  pthread_mutex_lock(&track_mu);
  for (pp = &tracked; (t = *pp) != NULL; pp = &t->next) {
    if (strcmp(t->name, name) == 0) {
      *pp = t->next;
      free(t);
      break;
    }
  }
  pthread_mutex_unlock(&track_mu);
}

/* ---- the object --------------------------------------------------------------- */

static struct shm *checkshm(lua_State *L, int idx) {
  struct shm *s = luaL_checkudata(L, idx, SHM_TNAME);
  if (s->base == NULL)
    luamp_raise(L, "ValueError", "SharedMemory is closed");
  return s;
}

/* SharedMemory{name =, create =, size =, track =} or
 * SharedMemory(name, create, size, track) */
static int l_SharedMemory(lua_State *L) {
  static const char *const keys[] = {"name", "create", "size", "track",
                                     NULL};
  const char *name;
  size_t namelen = 0;
  int create, do_track;
  lua_Integer size;
  luamp_opts_args(L, keys);
  name = luaL_optlstring(L, 1, NULL, &namelen);
  create = lua_toboolean(L, 2);
  size = luaL_optinteger(L, 3, 0);
  do_track = lua_isnoneornil(L, 4) || lua_toboolean(L, 4);
  struct shm *s;
  struct stat st;
  int fd = -1, err;
  void *base;
  luaL_argcheck(L, size >= 0, 3, "'size' must be a positive integer");
  if (create && size == 0)
    luaL_argerror(L, 3, "'size' must be a positive number different from "
                  "zero");
  if (!create && name == NULL)
    luaL_argerror(L, 1, "'name' can only be nil if create is true");
  if (name) {
    /* the OS would see the name cut at the NUL: another block */
    const char *nul = memchr(name, '\0', namelen);
    if (nul != NULL)
      luamp_raise(L, "ValueError", "SharedMemory: name contains a NUL byte "
                  "(at byte %d)", (int)(nul - name) + 1);
    luaL_argcheck(L, name[0] != '\0' && strlen(name) <= NAME_MAX_LEN &&
                  strchr(name, '/') == NULL, 1,
                  "name must be 1..250 characters without '/'");
  }
  s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  luaL_setmetatable(L, SHM_TNAME);
  if (name) {
    snprintf(s->name, sizeof s->name, "/%s", name);
    fd = shm_open(s->name, create ? O_CREAT | O_EXCL | O_RDWR : O_RDWR,
                  0600);
  } else {
    /* Python's default names: psm_ and 8 hex digits, retried on clash */
    for (int tries = 0; tries < 100; tries++) {
      uint32_t r;
      if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
        r = (uint32_t)(getpid() * 2654435761u) ^ (uint32_t)(luamp_now() * 1e6) ^
            (uint32_t)tries;
      snprintf(s->name, sizeof s->name, "/psm_%08x", (unsigned)r);
      fd = shm_open(s->name, O_CREAT | O_EXCL | O_RDWR, 0600);
      if (fd >= 0 || errno != EEXIST) break;
    }
  }
  if (fd < 0) {
    err = errno;
    if (err == ENOENT)
      luamp_raise(L, "FileNotFoundError", "no shared memory named '%s'",
                  s->name + 1);
    if (err == EEXIST)
      luamp_raise(L, "FileExistsError", "shared memory '%s' already exists",
                  s->name + 1);
    luamp_raise_errno(L, "OSError", err, s->name + 1);
  }
  if (create) {
    if (ftruncate(fd, (off_t)size) != 0) {
      err = errno;
      close(fd);
      shm_unlink(s->name);
      luamp_raise_errno(L, "OSError", err, "ftruncate");
    }
  } else {
    if (fstat(fd, &st) != 0) {
      err = errno;
      close(fd);
      luamp_raise_errno(L, "OSError", err, "fstat");
    }
    size = (lua_Integer)st.st_size;
    if (size == 0) {
      close(fd);
      luamp_raise(L, "ValueError", "shared memory '%s' is empty", s->name + 1);
    }
  }
  base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  err = errno;
  close(fd);   /* the mapping keeps the memory; no fd held */
  if (base == MAP_FAILED) {
    if (create) shm_unlink(s->name);
    luamp_raise_errno(L, "OSError", err, "mmap");
  }
  s->base = base;
  s->size = (size_t)size;
  if (create && do_track) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_atexit);
    track(s->name);
  }
  return 1;
}

static int shm_close(lua_State *L) {
  struct shm *s = luaL_checkudata(L, 1, SHM_TNAME);
  if (s->base) {
    char *base = s->base;
    s->base = NULL;   /* closed before the mapping goes */
    munmap(base, s->size);
  }
  return 0;
}

/* unlink(): removes the name (any process may, as Python); the memory
 * lives on while mapped. */
static int shm_unlink_m(lua_State *L) {
  struct shm *s = luaL_checkudata(L, 1, SHM_TNAME);
  if (shm_unlink(s->name) != 0) {
    int err = errno;
    if (err == ENOENT)
      luamp_raise(L, "FileNotFoundError", "no shared memory named '%s'",
                  s->name + 1);
    luamp_raise_errno(L, "OSError", err, s->name + 1);
  }
  s->unlinked = 1;
  untrack(s->name);
  return 0;
}

/* Offsets are byte offsets from 0 (the first byte), as Python's buf[i]. */
static void check_range(lua_State *L, struct shm *s, lua_Integer off,
                        lua_Integer len, int argoff) {
  if (off < 0 || (size_t)off > s->size)
    luaL_argerror(L, argoff, lua_pushfstring(L, "offset %I out of range "
                  "0..%I", off, (lua_Integer)s->size));
  if (len < 0 || (size_t)len > s->size - (size_t)off)
    luaL_argerror(L, argoff + 1, lua_pushfstring(L, "%I bytes at offset %I "
                  "go beyond the block's %I bytes", len, off,
                  (lua_Integer)s->size));
}

/* read([offset [, len]]) -> string */
static int shm_read(lua_State *L) {
  struct shm *s = checkshm(L, 1);
  lua_Integer off = luaL_optinteger(L, 2, 0);
  lua_Integer len;
  if (off < 0 || (size_t)off > s->size) check_range(L, s, off, 0, 2);
  len = luaL_optinteger(L, 3, (lua_Integer)s->size - off);
  check_range(L, s, off, len, 2);
  lua_pushlstring(L, s->base + off, (size_t)len);
  return 1;
}

/* write(offset, s) -> bytes written */
static int shm_write(lua_State *L) {
  struct shm *s = checkshm(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2);
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  check_range(L, s, off, (lua_Integer)len, 2);
  memcpy(s->base + off, data, len);
  lua_pushinteger(L, (lua_Integer)len);
  return 1;
}

static int shm_index(lua_State *L) {
  struct shm *s = luaL_checkudata(L, 1, SHM_TNAME);
  const char *k = lua_tostring(L, 2);
  if (k && lua_type(L, 2) == LUA_TSTRING) {
    if (strcmp(k, "name") == 0) {
      lua_pushstring(L, s->name + 1);
      return 1;
    }
    if (strcmp(k, "size") == 0) {
      lua_pushinteger(L, (lua_Integer)s->size);
      return 1;
    }
    if (strcmp(k, "closed") == 0) {
      lua_pushboolean(L, s->base == NULL);
      return 1;
    }
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int shm_tostring(lua_State *L) {
  struct shm *s = luaL_checkudata(L, 1, SHM_TNAME);
  lua_pushfstring(L, "SharedMemory('%s', size=%I%s)", s->name + 1,
                  (lua_Integer)s->size, s->base ? "" : ", closed");
  return 1;
}

int luamp_open_shm(lua_State *L) {
  static const luaL_Reg meth[] = {
    {"read", shm_read}, {"write", shm_write}, {"close", shm_close},
    {"unlink", shm_unlink_m}, {NULL, NULL}
  };
  static const luaL_Reg mm[] = {
    {"__gc", shm_close}, {"__close", shm_close},
    {"__tostring", shm_tostring}, {NULL, NULL}
  };
  lua_pushcfunction(L, l_SharedMemory);
  lua_setfield(L, -2, "SharedMemory");
  luaL_newmetatable(L, SHM_TNAME);
  luaL_setfuncs(L, mm, 0);
  lua_newtable(L);
  luaL_setfuncs(L, meth, 0);
  lua_pushcclosure(L, shm_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  return 0;
}
