/* folio_client.c - libfolio-client: one DEALER connection to a coordinator; see folio_client.h.
 *
 * Requests go out as [FOLIOC1][REQUEST][Request] (proto/README.md) through wire_send, replies come
 * back through wire_recv and wire_decode_response, and a folio_event_t points into the decoded
 * Response until folio_event_clear(). The blocking calls (generate, status, health, drain) send one
 * request and wait for the final message with its id, skipping replies to other (earlier, abandoned)
 * requests; a final with id 0 is the coordinator saying it could not read the id of what we sent,
 * so a blocking call takes it as its own answer.
 *
 * A signal that interrupts a wait ends it with FL_EIO and errno EINTR (folio_client_recv and the
 * blocking calls alike), so a caller with a SIGINT handler can send a Cancel and go on waiting;
 * folio_client_generate instead asks its delta callback, which can have it cancel (and read on to
 * the final) or give up.
 * Nothing here prints: every failure is a return code with a message in fl_error_t.
 * Threading: a client (its context and socket) belongs to one thread at a time. */
#include "folio_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "curve.h"
#include "wire.h"

#define FOLIO_CLIENT_PROBE_MS 3000
#define FOLIO_CLIENT_PROBES   3

struct folio_client {
    void *zctx;
    void *sock;
    uint64_t next_id;
    uint64_t instance; /* the coordinator's, from the last Health reply; 0: not seen yet */
    bool curve;        /* CURVE keys were given: a silent coordinator may be refusing them */
    char endpoint[256];
};

static double now_ms(void) { return fl_clock_s() * 1e3; }

/* A key file: the one named, else the environment's, else NULL. */
static const char *path_or_env(const char *path, const char *env)
{
    if (path && *path) return path;
    const char *e = getenv(env);
    return e && *e ? e : NULL;
}

folio_client_t *folio_client_new(const char *endpoint, fl_error_t *err)
{
    const folio_client_opts_t o = {.endpoint = endpoint};
    return folio_client_new_opts(&o, err);
}

folio_client_t *folio_client_new_opts(const folio_client_opts_t *o, fl_error_t *err)
{
    const char *ep = wire_endpoint(o->endpoint, "FOLIO_COORDINATOR", WIRE_DEFAULT_CLIENT_ENDPOINT);
    const char *secret = path_or_env(o->curve_secret, CURVE_ENV_SECRET);
    const char *server_key = path_or_env(o->coordinator_key, CURVE_ENV_COORDINATOR_KEY);
    folio_client_t *c = calloc(1, sizeof *c);
    if (!c) {
        fl_fail(err, FL_ENOMEM, "folio client: out of memory");
        return NULL;
    }
    if (strlen(ep) >= sizeof c->endpoint) {
        fl_fail(err, FL_EINVAL, "coordinator endpoint '%.64s...' is too long", ep);
        free(c);
        return NULL;
    }
    strcpy(c->endpoint, ep);
    c->next_id = 1;
    if (!(c->zctx = zmq_ctx_new())) {
        fl_fail(err, FL_EIO, "zmq_ctx_new: %s", zmq_strerror(errno));
        free(c);
        return NULL;
    }
    if (!(c->sock = wire_socket(c->zctx, ZMQ_DEALER, NULL, err))) {
        folio_client_destroy(&c);
        return NULL;
    }
    c->curve = secret || server_key;
    if (c->curve && curve_client_setup_files(c->sock, secret, server_key, err)) {
        folio_client_destroy(&c);
        return NULL;
    }
    if (zmq_connect(c->sock, ep) != 0) {
        fl_fail(err, FL_EINVAL, "cannot connect to coordinator endpoint '%s': %s", ep, zmq_strerror(errno));
        folio_client_destroy(&c);
        return NULL;
    }
    return c;
}

void folio_client_destroy(folio_client_t **cp)
{
    if (!cp || !*cp) return;
    folio_client_t *c = *cp;
    if (c->sock) zmq_close(c->sock);
    if (c->zctx) zmq_ctx_term(c->zctx);
    free(c);
    *cp = NULL;
}

void *folio_client_socket(folio_client_t *c)
{
    return c ? c->sock : NULL;
}

/* The FL_E* code a non-OK reply status maps to. */
static int error_from_status(int code)
{
    switch (code) {
    case FOLIO__V1__STATUS_CODE__OK:
        return FL_OK;
    case FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT:
        return FL_EINVAL;
    case FOLIO__V1__STATUS_CODE__NOT_FOUND:
        return FL_ENOTFOUND;
    case FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED:
        return FL_ERANGE;
    case FOLIO__V1__STATUS_CODE__INTERNAL:
        return FL_EBACKEND;
    default:
        return FL_EIO; /* UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN */
    }
}

static int send_request(folio_client_t *c, Folio__V1__Request *req, uint64_t *id, fl_error_t *err)
{
    req->version = WIRE_VERSION;
    req->id = c->next_id;
    int rc = wire_send(c->sock, NULL, 0, false, WIRE_HEADER_CLIENT, WIRE_CMD_REQUEST, &req->base, err);
    if (rc) return rc;
    c->next_id++;
    if (id) *id = req->id;
    return FL_OK;
}

int folio_client_send_generate(folio_client_t *c, const folio_generate_params_t *p, uint64_t *id, fl_error_t *err)
{
    if (!c || !p) return fl_fail(err, FL_EINVAL, "folio_client_send_generate: NULL argument");
    const int forms = (p->text && *p->text) + (p->n_messages > 0) + (p->n_tokens > 0);
    if (forms != 1)
        return fl_fail(err, FL_EINVAL,
                       forms ? "generate: give exactly one of text, messages, tokens"
                             : "generate: empty prompt (text, messages or tokens)");
    if (p->max_tokens < 0 || p->top_k < 0 || p->n_stop < 0 || p->n_stop_ids < 0 || (p->n_stop && !p->stop) ||
        (p->n_stop_ids && !p->stop_ids) || (p->n_messages && !p->messages) || (p->n_tokens && !p->tokens))
        return fl_fail(err, FL_EINVAL, "generate: negative count or missing array in the parameters");

    Folio__V1__Request req;
    Folio__V1__GenerateRequest gen;
    Folio__V1__SamplingParams sp;
    folio__v1__request__init(&req);
    folio__v1__generate_request__init(&gen);
    folio__v1__sampling_params__init(&sp);
    Folio__V1__ChatMessage *msgs = NULL, **msg_ptrs = NULL;
    if (p->n_messages > 0) {
        msgs = calloc((size_t)p->n_messages, sizeof *msgs);
        msg_ptrs = calloc((size_t)p->n_messages, sizeof *msg_ptrs);
        if (!msgs || !msg_ptrs) {
            free(msgs);
            free(msg_ptrs);
            return fl_fail(err, FL_ENOMEM, "generate: out of memory");
        }
        for (int i = 0; i < p->n_messages; i++) {
            folio__v1__chat_message__init(&msgs[i]);
            msgs[i].role = (char *)(p->messages[i].role ? p->messages[i].role : "user");
            msgs[i].content = (char *)(p->messages[i].content ? p->messages[i].content : "");
            msg_ptrs[i] = &msgs[i];
        }
        gen.n_messages = (size_t)p->n_messages;
        gen.messages = msg_ptrs;
    }
    if (p->text && *p->text) gen.text = (char *)p->text;
    if (p->n_tokens > 0) {
        gen.n_prompt_tokens = (size_t)p->n_tokens;
        gen.prompt_tokens = (int32_t *)p->tokens;
    }
    if (p->sampling) {
        gen.sampling = (Folio__V1__SamplingParams *)p->sampling;
    } else {
        /* The flat fields keep their meaning from before SamplingParams had presence: each is sent
         * as set, so zeros ask for greedy decoding rather than the server's defaults. */
        sp._temperature_case = FOLIO__V1__SAMPLING_PARAMS___TEMPERATURE_TEMPERATURE;
        sp._top_k_case = FOLIO__V1__SAMPLING_PARAMS___TOP_K_TOP_K;
        sp._top_p_case = FOLIO__V1__SAMPLING_PARAMS___TOP_P_TOP_P;
        sp.temperature = p->temperature;
        sp.top_k = (uint32_t)p->top_k;
        sp.top_p = p->top_p > 0 && p->top_p < 1 ? p->top_p : 1.0f; /* 0 or 1: off */
        sp.seed = p->seed;
        gen.sampling = &sp;
    }
    gen.max_tokens = (uint32_t)p->max_tokens;
    gen.spec = (Folio__V1__SpecMode)p->spec;
    gen.max_draft = p->max_draft;
    gen.n_choices = p->n_choices > 0 ? (size_t)p->n_choices : 0;
    gen.choices = (char **)p->choices;
    if (p->regex) gen.regex = (char *)p->regex;
    if (p->json_schema) gen.json_schema = (char *)p->json_schema;
    gen.n_stop = (size_t)p->n_stop;
    gen.stop = (char **)p->stop;
    gen.n_stop_token_ids = (size_t)p->n_stop_ids;
    gen.stop_token_ids = (int32_t *)p->stop_ids;
    gen.stream = p->stream;
    gen.ignore_eos = p->ignore_eos;
    gen.no_migrate = p->no_migrate;
    gen.plain_text = p->plain_text;
    req.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    req.timeout_ms = p->timeout_ms;
    if (p->tenant) req.tenant = (char *)p->tenant;
    req.generate = &gen;
    int rc = send_request(c, &req, id, err);
    free(msgs);
    free(msg_ptrs);
    return rc;
}

/* Sends a Cancel of target_id; *id (may be NULL) is the Cancel's own id. */
static int send_cancel(folio_client_t *c, uint64_t target_id, uint64_t *id, fl_error_t *err)
{
    Folio__V1__Request req;
    Folio__V1__CancelRequest cancel;
    folio__v1__request__init(&req);
    folio__v1__cancel_request__init(&cancel);
    cancel.target_id = target_id;
    req.method = FOLIO__V1__METHOD__METHOD_CANCEL;
    req.cancel = &cancel;
    return send_request(c, &req, id, err);
}

int folio_client_send_cancel(folio_client_t *c, uint64_t target_id, fl_error_t *err)
{
    if (!c) return fl_fail(err, FL_EINVAL, "folio_client_send_cancel: NULL client");
    return send_cancel(c, target_id, NULL, err);
}

void folio_event_clear(folio_event_t *ev)
{
    if (!ev) return;
    if (ev->raw) folio__v1__response__free_unpacked(ev->raw, NULL);
    memset(ev, 0, sizeof *ev);
    ev->message = "";
    ev->text = "";
    ev->group = "";
}

/* Fills ev from a decoded response it takes ownership of. */
static void event_fill(folio_event_t *ev, Folio__V1__Response *r, bool final)
{
    memset(ev, 0, sizeof *ev);
    ev->raw = r;
    ev->id = r->id;
    ev->final = final;
    ev->status = r->status ? (int)r->status->code : FOLIO__V1__STATUS_CODE__OK;
    ev->message = r->status && r->status->message ? r->status->message : "";
    ev->text = "";
    ev->group = "";
    if (r->delta) {
        ev->index = r->delta->index;
        ev->tokens = r->delta->tokens;
        ev->n_tokens = (int)r->delta->n_tokens;
        ev->text = r->delta->text ? r->delta->text : "";
        ev->logprobs = r->delta->logprobs;
        ev->n_logprobs = (int)r->delta->n_logprobs;
    }
    if (r->result) {
        const Folio__V1__GenerateResult *g = r->result;
        ev->finish_reason = (int)g->finish_reason;
        if (g->usage) {
            ev->prompt_tokens = g->usage->prompt_tokens;
            ev->cached_prompt_tokens = g->usage->cached_prompt_tokens;
            ev->completion_tokens = g->usage->completion_tokens;
            ev->drafted_tokens = g->usage->drafted_tokens;
            ev->accepted_tokens = g->usage->accepted_tokens;
        }
        if (g->timings) {
            ev->queued_s = g->timings->queued_s;
            ev->first_token_s = g->timings->first_token_s;
            ev->total_s = g->timings->total_s;
        }
        ev->group = g->group ? g->group : "";
    }
}

int folio_client_recv(folio_client_t *c, folio_event_t *ev, int timeout_ms, fl_error_t *err)
{
    if (!c || !ev) return fl_fail(err, FL_EINVAL, "folio_client_recv: NULL argument");
    memset(ev, 0, sizeof *ev);
    ev->message = ev->text = ev->group = "";
    zmq_pollitem_t item = {.socket = c->sock, .events = ZMQ_POLLIN};
    const int n = zmq_poll(&item, 1, timeout_ms < 0 ? -1 : timeout_ms);
    if (n < 0) {
        const int e = errno;
        fl_fail(err, FL_EIO, "%s: zmq_poll: %s", c->endpoint, zmq_strerror(e));
        errno = e; /* EINTR: a signal arrived; the caller decides whether to go on */
        return FL_EIO;
    }
    if (n == 0) return 0;
    wire_msg_t m;
    int rc = wire_recv(c->sock, false, true, &m, err);
    if (rc == FL_EIO && errno == EAGAIN) return 0;
    if (rc) {
        wire_msg_close(&m);
        return rc;
    }
    rc = wire_check_header(&m, WIRE_HEADER_CLIENT, err);
    if (!rc && m.cmd != WIRE_CMD_PARTIAL && m.cmd != WIRE_CMD_FINAL)
        rc = fl_fail(err, FL_EFORMAT, "%s: unexpected command 0x%02x from the coordinator", c->endpoint, m.cmd);
    Folio__V1__Response *r = NULL;
    if (!rc && !(r = wire_decode_response(m.body, m.body_len, err))) rc = err ? err->code : FL_EFORMAT;
    if (!rc && r->delta && (r->delta->n_tokens > 0x7fffffff || r->delta->n_logprobs > 0x7fffffff)) {
        rc = fl_fail(err, FL_EFORMAT, "%s: delta of %zu tokens", c->endpoint, r->delta->n_tokens);
        folio__v1__response__free_unpacked(r, NULL);
    }
    if (!rc) event_fill(ev, r, m.cmd == WIRE_CMD_FINAL);
    wire_msg_close(&m);
    return rc ? rc : 1;
}

/* ---- blocking Generate ---- */

void folio_result_clear(folio_result_t *r)
{
    if (!r) return;
    free(r->tokens);
    free(r->text);
    free(r->logprobs);
    memset(r, 0, sizeof *r);
}

typedef struct result_buf {
    int cap_tokens, cap_logprobs;
    size_t len_text, cap_text;
} result_buf_t;

static folio_logprob_t logprob_copy(const Folio__V1__TokenLogprob *l)
{
    return l ? (folio_logprob_t){l->token, l->logprob} : (folio_logprob_t){0, 0};
}

/* Appends d's logprobs, which must come one per token in every delta or in none. */
static int result_append_logprobs(folio_result_t *out, result_buf_t *b, const folio_event_t *d, fl_error_t *err)
{
    const bool has = d->n_logprobs > 0, had = out->n_logprobs > 0;
    if ((has && d->n_logprobs != d->n_tokens) || (d->n_tokens > 0 && out->n_tokens > 0 && has != had))
        return fl_fail(err, FL_EFORMAT, "request %llu: %d logprobs for %d tokens at index %u (one per token, or none)",
                       (unsigned long long)d->id, d->n_logprobs, d->n_tokens, d->index);
    if (!d->n_logprobs) return FL_OK;
    if (out->n_logprobs + d->n_logprobs > b->cap_logprobs) {
        int cap = b->cap_logprobs ? b->cap_logprobs : 64;
        while (cap < out->n_logprobs + d->n_logprobs) cap *= 2;
        folio_token_logprobs_t *l = realloc(out->logprobs, (size_t)cap * sizeof *l);
        if (!l) return fl_fail(err, FL_ENOMEM, "generate: out of memory");
        out->logprobs = l;
        b->cap_logprobs = cap;
    }
    for (int i = 0; i < d->n_logprobs; i++) {
        const Folio__V1__TokenLogprobs *src = d->logprobs[i];
        folio_token_logprobs_t *dst = &out->logprobs[out->n_logprobs++];
        memset(dst, 0, sizeof *dst);
        if (!src) continue;
        dst->chosen = logprob_copy(src->chosen);
        for (size_t k = 0; k < src->n_top && k < FOLIO_MAX_TOP_LOGPROBS; k++)
            dst->top[dst->n_top++] = logprob_copy(src->top[k]);
    }
    return FL_OK;
}

static int result_append(folio_result_t *out, result_buf_t *b, const folio_event_t *d, fl_error_t *err)
{
    if (d->n_tokens > 0 && d->index != (uint32_t)out->n_tokens)
        return fl_fail(err, FL_EFORMAT, "request %llu: delta at index %u, expected %d (tokens lost or repeated)",
                       (unsigned long long)d->id, d->index, out->n_tokens);
    int rc = result_append_logprobs(out, b, d, err);
    if (rc) return rc;
    if (out->n_tokens + d->n_tokens > b->cap_tokens) {
        int cap = b->cap_tokens ? b->cap_tokens : 64;
        while (cap < out->n_tokens + d->n_tokens) cap *= 2;
        int32_t *t = realloc(out->tokens, (size_t)cap * sizeof *t);
        if (!t) return fl_fail(err, FL_ENOMEM, "generate: out of memory");
        out->tokens = t;
        b->cap_tokens = cap;
    }
    if (d->n_tokens > 0) memcpy(out->tokens + out->n_tokens, d->tokens, (size_t)d->n_tokens * sizeof(int32_t));
    out->n_tokens += d->n_tokens;
    const size_t tl = strlen(d->text);
    if (b->len_text + tl + 1 > b->cap_text) {
        size_t cap = b->cap_text ? b->cap_text : 256;
        while (cap < b->len_text + tl + 1) cap *= 2;
        char *s = realloc(out->text, cap);
        if (!s) return fl_fail(err, FL_ENOMEM, "generate: out of memory");
        out->text = s;
        b->cap_text = cap;
    }
    memcpy(out->text + b->len_text, d->text, tl);
    b->len_text += tl;
    out->text[b->len_text] = 0;
    return FL_OK;
}

static void result_finish(folio_result_t *out, const folio_event_t *ev)
{
    out->status = ev->status;
    snprintf(out->message, sizeof out->message, "%s", ev->message);
    out->finish_reason = ev->finish_reason;
    out->prompt_tokens = ev->prompt_tokens;
    out->cached_prompt_tokens = ev->cached_prompt_tokens;
    out->completion_tokens = ev->completion_tokens;
    out->drafted_tokens = ev->drafted_tokens;
    out->accepted_tokens = ev->accepted_tokens;
    out->queued_s = ev->queued_s;
    out->first_token_s = ev->first_token_s;
    out->total_s = ev->total_s;
    snprintf(out->group, sizeof out->group, "%s", ev->group);
}

int folio_client_generate(folio_client_t *c, const folio_generate_params_t *p, folio_delta_fn on_delta, void *user,
                          int timeout_ms, folio_result_t *out, fl_error_t *err)
{
    if (!out) return fl_fail(err, FL_EINVAL, "folio_client_generate: NULL result");
    memset(out, 0, sizeof *out);
    result_buf_t b = {0};
    if (!(out->text = calloc(1, 1))) return fl_fail(err, FL_ENOMEM, "generate: out of memory");
    b.cap_text = 1;
    uint64_t id = 0;
    int rc = folio_client_send_generate(c, p, &id, err);
    if (rc) return rc;
    out->id = id;
    /* A coordinator that restarted has forgotten the request and would leave this loop waiting
     * for ever: every FOLIO_CLIENT_PROBE_MS of silence a Health probe checks that it still answers
     * and is the same instance (as seen by the last folio_client_health). A probe can be lost with
     * the connection it was sent on, so it is repeated; FOLIO_CLIENT_PROBES unanswered in a row mean
     * the coordinator is gone. */
    double last_heard = now_ms(), last_alive = last_heard, probe_sent = 0, cancel_sent = 0;
    uint64_t first_probe = 0, last_probe = 0; /* ids of the unanswered probes, 0: none */
    uint64_t cancel_id = 0;                   /* our Cancel's own id (its reply is not a probe's) */
    int unanswered = 0;
    for (;;) {
        const double t = now_ms();
        int wait = FOLIO_CLIENT_PROBE_MS;
        if (timeout_ms >= 0 && last_heard + timeout_ms - t < wait) wait = (int)(last_heard + timeout_ms - t + 0.999);
        if (cancel_id && cancel_sent + FOLIO_CLIENT_CANCEL_WAIT_MS - t < wait)
            wait = (int)(cancel_sent + FOLIO_CLIENT_CANCEL_WAIT_MS - t + 0.999);
        if (wait < 0) wait = 0;
        folio_event_t ev;
        int action = FOLIO_CONTINUE;
        const int got = folio_client_recv(c, &ev, wait, err);
        if (got < 0 && !(errno == EINTR && on_delta)) return got;
        if (got < 0) { /* a signal: ask the caller whether to stop */
            const folio_event_t empty = {.id = id, .message = "", .text = "", .group = ""};
            action = on_delta(user, &empty);
        } else if (got == 0) {
            const double now = now_ms();
            if (timeout_ms >= 0 && now - last_heard >= timeout_ms)
                return fl_fail(err, FL_EIO, "%s: no reply to request %llu within %d ms", c->endpoint,
                               (unsigned long long)id, timeout_ms);
            if (cancel_id && now - cancel_sent >= FOLIO_CLIENT_CANCEL_WAIT_MS)
                return fl_fail(err, FL_EIO, "%s: request %llu did not end within %d ms of its Cancel", c->endpoint,
                               (unsigned long long)id, FOLIO_CLIENT_CANCEL_WAIT_MS);
            if (now - last_alive >= FOLIO_CLIENT_PROBE_MS && (!last_probe || now - probe_sent >= FOLIO_CLIENT_PROBE_MS)) {
                if (unanswered == FOLIO_CLIENT_PROBES)
                    return fl_fail(err, FL_EIO, "%s: the coordinator stopped answering (request %llu is lost)",
                                   c->endpoint, (unsigned long long)id);
                Folio__V1__Request h;
                folio__v1__request__init(&h);
                h.method = FOLIO__V1__METHOD__METHOD_HEALTH;
                if ((rc = send_request(c, &h, &last_probe, err))) return rc;
                if (!first_probe) first_probe = last_probe;
                probe_sent = now;
                unanswered++;
            }
            continue;
        } else if (first_probe && ev.id >= first_probe && ev.id <= last_probe && ev.id != cancel_id) {
            const uint64_t inst = ev.raw && ev.raw->health ? ev.raw->health->instance : 0;
            folio_event_clear(&ev);
            if (c->instance && inst != c->instance)
                return fl_fail(err, FL_EIO, "%s: the coordinator restarted (request %llu is lost)", c->endpoint,
                               (unsigned long long)id);
            c->instance = inst;
            first_probe = last_probe = 0;
            unanswered = 0;
            last_alive = now_ms();
            continue;
        } else if (ev.id != id && !(ev.final && ev.id == 0)) {
            folio_event_clear(&ev);
            continue;
        } else {
            last_heard = last_alive = now_ms();
            if (ev.n_tokens > 0 || *ev.text) {
                if ((rc = result_append(out, &b, &ev, err))) {
                    folio_event_clear(&ev);
                    send_cancel(c, id, NULL, NULL);
                    return rc;
                }
                if (on_delta) action = on_delta(user, &ev);
            }
            if (ev.final) {
                result_finish(out, &ev);
                folio_event_clear(&ev);
                return FL_OK;
            }
            folio_event_clear(&ev);
        }
        if (action != FOLIO_CONTINUE && !cancel_id) {
            if ((rc = send_cancel(c, id, &cancel_id, err))) return rc;
            cancel_sent = now_ms();
        }
        if (action == FOLIO_ABANDON)
            return fl_fail(err, FL_EIO, "%s: request %llu abandoned after its Cancel, before its final", c->endpoint,
                           (unsigned long long)id);
    }
}

/* ---- unary methods ---- */

/* Sends req and waits (timeout_ms in all, -1 forever) for its final reply. */
static int unary(folio_client_t *c, Folio__V1__Request *req, int timeout_ms, Folio__V1__Response **reply,
                 fl_error_t *err)
{
    if (reply) *reply = NULL;
    if (!c) return fl_fail(err, FL_EINVAL, "folio client: NULL client");
    uint64_t id = 0;
    int rc = send_request(c, req, &id, err);
    if (rc) return rc;
    const double deadline = now_ms() + timeout_ms;
    for (;;) {
        int wait = -1;
        if (timeout_ms >= 0) {
            const double left = deadline - now_ms();
            wait = left > 0 ? (int)(left + 0.999) : 0;
        }
        folio_event_t ev;
        const int got = folio_client_recv(c, &ev, wait, err);
        if (got < 0) return got;
        if (got == 0)
            return fl_fail(err, FL_EIO, "%s: no reply to %s within %d ms (is a coordinator running there%s)",
                           c->endpoint,
                           req->method == FOLIO__V1__METHOD__METHOD_HEALTH   ? "Health"
                           : req->method == FOLIO__V1__METHOD__METHOD_STATUS ? "Status"
                                                                             : "Drain",
                           timeout_ms,
                           c->curve ? ", with the public key --coordinator-key names, and does it list this "
                                      "client's key?"
                                    : "?");
        if (!ev.final || (ev.id != id && ev.id != 0)) {
            folio_event_clear(&ev);
            continue;
        }
        if (ev.status != FOLIO__V1__STATUS_CODE__OK) {
            rc = fl_fail(err, error_from_status(ev.status), "%s: %s", wire_status_name(ev.status),
                         *ev.message ? ev.message : "(no message)");
            folio_event_clear(&ev);
            return rc;
        }
        if (reply) {
            *reply = ev.raw;
            ev.raw = NULL;
        }
        folio_event_clear(&ev);
        return FL_OK;
    }
}

int folio_client_status(folio_client_t *c, int timeout_ms, Folio__V1__Response **reply, fl_error_t *err)
{
    Folio__V1__Request req;
    folio__v1__request__init(&req);
    req.method = FOLIO__V1__METHOD__METHOD_STATUS;
    int rc = unary(c, &req, timeout_ms, reply, err);
    if (!rc && reply && !(*reply)->cluster) {
        folio__v1__response__free_unpacked(*reply, NULL);
        *reply = NULL;
        return fl_fail(err, FL_EFORMAT, "%s: Status reply without a StatusReply", c->endpoint);
    }
    return rc;
}

int folio_client_health(folio_client_t *c, int timeout_ms, Folio__V1__Response **reply, fl_error_t *err)
{
    Folio__V1__Request req;
    folio__v1__request__init(&req);
    req.method = FOLIO__V1__METHOD__METHOD_HEALTH;
    Folio__V1__Response *own = NULL, **out = reply ? reply : &own;
    int rc = unary(c, &req, timeout_ms, out, err);
    if (!rc && !(*out)->health) {
        folio__v1__response__free_unpacked(*out, NULL);
        *out = NULL;
        return fl_fail(err, FL_EFORMAT, "%s: Health reply without a HealthReply", c->endpoint);
    }
    if (!rc) c->instance = (*out)->health->instance; /* what folio_client_generate checks against */
    if (own) folio__v1__response__free_unpacked(own, NULL);
    return rc;
}

int folio_client_drain(folio_client_t *c, const char *group, bool undrain, int timeout_ms, fl_error_t *err)
{
    if (!group || !*group) return fl_fail(err, FL_EINVAL, "drain: no group named");
    Folio__V1__Request req;
    Folio__V1__DrainRequest drain;
    folio__v1__request__init(&req);
    folio__v1__drain_request__init(&drain);
    drain.group = (char *)group;
    drain.undrain = undrain;
    req.method = FOLIO__V1__METHOD__METHOD_DRAIN;
    req.drain = &drain;
    return unary(c, &req, timeout_ms, NULL, err);
}
