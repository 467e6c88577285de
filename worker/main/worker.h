/* worker.h - the folio-worker process: state shared by its event loop (worker_main.c) and its
 * per-request output streams (worker_stream.c).
 *
 * Threading: everything here belongs to the one thread that runs the loop; the scheduler's
 * callbacks run on it too (inside sched_step/sched_cancel). */
#ifndef FOLIO_WORKER_H
#define FOLIO_WORKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
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
    request_stream_t out;
} worker_req_t;

typedef struct worker {
    /* Configuration. */
    const char *endpoint, *group;
    int rank, tp, heartbeat_ms;
    bool fake;
    char identity[WIRE_MAX_IDENTITY + 1];
    uint64_t epoch;
    char model_id[320];
    uint32_t kv_blocks, block_size, max_context;

    /* Engine (NULL in --fake mode). */
    engine_t *eng;
    sched_t *sched;
    const tok_t *tok;
    int32_t n_vocab;
    request_defaults_t defaults; /* sampling for fields a request leaves unset */

    /* Connection to the coordinator. */
    void *zctx, *sock;
    double last_heard;    /* fl_clock_s() of the last message from the coordinator */
    double coord_hb_last; /* of its last HEARTBEAT */
    double coord_hb_gap;  /* seconds between its last two HEARTBEATs (0: not seen yet) */
    double reconnect_at;  /* while sock is NULL: when to connect again */
    double backoff_s;     /* next reconnect delay (100 ms .. 2 s, jittered) */

    /* Health and load. */
    double next_heartbeat;
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

/* worker_main.c: sends to the coordinator (a no-op while disconnected). */
int worker_send(worker_t *w, int cmd, const ProtobufCMessage *body);

#endif
