/* test_spec.c - speculative decoding's parts: draft trees, the n-gram drafter, Medusa tree shapes,
 * the acceptance walk and the step-cost table. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "spec.h"

static void tree_masks_are_ancestors_and_self(void **state)
{
    (void)state;
    spec_tree_t t;
    spec_tree_init(&t, 7);
    const int a = spec_tree_add(&t, 0, 10), b = spec_tree_add(&t, 0, 11), c = spec_tree_add(&t, a, 12);
    assert_int_equal(a, 1);
    assert_int_equal(b, 2);
    assert_int_equal(c, 3);
    assert_int_equal(spec_tree_add(&t, 0, 10), a); /* the same child once */
    assert_int_equal(t.n, 4);
    assert_true(t.mask[0] == 0x1 && t.mask[a] == 0x3 && t.mask[b] == 0x5 && t.mask[c] == 0xB);
    assert_int_equal(t.depth[c], 2);
    assert_false(spec_tree_is_chain(&t));
    spec_tree_t chain;
    spec_tree_init(&chain, 1);
    for (int k = 0; k < 5; k++) spec_tree_add(&chain, k, 100 + k);
    assert_true(spec_tree_is_chain(&chain));
    while (chain.n < SPEC_MAX_NODES) spec_tree_add(&chain, chain.n - 1, 200 + chain.n);
    assert_int_equal(spec_tree_add(&chain, 0, 999), -1); /* full */
}

/* Pruning keeps the order, drops a rejected node's whole subtree and rebuilds the masks. */
static void keep_drops_subtrees_and_renumbers(void **state)
{
    (void)state;
    spec_tree_t t;
    spec_tree_init(&t, 7);
    const int a = spec_tree_add(&t, 0, 10), b = spec_tree_add(&t, 0, 11), c = spec_tree_add(&t, a, 12);
    const int d = spec_tree_add(&t, b, 13), e = spec_tree_add(&t, d, 14);
    bool keep[SPEC_MAX_NODES] = {true, false, true, true, true, true}; /* a out: c goes with it */
    int map[SPEC_MAX_NODES];
    spec_tree_keep(&t, keep, map);
    assert_int_equal(t.n, 4);
    assert_int_equal(map[a], -1);
    assert_int_equal(map[c], -1);
    assert_int_equal(map[b], 1);
    assert_int_equal(map[d], 2);
    assert_int_equal(map[e], 3);
    assert_true(t.token[1] == 11 && t.token[2] == 13 && t.token[3] == 14);
    assert_true(t.parent[1] == 0 && t.parent[2] == 1 && t.parent[3] == 2);
    assert_true(t.mask[1] == 0x3 && t.mask[2] == 0x7 && t.mask[3] == 0xF);
    assert_int_equal(t.depth[3], 3);
    assert_true(spec_tree_is_chain(&t));
}

static void ngram_proposes_the_latest_match_continuation(void **state)
{
    (void)state;
    int32_t out[8];
    /* ... 5 6 7 8 9 ... 5 6 7 8 4 ... 5 6 7: the latest "5 6 7" went on with 8 4 */
    const int32_t toks[] = {1, 5, 6, 7, 8, 9, 2, 5, 6, 7, 8, 4, 3, 5, 6, 7};
    const int n = (int)(sizeof toks / sizeof toks[0]);
    int k = spec_ngram_draft(toks, n, 8, out);
    assert_int_equal(k, 6); /* to the end of what exists */
    assert_int_equal(out[0], 8);
    assert_int_equal(out[1], 4);
    assert_int_equal(out[2], 3);
    assert_int_equal(spec_ngram_draft(toks, n, 2, out), 2); /* bounded by max_len */
    /* no repeated suffix: nothing */
    const int32_t fresh[] = {1, 2, 3, 4, 5, 6};
    assert_int_equal(spec_ngram_draft(fresh, 6, 4, out), 0);
    /* a one-token repeat is not enough (SPEC_NGRAM_MIN = 2) */
    const int32_t one[] = {9, 1, 2, 9};
    assert_int_equal(spec_ngram_draft(one, 4, 4, out), 0);
    /* the longest suffix wins: "2 3" alone last went on with 7, "1 2 3" with 5 */
    const int32_t longest[] = {1, 2, 3, 5, 0, 2, 3, 7, 0, 1, 2, 3};
    k = spec_ngram_draft(longest, 12, 1, out);
    assert_int_equal(k, 1);
    assert_int_equal(out[0], 5);
    assert_int_equal(spec_ngram_draft(longest, 12, 0, out), 0);
}

/* A check that rejects token 9 anywhere (an automaton that never allows it). */
static int no_nines(void *user, const int32_t *draft, int n)
{
    (*(int *)user)++;
    int k = 0;
    while (k < n && draft[k] != 9) k++;
    return k;
}

static void checked_ngram_proposes_only_what_the_check_allows(void **state)
{
    (void)state;
    int calls = 0;
    int32_t out[8];
    /* the latest match of "1 2" continues with 9 (rejected): the earlier one, 5 6, is taken */
    const int32_t toks[] = {1, 2, 5, 6, 9, 1, 2, 9, 3, 1, 2};
    const int n = (int)(sizeof toks / sizeof toks[0]);
    assert_int_equal(spec_ngram_draft(toks, n, 2, out), 2);
    assert_int_equal(out[0], 9);
    assert_int_equal(spec_ngram_draft_checked(toks, n, 4, out, no_nines, &calls), 2);
    assert_int_equal(out[0], 5);
    assert_int_equal(out[1], 6); /* cut before the 9 after it */
    assert_true(calls >= 2);
    /* without a check: spec_ngram_draft */
    assert_int_equal(spec_ngram_draft_checked(toks, n, 4, out, NULL, NULL), spec_ngram_draft(toks, n, 4, out));
    /* every continuation rejected: nothing (a one-token suffix, 2 then 9, does not count either) */
    const int32_t all9[] = {1, 2, 9, 4, 2, 5, 1, 2};
    assert_int_equal(spec_ngram_draft(all9, 8, 4, out), 4);
    assert_int_equal(out[0], 9);
    assert_int_equal(spec_ngram_draft_checked(all9, 8, 4, out, no_nines, &calls), 0);
}

/* A head with fewer candidates than ranks (-1 past them) gives no path through them. */
static void medusa_tree_skips_missing_candidates(void **state)
{
    (void)state;
    const spec_paths_t *p = spec_paths_default();
    int32_t cand[3 * 4];
    for (int k = 0; k < 3; k++)
        for (int r = 0; r < 4; r++) cand[k * 4 + r] = r == 0 ? 100 + k : -1;
    spec_tree_t t;
    spec_tree_medusa(&t, 7, cand, 3, 4, p, SPEC_MAX_NODES);
    assert_int_equal(t.n, 4); /* the root and one chain of the best candidates */
    for (int k = 1; k < t.n; k++) {
        assert_int_equal(t.token[k], 100 + k - 1);
        assert_int_equal(t.parent[k], k - 1);
    }
}

static void paths_parse_and_reject_bad_shapes(void **state)
{
    (void)state;
    spec_paths_t p;
    char why[128];
    assert_int_equal(spec_paths_parse("0;1;0,0;0,1;1,0;0,0,0", &p, why, sizeof why), 0);
    assert_int_equal(p.n, 6);
    assert_int_equal(p.max_rank, 2);
    assert_int_equal(p.max_depth, 3);
    assert_int_not_equal(spec_paths_parse("0,0;0", &p, why, sizeof why), 0); /* prefix after */
    assert_non_null(strstr(why, "prefix"));
    assert_int_not_equal(spec_paths_parse("0;x", &p, why, sizeof why), 0);
    assert_int_not_equal(spec_paths_parse("", &p, why, sizeof why), 0);
    assert_int_not_equal(spec_paths_parse("0;99", &p, why, sizeof why), 0);
    const spec_paths_t *d = spec_paths_default();
    assert_true(d->n >= 8 && d->max_depth <= 3);
}

static void medusa_tree_follows_the_paths(void **state)
{
    (void)state;
    spec_paths_t p;
    char why[128];
    assert_int_equal(spec_paths_parse("0;0,0;1;0,1;0,0,0;1,0", &p, why, sizeof why), 0);
    /* cand[head][rank]: head 0 -> 10, 11; head 1 -> 20, 21; head 2 -> 30, 31 */
    const int32_t cand[] = {10, 11, 20, 21, 30, 31};
    spec_tree_t t;
    spec_tree_medusa(&t, 5, cand, 3, 2, &p, SPEC_MAX_NODES);
    assert_int_equal(t.n, 7);
    assert_int_equal(t.token[0], 5);
    assert_int_equal(t.token[1], 10); /* 0 */
    assert_int_equal(t.token[2], 20); /* 0,0 */
    assert_int_equal(t.parent[2], 1);
    assert_int_equal(t.token[3], 11); /* 1 */
    assert_int_equal(t.parent[3], 0);
    assert_int_equal(t.token[4], 21); /* 0,1 */
    assert_int_equal(t.token[5], 30); /* 0,0,0 */
    assert_int_equal(t.depth[5], 3);
    assert_int_equal(t.token[6], 20); /* 1,0 */
    assert_int_equal(t.parent[6], 3);
    /* two heads: the depth-3 path is skipped; max_nodes cuts the list */
    spec_tree_medusa(&t, 5, cand, 2, 3, &p, 4);
    assert_int_equal(t.n, 4);
}

static void walk_emits_samples_along_accepted_children(void **state)
{
    (void)state;
    spec_tree_t t;
    spec_tree_init(&t, 1);
    spec_tree_add(&t, 0, 10); /* 1 */
    spec_tree_add(&t, 0, 11); /* 2 */
    spec_tree_add(&t, 2, 12); /* 3 */
    spec_tree_add(&t, 3, 13); /* 4 */
    int32_t out[SPEC_MAX_NODES];
    int nodes[SPEC_MAX_NODES];
    /* root samples 11 (node 2), node 2 samples 12 (node 3), node 3 samples 99: rejected there */
    const int32_t sampled[] = {11, 0, 12, 99, 0};
    assert_int_equal(spec_walk(&t, sampled, out, nodes), 3);
    assert_int_equal(out[0], 11);
    assert_int_equal(out[1], 12);
    assert_int_equal(out[2], 99);
    assert_int_equal(nodes[0], 2);
    assert_int_equal(nodes[1], 3);
    /* the root rejects everything: one token, the model's own */
    const int32_t none[] = {42, 0, 0, 0, 0};
    assert_int_equal(spec_walk(&t, none, out, nodes), 1);
    assert_int_equal(out[0], 42);
    /* every draft accepted: the last node's sample is the bonus token */
    const int32_t all[] = {11, 0, 12, 13, 77};
    assert_int_equal(spec_walk(&t, all, out, nodes), 4);
    assert_int_equal(out[3], 77);
}

static void cost_table_interpolates_and_guesses_beyond(void **state)
{
    (void)state;
    spec_cost_t c;
    memset(&c, 0, sizeof c);
    assert_true(spec_cost_s(&c, 4) == 0); /* nothing measured */
    spec_cost_observe(&c, 1, 0.010);
    /* beyond: half the measured per-token cost per extra token */
    assert_true(spec_cost_s(&c, 3) > 0.0199 && spec_cost_s(&c, 3) < 0.0201);
    spec_cost_observe(&c, 8, 0.020);
    const double mid = spec_cost_s(&c, 4);
    assert_true(mid > 0.010 && mid < 0.020);
    /* recent steps weigh most, over about 20 of them: one slow step moves the estimate by 5% */
    spec_cost_observe(&c, 8, 0.040);
    assert_true(spec_cost_s(&c, 8) > 0.0209 && spec_cost_s(&c, 8) < 0.0211);
    for (int i = 0; i < 100; i++) spec_cost_observe(&c, 8, 0.040);
    assert_true(spec_cost_s(&c, 8) > 0.039);
    /* a larger size measured cheaper (noise): the estimate never falls below the smaller size's */
    for (int i = 0; i < 200; i++) spec_cost_observe(&c, 2, 0.050);
    for (int k = 2; k < 12; k++) assert_true(spec_cost_s(&c, k + 1) >= spec_cost_s(&c, k) - 1e-12);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(tree_masks_are_ancestors_and_self),
        cmocka_unit_test(keep_drops_subtrees_and_renumbers),
        cmocka_unit_test(ngram_proposes_the_latest_match_continuation),
        cmocka_unit_test(checked_ngram_proposes_only_what_the_check_allows),
        cmocka_unit_test(medusa_tree_skips_missing_candidates),
        cmocka_unit_test(paths_parse_and_reject_bad_shapes),
        cmocka_unit_test(medusa_tree_follows_the_paths),
        cmocka_unit_test(walk_emits_samples_along_accepted_children),
        cmocka_unit_test(cost_table_interpolates_and_guesses_beyond),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
