/* e2e_util.h - what the cluster end-to-end tests share (header-only: each test is one executable).
 *
 * - A local cluster per test (cli_cluster.h) on unique ipc:// endpoints, short heartbeats, logs
 *   under $FOLIO_BUILD_DIR/Testing/e2e-logs/.
 * - Timeouts scaled for slow builds: e2e_ms(ms) is ms x5 under AddressSanitizer, x3 in a build
 *   without NDEBUG (FOLIO_E2E_SLOW=N overrides the factor).
 * - The invariant checker (shared/DESIGN.md): every accepted request gets exactly one FINAL, no token
 *   index is sent twice and indices have no gaps before the final, nothing arrives after a FINAL,
 *   and no request is left hanging (every FINAL within a bound). An e2e_tracker_t records every
 *   request the test sent and every event the coordinator sent back; e2e_pump() reads all clients
 *   until every tracked request is final; e2e_assert_invariant() fails the test naming each breach.
 *
 * Requests are tracked by (client index, request id). folio_client assigns ids 1, 2, ... per
 * connection, so clients used with a tracker must send only through e2e_send_* (the blocking
 * Status/Health/Drain calls go through a separate control client). */
#ifndef FOLIO_E2E_UTIL_H
#define FOLIO_E2E_UTIL_H

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <zmq.h>

#include "cli_cluster.h"
#include "dtype.h"
#include "folio_client.h"
#include "mkmodel.h"
#include "wire.h"

#if defined(__SANITIZE_ADDRESS__)
#define E2E_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define E2E_ASAN 1
#endif
#endif
#ifndef E2E_ASAN
#define E2E_ASAN 0
#endif

/* ---- time ------------------------------------------------------------------------------------ */

static inline double e2e_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static inline void e2e_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

/* How much slower than a Release build this one is. */
static inline int e2e_slow(void)
{
    const char *s = getenv("FOLIO_E2E_SLOW");
    if (s && atoi(s) > 0) return atoi(s);
    if (E2E_ASAN) return 5;
#ifndef NDEBUG
    return 3;
#else
    return 1;
#endif
}

static inline int e2e_ms(int ms) { return ms * e2e_slow(); }

/* A "long" generation length: long enough to be mid-stream when something happens to it, short
 * enough that a sanitizer build finishes. */
static inline int e2e_long_tokens(int release_tokens)
{
    const int s = e2e_slow();
    return s > 1 ? (release_tokens / 4 > 64 ? release_tokens / 4 : 64) : release_tokens;
}

/* ---- models and prompts ---------------------------------------------------------------------- */

/* A tiny random Llama (4 layers, dim 256, vocab 512, ctx 2048, Q8_0): about 4000 tokens/s for one
 * sequence on one core in Release, 2 KiB of KV per token (32 KiB per 16-token block). */
#define E2E_VOCAB 512
#define E2E_CTX 2048
#define E2E_KV_BYTES_PER_TOKEN 2048
/* Writes the random model p describes to path; -1 (and why, on stderr) when it cannot. */
static inline int e2e_write_model(const char *path, const mkmodel_params_t *p)
{
    fl_error_t err = {0};
    if (mkmodel_write(p, path, &err)) {
        fprintf(stderr, "mkmodel %s: %s\n", path, err.msg);
        return -1;
    }
    return 0;
}

static inline int e2e_make_model(const char *path)
{
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 4;
    p.dim = 256;
    p.ff = 768;
    p.n_heads = 4;
    p.n_kv_heads = 2;
    p.vocab = E2E_VOCAB;
    p.ctx = E2E_CTX;
    p.type = FL_TYPE_Q8_0;
    p.seed = 11;
    return e2e_write_model(path, &p);
}

/* n deterministic prompt token ids from seed: byte tokens (ids 3..258), valid in any mkmodel vocab. */
static inline void e2e_prompt_tokens(uint32_t seed, int n, int32_t *out)
{
    uint32_t x = seed * 2654435761u + 12345u;
    for (int i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        out[i] = MKMODEL_FIRST_BYTE_TOKEN + (int32_t)((x >> 16) % 256u);
    }
}

/* ---- the cluster ----------------------------------------------------------------------------- */

typedef struct e2e_env {
    char model[512];
    char ep_client[128], ep_worker[128];
    char log_dir[1024];
    int n_cluster;
} e2e_env_t;

/* Unique endpoints and a log folder for the next cluster of this process. */
static inline void e2e_next_endpoints(e2e_env_t *env, const char *name)
{
    const int n = env->n_cluster++;
    snprintf(env->ep_client, sizeof env->ep_client, "ipc:///tmp/folio-e2e-%d-%d.c", (int)getpid(), n);
    snprintf(env->ep_worker, sizeof env->ep_worker, "ipc:///tmp/folio-e2e-%d-%d.w", (int)getpid(), n);
    const char *b = getenv("FOLIO_BUILD_DIR");
    char dir[900];
    snprintf(dir, sizeof dir, "%s/Testing", b && *b ? b : "/tmp");
    mkdir(dir, 0755);
    snprintf(dir + strlen(dir), sizeof dir - strlen(dir), "/e2e-logs");
    mkdir(dir, 0755);
    snprintf(env->log_dir, sizeof env->log_dir, "%s/%s-%d-%d", dir, name, (int)getpid(), n);
}

/* The random model most e2e files share, at /tmp/folio-e2e-<name>-<pid>.gguf, made and removed. */
static inline int e2e_model_setup(e2e_env_t *env, const char *name)
{
    snprintf(env->model, sizeof env->model, "/tmp/folio-e2e-%s-%d.gguf", name, (int)getpid());
    return e2e_make_model(env->model);
}

static inline int e2e_model_teardown(e2e_env_t *env)
{
    unlink(env->model);
    return 0;
}

/* Defines cmocka's group fixtures group_setup and group_teardown for a file whose tests share one
 * such model in env. */
#define E2E_MODEL_FIXTURES(env, name)                                                                  \
    static int group_setup(void **state)                                                              \
    {                                                                                                 \
        (void)state;                                                                                  \
        return e2e_model_setup(&(env), name);                                                         \
    }                                                                                                 \
    static int group_teardown(void **state)                                                           \
    {                                                                                                 \
        (void)state;                                                                                  \
        return e2e_model_teardown(&(env));                                                            \
    }

/* Starts a cluster of n_groups on env->model (opts: NULL or extra settings; endpoints, binaries,
 * heartbeat, threads and logs are filled in when left 0). Fails the test when it does not come up. */
static inline cluster_t *e2e_cluster_start(e2e_env_t *env, const char *name, int n_groups, const cluster_opts_t *extra)
{
    e2e_next_endpoints(env, name);
    cluster_opts_t o;
    if (extra) o = *extra;
    else memset(&o, 0, sizeof o);
    if (!o.bin_dir) o.bin_dir = getenv("FOLIO_BUILD_DIR");
    if (!o.model) o.model = env->model;
    o.n_groups = n_groups;
    if (!o.threads_per_worker) o.threads_per_worker = 1;
    if (!o.client_endpoint) o.client_endpoint = env->ep_client;
    if (!o.worker_endpoint) o.worker_endpoint = env->ep_worker;
    if (!o.heartbeat_ms) o.heartbeat_ms = 200;
    if (!o.log_dir) o.log_dir = env->log_dir;
    fl_error_t err = {0};
    const double t0 = e2e_now_ms();
    cluster_t *c = cluster_start(&o, e2e_ms(20000), &err);
    if (!c) fail_msg("cluster_start(%s, %d groups): %s", name, n_groups, err.msg);
    fprintf(stderr, "[e2e] %s: %d groups up in %.0f ms at %s (logs %s)\n", name, n_groups, e2e_now_ms() - t0,
            env->ep_client, env->log_dir);
    return c;
}

/* Stops a cluster, continuing stopped workers first so their SIGTERM is delivered. */
static inline void e2e_cluster_stop(cluster_t **cp)
{
    if (!cp || !*cp) return;
    cluster_t *c = *cp;
    for (int i = 0; i < c->n_workers; i++)
        if (c->workers[i] > 0) kill(c->workers[i], SIGCONT);
    char paths[2][256];
    snprintf(paths[0], sizeof paths[0], "%s", c->client_endpoint);
    snprintf(paths[1], sizeof paths[1], "%s", c->worker_endpoint);
    cluster_stop(cp);
    for (int i = 0; i < 2; i++) /* ipc socket files a killed coordinator leaves behind */
        if (!strncmp(paths[i], "ipc://", 6)) unlink(paths[i] + 6);
}

static inline folio_client_t *e2e_client(const cluster_t *c)
{
    fl_error_t err = {0};
    folio_client_t *cl = folio_client_new(c->client_endpoint, &err);
    if (!cl) fail_msg("folio_client_new(%s): %s", c->client_endpoint, err.msg);
    return cl;
}

/* Status through a control client; fails the test when it does not answer. */
static inline Folio__V1__Response *e2e_status(folio_client_t *ctl)
{
    Folio__V1__Response *r = NULL;
    fl_error_t err = {0};
    if (folio_client_status(ctl, e2e_ms(5000), &r, &err)) fail_msg("Status: %s", err.msg);
    return r;
}

static inline const Folio__V1__GroupStatus *e2e_group(const Folio__V1__Response *r, const char *name)
{
    if (!r || !r->cluster) return NULL;
    for (size_t i = 0; i < r->cluster->n_groups; i++)
        if (r->cluster->groups[i]->name && !strcmp(r->cluster->groups[i]->name, name)) return r->cluster->groups[i];
    return NULL;
}

/* Healthy groups per Health (-1 when it does not answer). */
static inline int e2e_healthy_groups(folio_client_t *ctl, bool *serving)
{
    Folio__V1__Response *r = NULL;
    fl_error_t err = {0};
    if (folio_client_health(ctl, e2e_ms(2000), &r, &err)) return -1;
    const int n = (int)r->health->healthy_groups;
    if (serving) *serving = r->health->serving;
    folio__v1__response__free_unpacked(r, NULL);
    return n;
}

/* Polls Status until group `name` has healthy == want (and, when kv_zero, no KV blocks in use and
 * nothing running). Returns the ms it took, or -1 after wait_ms. */
static inline double e2e_wait_group(folio_client_t *ctl, const char *name, bool want_healthy, bool kv_zero, int wait_ms)
{
    const double t0 = e2e_now_ms();
    for (;;) {
        Folio__V1__Response *r = NULL;
        fl_error_t err = {0};
        if (folio_client_status(ctl, 2000, &r, &err) == 0) {
            const Folio__V1__GroupStatus *g = e2e_group(r, name);
            bool ok = g && g->healthy == want_healthy;
            if (ok && kv_zero) ok = g->load && g->load->kv_blocks_used == 0 && g->load->running == 0;
            folio__v1__response__free_unpacked(r, NULL);
            if (ok) return e2e_now_ms() - t0;
        }
        if (e2e_now_ms() - t0 > wait_ms) return -1;
        e2e_sleep_ms(50);
    }
}

/* ---- the invariant checker ------------------------------------------------------------------- */

typedef struct e2e_req {
    int client;
    uint64_t id;
    bool generate;      /* else a unary method (Cancel) */
    bool final;
    int n_partials;
    int n_events;
    double t_sent, t_first, t_final;
    /* the FINAL */
    int status;
    uint32_t retry_after_ms;
    char message[256];
    int finish;
    uint32_t prompt_tokens, cached, completion;
    double queued_s, first_token_s, total_s;
    char group[64];
    /* every token in index order, and the text */
    int32_t *tokens;
    int n_tokens, cap_tokens;
    char *text;
    size_t n_text;
    int tag;            /* the test's own label (e.g. the prompt's index) */
    /* order of arrival among all the tracker's events: its last PARTIAL, its FINAL (0: none) */
    uint64_t last_partial_seq, final_seq;
} e2e_req_t;

typedef struct e2e_tracker {
    e2e_req_t *reqs;
    int n, cap;
    uint64_t last_id[64]; /* per client: the last id folio_client assigned */
    int n_violations;
    char first_violation[512];
    int n_unknown;        /* events for ids nobody sent (reported as violations too) */
    uint64_t n_seq;       /* events recorded so far */
} e2e_tracker_t;

static inline void e2e_tracker_free(e2e_tracker_t *t)
{
    for (int i = 0; i < t->n; i++) {
        free(t->reqs[i].tokens);
        free(t->reqs[i].text);
    }
    free(t->reqs);
    memset(t, 0, sizeof *t);
}

static inline void e2e_violation(e2e_tracker_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void e2e_violation(e2e_tracker_t *t, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (t->n_violations < 50) fprintf(stderr, "[e2e] INVARIANT: %s\n", buf);
    if (!t->n_violations) snprintf(t->first_violation, sizeof t->first_violation, "%s", buf);
    t->n_violations++;
}

static inline e2e_req_t *e2e_find(e2e_tracker_t *t, int client, uint64_t id)
{
    for (int i = t->n - 1; i >= 0; i--)
        if (t->reqs[i].client == client && t->reqs[i].id == id) return &t->reqs[i];
    return NULL;
}

static inline e2e_req_t *e2e_track(e2e_tracker_t *t, int client, uint64_t id, bool generate, int tag)
{
    /* Allocated once and never moved: callers keep e2e_req_t pointers. */
    if (!t->reqs) {
        t->cap = 4096;
        t->reqs = calloc((size_t)t->cap, sizeof *t->reqs);
        assert_non_null(t->reqs);
    }
    if (t->n == t->cap) fail_msg("e2e tracker: more than %d requests", t->cap);
    e2e_req_t *r = &t->reqs[t->n++];
    memset(r, 0, sizeof *r);
    r->client = client;
    r->id = id;
    r->generate = generate;
    r->tag = tag;
    r->t_sent = e2e_now_ms();
    r->status = -1;
    r->text = calloc(1, 1);
    if (client >= 0 && client < 64) t->last_id[client] = id;
    return r;
}

/* Sends a Generate on client `ci` and tracks it. */
static inline e2e_req_t *e2e_send_generate(e2e_tracker_t *t, int ci, folio_client_t *c, const folio_generate_params_t *p,
                                           int tag)
{
    uint64_t id = 0;
    fl_error_t err = {0};
    if (folio_client_send_generate(c, p, &id, &err)) fail_msg("send_generate: %s", err.msg);
    return e2e_track(t, ci, id, true, tag);
}

/* Sends a Cancel of target on client ci (its id is the next one the client assigns) and tracks it. */
static inline e2e_req_t *e2e_send_cancel(e2e_tracker_t *t, int ci, folio_client_t *c, uint64_t target)
{
    fl_error_t err = {0};
    if (folio_client_send_cancel(c, target, &err)) fail_msg("send_cancel: %s", err.msg);
    return e2e_track(t, ci, t->last_id[ci] + 1, false, -1);
}

/* Records one event of client ci, checking the invariant. */
static inline void e2e_on_event(e2e_tracker_t *t, int ci, const folio_event_t *ev)
{
    e2e_req_t *r = e2e_find(t, ci, ev->id);
    if (!r) {
        t->n_unknown++;
        e2e_violation(t, "client %d: %s for id %llu, which was never sent (status %s: %s)", ci,
                      ev->final ? "FINAL" : "PARTIAL", (unsigned long long)ev->id, wire_status_name(ev->status),
                      ev->message);
        return;
    }
    r->n_events++;
    if (r->final) {
        e2e_violation(t, "client %d id %llu: %s after its FINAL (index %u, %d tokens, status %s)", ci,
                      (unsigned long long)ev->id, ev->final ? "a second FINAL" : "a PARTIAL", ev->index, ev->n_tokens,
                      wire_status_name(ev->status));
        return;
    }
    if (ev->n_tokens > 0) {
        if (ev->index < (uint32_t)r->n_tokens)
            e2e_violation(t, "client %d id %llu: token index %u sent twice (already have %d tokens)", ci,
                          (unsigned long long)ev->id, ev->index, r->n_tokens);
        else if (ev->index > (uint32_t)r->n_tokens)
            e2e_violation(t, "client %d id %llu: gap: delta at index %u, expected %d", ci,
                          (unsigned long long)ev->id, ev->index, r->n_tokens);
        if (ev->index == (uint32_t)r->n_tokens) {
            if (r->n_tokens + ev->n_tokens > r->cap_tokens) {
                int cap = r->cap_tokens ? r->cap_tokens : 64;
                while (cap < r->n_tokens + ev->n_tokens) cap *= 2;
                r->tokens = realloc(r->tokens, (size_t)cap * sizeof *r->tokens);
                assert_non_null(r->tokens);
                r->cap_tokens = cap;
            }
            memcpy(r->tokens + r->n_tokens, ev->tokens, (size_t)ev->n_tokens * sizeof *ev->tokens);
            r->n_tokens += ev->n_tokens;
            if (!r->t_first) r->t_first = e2e_now_ms();
        }
    }
    if (ev->text && *ev->text) {
        const size_t l = strlen(ev->text);
        r->text = realloc(r->text, r->n_text + l + 1);
        memcpy(r->text + r->n_text, ev->text, l + 1);
        r->n_text += l;
    }
    if (!ev->final) {
        r->last_partial_seq = ++t->n_seq;
        r->n_partials++;
        if (!r->generate) e2e_violation(t, "client %d id %llu: a PARTIAL for a unary method", ci, (unsigned long long)ev->id);
        return;
    }
    r->final = true;
    r->final_seq = ++t->n_seq;
    r->t_final = e2e_now_ms();
    r->status = ev->status;
    r->retry_after_ms = ev->raw && ev->raw->status ? ev->raw->status->retry_after_ms : 0;
    snprintf(r->message, sizeof r->message, "%s", ev->message ? ev->message : "");
    r->finish = ev->finish_reason;
    r->prompt_tokens = ev->prompt_tokens;
    r->cached = ev->cached_prompt_tokens;
    r->completion = ev->completion_tokens;
    r->queued_s = ev->queued_s;
    r->first_token_s = ev->first_token_s;
    r->total_s = ev->total_s;
    snprintf(r->group, sizeof r->group, "%s", ev->group ? ev->group : "");
    if (r->generate && r->status == FOLIO__V1__STATUS_CODE__OK && r->completion != (uint32_t)r->n_tokens)
        e2e_violation(t, "client %d id %llu: FINAL OK says %u completion tokens, %d were received", ci,
                      (unsigned long long)ev->id, r->completion, r->n_tokens);
}

static inline int e2e_pending(const e2e_tracker_t *t)
{
    int n = 0;
    for (int i = 0; i < t->n; i++) n += !t->reqs[i].final;
    return n;
}

/* Reads every client until all tracked requests are final (or, with until_all_final false, for the
 * whole wait). Returns the number still pending. */
static inline int e2e_pump_ex(e2e_tracker_t *t, folio_client_t *const *clients, int n_clients, int wait_ms,
                              bool until_all_final)
{
    const double deadline = e2e_now_ms() + wait_ms;
    zmq_pollitem_t items[64];
    assert_true(n_clients <= 64);
    for (;;) {
        if (until_all_final && !e2e_pending(t)) return 0;
        const double left = deadline - e2e_now_ms();
        if (left <= 0) return e2e_pending(t);
        for (int i = 0; i < n_clients; i++) {
            items[i].socket = folio_client_socket(clients[i]);
            items[i].fd = 0;
            items[i].events = ZMQ_POLLIN;
            items[i].revents = 0;
        }
        const int n = zmq_poll(items, n_clients, left > 100 ? 100 : (long)left + 1);
        if (n < 0 && errno != EINTR) fail_msg("zmq_poll: %s", zmq_strerror(errno));
        for (int i = 0; n > 0 && i < n_clients; i++) {
            if (!(items[i].revents & ZMQ_POLLIN)) continue;
            for (;;) {
                folio_event_t ev;
                fl_error_t err = {0};
                const int got = folio_client_recv(clients[i], &ev, 0, &err);
                if (got == 0) break;
                if (got < 0) {
                    e2e_violation(t, "client %d: unreadable reply: %s", i, err.msg);
                    break;
                }
                e2e_on_event(t, i, &ev);
                folio_event_clear(&ev);
            }
        }
    }
}

static inline int e2e_pump(e2e_tracker_t *t, folio_client_t *const *clients, int n_clients, int wait_ms)
{
    return e2e_pump_ex(t, clients, n_clients, wait_ms, true);
}

/* Fails the test on any breach of the invariant or any request without a FINAL. */
static inline void e2e_assert_invariant(const e2e_tracker_t *t, const char *what)
{
    int hanging = 0;
    for (int i = 0; i < t->n; i++) {
        const e2e_req_t *r = &t->reqs[i];
        if (!r->final) {
            if (hanging < 20)
                fprintf(stderr, "[e2e] INVARIANT: %s: client %d id %llu (tag %d) has no FINAL after %.0f ms (%d tokens)\n",
                        what, r->client, (unsigned long long)r->id, r->tag, e2e_now_ms() - r->t_sent, r->n_tokens);
            hanging++;
        }
    }
    if (t->n_violations || hanging)
        fail_msg("%s: invariant broken: %d violations (first: %s), %d of %d requests without a FINAL", what,
                 t->n_violations, t->n_violations ? t->first_violation : "-", hanging, t->n);
}

/* Counts of final statuses, for messages. */
static inline void e2e_summary(const e2e_tracker_t *t, const char *what)
{
    int ok = 0, other = 0, unavailable = 0, cancelled = 0, deadline = 0, pending = 0;
    for (int i = 0; i < t->n; i++) {
        const e2e_req_t *r = &t->reqs[i];
        if (!r->final) pending++;
        else if (r->status == FOLIO__V1__STATUS_CODE__OK) ok++;
        else if (r->status == FOLIO__V1__STATUS_CODE__UNAVAILABLE) unavailable++;
        else if (r->status == FOLIO__V1__STATUS_CODE__CANCELLED) cancelled++;
        else if (r->status == FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED) deadline++;
        else other++;
    }
    fprintf(stderr, "[e2e] %s: %d requests: %d OK, %d UNAVAILABLE, %d CANCELLED, %d DEADLINE_EXCEEDED, %d other, %d pending\n",
            what, t->n, ok, unavailable, cancelled, deadline, other, pending);
}

/* One Generate alone on client c (blocking), tokens copied to *out (malloc'd). Fails the test when
 * no FINAL arrives or the status is not want_status. */
static inline void e2e_generate(folio_client_t *c, const folio_generate_params_t *p, int want_status, folio_result_t *res)
{
    fl_error_t err = {0};
    if (folio_client_generate(c, p, NULL, NULL, e2e_ms(30000), res, &err)) fail_msg("generate: %s", err.msg);
    if (want_status >= 0 && res->status != want_status)
        fail_msg("generate: status %s (%s), expected %s", wire_status_name(res->status), res->message,
                 wire_status_name(want_status));
}

static inline bool e2e_tokens_equal(const int32_t *a, int na, const int32_t *b, int nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, (size_t)na * sizeof *a));
}

#endif
