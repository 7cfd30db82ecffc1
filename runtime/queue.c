/*
 * queue.c -- Queue, SimpleQueue and JoinableQueue: a multi-producer,
 * multi-consumer byte ring in shared memory.
 *
 * No feeder thread, no helper process.  put() encodes the value in the
 * caller (luamp_encode), copies the bytes into the ring under the queue's
 * mutex and returns when the item is committed: a process may exit right
 * after put() and nothing is lost, and "join, then get" cannot deadlock.
 * get() copies the bytes out under the mutex and decodes after unlocking.
 *
 * The ring.  One arena: a header page, then `cap` bytes of ring (4 GiB by
 * default, a power of two).  The memfd is sparse: only pages that hold
 * data exist, so an empty queue costs one page and memory follows the
 * backlog.  A big ring instead of a small ring plus spill segments keeps
 * one code path for every size: an unbounded put never waits for bytes
 * until 2 GiB are queued, a 1 GiB message is one record like any other,
 * and small messages pay nothing for big ones.  To keep small messages
 * cache-hot and out of page faults, positions restart at the ring's
 * start whenever the queue becomes empty, and a producer that finds a
 * small backlog past WRAP_AT with the ring's start free goes on there (a
 * skip record tells consumers), so a small backlog cycles through the
 * first HOT bytes, which stay resident.  When the start's free bytes (up
 * to the consumer) run out before the consumer passes that skip, the
 * producer jumps past it within the lap (a forward skip: placement), so
 * an early wrap never makes an unbounded queue full: only records taking
 * about cap / 2 bytes or more do, and maxsize items.  Pages behind the
 * consumer beyond those go back to the kernel (MADV_REMOVE) every PUNCH
 * bytes, and all of them when the queue empties.
 *
 * Records are 16-byte aligned: {u64 length, u64 tag} then the payload
 * (which may wrap around the ring's end; headers never do).  Positions
 * are 64-bit logical byte counts that never wrap; the ring offset is
 * position & (cap - 1).
 *
 * Crash safety.  Every change of the header happens under the robust
 * mutex, inside a journal: the old values are saved first, and a process
 * that finds the mutex's holder dead (EOWNERDEAD) restores them.  put()
 * publishes by advancing tail, last; so a producer killed at any instant
 * either committed its item whole or left no trace.  A consumer killed
 * inside get() leaves the item in the queue; one killed after get()
 * returned had it.  Waiting is on futex sequence words, in slices.
 *
 * Shutdown (Python 3.13's queue.Queue.shutdown): a one-way flag in the
 * header.  Once it is set every put raises ShutDown, a get takes what is
 * left and raises ShutDown on an empty queue, and every sleeper is woken
 * (the futex words are bumped, so sleepers in other processes wake too;
 * each re-checks the flag).  shutdown(true) also drops the items in one
 * journaled step, counting them done for join().
 *
 * The tag of a record is for the Pool: get with a slot records the tag of
 * the record it takes in the queue's slot table in the same journaled
 * step, so a worker's death can be mapped to exactly the tasks it took.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define QUEUE_TNAME "multiprocessing.Queue"
#define SIMPLEQUEUE_TNAME "multiprocessing.SimpleQueue"
#define JOINABLEQUEUE_TNAME "multiprocessing.JoinableQueue"

#define PAGE 4096
#define RING_OFF 4096                 /* the ring starts at this arena offset */
#define REC 16                        /* record header */
#define HOT ((uint64_t)2 << 20)       /* ring bytes never given back */
#define WRAP_AT (HOT / 2)             /* a small backlog wraps from here */
#define SKIP UINT64_MAX               /* record length: go on at next lap */
#define PUNCH ((uint64_t)4 << 20)     /* give back consumed pages this often */
#define DEFAULT_CAP ((uint64_t)4 << 30)
#define MIN_CAP ((uint64_t)64 << 10)
#define MAX_CAP ((uint64_t)1 << 40)
#define WATCH_SLOTS 16                /* processes in mp.wait on one queue */
#define MAX_SLOTS 4096                /* Pool worker slots */
#define SLICE_MS 250
#define SPIN_NS 10000                 /* polling before sleeping in get */
#define WILL_GET_NS 500000            /* how long q:_will_get's promise holds */
#define YIELD_SLOW_NS 200000          /* a yield this long went elsewhere */
#define YIELD_PAUSE_MIN_NS 1000000    /* then no yields for this long, */
#define YIELD_PAUSE_MAX_NS 128000000  /* doubled for each one up to this */
#define YIELD_GOOD 64                 /* good yields that halve the pause */
#define BUSY_EVERY 0.02               /* seconds between looks at run_delay */
#define BUSY_SHARE 0.05               /* waiting for a CPU this share: busy */
#define KEEP_SCRATCH ((size_t)8 << 20) /* get's buffer kept up to this */

/* The header, in the arena's first page.  Lock rules: mu guards every
 * field marked [mu]; a field marked [mu, atomic] is changed under mu and
 * also read without it (qsize, empty, the spin before sleeping).  The
 * futex words are bumped under mu and slept on without it.
 *
 * Cache lines (issue 18).  A put and a get each take mu and change the
 * ring's ends; a producer and a consumer on two cores hand those bytes
 * back and forth with every item, so what every step writes is packed
 * into two lines (hot: mu and the journal's flag, and the ends with their
 * saved values), what only some steps write (cold) and what is only read
 * (const and the sleeper counts) lie apart.  (Before, a step wrote into
 * four lines: 2.0M items/s one-to-one in the last quiet bench, ~500 ns an
 * item, where one process alone puts an int in ~150-250 ns and gets one
 * in ~100 ns.) */
struct qhdr {
  /* ---- hot line 1: the lock and what every step writes with it */
  _Alignas(64) pthread_mutex_t mu;
  _Atomic uint32_t get_seq;   /* futex: bumped by every get (putters wait) */
  uint32_t j_active;          /* [mu] undo record of the step in progress:
                               * 0 none, 1 hot fields, 2 also the cold */
  uint32_t j_slot;            /* [mu] slot + 1 written in this step, 0 none */
  uint64_t j_count;           /* [mu] the journal: values before the step */
  /* ---- hot line 2: the ends */
  _Alignas(64) uint64_t head; /* [mu] position of the oldest record */
  uint64_t tail;              /* [mu] position after the newest record */
  _Atomic uint64_t count;     /* [mu, atomic] items */
  uint64_t released;          /* [mu] ring pages before it were given back */
  uint64_t j_head, j_tail, j_released;   /* [mu] the journal */
  _Atomic uint64_t unfinished;/* [mu, atomic] JoinableQueue: puts not done */
  /* ---- cold: written by some steps only */
  _Alignas(64) uint64_t dirty;/* [mu] ring offset: pages past HOT and below
                               * it may hold bytes (an upper bound; 0 when
                               * none past HOT do) */
  uint64_t lap_end;           /* [mu] position of the skip record of the
                               * last early wrap (see placement) */
  uint64_t j_unfinished, j_lap_end, j_slot_tag;   /* [mu] the journal */
  uint64_t skips;             /* [mu] early wraps passed (stats) */
  uint32_t repairs;           /* [mu] times a dead holder was found (stats) */
  /* ---- read by every step, written by few */
  _Alignas(64) uint64_t cap;  /* const: ring bytes, a power of two */
  int64_t maxsize;            /* const: items; 0 = unbounded */
  uint32_t joinable;          /* const */
  uint32_t nslots;            /* const: Pool slots after the header */
  _Atomic uint32_t done_seq;  /* futex: bumped when unfinished hits 0 */
  _Atomic uint32_t getters;   /* sleepers on put_seq (approximate) */
  _Atomic uint32_t putters;   /* sleepers on get_seq (approximate) */
  _Atomic uint32_t joiners;   /* sleepers on done_seq (approximate) */
  _Atomic uint32_t put_woken; /* a get woke a putter since a putter last
                               * went to sleep: later gets need not (the
                               * woken one passes a wake-up on) */
  _Atomic uint32_t shut;      /* [mu, atomic] shutdown() was called: 0/1 */
  _Atomic uint32_t nwatch;    /* [mu, atomic] watch[] entries in use */
  /* ---- the getters' own: written by a get that finds the queue empty
   * (every get, when a consumer keeps up with its producer), read by a
   * put only while a getter sleeps.  (In the line above, every get's
   * poll made the next put's first look at cap miss.) */
  _Alignas(64) _Atomic uint64_t poll_until; /* CLOCK_MONOTONIC ns: a
                               * getter polls for items until then, 0 none
                               * (see spin_get) */
  _Atomic uint32_t last_bits; /* futex bits of the getter that went to
                               * sleep last, 0 none (see wake_getter) */
  _Atomic uint32_t get_woken; /* a getter was woken and has not run since:
                               * later wakes need not (see wake_getter) */
  /* ---- the getters' doorbell: written once by every put, read by
   * getters polling for an item (spin_get): they do not touch mu or the
   * ends, which the put is changing, before it is done with them */
  _Alignas(64) _Atomic uint32_t put_seq; /* [mu] futex: bumped by every put
                               * (getters wait) */
  _Atomic int32_t put_cpu;    /* [mu] the CPU the last put ran on (see
                               * yield_for) */
  /* ---- cold again */
  _Alignas(64) struct {       /* [mu] processes in mp.wait on this queue */
    int32_t pid;              /* 0 free */
    int32_t fd;               /* write end of its wake-up pipe */
  } watch[WATCH_SLOTS];
  uint64_t slots[];           /* [mu] Pool: tag taken by worker i, +1; 0 none */
};

struct queue {
  struct qhdr *h;
  char *ring;
};

static struct queue qget(struct luamp_obj *o) {
  struct queue q;
  q.h = (struct qhdr *)o->p;
  q.ring = o->arena->base + RING_OFF;
  return q;
}

static struct luamp_type queue_type, simple_type, joinable_type;

/* The types a function accepts as self: those it is registered on. */
static const struct luamp_type *const any_queue[] = {
  &queue_type, &joinable_type, &simple_type, NULL
};
static const struct luamp_type *const full_queue[] = {
  &queue_type, &joinable_type, NULL
};
static const struct luamp_type *const joinable_only[] = {
  &joinable_type, NULL
};
static const struct luamp_type *const simple_only[] = {&simple_type, NULL};

/* self, open; set is one of the above */
static struct luamp_obj *checkqueue(lua_State *L, int idx,
                                    const struct luamp_type *const *set) {
  return luamp_obj_self(L, idx, set, "Queue");
}

/* ---- the journal ------------------------------------------------------------ */

/* Saves what a step may change before it changes anything: the ends and
 * count always, and with cold also unfinished and lap_end (a put that
 * wraps or counts unfinished, shutdown, task_done). */
static void journal_begin(struct qhdr *h, int cold) {
  LUAMP_ASSERT(luamp_mutex_held(&h->mu));
  h->j_head = h->head;
  h->j_tail = h->tail;
  h->j_released = h->released;
  h->j_count = atomic_load_explicit(&h->count, memory_order_relaxed);
  if (cold) {
    h->j_unfinished = atomic_load(&h->unfinished);
    h->j_lap_end = h->lap_end;
  }
  h->j_slot = 0;
  atomic_thread_fence(memory_order_release);
  h->j_active = cold ? 2 : 1;
}

static void journal_end(struct qhdr *h) {
  atomic_thread_fence(memory_order_release);
  h->j_active = 0;
  /* (checked after the step ends, so that a debug build's holder is not
   * slower inside it than a release build's) */
  LUAMP_ASSERT(luamp_mutex_held(&h->mu));
}

/* EOWNERDEAD: the holder died inside a step; undo it. */
static void queue_repair(void *arg) {
  struct qhdr *h = arg;
  h->repairs++;
  if (!h->j_active) return;   /* died after its step: all done */
  h->head = h->j_head;
  h->tail = h->j_tail;
  h->released = h->j_released;
  atomic_store(&h->count, h->j_count);
  if (h->j_active == 2) {
    atomic_store(&h->unfinished, h->j_unfinished);
    h->lap_end = h->j_lap_end;
  }
  if (h->j_slot) h->slots[h->j_slot - 1] = h->j_slot_tag;
  h->j_active = 0;
}

/* Takes mu by the deadline (< 0: none), or raises kind ("Empty" for a
 * get, "Full" for a put) when it passes, or "interrupted!" on Ctrl-C.
 * mu is held for short, bounded work, but its holder may be stopped
 * (SIGSTOP) inside it for any time: a caller's timeout still holds. */
static void qlock_until(lua_State *L, struct qhdr *h, double deadline,
                        const char *kind) {
  int r = luamp_mutex_lock_until(L, &h->mu, queue_repair, h, deadline);
  if (r == 0) return;
  if (r == EINTR) luamp_raise_interrupt(L);
  if (r == ETIMEDOUT && kind)
    luamp_raise(L, kind, "queue is %s (another process is inside an "
                "operation on it and did not finish in time)",
                kind[0] == 'E' ? "empty" : "full");
  luamp_raise_errno(L, "OSError", r, "queue mutex");
}

static void qlock(lua_State *L, struct qhdr *h) {
  qlock_until(L, h, -1.0, NULL);
}

/* A non-blocking put or get waits this long for another process inside
 * an operation (Python's would not wait at all, but a put copying a big
 * item holds mu for a while, and "empty" then would be a lie). */
#define NONBLOCK_GRACE 1.0

/* ---- the ring --------------------------------------------------------------- */

static uint64_t rec_size(uint64_t len) {
  return REC + ((len + 15) & ~(uint64_t)15);
}

/* (inline: a record header's copy is then two moves, not a call) */
static LUAMP_INLINE void ring_write(struct queue *q, uint64_t pos,
                                    const char *p, uint64_t n) {
  uint64_t off = pos & (q->h->cap - 1), first = q->h->cap - off;
  if (first >= n) {
    memcpy(q->ring + off, p, n);
  } else {
    memcpy(q->ring + off, p, first);
    memcpy(q->ring, p + first, n - first);
  }
}

static LUAMP_INLINE void ring_read(struct queue *q, uint64_t pos, char *p,
                                   uint64_t n) {
  uint64_t off = pos & (q->h->cap - 1), first = q->h->cap - off;
  if (first >= n) {
    memcpy(p, q->ring + off, n);
  } else {
    memcpy(p, q->ring + off, first);
    memcpy(p + first, q->ring, n - first);
  }
}

/* Gives back whole pages of ring offsets [x, y), sparing the first HOT. */
static void punch_span(struct queue *q, uint64_t x, uint64_t y) {
  if (x < HOT) x = HOT;
  x = (x + PAGE - 1) & ~(uint64_t)(PAGE - 1);
  y &= ~(uint64_t)(PAGE - 1);
  /* direct: advisory, a failure only keeps the pages */
  if (x < y) madvise(q->ring + x, y - x, MADV_REMOVE);
}

/* Gives back the pages of consumed positions [a, b).  Positions before
 * tail - cap only: later ones share their ring offsets with the next lap,
 * which a producer may have written already.  Partial pages at either
 * end stay, unless all is consumed (the queue is empty: all_done). */
static void punch(struct queue *q, uint64_t a, uint64_t b, int all_done) {
  uint64_t cap = q->h->cap, pa, pb;
  if (q->h->tail > cap && a < q->h->tail - cap) a = q->h->tail - cap;
  if (all_done) b = (b + PAGE - 1) & ~(uint64_t)(PAGE - 1);
  if (b <= a) return;
  if (b - a > cap) a = b - cap;
  pa = a & (cap - 1);
  pb = pa + (b - a);
  if (pb <= cap) {
    punch_span(q, pa, pb);
  } else {
    punch_span(q, pa, cap);
    punch_span(q, 0, pb - cap);
  }
}

/* After a get has committed (under mu, a journaled step of its own, so
 * that an undone get never finds its pages given back): restart at the
 * ring's start when empty, give back consumed pages now and then. */
static void after_get(struct queue *q) {
  struct qhdr *h = q->h;
  if (h->head != h->tail && h->head - h->released < PUNCH) return;
  journal_begin(h, 0);
  if (h->head == h->tail) {
    uint64_t restart = (h->head + h->cap - 1) & ~(h->cap - 1);
    punch(q, h->released, h->head, 1);
    /* empty: nothing past HOT is needed, whatever the laps and skips
     * left (a partial page at a skip record, say) */
    if (h->dirty > HOT) {
      punch_span(q, HOT, h->dirty);
      h->dirty = 0;
    }
    h->head = h->tail = h->released = restart;
  } else {
    uint64_t upto = h->head & ~(uint64_t)(PAGE - 1);
    punch(q, h->released, upto, 0);
    h->released = upto;
  }
  journal_end(h);
}

/* Whether after_get of an empty queue would give back no page: all the
 * consumed bytes lie in the first HOT of one lap, and none past HOT were
 * written (dirty 0).  Then a get may restart at the ring's start in its
 * own journaled step (an undone get finds nothing given back): one step
 * instead of two for a consumer that keeps up with its producer. */
static int quiet_restart(const struct qhdr *h) {
  uint64_t mask = h->cap - 1;
  return h->dirty == 0 && h->released <= h->head &&
         (h->released & ~mask) == (h->head & ~mask) &&
         (h->head & mask) <= HOT;
}

/* Ends a get's journaled step: an empty queue with no page to give back
 * restarts in it, else after_get follows in a step of its own. */
static void end_get_step(struct queue *q) {
  struct qhdr *h = q->h;
  if (h->head == h->tail && quiet_restart(h)) {
    h->head = h->tail = h->released = (h->head + h->cap - 1) & ~(h->cap - 1);
    journal_end(h);
  } else {
    journal_end(h);
    if (h->head == h->tail || h->head - h->released >= PUNCH)   /* (its test) */
      after_get(q);
  }
}

/* The consumer reached a skip record at head (under mu): the data goes on
 * at the next lap's start (to == 0), or at ring offset to of this lap (a
 * forward skip, see placement).  One journaled step. */
static void pass_skip(struct queue *q, uint64_t to) {
  struct qhdr *h = q->h;
  uint64_t at = h->head & (h->cap - 1);
  LUAMP_ASSERT(to == 0 || (to > at && to <= h->cap));
  journal_begin(h, 0);
  punch(q, h->released, h->head, 0);
  if (to == 0) {
    h->head = h->released = (h->head + h->cap) & ~(h->cap - 1);
  } else {
    /* the bytes jumped over held the last lap's records, all consumed
     * now; the next lap writes before `at` or past `to` only */
    punch_span(q, at + REC, to);
    h->head = h->released = (h->head & ~(h->cap - 1)) + to;
  }
  journal_end(h);
  h->skips++;
}

/* Whether a put of need bytes should wrap early (under mu): the data lies
 * in one piece past WRAP_AT, and the ring's start is free for it.  Keeps
 * a small backlog in pages that are already there (no page faults) and
 * out of the pages that are given back.
 *
 * Only a small backlog: once wrapped, the producer has only the start's
 * free bytes (up to the consumer) until the consumer passes the skip, and
 * waits there as on a full ring.  A backlog that is not small next to
 * that room (a consumer slower than its producer) stays linear in the big
 * ring instead; near the ring's end (less than HOT left) it wraps soon
 * anyway, and early costs at most HOT of room.  (Before: with a backlog
 * of ~1 MiB in the 4 GiB default ring an unbounded queue was "full": a
 * put_nowait raised Full, a put in a single process hung, and a producer
 * faster than its consumer waited on every item -- 45-60k futex waits
 * and 0.17-0.29M items/s for 2e5 ints to a consumer that alone does
 * 1.24M/s; after: 16 waits, 1.0-1.6M items/s.) */
static int early_wrap(struct qhdr *h, uint64_t need) {
  uint64_t mask = h->cap - 1, ot = h->tail & mask, oh = h->head & mask;
  LUAMP_ASSERT(luamp_mutex_held(&h->mu));
  return h->tail != h->head && ot >= WRAP_AT && ot >= oh && need + REC <= oh &&
         (h->tail & ~mask) == (h->head & ~mask) &&
         (ot - oh <= oh / 4 || h->cap - ot < HOT);
}

enum { PUT_NONE = -1, PUT_HERE, PUT_WRAP, PUT_FORWARD };

/* Where a put of need bytes goes (under mu): at tail, after a skip to the
 * next lap (early_wrap), after a forward skip, or nowhere yet (wait).  The
 * ring is in one of three states:
 *  - linear: tail - head <= cap, the records lie from head to tail (the
 *    last payload may wrap around the ring's end);
 *  - wrapped early: head's lap ends at the skip record at lap_end, and
 *    tail is at the next lap's start, before head: records go on there,
 *    keeping REC bytes free before head for a forward skip;
 *  - forwarded: when a record does not fit there, a skip record (its tag
 *    the ring offset to go on at) jumps past lap_end's offset in the same
 *    lap, where nothing is live; records go on up to that lap's end.
 *    Then tail - head > cap.  Only to the ring's first half: the bytes
 *    jumped over count against the room until the consumer passes the
 *    jump, so a jump further on could leave less room than waiting.
 * So an unbounded queue is full only when its records and the new one
 * take about half of cap or more (not at 2 MB in the 4 GiB ring).
 * (Before the forward skip an early wrap left the producer only the
 * bytes before head: an unbounded queue of 1.1 MB, 1 MB of it taken,
 * was "full" after 1 MB more, until the consumer passed the wrap.) */
static int placement(struct qhdr *h, uint64_t need) {
  uint64_t mask = h->cap - 1, lap = ~mask;
  if (h->tail - h->head > h->cap)                           /* forwarded */
    return h->tail + need <= (h->head & lap) + 2 * h->cap ? PUT_HERE
                                                            : PUT_NONE;
  if (h->lap_end >= h->head && (h->lap_end & lap) == (h->head & lap) &&
      (h->tail & lap) != (h->head & lap)) {             /* wrapped early */
    if (h->tail + need + REC - h->head <= h->cap) return PUT_HERE;
    return (h->lap_end & mask) + REC <= h->cap / 2 &&
           (h->lap_end & mask) + REC + need <= h->cap ? PUT_FORWARD : PUT_NONE;
  }
  if (early_wrap(h, need)) return PUT_WRAP;
  return h->tail + need - h->head <= h->cap ? PUT_HERE : PUT_NONE;
}

/* ---- watchers (mp.wait) ---------------------------------------------------------- */

/* This process's wake-up pipe: made on first use, remade after a fork
 * (a child must not share its parent's). */
static int wake_pid, wake_rfd = -1, wake_wfd = -1;

int luamp_wakeup_fd(lua_State *L) {
  if (wake_pid != luamp_pid()) {
    int p[2];
    if (wake_pid != 0) {       /* the parent's, inherited: not ours */
      luamp_sys.close(wake_rfd);
      luamp_sys.close(wake_wfd);
    }
    wake_pid = 0;
    if (luamp_sys.pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0)
      luamp_raise_errno(L, "OSError", errno, "pipe2");
    wake_rfd = p[0];
    wake_wfd = p[1];
    wake_pid = luamp_pid();
  }
  return wake_rfd;
}

void luamp_wakeup_drain(void) {
  char buf[64];
  if (wake_pid == luamp_pid())
    while (luamp_sys.read(wake_rfd, buf, sizeof buf) > 0) {}
}

static int qfd_owns(int wfd);   /* a fileno() pipe of ours (below) */

/* Pokes every process watching the queue, once: the registrations are
 * used up (a watcher that still waits registers again before sleeping),
 * so one that went away costs at most one poke.  After a put, mu not
 * held. */
static void poke_watchers(lua_State *L, struct queue *q) {
  int32_t pids[WATCH_SLOTS], fds[WATCH_SLOTS];
  int n = 0;
  pid_t me = luamp_pid();
  qlock(L, q->h);
  for (int i = 0; i < WATCH_SLOTS; i++) {
    if (q->h->watch[i].pid) {
      pids[n] = q->h->watch[i].pid;
      fds[n++] = q->h->watch[i].fd;
      q->h->watch[i].pid = 0;
    }
  }
  atomic_store(&q->h->nwatch, 0);
  luamp_mutex_unlock(&q->h->mu);
  for (int i = 0; i < n; i++) {
    char path[64];
    int fd;
    if (pids[i] == me) {   /* mp.wait's pipe or a handle's fileno() pipe */
      if ((wake_pid == me && fds[i] == wake_wfd) || qfd_owns(fds[i]))
        (void)!luamp_sys.write(fds[i], "", 1);
      continue;
    }
    /* the watcher's own pipe, reached through /proc: gone with it */
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)pids[i], (int)fds[i]);
    fd = luamp_sys.open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC, 0);
    if (fd < 0) continue;
    (void)!luamp_sys.write(fd, "", 1);   /* a full pipe is poked already */
    luamp_sys.close(fd);
  }
}

int luamp_queue_test(lua_State *L, int idx) {
  return luamp_is(L, idx, &queue_type) || luamp_is(L, idx, &joinable_type) ||
         luamp_is(L, idx, &simple_type);
}

int luamp_queue_ready(lua_State *L, int idx) {
  struct luamp_obj *o = checkqueue(L, idx, any_queue);
  struct qhdr *h = (struct qhdr *)o->p;
  return atomic_load(&h->count) > 0 || atomic_load(&h->shut);
}

void luamp_queue_watch(lua_State *L, int idx, int on) {
  struct luamp_obj *o = checkqueue(L, idx, any_queue);
  struct queue q = qget(o);
  pid_t me = luamp_pid();
  int wfd;
  luamp_wakeup_fd(L);
  wfd = wake_wfd;
  qlock(L, q.h);
  for (int i = 0; i < WATCH_SLOTS; i++) {
    if (q.h->watch[i].pid == me && q.h->watch[i].fd == wfd) {
      if (!on) {
        q.h->watch[i].pid = 0;
        atomic_fetch_sub(&q.h->nwatch, 1);
      }
      on = 0;   /* registered already */
    }
  }
  if (on) {
    int i;
    for (i = 0; i < WATCH_SLOTS && q.h->watch[i].pid; i++) {}
    if (i == WATCH_SLOTS) {
      luamp_mutex_unlock(&q.h->mu);
      luamp_raise(L, "OSError", "too many processes waiting on one queue "
                  "with mp.wait (%d)", WATCH_SLOTS);
    }
    q.h->watch[i].pid = me;
    q.h->watch[i].fd = wfd;
    atomic_fetch_add(&q.h->nwatch, 1);
  }
  luamp_mutex_unlock(&q.h->mu);
}

/* ---- put and get -------------------------------------------------------------------- */

/* Whether a get should poll before it sleeps (issue 18).  A poll pays
 * off only while the putter is on a CPU.  On a quiet machine a pool
 * worker's poll catches the owner's next task (a round trip pays one
 * sleep, not two: 0.4-1.2 context switches per round trip instead of
 * 2).  With one core burned by another program the putter waits for a
 * CPU, and the poller is in its way: the futures round trip with a burner
 * pinned to one core ran 20-21.5k/s polling and 31-34k/s not (3 of 4
 * A/B pairs; the 4th 4.2k/s against 12.7k/s), and bench_probes' futex
 * ping-pong lost 4-6x by polling in 2 of 3 runs.  A poll's misses do
 * not tell the two states apart (a missed poll makes the next one
 * likelier to miss: the putter then sleeps and is slow to wake), so the
 * test is the kernel's: the share of the last BUSY_EVERY seconds this
 * thread spent runnable but waiting for a CPU (run_delay of
 * /proc/thread-self/schedstat).  Over BUSY_SHARE, gets sleep at once
 * until the next look (and a putter waiting for room too).  Per process
 * (a fork looks afresh; the runtime starts no threads, and an
 * embedder's threads share one advisory verdict); where the file cannot
 * be read, gets poll as before.  (Not _Thread_local: in a module
 * dlopen'd by stock lua5.4 that is dynamic TLS, and LeakSanitizer's
 * tracer crashed reading its block at exit -- "Tracer caught signal
 * 11", a reference_spec example under make sanitize, 8 runs of 8.) */
static int cpus_free(void) {
  static pid_t pid;
  static double at;     /* when run_delay was read */
  static double delay;  /* what it was, seconds */
  static int verdict = 1;
  double t = luamp_now(), d;
  char buf[96];
  ssize_t n;
  int fd;
  if (pid == luamp_pid() && t - at < BUSY_EVERY) return verdict;
  fd = luamp_sys.open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return verdict;
  n = luamp_sys.read(fd, buf, sizeof buf - 1);
  luamp_sys.close(fd);
  if (n <= 0) return verdict;
  buf[n] = 0;
  {
    unsigned long long run, wait;
    if (sscanf(buf, "%llu %llu", &run, &wait) != 2) return verdict;
    d = (double)wait * 1e-9;
  }
  if (pid == luamp_pid() && t > at)
    verdict = (d - delay) / (t - at) <= BUSY_SHARE;
  else
    verdict = 1;                      /* a new process: no sample yet */
  pid = luamp_pid();
  at = t;
  delay = d;
  return verdict;
}

/* Polls the futex word *w for a short while (SPIN_NS) until it moves from
 * snap (a put or a get happened), before the caller sleeps: a cheap way
 * to skip two system calls when the other side is running. */
static int spin_until_moved(_Atomic uint32_t *w, uint32_t snap) {
  double until = 0;
  for (int i = 1;; i++) {
    if (atomic_load_explicit(w, memory_order_relaxed) != snap) return 1;
    luamp_cpu_relax();
    if ((i & 63) == 0) {
      double now = luamp_now();
      if (until == 0) until = now + SPIN_NS * 1e-9;
      else if (now >= until) return 0;
    }
  }
}

/* Waits (mu not held) for *seq to move from snap; returns the wait result. */
static int sleep_on(lua_State *L, _Atomic uint32_t *seq, uint32_t snap,
                    _Atomic uint32_t *sleepers, double deadline) {
  int r;
  atomic_fetch_add(sleepers, 1);
  r = luamp_wait_step(L, seq, snap, deadline, SLICE_MS);
  atomic_fetch_sub(sleepers, 1);
  return r;
}

/* ---- getters' hand-off --------------------------------------------------
 * Which getter a put wakes, and when (issue 15: the futures round trip with
 * one core burned ran at half the C futex ping-pong's rate).  A futex wakes
 * its sleepers first come, first served: the getter asleep longest.  With
 * two pool workers idle between round trips the tasks went to each in
 * turn (98-246 changes of worker in 300 round trips), each time to one
 * whose caches had gone cold, and a put woke a sleeper while the other
 * worker polled and took the task: the sleeper woke for nothing.  Now:
 * - getters sleep with a futex bit of their own (their pool slot's, else
 *   their pid's, modulo 32) and record it in last_bits; a put wakes that
 *   getter, the one that went to sleep last, and another only when it
 *   does not sleep now;
 * - a getter that polls (spin_get), or has promised to get at once
 *   (q:_will_get: a pool worker about to put its reply, which its owner's
 *   next task may overtake), says so in poll_until: a put then wakes no
 *   one, the poller takes the item;
 * - one wake-up at a time (get_woken): a getter woken and not yet running
 *   passes a wake-up on if items remain, so later puts and gets need not
 *   (before, a worker taking items behind a woken one called FUTEX_WAKE
 *   for nothing on almost every get: 12k calls in 2e4 apply_async tasks;
 *   apply_async x1e5 on 2 workers with one core burned: 47k FUTEX_WAKEs
 *   in the workers against 5.7k FUTEX_WAITs, ~1.4 us of CPU each);
 * None can lose a wake-up for good: a put wakes someone unless a live
 * getter is due to look at count again (each clears poll_until, then
 * looks, before it sleeps), and a poller or promiser killed before it
 * looks, or a woken getter killed before it runs, leaves the item to the
 * sleepers' next wait slice (SLICE_MS) -- as for putters (put_woken). */
static uint32_t getter_bits(int slot) {
  unsigned id = slot >= 0 ? (unsigned)slot : (unsigned)luamp_pid();
  return 1u << (id & 31);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Whether a getter polls now and will see the next put without a wake. */
static int getter_polls(struct qhdr *h) {
  uint64_t until = atomic_load(&h->poll_until);
  return until != 0 && now_ns() < until;
}

/* Wakes one sleeping getter: the one that went to sleep last if it
 * sleeps still, else whichever the kernel picks. */
static void wake_getter(struct qhdr *h) {
  uint32_t bits;
  if (atomic_exchange(&h->get_woken, 1)) return;
  bits = atomic_load(&h->last_bits);
  if (bits && luamp_futex_wake_bits(&h->put_seq, 1, bits) > 0) return;
  luamp_futex_wake(&h->put_seq, 1);
}

/* A get's poll before it sleeps, announced in poll_until.  The caller
 * looks at count again after this returns 0 (a put that saw the poll
 * before it ended made count non-zero before this cleared poll_until).
 *
 * It polls the doorbell put_seq, which a put writes last, not count: a
 * poll of count (in the ends' line) took that line from the putter in
 * the middle of its step, and the get that followed at once tried mu
 * while the putter held it, so that the putter's unlock waited for the
 * lock's line to come back.  (Prefetching mu's and the ends' lines for
 * writing when the doorbell moves, or before taking mu, or just after,
 * measured no better: A/B medians 2.12-2.27M items/s one-to-one against
 * 2.26-2.38M/s without.) */
static int spin_get(struct qhdr *h) {
  uint64_t until = now_ns() + 2 * (uint64_t)SPIN_NS;
  uint32_t snap;
  int r;
  atomic_store(&h->poll_until, until);
  snap = atomic_load(&h->put_seq);
  r = atomic_load_explicit(&h->count, memory_order_relaxed) != 0 ||
      spin_until_moved(&h->put_seq, snap);
  atomic_compare_exchange_strong(&h->poll_until, &until, 0);
  return r;
}

/* A pool worker's look for its next task on a busy machine, right after
 * its reply (its promise, q_will_get, stands): the owner that reply woke
 * most likely waits for a CPU -- ours (issue 15: with one core burned the
 * owner and its worker shared the other).  Sleeping, the worker made the
 * owner's next put wake it: a futex call each side of a round trip.
 * Yielding the CPU lets the owner run now; its next task, put under our
 * promise, wakes no one, and the worker finds it when the yield returns:
 * one system call fewer a round trip (owner and worker pinned to one CPU,
 * 5 A/B pairs: 42k -> 48k round trips/s; CPU a round trip, schedstat:
 * owner 13.7 -> 12.1 us, worker 10.0 -> 8.7 us).  A yield may go to
 * another program on our core instead (EEVDF puts the yielder last) and
 * cost its slice, or find no task (the owner runs on another core): one
 * that took over YIELD_SLOW_NS or found none stops yields for a pause
 * that doubles with each such yield (YIELD_PAUSE_MIN_NS up to ..._MAX_NS)
 * and halves after each YIELD_GOOD good ones in a row.  (1 of
 * ~700 yields was either with one core burned; a pause of 50 ms after each
 * kept yields off for half the round trips.)  The owner's wait for a
 * reply yields the same way (await_item): the worker, back from its own
 * yield, takes the task, and its reply wakes no one -- the owner does not
 * sleep -- nor does the owner's next task: a round trip on one CPU is two
 * yields, no futex call (pinned to one CPU, 4 A/B pairs against the
 * worker's yield alone: 32.8-39.0k -> 42.8-48.6k round trips/s, owner
 * 15.2-17.6 -> 11.3-12.7 us of CPU a round trip).  Each side has its own
 * pause (struct yguard).  Returns whether an item is there. */
static int promised;        /* this process made a promise (q_will_get) */
static lua_Integer yields;  /* yields that found the item (q:_stats) */

struct yguard {             /* when yields pay (see yield_get) */
  uint64_t off;             /* no yields before this time (now_ns) */
  uint64_t pause;           /* the next pause (0: YIELD_PAUSE_MIN_NS) */
  unsigned good;            /* good yields since the last bad one */
};
static struct yguard worker_yields, owner_yields;

static int yield_for(struct yguard *g, struct qhdr *h) {
  uint64_t t0 = now_ns(), t1;
  if (t0 < g->off) return 0;
  /* only for a putter that ran on our CPU last: one on the other CPU
   * does not need ours, and yielding would give it to whatever else runs
   * here (with a burner on the owner's CPU and its worker alone on the
   * other, the owner's yields cost 25 -> 32 us a round trip) */
  if (atomic_load_explicit(&h->put_cpu, memory_order_relaxed) != sched_getcpu())
    return 0;
  sched_yield();
  t1 = now_ns();
  if (atomic_load(&h->count) > 0 && t1 - t0 < YIELD_SLOW_NS) {
    if (++g->good == YIELD_GOOD) {  /* halved, not reset: an oscillation
                                     * between good and bad costs little */
      g->good = 0;
      g->pause = g->pause > YIELD_PAUSE_MIN_NS ? g->pause / 2 : 0;
    }
    yields++;
    return 1;
  }
  if (g->pause == 0) g->pause = YIELD_PAUSE_MIN_NS;
  g->good = 0;
  g->off = t1 + g->pause;
  if (g->pause < YIELD_PAUSE_MAX_NS) g->pause *= 2;
  return atomic_load(&h->count) > 0;
}

static int yield_get(struct qhdr *h) { return yield_for(&worker_yields, h); }

/* A getter's sleep on put_seq with its bits, recorded as the last unless
 * it sleeps on after a wait slice passed (*sliced; a getter idle that long
 * is not the one to wake first). */
static int sleep_get(lua_State *L, struct qhdr *h, uint32_t snap,
                     uint32_t bits, int *sliced, double deadline) {
  int r;
  atomic_fetch_add(&h->getters, 1);
  if (!*sliced) atomic_store(&h->last_bits, bits);
  atomic_store(&h->get_woken, 0);
  r = luamp_wait_step_bits(L, &h->put_seq, snap, deadline, SLICE_MS, bits);
  atomic_store(&h->get_woken, 0);
  atomic_fetch_sub(&h->getters, 1);
  *sliced = r == LUAMP_WAIT_SLICE;
  if (!*sliced) atomic_compare_exchange_strong(&h->last_bits, &bits, 0);
  return r;
}

/* A putter's sleep: sleep_on's, re-arming put_woken so that the next get
 * wakes it.  (Before, every get woke the putters while one slept --
 * ~13 wakes per sleep, futex calls at ~10 per 1000 items, while a
 * producer faster than its consumer waited at the ring's start: a
 * woken putter stays counted until it runs, which under load takes
 * milliseconds.)  A woken putter killed before passing the wake-up on
 * leaves put_woken set: the others notice within a wait slice (SLICE_MS)
 * and sleep again, re-arming it -- as for getters, never a hang. */
static int sleep_put(lua_State *L, struct qhdr *h, uint32_t snap,
                     double deadline) {
  int r;
  atomic_fetch_add(&h->putters, 1);
  atomic_store(&h->put_woken, 0);
  r = luamp_wait_step(L, &h->get_seq, snap, deadline, SLICE_MS);
  atomic_fetch_sub(&h->putters, 1);
  return r;
}

static void raise_shut(lua_State *L, const char *what) {
  luamp_raise(L, "ShutDown", "%s on a queue that was shut down", what);
}

static int queue_put_bytes(lua_State *L, struct luamp_obj *o,
                           const char *data, size_t len, uint64_t tag,
                           int block, double deadline);

/* Puts the value at vidx (count < 0) or the count values from vidx on,
 * as one array. */
static int queue_put(lua_State *L, struct luamp_obj *o, int vidx, int count,
                     uint64_t tag, int block, double deadline) {
  unsigned char small[LUAMP_SMALL_MAX];
  size_t len = count < 0 ? luamp_encode_small(L, vidx, small) : 0;
  const char *data = len ? (const char *)small
                   : count < 0 ? luamp_encode(L, vidx, 0, &len, NULL)
                   : luamp_encode_values(L, vidx, count, 0, &len, NULL);
  return queue_put_bytes(L, o, data, len, tag, block, deadline);
}

/* Writes the record of data[0..len) at tail (under mu; tail not moved). */
static LUAMP_INLINE void write_record(struct queue *q, const char *data,
                                      uint64_t len, uint64_t tag) {
  struct qhdr *h = q->h;
  uint64_t end = (h->tail & (h->cap - 1)) + rec_size(len);
  if (len <= LUAMP_SMALL_MAX) {   /* header and payload in one copy */
    uint64_t r[2 + LUAMP_SMALL_MAX / 8];
    r[0] = len;
    r[1] = tag;
    memcpy(r + 2, data, len);
    ring_write(q, h->tail, (const char *)r, REC + len);
  } else {
    uint64_t rec[2];
    rec[0] = len;
    rec[1] = tag;
    ring_write(q, h->tail, (const char *)rec, REC);
    ring_write(q, h->tail + REC, data, len);
  }
  if (end > h->cap) end = h->cap;
  /* (only past HOT: the cold line stays unwritten for small backlogs) */
  if (end > HOT && end > h->dirty)
    h->dirty = (end + PAGE - 1) & ~(uint64_t)(PAGE - 1);
}

/* Puts the message data[0..len) (the encoder's buffer). */
static int queue_put_bytes(lua_State *L, struct luamp_obj *o,
                           const char *data, size_t len, uint64_t tag,
                           int block, double deadline) {
  struct queue q = qget(o);
  struct qhdr *h = q.h;
  uint64_t need = rec_size(len), rec[2], n;
  uint32_t gs, ps;
  int at = PUT_HERE;
  if (need > h->cap)
    luamp_raise(L, "ValueError", "item of %I bytes is larger than the "
                "queue's capacity (%I bytes)", (lua_Integer)len,
                (lua_Integer)(h->cap - REC));
  if (!block) deadline = luamp_deadline(NONBLOCK_GRACE);
  qlock_until(L, h, deadline, "Full");
  for (;;) {
    uint32_t snap;
    int r;
    if (atomic_load(&h->shut)) {
      luamp_mutex_unlock(&h->mu);
      raise_shut(L, "put");
    }
    if (!((h->maxsize > 0 && atomic_load(&h->count) >= (uint64_t)h->maxsize) ||
          (at = placement(h, need)) == PUT_NONE))
      break;
    snap = atomic_load(&h->get_seq);
    luamp_mutex_unlock(&h->mu);
    if (!block) luamp_raise(L, "Full", "queue is full");
    /* a consumer on another core makes room a moment later: waiting for it
     * awake costs no futex calls on either side (a sleeping putter is
     * woken by every get -- one wait and one wake per item while a
     * producer faster than its consumer has filled the ring's start) */
    if (!(cpus_free() && spin_until_moved(&h->get_seq, snap))) {
      r = sleep_put(L, h, snap, deadline);
      if (r == LUAMP_WAIT_INTERRUPTED) luamp_raise_interrupt(L);
      if (r == LUAMP_WAIT_TIMEOUT && !atomic_load(&h->shut))
        luamp_raise(L, "Full", "queue is full");
    }
    qlock_until(L, h, deadline, "Full");
  }
  /* A record at tail is invisible until tail moves: written before the
   * journaled step, which then changes the header in a few stores (a
   * consumer polling count takes the line from us once, not between
   * stores a copy apart). */
  if (at == PUT_HERE) {
    write_record(&q, data, len, tag);
    journal_begin(h, h->joinable);
  } else {
    uint64_t lap = h->tail & ~(h->cap - 1);
    journal_begin(h, 1);
    rec[0] = SKIP;
    rec[1] = at == PUT_WRAP ? 0 : (h->lap_end & (h->cap - 1)) + REC;
    ring_write(&q, h->tail, (const char *)rec, REC);
    if (at == PUT_WRAP) h->lap_end = h->tail;
    h->tail = at == PUT_WRAP ? lap + h->cap : lap + rec[1];
    write_record(&q, data, len, tag);
  }
  /* count and unfinished change under mu only: a store, not a locked
   * read-modify-write (put_seq's below is the fence the sleepers need) */
  atomic_store_explicit(&h->count, atomic_load_explicit(&h->count,
                        memory_order_relaxed) + 1, memory_order_release);
  if (h->joinable)
    atomic_store_explicit(&h->unfinished, atomic_load_explicit(
        &h->unfinished, memory_order_relaxed) + 1, memory_order_release);
  h->tail += need;                    /* the item exists from here on */
  journal_end(h);
  n = atomic_load_explicit(&h->count, memory_order_relaxed);
  /* the doorbell, last: a store, not a locked read-modify-write (every
   * put_seq bump holds mu), which would wait for the line that polling
   * getters read; the sleepers need a full fence between it (and count)
   * and the looks at getters and poll_until: after the unlock (on x86
   * the unlock's own locked exchange already is one; elsewhere a glibc
   * unlock only releases) */
  atomic_store_explicit(&h->put_cpu, sched_getcpu(), memory_order_relaxed);
  atomic_store_explicit(&h->put_seq, atomic_load_explicit(
      &h->put_seq, memory_order_relaxed) + 1, memory_order_release);
  /* a putter behind us may fit too (wake-ups are one at a time) */
  ps = atomic_load(&h->putters) > 0 &&
       (h->maxsize <= 0 || n < (uint64_t)h->maxsize);
  luamp_mutex_unlock(&h->mu);
  atomic_thread_fence(memory_order_seq_cst);
  /* Only the put that makes the queue non-empty wakes a getter: that getter
   * wakes the next one if items remain (see queue_get), so a producer
   * filling the queue for sleeping consumers makes one system call, not
   * one per item.  (A woken getter that dies before passing the wake-up on
   * costs the others one wait slice, never a hang.) */
  gs = n == 1 && atomic_load(&h->getters) > 0 && !getter_polls(h);
  if (gs) wake_getter(h);
  if (ps) luamp_futex_wake(&h->get_seq, 1);
  if (atomic_load(&h->nwatch) > 0) poke_watchers(L, &q);
  return 0;
}

/* Makes room for n bytes in the object's scratch buffer (mu not held). */
static char *scratch(lua_State *L, struct luamp_obj *o, uint64_t n) {
  if (o->bufcap < n || o->buf == NULL) {
    size_t want = n < 256 ? 256 : (size_t)n;
    char *b = realloc(o->buf, want);
    if (b == NULL)
      luamp_raise_errno(L, "OSError", ENOMEM, "queue get buffer");
    o->buf = b;
    o->bufcap = want;
  }
  return o->buf;
}

/* Takes the next item; with items, an empty queue (not blocking) gives
 * no result, and an array message its items themselves. */
/* Where q:_get_items puts a reply's results (see q_get_items). */
struct into { int dests, item; };

static int decode_into(lua_State *L, const struct into *into, uint64_t tag,
                       const char *p, size_t n);

static int queue_get(lua_State *L, struct luamp_obj *o, int block,
                     double deadline, int slot, int items,
                     const struct into *into) {
  struct queue q = qget(o);
  struct qhdr *h = q.h;
  uint64_t rec[2], len;
  uint32_t ps, gs;
  int sliced = 0;
  if (slot >= 0 && (uint32_t)slot >= h->nslots)
    luaL_argerror(L, 2, "slot out of range");
  for (;;) {
    if (atomic_load(&h->count) == 0) {
      uint32_t snap;
      int r;
      if (atomic_load(&h->shut)) raise_shut(L, "get");
      if (!block) {
        if (items) return 0;
        luamp_raise(L, "Empty", "queue is empty");
      }
      /* a producer on another core is usually a moment away; on a busy
       * machine, after our promise, one waiting for our core (yield_get) */
      if (cpus_free() ? spin_get(h) : promised && yield_get(h)) continue;
      promised = 0;
      /* (a poll or promise of ours ends before the last look at count) */
      if (atomic_load_explicit(&h->poll_until, memory_order_relaxed))
        atomic_store(&h->poll_until, 0);
      snap = atomic_load(&h->put_seq);
      if (atomic_load(&h->count) > 0) continue;
      r = sleep_get(L, h, snap, getter_bits(slot), &sliced, deadline);
      if (r == LUAMP_WAIT_INTERRUPTED || r == LUAMP_WAIT_TIMEOUT) {
        /* pass on a wake-up we may have taken from another getter */
        if (atomic_load(&h->count) > 0 && atomic_load(&h->getters) > 0)
          wake_getter(h);
        if (r == LUAMP_WAIT_INTERRUPTED) luamp_raise_interrupt(L);
        if (atomic_load(&h->count) == 0 && !atomic_load(&h->shut))
          luamp_raise(L, "Empty", "queue is empty");
      }
      continue;
    }
    qlock_until(L, h, block ? deadline : luamp_deadline(NONBLOCK_GRACE),
                "Empty");
    if (atomic_load(&h->count) == 0) {   /* another getter was quicker */
      luamp_mutex_unlock(&h->mu);
      continue;
    }
    ring_read(&q, h->head, (char *)rec, REC);
    len = rec[0];
    while (len == SKIP) {
      pass_skip(&q, rec[1]);
      ring_read(&q, h->head, (char *)rec, REC);
      len = rec[0];
    }
    if (len <= o->bufcap && o->buf) break;
    luamp_mutex_unlock(&h->mu);
    scratch(L, o, len);
  }
  ring_read(&q, h->head + REC, o->buf, len);   /* (before the step, too) */
  journal_begin(h, 0);
  if (slot >= 0) {
    h->j_slot = (uint32_t)slot + 1;
    h->j_slot_tag = h->slots[slot];
    h->slots[slot] = rec[1] + 1;
  }
  h->head += rec_size(len);
  atomic_store_explicit(&h->count, atomic_load_explicit(&h->count,
                        memory_order_relaxed) - 1, memory_order_release);
  end_get_step(&q);
  /* a promise of ours is kept (see q_will_get) */
  if (atomic_load_explicit(&h->poll_until, memory_order_relaxed))
    atomic_store_explicit(&h->poll_until, 0, memory_order_relaxed);
  atomic_fetch_add(&h->get_seq, 1);
  ps = atomic_load(&h->putters);
  gs = atomic_load(&h->getters) > 0 && atomic_load(&h->count) > 0 &&
       !getter_polls(h);
  luamp_mutex_unlock(&h->mu);
  if (ps && !atomic_exchange(&h->put_woken, 1))
    luamp_futex_wake(&h->get_seq, 1);
  if (gs) wake_getter(h);
  {
    int nres = 1;
    if (into) nres = decode_into(L, into, rec[1], o->buf, (size_t)len);
    else if (items) nres = luamp_decode_items(L, o->buf, (size_t)len, 0);
    else if (!luamp_decode_small(L, o->buf, (size_t)len))
      luamp_decode(L, o->buf, (size_t)len, 0);
    if (o->bufcap > KEEP_SCRATCH) {   /* a rare big one: don't keep it */
      free(o->buf);
      o->buf = NULL;
      o->bufcap = 0;
    }
    return nres;
  }
}

/* put/get as the methods do (raising Full/Empty/EncodeError...); tag is
 * stored with the record; get with slot >= 0 records the tag of the
 * record it takes in the queue's slot table in the same step (Pool). */
static int queue_put_tagged(lua_State *L, int qidx, int vidx, uint64_t tag,
                            int block, double deadline) {
  return queue_put(L, checkqueue(L, qidx, any_queue), vidx, -1, tag, block, deadline);
}

static int queue_get_slot(lua_State *L, int qidx, int block,
                          double deadline, int slot, int items) {
  return queue_get(L, checkqueue(L, qidx, any_queue), block, deadline, slot,
                   items, NULL);
}

/* ---- construction ------------------------------------------------------------------- */

static int can_map(uint64_t n) {
  void *p = luamp_sys.mmap(NULL, n, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return 0;
  luamp_sys.munmap(p, n);
  return 1;
}

static int new_queue(lua_State *L, const char *tname, int joinable) {
  static const char *const keys[] = {"maxsize", "capacity", "slots", NULL};
  lua_Integer maxsize, capreq, nslots;
  uint64_t cap = MIN_CAP;
  struct luamp_arena *a;
  struct qhdr *h;
  size_t hsize;
  int r;
  luamp_opts_args(L, keys);
  maxsize = luaL_optinteger(L, 1, 0);
  capreq = luaL_optinteger(L, 2, 0);
  nslots = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, maxsize >= 0, 1, "maxsize must be >= 0 (0: unbounded)");
  luaL_argcheck(L, capreq >= 0 && (uint64_t)capreq <= MAX_CAP, 2,
                "capacity must be between 0 (default) and 2^40 bytes");
  luaL_argcheck(L, nslots >= 0 && nslots <= MAX_SLOTS, 3,
                "slots out of range");
  hsize = LUAMP_ARENA_HDR + sizeof(struct qhdr) +
          (size_t)nslots * sizeof(uint64_t);
  luaL_argcheck(L, hsize <= RING_OFF, 3, "too many slots");
  if (capreq == 0) {
    cap = sizeof(void *) < 8 ? (uint64_t)256 << 20 : DEFAULT_CAP;
  } else {
    while (cap < (uint64_t)capreq) cap <<= 1;
  }
  if (capreq == 0) {
    /* the ring is virtual address space: when that is short (ulimit -v),
     * a smaller ring beats none */
    while (cap > ((uint64_t)64 << 20) && !can_map(RING_OFF + cap)) cap >>= 1;
  }
  luamp_obj_alloc(L, tname, 0);
  a = luamp_arena_new(L, "luamp-queue", RING_OFF + cap, LUAMP_KIND_QUEUE);
  h = (struct qhdr *)(a->base + LUAMP_ARENA_HDR);
  h->cap = cap;
  h->maxsize = maxsize;
  h->joinable = joinable != 0;
  h->nslots = (uint32_t)nslots;
  luamp_obj_bind(L, -1, a, LUAMP_ARENA_HDR);
  if ((r = luamp_mutex_init(&h->mu)) != 0)
    luamp_raise_errno(L, "OSError", r, "pthread_mutex_init");
  return 1;
}

/* mp.Queue{broker = url, ...}: a queue in Redis, made by
 * multiprocessing.broker_queue (policy in Lua, as the Pool's); returns 0
 * when the call is not for one. */
static int broker_queue(lua_State *L, int joinable) {
  int t = lua_type(L, 1) == LUA_TTABLE ? lua_getfield(L, 1, "broker") : LUA_TNIL;
  if (lua_type(L, 1) == LUA_TTABLE) lua_pop(L, 1);
  if (t == LUA_TNIL) return 0;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing.broker_queue");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "Queue");
  lua_pushvalue(L, 1);
  lua_pushboolean(L, joinable);
  lua_call(L, 2, 1);
  return 1;
}

static int l_Queue(lua_State *L) {
  if (broker_queue(L, 0)) return 1;
  return new_queue(L, QUEUE_TNAME, 0);
}

static int l_JoinableQueue(lua_State *L) {
  if (broker_queue(L, 1)) return 1;
  return new_queue(L, JOINABLEQUEUE_TNAME, 1);
}

static int l_SimpleQueue(lua_State *L) {
  lua_settop(L, 0);
  return new_queue(L, SIMPLEQUEUE_TNAME, 0);
}

/* ---- event loops: fileno() ---------------------------------------------------- */

/* A host event loop (luv, cqueues) wants an fd per object, readable when
 * a get would not block.  mp.wait's pipe is one per process, and libuv
 * refuses two poll handles on one fd, so each handle that fileno() was
 * asked of gets a pipe of its own (this table, per process), registered
 * in the queue's watch slots as (pid, write end) like mp.wait's.
 *
 * Arming: drain the pipe, register for the next put, then look at count
 * (registration and count both change under mu, so a put either sees the
 * registration and pokes, or committed before and the look sees it; no
 * put is missed) and poke ourselves if items are there.  Registrations
 * are used up by the poke; the handle's own get, get_nowait, empty and
 * pollfd re-arm whenever they find the queue empty.  So after the loop
 * drained the queue (get_nowait until Empty) the fd is quiet until the
 * next put.  A poke can be stale (another consumer took the item): the
 * loop then meets Empty once, which re-arms. */
struct qfd {
  struct luamp_obj *o;   /* the handle (entries leave with it) */
  pid_t pid;             /* the process that made the pipe */
  int rfd, wfd;
};
static struct qfd *qfds;
static int nqfds, capqfds;

/* This process's entry for o, or NULL; drops entries inherited through
 * fork (their pipes are the parent's registrations, not ours). */
static struct qfd *qfd_find(struct luamp_obj *o) {
  pid_t me = luamp_pid();
  for (int i = 0; i < nqfds; i++) {
    if (qfds[i].pid != me) {
      luamp_sys.close(qfds[i].rfd);
      luamp_sys.close(qfds[i].wfd);
      qfds[i--] = qfds[--nqfds];
      continue;
    }
    if (qfds[i].o == o) return &qfds[i];
  }
  return NULL;
}

/* Whether wfd is the write end of one of this process's fileno() pipes
 * (a slot left by a dead process whose pid came back names some fd). */
static int qfd_owns(int wfd) {
  pid_t me = luamp_pid();
  for (int i = 0; i < nqfds; i++)
    if (qfds[i].pid == me && qfds[i].wfd == wfd) return 1;
  return 0;
}

/* Takes (me, wfd)'s watch slot (on) or gives it back (off). */
static void qfd_watch(lua_State *L, struct qhdr *h, int wfd, int on) {
  pid_t me = luamp_pid();
  int free_i = -1;
  qlock(L, h);
  for (int i = 0; i < WATCH_SLOTS; i++) {
    if (h->watch[i].pid == me && h->watch[i].fd == wfd) {
      if (!on) {
        h->watch[i].pid = 0;
        atomic_fetch_sub(&h->nwatch, 1);
      }
      luamp_mutex_unlock(&h->mu);
      return;
    }
    if (h->watch[i].pid == 0 && free_i < 0) free_i = i;
  }
  if (on) {
    if (free_i < 0) {
      luamp_mutex_unlock(&h->mu);
      luamp_raise(L, "OSError", "too many watchers on one queue (%d)",
                  WATCH_SLOTS);
    }
    h->watch[free_i].pid = me;
    h->watch[free_i].fd = wfd;
    atomic_fetch_add(&h->nwatch, 1);
  }
  luamp_mutex_unlock(&h->mu);
}

static void qfd_arm(lua_State *L, struct luamp_obj *o, struct qfd *f) {
  struct qhdr *h = (struct qhdr *)o->p;
  char buf[64];
  while (luamp_sys.read(f->rfd, buf, sizeof buf) > 0) {}
  if (atomic_load(&h->count) == 0 && !atomic_load(&h->shut)) {
    qfd_watch(L, h, f->wfd, 1);
    if (atomic_load(&h->count) == 0 && !atomic_load(&h->shut)) return;
  }
  (void)!luamp_sys.write(f->wfd, "", 1);
}

/* After (and before) a get by a watched handle: an empty queue re-arms. */
static void qfd_settle(lua_State *L, struct luamp_obj *o) {
  struct qfd *f;
  if (nqfds == 0 || o->arena == NULL ||
      atomic_load(&((struct qhdr *)o->p)->count) != 0)
    return;
  if ((f = qfd_find(o)) != NULL) qfd_arm(L, o, f);
}

/* Gives up the handle's pipe and slot (close, __gc). */
static void qfd_drop(lua_State *L, struct luamp_obj *o) {
  struct qfd *f;
  if (nqfds == 0 || (f = qfd_find(o)) == NULL) return;
  if (o->arena != NULL) qfd_watch(L, (struct qhdr *)o->p, f->wfd, 0);
  luamp_sys.close(f->rfd);
  luamp_sys.close(f->wfd);
  *f = qfds[--nqfds];
  if (nqfds == 0) {         /* the last one: nothing left to leak at exit */
    free(qfds);
    qfds = NULL;
    capqfds = 0;
  }
}

/* q:fileno() / q:pollfd() -> fd: made on first use, armed at each call. */
static int q_fileno(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, any_queue);
  struct qfd *f = qfd_find(o);
  if (f == NULL) {
    int p[2];
    if (nqfds == capqfds) {
      int n = capqfds ? capqfds * 2 : 8;
      struct qfd *t = realloc(qfds, (size_t)n * sizeof *t);
      if (t == NULL) luamp_raise_errno(L, "OSError", ENOMEM, "fileno");
      qfds = t;
      capqfds = n;
    }
    if (luamp_sys.pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0)
      luamp_raise_errno(L, "OSError", errno, "pipe2");
    f = &qfds[nqfds++];
    f->o = o;
    f->pid = luamp_pid();
    f->rfd = p[0];
    f->wfd = p[1];
  }
  qfd_arm(L, o, f);
  lua_pushinteger(L, f->rfd);
  return 1;
}

/* The rest of the cqueues protocol: events "r"; timeout 0 while items
 * are there or the queue is shut down (nil: only the fd). */
static int q_events(lua_State *L) {
  checkqueue(L, 1, any_queue);
  lua_pushliteral(L, "r");
  return 1;
}

static int q_timeout(lua_State *L) {
  if (!luamp_queue_ready(L, 1)) return 0;   /* (checks self) */
  lua_pushinteger(L, 0);
  return 1;
}

/* ---- methods ------------------------------------------------------------------------- */

/* block, timeout at i, i+1: the deadline, or -2 for non-blocking */
static double block_timeout(lua_State *L, int i) {
  if (!lua_isnoneornil(L, i)) {
    luaL_checktype(L, i, LUA_TBOOLEAN);
    if (!lua_toboolean(L, i)) return -2.0;
  }
  return luamp_deadline_arg(L, i + 1);
}

/* q:put(v [, block [, timeout]]) */
static int q_put(lua_State *L) {
  LUAMP_FENCE(L);
  struct luamp_obj *o;
  double d = -1.0;
  /* (q:put(v), the common call, skips the argument checks: about a tenth
   * of a small item's put, measured with callgrind) */
  o = checkqueue(L, 1, full_queue);
  if (lua_gettop(L) != 2) {
    lua_settop(L, 4);
    d = block_timeout(L, 3);
  }
  queue_put(L, o, 2, -1, 0, d != -2.0, d == -2.0 ? 0 : d);
  return 0;
}

static int q_put_nowait(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  LUAMP_FENCE(L);
  lua_settop(L, 2);
  queue_put(L, o, 2, -1, 0, 0, 0);
  return 0;
}

/* queue_get, and a watched handle's fileno() re-armed when it finds the
 * queue empty: before (a get that raises Empty leaves it armed) and
 * after (a get that took the last item). */
static int watched_get(lua_State *L, struct luamp_obj *o, int block,
                       double deadline, int items, const struct into *into) {
  int n;
  qfd_settle(L, o);
  n = queue_get(L, o, block, deadline, -1, items, into);
  qfd_settle(L, o);
  return n;
}

/* q:get([block [, timeout]]) -> v */
static int q_get(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  double d = lua_gettop(L) == 1 ? -1.0 : block_timeout(L, 2);
  return watched_get(L, o, d != -2.0, d == -2.0 ? 0 : d, 0, NULL);
}

/* q:_get_items([dests, item]) -> the items of the next message (an
 * array), or nothing when the queue is empty; never waits (the Pool's
 * replies).  With dests: when dests[tag] (tag: the record's, as put) is a
 * table whose field `into` is a table and `at` an integer, item number
 * `item` of the message, when an array, is decoded into into[at + 1],
 * into[at + 2], ... and `into` itself is that item (a chunk's results go
 * straight to the map's result table: no table made, none copied). */
static int q_get_items(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  struct into into;
  if (lua_isnoneornil(L, 2)) return watched_get(L, o, 0, 0, 1, NULL);
  luaL_checktype(L, 2, LUA_TTABLE);
  into.dests = 2;
  into.item = (int)luaL_checkinteger(L, 3);
  luaL_argcheck(L, into.item >= 1, 3, "item must be >= 1");
  return watched_get(L, o, 0, 0, 1, &into);
}

/* The message's items, its item into->item decoded into the table that
 * dests[tag] names (see q_get_items), when there is one. */
static int decode_into(lua_State *L, const struct into *into, uint64_t tag,
                       const char *p, size_t n) {
  int t, at_ok;
  lua_Integer at;
  luaL_checkstack(L, 4, "no room to decode");
  /* (a record tagged 0, an apply's reply, names no table: nothing of
   * the caller's stack is popped for it) */
  if (tag == 0 || tag > (uint64_t)LUA_MAXINTEGER)
    return luamp_decode_items(L, p, n, 0);
  if (lua_rawgeti(L, into->dests, (lua_Integer)tag) != LUA_TTABLE) {
    lua_pop(L, 1);
    return luamp_decode_items(L, p, n, 0);
  }
  lua_pushliteral(L, "at");
  lua_rawget(L, -2);
  at = lua_tointegerx(L, -1, &at_ok);
  lua_pushliteral(L, "into");
  t = lua_rawget(L, -3);
  if (!at_ok || t != LUA_TTABLE) {
    lua_pop(L, 3);
    return luamp_decode_items(L, p, n, 0);
  }
  lua_replace(L, -3);          /* the table, under nothing else of ours */
  lua_pop(L, 1);
  {
    int tidx = lua_gettop(L), nres;
    nres = luamp_decode_items_into(L, p, n, 0, into->item, tidx, at);
    lua_remove(L, tidx);
    return nres;
  }
}

static int q_get_nowait(lua_State *L) {
  return watched_get(L, checkqueue(L, 1, full_queue), 0, 0, 0, NULL);
}

/* SimpleQueue:get() waits forever (Ctrl-C still interrupts) */
static int sq_get(lua_State *L) {
  return watched_get(L, checkqueue(L, 1, simple_only), 1, -1.0, 0, NULL);
}

static int sq_put(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, simple_only);
  LUAMP_FENCE(L);
  lua_settop(L, 2);
  queue_put(L, o, 2, -1, 0, 1, -1.0);
  return 0;
}

/* Pool support: q:_put_tagged(v, tag [, block [, timeout]]) and
 * q:_get_slot(slot [, block [, timeout [, items]]]) -> v, which records the tag in
 * slot (0-based) in the same step; q:_taken(slot) -> tag or nil;
 * q:_clear(slot). */
static int q_put_tagged(lua_State *L) {
  LUAMP_FENCE(L);
  lua_Integer tag = luaL_checkinteger(L, 3);
  double d;
  lua_settop(L, 5);
  checkqueue(L, 1, full_queue);
  luaL_argcheck(L, tag >= 0, 3, "tag must be >= 0");
  d = block_timeout(L, 4);
  queue_put_tagged(L, 1, 2, (uint64_t)tag, d != -2.0, d == -2.0 ? 0 : d);
  return 0;
}

/* q:_put_task(tag, v1, ..., vn): puts {v1, ..., vn} tagged, waiting for
 * room as long as it takes (the Pool's task records, with no table made). */
static int q_put_task(lua_State *L) {
  LUAMP_FENCE(L);
  lua_Integer tag = luaL_checkinteger(L, 2);
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  luaL_argcheck(L, tag >= 0, 2, "tag must be >= 0");
  queue_put(L, o, 3, lua_gettop(L) - 2, (uint64_t)tag, 1, -1.0);
  return 0;
}

/* q:_put_slice(tag, k, first, last, v1, ..., vn): puts {v1, ..., vn}
 * tagged, as _put_task does, with vk (a table) sent as the array of its
 * items first..last: a map's chunk, and a chunk's results, with no table
 * cut for them. */
static int q_put_slice(lua_State *L) {
  LUAMP_FENCE(L);
  lua_Integer tag = luaL_checkinteger(L, 2);
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  struct luamp_slice sl;
  int count = lua_gettop(L) - 5;
  size_t len;
  const char *data;
  luaL_argcheck(L, tag >= 0, 2, "tag must be >= 0");
  sl.at = (int)luaL_checkinteger(L, 3);
  sl.first = luaL_checkinteger(L, 4);
  sl.last = luaL_checkinteger(L, 5);
  luaL_argcheck(L, sl.at >= 1 && sl.at <= count, 3, "no such value");
  luaL_checktype(L, 5 + sl.at, LUA_TTABLE);
  data = luamp_encode_slice(L, 6, count, &sl, 0, &len, NULL);
  return queue_put_bytes(L, o, data, len, (uint64_t)tag, 1, -1.0);
}

/* (with items true: an array message comes as its items, as
 * _get_items gives them -- a pool worker's task, no table decoded) */
static int q_get_slot(lua_State *L) {
  lua_Integer slot = luaL_checkinteger(L, 2);
  int items = lua_toboolean(L, 5);
  double d;
  checkqueue(L, 1, full_queue);
  luaL_argcheck(L, slot >= 0 && slot < MAX_SLOTS, 2, "slot out of range");
  d = block_timeout(L, 3);
  return queue_get_slot(L, 1, d != -2.0, d == -2.0 ? 0 : d, (int)slot, items);
}

/* q:_will_get(): this process gets from q at once (a pool worker about to
 * put its reply, whose owner's next task may come before the worker is
 * back in get): for WILL_GET_NS a put need not wake a sleeping getter.
 * (Issue 15: on a busy machine the owner, woken by the reply, often ran
 * before its worker was back in get, and its next task woke the other,
 * cold worker: 1100-1700 changes of worker in 20000 round trips with
 * last_bits alone, 12-37 with this.)  A worker killed before it gets
 * leaves the item to the sleepers' next wait slice. */
static int q_will_get(lua_State *L) {
  struct qhdr *h = (struct qhdr *)checkqueue(L, 1, full_queue)->p;
  atomic_store(&h->poll_until, now_ns() + WILL_GET_NS);
  promised = 1;
  return 0;
}

static int q_taken(lua_State *L) {
  struct queue q = qget(checkqueue(L, 1, full_queue));
  lua_Integer slot = luaL_checkinteger(L, 2);
  uint64_t v;
  luaL_argcheck(L, slot >= 0 && (uint64_t)slot < q.h->nslots, 2,
                "slot out of range");
  qlock(L, q.h);
  v = q.h->slots[slot];
  luamp_mutex_unlock(&q.h->mu);
  if (v == 0) return 0;
  lua_pushinteger(L, (lua_Integer)(v - 1));
  return 1;
}

static int q_clear(lua_State *L) {
  struct queue q = qget(checkqueue(L, 1, full_queue));
  lua_Integer slot = luaL_checkinteger(L, 2);
  luaL_argcheck(L, slot >= 0 && (uint64_t)slot < q.h->nslots, 2,
                "slot out of range");
  qlock(L, q.h);
  q.h->slots[slot] = 0;
  luamp_mutex_unlock(&q.h->mu);
  return 0;
}

/* mp.wait's protocol: q:_wait_fd() -> fd, ready, true.  fd is this
 * process's wake-up pipe, a hint shared by every queue it waits on;
 * ready(q) drains it, registers for the next put, and says whether a
 * get would not block (registration first: a put after the check pokes). */
static int q_wait_ready(lua_State *L) {
  checkqueue(L, 1, any_queue);
  luamp_wakeup_drain();
  luamp_queue_watch(L, 1, 1);
  if (luamp_queue_ready(L, 1)) {
    luamp_queue_watch(L, 1, 0);
    lua_pushboolean(L, 1);
  } else {
    lua_pushboolean(L, 0);
  }
  return 1;
}

static int q_wait_fd(lua_State *L) {
  checkqueue(L, 1, any_queue);
  lua_pushinteger(L, luamp_wakeup_fd(L));
  lua_pushcfunction(L, q_wait_ready);
  lua_pushboolean(L, 1);
  return 3;
}

/* q:_await(seconds) -> whether the queue holds an item, waiting at most
 * seconds for one as a getter does (on the put_seq futex: the put that
 * fills the queue wakes this process with one futex call, where mp.wait's
 * pipe costs the putter an open of /proc/PID/fd/N, a write and a close,
 * and the waiter a poll and a read).  The pool's owner waits so, for a
 * short while, for a result due soon; longer waits go through mp.wait,
 * which also watches the workers' sentinels. */
static int await_item(lua_State *L, struct qhdr *h, double deadline) {
  int sliced = 0;
  /* a busy machine: the worker we wait for may wait for our CPU (it
   * yields to us after its reply, see yield_get): yielding it back gets
   * the reply with no sleep and no wake-up on either side */
  if (atomic_load(&h->count) == 0 && !cpus_free() &&
      yield_for(&owner_yields, h))
    return 1;
  while (atomic_load(&h->count) == 0) {
    uint32_t snap;
    int r;
    snap = atomic_load(&h->put_seq);
    if (atomic_load(&h->count) > 0) break;
    r = sleep_get(L, h, snap, getter_bits(-1), &sliced, deadline);
    if (r == LUAMP_WAIT_INTERRUPTED || r == LUAMP_WAIT_TIMEOUT) {
      /* pass on a wake-up we may have taken from a getter */
      if (atomic_load(&h->count) > 0 && atomic_load(&h->getters) > 0)
        wake_getter(h);
      if (r == LUAMP_WAIT_INTERRUPTED) luamp_raise_interrupt(L);
      break;
    }
  }
  return atomic_load(&h->count) > 0;
}

static int q_await(lua_State *L) {
  struct qhdr *h = (struct qhdr *)checkqueue(L, 1, any_queue)->p;
  lua_pushboolean(L, await_item(L, h, luamp_deadline(luaL_checknumber(L, 2))));
  return 1;
}

/* q:_collect's settling of one reply, its n items on top of the stack
 * (arguments: 2 tasks, 3 timeouts, 4 the job class): a plain job's one
 * value -- (tag, OK = 0, 1, v) for tasks[tag] a table of the class with
 * no _plain of its own (no callbacks, no progress: pool_results.lua's
 * new_apply) and no timeout -- is recorded as finish() would: tasks[tag]
 * = nil, job._value = v, job._done = true.  Returns 1 then, the items
 * gone; 0 (the items left) for any other reply. */
static int settle_plain(lua_State *L, int n) {
  int top = lua_gettop(L), b = top - n + 1, isnum, job = top + 1;
  lua_Integer tag;
  if (n != 4 || !lua_isinteger(L, b + 1) || lua_tointeger(L, b + 1) != 0 ||
      !lua_isinteger(L, b + 2) || lua_tointeger(L, b + 2) != 1)
    return 0;
  tag = lua_tointegerx(L, b, &isnum);
  if (!isnum || lua_rawgeti(L, 2, tag) != LUA_TTABLE ||
      !lua_getmetatable(L, job) || !lua_rawequal(L, -1, 4) ||
      lua_rawgeti(L, 3, tag) != LUA_TNIL) {
    lua_settop(L, top);
    return 0;
  }
  lua_pushliteral(L, "_plain");
  if (lua_rawget(L, job) != LUA_TNIL) {
    lua_settop(L, top);
    return 0;
  }
  lua_pushliteral(L, "_value");
  lua_pushvalue(L, b + 3);
  lua_rawset(L, job);
  lua_pushliteral(L, "_done");
  lua_pushboolean(L, 1);
  lua_rawset(L, job);
  lua_pushnil(L);
  lua_rawseti(L, 2, tag);
  lua_settop(L, b - 1);
  return 1;
}

/* q:_collect(tasks, timeouts, cls, pending [, seconds]) -> count: the Pool
 * owner's drain of its result queue (q:_get_items(tasks, 4) in a loop)
 * with no Lua step per reply.  Takes replies while there are any,
 * settling plain jobs' (settle_plain) and counting them; the first other
 * reply is appended to pending as a table {n = n, items...} and ends the
 * call (the owner handles it, and those after it, in order).  Each reply
 * is taken and recorded in one C step: a Ctrl-C cannot fall between.
 * With seconds, an empty queue is waited on that long first, as
 * q:_await does (issue 15: callgrind put the futures round trip's owner
 * at ~24.5k instructions, 6.7k of them in the shielded Lua drain). */
static int q_collect(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  struct qhdr *h = (struct qhdr *)o->p;
  struct into into = {2, 4};
  double deadline = lua_isnoneornil(L, 6) ? -2.0
                  : luamp_deadline(luaL_checknumber(L, 6));
  int n;
  lua_Integer count = 0;
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  luaL_checktype(L, 5, LUA_TTABLE);
  lua_settop(L, 5);
  for (;;) {
    if ((n = watched_get(L, o, 0, 0, 1, &into)) > 0) {
      if (settle_plain(L, n)) {
        count++;
        continue;
      }
      luaL_checkstack(L, 2, "no room for a reply");
      lua_createtable(L, n, 1);
      lua_insert(L, 6);
      lua_pushinteger(L, n);
      lua_setfield(L, 6, "n");
      while (n > 0) lua_rawseti(L, 6, n--);
      lua_rawseti(L, 5, (lua_Integer)lua_rawlen(L, 5) + 1);
      break;
    }
    if (deadline == -2.0 || count > 0 || !await_item(L, h, deadline)) break;
    deadline = -2.0;                /* (taken now, without waiting again) */
  }
  lua_pushinteger(L, count);
  return 1;
}

static int q_qsize(lua_State *L) {
  struct queue q = qget(checkqueue(L, 1, full_queue));
  lua_pushinteger(L, (lua_Integer)atomic_load(&q.h->count));
  return 1;
}

static int q_empty(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, any_queue);
  struct queue q = qget(o);
  qfd_settle(L, o);   /* a SimpleQueue's loop drains while not empty() */
  lua_pushboolean(L, atomic_load(&q.h->count) == 0);
  return 1;
}

static int q_full(lua_State *L) {
  struct queue q = qget(checkqueue(L, 1, full_queue));
  lua_pushboolean(L, q.h->maxsize > 0 &&
                     atomic_load(&q.h->count) >= (uint64_t)q.h->maxsize);
  return 1;
}

/* q:shutdown([immediate]): see "Shutdown" at the top.  Idempotent.  The
 * flag is outside the journal and never undone: a caller killed inside
 * leaves the queue shut down, with or without its items (the dropping
 * is one journaled step), and shutdown(true) again finishes the job. */
static int q_shutdown(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, any_queue);
  struct queue q = qget(o);
  struct qhdr *h = q.h;
  int immediate = 0, done = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TBOOLEAN);
    immediate = lua_toboolean(L, 2);
  }
  LUAMP_FENCE(L);
  qlock(L, h);
  atomic_store(&h->shut, 1);
  if (immediate && atomic_load(&h->count) > 0) {
    uint64_t n = atomic_load(&h->count), u = atomic_load(&h->unfinished);
    journal_begin(h, 1);
    h->head = h->tail;
    atomic_store(&h->count, 0);
    if (h->joinable) {
      atomic_store(&h->unfinished, u > n ? u - n : 0);
      done = u > 0 && u <= n;
    }
    journal_end(h);
    after_get(&q);   /* restart at the ring's start, pages given back */
  }
  if (done) atomic_fetch_add(&h->done_seq, 1);
  atomic_fetch_add(&h->put_seq, 1);
  atomic_fetch_add(&h->get_seq, 1);
  luamp_mutex_unlock(&h->mu);
  luamp_futex_wake(&h->put_seq, 0x7fffffff);
  luamp_futex_wake(&h->get_seq, 0x7fffffff);
  if (done) luamp_futex_wake(&h->done_seq, 0x7fffffff);
  if (atomic_load(&h->nwatch) > 0) poke_watchers(L, &q);
  return 0;
}

/* q:is_shutdown() -> boolean (Python's is_shutdown attribute) */
static int q_is_shutdown(lua_State *L) {
  struct qhdr *h = qget(checkqueue(L, 1, any_queue)).h;
  lua_pushboolean(L, atomic_load(&h->shut) != 0);
  return 1;
}

/* close(), __close and __gc of the three types */
static int q_close(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, any_queue);
  qfd_drop(L, o);
  luamp_obj_close(L, o);
  return 0;
}

/* Python's join_thread() waits for the feeder thread after close(); there
 * is no feeder here, every put is complete when it returns. */
static int q_join_thread(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, full_queue);
  if (o->arena != NULL)
    luamp_raise(L, "ValueError", "Queue is not closed (join_thread comes "
                "after close)");
  return 0;
}

static int q_cancel_join_thread(lua_State *L) {
  luamp_self_of(L, 1, full_queue);
  return 0;
}

static int jq_task_done(lua_State *L) {
  struct queue q = qget(checkqueue(L, 1, joinable_only));
  LUAMP_FENCE(L);
  struct qhdr *h = q.h;
  int zero;
  qlock(L, h);
  if (atomic_load(&h->unfinished) == 0) {
    luamp_mutex_unlock(&h->mu);
    luamp_raise(L, "ValueError", "task_done() called too many times");
  }
  journal_begin(h, 1);
  zero = atomic_fetch_sub(&h->unfinished, 1) == 1;
  journal_end(h);
  if (zero) atomic_fetch_add(&h->done_seq, 1);
  luamp_mutex_unlock(&h->mu);
  if (zero && atomic_load(&h->joiners) > 0)
    luamp_futex_wake(&h->done_seq, 0x7fffffff);
  return 0;
}

/* q:join([timeout]) -> true, or false when the timeout passed (beyond
 * Python, whose join() has no timeout) */
static int jq_join(lua_State *L) {
  struct queue q = qget(checkqueue(L, 1, joinable_only));
  struct qhdr *h = q.h;
  double deadline = luamp_deadline_arg(L, 2);
  for (;;) {
    uint32_t snap = atomic_load(&h->done_seq);
    int r;
    if (atomic_load(&h->unfinished) == 0) break;
    r = sleep_on(L, &h->done_seq, snap, &h->joiners, deadline);
    if (r == LUAMP_WAIT_INTERRUPTED) luamp_raise_interrupt(L);
    if (r == LUAMP_WAIT_TIMEOUT) {
      lua_pushboolean(L, atomic_load(&h->unfinished) == 0);
      return 1;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* q:_stats() -> {capacity =, bytes =, resident =, repairs =, polling =,
 * yields =}: bytes queued, and bytes of memory the queue holds (specs,
 * diagnostics); yields: this process's gets that found their item by
 * yielding (see yield_get) */
static int q_stats(lua_State *L) {
  struct luamp_obj *o = checkqueue(L, 1, full_queue);
  struct queue q = qget(o);
  struct stat st;
  int polling = cpus_free();          /* gets in this process poll now */
  qlock(L, q.h);
  lua_createtable(L, 0, 4);
  if (fstat(o->arena->fd, &st) == 0) {
    lua_pushinteger(L, (lua_Integer)st.st_blocks * 512);
    lua_setfield(L, -2, "resident");
  }
  lua_pushinteger(L, (lua_Integer)q.h->cap);
  lua_setfield(L, -2, "capacity");
  {   /* forwarded (see placement): the gap before the jump included */
    uint64_t span = q.h->tail - q.h->head;
    if (span > q.h->cap)
      span = q.h->tail - (q.h->head & ~(q.h->cap - 1)) - q.h->cap;
    lua_pushinteger(L, (lua_Integer)span);
  }
  lua_setfield(L, -2, "bytes");
  lua_pushinteger(L, (lua_Integer)q.h->repairs);
  lua_setfield(L, -2, "repairs");
  lua_pushinteger(L, (lua_Integer)atomic_load(&q.h->nwatch));
  lua_setfield(L, -2, "watchers");
  lua_pushinteger(L, (lua_Integer)q.h->skips);
  lua_setfield(L, -2, "skips");
  lua_pushboolean(L, polling);
  lua_setfield(L, -2, "polling");
  lua_pushinteger(L, yields);
  lua_setfield(L, -2, "yields");
  luamp_mutex_unlock(&q.h->mu);
  return 1;
}

static int q_tostring(lua_State *L) {
  struct luamp_obj *o = luamp_self_of(L, 1, any_queue);
  const char *name = luamp_is(L, 1, &simple_type) ? "SimpleQueue"
                     : luamp_is(L, 1, &joinable_type) ? "JoinableQueue"
                                                      : "Queue";
  if (o->arena == NULL) {
    lua_pushfstring(L, "<%s (closed)>", name);
  } else {
    struct qhdr *h = (struct qhdr *)o->p;
    lua_pushfstring(L, "<%s (%I items)>", name,
                    (lua_Integer)atomic_load(&h->count));
  }
  return 1;
}

/* ---- handles ------------------------------------------------------------------------- */

static void q_encode(lua_State *L, int idx) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luamp_obj_describe(L, idx, &b);
  luaL_pushresult(&b);
}

static void q_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, QUEUE_TNAME, LUAMP_KINDS(LUAMP_KIND_QUEUE), 0);
}

static void sq_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, SIMPLEQUEUE_TNAME,
                   LUAMP_KINDS(LUAMP_KIND_QUEUE), 0);
}

static void jq_decode(lua_State *L, const char *p, size_t n) {
  luamp_obj_decode(L, &p, &n, JOINABLEQUEUE_TNAME,
                   LUAMP_KINDS(LUAMP_KIND_QUEUE), 0);
}

static const struct luamp_handle_ops handle_ops[] = {
  {QUEUE_TNAME, q_encode, q_decode},
  {SIMPLEQUEUE_TNAME, q_encode, sq_decode},
  {JOINABLEQUEUE_TNAME, q_encode, jq_decode},
};

static const luaL_Reg queue_meth[] = {
  {"put", q_put}, {"get", q_get}, {"put_nowait", q_put_nowait},
  {"get_nowait", q_get_nowait}, {"qsize", q_qsize}, {"empty", q_empty},
  {"full", q_full}, {"close", q_close}, {"join_thread", q_join_thread},
  {"cancel_join_thread", q_cancel_join_thread},
  {"_put_tagged", q_put_tagged}, {"_put_task", q_put_task},
  {"_put_slice", q_put_slice},
  {"_get_slot", q_get_slot}, {"_get_items", q_get_items},
  {"_will_get", q_will_get}, {"_taken", q_taken}, {"_clear", q_clear},
  {"_stats", q_stats},
  {"_await", q_await}, {"_collect", q_collect},
  {"_wait_fd", q_wait_fd}, {"fileno", q_fileno},
  {"pollfd", q_fileno}, {"events", q_events}, {"timeout", q_timeout},
  {"shutdown", q_shutdown}, {"is_shutdown", q_is_shutdown}, {NULL, NULL}
};
static const luaL_Reg joinable_meth[] = {
  {"task_done", jq_task_done}, {"join", jq_join}, {NULL, NULL}
};
static const luaL_Reg simple_meth[] = {
  {"put", sq_put}, {"get", sq_get}, {"empty", q_empty},
  {"close", q_close}, {"_wait_fd", q_wait_fd}, {"fileno", q_fileno},
  {"pollfd", q_fileno}, {"events", q_events}, {"timeout", q_timeout},
  {"shutdown", q_shutdown}, {"is_shutdown", q_is_shutdown}, {NULL, NULL}
};
static const luaL_Reg queue_metameth[] = {
  {"__gc", q_close}, {"__close", q_close}, {"__tostring", q_tostring},
  {NULL, NULL}
};
static struct luamp_type queue_type = {
  QUEUE_TNAME, queue_meth, queue_metameth, NULL, 1, 0, 0
};
static struct luamp_type joinable_type = {
  JOINABLEQUEUE_TNAME, queue_meth, queue_metameth, NULL, 1, 0, 0
};
static struct luamp_type simple_type = {
  SIMPLEQUEUE_TNAME, simple_meth, queue_metameth, NULL, 1, 0, 0
};

int luamp_cpus_free(void) { return cpus_free(); }

int luamp_open_queue(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"Queue", l_Queue}, {"JoinableQueue", l_JoinableQueue},
    {"SimpleQueue", l_SimpleQueue}, {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  lua_getfield(L, -1, "methods");
  luamp_newtype(L, &queue_type);
  lua_setfield(L, -2, "Queue");           /* core.methods.Queue */
  luamp_newtype(L, &joinable_type);
  luaL_setfuncs(L, joinable_meth, 0);     /* (again: idempotent) */
  lua_setfield(L, -2, "JoinableQueue");
  luamp_newtype(L, &simple_type);
  lua_setfield(L, -2, "SimpleQueue");
  lua_pop(L, 1);
  for (int i = 0; i < 3; i++) luamp_register_handle(L, &handle_ops[i]);
  return 0;
}
