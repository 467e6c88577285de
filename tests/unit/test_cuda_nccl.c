/* test_cuda_nccl.c - the NCCL transport (worker/comm_nccl.c, kernels/cuda/comm_nccl.cu) on one GPU.
 *
 * Protects: a one-rank NCCL communicator runs through the tensor-parallel code path (the model's
 * all-reduces, comm_wait, the plan's host-staged broadcast) and changes nothing: TP=1 with NCCL gives
 * the same logits, bit for bit, as TP=1 without; and reports the all-reduce's bandwidth (one rank:
 * NCCL's copy path; several ranks need several GPUs). Exits 77 (skipped) without a usable CUDA
 * backend or NCCL in the CUDA module. Not run in this tree yet (no GPU was lent): unverified. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "comm.h"
#include "engine.h"
#include "mkmodel.h"

#define N_TOK 40

static int forward_all(engine_t *e, float *logits)
{
    model_t *m = e->model;
    kv_seq_t s;
    if (kv_seq_init(&s, m->max_blocks) || kv_seq_reserve(e->kv, &s, N_TOK)) return 1;
    int32_t tokens[N_TOK], pos[N_TOK], zero[N_TOK] = {0}, rows[N_TOK];
    int32_t *tables = malloc((size_t)m->max_blocks * sizeof *tables);
    for (int i = 0; i < N_TOK; i++) tokens[i] = 3 + i * 7 % 250, pos[i] = i, rows[i] = i;
    for (int b = 0; b < m->max_blocks; b++) tables[b] = b < s.n_blocks ? s.blocks[b] : -1;
    const model_batch_t b = {.n_tokens = N_TOK, .tokens = tokens, .pos = pos, .seq = zero, .block_tables = tables,
                             .n_seqs = 1, .logit_rows = rows, .n_logits = N_TOK};
    fl_error_t err = {0};
    int rc = model_forward(m, e->kv, &b, &err);
    if (rc) fprintf(stderr, "forward: %s\n", err.msg);
    if (!rc) rc = model_logits(m, logits, N_TOK);
    free(tables);
    kv_seq_free(e->kv, &s);
    return rc;
}

int main(void)
{
    fl_error_t err = {0};
    if (!kern_cuda_available()) {
        printf("SKIPPED: no usable CUDA backend\n");
        return 77;
    }
    comm_id_t id;
    if (comm_id_new(COMM_NCCL, &id, &err)) {
        printf("SKIPPED: %s\n", err.msg);
        return 77;
    }
    char path[128];
    snprintf(path, sizeof path, "/tmp/folio_test_cuda_nccl_%d.gguf", (int)getpid());
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 3;
    p.dim = 256;
    p.ff = 512;
    p.n_heads = 4;
    p.n_kv_heads = 2;
    p.vocab = 600;
    p.type = FL_TYPE_Q8_0;
    if (mkmodel_write(&p, path, &err)) {
        fprintf(stderr, "mkmodel: %s\n", err.msg);
        return 1;
    }
    engine_opts_t o = {.model_path = path, .backend = "cuda", .kv_budget_bytes = 16 << 20, .heads_path = "none"};
    engine_t *e = engine_new(&o, &err);
    unlink(path);
    if (!e) {
        fprintf(stderr, "engine: %s\n", err.msg);
        return 1;
    }
    const size_t n = (size_t)N_TOK * e->model->cfg.n_vocab;
    float *plain = malloc(n * sizeof *plain), *with = malloc(n * sizeof *with);
    int fails = forward_all(e, plain) != 0;
    const comm_opts_t co = {.timeout_ms = 20000, .backend = e->be};
    comm_t *c = comm_init(&id, 0, 1, &co, &err);
    if (!c) {
        fprintf(stderr, "comm_init (NCCL, 1 rank): %s\n", err.msg);
        return 1;
    }
    fails += model_set_comm(e->model, c, &err) != 0;
    fails += forward_all(e, with) != 0;
    if (!fails && memcmp(plain, with, n * sizeof *plain)) {
        fprintf(stderr, "FAIL: TP=1 with a one-rank NCCL communicator differs from TP=1 without\n");
        fails++;
    }
    /* The plan's path: a host-staged broadcast. */
    int32_t plan[64];
    for (int i = 0; i < 64; i++) plan[i] = i * 3;
    if (comm_broadcast(c, plan, sizeof plan, 0, &err) || plan[63] != 189) {
        fprintf(stderr, "FAIL: broadcast: %s\n", err.msg);
        fails++;
    }
    /* The all-reduce's bandwidth on device memory (algorithm bytes per second). */
    const size_t floats = (size_t)16 << 20;
    float *d = kern_alloc(e->be, floats * sizeof(float));
    if (d) {
        const int reps = 20;
        comm_allreduce_sum_f32(c, d, floats, &err);
        comm_wait(c, &err);
        const double t0 = fl_clock_s();
        for (int i = 0; i < reps; i++) comm_allreduce_sum_f32(c, d, floats, &err);
        if (comm_wait(c, &err)) fails++;
        const double dt = fl_clock_s() - t0;
        printf("nccl all-reduce, 1 rank, %zu MiB: %.1f GB/s (%.3f ms each)\n", floats * 4 >> 20,
               reps * floats * 4.0 / dt / 1e9, dt / reps * 1e3);
        kern_free(e->be, d);
    }
    engine_destroy(&e);
    comm_destroy(&c);
    free(plain);
    free(with);
    printf(fails ? "FAILED\n" : "OK: TP=1 with NCCL equals TP=1 without\n");
    return fails ? 1 : 0;
}
