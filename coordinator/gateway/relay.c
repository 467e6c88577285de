/* relay.c - OpenAI requests through the coordinator; see relay.h.
 *
 * A request (relay_req_t) is one or more sub-requests, one Generate per prompt, each registered in
 * an id map under the client's request id. Replies are routed through the map, so the cost of an
 * event does not grow with the number of streams.
 *
 * The HTTP status is decided by the first replies, not before: a stream answers 200 only once
 * every prompt of it has had a first reply (tokens, or a FINAL), so a request the cluster refuses
 * at the door (full: 429, no group: 503, a bad field: 400) gets its own status and OpenAI's error
 * body rather than a 200 followed by an error event. Chunks made before that point wait in the
 * stream's buffer. After it, a failure becomes an error event (`data: {"error": ...}`) followed by
 * `data: [DONE]`, which the OpenAI clients raise as an APIError.
 *
 * Each sub-request checks the coordinator's promise that token indices come without gaps or
 * repeats; a break of it ends the request as an internal error rather than send a client a
 * duplicated or missing chunk. */
#include "relay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "clock.h"
#include "id_map.h"
#include "log.h"

#define RELAY_DEFAULT_MAX_BUFFERED (16u << 20)

typedef struct relay_sub {
    relay_req_t *q;
    int index;   /* the prompt's index: the choice's */
    uint64_t id; /* the coordinator request id; 0 once its FINAL came or it was cancelled */
    bool started, done;
    uint32_t next_index; /* tokens received */
    size_t text_bytes;   /* text received (completions' logprobs text_offset) */
    double sent_at, heard_at;
    folio_event_t final; /* unstreamed: the FINAL, all tokens in its delta */
    int finish_reason;
    uint32_t prompt_tokens, cached_tokens, completion_tokens;
} relay_sub_t;

struct relay_req {
    relay_t *r;
    void *owner;
    oai_request_t rq;
    char id[48];
    char model[256];
    oai_writer_t w;
    relay_sub_t *subs;
    int n_subs, n_started, n_done;
    relay_phase_t phase;
    /* RELAY_REPLY */
    int status, retry_after_s;
    char *body;
    /* RELAY_STREAM: SSE bytes not yet read, [off, len) of out */
    char *out;
    size_t off, len, cap;
    bool eof, failed;
    double wrote_at;
    relay_req_t *prev, *next; /* every request not finished */
};

struct relay {
    relay_opts_t o;
    id_map_t *ids;
    relay_req_t *head;
    uint64_t id_prefix, id_counter;
    relay_stats_t stats;
};

relay_t *relay_new(const relay_opts_t *o)
{
    relay_t *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->o = *o;
    if (!r->o.max_buffered) r->o.max_buffered = RELAY_DEFAULT_MAX_BUFFERED;
    if (!(r->ids = id_map_new())) {
        free(r);
        return NULL;
    }
    if (getrandom(&r->id_prefix, sizeof r->id_prefix, GRND_NONBLOCK) != sizeof r->id_prefix)
        r->id_prefix = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)r;
    return r;
}

void relay_destroy(relay_t **rp)
{
    if (!rp || !*rp) return;
    relay_t *r = *rp;
    while (r->head) {
        relay_req_t *q = r->head;
        relay_finish(&q, true);
    }
    id_map_destroy(&r->ids);
    free(r);
    *rp = NULL;
}

relay_stats_t relay_stats(const relay_t *r)
{
    relay_stats_t s = r ? r->stats : (relay_stats_t){0};
    if (r) s.live = id_map_size(r->ids);
    return s;
}

relay_phase_t relay_phase(const relay_req_t *q)
{
    return q->phase;
}

bool relay_live(const relay_req_t *q)
{
    return q->n_done < q->n_subs;
}

static void wake(relay_req_t *q)
{
    if (q->r->o.wake) q->r->o.wake(q->owner);
}

/* Stops sub s in the cluster (when live) and in the map. */
static void sub_cancel(relay_req_t *q, relay_sub_t *s)
{
    if (!s->id || s->done) return;
    id_map_take(q->r->ids, s->id);
    fl_error_t err = {0};
    if (folio_client_send_cancel(q->r->o.client, s->id, &err))
        fl_log_warn("gateway: cancel of request %llu not sent: %s", (unsigned long long)s->id, err.msg);
    else
        q->r->stats.cancels++;
    s->id = 0;
    s->done = true;
    q->n_done++;
}

static void cancel_live(relay_req_t *q)
{
    for (int i = 0; i < q->n_subs; i++) sub_cancel(q, &q->subs[i]);
}

/* ---- the stream buffer ---- */

static void out_append(relay_req_t *q, const char *a, size_t na, const char *b, size_t nb, const char *c, size_t nc)
{
    if (q->eof) return;
    if (q->off && q->off == q->len) q->off = q->len = 0;
    const size_t need = q->len + na + nb + nc;
    if (need > q->cap) {
        if (q->off > 0) { /* compact first */
            memmove(q->out, q->out + q->off, q->len - q->off);
            q->len -= q->off;
            q->off = 0;
        }
        size_t cap = q->cap ? q->cap : 4096;
        while (cap < q->len + na + nb + nc) cap *= 2;
        char *o = cap > q->cap ? realloc(q->out, cap) : q->out;
        if (!o) {
            fl_log_error("gateway: request %s: out of memory for its stream; ending it", q->id);
            q->failed = q->eof = true;
            cancel_live(q);
            return;
        }
        q->out = o;
        q->cap = cap > q->cap ? cap : q->cap;
    }
    memcpy(q->out + q->len, a, na);
    memcpy(q->out + q->len + na, b, nb);
    memcpy(q->out + q->len + na + nb, c, nc);
    q->len += na + nb + nc;
    q->wrote_at = fl_clock_s();
}

/* One SSE event, `data: JSON`, taking json (NULL: out of memory, nothing sent). */
static void out_data(relay_req_t *q, char *json)
{
    if (!json) return;
    out_append(q, "data: ", 6, json, strlen(json), "\n\n", 2);
    free(json);
    if (q->len - q->off > q->r->o.max_buffered && !q->eof) {
        fl_log_warn("gateway: request %s: the client left %zu bytes unread; ending its stream", q->id, q->len - q->off);
        cancel_live(q);
        q->failed = q->eof = true;
    }
}

static void out_done(relay_req_t *q)
{
    out_append(q, "data: [DONE]\n\n", 14, "", 0, "", 0);
    q->eof = true;
}

ssize_t relay_read(relay_req_t *q, char *buf, size_t max)
{
    const size_t have = q->len - q->off;
    if (have == 0) return q->eof ? -1 : 0;
    const size_t n = have < max ? have : max;
    memcpy(buf, q->out + q->off, n);
    q->off += n;
    return (ssize_t)n;
}

/* ---- answers ---- */

static void set_reply(relay_req_t *q, int status, char *body, int retry_after_s)
{
    free(q->body);
    q->body = body;
    q->status = body ? status : 500;
    q->retry_after_s = retry_after_s;
    q->phase = RELAY_REPLY;
    wake(q);
}

int relay_reply(const relay_req_t *q, const char **body, size_t *len, int *retry_after_s)
{
    static const char oom[] =
        "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
    *body = q->body ? q->body : oom;
    *len = strlen(*body);
    *retry_after_s = q->retry_after_s;
    return q->status;
}

static oai_usage_t usage_of(const relay_req_t *q)
{
    oai_usage_t u = {0};
    for (int i = 0; i < q->n_subs; i++) {
        u.prompt_tokens += q->subs[i].prompt_tokens;
        u.cached_tokens += q->subs[i].cached_tokens;
        u.completion_tokens += q->subs[i].completion_tokens;
    }
    return u;
}

/* The request ends in error e: its own status while nothing was sent, else an error event. */
static void fail(relay_req_t *q, const oai_error_t *e)
{
    cancel_live(q);
    if (q->phase == RELAY_WAITING || !q->rq.stream) {
        set_reply(q, e->http_status, oai_error_json(e), e->retry_after_s);
        return;
    }
    if (q->eof) return;
    out_data(q, oai_error_json(e));
    out_done(q);
    q->failed = true;
    wake(q);
}

static void reply_whole(relay_req_t *q)
{
    oai_choice_t *c = calloc((size_t)q->n_subs, sizeof *c);
    if (!c) {
        set_reply(q, 500, NULL, 0);
        return;
    }
    for (int i = 0; i < q->n_subs; i++) {
        const folio_event_t *f = &q->subs[i].final;
        c[i] = (oai_choice_t){.index = q->subs[i].index,
                              .text = f->text,
                              .tokens = f->tokens,
                              .n_tokens = f->n_tokens,
                              .logprobs = f->logprobs,
                              .n_logprobs = f->n_logprobs,
                              .finish_reason = q->subs[i].finish_reason};
    }
    const oai_usage_t u = usage_of(q);
    set_reply(q, 200, oai_response_json(&q->w, c, q->n_subs, &u), 0);
    free(c);
}

/* A delta of s as a chunk (nothing when it carries neither tokens nor text). */
static void stream_delta(relay_req_t *q, relay_sub_t *s, const folio_event_t *ev)
{
    if (ev->n_tokens == 0 && !*ev->text) return;
    const oai_choice_t c = {.index = s->index,
                            .text = ev->text,
                            .tokens = ev->tokens,
                            .n_tokens = ev->n_tokens,
                            .logprobs = ev->logprobs,
                            .n_logprobs = ev->n_logprobs,
                            .text_offset = s->text_bytes};
    out_data(q, oai_chunk_json(&q->w, &c, false));
    s->text_bytes += strlen(ev->text);
}

static void stream_end(relay_req_t *q)
{
    if (q->rq.include_usage) {
        const oai_usage_t u = usage_of(q);
        out_data(q, oai_usage_chunk_json(&q->w, &u));
    }
    out_done(q);
}

/* ---- events ---- */

static void sub_final_fields(relay_sub_t *s, const folio_event_t *ev)
{
    s->finish_reason = ev->finish_reason;
    s->prompt_tokens = ev->prompt_tokens;
    s->cached_tokens = ev->cached_prompt_tokens;
    s->completion_tokens = ev->completion_tokens;
}

static void on_stream_event(relay_req_t *q, relay_sub_t *s, folio_event_t *ev)
{
    const relay_phase_t was = q->phase;
    if (ev->final && ev->status != FOLIO__V1__STATUS_CODE__OK) {
        oai_error_t e;
        oai_error_from_status(ev->status, ev->raw && ev->raw->status ? ev->raw->status->retry_after_ms : 0, ev->message,
                              &e);
        /* Tokens already streamed stay valid; the request still ends in error. */
        if (q->phase != RELAY_WAITING) stream_delta(q, s, ev);
        fail(q, &e);
        return;
    }
    stream_delta(q, s, ev);
    if (ev->final) {
        sub_final_fields(s, ev);
        const oai_choice_t c = {.index = s->index, .finish_reason = ev->finish_reason};
        out_data(q, oai_chunk_json(&q->w, &c, false));
        if (q->n_done == q->n_subs) stream_end(q);
    }
    if (q->phase == RELAY_WAITING && q->n_started == q->n_subs && !q->failed) q->phase = RELAY_STREAM;
    if (q->phase == RELAY_STREAM && (was == RELAY_WAITING || q->len > q->off || q->eof)) wake(q);
}

static void on_whole_event(relay_req_t *q, relay_sub_t *s, folio_event_t *ev)
{
    if (!ev->final) return; /* unstreamed: everything comes in the FINAL */
    if (ev->status != FOLIO__V1__STATUS_CODE__OK) {
        oai_error_t e;
        oai_error_from_status(ev->status, ev->raw && ev->raw->status ? ev->raw->status->retry_after_ms : 0, ev->message,
                              &e);
        fail(q, &e);
        return;
    }
    sub_final_fields(s, ev);
    s->final = *ev; /* keeps the decoded reply: the choice's text and tokens point into it */
    memset(ev, 0, sizeof *ev);
    if (q->n_done == q->n_subs) reply_whole(q);
}

void relay_on_event(relay_t *r, folio_event_t *ev)
{
    relay_sub_t *s = ev->id ? id_map_get(r->ids, ev->id) : NULL;
    if (!s) {
        if (!ev->id && ev->final)
            fl_log_warn("gateway: the coordinator answered a request it could not read: %s", ev->message);
        folio_event_clear(ev);
        return;
    }
    relay_req_t *q = s->q;
    s->heard_at = fl_clock_s();
    if (!s->started) {
        s->started = true;
        q->n_started++;
    }
    if (ev->n_tokens > 0 && ev->index != s->next_index) {
        fl_log_error("gateway: request %s: tokens at index %u, expected %u (lost or repeated); ending it", q->id,
                     ev->index, s->next_index);
        oai_error_t e;
        oai_fail(&e, 500, "internal_error", "the cluster sent tokens out of order (index %u, expected %u)", ev->index,
                 s->next_index);
        if (ev->final) {
            id_map_take(r->ids, s->id);
            s->id = 0;
            s->done = true;
            q->n_done++;
        }
        fail(q, &e);
        folio_event_clear(ev);
        return;
    }
    s->next_index += (uint32_t)ev->n_tokens;
    if (ev->final) {
        id_map_take(r->ids, s->id);
        s->id = 0;
        s->done = true;
        q->n_done++;
    }
    if (q->phase == RELAY_REPLY || q->eof) { /* already answered (an error on another prompt) */
        folio_event_clear(ev);
        return;
    }
    if (q->rq.stream)
        on_stream_event(q, s, ev);
    else
        on_whole_event(q, s, ev);
    folio_event_clear(ev);
}

/* ---- lifetime ---- */

relay_req_t *relay_start(relay_t *r, oai_request_t *rq, const char *tenant, const char *model, void *owner,
                         oai_error_t *err)
{
    relay_req_t *q = calloc(1, sizeof *q);
    const int n = rq->kind == OAI_CHAT ? 1 : rq->n_prompts;
    if (!q || !(q->subs = calloc((size_t)n, sizeof *q->subs))) {
        free(q);
        oai_request_free(rq);
        oai_fail(err, 500, NULL, "out of memory");
        return NULL;
    }
    q->r = r;
    q->owner = owner;
    q->rq = *rq;
    memset(rq, 0, sizeof *rq);
    q->n_subs = n;
    snprintf(q->id, sizeof q->id, "%s-%016llx%08llx", q->rq.kind == OAI_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)r->id_prefix, (unsigned long long)(++r->id_counter & 0xffffffffu));
    snprintf(q->model, sizeof q->model, "%s", model ? model : "");
    q->w = (oai_writer_t){.rq = &q->rq,
                          .id = q->id,
                          .created = (long long)time(NULL),
                          .model = q->model,
                          .token_text = r->o.token_text,
                          .token_ctx = r->o.token_ctx};
    q->next = r->head;
    if (r->head) r->head->prev = q;
    r->head = q;
    if (q->rq.stream && q->rq.kind == OAI_CHAT) { /* chat streams open with the assistant's role */
        const oai_choice_t c = {.index = 0};
        out_data(q, oai_chunk_json(&q->w, &c, true));
    }
    const double now = fl_clock_s();
    for (int i = 0; i < n; i++) {
        relay_sub_t *s = &q->subs[i];
        s->q = q;
        s->index = i;
        s->sent_at = s->heard_at = now;
        folio_generate_params_t p;
        oai_request_params(&q->rq, i, tenant, &p);
        fl_error_t e = {0};
        const int rc = folio_client_send_generate(r->o.client, &p, &s->id, &e);
        if (!rc && id_map_put(r->ids, s->id, s)) {
            folio_client_send_cancel(r->o.client, s->id, NULL);
            s->id = 0;
            relay_finish(&q, false);
            oai_fail(err, 500, NULL, "out of memory");
            return NULL;
        }
        if (rc) {
            s->id = 0;
            relay_finish(&q, false);
            if (rc == FL_EINVAL)
                oai_fail(err, 400, NULL, "%s", e.msg);
            else
                oai_fail(err, 503, "unavailable", "cannot reach the coordinator: %s", e.msg);
            return NULL;
        }
        r->stats.requests++;
    }
    return q;
}

void relay_finish(relay_req_t **qp, bool client_gone)
{
    if (!qp || !*qp) return;
    relay_req_t *q = *qp;
    relay_t *r = q->r;
    if (client_gone && q->n_done < q->n_subs)
        fl_log_info("gateway: request %s: the client went away; cancelling it", q->id);
    cancel_live(q);
    for (int i = 0; i < q->n_subs; i++) folio_event_clear(&q->subs[i].final);
    if (q->prev)
        q->prev->next = q->next;
    else
        r->head = q->next;
    if (q->next) q->next->prev = q->prev;
    oai_request_free(&q->rq);
    free(q->subs);
    free(q->body);
    free(q->out);
    free(q);
    *qp = NULL;
}

int relay_fail_lost(relay_t *r, double sent_before, double quiet_since, const char *message)
{
    int n = 0;
    for (relay_req_t *q = r->head, *next; q; q = next) {
        next = q->next;
        if (q->phase == RELAY_REPLY || q->eof) continue;
        bool lost = false;
        for (int i = 0; i < q->n_subs && !lost; i++) {
            const relay_sub_t *s = &q->subs[i];
            lost = s->id && !s->done && s->sent_at < sent_before && s->heard_at < quiet_since;
        }
        if (!lost) continue;
        oai_error_t e;
        oai_fail(&e, 503, "unavailable", "%s", message);
        fail(q, &e);
        n++;
    }
    return n;
}

void relay_keepalive(relay_t *r, double now, double idle_s)
{
    for (relay_req_t *q = r->head; q; q = q->next) {
        if (q->phase != RELAY_STREAM || q->eof || now - q->wrote_at < idle_s) continue;
        out_append(q, ": keep-alive\n\n", 14, "", 0, "", 0);
        wake(q);
    }
}
