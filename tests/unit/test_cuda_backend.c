/* test_cuda_backend.c - every op of kernels.h on the CUDA backend against the CPU backend (label gpu),
 * in the manner of llama.cpp's test-backend-ops: the same random inputs go to both backends, the
 * outputs are downloaded and compared with an error bound per op.
 *
 * Without a usable CUDA backend (kern_cuda_available() false, or kern_cuda_new failing) it prints
 * "SKIPPED: <reason>" and exits 77 (ctest's SKIP_RETURN_CODE): never passed, never failed.
 *
 * Error bounds (NMSE = sum((cuda - cpu)^2) / sum(cpu^2); the CUDA backend may keep weights and
 * activations in fp16 while the CPU quantizes activations, so products are not bit-equal):
 *   matmul, matmul_multi           NMSE <= 5e-4 (every weight type the CPU accepts); for quantized
 *                                  weights, where CUDA and the CPU differ by more, CUDA within 5e-4
 *                                  of exact products (see exact_errors)
 *   matmul_multi vs CUDA matmul    bit-equal (kernels.h: "the same bits as n_w matmul calls")
 *   matmul_swiglu                  NMSE <= 5e-4 (the matmul bound, exact_errors included)
 *   embed                          NMSE <= 1e-5 (a table kept in fp16 on the device is allowed)
 *   attention                      NMSE <= 1e-4
 *   rope                           NMSE <= 1e-5 (angles up to ~5000 rad: a few ulp of theta), adjacent
 *                                  and NeoX pairs, with and without an attn_factor
 *   add_bias, scale                bit-equal; softcap, geglu NMSE <= 1e-9 (the families beyond Llama)
 *   attention with a sliding window and/or soft-capping: the attention bound
 *   kv_store, kv_move on Q8_0 /    pools bit-equal (the CPU's quantizers, reproduced)
 *     Q4_0 pools
 *   attention over Q8_0 / Q4_0     NMSE <= 2e-3 against the CPU, and <= 1e-4 against exact
 *     pools (K, V or both)         attention (f64 over the dequantized pools and the unrounded q):
 *                                  the CPU rounds q to Q8_0 for a quantized K (llama.cpp's flash
 *                                  order), CUDA to fp16, so the CPU carries that error (measured up
 *                                  to ~1e-4 from exact) and CUDA very little
 *   rmsnorm, swiglu                NMSE <= 1e-9
 *   add, kv_store (f32 -> f16 RNE) bit-equal
 *   add_rmsnorm                    x bit-equal, y NMSE <= 1e-9
 *   rope_kv_store                  q, k as rope; V pool bit-equal; K pool per element within
 *                                  |k_cuda - k_cpu| + 1 f16 ulp (see test_rope_kv_store)
 *   fused op vs CUDA plain ops     bit-equal (kernels.h: each fused op equals its plain ops)
 *   sample                         ids equal, greedy and (seed, position)-seeded draws alike; greedy
 *                                  edge rows (NaN, +-inf, signed zeros, ties across the CUDA
 *                                  argmax's 2048-logit blocks) also equal to the id the rule gives;
 *                                  with logit adjustments and min-p, the adjusted rows bit-equal too
 * Each case prints "ok|FAIL <op> <shape> err=<err> (tol <tol>)"; a summary ends the run; the exit
 * status is 1 on any failure.
 *
 * FOLIO_CUDA_TEST_QUICK=1: a smaller case set (no 4096x4096 weights, no n=513 beyond one shape,
 * contexts of ~600 instead of ~4000, smaller vocabularies) for compute-sanitizer runs.
 * An optional argument is a substring filter on the case line ("matmul", "attention", "Q4_0").
 * FOLIO_CUDA_TEST_SELFCHECK=1 runs the harness with a second CPU backend in place of CUDA (every
 * case must then pass, bit-equal): a check of this file on a machine without a GPU. */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend_internal.h" /* white-box: which ops the CUDA table implements, and fused or not */
#include "kernels.h"
#include "quant.h"

#define TOL_MATMUL 5e-4
#define TOL_EMBED 1e-5
#define TOL_ATTN 1e-4
#define TOL_ATTN_Q 2e-3
#define TOL_ROPE 1e-5
#define TOL_EW 1e-9

static kern_backend_t *g_cpu, *g_gpu;
static bool g_quick;
static bool g_selfcheck; /* FOLIO_CUDA_TEST_SELFCHECK: a CPU backend stands in for CUDA */
static const char *g_filter;
static int g_pass, g_fail;

/* ------------------------------------------------------------------------------------------------
 * Helpers */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rnd_unif(void) { return (double)(rnd_u64() >> 11) * 0x1p-53; }
static int rnd_int(int n) { return (int)(rnd_u64() % (uint64_t)n); }

static float rnd_gauss(void)
{
    const double u1 = rnd_unif() + 1e-300, u2 = rnd_unif();
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void fill_gauss(float *x, size_t n, float std)
{
    for (size_t i = 0; i < n; i++) x[i] = rnd_gauss() * std;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "FAIL: host out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Case names are built first; a filter skips cases whose name does not contain it. */
static bool wanted(const char *name) { return !g_filter || strstr(name, g_filter); }

static void result(bool ok, const char *name, const char *fmt, ...)
{
    char detail[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    printf("%-4s %s %s\n", ok ? "ok" : "FAIL", name, detail);
    fflush(stdout);
    if (ok) g_pass++;
    else g_fail++;
}

/* NMSE of the CUDA output a against the CPU output b. Non-finite values must match exactly
 * (both NaN, or the same infinity); otherwise the error is infinite. */
static double nmse(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i])) {
            if ((isnan(a[i]) && isnan(b[i])) || a[i] == b[i]) continue;
            return INFINITY;
        }
        const double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0 ? num / den : (num > 0 ? INFINITY : 0.0);
}

static double max_abs(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (d > m || d != d) m = d;
    }
    return m;
}

/* A buffer on both backends: c (CPU memory), g (CUDA device memory). */
typedef struct twin {
    void *c, *g;
    size_t bytes;
} twin_t;

static twin_t twin_new(size_t bytes, const void *host)
{
    twin_t t = {kern_alloc(g_cpu, bytes), kern_alloc(g_gpu, bytes), bytes};
    if (!t.c || !t.g) {
        printf("FAIL alloc: %zu bytes (cpu %p, cuda %p)\n", bytes, t.c, t.g);
        exit(1);
    }
    if (host && (kern_upload(g_cpu, t.c, host, bytes) || kern_upload(g_gpu, t.g, host, bytes))) {
        printf("FAIL upload: %zu bytes\n", bytes);
        exit(1);
    }
    return t;
}

static void twin_free(twin_t *t)
{
    if (t->c) kern_free(g_cpu, t->c);
    if (t->g) kern_free(g_gpu, t->g);
    *t = (twin_t){0};
}

/* Waits for the CUDA stream; false (printed as a failure of `name`) when it reports an error. */
static bool gpu_sync(const char *name)
{
    fl_error_t err = {0};
    if (kern_sync(g_gpu, &err)) {
        result(false, name, "sync error: %s", err.msg);
        return false;
    }
    return true;
}

/* Downloads both halves of t to hc / hg (host). */
static bool twin_get(const twin_t *t, void *hc, void *hg, size_t bytes, const char *name)
{
    if (kern_download(g_cpu, hc, t->c, bytes) || kern_download(g_gpu, hg, t->g, bytes)) {
        result(false, name, "download failed");
        return false;
    }
    return gpu_sync(name);
}

/* A product's inputs, for a comparison with exact products (exact_errors). */
typedef struct product_ref {
    const struct qweight *gate, *up; /* up: NULL, or the up weights of a SwiGLU (out = silu(gate) * up) */
    const float *x;                  /* [n][cols] */
    int n;
} product_ref_t;

static bool exact_errors(const product_ref_t *ref, const float *cpu_y, const float *gpu_y, double *cpu_err,
                         double *gpu_err);

/* Compares the float twin of n elements; prints the case line. With ref (a product of quantized
 * weights), a difference over tol passes only where CUDA is within tol of exact products
 * (exact_errors; computed only then: it is slow on large shapes). */
static void check_floats_ref(const twin_t *t, size_t n, double tol, const product_ref_t *ref, const char *name)
{
    float *hc = xmalloc(n * sizeof(float)), *hg = xmalloc(n * sizeof(float));
    if (twin_get(t, hc, hg, n * sizeof(float), name)) {
        const double e = nmse(hg, hc, n);
        double cpu_err, gpu_err;
        if (ref && tol > 0 && !(e <= tol) && exact_errors(ref, hc, hg, &cpu_err, &gpu_err)) {
            result(gpu_err <= tol, name,
                   "err=%.3g (tol %.0e) max_abs=%.3g; against exact products: cuda %.3g, cpu %.3g", e, tol,
                   max_abs(hg, hc, n), gpu_err, cpu_err);
        } else if (tol == 0) {
            const bool eq = memcmp(hc, hg, n * sizeof(float)) == 0;
            result(eq, name, "bit-equal=%s max_abs=%.3g", eq ? "yes" : "NO", max_abs(hg, hc, n));
        } else {
            result(e <= tol, name, "err=%.3g (tol %.0e) max_abs=%.3g", e, tol, max_abs(hg, hc, n));
        }
    }
    free(hc);
    free(hg);
}

static void check_floats(const twin_t *t, size_t n, double tol, const char *name)
{
    check_floats_ref(t, n, tol, NULL, name);
}

/* NaN over the GPU copy, so that a later check cannot pass on what an earlier run left there. */
static void poison_gpu(const twin_t *t)
{
    float *nan = xmalloc(t->bytes);
    for (size_t i = 0; i < t->bytes / sizeof(float); i++) nan[i] = NAN;
    kern_upload(g_gpu, t->g, nan, t->bytes);
    free(nan);
}

static bool have_op(const void *fn, const char *name)
{
    if (fn) return true;
    result(false, name, "op not implemented (NULL in the CUDA kern_ops_t)");
    return false;
}

/* A CUDA buffer holding a copy of host (NULL: zeroed), for running the plain ops beside a fused one. */
static void *gpu_copy(const void *host, size_t bytes)
{
    void *p = kern_alloc(g_gpu, bytes);
    if (!p || (host && kern_upload(g_gpu, p, host, bytes))) {
        printf("FAIL alloc/upload: %zu bytes on the CUDA backend\n", bytes);
        exit(1);
    }
    return p;
}

/* Whether two CUDA buffers hold the same bytes (false, after a failure line, when they cannot be read). */
static bool gpu_same(const void *a, const void *b, size_t bytes, const char *name)
{
    unsigned char *ha = xmalloc(bytes), *hb = xmalloc(bytes);
    bool same = false;
    if (kern_download(g_gpu, ha, a, bytes) || kern_download(g_gpu, hb, b, bytes))
        result(false, name, "download failed");
    else if (gpu_sync(name))
        same = memcmp(ha, hb, bytes) == 0;
    free(ha);
    free(hb);
    return same;
}

static const int k_types[] = {FL_TYPE_F32, FL_TYPE_F16, FL_TYPE_BF16, FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};
#define N_TYPES ((int)(sizeof k_types / sizeof k_types[0]))

/* A quantized random weight, the same bytes handed to both backends (the host copy stays alive:
 * the CPU backend borrows it). */
typedef struct qweight {
    void *data;
    kern_weight_t *c, *g;
    int type, rows, cols;
} qweight_t;

static bool qweight_new(qweight_t *w, int type, int rows, int cols, const char *name)
{
    *w = (qweight_t){.type = type, .rows = rows, .cols = cols};
    const size_t rb = fl_dtype_row_bytes(type, cols);
    w->data = xmalloc(rb * (size_t)rows);
    float *row = xmalloc((size_t)cols * sizeof(float));
    for (int r = 0; r < rows; r++) {
        /* rows with an offset and an occasional outlier exercise the block scales and minimums */
        const float off = (r % 3 == 0) ? rnd_gauss() * 0.02f : 0.0f, std = 0.02f * (1.0f + (float)(r % 7));
        for (int i = 0; i < cols; i++) row[i] = off + rnd_gauss() * std;
        if (r % 11 == 0) row[rnd_int(cols)] *= 20.0f;
        quant_quantize_row(type, row, (char *)w->data + rb * (size_t)r, cols);
    }
    free(row);
    fl_error_t err = {0};
    w->c = kern_weight_new(g_cpu, type, rows, cols, w->data, &err);
    if (!w->c) {
        result(false, name, "cpu weight_new: %s", err.msg);
        return false;
    }
    err = (fl_error_t){0};
    w->g = kern_weight_new(g_gpu, type, rows, cols, w->data, &err);
    if (!w->g) {
        result(false, name, "cuda weight_new: %s", err.msg);
        kern_weight_destroy(g_cpu, w->c);
        free(w->data);
        *w = (qweight_t){0};
        return false;
    }
    return true;
}

static void qweight_free(qweight_t *w)
{
    if (w->g) kern_weight_destroy(g_gpu, w->g);
    if (w->c) kern_weight_destroy(g_cpu, w->c);
    free(w->data);
    *w = (qweight_t){0};
}

/* Products of quantized weights: the CPU backend quantizes each 32-activation block to 8 bits (as
 * ggml does), so its result carries an error of its own, large where a row's dot rests on one
 * outlier weight against an activation far below its block's largest (seen on the GPU: Q4_0
 * 200x32 n=3: CPU NMSE 1.6e-3 against exact products, CUDA 1.6e-3 from the CPU, and an
 * fp16-activation product, what CUDA computes, 1.9e-7 from exact when simulated on the CPU). Where CUDA and the CPU
 * differ by more than the bound, both are measured against exact products (f64 over the
 * dequantized weights, SwiGLU applied when ref->up is set): NMSE of the CPU's output (cpu_y) and
 * of CUDA's (gpu_y), both host, [n][rows]. False for weights the CPU does not quantize against. */
static bool exact_errors(const product_ref_t *ref, const float *cpu_y, const float *gpu_y, double *cpu_err,
                         double *gpu_err)
{
    const qweight_t *gate = ref->gate, *up = ref->up;
    if (gate->type != FL_TYPE_Q4_0 && gate->type != FL_TYPE_Q4_1 && gate->type != FL_TYPE_Q8_0) return false;
    const int rows = gate->rows, cols = gate->cols, n = ref->n;
    const size_t rb = fl_dtype_row_bytes(gate->type, cols), rb_up = up ? fl_dtype_row_bytes(up->type, cols) : 0;
    float *wg = xmalloc((size_t)cols * sizeof(float)), *wu = xmalloc((size_t)cols * sizeof(float));
    double dc = 0.0, dg = 0.0, sum_sq = 0.0;
    for (int r = 0; r < rows; r++) {
        quant_dequantize_row(gate->type, (const char *)gate->data + rb * (size_t)r, wg, cols);
        if (up) quant_dequantize_row(up->type, (const char *)up->data + rb_up * (size_t)r, wu, cols);
        for (int t = 0; t < n; t++) {
            const float *xt = ref->x + (size_t)t * cols;
            double g = 0.0, u = 0.0;
            for (int i = 0; i < cols; i++) {
                g += (double)wg[i] * xt[i];
                if (up) u += (double)wu[i] * xt[i];
            }
            const double exact = up ? g / (1.0 + exp(-g)) * u : g;
            const size_t k = (size_t)t * rows + r;
            dc += (cpu_y[k] - exact) * (cpu_y[k] - exact);
            dg += (gpu_y[k] - exact) * (gpu_y[k] - exact);
            sum_sq += exact * exact;
        }
    }
    free(wg);
    free(wu);
    *cpu_err = sum_sq > 0.0 ? dc / sum_sq : dc;
    *gpu_err = sum_sq > 0.0 ? dg / sum_sq : dg;
    return true;
}

/* ------------------------------------------------------------------------------------------------
 * embed */

static void test_embed(int type, int rows, int cols, int n, bool out_of_range)
{
    char name[128];
    snprintf(name, sizeof name, "embed %s %dx%d n=%d%s", fl_dtype_name(type), rows, cols, n,
             out_of_range ? " with out-of-range ids" : "");
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->embed, name)) return;
    qweight_t w;
    if (!qweight_new(&w, type, rows, cols, name)) return;
    int32_t *ids = xmalloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) ids[i] = i == 0 ? 0 : i == 1 ? rows - 1 : rnd_int(rows);
    if (out_of_range && n >= 4) ids[2] = -1, ids[3] = rows; /* the CPU writes zero rows */
    twin_t tid = twin_new((size_t)n * sizeof(int32_t), ids), out = twin_new((size_t)n * cols * sizeof(float), NULL);
    kern_embed(g_cpu, out.c, w.c, tid.c, n);
    kern_embed(g_gpu, out.g, w.g, tid.g, n);
    check_floats(&out, (size_t)n * cols, TOL_EMBED, name);
    twin_free(&tid);
    twin_free(&out);
    free(ids);
    qweight_free(&w);
}

/* ------------------------------------------------------------------------------------------------
 * matmul */

static void test_matmul(int type, int rows, int cols, const int *ns, int n_ns)
{
    char wname[128];
    snprintf(wname, sizeof wname, "matmul %s %dx%d", fl_dtype_name(type), rows, cols);
    bool any = false;
    for (int k = 0; k < n_ns; k++) {
        char name[160];
        snprintf(name, sizeof name, "%s n=%d", wname, ns[k]);
        any = any || wanted(name);
    }
    if (!any || !have_op((const void *)g_gpu->ops->matmul, wname)) return;
    qweight_t w;
    if (!qweight_new(&w, type, rows, cols, wname)) return;
    for (int k = 0; k < n_ns; k++) {
        const int n = ns[k];
        char name[160];
        snprintf(name, sizeof name, "%s n=%d", wname, n);
        if (!wanted(name)) continue;
        float *x = xmalloc((size_t)n * cols * sizeof(float));
        fill_gauss(x, (size_t)n * cols, 1.0f);
        if (n > 1) /* one row of large activations, one of tiny ones */
            for (int i = 0; i < cols; i++) x[i] *= 100.0f, x[(size_t)cols + i] *= 1e-3f;
        twin_t tx = twin_new((size_t)n * cols * sizeof(float), x), ty = twin_new((size_t)n * rows * sizeof(float), NULL);
        kern_matmul(g_cpu, ty.c, w.c, tx.c, n);
        kern_matmul(g_gpu, ty.g, w.g, tx.g, n);
        const product_ref_t ref = {&w, NULL, x, n};
        check_floats_ref(&ty, (size_t)n * rows, TOL_MATMUL, &ref, name);
        twin_free(&tx);
        twin_free(&ty);
        free(x);
    }
    qweight_free(&w);
}

/* matmul_multi on n_w weights of the given rows (same cols): each output against the CPU's, and
 * the CUDA outputs bit-equal to CUDA matmul calls one weight at a time. */
static void test_matmul_multi(int type, const int *rows, int n_w, int cols, int n)
{
    char name[160];
    int off = snprintf(name, sizeof name, "matmul_multi %s [", fl_dtype_name(type));
    for (int k = 0; k < n_w; k++) off += snprintf(name + off, sizeof name - (size_t)off, "%s%d", k ? "," : "", rows[k]);
    snprintf(name + off, sizeof name - (size_t)off, "]x%d n=%d", cols, n);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->matmul, name)) return;
    qweight_t w[8];
    twin_t ty[8];
    float *yc[8], *yg[8];
    const kern_weight_t *wc[8], *wg[8];
    int made = 0;
    for (; made < n_w; made++)
        if (!qweight_new(&w[made], type, rows[made], cols, name)) break;
    if (made == n_w) {
        float *x = xmalloc((size_t)n * cols * sizeof(float));
        fill_gauss(x, (size_t)n * cols, 1.0f);
        twin_t tx = twin_new((size_t)n * cols * sizeof(float), x);
        for (int k = 0; k < n_w; k++) {
            ty[k] = twin_new((size_t)n * rows[k] * sizeof(float), NULL);
            yc[k] = ty[k].c, yg[k] = ty[k].g, wc[k] = w[k].c, wg[k] = w[k].g;
        }
        kern_matmul_multi(g_cpu, yc, wc, n_w, tx.c, n);
        kern_matmul_multi(g_gpu, yg, wg, n_w, tx.g, n);
        for (int k = 0; k < n_w; k++) {
            char sub[200];
            snprintf(sub, sizeof sub, "%s out[%d]", name, k);
            const product_ref_t ref = {&w[k], NULL, x, n};
            check_floats_ref(&ty[k], (size_t)n * rows[k], TOL_MATMUL, &ref, sub);
        }
        /* the same bits as separate matmul calls */
        int differ = 0;
        for (int k = 0; k < n_w; k++) {
            const size_t cnt = (size_t)n * rows[k];
            float *single = kern_alloc(g_gpu, cnt * sizeof(float));
            float *a = xmalloc(cnt * sizeof(float)), *b = xmalloc(cnt * sizeof(float));
            if (!single) {
                printf("FAIL alloc\n");
                exit(1);
            }
            kern_matmul(g_gpu, single, w[k].g, tx.g, n);
            if (kern_download(g_gpu, a, single, cnt * sizeof(float)) ||
                kern_download(g_gpu, b, ty[k].g, cnt * sizeof(float)) || !gpu_sync(name))
                differ++;
            else if (memcmp(a, b, cnt * sizeof(float)))
                differ++;
            kern_free(g_gpu, single);
            free(a);
            free(b);
        }
        char sub[200];
        snprintf(sub, sizeof sub, "%s cuda multi == cuda matmul", name);
        result(differ == 0, sub, "outputs differing from single matmul: %d of %d", differ, n_w);
        for (int k = 0; k < n_w; k++) twin_free(&ty[k]);
        twin_free(&tx);
        free(x);
    }
    for (int k = 0; k < made; k++) qweight_free(&w[k]);
}

/* matmul_swiglu: out = silu(x W_gate^T) * (x W_up^T) against the CPU's (its plain matmul_multi and
 * swiglu: the matmul bound, which the SwiGLU's f32 ops hardly move), and the CUDA call bit-equal to
 * CUDA matmul_multi then swiglu (on n == 1 the fused call is one GEMV computing both dots of a row
 * and k_swiglu's formula). `up` is scratch and not compared. */
static void test_matmul_swiglu(int type, int rows, int cols, int n)
{
    char name[160];
    snprintf(name, sizeof name, "matmul_swiglu %s %dx%d n=%d", fl_dtype_name(type), rows, cols, n);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->matmul, name) ||
        !have_op((const void *)g_gpu->ops->swiglu, name))
        return;
    qweight_t wg, wu;
    if (!qweight_new(&wg, type, rows, cols, name)) return;
    if (!qweight_new(&wu, type, rows, cols, name)) {
        qweight_free(&wg);
        return;
    }
    const size_t xn = (size_t)n * cols, yn = (size_t)n * rows;
    float *x = xmalloc(xn * sizeof(float));
    fill_gauss(x, xn, 1.0f);
    if (n > 1) /* one row of large activations, one of tiny ones, as test_matmul */
        for (int i = 0; i < cols; i++) x[i] *= 100.0f, x[(size_t)cols + i] *= 1e-3f;
    twin_t tx = twin_new(xn * sizeof(float), x), to = twin_new(yn * sizeof(float), NULL),
           tu = twin_new(yn * sizeof(float), NULL);
    kern_matmul_swiglu(g_cpu, to.c, tu.c, wg.c, wu.c, rows, tx.c, n);
    kern_matmul_swiglu(g_gpu, to.g, tu.g, wg.g, wu.g, rows, tx.g, n);
    const product_ref_t ref = {&wg, &wu, x, n};
    check_floats_ref(&to, yn, TOL_MATMUL, &ref, name);

    char sub[220];
    snprintf(sub, sizeof sub, "%s cuda fused == cuda matmul_multi+swiglu", name);
    float *go = gpu_copy(NULL, yn * sizeof(float)), *gu = gpu_copy(NULL, yn * sizeof(float));
    float *const ys[2] = {go, gu};
    const kern_weight_t *const ws[2] = {wg.g, wu.g};
    kern_matmul_multi(g_gpu, ys, ws, 2, tx.g, n);
    kern_swiglu(g_gpu, go, go, gu, (int)yn);
    const bool same = gpu_same(go, to.g, yn * sizeof(float), sub);
    result(same, sub, "out %s (fused op %s)", same ? "bit-equal" : "DIFFERS",
           g_gpu->ops->matmul_swiglu ? "present" : "NULL: the wrapper ran the plain ops");
    kern_free(g_gpu, go);
    kern_free(g_gpu, gu);
    twin_free(&tx);
    twin_free(&to);
    twin_free(&tu);
    free(x);
    qweight_free(&wg);
    qweight_free(&wu);
}

/* ------------------------------------------------------------------------------------------------
 * rmsnorm, rope, swiglu, add */

static void test_rmsnorm(int n, int dim, float eps)
{
    char name[128];
    snprintf(name, sizeof name, "rmsnorm n=%d dim=%d eps=%g", n, dim, eps);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->rmsnorm, name)) return;
    float *x = xmalloc((size_t)n * dim * sizeof(float)), *w = xmalloc((size_t)dim * sizeof(float));
    fill_gauss(x, (size_t)n * dim, 1.0f);
    for (int r = 0; r < n; r++) { /* rows of very different scale */
        const float s = r % 4 == 1 ? 1e3f : r % 4 == 2 ? 1e-3f : r % 4 == 3 ? 30.0f : 1.0f;
        for (int i = 0; i < dim; i++) x[(size_t)r * dim + i] *= s;
    }
    for (int i = 0; i < dim; i++) w[i] = 1.0f + 0.3f * rnd_gauss();
    twin_t tx = twin_new((size_t)n * dim * sizeof(float), x), tw = twin_new((size_t)dim * sizeof(float), w),
           ty = twin_new((size_t)n * dim * sizeof(float), NULL);
    kern_rmsnorm(g_cpu, ty.c, tx.c, tw.c, n, dim, eps);
    kern_rmsnorm(g_gpu, ty.g, tx.g, tw.g, n, dim, eps);
    check_floats(&ty, (size_t)n * dim, TOL_EW, name);
    /* in place (y == x), as a caller may do */
    char name2[160];
    snprintf(name2, sizeof name2, "%s in-place", name);
    kern_rmsnorm(g_cpu, tx.c, tx.c, tw.c, n, dim, eps);
    kern_rmsnorm(g_gpu, tx.g, tx.g, tw.g, n, dim, eps);
    check_floats(&tx, (size_t)n * dim, TOL_EW, name2);
    twin_free(&tx);
    twin_free(&tw);
    twin_free(&ty);
    free(x);
    free(w);
}

/* add_rmsnorm: x += delta, then y = rmsnorm(x) * weight. The updated x must be bit-equal (an f32
 * add), y within the rmsnorm bound; then the call the model makes, delta == y (the previous op's
 * output in the buffer the norm writes); then the CUDA call bit-equal to CUDA add + rmsnorm (the
 * plain ops kern_add_rmsnorm runs where the op is NULL: the fused op must equal them). */
static void test_add_rmsnorm(int n, int dim, float eps)
{
    char name[128];
    snprintf(name, sizeof name, "add_rmsnorm n=%d dim=%d eps=%g", n, dim, eps);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->add, name) ||
        !have_op((const void *)g_gpu->ops->rmsnorm, name))
        return;
    const size_t cnt = (size_t)n * dim;
    float *x = xmalloc(cnt * sizeof(float)), *d = xmalloc(cnt * sizeof(float)), *w = xmalloc((size_t)dim * sizeof(float));
    fill_gauss(x, cnt, 1.0f);
    fill_gauss(d, cnt, 0.5f);
    for (int r = 0; r < n; r++) { /* rows of very different scale, and one that the add cancels to zero */
        const float s = r % 5 == 1 ? 1e3f : r % 5 == 2 ? 1e-3f : r % 5 == 3 ? 30.0f : 1.0f;
        for (int i = 0; i < dim; i++) {
            float *xi = &x[(size_t)r * dim + i], *di = &d[(size_t)r * dim + i];
            *xi *= s, *di = r % 5 == 4 ? -*xi : *di * s;
        }
    }
    for (int i = 0; i < dim; i++) w[i] = 1.0f + 0.3f * rnd_gauss();
    twin_t tx = twin_new(cnt * sizeof(float), x), td = twin_new(cnt * sizeof(float), d),
           tw = twin_new((size_t)dim * sizeof(float), w), ty = twin_new(cnt * sizeof(float), NULL);
    kern_add_rmsnorm(g_cpu, ty.c, tx.c, td.c, tw.c, n, dim, eps);
    kern_add_rmsnorm(g_gpu, ty.g, tx.g, td.g, tw.g, n, dim, eps);
    char sub[200];
    snprintf(sub, sizeof sub, "%s x", name);
    check_floats(&tx, cnt, 0, sub);
    snprintf(sub, sizeof sub, "%s y", name);
    check_floats(&ty, cnt, TOL_EW, sub);

    /* the CUDA op against CUDA add then rmsnorm on copies of the same inputs */
    float *gx = gpu_copy(x, cnt * sizeof(float)), *gy = gpu_copy(NULL, cnt * sizeof(float));
    kern_add(g_gpu, gx, td.g, n * dim);
    kern_rmsnorm(g_gpu, gy, gx, tw.g, n, dim, eps);
    snprintf(sub, sizeof sub, "%s cuda fused == cuda add+rmsnorm", name);
    const bool same_x = gpu_same(gx, tx.g, cnt * sizeof(float), sub), same_y = same_x && gpu_same(gy, ty.g, cnt * sizeof(float), sub);
    result(same_x && same_y, sub, "x %s, y %s (fused op %s)", same_x ? "bit-equal" : "DIFFERS",
           same_y ? "bit-equal" : same_x ? "DIFFERS" : "not compared",
           g_gpu->ops->add_rmsnorm ? "present" : "NULL: the wrapper ran the plain ops");
    kern_free(g_gpu, gx);
    kern_free(g_gpu, gy);

    /* delta == y, as model.c calls it: kern_add_rmsnorm(be, xb, x, xb, norm, ...) */
    twin_t ax = twin_new(cnt * sizeof(float), x), ay = twin_new(cnt * sizeof(float), d);
    kern_add_rmsnorm(g_cpu, ay.c, ax.c, ay.c, tw.c, n, dim, eps);
    kern_add_rmsnorm(g_gpu, ay.g, ax.g, ay.g, tw.g, n, dim, eps);
    snprintf(sub, sizeof sub, "%s delta==y x", name);
    check_floats(&ax, cnt, 0, sub);
    snprintf(sub, sizeof sub, "%s delta==y y", name);
    check_floats(&ay, cnt, TOL_EW, sub);
    twin_t *all[] = {&tx, &td, &tw, &ty, &ax, &ay};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) twin_free(all[i]);
    free(x);
    free(d);
    free(w);
}

static bool g_rope_neox;    /* the next test_rope cases rotate NeoX pairs (Qwen, Phi-3, Gemma) */
static float g_rope_mscale; /* ... with this cos/sin multiplier (Phi-3's attn_factor), 0 for none */

static void test_rope(int n, int n_heads, int head_dim, int n_rot, float base, float freq_scale, bool factors,
                      int max_pos)
{
    char name[192];
    snprintf(name, sizeof name, "rope n=%d heads=%d head_dim=%d n_rot=%d base=%g freq_scale=%g%s%s mscale=%g max_pos=%d", n,
             n_heads, head_dim, n_rot, base, freq_scale, factors ? " freq_factors" : "", g_rope_neox ? " neox" : "",
             g_rope_mscale, max_pos);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->rope, name)) return;
    const size_t cnt = (size_t)n * n_heads * head_dim;
    float *x = xmalloc(cnt * sizeof(float)), *ff = xmalloc((size_t)(n_rot / 2 + 1) * sizeof(float));
    int32_t *pos = xmalloc((size_t)n * sizeof(int32_t));
    fill_gauss(x, cnt, 1.0f);
    for (int i = 0; i < n; i++) pos[i] = i == 0 ? 0 : i == 1 ? max_pos : rnd_int(max_pos + 1);
    for (int i = 0; i < n_rot / 2 + 1; i++) ff[i] = 1.0f + 7.0f * (float)rnd_unif();
    twin_t tx = twin_new(cnt * sizeof(float), x), tp = twin_new((size_t)n * sizeof(int32_t), pos),
           tf = twin_new((size_t)(n_rot / 2 + 1) * sizeof(float), ff);
    kern_rope_t rc = {.n_rot = n_rot, .freq_base = base, .freq_scale = freq_scale, .freq_factors = factors ? tf.c : NULL,
                      .neox = g_rope_neox, .mscale = g_rope_mscale};
    kern_rope_t rg = rc;
    rg.freq_factors = factors ? tf.g : NULL; /* backend memory, as model.c loads rope_freqs */
    kern_rope(g_cpu, tx.c, tp.c, n, n_heads, head_dim, &rc);
    kern_rope(g_gpu, tx.g, tp.g, n, n_heads, head_dim, &rg);
    check_floats(&tx, cnt, TOL_ROPE, name);
    twin_free(&tx);
    twin_free(&tp);
    twin_free(&tf);
    free(x);
    free(ff);
    free(pos);
}

static void test_swiglu(int n)
{
    char name[64];
    snprintf(name, sizeof name, "swiglu n=%d", n);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->swiglu, name)) return;
    float *g = xmalloc((size_t)n * sizeof(float)), *u = xmalloc((size_t)n * sizeof(float));
    fill_gauss(g, (size_t)n, 3.0f);
    fill_gauss(u, (size_t)n, 1.0f);
    static const float edge[] = {0.0f, -0.0f, 30.0f, -30.0f, 88.0f, -88.0f, 100.0f, -100.0f, 1e-8f, -1e-8f};
    for (int i = 0; i < n && i < (int)(sizeof edge / sizeof edge[0]); i++) g[(size_t)i * 7 % (size_t)n] = edge[i];
    twin_t tg = twin_new((size_t)n * sizeof(float), g), tu = twin_new((size_t)n * sizeof(float), u),
           to = twin_new((size_t)n * sizeof(float), NULL);
    kern_swiglu(g_cpu, to.c, tg.c, tu.c, n);
    kern_swiglu(g_gpu, to.g, tg.g, tu.g, n);
    check_floats(&to, (size_t)n, TOL_EW, name);
    twin_free(&tg);
    twin_free(&tu);
    twin_free(&to);
    free(g);
    free(u);
}

static void test_add(int n)
{
    char name[64];
    snprintf(name, sizeof name, "add n=%d", n);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->add, name)) return;
    float *y = xmalloc((size_t)n * sizeof(float)), *x = xmalloc((size_t)n * sizeof(float));
    fill_gauss(y, (size_t)n, 1.0f);
    fill_gauss(x, (size_t)n, 10.0f);
    twin_t ty = twin_new((size_t)n * sizeof(float), y), tx = twin_new((size_t)n * sizeof(float), x);
    kern_add(g_cpu, ty.c, tx.c, n);
    kern_add(g_gpu, ty.g, tx.g, n);
    check_floats(&ty, (size_t)n, 0, name);
    twin_free(&ty);
    twin_free(&tx);
    free(y);
    free(x);
}

/* The element-wise ops of the families beyond Llama: Q/K/V bias (y + b per row) and scale are single
 * IEEE operations (bit-equal); soft-capping's tanh and GeGLU's table (looked up at the f16-rounded
 * gate, as the CPU does) within the element-wise bound. Gates and values span +-10, where GeGLU
 * switches formula, and the f16 table's whole range. */
static void test_family_ops(int n, int dim)
{
    char name[96];
    snprintf(name, sizeof name, "family ops (bias, scale, softcap, geglu) n=%d dim=%d", n, dim);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->add_bias, name) ||
        !have_op((const void *)g_gpu->ops->scale, name) || !have_op((const void *)g_gpu->ops->softcap, name) ||
        !have_op((const void *)g_gpu->ops->geglu, name))
        return;
    const size_t cnt = (size_t)n * dim;
    float *x = xmalloc(cnt * sizeof(float)), *u = xmalloc(cnt * sizeof(float)), *b = xmalloc((size_t)dim * sizeof(float));
    fill_gauss(x, cnt, 6.0f);
    fill_gauss(u, cnt, 1.0f);
    fill_gauss(b, (size_t)dim, 1.0f);
    static const float edge[] = {-10.0f, 10.0f, 9.999999f, -9.999999f, 0.0f, -0.0f, 65504.0f, -70000.0f, 1e-8f, 60.0f};
    for (int i = 0; i < (int)(sizeof edge / sizeof edge[0]) && (size_t)i < cnt; i++) x[(size_t)i * 13 % cnt] = edge[i];
    twin_t tx = twin_new(cnt * sizeof(float), x), tu = twin_new(cnt * sizeof(float), u),
           tb = twin_new((size_t)dim * sizeof(float), b), ty = twin_new(cnt * sizeof(float), NULL);
    char sub[160];
    kern_upload(g_cpu, ty.c, x, cnt * sizeof(float));
    kern_upload(g_gpu, ty.g, x, cnt * sizeof(float));
    kern_add_bias(g_cpu, ty.c, tb.c, n, dim);
    kern_add_bias(g_gpu, ty.g, tb.g, n, dim);
    snprintf(sub, sizeof sub, "%s: add_bias", name);
    check_floats(&ty, cnt, 0, sub);
    kern_scale(g_cpu, ty.c, 0.125f, (int)cnt);
    kern_scale(g_gpu, ty.g, 0.125f, (int)cnt);
    snprintf(sub, sizeof sub, "%s: scale", name);
    check_floats(&ty, cnt, 0, sub);
    kern_upload(g_cpu, ty.c, x, cnt * sizeof(float));
    kern_upload(g_gpu, ty.g, x, cnt * sizeof(float));
    kern_softcap(g_cpu, ty.c, 30.0f, (int)cnt);
    kern_softcap(g_gpu, ty.g, 30.0f, (int)cnt);
    snprintf(sub, sizeof sub, "%s: softcap 30", name);
    check_floats(&ty, cnt, TOL_EW, sub);
    kern_geglu(g_cpu, ty.c, tx.c, tu.c, (int)cnt);
    kern_geglu(g_gpu, ty.g, tx.g, tu.g, (int)cnt);
    snprintf(sub, sizeof sub, "%s: geglu", name);
    check_floats(&ty, cnt, TOL_EW, sub);
    twin_free(&tx);
    twin_free(&tu);
    twin_free(&tb);
    twin_free(&ty);
    free(x);
    free(u);
    free(b);
}

/* ------------------------------------------------------------------------------------------------
 * kv_store and attention */

static bool check_pool(const twin_t *t, size_t n_halves, const char *name)
{
    fl_f16_t *hc = xmalloc(n_halves * sizeof(fl_f16_t)), *hg = xmalloc(n_halves * sizeof(fl_f16_t));
    bool ok = false;
    if (twin_get(t, hc, hg, n_halves * sizeof(fl_f16_t), name)) {
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < n_halves; i++)
            if (hc[i] != hg[i] && !bad++) first = i;
        ok = bad == 0;
        if (bad)
            result(false, name, "%zu of %zu f16 values differ (first at %zu: cuda 0x%04x cpu 0x%04x)", bad, n_halves,
                   first, hg[first], hc[first]);
    }
    free(hc);
    free(hg);
    return ok;
}

/* A quantized pool's bytes, equal on both backends (a Q8_0 or Q4_0 block is d, then its quants). */
static bool check_pool_bytes(const twin_t *t, const char *name)
{
    uint8_t *hc = xmalloc(t->bytes), *hg = xmalloc(t->bytes);
    bool ok = false;
    if (twin_get(t, hc, hg, t->bytes, name)) {
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < t->bytes; i++)
            if (hc[i] != hg[i] && !bad++) first = i;
        ok = bad == 0;
        if (bad)
            result(false, name, "%zu of %zu bytes differ (first at %zu: cuda 0x%02x cpu 0x%02x)", bad, t->bytes, first,
                   hg[first], hc[first]);
    }
    free(hc);
    free(hg);
    return ok;
}

static bool check_kv_pool(const twin_t *t, int type, const char *name)
{
    return type == FL_TYPE_F16 ? check_pool(t, t->bytes / sizeof(fl_f16_t), name) : check_pool_bytes(t, name);
}

/* A pool of n_slots rows of kv_dim elements of `type`, each row random: f16 of N(0, 1), or a
 * quantization (the CPU's reference quantizer) of such a row. */
static void *kv_pool_random(int type, int n_slots, int kv_dim)
{
    const size_t row = kern_kv_row_bytes(type, kv_dim);
    uint8_t *pool = xmalloc((size_t)n_slots * row);
    float *x = xmalloc((size_t)kv_dim * sizeof(float));
    for (int i = 0; i < n_slots; i++) {
        fill_gauss(x, (size_t)kv_dim, 1.0f);
        quant_quantize_row(type, x, pool + (size_t)i * row, kv_dim);
    }
    free(x);
    return pool;
}

/* kv_store of n rows into random slots, then kv_move of some slots onto others (a chain: a pair's
 * destination is a later pair's source), on pools of k_type and v_type: both backends' pools equal
 * after each (f16: RNE; Q8_0 / Q4_0: the CPU's quantizer, bit for bit). The quantized rows include
 * a block of zeros led by -0, a block whose two largest magnitudes tie with opposite signs (Q4_0
 * keeps the first), subnormals, and a block of one value (every quant at its end). */
static void test_kv_store(int n, int kv_dim, int n_slots, int k_type, int v_type)
{
    char name[160];
    snprintf(name, sizeof name, "kv_store %s/%s n=%d kv_dim=%d slots=%d", fl_dtype_name(k_type), fl_dtype_name(v_type),
             n, kv_dim, n_slots);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->kv_store, name) ||
        !have_op((const void *)g_gpu->ops->kv_move, name))
        return;
    void *kinit = kv_pool_random(k_type, n_slots, kv_dim), *vinit = kv_pool_random(v_type, n_slots, kv_dim);
    const size_t kbytes = (size_t)n_slots * kern_kv_row_bytes(k_type, kv_dim),
                 vbytes = (size_t)n_slots * kern_kv_row_bytes(v_type, kv_dim);
    float *k = xmalloc((size_t)n * kv_dim * sizeof(float)), *v = xmalloc((size_t)n * kv_dim * sizeof(float));
    fill_gauss(k, (size_t)n * kv_dim, 2.0f);
    fill_gauss(v, (size_t)n * kv_dim, 2.0f);
    if (n * kv_dim > 8) k[1] = 70000.0f, k[2] = -1e-7f, v[3] = 65504.0f, v[4] = 3e-8f; /* overflow, subnormals */
    if (kv_dim >= 128) {
        float *r = k + (size_t)(n - 1) * kv_dim, *w = v + (size_t)(n - 1) * kv_dim;
        for (int j = 0; j < 32; j++) r[j] = 0.0f, r[32 + j] = 0.1f * (float)(j % 7) - 0.3f, w[64 + j] = 1e-41f * (float)j,
                                     w[96 + j] = 3.0f;
        r[0] = -0.0f, r[32 + 3] = 5.0f, r[32 + 20] = -5.0f;
    }
    int32_t *slots = xmalloc((size_t)n * sizeof(int32_t)), *perm = xmalloc((size_t)n_slots * sizeof(int32_t));
    for (int i = 0; i < n_slots; i++) perm[i] = i;
    for (int i = n_slots - 1; i > 0; i--) {
        const int j = rnd_int(i + 1), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    for (int i = 0; i < n; i++) slots[i] = perm[i];
    twin_t kc = twin_new(kbytes, kinit), vc = twin_new(vbytes, vinit),
           tk = twin_new((size_t)n * kv_dim * sizeof(float), k), tv = twin_new((size_t)n * kv_dim * sizeof(float), v),
           ts = twin_new((size_t)n * sizeof(int32_t), slots);
    kern_kv_store(g_cpu, kc.c, vc.c, k_type, v_type, tk.c, tv.c, ts.c, n, kv_dim);
    kern_kv_store(g_gpu, kc.g, vc.g, k_type, v_type, tk.g, tv.g, ts.g, n, kv_dim);
    char kn[200], vn[200];
    snprintf(kn, sizeof kn, "%s (K pool)", name);
    snprintf(vn, sizeof vn, "%s (V pool)", name);
    if (check_kv_pool(&kc, k_type, kn) && check_kv_pool(&vc, v_type, vn)) {
        /* kv_move: up to 40 pairs, each destination the next pair's source */
        const int m = n_slots / 2 < 40 ? n_slots / 2 : 40;
        int32_t *src = xmalloc((size_t)m * sizeof(int32_t)), *dst = xmalloc((size_t)m * sizeof(int32_t));
        for (int i = 0; i < m; i++) src[i] = i ? dst[i - 1] : perm[0], dst[i] = perm[n_slots - 1 - i];
        kern_kv_move(g_cpu, kc.c, vc.c, k_type, v_type, src, dst, m, kv_dim);
        kern_kv_move(g_gpu, kc.g, vc.g, k_type, v_type, src, dst, m, kv_dim);
        snprintf(kn, sizeof kn, "%s kv_move (K pool)", name);
        snprintf(vn, sizeof vn, "%s kv_move (V pool)", name);
        if (check_kv_pool(&kc, k_type, kn) && check_kv_pool(&vc, v_type, vn))
            result(true, name, "pools bit-equal after the store and after %d moves", m);
        free(src);
        free(dst);
    }
    twin_free(&kc);
    twin_free(&vc);
    twin_free(&tk);
    twin_free(&tv);
    twin_free(&ts);
    free(kinit);
    free(vinit);
    free(k);
    free(v);
    free(slots);
    free(perm);
}

/* One f16 ulp at the magnitude of a (finite, below the f16 range's end): 2^(e-10) for a in
 * [2^e, 2^(e+1)), 2^-24 among the subnormals. */
static double f16_ulp(double a)
{
    a = fabs(a);
    if (a < 0x1p-14) return 0x1p-24;
    int e;
    frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    return ldexp(1.0, e - 11);
}

/* rope_kv_store: RoPE on q and k, then k and v to the pools at slots (-1: a padding row, which
 * stores nothing), as test_rope and test_kv_store check them apart. q and k after the call are
 * compared as rope's (NMSE <= TOL_ROPE), the V pool bit-equal. The K pool now holds rotated values,
 * and the backends' rotations differ by a few f32 ulp (rope's bound), so its f16 values may differ
 * where the two rotated values round differently; per element, with kc, kg each backend's rotated k
 * (downloaded) and Kc = f16(kc), Kg = f16(kg) (RNE, each within half an f16 ulp of its input):
 *     |Kg - Kc| <= |kg - kc| + f16_ulp(max(|kg|, |kc|))
 * (one f16 ulp, or two across a binade edge, for a rotated difference of f32 ulps). Exact parts:
 * each backend's K pool is bit-equal to f16 of its own k after the call (kv_store of the rotated k,
 * as kernels.h defines the op), slots no row names keep their initial bits, and the CUDA call is
 * bit-equal to CUDA rope, rope, kv_store on copies of the same inputs. */
static void test_rope_kv_store(int n, int n_heads, int n_kv, int head_dim, int n_rot, float base, float freq_scale,
                               bool factors, int n_slots)
{
    const int max_pos = g_quick ? 700 : 5000;
    char name[200];
    snprintf(name, sizeof name,
             "rope_kv_store n=%d heads=%d kv_heads=%d head_dim=%d n_rot=%d base=%g freq_scale=%g%s slots=%d max_pos=%d",
             n, n_heads, n_kv, head_dim, n_rot, base, freq_scale, factors ? " freq_factors" : "", n_slots, max_pos);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->rope, name) ||
        !have_op((const void *)g_gpu->ops->kv_store, name))
        return;
    const int kv_dim = n_kv * head_dim, n_ff = n_rot / 2 + 1;
    const size_t qn = (size_t)n * n_heads * head_dim, kn = (size_t)n * kv_dim, pool = (size_t)n_slots * kv_dim;
    float *q = xmalloc(qn * sizeof(float)), *k = xmalloc(kn * sizeof(float)), *v = xmalloc(kn * sizeof(float)),
          *ff = xmalloc((size_t)n_ff * sizeof(float));
    fill_gauss(q, qn, 1.0f);
    fill_gauss(k, kn, 1.0f);
    fill_gauss(v, kn, 2.0f);
    /* row 0 is at position 0 (angles 0: cos 1, sin 0 on both backends, k unchanged): f16 overflow and
     * subnormals in K and V */
    if (kv_dim > 8) k[1] = 70000.0f, k[2] = -1e-7f, v[3] = 65504.0f, v[4] = 3e-8f;
    for (int i = 0; i < n_ff; i++) ff[i] = 1.0f + 7.0f * (float)rnd_unif();
    int32_t *pos = xmalloc((size_t)n * sizeof(int32_t)), *slots = xmalloc((size_t)n * sizeof(int32_t)),
            *perm = xmalloc((size_t)n_slots * sizeof(int32_t)), *owner = xmalloc((size_t)n_slots * sizeof(int32_t));
    for (int i = 0; i < n; i++) pos[i] = i == 0 ? 0 : i == 1 ? max_pos : rnd_int(max_pos + 1);
    for (int i = 0; i < n_slots; i++) perm[i] = i, owner[i] = -1;
    for (int i = n_slots - 1; i > 0; i--) {
        const int j = rnd_int(i + 1), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    for (int i = 0; i < n; i++) {
        slots[i] = i % 4 == 2 ? -1 : perm[i]; /* padding rows: rotated, stored nowhere */
        if (slots[i] >= 0) owner[slots[i]] = i;
    }
    fl_f16_t *kinit = xmalloc(pool * sizeof(fl_f16_t)), *vinit = xmalloc(pool * sizeof(fl_f16_t));
    for (size_t i = 0; i < pool; i++) kinit[i] = fl_f32_to_f16(rnd_gauss()), vinit[i] = fl_f32_to_f16(rnd_gauss());
    twin_t tq = twin_new(qn * sizeof(float), q), tk = twin_new(kn * sizeof(float), k), tv = twin_new(kn * sizeof(float), v),
           kc = twin_new(pool * sizeof(fl_f16_t), kinit), vc = twin_new(pool * sizeof(fl_f16_t), vinit),
           tp = twin_new((size_t)n * sizeof(int32_t), pos), ts = twin_new((size_t)n * sizeof(int32_t), slots),
           tf = twin_new((size_t)n_ff * sizeof(float), ff);
    kern_rope_t rc = {.n_rot = n_rot, .freq_base = base, .freq_scale = freq_scale, .freq_factors = factors ? tf.c : NULL,
                      .neox = g_rope_neox, .mscale = g_rope_mscale};
    kern_rope_t rg = rc;
    rg.freq_factors = factors ? tf.g : NULL;
    kern_rope_kv_store(g_cpu, tq.c, tk.c, tv.c, kc.c, vc.c, FL_TYPE_F16, FL_TYPE_F16, tp.c, ts.c, n, n_heads, n_kv, head_dim, &rc);
    kern_rope_kv_store(g_gpu, tq.g, tk.g, tv.g, kc.g, vc.g, FL_TYPE_F16, FL_TYPE_F16, tp.g, ts.g, n, n_heads, n_kv, head_dim, &rg);
    char sub[300];
    snprintf(sub, sizeof sub, "%s q", name);
    check_floats(&tq, qn, TOL_ROPE, sub);
    snprintf(sub, sizeof sub, "%s k", name);
    check_floats(&tk, kn, TOL_ROPE, sub);
    snprintf(sub, sizeof sub, "%s (V pool)", name);
    if (check_pool(&vc, pool, sub)) result(true, sub, "bit-equal");

    /* K pool */
    snprintf(sub, sizeof sub, "%s (K pool)", name);
    float *kfc = xmalloc(kn * sizeof(float)), *kfg = xmalloc(kn * sizeof(float));
    fl_f16_t *hc = xmalloc(pool * sizeof(fl_f16_t)), *hg = xmalloc(pool * sizeof(fl_f16_t));
    if (twin_get(&tk, kfc, kfg, kn * sizeof(float), sub) && twin_get(&kc, hc, hg, pool * sizeof(fl_f16_t), sub)) {
        size_t untouched_bad = 0, inconsistent = 0, beyond = 0, differ = 0;
        double worst = 0; /* the largest |Kg - Kc| in f16 ulps */
        for (int s = 0; s < n_slots; s++) {
            const int r = owner[s];
            for (int dd = 0; dd < kv_dim; dd++) {
                const size_t pi = (size_t)s * kv_dim + dd;
                if (r < 0) {
                    untouched_bad += hc[pi] != kinit[pi] || hg[pi] != kinit[pi];
                    continue;
                }
                const float ac = kfc[(size_t)r * kv_dim + dd], ag = kfg[(size_t)r * kv_dim + dd];
                inconsistent += hc[pi] != fl_f32_to_f16(ac) || hg[pi] != fl_f32_to_f16(ag);
                if (hc[pi] == hg[pi]) continue;
                differ++;
                const double vcf = fl_f16_to_f32(hc[pi]), vgf = fl_f16_to_f32(hg[pi]);
                const double ulp = f16_ulp(fmax(fabs((double)ac), fabs((double)ag)));
                const double diff = fabs(vgf - vcf); /* NaN (a non-finite mismatch) fails below */
                if (!(diff <= fabs((double)ag - (double)ac) + ulp)) beyond++;
                if (!(diff / ulp <= worst)) worst = diff / ulp;
            }
        }
        result(untouched_bad == 0 && inconsistent == 0 && beyond == 0, sub,
               "differing=%zu of %zu (max %.3g f16 ulp) beyond |dk|+1ulp=%zu; pool != f16(own k)=%zu; unwritten "
               "slots changed=%zu",
               differ, pool, worst, beyond, inconsistent, untouched_bad);
    }
    free(kfc);
    free(kfg);
    free(hc);
    free(hg);

    /* the CUDA op against CUDA rope, rope, kv_store on copies of the same inputs */
    snprintf(sub, sizeof sub, "%s cuda fused == cuda rope+rope+kv_store", name);
    float *gq = gpu_copy(q, qn * sizeof(float)), *gk = gpu_copy(k, kn * sizeof(float));
    fl_f16_t *gkc = gpu_copy(kinit, pool * sizeof(fl_f16_t)), *gvc = gpu_copy(vinit, pool * sizeof(fl_f16_t));
    kern_rope(g_gpu, gq, tp.g, n, n_heads, head_dim, &rg);
    kern_rope(g_gpu, gk, tp.g, n, n_kv, head_dim, &rg);
    kern_kv_store(g_gpu, gkc, gvc, FL_TYPE_F16, FL_TYPE_F16, gk, tv.g, ts.g, n, kv_dim);
    const bool sq = gpu_same(gq, tq.g, qn * sizeof(float), sub), sk = gpu_same(gk, tk.g, kn * sizeof(float), sub),
               skc = gpu_same(gkc, kc.g, pool * sizeof(fl_f16_t), sub),
               svc = gpu_same(gvc, vc.g, pool * sizeof(fl_f16_t), sub);
    result(sq && sk && skc && svc, sub, "q %s, k %s, K pool %s, V pool %s (fused op %s)", sq ? "equal" : "DIFFERS",
           sk ? "equal" : "DIFFERS", skc ? "equal" : "DIFFERS", svc ? "equal" : "DIFFERS",
           g_gpu->ops->rope_kv_store ? "present" : "NULL: the wrapper ran the plain ops");
    kern_free(g_gpu, gq);
    kern_free(g_gpu, gk);
    kern_free(g_gpu, gkc);
    kern_free(g_gpu, gvc);

    twin_t *all[] = {&tq, &tk, &tv, &kc, &vc, &tp, &ts, &tf};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) twin_free(all[i]);
    free(q);
    free(k);
    free(v);
    free(ff);
    free(pos);
    free(slots);
    free(perm);
    free(owner);
    free(kinit);
    free(vinit);
}

/* Exact attention for the call a describes (its CPU-side arrays), in f64 over the pools' dequantized
 * rows and the unrounded q, with kern_attn_t's masks; a soft-cap in the flash form the quantized
 * paths use (cap * tanh(s * scale / cap)). */
typedef struct attn_exact {
    const kern_attn_t *a; /* CPU-side pointers; tree arrays as the call had them */
    const float *q;       /* host q */
    const void *k_pool, *v_pool;
    int n_slots;
} attn_exact_t;

static void attn_exact(const attn_exact_t *x, double *out)
{
    const kern_attn_t *a = x->a;
    const int hd = a->head_dim, kv_dim = a->n_kv_heads * hd, group = a->n_heads / a->n_kv_heads;
    const size_t krow = kern_kv_row_bytes(kern_kv_type(a->k_type), kv_dim),
                 vrow = kern_kv_row_bytes(kern_kv_type(a->v_type), kv_dim);
    float *kf = xmalloc((size_t)x->n_slots * kv_dim * sizeof(float)), *vf = xmalloc((size_t)x->n_slots * kv_dim * sizeof(float));
    for (int i = 0; i < x->n_slots; i++) {
        quant_dequantize_row(kern_kv_type(a->k_type), (const uint8_t *)x->k_pool + (size_t)i * krow, kf + (size_t)i * kv_dim, kv_dim);
        quant_dequantize_row(kern_kv_type(a->v_type), (const uint8_t *)x->v_pool + (size_t)i * vrow, vf + (size_t)i * kv_dim, kv_dim);
    }
    double *p = NULL;
    for (int t = 0; t < a->n_tokens; t++) {
        const int len = kern_attn_len(a, t), pos = a->tok_pos[t];
        const int ts = a->tree_mask ? a->tree_start[t] : 0;
        p = realloc(p, (size_t)(len > 0 ? len : 1) * sizeof(double));
        const int32_t *bt = a->block_tables + (size_t)a->tok_seq[t] * a->max_blocks;
        for (int h = 0; h < a->n_heads; h++) {
            const float *qh = x->q + ((size_t)t * a->n_heads + h) * hd;
            const size_t hoff = (size_t)(h / group) * hd;
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j < len; j++) {
                p[j] = -INFINITY;
                if (a->window > 0 && j < pos - a->window + 1) continue;
                if (a->tree_mask && j >= ts && !((a->tree_mask[t] >> (j - ts)) & 1u)) continue;
                const float *kr = kf + ((size_t)bt[j / a->block_size] * a->block_size + j % a->block_size) * kv_dim + hoff;
                double dot = 0.0;
                for (int d = 0; d < hd; d++) dot += (double)qh[d] * kr[d];
                p[j] = a->softcap > 0.0f ? a->softcap * tanh(dot * a->scale / a->softcap) : dot * a->scale;
                mx = p[j] > mx ? p[j] : mx;
            }
            double *o = out + ((size_t)t * a->n_heads + h) * hd;
            for (int d = 0; d < hd; d++) o[d] = 0.0;
            for (int j = 0; j < len; j++) {
                if (p[j] == -INFINITY) continue;
                const double w = exp(p[j] - mx);
                sum += w;
                const float *vr = vf + ((size_t)bt[j / a->block_size] * a->block_size + j % a->block_size) * kv_dim + hoff;
                for (int d = 0; d < hd; d++) o[d] += w * vr[d];
            }
            for (int d = 0; d < hd; d++) o[d] = sum > 0.0 ? o[d] / sum : 0.0;
        }
    }
    free(p);
    free(kf);
    free(vf);
}

static double nmse_exact(const float *y, const double *exact, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(y[i])) return INFINITY;
        num += (y[i] - exact[i]) * (y[i] - exact[i]);
        den += exact[i] * exact[i];
    }
    return den > 0.0 ? num / den : num;
}

/* The attention bound; with ex (quantized pools), CUDA is also held to TOL_ATTN against exact
 * attention (it rounds only q, and in the tiled kernel K and V, to fp16; the self-check's stand-in,
 * a CPU backend, to the bound itself), and the CPU's own distance from exact is printed beside it. */
static void check_attn(const twin_t *t, size_t n, double tol, const attn_exact_t *ex, const char *name)
{
    if (!ex) {
        check_floats(t, n, tol, name);
        return;
    }
    float *hc = xmalloc(n * sizeof(float)), *hg = xmalloc(n * sizeof(float));
    double *exact = xmalloc(n * sizeof(double));
    if (twin_get(t, hc, hg, n * sizeof(float), name)) {
        attn_exact(ex, exact);
        const double e = nmse(hg, hc, n), eg = nmse_exact(hg, exact, n), ec = nmse_exact(hc, exact, n);
        const double tol_exact = g_selfcheck ? tol : TOL_ATTN;
        result(e <= tol && eg <= tol_exact, name,
               "err=%.3g (tol %.0e) max_abs=%.3g; against exact: cuda %.3g (tol %.0e), cpu %.3g", e, tol,
               max_abs(hg, hc, n), eg, tol_exact, ec);
    }
    free(hc);
    free(hg);
    free(exact);
}

/* One sequence of an attention call: len positions in the cache after this call, the last n_new of
 * them being this call's query tokens (n_new == 1: decode; more: a prefill chunk). */
typedef struct seq_spec {
    int len, n_new;
} seq_spec_t;

/* Pools hold the context before this call (same random f16 on both backends); the new tokens' K/V
 * are written by kv_store on each backend, then attention runs, as model.c does. Blocks are handed
 * out in a random order (scattered block tables), unused table entries are -1. */
static const char *g_attn_variant = ""; /* names the CUDA attention kernel under test */
static int g_attn_k_type = FL_TYPE_F16;  /* the next cases' KV pool types */
static int g_attn_v_type = FL_TYPE_F16;
static int g_attn_window;               /* the next cases' sliding window (Mistral, Gemma), 0 for none */
static float g_attn_softcap;            /* ... and score soft-capping (Gemma 2), 0 for none */

static void test_attention(const char *label, int n_heads, int n_kv, int hd, int bs, const seq_spec_t *seqs,
                           int n_seqs)
{
    char name[256];
    const int kt = g_attn_k_type, vt = g_attn_v_type;
    const bool quantized = kt != FL_TYPE_F16 || vt != FL_TYPE_F16;
    if (quantized && hd % 32) return; /* a quantized head is whole 32-element blocks */
    char kv_label[32] = "";
    if (quantized) snprintf(kv_label, sizeof kv_label, " kv=%s/%s", fl_dtype_name(kt), fl_dtype_name(vt));
    int off = snprintf(name, sizeof name, "attention%s%s %s heads=%d kv_heads=%d head_dim=%d block=%d window=%d softcap=%g seqs=",
                       g_attn_variant, kv_label, label, n_heads, n_kv, hd, bs, g_attn_window, g_attn_softcap);
    int n_tokens = 0, max_blocks = 1, used_blocks = 0, max_len = 0;
    for (int s = 0; s < n_seqs; s++) {
        max_len = seqs[s].len > max_len ? seqs[s].len : max_len;
        if (off < (int)sizeof name - 16)
            off += snprintf(name + off, sizeof name - (size_t)off, "%s%d/%d", s ? "," : "", seqs[s].len, seqs[s].n_new);
        n_tokens += seqs[s].n_new;
        const int nb = (seqs[s].len + bs - 1) / bs;
        max_blocks = nb > max_blocks ? nb : max_blocks;
        used_blocks += nb;
    }
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->attention, name) ||
        !have_op((const void *)g_gpu->ops->kv_store, name))
        return;
    const int n_blocks = used_blocks + 5, kv_dim = n_kv * hd, q_dim = n_heads * hd;
    const size_t kbytes = (size_t)n_blocks * bs * kern_kv_row_bytes(kt, kv_dim),
                 vbytes = (size_t)n_blocks * bs * kern_kv_row_bytes(vt, kv_dim);
    const double tol = quantized ? TOL_ATTN_Q : TOL_ATTN;
    int32_t *perm = xmalloc((size_t)n_blocks * sizeof(int32_t));
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        const int j = rnd_int(i + 1), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    int32_t *tables = xmalloc((size_t)n_seqs * max_blocks * sizeof(int32_t));
    for (size_t i = 0; i < (size_t)n_seqs * max_blocks; i++) tables[i] = -1;
    int next = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int b = 0; b < (seqs[s].len + bs - 1) / bs; b++) tables[(size_t)s * max_blocks + b] = perm[next++];

    void *kp = kv_pool_random(kt, n_blocks * bs, kv_dim), *vp = kv_pool_random(vt, n_blocks * bs, kv_dim);
    int32_t *tseq = xmalloc((size_t)n_tokens * sizeof(int32_t)), *tpos = xmalloc((size_t)n_tokens * sizeof(int32_t)),
            *slots = xmalloc((size_t)n_tokens * sizeof(int32_t));
    int t = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int p = seqs[s].len - seqs[s].n_new; p < seqs[s].len; p++, t++) {
            tseq[t] = s, tpos[t] = p;
            slots[t] = tables[(size_t)s * max_blocks + p / bs] * bs + p % bs;
        }
    float *q = xmalloc((size_t)n_tokens * q_dim * sizeof(float)), *k = xmalloc((size_t)n_tokens * kv_dim * sizeof(float)),
          *v = xmalloc((size_t)n_tokens * kv_dim * sizeof(float));
    fill_gauss(q, (size_t)n_tokens * q_dim, 2.0f); /* scores of std ~2: a peaked but not one-hot softmax */
    fill_gauss(k, (size_t)n_tokens * kv_dim, 1.0f);
    fill_gauss(v, (size_t)n_tokens * kv_dim, 1.0f);

    twin_t kc = twin_new(kbytes, kp), vc = twin_new(vbytes, vp),
           tq = twin_new((size_t)n_tokens * q_dim * sizeof(float), q),
           tk = twin_new((size_t)n_tokens * kv_dim * sizeof(float), k),
           tv = twin_new((size_t)n_tokens * kv_dim * sizeof(float), v),
           tsl = twin_new((size_t)n_tokens * sizeof(int32_t), slots),
           tts = twin_new((size_t)n_tokens * sizeof(int32_t), tseq),
           ttp = twin_new((size_t)n_tokens * sizeof(int32_t), tpos),
           tbt = twin_new((size_t)n_seqs * max_blocks * sizeof(int32_t), tables),
           out = twin_new((size_t)n_tokens * q_dim * sizeof(float), NULL);
    kern_kv_store(g_cpu, kc.c, vc.c, kt, vt, tk.c, tv.c, tsl.c, n_tokens, kv_dim);
    kern_kv_store(g_gpu, kc.g, vc.g, kt, vt, tk.g, tv.g, tsl.g, n_tokens, kv_dim);
    kern_attn_t a = {.k_type = kt, .v_type = vt, .n_tokens = n_tokens, .max_blocks = max_blocks, .block_size = bs, .n_heads = n_heads,
                     .n_kv_heads = n_kv, .head_dim = hd, .scale = 1.0f / sqrtf((float)hd), .max_len = max_len,
                     .window = g_attn_window, .softcap = g_attn_softcap};
    kern_attn_t ac = a, ag = a;
    ac.out = out.c, ac.q = tq.c, ac.k_cache = kc.c, ac.v_cache = vc.c, ac.tok_seq = tts.c, ac.tok_pos = ttp.c,
    ac.block_tables = tbt.c;
    ag.out = out.g, ag.q = tq.g, ag.k_cache = kc.g, ag.v_cache = vc.g, ag.tok_seq = tts.g, ag.tok_pos = ttp.g,
    ag.block_tables = tbt.g;
    kern_attention(g_cpu, &ac);
    kern_attention(g_gpu, &ag);
    attn_exact_t ex = {&ac, q, kc.c, vc.c, n_blocks * bs};
    const attn_exact_t *exp_ref = quantized ? &ex : NULL;
    check_attn(&out, (size_t)n_tokens * q_dim, tol, exp_ref, name);
    /* max_len lets the CUDA backend split long contexts over blocks; without it, one block a
     * (token, head) walks the whole context */
    if (max_len > 256) {
        char unsplit_name[300];
        snprintf(unsplit_name, sizeof unsplit_name, "%s unsplit", name);
        poison_gpu(&out);
        ag.max_len = 0;
        kern_attention(g_gpu, &ag);
        ag.max_len = max_len;
        check_attn(&out, (size_t)n_tokens * q_dim, tol, exp_ref, unsplit_name);
    }
    /* With n_seqs given and many tokens a sequence, the CUDA backend tiles queries (its prefill
     * kernel); the same call without n_seqs above took the per-(token, head) kernel. */
    const bool tiled = n_tokens >= 8 * n_seqs;
    char tiled_name[300];
    snprintf(tiled_name, sizeof tiled_name, "%s tiled", name);
    if (tiled) {
        poison_gpu(&out);
        ag.n_seqs = n_seqs;
        kern_attention(g_gpu, &ag);
        ag.n_seqs = 0;
        check_attn(&out, (size_t)n_tokens * q_dim, tol, exp_ref, tiled_name);
    }

    /* The same tokens as a draft tree per sequence (speculative verification): each new token a
     * child of a random earlier new one, seeing the context, its ancestors and itself. */
    bool tree_fits = true;
    for (int s = 0; s < n_seqs; s++) tree_fits = tree_fits && seqs[s].n_new <= 64;
    if (tree_fits) {
        uint64_t *mask = xmalloc((size_t)n_tokens * sizeof(uint64_t));
        int32_t *start = xmalloc((size_t)n_tokens * sizeof(int32_t));
        t = 0;
        for (int s = 0; s < n_seqs; s++)
            for (int j = 0; j < seqs[s].n_new; j++, t++) {
                start[t] = seqs[s].len - seqs[s].n_new;
                mask[t] = (j ? mask[t - j + rnd_int(j)] : 0) | (1ull << j);
            }
        twin_t tm = twin_new((size_t)n_tokens * sizeof(uint64_t), mask), tst = twin_new((size_t)n_tokens * sizeof(int32_t), start);
        ac.tree_mask = tm.c, ac.tree_start = tst.c, ag.tree_mask = tm.g, ag.tree_start = tst.g;
        kern_attention(g_cpu, &ac);
        kern_attention(g_gpu, &ag);
        char tname[320];
        snprintf(tname, sizeof tname, "%s tree", name);
        check_attn(&out, (size_t)n_tokens * q_dim, tol, exp_ref, tname);
        if (tiled) {
            poison_gpu(&out);
            ag.n_seqs = n_seqs;
            kern_attention(g_gpu, &ag);
            ag.n_seqs = 0;
            snprintf(tname, sizeof tname, "%s tree", tiled_name);
            check_attn(&out, (size_t)n_tokens * q_dim, tol, exp_ref, tname);
        }
        ac.tree_mask = NULL, ac.tree_start = NULL;
        twin_free(&tm);
        twin_free(&tst);
        free(mask);
        free(start);
    }

    twin_t *all[] = {&kc, &vc, &tq, &tk, &tv, &tsl, &tts, &ttp, &tbt, &out};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) twin_free(all[i]);
    free(perm);
    free(tables);
    free(kp);
    free(vp);
    free(tseq);
    free(tpos);
    free(slots);
    free(q);
    free(k);
    free(v);
}

/* ------------------------------------------------------------------------------------------------
 * sample */

static const char *const k_row_kinds[] = {"random", "tie-2", "tie-first-last", "all-equal", "-inf+tie",
                                          "max-last", "peaked", "flat"};
#define N_ROW_KINDS 8

/* Logits per block of the CUDA greedy argmax (ARGMAX_THREADS 256 x ARGMAX_PER_THREAD 8): a row of a
 * larger vocabulary is split over blocks, folded by atomicMax of (value, lowest id) keys. */
#define ARGMAX_CHUNK 2048

/* Two ids a <= b for row variant var: in two different ARGMAX_CHUNK chunks whenever the vocabulary has
 * two (random offsets in the first and last chunk; across the first chunk boundary, where b's offset
 * in its chunk is below a's; the same offset in two chunks; the end of the second-to-last chunk and
 * the last id), else two distinct ids (random, or the last two); 0 and 0 for a vocabulary of 1. */
static void pick_pair(int vocab, int var, int *a, int *b)
{
    const int C = ARGMAX_CHUNK;
    if (vocab <= 1) {
        *a = *b = 0;
        return;
    }
    if (vocab > C) {
        const int last = (vocab - 1) / C; /* the last chunk, >= 1 */
        switch (var % 4) {
        case 0: *a = rnd_int(C), *b = last * C + rnd_int(vocab - last * C); return;
        case 1: *a = C - 1, *b = C; return;
        case 2: {
            const int cb = 1 + rnd_int(last), ca = rnd_int(cb), room = vocab - cb * C, o = rnd_int(room < C ? room : C);
            *a = ca * C + o, *b = cb * C + o;
            return;
        }
        default: *a = last * C - 1, *b = vocab - 1; return;
        }
    }
    if (var % 2) {
        *a = vocab - 2, *b = vocab - 1;
    } else {
        *a = rnd_int(vocab - 1);
        *b = *a + 1 + rnd_int(vocab - 1 - *a);
    }
}

/* Row r of kind r % N_ROW_KINDS, or of `special` (row variant `kind`), for the greedy rule (only
 * values > -inf count, so NaN never wins; the lowest id wins ties; -0 equals +0; a row with no value
 * > -inf gives 0). Returns the id greedy sampling must give, or -1 where the row does not fix one
 * here (the backends are then only compared with each other). Specials:
 *   nan           NaNs sprinkled over a random row
 *   all-inf       every value -inf: 0
 *   all-nan       every value NaN: 0
 *   nan-inf       NaN and -inf mixed, nothing else: 0
 *   nan-inf-one   NaN and -inf mixed and one finite value (at a random id, the last, 0, or the first of
 *                 the second chunk; moderate or -1e30): that id
 *   max-2-chunks  the maximum at two ids, in two chunks where the vocabulary has them: the lower
 *   signed-zeros  every other value negative (some -inf), -0.0 and +0.0 at two ids (either sign
 *                 first, in two chunks where possible): the lower
 *   inf-twice     +inf at two ids among random values and NaNs (and -infs in some rows): the lower */
static int make_row(float *l, int vocab, int kind, const char *special)
{
    fill_gauss(l, (size_t)vocab, 3.0f);
    if (special && !strcmp(special, "nan")) {
        for (int i = 0; i < 1 + vocab / 50; i++) l[rnd_int(vocab)] = NAN;
        return -1;
    }
    if (special && (!strcmp(special, "all-inf") || !strcmp(special, "all-nan"))) {
        const float f = special[4] == 'i' ? -INFINITY : NAN;
        for (int i = 0; i < vocab; i++) l[i] = f;
        return 0;
    }
    if (special && !strncmp(special, "nan-inf", 7)) {
        for (int i = 0; i < vocab; i++) l[i] = rnd_int(2) ? NAN : -INFINITY;
        if (!strcmp(special, "nan-inf")) return 0;
        const int at[4] = {rnd_int(vocab), vocab - 1, 0, vocab > ARGMAX_CHUNK ? ARGMAX_CHUNK : vocab - 1};
        const int f = at[kind % 4];
        l[f] = kind / 4 % 2 ? -1e30f : rnd_gauss() * 3.0f;
        return f;
    }
    int pa, pb;
    if (special && !strcmp(special, "signed-zeros")) {
        for (int i = 0; i < vocab; i++) l[i] = i % 7 == 3 ? -INFINITY : -0.5f - fabsf(l[i]);
        pick_pair(vocab, kind, &pa, &pb);
        const bool neg_first = kind / 4 % 2 == 0;
        l[pb] = neg_first ? 0.0f : -0.0f;
        l[pa] = neg_first ? -0.0f : 0.0f; /* pa == pb (a vocabulary of 1): a alone */
        return pa;
    }
    if (special && !strcmp(special, "inf-twice")) {
        for (int i = 0; i < 1 + vocab / 50; i++) l[rnd_int(vocab)] = NAN;
        if (kind / 4 % 2)
            for (int i = 1; i < vocab; i += 3) l[i] = -INFINITY;
        pick_pair(vocab, kind, &pa, &pb);
        l[pa] = l[pb] = INFINITY;
        return pa;
    }
    if (special && !strcmp(special, "max-2-chunks")) {
        float mx = -INFINITY;
        for (int i = 0; i < vocab; i++) mx = fmaxf(mx, l[i]);
        pick_pair(vocab, kind, &pa, &pb);
        l[pa] = l[pb] = mx + 1.0f;
        return pa;
    }
    if (special) {
        printf("FAIL: make_row: unknown special row \"%s\"\n", special);
        exit(1);
    }
    float mx = -INFINITY;
    for (int i = 0; i < vocab; i++) mx = fmaxf(mx, l[i]);
    switch (kind) {
    case 1: { /* the maximum at two ids: the lower wins */
        const int a = rnd_int(vocab), b = rnd_int(vocab);
        l[a] = l[b] = mx + 1.0f;
        break;
    }
    case 2: l[0] = l[vocab - 1] = mx + 1.0f; break;
    case 3:
        for (int i = 0; i < vocab; i++) l[i] = 0.25f;
        break;
    case 4:
        for (int i = 0; i < vocab; i += 3) l[i] = -INFINITY;
        if (vocab > 5) l[vocab - 1] = l[vocab / 2 + 1] = mx + 2.0f;
        break;
    case 5: l[vocab - 1] = mx + 0.5f; break;
    case 6:
        for (int i = 0; i < vocab; i++) l[i] *= 5.0f;
        break;
    case 7:
        for (int i = 0; i < vocab; i++) l[i] *= 0.01f;
        break;
    default: break;
    }
    return -1;
}

/* Samples n rows on both backends with params[n]; returns mismatched rows (each printed): the ids
 * differ, or (expect, where not NULL) the CPU's id differs from expect[i] >= 0. special names the
 * rows' special kind in the printout (NULL: the row kinds of make_row). */
static int sample_compare(const float *logits, int n, int vocab, const kern_sampling_t *params, const int32_t *expect,
                          const char *special, const char *name)
{
    twin_t tl = twin_new((size_t)n * vocab * sizeof(float), logits);
    int32_t *oc = xmalloc((size_t)n * sizeof(int32_t)), *og = xmalloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) oc[i] = og[i] = -12345;
    kern_sample(g_cpu, oc, tl.c, n, vocab, params);
    kern_sample(g_gpu, og, tl.g, n, vocab, params);
    int bad = 0;
    if (!gpu_sync(name)) {
        bad = n;
    } else {
        for (int i = 0; i < n; i++) {
            const int32_t want = expect ? expect[i] : -1;
            if (oc[i] == og[i] && (want < 0 || oc[i] == want)) continue;
            if (bad++ < 10)
                printf("     row %d (%s variant %d): cuda id %d, cpu id %d, expected %d (temperature %g top_k %d top_p %g "
                       "seed %llu position %llu)\n",
                       i, special ? special : k_row_kinds[i % N_ROW_KINDS], i % N_ROW_KINDS, og[i], oc[i], want,
                       params[i].temperature, params[i].top_k, params[i].top_p, (unsigned long long)params[i].seed,
                       (unsigned long long)params[i].position);
        }
    }
    twin_free(&tl);
    free(oc);
    free(og);
    return bad;
}

static void test_sample_greedy(int n, int vocab, const char *special)
{
    char name[128];
    snprintf(name, sizeof name, "sample greedy rows=%d vocab=%d%s%s", n, vocab, special ? " " : "", special ? special : "");
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->sample, name)) return;
    float *l = xmalloc((size_t)n * vocab * sizeof(float));
    kern_sampling_t *p = xmalloc((size_t)n * sizeof(kern_sampling_t));
    int32_t *expect = xmalloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        expect[i] = make_row(l + (size_t)i * vocab, vocab, i % N_ROW_KINDS, special);
        p[i] = (kern_sampling_t){.temperature = i % 2 ? 0.0f : -1.0f, .top_k = 40, .top_p = 0.9f, .seed = rnd_u64(),
                                 .position = (uint64_t)i};
    }
    const int bad = sample_compare(l, n, vocab, p, expect, special, name);
    result(bad == 0, name, "mismatched rows=%d", bad);
    free(l);
    free(p);
    free(expect);
}

/* Seeded draws with temperature / top-k / top-p per row (some rows greedy, in the same call). */
static void test_sample_seeded(int n, int vocab, int round)
{
    char name[128];
    snprintf(name, sizeof name, "sample seeded rows=%d vocab=%d round=%d", n, vocab, round);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->sample, name)) return;
    static const float temps[] = {0.3f, 0.7f, 1.0f, 1.5f, 0.0f, 1e-40f, 1e-30f};
    static const float top_ps[] = {1.0f, 0.95f, 0.9f, 0.5f, 0.1f, 0.0f};
    const int top_ks[] = {0, 1, 20, 40, vocab - 1, vocab, vocab + 5, -1};
    float *l = xmalloc((size_t)n * vocab * sizeof(float));
    kern_sampling_t *p = xmalloc((size_t)n * sizeof(kern_sampling_t));
    for (int i = 0; i < n; i++) {
        make_row(l + (size_t)i * vocab, vocab, i % N_ROW_KINDS, NULL);
        p[i] = (kern_sampling_t){.temperature = temps[rnd_int(7)], .top_k = top_ks[rnd_int(8)],
                                 .top_p = top_ps[rnd_int(6)], .seed = rnd_u64(), .position = rnd_u64() % 100000};
    }
    const int bad = sample_compare(l, n, vocab, p, NULL, NULL, name);
    result(bad == 0, name, "mismatched rows=%d (draws are a pure function of seed and position)", bad);
    free(l);
    free(p);
}

/* Logit adjustments, allowed-token masks (every third row: a random third of the vocabulary, its
 * best token out half the time) and min-p with every other parameter, greedy rows among the drawn: each row of
 * kind i % N_ROW_KINDS gets a list of distinct tokens (its best id first, then random ones, and ids
 * outside the vocabulary, which both skip) with repetition penalties above and below 1, additive
 * terms and bans. The sample op writes the adjusted logits into the rows, so the rows must come out
 * bit-equal as well as the ids. */
static void test_sample_adjusted(int n, int vocab, int round)
{
    char name[128];
    snprintf(name, sizeof name, "sample adjusted+min-p rows=%d vocab=%d round=%d", n, vocab, round);
    if (!wanted(name) || !have_op((const void *)g_gpu->ops->sample, name)) return;
    static const float temps[] = {0.0f, 0.3f, 0.8f, 1.0f, 1.5f};
    static const float top_ps[] = {1.0f, 0.95f, 0.9f, 0.5f};
    static const float min_ps[] = {0.0f, 0.0f, 0.01f, 0.05f, 0.1f, 0.5f, 1.0f, 2.0f};
    static const float penalties[] = {1.0f, 1.0f, 1.1f, 1.3f, 0.8f, 2.0f};
    static const float adds[] = {0.0f, -0.4f, 1.25f, -INFINITY, 3.0f, -2.0f, 0.1f};
    const int top_ks[] = {0, 1, 20, 40, vocab - 1, vocab};
    enum { MAX_ADJ = 48 };
    const size_t row_bytes = (size_t)vocab * sizeof(float);
    float *l = xmalloc((size_t)n * row_bytes);
    kern_sampling_t *p = xmalloc((size_t)n * sizeof(kern_sampling_t));
    kern_logit_adjust_t *adj = xmalloc((size_t)n * MAX_ADJ * sizeof(kern_logit_adjust_t));
    const int words = (vocab + 63) / 64;
    uint64_t *masks = xmalloc((size_t)n * words * sizeof(uint64_t));
    for (int i = 0; i < n; i++) {
        float *row = l + (size_t)i * vocab;
        make_row(row, vocab, i % N_ROW_KINDS, NULL);
        uint64_t *m = masks + (size_t)i * words;
        memset(m, 0, (size_t)words * sizeof *m);
        for (int v = 0; v < vocab; v++)
            if (rnd_int(3) == 0) m[v / 64] |= 1ull << (v % 64);
        kern_logit_adjust_t *a = adj + (size_t)i * MAX_ADJ;
        int best = 0;
        for (int v = 1; v < vocab; v++)
            if (row[v] > row[best]) best = v;
        const int want = rnd_int(MAX_ADJ + 1);
        int k = 0;
        for (int tries = 0; k < want && tries < 4 * MAX_ADJ; tries++) {
            const int r = rnd_int(20);
            const int32_t t = k == 0 ? best : r == 0 ? -1 - rnd_int(3) : r == 1 ? vocab + rnd_int(3) : rnd_int(vocab);
            bool dup = false;
            for (int j = 0; j < k && !dup; j++) dup = a[j].token == t;
            if (dup) continue;
            a[k++] = (kern_logit_adjust_t){.token = t, .penalty = penalties[rnd_int(6)], .add = adds[rnd_int(7)]};
        }
        p[i] = (kern_sampling_t){.temperature = temps[rnd_int(5)], .top_k = top_ks[rnd_int(6)],
                                 .top_p = top_ps[rnd_int(4)], .seed = rnd_u64(), .position = rnd_u64() % 100000,
                                 .min_p = min_ps[rnd_int(8)], .adjust = a, .n_adjust = k,
                                 .allowed = i % 3 == 1 ? m : NULL};
        if (i % 3 == 1 && rnd_int(2)) m[best / 64] &= ~(1ull << (best % 64));
    }
    twin_t tl = twin_new((size_t)n * row_bytes, l);
    int32_t *oc = xmalloc((size_t)n * sizeof(int32_t)), *og = xmalloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) oc[i] = og[i] = -12345;
    kern_sample(g_cpu, oc, tl.c, n, vocab, p);
    kern_sample(g_gpu, og, tl.g, n, vocab, p);
    float *rc = xmalloc((size_t)n * row_bytes), *rg = xmalloc((size_t)n * row_bytes);
    int bad = 0, bad_rows = 0;
    if (!twin_get(&tl, rc, rg, (size_t)n * row_bytes, name)) {
        bad = n;
    } else {
        for (int i = 0; i < n; i++) {
            const bool rows_eq = memcmp(rc + (size_t)i * vocab, rg + (size_t)i * vocab, row_bytes) == 0;
            bad_rows += !rows_eq;
            if (oc[i] == og[i] && rows_eq) continue;
            if (bad++ < 10)
                printf("     row %d (%s): cuda id %d, cpu id %d, adjusted rows %s (temperature %g top_k %d top_p %g "
                       "min_p %g n_adjust %d seed %llu position %llu)\n",
                       i, k_row_kinds[i % N_ROW_KINDS], og[i], oc[i], rows_eq ? "equal" : "DIFFER",
                       p[i].temperature, p[i].top_k, p[i].top_p, p[i].min_p, p[i].n_adjust,
                       (unsigned long long)p[i].seed, (unsigned long long)p[i].position);
        }
    }
    result(bad == 0, name, "mismatched rows=%d (of which adjusted logits differ: %d)", bad, bad_rows);
    twin_free(&tl);
    free(rc);
    free(rg);
    free(oc);
    free(og);
    free(l);
    free(p);
    free(adj);
    free(masks);
}

/* ------------------------------------------------------------------------------------------------ */

/* Every attention case; run once per attention kernel of the CUDA backend. */
static void attention_cases(void)
{
    const int L = g_quick ? 600 : 4000;
    test_attention("one-token", 9, 3, 64, 16, (const seq_spec_t[]){{1, 1}}, 1);
    test_attention("one-token", 32, 8, 128, 16, (const seq_spec_t[]){{1, 1}}, 1);
    for (int p = 15; p <= 17; p++) {
        char lab[32];
        snprintf(lab, sizeof lab, "decode-pos-%d", p - 1);
        test_attention(lab, 9, 3, 64, 16, (const seq_spec_t[]){{p, 1}}, 1);
        snprintf(lab, sizeof lab, "prefill-%d", p);
        test_attention(lab, 9, 3, 64, 16, (const seq_spec_t[]){{p, p}}, 1);
    }
    test_attention("boundaries-batched", 9, 3, 64, 16, (const seq_spec_t[]){{15, 1}, {16, 1}, {17, 1}, {33, 2}}, 4);
    /* GQA ratios 1, 3, 8 at head_dim 64 and 128 */
    static const int gqa[][3] = {{4, 4, 64}, {9, 3, 64}, {16, 2, 64}, {8, 8, 128}, {24, 8, 128}, {32, 4, 128}};
    for (int i = 0; i < 6; i++) {
        char lab[32];
        snprintf(lab, sizeof lab, "gqa-%d", gqa[i][0] / gqa[i][1]);
        test_attention(lab, gqa[i][0], gqa[i][1], gqa[i][2], 16, (const seq_spec_t[]){{100, 1}, {40, 40}}, 2);
    }
    /* head_dim 256 and 32: one V row a round on the lanes kernel, and eight */
    test_attention("head-dim-256", 4, 2, 256, 16, (const seq_spec_t[]){{300, 1}, {40, 40}}, 2);
    test_attention("head-dim-32", 8, 4, 32, 16, (const seq_spec_t[]){{300, 1}, {17, 1}, {20, 20}}, 3);
    /* long contexts */
    test_attention("long-decode", 9, 3, 64, 16, (const seq_spec_t[]){{L, 1}}, 1);
    test_attention("long-decode", 32, 8, 128, 16, (const seq_spec_t[]){{L + 96, 1}}, 1);
    /* split attention: tokens of very different lengths in one launch (shares left empty), and
     * several tokens a sequence (a real draft tree) */
    test_attention("long-decode-mixed", 9, 3, 64, 16, (const seq_spec_t[]){{L, 1}, {3, 1}, {300, 1}}, 3);
    test_attention("long-decode-tree", 9, 3, 64, 16, (const seq_spec_t[]){{L, 8}}, 1);
    test_attention("long-decode-hd80", 10, 2, 80, 32, (const seq_spec_t[]){{L, 2}, {40, 1}}, 2);
    test_attention("long-prefill-chunk", 9, 3, 64, 16, (const seq_spec_t[]){{L, 32}}, 1);
    test_attention("long-prefill-chunk", 32, 8, 128, 16, (const seq_spec_t[]){{L / 2, g_quick ? 64 : 512}}, 1);
    /* several sequences of different lengths, decode and prefill mixed, scattered tables */
    const seq_spec_t mixed[] = {{1, 1}, {17, 1}, {100, 1}, {g_quick ? 300 : 1000, 1}, {257, 20}, {33, 33}, {L / 3, 1}};
    test_attention("mixed-batch", 9, 3, 64, 16, mixed, 7);
    test_attention("mixed-batch", 32, 8, 128, 16, mixed, 7);
    test_attention("mixed-batch", 16, 2, 64, 32, mixed, 7); /* another block size */
    /* prefill runs of several sequences, straddling the tiled kernel's query tiles; GQA 1 (64
     * tokens a tile), 3, 4, 8 (8 tokens a tile); head_dim 80 (pairs of dimensions 2c + 8k) */
    const seq_spec_t runs[] = {{37, 37}, {50, 20}, {16, 16}, {70, 9}, {300, 1}};
    test_attention("prefill-runs", 9, 3, 64, 16, runs, 5);
    test_attention("prefill-runs", 32, 8, 128, 16, runs, 5);
    test_attention("prefill-runs", 8, 8, 128, 16, runs, 5);
    test_attention("prefill-runs", 64, 8, 128, 16, runs, 5);
    test_attention("prefill-runs", 10, 2, 80, 32, runs, 5);
    test_attention("decode-batch-16", 9, 3, 64, 16,
                   (const seq_spec_t[]){{5, 1},  {31, 1},  {32, 1},  {33, 1},  {64, 1},  {65, 1},  {127, 1}, {128, 1},
                                        {129, 1}, {200, 1}, {255, 1}, {256, 1}, {257, 1}, {511, 1}, {512, 1}, {513, 1}},
                   16);
    /* the families' masks and caps: a sliding window shorter than the contexts (decode past it, a
     * prefill chunk that crosses it, a sequence still inside it), Gemma 2's soft-capping (its cap
     * of 50), and both; long contexts split over blocks */
    const seq_spec_t fam[] = {{300, 1}, {200, 40}, {50, 50}, {L, 1}, {g_quick ? 300 : 1000, 17}};
    static const struct { int window; float softcap; } masks[] = {{128, 0.0f}, {0, 50.0f}, {64, 50.0f}};
    for (int mi = 0; mi < 3; mi++) {
        g_attn_window = masks[mi].window, g_attn_softcap = masks[mi].softcap;
        test_attention("family", 14, 2, 64, 16, fam, 5);
        test_attention("family", 8, 4, 128, 16, fam, 5);
        test_attention("family-decode", 9, 3, 64, 16, (const seq_spec_t[]){{L, 1}, {129, 1}, {128, 1}}, 3);
    }
    g_attn_window = 0, g_attn_softcap = 0.0f;
}

/* attention_cases on the default kernels (which pick the decode kernel by grid size), then, with
 * each_kernel (on a GPU), on each decode kernel alone: lanes (FOLIO_CUDA_LANE_ATTN=1), per position
 * (=0) */
static void attention_cases_each_kernel(bool each_kernel)
{
    attention_cases();
    static const char *const attn_variants[][2] = {{"1", "(lanes)"}, {"0", "(per-position)"}};
    for (int vi = 0; vi < 2 && each_kernel; vi++) {
        fl_error_t err = {0};
        setenv("FOLIO_CUDA_LANE_ATTN", attn_variants[vi][0], 1);
        kern_backend_t *const saved = g_gpu;
        g_gpu = kern_cuda_new(0, &err);
        unsetenv("FOLIO_CUDA_LANE_ATTN");
        if (!g_gpu) {
            printf("FAIL: kern_cuda_new (%s attention): %s\n", attn_variants[vi][1], err.msg);
            g_fail++;
        } else {
            g_attn_variant = attn_variants[vi][1];
            attention_cases();
            g_attn_variant = "";
            kern_destroy(&g_gpu);
        }
        g_gpu = saved;
    }
}

int main(int argc, char **argv)
{
    fl_error_t err = {0};
    const char *self = getenv("FOLIO_CUDA_TEST_SELFCHECK");
    const bool selfcheck = self && !strcmp(self, "1");
    g_selfcheck = selfcheck;
    if (selfcheck) { /* the harness itself, without a GPU: a second CPU backend */
        g_gpu = kern_cpu_new(0, &err);
        if (!g_gpu) {
            printf("FAIL: kern_cpu_new: %s\n", err.msg);
            return 1;
        }
    } else if (!kern_cuda_available()) {
        kern_backend_t *be = kern_cuda_new(0, &err);
        if (be) kern_destroy(&be);
        printf("SKIPPED: no usable CUDA backend: %s\n", err.msg[0] ? err.msg : "kern_cuda_available() is false");
        return 77;
    }
    if (!g_gpu) g_gpu = kern_cuda_new(0, &err);
    if (!g_gpu) {
        /* A device is present and the module loads: failing to start on it is a failure, not a skip. */
        printf("FAIL: kern_cuda_new failed on a machine with a GPU: %s\n", err.msg[0] ? err.msg : "(no message)");
        return 1;
    }
    err = (fl_error_t){0};
    g_cpu = kern_cpu_new(0, &err);
    if (!g_cpu) {
        printf("FAIL: kern_cpu_new: %s\n", err.msg);
        kern_destroy(&g_gpu);
        return 1;
    }
    const char *qe = getenv("FOLIO_CUDA_TEST_QUICK");
    g_quick = qe && *qe && strcmp(qe, "0") != 0;
    g_filter = argc > 1 ? argv[1] : NULL;
    printf("CUDA backend %s vs CPU backend %s%s%s%s\n", kern_backend_name(g_gpu), kern_backend_name(g_cpu),
           g_quick ? " (quick case set)" : "", g_filter ? ", filter: " : "", g_filter ? g_filter : "");
    const double t0 = now_s();

    /* embed */
    for (int ti = 0; ti < N_TYPES; ti++) {
        test_embed(k_types[ti], 300, 576, 7, false);
        test_embed(k_types[ti], 50, 64, 1, false);
        test_embed(k_types[ti], 1000, 4096, 33, false);
        test_embed(k_types[ti], 300, 576, 6, true);
    }

    /* matmul, on each product path of the CUDA backend in turn: the default (single-token products on
     * the GEMV kernel over fp16 weights), the GEMV kernel reading quantized weights as stored
     * (FOLIO_CUDA_QGEMV=1), cuBLASLt alone (FOLIO_CUDA_GEMV=0), and the GEMV kernel issuing its first
     * round of weight loads before the PDL wait (FOLIO_CUDA_GEMV_EARLY=1). */
    static const char *const variants[][3] = {{NULL, NULL, NULL},
                                              {"FOLIO_CUDA_QGEMV", "1", "quantized gemv"},
                                              {"FOLIO_CUDA_GEMV", "0", "cublaslt only"},
                                              {"FOLIO_CUDA_GEMV_EARLY", "1", "early gemv loads"}};
    const int n_variants = (int)(sizeof variants / sizeof variants[0]);
    kern_backend_t *const g_gpu_default = g_gpu;
    for (int vi = 0; vi < (selfcheck ? 1 : n_variants); vi++) {
        if (vi > 0) {
            setenv(variants[vi][0], variants[vi][1], 1);
            g_gpu = kern_cuda_new(0, &err);
            unsetenv(variants[vi][0]);
            if (!g_gpu) {
                printf("FAIL: kern_cuda_new (%s): %s\n", variants[vi][2], err.msg);
                g_fail++;
                g_gpu = g_gpu_default;
                break;
            }
            printf("matmul path: %s\n", variants[vi][2]);
        }
        /* matmul: every weight type; shapes of SmolLM2-135M (576/1536), Llama-8B-like 4096, odd rows */
        static const int ns_all[] = {1, 2, 7, 32, 513};
        static const int ns_quick[] = {1, 2, 7, 32};
        static const int ns_big[] = {1, 7, 513};
        for (int ti = 0; ti < N_TYPES; ti++) {
            const int ty = k_types[ti];
            test_matmul(ty, 64, 64, g_quick ? ns_quick : ns_all, g_quick ? 4 : 5);
            test_matmul(ty, 576, 1536, g_quick ? ns_quick : ns_all, g_quick ? 4 : 5);
            test_matmul(ty, 1536, 576, g_quick ? ns_quick : ns_all, g_quick ? 4 : 5);
            test_matmul(ty, 67, 128, ns_quick, 4);   /* rows not a multiple of any tile */
            test_matmul(ty, 192, 32, ns_quick, 4);   /* one quant block per row */
            /* 252 16-byte vectors a row: lanes 0-27 of a GEMV warp have a whole first round of 8, 28-31
             * do not (the early-load branch splits within the warp) */
            test_matmul(ty, 72, 2016, (const int[]){1, 3}, 2);
            if (g_quick) {
                if (ty == FL_TYPE_Q4_1) test_matmul(ty, 576, 576, ns_big, 3);
            } else {
                test_matmul(ty, 4096, 4096, ns_big, 3);
                test_matmul(ty, 49152, 576, (const int[]){1, 7}, 2); /* SmolLM2's vocabulary projection */
            }
        }
        for (int ti = 0; ti < N_TYPES; ti++) {
            test_matmul_multi(k_types[ti], (const int[]){576, 192, 192}, 3, 576, 1);
            test_matmul_multi(k_types[ti], (const int[]){576, 192, 192}, 3, 576, 7);
            test_matmul_multi(k_types[ti], (const int[]){1536, 1536}, 2, 576, g_quick ? 32 : 513);
            test_matmul_multi(k_types[ti], (const int[]){64}, 1, 64, 2);
        }
        if (!g_quick) {
            for (int ti = 0; ti < N_TYPES; ti++) /* Llama-8B's Q, K, V in one call */
                test_matmul_multi(k_types[ti], (const int[]){4096, 1024, 1024}, 3, 4096, 1);
        }
        /* matmul_swiglu: gate and up, then SwiGLU (n == 1: one fused GEMV on CUDA) */
        static const int sw_ns[] = {1, 3, 64};
        for (int ti = 0; ti < N_TYPES; ti++) {
            for (int k = 0; k < 3; k++) {
                test_matmul_swiglu(k_types[ti], 1536, 576, sw_ns[k]); /* SmolLM2's n_ff x dim */
                if (!g_quick || sw_ns[k] == 1) test_matmul_swiglu(k_types[ti], 67, 128, sw_ns[k]); /* rows % 8 != 0 */
                if (!g_quick) test_matmul_swiglu(k_types[ti], 200, 32, sw_ns[k]); /* one quant block per row */
            }
            if (!g_quick) test_matmul_swiglu(k_types[ti], 1000, 4096, 1); /* long rows */
        }
        if (vi > 0) kern_destroy(&g_gpu);
        g_gpu = g_gpu_default;
    }

    /* rmsnorm */
    for (int dim = 64; dim <= 4096; dim *= 2) {
        if (dim != 64 && dim != 512 && dim != 4096) continue;
        test_rmsnorm(1, dim, 1e-5f);
        test_rmsnorm(7, dim, 1e-6f);
        if (!g_quick) test_rmsnorm(513, dim, 1e-5f);
    }
    test_rmsnorm(5, 576, 1e-5f);
    test_rmsnorm(3, 100, 1e-5f); /* dim not a multiple of a warp */

    /* add_rmsnorm: the residual add fused with the next norm. CUDA's block size follows dim (one
     * float4 per thread when dim % 4 == 0, one float otherwise, 32..1024 threads): 3, 4 and 100 below
     * one warp's worth, 1030 and 8192 looping over more than 1024 threads' worth. */
    static const int arn_dims[] = {64, 512, 4096, 576, 100, 4, 3, 1030, 8192};
    for (int i = 0; i < (int)(sizeof arn_dims / sizeof arn_dims[0]); i++) {
        test_add_rmsnorm(1, arn_dims[i], 1e-5f);
        test_add_rmsnorm(7, arn_dims[i], 1e-6f);
        if (!g_quick) test_add_rmsnorm(513, arn_dims[i], 1e-5f);
    }

    /* rope */
    const int max_pos = g_quick ? 700 : 5000;
    test_rope(1, 9, 64, 64, 10000.0f, 1.0f, false, max_pos);
    test_rope(7, 9, 64, 64, 100000.0f, 1.0f, false, max_pos);
    test_rope(g_quick ? 33 : 513, 3, 64, 64, 100000.0f, 1.0f, false, max_pos);
    test_rope(7, 32, 128, 128, 500000.0f, 1.0f, true, max_pos);  /* Llama-3: rope_freqs */
    test_rope(7, 8, 128, 64, 10000.0f, 1.0f, false, max_pos);    /* n_rot < head_dim */
    test_rope(7, 8, 128, 32, 10000.0f, 0.25f, true, max_pos);    /* partial, linear scaling, factors */
    test_rope(5, 4, 64, 64, 10000.0f, 0.5f, false, max_pos);     /* linear scaling */
    test_rope(3, 2, 80, 80, 10000.0f, 1.0f, false, max_pos);     /* head_dim not a power of two */
    g_rope_neox = true; /* NeoX pairs: Qwen, Gemma; Phi-3 with its factors and attn_factor */
    test_rope(7, 14, 64, 64, 1000000.0f, 1.0f, false, max_pos);
    test_rope(7, 8, 128, 128, 10000.0f, 1.0f, false, max_pos);
    test_rope(5, 4, 96, 96, 10000.0f, 1.0f, true, max_pos);
    g_rope_mscale = 1.1902f;
    test_rope(5, 4, 96, 96, 10000.0f, 1.0f, true, max_pos);
    g_rope_neox = false, g_rope_mscale = 0.0f;

    /* swiglu, add */
    static const int ew_ns[] = {1, 15, 16, 17, 576, 1536 * 7, 1536 * 513, 14336 * 3};
    for (int i = 0; i < (int)(sizeof ew_ns / sizeof ew_ns[0]); i++) {
        if (g_quick && ew_ns[i] > 100000) continue;
        test_swiglu(ew_ns[i]);
        test_add(ew_ns[i]);
    }
    test_family_ops(1, 896);
    test_family_ops(7, 4864);
    test_family_ops(g_quick ? 33 : 257, 8192); /* Gemma 2's final logits: a vocabulary of rows */

    /* kv_store and kv_move: f16 pools, then each quantized type, alone and beside an f16 pool */
    static const int kv_types[][2] = {{FL_TYPE_F16, FL_TYPE_F16},  {FL_TYPE_Q8_0, FL_TYPE_Q8_0}, {FL_TYPE_Q4_0, FL_TYPE_Q4_0},
                                      {FL_TYPE_Q8_0, FL_TYPE_F16}, {FL_TYPE_F16, FL_TYPE_Q4_0}};
    for (int ti = 0; ti < 5; ti++) {
        const int kt = kv_types[ti][0], vt = kv_types[ti][1];
        test_kv_store(1, 192, 64, kt, vt);
        test_kv_store(7, 192, 160, kt, vt);
        test_kv_store(100, 1024, 512, kt, vt);
        test_kv_store(g_quick ? 64 : 513, 192, 1024, kt, vt);
    }

    /* rope_kv_store: RoPE on q and k with the KV store, padding rows (slot -1) among the tokens */
    static const int rkv_ns[] = {1, 7, 100};
    for (int i = 0; i < (g_quick ? 2 : 3); i++) {
        const int nn = rkv_ns[i], ns = 2 * nn + 16;
        test_rope_kv_store(nn, 9, 3, 64, 64, 100000.0f, 1.0f, false, ns);   /* SmolLM2 */
        test_rope_kv_store(nn, 32, 8, 128, 128, 500000.0f, 1.0f, true, ns); /* Llama-3-8B: rope_freqs */
        test_rope_kv_store(nn, 8, 2, 128, 64, 10000.0f, 1.0f, false, ns);   /* partial rotary: n_rot < head_dim */
    }
    test_rope_kv_store(7, 8, 8, 128, 32, 10000.0f, 0.25f, true, 40); /* partial, linear scaling, factors, no GQA */
    test_rope_kv_store(7, 4, 2, 63, 63, 10000.0f, 1.0f, false, 40);  /* odd head_dim: CUDA runs the plain ops */
    test_rope_kv_store(7, 3, 1, 80, 80, 10000.0f, 1.0f, false, 40);  /* head_dim not a power of two */
    if (!g_quick) {
        test_rope_kv_store(5, 4, 1, 256, 256, 10000.0f, 1.0f, false, 40); /* 128 pairs per head */
        test_rope_kv_store(3, 2, 2, 64, 0, 10000.0f, 1.0f, false, 40);    /* n_rot 0: the store alone */
    }

    /* attention: f16 pools, then quantized ones: Q8_0 K and V on every kernel; Q4_0, and each beside
     * an f16 pool, on the default choice of kernels */
    attention_cases_each_kernel(!selfcheck);
    static const int attn_kv[][2] = {{FL_TYPE_Q8_0, FL_TYPE_Q8_0}, {FL_TYPE_Q4_0, FL_TYPE_Q4_0},
                                     {FL_TYPE_Q8_0, FL_TYPE_F16}, {FL_TYPE_F16, FL_TYPE_Q4_0}};
    for (int ti = 0; ti < 4; ti++) {
        g_attn_k_type = attn_kv[ti][0], g_attn_v_type = attn_kv[ti][1];
        attention_cases_each_kernel(!selfcheck && ti == 0);
    }
    g_attn_k_type = g_attn_v_type = FL_TYPE_F16;

    /* sample */
    const int vocabs_full[] = {1, 2, 17, 1000, 32000, 49152, 128256}, vocabs_quick[] = {1, 2, 17, 1000, 49152};
    const int *vocabs = g_quick ? vocabs_quick : vocabs_full, n_voc = g_quick ? 5 : 7;
    for (int i = 0; i < n_voc; i++) {
        test_sample_greedy(1, vocabs[i], NULL);
        test_sample_greedy(N_ROW_KINDS * 2, vocabs[i], NULL);
        if (!g_quick && vocabs[i] >= 1000) test_sample_greedy(64, vocabs[i], NULL);
        if (vocabs[i] >= 17) {
            test_sample_greedy(3, vocabs[i], "nan");
            test_sample_greedy(2, vocabs[i], "all-inf");
        }
    }
    /* greedy ids across the CUDA argmax's blocks of ARGMAX_CHUNK logits: vocabularies of one block,
     * one block exactly, one logit over, and Llama-3's; the ordinary row kinds (ties at the first and
     * last id, all equal) and the edge rows of make_row, each row checked against the rule's id */
    static const int edge_vocabs[] = {1, ARGMAX_CHUNK - 1, ARGMAX_CHUNK, ARGMAX_CHUNK + 1, 128256};
    static const char *const edge_rows[] = {"max-2-chunks", "signed-zeros", "all-nan", "all-inf",
                                            "nan-inf",      "nan-inf-one",  "inf-twice"};
    for (int i = 0; i < 5; i++) {
        const int v = edge_vocabs[i];
        if (v > 2 && v < 100000) test_sample_greedy(N_ROW_KINDS * 2, v, NULL);
        for (int e = 0; e < (int)(sizeof edge_rows / sizeof edge_rows[0]); e++)
            test_sample_greedy(N_ROW_KINDS, v, edge_rows[e]);
    }
    for (int i = 0; i < n_voc; i++)
        for (int r = 0; r < (g_quick ? 1 : 4); r++) test_sample_seeded(N_ROW_KINDS * 2, vocabs[i], r);
    for (int i = 0; i < n_voc; i++)
        for (int r = 0; r < (g_quick ? 1 : 4); r++) test_sample_adjusted(N_ROW_KINDS * 2, vocabs[i], r);

    const double dt = now_s() - t0;
    printf("summary: %d passed, %d failed (%.1f s)%s\n", g_pass, g_fail, dt,
           g_pass + g_fail == 0 ? " - no case ran (filter?)" : "");
    kern_destroy(&g_gpu);
    kern_destroy(&g_cpu);
    return g_fail ? 1 : 0;
}
