/* test_scheduler_resume.c - a request resumed mid-stream (sched_request_t.resume) on a tiny random
 * model: what a group that takes over a moved request computes (coordinator/dispatch.c's migration).
 *
 * Protects: a request resumed after any k of its tokens reports the tokens from index k on, and
 * they are the uninterrupted run's, for greedy and seeded sampling, with repetition, presence and
 * frequency penalties (which must see the resumed tokens as completion, not prompt), with and
 * without speculation, alone and batched with other requests; the result counts the original
 * prompt and every completion token; a constraint's state continues after the resumed tokens, and
 * resumed tokens that complete it (or reach max_tokens) finish the request at once with the
 * reason the first run had; resumed tokens past max_tokens, outside the vocabulary or against the
 * constraint are refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "engine.h"
#include "mkmodel.h"
#include "scheduler.h"
#include "test_tiny_model.h"

#define BLOCK    4
#define N_GEN    40
#define N_PROMPT 23
#define N_IDS    16

static int setup(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p); /* 2 layers, dim 64, F32, vocab 512, ctx 256 */
    p.seed = 23;
    return tiny_model_write("sched_resume", &p);
}

static engine_t *open_engine(void)
{
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = g_tiny_model,
                       .backend = "cpu",
                       .threads = 2,
                       .max_batch_tokens = 64,
                       .block_size = BLOCK,
                       .max_seqs = 16,
                       .kv_budget_bytes = (size_t)256 * 256 * BLOCK};
    engine_t *e = engine_new(&o, &err);
    if (!e) fail_msg("engine_new: %s", err.msg);
    return e;
}

/* What the callbacks saw, per request id; a resumed request's record starts with its resumed tokens. */
typedef struct record {
    int32_t tokens[N_IDS][N_GEN + 8];
    int n_tokens[N_IDS];
    int first_index[N_IDS]; /* the first index on_token reported, -1: none */
    int n_finish[N_IDS];
    sched_result_t res[N_IDS];
} record_t;

static void record_init(record_t *r)
{
    memset(r, 0, sizeof *r);
    for (int i = 0; i < N_IDS; i++) r->first_index[i] = -1;
}

static bool on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)lp;
    record_t *r = user;
    assert_true(id < N_IDS);
    assert_int_equal(index, r->n_tokens[id]); /* continues where the resumed tokens end, never repeats */
    assert_true(index < N_GEN + 8);
    if (r->first_index[id] < 0) r->first_index[id] = index;
    r->tokens[id][r->n_tokens[id]++] = token;
    return false;
}

static void on_finish(void *user, const sched_result_t *res)
{
    record_t *r = user;
    assert_true(res->id < N_IDS);
    r->n_finish[res->id]++;
    r->res[res->id] = *res;
    assert_int_equal(res->n_generated, r->n_tokens[res->id]);
}

static int32_t g_prompt[N_PROMPT];

typedef struct variant {
    const char *name;
    float temperature;
    sched_penalties_t pen;
    sched_spec_t spec;
} variant_t;

static sched_request_t request(uint64_t id, const variant_t *v)
{
    return (sched_request_t){.id = id,
                             .prompt = g_prompt,
                             .n_prompt = N_PROMPT,
                             .max_tokens = N_GEN,
                             .ignore_eog = true,
                             .spec = v->spec,
                             .penalties = v->pen,
                             .sampling = {.temperature = v->temperature, .top_k = 40, .top_p = 0.95f, .seed = 4242}};
}

static void run(engine_t *e, record_t *rec, const sched_request_t *rs, int n)
{
    fl_error_t err = {0};
    const sched_callbacks_t cb = {.on_token = on_token, .on_finish = on_finish, .user = rec};
    const sched_opts_t o = {.spec_draft_all = true};
    sched_t *s = sched_new(e->model, e->kv, &o, &cb, &err);
    if (!s) fail_msg("sched_new: %s", err.msg);
    for (int i = 0; i < n; i++)
        if (sched_submit(s, &rs[i], &err)) fail_msg("sched_submit: %s", err.msg);
    for (int i = 0; sched_has_work(s); i++) {
        if (sched_step(s, &err)) fail_msg("sched_step: %s", err.msg);
        assert_true(i < 100000);
    }
    sched_stats_t st;
    sched_get_stats(s, &st);
    assert_int_equal(st.kv_blocks_used, 0);
    sched_destroy(&s);
}

static void resumed_requests_continue_the_uninterrupted_output(void **state)
{
    (void)state;
    for (int i = 0; i < N_PROMPT; i++) g_prompt[i] = (int32_t)(3 + (i * 37) % 500);
    engine_t *e = open_engine();
    const variant_t variants[] = {
        {.name = "greedy", .spec = SCHED_SPEC_NONE},
        {.name = "sampled", .temperature = 0.9f, .spec = SCHED_SPEC_NONE},
        {.name = "sampled, penalties",
         .temperature = 0.9f,
         .pen = {.repetition = 1.3f, .repetition_last_n = 16, .presence = 0.5f, .frequency = 0.4f}},
        {.name = "greedy, penalties, n-gram drafts",
         .spec = SCHED_SPEC_NGRAM,
         .pen = {.repetition = 1.2f, .repetition_last_n = 64, .frequency = 0.7f}},
        {.name = "sampled, n-gram drafts", .temperature = 0.9f, .spec = SCHED_SPEC_NGRAM},
    };
    static const int cuts[] = {1, 2, 7, 16, 33, N_GEN - 1};
    const int n_cuts = (int)(sizeof cuts / sizeof *cuts);
    static record_t base, rec;
    for (size_t v = 0; v < sizeof variants / sizeof *variants; v++) {
        record_init(&base);
        const sched_request_t r0 = request(0, &variants[v]);
        run(e, &base, &r0, 1);
        assert_int_equal(base.n_tokens[0], N_GEN);
        /* Every cut at once, batched: each resumed request continues its own stream. */
        record_init(&rec);
        sched_request_t rs[8];
        for (int c = 0; c < n_cuts; c++) {
            const uint64_t id = (uint64_t)c + 1;
            rs[c] = request(id, &variants[v]);
            rs[c].resume = base.tokens[0];
            rs[c].n_resume = cuts[c];
            memcpy(rec.tokens[id], base.tokens[0], (size_t)cuts[c] * sizeof(int32_t));
            rec.n_tokens[id] = cuts[c];
        }
        run(e, &rec, rs, n_cuts);
        for (int c = 0; c < n_cuts; c++) {
            const uint64_t id = (uint64_t)c + 1;
            assert_int_equal(rec.n_finish[id], 1);
            assert_int_equal(rec.first_index[id], cuts[c]);
            assert_int_equal(rec.res[id].finish, SCHED_FINISH_LENGTH);
            assert_int_equal(rec.res[id].n_prompt, N_PROMPT); /* the prompt, not prompt + resumed */
            assert_int_equal(rec.res[id].n_generated, N_GEN);
            if (memcmp(rec.tokens[id], base.tokens[0], N_GEN * sizeof(int32_t))) {
                int at = 0;
                while (rec.tokens[id][at] == base.tokens[0][at]) at++;
                fail_msg("%s: resumed after %d tokens, the output parts from the uninterrupted run at index %d",
                         variants[v].name, cuts[c], at);
            }
        }
        /* And alone, the shortest cut. */
        record_init(&rec);
        sched_request_t one = request(1, &variants[v]);
        one.resume = base.tokens[0];
        one.n_resume = 1;
        memcpy(rec.tokens[1], base.tokens[0], sizeof(int32_t));
        rec.n_tokens[1] = 1;
        run(e, &rec, &one, 1);
        assert_memory_equal(rec.tokens[1], base.tokens[0], N_GEN * sizeof(int32_t));
        print_message("%s: resumed at %d cuts, the same %d tokens\n", variants[v].name, n_cuts + 1, N_GEN);
    }
    engine_destroy(&e);
}

static void a_request_resumed_at_its_end_finishes_at_once_and_bad_resumes_are_refused(void **state)
{
    (void)state;
    engine_t *e = open_engine();
    const variant_t greedy = {.name = "greedy", .spec = SCHED_SPEC_NONE};
    static record_t base, rec;
    record_init(&base);
    sched_request_t r0 = request(0, &greedy);
    run(e, &base, &r0, 1);

    /* All max_tokens already sent (the FINAL was lost with its group): LENGTH, no new token. */
    record_init(&rec);
    sched_request_t r = request(1, &greedy);
    r.resume = base.tokens[0];
    r.n_resume = N_GEN;
    rec.n_tokens[1] = N_GEN;
    run(e, &rec, &r, 1);
    assert_int_equal(rec.n_finish[1], 1);
    assert_int_equal(rec.first_index[1], -1);
    assert_int_equal(rec.res[1].finish, SCHED_FINISH_LENGTH);
    assert_int_equal(rec.res[1].n_generated, N_GEN);

    fl_error_t err = {0};
    const sched_callbacks_t cb = {.on_token = on_token, .on_finish = on_finish, .user = &rec};
    sched_t *s = sched_new(e->model, e->kv, &(sched_opts_t){0}, &cb, &err);
    assert_non_null(s);
    r.n_resume = N_GEN + 1; /* more than max_tokens */
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    const int32_t bad[2] = {5, 100000};
    r.resume = bad;
    r.n_resume = 2;
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "resumed"));
    r.resume = NULL;
    r.n_resume = 1;
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    assert_false(sched_has_work(s));
    sched_destroy(&s);
    engine_destroy(&e);
}

/* The constraint's automaton continues after the resumed tokens: the output stays one of the
 * choices, equal to the uninterrupted run's; a resume that completes the choice ends STOP at once. */
static void a_constrained_request_resumes_in_its_constraints_state(void **state)
{
    (void)state;
    engine_t *e = open_engine();
    static const char *const choices[] = {"alpha beta gamma", "alphabet soup", "omega"};
    static record_t base, rec;
    for (int t = 0; t < 2; t++) {
        const variant_t v = {.name = "constrained", .temperature = t ? 0.8f : 0.0f, .spec = SCHED_SPEC_NONE};
        record_init(&base);
        sched_request_t r0 = request(0, &v);
        r0.ignore_eog = false;
        r0.constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_CHOICE, .choices = choices, .n_choices = 3};
        run(e, &base, &r0, 1);
        assert_int_equal(base.res[0].finish, SCHED_FINISH_STOP);
        const int n = base.n_tokens[0];
        assert_true(n >= 2);
        for (int k = 1; k <= n; k++) {
            record_init(&rec);
            sched_request_t r = r0;
            r.id = 1;
            r.resume = base.tokens[0];
            r.n_resume = k;
            memcpy(rec.tokens[1], base.tokens[0], (size_t)k * sizeof(int32_t));
            rec.n_tokens[1] = k;
            run(e, &rec, &r, 1);
            assert_int_equal(rec.n_finish[1], 1);
            assert_int_equal(rec.res[1].finish, SCHED_FINISH_STOP);
            assert_int_equal(rec.n_tokens[1], n);
            assert_memory_equal(rec.tokens[1], base.tokens[0], (size_t)n * sizeof(int32_t));
            if (k == n) assert_int_equal(rec.first_index[1], -1); /* complete: nothing can follow */
        }
    }
    /* A resumed token the constraint never allowed: refused. */
    fl_error_t err = {0};
    const sched_callbacks_t cb = {.on_token = on_token, .on_finish = on_finish, .user = &rec};
    sched_t *s = sched_new(e->model, e->kv, &(sched_opts_t){0}, &cb, &err);
    assert_non_null(s);
    const variant_t v = {.name = "constrained", .spec = SCHED_SPEC_NONE};
    sched_request_t r = request(2, &v);
    r.constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_CHOICE, .choices = choices, .n_choices = 3};
    const int32_t zed[1] = {MKMODEL_FIRST_BYTE_TOKEN + 'z'};
    r.resume = zed;
    r.n_resume = 1;
    assert_int_equal(sched_submit(s, &r, &err), FL_EINVAL);
    assert_non_null(strstr(err.msg, "constraint"));
    sched_destroy(&s);
    engine_destroy(&e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(resumed_requests_continue_the_uninterrupted_output),
        cmocka_unit_test(a_request_resumed_at_its_end_finishes_at_once_and_bad_resumes_are_refused),
        cmocka_unit_test(a_constrained_request_resumes_in_its_constraints_state),
    };
    return cmocka_run_group_tests(tests, setup, tiny_model_remove);
}
