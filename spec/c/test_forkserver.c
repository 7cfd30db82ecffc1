/* The problem the forkserver start method solves, shown by a threaded C
 * host: four threads hammer a mutex-guarded logger, and every child's
 * target calls that logger.  Under fork, a child forked while another
 * thread held the mutex finds it locked for ever: a watchdog (join with a
 * timeout) catches the hangs, and luamp warns once that the process is
 * multi-threaded.  Under forkserver (luamp_forkserver_start before the
 * threads exist), 1000 starts all finish, and a Pool's workers (and the
 * replacement of one killed) work too. */
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "internal.h"
/* 1000 starts take a few seconds on an idle machine, far more on a busy
 * one: the runner's own limit (120 s for the file) is the bound */
#define TAP_TIMEOUT_SEC 90
#include "tap.h"
#include "luatest.h"

/* ---- the host's logger and its threads ---------------------------------- */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char log_last[128];
static unsigned long log_count;

/* hold_ns: how long the caller keeps the lock (the threads keep it a
 * while, as a logger that formats and writes under its lock) */
static void log_line(const char *msg, long hold_ns) {
  pthread_mutex_lock(&log_mu);
  snprintf(log_last, sizeof log_last, "%s", msg);
  log_count++;
  if (hold_ns > 0) nanosleep(&(struct timespec){0, hold_ns}, NULL);
  pthread_mutex_unlock(&log_mu);
}

static int l_log(lua_State *L) {
  log_line(luaL_checkstring(L, 1), 0);
  lua_pushinteger(L, (lua_Integer)log_count);
  return 1;
}

static int open_logger(lua_State *L) {
  static const luaL_Reg f[] = {{"log", l_log}, {NULL, NULL}};
  luaL_newlib(L, f);
  return 1;
}

/* the fork server's state gets the logger too (its own copy of the
 * mutex: the server was forked before any thread existed) */
static int server_init(lua_State *L, void *ud) {
  (void)ud;
  luaL_requiref(L, "logger", open_logger, 1);
  lua_pop(L, 1);
  return 0;
}

static atomic_int stop_threads;
static pthread_t threads[4];

static void *hammer(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_threads)) log_line("thread", 200000);
  return NULL;
}

static void start_threads(void) {
  atomic_store(&stop_threads, 0);
  for (int i = 0; i < 4; i++)
    CHECK(pthread_create(&threads[i], NULL, hammer, NULL) == 0);
}

static void stop_all(void) {
  atomic_store(&stop_threads, 1);
  for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
}

/* stderr goes to a file while f runs; returns how often needle was in it */
static int count_in_stderr(const char *needle, int (*f)(lua_State *),
                           lua_State *L) {
  char path[] = "/tmp/luamp-fs-stderr-XXXXXX", buf[65536];
  int fd = mkstemp(path), saved = dup(2), n = 0, ok;
  ssize_t len;
  CHECK(fd >= 0 && saved >= 0);
  fflush(stderr);
  dup2(fd, 2);
  ok = f(L);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  len = pread(fd, buf, sizeof buf - 1, 0);
  close(fd);
  unlink(path);
  CHECK(ok);
  buf[len > 0 ? len : 0] = '\0';
  for (const char *p = buf; (p = strstr(p, needle)) != NULL; p++) n++;
  return n;
}

static lua_State *host_state(void) {
  lua_State *L = new_state();
  luaL_requiref(L, "logger", open_logger, 1);
  lua_pop(L, 1);
  return L;
}

/* ---- under fork: the hangs -------------------------------------------- */

static int run_fork_starts(lua_State *L) {
  return run(L,
    "local mp = require 'multiprocessing'\n"
    "HUNG, DONE = 0, 0\n"
    "for i = 1, 8 do\n"
    "  local p = mp.Process{target = function() logger.log('child') end}\n"
    "  p:start()\n"
    "  p:join(0.5)                       -- the watchdog\n"
    "  if p:is_alive() then HUNG = HUNG + 1; p:kill(); p:join() \n"
    "  elseif p.exitcode == 0 then DONE = DONE + 1 end\n"
    "end\n");
}

static void test_fork_hangs(void) {
  lua_State *L = host_state();
  int warnings;
  start_threads();
  warnings = count_in_stderr("is multi-threaded", run_fork_starts, L);
  stop_all();
  lua_getglobal(L, "HUNG");
  printf("# under fork: %d of 8 children hung on the logger's lock\n",
         (int)lua_tointeger(L, -1));
  CHECK(lua_tointeger(L, -1) >= 1);      /* the problem, demonstrated */
  CHECK(warnings == 1);                   /* warned, once */
  lua_close(L);
}

/* ---- under forkserver: no hang ------------------------------------------ */

static int run_forkserver_starts(lua_State *L) {
  return run(L,
    "local mp = require 'multiprocessing'\n"
    "mp.set_start_method('forkserver')\n"
    "HUNG, DONE = 0, 0\n"
    "for i = 1, 1000 do\n"
    "  local p = mp.Process{target = function(n) logger.log('child ' .. n) end,\n"
    "                       args = {i}}\n"
    "  p:start()\n"
    "  p:join(10)                        -- the watchdog\n"
    "  if p:is_alive() then HUNG = HUNG + 1; p:kill(); p:join()\n"
    "  elseif p.exitcode == 0 then DONE = DONE + 1 end\n"
    "end\n");
}

static void test_forkserver_no_hang(void) {
  lua_State *L;
  int warnings;
  /* early in "main": before any thread and before the state exists */
  CHECK(luamp_forkserver_start(server_init, NULL) == 0);
  CHECK(luamp_forkserver_pid() > 0);
  start_threads();
  L = host_state();
  warnings = count_in_stderr("is multi-threaded", run_forkserver_starts, L);
  stop_all();
  lua_getglobal(L, "HUNG");
  lua_getglobal(L, "DONE");
  printf("# under forkserver: %d hung, %d of 1000 finished\n",
         (int)lua_tointeger(L, -2), (int)lua_tointeger(L, -1));
  CHECK(lua_tointeger(L, -2) == 0);
  CHECK(lua_tointeger(L, -1) == 1000);
  CHECK(warnings == 0);                  /* the owner never forked */
  lua_close(L);
}

/* A Pool under forkserver in the threaded host: tasks call the logger; a
 * killed worker is replaced and the pool keeps serving. */
static int run_pool(lua_State *L) {
  return run(L,
    "local mp = require 'multiprocessing'\n"
    "local core = require 'multiprocessing.core'\n"
    "local pool = mp.get_context('forkserver').Pool(2)\n"
    "local r = pool:map(function(i) logger.log('task'); return i * 2 end, {1, 2, 3, 4})\n"
    "assert(r[4] == 8)\n"
    "local victim\n"
    "for _, w in pairs(pool._workers) do victim = w.pid end\n"
    "core.kill(victim, 'SIGKILL')\n"
    "local deadline = core.now() + 10\n"
    "repeat pool:poll(); core.sleep(0.01)\n"
    "  local back = 0\n"
    "  for _, w in pairs(pool._workers) do if w.pid ~= victim then back = back + 1 end end\n"
    "until back == 2 or core.now() > deadline\n"
    "r = pool:map(function(i) return logger.log('again') and i end, {1, 2, 3})\n"
    "assert(r[3] == 3, 'pool after replacement')\n"
    "pool:close() pool:join()\n");
}

static void test_forkserver_pool(void) {
  lua_State *L;
  CHECK(luamp_forkserver_start(server_init, NULL) == 0);
  start_threads();
  L = host_state();
  CHECK(count_in_stderr("is multi-threaded", run_pool, L) == 0);
  stop_all();
  lua_close(L);
}

/* Managers under forkserver in the threaded host: the manager's server
 * (and a SharedMemoryManager's, and a managed Pool's workers) come from
 * the fork server; a Connection through a Queue starts the fd keeper and
 * a SharedMemory the tracker from this host, forks that are safe here
 * and do not warn.  No hang, no warning. */
static int run_managers(lua_State *L) {
  return run(L,
    "local mp = require 'multiprocessing'\n"
    "local core = require 'multiprocessing.core'\n"
    "mp.set_start_method('forkserver')\n"
    "local m = mp.Manager()\n"
    "local d = m:dict()\n"
    "local p = mp.Process{target = function() logger.log('child') d.x = 1 end}\n"
    "p:start() p:join(10)\n"
    "assert(p.exitcode == 0 and d.x == 1, 'a child used the manager')\n"
    "local pool = m:Pool(2)\n"
    "assert(pool:map(function(v) return logger.log('task') and v end, {1, 2})[2] == 2)\n"
    "pool:close() pool:join()\n"
    "local smm = mp.managers.SharedMemoryManager():start()\n"
    "local shm = smm:SharedMemory(16) shm:close()\n"
    "smm:shutdown()\n"
    "local a, b = mp.Pipe()\n"
    "local q = mp.Queue()\n"
    "q:put(a) a:close()\n"
    "local a2 = q:get(true, 10)\n"
    "a2:send('hi') assert(b:recv() == 'hi')\n"
    "local mine = mp.SharedMemory{create = true, size = 64}\n"
    "mine:close() mine:unlink()\n"
    "local mpid = m.pid\n"
    "m:shutdown()\n"
    "assert(core.kill(mpid, 0) == false, 'the manager server is gone')\n");
}

static void test_forkserver_managers(void) {
  lua_State *L;
  CHECK(luamp_forkserver_start(server_init, NULL) == 0);
  start_threads();
  L = host_state();
  CHECK(count_in_stderr("is multi-threaded", run_managers, L) == 0);
  stop_all();
  lua_close(L);
}

/* ---- failures: injected through luamp_sys; nothing leaks --------------- */

static int open_fds(void) {
  int n = 0;
  for (int fd = 0; fd < 1024; fd++)
    if (fcntl(fd, F_GETFD) >= 0) n++;
  return n;
}

static int fail_socketpair(int d, int t, int p, int *sv) {
  (void)d; (void)t; (void)p; (void)sv;
  errno = EMFILE;
  return -1;
}

static pid_t fail_fork(void) {
  errno = EAGAIN;
  return -1;
}

static void test_start_failures(void) {
  int fds = open_fds();
  lua_State *L;
  luamp_sys.socketpair = fail_socketpair;
  CHECK(luamp_forkserver_start(NULL, NULL) == -1 && errno == EMFILE);
  luamp_sys.socketpair = socketpair;
  luamp_sys.fork = fail_fork;
  CHECK(luamp_forkserver_start(NULL, NULL) == -1 && errno == EAGAIN);
  CHECK(luamp_forkserver_pid() == 0);
  CHECK(open_fds() == fds);
  /* from Lua: OSError at the start that needed the server */
  L = new_state();
  CHECK(run(L, "local mp = require 'multiprocessing'\n"
               "local p = mp.get_context('forkserver').Process{target = print}\n"
               "local ok, e = pcall(p.start, p)\n"
               "assert(not ok and e.kind == 'OSError' and e.errno == 11, tostring(e))\n"
               "assert(p.pid == nil and #mp.active_children() == 0)"));
  luamp_sys.fork = fork;
  /* and the next start works */
  CHECK(run(L, "local mp = require 'multiprocessing'\n"
               "local p = mp.get_context('forkserver').Process{target = function() os.exit(4) end}\n"
               "p:start() p:join() assert(p.exitcode == 4)"));
  lua_close(L);
}

int main(void) {
  static const struct tap_test tests[] = {
    {"under fork, a threaded host's children hang on its logger (watchdog)",
     test_fork_hangs},
    {"under forkserver, 1000 starts in a threaded host, no hang",
     test_forkserver_no_hang},
    {"a forkserver Pool in a threaded host replaces a killed worker",
     test_forkserver_pool},
    {"managers, the fd keeper and the shm tracker in a threaded host: no "
     "fork warning, no hang", test_forkserver_managers},
    {"a server that cannot start raises OSError and leaks nothing",
     test_start_failures},
    {NULL, NULL}
  };
  return tap_run(tests);
}
