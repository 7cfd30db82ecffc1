/* C tests of queue.c's interface for mp.wait (readiness, watching, the
 * wake-up pipe) and of arena.c's robust-mutex repair, with real forks and
 * real deaths. */
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/mman.h>

#include <lauxlib.h>
#include <lualib.h>

#include "internal.h"
#include "tap.h"
#include "luatest.h"

static int readable(int fd, int ms) {
  struct pollfd p = {fd, POLLIN, 0};
  return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

/* forks a child that runs code and exits; returns after it ended */
static void child_runs(lua_State *L, const char *code) {
  pid_t pid;
  int status;
  fflush(stdout);
  pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) _exit(run(L, code) ? 0 : 1);
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void test_ready_and_wakeup(void) {
  lua_State *L = new_state();
  int fd;
  CHECK(run(L, "mp = require 'multiprocessing'; q = mp.Queue()"));
  lua_getglobal(L, "q");
  CHECK(luamp_queue_test(L, -1));
  CHECK(!luamp_queue_ready(L, -1));
  luamp_queue_watch(L, -1, 1);
  luamp_queue_watch(L, -1, 1);             /* twice is once */
  fd = luamp_wakeup_fd(L);
  CHECK(fd >= 0);
  CHECK(!readable(fd, 0));
  /* a put in another process pokes us through /proc/<pid>/fd */
  child_runs(L, "q:put(1)");
  CHECK(readable(fd, 2000));
  CHECK(luamp_queue_ready(L, -1));
  luamp_wakeup_drain();
  CHECK(!readable(fd, 0));
  /* a registration is used up by the poke: one put, one poke */
  child_runs(L, "q:put(1.5)");
  CHECK(!readable(fd, 200));
  /* registered again, a put of our own */
  luamp_queue_watch(L, -1, 1);
  CHECK(run(L, "q:put(2)"));
  CHECK(readable(fd, 0));
  luamp_wakeup_drain();
  /* not watched any more: no poke */
  luamp_queue_watch(L, -1, 0);
  child_runs(L, "q:put(3)");
  CHECK(!readable(fd, 200));
  CHECK(run(L, "assert(q:qsize() == 4) assert(q:_stats().watchers == 0)"));
  lua_pushinteger(L, 1);
  CHECK(!luamp_queue_test(L, -1));
  lua_close(L);
}

static void test_dead_watcher_costs_one_poke(void) {
  lua_State *L = new_state();
  CHECK(run(L, "mp = require 'multiprocessing'; q = mp.Queue()"));
  /* the child watches, then exits without unwatching */
  fflush(stdout);
  {
    pid_t pid = fork();
    int status;
    if (pid == 0) {
      lua_getglobal(L, "q");
      luamp_queue_watch(L, -1, 1);
      _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid);
  }
  CHECK(run(L, "assert(q:_stats().watchers == 1)"));
  CHECK(run(L, "q:put(1)"));               /* finds it gone */
  CHECK(run(L, "assert(q:_stats().watchers == 0)"));
  lua_close(L);
}

/* A holder dies inside a critical section: the next locker repairs. */
struct shared {
  pthread_mutex_t mu;
  int value, saved, repairs;
};

static void repair(void *arg) {
  struct shared *s = arg;
  s->value = s->saved;           /* undo the half-done step */
  s->repairs++;
}

static void test_robust_mutex_repair(void) {
  struct shared *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  pid_t pid;
  int status;
  CHECK(s != MAP_FAILED);
  CHECK(luamp_mutex_init(&s->mu) == 0);
  s->value = 1;
  fflush(stdout);
  pid = fork();
  if (pid == 0) {
    luamp_mutex_lock(&s->mu, repair, s);
    s->saved = s->value;
    s->value = 99;               /* ...and dies before finishing */
    kill(getpid(), SIGKILL);
  }
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status));
  CHECK(luamp_mutex_lock(&s->mu, repair, s) == 0);
  CHECK(s->repairs == 1);
  CHECK(s->value == 1);
  luamp_mutex_unlock(&s->mu);
  CHECK(luamp_mutex_lock(&s->mu, repair, s) == 0);   /* consistent again */
  CHECK(s->repairs == 1);
  luamp_mutex_unlock(&s->mu);
}

static void test_identity_and_liveness(void) {
  uint64_t me = luamp_self_id();
  pid_t pid;
  int status;
  CHECK((pid_t)(me & 0xffffffffu) == getpid());
  CHECK(luamp_id_alive(me));
  CHECK(!luamp_id_alive(0));
  /* a recycled tid is not the old holder: same tid, other start time */
  CHECK(!luamp_id_alive((me & 0xffffffffu) | ((me >> 32) + 1) << 32));
  fflush(stdout);
  pid = fork();
  if (pid == 0) {
    uint64_t child = luamp_self_id();
    _exit(child != me && (pid_t)(child & 0xffffffffu) == getpid() ? 0 : 1);
  }
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* a zombie holds nothing: a child killed and not reaped yet */
  pid = fork();
  if (pid == 0) {
    pause();
    _exit(0);
  }
  {
    /* its identity as it would have recorded it */
    char path[64], buf[512];
    FILE *f;
    unsigned long long start = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 100 && start == 0; i++) {
      f = fopen(path, "r");
      if (f && fgets(buf, sizeof buf, f)) {
        char *p = strrchr(buf, ')') + 2;
        for (int field = 3; field < 22; p++) if (*p == ' ') field++;
        start = strtoull(p, NULL, 10);
      }
      if (f) fclose(f);
    }
    uint64_t id = (uint64_t)(uint32_t)pid | ((start & 0xffffffffu) << 32);
    CHECK(luamp_id_alive(id));
    kill(pid, SIGKILL);
    for (int i = 0; i < 200 && luamp_id_alive(id); i++) usleep(5000);
    CHECK(!luamp_id_alive(id));
    CHECK(waitpid(pid, &status, 0) == pid);
  }
}

/* issue 13 S5: a holder stopped (SIGSTOP) inside its critical section
 * does not hold a caller with a deadline, or with a pending Ctrl-C, past
 * it; a holder that died is repaired as by luamp_mutex_lock. */
static void stop_hook(lua_State *L, lua_Debug *ar) {
  (void)L;
  (void)ar;
}

static void test_mutex_deadline_with_stopped_holder(void) {
  struct shared *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  lua_State *L = new_state();
  pid_t pid;
  int status;
  double t0, dt;
  CHECK(s != MAP_FAILED);
  CHECK(luamp_mutex_init(&s->mu) == 0);
  fflush(stdout);
  pid = fork();
  if (pid == 0) {
    luamp_mutex_lock(&s->mu, repair, s);
    s->value = 1;
    kill(getpid(), SIGSTOP);    /* stopped while holding it */
    s->value = 2;
    luamp_mutex_unlock(&s->mu);
    _exit(0);
  }
  CHECK(waitpid(pid, &status, WUNTRACED) == pid && WIFSTOPPED(status));
  t0 = luamp_now();
  CHECK(luamp_mutex_lock_until(L, &s->mu, repair, s, t0 + 0.2) == ETIMEDOUT);
  dt = luamp_now() - t0;
  CHECK(dt >= 0.19 && dt < 2.0);
  /* Ctrl-C as lua.c signals it: a count hook of 1 with every mask */
  lua_sethook(L, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE |
              LUA_MASKCOUNT, 1);
  t0 = luamp_now();
  CHECK(luamp_mutex_lock_until(L, &s->mu, repair, s, -1.0) == EINTR);
  CHECK(luamp_now() - t0 < 2.0);
  lua_sethook(L, NULL, 0, 0);
  /* continued, the holder finishes; the lock is free and intact */
  kill(pid, SIGCONT);
  CHECK(luamp_mutex_lock_until(L, &s->mu, repair, s, luamp_now() + 10) == 0);
  CHECK(s->value == 2 && s->repairs == 0);
  luamp_mutex_unlock(&s->mu);
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* a holder killed while stopped: repaired once, then consistent */
  pid = fork();
  if (pid == 0) {
    luamp_mutex_lock(&s->mu, repair, s);
    s->saved = s->value;
    s->value = 99;
    kill(getpid(), SIGSTOP);
    _exit(0);
  }
  CHECK(waitpid(pid, &status, WUNTRACED) == pid && WIFSTOPPED(status));
  kill(pid, SIGKILL);
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(luamp_mutex_lock_until(L, &s->mu, repair, s, luamp_now() + 5) == 0);
  CHECK(s->repairs == 1 && s->value == 2);
  luamp_mutex_unlock(&s->mu);
  lua_close(L);
}

/* The futex wakes this process makes (luamp_sys.futex wrapped). */
static long (*real_futex)(_Atomic uint32_t *, int, uint32_t,
                          const struct timespec *, uint32_t);
static int futex_wakes;

static long counting_futex(_Atomic uint32_t *w, int op, uint32_t val,
                           const struct timespec *ts, uint32_t bits) {
  if ((op & 127) == FUTEX_WAKE || (op & 127) == FUTEX_WAKE_BITSET)
    futex_wakes++;
  return real_futex(w, op, val, ts, bits);
}

/* The state letter of process pid ('S' sleeping, 'T' stopped, ...). */
static char proc_state(pid_t pid) {
  char path[64], buf[512], *p;
  FILE *f;
  size_t n;
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  f = fopen(path, "r");
  if (f == NULL) return '?';
  n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  p = strrchr(buf, ')');
  return p && p[1] && p[2] ? p[2] : '?';
}

/* A getter woken but not yet running (here: stopped) stays counted as a
 * sleeper: the gets that leave items behind meanwhile wake the futex
 * once, not once each (issue 18: apply_async's workers made ~0.5
 * FUTEX_WAKE per task, for nobody, with one core burned). */
static void test_woken_getter_is_woken_once(void) {
  lua_State *L = new_state();
  pid_t pid;
  int status, i;
  CHECK(run(L, "mp = require 'multiprocessing'; q = mp.Queue()"));
  fflush(stdout);
  pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    int ok = run(L, "assert(q:get(true, 30) ~= nil)");
    fflush(stdout);
    _exit(ok ? 0 : 1);
  }
  for (i = 0; i < 500 && proc_state(pid) != 'S'; i++) usleep(10000);
  usleep(50000);                      /* past its poll, asleep in get */
  CHECK(proc_state(pid) == 'S');
  kill(pid, SIGSTOP);                 /* woken, it cannot run yet */
  for (i = 0; i < 500 && proc_state(pid) != 'T'; i++) usleep(10000);
  CHECK(run(L, "q:put('go') for i = 1, 20 do q:put(i) end"));
  real_futex = luamp_sys.futex;
  luamp_sys.futex = counting_futex;
  futex_wakes = 0;
  CHECK(run(L, "for i = 1, 10 do assert(q:get() ~= nil) end"));
  luamp_sys.futex = real_futex;
  kill(pid, SIGCONT);                 /* (before any check can end us) */
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  printf("# %d futex wakes in 10 gets\n", futex_wakes);
  CHECK(futex_wakes <= 1);
  CHECK(run(L, "assert(q:qsize() == 10)"));
  lua_close(L);
}

static const struct tap_test tests[] = {
  {"readiness and the wake-up pipe", test_ready_and_wakeup},
  {"a dead watcher costs one poke", test_dead_watcher_costs_one_poke},
  {"robust mutex repair after a holder's death", test_robust_mutex_repair},
  {"thread identity and liveness (zombies, recycled tids)",
   test_identity_and_liveness},
  {"a stopped lock holder does not outlast a deadline or Ctrl-C",
   test_mutex_deadline_with_stopped_holder},
  {"a woken getter not yet running is woken once",
   test_woken_getter_is_woken_once},
  {NULL, NULL}
};

int main(void) { return tap_run(tests); }
