/* dispatch.c - routing, relaying, failover, cancel and error FINALs of Generate requests; see
 * dispatch.h.
 *
 * A request keeps the client's decoded Request (req_t.msg) for the life of its stream, so it can be
 * sent again to another group. The worker gets a Request of its own, built at each send: the
 * client's Generate with the prompt as tokens, under a coordinator-wide worker-side id (new at every
 * resubmission, so anything the old group still says about the old id is dropped as unknown), the
 * time left of its deadline, the tenant's prefix-cache namespace, and max_tokens clamped to what
 * the group's context leaves after the prompt. What the client gets back is in its own terms: its
 * id, also inside a worker's error message, and a finish reason that follows from the status.
 *
 * Mid-stream migration: a streamed request keeps the tokens relayed to its client (req_t.sent) and
 * the bytes of their text. When its group is lost after streaming began, the same Request goes to
 * another group with those tokens as resume_tokens: the worker takes them as generated and goes on
 * at the next index (sampling draws depend on (seed, index) only and a row's result not on its
 * batch, so the continuation is the one the first group would have made), and replays them through
 * its output stream so stop strings and the UTF-8 decoder are where the client's stream is. The
 * client sees one stream; next_index and tokens_sent carry over.
 * Nothing here logs per request above debug level. */
#include "dispatch.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "folio_fields.h"
#include "log.h"

/* ---- sends ---- */

int dispatch_to_client(coord_t *c, const uint8_t *client, size_t len, bool delimiter, const Folio__V1__Response *r)
{
    fl_error_t err = {0};
    const int cmd = r->final ? WIRE_CMD_FINAL : WIRE_CMD_PARTIAL;
    if (!wire_send(c->clients, client, len, delimiter, WIRE_HEADER_CLIENT, cmd, &r->base, &err)) return FL_OK;
    if (errno == EAGAIN) fl_log_warn("client queue full id=%llu: cancelling its requests", (unsigned long long)r->id);
    uint8_t copy[WIRE_MAX_IDENTITY]; /* client may point into a request about to be freed */
    memcpy(copy, client, len);
    dispatch_client_gone(c, copy, len);
    return FL_EIO;
}

/* Sends the CANCEL for e's worker-side id to its group (best effort: a worker that cannot be
 * reached has dropped the work anyway). */
static void cancel_on_worker(coord_t *c, const req_t *e)
{
    if (e->group < 0 || !e->wid) return;
    const group_member_t *w = &c->groups->g[e->group].ranks[0];
    if (!w->present) return;
    Folio__V1__CancelRequest cr = FOLIO__V1__CANCEL_REQUEST__INIT;
    cr.target_id = e->wid;
    Folio__V1__Request q = FOLIO__V1__REQUEST__INIT;
    q.version = WIRE_VERSION;
    q.id = c->next_wid++;
    q.method = FOLIO__V1__METHOD__METHOD_CANCEL;
    q.cancel = &cr;
    wire_send(c->workers, w->identity, w->identity_len, false, WIRE_HEADER_WORKER, WIRE_CMD_REQUEST, &q.base, NULL);
}

/* ---- mid-stream migration ---- */

/* True when e, once streaming began, may go on on another group rather than end UNAVAILABLE. */
static bool may_migrate(const req_t *e)
{
    const Folio__V1__GenerateRequest *g = e->msg->generate;
    return g->stream && !g->no_migrate && !e->sent_lost;
}

/* A delta of e (n_new tokens at index tokens_sent) has reached its client: what a group e moves to
 * continues from. Called before tokens_sent counts them. */
static void keep_sent(req_t *e, const Folio__V1__TokenDelta *d, uint32_t n_new)
{
    if (d->text) e->text_sent += strlen(d->text);
    if (!n_new || !may_migrate(e)) return;
    if (d->index != e->tokens_sent) { /* a gap (a worker's bug): what the client has is not known */
        e->sent_lost = true;
        return;
    }
    const uint32_t need = e->tokens_sent + n_new;
    if (need > e->sent_cap) {
        uint32_t cap = e->sent_cap ? e->sent_cap : 64;
        while (cap < need) cap *= 2;
        int32_t *p = realloc(e->sent, (size_t)cap * sizeof *p);
        if (!p) {
            fl_log_warn("out of memory for the tokens sent id=%llu: it cannot move mid-stream",
                        (unsigned long long)e->client_id);
            e->sent_lost = true;
            return;
        }
        e->sent = p;
        e->sent_cap = cap;
    }
    memcpy(e->sent + e->tokens_sent, d->tokens, (size_t)n_new * sizeof *d->tokens);
}

/* ---- ending a request ---- */

/* Timings counted from the coordinator's receipt of the request (what the client waited): the
 * worker's (may be NULL) shifted by the time before its last dispatch, the first token as relayed.
 * Without the worker's, queued_s is the time until the request was last sent to a worker (all of
 * total_s when it never was). */
static void fill_timings(const req_t *e, Folio__V1__Timings *t, const Folio__V1__Timings *worker, double now)
{
    const double to_worker = e->t_dispatch > 0 ? e->t_dispatch - e->t_recv : 0;
    t->total_s = now - e->t_recv;
    if (worker)
        t->queued_s = worker->queued_s + to_worker;
    else
        t->queued_s = e->t_dispatch > 0 ? to_worker : t->total_s;
    if (e->t_first_sent > 0)
        t->first_token_s = e->t_first_sent - e->t_recv;
    else
        t->first_token_s = worker && worker->first_token_s > 0 ? worker->first_token_s + to_worker : 0;
    /* Moved mid-stream: the last group's queue came after the first token. */
    if (t->first_token_s > 0 && t->queued_s > t->first_token_s) t->queued_s = t->first_token_s;
}

/* The rate at which requests end, over windows of at least a second, halved at each window. */
static void rate_update(coord_t *c, double now)
{
    if (c->rate_t0 <= 0) {
        c->rate_t0 = now;
        c->rate_n0 = c->n_ended;
        return;
    }
    const double dt = now - c->rate_t0;
    if (dt < 1.0) return;
    const double rate = (double)(c->n_ended - c->rate_n0) / dt;
    c->end_rate = c->end_rate > 0 ? 0.5 * c->end_rate + 0.5 * rate : rate;
    c->rate_t0 = now;
    c->rate_n0 = c->n_ended;
}

uint32_t dispatch_retry_after_ms(coord_t *c, double now)
{
    rate_update(c, now);
    const double ms = c->end_rate > 0 ? 1e3 / c->end_rate : 1e3;
    return ms < COORD_RETRY_MIN_MS ? COORD_RETRY_MIN_MS : ms > COORD_RETRY_MAX_MS ? COORD_RETRY_MAX_MS : (uint32_t)ms;
}

static void release(coord_t *c, req_t *e)
{
    if (e->group >= 0 && c->groups->table[e->group].inflight) c->groups->table[e->group].inflight--;
    e->group = -1;
    reqs_free(c->reqs, e);
    c->n_ended++;
    rate_update(c, fl_clock_s());
}

/* Every FINAL of a Generate has a finish reason, and it follows from the status: OK ends STOP or
 * LENGTH (the worker's; LENGTH if it gave none), CANCELLED and DEADLINE_EXCEEDED end CANCELLED,
 * every other status ERROR. */
static Folio__V1__FinishReason finish_reason_of(Folio__V1__StatusCode code, Folio__V1__FinishReason worker)
{
    switch (code) {
    case FOLIO__V1__STATUS_CODE__OK:
        return worker == FOLIO__V1__FINISH_REASON__FINISH_STOP ? worker : FOLIO__V1__FINISH_REASON__FINISH_LENGTH;
    case FOLIO__V1__STATUS_CODE__CANCELLED:
    case FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED: return FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
    default: return FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    }
}

/* The figures of e, which ends now (metrics.h): how it ended, its end-to-end time, its first token
 * where no PARTIAL carried it (a streamed one's was counted when relayed), its tokens; the queue
 * time only from the worker's timings (worker). An unstreamed request's tokens reach the coordinator
 * together, so each after the first counts the mean interval of its worker's decoding as its
 * inter-token latency. */
static void account_end(coord_t *c, const req_t *e, Folio__V1__FinishReason reason, Folio__V1__StatusCode code,
                        const Folio__V1__Timings *t, const Folio__V1__Usage *u, bool worker)
{
    metrics_t *m = &c->metrics;
    const int g = e->group;
    metrics_finished(m, g, reason, code);
    metrics_observe(m, g, METRICS_E2E, t->total_s, 1);
    if (!e->t_first_sent && t->first_token_s > 0) metrics_observe(m, g, METRICS_TTFT, t->first_token_s, 1);
    metrics_observe(m, g, METRICS_PROMPT_TOKENS, u->prompt_tokens, 1);
    metrics_observe(m, g, METRICS_GENERATION_TOKENS, u->completion_tokens, 1);
    if (!worker) return;
    metrics_observe(m, g, METRICS_QUEUE, t->queued_s, 1);
    const uint32_t n = u->completion_tokens;
    if (!e->msg->generate->stream && n > 1 && t->first_token_s > 0 && t->total_s > t->first_token_s)
        metrics_observe(m, g, METRICS_ITL, (t->total_s - t->first_token_s) / (n - 1), n - 1);
}

/* n tokens of e relayed now: their inter-token latency, the time since the last tokens relayed
 * shared among them (the first tokens' time is the time to first token). */
static void account_tokens(coord_t *c, req_t *e, uint32_t n, double now)
{
    if (e->t_last_token > 0) metrics_observe(&c->metrics, e->group, METRICS_ITL, (now - e->t_last_token) / n, n);
    e->t_last_token = now;
}

/* An error FINAL in caller storage: a Generate's carries a result (finish reason of code, usage,
 * timings, group; filled by the caller); other methods' carry the status alone. retry_after_ms
 * only with RESOURCE_EXHAUSTED. */
typedef struct error_final {
    wire_error_reply_t r;
    Folio__V1__GenerateResult res;
    Folio__V1__Usage usage;
    Folio__V1__Timings timings;
} error_final_t;

static void error_final_init(error_final_t *f, uint64_t id, int method, Folio__V1__StatusCode code,
                             uint32_t retry_after_ms, const char *msg)
{
    wire_error_reply_init(&f->r, id, (Folio__V1__Method)method, code, msg);
    if (code == FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED) f->r.status.retry_after_ms = retry_after_ms;
    folio__v1__generate_result__init(&f->res);
    folio__v1__usage__init(&f->usage);
    folio__v1__timings__init(&f->timings);
    if (method != FOLIO__V1__METHOD__METHOD_GENERATE) return;
    f->res.finish_reason = finish_reason_of(code, FOLIO__V1__FINISH_REASON__FINISH_NONE);
    f->res.usage = &f->usage;
    f->res.timings = &f->timings;
    f->res.group = (char *)"";
    f->r.resp.result = &f->res;
}

void dispatch_refuse(coord_t *c, const wire_msg_t *m, uint64_t id, int method, Folio__V1__StatusCode code,
                     uint32_t retry_after_ms, const char *msg, double t_recv)
{
    error_final_t f;
    error_final_init(&f, id, method, code, retry_after_ms, msg);
    f.timings.total_s = f.timings.queued_s = fl_clock_s() - t_recv;
    if (method == FOLIO__V1__METHOD__METHOD_GENERATE) metrics_finished(&c->metrics, -1, f.res.finish_reason, code);
    fl_log_debug("client request refused id=%llu code=%s msg=\"%s\"", (unsigned long long)id, wire_status_name(code),
                 msg);
    dispatch_to_client(c, m->identity, m->identity_len, m->has_delimiter, &f.r.resp);
}

/* Ends e with an error FINAL (its finish reason follows from code) and frees it. */
static void finish_error(coord_t *c, req_t *e, Folio__V1__StatusCode code, const char *msg, uint32_t retry_after_ms)
{
    error_final_t f;
    error_final_init(&f, e->client_id, FOLIO__V1__METHOD__METHOD_GENERATE, code, retry_after_ms, msg);
    f.usage.prompt_tokens = (uint32_t)e->n_tokens;
    f.usage.completion_tokens = e->tokens_sent;
    fill_timings(e, &f.timings, NULL, fl_clock_s());
    char group[GROUP_NAME_MAX + 1] = "";
    if (e->group >= 0) snprintf(group, sizeof group, "%s", c->groups->g[e->group].name);
    f.res.group = group;
    uint8_t client[WIRE_MAX_IDENTITY];
    const size_t len = e->client_len;
    const bool delim = e->delimiter;
    memcpy(client, e->client, len);
    fl_log_debug("request ended id=%llu code=%s msg=\"%s\"", (unsigned long long)e->client_id, wire_status_name(code),
                 msg);
    account_end(c, e, f.res.finish_reason, code, &f.timings, &f.usage, false);
    release(c, e);
    dispatch_to_client(c, client, len, delim, &f.r.resp);
}

/* Ends e, which the client cancelled or whose deadline passed, when its worker's FINAL did not come
 * or its group is gone: CANCELLED, or DEADLINE_EXCEEDED once the deadline has passed. */
static void finish_stopped(coord_t *c, req_t *e, const char *why)
{
    char msg[160];
    if (e->expired) {
        snprintf(msg, sizeof msg, "deadline of %u ms exceeded%s", e->msg->timeout_ms, why);
        finish_error(c, e, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED, msg, 0);
    } else {
        snprintf(msg, sizeof msg, "cancelled%s", why);
        finish_error(c, e, FOLIO__V1__STATUS_CODE__CANCELLED, msg, 0);
    }
}

void dispatch_client_gone(coord_t *c, const uint8_t *client, size_t len)
{
    int n = 0;
    const double now = fl_clock_s();
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live || e->client_len != len || memcmp(e->client, client, len)) continue;
        cancel_on_worker(c, e);
        Folio__V1__Timings t = FOLIO__V1__TIMINGS__INIT;
        fill_timings(e, &t, NULL, now);
        Folio__V1__Usage u = FOLIO__V1__USAGE__INIT;
        u.prompt_tokens = (uint32_t)e->n_tokens;
        u.completion_tokens = e->tokens_sent;
        account_end(c, e, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, FOLIO__V1__STATUS_CODE__CANCELLED, &t, &u, false);
        release(c, e);
        n++;
    }
    fl_log_info("client gone requests_cancelled=%d", n);
}

int dispatch_end_all(coord_t *c, const char *msg)
{
    int n = 0;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live) continue;
        cancel_on_worker(c, e);
        finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, msg, 0);
        n++;
    }
    return n;
}

/* ---- routing ---- */

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

/* max_tokens as a group whose context is ctx serves it: clamped so that prompt and completion fit
 * (the worker then ends the request FINISH_LENGTH there, as at its model's own context). */
static uint32_t clamp_max_tokens(uint32_t asked, int n_prompt, uint32_t ctx)
{
    const uint64_t want = asked ? asked : FOLIO_DEFAULT_MAX_TOKENS;
    if (!ctx || (uint32_t)n_prompt >= ctx || (uint64_t)n_prompt + want <= ctx) return asked;
    return ctx - (uint32_t)n_prompt;
}

/* The group that holds more of the prompt's leading blocks than target does (held, by the KV
 * index), serves pulls and keeps its KV as target does (model, KV types, block size); the one
 * holding most, or -1. */
static int pull_holder(const coord_t *c, int target, const int *held)
{
    const group_t *t = &c->groups->g[target];
    if (!t->kv_peer[0]) return -1; /* it neither pulls nor serves */
    int best = -1;
    for (int s = 0; s < c->groups->n; s++) {
        const group_t *h = &c->groups->g[s];
        if (s == target || held[s] <= held[target] || (best >= 0 && held[s] <= held[best])) continue;
        if (!h->ranks[0].present || !h->kv_peer[0] || (c->auth && !h->kv_peer_key[0]) ||
            strcmp(h->model_id, t->model_id) || strcmp(h->kv_type, t->kv_type) || h->block_size != t->block_size)
            continue;
        best = s;
    }
    return best;
}

/* cache-aware: when no routable group holds any of a prompt's blocks, how many of the prefixes
 * routed lately each group holds (router_group_t.prefixes), so that a new prefix goes where there is
 * room, and which group it was placed on if it came lately (placed); zero otherwise. A census of
 * COORD_RECENT_PREFIXES keys, only for prompts that start a prefix. */
static void prefix_census(coord_t *c, bool has_blocks, uint64_t key)
{
    router_group_t *t = c->groups->table;
    bool held_anywhere = false;
    for (int s = 0; s < c->groups->n; s++) {
        t[s].prefixes = 0;
        t[s].placed = false;
        if (t[s].routable && t[s].cached_blocks) held_anywhere = true;
    }
    if (held_anywhere || !has_blocks) return;
    for (int i = 0; i < c->n_recent_prefixes; i++)
        if (c->recent_prefixes[i].key == key && c->recent_prefixes[i].slot >= 0 &&
            c->recent_prefixes[i].slot < c->groups->n)
            t[c->recent_prefixes[i].slot].placed = true;
    /* A prefix counts for the groups that report it, or while none does (its first request is still
     * computing it, or it was evicted everywhere) for the group it was routed to last: placements
     * in flight must count, or a burst of new prefixes all land on the same emptiest group. */
    for (int i = 0; i < c->n_recent_prefixes; i++) {
        bool reported = false;
        for (int s = 0; s < c->groups->n; s++)
            if (t[s].routable && kv_index_holds(c->kv_index, s, c->recent_prefixes[i].key)) {
                t[s].prefixes++;
                reported = true;
            }
        const int last = c->recent_prefixes[i].slot;
        if (!reported && last >= 0 && last < c->groups->n) t[last].prefixes++;
    }
}

/* Adds a routed prompt's key to the census (replacing the least recently routed when full), or
 * updates when and where it went. */
static void remember_prefix(coord_t *c, uint64_t key, int slot)
{
    const uint64_t now = ++c->prefix_clock;
    int at = c->n_recent_prefixes < COORD_RECENT_PREFIXES ? c->n_recent_prefixes : 0;
    for (int i = 0; i < c->n_recent_prefixes; i++) {
        if (c->recent_prefixes[i].key == key) {
            at = i;
            break;
        }
        if (c->n_recent_prefixes == COORD_RECENT_PREFIXES && c->recent_prefixes[i].used < c->recent_prefixes[at].used)
            at = i;
    }
    if (at == c->n_recent_prefixes) c->n_recent_prefixes++;
    c->recent_prefixes[at].key = key;
    c->recent_prefixes[at].used = now;
    c->recent_prefixes[at].slot = slot;
}

/* Routes e (its tokens set) to a group other than exclude and sends it; returns 0, or a status code
 * when no group could take it (UNAVAILABLE: none routable; RESOURCE_EXHAUSTED: the chosen group's
 * queue in this process is full); e is not freed either way, but a group found dead on the way may
 * end requests, and with them e when its client turns out to be gone. */
static int route(coord_t *c, req_t *e, int exclude, double now)
{
    const Folio__V1__Request *q = e->msg;
    const int bs = c->block_size ? (int)c->block_size : 16;
    char ns[COORD_TENANT_MAX];
    cache_tenant(c, q->tenant, ns);
    const block_hash_t salt = block_hash_salt(ns, strlen(ns));
    const int rb = c->opts.route_blocks;
    /* The key needs the first route_blocks blocks; cache-aware matching needs every full block. */
    const bool cache_aware = router_policy(c->router) == ROUTER_CACHE_AWARE;
    const bool pulls = !c->opts.no_kv_pull;
    const int cap = cache_aware || pulls ? COORD_MAX_ROUTE_BLOCKS : rb;
    const long use = (long)cap * bs < e->n_tokens ? (long)cap * bs : e->n_tokens;
    const int nh = block_hash_prefix(salt, e->tokens, (int)use, bs, c->hash_buf, cap);
    const uint64_t key = router_key(c->hash_buf, nh, rb, salt, e->tokens, e->n_tokens);
    /* held[s]: the prompt's leading blocks group s has cached, by its KV events; a group that can
     * serve pulls counts even when drained (it still answers them). */
    int held[GROUPS_MAX] = {0};
    if (cache_aware || pulls) {
        for (int i = 0; i < nh; i++) c->hash_lo[i] = c->hash_buf[i].lo;
        for (int s = 0; s < c->groups->n; s++) {
            const group_t *gr = &c->groups->g[s];
            if (c->groups->table[s].routable || (pulls && gr->ranks[0].present && gr->kv_peer[0]))
                held[s] = kv_index_match(c->kv_index, s, c->hash_lo, nh);
            if (cache_aware) c->groups->table[s].cached_blocks = c->groups->table[s].routable ? (uint32_t)held[s] : 0;
        }
        if (cache_aware) prefix_census(c, nh > 0, key);
    }

    /* The worker's Request: the client's fields but the prompt as tokens only, the namespace as the
     * tenant (the worker salts its cache with it), and id and time left set per send below. Its
     * sub-messages (sampling, stop strings, metadata) are the client's, read and not changed. */
    Folio__V1__GenerateRequest g = *q->generate;
    g.text = (char *)"";
    g.messages = NULL;
    g.n_messages = 0;
    g.prompt_tokens = e->tokens;
    g.n_prompt_tokens = (size_t)e->n_tokens;
    if (e->committed) { /* moving mid-stream (may_migrate): the worker goes on from what the client has */
        g.resume_tokens = e->sent;
        g.n_resume_tokens = e->tokens_sent;
        g.resume_text_bytes = e->text_sent;
    }
    Folio__V1__Request w = *q;
    w.tenant = ns;
    w.generate = &g;

    for (int attempt = 0; attempt < GROUPS_MAX; attempt++) {
        const int slot = router_pick(c->router, key, c->groups->table, c->groups->n, exclude);
        if (slot < 0) return FOLIO__V1__STATUS_CODE__UNAVAILABLE;
        reqs_set_wid(c->reqs, e, c->next_wid++);
        w.id = e->wid;
        w.timeout_ms = remaining_ms(e, now);
        g.max_tokens = clamp_max_tokens(q->generate->max_tokens, e->n_tokens, c->groups->g[slot].max_context);
        /* A group whose context is shorter than what was sent refuses it RESOURCE_EXHAUSTED (the
         * request then tries another), rather than calling the resume invalid. */
        if (e->committed && g.max_tokens && g.max_tokens < e->tokens_sent) g.max_tokens = e->tokens_sent;
        const group_member_t *m = &c->groups->g[slot].ranks[0];
        const int holder = pulls ? pull_holder(c, slot, held) : -1;
        g.kv_pull_endpoint = holder >= 0 ? c->groups->g[holder].kv_peer : (char *)"";
        g.kv_pull_blocks = holder >= 0 ? (uint32_t)held[holder] : 0;
        g.kv_pull_key = holder >= 0 && c->auth ? c->groups->g[holder].kv_peer_key : (char *)"";
        fl_error_t err = {0};
        if (!wire_send(c->workers, m->identity, m->identity_len, false, WIRE_HEADER_WORKER, WIRE_CMD_REQUEST, &w.base,
                       &err)) {
            e->group = slot;
            e->t_dispatch = fl_clock_s();
            c->groups->table[slot].inflight++;
            if (holder >= 0) {
                c->kv_pull_hints++;
                fl_log_debug("request %llu to group %s: %d prompt blocks to pull from %s (it has %d)",
                             (unsigned long long)e->wid, c->groups->g[slot].name, held[holder],
                             c->groups->g[holder].name, held[slot]);
            }
            if (cache_aware && c->groups->table[slot].cached_blocks) {
                c->routed_by_cache++;
                c->routed_cached_blocks += c->groups->table[slot].cached_blocks;
            }
            if (cache_aware && nh > 0) remember_prefix(c, key, slot);
            return 0;
        }
        if (errno != EHOSTUNREACH) {
            fl_log_warn("worker queue full group=%s: %s", c->groups->g[slot].name, err.msg);
            return FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED;
        }
        dispatch_group_died(c, slot, "unreachable", now);
        if (!e->live) return FOLIO__V1__STATUS_CODE__UNAVAILABLE; /* its client went away meanwhile */
    }
    return FOLIO__V1__STATUS_CODE__UNAVAILABLE;
}

void dispatch_submit(coord_t *c, req_t *e, double now)
{
    const int rc = route(c, e, -1, now);
    if (rc) {
        if (!e->live) return;
        if (rc == FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED)
            finish_error(c, e, FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED,
                         "the worker group's queue in the coordinator is full", dispatch_retry_after_ms(c, now));
        else
            finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, "no healthy worker group could take the request", 0);
        return;
    }
    e->route_s = fl_clock_s() - now;
}

/* ---- relaying ---- */

/* True when the text just before at (within msg) says that the number at `at` names a request. */
static bool names_request(const char *msg, const char *at)
{
    static const char *const before[] = {"request ", "id ", "id="};
    for (size_t i = 0; i < sizeof before / sizeof *before; i++) {
        const size_t n = strlen(before[i]);
        if ((size_t)(at - msg) >= n && !strncmp(at - n, before[i], n)) return true;
    }
    return false;
}

/* A worker's message in the client's terms: the worker-side id wid, where the message names the
 * request by it ("request 12", "id 12", "id=12"), becomes the client's id. Written to out. */
static const char *client_message(const char *msg, uint64_t wid, uint64_t client_id, char *out, size_t cap)
{
    char w[24], cid[24];
    snprintf(w, sizeof w, "%llu", (unsigned long long)wid);
    snprintf(cid, sizeof cid, "%llu", (unsigned long long)client_id);
    const size_t wl = strlen(w), cl = strlen(cid);
    size_t o = 0;
    for (const char *p = msg; *p && o + 1 < cap;) {
        if (!strncmp(p, w, wl) && !isdigit((unsigned char)p[wl]) && (p == msg || !isdigit((unsigned char)p[-1])) &&
            names_request(msg, p) && o + cl + 1 < cap) {
            memcpy(out + o, cid, cl);
            o += cl;
            p += wl;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = 0;
    return out;
}

void dispatch_relay(coord_t *c, int slot, const Folio__V1__Response *r, bool final, double now)
{
    req_t *e = reqs_by_wid(c->reqs, r->id);
    if (!e || e->group != slot) {
        fl_log_debug("response for unknown request dropped group=%s id=%llu", c->groups->g[slot].name,
                     (unsigned long long)r->id);
        return;
    }
    const bool streamed = e->msg->generate->stream;
    /* The client's Response: the worker's fields under the client's id. */
    Folio__V1__Response out = *r;
    out.id = e->client_id;
    out.method = FOLIO__V1__METHOD__METHOD_GENERATE;
    out.final = final;
    uint32_t n_new = 0;
    const Folio__V1__TokenDelta *delta = r->delta;
    if (delta && delta->n_tokens && delta->index < e->next_index) {
        fl_log_debug("delta repeating indices dropped id=%llu index=%u expected=%u", (unsigned long long)e->client_id,
                     delta->index, e->next_index);
        if (!final) return;
        out.delta = NULL;
        delta = NULL;
    }
    if (delta && e->cancelling && streamed && (delta->n_tokens || (delta->text && *delta->text))) {
        /* The Cancel has been answered (or the deadline passed): nothing more of the stream goes out. */
        e->withheld = true;
        if (!final) return;
        out.delta = NULL;
        delta = NULL;
    }
    if (delta && delta->n_tokens) {
        n_new = (uint32_t)delta->n_tokens;
        e->next_index = delta->index + n_new;
    }
    if (!final) {
        if (dispatch_to_client(c, e->client, e->client_len, e->delimiter, &out)) return; /* e is gone with its client */
        if (delta) keep_sent(e, delta, n_new);
        if (n_new) {
            if (!e->committed) {
                e->t_first_sent = fl_clock_s();
                metrics_observe(&c->metrics, e->group, METRICS_TTFT, e->t_first_sent - e->t_recv, 1);
            }
            e->committed = true;
            e->tokens_sent += n_new;
            account_tokens(c, e, n_new, now);
        }
        return;
    }
    Folio__V1__Status status = FOLIO__V1__STATUS__INIT;
    if (r->status) {
        status.code = r->status->code;
        status.message = r->status->message;
        status.retry_after_ms = r->status->retry_after_ms;
    }
    /* A worker that refuses for want of room: another group may have it. */
    if (status.code == FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED && (!e->committed || may_migrate(e)) &&
        !e->cancelling && !n_new && e->refusals < COORD_MAX_RESUBMITS && !(e->deadline > 0 && now >= e->deadline)) {
        if (c->groups->table[slot].inflight) c->groups->table[slot].inflight--;
        e->group = -1;
        e->refusals++;
        if (!route(c, e, slot, now) || !e->live) return;
        /* nobody else could: the worker's refusal goes to the client, with its retry hint */
    }
    char msg[512], moving[600];
    if (status.message && *status.message)
        status.message = (char *)client_message(status.message, r->id, e->client_id, msg, sizeof msg);
    if (status.code == FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED && e->committed) {
        /* A stream that was moving and found no room: resending the request would not continue it. */
        snprintf(moving, sizeof moving, "the request could not go on after %u tokens were sent: %s", e->tokens_sent,
                 status.message ? status.message : "no group had room");
        status.code = FOLIO__V1__STATUS_CODE__UNAVAILABLE;
        status.message = moving;
    }
    if (e->cancelling && (status.code == FOLIO__V1__STATUS_CODE__CANCELLED ||
                          status.code == FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED ||
                          (status.code == FOLIO__V1__STATUS_CODE__OK && e->withheld))) {
        if (e->expired) {
            snprintf(msg, sizeof msg, "deadline of %u ms exceeded", e->msg->timeout_ms);
            status.code = FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED;
        } else {
            snprintf(msg, sizeof msg, "cancelled");
            status.code = FOLIO__V1__STATUS_CODE__CANCELLED;
        }
        status.message = msg;
    }
    if (status.code != FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED) status.retry_after_ms = 0;
    out.status = &status;
    Folio__V1__GenerateResult res = FOLIO__V1__GENERATE_RESULT__INIT;
    Folio__V1__Usage usage = FOLIO__V1__USAGE__INIT;
    if (r->result) res = *r->result;
    if (r->result && r->result->usage) usage = *r->result->usage;
    if (!res.group || !*res.group) res.group = c->groups->g[slot].name;
    res.finish_reason = finish_reason_of(status.code, res.finish_reason);
    if (!usage.prompt_tokens) usage.prompt_tokens = (uint32_t)e->n_tokens;
    /* What the client has: a moved stream's tokens from every group (and none withheld after a Cancel). */
    if (streamed) usage.completion_tokens = e->tokens_sent + n_new;
    res.usage = &usage;
    Folio__V1__Timings timings = FOLIO__V1__TIMINGS__INIT;
    fill_timings(e, &timings, r->result ? r->result->timings : NULL, now);
    res.timings = &timings;
    out.result = &res;
    if (streamed && n_new) account_tokens(c, e, n_new, now);
    account_end(c, e, res.finish_reason, status.code, &timings, &usage, r->result && r->result->timings);
    const double route_s = e->route_s;
    /* The entry goes first: the send may find the client gone, which frees its requests. */
    uint8_t client[WIRE_MAX_IDENTITY];
    const size_t len = e->client_len;
    const bool delim = e->delimiter;
    memcpy(client, e->client, len);
    release(c, e);
    dispatch_to_client(c, client, len, delim, &out);
    c->latency[c->n_latency++ % COORD_LATENCY_SAMPLES] = route_s + (fl_clock_s() - now);
}

/* ---- cancel and timers ---- */

void dispatch_cancel(coord_t *c, req_t *e, double now)
{
    if (e->cancelling) return;
    cancel_on_worker(c, e);
    e->cancelling = true;
    e->cancel_deadline = now + 2 * c->hb_s;
    reqs_timer_update(c->reqs, e);
}

double dispatch_next_timer(coord_t *c, double now)
{
    const req_t *e = reqs_timer_first(c->reqs);
    return e ? e->timer - now : -1;
}

void dispatch_expire(coord_t *c, double now)
{
    req_t *e;
    while ((e = reqs_timer_first(c->reqs)) && e->timer <= now) {
        if (e->cancel_deadline > 0 && e->cancel_deadline <= now) {
            finish_stopped(c, e, e->expired ? " (the worker did not answer)" : " (the worker did not confirm)");
            continue;
        }
        /* The deadline. An unstreamed request's tokens are all in its worker's FINAL, which comes
         * at once (the worker has the same deadline, and is told): wait for it as for a Cancel's. */
        if (!e->msg->generate->stream && e->group >= 0) {
            e->expired = true;
            e->deadline = 0;
            if (!e->cancelling) {
                cancel_on_worker(c, e);
                e->cancelling = true;
                e->cancel_deadline = now + 2 * c->hb_s;
            }
            reqs_timer_update(c->reqs, e);
            continue;
        }
        cancel_on_worker(c, e);
        e->expired = true;
        finish_stopped(c, e, "");
    }
}

/* ---- failover ---- */

/* One request of group slot that the group lost: moved to another group when the failover rule
 * allows (true), else ended. Ending a request releases it from slot. */
static bool fail_over_one(coord_t *c, req_t *e, int slot, int exclude, const char *name, const char *what, double now)
{
    char msg[GROUP_NAME_MAX + 200];
    const bool midstream = e->committed;
    if (e->cancelling) {
        finish_stopped(c, e, "");
    } else if (e->deadline > 0 && now >= e->deadline) {
        e->expired = true;
        finish_stopped(c, e, "");
    } else if ((!midstream || may_migrate(e)) && e->resubmits < COORD_MAX_RESUBMITS) {
        if (c->groups->table[slot].inflight) c->groups->table[slot].inflight--;
        e->group = -1;
        e->resubmits++;
        c->requests_failed_over++;
        if (!midstream) { /* nothing reached the client: it starts again */
            e->next_index = 0;
            e->tokens_sent = 0;
            e->text_sent = 0;
        }
        if (!route(c, e, exclude, now)) {
            c->requests_migrated += midstream;
            return true;
        }
        if (!e->live) return false;
        if (midstream)
            snprintf(msg, sizeof msg,
                     "group %s %s after %u tokens were sent and no other healthy group could take the rest", name, what,
                     e->tokens_sent);
        else
            snprintf(msg, sizeof msg, "group %s %s and no other healthy group could take the request", name, what);
        finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, msg, 0);
    } else {
        snprintf(msg, sizeof msg, "group %s %s after %u tokens were sent%s", name, what, e->tokens_sent,
                 !midstream || may_migrate(e) ? " (the request had moved too often)" : "");
        finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, msg, 0);
    }
    return false;
}

/* The requests of group slot after it died or restarted: fail over what may move, end the rest. */
static void fail_over(coord_t *c, int slot, int exclude, double now)
{
    char name[GROUP_NAME_MAX + 1];
    snprintf(name, sizeof name, "%s", c->groups->g[slot].name);
    int moved = 0, ended = 0;
    const uint64_t migrated = c->requests_migrated;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live || e->group != slot) continue;
        if (fail_over_one(c, e, slot, exclude, name, "died", now))
            moved++;
        else
            ended++;
    }
    /* Recount: a re-registered group may have been given some of its own requests back. */
    uint32_t still = 0;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        const req_t *e = reqs_at(c->reqs, i);
        still += e->live && e->group == slot;
    }
    c->groups->table[slot].inflight = still;
    if (moved || ended)
        fl_log_info("group requests moved group=%s failed_over=%d migrated=%llu ended=%d", name, moved,
                    (unsigned long long)(c->requests_migrated - migrated), ended);
}

void dispatch_group_died(coord_t *c, int slot, const char *why, double now)
{
    if (!c->groups->g[slot].ranks[0].present && !c->groups->table[slot].inflight) return;
    fl_log_warn("group dead group=%s why=%s inflight=%u", c->groups->g[slot].name, why,
                c->groups->table[slot].inflight);
    groups_forget(c->groups, slot);
    dispatch_forget_cache(c, slot); /* a new process starts with an empty cache */
    fail_over(c, slot, slot, now);
}

void dispatch_forget_cache(coord_t *c, int slot)
{
    kv_index_clear_group(c->kv_index, slot);
    for (int i = 0; i < c->n_recent_prefixes; i++)
        if (c->recent_prefixes[i].slot == slot) c->recent_prefixes[i].slot = -1;
}

void dispatch_group_restarted(coord_t *c, int slot, double now)
{
    if (c->groups->table[slot].inflight) fail_over(c, slot, -1, now);
}

static int cmp_u64(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* A lost REQUEST or FINAL (a reconnect drops them) would otherwise leave its request waiting for
 * ever. A worker reads its socket just before it lists, and a worker's messages arrive in order, so
 * a FINAL it sent is always relayed before a heartbeat that no longer lists the id. */
void dispatch_reconcile(coord_t *c, int slot, uint64_t *live_ids, size_t n_live, double step_running_s, double now)
{
    if (!c->groups->table[slot].inflight) return;
    if (n_live) qsort(live_ids, n_live, sizeof *live_ids, cmp_u64);
    char name[GROUP_NAME_MAX + 1];
    snprintf(name, sizeof name, "%s", c->groups->g[slot].name);
    int lost = 0;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live || e->group != slot || e->cancelling || now - e->t_dispatch < 2 * c->hb_s + step_running_s) continue;
        if (n_live && bsearch(&e->wid, live_ids, n_live, sizeof *live_ids, cmp_u64)) continue;
        lost++;
        fail_over_one(c, e, slot, -1, name, "lost the request", now);
    }
    if (lost) fl_log_warn("group lost requests group=%s requests=%d (failed over or ended)", name, lost);
}
