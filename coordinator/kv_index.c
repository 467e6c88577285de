/* kv_index.c - (block hash, group) entries in one open-addressing table; see kv_index.h.
 *
 * A slot holds one (hash, group) pair, so "which groups hold block h" is one probe per group, and a
 * prompt's match against a group is a walk down its hashes that stops at the first miss. The table
 * has at least twice as many slots as entries allowed (load <= 1/2), is probed linearly, and
 * deletion shifts the following entries back instead of leaving tombstones (as the worker's prefix
 * cache does, worker/kv_cache.c). A slot whose generation is not its group's is stale: invisible
 * to lookups, reused by a store of the same pair, reclaimed by the CLOCK hand first. */
#include "kv_index.h"

#include <stdbool.h>
#include <stdlib.h>

typedef struct kv_slot {
    uint64_t h;
    uint32_t gen;
    uint16_t group;
    uint8_t used; /* CLOCK reference bit: matched or stored since the hand last passed */
    uint8_t full;
} kv_slot_t;

struct kv_index {
    kv_slot_t *t;
    uint64_t mask;
    size_t max_entries, n_occupied, n_live;
    uint64_t hand;
    uint64_t evictions;
    uint32_t gen[KV_INDEX_MAX_GROUPS];
    size_t count[KV_INDEX_MAX_GROUPS];
    uint64_t next_seq[KV_INDEX_MAX_GROUPS]; /* 0: accept any (after a clear) */
};

kv_index_t *kv_index_new(size_t max_entries, fl_error_t *err)
{
    if (max_entries < 1 || max_entries > ((size_t)1 << 40)) {
        fl_fail(err, FL_EINVAL, "kv index: %zu entries is out of range (1 to 2^40)", max_entries);
        return NULL;
    }
    kv_index_t *ix = calloc(1, sizeof *ix);
    size_t n_slots = 2;
    while (n_slots < 2 * max_entries) n_slots *= 2;
    if (ix) ix->t = calloc(n_slots, sizeof *ix->t);
    if (!ix || !ix->t) {
        free(ix);
        fl_fail(err, FL_ENOMEM, "kv index: out of memory for %zu entries", max_entries);
        return NULL;
    }
    /* Touched now, every page: the table is the index's whole memory, so a coordinator's RSS is
     * flat from the start instead of growing with the index until it is full (which the soak test
     * could not tell from a leak). */
    for (size_t off = 0; off < n_slots * sizeof *ix->t; off += 4096) ((volatile uint8_t *)ix->t)[off] = 0;
    ix->mask = n_slots - 1;
    ix->max_entries = max_entries;
    return ix;
}

void kv_index_destroy(kv_index_t **ip)
{
    if (!ip || !*ip) return;
    free((*ip)->t);
    free(*ip);
    *ip = NULL;
}

static uint64_t home_of(const kv_index_t *ix, uint64_t h, int group)
{
    /* h is already uniform; the group's odd multiple spreads one block's groups apart. */
    return (h ^ ((uint64_t)(group + 1) * 0x9e3779b97f4a7c15ull)) & ix->mask;
}

static bool is_live(const kv_index_t *ix, const kv_slot_t *s)
{
    return s->full && s->gen == ix->gen[s->group];
}

/* The slot of (h, group), live or stale, or -1. */
static int64_t find(const kv_index_t *ix, uint64_t h, int group)
{
    for (uint64_t i = home_of(ix, h, group);; i = (i + 1) & ix->mask) {
        const kv_slot_t *s = &ix->t[i];
        if (!s->full) return -1;
        if (s->h == h && s->group == group) return (int64_t)i;
    }
}

/* Empties slot i; later entries of its probe run move back into the hole unless their home lies
 * cyclically in (hole, their slot], where they already are reachable. */
static void delete_at(kv_index_t *ix, uint64_t i)
{
    kv_slot_t *t = ix->t;
    if (is_live(ix, &t[i])) {
        ix->count[t[i].group]--;
        ix->n_live--;
    }
    uint64_t hole = i;
    for (uint64_t j = (hole + 1) & ix->mask; t[j].full; j = (j + 1) & ix->mask) {
        const uint64_t home = home_of(ix, t[j].h, t[j].group);
        const bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays) continue;
        t[hole] = t[j];
        hole = j;
    }
    t[hole].full = 0;
    ix->n_occupied--;
}

/* CLOCK: frees one slot, a stale entry or a live one not used since the hand last passed it. */
static void evict_one(kv_index_t *ix)
{
    for (;;) {
        kv_slot_t *s = &ix->t[ix->hand];
        if (s->full) {
            const bool live = is_live(ix, s);
            if (!live || !s->used) {
                ix->evictions += live;
                delete_at(ix, ix->hand); /* a shifted entry may now sit under the hand: not advanced */
                return;
            }
            s->used = 0;
        }
        ix->hand = (ix->hand + 1) & ix->mask;
    }
}

void kv_index_store(kv_index_t *ix, int group, uint64_t h)
{
    if (group < 0 || group >= KV_INDEX_MAX_GROUPS) return;
    int64_t at = find(ix, h, group);
    if (at >= 0) {
        kv_slot_t *s = &ix->t[at];
        if (!is_live(ix, s)) {
            s->gen = ix->gen[group];
            ix->count[group]++;
            ix->n_live++;
        }
        s->used = 1;
        return;
    }
    if (ix->n_occupied >= ix->max_entries) evict_one(ix);
    uint64_t i = home_of(ix, h, group);
    while (ix->t[i].full) i = (i + 1) & ix->mask;
    ix->t[i] = (kv_slot_t){.h = h, .gen = ix->gen[group], .group = (uint16_t)group, .used = 1, .full = 1};
    ix->n_occupied++;
    ix->count[group]++;
    ix->n_live++;
}

void kv_index_remove(kv_index_t *ix, int group, uint64_t h)
{
    if (group < 0 || group >= KV_INDEX_MAX_GROUPS) return;
    const int64_t at = find(ix, h, group);
    if (at >= 0) delete_at(ix, (uint64_t)at);
}

void kv_index_clear_group(kv_index_t *ix, int group)
{
    if (!ix || group < 0 || group >= KV_INDEX_MAX_GROUPS) return;
    ix->n_live -= ix->count[group];
    ix->count[group] = 0;
    ix->gen[group]++;
    ix->next_seq[group] = 0;
}

size_t kv_index_apply(kv_index_t *ix, int group, uint64_t seq, int reset, const uint64_t *stored, size_t n_stored,
                      const uint64_t *removed, size_t n_removed)
{
    if (!ix || group < 0 || group >= KV_INDEX_MAX_GROUPS) return 0;
    size_t dropped = 0;
    if (!reset && ix->next_seq[group] && seq != ix->next_seq[group]) dropped = ix->count[group];
    if (reset || dropped) kv_index_clear_group(ix, group);
    ix->next_seq[group] = seq + 1;
    for (size_t i = 0; i < n_removed; i++) kv_index_remove(ix, group, removed[i]);
    for (size_t i = 0; i < n_stored; i++) kv_index_store(ix, group, stored[i]);
    return dropped;
}

int kv_index_match(kv_index_t *ix, int group, const uint64_t *hashes, int n)
{
    if (!ix || group < 0 || group >= KV_INDEX_MAX_GROUPS || !ix->count[group]) return 0;
    int i = 0;
    for (; i < n; i++) {
        const int64_t at = find(ix, hashes[i], group);
        if (at < 0 || !is_live(ix, &ix->t[at])) break;
        ix->t[at].used = 1;
    }
    return i;
}

bool kv_index_holds(const kv_index_t *ix, int group, uint64_t h)
{
    if (!ix || group < 0 || group >= KV_INDEX_MAX_GROUPS || !ix->count[group]) return false;
    const int64_t at = find(ix, h, group);
    return at >= 0 && is_live(ix, &ix->t[at]);
}

size_t kv_index_size(const kv_index_t *ix) { return ix ? ix->n_live : 0; }

size_t kv_index_group_size(const kv_index_t *ix, int group)
{
    return ix && group >= 0 && group < KV_INDEX_MAX_GROUPS ? ix->count[group] : 0;
}

size_t kv_index_capacity(const kv_index_t *ix) { return ix ? ix->max_entries : 0; }

uint64_t kv_index_evictions(const kv_index_t *ix) { return ix ? ix->evictions : 0; }
