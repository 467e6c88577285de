/* worker.h - the folio-worker process: state shared by its event loop (worker_main.c) and its
 * per-request output streams (worker_stream.c).
 *
 * Threading: everything here belongs to the thread that runs the loop (the scheduler's callbacks
 * run on it too, inside sched_step/sched_cancel), except what worker_beat.c's heartbeat thread
 * shares with it under `lock`: the socket and the step-progress fields marked so. */
#ifndef FOLIO_WORKER_H
#define FOLIO_WORKER_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "auth.h"
#include "curve.h"
#include "engine.h"
#include "kv_events.h"
#include "request.h"
#include "scheduler.h"
#include "tokenizer.h"
#include "wire.h"

/* One live Generate: its output stream (request.h) and where it stands with the coordinator. */
typedef struct worker_req {
    uint64_t id;
    bool live;
    bool stream; /* PARTIALs as tokens come; else everything in the FINAL */
    bool dirty;  /* on the flush list: has tokens or text to send after this step */
    bool final_pending; /* finished, its FINAL not yet accepted by the socket (res holds the end) */
    sched_result_t res;
    request_stream_t out;
} worker_req_t;

typedef struct worker {
    /* Configuration. */
    const char *endpoint, *group;
    int rank, tp, heartbeat_ms;
    uint32_t restarts;      /* --restarts: times a supervisor restarted this rank (WorkerHello) */
    double drain_timeout_s; /* SIGTERM: the longest a drain waits for work in flight */
    bool fake;
    const char *health_file; /* --health-file: touched with each heartbeat that says engine_ok */
    bool health_warned;      /* shared (lock): a failed touch was logged once */
    /* This connection's routing id, group:rank:epoch:connection; connection counts those made. */
    char identity[WIRE_MAX_IDENTITY + 1];
    unsigned connections;
    uint64_t epoch;
    char model_id[320];
    char kv_type[16];          /* WorkerHello.kv_type: kv_cache_type_name */
    uint32_t kv_bytes_per_token;
    uint32_t kv_blocks, block_size, max_context;

    /* Engine (NULL in --fake mode). */
    engine_t *eng;
    sched_t *sched;
    const tok_t *tok;
    int32_t n_vocab;
    request_defaults_t defaults; /* sampling for fields a request leaves unset */

    /* Connection to the coordinator. */
    void *zctx, *sock;
    bool curve; /* --curve-secret and --coordinator-key: the link is CURVE-encrypted (proto/curve.h) */
    char curve_secret[CURVE_KEY_Z85 + 1], coordinator_key[CURVE_KEY_Z85 + 1];
    double last_heard;    /* fl_clock_s() of the last message from the coordinator */
    double coord_hb_last; /* of its last HEARTBEAT */
    double coord_hb_gap;  /* seconds between its last two HEARTBEATs (0: not seen yet) */
    double reconnect_at;  /* while sock is NULL: when to connect again */
    double backoff_s;     /* next reconnect delay (100 ms .. 2 s, jittered) */

    /* Health and load. */
    double next_heartbeat;  /* shared (lock) */
    bool draining;          /* SIGTERM: serving what comes, announcing it will stop; shared (lock) */
    double drain_since;
    bool engine_ok, last_step_ok, step_failed_since_hb;
    uint64_t steps_at_hb; /* scheduler steps when the last heartbeat went out */
    uint64_t gen_at_hb;   /* generated tokens then */
    double t_hb;          /* and when */
    double liveness_s;
    uint64_t *hb_ids;     /* [n_reqs] scratch for WorkerLoad.live_ids */
    uint64_t fake_prompt_tokens, fake_generated; /* --fake: what the heartbeat reports */

    /* Requests: a fixed pool of slots, found by id through an open-addressing map. */
    worker_req_t *reqs;
    int n_reqs; /* pool size: max_waiting + max_running (all the scheduler can hold) */
    int32_t *free_slots;
    int n_free;
    int32_t *map; /* slot index or -1 */
    uint32_t map_mask;
    int32_t *dirty; /* slots with output to flush after the step */
    int n_dirty;
    int32_t *pending; /* slots whose FINAL waits for room in the socket's queue */
    int n_pending;

    /* The prefix cache's changes for the coordinator (worker_kv.c); NULL when off or --fake. */
    kv_events_t *kv_events;
    int kv_events_ms;      /* --kv-events-ms: at most one KV_EVENTS per this interval */
    double kv_events_next; /* when the next may go */

    /* KV block pulls between groups (worker_peer.c). */
    bool pull_on;              /* --kv-peer not off: pulls are asked for when the coordinator names a holder */
    bool prefix_cache;         /* not --no-prefix-cache: pulled blocks have somewhere to go */
    void *peer_sock;           /* ROUTER serving pulls (--kv-peer), or NULL; a CURVE server with curve */
    auth_t *peer_auth;         /* with curve: the ZAP handler admitting --peer-keys to peer_sock */
    char peer_endpoint[WIRE_MAX_IDENTITY + 1]; /* WorkerHello.kv_peer_endpoint ("" when not serving) */
    char kv_layout[400];       /* model_id|kv_type|block_size: a pull's must equal the holder's */
    double pull_timeout_s;     /* --kv-pull-timeout-ms: a pull still going then ends, the rest is computed */
    struct peer_pull *pulls;   /* Generates parked until their blocks come, [n_reqs] */
    int n_pulls;
    struct peer_link *links;   /* DEALERs to holders */
    int n_links;
    uint64_t next_pull_id;
    uint64_t kv_pulled_blocks, kv_pull_failures, kv_served_blocks; /* totals since start */
    double kv_pull_seconds;

    /* Heartbeats while a step runs (worker_beat.c). */
    pthread_mutex_t lock;    /* recursive; guards the socket and the fields marked shared */
    pthread_cond_t beat_wake;
    pthread_t beat_thread;
    bool beat_running, beat_quit;
    atomic_bool in_step;     /* a scheduler step is running */
    double step_start, step_limit; /* shared (lock): when it began, how long it may run */
    sched_stats_t step_stats;      /* shared (lock): the load when it began */
    int n_step_ids;                /* shared (lock): live ids then, in hb_ids */
    bool hung;                     /* shared (lock): the running step passed its limit */

    /* Tensor parallelism (--tp > 1): the group's communicator (rank 0 made comm_id and sends it in
     * READY; the other ranks get it from the coordinator, worker_follow.c). */
    comm_id_t comm_id;
    comm_t *comm;
    double tp_timeout_s, tp_join_timeout_s;
    bool tp_failed;                /* the group's communicator failed: the process exits (status 1)
                                      without ending its requests, which the coordinator fails over */
    void (*on_join)(void *user, const wire_msg_t *m); /* JOIN from the coordinator (rank > 0) */
    void *on_join_user;
} worker_t;

/* worker_stream.c */
int worker_reqs_init(worker_t *w, int n_slots, fl_error_t *err);
void worker_reqs_free(worker_t *w);
worker_req_t *worker_req_find(worker_t *w, uint64_t id);
/* A free slot for the resolved request, or NULL with err set (pool full: FL_ERANGE). */
worker_req_t *worker_req_open(worker_t *w, const request_t *rq, fl_error_t *err);
void worker_req_close(worker_t *w, worker_req_t *r);
/* Scheduler callbacks (user = worker_t). */
bool worker_on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp);
void worker_on_finish(void *user, const sched_result_t *res);
/* Sends one PARTIAL per streaming request that got output in the last step. */
void worker_flush_partials(worker_t *w);

/* Retries the FINALs that found the socket's queue full; true when none is left waiting. */
bool worker_retry_finals(worker_t *w);
/* Drops the FINALs still waiting (the coordinator they were for is gone). */
void worker_drop_finals(worker_t *w);

/* worker_main.c: connects a new socket to the coordinator and sends READY (takes the lock). */
int worker_connect(worker_t *w, fl_error_t *err);
/* One message from the coordinator (any rank): liveness, HEARTBEAT, DISCONNECT (READY again),
 * REQUEST (rank 0), JOIN (w->on_join). */
void worker_handle_message(worker_t *w, const wire_msg_t *m, double now);

/* worker_follow.c: the life of a rank other than 0 once its shard is loaded (connects, joins the
 * group when the coordinator hands over rank 0's id, follows rank 0's plans); the exit status. stop
 * and drain are main's signal flags (SIGINT / SIGTERM). */
int worker_follow(worker_t *w, const volatile sig_atomic_t *stop, const volatile sig_atomic_t *drain);

/* worker_main.c: sends to the coordinator without blocking (a no-op while disconnected); FL_EIO
 * with errno EAGAIN when its queue is full. Takes the lock. */
int worker_send(worker_t *w, int cmd, const ProtobufCMessage *body);

/* worker_kv.c: sends the prefix cache's pending changes as one KV_EVENTS when the interval has
 * passed (or half the batch is full). */
void worker_kv_events_flush(worker_t *w, double now);

/* worker_main.c: submits a resolved Generate (its slot r open) to the scheduler, or refuses it
 * (closing r); releases rq either way. */
void worker_submit_resolved(worker_t *w, worker_req_t *r, request_t *rq);

/* worker_peer.c: KV block pulls between groups. init: after the engine and the zmq context, with
 * --kv-peer's bind endpoint (NULL: pull but do not serve) and the endpoint to advertise (NULL: the
 * bound one). */
int worker_peer_init(worker_t *w, const char *bind, const char *advertise, fl_error_t *err);
void worker_peer_close(worker_t *w);
/* Parks the resolved Generate q (slot r, resolved rq) while the blocks its coordinator says another
 * group holds are pulled; true when parked (q and rq are then the pull's). False: submit it now. */
bool worker_pull_start(worker_t *w, Folio__V1__Request *q, worker_req_t *r, request_t *rq, double now);
/* Serves pulls, takes blocks, ends pulls past their time. */
void worker_peer_service(worker_t *w, double now);
/* The peer sockets to poll (at most cap); how many. */
int worker_peer_poll_items(worker_t *w, zmq_pollitem_t *items, int cap);
/* The earlier of wake and the first pull's deadline. */
double worker_peer_next_deadline(const worker_t *w, double wake);
/* Ends the pull of request id at once (submitting it); false when it has none. */
bool worker_pull_release(worker_t *w, uint64_t id);
void worker_pull_release_all(worker_t *w);

/* worker_beat.c */
int worker_beat_start(worker_t *w, fl_error_t *err);
void worker_beat_stop(worker_t *w);
/* The scheduler's on_step callback (user = worker_t): a step of n_tokens begins. */
void worker_beat_step_begin(void *user, int n_tokens, double expected_s);
void worker_beat_step_end(worker_t *w);
/* A HEARTBEAT from the loop's thread (not in a step), with the engine's own load. Takes the lock. */
void worker_heartbeat(worker_t *w, double now);
/* Removes the health file, so that its presence and age tell only what this process proved. */
void worker_health_clear(worker_t *w);

#endif
