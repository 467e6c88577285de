/* test_groups.c - the coordinator's registry of worker groups (coordinator/groups.c).
 *
 * Protects: a group appears with its first READY and keeps its slot for ever (the router's ring is
 * indexed by it), also when all its members are forgotten; it is healthy only with a rank 0 whose
 * last load said engine_ok and (tensor parallelism) with every one of its tp_size ranks registered,
 * and routable only when also not draining; a rank 0 that registers again
 * is "replaced" (its work is gone), and a new process (another identity) is unhealthy until its first
 * load; a worker that changes group or rank leaves its old place; the registry and rank table refuse
 * what does not fit; the longest context counts routable groups only, and a group's context is never
 * more than its KV cache holds; a kept load never points into the freed heartbeat message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "groups.h"

static groups_t *g_gs;

static int setup(void **state)
{
    (void)state;
    g_gs = malloc(sizeof *g_gs);
    if (!g_gs) return -1;
    groups_init(g_gs);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    free(g_gs);
    g_gs = NULL;
    return 0;
}

/* READY from identity id for group/rank; returns the slot or the error. */
static int ready(const char *id, const char *group, uint32_t rank, uint32_t tp, uint32_t max_context, bool *is_new,
                 bool *replaced)
{
    Folio__V1__WorkerHello h = FOLIO__V1__WORKER_HELLO__INIT;
    h.group = (char *)group;
    h.rank = rank;
    h.tp_size = tp;
    h.block_size = 16;
    h.kv_blocks = 100;
    h.max_context = max_context;
    h.model_id = (char *)"tiny";
    bool n, r;
    const int slot = groups_register(g_gs, &h, (const uint8_t *)id, strlen(id), 1.0, is_new ? is_new : &n,
                                     replaced ? replaced : &r);
    return slot;
}

static void load(int slot, bool engine_ok)
{
    Folio__V1__WorkerLoad l = FOLIO__V1__WORKER_LOAD__INIT;
    l.engine_ok = engine_ok;
    l.running = 3;
    groups_set_load(g_gs, slot, &l);
}

static void test_a_group_appears_with_its_first_ready_and_is_healthy_after_an_ok_load(void **state)
{
    (void)state;
    bool is_new, replaced;
    const int s = ready("g0:0:1", "g0", 0, 1, 256, &is_new, &replaced);
    assert_int_equal(s, 0);
    assert_true(is_new);
    assert_false(replaced);
    assert_int_equal(g_gs->n, 1);
    assert_string_equal(g_gs->g[s].name, "g0");
    assert_string_equal(g_gs->table[s].name, "g0"); /* what the router sees */
    assert_string_equal(g_gs->g[s].model_id, "tiny");
    assert_int_equal(g_gs->g[s].max_context, 256);
    assert_false(g_gs->g[s].healthy); /* no load yet */
    assert_false(groups_serving(g_gs));
    load(s, false);
    assert_false(g_gs->g[s].healthy);
    assert_false(g_gs->table[s].routable);
    load(s, true);
    assert_true(g_gs->g[s].healthy);
    assert_true(g_gs->table[s].routable);
    assert_true(groups_serving(g_gs));
    assert_int_equal(groups_healthy_count(g_gs), 1);
    assert_int_equal(groups_find(g_gs, "g0"), s);
    assert_int_equal(groups_find(g_gs, "g1"), -1);
    int rank = -1;
    assert_int_equal(groups_find_member(g_gs, (const uint8_t *)"g0:0:1", 6, &rank), s);
    assert_int_equal(rank, 0);
    assert_int_equal(groups_find_member(g_gs, (const uint8_t *)"g0:0:2", 6, &rank), -1);
    assert_int_equal(groups_find_member(g_gs, (const uint8_t *)"g0:0:", 5, NULL), -1);
}

static void test_rank_0_registering_again_is_replaced_and_a_new_process_waits_for_its_load(void **state)
{
    (void)state;
    const int s = ready("g0:0:1", "g0", 0, 1, 256, NULL, NULL);
    load(s, true);
    bool is_new, replaced;
    /* The same process registering again (it started over): its work is gone, its health stands. */
    assert_int_equal(ready("g0:0:1", "g0", 0, 1, 256, &is_new, &replaced), s);
    assert_false(is_new);
    assert_true(replaced);
    assert_true(g_gs->g[s].healthy);
    /* A new process (new epoch, new identity): same slot, unhealthy until its first load. */
    assert_int_equal(ready("g0:0:2", "g0", 0, 1, 512, &is_new, &replaced), s);
    assert_false(is_new);
    assert_true(replaced);
    assert_false(g_gs->g[s].healthy);
    assert_int_equal(g_gs->g[s].max_context, 512);
    assert_int_equal(g_gs->n, 1);
    load(s, true);
    assert_true(g_gs->g[s].healthy);
}

/* Tensor parallelism: a group of tp_size ranks computes only with all of them. */
static void test_a_tp_group_is_healthy_only_while_every_rank_is_registered(void **state)
{
    (void)state;
    const int s = ready("g0:0:1", "g0", 0, 2, 256, NULL, NULL);
    load(s, true);
    assert_false(g_gs->g[s].healthy); /* rank 1 has not registered */
    bool is_new, replaced;
    assert_int_equal(ready("g0:1:1", "g0", 1, 2, 999, &is_new, &replaced), s);
    assert_false(is_new);
    assert_false(replaced);
    assert_int_equal(g_gs->g[s].max_context, 256); /* rank 0 speaks for the group */
    assert_true(g_gs->g[s].ranks[1].present);
    assert_true(g_gs->g[s].healthy);
    groups_forget_member(g_gs, s, 1);
    assert_false(g_gs->g[s].ranks[1].present);
    assert_false(g_gs->g[s].healthy);
    assert_true(g_gs->g[s].have_load); /* rank 0's load stays: its rank 1 may come back */
    ready("g0:1:2", "g0", 1, 2, 256, NULL, NULL);
    assert_true(g_gs->g[s].healthy);
    groups_forget_member(g_gs, s, 0);
    assert_false(g_gs->g[s].healthy);
    assert_false(g_gs->g[s].have_load);
}

static void test_a_forgotten_group_keeps_its_slot_and_name_for_status_and_its_return(void **state)
{
    (void)state;
    const int s0 = ready("g0:0:1", "g0", 0, 1, 256, NULL, NULL);
    const int s1 = ready("g1:0:1", "g1", 0, 2, 256, NULL, NULL);
    ready("g1:1:1", "g1", 1, 2, 256, NULL, NULL);
    load(s0, true);
    load(s1, true);
    groups_forget(g_gs, s1);
    assert_int_equal(g_gs->n, 2);
    assert_int_equal(groups_find(g_gs, "g1"), s1);
    for (int r = 0; r < GROUP_MAX_RANKS; r++) assert_false(g_gs->g[s1].ranks[r].present);
    assert_false(g_gs->g[s1].healthy);
    assert_false(g_gs->table[s1].routable);
    assert_int_equal(groups_find_member(g_gs, (const uint8_t *)"g1:1:1", 6, NULL), -1);
    assert_int_equal(groups_healthy_count(g_gs), 1);
    bool is_new, replaced;
    assert_int_equal(ready("g1:0:2", "g1", 0, 2, 256, &is_new, &replaced), s1);
    assert_false(is_new);
    assert_false(replaced); /* nothing was running there any more */
}

static void test_a_worker_that_changes_group_or_rank_leaves_its_old_place(void **state)
{
    (void)state;
    const int s0 = ready("w", "g0", 0, 2, 256, NULL, NULL);
    const int s1 = ready("w", "g1", 1, 2, 256, NULL, NULL);
    assert_int_not_equal(s0, s1);
    assert_false(g_gs->g[s0].ranks[0].present);
    int rank = -1;
    assert_int_equal(groups_find_member(g_gs, (const uint8_t *)"w", 1, &rank), s1);
    assert_int_equal(rank, 1);
    assert_int_equal(ready("w", "g1", 0, 2, 256, NULL, NULL), s1);
    assert_false(g_gs->g[s1].ranks[1].present);
    assert_true(g_gs->g[s1].ranks[0].present);
}

static void test_draining_keeps_a_group_healthy_but_not_routable(void **state)
{
    (void)state;
    const int s0 = ready("g0:0:1", "g0", 0, 1, 256, NULL, NULL);
    const int s1 = ready("g1:0:1", "g1", 0, 1, 1024, NULL, NULL);
    load(s0, true);
    load(s1, true);
    assert_int_equal(groups_max_context(g_gs), 1024);
    groups_set_draining(g_gs, s1, true);
    assert_true(g_gs->g[s1].healthy);
    assert_false(g_gs->table[s1].routable);
    assert_int_equal(groups_healthy_count(g_gs), 2);
    assert_int_equal(groups_max_context(g_gs), 256); /* routable groups only */
    assert_true(groups_serving(g_gs));
    groups_set_draining(g_gs, s0, true);
    assert_false(groups_serving(g_gs));
    assert_int_equal(groups_max_context(g_gs), 0);
    groups_set_draining(g_gs, s1, false);
    assert_true(groups_serving(g_gs));
    assert_int_equal(groups_max_context(g_gs), 1024);
    /* A draining group that loses its engine stays not routable after undrain until it is healthy. */
    load(s0, false);
    groups_set_draining(g_gs, s0, false);
    assert_false(g_gs->table[s0].routable);
}

static void test_what_does_not_fit_is_refused(void **state)
{
    (void)state;
    assert_int_equal(ready("g0:16:1", "g0", GROUP_MAX_RANKS, GROUP_MAX_RANKS + 1, 256, NULL, NULL), FL_ERANGE);
    assert_int_equal(g_gs->n, 0);
    Folio__V1__WorkerHello h = FOLIO__V1__WORKER_HELLO__INIT;
    h.group = (char *)"g0";
    h.tp_size = 1;
    uint8_t long_id[WIRE_MAX_IDENTITY + 1];
    memset(long_id, 'x', sizeof long_id);
    bool is_new, replaced;
    assert_int_equal(groups_register(g_gs, &h, long_id, sizeof long_id, 0, &is_new, &replaced), FL_ERANGE);
    char id[32], name[32];
    for (int i = 0; i < GROUPS_MAX; i++) {
        snprintf(id, sizeof id, "g%d:0:1", i);
        snprintf(name, sizeof name, "g%d", i);
        assert_int_equal(ready(id, name, 0, 1, 256, NULL, NULL), i);
    }
    assert_int_equal(ready("one-more", "one-more", 0, 1, 256, NULL, NULL), FL_ERANGE);
    assert_int_equal(g_gs->n, GROUPS_MAX);
    assert_int_equal(ready("g7:0:2", "g7", 0, 1, 256, NULL, NULL), 7); /* known groups still register */
}

static void test_the_kept_load_does_not_point_into_the_heartbeat(void **state)
{
    (void)state;
    const int s = ready("g0:0:1", "g0", 0, 1, 256, NULL, NULL);
    Folio__V1__WorkerLoad *l = malloc(sizeof *l);
    folio__v1__worker_load__init(l);
    uint64_t ids[2] = {4, 5};
    l->engine_ok = true;
    l->running = 2;
    l->kv_blocks_used = 9;
    l->live_ids = ids;
    l->n_live_ids = 2;
    groups_set_load(g_gs, s, l);
    free(l);
    assert_true(g_gs->g[s].have_load);
    assert_int_equal(g_gs->g[s].load.running, 2);
    assert_int_equal(g_gs->g[s].load.kv_blocks_used, 9);
    assert_null(g_gs->g[s].load.live_ids);
    assert_int_equal(g_gs->g[s].load.n_live_ids, 0);
    assert_null(g_gs->g[s].load.base.unknown_fields);
}

static void test_a_groups_context_is_the_smaller_of_the_advertised_one_and_its_kv_cache(void **state)
{
    (void)state;
    /* kv_blocks 100 x block_size 16: 1,600 tokens of KV */
    const int a = ready("a:0:1", "a", 0, 1, 2048, NULL, NULL);
    const int b = ready("b:0:1", "b", 0, 1, 512, NULL, NULL);
    const int z = ready("z:0:1", "z", 0, 1, 0, NULL, NULL); /* none advertised: the KV cache's */
    assert_int_equal(g_gs->g[a].max_context, 1600);
    assert_int_equal(g_gs->g[b].max_context, 512);
    assert_int_equal(g_gs->g[z].max_context, 1600);
    load(b, true);
    assert_int_equal(groups_max_context(g_gs), 512);
    load(a, true);
    assert_int_equal(groups_max_context(g_gs), 1600);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_a_group_appears_with_its_first_ready_and_is_healthy_after_an_ok_load),
        T(test_rank_0_registering_again_is_replaced_and_a_new_process_waits_for_its_load),
        T(test_a_tp_group_is_healthy_only_while_every_rank_is_registered),
        T(test_a_forgotten_group_keeps_its_slot_and_name_for_status_and_its_return),
        T(test_a_worker_that_changes_group_or_rank_leaves_its_old_place),
        T(test_draining_keeps_a_group_healthy_but_not_routable),
        T(test_what_does_not_fit_is_refused),
        T(test_the_kept_load_does_not_point_into_the_heartbeat),
        T(test_a_groups_context_is_the_smaller_of_the_advertised_one_and_its_kv_cache),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
