/* workers.c - the coordinator's worker side: registration, heartbeats both ways, relaying streamed
 * responses to clients, group health, failover, deadlines and cancel timeouts.
 *
 * Workers are known by their DEALER identity (group:rank:epoch). A message from an identity the
 * registry does not know, other than READY, is answered with DISCONNECT so the worker re-registers
 * (after a coordinator restart, for instance). Every message from a worker counts as liveness; a
 * group whose rank 0 has been silent for 3 heartbeat intervals is dead: its requests that have sent
 * no token yet are re-routed (within their deadline, a few times at most), the others end with
 * UNAVAILABLE keeping the tokens already sent. Resubmission gives a request a new worker-side id, so
 * anything the old group still says about the old id is dropped as unknown. Relaying enforces the
 * stream rule: token indices only move forward, and each request gets exactly one FINAL. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "coordinator.h"
#include "log.h"

/* Identities recently told DISCONNECT: a worker's queued heartbeats would otherwise each earn one,
 * and each DISCONNECT makes it register again. */
#define DISCONNECT_MEMORY 16
static struct {
    uint8_t id[WIRE_MAX_IDENTITY];
    size_t len;
    double at;
} g_told[DISCONNECT_MEMORY];
static int g_told_next;

static bool told_recently(const uint8_t *id, size_t len, double now, double window)
{
    for (int i = 0; i < DISCONNECT_MEMORY; i++)
        if (g_told[i].len == len && now - g_told[i].at < window && !memcmp(g_told[i].id, id, len)) return true;
    g_told[g_told_next].len = len;
    memcpy(g_told[g_told_next].id, id, len);
    g_told[g_told_next].at = now;
    g_told_next = (g_told_next + 1) % DISCONNECT_MEMORY;
    return false;
}

static void send_worker_empty(coord_t *c, const uint8_t *id, size_t len, int cmd)
{
    wire_send(c->workers, id, len, false, WIRE_HEADER_WORKER, cmd, NULL, NULL);
}

void coord_cancel_on_worker(coord_t *c, const req_t *e)
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
    /* Best effort: a worker that cannot be reached has dropped the work anyway. */
    wire_send(c->workers, w->identity, w->identity_len, false, WIRE_HEADER_WORKER, WIRE_CMD_REQUEST, &q.base, NULL);
}

/* One request of group slot that the group lost: moved to another group when the commit rule
 * allows (true), else ended. Ending a request releases it from slot. */
static bool fail_over_one(coord_t *c, req_t *e, int slot, int exclude, const char *name, const char *what, double now)
{
    char msg[GROUP_NAME_MAX + 160];
    if (e->cancelling) {
        coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__CANCELLED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED,
                           "cancelled");
    } else if (e->deadline > 0 && now >= e->deadline) {
        coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED,
                           "deadline exceeded");
    } else if (!e->committed && e->resubmits < COORD_MAX_RESUBMITS) {
        if (c->groups->table[slot].inflight) c->groups->table[slot].inflight--;
        e->group = -1;
        e->resubmits++;
        c->requests_failed_over++;
        e->next_index = 0;
        e->tokens_sent = 0;
        if (!coord_dispatch(c, e, exclude, now)) return true;
        if (!e->live) return false;
        snprintf(msg, sizeof msg, "group %s %s and no other healthy group could take the request", name, what);
        coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, FOLIO__V1__FINISH_REASON__FINISH_ERROR, msg);
    } else {
        snprintf(msg, sizeof msg, "group %s %s after %u tokens were sent", name, what, e->tokens_sent);
        coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, FOLIO__V1__FINISH_REASON__FINISH_ERROR, msg);
    }
    return false;
}

/* The requests of group slot after it died or restarted: fail over what may move, end the rest. */
static void fail_over(coord_t *c, int slot, int exclude, double now)
{
    char name[GROUP_NAME_MAX + 1];
    snprintf(name, sizeof name, "%s", c->groups->g[slot].name);
    int moved = 0, ended = 0;
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
    if (moved || ended) fl_log_info("group requests moved group=%s failed_over=%d ended=%d", name, moved, ended);
}

void coord_group_died(coord_t *c, int slot, const char *why, double now)
{
    if (!c->groups->g[slot].ranks[0].present && !c->groups->table[slot].inflight) return;
    fl_log_warn("group dead group=%s why=%s inflight=%u", c->groups->g[slot].name, why,
                c->groups->table[slot].inflight);
    groups_forget(c->groups, slot);
    fail_over(c, slot, slot, now);
}

static int cmp_u64(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Requests routed to slot more than 2 heartbeat intervals ago that its worker does not list as
 * live were lost in transit (a reconnect dropping a REQUEST or a FINAL): without this they would
 * wait for ever. A worker reads its socket just before it lists, and a worker's messages arrive in
 * order, so a FINAL it sent is always relayed before a heartbeat that no longer lists the id. */
static void reconcile(coord_t *c, int slot, Folio__V1__WorkerLoad *l, double now)
{
    if (!c->groups->table[slot].inflight) return;
    if (l->n_live_ids) qsort(l->live_ids, l->n_live_ids, sizeof *l->live_ids, cmp_u64);
    char name[GROUP_NAME_MAX + 1];
    snprintf(name, sizeof name, "%s", c->groups->g[slot].name);
    int lost = 0;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live || e->group != slot || e->cancelling || now - e->t_dispatch < 2 * c->hb_s) continue;
        if (l->n_live_ids && bsearch(&e->wid, l->live_ids, l->n_live_ids, sizeof *l->live_ids, cmp_u64)) continue;
        lost++;
        fail_over_one(c, e, slot, -1, name, "lost the request", now);
    }
    if (lost) fl_log_warn("group lost requests group=%s requests=%d (failed over or ended)", name, lost);
}

/* ---- messages ---- */

static void on_ready(coord_t *c, const wire_msg_t *m, double now)
{
    fl_error_t err = {0};
    Folio__V1__WorkerHello *h = wire_decode_hello(m->body, m->body_len, &err);
    if (!h) {
        fl_log_warn("worker READY rejected identity=%.*s: %s", (int)m->identity_len, (const char *)m->identity,
                    err.msg);
        return;
    }
    int old_rank = -1;
    const int old_slot = groups_find_member(c->groups, m->identity, m->identity_len, &old_rank);
    const bool again = old_slot >= 0 && old_slot == groups_find(c->groups, h->group) && old_rank == (int)h->rank;
    bool is_new, replaced;
    const int slot = groups_register(c->groups, h, m->identity, m->identity_len, now, &is_new, &replaced);
    if (slot < 0) {
        fl_log_warn("worker READY rejected group=%s rank=%u: registry full or rank too large", h->group, h->rank);
        folio__v1__worker_hello__free_unpacked(h, NULL);
        return;
    }
    if (is_new && router_add_group(c->router, slot, c->groups->g[slot].name, &err)) fl_log_error("router: %s", err.msg);
    if (h->rank == 0) {
        if (!c->block_size)
            c->block_size = h->block_size;
        else if (h->block_size != c->block_size)
            fl_log_warn("block size mismatch group=%s block_size=%u coordinator_block_size=%u (routing keys will "
                        "not match its prefix cache)",
                        h->group, h->block_size, c->block_size);
    }
    fl_log(again ? FL_LOG_DEBUG : FL_LOG_INFO,
           "worker %s group=%s rank=%u tp=%u model=%s block_size=%u kv_blocks=%u epoch=%llu",
           again ? "registered again" : "registered", h->group, h->rank, h->tp_size, h->model_id, h->block_size,
           h->kv_blocks, (unsigned long long)h->epoch);
    /* A rank 0 that registers again has dropped whatever it was running. */
    if (replaced && h->rank == 0 && c->groups->table[slot].inflight) fail_over(c, slot, -1, now);
    folio__v1__worker_hello__free_unpacked(h, NULL);
}

static void on_response(coord_t *c, const wire_msg_t *m, int slot, double now)
{
    fl_error_t err = {0};
    Folio__V1__Response *r = wire_decode_response(m->body, m->body_len, &err);
    if (!r) {
        fl_log_warn("bad response from group=%s: %s", c->groups->g[slot].name, err.msg);
        return;
    }
    req_t *e = reqs_by_wid(c->reqs, r->id);
    if (!e || e->group != slot) {
        fl_log_debug("response for unknown request dropped group=%s id=%llu", c->groups->g[slot].name,
                     (unsigned long long)r->id);
        folio__v1__response__free_unpacked(r, NULL);
        return;
    }
    const bool final = m->cmd == WIRE_CMD_FINAL;
    Folio__V1__TokenDelta *delta = r->delta;
    uint32_t n_new = 0;
    if (delta && delta->n_tokens) {
        if (delta->index < e->next_index) {
            fl_log_debug("delta repeating indices dropped id=%llu index=%u expected=%u",
                         (unsigned long long)e->client_id, delta->index, e->next_index);
            if (!final) {
                folio__v1__response__free_unpacked(r, NULL);
                return;
            }
            r->delta = NULL;
        } else {
            n_new = (uint32_t)delta->n_tokens;
            e->next_index = delta->index + n_new;
        }
    }
    const uint64_t wid = r->id;
    r->id = e->client_id;
    r->method = FOLIO__V1__METHOD__METHOD_GENERATE;
    r->final = final;
    if (!final) {
        if (!coord_send_client(c, e, r) && n_new) {
            if (!e->committed) e->t_first_sent = fl_clock_s();
            e->committed = true;
            e->tokens_sent += n_new;
        }
    } else {
        Folio__V1__GenerateResult res = FOLIO__V1__GENERATE_RESULT__INIT, *orig_res = r->result;
        if (!r->result) r->result = &res;
        char *orig_group = r->result->group;
        if (!orig_group || !*orig_group) r->result->group = c->groups->g[slot].name;
        Folio__V1__Timings timings = FOLIO__V1__TIMINGS__INIT, *orig_timings = r->result->timings;
        coord_fill_timings(e, &timings, orig_timings, now);
        r->result->timings = &timings;
        const double route_s = e->route_s;
        /* The entry goes first: the send may find the client gone, which frees its requests. */
        uint8_t client[WIRE_MAX_IDENTITY];
        const size_t len = e->client_len;
        const bool delim = e->delimiter;
        memcpy(client, e->client, len);
        if (c->groups->table[slot].inflight) c->groups->table[slot].inflight--;
        e->group = -1;
        reqs_free(c->reqs, e);
        fl_error_t serr = {0};
        if (wire_send(c->clients, client, len, delim, WIRE_HEADER_CLIENT, WIRE_CMD_FINAL, &r->base, &serr)) {
            /* Gone, or too far behind to take more (see clients.c send_to): end the rest of its work. */
            if (errno == EAGAIN) fl_log_warn("client queue full id=%llu: cancelling its requests", (unsigned long long)r->id);
            coord_client_gone(c, client, len);
        }
        coord_latency_add(c, route_s + (fl_clock_s() - now));
        r->result->group = orig_group;
        r->result->timings = orig_timings;
        r->result = orig_res;
    }
    r->delta = delta;
    r->id = wid;
    folio__v1__response__free_unpacked(r, NULL);
}

void coord_worker_message(coord_t *c, wire_msg_t *m, double now)
{
    fl_error_t err = {0};
    if (!m->identity_len) return;
    if (wire_check_header(m, WIRE_HEADER_WORKER, &err)) {
        fl_log_debug("bad worker message dropped: %s", err.msg);
        return;
    }
    if (m->cmd == WIRE_CMD_READY) {
        on_ready(c, m, now);
        return;
    }
    int rank = 0;
    const int slot = groups_find_member(c->groups, m->identity, m->identity_len, &rank);
    if (slot < 0) {
        if (m->cmd != WIRE_CMD_DISCONNECT && !told_recently(m->identity, m->identity_len, now, c->hb_s)) {
            fl_log_debug("message from unregistered worker identity=%.*s cmd=%d: DISCONNECT", (int)m->identity_len,
                         (const char *)m->identity, m->cmd);
            send_worker_empty(c, m->identity, m->identity_len, WIRE_CMD_DISCONNECT);
        }
        return;
    }
    c->groups->g[slot].ranks[rank].last_seen = now;
    switch (m->cmd) {
    case WIRE_CMD_HEARTBEAT: {
        Folio__V1__WorkerLoad *l = wire_decode_load(m->body, m->body_len, &err);
        if (!l) {
            fl_log_warn("bad heartbeat from group=%s: %s", c->groups->g[slot].name, err.msg);
            return;
        }
        if (rank == 0) {
            const bool was = c->groups->g[slot].healthy;
            groups_set_load(c->groups, slot, l);
            reconcile(c, slot, l, now);
            if (was != c->groups->g[slot].healthy)
                fl_log_info("group %s group=%s", c->groups->g[slot].healthy ? "healthy" : "unhealthy",
                            c->groups->g[slot].name);
        }
        folio__v1__worker_load__free_unpacked(l, NULL);
        return;
    }
    case WIRE_CMD_PARTIAL:
    case WIRE_CMD_FINAL:
        on_response(c, m, slot, now);
        return;
    case WIRE_CMD_DISCONNECT:
        if (rank == 0)
            coord_group_died(c, slot, "worker disconnected", now);
        else
            groups_forget_member(c->groups, slot, rank);
        return;
    default:
        fl_log_debug("unexpected worker command dropped group=%s cmd=%d", c->groups->g[slot].name, m->cmd);
    }
}

/* ---- timers ---- */

double coord_next_timer(coord_t *c, double now)
{
    const req_t *e = reqs_timer_first(c->reqs);
    return e ? e->timer - now : -1;
}

void coord_tick(coord_t *c, double now, bool heartbeat_due)
{
    req_t *e;
    while ((e = reqs_timer_first(c->reqs)) && e->timer <= now) {
        coord_cancel_on_worker(c, e);
        if (e->cancel_deadline > 0 && e->cancel_deadline <= now)
            coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__CANCELLED, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED,
                               "cancelled (the worker did not confirm)");
        else {
            char msg[96];
            snprintf(msg, sizeof msg, "deadline of %u ms exceeded", e->msg ? e->msg->timeout_ms : 0);
            coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED,
                               FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, msg);
        }
    }
    groups_t *G = c->groups;
    for (int s = 0; s < G->n; s++) {
        group_t *g = &G->g[s];
        for (int r = 0; r < GROUP_MAX_RANKS; r++) {
            group_member_t *w = &g->ranks[r];
            if (!w->present) continue;
            if (now - w->last_seen > 3 * c->hb_s) {
                char why[64];
                snprintf(why, sizeof why, "silent for %.1fs", now - w->last_seen);
                if (r == 0) {
                    coord_group_died(c, s, why, now);
                    break;
                }
                fl_log_warn("worker dead group=%s rank=%d why=%s", g->name, r, why);
                groups_forget_member(G, s, r);
                continue;
            }
            if (!heartbeat_due) continue;
            if (wire_send(c->workers, w->identity, w->identity_len, false, WIRE_HEADER_WORKER, WIRE_CMD_HEARTBEAT, NULL,
                          NULL) &&
                errno == EHOSTUNREACH) {
                if (r == 0) {
                    coord_group_died(c, s, "unreachable", now);
                    break;
                }
                groups_forget_member(G, s, r);
            }
        }
    }
}

void coord_shutdown(coord_t *c)
{
    int n = 0;
    for (int i = 0; i < reqs_capacity(c->reqs); i++) {
        req_t *e = reqs_at(c->reqs, i);
        if (!e->live) continue;
        coord_cancel_on_worker(c, e);
        coord_finish_error(c, e, FOLIO__V1__STATUS_CODE__UNAVAILABLE, FOLIO__V1__FINISH_REASON__FINISH_ERROR,
                           "the coordinator is shutting down");
        n++;
    }
    for (int s = 0; s < c->groups->n; s++)
        for (int r = 0; r < GROUP_MAX_RANKS; r++) {
            group_member_t *w = &c->groups->g[s].ranks[r];
            if (w->present) send_worker_empty(c, w->identity, w->identity_len, WIRE_CMD_DISCONNECT);
        }
    fl_log_info("coordinator stopped requests_ended=%d groups=%d", n, c->groups->n);
}
