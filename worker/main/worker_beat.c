/* worker_beat.c - the worker's HEARTBEATs: from the loop between steps, from a thread during one.
 *
 * Liveness must not depend on how long a step takes: a long prompt's prefill chunk, or a step on a
 * slow machine, would otherwise hold the loop past three heartbeat intervals and the coordinator
 * would declare a healthy group dead (and the group it fails over to die the same way). So while a
 * step runs, a second thread sends the heartbeats, built from the load the loop recorded when the
 * step began. A hung engine is still caught, from progress rather than silence: the scheduler
 * gives each step its expected duration (sched_expected_s, a cost model fitted over the steps run)
 * and the thread stops beating once the step has run past HANG_FACTOR times that (at least
 * HANG_MIN_BEATS intervals; HANG_UNKNOWN_S before anything was measured), so the coordinator then
 * declares the group dead and fails its requests over. Between steps the loop sends them itself,
 * proving with a one-token liveness step when idle that the engine computes.
 *
 * --health-file PATH carries the same verdict to a local probe (a Kubernetes liveness check, which
 * cannot read heartbeats): every heartbeat that says engine_ok touches the file, so its age grows
 * while the engine is hung (the thread stops beating) or failing (engine_ok false), and not while
 * the coordinator is merely unreachable (heartbeats still go out into a reconnecting socket).
 *
 * Threading: the socket and the fields worker.h marks shared are used under w->lock by both
 * threads (a ZeroMQ socket may be used from several threads one at a time, with a full memory
 * barrier between them: the mutex gives it). */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "worker.h"

#define HANG_FACTOR    10.0
#define HANG_MIN_BEATS 5
#define HANG_UNKNOWN_S 300.0

/* Sets the health file's time to now, creating it if needed. Caller holds the lock. */
static void touch_health_file(worker_t *w)
{
    if (!w->health_file || utimensat(AT_FDCWD, w->health_file, NULL, 0) == 0) return;
    if (errno == ENOENT) {
        const int fd = open(w->health_file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            close(fd);
            return;
        }
    }
    if (!w->health_warned) fl_log_warn("worker cannot touch --health-file %s: %s", w->health_file, strerror(errno));
    w->health_warned = true;
}

void worker_health_clear(worker_t *w)
{
    if (w->health_file && unlink(w->health_file) && errno != ENOENT)
        fl_log_warn("worker cannot remove --health-file %s: %s", w->health_file, strerror(errno));
}

/* One HEARTBEAT; stats and ids are the load to report. Caller holds the lock. */
static void send_heartbeat(worker_t *w, double now, const sched_stats_t *st, int n_ids, double step_running_s)
{
    Folio__V1__WorkerLoad l = FOLIO__V1__WORKER_LOAD__INIT;
    if (w->fake) {
        l.kv_blocks_total = w->kv_blocks;
        l.prompt_tokens = w->fake_prompt_tokens;
        l.generated_tokens = w->fake_generated;
        l.tokens_per_s = now > w->t_hb ? (double)(w->fake_generated - w->gen_at_hb) / (now - w->t_hb) : 0;
        w->gen_at_hb = w->fake_generated;
    } else {
        l.running = (uint32_t)st->running;
        l.waiting = (uint32_t)st->waiting;
        l.kv_blocks_total = (uint32_t)st->kv_blocks_total;
        l.kv_blocks_used = (uint32_t)(st->kv_blocks_used > 0 ? st->kv_blocks_used : 0);
        l.kv_blocks_cached = (uint32_t)st->kv_blocks_cached;
        l.prompt_tokens = st->prompt_tokens;
        l.cached_prompt_tokens = st->cached_prompt_tokens;
        l.generated_tokens = st->generated_tokens;
        l.preemptions = st->preemptions;
        l.drafted_tokens = st->drafted_tokens;
        l.accepted_tokens = st->accepted_tokens;
        l.spec_seq_steps = st->spec_seq_steps;
        l.kv_pulled_blocks = w->kv_pulled_blocks;
        l.kv_pull_failures = w->kv_pull_failures;
        l.kv_served_blocks = w->kv_served_blocks;
        l.kv_pull_seconds = w->kv_pull_seconds;
        l.tokens_per_s = now > w->t_hb ? (double)(st->generated_tokens - w->gen_at_hb) / (now - w->t_hb) : 0;
        w->gen_at_hb = st->generated_tokens;
    }
    l.engine_ok = w->engine_ok;
    l.liveness_step_s = w->liveness_s;
    l.draining = w->draining;
    l.step_running_s = step_running_s;
    l.step_limit_s = step_running_s > 0 ? w->step_limit : 0;
    if (w->hb_ids) {
        l.n_live_ids = (size_t)n_ids;
        l.live_ids = w->hb_ids;
    }
    w->t_hb = now;
    worker_send(w, WIRE_CMD_HEARTBEAT, &l.base);
    if (l.engine_ok) touch_health_file(w);
}

/* The live ids into hb_ids; their count. */
static int collect_ids(worker_t *w)
{
    int n = 0;
    for (int i = 0; w->hb_ids && i < w->n_reqs; i++)
        if (w->reqs[i].live) w->hb_ids[n++] = w->reqs[i].id;
    return n;
}

void worker_heartbeat(worker_t *w, double now)
{
    sched_stats_t st = {0};
    if (w->fake) {
        w->engine_ok = true;
    } else {
        sched_get_stats(w->sched, &st);
        if (st.steps == w->steps_at_hb && !w->step_failed_since_hb) {
            /* No real step since the last heartbeat: prove the engine still computes. */
            fl_error_t err = {0};
            const double dt = sched_liveness(w->sched, &err);
            if (dt < 0) {
                if (w->engine_ok) fl_log_error("worker liveness step failed: %s", err.msg);
                w->engine_ok = false;
                if (err.code == FL_EPEER) w->tp_failed = true; /* the group failed: the loop exits */
            } else {
                w->engine_ok = true;
                w->liveness_s = dt;
            }
        } else {
            w->engine_ok = w->last_step_ok;
        }
        w->steps_at_hb = st.steps;
        w->step_failed_since_hb = false;
    }
    pthread_mutex_lock(&w->lock);
    send_heartbeat(w, now, &st, collect_ids(w), 0);
    pthread_mutex_unlock(&w->lock);
}

/* --- during a step --------------------------------------------------------------------------- */

void worker_beat_step_begin(void *user, int n_tokens, double expected_s)
{
    worker_t *w = user;
    const double beat = w->heartbeat_ms * 1e-3;
    double limit = expected_s > 0 ? HANG_FACTOR * expected_s + beat : HANG_UNKNOWN_S;
    if (limit < HANG_MIN_BEATS * beat) limit = HANG_MIN_BEATS * beat;
    pthread_mutex_lock(&w->lock);
    sched_get_stats(w->sched, &w->step_stats);
    w->n_step_ids = collect_ids(w);
    w->step_start = fl_clock_s();
    w->step_limit = limit;
    w->hung = false;
    atomic_store(&w->in_step, true);
    pthread_cond_signal(&w->beat_wake);
    pthread_mutex_unlock(&w->lock);
    (void)n_tokens;
}

void worker_beat_step_end(worker_t *w)
{
    if (!atomic_load(&w->in_step)) return;
    pthread_mutex_lock(&w->lock);
    atomic_store(&w->in_step, false);
    if (w->hung)
        fl_log_warn("worker: the step that passed its limit finished after %.1fs", fl_clock_s() - w->step_start);
    w->hung = false;
    pthread_mutex_unlock(&w->lock);
}

static void *beat_main(void *arg)
{
    worker_t *w = arg;
    const double beat = w->heartbeat_ms * 1e-3;
    pthread_mutex_lock(&w->lock);
    while (!w->beat_quit) {
        /* Wake a few times an interval; sleep on the condition while no step runs. */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        const long ns = (long)(beat * 0.25e9);
        until.tv_sec += (until.tv_nsec + ns) / 1000000000L;
        until.tv_nsec = (until.tv_nsec + ns) % 1000000000L;
        pthread_cond_timedwait(&w->beat_wake, &w->lock, &until);
        if (w->beat_quit) break;
        if (!atomic_load(&w->in_step) || !w->sock) continue;
        const double now = fl_clock_s(), running = now - w->step_start;
        if (now < w->next_heartbeat) continue;
        if (running > w->step_limit) {
            /* Silence now lets the coordinator declare the group dead and fail its work over. */
            if (!w->hung)
                fl_log_error("worker: a step has run %.1fs, past its limit of %.1fs: the engine is taken for hung, "
                             "heartbeats stop",
                             running, w->step_limit);
            w->hung = true;
            continue;
        }
        send_heartbeat(w, now, &w->step_stats, w->n_step_ids, running > 0 ? running : 1e-9);
        w->next_heartbeat = now + beat;
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

int worker_beat_start(worker_t *w, fl_error_t *err)
{
    w->beat_quit = false;
    const int e = pthread_create(&w->beat_thread, NULL, beat_main, w);
    if (e) return fl_fail(err, FL_EIO, "worker: cannot start the heartbeat thread: %s", strerror(e));
    w->beat_running = true;
    return FL_OK;
}

void worker_beat_stop(worker_t *w)
{
    if (!w->beat_running) return;
    pthread_mutex_lock(&w->lock);
    w->beat_quit = true;
    pthread_cond_signal(&w->beat_wake);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->beat_thread, NULL);
    w->beat_running = false;
}
