/* C tests of LUAMP_ASSERT (internal.h): compiled into the library and
 * these tests when LUAMP_DEBUG is defined (make sanitize), nothing
 * otherwise; and luamp_mutex_held, the test the "under mu" assertions
 * use. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>

#include "internal.h"
#include "tap.h"

static void test_mutex_held(void) {
  pthread_mutex_t m;
  CHECK(luamp_mutex_init(&m) == 0);
  CHECK(!luamp_mutex_held(&m));
  CHECK(luamp_mutex_lock(&m, NULL, NULL) == 0);
  CHECK(luamp_mutex_held(&m));
  luamp_mutex_unlock(&m);
  CHECK(!luamp_mutex_held(&m));
}

/* Unlocking a mutex this thread does not hold breaks the library's own
 * "under mu" invariant: a debug build stops there, naming it. */
static void test_assertion_fires_in_debug_build(void) {
  int p[2], status;
  char buf[512] = {0};
  ssize_t n, got = 0;
  pid_t pid;
  CHECK(pipe2(p, O_CLOEXEC) == 0);
  pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    pthread_mutex_t m;
    dup2(p[1], 2);
    if (luamp_mutex_init(&m) != 0) _exit(3);
    luamp_mutex_unlock(&m);   /* not held */
    _exit(0);
  }
  close(p[1]);
  while ((n = read(p[0], buf + got, sizeof buf - 1 - (size_t)got)) > 0)
    got += n;
  close(p[0]);
  CHECK(waitpid(pid, &status, 0) == pid);
#ifdef LUAMP_DEBUG
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
  CHECK(strstr(buf, "luamp: assertion failed: luamp_mutex_held(m)") != NULL);
  CHECK(strstr(buf, "luamp_mutex_unlock") != NULL);
#else
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(got == 0);
#endif
}

static const struct tap_test tests[] = {
  {"luamp_mutex_held tells whether this thread holds a mutex",
   test_mutex_held},
  {"a broken invariant stops a debug build (LUAMP_ASSERT), naming it",
   test_assertion_fires_in_debug_build},
  {NULL, NULL}
};

int main(void) { return tap_run(tests); }
