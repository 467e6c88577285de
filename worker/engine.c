/* engine.c - see engine.h. */
#include "engine.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"

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
    /* Zero fields take model_new's defaults; one logit row per sequence. */
    const model_params_t mp = {.max_batch_tokens = o->max_batch_tokens, .max_logits = o->max_seqs,
                               .max_seqs = o->max_seqs, .max_ctx = o->max_ctx, .block_size = o->block_size,
                               .weights_f32 = o->weights_f32};
    e->model = model_new(model_default_path(o->model_path), e->be, &mp, err);
    if (!e->model) goto fail;
    const model_config_t *c = &e->model->cfg;
    size_t budget = o->kv_budget_bytes;
    if (budget && o->kv_fraction > 0)
        fl_log_warn("kv cache: --kv-budget given, --kv-fraction %.2f ignored", o->kv_fraction);
    if (!budget) {
        /* A fraction of what is free once the weights are loaded: asked for, or half the device's
         * by default on a GPU (a worker owns its GPU; two sharing one each take half of what is
         * left). The CPU default stays small: host memory is shared with everything else. */
        const bool on_gpu = !strcmp(e->be->ops->name, "cuda");
        const double fraction = o->kv_fraction > 0 ? o->kv_fraction : on_gpu ? 0.5 : 0;
        size_t free_bytes = 0, total_bytes = 0;
        if (fraction > 0) {
            if (kern_mem_info(e->be, &free_bytes, &total_bytes)) {
                fl_fail(err, FL_EUNSUPPORTED, "engine: the %s backend cannot report its free memory for --kv-fraction",
                        e->be->ops->name);
                goto fail;
            }
            budget = (size_t)(fraction * (double)free_bytes);
            fl_log_info("kv cache sized fraction=%.2f free_mib=%zu total_mib=%zu budget_mib=%zu", fraction,
                   free_bytes >> 20, total_bytes >> 20, budget >> 20);
        } else {
            budget = (size_t)64 << 20;
        }
    }
    e->kv = kv_cache_new(e->be, c->n_layers, c->n_kv_heads, c->head_dim, e->model->block_size, budget, err);
    if (!e->kv) goto fail;
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
    model_destroy(&e->model);
    kern_destroy(&e->be);
    free(e);
    *ep = NULL;
}
