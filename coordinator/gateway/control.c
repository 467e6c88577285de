/* control.c - see control.h.
 *
 * The thread owns its client. It sleeps on a condition variable until the interval passes or the
 * loop asks for a refresh, fetches Health then Status, and leaves the result as the one pending
 * snapshot (a newer one replaces one the loop has not taken yet), then writes the eventfd. */
#include "control.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "folio_client.h"
#include "log.h"

struct gw_control {
    char endpoint[256];
    int interval_ms, timeout_ms;
    int efd;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* under mu */
    bool stop, want;
    uint64_t begun; /* fetches begun */
    int failures;
    gw_snapshot_t pending; /* seq 0: none */
};

void gw_snapshot_clear(gw_snapshot_t *s)
{
    if (!s) return;
    if (s->status) folio__v1__response__free_unpacked(s->status, NULL);
    memset(s, 0, sizeof *s);
}

static void fetch(gw_control_t *c, folio_client_t *cl, gw_snapshot_t *s)
{
    fl_error_t err = {0};
    Folio__V1__Response *h = NULL;
    s->started_at = fl_clock_s();
    if (!cl) {
        snprintf(s->error, sizeof s->error, "no client for %s", c->endpoint);
        return;
    }
    if (folio_client_health(cl, c->timeout_ms, &h, &err)) {
        snprintf(s->error, sizeof s->error, "%s", err.msg);
        return;
    }
    if (h->health) {
        s->serving = h->health->serving;
        s->healthy_groups = h->health->healthy_groups;
        s->groups = h->health->groups;
        s->instance = h->health->instance;
    }
    folio__v1__response__free_unpacked(h, NULL);
    if (folio_client_status(cl, c->timeout_ms, &s->status, &err) || !s->status->cluster) {
        snprintf(s->error, sizeof s->error, "%s", *err.msg ? err.msg : "Status without a cluster");
        if (s->status) folio__v1__response__free_unpacked(s->status, NULL);
        s->status = NULL;
        return;
    }
    s->ok = true;
}

static void *control_main(void *arg)
{
    gw_control_t *c = arg;
    fl_error_t err = {0};
    folio_client_t *cl = folio_client_new(c->endpoint, &err);
    if (!cl) fl_log_error("gateway: control connection to %s: %s", c->endpoint, err.msg);
    double due = 0;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->stop && !c->want && fl_clock_s() < due) {
            const double left = due - fl_clock_s();
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            const long long ns = (long long)ts.tv_nsec + (long long)(left * 1e9);
            ts.tv_sec += (time_t)(ns / 1000000000LL);
            ts.tv_nsec = (long)(ns % 1000000000LL);
            pthread_cond_timedwait(&c->cv, &c->mu, &ts);
        }
        if (c->stop) break;
        c->want = false;
        gw_snapshot_t s = {.seq = ++c->begun};
        pthread_mutex_unlock(&c->mu);

        fetch(c, cl, &s);
        due = fl_clock_s() + c->interval_ms / 1e3;

        pthread_mutex_lock(&c->mu);
        c->failures = s.ok ? 0 : c->failures + 1;
        s.failures = c->failures;
        if (!s.ok && s.failures == 1) fl_log_warn("gateway: coordinator %s: %s", c->endpoint, s.error);
        gw_snapshot_clear(&c->pending);
        c->pending = s;
        const uint64_t one = 1;
        if (write(c->efd, &one, sizeof one) < 0 && errno != EAGAIN)
            fl_log_error("gateway: eventfd: %s", strerror(errno));
    }
    pthread_mutex_unlock(&c->mu);
    folio_client_destroy(&cl);
    return NULL;
}

gw_control_t *gw_control_new(const char *endpoint, int interval_ms, int timeout_ms, fl_error_t *err)
{
    gw_control_t *c = calloc(1, sizeof *c);
    if (!c) {
        fl_fail(err, FL_ENOMEM, "gateway: out of memory");
        return NULL;
    }
    snprintf(c->endpoint, sizeof c->endpoint, "%s", endpoint);
    c->interval_ms = interval_ms > 0 ? interval_ms : 1000;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 2000;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (c->efd < 0) {
        fl_fail(err, FL_EIO, "gateway: eventfd: %s", strerror(errno));
        gw_control_destroy(&c);
        return NULL;
    }
    const int rc = pthread_create(&c->thread, NULL, control_main, c);
    if (rc) {
        fl_fail(err, FL_EIO, "gateway: pthread_create: %s", strerror(rc));
        gw_control_destroy(&c);
        return NULL;
    }
    c->started = true;
    return c;
}

void gw_control_destroy(gw_control_t **cp)
{
    if (!cp || !*cp) return;
    gw_control_t *c = *cp;
    if (c->started) {
        pthread_mutex_lock(&c->mu);
        c->stop = true;
        pthread_cond_signal(&c->cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->thread, NULL);
    }
    gw_snapshot_clear(&c->pending);
    if (c->efd >= 0) close(c->efd);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c);
    *cp = NULL;
}

int gw_control_fd(const gw_control_t *c)
{
    return c->efd;
}

uint64_t gw_control_refresh(gw_control_t *c)
{
    pthread_mutex_lock(&c->mu);
    c->want = true;
    const uint64_t seq = c->begun + 1; /* a fetch under way may have begun before the request */
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return seq;
}

bool gw_control_take(gw_control_t *c, gw_snapshot_t *out)
{
    uint64_t v;
    while (read(c->efd, &v, sizeof v) > 0) {
    }
    pthread_mutex_lock(&c->mu);
    const bool newer = c->pending.seq > out->seq;
    if (newer) {
        gw_snapshot_clear(out);
        *out = c->pending;
        memset(&c->pending, 0, sizeof c->pending);
    }
    pthread_mutex_unlock(&c->mu);
    return newer;
}
