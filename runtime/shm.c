/*
 * shm.c -- SharedMemory: named POSIX shared memory, as Python's
 * multiprocessing.shared_memory.
 *
 * Names and layout are Python's: the block is /dev/shm/<name> (shm_open
 * with a leading slash), exactly size bytes, default names "psm_" and 8
 * hex digits.  So a block made by Python attaches here by name and the
 * other way round.
 *
 * Cleanup is the owners' (see "ownership" below), as Python's resource
 * tracker does it: a block created here (with track ~= false) is unlinked
 * when the process that created it -- or the last of the processes that
 * took ownership with track() -- is gone, by exit or by any signal,
 * unless unlink() was called before.  close() only unmaps; a process that
 * merely attaches, and garbage collection, never unlink a block behind
 * the user's back.  Forked children do not own their parent's blocks.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define SHM_TNAME "multiprocessing.SharedMemory"
#define NAME_MAX_LEN 250

struct shm {
  char *base;                  /* NULL when closed */
  size_t size;
  int unlinked;                /* unlink() was called through this object */
  uint64_t dev, ino;           /* the block mapped (ownership checks) */
  char name[NAME_MAX_LEN + 2]; /* with the leading slash */
};

/* ---- ownership: which blocks go when their owners are gone ---------------------
 *
 * A tracked block has owners: the process that created it (track not
 * false) and any process that called shm:track() on it, until it calls
 * shm:untrack() (or anyone unlinks it).  When its last owner is gone, the
 * block is unlinked: by the owner itself at a normal exit (atexit, or
 * luamp_child_exit), and after a death by a signal -- SIGKILL included,
 * of any process, the program's first one included -- by whoever notices
 * first: the parent when it reaps the child (luamp_shm_sweep, so a join
 * returns with the block gone), or the tracker.  A block whose last owner
 * gives up (untrack) is left alone, as one created with track = false.
 *
 * The owners live in one table per process tree: an anonymous MAP_SHARED
 * mapping made when the module opens, so every process forked from this
 * one shares it (as every process of a Python program shares its resource
 * tracker).  Owners are process identities (pid and start time), so a
 * recycled pid is never taken for an owner.  Before unlinking, the block
 * found under the name must be the one registered (device and inode): a
 * block made again under the same name by someone else is not ours.
 *
 * The tracker is a small process, forked (twice, so nobody has to reap it)
 * when something is registered and none runs: it closes every fd and
 * drops every shared mapping but the table, leaves the session (terminal
 * Ctrl-C is not for it), and every TRACKER_PERIOD_MS looks for owners that
 * died, unlinking the blocks they left without owner; it exits when the
 * table has been empty for two rounds.  Unlike a pipe-EOF tracker
 * (Python's), it needs nothing from the processes (no thread, no fd), and
 * it cleans up after each death, not only after the whole tree's.
 *
 * Lock rules: table->mu (robust) guards the whole table.  An entry is in
 * use while name[0] != 0; it is filled owners first and name last, so an
 * entry torn by a death is at worst unused (the block leaks; nothing
 * unowned is ever unlinked), and no repair is needed. */
#define TRACK_SLOTS 512
#define TRACK_OWNERS 8
#define TRACKER_PERIOD_MS 200

struct track_entry {
  uint64_t owners[TRACK_OWNERS];   /* [mu] luamp_process_id()s; 0 free */
  uint64_t dev, ino;               /* [mu] the block registered */
  char name[NAME_MAX_LEN + 2];     /* [mu] with the slash; "" unused */
};

struct track_table {
  pthread_mutex_t mu;
  uint64_t tracker;                /* [mu] the tracker's identity; 0 none */
  double starting;                 /* [mu] when one was forked and has not
                                      registered yet (0: none): the next
                                      try waits a second for it */
  uint32_t used;                   /* [mu] entries in use */
  struct track_entry e[TRACK_SLOTS];
};

static struct track_table *table;  /* NULL: no table, local list only */
/* The pid of the last process that made itself an owner (own()): any
 * other process -- a child forked since, the common case at exit -- owns
 * nothing in the table and leaves it unread (the table is a shared
 * mapping, which fork does not copy into the child's page tables: even a
 * read is a page fault there). */
static pid_t owner_pid = 0;

static void table_init(void) {
  void *p = luamp_sys.mmap(NULL, sizeof *table, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
  if (luamp_mutex_init(&((struct track_table *)p)->mu) != 0) {
    luamp_sys.munmap(p, sizeof *table);
    return;
  }
  table = p;
}

static int table_lock(void) {
  return table != NULL && luamp_mutex_lock(&table->mu, NULL, NULL) == 0;
}

static void table_unlock(void) {
  luamp_mutex_unlock(&table->mu);
}

static struct track_entry *entry_find(const char *name) {
  for (int i = 0; i < TRACK_SLOTS; i++)
    if (table->e[i].name[0] && strcmp(table->e[i].name, name) == 0)
      return &table->e[i];
  return NULL;
}

static void entry_clear(struct track_entry *e) {
  e->name[0] = '\0';
  memset(e->owners, 0, sizeof e->owners);
  table->used--;
}

static int entry_owners(const struct track_entry *e) {
  int n = 0;
  for (int i = 0; i < TRACK_OWNERS; i++) n += e->owners[i] != 0;
  return n;
}

/* Unlinks the entry's block if the name still holds that block. */
static void entry_unlink(const struct track_entry *e) {
  struct stat st;
  int fd = luamp_sys.shm_open(e->name, O_RDONLY, 0), same;
  if (fd < 0) return;
  same = luamp_sys.fstat(fd, &st) == 0 && (uint64_t)st.st_dev == e->dev &&
         (uint64_t)st.st_ino == e->ino;
  luamp_sys.close(fd);
  if (same) luamp_sys.shm_unlink(e->name);
}

/* Drops owners that are `leaving` (0: none) or dead -- of those, only the
 * ones with pid `only` when it is not 0 (a cheap look after one death) --
 * and unlinks the blocks left with no owner by that (under mu). */
static void sweep_locked(uint64_t leaving, pid_t only) {
  uint32_t used = 0;
  for (int i = 0; i < TRACK_SLOTS; i++) {
    struct track_entry *e = &table->e[i];
    int dropped = 0;
    if (!e->name[0]) continue;
    used++;
    for (int j = 0; j < TRACK_OWNERS; j++) {
      uint64_t o = e->owners[j];
      if (o == 0) continue;
      if (o == leaving ||
          ((only == 0 || (pid_t)(o & 0xffffffffu) == only) &&
           !luamp_id_alive(o))) {
        e->owners[j] = 0;
        dropped = 1;
      }
    }
    if (dropped && entry_owners(e) == 0) {
      entry_unlink(e);
      entry_clear(e);
      used--;
    }
  }
  table->used = used;   /* recounted: right again after a torn update */
}

void luamp_shm_sweep(pid_t pid) {
  if (table == NULL || table->used == 0) return;   /* a hint; rechecked */
  if (!table_lock()) return;
  sweep_locked(0, pid);
  table_unlock();
}

/* Keeps only the table among the shared mappings this process inherited
 * (the tracker must not keep queues', Values' or blocks' memory alive),
 * and gives back the program's malloc heap: a fork shares it copy-on-write,
 * so every page the program writes later would stay twice while the
 * tracker runs.  The tracker calls nothing that allocates after this. */
static void drop_inherited_memory(void) {
  enum { MAX_MAPS = 4096 };
  static uintptr_t lo[MAX_MAPS], hi[MAX_MAPS];
  uintptr_t heap_lo = 0, heap_hi = 0;
  int n = 0;
  char line[512];
  FILE *f = fopen("/proc/self/maps", "re");
  if (f == NULL) return;
  while (n < MAX_MAPS && fgets(line, sizeof line, f)) {
    unsigned long a, b;
    char perms[8];
    if (strchr(line, '\n') == NULL) {   /* a long path: skip its rest */
      int c;
      while ((c = fgetc(f)) != EOF && c != '\n') {}
    }
    if (sscanf(line, "%lx-%lx %7s", &a, &b, perms) != 3) continue;
    if (strstr(line, " [heap]")) {
      heap_lo = a;
      heap_hi = b;
    }
    if (perms[3] != 's' || a == (uintptr_t)table) continue;
    lo[n] = a;
    hi[n++] = b;
  }
  fclose(f);
  for (int i = 0; i < n; i++) luamp_sys.munmap((void *)lo[i], hi[i] - lo[i]);
  if (heap_hi > heap_lo)
    madvise((void *)heap_lo, heap_hi - heap_lo, MADV_DONTNEED);
}

static LUAMP_NORETURN void tracker_main(void) {
  struct timespec period = {0, TRACKER_PERIOD_MS * 1000000L};
  uint64_t me = luamp_process_id();
  sigset_t none;
  int idle = 0, fd;
  /* The tracker's own set-up calls stay direct (not luamp_sys): it is a
   * daemon of its own, and a failure of any of them changes nothing a
   * caller could see. */
  prctl(PR_SET_NAME, "luamp-shmtrack");
  setsid();                         /* a terminal's Ctrl-C is not for it */
  signal(SIGINT, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  sigemptyset(&none);
  if (luamp_sys.pthread_sigmask(SIG_SETMASK, &none, NULL) != 0) _exit(0);
  /* no fd of the program: pipes and sockets must see EOF without us */
  close_range(0, ~0U, 0);
  fd = open("/dev/null", O_RDWR);
  if (fd == 0) {
    (void)!dup(0);
    (void)!dup(0);
  }
  drop_inherited_memory();
  if (!table_lock()) _exit(0);
  if (table->tracker != 0 && table->tracker != me &&
      luamp_id_alive(table->tracker)) {
    table_unlock();                 /* another one runs already */
    _exit(0);
  }
  table->tracker = me;
  table->starting = 0;              /* started: no one waits for us now */
  table_unlock();
  for (;;) {
    while (luamp_sys.nanosleep(&period, &period) != 0 && errno == EINTR) {}
    period.tv_nsec = TRACKER_PERIOD_MS * 1000000L;
    if (!table_lock()) _exit(0);
    sweep_locked(0, 0);
    if (table->tracker != me) {     /* replaced (we were thought dead) */
      table_unlock();
      _exit(0);
    }
    idle = table->used == 0 ? idle + 1 : 0;
    if (idle >= 2) {
      table->tracker = 0;
      table_unlock();
      _exit(0);
    }
    table_unlock();
  }
}

/* Forks the tracker (mu not held: a child must not inherit a held robust
 * mutex).  Not through luamp_fork: it runs no Lua, so neither the
 * program's at-fork hooks nor its fork accounting concern it -- nor its
 * threaded-fork warning: the caller may be a threaded host (under the
 * forkserver start method a SharedMemory made in the host starts the
 * tracker from there), and this fork is safe there.  The middle child
 * only forks again and _exits; the tracker runs none of the host's code,
 * and its one allocation (the fopen of its maps) is glibc's malloc,
 * whose locks glibc's fork makes usable in the child; the only lock it
 * takes is the table's robust mutex. */
static void start_tracker(void) {
  sigset_t all, old;
  pid_t mid;
  int st;
  sigfillset(&all);
  if (luamp_sys.pthread_sigmask(SIG_SETMASK, &all, &old) != 0)
    return;                         /* not started: retried later */
  mid = luamp_sys.fork();
  if (mid == 0) {
    if (luamp_sys.fork() == 0) tracker_main();
    _exit(0);
  }
  /* (cannot fail: the same call accepted this set a moment ago) */
  (void)luamp_sys.pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (mid > 0)
    while (luamp_sys.waitpid(mid, &st, 0) < 0 && errno == EINTR) {}
}

static pthread_once_t atexit_once = PTHREAD_ONCE_INIT;

static void register_atexit(void) {
  atexit(luamp_shm_cleanup);
}

/* Makes this process an owner of the block: 0, or -1 when the table is
 * missing or full (too many blocks, or owners of one block). */
static int own(const char *name, uint64_t dev, uint64_t ino) {
  uint64_t me = luamp_process_id();
  struct track_entry *e;
  int need_tracker, i;
  if (!table_lock()) return -1;
  e = entry_find(name);
  if (e && (e->dev != dev || e->ino != ino)) {
    entry_clear(e);                 /* that block is gone: a new one */
    e = NULL;
  }
  if (e == NULL) {
    for (i = 0; i < TRACK_SLOTS && table->e[i].name[0]; i++) {}
    if (i == TRACK_SLOTS) {
      table_unlock();
      return -1;
    }
    e = &table->e[i];
    memset(e->owners, 0, sizeof e->owners);
    e->owners[0] = me;
    e->dev = dev;
    e->ino = ino;
    table->used++;
    /* the first byte last: the entry is in use once the name is whole */
    snprintf(e->name + 1, sizeof e->name - 1, "%s", name + 1);
    atomic_thread_fence(memory_order_release);
    e->name[0] = name[0];
  } else {
    int free_slot = -1;
    for (i = 0; i < TRACK_OWNERS; i++) {
      if (e->owners[i] == me) break;
      if (e->owners[i] == 0 && free_slot < 0) free_slot = i;
    }
    if (i == TRACK_OWNERS) {
      if (free_slot < 0) {
        table_unlock();
        return -1;
      }
      e->owners[free_slot] = me;
    }
  }
  need_tracker = (table->tracker == 0 || !luamp_id_alive(table->tracker)) &&
                 luamp_now() - table->starting > 1.0;
  if (need_tracker) table->starting = luamp_now();
  owner_pid = luamp_pid();
  table_unlock();
  pthread_once(&atexit_once, register_atexit);
  if (need_tracker) start_tracker();
  return 0;
}

/* This process gives up its ownership; 1 if it had it.  The block is not
 * unlinked, even when nobody owns it any more. */
static int disown(const char *name) {
  uint64_t me = luamp_process_id();
  struct track_entry *e;
  int had = 0;
  if (!table_lock()) return 0;
  if ((e = entry_find(name)) != NULL) {
    for (int i = 0; i < TRACK_OWNERS; i++) {
      if (e->owners[i] == me) {
        e->owners[i] = 0;
        had = 1;
      }
    }
    if (had && entry_owners(e) == 0) entry_clear(e);
  }
  table_unlock();
  return had;
}

/* The name was unlinked: nobody owns what it named. */
static void forget(const char *name) {
  struct track_entry *e;
  if (table == NULL || table->used == 0 || !table_lock()) return;
  if ((e = entry_find(name)) != NULL) entry_clear(e);
  table_unlock();
}

/* Blocks this process created while the table was full: unlinked at its
 * exit only (the behaviour before the table).  Guards tracked. */
static pthread_mutex_t track_mu = PTHREAD_MUTEX_INITIALIZER;
struct tracked {
  struct tracked *next;
  pid_t pid;                   /* the creator: only it unlinks */
  char name[NAME_MAX_LEN + 2];
};
static struct tracked *tracked;

LUAMP_CHILD_PATH void luamp_shm_cleanup(void) {
  pid_t me = luamp_pid();
  struct tracked *t, *next;
  /* (Nothing tracked, the common case at a child's exit: no lock taken.
   * Locking writes the mutex, and in a forked child every page written
   * is a copy -- one page fault per Process started.  The writers of
   * tracked store it atomically for this read.) */
  if (__atomic_load_n(&tracked, __ATOMIC_ACQUIRE) == NULL) goto shared_table;
  pthread_mutex_lock(&track_mu);
  for (t = tracked; t; t = next) {
    next = t->next;
    if (t->pid == me) luamp_sys.shm_unlink(t->name);
    free(t);
  }
  __atomic_store_n(&tracked, NULL, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&track_mu);
shared_table:
  if (owner_pid == luamp_pid() && table != NULL && table->used > 0 &&
      table_lock()) {
    sweep_locked(luamp_process_id(), -1);
    table_unlock();
  }
}

static void track(const char *name) {
  struct tracked *t = malloc(sizeof *t);
  if (t == NULL) return;   /* then it is not cleaned up: never wrong */
  t->pid = luamp_pid();
  snprintf(t->name, sizeof t->name, "%s", name);
  pthread_mutex_lock(&track_mu);
  t->next = tracked;
  __atomic_store_n(&tracked, t, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&track_mu);
  pthread_once(&atexit_once, register_atexit);
}

static void untrack(const char *name) {
  struct tracked **pp, *t;
  pthread_mutex_lock(&track_mu);
  for (pp = &tracked; (t = *pp) != NULL; pp = &t->next) {
    if (strcmp(t->name, name) == 0) {
      __atomic_store_n(pp, t->next, __ATOMIC_RELEASE);
      free(t);
      break;
    }
  }
  pthread_mutex_unlock(&track_mu);
}

/* ---- the object --------------------------------------------------------------- */

static struct luamp_type shm_type;   /* (at the end) */

static struct shm *checkshm(lua_State *L, int idx) {
  struct shm *s = luamp_self(L, idx, &shm_type);
  if (s->base == NULL)
    luamp_raise(L, "ValueError", "SharedMemory is closed");
  return s;
}

/* What a failed shm_open/shm_unlink names in its message:
 * "shared memory 'psm_x': No such file or directory". */
static const char *shm_what(lua_State *L, struct shm *s) {
  return lua_pushfstring(L, "shared memory '%s'", s->name + 1);
}

/* A name the OS will see whole: no NUL (the OS would see it cut there:
 * another block), no '/', 1..NAME_MAX_LEN characters. */
static void check_name(lua_State *L, const char *name, size_t namelen) {
  const char *nul = memchr(name, '\0', namelen);
  if (nul != NULL)
    luamp_raise(L, "ValueError", "SharedMemory: name contains a NUL byte "
                "(at byte %d)", (int)(nul - name) + 1);
  luaL_argcheck(L, name[0] != '\0' && strlen(name) <= NAME_MAX_LEN &&
                strchr(name, '/') == NULL, 1,
                "name must be 1..250 characters without '/'");
}

/* Opens (or creates) the block into s->name; returns the fd, or -1 with
 * errno.  Without a name: Python's default names, psm_ and 8 hex digits,
 * retried on clash. */
static int open_block(struct shm *s, const char *name, int create) {
  int fd = -1;
  if (name) {
    snprintf(s->name, sizeof s->name, "/%s", name);
    return luamp_sys.shm_open(s->name,
                              create ? O_CREAT | O_EXCL | O_RDWR : O_RDWR,
                              0600);
  }
  for (int tries = 0; tries < 100; tries++) {
    uint32_t r;
    if (luamp_sys.getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
      r = (uint32_t)(luamp_pid() * 2654435761u) ^
          (uint32_t)(luamp_now() * 1e6) ^ (uint32_t)tries;
    snprintf(s->name, sizeof s->name, "/psm_%08x", (unsigned)r);
    fd = luamp_sys.shm_open(s->name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd >= 0 || errno != EEXIST) break;
  }
  return fd;
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
  int fd, err;
  void *base;
  luaL_argcheck(L, size >= 0, 3, "'size' must be a positive integer");
  if (create && size == 0)
    luaL_argerror(L, 3, "'size' must be a positive number different from "
                  "zero");
  if (!create && name == NULL)
    luaL_argerror(L, 1, "'name' can only be nil if create is true");
  if (name) check_name(L, name, namelen);
  s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  luaL_setmetatable(L, SHM_TNAME);
  fd = open_block(s, name, create);
  if (fd < 0) {
    err = errno;
    luamp_raise_errno(L, "OSError", err, shm_what(L, s));
  }
  if (create) {
    if (luamp_sys.ftruncate(fd, (off_t)size) != 0) {
      err = errno;
      luamp_sys.close(fd);
      luamp_sys.shm_unlink(s->name);
      luamp_raise_errno(L, "OSError", err, "ftruncate");
    }
  }
  if (luamp_sys.fstat(fd, &st) != 0) {
    err = errno;
    luamp_sys.close(fd);
    if (create) luamp_sys.shm_unlink(s->name);
    luamp_raise_errno(L, "OSError", err, "fstat");
  }
  s->dev = (uint64_t)st.st_dev;
  s->ino = (uint64_t)st.st_ino;
  if (!create) {
    size = (lua_Integer)st.st_size;
    if (size == 0) {
      luamp_sys.close(fd);
      luamp_raise(L, "ValueError", "shared memory '%s' is empty", s->name + 1);
    }
  }
  base = luamp_sys.mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  err = errno;
  luamp_sys.close(fd);   /* the mapping keeps the memory; no fd held */
  if (base == MAP_FAILED) {
    if (create) luamp_sys.shm_unlink(s->name);
    luamp_raise_errno(L, "OSError", err, "mmap");
  }
  s->base = base;
  s->size = (size_t)size;
  if (create && do_track && own(s->name, s->dev, s->ino) != 0)
    track(s->name);   /* no room in the table: unlinked at our exit only */
  return 1;
}

static int shm_close(lua_State *L) {
  struct shm *s = luamp_self(L, 1, &shm_type);
  if (s->base) {
    char *base = s->base;
    s->base = NULL;   /* closed before the mapping goes */
    luamp_sys.munmap(base, s->size);
  }
  return 0;
}

/* unlink(): removes the name (any process may, as Python); the memory
 * lives on while mapped. */
static int shm_unlink_m(lua_State *L) {
  struct shm *s = luamp_self(L, 1, &shm_type);
  if (luamp_sys.shm_unlink(s->name) != 0) {
    int err = errno;
    luamp_raise_errno(L, "OSError", err, shm_what(L, s));
  }
  s->unlinked = 1;
  untrack(s->name);
  forget(s->name);
  return 0;
}

/* track(): this process becomes an owner too (see "ownership" above);
 * untrack(): it gives up its ownership -> whether it had it. */
static int shm_track(lua_State *L) {
  struct shm *s = checkshm(L, 1);
  if (table == NULL)
    luamp_raise(L, "OSError", "SharedMemory: track: no ownership table");
  if (own(s->name, s->dev, s->ino) != 0)
    luamp_raise(L, "OSError", "SharedMemory: track: too many tracked "
                "blocks (%d) or owners of one block (%d)", TRACK_SLOTS,
                TRACK_OWNERS);
  return 0;
}

static int shm_untrack(lua_State *L) {
  struct shm *s = luamp_self(L, 1, &shm_type);
  int had = disown(s->name);
  pthread_mutex_lock(&track_mu);
  for (struct tracked *t = tracked; t; t = t->next)
    if (strcmp(t->name, s->name) == 0) had = 1;
  pthread_mutex_unlock(&track_mu);
  untrack(s->name);
  lua_pushboolean(L, had);
  return 1;
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

/* The block at idx, for a receive that writes into it
 * (conn:recv_bytes_into): NULL when idx holds no SharedMemory;
 * ValueError when it is closed. */
char *luamp_shm_bytes(lua_State *L, int idx, size_t *n) {
  struct shm *s;
  if (!luamp_is(L, idx, &shm_type)) return NULL;
  s = checkshm(L, idx);
  *n = s->size;
  return s->base;
}

static int shm_index(lua_State *L) {
  struct shm *s = luamp_self(L, 1, &shm_type);
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
  struct shm *s = luamp_self(L, 1, &shm_type);
  lua_pushfstring(L, "SharedMemory('%s', size=%I%s)", s->name + 1,
                  (lua_Integer)s->size, s->base ? "" : ", closed");
  return 1;
}

/* ---- travelling: a block goes by name, arrives attached -------------------------
 *
 * Through a queue, a pipe or as a task's argument a SharedMemory travels
 * as Python pickles one: by name.  The handle also carries the block's
 * device and inode, so the receiver attaches to that very block or fails
 * (DecodeError) -- never to another block made under the name since.  The
 * receiver merely attaches: it is no owner (see "ownership"), so its
 * exit, its death or its garbage collector never unlink the block; it
 * may call track() to become one.
 *
 * Trust: handles are only made by trusted decodes (codec.c), i.e. data
 * from the process tree or an authenticated peer, which may send code
 * anyway.  An untrusted mp.decode refuses a SharedMemory as it refuses
 * every handle: attaching by a name a stranger chose would map (and let
 * the program write) any block this user can open. */
#define WIRE_FIXED 24   /* dev, ino, size: 8 bytes each, then the name */

static void shm_encode(lua_State *L, int idx) {
  struct shm *s = luamp_self(L, idx, &shm_type);
  luaL_Buffer b;
  uint64_t fixed[3];
  if (s->base == NULL)
    luamp_raise(L, "ValueError", "SharedMemory '%s' is closed", s->name + 1);
  if (s->unlinked)
    luamp_raise(L, "ValueError", "SharedMemory '%s' was unlinked: its name "
                "reaches nothing", s->name + 1);
  fixed[0] = s->dev;
  fixed[1] = s->ino;
  fixed[2] = (uint64_t)s->size;
  luaL_buffinit(L, &b);
  luaL_addlstring(&b, (const char *)fixed, sizeof fixed);
  luaL_addstring(&b, s->name + 1);
  luaL_pushresult(&b);
}

static void shm_decode(lua_State *L, const char *p, size_t n) {
  uint64_t fixed[3];
  struct shm *s;
  struct stat st;
  void *base;
  int fd, err;
  if (n <= WIRE_FIXED || n - WIRE_FIXED > NAME_MAX_LEN ||
      memchr(p + WIRE_FIXED, '/', n - WIRE_FIXED) != NULL ||
      memchr(p + WIRE_FIXED, '\0', n - WIRE_FIXED) != NULL)
    luamp_raise(L, "DecodeError", "malformed SharedMemory handle");
  memcpy(fixed, p, sizeof fixed);
  s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  luaL_setmetatable(L, SHM_TNAME);
  s->name[0] = '/';
  memcpy(s->name + 1, p + WIRE_FIXED, n - WIRE_FIXED);
  s->name[n - WIRE_FIXED + 1] = '\0';
  fd = luamp_sys.shm_open(s->name, O_RDWR, 0);
  if (fd < 0) {
    err = errno;
    luamp_raise(L, "DecodeError", "shared memory '%s' cannot be attached: "
                "%s (unlinked before it arrived?)", s->name + 1,
                strerror(err));
  }
  if (luamp_sys.fstat(fd, &st) != 0 || (uint64_t)st.st_dev != fixed[0] ||
      (uint64_t)st.st_ino != fixed[1] || st.st_size <= 0) {
    close(fd);
    luamp_raise(L, "DecodeError", "shared memory '%s' is not the block that "
                "was sent (it was unlinked, and the name made again)",
                s->name + 1);
  }
  base = luamp_sys.mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE,
                        MAP_SHARED, fd, 0);
  err = errno;
  close(fd);
  if (base == MAP_FAILED)
    luamp_raise(L, "DecodeError", "shared memory '%s' cannot be mapped: %s",
                s->name + 1, strerror(err));
  s->dev = fixed[0];
  s->ino = fixed[1];
  s->size = (size_t)st.st_size;
  s->base = base;   /* attached, not owned: nothing registered */
}

static const struct luamp_handle_ops shm_handle_ops = {
  SHM_TNAME, shm_encode, shm_decode
};

static const luaL_Reg shm_meth[] = {
  {"read", shm_read}, {"write", shm_write}, {"close", shm_close},
  {"unlink", shm_unlink_m}, {"track", shm_track},
  {"untrack", shm_untrack}, {NULL, NULL}
};
static const luaL_Reg shm_mm[] = {
  {"__gc", shm_close}, {"__close", shm_close},
  {"__tostring", shm_tostring}, {NULL, NULL}
};
static struct luamp_type shm_type = {
  SHM_TNAME, shm_meth, shm_mm, shm_index, 0, 0, 0
};

int luamp_open_shm(lua_State *L) {
  static pthread_once_t table_once = PTHREAD_ONCE_INIT;
  pthread_once(&table_once, table_init);   /* before any fork of ours */
  lua_pushcfunction(L, l_SharedMemory);
  lua_setfield(L, -2, "SharedMemory");
  luamp_newtype(L, &shm_type);
  lua_pop(L, 1);
  luamp_register_handle(L, &shm_handle_ops);
  return 0;
}
