/*
 * tap.h -- a tiny test runner for the C tests.  Each test runs in its own
 * forked process with a time limit (libuv's runner idea), so a crash or a
 * hang fails that test only.  Output is TAP, read by scripts/run_tests.lua.
 */
#ifndef LUAMP_TAP_H
#define LUAMP_TAP_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct tap_test {
  const char *name;
  void (*fn)(void);
};

#define CHECK(cond) do { \
    if (!(cond)) { \
      printf("# %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      fflush(stdout); \
      _exit(1); \
    } \
  } while (0)

/* (a test file may set its own limit before including this file) */
#ifndef TAP_TIMEOUT_SEC
#define TAP_TIMEOUT_SEC 30
#endif

static int tap_run(const struct tap_test *tests) {
  int n = 0, failed = 0;
  for (const struct tap_test *t = tests; t->fn; t++) {
    int status = 0, done = 0;
    pid_t pid;
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
      t->fn();
      fflush(stdout);
      _exit(0);
    }
    for (int ms = 0; ms < TAP_TIMEOUT_SEC * 1000; ms += 5) {
      if (waitpid(pid, &status, WNOHANG) == pid) { done = 1; break; }
      nanosleep(&(struct timespec){0, 5000000}, NULL);
    }
    n++;
    if (!done) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      printf("not ok %d - %s\n# timed out\n", n, t->name);
      failed++;
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      printf("ok %d - %s\n", n, t->name);
    } else {
      printf("not ok %d - %s\n# %s %d\n", n, t->name,
             WIFSIGNALED(status) ? "killed by signal" : "exit status",
             WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
      failed++;
    }
  }
  printf("1..%d\n", n);
  return failed ? 1 : 0;
}

#endif
