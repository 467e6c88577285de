/* bench.h - entry points of folio-bench's subcommands, and the helpers the cluster benchmarks
 * (bench_prefix.c, bench_route.c) share. */
#ifndef FOLIO_BENCH_H
#define FOLIO_BENCH_H

#include <stddef.h>

#include "cli_cluster.h"
#include "error.h"

int bench_engine(int argc, char **argv);
int bench_prefix(int argc, char **argv);
int bench_route(int argc, char **argv);

/* ---- shared by the cluster benchmarks (defined in bench_prefix.c) ---- */

double bench_now_s(void); /* CLOCK_MONOTONIC, seconds */
/* The p-th percentile (0..1, nearest rank) of v[0..n): sorts v in place; 0 when n is 0. */
double bench_percentile(double *v, int n, double p);
double bench_mean(const double *v, int n);
/* Fresh endpoints for one cluster: ipc sockets under /tmp named after the pid and a counter, so a
 * benchmark never collides with a cluster on the default ports (tests, folioctl up). */
void bench_endpoints(char client[256], char worker[256]);
/* Writes the cJSON object (a cJSON *, passed as void * to keep cJSON out of this header) to path;
 * prints the error and returns -1 on failure. */
int bench_write_json(const char *path, void *json);
/* Starts a cluster with opts (endpoints filled by bench_endpoints when NULL) and waits up to
 * wait_ms for every group; prints the error (and the log directory) on failure. */
cluster_t *bench_cluster_start(cluster_opts_t *opts, char client[256], char worker[256], int wait_ms);
/* cluster_stop, then removes the ipc socket files a killed coordinator leaves behind. */
void bench_cluster_stop(cluster_t **c);

#endif
