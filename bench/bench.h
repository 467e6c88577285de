/* bench.h - entry points of folio-bench's subcommands. */
#ifndef FOLIO_BENCH_H
#define FOLIO_BENCH_H

int bench_engine(int argc, char **argv);

#endif
