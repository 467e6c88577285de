/* test_folio_client.c - libfolio-client against a scripted fake coordinator (a ROUTER on an ipc://
 * endpoint in a thread): framing, request ids, parameter encoding, stream reassembly, stray replies,
 * error statuses, malformed replies and timeouts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "folio_client.h"
#include "wire.h"

static char g_endpoint[128];
static pthread_t g_thread;
static volatile int g_stop;
/* what the fake saw, for the tests to check */
static uint64_t g_ids[64];
static int g_n_ids;
static int g_bad_header;

static void reply(void *s, const wire_msg_t *m, int cmd, Folio__V1__Response *r)
{
    r->version = WIRE_VERSION;
    r->final = cmd == WIRE_CMD_FINAL;
    wire_send(s, m->identity, m->identity_len, m->has_delimiter, WIRE_HEADER_CLIENT, cmd, &r->base, NULL);
}

static void send_delta(void *s, const wire_msg_t *m, uint64_t id, uint32_t index, int32_t *toks, size_t n,
                       const char *text)
{
    Folio__V1__Response r;
    Folio__V1__TokenDelta d;
    folio__v1__response__init(&r);
    folio__v1__token_delta__init(&d);
    d.index = index;
    d.tokens = toks;
    d.n_tokens = n;
    d.text = (char *)text;
    r.id = id;
    r.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    r.delta = &d;
    reply(s, m, WIRE_CMD_PARTIAL, &r);
}

static void send_final(void *s, const wire_msg_t *m, uint64_t id, int code, const char *msg)
{
    Folio__V1__Response r;
    Folio__V1__Status st;
    Folio__V1__GenerateResult res;
    Folio__V1__Usage u;
    Folio__V1__Timings t;
    folio__v1__response__init(&r);
    folio__v1__status__init(&st);
    folio__v1__generate_result__init(&res);
    folio__v1__usage__init(&u);
    folio__v1__timings__init(&t);
    st.code = code;
    st.message = (char *)msg;
    u.prompt_tokens = 7;
    u.cached_prompt_tokens = 4;
    u.completion_tokens = 3;
    t.first_token_s = 0.25;
    t.total_s = 0.5;
    res.finish_reason = code ? FOLIO__V1__FINISH_REASON__FINISH_ERROR : FOLIO__V1__FINISH_REASON__FINISH_STOP;
    res.usage = &u;
    res.timings = &t;
    res.group = "g1";
    r.id = id;
    r.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    r.status = &st;
    r.result = &res;
    reply(s, m, WIRE_CMD_FINAL, &r);
}

static void handle(void *s, const wire_msg_t *m)
{
    if (wire_check_header(m, WIRE_HEADER_CLIENT, NULL) || m->cmd != WIRE_CMD_REQUEST) {
        g_bad_header++;
        return;
    }
    Folio__V1__Request *q = wire_decode_request(m->body, m->body_len, NULL);
    if (!q) {
        g_bad_header++;
        return;
    }
    if (g_n_ids < 64) g_ids[g_n_ids++] = q->id;
    Folio__V1__Response r;
    folio__v1__response__init(&r);
    r.id = q->id;
    r.method = q->method;
    if (q->method == FOLIO__V1__METHOD__METHOD_HEALTH) {
        Folio__V1__HealthReply h;
        folio__v1__health_reply__init(&h);
        h.serving = 1;
        h.healthy_groups = 2;
        h.groups = 3;
        r.health = &h;
        reply(s, m, WIRE_CMD_FINAL, &r);
    } else if (q->method == FOLIO__V1__METHOD__METHOD_STATUS) {
        Folio__V1__StatusReply sr;
        folio__v1__status_reply__init(&sr);
        sr.policy = "prefix";
        sr.requests_total = 42;
        r.cluster = &sr;
        reply(s, m, WIRE_CMD_FINAL, &r);
    } else if (q->method == FOLIO__V1__METHOD__METHOD_DRAIN) {
        if (!strcmp(q->drain->group, "g0"))
            send_final(s, m, q->id, 0, "");
        else
            send_final(s, m, q->id, FOLIO__V1__STATUS_CODE__NOT_FOUND, "no group 'nope'");
    } else if (q->method == FOLIO__V1__METHOD__METHOD_GENERATE) {
        const Folio__V1__GenerateRequest *g = q->generate;
        const char *text = g->text;
        int32_t a[] = {1, 2}, b[] = {3};
        if (g->n_messages) {
            /* echo the encoding of the parameters */
            char buf[512];
            snprintf(buf, sizeof buf,
                     "%zu:%s:%s|max=%u|t=%.2f|k=%u|p=%.2f|seed=%llu|stops=%zu:%s|ids=%zu|stream=%d|eos=%d|"
                     "tenant=%s|timeout=%u",
                     g->n_messages, g->messages[0]->role, g->messages[g->n_messages - 1]->content, g->max_tokens,
                     g->sampling->temperature, g->sampling->top_k, g->sampling->top_p,
                     (unsigned long long)g->sampling->seed, g->n_stop, g->n_stop ? g->stop[0] : "", g->n_stop_token_ids,
                     g->stream, g->ignore_eos, q->tenant, q->timeout_ms);
            send_delta(s, m, q->id, 0, a, 1, buf);
            send_final(s, m, q->id, 0, "");
        } else if (!strcmp(text, "stream")) {
            send_delta(s, m, q->id + 100, 0, b, 1, "stray "); /* another id: must be skipped */
            send_delta(s, m, q->id, 0, a, 2, "ab");
            send_delta(s, m, q->id, 2, b, 1, "c");
            send_final(s, m, q->id, 0, "");
        } else if (!strcmp(text, "gap")) {
            send_delta(s, m, q->id, 0, a, 2, "ab");
            send_delta(s, m, q->id, 5, b, 1, "c");
        } else if (!strcmp(text, "unavailable")) {
            send_delta(s, m, q->id, 0, a, 2, "ab");
            send_final(s, m, q->id, FOLIO__V1__STATUS_CODE__UNAVAILABLE, "group g1 died");
        } else if (!strcmp(text, "garbage")) {
            const uint8_t cmd = WIRE_CMD_FINAL;
            zmq_send(s, m->identity, m->identity_len, ZMQ_SNDMORE);
            zmq_send(s, WIRE_HEADER_CLIENT, strlen(WIRE_HEADER_CLIENT), ZMQ_SNDMORE);
            zmq_send(s, &cmd, 1, ZMQ_SNDMORE);
            zmq_send(s, "\xff\xff\xff\xff", 4, 0);
        } else if (!strcmp(text, "v2")) {
            zmq_send(s, m->identity, m->identity_len, ZMQ_SNDMORE);
            zmq_send(s, "FOLIOC2", 7, ZMQ_SNDMORE);
            zmq_send(s, "\x03", 1, ZMQ_SNDMORE);
            zmq_send(s, "", 0, 0);
        } /* "silent": no answer */
    }
    folio__v1__request__free_unpacked(q, NULL);
}

static void *fake_coordinator(void *arg)
{
    void *ctx = arg;
    void *s = wire_socket(ctx, ZMQ_ROUTER, NULL, NULL);
    assert_non_null(s);
    assert_int_equal(zmq_bind(s, g_endpoint), 0);
    while (!g_stop) {
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 20) <= 0) continue;
        wire_msg_t m;
        if (wire_recv(s, true, true, &m, NULL) == 0) handle(s, &m);
        wire_msg_close(&m);
    }
    zmq_close(s);
    return NULL;
}

static void *g_ctx;

static int setup(void **state)
{
    snprintf(g_endpoint, sizeof g_endpoint, "ipc:///tmp/folio-test-client-%d.sock", (int)getpid());
    g_ctx = zmq_ctx_new();
    g_stop = 0;
    return pthread_create(&g_thread, NULL, fake_coordinator, g_ctx);
}

static int teardown(void **state)
{
    g_stop = 1;
    pthread_join(g_thread, NULL);
    zmq_ctx_term(g_ctx);
    char path[160];
    snprintf(path, sizeof path, "/tmp/folio-test-client-%d.sock", (int)getpid());
    unlink(path);
    return 0;
}

static folio_client_t *client(void)
{
    fl_error_t err = {0};
    folio_client_t *c = folio_client_new(g_endpoint, &err);
    assert_non_null(c);
    return c;
}

typedef struct deltas {
    char text[256];
    int calls;
} deltas_t;

static void on_delta(void *user, const folio_event_t *d)
{
    deltas_t *x = user;
    x->calls++;
    strncat(x->text, d->text, sizeof x->text - strlen(x->text) - 1);
}

static void stream_reassembled_in_order_and_stray_ids_skipped(void **state)
{
    folio_client_t *c = client();
    g_n_ids = 0;
    folio_generate_params_t p = {.text = "stream", .stream = true};
    folio_result_t r;
    deltas_t d = {0};
    fl_error_t err = {0};
    assert_int_equal(folio_client_generate(c, &p, on_delta, &d, 2000, &r, &err), 0);
    assert_int_equal(r.status, FOLIO__V1__STATUS_CODE__OK);
    assert_int_equal(r.n_tokens, 3);
    assert_int_equal(r.tokens[0], 1);
    assert_int_equal(r.tokens[2], 3);
    assert_string_equal(r.text, "abc");
    assert_string_equal(d.text, "abc");
    assert_int_equal(d.calls, 2);
    assert_int_equal(r.finish_reason, FOLIO__V1__FINISH_REASON__FINISH_STOP);
    assert_int_equal(r.prompt_tokens, 7);
    assert_int_equal(r.cached_prompt_tokens, 4);
    assert_int_equal(r.completion_tokens, 3);
    assert_true(r.first_token_s == 0.25 && r.total_s == 0.5);
    assert_string_equal(r.group, "g1");
    folio_result_clear(&r);
    /* ids increase from 1 on each connection */
    assert_int_equal(folio_client_generate(c, &p, NULL, NULL, 2000, &r, &err), 0);
    folio_result_clear(&r);
    assert_int_equal(g_n_ids, 2);
    assert_int_equal(g_ids[0], 1);
    assert_int_equal(g_ids[1], 2);
    assert_int_equal(g_bad_header, 0);
    folio_client_destroy(&c);
    assert_null(c);
}

static void parameters_are_encoded_as_given(void **state)
{
    folio_client_t *c = client();
    const folio_chat_message_t msgs[] = {{"system", "be brief"}, {"user", "hello"}};
    const char *stops[] = {"\n\n", "END"};
    const int32_t stop_ids[] = {2};
    folio_generate_params_t p = {.messages = msgs,
                                 .n_messages = 2,
                                 .max_tokens = 5,
                                 .temperature = 0.5f,
                                 .top_k = 40,
                                 .top_p = 0.9f,
                                 .seed = 1234,
                                 .stop = stops,
                                 .n_stop = 2,
                                 .stop_ids = stop_ids,
                                 .n_stop_ids = 1,
                                 .stream = true,
                                 .ignore_eos = true,
                                 .tenant = "acme",
                                 .timeout_ms = 3000};
    folio_result_t r;
    fl_error_t err = {0};
    assert_int_equal(folio_client_generate(c, &p, NULL, NULL, 2000, &r, &err), 0);
    assert_string_equal(r.text, "2:system:hello|max=5|t=0.50|k=40|p=0.90|seed=1234|stops=2:\n\n|ids=1|stream=1|eos=1|"
                                "tenant=acme|timeout=3000");
    folio_result_clear(&r);
    /* exactly one prompt form */
    folio_generate_params_t two = {.text = "x", .messages = msgs, .n_messages = 1};
    assert_int_equal(folio_client_generate(c, &two, NULL, NULL, 2000, &r, &err), FL_EINVAL);
    folio_result_clear(&r);
    folio_generate_params_t none = {0};
    assert_int_equal(folio_client_send_generate(c, &none, NULL, &err), FL_EINVAL);
    folio_client_destroy(&c);
}

static void non_ok_final_keeps_tokens_already_sent(void **state)
{
    folio_client_t *c = client();
    folio_generate_params_t p = {.text = "unavailable", .stream = true};
    folio_result_t r;
    fl_error_t err = {0};
    assert_int_equal(folio_client_generate(c, &p, NULL, NULL, 2000, &r, &err), 0);
    assert_int_equal(r.status, FOLIO__V1__STATUS_CODE__UNAVAILABLE);
    assert_string_equal(r.message, "group g1 died");
    assert_int_equal(r.n_tokens, 2);
    assert_string_equal(r.text, "ab");
    folio_result_clear(&r);
    folio_client_destroy(&c);
}

static void gaps_malformed_replies_and_silence_are_errors(void **state)
{
    folio_client_t *c = client();
    folio_result_t r;
    fl_error_t err = {0};
    folio_generate_params_t gap = {.text = "gap", .stream = true};
    assert_int_equal(folio_client_generate(c, &gap, NULL, NULL, 2000, &r, &err), FL_EFORMAT);
    assert_non_null(strstr(err.msg, "index 5"));
    folio_result_clear(&r);
    folio_generate_params_t garbage = {.text = "garbage"};
    assert_int_equal(folio_client_generate(c, &garbage, NULL, NULL, 2000, &r, &err), FL_EFORMAT);
    folio_result_clear(&r);
    folio_generate_params_t v2 = {.text = "v2"};
    assert_int_equal(folio_client_generate(c, &v2, NULL, NULL, 2000, &r, &err), FL_EUNSUPPORTED);
    folio_result_clear(&r);
    folio_generate_params_t silent = {.text = "silent"};
    assert_int_equal(folio_client_generate(c, &silent, NULL, NULL, 200, &r, &err), FL_EIO);
    assert_non_null(strstr(err.msg, "within 200 ms"));
    folio_result_clear(&r);
    /* the connection still works afterwards */
    Folio__V1__Response *h = NULL;
    assert_int_equal(folio_client_health(c, 2000, &h, &err), 0);
    folio__v1__response__free_unpacked(h, NULL);
    folio_client_destroy(&c);
}

static void unary_methods_return_replies_and_map_statuses(void **state)
{
    folio_client_t *c = client();
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    assert_int_equal(folio_client_health(c, 2000, &r, &err), 0);
    assert_true(r->health->serving);
    assert_int_equal(r->health->healthy_groups, 2);
    folio__v1__response__free_unpacked(r, NULL);
    assert_int_equal(folio_client_status(c, 2000, &r, &err), 0);
    assert_string_equal(r->cluster->policy, "prefix");
    assert_int_equal(r->cluster->requests_total, 42);
    folio__v1__response__free_unpacked(r, NULL);
    assert_int_equal(folio_client_drain(c, "g0", false, 2000, &err), 0);
    assert_int_equal(folio_client_drain(c, "nope", true, 2000, &err), FL_ENOTFOUND);
    assert_non_null(strstr(err.msg, "NOT_FOUND"));
    assert_non_null(strstr(err.msg, "no group 'nope'"));
    folio_client_destroy(&c);
}

static void async_requests_interleave_and_recv_times_out(void **state)
{
    folio_client_t *c = client();
    fl_error_t err = {0};
    folio_generate_params_t p = {.text = "stream", .stream = true};
    uint64_t a = 0, b = 0;
    assert_int_equal(folio_client_send_generate(c, &p, &a, &err), 0);
    assert_int_equal(folio_client_send_generate(c, &p, &b, &err), 0);
    assert_int_equal(b, a + 1);
    int finals = 0, events = 0;
    folio_event_t ev;
    while (finals < 2) {
        assert_int_equal(folio_client_recv(c, &ev, 2000, &err), 1);
        events++;
        if (ev.final) {
            finals++;
            assert_true(ev.id == a || ev.id == b);
            assert_string_equal(ev.group, "g1");
        }
        folio_event_clear(&ev);
    }
    assert_int_equal(events, 8); /* per request: a stray, two deltas, a final */
    assert_int_equal(folio_client_recv(c, &ev, 50, &err), 0);
    folio_client_destroy(&c);
}

static void unreachable_coordinator_times_out(void **state)
{
    fl_error_t err = {0};
    folio_client_t *c = folio_client_new("ipc:///tmp/folio-test-client-nobody.sock", &err);
    assert_non_null(c);
    Folio__V1__Response *r = NULL;
    assert_int_equal(folio_client_health(c, 100, &r, &err), FL_EIO);
    assert_null(r);
    folio_client_destroy(&c);
    assert_null(folio_client_new("nonsense://x", &err));
    assert_int_equal(err.code, FL_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(stream_reassembled_in_order_and_stray_ids_skipped),
        cmocka_unit_test(parameters_are_encoded_as_given),
        cmocka_unit_test(non_ok_final_keeps_tokens_already_sent),
        cmocka_unit_test(gaps_malformed_replies_and_silence_are_errors),
        cmocka_unit_test(unary_methods_return_replies_and_map_statuses),
        cmocka_unit_test(async_requests_interleave_and_recv_times_out),
        cmocka_unit_test(unreachable_coordinator_times_out),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
