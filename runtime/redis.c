/*
 * redis.c -- a connection to a Redis server, through hiredis.
 *
 * The broker of the Pool, Executor and Queue that reach beyond one
 * machine (multiprocessing.broker and its users) speaks to Redis through
 * this one type, multiprocessing.Redis.  hiredis does the protocol (RESP:
 * building commands, parsing replies); this file does what the runtime
 * asks of every wait: the socket is non-blocking and every read and write
 * waits in luamp_robust_poll, so each has a deadline and Ctrl-C ends it.
 * Commands go out pipelined: pipeline() appends many, writes them in one
 * go and reads every reply, so a batch of tasks costs one round trip.
 *
 * Fork discipline: the fd is close-on-exec from the moment hiredis made
 * it (no thread can fork in between), and the handle records its owner
 * pid.  A forked child never speaks on its parent's connection -- the
 * bytes would interleave with the parent's on the one server session --
 * so every method raises ValueError there (the Lua side reconnects by
 * pid check first), and a child's finalizer only drops its own copy of
 * the fd and of hiredis's memory (redisFree sends nothing).
 *
 * A wait that ends early (timeout, Ctrl-C) or an I/O error leaves the
 * session with replies unread, so the connection is dropped at once: a
 * later reply can never be taken for another command's.  Failures to
 * reach or keep the server raise BrokenPoolError; a command's own error
 * reply raises RemoteError with the server's text in field redis (or, in
 * a pipeline, is such an error object in the list of replies).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "internal.h"

#define REDIS_TNAME "multiprocessing.Redis"

struct rconn {
  redisContext *c;     /* NULL once closed */
  redisReply *reply;   /* the reply being converted (freed by the next
                          read or by close, so a raise mid-way leaks
                          nothing) */
  pid_t owner;
  int depth;           /* nesting of the reply being converted */
};

static struct luamp_type redis_type;

static void drop(struct rconn *r) {
  redisContext *c = r->c;
  redisReply *reply = r->reply;
  r->c = NULL;                 /* closed before the resource goes */
  r->reply = NULL;
  if (reply) freeReplyObject(reply);
  if (c) redisFree(c);         /* closes only this process's fd copy */
}

static struct rconn *check_open(lua_State *L) {
  struct rconn *r = luamp_self(L, 1, &redis_type);
  if (r->c == NULL) luamp_raise(L, "ValueError", "redis connection is closed");
  if (r->owner != luamp_pid())
    luamp_raise(L, "ValueError", "redis connection belongs to process %d "
                "(a forked child must connect again)", (int)r->owner);
  return r;
}

/* Raises BrokenPoolError for a failed connection (dropping it). */
static LUAMP_NORETURN void broken(lua_State *L, struct rconn *r,
                                  const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s", r->c && r->c->errstr[0] ? r->c->errstr
                                                          : "connection lost");
  drop(r);
  luamp_raise(L, "BrokenPoolError", "redis %s: %s", what, msg);
}

/* Waits until the fd is ready for ev; drops the connection and raises
 * on timeout (TimeoutError), Ctrl-C or a poll error. */
static void wait_fd(lua_State *L, struct rconn *r, short ev, double deadline) {
  struct pollfd p = {.fd = r->c->fd, .events = ev};
  int rc = luamp_robust_poll(L, &p, 1, deadline);
  if (rc > 0) return;
  drop(r);
  if (rc == -2) luamp_raise_interrupt(L);
  if (rc == 0) luamp_raise(L, "TimeoutError", "redis reply not in time");
  luamp_raise_errno(L, "BrokenPoolError", errno, "redis poll");
}

/* core.redis_connect(host, port, path, timeout) -> Redis: TCP to
 * host:port, or the unix socket path when path is given. */
static int l_connect(lua_State *L) {
  const char *host = luaL_optstring(L, 1, NULL);
  int port = (int)luaL_optinteger(L, 2, 6379);
  const char *path = luaL_optstring(L, 3, NULL);
  double deadline = luamp_deadline_arg(L, 4);
  struct rconn *r = lua_newuserdatauv(L, sizeof *r, 0);
  int err = 0;
  socklen_t len = sizeof err;
  memset(r, 0, sizeof *r);                 /* closed */
  luaL_setmetatable(L, REDIS_TNAME);
  r->owner = luamp_pid();
  if (path == NULL && host == NULL)
    return luaL_argerror(L, 1, "host or path expected");
  r->c = path ? redisConnectUnixNonBlock(path)
              : redisConnectNonBlock(host, port);
  if (r->c == NULL) return luaL_error(L, "not enough memory");
  if (r->c->err) broken(L, r, "connect");
  fcntl(r->c->fd, F_SETFD, FD_CLOEXEC);
  {
    struct pollfd p = {.fd = r->c->fd, .events = POLLOUT};
    int rc = luamp_robust_poll(L, &p, 1, deadline);
    if (rc == -2) { drop(r); luamp_raise_interrupt(L); }
    if (rc == 0) {
      drop(r);
      luamp_raise(L, "BrokenPoolError", "redis connect to %s: timed out",
                  path ? path : host);
    }
  }
  if (getsockopt(r->c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (err != 0) {
    drop(r);
    luamp_raise(L, "BrokenPoolError", "redis connect to %s: %s",
                path ? path : host, strerror(err));
  }
  return 1;
}

/* Appends the command whose arguments are the strings of the sequence at
 * idx (numbers are converted). */
static void append(lua_State *L, struct rconn *r, int idx) {
  int n = (int)luaL_len(L, idx);
  const char **argv;
  size_t *lens;
  luaL_argcheck(L, n > 0, idx, "empty command");
  luaL_checkstack(L, n + 2, "command too long");
  argv = lua_newuserdatauv(L, (size_t)n * (sizeof *argv + sizeof *lens), 0);
  lens = (size_t *)(argv + n);
  for (int i = 0; i < n; i++) {
    lua_geti(L, idx, i + 1);
    argv[i] = lua_tolstring(L, -1, &lens[i]);
    if (argv[i] == NULL)
      luaL_error(L, "redis command argument %d is a %s, not a string", i + 1,
                 luaL_typename(L, -1));
  }
  if (redisAppendCommandArgv(r->c, n, argv, lens) != REDIS_OK)
    broken(L, r, "append");
  lua_pop(L, n + 1);
}

static void flush(lua_State *L, struct rconn *r, double deadline) {
  int done = 0;
  for (;;) {
    if (redisBufferWrite(r->c, &done) != REDIS_OK) broken(L, r, "write");
    if (done) return;
    wait_fd(L, r, POLLOUT, deadline);
  }
}

/* Reads the next reply into r->reply. */
static void read_reply(lua_State *L, struct rconn *r, double deadline) {
  void *reply = NULL;
  if (r->reply) {
    redisReply *old = r->reply;
    r->reply = NULL;
    freeReplyObject(old);
  }
  for (;;) {
    if (redisGetReplyFromReader(r->c, &reply) != REDIS_OK) broken(L, r, "read");
    if (reply != NULL) break;
    wait_fd(L, r, POLLIN, deadline);
    if (redisBufferRead(r->c) != REDIS_OK) broken(L, r, "read");
  }
  r->reply = reply;
}

/* Pushes reply as Lua: strings, integers, arrays (sequences with n; a
 * nil inside is false), nil; an error reply as a RemoteError object. */
static void push_reply(lua_State *L, redisReply *x, int depth) {
  if (depth > 64) luaL_error(L, "redis reply nested too deep");
  switch (x->type) {
    case REDIS_REPLY_STRING: case REDIS_REPLY_STATUS:
      lua_pushlstring(L, x->str, x->len);
      break;
    case REDIS_REPLY_INTEGER:
      lua_pushinteger(L, (lua_Integer)x->integer);
      break;
    case REDIS_REPLY_ARRAY:
      luaL_checkstack(L, 4, "redis reply");
      lua_createtable(L, (int)x->elements, 1);
      for (size_t i = 0; i < x->elements; i++) {
        if (x->element[i]->type == REDIS_REPLY_NIL) lua_pushboolean(L, 0);
        else push_reply(L, x->element[i], depth + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
      lua_pushinteger(L, (lua_Integer)x->elements);
      lua_setfield(L, -2, "n");
      break;
    case REDIS_REPLY_ERROR:
      lua_pushfstring(L, "redis: %s", x->str);
      luamp_push_error(L, "RemoteError", lua_tostring(L, -1));
      lua_remove(L, -2);
      lua_pushlstring(L, x->str, x->len);
      lua_setfield(L, -2, "redis");
      break;
    default:
      lua_pushnil(L);
  }
}

/* r:command({argv...} [, timeout]) -> reply; an error reply raises. */
static int l_command(lua_State *L) {
  struct rconn *r = check_open(L);
  double deadline;
  luaL_checktype(L, 2, LUA_TTABLE);
  deadline = luamp_deadline_arg(L, 3);
  append(L, r, 2);
  flush(L, r, deadline);
  read_reply(L, r, deadline);
  push_reply(L, r->reply, 0);
  if (r->reply->type == REDIS_REPLY_ERROR) {
    luaL_where(L, 1);
    lua_setfield(L, -2, "where");
    return lua_error(L);
  }
  return 1;
}

/* Appends the commands of the list at index 2 and writes them all;
 * returns how many. */
static lua_Integer send_all(lua_State *L, struct rconn *r, double deadline) {
  lua_Integer n;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = luaL_len(L, 2);
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_geti(L, 2, i) != LUA_TTABLE)
      luaL_error(L, "redis pipeline: command %d is not a table", (int)i);
    append(L, r, lua_gettop(L));
    lua_pop(L, 1);
  }
  flush(L, r, deadline);
  return n;
}

/* Pushes the next n replies as a list (with n); error replies are
 * RemoteError objects in it, not raised. */
static int receive_n(lua_State *L, struct rconn *r, lua_Integer n,
                     double deadline) {
  lua_createtable(L, (int)n, 1);
  for (lua_Integer i = 1; i <= n; i++) {
    read_reply(L, r, deadline);
    if (r->reply->type == REDIS_REPLY_NIL) lua_pushboolean(L, 0);
    else push_reply(L, r->reply, 0);
    lua_rawseti(L, -2, i);
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  return 1;
}

/* r:pipeline({{argv...}, ...} [, timeout]) -> {reply, ...}: every
 * command sent in one write, every reply read; error replies are
 * RemoteError objects in the list, not raised. */
static int l_pipeline(lua_State *L) {
  struct rconn *r = check_open(L);
  double deadline = luamp_deadline_arg(L, 3);
  return receive_n(L, r, send_all(L, r, deadline), deadline);
}

/* r:send({{argv...}, ...} [, timeout]) -> n: the commands written, their
 * replies left to a later r:receive(n) (before any other command's: the
 * caller keeps count).  Written means in the server's socket: the server
 * runs them whatever this process does next. */
static int l_send(lua_State *L) {
  struct rconn *r = check_open(L);
  lua_pushinteger(L, send_all(L, r, luamp_deadline_arg(L, 3)));
  return 1;
}

/* r:receive(n [, timeout]) -> {reply, ...}: the next n replies. */
static int l_receive(lua_State *L) {
  struct rconn *r = check_open(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 0, 2, "negative count");
  return receive_n(L, r, n, luamp_deadline_arg(L, 3));
}

static int l_close(lua_State *L) {
  struct rconn *r = luamp_self(L, 1, &redis_type);
  drop(r);
  return 0;
}

static int l_fileno(lua_State *L) {
  struct rconn *r = check_open(L);
  lua_pushinteger(L, r->c->fd);
  return 1;
}

/* r:owner() -> pid of the process that made the connection (false once
 * closed): the Lua side reconnects when it is not its own. */
static int l_owner(lua_State *L) {
  struct rconn *r = luamp_self(L, 1, &redis_type);
  if (r->c == NULL) lua_pushboolean(L, 0);
  else lua_pushinteger(L, r->owner);
  return 1;
}

static int l_tostring(lua_State *L) {
  struct rconn *r = luamp_self(L, 1, &redis_type);
  lua_pushfstring(L, "Redis connection (%s)", r->c ? "open" : "closed");
  return 1;
}

static const luaL_Reg meth[] = {
  {"command", l_command}, {"pipeline", l_pipeline}, {"send", l_send},
  {"receive", l_receive}, {"close", l_close},
  {"fileno", l_fileno}, {"owner", l_owner}, {NULL, NULL}
};
static const luaL_Reg metameth[] = {
  {"__gc", l_close}, {"__close", l_close}, {"__tostring", l_tostring},
  {NULL, NULL}
};
static struct luamp_type redis_type = {REDIS_TNAME, meth, metameth, NULL, 0,
                                       0, 0};

int luamp_open_redis(lua_State *L) {
  luamp_newtype(L, &redis_type);
  lua_pop(L, 1);
  lua_pushcfunction(L, l_connect);
  lua_setfield(L, -2, "redis_connect");
  return 0;
}
