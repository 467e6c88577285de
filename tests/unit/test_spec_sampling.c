/* test_spec_sampling.c - speculative sampling keeps the model's distribution.
 *
 * A tiny random model at a temperature that makes its distribution neither flat nor one-hot (its
 * logits are small), a prompt after which n-gram drafts are often accepted, short outputs. The exact distribution of the outputs is computed
 * without speculation, by enumerating prefixes with plain forward passes and multiplying the softmax
 * probabilities. Then 3,000 seeded runs with speculation on (every draft verified) are binned by
 * output and compared with a chi-square test at the 0.1% level. The seeds are fixed, so the
 * test gives the same verdict on every run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "scheduler.h"
#include "test_tiny_model.h"

#define OUT_LEN 4
#define RUNS 3000
#define TEMPERATURE 0.02f
#define MAX_BINS 256
#define MIN_PROB 0.004 /* outputs below this share the "other" bin */

static engine_t *g_e;
static int32_t g_prompt[64];
static int g_n_prompt;

static int setup(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.seed = 23;
    if (tiny_model_write("spec_sampling", &p)) return -1;
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = g_tiny_model, .backend = "cpu", .threads = 2, .max_batch_tokens = 256,
                       .block_size = 4, .max_seqs = 64, .kv_budget_bytes = (size_t)4 << 20};
    g_e = engine_new(&o, &err);
    if (!g_e) fprintf(stderr, "engine: %s\n", err.msg);
    return g_e ? 0 : -1;
}

static int teardown(void **state)
{
    engine_destroy(&g_e);
    return tiny_model_remove(state);
}

/* Natural-log softmax of the last row's logits at temperature T, for context ctx[0, n). */
static void next_probs(const int32_t *ctx, int n, double *probs)
{
    model_t *m = g_e->model;
    kv_seq_t seq;
    assert_int_equal(kv_seq_init(&seq, m->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(g_e->kv, &seq, n), 0);
    int32_t pos[64], seqs[64], tables[256] = {0};
    memcpy(tables, seq.blocks, (size_t)seq.n_blocks * sizeof *tables);
    for (int i = 0; i < n; i++) pos[i] = i, seqs[i] = 0;
    const int32_t row = n - 1;
    const model_batch_t b = {.n_tokens = n, .tokens = ctx, .pos = pos, .seq = seqs, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = &row, .n_logits = 1};
    fl_error_t err = {0};
    assert_int_equal(model_forward(m, g_e->kv, &b, &err), 0);
    const int V = m->cfg.n_vocab;
    float *l = malloc((size_t)V * sizeof *l);
    assert_int_equal(model_logits(m, l, 1), 0);
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; v++) mx = l[v] > mx ? l[v] : mx;
    for (int v = 0; v < V; v++) sum += probs[v] = exp((l[v] - mx) / TEMPERATURE);
    for (int v = 0; v < V; v++) probs[v] /= sum;
    free(l);
    kv_seq_free(g_e->kv, &seq);
}

typedef struct bins {
    int n;
    int32_t out[MAX_BINS][OUT_LEN];
    double p[MAX_BINS];
    int count[MAX_BINS];
    int other;
} bins_t;

/* Every output of OUT_LEN tokens with probability >= MIN_PROB, by depth-first enumeration. */
static void enumerate(bins_t *b, int32_t *ctx, int n, int depth, double p)
{
    if (depth == OUT_LEN) {
        assert_true(b->n < MAX_BINS);
        memcpy(b->out[b->n], ctx + n - OUT_LEN, sizeof b->out[0]);
        b->p[b->n++] = p;
        return;
    }
    const int V = g_e->model->cfg.n_vocab;
    double *probs = malloc((size_t)V * sizeof *probs);
    next_probs(ctx, n, probs);
    for (int v = 0; v < V; v++) {
        if (p * probs[v] < MIN_PROB) continue;
        ctx[n] = v;
        enumerate(b, ctx, n + 1, depth + 1, p * probs[v]);
    }
    free(probs);
}

typedef struct run_state {
    int32_t out[RUNS][OUT_LEN];
    int n[RUNS];
} run_state_t;

static bool on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)lp;
    run_state_t *r = user;
    r->out[id][index] = token;
    r->n[id] = index + 1;
    return false;
}

static void on_finish(void *user, const sched_result_t *res) { (void)user, (void)res; }

/* The chi-square quantile with df degrees of freedom at upper tail 0.001 (Wilson-Hilferty). */
static double chi2_critical(int df)
{
    const double z = 3.0902, a = 2.0 / (9.0 * df);
    const double c = 1 - a + z * sqrt(a);
    return df * c * c * c;
}

static void speculative_sampling_keeps_the_model_distribution(void **state)
{
    (void)state;
    /* The prompt: a seed S, the model's own greedy continuation G, then G's first two tokens again,
     * for the S (of a few tried) after which the model's greedy continuation follows G longest: there
     * the n-gram drafter's proposals (G again) are often what the model samples. */
    const int V = g_e->model->cfg.n_vocab;
    double *probs = malloc((size_t)V * sizeof *probs);
    int best_score = -1;
    uint32_t x = 5;
    for (int attempt = 0; attempt < 24; attempt++) {
        int32_t ctx[64];
        int n = 0;
        for (; n < 6; n++) x = x * 1664525u + 1013904223u, ctx[n] = 3 + (int32_t)((x >> 8) % 500);
        for (int len = 16 + 2 + OUT_LEN; n < len;) {
            if (n == 22) { /* G's first two tokens again; the rest is the greedy continuation after them */
                ctx[22] = ctx[6], ctx[23] = ctx[7];
                n = 24;
                continue;
            }
            next_probs(ctx, n, probs);
            int best = 0;
            for (int v = 1; v < V; v++) best = probs[v] > probs[best] ? v : best;
            ctx[n++] = best;
            if (n == 22) len = 24 + OUT_LEN;
        }
        int score = 0;
        while (score < OUT_LEN && ctx[24 + score] == ctx[8 + score]) score++;
        if (score > best_score) best_score = score, memcpy(g_prompt, ctx, 24 * sizeof *ctx);
    }
    free(probs);
    g_n_prompt = 24;
    print_message("prompt: the greedy continuation follows the drafts for %d of %d tokens\n", best_score, OUT_LEN);
    int32_t ctx[64];
    memcpy(ctx, g_prompt, sizeof ctx);

    static bins_t b;
    memset(&b, 0, sizeof b);
    enumerate(&b, ctx, g_n_prompt, 0, 1.0);
    double covered = 0;
    for (int i = 0; i < b.n; i++) covered += b.p[i];
    print_message("exact distribution: %d outputs of %d tokens hold %.3f of the mass\n", b.n, OUT_LEN, covered);
    assert_true(b.n >= 3);

    static run_state_t r;
    memset(&r, 0, sizeof r);
    const sched_callbacks_t cb = {.on_token = on_token, .on_finish = on_finish, .user = &r};
    const sched_opts_t opts = {.spec_draft_all = true, .no_prefix_cache = true};
    fl_error_t err = {0};
    sched_t *s = sched_new(g_e->model, g_e->kv, &opts, &cb, &err);
    assert_non_null(s);
    for (int i = 0; i < RUNS; i++) {
        const sched_request_t req = {.id = (uint64_t)i, .prompt = g_prompt, .n_prompt = g_n_prompt,
                                     .max_tokens = OUT_LEN, .ignore_eog = true, .spec = SCHED_SPEC_NGRAM,
                                     .sampling = {.temperature = TEMPERATURE, .top_p = 1.0f, .seed = 1000 + (uint64_t)i}};
        assert_int_equal(sched_submit(s, &req, &err), 0);
    }
    while (sched_has_work(s)) assert_int_equal(sched_step(s, &err), 0);
    sched_stats_t st;
    sched_get_stats(s, &st);
    sched_destroy(&s);
    print_message("speculation: %llu drafted, %llu accepted over %d runs\n", (unsigned long long)st.drafted_tokens,
                  (unsigned long long)st.accepted_tokens, RUNS);
    assert_true(st.accepted_tokens > RUNS / 4); /* drafts were really taken */

    for (int i = 0; i < RUNS; i++) {
        assert_int_equal(r.n[i], OUT_LEN);
        int k = 0;
        while (k < b.n && memcmp(b.out[k], r.out[i], sizeof b.out[0])) k++;
        if (k < b.n) b.count[k]++;
        else b.other++;
    }
    double chi2 = 0;
    for (int i = 0; i < b.n; i++) {
        const double e = RUNS * b.p[i];
        chi2 += (b.count[i] - e) * (b.count[i] - e) / e;
    }
    const double e_other = RUNS * (1 - covered);
    if (e_other >= 5) chi2 += (b.other - e_other) * (b.other - e_other) / e_other;
    else assert_true(b.other <= 20);
    const int df = b.n - (e_other >= 5 ? 0 : 1);
    print_message("chi-square %.1f over %d degrees of freedom (0.1%% critical value %.1f); other: %d of %.1f expected\n",
                  chi2, df, chi2_critical(df), b.other, e_other);
    assert_true(chi2 < chi2_critical(df));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(speculative_sampling_keeps_the_model_distribution),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
