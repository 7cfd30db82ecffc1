/*
 * test_codec_map.c -- the encoder's identity map (a list scanned linearly
 * for the first MAP_LINEAR objects, then open addressing with linear
 * probing) against a plain model: objects registered, the map grown by
 * rehashing, then the last ones forgotten (a sequence that turned out not
 * to be one, the end of a message).  Every object kept must still be
 * found and every object forgotten must be gone: a lookup that misses a
 * kept object loses a shared reference, and a forgotten address left in
 * the map makes the next message's new object at that address look seen.
 * The map is static in codec.c, so this test compiles codec.c into itself.
 */
#include "../../runtime/codec.c"

#include "tap.h"

static uint64_t rng = 88172645463325252ULL;
static uint64_t next_rand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static void insert(struct encbox *b, const void *p) {
  CHECK(map_find(b, p) == 0);
  CHECK(map_add(b, p) == 0);
}

static int found(const struct encbox *b, const void *p) {
  return map_find(b, p) != 0;
}

static void truncate_keeps_lookups(void) {
  /* addresses like a heap's: close together, 16-byte aligned, so that
   * they cluster and wrap around the table's end */
  for (int trial = 0; trial < 3000; trial++) {
    struct encbox b;
    const void *ptrs[700];
    uint32_t n = 1 + (uint32_t)(next_rand() % 700), keep;
    uintptr_t base = 0x100000 + (uintptr_t)(next_rand() % 4096) * 16;
    memset(&b, 0, sizeof b);
    for (uint32_t i = 0; i < n; i++) {
      /* distinct: a random walk forward */
      base += 16 * (1 + next_rand() % 8);
      ptrs[i] = (const void *)base;
      insert(&b, ptrs[i]);
    }
    keep = (uint32_t)(next_rand() % (n + 1));
    map_truncate(&b, keep);
    CHECK(b.norder == keep);
    CHECK(b.hcount == (keep > MAP_LINEAR ? keep : 0));
    for (uint32_t i = 0; i < n; i++) {
      if (i < keep) {
        CHECK(found(&b, ptrs[i]));
        CHECK(map_find(&b, ptrs[i]) == i + 1);
      } else {
        CHECK(!found(&b, ptrs[i]));
      }
    }
    /* and to nothing, as at the end of every message */
    map_truncate(&b, 0);
    CHECK(b.hcount == 0);
    for (uint32_t i = 0; i < b.hcap; i++) CHECK(b.keys[i] == NULL);
    free(b.keys);
    free(b.vals);
    free(b.order);
    free(b.info);
  }
}

int main(void) {
  static const struct tap_test tests[] = {
    {"identity map: forgetting the last objects keeps the others findable", truncate_keeps_lookups},
    {NULL, NULL}
  };
  return tap_run(tests);
}
