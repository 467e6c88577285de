/* cli_common.c - see cli_common.h. */
#include "cli_common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *cli_value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        fprintf(stderr, "error: %s needs a value\n", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

bool cli_parse_int(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "error: %s expects an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

bool cli_parse_float(const char *flag, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "error: %s expects a number in [%g, %g], got '%s'\n", flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

bool cli_parse_bytes(const char *flag, const char *s, size_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mult = 1;
    if (!strcasecmp(end, "k") || !strcasecmp(end, "kib")) mult = 1024.0;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib")) mult = 1048576.0;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib")) mult = 1073741824.0;
    else if (*end) mult = -1;
    if (errno || end == s || mult < 0 || !(v * mult >= 1) || v * mult > 1e15) {
        fprintf(stderr, "error: %s expects a size like 64MiB, got '%s'\n", flag, s);
        return false;
    }
    *out = (size_t)(v * mult);
    return true;
}

int cli_parse_engine_flag(engine_opts_t *o, int argc, char **argv, int *i)
{
    const char *f = argv[*i], *v;
    long n;
    if (!strcmp(f, "-m") || !strcmp(f, "--model")) {
        if (!(v = cli_value(argc, argv, i))) return -1;
        o->model_path = v;
    } else if (!strcmp(f, "--backend")) {
        if (!(v = cli_value(argc, argv, i))) return -1;
        if (strcmp(v, "cpu") && strcmp(v, "cuda") && strcmp(v, "auto")) {
            fprintf(stderr, "error: --backend expects cpu, cuda or auto, got '%s'\n", v);
            return -1;
        }
        o->backend = v;
    } else if (!strcmp(f, "--device")) {
        if (!(v = cli_value(argc, argv, i)) || !cli_parse_int(f, v, 0, 64, &n)) return -1;
        o->device = (int)n;
    } else if (!strcmp(f, "-t") || !strcmp(f, "--threads")) {
        if (!(v = cli_value(argc, argv, i)) || !cli_parse_int(f, v, 0, 1024, &n)) return -1;
        o->threads = (int)n;
    } else if (!strcmp(f, "--kv-budget")) {
        if (!(v = cli_value(argc, argv, i)) || !cli_parse_bytes(f, v, &o->kv_budget_bytes)) return -1;
    } else if (!strcmp(f, "--kv-fraction")) {
        if (!(v = cli_value(argc, argv, i)) || !cli_parse_float(f, v, 0.001, 0.95, &o->kv_fraction)) return -1;
    } else if (!strcmp(f, "--block-size")) {
        if (!(v = cli_value(argc, argv, i)) || !cli_parse_int(f, v, 1, 1024, &n)) return -1;
        o->block_size = (int)n;
    } else if (!strcmp(f, "--ctx")) {
        if (!(v = cli_value(argc, argv, i)) || !cli_parse_int(f, v, 16, 1 << 20, &n)) return -1;
        o->max_ctx = (int)n;
    } else {
        return 0;
    }
    return 1;
}

const char *cli_engine_flags_help(void)
{
    return "  -m, --model PATH      GGUF model (default: $FOLIO_MODEL or the model set-up fetched)\n"
           "  --backend cpu|cuda    compute backend (default: cuda where a GPU is present)\n"
           "  --device N            CUDA device\n"
           "  -t, --threads N       CPU threads (default: all cores)\n"
           "  --kv-budget BYTES     KV cache memory, e.g. 64MiB\n"
           "  --kv-fraction F       KV cache as a fraction of the free memory after the weights\n"
           "                        (default: 0.5 on CUDA; 64MiB on the CPU)\n"
           "  --block-size N        KV block size in tokens (default 16)\n"
           "  --ctx N               longest sequence (default: the model's context)\n";
}
