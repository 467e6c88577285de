/* bench.h - entry points of folio-bench's subcommands. The helpers the cluster benchmarks share
 * are in bench_cluster.h. */
#ifndef FOLIO_BENCH_H
#define FOLIO_BENCH_H

int bench_engine(int argc, char **argv);
int bench_prefix(int argc, char **argv);
int bench_route(int argc, char **argv);
int bench_spec(int argc, char **argv);
int bench_kvquant(int argc, char **argv);
int bench_kvshare(int argc, char **argv);

#endif
