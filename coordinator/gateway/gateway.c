/* gateway.c - folio-gateway's HTTP side and its event loop; see gateway.h.
 *
 * Why one thread: a folio_client (a ZeroMQ DEALER) belongs to one thread, and every stream's
 * tokens arrive on it. Rather than a thread per connection handing tokens across with locks, the
 * HTTP server runs in the same loop: libmicrohttpd in "external polling" epoll mode exposes one
 * epoll descriptor, which zmq_poll watches beside the client socket and the control thread's
 * eventfd. Each wake-up drains the coordinator's replies (routed by request id, relay.c), then lets
 * libmicrohttpd do its reading and writing. Nothing blocks: a request waiting for the cluster is a
 * suspended connection (MHD_suspend_connection), resumed when its relay request has news (its
 * status decided, stream bytes ready). A stream's content reader hands out what is buffered and
 * suspends the connection when nothing is, so an idle stream costs no wake-ups (no busy loop) and
 * hundreds of streams are one epoll set. The work per token is formatting one JSON chunk, far
 * below what the workers spend making it, so one core serves many streams; gateways scale out as
 * processes (each its own coordinator connection) rather than as threads.
 *
 * Threads and state: everything below belongs to the loop thread except the control thread's
 * snapshots (control.c), which come over under its mutex.
 *
 * Client gone: libmicrohttpd reports a connection that ends before its response did (write error,
 * reset) through the completion callback, which cancels the request's Generates. A suspended
 * connection is not watched, so a stream waiting for tokens learns of its client's departure at
 * its next chunk or, at the latest, at the keep-alive comment sent after GATEWAY_KEEPALIVE_S. */
#include "gateway.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <zmq.h>

#include "clock.h"
#include "control.h"
#include "folio_client.h"
#include "folio_metrics.h"
#include "host_port.h"
#include "log.h"
#include "relay.h"

#define GATEWAY_TICK_S         0.25 /* housekeeping: keep-alives, coordinator trouble */
#define GATEWAY_KEEPALIVE_S    10.0 /* an SSE comment after this long without a chunk */
#define GATEWAY_EVENTS_PER_RUN 512  /* coordinator replies per turn before HTTP gets its turn */
#define GATEWAY_DOWN_FAILURES  3    /* Status fetches in a row that failed: the coordinator is down */
#define GATEWAY_LOST_QUIET_S   5.0  /* ... and a request that heard nothing this long is lost */
#define GATEWAY_IDLE_TIMEOUT_S 60   /* an idle HTTP connection (not a suspended one) is closed */
#define GATEWAY_MAX_CODES      64   /* distinct (endpoint, status) pairs counted */

typedef enum { EP_CHAT, EP_COMPLETIONS, EP_MODELS, EP_MODEL, EP_HEALTH, EP_METRICS, EP_OTHER, EP_COUNT } endpoint_t;

static const char *const endpoint_names[EP_COUNT] = {
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/health", "/metrics", "other"};

typedef enum {
    ST_READ,     /* reading the body */
    ST_RELAY,    /* waiting for the cluster's first answer (relay.c) */
    ST_SNAPSHOT, /* waiting for a Status/Health fetch that began after the request */
    ST_MODEL,    /* a generation whose model the last Status did not list: waiting for a newer one */
    ST_READY,    /* the reply below is ready to queue */
    ST_SENT,     /* a response is queued */
} conn_state_t;

typedef struct gw_conn gw_conn_t;
struct gw_conn {
    gateway_t *g;
    struct MHD_Connection *mhd;
    endpoint_t ep;
    conn_state_t state;
    const char *tenant;
    char *body;
    size_t len, cap, discarded;
    bool too_large, suspended;
    int status; /* the status queued, for the request counter */
    relay_req_t *rq;
    oai_request_t req; /* parsed, while its model is looked up (ST_MODEL) */
    bool parsed, refreshed;
    uint64_t need_seq;
    char *reply; /* ST_READY */
    int reply_status;
    const char *reply_type;
    char model[256];        /* EP_MODEL: the name asked for */
    gw_conn_t *prev, *next; /* every connection with a request in progress */
};

typedef struct code_count {
    endpoint_t ep;
    int code;
    uint64_t n;
} code_count_t;

struct gateway {
    gateway_opts_t o;
    char url[300];
    struct MHD_Daemon *mhd;
    folio_client_t *client;
    gw_control_t *control;
    relay_t *relay;
    gw_snapshot_t snap; /* the newest Status/Health */
    uint64_t known_instance;
    double known_at; /* when a fetch last saw known_instance */
    oai_token_text_fn token_fn;
    void *token_ctx;
    char token_model_id[512];
    bool token_text_checked, token_text_ok;
    gw_conn_t *conns;
    int in_progress;
    uint64_t disconnects; /* requests whose client went away before the end */
    code_count_t codes[GATEWAY_MAX_CODES];
    int n_codes;
};

static const char JSON_TYPE[] = "application/json";

/* ---- counters ---- */

static void count(gateway_t *g, endpoint_t ep, int code)
{
    for (int i = 0; i < g->n_codes; i++)
        if (g->codes[i].ep == ep && g->codes[i].code == code) {
            g->codes[i].n++;
            return;
        }
    if (g->n_codes < GATEWAY_MAX_CODES) g->codes[g->n_codes++] = (code_count_t){ep, code, 1};
}

/* The gateway's own figures, appended to the cluster's: malloc'd text. */
static char *gateway_metrics(const gateway_t *g, const char *cluster)
{
    size_t cap = (cluster ? strlen(cluster) : 0) + 2048 + (size_t)g->n_codes * 128, n = 0;
    char *s = malloc(cap);
    if (!s) return NULL;
#define PUT(...) n += (size_t)snprintf(s + n, n < cap ? cap - n : 0, __VA_ARGS__)
    PUT("%s", cluster ? cluster : "");
    PUT("# HELP folio:http_requests_total HTTP requests the gateway answered, by endpoint and status code.\n"
        "# TYPE folio:http_requests_total counter\n");
    for (int i = 0; i < g->n_codes; i++)
        PUT("folio:http_requests_total{endpoint=\"%s\",code=\"%d\"} %llu\n", endpoint_names[g->codes[i].ep],
            g->codes[i].code, (unsigned long long)g->codes[i].n);
    PUT("# HELP folio:http_requests_in_progress HTTP requests the gateway is answering.\n"
        "# TYPE folio:http_requests_in_progress gauge\n"
        "folio:http_requests_in_progress %d\n",
        g->in_progress);
    PUT("# HELP folio:http_client_disconnects_total Requests whose HTTP client went away before the end "
        "(their generation cancelled in the cluster).\n"
        "# TYPE folio:http_client_disconnects_total counter\n"
        "folio:http_client_disconnects_total %llu\n",
        (unsigned long long)g->disconnects);
    const relay_stats_t rs = relay_stats(g->relay);
    PUT("# HELP folio:gateway_generate_requests_total Generate requests the gateway sent to the coordinator.\n"
        "# TYPE folio:gateway_generate_requests_total counter\n"
        "folio:gateway_generate_requests_total %llu\n"
        "# HELP folio:gateway_cancels_total Cancels the gateway sent to the coordinator.\n"
        "# TYPE folio:gateway_cancels_total counter\n"
        "folio:gateway_cancels_total %llu\n",
        (unsigned long long)rs.requests, (unsigned long long)rs.cancels);
    PUT("# HELP folio:gateway_coordinator_up Whether the coordinator answered the gateway's last Status.\n"
        "# TYPE folio:gateway_coordinator_up gauge\n"
        "folio:gateway_coordinator_up %d\n",
        g->snap.ok ? 1 : 0);
#undef PUT
    if (n >= cap) { /* cannot happen with the sizes above; never send a cut text */
        free(s);
        return NULL;
    }
    return s;
}

/* ---- responses ---- */

static enum MHD_Result queue(gw_conn_t *c, int status, const char *type, const char *body, int retry_after_s)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (retry_after_s > 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", retry_after_s);
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (status == 405)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW,
                                c->ep == EP_CHAT || c->ep == EP_COMPLETIONS ? "POST" : "GET, HEAD");
    const enum MHD_Result rc = MHD_queue_response(c->mhd, (unsigned)status, r);
    MHD_destroy_response(r);
    c->status = status;
    c->state = ST_SENT;
    return rc;
}

static enum MHD_Result queue_error(gw_conn_t *c, const oai_error_t *e)
{
    char *json = oai_error_json(e);
    const enum MHD_Result rc = queue(c, json ? e->http_status : 500, JSON_TYPE,
                                     json ? json : "{\"error\":{\"message\":\"out of memory\"}}", e->retry_after_s);
    free(json);
    return rc;
}

static enum MHD_Result fail(gw_conn_t *c, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static enum MHD_Result fail(gw_conn_t *c, int status, const char *code, const char *fmt, ...)
{
    oai_error_t e;
    char msg[sizeof e.message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    oai_fail(&e, status, code, "%s", msg);
    return queue_error(c, &e);
}

/* A suspended connection goes back into the loop: its access handler or content reader runs again. */
static void resume(gw_conn_t *c)
{
    if (!c->suspended) return;
    c->suspended = false;
    MHD_resume_connection(c->mhd);
}

static void suspend(gw_conn_t *c)
{
    if (c->suspended) return;
    c->suspended = true;
    MHD_suspend_connection(c->mhd);
}

static void relay_wake(void *owner)
{
    resume(owner);
}

/* The stream's bytes as libmicrohttpd asks for them; nothing ready: suspend until the relay wakes us. */
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    gw_conn_t *c = cls;
    const ssize_t n = relay_read(c->rq, buf, max);
    if (n > 0) return n;
    if (n < 0) return MHD_CONTENT_READER_END_OF_STREAM;
    suspend(c);
    return 0;
}

static enum MHD_Result queue_stream(gw_conn_t *c)
{
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, c, NULL);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(r, "X-Accel-Buffering", "no"); /* proxies: pass chunks on as they come */
    const enum MHD_Result rc = MHD_queue_response(c->mhd, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    c->status = MHD_HTTP_OK;
    c->state = ST_SENT;
    return rc;
}

/* ---- the cluster's view ---- */

static const Folio__V1__StatusReply *cluster(const gateway_t *g)
{
    return g->snap.ok && g->snap.status ? g->snap.status->cluster : NULL;
}

typedef enum { MODEL_FOUND, MODEL_UNKNOWN, MODEL_ABSENT } model_lookup_t;

/* The served model's name for a request's `model` into out: MODEL_FOUND; MODEL_ABSENT (404) when
 * groups serve and none serves it; MODEL_UNKNOWN when the last Status listed no group. */
static model_lookup_t resolve_model(const gateway_t *g, const char *asked, char *out, size_t cap, char *served,
                                    size_t scap)
{
    const Folio__V1__StatusReply *s = cluster(g);
    snprintf(out, cap, "%s", asked ? asked : "folio");
    served[0] = 0;
    if (!s || !s->n_groups) return MODEL_UNKNOWN;
    for (size_t i = 0; i < s->n_groups; i++) {
        const char *id = s->groups[i]->model_id;
        if (!id || !*id) continue;
        char name[256];
        oai_model_name(id, name, sizeof name);
        if (!asked || oai_model_matches(asked, id)) {
            snprintf(out, cap, "%s", name);
            return MODEL_FOUND;
        }
        if (strlen(served) + strlen(name) + 3 < scap)
            snprintf(served + strlen(served), scap - strlen(served), "%s'%s'", *served ? ", " : "", name);
    }
    return MODEL_ABSENT;
}

/* Fills the reply of a connection that waited for a snapshot. */
static void answer_from_snapshot(gateway_t *g, gw_conn_t *c)
{
    const Folio__V1__StatusReply *s = cluster(g);
    const long long now = (long long)time(NULL);
    c->reply_type = JSON_TYPE;
    c->reply_status = 200;
    oai_error_t e;
    switch (c->ep) {
    case EP_HEALTH: {
        const bool up = g->snap.ok && g->snap.serving;
        char buf[512];
        snprintf(buf, sizeof buf,
                 "{\"status\":\"%s\",\"serving\":%s,\"healthy_groups\":%u,\"groups\":%u,\"coordinator\":%s}",
                 up ? "ok" : "unavailable", up ? "true" : "false", g->snap.healthy_groups, g->snap.groups,
                 g->snap.ok ? "\"up\"" : "\"unreachable\"");
        c->reply = strdup(buf);
        c->reply_status = up ? 200 : 503;
        break;
    }
    case EP_MODELS:
    case EP_MODEL:
        if (!s) {
            oai_fail(&e, 503, "unavailable", "the coordinator does not answer: %s", g->snap.error);
        } else if (c->ep == EP_MODELS) {
            c->reply = oai_models_json(s, now);
            break;
        } else if ((c->reply = oai_model_json(s, c->model, now))) {
            break;
        } else {
            oai_fail(&e, 404, "model_not_found", "the model '%s' does not exist (GET /v1/models lists them)", c->model);
        }
        c->reply = oai_error_json(&e);
        c->reply_status = e.http_status;
        break;
    default: { /* EP_METRICS: the cluster's figures when the coordinator answered, the gateway's always */
        char *text = s ? folio_metrics_render(s) : NULL;
        c->reply = gateway_metrics(g, text);
        free(text);
        c->reply_type = "text/plain; version=0.0.4; charset=utf-8";
    }
    }
    if (!c->reply) c->reply_status = 500;
    c->state = ST_READY;
}

/* The model file behind the token strings must be the one the cluster serves, else token text would
 * name other tokens: checked once against the first Status that lists groups. */
static void check_token_model(gateway_t *g)
{
    const Folio__V1__StatusReply *s = cluster(g);
    if (g->token_text_checked || !g->token_fn || !s || !s->n_groups) return;
    g->token_text_checked = true;
    for (size_t i = 0; i < s->n_groups; i++)
        if (s->groups[i]->model_id && !strcmp(s->groups[i]->model_id, g->token_model_id)) g->token_text_ok = true;
    if (!g->token_text_ok)
        fl_log_warn("gateway: the cluster serves %s, not %s: logprob tokens are written as token_id:N",
                    s->groups[0]->model_id, g->token_model_id);
}

static int token_text(void *ctx, int32_t id, char *buf, size_t cap)
{
    const gateway_t *g = ctx;
    return g->token_text_ok ? g->token_fn(g->token_ctx, id, buf, cap) : -1;
}

static void on_snapshot(gateway_t *g)
{
    if (!gw_control_take(g->control, &g->snap)) return;
    const gw_snapshot_t *s = &g->snap;
    if (s->ok) {
        if (g->known_instance && s->instance != g->known_instance) {
            const int n =
                relay_fail_lost(g->relay, s->started_at, 1e300, "the coordinator restarted; the request was lost");
            fl_log_warn("gateway: the coordinator restarted (instance %llx -> %llx); %d request(s) ended",
                        (unsigned long long)g->known_instance, (unsigned long long)s->instance, n);
        }
        g->known_instance = s->instance;
        g->known_at = s->started_at;
        check_token_model(g);
    } else if (s->failures >= GATEWAY_DOWN_FAILURES) {
        const double now = fl_clock_s();
        const int n = relay_fail_lost(g->relay, now - GATEWAY_LOST_QUIET_S, now - GATEWAY_LOST_QUIET_S,
                                      "the coordinator does not answer; the request was lost");
        if (n) fl_log_warn("gateway: the coordinator does not answer (%s); %d request(s) ended", s->error, n);
    }
    for (gw_conn_t *c = g->conns; c; c = c->next) {
        /* A failed fetch answers everyone waiting: a later one would only time out again. */
        if ((c->state != ST_SNAPSHOT && c->state != ST_MODEL) || (s->seq < c->need_seq && s->ok)) continue;
        if (c->state == ST_SNAPSHOT) answer_from_snapshot(g, c);
        resume(c); /* ST_MODEL: the access handler looks the model up again */
    }
}

/* ---- requests ---- */

static endpoint_t endpoint_of(const char *url, gw_conn_t *c)
{
    if (!strcmp(url, "/v1/chat/completions")) return EP_CHAT;
    if (!strcmp(url, "/v1/completions")) return EP_COMPLETIONS;
    if (!strcmp(url, "/v1/models")) return EP_MODELS;
    if (!strncmp(url, "/v1/models/", 11) && url[11]) {
        snprintf(c->model, sizeof c->model, "%s", url + 11);
        return EP_MODEL;
    }
    if (!strcmp(url, "/health")) return EP_HEALTH;
    if (!strcmp(url, "/metrics")) return EP_METRICS;
    return EP_OTHER;
}

/* Sends the parsed request to the cluster once its model is known to be served: a model the last
 * Status does not list is looked up once more in a Status fetched after the request (a group that
 * registered since, or a gateway just started), then refused 404 if still absent. */
static enum MHD_Result start_generate(gateway_t *g, gw_conn_t *c)
{
    oai_error_t e;
    if (!c->parsed) {
        if (oai_request_parse(c->ep == EP_CHAT ? OAI_CHAT : OAI_COMPLETION, c->body, c->len, &c->req, &e))
            return queue_error(c, &e);
        c->parsed = true;
        free(c->body);
        c->body = NULL;
    }
    if (g->snap.failures >= GATEWAY_DOWN_FAILURES)
        return fail(c, 503, "unavailable", "the coordinator at %s does not answer: %s", g->o.coordinator,
                    g->snap.error);
    char model[256], served[512];
    const model_lookup_t found = resolve_model(g, c->req.model, model, sizeof model, served, sizeof served);
    if (found != MODEL_FOUND && !c->refreshed) {
        c->refreshed = true;
        c->need_seq = gw_control_refresh(g->control);
        c->state = ST_MODEL;
        suspend(c);
        return MHD_YES;
    }
    if (found == MODEL_ABSENT) {
        oai_fail(&e, 404, "model_not_found", "the model '%.200s' does not exist; this cluster serves %s", c->req.model,
                 served);
        snprintf(e.param, sizeof e.param, "model");
        return queue_error(c, &e);
    }
    /* MODEL_UNKNOWN: no group registered; the coordinator answers that (503) */
    c->parsed = false;
    if (!(c->rq = relay_start(g->relay, &c->req, c->tenant, model, c, &e))) return queue_error(c, &e);
    c->state = ST_RELAY;
    suspend(c);
    return MHD_YES;
}

/* The request is whole (or the connection was resumed): answer it, or wait. */
static enum MHD_Result on_complete_request(gateway_t *g, gw_conn_t *c)
{
    switch (c->state) {
    case ST_READ:
        if (c->too_large)
            return fail(c, 413, "request_too_large", "the request body is over %zu bytes (--max-body)", g->o.max_body);
        if (c->ep == EP_CHAT || c->ep == EP_COMPLETIONS) return start_generate(g, c);
        c->need_seq = gw_control_refresh(g->control);
        if (g->snap.seq && !g->snap.ok) { /* the coordinator did not answer the last fetch: say so now,
                                           * rather than keep a probe waiting out another timeout */
            answer_from_snapshot(g, c);
            return on_complete_request(g, c);
        }
        c->state = ST_SNAPSHOT;
        suspend(c);
        return MHD_YES;
    case ST_RELAY:
        switch (relay_phase(c->rq)) {
        case RELAY_STREAM:
            return queue_stream(c);
        case RELAY_REPLY: {
            const char *body;
            size_t len;
            int retry;
            const int status = relay_reply(c->rq, &body, &len, &retry);
            return queue(c, status, JSON_TYPE, body, retry);
        }
        default:
            suspend(c); /* woken early: keep waiting */
            return MHD_YES;
        }
    case ST_READY: {
        const enum MHD_Result rc = c->reply ? queue(c, c->reply_status, c->reply_type, c->reply, 0)
                                            : fail(c, 500, "internal_error", "out of memory");
        free(c->reply);
        c->reply = NULL;
        return rc;
    }
    case ST_SNAPSHOT:
        suspend(c);
        return MHD_YES;
    case ST_MODEL:
        if (g->snap.seq < c->need_seq && g->snap.ok) {
            suspend(c);
            return MHD_YES;
        }
        return start_generate(g, c);
    default:
        return MHD_YES;
    }
}

/* The checks that need no body: route, method, key, declared size. */
static enum MHD_Result on_headers(gateway_t *g, gw_conn_t *c, const char *method)
{
    const bool post = !strcmp(method, MHD_HTTP_METHOD_POST);
    const bool get = !strcmp(method, MHD_HTTP_METHOD_GET) || !strcmp(method, MHD_HTTP_METHOD_HEAD);
    if (c->ep == EP_OTHER)
        return fail(c, 404, "not_found",
                    "no such endpoint (POST /v1/chat/completions, "
                    "/v1/completions; GET /v1/models, /health, /metrics)");
    const bool generate = c->ep == EP_CHAT || c->ep == EP_COMPLETIONS;
    if (generate ? !post : !get) return fail(c, 405, "method_not_allowed", "%s is not allowed here", method);
    if (g->o.keys && c->ep <= EP_MODEL) {
        const char *auth = MHD_lookup_connection_value(c->mhd, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        if (!(c->tenant = api_keys_tenant(g->o.keys, auth)))
            return fail(c, 401, "invalid_api_key",
                        auth ? "the API key is not valid" : "an API key is required (Authorization: Bearer KEY)");
    }
    const char *cl = MHD_lookup_connection_value(c->mhd, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > g->o.max_body)
        return fail(c, 413, "request_too_large", "the request body is %s bytes, over %zu (--max-body)", cl,
                    g->o.max_body);
    return MHD_YES;
}

static int body_append(gateway_t *g, gw_conn_t *c, const char *data, size_t n)
{
    if (c->too_large || c->len + n > g->o.max_body) {
        c->too_large = true;
        c->discarded += n;
        /* Read on (to answer 413) unless the client keeps sending far past the limit. */
        return c->discarded > 4 * g->o.max_body ? -1 : 0;
    }
    if (c->len + n + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 4096;
        while (cap < c->len + n + 1) cap *= 2;
        char *b = realloc(c->body, cap);
        if (!b) return -1;
        c->body = b;
        c->cap = cap;
    }
    memcpy(c->body + c->len, data, n);
    c->len += n;
    c->body[c->len] = 0;
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    (void)version;
    gateway_t *g = cls;
    gw_conn_t *c = *con_cls;
    if (!c) {
        if (!(c = calloc(1, sizeof *c))) return MHD_NO;
        c->g = g;
        c->mhd = mc;
        c->ep = endpoint_of(url, c);
        *con_cls = c;
        c->next = g->conns;
        if (g->conns) g->conns->prev = c;
        g->conns = c;
        g->in_progress++;
        return on_headers(g, c, method);
    }
    if (c->state == ST_SENT) {
        *upload_data_size = 0; /* answered already (413, 401, ...): the rest of the body is dropped */
        return MHD_YES;
    }
    if (*upload_data_size) {
        const int rc = body_append(g, c, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return rc ? MHD_NO : MHD_YES;
    }
    return on_complete_request(g, c);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    (void)mc;
    gateway_t *g = cls;
    gw_conn_t *c = *con_cls;
    if (!c) return;
    const bool gone = toe != MHD_REQUEST_TERMINATED_COMPLETED_OK;
    if (c->rq) {
        const bool unfinished = relay_live(c->rq);
        if (gone && unfinished) g->disconnects++;
        relay_finish(&c->rq, gone && unfinished);
    }
    count(g, c->ep, c->status);
    fl_log_debug("gateway: %s status=%d%s", endpoint_names[c->ep], c->status,
                 gone ? " (the connection ended before the response)" : "");
    if (c->prev)
        c->prev->next = c->next;
    else
        g->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    g->in_progress--;
    if (c->parsed) oai_request_free(&c->req);
    free(c->body);
    free(c->reply);
    free(c);
    *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    const size_t n = strlen(msg);
    if (n && msg[n - 1] == '\n') msg[n - 1] = 0;
    fl_log_warn("gateway: http: %s", msg);
}

/* ---- set-up and the loop ---- */

gateway_t *gateway_new(const gateway_opts_t *o, fl_error_t *err)
{
    gateway_t *g = calloc(1, sizeof *g);
    if (!g) {
        fl_fail(err, FL_ENOMEM, "gateway: out of memory");
        return NULL;
    }
    g->o = *o;
    if (!g->o.max_body) g->o.max_body = GATEWAY_DEFAULT_MAX_BODY;
    if (g->o.max_connections <= 0) g->o.max_connections = GATEWAY_DEFAULT_MAX_CONNS;
    const char *host = o->http_addr && *o->http_addr ? o->http_addr : "0.0.0.0";
    char port[16];
    snprintf(port, sizeof port, "%d", o->http_port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    const int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai) {
        fl_fail(err, FL_EINVAL, "--http %s:%d: %s", host, o->http_port, gai_strerror(gai));
        free(g);
        return NULL;
    }
    const bool v6 = ai->ai_family == AF_INET6;
    snprintf(g->url, sizeof g->url, v6 ? "http://[%s]:%d" : "http://%s:%d", fl_host_port_local(host), o->http_port);
    if (!(g->client = folio_client_new(o->coordinator, err))) goto fail;
    const relay_opts_t ro = {.client = g->client, .wake = relay_wake, .token_text = token_text, .token_ctx = g};
    if (!(g->relay = relay_new(&ro))) {
        fl_fail(err, FL_ENOMEM, "gateway: out of memory");
        goto fail;
    }
    if (!(g->control = gw_control_new(o->coordinator, o->status_interval_ms, 2000, err))) goto fail;
    const unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | (v6 ? MHD_USE_IPv6 : 0);
    g->mhd = MHD_start_daemon(flags, (uint16_t)o->http_port, NULL, NULL, on_request, g, MHD_OPTION_EXTERNAL_LOGGER,
                              mhd_log, NULL, MHD_OPTION_NOTIFY_COMPLETED, on_completed, g, MHD_OPTION_SOCK_ADDR,
                              ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned)g->o.max_connections,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)GATEWAY_IDLE_TIMEOUT_S, MHD_OPTION_END);
    if (!g->mhd) {
        fl_fail(err, FL_EIO, "cannot listen on %s (address in use? pick another with --http)", g->url);
        goto fail;
    }
    freeaddrinfo(ai);
    return g;
fail:
    freeaddrinfo(ai);
    gateway_destroy(&g);
    return NULL;
}

void gateway_set_token_text(gateway_t *g, oai_token_text_fn fn, void *ctx, const char *model_id)
{
    g->token_fn = fn;
    g->token_ctx = ctx;
    snprintf(g->token_model_id, sizeof g->token_model_id, "%s", model_id ? model_id : "");
    g->token_text_checked = g->token_text_ok = false;
    check_token_model(g);
}

const char *gateway_url(const gateway_t *g)
{
    return g->url;
}

/* Drains the coordinator's replies, at most GATEWAY_EVENTS_PER_RUN; true when more may wait. */
static bool pump(gateway_t *g)
{
    for (int i = 0; i < GATEWAY_EVENTS_PER_RUN; i++) {
        folio_event_t ev;
        fl_error_t err = {0};
        const int rc = folio_client_recv(g->client, &ev, 0, &err);
        if (rc == 1) {
            relay_on_event(g->relay, &ev);
            continue;
        }
        if (rc < 0 && errno != EINTR) fl_log_warn("gateway: from the coordinator: %s", err.msg);
        return false;
    }
    return true;
}

int gateway_run(gateway_t *g, volatile sig_atomic_t *stop)
{
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(g->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!info) return FL_EIO;
    zmq_pollitem_t items[3] = {{.socket = folio_client_socket(g->client), .events = ZMQ_POLLIN},
                               {.fd = info->epoll_fd, .events = ZMQ_POLLIN},
                               {.fd = gw_control_fd(g->control), .events = ZMQ_POLLIN}};
    fl_log_info("gateway listening url=%s coordinator=%s api_keys=%d max_body=%zu", g->url, g->o.coordinator,
                api_keys_count(g->o.keys), g->o.max_body);
    double next_tick = fl_clock_s() + GATEWAY_TICK_S;
    bool more = false;
    int rc = FL_OK;
    while (!*stop) {
        long timeout = more ? 0 : (long)(GATEWAY_TICK_S * 1e3);
        MHD_UNSIGNED_LONG_LONG mt;
        if (MHD_get_timeout(g->mhd, &mt) == MHD_YES && (long long)mt < timeout) timeout = (long)mt;
        if (zmq_poll(items, 3, timeout) < 0) {
            if (errno == EINTR) continue; /* a signal: the loop's condition says whether to go on */
            fl_log_error("gateway: zmq_poll: %s", zmq_strerror(errno));
            rc = FL_EIO;
            break;
        }
        if (more || (items[0].revents & ZMQ_POLLIN)) more = pump(g);
        if (items[2].revents & ZMQ_POLLIN) on_snapshot(g);
        MHD_run(g->mhd);
        const double now = fl_clock_s();
        if (now >= next_tick) {
            next_tick = now + GATEWAY_TICK_S;
            relay_keepalive(g->relay, now, GATEWAY_KEEPALIVE_S);
        }
    }
    /* Stopping: what waits is answered 503 (streams get an error event), given a moment to flush. */
    relay_fail_lost(g->relay, 1e300, 1e300, "the gateway is shutting down");
    for (gw_conn_t *c = g->conns; c; c = c->next) {
        if (c->state != ST_SNAPSHOT && c->state != ST_MODEL) continue;
        oai_error_t e;
        oai_fail(&e, 503, "unavailable", "the gateway is shutting down");
        c->reply = oai_error_json(&e);
        c->reply_status = 503;
        c->reply_type = JSON_TYPE;
        c->state = ST_READY;
        resume(c);
    }
    const double until = fl_clock_s() + 1.0;
    while (g->conns && fl_clock_s() < until) {
        zmq_poll(items + 1, 1, 20);
        MHD_run(g->mhd);
    }
    return rc;
}

void gateway_destroy(gateway_t **gp)
{
    if (!gp || !*gp) return;
    gateway_t *g = *gp;
    if (g->mhd) {
        /* libmicrohttpd must not be stopped with suspended connections. */
        for (gw_conn_t *c = g->conns; c; c = c->next) resume(c);
        MHD_run(g->mhd);
        MHD_stop_daemon(g->mhd);
    }
    relay_destroy(&g->relay);
    gw_control_destroy(&g->control);
    folio_client_destroy(&g->client);
    gw_snapshot_clear(&g->snap);
    free(g);
    *gp = NULL;
}
