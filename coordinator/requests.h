/* requests.h - the coordinator's table of in-flight Generate requests.
 *
 * A fixed pool of max_inflight entries allocated at start (no malloc per request for the entry
 * itself): the table is the bound on requests in flight, and a request that finds it full is
 * refused by the caller (clients.c). Over the pool: two open-addressing hash maps (worker-side
 * id -> entry for relaying responses; (client identity, client id) -> entry for cancels), a count
 * of live entries per tenant (for the per-tenant limit; keyed by a 64-bit hash of the name seeded
 * per table, so names are never stored) and an indexed min-heap of per-entry timers (deadline or
 * cancel timeout), so lookups, inserts, removals and the next expiry are O(1) or O(log n) at any
 * rate. Linear probing with backward-shift deletion keeps the maps free of tombstones. One thread
 * (the coordinator's event loop) owns everything here. */
#ifndef FOLIO_REQUESTS_H
#define FOLIO_REQUESTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "folio.pb-c.h"
#include "wire.h"

typedef struct req {
    bool live;
    uint64_t wid;       /* worker-side id, unique coordinator-wide; 0 while unassigned */
    uint64_t client_id; /* the client's id for it */
    uint64_t client_hash;
    uint8_t client[WIRE_MAX_IDENTITY];
    uint8_t client_len;
    bool delimiter;      /* the client used a REQ-style empty frame: echo it */
    bool client_bound;   /* in the client map */
    bool tenant_bound;   /* counted for its tenant */
    uint64_t tenant_hash;
    int group;           /* slot of the group it runs on, -1 none */
    int resubmits;       /* failovers so far */
    bool committed;      /* a PARTIAL with tokens reached the client */
    bool cancelling;     /* a Cancel went to the worker; its FINAL ends the stream, no PARTIAL goes out */
    bool expired;        /* its deadline passed while it waits for that FINAL (unstreamed) */
    bool withheld;       /* tokens were held back from the client since the Cancel */
    int refusals;        /* times a worker refused it RESOURCE_EXHAUSTED and it was sent elsewhere */
    uint32_t next_index; /* next completion index the client may receive */
    uint32_t tokens_sent;
    /* Mid-stream migration (dispatch.c): the tokens relayed to the client in index order (a
     * streamed request that may move; owned, grown by doubling) and the bytes of text relayed,
     * what a group it moves to continues from. */
    int32_t *sent;
    uint32_t sent_cap;
    bool sent_lost; /* out of memory for them: it cannot move once streaming began */
    uint64_t text_sent;
    double t_recv;          /* receipt of the client's message (fl_clock_s) */
    double t_dispatch;      /* the last send to a worker */
    double t_first_sent;    /* the first token relayed to the client; 0: none yet */
    double t_last_token;    /* receipt of the last delta with tokens relayed (inter-token latency) */
    double deadline;        /* 0: none */
    double cancel_deadline; /* 0: none */
    double route_s;         /* added latency on the way in */
    double timer;           /* min(deadline, cancel_deadline) in the heap; 0: not in it */
    int heap_pos;
    Folio__V1__Request *msg; /* the client's decoded request, kept for resubmission */
    int32_t *tokens;         /* prompt tokens (owned when tokens_owned, else msg's) */
    int n_tokens;
    bool tokens_owned;
} req_t;

typedef struct reqs reqs_t;

reqs_t *reqs_new(int capacity, fl_error_t *err);
void reqs_destroy(reqs_t **rp); /* frees live entries' messages too */

int reqs_capacity(const reqs_t *r);
int reqs_count(const reqs_t *r);
req_t *reqs_at(reqs_t *r, int i); /* pool slot i, live or not: for rare full scans */

/* A cleared entry taken from the pool (live, group -1), or NULL when full. */
req_t *reqs_alloc(reqs_t *r);
/* Releases e: removes it from both maps and the heap, frees msg, owned tokens and the tokens sent. */
void reqs_free(reqs_t *r, req_t *e);

/* Gives e the worker-side id wid (replacing its old one in the map). */
void reqs_set_wid(reqs_t *r, req_t *e, uint64_t wid);
req_t *reqs_by_wid(reqs_t *r, uint64_t wid);

/* Puts e (client, client_len, client_id set) in the client map; FL_EINVAL if that client already
 * has a live request with this id. */
int reqs_bind_client(reqs_t *r, req_t *e);
req_t *reqs_by_client(reqs_t *r, const uint8_t *client, size_t len, uint64_t client_id);

/* Counts e for tenant (its live entries per tenant); undone by reqs_free. */
void reqs_bind_tenant(reqs_t *r, req_t *e, const char *tenant);
/* Live entries bound to tenant. */
int reqs_tenant_count(const reqs_t *r, const char *tenant);

/* Re-files e in the timer heap after its deadline or cancel_deadline changed. */
void reqs_timer_update(reqs_t *r, req_t *e);
/* The entry with the earliest timer, or NULL. */
req_t *reqs_timer_first(reqs_t *r);

#endif
