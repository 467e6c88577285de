/* bench_route.c - `folio-bench route`: what the coordinator itself costs. The cluster's workers run
 * with --fake (each Generate is answered at once with one token, no model), so what is left is the
 * client library, ZeroMQ, and the coordinator's own work: decoding, tokenizing the TEXT prompt,
 * hashing its leading blocks, picking a group, forwarding and relaying.
 *
 * For each prompt size (English text, tokenized here with the model's tokenizer to check its
 * length): (a) latency: one request at a time, --requests of them, client round trip p50/p99;
 * (b) throughput: --inflight requests kept outstanding for --duration seconds (after a short
 * warm-up), routed requests/s. After each phase the coordinator's own added latency (StatusReply
 * route_p50_us / route_p99_us, over its last 4096 requests) is read with Status. Each phase runs on
 * a fresh cluster so the coordinator's window holds that phase's requests only. */
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
#include "tokenizer.h"

#define MAX_SIZES 8
#define CLUSTER_WAIT_MS 60000

static const char PASSAGE[] =
    "The harbour was quiet in the early morning, and the fishing boats rocked gently against the old stone "
    "quay. A few gulls circled above the market, where the traders were already setting out their crates of "
    "silver fish, bright lemons and loaves of warm bread. Down by the water an old man mended his nets with "
    "patient hands, humming a song his father had taught him long ago. Children ran along the sea wall, "
    "shouting to each other over the sound of the waves, while the baker's daughter carried a basket of "
    "rolls to the inn at the end of the street. By the time the church bell rang eight, the whole town was "
    "awake, and the smell of coffee and salt drifted through the narrow lanes toward the hills. ";

typedef struct route_row {
    int target_tokens, tokens;
    const char *phase; /* "latency" | "throughput" */
    int requests;
    double client_p50_us, client_p99_us, req_per_s;
    double route_p50_us, route_p99_us;
    char problem[192];
} route_row_t;

/* Text of about `target` tokens: the smallest number of the passage's words (cycled) whose encoding
 * (with the model's BOS policy, as the coordinator encodes a raw prompt) has at least target tokens. */
static char *make_text(const tok_t *t, int target, int *n_tokens)
{
    const size_t plen = strlen(PASSAGE);
    const int max_words = target * 2 + 16;
    size_t cap = (size_t)max_words * 16 + plen;
    char *buf = malloc(cap);
    size_t *ends = malloc((size_t)(max_words + 1) * sizeof *ends);
    int32_t *ids = malloc((size_t)(target * 4 + 64) * sizeof *ids);
    if (!buf || !ends || !ids) goto fail;
    /* Lay out max_words words, remembering where each ends. */
    size_t o = 0, p = 0;
    int w = 0;
    while (w < max_words) {
        while (PASSAGE[p % plen] == ' ') buf[o++] = PASSAGE[p++ % plen];
        while (PASSAGE[p % plen] != ' ') buf[o++] = PASSAGE[p++ % plen];
        ends[++w] = o;
        if (o + 64 > cap) break;
    }
    int lo = 1, hi = w;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        const int n = tok_encode(t, buf, ends[mid], tok_add_bos(t), false, ids, target * 4 + 64);
        if (n < 0) goto fail;
        if (n >= target) hi = mid;
        else lo = mid + 1;
    }
    buf[ends[lo]] = 0;
    *n_tokens = tok_encode(t, buf, ends[lo], tok_add_bos(t), false, ids, target * 4 + 64);
    free(ends);
    free(ids);
    return buf;
fail:
    free(buf);
    free(ends);
    free(ids);
    return NULL;
}

static void read_route_stats(folio_client_t *c, route_row_t *row)
{
    Folio__V1__Response *r = NULL;
    fl_error_t err = {0};
    if (folio_client_status(c, 5000, &r, &err) == 0 && r->cluster) {
        row->route_p50_us = r->cluster->route_p50_us;
        row->route_p99_us = r->cluster->route_p99_us;
    } else {
        snprintf(row->problem, sizeof row->problem, "Status failed: %.150s", err.msg);
    }
    if (r) folio__v1__response__free_unpacked(r, NULL);
}

/* Checks one final: OK, one token. Returns false (and notes why in row->problem) otherwise. */
static bool check_final(const folio_event_t *ev, route_row_t *row)
{
    if (ev->status == 0 && ev->n_tokens == 1) return true;
    if (!row->problem[0])
        snprintf(row->problem, sizeof row->problem, "request %llu: status %d (%s), %d tokens",
                 (unsigned long long)ev->id, ev->status, ev->message ? ev->message : "", ev->n_tokens);
    return false;
}

static int phase_latency(folio_client_t *c, const char *text, int n, int warm, route_row_t *row)
{
    folio_generate_params_t p = {.text = text, .max_tokens = 1};
    double *lat = malloc((size_t)n * sizeof *lat);
    if (!lat) return -1;
    fl_error_t err = {0};
    int k = 0;
    for (int i = 0; i < warm + n; i++) {
        uint64_t id;
        const double t0 = fl_clock_s();
        if (folio_client_send_generate(c, &p, &id, &err)) goto fail;
        folio_event_t ev;
        for (;;) {
            const int got = folio_client_recv(c, &ev, 10000, &err);
            if (got <= 0) {
                if (!got) fl_fail(&err, FL_EIO, "no answer in 10 s");
                goto fail;
            }
            const bool done = ev.final && ev.id == id;
            if (done) check_final(&ev, row);
            folio_event_clear(&ev);
            if (done) break;
        }
        if (i >= warm) lat[k++] = (fl_clock_s() - t0) * 1e6;
    }
    row->requests = n;
    row->client_p50_us = bench_percentile(lat, k, 0.5);
    row->client_p99_us = bench_percentile(lat, k, 0.99);
    double sum = 0;
    for (int i = 0; i < k; i++) sum += lat[i];
    row->req_per_s = sum > 0 ? k / (sum * 1e-6) : 0;
    free(lat);
    return 0;
fail:
    fprintf(stderr, "error: latency phase: %s\n", err.msg);
    free(lat);
    return -1;
}

static int phase_throughput(folio_client_t *c, const char *text, int inflight, double warm_s, double duration_s,
                            route_row_t *row)
{
    folio_generate_params_t p = {.text = text, .max_tokens = 1};
    fl_error_t err = {0};
    int outstanding = 0;
    long counted = 0;
    /* Round-trip samples of the measured window, a reservoir of the first 1M. */
    const int cap = 1 << 20;
    double *lat = malloc((size_t)cap * sizeof *lat);
    /* send time per id, ring indexed by id % ring */
    const int ring = 1 << 16;
    double *sent_at = calloc((size_t)ring, sizeof *sent_at);
    if (!lat || !sent_at) {
        free(lat);
        free(sent_at);
        return -1;
    }
    int n_lat = 0;
    const double t_start = fl_clock_s(), t_measure = t_start + warm_s, t_end = t_measure + duration_s;
    double t_last = t_measure;
    for (;;) {
        double now = fl_clock_s();
        if (now < t_end)
            while (outstanding < inflight) {
                uint64_t id;
                if (folio_client_send_generate(c, &p, &id, &err)) goto fail;
                sent_at[id % (uint64_t)ring] = fl_clock_s();
                outstanding++;
            }
        else if (!outstanding) break;
        folio_event_t ev;
        const int got = folio_client_recv(c, &ev, 10000, &err);
        if (got <= 0) {
            if (!got) fl_fail(&err, FL_EIO, "no answer in 10 s with %d outstanding", outstanding);
            goto fail;
        }
        now = fl_clock_s();
        if (ev.final) {
            outstanding--;
            check_final(&ev, row);
            const double ts = sent_at[ev.id % (uint64_t)ring];
            if (ts >= t_measure && now <= t_end) {
                counted++;
                t_last = now;
                if (n_lat < cap) lat[n_lat++] = (now - ts) * 1e6;
            }
        }
        folio_event_clear(&ev);
    }
    row->requests = (int)counted;
    row->req_per_s = t_last > t_measure ? counted / (t_last - t_measure) : 0;
    row->client_p50_us = bench_percentile(lat, n_lat, 0.5);
    row->client_p99_us = bench_percentile(lat, n_lat, 0.99);
    free(lat);
    free(sent_at);
    return 0;
fail:
    fprintf(stderr, "error: throughput phase: %s\n", err.msg);
    free(lat);
    free(sent_at);
    return -1;
}

int bench_route(int argc, char **argv)
{
    const char *model = NULL, *json = NULL, *sizes_s = "30,2000", *log_dir = NULL;
    long groups = 1, requests = 5000, inflight = 256, warm = 200;
    double duration = 3.0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: folio-bench route [flags]\n"
                   "The coordinator's own cost, with --fake workers (instant one-token answers).\n"
                   "  -m, --model PATH     the coordinator's tokenizer (default: the default model)\n"
                   "  --groups N           fake worker groups (default 1)\n"
                   "  --sizes LIST         prompt sizes in tokens, as English text (default 30,2000)\n"
                   "  --requests N         latency phase: requests one at a time (default 5000; the\n"
                   "                       coordinator's percentiles cover its last 4096)\n"
                   "  --warm N             latency phase: requests before the measured ones (default 200)\n"
                   "  --inflight N         throughput phase: requests kept outstanding (default 256)\n"
                   "  --duration S         throughput phase: measured seconds, after 0.5 s (default 3)\n"
                   "  --log-dir DIR        process logs (default /tmp/folio-bench-PID)\n"
                   "  --json FILE          write the results as JSON\n");
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--groups")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 64, &groups)) return 2;
        } else if (!strcmp(a, "--sizes")) {
            if (!(sizes_s = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--requests")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 24, &requests)) return 2;
        } else if (!strcmp(a, "--warm")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1 << 24, &warm)) return 2;
        } else if (!strcmp(a, "--inflight")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 60000, &inflight)) return 2;
        } else if (!strcmp(a, "--duration")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(a, v, 0.1, 3600, &duration)) return 2;
        } else if (!strcmp(a, "--log-dir")) {
            if (!(log_dir = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--json")) {
            if (!(json = fl_flag_value(argc, argv, &i))) return 2;
        } else {
            fprintf(stderr, "error: unknown flag '%s' (see folio-bench route --help)\n", a);
            return 2;
        }
    }
    int sizes[MAX_SIZES], n_sizes = 0;
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s", sizes_s);
    for (char *save = NULL, *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        long s;
        if (n_sizes == MAX_SIZES || !fl_flag_int("--sizes", t, 1, 1 << 20, &s)) return 2;
        sizes[n_sizes++] = (int)s;
    }
    char dir[128];
    log_dir = bench_log_dir(log_dir, dir, sizeof dir);
    const char *model_path = fl_model_path(model);
    fl_error_t err = {0};
    gguf_t *g = gguf_open(model_path, &err);
    tok_t *tok = g ? tok_new_from_gguf(g, &err) : NULL;
    gguf_destroy(&g);
    if (!tok) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    route_row_t rows[2 * MAX_SIZES];
    int n_rows = 0, rc = 0;
    static const char *const fake_args[] = {"--fake", NULL};
    for (int si = 0; si < n_sizes && !rc; si++) {
        int n_tok = 0;
        char *text = make_text(tok, sizes[si], &n_tok);
        if (!text) {
            fprintf(stderr, "error: cannot build a %d-token prompt\n", sizes[si]);
            rc = 1;
            break;
        }
        for (int phase = 0; phase < 2 && !rc; phase++) {
            route_row_t *row = &rows[n_rows++];
            memset(row, 0, sizeof *row);
            row->target_tokens = sizes[si];
            row->tokens = n_tok;
            row->phase = phase ? "throughput" : "latency";
            cluster_opts_t o = {.model = model, .n_groups = (int)groups, .threads_per_worker = 1,
                                .worker_args = fake_args, .log_dir = log_dir};
            bench_cluster_t bc;
            if (bench_cluster_open(&bc, &o, CLUSTER_WAIT_MS)) {
                rc = 1;
            } else {
                fprintf(stderr, "bench route: %d-token prompt, %s ...\n", n_tok, row->phase);
                rc = phase ? phase_throughput(bc.client, text, (int)inflight, 0.5, duration, row)
                           : phase_latency(bc.client, text, (int)requests, (int)warm, row);
                if (!rc) read_route_stats(bc.client, row);
            }
            bench_cluster_close(&bc);
            if (rc) fprintf(stderr, "error: %d-token %s phase failed (logs in %s)\n", n_tok, row->phase, log_dir);
        }
        free(text);
    }
    tok_destroy(&tok);
    if (rc) return 1;

    printf("folio-bench route  model=%s fake groups=%ld inflight=%ld cores=%ld\n", model_path, groups, inflight,
           sysconf(_SC_NPROCESSORS_ONLN));
    printf("| prompt tokens | phase | requests | client p50 | client p99 | req/s | coordinator added p50 | "
           "coordinator added p99 |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    int bad = 0;
    for (int i = 0; i < n_rows; i++) {
        const route_row_t *r = &rows[i];
        printf("| %d | %s | %d | %.0f us | %.0f us | %.0f | %.1f us | %.1f us |\n", r->tokens, r->phase, r->requests,
               r->client_p50_us, r->client_p99_us, r->req_per_s, r->route_p50_us, r->route_p99_us);
        if (r->problem[0]) {
            printf("check failed: %d tokens %s: %s\n", r->tokens, r->phase, r->problem);
            bad = 1;
        }
    }
    if (json) {
        cJSON *o = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(o, "rows");
        for (int i = 0; i < n_rows; i++) {
            const route_row_t *r = &rows[i];
            cJSON *e = cJSON_CreateObject();
            cJSON_AddNumberToObject(e, "prompt_tokens", r->tokens);
            cJSON_AddNumberToObject(e, "target_tokens", r->target_tokens);
            cJSON_AddStringToObject(e, "phase", r->phase);
            cJSON_AddNumberToObject(e, "requests", r->requests);
            cJSON_AddNumberToObject(e, "client_p50_us", r->client_p50_us);
            cJSON_AddNumberToObject(e, "client_p99_us", r->client_p99_us);
            cJSON_AddNumberToObject(e, "req_per_s", r->req_per_s);
            cJSON_AddNumberToObject(e, "route_p50_us", r->route_p50_us);
            cJSON_AddNumberToObject(e, "route_p99_us", r->route_p99_us);
            if (r->problem[0]) cJSON_AddStringToObject(e, "problem", r->problem);
            cJSON_AddItemToArray(arr, e);
        }
        cJSON *cfg = cJSON_AddObjectToObject(o, "config");
        cJSON_AddStringToObject(cfg, "model", model_path);
        cJSON_AddNumberToObject(cfg, "groups", (double)groups);
        cJSON_AddNumberToObject(cfg, "latency_requests", (double)requests);
        cJSON_AddNumberToObject(cfg, "inflight", (double)inflight);
        cJSON_AddNumberToObject(cfg, "duration_s", duration);
        cJSON_AddNumberToObject(cfg, "cores", (double)sysconf(_SC_NPROCESSORS_ONLN));
        const int wr = bench_write_json(json, o);
        cJSON_Delete(o);
        if (wr) return 1;
    }
    return bad;
}
