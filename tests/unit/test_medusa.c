/* test_medusa.c - Medusa heads (worker/medusa.c) and their trainer (worker/medusa_train.c) on tiny
 * random models.
 *
 * Protects: heads with W = 0 propose exactly the base model's own top-k (the trainer's starting
 * point); a save and load gives the proposals a host computation of the head gives; loading heads
 * for another base model fails naming both identities; a corrupt, truncated or foreign file, wrong
 * sizes and missing tensors give format errors; the engine loads the heads asked for or the default
 * ones beside the model, and "none" loads none; the distillation cache round-trips and refuses other
 * inputs and damage; training on a tiny model's own output lowers the held-out loss and predicts
 * well above chance. */
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

#include "backend_internal.h"
#include "engine.h"
#include "gguf_writer.h"
#include "medusa.h"
#include "medusa_train.h"
#include "mkmodel.h"
#include "test_tiny_model.h"
#include "test_util.h"

#define VOCAB 512
#define DIM 64

static char g_other_model[256];   /* same shape, other weights */
static char g_heads[256], g_tmp[256];

static int setup(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.tied = true; /* as the default model: the token embedding is the output matrix */
    p.vocab = VOCAB;
    p.dim = DIM;
    p.seed = 11;
    if (tiny_model_write("medusa", &p)) return -1;
    snprintf(g_other_model, sizeof g_other_model, "/tmp/folio_test_medusa_other_%d.gguf", (int)getpid());
    snprintf(g_heads, sizeof g_heads, "/tmp/folio_test_medusa_%d.heads.gguf", (int)getpid());
    snprintf(g_tmp, sizeof g_tmp, "/tmp/folio_test_medusa_%d.tmp", (int)getpid());
    p.seed = 12;
    fl_error_t err = {0};
    if (mkmodel_write(&p, g_other_model, &err)) {
        fprintf(stderr, "mkmodel: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    unlink(g_other_model);
    unlink(g_heads);
    unlink(g_tmp);
    char def[300];
    medusa_default_path(g_tiny_model, def, sizeof def);
    unlink(def);
    return tiny_model_remove(state);
}

static engine_t *open_engine(const char *model, const char *heads)
{
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = model, .backend = "cpu", .threads = 2, .max_seqs = 16, .kv_budget_bytes = 8 << 20,
                       .heads_path = heads};
    engine_t *e = engine_new(&o, &err);
    if (!e) fail_msg("engine_new: %s", err.msg);
    return e;
}

/* One forward over a short prompt with logits on its last `n` positions (rows 0..n-1). */
static void forward_rows(engine_t *e, const int32_t *prompt, int len, int n)
{
    model_t *m = e->model;
    kv_seq_t s;
    assert_int_equal(kv_seq_init(&s, m->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(e->kv, &s, len), 0);
    int32_t pos[64], seq[64], rows[64], tables[1024];
    for (int i = 0; i < len; i++) pos[i] = i, seq[i] = 0;
    for (int i = 0; i < n; i++) rows[i] = len - n + i;
    for (int j = 0; j < m->max_blocks; j++) tables[j] = j < s.n_blocks ? s.blocks[j] : -1;
    const model_batch_t b = {.n_tokens = len, .tokens = prompt, .pos = pos, .seq = seq, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = rows, .n_logits = n};
    fl_error_t err = {0};
    if (model_forward(m, e->kv, &b, &err)) fail_msg("forward: %s", err.msg);
    kv_seq_free(e->kv, &s);
}

static const int32_t PROMPT[12] = {1, 40, 77, 300, 12, 9, 501, 3, 250, 250, 17, 88};

/* The k best of x (ties to the lower id). */
static void host_top_k(const float *x, int n, int k, int32_t *out)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int t = 0; t < n; t++) {
            bool taken = false;
            for (int i = 0; i < j; i++) taken |= out[i] == t;
            if (!taken && (best < 0 || x[t] > x[best])) best = t;
        }
        out[j] = best;
    }
}

static void save_subset(engine_t *e, const char *path, int n_heads, float *fc, float *out, int out_type,
                        const int32_t *tokens, int n_tokens)
{
    medusa_weights_t w = {.n_heads = n_heads, .shared_output = out == NULL, .output_type = out_type,
                          .tokens = tokens, .n_tokens = n_tokens};
    for (int k = 0; k < n_heads; k++) {
        w.fc[k] = fc + (size_t)k * DIM * DIM;
        if (out) w.output[k] = out + (size_t)k * (tokens ? n_tokens : VOCAB) * DIM;
        for (int r = 0; r < MEDUSA_ACC_RANKS; r++) w.accuracy[k][r] = 0.1f * (float)(k + 1) + 0.01f * (float)r;
    }
    fl_error_t err = {0};
    if (medusa_save(path, e->model, &w, &err)) fail_msg("medusa_save: %s", err.msg);
}

static void save_heads(engine_t *e, const char *path, int n_heads, float *fc, float *out, int out_type)
{
    save_subset(e, path, n_heads, fc, out, out_type, NULL, 0);
}

static void test_default_path_and_identity(void **state)
{
    (void)state;
    char p[256];
    medusa_default_path("models/a.Q4_1.gguf", p, sizeof p);
    assert_string_equal(p, "models/a.Q4_1.medusa.gguf");
    medusa_default_path("x", p, sizeof p);
    assert_string_equal(p, "x.medusa.gguf");
    engine_t *a = open_engine(g_tiny_model, "none"), *a2 = open_engine(g_tiny_model, "none");
    engine_t *b = open_engine(g_other_model, "none");
    char ia[MEDUSA_IDENTITY_LEN + 1], ia2[MEDUSA_IDENTITY_LEN + 1], ib[MEDUSA_IDENTITY_LEN + 1];
    medusa_model_identity(a->model, ia);
    medusa_model_identity(a2->model, ia2);
    medusa_model_identity(b->model, ib);
    assert_int_equal(strlen(ia), MEDUSA_IDENTITY_LEN);
    assert_int_equal(strspn(ia, "0123456789abcdef"), MEDUSA_IDENTITY_LEN);
    assert_string_equal(ia, ia2);
    assert_string_not_equal(ia, ib);
    assert_null(a->medusa);
    engine_destroy(&a);
    engine_destroy(&a2);
    engine_destroy(&b);
}

/* W = 0: r = h, so every head proposes the base model's own top-k, bit for bit. */
static void test_zero_heads_propose_the_base_top_k(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    float *fc = calloc(3 * DIM * DIM, sizeof *fc);
    save_heads(e, g_heads, 3, fc, NULL, 0);
    fl_error_t err = {0};
    medusa_t *h = medusa_load(g_heads, e->model, &err);
    if (!h) fail_msg("medusa_load: %s", err.msg);
    assert_int_equal(medusa_n_heads(h), 3);
    assert_true(medusa_shared_output(h));
    assert_float_equal(medusa_head_accuracy(h, 1, 2), 0.22f, 1e-6);
    assert_float_equal(medusa_head_accuracy(h, 3, 0), 0.0f, 0);
    const int n = 5, K = 4;
    forward_rows(e, PROMPT, 12, n);
    float *logits = malloc((size_t)n * VOCAB * sizeof *logits);
    assert_int_equal(model_logits(e->model, logits, n), 0);
    int32_t rows[5] = {0, 1, 2, 3, 4}, out[5 * 3 * 4];
    assert_int_equal(medusa_propose(h, e->model, rows, n, K, out, &err), 0);
    for (int i = 0; i < n; i++) {
        int32_t want[4];
        host_top_k(logits + (size_t)i * VOCAB, VOCAB, K, want);
        for (int k = 0; k < 3; k++) assert_memory_equal(out + (i * 3 + k) * K, want, sizeof want);
    }
    /* rows out of order and repeated: the same answer per row */
    int32_t rows2[3] = {4, 0, 4}, out2[3 * 3 * 4];
    assert_int_equal(medusa_propose(h, e->model, rows2, 3, K, out2, &err), 0);
    assert_memory_equal(out2, out + 4 * 3 * K, 3 * K * sizeof(int32_t));
    assert_memory_equal(out2 + 3 * K, out, 3 * K * sizeof(int32_t));
    /* bad arguments */
    assert_int_equal(medusa_propose(h, e->model, rows, n, MEDUSA_MAX_TOP_K + 1, out, &err), FL_EINVAL);
    assert_int_equal(medusa_propose(h, e->model, rows, e->model->max_logits + 1, K, out, &err), FL_EINVAL);
    medusa_destroy(&h);
    medusa_destroy(&h);
    free(logits);
    free(fc);
    engine_destroy(&e);
}

/* n_heads shared heads with W = fc (zeros) over every third token from 1 (ids, *n_ids), loaded. */
static medusa_t *zero_heads_over_thirds(engine_t *e, int n_heads, float *fc, int32_t *ids, int *n_ids)
{
    *n_ids = 0;
    for (int v = 1; v < VOCAB; v += 3) ids[(*n_ids)++] = v;
    save_subset(e, g_heads, n_heads, fc, NULL, 0, ids, *n_ids);
    fl_error_t err = {0};
    medusa_t *h = medusa_load(g_heads, e->model, &err);
    if (!h) fail_msg("medusa_load: %s", err.msg);
    return h;
}

/* W = 0 over a vocabulary subset: the base model's top-k among those tokens. */
static void test_zero_heads_over_a_subset(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    float *fc = calloc(2 * DIM * DIM, sizeof *fc);
    int32_t ids[VOCAB / 3 + 1];
    int n_ids;
    fl_error_t err = {0};
    medusa_t *h = zero_heads_over_thirds(e, 2, fc, ids, &n_ids);
    const int n = 3, K = 5;
    forward_rows(e, PROMPT, 12, n);
    float *logits = malloc((size_t)n * VOCAB * sizeof *logits);
    assert_int_equal(model_logits(e->model, logits, n), 0);
    int32_t rows[3] = {0, 1, 2}, out[3 * 2 * 5];
    assert_int_equal(medusa_propose(h, e->model, rows, n, K, out, &err), 0);
    for (int i = 0; i < n; i++) {
        float sub[VOCAB / 3 + 1];
        for (int j = 0; j < n_ids; j++) sub[j] = logits[(size_t)i * VOCAB + ids[j]];
        int32_t want[5];
        host_top_k(sub, n_ids, K, want);
        for (int j = 0; j < K; j++) want[j] = ids[want[j]];
        for (int k = 0; k < 2; k++) assert_memory_equal(out + (i * 2 + k) * K, want, sizeof want);
    }
    medusa_destroy(&h);
    /* an own projection over the subset: those rows of the output matrix give the same */
    const float *E = gguf_find_tensor(e->model->gguf, "token_embd.weight")->data;
    float *own = malloc((size_t)2 * n_ids * DIM * sizeof *own);
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < n_ids; j++) memcpy(own + ((size_t)k * n_ids + j) * DIM, E + (size_t)ids[j] * DIM, DIM * sizeof *E);
    save_subset(e, g_heads, 2, fc, own, FL_TYPE_F32, ids, n_ids);
    if (!(h = medusa_load(g_heads, e->model, &err))) fail_msg("medusa_load: %s", err.msg);
    int32_t out2[3 * 2 * 5];
    assert_int_equal(medusa_propose(h, e->model, rows, n, K, out2, &err), 0);
    assert_memory_equal(out2, out, sizeof out);
    medusa_destroy(&h);
    /* a subset out of order is refused when saving */
    ids[1] = ids[0];
    medusa_weights_t w = {.n_heads = 1, .shared_output = true, .fc = {fc}, .tokens = ids, .n_tokens = n_ids};
    assert_int_equal(medusa_save(g_heads, e->model, &w, &err), FL_EINVAL);
    free(own);
    free(logits);
    free(fc);
    engine_destroy(&e);
}

/* medusa_allowed_fn of the test below: row 0 lists tokens at head 0 (some outside the heads' subset),
 * fixes one at head 1, then frees the rest; row 1 allows nothing at head 0, then frees the rest. */
static const int32_t g_listed[] = {0, 2, 5, 9, 10, 11};
static int32_t g_seen_best[2][3];
static int listed_allowed(void *user, int i, int head, const int32_t *cand, const int32_t **ids)
{
    const int K = *(const int *)user;
    g_seen_best[i][head] = head > 0 ? cand[(head - 1) * K] : -2;
    static const int32_t fixed = 7;
    if (i == 0 && head == 0) return *ids = g_listed, (int)(sizeof g_listed / sizeof g_listed[0]);
    if (i == 0 && head == 1) return *ids = &fixed, 1;
    if (i == 1 && head == 0) return *ids = g_listed, 0;
    return -1;
}

/* W = 0 over a subset, with allowed lists: a listed head ranks exactly its tokens by the base model's
 * logits (those outside the subset too: their own rows of the output matrix), one token is the
 * candidate outright, none gives none, and heads past a -1 rank the subset as without lists. */
static void test_heads_rank_only_allowed_tokens(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    float *fc = calloc(3 * DIM * DIM, sizeof *fc);
    int32_t ids[VOCAB / 3 + 1];
    int n_ids;
    fl_error_t err = {0};
    medusa_t *h = zero_heads_over_thirds(e, 3, fc, ids, &n_ids);
    int K = 4;
    const int n = 2, H = 3;
    forward_rows(e, PROMPT, 12, n);
    float *logits = malloc((size_t)n * VOCAB * sizeof *logits);
    assert_int_equal(model_logits(e->model, logits, n), 0);
    int32_t rows[2] = {0, 1}, plain[2 * 3 * 4], got[2 * 3 * 4];
    assert_int_equal(medusa_propose(h, e->model, rows, n, K, plain, &err), 0);
    assert_int_equal(medusa_propose_allowed(h, e->model, rows, n, K, NULL, NULL, got, &err), 0);
    assert_memory_equal(got, plain, sizeof got);
    assert_int_equal(medusa_propose_allowed(h, e->model, rows, n, K, listed_allowed, &K, got, &err), 0);
    /* row 0, head 0: the base top-4 among the listed tokens */
    const int n_listed = (int)(sizeof g_listed / sizeof g_listed[0]);
    float sub[8];
    for (int j = 0; j < n_listed; j++) sub[j] = logits[g_listed[j]];
    int32_t want[4];
    host_top_k(sub, n_listed, K, want);
    for (int j = 0; j < K; j++) assert_int_equal(got[j], g_listed[want[j]]);
    assert_int_equal(g_seen_best[0][1], got[0]); /* head 1 was asked after head 0's best */
    const int32_t fixed[4] = {7, -1, -1, -1}, none[4] = {-1, -1, -1, -1};
    assert_memory_equal(got + 1 * K, fixed, sizeof fixed);
    assert_int_equal(g_seen_best[0][2], 7);
    assert_memory_equal(got + 2 * K, plain + 2 * K, K * sizeof(int32_t)); /* head 2: the subset's */
    /* row 1: nothing at head 0, then the subset's ranking */
    assert_memory_equal(got + (H + 0) * K, none, sizeof none);
    assert_int_equal(g_seen_best[1][1], -1);
    assert_memory_equal(got + (H + 1) * K, plain + (H + 1) * K, 2 * K * sizeof(int32_t));
    /* A backend without chosen-row products (CUDA's): the listed tokens are read from the subset's
     * projection, so of row 0's list only 10 (a subset token) is left at head 0. */
    kern_backend_t *be = e->model->be;
    const kern_ops_t *ops = be->ops;
    kern_ops_t no_rows = *ops;
    no_rows.matmul_rows = NULL;
    be->ops = &no_rows;
    int32_t got2[2 * 3 * 4];
    const int rc = medusa_propose_allowed(h, e->model, rows, n, K, listed_allowed, &K, got2, &err);
    be->ops = ops;
    assert_int_equal(rc, 0);
    const int32_t only10[4] = {10, -1, -1, -1};
    assert_memory_equal(got2, only10, sizeof only10);
    assert_int_equal(g_seen_best[0][1], 10);
    assert_memory_equal(got2 + K, got + K, (size_t)(2 * H - 1) * K * sizeof(int32_t)); /* the rest as above */
    medusa_destroy(&h);
    free(logits);
    free(fc);
    engine_destroy(&e);
}

/* Trained-looking weights, shared and own projections: the proposals equal the head computed on
 * the host from the downloaded hidden state. */
static void check_against_host(bool own)
{
    engine_t *e = open_engine(g_tiny_model, "none");
    model_t *m = e->model;
    const int H = 2, n = 3, K = 3;
    float *fc = malloc((size_t)H * DIM * DIM * sizeof *fc);
    uint32_t s = 5;
    for (int i = 0; i < H * DIM * DIM; i++) {
        s = s * 1664525u + 1013904223u;
        fc[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * 0.6f;
    }
    /* the output matrix as F32 (the tiny model stores it as F32), perturbed per head when own */
    const gguf_tensor_t *t = gguf_find_tensor(m->gguf, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->type, FL_TYPE_F32);
    float *out = own ? malloc((size_t)H * VOCAB * DIM * sizeof *out) : NULL;
    for (int k = 0; own && k < H; k++)
        for (int i = 0; i < VOCAB * DIM; i++) {
            s = s * 1664525u + 1013904223u;
            out[(size_t)k * VOCAB * DIM + i] = ((const float *)t->data)[i] + ((float)(s >> 8) / 16777216.0f - 0.5f) * 0.02f;
        }
    save_heads(e, g_heads, H, fc, out, FL_TYPE_F32);
    fl_error_t err = {0};
    medusa_t *h = medusa_load(g_heads, m, &err);
    if (!h) fail_msg("medusa_load: %s", err.msg);
    assert_int_equal(medusa_shared_output(h), !own);
    forward_rows(e, PROMPT, 12, n);
    float hid[3 * DIM];
    assert_int_equal(kern_download(m->be, hid, m->logit_in, sizeof hid), 0);
    int32_t rows[3] = {0, 1, 2}, got[3 * 2 * 3];
    assert_int_equal(medusa_propose(h, m, rows, n, K, got, &err), 0);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < H; k++) {
            float r[DIM], logits[VOCAB];
            for (int a = 0; a < DIM; a++) {
                double z = 0;
                for (int b = 0; b < DIM; b++) z += (double)fc[(size_t)k * DIM * DIM + a * DIM + b] * hid[i * DIM + b];
                r[a] = hid[i * DIM + a] + (float)(z / (1 + exp(-z)));
            }
            const float *E = own ? out + (size_t)k * VOCAB * DIM : (const float *)t->data;
            for (int v = 0; v < VOCAB; v++) {
                double l = 0;
                for (int a = 0; a < DIM; a++) l += (double)E[(size_t)v * DIM + a] * r[a];
                logits[v] = (float)l;
            }
            int32_t want[3];
            host_top_k(logits, VOCAB, K, want);
            assert_memory_equal(got + (i * H + k) * K, want, sizeof want);
        }
    medusa_destroy(&h);
    free(fc);
    free(out);
    engine_destroy(&e);
}

static void test_round_trip_shared(void **state) { (void)state; check_against_host(false); }
static void test_round_trip_own(void **state) { (void)state; check_against_host(true); }

static void expect_load_error(model_t *m, const char *path, int code, const char *needle)
{
    fl_error_t err = {0};
    medusa_t *h = medusa_load(path, m, &err);
    if (h) fail_msg("%s loaded, expected an error containing '%s'", path, needle);
    assert_int_equal(err.code, code);
    if (!strstr(err.msg, needle)) fail_msg("error '%s' does not say '%s'", err.msg, needle);
}

static void test_heads_of_another_model_are_refused(void **state)
{
    (void)state;
    engine_t *a = open_engine(g_tiny_model, "none"), *b = open_engine(g_other_model, "none");
    float *fc = calloc(DIM * DIM, sizeof *fc);
    save_heads(b, g_heads, 1, fc, NULL, 0);
    char ia[MEDUSA_IDENTITY_LEN + 1], ib[MEDUSA_IDENTITY_LEN + 1];
    medusa_model_identity(a->model, ia);
    medusa_model_identity(b->model, ib);
    expect_load_error(a->model, g_heads, FL_EINVAL, ia);
    expect_load_error(a->model, g_heads, FL_EINVAL, ib);
    free(fc);
    engine_destroy(&a);
    engine_destroy(&b);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
}

/* A heads file built by hand: for sizes and tensors the trainer would never write. */
static void write_custom(model_t *m, const char *path, uint32_t heads, uint32_t dim, uint32_t vocab, bool fc_ok,
                         bool with_fc1, const int32_t *ids, int n_ids)
{
    gguf_writer_t *w = gguf_writer_new();
    char ident[MEDUSA_IDENTITY_LEN + 1];
    medusa_model_identity(m, ident);
    gguf_writer_set_str(w, "general.architecture", "medusa");
    gguf_writer_set_u32(w, "medusa.head_count", heads);
    gguf_writer_set_u32(w, "medusa.embedding_length", dim);
    gguf_writer_set_u32(w, "medusa.vocab_size", vocab);
    gguf_writer_set_str(w, "medusa.base_model", ident);
    gguf_writer_set_bool(w, "medusa.shared_output", true);
    if (ids) gguf_writer_set_arr(w, "medusa.vocab", GGUF_TYPE_INT32, ids, (uint64_t)n_ids);
    float *z = calloc(DIM * (DIM + 1), sizeof *z);
    gguf_writer_add_tensor(w, "medusa.0.fc.weight", FL_TYPE_F32, 2, (const int64_t[]){fc_ok ? DIM : DIM + 1, DIM}, z);
    if (with_fc1) gguf_writer_add_tensor(w, "medusa.1.fc.weight", FL_TYPE_F32, 2, (const int64_t[]){DIM, DIM}, z);
    fl_error_t err = {0};
    if (gguf_writer_write(w, path, &err)) fail_msg("write: %s", err.msg);
    gguf_writer_destroy(&w);
    free(z);
}

static void test_bad_files_are_format_errors(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    model_t *m = e->model;
    float *fc = calloc(2 * DIM * DIM, sizeof *fc);
    save_heads(e, g_heads, 2, fc, NULL, 0);
    size_t len = 0;
    char *bytes = fl_read_file(g_heads, &len);
    assert_non_null(bytes);
    /* truncated: the last tensor's data cut off */
    write_bytes(g_tmp, bytes, len - 100);
    expect_load_error(m, g_tmp, FL_EFORMAT, g_tmp);
    /* garbage */
    memset(bytes, 0x5a, 64);
    write_bytes(g_tmp, bytes, len);
    expect_load_error(m, g_tmp, FL_EFORMAT, g_tmp);
    /* not heads at all: the model itself */
    expect_load_error(m, g_tiny_model, FL_EFORMAT, "not a Medusa heads file");
    /* absent */
    unlink(g_tmp);
    fl_error_t err = {0};
    assert_null(medusa_load(g_tmp, m, &err));
    assert_int_not_equal(err.code, 0);
    /* wrong sizes, a missing tensor, a tensor of the wrong shape, a bad head count */
    write_custom(m, g_tmp, 1, DIM + 32, VOCAB, true, false, NULL, 0);
    expect_load_error(m, g_tmp, FL_EFORMAT, "width");
    write_custom(m, g_tmp, 1, DIM, VOCAB + 1, true, false, NULL, 0);
    expect_load_error(m, g_tmp, FL_EFORMAT, "tokens");
    write_custom(m, g_tmp, 2, DIM, VOCAB, true, false, NULL, 0);
    expect_load_error(m, g_tmp, FL_EFORMAT, "missing tensor 'medusa.1.fc.weight'");
    write_custom(m, g_tmp, 2, DIM, VOCAB, false, true, NULL, 0);
    expect_load_error(m, g_tmp, FL_EFORMAT, "medusa.0.fc.weight");
    write_custom(m, g_tmp, 0, DIM, VOCAB, true, false, NULL, 0);
    expect_load_error(m, g_tmp, FL_EFORMAT, "head_count");
    const int32_t unsorted[3] = {5, 4, 9}, outside[2] = {5, VOCAB};
    write_custom(m, g_tmp, 2, DIM, VOCAB, true, true, unsorted, 3);
    expect_load_error(m, g_tmp, FL_EFORMAT, "medusa.vocab");
    write_custom(m, g_tmp, 2, DIM, VOCAB, true, true, outside, 2);
    expect_load_error(m, g_tmp, FL_EFORMAT, "medusa.vocab");
    write_custom(m, g_tmp, 2, DIM, VOCAB, true, true, NULL, 0);
    medusa_t *h = medusa_load(g_tmp, m, &err);
    if (!h) fail_msg("a good hand-made file did not load: %s", err.msg);
    medusa_destroy(&h);
    free(bytes);
    free(fc);
    engine_destroy(&e);
}

static void test_engine_loads_heads(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    float *fc = calloc(2 * DIM * DIM, sizeof *fc);
    save_heads(e, g_heads, 2, fc, NULL, 0);
    char def[300];
    medusa_default_path(g_tiny_model, def, sizeof def);
    save_heads(e, def, 1, fc, NULL, 0);
    engine_destroy(&e);
    /* explicit file, the default beside the model, none */
    e = open_engine(g_tiny_model, g_heads);
    assert_int_equal(medusa_n_heads(e->medusa), 2);
    engine_destroy(&e);
    e = open_engine(g_tiny_model, NULL);
    assert_int_equal(medusa_n_heads(e->medusa), 1);
    engine_destroy(&e);
    e = open_engine(g_tiny_model, "none");
    assert_null(e->medusa);
    engine_destroy(&e);
    /* the other model: its default file is absent (none, no error); these heads are refused */
    e = open_engine(g_other_model, NULL);
    assert_null(e->medusa);
    engine_destroy(&e);
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = g_other_model, .backend = "cpu", .max_seqs = 4, .kv_budget_bytes = 4 << 20,
                       .heads_path = g_heads};
    assert_null(engine_new(&o, &err));
    assert_int_equal(err.code, FL_EINVAL);
    /* a stale default file (made for another model) is skipped, not an error */
    rename(def, g_tmp);
    char def_other[300];
    medusa_default_path(g_other_model, def_other, sizeof def_other);
    rename(g_tmp, def_other);
    e = open_engine(g_other_model, NULL);
    assert_null(e->medusa);
    engine_destroy(&e);
    unlink(def_other);
    free(fc);
}

/* Prompts of random tokens, answered greedily by the tiny model. */
static void distill(engine_t *e, int n_prompts, int max_new, medusa_data_t *d)
{
    int32_t *prompts[64];
    int lens[64];
    uint32_t s = 99;
    for (int i = 0; i < n_prompts; i++) {
        lens[i] = 4 + i % 9;
        prompts[i] = malloc((size_t)lens[i] * sizeof(int32_t));
        for (int j = 0; j < lens[i]; j++) {
            s = s * 1664525u + 1013904223u;
            prompts[i][j] = 3 + (int32_t)((s >> 8) % (VOCAB - 3));
        }
    }
    const medusa_gen_opts_t g = {.max_new = max_new, .batch = 8, .keep_hidden = true};
    fl_error_t err = {0};
    if (medusa_generate(e->model, e->kv, (const int32_t *const *)prompts, lens, n_prompts, &g, d, &err))
        fail_msg("medusa_generate: %s", err.msg);
    for (int i = 0; i < n_prompts; i++) free(prompts[i]);
}

static void test_distilled_data_and_cache(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    medusa_data_t d = {0};
    distill(e, 12, 20, &d);
    assert_int_equal(d.n_seqs, 12);
    assert_int_equal(d.dim, DIM);
    assert_true(d.n_rows > 12 && d.n_rows <= 12 * 20);
    /* each token is the greedy choice of the hidden state stored with it */
    const float *E = gguf_find_tensor(e->model->gguf, "token_embd.weight")->data;
    int agree = 0;
    for (int64_t i = 0; i < d.n_rows; i++) {
        int best = 0;
        double best_l = -1e30;
        for (int v = 0; v < VOCAB; v++) {
            double l = 0;
            for (int a = 0; a < DIM; a++) l += (double)E[(size_t)v * DIM + a] * d.hidden[i * DIM + a];
            if (l > best_l) best_l = l, best = v;
        }
        agree += best == d.tokens[i];
    }
    assert_true(agree >= d.n_rows - 1);
    /* a budget cuts the running answers */
    medusa_data_t cut = {0};
    int32_t p0[3] = {5, 6, 7}, p1[4] = {8, 9, 10, 11};
    const int32_t *ps[2] = {p0, p1};
    const int lens[2] = {3, 4};
    const medusa_gen_opts_t g = {.max_new = 50, .batch = 2, .max_total = 15, .keep_hidden = true};
    fl_error_t err = {0};
    assert_int_equal(medusa_generate(e->model, e->kv, ps, lens, 2, &g, &cut, &err), 0);
    assert_true(cut.n_rows >= 15 && cut.n_rows <= 16);
    medusa_data_free(&cut);
    /* the cache */
    assert_int_equal(medusa_data_save(g_tmp, &d, "ident", "key", &err), 0);
    medusa_data_t back;
    assert_int_equal(medusa_data_load(g_tmp, "ident", "key", &back, &err), 0);
    assert_int_equal(back.n_seqs, d.n_seqs);
    assert_int_equal(back.n_rows, d.n_rows);
    assert_memory_equal(back.seq_start, d.seq_start, (size_t)(d.n_seqs + 1) * sizeof(int64_t));
    assert_memory_equal(back.tokens, d.tokens, (size_t)d.n_rows * sizeof(int32_t));
    assert_memory_equal(back.hidden, d.hidden, (size_t)d.n_rows * DIM * sizeof(float));
    medusa_data_free(&back);
    assert_int_equal(medusa_data_load(g_tmp, "other", "key", &back, &err), FL_ENOTFOUND);
    assert_int_equal(medusa_data_load(g_tmp, "ident", "other", &back, &err), FL_ENOTFOUND);
    size_t len = 0;
    char *bytes = fl_read_file(g_tmp, &len);
    assert_non_null(bytes);
    bytes[len - 20] ^= 1;
    write_bytes(g_tmp, bytes, len);
    assert_int_equal(medusa_data_load(g_tmp, "ident", "key", &back, &err), FL_EFORMAT);
    write_bytes(g_tmp, bytes, len / 2);
    assert_int_equal(medusa_data_load(g_tmp, "ident", "key", &back, &err), FL_EFORMAT);
    free(bytes);
    medusa_data_free(&d);
    engine_destroy(&e);
}

typedef struct seen {
    int reports, evals;
} seen_t;

static void on_progress(void *user, const medusa_train_progress_t *p)
{
    seen_t *s = user;
    s->reports++;
    s->evals += p->eval;
}

/* Data with something to learn: the tokens walk a cycle of 32 tokens, and the hidden state of a
 * position is its token's embedding, scaled (so the base model's own head predicts it, as the
 * trainer's data always is). Head k must map each embedding to the one k + 1 steps on: a linear map
 * can, so a working trainer gets most of the held-out positions right. */
static void cycle_data(const model_t *m, medusa_data_t *d)
{
    const float *E = gguf_find_tensor(m->gguf, "token_embd.weight")->data;
    int32_t cycle[32];
    for (int j = 0; j < 32; j++) cycle[j] = 3 + (j * 97) % (VOCAB - 3);
    d->dim = DIM;
    d->n_seqs = 60;
    d->seq_start = malloc(61 * sizeof(int64_t));
    d->tokens = malloc(60 * 60 * sizeof(int32_t));
    d->hidden = malloc(60 * 60 * DIM * sizeof(float));
    d->seq_start[0] = 0;
    uint32_t s = 3;
    for (int q = 0; q < 60; q++) {
        s = s * 1664525u + 1013904223u;
        const int len = 20 + (int)((s >> 8) % 40), at = (int)((s >> 20) % 32);
        for (int i = 0; i < len; i++) {
            const int64_t row = d->seq_start[q] + i;
            const int32_t tok = cycle[(at + i) % 32];
            d->tokens[row] = tok;
            for (int a = 0; a < DIM; a++) d->hidden[row * DIM + a] = 200.0f * E[(size_t)tok * DIM + a];
        }
        d->seq_start[q + 1] = d->seq_start[q] + len;
    }
    d->n_rows = d->seq_start[60];
}

static void test_training_lowers_loss_above_chance(void **state)
{
    (void)state;
    engine_t *e = open_engine(g_tiny_model, "none");
    medusa_data_t d = {0};
    cycle_data(e->model, &d);
    seen_t seen = {0};
    medusa_train_opts_t o;
    medusa_train_opts_default(&o);
    o.n_heads = 2;
    o.epochs = 10;
    o.batch = 32;
    o.lr = 1e-2f;
    o.holdout = 0.2f;
    o.threads = 2;
    o.evals = 2;
    o.progress = on_progress;
    o.user = &seen;
    medusa_trained_t t;
    fl_error_t err = {0};
    if (medusa_train(e->model, &d, &o, &t, &err)) fail_msg("medusa_train: %s", err.msg);
    assert_true(t.train_rows > 0 && t.held_out_rows > 0);
    assert_int_equal(seen.reports, t.steps + 1);
    assert_int_equal(seen.evals, 2 + 2);
    for (int k = 0; k < 2; k++) {
        printf("head %d: held-out loss %.3f -> %.3f, top-1 %.3f -> %.3f, top-5 %.3f (chance %.4f)\n", k,
               t.first.loss[k], t.last.loss[k], t.first.acc[k][0], t.last.acc[k][0], t.last.acc[k][4],
               1.0 / VOCAB);
        assert_true(t.last.loss[k] < t.first.loss[k]);
        assert_true(t.first.acc[k][0] < 0.1);
        assert_true(t.last.acc[k][0] > 0.5);
        assert_true(t.last.acc[k][4] >= t.last.acc[k][0]);
    }
    /* the trained heads save, load and propose */
    if (medusa_save(g_heads, e->model, &t.w, &err)) fail_msg("medusa_save: %s", err.msg);
    medusa_t *h = medusa_load(g_heads, e->model, &err);
    if (!h) fail_msg("medusa_load: %s", err.msg);
    assert_float_equal(medusa_head_accuracy(h, 0, 0), (float)t.last.acc[0][0], 1e-6);
    medusa_destroy(&h);
    /* over a vocabulary of 40 tokens: the cycle's 32 and the 8 lowest ids */
    medusa_trained_t sub;
    o.vocab = 40;
    o.progress = NULL;
    if (medusa_train(e->model, &d, &o, &sub, &err)) fail_msg("medusa_train: %s", err.msg);
    assert_int_equal(sub.w.n_tokens, 40);
    assert_int_equal(sub.w.tokens[0], 0);
    assert_int_equal(sub.w.tokens[7], 7);
    assert_true(sub.last.acc[0][0] > 0.5 && sub.last.loss[0] < sub.first.loss[0]);
    if (medusa_save(g_heads, e->model, &sub.w, &err)) fail_msg("medusa_save: %s", err.msg);
    if (!(h = medusa_load(g_heads, e->model, &err))) fail_msg("medusa_load: %s", err.msg);
    medusa_destroy(&h);
    medusa_trained_free(&sub);
    o.vocab = 0;
    /* an own projection trains too */
    o.own_output = true;
    o.epochs = 2;
    o.progress = NULL;
    medusa_trained_t own;
    if (medusa_train(e->model, &d, &o, &own, &err)) fail_msg("medusa_train own: %s", err.msg);
    assert_true(own.last.loss[0] < own.first.loss[0]);
    assert_false(own.w.shared_output);
    if (medusa_save(g_heads, e->model, &own.w, &err)) fail_msg("medusa_save: %s", err.msg);
    if (!(h = medusa_load(g_heads, e->model, &err))) fail_msg("medusa_load: %s", err.msg);
    assert_false(medusa_shared_output(h));
    medusa_destroy(&h);
    medusa_trained_free(&own);
    medusa_trained_free(&t);
    medusa_data_free(&d);
    engine_destroy(&e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_path_and_identity),
        cmocka_unit_test(test_zero_heads_propose_the_base_top_k),
        cmocka_unit_test(test_zero_heads_over_a_subset),
        cmocka_unit_test(test_heads_rank_only_allowed_tokens),
        cmocka_unit_test(test_round_trip_shared),
        cmocka_unit_test(test_round_trip_own),
        cmocka_unit_test(test_heads_of_another_model_are_refused),
        cmocka_unit_test(test_bad_files_are_format_errors),
        cmocka_unit_test(test_engine_loads_heads),
        cmocka_unit_test(test_distilled_data_and_cache),
        cmocka_unit_test(test_training_lowers_loss_above_chance),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
