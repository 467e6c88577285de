/* worker_main.c - folio-worker: one rank of a worker group, serving Generate for a coordinator.
 *
 * Start-up loads the engine (backend, model, paged KV cache) and the scheduler, connects a DEALER
 * with identity "group:rank:epoch:connection" to the coordinator's worker endpoint and registers
 * with READY
 * (proto/README.md, "Worker side"). Then one loop owns the engine:
 *
 *   poll the socket (no wait while the scheduler has work and the send queue has room, else until
 *   the next heartbeat is due) -> drain every waiting message -> one sched_step() -> a HEARTBEAT
 *   when due.
 *
 * Health comes from real work: between steps the loop sends the heartbeats itself (when idle,
 * after a one-token liveness step on a reserved KV block), so an engine that hangs stops them. A
 * step may take long (a long prompt's chunk), so during one a heartbeat thread sends them instead
 * (worker_beat.c), until the step runs past a limit derived from its expected cost: then it falls
 * silent and the coordinator declares the group dead and fails its requests over, as for a hang.
 * The socket is shared with that thread under a mutex; the scheduler and KV cache are the loop's.
 *
 * --health-file PATH is touched with every heartbeat that says the engine is fine (worker_beat.c), for
 * probes that cannot read heartbeats (Kubernetes liveness): it is removed at start and at exit.
 *
 * SIGTERM drains: the worker keeps serving what reaches it, says "draining" in its heartbeats so
 * the coordinator routes nothing more here, and exits (DISCONNECT) once its work is done and the
 * coordinator has had two heartbeats to notice (--drain-timeout-s bounds the wait). A second
 * SIGTERM, or SIGINT, stops at once: live requests end CANCELLED.
 *
 * The coordinator is watched the same way: if nothing comes from it for 3 heartbeat intervals, the
 * worker cancels its live requests (nobody can receive them; their FINALs are still sent and go
 * nowhere), recreates the socket after a jittered backoff (100 ms .. 2 s) and registers again.
 * A DISCONNECT from the coordinator (it restarted or forgot us) also drops the live requests (it
 * has failed them over, and a restarted coordinator may reuse their ids) and re-sends READY.
 *
 * --fake skips the model: each Generate is answered at once with one FINAL holding one token (the
 * prompt's last) and finish LENGTH, and heartbeats report engine_ok. It exists to measure the
 * coordinator's own overhead without an engine in the way.
 *
 * Per-request output (deltas, stop strings, the FINAL) is worker_stream.c.
 *
 * Tensor parallelism (--tp N > 1): every rank is a process of its own. Rank 0 is the worker
 * described above, on its shard of the model: it makes the group's communicator id, sends it in
 * READY, and before serving waits (heartbeating, engine_ok false) until the other ranks, which get
 * the id through the coordinator, have joined; each of its steps then runs on every rank (tp.h). The
 * other ranks take no requests (worker_follow.c). A failure of the communicator on any rank ends that
 * process with status 1 without ending its requests (they fail over: the coordinator takes the
 * group out of routing), and the supervisor restarts the group's ranks. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "flags.h"
#include "model_path.h"
#include "clock.h"
#include "log.h"
#include "spec.h"
#include "tp.h"
#include "worker.h"

#define FAKE_BLOCK_SIZE    16
#define FAKE_KV_BLOCKS     (1u << 20)
#define FAKE_MAX_CONTEXT   (1u << 20)
#define BACKOFF_MIN_S      0.1
#define BACKOFF_MAX_S      2.0
#define DEAD_AFTER_BEATS   3
#define SHUTDOWN_LINGER_MS 500  /* time the last FINALs and the DISCONNECT get to leave */
#define DRAIN_MAX          4096 /* messages per wake-up before the engine gets a step again */
#define SEND_QUEUE         10000 /* messages to the coordinator queued before the loop waits */
#define RETRY_AFTER_MS     1000  /* the hint of a refusal for a full queue */
#define DRAIN_NOTICE_BEATS 2     /* a draining worker stays this many heartbeats after its work */
#define PEER_POLL_MAX      16    /* KV peer sockets polled with the coordinator's */

static volatile sig_atomic_t g_stop, g_drain;

/* SIGTERM drains (a second one stops); SIGINT stops at once. */
static void on_signal(int sig)
{
    if (sig == SIGTERM && !g_drain) g_drain = 1;
    else g_stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folio-worker [flags]\n"
            "Serves one rank of a worker group for a folio coordinator.\n"
            "%s"
            "  --coordinator-workers, --workers ENDPOINT\n"
            "                        the coordinator's worker endpoint (default $FOLIO_WORKER_ENDPOINT or %s)\n"
            "  --curve-secret FILE   this worker's secret key (folioctl keygen): the link is CURVE-encrypted;\n"
            "                        the coordinator lets it register when its public key is in --worker-keys\n"
            "  --coordinator-key FILE  the coordinator's public key (with --curve-secret)\n"
            "  --group NAME          worker group (default g0)\n"
            "  --rank N              rank within the group (default 0)\n"
            "  --tp N                tensor-parallel size: ranks 0..N-1 of a group are N processes, each\n"
            "                        with 1/N of the model (default 1)\n"
            "  --tp-timeout-s S      the longest a rank waits for the others in a step (default 30)\n"
            "  --tp-join-timeout-s S the longest the ranks wait for each other at start (default 300)\n"
            "  --heartbeat-ms N      heartbeat interval (default 1000); the coordinator is presumed gone\n"
            "                        after 3 intervals of silence\n"
            "  --max-batch-tokens N  tokens per step (default 512)\n"
            "  --max-seqs N          sequences per step (default 64)\n"
            "  --max-waiting N       queued requests beyond which new ones are refused (default 4096)\n"
            "  --no-prefix-cache     never reuse cached prompt blocks\n"
            "  --kv-events-ms N      tell the coordinator which prompt blocks are cached, at most once per\n"
            "                        N ms (default 100; 0: never, the coordinator then routes by hashing)\n"
            "  --kv-peer ENDPOINT    serve KV block pulls to other groups there (default tcp://127.0.0.1:*,\n"
            "                        a free port on loopback; off: neither serve nor pull)\n"
            "  --kv-peer-advertise ENDPOINT\n"
            "                        the endpoint other workers reach --kv-peer at (default: the bound one)\n"
            "  --kv-pull-timeout-ms N  a KV pull still going after N ms ends and the rest of the prompt is\n"
            "                        computed (default 1000)\n"
            "  --peer-keys FILE      with --curve-secret: the public keys of the workers that may pull from\n"
            "                        this one (the coordinator's --worker-keys list); the KV peer link is\n"
            "                        then CURVE-encrypted too. Without it a CURVE worker neither serves nor pulls\n"
            "  --spec MODE           speculative decoding this worker allows: auto (default: any a request\n"
            "                        asks for; Medusa where heads are loaded, else n-gram), medusa, ngram\n"
            "                        or none (off)\n"
            "  --spec-tree PATHS     Medusa's draft tree: paths of candidate ranks, e.g. \"0;0,0;1;0,0,0\"\n"
            "                        (head 0's best; below it head 1's best; head 0's second; ...), each\n"
            "                        path after its prefix (default: 16 nodes over 3 heads)\n"
            "  --drain-timeout-s S   SIGTERM drains: new work is still served but the coordinator is told\n"
            "                        to route no more; the worker stops when its work is done, or after S\n"
            "                        seconds (default 60). A second SIGTERM, or SIGINT, stops at once.\n"
            "  --restarts N          times a supervisor restarted this rank (reported to the coordinator)\n"
            "  --health-file PATH    touched with every heartbeat while the engine computes: its age tells a\n"
            "                        local probe that the engine hangs or fails (removed at start and exit)\n"
            "  --fake                no model: answer each Generate at once with one token (benchmarks\n"
            "                        of the coordinator's own overhead)\n"
            "  -h, --help            this text\n",
            engine_flags_help(), WIRE_DEFAULT_WORKER_ENDPOINT);
}

/* --- small helpers --------------------------------------------------------------------------- */

static uint64_t g_rng;

static double rand01(void)
{
    /* splitmix64: jitter only, no quality needed beyond decorrelating restarted workers */
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static uint64_t realtime_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* fl_model_id's "file-name:size"; "fake" for a fake worker without a model file. */
static void make_model_id(char *out, size_t cap, const char *path, bool fake)
{
    if (fake && access(path, R_OK) != 0)
        snprintf(out, cap, "fake");
    else
        fl_model_id(path, out, cap);
}

static int ms_until(double t, double now)
{
    const double ms = (t - now) * 1e3;
    if (ms <= 0) return 0;
    return ms > 60000 ? 60000 : (int)ms + 1;
}

/* Seconds of silence after which the coordinator is presumed gone: 3 heartbeat intervals, the
 * longer of ours and the gap seen between its own heartbeats (so a worker run with a short
 * interval does not give up on a coordinator that beats once a second). */
static double dead_after_s(const worker_t *w)
{
    double beat = w->heartbeat_ms * 1e-3;
    if (w->coord_hb_gap > beat) beat = w->coord_hb_gap;
    return DEAD_AFTER_BEATS * beat;
}

/* --- sending --------------------------------------------------------------------------------- */

int worker_send(worker_t *w, int cmd, const ProtobufCMessage *body)
{
    pthread_mutex_lock(&w->lock);
    int rc = FL_EIO, e = ENOTCONN;
    fl_error_t err = {0};
    if (w->sock) {
        rc = wire_send(w->sock, NULL, 0, false, WIRE_HEADER_WORKER, cmd, body, &err);
        e = errno;
    }
    pthread_mutex_unlock(&w->lock);
    /* A full queue is the loop's backpressure (worker_stream.c keeps what did not go), not an error. */
    if (rc && e != EAGAIN) fl_log_warn("worker send failed cmd=%d: %s", cmd, err.msg);
    errno = e;
    return rc;
}

static void reply_error_hint(worker_t *w, uint64_t id, Folio__V1__Method method, Folio__V1__StatusCode code,
                             const char *msg, uint32_t retry_after_ms)
{
    wire_error_reply_t r;
    wire_error_reply_init(&r, id, method, code, msg);
    r.status.retry_after_ms = retry_after_ms;
    fl_log_warn("worker refused id=%llu status=%s: %s", (unsigned long long)id, wire_status_name(code), msg);
    worker_send(w, WIRE_CMD_FINAL, &r.resp.base);
}

static void reply_error(worker_t *w, uint64_t id, Folio__V1__Method method, Folio__V1__StatusCode code, const char *msg)
{
    reply_error_hint(w, id, method, code, msg, 0);
}

/* A refusal for rc: a full queue or pool (FL_EBUSY) is worth retrying, so it says when. */
static void reply_refused(worker_t *w, uint64_t id, Folio__V1__Method method, int rc, const char *msg)
{
    reply_error_hint(w, id, method, wire_status_from_error(rc), msg, rc == FL_EBUSY ? RETRY_AFTER_MS : 0);
}

_Static_assert(sizeof(comm_id_t) == 1 + COMM_ID_BYTES, "WorkerHello.comm_id carries a comm_id_t as it is");

static void send_ready(worker_t *w)
{
    Folio__V1__WorkerHello h = FOLIO__V1__WORKER_HELLO__INIT;
    if (w->tp > 1 && w->rank == 0) {
        h.comm_id.data = (uint8_t *)&w->comm_id;
        h.comm_id.len = sizeof w->comm_id;
    }
    h.group = (char *)w->group;
    h.rank = (uint32_t)w->rank;
    h.tp_size = (uint32_t)w->tp;
    h.model_id = w->model_id;
    h.kv_blocks = w->kv_blocks;
    h.block_size = w->block_size;
    h.epoch = w->epoch;
    h.max_context = w->max_context;
    h.restarts = w->restarts;
    h.kv_peer_endpoint = w->peer_endpoint;
    h.kv_type = w->kv_type;
    h.kv_bytes_per_token = w->kv_bytes_per_token;
    if (!worker_send(w, WIRE_CMD_READY, &h.base))
        fl_log_info("worker ready sent endpoint=%s identity=%s", w->endpoint, w->identity);
}

/* --- connection ------------------------------------------------------------------------------ */

static int connect_locked(worker_t *w, fl_error_t *err)
{
    /* A new routing id for every connection: reusing one makes the coordinator's ROUTER hand it
     * over from a connection it still holds (a link that went down), and libzmq never frees the
     * old one (a descriptor and its buffers lost per link cut). */
    snprintf(w->identity, sizeof w->identity, "%s:%d:%llu:%u", w->group, w->rank, (unsigned long long)w->epoch,
             ++w->connections);
    w->sock = wire_socket(w->zctx, ZMQ_DEALER, w->identity, err);
    if (!w->sock) return err->code;
    if (w->curve && curve_client_setup(w->sock, w->curve_secret, w->coordinator_key, err)) {
        zmq_close(w->sock);
        w->sock = NULL;
        return err->code;
    }
    /* ZeroMQ reconnects a dropped TCP connection by itself within these bounds. The send queue is
     * bounded (SEND_QUEUE messages): when the coordinator does not keep up, a PARTIAL that finds it
     * full stays in its stream and a FINAL waits (worker_stream.c), and the loop runs no step until
     * there is room again, so nothing of a live stream is dropped and memory stays bounded. A dead
     * coordinator is caught by the silence check, which throws the queue away with the socket. The
     * receive queue is unbounded: the coordinator (trusted) decides how much it sends, and a burst
     * beyond the scheduler's queue is answered RESOURCE_EXHAUSTED rather than blocked in ZeroMQ. */
    const int ivl = (int)(BACKOFF_MIN_S * 1e3), ivl_max = (int)(BACKOFF_MAX_S * 1e3), snd_hwm = SEND_QUEUE,
              rcv_hwm = 0;
    if (zmq_setsockopt(w->sock, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl) ||
        zmq_setsockopt(w->sock, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof ivl_max) ||
        zmq_setsockopt(w->sock, ZMQ_SNDHWM, &snd_hwm, sizeof snd_hwm) ||
        zmq_setsockopt(w->sock, ZMQ_RCVHWM, &rcv_hwm, sizeof rcv_hwm) || zmq_connect(w->sock, w->endpoint)) {
        const int e = errno;
        zmq_close(w->sock);
        w->sock = NULL;
        return fl_fail(err, FL_EINVAL, "cannot connect to %s: %s", w->endpoint, zmq_strerror(e));
    }
    w->last_heard = fl_clock_s();
    send_ready(w);
    if (w->kv_events) kv_events_restart(w->kv_events); /* the coordinator's view starts over */
    return FL_OK;
}

int worker_connect(worker_t *w, fl_error_t *err)
{
    pthread_mutex_lock(&w->lock);
    const int rc = connect_locked(w, err);
    pthread_mutex_unlock(&w->lock);
    return rc;
}

/* The coordinator has been silent too long: drop the work nobody can receive and start over. */
static void lost_coordinator(worker_t *w, double now)
{
    sched_stats_t st = {0};
    if (w->sched) sched_get_stats(w->sched, &st);
    double delay = w->backoff_s * (0.5 + rand01());
    if (delay < BACKOFF_MIN_S) delay = BACKOFF_MIN_S;
    if (delay > BACKOFF_MAX_S) delay = BACKOFF_MAX_S;
    fl_log_warn("coordinator silent for %.1fs: dropping %d running and %d waiting requests, reconnecting in %.0fms%s",
                now - w->last_heard, st.running, st.waiting, delay * 1e3,
                w->curve ? " (CURVE: a coordinator that does not list this worker's public key in --worker-keys, or "
                           "whose key is not --coordinator-key, never answers)"
                         : "");
    worker_pull_release_all(w);
    if (w->sched) sched_cancel_all(w->sched); /* their FINALs go into the old socket's queue */
    worker_drop_finals(w);
    pthread_mutex_lock(&w->lock);
    zmq_close(w->sock);
    w->sock = NULL;
    pthread_mutex_unlock(&w->lock);
    w->coord_hb_last = 0;
    w->reconnect_at = now + delay;
    w->backoff_s = w->backoff_s * 2 < BACKOFF_MAX_S ? w->backoff_s * 2 : BACKOFF_MAX_S;
}

/* --- requests -------------------------------------------------------------------------------- */

static void fake_generate(worker_t *w, const Folio__V1__Request *q)
{
    const Folio__V1__GenerateRequest *g = q->generate;
    int32_t token = g->prompt_tokens[g->n_prompt_tokens - 1];
    Folio__V1__TokenDelta d = FOLIO__V1__TOKEN_DELTA__INIT;
    d.index = (uint32_t)g->n_resume_tokens; /* a moved request's completion goes on after what was sent */
    d.n_tokens = 1;
    d.tokens = &token;
    Folio__V1__Usage usage = FOLIO__V1__USAGE__INIT;
    usage.prompt_tokens = (uint32_t)g->n_prompt_tokens;
    usage.completion_tokens = (uint32_t)g->n_resume_tokens + 1;
    Folio__V1__Timings timings = FOLIO__V1__TIMINGS__INIT;
    Folio__V1__GenerateResult result = FOLIO__V1__GENERATE_RESULT__INIT;
    result.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_LENGTH;
    result.usage = &usage;
    result.timings = &timings;
    result.group = (char *)w->group;
    Folio__V1__Status status = FOLIO__V1__STATUS__INIT;
    Folio__V1__Response resp;
    wire_response_init(&resp, q->id, FOLIO__V1__METHOD__METHOD_GENERATE, true);
    resp.status = &status;
    resp.delta = &d;
    resp.result = &result;
    worker_send(w, WIRE_CMD_FINAL, &resp.base);
    w->fake_prompt_tokens += g->n_prompt_tokens;
    w->fake_generated++;
}

void worker_submit_resolved(worker_t *w, worker_req_t *r, request_t *rq)
{
    fl_error_t err = {0};
    const int rc = sched_submit(w->sched, &rq->sched, &err);
    if (rc) {
        worker_req_close(w, r);
        reply_refused(w, rq->sched.id, FOLIO__V1__METHOD__METHOD_GENERATE, rc, err.msg);
    } else {
        fl_log_debug("worker accepted id=%llu prompt=%d resumed=%d max_tokens=%d stream=%d stops=%zu",
                     (unsigned long long)rq->sched.id, rq->sched.n_prompt, rq->sched.n_resume, rq->sched.max_tokens,
                     (int)rq->stream, rq->n_stops);
    }
    request_release(rq);
}

/* True when q was kept (parked for a KV pull: worker_peer.c frees it). */
static bool generate(worker_t *w, Folio__V1__Request *q)
{
    const Folio__V1__GenerateRequest *g = q->generate;
    const Folio__V1__Method method = FOLIO__V1__METHOD__METHOD_GENERATE;
    char msg[256];
    if (g->n_prompt_tokens == 0) {
        reply_error(w, q->id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT,
                    "worker: Generate needs prompt_tokens (the coordinator tokenizes text and messages)");
        return false;
    }
    if (w->fake) {
        fake_generate(w, q);
        return false;
    }
    if (worker_req_find(w, q->id)) {
        snprintf(msg, sizeof msg, "worker: request id %llu is already live", (unsigned long long)q->id);
        reply_error(w, q->id, method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg);
        return false;
    }
    fl_error_t err = {0};
    request_t rq;
    if (request_resolve(&rq, q->id, g, q->tenant, q->timeout_ms, &w->defaults, w->n_vocab, &err)) {
        reply_error(w, q->id, method, wire_status_from_error(err.code), err.msg);
        return false;
    }
    worker_req_t *r = worker_req_open(w, &rq, &err);
    if (!r) {
        reply_refused(w, q->id, method, err.code, err.msg);
        request_release(&rq);
        return false;
    }
    if (worker_pull_start(w, q, r, &rq, fl_clock_s())) return true;
    worker_submit_resolved(w, r, &rq);
    return false;
}

static void handle_request(worker_t *w, const uint8_t *body, size_t len)
{
    fl_error_t err = {0};
    Folio__V1__Request *q = wire_decode_request(body, len, &err);
    if (!q) {
        /* Answer under the request's id when the bytes at least unpack, so its stream ends. */
        uint64_t id;
        Folio__V1__Method method;
        wire_peek_request(body, len, &id, &method);
        if (method == FOLIO__V1__METHOD__METHOD_CANCEL) {
            fl_log_warn("worker ignored a bad Cancel: %s", err.msg); /* Cancel is never answered */
            return;
        }
        reply_error(w, id, method, wire_status_from_error(err.code), err.msg);
        return;
    }
    switch (q->method) {
    case FOLIO__V1__METHOD__METHOD_GENERATE:
        if (generate(w, q)) return; /* parked for a KV pull, which owns q now */
        break;
    case FOLIO__V1__METHOD__METHOD_CANCEL:
        /* No reply: the cancelled stream's FINAL is the answer; an unknown id has already finished.
         * One parked for a KV pull goes to the scheduler first, to be cancelled there. */
        worker_pull_release(w, q->cancel->target_id);
        if (w->sched && sched_cancel(w->sched, q->cancel->target_id))
            fl_log_debug("worker cancel id=%llu: not live", (unsigned long long)q->cancel->target_id);
        break;
    default: {
        char msg[128];
        snprintf(msg, sizeof msg, "worker: method %d is served by the coordinator, not a worker", (int)q->method);
        reply_error(w, q->id, q->method, FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, msg);
        break;
    }
    }
    folio__v1__request__free_unpacked(q, NULL);
}

void worker_handle_message(worker_t *w, const wire_msg_t *m, double now)
{
    w->last_heard = now; /* anything at all proves the coordinator is there */
    w->backoff_s = BACKOFF_MIN_S;
    fl_error_t err = {0};
    if (wire_check_header(m, WIRE_HEADER_WORKER, &err)) {
        fl_log_warn("worker ignored a message: %s", err.msg);
        return;
    }
    switch (m->cmd) {
    case WIRE_CMD_REQUEST:
        if (w->rank > 0)
            fl_log_warn("worker rank %d got a request: only rank 0 of a group serves them", w->rank);
        else
            handle_request(w, m->body, m->body_len);
        break;
    case WIRE_CMD_JOIN: /* a tensor-parallel rank > 0: its group's communicator (worker_follow.c) */
        if (w->on_join) w->on_join(w->on_join_user, m);
        break;
    case WIRE_CMD_HEARTBEAT:
        if (w->coord_hb_last > 0 && now - w->coord_hb_last < 30) w->coord_hb_gap = now - w->coord_hb_last;
        w->coord_hb_last = now;
        break;
    case WIRE_CMD_DISCONNECT:
        fl_log_info("coordinator sent DISCONNECT: dropping live requests and registering again");
        worker_pull_release_all(w);
        if (w->sched) sched_cancel_all(w->sched);
        send_ready(w);
        break;
    default:
        fl_log_warn("worker ignored command 0x%02x from the coordinator", m->cmd);
        break;
    }
}

/* Reads every waiting message (up to DRAIN_MAX, so the engine is not starved by a flood). */
static void drain(worker_t *w)
{
    for (int i = 0; i < DRAIN_MAX && w->sock; i++) {
        wire_msg_t m;
        fl_error_t err = {0};
        const int rc = wire_recv(w->sock, false, true, &m, &err);
        if (rc == FL_EIO && errno == EAGAIN) return;
        if (rc == FL_OK)
            worker_handle_message(w, &m, fl_clock_s());
        else
            fl_log_warn("worker receive: %s", err.msg);
        wire_msg_close(&m);
        if (rc == FL_EIO) return;
    }
}

/* --- the loop -------------------------------------------------------------------------------- */

/* Whether the loop may run a step: no FINAL is waiting and the send queue has room (else the
 * step's output could not leave: the loop waits for the coordinator instead). */
static bool can_send(worker_t *w)
{
    if (!worker_retry_finals(w)) return false;
    int events = 0;
    size_t len = sizeof events;
    pthread_mutex_lock(&w->lock);
    const bool ok = w->sock && zmq_getsockopt(w->sock, ZMQ_EVENTS, &events, &len) == 0 && (events & ZMQ_POLLOUT);
    pthread_mutex_unlock(&w->lock);
    return ok;
}

/* SIGTERM: keep serving what arrives, announce it in every heartbeat so the coordinator routes
 * nothing more here, and stop once the work is done and the coordinator has had time to notice. */
static void start_drain(worker_t *w, double now)
{
    sched_stats_t st = {0};
    if (w->sched) sched_get_stats(w->sched, &st);
    fl_log_info("worker draining: %d running, %d waiting; stopping when done (at most %.0fs)", st.running, st.waiting,
                w->drain_timeout_s);
    pthread_mutex_lock(&w->lock);
    w->draining = true;
    w->drain_since = now;
    pthread_mutex_unlock(&w->lock);
    worker_heartbeat(w, now);
}

static bool drain_finished(worker_t *w, double now)
{
    const bool idle = (!w->sched || !sched_has_work(w->sched)) && w->n_pending == 0;
    if (idle && now - w->drain_since >= DRAIN_NOTICE_BEATS * w->heartbeat_ms * 1e-3) return true;
    if (now - w->drain_since < w->drain_timeout_s) return false;
    fl_log_warn("worker drain timed out after %.0fs: cancelling what is left", w->drain_timeout_s);
    return true;
}

static int run(worker_t *w)
{
    const double beat = w->heartbeat_ms * 1e-3;
    /* The first heartbeat (after a liveness step) goes right after READY: the coordinator routes to a
     * group only once a heartbeat has shown its engine computes. */
    w->next_heartbeat = fl_clock_s();
    while (!g_stop) {
        double now = fl_clock_s();
        if (g_drain && !w->draining) start_drain(w, now);
        if (w->draining && drain_finished(w, now)) break;
        if (!w->sock) {
            if (now < w->reconnect_at) {
                zmq_poll(NULL, 0, ms_until(w->reconnect_at, now)); /* a sleep that a signal ends */
                continue;
            }
            fl_error_t err = {0};
            if (worker_connect(w, &err)) {
                fl_log_error("worker: %s", err.msg);
                w->reconnect_at = now + BACKOFF_MAX_S;
            }
            continue;
        }
        const bool work = w->sched && sched_has_work(w->sched);
        const bool room = can_send(w);
        double wake = w->next_heartbeat;
        if (w->last_heard + dead_after_s(w) < wake) wake = w->last_heard + dead_after_s(w);
        if (w->kv_events && kv_events_pending(w->kv_events) && w->kv_events_next < wake) wake = w->kv_events_next;
        wake = worker_peer_next_deadline(w, wake);
        zmq_pollitem_t items[1 + PEER_POLL_MAX];
        const int n_items = 1 + worker_peer_poll_items(w, items + 1, PEER_POLL_MAX);
        pthread_mutex_lock(&w->lock);
        items[0] = (zmq_pollitem_t){.socket = w->sock, .events = ZMQ_POLLIN | (room ? 0 : ZMQ_POLLOUT)};
        const int n = zmq_poll(items, n_items, work && room ? 0 : ms_until(wake, now));
        const int poll_errno = errno;
        if (n > 0 && (items[0].revents & ZMQ_POLLIN)) drain(w);
        pthread_mutex_unlock(&w->lock);
        worker_peer_service(w, fl_clock_s());
        if (n < 0 && poll_errno != EINTR) {
            fl_log_error("worker: zmq_poll: %s", zmq_strerror(poll_errno));
            return 1;
        }
        if (g_stop) break;
        now = fl_clock_s();
        if (now - w->last_heard > dead_after_s(w)) {
            lost_coordinator(w, now);
            continue;
        }
        if (room && w->sched && sched_has_work(w->sched)) {
            fl_error_t err = {0};
            const int rc = sched_step(w->sched, &err);
            worker_beat_step_end(w);
            if (rc == FL_EPEER) {
                fl_log_error("worker: the tensor-parallel group failed: %s", err.msg);
                w->tp_failed = true;
                return 1;
            }
            if (rc) {
                fl_log_error("worker: engine step failed: %s", err.msg);
                w->last_step_ok = false;
                w->step_failed_since_hb = true;
            } else {
                w->last_step_ok = true;
            }
            worker_flush_partials(w);
            now = fl_clock_s();
        }
        worker_kv_events_flush(w, now);
        pthread_mutex_lock(&w->lock);
        const bool due = now >= w->next_heartbeat;
        pthread_mutex_unlock(&w->lock);
        if (due) {
            /* Requests that arrived during the step are held too: read them before listing. */
            if (!g_stop) {
                pthread_mutex_lock(&w->lock);
                drain(w);
                pthread_mutex_unlock(&w->lock);
            }
            worker_heartbeat(w, now);
            if (w->tp_failed) return 1; /* its liveness step found the group failed */
            pthread_mutex_lock(&w->lock);
            w->next_heartbeat += beat;
            if (w->next_heartbeat < now) w->next_heartbeat = now + beat; /* a long step: do not burst */
            pthread_mutex_unlock(&w->lock);
        }
    }
    return 0;
}

/* Rank 0 of a tensor-parallel group: waits until the other ranks, which got comm_id through the
 * coordinator, have joined. The heartbeat thread beats meanwhile (as during a step) with engine_ok
 * false, so the coordinator keeps the group registered but routes nothing to it yet. */
static int join_group(worker_t *w, fl_error_t *err)
{
    fl_log_info("worker waiting for ranks 1..%d of group %s (at most %.0fs)", w->tp - 1, w->group, w->tp_join_timeout_s);
    w->engine_ok = false;
    worker_beat_step_begin(w, 0, w->tp_join_timeout_s / 10); /* the thread's hang limit: 10x that */
    const comm_opts_t o = {.timeout_ms = (int)(w->tp_timeout_s * 1e3), .join_timeout_ms = (int)(w->tp_join_timeout_s * 1e3),
                           .cancel = (const volatile int *)&g_stop, .backend = w->eng->be};
    w->comm = comm_init(&w->comm_id, 0, w->tp, &o, err);
    worker_beat_step_end(w);
    int rc = w->comm ? FL_OK : err->code;
    if (!rc) rc = model_set_comm(w->eng->model, w->comm, err);
    if (!rc) rc = tp_check_group(w->eng->model, w->eng->kv, err);
    if (rc) return rc;
    w->engine_ok = true; /* the first heartbeat's liveness step, a step of the whole group, proves it */
    fl_log_info("worker group %s formed: %d ranks", w->group, w->tp);
    return FL_OK;
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: zmq_poll returns EINTR and the loop sees the flag */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* A rank other than 0 (worker_follow.c), once its shard is loaded: the process's status. */
static int follower_main(worker_t *w)
{
    fl_error_t err = {0};
    const model_t *m = w->eng->model;
    w->kv_blocks = (uint32_t)w->eng->kv->n_blocks;
    w->block_size = (uint32_t)w->eng->kv->block_size;
    w->max_context = (uint32_t)(m->max_blocks * w->eng->kv->block_size);
    fl_log_info("worker group=%s rank=%d of %d model_id=%s backend=%s heads=%d..%d kv_heads=%d..%d ff=%d..%d "
                "weights_mib=%.1f kv_blocks=%u",
                w->group, w->rank, w->tp, w->model_id, kern_backend_name(w->eng->be), m->shard.head0,
                m->shard.head0 + m->shard.n_heads - 1, m->shard.kv_head0, m->shard.kv_head0 + m->shard.n_kv_heads - 1,
                m->shard.ff0, m->shard.ff0 + m->shard.n_ff - 1, m->weight_bytes / 1048576.0, w->kv_blocks);
    int rc = 1;
    if (!(w->zctx = zmq_ctx_new())) {
        fprintf(stderr, "error: zmq_ctx_new: %s\n", zmq_strerror(errno));
    } else {
        install_signals();
        rc = worker_follow(w, &g_stop, &g_drain);
    }
    engine_destroy(&w->eng);
    comm_destroy(&w->comm);
    worker_health_clear(w);
    if (w->zctx) zmq_ctx_term(w->zctx);
    pthread_cond_destroy(&w->beat_wake);
    pthread_mutex_destroy(&w->lock);
    (void)err;
    return rc;
}

int main(int argc, char **argv)
{
    engine_opts_t eo = {0};
    sched_opts_t so = {0};
    spec_paths_t spec_tree; /* --spec-tree */
    const char *endpoint_flag = NULL, *group = "g0", *health_file = NULL, *curve_secret = NULL, *coordinator_key = NULL;
    long kv_events_ms = 100, kv_pull_timeout_ms = 1000;
    const char *kv_peer = "tcp://127.0.0.1:*", *kv_peer_advertise = NULL, *peer_keys_path = NULL;
    long rank = 0, tp = 1, heartbeat_ms = 1000, max_waiting = 4096, restarts = 0, n;
    double drain_timeout_s = 60, tp_timeout_s = 30, tp_join_timeout_s = 300;
    bool fake = false;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v;
        const int e = engine_parse_flag(&eo, argc, argv, &i);
        if (e < 0) return 2;
        if (e > 0) continue;
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(f, "--coordinator-workers") || !strcmp(f, "--workers")) {
            if (!(endpoint_flag = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(f, "--curve-secret")) {
            if (!(curve_secret = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(f, "--coordinator-key")) {
            if (!(coordinator_key = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(f, "--group")) {
            if (!(group = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(f, "--rank")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 0, 1024, &rank)) return 2;
        } else if (!strcmp(f, "--tp")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, COMM_MAX_RANKS, &tp)) return 2;
        } else if (!strcmp(f, "--tp-timeout-s")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(f, v, 0.1, 3600, &tp_timeout_s)) return 2;
        } else if (!strcmp(f, "--tp-join-timeout-s")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(f, v, 0.1, 86400, &tp_join_timeout_s)) return 2;
        } else if (!strcmp(f, "--heartbeat-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 10, 600000, &heartbeat_ms)) return 2;
        } else if (!strcmp(f, "--max-batch-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, 1 << 20, &n)) return 2;
            eo.max_batch_tokens = so.max_batch_tokens = (int)n;
        } else if (!strcmp(f, "--max-seqs")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, 1 << 16, &n)) return 2;
            eo.max_seqs = so.max_running = (int)n;
        } else if (!strcmp(f, "--kv-events-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 0, 600000, &kv_events_ms)) return 2;
        } else if (!strcmp(f, "--kv-peer")) {
            if (!(kv_peer = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(f, "--peer-keys")) {
            if (!(peer_keys_path = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(f, "--kv-peer-advertise")) {
            if (!(kv_peer_advertise = fl_flag_value(argc, argv, &i))) return 2;
            if (!wire_endpoint_ok(kv_peer_advertise)) {
                fprintf(stderr, "error: --kv-peer-advertise %s: expected a tcp:// or ipc:// endpoint\n", kv_peer_advertise);
                return 2;
            }
        } else if (!strcmp(f, "--kv-pull-timeout-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, 600000, &kv_pull_timeout_ms)) return 2;
        } else if (!strcmp(f, "--max-waiting")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, 1 << 20, &max_waiting)) return 2;
        } else if (!strcmp(f, "--no-prefix-cache")) {
            so.no_prefix_cache = true;
        } else if (!strcmp(f, "--spec")) {
            Folio__V1__SpecMode mode;
            if (!(v = fl_flag_value(argc, argv, &i))) return 2;
            if (!folio_spec_mode_parse(v, &mode)) {
                fprintf(stderr, "error: --spec %s: expected auto, none, ngram or medusa\n", v);
                return 2;
            }
            so.spec = request_spec_mode(mode);
        } else if (!strcmp(f, "--spec-tree")) {
            char why[160];
            if (!(v = fl_flag_value(argc, argv, &i))) return 2;
            if (spec_paths_parse(v, &spec_tree, why, sizeof why)) {
                fprintf(stderr, "error: --spec-tree: %s\n", why);
                return 2;
            }
            so.spec_paths = &spec_tree;
        } else if (!strcmp(f, "--restarts")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 0, UINT32_MAX, &restarts)) return 2;
        } else if (!strcmp(f, "--drain-timeout-s")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(f, v, 0, 86400, &drain_timeout_s)) return 2;
        } else if (!strcmp(f, "--fake")) {
            fake = true;
        } else if (!strcmp(f, "--health-file")) {
            if (!(health_file = fl_flag_value(argc, argv, &i))) return 2;
        } else {
            fprintf(stderr, "error: unknown flag '%s' (see --help)\n", f);
            return 2;
        }
    }
    if (tp > 1 && fake) {
        fprintf(stderr, "error: --tp %ld: a --fake worker has no model to cut\n", tp);
        return 2;
    }
    if (rank >= tp) {
        fprintf(stderr, "error: --rank %ld must be below --tp %ld\n", rank, tp);
        return 2;
    }
    if (!*group || strlen(group) > 128 || strchr(group, ':')) {
        fprintf(stderr, "error: --group '%s' must be 1 to 128 characters without ':'\n", group);
        return 2;
    }
    so.max_waiting = (int)max_waiting;

    worker_t w = {0};
    if (curve_secret || coordinator_key) {
        fl_error_t kerr = {0};
        if (!curve_secret || !coordinator_key || !curve_available()) {
            fprintf(stderr, "error: %s\n",
                    curve_available() ? "--curve-secret and --coordinator-key go together"
                                      : "--curve-secret: this libzmq has no CURVE (libsodium)");
            return 2;
        }
        if (curve_key_read(curve_secret, w.curve_secret, &kerr) ||
            curve_key_read(coordinator_key, w.coordinator_key, &kerr)) {
            fprintf(stderr, "error: %s\n", kerr.msg);
            return 2;
        }
        w.curve = true;
    }
    if (peer_keys_path && !w.curve) {
        fprintf(stderr, "error: --peer-keys goes with --curve-secret (a plaintext peer link checks no keys)\n");
        return 2;
    }
    auth_keys_t *peer_keys = NULL;
    if (peer_keys_path) {
        fl_error_t kerr = {0};
        if (!(peer_keys = auth_keys_load(peer_keys_path, false, &kerr))) {
            fprintf(stderr, "error: --peer-keys: %s\n", kerr.msg);
            return 2;
        }
    }
    w.endpoint = wire_endpoint(endpoint_flag, "FOLIO_WORKER_ENDPOINT", WIRE_DEFAULT_WORKER_ENDPOINT);
    w.group = group;
    w.rank = (int)rank;
    w.tp = (int)tp;
    w.heartbeat_ms = (int)heartbeat_ms;
    w.restarts = (uint32_t)restarts;
    w.drain_timeout_s = drain_timeout_s;
    w.tp_timeout_s = tp_timeout_s;
    w.tp_join_timeout_s = tp_join_timeout_s;
    eo.tp_rank = (int)rank;
    eo.tp_size = (int)tp;
    w.fake = fake;
    w.health_file = health_file && *health_file ? health_file : NULL;
    worker_health_clear(&w); /* a file left by an earlier process proves nothing about this one */
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE); /* a send from inside drain() nests */
    pthread_mutex_init(&w.lock, &attr);
    pthread_mutexattr_destroy(&attr);
    pthread_cond_init(&w.beat_wake, NULL);
    w.epoch = realtime_us();
    g_rng = w.epoch ^ ((uint64_t)getpid() << 32);
    w.backoff_s = BACKOFF_MIN_S;
    w.engine_ok = w.last_step_ok = true;
    const char *model_path = fl_model_path(eo.model_path);
    make_model_id(w.model_id, sizeof w.model_id, model_path, fake);

    fl_error_t err = {0};
    int n_slots = 1;
    if (fake) {
        w.kv_blocks = FAKE_KV_BLOCKS;
        w.block_size = FAKE_BLOCK_SIZE;
        w.max_context = eo.max_ctx > 0 ? (uint32_t)eo.max_ctx : FAKE_MAX_CONTEXT;
        fl_log_info("worker group=%s rank=%d fake=1 (no model) model_id=%s kv_blocks=%u block_size=%u", w.group, w.rank,
                    w.model_id, w.kv_blocks, w.block_size);
    } else {
        w.eng = engine_new(&eo, &err);
        if (!w.eng) {
            fprintf(stderr, "error: %s\n", err.msg);
            return 1;
        }
        if (w.rank > 0) { /* followers serve no pulls */
            auth_keys_destroy(&peer_keys);
            return follower_main(&w);
        }
        /* Rank 0 names the group's communicator: NCCL between GPUs, shared memory between CPUs. */
        if (w.tp > 1 && comm_id_new(kern_uses_device_memory(w.eng->be) ? COMM_NCCL : COMM_HOST, &w.comm_id, &err)) {
            fprintf(stderr, "error: %s\n", err.msg);
            engine_destroy(&w.eng);
            return 1;
        }
        so.medusa = w.eng->medusa; /* NULL without heads: AUTO and MEDUSA requests draft by n-gram */
        if (so.spec == SCHED_SPEC_MEDUSA && !so.medusa)
            fl_log_warn("worker --spec medusa without Medusa heads (--heads FILE): requests draft by n-gram");
        const sched_callbacks_t cb = {.on_token = worker_on_token, .on_finish = worker_on_finish,
                                      .on_step = worker_beat_step_begin, .user = &w};
        w.sched = sched_new(w.eng->model, w.eng->kv, &so, &cb, &err);
        if (!w.sched) {
            fprintf(stderr, "error: %s\n", err.msg);
            engine_destroy(&w.eng);
            return 1;
        }
        const model_t *m = w.eng->model;
        const kv_cache_t *kv = w.eng->kv;
        sched_stats_t st;
        sched_get_stats(w.sched, &st);
        w.tok = m->tok;
        w.n_vocab = m->cfg.n_vocab;
        request_defaults_init(&w.defaults, m->gguf);
        char defaults[256];
        request_defaults_describe(&w.defaults, defaults, sizeof defaults);
        fl_log_info("worker sampling defaults: %s", defaults);
        w.kv_blocks = (uint32_t)st.kv_blocks_total;
        w.block_size = (uint32_t)kv->block_size;
        kv_cache_type_name(kv, w.kv_type, sizeof w.kv_type);
        w.kv_bytes_per_token = (uint32_t)kv->bytes_per_token;
        /* The longest sequence it can really serve: the model's context, or all of the KV cache if
         * that is less. */
        const uint32_t kv_tokens = w.kv_blocks * w.block_size;
        w.max_context = (uint32_t)(m->max_blocks * kv->block_size);
        if (kv_tokens < w.max_context) w.max_context = kv_tokens;
        n_slots = (int)max_waiting + m->max_seqs; /* everything the scheduler can hold at once */
        if (kv_events_ms > 0) {
            if (!(w.kv_events = kv_events_new(KV_EVENTS_DEFAULT_CAP, &err))) {
                fprintf(stderr, "error: %s\n", err.msg);
                sched_destroy(&w.sched);
                engine_destroy(&w.eng);
                return 1;
            }
            kv_events_attach(w.kv_events, w.eng->kv);
            w.kv_events_ms = (int)kv_events_ms;
        }
        /* bytes per element: 2 for f16, 34/32 for q8_0, 18/32 for q4_0 (whole 32-element blocks) */
        const int64_t kb = (int64_t)fl_dtype_block_bytes(kv->k_type), ke = fl_dtype_block_elems(kv->k_type);
        const int64_t vb = (int64_t)fl_dtype_block_bytes(kv->v_type), ve = fl_dtype_block_elems(kv->v_type);
        fl_log_info("worker group=%s rank=%d model=%s model_id=%s backend=%s kv_type=%s kv_bytes_per_token=%zu "
                    "(%d layers x %d kv_heads x %d head_dim x (%lld/%lld K + %lld/%lld V bytes per element)) "
                    "kv_capacity_tokens=%u kv_blocks=%u block_size=%u max_context=%u",
                    w.group, w.rank, model_path, w.model_id, kern_backend_name(w.eng->be), w.kv_type,
                    kv->bytes_per_token, m->cfg.n_layers, kv->n_kv_heads, m->cfg.head_dim, (long long)kb,
                    (long long)ke, (long long)vb, (long long)ve, w.kv_blocks * w.block_size, w.kv_blocks,
                    w.block_size, w.max_context);
    }
    int rc = worker_reqs_init(&w, n_slots, &err);
    if (!rc) {
        w.zctx = zmq_ctx_new();
        if (!w.zctx) rc = fl_fail(&err, FL_EIO, "zmq_ctx_new: %s", zmq_strerror(errno));
    }
    w.pull_timeout_s = (double)kv_pull_timeout_ms * 1e-3;
    w.prefix_cache = !so.no_prefix_cache;
    if (!rc && !fake && strcmp(kv_peer, "off")) {
        if (w.curve && !peer_keys) /* nothing travels in the clear, and only listed workers pull */
            fl_log_info("worker: KV block pulls off (the links are CURVE-encrypted and no --peer-keys names the "
                        "workers that may pull)");
        else if (peer_keys && !(w.peer_auth = auth_new(w.zctx, peer_keys, NULL, false, &err)))
            rc = err.code;
        else
            rc = worker_peer_init(&w, kv_peer, kv_peer_advertise, &err);
    }
    if (!rc) rc = worker_connect(&w, &err);
    if (!rc && !fake) rc = worker_beat_start(&w, &err);
    if (rc) {
        fprintf(stderr, "error: %s\n", err.msg);
    } else {
        install_signals();
        if (w.tp > 1 && join_group(&w, &err)) {
            fl_log_error("worker: the tensor-parallel group did not form: %s", err.msg);
            w.tp_failed = true;
            rc = 1;
        } else {
            fl_log_info("worker serving identity=%s endpoint=%s encrypted=%s heartbeat_ms=%d tp=%d", w.identity,
                        w.endpoint, w.curve ? "yes" : "no", w.heartbeat_ms, w.tp);
            rc = run(&w) ? 1 : 0;
        }
        fl_log_info("worker stopping: cancelling live requests, sending DISCONNECT");
    }
    worker_beat_stop(&w);
    if (w.comm && !w.tp_failed) { /* the other ranks stop with this one */
        fl_error_t serr = {0};
        if (tp_stop(w.eng->model, &serr)) fl_log_warn("worker: stopping the other ranks: %s", serr.msg);
    }
    if (w.tp_failed && w.sock) {
        /* No FINALs: the DISCONNECT makes the coordinator fail this group's requests over. */
        worker_send(&w, WIRE_CMD_DISCONNECT, NULL);
        const int linger = SHUTDOWN_LINGER_MS;
        zmq_setsockopt(w.sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(w.sock);
        w.sock = NULL;
    }
    worker_pull_release_all(&w);
    if (w.sched) sched_cancel_all(w.sched); /* every accepted request gets its FINAL */
    /* FINALs that found the queue full get the linger time to find room. */
    for (double until = fl_clock_s() + SHUTDOWN_LINGER_MS * 1e-3; w.sock && !worker_retry_finals(&w) &&
                                                                   fl_clock_s() < until;)
        zmq_poll(NULL, 0, 10);
    worker_drop_finals(&w);
    if (w.sock) {
        worker_send(&w, WIRE_CMD_DISCONNECT, NULL);
        const int linger = SHUTDOWN_LINGER_MS;
        zmq_setsockopt(w.sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(w.sock);
        w.sock = NULL;
    }
    worker_peer_close(&w);
    auth_destroy(&w.peer_auth); /* its thread polls a socket of the context: before zmq_ctx_term */
    auth_keys_destroy(&peer_keys);
    sched_destroy(&w.sched);
    if (w.eng) kv_events_attach(NULL, w.eng->kv);
    kv_events_destroy(&w.kv_events);
    engine_destroy(&w.eng);
    comm_destroy(&w.comm); /* the model borrowed it */
    worker_reqs_free(&w);
    worker_health_clear(&w);
    if (w.zctx) zmq_ctx_term(w.zctx);
    pthread_cond_destroy(&w.beat_wake);
    pthread_mutex_destroy(&w.lock);
    return rc ? 1 : 0;
}
