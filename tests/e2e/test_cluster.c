/* test_cluster.c - the serving cluster end to end on a tiny random model: a real folio-coordinator
 * and folio-worker processes (cli_cluster.h) talked to through libfolio-client and raw ZeroMQ.
 *
 * Every test checks shared/DESIGN.md's invariant with e2e_util.h's tracker: each accepted request
 * gets exactly one FINAL, no token index twice, no gaps, nothing after a FINAL, nobody left hanging.
 * Each test starts its own cluster on its own ipc:// endpoints; logs go to
 * $FOLIO_BUILD_DIR/Testing/e2e-logs/<test>-<pid>-<n>/. */
#include <pthread.h>

#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;
static folio_client_t *g_clients[16];
static int g_n_clients;
static e2e_tracker_t g_tr;

E2E_MODEL_FIXTURES(g_env, "cluster")

static int test_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_clients; i++) folio_client_destroy(&g_clients[i]);
    g_n_clients = 0;
    e2e_cluster_stop(&g_cluster);
    e2e_tracker_free(&g_tr);
    return 0;
}

static folio_client_t *new_client(void)
{
    assert_true(g_n_clients < 16);
    return g_clients[g_n_clients++] = e2e_client(g_cluster);
}

static const char *st(int code) { return wire_status_name(code); }

/* Pumps until r has at least one token or is final. */
static void pump_until_tokens(folio_client_t *const *cl, int n, e2e_req_t *const *rs, int n_rs, int need, int wait_ms)
{
    const double deadline = e2e_now_ms() + wait_ms;
    while (e2e_now_ms() < deadline) {
        int have = 0;
        for (int i = 0; i < n_rs; i++) have += rs[i]->n_tokens > 0 || rs[i]->final;
        if (have >= need) return;
        e2e_pump_ex(&g_tr, cl, n, 10, false);
    }
}

/* ---- 1 --------------------------------------------------------------------------------------- */

#define N_SPECS 8
typedef struct spec {
    char text[128];
    int32_t toks[160];
    int n_toks;
    int max_tokens;
    bool ignore_eos;
    float temperature; /* specs 5 and 6 sample (seeded); the rest are greedy */
    uint64_t seed;
} spec_t;

static void make_specs(spec_t *s)
{
    static const int max_tokens[N_SPECS] = {8, 24, 64, 160, 12, 48, 96, 200};
    for (int k = 0; k < N_SPECS; k++) {
        memset(&s[k], 0, sizeof s[k]);
        if (k % 3 == 0) snprintf(s[k].text, sizeof s[k].text, "The quick brown fox %d jumps over the lazy dog %d", k, k * 7);
        else {
            s[k].n_toks = 8 + k * 13;
            e2e_prompt_tokens(100 + (uint32_t)k, s[k].n_toks, s[k].toks);
        }
        s[k].max_tokens = max_tokens[k];
        s[k].ignore_eos = k % 2 == 0;
        if (k == 5 || k == 6) {
            s[k].temperature = 0.8f;
            s[k].seed = 1000 + (uint64_t)k;
        }
    }
}

static folio_generate_params_t spec_params(const spec_t *s, bool stream)
{
    folio_generate_params_t p = {0};
    if (s->n_toks) {
        p.tokens = s->toks;
        p.n_tokens = s->n_toks;
    } else {
        p.text = s->text;
    }
    p.max_tokens = s->max_tokens;
    p.ignore_eos = s->ignore_eos;
    p.stream = stream;
    p.temperature = s->temperature;
    p.top_k = s->temperature > 0 ? 40 : 0;
    p.top_p = s->temperature > 0 ? 0.95f : 0;
    p.seed = s->seed;
    return p;
}

static void drain(folio_client_t *ctl, const char *group, bool undrain)
{
    fl_error_t err = {0};
    if (folio_client_drain(ctl, group, undrain, e2e_ms(5000), &err))
        fail_msg("%s %s: %s", undrain ? "undrain" : "drain", group, err.msg);
}

static void concurrent_streaming_clients_keep_the_invariant_and_match_runs_alone(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "concurrent", 2, NULL);
    folio_client_t *ctl = new_client();
    spec_t specs[N_SPECS];
    make_specs(specs);

    /* References: each spec alone, once on g0 (g1 drained) and once on g1 (g0 drained). */
    folio_result_t ref[2][N_SPECS];
    memset(ref, 0, sizeof ref);
    for (int g = 0; g < 2; g++) {
        const char *serve = g ? "g1" : "g0", *other = g ? "g0" : "g1";
        drain(ctl, other, false);
        for (int k = 0; k < N_SPECS; k++) {
            folio_generate_params_t p = spec_params(&specs[k], true);
            e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &ref[g][k]);
            if (strcmp(ref[g][k].group, serve))
                fail_msg("spec %d: served by '%s' while only %s was undrained", k, ref[g][k].group, serve);
            if (specs[k].ignore_eos) assert_int_equal(ref[g][k].n_tokens, specs[k].max_tokens);
            assert_true(ref[g][k].n_tokens <= specs[k].max_tokens);
        }
        drain(ctl, other, true);
    }
    for (int k = 0; k < N_SPECS; k++)
        if (!e2e_tokens_equal(ref[0][k].tokens, ref[0][k].n_tokens, ref[1][k].tokens, ref[1][k].n_tokens))
            fail_msg("spec %d: greedy output on g0 (%d tokens) differs from g1's (%d tokens)", k, ref[0][k].n_tokens,
                     ref[1][k].n_tokens);

    /* 8 connections x 8 requests, all in flight at once; every 4th one not streamed. */
    enum { NC = 8, NR = 8 };
    folio_client_t *cl[NC];
    for (int i = 0; i < NC; i++) cl[i] = new_client();
    for (int j = 0; j < NR; j++)
        for (int i = 0; i < NC; i++) {
            const int k = (i + j) % N_SPECS;
            folio_generate_params_t p = spec_params(&specs[k], j % 4 != 3);
            e2e_send_generate(&g_tr, i, cl[i], &p, k);
        }
    e2e_pump(&g_tr, cl, NC, e2e_ms(60000));
    e2e_summary(&g_tr, "concurrent");
    e2e_assert_invariant(&g_tr, "concurrent");
    bool used[2] = {false, false};
    int text_diffs = 0;
    for (int i = 0; i < g_tr.n; i++) {
        const e2e_req_t *r = &g_tr.reqs[i];
        if (r->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("request %d (spec %d): %s: %s", i, r->tag, st(r->status), r->message);
        const folio_result_t *x = &ref[0][r->tag];
        if (!e2e_tokens_equal(r->tokens, r->n_tokens, x->tokens, x->n_tokens))
            fail_msg("client %d id %llu (spec %d, group %s): %d tokens, not the %d of the run alone", r->client,
                     (unsigned long long)r->id, r->tag, r->group, r->n_tokens, x->n_tokens);
        if (r->finish != x->finish_reason)
            fail_msg("spec %d: finish %d, alone %d", r->tag, r->finish, x->finish_reason);
        if (strcmp(r->text, x->text)) {
            fprintf(stderr, "[e2e] client %d id %llu (spec %d, %s, %d tokens): text of %zu bytes '%s' differs from the run alone's %zu bytes '%s'\n",
                    r->client, (unsigned long long)r->id, r->tag, r->n_partials ? "streamed" : "unstreamed", r->n_tokens,
                    strlen(r->text), r->text, strlen(x->text), x->text);
            int nul_at = -1;
            for (int q = 0; q < r->n_tokens && nul_at < 0; q++)
                if (r->tokens[q] == MKMODEL_FIRST_BYTE_TOKEN) nul_at = q;
            if (nul_at >= 0) fprintf(stderr, "[e2e]   (token %d is byte 0x00, a NUL character)\n", nul_at);
            text_diffs++;
        }
        if (!(r->queued_s >= 0 && r->queued_s <= r->first_token_s + 1e-6 && r->first_token_s <= r->total_s + 1e-6 &&
              r->total_s <= (r->t_final - r->t_sent) / 1e3 + 0.05))
            fail_msg("spec %d: timings out of order: queued %.4f first token %.4f total %.4f (client saw %.4f s)", r->tag,
                     r->queued_s, r->first_token_s, r->total_s, (r->t_final - r->t_sent) / 1e3);
        if (r->prompt_tokens == 0 || r->cached > r->prompt_tokens)
            fail_msg("spec %d: usage prompt %u cached %u", r->tag, r->prompt_tokens, r->cached);
        if (!strcmp(r->group, "g0")) used[0] = true;
        else if (!strcmp(r->group, "g1")) used[1] = true;
        else fail_msg("request %d: result.group '%s'", i, r->group);
    }
    if (text_diffs) fail_msg("%d of 64 requests: text differs from the same request's text alone (tokens equal)", text_diffs);
    if (!used[0] || !used[1]) fail_msg("64 concurrent requests all went to one group (g0 %d, g1 %d)", used[0], used[1]);
    for (int g = 0; g < 2; g++)
        for (int k = 0; k < N_SPECS; k++) folio_result_clear(&ref[g][k]);
}

/* ---- 2 --------------------------------------------------------------------------------------- */

static void cancel_ends_the_stream_cancelled_answers_ok_or_not_found_and_frees_kv(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "cancel", 1, NULL);
    folio_client_t *ctl = new_client();
    folio_client_t *c = new_client();
    const int L = e2e_long_tokens(1800);
    int32_t pa[64], pb[64];
    e2e_prompt_tokens(1, 64, pa);
    e2e_prompt_tokens(2, 64, pb);
    folio_generate_params_t p = {.tokens = pa, .n_tokens = 64, .max_tokens = L, .ignore_eos = true, .stream = true};

    /* Cancelled right after it was sent: before any token reached us. */
    e2e_req_t *a = e2e_send_generate(&g_tr, 0, c, &p, 0);
    e2e_req_t *ca = e2e_send_cancel(&g_tr, 0, c, a->id);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "cancel before tokens");
    if (a->status != FOLIO__V1__STATUS_CODE__CANCELLED)
        fail_msg("cancelled at once: status %s (%s), %d tokens", st(a->status), a->message, a->n_tokens);
    assert_int_equal(a->finish, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_true(a->n_tokens < L);
    if (ca->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("Cancel answered %s (%s)", st(ca->status), ca->message);

    /* Cancelled after its first token arrived. */
    p.tokens = pb;
    e2e_req_t *b = e2e_send_generate(&g_tr, 0, c, &p, 1);
    pump_until_tokens(&c, 1, &b, 1, 1, e2e_ms(10000));
    if (b->n_tokens == 0) fail_msg("no token within %d ms (final %d, %s)", e2e_ms(10000), b->final, st(b->status));
    e2e_req_t *cb = e2e_send_cancel(&g_tr, 0, c, b->id);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "cancel after tokens");
    if (b->status != FOLIO__V1__STATUS_CODE__CANCELLED)
        fail_msg("cancelled mid-stream: status %s (%s), %d of %d tokens", st(b->status), b->message, b->n_tokens, L);
    assert_int_equal(b->finish, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_true(b->n_tokens > 0 && b->n_tokens < L);
    if (cb->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("Cancel answered %s (%s)", st(cb->status), cb->message);

    /* Unknown targets: never sent, and one that already ended. */
    e2e_req_t *cu = e2e_send_cancel(&g_tr, 0, c, 999999);
    e2e_req_t *cd = e2e_send_cancel(&g_tr, 0, c, b->id);
    e2e_pump(&g_tr, &c, 1, e2e_ms(5000));
    e2e_assert_invariant(&g_tr, "cancel unknown");
    if (cu->status != FOLIO__V1__STATUS_CODE__NOT_FOUND)
        fail_msg("Cancel of an unknown id answered %s (%s)", st(cu->status), cu->message);
    if (cd->status != FOLIO__V1__STATUS_CODE__NOT_FOUND)
        fail_msg("Cancel of a finished request answered %s (%s)", st(cd->status), cd->message);

    /* Nothing more arrives for the cancelled streams, and the worker gives their KV back. */
    e2e_pump_ex(&g_tr, &c, 1, 300, false);
    e2e_assert_invariant(&g_tr, "after cancel");
    if (e2e_wait_group(ctl, "g0", true, true, e2e_ms(3000)) < 0)
        fail_msg("g0 still reports KV blocks in use or running requests %d ms after the cancels", e2e_ms(3000));

    /* And it still serves. */
    folio_generate_params_t q = {.text = "after the cancels", .max_tokens = 8, .ignore_eos = true, .stream = true};
    e2e_req_t *d = e2e_send_generate(&g_tr, 0, c, &q, 2);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "after cancel");
    assert_int_equal(d->status, FOLIO__V1__STATUS_CODE__OK);
    assert_int_equal(d->n_tokens, 8);

    /* A Cancel names a request of its own connection: another client cannot cancel it. */
    folio_client_t *c2 = new_client();
    folio_client_t *both[2] = {c, c2};
    const int L2 = e2e_long_tokens(600);
    p.tokens = pa;
    p.max_tokens = L2;
    e2e_req_t *e = e2e_send_generate(&g_tr, 0, c, &p, 3);
    pump_until_tokens(both, 2, &e, 1, 1, e2e_ms(10000));
    e2e_req_t *cx = e2e_send_cancel(&g_tr, 1, c2, e->id);
    e2e_pump(&g_tr, both, 2, e2e_ms(30000));
    e2e_assert_invariant(&g_tr, "cross-client cancel");
    if (cx->status != FOLIO__V1__STATUS_CODE__NOT_FOUND)
        fail_msg("a Cancel from another connection answered %s (%s)", st(cx->status), cx->message);
    if (e->status != FOLIO__V1__STATUS_CODE__OK || e->n_tokens != L2)
        fail_msg("another connection's Cancel ended the target: %s (%s), %d of %d tokens", st(e->status), e->message,
                 e->n_tokens, L2);

    /* A client that goes away: its requests are cancelled and the worker stops generating for them. */
    if (e2e_wait_group(ctl, "g0", true, true, e2e_ms(3000)) < 0) fail_msg("g0 busy before the disconnect test");
    Folio__V1__Response *s0 = e2e_status(ctl);
    const uint64_t gen0 = e2e_group(s0, "g0")->load->generated_tokens;
    folio__v1__response__free_unpacked(s0, NULL);
    folio_client_t *gone = e2e_client(g_cluster);
    const int NG = 8, LG = e2e_long_tokens(1900);
    for (int i = 0; i < NG; i++) {
        int32_t t[32];
        e2e_prompt_tokens(40 + (uint32_t)i, 32, t);
        folio_generate_params_t gp = {.tokens = t, .n_tokens = 32, .max_tokens = LG, .ignore_eos = true, .stream = true};
        fl_error_t err = {0};
        if (folio_client_send_generate(gone, &gp, NULL, &err)) fail_msg("send: %s", err.msg);
    }
    folio_event_t ev;
    fl_error_t err = {0};
    if (folio_client_recv(gone, &ev, e2e_ms(10000), &err) != 1) fail_msg("no first reply to the client that goes away");
    folio_event_clear(&ev);
    folio_client_destroy(&gone);
    const double t_gone = e2e_now_ms();
    const double idle = e2e_wait_group(ctl, "g0", true, true, e2e_ms(10000));
    if (idle < 0) fail_msg("g0 still runs the requests of a client that went away %d ms ago", e2e_ms(10000));
    e2e_sleep_ms(500); /* a heartbeat with the final counters */
    Folio__V1__Response *s1 = e2e_status(ctl);
    const uint64_t gen1 = e2e_group(s1, "g0")->load->generated_tokens;
    folio__v1__response__free_unpacked(s1, NULL);
    fprintf(stderr, "[e2e] cancel: client gone; g0 idle after %.0f ms, generated %llu of the %d tokens asked\n",
            e2e_now_ms() - t_gone - 500, (unsigned long long)(gen1 - gen0), NG * LG);
    if (gen1 - gen0 >= (uint64_t)NG * LG / 2)
        fail_msg("after its client disconnected the worker still generated %llu of %d tokens (not cancelled)",
                 (unsigned long long)(gen1 - gen0), NG * LG);
}

/* ---- 3 --------------------------------------------------------------------------------------- */

static void deadline_on_a_busy_worker_ends_deadline_exceeded_and_others_finish(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "deadline", 1, NULL);
    folio_client_t *ctl = new_client();
    folio_client_t *cl[2] = {new_client(), new_client()};
    const int L = e2e_long_tokens(1900);
    int32_t prompts[8][24];
    e2e_req_t *longs[6];
    for (int i = 0; i < 6; i++) {
        e2e_prompt_tokens(200 + (uint32_t)i, 24, prompts[i]);
        folio_generate_params_t p = {.tokens = prompts[i], .n_tokens = 24, .max_tokens = L, .ignore_eos = true,
                                     .stream = true};
        longs[i] = e2e_send_generate(&g_tr, 0, cl[0], &p, i);
    }
    pump_until_tokens(cl, 2, longs, 6, 1, e2e_ms(10000));
    /* Two requests that cannot finish in time: one streamed (200 ms), one not (400 ms). */
    e2e_prompt_tokens(300, 24, prompts[6]);
    e2e_prompt_tokens(301, 24, prompts[7]);
    folio_generate_params_t d1 = {.tokens = prompts[6], .n_tokens = 24, .max_tokens = L, .ignore_eos = true,
                                  .stream = true, .timeout_ms = 200};
    folio_generate_params_t d2 = d1;
    d2.tokens = prompts[7];
    d2.stream = false;
    d2.timeout_ms = 400;
    e2e_req_t *r1 = e2e_send_generate(&g_tr, 1, cl[1], &d1, 100);
    e2e_req_t *r2 = e2e_send_generate(&g_tr, 1, cl[1], &d2, 101);
    e2e_pump(&g_tr, cl, 2, e2e_ms(60000));
    e2e_summary(&g_tr, "deadline");
    e2e_assert_invariant(&g_tr, "deadline");
    const e2e_req_t *ds[2] = {r1, r2};
    const int tmo[2] = {200, 400};
    for (int i = 0; i < 2; i++) {
        if (ds[i]->status != FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED)
            fail_msg("request with a %d ms deadline: %s (%s) after %.0f ms, %d tokens", tmo[i], st(ds[i]->status),
                     ds[i]->message, ds[i]->t_final - ds[i]->t_sent, ds[i]->n_tokens);
        assert_int_equal(ds[i]->finish, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
        const double late = ds[i]->t_final - ds[i]->t_sent - tmo[i];
        if (late > e2e_ms(1500)) fail_msg("DEADLINE_EXCEEDED came %.0f ms after the %d ms deadline", late, tmo[i]);
        assert_true(ds[i]->n_tokens < L);
    }
    for (int i = 0; i < 6; i++) {
        if (longs[i]->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("long request %d: %s (%s)", i, st(longs[i]->status), longs[i]->message);
        assert_int_equal(longs[i]->n_tokens, L);
        assert_int_equal(longs[i]->finish, FOLIO__V1__FINISH_REASON__FINISH_LENGTH);
    }
    e2e_pump_ex(&g_tr, cl, 2, 300, false);
    e2e_assert_invariant(&g_tr, "deadline, after");
    if (e2e_wait_group(ctl, "g0", true, true, e2e_ms(3000)) < 0)
        fail_msg("g0 still reports KV blocks in use %d ms after everything ended", e2e_ms(3000));
}

/* ---- 4 --------------------------------------------------------------------------------------- */

static void killed_and_stopped_workers_end_every_request_once_and_the_survivor_serves(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "faults", 3, NULL);
    folio_client_t *ctl = new_client();
    enum { NC = 4, NR = 6 };
    folio_client_t *cl[NC];
    for (int i = 0; i < NC; i++) cl[i] = new_client();
    const int L = e2e_long_tokens(1500);
    static int32_t prompts[NC * NR][80];
    e2e_req_t *rs[NC * NR];
    for (int j = 0; j < NR; j++)
        for (int i = 0; i < NC; i++) {
            const int k = j * NC + i, n = 16 + (k * 7) % 64;
            e2e_prompt_tokens(400 + (uint32_t)k, n, prompts[k]);
            folio_generate_params_t p = {.tokens = prompts[k], .n_tokens = n, .max_tokens = L, .ignore_eos = true,
                                         .stream = true};
            rs[k] = e2e_send_generate(&g_tr, i, cl[i], &p, k);
        }
    pump_until_tokens(cl, NC, rs, NC * NR, NC * NR / 3, e2e_ms(10000));
    int streamed = 0, finals = 0;
    for (int k = 0; k < NC * NR; k++) {
        streamed += rs[k]->n_tokens > 0;
        finals += rs[k]->final;
    }
    fprintf(stderr, "[e2e] faults: SIGKILL g1, SIGSTOP g2 with %d of %d requests streaming, %d final\n", streamed,
            NC * NR, finals);
    kill(g_cluster->workers[1], SIGKILL);
    kill(g_cluster->workers[2], SIGSTOP);
    e2e_pump(&g_tr, cl, NC, e2e_ms(60000));
    e2e_summary(&g_tr, "faults");
    e2e_assert_invariant(&g_tr, "faults");
    int moved = 0;
    for (int k = 0; k < NC * NR; k++) {
        const e2e_req_t *r = rs[k];
        /* Every request ends OK: one without a token yet is sent again, a streaming one moves on
         * mid-stream (its output is checked against a clean run below). */
        if (r->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("request %d: %s (%s) after %d tokens (it should have moved to g0)", k, st(r->status), r->message,
                     r->n_tokens);
        if (r->n_tokens != L) fail_msg("request %d: OK with %d of %d tokens", k, r->n_tokens, L);
        moved += strcmp(r->group, "g0") == 0;
    }
    fprintf(stderr, "[e2e] faults: %d requests finished OK on g0\n", moved);

    /* The dead and the stopped group are unhealthy; the survivor serves new work. */
    if (e2e_wait_group(ctl, "g1", false, false, e2e_ms(3000)) < 0) fail_msg("Status still shows the killed g1 healthy");
    if (e2e_wait_group(ctl, "g2", false, false, e2e_ms(3000)) < 0) fail_msg("Status still shows the stopped g2 healthy");
    e2e_req_t *fresh[6];
    for (int i = 0; i < 6; i++) {
        int32_t t[20];
        e2e_prompt_tokens(900 + (uint32_t)i, 20, t);
        folio_generate_params_t p = {.tokens = t, .n_tokens = 20, .max_tokens = 16, .ignore_eos = true, .stream = true};
        fresh[i] = e2e_send_generate(&g_tr, i % NC, cl[i % NC], &p, 1000 + i);
    }
    e2e_pump(&g_tr, cl, NC, e2e_ms(20000));
    e2e_assert_invariant(&g_tr, "faults, survivor");
    for (int i = 0; i < 6; i++) {
        if (fresh[i]->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("new request %d after the faults: %s (%s)", i, st(fresh[i]->status), fresh[i]->message);
        if (strcmp(fresh[i]->group, "g0")) fail_msg("new request %d served by '%s', not the survivor g0", i, fresh[i]->group);
    }

    /* The stopped worker continues: it comes back healthy, and nothing it still had in flight
     * reaches a client (those requests are final). */
    kill(g_cluster->workers[2], SIGCONT);
    const double back = e2e_wait_group(ctl, "g2", true, false, e2e_ms(10000));
    if (back < 0) fail_msg("g2 did not come back healthy within %d ms of SIGCONT", e2e_ms(10000));
    fprintf(stderr, "[e2e] faults: g2 healthy again %.0f ms after SIGCONT\n", back);
    e2e_pump_ex(&g_tr, cl, NC, 1000, false);
    e2e_assert_invariant(&g_tr, "faults, after SIGCONT");
    e2e_req_t *again[6];
    for (int i = 0; i < 6; i++) {
        int32_t t[20];
        e2e_prompt_tokens(950 + (uint32_t)i, 20, t);
        folio_generate_params_t p = {.tokens = t, .n_tokens = 20, .max_tokens = 16, .ignore_eos = true, .stream = true};
        again[i] = e2e_send_generate(&g_tr, i % NC, cl[i % NC], &p, 2000 + i);
    }
    e2e_pump(&g_tr, cl, NC, e2e_ms(20000));
    e2e_assert_invariant(&g_tr, "faults, after recovery");
    for (int i = 0; i < 6; i++) {
        if (again[i]->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("request %d after g2 came back: %s (%s)", i, st(again[i]->status), again[i]->message);
        if (!strcmp(again[i]->group, "g1")) fail_msg("request %d served by the dead g1", i);
    }

    /* What finished OK through the faults (some after failing over) equals a clean run now. */
    e2e_tracker_t re = {0};
    int n_re = 0;
    for (int k = 0; k < NC * NR; k++) {
        if (rs[k]->status != FOLIO__V1__STATUS_CODE__OK) continue;
        const int n = 16 + (k * 7) % 64;
        folio_generate_params_t p = {.tokens = prompts[k], .n_tokens = n, .max_tokens = L, .ignore_eos = true,
                                     .stream = true};
        uint64_t id = 0;
        fl_error_t err = {0};
        if (folio_client_send_generate(cl[0], &p, &id, &err)) fail_msg("send: %s", err.msg);
        e2e_track(&re, 0, id, true, k);
        n_re++;
    }
    e2e_pump(&re, cl, 1, e2e_ms(60000));
    e2e_assert_invariant(&re, "faults, rerun");
    for (int i = 0; i < re.n; i++) {
        const e2e_req_t *x = &re.reqs[i], *r = rs[x->tag];
        if (x->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("rerun of %d: %s", x->tag, st(x->status));
        if (!e2e_tokens_equal(x->tokens, x->n_tokens, r->tokens, r->n_tokens)) {
            int d = 0; /* where they part: early points at the failover, late at a near-tie */
            while (d < x->n_tokens && d < r->n_tokens && x->tokens[d] == r->tokens[d]) d++;
            fail_msg("request %d finished OK through the faults on %s with output different from a clean run on %s "
                     "(%d and %d tokens, parting at %d: %d vs %d; prompt %d tokens)",
                     x->tag, r->group, x->group, r->n_tokens, x->n_tokens, d, d < r->n_tokens ? r->tokens[d] : -1,
                     d < x->n_tokens ? x->tokens[d] : -1, 16 + (x->tag * 7) % 64);
        }
    }
    fprintf(stderr, "[e2e] faults: %d OK outputs equal a clean rerun\n", n_re);
    e2e_tracker_free(&re);
}

/* ---- 5 --------------------------------------------------------------------------------------- */

typedef struct raw {
    void *zctx, *sock;
} raw_t;

static void raw_open(raw_t *r, int type)
{
    r->zctx = zmq_ctx_new();
    assert_non_null(r->zctx);
    r->sock = zmq_socket(r->zctx, type);
    assert_non_null(r->sock);
    int zero = 0;
    zmq_setsockopt(r->sock, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_connect(r->sock, g_cluster->client_endpoint), 0);
}

static void raw_close(raw_t *r)
{
    if (r->sock) zmq_close(r->sock);
    if (r->zctx) zmq_ctx_term(r->zctx);
    memset(r, 0, sizeof *r);
}

typedef struct frame {
    const void *data;
    size_t len;
} frame_t;

static void raw_send(raw_t *r, const frame_t *f, int n)
{
    for (int i = 0; i < n; i++)
        if (zmq_send(r->sock, f[i].data, f[i].len, i + 1 < n ? ZMQ_SNDMORE : 0) < 0)
            fail_msg("zmq_send: %s", zmq_strerror(errno));
}

/* Receives one reply: checks [empty if delimiter] FOLIOC1 FINAL body and decodes the body. NULL on
 * timeout. */
static Folio__V1__Response *raw_recv(raw_t *r, int timeout_ms, bool *delimiter, const char *what)
{
    zmq_pollitem_t it = {.socket = r->sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, timeout_ms) <= 0) return NULL;
    zmq_msg_t f[8];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, r->sock, 0) < 0) fail_msg("%s: zmq_msg_recv: %s", what, zmq_strerror(errno));
        more = zmq_msg_more(&m);
        if (n < 8) f[n++] = m;
        else zmq_msg_close(&m);
    }
    int i = 0;
    bool delim = false;
    if (n > 0 && zmq_msg_size(&f[0]) == 0) {
        delim = true;
        i = 1;
    }
    if (delimiter) *delimiter = delim;
    if (n - i != 3) fail_msg("%s: a reply of %d frames (after %d delimiter)", what, n, i);
    if (zmq_msg_size(&f[i]) != 7 || memcmp(zmq_msg_data(&f[i]), WIRE_HEADER_CLIENT, 7))
        fail_msg("%s: reply header is not FOLIOC1", what);
    if (zmq_msg_size(&f[i + 1]) != 1 || *(uint8_t *)zmq_msg_data(&f[i + 1]) != WIRE_CMD_FINAL)
        fail_msg("%s: reply is not a FINAL", what);
    Folio__V1__Response *resp =
        folio__v1__response__unpack(NULL, zmq_msg_size(&f[i + 2]), (const uint8_t *)zmq_msg_data(&f[i + 2]));
    for (int k = 0; k < n; k++) zmq_msg_close(&f[k]);
    if (!resp) fail_msg("%s: reply body does not decode", what);
    if (!resp->final) fail_msg("%s: FINAL frame with final = false", what);
    return resp;
}

/* Packs a request into a malloc'd buffer. */
static uint8_t *pack_request(const Folio__V1__Request *q, size_t *len)
{
    *len = folio__v1__request__get_packed_size(q);
    uint8_t *b = malloc(*len ? *len : 1);
    assert_non_null(b);
    folio__v1__request__pack(q, b);
    return b;
}

/* Packs q with 9 MiB of metadata (over the 8 MiB a body may have) into a malloc'd buffer. */
static uint8_t *pack_oversized_request(Folio__V1__Request *q, size_t *len)
{
    const size_t nine = (size_t)9 << 20;
    char *pad = malloc(nine + 1);
    assert_non_null(pad);
    memset(pad, 'a', nine);
    pad[nine] = 0;
    Folio__V1__KeyValue kv;
    folio__v1__key_value__init(&kv);
    kv.key = "pad";
    kv.value = pad;
    Folio__V1__KeyValue *kvs[1] = {&kv};
    q->n_metadata = 1;
    q->metadata = kvs;
    uint8_t *b = pack_request(q, len);
    q->n_metadata = 0;
    q->metadata = NULL;
    free(pad);
    return b;
}

/* Sends frames, expects a FINAL with code (and id, unless want_id is UINT64_MAX). */
static void expect_error(raw_t *r, const char *what, const frame_t *f, int n, int code, uint64_t want_id)
{
    raw_send(r, f, n);
    bool delim = false;
    Folio__V1__Response *resp = raw_recv(r, e2e_ms(5000), &delim, what);
    if (!resp) fail_msg("%s: no reply within %d ms", what, e2e_ms(5000));
    const int got = resp->status ? (int)resp->status->code : 0;
    const char *msg = resp->status && resp->status->message ? resp->status->message : "";
    fprintf(stderr, "[e2e] malformed: %-36s -> %s id=%llu \"%s\"\n", what, st(got), (unsigned long long)resp->id, msg);
    if (got != code) fail_msg("%s: answered %s (%s), expected %s", what, st(got), msg, st(code));
    if (want_id != UINT64_MAX && resp->id != want_id)
        fail_msg("%s: answered with id %llu, expected %llu", what, (unsigned long long)resp->id, (unsigned long long)want_id);
    if (code != FOLIO__V1__STATUS_CODE__OK && !*msg) fail_msg("%s: the error has no message", what);
    if (delim) fail_msg("%s: a delimiter in the reply to a message that had none", what);
    folio__v1__response__free_unpacked(resp, NULL);
}

static void coordinator_alive_and_serving(folio_client_t *c, const char *after)
{
    int st_ = 0;
    if (waitpid(g_cluster->coordinator, &st_, WNOHANG) == g_cluster->coordinator) {
        g_cluster->coordinator = 0;
        fail_msg("the coordinator died after %s (%s %d)", after, WIFSIGNALED(st_) ? "signal" : "exit",
                 WIFSIGNALED(st_) ? WTERMSIG(st_) : WEXITSTATUS(st_));
    }
    folio_generate_params_t p = {.text = "still serving", .max_tokens = 4, .ignore_eos = true, .stream = true};
    folio_result_t res;
    fl_error_t err = {0};
    if (folio_client_generate(c, &p, NULL, NULL, e2e_ms(10000), &res, &err))
        fail_msg("after %s: a normal request failed: %s", after, err.msg);
    if (res.status != FOLIO__V1__STATUS_CODE__OK || res.n_tokens != 4)
        fail_msg("after %s: a normal request ended %s (%s) with %d tokens", after, st(res.status), res.message, res.n_tokens);
    folio_result_clear(&res);
}

static void malformed_messages_get_error_finals_and_the_coordinator_keeps_serving(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "malformed", 1, NULL);
    folio_client_t *good = new_client();
    raw_t r = {0};
    raw_open(&r, ZMQ_DEALER);
    const uint8_t cmd_req = WIRE_CMD_REQUEST, cmd_bad = 0x7f, cmd_partial = WIRE_CMD_PARTIAL;
    const uint8_t cmd2[2] = {1, 1};
    const uint64_t ANY = UINT64_MAX;
    enum { INV = FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT };

    Folio__V1__Request q;
    folio__v1__request__init(&q);
    q.version = 1;
    q.id = 11;
    q.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    size_t hl;
    uint8_t *health = pack_request(&q, &hl);

    /* Framing. */
    expect_error(&r, "garbage header", (frame_t[]){{"GARBAGE", 7}, {&cmd_req, 1}, {health, hl}}, 3, INV, ANY);
    expect_error(&r, "header of another version (FOLIOC2)", (frame_t[]){{"FOLIOC2", 7}, {&cmd_req, 1}, {health, hl}}, 3,
                 INV, ANY);
    expect_error(&r, "worker header on the client socket", (frame_t[]){{"FOLIOW1", 7}, {&cmd_req, 1}, {health, hl}}, 3,
                 INV, ANY);
    expect_error(&r, "missing command", (frame_t[]){{"FOLIOC1", 7}}, 1, INV, 0);
    expect_error(&r, "two-byte command", (frame_t[]){{"FOLIOC1", 7}, {cmd2, 2}, {health, hl}}, 3, INV, ANY);
    expect_error(&r, "unknown command byte", (frame_t[]){{"FOLIOC1", 7}, {&cmd_bad, 1}, {health, hl}}, 3, INV, ANY);
    expect_error(&r, "PARTIAL from a client", (frame_t[]){{"FOLIOC1", 7}, {&cmd_partial, 1}, {health, hl}}, 3, INV, ANY);
    expect_error(&r, "too many frames",
                 (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {health, hl}, {"x", 1}, {"y", 1}, {"z", 1}, {"w", 1}}, 7,
                 INV, ANY);
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    expect_error(&r, "undecodable body", (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {junk, sizeof junk}}, 3, INV, 0);

    /* A truncated Generate. */
    Folio__V1__GenerateRequest g;
    folio__v1__generate_request__init(&g);
    g.text = "a prompt that will be cut in the middle of its bytes";
    g.max_tokens = 4;
    q.id = 12;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    size_t gl;
    uint8_t *gen = pack_request(&q, &gl);
    expect_error(&r, "truncated protobuf", (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {gen, gl - 10}}, 3, INV, ANY);
    free(gen);

    /* Well-formed bodies with bad contents: the id is readable and comes back. */
    size_t bl;
    uint8_t *b;
#define SEND_REQ(what, code, want_id)                                                                    \
    do {                                                                                                 \
        b = pack_request(&q, &bl);                                                                       \
        expect_error(&r, what, (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {b, bl}}, 3, code, want_id); \
        free(b);                                                                                         \
    } while (0)
    folio__v1__request__init(&q);
    q.version = 2;
    q.id = 21;
    q.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    SEND_REQ("version 2", INV, 21);
    q.version = 0;
    q.id = 22;
    SEND_REQ("version 0 (unset)", INV, 22);
    q.version = 1;
    q.id = 23;
    q.method = (Folio__V1__Method)99;
    SEND_REQ("unknown method 99", INV, 23);
    q.id = 24;
    q.method = FOLIO__V1__METHOD__METHOD_UNSPECIFIED;
    SEND_REQ("METHOD_UNSPECIFIED", INV, 24);
    q.id = 25;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    SEND_REQ("Generate without its payload", INV, 25);
    folio__v1__generate_request__init(&g);
    g.max_tokens = 4;
    q.generate = &g;
    q.id = 26;
    SEND_REQ("Generate without a prompt", INV, 26);
    int32_t big[3] = {5, E2E_VOCAB, 7};
    g.n_prompt_tokens = 3;
    g.prompt_tokens = big;
    q.id = 27;
    SEND_REQ("prompt token id == vocab", INV, 27);
    int32_t neg[2] = {5, -3};
    g.n_prompt_tokens = 2;
    g.prompt_tokens = neg;
    q.id = 28;
    SEND_REQ("negative prompt token id", INV, 28);
    int32_t ok_toks[2] = {5, 6};
    g.prompt_tokens = ok_toks;
    g.text = "and a text too";
    q.id = 29;
    SEND_REQ("two prompt forms", INV, 29);
    g.text = NULL;
    g.n_prompt_tokens = 0;
    g.prompt_tokens = NULL;
    q.generate = NULL;
    q.method = FOLIO__V1__METHOD__METHOD_CANCEL;
    q.id = 30;
    SEND_REQ("Cancel without its payload", INV, 30);
    Folio__V1__DrainRequest dr;
    folio__v1__drain_request__init(&dr);
    dr.group = "no-such-group";
    q.method = FOLIO__V1__METHOD__METHOD_DRAIN;
    q.drain = &dr;
    q.id = 31;
    SEND_REQ("Drain of an unknown group", FOLIO__V1__STATUS_CODE__NOT_FOUND, 31);
    q.drain = NULL;

    /* A body over 8 MiB: RESOURCE_EXHAUSTED, not decoded. */
    q.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    q.id = 41;
    b = pack_oversized_request(&q, &bl);
    expect_error(&r, "9 MiB body", (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {b, bl}}, 3,
                 FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, ANY);
    free(b);
#undef SEND_REQ
    coordinator_alive_and_serving(good, "the malformed messages");

    /* REQ-style: a leading empty frame on a DEALER, then a real REQ socket; replies carry it back. */
    folio__v1__request__init(&q);
    q.version = 1;
    q.id = 51;
    q.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    b = pack_request(&q, &bl);
    raw_send(&r, (frame_t[]){{"", 0}, {"FOLIOC1", 7}, {&cmd_req, 1}, {b, bl}}, 4);
    bool delim = false;
    Folio__V1__Response *resp = raw_recv(&r, e2e_ms(5000), &delim, "Health with a leading empty frame");
    if (!resp) fail_msg("Health with a leading empty frame: no reply");
    if (!delim) fail_msg("Health with a leading empty frame: the reply has no empty delimiter");
    assert_int_equal(resp->id, 51);
    assert_int_equal(resp->status ? resp->status->code : 0, FOLIO__V1__STATUS_CODE__OK);
    assert_non_null(resp->health);
    folio__v1__response__free_unpacked(resp, NULL);
    free(b);

    raw_t req = {0};
    raw_open(&req, ZMQ_REQ);
    q.id = 52;
    b = pack_request(&q, &bl);
    raw_send(&req, (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {b, bl}}, 3);
    free(b);
    resp = raw_recv(&req, e2e_ms(5000), NULL, "Health from a REQ socket");
    if (!resp) fail_msg("Health from a REQ socket: no reply");
    assert_int_equal(resp->id, 52);
    assert_non_null(resp->health);
    folio__v1__response__free_unpacked(resp, NULL);
    folio__v1__generate_request__init(&g);
    g.text = "from a REQ socket";
    g.max_tokens = 5;
    g.ignore_eos = true;
    g.stream = false;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    q.id = 53;
    b = pack_request(&q, &bl);
    raw_send(&req, (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {b, bl}}, 3);
    free(b);
    resp = raw_recv(&req, e2e_ms(10000), NULL, "unstreamed Generate from a REQ socket");
    if (!resp) fail_msg("unstreamed Generate from a REQ socket: no reply");
    assert_int_equal(resp->id, 53);
    assert_int_equal(resp->status ? resp->status->code : 0, FOLIO__V1__STATUS_CODE__OK);
    assert_non_null(resp->delta);
    assert_int_equal(resp->delta->n_tokens, 5);
    folio__v1__response__free_unpacked(resp, NULL);
    raw_close(&req);

    /* Over 64 MiB: that peer is disconnected, nobody else notices. */
    raw_t huge = {0};
    raw_open(&huge, ZMQ_DEALER);
    const size_t big_len = (size_t)65 << 20;
    uint8_t *hb = calloc(1, big_len);
    assert_non_null(hb);
    raw_send(&huge, (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {hb, big_len}}, 3);
    free(hb);
    e2e_sleep_ms(e2e_ms(500));
    resp = raw_recv(&huge, 200, NULL, "65 MiB message");
    if (resp) {
        fprintf(stderr, "[e2e] malformed: a 65 MiB message was answered (%s)\n",
                st(resp->status ? (int)resp->status->code : 0));
        folio__v1__response__free_unpacked(resp, NULL);
    }
    raw_close(&huge);
    coordinator_alive_and_serving(good, "a 65 MiB message");
    /* The first raw socket still works too. */
    expect_error(&r, "garbage header, at the end", (frame_t[]){{"GARBAGE", 7}, {&cmd_req, 1}, {health, hl}}, 3, INV, ANY);
    free(health);
    raw_close(&r);
}

/* ---- 6 --------------------------------------------------------------------------------------- */

static void a_restarted_coordinator_gets_the_workers_back_and_serves(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "restart", 2, NULL);
    folio_client_t *old = new_client();
    folio_generate_params_t p = {.text = "before the restart", .max_tokens = 12, .ignore_eos = true, .stream = true};
    folio_result_t before, after_old, after_new;
    e2e_generate(old, &p, FOLIO__V1__STATUS_CODE__OK, &before);
    fl_error_t err = {0};
    if (cluster_restart_coordinator(g_cluster, &err)) fail_msg("cluster_restart_coordinator: %s", err.msg);
    const double t0 = e2e_now_ms();
    if (cluster_wait_healthy(g_cluster, 2, e2e_ms(15000), &err)) fail_msg("after the restart: %s", err.msg);
    const double took = e2e_now_ms() - t0;
    fprintf(stderr, "[e2e] restart: both groups healthy %.0f ms after the coordinator restarted\n", took);
    if (took > e2e_ms(5000)) fail_msg("workers took %.0f ms to re-register (more than %d)", took, e2e_ms(5000));
    /* The old connection reconnects by itself; a new one works as well; same greedy output. */
    e2e_generate(old, &p, FOLIO__V1__STATUS_CODE__OK, &after_old);
    folio_client_t *fresh = new_client();
    e2e_generate(fresh, &p, FOLIO__V1__STATUS_CODE__OK, &after_new);
    assert_true(e2e_tokens_equal(before.tokens, before.n_tokens, after_old.tokens, after_old.n_tokens));
    assert_true(e2e_tokens_equal(before.tokens, before.n_tokens, after_new.tokens, after_new.n_tokens));
    /* Many at once after the restart keep the invariant. */
    folio_client_t *cl[2] = {old, fresh};
    for (int i = 0; i < 12; i++) {
        int32_t t[24];
        e2e_prompt_tokens(700 + (uint32_t)i, 24, t);
        folio_generate_params_t q = {.tokens = t, .n_tokens = 24, .max_tokens = 32, .ignore_eos = true, .stream = true};
        e2e_send_generate(&g_tr, i % 2, cl[i % 2], &q, i);
    }
    e2e_pump(&g_tr, cl, 2, e2e_ms(30000));
    e2e_assert_invariant(&g_tr, "restart");
    for (int i = 0; i < g_tr.n; i++)
        if (g_tr.reqs[i].status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("request %d after the restart: %s (%s)", i, st(g_tr.reqs[i].status), g_tr.reqs[i].message);
    folio_result_clear(&before);
    folio_result_clear(&after_old);
    folio_result_clear(&after_new);
}

typedef struct {
    folio_client_t *client;
    folio_generate_params_t params;
    folio_result_t res;
    fl_error_t err;
    int rc;
    double took_ms;
} blocking_call_t;

static void *blocking_generate(void *arg)
{
    blocking_call_t *b = arg;
    const double t0 = e2e_now_ms();
    b->rc = folio_client_generate(b->client, &b->params, NULL, NULL, -1, &b->res, &b->err);
    b->took_ms = e2e_now_ms() - t0;
    return NULL;
}

/* The restarted coordinator has forgotten the request: a blocking client must not wait for ever.
 * (The restart runs on the main thread: children die with the thread that forked them.) */
static void a_blocking_generate_ends_with_an_error_when_the_coordinator_restarts(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "restart-wait", 1, NULL);
    folio_client_t *busy = new_client();
    static blocking_call_t b;
    memset(&b, 0, sizeof b);
    b.client = new_client();
    fl_error_t err = {0};
    if (folio_client_health(b.client, e2e_ms(5000), NULL, &err)) fail_msg("health: %s", err.msg);
    /* Keep the worker busy so the request below is still running when the coordinator goes. */
    for (int i = 0; i < 8; i++) {
        folio_generate_params_t q = {.text = "keep busy", .max_tokens = e2e_long_tokens(1500), .ignore_eos = true};
        uint64_t id;
        if (folio_client_send_generate(busy, &q, &id, &err)) fail_msg("send: %s", err.msg);
    }
    b.params = (folio_generate_params_t){.text = "a long answer nobody will get",
                                         .max_tokens = e2e_long_tokens(1500), .ignore_eos = true, .stream = false};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, blocking_generate, &b), 0);
    e2e_sleep_ms(e2e_ms(100));
    if (cluster_restart_coordinator(g_cluster, &err)) fail_msg("cluster_restart_coordinator: %s", err.msg);
    pthread_join(th, NULL);
    fprintf(stderr, "[e2e] restart while waiting: rc=%d after %.0f ms: %s\n", b.rc, b.took_ms, b.err.msg);
    assert_int_equal(b.rc, FL_EIO);
    assert_non_null(strstr(b.err.msg, "restarted"));
    if (b.took_ms > e2e_ms(15000)) fail_msg("the client noticed the restart only after %.0f ms", b.took_ms);
    folio_result_clear(&b.res);
}

/* A worker that registers and heartbeats but drops every REQUEST: what a reconnect that loses a
 * message looks like to the coordinator. */
typedef struct {
    const char *endpoint;
    volatile int stop;
    volatile int requests;
} lossy_worker_t;

static void *lossy_worker(void *arg)
{
    lossy_worker_t *lw = arg;
    void *ctx = zmq_ctx_new();
    void *s = wire_socket(ctx, ZMQ_DEALER, "glossy:0:1", NULL);
    if (!s || zmq_connect(s, lw->endpoint)) return NULL;
    Folio__V1__WorkerHello h = FOLIO__V1__WORKER_HELLO__INIT;
    h.group = "glossy";
    h.tp_size = 1;
    h.model_id = "lossy";
    h.kv_blocks = 1000;
    h.block_size = 16;
    h.max_context = 2048;
    wire_send(s, NULL, 0, false, WIRE_HEADER_WORKER, WIRE_CMD_READY, &h.base, NULL);
    while (!lw->stop) {
        Folio__V1__WorkerLoad l = FOLIO__V1__WORKER_LOAD__INIT;
        l.engine_ok = true;
        l.kv_blocks_total = 1000;
        wire_send(s, NULL, 0, false, WIRE_HEADER_WORKER, WIRE_CMD_HEARTBEAT, &l.base, NULL);
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 100) > 0) {
            wire_msg_t m;
            while (!wire_recv(s, false, true, &m, NULL)) {
                if (m.cmd == WIRE_CMD_REQUEST) lw->requests++;
                wire_msg_close(&m);
            }
        }
    }
    zmq_close(s);
    zmq_ctx_term(ctx);
    return NULL;
}

/* The coordinator compares what it routed to a group with the ids the group's heartbeat lists. */
static void a_request_the_worker_never_received_is_failed_over(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "lossy", 1, NULL);
    folio_client_t *ctl = new_client(), *cl = new_client();
    lossy_worker_t lw = {.endpoint = g_cluster->worker_endpoint};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, lossy_worker, &lw), 0);
    if (e2e_wait_group(ctl, "glossy", true, false, e2e_ms(5000)) < 0) fail_msg("the lossy worker never became healthy");
    fl_error_t err = {0};
    if (folio_client_drain(ctl, "g0", false, 5000, &err)) fail_msg("drain g0: %s", err.msg);
    folio_generate_params_t p = {.text = "lost on the way", .max_tokens = 8, .ignore_eos = true, .stream = true};
    e2e_req_t *r = e2e_send_generate(&g_tr, 0, cl, &p, 0);
    for (int i = 0; i < e2e_ms(5000) / 10 && !lw.requests; i++) e2e_sleep_ms(10);
    if (!lw.requests) fail_msg("the request never reached the lossy worker");
    if (folio_client_drain(ctl, "g0", true, 5000, &err)) fail_msg("undrain g0: %s", err.msg);
    e2e_pump(&g_tr, &cl, 1, e2e_ms(10000));
    lw.stop = 1;
    pthread_join(th, NULL);
    e2e_assert_invariant(&g_tr, "lossy");
    if (r->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("lost request ended %s (%s)", st(r->status), r->message);
    fprintf(stderr, "[e2e] lossy: the lost request completed on %s\n", r->group);
    assert_string_equal(r->group, "g0");
}

/* ---- 7 --------------------------------------------------------------------------------------- */

static void drain_finishes_work_in_flight_admits_none_and_undrain_restores(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "drain", 2, NULL);
    folio_client_t *ctl = new_client();
    folio_client_t *cl[2] = {new_client(), new_client()};
    const int L = e2e_long_tokens(1500);
    static int32_t prompts[8][40];
    e2e_req_t *longs[8];
    for (int i = 0; i < 8; i++) {
        e2e_prompt_tokens(500 + (uint32_t)i, 40, prompts[i]);
        folio_generate_params_t p = {.tokens = prompts[i], .n_tokens = 40, .max_tokens = L, .ignore_eos = true,
                                     .stream = true};
        longs[i] = e2e_send_generate(&g_tr, 0, cl[0], &p, i);
    }
    pump_until_tokens(cl, 2, longs, 8, 8, e2e_ms(10000));
    drain(ctl, "g0", false);
    Folio__V1__Response *s = e2e_status(ctl);
    const Folio__V1__GroupStatus *g0 = e2e_group(s, "g0");
    assert_non_null(g0);
    assert_true(g0->draining);
    assert_true(g0->healthy);
    folio__v1__response__free_unpacked(s, NULL);

    e2e_req_t *shorts[6];
    for (int i = 0; i < 6; i++) {
        int32_t t[40];
        memcpy(t, prompts[i], sizeof t); /* same prefixes as the long ones, some of which are on g0 */
        t[39] = 3 + i;
        folio_generate_params_t p = {.tokens = t, .n_tokens = 40, .max_tokens = 8, .ignore_eos = true, .stream = true};
        shorts[i] = e2e_send_generate(&g_tr, 1, cl[1], &p, 100 + i);
    }
    for (int i = 0; i < 6; i++) {
        const double deadline = e2e_now_ms() + e2e_ms(30000);
        while (!shorts[i]->final && e2e_now_ms() < deadline) e2e_pump_ex(&g_tr, cl, 2, 10, false);
    }
    e2e_pump(&g_tr, cl, 2, e2e_ms(60000));
    e2e_summary(&g_tr, "drain");
    e2e_assert_invariant(&g_tr, "drain");
    int on_g0 = 0;
    for (int i = 0; i < 8; i++) {
        if (longs[i]->status != FOLIO__V1__STATUS_CODE__OK || longs[i]->n_tokens != L)
            fail_msg("long request %d on %s: %s (%s) with %d of %d tokens while its group drained", i, longs[i]->group,
                     st(longs[i]->status), longs[i]->message, longs[i]->n_tokens, L);
        on_g0 += !strcmp(longs[i]->group, "g0");
    }
    for (int i = 0; i < 6; i++) {
        if (shorts[i]->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("new request %d during the drain: %s (%s)", i, st(shorts[i]->status), shorts[i]->message);
        if (strcmp(shorts[i]->group, "g1")) fail_msg("new request %d went to '%s' while g0 drained", i, shorts[i]->group);
    }
    if (!on_g0) fail_msg("none of the 8 long requests ran on g0, so the drain finished nothing");
    fprintf(stderr, "[e2e] drain: %d of 8 long requests finished on the draining g0\n", on_g0);

    /* Everything drained: UNAVAILABLE at once, not queued. */
    drain(ctl, "g1", false);
    bool serving = true;
    assert_int_equal(e2e_healthy_groups(ctl, &serving), 2);
    assert_false(serving);
    folio_generate_params_t p = {.text = "nobody admits this", .max_tokens = 4, .ignore_eos = true, .stream = true};
    e2e_req_t *u = e2e_send_generate(&g_tr, 1, cl[1], &p, 200);
    e2e_pump(&g_tr, cl, 2, e2e_ms(5000));
    e2e_assert_invariant(&g_tr, "all drained");
    if (u->status != FOLIO__V1__STATUS_CODE__UNAVAILABLE)
        fail_msg("with every group drained: %s (%s), group '%s'", st(u->status), u->message, u->group);
    assert_int_equal(u->n_tokens, 0);

    drain(ctl, "g0", true);
    drain(ctl, "g1", true);
    s = e2e_status(ctl);
    for (size_t i = 0; i < s->cluster->n_groups; i++) assert_false(s->cluster->groups[i]->draining);
    folio__v1__response__free_unpacked(s, NULL);
    assert_int_equal(e2e_healthy_groups(ctl, &serving), 2);
    assert_true(serving);
    bool used[2] = {false, false};
    for (int i = 0; i < 8; i++) {
        int32_t t[40];
        e2e_prompt_tokens(600 + (uint32_t)i, 40, t);
        folio_generate_params_t q = {.tokens = t, .n_tokens = 40, .max_tokens = 64, .ignore_eos = true, .stream = true};
        e2e_req_t *x = e2e_send_generate(&g_tr, 1, cl[1], &q, 300 + i);
        (void)x;
    }
    e2e_pump(&g_tr, cl, 2, e2e_ms(30000));
    e2e_assert_invariant(&g_tr, "undrained");
    for (int i = 0; i < g_tr.n; i++) {
        const e2e_req_t *x = &g_tr.reqs[i];
        if (x->tag < 300) continue;
        if (x->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("after undrain: %s (%s)", st(x->status), x->message);
        used[0] |= !strcmp(x->group, "g0");
        used[1] |= !strcmp(x->group, "g1");
    }
    fprintf(stderr, "[e2e] drain: after undrain, g0 used %d, g1 used %d\n", used[0], used[1]);
}

/* ---- 8 --------------------------------------------------------------------------------------- */

#define SMALL_KV_BLOCKS 24 /* 384 tokens of KV per worker (32 KiB per 16-token block) */

static cluster_opts_t small_kv_opts(void)
{
    cluster_opts_t o;
    memset(&o, 0, sizeof o);
    o.kv_budget_bytes = (size_t)SMALL_KV_BLOCKS * 16 * E2E_KV_BYTES_PER_TOKEN;
    return o;
}

static void a_request_that_can_never_fit_the_kv_cache_is_resource_exhausted(void **state)
{
    (void)state;
    const cluster_opts_t o = small_kv_opts();
    g_cluster = e2e_cluster_start(&g_env, "kvfit", 2, &o);
    folio_client_t *c = new_client();
    int32_t t[600];
    e2e_prompt_tokens(77, 600, t);
    folio_generate_params_t p = {.tokens = t, .n_tokens = 600, .max_tokens = 4, .ignore_eos = true, .stream = true};
    e2e_req_t *r = e2e_send_generate(&g_tr, 0, c, &p, 0);
    p.stream = false;
    e2e_req_t *r2 = e2e_send_generate(&g_tr, 0, c, &p, 1);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "never fits");
    for (const e2e_req_t *x = r; x; x = x == r ? r2 : NULL)
        if (x->status != FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED)
            fail_msg("a 600-token prompt on workers with %d tokens of KV: %s (%s) after %.0f ms", SMALL_KV_BLOCKS * 16,
                     st(x->status), x->message, x->t_final - x->t_sent);
    assert_int_equal(r->n_tokens, 0);
    /* A request that fits is served. */
    folio_generate_params_t q = {.tokens = t, .n_tokens = 100, .max_tokens = 16, .ignore_eos = true, .stream = true};
    e2e_req_t *ok = e2e_send_generate(&g_tr, 0, c, &q, 2);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "fits");
    if (ok->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("a request that fits: %s (%s)", st(ok->status), ok->message);
    assert_int_equal(ok->n_tokens, 16);
}

static void shared_prefixes_hit_the_cache_with_the_same_output_and_tenants_do_not_share(void **state)
{
    (void)state;
    cluster_opts_t o = small_kv_opts();
    /* tenant-x and tenant-y are configured to share their cache; nobody else shares. */
    static const char *const share[] = {"--share-cache", "tenant-x,tenant-y", NULL};
    o.coordinator_args = share;
    g_cluster = e2e_cluster_start(&g_env, "prefix", 2, &o);
    folio_client_t *c = new_client();
    enum { P = 96, S = 8 };
    int32_t a[P + S], b[P + S];
    e2e_prompt_tokens(31, P, a);
    memcpy(b, a, sizeof(int32_t) * P);
    e2e_prompt_tokens(32, S, a + P);
    e2e_prompt_tokens(33, S, b + P);
    folio_generate_params_t pa = {.tokens = a, .n_tokens = P + S, .max_tokens = 16, .ignore_eos = true, .stream = true};
    folio_generate_params_t pb = pa;
    pb.tokens = b;
    folio_result_t ra, rb, rb_other, rb_other2, ra_x;
    e2e_generate(c, &pa, FOLIO__V1__STATUS_CODE__OK, &ra);
    e2e_generate(c, &pb, FOLIO__V1__STATUS_CODE__OK, &rb);
    fprintf(stderr, "[e2e] prefix: A on %s cached %u/%u; B on %s cached %u/%u\n", ra.group, ra.cached_prompt_tokens,
            ra.prompt_tokens, rb.group, rb.cached_prompt_tokens, rb.prompt_tokens);
    assert_int_equal(ra.prompt_tokens, P + S);
    assert_int_equal(ra.cached_prompt_tokens, 0);
    if (strcmp(ra.group, rb.group))
        fail_msg("prompts sharing %d tokens (6 blocks) were routed to different groups (%s, %s)", P, ra.group, rb.group);
    if (rb.cached_prompt_tokens == 0) fail_msg("B shares a %d-token prefix with A but reports no cached prompt tokens", P);
    assert_true(rb.cached_prompt_tokens <= P);

    /* Another tenant: nothing cached from the default tenant's blocks, the same greedy output
     * computed without the cache; then its own blocks are reused. */
    pb.tenant = "tenant-other";
    e2e_generate(c, &pb, FOLIO__V1__STATUS_CODE__OK, &rb_other);
    e2e_generate(c, &pb, FOLIO__V1__STATUS_CODE__OK, &rb_other2);
    fprintf(stderr, "[e2e] prefix: B as tenant-other on %s cached %u, again on %s cached %u\n", rb_other.group,
            rb_other.cached_prompt_tokens, rb_other2.group, rb_other2.cached_prompt_tokens);
    if (rb_other.cached_prompt_tokens != 0)
        fail_msg("tenant-other got %u cached tokens from the default tenant's blocks", rb_other.cached_prompt_tokens);
    if (!e2e_tokens_equal(rb.tokens, rb.n_tokens, rb_other.tokens, rb_other.n_tokens))
        fail_msg("B's greedy output with %u cached prompt tokens differs from B computed without the cache",
                 rb.cached_prompt_tokens);
    if (rb_other2.cached_prompt_tokens == 0) fail_msg("tenant-other's second identical request had no cached tokens");
    assert_true(e2e_tokens_equal(rb.tokens, rb.n_tokens, rb_other2.tokens, rb_other2.n_tokens));
    pa.tenant = "tenant-x";
    e2e_generate(c, &pa, FOLIO__V1__STATUS_CODE__OK, &ra_x);
    if (ra_x.cached_prompt_tokens != 0) fail_msg("tenant-x got %u cached tokens of other tenants", ra_x.cached_prompt_tokens);
    assert_true(e2e_tokens_equal(ra.tokens, ra.n_tokens, ra_x.tokens, ra_x.n_tokens));
    /* tenant-y shares tenant-x's namespace (--share-cache): B finds A's prefix blocks. */
    folio_result_t rb_y;
    pb.tenant = "tenant-y";
    e2e_generate(c, &pb, FOLIO__V1__STATUS_CODE__OK, &rb_y);
    fprintf(stderr, "[e2e] prefix: B as tenant-y (shares with tenant-x) cached %u\n", rb_y.cached_prompt_tokens);
    if (rb_y.cached_prompt_tokens == 0) fail_msg("tenant-y, configured to share with tenant-x, got no cached tokens");
    assert_true(e2e_tokens_equal(rb.tokens, rb.n_tokens, rb_y.tokens, rb_y.n_tokens));
    folio_result_clear(&rb_y);
    folio_result_clear(&ra);
    folio_result_clear(&rb);
    folio_result_clear(&rb_other);
    folio_result_clear(&rb_other2);
    folio_result_clear(&ra_x);
}

static void kv_pressure_preempts_without_changing_outputs(void **state)
{
    (void)state;
    const cluster_opts_t o = small_kv_opts();
    g_cluster = e2e_cluster_start(&g_env, "preempt", 1, &o);
    folio_client_t *ctl = new_client();
    folio_client_t *c = new_client();
    enum { NR = 6, PL = 32, GL = 96 }; /* 8 blocks each, 48 together, 24 in the cache */
    static int32_t prompts[NR][PL];
    folio_result_t ref[NR];
    for (int i = 0; i < NR; i++) {
        e2e_prompt_tokens(60 + (uint32_t)i, PL, prompts[i]);
        folio_generate_params_t p = {.tokens = prompts[i], .n_tokens = PL, .max_tokens = GL, .ignore_eos = true,
                                     .stream = true, .tenant = "alone"};
        e2e_generate(ctl, &p, FOLIO__V1__STATUS_CODE__OK, &ref[i]);
        assert_int_equal(ref[i].n_tokens, GL);
    }
    for (int i = 0; i < NR; i++) {
        folio_generate_params_t p = {.tokens = prompts[i], .n_tokens = PL, .max_tokens = GL, .ignore_eos = true,
                                     .stream = i % 2 == 0};
        e2e_send_generate(&g_tr, 0, c, &p, i);
    }
    e2e_pump(&g_tr, &c, 1, e2e_ms(60000));
    e2e_summary(&g_tr, "preempt");
    e2e_assert_invariant(&g_tr, "preempt");
    for (int i = 0; i < g_tr.n; i++) {
        const e2e_req_t *r = &g_tr.reqs[i];
        if (r->status != FOLIO__V1__STATUS_CODE__OK)
            fail_msg("request %d under KV pressure (each fits alone): %s (%s)", r->tag, st(r->status), r->message);
        if (!e2e_tokens_equal(r->tokens, r->n_tokens, ref[r->tag].tokens, ref[r->tag].n_tokens))
            fail_msg("request %d under KV pressure: output differs from its run alone", r->tag);
    }
    e2e_sleep_ms(500);
    Folio__V1__Response *s = e2e_status(ctl);
    fprintf(stderr, "[e2e] preempt: worker preemptions %llu\n",
            (unsigned long long)e2e_group(s, "g0")->load->preemptions);
    folio__v1__response__free_unpacked(s, NULL);
    for (int i = 0; i < NR; i++) folio_result_clear(&ref[i]);
}

static void stop_token_ids_and_stop_strings_end_with_stop_and_exclude_the_match(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "stops", 1, NULL);
    folio_client_t *c = new_client();
    folio_generate_params_t p = {.text = "The quick brown fox jumps", .max_tokens = 48, .ignore_eos = true, .stream = true};
    folio_result_t ref, r1, r2;
    e2e_generate(c, &p, FOLIO__V1__STATUS_CODE__OK, &ref);
    assert_int_equal(ref.n_tokens, 48);
    /* Stop at the first occurrence of the token found at index 20. */
    const int32_t stop_id = ref.tokens[20];
    int first = 0;
    while (ref.tokens[first] != stop_id) first++;
    folio_generate_params_t ps = p;
    ps.stop_ids = &stop_id;
    ps.n_stop_ids = 1;
    e2e_generate(c, &ps, FOLIO__V1__STATUS_CODE__OK, &r1);
    if (r1.finish_reason != FOLIO__V1__FINISH_REASON__FINISH_STOP || !e2e_tokens_equal(r1.tokens, r1.n_tokens, ref.tokens, first))
        fail_msg("stop token %d (first at index %d): finish %d with %d tokens", stop_id, first, r1.finish_reason,
                 r1.n_tokens);
    assert_int_equal(r1.completion_tokens, first);
    /* A stop string: two printable ASCII characters from the middle of the text. */
    const size_t len = strlen(ref.text);
    size_t at = len / 2;
    while (at + 1 < len && !((unsigned char)ref.text[at] > 0x20 && (unsigned char)ref.text[at] < 0x7f &&
                             (unsigned char)ref.text[at + 1] > 0x20 && (unsigned char)ref.text[at + 1] < 0x7f))
        at++;
    if (at + 1 < len) {
        char stop[3] = {ref.text[at], ref.text[at + 1], 0};
        const char *found = strstr(ref.text, stop);
        const size_t want = (size_t)(found - ref.text);
        const char *stops[1] = {stop};
        folio_generate_params_t pt = p;
        pt.stop = stops;
        pt.n_stop = 1;
        for (int stream = 0; stream < 2; stream++) {
            pt.stream = stream;
            e2e_generate(c, &pt, FOLIO__V1__STATUS_CODE__OK, &r2);
            if (r2.finish_reason != FOLIO__V1__FINISH_REASON__FINISH_STOP || strlen(r2.text) != want ||
                strncmp(r2.text, ref.text, want))
                fail_msg("stop string '%s' (%s): finish %d, text '%s', expected '%.*s'", stop,
                         stream ? "streamed" : "unstreamed", r2.finish_reason, r2.text, (int)want, ref.text);
            folio_result_clear(&r2);
        }
    } else {
        fprintf(stderr, "[e2e] stops: no ASCII pair in the reference text, stop string part skipped\n");
    }
    folio_result_clear(&ref);
    folio_result_clear(&r1);
}


/* ---- 9: the protocol page's rules --------------------------------------------------------- */

/* Receives one reply of any kind on a raw socket: [FOLIOC1][cmd][Response]; NULL on timeout. */
static Folio__V1__Response *raw_recv_any(raw_t *r, int timeout_ms, const char *what)
{
    zmq_pollitem_t it = {.socket = r->sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, timeout_ms) <= 0) return NULL;
    wire_msg_t m;
    fl_error_t err = {0};
    if (wire_recv(r->sock, false, false, &m, &err)) fail_msg("%s: %s", what, err.msg);
    if (m.header_len != 7 || memcmp(m.header, WIRE_HEADER_CLIENT, 7)) fail_msg("%s: reply header is not FOLIOC1", what);
    if (m.cmd != WIRE_CMD_PARTIAL && m.cmd != WIRE_CMD_FINAL) fail_msg("%s: reply command %d", what, m.cmd);
    Folio__V1__Response *resp = folio__v1__response__unpack(NULL, m.body_len, m.body);
    if (!resp) fail_msg("%s: reply body does not decode", what);
    if (resp->final != (m.cmd == WIRE_CMD_FINAL)) fail_msg("%s: final flag and command disagree", what);
    wire_msg_close(&m);
    return resp;
}

static void send_request(raw_t *r, const Folio__V1__Request *q, bool delimiter)
{
    size_t len;
    uint8_t *b = pack_request(q, &len);
    const uint8_t cmd = WIRE_CMD_REQUEST;
    if (delimiter) raw_send(r, (frame_t[]){{"", 0}, {"FOLIOC1", 7}, {&cmd, 1}, {b, len}}, 4);
    else raw_send(r, (frame_t[]){{"FOLIOC1", 7}, {&cmd, 1}, {b, len}}, 3);
    free(b);
}

/* The next FINAL on r (PARTIALs of other ids skipped), which must be for id with this code. */
static Folio__V1__Response *expect_raw_final(raw_t *r, const char *what, uint64_t id, int code, bool delimiter)
{
    for (;;) {
        Folio__V1__Response *resp = delimiter ? raw_recv(r, e2e_ms(10000), NULL, what) : raw_recv_any(r, e2e_ms(10000), what);
        if (!resp) fail_msg("%s: no reply within %d ms", what, e2e_ms(10000));
        if (!resp->final) {
            folio__v1__response__free_unpacked(resp, NULL);
            continue;
        }
        const int got = resp->status ? (int)resp->status->code : 0;
        fprintf(stderr, "[e2e] rules: %-44s -> %s id=%llu method=%d \"%s\"\n", what, st(got),
                (unsigned long long)resp->id, (int)resp->method, resp->status ? resp->status->message : "");
        if (resp->id != id || got != code)
            fail_msg("%s: answered id %llu %s (%s), expected id %llu %s", what, (unsigned long long)resp->id, st(got),
                     resp->status ? resp->status->message : "", (unsigned long long)id, st(code));
        return resp;
    }
}

/* A Generate's error FINAL: a result with FINISH_ERROR and real timings. */
static void check_error_result(const Folio__V1__Response *resp, const char *what)
{
    if (!resp->result) fail_msg("%s: a Generate's error FINAL without a result", what);
    if (resp->result->finish_reason != FOLIO__V1__FINISH_REASON__FINISH_ERROR)
        fail_msg("%s: finish reason %d, expected FINISH_ERROR", what, resp->result->finish_reason);
    if (!resp->result->timings || !(resp->result->timings->total_s > 0))
        fail_msg("%s: an error FINAL without its elapsed time", what);
}

static void the_protocol_pages_rules_for_ids_methods_strings_and_sockets_hold(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "rules", 1, NULL);
    raw_t r = {0};
    raw_open(&r, ZMQ_DEALER);
    enum { INV = FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, RE = FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED };
    const uint8_t cmd_req = WIRE_CMD_REQUEST;
    Folio__V1__Request q;
    Folio__V1__GenerateRequest g;
    Folio__V1__Response *resp;

    /* Id 0 is reserved. */
    folio__v1__request__init(&q);
    q.version = 1;
    q.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    send_request(&r, &q, false);
    folio__v1__response__free_unpacked(expect_raw_final(&r, "Health with id 0", 0, INV, false), NULL);

    /* An unknown method is echoed as sent. */
    q.id = 23;
    q.method = (Folio__V1__Method)99;
    send_request(&r, &q, false);
    resp = expect_raw_final(&r, "unknown method 99", 23, INV, false);
    if ((int)resp->method != 99) fail_msg("unknown method 99 answered as method %d", (int)resp->method);
    folio__v1__response__free_unpacked(resp, NULL);

    /* Over 8 MiB: answered under the id and method it carries. */
    q.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    q.id = 41;
    size_t bl;
    uint8_t *b = pack_oversized_request(&q, &bl);
    raw_send(&r, (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}, {b, bl}}, 3);
    free(b);
    resp = expect_raw_final(&r, "9 MiB body with id 41", 41, RE, false);
    if (resp->method != FOLIO__V1__METHOD__METHOD_HEALTH) fail_msg("9 MiB body answered as method %d", resp->method);
    if (resp->status->retry_after_ms) fail_msg("a body that is too large can be retried after %u ms?", resp->status->retry_after_ms);
    folio__v1__response__free_unpacked(resp, NULL);

    /* No body frame. */
    raw_send(&r, (frame_t[]){{"FOLIOC1", 7}, {&cmd_req, 1}}, 2);
    folio__v1__response__free_unpacked(expect_raw_final(&r, "REQUEST without a body frame", 0, INV, false), NULL);

    /* Invalid UTF-8 in text, in a message's content, in a stop string. */
    folio__v1__generate_request__init(&g);
    g.text = "caf\xc3";
    g.max_tokens = 4;
    g.stream = true;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    q.id = 60;
    send_request(&r, &q, false);
    resp = expect_raw_final(&r, "text of invalid UTF-8", 60, INV, false);
    check_error_result(resp, "text of invalid UTF-8");
    folio__v1__response__free_unpacked(resp, NULL);
    Folio__V1__ChatMessage cm, *cms[1] = {&cm};
    folio__v1__chat_message__init(&cm);
    cm.role = "user";
    cm.content = "\xed\xa0\x80 a surrogate";
    g.text = NULL;
    g.messages = cms;
    g.n_messages = 1;
    q.id = 61;
    send_request(&r, &q, false);
    folio__v1__response__free_unpacked(expect_raw_final(&r, "message content of invalid UTF-8", 61, INV, false), NULL);
    g.messages = NULL;
    g.n_messages = 0;
    g.text = "fine";
    char *stops[1] = {"\xff"};
    g.stop = stops;
    g.n_stop = 1;
    q.id = 62;
    send_request(&r, &q, false);
    folio__v1__response__free_unpacked(expect_raw_final(&r, "stop string of invalid UTF-8", 62, INV, false), NULL);
    g.stop = NULL;
    g.n_stop = 0;

    /* A streamed Generate REQ-style (a delimiter frame): refused; unstreamed it is served. */
    q.id = 63;
    send_request(&r, &q, true);
    resp = expect_raw_final(&r, "streamed Generate with a delimiter", 63, INV, true);
    check_error_result(resp, "streamed Generate with a delimiter");
    folio__v1__response__free_unpacked(resp, NULL);

    /* A second live request with the id of a live stream: refused under id 0, naming the id; the
     * live stream goes on and ends with exactly one FINAL. */
    g.text = "a long stream";
    g.max_tokens = (uint32_t)e2e_long_tokens(600);
    g.ignore_eos = true;
    q.id = 70;
    send_request(&r, &q, false);
    resp = raw_recv_any(&r, e2e_ms(10000), "the stream's first reply");
    if (!resp || resp->final) fail_msg("the stream to be duplicated ended at once (%s)", resp && resp->status ? resp->status->message : "no reply");
    folio__v1__response__free_unpacked(resp, NULL);
    g.max_tokens = 4;
    send_request(&r, &q, false);
    int finals_70 = 0, partials_70 = 1;
    bool refused = false;
    while (finals_70 == 0) {
        resp = raw_recv_any(&r, e2e_ms(30000), "the duplicated stream");
        if (!resp) fail_msg("the stream with a duplicated id never ended");
        if (resp->id == 0 && resp->final) {
            const char *msg = resp->status ? resp->status->message : "";
            fprintf(stderr, "[e2e] rules: duplicate id 70 -> %s id=0 \"%s\"\n", st(resp->status ? (int)resp->status->code : 0), msg);
            if (!resp->status || (int)resp->status->code != INV || !strstr(msg, "70"))
                fail_msg("the duplicate got %s (%s)", st(resp->status ? (int)resp->status->code : 0), msg);
            refused = true;
        } else if (resp->id == 70) {
            if (resp->final) {
                finals_70++;
                if (!resp->status || resp->status->code != FOLIO__V1__STATUS_CODE__OK)
                    fail_msg("the stream whose id was reused ended %s (%s)", st(resp->status ? (int)resp->status->code : 0),
                             resp->status ? resp->status->message : "");
            } else {
                partials_70++;
            }
        } else {
            fail_msg("a reply for id %llu", (unsigned long long)resp->id);
        }
        folio__v1__response__free_unpacked(resp, NULL);
    }
    if (!refused) fail_msg("the duplicate of id 70 was not refused under id 0 before the stream's FINAL");
    resp = raw_recv_any(&r, 300, "after the stream");
    if (resp) fail_msg("a reply for id %llu after the stream's FINAL (final %d)", (unsigned long long)resp->id, resp->final);
    fprintf(stderr, "[e2e] rules: the stream of id 70 ended once after %d partials\n", partials_70);
    raw_close(&r);
}

/* ---- 10: deadlines and cancels ------------------------------------------------------------ */

static void an_unstreamed_deadline_returns_the_tokens_made_and_no_delta_follows_a_cancels_reply(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "deadline-tokens", 1, NULL);
    folio_client_t *c = new_client();
    const int L = E2E_CTX - 64;
    int32_t p0[32];
    e2e_prompt_tokens(3, 32, p0);
    folio_generate_params_t p = {.tokens = p0, .n_tokens = 32, .max_tokens = L, .ignore_eos = true, .stream = false,
                                 .timeout_ms = (uint32_t)e2e_ms(300)};
    e2e_req_t *d = e2e_send_generate(&g_tr, 0, c, &p, 0);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "unstreamed deadline");
    fprintf(stderr, "[e2e] deadline-tokens: unstreamed, %d ms deadline: %s with %d tokens (completion %u) after %.0f ms\n",
            e2e_ms(300), st(d->status), d->n_tokens, d->completion, d->t_final - d->t_sent);
    if (d->status != FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED) fail_msg("%s (%s)", st(d->status), d->message);
    assert_int_equal(d->finish, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    if (d->n_tokens == 0) fail_msg("an unstreamed request past its deadline came back without the tokens it made");
    assert_int_equal(d->completion, d->n_tokens);
    assert_true(d->n_tokens < L);
    if (!(d->total_s >= e2e_ms(300) * 1e-3 && d->queued_s > 0 && d->first_token_s > 0))
        fail_msg("timings of the deadline's FINAL: queued %.4f first %.4f total %.4f", d->queued_s, d->first_token_s,
                 d->total_s);

    /* A busy worker; a stream is cancelled after its first tokens: no delta comes after the
     * Cancel's reply, and the stream's FINAL says CANCELLED and counts what the client got. */
    e2e_req_t *busy[6];
    for (int i = 0; i < 6; i++) {
        int32_t t[32];
        e2e_prompt_tokens(10 + (uint32_t)i, 32, t);
        folio_generate_params_t b = {.tokens = t, .n_tokens = 32, .max_tokens = e2e_long_tokens(1500),
                                     .ignore_eos = true, .stream = true};
        busy[i] = e2e_send_generate(&g_tr, 0, c, &b, 10 + i);
    }
    pump_until_tokens(&c, 1, busy, 6, 6, e2e_ms(10000));
    e2e_req_t *cancels[6];
    for (int i = 0; i < 6; i++) cancels[i] = e2e_send_cancel(&g_tr, 0, c, busy[i]->id);
    e2e_pump(&g_tr, &c, 1, e2e_ms(20000));
    e2e_assert_invariant(&g_tr, "cancel order");
    for (int i = 0; i < 6; i++) {
        const e2e_req_t *b = busy[i], *x = cancels[i];
        if (x->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("Cancel %d answered %s (%s)", i, st(x->status), x->message);
        if (b->last_partial_seq > x->final_seq)
            fail_msg("stream %d: a delta arrived after its Cancel's reply", i);
        if (b->final_seq < x->final_seq) fail_msg("stream %d: its FINAL came before its Cancel's reply", i);
        if (b->status != FOLIO__V1__STATUS_CODE__CANCELLED || b->finish != FOLIO__V1__FINISH_REASON__FINISH_CANCELLED)
            fail_msg("stream %d after its Cancel: %s (%s) finish %d", i, st(b->status), b->message, b->finish);
        if (b->completion != (uint32_t)b->n_tokens)
            fail_msg("stream %d: its FINAL counts %u tokens, the client got %d", i, b->completion, b->n_tokens);
    }
}

/* ---- 11: bounds ----------------------------------------------------------------------------- */

static void overload_and_a_tenant_at_its_limit_are_resource_exhausted_with_a_retry_hint(void **state)
{
    (void)state;
    static const char *const args[] = {"--max-inflight", "6", "--max-inflight-per-tenant", "4", NULL};
    cluster_opts_t o;
    memset(&o, 0, sizeof o);
    o.coordinator_args = args;
    g_cluster = e2e_cluster_start(&g_env, "overload", 1, &o);
    folio_client_t *cl[2] = {new_client(), new_client()};
    const int L = e2e_long_tokens(1500);
    e2e_req_t *a[6], *b[3];
    for (int i = 0; i < 6; i++) {
        int32_t t[24];
        e2e_prompt_tokens(800 + (uint32_t)i, 24, t);
        folio_generate_params_t p = {.tokens = t, .n_tokens = 24, .max_tokens = L, .ignore_eos = true, .stream = true,
                                     .tenant = "tenant-a"};
        a[i] = e2e_send_generate(&g_tr, 0, cl[0], &p, i);
    }
    pump_until_tokens(cl, 2, a, 6, 6, e2e_ms(10000)); /* the refusals are final at once */
    for (int i = 0; i < 3; i++) {
        int32_t t[24];
        e2e_prompt_tokens(900 + (uint32_t)i, 24, t);
        folio_generate_params_t p = {.tokens = t, .n_tokens = 24, .max_tokens = L, .ignore_eos = true, .stream = true,
                                     .tenant = "tenant-b"};
        b[i] = e2e_send_generate(&g_tr, 1, cl[1], &p, 10 + i);
    }
    e2e_pump(&g_tr, cl, 2, e2e_ms(120000));
    e2e_summary(&g_tr, "overload");
    e2e_assert_invariant(&g_tr, "overload");
    for (int i = 0; i < 9; i++) {
        const e2e_req_t *x = i < 6 ? a[i] : b[i - 6];
        fprintf(stderr, "[e2e] overload: %s request %d: %s retry_after_ms=%u (%s)\n", i < 6 ? "tenant-a" : "tenant-b",
                i < 6 ? i : i - 6, st(x->status), x->retry_after_ms, x->message);
    }
    /* tenant-a: 4 in, 2 refused at its limit; tenant-b: 2 in (the table holds 6), 1 refused. */
    for (int i = 0; i < 6; i++) {
        const int want = i < 4 ? FOLIO__V1__STATUS_CODE__OK : FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED;
        if (a[i]->status != want) fail_msg("tenant-a request %d: %s (%s), expected %s", i, st(a[i]->status), a[i]->message, st(want));
    }
    for (int i = 0; i < 3; i++) {
        const int want = i < 2 ? FOLIO__V1__STATUS_CODE__OK : FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED;
        if (b[i]->status != want) fail_msg("tenant-b request %d: %s (%s), expected %s", i, st(b[i]->status), b[i]->message, st(want));
    }
    const e2e_req_t *refused[3] = {a[4], a[5], b[2]};
    for (int i = 0; i < 3; i++) {
        const e2e_req_t *x = refused[i];
        if (x->retry_after_ms < 50 || x->retry_after_ms > 10000)
            fail_msg("a refusal for a full cluster with retry_after_ms %u (%s): not retryable", x->retry_after_ms, x->message);
        if (x->finish != FOLIO__V1__FINISH_REASON__FINISH_ERROR || x->n_tokens) fail_msg("a refusal with finish %d and %d tokens", x->finish, x->n_tokens);
    }
    if (!strstr(a[4]->message, "tenant-a")) fail_msg("tenant-a's refusal does not name the tenant: %s", a[4]->message);
    /* Retried after its hint, now that the cluster is idle, it is served. */
    e2e_sleep_ms((int)a[4]->retry_after_ms);
    int32_t t[24];
    e2e_prompt_tokens(804, 24, t);
    folio_generate_params_t p = {.tokens = t, .n_tokens = 24, .max_tokens = 8, .ignore_eos = true, .stream = true,
                                 .tenant = "tenant-a"};
    e2e_req_t *again = e2e_send_generate(&g_tr, 0, cl[0], &p, 20);
    e2e_pump(&g_tr, cl, 2, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "overload, retried");
    if (again->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("the retry: %s (%s)", st(again->status), again->message);
}

static void a_full_worker_queue_sends_the_request_to_another_group(void **state)
{
    (void)state;
    /* Each worker runs one sequence and queues one more: a third is refused RESOURCE_EXHAUSTED. */
    static const char *const wargs[] = {"--max-seqs", "1", "--max-waiting", "1", NULL};
    cluster_opts_t o;
    memset(&o, 0, sizeof o);
    o.worker_args = wargs;
    g_cluster = e2e_cluster_start(&g_env, "worker-full", 2, &o);
    folio_client_t *c = new_client();
    /* One prompt, so one routing key: every request goes to the same group first. */
    int32_t t[40];
    e2e_prompt_tokens(1234, 40, t);
    enum { N = 4 };
    e2e_req_t *rs[N];
    for (int i = 0; i < N; i++) {
        folio_generate_params_t p = {.tokens = t, .n_tokens = 40, .max_tokens = e2e_long_tokens(300), .ignore_eos = true,
                                     .stream = true};
        rs[i] = e2e_send_generate(&g_tr, 0, c, &p, i);
    }
    e2e_pump(&g_tr, &c, 1, e2e_ms(60000));
    e2e_summary(&g_tr, "worker-full");
    e2e_assert_invariant(&g_tr, "worker-full");
    int on[2] = {0, 0}, ok = 0;
    for (int i = 0; i < N; i++) {
        const e2e_req_t *x = rs[i];
        fprintf(stderr, "[e2e] worker-full: request %d: %s on '%s' retry_after_ms=%u (%s)\n", i, st(x->status), x->group,
                x->retry_after_ms, x->message);
        if (x->status == FOLIO__V1__STATUS_CODE__OK) {
            ok++;
            on[!strcmp(x->group, "g1")]++;
        } else if (x->status != FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED) {
            fail_msg("request %d: %s (%s)", i, st(x->status), x->message);
        } else if (x->retry_after_ms == 0) {
            fail_msg("request %d: a full queue's refusal without a retry hint: %s", i, x->message);
        }
    }
    if (!on[0] || !on[1])
        fail_msg("requests of one routing key refused by a full worker stayed on one group (g0 %d, g1 %d of %d OK)", on[0],
                 on[1], ok);
}

static void max_tokens_past_the_served_context_is_clamped_and_a_prompt_it_cannot_hold_never_fits(void **state)
{
    (void)state;
    const cluster_opts_t o = small_kv_opts(); /* the model's context is 2,048; the KV cache holds 384 tokens */
    g_cluster = e2e_cluster_start(&g_env, "clamp", 1, &o);
    folio_client_t *c = new_client();
    int32_t t[380];
    e2e_prompt_tokens(55, 380, t);
    for (int stream = 0; stream < 2; stream++) {
        folio_generate_params_t p = {.tokens = t, .n_tokens = 100, .max_tokens = 1000, .ignore_eos = true,
                                     .stream = stream};
        folio_result_t res;
        e2e_generate(c, &p, -1, &res);
        fprintf(stderr, "[e2e] clamp: 100-token prompt, max_tokens 1000 (%s): %s finish %d with %d tokens (%s)\n",
                stream ? "streamed" : "unstreamed", st(res.status), res.finish_reason, res.n_tokens, res.message);
        if (res.status != FOLIO__V1__STATUS_CODE__OK) fail_msg("a prompt that fits with a large max_tokens: %s (%s)", st(res.status), res.message);
        assert_int_equal(res.finish_reason, FOLIO__V1__FINISH_REASON__FINISH_LENGTH);
        if (res.n_tokens < 200 || 100 + res.n_tokens > SMALL_KV_BLOCKS * 16)
            fail_msg("clamped to %d tokens after a 100-token prompt, with %d tokens of KV", res.n_tokens, SMALL_KV_BLOCKS * 16);
        folio_result_clear(&res);
    }
    /* Inside the model's context, beyond the KV cache: it never fits. */
    folio_generate_params_t p = {.tokens = t, .n_tokens = 380, .max_tokens = 4, .ignore_eos = true, .stream = true};
    e2e_req_t *x = e2e_send_generate(&g_tr, 0, c, &p, 0);
    e2e_pump(&g_tr, &c, 1, e2e_ms(10000));
    e2e_assert_invariant(&g_tr, "never fits");
    if (x->status != FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED || x->retry_after_ms != 0)
        fail_msg("a 380-token prompt with 384 tokens of KV: %s retry_after_ms %u (%s)", st(x->status), x->retry_after_ms, x->message);
    if (!strstr(x->message, "context")) fail_msg("the refusal does not say why: %s", x->message);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(concurrent_streaming_clients_keep_the_invariant_and_match_runs_alone,
                                  test_teardown),
        cmocka_unit_test_teardown(cancel_ends_the_stream_cancelled_answers_ok_or_not_found_and_frees_kv, test_teardown),
        cmocka_unit_test_teardown(deadline_on_a_busy_worker_ends_deadline_exceeded_and_others_finish, test_teardown),
        cmocka_unit_test_teardown(killed_and_stopped_workers_end_every_request_once_and_the_survivor_serves,
                                  test_teardown),
        cmocka_unit_test_teardown(malformed_messages_get_error_finals_and_the_coordinator_keeps_serving, test_teardown),
        cmocka_unit_test_teardown(a_restarted_coordinator_gets_the_workers_back_and_serves, test_teardown),
        cmocka_unit_test_teardown(a_blocking_generate_ends_with_an_error_when_the_coordinator_restarts, test_teardown),
        cmocka_unit_test_teardown(a_request_the_worker_never_received_is_failed_over, test_teardown),
        cmocka_unit_test_teardown(drain_finishes_work_in_flight_admits_none_and_undrain_restores, test_teardown),
        cmocka_unit_test_teardown(a_request_that_can_never_fit_the_kv_cache_is_resource_exhausted, test_teardown),
        cmocka_unit_test_teardown(shared_prefixes_hit_the_cache_with_the_same_output_and_tenants_do_not_share,
                                  test_teardown),
        cmocka_unit_test_teardown(kv_pressure_preempts_without_changing_outputs, test_teardown),
        cmocka_unit_test_teardown(stop_token_ids_and_stop_strings_end_with_stop_and_exclude_the_match, test_teardown),
        cmocka_unit_test_teardown(the_protocol_pages_rules_for_ids_methods_strings_and_sockets_hold, test_teardown),
        cmocka_unit_test_teardown(an_unstreamed_deadline_returns_the_tokens_made_and_no_delta_follows_a_cancels_reply,
                                  test_teardown),
        cmocka_unit_test_teardown(overload_and_a_tenant_at_its_limit_are_resource_exhausted_with_a_retry_hint,
                                  test_teardown),
        cmocka_unit_test_teardown(a_full_worker_queue_sends_the_request_to_another_group, test_teardown),
        cmocka_unit_test_teardown(max_tokens_past_the_served_context_is_clamped_and_a_prompt_it_cannot_hold_never_fits,
                                  test_teardown),
    };
    /* FOLIO_E2E_FILTER=<glob>: run only the matching cases (chasing one case's rare failure) */
    const char *filter = getenv("FOLIO_E2E_FILTER");
    if (filter && *filter) cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
