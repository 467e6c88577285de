/* bench_prefix.c - `folio-bench prefix`: a local cluster (cluster_start: coordinator plus worker
 * groups) under Poisson arrivals, with the prefix cache on ("prefix") and off ("base"), in the shape
 * of DESIGN.md's table (vLLM issue 227: prefix 200 tokens, input 30, output 50).
 *
 * Every prompt is token ids (GenerateRequest.prompt_tokens), so lengths are exact: a shared prefix of
 * --prefix-tokens random ids, then --input-tokens random ids of the request's own; --output-tokens
 * are generated greedily with ignore_eos and streamed. One asynchronous client sends each load's
 * requests at exponential inter-arrival times (it polls for responses with timeouts that end at the
 * next send, so sends stay on schedule), takes the first delta's arrival as the first-token time,
 * and checks that every request got exactly one final, status OK, and exactly the tokens asked for,
 * with indices in order. One warm-up request (not counted) runs before each method's sweep.
 *
 * `--routing`: 4 worker groups of 1 thread, 8 different prefixes (each request picks one at random),
 * each worker's KV budget sized so that only about 3 prefixes fit next to the running requests; the
 * coordinator policies prefix, cache-aware, round-robin and least-loaded, and one group holding the
 * 4 workers' memory together ("single"), are compared by prefix-cache hit rate (cached / prompt
 * tokens over the measured requests), first-token time and throughput. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "bench_cluster.h"
#include "clock.h"
#include "model_path.h"
#include "flags.h"
#include "folio_client.h"
#include "gguf.h"
#include "model.h"

#define MAX_LOADS 16
#define MAX_GROUPS 64
#define CLUSTER_WAIT_MS 120000
#define IDLE_LIMIT_S 300.0 /* no response at all for this long: the run has failed */

/* ---------------------------------------------------------------- the load driver */

typedef struct preq {
    const int32_t *prompt;
    int n_prompt;
    int prefix;               /* which shared prefix (routing mode) */
    uint64_t id;
    double t_send, t_first, t_final;
    int n_tokens, n_finals, status;
    uint32_t next_index;
    bool index_error;
    uint32_t prompt_tokens, cached_prompt_tokens, completion_tokens;
    int group;                /* g<i> -> i; -1 unknown */
    char message[128];
} preq_t;

typedef struct run_result {
    int n, n_ok;
    double wall_s, req_per_s, mean_latency_s, p99_latency_s, mean_ttft_s, p99_ttft_s;
    uint64_t prompt_tokens, cached_prompt_tokens;
    double hit_rate;
    uint64_t preemptions;
    uint64_t pulled_blocks;   /* KV blocks the groups pulled from each other (counted in the hits) */
    int per_group[MAX_GROUPS];
    char problem[256];        /* the first failed check, "" when every request passed */
} run_result_t;

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *s) { return (double)(splitmix(s) >> 11) * 0x1.0p-53; }

/* n random ids in [3, vocab): never the special tokens 0..2. */
static void random_ids(int32_t *out, int n, int32_t vocab, uint64_t seed)
{
    for (int i = 0; i < n; i++) out[i] = 3 + (int32_t)(splitmix(&seed) % (uint64_t)(vocab - 3));
}

static void handle_event(preq_t *r, int n, uint64_t first_id, const folio_event_t *ev, double now)
{
    if (ev->id < first_id || ev->id - first_id >= (uint64_t)n) return; /* not ours (e.g. a late warm-up) */
    preq_t *q = &r[ev->id - first_id];
    if (q->n_finals) {
        q->n_finals += ev->final; /* anything after the final is a protocol error */
        q->index_error = true;
        return;
    }
    if (ev->n_tokens > 0) {
        if (!q->t_first) q->t_first = now;
        if (ev->index != q->next_index) q->index_error = true;
        q->next_index = ev->index + (uint32_t)ev->n_tokens;
        q->n_tokens += ev->n_tokens;
    }
    if (ev->final) {
        q->n_finals = 1;
        q->t_final = now;
        q->status = ev->status;
        snprintf(q->message, sizeof q->message, "%s", ev->message ? ev->message : "");
        q->prompt_tokens = ev->prompt_tokens;
        q->cached_prompt_tokens = ev->cached_prompt_tokens;
        q->completion_tokens = ev->completion_tokens;
        q->group = ev->group && ev->group[0] == 'g' ? atoi(ev->group + 1) : -1;
    }
}

/* Sends r[0..n) at Poisson arrivals of rate qps and collects every response. Returns 0 when every
 * request ended (whatever its status: see res->problem), -1 on a transport failure or a stall. */
static int drive(folio_client_t *c, preq_t *r, int n, double qps, int output_tokens, uint64_t seed,
                 run_result_t *res)
{
    if (n <= 0) return -1;
    fl_error_t err = {0};
    uint64_t rng = seed;
    uint64_t first_id = 0;
    int sent = 0, done = 0;
    const double t0 = fl_clock_s();
    double next_send = t0, last_event = t0;
    while (done < n) {
        double now = fl_clock_s();
        if (sent < n && now >= next_send) {
            preq_t *q = &r[sent];
            folio_generate_params_t p = {.tokens = q->prompt, .n_tokens = q->n_prompt, .max_tokens = output_tokens,
                                         .stream = true, .ignore_eos = true};
            q->t_send = now;
            if (folio_client_send_generate(c, &p, &q->id, &err)) {
                fprintf(stderr, "error: send: %s\n", err.msg);
                return -1;
            }
            if (sent == 0) first_id = q->id;
            else if (q->id != first_id + (uint64_t)sent) {
                fprintf(stderr, "error: the client's ids are not consecutive (%llu after %llu)\n",
                        (unsigned long long)q->id, (unsigned long long)first_id);
                return -1;
            }
            sent++;
            next_send += -log(1.0 - uniform01(&rng)) / qps;
            continue;
        }
        int wait_ms = 200;
        if (sent < n) {
            const double ms = (next_send - now) * 1e3;
            wait_ms = ms <= 0 ? 0 : ms < 200 ? (int)ceil(ms) : 200;
        }
        folio_event_t ev;
        const int got = folio_client_recv(c, &ev, wait_ms, &err);
        if (got < 0) {
            fprintf(stderr, "error: receive: %s\n", err.msg);
            return -1;
        }
        now = fl_clock_s();
        if (got == 0) {
            if (sent == n && now - last_event > IDLE_LIMIT_S) {
                fprintf(stderr, "error: no response for %.0f s with %d of %d requests unfinished\n", IDLE_LIMIT_S,
                        n - done, n);
                return -1;
            }
            continue;
        }
        last_event = now;
        const bool was_final = ev.id >= first_id && ev.id - first_id < (uint64_t)sent && r[ev.id - first_id].n_finals;
        handle_event(r, sent, first_id, &ev, now);
        if (ev.final && !was_final && ev.id >= first_id && ev.id - first_id < (uint64_t)sent) done++;
        folio_event_clear(&ev);
    }
    /* Figures and checks. */
    double *lat = calloc((size_t)n, sizeof *lat), *ttft = calloc((size_t)n, sizeof *ttft);
    if (!lat || !ttft) {
        free(lat);
        free(ttft);
        return -1;
    }
    res->n = n;
    res->problem[0] = 0;
    double t_end = 0;
    int n_ok = 0;
    for (int i = 0; i < n; i++) {
        const preq_t *q = &r[i];
        char why[192] = "";
        if (q->n_finals != 1) snprintf(why, sizeof why, "%d finals", q->n_finals);
        else if (q->status != 0) snprintf(why, sizeof why, "status %d (%s)", q->status, q->message);
        else if (q->index_error) snprintf(why, sizeof why, "token indices out of order");
        else if (q->n_tokens != output_tokens || (int)q->completion_tokens != output_tokens)
            snprintf(why, sizeof why, "%d tokens streamed, %u reported, %d asked", q->n_tokens, q->completion_tokens,
                     output_tokens);
        if (why[0]) {
            if (!res->problem[0]) snprintf(res->problem, sizeof res->problem, "request %d: %s", i, why);
            continue;
        }
        lat[n_ok] = q->t_final - q->t_send;
        ttft[n_ok] = q->t_first - q->t_send;
        n_ok++;
        if (q->t_final > t_end) t_end = q->t_final;
        res->prompt_tokens += q->prompt_tokens;
        res->cached_prompt_tokens += q->cached_prompt_tokens;
        if (q->group >= 0 && q->group < MAX_GROUPS) res->per_group[q->group]++;
    }
    res->n_ok = n_ok;
    res->wall_s = n_ok ? t_end - r[0].t_send : 0;
    res->req_per_s = res->wall_s > 0 ? n_ok / res->wall_s : 0;
    res->mean_latency_s = bench_mean(lat, n_ok);
    res->p99_latency_s = bench_percentile(lat, n_ok, 0.99);
    res->mean_ttft_s = bench_mean(ttft, n_ok);
    res->p99_ttft_s = bench_percentile(ttft, n_ok, 0.99);
    res->hit_rate = res->prompt_tokens ? (double)res->cached_prompt_tokens / (double)res->prompt_tokens : 0;
    free(lat);
    free(ttft);
    return 0;
}

/* Sums over the groups of their preemption and pulled-block counters (since each worker started). */
static void cluster_counters(folio_client_t *c, uint64_t *preemptions, uint64_t *pulled)
{
    Folio__V1__Response *r = NULL;
    fl_error_t err = {0};
    *preemptions = *pulled = 0;
    if (folio_client_status(c, 5000, &r, &err) == 0 && r->cluster) {
        for (size_t i = 0; i < r->cluster->n_groups; i++) {
            if (r->cluster->groups[i]->load) *preemptions += r->cluster->groups[i]->load->preemptions;
            *pulled += r->cluster->groups[i]->kv_pulled_blocks;
        }
    }
    if (r) folio__v1__response__free_unpacked(r, NULL);
}

static uint64_t cluster_preemptions(folio_client_t *c)
{
    uint64_t pre, pulled;
    cluster_counters(c, &pre, &pulled);
    return pre;
}

static int warm_up(folio_client_t *c, const int32_t *prompt, int n_prompt, int output_tokens)
{
    folio_generate_params_t p = {.tokens = prompt, .n_tokens = n_prompt, .max_tokens = output_tokens, .stream = true,
                                 .ignore_eos = true};
    folio_result_t res = {0};
    fl_error_t err = {0};
    int rc = folio_client_generate(c, &p, NULL, NULL, 300000, &res, &err);
    if (rc) fprintf(stderr, "error: warm-up request: %s\n", err.msg);
    else if (res.status != 0) {
        fprintf(stderr, "error: warm-up request ended with status %d: %s\n", res.status, res.message);
        rc = -1;
    }
    folio_result_clear(&res);
    return rc;
}


/* ---------------------------------------------------------------- flags */

typedef struct prefix_flags {
    const char *model, *json, *png, *log_dir;
    long groups, threads_per_worker, prefix_tokens, input_tokens, output_tokens, requests, block_size;
    long max_batch_tokens, prefixes, fit_prefixes, fit_running;
    double loads[MAX_LOADS];
    int n_loads;
    size_t kv_budget;
    double load_factor;
    uint64_t seed;
    bool routing;
    char methods[256];
} prefix_flags_t;

static bool parse_list_f(const char *flag, const char *s, double *out, int *n)
{
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", s);
    *n = 0;
    for (char *save = NULL, *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (*n == MAX_LOADS || !fl_flag_float(flag, t, 0.01, 100000, &out[*n])) return false;
        (*n)++;
    }
    return *n > 0;
}

static void usage(void)
{
    printf("usage: folio-bench prefix [flags]\n"
           "Poisson load through a local cluster, prefix cache on (\"prefix\") and off (\"base\").\n"
           "  -m, --model PATH          GGUF (default: the default model)\n"
           "  --groups N                worker groups (default 1; --routing: 4)\n"
           "  --threads-per-worker N    (default: cores / groups; --routing: 1)\n"
           "  --prefix-tokens N         shared prefix length (default 200)\n"
           "  --input-tokens N          distinct tokens per request after the prefix (default 30)\n"
           "  --output-tokens N         generated tokens per request, ignore_eos (default 50)\n"
           "  --qps LIST                loads in requests/s (default 1,2,4,8,12; --routing: 3)\n"
           "  --requests N              requests per load (default max(16, 12 x qps); --routing: 160)\n"
           "  --methods LIST            prefix,base (default both; --routing: prefix,cache-aware,prefix:2,\n"
           "                            prefix:4,round-robin,least-loaded,single; POLICY:F runs POLICY with the\n"
           "                            coordinator's bounded-load factor F, else its default;\n"
           "                            POLICY-nopull with KV block pulls between groups off)\n"
           "  --kv-budget SIZE          per worker (default: the worker's 64MiB; --routing: sized so\n"
           "                            --fit-prefixes prefixes and --fit-running requests fit)\n"
           "  --block-size N            KV block size (default 16)\n"
           "  --max-batch-tokens N      worker's token budget per step (default: the worker's)\n"
           "  --seed N                  prompts and arrival times (default 1)\n"
           "  --log-dir DIR             process logs (default: a fresh /tmp/folio-bench-PID directory)\n"
           "  --json FILE               write the results as JSON\n"
           "  --png FILE                plot first-token time and throughput against load (not --routing)\n"
           "routing mode:\n"
           "  --routing                 compare routing policies over several groups\n"
           "  --prefixes N              distinct shared prefixes (default 8)\n"
           "  --fit-prefixes N          prefixes one worker's default KV budget holds (default 3)\n"
           "  --fit-running N           running requests' own blocks in that budget (default 4)\n"
           "  --load-factor F           coordinator's bounded-load factor (default: its own, 1.25)\n");
}

static int parse_flags(int argc, char **argv, prefix_flags_t *f)
{
    *f = (prefix_flags_t){.groups = 0, .threads_per_worker = 0, .prefix_tokens = 200, .input_tokens = 30,
                          .output_tokens = 50, .requests = 0, .block_size = 16, .prefixes = 8, .fit_prefixes = 3,
                          .fit_running = 4, .seed = 1};
    const char *qps = NULL, *methods = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        long n;
        double d;
#define INT(name, lo, hi, dst)                                                                                         \
    else if (!strcmp(a, name))                                                                                         \
    {                                                                                                                  \
        if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, lo, hi, &(dst))) return -1;                       \
    }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            exit(0);
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(f->model = fl_flag_value(argc, argv, &i))) return -1;
        }
        INT("--groups", 1, MAX_GROUPS, f->groups)
        INT("--threads-per-worker", 1, 256, f->threads_per_worker)
        INT("--prefix-tokens", 0, 1 << 16, f->prefix_tokens)
        INT("--input-tokens", 1, 1 << 16, f->input_tokens)
        INT("--output-tokens", 1, 1 << 16, f->output_tokens)
        INT("--requests", 1, 1 << 20, f->requests)
        INT("--block-size", 1, 1024, f->block_size)
        INT("--max-batch-tokens", 1, 1 << 20, f->max_batch_tokens)
        INT("--prefixes", 1, 1024, f->prefixes)
        INT("--fit-prefixes", 0, 1024, f->fit_prefixes)
        INT("--fit-running", 1, 1024, f->fit_running)
        else if (!strcmp(a, "--seed"))
        {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1L << 62, &n)) return -1;
            f->seed = (uint64_t)n;
        }
        else if (!strcmp(a, "--qps"))
        {
            if (!(qps = fl_flag_value(argc, argv, &i))) return -1;
        }
        else if (!strcmp(a, "--methods") || !strcmp(a, "--policies"))
        {
            if (!(methods = fl_flag_value(argc, argv, &i))) return -1;
        }
        else if (!strcmp(a, "--kv-budget"))
        {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_bytes(a, v, &f->kv_budget)) return -1;
        }
        else if (!strcmp(a, "--load-factor"))
        {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(a, v, 1.0, 1000, &d)) return -1;
            f->load_factor = d;
        }
        else if (!strcmp(a, "--log-dir"))
        {
            if (!(f->log_dir = fl_flag_value(argc, argv, &i))) return -1;
        }
        else if (!strcmp(a, "--json"))
        {
            if (!(f->json = fl_flag_value(argc, argv, &i))) return -1;
        }
        else if (!strcmp(a, "--png"))
        {
            if (!(f->png = fl_flag_value(argc, argv, &i))) return -1;
        }
        else if (!strcmp(a, "--routing")) f->routing = true;
        else
        {
            fprintf(stderr, "error: unknown flag '%s' (see folio-bench prefix --help)\n", a);
            return -1;
        }
#undef INT
    }
    if (f->png && f->routing) {
        fprintf(stderr, "error: --png plots the prefix table; --routing writes tables and JSON only\n");
        return -1;
    }
    if (!f->groups) f->groups = f->routing ? 4 : 1;
    if (!f->threads_per_worker && f->routing) f->threads_per_worker = 1;
    if (!parse_list_f("--qps", qps ? qps : f->routing ? "3" : "1,2,4,8,12", f->loads, &f->n_loads)) return -1;
    snprintf(f->methods, sizeof f->methods, "%s",
             methods ? methods
                                                                   : f->routing ? "prefix,cache-aware,prefix:2,prefix:4,round-robin,least-loaded,single"
                                                                                : "prefix,base");
    return 0;
}

/* ---------------------------------------------------------------- prefix vs base */

static cJSON *result_json(const run_result_t *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "requests", r->n);
    cJSON_AddNumberToObject(o, "ok", r->n_ok);
    cJSON_AddNumberToObject(o, "wall_s", r->wall_s);
    cJSON_AddNumberToObject(o, "prompt_tokens", (double)r->prompt_tokens);
    cJSON_AddNumberToObject(o, "cached_prompt_tokens", (double)r->cached_prompt_tokens);
    cJSON_AddNumberToObject(o, "hit_rate", r->hit_rate);
    cJSON_AddNumberToObject(o, "preemptions", (double)r->preemptions);
    cJSON_AddNumberToObject(o, "pulled_blocks", (double)r->pulled_blocks);
    if (r->problem[0]) cJSON_AddStringToObject(o, "problem", r->problem);
    return o;
}

static int requests_for(const prefix_flags_t *f, double qps)
{
    if (f->requests) return (int)f->requests;
    const int n = (int)ceil(12 * qps);
    return n > 16 ? n : 16;
}

/* One cluster per method; the loads run in order on it. */
static int run_method(const prefix_flags_t *f, const bench_model_facts_t *mf, bool prefix_cache, const char *log_dir,
                      int32_t *prompts, run_result_t *res /* [n_loads] */)
{
    cluster_opts_t o = {.model = f->model, .n_groups = (int)f->groups, .threads_per_worker = (int)f->threads_per_worker,
                        .kv_budget_bytes = f->kv_budget, .block_size = (int)f->block_size,
                        .max_batch_tokens = (int)f->max_batch_tokens, .no_prefix_cache = !prefix_cache,
                        .log_dir = log_dir};
    bench_cluster_t bc;
    if (bench_cluster_open(&bc, &o, CLUSTER_WAIT_MS)) return -1;
    folio_client_t *c = bc.client;
    int rc = -1;
    const int plen = (int)(f->prefix_tokens + f->input_tokens);
    /* Warm-up: the shared prefix with its own input ids. */
    int32_t *wp = malloc((size_t)plen * sizeof *wp);
    if (!wp) goto out;
    memcpy(wp, prompts, (size_t)f->prefix_tokens * sizeof *wp);
    random_ids(wp + f->prefix_tokens, (int)f->input_tokens, mf->n_vocab, f->seed ^ 0x5757ull);
    rc = warm_up(c, wp, plen, (int)f->output_tokens);
    free(wp);
    if (rc) goto out;
    size_t off = 0;
    for (int li = 0; li < f->n_loads; li++) {
        const int n = requests_for(f, f->loads[li]);
        preq_t *r = calloc((size_t)n, sizeof *r);
        if (!r) {
            rc = -1;
            goto out;
        }
        for (int i = 0; i < n; i++) r[i] = (preq_t){.prompt = prompts + off + (size_t)i * plen, .n_prompt = plen};
        off += (size_t)n * plen;
        fprintf(stderr, "bench prefix: %s, %.2f qps, %d requests ...\n", prefix_cache ? "prefix" : "base",
                f->loads[li], n);
        const uint64_t pre0 = cluster_preemptions(c);
        rc = drive(c, r, n, f->loads[li], (int)f->output_tokens, f->seed * 1000003u + (uint64_t)li, &res[li]);
        res[li].preemptions = cluster_preemptions(c) - pre0;
        free(r);
        if (rc) goto out;
        if (res[li].problem[0]) fprintf(stderr, "warning: %s\n", res[li].problem);
    }
    rc = 0;
out:
    bench_cluster_close(&bc);
    return rc;
}

static int run_prefix_vs_base(const prefix_flags_t *f, const char *model_path, const bench_model_facts_t *mf,
                              const char *log_dir)
{
    bool want[2] = {strstr(f->methods, "prefix") != NULL, strstr(f->methods, "base") != NULL};
    const char *names[2] = {"prefix", "base"};
    const int plen = (int)(f->prefix_tokens + f->input_tokens);
    /* Every load's prompts, the same for both methods. */
    size_t total = 0;
    for (int li = 0; li < f->n_loads; li++) total += (size_t)requests_for(f, f->loads[li]);
    int32_t *prompts = malloc(total * (size_t)plen * sizeof *prompts);
    if (!prompts) return 1;
    int32_t *prefix = malloc((size_t)(f->prefix_tokens + 1) * sizeof *prefix);
    random_ids(prefix, (int)f->prefix_tokens, mf->n_vocab, f->seed);
    for (size_t i = 0; i < total; i++) {
        memcpy(prompts + i * plen, prefix, (size_t)f->prefix_tokens * sizeof *prompts);
        random_ids(prompts + i * plen + f->prefix_tokens, (int)f->input_tokens, mf->n_vocab,
                   f->seed * 7919u + 1 + i);
    }
    free(prefix);
    run_result_t res[2][MAX_LOADS];
    memset(res, 0, sizeof res);
    bool have[2] = {false, false};
    const double t0 = fl_clock_s();
    for (int m = 0; m < 2; m++) {
        if (!want[m]) continue;
        if (run_method(f, mf, m == 0, log_dir, prompts, res[m])) {
            fprintf(stderr, "error: method %s failed (logs in %s)\n", names[m], log_dir);
            free(prompts);
            return 1;
        }
        have[m] = true;
    }
    free(prompts);
    const double elapsed = fl_clock_s() - t0;

    printf("folio-bench prefix  model=%s groups=%ld threads/worker=%ld prefix=%ld input=%ld output=%ld "
           "kv_budget=%s%.0fMiB (%.1f s)\n",
           model_path, f->groups, f->threads_per_worker, f->prefix_tokens, f->input_tokens, f->output_tokens,
           f->kv_budget ? "" : "default ", (f->kv_budget ? (double)f->kv_budget : 64.0 * 1048576) / 1048576, elapsed);
    printf("| load | method | req/s | mean latency | p99 latency | mean TTFT | p99 TTFT | hit rate | preempt | ok |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (int li = 0; li < f->n_loads; li++)
        for (int m = 0; m < 2; m++) {
            if (!have[m]) continue;
            const run_result_t *r = &res[m][li];
            printf("| %g QPS | %s | %.2f | %.2f s | %.2f s | %.3f s | %.3f s | %.2f | %llu | %d/%d |\n", f->loads[li],
                   names[m], r->req_per_s, r->mean_latency_s, r->p99_latency_s, r->mean_ttft_s, r->p99_ttft_s,
                   r->hit_rate, (unsigned long long)r->preemptions, r->n_ok, r->n);
        }
    if (have[0] && have[1]) {
        printf("\n| load | TTFT off/on (mean) | TTFT off/on (p99) | latency off/on | throughput on/off |\n");
        printf("|---|---|---|---|---|\n");
        for (int li = 0; li < f->n_loads; li++) {
            const run_result_t *on = &res[0][li], *off = &res[1][li];
            printf("| %g QPS | %.2f | %.2f | %.2f | %.2f |\n", f->loads[li],
                   on->mean_ttft_s > 0 ? off->mean_ttft_s / on->mean_ttft_s : 0,
                   on->p99_ttft_s > 0 ? off->p99_ttft_s / on->p99_ttft_s : 0,
                   on->mean_latency_s > 0 ? off->mean_latency_s / on->mean_latency_s : 0,
                   off->req_per_s > 0 ? on->req_per_s / off->req_per_s : 0);
        }
    }
    int bad = 0;
    for (int m = 0; m < 2; m++)
        for (int li = 0; li < f->n_loads; li++)
            if (have[m] && res[m][li].problem[0]) {
                printf("check failed: %s at %g QPS: %s\n", names[m], f->loads[li], res[m][li].problem);
                bad = 1;
            }
    if (!bad) printf("checks: every request got exactly one final, status OK, %ld tokens in order\n", f->output_tokens);

    if (f->json || f->png) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "benchmark", "prefix");
        cJSON *rows = cJSON_AddArrayToObject(o, "rows");
        cJSON *ratios = cJSON_AddArrayToObject(o, "ratios"), *details = cJSON_AddArrayToObject(o, "details");
        for (int li = 0; li < f->n_loads; li++)
            for (int m = 0; m < 2; m++) {
                if (!have[m]) continue;
                const run_result_t *r = &res[m][li];
                cJSON *row = cJSON_CreateObject();
                cJSON_AddNumberToObject(row, "load_qps", f->loads[li]);
                cJSON_AddStringToObject(row, "method", names[m]);
                cJSON_AddNumberToObject(row, "req_per_s", r->req_per_s);
                cJSON_AddNumberToObject(row, "mean_latency_s", r->mean_latency_s);
                cJSON_AddNumberToObject(row, "p99_latency_s", r->p99_latency_s);
                cJSON_AddNumberToObject(row, "mean_ttft_s", r->mean_ttft_s);
                cJSON_AddNumberToObject(row, "p99_ttft_s", r->p99_ttft_s);
                cJSON_AddItemToArray(rows, row);
                cJSON *d = result_json(r);
                cJSON_AddNumberToObject(d, "load_qps", f->loads[li]);
                cJSON_AddStringToObject(d, "method", names[m]);
                cJSON_AddItemToArray(details, d);
            }
        if (have[0] && have[1])
            for (int li = 0; li < f->n_loads; li++) {
                const run_result_t *on = &res[0][li], *off = &res[1][li];
                cJSON *x = cJSON_CreateObject();
                cJSON_AddNumberToObject(x, "load_qps", f->loads[li]);
                cJSON_AddNumberToObject(x, "ttft_off_over_on", on->mean_ttft_s > 0 ? off->mean_ttft_s / on->mean_ttft_s : 0);
                cJSON_AddNumberToObject(x, "p99_ttft_off_over_on", on->p99_ttft_s > 0 ? off->p99_ttft_s / on->p99_ttft_s : 0);
                cJSON_AddNumberToObject(x, "latency_off_over_on",
                                        on->mean_latency_s > 0 ? off->mean_latency_s / on->mean_latency_s : 0);
                cJSON_AddNumberToObject(x, "throughput_on_over_off", off->req_per_s > 0 ? on->req_per_s / off->req_per_s : 0);
                cJSON_AddItemToArray(ratios, x);
            }
        cJSON *cfg = cJSON_AddObjectToObject(o, "config");
        cJSON_AddStringToObject(cfg, "model", model_path);
        cJSON_AddNumberToObject(cfg, "groups", (double)f->groups);
        cJSON_AddNumberToObject(cfg, "threads_per_worker", (double)f->threads_per_worker);
        cJSON_AddNumberToObject(cfg, "prefix_tokens", (double)f->prefix_tokens);
        cJSON_AddNumberToObject(cfg, "input_tokens", (double)f->input_tokens);
        cJSON_AddNumberToObject(cfg, "output_tokens", (double)f->output_tokens);
        cJSON_AddNumberToObject(cfg, "kv_budget_bytes", f->kv_budget ? (double)f->kv_budget : 64.0 * 1048576);
        cJSON_AddNumberToObject(cfg, "seed", (double)f->seed);
        cJSON_AddNumberToObject(cfg, "cores", (double)sysconf(_SC_NPROCESSORS_ONLN));
        cJSON_AddNumberToObject(cfg, "elapsed_s", elapsed);
        const int wr = bench_write_outputs(f->json, f->png, o);
        cJSON_Delete(o);
        if (wr) return 1;
    }
    return bad;
}

/* ---------------------------------------------------------------- routing */

typedef struct policy_run {
    char name[48], policy[32];
    double load_factor; /* 0: the coordinator's default */
    bool single;
    bool no_pull;       /* POLICY-nopull: the coordinator's --kv-pull off */
    int groups;
    run_result_t res[MAX_LOADS];
} policy_run_t;

/* The policies that route by where prefixes are cached: judged against the single group. */
static bool locality_policy(const char *policy) { return !strcmp(policy, "prefix") || !strcmp(policy, "cache-aware"); }

static int run_routing(const prefix_flags_t *f, const char *model_path, const bench_model_facts_t *mf, const char *log_dir)
{
    const int P = (int)f->prefixes, bs = (int)f->block_size;
    const int plen = (int)(f->prefix_tokens + f->input_tokens);
    const long prefix_blocks = f->prefix_tokens / bs;
    const long request_blocks = (plen + f->output_tokens + bs - 1) / bs;
    const long own_blocks = request_blocks - prefix_blocks;
    const size_t block_bytes = mf->kv_bytes_per_token * (size_t)bs;
    /* +1: the worker's reserved liveness block. */
    const long budget_blocks = f->fit_prefixes * prefix_blocks + f->fit_running * own_blocks + 1;
    const size_t budget = f->kv_budget ? f->kv_budget : (size_t)budget_blocks * block_bytes;
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long single_threads = f->groups * f->threads_per_worker;
    if (single_threads > cores) single_threads = cores;

    int32_t *prefixes = malloc((size_t)(P + 1) * (size_t)(f->prefix_tokens + 1) * sizeof *prefixes);
    if (!prefixes) return 1;
    for (int p = 0; p <= P; p++) /* prefix P: the warm-up's own, outside the measured set */
        random_ids(prefixes + (size_t)p * f->prefix_tokens, (int)f->prefix_tokens, mf->n_vocab, f->seed * 31u + (uint64_t)p);

    char mlist[256];
    snprintf(mlist, sizeof mlist, "%s", f->methods);
    policy_run_t runs[8];
    int n_runs = 0;
    for (char *save = NULL, *t = strtok_r(mlist, ",", &save); t && n_runs < 8; t = strtok_r(NULL, ",", &save)) {
        /* POLICY or POLICY:LOAD_FACTOR (the coordinator's bounded-load factor for that run) */
        char *colon = strchr(t, ':');
        double lf = 0;
        if (colon) {
            *colon = 0;
            if (!fl_flag_float("--methods load factor", colon + 1, 1.0, 1000, &lf)) {
                free(prefixes);
                return 2;
            }
        }
        /* POLICY-nopull: with KV block pulls between groups off */
        const size_t tl = strlen(t);
        const bool no_pull = tl > 7 && !strcmp(t + tl - 7, "-nopull");
        char full[32];
        snprintf(full, sizeof full, "%.31s", t);
        if (no_pull) t[tl - 7] = 0;
        if (strcmp(t, "prefix") && strcmp(t, "cache-aware") && strcmp(t, "round-robin") && strcmp(t, "least-loaded") &&
            strcmp(t, "single")) {
            fprintf(stderr, "error: --methods: unknown policy '%s'\n", t);
            free(prefixes);
            return 2;
        }
        memset(&runs[n_runs], 0, sizeof runs[n_runs]);
        snprintf(runs[n_runs].policy, sizeof runs[n_runs].policy, "%s", t);
        runs[n_runs].load_factor = lf > 0 ? lf : f->load_factor;
        runs[n_runs].no_pull = no_pull;
        if (lf > 0) snprintf(runs[n_runs].name, sizeof runs[n_runs].name, "%s:%g", full, lf);
        else snprintf(runs[n_runs].name, sizeof runs[n_runs].name, "%s", full);
        runs[n_runs].single = !strcmp(t, "single");
        runs[n_runs].groups = runs[n_runs].single ? 1 : (int)f->groups;
        n_runs++;
    }
    const double t0 = fl_clock_s();
    for (int k = 0; k < n_runs; k++) {
        policy_run_t *pr = &runs[k];
        char lf[32];
        const char *cargs[5] = {NULL, NULL, NULL, NULL, NULL};
        int nc = 0;
        if (pr->load_factor > 0 && !pr->single) {
            snprintf(lf, sizeof lf, "%g", pr->load_factor);
            cargs[nc++] = "--load-factor";
            cargs[nc++] = lf;
        }
        if (pr->no_pull) {
            cargs[nc++] = "--kv-pull";
            cargs[nc++] = "off";
        }
        cluster_opts_t o = {.model = f->model, .n_groups = pr->groups,
                            .threads_per_worker = pr->single ? (int)single_threads : (int)f->threads_per_worker,
                            .kv_budget_bytes = pr->single ? budget * (size_t)f->groups : budget,
                            .block_size = bs, .max_batch_tokens = (int)f->max_batch_tokens,
                            .policy = pr->single ? NULL : pr->policy, .coordinator_args = cargs, .log_dir = log_dir};
        bench_cluster_t bc;
        if (bench_cluster_open(&bc, &o, CLUSTER_WAIT_MS)) {
            free(prefixes);
            return 1;
        }
        folio_client_t *c = bc.client;
        int rc = 0;
        int32_t *wp = malloc((size_t)plen * sizeof *wp);
        if (wp) {
            memcpy(wp, prefixes + (size_t)P * f->prefix_tokens, (size_t)f->prefix_tokens * sizeof *wp);
            random_ids(wp + f->prefix_tokens, (int)f->input_tokens, mf->n_vocab, f->seed ^ 0x5757ull);
            rc = warm_up(c, wp, plen, (int)f->output_tokens);
        }
        free(wp);
        for (int li = 0; !rc && li < f->n_loads; li++) {
            const int n = f->requests ? (int)f->requests : 160;
            preq_t *r = calloc((size_t)n, sizeof *r);
            int32_t *pp = malloc((size_t)n * (size_t)plen * sizeof *pp);
            if (!r || !pp) {
                free(r);
                free(pp);
                rc = -1;
                break;
            }
            /* The same prompts for every policy: prefix choice and input ids depend on (seed, load, i). */
            uint64_t pick = f->seed * 104729u + (uint64_t)li;
            for (int i = 0; i < n; i++) {
                const int p = (int)(splitmix(&pick) % (uint64_t)P);
                int32_t *q = pp + (size_t)i * plen;
                memcpy(q, prefixes + (size_t)p * f->prefix_tokens, (size_t)f->prefix_tokens * sizeof *q);
                random_ids(q + f->prefix_tokens, (int)f->input_tokens, mf->n_vocab,
                           f->seed * 7919u + 1 + (uint64_t)li * 1000003u + (uint64_t)i);
                r[i] = (preq_t){.prompt = q, .n_prompt = plen, .prefix = p};
            }
            fprintf(stderr, "bench prefix --routing: %s, %d group(s), %.2f qps, %d requests ...\n", pr->name,
                    pr->groups, f->loads[li], n);
            uint64_t pre0, pulled0, pre1, pulled1;
            cluster_counters(c, &pre0, &pulled0);
            rc = drive(c, r, n, f->loads[li], (int)f->output_tokens, f->seed * 1000003u + (uint64_t)li, &pr->res[li]);
            usleep(1500000); /* the pull counters come with the workers' heartbeats */
            cluster_counters(c, &pre1, &pulled1);
            pr->res[li].preemptions = pre1 - pre0;
            pr->res[li].pulled_blocks = pulled1 - pulled0;
            if (!rc && pr->res[li].problem[0]) fprintf(stderr, "warning: %s\n", pr->res[li].problem);
            free(r);
            free(pp);
        }
        bench_cluster_close(&bc);
        if (rc) {
            fprintf(stderr, "error: policy %s failed (logs in %s)\n", pr->name, log_dir);
            free(prefixes);
            return 1;
        }
    }
    free(prefixes);
    const double elapsed = fl_clock_s() - t0;

    printf("folio-bench prefix --routing  model=%s prefixes=%d prefix=%ld input=%ld output=%ld block=%d (%.1f s)\n",
           model_path, P, f->prefix_tokens, f->input_tokens, f->output_tokens, bs, elapsed);
    printf("KV per worker: %.1f MiB = %zu blocks of %.0f KiB (a prefix is %ld full blocks; budget = %ld prefixes + "
           "%ld running requests' own %ld blocks + 1); single: one group with %ld workers' memory (%.1f MiB), "
           "%ld threads\n",
           (double)budget / 1048576, budget / block_bytes, (double)block_bytes / 1024, prefix_blocks,
           f->fit_prefixes, f->fit_running, own_blocks, f->groups, (double)budget * f->groups / 1048576,
           single_threads);
    printf("| load | policy | groups | hit rate | req/s | mean latency | mean TTFT | p99 TTFT | preempt | pulled blocks | requests per group | ok |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    int bad = 0;
    for (int li = 0; li < f->n_loads; li++)
        for (int k = 0; k < n_runs; k++) {
            const run_result_t *r = &runs[k].res[li];
            char spread[128] = "";
            size_t o = 0;
            for (int g = 0; g < runs[k].groups && g < MAX_GROUPS && o < sizeof spread - 8; g++)
                o += (size_t)snprintf(spread + o, sizeof spread - o, "%s%d", g ? "/" : "", r->per_group[g]);
            printf("| %g QPS | %s | %d | %.3f | %.2f | %.2f s | %.3f s | %.3f s | %llu | %llu | %s | %d/%d |\n",
                   f->loads[li], runs[k].name, runs[k].groups, r->hit_rate, r->req_per_s, r->mean_latency_s,
                   r->mean_ttft_s, r->p99_ttft_s, (unsigned long long)r->preemptions,
                   (unsigned long long)r->pulled_blocks, spread, r->n_ok, r->n);
            if (r->problem[0]) {
                printf("check failed: %s: %s\n", runs[k].name, r->problem);
                bad = 1;
            }
        }
    const double ideal = (double)(f->prefix_tokens / bs * bs) / (double)plen;
    printf("(hit rate ceiling: %ld of %d prompt tokens are in full prefix blocks = %.3f)\n", f->prefix_tokens / bs * bs,
           plen, ideal);
    int ip = -1, is = -1;
    for (int k = 0; k < n_runs; k++) {
        if (locality_policy(runs[k].policy) && ip < 0) ip = k;
        if (runs[k].single) is = k;
    }
    for (int k = 0; is >= 0 && k < n_runs; k++) {
        if (!locality_policy(runs[k].policy)) continue;
        for (int li = 0; li < f->n_loads; li++) {
            const double s = runs[is].res[li].hit_rate;
            printf("%g QPS: %s routing hit rate / single group's = %.3f (goal >= %s)\n", f->loads[li], runs[k].name,
                   s > 0 ? runs[k].res[li].hit_rate / s : 0, strcmp(runs[k].policy, "prefix") ? "0.97" : "0.9");
        }
    }

    if (f->json || f->png) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "benchmark", "prefix");
        cJSON *rows = cJSON_AddArrayToObject(o, "rows");
        for (int li = 0; li < f->n_loads; li++)
            for (int k = 0; k < n_runs; k++) {
                const run_result_t *r = &runs[k].res[li];
                cJSON *row = result_json(r);
                cJSON_AddNumberToObject(row, "load_qps", f->loads[li]);
                cJSON_AddStringToObject(row, "policy", runs[k].policy);
                cJSON_AddStringToObject(row, "run", runs[k].name);
                if (runs[k].load_factor > 0) cJSON_AddNumberToObject(row, "load_factor", runs[k].load_factor);
                cJSON_AddNumberToObject(row, "groups", runs[k].groups);
                cJSON_AddNumberToObject(row, "req_per_s", r->req_per_s);
                cJSON_AddNumberToObject(row, "mean_latency_s", r->mean_latency_s);
                cJSON_AddNumberToObject(row, "p99_latency_s", r->p99_latency_s);
                cJSON_AddNumberToObject(row, "mean_ttft_s", r->mean_ttft_s);
                cJSON_AddNumberToObject(row, "p99_ttft_s", r->p99_ttft_s);
                cJSON *pg = cJSON_AddArrayToObject(row, "requests_per_group");
                for (int g = 0; g < runs[k].groups && g < MAX_GROUPS; g++)
                    cJSON_AddItemToArray(pg, cJSON_CreateNumber(r->per_group[g]));
                cJSON_AddItemToArray(rows, row);
            }
        if (ip >= 0 && is >= 0) {
            cJSON *x = cJSON_AddArrayToObject(o, "ratios");
            for (int k = 0; k < n_runs; k++) {
                if (!locality_policy(runs[k].policy)) continue;
                for (int li = 0; li < f->n_loads; li++) {
                    cJSON *e = cJSON_CreateObject();
                    const double s = runs[is].res[li].hit_rate;
                    cJSON_AddNumberToObject(e, "load_qps", f->loads[li]);
                    cJSON_AddStringToObject(e, "run", runs[k].name);
                    cJSON_AddNumberToObject(e, "prefix_hit_rate_over_single", s > 0 ? runs[k].res[li].hit_rate / s : 0);
                    cJSON_AddItemToArray(x, e);
                }
            }
        }
        cJSON *cfg = cJSON_AddObjectToObject(o, "config");
        cJSON_AddStringToObject(cfg, "model", model_path);
        cJSON_AddNumberToObject(cfg, "groups", (double)f->groups);
        cJSON_AddNumberToObject(cfg, "threads_per_worker", (double)f->threads_per_worker);
        cJSON_AddNumberToObject(cfg, "single_group_threads", (double)single_threads);
        cJSON_AddNumberToObject(cfg, "prefixes", P);
        cJSON_AddNumberToObject(cfg, "prefix_tokens", (double)f->prefix_tokens);
        cJSON_AddNumberToObject(cfg, "input_tokens", (double)f->input_tokens);
        cJSON_AddNumberToObject(cfg, "output_tokens", (double)f->output_tokens);
        cJSON_AddNumberToObject(cfg, "block_size", bs);
        cJSON_AddNumberToObject(cfg, "kv_budget_bytes_per_worker", (double)budget);
        cJSON_AddNumberToObject(cfg, "kv_blocks_per_worker", (double)(budget / block_bytes));
        cJSON_AddNumberToObject(cfg, "hit_rate_ceiling", ideal);
        if (f->load_factor > 0) cJSON_AddNumberToObject(cfg, "load_factor", f->load_factor);
        cJSON_AddNumberToObject(cfg, "seed", (double)f->seed);
        cJSON_AddNumberToObject(cfg, "cores", (double)cores);
        cJSON_AddNumberToObject(cfg, "elapsed_s", elapsed);
        const int wr = bench_write_json(f->json, o);
        cJSON_Delete(o);
        if (wr) return 1;
    }
    return bad;
}

int bench_prefix(int argc, char **argv)
{
    prefix_flags_t f;
    if (parse_flags(argc, argv, &f)) return 2;
    const char *model_path = fl_model_path(f.model);
    bench_model_facts_t mf;
    if (bench_model_facts(model_path, &mf)) return 1;
    if (mf.n_vocab <= 3) return 1;
    char dir[128];
    const char *log_dir = bench_log_dir(f.log_dir, dir, sizeof dir);
    fprintf(stderr, "bench prefix: process logs in %s\n", log_dir);
    return f.routing ? run_routing(&f, model_path, &mf, log_dir) : run_prefix_vs_base(&f, model_path, &mf, log_dir);
}
