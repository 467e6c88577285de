/* test_families.c - the serving features on every model family, end to end: for each
 * architecture folio-mkmodel writes (llama, qwen2, qwen3, mistral, phi3, gemma2, gemma3), a tiny
 * random model (2 layers, dim 128, Q8_0; a 32-token sliding window where the family has one, so
 * the contexts here run past it) served by a coordinator and one worker.
 *
 * Protects, per family: the prefix cache (the same prompt twice: the second reports cached prompt
 * tokens and gives the same greedy tokens); batching (4 requests in flight at once give the greedy
 * tokens each gives alone); n-gram speculation (a repetitive prompt drafts tokens, and the greedy
 * output equals the one without speculation). The forward passes themselves are checked against
 * llama.cpp in tests/unit/test_model_families.c; this test checks the cluster around them. */
#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;

enum { N_LAYERS = 2, DIM = 128, WINDOW = 32, GEN = 24 };

static int test_teardown(void **state)
{
    (void)state;
    e2e_cluster_stop(&g_cluster);
    unlink(g_env.model);
    return 0;
}

static void make_family_model(const char *arch)
{
    snprintf(g_env.model, sizeof g_env.model, "/tmp/folio-e2e-fam-%s-%d.gguf", arch, (int)getpid());
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.arch = arch;
    p.n_layers = N_LAYERS;
    p.dim = DIM;
    p.ff = 2 * DIM;
    p.n_heads = 4;
    p.n_kv_heads = 2;
    p.vocab = E2E_VOCAB;
    p.ctx = 512;
    p.type = FL_TYPE_Q8_0;
    p.seed = 18;
    if (!strcmp(arch, "mistral") || !strncmp(arch, "gemma", 5)) p.sliding_window = WINDOW;
    if (e2e_write_model(g_env.model, &p)) fail_msg("%s: cannot write the model", arch);
}

static folio_generate_params_t greedy(const int32_t *toks, int n, int spec)
{
    folio_generate_params_t p = {.tokens = toks, .n_tokens = n, .max_tokens = GEN, .ignore_eos = true, .spec = spec};
    if (spec == FOLIO__V1__SPEC_MODE__SPEC_NGRAM) p.max_draft = 4;
    return p;
}

static void same_tokens(const char *arch, const char *what, const int32_t *a, int na, const int32_t *b, int nb)
{
    if (e2e_tokens_equal(a, na, b, nb)) return;
    int at = 0;
    while (at < na && at < nb && a[at] == b[at]) at++;
    fail_msg("%s: %s: %d tokens vs %d, first difference at %d", arch, what, na, nb, at);
}

static void serve_family(const char *arch)
{
    const double t0 = e2e_now_ms();
    make_family_model(arch);
    const cluster_opts_t o = {.block_size = 16};
    g_cluster = e2e_cluster_start(&g_env, arch, 1, &o);
    folio_client_t *ctl = e2e_client(g_cluster);
    const int none = FOLIO__V1__SPEC_MODE__SPEC_NONE;

    /* Prefix cache: 3 blocks of prompt, sent twice. */
    enum { PLEN = 48 };
    int32_t prompt[PLEN];
    e2e_prompt_tokens(7, PLEN, prompt);
    folio_result_t first = {0}, again = {0};
    folio_generate_params_t p = greedy(prompt, PLEN, none);
    e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &first);
    e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &again);
    assert_int_equal(first.n_tokens, GEN);
    if (again.cached_prompt_tokens == 0) fail_msg("%s: the same prompt again: no cached prompt tokens", arch);
    same_tokens(arch, "the prompt again (cached)", first.tokens, first.n_tokens, again.tokens, again.n_tokens);
    const unsigned cached = again.cached_prompt_tokens;
    folio_result_clear(&first);
    folio_result_clear(&again);

    /* Batching: 4 prompts of different lengths in flight at once, then each alone. */
    enum { NB = 4 };
    static const int lens[NB] = {20, 37, 52, 9};
    int32_t bp[NB][64];
    folio_client_t *cl[NB];
    e2e_tracker_t tr = {0};
    for (int i = 0; i < NB; i++) {
        e2e_prompt_tokens(100 + (uint32_t)i, lens[i], bp[i]);
        cl[i] = e2e_client(g_cluster);
        const folio_generate_params_t q = greedy(bp[i], lens[i], none);
        e2e_send_generate(&tr, i, cl[i], &q, i);
    }
    e2e_pump(&tr, cl, NB, e2e_ms(30000));
    e2e_assert_invariant(&tr, arch);
    for (int i = 0; i < tr.n; i++) {
        const e2e_req_t *r = &tr.reqs[i];
        if (r->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("%s: batched request %d: %s", arch, r->tag, r->message);
        folio_result_t alone = {0};
        const folio_generate_params_t q = greedy(bp[r->tag], lens[r->tag], none);
        e2e_generate(ctl, &q, FOLIO__V1__STATUS_CODE__OK, &alone);
        same_tokens(arch, "batched vs alone", r->tokens, r->n_tokens, alone.tokens, alone.n_tokens);
        folio_result_clear(&alone);
    }
    e2e_tracker_free(&tr);
    for (int i = 0; i < NB; i++) folio_client_destroy(&cl[i]);

    /* N-gram speculation: a 12-token phrase 5 times over; a draft needs the model to follow the
     * phrase at least twice, which a random model does for some phrases: up to 4 are tried, each
     * must equal its output without speculation, and some must draft. */
    enum { PH = 12, REP = 5 };
    int32_t rep[PH * REP];
    unsigned drafted = 0, accepted = 0;
    for (uint32_t seed = 31; seed < 35 && drafted == 0; seed++) {
        e2e_prompt_tokens(seed, PH, rep);
        for (int k = 1; k < REP; k++) memcpy(rep + k * PH, rep, PH * sizeof *rep);
        folio_result_t plain = {0}, spec = {0};
        p = greedy(rep, PH * REP, none);
        e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &plain);
        p = greedy(rep, PH * REP, FOLIO__V1__SPEC_MODE__SPEC_NGRAM);
        e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &spec);
        same_tokens(arch, "n-gram vs plain", spec.tokens, spec.n_tokens, plain.tokens, plain.n_tokens);
        drafted += spec.drafted_tokens, accepted += spec.accepted_tokens;
        folio_result_clear(&plain);
        folio_result_clear(&spec);
    }
    /* Whether drafts are made at all is the draft planner's call from measured step costs (slow
     * builds may judge them not worth it): equality above is the check; no drafts is reported. */
    if (drafted == 0) fprintf(stderr, "[e2e] %s: warning: n-gram speculation on 4 repetitive prompts drafted nothing\n", arch);
    fprintf(stderr, "[e2e] %s: cached %u prompt tokens; batch of %d equal alone; n-gram drafted %u accepted %u, equal plain (%.0f ms)\n",
            arch, cached, NB, drafted, accepted, e2e_now_ms() - t0);
    folio_client_destroy(&ctl);
}

static void llama_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("llama"); }
static void qwen2_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("qwen2"); }
static void qwen3_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("qwen3"); }
static void mistral_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("mistral"); }
static void phi3_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("phi3"); }
static void gemma2_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("gemma2"); }
static void gemma3_serves_with_cache_batching_and_ngram(void **state) { (void)state; serve_family("gemma3"); }

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(llama_serves_with_cache_batching_and_ngram, test_teardown),
        cmocka_unit_test_teardown(qwen2_serves_with_cache_batching_and_ngram, test_teardown),
        cmocka_unit_test_teardown(qwen3_serves_with_cache_batching_and_ngram, test_teardown),
        cmocka_unit_test_teardown(mistral_serves_with_cache_batching_and_ngram, test_teardown),
        cmocka_unit_test_teardown(phi3_serves_with_cache_batching_and_ngram, test_teardown),
        cmocka_unit_test_teardown(gemma2_serves_with_cache_batching_and_ngram, test_teardown),
        cmocka_unit_test_teardown(gemma3_serves_with_cache_batching_and_ngram, test_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
