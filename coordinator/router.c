/* router.c - routing policies: consistent hashing with bounded loads, cache-aware, round-robin,
 * least-loaded.
 *
 * The ring is a sorted array of (point, slot) pairs; a pick binary-searches the key's successor and
 * walks clockwise, checking each point's group against the load bound, so a pick costs
 * O(log points) plus the few points it skips. Points are added when a group first registers and
 * never removed: a dead or draining group is skipped by the walk (its keys go to its clockwise
 * neighbours and come back when it recovers), which keeps every other group's keys where they were. */
#include "router.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

typedef struct ring_point {
    uint64_t point;
    int slot;
} ring_point_t;

struct router {
    router_policy_t policy;
    double load_factor;
    int load_floor;
    ring_point_t *ring;
    int n_points, cap_points;
    uint64_t rr_next; /* round-robin cursor */
};

router_t *router_new(router_policy_t policy, double load_factor, int load_floor, fl_error_t *err)
{
    if (!(load_factor >= 1.0)) {
        fl_fail(err, FL_EINVAL, "router: load factor %g must be at least 1", load_factor);
        return NULL;
    }
    router_t *r = calloc(1, sizeof *r);
    if (!r) {
        fl_fail(err, FL_ENOMEM, "router: out of memory");
        return NULL;
    }
    r->policy = policy;
    r->load_factor = load_factor;
    r->load_floor = load_floor > 1 ? load_floor : 1;
    return r;
}

void router_destroy(router_t **rp)
{
    if (!rp || !*rp) return;
    free((*rp)->ring);
    free(*rp);
    *rp = NULL;
}

static int point_cmp(const void *a, const void *b)
{
    const ring_point_t *x = a, *y = b;
    if (x->point != y->point) return x->point < y->point ? -1 : 1;
    return x->slot - y->slot; /* equal points: a stable order whatever the insertion order */
}

int router_add_group(router_t *r, int slot, const char *name, fl_error_t *err)
{
    if (r->n_points + ROUTER_VNODES > r->cap_points) {
        const int cap = r->cap_points ? 2 * r->cap_points : 16 * ROUTER_VNODES;
        ring_point_t *p = realloc(r->ring, (size_t)cap * sizeof *p);
        if (!p) return fl_fail(err, FL_ENOMEM, "router: out of memory for the ring");
        r->ring = p;
        r->cap_points = cap;
    }
    char buf[512];
    for (int i = 0; i < ROUTER_VNODES; i++) {
        const int n = snprintf(buf, sizeof buf, "%s#%d", name, i);
        r->ring[r->n_points++] =
            (ring_point_t){XXH3_64bits(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1), slot};
    }
    qsort(r->ring, (size_t)r->n_points, sizeof *r->ring, point_cmp);
    return FL_OK;
}

uint64_t router_key(const block_hash_t *hashes, int n_hashes, int route_blocks, block_hash_t salt,
                    const int32_t *tokens, int n_tokens)
{
    if (n_hashes > 0 && route_blocks > 0) return hashes[(n_hashes < route_blocks ? n_hashes : route_blocks) - 1].lo;
    return block_hash_next(salt, tokens, n_tokens).lo;
}

static int pick_least_loaded(const router_group_t *g, int n, int exclude)
{
    int best = -1;
    for (int i = 0; i < n; i++) {
        if (!g[i].routable || i == exclude) continue;
        if (best < 0 || g[i].inflight < g[best].inflight ||
            (g[i].inflight == g[best].inflight && strcmp(g[i].name, g[best].name) < 0))
            best = i;
    }
    return best;
}

static int pick_round_robin(router_t *r, const router_group_t *g, int n, int exclude)
{
    for (int k = 0; k < n; k++) {
        const int i = (int)(r->rr_next++ % (uint64_t)n);
        if (g[i].routable && i != exclude) return i;
    }
    return -1;
}

/* The bounded-load limit: a group may take a request while its in-flight count is below it;
 * negative when no group is routable. */
static double load_bound(const router_t *r, const router_group_t *g, int n, int exclude)
{
    uint64_t total = 0;
    int n_ok = 0;
    for (int i = 0; i < n; i++)
        if (g[i].routable && i != exclude) {
            total += g[i].inflight;
            n_ok++;
        }
    if (!n_ok) return -1;
    const double bound = ceil(r->load_factor * (double)(total + 1) / n_ok);
    return bound < r->load_floor ? r->load_floor : bound;
}

/* The first ring point >= key (n_points when past the end, which wraps to the start). */
static int ring_successor(const router_t *r, uint64_t key)
{
    int lo = 0, hi = r->n_points;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (r->ring[mid].point < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static bool under_bound(const router_group_t *g, int s, int n, int exclude, double bound)
{
    return s < n && s != exclude && g[s].routable && (double)g[s].inflight < bound;
}

static int pick_prefix(router_t *r, uint64_t key, const router_group_t *g, int n, int exclude)
{
    const double bound = load_bound(r, g, n, exclude);
    if (bound < 0) return -1;
    const int lo = ring_successor(r, key);
    for (int k = 0; k < r->n_points; k++) {
        const int s = r->ring[(lo + k) % r->n_points].slot;
        if (under_bound(g, s, n, exclude, bound)) return s;
    }
    /* Unreachable while c >= 1 (some group is at or below the average), but never fail a pick. */
    return pick_least_loaded(g, n, exclude);
}

static int pick_cache_aware(router_t *r, uint64_t key, const router_group_t *g, int n, int exclude)
{
    const double bound = load_bound(r, g, n, exclude);
    if (bound < 0) return -1;
    uint32_t best = 0;
    for (int s = 0; s < n; s++)
        if (under_bound(g, s, n, exclude, bound) && g[s].cached_blocks > best) best = g[s].cached_blocks;
    const int lo = ring_successor(r, key);
    if (!best) { /* a new prefix: where it was placed, else the group holding the fewest prefixes, the
                  * first clockwise of them */
        for (int s = 0; s < n; s++)
            if (g[s].placed && under_bound(g, s, n, exclude, bound)) return s;
        int pick = -1;
        for (int k = 0; k < r->n_points; k++) {
            const int s = r->ring[(lo + k) % r->n_points].slot;
            if (under_bound(g, s, n, exclude, bound) && (pick < 0 || g[s].prefixes < g[pick].prefixes)) pick = s;
        }
        return pick >= 0 ? pick : pick_prefix(r, key, g, n, exclude);
    }
    for (int k = 0; k < r->n_points; k++) {
        const int s = r->ring[(lo + k) % r->n_points].slot;
        if (under_bound(g, s, n, exclude, bound) && g[s].cached_blocks == best) return s;
    }
    /* A slot without ring points (not added): the lowest slot with the match. */
    for (int s = 0; s < n; s++)
        if (under_bound(g, s, n, exclude, bound) && g[s].cached_blocks == best) return s;
    return pick_prefix(r, key, g, n, exclude);
}

int router_pick(router_t *r, uint64_t key, const router_group_t *groups, int n_groups, int exclude)
{
    switch (r->policy) {
    case ROUTER_ROUND_ROBIN:
        return pick_round_robin(r, groups, n_groups, exclude);
    case ROUTER_LEAST_LOADED:
        return pick_least_loaded(groups, n_groups, exclude);
    case ROUTER_CACHE_AWARE:
        return pick_cache_aware(r, key, groups, n_groups, exclude);
    default:
        return pick_prefix(r, key, groups, n_groups, exclude);
    }
}

router_policy_t router_policy(const router_t *r)
{
    return r->policy;
}

const char *router_policy_name(router_policy_t p)
{
    switch (p) {
    case ROUTER_ROUND_ROBIN:
        return "round-robin";
    case ROUTER_LEAST_LOADED:
        return "least-loaded";
    case ROUTER_CACHE_AWARE:
        return "cache-aware";
    default:
        return "prefix";
    }
}

int router_policy_parse(const char *s, router_policy_t *out)
{
    if (!s) return FL_EINVAL;
    if (!strcmp(s, "prefix"))
        *out = ROUTER_PREFIX;
    else if (!strcmp(s, "round-robin"))
        *out = ROUTER_ROUND_ROBIN;
    else if (!strcmp(s, "least-loaded"))
        *out = ROUTER_LEAST_LOADED;
    else if (!strcmp(s, "cache-aware"))
        *out = ROUTER_CACHE_AWARE;
    else
        return FL_EINVAL;
    return FL_OK;
}
