/* folio-bench - folio's benchmarks as subcommands. Each prints a human table and, with
 * --json FILE, writes its results as JSON.
 *
 *   folio-bench engine    prefill and decode throughput of the engine, side by side with llama.cpp */
#include <stdio.h>
#include <string.h>

#include "bench.h"

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fprintf(argc < 2 ? stderr : stdout, "usage: folio-bench <benchmark> [flags]\n"
                                            "benchmarks:\n"
                                            "  engine    prefill/decode tokens/s and memory, vs llama.cpp\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "engine")) return bench_engine(argc - 1, argv + 1);
    fprintf(stderr, "error: unknown benchmark '%s'\n", argv[1]);
    return 2;
}
