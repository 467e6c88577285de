/* bench_kvquant.c - `folio-bench kvquant`: what a quantized KV cache (--kv-type q8_0, q4_0) buys
 * against f16, side by side in one run on one model, per type:
 *   - KV bytes per token (2 x layers x kv_heads x head_dim x bytes per element; 34/32 for Q8_0,
 *     18/32 for Q4_0) and the tokens a --budget (64 MiB) holds;
 *   - decode tokens/s at each --batches size with --ctx-tokens (2,048) of context per sequence: the
 *     contexts are written straight into the cache (random K/V rows through the KV store, no
 *     prefill), then --steps decode steps are timed (the best of --repeat runs);
 *   - the prefix workload of `folio-bench prefix` (--prefix-tokens shared, --input-tokens distinct,
 *     --output-tokens generated, ignore_eos) past saturation: --requests requests all queued at once
 *     on the in-process scheduler with the prefix cache on, under a tight budget sized to hold
 *     --fit-f16 sequences in f16 (default 4) as the prefix cache holds them: the shared prefix's
 *     full blocks once and each sequence's own blocks (the first versions counted whole sequences,
 *     so f16 ran 10 at once, not 4, and the budget bound nothing); requests/s and mean first-token
 *     time.
 * Each type is a fresh engine (the same model, threads and budgets). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "clock.h"
#include "engine.h"
#include "flags.h"

#define KVQ_MAX_BATCHES 8

typedef struct kvq_flags {
    engine_opts_t eo;
    size_t budget;
    long ctx_tokens, steps, repeat, requests, prefix_tokens, input_tokens, output_tokens, fit_f16;
    int batches[KVQ_MAX_BATCHES], n_batches;
    const char *types;
    const char *json;
} kvq_flags_t;

typedef struct kvq_result {
    char type[16];
    size_t bytes_per_token;
    long capacity_tokens;
    double decode_tok_s[KVQ_MAX_BATCHES];
    size_t tight_budget;
    double req_per_s, mean_ttft_s, wall_s;
    uint64_t preemptions, cached_tokens, steps;
    double tokens_per_step; /* prompt and generated tokens over steps: what the budget lets batch */
    int ok_requests;
} kvq_result_t;

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static engine_t *open_engine(const kvq_flags_t *f, int type, size_t budget, fl_error_t *err)
{
    engine_opts_t o = f->eo;
    o.kv_type_k = o.kv_type_v = type;
    o.kv_budget_bytes = budget;
    o.heads_path = "none";
    return engine_new(&o, err);
}

/* Decode tokens/s at `batch` sequences of ctx_tokens context each, the contexts written into the
 * cache directly. */
static int decode_rate(const kvq_flags_t *f, int type, int batch, double *tok_s, fl_error_t *err)
{
    const int ctx = (int)f->ctx_tokens, steps = (int)f->steps;
    engine_t *probe = open_engine(f, type, (size_t)1 << 20, err);
    if (!probe) return -1;
    const size_t per_token = probe->kv->bytes_per_token;
    const int bs = probe->kv->block_size;
    engine_destroy(&probe);
    const int blocks_per_seq = (ctx + steps + 1 + bs - 1) / bs + 1;
    const size_t budget = (size_t)batch * blocks_per_seq * bs * per_token + (size_t)4 * bs * per_token;
    engine_opts_t o = f->eo;
    o.kv_type_k = o.kv_type_v = type;
    o.kv_budget_bytes = budget;
    o.heads_path = "none";
    o.max_seqs = batch > 64 ? batch : 64;
    o.max_ctx = ctx + steps + 2 * bs;
    engine_t *e = engine_new(&o, err);
    if (!e) return -1;
    model_t *m = e->model;
    kv_cache_t *kv = e->kv;
    const int kv_dim = kv->n_kv_heads * kv->head_dim, mb = m->max_blocks;
    int rc = -1;
    int32_t *tables = calloc((size_t)batch * mb, sizeof *tables), *slots = malloc(sizeof(int32_t) * (size_t)ctx);
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)batch * 3), *pos = tokens + batch, *seq = pos + batch;
    float *rows = malloc(sizeof(float) * (size_t)ctx * kv_dim * 2);
    kv_seq_t *seqs = calloc((size_t)batch, sizeof *seqs);
    if (!tables || !slots || !tokens || !rows || !seqs) goto out;
    uint64_t rng = 42;
    for (size_t i = 0; i < (size_t)ctx * kv_dim * 2; i++) rows[i] = (float)((double)(splitmix(&rng) >> 11) * 0x1.0p-53 * 4 - 2);
    for (int s = 0; s < batch; s++) {
        if (kv_seq_init(&seqs[s], mb) || kv_seq_reserve(kv, &seqs[s], ctx + steps + 1)) {
            fl_fail(err, FL_ERANGE, "kvquant: %d sequences of %d tokens do not fit", batch, ctx);
            goto out;
        }
        memcpy(tables + (size_t)s * mb, seqs[s].blocks, sizeof(int32_t) * (size_t)seqs[s].n_blocks);
        for (int p = 0; p < ctx; p++) slots[p] = seqs[s].blocks[p / bs] * bs + p % bs;
        for (int l = 0; l < kv->n_layers; l++)
            kern_kv_store(e->be, kv->k[l], kv->v[l], kv->k_type, kv->v_type, rows, rows + (size_t)ctx * kv_dim, slots,
                          ctx, kv_dim);
    }
    double best = 0;
    for (int r = 0; r < (int)f->repeat + 1; r++) {
        const double t0 = fl_clock_s();
        for (int st = 0; st < steps; st++) {
            for (int s = 0; s < batch; s++) tokens[s] = 300 + (s * 7 + st) % 1000, pos[s] = ctx + st, seq[s] = s;
            const model_batch_t b = {.n_tokens = batch, .tokens = tokens, .pos = pos, .seq = seq,
                                     .block_tables = tables, .n_seqs = batch, .logit_rows = seq, .n_logits = batch};
            if (model_forward(m, kv, &b, err) || kern_sync(e->be, err)) goto out;
        }
        const double rate = (double)batch * steps / (fl_clock_s() - t0);
        if (r > 0 && rate > best) best = rate; /* run 0 warms up */
    }
    *tok_s = best;
    rc = 0;
out:
    for (int s = 0; seqs && s < batch; s++) kv_seq_free(kv, &seqs[s]);
    free(seqs), free(rows), free(tokens), free(slots), free(tables);
    engine_destroy(&e);
    return rc;
}

typedef struct prefix_run {
    double ttft_sum;
    int done, ok;
} prefix_run_t;

static void on_finish(void *user, const sched_result_t *r)
{
    prefix_run_t *p = user;
    p->done++;
    if (r->finish == SCHED_FINISH_LENGTH && r->t_first_token > 0) {
        p->ok++;
        p->ttft_sum += r->t_first_token - r->t_submit;
    }
}

/* The prefix workload, every request queued at once, on a cache of `budget` bytes. */
static int prefix_load(const kvq_flags_t *f, int type, size_t budget, kvq_result_t *res, fl_error_t *err)
{
    engine_t *e = open_engine(f, type, budget, err);
    if (!e) return -1;
    const int n = (int)f->requests, plen = (int)(f->prefix_tokens + f->input_tokens);
    int32_t *prompts = malloc(sizeof(int32_t) * (size_t)n * plen);
    prefix_run_t pr = {0};
    const sched_callbacks_t cb = {.on_finish = on_finish, .user = &pr};
    const sched_opts_t so = {.max_waiting = n + 1};
    sched_t *s = prompts ? sched_new(e->model, e->kv, &so, &cb, err) : NULL;
    int rc = -1;
    if (!s) goto out;
    uint64_t rng = 7;
    const int vocab = e->model->cfg.n_vocab;
    for (int i = 0; i < n; i++)
        for (int t = 0; t < plen; t++) {
            if (t < f->prefix_tokens && i > 0) prompts[(size_t)i * plen + t] = prompts[t];
            else prompts[(size_t)i * plen + t] = 256 + (int32_t)(splitmix(&rng) % (uint64_t)(vocab - 256));
        }
    const double t0 = fl_clock_s();
    for (int i = 0; i < n; i++) {
        sched_request_t r = {.id = (uint64_t)i, .prompt = prompts + (size_t)i * plen, .n_prompt = plen,
                             .max_tokens = (int)f->output_tokens, .ignore_eog = true, .spec = SCHED_SPEC_NONE};
        if (sched_submit(s, &r, err)) goto out;
    }
    while (sched_has_work(s))
        if (sched_step(s, err)) goto out;
    res->wall_s = fl_clock_s() - t0;
    sched_stats_t st;
    sched_get_stats(s, &st);
    res->tight_budget = budget;
    res->req_per_s = pr.ok / res->wall_s;
    res->mean_ttft_s = pr.ok ? pr.ttft_sum / pr.ok : 0;
    res->preemptions = st.preemptions;
    res->cached_tokens = st.cached_prompt_tokens;
    res->ok_requests = pr.ok;
    res->steps = st.steps;
    res->tokens_per_step = st.steps ? (double)(st.prefill_tokens + st.generated_tokens) / (double)st.steps : 0;
    rc = 0;
out:
    sched_destroy(&s);
    free(prompts);
    engine_destroy(&e);
    return rc;
}

static void usage(void)
{
    printf("usage: folio-bench kvquant [flags] [engine flags]\n"
           "KV cache types side by side: bytes per token, capacity, decode at long context, and the\n"
           "prefix workload past saturation on a tight budget.\n"
           "  --types LIST          KV types (default f16,q8_0,q4_0)\n"
           "  --budget SIZE         the budget capacity is given for (default 64MiB)\n"
           "  --batches LIST        decode batch sizes (default 1,32)\n"
           "  --ctx-tokens N        context per sequence in the decode runs (default 2048)\n"
           "  --steps N             decode steps timed per run (default 4)\n"
           "  --repeat N            timed runs after one warm-up, the best kept (default 2)\n"
           "  --requests N          prefix workload: requests, all queued at once (default 24)\n"
           "  --prefix-tokens N, --input-tokens N, --output-tokens N   (default 200, 30, 50)\n"
           "  --fit-f16 N           the tight budget holds N sequences in f16, the shared prefix once\n"
           "                        (default 4)\n"
           "  --json FILE           write the results as JSON\n");
}

static int parse(kvq_flags_t *f, int argc, char **argv)
{
    *f = (kvq_flags_t){.budget = (size_t)64 << 20, .ctx_tokens = 2048, .steps = 4, .repeat = 2, .requests = 24,
                       .prefix_tokens = 200, .input_tokens = 30, .output_tokens = 50, .fit_f16 = 4,
                       .batches = {1, 32}, .n_batches = 2, .types = "f16,q8_0,q4_0"};
    f->eo.backend = "cpu";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        const int r = engine_parse_flag(&f->eo, argc, argv, &i);
        if (r < 0) return -1;
        if (r > 0) continue;
#define NUM(flag, lo, hi, dst)                                                                                      \
    else if (!strcmp(a, flag)) {                                                                                    \
        if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, lo, hi, &dst)) return -1;                    \
    }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            exit(0);
        }
        NUM("--ctx-tokens", 16, 1 << 20, f->ctx_tokens)
        NUM("--steps", 1, 1 << 20, f->steps)
        NUM("--repeat", 1, 100, f->repeat)
        NUM("--requests", 1, 1 << 16, f->requests)
        NUM("--prefix-tokens", 0, 1 << 16, f->prefix_tokens)
        NUM("--input-tokens", 1, 1 << 16, f->input_tokens)
        NUM("--output-tokens", 1, 1 << 16, f->output_tokens)
        NUM("--fit-f16", 1, 1 << 16, f->fit_f16)
        else if (!strcmp(a, "--types")) {
            if (!(f->types = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--json")) {
            if (!(f->json = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--budget")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_bytes(a, v, &f->budget)) return -1;
        } else if (!strcmp(a, "--batches")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            f->n_batches = 0;
            for (char *t = strtok(buf, ","); t && f->n_batches < KVQ_MAX_BATCHES; t = strtok(NULL, ",")) {
                long b;
                if (!fl_flag_int(a, t, 1, 1024, &b)) return -1;
                f->batches[f->n_batches++] = (int)b;
            }
        } else {
            fprintf(stderr, "error: unknown flag '%s' (folio-bench kvquant --help)\n", a);
            return -1;
        }
#undef NUM
    }
    return 0;
}

int bench_kvquant(int argc, char **argv)
{
    kvq_flags_t f;
    if (parse(&f, argc, argv)) return 2;
    int types[3], n_types = 0;
    char tl[64];
    snprintf(tl, sizeof tl, "%s", f.types);
    for (char *t = strtok(tl, ","); t && n_types < 3; t = strtok(NULL, ",")) {
        if ((types[n_types++] = kv_type_parse(t)) < 0) {
            fprintf(stderr, "error: --types expects f16, q8_0 or q4_0, got '%s'\n", t);
            return 2;
        }
    }
    kvq_result_t res[3] = {0};
    fl_error_t err = {0};
    size_t f16_per_token = 0;
    long bs = 0; /* KV block size in tokens */
    for (int k = 0; k < n_types; k++) {
        kvq_result_t *r = &res[k];
        snprintf(r->type, sizeof r->type, "%s", kv_type_name(types[k]));
        engine_t *e = open_engine(&f, types[k], f.budget, &err);
        if (!e) goto fail;
        r->bytes_per_token = e->kv->bytes_per_token;
        r->capacity_tokens = kv_cache_capacity_tokens(e->kv);
        if (!f16_per_token) { /* the f16 size of the same model, for the tight budget */
            const kv_cache_t *kv = e->kv;
            f16_per_token = (size_t)2 * kv->n_layers * kv->n_kv_heads * kv->head_dim * 2;
            bs = kv->block_size;
        }
        engine_destroy(&e);
        for (int b = 0; b < f.n_batches; b++) {
            fprintf(stderr, "kvquant: %s decode, batch %d, %ld-token contexts ...\n", r->type, f.batches[b],
                    f.ctx_tokens);
            if (decode_rate(&f, types[k], f.batches[b], &r->decode_tok_s[b], &err)) goto fail;
        }
        /* tight: fit_f16 sequences in f16 as the prefix cache keeps them (the prefix's full blocks
         * once, then each sequence's own blocks), plus the scheduler's liveness block */
        const long seq_blocks = (f.prefix_tokens + f.input_tokens + f.output_tokens + bs - 1) / bs,
                   shared_blocks = f.prefix_tokens / bs;
        const size_t tight =
            (size_t)(shared_blocks + f.fit_f16 * (seq_blocks - shared_blocks) + 1) * (size_t)bs * f16_per_token;
        fprintf(stderr, "kvquant: %s prefix workload, %ld requests, budget %zu bytes ...\n", r->type, f.requests, tight);
        if (prefix_load(&f, types[k], tight, r, &err)) goto fail;
    }
    printf("%-6s %11s %15s", "kv", "bytes/token", "tokens/budget");
    for (int b = 0; b < f.n_batches; b++) printf("  decode b=%-3d", f.batches[b]);
    printf(" %9s %9s %8s %10s %7s\n", "prefix r/s", "ttft ms", "preempt", "tok/step", "ratio");
    for (int k = 0; k < n_types; k++) {
        const kvq_result_t *r = &res[k];
        printf("%-6s %11zu %15ld", r->type, r->bytes_per_token, r->capacity_tokens);
        for (int b = 0; b < f.n_batches; b++) printf("  %7.1f tok/s", r->decode_tok_s[b]);
        printf(" %10.2f %9.0f %8llu %10.1f", r->req_per_s, r->mean_ttft_s * 1e3, (unsigned long long)r->preemptions,
               r->tokens_per_step);
        printf("   tokens x%.2f, r/s x%.2f", (double)r->capacity_tokens / res[0].capacity_tokens,
               res[0].req_per_s > 0 ? r->req_per_s / res[0].req_per_s : 0);
        for (int b = 0; b < f.n_batches; b++)
            printf(", decode b=%d x%.2f", f.batches[b],
                   res[0].decode_tok_s[b] > 0 ? r->decode_tok_s[b] / res[0].decode_tok_s[b] : 0);
        printf("\n");
    }
    printf("(budget %zu bytes for capacity; prefix workload: %ld requests of %ld+%ld prompt tokens, %ld generated, "
           "all queued at once, budget %zu bytes = %ld f16 sequences; ratios against %s)\n",
           f.budget, f.requests, f.prefix_tokens, f.input_tokens, f.output_tokens, res[0].tight_budget, f.fit_f16,
           res[0].type);
    if (f.json) {
        cJSON *root = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(root, "types");
        cJSON_AddNumberToObject(root, "budget_bytes", (double)f.budget);
        cJSON_AddNumberToObject(root, "ctx_tokens", (double)f.ctx_tokens);
        for (int k = 0; k < n_types; k++) {
            const kvq_result_t *r = &res[k];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "kv_type", r->type);
            cJSON_AddNumberToObject(o, "bytes_per_token", (double)r->bytes_per_token);
            cJSON_AddNumberToObject(o, "capacity_tokens", (double)r->capacity_tokens);
            cJSON *d = cJSON_AddArrayToObject(o, "decode");
            for (int b = 0; b < f.n_batches; b++) {
                cJSON *x = cJSON_CreateObject();
                cJSON_AddNumberToObject(x, "batch", f.batches[b]);
                cJSON_AddNumberToObject(x, "tok_s", r->decode_tok_s[b]);
                cJSON_AddItemToArray(d, x);
            }
            cJSON_AddNumberToObject(o, "prefix_budget_bytes", (double)r->tight_budget);
            cJSON_AddNumberToObject(o, "prefix_req_per_s", r->req_per_s);
            cJSON_AddNumberToObject(o, "prefix_mean_ttft_s", r->mean_ttft_s);
            cJSON_AddNumberToObject(o, "prefix_preemptions", (double)r->preemptions);
            cJSON_AddNumberToObject(o, "prefix_cached_prompt_tokens", (double)r->cached_tokens);
            cJSON_AddNumberToObject(o, "prefix_steps", (double)r->steps);
            cJSON_AddNumberToObject(o, "prefix_tokens_per_step", r->tokens_per_step);
            cJSON_AddItemToArray(arr, o);
        }
        char *s = cJSON_Print(root);
        FILE *fp = fopen(f.json, "w");
        if (fp) fputs(s, fp), fputc('\n', fp), fclose(fp);
        free(s);
        cJSON_Delete(root);
    }
    return 0;
fail:
    fprintf(stderr, "error: kvquant: %s\n", err.msg);
    return 1;
}
