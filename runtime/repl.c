/*
 * repl.c -- the interactive loop of the luamp command.
 *
 * Reads chunks line by line, as lua.c does: a first line is tried as an
 * expression ("return <line>", so bare expressions and "=expr" print their
 * values), then as a statement; input whose only fault is reaching <eof>
 * continues on the next line with the secondary prompt.  Ctrl-C at the
 * prompt drops the chunk being typed; Ctrl-C while a chunk runs interrupts
 * it (luamp_host_docall) and returns here.
 *
 * On a terminal, lines come from libedit (when the build found it): line
 * editing, history kept in ~/.luamp_history, Tab completion; results are
 * pretty-printed.  The completion and the printing are Lua, in
 * lua/multiprocessing/repl.lua.  Input that is not a terminal is read and
 * echoed exactly as lua5.4 does, so transcripts match it byte for byte.
 */
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#ifdef LUAMP_HAVE_LIBEDIT
#include <dlfcn.h>
#include <editline/readline.h>
#endif

#include "host.h"

#define MAX_LINE 4096
/* Registry key of the multiprocessing.repl table (show, complete). */
#define HELPER_KEY "luamp.repl"

/* Set by the prompt's SIGINT handler, read after the input call returns. */
static volatile sig_atomic_t prompt_interrupted = 0;
/* stdin is a terminal: edit lines, pretty-print results. */
static int interactive = 0;

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

/* ---- plain input: no terminal, or no libedit -------------------------- */

/* Reads one line (without its newline) and pushes it.  Returns 0 at end of
 * input, -1 when Ctrl-C dropped the line, 1 otherwise.  Input that is not
 * a terminal is echoed after the prompt, as lua5.4 (through readline)
 * does, so transcripts read naturally. */
static int plain_read_line(lua_State *L, const char *prompt) {
  char buf[MAX_LINE];
  luaL_Buffer b;
  int got = 0;
  prompt_interrupted = 0;
  fputs(prompt, stdout);
  fflush(stdout);
  luaL_buffinit(L, &b);
  for (;;) {
    size_t len;
    if (fgets(buf, sizeof buf, stdin) == NULL) {
      if (prompt_interrupted) {
        clearerr(stdin);
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
    if (!interactive) {
      fputs(buf, stdout);
      fflush(stdout);
    }
    if (len > 0 && buf[len - 1] == '\n') {
      luaL_addlstring(&b, buf, len - 1);
      luaL_pushresult(&b);
      return 1;
    }
    luaL_addlstring(&b, buf, len);
  }
  luaL_pushresult(&b);
  if (!got) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;  /* last line without a newline */
}

/* ---- libedit: editing, history, completion ----------------------------- */

/* Pushes field name of the helper table; 0 (nothing pushed) when the
 * helper could not be loaded. */
static int push_helper(lua_State *L, const char *name) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, HELPER_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

#ifdef LUAMP_HAVE_LIBEDIT

/* libedit is loaded when the REPL starts on a terminal, not linked: a
 * script or a worker never maps it, which keeps every fork of a luamp
 * process cheaper (fewer mappings to copy and fault in), and luamp runs
 * where the library is missing, with a plain prompt.  The header gives the
 * types; these pointers the functions and variables. */
static struct {
  __typeof__(&readline) readline;
  __typeof__(&add_history) add_history;
  __typeof__(&read_history) read_history;
  __typeof__(&write_history) write_history;
  __typeof__(&using_history) using_history;
  __typeof__(&stifle_history) stifle_history;
  __typeof__(&rl_initialize) initialize;
  __typeof__(&rl_readline_name) readline_name;
  __typeof__(&rl_catch_signals) catch_signals;
  __typeof__(&rl_attempted_completion_function) attempted_completion_function;
  __typeof__(&rl_basic_word_break_characters) basic_word_break_characters;
  __typeof__(&rl_completer_word_break_characters) completer_word_break_characters;
  __typeof__(&rl_completion_append_character) completion_append_character;
  __typeof__(&rl_attempted_completion_over) attempted_completion_over;
} ed;

static int editing = 0;     /* libedit is loaded and reads the lines */

static int load_libedit(void) {
  void *h = dlopen("libedit.so.2", RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) return 0;
#define SYM(field, name) \
  if ((*(void **)&ed.field = dlsym(h, name)) == NULL) goto missing
  SYM(readline, "readline");
  SYM(add_history, "add_history");
  SYM(read_history, "read_history");
  SYM(write_history, "write_history");
  SYM(using_history, "using_history");
  SYM(stifle_history, "stifle_history");
  SYM(initialize, "rl_initialize");
  SYM(readline_name, "rl_readline_name");
  SYM(catch_signals, "rl_catch_signals");
  SYM(attempted_completion_function, "rl_attempted_completion_function");
  SYM(basic_word_break_characters, "rl_basic_word_break_characters");
  SYM(completer_word_break_characters, "rl_completer_word_break_characters");
  SYM(completion_append_character, "rl_completion_append_character");
  SYM(attempted_completion_over, "rl_attempted_completion_over");
#undef SYM
  return 1;
missing:
  dlclose(h);
  return 0;
}

/* libedit's callbacks take no user pointer: the state being edited for. */
static lua_State *edit_L = NULL;
static char *history_path = NULL;
static char *last_saved = NULL;
/* Words break where Lua expressions do, but not at '.' and ':', so that
 * "mp.Po" and "q:pu" are completed as one word. */
static char word_breaks[] = " \t\n\"\\'`@$><=;|&{}()[],+-*/%^~#";

/* Tab: the candidates come from multiprocessing.repl's complete(word);
 * entry 0 is their longest common prefix, which replaces the word. */
static char **complete(const char *text, int start, int end) {
  lua_State *L = edit_L;
  int top = lua_gettop(L);
  char **matches = NULL;
  size_t n, common = 0;
  (void)start; (void)end;
  *ed.attempted_completion_over = 1;  /* never fall back to file names */
  if (!push_helper(L, "complete")) return NULL;
  lua_pushstring(L, text);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK || !lua_istable(L, -1)) goto done;
  n = (size_t)lua_rawlen(L, -1);
  if (n == 0) goto done;
  matches = calloc(n + 2, sizeof *matches);
  if (matches == NULL) goto done;
  for (size_t i = 1; i <= n; i++) {
    const char *s;
    lua_rawgeti(L, -1, (lua_Integer)i);
    s = lua_tostring(L, -1);
    matches[i] = strdup(s ? s : "");
    lua_pop(L, 1);
    if (matches[i] == NULL) goto oom;
    if (i == 1) {
      common = strlen(matches[1]);
    } else {
      size_t k = 0;
      while (k < common && matches[i][k] == matches[1][k]) k++;
      common = k;
    }
  }
  matches[0] = strndup(matches[1], common);
  if (matches[0] == NULL) goto oom;
  if (n == 1) {  /* a single match is entry 0 alone */
    free(matches[1]);
    matches[1] = NULL;
  }
  goto done;
oom:
  for (size_t i = 0; i <= n; i++) free(matches[i]);
  free(matches);
  matches = NULL;
done:
  lua_settop(L, top);
  return matches;
}

/* $LUAMP_HISTORY, else ~/.luamp_history; NULL (no history) when it is
 * set empty or there is no HOME. */
static char *find_history_path(void) {
  const char *env = getenv("LUAMP_HISTORY");
  const char *home = getenv("HOME");
  char *p;
  if (env) return env[0] ? strdup(env) : NULL;
  if (home == NULL || home[0] == '\0') return NULL;
  p = malloc(strlen(home) + sizeof "/.luamp_history");
  if (p) sprintf(p, "%s/.luamp_history", home);
  return p;
}

/* The terminal's encoding (UTF-8 input) is in LC_CTYPE; Lua itself runs
 * in the "C" locale as lua.c leaves it, so the user's locale is only in
 * force while libedit reads. */
static char *enter_user_locale(void) {
  const char *cur = setlocale(LC_CTYPE, NULL);
  char *saved = cur ? strdup(cur) : NULL;
  setlocale(LC_CTYPE, "");
  return saved;
}

static void leave_user_locale(char *saved) {
  setlocale(LC_CTYPE, saved ? saved : "C");
  free(saved);
}

static void edit_open(lua_State *L) {
  char *loc = enter_user_locale();
  edit_L = L;
  *ed.readline_name = "luamp";
  *ed.catch_signals = 0;         /* Ctrl-C is ours (catch_prompt_sigint) */
  *ed.attempted_completion_function = complete;
  *ed.basic_word_break_characters = word_breaks;
  *ed.completer_word_break_characters = word_breaks;
  *ed.completion_append_character = '\0';
  ed.initialize();
  ed.using_history();
  ed.stifle_history(1000);
  history_path = find_history_path();
  if (history_path) ed.read_history(history_path);
  leave_user_locale(loc);
}

static void edit_close(void) {
  free(history_path);
  free(last_saved);
  history_path = last_saved = NULL;
  edit_L = NULL;
}

/* Each line typed goes into the history (and the file, at once, so that
 * a session that is killed keeps it); blank lines and repeats do not. */
static void remember(const char *line) {
  if (line[strspn(line, " \t")] == '\0') return;
  if (last_saved && strcmp(last_saved, line) == 0) return;
  ed.add_history(line);
  free(last_saved);
  last_saved = strdup(line);
  if (history_path) {
    /* private from the start: history may hold secrets */
    int fd = open(history_path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) close(fd);
    ed.write_history(history_path);
  }
}

static int edit_read_line(lua_State *L, const char *prompt) {
  char *line, *loc = enter_user_locale();
  prompt_interrupted = 0;
  line = ed.readline(prompt);
  leave_user_locale(loc);
  if (prompt_interrupted) {  /* the read failed with EINTR */
    free(line);
    fputc('\n', stdout);
    fflush(stdout);
    return -1;
  }
  if (line == NULL) return 0;
  remember(line);
  lua_pushstring(L, line);
  free(line);
  return 1;
}

#endif /* LUAMP_HAVE_LIBEDIT */

static int read_line(lua_State *L, int first) {
  const char *prompt = get_prompt(L, first);
#ifdef LUAMP_HAVE_LIBEDIT
  if (editing) return edit_read_line(L, prompt);
#endif
  return plain_read_line(L, prompt);
}

/* ---- compiling and running ---------------------------------------------- */

/* An error that only says the chunk ended too early. */
static int incomplete(lua_State *L, int status) {
  if (status == LUA_ERRSYNTAX) {
    size_t len;
    const char *msg = lua_tolstring(L, -1, &len);
    const char *eof = "<eof>";
    size_t n = strlen(eof);
    return len >= n && strcmp(msg + len - n, eof) == 0;
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
 * only problem is an early end.  Leaves the chunk (or error) on top; at
 * end of input the error is the one about the early end, as in lua.c.
 * Returns -1 when Ctrl-C dropped the chunk. */
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
    r = read_line(L, 0);     /* pushes the next line, if any */
    if (r == 0) {
      lua_remove(L, -2);     /* the text; its error stays */
      return status;
    }
    if (r < 0) {
      lua_pop(L, 2);         /* the error and the text */
      return -1;
    }
    lua_remove(L, -2);       /* the error */
    lua_pushliteral(L, "\n");
    lua_insert(L, -2);
    lua_concat(L, 3);
  }
}

static int terminal_width(void) {
  struct winsize ws;
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
    return ws.ws_col;
  return 80;
}

/* Prints everything on the stack: on a terminal through
 * multiprocessing.repl's show (tables pretty-printed; it runs under the
 * Ctrl-C hook, as a huge table may take a while), else with the global
 * print as lua.c does. */
static void print_results(lua_State *L) {
  int n = lua_gettop(L);
  if (n == 0) return;
  luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
  if (interactive && push_helper(L, "show")) {
    lua_insert(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, terminal_width());
    lua_setfield(L, -2, "width");
    lua_insert(L, 2);
    luamp_host_report(L, luamp_host_docall(L, n + 1, 0));
    return;
  }
  lua_getglobal(L, "print");
  lua_insert(L, 1);
  if (lua_pcall(L, n, 0, 0) != LUA_OK)
    luamp_host_message(NULL, lua_pushfstring(L, "error calling 'print' (%s)",
                                             lua_tostring(L, -1)));
}

/* Loads multiprocessing.repl into the registry; without it the REPL
 * still works, printing as lua.c does and completing nothing. */
static void load_helper(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing.repl");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_istable(L, -1))
    lua_setfield(L, LUA_REGISTRYINDEX, HELPER_KEY);
  else
    lua_pop(L, 1);
}

void luamp_repl(lua_State *L) {
  const char *saved = luamp_host_progname;
  struct sigaction outer;
  /* For the whole session Ctrl-C only sets a flag (luamp_host_docall puts
   * its own handler in place while a chunk runs), so that a Ctrl-C between
   * two chunks cannot kill the REPL; at the prompt it makes the blocked
   * read fail with EINTR. */
  luamp_host_sigint(on_prompt_sigint, &outer);
  interactive = isatty(STDIN_FILENO);
  luamp_host_progname = NULL;
  if (interactive) load_helper(L);
#ifdef LUAMP_HAVE_LIBEDIT
  editing = interactive && load_libedit();
  if (editing) edit_open(L);
#endif
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
#ifdef LUAMP_HAVE_LIBEDIT
  if (editing) edit_close();
#endif
  lua_settop(L, 0);
  fputc('\n', stdout);
  fflush(stdout);
  sigaction(SIGINT, &outer, NULL);
  luamp_host_progname = saved;
}
