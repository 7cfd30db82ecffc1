/*
 * host.h -- what the luamp command's files share: host.c runs chunks and
 * reports errors for luamp.c (the command line) and repl.c (the
 * interactive loop); luamp.c calls the loop.  Not part of libluamp.
 */
#ifndef LUAMP_HOST_H
#define LUAMP_HOST_H

#include <signal.h>

#include <lua.h>

/* Prefix of error reports: argv[0]; NULL while the REPL runs, so that
 * interactive errors read as lua5.4's do. */
extern const char *luamp_host_progname;

/* Calls the function below narg arguments under a traceback handler, with
 * Ctrl-C turned into an "interrupted!" error while it runs. */
int luamp_host_docall(lua_State *L, int narg, int nres);
/* Prints the error on top of the stack (if status says there is one). */
int luamp_host_report(lua_State *L, int status);
void luamp_host_message(const char *pname, const char *msg);
/* Puts handler in place for SIGINT without SA_RESTART (a blocked read
 * sees EINTR); the previous action goes to *old. */
void luamp_host_sigint(void (*handler)(int), struct sigaction *old);
/* The interactive loop; returns at end of input. */
void luamp_repl(lua_State *L);
/* The message handler both the host and the children process.c starts
 * use (defined in the library, errors.c; internal.h declares it there). */
int luamp_msgh(lua_State *L);

#endif
