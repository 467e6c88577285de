/* test_dispatch.c - the coordinator's request streams (coordinator/dispatch.c), driven through its
 * socket handlers (clients.c, workers.c) over inproc ZeroMQ sockets: one client DEALER and one
 * DEALER per worker group, the test playing both sides, no processes and no model.
 *
 * Protects: a worker's PARTIALs reach the client in order under the client's id, a repeated index
 * is dropped, and each accepted request gets exactly one FINAL (nothing after it, whatever the
 * worker still says); the worker's Request carries the prompt as tokens under its own id, the time
 * left and the cache namespace, and the client's message is left as it came; a group that dies
 * before the first token has reached the client has its request resubmitted to another group under
 * a new id, and after it the request moves on (mid-stream migration): the next group gets the
 * tokens the client has as resume_tokens with the bytes of their text, the stream goes on at the next
 * index and the FINAL counts every token, Status counts it migrated; a moving request no group can
 * take (none left, or each refuses) ends UNAVAILABLE keeping its tokens, and so does a request that
 * asked for the old rule (no_migrate); a client's own resume_tokens are refused; a request its group's
 * heartbeat no longer lists is failed over (not by a heartbeat sent during a step that began before
 * the request could have been read); Cancel ends with the worker's FINAL, or CANCELLED when
 * the worker never confirms; a deadline ends DEADLINE_EXCEEDED and cancels on the worker; a client
 * that is gone has its requests cancelled on their workers. The rules of proto/README.md: no delta
 * after a Cancel's reply; an unstreamed request past its deadline keeps the tokens of its worker's
 * FINAL; a worker's RESOURCE_EXHAUSTED refusal goes to another group, or to the client with its
 * hint; every Generate FINAL has a finish reason that follows from its status, and timings; worker
 * messages name the client's id; a full table or a tenant at its limit is RESOURCE_EXHAUSTED with a
 * retry hint, a prompt no group's context holds without one; max_tokens is clamped to the served
 * context; a reused live id, id 0, invalid UTF-8 and a streamed Generate from a REQ socket are
 * refused (the reused id under id 0); a spec the schema does not name and a max_draft over 16 are
 * refused naming the field, valid ones reach the worker, the worker's drafted and accepted counts
 * reach the client, and Status shows each group's speculation totals and mean accepted length; Status
 * carries each group's requests ended (by finish reason and status) and its histograms of first
 * token, inter-token (streamed: per delta; unstreamed: the worker's mean), end-to-end and queue time
 * and tokens, cumulative, with requests refused at the door under no group. Under cache-aware routing
 * a group's KV_EVENTS draw the prompts whose blocks it reports (Status counts them), and its entries
 * go when its rank 0 registers again or it dies. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "dispatch.h"

#define N_WORKERS 2
#define CLIENT_ID "client-1"

typedef struct fixture {
    coord_t *c;
    void *client;
    void *worker[N_WORKERS]; /* rank 0 of group g<i> */
} fixture_t;

static fixture_t F;
static int g_endpoint;

static void *dealer(const char *identity, const char *endpoint)
{
    void *s = wire_socket(F.c->zctx, ZMQ_DEALER, identity, NULL);
    assert_non_null(s);
    assert_int_equal(zmq_connect(s, endpoint), 0);
    return s;
}

static int setup(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    coord_t *c = F.c = calloc(1, sizeof *c);
    if (!c) return -1;
    c->opts = (coord_opts_t){.policy = ROUTER_PREFIX, .load_factor = 1.25, .load_floor = 4, .route_blocks = 8,
                             .heartbeat_ms = 1000, .max_inflight = 64};
    c->opts.share_cache[c->opts.n_share_cache++] = "team,alice,bob";
    c->n_vocab = 512;
    c->next_wid = 1;
    c->hb_s = 1.0;
    if (!(c->router = router_new(c->opts.policy, c->opts.load_factor, c->opts.load_floor, NULL))) return -1;
    if (!(c->reqs = reqs_new(c->opts.max_inflight, NULL))) return -1;
    if (!(c->kv_index = kv_index_new(1024, NULL))) return -1;
    if (!(c->groups = malloc(sizeof *c->groups))) return -1;
    groups_init(c->groups);
    c->zctx = zmq_ctx_new();
    char ce[64], we[64];
    snprintf(ce, sizeof ce, "inproc://dispatch-c%d", g_endpoint);
    snprintf(we, sizeof we, "inproc://dispatch-w%d", g_endpoint++);
    c->clients = wire_socket(c->zctx, ZMQ_ROUTER, NULL, NULL);
    c->workers = wire_socket(c->zctx, ZMQ_ROUTER, NULL, NULL);
    if (!c->clients || !c->workers || zmq_bind(c->clients, ce) || zmq_bind(c->workers, we)) return -1;
    F.client = dealer(CLIENT_ID, ce);
    for (int i = 0; i < N_WORKERS; i++) {
        char id[32];
        snprintf(id, sizeof id, "g%d:0:1", i);
        F.worker[i] = dealer(id, we);
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    coord_t *c = F.c;
    if (F.client) zmq_close(F.client);
    for (int i = 0; i < N_WORKERS; i++)
        if (F.worker[i]) zmq_close(F.worker[i]);
    zmq_close(c->clients);
    zmq_close(c->workers);
    zmq_ctx_term(c->zctx);
    reqs_destroy(&c->reqs);
    kv_index_destroy(&c->kv_index);
    router_destroy(&c->router);
    free(c->groups);
    free(c);
    return 0;
}

/* Delivers whatever reached the coordinator's sockets to its handlers, as its event loop does,
 * until both have been quiet for 20 ms; now_offset shifts the handlers' clock. */
static void pump_at(double now_offset)
{
    coord_t *c = F.c;
    zmq_pollitem_t items[2] = {{c->workers, 0, ZMQ_POLLIN, 0}, {c->clients, 0, ZMQ_POLLIN, 0}};
    while (zmq_poll(items, 2, 20) > 0)
        for (int k = 0; k < 2; k++) {
            wire_msg_t m;
            int rc;
            while ((rc = wire_recv(items[k].socket, true, true, &m, NULL)) == 0 || m.n_frames) {
                if (!rc && k == 0) coord_worker_message(c, &m, fl_clock_s() + now_offset);
                if (!rc && k == 1) coord_client_message(c, &m, fl_clock_s() + now_offset);
                wire_msg_close(&m);
            }
        }
}

static void pump(void)
{
    pump_at(0);
}

/* ---- the worker's side ---- */

static void worker_send(int w, int cmd, const ProtobufCMessage *body)
{
    assert_int_equal(wire_send(F.worker[w], NULL, 0, false, WIRE_HEADER_WORKER, cmd, body, NULL), 0);
}

/* A HEARTBEAT listing these ids, sent during a step that has run step_running_s (0: between steps). */
static void worker_heartbeat_at(int w, const uint64_t *live, size_t n_live, double step_running_s)
{
    Folio__V1__WorkerLoad l = FOLIO__V1__WORKER_LOAD__INIT;
    l.engine_ok = true;
    l.live_ids = (uint64_t *)live;
    l.n_live_ids = n_live;
    l.step_running_s = step_running_s;
    worker_send(w, WIRE_CMD_HEARTBEAT, &l.base);
}

static void worker_heartbeat(int w, const uint64_t *live, size_t n_live)
{
    worker_heartbeat_at(w, live, n_live, 0);
}

/* READY from worker i as rank 0 of group g<i>, 16-token blocks. */
static void worker_ready(int i, uint32_t kv_blocks, uint32_t max_context)
{
    char group[16];
    snprintf(group, sizeof group, "g%d", i);
    Folio__V1__WorkerHello h = FOLIO__V1__WORKER_HELLO__INIT;
    h.group = group;
    h.tp_size = 1;
    h.block_size = 16;
    h.kv_blocks = kv_blocks;
    h.max_context = max_context;
    h.model_id = (char *)"tiny";
    h.epoch = 1;
    worker_send(i, WIRE_CMD_READY, &h.base);
}

static void register_workers(int n)
{
    for (int i = 0; i < n; i++) {
        worker_ready(i, 100, 256);
        worker_heartbeat(i, NULL, 0);
    }
    pump();
    for (int i = 0; i < n; i++) assert_true(F.c->groups->table[i].routable);
}

/* An admin drain of group g<i>: no longer routable. */
static void drain_group(int i)
{
    groups_set_draining(F.c->groups, i, true);
    assert_false(F.c->groups->table[i].routable);
}

/* The next REQUEST worker w got within 200 ms (decoded, to free), or NULL; other commands (the
 * coordinator's heartbeats) are skipped. */
static Folio__V1__Request *worker_recv(int w)
{
    zmq_pollitem_t it = {F.worker[w], 0, ZMQ_POLLIN, 0};
    while (zmq_poll(&it, 1, 200) > 0) {
        wire_msg_t m;
        if (wire_recv(F.worker[w], false, true, &m, NULL)) continue;
        Folio__V1__Request *q = NULL;
        if (m.cmd == WIRE_CMD_REQUEST) {
            q = folio__v1__request__unpack(NULL, m.body_len, m.body);
            assert_non_null(q);
        }
        wire_msg_close(&m);
        if (q) return q;
    }
    return NULL;
}

/* The group (0 or 1) that got the Generate, whose worker-side id goes to *wid. */
static int which_worker(uint64_t *wid)
{
    for (int w = 0; w < N_WORKERS; w++) {
        Folio__V1__Request *q = worker_recv(w);
        if (!q) continue;
        assert_int_equal(q->method, FOLIO__V1__METHOD__METHOD_GENERATE);
        *wid = q->id;
        folio__v1__request__free_unpacked(q, NULL);
        return w;
    }
    fail_msg("no worker got the request");
    return -1;
}

static void worker_partial(int w, uint64_t wid, uint32_t index, const int32_t *tokens, size_t n, bool final)
{
    Folio__V1__TokenDelta d = FOLIO__V1__TOKEN_DELTA__INIT;
    d.index = index;
    d.tokens = (int32_t *)tokens;
    d.n_tokens = n;
    d.text = (char *)"x";
    Folio__V1__Response r;
    wire_response_init(&r, wid, FOLIO__V1__METHOD__METHOD_GENERATE, final);
    r.delta = &d;
    worker_send(w, final ? WIRE_CMD_FINAL : WIRE_CMD_PARTIAL, &r.base);
}

static void worker_final(int w, uint64_t wid, Folio__V1__StatusCode code, Folio__V1__FinishReason reason,
                         uint32_t completion_tokens)
{
    Folio__V1__Status st = FOLIO__V1__STATUS__INIT;
    st.code = code;
    Folio__V1__Usage u = FOLIO__V1__USAGE__INIT;
    u.prompt_tokens = 3;
    u.completion_tokens = completion_tokens;
    Folio__V1__Timings t = FOLIO__V1__TIMINGS__INIT;
    t.queued_s = 0.001;
    t.first_token_s = 0.002;
    Folio__V1__GenerateResult res = FOLIO__V1__GENERATE_RESULT__INIT;
    res.finish_reason = reason;
    res.usage = &u;
    res.timings = &t;
    Folio__V1__Response r;
    wire_response_init(&r, wid, FOLIO__V1__METHOD__METHOD_GENERATE, true);
    r.status = &st;
    r.result = &res;
    worker_send(w, WIRE_CMD_FINAL, &r.base);
}

/* A worker's refusal of wid: RESOURCE_EXHAUSTED with this hint. */
static void worker_refuse(int w, uint64_t wid, uint32_t retry_after_ms, const char *msg)
{
    wire_error_reply_t r;
    wire_error_reply_init(&r, wid, FOLIO__V1__METHOD__METHOD_GENERATE, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, msg);
    r.status.retry_after_ms = retry_after_ms;
    worker_send(w, WIRE_CMD_FINAL, &r.resp.base);
}

/* Checks that cq (freed here) is a CANCEL of worker-side id wid. */
static void check_cancel(Folio__V1__Request *cq, uint64_t wid)
{
    assert_non_null(cq);
    assert_int_equal(cq->method, FOLIO__V1__METHOD__METHOD_CANCEL);
    assert_int_equal(cq->cancel->target_id, wid);
    folio__v1__request__free_unpacked(cq, NULL);
}

/* ---- the client's side ---- */

static const int32_t PROMPT[3] = {11, 12, 13};

/* Sends q (REQ-style, with an empty delimiter frame, when delimiter) and lets the coordinator take it. */
static void client_send(const Folio__V1__Request *q, bool delimiter)
{
    assert_int_equal(wire_send(F.client, NULL, 0, delimiter, WIRE_HEADER_CLIENT, WIRE_CMD_REQUEST, &q->base, NULL), 0);
    pump();
}

/* A Generate of n prompt tokens asking max_tokens, streamed or not. */
static void client_generate_tokens(uint64_t id, const char *tenant, uint32_t timeout_ms, bool stream,
                                   const int32_t *tokens, int n, uint32_t max_tokens)
{
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.prompt_tokens = (int32_t *)tokens;
    g.n_prompt_tokens = (size_t)n;
    g.max_tokens = max_tokens;
    g.stream = stream;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = id;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.tenant = (char *)tenant;
    q.timeout_ms = timeout_ms;
    q.generate = &g;
    client_send(&q, false);
}

/* A Generate of PROMPT with max_tokens 8, streamed or not. */
static void client_generate_ex(uint64_t id, const char *tenant, uint32_t timeout_ms, bool stream)
{
    client_generate_tokens(id, tenant, timeout_ms, stream, PROMPT, 3, 8);
}

/* A streamed Generate of PROMPT with max_tokens 8 that asks for the old failover rule. */
static void client_generate_no_migrate(uint64_t id)
{
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.prompt_tokens = (int32_t *)PROMPT;
    g.n_prompt_tokens = 3;
    g.max_tokens = 8;
    g.stream = true;
    g.no_migrate = true;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = id;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    client_send(&q, false);
}

static void client_generate(uint64_t id, const char *tenant, uint32_t timeout_ms)
{
    client_generate_ex(id, tenant, timeout_ms, true);
}

static void client_cancel(uint64_t id, uint64_t target)
{
    Folio__V1__CancelRequest cr = FOLIO__V1__CANCEL_REQUEST__INIT;
    cr.target_id = target;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = id;
    q.method = FOLIO__V1__METHOD__METHOD_CANCEL;
    q.cancel = &cr;
    assert_int_equal(wire_send(F.client, NULL, 0, false, WIRE_HEADER_CLIENT, WIRE_CMD_REQUEST, &q.base, NULL), 0);
    pump();
}

/* The next message the client got within 200 ms (decoded, to free), or NULL. */
static Folio__V1__Response *client_recv(void)
{
    zmq_pollitem_t it = {F.client, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, 200) <= 0) return NULL;
    wire_msg_t m;
    assert_int_equal(wire_recv(F.client, false, true, &m, NULL), 0);
    assert_true(m.cmd == WIRE_CMD_PARTIAL || m.cmd == WIRE_CMD_FINAL);
    Folio__V1__Response *r = folio__v1__response__unpack(NULL, m.body_len, m.body);
    assert_non_null(r);
    assert_int_equal(r->final, m.cmd == WIRE_CMD_FINAL);
    wire_msg_close(&m);
    return r;
}

static void expect_partial(uint64_t id, uint32_t index, const int32_t *tokens, size_t n)
{
    Folio__V1__Response *r = client_recv();
    assert_non_null(r);
    assert_false(r->final);
    assert_int_equal(r->id, id);
    assert_int_equal(r->method, FOLIO__V1__METHOD__METHOD_GENERATE);
    assert_non_null(r->delta);
    assert_int_equal(r->delta->index, index);
    assert_int_equal(r->delta->n_tokens, n);
    assert_memory_equal(r->delta->tokens, tokens, n * sizeof *tokens);
    folio__v1__response__free_unpacked(r, NULL);
}

/* The FINAL for id with this status (to free). */
static Folio__V1__Response *expect_final(uint64_t id, Folio__V1__StatusCode code)
{
    Folio__V1__Response *r = client_recv();
    assert_non_null(r);
    assert_true(r->final);
    assert_int_equal(r->id, id);
    assert_non_null(r->status);
    if ((int)r->status->code != (int)code)
        fail_msg("id %llu: status %s (%s), expected %s", (unsigned long long)id, wire_status_name(r->status->code),
                 r->status->message, wire_status_name(code));
    return r;
}

static void expect_nothing_more(void)
{
    pump();
    Folio__V1__Response *r = client_recv();
    if (r) fail_msg("unexpected message for id %llu final=%d", (unsigned long long)r->id, (int)r->final);
    assert_int_equal(reqs_count(F.c->reqs), 0);
}

/* One group g0, and a Generate from the client with this id that g0 got: its worker-side id. */
static uint64_t generate_on_g0(uint64_t id, uint32_t timeout_ms)
{
    register_workers(1);
    client_generate(id, "", timeout_ms);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    const uint64_t wid = q->id;
    folio__v1__request__free_unpacked(q, NULL);
    return wid;
}

/* ---- tests ---- */

static void test_partials_are_relayed_in_order_and_exactly_one_final_ends_the_stream(void **state)
{
    (void)state;
    register_workers(2);
    client_generate(7, "", 0);
    uint64_t wid = 0;
    const int w = which_worker(&wid);
    assert_int_not_equal(wid, 7);
    const int32_t a[2] = {1, 2}, b[1] = {3}, old[1] = {9};
    worker_partial(w, wid, 0, a, 2, false);
    worker_partial(w, wid, 2, b, 1, false);
    worker_partial(w, wid, 1, old, 1, false); /* an index already sent: dropped */
    worker_partial(w, wid + 1000, 3, old, 1, false); /* an id nobody has: dropped */
    worker_partial(1 - w, wid, 3, old, 1, false);    /* another group's request: dropped */
    worker_final(w, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 3);
    worker_final(w, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 3); /* a second */
    pump();
    expect_partial(7, 0, a, 2);
    expect_partial(7, 2, b, 1);
    Folio__V1__Response *r = expect_final(7, FOLIO__V1__STATUS_CODE__OK);
    assert_non_null(r->result);
    assert_int_equal(r->result->finish_reason, FOLIO__V1__FINISH_REASON__FINISH_STOP);
    assert_int_equal(r->result->usage->completion_tokens, 3);
    char group[16];
    snprintf(group, sizeof group, "g%d", w);
    assert_string_equal(r->result->group, group);
    /* Timings count from the coordinator's receipt: at least the worker's, first token as relayed. */
    assert_non_null(r->result->timings);
    assert_true(r->result->timings->queued_s >= 0.001);
    assert_true(r->result->timings->first_token_s > 0);
    assert_true(r->result->timings->total_s >= r->result->timings->first_token_s);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
    assert_int_equal(F.c->groups->table[w].inflight, 0);
    assert_int_equal(F.c->n_latency, 1);
}

static void test_a_repeated_index_in_the_final_is_dropped_and_the_final_still_relayed(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(3, 0);
    const int32_t a[2] = {1, 2};
    worker_partial(0, wid, 0, a, 2, false);
    worker_partial(0, wid, 1, a, 2, true); /* unstreamed-style FINAL overlapping what was sent */
    pump();
    expect_partial(3, 0, a, 2);
    Folio__V1__Response *r = client_recv();
    assert_non_null(r);
    assert_true(r->final);
    assert_null(r->delta);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_the_worker_request_is_its_own_and_the_client_message_stays_as_it_came(void **state)
{
    (void)state;
    register_workers(1);
    client_generate(5, "bob", 60000);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    assert_int_equal(q->version, WIRE_VERSION);
    assert_int_equal(q->method, FOLIO__V1__METHOD__METHOD_GENERATE);
    assert_int_not_equal(q->id, 5);
    assert_string_equal(q->tenant, "team"); /* bob shares the cache of the list "team,alice,bob" */
    assert_true(q->timeout_ms > 59000 && q->timeout_ms <= 60001); /* the time left, rounded up */
    assert_non_null(q->generate);
    assert_string_equal(q->generate->text, "");
    assert_int_equal(q->generate->n_messages, 0);
    assert_int_equal(q->generate->n_prompt_tokens, 3);
    assert_memory_equal(q->generate->prompt_tokens, PROMPT, sizeof PROMPT);
    assert_int_equal(q->generate->max_tokens, 8);
    assert_true(q->generate->stream);
    /* The client's decoded message, kept for resubmission, is unchanged. */
    const req_t *e = reqs_by_client(F.c->reqs, (const uint8_t *)CLIENT_ID, strlen(CLIENT_ID), 5);
    assert_non_null(e);
    assert_int_equal(e->wid, q->id);
    assert_int_equal(e->msg->id, 5);
    assert_string_equal(e->msg->tenant, "bob");
    assert_int_equal(e->msg->timeout_ms, 60000);
    assert_int_equal(e->msg->generate->n_prompt_tokens, 3);
    worker_final(0, q->id, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 0);
    folio__v1__request__free_unpacked(q, NULL);
    pump();
    folio__v1__response__free_unpacked(expect_final(5, FOLIO__V1__STATUS_CODE__OK), NULL);
    expect_nothing_more();
}

static void test_a_group_death_before_the_first_token_resubmits_to_another_group(void **state)
{
    (void)state;
    register_workers(2);
    client_generate(9, "", 0);
    uint64_t wid = 0;
    const int w = which_worker(&wid), other = 1 - w;
    worker_send(w, WIRE_CMD_DISCONNECT, NULL); /* the group goes away */
    pump();
    Folio__V1__Request *q = worker_recv(other);
    assert_non_null(q);
    assert_int_not_equal(q->id, wid); /* a new id: the dead group's words are dropped */
    assert_memory_equal(q->generate->prompt_tokens, PROMPT, sizeof PROMPT);
    assert_int_equal(F.c->requests_failed_over, 1);
    assert_null(client_recv()); /* the client saw nothing of it */
    const int32_t a[1] = {4};
    worker_partial(other, q->id, 0, a, 1, false);
    worker_final(other, q->id, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 1);
    pump();
    expect_partial(9, 0, a, 1);
    Folio__V1__Response *r = expect_final(9, FOLIO__V1__STATUS_CODE__OK);
    char group[16];
    snprintf(group, sizeof group, "g%d", other);
    assert_string_equal(r->result->group, group);
    folio__v1__response__free_unpacked(r, NULL);
    folio__v1__request__free_unpacked(q, NULL);
    expect_nothing_more();
}

static void test_with_no_migrate_a_group_death_after_the_first_token_ends_unavailable_keeping_the_tokens(void **state)
{
    (void)state;
    register_workers(2);
    client_generate_no_migrate(4);
    uint64_t wid = 0;
    const int w = which_worker(&wid), other = 1 - w;
    const int32_t a[2] = {5, 6};
    worker_partial(w, wid, 0, a, 2, false);
    pump();
    expect_partial(4, 0, a, 2);
    worker_send(w, WIRE_CMD_DISCONNECT, NULL);
    pump();
    Folio__V1__Response *r = expect_final(4, FOLIO__V1__STATUS_CODE__UNAVAILABLE);
    assert_non_null(strstr(r->status->message, "after 2 tokens"));
    assert_int_equal(r->result->finish_reason, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_int_equal(r->result->usage->completion_tokens, 2);
    assert_int_equal(r->result->usage->prompt_tokens, 3);
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(worker_recv(other)); /* not resubmitted */
    assert_int_equal(F.c->requests_failed_over, 0);
    expect_nothing_more();
}

/* A streamed request on one of two groups with tokens a then b relayed (text "x" each): its
 * group w dies, and the other one's Request is returned (to free), with wid and w set. */
static Folio__V1__Request *moved_after_two_deltas(uint64_t id, int *w_out)
{
    register_workers(2);
    client_generate(id, "", 0);
    uint64_t wid = 0;
    const int w = which_worker(&wid), other = 1 - w;
    const int32_t a[2] = {5, 6}, b[1] = {7};
    worker_partial(w, wid, 0, a, 2, false);
    worker_partial(w, wid, 2, b, 1, false);
    pump();
    expect_partial(id, 0, a, 2);
    expect_partial(id, 2, b, 1);
    worker_send(w, WIRE_CMD_DISCONNECT, NULL);
    pump();
    Folio__V1__Request *q = worker_recv(other);
    assert_non_null(q);
    assert_int_not_equal(q->id, wid);
    *w_out = w;
    return q;
}

static void test_a_group_death_after_the_first_token_moves_the_stream_on_to_another_group(void **state)
{
    (void)state;
    int w = 0;
    Folio__V1__Request *q = moved_after_two_deltas(4, &w);
    const int other = 1 - w;
    /* The same request, with what the client has: 3 tokens and 2 bytes of their text. */
    assert_int_equal(q->method, FOLIO__V1__METHOD__METHOD_GENERATE);
    assert_int_equal(q->generate->n_prompt_tokens, 3);
    assert_memory_equal(q->generate->prompt_tokens, PROMPT, sizeof PROMPT);
    assert_int_equal(q->generate->max_tokens, 8);
    assert_true(q->generate->stream);
    const int32_t sent[3] = {5, 6, 7};
    assert_int_equal(q->generate->n_resume_tokens, 3);
    assert_memory_equal(q->generate->resume_tokens, sent, sizeof sent);
    assert_int_equal(q->generate->resume_text_bytes, 2);
    assert_int_equal(F.c->requests_failed_over, 1);
    assert_int_equal(F.c->requests_migrated, 1);
    assert_null(client_recv()); /* the client saw nothing of the move */
    /* The stream goes on at index 3; the FINAL counts every token the client has. */
    const int32_t c[2] = {8, 9};
    worker_partial(other, q->id, 3, c, 2, false);
    worker_final(other, q->id, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 2);
    pump();
    expect_partial(4, 3, c, 2);
    Folio__V1__Response *r = expect_final(4, FOLIO__V1__STATUS_CODE__OK);
    assert_int_equal(r->result->finish_reason, FOLIO__V1__FINISH_REASON__FINISH_LENGTH);
    assert_int_equal(r->result->usage->completion_tokens, 5);
    assert_int_equal(r->result->usage->prompt_tokens, 3);
    char group[16];
    snprintf(group, sizeof group, "g%d", other);
    assert_string_equal(r->result->group, group);
    /* Timings stay the client's: its first token came before the move, and the queue before that. */
    assert_true(r->result->timings->first_token_s > 0);
    assert_true(r->result->timings->queued_s <= r->result->timings->first_token_s);
    folio__v1__response__free_unpacked(r, NULL);
    folio__v1__request__free_unpacked(q, NULL);
    expect_nothing_more();

    /* Status counts it. */
    Folio__V1__Request sq = FOLIO__V1__REQUEST__INIT;
    sq.version = WIRE_VERSION;
    sq.id = 50;
    sq.method = FOLIO__V1__METHOD__METHOD_STATUS;
    client_send(&sq, false);
    Folio__V1__Response *st = client_recv();
    assert_non_null(st);
    assert_non_null(st->cluster);
    assert_int_equal(st->cluster->requests_migrated, 1);
    assert_int_equal(st->cluster->requests_failed_over, 1);
    folio__v1__response__free_unpacked(st, NULL);
}

static void test_a_moving_stream_no_group_can_take_ends_unavailable_keeping_the_tokens(void **state)
{
    (void)state;
    int w = 0;
    Folio__V1__Request *q = moved_after_two_deltas(6, &w);
    /* The only other group refuses it: nobody is left. */
    worker_refuse(1 - w, q->id, 250, "queue full");
    folio__v1__request__free_unpacked(q, NULL);
    pump();
    Folio__V1__Response *r = expect_final(6, FOLIO__V1__STATUS_CODE__UNAVAILABLE);
    assert_non_null(strstr(r->status->message, "could not go on after 3 tokens were sent: queue full"));
    assert_int_equal(r->status->retry_after_ms, 0);
    assert_int_equal(r->result->finish_reason, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_int_equal(r->result->usage->completion_tokens, 3);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_a_moving_stream_with_no_group_left_ends_unavailable_keeping_the_tokens(void **state)
{
    (void)state;
    register_workers(2);
    drain_group(1); /* g0 is the only group that takes work */
    client_generate(7, "", 0);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    const int32_t a[1] = {5};
    worker_partial(0, q->id, 0, a, 1, false);
    pump();
    expect_partial(7, 0, a, 1);
    worker_send(0, WIRE_CMD_DISCONNECT, NULL);
    pump();
    folio__v1__request__free_unpacked(q, NULL);
    Folio__V1__Response *r = expect_final(7, FOLIO__V1__STATUS_CODE__UNAVAILABLE);
    assert_non_null(
        strstr(r->status->message, "after 1 tokens were sent and no other healthy group could take the rest"));
    assert_int_equal(r->result->usage->completion_tokens, 1);
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(worker_recv(1));
    assert_int_equal(F.c->requests_migrated, 0);
    expect_nothing_more();
}

static void test_a_streaming_request_its_group_lost_moves_on_and_one_past_its_deadline_ends_there(void **state)
{
    (void)state;
    register_workers(2);
    client_generate(8, "", 0);
    uint64_t wid = 0;
    const int w = which_worker(&wid);
    const int32_t a[2] = {5, 6};
    worker_partial(w, wid, 0, a, 2, false);
    pump();
    expect_partial(8, 0, a, 2);
    /* Its group no longer lists it 2 heartbeat intervals on (a reconnect dropped it): it moves on,
     * to any group, its own included, with what the client has. */
    worker_heartbeat(w, NULL, 0);
    pump_at(3.0);
    uint64_t wid2 = 0;
    const int w2 = which_worker(&wid2);
    assert_true(wid2 != wid);
    assert_int_equal(F.c->requests_migrated, 1);
    worker_partial(w, wid, 2, a, 1, false); /* the old id: dropped */
    const int32_t b[1] = {9};
    worker_partial(w2, wid2, 2, b, 1, false);
    worker_final(w2, wid2, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 3);
    pump();
    expect_partial(8, 2, b, 1);
    Folio__V1__Response *r = expect_final(8, FOLIO__V1__STATUS_CODE__OK);
    assert_int_equal(r->result->usage->completion_tokens, 3);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();

    /* A streaming request whose group dies after its deadline: it ends there, keeping its tokens. */
    client_generate(9, "", 1000);
    const int w3 = which_worker(&wid);
    worker_partial(w3, wid, 0, a, 2, false);
    pump();
    expect_partial(9, 0, a, 2);
    worker_send(w3, WIRE_CMD_DISCONNECT, NULL);
    pump_at(2.0);
    r = expect_final(9, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED);
    assert_int_equal(r->result->usage->completion_tokens, 2);
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(worker_recv(1 - w3));
    assert_int_equal(F.c->requests_migrated, 1);
    expect_nothing_more();
}

static void test_a_clients_own_resume_tokens_are_refused(void **state)
{
    (void)state;
    register_workers(1);
    const int32_t resume[1] = {4};
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.prompt_tokens = (int32_t *)PROMPT;
    g.n_prompt_tokens = 3;
    g.stream = true;
    g.resume_tokens = (int32_t *)resume;
    g.n_resume_tokens = 1;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = 3;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    client_send(&q, false);
    Folio__V1__Response *r = expect_final(3, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT);
    assert_non_null(strstr(r->status->message, "resume_tokens"));
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(worker_recv(0));
    expect_nothing_more();
}

static void test_a_request_the_heartbeat_no_longer_lists_is_failed_over(void **state)
{
    (void)state;
    register_workers(2);
    client_generate(2, "", 0);
    uint64_t wid = 0;
    const int w = which_worker(&wid);
    /* Listed, or too recent to judge: stays. */
    worker_heartbeat(w, &wid, 1);
    pump_at(3.0);
    worker_heartbeat(w, NULL, 0);
    pump_at(0.5);
    /* Sent during a step that began before the request could be read: it cannot know it. */
    worker_heartbeat_at(w, NULL, 0, 2.5);
    pump_at(3.0);
    for (int i = 0; i < N_WORKERS; i++) assert_null(worker_recv(i));
    /* Unlisted 2 heartbeat intervals after it was sent: lost in transit, sent again (to any group,
     * its own included) under a new id. */
    worker_heartbeat(w, NULL, 0);
    pump_at(3.0);
    uint64_t wid2 = 0;
    const int w2 = which_worker(&wid2);
    assert_true(wid2 != wid);
    assert_int_equal(F.c->requests_failed_over, 1);
    worker_final(w, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 0); /* too late */
    pump();
    worker_final(w2, wid2, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 0);
    pump();
    folio__v1__response__free_unpacked(expect_final(2, FOLIO__V1__STATUS_CODE__OK), NULL);
    expect_nothing_more();
}

static void test_cancel_ends_with_the_workers_final_and_nothing_after(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(7, 0);
    client_cancel(8, 7);
    folio__v1__response__free_unpacked(expect_final(8, FOLIO__V1__STATUS_CODE__OK), NULL); /* the Cancel's answer */
    client_cancel(10, 7);                                                                /* again: still OK */
    folio__v1__response__free_unpacked(expect_final(10, FOLIO__V1__STATUS_CODE__OK), NULL);
    check_cancel(worker_recv(0), wid);
    assert_null(worker_recv(0)); /* told once */
    worker_final(0, wid, FOLIO__V1__STATUS_CODE__CANCELLED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, 0);
    pump();
    Folio__V1__Response *r = expect_final(7, FOLIO__V1__STATUS_CODE__CANCELLED);
    assert_int_equal(r->result->finish_reason, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    folio__v1__response__free_unpacked(r, NULL);
    dispatch_expire(F.c, fl_clock_s() + 100); /* its cancel timeout went with it */
    client_cancel(11, 7);
    folio__v1__response__free_unpacked(expect_final(11, FOLIO__V1__STATUS_CODE__NOT_FOUND), NULL);
    expect_nothing_more();
}

static void test_a_cancel_the_worker_never_confirms_ends_cancelled_after_two_heartbeats(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(7, 0);
    client_cancel(8, 7);
    folio__v1__response__free_unpacked(expect_final(8, FOLIO__V1__STATUS_CODE__OK), NULL);
    const double t = dispatch_next_timer(F.c, fl_clock_s());
    assert_true(t > 1.5 && t <= 2.0);
    dispatch_expire(F.c, fl_clock_s() + 1.0);
    assert_null(client_recv()); /* not yet */
    dispatch_expire(F.c, fl_clock_s() + 2.1);
    Folio__V1__Response *r = expect_final(7, FOLIO__V1__STATUS_CODE__CANCELLED);
    assert_non_null(strstr(r->status->message, "did not confirm"));
    folio__v1__response__free_unpacked(r, NULL);
    worker_final(0, wid, FOLIO__V1__STATUS_CODE__CANCELLED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, 0);
    expect_nothing_more();
    assert_true(dispatch_next_timer(F.c, fl_clock_s()) < 0);
}

static void test_a_deadline_ends_deadline_exceeded_and_cancels_on_the_worker(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(6, 1000);
    const int32_t a[1] = {7};
    worker_partial(0, wid, 0, a, 1, false);
    pump();
    expect_partial(6, 0, a, 1);
    dispatch_expire(F.c, fl_clock_s() + 1.5);
    Folio__V1__Response *r = expect_final(6, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED);
    assert_int_equal(r->result->finish_reason, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_int_equal(r->result->usage->completion_tokens, 1);
    folio__v1__response__free_unpacked(r, NULL);
    check_cancel(worker_recv(0), wid);
    worker_final(0, wid, FOLIO__V1__STATUS_CODE__CANCELLED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, 1);
    expect_nothing_more();
}

static void test_without_a_healthy_group_a_generate_ends_unavailable_at_once(void **state)
{
    (void)state;
    client_generate(1, "", 0);
    Folio__V1__Response *r = expect_final(1, FOLIO__V1__STATUS_CODE__UNAVAILABLE);
    assert_non_null(strstr(r->status->message, "no healthy worker group"));
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_shutdown_ends_every_request_unavailable_once(void **state)
{
    (void)state;
    register_workers(2);
    client_generate(1, "", 0);
    client_generate(2, "", 0);
    assert_int_equal(dispatch_end_all(F.c, "the coordinator is shutting down"), 2);
    bool seen[3] = {false};
    for (int i = 0; i < 2; i++) {
        Folio__V1__Response *r = client_recv();
        assert_non_null(r);
        assert_true(r->final && (r->id == 1 || r->id == 2) && !seen[r->id]);
        seen[r->id] = true;
        assert_int_equal(r->status->code, FOLIO__V1__STATUS_CODE__UNAVAILABLE);
        folio__v1__response__free_unpacked(r, NULL);
    }
    expect_nothing_more();
}

static void test_a_client_that_is_gone_has_its_requests_cancelled_on_the_worker(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(7, 0);
    zmq_close(F.client);
    F.client = NULL;
    /* The coordinator learns it when a send to the client fails. */
    const int32_t a[1] = {1};
    Folio__V1__Request *cq = NULL;
    for (uint32_t i = 0; i < 50 && !cq; i++) {
        worker_partial(0, wid, i, a, 1, false);
        pump();
        cq = worker_recv(0);
    }
    check_cancel(cq, wid);
    assert_int_equal(reqs_count(F.c->reqs), 0);
    assert_int_equal(F.c->groups->table[0].inflight, 0);
}


/* ---- the protocol page's rules ---- */

/* The client's message is a FINAL for id with this status, a result whose finish reason is
 * `reason` and real timings (to free). */
static Folio__V1__Response *expect_generate_final(uint64_t id, Folio__V1__StatusCode code,
                                                  Folio__V1__FinishReason reason)
{
    Folio__V1__Response *r = expect_final(id, code);
    assert_non_null(r->result);
    if ((int)r->result->finish_reason != (int)reason)
        fail_msg("id %llu (%s): finish reason %d, expected %d", (unsigned long long)id, wire_status_name(code),
                 r->result->finish_reason, reason);
    assert_non_null(r->result->usage);
    assert_non_null(r->result->timings);
    assert_true(r->result->timings->total_s > 0);
    assert_true(r->result->timings->queued_s > 0);
    return r;
}

static void test_no_delta_reaches_the_client_after_the_cancels_reply(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(7, 0);
    const int32_t a[2] = {1, 2}, b[2] = {3, 4}, c[1] = {5};
    worker_partial(0, wid, 0, a, 2, false);
    pump();
    expect_partial(7, 0, a, 2);
    client_cancel(8, 7);
    folio__v1__response__free_unpacked(expect_final(8, FOLIO__V1__STATUS_CODE__OK), NULL);
    check_cancel(worker_recv(0), wid);
    /* What the worker made before it saw the Cancel, and its FINAL saying it had finished. */
    worker_partial(0, wid, 2, b, 2, false);
    worker_partial(0, wid, 4, c, 1, true);
    pump();
    Folio__V1__Response *r =
        expect_generate_final(7, FOLIO__V1__STATUS_CODE__CANCELLED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_null(r->delta);
    assert_int_equal(r->result->usage->completion_tokens, 2); /* what the client has */
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_a_cancelled_request_that_had_finished_with_nothing_held_back_ends_as_it_ended(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(7, 0);
    const int32_t a[2] = {1, 2};
    worker_partial(0, wid, 0, a, 2, false);
    pump();
    expect_partial(7, 0, a, 2);
    client_cancel(8, 7);
    folio__v1__response__free_unpacked(expect_final(8, FOLIO__V1__STATUS_CODE__OK), NULL);
    worker_final(0, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 2);
    pump();
    folio__v1__response__free_unpacked(
        expect_generate_final(7, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP), NULL);
    check_cancel(worker_recv(0), wid);
    expect_nothing_more();
}

static void test_an_unstreamed_request_past_its_deadline_keeps_the_tokens_of_its_workers_final(void **state)
{
    (void)state;
    register_workers(1);
    client_generate_ex(6, "", 1000, false);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    const uint64_t wid = q->id;
    folio__v1__request__free_unpacked(q, NULL);
    dispatch_expire(F.c, fl_clock_s() + 1.05);
    assert_null(client_recv()); /* waits for the worker's FINAL, which holds the tokens */
    check_cancel(worker_recv(0), wid);
    /* The worker's FINAL: cancelled (or its own deadline), everything in one delta as unstreamed. */
    const int32_t toks[3] = {4, 5, 6};
    Folio__V1__TokenDelta d = FOLIO__V1__TOKEN_DELTA__INIT;
    d.tokens = (int32_t *)toks;
    d.n_tokens = 3;
    wire_error_reply_t er;
    wire_error_reply_init(&er, wid, FOLIO__V1__METHOD__METHOD_GENERATE, FOLIO__V1__STATUS_CODE__CANCELLED, "cancelled");
    er.resp.delta = &d;
    worker_send(0, WIRE_CMD_FINAL, &er.resp.base);
    pump();
    Folio__V1__Response *r = expect_generate_final(6, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED,
                                                   FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_non_null(r->delta);
    assert_int_equal(r->delta->n_tokens, 3);
    assert_non_null(strstr(r->status->message, "deadline of 1000 ms"));
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();

    /* A worker that never answers: DEADLINE_EXCEEDED without tokens 2 heartbeat intervals later. */
    client_generate_ex(9, "", 1000, false);
    q = worker_recv(0);
    assert_non_null(q);
    folio__v1__request__free_unpacked(q, NULL);
    dispatch_expire(F.c, fl_clock_s() + 1.05);
    assert_null(client_recv());
    dispatch_expire(F.c, fl_clock_s() + 3.2);
    r = expect_generate_final(9, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_null(r->delta);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

/* The worker's refusal of wid (no result, as a worker's reply_error), with a retry hint. */
static void test_a_worker_refusal_goes_to_another_group_then_to_the_client_with_its_hint(void **state)
{
    (void)state;
    register_workers(2);
    client_generate(5, "", 0);
    uint64_t wid = 0;
    int w = which_worker(&wid);
    char msg[128];
    /* Each refusal sends it to a group other than the one that refused, COORD_MAX_RESUBMITS times. */
    for (int k = 0; k < COORD_MAX_RESUBMITS; k++) {
        snprintf(msg, sizeof msg, "sched: queue full (1 waiting) for request %llu", (unsigned long long)wid);
        worker_refuse(w, wid, 250, msg);
        pump();
        assert_null(client_recv()); /* not the client's business yet */
        Folio__V1__Request *q = worker_recv(1 - w);
        assert_non_null(q);
        assert_int_not_equal(q->id, wid);
        wid = q->id;
        folio__v1__request__free_unpacked(q, NULL);
        w = 1 - w;
        assert_int_equal(F.c->groups->table[1 - w].inflight, 0);
        assert_int_equal(F.c->groups->table[w].inflight, 1);
    }
    /* Refused again: the client gets the last refusal, with its hint. */
    snprintf(msg, sizeof msg, "worker: request id %llu refused: queue full", (unsigned long long)wid);
    worker_refuse(w, wid, 300, msg);
    pump();
    Folio__V1__Response *r =
        expect_generate_final(5, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_int_equal(r->status->retry_after_ms, 300);
    assert_string_equal(r->status->message, "worker: request id 5 refused: queue full"); /* the client's id */
    assert_int_equal(r->result->usage->prompt_tokens, 3);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
    for (int i = 0; i < N_WORKERS; i++) assert_int_equal(F.c->groups->table[i].inflight, 0);

    /* With one group there is nobody else: its refusal reaches the client at once. */
    drain_group(1);
    client_generate(6, "", 0);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    worker_refuse(0, q->id, 120, "queue full");
    folio__v1__request__free_unpacked(q, NULL);
    pump();
    r = expect_generate_final(6, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_int_equal(r->status->retry_after_ms, 120);
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_a_worker_error_final_without_a_result_gets_one_in_the_clients_terms(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(12, 0);
    char msg[128];
    snprintf(msg, sizeof msg, "sched: request %llu: token id 9 out of vocabulary (id %llu, 1%llu kept)",
             (unsigned long long)wid, (unsigned long long)wid, (unsigned long long)wid);
    wire_error_reply_t er;
    wire_error_reply_init(&er, wid, FOLIO__V1__METHOD__METHOD_GENERATE, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg);
    worker_send(0, WIRE_CMD_FINAL, &er.resp.base);
    pump();
    Folio__V1__Response *r =
        expect_generate_final(12, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    char want[128];
    snprintf(want, sizeof want, "sched: request 12: token id 9 out of vocabulary (id 12, 1%llu kept)",
             (unsigned long long)wid);
    assert_string_equal(r->status->message, want);
    assert_string_equal(r->result->group, "g0");
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_a_full_table_or_tenant_is_resource_exhausted_with_a_retry_hint(void **state)
{
    (void)state;
    register_workers(1);
    F.c->opts.max_inflight = 3;
    F.c->opts.max_inflight_per_tenant = 2;
    client_generate(1, "a", 0);
    client_generate(2, "a", 0);
    client_generate(3, "a", 0); /* tenant a at its limit */
    Folio__V1__Response *r = expect_generate_final(3, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED,
                                                   FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_true(r->status->retry_after_ms >= COORD_RETRY_MIN_MS && r->status->retry_after_ms <= COORD_RETRY_MAX_MS);
    assert_non_null(strstr(r->status->message, "tenant 'a'"));
    folio__v1__response__free_unpacked(r, NULL);
    client_generate(4, "b", 0); /* another tenant still gets in */
    client_generate(5, "c", 0); /* the table is full */
    r = expect_generate_final(5, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_true(r->status->retry_after_ms >= COORD_RETRY_MIN_MS);
    assert_non_null(strstr(r->status->message, "too many requests in flight"));
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(client_recv());
    assert_int_equal(reqs_count(F.c->reqs), 3);
    assert_int_equal(reqs_tenant_count(F.c->reqs, "a"), 2);
    assert_int_equal(dispatch_end_all(F.c, "end"), 3);
    for (int i = 0; i < 3; i++) folio__v1__response__free_unpacked(client_recv(), NULL);
    assert_int_equal(reqs_tenant_count(F.c->reqs, "a"), 0);
    for (int i = 0; i < 3; i++) {
        Folio__V1__Request *q = worker_recv(0);
        assert_non_null(q);
        folio__v1__request__free_unpacked(q, NULL);
    }
}

/* A Generate of n prompt tokens (ids 3, 4, ...) asking max_tokens, from the client. */
static void client_generate_long(uint64_t id, int n, uint32_t max_tokens)
{
    int32_t *t = malloc((size_t)n * sizeof *t);
    assert_non_null(t);
    for (int i = 0; i < n; i++) t[i] = 3 + i % 200;
    client_generate_tokens(id, "", 0, false, t, n, max_tokens);
    free(t);
}

static void test_max_tokens_is_clamped_to_the_served_context_and_a_prompt_it_cannot_hold_is_refused(void **state)
{
    (void)state;
    register_workers(1); /* max_context 256 */
    client_generate_long(1, 100, 1000);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    assert_int_equal(q->generate->max_tokens, 156);
    folio__v1__request__free_unpacked(q, NULL);
    client_generate_long(2, 250, 0); /* the default 16 does not fit either */
    q = worker_recv(0);
    assert_non_null(q);
    assert_int_equal(q->generate->max_tokens, 6);
    folio__v1__request__free_unpacked(q, NULL);
    client_generate_long(3, 100, 0); /* fits: sent as asked */
    q = worker_recv(0);
    assert_non_null(q);
    assert_int_equal(q->generate->max_tokens, 0);
    folio__v1__request__free_unpacked(q, NULL);
    client_generate_long(4, 256, 4);
    Folio__V1__Response *r =
        expect_generate_final(4, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_int_equal(r->status->retry_after_ms, 0); /* it never will fit */
    assert_non_null(strstr(r->status->message, "context of 256 tokens"));
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(worker_recv(0));
    /* A worker that advertises more context than its KV cache holds serves what the cache holds. */
    worker_ready(1, 10, 2048);
    pump();
    assert_int_equal(F.c->groups->g[groups_find(F.c->groups, "g1")].max_context, 160);
}

static void test_a_reused_live_id_is_refused_under_id_0_and_the_live_stream_goes_on(void **state)
{
    (void)state;
    const uint64_t wid = generate_on_g0(7, 0);
    client_generate(7, "", 0);
    Folio__V1__Response *r = expect_generate_final(0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                                                   FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_non_null(strstr(r->status->message, "request id 7 is already in flight"));
    folio__v1__response__free_unpacked(r, NULL);
    client_cancel(7, 99); /* any method: its reply would carry the id too */
    r = expect_final(0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT);
    assert_null(r->result);
    folio__v1__response__free_unpacked(r, NULL);
    Folio__V1__Request bad = FOLIO__V1__REQUEST__INIT; /* and an invalid request (version 0) */
    bad.id = 7;
    bad.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    client_send(&bad, false);
    r = expect_final(0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT);
    assert_non_null(strstr(r->status->message, "request id 7 is already in flight"));
    assert_non_null(strstr(r->status->message, "version 0"));
    folio__v1__response__free_unpacked(r, NULL);
    assert_null(worker_recv(0)); /* nothing reached the worker */
    const int32_t a[1] = {1};
    worker_partial(0, wid, 0, a, 1, false);
    worker_final(0, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 1);
    pump();
    expect_partial(7, 0, a, 1);
    folio__v1__response__free_unpacked(expect_final(7, FOLIO__V1__STATUS_CODE__OK), NULL);
    expect_nothing_more();
}

/* Sends q and expects its refusal: a FINAL for q's id with code whose message has needle. */
static void expect_refused(const Folio__V1__Request *q, bool delimiter, Folio__V1__StatusCode code, const char *needle)
{
    client_send(q, delimiter);
    Folio__V1__Response *r = expect_final(q->id, code);
    if (!strstr(r->status->message, needle))
        fail_msg("id %llu: \"%s\" does not say \"%s\"", (unsigned long long)q->id, r->status->message, needle);
    folio__v1__response__free_unpacked(r, NULL);
}

static void test_id_0_invalid_utf8_and_a_streamed_generate_from_a_req_socket_are_refused(void **state)
{
    (void)state;
    register_workers(1);
    const Folio__V1__StatusCode INV = FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT;
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.text = (char *)"hello";
    g.max_tokens = 4;
    g.stream = true;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    q.id = 0;
    expect_refused(&q, false, INV, "id 0 is reserved");

    static const char *const bad[] = {"caf\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\xffz"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        g.text = (char *)bad[i];
        q.id = 20 + i;
        client_send(&q, false);
        Folio__V1__Response *r = expect_generate_final(q.id, INV, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
        assert_non_null(strstr(r->status->message, "generate.text is not valid UTF-8"));
        folio__v1__response__free_unpacked(r, NULL);
    }
    g.text = (char *)"";
    Folio__V1__ChatMessage msg = FOLIO__V1__CHAT_MESSAGE__INIT, *msgs[1] = {&msg};
    msg.role = (char *)"user";
    msg.content = (char *)"ok \xe2\x82";
    g.messages = msgs;
    g.n_messages = 1;
    q.id = 30;
    expect_refused(&q, false, INV, "generate.messages[0] is not valid UTF-8");
    g.messages = NULL;
    g.n_messages = 0;
    g.text = (char *)"fine \xe2\x82\xac";
    char *stops[1] = {(char *)"\x80"};
    g.stop = stops;
    g.n_stop = 1;
    q.id = 31;
    expect_refused(&q, false, INV, "generate.stop[0]");
    assert_null(worker_recv(0));

    /* REQ-style (a delimiter frame): one reply per request, so no stream. */
    g.stop = NULL;
    g.n_stop = 0;
    q.id = 40;
    expect_refused(&q, true, INV, "stream = false");
    assert_null(worker_recv(0));
    expect_nothing_more();
}

/* The StatusReply of a Status from the client (to free with its Response, *resp). */
static const Folio__V1__StatusReply *client_status(uint64_t id, Folio__V1__Response **resp)
{
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = id;
    q.method = FOLIO__V1__METHOD__METHOD_STATUS;
    client_send(&q, false);
    *resp = expect_final(id, FOLIO__V1__STATUS_CODE__OK);
    assert_non_null((*resp)->cluster);
    return (*resp)->cluster;
}

static void test_spec_and_max_draft_are_checked_then_forwarded_and_status_shows_the_accepted_length(void **state)
{
    (void)state;
    register_workers(2);
    const Folio__V1__StatusCode INV = FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT;
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.prompt_tokens = (int32_t *)PROMPT;
    g.n_prompt_tokens = 3;
    g.max_tokens = 4;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    q.generate = &g;
    /* Out of range: refused at the door, naming the field; no worker sees them. */
    g.max_draft = 17;
    q.id = 50;
    expect_refused(&q, false, INV, "max_draft");
    g.max_draft = 0;
    g.spec = (Folio__V1__SpecMode)4;
    q.id = 51;
    expect_refused(&q, false, INV, "spec");
    assert_null(worker_recv(0));
    assert_null(worker_recv(1));

    /* In range: the worker's Request carries both; its Usage counts reach the client. */
    g.spec = FOLIO__V1__SPEC_MODE__SPEC_MEDUSA;
    g.max_draft = 16;
    q.id = 52;
    client_send(&q, false);
    int w = -1;
    Folio__V1__Request *wq = NULL;
    for (int i = 0; i < N_WORKERS && !wq; i++)
        if ((wq = worker_recv(i))) w = i;
    assert_non_null(wq);
    assert_int_equal(wq->generate->spec, FOLIO__V1__SPEC_MODE__SPEC_MEDUSA);
    assert_int_equal(wq->generate->max_draft, 16);
    Folio__V1__Status st = FOLIO__V1__STATUS__INIT;
    Folio__V1__Usage u = FOLIO__V1__USAGE__INIT;
    u.prompt_tokens = 3;
    u.completion_tokens = 4;
    u.drafted_tokens = 9;
    u.accepted_tokens = 2;
    Folio__V1__GenerateResult res = FOLIO__V1__GENERATE_RESULT__INIT;
    res.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_LENGTH;
    res.usage = &u;
    Folio__V1__Response r;
    wire_response_init(&r, wq->id, FOLIO__V1__METHOD__METHOD_GENERATE, true);
    r.status = &st;
    r.result = &res;
    worker_send(w, WIRE_CMD_FINAL, &r.base);
    folio__v1__request__free_unpacked(wq, NULL);
    pump();
    Folio__V1__Response *fin = expect_final(52, FOLIO__V1__STATUS_CODE__OK);
    assert_non_null(fin->result);
    assert_non_null(fin->result->usage);
    assert_int_equal(fin->result->usage->drafted_tokens, 9);
    assert_int_equal(fin->result->usage->accepted_tokens, 2);
    folio__v1__response__free_unpacked(fin, NULL);

    /* Status: each group's load totals as its heartbeat sent them, and the mean accepted length
     * (1 + accepted / spec_seq_steps; 0 where no speculation ran). */
    Folio__V1__WorkerLoad l = FOLIO__V1__WORKER_LOAD__INIT;
    l.engine_ok = true;
    l.drafted_tokens = 300;
    l.accepted_tokens = 150;
    l.spec_seq_steps = 100;
    worker_send(0, WIRE_CMD_HEARTBEAT, &l.base);
    worker_heartbeat(1, NULL, 0);
    pump();
    Folio__V1__Response *sr;
    const Folio__V1__StatusReply *s = client_status(53, &sr);
    assert_int_equal(s->n_groups, 2);
    for (size_t i = 0; i < s->n_groups; i++) {
        const Folio__V1__GroupStatus *gs = s->groups[i];
        assert_non_null(gs->load);
        if (!strcmp(gs->name, "g0")) {
            assert_int_equal(gs->load->drafted_tokens, 300);
            assert_int_equal(gs->load->accepted_tokens, 150);
            assert_int_equal(gs->load->spec_seq_steps, 100);
            assert_true(gs->mean_accepted_length == 2.5);
        } else {
            assert_int_equal(gs->load->spec_seq_steps, 0);
            assert_true(gs->mean_accepted_length == 0);
        }
    }
    folio__v1__response__free_unpacked(sr, NULL);
    expect_nothing_more();
}

/* The RequestMetrics of group g ("" for requests no group served) in a Status reply. */
static const Folio__V1__RequestMetrics *status_requests(const Folio__V1__StatusReply *s, const char *g)
{
    if (!*g) return s->requests_no_group;
    for (size_t i = 0; i < s->n_groups; i++)
        if (!strcmp(s->groups[i]->name, g)) return s->groups[i]->requests;
    return NULL;
}

static uint64_t finished_count(const Folio__V1__RequestMetrics *m, Folio__V1__FinishReason reason,
                               Folio__V1__StatusCode code)
{
    for (size_t i = 0; i < m->n_finished; i++)
        if (m->finished[i]->finish_reason == reason && m->finished[i]->code == code) return m->finished[i]->count;
    return 0;
}

/* A histogram as Prometheus wants it: bounds increasing, counts cumulative, none above count. */
static void check_histogram(const Folio__V1__Histogram *h, uint64_t count)
{
    assert_non_null(h);
    assert_int_equal(h->count, count);
    assert_true(h->n_bounds > 0 && h->n_bounds == h->n_cumulative);
    for (size_t i = 0; i < h->n_bounds; i++) {
        if (i) assert_true(h->bounds[i] > h->bounds[i - 1] && h->cumulative[i] >= h->cumulative[i - 1]);
        assert_true(h->cumulative[i] <= h->count);
    }
    assert_true(h->sum >= 0);
}

static void test_status_carries_each_groups_request_counts_and_latency_histograms(void **state)
{
    (void)state;
    /* Streamed: 1 token, then 2 (their interval shared between them), then the FINAL. */
    const uint64_t wid = generate_on_g0(7, 0);
    const int32_t a[1] = {1}, b[2] = {2, 3};
    worker_partial(0, wid, 0, a, 1, false);
    pump();
    worker_partial(0, wid, 1, b, 2, false);
    worker_final(0, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 3);
    pump();
    expect_partial(7, 0, a, 1);
    expect_partial(7, 1, b, 2);
    folio__v1__response__free_unpacked(expect_final(7, FOLIO__V1__STATUS_CODE__OK), NULL);
    /* Unstreamed: its 4 tokens come together a second later; each after the first counts the mean
     * interval of its worker's decoding. */
    client_generate_ex(8, "", 0, false);
    Folio__V1__Request *q = worker_recv(0);
    assert_non_null(q);
    worker_final(0, q->id, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_STOP, 4);
    folio__v1__request__free_unpacked(q, NULL);
    pump_at(1.0);
    folio__v1__response__free_unpacked(expect_final(8, FOLIO__V1__STATUS_CODE__OK), NULL);
    /* Refused at the door (no group's context holds it): counted for no group. */
    client_generate_long(9, 300, 4);
    folio__v1__response__free_unpacked(expect_final(9, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED), NULL);

    Folio__V1__Response *sr;
    const Folio__V1__StatusReply *s = client_status(10, &sr);
    const Folio__V1__RequestMetrics *g0 = status_requests(s, "g0");
    assert_non_null(g0);
    assert_int_equal(g0->n_finished, 2);
    assert_int_equal(finished_count(g0, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, FOLIO__V1__STATUS_CODE__OK), 1);
    assert_int_equal(finished_count(g0, FOLIO__V1__FINISH_REASON__FINISH_STOP, FOLIO__V1__STATUS_CODE__OK), 1);
    check_histogram(g0->time_to_first_token, 2);
    check_histogram(g0->inter_token_latency, 2 + 3);
    check_histogram(g0->e2e_request_latency, 2);
    check_histogram(g0->request_queue_time, 2);
    check_histogram(g0->request_prompt_tokens, 2);
    check_histogram(g0->request_generation_tokens, 2);
    assert_true(g0->request_prompt_tokens->sum == 6);
    assert_true(g0->request_generation_tokens->sum == 7);
    /* the unstreamed request's three intervals share about a second; the streamed ones far less */
    assert_true(g0->inter_token_latency->sum > 0.9 && g0->inter_token_latency->sum < 1.5);
    assert_true(g0->e2e_request_latency->sum >= 1.0);
    assert_true(g0->request_queue_time->sum >= 0.002); /* the worker's 0.001 s each, and the way there */
    const Folio__V1__RequestMetrics *none = status_requests(s, "");
    assert_non_null(none);
    assert_int_equal(none->n_finished, 1);
    assert_int_equal(
        finished_count(none, FOLIO__V1__FINISH_REASON__FINISH_ERROR, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED), 1);
    check_histogram(none->e2e_request_latency, 0); /* never admitted: no latencies */
    folio__v1__response__free_unpacked(sr, NULL);
    expect_nothing_more();
}

/* KV_EVENTS from group g<w>: these blocks stored (a reset snapshot when seq is 1). */
static void worker_kv_events(int w, uint64_t seq, const uint64_t *stored, size_t n)
{
    Folio__V1__KvEvents ev = FOLIO__V1__KV_EVENTS__INIT;
    ev.seq = seq;
    ev.reset = seq == 1;
    ev.stored = (uint64_t *)stored;
    ev.n_stored = n;
    worker_send(w, WIRE_CMD_KV_EVENTS, &ev.base);
}

/* An unstreamed Generate of toks (max_tokens 4) that the worker ends at once: the group that got it. */
static int generate_where(uint64_t id, const int32_t *toks, int n)
{
    client_generate_tokens(id, "", 0, false, toks, n, 4);
    uint64_t wid = 0;
    const int w = which_worker(&wid);
    worker_final(w, wid, FOLIO__V1__STATUS_CODE__OK, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 4);
    pump();
    folio__v1__response__free_unpacked(expect_final(id, FOLIO__V1__STATUS_CODE__OK), NULL);
    return w;
}

/* The fixture's coordinator on the cache-aware policy, with two registered one-rank groups. */
static coord_t *cache_aware_with_two_groups(void)
{
    coord_t *c = F.c;
    router_destroy(&c->router);
    c->router = router_new(ROUTER_CACHE_AWARE, c->opts.load_factor, c->opts.load_floor, NULL);
    assert_non_null(c->router);
    register_workers(2);
    return c;
}

static void test_cache_aware_routes_to_reported_blocks_until_their_group_restarts_or_dies(void **state)
{
    (void)state;
    coord_t *c = cache_aware_with_two_groups();
    int32_t toks[64]; /* 4 blocks of 16, the default tenant */
    for (int i = 0; i < 64; i++) toks[i] = 3 + i;
    block_hash_t h[4];
    assert_int_equal(block_hash_prefix(block_hash_salt("", 0), toks, 64, 16, h, 4), 4);
    const uint64_t lo[4] = {h[0].lo, h[1].lo, h[2].lo, h[3].lo};
    const int home = generate_where(1, toks, 64); /* nobody holds it: consistent hashing */
    const int other = 1 - home;
    /* The other group reports holding its blocks: it gets the prompt. */
    worker_kv_events(other, 1, lo, 4);
    pump();
    assert_int_equal(kv_index_group_size(c->kv_index, other), 4);
    assert_int_equal(generate_where(2, toks, 64), other);
    Folio__V1__Response *sr;
    const Folio__V1__StatusReply *s = client_status(3, &sr);
    assert_int_equal(s->routed_by_cache, 1);
    assert_int_equal(s->routed_cached_blocks, 4);
    assert_int_equal(s->kv_index_entries, 4);
    assert_int_equal(s->kv_index_capacity, 1024);
    assert_int_equal(s->groups[other]->kv_index_blocks, 4);
    folio__v1__response__free_unpacked(sr, NULL);
    /* Its rank 0 registers again (a restart, or a new connection): the entries go. */
    worker_ready(other, 100, 256);
    worker_heartbeat(other, NULL, 0);
    pump();
    assert_true(c->groups->table[other].routable);
    assert_int_equal(kv_index_group_size(c->kv_index, other), 0);
    generate_where(4, toks, 64); /* held nowhere now: placed, not routed by the cache */
    s = client_status(5, &sr);
    assert_int_equal(s->routed_by_cache, 1);
    folio__v1__response__free_unpacked(sr, NULL);
    /* Reported again, then the group dies: the entries go with it. */
    worker_kv_events(other, 1, lo, 4);
    pump();
    assert_int_equal(kv_index_size(c->kv_index), 4);
    worker_send(other, WIRE_CMD_DISCONNECT, NULL);
    pump();
    assert_int_equal(kv_index_size(c->kv_index), 0);
    expect_nothing_more();
}

static void test_cache_aware_places_new_prefixes_by_census_counting_those_not_reported_yet(void **state)
{
    (void)state;
    coord_t *c = cache_aware_with_two_groups();
    int32_t p1[64], p2[64], p3[64];
    for (int i = 0; i < 64; i++) p1[i] = 3 + i, p3[i] = 200 + i;
    /* P1 lands somewhere; P2, new too and hashed to the same group, goes to the other one although
     * P1's blocks are not reported yet (P1 counts for where it went); P1 again, still unreported,
     * follows its placement. */
    const int g1 = generate_where(1, p1, 64);
    router_t *px = router_new(ROUTER_PREFIX, c->opts.load_factor, c->opts.load_floor, NULL);
    for (int g = 0; g < 2; g++) assert_int_equal(router_add_group(px, g, c->groups->g[g].name, NULL), 0);
    const block_hash_t salt = block_hash_salt("", 0);
    for (int base = 100;; base++) { /* a prompt whose consistent-hashing home is g1 */
        assert_true(base < 400);
        for (int i = 0; i < 64; i++) p2[i] = base + i;
        block_hash_t hh[4];
        const int nh = block_hash_prefix(salt, p2, 64, 16, hh, 4);
        const uint64_t key = router_key(hh, nh, c->opts.route_blocks, salt, p2, 64);
        router_group_t t[2] = {{.name = c->groups->g[0].name, .routable = true},
                               {.name = c->groups->g[1].name, .routable = true}};
        if (router_pick(px, key, t, 2, -1) == g1) break;
    }
    router_destroy(&px);
    const int g2 = generate_where(2, p2, 64);
    assert_int_equal(g2, 1 - g1);
    assert_int_equal(generate_where(3, p1, 64), g1);
    assert_int_equal(generate_where(4, p2, 64), g2);
    /* g1 reports P1 and P3's blocks, g2 P2's: a fourth new prefix goes to g2, holding one. */
    block_hash_t h[4];
    uint64_t lo[8];
    assert_int_equal(block_hash_prefix(block_hash_salt("", 0), p1, 64, 16, h, 4), 4);
    for (int i = 0; i < 4; i++) lo[i] = h[i].lo;
    assert_int_equal(block_hash_prefix(block_hash_salt("", 0), p3, 64, 16, h, 4), 4);
    for (int i = 0; i < 4; i++) lo[4 + i] = h[i].lo;
    worker_kv_events(g1, 1, lo, 8);
    assert_int_equal(block_hash_prefix(block_hash_salt("", 0), p2, 64, 16, h, 4), 4);
    for (int i = 0; i < 4; i++) lo[i] = h[i].lo;
    worker_kv_events(g2, 1, lo, 4);
    pump();
    assert_int_equal(generate_where(5, p3, 64), g1); /* held: the cache decides */
    int32_t p4[64];
    for (int i = 0; i < 64; i++) p4[i] = 300 + i;
    assert_int_equal(generate_where(6, p4, 64), g2);
    expect_nothing_more();
}

static void test_cache_aware_census_keeps_the_prefixes_routed_most_recently(void **state)
{
    (void)state;
    coord_t *c = cache_aware_with_two_groups();
    /* A hot prefix routed after each of 63 new ones (the census full), then one more new one: the
     * census drops the least recently routed, the first new one, not the hot one routed first. */
    int32_t hot[32], cold[32];
    for (int i = 0; i < 32; i++) hot[i] = 3 + i;
    uint64_t id = 1;
    generate_where(id++, hot, 32);
    for (int k = 0; k <= COORD_RECENT_PREFIXES - 1; k++) {
        for (int i = 0; i < 32; i++) cold[i] = 40 + (k * 7 + i) % 470;
        generate_where(id++, cold, 32);
        if (k < COORD_RECENT_PREFIXES - 1) generate_where(id++, hot, 32);
    }
    block_hash_t h[2];
    assert_int_equal(block_hash_prefix(block_hash_salt("", 0), hot, 32, 16, h, 2), 2);
    int found = 0;
    for (int i = 0; i < c->n_recent_prefixes; i++) found += c->recent_prefixes[i].key == h[1].lo;
    assert_int_equal(found, 1);
    assert_int_equal(c->n_recent_prefixes, COORD_RECENT_PREFIXES);
    /* A group whose cache is forgotten is no longer credited with what was sent there. */
    dispatch_forget_cache(c, 0);
    for (int i = 0; i < c->n_recent_prefixes; i++) assert_true(c->recent_prefixes[i].slot != 0);
    expect_nothing_more();
}

static void test_an_unreadable_or_oversized_body_is_answered_under_the_id_and_method_it_carries(void **state)
{
    (void)state;
    /* Over 8 MiB: not decoded, but its id and (unknown) method number are near the front. */
    const size_t big = (size_t)9 << 20;
    char *pad = malloc(big + 1);
    assert_non_null(pad);
    memset(pad, 'a', big);
    pad[big] = 0;
    Folio__V1__KeyValue kv = FOLIO__V1__KEY_VALUE__INIT, *kvs[1] = {&kv};
    kv.key = (char *)"pad";
    kv.value = pad;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = 41;
    q.method = (Folio__V1__Method)77;
    q.metadata = kvs;
    q.n_metadata = 1;
    client_send(&q, false);
    free(pad);
    Folio__V1__Response *r = expect_final(41, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED);
    assert_int_equal(r->method, 77);
    assert_int_equal(r->status->retry_after_ms, 0);
    folio__v1__response__free_unpacked(r, NULL);
    /* An unknown method in a body that decodes: echoed as sent. */
    q.n_metadata = 0;
    q.metadata = NULL;
    q.id = 42;
    q.method = (Folio__V1__Method)99;
    client_send(&q, false);
    r = expect_final(42, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT);
    assert_int_equal(r->method, 99);
    folio__v1__response__free_unpacked(r, NULL);
    /* No body frame at all. */
    assert_int_equal(zmq_send(F.client, WIRE_HEADER_CLIENT, strlen(WIRE_HEADER_CLIENT), ZMQ_SNDMORE), (int)strlen(WIRE_HEADER_CLIENT));
    const uint8_t cmd = WIRE_CMD_REQUEST;
    assert_int_equal(zmq_send(F.client, &cmd, 1, 0), 1);
    pump();
    r = expect_final(0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT);
    assert_non_null(strstr(r->status->message, "without a body frame"));
    folio__v1__response__free_unpacked(r, NULL);
    expect_nothing_more();
}

static void test_peek_reads_id_and_method_from_the_front_of_any_body(void **state)
{
    (void)state;
    uint64_t id;
    Folio__V1__Method method;
    /* version 1, id 300 (two bytes), method 5, a string field 5 "ab", then garbage */
    const uint8_t ok[] = {0x08, 0x01, 0x10, 0xac, 0x02, 0x18, 0x05, 0x2a, 0x02, 'a', 'b', 0xff};
    assert_true(wire_peek_request(ok, sizeof ok, &id, &method));
    assert_int_equal(id, 300);
    assert_int_equal(method, 5);
    /* a length that runs past the end stops the scan, keeping what was read */
    const uint8_t cut[] = {0x10, 0x07, 0x2a, 0x7f, 'a', 0x18, 0x02};
    assert_true(wire_peek_request(cut, sizeof cut, &id, &method));
    assert_int_equal(id, 7);
    assert_int_equal(method, 0);
    /* an 11-byte varint is no varint; fixed-width fields are skipped */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    assert_false(wire_peek_request(junk, sizeof junk, &id, &method));
    assert_int_equal(id, 0);
    const uint8_t fixed[] = {0x21, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3, 4, 0x10, 0x09};
    assert_true(wire_peek_request(fixed, sizeof fixed, &id, &method));
    assert_int_equal(id, 9);
    assert_false(wire_peek_request(NULL, 0, &id, &method));
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_partials_are_relayed_in_order_and_exactly_one_final_ends_the_stream),
        T(test_a_repeated_index_in_the_final_is_dropped_and_the_final_still_relayed),
        T(test_the_worker_request_is_its_own_and_the_client_message_stays_as_it_came),
        T(test_a_group_death_before_the_first_token_resubmits_to_another_group),
        T(test_with_no_migrate_a_group_death_after_the_first_token_ends_unavailable_keeping_the_tokens),
        T(test_a_group_death_after_the_first_token_moves_the_stream_on_to_another_group),
        T(test_a_moving_stream_no_group_can_take_ends_unavailable_keeping_the_tokens),
        T(test_a_moving_stream_with_no_group_left_ends_unavailable_keeping_the_tokens),
        T(test_a_streaming_request_its_group_lost_moves_on_and_one_past_its_deadline_ends_there),
        T(test_a_clients_own_resume_tokens_are_refused),
        T(test_a_request_the_heartbeat_no_longer_lists_is_failed_over),
        T(test_cancel_ends_with_the_workers_final_and_nothing_after),
        T(test_a_cancel_the_worker_never_confirms_ends_cancelled_after_two_heartbeats),
        T(test_a_deadline_ends_deadline_exceeded_and_cancels_on_the_worker),
        T(test_without_a_healthy_group_a_generate_ends_unavailable_at_once),
        T(test_shutdown_ends_every_request_unavailable_once),
        T(test_a_client_that_is_gone_has_its_requests_cancelled_on_the_worker),
        T(test_no_delta_reaches_the_client_after_the_cancels_reply),
        T(test_a_cancelled_request_that_had_finished_with_nothing_held_back_ends_as_it_ended),
        T(test_an_unstreamed_request_past_its_deadline_keeps_the_tokens_of_its_workers_final),
        T(test_a_worker_refusal_goes_to_another_group_then_to_the_client_with_its_hint),
        T(test_a_worker_error_final_without_a_result_gets_one_in_the_clients_terms),
        T(test_a_full_table_or_tenant_is_resource_exhausted_with_a_retry_hint),
        T(test_max_tokens_is_clamped_to_the_served_context_and_a_prompt_it_cannot_hold_is_refused),
        T(test_a_reused_live_id_is_refused_under_id_0_and_the_live_stream_goes_on),
        T(test_id_0_invalid_utf8_and_a_streamed_generate_from_a_req_socket_are_refused),
        T(test_spec_and_max_draft_are_checked_then_forwarded_and_status_shows_the_accepted_length),
        T(test_status_carries_each_groups_request_counts_and_latency_histograms),
        T(test_cache_aware_routes_to_reported_blocks_until_their_group_restarts_or_dies),
        T(test_cache_aware_places_new_prefixes_by_census_counting_those_not_reported_yet),
        T(test_cache_aware_census_keeps_the_prefixes_routed_most_recently),
        T(test_an_unreadable_or_oversized_body_is_answered_under_the_id_and_method_it_carries),
        T(test_peek_reads_id_and_method_from_the_front_of_any_body),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
