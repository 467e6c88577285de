/* fuzz_heads.c - libFuzzer target for the Medusa heads file loader (worker/medusa.c, medusa_load) on
 * untrusted files, against a tiny random base model on the CPU backend.
 *
 * Input: a heads file's bytes (a GGUF), written to a memfd that medusa_load opens by path. The base
 * model is deterministic (mkmodel, fixed seed), so the committed seeds (heads for it: own and
 * shared output projections, a vocabulary subset, F32 and F16 outputs, accuracies) carry its
 * identity and mutations reach past the identity check. Invariants: no crash, leak or over-read; a
 * failure says why; loaded heads have 1 to MEDUSA_MAX_HEADS heads, and proposing from them after
 * a forward step (whatever their weights: NaN and infinity included) gives token ids within the
 * base vocabulary.
 *
 * FUZZ_HEADS_WRITE_SEEDS=DIR: instead of fuzzing, writes the seeds into DIR (how
 * tests/fuzz/corpus/heads/ was made) and exits. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine.h"
#include "kv_cache.h"
#include "medusa.h"
#include "mkmodel.h"

#define VOCAB 300
#define DIM 32
#define TOP_K 3

static engine_t *g_engine;
static int g_fd = -1;
static char g_path[64];

static void forward_once(engine_t *e)
{
    model_t *m = e->model;
    static const int32_t prompt[4] = {1, 40, 77, 200};
    kv_seq_t s;
    if (kv_seq_init(&s, m->max_blocks) || kv_seq_reserve(e->kv, &s, 4)) abort();
    int32_t pos[4] = {0, 1, 2, 3}, seq[4] = {0}, rows[2] = {2, 3}, tables[64];
    for (int j = 0; j < m->max_blocks && j < 64; j++) tables[j] = j < s.n_blocks ? s.blocks[j] : -1;
    const model_batch_t b = {.n_tokens = 4, .tokens = prompt, .pos = pos, .seq = seq, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = rows, .n_logits = 2};
    fl_error_t err = {0};
    if (model_forward(m, e->kv, &b, &err)) abort();
    kv_seq_free(e->kv, &s);
}

static void write_seeds(const char *dir)
{
    float fc[2 * DIM * DIM], own[2 * VOCAB * DIM];
    for (size_t i = 0; i < sizeof fc / sizeof fc[0]; i++) fc[i] = (float)((int)(i * 2654435761u % 2001) - 1000) * 1e-4f;
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++) own[i] = (float)((int)(i * 40503u % 2001) - 1000) * 1e-3f;
    static const int32_t ids[8] = {0, 3, 17, 40, 41, 100, 255, 299};
    struct {
        const char *name;
        int n_heads;
        bool shared;
        const int32_t *tokens;
        int n_tokens;
        int type;
    } seeds[] = {
        {"shared_subset", 2, true, ids, 8, FL_TYPE_F32},
        {"shared_all", 1, true, NULL, 0, FL_TYPE_F32},
        {"own_subset_f16", 2, false, ids, 8, FL_TYPE_F16},
        {"own_all", 1, false, NULL, 0, FL_TYPE_F32},
    };
    for (size_t k = 0; k < sizeof seeds / sizeof seeds[0]; k++) {
        medusa_weights_t w = {.n_heads = seeds[k].n_heads, .shared_output = seeds[k].shared,
                              .tokens = seeds[k].tokens, .n_tokens = seeds[k].n_tokens,
                              .output_type = seeds[k].type};
        for (int h = 0; h < w.n_heads; h++) {
            w.fc[h] = fc + (size_t)h * DIM * DIM;
            w.output[h] = seeds[k].shared ? NULL : own + (size_t)h * VOCAB * DIM;
            for (int r = 0; r < MEDUSA_ACC_RANKS; r++) w.accuracy[h][r] = k == 1 ? 0 : 0.2f + 0.05f * (float)r;
        }
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, seeds[k].name);
        fl_error_t err = {0};
        if (medusa_save(path, g_engine->model, &w, &err)) {
            fprintf(stderr, "medusa_save %s: %s\n", path, err.msg);
            exit(1);
        }
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    char model[64];
    snprintf(model, sizeof model, "/tmp/folio-fuzz-heads-%d.gguf", (int)getpid());
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 1;
    p.dim = DIM;
    p.ff = 64;
    p.n_heads = 4;
    p.n_kv_heads = 2;
    p.vocab = VOCAB;
    p.ctx = 64;
    p.seed = 23;
    p.threads = 1;
    fl_error_t err = {0};
    if (mkmodel_write(&p, model, &err)) {
        fprintf(stderr, "mkmodel: %s\n", err.msg);
        abort();
    }
    engine_opts_t o = {.model_path = model, .backend = "cpu", .threads = 1, .max_seqs = 2, .max_batch_tokens = 16,
                       .kv_budget_bytes = 1 << 20, .heads_path = "none"};
    g_engine = engine_new(&o, &err);
    unlink(model); /* mapped: the engine keeps it */
    if (!g_engine) {
        fprintf(stderr, "engine: %s\n", err.msg);
        abort();
    }
    forward_once(g_engine);
    const char *seeds = getenv("FUZZ_HEADS_WRITE_SEEDS");
    if (seeds && *seeds) {
        write_seeds(seeds);
        exit(0);
    }
    g_fd = memfd_create("heads", 0);
    if (g_fd < 0) abort();
    snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (ftruncate(g_fd, 0) || (size && pwrite(g_fd, data, size, 0) != (ssize_t)size)) abort();
    fl_error_t err = {0};
    model_t *m = g_engine->model;
    medusa_t *h = medusa_load(g_path, m, &err);
    if (!h) {
        if (!err.msg[0]) abort(); /* every failure must say why */
        return 0;
    }
    const int n_heads = medusa_n_heads(h);
    if (n_heads < 1 || n_heads > MEDUSA_MAX_HEADS) abort();
    /* Accuracies are taken as the file has them (they only size draft trees, never change an
     * output): read, not judged. */
    volatile float acc = 0;
    for (int k = 0; k < n_heads; k++)
        for (int r = 0; r < MEDUSA_ACC_RANKS; r++) acc += medusa_head_accuracy(h, k, r);
    int32_t rows[2] = {1, 0}, out[2 * MEDUSA_MAX_HEADS * TOP_K];
    if (medusa_propose(h, m, rows, 2, TOP_K, out, &err) == 0) {
        for (int i = 0; i < 2 * n_heads * TOP_K; i++)
            if (out[i] < 0 || out[i] >= VOCAB) abort();
    } else if (!err.msg[0]) {
        abort();
    }
    medusa_destroy(&h);
    return 0;
}
