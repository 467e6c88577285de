/* test_kv_cache.c - the paged KV block pool (worker/kv_cache.c).
 *
 * Protects: capacity follows the byte budget and the bytes-per-token formula; blocks come and go
 * through the free list with reference counts; a sequence grows block by block and fails cleanly
 * (keeping what it holds) when the pool or its table runs out; release returns every block. Prefix
 * cache: a published block is found by hash and tokens (a hash match with other tokens misses),
 * shared by reference count, kept on an LRU list when unreferenced and evicted oldest first only
 * when no free block is left, after which it is no longer found. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kv_cache.h"

static kern_backend_t *g_be;

static int setup(void **state)
{
    (void)state;
    g_be = kern_cpu_new(1, NULL);
    return g_be ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    kern_destroy(&g_be);
    return 0;
}

static void capacity_follows_budget_and_bytes_per_token(void **state)
{
    (void)state;
    /* The default model's shape: 30 layers, 3 KV heads of 64, f16: 2*30*3*64*2 = 23040 bytes/token. */
    fl_error_t err = {0};
    kv_cache_t *kv = kv_cache_new(g_be, 30, 3, 64, 16, FL_TYPE_F16, FL_TYPE_F16, (size_t)64 << 20, &err);
    assert_non_null(kv);
    assert_int_equal(kv->bytes_per_token, 23040);
    assert_int_equal(kv->n_blocks, (64 << 20) / (23040 * 16));
    assert_int_equal(kv_cache_capacity_tokens(kv), kv->n_blocks * 16);
    assert_int_equal(kv_cache_free_blocks(kv), kv->n_blocks);
    kv_cache_destroy(&kv);
    assert_null(kv);
    kv_cache_destroy(&kv); /* NULL is fine */
}

static void budget_below_one_block_fails_with_message(void **state)
{
    (void)state;
    fl_error_t err = {0};
    assert_null(kv_cache_new(g_be, 30, 3, 64, 16, FL_TYPE_F16, FL_TYPE_F16, 1000, &err));
    assert_int_equal(err.code, FL_ERANGE);
    assert_non_null(strstr(err.msg, "budget"));
    assert_null(kv_cache_new(g_be, 0, 3, 64, 16, FL_TYPE_F16, FL_TYPE_F16, 1 << 20, &err));
    assert_int_equal(err.code, FL_EINVAL);
}

static void blocks_are_refcounted_and_recycled(void **state)
{
    (void)state;
    kv_cache_t *kv = kv_cache_new(g_be, 1, 1, 8, 4, FL_TYPE_F16, FL_TYPE_F16, 4 * (2 * 8 * 2 * 4), NULL);
    assert_non_null(kv);
    assert_int_equal(kv->n_blocks, 4);
    int32_t b[4];
    for (int i = 0; i < 4; i++) b[i] = kv_cache_alloc_block(kv);
    assert_int_equal(b[0], 0); /* deterministic order */
    assert_int_equal(kv_cache_alloc_block(kv), -1);
    kv->refcount[b[1]]++; /* shared by a second owner */
    kv_cache_release_block(kv, b[1]);
    assert_int_equal(kv_cache_free_blocks(kv), 0);
    kv_cache_release_block(kv, b[1]);
    assert_int_equal(kv_cache_free_blocks(kv), 1);
    kv_cache_release_block(kv, b[1]); /* double release is ignored */
    kv_cache_release_block(kv, 99);   /* out of range is ignored */
    assert_int_equal(kv_cache_free_blocks(kv), 1);
    kv_cache_destroy(&kv);
}

static void sequence_grows_and_fails_cleanly(void **state)
{
    (void)state;
    kv_cache_t *kv = kv_cache_new(g_be, 1, 1, 8, 4, FL_TYPE_F16, FL_TYPE_F16, 3 * (2 * 8 * 2 * 4), NULL);
    kv_seq_t a, b;
    assert_int_equal(kv_seq_init(&a, 8), 0);
    assert_int_equal(kv_seq_init(&b, 2), 0);
    assert_int_equal(kv_seq_reserve(kv, &a, 5), 0); /* 2 blocks */
    assert_int_equal(a.n_blocks, 2);
    assert_int_equal(kv_seq_reserve(kv, &a, 8), 0); /* still 2 */
    assert_int_equal(a.n_blocks, 2);
    assert_int_equal(kv_seq_reserve(kv, &b, 9), FL_ERANGE); /* table holds 2 blocks */
    assert_int_equal(b.n_blocks, 0);
    assert_int_equal(kv_seq_reserve(kv, &b, 8), FL_ERANGE); /* pool has 1 left */
    assert_int_equal(b.n_blocks, 1);                          /* keeps what it got */
    kv_seq_reset(kv, &a);
    assert_int_equal(kv_cache_free_blocks(kv), 2);
    assert_int_equal(kv_seq_reserve(kv, &b, 8), 0);
    kv_seq_free(kv, &a);
    kv_seq_free(kv, &b);
    assert_int_equal(kv_cache_free_blocks(kv), 3);
    kv_cache_destroy(&kv);
}

/* A pool of n blocks of 4 tokens (1 layer, 1 KV head of 8). */
static kv_cache_t *small_pool(int n)
{
    kv_cache_t *kv = kv_cache_new(g_be, 1, 1, 8, 4, FL_TYPE_F16, FL_TYPE_F16, (size_t)n * (2 * 8 * 2 * 4), NULL);
    assert_non_null(kv);
    assert_int_equal(kv->n_blocks, n);
    return kv;
}

static block_hash_t hash_of(uint64_t x) { return block_hash_next((block_hash_t){x, ~x}, NULL, 0); }

static void lookup_hits_published_block_and_misses_others(void **state)
{
    (void)state;
    kv_cache_t *kv = small_pool(4);
    const int32_t toks[4] = {10, 11, 12, 13}, other[4] = {10, 11, 12, 14};
    const block_hash_t h = hash_of(1);
    assert_int_equal(kv_cache_lookup(kv, h, toks), -1); /* empty cache */
    const int32_t b = kv_cache_alloc_block(kv);
    assert_int_equal(kv_cache_publish(kv, b, h, toks), b);
    assert_int_equal(kv_cache_lookup(kv, h, toks), b);
    assert_int_equal(kv->refcount[b], 2);
    assert_int_equal(kv_cache_lookup(kv, hash_of(2), toks), -1); /* other hash */
    assert_int_equal(kv_cache_lookup(kv, h, other), -1);        /* same hash, other tokens: a collision */
    assert_int_equal(kv_cache_used_blocks(kv), 1);
    kv_cache_release_block(kv, b);
    kv_cache_release_block(kv, b);
    kv_cache_destroy(&kv);
}

/* KV block pulls: find takes no reference and counts no hit; a block's bytes read from one cache
 * and written into another read back the same, per layer K then V, for every KV type; only the
 * block written changes. */
static void find_is_a_peek_and_blocks_travel_whole(void **state)
{
    (void)state;
    kv_cache_t *kv = small_pool(4);
    const int32_t toks[4] = {10, 11, 12, 13};
    const int32_t b = kv_cache_alloc_block(kv);
    kv_cache_publish(kv, b, hash_of(3), toks);
    kv_cache_release_block(kv, b);
    assert_int_equal(kv_cache_find(kv, hash_of(3), toks), b);
    assert_int_equal(kv_cache_find(kv, hash_of(4), toks), -1);
    assert_int_equal(kv->refcount[b], 0);
    assert_int_equal(kv->hits, 0);
    assert_int_equal(kv_cache_evictable_blocks(kv), 1);
    kv_cache_destroy(&kv);

    const int types[3][2] = {{FL_TYPE_F16, FL_TYPE_F16}, {FL_TYPE_Q8_0, FL_TYPE_Q8_0}, {FL_TYPE_Q8_0, FL_TYPE_Q4_0}};
    for (int t = 0; t < 3; t++) {
        kv_cache_t *a = kv_cache_new(g_be, 3, 2, 32, 4, types[t][0], types[t][1], 1 << 16, NULL);
        kv_cache_t *c = kv_cache_new(g_be, 3, 2, 32, 4, types[t][0], types[t][1], 1 << 16, NULL);
        assert_non_null(a);
        assert_non_null(c);
        const size_t bb = kv_cache_block_bytes(a);
        assert_int_equal(bb, 4 * a->bytes_per_token);
        uint8_t *src = malloc(bb), *dst = malloc(bb), *zero = calloc(1, bb);
        for (size_t i = 0; i < bb; i++) src[i] = (uint8_t)(i * 131 + 7);
        assert_int_equal(kv_cache_block_write(a, 2, src), 0);
        assert_int_equal(kv_cache_block_read(a, 2, dst), 0);
        assert_memory_equal(src, dst, bb);
        assert_int_equal(kv_cache_block_read(a, 1, dst), 0); /* its neighbours untouched */
        assert_memory_equal(zero, dst, bb);
        assert_int_equal(kv_cache_block_read(a, 3, dst), 0);
        assert_memory_equal(zero, dst, bb);
        assert_int_equal(kv_cache_block_read(a, 2, dst), 0); /* to another cache, another block */
        assert_int_equal(kv_cache_block_write(c, 0, dst), 0);
        memset(dst, 0, bb);
        assert_int_equal(kv_cache_block_read(c, 0, dst), 0);
        assert_memory_equal(src, dst, bb);
        free(src);
        free(dst);
        free(zero);
        kv_cache_destroy(&a);
        kv_cache_destroy(&c);
    }
}

static void publishing_a_known_hash_keeps_the_first_block(void **state)
{
    (void)state;
    kv_cache_t *kv = small_pool(4);
    const int32_t toks[4] = {1, 2, 3, 4};
    const block_hash_t h = hash_of(7);
    const int32_t a = kv_cache_alloc_block(kv), b = kv_cache_alloc_block(kv);
    assert_int_equal(kv_cache_publish(kv, a, h, toks), a);
    assert_int_equal(kv_cache_publish(kv, b, h, toks), a); /* b stays uncached */
    assert_int_equal(kv_cache_publish(kv, a, h, toks), a); /* republishing is harmless */
    kv_cache_release_block(kv, b);
    assert_int_equal(kv->n_free, 3); /* uncached: back to the free list */
    kv_cache_release_block(kv, a);
    assert_int_equal(kv_cache_evictable_blocks(kv), 1); /* cached: kept */
    assert_int_equal(kv_cache_free_blocks(kv), 4);
    assert_int_equal(kv_cache_lookup(kv, h, toks), a);
    kv_cache_release_block(kv, a);
    kv_cache_destroy(&kv);
}

static void shared_block_stays_used_until_last_reference(void **state)
{
    (void)state;
    kv_cache_t *kv = small_pool(2);
    const int32_t toks[4] = {5, 6, 7, 8};
    const block_hash_t h = hash_of(3);
    const int32_t b = kv_cache_alloc_block(kv);
    kv_cache_publish(kv, b, h, toks);
    assert_int_equal(kv_cache_lookup(kv, h, toks), b); /* a second sequence shares it */
    kv_cache_release_block(kv, b);                     /* the first one leaves */
    assert_int_equal(kv_cache_used_blocks(kv), 1);
    assert_int_equal(kv_cache_evictable_blocks(kv), 0);
    /* Only the other block can be allocated: the shared one is referenced. */
    const int32_t c = kv_cache_alloc_block(kv);
    assert_int_not_equal(c, b);
    assert_int_equal(kv_cache_alloc_block(kv), -1);
    kv_cache_release_block(kv, b);
    assert_int_equal(kv_cache_evictable_blocks(kv), 1);
    /* An unreferenced cached block found again leaves the LRU list. */
    assert_int_equal(kv_cache_lookup(kv, h, toks), b);
    assert_int_equal(kv_cache_evictable_blocks(kv), 0);
    assert_int_equal(kv_cache_alloc_block(kv), -1);
    kv_cache_release_block(kv, b);
    kv_cache_release_block(kv, c);
    assert_int_equal(kv_cache_free_blocks(kv), 2);
    kv_cache_destroy(&kv);
}

static void eviction_takes_free_blocks_first_then_least_recently_used(void **state)
{
    (void)state;
    kv_cache_t *kv = small_pool(4);
    int32_t toks[3][4], b[3];
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 4; j++) toks[i][j] = 100 * i + j;
        b[i] = kv_cache_alloc_block(kv);
        kv_cache_publish(kv, b[i], hash_of((uint64_t)i), toks[i]);
    }
    /* Released in order 1, 0, 2: block 1 is the least recently used. */
    kv_cache_release_block(kv, b[1]);
    kv_cache_release_block(kv, b[0]);
    kv_cache_release_block(kv, b[2]);
    assert_int_equal(kv_cache_evictable_blocks(kv), 3);
    assert_int_equal(kv_cache_free_blocks(kv), 4);
    /* Touching block 1 (a hit, then a release) makes block 0 the oldest. */
    assert_int_equal(kv_cache_lookup(kv, hash_of(1), toks[1]), b[1]);
    kv_cache_release_block(kv, b[1]);
    const int32_t fresh = kv_cache_alloc_block(kv); /* the one never-used block comes first */
    assert_true(fresh != b[0] && fresh != b[1] && fresh != b[2]);
    assert_int_equal(kv->evictions, 0);
    assert_int_equal(kv_cache_alloc_block(kv), b[0]);
    assert_int_equal(kv_cache_lookup(kv, hash_of(0), toks[0]), -1); /* evicted: gone from the table */
    assert_int_equal(kv_cache_alloc_block(kv), b[2]);
    assert_int_equal(kv_cache_alloc_block(kv), b[1]);
    assert_int_equal(kv_cache_alloc_block(kv), -1);
    assert_int_equal(kv->evictions, 3);
    for (int i = 0; i < 3; i++) assert_int_equal(kv_cache_lookup(kv, hash_of((uint64_t)i), toks[i]), -1);
    kv_cache_destroy(&kv);
}

static void hash_table_survives_heavy_churn(void **state)
{
    (void)state;
    /* Hashes that all share their low bits collide into one probe run: removal from the middle of
     * the run must keep every other entry reachable. */
    enum { N = 16 };
    kv_cache_t *kv = small_pool(N);
    int32_t toks[4 * N];
    for (int i = 0; i < 4 * N; i++) toks[i] = i;
    for (int round = 0; round < 50; round++) {
        int32_t b[N];
        for (int i = 0; i < N; i++) {
            b[i] = kv_cache_alloc_block(kv);
            assert_true(b[i] >= 0);
            const uint64_t key = (uint64_t)(round * N + i);
            const block_hash_t h = {(key % 3) << 40, key}; /* low bits 0: same home slot */
            kv_cache_publish(kv, b[i], h, toks + 4 * (i % N));
        }
        for (int i = 0; i < N; i++) kv_cache_release_block(kv, b[(i * 7) % N]);
        /* Evict half; the other half must still be found. */
        int32_t held[N / 2];
        for (int i = 0; i < N / 2; i++) held[i] = kv_cache_alloc_block(kv);
        int found = 0;
        for (int i = 0; i < N; i++) {
            const uint64_t key = (uint64_t)(round * N + i);
            const int32_t f = kv_cache_lookup(kv, (block_hash_t){(key % 3) << 40, key}, toks + 4 * (i % N));
            if (f >= 0) {
                found++;
                kv_cache_release_block(kv, f);
            }
        }
        assert_int_equal(found, N / 2);
        for (int i = 0; i < N / 2; i++) kv_cache_release_block(kv, held[i]);
        /* Leave nothing cached for the next round: allocate all, release all uncached. */
        int32_t all[N];
        for (int i = 0; i < N; i++) all[i] = kv_cache_alloc_block(kv);
        for (int i = 0; i < N; i++) kv_cache_release_block(kv, all[i]);
        assert_int_equal(kv->n_free, N);
    }
    kv_cache_destroy(&kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(capacity_follows_budget_and_bytes_per_token),
        cmocka_unit_test(budget_below_one_block_fails_with_message),
        cmocka_unit_test(blocks_are_refcounted_and_recycled),
        cmocka_unit_test(sequence_grows_and_fails_cleanly),
        cmocka_unit_test(lookup_hits_published_block_and_misses_others),
        cmocka_unit_test(publishing_a_known_hash_keeps_the_first_block),
        cmocka_unit_test(shared_block_stays_used_until_last_reference),
        cmocka_unit_test(eviction_takes_free_blocks_first_then_least_recently_used),
        cmocka_unit_test(hash_table_survives_heavy_churn),
        cmocka_unit_test(find_is_a_peek_and_blocks_travel_whole),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
