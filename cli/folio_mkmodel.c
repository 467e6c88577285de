/* folio_mkmodel.c - folio-mkmodel: write a random-weight GGUF model of any shape and architecture.
 *
 *   folio-mkmodel -o tiny.gguf --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 512 --type q8_0
 *   folio-mkmodel -o gemma.gguf --arch gemma2 --window 32
 *
 * Flag parsing only; the generator is common/mkmodel.c, which tests call directly. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "dtype.h"
#include "error.h"
#include "mkmodel.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folio-mkmodel -o PATH [options]\n"
            "  --arch A         llama mistral qwen2 qwen3 phi3 gemma2 gemma3 (default llama)\n"
            "  --head-dim N     attention.key_length (default dim / heads; qwen3 and gemma may differ)\n"
            "  --window N       attention.sliding_window (default none; gemma3 4096)\n"
            "  --layers N       transformer blocks (default 2)\n"
            "  --dim N          embedding length (default 64)\n"
            "  --ff N           feed-forward length (default 128)\n"
            "  --heads N        attention heads (default 4)\n"
            "  --kv-heads N     key/value heads (default 2)\n"
            "  --vocab N        vocabulary size, >= 259 (default 512)\n"
            "  --type T         matrix type: f32 f16 bf16 q4_0 q4_1 q8_0 (default f32)\n"
            "  --tied           no output.weight; the token embedding is the output matrix\n"
            "  --ctx N          context length (default 256)\n"
            "  --rope-theta F   RoPE base frequency (default 10000)\n"
            "  --eps F          RMS norm epsilon (default 1e-5)\n"
            "  --seed N         random seed (default 1)\n"
            "  --threads N      tensors written at once (default: the cores, at most 16; same bytes)\n"
            "  --name S         general.name\n");
}

static int parse_int(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "folio-mkmodel: %s wants an integer in %ld..%ld, got '%s'\n", flag, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_type(const char *s)
{
    static const struct { const char *name; int type; } types[] = {
        {"f32", FL_TYPE_F32}, {"f16", FL_TYPE_F16}, {"bf16", FL_TYPE_BF16},
        {"q4_0", FL_TYPE_Q4_0}, {"q4_1", FL_TYPE_Q4_1}, {"q8_0", FL_TYPE_Q8_0},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (strcasecmp(s, types[i].name) == 0) return types[i].type;
    return -1;
}

int main(int argc, char **argv)
{
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--tied") == 0) {
            p.tied = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "folio-mkmodel: unknown flag or missing value: %s\n", a);
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        long n = 0;
        int bad = 0;
        if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) out = v;
        else if (strcmp(a, "--layers") == 0) bad = parse_int(a, v, 1, 4096, &n), p.n_layers = (int)n;
        else if (strcmp(a, "--dim") == 0) bad = parse_int(a, v, 1, 1 << 20, &n), p.dim = (int)n;
        else if (strcmp(a, "--ff") == 0) bad = parse_int(a, v, 1, 1 << 20, &n), p.ff = (int)n;
        else if (strcmp(a, "--heads") == 0) bad = parse_int(a, v, 1, 1 << 16, &n), p.n_heads = (int)n;
        else if (strcmp(a, "--kv-heads") == 0) bad = parse_int(a, v, 1, 1 << 16, &n), p.n_kv_heads = (int)n;
        else if (strcmp(a, "--vocab") == 0) bad = parse_int(a, v, 259, 1 << 24, &n), p.vocab = (int)n;
        else if (strcmp(a, "--ctx") == 0) bad = parse_int(a, v, 1, 1 << 30, &n), p.ctx = (int)n;
        else if (strcmp(a, "--threads") == 0) bad = parse_int(a, v, 1, 1024, &n), p.threads = (int)n;
        else if (strcmp(a, "--head-dim") == 0) bad = parse_int(a, v, 2, 4096, &n), p.head_dim = (int)n;
        else if (strcmp(a, "--window") == 0) bad = parse_int(a, v, 1, 1 << 24, &n), p.sliding_window = (int)n;
        else if (strcmp(a, "--arch") == 0) {
            p.arch = v;
            bad = !mkmodel_arch_known(v);
            if (bad) fprintf(stderr, "folio-mkmodel: unknown --arch '%s' (llama mistral qwen2 qwen3 phi3 gemma2 gemma3)\n", v);
        }
        else if (strcmp(a, "--seed") == 0) {
            char *end;
            errno = 0;
            p.seed = strtoull(v, &end, 10);
            bad = errno || *end || end == v;
            if (bad) fprintf(stderr, "folio-mkmodel: --seed wants an integer, got '%s'\n", v);
        } else if (strcmp(a, "--rope-theta") == 0 || strcmp(a, "--eps") == 0) {
            char *end;
            const float f = strtof(v, &end);
            bad = *end || end == v || !(f > 0);
            if (bad) fprintf(stderr, "folio-mkmodel: %s wants a positive number, got '%s'\n", a, v);
            if (a[2] == 'r') p.rope_theta = f;
            else p.eps = f;
        } else if (strcmp(a, "--type") == 0) {
            p.type = parse_type(v);
            bad = p.type < 0;
            if (bad) fprintf(stderr, "folio-mkmodel: unknown --type '%s' (f32 f16 bf16 q4_0 q4_1 q8_0)\n", v);
        } else if (strcmp(a, "--name") == 0) p.name = v;
        else {
            fprintf(stderr, "folio-mkmodel: unknown flag %s\n", a);
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (!out) {
        fprintf(stderr, "folio-mkmodel: -o PATH is required\n");
        usage(stderr);
        return 2;
    }
    fl_error_t err = {0};
    const double t0 = fl_clock_s();
    if (mkmodel_write(&p, out, &err) != 0) {
        fprintf(stderr, "folio-mkmodel: %s\n", err.msg);
        return 1;
    }
    fprintf(stderr, "folio-mkmodel: wrote %s (arch=%s layers=%d dim=%d ff=%d heads=%d kv_heads=%d vocab=%d type=%s%s) in %.1f s\n",
            out, p.arch ? p.arch : "llama", p.n_layers, p.dim, p.ff, p.n_heads, p.n_kv_heads, p.vocab, fl_dtype_name(p.type), p.tied ? " tied" : "",
            fl_clock_s() - t0);
    return 0;
}
