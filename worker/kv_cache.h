/* kv_cache.h - the paged KV cache: a fixed pool of blocks of block_size token slots, per layer.
 *
 * Memory comes from a byte budget at creation; bytes per token = layers x kv_heads x head_dim x (bytes
 * per K element + bytes per V element), per element 2 for F16, 34/32 for Q8_0, 18/32 for Q4_0 (the
 * KV types, kernels.h; 2 x layers x kv_heads x head_dim x 2 for F16). The types are the cache's
 * identity: every block of a cache holds rows of its types, and nothing reads a block but through
 * its cache (a prefix hit, a preempted sequence's recompute). A sequence owns a block table (block ids in position order) that
 * grows one block at a time; attention reads the pools in place through it. Blocks carry reference
 * counts so that sequences can share them.
 *
 * Prefix cache: a full block can be published under its chained hash (block_hash.h) with a copy of
 * its token ids; kv_cache_lookup() then hands it to any sequence with the same prefix (hash and
 * tokens must both match: the hash names the block, the tokens guard against a collision). A
 * published block whose last reference goes stays cached on an LRU list instead of returning to the
 * free list; kv_cache_alloc_block() takes free blocks first and only then evicts the least recently
 * used cached one. Every block is in exactly one state: free (free list), used (refcount > 0, cached
 * or not) or evictable (refcount 0, cached, on the LRU list). The hash table (open addressing,
 * linear probing, backward-shift deletion) is sized at creation, so nothing allocates after it.
 *
 * Threading: owned by the one thread that schedules steps; not thread-safe. */
#ifndef FOLIO_KV_CACHE_H
#define FOLIO_KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "block_hash.h"
#include "kernels.h"

typedef struct kv_cache {
    kern_backend_t *be;
    int n_layers, n_kv_heads, head_dim, block_size;
    int k_type, v_type;    /* KV types of the K and V pools (kern_kv_type_ok) */
    int n_blocks;
    size_t bytes_per_token;
    void **k, **v;         /* [n_layers] pools in backend memory */
    int32_t *refcount;     /* [n_blocks] */
    int32_t *free_list;    /* stack of free block ids */
    int n_free;

    /* Prefix cache. */
    block_hash_t *hash;    /* [n_blocks] valid where cached */
    int32_t *tokens;       /* [n_blocks][block_size] token ids of cached blocks */
    uint8_t *cached;       /* [n_blocks] 1 when published (in the hash table) */
    int32_t *lru_prev, *lru_next; /* [n_blocks] links of the evictable list, -1 at the ends */
    int32_t lru_head, lru_tail;   /* head is evicted first */
    int n_evictable;
    int32_t *table;        /* [table_mask + 1] block ids, -1 empty */
    uint32_t table_mask;
    uint64_t hits, evictions;
    /* Called as a block is published (stored true) or evicted from the prefix cache, with its hash:
     * what the coordinator routes by (kv_events.h). NULL: nobody listens. */
    void (*on_block)(void *user, bool stored, block_hash_t h);
    void *on_block_user;
} kv_cache_t;

/* Sizes the pool from budget_bytes for K and V of k_type and v_type; fails if not even one block fits,
 * or (FL_EINVAL) for a type that is not a KV type or a quantized type with head_dim not a multiple
 * of 32. */
kv_cache_t *kv_cache_new(kern_backend_t *be, int n_layers, int n_kv_heads, int head_dim, int block_size, int k_type,
                         int v_type, size_t budget_bytes, fl_error_t *err);
/* "f16", "q8_0", "q4_0", or "k/v" ("q8_0/f16") when the K and V types differ: the cache's types as
 * --kv-type spells them, written to buf. */
const char *kv_cache_type_name(const kv_cache_t *kv, char *buf, size_t cap);
/* The KV type --kv-type names s ("f16", "q8_0", "q4_0"), or -1. */
int kv_type_parse(const char *s);
const char *kv_type_name(int type);
void kv_cache_destroy(kv_cache_t **kvp);

/* Takes a free block, else evicts the least recently used cached one (refcount 1, uncached), or
 * returns -1 when every block is referenced. */
int32_t kv_cache_alloc_block(kv_cache_t *kv);
/* Drops one reference; at zero a cached block goes to the LRU list's tail, any other to the free
 * list. Out-of-range ids and blocks with no reference are ignored. */
void kv_cache_release_block(kv_cache_t *kv, int32_t block);

/* The cached block whose hash is h and whose block_size tokens equal tokens, with one more
 * reference (taken off the LRU list if it had none), or -1. */
int32_t kv_cache_lookup(kv_cache_t *kv, block_hash_t h, const int32_t *tokens);
/* The cached block under h with these tokens, or -1; takes no reference and counts no hit. */
int32_t kv_cache_find(const kv_cache_t *kv, block_hash_t h, const int32_t *tokens);
/* Publishes a full, referenced block under h with a copy of its tokens. Returns the block now
 * cached under h: block itself, or an existing block kept in its place (block then stays
 * uncached and goes to the free list when released). A block already published is left as is. */
int32_t kv_cache_publish(kv_cache_t *kv, int32_t block, block_hash_t h, const int32_t *tokens);

/* Blocks an allocation can get: free plus evictable. */
static inline int kv_cache_free_blocks(const kv_cache_t *kv) { return kv->n_free + kv->n_evictable; }
/* Blocks holding a cached prefix that nobody references (a subset of kv_cache_free_blocks). */
static inline int kv_cache_evictable_blocks(const kv_cache_t *kv) { return kv->n_evictable; }
/* Blocks referenced by at least one owner. */
static inline int kv_cache_used_blocks(const kv_cache_t *kv) { return kv->n_blocks - kv->n_free - kv->n_evictable; }
static inline int kv_cache_capacity_tokens(const kv_cache_t *kv) { return kv->n_blocks * kv->block_size; }

/* A block's contents as KV block pulls carry them (proto/README.md, "KV block pulls"): for each
 * layer, its K rows then its V rows as the pools hold them. kv_cache_block_bytes() bytes a block;
 * read copies them to host memory, write copies them from host memory into block (FL_E* from the
 * backend). */
size_t kv_cache_block_bytes(const kv_cache_t *kv);
int kv_cache_block_read(kv_cache_t *kv, int32_t block, uint8_t *out);
int kv_cache_block_write(kv_cache_t *kv, int32_t block, const uint8_t *in);

/* A rank of a tensor-parallel group (tp.h) holds KV heads [head0, head0 + kv->n_kv_heads) of
 * n_heads_all; pulls carry a block whole, as one rank holding all heads would read it, whatever the
 * groups' cuts. The whole form's bytes; and one block between the whole form (all) and this cache's
 * (mine, kv_cache_block_bytes): to_all puts mine's rows into their places in all, else all's slice
 * goes into mine. A row's heads are contiguous and a quantized head a whole number of 32-element
 * blocks (kv_cache_new), so a slice is a byte range of each row. */
size_t kv_cache_block_bytes_all(const kv_cache_t *kv, int n_heads_all);
void kv_cache_block_slice(const kv_cache_t *kv, int head0, int n_heads_all, uint8_t *all, uint8_t *mine, bool to_all);

/* Copies the K/V of every layer from slots src[i] to dst[i], in order (kern_kv_move). */
void kv_cache_move(kv_cache_t *kv, const int32_t *src_slots, const int32_t *dst_slots, int n);

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
