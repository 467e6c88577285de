/* test_kv_routing.c - cache-aware routing end to end: 2 groups on a tiny random model, the
 * coordinator on --policy cache-aware, the workers reporting their prefix caches (KV_EVENTS).
 *
 * Protects: a worker's stored blocks reach the coordinator's index (Status: the group's
 * kv_index_blocks and the index's size); prompts that share only their first 4 blocks with a
 * cached prompt, whose routing keys (the 8th block) differ and would scatter under consistent
 * hashing, all go to the group holding those blocks and hit its prefix cache (Status counts them
 * routed by cache); the group's death drops its entries from the index, and its prompts then go to
 * the group left. */
#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;

E2E_MODEL_FIXTURES(g_env, "kvroute")

static int test_teardown(void **state)
{
    (void)state;
    e2e_cluster_stop(&g_cluster);
    return 0;
}

/* Status figures: the index's entries, the blocks group `name` has in it, requests routed by cache. */
static void index_figures(folio_client_t *ctl, const char *name, uint64_t *entries, uint64_t *group_blocks,
                          uint64_t *by_cache)
{
    Folio__V1__Response *r = e2e_status(ctl);
    const Folio__V1__GroupStatus *g = e2e_group(r, name);
    assert_non_null(g);
    *entries = r->cluster->kv_index_entries;
    *group_blocks = g->kv_index_blocks;
    *by_cache = r->cluster->routed_by_cache;
    assert_true(r->cluster->kv_index_capacity > 0);
    assert_string_equal(r->cluster->policy, "cache-aware");
    folio__v1__response__free_unpacked(r, NULL);
}

/* Polls Status until group `name` has at least (or, when at_most, at most) n blocks indexed. */
static bool wait_blocks(folio_client_t *ctl, const char *name, uint64_t n, bool at_most, int wait_ms)
{
    const double t0 = e2e_now_ms();
    for (;;) {
        uint64_t entries, blocks, by_cache;
        index_figures(ctl, name, &entries, &blocks, &by_cache);
        if (at_most ? blocks <= n : blocks >= n) return true;
        if (e2e_now_ms() - t0 > wait_ms) {
            fprintf(stderr, "[e2e] kvroute: %s has %llu blocks indexed\n", name, (unsigned long long)blocks);
            return false;
        }
        e2e_sleep_ms(50);
    }
}

static void generate_on(folio_client_t *c, const int32_t *toks, int n, folio_result_t *res)
{
    folio_generate_params_t p = {.tokens = toks, .n_tokens = n, .max_tokens = 2, .ignore_eos = true};
    e2e_generate(c, &p, FOLIO__V1__STATUS_CODE__OK, res);
}

static void cached_prefixes_draw_their_requests_and_a_dead_groups_entries_go(void **state)
{
    (void)state;
    static const char *const wargs[] = {"--kv-events-ms", "20", NULL};
    const cluster_opts_t o = {.policy = "cache-aware", .worker_args = wargs};
    g_cluster = e2e_cluster_start(&g_env, "kvroute", 2, &o);
    folio_client_t *ctl = e2e_client(g_cluster);

    /* A 12-block prompt (16-token blocks): its group caches and reports 12 blocks at least. */
    enum { BS = 16, BASE = 12 * BS, SHARED = 4 * BS };
    int32_t base[BASE], q[BASE];
    e2e_prompt_tokens(1, BASE, base);
    folio_result_t res = {0};
    generate_on(ctl, base, BASE, &res);
    char home[64];
    snprintf(home, sizeof home, "%s", res.group);
    folio_result_clear(&res);
    const char *other = strcmp(home, "g0") ? "g0" : "g1";
    if (!wait_blocks(ctl, home, 12, false, e2e_ms(5000))) fail_msg("%s's blocks never reached the index", home);
    uint64_t entries, blocks, by_cache0, by_cache;
    index_figures(ctl, home, &entries, &blocks, &by_cache0);
    fprintf(stderr, "[e2e] kvroute: %s holds the prompt, %llu blocks indexed (%llu in all)\n", home,
            (unsigned long long)blocks, (unsigned long long)entries);
    assert_true(entries >= blocks);

    /* Prompts sharing only the first 4 blocks: keys (block 8) differ, the cached group takes them. */
    enum { N = 6 };
    for (int i = 0; i < N; i++) {
        memcpy(q, base, SHARED * sizeof *q);
        e2e_prompt_tokens(100 + (uint32_t)i, BASE - SHARED, q + SHARED);
        generate_on(ctl, q, BASE, &res);
        if (strcmp(res.group, home))
            fail_msg("prompt %d sharing 4 blocks with %s's went to %s", i, home, res.group);
        if (res.cached_prompt_tokens < SHARED)
            fail_msg("prompt %d: %u cached prompt tokens, expected at least %d", i, res.cached_prompt_tokens, SHARED);
        folio_result_clear(&res);
    }
    index_figures(ctl, home, &entries, &blocks, &by_cache);
    assert_true(by_cache - by_cache0 >= N);

    /* The group dies: its entries leave the index, and the prompt goes to the group left. */
    const int wi = home[1] - '0';
    assert_true(g_cluster->workers[wi] > 0);
    kill(g_cluster->workers[wi], SIGKILL);
    if (!wait_blocks(ctl, home, 0, true, e2e_ms(5000))) fail_msg("the dead %s's blocks stayed in the index", home);
    generate_on(ctl, base, BASE, &res);
    assert_string_equal(res.group, other);
    folio_result_clear(&res);
    folio_client_destroy(&ctl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(cached_prefixes_draw_their_requests_and_a_dead_groups_entries_go, test_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
