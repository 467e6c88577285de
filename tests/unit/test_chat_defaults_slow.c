/* test_chat_defaults_slow.c - the default model answers a chat question without looping, at the
 * request layer's defaults (worker/request.c), as `folioctl chat` and every front end get them.
 *
 * Protects: the defaults come from one place and draw at random (temperature > 0 with top-k,
 * top-p, min-p): SmolLM2-135M answers "What is the capital of Italy?" greedily with a phrase
 * repeated to the length limit, and at the defaults no 8-gram of its answer comes 3 times in 128
 * tokens, over several seeds. The greedy case is checked too, so the n-gram check is shown to catch
 * the loop it is written for. Skipped (exit 77) without the default model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "folio_fields.h"
#include "request.h"
#include "test_util.h"

#define N_GEN   128
#define NGRAM   8
#define N_SEEDS 4

static char g_model[1024];
static engine_t *g_engine;

/* The most times any n-gram of tokens[0..n) occurs. */
static int max_ngram_repeats(const int32_t *tokens, int n)
{
    int most = n >= NGRAM ? 1 : 0;
    for (int i = 0; i + NGRAM <= n; i++) {
        int count = 0;
        for (int j = 0; j + NGRAM <= n; j++) count += !memcmp(tokens + i, tokens + j, NGRAM * sizeof *tokens);
        if (count > most) most = count;
    }
    return most;
}

/* One answer to the question through the request layer, as the worker resolves a Generate. */
static int answer(const Folio__V1__SamplingParams *sampling, int32_t *out)
{
    const tok_t *tok = g_engine->model->tok;
    const tok_chat_msg_t msg = {"user", "What is the capital of Italy?"};
    int32_t *ids = NULL;
    int cap = 0;
    fl_error_t err = {0};
    const int n = tok_encode_prompt(tok, NULL, 0, false, &msg, 1, &ids, &cap, &err);
    if (n <= 0) fail_msg("tokenize: %s", err.msg);
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.prompt_tokens = ids;
    g.n_prompt_tokens = (size_t)n;
    g.max_tokens = N_GEN;
    g.ignore_eos = true; /* 128 tokens whatever: a loop must show within them */
    g.sampling = (Folio__V1__SamplingParams *)sampling;
    request_defaults_t d;
    request_defaults_init(&d, g_engine->model->gguf);
    request_t rq;
    if (request_resolve(&rq, 0, &g, "", 0, &d, g_engine->model->cfg.n_vocab, &err)) fail_msg("resolve: %s", err.msg);
    gen_request_t r = {.req = rq.sched, .tokens = out};
    if (gen_run(g_engine->model, g_engine->kv, &r, 1, NULL, NULL, NULL, &err)) fail_msg("gen_run: %s", err.msg);
    request_release(&rq);
    free(ids);
    return r.n_tokens;
}

static void greedy_answer_loops(void **state)
{
    (void)state;
    Folio__V1__SamplingParams s = FOLIO__V1__SAMPLING_PARAMS__INIT;
    folio_sampling_set_temperature(&s, 0);
    int32_t out[N_GEN];
    const int n = answer(&s, out);
    assert_int_equal(n, N_GEN);
    const int most = max_ngram_repeats(out, n);
    printf("greedy: an 8-gram %d times\n", most);
    assert_true(most >= 3);
}

static void answers_at_the_defaults_do_not_loop(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= N_SEEDS; seed++) {
        Folio__V1__SamplingParams s = FOLIO__V1__SAMPLING_PARAMS__INIT; /* every field unset but the seed */
        s.seed = seed;
        int32_t out[N_GEN];
        const int n = answer(&s, out);
        const int most = max_ngram_repeats(out, n);
        printf("seed %llu: %d tokens, the most repeated 8-gram %d times\n", (unsigned long long)seed, n, most);
        assert_true(most < 3);
    }
}

static int setup(void **state)
{
    (void)state;
    if (!test_model_path(g_model, sizeof g_model)) exit(TEST_EXIT_SKIPPED);
    engine_opts_t o = {.model_path = g_model, .backend = "cpu", .max_seqs = 4};
    fl_error_t err = {0};
    g_engine = engine_new(&o, &err);
    if (!g_engine) {
        fprintf(stderr, "engine: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    engine_destroy(&g_engine);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(greedy_answer_loops),
        cmocka_unit_test(answers_at_the_defaults_do_not_loop),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
