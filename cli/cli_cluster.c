/* cli_cluster.c - a local folio cluster as child processes; see cli_cluster.h.
 *
 * cluster_start() fork/execs folio-coordinator and one folio-worker per rank of each group (g<i>;
 * tp ranks each, rank 0 alone without tensor parallelism)
 * from the binaries' directory, then polls Health through the client library until every group is
 * healthy. Each child asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG, set
 * before exec), so a crashed or killed caller never leaks a cluster. With opts.log_dir each child's
 * stdout and stderr go to LOG_DIR/coordinator.log or LOG_DIR/worker-g<i>.log (appended).
 *
 * With opts.http, folio-gateway (the HTTP API) runs beside them as one more supervised child,
 * connected to the coordinator's client endpoint; cluster_start() waits until its port accepts.
 *
 * Child liveness is checked with waitid(WNOWAIT), which does not reap: a caller may reap a dead
 * child itself and then sets its pid in the cluster_t to 0, which every function here skips.
 * cluster_supervise() reaps by pid (never waitpid(-1), which would take a child that is not the
 * cluster's) and restarts what it reaped; cluster_stop() stops what runs and restarts nothing, so a
 * child that died while its restart was pending stays dead. Nothing is printed; failures come back
 * in fl_error_t, progress and restarts go to the logger. */
#include "cli_cluster.h"
#include "host_port.h"
#include "model_path.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <sys/socket.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "folio_client.h"
#include "log.h"
#include "model.h"
#include "wire.h"

#define CLUSTER_MAX_ARGS      256
#define CLUSTER_STOP_GRACE_MS 5000

static double now_ms(void) { return fl_clock_s() * 1e3; }

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

/* Argument vector under construction; numbers are formatted into a small arena. */
typedef struct argv_buf {
    const char *argv[CLUSTER_MAX_ARGS + 1];
    int n;
    char nums[16][32];
    int n_nums;
} argv_buf_t;

static void arg(argv_buf_t *a, const char *s)
{
    if (a->n < CLUSTER_MAX_ARGS) a->argv[a->n++] = s;
    a->argv[a->n] = NULL;
}

static void arg_num(argv_buf_t *a, const char *flag, unsigned long long v)
{
    if (a->n_nums == 16) return;
    char *s = a->nums[a->n_nums++];
    snprintf(s, 32, "%llu", v);
    arg(a, flag);
    arg(a, s);
}

static void arg_list(argv_buf_t *a, const char *const *extra)
{
    for (int i = 0; extra && extra[i]; i++) arg(a, extra[i]);
}

static void coordinator_argv(const cluster_t *c, const char *model, char *path, size_t cap, argv_buf_t *a)
{
    snprintf(path, cap, "%s/folio-coordinator", c->bin_dir);
    memset(a, 0, sizeof *a);
    arg(a, path);
    arg(a, "--listen");
    arg(a, c->client_endpoint);
    arg(a, "--workers");
    arg(a, c->worker_endpoint);
    arg(a, "-m");
    arg(a, model);
    if (c->opts.policy && *c->opts.policy) {
        arg(a, "--policy");
        arg(a, c->opts.policy);
    }
    if (c->opts.heartbeat_ms > 0) arg_num(a, "--heartbeat-ms", (unsigned long long)c->opts.heartbeat_ms);
    arg_list(a, c->opts.coordinator_args);
}

static void worker_argv(const cluster_t *c, int i, const char *model, char *path, size_t cap, char *group,
                        argv_buf_t *a)
{
    const unsigned restarts = c->children[i].restarts;
    snprintf(path, cap, "%s/folio-worker", c->bin_dir);
    snprintf(group, 32, "g%d", i / c->tp);
    memset(a, 0, sizeof *a);
    long threads = c->opts.threads_per_worker;
    if (threads <= 0) {
        const long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cores > 0 ? cores / c->n_workers : 1;
        if (threads < 1) threads = 1;
    }
    arg(a, path);
    arg(a, "--coordinator-workers");
    arg(a, c->worker_endpoint);
    arg(a, "--group");
    arg(a, group);
    if (c->tp > 1) {
        arg_num(a, "--rank", (unsigned long long)(i % c->tp));
        arg_num(a, "--tp", (unsigned long long)c->tp);
    } else {
        arg(a, "--rank");
        arg(a, "0");
    }
    arg_num(a, "--threads", (unsigned long long)threads);
    arg(a, "-m");
    arg(a, model);
    if (c->opts.kv_budget_bytes) arg_num(a, "--kv-budget", (unsigned long long)c->opts.kv_budget_bytes);
    if (c->opts.block_size > 0) arg_num(a, "--block-size", (unsigned long long)c->opts.block_size);
    if (c->opts.kv_type_k) {
        arg(a, "--kv-type-k");
        arg(a, kv_type_name(c->opts.kv_type_k));
    }
    if (c->opts.kv_type_v) {
        arg(a, "--kv-type-v");
        arg(a, kv_type_name(c->opts.kv_type_v));
    }
    if (c->opts.max_batch_tokens > 0) arg_num(a, "--max-batch-tokens", (unsigned long long)c->opts.max_batch_tokens);
    if (c->opts.no_prefix_cache) arg(a, "--no-prefix-cache");
    if (c->opts.heartbeat_ms > 0) arg_num(a, "--heartbeat-ms", (unsigned long long)c->opts.heartbeat_ms);
    if (c->opts.spec && *c->opts.spec) {
        arg(a, "--spec");
        arg(a, c->opts.spec);
    }
    if (c->opts.spec_tree && *c->opts.spec_tree) {
        arg(a, "--spec-tree");
        arg(a, c->opts.spec_tree);
    }
    if (c->opts.heads && *c->opts.heads) {
        arg(a, "--heads");
        arg(a, c->opts.heads);
    }
    if (restarts > 0 && c->worker_has_restarts_flag > 0) arg_num(a, "--restarts", restarts);
    arg_list(a, c->opts.worker_args);
}

static void gateway_argv(const cluster_t *c, const char *model, char *path, size_t cap, argv_buf_t *a)
{
    snprintf(path, cap, "%s/folio-gateway", c->bin_dir);
    memset(a, 0, sizeof *a);
    arg(a, path);
    arg(a, "--coordinator");
    arg(a, c->client_endpoint);
    arg(a, "--http");
    arg(a, c->opts.http);
    arg(a, "-m"); /* its vocabulary: logprob tokens as text */
    arg(a, model);
}

/* fork/exec argv[0] with argv; stdout and stderr to log_dir/name.log when log_dir is set. */
static pid_t spawn(const char *const *argv, const char *log_dir, const char *name, fl_error_t *err)
{
    char log_path[PATH_MAX];
    int log_fd = -1;
    if (log_dir && *log_dir) {
        snprintf(log_path, sizeof log_path, "%s/%s.log", log_dir, name);
        log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (log_fd < 0) return fl_fail(err, FL_EIO, "%s: %s", log_path, strerror(errno));
    }
    const pid_t parent = getpid();
    fflush(NULL);
    const pid_t pid = fork();
    if (pid < 0) {
        const int e = errno;
        if (log_fd >= 0) close(log_fd);
        return fl_fail(err, FL_EIO, "fork for %s: %s", argv[0], strerror(e));
    }
    if (pid == 0) {
        /* The child: die with the parent, start from default signal handling, then exec. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(1); /* the parent died before prctl took effect */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        if (log_fd >= 0) {
            dup2(log_fd, STDOUT_FILENO);
            dup2(log_fd, STDERR_FILENO);
        }
        execv(argv[0], (char *const *)argv);
        dprintf(STDERR_FILENO, "folio cluster: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    if (log_fd >= 0) close(log_fd);
    return pid;
}

static int spawn_coordinator(cluster_t *c, fl_error_t *err)
{
    char path[PATH_MAX];
    argv_buf_t a;
    coordinator_argv(c, fl_model_path(c->opts.model), path, sizeof path, &a);
    const pid_t pid = spawn(a.argv, c->opts.log_dir, "coordinator", err);
    if (pid < 0) return (int)pid;
    c->coordinator = pid;
    c->children[c->n_workers].started_ms = now_ms();
    fl_log_debug("cluster: started coordinator pid=%d listen=%s workers=%s", (int)pid, c->client_endpoint,
                 c->worker_endpoint);
    return FL_OK;
}

static int spawn_worker(cluster_t *c, int i, fl_error_t *err)
{
    char path[PATH_MAX], group[32], name[64];
    argv_buf_t a;
    worker_argv(c, i, fl_model_path(c->opts.model), path, sizeof path, group, &a);
    if (c->tp > 1 && i % c->tp)
        snprintf(name, sizeof name, "worker-%s-r%d", group, i % c->tp);
    else
        snprintf(name, sizeof name, "worker-%s", group);
    const pid_t pid = spawn(a.argv, c->opts.log_dir, name, err);
    if (pid < 0) return (int)pid;
    c->workers[i] = pid;
    c->children[i].started_ms = now_ms();
    fl_log_debug("cluster: started worker group=%s rank=%d pid=%d", group, i % c->tp, (int)pid);
    return FL_OK;
}

static int spawn_gateway(cluster_t *c, fl_error_t *err)
{
    char path[PATH_MAX];
    argv_buf_t a;
    gateway_argv(c, fl_model_path(c->opts.model), path, sizeof path, &a);
    const pid_t pid = spawn(a.argv, c->opts.log_dir, "gateway", err);
    if (pid < 0) return (int)pid;
    c->gateway = pid;
    c->children[c->n_workers + 1].started_ms = now_ms();
    fl_log_debug("cluster: started gateway pid=%d http=%s coordinator=%s", (int)pid, c->opts.http, c->client_endpoint);
    return FL_OK;
}

/* True when pid has exited (not reaped: waitid WNOWAIT); *status gets its wait status. */
static bool exited(pid_t pid, int *code, bool *signaled)
{
    if (pid <= 0) return true;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0) return errno == ECHILD;
    if (si.si_pid == 0) return false;
    *code = si.si_status;
    *signaled = si.si_code != CLD_EXITED;
    return true;
}

/* Fails (with which process and how it ended) when the coordinator or, with need_workers, fewer
 * than need_workers workers are alive. */
static int check_alive(const cluster_t *c, int need_workers, fl_error_t *err)
{
    int code = 0;
    bool sig = false;
    char hint[PATH_MAX + 32] = "";
    if (exited(c->coordinator, &code, &sig)) {
        if (c->opts.log_dir) snprintf(hint, sizeof hint, " (see %s/coordinator.log)", c->opts.log_dir);
        return fl_fail(err, FL_EIO, "folio-coordinator (pid %d) %s %d%s", (int)c->coordinator,
                       sig ? "was killed by signal" : "exited with status", code, hint);
    }
    int alive = 0, dead = -1;
    for (int i = 0; i < c->n_workers; i++) {
        if (!exited(c->workers[i], &code, &sig))
            alive++;
        else if (dead < 0)
            dead = i;
    }
    if (alive < need_workers && dead >= 0) {
        exited(c->workers[dead], &code, &sig);
        char rank[16] = "";
        if (dead % c->tp) snprintf(rank, sizeof rank, "-r%d", dead % c->tp);
        if (c->opts.log_dir) snprintf(hint, sizeof hint, " (see %s/worker-g%d%s.log)", c->opts.log_dir, dead / c->tp, rank);
        return fl_fail(err, FL_EIO, "folio-worker g%d%s (pid %d) %s %d%s", dead / c->tp, rank, (int)c->workers[dead],
                       sig ? "was killed by signal" : "exited with status", code, hint);
    }
    return FL_OK;
}

int cluster_wait_healthy(cluster_t *c, int n, int wait_ms, fl_error_t *err)
{
    if (!c) return fl_fail(err, FL_EINVAL, "cluster_wait_healthy: NULL cluster");
    folio_client_t *cl = folio_client_new(c->client_endpoint, err);
    if (!cl) return err ? err->code : FL_EIO;
    const double deadline = now_ms() + (wait_ms < 0 ? 1e15 : wait_ms);
    unsigned healthy = 0, groups = 0;
    bool answered = false;
    int rc = FL_OK;
    const double start = now_ms();
    double shown_at = start;
    int shown = -1; /* healthy * 1000 + registered when last printed */
    for (;;) {
        if ((rc = check_alive(c, n * c->tp, err))) break;
        const double left = deadline - now_ms();
        Folio__V1__Response *r = NULL;
        fl_error_t e = {0};
        const int t = left < 500 ? (left > 1 ? (int)left : 1) : 500;
        if (folio_client_health(cl, t, &r, &e) == FL_OK) {
            answered = true;
            healthy = r->health->healthy_groups;
            groups = r->health->groups;
            folio__v1__response__free_unpacked(r, NULL);
            if ((int)healthy >= n) break;
        }
        /* The wait is the workers loading the model (weights read and repacked): say where it is. */
        const double now = now_ms();
        if (c->opts.progress && (now - shown_at >= 3000 || (answered && (int)(healthy * 1000 + groups) != shown))) {
            if (answered)
                fprintf(stderr, "  waiting for the worker groups: %u of %d healthy, %u registered (%.1f s; loading the model)\n",
                        healthy, n, groups, (now - start) / 1e3);
            else
                fprintf(stderr, "  waiting for the coordinator to answer (%.1f s)\n", (now - start) / 1e3);
            shown = answered ? (int)(healthy * 1000 + groups) : -1;
            shown_at = now;
        }
        if (now_ms() >= deadline) {
            rc = answered ? fl_fail(err, FL_EIO, "%s: %u of %d worker groups healthy (%u registered) after %d ms",
                                    c->client_endpoint, healthy, n, groups, wait_ms)
                          : fl_fail(err, FL_EIO, "%s: the coordinator did not answer Health within %d ms",
                                    c->client_endpoint, wait_ms);
            break;
        }
        sleep_ms(100);
    }
    folio_client_destroy(&cl);
    return rc;
}

/* Whether something accepts TCP connections at host:port. */
static bool accepts(const char *host, int port)
{
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    if (getaddrinfo(host, service, &hints, &ai)) return false;
    bool ok = false;
    for (const struct addrinfo *p = ai; p && !ok; p = p->ai_next) {
        const int fd = socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
        if (fd < 0) continue;
        ok = connect(fd, p->ai_addr, p->ai_addrlen) == 0;
        close(fd);
    }
    freeaddrinfo(ai);
    return ok;
}

/* Waits until the gateway's port accepts connections; fails when it exits first or after wait_ms. */
static int wait_gateway(cluster_t *c, int wait_ms, fl_error_t *err)
{
    char host[256];
    int port = 0;
    if (fl_host_port_parse(c->opts.http, host, sizeof host, &port))
        return fl_fail(err, FL_EINVAL, "--http %s: expected [ADDR:]PORT (8080, 127.0.0.1:8080, [::1]:8080)", c->opts.http);
    const char *local = fl_host_port_local(host);
    const double deadline = now_ms() + (wait_ms > 0 ? wait_ms : 1e15);
    for (;;) {
        int code = 0;
        bool sig = false;
        if (exited(c->gateway, &code, &sig)) {
            char hint[PATH_MAX + 32] = "";
            if (c->opts.log_dir) snprintf(hint, sizeof hint, " (see %s/gateway.log)", c->opts.log_dir);
            return fl_fail(err, FL_EIO, "folio-gateway (pid %d) %s %d%s: is port %d taken? --http PORT picks another, "
                           "--no-http leaves the gateway out", (int)c->gateway,
                           sig ? "was killed by signal" : "exited with status", code, hint, port);
        }
        /* Another process on the port would accept too: the gateway binds first thing, so one that
         * could not has exited by the time a connection succeeds plus a moment. */
        if (accepts(local, port)) {
            sleep_ms(200);
            if (!exited(c->gateway, &code, &sig)) break;
            continue;
        }
        if (now_ms() >= deadline)
            return fl_fail(err, FL_EIO, "folio-gateway (pid %d) does not accept connections on %s port %d after %d ms",
                           (int)c->gateway, local, port, wait_ms);
        sleep_ms(50);
    }
    snprintf(c->http_url, sizeof c->http_url, strchr(local, ':') ? "http://[%s]:%d" : "http://%s:%d", local, port);
    return FL_OK;
}

/* The gateway could not start and opts.http_optional says the cluster serves without it. */
static void drop_gateway(cluster_t *c, const char *why)
{
    fl_log_warn("cluster: the HTTP gateway is left out: %s", why);
    if (c->gateway > 0) {
        kill(c->gateway, SIGKILL);
        while (waitpid(c->gateway, NULL, 0) < 0 && errno == EINTR) {
        }
    }
    c->gateway = 0; /* reaped by the caller: never restarted */
    c->http_url[0] = 0;
}

cluster_t *cluster_start(const cluster_opts_t *opts, int wait_ms, fl_error_t *err)
{
    cluster_t *c = calloc(1, sizeof *c);
    if (!c) {
        fl_fail(err, FL_ENOMEM, "cluster: out of memory");
        return NULL;
    }
    c->opts = *opts;
    c->n_groups = opts->n_groups > 0 ? opts->n_groups : 1;
    c->tp = opts->tp > 0 ? opts->tp : 1;
    c->n_workers = c->n_groups * c->tp;
    c->worker_has_restarts_flag = -1;
    c->workers = calloc((size_t)c->n_workers, sizeof *c->workers);
    c->children = calloc((size_t)c->n_workers + 2, sizeof *c->children);
    if (!c->workers || !c->children) {
        fl_fail(err, FL_ENOMEM, "cluster: out of memory");
        free(c->workers);
        free(c->children);
        free(c);
        return NULL;
    }
    snprintf(c->client_endpoint, sizeof c->client_endpoint, "%s",
             wire_endpoint(opts->client_endpoint, "FOLIO_COORDINATOR", WIRE_DEFAULT_CLIENT_ENDPOINT));
    snprintf(c->worker_endpoint, sizeof c->worker_endpoint, "%s",
             wire_endpoint(opts->worker_endpoint, "FOLIO_WORKER_ENDPOINT", WIRE_DEFAULT_WORKER_ENDPOINT));
    if (opts->bin_dir && *opts->bin_dir) {
        snprintf(c->bin_dir, sizeof c->bin_dir, "%s", opts->bin_dir);
    } else {
        char *exe = c->bin_dir;
        const ssize_t len = readlink("/proc/self/exe", exe, sizeof c->bin_dir - 1);
        if (len <= 0 || len >= (ssize_t)sizeof c->bin_dir - 1) {
            fl_fail(err, FL_EIO, "cannot find the executable's directory: /proc/self/exe: %s",
                    len < 0 ? strerror(errno) : "path too long");
            cluster_stop(&c);
            return NULL;
        }
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash)
            *slash = 0;
        else
            snprintf(c->bin_dir, sizeof c->bin_dir, ".");
    }
    static const char *const bins[] = {"folio-coordinator", "folio-worker"};
    for (int i = 0; i < 2; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", c->bin_dir, bins[i]);
        if (access(path, X_OK) != 0) {
            fl_fail(err, FL_ENOTFOUND, "%s: %s (build it, or set the binaries' directory)", path, strerror(errno));
            cluster_stop(&c);
            return NULL;
        }
    }
    const char *model = fl_model_path(opts->model);
    if (access(model, R_OK) != 0) {
        fl_fail(err, FL_ENOTFOUND, "model %s: %s", model, strerror(errno));
        cluster_stop(&c);
        return NULL;
    }
    if (opts->log_dir && *opts->log_dir && mkdir(opts->log_dir, 0755) != 0 && errno != EEXIST) {
        fl_fail(err, FL_EIO, "log directory %s: %s", opts->log_dir, strerror(errno));
        cluster_stop(&c);
        return NULL;
    }
    bool gateway = opts->http && *opts->http;
    char gw_path[PATH_MAX];
    snprintf(gw_path, sizeof gw_path, "%s/folio-gateway", c->bin_dir);
    if (gateway && access(gw_path, X_OK) != 0) {
        if (!opts->http_optional) {
            fl_fail(err, FL_ENOTFOUND, "%s: %s (build it, or leave the gateway out)", gw_path, strerror(errno));
            cluster_stop(&c);
            return NULL;
        }
        drop_gateway(c, "folio-gateway is not built");
        gateway = false;
    }
    int rc = spawn_coordinator(c, err);
    for (int i = 0; !rc && i < c->n_workers; i++) rc = spawn_worker(c, i, err);
    if (!rc && gateway) rc = spawn_gateway(c, err);
    if (!rc && wait_ms != 0) rc = cluster_wait_healthy(c, c->n_groups, wait_ms, err);
    if (!rc && gateway) {
        fl_error_t gerr = {0};
        const int grc = wait_gateway(c, wait_ms > 0 && wait_ms < 10000 ? wait_ms : 10000, &gerr);
        if (grc && opts->http_optional) {
            drop_gateway(c, gerr.msg);
        } else if (grc) {
            rc = grc;
            if (err) *err = gerr;
        }
    }
    if (rc) {
        cluster_stop(&c);
        return NULL;
    }
    fl_log_debug("cluster: up groups=%d tp=%d endpoint=%s", c->n_groups, c->tp, c->client_endpoint);
    return c;
}

/* Reaps pid if it has exited; true when it is gone. */
static bool reap(pid_t *pid, int flags)
{
    if (*pid <= 0) return true;
    int st;
    const pid_t r = waitpid(*pid, &st, flags);
    if (r == *pid || (r < 0 && errno == ECHILD)) {
        *pid = 0;
        return true;
    }
    return false;
}

void cluster_stop(cluster_t **cp)
{
    if (!cp || !*cp) return;
    cluster_t *c = *cp;
    const int n = c->workers ? c->n_workers : 0;
    /* Workers first in the same breath as the coordinator: nothing here needs an orderly drain. */
    for (int i = 0; i < n; i++)
        if (c->workers[i] > 0) kill(c->workers[i], SIGTERM);
    if (c->coordinator > 0) kill(c->coordinator, SIGTERM);
    if (c->gateway > 0) kill(c->gateway, SIGTERM);
    const double deadline = now_ms() + CLUSTER_STOP_GRACE_MS;
    for (;;) {
        bool all = reap(&c->coordinator, WNOHANG) && reap(&c->gateway, WNOHANG);
        for (int i = 0; i < n; i++) all = reap(&c->workers[i], WNOHANG) && all;
        if (all || now_ms() >= deadline) break;
        sleep_ms(20);
    }
    if (c->coordinator > 0) {
        fl_log_warn("cluster: coordinator pid=%d ignored SIGTERM for %d ms, killing it", (int)c->coordinator,
                    CLUSTER_STOP_GRACE_MS);
        kill(c->coordinator, SIGKILL);
        reap(&c->coordinator, 0);
    }
    if (c->gateway > 0) {
        fl_log_warn("cluster: gateway pid=%d ignored SIGTERM for %d ms, killing it", (int)c->gateway,
                    CLUSTER_STOP_GRACE_MS);
        kill(c->gateway, SIGKILL);
        reap(&c->gateway, 0);
    }
    for (int i = 0; i < n; i++) {
        if (c->workers[i] <= 0) continue;
        fl_log_warn("cluster: worker g%d pid=%d ignored SIGTERM for %d ms, killing it", i, (int)c->workers[i],
                    CLUSTER_STOP_GRACE_MS);
        kill(c->workers[i], SIGKILL);
        reap(&c->workers[i], 0);
    }
    free(c->workers);
    free(c->children);
    free(c);
    *cp = NULL;
}

int cluster_restart_coordinator(cluster_t *c, fl_error_t *err)
{
    if (!c) return fl_fail(err, FL_EINVAL, "cluster_restart_coordinator: NULL cluster");
    if (c->coordinator > 0) {
        kill(c->coordinator, SIGKILL);
        reap(&c->coordinator, 0);
    }
    c->children[c->n_workers].restart_at_ms = 0;
    return spawn_coordinator(c, err);
}

/* Whether `folio-worker --help` lists flag: a flag newer than the binary would stop it at start. */
static bool worker_lists_flag(const cluster_t *c, const char *flag)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/folio-worker", c->bin_dir);
    int fds[2];
    if (pipe(fds)) return false;
    fcntl(fds[0], F_SETFD, FD_CLOEXEC);
    fcntl(fds[1], F_SETFD, FD_CLOEXEC);
    fflush(NULL);
    const pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return false;
    }
    if (pid == 0) {
        const int null_fd = open("/dev/null", O_WRONLY);
        dup2(fds[1], STDOUT_FILENO);
        if (null_fd >= 0) dup2(null_fd, STDERR_FILENO);
        execl(path, path, "--help", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    char help[65536];
    size_t n = 0;
    for (;;) {
        const ssize_t got = read(fds[0], help + n, sizeof help - 1 - n);
        if (got > 0 && (n += (size_t)got) < sizeof help - 1) continue;
        if (got < 0 && errno == EINTR) continue;
        break;
    }
    help[n] = 0;
    close(fds[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    /* The flag as a word of its own: "--restarts N", not a prefix of a longer flag. */
    const size_t len = strlen(flag);
    for (const char *p = strstr(help, flag); p; p = strstr(p + 1, flag))
        if (p[len] == ' ' || p[len] == ',' || p[len] == '\n' || p[len] == '=' || !p[len]) return true;
    return false;
}

int cluster_restart_delay_ms(int prev_ms, double ran_ms)
{
    if (prev_ms <= 0 || ran_ms >= CLUSTER_RESTART_RESET_MS) return CLUSTER_RESTART_MIN_MS;
    return prev_ms >= CLUSTER_RESTART_MAX_MS / 2 ? CLUSTER_RESTART_MAX_MS : prev_ms * 2;
}

static void child_name(const cluster_t *c, int k, char *buf, size_t cap)
{
    if (k == c->n_workers + 1)
        snprintf(buf, cap, "gateway");
    else if (k == c->n_workers)
        snprintf(buf, cap, "coordinator");
    else if (c->tp > 1)
        snprintf(buf, cap, "worker g%d rank %d", k / c->tp, k % c->tp);
    else
        snprintf(buf, cap, "worker g%d", k);
}

int cluster_supervise(cluster_t *c)
{
    if (!c) return 0;
    int started = 0;
    const int last = c->opts.http && *c->opts.http ? c->n_workers + 1 : c->n_workers;
    for (int k = 0; k <= last; k++) {
        pid_t *pid = k == c->n_workers + 1 ? &c->gateway : k == c->n_workers ? &c->coordinator : &c->workers[k];
        cluster_child_t *ch = &c->children[k];
        char name[48];
        child_name(c, k, name, sizeof name);
        const double now = now_ms();
        if (*pid > 0) {
            int st = 0;
            const pid_t r = waitpid(*pid, &st, WNOHANG);
            if (r == 0 || (r < 0 && errno != ECHILD)) continue; /* running */
            const double ran = now - ch->started_ms;
            ch->delay_ms = cluster_restart_delay_ms(ch->delay_ms, ran);
            ch->restart_at_ms = now + ch->delay_ms;
            char how[64];
            if (r < 0)
                snprintf(how, sizeof how, "is gone");
            else if (WIFSIGNALED(st))
                snprintf(how, sizeof how, "was killed by signal %d", WTERMSIG(st));
            else
                snprintf(how, sizeof how, "exited with status %d", WEXITSTATUS(st));
            fl_log_error("cluster: %s (pid %d) %s after %.1f s; restarting it in %.1f s (restart %u)", name, (int)*pid,
                         how, ran / 1e3, ch->delay_ms / 1e3, ch->restarts + 1);
            *pid = 0;
        }
        if (*pid != 0 || ch->restart_at_ms <= 0 || now < ch->restart_at_ms) continue;
        if (k < c->n_workers && c->worker_has_restarts_flag < 0)
            c->worker_has_restarts_flag = worker_lists_flag(c, "--restarts");
        ch->restarts++;
        fl_error_t err = {0};
        const int rc = k == c->n_workers + 1 ? spawn_gateway(c, &err)
                       : k == c->n_workers   ? spawn_coordinator(c, &err)
                                             : spawn_worker(c, k, &err);
        if (rc) {
            ch->started_ms = now;
            ch->delay_ms = cluster_restart_delay_ms(ch->delay_ms, 0);
            ch->restart_at_ms = now + ch->delay_ms;
            fl_log_error("cluster: restarting %s: %s; trying again in %.1f s", name, err.msg, ch->delay_ms / 1e3);
            ch->restarts--;
            continue;
        }
        ch->restart_at_ms = 0;
        started++;
        fl_log_warn("cluster: %s restarted: pid %d (restart %u)", name, (int)*pid, ch->restarts);
    }
    return started;
}
