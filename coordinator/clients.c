/* clients.c - the coordinator's client side: validates each client message, answers the unary
 * methods, tokenizes and routes Generate, and owns every send to a client.
 *
 * A client is known only by its ROUTER identity. Its Generate becomes a req_t (requests.h) that keeps
 * the decoded Request, so a request can be re-sent to another group on failover; the prompt is
 * tokenized once into a scratch buffer and copied into the entry. A send that fails with
 * EHOSTUNREACH means the client is gone: its requests are cancelled on their workers and forgotten.
 * Nothing here logs per request above debug level. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "coordinator.h"
#include "log.h"

/* Sends resp to a client. A client that is gone (EHOSTUNREACH) or so far behind that its queue of
 * tens of thousands of messages is full (EAGAIN) has every request cancelled and forgotten: a
 * dropped delta would leave a gap in its stream and a dropped FINAL a request without an end. */
static int send_to(coord_t *c, const uint8_t *client, size_t len, bool delimiter, const Folio__V1__Response *resp)
{
    fl_error_t err = {0};
    const int cmd = resp->final ? WIRE_CMD_FINAL : WIRE_CMD_PARTIAL;
    if (!wire_send(c->clients, client, len, delimiter, WIRE_HEADER_CLIENT, cmd, &resp->base, &err)) return FL_OK;
    if (errno == EAGAIN)
        fl_log_warn("client queue full id=%llu: cancelling its requests", (unsigned long long)resp->id);
    uint8_t copy[WIRE_MAX_IDENTITY];
    memcpy(copy, client, len);
    coord_client_gone(c, copy, len);
    return FL_EIO;
}

int coord_send_client(coord_t *c, req_t *e, const Folio__V1__Response *r)
{
    return send_to(c, e->client, e->client_len, e->delimiter, r);
}

static void reply_error(coord_t *c, const wire_msg_t *m, const uint8_t *client, size_t len, uint64_t id, int method,
                        Folio__V1__StatusCode code, const char *msg)
{
    wire_error_reply_t r;
    wire_error_reply_init(&r, id, (Folio__V1__Method)method, code, msg);
    fl_log_debug("client request rejected id=%llu code=%s msg=\"%s\"", (unsigned long long)id, wire_status_name(code),
                 msg);
    send_to(c, client, len, m->has_delimiter, &r.resp);
}

/* Sends resp (from wire_response_init) as a final OK reply. */
static void reply_ok(coord_t *c, const wire_msg_t *m, Folio__V1__Response *resp)
{
    Folio__V1__Status st = FOLIO__V1__STATUS__INIT;
    resp->status = &st;
    send_to(c, m->identity, m->identity_len, m->has_delimiter, resp);
    resp->status = NULL;
}

static void release(coord_t *c, req_t *e)
{
    if (e->group >= 0 && c->groups->table[e->group].inflight) c->groups->table[e->group].inflight--;
    e->group = -1;
    reqs_free(c->reqs, e);
}

void coord_client_gone(coord_t *c, const uint8_t *client, size_t len)
{
    int n = 0;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live || e->client_len != len || memcmp(e->client, client, len)) continue;
        coord_cancel_on_worker(c, e);
        release(c, e);
        n++;
    }
    fl_log_info("client gone requests_cancelled=%d", n);
}

void coord_finish_error(coord_t *c, req_t *e, Folio__V1__StatusCode code, Folio__V1__FinishReason reason,
                        const char *msg)
{
    wire_error_reply_t r;
    wire_error_reply_init(&r, e->client_id, FOLIO__V1__METHOD__METHOD_GENERATE, code, msg);
    Folio__V1__GenerateResult res = FOLIO__V1__GENERATE_RESULT__INIT;
    Folio__V1__Usage usage = FOLIO__V1__USAGE__INIT;
    usage.prompt_tokens = (uint32_t)e->n_tokens;
    usage.completion_tokens = e->tokens_sent;
    res.finish_reason = reason;
    res.usage = &usage;
    Folio__V1__Timings t = FOLIO__V1__TIMINGS__INIT;
    coord_fill_timings(e, &t, NULL, fl_clock_s());
    res.timings = &t;
    char group[GROUP_NAME_MAX + 1] = "";
    if (e->group >= 0) snprintf(group, sizeof group, "%s", c->groups->g[e->group].name);
    res.group = group;
    r.resp.result = &res;
    uint8_t client[WIRE_MAX_IDENTITY];
    const size_t len = e->client_len;
    const bool delim = e->delimiter;
    memcpy(client, e->client, len);
    fl_log_debug("request ended id=%llu code=%s msg=\"%s\"", (unsigned long long)e->client_id, wire_status_name(code),
                 msg);
    release(c, e);
    send_to(c, client, len, delim, &r.resp);
}

void coord_fill_timings(const req_t *e, Folio__V1__Timings *t, const Folio__V1__Timings *worker, double now)
{
    const double to_worker = e->t_dispatch > 0 ? e->t_dispatch - e->t_recv : 0;
    t->total_s = now - e->t_recv;
    t->queued_s = worker ? worker->queued_s + to_worker : 0;
    if (e->t_first_sent > 0)
        t->first_token_s = e->t_first_sent - e->t_recv;
    else
        t->first_token_s = worker && worker->first_token_s > 0 ? worker->first_token_s + to_worker : 0;
}

void coord_latency_add(coord_t *c, double s)
{
    c->latency[c->n_latency++ % COORD_LATENCY_SAMPLES] = s;
}

/* ---- Generate ---- */

/* The prefix-cache namespace of a tenant: the first name of a --share-cache list holding it, else
 * the tenant itself. Written NUL-terminated into ns (room for COORD_TENANT_MAX bytes). */
static void cache_tenant(const coord_t *c, const char *tenant, char *ns)
{
    const size_t tl = strlen(tenant);
    for (int i = 0; i < c->opts.n_share_cache; i++) {
        const char *list = c->opts.share_cache[i];
        for (const char *p = list; *p;) {
            const char *end = strchr(p, ',');
            const size_t len = end ? (size_t)(end - p) : strlen(p);
            if (len == tl && !memcmp(p, tenant, tl)) {
                const size_t first = strcspn(list, ",");
                snprintf(ns, COORD_TENANT_MAX, "%.*s", (int)first, list);
                return;
            }
            p += len + (end ? 1 : 0);
        }
    }
    snprintf(ns, COORD_TENANT_MAX, "%s", tenant);
}

static uint32_t remaining_ms(const req_t *e, double now)
{
    if (e->deadline <= 0) return 0;
    const double ms = ceil((e->deadline - now) * 1e3);
    return ms < 1 ? 1 : ms > 4e9 ? 4000000000u : (uint32_t)ms;
}

int coord_dispatch(coord_t *c, req_t *e, int exclude, double now)
{
    Folio__V1__Request *q = e->msg;
    const int bs = c->block_size ? (int)c->block_size : 16;
    char ns[COORD_TENANT_MAX];
    cache_tenant(c, q->tenant, ns);
    const block_hash_t salt = block_hash_salt(ns, strlen(ns));
    const int rb = c->opts.route_blocks;
    const long use = (long)rb * bs < e->n_tokens ? (long)rb * bs : e->n_tokens;
    const int nh = block_hash_prefix(salt, e->tokens, (int)use, bs, c->hash_buf, rb);
    const uint64_t key = router_key(c->hash_buf, nh, rb, salt, e->tokens, e->n_tokens);

    for (int attempt = 0; attempt < GROUPS_MAX; attempt++) {
        const int slot = router_pick(c->router, key, c->groups->table, c->groups->n, exclude);
        if (slot < 0) return FOLIO__V1__STATUS_CODE__UNAVAILABLE;
        reqs_set_wid(c->reqs, e, c->next_wid++);
        /* The worker gets the tokens only, under the coordinator's id, with the time left. */
        Folio__V1__GenerateRequest *g = q->generate;
        char *text = g->text;
        Folio__V1__ChatMessage **msgs = g->messages;
        const size_t n_msgs = g->n_messages, n_pt = g->n_prompt_tokens;
        int32_t *pt = g->prompt_tokens;
        const uint64_t id = q->id;
        const uint32_t timeout = q->timeout_ms;
        char *tenant = q->tenant;
        q->tenant = ns; /* the worker salts its cache with the namespace */
        g->text = (char *)"";
        g->messages = NULL;
        g->n_messages = 0;
        g->prompt_tokens = e->tokens;
        g->n_prompt_tokens = (size_t)e->n_tokens;
        q->id = e->wid;
        q->timeout_ms = remaining_ms(e, now);
        const group_member_t *w = &c->groups->g[slot].ranks[0];
        fl_error_t err = {0};
        const int rc = wire_send(c->workers, w->identity, w->identity_len, false, WIRE_HEADER_WORKER, WIRE_CMD_REQUEST,
                                 &q->base, &err);
        const int e_no = errno;
        g->text = text;
        g->messages = msgs;
        g->n_messages = n_msgs;
        g->prompt_tokens = pt;
        g->n_prompt_tokens = n_pt;
        q->id = id;
        q->timeout_ms = timeout;
        q->tenant = tenant;
        if (!rc) {
            e->group = slot;
            e->t_dispatch = fl_clock_s();
            c->groups->table[slot].inflight++;
            return 0;
        }
        if (e_no != EHOSTUNREACH) {
            fl_log_warn("worker queue full group=%s: %s", c->groups->g[slot].name, err.msg);
            return FOLIO__V1__STATUS_CODE__UNAVAILABLE;
        }
        coord_group_died(c, slot, "unreachable", now);
        if (!e->live) return FOLIO__V1__STATUS_CODE__UNAVAILABLE; /* its client went away meanwhile */
    }
    return FOLIO__V1__STATUS_CODE__UNAVAILABLE;
}

static int tokenize(coord_t *c, const Folio__V1__GenerateRequest *g, fl_error_t *err)
{
    if (g->n_messages) {
        tok_chat_msg_t stack[32], *msgs = stack;
        if (g->n_messages > 32 && !(msgs = malloc(g->n_messages * sizeof *msgs)))
            return fl_fail(err, FL_ENOMEM, "out of memory");
        for (size_t i = 0; i < g->n_messages; i++)
            msgs[i] = (tok_chat_msg_t){g->messages[i]->role, g->messages[i]->content};
        const int n =
            tok_encode_prompt(c->tok, NULL, 0, false, msgs, (int)g->n_messages, &c->tok_buf, &c->tok_cap, err);
        if (msgs != stack) free(msgs);
        return n;
    }
    return tok_encode_prompt(c->tok, g->text, strlen(g->text), g->plain_text, NULL, 0, &c->tok_buf, &c->tok_cap, err);
}

static void do_generate(coord_t *c, const wire_msg_t *m, Folio__V1__Request *q, double now)
{
    const uint64_t id = q->id;
    const int method = FOLIO__V1__METHOD__METHOD_GENERATE;
    char msg[600];
    if (reqs_count(c->reqs) >= c->opts.max_inflight) {
        snprintf(msg, sizeof msg, "too many requests in flight (%d)", c->opts.max_inflight);
        reply_error(c, m, m->identity, m->identity_len, id, method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, msg);
        goto out;
    }
    if (reqs_by_client(c->reqs, m->identity, m->identity_len, id)) {
        snprintf(msg, sizeof msg, "request id %llu is already in flight on this connection", (unsigned long long)id);
        reply_error(c, m, m->identity, m->identity_len, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg);
        goto out;
    }
    if (!groups_serving(c->groups)) {
        reply_error(c, m, m->identity, m->identity_len, id, method, FOLIO__V1__STATUS_CODE__UNAVAILABLE,
                    "no healthy worker group");
        goto out;
    }
    const Folio__V1__GenerateRequest *g = q->generate;
    int32_t *tokens;
    int n;
    bool owned = false;
    if (g->n_prompt_tokens) {
        for (size_t i = 0; i < g->n_prompt_tokens; i++)
            if (g->prompt_tokens[i] >= c->n_vocab) {
                snprintf(msg, sizeof msg, "generate: prompt_tokens[%zu] = %d is not below the vocabulary size %d", i,
                         g->prompt_tokens[i], c->n_vocab);
                reply_error(c, m, m->identity, m->identity_len, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                            msg);
                goto out;
            }
        tokens = g->prompt_tokens;
        n = (int)g->n_prompt_tokens;
    } else {
        fl_error_t err = {0};
        n = tokenize(c, g, &err);
        if (n < 0) {
            reply_error(c, m, m->identity, m->identity_len, id, method, wire_status_from_error(n), err.msg);
            goto out;
        }
        if (!(tokens = malloc((size_t)(n ? n : 1) * sizeof *tokens))) {
            reply_error(c, m, m->identity, m->identity_len, id, method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED,
                        "out of memory");
            goto out;
        }
        memcpy(tokens, c->tok_buf, (size_t)n * sizeof *tokens);
        owned = true;
    }
    /* No group could take it, and its forwarded form could outgrow what a worker decodes. */
    const uint32_t max_ctx = groups_max_context(c->groups);
    if (max_ctx && (uint32_t)n >= max_ctx) {
        snprintf(msg, sizeof msg, "prompt of %d tokens does not fit the context of %u tokens", n, max_ctx);
        reply_error(c, m, m->identity, m->identity_len, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg);
        if (owned) free(tokens);
        goto out;
    }
    req_t *e = reqs_alloc(c->reqs);
    e->client_id = id;
    memcpy(e->client, m->identity, m->identity_len);
    e->client_len = (uint8_t)m->identity_len;
    e->delimiter = m->has_delimiter;
    e->t_recv = now;
    e->deadline = q->timeout_ms ? now + q->timeout_ms * 1e-3 : 0;
    e->msg = q;
    e->tokens = tokens;
    e->n_tokens = n;
    e->tokens_owned = owned;
    reqs_bind_client(c->reqs, e);
    reqs_timer_update(c->reqs, e);
    c->requests_total++;
    const int rc = coord_dispatch(c, e, -1, now);
    if (rc) {
        if (e->live)
            coord_finish_error(c, e, (Folio__V1__StatusCode)rc, FOLIO__V1__FINISH_REASON__FINISH_ERROR,
                               "no healthy worker group could take the request");
        return;
    }
    e->route_s = fl_clock_s() - now;
    return;
out:
    folio__v1__request__free_unpacked(q, NULL);
}

/* ---- unary methods ---- */

static void do_cancel(coord_t *c, const wire_msg_t *m, const Folio__V1__Request *q, double now)
{
    req_t *e = reqs_by_client(c->reqs, m->identity, m->identity_len, q->cancel->target_id);
    if (!e) {
        char msg[128];
        snprintf(msg, sizeof msg, "no live request with id %llu on this connection",
                 (unsigned long long)q->cancel->target_id);
        reply_error(c, m, m->identity, m->identity_len, q->id, q->method, FOLIO__V1__STATUS_CODE__NOT_FOUND, msg);
        return;
    }
    if (!e->cancelling) {
        coord_cancel_on_worker(c, e);
        e->cancelling = true;
        e->cancel_deadline = now + 2 * c->hb_s;
        reqs_timer_update(c->reqs, e);
    }
    Folio__V1__Response r;
    wire_response_init(&r, q->id, q->method, true);
    reply_ok(c, m, &r);
}

static void do_drain(coord_t *c, const wire_msg_t *m, const Folio__V1__Request *q)
{
    const int slot = groups_find(c->groups, q->drain->group);
    if (slot < 0) {
        char msg[400];
        snprintf(msg, sizeof msg, "no group named '%s'", q->drain->group);
        reply_error(c, m, m->identity, m->identity_len, q->id, q->method, FOLIO__V1__STATUS_CODE__NOT_FOUND, msg);
        return;
    }
    groups_set_draining(c->groups, slot, !q->drain->undrain);
    fl_log_info("group %s group=%s inflight=%u", q->drain->undrain ? "undrained" : "draining", q->drain->group,
                c->groups->table[slot].inflight);
    Folio__V1__Response r;
    wire_response_init(&r, q->id, q->method, true);
    reply_ok(c, m, &r);
}

static void do_health(coord_t *c, const wire_msg_t *m, const Folio__V1__Request *q)
{
    Folio__V1__HealthReply h = FOLIO__V1__HEALTH_REPLY__INIT;
    h.serving = groups_serving(c->groups);
    h.healthy_groups = (uint32_t)groups_healthy_count(c->groups);
    h.groups = (uint32_t)c->groups->n;
    h.instance = c->instance;
    Folio__V1__Response r;
    wire_response_init(&r, q->id, q->method, true);
    r.health = &h;
    reply_ok(c, m, &r);
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void do_status(coord_t *c, const wire_msg_t *m, const Folio__V1__Request *q, double now)
{
    static Folio__V1__GroupStatus gs[GROUPS_MAX];
    static Folio__V1__GroupStatus *gp[GROUPS_MAX];
    static uint32_t ranks[GROUPS_MAX][GROUP_MAX_RANKS];
    static Folio__V1__WorkerLoad loads[GROUPS_MAX];
    static double lat[COORD_LATENCY_SAMPLES];
    const groups_t *G = c->groups;
    for (int i = 0; i < G->n; i++) {
        const group_t *g = &G->g[i];
        folio__v1__group_status__init(&gs[i]);
        gs[i].name = (char *)g->name;
        gs[i].tp_size = g->tp_size;
        size_t nr = 0;
        for (int r = 0; r < GROUP_MAX_RANKS; r++)
            if (g->ranks[r].present) ranks[i][nr++] = (uint32_t)r;
        gs[i].ranks = ranks[i];
        gs[i].n_ranks = nr;
        gs[i].healthy = g->healthy;
        gs[i].draining = g->draining;
        gs[i].model_id = (char *)g->model_id;
        if (g->have_load) {
            loads[i] = g->load;
            gs[i].load = &loads[i];
        }
        gs[i].inflight = G->table[i].inflight;
        gs[i].last_heartbeat_age_s = g->ranks[0].present ? now - g->ranks[0].last_seen : -1;
        gp[i] = &gs[i];
    }
    Folio__V1__StatusReply s = FOLIO__V1__STATUS_REPLY__INIT;
    s.groups = gp;
    s.n_groups = (size_t)G->n;
    s.policy = (char *)router_policy_name(router_policy(c->router));
    s.requests_total = c->requests_total;
    s.requests_inflight = (uint64_t)reqs_count(c->reqs);
    s.requests_failed_over = c->requests_failed_over;
    s.block_size = c->block_size;
    const size_t n = c->n_latency < COORD_LATENCY_SAMPLES ? (size_t)c->n_latency : COORD_LATENCY_SAMPLES;
    if (n) {
        memcpy(lat, c->latency, n * sizeof *lat);
        qsort(lat, n, sizeof *lat, cmp_double);
        s.route_p50_us = lat[(n - 1) / 2] * 1e6;
        s.route_p99_us = lat[(size_t)((double)(n - 1) * 0.99)] * 1e6;
    }
    Folio__V1__Response r;
    wire_response_init(&r, q->id, q->method, true);
    r.cluster = &s;
    reply_ok(c, m, &r);
}

/* The id and method of a body that decodes but fails validation, so the error reply names them. */
static void salvage(const wire_msg_t *m, uint64_t *id, int *method)
{
    *id = 0;
    *method = FOLIO__V1__METHOD__METHOD_UNSPECIFIED;
    if (m->body_len > WIRE_MAX_BODY_BYTES) return;
    Folio__V1__Request *r = folio__v1__request__unpack(NULL, m->body_len, m->body);
    if (!r) return;
    *id = r->id;
    if (r->method >= FOLIO__V1__METHOD__METHOD_GENERATE && r->method <= FOLIO__V1__METHOD__METHOD_DRAIN)
        *method = r->method;
    folio__v1__request__free_unpacked(r, NULL);
}

void coord_client_message(coord_t *c, wire_msg_t *m, double now)
{
    fl_error_t err = {0};
    if (!m->identity_len || m->identity_len > WIRE_MAX_IDENTITY) return;
    int rc = wire_check_header(m, WIRE_HEADER_CLIENT, &err);
    if (rc) {
        reply_error(c, m, m->identity, m->identity_len, 0, 0, wire_status_from_error(rc), err.msg);
        return;
    }
    if (m->cmd != WIRE_CMD_REQUEST) {
        char msg[96];
        snprintf(msg, sizeof msg, "unknown or unexpected command 0x%02x from a client (expected REQUEST 0x01)", m->cmd);
        reply_error(c, m, m->identity, m->identity_len, 0, 0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg);
        return;
    }
    Folio__V1__Request *q = wire_decode_request(m->body, m->body_len, &err);
    if (!q) {
        uint64_t id;
        int method;
        salvage(m, &id, &method);
        reply_error(c, m, m->identity, m->identity_len, id, method, wire_status_from_error(err.code), err.msg);
        return;
    }
    switch (q->method) {
    case FOLIO__V1__METHOD__METHOD_GENERATE:
        do_generate(c, m, q, now);
        return; /* takes q */
    case FOLIO__V1__METHOD__METHOD_CANCEL:
        do_cancel(c, m, q, now);
        break;
    case FOLIO__V1__METHOD__METHOD_DRAIN:
        do_drain(c, m, q);
        break;
    case FOLIO__V1__METHOD__METHOD_HEALTH:
        do_health(c, m, q);
        break;
    case FOLIO__V1__METHOD__METHOD_STATUS:
        do_status(c, m, q, now);
        break;
    default:
        reply_error(c, m, m->identity, m->identity_len, q->id, q->method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                    "unknown method");
    }
    folio__v1__request__free_unpacked(q, NULL);
}
