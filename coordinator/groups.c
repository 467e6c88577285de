/* groups.c - the worker group registry; see groups.h. */
#include "groups.h"

#include <stdio.h>
#include <string.h>

void groups_init(groups_t *gs)
{
    memset(gs, 0, sizeof *gs);
}

int groups_find(const groups_t *gs, const char *name)
{
    for (int i = 0; i < gs->n; i++)
        if (!strcmp(gs->g[i].name, name)) return i;
    return -1;
}

int groups_find_member(const groups_t *gs, const uint8_t *identity, size_t len, int *rank)
{
    for (int i = 0; i < gs->n; i++)
        for (int r = 0; r < GROUP_MAX_RANKS; r++) {
            const group_member_t *m = &gs->g[i].ranks[r];
            if (m->present && m->identity_len == len && !memcmp(m->identity, identity, len)) {
                if (rank) *rank = r;
                return i;
            }
        }
    return -1;
}

void groups_refresh(groups_t *gs, int slot)
{
    group_t *g = &gs->g[slot];
    bool all_ranks = true; /* a tensor-parallel group computes only with every rank */
    for (uint32_t r = 1; r < g->tp_size && r < GROUP_MAX_RANKS; r++) all_ranks = all_ranks && g->ranks[r].present;
    g->healthy = g->ranks[0].present && g->have_load && g->load.engine_ok && all_ranks;
    gs->table[slot].name = g->name;
    gs->table[slot].routable = g->healthy && !g->draining && !g->load.draining; /* admin drain, or SIGTERM */
}

int groups_register(groups_t *gs, const Folio__V1__WorkerHello *h, const uint8_t *identity, size_t len, double now,
                    bool *is_new, bool *replaced)
{
    *is_new = *replaced = false;
    if (h->rank >= GROUP_MAX_RANKS || h->tp_size > GROUP_MAX_RANKS || len > WIRE_MAX_IDENTITY ||
        h->comm_id.len > GROUP_COMM_ID_MAX)
        return FL_ERANGE;
    /* The same identity registered elsewhere (a worker that changed group) leaves its old place. */
    int old_rank;
    const int old = groups_find_member(gs, identity, len, &old_rank);
    int slot = groups_find(gs, h->group);
    if (old >= 0 && (old != slot || old_rank != (int)h->rank)) groups_forget_member(gs, old, old_rank);
    if (slot < 0) {
        if (gs->n == GROUPS_MAX) return FL_ERANGE;
        slot = gs->n++;
        memset(&gs->g[slot], 0, sizeof gs->g[slot]);
        snprintf(gs->g[slot].name, sizeof gs->g[slot].name, "%s", h->group);
        *is_new = true;
    }
    group_t *g = &gs->g[slot];
    group_member_t *m = &g->ranks[h->rank];
    const bool same = m->present && m->identity_len == len && !memcmp(m->identity, identity, len);
    if (h->rank == 0) {
        *replaced = m->present;          /* a new epoch, or the same worker starting over */
        if (!same) g->have_load = false; /* a new process: healthy only after its first load */
        g->tp_size = h->tp_size;
        g->kv_blocks = h->kv_blocks;
        g->block_size = h->block_size;
        /* A worker may advertise its model's context alone: what it can serve is also bounded by
         * its KV cache (a sequence needs all its blocks at once). */
        const uint64_t kv_tokens = (uint64_t)h->kv_blocks * h->block_size;
        g->max_context = h->max_context && h->max_context < kv_tokens ? h->max_context
                         : kv_tokens > UINT32_MAX                     ? UINT32_MAX
                                                                      : (uint32_t)kv_tokens;
        g->restarts = h->restarts;
        snprintf(g->model_id, sizeof g->model_id, "%s", h->model_id);
        snprintf(g->kv_type, sizeof g->kv_type, "%s", h->kv_type);
        g->kv_bytes_per_token = h->kv_bytes_per_token;
        snprintf(g->kv_peer, sizeof g->kv_peer, "%s",
                 wire_endpoint_ok(h->kv_peer_endpoint) ? h->kv_peer_endpoint : "");
        g->comm_id_len = h->comm_id.len;
        if (h->comm_id.len) memcpy(g->comm_id, h->comm_id.data, h->comm_id.len);
    }
    m->present = true;
    memcpy(m->identity, identity, len);
    m->identity_len = (uint8_t)len;
    m->epoch = h->epoch;
    m->last_seen = now;
    m->restarts = h->restarts;
    groups_refresh(gs, slot);
    return slot;
}

void groups_forget_member(groups_t *gs, int slot, int rank)
{
    gs->g[slot].ranks[rank].present = false;
    if (rank == 0) gs->g[slot].have_load = false;
    groups_refresh(gs, slot);
}

void groups_forget(groups_t *gs, int slot)
{
    for (int r = 0; r < GROUP_MAX_RANKS; r++) gs->g[slot].ranks[r].present = false;
    gs->g[slot].have_load = false;
    groups_refresh(gs, slot);
}

void groups_set_load(groups_t *gs, int slot, const Folio__V1__WorkerLoad *l)
{
    group_t *g = &gs->g[slot];
    g->load = *l;
    g->load.base.n_unknown_fields = 0;
    g->load.base.unknown_fields = NULL;
    g->load.n_live_ids = 0; /* borrowed from the message, which is freed after this */
    g->load.live_ids = NULL;
    g->have_load = true;
    groups_refresh(gs, slot);
}

void groups_set_draining(groups_t *gs, int slot, bool draining)
{
    gs->g[slot].draining = draining;
    groups_refresh(gs, slot);
}

int groups_healthy_count(const groups_t *gs)
{
    int n = 0;
    for (int i = 0; i < gs->n; i++) n += gs->g[i].healthy;
    return n;
}

bool groups_serving(const groups_t *gs)
{
    for (int i = 0; i < gs->n; i++)
        if (gs->table[i].routable) return true;
    return false;
}

uint32_t groups_max_context(const groups_t *gs)
{
    uint32_t best = 0;
    for (int i = 0; i < gs->n; i++)
        if (gs->table[i].routable && gs->g[i].max_context > best) best = gs->g[i].max_context;
    return best;
}
