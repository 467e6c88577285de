/* requests.c - pool, id maps, tenant counts and timer heap of in-flight requests; see requests.h.
 *
 * Map slots hold pool index + 1 (0 = empty). The tenant table holds (hash, count) pairs, count 0 =
 * empty. The tables are at least twice the pool, so probes stay short. Deletion shifts later
 * members of the probe run back instead of leaving tombstones. */
#include "requests.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

struct reqs {
    req_t *pool;
    int cap, count;
    int *free_list; /* stack of free pool indices */
    int n_free;
    uint32_t *by_wid, *by_client;
    uint64_t *tenant_hash; /* with tenant_count: live entries per tenant */
    int32_t *tenant_count;
    uint64_t tenant_seed;
    uint32_t mask;
    int *heap; /* pool indices ordered by timer */
    int n_heap;
};

static uint64_t wid_hash(uint64_t wid)
{
    return wid * 0x9E3779B97F4A7C15ull;
}

static uint64_t client_hash(const uint8_t *client, size_t len, uint64_t id)
{
    return XXH3_64bits_withSeed(client, len, id);
}

reqs_t *reqs_new(int capacity, fl_error_t *err)
{
    reqs_t *r = calloc(1, sizeof *r);
    if (!r || capacity < 1 || capacity > (1 << 24)) {
        free(r);
        fl_fail(err, capacity < 1 ? FL_EINVAL : FL_ENOMEM, "requests: cannot make a table of %d", capacity);
        return NULL;
    }
    uint32_t size = 16;
    while (size < 2u * (uint32_t)capacity) size <<= 1;
    r->cap = capacity;
    r->mask = size - 1;
    r->pool = calloc((size_t)capacity, sizeof *r->pool);
    r->free_list = malloc((size_t)capacity * sizeof *r->free_list);
    r->by_wid = calloc(size, sizeof *r->by_wid);
    r->by_client = calloc(size, sizeof *r->by_client);
    r->tenant_hash = calloc(size, sizeof *r->tenant_hash);
    r->tenant_count = calloc(size, sizeof *r->tenant_count);
    r->tenant_seed = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)r;
    r->heap = malloc((size_t)capacity * sizeof *r->heap);
    if (!r->pool || !r->free_list || !r->by_wid || !r->by_client || !r->tenant_hash || !r->tenant_count || !r->heap) {
        reqs_destroy(&r);
        fl_fail(err, FL_ENOMEM, "requests: out of memory for %d entries", capacity);
        return NULL;
    }
    for (int i = 0; i < capacity; i++) r->free_list[i] = capacity - 1 - i;
    r->n_free = capacity;
    return r;
}

static void release(req_t *e)
{
    if (e->tokens_owned) free(e->tokens);
    if (e->msg) folio__v1__request__free_unpacked(e->msg, NULL);
    free(e->sent);
    e->sent = NULL;
    e->tokens = NULL;
    e->msg = NULL;
}

void reqs_destroy(reqs_t **rp)
{
    if (!rp || !*rp) return;
    reqs_t *r = *rp;
    if (r->pool)
        for (int i = 0; i < r->cap; i++)
            if (r->pool[i].live) release(&r->pool[i]);
    free(r->pool);
    free(r->free_list);
    free(r->by_wid);
    free(r->by_client);
    free(r->tenant_hash);
    free(r->tenant_count);
    free(r->heap);
    free(r);
    *rp = NULL;
}

int reqs_capacity(const reqs_t *r)
{
    return r->cap;
}
int reqs_count(const reqs_t *r)
{
    return r->count;
}
req_t *reqs_at(reqs_t *r, int i)
{
    return &r->pool[i];
}

/* ---- open addressing ---- */

static void map_insert(reqs_t *r, uint32_t *tab, uint64_t h, int idx)
{
    uint32_t i = (uint32_t)(h >> 32) & r->mask;
    while (tab[i]) i = (i + 1) & r->mask;
    tab[i] = (uint32_t)idx + 1;
}

static uint64_t home_hash(reqs_t *r, const uint32_t *tab, uint32_t v)
{
    const req_t *e = &r->pool[v - 1];
    return tab == r->by_wid ? wid_hash(e->wid) : e->client_hash;
}

static void map_remove(reqs_t *r, uint32_t *tab, uint64_t h, int idx)
{
    uint32_t i = (uint32_t)(h >> 32) & r->mask;
    while (tab[i] && tab[i] != (uint32_t)idx + 1) i = (i + 1) & r->mask;
    if (!tab[i]) return;
    /* Backward shift: move later members of the run into the hole when their home allows it. */
    for (uint32_t j = i;;) {
        j = (j + 1) & r->mask;
        if (!tab[j]) break;
        const uint32_t k = (uint32_t)(home_hash(r, tab, tab[j]) >> 32) & r->mask;
        /* tab[j] may move to i unless its home k lies cyclically in (i, j]. */
        const bool k_in = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!k_in) {
            tab[i] = tab[j];
            i = j;
        }
    }
    tab[i] = 0;
}

/* ---- tenant counts ---- */

static uint64_t tenant_hash(const reqs_t *r, const char *tenant)
{
    return XXH3_64bits_withSeed(tenant, strlen(tenant), r->tenant_seed);
}

/* The slot holding h, or the empty slot where it would go. */
static uint32_t tenant_slot(const reqs_t *r, uint64_t h)
{
    uint32_t i = (uint32_t)(h >> 32) & r->mask;
    while (r->tenant_count[i] && r->tenant_hash[i] != h) i = (i + 1) & r->mask;
    return i;
}

void reqs_bind_tenant(reqs_t *r, req_t *e, const char *tenant)
{
    if (e->tenant_bound) return;
    e->tenant_hash = tenant_hash(r, tenant);
    const uint32_t i = tenant_slot(r, e->tenant_hash);
    r->tenant_hash[i] = e->tenant_hash;
    r->tenant_count[i]++;
    e->tenant_bound = true;
}

int reqs_tenant_count(const reqs_t *r, const char *tenant)
{
    return r->tenant_count[tenant_slot(r, tenant_hash(r, tenant))];
}

static void tenant_unbind(reqs_t *r, req_t *e)
{
    if (!e->tenant_bound) return;
    e->tenant_bound = false;
    uint32_t i = tenant_slot(r, e->tenant_hash);
    if (!r->tenant_count[i] || --r->tenant_count[i]) return;
    /* The last of its tenant: backward shift, as map_remove. */
    for (uint32_t j = i;;) {
        j = (j + 1) & r->mask;
        if (!r->tenant_count[j]) break;
        const uint32_t k = (uint32_t)(r->tenant_hash[j] >> 32) & r->mask;
        const bool k_in = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!k_in) {
            r->tenant_hash[i] = r->tenant_hash[j];
            r->tenant_count[i] = r->tenant_count[j];
            i = j;
        }
    }
    r->tenant_count[i] = 0;
}

/* ---- heap ---- */

static bool heap_less(reqs_t *r, int a, int b)
{
    return r->pool[r->heap[a]].timer < r->pool[r->heap[b]].timer;
}

static void heap_swap(reqs_t *r, int a, int b)
{
    const int t = r->heap[a];
    r->heap[a] = r->heap[b];
    r->heap[b] = t;
    r->pool[r->heap[a]].heap_pos = a;
    r->pool[r->heap[b]].heap_pos = b;
}

static void heap_up(reqs_t *r, int i)
{
    while (i > 0 && heap_less(r, i, (i - 1) / 2)) {
        heap_swap(r, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void heap_down(reqs_t *r, int i)
{
    for (;;) {
        const int a = 2 * i + 1, b = a + 1;
        int m = i;
        if (a < r->n_heap && heap_less(r, a, m)) m = a;
        if (b < r->n_heap && heap_less(r, b, m)) m = b;
        if (m == i) return;
        heap_swap(r, i, m);
        i = m;
    }
}

static void heap_remove(reqs_t *r, req_t *e)
{
    if (e->heap_pos < 0) return;
    const int i = e->heap_pos;
    r->n_heap--;
    if (i != r->n_heap) {
        heap_swap(r, i, r->n_heap);
        heap_down(r, i);
        heap_up(r, i);
    }
    e->heap_pos = -1;
}

void reqs_timer_update(reqs_t *r, req_t *e)
{
    double t = e->deadline;
    if (e->cancel_deadline > 0 && (t == 0 || e->cancel_deadline < t)) t = e->cancel_deadline;
    if (t == 0) {
        heap_remove(r, e);
        e->timer = 0;
        return;
    }
    e->timer = t;
    if (e->heap_pos < 0) {
        e->heap_pos = r->n_heap;
        r->heap[r->n_heap++] = (int)(e - r->pool);
        heap_up(r, e->heap_pos);
    } else {
        heap_down(r, e->heap_pos);
        heap_up(r, e->heap_pos);
    }
}

req_t *reqs_timer_first(reqs_t *r)
{
    return r->n_heap ? &r->pool[r->heap[0]] : NULL;
}

/* ---- entries ---- */

req_t *reqs_alloc(reqs_t *r)
{
    if (!r->n_free) return NULL;
    req_t *e = &r->pool[r->free_list[--r->n_free]];
    memset(e, 0, sizeof *e);
    e->live = true;
    e->group = -1;
    e->heap_pos = -1;
    r->count++;
    return e;
}

void reqs_free(reqs_t *r, req_t *e)
{
    if (!e || !e->live) return;
    const int idx = (int)(e - r->pool);
    if (e->wid) map_remove(r, r->by_wid, wid_hash(e->wid), idx);
    if (e->client_bound) map_remove(r, r->by_client, e->client_hash, idx);
    tenant_unbind(r, e);
    heap_remove(r, e);
    release(e);
    e->live = false;
    e->wid = 0;
    e->client_bound = false;
    r->free_list[r->n_free++] = idx;
    r->count--;
}

void reqs_set_wid(reqs_t *r, req_t *e, uint64_t wid)
{
    const int idx = (int)(e - r->pool);
    if (e->wid) map_remove(r, r->by_wid, wid_hash(e->wid), idx);
    e->wid = wid;
    if (wid) map_insert(r, r->by_wid, wid_hash(wid), idx);
}

req_t *reqs_by_wid(reqs_t *r, uint64_t wid)
{
    if (!wid) return NULL;
    for (uint32_t i = (uint32_t)(wid_hash(wid) >> 32) & r->mask; r->by_wid[i]; i = (i + 1) & r->mask) {
        req_t *e = &r->pool[r->by_wid[i] - 1];
        if (e->wid == wid) return e;
    }
    return NULL;
}

req_t *reqs_by_client(reqs_t *r, const uint8_t *client, size_t len, uint64_t client_id)
{
    const uint64_t h = client_hash(client, len, client_id);
    for (uint32_t i = (uint32_t)(h >> 32) & r->mask; r->by_client[i]; i = (i + 1) & r->mask) {
        req_t *e = &r->pool[r->by_client[i] - 1];
        if (e->client_hash == h && e->client_id == client_id && e->client_len == len && !memcmp(e->client, client, len))
            return e;
    }
    return NULL;
}

int reqs_bind_client(reqs_t *r, req_t *e)
{
    if (reqs_by_client(r, e->client, e->client_len, e->client_id)) return FL_EINVAL;
    e->client_hash = client_hash(e->client, e->client_len, e->client_id);
    map_insert(r, r->by_client, e->client_hash, (int)(e - r->pool));
    e->client_bound = true;
    return FL_OK;
}
