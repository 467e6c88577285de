/* kv_cache.c - paged KV block pool with a prefix cache; see kv_cache.h.
 *
 * The hash table maps a block's 128-bit chain hash to its id. It has at least twice as many slots
 * as blocks (load <= 1/2), indexed by the hash's low bits and probed linearly; deletion shifts the
 * following entries back instead of leaving tombstones, so probes stay short however long the
 * cache churns. The LRU list is intrusive (prev/next arrays), so touching a block is O(1). */
#include "kv_cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

int kv_type_parse(const char *s)
{
    static const int types[] = {FL_TYPE_F16, FL_TYPE_Q8_0, FL_TYPE_Q4_0};
    for (size_t i = 0; s && i < sizeof types / sizeof *types; i++)
        if (!strcmp(s, kv_type_name(types[i]))) return types[i];
    return -1;
}

const char *kv_type_name(int type)
{
    switch (type) {
    case FL_TYPE_F16: return "f16";
    case FL_TYPE_Q8_0: return "q8_0";
    case FL_TYPE_Q4_0: return "q4_0";
    default: return "?";
    }
}

const char *kv_cache_type_name(const kv_cache_t *kv, char *buf, size_t cap)
{
    if (kv->k_type == kv->v_type) snprintf(buf, cap, "%s", kv_type_name(kv->k_type));
    else snprintf(buf, cap, "%s/%s", kv_type_name(kv->k_type), kv_type_name(kv->v_type));
    return buf;
}

kv_cache_t *kv_cache_new(kern_backend_t *be, int n_layers, int n_kv_heads, int head_dim, int block_size, int k_type,
                         int v_type, size_t budget_bytes, fl_error_t *err)
{
    if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || block_size <= 0) {
        fl_fail(err, FL_EINVAL, "kv cache: invalid shape layers=%d kv_heads=%d head_dim=%d block=%d", n_layers,
                n_kv_heads, head_dim, block_size);
        return NULL;
    }
    const int types[2] = {k_type, v_type};
    for (int t = 0; t < 2; t++) {
        if (!kern_kv_type_ok(types[t])) {
            fl_fail(err, FL_EINVAL, "kv cache: %s type %s (%d) is not a KV type (f16, q8_0, q4_0)", t ? "V" : "K",
                    fl_dtype_name(types[t]), types[t]);
            return NULL;
        }
        if (types[t] != FL_TYPE_F16 && head_dim % FL_QK) {
            fl_fail(err, FL_EINVAL, "kv cache: %s type %s needs head_dim a multiple of %d, the model's is %d",
                    t ? "V" : "K", kv_type_name(types[t]), FL_QK, head_dim);
            return NULL;
        }
    }
    /* per token: layers x (K row + V row); a row of kv_heads x head_dim elements */
    size_t per_token, per_block, kv_dim;
    if (__builtin_mul_overflow((size_t)n_kv_heads, (size_t)head_dim, &kv_dim) || kv_dim > INT32_MAX ||
        __builtin_mul_overflow(kern_kv_row_bytes(k_type, (int)kv_dim) + kern_kv_row_bytes(v_type, (int)kv_dim),
                               (size_t)n_layers, &per_token) ||
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
    kv->k_type = k_type;
    kv->v_type = v_type;
    kv->n_blocks = (int)n_blocks;
    kv->bytes_per_token = per_token;
    kv->k = calloc((size_t)n_layers, sizeof *kv->k);
    kv->v = calloc((size_t)n_layers, sizeof *kv->v);
    kv->refcount = calloc(n_blocks, sizeof *kv->refcount);
    kv->free_list = malloc(n_blocks * sizeof *kv->free_list);
    size_t n_slots = 2;
    while (n_slots < 2 * n_blocks) n_slots *= 2;
    kv->table_mask = (uint32_t)(n_slots - 1);
    kv->table = malloc(n_slots * sizeof *kv->table);
    kv->hash = calloc(n_blocks, sizeof *kv->hash);
    kv->tokens = malloc(n_blocks * (size_t)block_size * sizeof *kv->tokens);
    kv->cached = calloc(n_blocks, sizeof *kv->cached);
    kv->lru_prev = malloc(n_blocks * sizeof *kv->lru_prev);
    kv->lru_next = malloc(n_blocks * sizeof *kv->lru_next);
    if (!kv->k || !kv->v || !kv->refcount || !kv->free_list || !kv->table || !kv->hash || !kv->tokens ||
        !kv->cached || !kv->lru_prev || !kv->lru_next)
        goto oom;
    for (size_t i = 0; i < n_slots; i++) kv->table[i] = -1;
    kv->lru_head = kv->lru_tail = -1;
    const size_t slots = n_blocks * (size_t)block_size;
    for (int l = 0; l < n_layers; l++) {
        kv->k[l] = kern_alloc(be, slots * kern_kv_row_bytes(k_type, (int)kv_dim));
        kv->v[l] = kern_alloc(be, slots * kern_kv_row_bytes(v_type, (int)kv_dim));
        if (!kv->k[l] || !kv->v[l]) goto oom;
    }
    /* Lowest ids on top of the stack, so allocation order is deterministic. */
    for (int i = 0; i < (int)n_blocks; i++) kv->free_list[i] = (int32_t)n_blocks - 1 - i;
    kv->n_free = (int)n_blocks;
    char tn[16];
    fl_log_info("kv cache kv_type=%s bytes_per_token=%zu blocks=%zu block_size=%d capacity_tokens=%zu budget=%zu",
                kv_cache_type_name(kv, tn, sizeof tn), per_token, n_blocks, block_size, n_blocks * (size_t)block_size,
                budget_bytes);
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
    kern_graph_reset(kv->be); /* recorded steps hold this cache's pool addresses */
    for (int l = 0; l < kv->n_layers; l++) {
        if (kv->k && kv->k[l]) kern_free(kv->be, kv->k[l]);
        if (kv->v && kv->v[l]) kern_free(kv->be, kv->v[l]);
    }
    free(kv->k);
    free(kv->v);
    free(kv->refcount);
    free(kv->free_list);
    free(kv->table);
    free(kv->hash);
    free(kv->tokens);
    free(kv->cached);
    free(kv->lru_prev);
    free(kv->lru_next);
    free(kv);
    *kvp = NULL;
}

static uint32_t table_home(const kv_cache_t *kv, block_hash_t h) { return (uint32_t)h.lo & kv->table_mask; }

/* The table slot holding block, or -1. */
static int64_t table_find_block(const kv_cache_t *kv, int32_t block)
{
    for (uint32_t i = table_home(kv, kv->hash[block]);; i = (i + 1) & kv->table_mask) {
        if (kv->table[i] == block) return i;
        if (kv->table[i] < 0) return -1;
    }
}

/* Removes a cached block from the table: later entries of the probe run move back into the hole
 * unless their home lies cyclically in (hole, their slot], where they already are reachable. */
static void table_remove(kv_cache_t *kv, int32_t block)
{
    const int64_t at = table_find_block(kv, block);
    if (at < 0) return;
    uint32_t hole = (uint32_t)at;
    for (uint32_t j = (hole + 1) & kv->table_mask; kv->table[j] >= 0; j = (j + 1) & kv->table_mask) {
        const uint32_t home = table_home(kv, kv->hash[kv->table[j]]);
        const bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays) continue;
        kv->table[hole] = kv->table[j];
        hole = j;
    }
    kv->table[hole] = -1;
    kv->cached[block] = 0;
}

static void lru_unlink(kv_cache_t *kv, int32_t b)
{
    const int32_t p = kv->lru_prev[b], n = kv->lru_next[b];
    if (p >= 0) kv->lru_next[p] = n;
    else kv->lru_head = n;
    if (n >= 0) kv->lru_prev[n] = p;
    else kv->lru_tail = p;
    kv->n_evictable--;
}

static void lru_push_tail(kv_cache_t *kv, int32_t b)
{
    kv->lru_prev[b] = kv->lru_tail;
    kv->lru_next[b] = -1;
    if (kv->lru_tail >= 0) kv->lru_next[kv->lru_tail] = b;
    else kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_evictable++;
}

int32_t kv_cache_alloc_block(kv_cache_t *kv)
{
    int32_t b;
    if (kv->n_free > 0) {
        b = kv->free_list[--kv->n_free];
    } else if (kv->lru_head >= 0) {
        b = kv->lru_head;
        lru_unlink(kv, b);
        table_remove(kv, b);
        kv->evictions++;
        if (kv->on_block) kv->on_block(kv->on_block_user, false, kv->hash[b]);
    } else {
        return -1;
    }
    kv->refcount[b] = 1;
    return b;
}

void kv_cache_release_block(kv_cache_t *kv, int32_t block)
{
    if (block < 0 || block >= kv->n_blocks || kv->refcount[block] <= 0) return;
    if (--kv->refcount[block] > 0) return;
    if (kv->cached[block]) lru_push_tail(kv, block);
    else kv->free_list[kv->n_free++] = block;
}

static bool same_block(const kv_cache_t *kv, int32_t b, block_hash_t h, const int32_t *tokens)
{
    return block_hash_equal(kv->hash[b], h) &&
           !memcmp(kv->tokens + (size_t)b * kv->block_size, tokens, (size_t)kv->block_size * sizeof *tokens);
}

int32_t kv_cache_lookup(kv_cache_t *kv, block_hash_t h, const int32_t *tokens)
{
    for (uint32_t i = table_home(kv, h);; i = (i + 1) & kv->table_mask) {
        const int32_t b = kv->table[i];
        if (b < 0) return -1;
        if (!same_block(kv, b, h, tokens)) continue;
        if (kv->refcount[b]++ == 0) lru_unlink(kv, b);
        kv->hits++;
        return b;
    }
}

int32_t kv_cache_find(const kv_cache_t *kv, block_hash_t h, const int32_t *tokens)
{
    for (uint32_t i = table_home(kv, h);; i = (i + 1) & kv->table_mask) {
        const int32_t b = kv->table[i];
        if (b < 0 || same_block(kv, b, h, tokens)) return b;
    }
}

static size_t block_part_bytes(const kv_cache_t *kv, int type)
{
    return (size_t)kv->block_size * kern_kv_row_bytes(type, kv->n_kv_heads * kv->head_dim);
}

size_t kv_cache_block_bytes(const kv_cache_t *kv)
{
    return (size_t)kv->n_layers * (block_part_bytes(kv, kv->k_type) + block_part_bytes(kv, kv->v_type));
}

size_t kv_cache_block_bytes_all(const kv_cache_t *kv, int n_heads_all)
{
    const int dim = n_heads_all * kv->head_dim;
    return (size_t)kv->n_layers * kv->block_size *
           (kern_kv_row_bytes(kv->k_type, dim) + kern_kv_row_bytes(kv->v_type, dim));
}

void kv_cache_block_slice(const kv_cache_t *kv, int head0, int n_heads_all, uint8_t *all, uint8_t *mine, bool to_all)
{
    const int types[2] = {kv->k_type, kv->v_type};
    for (int l = 0; l < kv->n_layers; l++)
        for (int part = 0; part < 2; part++) { /* a layer's K rows, then its V rows, in both forms */
            const size_t row_all = kern_kv_row_bytes(types[part], n_heads_all * kv->head_dim);
            const size_t row_mine = kern_kv_row_bytes(types[part], kv->n_kv_heads * kv->head_dim);
            const size_t off = kern_kv_row_bytes(types[part], head0 * kv->head_dim);
            for (int t = 0; t < kv->block_size; t++, all += row_all, mine += row_mine) {
                if (to_all)
                    memcpy(all + off, mine, row_mine);
                else
                    memcpy(mine, all + off, row_mine);
            }
        }
}

int kv_cache_block_read(kv_cache_t *kv, int32_t block, uint8_t *out)
{
    const size_t kb = block_part_bytes(kv, kv->k_type), vb = block_part_bytes(kv, kv->v_type);
    for (int l = 0; l < kv->n_layers; l++, out += kb + vb) {
        int rc = kern_download(kv->be, out, (const uint8_t *)kv->k[l] + (size_t)block * kb, kb);
        if (!rc) rc = kern_download(kv->be, out + kb, (const uint8_t *)kv->v[l] + (size_t)block * vb, vb);
        if (rc) return rc;
    }
    return FL_OK;
}

int kv_cache_block_write(kv_cache_t *kv, int32_t block, const uint8_t *in)
{
    const size_t kb = block_part_bytes(kv, kv->k_type), vb = block_part_bytes(kv, kv->v_type);
    for (int l = 0; l < kv->n_layers; l++, in += kb + vb) {
        int rc = kern_upload(kv->be, (uint8_t *)kv->k[l] + (size_t)block * kb, in, kb);
        if (!rc) rc = kern_upload(kv->be, (uint8_t *)kv->v[l] + (size_t)block * vb, in + kb, vb);
        if (rc) return rc;
    }
    return FL_OK;
}

int32_t kv_cache_publish(kv_cache_t *kv, int32_t block, block_hash_t h, const int32_t *tokens)
{
    if (block < 0 || block >= kv->n_blocks || kv->refcount[block] <= 0) return -1;
    if (kv->cached[block]) return block;
    uint32_t i = table_home(kv, h);
    for (; kv->table[i] >= 0; i = (i + 1) & kv->table_mask)
        if (block_hash_equal(kv->hash[kv->table[i]], h)) return kv->table[i]; /* first one wins */
    /* Load stays <= 1/2 (each block at most once in a table of >= 2 * n_blocks slots): a hole exists. */
    kv->table[i] = block;
    kv->hash[block] = h;
    memcpy(kv->tokens + (size_t)block * kv->block_size, tokens, (size_t)kv->block_size * sizeof *tokens);
    kv->cached[block] = 1;
    if (kv->on_block) kv->on_block(kv->on_block_user, true, h);
    return block;
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

void kv_cache_move(kv_cache_t *kv, const int32_t *src_slots, const int32_t *dst_slots, int n)
{
    const int kv_dim = kv->n_kv_heads * kv->head_dim;
    for (int l = 0; l < kv->n_layers && n > 0; l++)
        kern_kv_move(kv->be, kv->k[l], kv->v[l], kv->k_type, kv->v_type, src_slots, dst_slots, n, kv_dim);
}
