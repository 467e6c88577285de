/* engine.c - see engine.h. */
#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "flags.h"
#include "log.h"
#include "medusa.h"
#include "model_path.h"

/* The heads asked for, or the default heads beside the model when they exist. A default file that
 * does not load (made for an earlier model) is only a warning: nobody asked for it. */
static int load_heads(engine_t *e, const engine_opts_t *o, fl_error_t *err)
{
    const char *asked = o->heads_path;
    if (asked && !strcmp(asked, "none")) return FL_OK;
    char path[4096];
    if (asked && *asked) {
        snprintf(path, sizeof path, "%s", asked);
        if (!(e->medusa = medusa_load(path, e->model, err))) return err && err->code ? err->code : FL_EFORMAT;
    } else {
        medusa_default_path(gguf_path(e->model->gguf), path, sizeof path);
        if (access(path, F_OK)) return FL_OK;
        fl_error_t herr = {0};
        if (!(e->medusa = medusa_load(path, e->model, &herr))) {
            fl_log_warn("medusa heads not loaded path=%s error=\"%s\"", path, herr.msg);
            return FL_OK;
        }
    }
    fl_log_info("medusa heads loaded path=%s heads=%d shared_output=%d", path, medusa_n_heads(e->medusa),
                medusa_shared_output(e->medusa));
    return FL_OK;
}

engine_t *engine_new(const engine_opts_t *o, fl_error_t *err)
{
    engine_t *e = calloc(1, sizeof *e);
    if (!e) {
        fl_fail(err, FL_ENOMEM, "engine: out of memory");
        return NULL;
    }
    const char *backend = o->backend && *o->backend ? o->backend : "auto";
    if (!strcmp(backend, "auto")) backend = kern_cuda_available() ? "cuda" : "cpu";
    if (!strcmp(backend, "cpu")) {
        e->be = kern_cpu_new(o->threads, err);
    } else if (!strcmp(backend, "cuda")) {
        e->be = kern_cuda_new(o->device, err);
    } else {
        fl_fail(err, FL_EINVAL, "unknown backend '%s' (cpu, cuda)", backend);
    }
    if (!e->be) goto fail;
    /* Zero fields take model_new's defaults; one logit row per sequence, and 128 more for the draft
     * tokens speculative steps verify (the scheduler shares them out). */
    const int max_seqs = o->max_seqs > 0 ? o->max_seqs : 64;
    const model_params_t mp = {.max_batch_tokens = o->max_batch_tokens, .max_logits = max_seqs + 128,
                               .max_seqs = o->max_seqs, .max_ctx = o->max_ctx, .block_size = o->block_size,
                               .weights_f32 = o->weights_f32, .tp_rank = o->tp_rank, .tp_size = o->tp_size};
    e->model = model_new(fl_model_path(o->model_path), e->be, &mp, err);
    if (!e->model) goto fail;
    const model_config_t *c = &e->model->cfg;
    size_t budget = o->kv_budget_bytes;
    if (budget && o->kv_fraction > 0)
        fl_log_warn("kv cache: --kv-budget given, --kv-fraction %.2f ignored", o->kv_fraction);
    if (!budget) {
        /* A fraction of what is free once the weights are loaded: asked for, or half of it by
         * default where the backend has memory of its own (a GPU: a worker owns its GPU; two sharing
         * one each take half of what is left). Host memory is shared with everything else, so its
         * default stays small. */
        const bool own_memory = kern_uses_device_memory(e->be);
        const double fraction = o->kv_fraction > 0 ? o->kv_fraction : own_memory ? 0.5 : 0;
        size_t free_bytes = 0, total_bytes = 0;
        if (fraction > 0) {
            if (kern_mem_info(e->be, &free_bytes, &total_bytes)) {
                fl_fail(err, FL_EUNSUPPORTED, "engine: the %s backend cannot report its free memory for --kv-fraction",
                        kern_backend_name(e->be));
                goto fail;
            }
            budget = (size_t)(fraction * (double)free_bytes);
            fl_log_info("kv cache sized fraction=%.2f free_mib=%zu total_mib=%zu budget_mib=%zu", fraction,
                   free_bytes >> 20, total_bytes >> 20, budget >> 20);
        } else {
            budget = (size_t)64 << 20;
        }
    }
    /* A tensor-parallel rank keeps its own KV heads, and the group's ranks share block ids, so they
     * need the same block count: the budget buys blocks of the rank with the most KV heads, and a
     * rank with fewer takes as many (floor(floor(B / most) / per_block_of(most)) on each). */
    const model_shard_t *sh = &e->model->shard;
    if (sh->size > 1) budget = budget / (size_t)((c->n_kv_heads + sh->size - 1) / sh->size) * (size_t)sh->n_kv_heads;
    const int k_type = o->kv_type_k ? o->kv_type_k : FL_TYPE_F16, v_type = o->kv_type_v ? o->kv_type_v : FL_TYPE_F16;
    e->kv = kv_cache_new(e->be, c->n_layers, e->model->shard.n_kv_heads, c->head_dim, e->model->block_size,
                         k_type, v_type, budget, err);
    /* Medusa's heads read the final hidden state and the output matrix: rank 0's alone. */
    if (!e->kv || (e->model->shard.rank == 0 && load_heads(e, o, err))) goto fail;
    return e;
fail:
    engine_destroy(&e);
    return NULL;
}

void engine_destroy(engine_t **ep)
{
    engine_t *e = ep ? *ep : NULL;
    if (!e) return;
    kv_cache_destroy(&e->kv);
    medusa_destroy(&e->medusa);
    model_destroy(&e->model);
    kern_destroy(&e->be);
    free(e);
    *ep = NULL;
}

int engine_parse_flag(engine_opts_t *o, int argc, char **argv, int *i)
{
    const char *f = argv[*i], *v;
    long n;
    if (!strcmp(f, "-m") || !strcmp(f, "--model")) {
        if (!(v = fl_flag_value(argc, argv, i))) return -1;
        o->model_path = v;
    } else if (!strcmp(f, "--backend")) {
        if (!(v = fl_flag_value(argc, argv, i))) return -1;
        if (strcmp(v, "cpu") && strcmp(v, "cuda") && strcmp(v, "auto")) {
            fprintf(stderr, "error: --backend expects cpu, cuda or auto, got '%s'\n", v);
            return -1;
        }
        o->backend = v;
    } else if (!strcmp(f, "--device")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(f, v, 0, 64, &n)) return -1;
        o->device = (int)n;
    } else if (!strcmp(f, "-t") || !strcmp(f, "--threads")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(f, v, 0, 1024, &n)) return -1;
        o->threads = (int)n;
    } else if (!strcmp(f, "--kv-budget")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_bytes(f, v, &o->kv_budget_bytes)) return -1;
    } else if (!strcmp(f, "--kv-fraction")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_float(f, v, 0.001, 0.95, &o->kv_fraction)) return -1;
    } else if (!strcmp(f, "--kv-type") || !strcmp(f, "--kv-type-k") || !strcmp(f, "--kv-type-v")) {
        if (!(v = fl_flag_value(argc, argv, i))) return -1;
        const int t = kv_type_parse(v);
        if (t < 0) {
            fprintf(stderr, "error: %s expects f16, q8_0 or q4_0, got '%s'\n", f, v);
            return -1;
        }
        if (strcmp(f, "--kv-type-v")) o->kv_type_k = t;
        if (strcmp(f, "--kv-type-k")) o->kv_type_v = t;
    } else if (!strcmp(f, "--block-size")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(f, v, 1, 1024, &n)) return -1;
        o->block_size = (int)n;
    } else if (!strcmp(f, "--ctx")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(f, v, 16, 1 << 20, &n)) return -1;
        o->max_ctx = (int)n;
    } else if (!strcmp(f, "--heads")) {
        if (!(v = fl_flag_value(argc, argv, i))) return -1;
        o->heads_path = v;
    } else {
        return 0;
    }
    return 1;
}

const char *engine_flags_help(void)
{
    return "  -m, --model PATH      GGUF model (default: $FOLIO_MODEL or the model set-up fetched)\n"
           "  --backend cpu|cuda    compute backend (default: cuda where a GPU is present)\n"
           "  --device N            CUDA device\n"
           "  -t, --threads N       CPU threads (default: all cores)\n"
           "  --kv-budget BYTES     KV cache memory, e.g. 64MiB\n"
           "  --kv-fraction F       KV cache as a fraction of the free memory after the weights\n"
           "                        (default: 0.5 on CUDA; 64MiB on the CPU)\n"
           "  --kv-type T           KV cache element type of K and V: f16 (default), q8_0 or q4_0\n"
           "                        (quantized: llama.cpp's flash-attention numbers)\n"
           "  --kv-type-k T, --kv-type-v T  the same for K or V alone\n"
           "  --block-size N        KV block size in tokens (default 16)\n"
           "  --ctx N               longest sequence (default: the model's context)\n"
           "  --heads FILE|none     Medusa heads for speculative decoding (default: the model's\n"
           "                        <model>.medusa.gguf when present; folio-medusa-train makes it)\n";
}
