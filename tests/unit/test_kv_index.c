/* test_kv_index.c - the coordinator's index of the groups' prefix caches (coordinator/kv_index.c)
 * and the cache-aware policy that routes by it (coordinator/router.c).
 *
 * Protects: stored blocks are matched from a prompt's first block to the first one missing, per
 * group; removed blocks stop the match there; the index never holds more than its bound, evicting
 * entries no match used lately first; a group's entries go at once when it is cleared (its worker
 * restarted, died or was forgotten) while other groups keep theirs, and its stale entries make room
 * before live ones; KvEvents: a reset replaces the group's view with its snapshot, a sequence gap
 * drops the view, in-order messages apply. Cache-aware routing: the longest match wins, the load
 * bound overrides it, ties follow the ring from the key, and a prefix no group holds goes where
 * consistent hashing (the prefix policy) sends it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>

#include "kv_index.h"
#include "router.h"

/* A chain of n distinct block names starting from seed. */
static void chain(uint64_t seed, uint64_t *h, int n)
{
    for (int i = 0; i < n; i++) {
        uint64_t z = seed * 0x9e3779b97f4a7c15ull + (uint64_t)i * 0xbf58476d1ce4e5b9ull + 1;
        z = (z ^ (z >> 31)) * 0x94d049bb133111ebull;
        h[i] = z ^ (z >> 29);
    }
}

static void test_stored_blocks_match_from_the_first_to_the_first_missing(void **state)
{
    (void)state;
    kv_index_t *ix = kv_index_new(1024, NULL);
    assert_non_null(ix);
    uint64_t h[8];
    chain(1, h, 8);
    for (int i = 0; i < 5; i++) kv_index_store(ix, 2, h[i]);
    kv_index_store(ix, 2, h[7]); /* after a gap: never reached */
    assert_int_equal(kv_index_match(ix, 2, h, 8), 5);
    assert_int_equal(kv_index_match(ix, 2, h, 3), 3);
    assert_int_equal(kv_index_match(ix, 1, h, 8), 0); /* another group holds none */
    assert_int_equal(kv_index_size(ix), 6);
    assert_int_equal(kv_index_group_size(ix, 2), 6);
    kv_index_store(ix, 2, h[0]); /* again: one entry */
    assert_int_equal(kv_index_size(ix), 6);
    /* Evicted in the middle: the match stops there. */
    kv_index_remove(ix, 2, h[2]);
    assert_int_equal(kv_index_match(ix, 2, h, 8), 2);
    kv_index_remove(ix, 2, h[2]); /* unknown: nothing happens */
    assert_int_equal(kv_index_size(ix), 5);
    /* The same block in two groups: two entries, each group's own. */
    kv_index_store(ix, 0, h[0]);
    assert_int_equal(kv_index_match(ix, 0, h, 8), 1);
    kv_index_remove(ix, 0, h[0]);
    assert_int_equal(kv_index_match(ix, 0, h, 8), 0);
    assert_int_equal(kv_index_match(ix, 2, h, 8), 2);
    kv_index_destroy(&ix);
    assert_null(ix);
    kv_index_destroy(&ix);
}

static void test_the_index_never_holds_more_than_its_bound_and_keeps_what_matches_use(void **state)
{
    (void)state;
    fl_error_t err = {0};
    assert_null(kv_index_new(0, &err));
    assert_int_equal(err.code, FL_EINVAL);
    kv_index_t *ix = kv_index_new(64, NULL);
    assert_int_equal(kv_index_capacity(ix), 64);
    uint64_t hot[8], cold[1000];
    chain(7, hot, 8);
    chain(8, cold, 1000);
    for (int i = 0; i < 8; i++) kv_index_store(ix, 0, hot[i]);
    for (int i = 0; i < 1000; i++) {
        kv_index_store(ix, 1 + i % 3, cold[i]);
        assert_true(kv_index_size(ix) <= 64);
        /* A prompt with the hot prefix keeps coming: its entries stay. */
        if (i % 8 == 0) assert_int_equal(kv_index_match(ix, 0, hot, 8), 8);
    }
    assert_int_equal(kv_index_size(ix), 64);
    assert_true(kv_index_evictions(ix) >= 1000 + 8 - 64);
    assert_int_equal(kv_index_match(ix, 0, hot, 8), 8);
    size_t sum = 0;
    for (int g = 0; g < 4; g++) sum += kv_index_group_size(ix, g);
    assert_int_equal(sum, 64);
    kv_index_destroy(&ix);
}

static void test_clearing_a_group_drops_its_entries_at_once_and_keeps_the_others(void **state)
{
    (void)state;
    kv_index_t *ix = kv_index_new(16, NULL);
    uint64_t a[8], b[8], c[8];
    chain(11, a, 8);
    chain(12, b, 8);
    chain(13, c, 8);
    for (int i = 0; i < 8; i++) {
        kv_index_store(ix, 0, a[i]);
        kv_index_store(ix, 1, b[i]);
    }
    assert_int_equal(kv_index_size(ix), 16);
    kv_index_clear_group(ix, 1); /* its worker restarted */
    assert_int_equal(kv_index_size(ix), 8);
    assert_int_equal(kv_index_group_size(ix, 1), 0);
    assert_int_equal(kv_index_match(ix, 1, b, 8), 0);
    assert_int_equal(kv_index_match(ix, 0, a, 8), 8);
    /* The stale entries make room first: group 2's blocks evict none of group 0's. */
    for (int i = 0; i < 8; i++) kv_index_store(ix, 2, c[i]);
    assert_int_equal(kv_index_evictions(ix), 0);
    assert_int_equal(kv_index_match(ix, 0, a, 8), 8);
    assert_int_equal(kv_index_match(ix, 2, c, 8), 8);
    /* The restarted group reports again: its new blocks count. */
    kv_index_store(ix, 1, b[0]);
    assert_int_equal(kv_index_match(ix, 1, b, 8), 1);
    kv_index_clear_group(ix, 0);
    kv_index_clear_group(ix, 0);
    assert_int_equal(kv_index_size(ix), 9);
    kv_index_destroy(&ix);
}

static void test_events_reset_replaces_the_view_and_a_sequence_gap_drops_it(void **state)
{
    (void)state;
    kv_index_t *ix = kv_index_new(1024, NULL);
    uint64_t h[8];
    chain(21, h, 8);
    /* seq 1, a reset with a snapshot of 4 blocks */
    assert_int_equal(kv_index_apply(ix, 3, 1, 1, h, 4, NULL, 0), 0);
    assert_int_equal(kv_index_match(ix, 3, h, 8), 4);
    /* seq 2: block 3 evicted, 4 and 5 stored */
    assert_int_equal(kv_index_apply(ix, 3, 2, 0, h + 4, 2, h + 3, 1), 0);
    assert_int_equal(kv_index_match(ix, 3, h, 8), 3);
    assert_int_equal(kv_index_group_size(ix, 3), 5);
    /* seq 4: 3 was lost, the view is dropped (5 blocks) and what 4 says applied */
    assert_int_equal(kv_index_apply(ix, 3, 4, 0, h + 6, 1, NULL, 0), 5);
    assert_int_equal(kv_index_group_size(ix, 3), 1);
    assert_int_equal(kv_index_match(ix, 3, h, 8), 0);
    /* a reset with another seq (a new connection) is taken as it is */
    assert_int_equal(kv_index_apply(ix, 3, 1, 1, h, 2, NULL, 0), 0);
    assert_int_equal(kv_index_group_size(ix, 3), 2);
    assert_int_equal(kv_index_match(ix, 3, h, 8), 2);
    /* after a clear (READY again) any seq is taken */
    kv_index_clear_group(ix, 3);
    assert_int_equal(kv_index_apply(ix, 3, 9, 0, h, 1, NULL, 0), 0);
    assert_int_equal(kv_index_match(ix, 3, h, 8), 1);
    assert_int_equal(kv_index_apply(ix, KV_INDEX_MAX_GROUPS, 1, 1, h, 1, NULL, 0), 0); /* out of range: ignored */
    kv_index_destroy(&ix);
}

/* ---- cache-aware routing ---- */

static const char *NAMES[] = {"g0", "g1", "g2", "g3"};

static router_t *make_router(router_policy_t p, router_group_t *t)
{
    router_t *r = router_new(p, 1.25, 4, NULL);
    assert_non_null(r);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(router_add_group(r, i, NAMES[i], NULL), 0);
        t[i] = (router_group_t){.name = NAMES[i], .routable = true};
    }
    return r;
}

/* Fills each group's cached_blocks for this prompt from the index, as dispatch.c does. */
static void fill_matches(kv_index_t *ix, router_group_t *t, const uint64_t *h, int n)
{
    for (int g = 0; g < 4; g++) t[g].cached_blocks = (uint32_t)kv_index_match(ix, g, h, n);
}

static void test_cache_aware_routes_to_the_longest_cached_prefix_under_the_load_bound(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *ca = make_router(ROUTER_CACHE_AWARE, t);
    router_t *px = make_router(ROUTER_PREFIX, t);
    kv_index_t *ix = kv_index_new(4096, NULL);
    uint64_t h[12];
    chain(31, h, 12);
    const uint64_t key = h[7]; /* the prefix policy's key: the 8th block */
    const int home = router_pick(px, key, t, 4, -1);
    /* Never seen: where consistent hashing sends it. */
    fill_matches(ix, t, h, 12);
    assert_int_equal(router_pick(ca, key, t, 4, -1), home);
    /* Two other groups hold 6 and 10 of its blocks: the longer wins. */
    const int a = (home + 1) % 4, b = (home + 2) % 4;
    for (int i = 0; i < 6; i++) kv_index_store(ix, a, h[i]);
    for (int i = 0; i < 10; i++) kv_index_store(ix, b, h[i]);
    fill_matches(ix, t, h, 12);
    assert_int_equal(t[b].cached_blocks, 10);
    assert_int_equal(router_pick(ca, key, t, 4, -1), b);
    /* b over the load bound (floor 4, nothing else in flight): the next longest under it. */
    t[b].inflight = 6;
    assert_int_equal(router_pick(ca, key, t, 4, -1), a);
    t[a].inflight = 6;
    /* both over: no other group holds any of it, so consistent hashing under the bound decides */
    const int fallback = router_pick(ca, key, t, 4, -1);
    assert_int_equal(fallback, router_pick(px, key, t, 4, -1));
    assert_true(fallback != a && fallback != b);
    t[a].inflight = t[b].inflight = 0;
    /* b drained, or excluded (a retry): a again */
    t[b].routable = false;
    assert_int_equal(router_pick(ca, key, t, 4, -1), a);
    t[b].routable = true;
    assert_int_equal(router_pick(ca, key, t, 4, b), a);
    /* A tie (every group holds the same first block, a shared system prompt): the ring decides, as
     * for the prefix policy. */
    for (int g = 0; g < 4; g++) t[g].cached_blocks = 1;
    assert_int_equal(router_pick(ca, key, t, 4, -1), router_pick(px, key, t, 4, -1));
    kv_index_destroy(&ix);
    router_destroy(&ca);
    router_destroy(&px);
}

static void test_cache_aware_places_a_new_prefix_where_it_was_placed_else_on_the_group_holding_fewest(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *ca = make_router(ROUTER_CACHE_AWARE, t);
    router_t *px = make_router(ROUTER_PREFIX, t);
    const uint64_t key = 0x5eed5eed5eedull;
    const int home = router_pick(px, key, t, 4, -1);
    /* An empty census: consistent hashing's pick. */
    assert_int_equal(router_pick(ca, key, t, 4, -1), home);
    /* home holds 3 of the recent prefixes, the others 1, 0, 0: one of the two emptiest, and the
     * first of them clockwise from the key is what prefix picks with the others over the bound. */
    const int a = (home + 1) % 4, b = (home + 2) % 4, d = (home + 3) % 4;
    t[home].prefixes = 3;
    t[a].prefixes = 1;
    const int p = router_pick(ca, key, t, 4, -1);
    assert_true(p == b || p == d);
    t[home].inflight = t[a].inflight = 6; /* floor 4: over the bound */
    const int first = router_pick(px, key, t, 4, -1);
    t[home].inflight = t[a].inflight = 0;
    assert_int_equal(p, first);
    /* The emptiest over the bound: the next emptiest under it. */
    t[p].inflight = 6;
    assert_int_equal(router_pick(ca, key, t, 4, -1), p == b ? d : b);
    t[p].inflight = 0;
    /* Placed lately on a (its blocks not reported yet): a, however full; not when a is over the
     * bound, or drained. */
    t[a].placed = true;
    assert_int_equal(router_pick(ca, key, t, 4, -1), a);
    t[a].inflight = 6;
    assert_int_equal(router_pick(ca, key, t, 4, -1), p);
    t[a].inflight = 0;
    t[a].routable = false;
    assert_int_equal(router_pick(ca, key, t, 4, -1), p);
    t[a].routable = true;
    /* A group that holds some of the prompt outranks both. */
    t[home].cached_blocks = 2;
    assert_int_equal(router_pick(ca, key, t, 4, -1), home);
    router_destroy(&ca);
    router_destroy(&px);
}

static void test_cache_aware_policy_name_round_trips(void **state)
{
    (void)state;
    router_policy_t p;
    assert_int_equal(router_policy_parse("cache-aware", &p), 0);
    assert_int_equal(p, ROUTER_CACHE_AWARE);
    assert_string_equal(router_policy_name(p), "cache-aware");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stored_blocks_match_from_the_first_to_the_first_missing),
        cmocka_unit_test(test_the_index_never_holds_more_than_its_bound_and_keeps_what_matches_use),
        cmocka_unit_test(test_clearing_a_group_drops_its_entries_at_once_and_keeps_the_others),
        cmocka_unit_test(test_events_reset_replaces_the_view_and_a_sequence_gap_drops_it),
        cmocka_unit_test(test_cache_aware_routes_to_the_longest_cached_prefix_under_the_load_bound),
        cmocka_unit_test(test_cache_aware_places_a_new_prefix_where_it_was_placed_else_on_the_group_holding_fewest),
        cmocka_unit_test(test_cache_aware_policy_name_round_trips),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
