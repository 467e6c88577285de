/* coordinator_main.c - folio-coordinator: flags, sockets and the event loop.
 *
 * Two ROUTER sockets (clients, workers) and one zmq_poll loop on one thread. Each wake-up drains
 * both sockets until EAGAIN, alternating batches so neither side starves, then runs the timers:
 * heartbeats to workers every interval, and the liveness check and request deadlines every few
 * milliseconds (more often when a deadline is due sooner). SIGINT/SIGTERM stop the loop; in-flight
 * requests end with UNAVAILABLE and workers get DISCONNECT. Logging is key=value to stderr.
 *
 * Security (auth.h): with --curve-secret both sockets are CURVE servers and a ZAP handler thread
 * admits the listed keys; without it both are plaintext and every peer is trusted, so a bind
 * beyond this machine (not loopback, ipc or inproc) needs --insecure. The start-up line says which. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "flags.h"
#include "host_port.h"
#include "model_path.h"
#include "clock.h"
#include "coordinator.h"
#include "dispatch.h"
#include "gguf.h"
#include "log.h"

#define BATCH          256   /* messages per socket per turn ... */
#define BATCH_S        0.005 /* ... or this long, so one socket's flood cannot delay the other's */
#define HOUSEKEEPING_S 0.005 /* liveness and deadline checks at least this often under load */
/* Twice the silence after which a worker is dead (workers.c): only a connection already given up. */
#define ZMTP_DEAD_AFTER_BEATS 6

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
            "  --policy P              prefix | cache-aware | round-robin | least-loaded (default prefix)\n"
            "  --kv-pull on|off        when a request goes to a group that lacks prompt blocks another group\n"
            "                          holds, tell it where to pull them from instead of computing them\n"
            "                          (default on; workers report their blocks with --kv-events-ms)\n"
            "  --load-factor F         bounded-load factor c >= 1 (default 1.25)\n"
            "  --load-floor N          a group below N requests in flight is never over the bound (default 4)\n"
            "  --route-blocks N        leading blocks that form the routing key (default 8)\n"
            "  --kv-index-entries N    (block, group) entries of the groups' prefix caches kept for\n"
            "                          cache-aware routing, at most (default 262144: 8 MiB)\n"
            "  --heartbeat-ms N        heartbeat interval; dead after 3 silent intervals (default 1000)\n"
            "  --max-inflight N        Generate requests in flight at most (default 4096); beyond it a Generate\n"
            "                          is refused RESOURCE_EXHAUSTED with a retry hint\n"
            "  --max-inflight-per-tenant N  of which one tenant's at most (default 3/4 of --max-inflight;\n"
            "                          0: no limit), so one tenant cannot take every slot\n"
            "  --share-cache A,B,...   tenants A, B, ... share prefix-cache blocks (repeatable; tenants\n"
            "                          never share otherwise)\n"
            "Security (README.md, \"Security\"; keys from folioctl keygen):\n"
            "  --curve-secret FILE     the coordinator's secret key: both sockets CURVE-encrypted\n"
            "  --worker-keys FILE      public keys of the workers allowed to register (`KEY [NAME]` lines)\n"
            "  --client-keys FILE      client keys, lines `KEY TENANT [admin] [gateway]`: a client runs as\n"
            "                          its key's tenant; Drain needs admin; gateway passes Request.tenant\n"
            "  --clients-open          also any other client key, as the default tenant without roles\n"
            "  --insecure              allow a plaintext (no --curve-secret) bind beyond loopback\n",
            WIRE_DEFAULT_CLIENT_ENDPOINT, WIRE_DEFAULT_WORKER_ENDPOINT);
}

/* True for an endpoint only this machine reaches: ipc, inproc, or TCP on a loopback address. */
static bool endpoint_local(const char *ep)
{
    if (!strncmp(ep, "ipc://", 6) || !strncmp(ep, "inproc://", 9)) return true;
    char host[256];
    int port;
    if (strncmp(ep, "tcp://", 6) || fl_host_port_parse(ep + 6, host, sizeof host, &port)) return false;
    return !strncmp(host, "127.", 4) || !strcmp(host, "localhost") || !strcmp(host, "::1");
}

static int check_security_flags(const coord_opts_t *o)
{
    if (!o->curve_secret) {
        if (o->worker_keys || o->client_keys || o->clients_open) {
            fprintf(stderr, "error: --worker-keys, --client-keys and --clients-open need --curve-secret\n");
            return -1;
        }
        const char *ep = !endpoint_local(o->client_endpoint)   ? o->client_endpoint
                         : !endpoint_local(o->worker_endpoint) ? o->worker_endpoint
                                                               : NULL;
        if (ep && !o->insecure) {
            fprintf(stderr,
                    "error: %s is reachable from other machines and the links are not encrypted: give keys\n"
                    "       (--curve-secret, --worker-keys, --client-keys; README.md, \"Security\") or --insecure\n",
                    ep);
            return -1;
        }
        return 0;
    }
    if (!o->worker_keys || (!o->client_keys && !o->clients_open)) {
        fprintf(stderr, "error: --curve-secret needs --worker-keys FILE and --client-keys FILE (or --clients-open)\n");
        return -1;
    }
    return 0;
}

static int parse_flags(int argc, char **argv, coord_opts_t *o)
{
    *o = (coord_opts_t){
        .policy = ROUTER_PREFIX, .load_factor = 1.25, .load_floor = 4, .route_blocks = 8, .heartbeat_ms = 1000, .max_inflight = 4096,
        .max_inflight_per_tenant = -1, .kv_index_entries = KV_INDEX_DEFAULT_ENTRIES};
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
        } else if (!strcmp(a, "--kv-pull")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            if (strcmp(v, "on") && strcmp(v, "off")) {
                fprintf(stderr, "error: --kv-pull %s: expected on or off\n", v);
                return -1;
            }
            o->no_kv_pull = !strcmp(v, "off");
        } else if (!strcmp(a, "--policy")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            if (router_policy_parse(v, &o->policy)) {
                fprintf(stderr, "error: --policy %s: expected prefix, cache-aware, round-robin or least-loaded\n", v);
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
        } else if (!strcmp(a, "--kv-index-entries")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1L << 32, &n)) return -1;
            o->kv_index_entries = (size_t)n;
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
        } else if (!strcmp(a, "--curve-secret")) {
            if (!(o->curve_secret = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--worker-keys")) {
            if (!(o->worker_keys = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--client-keys")) {
            if (!(o->client_keys = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--clients-open")) {
            o->clients_open = true;
        } else if (!strcmp(a, "--insecure")) {
            o->insecure = true;
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
    return check_security_flags(o);
}

/* A ROUTER bound to endpoint; a CURVE server of zap_domain when secret (the coordinator's key) is
 * set. */
static void *bind_router(void *zctx, const char *endpoint, int hwm, int zmtp_heartbeat_ms, const char *secret,
                         const char *zap_domain, fl_error_t *err)
{
    void *s = wire_socket(zctx, ZMQ_ROUTER, NULL, err);
    if (!s) return NULL;
    if (secret && curve_server_setup(s, secret, zap_domain, err)) {
        zmq_close(s);
        return NULL;
    }
    /* An authenticated client could otherwise take another's connection by naming its identity:
     * clients never name one (ROUTER makes it up), workers do and need handover to reconnect. */
    const int zero = 0;
    if (secret && !strcmp(zap_domain, AUTH_DOMAIN_CLIENTS) &&
        zmq_setsockopt(s, ZMQ_ROUTER_HANDOVER, &zero, sizeof zero)) {
        fl_fail(err, FL_EIO, "zmq_setsockopt: %s", zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    /* One queue each way per peer, of hwm messages. Deep: max_inflight bounds the requests, and a
     * dropped token message would leave a gap. A full outgoing queue fails the send (never blocks):
     * a client that far behind is dropped with its requests (dispatch_to_client), a worker's refuses
     * new work; a full incoming queue makes ZeroMQ stop reading that peer, which slows its sends. */
    /* ZMTP pings close a connection whose peer stopped answering well after the peer was given up
     * for dead: a link cut leaves a half-open connection that nothing else would ever close. */
    const int ping_timeout_ms = zmtp_heartbeat_ms * ZMTP_DEAD_AFTER_BEATS;
    if (zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm) || zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm) ||
        (zmtp_heartbeat_ms && (zmq_setsockopt(s, ZMQ_HEARTBEAT_IVL, &zmtp_heartbeat_ms, sizeof zmtp_heartbeat_ms) ||
                               zmq_setsockopt(s, ZMQ_HEARTBEAT_TIMEOUT, &ping_timeout_ms, sizeof ping_timeout_ms))) ||
        zmq_bind(s, endpoint)) {
        fl_fail(err, FL_EIO, "bind %s: %s", endpoint, zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    return s;
}

/* libzmq's ROUTER numbers the peers that name no identity from rand(), and aborts (an assertion)
 * when that number is taken by a peer that named itself so: unseeded, the numbers are the same in
 * every process, so any client could foresee one. Seeded at random, it would have to guess a
 * 32-bit number. */
static void seed_routing_ids(void)
{
    unsigned seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = (unsigned)(fl_clock_s() * 1e9) ^ ((unsigned)getpid() << 16);
    srand(seed);
}

/* The key lists and the ZAP handler, before any CURVE socket binds. */
static int start_auth(coord_t *c, fl_error_t *err)
{
    if (!curve_available()) return fl_fail(err, FL_EUNSUPPORTED, "--curve-secret: this libzmq has no CURVE (libsodium)");
    if (!(c->worker_keys = auth_keys_load(c->opts.worker_keys, false, err))) return FL_EFORMAT;
    if (c->opts.client_keys && !(c->client_keys = auth_keys_load(c->opts.client_keys, true, err))) return FL_EFORMAT;
    if (!(c->auth = auth_new(c->zctx, c->worker_keys, c->client_keys, c->opts.clients_open, err))) return FL_EIO;
    return FL_OK;
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
    if (!(c->kv_index = kv_index_new(c->opts.kv_index_entries, err))) return err->code;
    if (!(c->groups = malloc(sizeof *c->groups))) return fl_fail(err, FL_ENOMEM, "out of memory");
    groups_init(c->groups);
    c->next_wid = 1;
    c->hb_s = c->opts.heartbeat_ms * 1e-3;
    if (!(c->zctx = zmq_ctx_new())) return fl_fail(err, FL_EIO, "zmq_ctx_new: %s", zmq_strerror(errno));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    c->instance = ((uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u) ^ ((uint64_t)getpid() << 48);
    const int hwm = c->opts.max_inflight * 16 + 10000;
    seed_routing_ids();
    char secret[CURVE_KEY_Z85 + 1] = "", security[160];
    if (c->opts.curve_secret) {
        int rc = curve_key_read(c->opts.curve_secret, secret, err);
        if (!rc) rc = start_auth(c, err);
        if (rc) return rc;
    }
    const char *key = c->opts.curve_secret ? secret : NULL;
    c->clients = bind_router(c->zctx, c->opts.client_endpoint, hwm, 0, key, AUTH_DOMAIN_CLIENTS, err);
    if (c->clients)
        c->workers =
            bind_router(c->zctx, c->opts.worker_endpoint, hwm, c->opts.heartbeat_ms, key, AUTH_DOMAIN_WORKERS, err);
    memset(secret, 0, sizeof secret);
    if (!c->workers) return FL_EIO;
    if (c->opts.curve_secret)
        snprintf(security, sizeof security, "curve encrypted=yes worker_keys=%d client_keys=%d clients_open=%s",
                 c->worker_keys->n, c->client_keys ? c->client_keys->n : 0, c->opts.clients_open ? "yes" : "no");
    else
        snprintf(security, sizeof security, "none encrypted=no peers=trusted reach=%s",
                 endpoint_local(c->opts.client_endpoint) && endpoint_local(c->opts.worker_endpoint)
                     ? "this-machine"
                     : "network(--insecure)");
    fl_log_info("coordinator ready listen=%s workers=%s security=%s model=%s vocab=%d policy=%s load_factor=%.2f "
                "load_floor=%d route_blocks=%d kv_index_entries=%zu heartbeat_ms=%d max_inflight=%d "
                "max_inflight_per_tenant=%d queue_per_peer=%d",
                c->opts.client_endpoint, c->opts.worker_endpoint, security, path, c->n_vocab,
                router_policy_name(c->opts.policy), c->opts.load_factor, c->opts.load_floor, c->opts.route_blocks,
                c->opts.kv_index_entries, c->opts.heartbeat_ms, c->opts.max_inflight, c->opts.max_inflight_per_tenant, hwm);
    return FL_OK;
}

static void teardown(coord_t *c)
{
    if (c->clients) zmq_close(c->clients);
    if (c->workers) zmq_close(c->workers);
    auth_destroy(&c->auth);
    if (c->zctx) zmq_ctx_term(c->zctx);
    auth_keys_destroy(&c->worker_keys);
    auth_keys_destroy(&c->client_keys);
    reqs_destroy(&c->reqs);
    kv_index_destroy(&c->kv_index);
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
