/* coordinator.h - the coordinator's state and the handlers its event loop calls.
 *
 * One thread runs everything: coordinator_main.c owns the sockets and the zmq_poll loop, clients.c
 * answers client messages (Generate, Cancel, Drain, Health, Status), workers.c handles workers
 * (registration, heartbeats, relaying responses, health, failover, deadlines). No locks. */
#ifndef FOLIO_COORDINATOR_H
#define FOLIO_COORDINATOR_H

#include <stdbool.h>
#include <stdint.h>

#include "block_hash.h"
#include "groups.h"
#include "requests.h"
#include "router.h"
#include "tokenizer.h"
#include "wire.h"

#define COORD_LATENCY_SAMPLES  4096
#define COORD_MAX_RESUBMITS    3
#define COORD_MAX_ROUTE_BLOCKS 1024
#define COORD_MAX_SHARE_LISTS  64
#define COORD_TENANT_MAX       512 /* bytes for a tenant name and its NUL (the wire allows 256) */

typedef struct coord_opts {
    const char *client_endpoint, *worker_endpoint, *model_path;
    router_policy_t policy;
    double load_factor;
    int load_floor;
    int route_blocks;
    int heartbeat_ms;
    int max_inflight;
    /* --share-cache lists: tenants in one list share prefix-cache blocks (the first names the
     * namespace); every other tenant's blocks are its own. argv strings, borrowed. */
    const char *share_cache[COORD_MAX_SHARE_LISTS];
    int n_share_cache;
} coord_opts_t;

typedef struct coord {
    coord_opts_t opts;
    void *zctx, *clients, *workers;
    tok_t *tok;
    int32_t n_vocab;
    router_t *router;
    groups_t *groups;
    reqs_t *reqs;
    uint32_t block_size; /* agreed by the registered groups; 0 before the first */
    uint64_t instance;   /* HealthReply.instance: clients notice a restart by it */
    uint64_t next_wid;
    double hb_s; /* heartbeat interval, seconds */
    /* counters */
    uint64_t requests_total, requests_failed_over;
    /* the last COORD_LATENCY_SAMPLES added latencies, seconds */
    double latency[COORD_LATENCY_SAMPLES];
    uint64_t n_latency;
    /* scratch reused by every Generate */
    int32_t *tok_buf;
    int tok_cap;
    block_hash_t hash_buf[COORD_MAX_ROUTE_BLOCKS];
} coord_t;

/* clients.c */
void coord_client_message(coord_t *c, wire_msg_t *m, double now);
/* Sends r to e's client (id and method rewritten by the caller). Returns 0, or FL_EIO when the client
 * is gone, in which case every request of that client, e included, has been cancelled and freed. */
int coord_send_client(coord_t *c, req_t *e, const Folio__V1__Response *r);
/* Ends e with a FINAL error (finish reason given) and frees it. */
void coord_finish_error(coord_t *c, req_t *e, Folio__V1__StatusCode code, Folio__V1__FinishReason reason,
                        const char *msg);
/* Forgets every request of this client, cancelling them on their workers. */
void coord_client_gone(coord_t *c, const uint8_t *client, size_t len);
/* Routes e (its tokens set) to a group other than exclude and sends it; returns 0, or a status code
 * (UNAVAILABLE) when no group could take it; e is not freed either way. */
int coord_dispatch(coord_t *c, req_t *e, int exclude, double now);
void coord_latency_add(coord_t *c, double s);
/* Timings counted from the coordinator's receipt of the request (what the client waited): the
 * worker's (may be NULL) shifted by the time before its last dispatch, the first token as relayed. */
void coord_fill_timings(const req_t *e, Folio__V1__Timings *t, const Folio__V1__Timings *worker, double now);

/* workers.c */
void coord_worker_message(coord_t *c, wire_msg_t *m, double now);
/* Sends the CANCEL for e's worker-side id to its group (best effort). */
void coord_cancel_on_worker(coord_t *c, const req_t *e);
/* Heartbeats to every worker (when due), the liveness check, and expired timers. */
void coord_tick(coord_t *c, double now, bool heartbeat_due);
/* Group slot died or was replaced: its requests fail over or end. */
void coord_group_died(coord_t *c, int slot, const char *why, double now);
/* Seconds until the next timer, or a negative number when none. */
double coord_next_timer(coord_t *c, double now);
/* Shutdown: DISCONNECT to every worker, UNAVAILABLE to every in-flight request. */
void coord_shutdown(coord_t *c);

#endif
