/* test_tp_reference_slow.c - tensor parallelism on the default model (SmolLM2-135M: 9 query heads,
 * 3 KV heads, so TP=2 cuts them 1 + 2 and TP=3 one each) over the reference prompts.
 *
 * Protects: with the continuation llama.cpp chose (tests/fixtures/reference_greedy.json) fed in,
 * every position's logits of TP=2 and TP=3 (ranks as forked processes on the host transport) stay
 * within BOUND of TP=1's, and each position's greedy token is TP=1's unless TP=1's top-1/top-2 margin
 * is below TIE. Why not bit for bit: test_tp.c and below. Exits 77 without the model. */
#define _GNU_SOURCE
#include <math.h>
#include <stdbool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "comm.h"
#include "engine.h"
#include "file_read.h"
#include "model_path.h"
#include "tp.h"

/* Measured (TP=2 / TP=3, 2,807 positions): quantized weights, max |logit difference| 2.60 / 2.24 and
 * greedy tokens different at 86 / 86 positions, where TP=1's margin was at most 0.52 / 0.30; F32
 * weights (FOLIO_TP_F32=1), 0.053 / 0.061 and 3 / 0 positions. The CPU rounds every activation to 8
 * bits before a quantized product, so a last-bit difference from the order of a row-parallel sum
 * flips a rounding now and then, and 30 layers carry it on (README: "llama.cpp's arithmetic");
 * with F32 weights the order alone remains. */
#define BOUND_QUANT 3.0f
#define TIE_QUANT   0.6f
#define BOUND_F32   0.1f
#define TIE_F32     0.1f
#define BOUND (g_f32 ? BOUND_F32 : BOUND_QUANT)
#define TIE   (g_f32 ? TIE_F32 : TIE_QUANT)
#define MAX_CASE 64
#define MAX_SEQ  320

typedef struct {
    int32_t seq[MAX_SEQ];
    int n;
} ref_case_t;

static ref_case_t g_cases[MAX_CASE];
static int g_n;
static bool g_f32; /* FOLIO_TP_F32=1: weights dequantized to F32 (no 8-bit activations) */

static int load_cases(void)
{
    const char *dir = getenv("FOLIO_FIXTURES");
    char path[1024];
    snprintf(path, sizeof path, "%s/reference_greedy.json", dir ? dir : "tests/fixtures");
    char *js = fl_read_file(path, NULL);
    if (!js) return -1;
    cJSON *root = cJSON_Parse(js), *c, *it;
    free(js);
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases"))
    {
        if (g_n == MAX_CASE) break;
        ref_case_t *rc = &g_cases[g_n++];
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "prompt_tokens")) if (rc->n < MAX_SEQ) rc->seq[rc->n++] = it->valueint;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(c, "tokens")) if (rc->n < MAX_SEQ) rc->seq[rc->n++] = it->valueint;
    }
    cJSON_Delete(root);
    return g_n ? 0 : -1;
}

static engine_t *open_rank(int rank, int size, fl_error_t *err)
{
    engine_opts_t o = {.backend = "cpu", .threads = 1, .max_batch_tokens = MAX_SEQ, .max_seqs = MAX_SEQ - 128, .max_ctx = 1024,
                       .kv_budget_bytes = (size_t)64 << 20, .tp_rank = rank, .tp_size = size, .heads_path = "none",
                       .weights_f32 = g_f32};
    return engine_new(&o, err);
}

static int forward_all(engine_t *e, const ref_case_t *c, float *logits)
{
    model_t *m = e->model;
    kv_seq_t s;
    if (kv_seq_init(&s, m->max_blocks) || kv_seq_reserve(e->kv, &s, c->n)) return 1;
    int32_t pos[MAX_SEQ], zero[MAX_SEQ] = {0}, rows[MAX_SEQ];
    int32_t *tables = malloc((size_t)m->max_blocks * sizeof *tables);
    for (int i = 0; i < c->n; i++) pos[i] = i, rows[i] = i;
    for (int b = 0; b < m->max_blocks; b++) tables[b] = b < s.n_blocks ? s.blocks[b] : -1;
    /* logits in chunks of max_logits rows, the K/V written by the first pass reused */
    int rc = 0;
    for (int first = 0; first < c->n && !rc; first += m->max_logits) {
        const int k = c->n - first < m->max_logits ? c->n - first : m->max_logits;
        const model_batch_t b = {.n_tokens = c->n, .tokens = c->seq, .pos = pos, .seq = zero, .block_tables = tables,
                                 .n_seqs = 1, .logit_rows = rows + first, .n_logits = k};
        fl_error_t err = {0};
        if ((rc = model_forward(m, e->kv, &b, &err))) fprintf(stderr, "forward: %s\n", err.msg);
        else rc = model_logits(m, logits + (size_t)first * m->cfg.n_vocab, k);
    }
    free(tables);
    kv_seq_free(e->kv, &s);
    return rc;
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

static int check(int size, float **ref, int vocab)
{
    comm_id_t id;
    comm_id_new(COMM_HOST, &id, NULL);
    const comm_opts_t co = {.timeout_ms = 120000};
    pid_t pids[COMM_MAX_RANKS];
    for (int r = 1; r < size; r++) {
        if ((pids[r] = fork())) continue;
        fl_error_t err = {0};
        engine_t *e = open_rank(r, size, &err);
        comm_t *c = e ? comm_init(&id, r, size, &co, &err) : NULL;
        const int bad = !c || model_set_comm(e->model, c, &err) || tp_check_group(e->model, e->kv, &err) ||
                        tp_follow(e->model, e->kv, &err);
        if (bad) fprintf(stderr, "rank %d: %s\n", r, err.msg);
        engine_destroy(&e);
        comm_destroy(&c);
        _exit(bad);
    }
    fl_error_t err = {0};
    engine_t *e = open_rank(0, size, &err);
    comm_t *c = e ? comm_init(&id, 0, size, &co, &err) : NULL;
    if (!c || model_set_comm(e->model, c, &err) || tp_check_group(e->model, e->kv, &err)) {
        fprintf(stderr, "rank 0: %s\n", err.msg);
        return 1;
    }
    float *l = malloc((size_t)MAX_SEQ * vocab * sizeof *l), worst = 0, flip_margin = 0;
    int fails = 0, flips = 0, ties = 0, positions = 0;
    for (int i = 0; i < g_n; i++) {
        if (forward_all(e, &g_cases[i], l)) {
            fails++;
            break;
        }
        for (int t = 0; t < g_cases[i].n; t++, positions++) {
            const float *a = ref[i] + (size_t)t * vocab, *b = l + (size_t)t * vocab;
            for (int v = 0; v < vocab; v++)
                if (fabsf(a[v] - b[v]) > worst) worst = fabsf(a[v] - b[v]);
            float ma, mb;
            const int ta = argmax(a, vocab, &ma), tb = argmax(b, vocab, &mb);
            ties += ma < TIE;
            if (ta != tb) {
                flips++;
                if (ma > flip_margin) flip_margin = ma;
                if (ma >= TIE) {
                    fprintf(stderr, "FAIL: case %d position %d: TP=1 %d (margin %g), TP=%d %d\n", i, t, ta, ma, size, tb);
                    fails++;
                }
            }
        }
    }
    tp_stop(e->model, NULL);
    for (int r = 1; r < size; r++) {
        int st;
        waitpid(pids[r], &st, 0);
        fails += !WIFEXITED(st) || WEXITSTATUS(st);
    }
    printf("TP=%d vs TP=1 over %d reference prompts (%d positions, %s weights): max |logit difference| %.4g (bound "
           "%g); greedy tokens differ at %d positions, TP=1's margin there at most %.3g (tie %g; %d positions below it)\n",
           size, g_n, positions, g_f32 ? "F32" : "quantized", worst, BOUND, flips, flip_margin, TIE, ties);
    if (worst > BOUND) fails++;
    free(l);
    engine_destroy(&e);
    comm_destroy(&c);
    return fails;
}

int main(void)
{
    if (access(fl_model_path(NULL), R_OK)) {
        printf("SKIPPED: the default model %s is not here\n", fl_model_path(NULL));
        return 77;
    }
    if (load_cases()) return 1;
    g_f32 = getenv("FOLIO_TP_F32") && !strcmp(getenv("FOLIO_TP_F32"), "1");
    fl_error_t err = {0};
    engine_t *e = open_rank(0, 1, &err);
    if (!e) {
        fprintf(stderr, "engine: %s\n", err.msg);
        return 1;
    }
    const int vocab = e->model->cfg.n_vocab;
    float *ref[MAX_CASE];
    for (int i = 0; i < g_n; i++) {
        ref[i] = malloc((size_t)g_cases[i].n * vocab * sizeof(float));
        if (forward_all(e, &g_cases[i], ref[i])) return 1;
    }
    engine_destroy(&e);
    int fails = check(2, ref, vocab) + check(3, ref, vocab);
    for (int i = 0; i < g_n; i++) free(ref[i]);
    return fails ? 1 : 0;
}
