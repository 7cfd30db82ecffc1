/*
 * evset.c -- EventSet: many fds and one deadline behind one fd, for host
 * event loops (luv, cqueues, nginx-style hosts).
 *
 * A Pool has several things that can need its owner: a result on the
 * result queue (the queue's fileno() pipe), a worker's death (its
 * sentinel, a pidfd), a task's deadline.  A host loop wants one fd per
 * object it watches, so the Pool puts them in an epoll set, whose own fd
 * is readable while any member is (level-triggered), and adds a timerfd
 * for the next deadline.  The policy -- which fds, which deadline, what
 * to do when it fires -- is the Pool's (pool_events.lua); this file is only the
 * mechanism.
 *
 * The set holds its own copy (a dup) of every fd added: epoll keeps an
 * entry while its file is open anywhere, and a pool's sibling workers
 * inherit each other's sentinels through fork, so an entry for a fd the
 * caller closed could never be taken out again (a dead worker's pidfd
 * would keep the set readable for good).  add() returns the copy as the
 * member's key; remove(key) takes the entry out and closes the copy.
 *
 * The epoll instance is shared with children through fork like any fd;
 * only the process that made the set changes it (a child's copies of the
 * fds are closed by its finalizer and nothing else).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "internal.h"

#define EVSET_TNAME "multiprocessing.EventSet"

static struct luamp_type evset_type;

struct evset {
  int epfd;        /* -1 once closed */
  int tfd;         /* the deadline's timerfd, a member of the set */
  pid_t owner;     /* the process that made it: the only one changing it */
  int *keys;       /* the members' copies (see above) */
  int nkeys, capkeys;
};

static struct evset *checkevset(lua_State *L) {
  struct evset *e = luamp_self(L, 1, &evset_type);
  if (e->epfd < 0) luamp_raise(L, "ValueError", "EventSet is closed");
  if (e->owner != luamp_pid())
    luamp_raise(L, "ProcessError", "an EventSet can only be used by the "
                "process that made it");
  return e;
}

static int evset_close(lua_State *L) {
  struct evset *e = luamp_self(L, 1, &evset_type);
  if (e->epfd >= 0) {
    int ep = e->epfd, t = e->tfd;
    e->epfd = e->tfd = -1;   /* closed before the resources go */
    luamp_sys.close(t);
    luamp_sys.close(ep);
  }
  if (e->keys != NULL) {
    int *k = e->keys, n = e->nkeys;
    e->keys = NULL;
    e->nkeys = e->capkeys = 0;
    for (int i = 0; i < n; i++) close(k[i]);
    free(k);
  }
  return 0;
}

/* core.EventSet() -> an empty set (its timer disarmed) */
static int l_evset(lua_State *L) {
  struct evset *e = lua_newuserdatauv(L, sizeof *e, 0);
  struct epoll_event ev = {0};
  e->epfd = e->tfd = -1;     /* closed until the resources exist */
  e->owner = luamp_pid();
  e->keys = NULL;
  e->nkeys = e->capkeys = 0;
  luaL_setmetatable(L, EVSET_TNAME);
  e->tfd = luamp_sys.timerfd_create(CLOCK_MONOTONIC,
                                    TFD_CLOEXEC | TFD_NONBLOCK);
  if (e->tfd < 0) luamp_raise_errno(L, "OSError", errno, "timerfd_create");
  e->epfd = luamp_sys.epoll_create1(EPOLL_CLOEXEC);
  if (e->epfd < 0) {
    int err = errno;
    luamp_sys.close(e->tfd);
    e->tfd = -1;
    luamp_raise_errno(L, "OSError", err, "epoll_create1");
  }
  ev.events = EPOLLIN;
  ev.data.fd = e->tfd;
  if (luamp_sys.epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->tfd, &ev) != 0)
    luamp_raise_errno(L, "OSError", errno, "epoll_ctl");
  return 1;
}

static int checkfd(lua_State *L, int idx) {
  lua_Integer fd = luaL_checkinteger(L, idx);
  luaL_argcheck(L, fd >= 0 && fd <= 0x7fffffff, idx, "fd out of range");
  return (int)fd;
}

/* es:add(fd) -> key: a readable fd makes the set readable; the key is
 * the set's own copy of fd (the caller may close fd; remove(key) ends
 * the membership). */
static int evset_add(lua_State *L) {
  struct evset *e = checkevset(L);
  int fd = checkfd(L, 2), key;
  struct epoll_event ev = {0};
  if (e->nkeys == e->capkeys) {
    int n = e->capkeys ? e->capkeys * 2 : 8;
    int *k = realloc(e->keys, (size_t)n * sizeof *k);
    if (k == NULL) luamp_raise_errno(L, "OSError", ENOMEM, "EventSet add");
    e->keys = k;
    e->capkeys = n;
  }
  key = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (key < 0) luamp_raise_errno(L, "OSError", errno, "dup");
  ev.events = EPOLLIN;
  ev.data.fd = key;
  if (luamp_sys.epoll_ctl(e->epfd, EPOLL_CTL_ADD, key, &ev) != 0) {
    int err = errno;
    close(key);
    luamp_raise_errno(L, "OSError", err, "epoll_ctl");
  }
  e->keys[e->nkeys++] = key;
  lua_pushinteger(L, key);
  return 1;
}

/* es:remove(key): the member added as key leaves; its copy is closed */
static int evset_remove(lua_State *L) {
  struct evset *e = checkevset(L);
  int key = checkfd(L, 2), i;
  for (i = 0; i < e->nkeys && e->keys[i] != key; i++) {}
  luaL_argcheck(L, i < e->nkeys, 2, "not a key of this EventSet");
  e->keys[i] = e->keys[--e->nkeys];
  /* DEL first: children made since hold copies of key, and the entry
   * lives while any copy is open */
  (void)luamp_sys.epoll_ctl(e->epfd, EPOLL_CTL_DEL, key, NULL);
  close(key);
  return 0;
}

/* es:set_timer(deadline): the set becomes readable at deadline (seconds
 * on core.now()'s clock, CLOCK_MONOTONIC); nil disarms.  Either way an
 * expiry not yet seen is forgotten. */
static int evset_set_timer(lua_State *L) {
  struct evset *e = checkevset(L);
  struct itimerspec its = {{0, 0}, {0, 0}};
  uint64_t ticks;
  if (!lua_isnoneornil(L, 2)) {
    double d = luaL_checknumber(L, 2);
    luaL_argcheck(L, d == d, 2, "deadline is NaN");
    if (d < 1e-6) d = 1e-6;              /* 0 would disarm */
    if (d > 1e12) d = 1e12;
    its.it_value.tv_sec = (time_t)d;
    its.it_value.tv_nsec = (long)((d - floor(d)) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
      its.it_value.tv_nsec = 1;
  }
  (void)!luamp_sys.read(e->tfd, &ticks, sizeof ticks);
  if (luamp_sys.timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
    luamp_raise_errno(L, "OSError", errno, "timerfd_settime");
  return 0;
}

/* es:ready() -> whether the set is readable now (never waits) */
static int evset_ready(lua_State *L) {
  struct evset *e = checkevset(L);
  struct pollfd p = {e->epfd, POLLIN, 0};
  int r;
  while ((r = luamp_sys.poll(&p, 1, 0)) < 0 && errno == EINTR) {}
  lua_pushboolean(L, r > 0);
  return 1;
}

static int evset_fileno(lua_State *L) {
  struct evset *e = luamp_self(L, 1, &evset_type);
  if (e->epfd < 0) luamp_raise(L, "ValueError", "EventSet is closed");
  lua_pushinteger(L, e->epfd);
  return 1;
}

static int evset_tostring(lua_State *L) {
  struct evset *e = luamp_self(L, 1, &evset_type);
  if (e->epfd < 0) lua_pushliteral(L, "EventSet (closed)");
  else lua_pushfstring(L, "EventSet (fd %d)", e->epfd);
  return 1;
}

static const luaL_Reg evset_meth[] = {
  {"add", evset_add}, {"remove", evset_remove},
  {"set_timer", evset_set_timer}, {"ready", evset_ready},
  {"fileno", evset_fileno}, {"close", evset_close}, {NULL, NULL}
};
static const luaL_Reg evset_mm[] = {
  {"__gc", evset_close}, {"__close", evset_close},
  {"__tostring", evset_tostring}, {NULL, NULL}
};
static struct luamp_type evset_type = {
  EVSET_TNAME, evset_meth, evset_mm, NULL, 0, 0, 0
};

int luamp_open_evset(lua_State *L) {
  luamp_newtype(L, &evset_type);
  lua_pop(L, 1);
  lua_pushcfunction(L, l_evset);
  lua_setfield(L, -2, "EventSet");
  return 0;
}
