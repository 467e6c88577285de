/* test_kv_events.c - the prefix cache's changes batched for the coordinator (worker/kv_events.c,
 * fed by worker/kv_cache.c's on_block hook).
 *
 * Protects: the first batch (and the first after a new connection, which restarts the sequence at
 * 1) is a reset carrying a snapshot of the cached blocks; then each batch lists the blocks
 * published and evicted since the last, once each with its latest event, under consecutive
 * sequence numbers; nothing pending means no batch; more pending blocks than the bound turn the
 * next batch into a reset snapshot (bounded too), and so does a batch that could not be sent. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "kv_cache.h"
#include "kv_events.h"

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

/* A cache of n_blocks blocks of 4 tokens (tiny shape: 1 layer, 1 head of 32). */
static kv_cache_t *small_cache(int n_blocks)
{
    const size_t per_block = 4 * 2 * 32 * 2; /* tokens x (K + V) x head_dim x f16 */
    kv_cache_t *kv = kv_cache_new(g_be, 1, 1, 32, 4, FL_TYPE_F16, FL_TYPE_F16, per_block * (size_t)n_blocks, NULL);
    assert_non_null(kv);
    assert_int_equal(kv->n_blocks, n_blocks);
    return kv;
}

static block_hash_t hash_of(int i) { return (block_hash_t){0x1000u + (uint64_t)i, 7}; }

/* Allocates a block, publishes it as block i and releases it (it stays cached, evictable). */
static int32_t publish(kv_cache_t *kv, int i)
{
    const int32_t tokens[4] = {i, i, i, i};
    const int32_t b = kv_cache_alloc_block(kv);
    assert_true(b >= 0);
    assert_int_equal(kv_cache_publish(kv, b, hash_of(i), tokens), b);
    kv_cache_release_block(kv, b);
    return b;
}

static bool has(const uint64_t *v, size_t n, uint64_t x)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == x) return true;
    return false;
}

static void test_a_reset_snapshot_first_then_what_was_stored_and_evicted_in_order(void **state)
{
    (void)state;
    kv_cache_t *kv = small_cache(4);
    kv_events_t *ev = kv_events_new(64, NULL);
    assert_non_null(ev);
    kv_events_attach(ev, kv);
    publish(kv, 0);
    kv_events_batch_t b;
    assert_true(kv_events_take(ev, kv, &b)); /* the first: a reset with the snapshot */
    assert_true(b.reset);
    assert_int_equal(b.seq, 1);
    assert_int_equal(b.n_stored, 1);
    assert_true(b.stored[0] == hash_of(0).lo);
    assert_false(kv_events_take(ev, kv, &b)); /* nothing since */
    assert_int_equal(kv_events_pending(ev), 0);
    for (int i = 1; i < 4; i++) publish(kv, i);
    assert_int_equal(kv_events_pending(ev), 3);
    assert_true(kv_events_take(ev, kv, &b));
    assert_false(b.reset);
    assert_int_equal(b.seq, 2);
    assert_int_equal(b.n_stored, 3);
    assert_int_equal(b.n_removed, 0);
    for (int i = 1; i < 4; i++) assert_true(has(b.stored, b.n_stored, hash_of(i).lo));
    /* The pool is full of cached blocks: two more evict the two least recently used (0 and 1). */
    publish(kv, 4);
    publish(kv, 5);
    assert_true(kv_events_take(ev, kv, &b));
    assert_int_equal(b.seq, 3);
    assert_int_equal(b.n_stored, 2);
    assert_int_equal(b.n_removed, 2);
    assert_true(has(b.removed, b.n_removed, hash_of(0).lo) && has(b.removed, b.n_removed, hash_of(1).lo));
    assert_true(has(b.stored, b.n_stored, hash_of(4).lo) && has(b.stored, b.n_stored, hash_of(5).lo));
    /* A block stored and evicted within one batch appears once, as its last event says. */
    publish(kv, 6);                                    /* evicts 2 */
    const int32_t b7 = publish(kv, 7);                 /* evicts 3 */
    for (int i = 8; i < 11; i++) publish(kv, i);       /* evict 4, 5, 6 */
    (void)b7;
    assert_true(kv_events_take(ev, kv, &b));
    assert_int_equal(b.n_stored + b.n_removed, 9);     /* blocks 2..10, 6 only once */
    assert_true(has(b.removed, b.n_removed, hash_of(6).lo));
    assert_false(has(b.stored, b.n_stored, hash_of(6).lo));
    kv_events_attach(NULL, kv);
    publish(kv, 11);
    assert_int_equal(kv_events_pending(ev), 0); /* unhooked */
    kv_events_destroy(&ev);
    assert_null(ev);
    kv_cache_destroy(&kv);
}

static void test_overflow_a_lost_batch_and_a_new_connection_make_the_next_a_bounded_reset(void **state)
{
    (void)state;
    kv_cache_t *kv = small_cache(16);
    kv_events_t *ev = kv_events_new(4, NULL);
    kv_events_attach(ev, kv);
    kv_events_batch_t b;
    assert_true(kv_events_take(ev, kv, &b) && b.reset && b.n_stored == 0);
    for (int i = 0; i < 4; i++) publish(kv, i);
    assert_int_equal(kv_events_pending(ev), 4);
    publish(kv, 4); /* a fifth pending block: over the bound */
    assert_int_equal(kv_events_pending(ev), 1);
    publish(kv, 5);
    assert_true(kv_events_take(ev, kv, &b));
    assert_true(b.reset);
    assert_int_equal(b.seq, 2);
    assert_int_equal(b.n_stored, 4); /* 6 cached, the snapshot bounded to 4 */
    /* A batch that was not sent: the next is a reset. */
    publish(kv, 6);
    kv_events_lost(ev);
    assert_true(kv_events_take(ev, kv, &b));
    assert_true(b.reset);
    assert_int_equal(b.seq, 3);
    /* A new connection: the sequence starts again. */
    kv_events_restart(ev);
    assert_true(kv_events_take(ev, kv, &b));
    assert_true(b.reset);
    assert_int_equal(b.seq, 1);
    fl_error_t err = {0};
    assert_null(kv_events_new(0, &err));
    assert_int_equal(err.code, FL_EINVAL);
    kv_events_destroy(&ev);
    kv_cache_destroy(&kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_reset_snapshot_first_then_what_was_stored_and_evicted_in_order),
        cmocka_unit_test(test_overflow_a_lost_batch_and_a_new_connection_make_the_next_a_bounded_reset),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
