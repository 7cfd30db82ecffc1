/*
 * sync.c -- Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition
 * and Barrier in shared memory.
 *
 * Each object is an arena (arena.c) of its own, so it can be handed to a
 * process forked before or after it was made.  The fast paths are single
 * atomic operations on shared words; waiting is on shared futexes in
 * slices (luamp_wait_step), so Ctrl-C and timeouts are honoured and a
 * waiter regularly checks that the process it waits for still lives:
 *
 *  - Lock/RLock: the lock word holds the holder's thread identity; a
 *    waiter that finds the holder dead (gone, zombie, or its tid recycled)
 *    takes the lock over.  A Lock may be released by any process, as
 *    Python's (it is a semaphore there); an RLock only by its holder.
 *  - Semaphore: plain acquire/release follow Python exactly, so signalling
 *    patterns (released here, acquired there) work.  Units taken through
 *    with()/guard() are scoped by definition, so they are recorded by
 *    holder; a waiter returns the units of a dead scoped holder.
 *  - Condition and Barrier keep their waiters in slots by identity, so a
 *    notify never goes to a dead waiter and a Barrier whose waiting party
 *    died breaks (BrokenBarrierError) instead of hanging the others.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define FIRST_SLICE_MS 50   /* first sleep before checking the holder */
#define SLICE_MS 250        /* later sleeps */
#define SPINS 200           /* pause loops before sleeping on a lock */

#define LUAMP_LOCK_TNAME "multiprocessing.Lock"
#define LUAMP_RLOCK_TNAME "multiprocessing.RLock"
#define SEMAPHORE_TNAME "multiprocessing.Semaphore"
#define BSEMAPHORE_TNAME "multiprocessing.BoundedSemaphore"
#define EVENT_TNAME "multiprocessing.Event"
#define CONDITION_TNAME "multiprocessing.Condition"
#define BARRIER_TNAME "multiprocessing.Barrier"

static void raise_interrupt(lua_State *L) {
  luamp_raise_interrupt(L);
}

/* block, timeout arguments at i, i+1 (Python's acquire(block, timeout)):
 * returns the deadline, or -2 for a non-blocking call. */
static double block_timeout_args(lua_State *L, int i) {
  int block = lua_isnoneornil(L, i) ? 1 : lua_toboolean(L, i);
  if (!lua_isnoneornil(L, i) && !lua_isboolean(L, i))
    luaL_typeerror(L, i, "boolean");
  if (!block) return -2.0;
  return luamp_deadline_arg(L, i + 1);
}

/* ==== Lock and RLock ======================================================= */

static _Atomic uint32_t *owner_word(struct luamp_lock *l) {
  char *p = (char *)&l->owner;
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  p += 4;
#endif
  return (_Atomic uint32_t *)p;
}

void luamp_lock_init(struct luamp_lock *l, int recursive) {
  atomic_store(&l->owner, 0);
  atomic_store(&l->waiters, 0);
  l->count = 0;
  l->recursive = recursive != 0;
}

static int lock_try(struct luamp_lock *l, uint64_t me) {
  uint64_t o = 0;
  return atomic_compare_exchange_strong(&l->owner, &o, me);
}

/* Takes the lock from a holder found dead; o is the value seen. */
static int lock_take_over(struct luamp_lock *l, uint64_t o, uint64_t me) {
  return o != 0 && !luamp_id_alive(o) &&
         atomic_compare_exchange_strong(&l->owner, &o, me);
}

int luamp_lock_acquire(lua_State *L, struct luamp_lock *l, int block,
                       double deadline) {
  uint64_t me = luamp_self_id(), o;
  int slice = FIRST_SLICE_MS, got = 0;
  if (lock_try(l, me)) goto acquired;
  o = atomic_load(&l->owner);
  if (o == me && l->recursive) {
    if (l->count == UINT32_MAX)
      luamp_raise(L, "ValueError", "RLock acquired too many times");
    l->count++;
    return 1;
  }
  if (!block) {
    if (lock_take_over(l, o, me)) goto acquired;
    return 0;
  }
  for (int i = 0; i < SPINS; i++) {
    luamp_cpu_relax();
    if (atomic_load_explicit(&l->owner, memory_order_relaxed) == 0 &&
        lock_try(l, me))
      goto acquired;
  }
  atomic_fetch_add(&l->waiters, 1);
  for (;;) {
    int r;
    o = atomic_load(&l->owner);
    if (o == 0) {
      if (lock_try(l, me)) { got = 1; break; }
      continue;
    }
    r = luamp_wait_step(L, owner_word(l), (uint32_t)o, deadline, slice);
    if (r == LUAMP_WAIT_SLICE) {
      slice = SLICE_MS;
      if (lock_take_over(l, o, me)) { got = 1; break; }
    } else if (r == LUAMP_WAIT_TIMEOUT) {
      got = lock_try(l, me);
      break;
    } else if (r == LUAMP_WAIT_INTERRUPTED) {
      break;
    }
  }
  atomic_fetch_sub(&l->waiters, 1);
  if (!got) {
    /* a wake-up meant for us must not be lost for the others */
    if (atomic_load(&l->owner) == 0 && atomic_load(&l->waiters) > 0)
      luamp_futex_wake(owner_word(l), 1);
    if (luamp_interrupted(L)) raise_interrupt(L);
    return 0;
  }
acquired:
  l->count = 1;
  return 1;
}

void luamp_lock_release(lua_State *L, struct luamp_lock *l) {
  uint64_t o;
  if (l->recursive) {
    if (atomic_load(&l->owner) != luamp_self_id())
      luamp_raise(L, "ValueError", "cannot release un-acquired lock");
    if (--l->count > 0) return;
    atomic_store(&l->owner, 0);
  } else {
    o = atomic_exchange(&l->owner, 0);
    if (o == 0)
      luamp_raise(L, "ValueError",
                  "semaphore or lock released too many times");
  }
  if (atomic_load(&l->waiters) > 0) luamp_futex_wake(owner_word(l), 1);
}

/* The types (registration at the end of the file), and the sets of them
 * that a function shared by several accepts as self. */
static struct luamp_type lock_type, rlock_type, sem_type, bsem_type,
    event_type, cond_type, barrier_type, guard_type;
static const struct luamp_type *const locks[] = {
  &lock_type, &rlock_type, NULL
};
static const struct luamp_type *const sems[] = {&sem_type, &bsem_type, NULL};
static const struct luamp_type *const events[] = {&event_type, NULL};
static const struct luamp_type *const conds[] = {&cond_type, NULL};
static const struct luamp_type *const barriers[] = {&barrier_type, NULL};

struct luamp_lock *luamp_lock_test(lua_State *L, int idx) {
  struct luamp_obj *o = lua_touserdata(L, idx);
  if (!luamp_is(L, idx, &lock_type) && !luamp_is(L, idx, &rlock_type))
    return NULL;
  if (o->arena == NULL) luamp_raise(L, "ValueError", "lock is closed");
  return (struct luamp_lock *)o->p;
}

static struct luamp_lock *checklock(lua_State *L, int idx) {
  struct luamp_lock *l = luamp_lock_test(L, idx);
  if (l == NULL) luaL_typeerror(L, idx, "Lock or RLock");
  return l;
}

static struct luamp_lock *selflock(lua_State *L) {
  return (struct luamp_lock *)luamp_obj_self(L, 1, locks, "Lock or RLock")->p;
}

void luamp_lock_push(lua_State *L, struct luamp_arena *a, size_t offset) {
  struct luamp_lock *l = (struct luamp_lock *)(a->base + offset);
  const char *tname = l->recursive ? LUAMP_RLOCK_TNAME : LUAMP_LOCK_TNAME;
  if (luamp_obj_push_cached(L, a, offset, tname)) return;
  luamp_obj_alloc(L, tname, 0);
  luamp_arena_ref(a);
  luamp_obj_bind(L, -1, a, offset);
}

static int new_lock(lua_State *L, int recursive) {
  struct luamp_arena *a;
  luamp_obj_alloc(L, recursive ? LUAMP_RLOCK_TNAME : LUAMP_LOCK_TNAME, 0);
  a = luamp_arena_new(L, recursive ? "luamp-rlock" : "luamp-lock",
                      LUAMP_ARENA_HDR + sizeof(struct luamp_lock),
                      LUAMP_KIND_LOCK);
  luamp_lock_init((struct luamp_lock *)(a->base + LUAMP_ARENA_HDR),
                  recursive);
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
  return 1;
}

static int l_Lock(lua_State *L) { return new_lock(L, 0); }
static int l_RLock(lua_State *L) { return new_lock(L, 1); }

static int lock_acquire(lua_State *L) {
  LUAMP_FENCE(L);
  struct luamp_lock *l = selflock(L);
  double deadline;
  if (lua_gettop(L) == 1 && lock_try(l, luamp_self_id())) {
    l->count = 1;             /* a free lock, taken: no call further down */
    lua_pushboolean(L, 1);
    return 1;
  }
  deadline = lua_gettop(L) == 1 ? -1.0 : block_timeout_args(L, 2);
  lua_pushboolean(L, luamp_lock_acquire(L, l, deadline != -2.0,
                                        deadline == -2.0 ? 0 : deadline));
  return 1;
}

static int lock_release(lua_State *L) {
  LUAMP_FENCE_RELEASE(L, lock_release);
  luamp_lock_release(L, selflock(L));
  return 0;
}

/* with()/guard(): acquire without timeout, raising on Ctrl-C */
static int lock_enter(lua_State *L) {
  LUAMP_FENCE(L);
  luamp_lock_acquire(L, selflock(L), 1, -1.0);
  return 0;
}

static int lock_locked(lua_State *L) {
  lua_pushboolean(L, atomic_load(&selflock(L)->owner) != 0);
  return 1;
}

/* RLock: is it held by the caller, and how deep */
static int lock_is_mine(lua_State *L) {
  struct luamp_lock *l = selflock(L);
  lua_pushboolean(L, atomic_load(&l->owner) == luamp_self_id());
  return 1;
}

/* close(), __close and __gc of each family */
static int lock_close(lua_State *L) {
  luamp_obj_close(L, luamp_self_of(L, 1, locks));
  return 0;
}

static int sem_close(lua_State *L) {
  luamp_obj_close(L, luamp_self_of(L, 1, sems));
  return 0;
}

static int event_close(lua_State *L) {
  luamp_obj_close(L, luamp_self_of(L, 1, events));
  return 0;
}

static int cond_close(lua_State *L) {
  luamp_obj_close(L, luamp_self_of(L, 1, conds));
  return 0;
}

static int barrier_close(lua_State *L) {
  luamp_obj_close(L, luamp_self_of(L, 1, barriers));
  return 0;
}

static int lock_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, locks);
  const char *name = luamp_is(L, 1, &rlock_type) ? "RLock" : "Lock";
  if (o->arena == NULL) {
    lua_pushfstring(L, "<%s (closed)>", name);
  } else {
    struct luamp_lock *l = (struct luamp_lock *)o->p;
    uint64_t w = atomic_load(&l->owner);
    if (w == 0)
      lua_pushfstring(L, "<%s (unlocked)>", name);
    else if (l->recursive)
      lua_pushfstring(L, "<%s (held by %d, depth %d)>", name,
                      (int)(w & 0xffffffffu), (int)l->count);
    else
      lua_pushfstring(L, "<%s (held by %d)>", name, (int)(w & 0xffffffffu));
  }
  return 1;
}

/* ==== Semaphore and BoundedSemaphore ========================================= */

#define SEM_HOLDERS 64
#define SEM_MAXVALUE 0x7fffffffu

struct ssem {
  _Atomic uint32_t value;    /* the count; the futex acquirers sleep on */
  _Atomic uint32_t waiters;  /* sleepers (approximate, see luamp_lock) */
  uint32_t maxvalue;         /* const: BoundedSemaphore's bound */
  uint32_t bounded;          /* const */
  pthread_mutex_t mu;        /* guards holders[] but a holder's own
                                decrement (sem_track) */
  struct {
    _Atomic uint64_t id;     /* [mu] who holds scoped units, 0 free */
    _Atomic uint32_t count;  /* [mu] how many; its holder decrements it
                                without mu */
    uint32_t pad;
  } holders[SEM_HOLDERS];
};

static struct ssem *checksem(lua_State *L, int idx) {
  return (struct ssem *)luamp_obj_self(L, idx, sems, "Semaphore")->p;
}

static int sem_try(struct ssem *s) {
  uint32_t v = atomic_load(&s->value);
  while (v > 0)
    if (atomic_compare_exchange_weak(&s->value, &v, v - 1)) return 1;
  return 0;
}

/* Adds n units (checking the bound); returns 0 when over the bound. */
static int sem_post(struct ssem *s, uint32_t n) {
  uint32_t v = atomic_load(&s->value);
  do {
    if ((s->bounded && v + n > s->maxvalue) || v > SEM_MAXVALUE - n)
      return 0;
  } while (!atomic_compare_exchange_weak(&s->value, &v, v + n));
  if (atomic_load(&s->waiters) > 0)
    luamp_futex_wake(&s->value, n == 1 ? 1 : (int)n);
  return 1;
}

/* The holders table is only ever a set of (id, count) pairs updated one
 * at a time; a torn update leaves at worst a slot with count 0. */
static void sem_repair(void *arg) {
  (void)arg;
}

/* Returns the units of scoped holders that died; true if any came back.
 * Gives up (false) at the deadline or on Ctrl-C: mu's holder may be
 * stopped inside it, and recovery is only a chance taken. */
static int sem_recover(lua_State *L, struct ssem *s, double deadline) {
  int back = 0;
  if (luamp_mutex_lock_until(L, &s->mu, sem_repair, s, deadline) != 0)
    return 0;
  for (int i = 0; i < SEM_HOLDERS; i++) {
    uint64_t id = s->holders[i].id;
    if (id != 0 && s->holders[i].count > 0 && !luamp_id_alive(id)) {
      uint32_t n = s->holders[i].count;
      s->holders[i].count = 0;
      s->holders[i].id = 0;
      /* a bounded semaphore never goes over its bound, even here */
      while (n > 0 && !sem_post(s, n)) n--;
      back = 1;
    } else if (id != 0 && s->holders[i].count == 0) {
      s->holders[i].id = 0;
    }
  }
  luamp_mutex_unlock(&s->mu);
  return back;
}

static int sem_acquire(lua_State *L, struct ssem *s, int block,
                       double deadline) {
  int slice = FIRST_SLICE_MS, got = 0;
  if (sem_try(s)) return 1;
  if (!block) return sem_recover(L, s, luamp_now()) && sem_try(s);
  atomic_fetch_add(&s->waiters, 1);
  for (;;) {
    int r;
    if (sem_try(s)) { got = 1; break; }
    r = luamp_wait_step(L, &s->value, 0, deadline, slice);
    if (r == LUAMP_WAIT_SLICE) {
      slice = SLICE_MS;
      sem_recover(L, s, deadline);
    } else if (r == LUAMP_WAIT_TIMEOUT) {
      got = sem_try(s);
      break;
    } else if (r == LUAMP_WAIT_INTERRUPTED) {
      break;
    }
  }
  atomic_fetch_sub(&s->waiters, 1);
  if (!got) {
    if (atomic_load(&s->value) > 0 && atomic_load(&s->waiters) > 0)
      luamp_futex_wake(&s->value, 1);
    if (luamp_interrupted(L)) raise_interrupt(L);
  }
  return got;
}

/* Forgets a scoped unit of the caller, without mu: its holder may be
 * stopped inside it, and forgetting may not be skipped (the unit would be
 * given back twice) nor wait.  Only the caller changes its own slot while
 * it lives (sem_recover takes a slot only from the dead, or with no
 * count), so an atomic decrement is enough; the id stays, harmless. */
static void sem_forget(struct ssem *s) {
  uint64_t me = luamp_self_id();
  for (int i = 0; i < SEM_HOLDERS; i++) {
    if (atomic_load(&s->holders[i].id) == me) {
      uint32_t n = atomic_load(&s->holders[i].count);
      while (n > 0 &&
             !atomic_compare_exchange_weak(&s->holders[i].count, &n, n - 1)) {}
      return;
    }
  }
}

/* Records (delta > 0) or forgets (delta < 0) a scoped unit of the caller.
 * A record may be skipped on Ctrl-C (that unit is then not recoverable). */
static void sem_track(lua_State *L, struct ssem *s, int delta) {
  uint64_t me = luamp_self_id();
  int free_slot = -1;
  if (delta < 0) {
    sem_forget(s);
    return;
  }
  if (luamp_mutex_lock_until(L, &s->mu, sem_repair, s, -1.0) != 0) return;
  for (int i = 0; i < SEM_HOLDERS; i++) {
    if (s->holders[i].id == me) {
      s->holders[i].count++;
      luamp_mutex_unlock(&s->mu);
      return;
    }
    if (s->holders[i].id == 0 && free_slot < 0) free_slot = i;
  }
  if (free_slot >= 0) {
    /* count first: a slot with an id and no count is harmless */
    s->holders[free_slot].count = 1;
    s->holders[free_slot].id = me;
  }
  /* table full: that unit is simply not recoverable */
  luamp_mutex_unlock(&s->mu);
}

static int new_sem(lua_State *L, int bounded) {
  static const char *const keys[] = {"value", NULL};
  lua_Integer v;
  luamp_opts_args(L, keys);
  v = luaL_optinteger(L, 1, 1);
  struct luamp_arena *a;
  struct ssem *s;
  int r;
  v = luaL_optinteger(L, 1, 1);
  luaL_argcheck(L, v >= 0, 1, "semaphore initial value must be >= 0");
  luaL_argcheck(L, v <= SEM_MAXVALUE, 1, "semaphore initial value too large");
  luamp_obj_alloc(L, bounded ? BSEMAPHORE_TNAME : SEMAPHORE_TNAME, 0);
  a = luamp_arena_new(L, "luamp-semaphore",
                      LUAMP_ARENA_HDR + sizeof(struct ssem),
                      LUAMP_KIND_SEMAPHORE);
  s = (struct ssem *)(a->base + LUAMP_ARENA_HDR);
  atomic_store(&s->value, (uint32_t)v);
  s->maxvalue = (uint32_t)v;
  s->bounded = bounded != 0;
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
  if ((r = luamp_mutex_init(&s->mu)) != 0)
    luamp_raise_errno(L, "OSError", r, "pthread_mutex_init");
  return 1;
}

static int l_Semaphore(lua_State *L) { return new_sem(L, 0); }
static int l_BoundedSemaphore(lua_State *L) { return new_sem(L, 1); }

static int sem_acquire_m(lua_State *L) {
  LUAMP_FENCE(L);
  struct ssem *s = checksem(L, 1);
  double deadline = block_timeout_args(L, 2);
  lua_pushboolean(L, sem_acquire(L, s, deadline != -2.0,
                                 deadline == -2.0 ? 0 : deadline));
  return 1;
}

static int sem_release_m(lua_State *L) {
  LUAMP_FENCE_RELEASE(L, sem_release_m);
  struct ssem *s = checksem(L, 1);
  if (!sem_post(s, 1))
    luamp_raise(L, "ValueError", "semaphore or lock released too many times");
  return 0;
}

static int sem_enter(lua_State *L) {
  LUAMP_FENCE(L);
  struct ssem *s = checksem(L, 1);
  sem_acquire(L, s, 1, -1.0);
  sem_track(L, s, 1);
  return 0;
}

static int sem_exit(lua_State *L) {
  LUAMP_FENCE_RELEASE(L, sem_exit);
  struct ssem *s = checksem(L, 1);
  /* forget before giving back: dying in between loses a unit rather than
   * handing out one too many */
  sem_track(L, s, -1);
  if (!sem_post(s, 1))
    luamp_raise(L, "ValueError", "semaphore or lock released too many times");
  return 0;
}

static int sem_get_value(lua_State *L) {
  lua_pushinteger(L, atomic_load(&checksem(L, 1)->value));
  return 1;
}

static int sem_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, sems);
  const char *name = luamp_is(L, 1, &bsem_type) ? "BoundedSemaphore"
                                                : "Semaphore";
  if (o->arena == NULL)
    lua_pushfstring(L, "<%s (closed)>", name);
  else
    lua_pushfstring(L, "<%s (value=%d)>", name,
                    (int)atomic_load(&((struct ssem *)o->p)->value));
  return 1;
}

/* ==== Event ===================================================================== */

struct sevent {
  _Atomic uint32_t flag;     /* 0 or 1; the futex waiters sleep on */
  _Atomic uint32_t waiters;  /* sleepers (approximate) */
};

static struct sevent *checkevent(lua_State *L, int idx) {
  return (struct sevent *)luamp_obj_self(L, idx, events, "Event")->p;
}

static int l_Event(lua_State *L) {
  struct luamp_arena *a;
  luamp_obj_alloc(L, EVENT_TNAME, 0);
  a = luamp_arena_new(L, "luamp-event",
                      LUAMP_ARENA_HDR + sizeof(struct sevent),
                      LUAMP_KIND_EVENT);
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
  return 1;
}

static int event_set(lua_State *L) {
  LUAMP_FENCE(L);
  struct sevent *e = checkevent(L, 1);
  if (atomic_exchange(&e->flag, 1) == 0 && atomic_load(&e->waiters) > 0)
    luamp_futex_wake(&e->flag, 0x7fffffff);
  return 0;
}

static int event_clear(lua_State *L) {
  atomic_store(&checkevent(L, 1)->flag, 0);
  return 0;
}

static int event_is_set(lua_State *L) {
  lua_pushboolean(L, atomic_load(&checkevent(L, 1)->flag) != 0);
  return 1;
}

static int event_wait(lua_State *L) {
  LUAMP_FENCE(L);
  struct sevent *e = checkevent(L, 1);
  double deadline = luamp_deadline_arg(L, 2);
  int r = LUAMP_WAIT_AGAIN;
  if (atomic_load(&e->flag)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  atomic_fetch_add(&e->waiters, 1);
  while (!atomic_load(&e->flag)) {
    r = luamp_wait_step(L, &e->flag, 0, deadline, SLICE_MS);
    if (r == LUAMP_WAIT_TIMEOUT || r == LUAMP_WAIT_INTERRUPTED) break;
  }
  atomic_fetch_sub(&e->waiters, 1);
  if (r == LUAMP_WAIT_INTERRUPTED) raise_interrupt(L);
  lua_pushboolean(L, atomic_load(&e->flag) != 0);
  return 1;
}

static int event_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, events);
  if (o->arena == NULL)
    lua_pushliteral(L, "<Event (closed)>");
  else
    lua_pushstring(L, atomic_load(&((struct sevent *)o->p)->flag)
                          ? "<Event (set)>" : "<Event (unset)>");
  return 1;
}

/* ==== Condition ================================================================= */

/* Waiters take a slot; notify(n) marks the n oldest live waiters
 * notified and wakes everyone sleeping on seq, each checking its own
 * slot.  The slot area is large but only the pages in use are ever
 * touched (hi bounds every scan). */
#define COND_SLOTS 2048
enum { SLOT_FREE, SLOT_WAITING, SLOT_NOTIFIED, SLOT_GONE, SLOT_GONE_HANDON };

struct scond {
  pthread_mutex_t mu;        /* guards everything below but seq and the
                                slot states read by their own waiter */
  _Atomic uint32_t seq;      /* futex: bumped by every notify */
  _Atomic uint32_t gone;     /* [atomic] slots left without mu, unsettled */
  uint32_t hi;               /* [mu] slots in use are below hi */
  uint64_t next_ticket;      /* [mu] arrival order */
  struct cslot {
    uint64_t id;             /* [mu] the waiter */
    uint64_t ticket;         /* [mu] its arrival */
    _Atomic uint32_t state;  /* [mu] to change; its waiter reads it */
    uint32_t pad;
  } slots[COND_SLOTS];
};

/* Slots are claimed and released whole under mu; a holder killed midway
 * leaves a slot whose waiter is dead, which notify() and claim skip. */
static void cond_repair(void *arg) {
  (void)arg;
}

static struct luamp_obj *checkcond_obj(lua_State *L, int idx) {
  return luamp_obj_self(L, idx, conds, NULL);
}

/* The condition's lock (user value 1) at the top of the stack. */
static struct luamp_lock *cond_lock(lua_State *L, int idx) {
  struct luamp_lock *l;
  lua_getiuservalue(L, idx, 1);
  l = luamp_lock_test(L, -1);
  if (l == NULL) luamp_raise(L, "ValueError", "Condition has no lock");
  return l;
}

static int l_Condition(lua_State *L) {
  static const char *const keys[] = {"lock", NULL};
  struct luamp_arena *a;
  struct scond *c;
  int r;
  luamp_opts_args(L, keys);
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    new_lock(L, 1);           /* Python's default: an RLock */
  } else {
    checklock(L, 1);
    lua_settop(L, 1);
  }
  luamp_obj_alloc(L, CONDITION_TNAME, 1);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  a = luamp_arena_new(L, "luamp-condition",
                      LUAMP_ARENA_HDR + sizeof(struct scond),
                      LUAMP_KIND_CONDITION);
  c = (struct scond *)(a->base + LUAMP_ARENA_HDR);
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
  if ((r = luamp_mutex_init(&c->mu)) != 0)
    luamp_raise_errno(L, "OSError", r, "pthread_mutex_init");
  return 1;
}

static int cond_acquire(lua_State *L) {
  LUAMP_FENCE(L);
  struct luamp_lock *l;
  double deadline;
  checkcond_obj(L, 1);
  deadline = block_timeout_args(L, 2);
  l = cond_lock(L, 1);
  lua_pushboolean(L, luamp_lock_acquire(L, l, deadline != -2.0,
                                        deadline == -2.0 ? 0 : deadline));
  return 1;
}

static int cond_release(lua_State *L) {
  LUAMP_FENCE_RELEASE(L, cond_release);
  checkcond_obj(L, 1);
  luamp_lock_release(L, cond_lock(L, 1));
  return 0;
}

static int cond_enter(lua_State *L) {
  LUAMP_FENCE(L);
  checkcond_obj(L, 1);
  luamp_lock_acquire(L, cond_lock(L, 1), 1, -1.0);
  return 0;
}

static void must_own(lua_State *L, struct luamp_lock *l, const char *what) {
  if (atomic_load(&l->owner) != luamp_self_id())
    luamp_raise(L, "ValueError", "cannot %s on un-acquired lock", what);
}

/* Claims a slot for the caller; -1 when all are taken by live waiters. */
static int cond_claim(struct scond *c, uint64_t me) {
  uint32_t i;
  LUAMP_ASSERT(luamp_mutex_held(&c->mu));
  for (i = 0; i < c->hi; i++)
    if (atomic_load(&c->slots[i].state) == SLOT_FREE) break;
  if (i == c->hi) {
    if (c->hi < COND_SLOTS) {
      c->hi++;
    } else {
      for (i = 0; i < c->hi; i++)
        if (!luamp_id_alive(c->slots[i].id)) break;
      if (i == c->hi) return -1;
    }
  }
  c->slots[i].id = me;
  c->slots[i].ticket = c->next_ticket++;
  atomic_store(&c->slots[i].state, SLOT_WAITING);
  return (int)i;
}

static void cond_free(struct scond *c, int i) {
  LUAMP_ASSERT(luamp_mutex_held(&c->mu));
  atomic_store(&c->slots[i].state, SLOT_FREE);
  c->slots[i].id = 0;
  while (c->hi > 0 && atomic_load(&c->slots[c->hi - 1].state) == SLOT_FREE)
    c->hi--;
}

static lua_Integer cond_mark(struct scond *c, lua_Integer n);

/* A waiter must take mu to free its slot, and mu's holder may be stopped
 * inside it.  A waiter that cannot take mu by its deadline or before
 * Ctrl-C marks its slot gone instead (cond_go): a slot still waiting
 * becomes SLOT_GONE by compare-and-swap, so a notify either reached it
 * first or never will; a notified slot left with Ctrl-C becomes
 * SLOT_GONE_HANDON.  mu's next holder frees them, handing those
 * notifications on (cond_settle, under mu). */
static void cond_settle(struct scond *c) {
  lua_Integer handon = 0;
  LUAMP_ASSERT(luamp_mutex_held(&c->mu));
  if (atomic_exchange(&c->gone, 0) == 0) return;
  for (uint32_t i = 0; i < c->hi; i++) {
    uint32_t st = atomic_load(&c->slots[i].state);
    if (st == SLOT_GONE_HANDON) handon++;
    if (st == SLOT_GONE || st == SLOT_GONE_HANDON) cond_free(c, (int)i);
  }
  if (handon > 0 && cond_mark(c, handon) > 0) {
    atomic_fetch_add(&c->seq, 1);
    luamp_futex_wake(&c->seq, 0x7fffffff);
  }
}

/* Takes mu by the deadline (< 0: none) or until Ctrl-C (if L), and
 * settles; returns 0, ETIMEDOUT or EINTR (raises on other errors). */
static int cond_lock_mu(lua_State *L, struct scond *c, double deadline) {
  int r = luamp_mutex_lock_until(L, &c->mu, cond_repair, c, deadline);
  if (r == ETIMEDOUT || r == EINTR) return r;
  if (r != 0) luamp_raise_errno(L, "OSError", r, "Condition");
  cond_settle(c);
  return 0;
}

/* Leaves slot without mu (see above); true when it had been notified. */
static int cond_go(struct scond *c, int slot, int interrupted) {
  uint32_t st = SLOT_WAITING;
  int notified = !atomic_compare_exchange_strong(&c->slots[slot].state, &st,
                                                 SLOT_GONE);
  if (notified)
    atomic_store(&c->slots[slot].state,
                 interrupted ? SLOT_GONE_HANDON : SLOT_GONE);
  atomic_fetch_add(&c->gone, 1);
  return notified;
}

/* Marks up to n oldest live waiters notified (under mu); returns how many. */
static lua_Integer cond_mark(struct scond *c, lua_Integer n) {
  lua_Integer done = 0;
  LUAMP_ASSERT(luamp_mutex_held(&c->mu));
  while (done < n) {
    int best = -1;
    for (uint32_t i = 0; i < c->hi; i++) {
      if (atomic_load(&c->slots[i].state) != SLOT_WAITING) continue;
      if (best < 0 || c->slots[i].ticket < c->slots[best].ticket)
        best = (int)i;
    }
    if (best < 0) break;
    if (!luamp_id_alive(c->slots[best].id)) {
      cond_free(c, best);   /* a dead waiter: never count it */
      continue;
    }
    atomic_store(&c->slots[best].state, SLOT_NOTIFIED);
    done++;
  }
  return done;
}

static int cond_wait(lua_State *L) {
  LUAMP_FENCE(L);
  struct scond *c = (struct scond *)checkcond_obj(L, 1)->p;
  double deadline = luamp_deadline_arg(L, 2);
  struct luamp_lock *l = cond_lock(L, 1);
  uint64_t me = luamp_self_id();
  uint32_t depth, snap;
  int slot, r, notified = 0, interrupted = 0;
  must_own(L, l, "wait");
  /* mu's holder may be stopped inside it: the timeout still holds */
  r = cond_lock_mu(L, c, deadline);
  if (r == ETIMEDOUT) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (r == EINTR) raise_interrupt(L);
  slot = cond_claim(c, me);
  luamp_mutex_unlock(&c->mu);
  if (slot < 0)
    luamp_raise(L, "OSError", "too many processes waiting on one Condition "
                "(%d)", COND_SLOTS);
  /* let go of the lock entirely, however deep an RLock is held */
  depth = l->count;
  l->count = 1;
  luamp_lock_release(L, l);
  for (;;) {
    snap = atomic_load(&c->seq);
    if (atomic_load(&c->slots[slot].state) == SLOT_NOTIFIED) {
      notified = 1;
      break;
    }
    r = luamp_wait_step(L, &c->seq, snap, deadline, SLICE_MS);
    if (r == LUAMP_WAIT_TIMEOUT) break;
    if (r == LUAMP_WAIT_INTERRUPTED) { interrupted = 1; break; }
  }
  if (cond_lock_mu(L, c, deadline) != 0) {
    interrupted = interrupted || luamp_interrupted(L);
    notified = cond_go(c, slot, interrupted);
  } else {
    if (atomic_load(&c->slots[slot].state) == SLOT_NOTIFIED) {
      notified = 1;
      if (interrupted && cond_mark(c, 1) > 0) {
        /* we leave with Ctrl-C: hand the notification on */
        atomic_fetch_add(&c->seq, 1);
        luamp_futex_wake(&c->seq, 0x7fffffff);
      }
    }
    cond_free(c, slot);
    luamp_mutex_unlock(&c->mu);
  }
  /* take the lock back (not interruptible: the caller's with()/guard()
   * releases it afterwards) */
  while (!luamp_lock_acquire(NULL, l, 1, -1.0)) {}
  l->count = depth;
  if (interrupted) raise_interrupt(L);
  lua_pushboolean(L, notified && !interrupted);
  return 1;
}

static int cond_notify_n(lua_State *L, lua_Integer n) {
  struct scond *c = (struct scond *)checkcond_obj(L, 1)->p;
  struct luamp_lock *l = cond_lock(L, 1);
  int r;
  must_own(L, l, "notify");
  if (n <= 0) return 0;
  r = cond_lock_mu(L, c, -1.0);
  if (r == EINTR) raise_interrupt(L);
  if (cond_mark(c, n) > 0) {
    atomic_fetch_add(&c->seq, 1);
    luamp_futex_wake(&c->seq, 0x7fffffff);
  }
  luamp_mutex_unlock(&c->mu);
  return 0;
}

static int cond_notify(lua_State *L) {
  return cond_notify_n(L, luaL_optinteger(L, 2, 1));
}

static int cond_notify_all(lua_State *L) {
  return cond_notify_n(L, LUA_MAXINTEGER);
}

static int cond_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, conds);
  if (o->arena == NULL) {
    lua_pushliteral(L, "<Condition (closed)>");
  } else {
    lua_getiuservalue(L, 1, 1);
    lua_pushfstring(L, "<Condition (%s)>", luaL_tolstring(L, -1, NULL));
  }
  return 1;
}

/* ==== Barrier ==================================================================== */

enum { B_FILLING, B_RELEASING, B_DRAINING, B_RESETTING, B_BROKEN };

/* A party must take mu to leave wait(), and mu's holder may be stopped
 * inside it (SIGSTOP, a debugger) for any length of time.  So a party
 * that cannot take mu by its deadline, or before Ctrl-C, leaves without
 * it (barrier_go): it marks its entry gone and, when it timed out on a
 * barrier not yet released, requests a break -- in one atomic word, rel,
 * that the release itself advances with a compare-and-swap, so the
 * release and the break are ordered: the party that left knows which
 * came first.  mu's next holder settles what such parties left behind
 * (barrier_settle) as if they had left under mu. */
#define REL_BREAK 1u         /* rel: a break requested without mu */
#define REL_GEN 2u           /* rel: one release */

struct sbarrier {
  pthread_mutex_t mu;        /* guards everything below but the atomics */
  _Atomic uint32_t seq;      /* futex: bumped on every change of state */
  _Atomic uint32_t rel;      /* [atomic] REL_BREAK | generation * REL_GEN */
  _Atomic uint32_t gone;     /* [atomic] entries marked gone, unsettled */
  uint32_t parties;          /* const */
  uint32_t has_action;       /* const */
  uint32_t count;            /* [mu] parties inside wait() */
  int32_t state;             /* [mu] B_* (Python's threading.Barrier, plus
                                B_RELEASING while the action runs) */
  uint32_t pad;
  double timeout;            /* const: default timeout, < 0 none */
  struct bparty {
    uint64_t id;             /* [mu] the party inside wait(), 0 free */
    _Atomic uint32_t gone;   /* its party alone sets it (left without
                                mu); mu's holder clears it */
    uint32_t pad;
  } inside[];                /* parties entries */
};

static void barrier_repair(void *arg) {
  struct sbarrier *b = arg;
  /* recount from the entries, the one thing a torn update can skew */
  uint32_t n = 0;
  for (uint32_t i = 0; i < b->parties; i++)
    if (b->inside[i].id) n++;
  b->count = n;
}

static struct luamp_obj *checkbarrier(lua_State *L, int idx) {
  return luamp_obj_self(L, idx, barriers, NULL);
}

static void barrier_bump(struct sbarrier *b) {
  atomic_fetch_add(&b->seq, 1);
  luamp_futex_wake(&b->seq, 0x7fffffff);
}

static int l_Barrier(lua_State *L) {
  static const char *const keys[] = {"parties", "action", "timeout", NULL};
  lua_Integer parties;
  double timeout = -1.0;
  luamp_opts_args(L, keys);
  lua_settop(L, 3);
  parties = luaL_checkinteger(L, 1);
  struct luamp_arena *a;
  struct sbarrier *b;
  int r;
  luaL_argcheck(L, parties >= 1 && parties <= (1 << 20), 1,
                "parties must be between 1 and 2^20");
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  if (!lua_isnoneornil(L, 3)) {
    timeout = luaL_checknumber(L, 3);
    luaL_argcheck(L, timeout == timeout, 3, "timeout is NaN");
    if (timeout < 0) timeout = 0;
  }
  luamp_obj_alloc(L, BARRIER_TNAME, 1);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 1);
  a = luamp_arena_new(L, "luamp-barrier",
                      LUAMP_ARENA_HDR + sizeof(struct sbarrier) +
                          (size_t)parties * sizeof(struct bparty),
                      LUAMP_KIND_BARRIER);
  b = (struct sbarrier *)(a->base + LUAMP_ARENA_HDR);
  b->parties = (uint32_t)parties;
  b->has_action = !lua_isnoneornil(L, 2);
  b->timeout = timeout;
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
  if ((r = luamp_mutex_init(&b->mu)) != 0)
    luamp_raise_errno(L, "OSError", r, "pthread_mutex_init");
  return 1;
}

/* Python's _exit: the last one out of a draining or resetting barrier
 * refills it (under mu). */
static void barrier_refill(struct sbarrier *b) {
  LUAMP_ASSERT(luamp_mutex_held(&b->mu));
  if (b->count == 0 && (b->state == B_RESETTING || b->state == B_DRAINING)) {
    b->state = B_FILLING;
    barrier_bump(b);
  }
}

static void barrier_leave(struct sbarrier *b, uint32_t entry) {
  b->inside[entry].id = 0;
  b->count--;
  barrier_refill(b);
}

/* What parties that left without mu left behind (under mu): a requested
 * break breaks a barrier not yet released; a gone entry leaves. */
static void barrier_settle(struct sbarrier *b) {
  LUAMP_ASSERT(luamp_mutex_held(&b->mu));
  if (atomic_fetch_and(&b->rel, ~REL_BREAK) & REL_BREAK) {
    if (b->state == B_FILLING || b->state == B_RELEASING)
      b->state = B_BROKEN;
    barrier_bump(b);
  }
  if (atomic_exchange(&b->gone, 0) == 0) return;
  for (uint32_t i = 0; i < b->parties; i++) {
    if (b->inside[i].id && atomic_load(&b->inside[i].gone)) {
      atomic_store(&b->inside[i].gone, 0);
      barrier_leave(b, i);
      barrier_bump(b);
    }
  }
}

/* Takes mu by the deadline (< 0: none) or until Ctrl-C, and settles;
 * returns 0, ETIMEDOUT or EINTR. */
static int barrier_lock(lua_State *L, struct sbarrier *b, double deadline) {
  int r = luamp_mutex_lock_until(L, &b->mu, barrier_repair, b, deadline);
  if (r == ETIMEDOUT || r == EINTR) return r;
  if (r != 0) luamp_raise_errno(L, "OSError", r, "Barrier");
  barrier_settle(b);
  return 0;
}

/* For the calls that have no deadline: Ctrl-C may end the wait. */
static void barrier_lock_intr(lua_State *L, struct sbarrier *b) {
  if (barrier_lock(L, b, -1.0) != 0) raise_interrupt(L);
}

/* Breaks the barrier if a party inside wait() died (under mu). */
static int barrier_reap(struct sbarrier *b) {
  int dead = 0;
  LUAMP_ASSERT(luamp_mutex_held(&b->mu));
  for (uint32_t i = 0; i < b->parties; i++) {
    if (b->inside[i].id && !atomic_load(&b->inside[i].gone) &&
        !luamp_id_alive(b->inside[i].id)) {
      b->inside[i].id = 0;
      b->count--;
      dead++;
    }
  }
  if (dead && b->state != B_RESETTING) b->state = B_BROKEN;
  if (dead && b->count == 0 &&
      (b->state == B_RESETTING || b->state == B_DRAINING))
    b->state = B_FILLING;
  if (dead) barrier_bump(b);
  return dead;
}

/* Requests a break without mu, unless generation gen was released
 * meanwhile; true when it was (the caller passed). */
static int barrier_request_break(struct sbarrier *b, uint32_t gen) {
  uint32_t v = atomic_load(&b->rel);
  while (v / REL_GEN == gen && !(v & REL_BREAK))
    if (atomic_compare_exchange_weak(&b->rel, &v, v | REL_BREAK)) break;
  barrier_bump(b);
  return v / REL_GEN != gen;
}

/* Releases the current generation (under mu); false when a break was
 * requested first. */
static int barrier_release(struct sbarrier *b) {
  uint32_t v = atomic_load(&b->rel);
  LUAMP_ASSERT(luamp_mutex_held(&b->mu));
  while (!(v & REL_BREAK))
    if (atomic_compare_exchange_weak(&b->rel, &v, v + REL_GEN)) return 1;
  return 0;
}

/* A party leaves without mu (see above): timed out (brk) or on Ctrl-C;
 * true when its generation gen had been released. */
static int barrier_go(struct sbarrier *b, uint32_t entry, uint32_t gen,
                      int brk) {
  int passed = brk ? barrier_request_break(b, gen)
                   : atomic_load(&b->rel) / REL_GEN != gen;
  atomic_store(&b->inside[entry].gone, 1);
  atomic_fetch_add(&b->gone, 1);
  barrier_bump(b);
  return passed;
}

/* Python's _enter: waits (holding mu on return) while the previous cycle
 * drains or resets, and joins; returns the caller's entry. */
static uint32_t barrier_enter(lua_State *L, struct sbarrier *b,
                              double deadline, uint32_t *index,
                              uint32_t *gen) {
  uint32_t entry, snap;
  int r = barrier_lock(L, b, deadline), w;
  while (r == 0 && (b->state == B_DRAINING || b->state == B_RESETTING ||
                    b->state == B_RELEASING)) {
    snap = atomic_load(&b->seq);
    luamp_mutex_unlock(&b->mu);
    w = luamp_wait_step(L, &b->seq, snap, deadline, SLICE_MS);
    if (w == LUAMP_WAIT_INTERRUPTED) raise_interrupt(L);
    r = barrier_lock(L, b, deadline);
    if (r != 0) break;
    if (w == LUAMP_WAIT_SLICE) barrier_reap(b);
    if (w == LUAMP_WAIT_TIMEOUT) {
      b->state = B_BROKEN;
      barrier_bump(b);
    }
  }
  if (r == EINTR) raise_interrupt(L);
  if (r == ETIMEDOUT) {
    /* mu's holder is stopped: the timeout breaks the barrier all the same */
    barrier_request_break(b, atomic_load(&b->rel) / REL_GEN);
    luamp_raise(L, "BrokenBarrierError", "the barrier is broken");
  }
  if (b->state == B_BROKEN) {
    luamp_mutex_unlock(&b->mu);
    luamp_raise(L, "BrokenBarrierError", "the barrier is broken");
  }
  *index = b->count++;
  *gen = atomic_load(&b->rel) / REL_GEN;
  for (entry = 0; entry < b->parties && b->inside[entry].id; entry++) {}
  if (entry == b->parties) entry = 0;   /* cannot happen: count < parties */
  b->inside[entry].id = luamp_self_id();
  return entry;
}

/* The last party: runs the action (without mu) and releases the others;
 * returns 0, or 3 when the action failed, 1 when the barrier broke; holds
 * mu on return unless *gone (it could not take it back). */
static int barrier_last(lua_State *L, struct sbarrier *b, uint32_t entry,
                        uint32_t gen, double deadline, int *gone) {
  int r, fail = 0;
  if (b->has_action) {
    b->state = B_RELEASING;
    luamp_mutex_unlock(&b->mu);
    lua_getiuservalue(L, 1, 1);
    fail = lua_pcall(L, 0, 0, 0) != LUA_OK ? 3 : 0;
    /* the action may have taken the caller's time: a holder that is
     * merely busy gets a grace second, one that is stopped costs it */
    if (deadline >= 0 && deadline < luamp_now() + 1.0)
      deadline = luamp_now() + 1.0;
    r = barrier_lock(L, b, deadline);
    if (r != 0) {
      *gone = 1;
      barrier_go(b, entry, gen, 1);
      return fail ? fail : r == EINTR ? 2 : 1;
    }
    if (fail) {
      b->state = B_BROKEN;
      barrier_bump(b);
      return fail;
    }
    if (b->state == B_BROKEN) return 1;   /* broken while the action ran */
  }
  if (!barrier_release(b)) {
    barrier_settle(b);   /* the requested break */
    return 1;
  }
  b->state = B_DRAINING;
  barrier_bump(b);
  return 0;
}

/* The others: wait (holding mu on return unless *gone) until released;
 * returns 0, 1 broken or 2 interrupted. */
static int barrier_await(lua_State *L, struct sbarrier *b, uint32_t entry,
                         uint32_t gen, double deadline, int *gone) {
  int slice = FIRST_SLICE_MS, r, fail = 0;
  uint32_t snap;
  while (b->state == B_FILLING || b->state == B_RELEASING) {
    snap = atomic_load(&b->seq);
    luamp_mutex_unlock(&b->mu);
    r = luamp_wait_step(L, &b->seq, snap, deadline, slice);
    if (barrier_lock(L, b, deadline) != 0) {
      /* mu's holder is stopped: leave without it */
      *gone = 1;
      if (r == LUAMP_WAIT_INTERRUPTED || luamp_interrupted(L)) {
        barrier_go(b, entry, gen, 0);
        return 2;
      }
      return barrier_go(b, entry, gen, 1) ? 0 : 1;
    }
    if (r == LUAMP_WAIT_SLICE) {
      slice = SLICE_MS;
      barrier_reap(b);
    } else if (r == LUAMP_WAIT_INTERRUPTED) {
      fail = 2;
      break;
    } else if (r == LUAMP_WAIT_TIMEOUT &&
               (b->state == B_FILLING || b->state == B_RELEASING)) {
      b->state = B_BROKEN;   /* Python: a timeout breaks the barrier */
      barrier_bump(b);
    }
  }
  if (!fail && (b->state == B_BROKEN || b->state == B_RESETTING)) fail = 1;
  return fail;
}

static int barrier_wait(lua_State *L) {
  LUAMP_FENCE(L);
  struct sbarrier *b = (struct sbarrier *)checkbarrier(L, 1)->p;
  double deadline;
  uint32_t index, entry, gen;
  int fail, gone = 0;   /* fail: 1 broken, 2 interrupted, 3 action error */
  if (lua_isnoneornil(L, 2))
    deadline = b->timeout < 0 ? -1.0 : luamp_deadline(b->timeout);
  else
    deadline = luamp_deadline_arg(L, 2);
  entry = barrier_enter(L, b, deadline, &index, &gen);
  if (index + 1 == b->parties)
    fail = barrier_last(L, b, entry, gen, deadline, &gone);
  else
    fail = barrier_await(L, b, entry, gen, deadline, &gone);
  if (!gone) {
    barrier_leave(b, entry);
    luamp_mutex_unlock(&b->mu);
  }
  if (fail == 2) raise_interrupt(L);
  if (fail == 3) return lua_error(L);   /* the action's own error */
  if (fail == 1) luamp_raise(L, "BrokenBarrierError", "the barrier is broken");
  lua_pushinteger(L, (lua_Integer)index + 1);
  return 1;
}

static int barrier_reset(lua_State *L) {
  struct sbarrier *b = (struct sbarrier *)checkbarrier(L, 1)->p;
  barrier_lock_intr(L, b);
  barrier_reap(b);
  if (b->count > 0) {
    if (b->state == B_FILLING || b->state == B_BROKEN)
      b->state = B_RESETTING;
  } else {
    b->state = B_FILLING;
  }
  barrier_bump(b);
  luamp_mutex_unlock(&b->mu);
  return 0;
}

static int barrier_abort(lua_State *L) {
  struct sbarrier *b = (struct sbarrier *)checkbarrier(L, 1)->p;
  barrier_lock_intr(L, b);
  b->state = B_BROKEN;
  barrier_bump(b);
  luamp_mutex_unlock(&b->mu);
  return 0;
}

/* Fields as Python's properties: parties, n_waiting, broken; else methods. */
static int barrier_index(lua_State *L) {
  const char *k = lua_tostring(L, 2);
  struct luamp_obj *o = luamp_self_of(L, 1, barriers);
  if (k && o->arena) {
    struct sbarrier *b = (struct sbarrier *)o->p;
    if (strcmp(k, "parties") == 0) {
      lua_pushinteger(L, b->parties);
      return 1;
    }
    if (strcmp(k, "n_waiting") == 0 || strcmp(k, "broken") == 0) {
      int state;
      uint32_t count;
      barrier_lock_intr(L, b);
      state = b->state;
      count = b->count;
      luamp_mutex_unlock(&b->mu);
      if (k[0] == 'b') lua_pushboolean(L, state == B_BROKEN);
      else lua_pushinteger(L, state == B_FILLING ? count : 0);
      return 1;
    }
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int barrier_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, barriers);
  if (o->arena == NULL)
    lua_pushliteral(L, "<Barrier (closed)>");
  else
    lua_pushfstring(L, "<Barrier (parties=%d)>",
                    (int)((struct sbarrier *)o->p)->parties);
  return 1;
}

/* ==== scoped use: with(), guard(), for every lock-like type ================= */

static void call_method(lua_State *L, int obj, const char *name) {
  lua_getfield(L, obj, name);
  lua_pushvalue(L, obj);
  lua_call(L, 1, 0);
}

/* self of with() and guard(), which every lock-like type shares: one of
 * the runtime's objects whose methods include _enter. */
static void check_scoped(lua_State *L) {
  int ok = 0;
  if (lua_type(L, 1) == LUA_TUSERDATA &&
      luaL_getmetafield(L, 1, "__name") == LUA_TSTRING) {
    ok = strncmp(lua_tostring(L, -1), "multiprocessing.", 16) == 0;
    lua_pop(L, 1);
    if (ok) {
      ok = lua_getfield(L, 1, "_enter") == LUA_TFUNCTION;
      lua_pop(L, 1);
    }
  }
  if (!ok)
    luaL_typeerror(L, 1, "Lock, RLock, Semaphore, Condition, Value or Array");
}

/* obj:with(fn, ...) -> fn's results, run holding obj; released on errors */
static int scoped_with(lua_State *L) {
  int n = lua_gettop(L), ok;
  check_scoped(L);
  luaL_checkany(L, 2);
  call_method(L, 1, "_enter");
  ok = lua_pcall(L, n - 2, LUA_MULTRET, 0);
  call_method(L, 1, "_exit");
  if (ok != LUA_OK) return lua_error(L);
  return lua_gettop(L) - 1;
}

#define GUARD_TNAME "multiprocessing.guard"

/* A guard is a table {obj} with this metatable. */
static int guard_close(lua_State *L) {
  luamp_self(L, 1, &guard_type);
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_rawgeti(L, 1, 1) != LUA_TNIL) {
    int held = lua_gettop(L);
    lua_pushnil(L);
    lua_rawseti(L, 1, 1);      /* once only */
    call_method(L, held, "_exit");
  }
  return 0;
}

/* local held <close> = obj:guard(): held until the scope ends */
static int scoped_guard(lua_State *L) {
  check_scoped(L);
  lua_settop(L, 1);
  call_method(L, 1, "_enter");
  lua_createtable(L, 1, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  luaL_setmetatable(L, GUARD_TNAME);
  return 1;
}

const luaL_Reg luamp_scoped_methods[] = {
  {"with", scoped_with}, {"guard", scoped_guard}, {NULL, NULL}
};

/* Condition:wait_for(predicate, timeout): Python's loop, the deadline
 * computed once. */
static int cond_wait_for(lua_State *L) {
  double deadline;
  checkcond_obj(L, 1);
  luaL_checkany(L, 2);
  deadline = luamp_deadline_arg(L, 3);
  lua_settop(L, 2);
  for (int first = 1;; first = 0) {
    double left = 0;
    lua_pushvalue(L, 2);
    lua_call(L, 0, 1);
    if (lua_toboolean(L, -1)) return 1;
    lua_pop(L, 1);
    if (deadline >= 0) {
      left = deadline - luamp_now();
      if (left <= 0 && !first) break;
      if (left < 0) left = 0;
    }
    lua_pushcfunction(L, cond_wait);
    lua_pushvalue(L, 1);
    if (deadline >= 0) lua_pushnumber(L, left);
    else lua_pushnil(L);
    lua_call(L, 2, 0);
    if (deadline >= 0 && left == 0) {
      lua_pushvalue(L, 2);
      lua_call(L, 0, 1);
      return 1;
    }
  }
  lua_pushboolean(L, 0);
  return 1;
}

/* ==== handles ==================================================================== */

void luamp_lockable_encode(lua_State *L, int idx) {
  luaL_Buffer b;
  int comp = 0;
  idx = lua_absindex(L, idx);
  /* the companion goes on the stack before the buffer starts */
  if (lua_getiuservalue(L, idx, 1) != LUA_TNONE &&
      luamp_lock_test(L, -1) != NULL)
    comp = lua_gettop(L);
  luaL_buffinit(L, &b);
  luamp_obj_describe(L, idx, &b);
  luaL_addchar(&b, comp ? 1 : 0);
  if (comp) luamp_obj_describe(L, comp, &b);
  luaL_pushresult(&b);
  lua_remove(L, -2);
}

int luamp_lockable_decode(lua_State *L, const char *p, size_t n,
                          const char *tname, uint32_t kinds, int nuv) {
  if (luamp_obj_decode(L, &p, &n, tname, kinds, nuv)) return 1;
  if (n >= 1 && p[0] == 1) {
    size_t off;
    struct luamp_arena *a;
    p++, n--;
    a = luamp_arena_attach(L, &p, &n,
                           LUAMP_KINDS(LUAMP_KIND_LOCK) |
                               LUAMP_KINDS(LUAMP_KIND_VALUE), &off);
    luamp_lock_push(L, a, off);
    luamp_arena_unref(a);   /* the lock object holds its own reference */
    lua_setiuservalue(L, -2, 1);
  }
  return 0;
}

static void plain_encode(lua_State *L, int idx) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luamp_obj_describe(L, idx, &b);
  luaL_pushresult(&b);
}

static void lock_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, LUAMP_LOCK_TNAME,
                   LUAMP_KINDS(LUAMP_KIND_LOCK), 0);
}

static void rlock_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, LUAMP_RLOCK_TNAME,
                   LUAMP_KINDS(LUAMP_KIND_LOCK) | LUAMP_KINDS(LUAMP_KIND_VALUE),
                   0);
}

static void sem_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, SEMAPHORE_TNAME,
                   LUAMP_KINDS(LUAMP_KIND_SEMAPHORE), 0);
}

static void bsem_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, BSEMAPHORE_TNAME,
                   LUAMP_KINDS(LUAMP_KIND_SEMAPHORE), 0);
}

static void event_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, EVENT_TNAME, LUAMP_KINDS(LUAMP_KIND_EVENT), 0);
}

static void cond_decode(lua_State *L, const char *p, size_t n) {
  luamp_lockable_decode(L, p, n, CONDITION_TNAME,
                        LUAMP_KINDS(LUAMP_KIND_CONDITION), 1);
}

/* A Barrier's action is Lua code of the process that made it: it reaches
 * processes forked after the Barrier was made, not others. */
static void barrier_decode(lua_State *L, const char *p, size_t n) {
  if (!luamp_obj_decode(L, &p, &n, BARRIER_TNAME,
                        LUAMP_KINDS(LUAMP_KIND_BARRIER), 1)) {
    struct luamp_obj *o = lua_touserdata(L, -1);
    if (((struct sbarrier *)o->p)->has_action)
      luamp_raise(L, "DecodeError", "a Barrier with an action works only in "
                  "processes forked after it was made");
  }
}

static const struct luamp_handle_ops handle_ops[] = {
  {LUAMP_LOCK_TNAME, plain_encode, lock_decode},
  {LUAMP_RLOCK_TNAME, plain_encode, rlock_decode},
  {SEMAPHORE_TNAME, plain_encode, sem_decode},
  {BSEMAPHORE_TNAME, plain_encode, bsem_decode},
  {EVENT_TNAME, plain_encode, event_decode},
  {CONDITION_TNAME, luamp_lockable_encode, cond_decode},
  {BARRIER_TNAME, plain_encode, barrier_decode},
};

/* ==== registration ============================================================== */

static const luaL_Reg lock_meth[] = {
  {"acquire", lock_acquire}, {"release", lock_release},
  {"_enter", lock_enter}, {"_exit", lock_release},
  {"locked", lock_locked}, {"_is_mine", lock_is_mine},
  {"close", lock_close}, {NULL, NULL}
};
static const luaL_Reg lock_mm[] = {
  {"__gc", lock_close}, {"__close", lock_close},
  {"__tostring", lock_tostring}, {NULL, NULL}
};
static const luaL_Reg sem_meth[] = {
  {"acquire", sem_acquire_m}, {"release", sem_release_m},
  {"_enter", sem_enter}, {"_exit", sem_exit},
  {"get_value", sem_get_value}, {"close", sem_close}, {NULL, NULL}
};
static const luaL_Reg sem_mm[] = {
  {"__gc", sem_close}, {"__close", sem_close},
  {"__tostring", sem_tostring}, {NULL, NULL}
};
static const luaL_Reg event_meth[] = {
  {"set", event_set}, {"clear", event_clear}, {"is_set", event_is_set},
  {"wait", event_wait}, {"close", event_close}, {NULL, NULL}
};
static const luaL_Reg event_mm[] = {
  {"__gc", event_close}, {"__close", event_close},
  {"__tostring", event_tostring}, {NULL, NULL}
};
static const luaL_Reg cond_meth[] = {
  {"acquire", cond_acquire}, {"release", cond_release},
  {"_enter", cond_enter}, {"_exit", cond_release},
  {"wait", cond_wait}, {"notify", cond_notify},
  {"notify_all", cond_notify_all}, {"wait_for", cond_wait_for},
  {"close", cond_close}, {NULL, NULL}
};
static const luaL_Reg cond_mm[] = {
  {"__gc", cond_close}, {"__close", cond_close},
  {"__tostring", cond_tostring}, {NULL, NULL}
};
static const luaL_Reg barrier_meth[] = {
  {"wait", barrier_wait}, {"reset", barrier_reset},
  {"abort", barrier_abort}, {"close", barrier_close}, {NULL, NULL}
};
static const luaL_Reg barrier_mm[] = {
  {"__gc", barrier_close}, {"__close", barrier_close},
  {"__tostring", barrier_tostring}, {NULL, NULL}
};
static const luaL_Reg guard_mm[] = {{"__close", guard_close}, {NULL, NULL}};

static struct luamp_type lock_type = {
  LUAMP_LOCK_TNAME, lock_meth, lock_mm, NULL, 1, 0, 0
};
static struct luamp_type rlock_type = {
  LUAMP_RLOCK_TNAME, lock_meth, lock_mm, NULL, 1, 0, 0
};
static struct luamp_type sem_type = {
  SEMAPHORE_TNAME, sem_meth, sem_mm, NULL, 1, 0, 0
};
static struct luamp_type bsem_type = {
  BSEMAPHORE_TNAME, sem_meth, sem_mm, NULL, 1, 0, 0
};
static struct luamp_type event_type = {
  EVENT_TNAME, event_meth, event_mm, NULL, 1, 0, 0
};
static struct luamp_type cond_type = {
  CONDITION_TNAME, cond_meth, cond_mm, NULL, 1, 0, 0
};
static struct luamp_type barrier_type = {
  BARRIER_TNAME, barrier_meth, barrier_mm, barrier_index, 1, 0, 0
};
static struct luamp_type guard_type = {GUARD_TNAME, NULL, guard_mm, NULL, 0, 0, 0};

int luamp_open_sync(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"Lock", l_Lock}, {"RLock", l_RLock},
    {"Semaphore", l_Semaphore}, {"BoundedSemaphore", l_BoundedSemaphore},
    {"Event", l_Event}, {"Condition", l_Condition}, {"Barrier", l_Barrier},
    {NULL, NULL}
  };
  static struct luamp_type *const types[] = {
    &lock_type, &rlock_type, &sem_type, &bsem_type, &event_type, &cond_type,
    &barrier_type
  };
  static const char *const labels[] = {
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event", "Condition",
    "Barrier"
  };
  luaL_setfuncs(L, funcs, 0);
  if (lua_getfield(L, -1, "methods") != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods");
  }
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
    luamp_newtype(L, types[i]);
    lua_setfield(L, -2, labels[i]);        /* core.methods[label] */
  }
  lua_pop(L, 1);
  luamp_newtype(L, &guard_type);
  lua_pop(L, 1);
  for (size_t i = 0; i < sizeof handle_ops / sizeof handle_ops[0]; i++)
    luamp_register_handle(L, &handle_ops[i]);
  return 0;
}
