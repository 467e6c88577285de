/* test_supervisor.c - `folioctl up` supervises its cluster, end to end on a tiny random model:
 *
 * 1. A worker SIGKILLed under a steady load of concurrent streams (and a burst sent just before, that
 *    it cannot have answered) is started again: a new pid, healthy in Status with restarts = 1,
 *    shown by `folioctl status`. The invariant holds throughout (each request one FINAL, no token
 *    index twice); every request ends OK: one that had no token when its group died is sent again,
 *    one that was streaming moves on mid-stream; requests sent after the worker's return are served
 *    by both groups.
 * 2. A SIGKILLed coordinator is started again; the workers (not restarted) register with it and it
 *    serves. SIGTERM to up while a restart is pending stops everything and starts nothing.
 * The rolling restart of every group under load is test_supervisor_rolling.c. */
#include <math.h>

#include "e2e_up.h"

static const char *st(int s)
{
    return wire_status_name(s);
}

/* g's restarts in `folioctl status` (text), or -1 when it is not shown. */
static int status_text_restarts(const char *group)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "'%s/folioctl' status --coordinator '%s' 2>&1", getenv("FOLIO_BUILD_DIR"),
             e2e_fx.up.ep_client);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    char line[512];
    int col = -1, restarts = -1;
    while (fgets(line, sizeof line, p)) {
        char *save = NULL, *tok = strtok_r(line, " \n", &save);
        if (!tok) continue;
        if (!strcmp(tok, "GROUP")) { /* the header: find the column */
            for (int i = 1; (tok = strtok_r(NULL, " \n", &save)); i++)
                if (!strcmp(tok, "RESTARTS")) col = i;
        } else if (col > 0 && !strcmp(tok, group)) {
            for (int i = 1; (tok = strtok_r(NULL, " \n", &save)); i++)
                if (i == col) restarts = atoi(tok);
        }
    }
    pclose(p);
    return restarts;
}

static void a_killed_worker_is_restarted_under_load_and_the_invariant_holds(void **state)
{
    (void)state;
    e2e_up_start(&e2e_fx.up, &e2e_fx.env, "supervise", 2);
    folio_client_t *ctl = e2e_up_client();
    enum { NC = 3 };
    folio_client_t *cl[NC];
    for (int i = 0; i < NC; i++) cl[i] = e2e_up_client();
    e2e_load_t load = {.t = &e2e_fx.tr, .cl = cl, .n_clients = NC, .per_client = 3, .max_tokens = e2e_long_tokens(256)};

    const pid_t g0 = e2e_up_child(&e2e_fx.up, "g0"), g1 = e2e_up_child(&e2e_fx.up, "g1");
    assert_true(g0 > 0 && g1 > 0);
    e2e_load_run(&load, e2e_ms(1500));
    int in_flight = 0, streaming = 0;
    for (int i = 0; i < e2e_fx.tr.n; i++) {
        in_flight += !e2e_fx.tr.reqs[i].final;
        streaming += !e2e_fx.tr.reqs[i].final && e2e_fx.tr.reqs[i].n_tokens > 0;
    }
    fprintf(stderr, "[e2e] supervise: SIGKILL g1 (pid %d) with %d requests in flight (%d streaming), %d sent\n",
            (int)g1, in_flight, streaming, e2e_fx.tr.n);
    assert_true(in_flight > 0);
    /* A burst the workers cannot have answered yet: half of it is routed to g1 with no token sent. */
    for (int i = 0; i < 2 * NC; i++) e2e_load_send(&load, i % NC);
    kill(g1, SIGKILL);
    const double t_kill = e2e_now_ms();
    load.phase = 1;

    /* It comes back: a new process, then healthy, while the load goes on. */
    pid_t g1_new = 0;
    while (!(g1_new = e2e_up_child(&e2e_fx.up, "g1")) || g1_new == g1) {
        if (e2e_now_ms() - t_kill > e2e_ms(15000)) fail_msg("g1 was not restarted within %d ms", e2e_ms(15000));
        e2e_load_run(&load, 20);
    }
    const double t_new = e2e_now_ms() - t_kill;
    if (e2e_load_until_healthy(&load, ctl, "g1", e2e_ms(15000)) < 0)
        fail_msg("the restarted g1 (pid %d) is not healthy after %d ms", (int)g1_new, e2e_ms(15000));
    const double t_back = e2e_now_ms();
    fprintf(stderr, "[e2e] supervise: g1 restarted as pid %d %.0f ms after the kill, healthy after %.0f ms\n",
            (int)g1_new, t_new, t_back - t_kill);
    if (t_new < CLUSTER_RESTART_MIN_MS - 50)
        fail_msg("g1 was restarted %.0f ms after its death, before the %d ms delay", t_new, CLUSTER_RESTART_MIN_MS);
    assert_int_equal(e2e_up_child(&e2e_fx.up, "g0"), g0);

    /* After its return both groups serve (round-robin routing). */
    load.phase = 2;
    e2e_load_run(&load, e2e_ms(2000));
    if (e2e_pump(&e2e_fx.tr, cl, NC, e2e_ms(60000))) fail_msg("requests left without a FINAL");
    e2e_summary(&e2e_fx.tr, "supervise");
    e2e_assert_invariant(&e2e_fx.tr, "supervise");
    int ok[3] = {0}, served[2] = {0};
    for (int i = 0; i < e2e_fx.tr.n; i++) {
        const e2e_req_t *r = &e2e_fx.tr.reqs[i];
        const int phase = e2e_load_phase(r);
        if (r->status == FOLIO__V1__STATUS_CODE__OK) {
            if (r->n_tokens != load.max_tokens)
                fail_msg("request %d: OK with %d of %d tokens", r->tag, r->n_tokens, load.max_tokens);
            ok[phase]++;
            if (phase == 2 && r->group[0] == 'g' && (r->group[1] == '0' || r->group[1] == '1'))
                served[r->group[1] - '0']++;
        } else {
            fail_msg("request %d (sent %.0f ms %s the kill): %s (%s) after %d tokens; every request ends OK (one "
                     "without a token is sent again, a streaming one moves on mid-stream)",
                     r->tag, fabs(r->t_sent - t_kill), r->t_sent < t_kill ? "before" : "after", st(r->status),
                     r->message, r->n_tokens);
        }
    }
    fprintf(stderr,
            "[e2e] supervise: OK before/during/after %d/%d/%d; after: g0 %d, g1 %d\n", ok[0], ok[1], ok[2], served[0],
            served[1]);
    if (!served[0] || !served[1])
        fail_msg("after g1's return: g0 served %d requests, g1 %d; both should serve", served[0], served[1]);

    /* Status says so: restarts 1 for g1, 0 for g0 (when the worker reports it), and so does up. */
    Folio__V1__Response *s = e2e_status(ctl);
    const Folio__V1__GroupStatus *s0 = e2e_group(s, "g0"), *s1 = e2e_group(s, "g1");
    assert_non_null(s0);
    assert_non_null(s1);
    assert_true(s0->healthy && s1->healthy);
    fprintf(stderr, "[e2e] supervise: %llu requests failed over\n",
            (unsigned long long)s->cluster->requests_failed_over);
    if (s->cluster->requests_failed_over < 1) fail_msg("no request failed over from the killed g1");
    if (e2e_worker_help_mentions("--restarts")) {
        if (s1->restarts != 1 || s0->restarts != 0)
            fail_msg("Status restarts: g0 %u, g1 %u; expected 0 and 1", s0->restarts, s1->restarts);
        const int shown = status_text_restarts("g1");
        if (shown != 1) fail_msg("folioctl status shows g1's restarts as %d, expected 1", shown);
    } else {
        fprintf(stderr, "[e2e] supervise: folio-worker has no --restarts flag: restart counts not checked\n");
    }
    folio__v1__response__free_unpacked(s, NULL);
    char line[128];
    snprintf(line, sizeof line, "worker g1 (pid %d) was killed by signal 9", (int)g1);
    if (!e2e_up_log_has(&e2e_fx.up, line)) fail_msg("up's log does not say '%s' (%s/up.err)", line, e2e_fx.up.log_dir);
    snprintf(line, sizeof line, "worker g1 restarted: pid %d (restart 1)", (int)g1_new);
    if (!e2e_up_log_has(&e2e_fx.up, line)) fail_msg("up's log does not say '%s' (%s/up.err)", line, e2e_fx.up.log_dir);

    const int rc = e2e_up_stop(&e2e_fx.up, e2e_ms(15000));
    if (rc < 0 || !WIFEXITED(rc) || WEXITSTATUS(rc) != 0) fail_msg("folioctl up: wait status %d after SIGTERM", rc);
    assert_int_equal(e2e_up_leftovers(&e2e_fx.up), 0);
}

static void a_killed_coordinator_is_restarted_and_sigterm_during_a_pending_restart_stops_all(void **state)
{
    (void)state;
    e2e_up_start(&e2e_fx.up, &e2e_fx.env, "supervise-coord", 2);
    const pid_t coord = e2e_up_child(&e2e_fx.up, "coordinator"), g0 = e2e_up_child(&e2e_fx.up, "g0"),
                g1 = e2e_up_child(&e2e_fx.up, "g1");
    assert_true(coord > 0 && g0 > 0 && g1 > 0);
    kill(coord, SIGKILL);
    const pid_t coord_new = e2e_up_wait_child(&e2e_fx.up, "coordinator", coord, e2e_ms(10000));
    if (!coord_new) fail_msg("the coordinator was not restarted within %d ms", e2e_ms(10000));
    folio_client_t *c = e2e_up_client();
    const double t0 = e2e_now_ms();
    while (e2e_healthy_groups(c, NULL) < 2) {
        if (e2e_now_ms() - t0 > e2e_ms(15000))
            fail_msg("the restarted coordinator has not got both groups back after %d ms", e2e_ms(15000));
        e2e_sleep_ms(100);
    }
    fprintf(stderr, "[e2e] supervise-coord: coordinator restarted (pid %d), both groups back in %.0f ms\n",
            (int)coord_new, e2e_now_ms() - t0);
    assert_int_equal(e2e_up_child(&e2e_fx.up, "g0"), g0); /* the workers were not restarted */
    assert_int_equal(e2e_up_child(&e2e_fx.up, "g1"), g1);
    folio_generate_params_t p = {.text = "after the restart", .max_tokens = 8, .ignore_eos = true, .stream = true};
    folio_result_t res;
    e2e_generate(c, &p, FOLIO__V1__STATUS_CODE__OK, &res);
    assert_int_equal(res.n_tokens, 8);
    folio_result_clear(&res);

    /* SIGKILL g0, then SIGTERM to up within g0's restart delay: up stops, g0 never comes back. */
    kill(g0, SIGKILL);
    e2e_sleep_ms(150);
    const int rc = e2e_up_stop(&e2e_fx.up, e2e_ms(15000));
    if (rc < 0 || !WIFEXITED(rc) || WEXITSTATUS(rc) != 0) fail_msg("folioctl up: wait status %d after SIGTERM", rc);
    e2e_sleep_ms(CLUSTER_RESTART_MIN_MS);
    assert_int_equal(e2e_up_leftovers(&e2e_fx.up), 0);
    if (e2e_up_log_has(&e2e_fx.up, "worker g0 restarted")) fail_msg("g0 was restarted while up was stopping");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(a_killed_worker_is_restarted_under_load_and_the_invariant_holds, e2e_up_teardown),
        cmocka_unit_test_teardown(a_killed_coordinator_is_restarted_and_sigterm_during_a_pending_restart_stops_all,
                                  e2e_up_teardown),
    };
    const char *filter = getenv("FOLIO_E2E_FILTER");
    if (filter && *filter) cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, e2e_up_group_setup, e2e_up_group_teardown);
}
