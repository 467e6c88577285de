/* test_kv_cache.c - the paged KV block pool (worker/kv_cache.c).
 *
 * Protects: capacity follows the byte budget and the bytes-per-token formula; blocks come and go
 * through the free list with reference counts; a sequence grows block by block and fails cleanly
 * (keeping what it holds) when the pool or its table runs out; release returns every block. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

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
    kv_cache_t *kv = kv_cache_new(g_be, 30, 3, 64, 16, (size_t)64 << 20, &err);
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
    assert_null(kv_cache_new(g_be, 30, 3, 64, 16, 1000, &err));
    assert_int_equal(err.code, FL_ERANGE);
    assert_non_null(strstr(err.msg, "budget"));
    assert_null(kv_cache_new(g_be, 0, 3, 64, 16, 1 << 20, &err));
    assert_int_equal(err.code, FL_EINVAL);
}

static void blocks_are_refcounted_and_recycled(void **state)
{
    (void)state;
    kv_cache_t *kv = kv_cache_new(g_be, 1, 1, 8, 4, 4 * (2 * 8 * 2 * 4), NULL);
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
    kv_cache_t *kv = kv_cache_new(g_be, 1, 1, 8, 4, 3 * (2 * 8 * 2 * 4), NULL);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(capacity_follows_budget_and_bytes_per_token),
        cmocka_unit_test(budget_below_one_block_fails_with_message),
        cmocka_unit_test(blocks_are_refcounted_and_recycled),
        cmocka_unit_test(sequence_grows_and_fails_cleanly),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
