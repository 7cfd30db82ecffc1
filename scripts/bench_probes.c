/*
 * bench_probes.c -- raw C baselines for make bench.  Each mode prints one
 * JSON line {"name":..,"seconds":..,"rate":..,"unit":..}.
 *
 *   spawn NAME N CMD [ARGS...]  fork+exec+wait CMD N times (start-up cost)
 *   fork N                      fork + _exit + waitpid, N times
 *   pipes N                     N round trips of an 8-byte message (a
 *                               4-byte frame + 4 bytes) between two
 *                               processes over two pipes, one each way:
 *                               one write + one read per direction
 *   pingpong N                  the same over one socketpair
 *   stream MIB                  MIB MiB in 1 MiB writes over a socketpair
 *   pipestream MIB              the same over a pipe grown to 1 MiB
 *   futex N                     N round trips between two processes through
 *                               two futex words in shared memory (no spin):
 *                               the kernel's floor for one wake-up each way
 *   futex_poll N                the same hand-off as a luamp Pool's: the
 *                               child (the worker) polls 10 us before it
 *                               sleeps, the parent (the owner) sleeps at
 *                               once, and each side wakes the other only
 *                               when it sleeps (luamp's futures round trip
 *                               beat the plain probe by doing so)
 *   fork_mem KIB VMAS W N       fork + _exit + waitpid N times from a
 *                               process that first touched KIB KiB of
 *                               private memory in VMAS mappings (a luamp
 *                               parent's footprint: make bench passes
 *                               luamp's own); after each fork the parent
 *                               and the child each write W of those pages
 *                               (0: the kernel's floor for forking that
 *                               process; W > 0 prices the copy-on-write
 *                               faults of W pages written on each side)
 *   fork_touch R N              fork + _exit + waitpid N times; each child
 *                               first reads one byte of each of R pages
 *                               its parent had written (present, copied
 *                               by the fork, nothing written) and times
 *                               it: the median rate at which a fresh
 *                               child reads pages (on a shadow-paging VM
 *                               each costs the child a fault of the
 *                               hypervisor's own, which no guest fault
 *                               counter sees)
 *   fork_pidfd N                fork + _exit, the parent waiting as luamp's
 *                               join does (pidfd_open, poll, waitpid)
 *   speedup                     the pool CPU speed-up row's floor: 8
 *                               CPU-bound tasks of ~60 ms taken from a
 *                               shared counter by 1 process, then by 2;
 *                               the time ratio, median of 5 (what two
 *                               processes get from the machine as it is)
 *   burn SECS [PID]             burns one core for at most SECS seconds,
 *                               or until process PID is gone (make bench's
 *                               loaded state; killed by pid)
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void report(const char *name, double secs, double count,
                   const char *unit) {
  printf("{\"name\":\"%s\",\"seconds\":%.6f,\"rate\":%.3f,\"unit\":\"%s\"}\n",
         name, secs, count / secs, unit);
}

/* Waits while *w == v (futex, shared between processes). */
static void fwait(_Atomic uint32_t *w, uint32_t v) {
  while (atomic_load(w) == v)
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, v, NULL, NULL, 0);
}

static void fwake(_Atomic uint32_t *w) {
  syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* N round trips: the parent bumps word 0 and waits for word 1 to follow. */
/* Waits while *w == v: polls for poll_ns first, then sleeps with
 * *sleeping set (the other side wakes it only then). */
static void fwait_flagged(_Atomic uint32_t *w, uint32_t v,
                          _Atomic uint32_t *sleeping, long poll_ns) {
  double until = now() + (double)poll_ns * 1e-9;
  while (poll_ns > 0 && atomic_load(w) == v && now() < until)
    __builtin_ia32_pause();
  while (atomic_load(w) == v) {
    atomic_store(sleeping, 1);
    if (atomic_load(w) == v)
      syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, v, NULL, NULL, 0);
    atomic_store(sleeping, 0);
  }
}

/* N round trips as a Pool's owner and worker hand tasks over: words 0
 * and 1 as futex_pingpong's, words 2 and 3 say that side 0 (the worker)
 * or side 1 (the owner) sleeps. */
static int futex_poll_pingpong(long n) {
  _Atomic uint32_t *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  double t0;
  if (w == MAP_FAILED) return 1;
  if (fork() == 0) {
    for (uint32_t i = 1; i <= (uint32_t)n; i++) {
      fwait_flagged(&w[0], i - 1, &w[2], 10000);
      atomic_store(&w[1], i);
      if (atomic_load(&w[3])) fwake(&w[1]);
    }
    _exit(0);
  }
  t0 = now();
  for (uint32_t i = 1; i <= (uint32_t)n; i++) {
    atomic_store(&w[0], i);
    if (atomic_load(&w[2])) fwake(&w[0]);
    fwait_flagged(&w[1], i - 1, &w[3], 0);
  }
  report("c.futex_poll_pingpong", now() - t0, (double)n, "roundtrips/s");
  wait(NULL);
  return 0;
}

static int futex_pingpong(long n) {
  _Atomic uint32_t *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  double t0;
  if (w == MAP_FAILED) return 1;
  if (fork() == 0) {
    for (uint32_t i = 1; i <= (uint32_t)n; i++) {
      fwait(&w[0], i - 1);
      atomic_store(&w[1], i);
      fwake(&w[1]);
    }
    _exit(0);
  }
  t0 = now();
  for (uint32_t i = 1; i <= (uint32_t)n; i++) {
    atomic_store(&w[0], i);
    fwake(&w[0]);
    fwait(&w[1], i - 1);
  }
  report("c.futex_pingpong", now() - t0, (double)n, "roundtrips/s");
  wait(NULL);
  return 0;
}

static int full_read(int fd, char *p, size_t n) {
  while (n) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static int full_write(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t r = write(fd, p, n);
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* The Lua workload's task: x = x + i % 7 for i = 1..k. */
static unsigned long spin(unsigned long k) {
  volatile unsigned long x = 0;
  for (unsigned long i = 1; i <= k; i++) x = x + i % 7;
  return x;
}

/* Runs 8 tasks of spin(k) in w processes, each taking the next task from
 * a counter in shared memory (as pool workers take them from a queue);
 * returns the seconds from the first fork to the last wait. */
static double run_tasks(_Atomic long *next, int w, unsigned long k) {
  double t0 = now();
  atomic_store(next, 0);
  for (int p = 0; p < w; p++) {
    if (fork() == 0) {
      while (atomic_fetch_add(next, 1) < 8) spin(k);
      _exit(0);
    }
  }
  for (int p = 0; p < w; p++) wait(NULL);
  return now() - t0;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The speed-up of 2 processes over 1 on 8 tasks of ~60 ms each. */
static int cpu_speedup(void) {
  _Atomic long *next = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  unsigned long k = 1;
  double ratios[5];
  if (next == MAP_FAILED) return 1;
  for (;;) {                       /* size one task to ~60 ms here */
    double t0;
    k *= 2;
    t0 = now();
    spin(k);
    if (now() - t0 > 0.06) break;
  }
  for (int r = 0; r < 5; r++) {
    double t1 = run_tasks(next, 1, k);
    ratios[r] = t1 / run_tasks(next, 2, k);
  }
  qsort(ratios, 5, sizeof ratios[0], cmp_double);
  report("c.cpu_speedup_2p", 1.0, ratios[2], "x");
  return 0;
}

/* N round trips of an 8-byte message between two processes: over two
 * pipes (one each way) or one socketpair. */
static int pingpong(long n, int pipes) {
  int up[2], down[2];       /* parent writes up[1], child writes down[1] */
  char msg[8] = {0, 0, 0, 4, 1, 2, 3, 4};
  double t0;
  if (pipes) {
    if (pipe(up) != 0 || pipe(down) != 0) return 1;
  } else {
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, up) != 0) return 1;
    down[0] = up[1];       /* each end reads and writes its own socket */
    down[1] = up[0];
  }
  if (fork() == 0) {
    char buf[8];
    close(up[1]);
    if (pipes) close(down[0]);
    while (full_read(up[0], buf, 8) == 0 && full_write(down[1], buf, 8) == 0) {}
    _exit(0);
  }
  close(up[0]);
  if (pipes) close(down[1]);
  t0 = now();
  for (long i = 0; i < n; i++) {
    char buf[8];
    if (full_write(up[1], msg, 8) || full_read(down[0], buf, 8)) return 1;
  }
  report(pipes ? "c.pipe_pingpong" : "c.socketpair_pingpong", now() - t0,
         (double)n, "roundtrips/s");
  close(up[1]);
  if (pipes) close(down[0]);
  wait(NULL);
  return 0;
}

/* MIB MiB in 1 MiB writes from parent to child, then a 1-byte reply:
 * over a pipe grown to 1 MiB (as luamp's Pipe grows its pipes; a second
 * pipe for the reply) or one socketpair. */
static int stream(long mib, int pipes) {
  size_t sz = 1 << 20;
  char *buf = malloc(sz);
  int up[2], down[2];
  double t0;
  if (buf == NULL) return 1;
  if (pipes) {
    if (pipe(up) != 0 || pipe(down) != 0) return 1;
    (void)fcntl(up[1], F_SETPIPE_SZ, 1 << 20);
  } else {
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, up) != 0) return 1;
    down[0] = up[1];
    down[1] = up[0];
  }
  memset(buf, 7, sz);
  if (fork() == 0) {
    close(up[1]);
    if (pipes) close(down[0]);
    for (long i = 0; i < mib; i++)
      if (full_read(up[0], buf, sz)) _exit(1);
    if (full_write(down[1], "k", 1)) _exit(1);
    _exit(0);
  }
  close(up[0]);
  if (pipes) close(down[1]);
  t0 = now();
  for (long i = 0; i < mib; i++)
    if (full_write(up[1], buf, sz)) return 1;
  if (full_read(down[0], buf, 1)) return 1;
  report(pipes ? "c.pipe_stream" : "c.socketpair_stream", now() - t0,
         (double)mib, "MiB/s");
  wait(NULL);
  free(buf);
  return 0;
}

/* fork_mem: see the header.  The mappings are separate (PROT_NONE guard
 * pages between them keep the kernel from merging them), each touched
 * page by page so that each is private and mapped. */
/* fork_touch: see the header.  Each child times its own reads (the
 * clock read once before, so that its own pages are not in the timing)
 * into a shared page; the median of the N children is reported as pages
 * a fresh child reads per second (cmp_double: see cpu_speedup). */
static int fork_touch(long r, long n) {
  long pages = r > 0 ? r : 1;
  volatile char *m = mmap(NULL, (size_t)pages * 4096, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  double *per = mmap(NULL, (size_t)(n > 0 ? n : 1) * sizeof *per,
                     PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  double t0;
  if (m == MAP_FAILED || per == MAP_FAILED || r < 1 || n < 1) return 1;
  for (long i = 0; i < pages; i++) m[i * 4096] = 1;
  t0 = now();
  for (long i = 0; i < n; i++) {
    int st;
    pid_t pid = fork();
    if (pid == 0) {
      char sum = 0;
      double a, b;
      per[i] = 0;           /* (its page and the clock's, before timing) */
      a = now();
      for (long k = 0; k < r; k++) sum = (char)(sum + m[k * 4096]);
      b = now();
      per[i] = (b - a) / (double)r;
      _exit(sum == 0);
    }
    waitpid(pid, &st, 0);
  }
  t0 = now() - t0;
  qsort(per, (size_t)n, sizeof *per, cmp_double);
  report("c.child_page_read", t0, t0 / (per[n / 2] > 0 ? per[n / 2] : 1e-9),
         "pages/s");
  return 0;
}

static int fork_mem(long kib, long vmas, long w, long n) {
  long pages = kib / 4, per;
  char **map;
  double t0;
  if (vmas < 1) vmas = 1;
  per = pages / vmas + 1;
  map = calloc((size_t)vmas, sizeof *map);
  if (map == NULL) return 1;
  for (long v = 0; v < vmas; v++) {
    char *m = mmap(NULL, (size_t)(per + 1) * 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 1;
    if (mprotect(m + per * 4096, 4096, PROT_NONE) != 0) return 1;
    for (long i = 0; i < per; i++) m[i * 4096] = 1;
    map[v] = m;
  }
  t0 = now();
  for (long i = 0; i < n; i++) {
    int st;
    pid_t pid = fork();
    if (pid == 0) {
      for (long k = 0; k < w; k++) map[k % vmas][(k / vmas % per) * 4096] = 2;
      _exit(0);
    }
    for (long k = 0; k < w; k++) map[k % vmas][(k / vmas % per) * 4096] = 3;
    waitpid(pid, &st, 0);
  }
  report(w ? "c.fork_mem_writes" : "c.fork_mem", now() - t0, (double)n,
         "procs/s");
  return 0;
}

int main(int argc, char **argv) {
  double t0;
  if (argc >= 5 && strcmp(argv[1], "spawn") == 0) {
    long n = atol(argv[3]);
    t0 = now();
    for (long i = 0; i < n; i++) {
      int st;
      pid_t pid = fork();
      if (pid == 0) {
        execvp(argv[4], argv + 4);
        _exit(127);
      }
      waitpid(pid, &st, 0);
      if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) return 1;
    }
    report(argv[2], now() - t0, (double)n, "runs/s");
  } else if (argc == 3 && strcmp(argv[1], "fork") == 0) {
    long n = atol(argv[2]);
    t0 = now();
    for (long i = 0; i < n; i++) {
      int st;
      pid_t pid = fork();
      if (pid == 0) _exit(0);
      waitpid(pid, &st, 0);
    }
    report("c.fork_exit_wait", now() - t0, (double)n, "procs/s");
  } else if (argc == 3 && (strcmp(argv[1], "pingpong") == 0 ||
                            strcmp(argv[1], "pipes") == 0)) {
    return pingpong(atol(argv[2]), strcmp(argv[1], "pipes") == 0);
  } else if (argc == 3 && (strcmp(argv[1], "stream") == 0 ||
                            strcmp(argv[1], "pipestream") == 0)) {
    return stream(atol(argv[2]), strcmp(argv[1], "pipestream") == 0);
  } else if (argc == 3 && strcmp(argv[1], "fork_pidfd") == 0) {
    long n = atol(argv[2]);
    t0 = now();
    for (long i = 0; i < n; i++) {
      int st, fd;
      pid_t pid = fork();
      if (pid == 0) _exit(0);
      fd = (int)syscall(SYS_pidfd_open, pid, 0);
      if (fd >= 0) {
        struct pollfd q = {fd, POLLIN, 0};
        poll(&q, 1, -1);
        close(fd);
      }
      waitpid(pid, &st, 0);
    }
    report("c.fork_pidfd_wait", now() - t0, (double)n, "procs/s");
  } else if (argc == 4 && strcmp(argv[1], "fork_touch") == 0) {
    return fork_touch(atol(argv[2]), atol(argv[3]));
  } else if (argc == 6 && strcmp(argv[1], "fork_mem") == 0) {
    return fork_mem(atol(argv[2]), atol(argv[3]), atol(argv[4]), atol(argv[5]));
  } else if (argc == 3 && strcmp(argv[1], "futex") == 0) {
    return futex_pingpong(atol(argv[2]));
  } else if (argc == 3 && strcmp(argv[1], "futex_poll") == 0) {
    return futex_poll_pingpong(atol(argv[2]));
  } else if (argc == 2 && strcmp(argv[1], "speedup") == 0) {
    return cpu_speedup();
  } else if ((argc == 3 || argc == 4) && strcmp(argv[1], "burn") == 0) {
    double until = now() + atof(argv[2]);
    pid_t watch = argc == 4 ? (pid_t)atol(argv[3]) : 0;
    volatile unsigned long x = 0;
    /* (ends with the process watched: a Ctrl-C'd make bench leaves no
     * burner behind) */
    while (now() < until && (watch == 0 || kill(watch, 0) == 0))
      for (int i = 0; i < 1000000; i++) x = x + 1;
  } else {
    fprintf(stderr, "usage: bench_probes spawn NAME N CMD...|fork N|"
                    "pipes N|pingpong N|stream MIB|pipestream MIB|futex N|futex_poll N|"
                    "fork_pidfd N|fork_mem KIB VMAS W N|fork_touch R N|speedup|"
                    "burn SECS [PID]\n");
    return 2;
  }
  return 0;
}
