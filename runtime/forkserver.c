/*
 * forkserver.c -- the "forkserver" start method: a small process, forked
 * early, that forks every child on request.
 *
 * Why: fork copies the page tables of the whole caller (about 45 us per
 * MiB of heap) and only the calling thread -- a lock another thread of an
 * embedding host held at that instant stays locked in the child for ever.
 * The server is forked while the owner is small and single-threaded (from
 * C, luamp_forkserver_start in main() before any thread; from Lua, when
 * the start method is chosen); its children are forks of the server, so
 * they start from its small heap, with its one thread and its locks.
 *
 * The server runs a Lua state of its own, made fresh after the fork
 * (luaL_newstate, the standard libraries, the module, the host's init
 * callback, the modules preloaded on request).  The owner's state is
 * inherited as memory but never touched again.  A child runs
 * multiprocessing.forkserver's child_main on the request's payload: the
 * target, its upvalues and arguments travel through the codec, and
 * globals are the server's.  Shared objects (queues, locks, Values) reach
 * a child as handles in that payload; it attaches their memfds through
 * /proc/<pid>/fd of a process that holds them (arena.c), or finds the
 * mapping it inherited from the server.  SharedMemory goes by name.
 *
 * Protocol (a SOCK_STREAM socketpair private to owner and server, so the
 * payload is trusted as the owner's own): a request is struct request and
 * len bytes; the answer is struct reply, then len bytes of error text.  A
 * START answer carries, with SCM_RIGHTS, the read end of a pipe on which
 * the server writes the child's waitpid status (an int) once it reaped it,
 * then closes it: that fd is the child's sentinel in the owner, and
 * process.c's Child handle reads it (join, poll, exit codes; end of file
 * without a status means the server died first: exit code 255).  Signals
 * (terminate, kill) go straight from owner to child: kill(2) needs no
 * parenthood.
 *
 * Lifetime: the server is SIGKILLed by the kernel when the thread that
 * forked it dies (PR_SET_PDEATHSIG) and leaves when its socket reaches end
 * of file (the owner exited or stopped it).  A server found dead at a
 * start makes that start raise ProcessError; the next start starts a new
 * one (multiprocessing/context.lua).  A forked child of the owner never
 * uses the owner's server (fs_owner): it starts its own.
 *
 * The server is single-threaded and waits in poll() on its socket and a
 * signalfd for SIGCHLD; each request is handled to its end (a fork takes
 * a millisecond), so the owner's wait for an answer is bounded.
 */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lualib.h>

#include "internal.h"

enum { REQ_START = 1, REQ_PRELOAD = 2, REQ_MAX_LEN = 1 << 30 };
#define F_DAEMON 1u
#define F_IGNORE_SIGINT 2u
#define F_DIE_WITH_PARENT 4u
/* How long the owner waits for the server's answer before it declares the
 * server hung (it only forks, which takes milliseconds). */
#define ANSWER_TIMEOUT 30.0

struct request { uint32_t kind, flags, len; };
/* value: the child's pid (START), 0 (PRELOAD), or -errno / -1 with an
 * error text of len bytes after it */
struct reply { int32_t value; uint32_t len; };

/* ---- the owner's side (only the process fs_owner uses these) --------- */
static int fs_sock = -1;
static pid_t fs_pid = 0, fs_owner = 0;

/* ---- the server's side ------------------------------------------------ */
/* A child the server forked and has not reaped: wfd is the write end of
 * its status pipe.  (Server process only; closed in each new child.) */
struct job { struct job *next; pid_t pid; int wfd; };
static struct job *jobs = NULL;
static lua_State *server_L = NULL;
static int (*server_init)(lua_State *, void *) = NULL;
static void *server_ud = NULL;

/* Sends iov[0..n) whole (one sendmsg when the socket takes it all). */
static int write_iov(int fd, struct iovec *iov, int n) {
  while (n > 0) {
    struct msghdr mh = {0};
    ssize_t w;
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)n;
    w = luamp_sys.sendmsg(fd, &mh, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return -1;
    for (; n > 0 && (size_t)w >= iov->iov_len; iov++, n--)
      w -= (ssize_t)iov->iov_len;
    if (n > 0) {
      iov->iov_base = (char *)iov->iov_base + w;
      iov->iov_len -= (size_t)w;
    }
  }
  return 0;
}

static int write_all(int fd, const void *p, size_t n) {
  struct iovec iov = {(void *)p, n};
  return write_iov(fd, &iov, 1);
}

/* 0 read all, 1 end of file first, -1 error (errno) */
static int read_all(int fd, void *p, size_t n) {
  char *s = p;
  while (n > 0) {
    ssize_t r = luamp_sys.read(fd, s, n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) return 1;
    s += r;
    n -= (size_t)r;
  }
  return 0;
}

static void reply(int sock, int32_t value, const char *msg, int fd) {
  struct reply r = {value, msg ? (uint32_t)strlen(msg) : 0};
  struct iovec iov = {&r, sizeof r};
  union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
  struct msghdr mh = {0};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (fd >= 0) {
    struct cmsghdr *cm;
    memset(&u, 0, sizeof u);
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof u.buf;
    cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  }
  while (luamp_sys.sendmsg(sock, &mh, MSG_NOSIGNAL) < 0)
    if (errno != EINTR) _exit(0);          /* the owner is gone */
  if (r.len > 0 && write_all(sock, msg, r.len) != 0) _exit(0);
}

/* Makes every inherited fd above 2 but keep a copy of /dev/null: the
 * server holds no end of its owner's pipes (which would hide their end of
 * file), and numbers that inherited (never used) objects name stay taken
 * (as core.detach_inherited_fds does for a manager's server). */
static void detach_fds(int keep) {
  /* (opendir, dup3, dup2: a new server's set-up, direct: a failure
   * leaves an fd open that should not be, which no caller could see) */
  int null = luamp_sys.open("/dev/null", O_RDWR | O_CLOEXEC, 0);
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  if (null < 0 || d == NULL) _exit(1);
  while ((e = readdir(d)) != NULL) {
    char *end;
    long fd = strtol(e->d_name, &end, 10);
    if (*end != '\0' || end == e->d_name || fd <= 2 || fd == keep ||
        fd == dirfd(d) || fd == null)
      continue;
    while (dup3(null, (int)fd, O_CLOEXEC) < 0 && errno == EINTR) {}
  }
  closedir(d);
  /* stdin: /dev/null, as every child of the runtime gets it */
  dup2(null, STDIN_FILENO);
  luamp_sys.close(null);
}

/* ---- in a child of the server ----------------------------------------- */

/* Ctrl-C in a child: the lua.c way (a hook that raises "interrupted!"),
 * which the runtime's waits recognise, so a child interrupted at the
 * terminal leaves with exit code 1 and its traceback, as under fork. */
static void stop_hook(lua_State *L, lua_Debug *ar) {
  if (ar->event == LUA_HOOKRET) return;   /* (as the host's: results first) */
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

/* Every Ctrl-C raises, as in a child started by fork (whose handler is
 * the host's); one that finds the previous one not taken yet (the child
 * stuck in C code or a coroutine) takes SIGINT's default action. */
static void on_sigint(int sig) {
  if (lua_gethook(server_L) == stop_hook) {
    signal(sig, SIG_DFL);
    raise(sig);                 /* (blocked until the handler returns) */
    return;
  }
  lua_sethook(server_L, stop_hook,
              LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
}

LUAMP_NORETURN static void run_child(int sock, int sfd, uint32_t flags,
                                     pid_t server, char *payload, size_t len) {
  lua_State *L = server_L;
  struct sigaction sa;
  luamp_sys.close(sock);
  luamp_sys.close(sfd);
  for (struct job *j = jobs; j; j = j->next) luamp_sys.close(j->wfd);
  /* sigaction, prctl, getppid: a new child's set-up, direct (none of them
   * blocks; a failing prctl ends the child, which its owner sees) */
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = (flags & F_IGNORE_SIGINT) ? SIG_IGN : on_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);            /* (no SA_RESTART: waits see EINTR) */
  if ((flags & F_DIE_WITH_PARENT) &&
      (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != server))
    _exit(1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing.forkserver");
  lua_call(L, 1, 1);                       /* (loaded at server start) */
  lua_getfield(L, -1, "child_main");
  lua_pushlstring(L, payload, len);
  luamp_child_main(L, lua_gettop(L) - 1, lua_gettop(L));
}

/* ---- the server ------------------------------------------------------- */

static void start_job(int sock, int sfd, uint32_t flags, char *payload,
                      size_t len) {
  int p[2];
  pid_t pid, me = getpid();
  struct job *j = malloc(sizeof *j);
  if (j == NULL) {
    reply(sock, -ENOMEM, NULL, -1);
    return;
  }
  if (luamp_sys.pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) {
    reply(sock, -errno, NULL, -1);
    free(j);
    return;
  }
  pid = luamp_fork(server_L);
  if (pid == 0) {
    luamp_sys.close(p[0]);
    luamp_sys.close(p[1]);
    free(j);
    run_child(sock, sfd, flags, me, payload, len);
  }
  if (pid < 0) {
    int err = errno;
    luamp_sys.close(p[0]);
    luamp_sys.close(p[1]);
    free(j);
    reply(sock, -err, NULL, -1);
    return;
  }
  j->pid = pid;
  j->wfd = p[1];
  j->next = jobs;
  jobs = j;
  reply(sock, pid, NULL, p[0]);
  luamp_sys.close(p[0]);
}

/* Reaps finished children and hands each status to its owner's pipe. */
static void reap_jobs(void) {
  int st;
  pid_t pid;
  while ((pid = luamp_sys.waitpid(-1, &st, WNOHANG)) > 0 ||
         (pid < 0 && errno == EINTR))
    for (struct job **pp = &jobs; pid > 0 && *pp; pp = &(*pp)->next)
      if ((*pp)->pid == pid) {
        struct job *j = *pp;
        *pp = j->next;
        /* (a full pipe is impossible: one int into an empty pipe) */
        if (luamp_sys.write(j->wfd, &st, sizeof st) < 0) {}
        luamp_sys.close(j->wfd);
        free(j);
        break;
      }
}

/* PRELOAD: require each name of payload ("\n"-separated) in the server. */
static void preload(int sock, char *payload) {
  lua_State *L = server_L;
  for (char *name = strtok(payload, "\n"); name; name = strtok(NULL, "\n")) {
    lua_getglobal(L, "require");
    lua_pushstring(L, name);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
      reply(sock, -1, luaL_tolstring(L, -1, NULL), -1);
      lua_settop(L, 0);
      return;
    }
  }
  reply(sock, 0, NULL, -1);
}

static const char *const child_modules[] = {
  "multiprocessing", "multiprocessing.forkserver", "multiprocessing.process",
  "multiprocessing.pool_worker", "multiprocessing.queues",
  "multiprocessing.synchronize", "multiprocessing.sharedctypes", NULL
};

static int setup(lua_State *L) {
  luaL_openlibs(L);
  luamp_preload(L);
  if (server_init && server_init(L, server_ud) != 0)
    return luaL_error(L, "the host's fork server init function failed");
  /* what every child would otherwise load (compile) again: the child's
   * entry, Process and the Pool's worker, and the Lua faces of the shared
   * objects a payload's handles are rebuilt with */
  for (const char *const *m = child_modules; *m; m++) {
    lua_getglobal(L, "require");
    lua_pushstring(L, *m);
    lua_call(L, 1, 0);
  }
  return 0;
}

LUAMP_NORETURN static void serve(int sock) {
  sigset_t chld;
  int sfd;
  detach_fds(sock);
  signal(SIGINT, SIG_IGN);      /* Ctrl-C at the terminal is the owner's */
  signal(SIGPIPE, SIG_IGN);
  signal(SIGCHLD, SIG_DFL);
  server_L = luaL_newstate();
  if (server_L == NULL) {
    reply(sock, -1, "cannot create the fork server's Lua state", -1);
    _exit(1);
  }
  lua_pushcfunction(server_L, setup);
  if (lua_pcall(server_L, 0, 0, 0) != LUA_OK) {
    reply(sock, -1, luaL_tolstring(server_L, -1, NULL), -1);
    _exit(1);
  }
  /* signal, sigprocmask, signalfd: the new server's set-up, direct (none
   * blocks; a failing signalfd is answered to the owner as the start's
   * error) */
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) {
    reply(sock, -errno, "signalfd", -1);
    _exit(1);
  }
  reply(sock, 0, NULL, -1);      /* ready */
  for (;;) {
    struct pollfd p[2] = {{sock, POLLIN, 0}, {sfd, POLLIN, 0}};
    struct request rq;
    char *payload;
    if (luamp_sys.poll(p, 2, -1) < 0) continue;     /* (EINTR) */
    if (p[1].revents) {
      struct signalfd_siginfo si;
      while (luamp_sys.read(sfd, &si, sizeof si) > 0) {}
      reap_jobs();
    }
    if (!p[0].revents) continue;
    if (read_all(sock, &rq, sizeof rq) != 0 || rq.len > REQ_MAX_LEN ||
        (payload = malloc((size_t)rq.len + 1)) == NULL)
      _exit(0);                  /* the owner left (or broke the protocol) */
    if (read_all(sock, payload, rq.len) != 0) _exit(0);
    payload[rq.len] = '\0';
    if (rq.kind == REQ_START) start_job(sock, sfd, rq.flags, payload, rq.len);
    else if (rq.kind == REQ_PRELOAD) preload(sock, payload);
    else _exit(0);
    free(payload);
    reap_jobs();
  }
}

/* ---- starting it (owner) ----------------------------------------------- */

/* Closes the socket and reaps the server (no zombie is left): it leaves
 * at once on end of file; one that does not within a second (stopped,
 * hung) is killed. */
static void forget_server(void) {
  int st;
  pid_t r;
  if (fs_sock >= 0) luamp_sys.close(fs_sock);
  if (fs_pid > 0 && fs_owner == luamp_pid()) {
    double deadline = luamp_deadline(1.0);
    while ((r = luamp_sys.waitpid(fs_pid, &st, WNOHANG)) == 0 &&
           luamp_remaining_ms(deadline, -1) > 0)
      luamp_robust_poll(NULL, NULL, 0, luamp_deadline(0.002));
    if (r == 0) {
      luamp_sys.kill(fs_pid, SIGKILL);
      while (luamp_sys.waitpid(fs_pid, &st, 0) < 0 && errno == EINTR) {}
    }
  }
  fs_sock = -1;
  fs_pid = 0;
  fs_owner = 0;
}

/* Reads an answer, waiting at most ANSWER_TIMEOUT (the server answers
 * within a fork's time).  Returns 0, or -1 when the server is gone or
 * hung; *fd gets a passed descriptor (or -1), *msg a malloc'd error text
 * (or NULL); *interrupted is set when Ctrl-C came for L meanwhile (L may
 * be NULL: not interruptible). */
static int read_answer(lua_State *L, int *interrupted, struct reply *r,
                       int *fd, char **msg) {
  union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
  struct iovec iov = {r, sizeof *r};
  struct msghdr mh = {0};
  struct pollfd p = {fs_sock, POLLIN, 0};
  ssize_t n;
  *fd = -1;
  *msg = NULL;
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = u.buf;
  mh.msg_controllen = sizeof u.buf;
  double deadline = luamp_deadline(ANSWER_TIMEOUT);
  int ready = luamp_robust_poll(L, &p, 1, deadline);
  if (ready == -2) {
    /* Ctrl-C: the answer is still read (it is due within a fork's time),
     * so that the socket stays in step; the caller then undoes it */
    *interrupted = 1;
    ready = luamp_robust_poll(NULL, &p, 1, deadline);
  }
  if (ready <= 0) return -1;
  do n = luamp_sys.recvmsg(fs_sock, &mh, MSG_CMSG_CLOEXEC | MSG_WAITALL);
  while (n < 0 && errno == EINTR);
  if (n != (ssize_t)sizeof *r) return -1;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
      memcpy(fd, CMSG_DATA(cm), sizeof *fd);
  if (r->len > 0) {
    if (r->len > 65536 || (*msg = malloc(r->len + 1)) == NULL ||
        read_all(fs_sock, *msg, r->len) != 0) {
      free(*msg);
      *msg = NULL;
      if (*fd >= 0) luamp_sys.close(*fd);
      return -1;
    }
    (*msg)[r->len] = '\0';
  }
  return 0;
}

/* Forks the server from this process.  Returns 0, or -1 with errno (and
 * the server's error text in *msg, malloc'd, when it failed to set up). */
static int start_server(lua_State *L, char **msg) {
  int sv[2], fd;
  pid_t pid, me = luamp_pid();
  struct reply r;
  *msg = NULL;
  if (fs_owner != me) {
    /* inherited from the process we were forked from: not ours to use */
    if (fs_sock >= 0) luamp_sys.close(fs_sock);
    fs_sock = -1;
    fs_pid = 0;
  }
  if (fs_sock >= 0) return 0;
  if (luamp_sys.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return -1;
  pid = luamp_fork(L);
  if (pid == 0) {
    luamp_sys.close(sv[0]);
    /* (prctl, getppid: the new server's set-up, direct; a failure ends
     * it, which the owner's read_answer sees) */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != me) _exit(1);
    serve(sv[1]);
  }
  luamp_sys.close(sv[1]);
  if (pid < 0) {
    int err = errno;
    luamp_sys.close(sv[0]);
    errno = err;
    return -1;
  }
  fs_sock = sv[0];
  fs_pid = pid;
  fs_owner = me;
  if (read_answer(NULL, NULL, &r, &fd, msg) != 0 || r.value != 0) {
    int err = r.value < -1 ? -r.value : ECHILD;
    if (fd >= 0) luamp_sys.close(fd);
    forget_server();
    errno = err;
    return -1;
  }
  return 0;
}

/* In every forked child (of the owner, of the server, any fork): the
 * owner's socket is not the child's to use, and holding it would keep a
 * server whose owner is gone from seeing end of file. */
LUAMP_CHILD_PATH static void forget_in_child(void) {
  /* (nothing written when there is nothing to forget: a child copies
   * each page it writes) */
  if (fs_sock >= 0) {
    luamp_sys.close(fs_sock);
    fs_sock = -1;
  }
  if (fs_pid != 0) fs_pid = 0;
  if (fs_owner != 0) fs_owner = 0;
}

static pthread_once_t forget_once = PTHREAD_ONCE_INIT;
static void register_forget(void) {
  pthread_atfork(NULL, NULL, forget_in_child);
}

LUAMP_API int luamp_forkserver_start(int (*init)(lua_State *L, void *ud),
                                     void *ud) {
  char *msg = NULL;
  int rc;
  pthread_once(&forget_once, register_forget);
  server_init = init;
  server_ud = ud;
  rc = start_server(NULL, &msg);
  if (rc != 0 && msg) {
    int err = errno;
    fprintf(stderr, "luamp: the fork server failed to start: %s\n", msg);
    errno = err;
  }
  free(msg);
  return rc;
}

LUAMP_API pid_t luamp_forkserver_pid(void) {
  return fs_sock >= 0 && fs_owner == luamp_pid() ? fs_pid : 0;
}

/* ---- core functions ----------------------------------------------------- */

LUAMP_NORETURN static void server_gone(lua_State *L) {
  int pid = (int)fs_pid;
  forget_server();
  luamp_raise(L, "ProcessError", "the fork server (pid %d) is gone (killed?)"
              "; the next start starts a new one", pid);
}

/* Sends a request and reads its answer; raises on a dead server. */
static void ask(lua_State *L, uint32_t kind, uint32_t flags, const char *p,
                size_t len, struct reply *r, int *fd) {
  struct request rq = {kind, flags, (uint32_t)len};
  char *msg;
  int interrupted = 0;
  if (luamp_forkserver_pid() == 0)
    luamp_raise(L, "ProcessError", "the fork server is not running");
  if (len > REQ_MAX_LEN)
    luamp_raise(L, "ValueError", "message of %zu bytes is too long for the "
                "fork server", len);
  struct iovec iov[2] = {{&rq, sizeof rq}, {(void *)p, len}};
  if (write_iov(fs_sock, iov, 2) != 0) {
    int err = errno;
    /* (a request cut halfway leaves the socket out of step: forgotten) */
    if (err == EPIPE || err == ECONNRESET) server_gone(L);
    forget_server();
    luamp_raise_errno(L, "OSError", err, "request to the fork server");
  }
  if (read_answer(L, &interrupted, r, fd, &msg) != 0) server_gone(L);
  if (interrupted) {
    /* a child started for a start that is being interrupted: undone */
    if (kind == REQ_START && r->value > 0) luamp_sys.kill(r->value, SIGKILL);
    if (*fd >= 0) luamp_sys.close(*fd);
    free(msg);
    luamp_raise_interrupt(L);
  }
  if (msg) {
    lua_pushstring(L, msg);
    free(msg);
    if (*fd >= 0) luamp_sys.close(*fd);
    luamp_raise(L, "ProcessError", "in the fork server: %s", lua_tostring(L, -1));
  }
}

/* core.forkserver_start() -> pid of this process's server (started now
 * when there is none). */
static int l_start(lua_State *L) {
  char *msg = NULL;
  if (start_server(L, &msg) != 0) {
    int err = errno;
    if (msg) {
      lua_pushstring(L, msg);
      free(msg);
      luamp_raise(L, "ProcessError", "the fork server failed to start: %s",
                  lua_tostring(L, -1));
    }
    luamp_raise_errno(L, "OSError", err, "fork server");
  }
  lua_pushinteger(L, fs_pid);
  return 1;
}

/* core.forkserver_pid() -> pid, or nil when this process has none */
static int l_pid(lua_State *L) {
  pid_t pid = luamp_forkserver_pid();
  if (pid == 0) lua_pushnil(L);
  else lua_pushinteger(L, pid);
  return 1;
}

/* core.forkserver_stop(): closes the socket; the server leaves. */
static int l_stop(lua_State *L) {
  (void)L;
  if (luamp_forkserver_pid() != 0) forget_server();
  return 0;
}

/* core.forkserver_preload(names): requires each module in the server */
static int l_preload(lua_State *L) {
  luaL_Buffer b;
  struct reply r;
  int fd;
  lua_Integer n;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = luaL_len(L, 1);
  luaL_buffinit(L, &b);
  for (lua_Integer i = 1; i <= n; i++) {
    size_t len;
    const char *s;
    lua_geti(L, 1, i);
    s = lua_tolstring(L, -1, &len);
    if (s == NULL || len == 0 || memchr(s, '\n', len) || strlen(s) != len)
      luaL_argerror(L, 1, "preload names must be module names (strings)");
    lua_pop(L, 1);
    luaL_addlstring(&b, s, len);
    luaL_addchar(&b, '\n');
  }
  luaL_pushresult(&b);
  {
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    ask(L, REQ_PRELOAD, 0, s, len, &r, &fd);
  }
  if (fd >= 0) luamp_sys.close(fd);
  return 0;
}

/* core.forkserver_spawn(payload, daemon, ignore_sigint, die_with_parent)
 * -> Child handle.  payload is what forkserver.lua's child_main decodes. */
static int l_spawn(lua_State *L) {
  size_t len;
  const char *p = luaL_checklstring(L, 1, &len);
  int daemon = lua_toboolean(L, 2);
  uint32_t flags = (daemon ? F_DAEMON : 0) |
                   (lua_toboolean(L, 3) ? F_IGNORE_SIGINT : 0) |
                   (lua_toboolean(L, 4) ? F_DIE_WITH_PARENT : 0);
  struct reply r;
  int fd;
  fflush(NULL);        /* as before a fork: output stays in order */
  ask(L, REQ_START, flags, p, len, &r, &fd);
  if (r.value <= 0 || fd < 0) {
    if (fd >= 0) luamp_sys.close(fd);
    luamp_raise_errno(L, "OSError", r.value < 0 ? -r.value : EPROTO,
                      "fork (in the fork server)");
  }
  luamp_remote_child(L, (pid_t)r.value, fd, daemon);
  return 1;
}

int luamp_open_forkserver(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"forkserver_start", l_start},
    {"forkserver_pid", l_pid},
    {"forkserver_stop", l_stop},
    {"forkserver_preload", l_preload},
    {"forkserver_spawn", l_spawn},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  pthread_once(&forget_once, register_forget);
  return 0;
}
