/* test_security.c - CURVE links, key lists, tenants and roles end to end (README.md, "Security"):
 * a coordinator on private loopback TCP ports with --curve-secret, --worker-keys and --client-keys
 * (keys made by `folioctl keygen`), one worker group on the tiny random model, and clients of the
 * client library with the keys of an admin, two tenants (alice, bob), a gateway and a stranger.
 *
 *   - a worker whose key is not listed, or with no key, never registers (and is logged refused);
 *   - a client with no key, an unlisted key, a worker's key or the wrong coordinator key gets
 *     nothing, while alice is served between the attempts and the coordinator stays healthy;
 *   - plaintext ZMTP, or garbage, on either CURVE port ends the connection after the server's
 *     greeting (which offers CURVE), and a plaintext worker's READY registers nothing;
 *   - the tenant comes from the key: alice's and bob's identical prompts share no cached blocks (the
 *     prefix-cache counters in usage), a tenant forged in the request is ignored, a gateway key's
 *     Request.tenant is taken, and Status shows a tenant its own view;
 *   - folio-gateway with a gateway key serves each HTTP API key as its tenant (alice's blocks for
 *     alice's API key, none for carol's);
 *   - Drain and undrain are PERMISSION_DENIED without the admin key and done with it (folioctl too);
 *   - start-up: a plaintext bind beyond loopback needs --insecure, --curve-secret needs key lists,
 *     and the start-up line says whether the links are encrypted;
 *   - KV block pulls between groups run over CURVE too (last, it adds a group g1 with its own key):
 *     the puller expects the key the coordinator saw the holder register with, the holder admits
 *     the keys of its --peer-keys only (a stranger's pull, or a plaintext one, gets no answer), and
 *     the pulled blocks give the holder's answer.
 * Skipped (77) when libzmq has no CURVE. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "curve.h"
#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;
static char g_dir[256], g_ep_client[64], g_ep_worker[64], g_coord_public[300];
static int g_port_client, g_port_worker;

/* ---- helpers ---- */

static const char *bin(const char *name)
{
    static char path[4][1024];
    static int next;
    const char *b = getenv("FOLIO_BUILD_DIR");
    char *p = path[next++ % 4];
    snprintf(p, sizeof path[0], "%s/%s", b && *b ? b : ".", name);
    return p;
}

static const char *key_path(const char *name, const char *kind)
{
    static char path[8][512];
    static int next;
    char *p = path[next++ % 8];
    snprintf(p, sizeof path[0], "%s/%s.%s", g_dir, name, kind);
    return p;
}

/* The public key text of NAME (its .public file's key). */
static void public_key(const char *name, char *key)
{
    fl_error_t err = {0};
    if (curve_key_read(key_path(name, "public"), key, &err)) fail_msg("%s", err.msg);
}

static int free_port(void)
{
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) return -1;
    close(fd);
    return ntohs(a.sin_port);
}

/* A client with NAME's key (NULL: none; the environment's keys are set aside for it), trusting
 * server_key_name's public key as the coordinator's. */
static folio_client_t *client_as(const char *name, const char *server_key_name)
{
    fl_error_t err = {0};
    folio_client_t *c;
    if (!name) {
        char *s = strdup(getenv(CURVE_ENV_SECRET)), *k = strdup(getenv(CURVE_ENV_COORDINATOR_KEY));
        unsetenv(CURVE_ENV_SECRET);
        unsetenv(CURVE_ENV_COORDINATOR_KEY);
        c = folio_client_new(g_ep_client, &err);
        setenv(CURVE_ENV_SECRET, s, 1);
        setenv(CURVE_ENV_COORDINATOR_KEY, k, 1);
        free(s);
        free(k);
    } else {
        const folio_client_opts_t o = {.endpoint = g_ep_client,
                                       .curve_secret = key_path(name, "secret"),
                                       .coordinator_key = key_path(server_key_name, "public")};
        c = folio_client_new_opts(&o, &err);
    }
    if (!c) fail_msg("client %s: %s", name ? name : "(plaintext)", err.msg);
    return c;
}

/* Whether the client gets any answer to Health within ms. */
static bool answered(folio_client_t *c, int ms)
{
    Folio__V1__Response *r = NULL;
    fl_error_t err = {0};
    const int rc = folio_client_health(c, ms, &r, &err);
    if (r) folio__v1__response__free_unpacked(r, NULL);
    return rc == 0;
}

static Folio__V1__Response *status_as(const char *name)
{
    folio_client_t *c = client_as(name, "coord");
    Folio__V1__Response *r = e2e_status(c);
    folio_client_destroy(&c);
    return r;
}

/* pid of the build's program name run with the arguments that follow (up to a NULL), its stderr to
 * err_path. */
static pid_t spawn(const char *err_path, const char *name, ...)
{
    char *argv[32];
    int n = 0;
    argv[n++] = (char *)bin(name);
    va_list ap;
    va_start(ap, name);
    for (const char *a; n < 31 && (a = va_arg(ap, const char *));) argv[n++] = (char *)a;
    va_end(ap);
    argv[n] = NULL;
    const pid_t pid = fork();
    if (pid == 0) {
        if (!freopen(err_path, "w", stderr)) _exit(126);
        execv(argv[0], argv);
        _exit(127);
    }
    if (pid < 0) fail_msg("fork: %s", strerror(errno));
    return pid;
}

static void kill_wait(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* The exit status of pid within ms, or -1 when it still runs (it is then killed). */
static int exit_within(pid_t pid, int ms)
{
    int st = 0;
    for (double t0 = e2e_now_ms(); e2e_now_ms() - t0 < ms; e2e_sleep_ms(20))
        if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    kill_wait(pid);
    return -1;
}

static bool file_has(const char *path, const char *what)
{
    FILE *f = fopen(path, "r");
    if (!f) return false;
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) found = strstr(line, what) != NULL;
    fclose(f);
    return found;
}

/* Waits up to ms for what to appear in path. */
static bool file_gets(const char *path, const char *what, int ms)
{
    for (double t0 = e2e_now_ms(); e2e_now_ms() - t0 < ms; e2e_sleep_ms(50))
        if (file_has(path, what)) return true;
    return false;
}

static void generate_as(const char *name, const char *tenant, const int32_t *prompt, int n, folio_result_t *out)
{
    folio_client_t *c = client_as(name, "coord");
    const folio_generate_params_t p = {
        .tokens = prompt, .n_tokens = n, .max_tokens = 4, .ignore_eos = true, .stream = true, .tenant = tenant};
    e2e_generate(c, &p, FOLIO__V1__STATUS_CODE__OK, out);
    folio_client_destroy(&c);
}

/* ---- fixture: keys, lists and the cluster, once ---- */

static int group_setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/folio-e2e-security-XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    snprintf(g_env.model, sizeof g_env.model, "%s/tiny.gguf", g_dir);
    if (e2e_make_model(g_env.model)) return -1;
    static const char *const names[] = {"coord", "w0", "w1", "stranger", "admin", "alice", "bob", "gw"};
    char cmd[2048];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(cmd, sizeof cmd, "'%s' keygen --out '%s' --name %s >/dev/null", bin("folioctl"), g_dir, names[i]);
        if (system(cmd)) {
            fprintf(stderr, "folioctl keygen --name %s failed\n", names[i]);
            return -1;
        }
    }
    /* the worker list is keygen's public files as they are; the client list names tenants and roles */
    snprintf(cmd, sizeof cmd, "cat '%s' '%s' > '%s/workers.keys'", key_path("w0", "public"), key_path("w1", "public"),
             g_dir);
    if (system(cmd)) return -1;
    char k[5][CURVE_KEY_Z85 + 1], path[400];
    public_key("admin", k[0]);
    public_key("alice", k[1]);
    public_key("bob", k[2]);
    public_key("gw", k[3]);
    snprintf(path, sizeof path, "%s/clients.keys", g_dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "# folio clients: KEY TENANT [ROLE...]\n%s ops admin\n%s alice\n%s bob\n%s gw gateway\n", k[0], k[1],
            k[2], k[3]);
    fclose(f);
    snprintf(g_coord_public, sizeof g_coord_public, "%s", key_path("coord", "public"));
    setenv("FOLIO_LOG", "info", 1); /* the checks read the start-up and refusal lines */
    /* folio_client_new (cluster_start's health checks, e2e_status) connects as the admin */
    setenv(CURVE_ENV_SECRET, key_path("admin", "secret"), 1);
    setenv(CURVE_ENV_COORDINATOR_KEY, g_coord_public, 1);
    g_port_client = free_port();
    g_port_worker = free_port();
    if (g_port_client <= 0 || g_port_worker <= 0 || g_port_client == g_port_worker) return -1;
    snprintf(g_ep_client, sizeof g_ep_client, "tcp://127.0.0.1:%d", g_port_client);
    snprintf(g_ep_worker, sizeof g_ep_worker, "tcp://127.0.0.1:%d", g_port_worker);
    static char secret[400], workers[400], clients[400], wsecret[400];
    snprintf(secret, sizeof secret, "%s", key_path("coord", "secret"));
    snprintf(workers, sizeof workers, "%s/workers.keys", g_dir);
    snprintf(clients, sizeof clients, "%s/clients.keys", g_dir);
    snprintf(wsecret, sizeof wsecret, "%s", key_path("w0", "secret"));
    static const char *cargs[8], *wargs[10];
    const char *ca[] = {"--curve-secret", secret, "--worker-keys", workers, "--client-keys", clients, NULL};
    const char *wa[] = {"--curve-secret", wsecret,  "--coordinator-key", g_coord_public, "--peer-keys",
                        workers,          "--kv-events-ms", "20", NULL};
    memcpy(cargs, ca, sizeof ca);
    memcpy(wargs, wa, sizeof wa);
    cluster_opts_t o = {.client_endpoint = g_ep_client,
                        .worker_endpoint = g_ep_worker,
                        .coordinator_args = cargs,
                        .worker_args = wargs,
                        .policy = "prefix",
                        .heartbeat_ms = 2000}; /* liveness is not what this tests: no deaths from a busy machine */
    g_cluster = e2e_cluster_start(&g_env, "security", 1, &o);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    e2e_cluster_stop(&g_cluster);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", g_dir);
    return 0;
}

static const char *coordinator_log(void)
{
    static char path[1100];
    snprintf(path, sizeof path, "%s/coordinator.log", g_env.log_dir);
    return path;
}

/* ---- cases ---- */

static void the_start_up_line_says_the_links_are_encrypted(void **state)
{
    (void)state;
    if (!file_has(coordinator_log(), "security=curve encrypted=yes worker_keys=2 client_keys=4 clients_open=no"))
        fail_msg("the coordinator's start-up line (%s) does not say the links are encrypted", coordinator_log());
}

static void workers_with_an_unknown_key_or_none_never_register(void **state)
{
    (void)state;
    char log_stranger[400], log_plain[400];
    snprintf(log_stranger, sizeof log_stranger, "%s/intruder.log", g_dir);
    snprintf(log_plain, sizeof log_plain, "%s/plain.log", g_dir);
    const pid_t a = spawn(log_stranger, "folio-worker", "--workers", g_ep_worker, "--group", "intruder", "-m",
                          g_env.model, "--threads", "1", "--heartbeat-ms", "200", "--curve-secret",
                          key_path("stranger", "secret"), "--coordinator-key", g_coord_public, NULL);
    const pid_t b = spawn(log_plain, "folio-worker", "--workers", g_ep_worker, "--group", "plain", "-m", g_env.model,
                          "--threads", "1", "--heartbeat-ms", "200", NULL);
    /* both load the model and keep trying to register */
    const bool tried = file_gets(log_stranger, "worker ready sent", e2e_ms(10000)) &&
                       file_gets(log_plain, "worker ready sent", e2e_ms(10000));
    e2e_sleep_ms(e2e_ms(2000));
    Folio__V1__Response *r = status_as("admin");
    const size_t n = r->cluster->n_groups;
    const char *first = n ? r->cluster->groups[0]->name : "";
    const bool refused_logged = file_gets(coordinator_log(), "auth refused side=worker", e2e_ms(2000));
    kill_wait(a);
    kill_wait(b);
    assert_true(tried);
    folio_client_t *admin = client_as("admin", "coord"); /* g0 got through the intruders' model loading */
    const bool healthy = e2e_wait_group(admin, "g0", true, false, e2e_ms(10000)) >= 0;
    folio_client_destroy(&admin);
    if (!healthy) fail_msg("g0 did not stay healthy");
    if (n != 1 || strcmp(first, "g0"))
        fail_msg("%zu groups registered (first '%s'): only g0 has a listed key", n, first);
    folio__v1__response__free_unpacked(r, NULL);
    if (!refused_logged) fail_msg("the coordinator did not log the refused worker key");
}

static void clients_without_a_listed_key_get_nothing_while_a_listed_one_is_served(void **state)
{
    (void)state;
    int32_t prompt[24];
    e2e_prompt_tokens(7, 24, prompt);
    struct {
        const char *who, *server_key, *why;
    } bad[] = {
        {NULL, NULL, "no key (plaintext)"},
        {"stranger", "coord", "a key not in --client-keys"},
        {"w0", "coord", "a worker's key"},
        {"alice", "stranger", "a listed key that trusts another coordinator key"},
    };
    folio_client_t *alice = client_as("alice", "coord");
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        folio_client_t *c = client_as(bad[i].who, bad[i].server_key);
        if (answered(c, e2e_ms(1500))) fail_msg("a client with %s got an answer", bad[i].why);
        folio_client_destroy(&c);
        /* meanwhile the listed client is served, and the coordinator is healthy */
        folio_result_t r;
        const folio_generate_params_t p = {.tokens = prompt, .n_tokens = 24, .max_tokens = 8, .stream = true};
        e2e_generate(alice, &p, FOLIO__V1__STATUS_CODE__OK, &r);
        assert_int_equal(r.n_tokens, 8);
        folio_result_clear(&r);
        assert_true(answered(alice, e2e_ms(5000)));
    }
    folio_client_destroy(&alice);
    if (!file_has(coordinator_log(), "auth refused side=client"))
        fail_msg("the coordinator did not log the refused client key");
}

/* Connects to 127.0.0.1:port, sends what, and reads until the server closes: the bytes it sent, or
 * -1 when it did not close within ms. */
static int bytes_until_closed(int port, const void *what, size_t len, uint8_t *got, size_t cap, int ms)
{
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {
        .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a)) fail_msg("connect :%d: %s", port, strerror(errno));
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (send(fd, what, len, MSG_NOSIGNAL) != (ssize_t)len) fail_msg("send: %s", strerror(errno));
    size_t n = 0;
    for (double t0 = e2e_now_ms(); e2e_now_ms() - t0 < ms;) {
        const ssize_t k = recv(fd, got + n, cap - n, 0);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            close(fd);
            return (int)n;
        }
        if (k > 0) n += (size_t)k;
        if (n == cap) break;
    }
    close(fd);
    return -1;
}

static void plaintext_on_the_curve_ports_is_refused(void **state)
{
    (void)state;
    /* A ZMTP 3.0 greeting offering NULL (plaintext), then a READY command as a DEALER sends it. */
    static const uint8_t ready[] = {0x04, 28,  5,   'R', 'E', 'A', 'D', 'Y', 11, 'S', 'o', 'c', 'k', 'e', 't',
                                    '-',  'T', 'y', 'p', 'e', 0,   0,   0,   6,  'D', 'E', 'A', 'L', 'E', 'R'};
    uint8_t hello[64 + sizeof ready] = {0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0, 'N', 'U', 'L', 'L'};
    memcpy(hello + 64, ready, sizeof ready);
    uint8_t garbage[4096];
    for (size_t i = 0; i < sizeof garbage; i++) garbage[i] = (uint8_t)(i * 2654435761u >> 13);
    const int ports[2] = {g_port_client, g_port_worker};
    for (int i = 0; i < 2; i++) {
        uint8_t got[256];
        const int n = bytes_until_closed(ports[i], hello, 64 + sizeof ready, got, sizeof got, e2e_ms(5000));
        if (n < 0) fail_msg("port %d kept a plaintext ZMTP peer's connection open", ports[i]);
        /* at most the server's own greeting, and that offers CURVE */
        if (n > 64) fail_msg("port %d sent %d bytes to a plaintext peer (more than its greeting)", ports[i], n);
        if (n >= 16 && memcmp(got + 12, "CURVE", 5)) fail_msg("port %d's greeting offers '%.5s'", ports[i], got + 12);
        fprintf(stderr, "[e2e] security: port %d closed a plaintext ZMTP peer's connection (%d bytes read first)\n",
                ports[i], n);
        if (bytes_until_closed(ports[i], garbage, sizeof garbage, got, sizeof got, e2e_ms(5000)) < 0)
            fail_msg("port %d kept a connection that sent garbage open", ports[i]);
    }
    /* a plaintext ZeroMQ worker's READY registers nothing */
    void *ctx = zmq_ctx_new();
    fl_error_t err = {0};
    void *w = wire_socket(ctx, ZMQ_DEALER, "plainw:0:1", &err);
    assert_non_null(w);
    assert_int_equal(zmq_connect(w, g_ep_worker), 0);
    Folio__V1__WorkerHello h = FOLIO__V1__WORKER_HELLO__INIT;
    h.group = "plainw";
    h.tp_size = 1;
    assert_int_equal(wire_send(w, NULL, 0, false, WIRE_HEADER_WORKER, WIRE_CMD_READY, &h.base, &err), 0);
    e2e_sleep_ms(e2e_ms(1500));
    zmq_close(w);
    zmq_ctx_term(ctx);
    Folio__V1__Response *r = status_as("admin");
    assert_int_equal(r->cluster->n_groups, 1);
    assert_true(r->cluster->groups[0]->healthy);
    folio__v1__response__free_unpacked(r, NULL);
}

static void tenants_come_from_the_key_and_never_share_cached_blocks(void **state)
{
    (void)state;
    enum { N = 80 }; /* 5 blocks of 16 */
    int32_t p[N], q[N], s[N];
    e2e_prompt_tokens(101, N, p);
    e2e_prompt_tokens(102, N, q);
    e2e_prompt_tokens(103, N, s);
    folio_result_t r[12];
    int k = 0;
    /* the same prompt: alice first, then bob gets nothing of hers; alice again hits */
    generate_as("alice", NULL, p, N, &r[k++]);
    generate_as("bob", NULL, p, N, &r[k++]);
    generate_as("alice", NULL, p, N, &r[k++]);
    fprintf(stderr, "[e2e] security: P cached alice %u, bob %u, alice again %u\n", r[0].cached_prompt_tokens,
            r[1].cached_prompt_tokens, r[2].cached_prompt_tokens);
    assert_int_equal(r[0].cached_prompt_tokens, 0);
    if (r[1].cached_prompt_tokens) fail_msg("bob got %u of alice's cached tokens", r[1].cached_prompt_tokens);
    if (!r[2].cached_prompt_tokens) fail_msg("alice's second identical prompt had no cached tokens");
    assert_true(e2e_tokens_equal(r[0].tokens, r[0].n_tokens, r[1].tokens, r[1].n_tokens));
    /* a tenant forged in the request is ignored: bob claiming alice misses her blocks, then hits his */
    generate_as("alice", NULL, q, N, &r[k++]);
    generate_as("bob", "alice", q, N, &r[k++]);
    generate_as("bob", NULL, q, N, &r[k++]);
    fprintf(stderr, "[e2e] security: Q cached alice %u, bob as 'alice' %u, bob %u\n", r[3].cached_prompt_tokens,
            r[4].cached_prompt_tokens, r[5].cached_prompt_tokens);
    if (r[4].cached_prompt_tokens)
        fail_msg("bob's forged tenant 'alice' got %u of her cached tokens", r[4].cached_prompt_tokens);
    if (!r[5].cached_prompt_tokens) fail_msg("bob's forged request did not run as bob (his repeat had no hits)");
    /* a gateway key's Request.tenant is taken (it maps HTTP API keys itself); without one it is its own */
    generate_as("gw", "alice", q, N, &r[k++]);
    generate_as("gw", NULL, s, N, &r[k++]);
    generate_as("gw", NULL, s, N, &r[k++]);
    generate_as("alice", NULL, s, N, &r[k++]);
    fprintf(stderr, "[e2e] security: gateway as alice on Q cached %u; S as gw %u, again %u, alice %u\n",
            r[6].cached_prompt_tokens, r[7].cached_prompt_tokens, r[8].cached_prompt_tokens, r[9].cached_prompt_tokens);
    if (!r[6].cached_prompt_tokens) fail_msg("the gateway's request for tenant alice did not find alice's blocks");
    assert_int_equal(r[7].cached_prompt_tokens, 0);
    if (!r[8].cached_prompt_tokens) fail_msg("the gateway's own tenant had no hits on its repeat");
    if (r[9].cached_prompt_tokens) fail_msg("alice got %u of the gateway tenant's blocks", r[9].cached_prompt_tokens);
    for (int i = 0; i < k; i++) folio_result_clear(&r[i]);

    /* Status: a tenant's own view; the admin's and the gateway's whole */
    Folio__V1__Response *v = status_as("alice");
    const Folio__V1__StatusReply *st = v->cluster;
    assert_true(st->tenant_view);
    assert_string_equal(st->tenant, "alice");
    assert_int_equal(st->tenant_requests_inflight, 0);
    assert_int_equal(st->requests_total, 0);
    assert_int_equal(st->n_groups, 1);
    assert_null(st->groups[0]->requests);
    assert_null(st->requests_no_group);
    folio__v1__response__free_unpacked(v, NULL);
    const char *whole[] = {"admin", "gw"};
    for (int i = 0; i < 2; i++) {
        v = status_as(whole[i]);
        assert_false(v->cluster->tenant_view);
        if (v->cluster->requests_total < (uint64_t)k)
            fail_msg("%s's Status counts %llu requests", whole[i], (unsigned long long)v->cluster->requests_total);
        assert_non_null(v->cluster->groups[0]->requests);
        folio__v1__response__free_unpacked(v, NULL);
    }
}

/* cached_tokens of a /v1/completions answer for prompt (token ids) with API key key, or -1. */
static int http_cached_tokens(const char *url, const char *key, const int32_t *prompt, int n)
{
    char body[2048], cmd[3072], out[8192] = "";
    int len = snprintf(body, sizeof body, "{\"prompt\": [");
    for (int i = 0; i < n; i++) len += snprintf(body + len, sizeof body - (size_t)len, "%s%d", i ? "," : "", prompt[i]);
    snprintf(body + len, sizeof body - (size_t)len, "], \"max_tokens\": 4, \"temperature\": 0}");
    snprintf(cmd, sizeof cmd,
             "curl -s -m 30 %s/v1/completions -H 'Authorization: Bearer %s' -H "
             "'Content-Type: application/json' -d '%s'",
             url, key, body);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    const size_t got = fread(out, 1, sizeof out - 1, f);
    out[got] = 0;
    pclose(f);
    const char *c = strstr(out, "\"cached_tokens\":");
    if (!c) fprintf(stderr, "[e2e] security: no cached_tokens in %s\n", out);
    return c ? atoi(c + strlen("\"cached_tokens\":")) : -1;
}

static void the_gateway_key_relays_the_tenants_of_its_api_keys(void **state)
{
    (void)state;
    if (system("command -v curl >/dev/null 2>&1")) skip();
    char keys[400], url[64], http[32], log[400];
    snprintf(keys, sizeof keys, "%s/api.keys", g_dir);
    FILE *f = fopen(keys, "w");
    assert_non_null(f);
    fputs("k-alice alice\nk-carol carol\n", f);
    fclose(f);
    const int port = free_port();
    snprintf(http, sizeof http, "127.0.0.1:%d", port);
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    snprintf(log, sizeof log, "%s/gateway.log", g_dir);
    const pid_t gw = spawn(log, "folio-gateway", "--coordinator", g_ep_client, "--http", http, "--api-keys", keys,
                           "--curve-secret", key_path("gw", "secret"), "--coordinator-key", g_coord_public, NULL);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "curl -s -o /dev/null -w '%%{http_code}' %s/health | grep -q 200", url);
    bool up = false;
    for (double t0 = e2e_now_ms(); !up && e2e_now_ms() - t0 < e2e_ms(15000); e2e_sleep_ms(100)) up = !system(cmd);
    enum { N = 80 };
    int32_t p[N], t[N];
    e2e_prompt_tokens(105, N, p);
    e2e_prompt_tokens(106, N, t);
    folio_result_t r;
    generate_as("alice", NULL, p, N, &r); /* alice's blocks for P */
    folio_result_clear(&r);
    const int alice_p = up ? http_cached_tokens(url, "k-alice", p, N) : -1;
    const int carol_p = up ? http_cached_tokens(url, "k-carol", p, N) : -1;
    const int carol_t = up ? http_cached_tokens(url, "k-carol", t, N) : -1;
    const int carol_t2 = up ? http_cached_tokens(url, "k-carol", t, N) : -1;
    kill_wait(gw);
    if (!up) fail_msg("the gateway never served /health with 200 (%s)", log);
    fprintf(stderr, "[e2e] security: through the gateway P cached as alice %d, carol %d; T as carol %d, again %d\n",
            alice_p, carol_p, carol_t, carol_t2);
    if (alice_p <= 0) fail_msg("the gateway's request for API key k-alice did not find tenant alice's blocks");
    assert_int_equal(carol_p, 0);
    assert_int_equal(carol_t, 0);
    if (carol_t2 <= 0) fail_msg("tenant carol's repeat through the gateway had no hits");
}

static void drain_is_refused_without_the_admin_key(void **state)
{
    (void)state;
    const char *denied[] = {"alice", "gw"};
    for (int i = 0; i < 2; i++) {
        folio_client_t *c = client_as(denied[i], "coord");
        fl_error_t err = {0};
        if (!folio_client_drain(c, "g0", false, e2e_ms(5000), &err)) fail_msg("%s could drain g0", denied[i]);
        if (!strstr(err.msg, "PERMISSION_DENIED")) fail_msg("%s's drain: '%s'", denied[i], err.msg);
        if (!folio_client_drain(c, "g0", true, e2e_ms(5000), &err)) fail_msg("%s could undrain g0", denied[i]);
        folio_client_destroy(&c);
    }
    Folio__V1__Response *r = status_as("admin");
    assert_false(r->cluster->groups[0]->draining);
    folio__v1__response__free_unpacked(r, NULL);
    /* folioctl with alice's key: refused, exit 1 */
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' drain g0 --coordinator %s --curve-secret '%s' --coordinator-key '%s' 2>/dev/null",
             bin("folioctl"), g_ep_client, key_path("alice", "secret"), g_coord_public);
    const int st = system(cmd);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 1) fail_msg("folioctl drain with alice's key: status %d", st);
    /* the admin key drains and undrains */
    folio_client_t *admin = client_as("admin", "coord");
    fl_error_t err = {0};
    if (folio_client_drain(admin, "g0", false, e2e_ms(5000), &err)) fail_msg("admin drain: %s", err.msg);
    r = e2e_status(admin);
    assert_true(r->cluster->groups[0]->draining);
    folio__v1__response__free_unpacked(r, NULL);
    snprintf(cmd, sizeof cmd, "'%s' undrain g0 --coordinator %s --curve-secret '%s' --coordinator-key '%s' >/dev/null",
             bin("folioctl"), g_ep_client, key_path("admin", "secret"), g_coord_public);
    if (system(cmd)) fail_msg("folioctl undrain with the admin key failed");
    r = e2e_status(admin);
    assert_false(r->cluster->groups[0]->draining);
    folio__v1__response__free_unpacked(r, NULL);
    folio_client_destroy(&admin);
}

static void start_up_refuses_plaintext_beyond_loopback_and_key_flags_alone(void **state)
{
    (void)state;
    char ep_any[64], ep_w[64], ep_lo[64], log[400];
    snprintf(ep_any, sizeof ep_any, "tcp://0.0.0.0:%d", free_port());
    snprintf(ep_lo, sizeof ep_lo, "tcp://127.0.0.1:%d", free_port());
    snprintf(ep_w, sizeof ep_w, "tcp://127.0.0.1:%d", free_port());
    snprintf(log, sizeof log, "%s/start.log", g_dir);
    const pid_t refused =
        spawn(log, "folio-coordinator", "--listen", ep_any, "--workers", ep_w, "-m", g_env.model, NULL);
    assert_int_equal(exit_within(refused, e2e_ms(10000)), 2);
    if (!file_has(log, "--insecure")) fail_msg("the refusal does not name --insecure");
    char workers_keys[400];
    snprintf(workers_keys, sizeof workers_keys, "%s/workers.keys", g_dir);
    const pid_t half = spawn(log, "folio-coordinator", "--listen", ep_lo, "--workers", ep_w, "-m", g_env.model,
                             "--curve-secret", key_path("coord", "secret"), "--worker-keys", workers_keys, NULL);
    assert_int_equal(exit_within(half, e2e_ms(10000)), 2); /* no --client-keys nor --clients-open */
    const pid_t nokey = spawn(log, "folio-coordinator", "--listen", ep_lo, "--workers", ep_w, "-m", g_env.model,
                              "--client-keys", workers_keys, NULL);
    assert_int_equal(exit_within(nokey, e2e_ms(10000)), 2); /* a key list without --curve-secret */
    const char *says[] = {"encrypted=no peers=trusted reach=network(--insecure)",
                          "encrypted=no peers=trusted reach=this-machine"};
    for (int i = 0; i < 2; i++) {
        const pid_t pid = spawn(log, "folio-coordinator", "--listen", i ? ep_lo : ep_any, "--workers", ep_w, "-m",
                                g_env.model, i ? NULL : "--insecure", NULL);
        const bool said = file_gets(log, says[i], e2e_ms(10000));
        kill_wait(pid);
        if (!said) fail_msg("the start-up line does not say '%s'", says[i]);
    }
}

/* Whether a pull of prompt's blocks under tenant, sent on a DEALER to endpoint as key_name's CURVE
 * key (NULL: plaintext) expecting server_key, gets any answer within 3 s. */
static bool pull_answered(const char *endpoint, const char *key_name, const char *server_key, const char *layout,
                          const char *tenant, int32_t *prompt, int n)
{
    void *zctx = zmq_ctx_new();
    fl_error_t err = {0};
    void *sock = wire_socket(zctx, ZMQ_DEALER, NULL, &err);
    assert_non_null(sock);
    if (key_name) {
        char secret[CURVE_KEY_Z85 + 1];
        if (curve_key_read(key_path(key_name, "secret"), secret, &err) ||
            curve_client_setup(sock, secret, server_key, &err))
            fail_msg("%s", err.msg);
    }
    assert_int_equal(zmq_connect(sock, endpoint), 0);
    Folio__V1__KvPull p = FOLIO__V1__KV_PULL__INIT;
    p.pull_id = 7;
    p.layout = (char *)layout;
    p.tenant = (char *)tenant;
    p.tokens = prompt;
    p.n_tokens = (size_t)n;
    assert_int_equal(wire_send(sock, NULL, 0, false, WIRE_HEADER_PEER, WIRE_CMD_KV_PULL, &p.base, &err), 0);
    zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
    const bool got = zmq_poll(&it, 1, e2e_ms(3000)) > 0;
    const int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(sock);
    zmq_ctx_term(zctx);
    return got;
}

static pid_t g_g1; /* the second group's worker, while the test below runs */

static int kill_g1(void **state)
{
    (void)state;
    if (g_g1 > 0) kill_wait(g_g1);
    g_g1 = 0;
    return 0;
}

static void kv_pulls_run_over_curve_between_listed_workers_only(void **state)
{
    (void)state;
    enum { BS = 16, BLOCKS = 12, LEN = BLOCKS * BS + 5 };
    char log_g1[400], workers[400];
    snprintf(log_g1, sizeof log_g1, "%s/g1.log", g_dir);
    snprintf(workers, sizeof workers, "%s/workers.keys", g_dir);
    g_g1 = spawn(log_g1, "folio-worker", "--workers", g_ep_worker, "--group", "g1", "-m", g_env.model,
                           "--threads", "1", "--heartbeat-ms", "2000", "--curve-secret", key_path("w1", "secret"),
                           "--coordinator-key", g_coord_public, "--peer-keys", workers, "--kv-events-ms", "20",
                           "--kv-pull-timeout-ms", "3000", NULL);
    folio_client_t *admin = client_as("admin", "coord");
    const bool up = e2e_wait_group(admin, "g1", true, false, e2e_ms(20000)) >= 0;
    if (!up) fail_msg("g1 (key w1) did not register (%s)", log_g1);
    const bool encrypted = file_has(log_g1, "serving KV block pulls at") && file_has(log_g1, "encrypted=yes,");

    int32_t prompt[LEN];
    e2e_prompt_tokens(31, LEN, prompt);
    folio_result_t first = {0}, res = {0};
    generate_as("alice", NULL, prompt, LEN, &first);
    char home[64], other[64], endpoint[300] = "", layout[600] = "", home_key[CURVE_KEY_Z85 + 1];
    snprintf(home, sizeof home, "%s", first.group);
    snprintf(other, sizeof other, "%s", strcmp(home, "g0") ? "g0" : "g1");
    public_key(strcmp(home, "g0") ? "w1" : "w0", home_key);
    /* the holder's blocks in the coordinator's index, and its peer endpoint */
    uint64_t indexed = 0, pulled_before = 0;
    for (double t0 = e2e_now_ms(); indexed < BLOCKS && e2e_now_ms() - t0 < e2e_ms(5000); e2e_sleep_ms(20)) {
        Folio__V1__Response *r = e2e_status(admin);
        const Folio__V1__GroupStatus *h = e2e_group(r, home), *o = e2e_group(r, other);
        assert_non_null(h);
        assert_non_null(o);
        indexed = h->kv_index_blocks;
        pulled_before = o->kv_pulled_blocks;
        snprintf(endpoint, sizeof endpoint, "%s", h->kv_peer_endpoint);
        snprintf(layout, sizeof layout, "%s|%s|%u", h->model_id, h->kv_type, r->cluster->block_size);
        folio__v1__response__free_unpacked(r, NULL);
    }
    fl_error_t err = {0};
    if (folio_client_drain(admin, home, false, e2e_ms(5000), &err)) fail_msg("drain %s: %s", home, err.msg);
    generate_as("alice", NULL, prompt, LEN, &res);
    uint64_t pulled = 0;
    for (double t0 = e2e_now_ms(); pulled < pulled_before + BLOCKS && e2e_now_ms() - t0 < e2e_ms(5000);
         e2e_sleep_ms(50)) {
        Folio__V1__Response *r = e2e_status(admin);
        pulled = e2e_group(r, other)->kv_pulled_blocks;
        folio__v1__response__free_unpacked(r, NULL);
    }
    if (folio_client_drain(admin, home, true, e2e_ms(5000), &err)) fail_msg("undrain %s: %s", home, err.msg);
    /* the holder's peer socket: a listed key is answered; a stranger's key, or plaintext, gets nothing */
    const bool listed = pull_answered(endpoint, "w1", home_key, layout, "alice", prompt, BLOCKS * BS);
    const bool stranger = pull_answered(endpoint, "stranger", home_key, layout, "alice", prompt, BLOCKS * BS);
    const bool plain = pull_answered(endpoint, NULL, NULL, layout, "alice", prompt, BLOCKS * BS);
    const char *holder_log = !strcmp(home, "g1") ? log_g1 : NULL;
    char g0_log[1100];
    snprintf(g0_log, sizeof g0_log, "%s/worker-g0.log", g_env.log_dir);
    const bool refusal_logged = file_gets(holder_log ? holder_log : g0_log, "auth refused side=kv-peer", e2e_ms(3000));
    kill_g1(NULL);
    fprintf(stderr, "[e2e] security: %s -> %s: %u of %u prompt tokens cached, %llu blocks pulled; raw pulls: listed %d, "
                    "stranger %d, plaintext %d\n",
            home, other, res.cached_prompt_tokens, res.prompt_tokens,
            (unsigned long long)(pulled - pulled_before), listed, stranger, plain);
    if (!encrypted) fail_msg("g1 does not say its KV peer socket is encrypted (%s)", log_g1);
    if (indexed < BLOCKS) fail_msg("%s's blocks never reached the coordinator's index", home);
    assert_string_equal(res.group, other);
    if (res.cached_prompt_tokens < BLOCKS * BS)
        fail_msg("%u cached prompt tokens on %s, expected the %d pulled over CURVE", res.cached_prompt_tokens, other,
                 BLOCKS * BS);
    assert_true(pulled >= pulled_before + BLOCKS);
    if (!e2e_tokens_equal(first.tokens, first.n_tokens, res.tokens, res.n_tokens))
        fail_msg("the answer with pulled blocks differs from the holder's");
    if (!listed) fail_msg("a pull with a listed worker key got no answer");
    if (stranger || plain) fail_msg("the holder answered a %s pull", stranger ? "stranger's" : "plaintext");
    if (!refusal_logged) fail_msg("the holder did not log the refused peer key");
    folio_result_clear(&first);
    folio_result_clear(&res);
    folio_client_destroy(&admin);
}

int main(void)
{
    if (!curve_available()) {
        printf("skipped: this libzmq has no CURVE\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_start_up_line_says_the_links_are_encrypted),
        cmocka_unit_test(workers_with_an_unknown_key_or_none_never_register),
        cmocka_unit_test(clients_without_a_listed_key_get_nothing_while_a_listed_one_is_served),
        cmocka_unit_test(plaintext_on_the_curve_ports_is_refused),
        cmocka_unit_test(tenants_come_from_the_key_and_never_share_cached_blocks),
        cmocka_unit_test(the_gateway_key_relays_the_tenants_of_its_api_keys),
        cmocka_unit_test(drain_is_refused_without_the_admin_key),
        cmocka_unit_test(start_up_refuses_plaintext_beyond_loopback_and_key_flags_alone),
        cmocka_unit_test_teardown(kv_pulls_run_over_curve_between_listed_workers_only, kill_g1),
    };
    const char *filter = getenv("FOLIO_E2E_FILTER");
    if (filter && *filter) cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
