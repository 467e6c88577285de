/* worker_kv.c - KV_EVENTS: the worker's prefix-cache changes, sent to the coordinator for
 * cache-aware routing (proto/README.md, "KV events"; the batching is worker/kv_events.c).
 *
 * The loop calls worker_kv_events_flush() after each step: a batch goes out at most once per
 * --kv-events-ms (default 100), sooner when half the batch's room is taken, so a burst of
 * evictions becomes a few messages rather than a reset. A batch that finds the send queue full is
 * lost, and the next is a reset snapshot. A new connection starts over with a reset (worker_main.c
 * calls kv_events_restart after READY). Runs on the loop's thread, which owns the KV cache. */
#include "worker.h"

void worker_kv_events_flush(worker_t *w, double now)
{
    kv_events_t *ev = w->kv_events;
    if (!ev || !w->sock || !w->eng) return;
    const size_t pending = kv_events_pending(ev);
    if (!pending || (now < w->kv_events_next && pending < KV_EVENTS_DEFAULT_CAP / 2)) return;
    kv_events_batch_t b;
    if (!kv_events_take(ev, w->eng->kv, &b)) return;
    Folio__V1__KvEvents m = FOLIO__V1__KV_EVENTS__INIT;
    m.seq = b.seq;
    m.reset = b.reset;
    m.stored = (uint64_t *)b.stored;
    m.n_stored = b.n_stored;
    m.removed = (uint64_t *)b.removed;
    m.n_removed = b.n_removed;
    if (worker_send(w, WIRE_CMD_KV_EVENTS, &m.base)) kv_events_lost(ev);
    w->kv_events_next = now + w->kv_events_ms * 1e-3;
}
