/*
 * arena.c -- shared mappings, and the waiting machinery every shared
 * primitive uses.
 *
 * An arena is one memfd (MFD_CLOEXEC) mapped MAP_SHARED.  Queues, locks,
 * events and Values each live in their own arena.  A process keeps the
 * memfd open for as long as it maps the arena, for one reason: a process
 * that learns of the object later (a handle inside a message, sent to a
 * process forked before the object existed) reaches the memfd through
 * /proc/<pid>/fd/<fd> of any process that holds it.  The arena's header
 * carries a random 64-bit uid that a process checks after such an open,
 * so a recycled pid or fd number never yields the wrong object.
 *
 * Every process keeps a registry of its arenas by uid.  A mapping made
 * before a fork is at the same address in the child and stays in the
 * child's registry, so decoding a handle there costs one hash look-up.
 * Each Lua object holds one reference to its arena; the last reference in
 * a process unmaps the arena and closes the memfd in that process only.
 * The memory itself lives until the last process lets go.
 *
 * Waiting: internal guards are process-shared robust pthread mutexes held
 * for short, bounded work; luamp_mutex_lock repairs after a holder died.
 * Blocking waits (a full queue, a held Lock) sleep on raw shared futexes
 * in slices, checking Ctrl-C and deadlines between slices.  pthread
 * condition variables are not used: a waiter SIGKILLed inside
 * pthread_cond_wait can leave glibc's condvar wedged for everyone.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define ARENA_MAGIC 0x414e5241504d554cULL   /* "LUMPARNA" little-endian */
#define HANDLE_VERSION 1

/* ---- identity of the calling thread --------------------------------- */

/* Cached per thread; reset in the child after fork (pthread_atfork). */
static __thread uint64_t self_id;

static void reset_self_id(void) {
  self_id = 0;
}

static pthread_once_t at_fork_once = PTHREAD_ONCE_INIT;

static void register_at_fork(void) {
  pthread_atfork(NULL, NULL, reset_self_id);
}

/* The start time of a task (clock ticks since boot), field 22 of
 * /proc/<tid>/stat; 0 when unreadable.  state receives field 3. */
static uint64_t task_start(pid_t tid, char *state) {
  char path[64], buf[1024];
  const char *p;
  ssize_t n;
  int fd, field;
  snprintf(path, sizeof path, "/proc/%d/stat", (int)tid);
  fd = luamp_sys.open(path, O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return 0;
  n = luamp_robust_read(fd, buf, sizeof buf - 1);
  luamp_sys.close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  p = strrchr(buf, ')');          /* the command name may hold anything */
  if (p == NULL || p[1] != ' ') return 0;
  p += 2;
  if (state) *state = *p;
  for (field = 3; field < 22 && *p; p++)
    if (*p == ' ') field++;
  return field == 22 ? strtoull(p, NULL, 10) : 0;
}

uint64_t luamp_self_id(void) {
  if (self_id == 0) {
    pthread_once(&at_fork_once, register_at_fork);  /* before caching */
    pid_t tid = (pid_t)syscall(SYS_gettid);
    uint64_t start = task_start(tid, NULL);
    self_id = (uint64_t)(uint32_t)tid | ((start & 0xffffffffu) << 32);
  }
  return self_id;
}

/* The same identity for the process as a whole: its pid and start time
 * (what SharedMemory's owners are; a thread of an embedding host may end
 * long before its process). */
uint64_t luamp_process_id(void) {
  pid_t pid = luamp_pid();
  return (uint64_t)(uint32_t)pid | ((task_start(pid, NULL) & 0xffffffffu) << 32);
}

int luamp_id_alive(uint64_t id) {
  pid_t tid = (pid_t)(id & 0xffffffffu);
  char state = '?';
  uint64_t start;
  if (tid <= 0) return 0;
  if (kill(tid, 0) != 0 && errno == ESRCH) return 0;
  start = task_start(tid, &state);
  if (start == 0) return kill(tid, 0) == 0 || errno != ESRCH;
  /* a zombie (killed, not yet reaped) holds nothing any more */
  if (state == 'Z' || state == 'X') return 0;
  return (start & 0xffffffffu) == (id >> 32);
}

/* ---- robust mutexes --------------------------------------------------- */

#define MUTEX_SPINS 8           /* tries before sleeping */
#define MUTEX_SPIN_PAUSES 128   /* cpu_relax()es before each */

int luamp_mutex_init(pthread_mutex_t *m) {
  pthread_mutexattr_t a;
  int r;
  if ((r = pthread_mutexattr_init(&a)) != 0) return r;
  r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  if (r == 0) r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  if (r == 0) r = pthread_mutex_init(m, &a);
  pthread_mutexattr_destroy(&a);
  return r;
}

/* Critical sections are short: spinning a little before sleeping saves
 * the two system calls of a sleep and a wake-up when the holder runs on
 * another core.  Between tries the spinner only reads the lock word (with
 * glibc, whose layout we know): a trylock is a write, which takes the
 * mutex's cache line from the holder in the middle of its critical
 * section (a queue's holder then waits for it back to unlock).  Returns
 * trylock's result.
 *
 * The tries are far apart (128 pauses, ~2.7 us at the 21 ns a pause takes
 * on this machine's CPU; the whole spin as long as before, 1024 pauses):
 * while the holder's side goes on taking the mutex again, its lines stay
 * in its cache, and when the spinner's turn comes it, too, does several
 * steps in a row -- the lines then move once per several steps, not once
 * a step each way.  (Issue 18, queue small ints 1->1 on two cores, both
 * processes SCHED_FIFO to keep other load off: with a try every 16 pauses
 * a producer and a consumer each spent ~400-500 ns an item, most of it
 * waiting for lines; medians of 8 interleaved runs 1.72-2.54M items/s,
 * against 2.57-3.26M/s with 128, 2.87 growing 16 -> 128, 2.42 with 256,
 * and 1.33-1.38 with 1-4.  More sleeps: 2.5k futex calls in 5e5 items
 * instead of 0.2k, still a gain.  In other stretches of the shared VM 16
 * and 128 ran alike, and a table row whose getter is the slow side lost
 * 5-10%: a lost trylock now costs the spinner ~2.7 us.) */
static int mutex_spin(pthread_mutex_t *m) {
  int r = pthread_mutex_trylock(m);
  for (int i = 0; r == EBUSY && i < MUTEX_SPINS; i++) {
    for (int j = 0; j < MUTEX_SPIN_PAUSES; j++) luamp_cpu_relax();
#ifdef __GLIBC__
    if (__atomic_load_n(&m->__data.__lock, __ATOMIC_RELAXED) != 0) continue;
#endif
    r = pthread_mutex_trylock(m);
  }
  return r;
}

/* After a lock call: the previous holder died inside its critical
 * section.  repair() must be idempotent: if we die in it, the next locker
 * repeats it. */
static int mutex_owner_dead(int r, pthread_mutex_t *m,
                            void (*repair)(void *), void *arg) {
  if (r == EOWNERDEAD) {
    if (repair) repair(arg);
    r = pthread_mutex_consistent(m);
  }
  return r;
}

/* Specs: core._stop_in_next_lock("SIGSTOP" [, n]) makes the n-th next
 * internal mutex this process takes (1 by default) stop it (SIGSTOP)
 * while it holds that mutex -- a process stopped inside an operation, on
 * demand. */
static int stop_in_next_lock;

static int mutex_taken(int r) {
  if (r == 0 && stop_in_next_lock > 0 && --stop_in_next_lock == 0)
    kill(luamp_pid(), SIGSTOP);
  return r;
}

static int l_stop_in_next_lock(lua_State *L) {
  lua_Integer n = luaL_optinteger(L, 2, 1);
  luaL_argcheck(L, strcmp(luaL_checkstring(L, 1), "SIGSTOP") == 0, 1,
                "'SIGSTOP' expected");
  luaL_argcheck(L, n >= 1 && n <= 1000, 2, "1..1000 expected");
  stop_in_next_lock = (int)n;
  return 0;
}

int luamp_mutex_lock(pthread_mutex_t *m, void (*repair)(void *), void *arg) {
  int r = mutex_spin(m);
  if (r == EBUSY) r = pthread_mutex_lock(m);
  return mutex_taken(mutex_owner_dead(r, m, repair, arg));
}

/* A holder that is alive but stopped (SIGSTOP, a debugger, a swapped-out
 * machine) keeps an internal guard for as long as it stays stopped;
 * pthread_mutex_lock would wait that long and never see Ctrl-C (glibc
 * retries its futex wait after a signal).  So a caller with a deadline
 * waits in slices of MUTEX_SLICE_MS on the monotonic clock (luamp_now's),
 * checking the deadline and the Lua state's pending Ctrl-C between them. */
#define MUTEX_SLICE_MS 100

/* ts = CLOCK_MONOTONIC's time ms milliseconds from now (the absolute
 * form pthread_mutex_clocklock and FUTEX_WAIT_BITSET take). */
static void monotonic_in(struct timespec *ts, int ms) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (long)(ms % 1000) * 1000000L;
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

int luamp_mutex_lock_until(lua_State *L, pthread_mutex_t *m,
                           void (*repair)(void *), void *arg,
                           double deadline) {
  int r = mutex_spin(m);
  while (r == EBUSY) {
    struct timespec ts;
    int ms;
    if (L && luamp_interrupted(L)) return EINTR;
    ms = luamp_remaining_ms(deadline, MUTEX_SLICE_MS);
    if (deadline >= 0 && ms == 0) return ETIMEDOUT;
    monotonic_in(&ts, ms);
    r = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
    if (r == ETIMEDOUT) r = EBUSY;   /* a slice passed: check again */
  }
  return mutex_taken(mutex_owner_dead(r, m, repair, arg));
}

void luamp_mutex_unlock(pthread_mutex_t *m) {
  LUAMP_ASSERT(luamp_mutex_held(m));
  pthread_mutex_unlock(m);
}

/* glibc keeps the holder's thread id in the mutex (robust mutexes need it
 * to report EOWNERDEAD); elsewhere "someone holds it" is the best test. */
int luamp_mutex_held(pthread_mutex_t *m) {
#ifdef __GLIBC__
  return m->__data.__owner == (int)gettid();
#else
  int r = pthread_mutex_trylock(m);
  if (r == 0) pthread_mutex_unlock(m);
  return r == EBUSY;
#endif
}

/* ---- futexes ------------------------------------------------------------ */

void luamp_futex_wake(_Atomic uint32_t *w, int n) {
  luamp_sys.futex(w, FUTEX_WAKE, (uint32_t)n, NULL, 0);
}

int luamp_futex_wake_bits(_Atomic uint32_t *w, int n, uint32_t bits) {
  long r = luamp_sys.futex(w, FUTEX_WAKE_BITSET, (uint32_t)n, NULL, bits);
  return r > 0 ? (int)r : 0;
}

/* Sleeps while *w == val, at most ms milliseconds (ms < 0: no limit),
 * woken only by wakes whose bits meet bits.  Returns 0 when woken or the
 * value differs, ETIMEDOUT, or EINTR. */
static int futex_wait_ms(_Atomic uint32_t *w, uint32_t val, int ms,
                         uint32_t bits) {
  struct timespec ts, *tp = NULL;
  long r;
  if (bits == LUAMP_ANY_BITS) {       /* a relative timeout */
    if (ms >= 0) {
      ts.tv_sec = ms / 1000;
      ts.tv_nsec = (long)(ms % 1000) * 1000000L;
      tp = &ts;
    }
    r = luamp_sys.futex(w, FUTEX_WAIT, val, tp, 0);
  } else {                            /* FUTEX_WAIT_BITSET's is absolute */
    if (ms >= 0) {
      monotonic_in(&ts, ms);
      tp = &ts;
    }
    r = luamp_sys.futex(w, FUTEX_WAIT_BITSET, val, tp, bits);
  }
  if (r == 0) return 0;
  if (errno == EAGAIN) return 0;
  return errno == ETIMEDOUT ? ETIMEDOUT : errno == EINTR ? EINTR : 0;
}

int luamp_wait_step_bits(lua_State *L, _Atomic uint32_t *w, uint32_t val,
                         double deadline, int slice_ms, uint32_t bits) {
  int ms, r;
  if (L && luamp_interrupted(L)) return LUAMP_WAIT_INTERRUPTED;
  ms = luamp_remaining_ms(deadline, slice_ms);
  if (deadline >= 0 && ms == 0) return LUAMP_WAIT_TIMEOUT;
  r = futex_wait_ms(w, val, ms, bits);
  if (r == EINTR) {
    if (L && luamp_interrupted(L)) return LUAMP_WAIT_INTERRUPTED;
    return LUAMP_WAIT_AGAIN;
  }
  if (r == ETIMEDOUT) {
    if (deadline >= 0 && luamp_remaining_ms(deadline, -1) == 0)
      return LUAMP_WAIT_TIMEOUT;
    return LUAMP_WAIT_SLICE;
  }
  return LUAMP_WAIT_AGAIN;
}

int luamp_wait_step(lua_State *L, _Atomic uint32_t *w, uint32_t val,
                    double deadline, int slice_ms) {
  return luamp_wait_step_bits(L, w, val, deadline, slice_ms, LUAMP_ANY_BITS);
}

/* ---- the per-process registry of arenas --------------------------------- */

#define NBUCKETS 64

/* Guards buckets[] and every arena's refs: the registry is per process,
 * but a host may run Lua states in several threads. */
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct luamp_arena *buckets[NBUCKETS];

static struct luamp_arena *reg_find(uint64_t uid) {
  struct luamp_arena *a;
  for (a = buckets[uid % NBUCKETS]; a; a = a->next)
    if (a->uid == uid) return a;
  return NULL;
}

static void reg_insert(struct luamp_arena *a) {
  a->next = buckets[a->uid % NBUCKETS];
  buckets[a->uid % NBUCKETS] = a;
}

static void reg_remove(struct luamp_arena *a) {
  struct luamp_arena **pp = &buckets[a->uid % NBUCKETS];
  while (*pp && *pp != a) pp = &(*pp)->next;
  if (*pp) *pp = a->next;
}

static uint64_t new_uid(void) {
  static _Atomic uint64_t counter;
  uint64_t u = 0;
  if (luamp_sys.getrandom(&u, sizeof u, GRND_NONBLOCK) != (ssize_t)sizeof u) {
    /* no entropy yet: pid, time and a counter are unique enough here */
    u = ((uint64_t)luamp_pid() << 40) ^ (uint64_t)(luamp_now() * 1e9) ^
        (atomic_fetch_add(&counter, 1) << 20);
  }
  return u ? u : 1;
}

/* memfd_create, raising the soft fd limit to the hard one once if the
 * process runs out of fds: every shared object holds one. */
static int new_memfd(const char *name) {
  int fd = luamp_sys.memfd_create(name, MFD_CLOEXEC);
  if (fd < 0 && errno == EMFILE) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
        fd = luamp_sys.memfd_create(name, MFD_CLOEXEC);
    }
    if (fd < 0) errno = EMFILE;
  }
  return fd;
}

struct luamp_arena *luamp_arena_new(lua_State *L, const char *name,
                                    size_t size, uint32_t kind) {
  struct luamp_arena *a;
  struct luamp_arena_hdr *h;
  void *base;
  int fd, err;
  if (size < LUAMP_ARENA_HDR) size = LUAMP_ARENA_HDR;
  a = malloc(sizeof *a);
  if (a == NULL) luamp_raise_errno(L, "OSError", ENOMEM, "arena");
  fd = new_memfd(name);
  if (fd < 0) {
    err = errno;
    free(a);
    luamp_raise_errno(L, "OSError", err, "memfd_create");
  }
  if (luamp_sys.ftruncate(fd, (off_t)size) != 0) {
    err = errno;
    luamp_sys.close(fd);
    free(a);
    luamp_raise_errno(L, "OSError", err, "ftruncate");
  }
  base = luamp_sys.mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    err = errno;
    luamp_sys.close(fd);
    free(a);
    luamp_raise_errno(L, "OSError", err, "mmap");
  }
  h = base;
  h->uid = new_uid();
  h->size = size;
  h->creator = (int32_t)luamp_pid();
  h->creator_fd = fd;
  h->kind = kind;
  h->magic = ARENA_MAGIC;
  a->uid = h->uid;
  a->base = base;
  a->size = size;
  a->fd = fd;
  a->refs = 1;
  pthread_mutex_lock(&reg_mu);
  reg_insert(a);
  pthread_mutex_unlock(&reg_mu);
  return a;
}

void luamp_arena_ref(struct luamp_arena *a) {
  pthread_mutex_lock(&reg_mu);
  a->refs++;
  pthread_mutex_unlock(&reg_mu);
}

void luamp_arena_unref(struct luamp_arena *a) {
  int last;
  pthread_mutex_lock(&reg_mu);
  last = --a->refs == 0;
  if (last) reg_remove(a);
  pthread_mutex_unlock(&reg_mu);
  if (last) {
    luamp_sys.munmap(a->base, a->size);
    luamp_sys.close(a->fd);
    free(a);
  }
}

/* ---- handles ------------------------------------------------------------- */

/* The bytes that describe (arena, offset) to another process:
 *   u8 version, u64 uid, u64 size, u64 offset, u8 n, n x (i32 pid, i32 fd)
 * The candidates are this process (whose fd any descendant can open) and
 * the arena's creator (in case this process is gone when the message is
 * read). */
struct handle_head {
  uint8_t version;
  uint8_t ncand;
  uint16_t pad;
  uint32_t kind;
  uint64_t uid, size, offset;
};

/* Appends the bytes that let another process of the tree reach
 * (arena, offset). */
static void arena_describe(luaL_Buffer *b, struct luamp_arena *a,
                           size_t offset) {
  const struct luamp_arena_hdr *h = (const void *)a->base;
  struct handle_head hh;
  int32_t cand[4];
  memset(&hh, 0, sizeof hh);
  hh.version = HANDLE_VERSION;
  hh.kind = h->kind;
  hh.uid = a->uid;
  hh.size = a->size;
  hh.offset = offset;
  cand[0] = (int32_t)luamp_pid();
  cand[1] = a->fd;
  cand[2] = h->creator;
  cand[3] = h->creator_fd;
  hh.ncand = cand[0] == cand[2] ? 1 : 2;
  luaL_addlstring(b, (const char *)&hh, sizeof hh);
  luaL_addlstring(b, (const char *)cand, hh.ncand * 2 * sizeof(int32_t));
}

/* Maps the memfd behind /proc/<pid>/fd/<fd> if it is the arena uid. */
static struct luamp_arena *attach_via_proc(int32_t pid, int32_t fdno,
                                           uint64_t uid, uint64_t size,
                                           int *err) {
  char path[64];
  struct stat st;
  struct luamp_arena *a;
  const struct luamp_arena_hdr *h;
  void *base;
  int fd;
  snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)pid, (int)fdno);
  fd = luamp_sys.open(path, O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) {
    *err = errno;
    return NULL;
  }
  if (luamp_sys.fstat(fd, &st) != 0 ||
      (uint64_t)st.st_size != size) {
    luamp_sys.close(fd);
    *err = ESTALE;
    return NULL;
  }
  base = luamp_sys.mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    *err = errno;
    luamp_sys.close(fd);
    return NULL;
  }
  h = base;
  if (h->magic != ARENA_MAGIC || h->uid != uid || h->size != size) {
    luamp_sys.munmap(base, size);
    luamp_sys.close(fd);
    *err = ESTALE;
    return NULL;
  }
  a = malloc(sizeof *a);
  if (a == NULL) {
    luamp_sys.munmap(base, size);
    luamp_sys.close(fd);
    *err = ENOMEM;
    return NULL;
  }
  a->uid = uid;
  a->base = base;
  a->size = size;
  a->fd = fd;
  a->refs = 1;
  return a;
}

struct luamp_arena *luamp_arena_attach(lua_State *L, const char **pp,
                                       size_t *np, uint32_t kinds,
                                       size_t *offset) {
  struct handle_head hh;
  int32_t cand[4];
  struct luamp_arena *a, *other;
  int err = ENOENT;
  if (*np < sizeof hh) goto bad;
  memcpy(&hh, *pp, sizeof hh);
  if (hh.version != HANDLE_VERSION || hh.ncand < 1 || hh.ncand > 2 ||
      hh.kind >= 32 || !(kinds & (1u << hh.kind)) || *np < sizeof hh + hh.ncand * 2 * sizeof(int32_t) ||
      hh.offset >= hh.size)
    goto bad;
  memcpy(cand, *pp + sizeof hh, hh.ncand * 2 * sizeof(int32_t));
  *pp += sizeof hh + hh.ncand * 2 * sizeof(int32_t);
  *np -= sizeof hh + hh.ncand * 2 * sizeof(int32_t);
  *offset = (size_t)hh.offset;
  pthread_mutex_lock(&reg_mu);
  a = reg_find(hh.uid);
  if (a) a->refs++;
  pthread_mutex_unlock(&reg_mu);
  if (a) return a;
  for (int i = 0; i < hh.ncand && a == NULL; i++)
    a = attach_via_proc(cand[2 * i], cand[2 * i + 1], hh.uid, hh.size, &err);
  if (a == NULL) {
    if (err == ENOENT || err == ESTALE)
      luamp_raise(L, "DecodeError",
                  "shared object no longer reachable: no process that held "
                  "it (pid %d%s%d) has it any more",
                  (int)cand[0], hh.ncand > 1 ? ", " : "",
                  hh.ncand > 1 ? (int)cand[2] : 0);
    luamp_raise(L, "DecodeError",
                "cannot reach shared object of process %d: %s",
                (int)cand[0], strerror(err));
  }
  /* another Lua state of this process may have attached meanwhile */
  pthread_mutex_lock(&reg_mu);
  other = reg_find(hh.uid);
  if (other) {
    other->refs++;
  } else {
    reg_insert(a);
  }
  pthread_mutex_unlock(&reg_mu);
  if (other) {
    luamp_sys.munmap(a->base, a->size);
    luamp_sys.close(a->fd);
    free(a);
    a = other;
  }
  return a;
bad:
  luamp_raise(L, "DecodeError", "malformed shared object handle");
}

/* ---- Lua objects over arenas ---------------------------------------------- */

/* Objects made in (or decoded into) this Lua state, by address: decoding
 * a handle to an object the state already has gives that same object, so
 * identity and per-object Lua state (a Barrier's action) survive a round
 * trip.  Weak values: the cache never keeps an object alive. */
static const char OBJECTS_KEY[] = "multiprocessing.objects";

static void push_objects(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, OBJECTS_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, OBJECTS_KEY);
  }
}

struct luamp_obj *luamp_obj_alloc(lua_State *L, const char *tname, int nuv) {
  struct luamp_obj *o = lua_newuserdatauv(L, sizeof *o, nuv);
  memset(o, 0, sizeof *o);
  o->tag = luamp_obj_tag(tname);
  luaL_setmetatable(L, tname);
  return o;
}

void luamp_obj_bind(lua_State *L, int idx, struct luamp_arena *a,
                    size_t offset) {
  struct luamp_obj *o = lua_touserdata(L, idx);
  /* made closed by luamp_obj_alloc, bound once (liolib's order) */
  LUAMP_ASSERT(o != NULL && o->arena == NULL && a != NULL);
  idx = lua_absindex(L, idx);
  o->arena = a;
  o->p = a->base + offset;
  push_objects(L);
  lua_pushvalue(L, idx);
  lua_rawsetp(L, -2, o->p);
  lua_pop(L, 1);
}

int luamp_obj_push_cached(lua_State *L, struct luamp_arena *a, size_t offset,
                          const char *tname) {
  push_objects(L);
  if (lua_rawgetp(L, -1, a->base + offset) != LUA_TNIL &&
      luaL_testudata(L, -1, tname) != NULL &&
      ((struct luamp_obj *)lua_touserdata(L, -1))->arena == a) {
    lua_remove(L, -2);
    return 1;
  }
  lua_pop(L, 2);
  return 0;
}

struct luamp_obj *luamp_obj_self_slow(lua_State *L, int idx,
                                      const struct luamp_type *const *set,
                                      const char *what) {
  struct luamp_obj *o = luamp_self_of(L, idx, set);
  if (o->arena == NULL) {
    if (what == NULL) {
      for (int i = 0; set[i]; i++)
        if (luamp_is(L, idx, set[i])) what = set[i]->tname;
      if (strncmp(what, "multiprocessing.", 16) == 0) what += 16;
    }
    luamp_raise(L, "ValueError", "%s is closed", what);
  }
  /* a method's self: open, and pointing into its mapping */
  LUAMP_ASSERT(o->p >= o->arena->base &&
               o->p < o->arena->base + o->arena->size);
  return o;
}

/* Also every __gc: the cache entry of a collected object went with it
 * (weak values are cleared before finalizers run) and is left alone. */
void luamp_obj_close(lua_State *L, struct luamp_obj *o) {
  struct luamp_arena *a = o->arena;
  if (a == NULL) return;
  /* drop it from the cache only if the cache still names this object */
  push_objects(L);
  if (lua_rawgetp(L, -1, o->p) == LUA_TUSERDATA &&
      lua_touserdata(L, -1) == (void *)o) {
    lua_pushnil(L);
    lua_rawsetp(L, -3, o->p);
  }
  lua_pop(L, 2);
  o->arena = NULL;   /* closed before the resource goes */
  o->p = NULL;
  free(o->buf);
  o->buf = NULL;
  o->bufcap = 0;
  luamp_arena_unref(a);
}

void luamp_obj_describe(lua_State *L, int idx, luaL_Buffer *b) {
  struct luamp_obj *o = lua_touserdata(L, idx);
  if (o->arena == NULL) {
    const char *tname = "object";
    if (lua_getmetatable(L, idx)) {
      lua_getfield(L, -1, "__name");
      tname = lua_tostring(L, -1);
      lua_pop(L, 2);
      if (tname == NULL) tname = "object";
    }
    luamp_raise(L, "EncodeError", "cannot send a closed %s", tname);
  }
  arena_describe(b, o->arena, (size_t)(o->p - o->arena->base));
}

int luamp_obj_decode(lua_State *L, const char **p, size_t *n,
                     const char *tname, uint32_t kinds, int nuv) {
  size_t off;
  struct luamp_arena *a;
  /* the object first, closed: nothing leaks if anything below raises */
  luamp_obj_alloc(L, tname, nuv);
  a = luamp_arena_attach(L, p, n, kinds, &off);
  if (luamp_obj_push_cached(L, a, off, tname)) {
    luamp_arena_unref(a);
    lua_remove(L, -2);
    return 1;   /* an object this state already had */
  }
  luamp_obj_bind(L, -1, a, off);
  return 0;
}

/* ---- constructor arguments ------------------------------------------------------ */

int luamp_is_plain_table(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  if (lua_getmetatable(L, idx)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

int luamp_opts_args(lua_State *L, const char *const *keys) {
  int n = 0;
  if (lua_gettop(L) != 1 || !luamp_is_plain_table(L, 1)) return 0;
  for (; keys[n]; n++) lua_getfield(L, 1, keys[n]);
  lua_remove(L, 1);
  return 1;
}

/* ---- Lua face: introspection for the specs ---------------------------------- */

/* core.arena_count() -> number of arenas this process maps (for leak
 * checks in specs). */
static int l_arena_count(lua_State *L) {
  lua_Integer n = 0;
  pthread_mutex_lock(&reg_mu);
  for (int i = 0; i < NBUCKETS; i++)
    for (struct luamp_arena *a = buckets[i]; a; a = a->next) n++;
  pthread_mutex_unlock(&reg_mu);
  lua_pushinteger(L, n);
  return 1;
}

int luamp_open_arena(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"arena_count", l_arena_count},
    {"_stop_in_next_lock", l_stop_in_next_lock},
    {NULL, NULL}
  };
  push_objects(L);   /* made now, so that later look-ups never allocate */
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
