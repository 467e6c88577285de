/* coordinator.h - the coordinator's state and the handlers its event loop calls.
 *
 * One thread runs everything: coordinator_main.c owns the sockets and the zmq_poll loop; clients.c
 * handles what arrives on the client socket (Generate admitted, Cancel, Drain, Health, Status);
 * workers.c what arrives on the worker socket (registration, heartbeats, liveness); dispatch.c, which
 * both call and which calls neither, owns each Generate's life (routing, relaying, failover, cancel,
 * deadlines, error FINALs). requests.c, groups.c and router.c are the tables underneath. No locks;
 * all state is in coord_t. */
#ifndef FOLIO_COORDINATOR_H
#define FOLIO_COORDINATOR_H

#include <stdbool.h>
#include <stdint.h>

#include "auth.h"
#include "block_hash.h"
#include "groups.h"
#include "kv_index.h"
#include "metrics.h"
#include "requests.h"
#include "router.h"
#include "tokenizer.h"
#include "wire.h"

_Static_assert(GROUPS_MAX <= KV_INDEX_MAX_GROUPS, "every group slot has its place in the KV index");

#define COORD_LATENCY_SAMPLES  4096
#define COORD_MAX_RESUBMITS    3
#define COORD_MAX_ROUTE_BLOCKS 1024
/* cache-aware: the distinct prefix keys routed lately, whose holders place a new prefix (router.h) */
#define COORD_RECENT_PREFIXES 64
#define COORD_MAX_SHARE_LISTS  64
#define COORD_TENANT_MAX       512 /* bytes for a tenant name and its NUL (the wire allows 256) */
#define COORD_TOLD_MEMORY      16  /* identities recently told DISCONNECT, remembered */
#define COORD_RETRY_MIN_MS     50    /* bounds of Status.retry_after_ms when the coordinator is full */
#define COORD_RETRY_MAX_MS     10000

typedef struct coord_opts {
    const char *client_endpoint, *worker_endpoint, *model_path;
    router_policy_t policy;
    double load_factor;
    int load_floor;
    int route_blocks;
    size_t kv_index_entries; /* the KV index's bound (kv_index.h) */
    bool no_kv_pull;         /* --kv-pull off: never name a holder for a worker to pull a prefix from */
    int heartbeat_ms;
    int max_inflight;            /* Generate requests in flight at most (the table's size) */
    int max_inflight_per_tenant; /* of which one tenant's at most; 0: no such limit */
    /* --share-cache lists: tenants in one list share prefix-cache blocks (the first names the
     * namespace); every other tenant's blocks are its own. argv strings, borrowed. */
    const char *share_cache[COORD_MAX_SHARE_LISTS];
    int n_share_cache;
    /* Security (auth.h): --curve-secret FILE encrypts both sockets; --worker-keys and --client-keys
     * FILE list the keys let in, --clients-open lets any client key in; --insecure allows a
     * plaintext bind beyond this machine. */
    const char *curve_secret, *worker_keys, *client_keys;
    bool clients_open, insecure;
} coord_opts_t;

/* Storage for a Status reply (clients.c): too large for the stack. */
typedef struct coord_status_scratch {
    Folio__V1__GroupStatus groups[GROUPS_MAX];
    Folio__V1__GroupStatus *group_ptrs[GROUPS_MAX];
    uint32_t ranks[GROUPS_MAX][GROUP_MAX_RANKS];
    Folio__V1__RankStatus rank_status[GROUPS_MAX][GROUP_MAX_RANKS];
    Folio__V1__RankStatus *rank_ptrs[GROUPS_MAX][GROUP_MAX_RANKS];
    Folio__V1__WorkerLoad loads[GROUPS_MAX];
    double latency[COORD_LATENCY_SAMPLES];
    metrics_reply_t requests[GROUPS_MAX + 1]; /* [0]: requests no group served; [slot + 1] */
} coord_status_scratch_t;

typedef struct coord {
    coord_opts_t opts;
    void *zctx, *clients, *workers;
    auth_t *auth; /* NULL: plaintext, every peer trusted */
    auth_keys_t *worker_keys, *client_keys;
    tok_t *tok;
    int32_t n_vocab;
    router_t *router;
    kv_index_t *kv_index; /* which groups hold which prefix blocks (their KvEvents) */
    uint64_t kv_pull_hints; /* requests sent with a holder to pull prompt blocks from */
    groups_t *groups;
    reqs_t *reqs;
    uint32_t block_size; /* agreed by the registered groups; 0 before the first */
    uint64_t instance;   /* HealthReply.instance: clients notice a restart by it */
    uint64_t next_wid;
    double hb_s; /* heartbeat interval, seconds */
    /* counters */
    uint64_t requests_total, requests_failed_over, requests_migrated; /* migrated: of failed_over, mid-stream */
    uint64_t routed_by_cache, routed_cached_blocks; /* cache-aware picks made by a held prefix, and its blocks */
    /* requests ended, and the rate at which they end (per second, smoothed over windows of about
     * a second): what a retry-after hint is made of (dispatch_retry_after_ms) */
    uint64_t n_ended, rate_n0;
    double rate_t0, end_rate;
    /* the last COORD_LATENCY_SAMPLES added latencies, seconds */
    double latency[COORD_LATENCY_SAMPLES];
    uint64_t n_latency;
    /* requests ended and their latencies, per group (dispatch.c records, Status reports) */
    metrics_t metrics;
    /* worker identities told DISCONNECT lately (workers.c): a worker's queued heartbeats would
     * otherwise each earn one, and each DISCONNECT makes it register again */
    struct {
        uint8_t id[WIRE_MAX_IDENTITY];
        size_t len;
        double at;
    } told[COORD_TOLD_MEMORY];
    int told_next;
    /* scratch reused by every Generate */
    int32_t *tok_buf;
    int tok_cap;
    block_hash_t hash_buf[COORD_MAX_ROUTE_BLOCKS];
    uint64_t hash_lo[COORD_MAX_ROUTE_BLOCKS]; /* their low halves, as the KV index names blocks */
    struct {
        uint64_t key;
        uint64_t used; /* prefix_clock when it was routed last */
        int slot;      /* where it was routed last; -1 once that group's cache was forgotten */
    } recent_prefixes[COORD_RECENT_PREFIXES]; /* the least recently routed is replaced */
    int n_recent_prefixes;
    uint64_t prefix_clock;
    coord_status_scratch_t status;
} coord_t;

/* clients.c */
void coord_client_message(coord_t *c, wire_msg_t *m, double now);

/* workers.c */
void coord_worker_message(coord_t *c, wire_msg_t *m, double now);
/* Heartbeats to every worker (when due) and the liveness check: a dead group goes to
 * dispatch_group_died(). */
void coord_workers_tick(coord_t *c, double now, bool heartbeat_due);
/* Shutdown: DISCONNECT to every registered worker. */
void coord_workers_disconnect(coord_t *c);

#endif
