/* worker_follow.c - a tensor-parallel rank other than 0 (folio-worker --rank R --tp N, R > 0).
 *
 * Once its shard is loaded (model.h, tp.h), the rank registers with the coordinator like any rank
 * (READY, then a HEARTBEAT about every interval: a group is healthy only while every rank is heard
 * from) and waits for a JOIN, which carries the communicator id rank 0 registered with. It joins the
 * group's communicator, checks that the ranks were started alike (tp_check_group) and runs rank 0's
 * plans (tp_follow) until rank 0 stops it or the group fails. It never takes a request.
 *
 * Two threads: the main thread computes (the join, the steps); a control thread owns the socket
 * (READY, heartbeats, JOIN, DISCONNECT, reconnecting to a silent coordinator), so a long step never
 * silences the rank. They share the JOIN's id and the communicator under their own lock (f->mu), not
 * w->lock: the control thread holds w->lock while it polls the socket, and the main thread's waits
 * starved on it (a join took 18 s instead of milliseconds).
 *
 * Failure: a failure of the group (rank 0 gone or aborted, a step that timed out, a JOIN with another
 * id: rank 0 restarted) ends the process with status 1 after a DISCONNECT, and its supervisor starts
 * it again to join the new group. rank 0's STOP ends it with status 0. SIGTERM: the rank keeps
 * following (rank 0 drains, then stops it) for at most --drain-timeout-s; SIGINT or a second SIGTERM
 * end it at once. */
#include <errno.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "log.h"
#include "tp.h"
#include "worker.h"

#define FOLLOW_POLL_MS   100
#define FOLLOW_RETRY_S   0.5 /* before connecting again to a coordinator that fell silent */
#define FOLLOW_DEAD_BEATS 3

typedef struct follow {
    worker_t *w;
    const volatile sig_atomic_t *stop, *drain;
    /* shared (mu; taken inside w->lock when the control thread handles a message, never around it) */
    pthread_mutex_t mu;
    comm_id_t id;
    bool have_id;
    bool done;            /* the main thread is finished: the control thread ends */
    comm_t *comm;         /* once joined */
    char why[256];        /* why the control thread gave up */
    pthread_cond_t wake;
    volatile int cancel;  /* the control thread gave up: ends the join's waits */
} follow_t;

/* Ends the group from the control thread: the join's waits (cancel) or the steps' (comm_abort). */
static void give_up(follow_t *f, const char *why)
{
    pthread_mutex_lock(&f->mu);
    if (!f->cancel) {
        snprintf(f->why, sizeof f->why, "%s", why);
        fl_log_warn("worker rank %d leaves its group: %s", f->w->rank, why);
    }
    f->cancel = 1;
    if (f->comm) comm_abort(f->comm);
    pthread_cond_broadcast(&f->wake);
    pthread_mutex_unlock(&f->mu);
}

static void on_join(follow_t *f, const wire_msg_t *m)
{
    worker_t *w = f->w;
    Folio__V1__GroupJoin *j = folio__v1__group_join__unpack(NULL, m->body_len, m->body);
    if (!j || j->comm_id.len != sizeof(comm_id_t) || j->tp_size != (uint32_t)w->tp || strcmp(j->group, w->group)) {
        fl_log_warn("worker rank %d ignored a JOIN: %s", w->rank,
                    !j ? "not a valid folio.v1.GroupJoin" : "its group, size or id does not match this rank's");
        if (j) folio__v1__group_join__free_unpacked(j, NULL);
        return;
    }
    comm_id_t id;
    memcpy(&id, j->comm_id.data, sizeof id);
    const uint64_t epoch = j->leader_epoch;
    folio__v1__group_join__free_unpacked(j, NULL);
    pthread_mutex_lock(&f->mu);
    const bool first = !f->have_id, same = f->have_id && !memcmp(&id, &f->id, sizeof id);
    if (first) {
        f->id = id;
        f->have_id = true;
        pthread_cond_broadcast(&f->wake);
        fl_log_info("worker rank %d got its group's communicator (rank 0 epoch %llu)", w->rank,
                    (unsigned long long)epoch);
    }
    pthread_mutex_unlock(&f->mu);
    if (!first && !same) give_up(f, "rank 0 registered with a new communicator (it restarted)");
}

static void on_join_message(void *user, const wire_msg_t *m) { on_join(user, m); }

static void heartbeat(follow_t *f, double now)
{
    worker_t *w = f->w;
    Folio__V1__WorkerLoad l = FOLIO__V1__WORKER_LOAD__INIT;
    pthread_mutex_lock(&f->mu);
    l.engine_ok = f->comm && !f->cancel;
    pthread_mutex_unlock(&f->mu);
    l.kv_blocks_total = w->kv_blocks;
    l.draining = *f->drain != 0;
    w->t_hb = now;
    worker_send(w, WIRE_CMD_HEARTBEAT, &l.base);
}

static void close_socket(worker_t *w, bool say_bye)
{
    pthread_mutex_lock(&w->lock);
    if (w->sock) {
        if (say_bye) worker_send(w, WIRE_CMD_DISCONNECT, NULL);
        const int linger = say_bye ? 500 : 0;
        zmq_setsockopt(w->sock, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(w->sock);
        w->sock = NULL;
    }
    pthread_mutex_unlock(&w->lock);
}

static void *control_main(void *arg)
{
    follow_t *f = arg;
    worker_t *w = f->w;
    const double beat = w->heartbeat_ms * 1e-3;
    double next_beat = 0, reconnect_at = 0, drain_since = 0;
    for (;;) {
        pthread_mutex_lock(&f->mu);
        const bool done = f->done;
        pthread_mutex_unlock(&f->mu);
        if (done) break;
        double now = fl_clock_s();
        if (*f->stop) give_up(f, "stopped (SIGINT or a second SIGTERM)");
        if (*f->drain && drain_since == 0) drain_since = now;
        if (drain_since > 0 && now - drain_since > w->drain_timeout_s) give_up(f, "SIGTERM, and rank 0 did not stop it");
        if (!w->sock) {
            fl_error_t err = {0};
            if (now >= reconnect_at && worker_connect(w, &err)) {
                fl_log_error("worker: %s", err.msg);
                reconnect_at = now + FOLLOW_RETRY_S;
            }
            if (!w->sock) {
                zmq_poll(NULL, 0, FOLLOW_POLL_MS);
                continue;
            }
            next_beat = now;
        }
        pthread_mutex_lock(&w->lock);
        zmq_pollitem_t item = {.socket = w->sock, .events = ZMQ_POLLIN};
        const int n = zmq_poll(&item, 1, FOLLOW_POLL_MS);
        for (int i = 0; n > 0 && i < 64; i++) {
            wire_msg_t m;
            fl_error_t err = {0};
            const int rc = wire_recv(w->sock, false, true, &m, &err);
            if (rc == FL_EIO && errno == EAGAIN) break;
            if (rc == FL_OK) worker_handle_message(w, &m, fl_clock_s());
            wire_msg_close(&m);
            if (rc) break;
        }
        pthread_mutex_unlock(&w->lock);
        now = fl_clock_s();
        double dead = FOLLOW_DEAD_BEATS * (w->coord_hb_gap > beat ? w->coord_hb_gap : beat);
        if (now - w->last_heard > dead) {
            fl_log_warn("coordinator silent for %.1fs: reconnecting", now - w->last_heard);
            close_socket(w, false);
            w->coord_hb_last = 0;
            reconnect_at = now + FOLLOW_RETRY_S;
            continue;
        }
        if (now >= next_beat) {
            heartbeat(f, now);
            next_beat = now + beat;
        }
    }
    return NULL;
}

int worker_follow(worker_t *w, const volatile sig_atomic_t *stop, const volatile sig_atomic_t *drain)
{
    follow_t f = {.w = w, .stop = stop, .drain = drain};
    pthread_mutex_init(&f.mu, NULL);
    pthread_cond_init(&f.wake, NULL);
    w->on_join = on_join_message;
    w->on_join_user = &f;
    fl_error_t err = {0};
    pthread_t control;
    int e = pthread_create(&control, NULL, control_main, &f);
    if (e) {
        fl_log_error("worker: cannot start the control thread: %s", strerror(e));
        pthread_cond_destroy(&f.wake);
        pthread_mutex_destroy(&f.mu);
        return 1;
    }
    /* The coordinator's JOIN: rank 0's id. */
    pthread_mutex_lock(&f.mu);
    while (!f.have_id && !f.cancel) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += FOLLOW_POLL_MS * 1000000L;
        until.tv_sec += until.tv_nsec / 1000000000L;
        until.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&f.wake, &f.mu, &until);
    }
    const comm_id_t id = f.id;
    const bool have = f.have_id && !f.cancel;
    pthread_mutex_unlock(&f.mu);
    int rc = FL_EPEER;
    comm_t *comm = NULL;
    if (have) {
        fl_log_info("worker rank %d joining group %s", w->rank, w->group);
        const comm_opts_t o = {.timeout_ms = (int)(w->tp_timeout_s * 1e3),
                               .join_timeout_ms = (int)(w->tp_join_timeout_s * 1e3), .cancel = &f.cancel,
                               .backend = w->eng->be};
        comm = comm_init(&id, w->rank, w->tp, &o, &err);
        rc = comm ? FL_OK : err.code;
        if (!rc) rc = model_set_comm(w->eng->model, comm, &err);
        if (!rc) {
            pthread_mutex_lock(&f.mu);
            f.comm = comm;
            if (f.cancel) comm_abort(comm); /* gave up while joining */
            pthread_mutex_unlock(&f.mu);
            rc = tp_check_group(w->eng->model, w->eng->kv, &err);
        }
        if (!rc) {
            fl_log_info("worker rank %d of group %s follows rank 0", w->rank, w->group);
            rc = tp_follow(w->eng->model, w->eng->kv, &err);
        }
    } else {
        fl_fail(&err, FL_EPEER, "no communicator id came");
    }
    pthread_mutex_lock(&f.mu);
    f.done = true;
    pthread_mutex_unlock(&f.mu);
    pthread_join(control, NULL);
    if (rc)
        fl_log_error("worker rank %d of group %s: %s%s%s", w->rank, w->group, err.msg, f.why[0] ? "; " : "", f.why);
    else
        fl_log_info("worker rank %d: rank 0 stopped the group", w->rank);
    close_socket(w, true);
    w->comm = comm; /* destroyed after the engine, which borrows it */
    pthread_cond_destroy(&f.wake);
    pthread_mutex_destroy(&f.mu);
    return rc ? 1 : 0;
}
