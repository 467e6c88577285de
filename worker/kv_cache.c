/* kv_cache.c - paged KV block pool; see kv_cache.h. */
#include "kv_cache.h"

#include <stdlib.h>

#include "log.h"

kv_cache_t *kv_cache_new(kern_backend_t *be, int n_layers, int n_kv_heads, int head_dim, int block_size,
                         size_t budget_bytes, fl_error_t *err)
{
    if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || block_size <= 0) {
        fl_fail(err, FL_EINVAL, "kv cache: invalid shape layers=%d kv_heads=%d head_dim=%d block=%d", n_layers,
                n_kv_heads, head_dim, block_size);
        return NULL;
    }
    size_t per_token, per_block;
    if (__builtin_mul_overflow(2u * sizeof(fl_f16_t), (size_t)n_layers, &per_token) ||
        __builtin_mul_overflow(per_token, (size_t)n_kv_heads, &per_token) ||
        __builtin_mul_overflow(per_token, (size_t)head_dim, &per_token) ||
        __builtin_mul_overflow(per_token, (size_t)block_size, &per_block)) {
        fl_fail(err, FL_ERANGE, "kv cache: shape layers=%d kv_heads=%d head_dim=%d block=%d is too large", n_layers,
                n_kv_heads, head_dim, block_size);
        return NULL;
    }
    const size_t n_blocks = budget_bytes / per_block;
    if (n_blocks < 1 || n_blocks > INT32_MAX) {
        fl_fail(err, FL_ERANGE, "kv cache: budget %zu bytes holds %s block of %d tokens (%zu bytes per token)",
                budget_bytes, n_blocks < 1 ? "no" : "more than INT32_MAX blocks of one", block_size, per_token);
        return NULL;
    }
    kv_cache_t *kv = calloc(1, sizeof *kv);
    if (!kv) goto oom;
    kv->be = be;
    kv->n_layers = n_layers;
    kv->n_kv_heads = n_kv_heads;
    kv->head_dim = head_dim;
    kv->block_size = block_size;
    kv->n_blocks = (int)n_blocks;
    kv->bytes_per_token = per_token;
    kv->k = calloc((size_t)n_layers, sizeof *kv->k);
    kv->v = calloc((size_t)n_layers, sizeof *kv->v);
    kv->refcount = calloc(n_blocks, sizeof *kv->refcount);
    kv->free_list = malloc(n_blocks * sizeof *kv->free_list);
    if (!kv->k || !kv->v || !kv->refcount || !kv->free_list) goto oom;
    const size_t pool_bytes = per_block / 2 / (size_t)n_layers * n_blocks;
    for (int l = 0; l < n_layers; l++) {
        kv->k[l] = kern_alloc(be, pool_bytes);
        kv->v[l] = kern_alloc(be, pool_bytes);
        if (!kv->k[l] || !kv->v[l]) goto oom;
    }
    /* Lowest ids on top of the stack, so allocation order is deterministic. */
    for (int i = 0; i < (int)n_blocks; i++) kv->free_list[i] = (int32_t)n_blocks - 1 - i;
    kv->n_free = (int)n_blocks;
    fl_log_info("kv cache bytes_per_token=%zu blocks=%zu block_size=%d capacity_tokens=%zu budget=%zu", per_token,
                n_blocks, block_size, n_blocks * (size_t)block_size, budget_bytes);
    return kv;
oom:
    fl_fail(err, FL_ENOMEM, "kv cache: out of memory allocating %zu blocks", n_blocks);
    kv_cache_destroy(&kv);
    return NULL;
}

void kv_cache_destroy(kv_cache_t **kvp)
{
    kv_cache_t *kv = kvp ? *kvp : NULL;
    if (!kv) return;
    for (int l = 0; l < kv->n_layers; l++) {
        if (kv->k && kv->k[l]) kern_free(kv->be, kv->k[l]);
        if (kv->v && kv->v[l]) kern_free(kv->be, kv->v[l]);
    }
    free(kv->k);
    free(kv->v);
    free(kv->refcount);
    free(kv->free_list);
    free(kv);
    *kvp = NULL;
}

int32_t kv_cache_alloc_block(kv_cache_t *kv)
{
    if (kv->n_free == 0) return -1;
    const int32_t b = kv->free_list[--kv->n_free];
    kv->refcount[b] = 1;
    return b;
}

void kv_cache_release_block(kv_cache_t *kv, int32_t block)
{
    if (block < 0 || block >= kv->n_blocks || kv->refcount[block] <= 0) return;
    if (--kv->refcount[block] == 0) kv->free_list[kv->n_free++] = block;
}

int kv_seq_init(kv_seq_t *s, int max_blocks)
{
    s->blocks = calloc((size_t)(max_blocks > 0 ? max_blocks : 1), sizeof *s->blocks);
    s->n_blocks = 0;
    s->max_blocks = max_blocks;
    s->n_tokens = 0;
    return s->blocks ? FL_OK : FL_ENOMEM;
}

int kv_seq_reserve(kv_cache_t *kv, kv_seq_t *s, int n_tokens)
{
    const int need = (n_tokens + kv->block_size - 1) / kv->block_size;
    if (need > s->max_blocks) return FL_ERANGE;
    while (s->n_blocks < need) {
        const int32_t b = kv_cache_alloc_block(kv);
        if (b < 0) return FL_ERANGE;
        s->blocks[s->n_blocks++] = b;
    }
    return FL_OK;
}

void kv_seq_reset(kv_cache_t *kv, kv_seq_t *s)
{
    for (int i = 0; i < s->n_blocks; i++) kv_cache_release_block(kv, s->blocks[i]);
    s->n_blocks = 0;
    s->n_tokens = 0;
}

void kv_seq_free(kv_cache_t *kv, kv_seq_t *s)
{
    if (!s->blocks) return;
    kv_seq_reset(kv, s);
    free(s->blocks);
    s->blocks = NULL;
}
