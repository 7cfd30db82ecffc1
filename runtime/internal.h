/*
 * internal.h -- declarations shared between the runtime's C files.
 *
 * Nothing here is part of the public interface (see luamp.h).  The library
 * is compiled with -fvisibility=hidden, so these symbols do not leave
 * libluamp.so; they still carry the luamp_ prefix because a static archive
 * shows every global symbol.
 */
#ifndef LUAMP_INTERNAL_H
#define LUAMP_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdatomic.h>

#include <lua.h>
#include <lauxlib.h>

#include "luamp.h"

#if defined(__GNUC__)
#define LUAMP_NORETURN __attribute__((noreturn))
#define LUAMP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define LUAMP_INLINE inline __attribute__((always_inline))
#define LUAMP_NOINLINE __attribute__((noinline))
/* Code a forked child runs between fork and _exit: kept together (ld
 * places .text.hot.* first in .text, beside the PLT).  A child's code
 * pages are not copied at fork but faulted in, one 64 KiB window at a
 * time, and the child path was spread over three windows of luamp. */
#define LUAMP_CHILD_PATH __attribute__((section(".text.hot.luamp_child")))
#else
#define LUAMP_CHILD_PATH
#define LUAMP_INLINE inline
#define LUAMP_NOINLINE
#define LUAMP_NORETURN
#define LUAMP_PRINTF(a, b)
#endif

/* Debug-build assertions for the invariants the comments state ("under
 * mu", "open handle"): compiled in when LUAMP_DEBUG is defined (make
 * sanitize does), nothing otherwise.  A failure prints the condition and
 * where, and aborts (errors.c). */
#ifdef LUAMP_DEBUG
#define LUAMP_ASSERT(c) \
  ((c) ? (void)0 : luamp_assert_fail(#c, __FILE__, __LINE__, __func__))
#else
#define LUAMP_ASSERT(c) ((void)0)
#endif
LUAMP_NORETURN void luamp_assert_fail(const char *cond, const char *file,
                                      int line, const char *func);
/* Message handler for lua_pcall: any error value as text with a
 * traceback (errors.c; the luamp host uses it too, through host.h). */
int luamp_msgh(lua_State *L);

/* ---- handle.c: one shape for every handle type ----------------------- */

/* A handle type (static storage).  luamp_newtype makes its metatable
 * once per state: metameth's functions, __name, and __index = a table of
 * meth's functions (with with()/guard() when it has _enter), or the
 * closure index with that table as upvalue 1 (types with fields). */
struct luamp_type {
  const char *tname;          /* "multiprocessing.Queue" */
  const luaL_Reg *meth;       /* NULL: no methods */
  const luaL_Reg *metameth;   /* __gc and __close: the same close */
  lua_CFunction index;        /* NULL: __index is the method table */
  int is_obj;                 /* its userdata is a struct luamp_obj */
  uint64_t tag;               /* is_obj: set by luamp_newtype */
  size_t size;                /* is_obj: set by luamp_newtype */
};
/* Registers t; pushes its method table (nil when it has none). */
void luamp_newtype(lua_State *L, struct luamp_type *t);
/* self: the userdata at idx when it is of type t (luamp_self) or of one
 * of the NULL-terminated set (a method registered on several types),
 * else raises "bad argument #idx to 'name' (<tname> expected, got ...)".
 * A table type (metatable only) passes and gives NULL. */
void *luamp_self_of(lua_State *L, int idx,
                    const struct luamp_type *const *set);
void *luamp_self_slow(lua_State *L, int idx, const struct luamp_type *t);
static inline void *luamp_self(lua_State *L, int idx,
                               const struct luamp_type *t) {
  /* arena objects by tag, inline (their __index runs on every call) */
  if (t->is_obj) {
    uint64_t *tag = (uint64_t *)lua_touserdata(L, idx);
    if (tag != NULL && t->size != 0 && lua_rawlen(L, idx) == t->size &&
        *tag == t->tag)
      return tag;
  }
  return luamp_self_slow(L, idx, t);
}
/* Whether the value at idx is of type t (no error). */
int luamp_is(lua_State *L, int idx, const struct luamp_type *t);

/* ---- errors.c: the contract's error objects ------------------------- */

#define LUAMP_ERROR_MT "multiprocessing.Error"   /* their metatable */
/* Pushes a new error object {kind=, message=} (kind must be one of the
 * contract's kinds). */
void luamp_push_error(lua_State *L, const char *kind, const char *message);
/* Raises an error object; message is printf-style (lua_pushfstring rules:
 * %s %d %I %f %p %c %U %%). */
LUAMP_NORETURN int luamp_raise(lua_State *L, const char *kind,
                               const char *fmt, ...);
/* The same with field value = the value at vidx (BufferTooShort: the
 * message that did not fit). */
LUAMP_NORETURN int luamp_raise_value(lua_State *L, const char *kind, int vidx,
                                     const char *fmt, ...);
/* Raises kind with field errno = err and message "<what>: <strerror(err)>".
 * Kind "OSError" (or NULL) becomes the kind err names, as Python's
 * OSError(errno, ...) becomes FileNotFoundError for ENOENT: see
 * luamp_errno_kind, the one errno -> kind mapping. */
LUAMP_NORETURN int luamp_raise_errno(lua_State *L, const char *kind, int err,
                                     const char *what);
const char *luamp_errno_kind(int err);
/* Raises the same "interrupted!" error as lua.c's SIGINT hook. */
LUAMP_NORETURN int luamp_raise_interrupt(lua_State *L);
int luamp_open_errors(lua_State *L);

/* ---- sys.c: robust system calls, deadlines, interrupts -------------- */

/* Monotonic clock in seconds. */
double luamp_now(void);
/* Deadline for a timeout argument at index idx: nil -> infinite (returns
 * a negative number), negative -> now. */
double luamp_deadline_arg(lua_State *L, int idx);
double luamp_deadline(double timeout);   /* timeout < 0 means forever */
/* Milliseconds left until deadline for poll() (-1 forever, 0 passed),
 * capped at cap_ms when cap_ms >= 0. */
int luamp_remaining_ms(double deadline, int cap_ms);
/* Nonzero when SIGINT arrived for L: the lua.c-style interrupt hook is set
 * (luamp and stock lua5.4 both install it from their SIGINT handler). */
int luamp_interrupted(lua_State *L);

/* The system calls that can fail or block, called through this table
 * and nowhere else, so that C tests can inject failures into the code
 * that runs in production (sqlite's aSyscall[] idea).  Callers keep their
 * own EINTR loops (they also check for Ctrl-C there). */
struct iovec;
struct msghdr;
struct epoll_event;
struct timespec;
struct itimerspec;
struct stat;
struct luamp_syscalls {
  pid_t (*fork)(void);
  pid_t (*waitpid)(pid_t, int *, int);
  int (*pthread_sigmask)(int, const sigset_t *, sigset_t *);
  ssize_t (*read)(int, void *, size_t);
  ssize_t (*write)(int, const void *, size_t);
  ssize_t (*writev)(int, const struct iovec *, int);
  ssize_t (*readv)(int, const struct iovec *, int);
  ssize_t (*pread)(int, void *, size_t, off_t);
  ssize_t (*pwrite)(int, const void *, size_t, off_t);
  ssize_t (*recv)(int, void *, size_t, int);
  int (*poll)(struct pollfd *, nfds_t, int);
  int (*pipe2)(int *, int);
  int (*socketpair)(int, int, int, int *);
  int (*socket)(int, int, int);
  int (*accept4)(int, struct sockaddr *, socklen_t *, int);
  int (*connect)(int, const struct sockaddr *, socklen_t);
  int (*memfd_create)(const char *, unsigned int);
  int (*shm_open)(const char *, int, mode_t);
  int (*ftruncate)(int, off_t);
  void *(*mmap)(void *, size_t, int, int, int, off_t);
  int (*timerfd_create)(clockid_t, int);
  int (*epoll_create1)(int);
  int (*epoll_ctl)(int, int, int, struct epoll_event *);
  /* futex(2) without uaddr2 (arena.c's waits and wakes; the last
   * argument is val3, the bitset of FUTEX_{WAIT,WAKE}_BITSET) */
  long (*futex)(_Atomic uint32_t *, int, uint32_t, const struct timespec *,
                uint32_t);
  int (*open)(const char *, int, mode_t);
  int (*fstat)(int, struct stat *);
  int (*bind)(int, const struct sockaddr *, socklen_t);
  int (*listen)(int, int);
  int (*kill)(pid_t, int);
  int (*timerfd_settime)(int, int, const struct itimerspec *,
                         struct itimerspec *);
  int (*shm_unlink)(const char *);
  int (*getsockname)(int, struct sockaddr *, socklen_t *);
  /* (conn.c: fds passed with SCM_RIGHTS) */
  ssize_t (*sendmsg)(int, const struct msghdr *, int);
  ssize_t (*recvmsg)(int, struct msghdr *, int);
  /* close is never retried: on Linux the fd is gone even after EINTR */
  int (*close)(int);
  int (*munmap)(void *, size_t);
  int (*unlink)(const char *);
  int (*setsockopt)(int, int, int, const void *, socklen_t);
  int (*getsockopt)(int, int, int, void *, socklen_t *);
  int (*fcntl)(int, int, int);   /* the int-argument commands only */
  ssize_t (*getrandom)(void *, size_t, unsigned int);
  int (*nanosleep)(const struct timespec *, struct timespec *);
};
extern struct luamp_syscalls luamp_sys;
/* getpid(), cached (refreshed in every forked child by pthread_atfork). (sys.c; process.c installs the handler) */
pid_t luamp_pid(void);
void luamp_pid_refresh(void);
void luamp_flush_stdio(void);   /* fflush(NULL) around forks (sys.c) */

/* read with its EINTR loop. */
ssize_t luamp_robust_read(int fd, void *buf, size_t n);
/* poll until an event, the deadline, or (when L is given) an interrupt;
 * returns poll's count, 0 on timeout, -2 when interrupted, -1 on error. */
int luamp_robust_poll(lua_State *L, struct pollfd *fds, nfds_t n,
                      double deadline);
int luamp_open_sys(lua_State *L);

/* ---- codec.c: MessagePack with luamp's extensions ------------------- */

/* Encodes the value at idx.  Returns a pointer to `reserve` bytes of
 * headroom (for the caller's framing) followed by *len bytes of message.
 * The memory belongs to L and stays valid until the next luamp_encode on
 * L (for a one-scalar message, or luamp_encode_values of up to 16
 * scalars, a static buffer: until the next encode in
 * this process); do not run Lua code that may encode in between.  Raises EncodeError
 * naming where in the value the problem is; root names the value in that
 * message ("args", "result"; NULL gives "value"). */
char *luamp_encode(lua_State *L, int idx, size_t reserve, size_t *len,
                   const char *root);
/* The same for the count values from idx on, encoded as one array (as if
 * they were a table's items 1..count, with no table made). */
char *luamp_encode_values(lua_State *L, int idx, int count, size_t reserve,
                          size_t *len, const char *root);
/* The same, with value number slice->at (1-based) of the count, a table,
 * sent as the array of its items first..last (raw gets, holes as nil):
 * a chunk of a sequence with no table made for it (the Pool's maps). */
struct luamp_slice { int at; lua_Integer first, last; };
char *luamp_encode_slice(lua_State *L, int idx, int count,
                         const struct luamp_slice *slice, size_t reserve,
                         size_t *len, const char *root);

/* The fast path of one small scalar (a queue's put and get of an
 * integer or a short ASCII string): luamp_encode's bytes for it at out
 * (LUAMP_SMALL_MAX bytes), returning how many, 0 for other values; and
 * luamp_decode of such bytes, returning 0 (nothing pushed) for others. */
#define LUAMP_SMALL_MAX 32
size_t luamp_encode_small(lua_State *L, int idx, unsigned char *out);
int luamp_decode_small(lua_State *L, const char *p, size_t n);
/* Decodes exactly n bytes and pushes the one value they hold; raises
 * DecodeError with the byte offset of the problem. */
#define LUAMP_DECODE_UNTRUSTED 1  /* refuse code: functions, names, handles */
/* With UNTRUSTED: a keyless manager's peer.  trusted_only classes (proxies)
 * are still made, their rebuild told the data is untrusted. */
#define LUAMP_DECODE_PEER 2
void luamp_decode(lua_State *L, const char *p, size_t n, int flags);
/* The same for a message that is an array of at most 65535 items: pushes
 * the items themselves (no table) and returns how many; any other message
 * is pushed as its one value (returns 1). */
int luamp_decode_items(lua_State *L, const char *p, size_t n, int flags);
/* The same, with item number into (1-based; 0: none), when it is an
 * array, decoded into the table at tidx at keys at+1, at+2, ... (raw
 * sets) and that table pushed in its place: a reply's results put where
 * they belong with no table made for them (the Pool's chunks). */
int luamp_decode_items_into(lua_State *L, const char *p, size_t n, int flags,
                            int into, int tidx, lua_Integer at);

/* The runtime's own objects (queues, locks, shared values...) travel as
 * handles: each userdata type registers how to describe itself in bytes
 * and how to rebuild from them in the receiving process. */
struct luamp_handle_ops {
  const char *tname;  /* the userdata's metatable name (luaL_newmetatable) */
  /* Pushes a string that describes the userdata at idx (whose metatable is
   * tname).  May raise EncodeError (e.g. a closed object). */
  void (*encode)(lua_State *L, int idx);
  /* Pushes the object described by p/n, or raises DecodeError (e.g. the
   * object is unknown in this process). */
  void (*decode)(lua_State *L, const char *p, size_t n);
};
/* ops must have static storage; registering a tname twice replaces it. */
void luamp_register_handle(lua_State *L, const struct luamp_handle_ops *ops);
int luamp_open_codec(lua_State *L);

/* ---- arena.c: shared mappings, robust mutexes, futex waits ----------- */

/* The first bytes of every arena (one memfd mapped MAP_SHARED); objects
 * start at LUAMP_ARENA_HDR.  Written once by the creator, then read-only. */
struct luamp_arena_hdr {
  uint64_t magic;
  uint64_t uid;        /* random: checked after opening /proc/<pid>/fd/<n> */
  uint64_t size;       /* bytes mapped (the memfd's size) */
  int32_t creator;     /* pid of the creating process */
  int32_t creator_fd;  /* its memfd number there */
  uint32_t kind;       /* LUAMP_KIND_* */
  uint32_t pad;
};
#define LUAMP_ARENA_HDR 64

enum {
  LUAMP_KIND_LOCK = 1, LUAMP_KIND_SEMAPHORE, LUAMP_KIND_EVENT,
  LUAMP_KIND_CONDITION, LUAMP_KIND_BARRIER, LUAMP_KIND_VALUE,
  LUAMP_KIND_QUEUE
};

/* This process's record of one mapped arena (registry in arena.c). */
struct luamp_arena {
  struct luamp_arena *next;  /* registry chain */
  uint64_t uid;
  char *base;
  size_t size;
  int fd;                    /* the memfd, open while mapped */
  unsigned refs;             /* Lua objects of this process using it */
};

/* Makes an arena of size bytes (at least the header), memfd named name;
 * raises OSError. */
struct luamp_arena *luamp_arena_new(lua_State *L, const char *name,
                                    size_t size, uint32_t kind);
void luamp_arena_ref(struct luamp_arena *a);
void luamp_arena_unref(struct luamp_arena *a);   /* last one unmaps */
/* Parses such bytes at *p (advancing *p, *n), returns the arena with a
 * reference taken, mapping it when this process does not have it yet;
 * raises DecodeError when it cannot be reached or its kind is not in the
 * mask kinds (LUAMP_KINDS(k) | ...). */
struct luamp_arena *luamp_arena_attach(lua_State *L, const char **p,
                                       size_t *n, uint32_t kinds,
                                       size_t *offset);
#define LUAMP_KINDS(k) (1u << (k))

/* A Lua object living in an arena: every shared primitive's userdata. */
struct luamp_obj {
  uint64_t tag;               /* luamp_obj_tag(its type name) */
  struct luamp_arena *arena;  /* NULL once closed */
  char *p;                    /* the object: arena->base + offset */
  int flags;                  /* per type */
  char *buf;                  /* per-process scratch (queue get), malloc */
  size_t bufcap;
};
/* Pushes a new closed object with metatable tname and nuv user values. */
struct luamp_obj *luamp_obj_alloc(lua_State *L, const char *tname, int nuv);
/* Binds the (closed) object at idx to (a, offset), taking over the
 * caller's reference to a, and records it for luamp_obj_push_cached. */
void luamp_obj_bind(lua_State *L, int idx, struct luamp_arena *a,
                    size_t offset);
/* Pushes this state's object for (a, offset) of type tname if it has one. */
int luamp_obj_push_cached(lua_State *L, struct luamp_arena *a,
                          size_t offset, const char *tname);
/* Every object carries a tag, a per-process random secret mixed with a
 * hash of its type name: the fast type check of luamp_self (handle.c). */
uint64_t luamp_obj_tag(const char *tname);
/* self of an object's method (luamp_self_of), raising ValueError "<what>
 * is closed" on a closed one (what NULL: its type's name).  Inline: the
 * hot methods (a queue put, a lock acquire) pay a size and a tag compare;
 * everything else (the errors) is luamp_obj_self_slow. */
struct luamp_obj *luamp_obj_self_slow(lua_State *L, int idx,
                                      const struct luamp_type *const *set,
                                      const char *what);
static inline struct luamp_obj *luamp_obj_self(
    lua_State *L, int idx, const struct luamp_type *const *set,
    const char *what) {
  struct luamp_obj *o = (struct luamp_obj *)lua_touserdata(L, idx);
  if (o != NULL && lua_rawlen(L, idx) == sizeof *o && o->arena != NULL)
    for (int i = 0; set[i]; i++)
      if (o->tag == set[i]->tag) return o;
  return luamp_obj_self_slow(L, idx, set, what);
}
/* Closes o (checked by the caller): idempotent; every type's close(),
 * __close and __gc. */
void luamp_obj_close(lua_State *L, struct luamp_obj *o);
/* Handle bytes for the object at idx (EncodeError when closed). */
void luamp_obj_describe(lua_State *L, int idx, luaL_Buffer *b);
/* Pushes the object that handle bytes describe: this state's own when it
 * has it (returns 1), else a new one (returns 0). */
int luamp_obj_decode(lua_State *L, const char **p, size_t *n,
                     const char *tname, uint32_t kinds, int nuv);

/* Python's keyword arguments: when the only argument is a plain table
 * (no metatable), replaces it with its fields keys[0], keys[1]... (a
 * NULL-terminated list) as positional arguments; returns 1 if it did. */
int luamp_opts_args(lua_State *L, const char *const *keys);
int luamp_is_plain_table(lua_State *L, int idx);  /* a table, no metatable */

/* The calling thread as 64 bits: tid | low 32 bits of its start time
 * << 32, so a recycled tid is never taken for a dead holder. */
uint64_t luamp_self_id(void);
/* 0 when that thread has exited (or is a zombie), else 1. */
int luamp_id_alive(uint64_t id);
/* The calling process's identity in luamp_self_id's form (pid, start). */
uint64_t luamp_process_id(void);

/* Process-shared robust mutex.  lock: on EOWNERDEAD calls repair(arg)
 * (which must be idempotent) and marks the mutex consistent; returns 0
 * or an errno. */
int luamp_mutex_init(pthread_mutex_t *m);
int luamp_mutex_lock(pthread_mutex_t *m, void (*repair)(void *), void *arg);
/* Whether the calling thread holds m: for LUAMP_ASSERT only. */
int luamp_mutex_held(pthread_mutex_t *m);
void luamp_mutex_unlock(pthread_mutex_t *m);
/* The same for a caller that waits with a deadline (luamp_deadline's
 * convention, < 0: none) and notices Ctrl-C in L (NULL: never): 0 when
 * held, ETIMEDOUT past the deadline, EINTR on Ctrl-C, or an errno. */
int luamp_mutex_lock_until(lua_State *L, pthread_mutex_t *m,
                           void (*repair)(void *), void *arg,
                           double deadline);

/* One step of a blocking wait: sleeps while *w == val, at most slice_ms
 * and not past deadline (luamp_deadline's convention).  The caller
 * re-checks its condition after LUAMP_WAIT_AGAIN; LUAMP_WAIT_SLICE says a
 * whole slice passed without a wake-up (time to check that the process it
 * waits for is alive). */
enum {
  LUAMP_WAIT_AGAIN, LUAMP_WAIT_SLICE, LUAMP_WAIT_TIMEOUT,
  LUAMP_WAIT_INTERRUPTED
};
int luamp_wait_step(lua_State *L, _Atomic uint32_t *w, uint32_t val,
                    double deadline, int slice_ms);
void luamp_futex_wake(_Atomic uint32_t *w, int n);
/* The same with a futex bitset: a wait that only wakes with bits given
 * (LUAMP_ANY_BITS: any wake), a wake of at most n sleepers whose bits
 * meet bits, returning how many it woke. */
#define LUAMP_ANY_BITS 0xffffffffu
int luamp_wait_step_bits(lua_State *L, _Atomic uint32_t *w, uint32_t val,
                         double deadline, int slice_ms, uint32_t bits);
int luamp_futex_wake_bits(_Atomic uint32_t *w, int n, uint32_t bits);
int luamp_open_arena(lua_State *L);

/* A pause in a spin loop. */
static inline void luamp_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* ---- sync.c: locks and friends ----------------------------------------- */

/* Lock and RLock in shared memory (also the lock inside a Value).
 * Ownership is by thread id: owner holds the holder's luamp_self_id(), 0
 * when free; its low half (the holder's tid) is the futex waiters sleep
 * on.  A waiter that finds the holder dead takes the lock over. */
struct luamp_lock {
  _Atomic uint64_t owner;
  _Atomic uint32_t waiters;  /* sleepers; approximate (a killed sleeper
                                leaves it high, costing only wake-ups) */
  uint32_t count;            /* RLock depth; written by the holder only */
  uint32_t recursive;        /* const after init */
  uint32_t pad;
};
void luamp_lock_init(struct luamp_lock *l, int recursive);
/* Pushes a new Lock/RLock object for the lock at (a, offset), taking a
 * reference to a (or this state's existing object for it). */
void luamp_lock_push(lua_State *L, struct luamp_arena *a, size_t offset);
/* The lock of the Lock or RLock object at idx, or NULL if it is not one. */
struct luamp_lock *luamp_lock_test(lua_State *L, int idx);
int luamp_lock_acquire(lua_State *L, struct luamp_lock *l, int block,
                       double deadline);
void luamp_lock_release(lua_State *L, struct luamp_lock *l);
/* Handles of objects that may carry a lock as user value 1 (Condition,
 * Value, Array): the object's bytes, then the lock's when it has one.
 * decode pushes the object and returns as luamp_obj_decode. */
void luamp_lockable_encode(lua_State *L, int idx);
int luamp_lockable_decode(lua_State *L, const char *p, size_t n,
                          const char *tname, uint32_t kinds, int nuv);
/* with() and guard() for method tables that have _enter and _exit. */
extern const luaL_Reg luamp_scoped_methods[];
int luamp_open_sync(lua_State *L);

/* ---- fence.c: manager writes applied before a sync point ------------- */

/* Nonzero while this process has manager writes not yet known to be
 * applied (set by manager_client.lua).  Every sync point (lock release or wait,
 * event set, barrier wait, queue put, pipe send, spawn, child exit)
 * starts with LUAMP_FENCE(L), or returns LUAMP_FENCE_RELEASE(L, itself)
 * when it releases something, so that a failed flush never leaves a lock
 * held: the release runs, then the flush's error is raised. */
extern int luamp_pending_writes;
void luamp_flush_writes(lua_State *L);       /* raises the flush's error */
int luamp_flush_writes_p(lua_State *L);      /* 1: failed, error pushed */
int luamp_flush_then_release(lua_State *L, lua_CFunction release);
#define LUAMP_FENCE(L) \
  do { if (luamp_pending_writes) luamp_flush_writes(L); } while (0)
#define LUAMP_FENCE_RELEASE(L, fn) \
  do { \
    if (luamp_pending_writes) return luamp_flush_then_release(L, fn); \
  } while (0)
int luamp_open_fence(lua_State *L);

/* ---- queue.c: Queue, SimpleQueue, JoinableQueue ------------------------ */

/* For mp.wait: is idx a queue (of any kind); would a get not block now. */
int luamp_queue_test(lua_State *L, int idx);
int luamp_queue_ready(lua_State *L, int idx);
/* After luamp_queue_watch(L, idx, 1), the next put on the queue (from
 * any process) makes luamp_wakeup_fd() readable, once: a waiter registers
 * again each time before it sleeps (queue:_wait_fd does all this for
 * mp.wait).  The wake-up fd is this process's own non-blocking pipe (made
 * on first use, remade after fork); drain it with luamp_wakeup_drain()
 * before re-checking readiness. */
void luamp_queue_watch(lua_State *L, int idx, int on);
int luamp_wakeup_fd(lua_State *L);
void luamp_wakeup_drain(void);
/* Whether a waiter should poll a while before it sleeps: no CPU is
 * taken from this process by others (see cpus_free in queue.c). */
int luamp_cpus_free(void);
int luamp_open_queue(lua_State *L);

/* ---- value.c, shm.c ---------------------------------------------------- */
int luamp_open_value(lua_State *L);
int luamp_open_shm(lua_State *L);
/* Ends this process's ownership of tracked SharedMemory blocks,
 * unlinking those it was the last owner of (at exit; luamp_child_exit
 * calls it, since children leave by _exit). */
void luamp_shm_cleanup(void);
/* Unlinks the tracked blocks whose owners all died, looking at owners
 * with that pid only (after reaping a child killed by a signal; the
 * tracker process looks at all, a moment later); 0: at all. */
void luamp_shm_sweep(pid_t pid);
/* The writable bytes of an Array / a SharedMemory at idx (a receive
 * buffer: conn:recv_bytes_into); NULL when idx is not one; ValueError
 * when it is closed. */
char *luamp_array_bytes(lua_State *L, int idx, size_t *n);
char *luamp_shm_bytes(lua_State *L, int idx, size_t *n);
/* ---- process.c: fork discipline, children ------------------------- */

/* Every fork the runtime makes: runs the before-fork hooks (Lua hooks of
 * L when L is given, and luamp_atfork's), flushes stdio, forks with
 * signals blocked; in the child forgets the parent's children, unblocks
 * every signal and runs the child hooks; in the parent the parent hooks.
 * Returns fork's result (-1 with errno set on failure).  Hook errors are
 * reported on stderr and ignored.  A child made here must leave with
 * luamp_child_exit (or core._exit), never by returning into the parent's
 * Lua code. */
pid_t luamp_fork(lua_State *L);
/* Joins this process's own children as at exit (terminating daemons),
 * flushes stdio and _exits. */
LUAMP_NORETURN void luamp_child_exit(int code);
int luamp_open_process(lua_State *L);
/* A forked child's body: fn(arg) (stack indexes) under a traceback
 * handler, its result the exit code; leaves through luamp_child_exit. */
LUAMP_NORETURN void luamp_child_main(lua_State *L, int fn, int arg);
/* Pushes a Child handle for pid, forked by the fork server; status_fd is
 * the pipe the server writes its wait status to (forkserver.c). */
void luamp_remote_child(lua_State *L, pid_t pid, int status_fd, int daemon);

/* ---- forkserver.c: the fork server ----------------------------------- */
int luamp_open_forkserver(lua_State *L);

/* ---- conn.c: Pipe, Connection, Listener/Client, wait --------------- */

int luamp_open_conn(lua_State *L);

/* ---- fdkeep.c: the tree's fd keeper (fds through Queues) ------------ */

#define LUAMP_FDKEEP_TICKET 16
#define LUAMP_FDKEEP_NAME 64      /* the longest keeper name */
/* Names this process image's keeper (once; forked children inherit it):
 * called when the module opens, so a program's processes share one. */
void luamp_fdkeep_init(void);
/* Parks a duplicate of fd with the keeper (started on first need): fills
 * ticket (LUAMP_FDKEEP_TICKET bytes) and the keeper's name. */
void luamp_fdkeep_park(lua_State *L, int fd, unsigned char *ticket,
                       const char **name, size_t *n);
/* The fd parked under ticket with the keeper named name (once);
 * DecodeError when it is not held (claimed before, keeper gone). */
int luamp_fdkeep_claim(lua_State *L, const char *name, size_t n,
                       const unsigned char *ticket);

/* ---- store.c: append-only bytes shared with forked children ---------- */
int luamp_open_store(lua_State *L);
/* ---- evset.c: epoll set + timerfd behind one fd (Pool:fileno) ---- */
int luamp_open_evset(lua_State *L);
/* ---- redis.c: a hiredis connection (the broker's transport) ---- */
int luamp_open_redis(lua_State *L);

/* ---- module.c -------------------------------------------------------- */

/* One Lua file of lua/ compiled into the library (generated by
 * scripts/embed.lua into build/luafiles.c). */
struct luamp_luafile {
  const char *module;     /* "multiprocessing.pool" */
  const char *chunkname;  /* "@multiprocessing/pool.lua" */
  const char *source;
  size_t size;
};
extern const struct luamp_luafile luamp_luafiles[];

#endif
