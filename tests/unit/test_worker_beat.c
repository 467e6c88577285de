/* test_worker_beat.c - the worker's --health-file (worker/main/worker_beat.c), on a tiny model, with
 * worker_send replaced by a counter.
 *
 * Protects: the file a Kubernetes liveness probe reads says what the heartbeats say. Each heartbeat
 * that reports engine_ok touches it (the loop's, and the thread's during a step within its limit);
 * a step past its limit, which silences the heartbeats, leaves it to age; so does a failed engine
 * step (engine_ok false); and the worker removes it, so a stale file proves nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../../worker/main/worker.h"
#include "clock.h"
#include "mkmodel.h"
#include "test_tiny_model.h"

static int g_heartbeats; /* read and written under w->lock, as the worker sends under it */

int worker_send(worker_t *w, int cmd, const ProtobufCMessage *body)
{
    (void)body;
    pthread_mutex_lock(&w->lock);
    if (cmd == WIRE_CMD_HEARTBEAT) g_heartbeats++;
    pthread_mutex_unlock(&w->lock);
    return 0;
}

static int setup(void **state)
{
    (void)state;
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.seed = 5;
    return tiny_model_write("worker_beat", &p);
}

typedef struct fixture {
    worker_t w;
    char path[256];
} fixture_t;

static void fixture_open(fixture_t *f, int heartbeat_ms)
{
    memset(f, 0, sizeof *f);
    snprintf(f->path, sizeof f->path, "/tmp/folio_test_worker_beat_%d.health", (int)getpid());
    worker_t *w = &f->w;
    fl_error_t err = {0};
    engine_opts_t o = {.model_path = g_tiny_model, .backend = "cpu", .threads = 1, .kv_budget_bytes = 64 * 1024};
    w->eng = engine_new(&o, &err);
    if (!w->eng) fail_msg("engine_new: %s", err.msg);
    const sched_callbacks_t cb = {.user = w};
    w->sched = sched_new(w->eng->model, w->eng->kv, NULL, &cb, &err);
    if (!w->sched) fail_msg("sched_new: %s", err.msg);
    w->group = "g0";
    w->heartbeat_ms = heartbeat_ms;
    w->engine_ok = w->last_step_ok = true;
    w->health_file = f->path;
    w->sock = w; /* "connected": the heartbeat thread beats only then; worker_send above never uses it */
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&w->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    pthread_cond_init(&w->beat_wake, NULL);
    worker_health_clear(w);
    g_heartbeats = 0;
}

static void fixture_close(fixture_t *f)
{
    worker_beat_stop(&f->w);
    worker_health_clear(&f->w);
    sched_destroy(&f->w.sched);
    engine_destroy(&f->w.eng);
    pthread_cond_destroy(&f->w.beat_wake);
    pthread_mutex_destroy(&f->w.lock);
}

/* The file's modification time in seconds, or -1 when it is missing. */
static double mtime_of(const char *path)
{
    struct stat st;
    if (stat(path, &st)) return -1;
    return (double)st.st_mtim.tv_sec + st.st_mtim.tv_nsec * 1e-9;
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Dates the file back an hour, so that a touch is unmistakable. */
static void age_file(const char *path)
{
    const struct timespec old[2] = {{.tv_sec = time(NULL) - 3600}, {.tv_sec = time(NULL) - 3600}};
    assert_int_equal(utimensat(AT_FDCWD, path, old, 0), 0);
}

static int heartbeats(worker_t *w)
{
    pthread_mutex_lock(&w->lock);
    const int n = g_heartbeats;
    pthread_mutex_unlock(&w->lock);
    return n;
}

static void sleep_s(double s)
{
    const struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static void each_heartbeat_with_engine_ok_touches_the_file_and_a_failed_step_does_not(void **state)
{
    (void)state;
    fixture_t f;
    fixture_open(&f, 1000);
    assert_true(mtime_of(f.path) < 0);    /* cleared: nothing proven yet */
    worker_heartbeat(&f.w, fl_clock_s()); /* idle: a liveness step proves the engine computes */
    assert_true(f.w.engine_ok);
    assert_true(mtime_of(f.path) > wall_now() - 60);

    age_file(f.path);
    worker_heartbeat(&f.w, fl_clock_s());
    assert_true(mtime_of(f.path) > wall_now() - 60);

    /* A step that failed since the last heartbeat: the heartbeat says engine_ok false, no touch. */
    age_file(f.path);
    f.w.last_step_ok = false;
    f.w.step_failed_since_hb = true;
    const int before = g_heartbeats;
    worker_heartbeat(&f.w, fl_clock_s());
    assert_int_equal(g_heartbeats, before + 1); /* the heartbeat still goes, saying so */
    assert_false(f.w.engine_ok);
    assert_true(mtime_of(f.path) < wall_now() - 3000);

    worker_health_clear(&f.w);
    assert_true(mtime_of(f.path) < 0);
    fixture_close(&f);
}

static void a_step_past_its_limit_leaves_the_file_to_age_as_the_heartbeats_stop(void **state)
{
    (void)state;
    fixture_t f;
    fixture_open(&f, 20);
    fl_error_t err = {0};
    assert_int_equal(worker_beat_start(&f.w, &err), 0);
    worker_heartbeat(&f.w, fl_clock_s());
    assert_true(mtime_of(f.path) > 0);

    /* A step expected to take 10 s may run 100 s: the thread beats and touches meanwhile. */
    age_file(f.path);
    f.w.next_heartbeat = 0;
    worker_beat_step_begin(&f.w, 1, 10.0);
    const double t0 = fl_clock_s();
    while (mtime_of(f.path) < wall_now() - 60 && fl_clock_s() - t0 < 10) sleep_s(0.005);
    assert_true(mtime_of(f.path) > wall_now() - 60);
    worker_beat_step_end(&f.w);

    /* A step expected to take 0.1 ms may run 5 heartbeat intervals (100 ms), then it is taken for
     * hung: no heartbeat and no touch after that, however long it goes on. */
    worker_beat_step_begin(&f.w, 1, 1e-4);
    const double begun = fl_clock_s();
    sleep_s(0.1 + 0.1);
    assert_true(fl_clock_s() - begun > f.w.step_limit);
    const double stale = mtime_of(f.path);
    const int beats = heartbeats(&f.w);
    sleep_s(0.3);
    assert_true(mtime_of(f.path) == stale);
    assert_int_equal(heartbeats(&f.w), beats);
    assert_true(f.w.hung);

    /* The step ends after all: the loop's next heartbeat touches it again. */
    worker_beat_step_end(&f.w);
    worker_heartbeat(&f.w, fl_clock_s());
    assert_true(mtime_of(f.path) > stale);
    fixture_close(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(each_heartbeat_with_engine_ok_touches_the_file_and_a_failed_step_does_not),
        cmocka_unit_test(a_step_past_its_limit_leaves_the_file_to_age_as_the_heartbeats_stop),
    };
    return cmocka_run_group_tests(tests, setup, tiny_model_remove);
}
