/* gateway_main.c - folio-gateway: flags, the optional tokenizer for logprob token strings, signals.
 *
 * The gateway is a client of the coordinator like folioctl (proto/README.md), in a process of its
 * own: the coordinator's loop stays about routing, an HTTP client that misbehaves cannot stall it,
 * and several gateways can serve one cluster. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "api_keys.h"
#include "curve.h"
#include "flags.h"
#include "gateway.h"
#include "gguf.h"
#include "host_port.h"
#include "log.h"
#include "model_path.h"
#include "tokenizer.h"
#include "wire.h"

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folio-gateway [flags]\n"
            "The OpenAI-compatible HTTP API of a folio cluster: POST /v1/chat/completions, /v1/completions;\n"
            "GET /v1/models, /health, /metrics.\n"
            "  --coordinator EP     the coordinator's client endpoint (FOLIO_COORDINATOR, default %s)\n"
            "  --curve-secret FILE  the gateway's CURVE secret key (FOLIO_CURVE_SECRET): the link to the\n"
            "                       coordinator is encrypted; list its public key with the gateway role in\n"
            "                       the coordinator's --client-keys, so the tenants of --api-keys count\n"
            "  --coordinator-key FILE  the coordinator's public key (FOLIO_COORDINATOR_KEY)\n"
            "  --http [ADDR:]PORT   where to listen (FOLIO_HTTP, default %d: every IPv4 address;\n"
            "                       127.0.0.1:%d keeps it to this machine, [::1]:%d for IPv6)\n"
            "  --api-keys FILE      lines `KEY TENANT` (FOLIO_API_KEYS): every /v1 request then needs\n"
            "                       `Authorization: Bearer KEY` and is served as the key's tenant;\n"
            "                       /health and /metrics stay open\n"
            "  --max-body BYTES     largest request body, e.g. 8MiB (FOLIO_HTTP_MAX_BODY, default 8MiB);\n"
            "                       413 beyond; headers are limited to 32 KiB by the HTTP library\n"
            "  --max-connections N  HTTP connections at once (FOLIO_HTTP_MAX_CONNECTIONS, default %d)\n"
            "  -m, --model PATH     the served GGUF (FOLIO_MODEL), read for its vocabulary only: logprob\n"
            "                       tokens as text (without it, or when the cluster serves another model,\n"
            "                       they are written token_id:N)\n"
            "  -h, --help\n",
            WIRE_DEFAULT_CLIENT_ENDPOINT, GATEWAY_DEFAULT_PORT, GATEWAY_DEFAULT_PORT, GATEWAY_DEFAULT_PORT,
            GATEWAY_DEFAULT_MAX_CONNS);
}

/* The flag's value, else the environment's, else NULL. */
static const char *env_or(const char *v, const char *env)
{
    if (v) return v;
    const char *e = getenv(env);
    return e && *e ? e : NULL;
}

static int token_text(void *ctx, int32_t id, char *buf, size_t cap)
{
    const int n = tok_token_bytes(ctx, id, true, buf, cap);
    return n < 0 || (size_t)n > cap ? -1 : n;
}

/* Room for many connections: each is a descriptor. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    const char *coordinator = NULL, *http = NULL, *keys_path = NULL, *max_body = NULL, *max_conns = NULL, *model = NULL;
    const char *curve_secret = NULL, *coordinator_key = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--coordinator")) {
            if (!(coordinator = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--curve-secret")) {
            if (!(curve_secret = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--coordinator-key")) {
            if (!(coordinator_key = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--http")) {
            if (!(http = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--api-keys")) {
            if (!(keys_path = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--max-body")) {
            if (!(max_body = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--max-connections")) {
            if (!(max_conns = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model = fl_flag_value(argc, argv, &i))) return 2;
        } else {
            fprintf(stderr, "error: unknown flag '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    /* The key files reach every connection the gateway makes (its requests' and its Status thread's)
     * the way they reach any client of libfolio-client: through the environment it reads. */
    if ((curve_secret && setenv(CURVE_ENV_SECRET, curve_secret, 1)) ||
        (coordinator_key && setenv(CURVE_ENV_COORDINATOR_KEY, coordinator_key, 1))) {
        fprintf(stderr, "error: setenv: %s\n", strerror(errno));
        return 1;
    }
    fl_log_info("gateway link to the coordinator encrypted=%s",
                env_or(NULL, CURVE_ENV_SECRET) || env_or(NULL, CURVE_ENV_COORDINATOR_KEY) ? "yes (CURVE)" : "no");
    http = env_or(http, "FOLIO_HTTP");
    keys_path = env_or(keys_path, "FOLIO_API_KEYS");
    max_body = env_or(max_body, "FOLIO_HTTP_MAX_BODY");
    max_conns = env_or(max_conns, "FOLIO_HTTP_MAX_CONNECTIONS");
    /* FOLIO_MODEL names every tool's model; a gateway without the file serves on (token_id:N). */
    const bool model_given = model != NULL;
    model = env_or(model, "FOLIO_MODEL");

    char addr[256] = "";
    gateway_opts_t o = {.coordinator = wire_endpoint(coordinator, "FOLIO_COORDINATOR", WIRE_DEFAULT_CLIENT_ENDPOINT),
                        .http_addr = addr,
                        .http_port = GATEWAY_DEFAULT_PORT,
                        .max_body = GATEWAY_DEFAULT_MAX_BODY,
                        .max_connections = GATEWAY_DEFAULT_MAX_CONNS};
    if (http && fl_host_port_parse(http, addr, sizeof addr, &o.http_port)) {
        fprintf(stderr, "error: --http %s: expected [ADDR:]PORT (8080, 127.0.0.1:8080, [::1]:8080)\n", http);
        return 2;
    }
    if (max_body && !fl_flag_bytes("--max-body", max_body, &o.max_body)) return 2;
    long n;
    if (max_conns) {
        if (!fl_flag_int("--max-connections", max_conns, 1, 1 << 20, &n)) return 2;
        o.max_connections = (int)n;
    }
    fl_error_t err = {0};
    api_keys_t *keys = NULL;
    if (keys_path && !(keys = api_keys_load(keys_path, &err))) {
        fprintf(stderr, "error: --api-keys: %s\n", err.msg);
        return 1;
    }
    o.keys = keys;
    raise_fd_limit();
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    gateway_t *gw = gateway_new(&o, &err);
    if (!gw) {
        fprintf(stderr, "error: %s\n", err.msg);
        api_keys_destroy(&keys);
        return 1;
    }
    tok_t *tok = NULL;
    if (model) {
        gguf_t *g = gguf_open(model, &err);
        if (g) tok = tok_new_from_gguf(g, &err);
        gguf_destroy(&g);
        if (!tok && model_given) {
            fprintf(stderr, "error: -m %s: %s\n", model, err.msg);
            gateway_destroy(&gw);
            api_keys_destroy(&keys);
            return 1;
        }
        if (!tok) {
            fl_log_warn("gateway: FOLIO_MODEL %s: %s; logprob tokens are written token_id:N", model, err.msg);
        } else {
            char model_id[512];
            fl_model_id(model, model_id, sizeof model_id);
            gateway_set_token_text(gw, token_text, tok, model_id);
        }
    }
    const int rc = gateway_run(gw, &g_stop) ? 1 : 0;
    fl_log_info("gateway stopped url=%s", gateway_url(gw));
    gateway_destroy(&gw);
    tok_destroy(&tok);
    api_keys_destroy(&keys);
    return rc;
}
