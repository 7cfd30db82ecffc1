/* C tests of sys.c: EINTR loops, reads, deadlines, and
 * the syscall table used to inject failures. */
#include <errno.h>
#include <fcntl.h>

#include "internal.h"
#include "tap.h"

static int eintr_left;
static ssize_t (*real_read)(int, void *, size_t);

/* Fails with EINTR a few times, then reads. */
static ssize_t flaky_read(int fd, void *buf, size_t n) {
  if (eintr_left > 0) { eintr_left--; errno = EINTR; return -1; }
  return real_read(fd, buf, n);
}

static void test_read_survives_eintr(void) {
  int p[2];
  char out[16] = {0};
  CHECK(pipe2(p, O_CLOEXEC) == 0);
  CHECK(write(p[1], "hello", 5) == 5);
  real_read = luamp_sys.read;
  luamp_sys.read = flaky_read;
  eintr_left = 3;
  CHECK(luamp_robust_read(p[0], out, sizeof out) == 5);
  CHECK(eintr_left == 0);
  CHECK(memcmp(out, "hello", 5) == 0);
}

static void test_deadlines(void) {
  double t0 = luamp_now();
  double d = luamp_deadline(0.05);
  CHECK(luamp_deadline(-1) < 0);
  CHECK(luamp_remaining_ms(-1, -1) == -1);
  CHECK(luamp_remaining_ms(-1, 100) == 100);
  CHECK(luamp_remaining_ms(d, -1) > 0);
  CHECK(luamp_remaining_ms(d, -1) <= 50);
  CHECK(luamp_robust_poll(NULL, NULL, 0, d) == 0);
  CHECK(luamp_now() - t0 >= 0.049);
  CHECK(luamp_now() - t0 < 0.5);
  CHECK(luamp_remaining_ms(d, -1) == 0);
}

static void on_alarm(int sig) { (void)sig; }

static void test_poll_resumes_after_a_signal(void) {
  struct sigaction sa;
  double t0;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_alarm;
  sigaction(SIGALRM, &sa, NULL);   /* no SA_RESTART: poll sees EINTR */
  ualarm(20000, 0);
  t0 = luamp_now();
  CHECK(luamp_robust_poll(NULL, NULL, 0, luamp_deadline(0.1)) == 0);
  CHECK(luamp_now() - t0 >= 0.099);
}

static const struct tap_test tests[] = {
  {"robust_read survives EINTR", test_read_survives_eintr},
  {"deadlines", test_deadlines},
  {"poll resumes after a signal", test_poll_resumes_after_a_signal},
  {NULL, NULL}
};

int main(void) { return tap_run(tests); }
