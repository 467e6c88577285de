/* test_tp.c - tensor-parallel worker groups end to end: a coordinator and groups of two worker
 * processes each (folio-worker --rank R --tp 2, as `folioctl up --tp 2` starts them) on a tiny random
 * model (e2e_util.h), the ranks joined by the host transport.
 *
 * Protects: the group registers both ranks, becomes healthy only once they have joined, and Status
 * lists both (rank_status); greedy outputs equal TP=1's (the same engine in this process) under
 * concurrent load with n-gram speculation, prefix-cache hits and preemption (a KV cache too small
 * for the batch), except where TP=1's top-1/top-2 margin is below the tie (test_tp.c states the
 * bound); kill -9 of one rank of a group under load: every request ends exactly once and OK (moved
 * to the other group), the group leaves routing, and its surviving rank exits by itself (status 1)
 * for its supervisor to restart. */
#include "e2e_util.h"

#include <math.h>

#include "engine.h"
#include "generate.h"

#define TIE 3e-2f /* test_tp.c's TP_TIE */

static e2e_env_t g_env;
static cluster_t *g_cluster;
static e2e_tracker_t g_tr;
static folio_client_t *g_clients[8];
static int g_n_clients;

static folio_client_t *new_client(void)
{
    assert_true(g_n_clients < 8);
    return g_clients[g_n_clients++] = e2e_client(g_cluster);
}

E2E_MODEL_FIXTURES(g_env, "tp")

static int test_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_clients; i++) folio_client_destroy(&g_clients[i]);
    g_n_clients = 0;
    e2e_cluster_stop(&g_cluster);
    e2e_tracker_free(&g_tr);
    return 0;
}

static cluster_t *start_tp(const char *name, int groups, size_t kv_budget)
{
    cluster_opts_t o;
    memset(&o, 0, sizeof o);
    o.tp = 2;
    o.heartbeat_ms = 1000; /* the ranks share the machine's cores with each other */
    o.kv_budget_bytes = kv_budget;
    return e2e_cluster_start(&g_env, name, groups, &o);
}

enum { NR = 6, PL = 32, GL = 96 };

static void make_prompt(int i, int32_t *p)
{
    e2e_prompt_tokens(70 + (uint32_t)i, PL, p);
    if (i % 2) /* repeating: n-gram drafts get accepted */
        for (int j = 8; j < PL; j++) p[j] = p[j - 8];
}

/* TP=1 in this process: greedy outputs, and each position's top-1/top-2 margin. */
static engine_t *reference(int32_t prompts[NR][PL], int32_t out[NR][GL])
{
    fl_error_t err = {0};
    engine_opts_t eo = {.model_path = g_env.model, .backend = "cpu", .threads = 1, .kv_budget_bytes = 16 << 20,
                        .heads_path = "none"};
    engine_t *e = engine_new(&eo, &err);
    if (!e) fail_msg("engine: %s", err.msg);
    gen_request_t reqs[NR];
    memset(reqs, 0, sizeof reqs);
    for (int i = 0; i < NR; i++) {
        reqs[i].req.prompt = prompts[i];
        reqs[i].req.n_prompt = PL;
        reqs[i].req.max_tokens = GL;
        reqs[i].req.ignore_eog = true;
        reqs[i].tokens = out[i];
    }
    if (gen_run(e->model, e->kv, reqs, NR, NULL, NULL, NULL, &err)) fail_msg("gen_run: %s", err.msg);
    return e;
}

/* TP=1's margin between its two best logits for the token after seq[0, n). */
static float margin_after(engine_t *e, const int32_t *seq, int n)
{
    model_t *m = e->model;
    kv_seq_t s;
    assert_int_equal(kv_seq_init(&s, m->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(e->kv, &s, n), 0);
    int32_t *pos = malloc((size_t)n * sizeof *pos), *zero = calloc((size_t)n, sizeof *zero);
    int32_t *tables = malloc((size_t)m->max_blocks * sizeof *tables), row = n - 1;
    for (int i = 0; i < n; i++) pos[i] = i;
    for (int b = 0; b < m->max_blocks; b++) tables[b] = b < s.n_blocks ? s.blocks[b] : -1;
    const model_batch_t b = {.n_tokens = n, .tokens = seq, .pos = pos, .seq = zero, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = &row, .n_logits = 1};
    fl_error_t err = {0};
    if (model_forward(m, e->kv, &b, &err)) fail_msg("forward: %s", err.msg);
    float *l = malloc((size_t)m->cfg.n_vocab * sizeof *l);
    assert_int_equal(model_logits(m, l, 1), 0);
    float best = -INFINITY, second = -INFINITY;
    for (int v = 0; v < m->cfg.n_vocab; v++) {
        if (l[v] > best) second = best, best = l[v];
        else if (l[v] > second) second = l[v];
    }
    free(l);
    free(pos);
    free(zero);
    free(tables);
    kv_seq_free(e->kv, &s);
    return best - second;
}

/* Equal to TP=1's, or first different where TP=1 nearly tied. */
static void check_output(engine_t *e, const int32_t *prompt, const int32_t *ref, const int32_t *got, int n, int tag)
{
    for (int t = 0; t < n; t++) {
        if (got[t] == ref[t]) continue;
        int32_t seq[PL + GL];
        memcpy(seq, prompt, PL * sizeof *seq);
        memcpy(seq + PL, ref, (size_t)t * sizeof *seq);
        const float margin = margin_after(e, seq, PL + t);
        if (margin >= TIE)
            fail_msg("request %d token %d: TP=2 %d, TP=1 %d (TP=1 margin %g, tie %g)", tag, t, got[t], ref[t], margin, TIE);
        fprintf(stderr, "[e2e] tp: request %d differs from token %d, where TP=1's margin is %g (a near-tie)\n", tag, t,
                margin);
        return;
    }
}

static void tp2_group_matches_tp1_with_speculation_prefix_cache_and_preemption(void **state)
{
    (void)state;
    static int32_t prompts[NR][PL], ref[NR][GL];
    for (int i = 0; i < NR; i++) make_prompt(i, prompts[i]);
    engine_t *e = reference(prompts, ref);
    /* A rank holds 1 of the 2 KV heads: 1,024 bytes a token. 40 blocks: each request's 8 fit, the 6
     * together (48) do not, so the scheduler preempts. */
    g_cluster = start_tp("tp2", 1, (size_t)40 * 16 * 1024);
    folio_client_t *ctl = new_client(), *c = new_client();

    Folio__V1__Response *s = e2e_status(ctl);
    const Folio__V1__GroupStatus *g = e2e_group(s, "g0");
    assert_non_null(g);
    assert_int_equal(g->tp_size, 2);
    assert_int_equal(g->n_rank_status, 2);
    assert_int_equal(g->rank_status[1]->rank, 1);
    assert_true(g->healthy);
    folio__v1__response__free_unpacked(s, NULL);

    for (int i = 0; i < NR; i++) {
        folio_generate_params_t p = {.tokens = prompts[i], .n_tokens = PL, .max_tokens = GL, .ignore_eos = true,
                                     .stream = i % 2 == 0};
        e2e_send_generate(&g_tr, 0, c, &p, i);
    }
    e2e_pump(&g_tr, &c, 1, e2e_ms(120000));
    e2e_summary(&g_tr, "tp2");
    e2e_assert_invariant(&g_tr, "tp2");
    for (int i = 0; i < g_tr.n; i++) {
        const e2e_req_t *r = &g_tr.reqs[i];
        if (r->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("request %d: %s (%s)", r->tag, wire_status_name(r->status), r->message);
        assert_int_equal(r->n_tokens, GL);
        check_output(e, prompts[r->tag], ref[r->tag], r->tokens, GL, r->tag);
    }
    /* The prefix cache: the same prompt again (once to fill the cache the batch left to others) hits
     * its blocks, and gives the same tokens. */
    folio_generate_params_t p = {.tokens = prompts[1], .n_tokens = PL, .max_tokens = GL, .ignore_eos = true};
    folio_result_t again;
    e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &again);
    folio_result_clear(&again);
    e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &again);
    fprintf(stderr, "[e2e] tp2: again: %u of %u prompt tokens from the prefix cache, %u drafted, %u accepted\n",
            again.cached_prompt_tokens, again.prompt_tokens, again.drafted_tokens, again.accepted_tokens);
    assert_true(again.cached_prompt_tokens > 0);
    check_output(e, prompts[1], ref[1], again.tokens, again.n_tokens, 1);
    folio_result_clear(&again);

    e2e_sleep_ms(1500);
    s = e2e_status(ctl);
    g = e2e_group(s, "g0");
    fprintf(stderr, "[e2e] tp2: preemptions %llu, drafted %llu, accepted %llu\n",
            (unsigned long long)g->load->preemptions, (unsigned long long)g->load->drafted_tokens,
            (unsigned long long)g->load->accepted_tokens);
    assert_true(g->load->preemptions > 0);
    assert_true(g->load->accepted_tokens > 0);
    folio__v1__response__free_unpacked(s, NULL);
    engine_destroy(&e);
}

/* Whether pid exits within wait_ms; its status in *code. */
static bool exits_within(pid_t pid, int wait_ms, int *code)
{
    const double deadline = e2e_now_ms() + wait_ms;
    while (e2e_now_ms() < deadline) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            *code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            return true;
        }
        e2e_sleep_ms(50);
    }
    return false;
}

static void kill9_of_one_rank_fails_its_requests_over_and_the_group_exits(void **state)
{
    (void)state;
    g_cluster = start_tp("tp-kill", 2, 0);
    folio_client_t *ctl = new_client();
    enum { NC = 3, NQ = 4 };
    folio_client_t *cl[NC];
    for (int i = 0; i < NC; i++) cl[i] = new_client();
    const int L = e2e_long_tokens(600);
    static int32_t prompts[NC * NQ][64];
    e2e_req_t *rs[NC * NQ];
    for (int j = 0; j < NQ; j++)
        for (int i = 0; i < NC; i++) {
            const int k = j * NC + i, n = 16 + (k * 7) % 48;
            e2e_prompt_tokens(500 + (uint32_t)k, n, prompts[k]);
            folio_generate_params_t p = {.tokens = prompts[k], .n_tokens = n, .max_tokens = L, .ignore_eos = true,
                                         .stream = true};
            rs[k] = e2e_send_generate(&g_tr, i, cl[i], &p, k);
        }
    /* Until a third stream */
    const double until = e2e_now_ms() + e2e_ms(20000);
    for (int have = 0; have < NC * NQ / 3 && e2e_now_ms() < until;) {
        e2e_pump_ex(&g_tr, cl, NC, 10, false);
        have = 0;
        for (int k = 0; k < NC * NQ; k++) have += rs[k]->n_tokens > 0 || rs[k]->final;
    }
    const pid_t rank0 = g_cluster->workers[0], rank1 = g_cluster->workers[1]; /* g0's ranks */
    fprintf(stderr, "[e2e] tp-kill: SIGKILL g0 rank 1 (pid %d) under load\n", (int)rank1);
    kill(rank1, SIGKILL);
    e2e_pump(&g_tr, cl, NC, e2e_ms(120000));
    e2e_summary(&g_tr, "tp-kill");
    e2e_assert_invariant(&g_tr, "tp-kill");
    int on_g1 = 0;
    for (int k = 0; k < NC * NQ; k++) {
        const e2e_req_t *r = rs[k];
        if (r->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("request %d: %s (%s) after %d tokens (it should have moved to g1)", k,
                     wire_status_name(r->status), r->message, r->n_tokens);
        if (r->n_tokens != L) fail_msg("request %d: OK with %d of %d tokens", k, r->n_tokens, L);
        on_g1 += strcmp(r->group, "g1") == 0;
    }
    fprintf(stderr, "[e2e] tp-kill: %d of %d requests finished on g1\n", on_g1, NC * NQ);
    if (e2e_wait_group(ctl, "g0", false, false, e2e_ms(5000)) < 0) fail_msg("Status still shows g0 healthy");
    int code = -1;
    if (!exits_within(rank0, e2e_ms(15000), &code)) fail_msg("g0's rank 0 (pid %d) still runs without its rank 1", (int)rank0);
    fprintf(stderr, "[e2e] tp-kill: g0 rank 0 exited with status %d\n", code);
    assert_int_equal(code, 1);
    waitpid(rank1, NULL, 0);
    g_cluster->workers[0] = g_cluster->workers[1] = 0; /* reaped */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(tp2_group_matches_tp1_with_speculation_prefix_cache_and_preemption, test_teardown),
        cmocka_unit_test_teardown(kill9_of_one_rank_fails_its_requests_over_and_the_group_exits, test_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
