/* test_gateway_relay.c - coordinator/gateway/relay.c and id_map.c: the coordinator's replies,
 * fed by hand, become the HTTP answer. A stream's status waits for its first reply (so a refusal
 * gets its own status, 429 with Retry-After), then chunks go out in order and the stream ends with
 * its finish, usage and [DONE]; an error after that is an error event; tokens out of order end the
 * request rather than reach the client; a batch's choices come in prompt order whatever order the
 * replies take; a client gone cancels what is live and later replies are dropped. The client
 * connection points at an endpoint nobody serves: what the relay sends just queues. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "id_map.h"
#include "relay.h"

typedef struct fixture {
    folio_client_t *client;
    relay_t *relay;
    int wakes;
} fixture_t;

static void on_wake(void *owner)
{
    ((fixture_t *)owner)->wakes++;
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof *f);
    char ep[128];
    snprintf(ep, sizeof ep, "ipc:///tmp/folio-test-gateway-relay-%d", (int)getpid());
    fl_error_t err = {0};
    if (!(f->client = folio_client_new(ep, &err))) fail_msg("folio_client_new: %s", err.msg);
    const relay_opts_t o = {.client = f->client, .wake = on_wake};
    f->relay = relay_new(&o);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    relay_destroy(&f->relay);
    folio_client_destroy(&f->client);
    free(f);
    return 0;
}

static relay_req_t *start(fixture_t *f, oai_kind_t kind, const char *body)
{
    oai_request_t rq;
    oai_error_t e;
    if (oai_request_parse(kind, body, strlen(body), &rq, &e)) fail_msg("parse %s: %s", body, e.message);
    relay_req_t *q = relay_start(f->relay, &rq, "", "tiny", f, &e);
    if (!q) fail_msg("relay_start: %s", e.message);
    return q;
}

/* A reply as folio_client_recv would give it (the decoded Response owned by the event). */
static void deliver(fixture_t *f, uint64_t id, bool final, int code, uint32_t retry_ms, uint32_t index,
                    const int32_t *toks, int n, const char *text, int finish, uint32_t completion)
{
    Folio__V1__Response r;
    Folio__V1__Status st;
    Folio__V1__TokenDelta d;
    Folio__V1__GenerateResult g;
    Folio__V1__Usage u;
    folio__v1__response__init(&r);
    folio__v1__status__init(&st);
    folio__v1__token_delta__init(&d);
    folio__v1__generate_result__init(&g);
    folio__v1__usage__init(&u);
    r.id = id;
    r.final = final;
    d.index = index;
    d.tokens = (int32_t *)toks;
    d.n_tokens = (size_t)n;
    d.text = (char *)(text ? text : "");
    r.delta = &d;
    if (final) {
        st.code = (Folio__V1__StatusCode)code;
        st.retry_after_ms = retry_ms;
        st.message = code ? "refused" : "";
        r.status = &st;
        u.prompt_tokens = 3;
        u.cached_prompt_tokens = 1;
        u.completion_tokens = completion;
        g.usage = &u;
        g.finish_reason = (Folio__V1__FinishReason)finish;
        r.result = &g;
    }
    uint8_t buf[4096];
    const size_t len = folio__v1__response__pack(&r, buf);
    Folio__V1__Response *raw = folio__v1__response__unpack(NULL, len, buf);
    assert_non_null(raw);
    folio_event_t ev = {.id = id,
                        .final = final,
                        .status = code,
                        .message = raw->status && raw->status->message ? raw->status->message : "",
                        .index = index,
                        .tokens = raw->delta->tokens,
                        .n_tokens = (int)raw->delta->n_tokens,
                        .text = raw->delta->text,
                        .finish_reason = finish,
                        .prompt_tokens = 3,
                        .cached_prompt_tokens = 1,
                        .completion_tokens = completion,
                        .group = "",
                        .raw = raw};
    relay_on_event(f->relay, &ev);
    assert_null(ev.raw); /* taken */
}

/* Every byte the stream has now, as text. */
static char *drain(relay_req_t *q, bool *ended)
{
    static char out[1 << 16];
    size_t n = 0;
    ssize_t got;
    while ((got = relay_read(q, out + n, 7)) > 0) n += (size_t)got; /* small reads: pieces join */
    out[n] = 0;
    *ended = got < 0;
    return out;
}

/* The JSON payloads of "data: " lines (not [DONE]), parsed; count in *n. */
static cJSON *events(const char *text, int *n, bool *done)
{
    cJSON *arr = cJSON_CreateArray();
    *done = false;
    for (const char *p = strstr(text, "data: "); p; p = strstr(p + 1, "\ndata: ")) {
        if (*p == '\n') p++;
        p += 6;
        if (!strncmp(p, "[DONE]", 6)) {
            *done = true;
            continue;
        }
        const char *end = strstr(p, "\n\n");
        cJSON *o = cJSON_ParseWithLength(p, (size_t)(end - p));
        assert_non_null(o);
        cJSON_AddItemToArray(arr, o);
    }
    *n = cJSON_GetArraySize(arr);
    return arr;
}

static void test_stream_answers_200_at_its_first_reply_and_ends_with_usage_and_done(void **state)
{
    fixture_t *f = *state;
    relay_req_t *q = start(f, OAI_CHAT,
                           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": true,"
                           "\"stream_options\": {\"include_usage\": true}, \"return_token_ids\": true}");
    assert_int_equal(relay_phase(q), RELAY_WAITING); /* no status before the cluster answers */
    assert_int_equal(f->wakes, 0);
    const int32_t t1[2] = {5, 6}, t2[1] = {7};
    deliver(f, 1, false, 0, 0, 0, t1, 2, "ab", 0, 0);
    assert_int_equal(relay_phase(q), RELAY_STREAM);
    assert_true(f->wakes > 0);
    assert_true(relay_live(q));
    deliver(f, 1, true, 0, 0, 2, t2, 1, "c", FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 3);
    assert_false(relay_live(q));
    bool ended;
    const char *text = drain(q, &ended);
    assert_true(ended);
    int n;
    bool done;
    cJSON *ev = events(text, &n, &done);
    assert_true(done);
    assert_int_equal(n, 5); /* role, "ab", "c", finish, usage */
    cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(ev, 0), "choices"), 0);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "delta"), "role")->valuestring, "assistant");
    char joined[64] = "";
    for (int i = 1; i <= 2; i++) {
        cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(ev, i), "choices"), 0);
        strcat(joined, cJSON_GetObjectItem(cJSON_GetObjectItem(c, "delta"), "content")->valuestring);
    }
    assert_string_equal(joined, "abc");
    cJSON *fin = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(ev, 3), "choices"), 0);
    assert_string_equal(cJSON_GetObjectItem(fin, "finish_reason")->valuestring, "length");
    cJSON *usage = cJSON_GetObjectItem(cJSON_GetArrayItem(ev, 4), "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 3);
    cJSON_Delete(ev);
    relay_finish(&q, false);
    assert_null(q);
    assert_int_equal(relay_stats(f->relay).cancels, 0);
}

static void test_refusal_before_the_first_token_gets_its_own_status(void **state)
{
    fixture_t *f = *state;
    relay_req_t *q = start(f, OAI_COMPLETION, "{\"prompt\": [\"a\", \"b\"], \"stream\": true}");
    deliver(f, 2, true, 8 /* RESOURCE_EXHAUSTED */, 1500, 0, NULL, 0, "", FOLIO__V1__FINISH_REASON__FINISH_ERROR, 0);
    assert_int_equal(relay_phase(q), RELAY_REPLY);
    const char *body;
    size_t len;
    int retry;
    assert_int_equal(relay_reply(q, &body, &len, &retry), 429);
    assert_int_equal(retry, 2);
    assert_non_null(strstr(body, "\"rate_limit_error\""));
    assert_int_equal(relay_stats(f->relay).cancels, 1); /* the other prompt */
    assert_false(relay_live(q));
    deliver(f, 1, false, 0, 0, 0, (const int32_t[]){1}, 1, "x", 0, 0); /* late: dropped */
    assert_int_equal(relay_phase(q), RELAY_REPLY);
    relay_finish(&q, false);
}

static void test_failure_after_the_first_token_is_an_error_event(void **state)
{
    fixture_t *f = *state;
    relay_req_t *q = start(f, OAI_COMPLETION, "{\"prompt\": \"a\", \"stream\": true}");
    deliver(f, 1, false, 0, 0, 0, (const int32_t[]){1, 2}, 2, "hi", 0, 0);
    deliver(f, 1, true, 14 /* UNAVAILABLE */, 0, 2, NULL, 0, "", FOLIO__V1__FINISH_REASON__FINISH_ERROR, 2);
    bool ended;
    const char *text = drain(q, &ended);
    assert_true(ended);
    int n;
    bool done;
    cJSON *ev = events(text, &n, &done);
    assert_true(done);
    assert_int_equal(n, 2);
    cJSON *err = cJSON_GetObjectItem(cJSON_GetArrayItem(ev, 1), "error");
    assert_non_null(err);
    assert_string_equal(cJSON_GetObjectItem(err, "code")->valuestring, "unavailable");
    cJSON_Delete(ev);
    relay_finish(&q, false);
}

static void test_tokens_out_of_order_end_the_request(void **state)
{
    fixture_t *f = *state;
    relay_req_t *q = start(f, OAI_COMPLETION, "{\"prompt\": \"a\", \"stream\": true}");
    deliver(f, 1, false, 0, 0, 0, (const int32_t[]){1, 2}, 2, "hi", 0, 0);
    deliver(f, 1, false, 0, 0, 1, (const int32_t[]){3}, 1, "x", 0, 0); /* index 1 again */
    bool ended;
    const char *text = drain(q, &ended);
    assert_true(ended);
    assert_non_null(strstr(text, "out of order"));
    assert_null(strstr(text, "\"x\""));                 /* the repeated token never reaches the client */
    assert_int_equal(relay_stats(f->relay).cancels, 1); /* and its generation is stopped */
    relay_finish(&q, false);
}

static void test_batch_choices_come_in_prompt_order(void **state)
{
    fixture_t *f = *state;
    relay_req_t *q = start(f, OAI_COMPLETION, "{\"prompt\": [\"a\", \"b\", \"c\"]}");
    deliver(f, 3, true, 0, 0, 0, (const int32_t[]){9}, 1, "C", FOLIO__V1__FINISH_REASON__FINISH_STOP, 1);
    deliver(f, 1, true, 0, 0, 0, (const int32_t[]){7}, 1, "A", FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 1);
    assert_int_equal(relay_phase(q), RELAY_WAITING);
    deliver(f, 2, true, 0, 0, 0, (const int32_t[]){8}, 1, "B", FOLIO__V1__FINISH_REASON__FINISH_LENGTH, 1);
    assert_int_equal(relay_phase(q), RELAY_REPLY);
    const char *body;
    size_t len;
    int retry;
    assert_int_equal(relay_reply(q, &body, &len, &retry), 200);
    cJSON *o = cJSON_Parse(body), *choices = cJSON_GetObjectItem(o, "choices");
    const char *want[3] = {"A", "B", "C"};
    for (int i = 0; i < 3; i++) {
        cJSON *c = cJSON_GetArrayItem(choices, i);
        assert_int_equal(cJSON_GetObjectItem(c, "index")->valueint, i);
        assert_string_equal(cJSON_GetObjectItem(c, "text")->valuestring, want[i]);
    }
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(choices, 2), "finish_reason")->valuestring, "stop");
    cJSON *u = cJSON_GetObjectItem(o, "usage");
    assert_int_equal(cJSON_GetObjectItem(u, "prompt_tokens")->valueint, 9);
    assert_int_equal(cJSON_GetObjectItem(u, "completion_tokens")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(u, "prompt_tokens_details"), "cached_tokens")->valueint,
                     3);
    cJSON_Delete(o);
    relay_finish(&q, false);
}

static void test_client_gone_cancels_what_is_live(void **state)
{
    fixture_t *f = *state;
    relay_req_t *q = start(f, OAI_COMPLETION, "{\"prompt\": [\"a\", \"b\"], \"stream\": true}");
    deliver(f, 1, false, 0, 0, 0, (const int32_t[]){1}, 1, "x", 0, 0);
    deliver(f, 2, true, 0, 0, 0, (const int32_t[]){1}, 1, "y", FOLIO__V1__FINISH_REASON__FINISH_STOP, 1);
    assert_int_equal(relay_stats(f->relay).live, 1);
    relay_finish(&q, true);
    assert_int_equal(relay_stats(f->relay).cancels, 1); /* only the live one */
    assert_int_equal(relay_stats(f->relay).live, 0);
    deliver(f, 1, false, 0, 0, 1, (const int32_t[]){2}, 1, "z", 0, 0); /* after: dropped */
    deliver(f, 1, true, 1, 0, 2, NULL, 0, "", FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, 2);
}

static void test_lost_requests_end_503_and_idle_streams_get_keepalives(void **state)
{
    fixture_t *f = *state;
    relay_req_t *a = start(f, OAI_COMPLETION, "{\"prompt\": \"a\"}");
    relay_req_t *b = start(f, OAI_COMPLETION, "{\"prompt\": \"b\", \"stream\": true}");
    deliver(f, 2, false, 0, 0, 0, (const int32_t[]){1}, 1, "x", 0, 0);
    bool ended;
    drain(b, &ended);
    relay_keepalive(f->relay, 1e12, 10);
    assert_non_null(strstr(drain(b, &ended), ": keep-alive\n\n"));
    assert_int_equal(relay_fail_lost(f->relay, 1e300, 1e300, "coordinator gone"), 2);
    const char *body;
    size_t len;
    int retry;
    assert_int_equal(relay_reply(a, &body, &len, &retry), 503);
    assert_non_null(strstr(body, "coordinator gone"));
    const char *text = drain(b, &ended);
    assert_true(ended);
    assert_non_null(strstr(text, "coordinator gone"));
    assert_non_null(strstr(text, "data: [DONE]"));
    relay_finish(&a, false);
    relay_finish(&b, false);
}

static void test_id_map_against_a_reference(void **state)
{
    (void)state;
    id_map_t *m = id_map_new();
    enum { N = 5000 };
    static int vals[N];
    static bool in[N];
    uint64_t x = 12345;
    for (int step = 0; step < 200000; step++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        const int k = (int)((x >> 33) % N);
        const uint64_t id = (uint64_t)k * 7919u + 1; /* spread, never 0 */
        if ((x >> 20) & 1) {
            assert_int_equal(id_map_put(m, id, &vals[k]), 0);
            in[k] = true;
        } else {
            assert_ptr_equal(id_map_take(m, id), in[k] ? &vals[k] : NULL);
            in[k] = false;
        }
        if (step % 997 == 0) {
            size_t n = 0;
            for (int i = 0; i < N; i++) {
                n += in[i];
                assert_ptr_equal(id_map_get(m, (uint64_t)i * 7919u + 1), in[i] ? &vals[i] : NULL);
            }
            assert_int_equal(id_map_size(m), n);
        }
    }
    assert_null(id_map_get(m, 0));
    assert_int_not_equal(id_map_put(m, 0, vals), 0);
    id_map_destroy(&m);
    assert_null(m);
    id_map_destroy(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_stream_answers_200_at_its_first_reply_and_ends_with_usage_and_done, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_refusal_before_the_first_token_gets_its_own_status, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failure_after_the_first_token_is_an_error_event, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tokens_out_of_order_end_the_request, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_choices_come_in_prompt_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_gone_cancels_what_is_live, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lost_requests_end_503_and_idle_streams_get_keepalives, setup, teardown),
        cmocka_unit_test(test_id_map_against_a_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
