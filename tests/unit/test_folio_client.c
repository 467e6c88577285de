/* test_folio_client.c - libfolio-client against a scripted fake coordinator (a ROUTER on an ipc://
 * endpoint in a thread): framing, request ids, parameter encoding (sampling with presence), stream
 * reassembly, logprobs, stray replies, error statuses, malformed replies, timeouts, and the delta
 * callback's cancel (by its return value, also when a signal interrupts the wait). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
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
static uint64_t g_cancel_target; /* the last Cancel's target_id */
static volatile int g_cancels;
/* the Generate waiting for a Cancel ("cancel-me", "silent"), answered CANCELLED when it comes */
static uint64_t g_pending;
static uint8_t g_pending_identity[256];
static size_t g_pending_identity_len;

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

/* A delta of n tokens with n_lp logprobs: each chosen (token, -0.5 * token), top: the token and 99. */
static void send_delta_logprobs(void *s, const wire_msg_t *m, uint64_t id, uint32_t index, int32_t *toks, size_t n,
                                size_t n_lp)
{
    Folio__V1__Response r;
    Folio__V1__TokenDelta d;
    Folio__V1__TokenLogprobs lps[4], *lp_ptrs[4];
    Folio__V1__TokenLogprob chosen[4], top[4][2], *top_ptrs[4][2];
    folio__v1__response__init(&r);
    folio__v1__token_delta__init(&d);
    for (size_t i = 0; i < n_lp && i < 4; i++) {
        folio__v1__token_logprobs__init(&lps[i]);
        folio__v1__token_logprob__init(&chosen[i]);
        chosen[i].token = toks[i];
        chosen[i].logprob = -0.5f * (float)toks[i];
        lps[i].chosen = &chosen[i];
        for (int k = 0; k < 2; k++) {
            folio__v1__token_logprob__init(&top[i][k]);
            top[i][k].token = k ? 99 : toks[i];
            top[i][k].logprob = k ? -9.0f : chosen[i].logprob;
            top_ptrs[i][k] = &top[i][k];
        }
        lps[i].top = top_ptrs[i];
        lps[i].n_top = 2;
        lp_ptrs[i] = &lps[i];
    }
    d.index = index;
    d.tokens = toks;
    d.n_tokens = n;
    d.text = "x";
    d.logprobs = lp_ptrs;
    d.n_logprobs = n_lp;
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
    res.finish_reason = code == FOLIO__V1__STATUS_CODE__CANCELLED ? FOLIO__V1__FINISH_REASON__FINISH_CANCELLED
                        : code                                    ? FOLIO__V1__FINISH_REASON__FINISH_ERROR
                                                                  : FOLIO__V1__FINISH_REASON__FINISH_STOP;
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
    } else if (q->method == FOLIO__V1__METHOD__METHOD_CANCEL) {
        g_cancels++;
        g_cancel_target = q->cancel->target_id;
        const bool live = g_pending && g_pending == q->cancel->target_id;
        /* the Cancel's own answer first: the client must not take it for the stream's end */
        send_final(s, m, q->id, live ? 0 : FOLIO__V1__STATUS_CODE__NOT_FOUND, live ? "" : "no such request");
        if (live) {
            wire_msg_t pm = *m;
            pm.identity = g_pending_identity;
            pm.identity_len = g_pending_identity_len;
            send_final(s, &pm, g_pending, FOLIO__V1__STATUS_CODE__CANCELLED, "cancelled");
            g_pending = 0;
        }
    } else if (q->method == FOLIO__V1__METHOD__METHOD_GENERATE) {
        const Folio__V1__GenerateRequest *g = q->generate;
        const char *text = g->text;
        int32_t a[] = {1, 2}, b[] = {3};
        if (g->n_messages || !strcmp(text, "echo")) {
            /* echo the encoding of the parameters */
            const Folio__V1__SamplingParams *sp = g->sampling;
            char buf[640];
            snprintf(buf, sizeof buf,
                     "%zu:%s:%s|max=%u|t=%d:%.2f|k=%d:%u|p=%d:%.2f|seed=%llu|min_p=%d:%.2f|logprobs=%d:%u|stops=%zu:%s|"
                     "ids=%zu|stream=%d|eos=%d|plain=%d|tenant=%s|timeout=%u",
                     g->n_messages, g->n_messages ? g->messages[0]->role : "",
                     g->n_messages ? g->messages[g->n_messages - 1]->content : text, g->max_tokens,
                     sp->_temperature_case != 0, sp->temperature, sp->_top_k_case != 0, sp->top_k, sp->_top_p_case != 0, sp->top_p,
                     (unsigned long long)sp->seed, sp->_min_p_case != 0, sp->min_p, sp->logprobs, sp->top_logprobs,
                     g->n_stop, g->n_stop ? g->stop[0] : "", g->n_stop_token_ids, g->stream, g->ignore_eos,
                     g->plain_text, q->tenant, q->timeout_ms);
            send_delta(s, m, q->id, 0, a, 1, buf);
            send_final(s, m, q->id, 0, "");
        } else if (!strcmp(text, "cancel-me") || !strcmp(text, "silent")) {
            if (!strcmp(text, "cancel-me")) send_delta(s, m, q->id, 0, a, 2, "ab");
            g_pending = q->id;
            g_pending_identity_len = m->identity_len < sizeof g_pending_identity ? m->identity_len : 0;
            memcpy(g_pending_identity, m->identity, g_pending_identity_len);
        } else if (!strcmp(text, "logprobs")) {
            int32_t t[] = {5, 6, 7};
            send_delta_logprobs(s, m, q->id, 0, t, 2, 2);
            send_delta_logprobs(s, m, q->id, 2, t + 2, 1, 1);
            send_final(s, m, q->id, 0, "");
        } else if (!strcmp(text, "logprobs-short")) {
            send_delta_logprobs(s, m, q->id, 0, a, 2, 1); /* 2 tokens, 1 logprob */
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
        }
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

static int on_delta(void *user, const folio_event_t *d)
{
    deltas_t *x = user;
    x->calls++;
    strncat(x->text, d->text, sizeof x->text - strlen(x->text) - 1);
    return FOLIO_CONTINUE;
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
    assert_string_equal(r.text, "2:system:hello|max=5|t=1:0.50|k=1:40|p=1:0.90|seed=1234|min_p=0:0.00|logprobs=0:0|"
                                "stops=2:\n\n|ids=1|stream=1|eos=1|plain=0|tenant=acme|timeout=3000");
    folio_result_clear(&r);
    /* a zeroed struct still means greedy: every flat field sent with presence, top-p 0 as 1 (off) */
    folio_generate_params_t zero = {.text = "echo", .plain_text = true};
    assert_int_equal(folio_client_generate(c, &zero, NULL, NULL, 2000, &r, &err), 0);
    assert_string_equal(r.text, "0::echo|max=0|t=1:0.00|k=1:0|p=1:1.00|seed=0|min_p=0:0.00|logprobs=0:0|stops=0:|ids=0|"
                                "stream=0|eos=0|plain=1|tenant=|timeout=0");
    folio_result_clear(&r);
    /* a SamplingParams of the caller's goes as is, each field with its own presence; the flat
     * fields are ignored */
    Folio__V1__SamplingParams sp;
    folio__v1__sampling_params__init(&sp);
    sp._temperature_case = FOLIO__V1__SAMPLING_PARAMS___TEMPERATURE_TEMPERATURE;
    sp.temperature = 0.7f;
    sp._min_p_case = FOLIO__V1__SAMPLING_PARAMS___MIN_P_MIN_P;
    sp.min_p = 0.05f;
    sp.seed = 9;
    sp.logprobs = true;
    sp.top_logprobs = 3;
    folio_generate_params_t own = {.text = "echo", .sampling = &sp, .temperature = 0.1f, .top_k = 5, .top_p = 0.5f};
    assert_int_equal(folio_client_generate(c, &own, NULL, NULL, 2000, &r, &err), 0);
    assert_string_equal(r.text, "0::echo|max=0|t=1:0.70|k=0:0|p=0:0.00|seed=9|min_p=1:0.05|logprobs=1:3|stops=0:|ids=0|"
                                "stream=0|eos=0|plain=0|tenant=|timeout=0");
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

static void logprobs_reach_events_and_are_copied_into_the_result(void **state)
{
    folio_client_t *c = client();
    folio_generate_params_t p = {.text = "logprobs", .stream = true};
    folio_result_t r;
    fl_error_t err = {0};
    assert_int_equal(folio_client_generate(c, &p, NULL, NULL, 2000, &r, &err), 0);
    assert_int_equal(r.n_tokens, 3);
    assert_int_equal(r.n_logprobs, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r.logprobs[i].chosen.token, 5 + i);
        assert_true(r.logprobs[i].chosen.logprob == -0.5f * (float)(5 + i));
        assert_int_equal(r.logprobs[i].n_top, 2);
        assert_int_equal(r.logprobs[i].top[0].token, 5 + i);
        assert_int_equal(r.logprobs[i].top[1].token, 99);
        assert_true(r.logprobs[i].top[1].logprob == -9.0f);
    }
    folio_result_clear(&r);
    assert_null(r.logprobs);
    /* events point into the message */
    uint64_t id = 0;
    assert_int_equal(folio_client_send_generate(c, &p, &id, &err), 0);
    folio_event_t ev;
    assert_int_equal(folio_client_recv(c, &ev, 2000, &err), 1);
    assert_int_equal(ev.n_tokens, 2);
    assert_int_equal(ev.n_logprobs, 2);
    assert_int_equal(ev.logprobs[1]->chosen->token, 6);
    assert_int_equal(ev.logprobs[1]->n_top, 2);
    folio_event_clear(&ev);
    for (int finals = 0; !finals;) {
        assert_int_equal(folio_client_recv(c, &ev, 2000, &err), 1);
        finals = ev.final;
        folio_event_clear(&ev);
    }
    /* logprobs for some of a delta's tokens only: malformed */
    folio_generate_params_t bad = {.text = "logprobs-short", .stream = true};
    assert_int_equal(folio_client_generate(c, &bad, NULL, NULL, 2000, &r, &err), FL_EFORMAT);
    assert_non_null(strstr(err.msg, "logprobs"));
    folio_result_clear(&r);
    folio_client_destroy(&c);
}

typedef struct stopper {
    int deltas, empties, action;
} stopper_t;

static int stop_at_first(void *user, const folio_event_t *d)
{
    stopper_t *x = user;
    if (d->n_tokens || *d->text) x->deltas++;
    else x->empties++;
    return x->action;
}

static void callback_stop_cancels_and_the_final_still_arrives(void **state)
{
    folio_client_t *c = client();
    folio_generate_params_t p = {.text = "cancel-me", .stream = true};
    folio_result_t r;
    fl_error_t err = {0};
    stopper_t x = {.action = true}; /* true is FOLIO_CANCEL */
    g_cancels = 0;
    assert_int_equal(folio_client_generate(c, &p, stop_at_first, &x, 2000, &r, &err), 0);
    assert_int_equal(x.deltas, 1);
    assert_int_equal(g_cancels, 1);
    assert_int_equal(g_cancel_target, r.id);
    /* exactly one final: the stream's own, not the Cancel's OK that came first */
    assert_int_equal(r.status, FOLIO__V1__STATUS_CODE__CANCELLED);
    assert_int_equal(r.finish_reason, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED);
    assert_int_equal(r.n_tokens, 2);
    assert_string_equal(r.text, "ab");
    folio_result_clear(&r);
    /* FOLIO_ABANDON: Cancel sent, no wait for the final */
    stopper_t y = {.action = FOLIO_ABANDON};
    assert_int_equal(folio_client_generate(c, &p, stop_at_first, &y, 2000, &r, &err), FL_EIO);
    assert_non_null(strstr(err.msg, "abandoned"));
    for (int i = 0; i < 200 && g_cancels < 2; i++) nanosleep(&(struct timespec){0, 10 * 1000000L}, NULL);
    assert_int_equal(g_cancels, 2);
    assert_int_equal(r.n_tokens, 2);
    folio_result_clear(&r);
    folio_client_destroy(&c);
}

static volatile sig_atomic_t g_signals;
static void on_signal(int sig)
{
    (void)sig;
    g_signals++;
}

typedef struct kicker {
    pthread_t target;
} kicker_t;

static void *kick_after_100ms(void *arg)
{
    const kicker_t *k = arg;
    struct timespec ts = {0, 100 * 1000000L};
    nanosleep(&ts, NULL);
    pthread_kill(k->target, SIGUSR1);
    return NULL;
}

/* Ctrl-C in folioctl: the handler sets a flag; the interrupted wait asks the callback, which cancels. */
static int stop_on_signal(void *user, const folio_event_t *d)
{
    stopper_t *x = user;
    if (!d->n_tokens && !*d->text) x->empties++;
    return g_signals ? FOLIO_CANCEL : FOLIO_CONTINUE;
}

static void a_signal_during_the_wait_asks_the_callback(void **state)
{
    folio_client_t *c = client();
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: the poll returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, &old);
    g_signals = 0;
    g_cancels = 0;
    kicker_t k = {pthread_self()};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, kick_after_100ms, &k), 0);
    folio_generate_params_t p = {.text = "silent", .stream = true};
    folio_result_t r;
    fl_error_t err = {0};
    stopper_t x = {0};
    assert_int_equal(folio_client_generate(c, &p, stop_on_signal, &x, 5000, &r, &err), 0);
    pthread_join(t, NULL);
    sigaction(SIGUSR1, &old, NULL);
    assert_int_equal(g_signals, 1);
    assert_int_equal(x.empties, 1);
    assert_int_equal(g_cancels, 1);
    assert_int_equal(r.status, FOLIO__V1__STATUS_CODE__CANCELLED);
    assert_int_equal(r.n_tokens, 0);
    folio_result_clear(&r);
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
        cmocka_unit_test(logprobs_reach_events_and_are_copied_into_the_result),
        cmocka_unit_test(callback_stop_cancels_and_the_final_still_arrives),
        cmocka_unit_test(a_signal_during_the_wait_asks_the_callback),
        cmocka_unit_test(unary_methods_return_replies_and_map_statuses),
        cmocka_unit_test(async_requests_interleave_and_recv_times_out),
        cmocka_unit_test(unreachable_coordinator_times_out),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
