/* How many reads a Pipe's receiver makes (issue 18, the 1 MiB pipe
 * stream): big messages queued back to back in a pipe are received with
 * one read each, the read of a message's tail also reading ahead the
 * next header; what is read ahead is the next message's, intact; a
 * read-ahead receive that fails is the contract's OSError.  The reads
 * are counted through the syscall table (sys.c's luamp_sys). */
#include <errno.h>
#include <sys/uio.h>

#include "internal.h"
#include "tap.h"
#include "luatest.h"

static int reads;
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_readv)(int, const struct iovec *, int);

static ssize_t counting_read(int fd, void *b, size_t n) {
  reads++;
  return real_read(fd, b, n);
}

static ssize_t counting_readv(int fd, const struct iovec *v, int n) {
  reads++;
  return real_readv(fd, v, n);
}

static void count_reads(void) {
  real_read = luamp_sys.read;
  real_readv = luamp_sys.readv;
  luamp_sys.read = counting_read;
  luamp_sys.readv = counting_readv;
  reads = 0;
}

/* Four 200 KiB messages and a small one, all in the (grown) pipe before
 * the first receive: five messages, at most six reads.  (Before the
 * read-ahead, each big message took two: its header, with the first 64
 * KiB, then its tail: nine.) */
static void test_big_messages_one_read_each(void) {
  lua_State *L = new_state();
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "a, b = mp.Pipe()\n"
               "for i = 1, 4 do\n"
               "  a:send_bytes(string.rep(string.char(96 + i), 200 * 1024))\n"
               "end\n"
               "a:send_bytes('tail')"));
  count_reads();
  CHECK(run(L, "for i = 1, 4 do\n"
               "  local s = b:recv_bytes()\n"
               "  assert(s == string.rep(string.char(96 + i), 200 * 1024),\n"
               "         'message ' .. i .. ' differs')\n"
               "end\n"
               "assert(b:recv_bytes() == 'tail')\n"
               "assert(not b:poll(0))"));
  printf("# %d reads for 5 messages\n", reads);
  CHECK(reads <= 6);
  CHECK(run(L, "a:close() b:close()"));
  lua_close(L);
}

/* A big message read ahead into recv (a decoded object), recv_bytes_into
 * and poll: each sees the bytes read ahead as the next message's. */
static void test_read_ahead_serves_every_receive(void) {
  lua_State *L = new_state();
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "a, b = mp.Pipe()\n"
               "big = string.rep('x', 300 * 1024)\n"
               "a:send_bytes(big)\n"
               "a:send({1, 'two', big})\n"
               "a:send_bytes('small')\n"
               "a:send_bytes(big)\n"
               "assert(b:recv_bytes() == big)\n"
               "assert(b:poll(0))\n"
               "local t = b:recv()\n"
               "assert(t[1] == 1 and t[2] == 'two' and t[3] == big)\n"
               "assert(b:recv_bytes() == 'small')\n"
               "local buf = mp.Array('c', 300 * 1024)\n"
               "assert(b:recv_bytes_into(buf) == 300 * 1024)\n"
               "assert(not b:poll(0))\n"
               "a:close()\n"
               "local ok, e = pcall(b.recv_bytes, b)\n"
               "assert(not ok and e.kind == 'EOFError', tostring(e))\n"
               "b:close()"));
  lua_close(L);
}

static ssize_t fail_readv(int fd, const struct iovec *v, int n) {
  (void)fd; (void)v; (void)n;
  errno = EIO;
  return -1;
}

/* The read of a big message's tail fails: OSError with the errno, and
 * the connection is broken (the message was cut), not out of step. */
static void test_readv_fails(void) {
  lua_State *L = new_state();
  CHECK(run(L, "mp = require 'multiprocessing'\n"
               "a, b = mp.Pipe()\n"
               "a:send_bytes(string.rep('x', 300 * 1024))"));
  luamp_sys.readv = fail_readv;
  CHECK(run(L, "local ok, e = pcall(b.recv_bytes, b)\n"
               "assert(not ok and e.kind == 'OSError' and e.errno == 5,\n"
               "       tostring(e and e.message))\n"
               "ok, e = pcall(b.recv_bytes, b)\n"
               "assert(not ok and e.message:find('broken'), tostring(e))\n"
               "a:close() b:close()"));
  lua_close(L);
}

int main(void) {
  static const struct tap_test tests[] = {
    {"conn: big messages queued in a pipe take one read each",
     test_big_messages_one_read_each},
    {"conn: what a big read reads ahead is the next message's, for every "
     "kind of receive", test_read_ahead_serves_every_receive},
    {"conn: a failing read of a big message's tail raises OSError and "
     "breaks the connection", test_readv_fails},
    {NULL, NULL}
  };
  return tap_run(tests);
}
