/* bench_kvshare.c - folio-bench kvshare: KV block pulls between groups against recomputing.
 *
 * Two local clusters of 2 groups on the same model, one with pulls (--kv-pull on, the default) and
 * one without (--kv-pull off), each through the same steps:
 *  1. First token. For each trial a new shared prefix (--prefix-tokens, default 1,536) is sent
 *     once, so its home group (prefix routing) computes and caches it; once the coordinator's
 *     index shows the blocks, the home group is drained and the prefix with a new suffix goes to
 *     the other group, which pulls the prefix (or, without pulls, computes it): its first-token
 *     time is the figure. The same prompt sent again then hits the other group's own cache (the
 *     time of a local hit, for comparison). The bandwidth: the blocks pulled over the workers' own
 *     pull time (Status: kv_pulled_blocks, kv_pull_seconds), beside a plain memcpy of a prefix's
 *     bytes in this process.
 *  2. Load. The home group of a new prefix holds it; a burst of --load-requests prompts sharing it
 *     (different suffixes, --output-tokens each) all at once, so the prefix policy's load bound
 *     spills some to the other group, which pulls or recomputes: requests per second over the
 *     burst, and how many ran where.
 * Greedy; the clusters run one after the other, each worker with --threads-per-worker threads. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"
#include "bench_cluster.h"
#include "clock.h"
#include "flags.h"
#include "model_path.h"

#define CLUSTER_WAIT_MS 600000
#define REQUEST_MS      600000
#define MAX_TRIALS      64

typedef struct kvshare_flags {
    const char *model, *json, *log_dir;
    long prefix_tokens, suffix_tokens, output_tokens, trials, load_requests, threads_per_worker;
} kvshare_flags_t;

typedef struct kvshare_result {
    bool pulls;
    double ttft_s[MAX_TRIALS], hit_s[MAX_TRIALS];
    int n_trials;
    uint32_t cached_tokens; /* of the measured request, the last trial's */
    uint64_t pulled_blocks, failures;
    double pull_s; /* the workers' own time pulling, summed */
    double load_s, load_req_per_s, load_ttft_mean_s;
    int load_ok, load_on_other;
} kvshare_result_t;

static uint32_t g_rng = 12345;
static int32_t draw_token(int32_t n_vocab)
{
    g_rng = g_rng * 1664525u + 1013904223u;
    return 3 + (int32_t)((g_rng >> 8) % (uint32_t)(n_vocab - 3));
}

static void fill(int32_t *out, int n, int32_t n_vocab)
{
    for (int i = 0; i < n; i++) out[i] = draw_token(n_vocab);
}

/* One greedy request; its wall time and result. -1 on failure (printed). */
static int one(folio_client_t *c, const int32_t *toks, int n, int max_tokens, double *seconds, folio_result_t *res)
{
    folio_generate_params_t p = {.tokens = toks, .n_tokens = n, .max_tokens = max_tokens, .ignore_eos = true};
    fl_error_t err = {0};
    const double t0 = fl_clock_s();
    if (folio_client_generate(c, &p, NULL, NULL, REQUEST_MS, res, &err) || res->status) {
        fprintf(stderr, "error: a request failed: %s\n", err.code ? err.msg : res->message);
        folio_result_clear(res);
        return -1;
    }
    *seconds = fl_clock_s() - t0;
    return 0;
}

static const Folio__V1__GroupStatus *group_of(const Folio__V1__Response *r, const char *name)
{
    for (size_t i = 0; r->cluster && i < r->cluster->n_groups; i++)
        if (!strcmp(r->cluster->groups[i]->name, name)) return r->cluster->groups[i];
    return NULL;
}

/* Polls Status until group holds at least `blocks` blocks in the coordinator's index. */
static int wait_indexed(folio_client_t *c, const char *group, uint64_t blocks)
{
    for (const double t0 = fl_clock_s(); fl_clock_s() - t0 < 30;) {
        Folio__V1__Response *r = NULL;
        fl_error_t err = {0};
        if (folio_client_status(c, 5000, &r, &err)) return -1;
        const Folio__V1__GroupStatus *g = group_of(r, group);
        const bool ok = g && g->kv_index_blocks >= blocks;
        folio__v1__response__free_unpacked(r, NULL);
        if (ok) return 0;
        usleep(20000);
    }
    fprintf(stderr, "error: %s's blocks never reached the coordinator's index\n", group);
    return -1;
}

static void pull_totals(folio_client_t *c, uint64_t *pulled, uint64_t *failures, double *seconds)
{
    *pulled = *failures = 0;
    *seconds = 0;
    Folio__V1__Response *r = NULL;
    fl_error_t err = {0};
    if (folio_client_status(c, 5000, &r, &err)) return;
    for (size_t i = 0; r->cluster && i < r->cluster->n_groups; i++) {
        *pulled += r->cluster->groups[i]->kv_pulled_blocks;
        *failures += r->cluster->groups[i]->kv_pull_failures;
        *seconds += r->cluster->groups[i]->kv_pull_seconds;
    }
    folio__v1__response__free_unpacked(r, NULL);
}

static int drain(folio_client_t *c, const char *group, bool undrain)
{
    fl_error_t err = {0};
    if (!folio_client_drain(c, group, undrain, 5000, &err)) return 0;
    fprintf(stderr, "error: drain %s: %s\n", group, err.msg);
    return -1;
}

/* Part 1, one trial: a new prefix cached on its home, then sent to the other group. */
static int trial(folio_client_t *c, const kvshare_flags_t *f, int32_t n_vocab, int bs, kvshare_result_t *r)
{
    const int n = (int)(f->prefix_tokens + f->suffix_tokens);
    int32_t *toks = malloc(sizeof *toks * (size_t)n);
    if (!toks) return -1;
    fill(toks, n, n_vocab);
    folio_result_t res = {0};
    double s;
    int rc = one(c, toks, n, 1, &s, &res);
    char home[64];
    if (!rc) snprintf(home, sizeof home, "%s", res.group);
    folio_result_clear(&res);
    if (!rc) rc = wait_indexed(c, home, (uint64_t)(f->prefix_tokens / bs));
    if (!rc) rc = drain(c, home, false);
    fill(toks + f->prefix_tokens, (int)f->suffix_tokens, n_vocab);
    double ttft = 0, hit = 0;
    if (!rc) rc = one(c, toks, n, 1, &ttft, &res);
    if (!rc) {
        if (!strcmp(res.group, home)) fprintf(stderr, "warning: the drained %s served the request\n", home);
        r->cached_tokens = res.cached_prompt_tokens;
        folio_result_clear(&res);
        rc = one(c, toks, n, 1, &hit, &res); /* the other group's own cache now */
        folio_result_clear(&res);
    }
    if (!rc) rc = drain(c, home, true);
    free(toks);
    if (rc) return rc;
    r->ttft_s[r->n_trials] = ttft;
    r->hit_s[r->n_trials] = hit;
    r->n_trials++;
    return 0;
}

/* Part 2: a burst sharing one prefix that its home group holds. */
static int load(folio_client_t *c, const kvshare_flags_t *f, int32_t n_vocab, int bs, kvshare_result_t *r)
{
    const int n = (int)(f->prefix_tokens + f->suffix_tokens), m = (int)f->load_requests;
    int32_t *toks = malloc(sizeof *toks * (size_t)n * (size_t)m);
    double *sent = calloc((size_t)m, sizeof *sent), *ttft = calloc((size_t)m, sizeof *ttft);
    if (!toks || !sent || !ttft) return -1;
    fill(toks, n, n_vocab);
    for (int i = 1; i < m; i++) {
        memcpy(toks + (size_t)i * n, toks, sizeof *toks * (size_t)f->prefix_tokens);
        fill(toks + (size_t)i * n + f->prefix_tokens, (int)f->suffix_tokens, n_vocab);
    }
    folio_result_t res = {0};
    double s;
    int rc = one(c, toks, n, 1, &s, &res);
    char home[64] = "";
    if (!rc) snprintf(home, sizeof home, "%s", res.group);
    folio_result_clear(&res);
    if (!rc) rc = wait_indexed(c, home, (uint64_t)(f->prefix_tokens / bs));
    const double t0 = fl_clock_s();
    uint64_t first_id = 0;
    for (int i = 0; !rc && i < m; i++) {
        folio_generate_params_t p = {.tokens = toks + (size_t)i * n, .n_tokens = n, .max_tokens = (int)f->output_tokens,
                                     .ignore_eos = true, .stream = true};
        uint64_t id;
        fl_error_t err = {0};
        if (folio_client_send_generate(c, &p, &id, &err)) {
            fprintf(stderr, "error: send: %s\n", err.msg);
            rc = -1;
        }
        if (!i) first_id = id;
        sent[i] = fl_clock_s();
    }
    int done = 0;
    while (!rc && done < m) {
        folio_event_t ev;
        fl_error_t err = {0};
        const int got = folio_client_recv(c, &ev, REQUEST_MS, &err);
        if (got <= 0) {
            fprintf(stderr, "error: the burst stalled: %s\n", got ? err.msg : "no answer");
            rc = -1;
            break;
        }
        const int i = (int)(ev.id - first_id);
        if (i >= 0 && i < m) {
            if (!ttft[i] && ev.n_tokens) ttft[i] = fl_clock_s() - sent[i];
            if (ev.final) {
                done++;
                if (!ev.status) {
                    r->load_ok++;
                    if (ev.group && strcmp(ev.group, home)) r->load_on_other++;
                }
            }
        }
        folio_event_clear(&ev);
    }
    r->load_s = fl_clock_s() - t0;
    r->load_req_per_s = r->load_ok / r->load_s;
    r->load_ttft_mean_s = bench_mean(ttft, m);
    free(toks);
    free(sent);
    free(ttft);
    return rc;
}

static int run(const kvshare_flags_t *f, const char *model, int32_t n_vocab, const char *log_dir, bool pulls,
               kvshare_result_t *r)
{
    memset(r, 0, sizeof *r);
    r->pulls = pulls;
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/kvshare-%s", log_dir, pulls ? "pull" : "recompute");
    mkdir(log_dir, 0755);
    mkdir(dir, 0755);
    static const char *const wargs[] = {"--kv-events-ms", "20", NULL};
    const char *const cargs[] = {"--kv-pull", pulls ? "on" : "off", NULL};
    cluster_opts_t o = {.model = model, .n_groups = 2, .threads_per_worker = (int)f->threads_per_worker,
                        .coordinator_args = cargs, .worker_args = wargs, .log_dir = dir};
    bench_cluster_t bc;
    if (bench_cluster_open(&bc, &o, CLUSTER_WAIT_MS)) return -1;
    Folio__V1__Response *st = NULL;
    fl_error_t err = {0};
    int bs = 16, rc = folio_client_status(bc.client, 5000, &st, &err);
    if (!rc) {
        if (st->cluster->block_size) bs = (int)st->cluster->block_size;
        folio__v1__response__free_unpacked(st, NULL);
    }
    fprintf(stderr, "bench kvshare (%s): %ld trials of a %ld-token prefix\n", pulls ? "pull" : "recompute", f->trials,
            f->prefix_tokens);
    for (int t = 0; !rc && t < f->trials; t++) rc = trial(bc.client, f, n_vocab, bs, r);
    if (!rc && f->load_requests > 0) rc = load(bc.client, f, n_vocab, bs, r);
    usleep(1500000); /* Status's pull totals come with the workers' heartbeats (1 s) */
    pull_totals(bc.client, &r->pulled_blocks, &r->failures, &r->pull_s);
    bench_cluster_close(&bc);
    return rc;
}

static double median(const double *v, int n)
{
    double tmp[MAX_TRIALS];
    memcpy(tmp, v, sizeof *v * (size_t)n);
    return bench_percentile(tmp, n, 0.5);
}

/* Seconds of a memcpy of bytes (the best of several), for the bandwidth's comparison. */
static double memcpy_s(size_t bytes)
{
    char *a = malloc(bytes), *b = malloc(bytes);
    if (!a || !b) return 0;
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    double best = 1e9;
    for (int i = 0; i < 5; i++) {
        const double t0 = fl_clock_s();
        memcpy(b, a, bytes);
        const double dt = fl_clock_s() - t0;
        if (dt < best) best = dt;
        a[i] = b[bytes - 1 - i]; /* keeps the copies from being dropped */
    }
    free(a);
    free(b);
    return best;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: folio-bench kvshare [flags]\n"
                 "KV block pulls between groups against recomputing the prefix (bench/README.md).\n"
                 "  -m, --model PATH           the GGUF (default: the default model)\n"
                 "  --prefix-tokens N          the shared prefix (default 1536)\n"
                 "  --suffix-tokens N          each request's own tokens after it (default 32)\n"
                 "  --trials N                 first-token trials per cluster (default 5)\n"
                 "  --load-requests N          requests in the load burst (default 16; 0: no burst)\n"
                 "  --output-tokens N          tokens each burst request generates (default 16)\n"
                 "  --threads-per-worker N     engine threads of each worker (default 1)\n"
                 "  --json FILE                results as JSON\n"
                 "  --log-dir DIR              process logs (default /tmp/folio-bench-PID)\n");
}

int bench_kvshare(int argc, char **argv)
{
    kvshare_flags_t f = {.prefix_tokens = 1536, .suffix_tokens = 32, .output_tokens = 16, .trials = 5,
                         .load_requests = 16, .threads_per_worker = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        long *num = !strcmp(a, "--prefix-tokens")        ? &f.prefix_tokens
                    : !strcmp(a, "--suffix-tokens")      ? &f.suffix_tokens
                    : !strcmp(a, "--output-tokens")      ? &f.output_tokens
                    : !strcmp(a, "--trials")             ? &f.trials
                    : !strcmp(a, "--load-requests")      ? &f.load_requests
                    : !strcmp(a, "--threads-per-worker") ? &f.threads_per_worker
                                                         : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (num) {
            const long lo = num == &f.load_requests ? 0 : 1, hi = num == &f.trials ? MAX_TRIALS : 1 << 20;
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, lo, hi, num)) return 2;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(f.model = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--json")) {
            if (!(f.json = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--log-dir")) {
            if (!(f.log_dir = fl_flag_value(argc, argv, &i))) return 2;
        } else {
            fprintf(stderr, "error: unknown flag %s\n", a);
            usage(stderr);
            return 2;
        }
    }
    const char *model = fl_model_path(f.model);
    bench_model_facts_t mf;
    if (bench_model_facts(model, &mf) || mf.n_vocab <= 3) return 1;
    char dirbuf[128];
    const char *log_dir = bench_log_dir(f.log_dir, dirbuf, sizeof dirbuf);
    fprintf(stderr, "bench kvshare: process logs in %s\n", log_dir);
    static kvshare_result_t res[2];
    for (int k = 0; k < 2; k++)
        if (run(&f, model, mf.n_vocab, log_dir, k == 0, &res[k])) return 1;

    const kvshare_result_t *pull = &res[0], *re = &res[1];
    const double pull_ttft = median(pull->ttft_s, pull->n_trials), re_ttft = median(re->ttft_s, re->n_trials);
    const double hit = median(pull->hit_s, pull->n_trials);
    const size_t bytes = (size_t)(f.prefix_tokens / 16 * 16) * mf.kv_bytes_per_token; /* f16 KV, whole blocks */
    const double copy = memcpy_s(bytes);
    /* Bandwidth from the workers' own pull times (asking to the last block written) over every
     * block they pulled (blocks of 16 tokens, f16). */
    const double pulled_bytes = (double)pull->pulled_blocks * 16 * (double)mf.kv_bytes_per_token;
    const double pull_mib_s = pull->pull_s > 0 ? pulled_bytes / pull->pull_s / 1048576.0 : 0;
    printf("\nfolio-bench kvshare: %s, prefix %ld tokens (%.1f MiB of f16 KV), %ld trials, 2 groups x %ld threads\n",
           model, f.prefix_tokens, bytes / 1048576.0, f.trials, f.threads_per_worker);
    printf("%-28s %12s %12s\n", "", "pull", "recompute");
    printf("%-28s %12.1f %12.1f\n", "first token, median (ms)", pull_ttft * 1e3, re_ttft * 1e3);
    printf("%-28s %12u %12u\n", "cached prompt tokens", pull->cached_tokens, re->cached_tokens);
    printf("%-28s %12llu %12llu\n", "blocks pulled (all)", (unsigned long long)pull->pulled_blocks,
           (unsigned long long)re->pulled_blocks);
    printf("%-28s %12llu %12llu\n", "pulls ended early", (unsigned long long)pull->failures,
           (unsigned long long)re->failures);
    if (f.load_requests > 0) {
        printf("%-28s %12.2f %12.2f\n", "burst requests/s", pull->load_req_per_s, re->load_req_per_s);
        printf("%-28s %12.0f %12.0f\n", "burst first token, mean (ms)", pull->load_ttft_mean_s * 1e3,
               re->load_ttft_mean_s * 1e3);
        printf("%-28s %8d/%-3d %8d/%-3d\n", "burst served by the other", pull->load_on_other, pull->load_ok,
               re->load_on_other, re->load_ok);
    }
    printf("first token with the pull / recompute: %.3f (goal <= 0.2)\n", re_ttft > 0 ? pull_ttft / re_ttft : 0);
    printf("%-28s %12.1f %12.1f\n", "then a local hit (ms)", hit * 1e3, median(re->hit_s, re->n_trials) * 1e3);
    printf("pulls: %.0f MiB in %.1f ms of the workers' time: %.0f MiB/s; memcpy of a prefix's bytes here %.0f MiB/s\n",
           pulled_bytes / 1048576.0, pull->pull_s * 1e3, pull_mib_s, copy > 0 ? bytes / copy / 1048576.0 : 0);
    if (f.load_requests > 0)
        printf("burst throughput with pulls / recompute: %.2f\n",
               re->load_req_per_s > 0 ? pull->load_req_per_s / re->load_req_per_s : 0);
    if (f.json) {
        cJSON *j = cJSON_CreateObject(), *cfg = cJSON_AddObjectToObject(j, "config");
        cJSON_AddStringToObject(cfg, "model", model);
        cJSON_AddNumberToObject(cfg, "prefix_tokens", (double)f.prefix_tokens);
        cJSON_AddNumberToObject(cfg, "suffix_tokens", (double)f.suffix_tokens);
        cJSON_AddNumberToObject(cfg, "trials", (double)f.trials);
        cJSON_AddNumberToObject(cfg, "load_requests", (double)f.load_requests);
        cJSON_AddNumberToObject(cfg, "output_tokens", (double)f.output_tokens);
        cJSON_AddNumberToObject(cfg, "threads_per_worker", (double)f.threads_per_worker);
        for (int k = 0; k < 2; k++) {
            cJSON *o = cJSON_AddObjectToObject(j, k ? "recompute" : "pull");
            cJSON_AddNumberToObject(o, "first_token_median_s", median(res[k].ttft_s, res[k].n_trials));
            cJSON_AddNumberToObject(o, "local_hit_median_s", median(res[k].hit_s, res[k].n_trials));
            cJSON_AddNumberToObject(o, "cached_prompt_tokens", res[k].cached_tokens);
            cJSON_AddNumberToObject(o, "pulled_blocks", (double)res[k].pulled_blocks);
            cJSON_AddNumberToObject(o, "pull_failures", (double)res[k].failures);
            cJSON_AddNumberToObject(o, "burst_req_per_s", res[k].load_req_per_s);
            cJSON_AddNumberToObject(o, "burst_first_token_mean_s", res[k].load_ttft_mean_s);
            cJSON_AddNumberToObject(o, "burst_on_other_group", res[k].load_on_other);
        }
        cJSON_AddNumberToObject(j, "first_token_ratio", re_ttft > 0 ? pull_ttft / re_ttft : 0);
        cJSON_AddNumberToObject(j, "pull_seconds", pull->pull_s);
        cJSON_AddNumberToObject(j, "pull_mib_per_s", pull_mib_s);
        cJSON_AddNumberToObject(j, "memcpy_mib_per_s", copy > 0 ? bytes / copy / 1048576.0 : 0);
        if (bench_write_json(f.json, j)) {
            cJSON_Delete(j);
            return 1;
        }
        cJSON_Delete(j);
    }
    return 0;
}
