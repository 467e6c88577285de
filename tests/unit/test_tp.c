/* test_tp.c - tensor parallelism on the CPU (worker/tp.c, the sharded model.c): a group of ranks, one
 * forked process each, joined by the host transport (comm_host.c), as folio-worker --tp runs them.
 *
 * Protects: the cut (KV-head groups, uneven splits with rank 0 the smaller, the feed-forward width in
 * 32-column blocks; models that cannot be cut are refused); sharded loading (each rank's rows of
 * Q/K/V/gate/up, columns of the output and down projections, and slices of the Q/K/V biases equal
 * those slices of the whole model's, byte for byte; only rank 0 holds the output matrix); TP = 1
 * within the bound: teacher-forced logits of TP=2 and TP=3 within TP_LOGIT_BOUND of TP=1's, and each
 * position's greedy token the same unless TP=1's top-1/top-2 margin is below TP_TIE; greedy
 * generation through the scheduler (batched prompts, chunked prefill, n-gram speculation whose
 * accepted drafts move K/V on every rank) equal to TP=1's up to the first near-tie; a group whose
 * ranks were started with different flags is refused on every rank; a rank that dies ends rank 0's
 * step with FL_EPEER instead of a hang; KV blocks whole (pulls between groups): a group's blocks
 * gathered by tp_kv_read have every head in TP=1's place (layer 0 bit for bit, whose K and V are
 * column-parallel products of the same input; later layers within TP_KV_BOUND), and whole blocks
 * handed out by tp_kv_write read back bit for bit.
 *
 * The bound: a row-parallel product is a sum over its columns; TP=N adds N partial sums (each over a
 * rank's columns, in the kernel's order) where TP=1 adds them all in one loop, so the float result
 * differs in the last bits, and each layer feeds the next: with F32 weights, 4.5e-5 at most here
 * (logits up to 1), bound 5e-4. With quantized weights the CPU rounds each activation to 8 bits
 * (per 32-wide block, the same blocks either way, since a rank's columns start on a block boundary)
 * before a product, and a last-bit difference can move one rounding by a step, which the layers
 * after carry on: 5.6e-3 at most here, bound 3e-2. A greedy token may then differ only where TP=1's
 * best two logits are closer than TP_TIE (none did here). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "comm.h"
#include "engine.h"
#include "generate.h"
#include "kernels/cpu/cpu_internal.h"
#include "mkmodel.h"
#include "tp.h"

/* max |logit difference|, TP=N against TP=1: F32 weights (the additions' order alone), quantized
 * weights (an 8-bit activation whose rounding the order flipped, amplified by the layers after) */
#define TP_BOUND_F32   5e-4f
#define TP_BOUND_QUANT 3e-2f
#define TP_TIE         3e-2f /* a top-1/top-2 margin below this may flip */
#define TP_KV_BOUND    1e-2f /* max |K or V difference| past layer 0, F32 weights (f16 KV: ~1e-3 here) */
#define N_PROMPTS      5
#define N_GEN          24
#define SEQ_MAX        120

static char g_model_kv2[256], g_model_kv3[256], g_model_qwen[256], g_model_f32[256];

static int write_model(char *path, const char *name, const char *arch, int dim, int heads, int kv_heads, int type,
                       bool tied)
{
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 3;
    p.dim = dim;
    p.ff = 256;
    p.n_heads = heads;
    p.n_kv_heads = kv_heads;
    p.vocab = 600;
    p.ctx = 512;
    p.type = type;
    p.tied = tied;
    p.arch = arch;
    p.seed = 11;
    snprintf(path, 256, "/tmp/folio_test_tp_%s_%d.gguf", name, (int)getpid());
    fl_error_t err = {0};
    if (mkmodel_write(&p, path, &err)) {
        fprintf(stderr, "mkmodel: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int setup(void **state)
{
    (void)state;
    /* heads 4 / KV heads 2 (even cut), heads 6 / KV heads 3 (uneven at TP=2), Qwen2 (Q/K/V biases) */
    if (write_model(g_model_kv2, "kv2", NULL, 128, 4, 2, FL_TYPE_Q8_0, false) ||
        write_model(g_model_kv3, "kv3", NULL, 192, 6, 3, FL_TYPE_Q4_1, true) ||
        write_model(g_model_qwen, "qwen", "qwen2", 128, 4, 2, FL_TYPE_Q8_0, false) ||
        write_model(g_model_f32, "f32", NULL, 128, 4, 2, FL_TYPE_F32, false))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(g_model_kv2);
    unlink(g_model_kv3);
    unlink(g_model_qwen);
    unlink(g_model_f32);
    return 0;
}

static engine_t *open_rank(const char *path, int rank, int size, fl_error_t *err)
{
    engine_opts_t o = {.model_path = path, .backend = "cpu", .threads = 1, .max_batch_tokens = 128, .block_size = 16,
                       .max_seqs = 8, .kv_budget_bytes = 4 << 20, .tp_rank = rank, .tp_size = size,
                       .heads_path = "none"};
    return engine_new(&o, err);
}

/* ---- the cut -------------------------------------------------------------------------------- */

static void test_tp_cut_by_kv_heads_uneven_rank0_smaller(void **state)
{
    (void)state;
    const model_config_t smol = {.n_heads = 9, .n_kv_heads = 3, .n_ff = 1536, .head_dim = 64};
    model_shard_t s0, s1, s2;
    assert_int_equal(tp_shard_of(&smol, 0, 2, &s0, NULL), 0);
    assert_int_equal(tp_shard_of(&smol, 1, 2, &s1, NULL), 0);
    assert_int_equal(s0.kv_head0, 0);
    assert_int_equal(s0.n_kv_heads, 1);
    assert_int_equal(s0.n_heads, 3);
    assert_int_equal(s1.kv_head0, 1);
    assert_int_equal(s1.n_kv_heads, 2);
    assert_int_equal(s1.head0, 3);
    assert_int_equal(s1.n_heads, 6);
    assert_int_equal(s0.n_ff + s1.n_ff, 1536);
    assert_int_equal(s0.n_ff % TP_FF_ALIGN, 0);
    assert_int_equal(s1.ff0, s0.n_ff);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(tp_shard_of(&smol, r, 3, &s2, NULL), 0);
        assert_int_equal(s2.n_kv_heads, 1);
        assert_int_equal(s2.n_heads, 3);
        assert_int_equal(s2.n_ff, 512);
    }
    fl_error_t err = {0};
    assert_int_equal(tp_shard_of(&smol, 0, 4, &s2, &err), FL_EINVAL); /* 4 ranks, 3 KV heads */
    assert_non_null(strstr(err.msg, "KV heads"));
    const model_config_t odd = {.n_heads = 4, .n_kv_heads = 2, .n_ff = 200, .head_dim = 32};
    assert_int_equal(tp_shard_of(&odd, 0, 2, &s2, &err), FL_EINVAL); /* 200 is not whole 32-wide blocks */
    assert_int_equal(tp_shard_of(&odd, 0, 1, &s2, NULL), 0);          /* one rank: anything goes */
    assert_int_equal(s2.n_ff, 200);
}

/* ---- sharded loading -------------------------------------------------------------------------- */

/* Rows [r0, r0 + n) of whole equal part's rows, byte for byte. */
static void assert_rows(const kern_weight_t *whole, const kern_weight_t *part, int64_t r0, int64_t n)
{
    assert_int_equal(part->rows, n);
    assert_int_equal(part->cols, whole->cols);
    assert_memory_equal(part->data, whole->data + (size_t)r0 * whole->row_bytes, (size_t)n * whole->row_bytes);
}

/* Columns [c0, c0 + n) of every row of whole equal part's rows. */
static void assert_cols(const kern_weight_t *whole, const kern_weight_t *part, int64_t c0, int64_t n)
{
    assert_int_equal(part->rows, whole->rows);
    assert_int_equal(part->cols, n);
    const size_t skip = fl_dtype_row_bytes(whole->type, c0), bytes = fl_dtype_row_bytes(whole->type, n);
    assert_int_equal(part->row_bytes, bytes);
    for (int64_t r = 0; r < whole->rows; r++)
        assert_memory_equal(part->data + (size_t)r * bytes, whole->data + (size_t)r * whole->row_bytes + skip, bytes);
}

static void assert_vec(const float *whole, const float *part, int64_t first, int64_t n)
{
    assert_memory_equal(part, whole + first, (size_t)n * sizeof(float)); /* CPU backend memory is host memory */
}

static void check_slices(const char *path, int size)
{
    fl_error_t err = {0};
    engine_t *whole = open_rank(path, 0, 1, &err);
    if (!whole) fail_msg("%s", err.msg);
    const model_config_t *c = &whole->model->cfg;
    const int hd = c->head_dim;
    size_t bytes = 0;
    for (int r = 0; r < size; r++) {
        engine_t *e = open_rank(path, r, size, &err);
        if (!e) fail_msg("rank %d: %s", r, err.msg);
        const model_shard_t *s = &e->model->shard;
        assert_int_equal(e->kv->n_kv_heads, s->n_kv_heads);
        for (int l = 0; l < c->n_layers; l++) {
            const model_layer_t *W = &whole->model->layers[l], *P = &e->model->layers[l];
            assert_rows(W->wq, P->wq, (int64_t)s->head0 * hd, (int64_t)s->n_heads * hd);
            assert_rows(W->wk, P->wk, (int64_t)s->kv_head0 * hd, (int64_t)s->n_kv_heads * hd);
            assert_rows(W->wv, P->wv, (int64_t)s->kv_head0 * hd, (int64_t)s->n_kv_heads * hd);
            assert_rows(W->w_gate, P->w_gate, s->ff0, s->n_ff);
            assert_rows(W->w_up, P->w_up, s->ff0, s->n_ff);
            assert_cols(W->wo, P->wo, (int64_t)s->head0 * hd, (int64_t)s->n_heads * hd);
            assert_cols(W->w_down, P->w_down, s->ff0, s->n_ff);
            if (W->bq) {
                assert_vec(W->bq, P->bq, (int64_t)s->head0 * hd, (int64_t)s->n_heads * hd);
                assert_vec(W->bk, P->bk, (int64_t)s->kv_head0 * hd, (int64_t)s->n_kv_heads * hd);
                assert_vec(W->bv, P->bv, (int64_t)s->kv_head0 * hd, (int64_t)s->n_kv_heads * hd);
            }
            assert_memory_equal(P->attn_norm, W->attn_norm, (size_t)c->dim * sizeof(float));
        }
        /* the output matrix: rank 0's alone (untied models) */
        if (!c->tied_output) assert_true(r == 0 ? e->model->output != NULL : e->model->output == NULL);
        bytes += e->model->weight_bytes;
        engine_destroy(&e);
    }
    /* Together the ranks hold the whole once, plus a replicated embedding and norms per extra rank,
     * less the output matrix the followers leave out. */
    fprintf(stderr, "  %s: whole %.2f MiB, %d ranks together %.2f MiB\n", path, whole->model->weight_bytes / 1048576.0,
            size, bytes / 1048576.0);
    engine_destroy(&whole);
}

static void test_tp_sharded_load_equals_slices_of_whole(void **state)
{
    (void)state;
    check_slices(g_model_kv2, 2);
    check_slices(g_model_kv3, 2); /* uneven: 1 + 2 KV heads */
    check_slices(g_model_kv3, 3);
    check_slices(g_model_qwen, 2); /* Q/K/V biases */
}

/* ---- a group of processes ----------------------------------------------------------------------- */

/* Forks ranks 1..size-1 (each loads its shard, joins, checks the group and follows until the stop);
 * returns rank 0's engine joined to the group, with *c its communicator; pids[] the followers. */
static engine_t *start_group(const char *path, int size, comm_t **c, pid_t *pids, const engine_opts_t *tweak,
                             int *check_rc)
{
    comm_id_t id;
    assert_int_equal(comm_id_new(COMM_HOST, &id, NULL), 0);
    const comm_opts_t co = {.timeout_ms = 20000};
    for (int r = 1; r < size; r++) {
        pids[r] = fork();
        assert_true(pids[r] >= 0);
        if (pids[r]) continue;
        fl_error_t err = {0};
        engine_opts_t o = {.model_path = path, .backend = "cpu", .threads = 1, .max_batch_tokens = 128,
                           .block_size = 16, .max_seqs = 8, .kv_budget_bytes = 4 << 20, .tp_rank = r, .tp_size = size,
                           .heads_path = "none"};
        if (tweak && r == size - 1) o.max_batch_tokens = tweak->max_batch_tokens;
        engine_t *e = engine_new(&o, &err);
        comm_t *cc = e ? comm_init(&id, r, size, &co, &err) : NULL;
        int code = 0;
        if (!cc || model_set_comm(e->model, cc, &err) || tp_check_group(e->model, e->kv, &err) ||
            tp_follow(e->model, e->kv, &err)) {
            fprintf(stderr, "rank %d: %s\n", r, err.msg);
            code = err.code == FL_EINVAL ? 3 : 2;
        }
        engine_destroy(&e);
        comm_destroy(&cc);
        _exit(code);
    }
    fl_error_t err = {0};
    engine_t *e = open_rank(path, 0, size, &err);
    if (!e) fail_msg("rank 0: %s", err.msg);
    *c = comm_init(&id, 0, size, &co, &err);
    if (!*c) fail_msg("rank 0 join: %s", err.msg);
    assert_int_equal(model_set_comm(e->model, *c, &err), 0);
    const int rc = tp_check_group(e->model, e->kv, &err);
    if (check_rc) *check_rc = rc;
    else if (rc) fail_msg("group check: %s", err.msg);
    return e;
}

/* Stops the followers and returns how many exited with code 0. */
static int stop_group(engine_t **e, comm_t **c, const pid_t *pids, int size, bool send_stop)
{
    if (send_stop) assert_int_equal(tp_stop((*e)->model, NULL), 0);
    int ok = 0;
    for (int r = 1; r < size; r++) {
        int st;
        assert_int_equal(waitpid(pids[r], &st, 0), pids[r]);
        ok += WIFEXITED(st) && WEXITSTATUS(st) == 0;
    }
    engine_destroy(e);
    comm_destroy(c);
    return ok;
}

/* ---- TP = 1 within the bound -------------------------------------------------------------------- */

static void make_prompt(int i, int32_t *out, int *n)
{
    uint32_t s = 99u + (uint32_t)i * 7919u;
    *n = 5 + i * 23 % 70;
    for (int j = 0; j < *n; j++) {
        s = s * 1664525u + 1013904223u;
        out[j] = 3 + (int32_t)((s >> 8) % 590);
        if (i == 3 && j >= 8) out[j] = out[j - 8]; /* a repeating prompt: n-gram drafts get accepted */
    }
}

/* Greedy generation of every prompt together through the scheduler; n-gram speculation on odd ones. */
static void generate(engine_t *e, int32_t out[N_PROMPTS][N_GEN])
{
    int32_t prompts[N_PROMPTS][SEQ_MAX];
    gen_request_t reqs[N_PROMPTS];
    memset(reqs, 0, sizeof reqs);
    for (int i = 0; i < N_PROMPTS; i++) {
        make_prompt(i, prompts[i], &reqs[i].req.n_prompt);
        reqs[i].req.prompt = prompts[i];
        reqs[i].req.max_tokens = N_GEN;
        reqs[i].req.ignore_eog = true;
        reqs[i].req.spec = i % 2 ? SCHED_SPEC_NGRAM : SCHED_SPEC_NONE;
        reqs[i].tokens = out[i];
    }
    fl_error_t err = {0};
    if (gen_run(e->model, e->kv, reqs, N_PROMPTS, NULL, NULL, NULL, &err)) fail_msg("gen_run: %s", err.msg);
    for (int i = 0; i < N_PROMPTS; i++) assert_int_equal(reqs[i].n_tokens, N_GEN);
}

/* Every position's logits of seq[0, n) in one step (teacher forcing). */
static void forward_all(engine_t *e, const int32_t *seq, int n, float *logits)
{
    model_t *m = e->model;
    kv_seq_t s;
    assert_int_equal(kv_seq_init(&s, m->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(e->kv, &s, n), 0);
    int32_t pos[SEQ_MAX], row0[SEQ_MAX], rows[SEQ_MAX];
    int32_t *tables = malloc((size_t)m->max_blocks * sizeof *tables);
    for (int b = 0; b < m->max_blocks; b++) tables[b] = b < s.n_blocks ? s.blocks[b] : -1;
    for (int i = 0; i < n; i++) pos[i] = i, row0[i] = 0, rows[i] = i;
    const model_batch_t b = {.n_tokens = n, .tokens = seq, .pos = pos, .seq = row0, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = rows, .n_logits = n};
    fl_error_t err = {0};
    if (model_forward(m, e->kv, &b, &err)) fail_msg("forward: %s", err.msg);
    assert_int_equal(model_logits(m, logits, n), 0);
    free(tables);
    kv_seq_free(e->kv, &s);
}

typedef struct {
    int32_t seq[N_PROMPTS][SEQ_MAX];
    int n[N_PROMPTS];
    float *logits[N_PROMPTS]; /* [n][vocab] */
    int32_t greedy[N_PROMPTS][N_GEN];
    int vocab;
} reference_t;

static void reference_new(const char *path, reference_t *ref)
{
    fl_error_t err = {0};
    engine_t *e = open_rank(path, 0, 1, &err);
    if (!e) fail_msg("%s", err.msg);
    ref->vocab = e->model->cfg.n_vocab;
    generate(e, ref->greedy);
    for (int i = 0; i < N_PROMPTS; i++) {
        make_prompt(i, ref->seq[i], &ref->n[i]);
        memcpy(ref->seq[i] + ref->n[i], ref->greedy[i], N_GEN * sizeof(int32_t)); /* prompt + TP=1's completion */
        ref->n[i] += N_GEN;
        ref->logits[i] = malloc((size_t)ref->n[i] * ref->vocab * sizeof(float));
        forward_all(e, ref->seq[i], ref->n[i], ref->logits[i]);
    }
    engine_destroy(&e);
}

static void reference_free(reference_t *ref)
{
    for (int i = 0; i < N_PROMPTS; i++) free(ref->logits[i]);
}

static int argmax(const float *x, int n, float *margin)
{
    int best = 0, second = -1;
    for (int i = 1; i < n; i++) {
        if (x[i] > x[best]) second = best, best = i;
        else if (second < 0 || x[i] > x[second]) second = i;
    }
    *margin = x[best] - x[second];
    return best;
}

static void check_group(const char *path, int size, float bound)
{
    reference_t ref;
    reference_new(path, &ref);
    comm_t *c = NULL;
    pid_t pids[COMM_MAX_RANKS];
    engine_t *e = start_group(path, size, &c, pids, NULL, NULL);
    float worst = 0, largest = 0;
    int flips = 0, near_ties = 0;
    float *logits = malloc((size_t)SEQ_MAX * ref.vocab * sizeof(float));
    for (int i = 0; i < N_PROMPTS; i++) {
        forward_all(e, ref.seq[i], ref.n[i], logits);
        for (int t = 0; t < ref.n[i]; t++) {
            const float *a = ref.logits[i] + (size_t)t * ref.vocab, *b = logits + (size_t)t * ref.vocab;
            for (int v = 0; v < ref.vocab; v++) {
                if (fabsf(a[v] - b[v]) > worst) worst = fabsf(a[v] - b[v]);
                if (fabsf(a[v]) > largest) largest = fabsf(a[v]);
            }
            float margin, m2;
            const int ta = argmax(a, ref.vocab, &margin), tb = argmax(b, ref.vocab, &m2);
            if (margin < TP_TIE) near_ties++;
            if (ta != tb) {
                flips++;
                if (margin >= TP_TIE) fail_msg("prompt %d position %d: TP=1 token %d (margin %g), TP=%d token %d", i, t, ta, margin, size, tb);
            }
        }
    }
    free(logits);
    fprintf(stderr,
            "  %s TP=%d: max |logit difference| %.3g (bound %g; largest |logit| %.3g), greedy flips %d at %d "
            "near-ties (tie %g)\n",
            path, size, worst, bound, largest, flips, near_ties, TP_TIE);
    assert_true(worst <= bound);

    /* Free-running greedy generation: the same tokens up to the first position TP=1 nearly tied. */
    int32_t out[N_PROMPTS][N_GEN];
    generate(e, out);
    for (int i = 0; i < N_PROMPTS; i++) {
        const int n_prompt = ref.n[i] - N_GEN;
        for (int t = 0; t < N_GEN; t++) {
            float margin;
            argmax(ref.logits[i] + (size_t)(n_prompt + t - 1) * ref.vocab, ref.vocab, &margin);
            if (out[i][t] != ref.greedy[i][t]) {
                if (margin >= TP_TIE)
                    fail_msg("prompt %d token %d: TP=1 %d, TP=%d %d (margin %g)", i, t, ref.greedy[i][t], size, out[i][t],
                             margin);
                break; /* a near-tie flipped: the rest may differ */
            }
        }
    }
    assert_int_equal(stop_group(&e, &c, pids, size, true), size - 1);
    reference_free(&ref);
}

/* ---- KV blocks whole, for pulls ------------------------------------------------------------------- */

enum { KV_PROMPT = 40, KV_FULL_BLOCKS = 2 };

/* The prompt's full blocks after one forward step over it, whole (tp_kv_read), into out. */
static void prompt_blocks_whole(engine_t *e, const int32_t *seq, uint8_t *out)
{
    model_t *m = e->model;
    kv_seq_t s;
    assert_int_equal(kv_seq_init(&s, m->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(e->kv, &s, KV_PROMPT), 0);
    int32_t pos[KV_PROMPT], row0[KV_PROMPT], last = KV_PROMPT - 1;
    int32_t *tables = malloc((size_t)m->max_blocks * sizeof *tables);
    for (int b = 0; b < m->max_blocks; b++) tables[b] = b < s.n_blocks ? s.blocks[b] : -1;
    for (int i = 0; i < KV_PROMPT; i++) pos[i] = i, row0[i] = 0;
    const model_batch_t b = {.n_tokens = KV_PROMPT, .tokens = seq, .pos = pos, .seq = row0, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = &last, .n_logits = 1};
    fl_error_t err = {0};
    if (model_forward(m, e->kv, &b, &err)) fail_msg("forward: %s", err.msg);
    if (tp_kv_read(m, e->kv, s.blocks, KV_FULL_BLOCKS, out, &err)) fail_msg("tp_kv_read: %s", err.msg);
    free(tables);
    kv_seq_free(e->kv, &s);
}

static void check_kv_whole(const char *path, int size)
{
    int32_t seq[KV_PROMPT], n = 0;
    make_prompt(4, seq, &n);
    for (int i = n; i < KV_PROMPT; i++) seq[i] = 3 + i;
    fl_error_t err = {0};
    engine_t *one = open_rank(path, 0, 1, &err);
    if (!one) fail_msg("TP=1: %s", err.msg);
    const size_t all = kv_cache_block_bytes_all(one->kv, one->model->cfg.n_kv_heads);
    assert_int_equal(all, kv_cache_block_bytes(one->kv));
    const size_t layer = all / (size_t)one->kv->n_layers;
    uint8_t *want = malloc(all * KV_FULL_BLOCKS), *got = malloc(all * KV_FULL_BLOCKS),
            *back = malloc(all * KV_FULL_BLOCKS);
    prompt_blocks_whole(one, seq, want);
    engine_destroy(&one);

    comm_t *c = NULL;
    pid_t pids[COMM_MAX_RANKS];
    engine_t *e = start_group(path, size, &c, pids, NULL, NULL);
    assert_int_equal(kv_cache_block_bytes_all(e->kv, e->model->cfg.n_kv_heads), all);
    prompt_blocks_whole(e, seq, got);
    /* layer 0 of each block bit for bit; the layers after within the bound (f16 K and V) */
    float worst = 0;
    for (int blk = 0; blk < KV_FULL_BLOCKS; blk++) {
        const uint8_t *a = want + (size_t)blk * all, *g = got + (size_t)blk * all;
        if (memcmp(a, g, layer)) fail_msg("TP=%d block %d: layer 0's K/V differ from TP=1's", size, blk);
        for (size_t i = 0; i < all / 2; i++) {
            const float x = fl_f16_to_f32(((const fl_f16_t *)a)[i]), y = fl_f16_to_f32(((const fl_f16_t *)g)[i]);
            if (fabsf(x - y) > worst) worst = fabsf(x - y);
        }
    }
    fprintf(stderr, "  %s TP=%d: whole KV blocks, max |difference| from TP=1 %.3g (bound %g)\n", path, size, worst,
            TP_KV_BOUND);
    assert_true(worst <= TP_KV_BOUND);
    /* TP=1's blocks handed out to the ranks' heads and gathered back: the same bytes */
    int32_t fresh[KV_FULL_BLOCKS];
    for (int i = 0; i < KV_FULL_BLOCKS; i++) assert_true((fresh[i] = kv_cache_alloc_block(e->kv)) >= 0);
    if (tp_kv_write(e->model, e->kv, fresh, KV_FULL_BLOCKS, want, &err)) fail_msg("tp_kv_write: %s", err.msg);
    if (tp_kv_read(e->model, e->kv, fresh, KV_FULL_BLOCKS, back, &err)) fail_msg("tp_kv_read: %s", err.msg);
    assert_memory_equal(back, want, all * KV_FULL_BLOCKS);
    for (int i = 0; i < KV_FULL_BLOCKS; i++) kv_cache_release_block(e->kv, fresh[i]);
    assert_int_equal(stop_group(&e, &c, pids, size, true), size - 1);
    free(want);
    free(got);
    free(back);
}

static void test_tp_kv_blocks_whole_equal_tp1_and_round_trip(void **state)
{
    (void)state;
    check_kv_whole(g_model_f32, 2); /* 2 KV heads: one a rank */
    check_kv_whole(g_model_kv3, 2); /* 3 KV heads: rank 0 one, rank 1 two (Q4_1 weights) */
}

static void test_tp2_equals_tp1_within_bound(void **state)
{
    (void)state;
    check_group(g_model_f32, 2, TP_BOUND_F32);
    check_group(g_model_kv2, 2, TP_BOUND_QUANT);
    check_group(g_model_qwen, 2, TP_BOUND_QUANT);
}

static void test_tp_uneven_and_three_ranks_equal_tp1(void **state)
{
    (void)state;
    check_group(g_model_kv3, 2, TP_BOUND_QUANT);
    check_group(g_model_kv3, 3, TP_BOUND_QUANT);
}

/* ---- failures ------------------------------------------------------------------------------------ */

static void test_tp_group_with_other_flags_refused_on_every_rank(void **state)
{
    (void)state;
    comm_t *c = NULL;
    pid_t pids[COMM_MAX_RANKS];
    const engine_opts_t tweak = {.max_batch_tokens = 32};
    int rc = 0;
    engine_t *e = start_group(g_model_kv2, 2, &c, pids, &tweak, &rc);
    assert_int_equal(rc, FL_EINVAL);
    assert_int_equal(stop_group(&e, &c, pids, 2, false), 0); /* the follower refused too (exit 3) */
}

static void test_tp_dead_follower_ends_rank0_step_with_epeer(void **state)
{
    (void)state;
    comm_t *c = NULL;
    pid_t pids[COMM_MAX_RANKS];
    engine_t *e = start_group(g_model_kv2, 2, &c, pids, NULL, NULL);
    kill(pids[1], SIGKILL);
    int st;
    assert_int_equal(waitpid(pids[1], &st, 0), pids[1]);
    int32_t seq[8] = {5, 6, 7, 8, 9, 10, 11, 12};
    kv_seq_t s;
    assert_int_equal(kv_seq_init(&s, e->model->max_blocks), 0);
    assert_int_equal(kv_seq_reserve(e->kv, &s, 8), 0);
    int32_t pos[8], zero[8] = {0}, rows[1] = {7};
    for (int i = 0; i < 8; i++) pos[i] = i;
    int32_t *tables = calloc((size_t)e->model->max_blocks, sizeof *tables);
    tables[0] = s.blocks[0];
    const model_batch_t b = {.n_tokens = 8, .tokens = seq, .pos = pos, .seq = zero, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = rows, .n_logits = 1};
    fl_error_t err = {0};
    assert_int_equal(model_forward(e->model, e->kv, &b, &err), FL_EPEER);
    fprintf(stderr, "  rank 0: %s\n", err.msg);
    assert_int_equal(model_forward(e->model, e->kv, &b, &err), FL_EPEER); /* and at once from then on */
    free(tables);
    kv_seq_free(e->kv, &s);
    engine_destroy(&e);
    comm_destroy(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tp_cut_by_kv_heads_uneven_rank0_smaller),
        cmocka_unit_test(test_tp_sharded_load_equals_slices_of_whole),
        cmocka_unit_test(test_tp2_equals_tp1_within_bound),
        cmocka_unit_test(test_tp_uneven_and_three_ranks_equal_tp1),
        cmocka_unit_test(test_tp_group_with_other_flags_refused_on_every_rank),
        cmocka_unit_test(test_tp_dead_follower_ends_rank0_step_with_epeer),
        cmocka_unit_test(test_tp_kv_blocks_whole_equal_tp1_and_round_trip),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
