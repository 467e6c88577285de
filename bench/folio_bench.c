/* folio-bench - folio's benchmarks as subcommands. Each prints a human table and, with
 * --json FILE, writes its results as JSON.
 *
 *   folio-bench engine    prefill and decode throughput of the engine, side by side with llama.cpp
 *   folio-bench prefix    a local cluster under Poisson load, with and without the prefix cache
 *                         (--routing: routing policies over 4 groups with 8 shared prefixes)
 *   folio-bench route     the coordinator's own overhead, with fake instant workers
 *   folio-bench spec      speculative decoding: the cost of a verify step, and tokens/s with no
 *                         speculation, n-gram drafts and Medusa heads on two workloads
 *   folio-bench kvquant   KV cache types (f16, q8_0, q4_0): capacity, decode at long context, the
 *                         prefix workload on a tight budget
 *   folio-bench kvshare   KV block pulls between groups against recomputing the prefix */
#include <stdio.h>
#include <string.h>

#include "bench.h"

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: folio-bench <benchmark> [flags]   (folio-bench <benchmark> --help for its flags)\n"
                "benchmarks:\n"
                "  engine    prefill/decode tokens/s and memory, vs llama.cpp\n"
                "  prefix    cluster latency and throughput with and without the prefix cache;\n"
                "            --routing: prefix-cache hit rate of the routing policies over several groups\n"
                "  route     the coordinator's added latency and routed requests/s (fake workers)\n"
                "  spec      speculative decoding: verify-step cost; tokens/s, accepted tokens per step and\n"
                "            speed-up of n-gram and Medusa drafts over none; lossless check\n"
                "  kvquant   KV cache types side by side: bytes per token, capacity, decode at long context,\n"
                "            prefix workload on a tight budget\n"
                "  kvshare   KV block pulls between groups: first-token time and throughput against\n"
                "            recomputing the prefix, the pull's bandwidth\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "engine")) return bench_engine(argc - 1, argv + 1);
    if (!strcmp(argv[1], "prefix")) return bench_prefix(argc - 1, argv + 1);
    if (!strcmp(argv[1], "route")) return bench_route(argc - 1, argv + 1);
    if (!strcmp(argv[1], "spec")) return bench_spec(argc - 1, argv + 1);
    if (!strcmp(argv[1], "kvquant")) return bench_kvquant(argc - 1, argv + 1);
    if (!strcmp(argv[1], "kvshare")) return bench_kvshare(argc - 1, argv + 1);
    fprintf(stderr, "error: unknown benchmark '%s'\n", argv[1]);
    return 2;
}
