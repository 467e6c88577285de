/* test_scheduler.c - the worker's scheduler (worker/scheduler.c) on a tiny random model.
 *
 * Protects: a request's tokens (greedy and sampled) are the same alone, batched, served partly from
 * the prefix cache and preempted then recomputed (over 1,500 tokens too); cancellation and deadlines finish requests and
 * free their KV; submission refuses what could never run; tenants never share blocks; a cache full
 * of unreferenced blocks is evicted, not a dead end; every request finishes exactly once under
 * memory pressure; requests join a running batch; stop ids, on_token's stop and the context's end
 * finish requests as documented; the liveness step runs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <regex.h>

#include "clock.h"
#include "engine.h"
#include "mkmodel.h"
#include "test_tiny_model.h"
#include "medusa.h"
#include "scheduler.h"

#define BLOCK 4
#define N_REQ 6
#define N_GEN 16
#define MAX_IDS 64
#define MAX_PROMPT 96


static int setup(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p); /* 2 layers, dim 64, F32, vocab 512, ctx 256 */
    p.seed = 11;
    return tiny_model_write("sched", &p);
}

/* The KV cache's element type and its bytes per token: 256 for the tiny model in f16 (2 layers x 2
 * KV heads x 16 dims x K,V x f16), 1 KiB per block. */
static int g_kv_type = FL_TYPE_F16;
static size_t g_kv_token_bytes = 256;

static engine_t *open_engine(int kv_blocks, int max_ctx)
{
    fl_error_t err = {0};
    /* Up to 64 tokens per step every row is computed the same way whatever the batch. */
    engine_opts_t o = {.model_path = g_tiny_model, .backend = "cpu", .threads = 2, .max_batch_tokens = 64,
                       .block_size = BLOCK, .max_seqs = 16, .max_ctx = max_ctx,
                       .kv_budget_bytes = (size_t)kv_blocks * g_kv_token_bytes * BLOCK, .kv_type_k = g_kv_type,
                       .kv_type_v = g_kv_type};
    engine_t *e = engine_new(&o, &err);
    if (!e) fail_msg("engine_new: %s", err.msg);
    assert_int_equal(e->kv->n_blocks, kv_blocks);
    return e;
}

/* What the callbacks saw, per request id. */
typedef struct record {
    int32_t tokens[MAX_IDS][256];
    int n_tokens[MAX_IDS];
    int n_finish[MAX_IDS];
    sched_result_t res[MAX_IDS];
    int stop_at[MAX_IDS]; /* on_token returns true at this index (-1: never) */
    sched_t *s;           /* for callbacks that call back in */
    int cancel_on_token;  /* id to cancel from on_token, -1: none */
} record_t;

static void record_init(record_t *r)
{
    memset(r, 0, sizeof *r);
    for (int i = 0; i < MAX_IDS; i++) r->stop_at[i] = -1;
    r->cancel_on_token = -1;
}

static bool on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    record_t *r = user;
    assert_true(id < MAX_IDS);
    assert_int_equal(index, r->n_tokens[id]); /* indices continue, never repeat */
    r->tokens[id][r->n_tokens[id]++] = token;
    if (r->cancel_on_token >= 0 && r->s) {
        assert_int_equal(sched_cancel(r->s, (uint64_t)r->cancel_on_token), 0);
        r->cancel_on_token = -1;
    }
    return r->stop_at[id] == index;
}

static void on_finish(void *user, const sched_result_t *res)
{
    record_t *r = user;
    assert_true(res->id < MAX_IDS);
    r->n_finish[res->id]++;
    r->res[res->id] = *res;
    assert_int_equal(res->n_generated, r->n_tokens[res->id]);
}

static sched_t *new_sched(engine_t *e, record_t *rec, const sched_opts_t *o)
{
    fl_error_t err = {0};
    const sched_callbacks_t cb = {.on_token = on_token, .on_finish = on_finish, .user = rec};
    sched_t *s = sched_new(e->model, e->kv, o, &cb, &err);
    if (!s) fail_msg("sched_new: %s", err.msg);
    rec->s = s;
    return s;
}

static void run_to_end(sched_t *s)
{
    fl_error_t err = {0};
    for (int i = 0; sched_has_work(s); i++) {
        if (sched_step(s, &err)) fail_msg("sched_step: %s", err.msg);
        assert_true(i < 100000);
    }
}

static int32_t g_prompts[N_REQ][MAX_PROMPT];
static int g_lens[N_REQ];

/* Prompts 0..2 share a 40-token prefix, as a system prompt would; the others are unrelated. */
static void make_prompts(void)
{
    uint32_t x = 99;
    for (int i = 0; i < N_REQ; i++) {
        g_lens[i] = 45 + i * 7;
        for (int j = 0; j < g_lens[i]; j++) {
            x = x * 1664525u + 1013904223u;
            g_prompts[i][j] = (i < 3 && j < 40) ? 10 + j * 3 : 3 + (int32_t)((x >> 8) % 500);
        }
    }
}

static sched_spec_t g_spec = SCHED_SPEC_AUTO; /* request()'s speculation */

static sched_request_t request(int i, float temperature)
{
    return (sched_request_t){.id = (uint64_t)i, .prompt = g_prompts[i], .n_prompt = g_lens[i],
                             .max_tokens = N_GEN, .ignore_eog = true, .spec = g_spec,
                             .sampling = {.temperature = temperature, .top_k = 40, .top_p = 0.9f,
                                          .seed = 500 + (uint64_t)i}};
}

static void submit(sched_t *s, const sched_request_t *r)
{
    fl_error_t err = {0};
    if (sched_submit(s, r, &err)) fail_msg("sched_submit: %s", err.msg);
}

/* Runs requests [first, first + n) together; returns the scheduler's stats. */
static sched_stats_t run_batch(engine_t *e, record_t *rec, const sched_opts_t *o, int first, int n, float temp)
{
    sched_t *s = new_sched(e, rec, o);
    for (int i = first; i < first + n; i++) {
        const sched_request_t r = request(i, temp);
        submit(s, &r);
    }
    run_to_end(s);
    sched_stats_t st;
    sched_get_stats(s, &st);
    assert_int_equal(st.kv_blocks_used, 0);
    sched_destroy(&s);
    assert_null(s);
    for (int i = first; i < first + n; i++) {
        assert_int_equal(rec->n_finish[i], 1);
        assert_int_equal(rec->res[i].finish, SCHED_FINISH_LENGTH);
        assert_int_equal(rec->n_tokens[i], N_GEN);
    }
    return st;
}

static void assert_same_tokens(const record_t *a, const record_t *b)
{
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(a->n_tokens[i], b->n_tokens[i]);
        assert_memory_equal(a->tokens[i], b->tokens[i], (size_t)a->n_tokens[i] * sizeof(int32_t));
    }
}

/* Draft tokens verified and accepted over a record's requests. */
static void count_drafts(const record_t *r, int *drafted, int *accepted)
{
    for (int i = 0; i < N_REQ; i++) *drafted += r->res[i].n_drafted, *accepted += r->res[i].n_accepted;
}

/* Speculation is lossless: the references (a) run without it, every other run with n-gram drafts
 * (some of them accepted), and the CPU's logits of a verified draft are those plain decoding
 * computes, so even sampled tokens (drawn by (seed, index)) are the same. */
static void identical_outputs(void)
{
    make_prompts();
    /* the second half of prompts 3.. repeats their first: drafts exist from the start */
    for (int i = 3; i < N_REQ; i++)
        for (int j = g_lens[i] / 2; j < g_lens[i]; j++) g_prompts[i][j] = g_prompts[i][j - g_lens[i] / 2];
    static record_t alone, batched, cached, preempted;
    for (int t = 0; t < 2; t++) {
        const float temp = t ? 0.8f : 0.0f; /* greedy, then sampled with fixed seeds */
        int drafted = 0, accepted = 0;
        /* (a) alone, no prefix cache, no speculation */
        record_init(&alone);
        engine_t *e = open_engine(256, 0);
        const sched_opts_t no_cache = {.no_prefix_cache = true, .spec_draft_all = true};
        g_spec = SCHED_SPEC_NONE;
        for (int i = 0; i < N_REQ; i++) run_batch(e, &alone, &no_cache, i, 1, temp);
        /* the same tokens as the simple generation loop */
        for (int i = 0; i < N_REQ; i++) {
            const sched_request_t sr = request(i, temp);
            int32_t out[N_GEN];
            gen_request_t g = {.req.prompt = sr.prompt, .req.n_prompt = sr.n_prompt, .req.max_tokens = N_GEN,
                               .req.sampling = sr.sampling, .req.ignore_eog = true, .req.spec = SCHED_SPEC_NONE,
                               .tokens = out};
            fl_error_t err = {0};
            assert_int_equal(gen_run(e->model, e->kv, &g, 1, NULL, NULL, NULL, &err), 0);
            assert_int_equal(g.n_tokens, N_GEN);
            assert_memory_equal(out, alone.tokens[i], sizeof out);
        }
        for (int i = 0; i < N_REQ; i++) assert_int_equal(alone.res[i].n_drafted, 0);
        g_spec = SCHED_SPEC_NGRAM;
        /* (a') alone, with speculation */
        record_init(&batched);
        for (int i = 0; i < N_REQ; i++) run_batch(e, &batched, &no_cache, i, 1, temp);
        assert_same_tokens(&alone, &batched);
        count_drafts(&batched, &drafted, &accepted);
        /* (b) all together, on a fresh cache: the shared prefix hits only across steps */
        record_init(&batched);
        run_batch(e, &batched, &no_cache, 0, N_REQ, temp);
        assert_same_tokens(&alone, &batched);
        count_drafts(&batched, &drafted, &accepted);
        /* (c) one after another with the prefix cache: prompts 1 and 2 find prompt 0's prefix, and
         * a second pass finds everything but the last block */
        record_init(&cached);
        const sched_opts_t with_cache = {.spec_draft_all = true};
        uint64_t hit = 0;
        for (int i = 0; i < N_REQ; i++) hit += run_batch(e, &cached, &with_cache, i, 1, temp).cached_prompt_tokens;
        assert_true(cached.res[1].n_cached >= 40 / BLOCK * BLOCK);
        assert_true(cached.res[2].n_cached >= 40 / BLOCK * BLOCK);
        assert_same_tokens(&alone, &cached);
        record_init(&cached);
        const sched_stats_t st = run_batch(e, &cached, &with_cache, 0, N_REQ, temp);
        assert_true(st.cached_prompt_tokens > hit);
        for (int i = 0; i < N_REQ; i++) assert_true(cached.res[i].n_cached > 0);
        assert_same_tokens(&alone, &cached);
        engine_destroy(&e);
        /* (d) a KV pool too small for all of them at once: sequences are preempted and recomputed */
        record_init(&preempted);
        e = open_engine(40, 0);
        const sched_stats_t pst = run_batch(e, &preempted, &with_cache, 0, N_REQ, temp);
        assert_true(pst.preemptions > 0);
        int n_preempted = 0;
        for (int i = 0; i < N_REQ; i++) n_preempted += preempted.res[i].preemptions;
        assert_int_equal(n_preempted, (int)pst.preemptions);
        assert_same_tokens(&alone, &preempted);
        engine_destroy(&e);
        /* ... and without the prefix cache, recomputing everything */
        record_init(&preempted);
        e = open_engine(40, 0);
        assert_true(run_batch(e, &preempted, &no_cache, 0, N_REQ, temp).preemptions > 0);
        assert_same_tokens(&alone, &preempted);
        count_drafts(&preempted, &drafted, &accepted);
        engine_destroy(&e);
        print_message("speculation at temperature %.1f: %d drafted, %d accepted\n", temp, drafted, accepted);
        if (temp == 0) assert_true(accepted > 0); /* (the seeds are fixed: this does not vary) */
        g_spec = SCHED_SPEC_AUTO;
    }
}

static void output_is_identical_alone_batched_cached_and_preempted(void **state)
{
    (void)state;
    identical_outputs();
}

/* The same with quantized KV blocks (Q8_0, Q4_0; a model of head_dim 32, whole blocks per head):
 * prefix-cache hits read blocks another request wrote, preempted sequences recompute theirs, and
 * every output equals the one alone. */
static void quantized_kv_outputs_identical_alone_cached_and_preempted(void **state)
{
    (void)state;
    char f16_model[sizeof g_tiny_model];
    memcpy(f16_model, g_tiny_model, sizeof f16_model);
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.seed = 12;
    p.n_heads = 2; /* head_dim 32 */
    assert_int_equal(tiny_model_write("sched_kvq", &p), 0);
    const int types[2] = {FL_TYPE_Q8_0, FL_TYPE_Q4_0};
    for (int t = 0; t < 2; t++) {
        g_kv_type = types[t];
        g_kv_token_bytes = 2 * 2 * kern_kv_row_bytes(types[t], 2 * 32);
        identical_outputs();
    }
    unlink(g_tiny_model);
    memcpy(g_tiny_model, f16_model, sizeof f16_model);
    g_kv_type = FL_TYPE_F16;
    g_kv_token_bytes = 256;
}

/* Three shared heads with W = 0 (r = h: each guesses the base model's next token again), saved
 * beside the tiny model as <model>.<name>.gguf (path) and loaded. */
static medusa_t *zero_heads(engine_t *e, const char *name, char *path, size_t cap)
{
    snprintf(path, cap, "%s.%s.gguf", g_tiny_model, name);
    const int dim = e->model->cfg.dim;
    float *zero = calloc((size_t)dim * dim, sizeof *zero);
    medusa_weights_t w = {.n_heads = 3, .shared_output = true, .fc = {zero, zero, zero}};
    fl_error_t err = {0};
    if (medusa_save(path, e->model, &w, &err)) fail_msg("medusa_save: %s", err.msg);
    free(zero);
    medusa_t *heads = medusa_load(path, e->model, &err);
    if (!heads) fail_msg("medusa_load: %s", err.msg);
    return heads;
}

/* Longer outputs, where this random model falls into loops that drafts predict: n-gram chains and
 * Medusa trees (heads with W = 0, which guess the base model's next token again; their runner-up
 * candidates make real trees, whose accepted paths' K/V are moved into place) give the tokens of
 * plain decoding, greedy and sampled, alone and batched, and release every block. */
#define SPEC_GEN 64
#define SPEC_REQ 4
static void speculative_long_outputs_equal_plain_decoding(void **state)
{
    (void)state;
    make_prompts();
    engine_t *e = open_engine(256, 0);
    char heads_path[300];
    medusa_t *heads = zero_heads(e, "medusa", heads_path, sizeof heads_path);
    static record_t plain, spec;
    for (int t = 0; t < 2; t++) {
        const float temp = t ? 0.5f : 0.0f;
        record_init(&plain);
        const sched_opts_t opts = {.medusa = heads, .spec_draft_all = true};
        for (int i = 0; i < SPEC_REQ; i++) {
            sched_t *s = new_sched(e, &plain, &opts);
            sched_request_t r = request(i, temp);
            r.max_tokens = SPEC_GEN, r.spec = SCHED_SPEC_NONE;
            submit(s, &r);
            run_to_end(s);
            sched_destroy(&s);
        }
        const sched_spec_t modes[2] = {SCHED_SPEC_NGRAM, SCHED_SPEC_MEDUSA};
        for (int mode = 0; mode < 2; mode++)
            for (int batched = 0; batched < 2; batched++) {
                record_init(&spec);
                sched_t *s = new_sched(e, &spec, &opts);
                for (int i = 0; i < SPEC_REQ; i++) {
                    sched_request_t r = request(i, temp);
                    r.max_tokens = SPEC_GEN, r.spec = modes[mode];
                    submit(s, &r);
                    if (!batched) run_to_end(s);
                }
                run_to_end(s);
                sched_stats_t st;
                sched_get_stats(s, &st);
                assert_int_equal(st.kv_blocks_used, 0);
                sched_destroy(&s);
                int drafted = 0, accepted = 0;
                for (int i = 0; i < SPEC_REQ; i++) {
                    assert_int_equal(spec.n_tokens[i], SPEC_GEN);
                    assert_memory_equal(spec.tokens[i], plain.tokens[i], SPEC_GEN * sizeof(int32_t));
                    drafted += spec.res[i].n_drafted, accepted += spec.res[i].n_accepted;
                }
                assert_int_equal((int)st.drafted_tokens, drafted);
                assert_int_equal((int)st.accepted_tokens, accepted);
                print_message("%s %s temperature %.1f: %d drafted, %d accepted in %llu verifications\n",
                              mode ? "medusa" : "ngram", batched ? "batched" : "alone", temp, drafted, accepted,
                              (unsigned long long)st.spec_seq_steps);
                assert_true(drafted > 0);
                if (temp == 0 && mode == 0) assert_true(accepted > 0);
            }
    }
    medusa_destroy(&heads);
    unlink(heads_path);
    engine_destroy(&e);
}

/* Constrained output: every completion matches its constraint (a choice, a regular expression),
 * greedy and sampled, alone and batched with an unconstrained request whose output stays its own;
 * with speculation (n-gram plus the drafts the constraint fixes) the tokens are those without, and
 * the fixed runs are drafted. The random model "wants" anything: the mask alone keeps it in line. */
#define CONS_GEN 48
static void cons_text(engine_t *e, const record_t *rec, int id, char *out, size_t cap)
{
    const int n = tok_decode(e->model->tok, rec->tokens[id], rec->n_tokens[id], false, out, cap);
    assert_true(n >= 0 && (size_t)n < cap);
    out[n] = 0;
}

/* The constraints of the tests below: a choice (one choice a prefix of none, one of two words) and a
 * regex with a fixed run, a repeat and an end. */
static const char *const choices[] = {"positive", "negative", "neutral", "mixed feelings"};
static const char *const regex = "(id|no)-[0-9]{3}(,[a-c]{2})*;";

static void constrained_outputs_match_with_and_without_speculation(void **state)
{
    (void)state;
    make_prompts();
    engine_t *e = open_engine(256, 0);
    /* heads with W = 0 guess the base model's tokens again: among the allowed ones under a constraint */
    char heads_path[300];
    medusa_t *heads = zero_heads(e, "cons.medusa", heads_path, sizeof heads_path);
    static record_t base, rec;
    for (int t = 0; t < 2; t++) {
        const float temp = t ? 0.8f : 0.0f;
        /* no speculation, then every draft verified: n-gram, Medusa, AUTO (n-gram first, then heads) */
        for (int mode = 0; mode < 4; mode++) {
            record_t *r = mode ? &rec : &base;
            record_init(r);
            const sched_opts_t opts = {.spec_draft_all = true, .medusa = mode >= 2 ? heads : NULL};
            sched_t *s = new_sched(e, r, &opts);
            for (int i = 0; i < 4; i++) {
                sched_request_t q = request(i, temp);
                q.max_tokens = CONS_GEN, q.ignore_eog = false;
                static const sched_spec_t modes[4] = {SCHED_SPEC_NONE, SCHED_SPEC_NGRAM, SCHED_SPEC_MEDUSA,
                                                      SCHED_SPEC_AUTO};
                q.spec = modes[mode];
                if (i == 0 || i == 2)
                    q.constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_CHOICE, .choices = choices, .n_choices = 4};
                else if (i == 1)
                    q.constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_REGEX, .text = regex};
                submit(s, &q); /* i == 3: unconstrained, in the same batches */
            }
            run_to_end(s);
            sched_stats_t st;
            sched_get_stats(s, &st);
            assert_int_equal(st.kv_blocks_used, 0);
            if (mode == 2) assert_true(st.heads_allowed_rows > 0); /* the heads ranked allowed tokens */
            sched_destroy(&s);
            char text[1024];
            for (int i = 0; i < 3; i++) {
                assert_int_equal(r->n_finish[i], 1);
                assert_int_equal(r->res[i].finish, SCHED_FINISH_STOP); /* complete: nothing can follow */
                cons_text(e, r, i, text, sizeof text);
                if (i != 1) {
                    bool one = false;
                    for (int c = 0; c < 4; c++) one |= !strcmp(text, choices[c]);
                    if (!one) fail_msg("request %d: '%s' is none of the choices", i, text);
                } else {
                    regex_t re;
                    assert_int_equal(regcomp(&re, "^(id|no)-[0-9]{3}(,[a-c]{2})*;$", REG_EXTENDED | REG_NOSUB), 0);
                    if (regexec(&re, text, 0, NULL, 0)) fail_msg("request 1: '%s' does not match %s", text, regex);
                    regfree(&re);
                }
            }
            if (mode) {
                assert_same_tokens(&base, &rec);
                int drafted = 0, accepted = 0;
                for (int i = 0; i < 3; i++) drafted += rec.res[i].n_drafted, accepted += rec.res[i].n_accepted;
                print_message("constrained, %s, temperature %.1f: %d drafted, %d accepted\n",
                              mode == 1 ? "n-gram" : mode == 2 ? "Medusa" : "auto", temp, drafted, accepted);
                assert_true(accepted > 0); /* "-" after "id", the rest of a choice, ... */
            }
        }
    }
    /* A constraint that does not compile is refused at submission, nothing queued. */
    record_init(&rec);
    sched_t *s = new_sched(e, &rec, &(sched_opts_t){0});
    sched_request_t q = request(0, 0);
    q.constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_REGEX, .text = "(unclosed"};
    fl_error_t err = {0};
    assert_int_equal(sched_submit(s, &q, &err), FL_EINVAL);
    assert_true(strlen(err.msg) > 0);
    assert_false(sched_has_work(s));
    sched_destroy(&s);
    medusa_destroy(&heads);
    remove(heads_path);
    engine_destroy(&e);
}

/* Logit rows constrained to a few tokens are projected onto those tokens only (model_batch_t.
 * logit_ids, kern_matmul_rows), beside an unconstrained request's whole rows in the same steps: the
 * same tokens as the full projection, which requests asking for log-probabilities (of the raw row)
 * still get; greedy and sampled, plain and with n-gram speculation (its verification rows each with
 * their node's allowed tokens). */
static void constrained_rows_project_onto_allowed_tokens_only(void **state)
{
    (void)state;
    make_prompts();
    engine_t *e = open_engine(256, 0);
    static record_t full, chosen;
    for (int t = 0; t < 2; t++)
        for (int spec = 0; spec < 2; spec++) {
            const float temp = t ? 0.8f : 0.0f;
            uint64_t rows[2];
            for (int pass = 0; pass < 2; pass++) { /* with log-probabilities (full rows), then without */
                record_t *r = pass ? &chosen : &full;
                record_init(r);
                const uint64_t before = e->model->chosen_logit_rows;
                sched_t *s = new_sched(e, r, &(sched_opts_t){.spec_draft_all = true});
                for (int i = 0; i < 4; i++) { /* 3: unconstrained, its rows whole in the same steps */
                    sched_request_t q = request(i, temp);
                    q.max_tokens = CONS_GEN, q.ignore_eog = false, q.logprobs = pass == 0;
                    q.spec = spec ? SCHED_SPEC_NGRAM : SCHED_SPEC_NONE;
                    if (i < 3)
                        q.constraint = i == 1 ? (sched_constraint_t){.kind = FL_CONSTRAINT_REGEX, .text = regex}
                                              : (sched_constraint_t){.kind = FL_CONSTRAINT_CHOICE, .choices = choices,
                                                                     .n_choices = 4};
                    submit(s, &q);
                }
                run_to_end(s);
                sched_destroy(&s);
                rows[pass] = e->model->chosen_logit_rows - before;
            }
            for (int i = 0; i < 4; i++) {
                assert_int_equal(chosen.n_tokens[i], full.n_tokens[i]);
                assert_memory_equal(chosen.tokens[i], full.tokens[i], (size_t)full.n_tokens[i] * sizeof(int32_t));
            }
            print_message("temperature %.1f%s: %llu logit rows on their allowed tokens only\n", temp,
                          spec ? ", n-gram" : "", (unsigned long long)rows[1]);
            assert_int_equal(rows[0], 0);
            assert_true(rows[1] > 0);
        }
    engine_destroy(&e);
}

/* Long generations: the CPU backend sums prompt tokens and generated tokens in different orders
 * (llama.cpp's), so a sequence recomputed after preemption must keep each token's order by its role,
 * not by how many of its tokens the recomputing step holds; the latter made outputs part from a
 * straight run after ~900-1,300 tokens (e2e_test_cluster's faults case failed 1 run in ~30). Model:
 * e2e_test_cluster's shape (4 layers, dim 256, head_dim 64, Q8_0, 2 KiB of KV a token). */
#define LONG_GEN 1500
#define LONG_PROMPT 64
typedef struct long_record {
    int32_t tokens[2][LONG_GEN];
    int n[2], preemptions[2];
} long_record_t;

static bool long_on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    long_record_t *r = user;
    r->tokens[id][index] = token;
    r->n[id] = index + 1;
    return false;
}

static void long_on_finish(void *user, const sched_result_t *res)
{
    ((long_record_t *)user)->preemptions[res->id] = res->preemptions;
}

/* Requests ids[0..n) (prompts[id]) on a fresh engine with kv_bytes of KV (0: plenty). */
static void run_long(const char *model, size_t kv_bytes, const int *ids, int n, int32_t prompts[2][LONG_PROMPT],
                     long_record_t *rec)
{
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = model, .backend = "cpu", .threads = 2, .kv_budget_bytes = kv_bytes};
    engine_t *e = engine_new(&o, &err);
    if (!e) fail_msg("engine_new: %s", err.msg);
    const sched_callbacks_t cb = {.on_token = long_on_token, .on_finish = long_on_finish, .user = rec};
    sched_t *s = sched_new(e->model, e->kv, &(sched_opts_t){0}, &cb, &err);
    if (!s) fail_msg("sched_new: %s", err.msg);
    for (int i = 0; i < n; i++)
        submit(s, &(sched_request_t){.id = (uint64_t)ids[i], .prompt = prompts[ids[i]], .n_prompt = LONG_PROMPT,
                                     .max_tokens = LONG_GEN, .ignore_eog = true});
    run_to_end(s);
    sched_destroy(&s);
    engine_destroy(&e);
}

static void long_generation_preempted_and_recomputed_keeps_its_tokens(void **state)
{
    (void)state;
    char model[256];
    snprintf(model, sizeof model, "/tmp/folio_test_sched_long_%d.gguf", (int)getpid());
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 4, p.dim = 256, p.ff = 768, p.n_heads = 4, p.n_kv_heads = 2, p.ctx = 2048;
    p.type = FL_TYPE_Q8_0, p.seed = 11;
    fl_error_t err = {0};
    if (mkmodel_write(&p, model, &err)) fail_msg("mkmodel: %s", err.msg);
    int parted_runs = 0;
    for (int round = 0; round < 3; round++) {
        int32_t prompts[2][LONG_PROMPT];
        uint32_t x = 1234u + 77u * (uint32_t)round;
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < LONG_PROMPT; j++) {
                x = x * 1664525u + 1013904223u;
                prompts[i][j] = 1 + (int32_t)((x >> 8) % 500);
            }
        static long_record_t alone, pair;
        memset(&alone, 0, sizeof alone);
        memset(&pair, 0, sizeof pair);
        run_long(model, 0, (const int[]){1}, 1, prompts, &alone);
        /* room for about 1.4 of the two sequences: request 1, the younger, is preempted once request 0
         * needs its blocks, and recomputed (prompt and generated tokens in 512-token chunks) after */
        run_long(model, (size_t)2200 * 2048, (const int[]){0, 1}, 2, prompts, &pair);
        assert_int_equal(alone.n[1], LONG_GEN);
        assert_int_equal(pair.n[1], LONG_GEN);
        assert_int_equal(pair.preemptions[1], 1);
        int d = 0;
        while (d < LONG_GEN && alone.tokens[1][d] == pair.tokens[1][d]) d++;
        if (d < LONG_GEN) {
            fprintf(stderr, "round %d: preempted output parts from the straight run at token %d\n", round, d);
            parted_runs++;
        }
    }
    unlink(model);
    assert_int_equal(parted_runs, 0);
}

static void cancel_frees_kv_and_reports_once(void **state)
{
    (void)state;
    make_prompts();
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(128, 0);
    sched_t *s = new_sched(e, &rec, NULL);
    for (int i = 0; i < 3; i++) {
        const sched_request_t r = request(i, 0);
        submit(s, &r);
    }
    fl_error_t err = {0};
    for (int i = 0; i < 3; i++) assert_int_equal(sched_step(s, &err), 0);
    sched_stats_t st;
    sched_get_stats(s, &st);
    assert_true(st.kv_blocks_used > 0);
    assert_int_equal(sched_cancel(s, 1), 0);
    assert_int_equal(rec.n_finish[1], 1);
    assert_int_equal(rec.res[1].finish, SCHED_FINISH_CANCELLED);
    assert_int_equal(sched_cancel(s, 1), FL_ENOTFOUND);
    assert_int_equal(sched_cancel(s, 77), FL_ENOTFOUND);
    sched_cancel_all(s);
    assert_int_equal(rec.n_finish[0], 1);
    assert_int_equal(rec.n_finish[2], 1);
    assert_int_equal(rec.res[0].finish, SCHED_FINISH_CANCELLED);
    assert_false(sched_has_work(s));
    sched_get_stats(s, &st);
    assert_int_equal(st.kv_blocks_used, 0);
    assert_int_equal(st.running + st.waiting, 0);
    /* Destroying a scheduler with live requests cancels them through the callbacks. */
    const sched_request_t r = request(3, 0);
    submit(s, &r);
    assert_int_equal(sched_step(s, &err), 0);
    sched_destroy(&s);
    assert_int_equal(rec.n_finish[3], 1);
    assert_int_equal(rec.res[3].finish, SCHED_FINISH_CANCELLED);
    assert_int_equal(kv_cache_used_blocks(e->kv), 0);
    engine_destroy(&e);
}

static void callback_may_cancel_another_request_mid_step(void **state)
{
    (void)state;
    make_prompts();
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(128, 0);
    sched_t *s = new_sched(e, &rec, NULL);
    for (int i = 0; i < 3; i++) {
        const sched_request_t r = request(i, 0);
        submit(s, &r);
    }
    rec.cancel_on_token = 2; /* from the first on_token of the first step that samples */
    run_to_end(s);
    assert_int_equal(rec.n_finish[2], 1);
    assert_int_equal(rec.res[2].finish, SCHED_FINISH_CANCELLED);
    assert_int_equal(rec.res[0].finish, SCHED_FINISH_LENGTH);
    sched_destroy(&s);
    engine_destroy(&e);
}

static void deadline_expiry_finishes_with_deadline(void **state)
{
    (void)state;
    make_prompts();
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(128, 0);
    sched_t *s = new_sched(e, &rec, NULL);
    sched_request_t r = request(0, 0);
    r.deadline = fl_clock_s() + 3600;
    submit(s, &r);
    r = request(1, 0);
    r.deadline = fl_clock_s() + 0.05;
    submit(s, &r);
    fl_error_t err = {0};
    assert_int_equal(sched_step(s, &err), 0);
    usleep(80 * 1000);
    run_to_end(s);
    assert_int_equal(rec.res[1].finish, SCHED_FINISH_DEADLINE);
    assert_int_equal(rec.n_finish[1], 1);
    assert_true(rec.res[1].t_done >= r.deadline);
    assert_int_equal(rec.res[0].finish, SCHED_FINISH_LENGTH);
    /* A request still waiting when its deadline passes never runs. */
    r = request(2, 0);
    r.deadline = fl_clock_s() - 1;
    submit(s, &r);
    assert_int_equal(sched_step(s, &err), 0);
    assert_int_equal(rec.res[2].finish, SCHED_FINISH_DEADLINE);
    assert_int_equal(rec.res[2].t_scheduled, 0);
    assert_int_equal(rec.n_tokens[2], 0);
    sched_destroy(&s);
    engine_destroy(&e);
}

static void submit_refuses_never_fitting_with_erange_and_bad_with_einval(void **state)
{
    (void)state;
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(16, 128); /* 15 usable blocks of 4: 60 tokens; context 128 */
    sched_t *s = new_sched(e, &rec, &(sched_opts_t){.max_waiting = 2});
    int32_t prompt[200];
    for (int i = 0; i < 200; i++) prompt[i] = 3 + i;
    fl_error_t err = {0};
    sched_request_t r = {.id = 1, .prompt = prompt, .n_prompt = 0, .max_tokens = 4};
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    r.n_prompt = 10;
    r.max_tokens = -1;
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    r.max_tokens = 4;
    r.n_prompt = 128; /* the whole context: no room for a token */
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "context"));
    r.n_prompt = 10;
    prompt[3] = 100000;
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    prompt[3] = 6;
    r.n_prompt = 50;
    r.max_tokens = 20; /* 70 tokens: 18 blocks, more than 15 */
    assert_int_equal(sched_submit(s, &r, &err), FL_ERANGE);
    assert_non_null(strstr(err.msg, "KV blocks"));
    r.max_tokens = 10; /* exactly 15 blocks */
    assert_int_equal(sched_submit(s, &r, &err), 0);
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL); /* id 1 is live */
    r.id = 2;
    assert_int_equal(sched_submit(s, &r, &err), 0);
    r.id = 3;
    assert_int_equal(sched_submit(s, &r, &err), FL_EBUSY); /* queue of 2 is full: retryable */
    assert_non_null(strstr(err.msg, "queue"));
    assert_int_equal(rec.n_finish[3], 0);
    /* max_tokens 0 is accepted and finished at once. */
    r.id = 4;
    r.max_tokens = 0;
    sched_cancel_all(s);
    assert_int_equal(sched_submit(s, &r, &err), 0);
    assert_int_equal(rec.n_finish[4], 1);
    assert_int_equal(rec.res[4].finish, SCHED_FINISH_LENGTH);
    sched_destroy(&s);
    engine_destroy(&e);
}

static void generation_stops_with_length_at_the_context_end(void **state)
{
    (void)state;
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(64, 32);
    sched_t *s = new_sched(e, &rec, NULL);
    int32_t prompt[29];
    for (int i = 0; i < 29; i++) prompt[i] = 20 + i;
    const sched_request_t r = {.id = 5, .prompt = prompt, .n_prompt = 29, .max_tokens = 100, .ignore_eog = true};
    submit(s, &r);
    run_to_end(s);
    assert_int_equal(rec.res[5].finish, SCHED_FINISH_LENGTH);
    assert_int_equal(rec.res[5].n_generated, 3); /* positions 29, 30, 31 of a context of 32 */
    sched_destroy(&s);
    engine_destroy(&e);
}

static void tenants_with_different_salts_never_share_blocks(void **state)
{
    (void)state;
    make_prompts();
    static record_t rec;
    engine_t *e = open_engine(256, 0);
    sched_t *s = new_sched(e, &rec, NULL);
    const block_hash_t salt_a = block_hash_salt("alice", 5), salt_b = block_hash_salt("bob", 3);
    const block_hash_t salts[3] = {salt_a, salt_b, salt_a};
    const int expect_cached[3] = {0, 0, g_lens[0] / BLOCK * BLOCK}; /* same tokens, other tenant: no hit */
    for (int t = 0; t < 3; t++) {
        record_init(&rec);
        rec.s = s;
        sched_request_t r = request(0, 0);
        r.salt = salts[t];
        submit(s, &r);
        run_to_end(s);
        assert_int_equal(rec.res[0].n_cached, expect_cached[t]);
    }
    sched_destroy(&s);
    engine_destroy(&e);
}

static void lru_eviction_keeps_running_when_cache_is_full_of_unreferenced_blocks(void **state)
{
    (void)state;
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(32, 0); /* 31 usable blocks: about two requests' worth */
    sched_t *s = new_sched(e, &rec, NULL);
    int32_t prompt[48];
    for (int k = 0; k < 8; k++) {
        for (int i = 0; i < 48; i++) prompt[i] = 3 + (k * 131 + i * 17) % 500;
        const sched_request_t r = {.id = (uint64_t)k, .prompt = prompt, .n_prompt = 48, .max_tokens = 8,
                                   .ignore_eog = true};
        submit(s, &r);
        run_to_end(s);
        assert_int_equal(rec.res[k].finish, SCHED_FINISH_LENGTH);
        sched_stats_t st;
        sched_get_stats(s, &st);
        assert_int_equal(st.kv_blocks_used, 0);
        assert_true(st.kv_blocks_cached > 0);
    }
    assert_true(e->kv->evictions > 0);
    /* The most recent prompt is still cached; the first was evicted long ago. */
    const sched_request_t again = {.id = 20, .prompt = prompt, .n_prompt = 48, .max_tokens = 1, .ignore_eog = true};
    submit(s, &again);
    run_to_end(s);
    assert_int_equal(rec.res[20].n_cached, 44); /* all 12 blocks hit; the last is recomputed for logits */
    for (int i = 0; i < 48; i++) prompt[i] = 3 + (i * 17) % 500;
    const sched_request_t first = {.id = 21, .prompt = prompt, .n_prompt = 48, .max_tokens = 1, .ignore_eog = true};
    submit(s, &first);
    run_to_end(s);
    assert_int_equal(rec.res[21].n_cached, 0);
    sched_destroy(&s);
    engine_destroy(&e);
}

/* Requests sharing a prompt prefix, submitted together: the first computes it, the others wait for
 * its blocks instead of computing them a second time (their n_cached), an unrelated request behind
 * them is served too, and every output equals its run alone. */
static void requests_wait_for_a_prefix_another_is_computing(void **state)
{
    (void)state;
    enum { N = 4, LEN = 40, SHARED = 32 };
    static int32_t prompts[N + 1][LEN];
    for (int k = 0; k <= N; k++)
        for (int i = 0; i < LEN; i++)
            prompts[k][i] = i < SHARED && k < N ? 3 + (i * 37) % 500 : 3 + (k * 101 + i * 13) % 500;
    static record_t alone[N + 1], together;
    int32_t want[N + 1][8];
    for (int k = 0; k <= N; k++) { /* each alone, on a fresh engine: nothing cached */
        record_init(&alone[k]);
        engine_t *e = open_engine(256, 0);
        sched_t *s = new_sched(e, &alone[k], NULL);
        const sched_request_t r = {.id = 0, .prompt = prompts[k], .n_prompt = LEN, .max_tokens = 8, .ignore_eog = true};
        submit(s, &r);
        run_to_end(s);
        memcpy(want[k], alone[k].tokens[0], sizeof want[k]);
        sched_destroy(&s);
        engine_destroy(&e);
    }
    record_init(&together);
    engine_t *e = open_engine(256, 0);
    sched_t *s = new_sched(e, &together, NULL);
    for (int k = 0; k <= N; k++) {
        const sched_request_t r = {.id = (uint64_t)k, .prompt = prompts[k], .n_prompt = LEN, .max_tokens = 8,
                                   .ignore_eog = true};
        submit(s, &r);
    }
    run_to_end(s);
    assert_int_equal(together.res[0].n_cached, 0);
    for (int k = 1; k < N; k++) assert_int_equal(together.res[k].n_cached, SHARED);
    assert_int_equal(together.res[N].n_cached, 0);
    for (int k = 0; k <= N; k++) {
        assert_int_equal(together.res[k].n_generated, 8);
        assert_memory_equal(together.tokens[k], want[k], sizeof want[k]);
    }
    sched_destroy(&s);
    engine_destroy(&e);
}

static void many_requests_under_memory_pressure_all_finish_exactly_once(void **state)
{
    (void)state;
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(48, 0);
    /* spec_draft_all: drafts (and so the blocks they take) must not depend on measured step times,
     * or whether anything is preempted would vary from run to run. */
    sched_t *s = new_sched(e, &rec, &(sched_opts_t){.max_running = 8, .max_batch_tokens = 32, .spec_draft_all = true});
    enum { N = 40 };
    static int32_t prompts[N][40];
    for (int k = 0; k < N; k++) {
        const int len = 5 + k % 30;
        for (int i = 0; i < len; i++) prompts[k][i] = 3 + (k * 7 + i * 13) % 500;
        const sched_request_t r = {.id = (uint64_t)k, .prompt = prompts[k], .n_prompt = len,
                                   .max_tokens = 6 + k % 11, .ignore_eog = true};
        submit(s, &r);
    }
    run_to_end(s);
    sched_stats_t st;
    sched_get_stats(s, &st);
    for (int k = 0; k < N; k++) {
        assert_int_equal(rec.n_finish[k], 1);
        assert_int_equal(rec.res[k].finish, SCHED_FINISH_LENGTH);
        assert_int_equal(rec.res[k].n_generated, 6 + k % 11);
        assert_true(rec.res[k].t_submit <= rec.res[k].t_scheduled);
        assert_true(rec.res[k].t_scheduled <= rec.res[k].t_first_token);
        assert_true(rec.res[k].t_first_token <= rec.res[k].t_done);
    }
    assert_true(st.preemptions > 0);
    assert_int_equal(st.kv_blocks_used, 0);
    sched_destroy(&s);
    engine_destroy(&e);
}

/* Admitting on an exact fit made the next decode preempt the newcomer, which re-entered at once:
 * a recompute every step. Admission now leaves each running sequence room for its growth up to
 * its end (at most SCHED_LOOKAHEAD_BLOCKS). n_b: the newcomer's prompt length. */
static void run_headroom_case(int n_b)
{
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(10, 0); /* 9 usable blocks of 4 tokens (one is the liveness block) */
    sched_t *s = new_sched(e, &rec, &(sched_opts_t){.no_prefix_cache = true});
    static int32_t a[15], b[19];
    for (int i = 0; i < 15; i++) a[i] = 3 + i;
    for (int i = 0; i < n_b; i++) b[i] = 40 + i;
    submit(s, &(sched_request_t){.id = 0, .prompt = a, .n_prompt = 15, .max_tokens = 8, .ignore_eog = true});
    fl_error_t err = {0};
    assert_int_equal(sched_step(s, &err), 0); /* A holds 4 blocks, 5 are free */
    /* A will need 2 more blocks (23 tokens at its end). B of 19 tokens needs 5: an exact fit, but A's
     * next token needs a block at once. B of 15 needs 4, leaving 1: A's second block is missing. */
    submit(s, &(sched_request_t){.id = 1, .prompt = b, .n_prompt = n_b, .max_tokens = 8, .ignore_eog = true});
    run_to_end(s);
    sched_stats_t st;
    sched_get_stats(s, &st);
    assert_int_equal(st.preemptions, 0);
    for (int k = 0; k < 2; k++) {
        assert_int_equal(rec.n_finish[k], 1);
        assert_int_equal(rec.res[k].n_generated, 8);
    }
    sched_destroy(&s);
    engine_destroy(&e);
}

static void admission_leaves_headroom_so_a_newcomer_is_not_preempted_at_once(void **state)
{
    (void)state;
    run_headroom_case(19);
    run_headroom_case(15);
}

static void requests_submitted_between_steps_join_the_running_batch(void **state)
{
    (void)state;
    make_prompts();
    static record_t alone, joined;
    record_init(&alone);
    engine_t *e = open_engine(256, 0);
    const sched_opts_t no_cache = {.no_prefix_cache = true};
    run_batch(e, &alone, &no_cache, 3, 1, 0);
    run_batch(e, &alone, &no_cache, 4, 1, 0);
    record_init(&joined);
    sched_t *s = new_sched(e, &joined, &no_cache);
    sched_request_t r = request(3, 0);
    submit(s, &r);
    fl_error_t err = {0};
    for (int i = 0; i < 4; i++) assert_int_equal(sched_step(s, &err), 0);
    assert_true(joined.n_tokens[3] > 0);
    r = request(4, 0);
    submit(s, &r);
    assert_int_equal(sched_step(s, &err), 0);
    sched_stats_t st;
    sched_get_stats(s, &st);
    assert_int_equal(st.running, 2);
    run_to_end(s);
    for (int i = 3; i < 5; i++)
        assert_memory_equal(alone.tokens[i], joined.tokens[i], N_GEN * sizeof(int32_t));
    sched_destroy(&s);
    engine_destroy(&e);
}

static void stop_ids_and_on_token_stop_finish_with_stop(void **state)
{
    (void)state;
    make_prompts();
    static record_t ref, rec;
    record_init(&ref);
    engine_t *e = open_engine(256, 0);
    run_batch(e, &ref, NULL, 0, 1, 0);
    /* on_token returning true at index 3: four tokens reported, then STOP. */
    record_init(&rec);
    rec.stop_at[0] = 3;
    sched_t *s = new_sched(e, &rec, NULL);
    sched_request_t r = request(0, 0);
    submit(s, &r);
    run_to_end(s);
    assert_int_equal(rec.res[0].finish, SCHED_FINISH_STOP);
    assert_int_equal(rec.n_tokens[0], 4);
    /* A stop id ends the request without reporting that token. */
    int k = 1; /* the first token that did not occur before it */
    for (bool seen = true; seen && k < N_GEN; k += seen) {
        seen = false;
        for (int j = 0; j < k; j++) seen |= ref.tokens[0][j] == ref.tokens[0][k];
    }
    assert_true(k < N_GEN);
    record_init(&rec);
    rec.s = s;
    const int32_t stop[2] = {1, ref.tokens[0][k]};
    r.stop_ids = stop;
    r.n_stop_ids = 2;
    submit(s, &r);
    run_to_end(s);
    assert_int_equal(rec.res[0].finish, SCHED_FINISH_STOP);
    assert_int_equal(rec.n_tokens[0], k);
    assert_memory_equal(rec.tokens[0], ref.tokens[0], (size_t)k * sizeof(int32_t));
    sched_destroy(&s);
    engine_destroy(&e);
}

/* --- step cost ---------------------------------------------------------------------------------- */

typedef struct step_log {
    int n, tokens[64];
    double expected[64];
} step_log_t;

static void log_step(void *user, int n_tokens, double expected_s)
{
    step_log_t *l = user;
    if (l->n < 64) l->tokens[l->n] = n_tokens, l->expected[l->n] = expected_s;
    l->n++;
}

static void log_finish(void *user, const sched_result_t *res) { (void)user, (void)res; }

/* A prompt chunk costs its tokens plus its attention pairs, so chunks deep in a long prompt are
 * smaller than the first (a fixed token count made each step longer than the one before); after a
 * few steps the scheduler expects a positive duration for each. */
static void prompt_chunks_shrink_with_the_context_they_read(void **state)
{
    (void)state;
    engine_t *e = open_engine(80, 0);
    step_log_t log = {0};
    const sched_callbacks_t cb = {.on_finish = log_finish, .on_step = log_step, .user = &log};
    fl_error_t err = {0};
    sched_t *s = sched_new(e->model, e->kv, &(sched_opts_t){.max_batch_tokens = 64, .no_prefix_cache = true}, &cb, &err);
    assert_non_null(s);
    enum { N = 240 };
    static int32_t prompt[N];
    for (int i = 0; i < N; i++) prompt[i] = 3 + (i * 17) % 500;
    assert_int_equal(sched_submit(s, &(sched_request_t){.id = 1, .prompt = prompt, .n_prompt = N, .max_tokens = 1,
                                                        .ignore_eog = true},
                                  &err),
                     0);
    while (sched_has_work(s)) assert_int_equal(sched_step(s, &err), 0);
    sched_destroy(&s);
    assert_true(log.n >= 5);
    int sum = 0;
    for (int i = 0; i < log.n; i++) {
        assert_true(log.tokens[i] > 0 && log.tokens[i] <= 64);
        if (i > 0) assert_true(log.tokens[i] <= log.tokens[i - 1]); /* never larger deeper in */
        sum += log.tokens[i];
    }
    assert_int_equal(sum, N);
    /* and smaller by the end (the last chunk aside: it is what remains) */
    assert_true(log.tokens[log.n - 2] < log.tokens[0]);
    assert_true(log.expected[log.n - 1] > 0);
    engine_destroy(&e);
}

static void liveness_returns_a_positive_duration(void **state)
{
    (void)state;
    static record_t rec;
    record_init(&rec);
    engine_t *e = open_engine(8, 0);
    sched_t *s = new_sched(e, &rec, NULL);
    sched_stats_t st;
    sched_get_stats(s, &st);
    assert_int_equal(st.kv_blocks_total, 7); /* one block reserved */
    assert_int_equal(st.kv_blocks_used, 0);
    fl_error_t err = {0};
    const double dt = sched_liveness(s, &err);
    assert_true(dt > 0);
    assert_true(dt < 10);
    sched_destroy(&s);
    assert_int_equal(kv_cache_free_blocks(e->kv), 8);
    assert_string_equal(sched_finish_name(SCHED_FINISH_DEADLINE), "deadline");
    engine_destroy(&e);
}

/* --- penalties, logit bias and log-probabilities against a direct computation ----------------- */

#define PEN_PROMPT 10
#define PEN_GEN    24

typedef struct pen_record {
    int32_t tokens[PEN_GEN];
    sched_logprobs_t lps[PEN_GEN];
    int n;
} pen_record_t;

static bool pen_on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)id;
    pen_record_t *r = user;
    r->tokens[index] = token;
    if (lp) r->lps[index] = *lp;
    r->n = index + 1;
    return false;
}

static void pen_on_finish(void *user, const sched_result_t *res) { (void)user, (void)res; }

/* The raw logits of the sequence's next token, by a forward pass over all of it from position 0
 * (prompt_len keeps each token's summation order by its role, as in the scheduler's steps). */
static void direct_logits(engine_t *e, const int32_t *tokens, int n, int n_prompt, float *logits)
{
    model_t *m = e->model;
    kv_seq_t seq;
    assert_int_equal(kv_seq_init(&seq, m->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(e->kv, &seq, n), 0);
    int32_t pos[PEN_PROMPT + PEN_GEN], row[PEN_PROMPT + PEN_GEN];
    int32_t *table = calloc((size_t)m->max_blocks, sizeof *table);
    memcpy(table, seq.blocks, (size_t)seq.n_blocks * sizeof *table);
    for (int i = 0; i < n; i++) pos[i] = i, row[i] = 0;
    const int32_t logit_row = n - 1, prompt_len = n_prompt;
    const model_batch_t b = {.n_tokens = n, .tokens = tokens, .pos = pos, .seq = row, .block_tables = table,
                             .n_seqs = 1, .prompt_len = &prompt_len, .logit_rows = &logit_row, .n_logits = 1};
    fl_error_t err = {0};
    if (model_forward(m, e->kv, &b, &err)) fail_msg("forward: %s", err.msg);
    assert_int_equal(model_logits_row(m, logits, 0), 0);
    free(table);
    kv_seq_free(e->kv, &seq);
}

static void penalties_bias_and_logprobs_equal_a_direct_computation(void **state)
{
    (void)state;
    engine_t *e = open_engine(64, 0);
    const int vocab = e->model->cfg.n_vocab;
    int32_t seq[PEN_PROMPT + PEN_GEN];
    for (int i = 0; i < PEN_PROMPT; i++) seq[i] = (int32_t)(7 + 13 * i) % vocab;
    const float rep = 1.6f, presence = 0.4f, frequency = 0.3f;
    const int window = 6;
    const int32_t banned = 5, favoured = 77;
    kern_logit_adjust_t bias[2] = {{.token = banned, .penalty = 1, .add = -INFINITY},
                                   {.token = favoured, .penalty = 1, .add = 1.5f}};
    pen_record_t rec = {0};
    const sched_callbacks_t cb = {.on_token = pen_on_token, .on_finish = pen_on_finish, .user = &rec};
    fl_error_t err = {0};
    sched_t *s = sched_new(e->model, e->kv, NULL, &cb, &err);
    assert_non_null(s);
    const sched_request_t r = {.id = 1, .prompt = seq, .n_prompt = PEN_PROMPT, .max_tokens = PEN_GEN,
                               .ignore_eog = true, .logprobs = true, .top_logprobs = 3,
                               .penalties = {.repetition = rep, .repetition_last_n = window, .presence = presence,
                                             .frequency = frequency, .bias = bias, .n_bias = 2}};
    assert_int_equal(sched_submit(s, &r, &err), 0);
    while (sched_has_work(s)) assert_int_equal(sched_step(s, &err), 0);
    sched_destroy(&s);
    assert_int_equal(rec.n, PEN_GEN);

    /* The same rules written out directly: argmax of the adjusted logits, lowest id on ties. */
    float *logits = malloc((size_t)vocab * sizeof *logits);
    int n = PEN_PROMPT;
    for (int k = 0; k < PEN_GEN; k++) {
        direct_logits(e, seq, n, PEN_PROMPT, logits);
        /* log-probabilities of the raw logits, in double */
        double mx = -INFINITY, sum = 0;
        for (int v = 0; v < vocab; v++) mx = logits[v] > mx ? logits[v] : mx;
        for (int v = 0; v < vocab; v++) sum += exp((double)logits[v] - mx);
        int32_t best = -1;
        float best_l = -INFINITY;
        for (int v = 0; v < vocab; v++) {
            float l = logits[v];
            bool in_window = false;
            int count = 0;
            for (int i = n - window; i < n; i++) in_window |= i >= 0 && seq[i] == v;
            for (int i = PEN_PROMPT; i < n; i++) count += seq[i] == v;
            if (in_window) l = l > 0 ? l / rep : l * rep;
            float add = v == favoured ? 1.5f : 0.0f;
            if (count > 0) {
                add -= presence;
                add -= frequency * (float)count;
            }
            l = v == banned ? -INFINITY : l + add;
            if (l > best_l) best_l = l, best = v;
        }
        if (rec.tokens[k] != best)
            fprintf(stderr, "token %d: scheduled %d (raw logit %g), direct %d (raw logit %g)\n", k, rec.tokens[k],
                    (double)logits[rec.tokens[k]], best, (double)logits[best]);
        assert_int_equal(rec.tokens[k], best);
        assert_int_equal(rec.lps[k].chosen.token, best);
        const double want = (double)logits[best] - mx - log(sum);
        assert_true(fabs(rec.lps[k].chosen.logprob - want) < 1e-4);
        assert_int_equal(rec.lps[k].n_top, 3);
        for (int t = 0; t < 3; t++) { /* each top entry's value, and none better outside the list */
            const int32_t id = rec.lps[k].top[t].token;
            assert_true(fabs(rec.lps[k].top[t].logprob - ((double)logits[id] - mx - log(sum))) < 1e-4);
            if (t > 0) assert_true(rec.lps[k].top[t].logprob <= rec.lps[k].top[t - 1].logprob);
        }
        int better = 0;
        for (int v = 0; v < vocab; v++) better += logits[v] > logits[rec.lps[k].top[2].token];
        assert_true(better <= 2);
        assert_int_not_equal(best, banned);
        seq[n++] = best;
    }
    /* The penalties did something: a plain greedy run of this random model repeats itself. */
    int distinct = 0;
    for (int i = 0; i < PEN_GEN; i++) {
        bool seen = false;
        for (int j = 0; j < i; j++) seen |= rec.tokens[j] == rec.tokens[i];
        distinct += !seen;
    }
    assert_true(distinct > 4);
    free(logits);
    engine_destroy(&e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(output_is_identical_alone_batched_cached_and_preempted),
        cmocka_unit_test(quantized_kv_outputs_identical_alone_cached_and_preempted),
        cmocka_unit_test(speculative_long_outputs_equal_plain_decoding),
        cmocka_unit_test(constrained_outputs_match_with_and_without_speculation),
        cmocka_unit_test(constrained_rows_project_onto_allowed_tokens_only),
        cmocka_unit_test(long_generation_preempted_and_recomputed_keeps_its_tokens),
        cmocka_unit_test(cancel_frees_kv_and_reports_once),
        cmocka_unit_test(callback_may_cancel_another_request_mid_step),
        cmocka_unit_test(deadline_expiry_finishes_with_deadline),
        cmocka_unit_test(submit_refuses_never_fitting_with_erange_and_bad_with_einval),
        cmocka_unit_test(generation_stops_with_length_at_the_context_end),
        cmocka_unit_test(tenants_with_different_salts_never_share_blocks),
        cmocka_unit_test(lru_eviction_keeps_running_when_cache_is_full_of_unreferenced_blocks),
        cmocka_unit_test(many_requests_under_memory_pressure_all_finish_exactly_once),
        cmocka_unit_test(requests_wait_for_a_prefix_another_is_computing),
        cmocka_unit_test(admission_leaves_headroom_so_a_newcomer_is_not_preempted_at_once),
        cmocka_unit_test(requests_submitted_between_steps_join_the_running_batch),
        cmocka_unit_test(stop_ids_and_on_token_stop_finish_with_stop),
        cmocka_unit_test(prompt_chunks_shrink_with_the_context_they_read),
        cmocka_unit_test(liveness_returns_a_positive_duration),
        cmocka_unit_test(penalties_bias_and_logprobs_equal_a_direct_computation),
    };
    return cmocka_run_group_tests(tests, setup, tiny_model_remove);
}
