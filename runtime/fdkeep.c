/*
 * fdkeep.c -- the tree's fd keeper: Connections and Listeners through
 * carriers that cannot hold an fd (a Queue's shared ring, a one-way
 * Pipe, a Pool's task, a manager call).
 *
 * conn.c sends fds with SCM_RIGHTS when the message itself goes over a
 * Unix socket.  Any other carrier only moves bytes, and the sender may be
 * gone long before the receiver decodes (a worker puts a Connection in a
 * queue and exits).  So the fd is parked with a small process that lives
 * as long as the program: the keeper.  The sender hands it the fd with a
 * random 128-bit ticket; the message carries the ticket and the keeper's
 * name; the receiver presents the ticket and gets the fd back.  Neither
 * ever waits for the other: each talks only to the keeper, with a
 * deadline, so a receiver that dies cannot hang a sender.
 *
 * The keeper is an abstract Unix socket (SOCK_SEQPACKET: one request, one
 * datagram) named after the process that opened the module first in this
 * process image -- the program's root -- plus a random nonce: processes
 * forked from it inherit the name and share one keeper.  It is started on
 * first need by whichever process needs it (binding the name is the
 * lock: a loser of the race just connects) through a double fork, so it
 * is nobody's child to reap; it detaches (setsid: Ctrl-C is not for it),
 * closes every fd but its socket, unmaps the shared mappings it inherited
 * (queues' and Values' memory stays the program's), and exits when the
 * root process is gone, closing what was never claimed.  Both ends check
 * the peer's uid (SO_PEERCRED); tickets are secrets that only messages of
 * the tree hold, and conn.c decodes a handle only from trusted data.
 *
 * A message that is never received leaves its fd parked until the program
 * ends (the keeper cannot know that a queue was dropped); a ticket is
 * good once.  The keeper is plain C with static tables: it was forked
 * from a process that may have had threads, so it never calls malloc.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include "internal.h"

#define TICKET_LEN LUAMP_FDKEEP_TICKET
#define KEEP_MAX 4096          /* fds parked at once */
#define CLIENT_MAX 64          /* requests served at once */
#define REPLY_TIMEOUT 10.0     /* seconds a request waits for the keeper */
#define CLIENT_TIMEOUT 5000    /* ms the keeper gives a silent client */
#define MAP_MAX 8192           /* shared mappings the keeper can drop */

/* This process image's keeper: its name (abstract: leading NUL) and the
 * identity of the root it lives for. */
static char kname[LUAMP_FDKEEP_NAME];
static size_t knamelen;
static uint64_t root_id;

void luamp_fdkeep_init(void) {
  uint64_t nonce = 0;
  if (knamelen > 0) return;               /* inherited, or done */
  root_id = luamp_process_id();
  if (luamp_sys.getrandom(&nonce, sizeof nonce, GRND_NONBLOCK) != sizeof nonce)
    nonce = (uint64_t)luamp_now() * 1000003u ^ (uint64_t)getpid();
  kname[0] = '\0';
  knamelen = 1 + (size_t)snprintf(kname + 1, sizeof kname - 1,
                                  "luamp-fdkeep-%d-%016llx", (int)luamp_pid(),
                                  (unsigned long long)nonce);
}

static socklen_t addr_of(struct sockaddr_un *a, const char *name, size_t n) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  memcpy(a->sun_path, name, n);
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
}

static int same_uid(int fd) {
  struct ucred cr;
  socklen_t len = sizeof cr;
  return luamp_sys.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 &&
         cr.uid == getuid();
}

/* One datagram with at most one fd (fd_out: -1 when none came; extra fds
 * are closed). */
static ssize_t recv_one(int s, char *buf, size_t n, int *fd_out, int flags) {
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(sizeof(int) * 4)];
  } u;
  struct iovec iov = {buf, n};
  struct msghdr m;
  struct cmsghdr *h;
  ssize_t r;
  memset(&m, 0, sizeof m);
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = u.b;
  m.msg_controllen = sizeof u.b;
  *fd_out = -1;
  do r = luamp_sys.recvmsg(s, &m, flags | MSG_CMSG_CLOEXEC);
  while (r < 0 && errno == EINTR && !(flags & MSG_DONTWAIT));
  if (r < 0) return r;
  for (h = CMSG_FIRSTHDR(&m); h != NULL; h = CMSG_NXTHDR(&m, h))
    if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
      size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      int fds[4];
      memcpy(fds, CMSG_DATA(h), k * sizeof(int));
      for (size_t i = 0; i < k; i++) {
        if (*fd_out < 0) *fd_out = fds[i];
        else luamp_sys.close(fds[i]);
      }
    }
  return r;
}

static ssize_t send_one(int s, const char *buf, size_t n, int fd, int flags) {
  union {
    struct cmsghdr h;
    char b[CMSG_SPACE(sizeof(int))];
  } u;
  struct iovec iov = {(void *)buf, n};
  struct msghdr m;
  ssize_t r;
  memset(&m, 0, sizeof m);
  memset(&u, 0, sizeof u);
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (fd >= 0) {
    struct cmsghdr *h;
    m.msg_control = u.b;
    m.msg_controllen = sizeof u.b;
    h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof fd);
  }
  do r = luamp_sys.sendmsg(s, &m, flags | MSG_NOSIGNAL);
  while (r < 0 && errno == EINTR);
  return r;
}

/* ---- the keeper process ------------------------------------------------- */

/* The keeper's own calls (its set-up, its maps, its poll and accept loop,
 * the closes of what it parked) stay direct, not through luamp_sys: it is
 * a daemon of its own, forked from a process that may have had threads,
 * and it runs plain C with static tables; a failure there changes nothing
 * a caller could see (a request then times out or finds it gone, which
 * the callers handle). */

static struct { unsigned char ticket[TICKET_LEN]; int fd; } parked[KEEP_MAX];
static int nparked;
static struct pollfd pfd[1 + CLIENT_MAX];
static double cl_deadline[1 + CLIENT_MAX];

/* The shared mappings inherited from the forking process: the keeper
 * must not keep queues' and Values' memory alive. */
static void drop_shared_maps(void) {
  static char buf[65536];
  static uintptr_t lo[MAP_MAX], hi[MAP_MAX];
  int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC), k = 0;
  size_t have = 0;
  if (fd < 0) return;
  for (;;) {
    ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
    char *line = buf, *nl;
    if (r <= 0) break;
    have += (size_t)r;
    buf[have] = '\0';
    while ((nl = strchr(line, '\n')) != NULL) {
      unsigned long a, b;
      char perms[8];
      *nl = '\0';
      if (sscanf(line, "%lx-%lx %7s", &a, &b, perms) == 3 && perms[3] == 's' &&
          k < MAP_MAX) {
        lo[k] = a;
        hi[k++] = b;
      }
      line = nl + 1;
    }
    have -= (size_t)(line - buf);
    memmove(buf, line, have);
  }
  close(fd);
  for (int i = 0; i < k; i++) munmap((void *)lo[i], hi[i] - lo[i]);
}

static void serve(int i) {
  char req[1 + TICKET_LEN];
  int fd, c = pfd[i].fd, j;
  ssize_t r = recv_one(c, req, sizeof req, &fd, MSG_DONTWAIT);
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  if (r == (ssize_t)sizeof req && req[0] == 'P' && fd >= 0) {
    if (nparked == KEEP_MAX) {
      close(fd);
      send_one(c, "F", 1, -1, MSG_DONTWAIT);
    } else {
      memcpy(parked[nparked].ticket, req + 1, TICKET_LEN);
      parked[nparked++].fd = fd;
      send_one(c, "K", 1, -1, MSG_DONTWAIT);
    }
  } else if (r == (ssize_t)sizeof req && req[0] == 'C' && fd < 0) {
    for (j = 0; j < nparked; j++)
      if (memcmp(parked[j].ticket, req + 1, TICKET_LEN) == 0) break;
    if (j == nparked) {
      send_one(c, "N", 1, -1, MSG_DONTWAIT);
    } else if (send_one(c, "K", 1, parked[j].fd, MSG_DONTWAIT) == 1) {
      close(parked[j].fd);       /* (in flight to the claimer now) */
      parked[j] = parked[--nparked];
    }
  } else if (fd >= 0) {
    close(fd);
  }
  close(c);                      /* one request per connection */
  pfd[i].fd = -1;
}

static LUAMP_NORETURN void keeper_main(int lfd) {
  struct sigaction sa;
  sigset_t none;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  for (int s = 1; s < NSIG; s++) sigaction(s, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  setsid();
  if (chdir("/") != 0) {}       /* (holds no directory busy) */
  if (lfd > 0) close_range(0, (unsigned)lfd - 1, 0);
  close_range((unsigned)lfd + 1, ~0u, 0);
  drop_shared_maps();
  fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);   /* accept loop */
  pfd[0].fd = lfd;
  pfd[0].events = POLLIN;
  for (int i = 1; i <= CLIENT_MAX; i++) pfd[i].fd = -1;
  for (;;) {
    int r = poll(pfd, 1 + CLIENT_MAX, 1000);
    double now = luamp_now();
    if (r < 0 && errno != EINTR) break;
    if (!luamp_id_alive(root_id)) break;
    for (int i = 1; i <= CLIENT_MAX; i++) {
      if (pfd[i].fd < 0) continue;
      if (pfd[i].revents) serve(i);
      else if (now > cl_deadline[i]) {
        close(pfd[i].fd);
        pfd[i].fd = -1;
      }
    }
    if (pfd[0].revents & POLLIN)
      for (int i = 1; i <= CLIENT_MAX; i++) {
        int c;
        if (pfd[i].fd >= 0) continue;
        c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c < 0) break;
        if (!same_uid(c)) {
          close(c);
          continue;
        }
        pfd[i].fd = c;
        pfd[i].events = POLLIN;
        cl_deadline[i] = now + CLIENT_TIMEOUT / 1000.0;
      }
  }
  _exit(0);
}

/* Starts this tree's keeper unless another process just did (the bind
 * decides).  0, or -1 with errno.
 *
 * Not through luamp_fork, and so without its threaded-fork warning: the
 * caller may be a threaded host (under the forkserver start method its
 * children come from the server, but a Connection it sends is parked
 * here), and this fork is safe there.  The middle child only forks again
 * and _exits; the keeper runs none of the host's code and no Lua, takes
 * no lock and never calls malloc (static tables), so a lock another
 * thread held at the fork cannot stop it.  The host's at-fork hooks are
 * not run either: they prepare children that run the host's code.
 * Signals are blocked around the fork (keeper_main sets its own). */
static int start_keeper(void) {
  struct sockaddr_un a;
  socklen_t len = addr_of(&a, kname, knamelen);
  int lfd = luamp_sys.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), st;
  int err;
  sigset_t all, old;
  pid_t pid;
  if (lfd < 0) return -1;
  if (luamp_sys.bind(lfd, (struct sockaddr *)&a, len) != 0 ||
      luamp_sys.listen(lfd, 128) != 0) {
    err = errno;
    luamp_sys.close(lfd);
    if (err == EADDRINUSE) return 0;      /* someone else's keeper */
    errno = err;
    return -1;
  }
  sigfillset(&all);
  fflush(NULL);                           /* (the middle child _exits) */
  if ((err = luamp_sys.pthread_sigmask(SIG_SETMASK, &all, &old)) != 0) {
    luamp_sys.close(lfd);
    errno = err;
    return -1;
  }
  pid = luamp_sys.fork();
  if (pid == 0) {
    /* (direct: the middle child's only call; its failure leaves no
     * keeper, and the sender's next dial starts one) */
    if (fork() == 0) keeper_main(lfd);
    _exit(0);
  }
  err = errno;
  /* (cannot fail: the same call accepted this set a moment ago) */
  (void)luamp_sys.pthread_sigmask(SIG_SETMASK, &old, NULL);
  luamp_sys.close(lfd);
  if (pid < 0) {
    errno = err;
    return -1;
  }
  while (luamp_sys.waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
  return 0;
}

/* A connection to the keeper named name; start: start it when it is not
 * there (the sender's side; the receiver's finds it gone). */
static int dial(lua_State *L, const char *name, size_t n, int start) {
  struct sockaddr_un a;
  socklen_t len = addr_of(&a, name, n);
  for (int tries = 0; tries < 200; tries++) {
    int s = luamp_sys.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), err;
    if (s < 0) luamp_raise_errno(L, "OSError", errno, "socket");
    if (luamp_sys.connect(s, (struct sockaddr *)&a, len) == 0) {
      if (same_uid(s)) return s;
      luamp_sys.close(s);
      luamp_raise(L, "OSError", "the fd keeper's socket belongs to another "
                  "user");
    }
    err = errno;
    luamp_sys.close(s);
    if (err == EINTR) continue;
    if (err == EAGAIN) {                  /* its backlog is full */
      if (luamp_robust_poll(L, NULL, 0, luamp_deadline(0.005)) == -2)
        luamp_raise_interrupt(L);
      continue;
    }
    if (err != ECONNREFUSED && err != ENOENT)
      luamp_raise_errno(L, "OSError", err, "connect to the fd keeper");
    if (!start)
      luamp_raise(L, "DecodeError", "the fd keeper holding this object is "
                  "gone (its program ended or it was killed)");
    if (start_keeper() != 0)
      luamp_raise_errno(L, "OSError", errno, "starting the fd keeper");
  }
  luamp_raise(L, "OSError", "cannot reach the fd keeper");
}

/* One request (op, ticket [, fd_in]) and its one-byte reply; *fd_out
 * gets the fd that came with it (-1: none). */
static char request(lua_State *L, const char *name, size_t n, char op,
                    const unsigned char *ticket, int fd_in, int *fd_out) {
  char req[1 + TICKET_LEN], reply = 0;
  int s = dial(L, name, n, op == 'P'), r;
  struct pollfd p = {s, POLLIN, 0};
  req[0] = op;
  memcpy(req + 1, ticket, TICKET_LEN);
  *fd_out = -1;
  if (send_one(s, req, sizeof req, fd_in, 0) != (ssize_t)sizeof req) {
    int err = errno;
    luamp_sys.close(s);
    luamp_raise_errno(L, "OSError", err, "fd keeper request");
  }
  r = luamp_robust_poll(L, &p, 1, luamp_deadline(REPLY_TIMEOUT));
  if (r > 0 && recv_one(s, &reply, 1, fd_out, MSG_DONTWAIT) != 1) reply = 0;
  luamp_sys.close(s);
  if (r == -2) {
    if (*fd_out >= 0) luamp_sys.close(*fd_out);
    luamp_raise_interrupt(L);
  }
  if (r == 0)
    luamp_raise(L, "TimeoutError", "the fd keeper did not answer in %d s",
                (int)REPLY_TIMEOUT);
  return reply;
}

void luamp_fdkeep_park(lua_State *L, int fd, unsigned char *ticket,
                       const char **name, size_t *n) {
  int none;
  char reply;
  luamp_fdkeep_init();
  if (luamp_sys.getrandom(ticket, TICKET_LEN, 0) != TICKET_LEN)
    luamp_raise_errno(L, "OSError", errno, "getrandom");
  reply = request(L, kname, knamelen, 'P', ticket, fd, &none);
  if (none >= 0) luamp_sys.close(none);
  if (reply == 'F')
    luamp_raise(L, "OSError", "the fd keeper holds %d objects never "
                "received: no room for more", KEEP_MAX);
  if (reply != 'K') luamp_raise(L, "OSError", "the fd keeper failed");
  *name = kname;
  *n = knamelen;
}

int luamp_fdkeep_claim(lua_State *L, const char *name, size_t n,
                       const unsigned char *ticket) {
  int fd;
  char reply = request(L, name, n, 'C', ticket, -1, &fd);
  if (reply == 'K' && fd >= 0) return fd;
  if (fd >= 0) luamp_sys.close(fd);
  luamp_raise(L, "DecodeError", "the fd of this object is no longer held "
              "(the message was received before)");
}
