/* workers.c - the coordinator's worker socket: registration, heartbeats both ways, liveness, and
 * the responses that workers stream, handed to dispatch.c to relay.
 *
 * Workers are known by their DEALER identity (group:rank:epoch:connection). A message from an
 * identity the registry does not know, other than READY, is answered with DISCONNECT so the worker
 * re-registers (after a coordinator restart, for instance). Every message from a worker counts as liveness; a
 * group whose rank 0 has been silent for 3 heartbeat intervals is dead, and dispatch.c fails its
 * requests over. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator.h"
#include "dispatch.h"
#include "log.h"

/* True when id was told DISCONNECT within window; otherwise remembers it as told now. */
static bool told_recently(coord_t *c, const uint8_t *id, size_t len, double now, double window)
{
    for (int i = 0; i < COORD_TOLD_MEMORY; i++)
        if (c->told[i].len == len && now - c->told[i].at < window && !memcmp(c->told[i].id, id, len)) return true;
    c->told[c->told_next].len = len;
    memcpy(c->told[c->told_next].id, id, len);
    c->told[c->told_next].at = now;
    c->told_next = (c->told_next + 1) % COORD_TOLD_MEMORY;
    return false;
}

static void send_worker_empty(coord_t *c, const uint8_t *id, size_t len, int cmd)
{
    wire_send(c->workers, id, len, false, WIRE_HEADER_WORKER, cmd, NULL, NULL);
}

/* ---- messages ---- */

/* Tensor parallelism: rank 0's communicator id to rank `rank` of group slot (JOIN), or to every
 * other registered rank when rank is 0 (rank 0 registered, maybe with a new id). */
static void send_joins(coord_t *c, int slot, int rank)
{
    const group_t *g = &c->groups->g[slot];
    if (g->tp_size < 2 || !g->ranks[0].present || !g->comm_id_len) return;
    Folio__V1__GroupJoin j = FOLIO__V1__GROUP_JOIN__INIT;
    j.group = (char *)g->name;
    j.tp_size = g->tp_size;
    j.comm_id.data = (uint8_t *)g->comm_id;
    j.comm_id.len = g->comm_id_len;
    j.leader_epoch = g->ranks[0].epoch;
    for (int r = rank ? rank : 1; r < (rank ? rank + 1 : (int)g->tp_size) && r < GROUP_MAX_RANKS; r++) {
        const group_member_t *w = &g->ranks[r];
        if (w->present)
            wire_send(c->workers, w->identity, w->identity_len, false, WIRE_HEADER_WORKER, WIRE_CMD_JOIN, &j.base, NULL);
    }
}

static void on_ready(coord_t *c, const wire_msg_t *m, double now)
{
    fl_error_t err = {0};
    Folio__V1__WorkerHello *h = wire_decode_hello(m->body, m->body_len, &err);
    if (!h) {
        fl_log_warn("worker READY rejected identity=%.*s: %s", (int)m->identity_len, (const char *)m->identity,
                    err.msg);
        return;
    }
    /* The same process again (a new connection, the same epoch), or a new one. */
    const int old_slot = groups_find(c->groups, h->group);
    const group_member_t *old =
        old_slot >= 0 && h->rank < GROUP_MAX_RANKS ? &c->groups->g[old_slot].ranks[h->rank] : NULL;
    const bool again = old && old->present && old->epoch == h->epoch;
    bool is_new, replaced;
    const int slot = groups_register(c->groups, h, m->identity, m->identity_len, now, &is_new, &replaced);
    if (slot < 0) {
        fl_log_warn("worker READY rejected group=%s rank=%u: registry full or rank too large", h->group, h->rank);
        folio__v1__worker_hello__free_unpacked(h, NULL);
        return;
    }
    if (is_new && router_add_group(c->router, slot, c->groups->g[slot].name, &err)) fl_log_error("router: %s", err.msg);
    if (h->rank == 0) {
        /* the key ZAP admitted this connection with: the worker's KV peer socket has the same */
        auth_user_key(m, c->groups->g[slot].kv_peer_key);
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
    /* A rank 0 that registers again has dropped whatever it was running. Its cache is new or its
     * events may have been lost with the old connection: the view starts over from its reset. */
    if (h->rank == 0) dispatch_forget_cache(c, slot);
    if (replaced && h->rank == 0) dispatch_group_restarted(c, slot, now);
    if (h->rank > 0 && h->tp_size != c->groups->g[slot].tp_size && c->groups->g[slot].ranks[0].present)
        fl_log_warn("worker group=%s rank=%u has tp=%u, its rank 0 tp=%u: not joined", h->group, h->rank, h->tp_size,
                    c->groups->g[slot].tp_size);
    else
        send_joins(c, slot, (int)h->rank);
    folio__v1__worker_hello__free_unpacked(h, NULL);
}

/* KV_EVENTS of group slot's rank 0: its prefix cache's changes into the index. */
static void on_kv_events(coord_t *c, const wire_msg_t *m, int slot)
{
    Folio__V1__KvEvents *ev = folio__v1__kv_events__unpack(NULL, m->body_len, m->body);
    if (!ev) {
        fl_log_warn("bad KV_EVENTS from group=%s: body of %zu bytes is not a valid folio.v1.KvEvents",
                    c->groups->g[slot].name, m->body_len);
        return;
    }
    const size_t dropped =
        kv_index_apply(c->kv_index, slot, ev->seq, ev->reset, ev->stored, ev->n_stored, ev->removed, ev->n_removed);
    if (dropped)
        fl_log_info("kv events gap group=%s seq=%llu: its %zu indexed blocks dropped", c->groups->g[slot].name,
                    (unsigned long long)ev->seq, dropped);
    folio__v1__kv_events__free_unpacked(ev, NULL);
}

static void on_response(coord_t *c, const wire_msg_t *m, int slot, double now)
{
    fl_error_t err = {0};
    Folio__V1__Response *r = wire_decode_response(m->body, m->body_len, &err);
    if (!r) {
        fl_log_warn("bad response from group=%s: %s", c->groups->g[slot].name, err.msg);
        return;
    }
    dispatch_relay(c, slot, r, m->cmd == WIRE_CMD_FINAL, now);
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
        if (m->cmd != WIRE_CMD_DISCONNECT && !told_recently(c, m->identity, m->identity_len, now, c->hb_s)) {
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
            dispatch_reconcile(c, slot, l->live_ids, l->n_live_ids, l->step_running_s, now);
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
    case WIRE_CMD_KV_EVENTS:
        if (rank == 0) on_kv_events(c, m, slot); /* rank 0 owns the group's block tables */
        return;
    case WIRE_CMD_DISCONNECT:
        if (rank == 0 || c->groups->g[slot].tp_size > 1) /* a tensor-parallel group needs every rank */
            dispatch_group_died(c, slot, rank == 0 ? "worker disconnected" : "a rank disconnected", now);
        else
            groups_forget_member(c->groups, slot, rank);
        return;
    default:
        fl_log_debug("unexpected worker command dropped group=%s cmd=%d", c->groups->g[slot].name, m->cmd);
    }
}

/* ---- liveness ---- */

void coord_workers_tick(coord_t *c, double now, bool heartbeat_due)
{
    groups_t *G = c->groups;
    for (int s = 0; s < G->n; s++) {
        group_t *g = &G->g[s];
        for (int r = 0; r < GROUP_MAX_RANKS; r++) {
            group_member_t *w = &g->ranks[r];
            if (!w->present) continue;
            if (now - w->last_seen > 3 * c->hb_s) {
                char why[64];
                snprintf(why, sizeof why, "rank %d silent for %.1fs", r, now - w->last_seen);
                if (r == 0 || g->tp_size > 1) {
                    dispatch_group_died(c, s, why, now);
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
                if (r == 0 || g->tp_size > 1) {
                    dispatch_group_died(c, s, r == 0 ? "unreachable" : "a rank is unreachable", now);
                    break;
                }
                groups_forget_member(G, s, r);
            }
        }
    }
}

void coord_workers_disconnect(coord_t *c)
{
    for (int s = 0; s < c->groups->n; s++)
        for (int r = 0; r < GROUP_MAX_RANKS; r++) {
            group_member_t *w = &c->groups->g[s].ranks[r];
            if (w->present) send_worker_empty(c, w->identity, w->identity_len, WIRE_CMD_DISCONNECT);
        }
}
