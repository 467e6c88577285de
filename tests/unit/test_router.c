/* test_router.c - the coordinator's routing policies (coordinator/router.c): prefix affinity,
 * the bounded-load spill, health and drain respected, round-robin, least-loaded, and an even spread
 * of distinct prefixes. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "router.h"

static const char *NAMES[] = {"g0", "g1", "g2", "g3", "g4", "g5", "g6", "g7"};

static router_t *make_router(router_policy_t p, int n_groups, router_group_t *table)
{
    router_t *r = router_new(p, 1.25, 1, NULL);
    assert_non_null(r);
    for (int i = 0; i < n_groups; i++) {
        assert_int_equal(router_add_group(r, i, NAMES[i], NULL), 0);
        table[i] = (router_group_t){.name = NAMES[i], .routable = true};
    }
    return r;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t prompt_key(const int32_t *tokens, int n, int route_blocks)
{
    block_hash_t h[64];
    const block_hash_t salt = block_hash_salt(NULL, 0);
    const int nh = block_hash_prefix(salt, tokens, n, 16, h, 64);
    return router_key(h, nh, route_blocks, salt, tokens, n);
}

static void test_prefix_sends_equal_leading_blocks_to_the_same_group(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *r = make_router(ROUTER_PREFIX, 4, t);
    int32_t a[200], b[200];
    int same_group_pairs = 0, groups_seen = 0, seen[4] = {0};
    for (int trial = 0; trial < 50; trial++) {
        /* 8 shared blocks (128 tokens), then different tails. */
        for (int i = 0; i < 200; i++) a[i] = b[i] = trial * 1000 + i;
        for (int i = 128; i < 200; i++) b[i] = 77777 + i;
        assert_true(prompt_key(a, 200, 8) == prompt_key(b, 140, 8));
        const int ga = router_pick(r, prompt_key(a, 200, 8), t, 4, -1);
        const int gb = router_pick(r, prompt_key(b, 140, 8), t, 4, -1);
        same_group_pairs += ga == gb;
        if (!seen[ga]++) groups_seen++;
    }
    assert_int_equal(same_group_pairs, 50);
    assert_true(groups_seen >= 3); /* different prefixes do spread */
    router_destroy(&r);
    assert_null(r);
}

static void test_key_is_the_block_at_route_depth_or_the_token_hash_without_a_full_block(void **state)
{
    (void)state;
    int32_t t[40];
    for (int i = 0; i < 40; i++) t[i] = i + 1;
    block_hash_t h[4];
    const block_hash_t salt = block_hash_salt("acme", 4);
    const int nh = block_hash_prefix(salt, t, 40, 16, h, 4);
    assert_int_equal(nh, 2);
    assert_true(router_key(h, nh, 8, salt, t, 40) == h[1].lo);
    assert_true(router_key(h, nh, 1, salt, t, 40) == h[0].lo);
    assert_true(router_key(h, 0, 8, salt, t, 5) == block_hash_next(salt, t, 5).lo);
    /* Tenants never share a key for the same tokens. */
    assert_true(prompt_key(t, 40, 8) != router_key(h, nh, 8, salt, t, 40));
}

static void test_prefix_spills_to_another_group_over_the_load_bound(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *r = make_router(ROUTER_PREFIX, 4, t);
    const uint64_t key = 0x123456789abcdefull;
    const int home = router_pick(r, key, t, 4, -1);
    t[home].inflight = 10; /* bound = ceil(1.25 * 11 / 4) = 4 */
    const int other = router_pick(r, key, t, 4, -1);
    assert_int_not_equal(other, home);
    for (int i = 0; i < 4; i++) t[i].inflight = 3; /* bound = ceil(1.25 * 13 / 4) = 5: affinity wins again */
    assert_int_equal(router_pick(r, key, t, 4, -1), home);
    /* A hot prefix: every request has the same key, and no group ever exceeds the bound. */
    for (int i = 0; i < 4; i++) t[i].inflight = 0;
    uint32_t total = 0;
    for (int n = 0; n < 1000; n++) {
        const int g = router_pick(r, key, t, 4, -1);
        const double bound = ceil(1.25 * (total + 1) / 4.0);
        assert_true(t[g].inflight < bound);
        t[g].inflight++;
        total++;
    }
    for (int i = 0; i < 4; i++) assert_true(t[i].inflight <= (uint32_t)ceil(1.25 * 1000 / 4.0));
    router_destroy(&r);
}

static void test_prefix_keeps_affinity_below_the_load_floor(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *r = router_new(ROUTER_PREFIX, 1.25, 4, NULL);
    assert_non_null(r);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(router_add_group(r, i, NAMES[i], NULL), 0);
        t[i] = (router_group_t){.name = NAMES[i], .routable = true};
    }
    const uint64_t key = 0xfeedfacecafebeefull;
    const int home = router_pick(r, key, t, 4, -1);
    /* Light load: the plain bound would be ceil(1.25 * 4 / 4) = 2; the floor keeps the prefix home. */
    t[home].inflight = 3;
    assert_int_equal(router_pick(r, key, t, 4, -1), home);
    /* At the floor it spills. */
    t[home].inflight = 4;
    assert_int_not_equal(router_pick(r, key, t, 4, -1), home);
    /* Heavy load: the proportional bound rules (all at 10: ceil(1.25 * 41 / 4) = 13 > 10, home stays;
     * home at 15: ceil(1.25 * 46 / 4) = 15, full, it spills). */
    for (int i = 0; i < 4; i++) t[i].inflight = 10;
    assert_int_equal(router_pick(r, key, t, 4, -1), home);
    t[home].inflight = 15;
    assert_int_not_equal(router_pick(r, key, t, 4, -1), home);
    router_destroy(&r);
}

static void test_unhealthy_draining_and_excluded_groups_are_never_picked(void **state)
{
    (void)state;
    const router_policy_t policies[] = {ROUTER_PREFIX, ROUTER_ROUND_ROBIN, ROUTER_LEAST_LOADED};
    for (int p = 0; p < 3; p++) {
        router_group_t t[4];
        router_t *r = make_router(policies[p], 4, t);
        t[1].routable = false; /* unhealthy */
        t[3].routable = false; /* draining */
        uint64_t s = 1;
        for (int n = 0; n < 2000; n++) {
            const int g = router_pick(r, splitmix(&s), t, 4, n % 2 ? 2 : -1);
            assert_true(g == 0 || (g == 2 && n % 2 == 0));
        }
        t[0].routable = t[2].routable = false;
        assert_int_equal(router_pick(r, 42, t, 4, -1), -1);
        router_destroy(&r);
    }
}

static void test_round_robin_cycles_through_routable_groups(void **state)
{
    (void)state;
    router_group_t t[3];
    router_t *r = make_router(ROUTER_ROUND_ROBIN, 3, t);
    int first = router_pick(r, 0, t, 3, -1);
    for (int n = 1; n < 9; n++) assert_int_equal(router_pick(r, 0, t, 3, -1), (first + n) % 3);
    t[1].routable = false;
    int counts[3] = {0};
    for (int n = 0; n < 10; n++) counts[router_pick(r, 0, t, 3, -1)]++;
    assert_int_equal(counts[1], 0);
    assert_int_equal(counts[0], 5);
    assert_int_equal(counts[2], 5);
    router_destroy(&r);
}

static void test_least_loaded_picks_the_minimum_with_ties_by_name(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *r = make_router(ROUTER_LEAST_LOADED, 4, t);
    t[0].inflight = 5;
    t[1].inflight = 2;
    t[2].inflight = 7;
    t[3].inflight = 2;
    assert_int_equal(router_pick(r, 0, t, 4, -1), 1); /* g1 and g3 tie: g1 by name */
    t[1].inflight = 3;
    assert_int_equal(router_pick(r, 0, t, 4, -1), 3);
    router_destroy(&r);
}

static void test_prefix_spreads_distinct_keys_evenly_over_four_groups(void **state)
{
    (void)state;
    router_group_t t[4];
    router_t *r = make_router(ROUTER_PREFIX, 4, t);
    int counts[4] = {0};
    uint64_t s = 7;
    const int n = 40000;
    for (int i = 0; i < n; i++) counts[router_pick(r, splitmix(&s), t, 4, -1)]++; /* loads stay 0: pure ring */
    for (int g = 0; g < 4; g++) {
        const double share = (double)counts[g] / n;
        print_message("group %d share %.3f\n", g, share);
        assert_true(share > 0.15 && share < 0.35);
    }
    router_destroy(&r);
}

static void test_policy_names_round_trip_and_bad_arguments_fail(void **state)
{
    (void)state;
    router_policy_t p = ROUTER_PREFIX;
    const char *names[] = {"prefix", "round-robin", "least-loaded"};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(router_policy_parse(names[i], &p), 0);
        assert_string_equal(router_policy_name(p), names[i]);
    }
    assert_int_equal(router_policy_parse("random", &p), FL_EINVAL);
    fl_error_t err = {0};
    assert_null(router_new(ROUTER_PREFIX, 0.5, 1, &err));
    assert_int_equal(err.code, FL_EINVAL);
    router_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefix_sends_equal_leading_blocks_to_the_same_group),
        cmocka_unit_test(test_key_is_the_block_at_route_depth_or_the_token_hash_without_a_full_block),
        cmocka_unit_test(test_prefix_spills_to_another_group_over_the_load_bound),
        cmocka_unit_test(test_prefix_keeps_affinity_below_the_load_floor),
        cmocka_unit_test(test_unhealthy_draining_and_excluded_groups_are_never_picked),
        cmocka_unit_test(test_round_robin_cycles_through_routable_groups),
        cmocka_unit_test(test_least_loaded_picks_the_minimum_with_ties_by_name),
        cmocka_unit_test(test_prefix_spreads_distinct_keys_evenly_over_four_groups),
        cmocka_unit_test(test_policy_names_round_trip_and_bad_arguments_fail),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
