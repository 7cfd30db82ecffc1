/*
 * repl.c -- the interactive loop of the luamp command.
 *
 * Reads chunks line by line: a first line is tried as an expression
 * ("return <line>", so bare expressions and "=expr" print their values),
 * then as a statement; input whose only fault is reaching <eof> continues
 * on the next line with the secondary prompt.  Ctrl-C at the prompt drops
 * the line being typed; Ctrl-C while a chunk runs interrupts it
 * (luamp_host_docall) and returns here.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "host.h"

#define MAX_LINE 4096

static volatile sig_atomic_t prompt_interrupted = 0;
/* Input that is not a terminal is echoed after the prompt, as lua5.4
 * (through readline) does, so transcripts read naturally. */
static int echo = 0;

static void on_prompt_sigint(int sig) {
  (void)sig;
  prompt_interrupted = 1;
}

static const char *get_prompt(lua_State *L, int first) {
  const char *p;
  lua_getglobal(L, first ? "_PROMPT" : "_PROMPT2");
  p = lua_tostring(L, -1);
  if (p == NULL) p = first ? "> " : ">> ";
  lua_pop(L, 1);  /* the string stays alive in the global or is a literal */
  return p;
}

/* Reads one line (without its newline) and pushes it.  Returns 0 at end of
 * input, -1 when Ctrl-C dropped the line, 1 otherwise. */
static int read_line(lua_State *L, int first) {
  char buf[MAX_LINE];
  struct sigaction sa, old;
  luaL_Buffer b;
  int got = 0;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_prompt_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old);   /* no SA_RESTART: fgets must return */
  prompt_interrupted = 0;
  fputs(get_prompt(L, first), stdout);
  fflush(stdout);
  luaL_buffinit(L, &b);
  for (;;) {
    size_t len;
    if (fgets(buf, sizeof buf, stdin) == NULL) {
      if (prompt_interrupted) {
        clearerr(stdin);
        sigaction(SIGINT, &old, NULL);
        luaL_pushresult(&b);
        lua_pop(L, 1);
        fputc('\n', stdout);
        return -1;
      }
      if (ferror(stdin) && errno == EINTR) {
        clearerr(stdin);
        continue;
      }
      break;
    }
    got = 1;
    len = strlen(buf);
    if (echo) {
      fputs(buf, stdout);
      fflush(stdout);
    }
    if (len > 0 && buf[len - 1] == '\n') {
      luaL_addlstring(&b, buf, len - 1);
      sigaction(SIGINT, &old, NULL);
      luaL_pushresult(&b);
      return 1;
    }
    luaL_addlstring(&b, buf, len);
  }
  sigaction(SIGINT, &old, NULL);
  luaL_pushresult(&b);
  if (!got) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;  /* last line without a newline */
}

/* An error that only says the chunk ended too early. */
static int incomplete(lua_State *L, int status) {
  if (status == LUA_ERRSYNTAX) {
    size_t len;
    const char *msg = lua_tolstring(L, -1, &len);
    const char *eof = "<eof>";
    size_t n = strlen(eof);
    if (len >= n && strcmp(msg + len - n, eof) == 0) {
      lua_pop(L, 1);
      return 1;
    }
  }
  return 0;
}

/* Line on top: try "return <line>"; on success the compiled chunk replaces
 * the line. */
static int try_expression(lua_State *L) {
  const char *line = lua_tostring(L, -1);
  const char *retline = lua_pushfstring(L, "return %s", line);
  int status = luaL_loadbuffer(L, retline, strlen(retline), "=stdin");
  if (status == LUA_OK) {
    lua_remove(L, -2);       /* the "return" text */
    lua_remove(L, -2);       /* the line */
  } else {
    lua_pop(L, 2);           /* error and "return" text */
  }
  return status;
}

/* Line on top: compile it as statements, reading more lines while the
 * only problem is an early end.  Leaves the chunk (or error) on top.
 * Returns -1 when input ended or Ctrl-C dropped the chunk. */
static int read_statement(lua_State *L) {
  for (;;) {
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    int status = luaL_loadbuffer(L, text, len, "=stdin");
    int r;
    if (!incomplete(L, status)) {
      lua_remove(L, -2);     /* the text */
      return status;
    }
    r = read_line(L, 0);
    if (r <= 0) {
      lua_pop(L, 1);
      return -1;
    }
    lua_pushliteral(L, "\n");
    lua_insert(L, -2);
    lua_concat(L, 3);
  }
}

/* Prints everything on the stack with the global print. */
static void print_results(lua_State *L) {
  int n = lua_gettop(L);
  if (n == 0) return;
  luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
  lua_getglobal(L, "print");
  lua_insert(L, 1);
  if (lua_pcall(L, n, 0, 0) != LUA_OK)
    luamp_host_message(NULL, lua_pushfstring(L, "error calling 'print' (%s)",
                                             lua_tostring(L, -1)));
}

void luamp_repl(lua_State *L) {
  const char *saved = luamp_host_progname;
  echo = !isatty(STDIN_FILENO);
  luamp_host_progname = NULL;
  for (;;) {
    int r, status;
    lua_settop(L, 0);
    r = read_line(L, 1);
    if (r == 0) break;
    if (r < 0) continue;
    if (lua_tostring(L, -1)[0] == '=') {  /* "=expr", as Lua 5.1 did */
      lua_pushfstring(L, "return %s", lua_tostring(L, -1) + 1);
      lua_remove(L, -2);
      status = luaL_loadbuffer(L, lua_tostring(L, -1),
                               lua_rawlen(L, -1), "=stdin");
      lua_remove(L, -2);
    } else if ((status = try_expression(L)) != LUA_OK) {
      status = read_statement(L);
      if (status == -1) continue;
    }
    if (status == LUA_OK) status = luamp_host_docall(L, 0, LUA_MULTRET);
    if (status == LUA_OK) print_results(L);
    else luamp_host_report(L, status);
  }
  lua_settop(L, 0);
  fputc('\n', stdout);
  fflush(stdout);
  luamp_host_progname = saved;
}
