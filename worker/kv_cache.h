/* kv_cache.h - the paged KV cache: a fixed pool of blocks of block_size token slots, per layer.
 *
 * Memory comes from a byte budget at creation; bytes per token = 2 (K and V) x layers x kv_heads x
 * head_dim x sizeof(fl_f16_t). A sequence owns a block table (block ids in position order) that
 * grows one block at a time; attention reads the pools in place through it. Blocks carry reference
 * counts so that later a prefix cache can share them between sequences.
 *
 * Threading: owned by the one thread that schedules steps; not thread-safe. */
#ifndef FOLIO_KV_CACHE_H
#define FOLIO_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

typedef struct kv_cache {
    kern_backend_t *be;
    int n_layers, n_kv_heads, head_dim, block_size;
    int n_blocks;
    size_t bytes_per_token;
    fl_f16_t **k, **v;     /* [n_layers] pools in backend memory */
    int32_t *refcount;     /* [n_blocks] */
    int32_t *free_list;    /* stack of free block ids */
    int n_free;
} kv_cache_t;

/* Sizes the pool from budget_bytes; fails if not even one block fits. */
kv_cache_t *kv_cache_new(kern_backend_t *be, int n_layers, int n_kv_heads, int head_dim, int block_size,
                         size_t budget_bytes, fl_error_t *err);
void kv_cache_destroy(kv_cache_t **kvp);

/* Takes a free block (refcount 1) or returns -1 when none is left. */
int32_t kv_cache_alloc_block(kv_cache_t *kv);
/* Drops one reference; the block returns to the free list at zero. */
void kv_cache_release_block(kv_cache_t *kv, int32_t block);
static inline int kv_cache_free_blocks(const kv_cache_t *kv) { return kv->n_free; }
static inline int kv_cache_capacity_tokens(const kv_cache_t *kv) { return kv->n_blocks * kv->block_size; }

/* A sequence's blocks. The table has room for max_blocks (the model's context / block_size). */
typedef struct kv_seq {
    int32_t *blocks;
    int n_blocks, max_blocks;
    int n_tokens;          /* positions written so far */
} kv_seq_t;

int kv_seq_init(kv_seq_t *s, int max_blocks);
/* Makes room for positions up to n_tokens-1; FL_ERANGE when the pool or the table is exhausted
 * (the blocks already held stay held). */
int kv_seq_reserve(kv_cache_t *kv, kv_seq_t *s, int n_tokens);
/* Releases every block and empties the sequence (the table memory stays for reuse). */
void kv_seq_reset(kv_cache_t *kv, kv_seq_t *s);
void kv_seq_free(kv_cache_t *kv, kv_seq_t *s);

#endif
