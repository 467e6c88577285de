/* kv_events.h - the prefix cache's changes, batched for the coordinator (KvEvents, proto/README.md).
 *
 * The KV cache reports each block it publishes (stored) and each cached block it evicts (removed)
 * through its on_block hook; kv_events_record() keeps them until the next batch, one entry per block
 * (a later event for the same block replaces the earlier one, so a batch says where each block
 * ended up and the receiver may apply removals and stores in any order). The buffer is bounded:
 * when cap blocks are pending and another comes, the pending events are dropped and the next batch
 * is a reset, a snapshot of the blocks cached now (at most cap of them), so the receiver never
 * keeps a wrong view for long. A new connection (the coordinator forgot the old view) and a batch
 * that could not be sent likewise make the next one a reset. Blocks are named by the low 64 bits of
 * their chain hash.
 *
 * Threading: the thread that owns the KV cache (the scheduler's). */
#ifndef FOLIO_KV_EVENTS_H
#define FOLIO_KV_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "block_hash.h"
#include "kv_cache.h"

#define KV_EVENTS_DEFAULT_CAP 4096 /* blocks per batch: 32 KiB of hashes */

typedef struct kv_events kv_events_t;

/* One batch, pointing into the kv_events_t until the next call on it. */
typedef struct kv_events_batch {
    uint64_t seq; /* 1, 2, ... since kv_events_restart */
    bool reset;   /* the receiver forgets this cache's blocks first: stored is a snapshot */
    const uint64_t *stored, *removed;
    size_t n_stored, n_removed;
} kv_events_batch_t;

/* At most cap (>= 1) blocks pending and per batch. The first batch is a reset. */
kv_events_t *kv_events_new(int cap, fl_error_t *err);
void kv_events_destroy(kv_events_t **evp);

/* Hooks ev to kv (kv_cache_t.on_block); NULL unhooks. */
void kv_events_attach(kv_events_t *ev, kv_cache_t *kv);
/* The on_block hook: block h was published (stored) or evicted. user is the kv_events_t. */
void kv_events_record(void *user, bool stored, block_hash_t h);

/* A new connection: sequence numbers start again at 1 and the next batch is a reset. */
void kv_events_restart(kv_events_t *ev);
/* The last batch did not reach the receiver: the next one is a reset. */
void kv_events_lost(kv_events_t *ev);

/* Blocks waiting to go (a pending reset counts as one). */
size_t kv_events_pending(const kv_events_t *ev);
/* The next batch (kv: the cache, for a reset's snapshot), and the pending events cleared; false
 * when there is nothing to send. */
bool kv_events_take(kv_events_t *ev, const kv_cache_t *kv, kv_events_batch_t *out);

#endif
