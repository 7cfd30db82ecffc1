/*
 * luamp.h -- public C interface of libluamp.
 *
 * luamp gives Lua 5.4 Python's multiprocessing: Process, Pool, Queue, Pipe,
 * Manager, shared memory and locks, with forked interpreters as workers.
 *
 * A host that embeds Lua makes the module available with either
 *
 *     luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 0);
 *
 * or, to load it lazily on the script's first require, with
 *
 *     luamp_preload(L);
 *
 * Everything the library exports starts with luamp_ or luaopen_.
 */
#ifndef LUAMP_H
#define LUAMP_H

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
 * library) in package.preload, so no file beside the host is needed. */
LUAMP_API int luaopen_multiprocessing(lua_State *L);

/* The C primitives alone ("multiprocessing.core"); the Lua parts of the
 * module require it.  Hosts normally need only luaopen_multiprocessing. */
LUAMP_API int luaopen_multiprocessing_core(lua_State *L);

/* Sets package.preload["multiprocessing"] (and its submodules) in L. */
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
 * thread uses the same state.  Returns 0, or -1 when the hook table (32
 * entries) is full. */
LUAMP_API int luamp_atfork(void (*before)(void *), void (*parent)(void *),
                           void (*child)(void *), void *ud);

#ifdef __cplusplus
}
#endif

#endif
