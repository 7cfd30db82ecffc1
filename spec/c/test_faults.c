/* Fault injection through the syscall table (sys.c's luamp_sys): a system
 * call fails in conn.c, store.c, process.c, shm.c, queue.c, arena.c,
 * evset.c or forkserver.c, and the Lua caller sees the contract's error
 * (kind OSError, the errno), with no fd or shared-memory name left
 * behind and the handle still usable or closed cleanly; a futex wait cut
 * by a signal sees the Ctrl-C or times out.  Each test runs in its own process (tap.h), so a
 * replaced entry never leaks into the next test. */
#include <dirent.h>
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/uio.h>

#include <lauxlib.h>
#include <lualib.h>

#include "internal.h"
#include "tap.h"

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  CHECK(L != NULL);
  luaL_openlibs(L);
  luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 1);
  lua_pop(L, 1);
  return L;
}

static int run(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != LUA_OK) {
    printf("# lua error: %s\n", lua_tostring(L, -1));
    return 0;
  }
  return 1;
}

/* Open descriptors of this process (a leak shows as a higher count). */
static int count_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  int n = 0;
  CHECK(d != NULL);
  while (readdir(d) != NULL) n++;
  closedir(d);
  return n;
}

/* Asserts in Lua that calling `call` raises kind OSError with errno err;
 * `setup` runs first (its locals are visible to `call`). */
#define EXPECT_OSERROR(setup, call, err) \
  setup "\nlocal ok, e = pcall(function() " call " end)\n" \
  "assert(not ok, 'no error')\n" \
  "assert(type(e) == 'table', 'not an error object: ' .. tostring(e))\n" \
  "assert(e.kind == 'OSError', 'kind ' .. tostring(e.kind))\n" \
  "assert(e.errno == " #err ", 'errno ' .. tostring(e.errno))\n"

static int fail_errno = EIO;

static ssize_t fail_writev(int fd, const struct iovec *v, int n) {
  (void)fd; (void)v; (void)n;
  errno = fail_errno;
  return -1;
}
static ssize_t fail_read(int fd, void *b, size_t n) {
  (void)fd; (void)b; (void)n;
  errno = fail_errno;
  return -1;
}
static ssize_t fail_recvmsg(int fd, struct msghdr *m, int f) {
  (void)fd; (void)m; (void)f;
  errno = fail_errno;
  return -1;
}
static ssize_t fail_sendmsg(int fd, const struct msghdr *m, int f) {
  (void)fd; (void)m; (void)f;
  errno = fail_errno;
  return -1;
}
static int fail_pair(int d, int t, int p, int *fds) {
  (void)d; (void)t; (void)p; (void)fds;
  errno = fail_errno;
  return -1;
}
static int fail_pipe2(int *fds, int fl) {
  (void)fds; (void)fl;
  errno = fail_errno;
  return -1;
}
static int fail_socket(int d, int t, int p) {
  (void)d; (void)t; (void)p;
  errno = fail_errno;
  return -1;
}
static int fail_accept4(int fd, struct sockaddr *a, socklen_t *n, int fl) {
  (void)fd; (void)a; (void)n; (void)fl;
  errno = fail_errno;
  return -1;
}
static int fail_connect(int fd, const struct sockaddr *a, socklen_t n) {
  (void)fd; (void)a; (void)n;
  errno = fail_errno;
  return -1;
}

static int fail_getsockname(int fd, struct sockaddr *a, socklen_t *n) {
  (void)fd; (void)a; (void)n;
  errno = fail_errno;
  return -1;
}

/* ---- conn.c ---------------------------------------------------------- */

static void test_conn_send_and_recv_fail(void) {
  lua_State *L = new_state();
  int before;
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "a, b = mp.Pipe()"));
  before = count_fds();
  luamp_sys.writev = fail_writev;
  CHECK(run(L, EXPECT_OSERROR("", "a:send('hello')", 5)));
  luamp_sys.read = fail_read;
  /* (a socketpair Pipe would receive with recvmsg: fds may come along) */
  luamp_sys.recvmsg = fail_recvmsg;
  CHECK(run(L, EXPECT_OSERROR("", "b:recv()", 5)));
  CHECK(count_fds() == before);
  CHECK(run(L, "a:close() b:close()"));
  lua_close(L);
}

/* A message with a Connection in it goes out with sendmsg (SCM_RIGHTS)
 * over a socket: its failure is an OSError, nothing written, nothing left
 * open.  (x: a duplex Pipe's end, two fds.) */
static void test_conn_send_fds_fails(void) {
  lua_State *L = new_state();
  int before;
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "a, b = require('multiprocessing.core').Pipe(true, 'socket')\n"
               "x, y = mp.Pipe()"));
  before = count_fds();
  luamp_sys.sendmsg = fail_sendmsg;
  CHECK(run(L, EXPECT_OSERROR("", "a:send({x})", 5)));
  CHECK(run(L, "a:send('in step') assert(b:recv() == 'in step')"));
  CHECK(count_fds() == before);
  CHECK(run(L, "a:close() b:close() x:close() y:close()"));
  lua_close(L);
}

/* the second pipe2 of a duplex Pipe fails: the first pipe's fds close */
static int pipe2_calls;
static int fail_second_pipe2(int *fds, int fl) {
  if (pipe2_calls++ == 1) return fail_pipe2(fds, fl);
  return pipe2(fds, fl);
}

static void test_conn_pipe_creation_fails(void) {
  lua_State *L = new_state();
  int before = count_fds();
  fail_errno = EMFILE;
  luamp_sys.socketpair = fail_pair;
  luamp_sys.pipe2 = fail_pipe2;
  CHECK(run(L, EXPECT_OSERROR("local mp = require 'multiprocessing'",
                              "mp.Pipe()", 24)));
  CHECK(run(L, EXPECT_OSERROR("local mp = require 'multiprocessing'",
                              "mp.Pipe(false)", 24)));
  CHECK(run(L, EXPECT_OSERROR("local core = require 'multiprocessing.core'",
                              "core.Pipe(true, 'socket')", 24)));
  luamp_sys.pipe2 = fail_second_pipe2;
  pipe2_calls = 0;
  CHECK(run(L, EXPECT_OSERROR("local mp = require 'multiprocessing'",
                              "mp.Pipe()", 24)));
  CHECK(pipe2_calls == 2);
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  lua_close(L);
}

static void test_listener_accept_and_connect_fail(void) {
  lua_State *L = new_state();
  int before;
  CHECK(run(L, "core = require 'multiprocessing.core'\n"
               "l = core.listen({'127.0.0.1', 0})\n"
               "addr = l:address()"));
  before = count_fds();
  luamp_sys.connect = fail_connect;
  CHECK(run(L, EXPECT_OSERROR("", "core.connect(addr, 1)", 5)));
  luamp_sys.getsockname = fail_getsockname;
  CHECK(run(L, EXPECT_OSERROR("", "l:address()", 5)));
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  lua_close(L);
}

static void test_socket_and_accept_fail(void) {
  lua_State *L = new_state();
  int before, sock;
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  CHECK(run(L, "core = require 'multiprocessing.core'\n"
               "l = core.listen({'127.0.0.1', 0})\n"
               "addr = l:address()"));
  /* a real client, so that the listener is readable */
  CHECK(run(L, "FD = l:fileno()"));
  lua_getglobal(L, "FD");
  CHECK(getsockname((int)lua_tointeger(L, -1), (struct sockaddr *)&ss,
                    &len) == 0);
  lua_pop(L, 1);
  sock = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(sock >= 0 && connect(sock, (struct sockaddr *)&ss, len) == 0);
  before = count_fds();
  fail_errno = EMFILE;
  luamp_sys.accept4 = fail_accept4;
  CHECK(run(L, EXPECT_OSERROR("", "l:accept(1)", 24)));
  luamp_sys.socket = fail_socket;
  CHECK(run(L, EXPECT_OSERROR("", "core.connect(addr, 1)", 24)));
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  close(sock);
  lua_close(L);
}

static int fail_bind(int fd, const struct sockaddr *a, socklen_t n) {
  (void)fd; (void)a; (void)n;
  errno = fail_errno;
  return -1;
}
static int fail_listen(int fd, int backlog) {
  (void)fd; (void)backlog;
  errno = fail_errno;
  return -1;
}

static void test_bind_and_listen_fail(void) {
  lua_State *L = new_state();
  int before = count_fds();
  CHECK(run(L, "core = require 'multiprocessing.core'"));
  luamp_sys.bind = fail_bind;
  CHECK(run(L, EXPECT_OSERROR("", "core.listen({'127.0.0.1', 0})", 5)));
  luamp_sys.bind = bind;
  luamp_sys.listen = fail_listen;
  CHECK(run(L, EXPECT_OSERROR("", "core.listen({'127.0.0.1', 0})", 5)));
  luamp_sys.listen = listen;
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  lua_close(L);
}

/* ---- store.c --------------------------------------------------------- */

static int fail_memfd(const char *name, unsigned int fl) {
  (void)name; (void)fl;
  errno = fail_errno;
  return -1;
}
static ssize_t fail_pwrite(int fd, const void *b, size_t n, off_t off) {
  (void)fd; (void)b; (void)n; (void)off;
  errno = fail_errno;
  return -1;
}
static ssize_t fail_pread(int fd, void *b, size_t n, off_t off) {
  (void)fd; (void)b; (void)n; (void)off;
  errno = fail_errno;
  return -1;
}

static void test_store_faults(void) {
  lua_State *L = new_state();
  int before = count_fds();
  fail_errno = EMFILE;
  luamp_sys.memfd_create = fail_memfd;
  CHECK(run(L, EXPECT_OSERROR("core = require 'multiprocessing.core'",
                              "core.Store()", 24)));
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  luamp_sys.memfd_create = memfd_create;
  CHECK(run(L, "s = core.Store()\n"
               "assert(s:put('abc') == 0)"));
  fail_errno = ENOSPC;
  luamp_sys.pwrite = fail_pwrite;
  CHECK(run(L, EXPECT_OSERROR("", "s:put('defg')", 28)));
  fail_errno = EIO;
  luamp_sys.pread = fail_pread;
  CHECK(run(L, EXPECT_OSERROR("", "s:get(0, 3)", 5)));
  luamp_sys.pread = pread;
  /* the failed put appended nothing: the next one goes at 3 */
  luamp_sys.pwrite = pwrite;
  CHECK(run(L, "assert(s:put('xy') == 3)\n"
               "assert(s:get(0, 5) == 'abcxy')\n"
               "s:close()"));
  CHECK(count_fds() == before);
  lua_close(L);
}

/* ---- process.c ------------------------------------------------------- */

static pid_t fail_waitpid(pid_t pid, int *st, int fl) {
  (void)pid; (void)st; (void)fl;
  errno = fail_errno;
  return -1;
}
static int fail_sigmask(int how, const sigset_t *set, sigset_t *old) {
  (void)how; (void)set; (void)old;
  return EINVAL;   /* pthread_sigmask returns the error number */
}

/* The sentinel pipe (no pidfd) and the signal mask cannot be set up: the
 * start raises OSError, nothing is forked and no fd is left. */
static void test_spawn_faults(void) {
  lua_State *L;
  int before;
  setenv("LUAMP_NO_PIDFD", "1", 1);
  L = new_state();
  /* (a first start opens /dev/null for the children's stdin, once) */
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "p = mp.Process{target = function() end}\n"
               "p:start() p:join() p:close() collectgarbage()"));
  before = count_fds();
  fail_errno = EMFILE;
  luamp_sys.pipe2 = fail_pipe2;
  CHECK(run(L, EXPECT_OSERROR("p = mp.Process{target = function() end}",
                              "p:start()", 24)
               "assert(p.pid == nil and #mp.active_children() == 0)"));
  CHECK(count_fds() == before);
  luamp_sys.pipe2 = pipe2;
  luamp_sys.pthread_sigmask = fail_sigmask;
  CHECK(run(L, EXPECT_OSERROR("p = mp.Process{target = function() end}",
                              "p:start()", 22)
               "assert(p.pid == nil and #mp.active_children() == 0)"));
  CHECK(count_fds() == before);
  luamp_sys.pthread_sigmask = pthread_sigmask;
  CHECK(run(L, "p = mp.Process{target = function() os.exit(4) end}\n"
               "p:start() p:join() assert(p.exitcode == 4)"));
  lua_close(L);
}

static int fail_kill(pid_t pid, int sig) {
  (void)pid; (void)sig;
  errno = fail_errno;
  return -1;
}

static void test_kill_fault(void) {
  lua_State *L = new_state();
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "core = require 'multiprocessing.core'\n"
               "p = mp.Process{target = function() core.sleep(30) end}\n"
               "p:start()"));
  fail_errno = EINVAL;
  luamp_sys.kill = fail_kill;
  CHECK(run(L, EXPECT_OSERROR("", "p:terminate()", 22)));
  CHECK(run(L, EXPECT_OSERROR("", "core.kill(p.pid, 'SIGTERM')", 22)
               "assert(p:is_alive())"));
  luamp_sys.kill = kill;
  CHECK(run(L, "p:terminate() p:join() assert(p.exitcode == -15)"));
  lua_close(L);
}

static void test_waitpid_fault(void) {
  lua_State *L = new_state();
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "core = require 'multiprocessing.core'\n"
               "p = mp.Process{target = function() os.exit(3) end}\n"
               "p:start()"));
  fail_errno = EINVAL;
  luamp_sys.waitpid = fail_waitpid;
  CHECK(run(L, EXPECT_OSERROR("", "core.waitpid(p.pid)", 22)));
  luamp_sys.waitpid = waitpid;
  CHECK(run(L, "p:join() assert(p.exitcode == 3, tostring(p.exitcode))"));
  lua_close(L);
}

/* ---- shm.c ----------------------------------------------------------- */

static int fail_shm_open(const char *name, int fl, mode_t mode) {
  (void)name; (void)fl; (void)mode;
  errno = fail_errno;
  return -1;
}
static int fail_ftruncate(int fd, off_t n) {
  (void)fd; (void)n;
  errno = fail_errno;
  return -1;
}
static void *fail_mmap(void *a, size_t n, int prot, int fl, int fd, off_t o) {
  (void)a; (void)n; (void)prot; (void)fl; (void)fd; (void)o;
  errno = fail_errno;
  return MAP_FAILED;
}

static int fail_fstat(int fd, struct stat *st) {
  (void)fd; (void)st;
  errno = fail_errno;
  return -1;
}

static int fail_shm_unlink(const char *name) {
  (void)name;
  errno = fail_errno;
  return -1;
}

/* Creating a block fails at each step: OSError with the errno, no fd
 * left, and no name left behind in /dev/shm. */
static void test_shm_faults(void) {
  lua_State *L = new_state();
  int before;
  char path[64];
  snprintf(path, sizeof path, "/dev/shm/luamp_fault_%d", (int)getpid());
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "core = require 'multiprocessing.core'\n"
               "name = 'luamp_fault_' .. core.getpid()\n"
               "function make() return mp.SharedMemory{name = name, "
               "create = true, size = 64} end\n"
               "make():unlink()"));   /* tables and tracker set up */
  before = count_fds();
  fail_errno = EMFILE;
  luamp_sys.shm_open = fail_shm_open;
  CHECK(run(L, EXPECT_OSERROR("", "make()", 24)));
  luamp_sys.shm_open = shm_open;
  fail_errno = ENOSPC;
  luamp_sys.ftruncate = fail_ftruncate;
  CHECK(run(L, EXPECT_OSERROR("", "make()", 28)));
  CHECK(access(path, F_OK) != 0);
  luamp_sys.ftruncate = ftruncate;
  fail_errno = ENODEV;
  luamp_sys.mmap = fail_mmap;
  CHECK(run(L, EXPECT_OSERROR("", "make()", 19)));
  CHECK(access(path, F_OK) != 0);
  luamp_sys.mmap = mmap;
  fail_errno = EIO;
  luamp_sys.fstat = fail_fstat;
  CHECK(run(L, EXPECT_OSERROR("", "make()", 5)));
  CHECK(access(path, F_OK) != 0);
  luamp_sys.fstat = fstat;
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  CHECK(run(L, "s = make() s:write(0, 'ok') assert(s:read(0, 2) == 'ok')"));
  fail_errno = EIO;
  luamp_sys.shm_unlink = fail_shm_unlink;
  CHECK(run(L, EXPECT_OSERROR("", "s:unlink()", 5)));
  CHECK(access(path, F_OK) == 0);
  luamp_sys.shm_unlink = shm_unlink;
  CHECK(run(L, "s:unlink() s:close()"));
  CHECK(access(path, F_OK) != 0);
  lua_close(L);
}

/* No entropy yet (getrandom fails): an unnamed SharedMemory still gets
 * Python's psm_ name from the fallback, and works. */
static ssize_t fail_getrandom(void *b, size_t n, unsigned int fl) {
  (void)b; (void)n; (void)fl;
  errno = EAGAIN;
  return -1;
}

static void test_getrandom_fallback(void) {
  lua_State *L = new_state();
  luamp_sys.getrandom = fail_getrandom;
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "local s = mp.SharedMemory{create = true, size = 16}\n"
               "assert(s.name:match('^psm_%x%x%x%x%x%x%x%x$'), s.name)\n"
               "s:write(0, 'ok') assert(s:read(0, 2) == 'ok')\n"
               "s:unlink() s:close()\n"
               "local q = mp.Queue() q:put(1) assert(q:get() == 1)"));
  lua_close(L);
}

/* Every descriptor the runtime lets go of goes through luamp_sys.close
 * (so a test can see or fail it); a close that fails (EIO: the fd is
 * gone all the same on Linux) still leaves the handle closed. */
static int closes;
static int count_close(int fd) {
  closes++;
  return close(fd);
}
static int eio_close(int fd) {
  close(fd);
  errno = EIO;
  return -1;
}

static void test_close_through_table(void) {
  lua_State *L = new_state();
  int before;
  CHECK(run(L, "mp = require 'multiprocessing'"));
  before = count_fds();
  luamp_sys.close = count_close;
  CHECK(run(L, "local a, b = mp.Pipe() a:close() b:close()"));
  CHECK(closes >= 2);
  CHECK(count_fds() == before);
  luamp_sys.close = eio_close;
  CHECK(run(L, "local a, b = mp.Pipe() a:close() b:close()\n"
               "assert(a.closed and b.closed)"));
  CHECK(count_fds() == before);
  luamp_sys.close = close;
  lua_close(L);
}

/* ---- queue.c and arena.c -------------------------------------------- */

/* The shared memory behind a queue, and its fileno() pipe, cannot be
 * made: OSError with the errno, no fd left, and the queue works after. */
static void test_queue_faults(void) {
  lua_State *L = new_state();
  int before;
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "local q = mp.Queue() q:put(1) assert(q:get() == 1) q:close()\n"
               "collectgarbage() collectgarbage()"));
  before = count_fds();
  fail_errno = EMFILE;
  luamp_sys.memfd_create = fail_memfd;
  CHECK(run(L, EXPECT_OSERROR("", "mp.Queue()", 24)));
  luamp_sys.memfd_create = memfd_create;
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  CHECK(run(L, "q = mp.Queue()"));
  luamp_sys.pipe2 = fail_pipe2;
  CHECK(run(L, EXPECT_OSERROR("", "q:fileno()", 24)));
  luamp_sys.pipe2 = pipe2;
  CHECK(run(L, "q:put('x') assert(q:get() == 'x')\n"
               "assert(type(q:fileno()) == 'number') q:close()\n"
               "q = nil collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  lua_close(L);
}

/* ---- evset.c --------------------------------------------------------- */

static int fail_timerfd(clockid_t clock, int fl) {
  (void)clock; (void)fl;
  errno = fail_errno;
  return -1;
}
static int fail_epoll_create1(int fl) {
  (void)fl;
  errno = fail_errno;
  return -1;
}
static int fail_epoll_ctl(int ep, int op, int fd, struct epoll_event *ev) {
  (void)ep; (void)op; (void)fd; (void)ev;
  errno = fail_errno;
  return -1;
}

static int fail_settime(int fd, int fl, const struct itimerspec *v,
                        struct itimerspec *old) {
  (void)fd; (void)fl; (void)v; (void)old;
  errno = fail_errno;
  return -1;
}

static void test_evset_faults(void) {
  lua_State *L = new_state();
  int before = count_fds();
  CHECK(run(L, "core = require 'multiprocessing.core'"));
  fail_errno = EMFILE;
  luamp_sys.timerfd_create = fail_timerfd;
  CHECK(run(L, EXPECT_OSERROR("", "core.EventSet()", 24)));
  luamp_sys.timerfd_create = timerfd_create;
  luamp_sys.epoll_create1 = fail_epoll_create1;
  CHECK(run(L, EXPECT_OSERROR("", "core.EventSet()", 24)));
  luamp_sys.epoll_create1 = epoll_create1;
  fail_errno = ENOSPC;
  luamp_sys.epoll_ctl = fail_epoll_ctl;
  CHECK(run(L, EXPECT_OSERROR("", "core.EventSet()", 28)));
  CHECK(run(L, "collectgarbage() collectgarbage()"));
  CHECK(count_fds() == before);
  luamp_sys.epoll_ctl = epoll_ctl;
  CHECK(run(L, "es = core.EventSet()"));
  luamp_sys.epoll_ctl = fail_epoll_ctl;
  CHECK(run(L, EXPECT_OSERROR("", "es:add(0)", 28)));
  luamp_sys.epoll_ctl = epoll_ctl;
  fail_errno = EIO;
  luamp_sys.timerfd_settime = fail_settime;
  CHECK(run(L, EXPECT_OSERROR("", "es:set_timer(core.now() + 1)", 5)));
  luamp_sys.timerfd_settime = timerfd_settime;
  CHECK(run(L, "es:set_timer(core.now() + 1) es:set_timer(nil)"));
  CHECK(run(L, "local a, b = core.Pipe() es:add(a:fileno())\n"
               "es:close() a:close() b:close()"));
  CHECK(count_fds() == before);
  lua_close(L);
}

/* ---- arena.c's futex waits (sync.c, queue.c) ------------------------- */

static lua_State *waiting_state;
static int eintr_waits, raise_sigint;
static long (*real_futex)(_Atomic uint32_t *, int, uint32_t,
                          const struct timespec *, uint32_t);

/* lua.c's answer to SIGINT: a count hook on the main thread. */
static void sigint_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

/* Waits are cut short by a signal: EINTR (after SIGINT's hook is set when
 * raise_sigint says so); wakes go through. */
static long eintr_futex(_Atomic uint32_t *w, int op, uint32_t val,
                        const struct timespec *ts, uint32_t bits) {
  if ((op & 0x7f) != FUTEX_WAIT && (op & 0x7f) != FUTEX_WAIT_BITSET)
    return real_futex(w, op, val, ts, bits);  /* not a WAIT */
  eintr_waits++;
  if (raise_sigint)
    lua_sethook(waiting_state, sigint_hook, LUA_MASKCALL | LUA_MASKRET |
                LUA_MASKLINE | LUA_MASKCOUNT, 1);
  errno = EINTR;
  return -1;
}

/* A wait whose futex sees EINTR: Ctrl-C raises "interrupted!", another
 * signal lets a timed wait time out at its deadline. */
static void test_futex_eintr(void) {
  lua_State *L = new_state();
  waiting_state = L;
  real_futex = luamp_sys.futex;
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "s = mp.Semaphore(0)"));
  luamp_sys.futex = eintr_futex;
  raise_sigint = 1;
  CHECK(run(L, "local ok, e = pcall(s.acquire, s)\n"
               "assert(not ok and tostring(e):find('interrupted!'), tostring(e))"));
  CHECK(eintr_waits >= 1);
  raise_sigint = 0;
  eintr_waits = 0;
  CHECK(run(L, "assert(s:acquire(true, 0.05) == false)"));
  CHECK(eintr_waits >= 1);
  luamp_sys.futex = real_futex;
  CHECK(run(L, "s:release() assert(s:acquire(true, 1) == true)"));
  lua_close(L);
}

/* ---- forkserver.c ------------------------------------------------------ */

/* The fork server's pipe2 (its status pipe for a new child) fails: the
 * start raises OSError with the errno, nothing is started, no fd is left;
 * the owner's request cannot be sent (sendmsg): OSError, the server is
 * forgotten (it leaves) and the next start starts a new one. */
static void test_forkserver_faults(void) {
  lua_State *L = new_state();
  int before;
  fail_errno = EMFILE;
  luamp_sys.pipe2 = fail_pipe2;          /* (inherited by the server) */
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "core = require 'multiprocessing.core'\n"
               "ctx = mp.get_context('forkserver')\n"
               "spid = core.forkserver_start()"));
  luamp_sys.pipe2 = pipe2;
  before = count_fds();
  CHECK(run(L, EXPECT_OSERROR("p = ctx.Process{target = function() end}",
                              "p:start()", 24)
               "assert(p.pid == nil and #mp.active_children() == 0)\n"
               "assert(core.forkserver_pid() == spid)"));
  CHECK(count_fds() == before);
  CHECK(run(L, "core.forkserver_stop() spid = core.forkserver_start()"));
  before = count_fds();
  fail_errno = EIO;
  luamp_sys.sendmsg = fail_sendmsg;
  CHECK(run(L, EXPECT_OSERROR("p = ctx.Process{target = function() end}",
                              "p:start()", 5)
               "assert(p.pid == nil and core.forkserver_pid() == nil)"));
  luamp_sys.sendmsg = sendmsg;
  CHECK(count_fds() == before - 1);      /* (the server's socket went) */
  CHECK(run(L, "p = ctx.Process{target = function() os.exit(4) end}\n"
               "p:start() p:join() assert(p.exitcode == 4)\n"
               "assert(core.forkserver_pid() ~= spid)"));
  lua_close(L);
}

int main(void) {
  static const struct tap_test tests[] = {
    {"conn: send and recv that fail raise OSError", test_conn_send_and_recv_fail},
    {"conn: a send with fds whose sendmsg fails raises OSError, no fd left",
     test_conn_send_fds_fails},
    {"conn: Pipe that cannot be made raises OSError, no fd left",
     test_conn_pipe_creation_fails},
    {"conn: connect and getsockname that fail raise OSError, no fd left",
     test_listener_accept_and_connect_fail},
    {"conn: accept and socket that fail raise OSError",
     test_socket_and_accept_fail},
    {"conn: bind and listen that fail raise OSError, no fd left",
     test_bind_and_listen_fail},
    {"store: memfd_create, pwrite and pread that fail raise OSError",
     test_store_faults},
    {"process: a start whose sentinel pipe or signal mask fails raises OSError",
     test_spawn_faults},
    {"process: waitpid that fails raises OSError", test_waitpid_fault},
    {"process: kill that fails raises OSError", test_kill_fault},
    {"shm: shm_open, ftruncate and mmap that fail raise OSError, no name left",
     test_shm_faults},
    {"shm, arena: without entropy (getrandom fails) names and uids fall back",
     test_getrandom_fallback},
    {"close goes through the table; one that fails leaves the handle closed",
     test_close_through_table},
    {"queue: memfd_create and fileno's pipe2 that fail raise OSError",
     test_queue_faults},
    {"evset: timerfd_create, epoll_create1 and epoll_ctl that fail raise OSError",
     test_evset_faults},
    {"futex: a wait cut by EINTR sees Ctrl-C, or times out",
     test_futex_eintr},
    {"forkserver: the server's pipe2 and the request's sendmsg that fail "
     "raise OSError", test_forkserver_faults},
    {NULL, NULL}
  };
  return tap_run(tests);
}
