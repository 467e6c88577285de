/* coordinator_main.c - folio-coordinator: flags, sockets and the event loop.
 *
 * Two ROUTER sockets (clients, workers) and one zmq_poll loop on one thread. Each wake-up drains
 * both sockets until EAGAIN, alternating batches so neither side starves, then runs the timers:
 * heartbeats to workers every interval, and the liveness check and request deadlines every few
 * milliseconds (more often when a deadline is due sooner). SIGINT/SIGTERM stop the loop; in-flight
 * requests end with UNAVAILABLE and workers get DISCONNECT. Logging is key=value to stderr. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "flags.h"
#include "model_path.h"
#include "clock.h"
#include "coordinator.h"
#include "dispatch.h"
#include "gguf.h"
#include "log.h"

#define BATCH          256   /* messages per socket per turn ... */
#define BATCH_S        0.005 /* ... or this long, so one socket's flood cannot delay the other's */
#define HOUSEKEEPING_S 0.005 /* liveness and deadline checks at least this often under load */

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folio-coordinator [flags]\n"
            "  --listen ENDPOINT       client ROUTER bind (FOLIO_COORDINATOR, default %s)\n"
            "  --workers ENDPOINT      worker ROUTER bind (FOLIO_WORKER_ENDPOINT, default %s)\n"
            "  -m, --model PATH        GGUF whose tokenizer is used (FOLIO_MODEL, default model)\n"
            "  --policy P              prefix | round-robin | least-loaded (default prefix)\n"
            "  --load-factor F         bounded-load factor c >= 1 (default 1.25)\n"
            "  --load-floor N          a group below N requests in flight is never over the bound (default 4)\n"
            "  --route-blocks N        leading blocks that form the routing key (default 8)\n"
            "  --heartbeat-ms N        heartbeat interval; dead after 3 silent intervals (default 1000)\n"
            "  --max-inflight N        Generate requests in flight at most (default 4096); beyond it a Generate\n"
            "                          is refused RESOURCE_EXHAUSTED with a retry hint\n"
            "  --max-inflight-per-tenant N  of which one tenant's at most (default 3/4 of --max-inflight;\n"
            "                          0: no limit), so one tenant cannot take every slot\n"
            "  --share-cache A,B,...   tenants A, B, ... share prefix-cache blocks (repeatable; tenants\n"
            "                          never share otherwise)\n",
            WIRE_DEFAULT_CLIENT_ENDPOINT, WIRE_DEFAULT_WORKER_ENDPOINT);
}

static int parse_flags(int argc, char **argv, coord_opts_t *o)
{
    *o = (coord_opts_t){
        .policy = ROUTER_PREFIX, .load_factor = 1.25, .load_floor = 4, .route_blocks = 8, .heartbeat_ms = 1000, .max_inflight = 4096,
        .max_inflight_per_tenant = -1};
    const char *listen = NULL, *workers = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        long n;
        double f;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--listen")) {
            if (!(listen = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--workers")) {
            if (!(workers = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(o->model_path = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--policy")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            if (router_policy_parse(v, &o->policy)) {
                fprintf(stderr, "error: --policy %s: expected prefix, round-robin or least-loaded\n", v);
                return -1;
            }
        } else if (!strcmp(a, "--load-factor")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(a, v, 1.0, 1000.0, &f)) return -1;
            o->load_factor = f;
        } else if (!strcmp(a, "--load-floor")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1000000, &n)) return -1;
            o->load_floor = (int)n;
        } else if (!strcmp(a, "--route-blocks")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, COORD_MAX_ROUTE_BLOCKS, &n)) return -1;
            o->route_blocks = (int)n;
        } else if (!strcmp(a, "--heartbeat-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 10, 600000, &n)) return -1;
            o->heartbeat_ms = (int)n;
        } else if (!strcmp(a, "--share-cache")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            bool ok = o->n_share_cache < COORD_MAX_SHARE_LISTS && *v && strlen(v) <= 4096;
            for (const char *p = v; ok && *p; p += strcspn(p, ",") + (p[strcspn(p, ",")] ? 1 : 0))
                ok = strcspn(p, ",") <= 256;
            if (!ok) {
                fprintf(stderr, "error: --share-cache: at most %d non-empty lists of tenant names of up to 256 bytes\n",
                        COORD_MAX_SHARE_LISTS);
                return -1;
            }
            o->share_cache[o->n_share_cache++] = v;
        } else if (!strcmp(a, "--max-inflight")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 22, &n)) return -1;
            o->max_inflight = (int)n;
        } else if (!strcmp(a, "--max-inflight-per-tenant")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1 << 22, &n)) return -1;
            o->max_inflight_per_tenant = (int)n;
        } else {
            fprintf(stderr, "error: unknown flag '%s'\n", a);
            usage(stderr);
            return -1;
        }
    }
    if (o->max_inflight_per_tenant < 0) o->max_inflight_per_tenant = (3 * o->max_inflight + 3) / 4;
    o->client_endpoint = wire_endpoint(listen, "FOLIO_COORDINATOR", WIRE_DEFAULT_CLIENT_ENDPOINT);
    o->worker_endpoint = wire_endpoint(workers, "FOLIO_WORKER_ENDPOINT", WIRE_DEFAULT_WORKER_ENDPOINT);
    return 0;
}

static void *bind_router(void *zctx, const char *endpoint, int hwm, fl_error_t *err)
{
    void *s = wire_socket(zctx, ZMQ_ROUTER, NULL, err);
    if (!s) return NULL;
    /* One queue each way per peer, of hwm messages. Deep: max_inflight bounds the requests, and a
     * dropped token message would leave a gap. A full outgoing queue fails the send (never blocks):
     * a client that far behind is dropped with its requests (dispatch_to_client), a worker's refuses
     * new work; a full incoming queue makes ZeroMQ stop reading that peer, which slows its sends. */
    if (zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm) || zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm) ||
        zmq_bind(s, endpoint)) {
        fl_fail(err, FL_EIO, "bind %s: %s", endpoint, zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    return s;
}

static int setup(coord_t *c, fl_error_t *err)
{
    const char *path = fl_model_path(c->opts.model_path);
    gguf_t *g = gguf_open(path, err);
    if (!g) return err->code ? err->code : FL_EIO;
    c->tok = tok_new_from_gguf(g, err);
    gguf_destroy(&g);
    if (!c->tok) return FL_EFORMAT;
    c->n_vocab = tok_n_vocab(c->tok);
    if (!(c->router = router_new(c->opts.policy, c->opts.load_factor, c->opts.load_floor, err))) return FL_EINVAL;
    if (!(c->reqs = reqs_new(c->opts.max_inflight, err))) return FL_ENOMEM;
    if (!(c->groups = malloc(sizeof *c->groups))) return fl_fail(err, FL_ENOMEM, "out of memory");
    groups_init(c->groups);
    c->next_wid = 1;
    c->hb_s = c->opts.heartbeat_ms * 1e-3;
    if (!(c->zctx = zmq_ctx_new())) return fl_fail(err, FL_EIO, "zmq_ctx_new: %s", zmq_strerror(errno));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    c->instance = ((uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u) ^ ((uint64_t)getpid() << 48);
    const int hwm = c->opts.max_inflight * 16 + 10000;
    if (!(c->clients = bind_router(c->zctx, c->opts.client_endpoint, hwm, err))) return FL_EIO;
    if (!(c->workers = bind_router(c->zctx, c->opts.worker_endpoint, hwm, err))) return FL_EIO;
    fl_log_info("coordinator ready listen=%s workers=%s model=%s vocab=%d policy=%s load_factor=%.2f load_floor=%d "
                "route_blocks=%d heartbeat_ms=%d max_inflight=%d max_inflight_per_tenant=%d queue_per_peer=%d",
                c->opts.client_endpoint, c->opts.worker_endpoint, path, c->n_vocab, router_policy_name(c->opts.policy),
                c->opts.load_factor, c->opts.load_floor, c->opts.route_blocks, c->opts.heartbeat_ms, c->opts.max_inflight,
                c->opts.max_inflight_per_tenant, hwm);
    return FL_OK;
}

static void teardown(coord_t *c)
{
    if (c->clients) zmq_close(c->clients);
    if (c->workers) zmq_close(c->workers);
    if (c->zctx) zmq_ctx_term(c->zctx);
    reqs_destroy(&c->reqs);
    router_destroy(&c->router);
    tok_destroy(&c->tok);
    free(c->groups);
    free(c->tok_buf);
}

/* Handles up to BATCH messages from one socket; returns how many there were. */
static int drain_socket(coord_t *c, void *sock, bool clients)
{
    int n = 0;
    const double t0 = fl_clock_s();
    for (; n < BATCH && (n % 16 || fl_clock_s() - t0 < BATCH_S); n++) {
        wire_msg_t m;
        fl_error_t err = {0};
        const int rc = wire_recv(sock, true, true, &m, &err);
        if (rc && errno == EAGAIN && m.n_frames == 0) break;
        const double now = fl_clock_s();
        if (!rc) {
            if (clients)
                coord_client_message(c, &m, now);
            else
                coord_worker_message(c, &m, now);
        } else if (clients && m.n_frames > 0) {
            /* Framing the parser refused: answer it if we know who sent it. */
            const uint8_t *id = m.identity ? m.identity : zmq_msg_data(&m.frames[0]);
            const size_t len = m.identity ? m.identity_len : zmq_msg_size(&m.frames[0]);
            wire_error_reply_t r;
            wire_error_reply_init(&r, 0, FOLIO__V1__METHOD__METHOD_UNSPECIFIED,
                                  FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, err.msg);
            if (len && len <= WIRE_MAX_IDENTITY &&
                wire_send(c->clients, id, len, m.has_delimiter, WIRE_HEADER_CLIENT, WIRE_CMD_FINAL, &r.resp.base,
                          NULL) &&
                errno == EHOSTUNREACH)
                dispatch_client_gone(c, id, len);
        } else if (rc) {
            fl_log_debug("bad worker framing dropped: %s", err.msg);
        }
        wire_msg_close(&m);
    }
    return n;
}

int main(int argc, char **argv)
{
    static coord_t c; /* large (latency ring, scratch); zeroed */
    if (parse_flags(argc, argv, &c.opts)) return 2;
    fl_error_t err = {0};
    if (setup(&c, &err)) {
        fl_log_error("coordinator failed to start: %s", err.msg);
        teardown(&c);
        return 1;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    zmq_pollitem_t items[2] = {{c.clients, 0, ZMQ_POLLIN, 0}, {c.workers, 0, ZMQ_POLLIN, 0}};
    double now = fl_clock_s();
    double next_hb = now + c.hb_s, next_house = now + HOUSEKEEPING_S;
    const double max_sleep = c.hb_s / 4 < 0.1 ? c.hb_s / 4 : 0.1;
    while (!g_stop) {
        now = fl_clock_s();
        double wait = next_hb - now;
        if (wait > max_sleep) wait = max_sleep;
        const double t = dispatch_next_timer(&c, now);
        if (t >= 0 && t < wait) wait = t;
        const long timeout_ms = wait <= 0 ? 0 : (long)ceil(wait * 1e3);
        const int rc = zmq_poll(items, 2, timeout_ms);
        if (rc < 0 && errno != EINTR) {
            fl_log_error("zmq_poll: %s", zmq_strerror(errno));
            break;
        }
        /* Workers first, so their messages (liveness included) are read before any check that could
         * declare them dead; heartbeats go out on time even while traffic never lets up. */
        for (;;) {
            const int nw = drain_socket(&c, c.workers, false);
            const int nc = drain_socket(&c, c.clients, true);
            now = fl_clock_s();
            const bool hb = now >= next_hb;
            if (hb) next_hb = next_hb + c.hb_s > now ? next_hb + c.hb_s : now + c.hb_s;
            if (hb || now >= next_house || (!nw && !nc)) {
                if (nc) drain_socket(&c, c.workers, false); /* what arrived while clients were served */
                const double t_tick = fl_clock_s();
                dispatch_expire(&c, t_tick);
                coord_workers_tick(&c, t_tick, hb);
                next_house = fl_clock_s() + HOUSEKEEPING_S;
            }
            if (!nw && !nc) break;
        }
    }
    const int ended = dispatch_end_all(&c, "the coordinator is shutting down");
    coord_workers_disconnect(&c);
    fl_log_info("coordinator stopped requests_ended=%d groups=%d", ended, c.groups->n);
    teardown(&c);
    return 0;
}
