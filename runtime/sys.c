/*
 * sys.c -- robust system calls, deadlines and interrupts.
 *
 * The runtime's blocking calls (read, writev, poll, waitpid, accept4,
 * connect, futex, ...), the calls that make its resources (fork, pipe2,
 * sockets, memfd_create, shm_open, ftruncate, mmap, epoll and timerfd
 * fds, pthread_sigmask around fork) and the others whose failure reaches
 * Lua as an error (bind, listen, getsockname, kill, fstat, open, shm_unlink,
 * timerfd_settime, close, munmap, unlink, setsockopt, getsockopt, fcntl,
 * getrandom, nanosleep) go through the luamp_sys table below, so that C
 * tests (spec/c/test_faults.c) inject failures into the code that runs in
 * production.  The few called directly say why where they are (signal
 * dispositions, the forked child's set-up before exec-free work, advisory
 * madvise, the terminal's width).  Call sites keep their
 * EINTR loops, as most must also notice a Ctrl-C there; poll's loop is
 * luamp_robust_poll.
 * Timeouts are deadlines: computed once from the caller's timeout, the
 * time left recomputed after every wake-up.  A wait that sees EINTR asks
 * luamp_interrupted() whether the signal was SIGINT for this Lua state;
 * if so it returns so that the caller can release what it holds and raise
 * "interrupted!".
 */
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#ifdef __GLIBC__
#include <sys/single_threaded.h>
#endif
#include <fcntl.h>
#ifdef __GLIBC__
#endif
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* (accept4 and connect take glibc's transparent sockaddr unions: called
 * through these so that the table's types are the plain ones) */
static int sys_accept4(int fd, struct sockaddr *a, socklen_t *n, int fl) {
  return accept4(fd, a, n, fl);
}
static int sys_connect(int fd, const struct sockaddr *a, socklen_t n) {
  return connect(fd, a, n);
}

static int sys_bind(int fd, const struct sockaddr *a, socklen_t n) {
  return bind(fd, a, n);
}
static int sys_getsockname(int fd, struct sockaddr *a, socklen_t *n) {
  return getsockname(fd, a, n);
}
/* (open takes its mode as a variadic argument) */
static int sys_open(const char *path, int flags, mode_t mode) {
  return open(path, flags, mode);
}
static int sys_fcntl(int fd, int cmd, int arg) {
  return fcntl(fd, cmd, arg);
}

static long sys_futex(_Atomic uint32_t *uaddr, int op, uint32_t val,
                      const struct timespec *ts, uint32_t bits) {
  return syscall(SYS_futex, uaddr, op, val, ts, NULL, bits);
}

/* This process's pid, kept up to date in children by a pthread_atfork
 * handler process.c installs (so forks made by others count too):
 * getpid() is a system call, and ownership is checked often.  (-1, not
 * 0, until known: an initialized variable sits in .data, on the page of
 * process.c's fork state that every child writes anyway, not on a page
 * of .bss of its own that a child would copy only for this.) */
static pid_t my_pid = -1;
LUAMP_CHILD_PATH void luamp_pid_refresh(void) { my_pid = getpid(); }
LUAMP_CHILD_PATH pid_t luamp_pid(void) {
  return my_pid > 0 ? my_pid : getpid();
}

/* What a fork and a child's exit flush: every stream (fflush(NULL)).
 * fflush(NULL) takes the lock of glibc's list of streams and its cleanup
 * record in the thread's block: writes to two pages that every fork
 * shares copy-on-write, and two pages of libc's code a child reads at its
 * exit -- 2 faults in the parent after each fork and 3 in each child
 * (perf record -e page-faults -d on a start+join loop: 21.3 + 22.0 per
 * start before, 19.3 + 19.0 after).  So under glibc, in a process that
 * never started a thread (no other thread can change the list), the
 * list is walked first and fflush(NULL) called only when a stream holds
 * output.  The FILE fields are those of glibc's public struct_FILE.h;
 * the list's head, _IO_list_all, is an exported symbol of glibc's ABI
 * since 2.2.5 that no header declares.  A wide-oriented stream (_mode >
 * 0; its buffer is not in those fields) is taken as holding output. */
#ifdef __GLIBC__
extern FILE *_IO_list_all;
LUAMP_CHILD_PATH static int stdio_pending(void) {
  if (!__libc_single_threaded) return 1;
  for (const FILE *f = _IO_list_all; f; f = f->_chain)
    if (f->_mode > 0 || f->_IO_write_ptr > f->_IO_write_base) return 1;
  return 0;
}
#else
LUAMP_CHILD_PATH static int stdio_pending(void) { return 1; }
#endif
LUAMP_CHILD_PATH void luamp_flush_stdio(void) {
  if (stdio_pending()) fflush(NULL);
}

struct luamp_syscalls luamp_sys = {
  .fork = fork, .waitpid = waitpid, .pthread_sigmask = pthread_sigmask,
  .read = read, .write = write, .writev = writev, .readv = readv,
  .pread = pread, .pwrite = pwrite, .recv = recv, .poll = poll,
  .pipe2 = pipe2, .socketpair = socketpair, .socket = socket,
  .accept4 = sys_accept4, .connect = sys_connect,
  .memfd_create = memfd_create, .shm_open = shm_open,
  .ftruncate = ftruncate, .mmap = mmap,
  .timerfd_create = timerfd_create, .epoll_create1 = epoll_create1,
  .epoll_ctl = epoll_ctl, .futex = sys_futex,
  .open = sys_open, .fstat = fstat, .bind = sys_bind, .listen = listen,
  .kill = kill, .timerfd_settime = timerfd_settime,
  .shm_unlink = shm_unlink, .getsockname = sys_getsockname,
  .sendmsg = sendmsg, .recvmsg = recvmsg,
  .close = close, .munmap = munmap, .unlink = unlink,
  .setsockopt = setsockopt, .getsockopt = getsockopt, .fcntl = sys_fcntl,
  .getrandom = getrandom, .nanosleep = nanosleep
};

/* Longest single sleep while waiting with an interruptible state: a
 * SIGINT that lands between our check and the syscall is noticed at the
 * next slice at the latest. */
#define SLICE_MS 250

double luamp_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double luamp_deadline(double timeout) {
  if (timeout < 0 || isinf(timeout)) return -1.0;
  return luamp_now() + timeout;
}

double luamp_deadline_arg(lua_State *L, int idx) {
  double t;
  if (lua_isnoneornil(L, idx)) return -1.0;
  t = luaL_checknumber(L, idx);
  if (isnan(t)) luaL_argerror(L, idx, "timeout is NaN");
  if (t == HUGE_VAL) return -1.0;
  if (t < 0) t = 0;
  return luamp_now() + t;
}

int luamp_remaining_ms(double deadline, int cap_ms) {
  double left;
  int ms;
  if (deadline < 0) return cap_ms >= 0 ? cap_ms : -1;
  left = deadline - luamp_now();
  if (left <= 0) return 0;
  ms = left > 2e9 / 1000 ? 2000000000 : (int)ceil(left * 1000.0);
  if (cap_ms >= 0 && ms > cap_ms) ms = cap_ms;
  return ms;
}

int luamp_interrupted(lua_State *L) {
  /* lua.c (and luamp) answer SIGINT by setting a count hook with count 1
   * and every mask bit on the main thread; the hook raises at the next
   * instruction.  Seeing that hook is how C code blocked in a syscall
   * learns of the Ctrl-C, in the luamp host and in stock lua5.4 alike. */
  const int want = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
  lua_State *main;
  if (L == NULL) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main = lua_tothread(L, -1);
  lua_pop(L, 1);
  if (main == NULL) main = L;
  return lua_gethook(main) != NULL && lua_gethookmask(main) == want &&
         lua_gethookcount(main) == 1;
}

ssize_t luamp_robust_read(int fd, void *buf, size_t n) {
  ssize_t r;
  do r = luamp_sys.read(fd, buf, n); while (r < 0 && errno == EINTR);
  return r;
}

int luamp_robust_poll(lua_State *L, struct pollfd *fds, nfds_t n,
                      double deadline) {
  for (;;) {
    int ms, r;
    if (L && luamp_interrupted(L)) return -2;
    ms = luamp_remaining_ms(deadline, L ? SLICE_MS : -1);
    r = luamp_sys.poll(fds, n, ms);
    if (r > 0) return r;
    if (r < 0 && errno != EINTR) return -1;
    if (r == 0 && deadline >= 0 && luamp_remaining_ms(deadline, -1) == 0)
      return 0;
  }
}

/* ---- Lua face ------------------------------------------------------- */

static int l_cpu_count(lua_State *L) {
  cpu_set_t set;
  int n = 0;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

/* core._sched_batch(): this process runs under SCHED_BATCH from now on
 * (and so do the processes it starts: the kernel resets only real-time
 * policies on fork); returns whether the kernel agreed (advice: false
 * changes nothing).  A pool's workers (issue 18): a woken SCHED_OTHER
 * worker preempts the owner at once, so with a core busy elsewhere a
 * loop of apply_async ran as a ping-pong -- 0.09-0.25 time slices a
 * task, and 4.9-8.1 us of CPU a task (owner and workers, schedstat, 2e4
 * tasks); with the workers SCHED_BATCH (woken, they wait for the owner to
 * sleep or its slice to end) 0.002-0.003 slices and 3.3-4.3 us, and the
 * submit -> result round trip was not slower (a waiting owner sleeps:
 * its worker runs at once).  The CPU share is the same as SCHED_OTHER's. */
static int l_sched_batch(lua_State *L) {
  struct sched_param sp = {0};
  lua_pushboolean(L, sched_setscheduler(0, SCHED_BATCH, &sp) == 0);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, luamp_pid());
  return 1;
}

static int l_getppid(lua_State *L) {
  lua_pushinteger(L, getppid());
  return 1;
}

/* core.table_into(dst, first, src, n): dst[first..first+n-1] = src[1..n],
 * raw. */
static int l_table_into(lua_State *L) {
  lua_Integer first = luaL_checkinteger(L, 2), n = luaL_checkinteger(L, 4);
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  for (lua_Integer k = 1; k <= n; k++) {
    lua_rawgeti(L, 3, k);
    lua_rawseti(L, 1, first + k - 1);
  }
  return 0;
}

/* core.table_new(narray [, nhash]) -> an empty table with room */
static int l_table_new(lua_State *L) {
  lua_Integer na = luaL_checkinteger(L, 1), nh = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, na >= 0 && na <= INT32_MAX, 1, "size out of range");
  luaL_argcheck(L, nh >= 0 && nh <= INT32_MAX, 2, "size out of range");
  lua_createtable(L, (int)na, (int)nh);
  return 1;
}

/* core.isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
  return 1;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, luamp_now());
  return 1;
}

/* core.sleep(seconds): interruptible by Ctrl-C, not by other signals. */
static int l_sleep(lua_State *L) {
  double deadline;
  luaL_checknumber(L, 1);
  deadline = luamp_deadline_arg(L, 1);
  if (luamp_robust_poll(L, NULL, 0, deadline) == -2)
    luamp_raise_interrupt(L);
  return 0;
}

/* core.check_interrupt(): raises "interrupted!" when a Ctrl-C is pending
 * (the hook set on the main thread and not yet fired).  For a shielded
 * step about to hand something over: under stock lua5.4 the hook fires
 * at the shielded call's return and would drop it, so the step gives it
 * back instead when the Ctrl-C came before this check. */
static int l_check_interrupt(lua_State *L) {
  if (luamp_interrupted(L)) luamp_raise_interrupt(L);
  return 0;
}

/* core.shielded(f, ...) -> f's results.  Runs f where Ctrl-C cannot cut
 * it in two: lua.c and luamp answer SIGINT with a hook on the main thread
 * only, so f runs in a thread of its own (its hook cleared) to its end,
 * and "interrupted!" comes at the caller's next instruction.  For the few
 * steps that must not stop half-done (a result taken from a queue and
 * recorded); blocking waits inside still see the Ctrl-C (they check the
 * main thread).  Errors pass through; f may not yield. */
/* The thread of a shielded call that returned is kept for the next one
 * (its stack is empty again, which lua_resume takes as a new start): a
 * thread made per call, and collected, was ~2.2k of the ~43k
 * instructions of a futures round trip's owner (callgrind), which drains
 * its result queue through here.  A nested call finds none spare and
 * makes its own; one that raised is dropped. */
static char spare_key;

static int l_shielded(lua_State *L) {
  int n = lua_gettop(L), status, nres;
  lua_State *co;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  /* Already where Ctrl-C cannot land: a thread other than the main one,
   * with no hook (a shielded call's own, nested; or a coroutine's: the
   * interrupt hook is set on the main thread only).  f runs here, with
   * no thread to make (the spare one is the outer call's). */
  if (!lua_pushthread(L) && lua_gethook(L) == NULL) {
    lua_pop(L, 1);
    lua_call(L, n - 1, LUA_MULTRET);
    return lua_gettop(L);
  }
  lua_pop(L, 1);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &spare_key) == LUA_TTHREAD) {
    co = lua_tothread(L, -1);
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &spare_key);
  } else {
    lua_pop(L, 1);
    co = lua_newthread(L);
  }
  lua_sethook(co, NULL, 0, 0);
  lua_rotate(L, 1, 1);                 /* thread, f, args... */
  if (!lua_checkstack(co, n)) return luaL_error(L, "too many arguments");
  lua_xmove(L, co, n);
  status = lua_resume(co, L, n - 1, &nres);
  if (status == LUA_OK) {
    luaL_checkstack(L, nres + 1, "too many results");
    lua_xmove(co, L, nres);
    lua_pushvalue(L, 1);               /* the thread, spare again */
    lua_rawsetp(L, LUA_REGISTRYINDEX, &spare_key);
    return nres;
  }
  if (status == LUA_YIELD) {
    lua_resetthread(co);
    return luaL_error(L, "attempt to yield from a shielded call");
  }
  lua_xmove(co, L, 1);                 /* the error object */
  lua_resetthread(co);
  return lua_error(L);
}

int luamp_open_sys(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"cpu_count", l_cpu_count},
    {"getpid", l_getpid},
    {"_sched_batch", l_sched_batch},
    {"getppid", l_getppid},
    {"now", l_now},
    {"isatty", l_isatty},
    {"table_into", l_table_into},
    {"table_new", l_table_new},
    {"sleep", l_sleep},
    {"shielded", l_shielded},
    {"check_interrupt", l_check_interrupt},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
