/*
 * conn.c -- Pipe and Connection: framed messages over a socket or pipe,
 * Listener/Client over TCP and Unix sockets, CPython's HMAC handshake,
 * and the poll behind mp.wait.
 *
 * The wire format is CPython's multiprocessing.connection: each message
 * is a 4-byte big-endian signed length and the payload; payloads longer
 * than 2^31-1 bytes have the length -1 followed by an 8-byte big-endian
 * length.  send(v) writes the codec's encoding of v; the codec leaves
 * headroom in front of it so that header and payload leave in one write.
 *
 * A message is read whole or not at all: an end of file inside one is an
 * error, never a short value.  A transfer cut in the middle (Ctrl-C, a
 * timeout, a length beyond maxlength) leaves the byte stream out of step,
 * so the connection is then marked broken in that direction and later
 * calls say so instead of reading garbage.
 *
 * fds are close-on-exec and blocking; waits go through poll with the
 * process's interrupt check.  A Connection owns one fd in one process --
 * two for a duplex Pipe, which is two pipes, one each way (see l_pipe):
 * it reads the first and writes the second.  After a fork, each process
 * closes its own copies, which never affects the other's, so connections
 * need no owner pid.  A Listener on a Unix path
 * does: only the process that bound the path unlinks it.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <dlfcn.h>

#include <openssl/evp.h>    /* types only: libcrypto is loaded on first use */

#include "internal.h"

#define CONN_TNAME "multiprocessing.Connection"
#define LISTENER_TNAME "multiprocessing.Listener"

#define HEADROOM 12             /* -1 marker + 8-byte length */
#define RA_SIZE 65536           /* read-ahead: a small message costs one read */
#define KEEP_RBUF (4u << 20)    /* receive buffer kept between messages */
/* The most a Pipe's pipe grows to (Linux's default pipe-max-size for an
 * unprivileged process), on its first message bigger than its 64 KiB:
 * a message up to a MiB then goes out in one write, without the sender
 * and the receiver taking turns at 64 KiB.  Only then: the kernel
 * counts pipe pages per user, and past pipe-user-pages-soft every new
 * pipe of the user gets two pages. */
#define PIPE_MAXSZ (1 << 20)
#define GROW_STEP (64u << 20)   /* trust a claimed length this far at once */
#define HANDSHAKE_MAX 256       /* CPython's cap on a handshake message */
/* the handshake's messages (see "HMAC challenge" below) */
#define CHALLENGE "#CHALLENGE#"
#define WELCOME "#WELCOME#"
#define FAILURE "#FAILURE#"

/* ---- Connection handles ---------------------------------------------- */

static struct luamp_type conn_type, listener_type;   /* (at the end) */

struct conn {
  int fd;                 /* -1 once closed; the read end of a pair */
  int wfd;                /* a pair's write end (-1 once closed) */
  unsigned pair : 1;      /* a duplex Pipe: reads fd, writes wfd */
  unsigned ispipe : 1;    /* it writes a pipe of its Pipe (grown once) */
  unsigned grown : 1;     /* ...which has been grown (or could not be) */
  unsigned readable : 1, writable : 1;
  unsigned trusted : 1;   /* decode code payloads: pipes, authenticated peers */
  unsigned peer : 1;      /* untrusted, a keyless manager's: its proxies made */
  unsigned rbroken : 1;   /* a message was cut off mid-read */
  unsigned wbroken : 1;   /* a message was cut off mid-write */
  unsigned nofence : 1;   /* a manager client's own: sends are not sync
                             points (fence.c) */
  unsigned spin : 1;      /* a manager client's own: polls before a
                             receive sleeps (see spin_read) */
  unsigned rnb : 1;       /* a manager server's pipe: fd made O_NONBLOCK
                             (serve_one), read_nowait reads it at once */
  char *ra;               /* read-ahead buffer (RA_SIZE bytes) */
  size_t rpos, rend;      /* its unread bytes: ra[rpos..rend) */
  pid_t rpid;             /* the process that read them (see ra_check) */
  char *rbuf;             /* buffer for payloads beyond RA_SIZE */
  size_t rcap;
  char *sblock;           /* recv_bytes: a Lua string's block being filled */
  size_t scap;            /* (room for scap payload bytes; see STRING_AT) */
  /* non-blocking receive (frame_nowait): a message whose header was
   * read; nb_got of its nb_len bytes are in rbuf (when > RA_SIZE) */
  unsigned nb : 1;
  size_t nb_len, nb_got;
  /* fd passing (see "passing fds"): an AF_UNIX socket carries them */
  unsigned unixsock : 1;
  int *inq;               /* fd sets received, unclaimed: count, fds... */
  size_t inq_len, inq_cap;
  pid_t inq_pid;          /* the process that received them */
  /* serve mode (a manager server's client): the bytes its fd did not
   * take, wq[wq_pos..wq_len) (see "a server's writes") */
  unsigned srv : 1;
  char *wq;
  size_t wq_pos, wq_len, wq_cap;
};

static struct conn *new_conn(lua_State *L) {
  struct conn *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  c->fd = c->wfd = -1;                /* created closed */
  luaL_setmetatable(L, CONN_TNAME);
  return c;
}

static struct conn *check_conn(lua_State *L, int idx) {
  struct conn *c = luamp_self(L, idx, &conn_type);
  if (c->fd < 0) luamp_raise(L, "OSError", "connection is closed");
  return c;
}

static struct conn *check_readable(lua_State *L, int idx) {
  struct conn *c = check_conn(L, idx);
  if (!c->readable) luamp_raise(L, "OSError", "connection is write-only");
  if (c->rbroken)
    luamp_raise(L, "OSError", "connection is broken: an earlier receive "
                "stopped in the middle of a message");
  return c;
}

static struct conn *check_writable(lua_State *L, int idx) {
  struct conn *c = check_conn(L, idx);
  if (!c->writable) luamp_raise(L, "OSError", "connection is read-only");
  if (c->wbroken)
    luamp_raise(L, "BrokenPipeError", "connection is broken: an earlier "
                "send stopped in the middle of a message");
  return c;
}

/* the fd c writes */
#define WFD(c) ((c)->pair ? (c)->wfd : (c)->fd)

static void inq_drop(struct conn *c);

static void sblock_free(lua_State *L, struct conn *c);

static int conn_close(lua_State *L) {
  struct conn *c = luamp_self(L, 1, &conn_type);
  int fd = c->fd, wfd = c->pair ? c->wfd : -1;
  c->fd = c->wfd = -1;                /* closed before the fds go */
  if (fd >= 0) luamp_sys.close(fd);
  if (wfd >= 0) luamp_sys.close(wfd);
  free(c->rbuf);
  c->rbuf = NULL;
  c->rcap = 0;
  sblock_free(L, c);
  free(c->ra);
  c->ra = NULL;
  c->rpos = c->rend = 0;
  inq_drop(c);
  free(c->wq);
  c->wq = NULL;
  c->wq_pos = c->wq_len = c->wq_cap = 0;
  return 0;
}

/* ---- waiting and moving bytes ---------------------------------------- */

/* Waits until fd is ready for events or the deadline passes; raises
 * "interrupted!" or TimeoutError (marking the stream broken when a
 * message is half moved). */
static void wait_fd(lua_State *L, struct conn *c, short events,
                    double deadline, int midway) {
  struct pollfd p = {events & POLLOUT ? WFD(c) : c->fd, events, 0};
  int r = luamp_robust_poll(L, &p, 1, deadline);
  if (r > 0) return;
  if (midway) {
    if (events & POLLIN) c->rbroken = 1;
    else c->wbroken = 1;
  }
  if (r == -2) luamp_raise_interrupt(L);
  if (r == 0) luamp_raise(L, "TimeoutError", "timed out");
  luamp_raise_errno(L, "OSError", errno, "poll");
}

/* ---- a server's writes: never waiting on one client -----------------

   A manager server answers every client from one loop, so a client that
   stops reading its answers (stopped by SIGSTOP, or one that only sends)
   and lets its socket fill would stall all the others behind one
   blocking write.  A connection in serve mode (conn:_serve_mode(): its
   write fd non-blocking) never waits to write: what the fd does not take
   is queued in the connection, in order, and the server polls the fd
   for writability and calls conn:_flush_out() -- reading nothing more
   from that client meanwhile (manager_server.lua), so the queue holds
   the answers to what it had read.  An answer always queues whole (a
   big value is no fault); more behind queued bytes only up to WQ_MAX,
   beyond which the send raises and the server drops that client.  A
   message that carries fds is sent after the queue, waiting for it at
   most SRV_FD_WAIT seconds. */
#define WQ_MAX ((size_t)64 << 20)
#define WQ_KEEP ((size_t)1 << 20)   /* a bigger queue buffer is freed once empty */
#define SRV_FD_WAIT 5.0

static size_t wq_left(const struct conn *c) { return c->wq_len - c->wq_pos; }

/* Room for n more bytes at wq + wq_len: 0 when out of memory, or when
 * bytes are queued already and n more would pass WQ_MAX (errno ENOBUFS). */
static int wq_reserve(struct conn *c, size_t n) {
  size_t left = wq_left(c), cap;
  char *q;
  errno = ENOBUFS;
  if (left > 0 && n > WQ_MAX - (left < WQ_MAX ? left : WQ_MAX)) return 0;
  if (c->wq_pos > 0) {
    memmove(c->wq, c->wq + c->wq_pos, left);
    c->wq_pos = 0;
    c->wq_len = left;
  }
  if (c->wq_len + n <= c->wq_cap) return 1;
  for (cap = c->wq_cap ? c->wq_cap : 65536; cap < c->wq_len + n; cap *= 2) {}
  if ((q = realloc(c->wq, cap)) == NULL) return 0;
  c->wq = q;
  c->wq_cap = cap;
  return 1;
}

/* Writes what the fd takes of the queue: 0 when it is empty, 1 when
 * some is left, -1 on an error (errno; EPIPE: the client is gone). */
static int wq_flush(struct conn *c) {
  while (wq_left(c) > 0) {
    ssize_t w = luamp_sys.write(WFD(c), c->wq + c->wq_pos, wq_left(c));
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK ? 1 : -1;
    }
    c->wq_pos += (size_t)w;
  }
  c->wq_pos = c->wq_len = 0;
  if (c->wq_cap > WQ_KEEP) {
    free(c->wq);
    c->wq = NULL;
    c->wq_cap = 0;
  }
  return 0;
}

/* Writes or queues the iovec (serve mode): 1 when done, 0 when nothing
 * was written and it cannot be (errno), -1 when a part was written and
 * the rest cannot be queued (the stream is then broken). */
static int srv_write(struct conn *c, const struct iovec *iov, int n) {
  size_t w = 0, total = 0, rest;
  for (int i = 0; i < n; i++) total += iov[i].iov_len;
  if (wq_left(c) == 0) {
    ssize_t r;
    do r = luamp_sys.writev(WFD(c), iov, n); while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return 0;
    if (r > 0) w = (size_t)r;
    if (w == total) return 1;
  }
  rest = total - w;
  if (!wq_reserve(c, rest)) {
    if (w == 0) return 0;
    c->wbroken = 1;
    return -1;
  }
  for (int i = 0; i < n; i++) {
    size_t len = iov[i].iov_len;
    if (w >= len) {
      w -= len;
      continue;
    }
    memcpy(c->wq + c->wq_len, (const char *)iov[i].iov_base + w, len - w);
    c->wq_len += len - w;
    w = 0;
  }
  return 1;
}

/* srv_write, raising its failures. */
static void srv_write_all(lua_State *L, struct conn *c, struct iovec *iov,
                          int n) {
  size_t left = wq_left(c);
  if (srv_write(c, iov, n) == 1) return;
  if (errno == ENOBUFS)
    luamp_raise(L, "OSError", "the peer reads none of its answers (%zu bytes "
                "wait for it)", left);
  luamp_raise_errno(L, "OSError", errno, "send");
}

/* Writes the queue out before a message that must not be queued (one
 * carrying fds), waiting at most SRV_FD_WAIT. */
static void srv_settle(lua_State *L, struct conn *c) {
  double deadline = luamp_deadline(SRV_FD_WAIT);
  for (;;) {
    int r = wq_flush(c);
    if (r == 0) return;
    if (r < 0) {
      c->wbroken = 1;
      luamp_raise_errno(L, "OSError", errno, "send");
    }
    wait_fd(L, c, POLLOUT, deadline, 1);
  }
}

/* conn:_serve_mode() -> the fd to poll for writability.  From now on
 * the connection never waits to write (see above). */
static int conn_serve_mode(lua_State *L) {
  struct conn *c = check_writable(L, 1);
  int fl = luamp_sys.fcntl(WFD(c), F_GETFL, 0);
  if (fl < 0 || luamp_sys.fcntl(WFD(c), F_SETFL, fl | O_NONBLOCK) < 0)
    luamp_raise_errno(L, "OSError", errno, "fcntl");
  c->srv = 1;
  lua_pushinteger(L, WFD(c));
  return 1;
}

/* conn:_flush_out() -> the bytes still queued (0: all written); raises
 * when the peer is gone. */
static int conn_flush_out(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  if (wq_flush(c) < 0) {
    c->wbroken = 1;
    luamp_raise_errno(L, "OSError", errno, "send");
  }
  lua_pushinteger(L, (lua_Integer)wq_left(c));
  return 1;
}

/* Writes the whole iovec.  A peer that is gone gives BrokenPipeError. */
static void write_all(lua_State *L, struct conn *c, struct iovec *iov,
                      int n, double deadline) {
  size_t sent = 0;
  if (c->srv) {
    srv_write_all(L, c, iov, n);
    return;
  }
  if (c->ispipe && !c->grown) {       /* a big message: the pipe grows */
    size_t total = 0;
    for (int i = 0; i < n; i++) total += iov[i].iov_len;
    if (total > 65536) {
      c->grown = 1;                     /* (a failure only costs speed) */
      (void)luamp_sys.fcntl(WFD(c), F_SETPIPE_SZ, PIPE_MAXSZ);
    }
  }
  while (n > 0) {
    ssize_t w;
    if (deadline >= 0) wait_fd(L, c, POLLOUT, deadline, sent > 0);
    w = luamp_sys.writev(WFD(c), iov, n);
    if (w < 0) {
      int err = errno;
      if (err == EINTR) {
        if (luamp_interrupted(L)) {
          if (sent) c->wbroken = 1;
          luamp_raise_interrupt(L);
        }
        continue;
      }
      if (err == EAGAIN || err == EWOULDBLOCK) {
        wait_fd(L, c, POLLOUT, deadline, sent > 0);
        continue;
      }
      if (sent) c->wbroken = 1;
      luamp_raise_errno(L, "OSError", err, "send");  /* EPIPE: broken */
    }
    sent += (size_t)w;
    while (n > 0 && (size_t)w >= iov->iov_len) {
      w -= (ssize_t)iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (char *)iov->iov_base + w;
      iov->iov_len -= (size_t)w;
      if (luamp_interrupted(L)) {   /* a short write woken by Ctrl-C */
        c->wbroken = 1;
        luamp_raise_interrupt(L);
      }
    }
  }
}

static ssize_t recv_fds(struct conn *c, char *p, size_t n, int flags);
static void fds_discard(struct conn *c, const char *p, size_t n);

/* How long a receive polls before it sleeps (spin_read, l_wait_fds). */
#define CONN_SPIN_NS 30000
static int spin_always;   /* core._set_spin(true): tests poll in any state */

/* Polls fds for up to CONN_SPIN_NS while no other process waits for this
 * one's CPU (luamp_cpus_free): poll's count when one is ready (their
 * revents filled in), -1 when poll failed (the caller's read or poll
 * says how), 0 when the time passed first or a Ctrl-C came.  For request/answer traffic (issue 18): the manager
 * answers a client in ~10-15 us, and a client's next request follows its
 * answer as fast; a read or poll that finds the bytes there costs no
 * sleep and no wake-up, which cost more than the request itself (the
 * floor of two C processes ping-ponging 8 bytes over pipes: 20 us a round
 * trip; over a futex they do not sleep on: 8 us).  With a CPU taken by
 * another program the peer waits for one, and polling is in its way: no
 * poll then. */
static int spin_ready(lua_State *L, struct pollfd *fds, nfds_t n) {
  double until;
  if (!spin_always && !luamp_cpus_free()) return 0;
  until = luamp_now() + CONN_SPIN_NS * 1e-9;
  do {
    int r = luamp_sys.poll(fds, n, 0);
    if (r > 0) return r;
    if (r < 0 && errno != EINTR) return -1;
    if (luamp_interrupted(L)) return 0;
    luamp_cpu_relax();
  } while (luamp_now() < until);
  return 0;
}

/* A spinning connection's wait for the start of a message (c->spin: a
 * manager client's, whose answer is on its way): the bytes read (as
 * read_once), or -1 when none came while it polled.  On a trusted Unix
 * socket the poll is the non-blocking receive itself (a system call less
 * when the answer is there). */
static ssize_t spin_read(lua_State *L, struct conn *c, char *p, size_t n) {
  struct pollfd pf = {c->fd, POLLIN, 0};
  double until;
  if (!(c->unixsock && c->trusted)) {
    (void)spin_ready(L, &pf, 1);
    return -1;
  }
  if (!spin_always && !luamp_cpus_free()) return -1;
  until = luamp_now() + CONN_SPIN_NS * 1e-9;
  do {
    ssize_t r = recv_fds(c, p, n, MSG_DONTWAIT);
    if (r >= 0) return r;
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      return -1;                      /* (the blocking read reports it) */
    if (luamp_interrupted(L)) return -1;
    luamp_cpu_relax();
  } while (luamp_now() < until);
  return -1;
}

/* One read(2) of at most n bytes: returns the count, 0 at end of file;
 * raises on errors, interrupts and the deadline.  midway says whether a
 * message is half read (an interrupt then breaks the stream).  With
 * more (not on a socket that carries fds), one readv(2) fills p and
 * then more, RA_SIZE bytes (see read_all). */
static size_t read_once2(lua_State *L, struct conn *c, char *p, size_t n,
                         char *more, double deadline, int midway) {
  struct iovec iov[2] = {{p, n}, {more, RA_SIZE}};
  if (c->spin && !midway && deadline < 0) {
    ssize_t r = spin_read(L, c, p, n);
    if (r >= 0) return (size_t)r;    /* (0: end of file) */
    /* (a Ctrl-C while polling: raised here, not after the read) */
    if (luamp_interrupted(L)) luamp_raise_interrupt(L);
  }
  for (;;) {
    ssize_t r;
    if (deadline >= 0) wait_fd(L, c, POLLIN, deadline, midway);
    r = c->unixsock && c->trusted ? recv_fds(c, p, n, 0)
        : more != NULL ? luamp_sys.readv(c->fd, iov, 2)
                       : luamp_sys.read(c->fd, p, n);
    if (r >= 0) return (size_t)r;
    if (errno == EINTR) {
      if (luamp_interrupted(L)) {
        if (midway) c->rbroken = 1;
        luamp_raise_interrupt(L);
      }
      continue;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_fd(L, c, POLLIN, deadline, midway);
      continue;
    }
    if (errno == ECONNRESET) return 0;   /* the peer is gone: end of file */
    if (midway) c->rbroken = 1;
    luamp_raise_errno(L, "OSError", errno, "recv");
  }
}

static size_t read_once(lua_State *L, struct conn *c, char *p, size_t n,
                        double deadline, int midway) {
  return read_once2(L, c, p, n, NULL, deadline, midway);
}

/* Bytes read ahead belong to the process that read them from the fd: a
 * forked child's copy of them was consumed by its parent, so it drops
 * them and reads the fd afresh. */
static void ra_check(struct conn *c) {
  if (c->rpos < c->rend && c->rpid != luamp_pid()) c->rpos = c->rend = 0;
  if (c->inq_len > 0 && c->inq_pid != luamp_pid()) inq_drop(c);
}

static void ra_alloc(lua_State *L, struct conn *c) {
  if (c->ra == NULL && (c->ra = malloc(RA_SIZE)) == NULL)
    luamp_raise(L, "OSError", "not enough memory");
}

static void eof_midway(lua_State *L, struct conn *c) {
  c->rbroken = 1;
  luamp_raise(L, "OSError", "got end of file during message");
}

/* Reads exactly n bytes (buffered).  Returns 1 on an end of file before
 * the first byte when the message has not started (midway == 0); any
 * other end of file is an error.
 *
 * A big read goes straight into place, and the same readv(2) reads
 * ahead into c->ra what follows (on a pipe: the next message's header
 * and first bytes).  A 1 MiB message and its 4-byte header do not fit
 * a 1 MiB pipe (the largest an unprivileged process gets), so a stream
 * of them never ends a read at a message's end: each message took a
 * read for its tail and another for the next header (strace -f: 2-3
 * reads a message; the C probe's 1 MiB units, one).  Read ahead, the
 * tail and the next header come in one read. */
static int read_all(lua_State *L, struct conn *c, char *p, size_t n,
                    double deadline, int midway) {
  size_t got = 0;
  ra_check(c);
  if (c->rpos < c->rend) {
    got = c->rend - c->rpos < n ? c->rend - c->rpos : n;
    memcpy(p, c->ra + c->rpos, got);
    c->rpos += got;
  }
  while (got < n) {
    size_t r;
    if (n - got >= RA_SIZE / 2) {   /* big: straight into place */
      char *more = NULL;
      if (!(c->unixsock && c->trusted)) {
        ra_alloc(L, c);
        more = c->ra;
      }
      r = read_once2(L, c, p + got, n - got, more, deadline, midway || got);
      if (r == 0) {
        if (!midway && got == 0) return 1;
        eof_midway(L, c);
      }
      if (r > n - got) {            /* read ahead (c->ra was empty) */
        c->rpos = 0;
        c->rend = r - (n - got);
        c->rpid = luamp_pid();
        r = n - got;
      }
      got += r;
      continue;
    }
    ra_alloc(L, c);
    c->rpos = c->rend = 0;
    r = read_once(L, c, c->ra, RA_SIZE, deadline, midway || got);
    if (r == 0) {
      if (!midway && got == 0) return 1;
      eof_midway(L, c);
    }
    c->rend = r;
    c->rpid = luamp_pid();
    r = r < n - got ? r : n - got;
    memcpy(p + got, c->ra, r);
    c->rpos = r;
    got += r;
  }
  return 0;
}

/* The next n bytes (n <= RA_SIZE) of a started message, contiguous in
 * the read-ahead buffer; valid until the next read on c. */
static const char *read_view(lua_State *L, struct conn *c, size_t n,
                             double deadline) {
  const char *p;
  ra_check(c);
  if (c->rend - c->rpos < n) {
    ra_alloc(L, c);
    memmove(c->ra, c->ra + c->rpos, c->rend - c->rpos);
    c->rend -= c->rpos;
    c->rpos = 0;
    while (c->rend < n) {
      size_t r = read_once(L, c, c->ra + c->rend, RA_SIZE - c->rend,
                           deadline, 1);
      if (r == 0) eof_midway(L, c);
      c->rend += r;
      c->rpid = luamp_pid();
    }
  }
  p = c->ra + c->rpos;
  c->rpos += n;
  return p;
}

/* Reads one header: the payload length, or raises EOFError when the
 * peer has closed and nothing is left. */
static uint64_t read_header(lua_State *L, struct conn *c, double deadline) {
  unsigned char h[8];
  uint32_t n32;
  uint64_t n = 0;
  if (read_all(L, c, (char *)h, 4, deadline, 0))
    luamp_raise(L, "EOFError", "the peer closed the connection");
  n32 = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
  if (n32 == 0xffffffffu) {
    read_all(L, c, (char *)h, 8, deadline, 1);
    for (int i = 0; i < 8; i++) n = n << 8 | h[i];
  } else if (n32 & 0x80000000u) {
    c->rbroken = 1;
    luamp_raise(L, "OSError", "bad message length: negative length %d in "
                "the header", (int)(int32_t)n32);
  } else {
    n = n32;
  }
  return n;
}

/* A big block is a fresh mmap of glibc's (beyond its largest mmap
 * threshold, 32 MiB), every 4 KiB page of it faulted in anew: on this
 * kind of VM ~17 us a fault, a 64 MiB message ~0.3 s (the message-size
 * curve fell from ~1.8 GiB/s at 4 MiB to ~120-190 MiB/s at 64 MiB, issue
 * 18).  Transparent huge pages where the kernel gives them on request
 * (THP "madvise") take 512 times fewer faults: touching 64 MiB took 6-11
 * ms instead of 250-500.  Advice only: a kernel without them says no. */
#define HUGE_MIN (32u << 20)
#define HUGE_PAGE ((uintptr_t)2 << 20)
static void advise_huge(char *p, size_t n) {
  uintptr_t lo = ((uintptr_t)p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  uintptr_t hi = ((uintptr_t)p + n) & ~(HUGE_PAGE - 1);
  if (n >= HUGE_MIN && hi > lo)
    (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
}

static LUAMP_NORETURN void no_memory(lua_State *L, struct conn *c,
                                     size_t n) {
  c->rbroken = 1;
  luamp_raise(L, "OSError", "not enough memory for a message of %I bytes",
              (lua_Integer)n);
}

/* Makes room for n more bytes in c's buffer (growing it, never beyond
 * what is needed). */
static char *rbuf_reserve(lua_State *L, struct conn *c, size_t n) {
  if (n > c->rcap) {
    char *p = realloc(c->rbuf, n);
    if (p == NULL) no_memory(L, c, n);
    c->rbuf = p;
    c->rcap = n;
  }
  return c->rbuf;
}

/* ---- big payloads straight into a Lua string -----------------------------

   recv_bytes returns a message as a string.  Read into c->rbuf and then
   copied by lua_pushlstring, a big one was written twice in memory: in
   the 1 MiB pipe stream, 18% of the samples were that memmove (perf
   record, issue 18); the C probe has none.  Instead the payload is read
   into a block from the state's own allocator, at the place where a
   long string of its length keeps its bytes (string_at), and the block
   is handed to lua_pushlstring: a wrapper set with lua_setallocf returns
   it for the string's allocation -- the first one lua_pushlstring makes
   -- and puts the allocator back then, before any collection step (a
   finalizer that receives meanwhile finds the allocator as it was).
   lua_pushlstring's copy is then from the bytes to themselves, which
   glibc's memcpy skips.  string_at is learnt once, from the block one
   string gets through the same wrapper; when that does not come out as
   a long string's layout, recv_bytes copies through c->rbuf as before.
   Public API only, under luamp and under stock lua5.4: the bytes are in
   place before the string exists, and the string's block is freed by
   the allocator that made it. */

static ptrdiff_t string_at = -1;    /* -1: not learnt yet; -2: unusable */

struct handoff {
  lua_State *L;
  lua_Alloc f;              /* the state's allocator, the wrapper's for */
  char *block;              /* handed to the string (NULL: learning) */
  size_t size;              /* its size */
  char *got;                /* learning: the block the string got */
};
static struct handoff *handoff;     /* the one of the running push */

static void *handoff_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  struct handoff *h = handoff;
  if (ptr == NULL && osize == LUA_TSTRING &&
      (h->block == NULL || nsize == h->size)) {
    char *p = h->block;
    lua_setallocf(h->L, h->f, ud);  /* once: the string's own block */
    h->block = NULL;
    if (p == NULL) p = h->got = h->f(ud, NULL, osize, nsize);
    h->size = nsize;
    return p;
  }
  return h->f(ud, ptr, osize, nsize);
}

/* Pushes the n bytes at p as a string, handing it block (size bytes,
 * from the state's allocator; freed when the string did not take it)
 * or, with block NULL, noting in h the block the string got. */
static void handoff_push(lua_State *L, struct handoff *h, char *block,
                         size_t size, const char *p, size_t n) {
  void *ud;
  h->L = L;
  h->f = lua_getallocf(L, &ud);
  h->block = block;
  h->size = size;
  h->got = NULL;
  handoff = h;
  lua_setallocf(L, handoff_alloc, ud);
  lua_pushlstring(L, p, n);
  if (lua_getallocf(L, NULL) == handoff_alloc) lua_setallocf(L, h->f, ud);
  if (h->block != NULL) (void)h->f(ud, h->block, size, 0);  /* not taken */
}

/* string_at (learnt on the first call), or -2 when recv_bytes is to
 * copy: the layout is not a long string's, or a hand-off is running. */
static ptrdiff_t learn_string_at(lua_State *L) {
  if (lua_getallocf(L, NULL) == handoff_alloc) return -2;
  if (string_at == -1) {
    struct handoff h;
    char probe[200];                /* beyond any short string's length */
    memset(probe, 'x', sizeof probe);
    handoff_push(L, &h, NULL, 0, probe, sizeof probe);
    if (h.got == NULL) {
      string_at = -2;
    } else {
      ptrdiff_t at = lua_tostring(L, -1) - h.got;
      string_at = at > 0 && at <= 256 &&
                  h.size == (size_t)at + sizeof probe + 1 ? at : -2;
    }
    lua_pop(L, 1);
  }
  return string_at;
}

/* Makes room for n payload bytes in c->sblock, the block of a string of
 * n bytes, got of them there already; returns where they go.  A block
 * with huge-page advice is not grown by the allocator's realloc: the
 * advice splits glibc's mapping, which then cannot be mremapped, and
 * glibc copies it into a fresh block of 4 KiB pages (a 256 MiB message
 * got slower than before: perf record showed realloc's memcpy faulting
 * page by page).  The bytes that arrived move to a fresh, advised block
 * instead (a copy of 0.75 of a 256 MiB message, ~25 ms, against ~0.5 s
 * of 4 KiB faults on this VM). */
static char *sblock_reserve(lua_State *L, struct conn *c, size_t n,
                            size_t got) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  size_t at = (size_t)string_at, old = at + c->scap + 1;
  char *p;
  if (c->sblock != NULL && old >= HUGE_MIN) {
    p = f(ud, NULL, LUA_TSTRING, at + n + 1);
    if (p == NULL) no_memory(L, c, n);
    advise_huge(p, at + n + 1);
    memcpy(p + at, c->sblock + at, got);
    (void)f(ud, c->sblock, old, 0);
  } else {
    p = f(ud, c->sblock, c->sblock ? old : LUA_TSTRING, at + n + 1);
    if (p == NULL) no_memory(L, c, n);
    advise_huge(p, at + n + 1);
  }
  c->sblock = p;
  c->scap = n;
  return p + at;
}

static void sblock_free(lua_State *L, struct conn *c) {
  if (c->sblock != NULL) {
    void *ud;
    lua_Alloc f = lua_getallocf(L, &ud);
    (void)f(ud, c->sblock, (size_t)string_at + c->scap + 1, 0);
    c->sblock = NULL;
    c->scap = 0;
  }
}

/* Reads an n-byte payload into c->rbuf, or with tostr into c->sblock
 * (which then holds exactly n bytes).  A length claimed by the header
 * is only trusted GROW_STEP bytes at a time: a lying peer that closes
 * early costs at most that much memory, not a 2^63-byte allocation. */
static char *read_payload(lua_State *L, struct conn *c, uint64_t n,
                          double deadline, int tostr) {
  size_t got = 0, *cap = tostr ? &c->scap : &c->rcap;
  char *p = tostr ? NULL : c->rbuf;
  if (n > (uint64_t)PTRDIFF_MAX) {
    c->rbroken = 1;
    luamp_raise(L, "OSError", "bad message length: %I bytes",
                (lua_Integer)(n > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : n));
  }
  while (got < n) {
    size_t step = (size_t)n - got;
    if (step > GROW_STEP && got + step > *cap) step = GROW_STEP;
    if (got + step > *cap) {
      size_t want = got + step;
      if (got > 0 && want < 2 * *cap && 2 * *cap <= n) want = 2 * *cap;
      p = tostr ? sblock_reserve(L, c, want, got)
                : rbuf_reserve(L, c, want);
      step = (want < n ? want : (size_t)n) - got;
    }
    read_all(L, c, p + got, step, deadline, 1);
    got += step;
  }
  return p;
}

/* After a message of n bytes: a buffer beyond KEEP_RBUF is kept while
 * messages about as big keep coming, and freed by the first one less
 * than half its size (a small one too).  glibc serves an allocation
 * beyond 32 MiB (its largest mmap threshold) with a fresh mmap, every
 * page faulted in anew: freed after each message, a stream of 64 MiB
 * messages faulted in the whole buffer every time. */
static void rbuf_trim(struct conn *c, size_t n) {
  if (c->rcap > KEEP_RBUF && n < c->rcap / 2) {
    free(c->rbuf);
    c->rbuf = NULL;
    c->rcap = 0;
  }
}

static void put_header(unsigned char *h, size_t n, size_t *hlen) {
  if (n > 0x7fffffffu) {
    uint64_t v = n;
    memset(h, 0xff, 4);
    for (int i = 0; i < 8; i++) h[4 + i] = (unsigned char)(v >> (56 - 8 * i));
    *hlen = 12;
  } else {
    h[0] = (unsigned char)(n >> 24);
    h[1] = (unsigned char)(n >> 16);
    h[2] = (unsigned char)(n >> 8);
    h[3] = (unsigned char)n;
    *hlen = 4;
  }
}

/* Sends one framed message: header then n bytes at p. */
static void send_frame(lua_State *L, struct conn *c, const char *p, size_t n,
                       double deadline) {
  unsigned char h[HEADROOM];
  size_t hlen;
  struct iovec iov[2];
  put_header(h, n, &hlen);
  iov[0].iov_base = h;
  iov[0].iov_len = hlen;
  iov[1].iov_base = (void *)p;
  iov[1].iov_len = n;
  write_all(L, c, iov, n > 0 ? 2 : 1, deadline);
}

/* Receives one framed message (at most maxlen bytes, maxlen < 0 for no
 * limit) and pushes it as a string. */
static void recv_frame(lua_State *L, struct conn *c, lua_Integer maxlen,
                       double deadline) {
  uint64_t n = read_header(L, c, deadline);
  if (maxlen >= 0 && n > (uint64_t)maxlen) {
    c->rbroken = 1;
    luamp_raise(L, "OSError", "bad message length: %I bytes > maxlength %I",
                (lua_Integer)(n > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : n),
                maxlen);
  }
  if (n <= RA_SIZE) {
    lua_pushlstring(L, read_view(L, c, (size_t)n, deadline), (size_t)n);
  } else if (learn_string_at(L) >= 0) {     /* the string is the buffer */
    struct handoff h;
    char *p = read_payload(L, c, n, deadline, 1);
    char *block = c->sblock;
    c->sblock = NULL;                 /* the string's now, or freed */
    c->scap = 0;
    handoff_push(L, &h, block, (size_t)string_at + (size_t)n + 1, p,
                 (size_t)n);
  } else {
    char *p = read_payload(L, c, n, deadline, 0);
    lua_pushlstring(L, p, (size_t)n);
  }
  rbuf_trim(c, (size_t)n);
  if (c->inq_len > 0) fds_discard(c, lua_tostring(L, -1), (size_t)n);
}

/* ---- receiving without waiting ----------------------------------------

   A server that serves many peers must not let one of them hold it: a
   peer that sends half a message and stops, or trickles its bytes,
   would keep a blocking read (and everyone else) waiting.  frame_nowait
   reads what has arrived and keeps the message being assembled in c (nb,
   nb_len, nb_got), so the caller goes back to its poll loop and comes
   again when the fd is readable.  Memory follows the bytes that arrived,
   not the length the header claims, and a claim beyond maxlen is refused
   at once (an unauthenticated peer may announce only so much). */

/* One read that never waits: the count, 0 at end of file, -1 with
 * errno EAGAIN when nothing is there. */
static ssize_t read_nowait(struct conn *c, char *p, size_t n) {
  for (;;) {
    ssize_t r = c->rnb ? luamp_sys.read(c->fd, p, n)
              : c->unixsock && c->trusted ? recv_fds(c, p, n, MSG_DONTWAIT)
              : luamp_sys.recv(c->fd, p, n, MSG_DONTWAIT);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno == ENOTSOCK) {           /* a pipe: ask poll first */
      struct pollfd q = {c->fd, POLLIN, 0};
      int k = luamp_sys.poll(&q, 1, 0);
      if (k < 0 && errno == EINTR) continue;
      if (k == 0) {
        errno = EAGAIN;
        return -1;
      }
      r = luamp_sys.read(c->fd, p, n);
      if (r < 0 && errno == EINTR) continue;
      return r;
    }
    return -1;
  }
}

/* rbuf has room for more of the message being assembled (it grows with
 * what arrived: doubling, up to nb_len). */
static size_t nb_room(lua_State *L, struct conn *c) {
  size_t cap = c->rcap < c->nb_len ? c->rcap : c->nb_len;
  if (cap == c->nb_got) {
    size_t want = c->rcap < RA_SIZE ? 2 * RA_SIZE : 2 * c->rcap;
    if (want > c->nb_len) want = c->nb_len;
    rbuf_reserve(L, c, want);
    cap = want;
  }
  return cap - c->nb_got;
}

/* 1 when a whole message of c has arrived: *pp, *np are its payload (in
 * c's buffers, valid until the next read on c); 0 when more must come.
 * handshake: the peer is in the handshake (a message beyond maxlen is
 * then an AuthenticationError). */
static int frame_nowait(lua_State *L, struct conn *c, uint64_t maxlen,
                        int handshake, const char **pp, size_t *np) {
  ra_alloc(L, c);
  for (;;) {
    size_t avail = c->rend - c->rpos;
    ssize_t r;
    if (!c->nb) {
      const unsigned char *h = (const unsigned char *)c->ra + c->rpos;
      if (avail >= 4) {
        uint32_t n32 = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 |
                       (uint32_t)h[2] << 8 | h[3];
        uint64_t n = n32;
        size_t hl = 4;
        if (n32 == 0xffffffffu) {
          if (avail < 12) goto fill;
          n = 0;
          for (int i = 4; i < 12; i++) n = n << 8 | h[i];
          hl = 12;
        } else if (n32 & 0x80000000u) {
          c->rbroken = 1;
          luamp_raise(L, handshake ? "AuthenticationError" : "OSError",
                      "bad message length: negative length %d in the "
                      "header", (int)(int32_t)n32);
        }
        if (n > maxlen) {
          c->rbroken = 1;
          if (handshake)
            luamp_raise(L, "AuthenticationError", "handshake message too "
                        "long (%I bytes > %d)", (lua_Integer)(n > 1000000000
                        ? 1000000000 : n), HANDSHAKE_MAX);
          luamp_raise(L, "OSError", "message too long from a peer that did "
                      "not authenticate (%I bytes > %I)",
                      (lua_Integer)(n > (uint64_t)LUA_MAXINTEGER
                                    ? LUA_MAXINTEGER : n),
                      (lua_Integer)maxlen);
        }
        c->rpos += hl;
        c->nb = 1;
        c->nb_len = (size_t)n;
        c->nb_got = 0;
        continue;
      }
    } else if (c->nb_len <= RA_SIZE) {
      if (avail >= c->nb_len) {
        *pp = c->ra + c->rpos;
        *np = c->nb_len;
        c->rpos += c->nb_len;
        c->nb = 0;
        return 1;
      }
    } else {
      /* big: what the read-ahead holds, then straight into rbuf */
      if (avail > 0) {
        size_t take = nb_room(L, c);
        if (take > avail) take = avail;
        memcpy(c->rbuf + c->nb_got, c->ra + c->rpos, take);
        c->rpos += take;
        c->nb_got += take;
      }
      if (c->nb_got == c->nb_len) {
        *pp = c->rbuf;
        *np = c->nb_len;
        c->nb = 0;
        return 1;
      }
      if (c->rpos < c->rend) continue;
      r = read_nowait(c, c->rbuf + c->nb_got, nb_room(L, c));
      if (r > 0) {
        c->nb_got += (size_t)r;
        continue;
      }
      goto got;
    }
  fill:
    if (c->rpos > 0) {
      memmove(c->ra, c->ra + c->rpos, avail);
      c->rpos = 0;
      c->rend = avail;
    }
    r = read_nowait(c, c->ra + c->rend, RA_SIZE - c->rend);
    if (r > 0) {
      c->rend += (size_t)r;
      c->rpid = luamp_pid();
      continue;
    }
  got:
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (r < 0 && errno != ECONNRESET) {
      c->rbroken = 1;
      luamp_raise_errno(L, "OSError", errno, "recv");
    }
    /* end of file */
    if (!c->nb && c->rend == c->rpos)
      luamp_raise(L, "EOFError", "the peer closed the connection");
    eof_midway(L, c);
  }
}

/* ---- Connection methods ---------------------------------------------- */

/* A message that cannot be MessagePack, recognised before the decoder's
 * "trailing bytes": 0x23 ('#') and 0x80 are complete one-byte values,
 * so a longer message starting with them is something else -- the
 * handshake of a Listener that has an authkey, or a Python pickle
 * (0x80, protocol 2..5) from CPython's Connection.send().  The frame
 * was read whole: the stream stays in step. */
static void check_foreign(lua_State *L, const char *p, size_t n) {
  if (n > sizeof CHALLENGE - 1 && memcmp(p, CHALLENGE, sizeof CHALLENGE - 1) == 0)
    luamp_raise(L, "AuthenticationError", "the peer asks for authentication "
                "(it sent an HMAC challenge): connect with its authkey");
  if (n > 1 && (unsigned char)p[0] == 0x80 && p[1] >= 2 && p[1] <= 5)
    luamp_raise(L, "DecodeError", "peer sent data that is not MessagePack "
                "(a Python pickle? have the peer use send_bytes with "
                "msgpack, not send) at byte 0");
}

/* ---- passing fds -------------------------------------------------------

   Connections and Listeners travel inside messages to other processes of
   the tree (CPython's test_fd_transfer family).  Over an AF_UNIX socket
   -- a Client or accepted connection on a Unix path, core.Pipe(true,
   "socket") -- the fds ride with the message itself, as SCM_RIGHTS (a
   duplex Pipe's end, two pipes, as both of its fds): the kernel holds
   them while they are in flight, so a message that is never read costs
   nothing once the receiving socket is closed (the kernel drops its
   queue, cycles included), and a receiver that died only turns the send
   into a BrokenPipeError, as for any message.

   The codec's handle for such an object is an index into the message's
   fd list.  send() collects the list while it encodes (fdout, armed only
   during that encode: anywhere else -- a Queue, mp.encode -- the handle
   raises EncodeError) and prefixes the payload with FDMARK and the
   count, so the receiver knows which messages own an fd set without
   decoding them.  The fds come with the read that takes the first byte
   of the sendmsg carrying them, and read-ahead may take them before
   their message's turn: a connection queues the sets it received (inq),
   and each marked message claims the oldest.  A marked message read raw
   (recv_bytes) closes its set; a decode closes the fds no handle took,
   whether it succeeds or raises.  Only trusted connections read with
   recvmsg; on the others plain read() makes the kernel discard any fds,
   so an outsider cannot plant fds in us. */

#define FD_MAX 253                   /* the kernel's SCM_MAX_FD */
static const char FDMARK[8] = "\xc1luampF";    /* 0xc1: never MessagePack */
#define FDMARK_LEN 9                 /* FDMARK and the count */

/* the fds of the message being encoded by send(); borrowed from the
 * handles on the stack until the sendmsg */
static struct {
  int armed, n;
  int fds[FD_MAX];
} fdout;

/* The fds of the message being decoded, taken by its handles (a stack:
 * a decode may receive on another connection); a to-be-closed userdata
 * whose close gives back what no handle took. */
#define FDSET_TNAME "multiprocessing.fdset"
struct fdset {
  struct fdset *prev;
  int armed, n;
  int fds[FD_MAX];         /* -1 once taken */
  int given[FD_MAX];       /* the fd a handle took (a second one dups it) */
};
static struct fdset *fdin;

static void close_fds(const int *fds, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (fds[i] >= 0) close(fds[i]);
}

/* Closes the sets received and not claimed (in a forked child: its own
 * copies, of messages its parent read). */
static void inq_drop(struct conn *c) {
  for (size_t i = 0; i < c->inq_len; i += 1 + (size_t)c->inq[i])
    close_fds(c->inq + i + 1, (size_t)c->inq[i]);
  free(c->inq);
  c->inq = NULL;
  c->inq_len = c->inq_cap = 0;
}

static void inq_push(struct conn *c, const int *fds, size_t k) {
  if (c->inq_len > 0 && c->inq_pid != luamp_pid()) inq_drop(c);
  if (c->inq_len + k + 1 > c->inq_cap) {
    size_t cap = 2 * c->inq_cap + k + 1;
    int *q = realloc(c->inq, cap * sizeof *q);
    if (q == NULL) {             /* the pairing of sets is lost */
      close_fds(fds, k);
      c->rbroken = 1;
      return;
    }
    c->inq = q;
    c->inq_cap = cap;
  }
  c->inq[c->inq_len] = (int)k;
  memcpy(c->inq + c->inq_len + 1, fds, k * sizeof *fds);
  c->inq_len += k + 1;
  c->inq_pid = luamp_pid();
}

/* read_once's and read_nowait's read on a trusted Unix socket: the fds
 * that come are queued in c. */
static ssize_t recv_fds(struct conn *c, char *p, size_t n, int flags) {
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(sizeof(int) * FD_MAX)];
  } u;
  struct iovec iov = {p, n};
  struct msghdr m;
  struct cmsghdr *h;
  ssize_t r;
  memset(&m, 0, sizeof m);
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = u.buf;
  m.msg_controllen = sizeof u.buf;
  r = luamp_sys.recvmsg(c->fd, &m, flags | MSG_CMSG_CLOEXEC);
  if (r < 0) return r;
  for (h = CMSG_FIRSTHDR(&m); h != NULL; h = CMSG_NXTHDR(&m, h))
    if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
      int fds[FD_MAX];
      size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      memcpy(fds, CMSG_DATA(h), k * sizeof(int));
      inq_push(c, fds, k);   /* (a set cut by MSG_CTRUNC: fds missing) */
    }
  return r;
}

/* Whether the message p/n carries fds; if so, its set moves from c's
 * queue to out (its count, 0 when none came: the handles then say so). */
static int fds_claim(struct conn *c, const char *p, size_t n, int *out,
                     int *count) {
  size_t k;
  if (n < FDMARK_LEN || memcmp(p, FDMARK, sizeof FDMARK) != 0) return 0;
  *count = 0;
  if (c->inq_len > 0 && c->inq_pid != luamp_pid()) inq_drop(c);
  if (c->inq_len == 0) return 1;
  k = (size_t)c->inq[0];
  memcpy(out, c->inq + 1, k * sizeof *out);
  c->inq_len -= k + 1;
  memmove(c->inq, c->inq + k + 1, c->inq_len * sizeof *c->inq);
  *count = (int)k;
  return 1;
}

/* A message read raw: its fds, if any, are closed. */
static void fds_discard(struct conn *c, const char *p, size_t n) {
  int fds[FD_MAX], k;
  if (fds_claim(c, p, n, fds, &k)) close_fds(fds, (size_t)k);
}

static int fdset_close(lua_State *L) {
  struct fdset *f = luaL_checkudata(L, 1, FDSET_TNAME);
  if (f->armed) {
    f->armed = 0;
    fdin = f->prev;
    close_fds(f->fds, (size_t)f->n);
  }
  return 0;
}

/* Decodes the message p/n of c: a marked one with its fds at hand. */
static void decode_msg(lua_State *L, struct conn *c, const char *p, size_t n,
                       int flags) {
  struct fdset *f;
  int top;
  if (!(c->unixsock && c->trusted) || n < FDMARK_LEN ||
      memcmp(p, FDMARK, sizeof FDMARK) != 0) {
    check_foreign(L, p, n);
    luamp_decode(L, p, n, flags);
    return;
  }
  f = lua_newuserdatauv(L, sizeof *f, 0);
  f->armed = 0;
  luaL_setmetatable(L, FDSET_TNAME);
  top = lua_gettop(L);
  lua_toclose(L, top);
  fds_claim(c, p, n, f->fds, &f->n);
  for (int i = 0; i < f->n; i++) f->given[i] = -1;
  f->prev = fdin;
  fdin = f;
  f->armed = 1;
  luamp_decode(L, p + FDMARK_LEN, n - FDMARK_LEN, flags);
  lua_closeslot(L, top);
  lua_remove(L, top);
}

static const char claimed_key = 0;   /* ticket -> object, weak values */

/* A parked fd (handle bytes p/n): claimed from the keeper once; the same
 * handle again (an object twice in one message) dups the first's fd --
 * its write end when `second` (a pair's second fd). */
static int fdin_claim(lua_State *L, const char *p, size_t n, int second) {
  const char *ticket = p + 4;
  int fd;
  if (n <= 4 + LUAMP_FDKEEP_TICKET || n > 4 + LUAMP_FDKEEP_TICKET +
      LUAMP_FDKEEP_NAME || p[4 + LUAMP_FDKEEP_TICKET] != '\0')
    luamp_raise(L, "DecodeError", "malformed %s handle",
                p[0] == 'L' ? "Listener" : "Connection");
  lua_rawgetp(L, LUA_REGISTRYINDEX, &claimed_key);
  lua_pushlstring(L, ticket, LUAMP_FDKEEP_TICKET);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    lua_pop(L, 2);
    return luamp_fdkeep_claim(L, p + 4 + LUAMP_FDKEEP_TICKET,
                              n - 4 - LUAMP_FDKEEP_TICKET,
                              (const unsigned char *)ticket);
  }
  fd = *(int *)lua_touserdata(L, -1);  /* (both structs start with fd) */
  if (second) {
    struct conn *c = luaL_testudata(L, -1, CONN_TNAME);
    fd = c != NULL && c->pair && c->fd >= 0 ? c->wfd : -1;
  }
  lua_pop(L, 2);
  if (fd < 0)
    luamp_raise(L, "DecodeError", "the fd of this %s was received before "
                "and closed", p[0] == 'L' ? "Listener" : "Connection");
  fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) luamp_raise_errno(L, "OSError", errno, "dup");
  return fd;
}

/* Remembers the object on top as the one made from the parked handle p/n. */
static void fdin_note(lua_State *L, const char *p, size_t n) {
  const unsigned char *u = (const unsigned char *)p;
  if (n <= 4 + LUAMP_FDKEEP_TICKET || u[2] != 0xff || u[3] != 0xff) return;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &claimed_key);
  lua_pushlstring(L, p + 4, LUAMP_FDKEEP_TICKET);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

/* The fd that handle bytes p/n (kind, flags, index) name, taken from the
 * message being decoded. */
static int fdin_take(lua_State *L, const char *p, size_t n, int second) {
  const unsigned char *u = (const unsigned char *)p;
  int i, fd;
  if (n > 4 && u[2] == 0xff && u[3] == 0xff)
    return fdin_claim(L, p, n, second);
  if (n != 4)
    luamp_raise(L, "DecodeError", "malformed %s handle",
                p[0] == 'L' ? "Listener" : "Connection");
  if (fdin == NULL)
    luamp_raise(L, "DecodeError", "a %s arrives only in a message of the "
                "connection that carried its fd",
                p[0] == 'L' ? "Listener" : "Connection");
  i = u[2] << 8 | u[3];
  if (i >= fdin->n)
    luamp_raise(L, "DecodeError", "the fd of a %s did not arrive with its "
                "message", p[0] == 'L' ? "Listener" : "Connection");
  if (fdin->fds[i] >= 0) {
    fdin->given[i] = fdin->fds[i];
    fdin->fds[i] = -1;
    return fdin->given[i];
  }
  fd = fcntl(fdin->given[i], F_DUPFD_CLOEXEC, 0);   /* the same one twice */
  if (fd < 0) luamp_raise_errno(L, "OSError", errno, "dup");
  return fd;
}

/* Adds fd to the message being sent, returning its index. */
static int fdout_add(lua_State *L, int fd) {
  for (int i = 0; i < fdout.n; i++)
    if (fdout.fds[i] == fd) return i;
  if (fdout.n == FD_MAX)
    luamp_raise(L, "EncodeError", "more than %d Connections and Listeners "
                "in one message", FD_MAX);
  fdout.fds[fdout.n] = fd;
  return fdout.n++;
}

/* Pushes the handle bytes of an object (kind, flags) with fd: its index
 * in the message on send() over a Unix socket; else -- a Queue, a
 * one-way Pipe, mp.encode -- index 0xffff, then the ticket and keeper
 * name it was parked under (fdkeep.c); never to a peer that did not
 * authenticate. */
static void push_fd_handle(lua_State *L, char kind, int flags, int fd,
                           const char *what) {
  char d[4 + LUAMP_FDKEEP_TICKET + LUAMP_FDKEEP_NAME];
  const char *name;
  size_t n;
  int i;
  if (fdout.armed < 0)
    luamp_raise(L, "EncodeError", "a %s is not sent to a peer that did not "
                "authenticate", what);
  i = fdout.armed ? fdout_add(L, fd) : 0xffff;
  d[0] = kind;
  d[1] = (char)flags;
  d[2] = (char)(i >> 8);
  d[3] = (char)i;
  if (fdout.armed) {
    lua_pushlstring(L, d, 4);
    return;
  }
  luamp_fdkeep_park(L, fd, (unsigned char *)d + 4, &name, &n);
  memcpy(d + 4 + LUAMP_FDKEEP_TICKET, name, n);
  lua_pushlstring(L, d, 4 + LUAMP_FDKEEP_TICKET + n);
}

/* the guard of fdout: disarms it however the encode ends */
static int fdout_close(lua_State *L) {
  (void)L;
  fdout.armed = 0;
  fdout.n = 0;
  return 0;
}
static const char fdout_guard_key = 0;

/* Sends the n-byte encoding at p (HEADROOM before it) with the fds
 * collected, the payload marked: the first sendmsg carries them. */
static void send_with_fds(lua_State *L, struct conn *c, char *p, size_t n) {
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(sizeof(int) * FD_MAX)];
  } u;
  unsigned char h[HEADROOM], mark[FDMARK_LEN];
  size_t hlen, sent = 0;
  struct iovec iov[3], *v = iov;
  struct msghdr m;
  struct cmsghdr *cm;
  if (c->srv) srv_settle(L, c);     /* (the fds go with their bytes) */
  put_header(h, n + FDMARK_LEN, &hlen);
  memcpy(mark, FDMARK, sizeof FDMARK);
  mark[FDMARK_LEN - 1] = (unsigned char)fdout.n;
  iov[0] = (struct iovec){h, hlen};
  iov[1] = (struct iovec){mark, FDMARK_LEN};
  iov[2] = (struct iovec){p + HEADROOM, n};
  memset(&m, 0, sizeof m);
  memset(&u, 0, sizeof u);
  m.msg_iov = iov;
  m.msg_iovlen = 3;
  m.msg_control = u.buf;
  m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)fdout.n);
  cm = CMSG_FIRSTHDR(&m);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)fdout.n);
  memcpy(CMSG_DATA(cm), fdout.fds, sizeof(int) * (size_t)fdout.n);
  while (m.msg_iovlen > 0) {
    ssize_t w = luamp_sys.sendmsg(WFD(c), &m, MSG_NOSIGNAL);
    if (w < 0) {
      int err = errno;
      if (err == EINTR) {
        if (luamp_interrupted(L)) {
          if (sent) c->wbroken = 1;
          luamp_raise_interrupt(L);
        }
        continue;
      }
      if (err == EAGAIN || err == EWOULDBLOCK) {
        wait_fd(L, c, POLLOUT, c->srv ? luamp_deadline(SRV_FD_WAIT) : -1,
                sent > 0);
        continue;
      }
      if (sent) c->wbroken = 1;
      luamp_raise_errno(L, "OSError", err, "send");
    }
    sent += (size_t)w;
    m.msg_control = NULL;          /* the fds went with the first bytes */
    m.msg_controllen = 0;
    while (m.msg_iovlen > 0 && (size_t)w >= v->iov_len) {
      w -= (ssize_t)v->iov_len;
      v++;
      m.msg_iovlen--;
    }
    if (m.msg_iovlen > 0) {
      v->iov_base = (char *)v->iov_base + w;
      v->iov_len -= (size_t)w;
    }
    m.msg_iov = v;
  }
}

/* conn:send(v) on a trusted Unix socket (mode 1): the encode may meet
 * Connections and Listeners, whose fds then go along; returns 1 when it
 * sent the message so, 0 when p/n is for the plain path.  Mode -1 (a peer
 * that did not authenticate): they are refused. */
static int send_maybe_fds(lua_State *L, struct conn *c, char **p, size_t *n,
                          int mode) {
  int top = lua_gettop(L) + 1, sent;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &fdout_guard_key);
  lua_toclose(L, top);
  fdout.n = 0;
  fdout.armed = mode;
  *p = luamp_encode(L, 2, HEADROOM, n, "value");
  sent = fdout.n > 0;
  if (sent) send_with_fds(L, c, *p, *n);
  lua_closeslot(L, top);
  lua_settop(L, top - 1);
  return sent;
}

/* conn:send(v): the codec's encoding of v as one message.  An
 * unencodable value raises EncodeError before anything is written. */
static int conn_send(lua_State *L) {
  struct conn *c = check_writable(L, 1);
  if (luamp_pending_writes && !c->nofence) luamp_flush_writes(L);
  size_t n, hlen;
  char *p;
  luaL_checkany(L, 2);
  if (c->unixsock && c->trusted) {
    if (send_maybe_fds(L, c, &p, &n, 1)) return 0;
  } else if (!c->trusted) {
    send_maybe_fds(L, c, &p, &n, -1);
  } else {
    p = luamp_encode(L, 2, HEADROOM, &n, "value");
  }
  put_header((unsigned char *)p, n, &hlen);
  if (hlen == 4) memcpy(p + HEADROOM - 4, p, 4);
  {
    struct iovec iov = {p + HEADROOM - hlen, hlen + n};
    write_all(L, c, &iov, 1, -1);
  }
  if (c->srv && wq_left(c) > 0) {     /* (serve mode: true when queued) */
    lua_pushboolean(L, 1);
    return 1;
  }
  return 0;
}

/* How messages from c are decoded: with code (trusted), as a keyless
 * manager's peer (its proxies made), or as plain data. */
static int decode_flags(const struct conn *c) {
  return c->trusted ? 0
       : c->peer ? LUAMP_DECODE_UNTRUSTED | LUAMP_DECODE_PEER
       : LUAMP_DECODE_UNTRUSTED;
}

/* conn:recv() -> the next message's value; EOFError when the peer has
 * closed and nothing is left. */
static int conn_recv(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  uint64_t n = read_header(L, c, -1);
  int flags = decode_flags(c);
  if (n <= RA_SIZE) {
    const char *p = read_view(L, c, (size_t)n, -1);
    decode_msg(L, c, p, (size_t)n, flags);
    rbuf_trim(c, (size_t)n);
  } else {
    char *p = read_payload(L, c, n, -1, 0);
    /* the buffer belongs to c, which the stack keeps alive: a raising
     * decoder leaks nothing */
    decode_msg(L, c, p, (size_t)n, flags);
    rbuf_trim(c, (size_t)n);
  }
  return 1;
}

/* conn:_recv_nowait([maxlength]) -> true, value when a whole message
 * has arrived; false when more must come (nothing waits).  What it has
 * read so far stays in the connection for the next call.  For servers
 * of peers that did not authenticate (the manager's, without a key):
 * a longer message than maxlength is refused from its header. */
static int conn_recv_nowait(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  lua_Integer maxlen = luaL_optinteger(L, 2, LUA_MAXINTEGER);
  const char *p;
  size_t n;
  luaL_argcheck(L, maxlen >= 0, 2, "negative maxlength");
  if (!frame_nowait(L, c, (uint64_t)maxlen, 0, &p, &n)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushboolean(L, 1);
  decode_msg(L, c, p, n, decode_flags(c));
  rbuf_trim(c, n);
  return 2;
}

/* conn:_recv_small() -> the next handshake message (at most
 * HANDSHAKE_MAX bytes) when it has arrived, nil otherwise (nothing
 * waits).  AuthenticationError for a longer one. */
static int conn_recv_small(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  const char *p;
  size_t n;
  if (!frame_nowait(L, c, HANDSHAKE_MAX, 1, &p, &n)) return 0;
  lua_pushlstring(L, p, n);
  return 1;
}

/* conn:send_bytes(s [, offset [, size]]): offset is a byte offset from
 * the start of s (0-based, as Python's), size defaults to the rest. */
static int conn_send_bytes(lua_State *L) {
  struct conn *c = check_writable(L, 1);
  if (luamp_pending_writes && !c->nofence) luamp_flush_writes(L);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  lua_Integer off = luaL_optinteger(L, 3, 0), size;
  luaL_argcheck(L, off >= 0, 3, "offset is negative");
  luaL_argcheck(L, (size_t)off <= len, 3, "buffer length < offset");
  size = luaL_optinteger(L, 4, (lua_Integer)(len - (size_t)off));
  luaL_argcheck(L, size >= 0, 4, "size is negative");
  luaL_argcheck(L, (size_t)size <= len - (size_t)off, 4,
                "buffer length < offset + size");
  send_frame(L, c, s + off, (size_t)size, -1);
  return 0;
}

/* conn:recv_bytes([maxlength]) -> string */
static int conn_recv_bytes(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  lua_Integer maxlen = -1;
  if (!lua_isnoneornil(L, 2)) {
    maxlen = luaL_checkinteger(L, 2);
    luaL_argcheck(L, maxlen >= 0, 2, "negative maxlength");
  }
  recv_frame(L, c, maxlen, -1);
  return 1;
}

/* conn:recv_bytes_into(buffer [, offset]) -> the message's length in
 * bytes, written into buffer (an Array of any typecode, raw or
 * synchronized -- its lock is not taken -- or a SharedMemory) from byte
 * offset (counted from 0, as send_bytes's).  A message longer than the
 * room left is consumed whole and raised as BufferTooShort with the
 * message in err.value (Python's); the buffer is then untouched. */
static int conn_recv_bytes_into(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  size_t cap = 0;
  char *dst = luamp_array_bytes(L, 2, &cap);
  lua_Integer off;
  uint64_t n;
  if (dst == NULL && (dst = luamp_shm_bytes(L, 2, &cap)) == NULL)
    return luaL_typeerror(L, 2, "Array or SharedMemory");
  off = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, off >= 0, 3, "offset is negative");
  luaL_argcheck(L, (uint64_t)off <= cap, 3, "offset beyond the buffer's end");
  n = read_header(L, c, -1);
  if (n <= cap - (size_t)off) {
    if (n <= RA_SIZE)
      memcpy(dst + off, read_view(L, c, (size_t)n, -1), (size_t)n);
    else
      read_all(L, c, dst + off, (size_t)n, -1, 1);
    if (c->inq_len > 0) fds_discard(c, dst + off, (size_t)n);
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
  }
  if (n <= RA_SIZE) {
    lua_pushlstring(L, read_view(L, c, (size_t)n, -1), (size_t)n);
  } else {
    lua_pushlstring(L, read_payload(L, c, n, -1, 0), (size_t)n);
    rbuf_trim(c, (size_t)n);
  }
  if (c->inq_len > 0) fds_discard(c, lua_tostring(L, -1), (size_t)n);
  return luamp_raise_value(L, "BufferTooShort", -1, "recv_bytes_into: a "
                           "message of %I bytes does not fit in the %I "
                           "bytes after offset %I", (lua_Integer)n,
                           (lua_Integer)(cap - (size_t)off), off);
}

/* conn:poll([timeout]) -> true when a message (or the end of file) is
 * there to read.  poll() does not wait, as Python's default 0;
 * poll(math.huge) waits forever. */
static int conn_poll(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  struct pollfd p = {c->fd, POLLIN, 0};
  double deadline = lua_isnoneornil(L, 2) ? luamp_now()
                                          : luamp_deadline_arg(L, 2);
  int r;
  ra_check(c);
  if (c->rpos < c->rend) {
    lua_pushboolean(L, 1);
    return 1;
  }
  r = luamp_robust_poll(L, &p, 1, deadline);
  if (r == -2) luamp_raise_interrupt(L);
  if (r == -1) luamp_raise_errno(L, "OSError", errno, "poll");
  lua_pushboolean(L, r > 0);
  return 1;
}

/* Whether bytes are waiting in the read-ahead buffer (mp.wait's "ready
 * now" check: the fd alone does not show them). */
static int conn_buffered(lua_State *L) {
  struct conn *c = luamp_self(L, 1, &conn_type);
  if (c->fd >= 0) ra_check(c);
  lua_pushboolean(L, c->fd >= 0 && c->rpos < c->rend);
  return 1;
}

/* conn:_wait_fd() -> fd, ready: mp.wait's protocol */
static int conn_wait_fd(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  lua_pushinteger(L, c->fd);
  lua_pushcfunction(L, conn_buffered);
  return 2;
}

static int conn_fileno(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  lua_pushinteger(L, c->fd);
  return 1;
}

/* The cqueues protocol: pollfd (the fd), events "r", timeout 0 while
 * bytes wait in the read-ahead buffer -- readable data the fd no longer
 * shows (a host loop with only the fd drains with poll(): see the
 * README's "Event loops"). */
static int conn_events(lua_State *L) {
  check_conn(L, 1);
  lua_pushliteral(L, "r");
  return 1;
}

static int conn_timeout(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  ra_check(c);
  if (c->rpos >= c->rend) return 0;
  lua_pushinteger(L, 0);
  return 1;
}

/* Fields closed/readable/writable, then the methods. */
static int conn_index(lua_State *L) {
  struct conn *c = luamp_self(L, 1, &conn_type);
  const char *k = lua_tostring(L, 2);
  if (k != NULL) {
    if (strcmp(k, "closed") == 0) {
      lua_pushboolean(L, c->fd < 0);
      return 1;
    }
    if (strcmp(k, "readable") == 0) {
      lua_pushboolean(L, c->readable);
      return 1;
    }
    if (strcmp(k, "writable") == 0) {
      lua_pushboolean(L, c->writable);
      return 1;
    }
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int conn_tostring(lua_State *L) {
  struct conn *c = luamp_self(L, 1, &conn_type);
  if (c->fd < 0) lua_pushliteral(L, "Connection (closed)");
  else if (c->pair)
    lua_pushfstring(L, "Connection (fds %d and %d, duplex)", c->fd, c->wfd);
  else lua_pushfstring(L, "Connection (fd %d, %s)", c->fd,
                       c->readable && c->writable ? "duplex" :
                       c->readable ? "read-only" : "write-only");
  return 1;
}

/* core.Pipe([duplex [, "socket"]]) -> a, b.  Duplex: two pipes, one
 * each way -- a reads what b writes and the other way round; a round
 * trip over pipes wakes the peer sooner than over a Unix socket (issue
 * 18: 1.6x a socketpair's round trips in the raw C probes), and
 * Connections sent over it go through the fd keeper as over a one-way
 * Pipe.  "socket": a socketpair instead, whose messages carry fds
 * themselves.  Otherwise a pipe: a receives, b sends. */
static int l_pipe(lua_State *L) {
  int duplex = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
  int sock = duplex && lua_type(L, 2) == LUA_TSTRING &&
             strcmp(lua_tostring(L, 2), "socket") == 0;
  int fds[2];
  struct conn *a, *b;
  luaL_argcheck(L, lua_isnoneornil(L, 2) || sock, 2, "\"socket\" expected");
  a = new_conn(L);
  b = new_conn(L);
  if (sock) {
    if (luamp_sys.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
      luamp_raise_errno(L, "OSError", errno, "socketpair");
  } else if (luamp_sys.pipe2(fds, O_CLOEXEC) != 0) {
    luamp_raise_errno(L, "OSError", errno, "pipe2");
  }
  a->fd = fds[0];                     /* owned by the handles from here */
  b->fd = fds[1];
  if (duplex && !sock) {              /* the way back: b reads, a writes */
    a->pair = b->pair = 1;
    b->wfd = b->fd;
    b->fd = -1;
    if (luamp_sys.pipe2(fds, O_CLOEXEC) != 0)
      luamp_raise_errno(L, "OSError", errno, "pipe2");
    b->fd = fds[0];
    a->wfd = fds[1];
  }
  a->trusted = b->trusted = 1;
  a->unixsock = b->unixsock = sock;
  a->ispipe = duplex && !sock;
  b->ispipe = !sock;
  a->readable = 1;
  a->writable = duplex;
  b->readable = duplex;
  b->writable = 1;
  return 2;
}

/* core.connection_from_fd(fd, readable, writable) -> Connection owning
 * fd (untrusted: its data is decoded without code). */
static int l_from_fd(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  struct conn *c;
  luaL_argcheck(L, fd >= 0, 1, "bad file descriptor");
  c = new_conn(L);
  c->fd = fd;
  c->readable = lua_isnoneornil(L, 2) || lua_toboolean(L, 2);
  c->writable = lua_isnoneornil(L, 3) || lua_toboolean(L, 3);
  luamp_sys.fcntl(fd, F_SETFD, FD_CLOEXEC);
  return 1;
}

/* ---- HMAC challenge (CPython's protocol) ----------------------------- */

/* The challenge is "#CHALLENGE#" followed by the message: "{sha256}" and
 * 40 random bytes here (CPython >= 3.12); 20 bare random bytes from a
 * legacy peer (CPython <= 3.11).  The answer is "{digest}" + HMAC of the
 * whole message (prefix included) with that digest, or, to a legacy
 * challenge, the bare 16-byte HMAC-MD5.  A 16- or 20-byte answer is
 * legacy MD5; the MAC covers the prefix, so a peer cannot downgrade a
 * modern challenge.  Then "#WELCOME#" or "#FAILURE#". */
#define MESSAGE_LENGTH 40
#define MAX_DIGEST_LEN 8

/* OpenSSL's libcrypto, loaded on first use (dlopen) rather than linked:
 * mapped into every process it would make every fork slower (its pages
 * are copied into each child's page tables), and only authenticated
 * connections need it. */
#define N_DIGESTS 5
static const char *const digest_names[N_DIGESTS] = {
  "md5", "sha256", "sha384", "sha3_256", "sha3_384"  /* CPython's allowed */
};
static struct {
  int loaded;
  unsigned char *(*hmac)(const EVP_MD *, const void *, int,
                         const unsigned char *, size_t, unsigned char *,
                         unsigned int *);
  int (*memcmp_ct)(const void *, const void *, size_t);
  const EVP_MD *(*md[N_DIGESTS])(void);
} crypto;

static void load_crypto(lua_State *L) {
  static const char *const md_syms[N_DIGESTS] = {
    "EVP_md5", "EVP_sha256", "EVP_sha384", "EVP_sha3_256", "EVP_sha3_384"
  };
  void *h;
  if (crypto.loaded) return;
  h = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) h = dlopen("libcrypto.so", RTLD_NOW | RTLD_LOCAL);
  if (h == NULL)
    luamp_raise(L, "AuthenticationError", "cannot load OpenSSL's libcrypto "
                "for HMAC: %s", dlerror());
  *(void **)&crypto.hmac = dlsym(h, "HMAC");
  *(void **)&crypto.memcmp_ct = dlsym(h, "CRYPTO_memcmp");
  for (int i = 0; i < N_DIGESTS; i++)
    *(void **)&crypto.md[i] = dlsym(h, md_syms[i]);
  if (crypto.hmac == NULL || crypto.memcmp_ct == NULL || crypto.md[0] == NULL ||
      crypto.md[1] == NULL)
    luamp_raise(L, "AuthenticationError", "libcrypto lacks HMAC, MD5 or "
                "SHA-256");
  crypto.loaded = 1;
}

static const EVP_MD *digest_by_name(const char *name, size_t len) {
  for (int i = 0; i < N_DIGESTS; i++)
    if (strlen(digest_names[i]) == len && memcmp(digest_names[i], name, len) == 0)
      return crypto.md[i] ? crypto.md[i]() : NULL;
  return NULL;
}

/* Splits a message or answer: "{name}payload" gives name's digest and
 * the payload's offset; a bare 16- or 20-byte one is legacy MD5.  NULL
 * when it is neither (or the digest is not one of CPython's allowed). */
static const EVP_MD *parse_digest(const char *m, size_t n, size_t *off,
                                  int *legacy) {
  const char *close;
  *legacy = 0;
  *off = 0;
  if (n == 16 || n == 20) {
    *legacy = 1;
    return crypto.md[0]();                /* md5 */
  }
  if (n < 2 || m[0] != '{') return NULL;
  close = memchr(m + 1, '}', n - 1 < MAX_DIGEST_LEN + 1 ? n - 1
                                                        : MAX_DIGEST_LEN + 1);
  if (close == NULL) return NULL;
  *off = (size_t)(close - m) + 1;
  return digest_by_name(m + 1, (size_t)(close - m - 1));
}

static void hmac_of(lua_State *L, const EVP_MD *md, const char *key,
                    size_t klen, const char *msg, size_t mlen,
                    unsigned char *out, unsigned *outlen) {
  if (crypto.hmac(md, key, (int)klen, (const unsigned char *)msg, mlen, out,
                  outlen) == NULL)
    luamp_raise(L, "AuthenticationError", "HMAC failed (digest not "
                "available in this OpenSSL)");
}

/* core.hmac_sha256(key, msg [, mac]) -> the 32-byte HMAC-SHA256 of msg;
 * with mac, whether it is that HMAC, compared in constant time.  The
 * signature of the broker's envelopes (broker.lua), which must be checked
 * before a byte of them is decoded. */
static int l_hmac_sha256(lua_State *L) {
  size_t klen, mlen, maclen = 0;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  const char *mac = luaL_optlstring(L, 3, NULL, &maclen);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned outlen;
  load_crypto(L);
  hmac_of(L, crypto.md[1](), key, klen, msg, mlen, out, &outlen);
  if (mac == NULL) {
    lua_pushlstring(L, (const char *)out, outlen);
  } else {
    lua_pushboolean(L, maclen == outlen &&
                       crypto.memcmp_ct(out, mac, outlen) == 0);
  }
  return 1;
}

/* Receives a handshake message (at most HANDSHAKE_MAX bytes) into buf. */
static size_t recv_small(lua_State *L, struct conn *c, char *buf,
                         double deadline) {
  uint64_t n = read_header(L, c, deadline);
  if (n > HANDSHAKE_MAX) {
    c->rbroken = 1;
    luamp_raise(L, "AuthenticationError", "handshake message too long "
                "(%I bytes)", (lua_Integer)(n > 1000000 ? 1000000 : n));
  }
  read_all(L, c, buf, (size_t)n, deadline, 1);
  return (size_t)n;
}

static double handshake_deadline(lua_State *L, int idx) {
  return lua_isnoneornil(L, idx) ? -1.0 : luamp_deadline_arg(L, idx);
}

/* The three computations of the handshake, shared by the blocking halves
 * below (a Client) and the non-blocking steps a Listener runs for many
 * peers at once (connection.lua). */

/* A fresh challenge: "#CHALLENGE#{sha256}" and MESSAGE_LENGTH random
 * bytes into msg (CHALLENGE_LEN bytes). */
#define CHALLENGE_LEN (sizeof CHALLENGE - 1 + 8 + MESSAGE_LENGTH)
static void make_challenge(lua_State *L, char *msg) {
  const size_t pre = sizeof CHALLENGE - 1;
  memcpy(msg, CHALLENGE "{sha256}", pre + 8);
  ssize_t n;
  /* blocks only until the kernel's pool is first seeded: EINTR then */
  while ((n = luamp_sys.getrandom(msg + pre + 8, MESSAGE_LENGTH, 0)) < 0 &&
         errno == EINTR) {}
  if (n != MESSAGE_LENGTH)
    luamp_raise_errno(L, "OSError", n < 0 ? errno : EIO, "getrandom");
}

/* Whether resp answers the challenge msg (made by make_challenge). */
static int answer_ok(lua_State *L, const char *key, size_t klen,
                     const char *msg, const char *resp, size_t rlen) {
  const size_t pre = sizeof CHALLENGE - 1;
  unsigned char expect[EVP_MAX_MD_SIZE];
  unsigned elen;
  size_t off;
  int legacy;
  const EVP_MD *md;
  load_crypto(L);
  md = parse_digest(resp, rlen, &off, &legacy);
  if (md == NULL) return 0;
  hmac_of(L, md, key, klen, msg + pre, CHALLENGE_LEN - pre, expect, &elen);
  return rlen - off == elen && crypto.memcmp_ct(expect, resp + off, elen) == 0;
}

/* The answer to the peer's challenge buf (mlen bytes) into out; raises
 * AuthenticationError for something that is not a challenge. */
#define ANSWER_MAX (2 + MAX_DIGEST_LEN + EVP_MAX_MD_SIZE)
static size_t make_answer(lua_State *L, const char *key, size_t klen,
                          const char *buf, size_t mlen, char *out) {
  const size_t pre = sizeof CHALLENGE - 1;
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned maclen;
  size_t olen = 0, off;
  int legacy;
  const EVP_MD *md;
  load_crypto(L);
  if (mlen < pre || memcmp(buf, CHALLENGE, pre) != 0)
    luamp_raise(L, "AuthenticationError", "protocol error, expected a "
                "challenge");
  if (mlen - pre < 20)
    luamp_raise(L, "AuthenticationError", "challenge too short: %d bytes",
                (int)(mlen - pre));
  md = parse_digest(buf + pre, mlen - pre, &off, &legacy);
  if (md == NULL)
    luamp_raise(L, "AuthenticationError", "unsupported challenge: missing "
                "digest prefix or unsupported digest");
  hmac_of(L, md, key, klen, buf + pre, mlen - pre, mac, &maclen);
  if (!legacy) {
    memcpy(out, buf + pre, off);      /* "{name}" */
    olen = off;
  }
  memcpy(out + olen, mac, maclen);
  return olen + maclen;
}

/* core.deliver_challenge(conn, authkey [, timeout]): the server side's
 * first half.  Raises AuthenticationError (after telling the peer) when
 * the answer is wrong, TimeoutError when the peer says nothing. */
static int l_deliver_challenge(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  size_t klen, rlen;
  const char *key = luaL_checklstring(L, 2, &klen);
  double deadline = handshake_deadline(L, 3);
  char msg[CHALLENGE_LEN], resp[HANDSHAKE_MAX];
  int ok;
  load_crypto(L);
  make_challenge(L, msg);
  send_frame(L, c, msg, CHALLENGE_LEN, deadline);
  rlen = recv_small(L, c, resp, deadline);
  ok = answer_ok(L, key, klen, msg, resp, rlen);
  send_frame(L, c, ok ? WELCOME : FAILURE, 9, deadline);
  if (!ok) luamp_raise(L, "AuthenticationError", "digest received was wrong");
  return 0;
}

/* core.answer_challenge(conn, authkey [, timeout]): the client side's
 * first half.  Raises AuthenticationError when the peer refuses us. */
static int l_answer_challenge(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  size_t klen, mlen, olen;
  const char *key = luaL_checklstring(L, 2, &klen);
  double deadline = handshake_deadline(L, 3);
  char buf[HANDSHAKE_MAX + 1], out[ANSWER_MAX];
  load_crypto(L);
  mlen = recv_small(L, c, buf, deadline);
  olen = make_answer(L, key, klen, buf, mlen, out);
  send_frame(L, c, out, olen, deadline);
  mlen = recv_small(L, c, buf, deadline);
  if (mlen != 9 || memcmp(buf, WELCOME, 9) != 0)
    luamp_raise(L, "AuthenticationError", "digest sent was rejected");
  return 0;
}

/* The steps of a server's handshake that never wait (the Listener
 * interleaves many peers' handshakes, each with its own deadline):
 *   core.hs_challenge() -> a challenge message
 *   core.hs_verify(authkey, challenge, answer) -> boolean
 *   core.hs_answer(authkey, peer_challenge) -> our answer
 * and conn:_recv_small() below reads their messages as they come. */
static int l_hs_challenge(lua_State *L) {
  char msg[CHALLENGE_LEN];
  make_challenge(L, msg);
  lua_pushlstring(L, msg, CHALLENGE_LEN);
  return 1;
}

static int l_hs_verify(lua_State *L) {
  size_t klen, mlen, rlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  const char *resp = luaL_checklstring(L, 3, &rlen);
  luaL_argcheck(L, mlen == CHALLENGE_LEN, 2, "not a challenge of hs_challenge");
  lua_pushboolean(L, answer_ok(L, key, klen, msg, resp, rlen));
  return 1;
}

static int l_hs_answer(lua_State *L) {
  size_t klen, mlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  char out[ANSWER_MAX];
  lua_pushlstring(L, out, make_answer(L, key, klen, msg, mlen, out));
  return 1;
}

/* core.set_trusted(conn [, how]): after a successful handshake, code
 * payloads (functions) from this peer may be decoded.  how = "peer": a
 * keyless manager's connection, untrusted but its proxies are made. */
static int l_set_trusted(lua_State *L) {
  struct conn *c = check_conn(L, 1);
  if (lua_type(L, 2) == LUA_TSTRING) {
    luaL_argcheck(L, strcmp(lua_tostring(L, 2), "peer") == 0, 2,
                  "\"peer\" or a boolean expected");
    c->trusted = 0;
    c->peer = 1;
    return 0;
  }
  c->trusted = lua_isnoneornil(L, 2) || lua_toboolean(L, 2);
  c->peer = 0;
  return 0;
}

/* core._set_nofence(conn): the connection is a manager client's own;
 * its sends do not wait for pending manager writes (they are those). */
static int l_set_nofence(lua_State *L) {
  check_conn(L, 1)->nofence = 1;
  return 0;
}

/* core._set_spin(conn): the connection is a manager client's own; a
 * receive polls a while before it sleeps (see spin_read).
 * core._set_spin(true | false): whether this process (and the children
 * it forks later) polls so whatever the state of the machine (specs: the
 * polling paths run on a busy machine too). */
static int l_set_spin(lua_State *L) {
  if (lua_isboolean(L, 1)) {
    spin_always = lua_toboolean(L, 1);
    return 0;
  }
  check_conn(L, 1)->spin = 1;
  return 0;
}

/* ---- addresses -------------------------------------------------------- */

/* A string is a Unix socket path (a leading "\0" for Linux's abstract
 * namespace); a table {host, port} is TCP (IPv4 or IPv6). */
static int parse_address(lua_State *L, int idx, struct sockaddr_storage *ss,
                         socklen_t *len) {
  memset(ss, 0, sizeof *ss);
  if (lua_type(L, idx) == LUA_TSTRING) {
    struct sockaddr_un *un = (struct sockaddr_un *)ss;
    size_t n;
    const char *path = lua_tolstring(L, idx, &n);
    luaL_argcheck(L, n > 0 && n < sizeof un->sun_path, idx,
                  "Unix socket path empty or too long");
    /* the kernel would cut a path at its first NUL (an abstract name,
     * "\0..." , is taken whole) */
    if (path[0] != '\0' && memchr(path, '\0', n) != NULL)
      luamp_raise(L, "ValueError", "Unix socket path contains a NUL byte");
    un->sun_family = AF_UNIX;
    memcpy(un->sun_path, path, n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n +
                       (path[0] != '\0'));
    return AF_UNIX;
  }
  if (lua_type(L, idx) == LUA_TTABLE) {
    struct addrinfo hints, *res = NULL;
    const char *host;
    lua_Integer port;
    int err;
    lua_rawgeti(L, idx, 1);
    lua_rawgeti(L, idx, 2);
    host = lua_tostring(L, -2);
    if (host == NULL)
      luaL_argerror(L, idx, "address {host, port}: host must be a string");
    if (strlen(host) != lua_rawlen(L, -2))
      luamp_raise(L, "ValueError", "host name contains a NUL byte");
    if (!lua_isinteger(L, -1))
      luaL_argerror(L, idx, "address {host, port}: port must be an integer");
    port = lua_tointeger(L, -1);
    luaL_argcheck(L, port >= 0 && port <= 65535, idx,
                  "address {host, port}: port out of range");
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    err = getaddrinfo(host, NULL, &hints, &res);
    if (err != 0 || res == NULL)
      luamp_raise(L, "OSError", "cannot resolve host '%s': %s", host,
                  gai_strerror(err));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    lua_pop(L, 2);
    if (ss->ss_family == AF_INET)
      ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else
      ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    return ss->ss_family;
  }
  return luaL_typeerror(L, idx, "address (string path or {host, port})");
}

static void push_address(lua_State *L, const struct sockaddr_storage *ss,
                         socklen_t len) {
  char host[INET6_ADDRSTRLEN];
  if (ss->ss_family == AF_UNIX) {
    const struct sockaddr_un *un = (const struct sockaddr_un *)ss;
    size_t n = len > offsetof(struct sockaddr_un, sun_path)
                   ? len - offsetof(struct sockaddr_un, sun_path) : 0;
    if (n > 0 && un->sun_path[0] != '\0') n = strnlen(un->sun_path, n);
    lua_pushlstring(L, un->sun_path, n);
    return;
  }
  lua_createtable(L, 2, 0);
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    lua_pushstring(L, host);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, ntohs(in->sin_port));
  } else {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    lua_pushstring(L, host);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, ntohs(in6->sin6_port));
  }
  lua_rawseti(L, -2, 2);
}

static void tune_socket(int fd, int family) {
  if (family != AF_UNIX) {
    int one = 1;
    luamp_sys.setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
}

/* ---- Listener --------------------------------------------------------- */

struct listener {
  int fd;                        /* -1 once closed */
  pid_t owner;                   /* the process that bound it */
  int family;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];  /* to unlink */
};

static struct listener *check_listener(lua_State *L, int idx) {
  struct listener *l = luamp_self(L, idx, &listener_type);
  if (l->fd < 0) luamp_raise(L, "OSError", "listener is closed");
  return l;
}

/* Closes the socket; the owner also removes its Unix socket file. */
static int listener_close(lua_State *L) {
  struct listener *l = luamp_self(L, 1, &listener_type);
  if (l->fd >= 0) {
    int fd = l->fd;
    l->fd = -1;
    luamp_sys.close(fd);
    if (l->path[0] && l->owner == luamp_pid()) luamp_sys.unlink(l->path);
    l->path[0] = '\0';
  }
  return 0;
}

/* core.listen(address [, backlog]) -> Listener */
static int l_listen(lua_State *L) {
  struct sockaddr_storage ss;
  socklen_t len;
  int family = parse_address(L, 1, &ss, &len);
  int backlog = (int)luaL_optinteger(L, 2, 128), fd, one = 1;
  struct listener *l = lua_newuserdatauv(L, sizeof *l, 0);
  memset(l, 0, sizeof *l);
  l->fd = -1;
  luaL_setmetatable(L, LISTENER_TNAME);
  fd = luamp_sys.socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) luamp_raise_errno(L, "OSError", errno, "socket");
  if (family != AF_UNIX)
    luamp_sys.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (luamp_sys.bind(fd, (struct sockaddr *)&ss, len) != 0 ||
      luamp_sys.listen(fd, backlog) != 0) {
    int err = errno;
    luamp_sys.close(fd);
    luamp_raise_errno(L, "OSError", err, "bind");
  }
  l->fd = fd;
  l->owner = luamp_pid();
  l->family = family;
  if (family == AF_UNIX) {
    const struct sockaddr_un *un = (const struct sockaddr_un *)&ss;
    if (un->sun_path[0] != '\0')
      memcpy(l->path, un->sun_path, strnlen(un->sun_path, sizeof un->sun_path));
  }
  return 1;
}

/* listener:accept([timeout]) -> Connection (not yet authenticated) */
static int listener_accept(lua_State *L) {
  struct listener *l = check_listener(L, 1);
  double deadline = luamp_deadline_arg(L, 2);
  struct conn *c = new_conn(L);
  for (;;) {
    struct pollfd p = {l->fd, POLLIN, 0};
    int r = luamp_robust_poll(L, &p, 1, deadline), fd;
    if (r == -2) luamp_raise_interrupt(L);
    if (r == 0) luamp_raise(L, "TimeoutError", "timed out");
    if (r < 0) luamp_raise_errno(L, "OSError", errno, "poll");
    fd = luamp_sys.accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd >= 0) {
      tune_socket(fd, l->family);
      c->fd = fd;
      c->readable = c->writable = 1;
      c->unixsock = l->family == AF_UNIX;
      return 1;
    }
    if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED &&
        errno != EWOULDBLOCK)
      luamp_raise_errno(L, "OSError", errno, "accept");
  }
}

static int listener_address(lua_State *L) {
  struct listener *l = check_listener(L, 1);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (luamp_sys.getsockname(l->fd, (struct sockaddr *)&ss, &len) != 0)
    luamp_raise_errno(L, "OSError", errno, "getsockname");
  push_address(L, &ss, len);
  return 1;
}

static int listener_fileno(lua_State *L) {
  lua_pushinteger(L, check_listener(L, 1)->fd);
  return 1;
}

static int listener_events(lua_State *L) {
  check_listener(L, 1);
  lua_pushliteral(L, "r");
  return 1;
}

static int listener_timeout(lua_State *L) {
  check_listener(L, 1);
  return 0;
}

static int listener_tostring(lua_State *L) {
  struct listener *l = luamp_self(L, 1, &listener_type);
  if (l->fd < 0) lua_pushliteral(L, "Listener (closed)");
  else lua_pushfstring(L, "Listener (fd %d)", l->fd);
  return 1;
}

/* core.connect(address [, timeout]) -> Connection (not yet authenticated) */
static int l_connect(lua_State *L) {
  struct sockaddr_storage ss;
  socklen_t len;
  int family = parse_address(L, 1, &ss, &len), fd, r;
  double deadline = luamp_deadline_arg(L, 2);
  struct conn *c = new_conn(L);
  fd = luamp_sys.socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) luamp_raise_errno(L, "OSError", errno, "socket");
  c->fd = fd;                /* closed by the handle if we raise */
  c->readable = c->writable = 1;
  c->unixsock = family == AF_UNIX;
  for (;;) {
    r = luamp_sys.connect(fd, (struct sockaddr *)&ss, len);
    if (r == 0) break;
    if (errno == EINTR) continue;
    if (errno == EINPROGRESS || errno == EALREADY) {
      struct pollfd p = {fd, POLLOUT, 0};
      int err = 0;
      socklen_t elen = sizeof err;
      r = luamp_robust_poll(L, &p, 1, deadline);
      if (r == -2) luamp_raise_interrupt(L);
      if (r == 0) luamp_raise(L, "TimeoutError", "connect timed out");
      if (r < 0) luamp_raise_errno(L, "OSError", errno, "poll");
      luamp_sys.getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen);
      if (err != 0) luamp_raise_errno(L, "OSError", err, "connect");
      break;
    }
    if (errno == EAGAIN && family == AF_UNIX) {
      /* the listener's backlog is full: try again shortly */
      r = luamp_robust_poll(L, NULL, 0, luamp_deadline(0.005));
      if (r == -2) luamp_raise_interrupt(L);
      if (deadline >= 0 && luamp_remaining_ms(deadline, -1) == 0)
        luamp_raise(L, "TimeoutError", "connect timed out");
      continue;
    }
    luamp_raise_errno(L, "OSError", errno, "connect");
  }
  luamp_sys.fcntl(fd, F_SETFL, luamp_sys.fcntl(fd, F_GETFL, 0) & ~O_NONBLOCK);
  tune_socket(fd, family);
  return 1;
}

/* ---- wait ------------------------------------------------------------- */

/* core.wait_fds(fds, timeout[, spin[, out]]) -> list of the 1-based
 * positions in fds that are ready to read (or at end of file).  spin:
 * poll a while before sleeping (spin_ready; the manager's server between
 * requests).  out: a table to return the list in (its entries replaced),
 * not a new one: the server's loop polls on every request. */
/* The pollfds (POLLIN) of the fd list at idx: in few (room for nfew)
 * when they fit, as a manager's loop polls on every request (no garbage
 * per call), else in a userdata pushed on the stack. */
/* An fd plus POLLOUT_FD in a list of fds waits for it to be writable
 * (a manager server's client with answers queued). */
#define POLLOUT_FD ((lua_Integer)1 << 32)

static struct pollfd *pollfds_arg(lua_State *L, int idx, struct pollfd *few,
                                  size_t nfew, nfds_t *np) {
  struct pollfd *p;
  lua_Integer n;
  luaL_checktype(L, idx, LUA_TTABLE);
  n = luaL_len(L, idx);
  luaL_argcheck(L, n >= 0 && n <= 65536, idx, "too many objects");
  p = (size_t)n <= nfew ? few : lua_newuserdatauv(L, sizeof *p * (size_t)n, 0);
  for (lua_Integer i = 0; i < n; i++) {
    lua_rawgeti(L, idx, i + 1);
    if (!lua_isinteger(L, -1))
      luaL_argerror(L, idx, "file descriptors must be integers");
    p[i].fd = (int)lua_tointeger(L, -1);
    p[i].events = POLLIN;
    if (lua_tointeger(L, -1) >= POLLOUT_FD) {   /* fd + 2^32: writable */
      p[i].fd = (int)(lua_tointeger(L, -1) - POLLOUT_FD);
      p[i].events = POLLOUT;
    }
    p[i].revents = 0;
    lua_pop(L, 1);
  }
  *np = (nfds_t)n;
  return p;
}

/* Waits (polling first, with spin, if a CPU is free) until one of p is
 * ready or the deadline passes: poll's count, 0 at the deadline; raises
 * on Ctrl-C and errors. */
static int wait_pollfds(lua_State *L, struct pollfd *p, nfds_t n,
                        double deadline, int spin) {
  int r;
  if (spin && (deadline < 0 || deadline > luamp_now())) {
    r = spin_ready(L, p, n);
    if (r > 0) return r;              /* (no second poll: revents are set) */
    if (r < 0) deadline = 0;          /* (the poll below reports it) */
  }
  r = luamp_robust_poll(L, p, n, deadline);
  if (r == -2) luamp_raise_interrupt(L);
  if (r == -1) luamp_raise_errno(L, "OSError", errno, "poll");
  return r;
}

/* Pushes the list of ready indexes (1-based) of p, r of them: the table
 * at out (its old items past them cleared) or a new one (out 0). */
static void push_ready(lua_State *L, const struct pollfd *p, nfds_t n, int r,
                       int out) {
  lua_Integer k = 1, old = out ? (lua_Integer)lua_rawlen(L, out) : 0;
  if (out) lua_pushvalue(L, out);
  else lua_newtable(L);
  for (nfds_t i = 0; r > 0 && i < n; i++) {
    if (p[i].revents & POLLNVAL)
      luamp_raise(L, "ValueError", "invalid file descriptor %d", p[i].fd);
    if (p[i].revents) {
      lua_pushinteger(L, (lua_Integer)i + 1);
      lua_rawseti(L, -2, k++);
    }
  }
  for (; out && k <= old; k++) {   /* (the rest of out's old list) */
    lua_pushnil(L);
    lua_rawseti(L, -2, k);
  }
}

/* core.wait_fds(fds, timeout[, spin[, out]]) -> the ready indexes. */
static int l_wait_fds(lua_State *L) {
  struct pollfd few[16], *p;
  nfds_t n;
  int r, spin = lua_toboolean(L, 3), out = !lua_isnoneornil(L, 4);
  if (out) luaL_checktype(L, 4, LUA_TTABLE);
  p = pollfds_arg(L, 1, few, sizeof few / sizeof few[0], &n);
  r = wait_pollfds(L, p, n, luamp_deadline_arg(L, 2), spin);
  push_ready(L, p, n, r, out ? 4 : 0);
  return 1;
}

/* ---- manager round trips in C (issue 18) --------------------------------

   A manager dict get cost ~25k instructions in the server and ~10k in
   the client (callgrind), most of them Lua: the server loop's round
   (listener, timers, pools), the dispatch, two pcalls, a 4-item table
   encoded and decoded on each side.  With a CPU taken by another program
   the two sides run in turn on the other, and those instructions were
   the round trip's cost.  So the usual request goes in C at both ends:
   the client encodes {seq, id, method, key} of small scalars itself
   (conn:_request) and takes an ok answer's value without a table
   (conn:_reply); the server's loop, while it has nothing else to do,
   waits and answers plain dict gets without going back to Lua
   (core._serve_gets).  Everything else goes the Lua way. */

/* The byte length of the MessagePack integer at p (n bytes there) that
 * luamp_decode_small reads, 0 for anything else. */
static size_t small_int_len(const unsigned char *p, size_t n) {
  size_t k;
  if (n == 0) return 0;
  switch (p[0]) {
    case 0xcc: case 0xd0: k = 2; break;
    case 0xcd: case 0xd1: k = 3; break;
    case 0xce: case 0xd2: k = 5; break;
    case 0xd3: k = 9; break;
    default: k = p[0] <= 0x7f || p[0] >= 0xe0 ? 1 : 0;
  }
  return k <= n ? k : 0;
}

/* Pushes the small integer at *p (advancing it) and returns it; 0 with
 * nothing pushed when there is none (or it is not positive). */
static lua_Integer take_pos_int(lua_State *L, const unsigned char **p,
                                const unsigned char *end) {
  size_t k = small_int_len(*p, (size_t)(end - *p));
  lua_Integer v;
  if (k == 0 || !luamp_decode_small(L, (const char *)*p, k)) return 0;
  v = lua_tointeger(L, -1);
  if (v <= 0) {
    lua_pop(L, 1);
    return 0;
  }
  *p += k;
  return v;
}

/* Writes the n bytes at p whole, without raising: 1 when done, 0 when
 * nothing could be written, -1 when a part was (the stream is broken). */
static int write_quiet(struct conn *c, const char *p, size_t n) {
  size_t sent = 0;
  if (c->srv) {
    struct iovec iov = {(void *)p, n};
    return srv_write(c, &iov, 1);
  }
  while (sent < n) {
    ssize_t w = luamp_sys.write(WFD(c), p + sent, n - sent);
    if (w >= 0) {
      sent += (size_t)w;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      struct pollfd q = {WFD(c), POLLOUT, 0};
      (void)luamp_sys.poll(&q, 1, -1);
    } else if (errno != EINTR) {
      if (sent == 0) return 0;
      c->wbroken = 1;
      return -1;
    }
  }
  return 1;
}

#define QUICK_REPLY_MAX 4096    /* longer answers go the Lua way */
static lua_Integer quick_count;  /* requests quick_get answered */

/* core._quick() -> how many requests this process answered in C (a
 * manager's m:_debug_info().quick) */
static int l_quick(lua_State *L) {
  lua_pushinteger(L, quick_count);
  return 1;
}

/* The answer to a dict get, the request's payload p/n (a whole frame,
 * alone in c's read-ahead), when it is {seq, id, "get", key} for a dict
 * (metatable at dmt) among the records at ri, the key and the value
 * plain scalars: written, 1; else 0 (nothing done, the frame left to
 * Lua).  At ks: the strings "obj" and "vals". */
static int quick_get(lua_State *L, struct conn *c, const char *payload,
                     size_t n, int ri, int dmt, int ks) {
  const unsigned char *p = (const unsigned char *)payload, *end = p + n;
  unsigned char out[QUICK_REPLY_MAX];
  size_t vn, hlen, on;
  lua_Integer seq, id;
  const char *v;
  int t;
  if (n < 6 || *p++ != 0x94) return 0;
  if ((seq = take_pos_int(L, &p, end)) == 0) return 0;
  if ((id = take_pos_int(L, &p, end)) == 0) return 0;
  if (end - p < 5 || memcmp(p, "\xa3get", 4) != 0) return 0;
  p += 4;
  if (!luamp_decode_small(L, (const char *)p, (size_t)(end - p))) return 0;
  if (lua_rawgeti(L, ri, id) != LUA_TTABLE) return 0;              /* rec */
  lua_pushvalue(L, ks);
  if (lua_rawget(L, -2) != LUA_TTABLE || !lua_getmetatable(L, -1))
    return 0;
  if (!lua_rawequal(L, -1, dmt)) return 0;
  lua_pushvalue(L, ks + 1);
  if (lua_rawget(L, -3) != LUA_TTABLE) return 0;
  lua_pushvalue(L, -5);                                             /* key */
  t = lua_rawget(L, -2);
  if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER &&
      t != LUA_TSTRING)
    return 0;
  /* frame: header, then [seq, 0, value] ([seq, 0] for nil) */
  on = 5;
  out[4] = t == LUA_TNIL ? 0x92 : 0x93;
  lua_pushinteger(L, seq);
  on += luamp_encode_small(L, -1, out + on);
  lua_pop(L, 1);
  out[on++] = 0;
  if (t != LUA_TNIL) {
    vn = luamp_encode_small(L, -1, out + on);
    if (vn == 0) {
      v = luamp_encode(L, lua_gettop(L), 0, &vn, "result");
      if (vn > sizeof out - on) return 0;
      memcpy(out + on, v, vn);
    }
    on += vn;
  }
  put_header(out, on - 4, &hlen);
  /* (written before the request is taken: a write that failed at once
     leaves it to the Lua way, which drops the client) */
  if (write_quiet(c, (const char *)out, on) == 0) return 0;
  c->rpos = c->rend = 0;
  quick_count++;
  return 1;
}

/* The connection of the client record at ci when its requests may be
 * answered in C (open, authenticated, no failed write to report, no
 * message half read), else NULL.  (Only Lua changes these, so one look
 * serves a whole core._serve_gets.) */
static struct conn *quick_client(lua_State *L, int ci) {
  struct conn *c = NULL;
  int base = lua_gettop(L);
  if (lua_type(L, ci) == LUA_TTABLE &&
      lua_getfield(L, ci, "closed") == LUA_TBOOLEAN && !lua_toboolean(L, -1) &&
      lua_getfield(L, ci, "err") == LUA_TNIL &&
      lua_getfield(L, ci, "trusted") == LUA_TBOOLEAN && lua_toboolean(L, -1)) {
    lua_getfield(L, ci, "conn");
    c = luaL_testudata(L, -1, CONN_TNAME);
    if (c != NULL && (c->fd < 0 || !c->trusted || c->nb || c->ra == NULL))
      c = NULL;
  }
  lua_settop(L, base);
  return c;
}

/* Serves what c's client sent, if it is a whole quick get alone: 1 when
 * answered; 0 when the client's turn is Lua's. */
static int serve_one(lua_State *L, struct conn *c, int ri, int dmt, int ks) {
  uint32_t len;
  int base = lua_gettop(L), done = 0;
  if (c->rbroken || c->wbroken || luamp_pending_writes || wq_left(c) > 0)
    return 0;
  if (!c->unixsock && !c->rnb) {      /* a pipe (the server's alone) */
    int fl = luamp_sys.fcntl(c->fd, F_GETFL, 0);
    if (fl >= 0 && luamp_sys.fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) == 0)
      c->rnb = 1;
  }
  ra_check(c);
  if (c->rpos == c->rend) {
    ssize_t r = read_nowait(c, c->ra, RA_SIZE);
    if (r <= 0) return 0;             /* end of file, error: Lua's */
    c->rpos = 0;
    c->rend = (size_t)r;
    c->rpid = luamp_pid();
  }
  if (c->inq_len > 0 || c->rend - c->rpos < 5) return 0;
  {
    const unsigned char *h = (const unsigned char *)c->ra + c->rpos;
    len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 |
          (uint32_t)h[2] << 8 | h[3];
  }
  if (len != c->rend - c->rpos - 4) return 0;   /* not one whole frame */
  done = quick_get(L, c, c->ra + c->rpos + 4, len, ri, dmt, ks);
  lua_settop(L, base);
  return done;
}

/* core._serve_gets(fds, timeout, out, clients, nc, recs, dict_mt) ->
 * out: core.wait_fds(fds, timeout, true, out) for a manager's loop (its
 * clients[1..nc] are fds[1..nc]), which meanwhile answers the quick gets
 * (quick_get) of clients[1] whenever it alone is ready: the first
 * client in the poll found alone needs no drain (Server:drain in
 * manager_server.lua).  It returns when any other fd is ready, when
 * clients[1] sent anything else (left unread or read ahead, for Lua),
 * or at the deadline: as wait_fds would have. */
static int l_serve_gets(lua_State *L) {
  struct pollfd few[16], *p;
  struct conn *c = NULL;
  nfds_t n;
  double deadline;
  lua_Integer nc;
  int r, ks;
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  nc = luaL_checkinteger(L, 5);
  luaL_checktype(L, 6, LUA_TTABLE);
  luaL_checktype(L, 7, LUA_TTABLE);
  luaL_checkstack(L, 40, NULL);
  deadline = luamp_deadline_arg(L, 2);
  lua_settop(L, 7);
  p = pollfds_arg(L, 1, few, sizeof few / sizeof few[0], &n);
  luaL_argcheck(L, nc >= 0 && (nfds_t)nc <= n, 5, "more clients than fds");
  lua_pushliteral(L, "obj");
  ks = lua_gettop(L);
  lua_pushliteral(L, "vals");
  if (nc > 0) {
    lua_rawgeti(L, 4, 1);
    c = quick_client(L, lua_gettop(L));
  }
  for (;;) {
    r = wait_pollfds(L, p, n, deadline, 1);
    if (r != 1 || c == NULL || !(p[0].revents & POLLIN) ||
        !serve_one(L, c, 6, 7, ks) || wq_left(c) > 0)
      break;
    if (deadline >= 0 && luamp_now() >= deadline) {
      r = 0;
      break;
    }
  }
  push_ready(L, p, n, r, 3);
  /* out.queued: an answer to clients[1] waits in its connection (its
   * socket is full): the loop then blocks it (M.block) */
  lua_pushboolean(L, c != NULL && wq_left(c) > 0);
  lua_setfield(L, -2, "queued");
  return 1;
}

/* conn:_request(seq, id, method, arg) -> whether it sent {seq, id,
 * method, arg} (as send would), seq and id positive integers, method a
 * short ASCII string, arg an integer or a short ASCII string; false,
 * with nothing sent, for other values. */
static int conn_request(lua_State *L) {
  struct conn *c = check_writable(L, 1);
  unsigned char out[4 + 1 + 3 * LUAMP_SMALL_MAX];
  size_t on = 5, k, hlen;
  if (luamp_pending_writes && !c->nofence) luamp_flush_writes(L);
  out[4] = 0x94;
  for (int i = 2; i <= 5; i++) {
    if (i < 4 && (!lua_isinteger(L, i) || lua_tointeger(L, i) <= 0)) k = 0;
    else if (i == 4 && lua_type(L, i) != LUA_TSTRING) k = 0;
    else k = luamp_encode_small(L, i, out + on);
    if (k == 0) {
      lua_pushboolean(L, 0);
      return 1;
    }
    on += k;
  }
  put_header(out, on - 4, &hlen);
  {
    struct iovec iov = {out, on};
    write_all(L, c, &iov, 1, -1);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:_reply(seq) -> true, value for the next message when it is the ok
 * answer {seq, 0, value} (value decoded as recv would); else false and
 * the message, as recv returns it (errors: recv's). */
static int conn_reply(lua_State *L) {
  struct conn *c = check_readable(L, 1);
  lua_Integer seq = luaL_checkinteger(L, 2);
  uint64_t n = read_header(L, c, -1);
  int flags = decode_flags(c);
  if (n <= RA_SIZE) {
    const char *p = read_view(L, c, (size_t)n, -1);
    const unsigned char *u = (const unsigned char *)p;
    size_t k = n > 2 ? small_int_len(u + 1, (size_t)n - 1) : 0;
    if (k > 0 && (u[0] == 0x92 || u[0] == 0x93) && 1 + k < n &&
        u[1 + k] == 0 && (u[0] == 0x92) == (n == 2 + k) &&
        luamp_decode_small(L, p + 1, k)) {
      int mine = lua_tointeger(L, -1) == seq;
      lua_pop(L, 1);
      if (mine) {
        lua_pushboolean(L, 1);
        if (u[0] == 0x92) lua_pushnil(L);
        else if (!luamp_decode_small(L, p + 2 + k, (size_t)n - 2 - k))
          luamp_decode(L, p + 2 + k, (size_t)n - 2 - k, flags);
        return 2;
      }
    }
    lua_pushboolean(L, 0);
    decode_msg(L, c, p, (size_t)n, flags);
    rbuf_trim(c, (size_t)n);
  } else {
    char *p = read_payload(L, c, n, -1, 0);
    lua_pushboolean(L, 0);
    decode_msg(L, c, p, (size_t)n, flags);
    rbuf_trim(c, (size_t)n);
  }
  return 2;
}

/* ---- Connections and Listeners as handles ------------------------------

   Their handle bytes: kind ('C' or 'L'), flags, the fd's index (2 bytes)
   in the message's set (see "passing fds").  A duplex Pipe's end has two
   fds: 'C', flags with HF_PAIR, the length of the first fd's handle
   bytes (1 byte), then those of the read fd and of the write fd -- both
   fds in the one message's set, or two tickets with the keeper.  A
   Connection arrives with the direction and trust it had: the sender
   vouches for it, as it does for any value of a trusted message.  A
   Listener's Unix socket file stays its binder's to remove. */

enum { HF_READ = 1, HF_WRITE = 2, HF_TRUSTED = 4, HF_PEER = 8, HF_UNIX = 16,
       HF_PAIR = 32, HF_PIPE = 64 };

static void conn_handle_encode(lua_State *L, int idx) {
  struct conn *c = luamp_self(L, idx, &conn_type);
  int f = (c->readable ? HF_READ : 0) | (c->writable ? HF_WRITE : 0) |
          (c->trusted ? HF_TRUSTED : 0) | (c->peer ? HF_PEER : 0) |
          (c->unixsock ? HF_UNIX : 0) | (c->ispipe ? HF_PIPE : 0);
  char h[3];
  if (c->fd < 0) luamp_raise(L, "EncodeError", "connection is closed");
  push_fd_handle(L, 'C', f, c->fd, "Connection");
  if (!c->pair) return;
  push_fd_handle(L, 'C', f, c->wfd, "Connection");
  h[0] = 'C';
  h[1] = (char)(f | HF_PAIR);
  h[2] = (char)lua_rawlen(L, -2);     /* (at most 84 bytes) */
  lua_pushlstring(L, h, 3);
  lua_insert(L, -3);
  lua_concat(L, 3);
}

static void conn_handle_decode(lua_State *L, const char *p, size_t n) {
  struct conn *c = new_conn(L);
  int f = n >= 2 ? (unsigned char)p[1] : 0;
  if (f & HF_PAIR) {
    size_t n1 = n >= 3 ? (unsigned char)p[2] : 0;
    if (n1 < 4 || n < 3 + n1 + 4)
      luamp_raise(L, "DecodeError", "malformed Connection handle");
    c->pair = 1;                      /* both fds are the handle's */
    c->fd = fdin_take(L, p + 3, n1, 0);
    c->wfd = fdin_take(L, p + 3 + n1, n - 3 - n1, 1);
  } else {
    c->fd = fdin_take(L, p, n, 0);
  }
  c->readable = (f & HF_READ) != 0;
  c->writable = (f & HF_WRITE) != 0;
  c->trusted = (f & HF_TRUSTED) != 0;
  c->peer = (f & HF_PEER) != 0;
  c->unixsock = (f & HF_UNIX) != 0;
  c->ispipe = (f & HF_PIPE) != 0;
  if (f & HF_PAIR) {
    fdin_note(L, p + 3, (unsigned char)p[2]);
    fdin_note(L, p + 3 + (unsigned char)p[2], n - 3 - (unsigned char)p[2]);
  } else {
    fdin_note(L, p, n);
  }
}

static void listener_handle_encode(lua_State *L, int idx) {
  struct listener *l = luamp_self(L, idx, &listener_type);
  if (l->fd < 0) luamp_raise(L, "EncodeError", "listener is closed");
  push_fd_handle(L, 'L', l->family == AF_UNIX ? HF_UNIX : 0, l->fd,
                 "Listener");
}

static void listener_handle_decode(lua_State *L, const char *p, size_t n) {
  struct listener *l = lua_newuserdatauv(L, sizeof *l, 0);
  memset(l, 0, sizeof *l);
  l->fd = -1;
  luaL_setmetatable(L, LISTENER_TNAME);
  l->fd = fdin_take(L, p, n, 0);
  l->family = (unsigned char)p[1] & HF_UNIX ? AF_UNIX : AF_INET;
  fdin_note(L, p, n);
}

static const struct luamp_handle_ops fd_handle_ops[] = {
  {CONN_TNAME, conn_handle_encode, conn_handle_decode},
  {LISTENER_TNAME, listener_handle_encode, listener_handle_decode},
};

static const luaL_Reg conn_meth[] = {
  {"send", conn_send}, {"recv", conn_recv},
  {"send_bytes", conn_send_bytes}, {"recv_bytes", conn_recv_bytes},
  {"recv_bytes_into", conn_recv_bytes_into},
  {"poll", conn_poll}, {"fileno", conn_fileno}, {"pollfd", conn_fileno},
  {"events", conn_events}, {"timeout", conn_timeout}, {"close", conn_close},
  {"_wait_fd", conn_wait_fd}, {"_recv_nowait", conn_recv_nowait},
  {"_recv_small", conn_recv_small}, {"_request", conn_request},
  {"_reply", conn_reply}, {"_serve_mode", conn_serve_mode},
  {"_flush_out", conn_flush_out}, {NULL, NULL}
};
static const luaL_Reg conn_mm[] = {
  {"__gc", conn_close}, {"__close", conn_close},
  {"__tostring", conn_tostring}, {NULL, NULL}
};
static const luaL_Reg listener_meth[] = {
  {"accept", listener_accept}, {"address", listener_address},
  {"fileno", listener_fileno}, {"pollfd", listener_fileno},
  {"events", listener_events}, {"timeout", listener_timeout},
  {"close", listener_close}, {NULL, NULL}
};
static const luaL_Reg listener_mm[] = {
  {"__gc", listener_close}, {"__close", listener_close},
  {"__tostring", listener_tostring}, {NULL, NULL}
};
static struct luamp_type conn_type = {
  CONN_TNAME, conn_meth, conn_mm, conn_index, 0, 0, 0
};
static struct luamp_type listener_type = {
  LISTENER_TNAME, listener_meth, listener_mm, NULL, 0, 0, 0
};

int luamp_open_conn(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"Pipe", l_pipe},
    {"connection_from_fd", l_from_fd},
    {"listen", l_listen},
    {"connect", l_connect},
    {"deliver_challenge", l_deliver_challenge},
    {"answer_challenge", l_answer_challenge},
    {"set_trusted", l_set_trusted},
    {"hs_challenge", l_hs_challenge},
    {"hs_verify", l_hs_verify},
    {"hs_answer", l_hs_answer},
    {"hmac_sha256", l_hmac_sha256},
    {"_set_nofence", l_set_nofence},
    {"_set_spin", l_set_spin},
    {"wait_fds", l_wait_fds},
    {"_serve_gets", l_serve_gets},
    {"_quick", l_quick},
    {NULL, NULL}
  };
  luamp_newtype(L, &conn_type);
  luamp_newtype(L, &listener_type);
  lua_pop(L, 2);
  luamp_register_handle(L, &fd_handle_ops[0]);
  luamp_register_handle(L, &fd_handle_ops[1]);
  if (luaL_newmetatable(L, FDSET_TNAME)) {
    lua_pushcfunction(L, fdset_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, fdset_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  /* fdout's guard: a to-be-closed value whose close disarms it */
  lua_newuserdatauv(L, 1, 0);
  lua_newtable(L);
  lua_pushcfunction(L, fdout_close);
  lua_setfield(L, -2, "__close");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &fdout_guard_key);
  lua_newtable(L);                     /* claimed: ticket -> object */
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &claimed_key);
  luamp_fdkeep_init();
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
