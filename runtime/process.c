/*
 * process.c -- fork discipline, the registry of children, exit codes,
 * sentinels and at-fork hooks.
 *
 * Every fork the runtime makes goes through luamp_fork: it runs the
 * before-fork hooks, flushes stdio (so buffered output is not printed
 * twice), blocks signals around fork() so that no handler runs in the
 * child before it has reset its state, and in the child forgets the
 * parent's children, restores a sane signal state and runs the child
 * hooks.  The runtime starts no threads, so a plain luamp process can
 * always fork safely; a multithreaded embedding host must fork only from
 * a thread that holds no lock the child will need (luamp_atfork lets it
 * take and release its locks around our forks).
 *
 * Children made by core.spawn are registered here (pid, daemon flag,
 * sentinel) so that at exit, as Python does, daemon children are
 * terminated and the others joined -- both when the Lua state closes (a
 * __gc sentinel) and when the process leaves through exit() (os.exit),
 * from an atexit handler.  Each entry records the pid that forked it; a
 * forked child drops the inherited entries and never waits for, signals
 * or reaps its parent's children.
 *
 * A child's sentinel is a pidfd (readable once the child has exited);
 * where pidfd_open is missing, it is the read end of a pipe whose write
 * end only the child holds.
 *
 * Children the fork server forked for us (forkserver.c, the "forkserver"
 * start method) are registered too, as remote entries: not our children
 * (waitpid cannot see them), their sentinel is the pipe on which the
 * server writes the wait status once it reaped them.  Everything else --
 * join, poll, signals, the exit rule -- treats them as our own.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#include <sys/single_threaded.h>
#endif
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define CHILD_TNAME "multiprocessing.Child"
#define SENTINEL_TNAME "multiprocessing.ChildrenSentinel"

/* Seconds a daemon child gets to die after SIGTERM at exit before it is
 * killed (Python waits forever; a daemon that ignores SIGTERM must not
 * keep its parent from exiting). */
#define DAEMON_GRACE 2.0

/* ---- the registry ---------------------------------------------------- */

/* Only this process touches the registry (the runtime has no threads);
 * entries whose owner is not getpid() were inherited through fork and are
 * never acted on. */
struct child {
  struct child *next;   /* in the registry list; unlinked in forked children */
  pid_t pid;
  pid_t owner;          /* the process that forked it */
  const void *state;    /* main thread of the Lua state that started it */
  int daemon;
  int sentinel;         /* pidfd or pipe read end; -1 once closed */
  int exposed;          /* the sentinel was given out (h:sentinel()) */
  int reaped;           /* 0 running, 1 status valid, 2 lost (ECHILD) */
  int status;           /* waitpid status when reaped == 1 */
  int has_handle;       /* a Child userdata refers to this entry */
  int remote;           /* forked by the fork server (forkserver.c): not
                         * our child; sentinel is the status pipe the
                         * server writes the wait status to */
};

static struct child *registry = NULL;
static int have_pidfd = -1;           /* -1 unknown, 0 no, 1 yes */
/* In a child made through a pipe sentinel: the write end it inherited,
 * closed in its own children so that they do not hold its sentinel open. */
static int own_sentinel_wfd = -1;
/* This process has not taken on the identity of the Process it was
 * started as (process.lua takes it when first asked): set in the child of
 * core.spawn(..., started), inherited by forks until taken. */
static int started_child = 0;
static int spawning_started = 0;   /* the fork under way is such a start */
/* A zeroed entry for the next spawn, allocated after the last one */
static struct child *spare_entry = NULL;
/* /dev/null, opened once, for the children's stdin */
static int devnull = -1;

static int exitcode_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return 0;
}

/* Direct (not luamp_sys): a probe whose failure only selects the
 * fallback (a sentinel pipe, or polling the pid). */
static int pidfd_open_(pid_t pid) {
#ifdef SYS_pidfd_open
  return (int)syscall(SYS_pidfd_open, pid, 0);
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

static int pidfd_usable(void) {
  if (have_pidfd < 0) {
    const char *off = getenv("LUAMP_NO_PIDFD");  /* tests the fallback */
    int fd = (off && *off && strcmp(off, "0") != 0) ? -1 : pidfd_open_(luamp_pid());
    have_pidfd = fd >= 0;
    if (fd >= 0) luamp_sys.close(fd);
  }
  return have_pidfd;
}

static void close_sentinel(struct child *c) {
  if (c->sentinel >= 0) {
    int fd = c->sentinel;
    c->sentinel = -1;
    luamp_sys.close(fd);
  }
}

/* A remote child whose server died before it: its status is lost, but
 * whether it still runs is not.  Its sentinel becomes a pidfd of it (the
 * same fd number: a sentinel given out stays valid), readable when it
 * ends.  (Its pid cannot have been reused while it runs; it could in the
 * moment between its end and the server's death, which is the price.)
 * Returns 1 when adopted so. */
static int adopt_orphan(struct child *c) {
  int fd = pidfd_usable() ? pidfd_open_(c->pid) : -1;
  if (fd < 0) return 0;
  if (dup3(fd, c->sentinel, O_CLOEXEC) < 0) {
    close(fd);
    return 0;
  }
  close(fd);
  c->remote = 2;
  return 1;
}

/* A remote child's status: the fork server writes the waitpid status
 * (an int) to the status pipe and closes it; end of file without it means
 * the server died first: exit code 255 (as Python's forkserver says) once
 * the child is gone (adopt_orphan).  The pipe's read end is non-blocking
 * (made so by the server). */
static int reap_remote(struct child *c, int hang) {
  int st = 255 << 8;      /* (as exit(255)) */
  if (c->remote == 2) {
    struct pollfd p = {c->sentinel, POLLIN, 0};
    int r;
    do r = luamp_sys.poll(&p, 1, hang ? -1 : 0); while (r < 0 && errno == EINTR);
    if (r == 0) return 0;
  } else {
    for (;;) {
      ssize_t n = c->sentinel >= 0 ? read(c->sentinel, &st, sizeof st) : 0;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        struct pollfd p = {c->sentinel, POLLIN, 0};
        if (!hang) return 0;
        (void)luamp_sys.poll(&p, 1, -1);
        continue;
      }
      if (n == (ssize_t)sizeof st) break;
      st = 255 << 8;
      if (n == 0 && c->sentinel >= 0 && adopt_orphan(c)) return reap_remote(c, hang);
      break;
    }
  }
  c->reaped = 1;
  c->status = st;
  if (WIFSIGNALED(st)) luamp_shm_sweep(c->pid);
  if (!c->exposed) close_sentinel(c);
  return 1;
}

/* waitpid(pid, hang ? 0 : WNOHANG) for an entry; updates it.  Returns 1
 * when the child is gone (reaped now or before), 0 while it runs. */
static int reap(struct child *c, int hang) {
  int st;
  pid_t r;
  if (c->reaped) return 1;
  if (c->owner != luamp_pid()) return 0;
  if (c->remote) return reap_remote(c, hang);
  do r = luamp_sys.waitpid(c->pid, &st, hang ? 0 : WNOHANG); while (r < 0 && errno == EINTR);
  if (r == c->pid) {
    c->reaped = 1;
    c->status = st;
    if (WIFSIGNALED(st)) luamp_shm_sweep(c->pid);   /* its blocks (shm.c) */
  } else if (r < 0) {
    /* ECHILD: someone else reaped it (SIGCHLD ignored by the host, or a
     * stray waitpid(-1)).  The status is lost; it is gone all the same. */
    c->reaped = 2;
  }
  /* A sentinel nobody was given is not needed any more: closed now, so
   * that children forked later do not inherit (and close at exit) one fd
   * per child whose handle the GC has not collected yet. */
  if (c->reaped && !c->exposed) close_sentinel(c);
  return c->reaped != 0;
}

static void unlink_entry(struct child *c) {
  for (struct child **pp = &registry; *pp; pp = &(*pp)->next)
    if (*pp == c) {
      *pp = c->next;
      c->next = NULL;
      return;
    }
}

/* Frees reaped entries no handle refers to, after reaping finished
 * ones: called at each spawn, so children whose Process objects were
 * dropped leave no zombie behind for long (Python's _cleanup). */
static void sweep(void) {
  struct child **pp = &registry;
  while (*pp) {
    struct child *c = *pp;
    if (c->owner == luamp_pid()) reap(c, 0);
    if (c->reaped && !c->has_handle) {
      *pp = c->next;
      close_sentinel(c);
      free(c);
    } else {
      pp = &c->next;
    }
  }
}

/* Waits until c's sentinel fires or the deadline passes (no Lua state:
 * used at exit).  Returns 1 when the child is gone. */
static int wait_quietly(struct child *c, double deadline) {
  for (;;) {
    if (reap(c, 0)) return 1;
    if (c->sentinel >= 0 && (have_pidfd == 1 || c->remote)) {
      struct pollfd p = {c->sentinel, POLLIN, 0};
      int ms = luamp_remaining_ms(deadline, -1);
      if (ms == 0) return reap(c, 0);
      if (luamp_sys.poll(&p, 1, ms) < 0 && errno != EINTR) return reap(c, deadline < 0);
    } else {
      if (deadline < 0) return reap(c, 1);
      if (luamp_remaining_ms(deadline, -1) == 0) return reap(c, 0);
      luamp_robust_poll(NULL, NULL, 0, luamp_deadline(0.01));
    }
  }
}

/* The exit rule (Python's util._exit_function): terminate the daemon
 * children, then join every child.  state limits it to the children a
 * Lua state started (NULL: all of this process's children). */
LUAMP_CHILD_PATH static void cleanup_children(const void *state) {
  pid_t me = luamp_pid();
  double deadline;
  int any = 0;
  for (struct child *c = registry; c; c = c->next)
    if (c->owner == me && (!state || c->state == state) && !reap(c, 0) &&
        c->daemon) {
      luamp_sys.kill(c->pid, SIGTERM);
      any = 1;
    }
  if (any) {
    deadline = luamp_deadline(DAEMON_GRACE);
    for (struct child *c = registry; c; c = c->next)
      if (c->owner == me && (!state || c->state == state) && c->daemon &&
          !wait_quietly(c, deadline)) {
        luamp_sys.kill(c->pid, SIGKILL);
        reap(c, 1);
      }
  }
  for (struct child *c = registry; c; c = c->next)
    if (c->owner == me && (!state || c->state == state)) wait_quietly(c, -1);
}

static void cleanup_at_exit(void) {
  cleanup_children(NULL);
  free(spare_entry);
  spare_entry = NULL;
}

/* ---- at-fork hooks --------------------------------------------------- */

struct c_hook {
  void (*before)(void *), (*parent)(void *), (*child)(void *);
  void *ud;
};
#define MAX_C_HOOKS 32
static struct c_hook c_hooks[MAX_C_HOOKS];
static int n_c_hooks = 0;
/* Lua hooks registered in any state; its address is the registry key of
 * a state's hook lists {before, parent, child}. */
static int n_lua_hooks = 0;

LUAMP_API int luamp_atfork(void (*before)(void *), void (*parent)(void *),
                           void (*child)(void *), void *ud) {
  if (n_c_hooks == MAX_C_HOOKS) {
    errno = ENOMEM;
    return -1;
  }
  c_hooks[n_c_hooks].before = before;
  c_hooks[n_c_hooks].parent = parent;
  c_hooks[n_c_hooks].child = child;
  c_hooks[n_c_hooks].ud = ud;
  n_c_hooks++;
  return 0;
}

/* Runs the Lua hooks of one kind (1 before, 2 parent, 3 child) in L.  As
 * Python's os.register_at_fork: before-hooks in reverse order of
 * registration, the others in order; an error in a hook is reported on
 * stderr and does not stop the fork. */
static void run_lua_hooks(lua_State *L, int kind) {
  int n, top = lua_gettop(L);
  if (n_lua_hooks == 0) return;   /* the common case, without a lookup */
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &n_lua_hooks) != LUA_TTABLE ||
      lua_rawgeti(L, -1, kind) != LUA_TTABLE) {
    lua_settop(L, top);
    return;
  }
  n = (int)lua_rawlen(L, -1);
  for (int i = 0; i < n; i++) {
    lua_rawgeti(L, -1, kind == 1 ? n - i : i + 1);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
      const char *msg = luaL_tolstring(L, -1, NULL);
      fprintf(stderr, "luamp: error in at-fork hook (ignored): %s\n", msg);
      fflush(stderr);
      lua_pop(L, 2);
    }
  }
  lua_settop(L, top);
}

/* ---- fork ------------------------------------------------------------ */

static void reset_caught_in_child(void);

/* The child's side of luamp_fork, signals still blocked. */
LUAMP_CHILD_PATH static void after_fork_in_child(void) {
  /* Forget the parent's children without writing to their entries: they
   * are scattered over the heap, and every page a child writes is a copy.
   * A handle's finalizer frees its own entry (seeing another owner, it
   * only closes this process's copy of the sentinel); entries no handle
   * refers to have their fd closed now and their memory left to this
   * process's exit. */
  for (const struct child *c = registry; c; c = c->next)
    if (!c->has_handle && c->sentinel >= 0) luamp_sys.close(c->sentinel);
  registry = NULL;
  if (spawning_started) started_child = 1;   /* before the at-fork hooks */
  if (own_sentinel_wfd >= 0) {
    luamp_sys.close(own_sentinel_wfd);
    own_sentinel_wfd = -1;
  }
  reset_caught_in_child();
  /* Signal dispositions are inherited, as with Python's fork start
   * method: SIGPIPE stays ignored (writes get EPIPE), SIGCHLD is at its
   * default (luamp_fork saw to it), and the host's SIGINT handler stays,
   * so Ctrl-C ends a child's run with "interrupted!" (exit code 1), as
   * KeyboardInterrupt does in Python. */
}

/* Heap memory that malloc keeps but nothing uses is still mapped: every
 * fork copies its page table entries into the child and every exit tears
 * them down again (on a heap that once held much more than it does now,
 * that costs more than the rest of the fork).  So it is given back to the
 * kernel before the first fork -- the garbage of loading the program --
 * and before any fork that finds the Lua heap down to half the largest
 * size seen at a fork since the last time.  (Not at every fork: freeing
 * the pages of each cycle's garbage only to fault them in again costs
 * more than it saves.) */
static void trim_heap(lua_State *L) {
#ifdef __GLIBC__
  static int first = 1;
  static int peak_kib = 0;
  int kib = L ? lua_gc(L, LUA_GCCOUNT, 0) : 0;
  if (kib > peak_kib) peak_kib = kib;
  if (!first && kib * 2 >= peak_kib) return;
  first = 0;
  malloc_trim(0);
  peak_kib = kib;
#else
  (void)L;
#endif
}

/* Python 3.12's warning: a fork from a process with more than one thread
 * keeps only the calling thread, and a lock another thread held stays
 * locked in the child.  Once per process, on stderr.  The thread count is
 * the link count of /proc/self/task (2 + threads): one stat per fork
 * until the warning was given, once glibc saw a thread started. */
static void warn_if_threaded(void) {
  static int warned = 0;
  struct stat st;
#ifdef __GLIBC__
  /* (glibc knows when no thread was ever started: no stat then) */
  if (__libc_single_threaded) return;
#endif
  if (warned || stat("/proc/self/task", &st) != 0 || st.st_nlink <= 3) return;
  warned = 1;
  fprintf(stderr, "luamp: warning: this process (pid %d) is multi-threaded "
          "(%d threads); fork() may deadlock in the child (a lock another "
          "thread held stays locked there).  Use the \"forkserver\" start "
          "method (mp.set_start_method, luamp_forkserver_start).\n",
          (int)getpid(), (int)st.st_nlink - 2);
  fflush(stderr);
}

LUAMP_CHILD_PATH pid_t luamp_fork(lua_State *L) {
  sigset_t all, old;
  pid_t pid;
  int err, blocked;
  struct sigaction sa;

  trim_heap(L);
  warn_if_threaded();
  if (L) run_lua_hooks(L, 1);
  for (int i = n_c_hooks - 1; i >= 0; i--)
    if (c_hooks[i].before) c_hooks[i].before(c_hooks[i].ud);
  /* An ignored SIGCHLD makes waitpid useless; children's exit codes are
   * the point of Process, so it goes back to the default. */
  if (sigaction(SIGCHLD, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN)
    signal(SIGCHLD, SIG_DFL);
  luamp_flush_stdio();
  sigfillset(&all);
  blocked = luamp_sys.pthread_sigmask(SIG_SETMASK, &all, &old);
  if (blocked != 0) {      /* no fork with signals open: fails as fork */
    errno = blocked;
    pid = -1;
  } else {
    pid = luamp_sys.fork();
  }
  if (pid == 0) {
    after_fork_in_child();
    /* The child starts with every signal unblocked: a host that blocks
     * signals in its threads (to take them in a signal thread that the
     * child does not have) would otherwise leave a child that SIGTERM
     * cannot stop. */
    memset(&old, 0, sizeof old);          /* the empty set */
    if (luamp_sys.pthread_sigmask(SIG_SETMASK, &old, NULL) != 0) _exit(127);
    for (int i = 0; i < n_c_hooks; i++)
      if (c_hooks[i].child) c_hooks[i].child(c_hooks[i].ud);
    if (L) run_lua_hooks(L, 3);
    return 0;
  }
  err = errno;
  /* (cannot fail: the same call accepted this set a moment ago) */
  if (blocked == 0) (void)luamp_sys.pthread_sigmask(SIG_SETMASK, &old, NULL);
  for (int i = 0; i < n_c_hooks; i++)
    if (c_hooks[i].parent) c_hooks[i].parent(c_hooks[i].ud);
  if (L) run_lua_hooks(L, 2);
  /* (errno is restored only for a failure: it is on a page of its own
   * that the parent would otherwise copy at every fork) */
  if (pid < 0) errno = err;
  return pid;
}

LUAMP_CHILD_PATH void luamp_child_exit(int code) {
  cleanup_children(NULL);
  luamp_shm_cleanup();     /* blocks this child created (shm.c) */
  luamp_flush_stdio();
  _exit(code);
}

/* ---- the state's sentinel -------------------------------------------- */

static struct luamp_type sentinel_type, child_type;   /* (at the end) */

/* At lua_close, objects are finalized in the reverse order in which they
 * were marked for finalization.  A new sentinel is made at every spawn so
 * that it is finalized before the objects made until then: children are
 * joined while the queues, pipes and shared memory they may still be
 * using are open.  The previous sentinel is disarmed. */
struct sentinel {
  int armed;
};

static int sentinel_gc(lua_State *L) {
  struct sentinel *s = luamp_self(L, 1, &sentinel_type);
  if (s->armed) {
    const void *state;
    s->armed = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    state = lua_topointer(L, -1);
    lua_pop(L, 1);
    cleanup_children(state);
  }
  return 0;
}

static void renew_sentinel(lua_State *L) {
  struct sentinel *s;
  if (lua_getfield(L, LUA_REGISTRYINDEX, SENTINEL_TNAME "#") == LUA_TUSERDATA) {
    s = lua_touserdata(L, -1);
    s->armed = 0;
  }
  lua_pop(L, 1);
  s = lua_newuserdatauv(L, sizeof *s, 0);
  s->armed = 1;
  luaL_setmetatable(L, SENTINEL_TNAME);
  lua_setfield(L, LUA_REGISTRYINDEX, SENTINEL_TNAME "#");
}

/* ---- Child handles --------------------------------------------------- */

struct childbox {
  struct child *c;   /* NULL once released */
};

static struct child *check_child(lua_State *L, int idx) {
  struct childbox *b = luamp_self(L, idx, &child_type);
  if (b->c == NULL) luamp_raise(L, "ValueError", "process object is closed");
  return b->c;
}

static struct child *owned_child(lua_State *L, int idx) {
  struct child *c = check_child(L, idx);
  if (c->owner != luamp_pid())
    luamp_raise(L, "ProcessError", "can only wait for a child process "
                "(pid %d belongs to process %d)", (int)c->pid, (int)c->owner);
  return c;
}

static void push_status(lua_State *L, struct child *c) {
  if (c->reaped == 1) lua_pushinteger(L, exitcode_of(c->status));
  else lua_pushnil(L);
}

/* Releases the handle's hold on its entry: the entry stays registered
 * while the child runs (exit cleanup still joins it). */
static int child_release(lua_State *L) {
  struct childbox *b = luamp_self(L, 1, &child_type);
  struct child *c = b->c;
  if (c == NULL) return 0;
  b->c = NULL;
  c->has_handle = 0;
  if (c->owner != luamp_pid()) {
    /* inherited: drop our copy of the sentinel, nothing else */
    close_sentinel(c);
    free(c);
    return 0;
  }
  reap(c, 0);
  close_sentinel(c);
  if (c->reaped) {
    unlink_entry(c);
    free(c);
  }
  return 0;
}

static int child_pid(lua_State *L) {
  struct childbox *b = luamp_self(L, 1, &child_type);
  if (b->c == NULL) lua_pushnil(L);
  else lua_pushinteger(L, b->c->pid);
  return 1;
}

static int child_sentinel(lua_State *L) {
  struct child *c = check_child(L, 1);
  if (c->sentinel < 0 && c->reaped) {
    /* closed when it was reaped: one that is ready, as it would be */
    int p[2];
    if (luamp_sys.pipe2(p, O_CLOEXEC) != 0)
      luamp_raise_errno(L, "OSError", errno, "pipe2");
    luamp_sys.close(p[1]);
    c->sentinel = p[0];
  }
  c->exposed = 1;
  lua_pushinteger(L, c->sentinel);
  return 1;
}

/* h:poll() -> exit code, or nil while it runs (reaps, never blocks);
 * second result: true when the status was lost (reaped elsewhere). */
static int child_poll(lua_State *L) {
  struct child *c = owned_child(L, 1);
  reap(c, 0);
  push_status(L, c);
  lua_pushboolean(L, c->reaped != 0);
  return 2;
}

/* h:wait([timeout]) -> exit code, or nil on timeout.  Ctrl-C interrupts. */
static int child_wait(lua_State *L) {
  struct child *c = owned_child(L, 1);
  double deadline = luamp_deadline_arg(L, 2);
  /* A pidfd is polled before the first waitpid: it is readable at once
   * when the child is gone, and for one still running (a join right
   * after start) the waitpid would only have said so: a system call
   * saved per join. */
  int poll_first = !c->reaped && c->sentinel >= 0 && have_pidfd == 1 &&
                   !c->remote;
  while (poll_first || !reap(c, 0)) {
    int r;
    poll_first = 0;
    if (c->sentinel >= 0 && (have_pidfd == 1 || c->remote)) {
      struct pollfd p = {c->sentinel, POLLIN, 0};
      r = luamp_robust_poll(L, &p, 1, deadline);
    } else {
      /* a pipe sentinel may stay open in a grandchild after the child is
       * gone: poll the pid every 10 ms instead */
      double slice = luamp_deadline(0.01);
      if (deadline >= 0 && luamp_remaining_ms(deadline, -1) == 0) break;
      if (deadline >= 0 && deadline < slice) slice = deadline;
      r = luamp_robust_poll(L, NULL, 0, slice);
      if (r == 0) r = 1;
    }
    if (r == -2) luamp_raise_interrupt(L);
    if (r == -1) luamp_raise_errno(L, "OSError", errno, "poll");
    if (r == 0) {
      reap(c, 0);
      break;
    }
  }
  push_status(L, c);
  return 1;
}

static int signal_number(lua_State *L, int idx);

/* h:signal(sig) -> true when sent, false when the child is already gone */
static int child_signal(lua_State *L) {
  struct child *c = owned_child(L, 1);
  int sig = signal_number(L, 2);
  if (reap(c, 0)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (luamp_sys.kill(c->pid, sig) != 0) {
    if (errno == ESRCH) {
      lua_pushboolean(L, 0);
      return 1;
    }
    luamp_raise_errno(L, "OSError", errno, "kill");
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int child_daemon(lua_State *L) {
  struct child *c = check_child(L, 1);
  lua_pushboolean(L, c->daemon);
  return 1;
}

static int child_tostring(lua_State *L) {
  struct childbox *b = luamp_self(L, 1, &child_type);
  if (b->c == NULL) lua_pushliteral(L, "Child (closed)");
  else lua_pushfstring(L, "Child (pid %d, %s)", (int)b->c->pid,
                       b->c->reaped ? "exited" : "running");
  return 1;
}

/* Whether stdin holds input read ahead by the parent (checked so that the
 * common case does not run, and fault in, the purge code). */
LUAMP_CHILD_PATH static int stdin_has_buffered_input(void) {
#ifdef __GLIBC__
  return stdin->_IO_read_ptr < stdin->_IO_read_end;
#else
  return 1;
#endif
}

/* The child's body for spawn: runs fn(arg) under the traceback handler
 * and leaves with its result as exit code; it never returns into the Lua
 * code that called spawn (which belongs to the parent). */
LUAMP_CHILD_PATH LUAMP_NORETURN void luamp_child_main(lua_State *L, int fn,
                                                     int arg) {
  int code = 1, base;
  lua_pushcfunction(L, luamp_msgh);
  base = lua_gettop(L);
  lua_pushvalue(L, fn);
  lua_pushvalue(L, arg);
  if (lua_pcall(L, 1, 1, base) == LUA_OK) {
    if (lua_isinteger(L, -1)) code = (int)lua_tointeger(L, -1);
    else if (lua_isboolean(L, -1)) code = lua_toboolean(L, -1) ? 0 : 1;
    else code = 0;
  } else {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "%s\n", msg ? msg : "(error object is not a string)");
  }
  /* leaving is a sync point: the manager writes it made are applied */
  if (luamp_pending_writes && luamp_flush_writes_p(L)) {
    fprintf(stderr, "manager writes of this process may be lost: %s\n",
            luaL_tolstring(L, -1, NULL));
    if (code == 0) code = 1;
  }
  luamp_child_exit(code);
}

/* The new child's side of l_spawn, up to running fn(arg).  prctl, dup2
 * and the signal calls here stay direct (not luamp_sys): they run in the
 * new child before any Lua code, where a failure can only end the child. */
LUAMP_CHILD_PATH static LUAMP_NORETURN void child_start(
    lua_State *L, const int pfd[2], int ignore_sigint, int die_with_parent,
    pid_t parent) {
  if (pfd[0] >= 0) {
    luamp_sys.close(pfd[0]);
    own_sentinel_wfd = pfd[1];
  }
  if (ignore_sigint) signal(SIGINT, SIG_IGN);
  /* (the parent may have died before the prctl: then getppid changed) */
  if (die_with_parent &&
      (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent))
    _exit(1);
  /* As Python's children: stdin is /dev/null, so that parent and
   * children do not compete for the terminal's input (and input the
   * parent had buffered is not read twice). */
  if (devnull >= 0 && dup2(devnull, STDIN_FILENO) == STDIN_FILENO &&
      stdin_has_buffered_input())
    __fpurge(stdin);
  luamp_child_main(L, 1, 2);
}

/* Enters c in the registry and pushes its Child handle.  (Should the
 * handle fail to be made, the entry stays registered without one: reaped
 * by a later sweep or joined at exit.) */
static void register_child(lua_State *L, struct child *c) {
  struct childbox *b;
  sweep();
  c->next = registry;
  registry = c;
  b = lua_newuserdatauv(L, sizeof *b, 0);
  b->c = c;
  c->has_handle = 1;
  luaL_setmetatable(L, CHILD_TNAME);
  renew_sentinel(L);
}

/* core.spawn(fn, arg, daemon, ignore_sigint, die_with_parent, started)
 * -> Child handle.  Forks; the child runs fn(arg) and exits with its
 * integer result (0 for none, 1 with the traceback on stderr for an
 * error).  A child made with die_with_parent is SIGKILLed by the kernel
 * when its parent dies (Pool workers: nothing else would tell them,
 * blocked on their queue).  A child made with started (and its forks)
 * gets true from its first core.take_started(). */
LUAMP_CHILD_PATH static int l_spawn(lua_State *L) {
  LUAMP_FENCE(L);
  struct child *c;
  int daemon = lua_toboolean(L, 3), ignore_sigint = lua_toboolean(L, 4);
  int die_with_parent = lua_toboolean(L, 5), started = lua_toboolean(L, 6);
  int pfd[2] = {-1, -1};
  pid_t pid, parent = luamp_pid();
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 4);
  /* What can wait is done after the fork, while the child runs: the time
   * from one child's exit to the next fork is what a start+join loop is
   * made of.  So the entry is the one set aside at the last spawn, and the
   * handle, the sweep and the sentinel come after the fork. */
  c = spare_entry;
  spare_entry = NULL;
  if (c == NULL && (c = calloc(1, sizeof *c)) == NULL)
    luamp_raise(L, "OSError", "not enough memory");
  c->sentinel = -1;
  if (!pidfd_usable() && luamp_sys.pipe2(pfd, O_CLOEXEC) != 0) {
    int err = errno;
    free(c);
    luamp_raise_errno(L, "OSError", err, "pipe2");
  }
  if (devnull < 0)
    devnull = luamp_sys.open("/dev/null", O_RDONLY | O_CLOEXEC, 0);
  spawning_started = started;
  pid = luamp_fork(L);
  spawning_started = 0;
  /* c is not freed in the child: it leaves with _exit, and touching the
   * allocator would copy its pages for nothing */
  if (pid == 0) child_start(L, pfd, ignore_sigint, die_with_parent, parent);
  if (pid < 0) {
    int err = errno;
    free(c);
    if (pfd[0] >= 0) { luamp_sys.close(pfd[0]); luamp_sys.close(pfd[1]); }
    luamp_raise_errno(L, "OSError", err, "fork");
  }
  c->pid = pid;
  c->owner = luamp_pid();
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  c->state = lua_topointer(L, -1);
  lua_pop(L, 1);
  c->daemon = daemon;
  if (pfd[0] >= 0) {
    luamp_sys.close(pfd[1]);
    c->sentinel = pfd[0];
  } else {
    c->sentinel = pidfd_open_(pid);
    /* pidfd_open cannot fail for our own unreaped child but for fd
     * exhaustion; the wait loop then polls the pid. */
  }
  register_child(L, c);
  /* (malloc and memset, not calloc: glibc's calloc bypasses the
   * per-thread cache and writes the arena's page, one more page the
   * parent copies after each fork) */
  if (spare_entry == NULL &&
      (spare_entry = malloc(sizeof *spare_entry)) != NULL)
    memset(spare_entry, 0, sizeof *spare_entry);
  return 1;
}

/* Pushes a Child handle for a process the fork server forked for us
 * (forkserver.c): status_fd is the read end of the pipe the server writes
 * its wait status to (non-blocking, close-on-exec; the entry owns it).
 * Registered like our own children, so join, poll, signal, the sentinel
 * and the exit rule (daemons terminated, others joined) work the same. */
void luamp_remote_child(lua_State *L, pid_t pid, int status_fd, int daemon) {
  struct child *c = calloc(1, sizeof *c);
  if (c == NULL) {
    close(status_fd);
    luamp_sys.kill(pid, SIGKILL);
    luamp_raise(L, "OSError", "not enough memory");
  }
  c->pid = pid;
  c->owner = luamp_pid();
  c->remote = 1;
  c->sentinel = status_fd;
  c->daemon = daemon;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  c->state = lua_topointer(L, -1);
  lua_pop(L, 1);
  register_child(L, c);
}

/* ---- raw process calls ----------------------------------------------- */

static const struct { const char *name; int sig; } signals[] = {
  {"SIGHUP", SIGHUP}, {"SIGINT", SIGINT}, {"SIGQUIT", SIGQUIT},
  {"SIGILL", SIGILL}, {"SIGABRT", SIGABRT}, {"SIGFPE", SIGFPE},
  {"SIGKILL", SIGKILL}, {"SIGSEGV", SIGSEGV}, {"SIGPIPE", SIGPIPE},
  {"SIGALRM", SIGALRM}, {"SIGTERM", SIGTERM}, {"SIGUSR1", SIGUSR1},
  {"SIGUSR2", SIGUSR2}, {"SIGCHLD", SIGCHLD}, {"SIGCONT", SIGCONT},
  {"SIGSTOP", SIGSTOP}, {"SIGTSTP", SIGTSTP}, {"SIGBUS", SIGBUS},
  {NULL, 0}
};

static int signal_number(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *name = lua_tostring(L, idx);
    for (int i = 0; signals[i].name; i++)
      if (strcmp(signals[i].name, name) == 0 ||
          strcmp(signals[i].name + 3, name) == 0)
        return signals[i].sig;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", name));
  } else {
    lua_Integer s = luaL_checkinteger(L, idx);
    luaL_argcheck(L, s >= 0 && s < NSIG, idx, "signal number out of range");
    return (int)s;
  }
}

/* core.fork() -> pid (0 in the child).  Raw: the child is not registered
 * and must leave with core._exit. */
static int l_fork(lua_State *L) {
  pid_t pid = luamp_fork(L);
  if (pid < 0) luamp_raise_errno(L, "OSError", errno, "fork");
  lua_pushinteger(L, pid);
  return 1;
}

/* core.take_started() -> true once in a process started by
 * core.spawn(..., started) or forked from one before it took it. */
static int l_take_started(lua_State *L) {
  lua_pushboolean(L, started_child);
  started_child = 0;
  return 1;
}

/* core._exit([code]): joins this process's own children as at exit,
 * flushes stdio and leaves without running finalizers or atexit. */
static int l_exit(lua_State *L) {
  int code;
  if (lua_isboolean(L, 1)) code = lua_toboolean(L, 1) ? 0 : 1;
  else code = (int)luaL_optinteger(L, 1, 0);
  luamp_child_exit(code);
  return 0;
}

/* core.waitpid(pid [, nohang]) -> exit code, or nil (nohang, running) */
static int l_waitpid(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int st, nohang = lua_toboolean(L, 2);
  pid_t r;
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");
  for (;;) {
    r = luamp_sys.waitpid(pid, &st, WNOHANG);
    if (r != 0 || nohang) break;
    /* blocking, but interruptible: wait in slices */
    if (luamp_robust_poll(L, NULL, 0, luamp_deadline(0.005)) == -2)
      luamp_raise_interrupt(L);
  }
  if (r < 0) luamp_raise_errno(L, "OSError", errno, "waitpid");
  if (r == 0) lua_pushnil(L);
  else lua_pushinteger(L, exitcode_of(st));
  return 1;
}

/* core.kill(pid, sig) -> true, or false when there is no such process */
static int l_kill(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int sig = signal_number(L, 2);
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");
  if (luamp_sys.kill(pid, sig) != 0) {
    if (errno == ESRCH) {
      lua_pushboolean(L, 0);
      return 1;
    }
    luamp_raise_errno(L, "OSError", errno, "kill");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core.pidfd(pid) -> fd that becomes readable when pid exits, or nil
 * (no pidfd support, or no such process).  Used for the parent process's
 * liveness; the caller closes it with core.close_fd. */
static int l_pidfd(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int fd = pidfd_usable() ? pidfd_open_(pid) : -1;
  if (fd < 0) lua_pushnil(L);
  else lua_pushinteger(L, fd);
  return 1;
}

/* Signals set to "catch": each arrival sets its flag, read (and cleared)
 * by core.signal_caught.  A forked child starts with them at their
 * default again (after_fork_in_child): the catching is its parent's
 * policy -- a worker of a daemon that catches SIGTERM still dies of one. */
static volatile sig_atomic_t caught[NSIG];
static unsigned char catching[NSIG];

static void on_caught(int sig) { caught[sig] = 1; }

LUAMP_CHILD_PATH static void reset_caught_in_child(void) {
  for (int sig = 1; sig < NSIG; sig++) {
    if (catching[sig]) signal(sig, SIG_DFL);  /* (direct: the child's set-up) */
    catching[sig] = 0;
    caught[sig] = 0;
  }
}

/* core.set_signal(sig, "ignore" | "default" | "catch"): for workers that
 * must not take Ctrl-C (the Pool), for daemons that stop gracefully on a
 * signal they poll for (SA_RESTART: no wait is cut short), and for tests. */
static int l_set_signal(lua_State *L) {
  static const char *const actions[] = {"ignore", "default", "catch", NULL};
  int sig = signal_number(L, 1);
  int a = luaL_checkoption(L, 2, NULL, actions);
  struct sigaction sa;
  luaL_argcheck(L, sig != SIGKILL && sig != SIGSTOP && sig > 0 && sig < NSIG, 1,
                "signal cannot be changed");
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = a == 0 ? SIG_IGN : a == 1 ? SIG_DFL : on_caught;
  sa.sa_flags = a == 2 ? SA_RESTART : 0;
  if (a == 2) caught[sig] = 0;
  if (sigaction(sig, &sa, NULL) != 0)
    luamp_raise_errno(L, "OSError", errno, "sigaction");
  catching[sig] = a == 2;
  return 0;
}

/* core.signal_caught(sig) -> whether sig arrived since the last call
 * (for a signal set to "catch"). */
static int l_signal_caught(lua_State *L) {
  int sig = signal_number(L, 1);
  luaL_argcheck(L, sig > 0 && sig < NSIG, 1, "not a signal");
  lua_pushboolean(L, caught[sig]);
  caught[sig] = 0;
  return 1;
}

/* core.pid() -> this process's pid (cached; see luamp_pid in sys.c) */
static int l_pid(lua_State *L) {
  lua_pushinteger(L, luamp_pid());
  return 1;
}

static int l_close_fd(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  lua_pushboolean(L, luamp_sys.close(fd) == 0);
  return 1;
}

/* core.detach_inherited_fds(keep): for a long-lived forked child (a
 * manager's server).  Every fd above 2 that is not listed in keep is made
 * a copy of /dev/null: the child then holds no end of its parent's pipes
 * and sockets (a pipe end held there would hide the end of file from the
 * pipe's reader), while the numbers stay taken, so an inherited handle's
 * finalizer that closes "its" fd later closes /dev/null, never a
 * descriptor the child opened since. */
static int l_detach_inherited_fds(lua_State *L) {
  DIR *d;
  struct dirent *e;
  int null, dfd;
  luaL_checktype(L, 1, LUA_TTABLE);
  null = luamp_sys.open("/dev/null", O_RDWR | O_CLOEXEC, 0);
  if (null < 0) luamp_raise_errno(L, "OSError", errno, "open /dev/null");
  /* opendir and dup3 are direct: the child's set-up, as in child_start */
  d = opendir("/proc/self/fd");
  if (d == NULL) {
    int err = errno;
    luamp_sys.close(null);
    luamp_raise_errno(L, "OSError", err, "opendir /proc/self/fd");
  }
  dfd = dirfd(d);
  while ((e = readdir(d)) != NULL) {
    char *end;
    long fd = strtol(e->d_name, &end, 10);
    int keep = 0;
    if (*end != '\0' || end == e->d_name || fd <= 2 || fd == dfd || fd == null)
      continue;
    for (lua_Integer i = 1; !keep; i++) {
      int t = lua_rawgeti(L, 1, i);
      if (t == LUA_TNIL) keep = -1;
      else if (lua_tointeger(L, -1) == fd) keep = 1;
      lua_pop(L, 1);
    }
    if (keep == 1) continue;
    while (dup3(null, (int)fd, O_CLOEXEC) < 0 && errno == EINTR) {}
  }
  closedir(d);
  luamp_sys.close(null);
  return 0;
}

/* core.register_at_fork{before=, after_in_parent=, after_in_child=} */
static int l_register_at_fork(lua_State *L) {
  static const char *const keys[] = {"before", "after_in_parent",
                                     "after_in_child"};
  int any = 0;
  luaL_checktype(L, 1, LUA_TTABLE);
  for (int i = 0; i < 3; i++) {
    int t = lua_getfield(L, 1, keys[i]);
    if (t != LUA_TNIL) {
      if (t != LUA_TFUNCTION)
        luaL_argerror(L, 1, lua_pushfstring(L, "'%s' must be a function, "
                      "got %s", keys[i], luaL_typename(L, -1)));
      any = 1;
    }
    lua_pop(L, 1);
  }
  if (!any)
    luaL_argerror(L, 1, "at least one of before, after_in_parent, "
                        "after_in_child is required");
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &n_lua_hooks) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 3, 0);
    for (int i = 1; i <= 3; i++) {
      lua_newtable(L);
      lua_rawseti(L, -2, i);
    }
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &n_lua_hooks);
  }
  n_lua_hooks++;
  for (int i = 0; i < 3; i++) {
    if (lua_getfield(L, 1, keys[i]) == LUA_TFUNCTION) {
      lua_rawgeti(L, -2, i + 1);
      lua_insert(L, -2);
      lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
      lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
    }
  }
  return 0;
}

static const luaL_Reg child_meth[] = {
  {"pid", child_pid}, {"sentinel", child_sentinel}, {"poll", child_poll},
  {"wait", child_wait}, {"signal", child_signal}, {"daemon", child_daemon},
  {"close", child_release}, {NULL, NULL}
};
static const luaL_Reg child_mm[] = {
  {"__gc", child_release}, {"__close", child_release},
  {"__tostring", child_tostring}, {NULL, NULL}
};
static const luaL_Reg sentinel_mm[] = {{"__gc", sentinel_gc}, {NULL, NULL}};
static struct luamp_type child_type = {
  CHILD_TNAME, child_meth, child_mm, NULL, 0, 0, 0
};
static struct luamp_type sentinel_type = {
  SENTINEL_TNAME, NULL, sentinel_mm, NULL, 0, 0, 0
};

int luamp_open_process(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"spawn", l_spawn},
    {"fork", l_fork},
    {"_exit", l_exit},
    {"waitpid", l_waitpid},
    {"kill", l_kill},
    {"pidfd", l_pidfd},
    {"pid", l_pid},
    {"take_started", l_take_started},
    {"set_signal", l_set_signal},
    {"signal_caught", l_signal_caught},
    {"close_fd", l_close_fd},
    {"detach_inherited_fds", l_detach_inherited_fds},
    {"register_at_fork", l_register_at_fork},
    {NULL, NULL}
  };
  static int atexit_done = 0;
  struct sigaction sa;

  luamp_newtype(L, &child_type);
  luamp_newtype(L, &sentinel_type);
  lua_pop(L, 2);
  luaL_setfuncs(L, funcs, 0);
  lua_createtable(L, 0, 20);
  for (int i = 0; signals[i].name; i++) {
    lua_pushinteger(L, signals[i].sig);
    lua_setfield(L, -2, signals[i].name);
  }
  lua_setfield(L, -2, "signals");

  /* SIGPIPE never kills a luamp process: writes to a closed peer fail
   * with EPIPE and become BrokenPipeError.  A host's own handler stays. */
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);
  if (!atexit_done) {
    atexit_done = 1;
    atexit(cleanup_at_exit);
    pthread_atfork(NULL, NULL, luamp_pid_refresh);
    luamp_pid_refresh();
  }
  pidfd_usable();
  return 0;
}
