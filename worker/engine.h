/* engine.h - one model ready to run: backend + weights + tokenizer + paged KV cache.
 *
 * What folioctl run, the benchmarks, the tests and the worker process all start from, so the
 * start-up path (backend choice, model load, KV sizing) exists once. */
#ifndef FOLIO_ENGINE_H
#define FOLIO_ENGINE_H

#include <stddef.h>

#include "generate.h"
#include "kv_cache.h"
#include "model.h"

typedef struct engine_opts {
    const char *model_path;     /* NULL: fl_model_path() */
    const char *backend;        /* "cpu", "cuda" or NULL/"auto" (cuda where a GPU is present) */
    int device;                 /* CUDA device */
    int threads;                /* CPU threads, 0 = all cores */
    size_t kv_budget_bytes;     /* 0: kv_fraction */
    double kv_fraction;         /* of the backend's free memory after the weights; 0: 0.5 on CUDA, 64 MiB on CPU */
    int block_size;             /* 0 = 16 */
    int kv_type_k, kv_type_v;   /* KV types of K and V (kern_kv_type_ok); 0 = F16 */
    int max_batch_tokens;       /* 0 = 512 */
    int max_seqs;               /* 0 = 64 */
    int max_ctx;                /* 0 = model's context */
    bool weights_f32;           /* see model_params_t.weights_f32 */
    int tp_rank, tp_size;       /* this rank's share of a tensor-parallel group (model_params_t); the
                                   caller joins the group's communicator (model_set_comm) */
    const char *heads_path;     /* Medusa heads (medusa.h): a file, "none", or NULL for the default
                                   heads file beside the model (medusa_default_path) when it exists */
} engine_opts_t;

typedef struct engine {
    kern_backend_t *be;
    model_t *model;
    kv_cache_t *kv;
    struct medusa *medusa;      /* the loaded heads, or NULL */
} engine_t;

engine_t *engine_new(const engine_opts_t *opts, fl_error_t *err);
void engine_destroy(engine_t **ep);

/* Parses the engine flag at argv[*i] (-m/--model, --backend, --device, --threads, --kv-budget,
 * --kv-fraction, --kv-type, --kv-type-k, --kv-type-v, --block-size, --ctx, --heads) and its value, for a main(). Returns 1 when it consumed a flag,
 * 0 when argv[*i] is not an engine flag, -1 (after printing why) on a bad value. */
int engine_parse_flag(engine_opts_t *o, int argc, char **argv, int *i);
const char *engine_flags_help(void);

#endif
