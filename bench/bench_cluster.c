/* bench_cluster.c - the cluster benchmarks' shared helpers; see bench_cluster.h. */
#include "bench_cluster.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double bench_percentile(double *v, int n, double p)
{
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int k = (int)ceil(p * n) - 1; /* nearest rank */
    if (k < 0) k = 0;
    if (k >= n) k = n - 1;
    return v[k];
}

double bench_mean(const double *v, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return n ? s / n : 0;
}

int bench_write_json(const char *path, void *json)
{
    char *s = cJSON_Print((cJSON *)json);
    FILE *f = s ? fopen(path, "w") : NULL;
    int rc = 0;
    if (!f || fprintf(f, "%s\n", s) < 0) {
        fprintf(stderr, "error: cannot write %s: %s\n", path, strerror(errno));
        rc = -1;
    }
    if (f && fclose(f)) rc = -1;
    cJSON_free(s);
    return rc;
}

int bench_write_outputs(const char *json_path, const char *png_path, void *json)
{
    if (json_path && bench_write_json(json_path, json)) return -1;
    if (!png_path) return 0;
    char data[64] = "/tmp/folio-bench-plot-XXXXXX.json";
    const char *from = json_path;
    if (!from) {
        const int fd = mkstemps(data, 5);
        if (fd < 0) {
            fprintf(stderr, "error: cannot make a temporary file for the plot: %s\n", strerror(errno));
            return -1;
        }
        close(fd);
        if (bench_write_json(data, json)) {
            unlink(data);
            return -1;
        }
        from = data;
    }
    /* The plot is matplotlib's (bench/plot.py): the test tools' venv has it (scripts/setup.sh
     * --test-tools), else whatever python3 finds. */
    const char *src = getenv("FOLIO_SOURCE_DIR");
    if (!src) src = FOLIO_SOURCE_DIR_DEFAULT;
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "py='%s/.venv/bin/python'; [ -x \"$py\" ] || py=python3; \"$py\" '%s/bench/plot.py' '%s' '%s'", src, src,
             from, png_path);
    const int status = system(cmd);
    if (from == data) unlink(data);
    if (status != 0) {
        fprintf(stderr, "error: the plot %s failed (bench/plot.py needs matplotlib: bash scripts/setup.sh --test-tools)\n",
                png_path);
        return -1;
    }
    printf("plot: %s\n", png_path);
    return 0;
}

const char *bench_log_dir(const char *given, char *buf, size_t cap)
{
    if (given) return given;
    snprintf(buf, cap, "/tmp/folio-bench-%d", (int)getpid());
    return buf;
}

int bench_cluster_open(bench_cluster_t *bc, cluster_opts_t *opts, int wait_ms)
{
    static int counter;
    bc->cluster = NULL;
    bc->client = NULL;
    if (!opts->client_endpoint || !opts->worker_endpoint) {
        counter++;
        snprintf(bc->client_endpoint, sizeof bc->client_endpoint, "ipc:///tmp/folio-bench-%d-%d-c", (int)getpid(),
                 counter);
        snprintf(bc->worker_endpoint, sizeof bc->worker_endpoint, "ipc:///tmp/folio-bench-%d-%d-w", (int)getpid(),
                 counter);
        opts->client_endpoint = bc->client_endpoint;
        opts->worker_endpoint = bc->worker_endpoint;
    }
    fl_error_t err = {0};
    if (!(bc->cluster = cluster_start(opts, wait_ms, &err))) {
        fprintf(stderr, "error: starting the cluster: %s\n", err.msg);
        return -1;
    }
    if (!(bc->client = folio_client_new(bc->cluster->client_endpoint, &err))) {
        fprintf(stderr, "error: client: %s\n", err.msg);
        bench_cluster_close(bc);
        return -1;
    }
    return 0;
}

void bench_cluster_close(bench_cluster_t *bc)
{
    folio_client_destroy(&bc->client);
    if (!bc->cluster) return;
    char eps[2][256];
    snprintf(eps[0], sizeof eps[0], "%s", bc->cluster->client_endpoint);
    snprintf(eps[1], sizeof eps[1], "%s", bc->cluster->worker_endpoint);
    cluster_stop(&bc->cluster);
    for (int i = 0; i < 2; i++)
        if (!strncmp(eps[i], "ipc://", 6)) unlink(eps[i] + 6);
}

int bench_model_facts(const char *path, bench_model_facts_t *mf)
{
    fl_error_t err = {0};
    gguf_t *g = gguf_open(path, &err);
    if (!g) {
        fprintf(stderr, "error: %s\n", err.msg);
        return -1;
    }
    const char *arch = "llama";
    size_t arch_len = 5;
    gguf_get_str(g, "general.architecture", &arch, &arch_len, NULL);
    char key[160];
    uint32_t layers = 0, kv_heads = 0, heads = 0, dim = 0, key_len = 0;
    gguf_value_type_t t;
    uint64_t n_vocab = 0;
#define GET(name, out)                                                                                                 \
    (snprintf(key, sizeof key, "%.*s." name, (int)arch_len, arch), gguf_get_u32(g, key, &(out), NULL))
    int rc = GET("block_count", layers) || GET("attention.head_count", heads) || GET("embedding_length", dim) ||
             gguf_get_arr(g, "tokenizer.ggml.tokens", &t, &n_vocab, NULL);
    if (GET("attention.head_count_kv", kv_heads)) kv_heads = heads;
    if (GET("attention.key_length", key_len)) key_len = heads ? dim / heads : 0;
#undef GET
    gguf_destroy(&g);
    if (rc || !layers || !kv_heads || !key_len || n_vocab < 16) {
        fprintf(stderr, "error: %s: cannot read the model's sizes from its metadata\n", path);
        return -1;
    }
    mf->n_vocab = (int32_t)n_vocab;
    mf->kv_bytes_per_token = (size_t)2 * layers * kv_heads * key_len * 2; /* K and V, f16 */
    return 0;
}
