/* test_kernels_cpu.c - the CPU backend against plain scalar references.
 *
 * Every op is checked on random inputs over many shapes. Two kinds of checks:
 *   - against the numeric spec the kernels document, which is llama.cpp's CPU arithmetic (activation
 *     quantization to the vec-dot type, ggml's x86 vec_dot order: 8 float lanes of 4-element integer
 *     dots per block accumulated with fmaf, hsum_float_8; canonical 16-lane float dots; attention in
 *     tinyBLAS order for a sequence's prompt tokens and ggml_vec_dot_f16 order for a decode token;
 *     ggml's v_expf in softmax and swiglu; rope with FMA contraction), re-implemented here
 *     independently: the backend must match it bit for bit on every ISA;
 *   - against the exact product of the dequantized weights with the raw activations in double, with
 *     an error bound derived from the activation rounding, to catch a wrong spec.
 * Plus: batched results equal row-by-row results bit for bit, ISAs agree with each other, and the
 * sampler is a pure function of (seed, position). FOLIO_CPU_ISA forces an instruction set. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/quant.h"
#include "kernels/cpu/cpu_internal.h"
#include "kernels/gelu.h"
#include "kernels/kernels.h"
#include "kernels/sampling.h"

/* ---- helpers ---- */

static uint64_t rng_state = 0x1234567887654321ull;
static uint32_t rnd_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rnd_f(float lo, float hi) { return lo + (hi - lo) * (float)(rnd_u32() & 0xffffff) / 16777216.0f; }
static void fill(float *x, size_t n, float a)
{
    for (size_t i = 0; i < n; i++) x[i] = rnd_f(-a, a);
}

static kern_backend_t *new_backend(const char *isa, int threads, const char *blas_min_n)
{
    if (isa) setenv("FOLIO_CPU_ISA", isa, 1);
    else unsetenv("FOLIO_CPU_ISA");
    if (blas_min_n) setenv("FOLIO_CPU_BLAS_MIN_N", blas_min_n, 1);
    else unsetenv("FOLIO_CPU_BLAS_MIN_N");
    fl_error_t err = {0};
    kern_backend_t *be = kern_cpu_new(threads, &err);
    assert_non_null(be);
    unsetenv("FOLIO_CPU_ISA");
    unsetenv("FOLIO_CPU_BLAS_MIN_N");
    return be;
}

static cpu_isa_t isa_of(kern_backend_t *be) { return ((cpu_backend_t *)be)->isa; }

static const char *isa_names[3] = {"scalar", "avx2", "avx512"};

static bool bits_equal(const float *a, const float *b, size_t n, size_t *where)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4) != 0) {
            if (where) *where = i;
            return false;
        }
    return true;
}

/* ---- matmul reference (the spec, written independently of cpu_matmul.c) ---- */

static float f16r(float x) { return fl_f16_to_f32(fl_f32_to_f16(x)); }

typedef struct {
    int8_t q[32];
    float d, s;
    int sum;
} ref_qblock_t;

static void ref_quant_act(const float *x, ref_qblock_t *b)
{
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.f, id = amax != 0 ? 127.f / amax : 0.f;
    b->sum = 0;
    for (int j = 0; j < 32; j++) {
        b->q[j] = (int8_t)nearbyintf(x[j] * id);
        b->sum += b->q[j];
    }
    b->d = f16r(d);
    b->s = f16r(d * (float)b->sum);
}

/* Returns y for one (row, x) pair; *bound receives the allowed distance from the exact product. */
static float ref_matmul_one(int type, const uint8_t *row, const float *x, int cols, double *exact, double *bound)
{
    float *wf = malloc((size_t)cols * sizeof(float));
    quant_dequantize_row(type, row, wf, cols);
    double ex = 0, mag = 0;
    for (int i = 0; i < cols; i++) ex += (double)wf[i] * x[i], mag += fabs((double)wf[i] * x[i]);
    *exact = ex;
    float y;
    if (type == FL_TYPE_F32 || type == FL_TYPE_F16 || type == FL_TYPE_BF16) {
        float l[16] = {0};
        double rel = type == FL_TYPE_F32 ? 0 : type == FL_TYPE_F16 ? 0x1p-11 : 0x1p-8;
        for (int i = 0; i < cols; i++) {
            float xr = type == FL_TYPE_F16 ? f16r(x[i]) : type == FL_TYPE_BF16 ? fl_bf16_to_f32(fl_f32_to_bf16(x[i])) : x[i];
            l[i % 16] = fmaf(xr, wf[i], l[i % 16]);
        }
        for (int j = 0; j < 8; j++) l[j] += l[j + 8];
        for (int j = 0; j < 4; j++) l[j] += l[j + 4];
        for (int j = 0; j < 2; j++) l[j] += l[j + 2];
        y = l[0] + l[1];
        *bound = mag * (rel + 1e-6) + 1e-6;
    } else {
        /* ggml's x86 vec_dot: 8 float lanes, lane k = integer sum of elements 4k..4k+3 of a block,
         * acc[k] = fma(d_w * d_x, lane, acc[k]); hsum_float_8; Q4_1 adds summs = fma(m, s, summs). */
        float acc[8] = {0}, accm = 0;
        double bnd = 0;
        for (int b = 0; b < cols / 32; b++) {
            ref_qblock_t qb;
            ref_quant_act(x + 32 * b, &qb);
            int wq[32];
            float dw, mw = 0;
            if (type == FL_TYPE_Q8_0) {
                const fl_block_q8_0_t *blk = (const fl_block_q8_0_t *)row + b;
                dw = fl_f16_to_f32(blk->d);
                for (int j = 0; j < 32; j++) wq[j] = blk->qs[j];
            } else if (type == FL_TYPE_Q4_0) {
                const fl_block_q4_0_t *blk = (const fl_block_q4_0_t *)row + b;
                dw = fl_f16_to_f32(blk->d);
                for (int j = 0; j < 16; j++) wq[j] = (blk->qs[j] & 15) - 8, wq[j + 16] = (blk->qs[j] >> 4) - 8;
            } else {
                const fl_block_q4_1_t *blk = (const fl_block_q4_1_t *)row + b;
                dw = fl_f16_to_f32(blk->d);
                mw = fl_f16_to_f32(blk->m);
                for (int j = 0; j < 16; j++) wq[j] = blk->qs[j] & 15, wq[j + 16] = blk->qs[j] >> 4;
            }
            for (int k = 0; k < 8; k++) {
                int lane = 0;
                for (int e = 4 * k; e < 4 * k + 4; e++) lane += wq[e] * qb.q[e];
                acc[k] = fmaf(dw * qb.d, (float)lane, acc[k]);
            }
            if (type == FL_TYPE_Q4_1) accm = fmaf(mw, qb.s, accm);
            /* x_j is replaced by d_x * q_j: error <= d/2 per element (+ f16 rounding of d) */
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * b + j]));
            double wsum = 0;
            for (int j = 0; j < 32; j++) wsum += fabs(wf[32 * b + j]);
            bnd += wsum * (amax / 127.0 * 0.51 + amax * 0x1p-10);
        }
        float h[4];
        for (int k = 0; k < 4; k++) h[k] = acc[k + 4] + acc[k];
        const float hs = (h[0] + h[2]) + (h[1] + h[3]);
        y = type == FL_TYPE_Q4_1 ? hs + accm : hs;
        *bound = bnd + mag * 1e-5 + 1e-5;
    }
    free(wf);
    return y;
}

static const int all_types[] = {FL_TYPE_F32, FL_TYPE_F16, FL_TYPE_BF16, FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};

static uint8_t *make_weight(int type, int64_t rows, int64_t cols)
{
    const size_t rb = fl_dtype_row_bytes(type, cols);
    uint8_t *w = malloc(rb * rows + 64);
    float *tmp = malloc((size_t)cols * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        fill(tmp, cols, 1.0f);
        if (r % 7 == 3) memset(tmp, 0, 32 * sizeof(float)); /* an all-zero block */
        assert_int_equal(quant_quantize_row(type, tmp, w + rb * r, cols), rb);
    }
    free(tmp);
    return w;
}

/* Runs y = x W^T on be and checks each element against the spec (bit-exact) and the exact product. */
static void check_matmul(kern_backend_t *be, int type, int rows, int cols, int n, bool exact_spec)
{
    uint8_t *wd = make_weight(type, rows, cols);
    fl_error_t err = {0};
    kern_weight_t *w = kern_weight_new(be, type, rows, cols, wd, &err);
    assert_non_null(w);
    float *x = kern_alloc(be, (size_t)n * cols * sizeof(float)), *y = kern_alloc(be, (size_t)n * rows * sizeof(float));
    fill(x, (size_t)n * cols, 2.0f);
    if (n > 1) memset(x + cols, 0, cols * sizeof(float)); /* an all-zero row */
    kern_matmul(be, y, w, x, n);
    const size_t rb = fl_dtype_row_bytes(type, cols);
    for (int t = 0; t < n; t++)
        for (int r = 0; r < rows; r++) {
            double ex, bound;
            const float ref = ref_matmul_one(type, wd + rb * r, x + (size_t)t * cols, cols, &ex, &bound);
            const float got = y[(size_t)t * rows + r];
            if (exact_spec && memcmp(&ref, &got, 4) != 0)
                fail_msg("%s %s %dx%d n=%d: y[%d][%d] = %.9g, spec says %.9g", isa_names[isa_of(be)],
                         fl_dtype_name(type), rows, cols, n, t, r, got, ref);
            if (!(fabs(got - ex) <= bound))
                fail_msg("%s %s %dx%d n=%d: y[%d][%d] = %.9g, exact %.9g, bound %.3g", isa_names[isa_of(be)],
                         fl_dtype_name(type), rows, cols, n, t, r, got, ex, bound);
        }
    kern_free(be, x);
    kern_free(be, y);
    kern_weight_destroy(be, w);
    free(wd);
}

static void test_matmul_matches_spec_every_type_and_isa(void **state)
{
    static const int shapes[][2] = {{32, 32}, {37, 64}, {64, 96}, {8, 576}, {576, 576}, {1536, 64}, {40, 1536}};
    static const int ns[] = {1, 2, 3, 7, 32, 100};
    for (int isa = 0; isa < 3; isa++) {
        kern_backend_t *be = new_backend(isa_names[isa], 2, NULL);
        if ((int)isa_of(be) != isa) {
            kern_destroy(&be);
            continue; /* this machine lacks the ISA */
        }
        for (size_t ti = 0; ti < sizeof all_types / sizeof *all_types; ti++)
            for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
                for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++) {
                    const int rows = shapes[si][0], cols = shapes[si][1], n = ns[ni];
                    if ((int64_t)rows * cols * n > 8000000 && isa == 0) continue; /* scalar is slow */
                    check_matmul(be, all_types[ti], rows, cols, n, true);
                }
        kern_destroy(&be);
    }
}

/* The engine guarantees a sequence decodes the same alone or in a batch: so y's row t must be the
 * same bits whatever n, and whichever ISA or thread count computed it. */
static void test_matmul_batched_equals_row_by_row_bitexact(void **state)
{
    static const int shapes[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {75, 96}};
    const int n = 64;
    kern_backend_t *bes[4] = {new_backend(NULL, 2, NULL), new_backend("avx2", 3, NULL), new_backend("scalar", 1, NULL),
                              new_backend(NULL, 1, NULL)};
    for (size_t ti = 0; ti < sizeof all_types / sizeof *all_types; ti++)
        for (size_t si = 0; si < 4; si++) {
            const int type = all_types[ti], rows = shapes[si][0], cols = shapes[si][1];
            uint8_t *wd = make_weight(type, rows, cols);
            float *x = malloc((size_t)n * cols * sizeof(float));
            float *ya = malloc((size_t)n * rows * sizeof(float)), *yb = malloc((size_t)n * rows * sizeof(float));
            fill(x, (size_t)n * cols, 3.0f);
            kern_weight_t *w0 = kern_weight_new(bes[0], type, rows, cols, wd, NULL);
            kern_matmul(bes[0], ya, w0, x, n);
            for (int b = 0; b < 4; b++) {
                kern_backend_t *be = bes[b];
                kern_weight_t *w = kern_weight_new(be, type, rows, cols, wd, NULL);
                if (b == 2 && (int64_t)rows * cols > 400000) {
                    kern_weight_destroy(be, w);
                    continue;
                }
                /* row by row, then in uneven groups */
                for (int t = 0; t < n; t++) kern_matmul(be, yb + (size_t)t * rows, w, x + (size_t)t * cols, 1);
                size_t where = 0;
                if (!bits_equal(ya, yb, (size_t)n * rows, &where))
                    fail_msg("%s %dx%d backend %d: row-by-row differs at %zu", fl_dtype_name(type), rows, cols, b, where);
                for (int t = 0, g = 1; t < n; t += g, g = g % 9 + 2) {
                    const int m = t + g <= n ? g : n - t;
                    kern_matmul(be, yb + (size_t)t * rows, w, x + (size_t)t * cols, m);
                }
                if (!bits_equal(ya, yb, (size_t)n * rows, &where))
                    fail_msg("%s %dx%d backend %d: grouped differs at %zu", fl_dtype_name(type), rows, cols, b, where);
                kern_weight_destroy(be, w);
            }
            kern_weight_destroy(bes[0], w0);
            free(x), free(ya), free(yb), free(wd);
        }
    for (int b = 0; b < 4; b++) kern_destroy(&bes[b]);
}

/* A speculative verify step scores several tokens of one sequence in one call, and decoding stays
 * lossless only if each token's logits are what plain decoding computes: so row t of y must be the
 * bits it gets in a call of its own (n = 1), for every batch size n = 1..17 and place in the batch,
 * every weight type and every ISA this machine has (AVX-512 with and without repacked weights); and
 * the ISAs agree with each other. Two threads, so the work is split. */
static void test_matmul_rows_same_bits_for_batches_1_to_17(void **state)
{
    static const int shapes[][2] = {{1536, 576}, {576, 1536}, {200, 576}, {75, 96}};
    static const struct {
        const char *isa, *repack;
    } cfg[] = {{"scalar", NULL}, {"avx2", NULL}, {"avx512", NULL}, {"avx512", "0"}};
    enum { N = 17 };
    for (size_t ti = 0; ti < sizeof all_types / sizeof *all_types; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int type = all_types[ti], rows = shapes[si][0], cols = shapes[si][1];
            uint8_t *wd = make_weight(type, rows, cols);
            float *x = malloc((size_t)N * cols * sizeof(float));
            float *ref = malloc((size_t)N * rows * sizeof(float)), *one = malloc((size_t)N * rows * sizeof(float));
            float *y = malloc((size_t)N * rows * sizeof(float));
            fill(x, (size_t)N * cols, 3.0f);
            memset(x + 5 * (size_t)cols, 0, cols * sizeof(float)); /* an all-zero row */
            bool have_ref = false;
            for (size_t ci = 0; ci < sizeof cfg / sizeof *cfg; ci++) {
                if (cfg[ci].repack) setenv("FOLIO_CPU_REPACK", cfg[ci].repack, 1);
                kern_backend_t *be = new_backend(cfg[ci].isa, 2, NULL);
                unsetenv("FOLIO_CPU_REPACK");
                if (strcmp(isa_names[isa_of(be)], cfg[ci].isa) != 0 ||
                    (isa_of(be) == CPU_ISA_SCALAR && (int64_t)rows * cols > 400000)) {
                    kern_destroy(&be); /* this machine lacks the ISA, or scalar is too slow here */
                    continue;
                }
                kern_weight_t *w = kern_weight_new(be, type, rows, cols, wd, NULL);
                assert_non_null(w);
                for (int t = 0; t < N; t++) kern_matmul(be, one + (size_t)t * rows, w, x + (size_t)t * cols, 1);
                size_t where = 0;
                if (!have_ref) memcpy(ref, one, (size_t)N * rows * sizeof(float)), have_ref = true;
                else if (!bits_equal(ref, one, (size_t)N * rows, &where))
                    fail_msg("%s %dx%d: %s%s differs from the first ISA alone at %zu", fl_dtype_name(type), rows, cols,
                             cfg[ci].isa, cfg[ci].repack ? " (not repacked)" : "", where);
                for (int n = 1; n <= N; n++)
                    for (int start = 0; start <= N - n; start += N - n > 0 ? N - n : 1) {
                        memset(y, 0xff, (size_t)n * rows * sizeof(float));
                        kern_matmul(be, y, w, x + (size_t)start * cols, n);
                        if (!bits_equal(one + (size_t)start * rows, y, (size_t)n * rows, &where))
                            fail_msg("%s %dx%d %s%s: n=%d from row %d: y[%zu][%zu] differs from its row alone",
                                     fl_dtype_name(type), rows, cols, cfg[ci].isa,
                                     cfg[ci].repack ? " (not repacked)" : "", n, start, where / rows, where % rows);
                    }
                kern_weight_destroy(be, w);
                kern_destroy(&be);
            }
            free(wd), free(x), free(ref), free(one), free(y);
        }
}

/* kern_matmul_rows (a vocabulary projection restricted to allowed tokens): five activation rows,
 * three with lists of chosen weight rows (random subsets in random order, counts not a multiple of
 * the tiles' 8) and two wanting every row, then all five with lists; the chosen entries carry the
 * bits kern_matmul gives them, every other entry of a listed row is -inf, unlisted rows equal
 * kern_matmul's; on every ISA, repacked or not. */
static void test_matmul_rows_equal_full_matmul_rows(void **state)
{
    static const struct {
        const char *isa, *repack;
    } cfg[] = {{"scalar", NULL}, {"avx2", NULL}, {"avx512", NULL}, {"avx512", "0"}};
    enum { N = 5, ROWS = 1000, COLS = 576 };
    static const int counts[] = {1, 7, 8, 9, 61, 1000, 0};
    for (size_t ti = 0; ti < sizeof all_types / sizeof *all_types; ti++) {
        const int type = all_types[ti];
        uint8_t *wd = make_weight(type, ROWS, COLS);
        float *x = malloc(N * COLS * sizeof(float)), *full = malloc(N * ROWS * sizeof(float)),
              *y = malloc(N * ROWS * sizeof(float));
        static int32_t perm[N][ROWS];
        fill(x, N * COLS, 3.0f);
        for (size_t ci = 0; ci < sizeof cfg / sizeof *cfg; ci++) {
            if (cfg[ci].repack) setenv("FOLIO_CPU_REPACK", cfg[ci].repack, 1);
            kern_backend_t *be = new_backend(cfg[ci].isa, 2, NULL);
            unsetenv("FOLIO_CPU_REPACK");
            if (strcmp(isa_names[isa_of(be)], cfg[ci].isa) != 0) {
                kern_destroy(&be);
                continue;
            }
            kern_weight_t *w = kern_weight_new(be, type, ROWS, COLS, wd, NULL);
            assert_non_null(w);
            kern_matmul(be, full, w, x, N);
            for (int pass = 0; pass < 2; pass++)
                for (size_t k = 0; k < sizeof counts / sizeof *counts; k++) {
                    const int32_t *ids[N];
                    int32_t n_ids[N];
                    for (int i = 0; i < N; i++) {
                        for (int r = 0; r < ROWS; r++) perm[i][r] = r;
                        for (int r = ROWS - 1; r > 0; r--) {
                            const int j = (int)(rnd_u32() % (uint32_t)(r + 1)), t = perm[i][r];
                            perm[i][r] = perm[i][j], perm[i][j] = t;
                        }
                        const bool listed = pass == 1 || i % 2 == 0;
                        ids[i] = listed ? perm[i] : NULL;
                        n_ids[i] = listed ? counts[(k + (size_t)i) % (sizeof counts / sizeof *counts)] : -1;
                    }
                    memset(y, 0, N * ROWS * sizeof(float));
                    assert_true(kern_matmul_rows(be, y, w, x, N, ids, n_ids));
                    for (int i = 0; i < N; i++) {
                        bool chosen[ROWS];
                        for (int r = 0; r < ROWS; r++) chosen[r] = !ids[i];
                        for (int j = 0; ids[i] && j < n_ids[i]; j++) chosen[ids[i][j]] = true;
                        for (int r = 0; r < ROWS; r++) {
                            const float got = y[i * ROWS + r], want = chosen[r] ? full[i * ROWS + r] : -INFINITY;
                            if (memcmp(&got, &want, sizeof got))
                                fail_msg("%s %s%s: x row %d (%s %d), output %d = %a, want %a", fl_dtype_name(type),
                                         cfg[ci].isa, cfg[ci].repack ? " (not repacked)" : "", i,
                                         ids[i] ? "listed" : "whole", n_ids[i], r, got, want);
                        }
                    }
                }
            kern_weight_destroy(be, w);
            kern_destroy(&be);
        }
        free(wd), free(x), free(full), free(y);
    }
}

/* The prompt order (kern_set_prompt_rows), written independently: per block one exact integer sum,
 * acc = fma(d_w * d_x, sum, acc); Q4_1 also sm = fma(m, s, sm); result acc (+ sm). */
static float ref_prompt_one(int type, const uint8_t *row, const float *x, int cols)
{
    float acc = 0, sm = 0;
    for (int b = 0; b < cols / 32; b++) {
        ref_qblock_t qb;
        ref_quant_act(x + 32 * b, &qb);
        int sum = 0;
        float dw, mw = 0;
        if (type == FL_TYPE_Q8_0) {
            const fl_block_q8_0_t *blk = (const fl_block_q8_0_t *)row + b;
            dw = fl_f16_to_f32(blk->d);
            for (int j = 0; j < 32; j++) sum += blk->qs[j] * qb.q[j];
        } else if (type == FL_TYPE_Q4_0) {
            const fl_block_q4_0_t *blk = (const fl_block_q4_0_t *)row + b;
            dw = fl_f16_to_f32(blk->d);
            for (int j = 0; j < 16; j++) sum += ((blk->qs[j] & 15) - 8) * qb.q[j] + ((blk->qs[j] >> 4) - 8) * qb.q[j + 16];
        } else {
            const fl_block_q4_1_t *blk = (const fl_block_q4_1_t *)row + b;
            dw = fl_f16_to_f32(blk->d);
            mw = fl_f16_to_f32(blk->m);
            for (int j = 0; j < 16; j++) sum += (blk->qs[j] & 15) * qb.q[j] + (blk->qs[j] >> 4) * qb.q[j + 16];
        }
        acc = fmaf(dw * qb.d, (float)sum, acc);
        if (type == FL_TYPE_Q4_1) sm = fmaf(mw, qb.s, sm);
    }
    return type == FL_TYPE_Q4_1 ? acc + sm : acc;
}

/* Rows marked as prompt tokens get the prompt order's bits (the reference above) on every path:
 * scalar, AVX2, AVX-512 packed with and without AMX, AVX-512 unpacked; the other rows of the same
 * call keep the bits of a decode call of their own; kern_matmul_multi agrees; a call of another n
 * ignores the marks; without FOLIO_CPU_PROMPT=block the marks change nothing. Shapes include one wider than the
 * AMX kernel's block chunk (2,304 columns) and batches that leave part of a 16-token tile. */
static void test_matmul_prompt_rows_every_path(void **state)
{
    (void)state;
    static const int shapes[][2] = {{1536, 576}, {576, 1536}, {75, 96}, {40, 2304}};
    static const struct {
        const char *isa, *repack, *amx;
    } cfg[] = {{"scalar", NULL, NULL}, {"avx2", NULL, NULL}, {"avx512", NULL, "0"}, {"avx512", NULL, NULL},
               {"avx512", "0", NULL}};
    static const int types[] = {FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};
    enum { N = 37 };
    uint8_t roles[N];
    for (int i = 0; i < N; i++) roles[i] = i % 5 != 2; /* mostly prompt, some decode rows between */
    int amx_runs = 0;
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int type = types[ti], rows = shapes[si][0], cols = shapes[si][1];
            const size_t rb = fl_dtype_row_bytes(type, cols);
            uint8_t *wd = make_weight(type, rows, cols);
            float *x = malloc((size_t)N * cols * sizeof(float));
            float *ref = malloc((size_t)N * rows * sizeof(float)), *y = malloc((size_t)N * rows * sizeof(float));
            float *y2 = malloc((size_t)N * rows * sizeof(float));
            fill(x, (size_t)N * cols, 3.0f);
            memset(x + 6 * (size_t)cols, 0, cols * sizeof(float)); /* an all-zero prompt row */
            for (size_t ci = 0; ci < sizeof cfg / sizeof *cfg; ci++) {
                if (cfg[ci].repack) setenv("FOLIO_CPU_REPACK", cfg[ci].repack, 1);
                if (cfg[ci].amx) setenv("FOLIO_CPU_AMX", cfg[ci].amx, 1);
                setenv("FOLIO_CPU_PROMPT", "block", 1);
                kern_backend_t *be = new_backend(cfg[ci].isa, 2, NULL);
                unsetenv("FOLIO_CPU_REPACK");
                unsetenv("FOLIO_CPU_AMX");
                unsetenv("FOLIO_CPU_PROMPT");
                const cpu_backend_t *cb = (const cpu_backend_t *)be;
                if (strcmp(isa_names[isa_of(be)], cfg[ci].isa) != 0 || (cfg[ci].amx == NULL && !strcmp(cfg[ci].isa, "avx512") &&
                                                                        !cfg[ci].repack && !cb->amx) ||
                    (isa_of(be) == CPU_ISA_SCALAR && (int64_t)rows * cols > 400000)) {
                    kern_destroy(&be); /* this machine lacks the ISA (or AMX), or scalar is too slow here */
                    continue;
                }
                amx_runs += cb->amx;
                kern_weight_t *w = kern_weight_new(be, type, rows, cols, wd, NULL);
                assert_non_null(w);
                for (int t = 0; t < N; t++)
                    if (!roles[t]) kern_matmul(be, ref + (size_t)t * rows, w, x + (size_t)t * cols, 1);
                    else
                        for (int r = 0; r < rows; r++)
                            ref[(size_t)t * rows + r] = ref_prompt_one(type, wd + rb * r, x + (size_t)t * cols, cols);
                for (int n = N; n >= 1; n -= 18) { /* 37 (mixed), 19 (mixed, a partial tile), 1 */
                    kern_set_prompt_rows(be, roles + (N - n), n);
                    memset(y, 0xff, (size_t)n * rows * sizeof(float));
                    kern_matmul(be, y, w, x + (size_t)(N - n) * cols, n);
                    size_t where = 0;
                    if (!bits_equal(ref + (size_t)(N - n) * rows, y, (size_t)n * rows, &where))
                        fail_msg("%s %dx%d %s%s%s n=%d: y[%zu][%zu] = %g, want %g (%s row)", fl_dtype_name(type), rows,
                                 cols, cfg[ci].isa, cfg[ci].repack ? " (not repacked)" : "", cb->amx ? " AMX" : "", n,
                                 where / rows, where % rows, y[where], ref[(size_t)(N - n) * rows + where],
                                 roles[N - n + where / rows] ? "prompt" : "decode");
                    const kern_weight_t *ws[2] = {w, w};
                    float *ys[2] = {y, y2};
                    kern_matmul_multi(be, ys, ws, 2, x + (size_t)(N - n) * cols, n);
                    assert_true(bits_equal(ref + (size_t)(N - n) * rows, y, (size_t)n * rows, NULL));
                    assert_true(bits_equal(ref + (size_t)(N - n) * rows, y2, (size_t)n * rows, NULL));
                }
                /* all rows prompt rows */
                memset(roles, 1, N);
                kern_set_prompt_rows(be, roles, N);
                kern_matmul(be, y, w, x, N);
                for (int t = 0; t < N; t++)
                    for (int r = 0; r < rows; r += 7)
                        assert_memory_equal(&y[(size_t)t * rows + r], &(float){ref_prompt_one(type, wd + rb * r, x + (size_t)t * cols, cols)}, 4);
                /* another n: decode order */
                kern_matmul(be, y, w, x, N - 1);
                kern_set_prompt_rows(be, NULL, 0);
                kern_matmul(be, y2, w, x, N - 1);
                assert_true(bits_equal(y, y2, (size_t)(N - 1) * rows, NULL));
                for (int i = 0; i < N; i++) roles[i] = i % 5 != 2;
                kern_weight_destroy(be, w);
                kern_destroy(&be);
            }
            free(wd), free(x), free(ref), free(y), free(y2);
        }
    printf("prompt order: %d configurations ran with AMX tiles\n", amx_runs);
    /* by default (no FOLIO_CPU_PROMPT=block) prompt rows are summed in ggml's order */
    kern_backend_t *be = new_backend("avx512", 2, NULL);
    uint8_t *wd = make_weight(FL_TYPE_Q4_1, 64, 256);
    float x[4 * 256], y[4 * 64], y1[4 * 64];
    fill(x, 4 * 256, 2.0f);
    kern_weight_t *w = kern_weight_new(be, FL_TYPE_Q4_1, 64, 256, wd, NULL);
    const uint8_t all[4] = {1, 1, 1, 1};
    kern_set_prompt_rows(be, all, 4);
    kern_matmul(be, y, w, x, 4);
    kern_set_prompt_rows(be, NULL, 0);
    kern_matmul(be, y1, w, x, 4);
    assert_true(bits_equal(y, y1, 4 * 64, NULL));
    kern_weight_destroy(be, w);
    kern_destroy(&be);
    free(wd);
}

/* kern_matmul_multi (one activation conversion and one dispatch for several weights of one input)
 * gives every output the bits of a kern_matmul of its own; mixed types fall back to single calls. */
static void test_matmul_multi_equals_single_calls(void **state)
{
    kern_backend_t *bes[4] = {new_backend(NULL, 2, NULL), new_backend("avx2", 3, NULL), new_backend("scalar", 1, NULL),
                              new_backend(NULL, 1, NULL)};
    static const int rows[3] = {576, 192, 37};
    static const int cols_list[2] = {576, 64};
    static const int ns[4] = {1, 5, 32, 70};
    const int sets[4][3] = {{FL_TYPE_Q4_1, FL_TYPE_Q4_1, FL_TYPE_Q4_1},
                            {FL_TYPE_Q4_0, FL_TYPE_Q4_0, FL_TYPE_Q4_0},
                            {FL_TYPE_Q8_0, FL_TYPE_Q8_0, FL_TYPE_Q8_0},
                            {FL_TYPE_Q4_1, FL_TYPE_Q8_0, FL_TYPE_F32}};
    for (int b = 0; b < 4; b++)
        for (int si = 0; si < 4; si++)
            for (int ci = 0; ci < 2; ci++)
                for (int ni = 0; ni < 4; ni++) {
                    kern_backend_t *be = bes[b];
                    const int cols = cols_list[ci], n = ns[ni];
                    if (b == 2 && cols * n > 576 * 5) continue; /* scalar is slow */
                    uint8_t *wd[3];
                    const kern_weight_t *ws[3];
                    float *ya[3], *yb[3];
                    float *x = malloc((size_t)n * cols * 4);
                    fill(x, (size_t)n * cols, 2.5f);
                    for (int k = 0; k < 3; k++) {
                        wd[k] = make_weight(sets[si][k], rows[k], cols);
                        ws[k] = kern_weight_new(be, sets[si][k], rows[k], cols, wd[k], NULL);
                        assert_non_null(ws[k]);
                        ya[k] = malloc((size_t)n * rows[k] * 4), yb[k] = malloc((size_t)n * rows[k] * 4);
                        kern_matmul(be, ya[k], ws[k], x, n);
                    }
                    for (int nw = 1; nw <= 3; nw++) {
                        for (int k = 0; k < 3; k++) memset(yb[k], 0xff, (size_t)n * rows[k] * 4);
                        kern_matmul_multi(be, yb, ws, nw, x, n);
                        for (int k = 0; k < nw; k++) {
                            size_t where = 0;
                            if (!bits_equal(ya[k], yb[k], (size_t)n * rows[k], &where))
                                fail_msg("backend %d set %d cols %d n %d: weight %d of %d differs at %zu", b, si, cols,
                                         n, k, nw, where);
                        }
                    }
                    for (int k = 0; k < 3; k++) {
                        kern_weight_destroy(be, (kern_weight_t *)ws[k]);
                        free(wd[k]), free(ya[k]), free(yb[k]);
                    }
                    free(x);
                }
    for (int b = 0; b < 4; b++) kern_destroy(&bes[b]);
}

/* AVX-512 VNNI without the repacked weights (FOLIO_CPU_REPACK=0: the tiles read the file layout)
 * gives the same bits as with them. */
static void test_matmul_repack_off_same_bits(void **state)
{
    kern_backend_t *a = new_backend(NULL, 2, NULL);
    setenv("FOLIO_CPU_REPACK", "0", 1);
    kern_backend_t *b = new_backend(NULL, 2, NULL);
    unsetenv("FOLIO_CPU_REPACK");
    if (isa_of(a) != CPU_ISA_AVX512) {
        kern_destroy(&a), kern_destroy(&b);
        skip();
    }
    assert_true(((cpu_backend_t *)a)->repack && !((cpu_backend_t *)b)->repack);
    static const int shapes[][2] = {{37, 64}, {576, 576}, {75, 1536}};
    static const int ns[] = {1, 3, 70};
    const int qtypes[] = {FL_TYPE_Q4_0, FL_TYPE_Q4_1, FL_TYPE_Q8_0};
    for (int ti = 0; ti < 3; ti++)
        for (int si = 0; si < 3; si++)
            for (int ni = 0; ni < 3; ni++) {
                const int rows = shapes[si][0], cols = shapes[si][1], n = ns[ni], type = qtypes[ti];
                uint8_t *wd = make_weight(type, rows, cols);
                float *x = malloc((size_t)n * cols * 4), *ya = malloc((size_t)n * rows * 4), *yb = malloc((size_t)n * rows * 4);
                fill(x, (size_t)n * cols, 2.0f);
                kern_weight_t *wa = kern_weight_new(a, type, rows, cols, wd, NULL);
                kern_weight_t *wb = kern_weight_new(b, type, rows, cols, wd, NULL);
                assert_non_null(wa->packed);
                assert_null(wb->packed);
                kern_matmul(a, ya, wa, x, n);
                kern_matmul(b, yb, wb, x, n);
                size_t where = 0;
                if (!bits_equal(ya, yb, (size_t)n * rows, &where))
                    fail_msg("%s %dx%d n=%d: packed and file layouts differ at %zu", fl_dtype_name(type), rows, cols, n, where);
                kern_weight_destroy(a, wa), kern_weight_destroy(b, wb);
                free(x), free(ya), free(yb), free(wd);
            }
    kern_destroy(&a), kern_destroy(&b);
}

static void test_matmul_blas_path_within_bound(void **state)
{
    kern_backend_t *be = new_backend(NULL, 2, "65");
    assert_int_equal(((cpu_backend_t *)be)->blas_min_n, 65);
    for (size_t ti = 0; ti < sizeof all_types / sizeof *all_types; ti++) {
        check_matmul(be, all_types[ti], 130, 576, 100, false);
        check_matmul(be, all_types[ti], 64, 96, 65, false);
        check_matmul(be, all_types[ti], 64, 96, 64, true); /* below the threshold: the tiled path */
    }
    kern_destroy(&be);
}

static void test_weight_new_rejects_bad_types_and_shapes(void **state)
{
    kern_backend_t *be = new_backend(NULL, 1, NULL);
    uint8_t buf[4096] = {0};
    fl_error_t err = {0};
    assert_null(kern_weight_new(be, 12 /* Q4_K */, 4, 256, buf, &err));
    assert_int_equal(err.code, FL_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "not supported"));
    assert_null(kern_weight_new(be, FL_TYPE_Q8_1, 4, 32, buf, &err));
    assert_int_equal(err.code, FL_EUNSUPPORTED);
    err.code = 0;
    assert_null(kern_weight_new(be, FL_TYPE_Q4_0, 4, 48, buf, &err));
    assert_int_equal(err.code, FL_EINVAL);
    assert_non_null(strstr(err.msg, "multiple"));
    assert_null(kern_weight_new(be, FL_TYPE_F32, 0, 48, buf, &err));
    kern_weight_t *w = kern_weight_new(be, FL_TYPE_F16, 3, 5, buf, &err);
    assert_non_null(w);
    kern_weight_destroy(be, w);
    kern_destroy(&be);
    assert_null(be);
    kern_destroy(NULL);
    kern_destroy(&be);
}

static void test_cuda_stub_says_unsupported(void **state)
{
    /* Without a usable GPU the CUDA constructor fails with a message (module missing, no driver or
     * no device), never a crash, and auto-selection does not pick it. */
    if (access("/dev/nvidiactl", F_OK) == 0) skip();
    fl_error_t err = {0};
    assert_null(kern_cuda_new(0, &err));
    assert_true(err.code == FL_EUNSUPPORTED || err.code == FL_EBACKEND || err.code == FL_ENOTFOUND);
    assert_true(err.msg[0] != 0);
    assert_false(kern_cuda_available());
}

/* ggml_v_expf (the AVX-512 ggml polynomial), written out independently: the spec of softmax/swiglu. */
static float spec_v_expf(float x)
{
    const float z = fmaf(x, 0x1.715476p+0f, 0x1.8p23f), n = z - 0x1.8p23f;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x)), u = b * b;
    const float p45 = fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), p23 = fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f);
    const float j = fmaf(fmaf(p45, u, p23), u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    if (isnan(n)) return n;
    if (fabsf(n) > 192) return n > 0 ? INFINITY : 0.0f;
    return ldexpf(j, (int)n);
}

static float spec_reduce16(const float *l)
{
    float a[8], b[4];
    for (int k = 0; k < 8; k++) a[k] = l[k] + l[k + 8];
    for (int k = 0; k < 4; k++) b[k] = a[k] + a[k + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* ---- small ops ---- */

static void test_embed_dequantizes_rows_of_every_type(void **state)
{
    kern_backend_t *be = new_backend(NULL, 2, NULL);
    const int rows = 50, cols = 96;
    for (size_t ti = 0; ti < sizeof all_types / sizeof *all_types; ti++) {
        const int type = all_types[ti];
        uint8_t *wd = make_weight(type, rows, cols);
        kern_weight_t *w = kern_weight_new(be, type, rows, cols, wd, NULL);
        const int32_t ids[5] = {0, 49, 7, 7, 20};
        float out[5 * 96], ref[96];
        kern_embed(be, out, w, ids, 5);
        for (int i = 0; i < 5; i++) {
            quant_dequantize_row(type, wd + fl_dtype_row_bytes(type, cols) * ids[i], ref, cols);
            assert_memory_equal(out + i * cols, ref, sizeof ref);
        }
        kern_weight_destroy(be, w);
        free(wd);
    }
    kern_destroy(&be);
}

static void test_rmsnorm_swiglu_add_match_reference(void **state)
{
    kern_backend_t *be = new_backend(NULL, 1, NULL);
    static const int dims[] = {1, 5, 64, 576, 1000};
    for (size_t di = 0; di < 5; di++) {
        const int dim = dims[di], n = 3;
        float *x = malloc(n * dim * 4), *w = malloc(dim * 4), *y = malloc(n * dim * 4), *u = malloc(n * dim * 4);
        fill(x, n * dim, 4.0f), fill(w, dim, 2.0f), fill(u, n * dim, 3.0f);
        kern_rmsnorm(be, y, x, w, n, dim, 1e-5f);
        for (int r = 0; r < n; r++) {
            double ss = 0;
            for (int i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
            const double sc = 1.0 / sqrt(ss / dim + 1e-5);
            for (int i = 0; i < dim; i++) {
                const double ref = x[r * dim + i] * sc * w[i];
                assert_true(fabs(y[r * dim + i] - ref) <= 1e-5 * fabs(ref) + 1e-7);
            }
        }
        for (int isa = 0; isa < 3; isa++) {
            kern_backend_t *bi = new_backend(isa_names[isa], 1, NULL);
            kern_swiglu(bi, y, x, u, n * dim);
            kern_destroy(&bi);
            const int nv = n * dim / 16 * 16;
            for (int i = 0; i < n * dim; i++) {
                const double g = x[i], ref = g / (1.0 + exp(-g)) * u[i];
                assert_true(fabs(y[i] - ref) <= 1e-5 * fabs(ref) + 1e-7);
                /* ggml_vec_swiglu_f32: v_silu on 16-chunks, expf on the tail */
                const float e = i < nv ? spec_v_expf(0.0f - x[i]) : expf(-x[i]), spec = x[i] / (1.0f + e) * u[i];
                if (memcmp(&spec, &y[i], 4)) fail_msg("%s swiglu[%d] = %.9g, spec says %.9g", isa_names[isa], i, y[i], spec);
            }
        }
        memcpy(y, x, n * dim * 4);
        kern_add(be, y, u, n * dim);
        for (int i = 0; i < n * dim; i++) assert_true(y[i] == x[i] + u[i]);
        free(x), free(w), free(y), free(u);
    }
    kern_destroy(&be);
}

/* ggml_vec_geglu_f32 with GGML_GELU_FP16: 0 at or below -10, g * u from 10 up, else the f16 table
 * at the f16-rounded gate, times u. */
static float geglu_spec(const fl_f16_t *table, float g, float u)
{
    return g <= -10.0f ? 0.0f : g >= 10.0f ? g * u : fl_f16_to_f32(table[fl_f32_to_f16(g)]) * u;
}

/* The ops of the families beyond Llama, on every ISA, bit for bit against ggml's formulas: Q/K/V
 * bias (y + b), scale (x * s), soft-capping (tanhf(x * (1/c)) * c, Gemma 2's scale-tanh-scale), and
 * GeGLU: ggml_vec_geglu_f32 with GGML_GELU_FP16, the f16 table of kernels/gelu.h at the f16-rounded
 * gate, x * up from 10 up, 0 below -10 (the table itself equals llama.cpp's ggml_table_gelu_f16,
 * compared entry for entry when it was written). */
static void test_family_ops_equal_ggml_on_every_isa(void **state)
{
    static fl_f16_t table[KERN_GELU_TABLE_SIZE];
    kern_gelu_table_fill(table);
    const int n = 5, dim = 96, total = n * dim; /* 480: 16-chunks and a tail per range */
    float *x = malloc(total * 4), *g = malloc(total * 4), *u = malloc(total * 4), *y = malloc(total * 4),
          *b = malloc(dim * 4);
    fill(x, total, 4.0f), fill(u, total, 2.0f), fill(b, dim, 1.0f);
    for (int i = 0; i < total; i++) g[i] = x[i] * 4.0f; /* past +-10 too */
    g[0] = -10.0f, g[1] = 10.0f, g[2] = 0.0f, g[3] = -0.0f;
    for (int isa = 0; isa < 3; isa++) {
        kern_backend_t *be = new_backend(isa_names[isa], 2, NULL);
        memcpy(y, x, total * 4);
        kern_add_bias(be, y, b, n, dim);
        for (int i = 0; i < total; i++) assert_true(y[i] == x[i] + b[i % dim]);
        memcpy(y, x, total * 4);
        kern_scale(be, y, 0.125f, total);
        for (int i = 0; i < total; i++) assert_true(y[i] == x[i] * 0.125f);
        memcpy(y, g, total * 4);
        kern_softcap(be, y, 30.0f, total);
        for (int i = 0; i < total; i++) {
            const float spec = tanhf(g[i] * (1.0f / 30.0f)) * 30.0f;
            if (memcmp(&spec, &y[i], 4)) fail_msg("%s softcap[%d] = %.9g, spec says %.9g", isa_names[isa], i, y[i], spec);
        }
        kern_geglu(be, y, g, u, total);
        for (int i = 0; i < total; i++) {
            const float gi = g[i], spec = geglu_spec(table, gi, u[i]);
            if (memcmp(&spec, &y[i], 4)) fail_msg("%s geglu[%d] = %.9g, spec says %.9g", isa_names[isa], i, y[i], spec);
            const double gelu = 0.5 * gi * (1.0 + tanh(0.7978845608 * gi * (1.0 + 0.044715 * gi * gi)));
            assert_true(fabs(y[i] - gelu * u[i]) <= 2e-3 * fabs(u[i]) * (1 + fabs(gelu))); /* f16 table: ~1e-3 */
        }
        kern_destroy(&be);
    }
    free(x), free(g), free(u), free(y), free(b);
}

/* GeGLU's vector paths round the gate to f16 in hardware and gather the table: every f16 value, the
 * f32 values on either side of each rounding midpoint (where round-to-nearest-even decides), a
 * stride over all other floats (infinities and overflow to f16 infinity included) and the +-10
 * edges, against ggml's scalar formula, bit for bit on every ISA. NaN gates only need a NaN out. */
static void test_geglu_every_f16_rounding_on_every_isa(void **state)
{
    static fl_f16_t table[KERN_GELU_TABLE_SIZE];
    kern_gelu_table_fill(table);
    const int n_mid = 65536 * 4, n_stride = 1 << 22;
    const int total = n_mid + n_stride + 8;
    float *g = malloc((size_t)total * 4), *u = malloc((size_t)total * 4), *y = malloc((size_t)total * 4);
    int k = 0;
    for (int h = 0; h < 65536; h++) {
        const float a = fl_f16_to_f32((fl_f16_t)h), b = fl_f16_to_f32((fl_f16_t)(h + 1 < 65536 ? h + 1 : h));
        const float mid = (float)(((double)a + (double)b) / 2);
        g[k++] = a, g[k++] = mid, g[k++] = nextafterf(mid, -INFINITY), g[k++] = nextafterf(mid, INFINITY);
    }
    for (uint32_t i = 0; i < (uint32_t)n_stride; i++) {
        const uint32_t bits = i * 1024u + (i & 1023u);
        memcpy(&g[k++], &bits, 4);
    }
    const float edges[8] = {-10.0f, 10.0f, nextafterf(-10.0f, 0), nextafterf(10.0f, 0), nextafterf(10.0f, 11), 65520.0f,
                            INFINITY, -INFINITY};
    for (int i = 0; i < 8; i++) g[k++] = edges[i];
    for (int i = 0; i < total; i++) u[i] = (i % 7 == 3) ? -1.75f : 0.5f + (float)(i % 13);
    for (int isa = 0; isa < 3; isa++) {
        kern_backend_t *be = new_backend(isa_names[isa], 2, NULL);
        kern_geglu(be, y, g, u, total);
        for (int i = 0; i < total; i++) {
            const float gi = g[i];
            if (isnan(gi)) {
                if (!isnan(y[i])) fail_msg("%s geglu of a NaN gate = %.9g", isa_names[isa], y[i]);
                continue;
            }
            const float spec = geglu_spec(table, gi, u[i]);
            if (memcmp(&spec, &y[i], 4) && !(isnan(spec) && isnan(y[i])))
                fail_msg("%s geglu(%a) = %a, spec says %a", isa_names[isa], gi, y[i], spec);
        }
        kern_destroy(&be);
    }
    free(g), free(u), free(y);
}

/* glibc's tanhf as written (the SunPro s_tanhf.c and s_expm1f.c, single precision, nothing fused),
 * transcribed here so that the lanes are checked against the algorithm on any C library: on glibc
 * 2.36 it equals libm (checked below), a later glibc may round differently, and then the engine
 * calls libm instead of the lanes (cpu_tanhf_exact false) while the lanes are still checked. */
static float f_of(uint32_t b)
{
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static uint32_t bits_of_f(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

__attribute__((optimize("fp-contract=off"))) static float sunpro_expm1f(float x)
{
    const float ln2_hi = f_of(0x3f317180), ln2_lo = f_of(0x3717f7d1), invln2 = f_of(0x3fb8aa3b);
    const float q1 = f_of(0xbd088889), q2 = f_of(0x3ad00d01), q3 = f_of(0xb8a670cd), q4 = f_of(0x36867e54),
                q5 = f_of(0xb457edbb);
    uint32_t hx = bits_of_f(x);
    const bool neg = hx >> 31;
    hx &= 0x7fffffff;
    if (hx >= 0x4195b844 && neg) return -1.0f; /* tanhf's arguments stay below 44: no overflow branch */
    float hi, lo, c = 0.0f;
    int k;
    if (hx > 0x3eb17218) {
        if (hx < 0x3f851592) {
            hi = neg ? x + ln2_hi : x - ln2_hi, lo = neg ? -ln2_lo : ln2_lo, k = neg ? -1 : 1;
        } else {
            k = (int)(invln2 * x + (neg ? -0.5f : 0.5f));
            const float t = (float)k;
            hi = x - t * ln2_hi, lo = t * ln2_lo;
        }
        x = hi - lo;
        c = (hi - x) - lo;
    } else if (hx < 0x33000000) {
        return x;
    } else {
        k = 0;
    }
    const float hfx = 0.5f * x, hxs = x * hfx;
    const float r1 = 1.0f + hxs * (q1 + hxs * (q2 + hxs * (q3 + hxs * (q4 + hxs * q5))));
    const float t = 3.0f - r1 * hfx;
    float e = hxs * ((r1 - t) / (6.0f - x * t));
    if (k == 0) return x - (x * e - hxs);
    e = (x * (e - c) - c);
    e -= hxs;
    const uint32_t k_exp = (uint32_t)k << 23;
    if (k == -1) return 0.5f * (x - e) - 0.5f;
    if (k == 1) return x < -0.25f ? -2.0f * (e - (x + 0.5f)) : 1.0f + 2.0f * (x - e);
    if (k <= -2 || k > 56) return f_of(bits_of_f(1.0f - (e - x)) + k_exp) - 1.0f;
    if (k < 23) return f_of(bits_of_f(f_of(0x3f800000u - (0x1000000u >> k)) - (e - x)) + k_exp);
    float y = x - (e + f_of((uint32_t)(0x7f - k) << 23));
    y += 1.0f;
    return f_of(bits_of_f(y) + k_exp);
}

__attribute__((optimize("fp-contract=off"))) static float sunpro_tanhf(float x)
{
    const uint32_t jx = bits_of_f(x), ix = jx & 0x7fffffff;
    if (ix >= 0x7f800000) return jx >> 31 ? 1.0f / x - 1.0f : 1.0f / x + 1.0f;
    float z = 1.0f; /* |x| >= 22 */
    if (ix < 0x41b00000) {
        if (ix < 0x24000000) return x * (1.0f + x); /* +-0 and |x| < 2^-55 */
        if (ix >= 0x3f800000) {
            const float t = sunpro_expm1f(2.0f * fabsf(x));
            z = 1.0f - 2.0f / (t + 2.0f);
        } else {
            const float t = sunpro_expm1f(-2.0f * fabsf(x));
            z = -t / (t + 2.0f);
        }
    }
    return jx >> 31 ? -z : z;
}

/* Soft-capping's tanhf, 8 lanes at a time (cpu_tanhf.c): the lanes equal the algorithm above, and
 * the batch (lanes or libm) equals the C library, on a stride over every float bit pattern, either
 * sign, NaNs, infinities and each branch's edges (all 2^32 floats were compared with libm when it
 * was written: 40 s). */
static void test_tanhf_lanes_equal_the_algorithm_and_libm(void **state)
{
    (void)state;
    const bool lanes = cpu_lanes_supported();
    fprintf(stderr, "tanhf lanes %s; the batch %s\n", lanes ? "run here" : "need AVX2, FMA and F16C: not checked",
            cpu_tanhf_exact() ? "runs them (equal to this libm)" : "calls tanhf");
    enum { CHUNK = 1 << 16 };
    static float x[CHUNK], y[CHUNK], z[CHUNK];
#if defined(__SANITIZE_ADDRESS__)
    const uint64_t step = 4099;
#else
    const uint64_t step = 61;
#endif
    const float edges[] = {0.0f, -0.0f, 0x1p-56f, -0x1p-55f, 0x1.62e42p-2f, 0x1.62e44p-2f, 0x1.0a2b24p+0f, 1.0f, -1.0f,
                           0x1.fffffep-1f, 22.0f, -22.0f, 0x1.5fffffp+4f, 9.35f, 13.0f, INFINITY, -INFINITY, NAN};
    const int ne = (int)(sizeof edges / sizeof *edges);
    uint64_t checked = 0, libm_differs = 0;
    for (uint64_t u = 0; u < (1ull << 32) + (uint64_t)ne * step;) {
        int n = 0;
        for (; n < CHUNK && u < (1ull << 32); n++, u += step) memcpy(&x[n], &(uint32_t){(uint32_t)u}, sizeof(float));
        if (u >= (1ull << 32)) /* the edges, once, after the sweep */
            for (int i = 0; i < ne && n < CHUNK; i++, u += step) x[n++] = edges[i];
        cpu_tanhf_batch(y, x, n);
        if (lanes) cpu_tanhf_lanes(z, x, n);
        for (int i = 0; i < n; i++) {
            const float libm = tanhf(x[i]), algo = sunpro_tanhf(x[i]);
            if (memcmp(&libm, &y[i], sizeof libm) && !(isnan(libm) && isnan(y[i])))
                fail_msg("tanhf(%a): libm %a, batch %a", (double)x[i], (double)libm, (double)y[i]);
            if (lanes && memcmp(&algo, &z[i], sizeof algo) && !(isnan(algo) && isnan(z[i])))
                fail_msg("tanhf(%a): the algorithm %a, lanes %a", (double)x[i], (double)algo, (double)z[i]);
            libm_differs += memcmp(&libm, &algo, sizeof libm) && !(isnan(libm) && isnan(algo));
        }
        checked += (uint64_t)n;
    }
    fprintf(stderr, "tanhf: %llu floats checked; this libm differs from the algorithm on %llu\n",
            (unsigned long long)checked, (unsigned long long)libm_differs);
    if (cpu_tanhf_exact()) assert_int_equal(libm_differs, 0);
}

/* Adjacent pairs (Llama) and NeoX pairs i, i + n_rot/2 (Qwen, Phi-3, Gemma), with Phi-3's mscale. */
static void test_rope_rotates_adjacent_and_neox_pairs_like_ggml(void **state)
{
    kern_backend_t *be = new_backend(NULL, 1, NULL);
    const int n = 4, nh = 3, hd = 64;
    const int32_t pos[4] = {0, 1, 17, 4095};
    float ff[16];
    for (int i = 0; i < 16; i++) ff[i] = 1.0f + i * 0.5f;
    const kern_rope_t cfgs[5] = {
        {.n_rot = 64, .freq_base = 10000.0f, .freq_scale = 1.0f},
        {.n_rot = 32, .freq_base = 500000.0f, .freq_scale = 0.25f, .freq_factors = ff},
        {.n_rot = 64, .freq_base = 100000.0f, .freq_scale = 1.0f},
        {.n_rot = 64, .freq_base = 1000000.0f, .freq_scale = 1.0f, .neox = true},
        {.n_rot = 32, .freq_base = 10000.0f, .freq_scale = 1.0f, .freq_factors = ff, .neox = true, .mscale = 1.1902381f},
    };
    for (int c = 0; c < 5; c++) {
        const kern_rope_t *rp = &cfgs[c];
        /* the pair of rotated index i: (i0, i0 + other) */
        const int stride = rp->neox ? 1 : 2, other = rp->neox ? rp->n_rot / 2 : 1;
        const float ms = rp->mscale != 0.0f ? rp->mscale : 1.0f;
        float x[4 * 3 * 64], y[4 * 3 * 64];
        fill(x, sizeof x / 4, 1.0f);
        memcpy(y, x, sizeof x);
        kern_rope(be, y, pos, n, nh, hd, rp);
        /* ggml's rope as compiled with FMA contraction, bit for bit, on every ISA */
        for (int isa = 0; isa < 3; isa++) {
            kern_backend_t *bi = new_backend(isa_names[isa], 1, NULL);
            float z[4 * 3 * 64];
            memcpy(z, x, sizeof x);
            kern_rope(bi, z, pos, n, nh, hd, rp);
            kern_destroy(&bi);
            for (int t = 0; t < n; t++) {
                float theta = (float)pos[t];
                const float ts = powf(rp->freq_base, -2.0f / (float)rp->n_rot);
                for (int i = 0; i < rp->n_rot / 2; i++) {
                    const float th = rp->freq_scale * (theta / (rp->freq_factors ? rp->freq_factors[i] : 1.0f));
                    const float cs = cosf(th) * ms, sn = sinf(th) * ms;
                    theta *= ts;
                    for (int h = 0; h < nh; h++) {
                        const float *xi = x + (t * nh + h) * hd + i * stride, *zi = z + (t * nh + h) * hd + i * stride;
                        const float r0 = fmaf(xi[0], cs, -(xi[other] * sn));
                        const float r1 = fmaf(xi[0], sn, xi[other] * cs);
                        assert_true(memcmp(&r0, &zi[0], 4) == 0 && memcmp(&r1, &zi[other], 4) == 0);
                    }
                }
            }
        }
        for (int t = 0; t < n; t++)
            for (int h = 0; h < nh; h++) {
                const float *x0 = x + (t * nh + h) * hd, *y0 = y + (t * nh + h) * hd;
                for (int d = rp->n_rot; d < hd; d++) assert_true(y0[d] == x0[d]); /* beyond n_rot: untouched */
                for (int i = 0; i < rp->n_rot / 2; i++) {
                    const float *xi = x0 + i * stride, *yi = y0 + i * stride;
                    const double fr = pow(rp->freq_base, -2.0 * i / rp->n_rot) / (rp->freq_factors ? rp->freq_factors[i] : 1.0);
                    const double th = pos[t] * rp->freq_scale * fr;
                    const double r0 = ms * (xi[0] * cos(th) - xi[other] * sin(th));
                    const double r1 = ms * (xi[0] * sin(th) + xi[other] * cos(th));
                    /* iterative theta accumulates ~i ulps of relative error in the angle */
                    const double tol = 1e-5 + fabs(th) * 4e-7 * (i + 1);
                    assert_true(fabs(yi[0] - r0) <= tol);
                    assert_true(fabs(yi[other] - r1) <= tol);
                }
            }
    }
    kern_destroy(&be);
}

static void test_kv_store_writes_f16_rows_at_slots(void **state)
{
    for (int isa = 0; isa < 3; isa++) {
        kern_backend_t *be = new_backend(isa_names[isa], 1, NULL);
        const int kv_dim = 3 * 64 + 4, n = 3, n_slots = 10;
        fl_f16_t *kc = kern_alloc(be, n_slots * kv_dim * 2), *vc = kern_alloc(be, n_slots * kv_dim * 2);
        float k[3 * 196], v[3 * 196];
        fill(k, n * kv_dim, 10.0f), fill(v, n * kv_dim, 10.0f);
        const int32_t slots[3] = {9, 0, 4};
        kern_kv_store(be, kc, vc, FL_TYPE_F16, FL_TYPE_F16, k, v, slots, n, kv_dim);
        for (int i = 0; i < n; i++)
            for (int d = 0; d < kv_dim; d++) {
                assert_int_equal(kc[slots[i] * kv_dim + d], fl_f32_to_f16(k[i * kv_dim + d]));
                assert_int_equal(vc[slots[i] * kv_dim + d], fl_f32_to_f16(v[i * kv_dim + d]));
            }
        for (int d = 0; d < kv_dim; d++) assert_int_equal(kc[1 * kv_dim + d], 0);
        kern_free(be, kc), kern_free(be, vc);
        kern_destroy(&be);
    }
}

/* ---- attention ---- */

/* tinyBLAS order: element i into lane i % 16 (fma), canonical reduce. */
static float spec_dot_tb(const float *a, const float *b, int n)
{
    float l[16] = {0};
    for (int i = 0; i < n; i++) l[i % 16] = fmaf(a[i], b[i], l[i % 16]);
    return spec_reduce16(l);
}

/* ggml_vec_dot_f16 order: 64-chunks in 4 x 16 lanes, (A0+A2)+(A1+A3), reduce, leftovers in double. */
static float spec_dot_vd(const float *a, const float *b, int n)
{
    const int np = n & ~63;
    float acc[4][16] = {{0}}, l[16];
    for (int i = 0; i < np; i++) acc[(i % 64) / 16][i % 16] = fmaf(a[i], b[i], acc[(i % 64) / 16][i % 16]);
    for (int k = 0; k < 16; k++) l[k] = (acc[0][k] + acc[2][k]) + (acc[1][k] + acc[3][k]);
    double sum = spec_reduce16(l);
    for (int i = np; i < n; i++) sum += (double)(a[i] * b[i]);
    return (float)sum;
}

/* llama.cpp's non-flash attention for one (token, head), bit for bit: multi = the token's sequence
 * has >= 2 tokens in the call (tinyBLAS order) or not (vec_dot order); n_kv = len padded to 32.
 * A sliding window masks the positions before it (-inf, as llama.cpp's kq_mask); soft-capping is
 * llama.cpp's scale(1/cap), tanh, scale(cap) of kq before the softmax's scale. */
static void spec_attention(const kern_attn_t *a, int i, int h, bool multi, float *out)
{
    const int hd = a->head_dim, kvh = h / (a->n_heads / a->n_kv_heads), len = a->tok_pos[i] + 1;
    const int nkv = (len + 31) / 32 * 32;
    const int32_t *bt = a->block_tables + a->tok_seq[i] * a->max_blocks;
    float *sc = calloc(nkv, sizeof(float)), *vv = calloc(nkv, sizeof(float)), q[512], kk[512];
    const float *qr = a->q + ((size_t)i * a->n_heads + h) * hd;
    for (int d = 0; d < hd; d++) q[d] = f16r(qr[d]);
    float mx = -INFINITY;
    for (int j = 0; j < len; j++) {
        const size_t slot = (size_t)bt[j / a->block_size] * a->block_size + j % a->block_size;
        for (int d = 0; d < hd; d++) kk[d] = fl_f16_to_f32(((const fl_f16_t *)a->k_cache)[(slot * a->n_kv_heads + kvh) * hd + d]);
        float kq = multi && hd % 16 == 0 ? spec_dot_tb(kk, q, hd) : spec_dot_vd(kk, q, hd);
        if (a->softcap > 0) kq = tanhf(kq * (1.0f / a->softcap)) * a->softcap;
        sc[j] = a->window > 0 && j <= a->tok_pos[i] - a->window ? -INFINITY : kq * a->scale;
        mx = fmaxf(mx, sc[j]);
    }
    double sum = 0;
    for (int c = 0; c < nkv; c += 16) {
        for (int k = c; k < c + 16; k++) sc[k] = k < len ? spec_v_expf(sc[k] - mx) : 0.0f;
        sum += spec_reduce16(sc + c);
    }
    const float inv = (float)(1.0 / sum);
    for (int j = 0; j < nkv; j++) sc[j] = f16r(sc[j] * inv);
    for (int d = 0; d < hd; d++) {
        for (int j = 0; j < nkv; j++) {
            vv[j] = 0;
            if (j < len) {
                const size_t slot = (size_t)bt[j / a->block_size] * a->block_size + j % a->block_size;
                vv[j] = fl_f16_to_f32(((const fl_f16_t *)a->v_cache)[(slot * a->n_kv_heads + kvh) * hd + d]);
            }
        }
        out[d] = multi && hd % 4 == 0 ? spec_dot_tb(vv, sc, nkv) : spec_dot_vd(vv, sc, nkv);
    }
    free(sc), free(vv);
}

/* Double-precision reference of the documented numerics (q, p rounded to f16). */
static void ref_attention(const kern_attn_t *a, int i, int h, float *out)
{
    const int hd = a->head_dim, kvh = h / (a->n_heads / a->n_kv_heads), len = kern_attn_len(a, i);
    const int32_t *bt = a->block_tables + a->tok_seq[i] * a->max_blocks;
    double *sc = malloc((len + 1) * sizeof(double)), mx = -INFINITY, sum = 0;
    const float *q = a->q + ((size_t)i * a->n_heads + h) * hd;
    for (int j = 0; j < len; j++) {
        const size_t slot = (size_t)bt[j / a->block_size] * a->block_size + j % a->block_size;
        const fl_f16_t *k = (const fl_f16_t *)a->k_cache + (slot * a->n_kv_heads + kvh) * hd;
        double s = 0;
        for (int d = 0; d < hd; d++) s += (double)f16r(q[d]) * fl_f16_to_f32(k[d]);
        if (a->softcap > 0) s = tanh(s / a->softcap) * a->softcap;
        const bool in_window = a->window <= 0 || j > a->tok_pos[i] - a->window;
        sc[j] = kern_attn_visible(a, i, j) && in_window ? s * a->scale : -INFINITY;
        mx = fmax(mx, sc[j]);
    }
    for (int j = 0; j < len; j++) sum += (sc[j] = exp(sc[j] - mx));
    for (int d = 0; d < hd; d++) out[d] = 0;
    for (int j = 0; j < len; j++) {
        const size_t slot = (size_t)bt[j / a->block_size] * a->block_size + j % a->block_size;
        const fl_f16_t *v = (const fl_f16_t *)a->v_cache + (slot * a->n_kv_heads + kvh) * hd;
        const double p = f16r((float)(sc[j] / sum));
        for (int d = 0; d < hd; d++) out[d] += (float)(p * fl_f16_to_f32(v[d]));
    }
    free(sc);
}

/* window, softcap: kern_attn_t's (0: none) */
static void run_attention_case(int n_heads, int n_kv_heads, int hd, int block_size, int window, float softcap)
{
    /* three sequences of different lengths; blocks scattered over the pool */
    const int n_seqs = 3, max_blocks = 12, n_blocks = 40;
    const int lens[3] = {1, block_size + 1, 5 * block_size - 1};
    int32_t tables[3 * 12];
    for (int s = 0; s < n_seqs; s++)
        for (int b = 0; b < max_blocks; b++) tables[s * max_blocks + b] = (s * 13 + b * 3 + 1) % n_blocks;
    /* distinct blocks per sequence: (13s + 3b + 1) mod 40 collide across s? make them unique */
    for (int s = 0; s < n_seqs; s++)
        for (int b = 0; b < max_blocks; b++) tables[s * max_blocks + b] = (b * n_seqs + s + 1) % n_blocks;
    const int kv_dim = n_kv_heads * hd;
    const size_t pool = (size_t)n_blocks * block_size * kv_dim;
    fl_f16_t *kc = malloc(pool * 2), *vc = malloc(pool * 2);
    for (size_t i = 0; i < pool; i++) kc[i] = fl_f32_to_f16(rnd_f(-2, 2)), vc[i] = fl_f32_to_f16(rnd_f(-2, 2));
    /* tokens: decode-style last positions, plus block-boundary positions and a prefill run */
    int32_t seq[40], pos[40];
    int n = 0;
    for (int s = 0; s < n_seqs; s++) seq[n] = s, pos[n++] = lens[s] - 1;
    const int special[] = {0, block_size - 1, block_size, 2 * block_size - 1, 2 * block_size, 3 * block_size + 1};
    for (int k = 0; k < 6; k++) seq[n] = 2, pos[n++] = special[k];
    for (int p = 0; p < 8; p++) seq[n] = 1, pos[n++] = p;
    const int qdim = n_heads * hd;
    float *q = malloc((size_t)n * qdim * 4), *out = malloc((size_t)n * qdim * 4), *o2 = malloc((size_t)n * qdim * 4);
    fill(q, (size_t)n * qdim, 3.0f);
    kern_attn_t a = {.out = out, .q = q, .k_cache = kc, .v_cache = vc, .n_tokens = n, .tok_seq = seq, .tok_pos = pos,
                     .block_tables = tables, .max_blocks = max_blocks, .block_size = block_size, .n_heads = n_heads,
                     .n_kv_heads = n_kv_heads, .head_dim = hd, .scale = 1.0f / sqrtf((float)hd),
                     .window = window, .softcap = softcap};
    float *results[3] = {0};
    for (int isa = 0; isa < 3; isa++) {
        kern_backend_t *be = new_backend(isa_names[isa], 2, NULL);
        if ((int)isa_of(be) != isa) {
            kern_destroy(&be);
            continue;
        }
        kern_attention(be, &a);
        int seq_count[3] = {0};
        for (int i = 0; i < n; i++) seq_count[seq[i]]++;
        float ref[256];
        for (int i = 0; i < n; i++)
            for (int h = 0; h < n_heads; h++) {
                ref_attention(&a, i, h, ref);
                for (int d = 0; d < hd; d++) {
                    const float got = out[((size_t)i * n_heads + h) * hd + d];
                    if (!(fabsf(got - ref[d]) <= 2e-3f * (1 + fabsf(ref[d]))))
                        fail_msg("attn nh=%d nkv=%d hd=%d bs=%d tok %d head %d d %d: %g vs %g", n_heads, n_kv_heads,
                                 hd, block_size, i, h, d, got, ref[d]);
                }
                spec_attention(&a, i, h, seq_count[seq[i]] >= 2, ref);
                for (int d = 0; d < hd; d++) {
                    const float got = out[((size_t)i * n_heads + h) * hd + d];
                    if (memcmp(&got, &ref[d], 4))
                        fail_msg("%s attn nh=%d nkv=%d hd=%d bs=%d tok %d head %d d %d: %.9g, spec says %.9g",
                                 isa_names[isa], n_heads, n_kv_heads, hd, block_size, i, h, d, got, ref[d]);
                }
            }
        /* each sequence alone (all its tokens in one call) gives the same bits; a decode token
         * (one per sequence) gives the same bits alone */
        for (int sq = 0; sq < n_seqs; sq++) {
            int32_t sseq[40], spos[40], idx[40], m = 0;
            for (int i = 0; i < n; i++)
                if (seq[i] == sq) sseq[m] = sq, spos[m] = pos[i], idx[m++] = i;
            float *qq = malloc((size_t)m * qdim * 4), *oo = malloc((size_t)m * qdim * 4);
            for (int k = 0; k < m; k++) memcpy(qq + (size_t)k * qdim, q + (size_t)idx[k] * qdim, (size_t)qdim * 4);
            kern_attn_t one = a;
            one.n_tokens = m, one.q = qq, one.out = oo, one.tok_seq = sseq, one.tok_pos = spos;
            kern_attention(be, &one);
            for (int k = 0; k < m; k++)
                assert_true(bits_equal(oo + (size_t)k * qdim, out + (size_t)idx[k] * qdim, qdim, NULL));
            free(qq), free(oo);
        }
        /* every token as a decode step (alone in the call): ggml_vec_dot_f16 order, checked at every
         * length the case has (n_kv = 32, 64, 96, ...: lanes only, lanes + double leftovers, ...) */
        for (int i = 0; i < n; i++) {
            kern_attn_t one = a;
            one.n_tokens = 1, one.q = q + (size_t)i * qdim, one.out = o2, one.tok_seq = seq + i, one.tok_pos = pos + i;
            kern_attention(be, &one);
            kern_attn_t ai = one;
            for (int h = 0; h < n_heads; h++) {
                spec_attention(&ai, 0, h, false, ref);
                if (!bits_equal(o2 + (size_t)h * hd, ref, hd, NULL))
                    fail_msg("%s decode attn hd=%d pos %d head %d differs from the spec", isa_names[isa], hd, pos[i], h);
            }
        }
        /* by role (kern_attn_t.seq_prompt_len): a token below its sequence's prompt length (of >= 2)
         * in prompt order, any other in decode order, whether the call holds its whole sequence or
         * it alone (what a prompt split over steps or a recomputed sequence relies on) */
        const int32_t plen[3] = {1, 5, 2 * block_size}; /* a 1-token prompt; prompt / generated mixes */
        kern_attn_t ar = a;
        ar.out = o2, ar.seq_prompt_len = plen;
        kern_attention(be, &ar);
        float *alone = malloc((size_t)qdim * 4);
        for (int i = 0; i < n; i++) {
            const bool prompt = plen[seq[i]] >= 2 && pos[i] < plen[seq[i]];
            kern_attn_t one = ar;
            one.n_tokens = 1, one.q = q + (size_t)i * qdim, one.out = alone, one.tok_seq = seq + i,
            one.tok_pos = pos + i;
            kern_attention(be, &one);
            for (int h = 0; h < n_heads; h++) {
                spec_attention(&ar, i, h, prompt, ref);
                if (!bits_equal(o2 + (size_t)i * qdim + (size_t)h * hd, ref, hd, NULL) ||
                    !bits_equal(alone + (size_t)h * hd, ref, hd, NULL))
                    fail_msg("%s attn by role: pos %d of seq %d head %d differs from the %s spec (in the call, "
                             "or alone)", isa_names[isa], pos[i], seq[i], h, prompt ? "prompt" : "decode");
            }
        }
        free(alone);
        results[isa] = malloc((size_t)n * qdim * 4);
        memcpy(results[isa], out, (size_t)n * qdim * 4);
        kern_destroy(&be);
    }
    for (int isa = 1; isa < 3; isa++)
        if (results[isa]) assert_true(bits_equal(results[0], results[isa], (size_t)n * qdim, NULL));
    for (int isa = 0; isa < 3; isa++) free(results[isa]);
    free(kc), free(vc), free(q), free(out), free(o2);
}

static void test_attention_paged_gqa_matches_reference(void **state)
{
    run_attention_case(4, 4, 64, 16, 0, 0);  /* GQA ratio 1 */
    run_attention_case(9, 3, 64, 16, 0, 0);  /* ratio 3 (SmolLM-135M) */
    run_attention_case(9, 3, 64, 32, 0, 0);  /* ratio 3, decode lengths past 96 (V lanes with 2 cells) */
    run_attention_case(6, 6, 64, 32, 0, 0);  /* ratio 1, long */
    run_attention_case(8, 2, 128, 32, 0, 0); /* ratio 4 */
    run_attention_case(6, 2, 40, 8, 0, 0);   /* head_dim not a multiple of 16 */
    /* sliding windows (Mistral, Gemma's local layers): contexts up to 5 blocks, past the window */
    run_attention_case(8, 2, 128, 32, 20, 0);
    run_attention_case(9, 3, 64, 16, 7, 0);
    run_attention_case(6, 2, 40, 8, 5, 0);
    /* Gemma 2's soft-capping, alone and with a window */
    run_attention_case(4, 2, 64, 16, 0, 50.0f);
    run_attention_case(8, 4, 128, 16, 24, 30.0f);
}

/* Tree attention (speculative verification): a draft tree of 6 tokens after a 37-token context,
 * stored at positions 37..42; token k sees the context, its ancestors and itself.
 *   - every output matches the double reference over exactly the visible positions;
 *   - changing the K/V of a position a token does not see leaves its output's bits unchanged;
 *   - a chain-shaped tree gives the bits of causal attention. */
static void run_tree_case(int isa)
{
    enum { P = 37, K = 6, NH = 4, NKV = 2, HD = 64, BS = 16, MB = 4 };
    const uint64_t masks[K] = {0x1, 0x3, 0x5, 0xB, 0x15, 0x2B}; /* parents: -, 0, 0, 1, 2, 3 */
    const size_t pool = (size_t)MB * BS * NKV * HD;
    fl_f16_t *kc = malloc(pool * 2), *vc = malloc(pool * 2);
    for (size_t i = 0; i < pool; i++) kc[i] = fl_f32_to_f16(rnd_f(-2, 2)), vc[i] = fl_f32_to_f16(rnd_f(-2, 2));
    int32_t table[MB] = {2, 0, 3, 1}, seq[K] = {0}, pos[K], start[K];
    uint64_t mask[K];
    for (int k = 0; k < K; k++) start[k] = P, mask[k] = masks[k], pos[k] = P + __builtin_popcountll(masks[k]) - 1;
    float q[K * NH * HD], out[K * NH * HD], o2[K * NH * HD], ref[HD];
    fill(q, K * NH * HD, 3.0f);
    kern_attn_t a = {.out = out, .q = q, .k_cache = kc, .v_cache = vc, .n_tokens = K, .tok_seq = seq, .tok_pos = pos,
                     .block_tables = table, .max_blocks = MB, .block_size = BS, .n_heads = NH, .n_kv_heads = NKV,
                     .head_dim = HD, .scale = 0.125f, .tree_mask = mask, .tree_start = start};
    kern_backend_t *be = new_backend(isa_names[isa], 2, NULL);
    if ((int)isa_of(be) != isa) { /* this machine lacks the instruction set */
        kern_destroy(&be);
        free(kc), free(vc);
        return;
    }
    kern_attention(be, &a);
    for (int k = 0; k < K; k++)
        for (int h = 0; h < NH; h++) {
            ref_attention(&a, k, h, ref);
            for (int d = 0; d < HD; d++) {
                const float got = out[(k * NH + h) * HD + d];
                if (!(fabsf(got - ref[d]) <= 2e-3f * (1 + fabsf(ref[d]))))
                    fail_msg("tree attn tok %d head %d d %d: %g vs %g", k, h, d, got, ref[d]);
            }
        }
    /* scramble the K/V of tree position 4 (token 4, seen by token 4 alone) */
    for (int kvh = 0; kvh < NKV; kvh++)
        for (int d = 0; d < HD; d++) {
            const size_t slot = (size_t)table[(P + 4) / BS] * BS + (P + 4) % BS;
            kc[(slot * NKV + kvh) * HD + d] = fl_f32_to_f16(rnd_f(-8, 8));
            vc[(slot * NKV + kvh) * HD + d] = fl_f32_to_f16(rnd_f(-8, 8));
        }
    a.out = o2;
    kern_attention(be, &a);
    for (int k = 0; k < K; k++)
        if ((masks[k] >> 4) & 1u) assert_false(bits_equal(out + k * NH * HD, o2 + k * NH * HD, NH * HD, NULL));
        else assert_true(bits_equal(out + k * NH * HD, o2 + k * NH * HD, NH * HD, NULL));
    /* each path equals plain attention, bit for bit: with the ancestors' K/V moved to positions
     * P.., as the verifier keeps an accepted path, a lone decode token at position P + depth sums
     * what the tree node summed (decode order for both, as in serving: prompt length P) */
    const int32_t plen = P;
    a.seq_prompt_len = &plen;
    a.out = out;
    kern_attention(be, &a);
    fl_f16_t *kp = malloc(pool * 2), *vp = malloc(pool * 2);
    for (int k = 0; k < K; k++) {
        memcpy(kp, kc, pool * 2), memcpy(vp, vc, pool * 2);
        int depth = 0;
        for (int t = 0; t < K; t++) {
            if (!((masks[k] >> t) & 1u)) continue;
            const size_t from = (size_t)table[(P + t) / BS] * BS + (P + t) % BS;
            const size_t to = (size_t)table[(P + depth) / BS] * BS + (P + depth) % BS;
            memcpy(kp + to * NKV * HD, kc + from * NKV * HD, NKV * HD * 2);
            memcpy(vp + to * NKV * HD, vc + from * NKV * HD, NKV * HD * 2);
            depth++;
        }
        const int32_t one_pos = P + depth - 1, one_seq = 0;
        kern_attn_t plain = {.out = o2, .q = q + k * NH * HD, .k_cache = kp, .v_cache = vp, .n_tokens = 1,
                             .tok_seq = &one_seq, .tok_pos = &one_pos, .block_tables = table, .max_blocks = MB,
                             .block_size = BS, .n_heads = NH, .n_kv_heads = NKV, .head_dim = HD, .scale = 0.125f,
                             .seq_prompt_len = &plen};
        kern_attention(be, &plain);
        if (!bits_equal(out + k * NH * HD, o2, NH * HD, NULL)) fail_msg("tree node %d differs from its path", k);
    }
    free(kp), free(vp);
    a.seq_prompt_len = NULL;
    a.out = o2;
    /* a chain: token k sees tree positions 0..k, as causal attention at position P + k */
    for (int k = 0; k < K; k++) mask[k] = (2ull << k) - 1, pos[k] = P + k;
    kern_attention(be, &a);
    kern_attn_t causal = a;
    causal.tree_mask = NULL, causal.tree_start = NULL, causal.out = out;
    kern_attention(be, &causal);
    assert_true(bits_equal(out, o2, K * NH * HD, NULL));
    kern_destroy(&be);
    free(kc), free(vc);
}

static void test_attention_tree_mask(void **state)
{
    (void)state;
    for (int isa = 0; isa < 3; isa++) run_tree_case(isa);
}

static void test_attention_long_context_uses_pool(void **state)
{
    /* 600 positions x 9 heads is above the single-thread threshold: the call goes to the pool's
     * threads, and gives the same bits on 1 and 2 threads */
    const int hd = 64, nh = 9, nkv = 3, bs = 16, len = 600, mb = 40;
    int32_t table[40];
    for (int b = 0; b < mb; b++) table[b] = mb - 1 - b;
    const size_t pool = (size_t)mb * bs * nkv * hd;
    fl_f16_t *kc = malloc(pool * 2), *vc = malloc(pool * 2);
    for (size_t i = 0; i < pool; i++) kc[i] = fl_f32_to_f16(rnd_f(-1, 1)), vc[i] = fl_f32_to_f16(rnd_f(-1, 1));
    int32_t seq[4] = {0, 0, 0, 0}, pos[4] = {len - 4, len - 3, len - 2, len - 1};
    float *q = malloc(4 * nh * hd * 4), *o1 = malloc(4 * nh * hd * 4), *o2 = malloc(4 * nh * hd * 4);
    fill(q, 4 * nh * hd, 2.0f);
    kern_attn_t a = {.out = o1, .q = q, .k_cache = kc, .v_cache = vc, .n_tokens = 4, .tok_seq = seq, .tok_pos = pos,
                     .block_tables = table, .max_blocks = mb, .block_size = bs, .n_heads = nh, .n_kv_heads = nkv,
                     .head_dim = hd, .scale = 0.125f};
    kern_backend_t *b1 = new_backend(NULL, 1, NULL), *b2 = new_backend(NULL, 2, NULL);
    kern_attention(b1, &a);
    a.out = o2;
    const cpu_pool_t *threads = ((cpu_backend_t *)b2)->pool;
    const uint64_t before = cpu_pool_dispatches(threads);
    kern_attention(b2, &a);
    assert_int_equal(cpu_pool_dispatches(threads), before + 1);
    assert_true(bits_equal(o1, o2, 4 * nh * hd, NULL));
    kern_destroy(&b1), kern_destroy(&b2);
    free(kc), free(vc), free(q), free(o1), free(o2);
}

/* A run of tokens of one sequence at consecutive positions (a verify step's chain, a prompt chunk)
 * shares each K/V row load in the grouped path (AVX-512): every token of the run must get the bits it gets
 * alone in a call, and the spec's, whatever the run's length, start (across the V sums' 32- and
 * 64-position boundaries, where decode tokens' double leftovers begin) and role, for every query
 * group size (runs of up to 16 query rows: 4 tokens of 3 query heads, 2 of 8). */
static void run_attention_runs_case(int n_heads, int n_kv_heads, int hd)
{
    enum { BS = 16, MB = 24, LEN = MB * BS };
    int32_t table[MB];
    for (int b = 0; b < MB; b++) table[b] = (b * 7 + 3) % MB;
    const int kv_dim = n_kv_heads * hd, qdim = n_heads * hd;
    const size_t pool = (size_t)MB * BS * kv_dim;
    fl_f16_t *kc = malloc(pool * 2), *vc = malloc(pool * 2);
    for (size_t i = 0; i < pool; i++) kc[i] = fl_f32_to_f16(rnd_f(-2, 2)), vc[i] = fl_f32_to_f16(rnd_f(-2, 2));
    float *q = malloc((size_t)12 * qdim * 4), *out = malloc((size_t)12 * qdim * 4), *alone = malloc((size_t)qdim * 4);
    float ref[512];
    fill(q, (size_t)12 * qdim, 3.0f);
    const int starts[] = {0, 58, 95, 250, LEN - 12};
    /* runs exist on the AVX-512 grouped path only; the other ISAs' batches are run_attention_case's */
    const int isa = CPU_ISA_AVX512;
    kern_backend_t *be = new_backend(isa_names[isa], 2, NULL);
    if ((int)isa_of(be) != isa) {
        fprintf(stderr, "attention runs: no AVX-512 here, not checked\n");
        kern_destroy(&be);
        free(kc), free(vc), free(q), free(out), free(alone);
        return;
    }
    for (size_t si = 0; si < sizeof starts / sizeof *starts; si++)
        for (int n = 1; n <= 12; n += n < 4 ? 1 : 8) {
            /* prompt length: the run all prompt, all generated, or split by role in the middle */
            const int32_t plens[3] = {LEN, starts[si], starts[si] + n / 2};
            for (int pl = 0; pl < 3; pl++) {
                int32_t seq[12] = {0}, pos[12];
                for (int t = 0; t < n; t++) pos[t] = starts[si] + t;
                kern_attn_t a = {.out = out, .q = q, .k_cache = kc, .v_cache = vc, .n_tokens = n, .tok_seq = seq,
                                 .tok_pos = pos, .block_tables = table, .max_blocks = MB, .block_size = BS,
                                 .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = hd,
                                 .scale = 1.0f / sqrtf((float)hd), .seq_prompt_len = &plens[pl]};
                kern_attention(be, &a);
                for (int t = 0; t < n; t++) {
                    kern_attn_t one = a;
                    one.n_tokens = 1, one.q = q + (size_t)t * qdim, one.out = alone, one.tok_pos = pos + t;
                    kern_attention(be, &one);
                    const bool prompt = plens[pl] >= 2 && pos[t] < plens[pl];
                    for (int h = 0; h < n_heads; h++) {
                        spec_attention(&a, t, h, prompt, ref);
                        if (!bits_equal(out + (size_t)t * qdim + (size_t)h * hd, alone + (size_t)h * hd, hd, NULL) ||
                            !bits_equal(alone + (size_t)h * hd, ref, hd, NULL))
                            fail_msg("%s attn run nh=%d nkv=%d hd=%d: %d tokens from %d (prompt length %d), token "
                                     "%d head %d: in the run, alone and the spec differ",
                                     isa_names[isa], n_heads, n_kv_heads, hd, n, starts[si], plens[pl], t, h);
                    }
                }
            }
        }
    kern_destroy(&be);
    free(kc), free(vc), free(q), free(out), free(alone);
}

static void test_attention_runs_equal_tokens_alone(void **state)
{
    (void)state;
    run_attention_runs_case(9, 3, 64);   /* SmolLM-135M: runs of 4 tokens, compiled for the shape */
    run_attention_runs_case(8, 2, 128);  /* 4 heads, head_dim 128: the general code */
    run_attention_runs_case(16, 2, 64);  /* 8 heads: runs of 2 */
}

/* ---- sampling ---- */

static void test_sample_greedy_lowest_id_on_ties(void **state)
{
    kern_backend_t *be = new_backend(NULL, 1, NULL);
    float l[2][100];
    fill(l[0], 100, 1.0f), fill(l[1], 100, 1.0f);
    l[0][17] = l[0][42] = l[0][80] = 5.0f;
    l[1][99] = 7.0f;
    kern_sampling_t p[2] = {{.temperature = 0}, {.temperature = -1}};
    int32_t out[2];
    kern_sample(be, out, &l[0][0], 2, 100, p);
    assert_int_equal(out[0], 17);
    assert_int_equal(out[1], 99);
    kern_destroy(&be);
}

static void test_sample_is_pure_function_of_seed_and_position(void **state)
{
    kern_backend_t *be = new_backend(NULL, 2, NULL);
    const int vocab = 49152;
    float *l = malloc(vocab * 4 * 3);
    fill(l, (size_t)vocab * 3, 4.0f);
    kern_sampling_t p[3] = {{.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 7, .position = 3},
                            {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 7, .position = 3},
                            {.temperature = 1.2f, .top_k = 0, .top_p = 0.5f, .seed = 9, .position = 11}};
    int32_t a[3], b[3], c1[1];
    kern_sample(be, a, l, 3, vocab, p);
    kern_sample(be, b, l, 3, vocab, p);
    assert_memory_equal(a, b, sizeof a);
    for (int i = 0; i < 3; i++) { /* alone == in a batch */
        kern_sample(be, c1, l + (size_t)i * vocab, 1, vocab, &p[i]);
        assert_int_equal(c1[0], a[i]);
    }
    /* top_k = 1 is greedy */
    kern_sampling_t g = {.temperature = 1.0f, .top_k = 1, .top_p = 1.0f, .seed = 1, .position = 1};
    kern_sample(be, c1, l, 1, vocab, &g);
    int32_t gr;
    kern_sampling_t g0 = {.temperature = 0};
    kern_sample(be, &gr, l, 1, vocab, &g0);
    assert_int_equal(c1[0], gr);
    /* top_k = 5: draws stay within the 5 best, and positions give different draws */
    int best[5], counts[5] = {0};
    float tmp[49152];
    memcpy(tmp, l, sizeof tmp);
    for (int k = 0; k < 5; k++) {
        int bi = 0;
        for (int i = 1; i < vocab; i++)
            if (tmp[i] > tmp[bi]) bi = i;
        best[k] = bi;
        tmp[bi] = -INFINITY;
    }
    for (uint64_t pos = 0; pos < 400; pos++) {
        kern_sampling_t s = {.temperature = 5.0f, .top_k = 5, .top_p = 1.0f, .seed = 42, .position = pos};
        kern_sample(be, c1, l, 1, vocab, &s);
        int k = 0;
        while (k < 5 && best[k] != c1[0]) k++;
        assert_true(k < 5);
        counts[k]++;
    }
    for (int k = 0; k < 5; k++) assert_true(counts[k] > 20); /* near-uniform at temperature 5 */
    /* top_p tiny keeps only the argmax */
    kern_sampling_t tp = {.temperature = 1.0f, .top_k = 0, .top_p = 1e-6f, .seed = 3, .position = 8};
    kern_sample(be, c1, l, 1, vocab, &tp);
    assert_int_equal(c1[0], gr);
    /* a temperature so small that 1 / temperature overflows (the wire accepts subnormals) is greedy,
     * with top-k and top-p too */
    kern_sampling_t tiny = {.temperature = 1e-40f, .top_k = 2, .top_p = 0.9f, .seed = 3, .position = 8};
    kern_sample(be, c1, l, 1, vocab, &tiny);
    assert_int_equal(c1[0], gr);
    /* a very small but finite one puts all the weight on the argmax */
    tiny.temperature = 1e-30f;
    kern_sample(be, c1, l, 1, vocab, &tiny);
    assert_int_equal(c1[0], gr);
    free(l);
    kern_destroy(&be);
}

static void test_uniform_is_counter_based(void **state)
{
    assert_true(kern_sample_uniform(1, 2) == kern_sample_uniform(1, 2));
    assert_true(kern_sample_uniform(1, 2) != kern_sample_uniform(1, 3));
    assert_true(kern_sample_uniform(1, 2) != kern_sample_uniform(2, 2));
    double mean = 0;
    for (uint64_t i = 0; i < 10000; i++) {
        const double u = kern_sample_uniform(5, i);
        assert_true(u >= 0 && u < 1);
        mean += u;
    }
    assert_true(fabs(mean / 10000 - 0.5) < 0.02);
}

static void test_alloc_is_zeroed_and_aligned(void **state)
{
    kern_backend_t *be = new_backend(NULL, 0, NULL);
    assert_true(cpu_pool_size(((cpu_backend_t *)be)->pool) >= 1);
    for (size_t sz = 1; sz < 100000; sz *= 7) {
        unsigned char *p = kern_alloc(be, sz);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 64, 0);
        for (size_t i = 0; i < sz; i++) assert_int_equal(p[i], 0);
        assert_int_equal(kern_upload(be, p, "abc", 1 < sz ? 1 : sz), 0);
        kern_free(be, p);
    }
    assert_int_equal(kern_sync(be, NULL), 0);
    kern_destroy(&be);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_matches_spec_every_type_and_isa),
        cmocka_unit_test(test_matmul_batched_equals_row_by_row_bitexact),
        cmocka_unit_test(test_matmul_rows_same_bits_for_batches_1_to_17),
        cmocka_unit_test(test_matmul_rows_equal_full_matmul_rows),
        cmocka_unit_test(test_matmul_repack_off_same_bits),
        cmocka_unit_test(test_matmul_multi_equals_single_calls),
        cmocka_unit_test(test_matmul_prompt_rows_every_path),
        cmocka_unit_test(test_matmul_blas_path_within_bound),
        cmocka_unit_test(test_weight_new_rejects_bad_types_and_shapes),
        cmocka_unit_test(test_cuda_stub_says_unsupported),
        cmocka_unit_test(test_embed_dequantizes_rows_of_every_type),
        cmocka_unit_test(test_rmsnorm_swiglu_add_match_reference),
        cmocka_unit_test(test_family_ops_equal_ggml_on_every_isa),
        cmocka_unit_test(test_geglu_every_f16_rounding_on_every_isa),
        cmocka_unit_test(test_tanhf_lanes_equal_the_algorithm_and_libm),
        cmocka_unit_test(test_rope_rotates_adjacent_and_neox_pairs_like_ggml),
        cmocka_unit_test(test_kv_store_writes_f16_rows_at_slots),
        cmocka_unit_test(test_attention_paged_gqa_matches_reference),
        cmocka_unit_test(test_attention_tree_mask),
        cmocka_unit_test(test_attention_long_context_uses_pool),
        cmocka_unit_test(test_attention_runs_equal_tokens_alone),
        cmocka_unit_test(test_sample_greedy_lowest_id_on_ties),
        cmocka_unit_test(test_sample_is_pure_function_of_seed_and_position),
        cmocka_unit_test(test_uniform_is_counter_based),
        cmocka_unit_test(test_alloc_is_zeroed_and_aligned),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
