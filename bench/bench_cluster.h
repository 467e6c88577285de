/* bench_cluster.h - what the cluster benchmarks (bench_prefix.c, bench_route.c) share: a local
 * cluster on endpoints of its own with a client connected to it, the default log directory, and
 * the figures and JSON helpers. */
#ifndef FOLIO_BENCH_CLUSTER_H
#define FOLIO_BENCH_CLUSTER_H

#include <stddef.h>
#include <stdint.h>

#include "cli_cluster.h"
#include "folio_client.h"

/* The p-th percentile (0..1, nearest rank) of v[0..n): sorts v in place; 0 when n is 0. */
double bench_percentile(double *v, int n, double p);
double bench_mean(const double *v, int n);
/* Writes the cJSON object (a cJSON *, passed as void * to keep cJSON out of this header) to path;
 * prints the error and returns -1 on failure. */
int bench_write_json(const char *path, void *json);
/* Writes json to json_path (when not NULL) and draws it as a PNG at png_path (when not NULL)
 * with bench/plot.py; -1, with the reason printed, when either fails. */
int bench_write_outputs(const char *json_path, const char *png_path, void *json);
/* given, else "/tmp/folio-bench-PID" (written into buf). */
const char *bench_log_dir(const char *given, char *buf, size_t cap);

/* What the cluster benchmarks read from a model's GGUF: its vocabulary size (prompt tokens are drawn
 * below it) and its KV bytes per token in f16. -1, with the reason printed, when unreadable. */
typedef struct bench_model_facts {
    int32_t n_vocab;
    size_t kv_bytes_per_token;
} bench_model_facts_t;
int bench_model_facts(const char *path, bench_model_facts_t *mf);

typedef struct bench_cluster {
    cluster_t *cluster;
    folio_client_t *client;
    char client_endpoint[256], worker_endpoint[256]; /* when opts named none; borrowed by cluster */
} bench_cluster_t;

/* Starts a cluster with opts and waits up to wait_ms for every group, then connects a client.
 * Without endpoints in opts it gets fresh ipc sockets under /tmp named after the pid and a counter,
 * so a benchmark never collides with a cluster on the default ports (tests, folioctl up). Prints
 * why and returns -1, with nothing left running, on failure. bc must outlive the cluster. */
int bench_cluster_open(bench_cluster_t *bc, cluster_opts_t *opts, int wait_ms);
/* Destroys the client, stops the cluster and removes the ipc socket files a killed coordinator
 * leaves behind. Accepts a bench_cluster_t that failed to open. */
void bench_cluster_close(bench_cluster_t *bc);

#endif
