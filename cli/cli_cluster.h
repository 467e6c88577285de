/* cli_cluster.h - start and stop a local folio cluster (one coordinator, N worker groups) as child
 * processes. `folioctl up`, `folio-bench prefix` and the end-to-end tests all start clusters this
 * one way.
 *
 * The binaries are found next to the calling executable (/proc/self/exe's directory), else in
 * opts.bin_dir. cluster_start() returns once the coordinator reports every group healthy (Health
 * through the client library) or fails after wait_ms, stopping what it started.
 *
 * With opts.http the cluster also runs folio-gateway, the OpenAI-compatible HTTP API, on that
 * address; cluster_start() then also waits until it accepts connections.
 *
 * Children get SIGTERM when their parent dies (PR_SET_PDEATHSIG), so tests never leak processes;
 * Linux sends it when the *thread* that forked them ends, so start and restart a cluster from a
 * thread that outlives it (the main thread).
 *
 * cluster_supervise() is `folioctl up`'s supervisor: called every so often, it starts again each
 * child that has exited, after a delay that grows while the child keeps dying soon after its start
 * (CLUSTER_RESTART_MIN_MS doubling to CLUSTER_RESTART_MAX_MS; back to the minimum once a child has
 * run CLUSTER_RESTART_RESET_MS). Callers that do not supervise (tests, benchmarks) never restart
 * anything: a child they kill stays dead. */
#ifndef FOLIO_CLI_CLUSTER_H
#define FOLIO_CLI_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "error.h"

typedef struct cluster_opts {
    const char *bin_dir;          /* NULL: the directory of the running executable */
    const char *model;            /* NULL: the default model */
    int n_groups;                 /* worker groups (0 = 1) */
    int tp;                       /* ranks per group, one worker process each (0 = 1) */
    int threads_per_worker;       /* per process; 0: online cores / processes, at least 1 */
    const char *client_endpoint;  /* NULL: $FOLIO_COORDINATOR or tcp://127.0.0.1:5555 */
    const char *worker_endpoint;  /* NULL: $FOLIO_WORKER_ENDPOINT or tcp://127.0.0.1:5556 */
    const char *policy;           /* coordinator routing policy; NULL: its default */
    size_t kv_budget_bytes;       /* per worker; 0: the worker's default */
    int block_size;               /* 0: default */
    int kv_type_k, kv_type_v;     /* workers' --kv-type-k/-v (KV types, kernels.h); 0: their default */
    int max_batch_tokens;         /* 0: default */
    bool no_prefix_cache;
    int heartbeat_ms;             /* 0: default (1000) */
    const char *spec;             /* workers' --spec (auto|none|ngram|medusa); NULL: their default */
    const char *spec_tree;        /* workers' --spec-tree; NULL: their default */
    const char *heads;            /* workers' --heads FILE (Medusa heads); NULL: their default */
    const char *const *coordinator_args; /* extra arguments, NULL-terminated list or NULL */
    const char *const *worker_args;
    const char *log_dir;          /* each process's stderr to LOG_DIR/<name>.log; NULL: inherit */
    const char *http;             /* folio-gateway --http [ADDR:]PORT; NULL: no gateway */
    bool http_optional;           /* a gateway that cannot start (the port taken) is left out with a
                                   * warning instead of failing cluster_start */
    bool progress;                /* while waiting for the groups, a line on stderr whenever their
                                   * count changes and every few seconds (folioctl up) */
} cluster_opts_t;

#define CLUSTER_RESTART_MIN_MS   500
#define CLUSTER_RESTART_MAX_MS   30000
#define CLUSTER_RESTART_RESET_MS 30000

/* What the supervisor knows of one child process. */
typedef struct cluster_child {
    unsigned restarts;            /* times the supervisor started it again */
    double started_ms;            /* when it was last started (fl_clock_s() x 1000) */
    double restart_at_ms;         /* > 0: it has exited and starts again at this time */
    int delay_ms;                 /* the delay before its last restart (0: none yet) */
} cluster_child_t;

typedef struct cluster {
    cluster_opts_t opts;          /* copy; strings borrowed from the caller */
    char client_endpoint[256], worker_endpoint[256];
    char bin_dir[1024];
    pid_t coordinator;            /* 0: not running */
    int n_groups, tp;
    int n_workers;                /* worker processes: n_groups x tp */
    pid_t *workers;               /* [n_workers]; worker k is rank k % tp of group "g<k / tp>"; 0: not
                                     running */
    pid_t gateway;                /* 0: not running (or none) */
    char http_url[300];           /* the gateway's URL ("http://127.0.0.1:8080"); "" when none runs */
    cluster_child_t *children;    /* [n_workers + 2]: the workers', the coordinator's, the gateway's */
    int worker_has_restarts_flag; /* -1: not asked yet; else whether folio-worker takes --restarts */
} cluster_t;

cluster_t *cluster_start(const cluster_opts_t *opts, int wait_ms, fl_error_t *err);
/* SIGTERM to every process, SIGKILL after a grace period; reaps them. Accepts NULL. */
void cluster_stop(cluster_t **cp);
/* Kills (SIGKILL) and starts the coordinator again with the same flags; workers re-register. */
int cluster_restart_coordinator(cluster_t *c, fl_error_t *err);
/* Waits until the coordinator reports n healthy groups (or fails after wait_ms). */
int cluster_wait_healthy(cluster_t *c, int n, int wait_ms, fl_error_t *err);

/* One pass of the supervisor: reaps every child that has exited, logs how it ended and when it
 * starts again, and starts again those whose delay has passed. A worker started again gets
 * `--restarts N` (reported in its WorkerHello) when its binary lists that flag in --help. A child
 * the caller reaped itself (pid set to 0) is not restarted. Returns how many children it started. */
int cluster_supervise(cluster_t *c);
/* The delay before restarting a child that ran ran_ms after its start; prev_ms is the delay before
 * its previous restart (0: none). */
int cluster_restart_delay_ms(int prev_ms, double ran_ms);

#endif
