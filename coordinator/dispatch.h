/* dispatch.h - the life of a Generate request in the coordinator, from admission to its one FINAL.
 *
 * clients.c admits a request (a req_t with its tokens) and workers.c decodes what a worker says;
 * both hand the request's life to this module, which calls neither: it routes requests to groups
 * and sends them, relays PARTIAL and FINAL responses to the client, fails requests over when their
 * group dies, cancels them, expires their deadlines and ends them with an error FINAL. Every send of
 * a response to a client goes through dispatch_to_client(), because a failed send means the client
 * is gone and its other requests must end too.
 *
 * The stream rule kept here: token indices only move forward, and each accepted request gets
 * exactly one FINAL, whose finish reason follows from its status (OK: the worker's STOP or LENGTH;
 * CANCELLED and DEADLINE_EXCEEDED: CANCELLED; any other: ERROR). The failover rule: a request whose
 * group is lost (dead, restarted, or it lost the request) is sent to another group, within its
 * deadline and COORD_MAX_RESUBMITS times at most: from the start while none of its tokens has
 * reached the client, else mid-stream (migration: with the tokens sent, to go on from there; see
 * dispatch.c). A request that asked for the old rule (GenerateRequest.no_migrate), or that no group
 * can take, ends UNAVAILABLE keeping the tokens already sent; one past its deadline ends
 * DEADLINE_EXCEEDED. A worker that refuses a request RESOURCE_EXHAUSTED (its queue is full, or the
 * request does not fit it) has it sent to another group, COORD_MAX_RESUBMITS times at most; the
 * last refusal reaches the client with the worker's retry hint (UNAVAILABLE, without a hint, for a
 * request that was moving mid-stream). One thread. */
#ifndef FOLIO_DISPATCH_H
#define FOLIO_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator.h"

/* Routes e (admitted: client, tokens, msg and deadline set) to a group and sends it; when no group
 * can take it, ends it with an UNAVAILABLE FINAL (e is freed then). */
void dispatch_submit(coord_t *c, req_t *e, double now);

/* Answers a message that never became a request in the table (refused at once) with an error
 * FINAL under id and method: a Generate's carries a result (finish reason of code, no tokens,
 * timings since t_recv); retry_after_ms goes with RESOURCE_EXHAUSTED only. */
void dispatch_refuse(coord_t *c, const wire_msg_t *m, uint64_t id, int method, Folio__V1__StatusCode code,
                     uint32_t retry_after_ms, const char *msg, double t_recv);

/* How long a client refused for a full table (or tenant limit) should wait before trying again:
 * about the time one request takes to end at the recent rate, within [COORD_RETRY_MIN_MS,
 * COORD_RETRY_MAX_MS] (1 s when nothing ended lately). */
uint32_t dispatch_retry_after_ms(coord_t *c, double now);

/* A decoded PARTIAL (final false) or FINAL from group slot, relayed to its request's client under
 * the client's id (also where the worker's status message names the request). r is borrowed and
 * not changed. Responses for requests the group no longer runs (finished, failed over, cancelled)
 * are dropped, and so are a cancelled stream's deltas: see dispatch_cancel. */
void dispatch_relay(coord_t *c, int slot, const Folio__V1__Response *r, bool final, double now);

/* The client's Cancel of e, called before the Cancel is answered: the worker is told, no delta of a
 * streamed e reaches the client any more, and e ends with the worker's FINAL (CANCELLED, or its
 * normal end when it had finished first and nothing was held back; an unstreamed e's carries the
 * tokens made), or CANCELLED when that has not come within 2 heartbeat intervals. */
void dispatch_cancel(coord_t *c, req_t *e, double now);

/* Sends r to a client. A client that is gone (EHOSTUNREACH) or so far behind that its queue is full
 * (EAGAIN) has every request cancelled and forgotten: a dropped delta would leave a gap in its
 * stream and a dropped FINAL a request without an end. Returns 0 or FL_EIO. */
int dispatch_to_client(coord_t *c, const uint8_t *client, size_t len, bool delimiter, const Folio__V1__Response *r);
/* Forgets every request of this client, cancelling them on their workers. */
void dispatch_client_gone(coord_t *c, const uint8_t *client, size_t len);

/* Group slot died (silent, unreachable, disconnected): it is forgotten and its requests fail over
 * (mid-stream ones migrate) or end. */
void dispatch_group_died(coord_t *c, int slot, const char *why, double now);
/* Group slot's prefix cache is gone or unknown (a new process, a new connection): its KV index
 * entries go, and the cache-aware census stops crediting it with the prefixes last sent there. */
void dispatch_forget_cache(coord_t *c, int slot);
/* Group slot's rank 0 registered again: it dropped whatever it ran, so its requests fail over (to
 * any group, itself included) or end. */
void dispatch_group_restarted(coord_t *c, int slot, double now);
/* Group slot's heartbeat listed these worker-side ids as live (sorted here in place): its requests
 * routed more than 2 heartbeat intervals ago that it does not list were lost in transit, and fail
 * over or end. A heartbeat sent during a step that has run step_running_s lists what the worker
 * held when the step began (it has not read its socket since), so requests routed within that
 * time as well are not judged by it. */
void dispatch_reconcile(coord_t *c, int slot, uint64_t *live_ids, size_t n_live, double step_running_s, double now);

/* Seconds until the next deadline or cancel timeout, or a negative number when none. */
double dispatch_next_timer(coord_t *c, double now);
/* Ends the requests whose deadline or cancel timeout has passed. A streamed request ends
 * DEADLINE_EXCEEDED at its deadline with the tokens already sent; an unstreamed one is cancelled on
 * its worker and ends DEADLINE_EXCEEDED with the worker's FINAL and the tokens it carries (or
 * without tokens when that has not come within 2 heartbeat intervals). */
void dispatch_expire(coord_t *c, double now);
/* Ends every request with UNAVAILABLE and msg (cancelling it on its worker); returns how many. */
int dispatch_end_all(coord_t *c, const char *msg);

#endif
