/*
 * luamp.h -- public C interface of libluamp.
 *
 * luamp gives Lua 5.4 Python's multiprocessing: Process, Pool, Queue, Pipe,
 * Manager, shared memory and locks, with forked interpreters as workers.
 * This header is for C and C++ programs that embed Lua 5.4 and want the
 * module in their lua_State.  The Lua API itself is documented in README.md
 * and the project's API contract.
 *
 * ---- Building -------------------------------------------------------------
 *
 * libluamp (libluamp.so.0 and libluamp.a) does not link liblua: the Lua API
 * symbols come from the host, which links liblua5.4 once.  Installed with
 * "make install", pkg-config knows the flags:
 *
 *     cc host.c $(pkg-config --cflags --libs luamp)                shared
 *
 *     cc host.c $(pkg-config --cflags luamp) /usr/local/lib/libluamp.a \
 *        $(pkg-config --static --libs-only-l luamp | sed 's/-lluamp//')
 *                                                                  static
 *
 * (luamp.pc's Requires: lua5.4 brings Lua's flags; Libs.private lists the
 * system libraries the archive needs.)
 *
 * Only Lua 5.4 will do (the library checks the version of the state it is
 * given: luaL_checkversion).  Everything the library exports starts with luamp_ or luaopen_;
 * LUAMP_VERSION says which API this header describes and luamp_version()
 * which library is linked.
 *
 * ---- Loading the module ---------------------------------------------------
 *
 * Open the standard libraries first (luaL_openlibs, or at least base,
 * package, string, table, math, io and os: the module's Lua parts use
 * them), then either
 *
 *     luamp_preload(L);      scripts say  local mp = require "multiprocessing"
 *
 * or, to load it now and set the global "multiprocessing",
 *
 *     luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 1);
 *     lua_pop(L, 1);
 *
 * The module's Lua files are compiled into the library: no file needs to be
 * on LUA_PATH or LUA_CPATH.  A state that is meant to fork workers must be
 * used by one thread at a time (Lua states are never thread-safe), and the
 * runtime is built for one state per process: the children, queues and
 * exit handling are per process.
 *
 * ---- Running a Lua-defined worker entry from C ----------------------------
 *
 * A Process target and a Pool task are Lua functions.  A Process child is
 * a fork of the caller, so the function, its upvalues and its arguments are
 * used as they are; Pool tasks are encoded (bytecode plus upvalues) and
 * may run in workers forked earlier.  From C, call the Lua API as a script
 * would, under lua_pcall:
 *
 *     -- worker.lua, loaded by the host:  function worker_main(n) ... end
 *
 *     static int start_worker(lua_State *L) {  // called with lua_pcall
 *       lua_getglobal(L, "require");
 *       lua_pushliteral(L, "multiprocessing");
 *       lua_call(L, 1, 1);                      // mp
 *       lua_getfield(L, -1, "Process");
 *       lua_createtable(L, 0, 2);               // {target =, args =}
 *       lua_getglobal(L, "worker_main");
 *       lua_setfield(L, -2, "target");
 *       lua_createtable(L, 1, 0);
 *       lua_pushinteger(L, 42);
 *       lua_rawseti(L, -2, 1);
 *       lua_setfield(L, -2, "args");
 *       lua_call(L, 1, 1);                      // p = mp.Process{...}
 *       lua_getfield(L, -1, "start");
 *       lua_pushvalue(L, -2);
 *       lua_call(L, 1, 0);                      // p:start()
 *       lua_getfield(L, -1, "join");
 *       lua_pushvalue(L, -2);
 *       lua_call(L, 1, 0);                      // p:join()
 *       lua_getfield(L, -1, "exitcode");
 *       return 1;
 *     }
 *
 * (Loading a chunk of Lua that does the same -- luaL_loadstring plus
 * lua_pcall -- is shorter and just as good.)  In the child the host's C
 * stack is there, as fork copies it, but control never returns into it:
 * the child runs the target and leaves with _exit, running no atexit
 * handlers, C++ destructors or host cleanup.  Its exit code is the
 * Process's exitcode (0, the n of os.exit(n), 1 after an uncaught error).
 *
 * C functions of the host work in workers: a forked child has all of the
 * host's code.  For a Pool task (which is encoded) to refer to one, it
 * must be a field of a module in package.loaded (luaL_requiref(L, "host",
 * open_host, 1)), because functions of C travel by name and are looked up
 * again in the worker; any other C function raises EncodeError.  Such a C
 * function can be the task itself -- a "C worker" -- driven from C as any
 * method call:
 *
 *     // stack: pool (from mp.Pool(4)), then:
 *     lua_getfield(L, pool, "map");
 *     lua_pushvalue(L, pool);
 *     lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
 *     lua_getfield(L, -1, "host");
 *     lua_getfield(L, -1, "checksum");      // host.checksum, by name
 *     lua_replace(L, -3);
 *     lua_pop(L, 1);
 *     push_the_inputs_table(L);
 *     if (lua_pcall(L, 3, 1, 0) != LUA_OK) ...   // results, in order
 *
 * and a Lua task may call it (function(w) return host.checksum(w) end,
 * with host an upvalue or a global).  scripts/examples/embed/host.c runs
 * such a Pool from a script; spec/c/test_embed.c drives one from C.
 * Globals a task reads are looked up in the worker, whose globals are the
 * host's as they were when the Pool forked it: set what tasks need (or
 * load modules) before creating the Pool, or give it to them as
 * upvalues or arguments.
 *
 * Errors raised by the module are tables (fields kind, message and, where
 * they apply, traceback, value, errno) with a __tostring metamethod: use
 * luaL_tolstring, not lua_tostring, to print one.
 *
 * ---- Forks and what the host must do around them --------------------------
 *
 * Process:start(), a Pool (its workers, and the replacements for workers
 * that die or retire), a Manager's server and the other primitives fork
 * the process.  fork copies the whole host: its memory, every open file
 * descriptor and the calling thread (only that one).  Before forking the
 * runtime flushes stdio (fflush(NULL)) and blocks signals; the child
 * unblocks them, keeps the signal dispositions (so the host's SIGINT
 * handler still turns Ctrl-C into "interrupted!"), forgets its parent's
 * children, and never closes, unlinks or kills what its parent owns.
 *
 * The host's own resources are the host's to handle.  In a child, a
 * database connection, a TLS session, a listening socket or an event
 * loop's epoll descriptor is shared with the parent: the child must not
 * use it, and must not shut it down in a way the other side sees (a
 * protocol goodbye, SSL_shutdown, epoll_ctl on the shared epoll set, which
 * changes the parent's set).  Closing the descriptor is safe (it only drops
 * the child's reference).  Generators seeded once per process need a new
 * seed.  Register C hooks for this with luamp_atfork (below): before runs
 * in the parent just before each fork (flush your buffers, take the locks
 * the child will need), parent after it in the parent (release them),
 * child in the new child before any Lua code (release or re-create the
 * locks, close or forget inherited handles, reseed).  They run together
 * with the Lua hooks of mp.register_at_fork (before, after_in_parent,
 * after_in_child), so script and host see the same forks, in this order:
 * the Lua before hooks, then the C before hooks (each kind in reverse
 * order of registration); fork; then in each process the C hooks, then
 * the Lua ones (in order of registration) -- the host's hooks are the
 * innermost, so a child's Lua hooks already see the host's state reset.
 * A hook returns nothing: it cannot stop the fork.
 *
 * ---- Hosts with threads ---------------------------------------------------
 *
 * The runtime starts no threads.  fork copies only the thread that calls
 * it; in the child every lock another thread held at that instant stays
 * locked for ever.  What is safe:
 *
 *  1. A single-threaded host: always.
 *  2. A host that creates its Pools, Processes and Managers before it
 *     starts any thread.  Afterwards only the thread that owns the
 *     lua_State may call into it.  But a Pool forks again to replace a
 *     worker that died or reached maxtasksperchild, and any later
 *     Process:start() forks too: those forks happen with the threads
 *     running and are safe only under rule 3.
 *  3. Forking while other threads run, when all of these hold: the fork
 *     comes from the thread that owns the lua_State; no other thread
 *     touches that state (or any Lua value of it) meanwhile; and every
 *     lock that the child's code path takes is either glibc's own (malloc
 *     and stdio are made fork-safe by glibc's at-fork handling) or held
 *     across the fork by a luamp_atfork before hook and released by the
 *     parent and child hooks.  A child that calls host C functions which
 *     take other locks (a logger's mutex, a connection pool's) can hang
 *     if another thread held such a lock when the fork happened.
 *
 * Best of all, for a host with threads: call luamp_forkserver_start()
 * (below) first thing in main(), and use the "forkserver" start method
 * (mp.set_start_method("forkserver")): Processes and Pool workers are
 * then forked by that server, which has one thread and holds no lock of
 * the host's.  A fork made by the runtime from a process with more than
 * one thread prints a warning on stderr, once.
 *
 * Never fork from a thread other than the state's owner, and never while
 * another thread runs Lua code of the same state.  A child cannot use the
 * host's other threads (they are not there): work handed to a thread
 * pool, an async logger or a background flusher never happens in the
 * child.  Threads that block signals to take them in a signal thread do
 * not stop children from being signalled: children start with every
 * signal unblocked.  Pool workers are made to die with the thread that
 * forked them (PR_SET_PDEATHSIG, so that an owner killed outright leaves
 * no orphans): a thread that creates a Pool must outlive it.
 *
 * ---- Ctrl-C ---------------------------------------------------------------
 *
 * Every blocking call (join, get, recv, map, wait...) ends with Lua's
 * "interrupted!" error when the host answers SIGINT the way lua.c does: a
 * handler, installed with sigaction and without SA_RESTART, that calls
 *
 *     lua_sethook(L, stop, LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE |
 *                          LUA_MASKCOUNT, 1);
 *
 * on the state's main thread, where stop() removes the hook and raises
 * luaL_error(L, "interrupted!").  The waits see EINTR, recognise that hook,
 * release what they hold and raise.  A host that handles SIGINT some other
 * way keeps its own behaviour; waits then resume after the signal.
 *
 * Two dispositions are the runtime's business: SIGPIPE, when at its
 * default, is set to be ignored as the module opens (a write to a closed
 * peer then raises BrokenPipeError instead of killing the process), and an
 * ignored SIGCHLD is put back to its default before a fork (waitpid needs
 * it for exit codes).  No other signal handling of the host is changed.
 */
#ifndef LUAMP_H
#define LUAMP_H

#include <sys/types.h>

#include <lua.h>

#define LUAMP_VERSION_MAJOR 0
#define LUAMP_VERSION_MINOR 1
#define LUAMP_VERSION_PATCH 0
#define LUAMP_VERSION "0.1.0"
/* major * 10000 + minor * 100 + patch, for #if comparisons */
#define LUAMP_VERSION_NUM 100

#if defined(__GNUC__)
#define LUAMP_API __attribute__((visibility("default")))
#else
#define LUAMP_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The module loader: returns the table that require "multiprocessing"
 * returns.  It also registers the module's Lua parts (compiled into the
 * library) in package.preload, so no file beside the host is needed; a
 * host that preloaded its own version of one keeps it.  Raises (as any
 * lua_CFunction) when the state has no package library. */
LUAMP_API int luaopen_multiprocessing(lua_State *L);

/* The C primitives alone ("multiprocessing.core"); the Lua parts of the
 * module require it.  Hosts normally need only luaopen_multiprocessing. */
LUAMP_API int luaopen_multiprocessing_core(lua_State *L);

/* Sets package.preload["multiprocessing"] and its submodules'
 * ("multiprocessing.core", "multiprocessing.repl", ...) in L, so that the
 * first require loads them; loads nothing yet.  Call it after opening the
 * package library. */
LUAMP_API void luamp_preload(lua_State *L);

/* LUAMP_VERSION of the library actually linked (may differ from the
 * header a host was compiled with). */
LUAMP_API const char *luamp_version(void);

/* Hooks around every fork the runtime makes (Process, Pool workers...):
 * before(ud) in the parent just before fork (hooks in reverse order of
 * registration), then parent(ud) in the parent or child(ud) in the child
 * (in order of registration).  Any of the three may be NULL.  The runtime
 * itself starts no threads; a host that runs threads should use these to
 * hold the locks a forked child will need across the fork (as with
 * pthread_atfork), and must not fork from a Lua state while another
 * thread uses the same state.  The hooks are per process, for every state
 * in it, and stay registered (there is no unregistering).  Returns 0, or
 * -1 with errno ENOMEM when the hook table (32 entries) is full. */
LUAMP_API int luamp_atfork(void (*before)(void *), void (*parent)(void *),
                           void (*child)(void *), void *ud);

/* Starts this process's fork server (the "forkserver" start method; see
 * "Hosts with threads" above).  Call it early in main(), before any
 * thread exists and before the heap grows: the server is a fork of the
 * caller at this instant, and every child started under "forkserver"
 * (mp.set_start_method("forkserver") or mp.get_context("forkserver")) is
 * a fork of the server, with one thread, the server's small heap and no
 * lock another thread held.  The server makes a Lua state of its own
 * (standard libraries and the module) and calls init(L, ud) on it when
 * init is not NULL: open there the host's C modules that tasks use
 * (luaL_requiref), set the globals they read; return 0 (anything else
 * stops the server).  Children run in copies of that state: a target,
 * its upvalues and arguments travel through the codec, and the globals a
 * target reads are the server's.  Returns 0 (a server already running
 * for this process is kept), or -1 with errno set (the reason is printed
 * on stderr).  The server dies with the thread that started it and when
 * the process exits; a server found dead at a start makes that start
 * raise ProcessError and the next one starts a new server (forked from
 * the process as it is then). */
LUAMP_API int luamp_forkserver_start(int (*init)(lua_State *L, void *ud),
                                     void *ud);
/* The running fork server's pid, 0 when this process has none. */
LUAMP_API pid_t luamp_forkserver_pid(void);

#ifdef __cplusplus
}
#endif

#endif
