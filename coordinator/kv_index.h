/* kv_index.h - the coordinator's view of which worker groups hold which prefix-cache blocks.
 *
 * Workers report their prefix caches' changes (KvEvents: blocks stored and evicted, named by the
 * low 64 bits of their chain hash, block_hash.h); the index keeps (block, group) entries so that
 * the cache-aware policy can ask, for a prompt's block hashes, how many leading blocks each group
 * holds (kv_index_match). It is a hint for routing: a stale entry costs a recomputed prefix, never
 * a wrong answer, so it is bounded rather than exact.
 *
 * Bounds: at most max_entries entries (fixed at creation, the table allocated once). When full, a
 * CLOCK sweep evicts an entry no lookup matched since the hand last passed it. A group's entries
 * are dropped in O(1) when its worker restarts, dies or is forgotten (kv_index_clear_group): each
 * group has a generation, an entry is live only while its generation is the group's, and stale
 * entries are reclaimed by the sweep. KvEvents carry a sequence number per connection: a gap means
 * messages were lost, and the group's entries are dropped (what follows is applied, so the view
 * grows back from the worker's next changes or its next reset snapshot).
 *
 * One thread (the coordinator's event loop) owns it. */
#ifndef FOLIO_KV_INDEX_H
#define FOLIO_KV_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

#define KV_INDEX_MAX_GROUPS      256
#define KV_INDEX_DEFAULT_ENTRIES (1u << 18) /* 8 MiB of table */
#define KV_INDEX_ENTRY_BYTES     32         /* table bytes per entry (16-byte slots at load <= 1/2) */

typedef struct kv_index kv_index_t;

/* An index of at most max_entries (>= 1) entries. */
kv_index_t *kv_index_new(size_t max_entries, fl_error_t *err);
void kv_index_destroy(kv_index_t **ip);

/* Group (0 <= group < KV_INDEX_MAX_GROUPS) now holds / no longer holds block h. */
void kv_index_store(kv_index_t *ix, int group, uint64_t h);
void kv_index_remove(kv_index_t *ix, int group, uint64_t h);
/* Forgets every block of group: its worker restarted, died or was forgotten. */
void kv_index_clear_group(kv_index_t *ix, int group);

/* Applies one KvEvents message of group: reset drops its blocks first; a seq that does not follow
 * the last one applied (and is not a reset) drops them too, as messages were lost. Then removed,
 * then stored (a block appears in one list only). Returns how many blocks the gap check dropped
 * (0 normally). */
size_t kv_index_apply(kv_index_t *ix, int group, uint64_t seq, int reset, const uint64_t *stored, size_t n_stored,
                      const uint64_t *removed, size_t n_removed);

/* How many of hashes[0..n) group holds from the first on: the prompt's leading blocks it has
 * cached. Entries it matches count as recently used. */
int kv_index_match(kv_index_t *ix, int group, const uint64_t *hashes, int n);
/* Whether group holds block h, without counting as a use (a census, not a request's match). */
bool kv_index_holds(const kv_index_t *ix, int group, uint64_t h);

size_t kv_index_size(const kv_index_t *ix); /* live entries */
size_t kv_index_group_size(const kv_index_t *ix, int group);
size_t kv_index_capacity(const kv_index_t *ix);
uint64_t kv_index_evictions(const kv_index_t *ix); /* live entries evicted for room */

#endif
