/* C tests of process.c: the embedding host's at-fork hooks, a failing
 * fork (injected through luamp_sys), and exit cleanup from lua_close in a
 * host with no SIGINT handler. */
#include <errno.h>
#include <signal.h>

#include <lauxlib.h>
#include <lualib.h>

#include "internal.h"
#include "tap.h"
#include "luatest.h"

static char trace[64];
static void note(char c) {
  size_t n = strlen(trace);
  if (n + 1 < sizeof trace) trace[n] = c;
}
static void before_a(void *ud) { (void)ud; note('a'); }
static void before_b(void *ud) { (void)ud; note('b'); }
static void parent_a(void *ud) { (void)ud; note('A'); }
static void parent_b(void *ud) { (void)ud; note('B'); }
static int child_ran = 0;
static void child_hook(void *ud) { child_ran = *(int *)ud; }

/* C hooks: before in reverse order of registration, parent in order; the
 * child hook runs in the child (seen through its exit code). */
static void test_atfork_hooks(void) {
  static int magic = 42;
  lua_State *L = new_state();
  CHECK(luamp_atfork(before_a, parent_a, child_hook, &magic) == 0);
  CHECK(luamp_atfork(before_b, parent_b, NULL, NULL) == 0);
  CHECK(run(L, "local mp = require 'multiprocessing'\n"
               "local p = mp.Process{target = function() end}\n"
               "p:start() p:join() assert(p.exitcode == 0)"));
  CHECK(strcmp(trace, "baAB") == 0);
  {
    pid_t pid = luamp_fork(L);
    int st;
    if (pid == 0) luamp_child_exit(child_ran);
    CHECK(pid > 0);
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 42);
  }
  lua_close(L);
}

static pid_t failing_fork(void) {
  errno = EAGAIN;
  return -1;
}

/* A fork that fails raises OSError with errno and leaves nothing behind. */
static void test_fork_failure(void) {
  lua_State *L = new_state();
  pid_t (*real)(void) = luamp_sys.fork;
  luamp_sys.fork = failing_fork;
  CHECK(run(L, "local mp = require 'multiprocessing'\n"
               "local p = mp.Process{target = function() end}\n"
               "local ok, e = pcall(p.start, p)\n"
               "assert(not ok and e.kind == 'OSError' and e.errno == 11, tostring(e))\n"
               "assert(p.pid == nil and #mp.active_children() == 0)"));
  luamp_sys.fork = real;
  CHECK(run(L, "local mp = require 'multiprocessing'\n"
               "local p = mp.Process{target = function() os.exit(5) end}\n"
               "p:start() p:join() assert(p.exitcode == 5)"));
  lua_close(L);
}

/* lua_close joins a running non-daemon child and terminates a daemon. */
static void test_cleanup_at_close(void) {
  lua_State *L = new_state();
  CHECK(run(L, "local mp = require 'multiprocessing'\n"
               "local core = require 'multiprocessing.core'\n"
               "nd = mp.Process{target = function() core.sleep(0.2) end}\n"
               "nd:start()\n"
               "d = mp.Process{daemon = true, target = function() core.sleep(30) end}\n"
               "d:start()\n"
               "ND, D = nd.pid, d.pid"));
  lua_getglobal(L, "ND");
  lua_getglobal(L, "D");
  {
    pid_t nd = (pid_t)lua_tointeger(L, -2), d = (pid_t)lua_tointeger(L, -1);
    lua_close(L);
    /* both are reaped by now: neither exists, not even as a zombie */
    CHECK(kill(nd, 0) == -1 && errno == ESRCH);
    CHECK(kill(d, 0) == -1 && errno == ESRCH);
  }
}

int main(void) {
  static const struct tap_test tests[] = {
    {"at-fork hooks of an embedding host run in order", test_atfork_hooks},
    {"a failing fork raises OSError and leaks nothing", test_fork_failure},
    {"lua_close joins children and terminates daemons", test_cleanup_at_close},
    {NULL, NULL}
  };
  return tap_run(tests);
}
