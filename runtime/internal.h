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

#include <lua.h>
#include <lauxlib.h>

#include "luamp.h"

#if defined(__GNUC__)
#define LUAMP_NORETURN __attribute__((noreturn))
#define LUAMP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define LUAMP_NORETURN
#define LUAMP_PRINTF(a, b)
#endif

/* ---- errors.c: the contract's error objects ------------------------- */

/* Pushes a new error object {kind=, message=} (kind must be one of the
 * contract's kinds). */
void luamp_push_error(lua_State *L, const char *kind, const char *message);
/* Raises an error object; message is printf-style (lua_pushfstring rules:
 * %s %d %I %f %p %c %U %%). */
LUAMP_NORETURN int luamp_raise(lua_State *L, const char *kind,
                               const char *fmt, ...);
/* Raises kind (normally "OSError") with field errno = err and message
 * "<what>: <strerror(err)>". */
LUAMP_NORETURN int luamp_raise_errno(lua_State *L, const char *kind, int err,
                                     const char *what);
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

/* Syscalls that can fail, called through this table so C tests can inject
 * failures (sqlite's aSyscall[] idea). */
struct luamp_syscalls {
  pid_t (*fork)(void);
  ssize_t (*read)(int, void *, size_t);
  ssize_t (*write)(int, const void *, size_t);
  int (*poll)(struct pollfd *, nfds_t, int);
  void *(*mmap)(void *, size_t, int, int, int, off_t);
  int (*ftruncate)(int, off_t);
};
extern struct luamp_syscalls luamp_sys;

/* read/write/poll with their EINTR loops.  The *_full variants move all n
 * bytes or fail; they return 0 on success, -1 with errno set on failure,
 * and for read_full 1 on a clean EOF before the first byte. */
ssize_t luamp_robust_read(int fd, void *buf, size_t n);
ssize_t luamp_robust_write(int fd, const void *buf, size_t n);
int luamp_write_full(int fd, const void *buf, size_t n);
int luamp_read_full(int fd, void *buf, size_t n);
/* poll until an event, the deadline, or (when L is given) an interrupt;
 * returns poll's count, 0 on timeout, -2 when interrupted, -1 on error. */
int luamp_robust_poll(lua_State *L, struct pollfd *fds, nfds_t n,
                      double deadline);
int luamp_open_sys(lua_State *L);

/* ---- codec.c: MessagePack with luamp's extensions ------------------- */

/* Encodes the value at idx.  Returns a pointer to `reserve` bytes of
 * headroom (for the caller's framing) followed by *len bytes of message.
 * The memory belongs to L and stays valid until the next luamp_encode on
 * L; do not run Lua code that may encode in between.  Raises EncodeError
 * naming where in the value the problem is; root names the value in that
 * message ("args", "result"; NULL gives "value"). */
char *luamp_encode(lua_State *L, int idx, size_t reserve, size_t *len,
                   const char *root);

/* Decodes exactly n bytes and pushes the one value they hold; raises
 * DecodeError with the byte offset of the problem. */
#define LUAMP_DECODE_UNTRUSTED 1  /* refuse code: functions, names, handles */
void luamp_decode(lua_State *L, const char *p, size_t n, int flags);

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
/* getpid(), cached (refreshed in every forked child by pthread_atfork). */
pid_t luamp_pid(void);

/* ---- conn.c: Pipe, Connection, Listener/Client, wait --------------- */

int luamp_open_conn(lua_State *L);

/* ---- store.c: append-only bytes shared with forked children ---------- */
int luamp_open_store(lua_State *L);

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
