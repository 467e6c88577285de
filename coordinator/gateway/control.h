/* control.h - the gateway's view of the cluster: Health and Status fetched from the coordinator
 * on a thread of its own, through a second client connection, every interval and whenever the
 * event loop asks (GET /health, /metrics, /v1/models want an answer no older than the request).
 *
 * Why a thread: folio_client's blocking calls wait for their own reply and skip the others, so
 * they cannot share the connection that carries the streams, and a coordinator that does not
 * answer would stall every stream for the length of the wait. The loop instead gets snapshots
 * handed over under a mutex and learns of a new one from an eventfd it polls beside its sockets. */
#ifndef FOLIO_GW_CONTROL_H
#define FOLIO_GW_CONTROL_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"
#include "folio.pb-c.h"

typedef struct gw_snapshot {
    uint64_t seq;      /* the fetch that made it (fetches are numbered from 1) */
    bool ok;           /* the coordinator answered Health and Status */
    char error[600];   /* why not, when !ok */
    int failures;      /* fetches in a row that failed, this one included */
    double started_at; /* fl_clock_s() when the fetch began */
    bool serving;      /* Health: some healthy group admits work */
    uint32_t healthy_groups, groups;
    uint64_t instance;           /* the coordinator's; changes when it restarts */
    Folio__V1__Response *status; /* ok: the Status reply (status->cluster); owned */
} gw_snapshot_t;

typedef struct gw_control gw_control_t;

/* Starts the thread; its first fetch begins at once. */
gw_control_t *gw_control_new(const char *endpoint, int interval_ms, int timeout_ms, fl_error_t *err);
/* Stops and joins the thread (waits for a fetch under way, at most its timeout). */
void gw_control_destroy(gw_control_t **cp);
/* Readable when a snapshot newer than the last one taken is ready. */
int gw_control_fd(const gw_control_t *c);
/* Asks for a fetch that begins now (or soon: requests made during one fetch share the next).
 * Returns the seq of the first snapshot that answers the request. */
uint64_t gw_control_refresh(gw_control_t *c);
/* Moves the newest snapshot into *out when it is newer than out->seq (the old content freed) and
 * returns true; false when there is none newer. */
bool gw_control_take(gw_control_t *c, gw_snapshot_t *out);
void gw_snapshot_clear(gw_snapshot_t *s);

#endif
