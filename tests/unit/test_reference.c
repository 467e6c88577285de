/* test_reference.c - the default model generates what llama.cpp generates.
 *
 * Fixtures (tools/gen_references.py, llama-cpp-python 0.3.16 on the same GGUF): for each prompt,
 * llama.cpp's prompt token ids, its greedy 64-token continuation and, per step, its top-1 minus
 * top-2 logit margin. folio must produce the same prompt ids and the same continuation token for
 * token. A differing token is accepted only where llama.cpp's own margin is below NEAR_TIE (the two
 * best logits are that close, so rounding differences between two correct implementations may swap
 * them); every such case is printed, and the comparison of that prompt stops there since the
 * contexts differ afterwards. Also: all prompts decoded together in one batch give each prompt
 * exactly the tokens it gets alone. Exits 77 (ctest: Skipped) when the default model is absent.
 *
 * REF_KV_TYPE (test_reference_kv_*.c) runs the same checks with a quantized KV cache against
 * llama.cpp's references with that cache type (reference_*_kv_<type>.json: flash attention on). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "model_path.h"
#include "test_util.h"

#ifndef REF_KV_TYPE
#define REF_KV_TYPE "f16"
#endif

/* The fixture name for a kind ("greedy", "logits") and REF_KV_TYPE. */
static void fixture_path(char *path, size_t cap, const char *kind)
{
    const char *dir = getenv("FOLIO_FIXTURES");
    if (!strcmp(REF_KV_TYPE, "f16")) snprintf(path, cap, "%s/reference_%s.json", dir ? dir : "tests/fixtures", kind);
    else snprintf(path, cap, "%s/reference_%s_kv_%s.json", dir ? dir : "tests/fixtures", kind, REF_KV_TYPE);
}

/* Largest llama.cpp top-1/top-2 logit margin at which folio may pick the runner-up. */
#define NEAR_TIE 0.02

#define MAX_CASES 64

typedef struct ref_case {
    char name[64];
    bool chat;
    char *text;
    int32_t prompt[4096];
    int n_prompt;
    int32_t tokens[128];
    double margins[128];
    int n_tokens;
    bool stopped;
} ref_case_t;

static ref_case_t g_cases[MAX_CASES];
static int g_n_cases;
static engine_t *g_engine;

static int load_fixtures(void)
{
    char path[1024];
    fixture_path(path, sizeof path, "greedy");
    char *js = fl_read_file(path, NULL);
    if (!js) return -1;
    cJSON *root = cJSON_Parse(js);
    free(js);
    cJSON *cases = cJSON_GetObjectItem(root, "cases"), *c;
    cJSON_ArrayForEach(c, cases)
    {
        if (g_n_cases == MAX_CASES) break;
        ref_case_t *rc = &g_cases[g_n_cases++];
        snprintf(rc->name, sizeof rc->name, "%s", cJSON_GetObjectItem(c, "name")->valuestring);
        rc->chat = !strcmp(cJSON_GetObjectItem(c, "kind")->valuestring, "chat");
        rc->text = strdup(cJSON_GetObjectItem(c, "text")->valuestring);
        cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "prompt_tokens")) rc->prompt[rc->n_prompt++] = it->valueint;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "tokens")) rc->tokens[rc->n_tokens++] = it->valueint;
        int i = 0;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "margins")) rc->margins[i++] = it->valuedouble;
        rc->stopped = !strcmp(cJSON_GetObjectItem(c, "finish_reason")->valuestring, "stop");
    }
    cJSON_Delete(root);
    return g_n_cases > 0 ? 0 : -1;
}

static int setup(void **state)
{
    (void)state;
    const char *path = fl_model_path(NULL); /* main checked that it exists */
    if (load_fixtures()) return -1;
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = path, .backend = "cpu", .max_seqs = 32, .max_ctx = 1024,
                       .kv_budget_bytes = (size_t)256 << 20, .kv_type_k = kv_type_parse(REF_KV_TYPE),
                       .kv_type_v = kv_type_parse(REF_KV_TYPE)};
    g_engine = engine_new(&o, &err);
    if (!g_engine) fprintf(stderr, "engine: %s\n", err.msg);
    return g_engine ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    engine_destroy(&g_engine);
    for (int i = 0; i < g_n_cases; i++) free(g_cases[i].text);
    return 0;
}

static void prompt_token_ids_equal_llama_cpp(void **state)
{
    (void)state;
    const tok_t *tok = g_engine->model->tok;
    for (int i = 0; i < g_n_cases; i++) {
        ref_case_t *c = &g_cases[i];
        int32_t ids[4096];
        int n = tok_encode(tok, c->text, strlen(c->text), tok_add_bos(tok), c->chat, ids, 4096);
        if (n != c->n_prompt || memcmp(ids, c->prompt, (size_t)n * sizeof *ids))
            fail_msg("%s: prompt tokenizes to %d ids, llama.cpp gives %d (or ids differ)", c->name, n, c->n_prompt);
    }
}

/* Compares one continuation with llama.cpp's; returns the number of tokens that matched before the
 * end or a near-tie, or -1 (printed) on a real mismatch. */
static int compare_case(const ref_case_t *c, const gen_request_t *r)
{
    /* llama.cpp's list ends with the end-of-generation token when it stopped; folio reports the stop
     * as the finish reason instead of a token. */
    const int ref_n = c->stopped ? c->n_tokens - 1 : c->n_tokens;
    int i = 0;
    for (; i < ref_n && i < r->n_tokens; i++) {
        if (r->tokens[i] == c->tokens[i]) continue;
        if (c->margins[i] < NEAR_TIE) {
            printf("near-tie: %s step %d: folio %d, llama.cpp %d (margin %.5f < %.2f); rest of case not compared\n",
                   c->name, i, r->tokens[i], c->tokens[i], c->margins[i], NEAR_TIE);
            return i;
        }
        printf("MISMATCH: %s step %d: folio token %d, llama.cpp token %d (llama.cpp margin %.5f >= %.2f)\n", c->name,
               i, r->tokens[i], c->tokens[i], c->margins[i], NEAR_TIE);
        return -1;
    }
    if (i < ref_n) {
        if (r->finish == GEN_FINISH_STOP && c->margins[i] < NEAR_TIE) {
            printf("near-tie: %s step %d: folio stopped, llama.cpp %d (margin %.5f)\n", c->name, i, c->tokens[i],
                   c->margins[i]);
            return i;
        }
        printf("MISMATCH: %s: folio stopped after %d tokens (%s), llama.cpp continued\n", c->name, r->n_tokens,
               gen_finish_name(r->finish));
        return -1;
    }
    if (c->stopped && r->finish != GEN_FINISH_STOP && r->n_tokens > ref_n) {
        printf("MISMATCH: %s: llama.cpp stopped after %d tokens, folio continued with %d\n", c->name, ref_n,
               r->tokens[ref_n]);
        return -1;
    }
    return i;
}

static void run_cases_spec(gen_request_t *reqs, int32_t (*outs)[64], int first, int n, sched_spec_t spec)
{
    for (int i = 0; i < n; i++) {
        const ref_case_t *c = &g_cases[first + i];
        reqs[i] = (gen_request_t){.req.prompt = c->prompt, .req.n_prompt = c->n_prompt, .req.max_tokens = 64,
                                  .req.spec = spec, .tokens = outs[first + i]};
    }
    fl_error_t err = {0};
    assert_int_equal(gen_run_with_heads(g_engine->model, g_engine->kv, g_engine->medusa, reqs, n, NULL, NULL, NULL,
                                        &err),
                     0);
}

/* The references run without speculation. */
static void run_cases(gen_request_t *reqs, int32_t (*outs)[64], int first, int n)
{
    run_cases_spec(reqs, outs, first, n, SCHED_SPEC_NONE);
}

static gen_request_t g_alone[MAX_CASES];
static int32_t g_alone_out[MAX_CASES][64];

static void greedy_continuation_equals_llama_cpp(void **state)
{
    (void)state;
    int matched = 0, total = 0, near_ties = 0, mismatches = 0;
    for (int i = 0; i < g_n_cases; i++) {
        run_cases(&g_alone[i], g_alone_out, i, 1);
        const int m = compare_case(&g_cases[i], &g_alone[i]);
        const int ref_n = g_cases[i].stopped ? g_cases[i].n_tokens - 1 : g_cases[i].n_tokens;
        total += ref_n;
        if (m < 0) {
            mismatches++;
            continue;
        }
        matched += m;
        near_ties += m < ref_n;
    }
    printf("reference: %d cases, %d/%d tokens compared equal, %d cases cut at a near-tie (< %.2f), %d mismatches\n",
           g_n_cases, matched, total, near_ties, NEAR_TIE, mismatches);
    assert_int_equal(mismatches, 0);
}

static void batch_of_prompts_equals_each_alone(void **state)
{
    (void)state;
    static gen_request_t batch[MAX_CASES];
    static int32_t batch_out[MAX_CASES][64];
    for (int i = 0; i < g_n_cases; i++) run_cases(&g_alone[i], g_alone_out, i, 1);
    run_cases(batch, batch_out, 0, g_n_cases);
    for (int i = 0; i < g_n_cases; i++) {
        assert_int_equal(batch[i].n_tokens, g_alone[i].n_tokens);
        assert_int_equal(batch[i].finish, g_alone[i].finish);
        if (memcmp(batch_out[i], g_alone_out[i], (size_t)batch[i].n_tokens * sizeof(int32_t)))
            fail_msg("%s: batched output differs from the output alone", g_cases[i].name);
    }
}

/* Speculation is lossless on the default model: with n-gram drafts, and Medusa's trees when the
 * default heads are beside the model, every prompt gets the tokens it gets without speculation,
 * alone and all in one batch. */
static void speculation_gives_the_same_tokens_alone_and_batched(void **state)
{
    (void)state;
    static gen_request_t spec[MAX_CASES];
    static int32_t spec_out[MAX_CASES][64];
    for (int i = 0; i < g_n_cases; i++) run_cases(&g_alone[i], g_alone_out, i, 1);
    const sched_spec_t modes[2] = {SCHED_SPEC_NGRAM, SCHED_SPEC_MEDUSA};
    for (int mode = 0; mode < (g_engine->medusa ? 2 : 1); mode++)
        for (int batched = 0; batched < 2; batched++) {
            if (batched) run_cases_spec(spec, spec_out, 0, g_n_cases, modes[mode]);
            else
                for (int i = 0; i < g_n_cases; i++) run_cases_spec(&spec[i], spec_out, i, 1, modes[mode]);
            int drafted = 0, accepted = 0;
            for (int i = 0; i < g_n_cases; i++) {
                drafted += spec[i].n_drafted, accepted += spec[i].n_accepted;
                assert_int_equal(spec[i].n_tokens, g_alone[i].n_tokens);
                assert_int_equal(spec[i].finish, g_alone[i].finish);
                if (memcmp(spec_out[i], g_alone_out[i], (size_t)spec[i].n_tokens * sizeof(int32_t)))
                    fail_msg("%s: output with %s drafts%s differs from plain decoding", g_cases[i].name,
                             mode ? "Medusa" : "n-gram", batched ? ", batched," : "");
            }
            printf("speculation (%s, %s): %d cases identical to plain decoding; %d drafted, %d accepted\n",
                   mode ? "medusa" : "ngram", batched ? "batched" : "alone", g_n_cases, drafted, accepted);
            assert_true(drafted > 0);
        }
    if (!g_engine->medusa) printf("speculation: no Medusa heads beside the model, n-gram only\n");
}

/* llama.cpp's top-50 logits (rounded to 4 decimals in the fixture) at the first steps of two prompts,
 * run the way llama.cpp ran them (the prompt as one batch, then one token per step): folio's logits
 * for those ids must agree within the fixture's rounding, i.e. the arithmetic is the same. */
#define LOGIT_TOL 1e-4

static void logits_equal_llama_cpp_within_fixture_rounding(void **state)
{
    (void)state;
    char path[1024];
    fixture_path(path, sizeof path, "logits");
    char *js = fl_read_file(path, NULL);
    assert_non_null(js);
    cJSON *root = cJSON_Parse(js);
    free(js);
    assert_non_null(root);
    model_t *m = g_engine->model;
    kv_cache_t *kv = g_engine->kv;
    const int V = m->cfg.n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)V);
    int32_t *tables = calloc((size_t)m->max_blocks, sizeof(int32_t));
    int32_t pos[1024], seqs[1024], ctx[1024];
    int checked = 0;
    double worst = 0;
    cJSON *c, *st, *it;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases"))
    {
        int n_prompt = 0;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "prompt_tokens")) ctx[n_prompt++] = it->valueint;
        kv_seq_t seq;
        assert_int_equal(kv_seq_init(&seq, m->max_blocks), 0);
        int fed = 0; /* tokens already in the KV cache */
        cJSON_ArrayForEach(st, cJSON_GetObjectItem(c, "steps"))
        {
            int n_ctx = 0;
            cJSON_ArrayForEach(it, cJSON_GetObjectItem(st, "context_tokens")) ctx[n_ctx++] = it->valueint;
            assert_true(n_ctx > fed && n_ctx <= 1024);
            assert_int_equal(kv_seq_reserve(kv, &seq, n_ctx), 0);
            memcpy(tables, seq.blocks, sizeof(int32_t) * (size_t)seq.n_blocks);
            for (int i = fed; i < n_ctx; i++) {
                pos[i - fed] = i;
                seqs[i - fed] = 0;
            }
            const int32_t row = n_ctx - fed - 1;
            const model_batch_t b = {.n_tokens = n_ctx - fed, .tokens = ctx + fed, .pos = pos, .seq = seqs,
                                     .block_tables = tables, .n_seqs = 1, .logit_rows = &row, .n_logits = 1};
            fl_error_t err = {0};
            assert_int_equal(model_forward(m, kv, &b, &err), 0);
            assert_int_equal(model_logits(m, logits, 1), 0);
            fed = n_ctx;
            cJSON *ids = cJSON_GetObjectItem(st, "top_ids"), *vals = cJSON_GetObjectItem(st, "top_logits");
            for (int i = 0; i < cJSON_GetArraySize(ids); i++) {
                const int id = cJSON_GetArrayItem(ids, i)->valueint;
                const double d = fabs(logits[id] - cJSON_GetArrayItem(vals, i)->valuedouble);
                worst = d > worst ? d : worst;
                if (d > LOGIT_TOL)
                    fail_msg("%s step %d: logit of token %d is %.5f, llama.cpp %.4f",
                             cJSON_GetObjectItem(c, "name")->valuestring, cJSON_GetObjectItem(st, "step")->valueint,
                             id, logits[id], cJSON_GetArrayItem(vals, i)->valuedouble);
                checked++;
            }
        }
        kv_seq_free(kv, &seq);
    }
    printf("logits: %d compared, worst |folio - llama.cpp| = %.6f (fixture rounding 5e-5)\n", checked, worst);
    assert_true(checked > 0);
    free(logits);
    free(tables);
    cJSON_Delete(root);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(prompt_token_ids_equal_llama_cpp),
        cmocka_unit_test(greedy_continuation_equals_llama_cpp),
        cmocka_unit_test(batch_of_prompts_equals_each_alone),
        cmocka_unit_test(speculation_gives_the_same_tokens_alone_and_batched),
        cmocka_unit_test(logits_equal_llama_cpp_within_fixture_rounding),
    };
    if (access(fl_model_path(NULL), R_OK) != 0) {
        printf("SKIPPED: the model %s is missing (scripts/setup.sh fetches it)\n", fl_model_path(NULL));
        return TEST_EXIT_SKIPPED;
    }
    return cmocka_run_group_tests(tests, setup, teardown);
}
