/* bench_engine.c - `folio-bench engine`: prefill tokens/s (one prompt of --prompt-tokens), decode
 * tokens/s at each --batches size, and peak resident memory, for folio and, side by side in the
 * same run on the same GGUF and thread count, for llama.cpp (bench/llamacpp_bench.py through
 * llama-cpp-python's low-level API, set up by tools/llamacpp_env.sh on first use).
 *
 * Method: prompts are fixed pseudo-random token ids; each figure is the best of --repeat runs
 * after one warm-up (machines here are noisy, the best run is the least disturbed). Decode rate
 * counts only steps that carried no prompt tokens. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bench.h"
#include "bench_cluster.h"
#include "flags.h"
#include "engine.h"

#define MAX_BATCHES 16
#define DECODE_PROMPT_TOKENS 16 /* default prompt length of each sequence in the decode runs */

typedef struct engine_figures {
    double prefill_tok_s;
    int n_batches;
    int batch[MAX_BATCHES];
    double decode_tok_s[MAX_BATCHES];
    double peak_rss_mib;
    bool ok;
} engine_figures_t;

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static void fill_prompt(int32_t *p, int n, int vocab, uint32_t seed)
{
    /* Skip the lowest ids, which hold special tokens in most vocabularies (if there are more). */
    const int first = vocab > 512 ? 256 : 0;
    for (int i = 0; i < n; i++) p[i] = first + (int32_t)(lcg(&seed) % (uint32_t)(vocab - first));
}

static double peak_rss_mib(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;
}

/* One extra, untimed run with per-op profiling on; prints where a step's time goes. */
static void print_profile(model_t *m, const char *what, const gen_stats_t *st)
{
    double total = 0;
    for (int i = 0; i < MODEL_PROF_COUNT; i++) total += m->prof_s[i];
    printf("profile: %s (%d steps, %.2f ms/step)\n", what, st->steps, st->steps ? total * 1e3 / st->steps : 0);
    for (int i = 0; i < MODEL_PROF_COUNT; i++)
        if (m->prof_s[i] > 0)
            printf("  %-16s %8.3f ms/step %5.1f%%\n", model_prof_name(i), m->prof_s[i] * 1e3 / st->steps,
                   100 * m->prof_s[i] / total);
}

static int profile_run(model_t *m, kv_cache_t *kv, gen_request_t *reqs, int n, const char *what)
{
    fl_error_t err = {0};
    gen_stats_t st = {0};
    memset(m->prof_s, 0, sizeof m->prof_s);
    model_set_profile(m, true);
    int rc = gen_run(m, kv, reqs, n, NULL, NULL, &st, &err);
    model_set_profile(m, false);
    if (rc) fprintf(stderr, "error: %s\n", err.msg);
    else print_profile(m, what, &st);
    return rc;
}

static bool g_profile;

/* A request that ended in error (prompt over --ctx, KV budget exhausted) would make the figure
 * meaningless: report it instead of timing it. */
static bool request_failed(const gen_request_t *reqs, int n, fl_error_t *err)
{
    for (int i = 0; i < n; i++)
        if (reqs[i].finish == GEN_FINISH_ERROR) {
            fl_fail(err, FL_ERANGE, "bench: request %d failed: %s", i, reqs[i].error);
            return true;
        }
    return false;
}

static int run_folio(engine_t *e, int prompt_tokens, int decode_prompt, int decode_tokens, const int *batches,
                     int n_batches, int repeat, engine_figures_t *fig)
{
    model_t *m = e->model;
    const int vocab = m->cfg.n_vocab;
    fl_error_t err = {0};
    int max_batch = 1;
    for (int i = 0; i < n_batches; i++) max_batch = batches[i] > max_batch ? batches[i] : max_batch;
    int32_t *prompts = malloc((size_t)(prompt_tokens + max_batch * decode_prompt) * sizeof(int32_t));
    int32_t *outs = malloc((size_t)max_batch * (size_t)(decode_tokens + 1) * sizeof(int32_t));
    gen_request_t *reqs = calloc((size_t)max_batch, sizeof *reqs);
    if (!prompts || !outs || !reqs) {
        fl_fail(&err, FL_ENOMEM, "bench: out of memory");
        goto fail;
    }

    /* Prefill: one prompt, one generated token. */
    fill_prompt(prompts, prompt_tokens, vocab, 1234);
    double best = 0;
    for (int r = 0; r <= repeat; r++) {
        gen_request_t q = {.req.prompt = prompts, .req.n_prompt = prompt_tokens, .req.max_tokens = 1, .req.ignore_eog = true,
                           .tokens = outs};
        gen_stats_t st = {0};
        if (gen_run(m, e->kv, &q, 1, NULL, NULL, &st, &err) || request_failed(&q, 1, &err)) goto fail;
        const double rate = st.prompt_tokens / st.prefill_s;
        if (r > 0 && rate > best) best = rate; /* r == 0 is the warm-up */
    }
    fig->prefill_tok_s = best;
    if (g_profile) {
        gen_request_t q = {.req.prompt = prompts, .req.n_prompt = prompt_tokens, .req.max_tokens = 1, .req.ignore_eog = true,
                           .tokens = outs};
        char what[64];
        snprintf(what, sizeof what, "prefill of %d tokens", prompt_tokens);
        profile_run(m, e->kv, &q, 1, what);
    }

    for (int bi = 0; bi < n_batches; bi++) {
        const int B = batches[bi];
        best = 0;
        for (int r = 0; r <= repeat; r++) {
            for (int i = 0; i < B; i++) {
                fill_prompt(prompts + (size_t)i * decode_prompt, decode_prompt, vocab, 99 + (uint32_t)i);
                reqs[i] = (gen_request_t){.req.prompt = prompts + (size_t)i * decode_prompt, .req.n_prompt = decode_prompt,
                                          .req.max_tokens = decode_tokens, .req.ignore_eog = true,
                                          .req.spec = SCHED_SPEC_NONE, /* plain decode steps: folio-bench spec
                                                                          measures speculation */
                                          .tokens = outs + (size_t)i * decode_tokens};
            }
            gen_stats_t st = {0};
            if (gen_run(m, e->kv, reqs, B, NULL, NULL, &st, &err) || request_failed(reqs, B, &err)) goto fail;
            const double rate = st.decode_step_tokens / st.decode_s;
            if (r > 0 && rate > best) best = rate;
        }
        fig->batch[bi] = B;
        fig->decode_tok_s[bi] = best;
        if (g_profile) {
            char what[64];
            snprintf(what, sizeof what, "decode batch %d (prompt steps included)", B);
            profile_run(m, e->kv, reqs, B, what);
        }
    }
    fig->n_batches = n_batches;
    fig->peak_rss_mib = peak_rss_mib();
    fig->ok = true;
    free(prompts);
    free(outs);
    free(reqs);
    return 0;
fail:
    fprintf(stderr, "error: %s\n", err.msg);
    free(prompts);
    free(outs);
    free(reqs);
    return -1;
}

/* Runs the llama.cpp side in a child process and parses the JSON it prints last. */
static int run_llamacpp(const char *model, int threads, int prompt_tokens, int decode_tokens, const char *batches,
                        int repeat, engine_figures_t *fig)
{
    const char *src = getenv("FOLIO_SOURCE_DIR");
    char root[1024];
    if (src) snprintf(root, sizeof root, "%s", src);
    else snprintf(root, sizeof root, "%s", FOLIO_SOURCE_DIR_DEFAULT);
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "py=$(bash '%s/tools/llamacpp_env.sh') && \"$py\" '%s/bench/llamacpp_bench.py' --model '%s' "
             "--threads %d --prompt-tokens %d --decode-tokens %d --batches %s --repeat %d --json",
             root, root, model, threads, prompt_tokens, decode_tokens, batches, repeat);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    char line[65536], last[65536] = "";
    while (fgets(line, sizeof line, p))
        if (line[0] == '{') snprintf(last, sizeof last, "%s", line);
    int status = pclose(p);
    cJSON *o = cJSON_Parse(last);
    if (status != 0 || !o) {
        fprintf(stderr, "warning: llama.cpp side failed (status %d); see its output above\n", status);
        cJSON_Delete(o);
        return -1;
    }
    cJSON *pf = cJSON_GetObjectItem(o, "prefill_tok_s"), *rss = cJSON_GetObjectItem(o, "peak_rss_mib");
    fig->prefill_tok_s = cJSON_IsNumber(pf) ? pf->valuedouble : 0;
    fig->peak_rss_mib = cJSON_IsNumber(rss) ? rss->valuedouble : 0;
    cJSON *d = cJSON_GetObjectItem(o, "decode"), *it;
    fig->n_batches = 0;
    cJSON_ArrayForEach(it, d)
    {
        if (fig->n_batches == MAX_BATCHES) break;
        cJSON *b = cJSON_GetObjectItem(it, "batch"), *t = cJSON_GetObjectItem(it, "tok_s");
        if (!cJSON_IsNumber(b) || !cJSON_IsNumber(t)) continue;
        fig->batch[fig->n_batches] = b->valueint;
        fig->decode_tok_s[fig->n_batches++] = t->valuedouble;
    }
    fig->ok = true;
    cJSON_Delete(o);
    return 0;
}

/* The memory-bandwidth roofline of a batch-1 decode step on the CUDA backend: every matrix is read
 * once per step as fp16 (the backend dequantizes at load), plus the sequence's KV cache (f16). The
 * token embedding is only gathered, except when it doubles as the output matrix. */
typedef struct roofline {
    double copy_bytes_per_s;    /* measured device-to-device copy bandwidth */
    double weight_bytes, kv_bytes_per_step;
    double fraction_b1;         /* (weight + KV bytes) / step time / copy bandwidth */
    bool ok;
} roofline_t;

static void measure_roofline(const engine_t *e, int device, int decode_prompt, int decode_tokens, double b1_tok_s,
                             roofline_t *r)
{
    const model_config_t *c = &e->model->cfg;
    const double q = (double)c->n_heads * c->head_dim, kv = (double)c->n_kv_heads * c->head_dim;
    const double per_layer = c->dim * (q + 2 * kv) + q * c->dim + 3.0 * c->dim * c->n_ff;
    r->weight_bytes = 2.0 * (c->n_layers * per_layer + (double)c->n_vocab * c->dim);
    /* Mean context over the timed steps: the prompt plus half the generated tokens. */
    const double ctx = decode_prompt + decode_tokens / 2.0;
    r->kv_bytes_per_step = ctx * 2.0 * c->n_layers * kv * 2.0;
    fl_error_t err = {0};
    if (kern_cuda_copy_bandwidth(device, (size_t)1 << 30, &r->copy_bytes_per_s, &err)) {
        fprintf(stderr, "warning: no roofline: %s\n", err.msg);
        return;
    }
    if (b1_tok_s > 0 && r->copy_bytes_per_s > 0)
        r->fraction_b1 = (r->weight_bytes + r->kv_bytes_per_step) * b1_tok_s / r->copy_bytes_per_s;
    r->ok = true;
}

static double decode_at(const engine_figures_t *f, int batch)
{
    for (int i = 0; i < f->n_batches; i++)
        if (f->batch[i] == batch) return f->decode_tok_s[i];
    return 0;
}

static cJSON *figures_json(const char *impl, const engine_figures_t *f)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "impl", impl);
    cJSON_AddNumberToObject(o, "prefill_tok_s", f->prefill_tok_s);
    cJSON *d = cJSON_AddArrayToObject(o, "decode");
    for (int i = 0; i < f->n_batches; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "batch", f->batch[i]);
        cJSON_AddNumberToObject(e, "tok_s", f->decode_tok_s[i]);
        cJSON_AddItemToArray(d, e);
    }
    cJSON_AddNumberToObject(o, "peak_rss_mib", f->peak_rss_mib);
    return o;
}

int bench_engine(int argc, char **argv)
{
    engine_opts_t eo = {0};
    long prompt_tokens = 512, decode_tokens = 64, decode_context = DECODE_PROMPT_TOKENS, repeat = 3;
    const char *batches_s = "1,8,32", *json_path = NULL, *png_path = NULL;
    bool with_llamacpp = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = engine_parse_flag(&eo, argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(a, "--prompt-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 16, &prompt_tokens)) return 2;
        } else if (!strcmp(a, "--decode-context")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 20, &decode_context)) return 2;
        } else if (!strcmp(a, "--decode-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 2, 1 << 16, &decode_tokens)) return 2;
        } else if (!strcmp(a, "--repeat")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 100, &repeat)) return 2;
        } else if (!strcmp(a, "--batches")) {
            if (!(batches_s = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--json")) {
            if (!(json_path = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--png")) {
            if (!(png_path = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--profile")) {
            g_profile = true;
        } else if (!strcmp(a, "--no-llamacpp")) {
            with_llamacpp = false;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: folio-bench engine [flags]\n"
                   "  --prompt-tokens N   prefill prompt length (default 512)\n"
                   "  --decode-tokens N   tokens per sequence in decode runs (default 64)\n"
                   "  --decode-context N  prompt tokens of each sequence before its decode run (default 16;\n"
                   "                      long contexts measure attention; folio only)\n"
                   "  --batches LIST      decode batch sizes (default 1,8,32)\n"
                   "  --repeat N          measured runs per figure after a warm-up; best is kept (default 3)\n"
                   "  --no-llamacpp       skip the llama.cpp side\n"
                   "  --profile           after the timed runs, one profiled run per figure: time per op\n"
                   "  --json FILE         write the figures as JSON\n"
                   "  --png FILE          plot decode tokens/s against batch size, folio beside llama.cpp\n%s",
                   engine_flags_help());
            return 0;
        } else {
            fprintf(stderr, "error: unknown flag '%s'\n", a);
            return 2;
        }
    }
    int batches[MAX_BATCHES], n_batches = 0;
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s", batches_s);
    for (char *save = NULL, *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        long b;
        if (n_batches == MAX_BATCHES || !fl_flag_int("--batches", t, 1, 256, &b)) return 2;
        batches[n_batches++] = (int)b;
    }
    int max_batch = 1;
    for (int i = 0; i < n_batches; i++) max_batch = batches[i] > max_batch ? batches[i] : max_batch;
    if (!eo.max_seqs) eo.max_seqs = max_batch;
    if (decode_context != DECODE_PROMPT_TOKENS && with_llamacpp) {
        fprintf(stderr, "error: --decode-context needs --no-llamacpp (the llama.cpp side decodes after %d prompt "
                        "tokens)\n", DECODE_PROMPT_TOKENS);
        return 2;
    }
    const long decode_len = decode_context + decode_tokens;
    if (!eo.max_ctx) eo.max_ctx = (int)(prompt_tokens > decode_len ? prompt_tokens : decode_len) + 16;
    if (!eo.max_batch_tokens) eo.max_batch_tokens = (int)prompt_tokens;
    const int threads = eo.threads > 0 ? eo.threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    eo.threads = threads;

    fl_error_t err = {0};
    engine_t *e = engine_new(&eo, &err);
    if (!e) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    char model_path[1024]; /* copied: the engine (and its path string) is gone before the report */
    snprintf(model_path, sizeof model_path, "%s", gguf_path(e->model->gguf));
    engine_figures_t folio = {0}, llama = {0};
    fprintf(stderr, "bench engine: folio (%d threads) ...\n", threads);
    int rc = run_folio(e, (int)prompt_tokens, (int)decode_context, (int)decode_tokens, batches, n_batches, (int)repeat,
                       &folio);
    roofline_t roof = {0};
    char backend_name[32];
    snprintf(backend_name, sizeof backend_name, "%s", kern_backend_name(e->be));
    if (!rc && !strcmp(backend_name, "cuda"))
        measure_roofline(e, eo.device, (int)decode_context, (int)decode_tokens, decode_at(&folio, 1), &roof);
    engine_destroy(&e);
    if (rc) return 1;
    if (with_llamacpp) {
        fprintf(stderr, "bench engine: llama.cpp (%d threads) ...\n", threads);
        run_llamacpp(model_path, threads, (int)prompt_tokens, (int)decode_tokens, batches_s, (int)repeat, &llama);
    }

    printf("folio-bench engine  model=%s backend=%s threads=%d prompt=%ld decode=%ld\n", model_path, backend_name,
           threads, prompt_tokens, decode_tokens);
    printf("%-22s %12s %12s %8s\n", "figure", "folio", "llama.cpp", "ratio");
    const double lp = llama.ok ? llama.prefill_tok_s : 0;
    printf("%-22s %12.1f %12.1f %8.2f\n", "prefill tok/s", folio.prefill_tok_s, lp, lp > 0 ? folio.prefill_tok_s / lp : 0);
    for (int i = 0; i < n_batches; i++) {
        char name[64];
        snprintf(name, sizeof name, "decode b=%d tok/s", batches[i]);
        const double l = llama.ok ? decode_at(&llama, batches[i]) : 0;
        printf("%-22s %12.1f %12.1f %8.2f\n", name, folio.decode_tok_s[i], l, l > 0 ? folio.decode_tok_s[i] / l : 0);
    }
    printf("%-22s %12.1f %12.1f\n", "peak RSS MiB", folio.peak_rss_mib, llama.ok ? llama.peak_rss_mib : 0);
    const double b1 = decode_at(&folio, 1), bmax = decode_at(&folio, max_batch);
    if (b1 > 0 && max_batch > 1) printf("folio decode b=%d / b=1: %.2f\n", max_batch, bmax / b1);
    const double b64 = decode_at(&folio, 64);
    if (b1 > 0 && b64 > 0) printf("folio decode b=64 / b=1: %.2f\n", b64 / b1);
    if (roof.ok)
        printf("roofline b=1: %.1f MB weights + %.2f MB KV per step at %.2f ms/step over %.0f GB/s copy bandwidth: %.1f%%\n",
               roof.weight_bytes / 1e6, roof.kv_bytes_per_step / 1e6, b1 > 0 ? 1e3 / b1 : 0, roof.copy_bytes_per_s / 1e9,
               100 * roof.fraction_b1);

    if (json_path || png_path) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "benchmark", "engine");
        cJSON_AddStringToObject(o, "model", model_path);
        cJSON_AddStringToObject(o, "backend", backend_name);
        cJSON_AddNumberToObject(o, "threads", threads);
        cJSON_AddNumberToObject(o, "prompt_tokens", (double)prompt_tokens);
        cJSON_AddNumberToObject(o, "decode_tokens", (double)decode_tokens);
        cJSON_AddNumberToObject(o, "decode_context", (double)decode_context);
        cJSON_AddItemToObject(o, "folio", figures_json("folio", &folio));
        if (llama.ok) cJSON_AddItemToObject(o, "llama_cpp", figures_json("llama.cpp", &llama));
        if (roof.ok) {
            cJSON *r = cJSON_AddObjectToObject(o, "roofline_b1");
            cJSON_AddNumberToObject(r, "copy_bandwidth_gb_s", roof.copy_bytes_per_s / 1e9);
            cJSON_AddNumberToObject(r, "weight_bytes", roof.weight_bytes);
            cJSON_AddNumberToObject(r, "kv_bytes_per_step", roof.kv_bytes_per_step);
            cJSON_AddNumberToObject(r, "fraction", roof.fraction_b1);
        }
        const int wr = bench_write_outputs(json_path, png_path, o);
        cJSON_Delete(o);
        if (wr) return 1;
    }
    return 0;
}
