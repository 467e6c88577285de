/* kv_events.c - prefix-cache events batched for the coordinator; see kv_events.h.
 *
 * Pending events are an array of (hash, stored) with an open-addressing map from hash to its
 * place, so a second event for a block replaces the first in O(1). Everything is sized at
 * creation; the map is cleared after each batch (a few KiB). */
#include "kv_events.h"

#include <stdlib.h>
#include <string.h>

struct kv_events {
    int cap;
    uint64_t *hash;   /* [cap] pending blocks */
    uint8_t *stored;  /* [cap] their last event */
    int n;
    int32_t *map;     /* [mask + 1] index into hash, -1 empty */
    uint32_t mask;
    uint64_t *out_stored, *out_removed; /* [cap] the batch handed out */
    uint64_t seq;
    bool need_reset;
};

kv_events_t *kv_events_new(int cap, fl_error_t *err)
{
    if (cap < 1 || cap > (1 << 24)) {
        fl_fail(err, FL_EINVAL, "kv events: a batch of %d blocks is out of range (1 to 2^24)", cap);
        return NULL;
    }
    kv_events_t *ev = calloc(1, sizeof *ev);
    uint32_t slots = 2;
    while (slots < 2u * (uint32_t)cap) slots *= 2;
    if (ev) {
        ev->hash = malloc((size_t)cap * sizeof *ev->hash);
        ev->stored = malloc((size_t)cap);
        ev->map = malloc(slots * sizeof *ev->map);
        ev->out_stored = malloc((size_t)cap * sizeof *ev->out_stored);
        ev->out_removed = malloc((size_t)cap * sizeof *ev->out_removed);
    }
    if (!ev || !ev->hash || !ev->stored || !ev->map || !ev->out_stored || !ev->out_removed) {
        kv_events_destroy(&ev);
        fl_fail(err, FL_ENOMEM, "kv events: out of memory for %d blocks", cap);
        return NULL;
    }
    ev->cap = cap;
    ev->mask = slots - 1;
    memset(ev->map, 0xff, slots * sizeof *ev->map);
    ev->need_reset = true;
    return ev;
}

void kv_events_destroy(kv_events_t **evp)
{
    kv_events_t *ev = evp ? *evp : NULL;
    if (!ev) return;
    free(ev->hash);
    free(ev->stored);
    free(ev->map);
    free(ev->out_stored);
    free(ev->out_removed);
    free(ev);
    *evp = NULL;
}

void kv_events_attach(kv_events_t *ev, kv_cache_t *kv)
{
    kv->on_block = ev ? kv_events_record : NULL;
    kv->on_block_user = ev;
}

static void clear_pending(kv_events_t *ev)
{
    memset(ev->map, 0xff, ((size_t)ev->mask + 1) * sizeof *ev->map);
    ev->n = 0;
}

void kv_events_record(void *user, bool stored, block_hash_t h)
{
    kv_events_t *ev = user;
    if (ev->need_reset) return; /* the snapshot will say where every block is */
    uint32_t i = (uint32_t)h.lo & ev->mask;
    for (; ev->map[i] >= 0; i = (i + 1) & ev->mask)
        if (ev->hash[ev->map[i]] == h.lo) {
            ev->stored[ev->map[i]] = stored;
            return;
        }
    if (ev->n == ev->cap) { /* overflow: a snapshot replaces what was pending */
        clear_pending(ev);
        ev->need_reset = true;
        return;
    }
    ev->hash[ev->n] = h.lo;
    ev->stored[ev->n] = stored;
    ev->map[i] = ev->n++;
}

void kv_events_restart(kv_events_t *ev)
{
    ev->seq = 0;
    kv_events_lost(ev);
}

void kv_events_lost(kv_events_t *ev)
{
    clear_pending(ev);
    ev->need_reset = true;
}

size_t kv_events_pending(const kv_events_t *ev) { return (size_t)ev->n + ev->need_reset; }

bool kv_events_take(kv_events_t *ev, const kv_cache_t *kv, kv_events_batch_t *out)
{
    memset(out, 0, sizeof *out);
    if (!ev->need_reset && !ev->n) return false;
    if (ev->need_reset) {
        size_t n = 0;
        for (int b = 0; kv && b < kv->n_blocks && n < (size_t)ev->cap; b++)
            if (kv->cached[b]) ev->out_stored[n++] = kv->hash[b].lo;
        out->reset = true;
        out->n_stored = n;
    } else {
        for (int i = 0; i < ev->n; i++) {
            if (ev->stored[i])
                ev->out_stored[out->n_stored++] = ev->hash[i];
            else
                ev->out_removed[out->n_removed++] = ev->hash[i];
        }
    }
    out->stored = ev->out_stored;
    out->removed = ev->out_removed;
    out->seq = ++ev->seq;
    ev->need_reset = false;
    clear_pending(ev);
    return true;
}
