/* test_sampling.c - kernels/sampling.c: the logit adjustments (repetition penalty, additive terms,
 * bans), min-p and the stream's log-probabilities, each against a direct computation written here
 * (in double, from the definitions in sampling.h and kernels.h), through the CPU backend's sample op
 * where the op is what users get. The draw's older steps (temperature, top-k, top-p, the uniform) are
 * covered by test_kernels_cpu.c; the CUDA sampler is compared with this one in test_cuda_backend.c. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/kernels.h"
#include "kernels/sampling.h"

/* ---- helpers ---- */

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rnd_u64(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double rnd_unit(void) { return (double)(rnd_u64() >> 11) * 0x1p-53; }
static float rnd_f(float lo, float hi) { return lo + (hi - lo) * (float)rnd_unit(); }
static float rnd_gauss(float std)
{
    const double u1 = rnd_unit() + 1e-300, u2 = rnd_unit();
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2)) * std;
}

static kern_backend_t *cpu(void)
{
    fl_error_t err = {0};
    kern_backend_t *be = kern_cpu_new(1, &err);
    assert_non_null(be);
    return be;
}

/* One row through the CPU backend's sample op, on a copy (the op may overwrite its rows); the
 * adjusted row is left in adjusted (NULL: not wanted). */
static int32_t draw(kern_backend_t *be, const float *l, int vocab, const kern_sampling_t *p, float *adjusted)
{
    float *row = malloc((size_t)vocab * sizeof *row);
    assert_non_null(row);
    memcpy(row, l, (size_t)vocab * sizeof *row);
    int32_t id = -1;
    kern_sample(be, &id, row, 1, vocab, p);
    if (adjusted) memcpy(adjusted, row, (size_t)vocab * sizeof *row);
    free(row);
    assert_true(id >= 0 && id < vocab);
    return id;
}

/* The definition of an adjusted logit, in double: llama.cpp's repetition penalty, then the sum. */
static double adjusted_ref(float l, float penalty, float add)
{
    double v = l;
    if (penalty != 1.0f) v = l > 0 ? (double)l / penalty : (double)l * penalty;
    return v + add;
}

static int argmax_ref(const float *l, int vocab)
{
    int best = 0;
    for (int i = 1; i < vocab; i++)
        if (l[i] > l[best] || (l[best] != l[best] && l[i] == l[i])) best = i;
    return best;
}

/* ---- adjustments ---- */

static void test_repetition_penalty_divides_positive_and_multiplies_negative_logits(void **state)
{
    kern_backend_t *be = cpu();
    const float l[6] = {2.0f, -2.0f, 0.0f, 3.0f, -0.5f, 1.0f};
    const kern_logit_adjust_t adj[] = {
        {.token = 0, .penalty = 2.0f, .add = 0}, {.token = 1, .penalty = 2.0f, .add = 0},
        {.token = 2, .penalty = 2.0f, .add = 0}, {.token = 4, .penalty = 1.5f, .add = 0},
        {.token = 5, .penalty = 0.5f, .add = 0}, /* a penalty below 1 rewards */
    };
    kern_sampling_t p = {.temperature = 0, .adjust = adj, .n_adjust = 5};
    float out[6];
    assert_int_equal(draw(be, l, 6, &p, out), 3);
    const float want[6] = {1.0f, -4.0f, 0.0f, 3.0f, -0.75f, 2.0f};
    for (int i = 0; i < 6; i++) assert_true(out[i] == want[i]);
    /* the penalty on the best token hands the argmax to the next */
    const kern_logit_adjust_t top = {.token = 3, .penalty = 4.0f, .add = 0};
    p.adjust = &top, p.n_adjust = 1;
    assert_int_equal(draw(be, l, 6, &p, out), 0);
    assert_true(out[3] == 0.75f);

    /* random values against the definition in double: each step rounds once */
    enum { V = 4096 };
    static float row[V], got[V];
    static kern_logit_adjust_t many[V / 2];
    for (int i = 0; i < V; i++) row[i] = rnd_gauss(4.0f);
    for (int i = 0; i < V / 2; i++)
        many[i] = (kern_logit_adjust_t){.token = 2 * i + (int)(rnd_u64() % 2), .penalty = rnd_f(0.5f, 2.0f),
                                        .add = i % 3 ? rnd_f(-3.0f, 3.0f) : 0.0f};
    p = (kern_sampling_t){.temperature = 0, .adjust = many, .n_adjust = V / 2};
    draw(be, row, V, &p, got);
    int touched = 0;
    for (int i = 0; i < V / 2; i++) {
        const int t = many[i].token;
        const double ref = adjusted_ref(row[t], many[i].penalty, many[i].add);
        const double tol = 1e-6 * (fabs((double)row[t] * 2) + fabs((double)many[i].add)) + 1e-30;
        assert_true(fabs((double)got[t] - ref) <= tol);
        touched++;
    }
    for (int i = 0; i < V; i++) {
        bool listed = false;
        for (int j = 0; j < V / 2 && !listed; j++) listed = many[j].token == i;
        if (!listed) assert_true(got[i] == row[i]);
    }
    assert_int_equal(touched, V / 2);
    kern_destroy(&be);
}

static void test_additive_terms_add_to_the_logit(void **state)
{
    kern_backend_t *be = cpu();
    const float l[4] = {1.0f, 0.5f, -1.0f, 0.75f};
    /* penalty 1: l + add (presence and frequency penalties, logit bias, summed by the host) */
    const kern_logit_adjust_t adj[] = {{.token = 0, .penalty = 1.0f, .add = -0.75f},
                                       {.token = 2, .penalty = 1.0f, .add = 2.5f},
                                       {.token = 3, .penalty = 1.5f, .add = 0.25f}}; /* 0.5 + 0.25 */
    kern_sampling_t p = {.temperature = 0, .adjust = adj, .n_adjust = 3};
    float out[4];
    assert_int_equal(draw(be, l, 4, &p, out), 2);
    const float want[4] = {0.25f, 0.5f, 1.5f, 0.75f};
    for (int i = 0; i < 4; i++) assert_true(out[i] == want[i]);
    /* a negative logit under a penalty, then the sum: -1 * 1.5 + 2.5 */
    const kern_logit_adjust_t both = {.token = 2, .penalty = 1.5f, .add = 2.5f};
    p.adjust = &both, p.n_adjust = 1;
    draw(be, l, 4, &p, out);
    assert_true(out[2] == 1.0f);
    /* tokens outside the vocabulary are skipped, and an empty list changes nothing */
    const kern_logit_adjust_t outside[] = {{.token = -1, .penalty = 1, .add = 9}, {.token = 4, .penalty = 1, .add = 9}};
    p.adjust = outside, p.n_adjust = 2;
    draw(be, l, 4, &p, out);
    assert_memory_equal(out, l, sizeof l);
    kern_destroy(&be);
}

static void test_minus_infinity_bans_a_token_greedy_or_drawn(void **state)
{
    kern_backend_t *be = cpu();
    enum { V = 50 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = rnd_f(-0.2f, 0.2f);
    l[7] = 3.0f, l[20] = 2.5f;
    const kern_logit_adjust_t ban = {.token = 7, .penalty = 1.0f, .add = -INFINITY};
    kern_sampling_t g = {.temperature = 0, .adjust = &ban, .n_adjust = 1};
    assert_int_equal(draw(be, l, V, &g, NULL), 20);
    /* banned also under a repetition penalty, and never drawn at a high temperature */
    const kern_logit_adjust_t ban_pen = {.token = 7, .penalty = 1.3f, .add = -INFINITY};
    int seen[V] = {0};
    for (uint64_t pos = 0; pos < 3000; pos++) {
        kern_sampling_t s = {.temperature = 3.0f, .top_p = 1.0f, .seed = 5, .position = pos, .adjust = &ban_pen,
                             .n_adjust = 1};
        seen[draw(be, l, V, &s, NULL)]++;
    }
    assert_int_equal(seen[7], 0);
    assert_true(seen[20] > 0);
    /* every token but one banned: that one, always */
    kern_logit_adjust_t all[V];
    for (int i = 0; i < V; i++) all[i] = (kern_logit_adjust_t){.token = i, .penalty = 1.0f, .add = i == 33 ? 0.0f : -INFINITY};
    for (uint64_t pos = 0; pos < 50; pos++) {
        kern_sampling_t s = {.temperature = 1.0f, .top_k = 40, .top_p = 0.9f, .min_p = 0.05f, .seed = 1,
                             .position = pos, .adjust = all, .n_adjust = V};
        assert_int_equal(draw(be, l, V, &s, NULL), 33);
    }
    /* every token banned: no finite maximum, the greedy rule's 0 */
    all[33].add = -INFINITY;
    kern_sampling_t s = {.temperature = 1.0f, .top_p = 1.0f, .seed = 1, .position = 3, .adjust = all, .n_adjust = V};
    assert_int_equal(draw(be, l, V, &s, NULL), 0);
    kern_destroy(&be);
}

/* Constrained output: a token outside the allowed set is never drawn, greedy or not, and the greedy
 * pick is the best allowed one; the mask comes before the adjustments (a bias cannot revive it). */
static void test_allowed_mask_limits_draws_to_its_tokens(void **state)
{
    kern_backend_t *be = cpu();
    enum { V = 150 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = rnd_f(-1.0f, 1.0f);
    l[3] = 5.0f, l[77] = 4.0f, l[140] = 3.9f;
    uint64_t allowed[(V + 63) / 64] = {0};
    for (int t = 64; t < V; t += 2) allowed[t / 64] |= 1ull << (t % 64); /* even ids from 64: not 3 */
    kern_sampling_t g = {.temperature = 0, .allowed = allowed};
    assert_int_equal(draw(be, l, V, &g, NULL), 140);
    const kern_logit_adjust_t boost = {.token = 3, .penalty = 1.0f, .add = 100.0f};
    g.adjust = &boost, g.n_adjust = 1;
    assert_int_equal(draw(be, l, V, &g, NULL), 140);
    int seen[V] = {0};
    for (uint64_t pos = 0; pos < 2000; pos++) {
        kern_sampling_t s = {.temperature = 2.0f, .top_p = 1.0f, .seed = 9, .position = pos, .allowed = allowed};
        seen[draw(be, l, V, &s, NULL)]++;
    }
    int outside = 0, kinds = 0;
    for (int t = 0; t < V; t++) {
        const bool ok = t >= 64 && t % 2 == 0;
        if (!ok) outside += seen[t];
        kinds += ok && seen[t] > 0;
    }
    assert_int_equal(outside, 0);
    assert_true(kinds > 20); /* a high temperature spreads over the allowed set */
    kern_destroy(&be);
}

static void test_greedy_rows_take_the_argmax_of_adjusted_logits(void **state)
{
    kern_backend_t *be = cpu();
    enum { V = 1000, ROWS = 4 };
    static float l[ROWS][V], adj_ref[V];
    kern_logit_adjust_t adj[ROWS][16];
    kern_sampling_t p[ROWS];
    for (int r = 0; r < 200; r++) {
        for (int i = 0; i < ROWS; i++) {
            for (int v = 0; v < V; v++) l[i][v] = rnd_gauss(2.0f);
            const int best = argmax_ref(l[i], V);
            for (int j = 0; j < 16; j++) /* the best among them, some others, distinct */
                adj[i][j] = (kern_logit_adjust_t){.token = j == 0 ? best : (best + 1 + j * 61) % V,
                                                  .penalty = rnd_f(1.0f, 3.0f), .add = rnd_f(-2.0f, 2.0f)};
            /* greedy ignores top-k, top-p and min-p */
            p[i] = (kern_sampling_t){.temperature = i % 2 ? 0.0f : -1.0f, .top_k = 1 + i, .top_p = 0.1f, .min_p = 0.9f,
                                     .adjust = adj[i], .n_adjust = 16};
        }
        static float batch[ROWS][V];
        memcpy(batch, l, sizeof batch);
        int32_t out[ROWS];
        kern_sample(be, out, &batch[0][0], ROWS, V, p);
        for (int i = 0; i < ROWS; i++) {
            for (int v = 0; v < V; v++) adj_ref[v] = l[i][v];
            for (int j = 0; j < 16; j++)
                adj_ref[adj[i][j].token] = (float)adjusted_ref(l[i][adj[i][j].token], adj[i][j].penalty, adj[i][j].add);
            double best = -INFINITY; /* the reference argmax in double, away from near-ties */
            int bi = -1, close = 0;
            for (int v = 0; v < V; v++)
                if (adj_ref[v] > best) best = adj_ref[v], bi = v;
            for (int v = 0; v < V; v++) close += v != bi && adj_ref[v] > best - 1e-5;
            if (!close) assert_int_equal(out[i], bi);
        }
    }
    kern_destroy(&be);
}

static void test_adjustment_order_in_the_list_does_not_matter(void **state)
{
    kern_backend_t *be = cpu();
    enum { V = 3000, N = 40 };
    static float l[V];
    for (int i = 0; i < V; i++) l[i] = rnd_gauss(3.0f);
    kern_logit_adjust_t a[N], b[N];
    for (int j = 0; j < N; j++)
        a[j] = (kern_logit_adjust_t){.token = (j * 73) % V, .penalty = 1.1f + 0.01f * j, .add = j % 5 ? 0.0f : -1.5f};
    for (int j = 0; j < N; j++) b[j] = a[N - 1 - j];
    for (uint64_t pos = 0; pos < 100; pos++) {
        kern_sampling_t pa = {.temperature = 0.9f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f, .seed = 77,
                              .position = pos, .adjust = a, .n_adjust = N};
        kern_sampling_t pb = pa;
        pb.adjust = b;
        assert_int_equal(draw(be, l, V, &pa, NULL), draw(be, l, V, &pb, NULL));
    }
    kern_destroy(&be);
}

static void test_distinct_check_finds_repeated_tokens(void **state)
{
    const kern_logit_adjust_t ok[3] = {{.token = 1}, {.token = 5}, {.token = 2}};
    const kern_logit_adjust_t dup[3] = {{.token = 1}, {.token = 5}, {.token = 1}};
    assert_true(kern_sample_adjust_distinct(ok, 3));
    assert_false(kern_sample_adjust_distinct(dup, 3));
    assert_true(kern_sample_adjust_distinct(dup, 2));
    assert_true(kern_sample_adjust_distinct(NULL, 0));
}

/* ---- min-p ---- */

/* Which tokens min-p keeps, from p_i / p_max = exp((l_i - max) / temperature) in double, among the
 * top_k best (0: all); *p_least gets the least probability of a kept token within the kept. False
 * when a token lies within 1e-4 of the threshold (a case too close to call). */
static bool min_p_ref(const float *l, int vocab, float temperature, int top_k, float min_p, bool *keep,
                      double *p_least)
{
    double mx = -INFINITY, kept_mass = 0, least = INFINITY;
    for (int i = 0; i < vocab; i++) mx = fmax(mx, l[i]);
    for (int i = 0; i < vocab; i++) {
        int better = 0; /* rank by (logit desc, id asc) for top-k */
        for (int j = 0; j < vocab && top_k > 0; j++) better += l[j] > l[i] || (l[j] == l[i] && j < i);
        const double ratio = exp(((double)l[i] - mx) / temperature);
        if (fabs(ratio / min_p - 1.0) < 1e-4) return false;
        keep[i] = ratio >= min_p && (top_k <= 0 || better < top_k);
        if (keep[i]) kept_mass += ratio, least = fmin(least, ratio);
    }
    *p_least = least / kept_mass;
    return true;
}

static void test_min_p_keeps_exactly_the_tokens_within_min_p_of_the_best(void **state)
{
    kern_backend_t *be = cpu();
    enum { V = 120 };
    static const float temps[] = {0.5f, 1.0f, 1.7f};
    static const float min_ps[] = {0.02f, 0.1f, 0.3f};
    static const int top_ks[] = {0, 8};
    int cases = 0;
    for (int c = 0; c < 18; c++) {
        float l[V];
        bool keep[V];
        for (int i = 0; i < V; i++) l[i] = rnd_gauss(1.2f);
        const float t = temps[c % 3], mp = min_ps[c / 3 % 3];
        const int tk = top_ks[c / 9];
        double p_least;
        if (!min_p_ref(l, V, t, tk, mp, keep, &p_least)) continue;
        /* every kept token shows up in 40 / p_least draws but with odds of e^-40; the others never
         * (a fixed seed: the outcome is fixed too) */
        const int n_draws = (int)(40.0 / p_least);
        int seen[V] = {0};
        for (int k = 0; k < n_draws; k++) {
            kern_sampling_t p = {.temperature = t, .top_k = tk, .top_p = 1.0f, .min_p = mp, .seed = (uint64_t)c,
                                 .position = (uint64_t)k};
            seen[draw(be, l, V, &p, NULL)]++;
        }
        for (int i = 0; i < V; i++) assert_int_equal(seen[i] > 0, keep[i]);
        cases++;
    }
    assert_true(cases >= 12);
    kern_destroy(&be);
}

static void test_min_p_edges(void **state)
{
    kern_backend_t *be = cpu();
    enum { V = 64 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = rnd_gauss(1.0f);
    l[10] = l[40] = 4.0f; /* two best, tied */
    const int best = 10;
    /* min_p 1 (and above) keeps the tokens as heavy as the best: the tie */
    for (uint64_t pos = 0; pos < 200; pos++) {
        kern_sampling_t p = {.temperature = 1.0f, .top_p = 1.0f, .min_p = pos % 2 ? 1.0f : 7.0f, .seed = 2,
                             .position = pos};
        const int32_t id = draw(be, l, V, &p, NULL);
        assert_true(id == 10 || id == 40);
    }
    /* min_p <= 0 (or NaN) is off: the same token as without it, for every draw */
    for (uint64_t pos = 0; pos < 300; pos++) {
        kern_sampling_t off = {.temperature = 1.3f, .top_k = 20, .top_p = 0.9f, .seed = 11, .position = pos};
        kern_sampling_t neg = off, nan_p = off;
        neg.min_p = -0.5f, nan_p.min_p = NAN;
        const int32_t a = draw(be, l, V, &off, NULL);
        assert_int_equal(draw(be, l, V, &neg, NULL), a);
        assert_int_equal(draw(be, l, V, &nan_p, NULL), a);
    }
    /* greedy: min-p plays no part */
    kern_sampling_t g = {.temperature = 0, .min_p = 0.5f};
    assert_int_equal(draw(be, l, V, &g, NULL), best);
    assert_true(kern_sample_min_weight(0.0f) == 0 && kern_sample_min_weight(1.0f) == (uint64_t)1 << 40 &&
                kern_sample_min_weight(0.5f) == (uint64_t)1 << 39);
    kern_destroy(&be);
}

/* ---- draws ---- */

static void test_draws_with_every_parameter_are_a_function_of_seed_and_position(void **state)
{
    kern_backend_t *be = kern_cpu_new(2, &(fl_error_t){0});
    assert_non_null(be);
    enum { V = 32000, ROWS = 3 };
    float *l = malloc((size_t)ROWS * V * sizeof *l), *batch = malloc((size_t)ROWS * V * sizeof *l);
    assert_non_null(l), assert_non_null(batch);
    for (size_t i = 0; i < (size_t)ROWS * V; i++) l[i] = rnd_gauss(3.0f);
    kern_logit_adjust_t adj[ROWS][30];
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < 30; j++)
            adj[r][j] = (kern_logit_adjust_t){.token = (j * 997 + r) % V, .penalty = 1.2f,
                                              .add = j == 3 ? -INFINITY : -0.1f * (float)(j % 4)};
    int differ = 0;
    for (uint64_t pos = 0; pos < 20; pos++) {
        kern_sampling_t p[ROWS] = {
            {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f, .seed = 7, .position = pos},
            {.temperature = 1.0f, .top_p = 1.0f, .min_p = 0.1f, .seed = 7, .position = pos},
            {.temperature = 1.2f, .top_p = 0.5f, .min_p = 0.01f, .seed = 9, .position = pos + 1000},
        };
        for (int r = 0; r < ROWS; r++) p[r].adjust = adj[r], p[r].n_adjust = 30;
        int32_t a[ROWS], b[ROWS];
        memcpy(batch, l, (size_t)ROWS * V * sizeof *l);
        kern_sample(be, a, batch, ROWS, V, p);
        memcpy(batch, l, (size_t)ROWS * V * sizeof *l);
        kern_sample(be, b, batch, ROWS, V, p);
        assert_memory_equal(a, b, sizeof a);
        for (int r = 0; r < ROWS; r++) /* alone == in a batch */
            assert_int_equal(draw(be, l + (size_t)r * V, V, &p[r], NULL), a[r]);
        /* another seed moves some draws */
        for (int r = 0; r < ROWS; r++) p[r].seed += 1;
        memcpy(batch, l, (size_t)ROWS * V * sizeof *l);
        kern_sample(be, b, batch, ROWS, V, p);
        differ += memcmp(a, b, sizeof a) != 0;
    }
    assert_true(differ > 0);
    free(l), free(batch);
    kern_destroy(&be);
}

/* ---- log-probabilities ---- */

/* log softmax of l[i] in long double, without the shift by the maximum (the logits are moderate). */
static double log_softmax_ref(const float *l, int vocab, int i)
{
    long double z = 0;
    for (int j = 0; j < vocab; j++)
        if (l[j] == l[j]) z += expl((long double)l[j]);
    return (double)((long double)l[i] - logl(z));
}

static int cmp_rank_of(const float *l, int a, int b)
{
    if (l[a] != l[b]) return l[a] > l[b] ? -1 : 1;
    return (a > b) - (a < b);
}
static const float *g_sort_l;
static int cmp_rank(const void *a, const void *b) { return cmp_rank_of(g_sort_l, *(const int *)a, *(const int *)b); }

static void test_logprobs_are_a_log_softmax_summing_to_one(void **state)
{
    enum { V = 1500 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = rnd_gauss(4.0f) + 10.0f;
    double sum = 0;
    for (int i = 0; i < V; i++) {
        kern_logprob_t c = {.token = -7, .logprob = 1};
        assert_int_equal(kern_logprobs_row(l, V, i, 0, &c, NULL), 0);
        assert_int_equal(c.token, i);
        assert_true(fabs((double)c.logprob - log_softmax_ref(l, V, i)) <= 2e-6 * (1 + fabs((double)c.logprob)));
        sum += exp((double)c.logprob);
    }
    assert_true(fabs(sum - 1.0) < 1e-5);
    /* a chosen id outside the row has no probability */
    kern_logprob_t c;
    kern_logprobs_row(l, V, V, 0, &c, NULL);
    assert_true(c.token == V && c.logprob == -INFINITY);
}

static void test_logprobs_top_is_ordered_by_logit_then_id_without_nans(void **state)
{
    enum { V = 700 };
    float l[V];
    int order[V];
    for (int round = 0; round < 30; round++) {
        for (int i = 0; i < V; i++) l[i] = (float)(int)rnd_f(-20.0f, 20.0f) * 0.5f; /* many ties */
        for (int i = 0; i < 5 + round; i++) l[rnd_u64() % V] = NAN;
        if (round % 3 == 0) l[rnd_u64() % V] = NAN, l[V - 1] = 40.0f, l[3] = 40.0f; /* the best tied */
        int n_num = 0;
        for (int i = 0; i < V; i++)
            if (l[i] == l[i]) order[n_num++] = i;
        g_sort_l = l;
        qsort(order, (size_t)n_num, sizeof *order, cmp_rank);
        const int n_top = round % 22; /* 0 .. 21: 21 is clamped to 20 */
        kern_logprob_t top[KERN_LOGPROBS_MAX_TOP], chosen;
        const int n = kern_logprobs_row(l, V, order[0], n_top, &chosen, top);
        assert_int_equal(n, n_top < KERN_LOGPROBS_MAX_TOP ? n_top : KERN_LOGPROBS_MAX_TOP);
        for (int j = 0; j < n; j++) {
            assert_int_equal(top[j].token, order[j]);
            assert_true(l[top[j].token] == l[top[j].token]);
            assert_true(fabs((double)top[j].logprob - log_softmax_ref(l, V, order[j])) < 1e-5);
        }
        assert_true(chosen.token == order[0] && (n == 0 || chosen.logprob == top[0].logprob));
    }
    /* fewer non-NaN tokens than asked: those only; NaN tokens have probability 0 */
    float s[5] = {NAN, 1.0f, NAN, 1.0f, NAN};
    kern_logprob_t top[KERN_LOGPROBS_MAX_TOP], c;
    assert_int_equal(kern_logprobs_row(s, 5, 0, 10, &c, top), 2);
    assert_true(top[0].token == 1 && top[1].token == 3);
    assert_true(fabs((double)top[0].logprob - log(0.5)) < 1e-7);
    assert_true(c.logprob == -INFINITY);
}

static void test_logprobs_with_an_infinite_maximum_share_it(void **state)
{
    const float l[5] = {1.0f, INFINITY, -INFINITY, INFINITY, NAN};
    kern_logprob_t top[3], c;
    assert_int_equal(kern_logprobs_row(l, 5, 1, 3, &c, top), 3);
    assert_true(top[0].token == 1 && top[1].token == 3 && top[2].token == 0);
    assert_true(fabs((double)top[0].logprob - log(0.5)) < 1e-7 && top[0].logprob == top[1].logprob);
    assert_true(top[2].logprob == -INFINITY && c.logprob == top[0].logprob);
    /* all -inf: as equal as they can be */
    const float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    kern_logprobs_row(m, 4, 2, 0, &c, NULL);
    assert_true(fabs((double)c.logprob - log(0.25)) < 1e-7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_repetition_penalty_divides_positive_and_multiplies_negative_logits),
        cmocka_unit_test(test_additive_terms_add_to_the_logit),
        cmocka_unit_test(test_minus_infinity_bans_a_token_greedy_or_drawn),
        cmocka_unit_test(test_allowed_mask_limits_draws_to_its_tokens),
        cmocka_unit_test(test_greedy_rows_take_the_argmax_of_adjusted_logits),
        cmocka_unit_test(test_adjustment_order_in_the_list_does_not_matter),
        cmocka_unit_test(test_distinct_check_finds_repeated_tokens),
        cmocka_unit_test(test_min_p_keeps_exactly_the_tokens_within_min_p_of_the_best),
        cmocka_unit_test(test_min_p_edges),
        cmocka_unit_test(test_draws_with_every_parameter_are_a_function_of_seed_and_position),
        cmocka_unit_test(test_logprobs_are_a_log_softmax_summing_to_one),
        cmocka_unit_test(test_logprobs_top_is_ordered_by_logit_then_id_without_nans),
        cmocka_unit_test(test_logprobs_with_an_infinite_maximum_share_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
