/* test_requests.c - the coordinator's table of in-flight requests (coordinator/requests.c).
 *
 * Protects: the pool hands out every entry once and takes it back; the worker-side id map finds every
 * live entry after any sequence of inserts, re-keys and deletions, also when ids crowd the same home
 * slots and their probe runs wrap around the table (deletion shifts the run back instead of leaving
 * tombstones, so a deletion must never cut a run short); the client map keys on identity and id and
 * refuses a second live request with the same pair; the timer heap always yields the earliest
 * min(deadline, cancel deadline), re-files an entry whose timer changed, and forgets an entry freed
 * or left without a timer; freeing releases the entry's message and owned tokens; the count of live
 * entries per tenant follows binds and frees, names that extend each other are different tenants,
 * and a tenant whose last entry goes leaves no trace that hides another tenant's count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "requests.h"

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void test_the_pool_hands_out_every_entry_once_and_takes_it_back(void **state)
{
    (void)state;
    reqs_t *r = reqs_new(8, NULL);
    assert_non_null(r);
    assert_int_equal(reqs_capacity(r), 8);
    req_t *e[8];
    for (int i = 0; i < 8; i++) {
        e[i] = reqs_alloc(r);
        assert_non_null(e[i]);
        assert_true(e[i]->live);
        assert_int_equal(e[i]->group, -1);
        assert_int_equal(e[i]->wid, 0);
        for (int j = 0; j < i; j++) assert_ptr_not_equal(e[i], e[j]);
    }
    assert_int_equal(reqs_count(r), 8);
    assert_null(reqs_alloc(r));
    e[3]->resubmits = 2;
    reqs_free(r, e[3]);
    assert_false(e[3]->live);
    assert_int_equal(reqs_count(r), 7);
    reqs_free(r, e[3]); /* twice: no effect */
    assert_int_equal(reqs_count(r), 7);
    req_t *again = reqs_alloc(r);
    assert_ptr_equal(again, e[3]);
    assert_int_equal(again->resubmits, 0); /* cleared */
    reqs_destroy(&r);
    assert_null(r);
    reqs_destroy(NULL);
    reqs_destroy(&r);
}

static void test_bad_capacities_fail_with_a_message(void **state)
{
    (void)state;
    fl_error_t err = {0};
    assert_null(reqs_new(0, &err));
    assert_int_equal(err.code, FL_EINVAL);
    assert_non_null(strstr(err.msg, "0"));
    assert_null(reqs_new((1 << 24) + 1, &err));
}

/* Ids whose home slot (requests.c's hash, for a table of 2 x 512 entries) lies in the 8 slots
 * around the table's end, so their probe runs collide and wrap. */
static int crowded_ids(uint64_t *out, int n)
{
    int k = 0;
    for (uint64_t wid = 1; k < n && wid < 100000000; wid++) {
        const uint32_t home = (uint32_t)((wid * 0x9E3779B97F4A7C15ull) >> 32) & 1023u;
        if (home >= 1020 || home < 4) out[k++] = wid;
    }
    return k;
}

static void test_the_wid_map_finds_every_entry_after_deletions_in_crowded_wrapping_runs(void **state)
{
    (void)state;
    enum { CAP = 512, N = 200, STEPS = 2000, IDS = N + STEPS };
    reqs_t *r = reqs_new(CAP, NULL);
    assert_non_null(r);
    static uint64_t ids[IDS];
    assert_int_equal(crowded_ids(ids, IDS), IDS);
    static req_t *live[N];
    static uint64_t wids[N];
    int next_id = 0; /* every id is used once: a stale map slot cannot hide behind a reused id */
    uint64_t seed = 42;
    for (int i = 0; i < N; i++) {
        live[i] = reqs_alloc(r);
        wids[i] = ids[next_id++];
        reqs_set_wid(r, live[i], wids[i]);
    }
    for (int step = 0; step < STEPS; step++) {
        const int i = (int)(splitmix(&seed) % N);
        if (!live[i]) {
            live[i] = reqs_alloc(r);
            assert_non_null(live[i]);
        } else if (splitmix(&seed) % 2) {
            reqs_free(r, live[i]);
            live[i] = NULL;
        }
        if (live[i]) { /* new, or re-keyed as a resubmission does */
            wids[i] = ids[next_id++];
            reqs_set_wid(r, live[i], wids[i]);
        }
        /* Every live entry is found under its id, every id no longer in use nowhere. */
        if (step % 10) continue;
        for (int k = 0; k < N; k++)
            if (live[k]) assert_ptr_equal(reqs_by_wid(r, wids[k]), live[k]);
        if (step % 100) continue;
        for (int k = 0; k < next_id; k++) {
            const req_t *e = reqs_by_wid(r, ids[k]);
            assert_true(!e || (e->live && e->wid == ids[k]));
        }
    }
    /* Emptied completely, the map finds nothing. */
    for (int i = 0; i < N; i++)
        if (live[i]) reqs_free(r, live[i]);
    assert_int_equal(reqs_count(r), 0);
    for (int k = 0; k < next_id; k++) assert_null(reqs_by_wid(r, ids[k]));
    assert_null(reqs_by_wid(r, 0));
    reqs_destroy(&r);
}

static req_t *client_entry(reqs_t *r, const char *client, uint64_t id)
{
    req_t *e = reqs_alloc(r);
    assert_non_null(e);
    e->client_len = (uint8_t)strlen(client);
    memcpy(e->client, client, e->client_len);
    e->client_id = id;
    return e;
}

static void test_the_client_map_keys_on_identity_and_id_and_refuses_a_live_duplicate(void **state)
{
    (void)state;
    reqs_t *r = reqs_new(16, NULL);
    req_t *a = client_entry(r, "alice", 1);
    req_t *b = client_entry(r, "bob", 1);
    req_t *a2 = client_entry(r, "alice", 2);
    req_t *al = client_entry(r, "alicex", 1); /* an identity that extends another */
    assert_int_equal(reqs_bind_client(r, a), 0);
    assert_int_equal(reqs_bind_client(r, b), 0);
    assert_int_equal(reqs_bind_client(r, a2), 0);
    assert_int_equal(reqs_bind_client(r, al), 0);
    req_t *dup = client_entry(r, "alice", 1);
    assert_int_equal(reqs_bind_client(r, dup), FL_EINVAL);
    assert_false(dup->client_bound);
    reqs_free(r, dup);
    assert_ptr_equal(reqs_by_client(r, (const uint8_t *)"alice", 5, 1), a);
    assert_ptr_equal(reqs_by_client(r, (const uint8_t *)"bob", 3, 1), b);
    assert_ptr_equal(reqs_by_client(r, (const uint8_t *)"alice", 5, 2), a2);
    assert_ptr_equal(reqs_by_client(r, (const uint8_t *)"alicex", 6, 1), al);
    assert_null(reqs_by_client(r, (const uint8_t *)"alice", 5, 3));
    assert_null(reqs_by_client(r, (const uint8_t *)"ali", 3, 1));
    /* Freed, the pair is free again, and the others stay found. */
    reqs_free(r, a);
    assert_null(reqs_by_client(r, (const uint8_t *)"alice", 5, 1));
    assert_ptr_equal(reqs_by_client(r, (const uint8_t *)"alice", 5, 2), a2);
    req_t *again = client_entry(r, "alice", 1);
    assert_int_equal(reqs_bind_client(r, again), 0);
    assert_ptr_equal(reqs_by_client(r, (const uint8_t *)"alice", 5, 1), again);
    reqs_destroy(&r);
}

/* The live entry with the earliest timer by a full scan, or NULL. */
static req_t *earliest(reqs_t *r)
{
    req_t *best = NULL;
    for (int i = 0; i < reqs_capacity(r); i++) {
        req_t *e = reqs_at(r, i);
        if (e->live && e->timer > 0 && (!best || e->timer < best->timer)) best = e;
    }
    return best;
}

static void test_the_timer_heap_yields_the_earliest_deadline_or_cancel_timeout(void **state)
{
    (void)state;
    reqs_t *r = reqs_new(4, NULL);
    assert_null(reqs_timer_first(r));
    req_t *a = reqs_alloc(r), *b = reqs_alloc(r), *c = reqs_alloc(r), *d = reqs_alloc(r);
    a->deadline = 30;
    b->deadline = 10;
    c->deadline = 20;
    reqs_timer_update(r, a);
    reqs_timer_update(r, b);
    reqs_timer_update(r, c);
    reqs_timer_update(r, d); /* no timer: not filed */
    assert_ptr_equal(reqs_timer_first(r), b);
    assert_true(b->timer == 10);
    assert_true(d->timer == 0);
    /* A cancel timeout earlier than the deadline wins; a later one does not. */
    a->cancel_deadline = 5;
    reqs_timer_update(r, a);
    assert_ptr_equal(reqs_timer_first(r), a);
    assert_true(a->timer == 5);
    c->cancel_deadline = 25;
    reqs_timer_update(r, c);
    assert_true(c->timer == 20);
    /* A cancel timeout alone (no deadline) counts. */
    d->cancel_deadline = 1;
    reqs_timer_update(r, d);
    assert_ptr_equal(reqs_timer_first(r), d);
    /* Freed or left without a timer, an entry is gone from the heap. */
    reqs_free(r, d);
    assert_ptr_equal(reqs_timer_first(r), a);
    a->deadline = a->cancel_deadline = 0;
    reqs_timer_update(r, a);
    assert_true(a->timer == 0);
    assert_ptr_equal(reqs_timer_first(r), b);
    /* Later deadlines move an entry back. */
    b->deadline = 100;
    reqs_timer_update(r, b);
    assert_ptr_equal(reqs_timer_first(r), c);
    reqs_free(r, c);
    assert_ptr_equal(reqs_timer_first(r), b);
    reqs_free(r, b);
    assert_null(reqs_timer_first(r));
    reqs_destroy(&r);
}

/* Takes every timer out of the heap earliest first, checking each against a full scan. */
static void drain_timers(reqs_t *r)
{
    req_t *got;
    while ((got = reqs_timer_first(r))) {
        const req_t *want = earliest(r);
        assert_non_null(want);
        assert_true(got->timer == want->timer); /* ties may pick either */
        got->deadline = got->cancel_deadline = 0;
        reqs_timer_update(r, got);
    }
    assert_null(earliest(r));
}

static void test_the_timer_heap_matches_a_full_scan_under_random_updates(void **state)
{
    (void)state;
    enum { CAP = 200 };
    reqs_t *r = reqs_new(CAP, NULL);
    uint64_t seed = 7;
    for (int step = 0; step < 20000; step++) {
        req_t *e = reqs_at(r, (int)(splitmix(&seed) % CAP));
        const int op = (int)(splitmix(&seed) % 5);
        if (!e->live) {
            e = reqs_alloc(r);
            e->deadline = (double)(splitmix(&seed) % 1000) + 1;
            reqs_timer_update(r, e);
        } else if (op == 0) {
            reqs_free(r, e);
        } else if (op == 1) {
            e->deadline = 0;
            e->cancel_deadline = 0;
            reqs_timer_update(r, e);
        } else {
            if (op == 2)
                e->cancel_deadline = (double)(splitmix(&seed) % 1000) + 1;
            else
                e->deadline = (double)(splitmix(&seed) % 1000) + 1;
            reqs_timer_update(r, e);
        }
        req_t *want = earliest(r), *got = reqs_timer_first(r);
        if (!want)
            assert_null(got);
        else {
            assert_non_null(got);
            assert_true(got->timer == want->timer);
        }
        if (step % 1000 == 999) drain_timers(r);
    }
    reqs_destroy(&r);
}

/* A decoded Request, owned as a live entry owns the client's. */
static Folio__V1__Request *decoded_request(void)
{
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.id = 5;
    q.tenant = (char *)"t";
    uint8_t buf[64];
    const size_t n = folio__v1__request__pack(&q, buf);
    return folio__v1__request__unpack(NULL, n, buf);
}

static void test_freeing_releases_the_message_and_owned_tokens_only(void **state)
{
    (void)state;
    reqs_t *r = reqs_new(4, NULL);
    static int32_t borrowed[3] = {1, 2, 3};
    req_t *a = reqs_alloc(r), *b = reqs_alloc(r);
    a->msg = decoded_request();
    a->tokens = malloc(4 * sizeof *a->tokens);
    a->tokens_owned = true;
    b->tokens = borrowed; /* not owned: left alone */
    b->n_tokens = 3;
    reqs_set_wid(r, a, 11);
    reqs_free(r, a);
    assert_null(a->msg);
    assert_null(a->tokens);
    assert_int_equal(a->wid, 0);
    assert_null(reqs_by_wid(r, 11));
    /* Destroying with live entries frees their messages too (the sanitizer build checks leaks). */
    req_t *c = reqs_alloc(r);
    c->msg = decoded_request();
    reqs_destroy(&r);
    assert_int_equal(borrowed[2], 3);
}

static void test_tenant_counts_follow_binds_and_frees_under_churn(void **state)
{
    (void)state;
    enum { CAP = 64, NT = 9 };
    reqs_t *r = reqs_new(CAP, NULL);
    static const char *const names[NT] = {"", "a", "ab", "abc", "b", "tenant-x", "tenant-y", "x", "a "};
    int want[NT] = {0};
    req_t *live[CAP];
    int tenant_of[CAP], n = 0;
    uint64_t s = 7;
    for (int step = 0; step < 5000; step++) {
        if (n < CAP && (n == 0 || splitmix(&s) % 3)) {
            req_t *e = reqs_alloc(r);
            assert_non_null(e);
            const int t = (int)(splitmix(&s) % NT);
            reqs_bind_tenant(r, e, names[t]);
            reqs_bind_tenant(r, e, names[t]); /* twice: counted once */
            live[n] = e;
            tenant_of[n++] = t;
            want[t]++;
        } else {
            const int k = (int)(splitmix(&s) % (uint64_t)n);
            want[tenant_of[k]]--;
            reqs_free(r, live[k]);
            live[k] = live[--n];
            tenant_of[k] = tenant_of[n];
        }
        for (int t = 0; t < NT; t++)
            if (reqs_tenant_count(r, names[t]) != want[t])
                fail_msg("step %d: tenant '%s' counts %d, expected %d", step, names[t], reqs_tenant_count(r, names[t]),
                         want[t]);
    }
    assert_int_equal(reqs_tenant_count(r, "never-seen"), 0);
    reqs_destroy(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_the_pool_hands_out_every_entry_once_and_takes_it_back),
        cmocka_unit_test(test_bad_capacities_fail_with_a_message),
        cmocka_unit_test(test_the_wid_map_finds_every_entry_after_deletions_in_crowded_wrapping_runs),
        cmocka_unit_test(test_the_client_map_keys_on_identity_and_id_and_refuses_a_live_duplicate),
        cmocka_unit_test(test_the_timer_heap_yields_the_earliest_deadline_or_cancel_timeout),
        cmocka_unit_test(test_the_timer_heap_matches_a_full_scan_under_random_updates),
        cmocka_unit_test(test_freeing_releases_the_message_and_owned_tokens_only),
        cmocka_unit_test(test_tenant_counts_follow_binds_and_frees_under_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
