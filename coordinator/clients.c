/* clients.c - the coordinator's client socket: validates each client message, answers the unary
 * methods (Cancel, Drain, Health, Status), and admits Generate: tokenizes it, checks it can be
 * served, and hands it to dispatch.c, which owns its stream from there.
 *
 * A client (a connection) is known only by its ROUTER identity. Its Generate becomes a req_t
 * (requests.h) that keeps the decoded Request, so a request can be re-sent to another group on
 * failover; the prompt is tokenized once into a scratch buffer and copied into the entry. Replies go
 * out through dispatch_to_client(), which forgets a client that is gone. What is refused here, and
 * how (proto/README.md): a message whose id cannot be read is answered under id 0, as is one that
 * reuses the id of the connection's live Generate (that stream is never touched); a full table or a
 * tenant at its limit is RESOURCE_EXHAUSTED with a retry hint; a prompt no group's context holds
 * is RESOURCE_EXHAUSTED without one. Nothing here logs per request above debug level.
 *
 * With CURVE (auth.h) each message's key decides: its Request.tenant is replaced by the key's tenant
 * before anything reads it (a gateway key's is kept), Drain is PERMISSION_DENIED without an admin
 * key, and Status is the tenant's own view unless the key is admin or gateway. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator.h"
#include "dispatch.h"
#include "folio_fields.h"
#include "log.h"
#include "unicode.h"

static void reply_error(coord_t *c, const wire_msg_t *m, uint64_t id, int method, Folio__V1__StatusCode code,
                        const char *msg, double now)
{
    dispatch_refuse(c, m, id, method, code, 0, msg, now);
}

/* A proto3 string must be UTF-8; protobuf-c does not check. */
static bool utf8_valid(const char *s)
{
    const uint8_t *p = (const uint8_t *)s;
    for (size_t n = strlen(s); n;) {
        const int k = unicode_utf8_valid_prefix(p, n);
        if (k <= 0) return false;
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* INVALID_ARGUMENT's message for the first string of q that is not UTF-8, or NULL. */
static const char *invalid_string(const Folio__V1__Request *q, char *msg, size_t cap)
{
    const char *what = NULL;
    size_t at = 0;
    if (!utf8_valid(q->tenant)) what = "tenant";
    for (size_t i = 0; !what && i < q->n_metadata; i++)
        if (!utf8_valid(q->metadata[i]->key) || !utf8_valid(q->metadata[i]->value)) what = "metadata", at = i + 1;
    const Folio__V1__GenerateRequest *g = q->generate;
    if (!what && g && !utf8_valid(g->text)) what = "generate.text";
    for (size_t i = 0; !what && g && i < g->n_messages; i++)
        if (!utf8_valid(g->messages[i]->role) || !utf8_valid(g->messages[i]->content)) what = "generate.messages", at = i + 1;
    for (size_t i = 0; !what && g && i < g->n_stop; i++)
        if (!utf8_valid(g->stop[i])) what = "generate.stop", at = i + 1;
    if (!what && q->drain && !utf8_valid(q->drain->group)) what = "drain.group";
    if (!what) return NULL;
    if (at)
        snprintf(msg, cap, "%s[%zu] is not valid UTF-8 (a protobuf string must be)", what, at - 1);
    else
        snprintf(msg, cap, "%s is not valid UTF-8 (a protobuf string must be)", what);
    return msg;
}

/* With CURVE, the tenant a request runs as comes from its key (auth_tenant), never from the request:
 * q->tenant is replaced in place (protobuf-c allocates unpacked strings with malloc, and frees what
 * is not its empty default). False when out of memory. */
static bool set_tenant(Folio__V1__Request *q, const auth_peer_t *who)
{
    const char *t = auth_tenant(who, q->tenant);
    if (t == q->tenant || !strcmp(t, q->tenant)) return true;
    char *copy = *t ? strdup(t) : (char *)protobuf_c_empty_string;
    if (!copy) return false;
    if (q->tenant != protobuf_c_empty_string) free(q->tenant);
    q->tenant = copy;
    return true;
}

/* Sends resp (from wire_response_init) as a final OK reply. */
static void reply_ok(coord_t *c, const wire_msg_t *m, Folio__V1__Response *resp)
{
    Folio__V1__Status st = FOLIO__V1__STATUS__INIT;
    resp->status = &st;
    dispatch_to_client(c, m->identity, m->identity_len, m->has_delimiter, resp);
    resp->status = NULL;
}

/* ---- Generate ---- */

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
    if (m->has_delimiter && q->generate->stream) {
        /* A REQ socket takes one reply per request: the second message of a stream would be lost. */
        reply_error(c, m, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                    "a streamed Generate needs a DEALER socket: this one came REQ-style (an empty delimiter "
                    "frame), which takes one reply; send stream = false",
                    now);
        goto out;
    }
    if (reqs_count(c->reqs) >= c->opts.max_inflight) {
        snprintf(msg, sizeof msg, "too many requests in flight (%d, the coordinator's limit)", c->opts.max_inflight);
        dispatch_refuse(c, m, id, method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, dispatch_retry_after_ms(c, now),
                        msg, now);
        goto out;
    }
    const int per_tenant = c->opts.max_inflight_per_tenant;
    if (per_tenant && reqs_tenant_count(c->reqs, q->tenant) >= per_tenant) {
        snprintf(msg, sizeof msg, "tenant '%.256s' has %d requests in flight (the limit per tenant)", q->tenant,
                 per_tenant);
        dispatch_refuse(c, m, id, method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, dispatch_retry_after_ms(c, now),
                        msg, now);
        goto out;
    }
    if (!groups_serving(c->groups)) {
        reply_error(c, m, id, method, FOLIO__V1__STATUS_CODE__UNAVAILABLE, "no healthy worker group", now);
        goto out;
    }
    const Folio__V1__GenerateRequest *g = q->generate;
    if (g->n_resume_tokens || g->resume_text_bytes) {
        reply_error(c, m, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                    "generate.resume_tokens and resume_text_bytes are the coordinator's own (it sets them on a request "
                    "it moves to another group)",
                    now);
        goto out;
    }
    /* else a client could point a worker anywhere */
    if (*g->kv_pull_endpoint || g->kv_pull_blocks || *g->kv_pull_key) {
        reply_error(c, m, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                    "generate.kv_pull_endpoint, kv_pull_blocks and kv_pull_key are the coordinator's own (it names a "
                    "group to pull prompt blocks from)",
                    now);
        goto out;
    }
    int32_t *tokens;
    int n;
    bool owned = false;
    if (g->n_prompt_tokens) {
        for (size_t i = 0; i < g->n_prompt_tokens; i++)
            if (g->prompt_tokens[i] >= c->n_vocab) {
                snprintf(msg, sizeof msg, "generate: prompt_tokens[%zu] = %d is not below the vocabulary size %d", i,
                         g->prompt_tokens[i], c->n_vocab);
                reply_error(c, m, id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg, now);
                goto out;
            }
        tokens = g->prompt_tokens;
        n = (int)g->n_prompt_tokens;
    } else {
        fl_error_t err = {0};
        n = tokenize(c, g, &err);
        if (n < 0) {
            reply_error(c, m, id, method, wire_status_from_error(n), err.msg, now);
            goto out;
        }
        if (!(tokens = malloc((size_t)(n ? n : 1) * sizeof *tokens))) {
            dispatch_refuse(c, m, id, method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED,
                            dispatch_retry_after_ms(c, now), "out of memory", now);
            goto out;
        }
        memcpy(tokens, c->tok_buf, (size_t)n * sizeof *tokens);
        owned = true;
    }
    /* No group could take it, and its forwarded form could outgrow what a worker decodes. A group's
     * context is the smaller of its model's and its KV cache's: a prompt that fits leaves room for
     * at least one token (max_tokens is clamped to the rest, dispatch.c). */
    const uint32_t max_ctx = groups_max_context(c->groups);
    if (max_ctx && (uint32_t)n >= max_ctx) {
        snprintf(msg, sizeof msg,
                 "prompt of %d tokens does not fit the context of %u tokens (the longest a group serves: its "
                 "model's context or its KV cache, whichever is smaller)",
                 n, max_ctx);
        reply_error(c, m, id, method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, msg, now);
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
    reqs_bind_tenant(c->reqs, e, q->tenant);
    reqs_timer_update(c->reqs, e);
    c->requests_total++;
    dispatch_submit(c, e, now);
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
        reply_error(c, m, q->id, q->method, FOLIO__V1__STATUS_CODE__NOT_FOUND, msg, now);
        return;
    }
    dispatch_cancel(c, e, now);
    Folio__V1__Response r;
    wire_response_init(&r, q->id, q->method, true);
    reply_ok(c, m, &r);
}

static void do_drain(coord_t *c, const wire_msg_t *m, const Folio__V1__Request *q, const auth_peer_t *who, double now)
{
    if (c->auth && !(who->roles & AUTH_ROLE_ADMIN)) {
        reply_error(c, m, q->id, q->method, FOLIO__V1__STATUS_CODE__PERMISSION_DENIED,
                    "drain and undrain need a client key with the admin role (--client-keys)", now);
        return;
    }
    const int slot = groups_find(c->groups, q->drain->group);
    if (slot < 0) {
        char msg[400];
        snprintf(msg, sizeof msg, "no group named '%s'", q->drain->group);
        reply_error(c, m, q->id, q->method, FOLIO__V1__STATUS_CODE__NOT_FOUND, msg, now);
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

static void do_status(coord_t *c, const wire_msg_t *m, const Folio__V1__Request *q, const auth_peer_t *who, double now)
{
    /* A tenant's view (a CURVE key neither admin nor gateway): the groups and their load, not the
     * figures of every tenant's requests. */
    const bool tenant_view = c->auth && !(who->roles & (AUTH_ROLE_ADMIN | AUTH_ROLE_GATEWAY));
    Folio__V1__GroupStatus *gs = c->status.groups, **gp = c->status.group_ptrs;
    Folio__V1__WorkerLoad *loads = c->status.loads;
    uint32_t(*ranks)[GROUP_MAX_RANKS] = c->status.ranks;
    double *lat = c->status.latency;
    const groups_t *G = c->groups;
    for (int i = 0; i < G->n; i++) {
        const group_t *g = &G->g[i];
        folio__v1__group_status__init(&gs[i]);
        gs[i].name = (char *)g->name;
        gs[i].tp_size = g->tp_size;
        size_t nr = 0;
        for (int r = 0; r < GROUP_MAX_RANKS; r++) {
            if (!g->ranks[r].present) continue;
            Folio__V1__RankStatus *rs = &c->status.rank_status[i][nr];
            folio__v1__rank_status__init(rs);
            rs->rank = (uint32_t)r;
            rs->epoch = g->ranks[r].epoch;
            rs->restarts = g->ranks[r].restarts;
            rs->last_heard_age_s = now - g->ranks[r].last_seen;
            c->status.rank_ptrs[i][nr] = rs;
            ranks[i][nr++] = (uint32_t)r;
        }
        gs[i].ranks = ranks[i];
        gs[i].n_ranks = nr;
        gs[i].rank_status = c->status.rank_ptrs[i];
        gs[i].n_rank_status = nr;
        gs[i].healthy = g->healthy;
        gs[i].draining = g->draining;
        gs[i].restarts = g->restarts;
        gs[i].model_id = (char *)g->model_id;
        gs[i].kv_type = (char *)g->kv_type;
        gs[i].kv_bytes_per_token = g->kv_bytes_per_token;
        gs[i].kv_capacity_tokens = (uint64_t)g->kv_blocks * g->block_size;
        gs[i].kv_pulled_blocks = g->load.kv_pulled_blocks;
        gs[i].kv_pull_failures = g->load.kv_pull_failures;
        gs[i].kv_served_blocks = g->load.kv_served_blocks;
        gs[i].kv_pull_seconds = g->load.kv_pull_seconds;
        gs[i].kv_peer_endpoint = (char *)g->kv_peer;
        if (g->have_load) {
            loads[i] = g->load;
            gs[i].load = &loads[i];
            gs[i].mean_accepted_length = folio_mean_accepted_length(&loads[i]);
        }
        gs[i].inflight = G->table[i].inflight;
        gs[i].last_heartbeat_age_s = g->ranks[0].present ? now - g->ranks[0].last_seen : -1;
        gs[i].kv_index_blocks = kv_index_group_size(c->kv_index, i);
        if (!tenant_view) gs[i].requests = metrics_reply(&c->metrics, i, &c->status.requests[i + 1]);
        gp[i] = &gs[i];
    }
    Folio__V1__StatusReply s = FOLIO__V1__STATUS_REPLY__INIT;
    s.groups = gp;
    s.n_groups = (size_t)G->n;
    s.policy = (char *)router_policy_name(router_policy(c->router));
    s.requests_total = c->requests_total;
    s.requests_inflight = (uint64_t)reqs_count(c->reqs);
    s.requests_failed_over = c->requests_failed_over;
    s.requests_migrated = c->requests_migrated;
    s.block_size = c->block_size;
    s.kv_index_entries = kv_index_size(c->kv_index);
    s.kv_index_capacity = kv_index_capacity(c->kv_index);
    s.kv_index_evictions = kv_index_evictions(c->kv_index);
    s.routed_by_cache = c->routed_by_cache;
    s.kv_pull_hints = c->kv_pull_hints;
    s.routed_cached_blocks = c->routed_cached_blocks;
    if (metrics_any(&c->metrics, -1)) s.requests_no_group = metrics_reply(&c->metrics, -1, &c->status.requests[0]);
    const size_t n = c->n_latency < COORD_LATENCY_SAMPLES ? (size_t)c->n_latency : COORD_LATENCY_SAMPLES;
    if (n) {
        memcpy(lat, c->latency, n * sizeof *lat);
        qsort(lat, n, sizeof *lat, cmp_double);
        s.route_p50_us = lat[(n - 1) / 2] * 1e6;
        s.route_p99_us = lat[(size_t)((double)(n - 1) * 0.99)] * 1e6;
    }
    if (tenant_view) {
        Folio__V1__StatusReply v = FOLIO__V1__STATUS_REPLY__INIT;
        v.groups = s.groups;
        v.n_groups = s.n_groups;
        v.policy = s.policy;
        v.block_size = s.block_size;
        v.tenant_view = true;
        v.tenant = (char *)who->tenant;
        v.tenant_requests_inflight = (uint64_t)reqs_tenant_count(c->reqs, who->tenant);
        s = v;
    }
    Folio__V1__Response r;
    wire_response_init(&r, q->id, q->method, true);
    r.cluster = &s;
    reply_ok(c, m, &r);
}

void coord_client_message(coord_t *c, wire_msg_t *m, double now)
{
    fl_error_t err = {0};
    char msg[600];
    if (!m->identity_len || m->identity_len > WIRE_MAX_IDENTITY) return;
    int rc = wire_check_header(m, WIRE_HEADER_CLIENT, &err);
    if (rc) {
        reply_error(c, m, 0, 0, wire_status_from_error(rc), err.msg, now);
        return;
    }
    if (m->cmd != WIRE_CMD_REQUEST) {
        snprintf(msg, sizeof msg, "unknown or unexpected command 0x%02x from a client (expected REQUEST 0x01)", m->cmd);
        reply_error(c, m, 0, 0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg, now);
        return;
    }
    if (!m->has_body) {
        reply_error(c, m, 0, 0, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                    "REQUEST without a body frame (header, command and body: three frames)", now);
        return;
    }
    Folio__V1__Request *q = wire_decode_request(m->body, m->body_len, &err);
    if (!q) {
        /* Under the id it carries, when it can be read (an oversized body's too): the client's
         * request ends. */
        uint64_t id;
        Folio__V1__Method method;
        wire_peek_request(m->body, m->body_len, &id, &method);
        if (id && reqs_by_client(c->reqs, m->identity, m->identity_len, id)) { /* as a reused id, below */
            snprintf(msg, sizeof msg, "request id %llu is already in flight on this connection: %s",
                     (unsigned long long)id, err.msg);
            reply_error(c, m, 0, method, wire_status_from_error(err.code), msg, now);
            return;
        }
        reply_error(c, m, id, method, wire_status_from_error(err.code), err.msg, now);
        return;
    }
    if (reqs_by_client(c->reqs, m->identity, m->identity_len, q->id)) {
        /* Answering under this id would end the live request's stream in its client's eyes. */
        snprintf(msg, sizeof msg,
                 "request id %llu is already in flight on this connection: this request is refused (the one in "
                 "flight goes on)",
                 (unsigned long long)q->id);
        reply_error(c, m, 0, q->method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg, now);
        folio__v1__request__free_unpacked(q, NULL);
        return;
    }
    auth_peer_t who;
    auth_client_peer(c->auth, m, &who);
    if (c->auth && !set_tenant(q, &who)) {
        dispatch_refuse(c, m, q->id, q->method, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED,
                        dispatch_retry_after_ms(c, now), "out of memory", now);
        folio__v1__request__free_unpacked(q, NULL);
        return;
    }
    if (invalid_string(q, msg, sizeof msg)) {
        reply_error(c, m, q->id, q->method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg, now);
        folio__v1__request__free_unpacked(q, NULL);
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
        do_drain(c, m, q, &who, now);
        break;
    case FOLIO__V1__METHOD__METHOD_HEALTH:
        do_health(c, m, q);
        break;
    case FOLIO__V1__METHOD__METHOD_STATUS:
        do_status(c, m, q, &who, now);
        break;
    default:
        reply_error(c, m, q->id, q->method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, "unknown method", now);
    }
    folio__v1__request__free_unpacked(q, NULL);
}
