/* cpu_matmul.c - y[n][rows] = x[n][cols] * W^T on the CPU, for F32/F16/BF16/Q4_0/Q4_1/Q8_0 weights.
 *
 * Quantized weights reproduce llama.cpp's x86 CPU numerics bit for bit (ggml-cpu/arch/x86/quants.c,
 * as llama-cpp-python 0.3.16 builds it with -march=native on an AVX-512 VNNI machine; checked against
 * its binary). The activations are first converted per row to the weight's "vec-dot type" (Q4_0,
 * Q8_0 -> Q8_0; Q4_1 -> Q8_1) the way ggml's AVX2 quantize_row_q8_0/q8_1 do it: per 32-block d =
 * amax / 127, q = round-to-nearest-even(x * (127 / amax)), d stored as f16 (Q8_1 also s = f16(d *
 * sum q)). Then, per output, ggml_vec_dot_*'s order: 8 float lanes, lane k of a block = the exact
 * integer dot of block elements 4k..4k+3 (for Q4, element j < 16 is the low nibble of byte j, j >= 16
 * the high nibble of byte j - 16), accumulated as acc[k] = fma(d_w * d_x, (float)lane, acc[k]) block
 * after block; the result is hsum_float_8(acc) = ((acc[4]+acc[0]) + (acc[6]+acc[2])) + ((acc[5]+
 * acc[1]) + (acc[7]+acc[3])), plus for Q4_1 summs = fma(m_w, s_x, summs) (in block order, as GCC
 * contracts ggml's summs += m * s). ggml uses this order for every n of these types (llamafile's
 * tinyBLAS has no Q4_1 path, and llama.cpp's Q8_0 output matmul has one row per sequence).
 * Float weights use the 16-lane canonical dot (cpu_simd.h) = llamafile tinyBLAS's order.
 *
 * The result of an output element depends only on its weight row and its activation row: not on n,
 * on the tile that computed it, on the thread, or on the ISA (scalar, AVX2, AVX-512 VNNI tiles and
 * the AVX-512 packed kernel of cpu_packed.c are bit-identical). The one exception is the BLAS path
 * below, which is only taken for n >= blas_min_n (never below 65), and is not bit-identical.
 *
 * Paths: AVX-512 VNNI with repacked weights (the default there, cpu_packed.c); otherwise the rows
 * are cut into chunks of MM_CHUNK rows and the tokens into blocks of MM_TBLOCK; the (chunk, token
 * block) items are handed out by an atomic counter to the pool threads. Inside an item, weight rows
 * are loaded once per group of 4 rows and dotted against 4 tokens at a time (tile4, 16 outputs per
 * weight load), leftovers with 2 tokens or 8 rows x 1 token (tile8). The activation quantization of
 * a batch is split over the pool threads.
 *
 * BLAS path (large n, prefill): each item is a panel of MM_PANEL rows, dequantized to f32 in the
 * thread's panel buffer (sized by weight_new from the widest weight), then one single-threaded
 * cblas_sgemm against the f32 activations (OpenBLAS is set to 1 thread at backend creation; our pool
 * supplies the parallelism). Whether it pays off is measured: see cpu_matmul_default_blas_min_n. */
#include <cblas.h>
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/quant.h"
#include "cpu_internal.h"
#include "cpu_simd.h"

/* Every fused multiply-add below is written out (fmaf, _mm256_fmadd_ps): no contraction of a*b+c. */
#pragma GCC optimize("fp-contract=off")

#define MM_CHUNK 32   /* rows per work item (multiple of 8) */
#define MM_TBLOCK 64  /* tokens per work item */
#define MM_PANEL 64   /* rows per BLAS panel */
#define MM_SPLIT_MAX 8 /* most weights of a matmul_multi whose rows are split by role (matmul_split) */

typedef struct mm_ctx {
    int type;   /* weight type */
    int nb;     /* blocks per row (quantized) */
    int cols;
    int64_t rows;
    int n;
    const uint8_t *w;
    size_t row_bytes;
    /* activations in the vec-dot type */
    const int8_t *qs;     /* [n][cols] */
    const float *d;       /* [n][nb] f16-rounded scale */
    const float *s;       /* [n][nb] f16-rounded d * sum q (Q8_1) */
    const float *xf;      /* [n][cols] rounded activations (float weights) */
    const float *x;       /* raw activations (BLAS path) */
    float *y;
    cpu_isa_t isa;
    bool prompt;          /* the prompt order (qdot_prompt_scalar) */
    atomic_int next;
    int n_chunks, n_tblocks;
    float **panel;
} mm_ctx_t;

/* ------------------------------------------------------------------------------------------------
 * Activation conversion */

static inline int vec_dot_type(int type)
{
    switch (type) {
    case FL_TYPE_Q4_0: case FL_TYPE_Q8_0: return FL_TYPE_Q8_0;
    case FL_TYPE_Q4_1: return FL_TYPE_Q8_1;
    default: return type;
    }
}

static inline float f16_round(float f) { return fl_f16_to_f32(fl_f32_to_f16(f)); }

/* s (the Q8_1 sum term) is only written when s is not NULL. */
static void quantize_act_scalar(const float *x, int cols, int8_t *qs, float *d, float *s)
{
    for (int b = 0; b < cols / 32; b++, x += 32, qs += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float dd = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int q = (int)nearbyintf(x[j] * id);
            qs[j] = (int8_t)q;
            sum += q;
        }
        d[b] = f16_round(dd);
        if (s) s[b] = f16_round(dd * (float)sum);
    }
}

static CPU_AVX2 void quantize_act_avx2(const float *x, int cols, int8_t *qs, float *d, float *s)
{
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < cols / 32; b++, x += 32, qs += 32) {
        __m256 v[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(x + 8 * k);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v[0]), _mm256_andnot_ps(signbit, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v[2]), _mm256_andnot_ps(signbit, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float dd = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_cvtps_epi32(
                _mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)qs, _mm256_permutevar8x32_epi32(p, perm));
        d[b] = _cvtsh_ss(_cvtss_sh(dd, 0));
        if (s) {
            const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            s[b] = _cvtsh_ss(_cvtss_sh(dd * (float)cpu_hsum_epi32_avx2(sum8), 0));
        }
    }
}

typedef struct quant_job {
    const float *x;
    int cols, nb, mult;
    int8_t *qs;
    float *d, *s;
    int32_t *xinit;
    cpu_isa_t isa;
} quant_job_t;

static void quant_range(void *ctx, int64_t t0, int64_t t1)
{
    const quant_job_t *j = ctx;
    const size_t cols = (size_t)j->cols;
    for (int64_t t = t0; t < t1; t++) {
        const size_t o = (size_t)t * j->nb;
        if (j->isa == CPU_ISA_SCALAR)
            quantize_act_scalar(j->x + t * cols, j->cols, j->qs + t * cols, j->d + o, j->s ? j->s + o : NULL);
        else
            quantize_act_avx2(j->x + t * cols, j->cols, j->qs + t * cols, j->d + o, j->s ? j->s + o : NULL);
        if (j->xinit) cpu_pack_act_init(j->qs + t * cols, j->nb, j->mult, j->xinit + o * 8);
    }
}

static void round_act(int type, const float *x, float *xf, int64_t cnt)
{
    if (type == FL_TYPE_F16)
        for (int64_t i = 0; i < cnt; i++) xf[i] = f16_round(x[i]);
    else if (type == FL_TYPE_BF16)
        for (int64_t i = 0; i < cnt; i++) xf[i] = fl_bf16_to_f32(fl_f32_to_bf16(x[i]));
    else
        memcpy(xf, x, (size_t)cnt * sizeof(float));
}

static CPU_AVX2 void round_act_f16_avx2(const float *x, float *xf, int64_t cnt)
{
    int64_t i = 0;
    for (; i + 8 <= cnt; i += 8)
        _mm256_storeu_ps(xf + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < cnt; i++) xf[i] = f16_round(x[i]);
}

/* ------------------------------------------------------------------------------------------------
 * Scalar reference path: one (row, token) pair at a time, in the canonical order. */

/* Weight block b of a row as 32 integers (Q4_0 already recentred by - 8) and its d, m (m: Q4_1 only). */
static void block_scalar(int type, const uint8_t *row, int b, int wq[32], float *dw, float *mw)
{
    fl_f16_t h;
    *mw = 0.0f;
    if (type == FL_TYPE_Q8_0) {
        const fl_block_q8_0_t *blk = (const fl_block_q8_0_t *)row + b;
        memcpy(&h, &blk->d, 2);
        *dw = fl_f16_to_f32(h);
        for (int j = 0; j < 32; j++) wq[j] = blk->qs[j];
    } else if (type == FL_TYPE_Q4_0) {
        const fl_block_q4_0_t *blk = (const fl_block_q4_0_t *)row + b;
        memcpy(&h, &blk->d, 2);
        *dw = fl_f16_to_f32(h);
        for (int j = 0; j < 16; j++) wq[j] = (blk->qs[j] & 15) - 8, wq[j + 16] = (blk->qs[j] >> 4) - 8;
    } else {
        const fl_block_q4_1_t *blk = (const fl_block_q4_1_t *)row + b;
        memcpy(&h, &blk->d, 2);
        *dw = fl_f16_to_f32(h);
        memcpy(&h, &blk->m, 2);
        *mw = fl_f16_to_f32(h);
        for (int j = 0; j < 16; j++) wq[j] = blk->qs[j] & 15, wq[j + 16] = blk->qs[j] >> 4;
    }
}

static float qdot_scalar(const mm_ctx_t *c, int64_t r, int t)
{
    const uint8_t *row = c->w + (size_t)r * c->row_bytes;
    const int8_t *xq = c->qs + (size_t)t * c->cols;
    float acc[8] = {0}, summs = 0.0f;
    for (int b = 0; b < c->nb; b++) {
        const size_t ix = (size_t)t * c->nb + b;
        const int8_t *xb = xq + 32 * b;
        int wq[32];
        float dw, mw;
        block_scalar(c->type, row, b, wq, &dw, &mw);
        const float dd = dw * c->d[ix];
        for (int k = 0; k < 8; k++) {
            const int lane = wq[4 * k] * xb[4 * k] + wq[4 * k + 1] * xb[4 * k + 1] + wq[4 * k + 2] * xb[4 * k + 2] +
                             wq[4 * k + 3] * xb[4 * k + 3];
            acc[k] = fmaf(dd, (float)lane, acc[k]);
        }
        if (c->type == FL_TYPE_Q4_1) summs = fmaf(mw, c->s[ix], summs);
    }
    /* hsum_float_8 */
    const float h0 = acc[4] + acc[0], h1 = acc[5] + acc[1], h2 = acc[6] + acc[2], h3 = acc[7] + acc[3];
    const float sum = (h0 + h2) + (h1 + h3);
    return c->type == FL_TYPE_Q4_1 ? sum + summs : sum;
}

/* The prompt order, for rows kern_set_prompt_rows marks when FOLIO_CPU_PROMPT=block (README, design):
 * per block one exact integer sum S of the 32 products, acc = fma(d_w * d_x, (float)S, acc), and for
 * Q4_1 sm = fma(m_w, s_x, sm) in block order; the result acc + sm (Q4_1) or acc. One float step per
 * block instead of ggml's eight lanes: what lets AMX (cpu_packed.c) take the integer part, at the
 * price of leaving llama.cpp's last bits for prompt tokens. Every path computes exactly this. */
static float qdot_prompt_scalar(const mm_ctx_t *c, int64_t r, int t)
{
    const uint8_t *row = c->w + (size_t)r * c->row_bytes;
    const int8_t *xq = c->qs + (size_t)t * c->cols;
    float acc = 0.0f, sm = 0.0f;
    for (int b = 0; b < c->nb; b++) {
        const size_t ix = (size_t)t * c->nb + b;
        const int8_t *xb = xq + 32 * b;
        int wq[32], sum = 0;
        float dw, mw;
        block_scalar(c->type, row, b, wq, &dw, &mw);
        for (int j = 0; j < 32; j++) sum += wq[j] * xb[j];
        acc = fmaf(dw * c->d[ix], (float)sum, acc);
        if (c->type == FL_TYPE_Q4_1) sm = fmaf(mw, c->s[ix], sm);
    }
    return c->type == FL_TYPE_Q4_1 ? acc + sm : acc;
}

float cpu_dot16_scalar(const float *a, const float *b, int n)
{
    float l[16] = {0};
    for (int i = 0; i < n; i++) l[i % 16] = fmaf(a[i], b[i], l[i % 16]);
    for (int j = 0; j < 8; j++) l[j] += l[j + 8];
    for (int j = 0; j < 4; j++) l[j] += l[j + 4];
    for (int j = 0; j < 2; j++) l[j] += l[j + 2];
    return l[0] + l[1];
}

static float fdot_scalar(const mm_ctx_t *c, int64_t r, int t)
{
    const float *x = c->xf + (size_t)t * c->cols;
    const uint8_t *row = c->w + (size_t)r * c->row_bytes;
    float l[16] = {0};
    for (int i = 0; i < c->cols; i++) {
        float w;
        if (c->type == FL_TYPE_F32) memcpy(&w, row + 4 * (size_t)i, 4);
        else {
            uint16_t h;
            memcpy(&h, row + 2 * (size_t)i, 2);
            w = c->type == FL_TYPE_F16 ? fl_f16_to_f32(h) : fl_bf16_to_f32(h);
        }
        l[i % 16] = fmaf(x[i], w, l[i % 16]);
    }
    for (int j = 0; j < 8; j++) l[j] += l[j + 8];
    for (int j = 0; j < 4; j++) l[j] += l[j + 4];
    for (int j = 0; j < 2; j++) l[j] += l[j + 2];
    return l[0] + l[1];
}

/* ------------------------------------------------------------------------------------------------
 * SIMD tiles */

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define QT_VNNI 0
#define QT(name) name##_avx2
#include "cpu_qtile.h"
#undef QT
#undef QT_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define QT_VNNI 1
#define QT(name) name##_avx512
#include "cpu_qtile.h"
#undef QT
#undef QT_VNNI
#pragma GCC pop_options

/* The prompt order on AVX2 (and AVX-512 without repacked weights): the block's 8 integer lanes of
 * ggml's dot (exact) added up, then qdot_prompt_scalar's float steps. */
static CPU_AVX2 float qdot_prompt_avx2(const mm_ctx_t *c, int64_t r, int t)
{
    const size_t bb = c->type == FL_TYPE_Q8_0 ? 34 : c->type == FL_TYPE_Q4_0 ? 18 : 20;
    const uint8_t *row = c->w + (size_t)r * c->row_bytes;
    const int8_t *xq = c->qs + (size_t)t * c->cols;
    float acc = 0.0f, sm = 0.0f;
    for (int b = 0; b < c->nb; b++) {
        const size_t ix = (size_t)t * c->nb + b;
        const uint8_t *blk = row + (size_t)b * bb;
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        const __m256i v = dot_avx2(wprep_avx2(wload_avx2(blk, c->type), c->type), x, c->type);
        acc = fmaf(h2f_avx2(blk) * c->d[ix], (float)cpu_hsum_epi32_avx2(v), acc);
        if (c->type == FL_TYPE_Q4_1) sm = fmaf(h2f_avx2(blk + 2), c->s[ix], sm);
    }
    return c->type == FL_TYPE_Q4_1 ? acc + sm : acc;
}

/* Float weights: 4 rows x 1 token, canonical 16-lane dots, weights converted on the fly. */
static CPU_AVX2 __m256 fload_avx2(const uint8_t *row, int type, int i)
{
    if (type == FL_TYPE_F32) return _mm256_loadu_ps((const float *)row + i);
    if (type == FL_TYPE_F16) return cpu_load_f16x8((const fl_f16_t *)row + i);
    return cpu_load_bf16x8((const fl_bf16_t *)row + i);
}

static CPU_AVX2 void ftile4_avx2(const mm_ctx_t *c, const uint8_t *const wr[4], int t, float out[4])
{
    const int cols = c->cols, type = c->type;
    const float *x = c->xf + (size_t)t * cols;
    __m256 lo[4], hi[4];
    for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= cols; i += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        for (int r = 0; r < 4; r++) {
            lo[r] = _mm256_fmadd_ps(x0, fload_avx2(wr[r], type, i), lo[r]);
            hi[r] = _mm256_fmadd_ps(x1, fload_avx2(wr[r], type, i + 8), hi[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        if (i == cols) {
            out[r] = cpu_reduce16_avx2(lo[r], hi[r]);
        } else {
            float wt[16];
            for (int k = i; k < cols; k++) {
                if (type == FL_TYPE_F32) memcpy(&wt[k - i], wr[r] + 4 * (size_t)k, 4);
                else {
                    uint16_t h;
                    memcpy(&h, wr[r] + 2 * (size_t)k, 2);
                    wt[k - i] = type == FL_TYPE_F16 ? fl_f16_to_f32(h) : fl_bf16_to_f32(h);
                }
            }
            out[r] = cpu_finish16_avx2(lo[r], hi[r], x, wt, i, cols);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Work items */

static void mm_item_tiled(mm_ctx_t *c, int64_t r0, int64_t r1, int t0, int t1)
{
    const bool quant = c->type == FL_TYPE_Q4_0 || c->type == FL_TYPE_Q4_1 || c->type == FL_TYPE_Q8_0;
    const int64_t rows = c->rows;
    float *y = c->y;
    if (c->prompt) {
        for (int t = t0; t < t1; t++)
            for (int64_t r = r0; r < r1; r++)
                y[(size_t)t * rows + r] = c->isa == CPU_ISA_SCALAR ? qdot_prompt_scalar(c, r, t) : qdot_prompt_avx2(c, r, t);
        return;
    }
    if (c->isa == CPU_ISA_SCALAR) {
        for (int t = t0; t < t1; t++)
            for (int64_t r = r0; r < r1; r++)
                y[(size_t)t * rows + r] = quant ? qdot_scalar(c, r, t) : fdot_scalar(c, r, t);
        return;
    }
    if (!quant) {
        for (int t = t0; t < t1; t++)
            for (int64_t r = r0; r < r1; r += 4) {
                const uint8_t *wr[4];
                for (int k = 0; k < 4; k++) wr[k] = c->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * c->row_bytes;
                float out[4];
                ftile4_avx2(c, wr, t, out);
                for (int k = 0; k < 4 && r + k < r1; k++) y[(size_t)t * rows + r + k] = out[k];
            }
        return;
    }
    const bool vnni = c->isa == CPU_ISA_AVX512;
    int t = t0;
    while (t1 - t >= 2) {
        const int TP = t1 - t >= 4 ? 2 : 1, nt = 2 * TP;
        const int tok[4] = {t, t + 1, t + (nt > 2 ? 2 : 1), t + (nt > 2 ? 3 : 1)};
        for (int64_t r = r0; r < r1; r += 4) {
            const uint8_t *wr[4];
            for (int k = 0; k < 4; k++) wr[k] = c->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * c->row_bytes;
            float out[4][4];
            if (vnni) tile4_dispatch_avx512(c, TP, wr, tok, out);
            else tile4_dispatch_avx2(c, TP, wr, tok, out);
            for (int j = 0; j < nt; j++)
                for (int k = 0; k < 4 && r + k < r1; k++) y[(size_t)tok[j] * rows + r + k] = out[j][k];
        }
        t += nt;
    }
    if (t < t1) {
        for (int64_t r = r0; r < r1; r += 8) {
            const uint8_t *wr[8];
            for (int k = 0; k < 8; k++) wr[k] = c->w + (size_t)(r + k < r1 ? r + k : r1 - 1) * c->row_bytes;
            float out[8];
            if (vnni) tile8_dispatch_avx512(c, wr, t, out);
            else tile8_dispatch_avx2(c, wr, t, out);
            for (int k = 0; k < 8 && r + k < r1; k++) y[(size_t)t * rows + r + k] = out[k];
        }
    }
}

static void mm_task_tiled(void *arg, int ith, int nth)
{
    mm_ctx_t *c = arg;
    const int n_items = c->n_chunks * c->n_tblocks;
    for (;;) {
        const int it = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        const int chunk = it % c->n_chunks, tb = it / c->n_chunks;
        const int64_t r0 = (int64_t)chunk * MM_CHUNK, r1 = r0 + MM_CHUNK < c->rows ? r0 + MM_CHUNK : c->rows;
        const int t0 = tb * MM_TBLOCK, t1 = t0 + MM_TBLOCK < c->n ? t0 + MM_TBLOCK : c->n;
        mm_item_tiled(c, r0, r1, t0, t1);
    }
}

static void mm_task_blas(void *arg, int ith, int nth)
{
    mm_ctx_t *c = arg;
    const int n_items = (int)((c->rows + MM_PANEL - 1) / MM_PANEL);
    float *panel = c->panel[ith];
    for (;;) {
        const int it = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        const int64_t r0 = (int64_t)it * MM_PANEL, nr = r0 + MM_PANEL < c->rows ? MM_PANEL : c->rows - r0;
        for (int64_t r = 0; r < nr; r++)
            quant_dequantize_row(c->type, c->w + (size_t)(r0 + r) * c->row_bytes, panel + (size_t)r * c->cols,
                                 c->cols);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->n, (int)nr, c->cols, 1.0f, c->x, c->cols, panel,
                    c->cols, 0.0f, c->y + r0, (int)c->rows);
    }
}

/* ------------------------------------------------------------------------------------------------ */

int cpu_grow(void **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap) return 0;
    size_t want = bytes + bytes / 4;
    want = (want + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, want);
    if (!p) return FL_ENOMEM;
    memset(p, 0, want);
    free(*buf);
    *buf = p;
    *cap = want;
    return 0;
}

int cpu_matmul_reserve(cpu_backend_t *cb, int64_t cols)
{
    if (cols <= cb->max_cols) return 0;
    const int nth = cpu_pool_size(cb->pool);
    const size_t need = (size_t)MM_PANEL * (size_t)cols;
    for (int i = 0; i < nth; i++) {
        size_t cap = cb->panel_floats * sizeof(float);
        if (cpu_grow((void **)&cb->panel[i], &cap, need * sizeof(float))) return FL_ENOMEM;
    }
    cb->panel_floats = need;
    cb->max_cols = cols;
    return 0;
}

/* Measured on the 2-core AMD EPYC (Zen 4, AVX-512 VNNI) dev machine, 2 threads, Q8_0, n = 512
 * (ms, tiled vs dequantize + sgemm): 576x576 3.2 vs 2.0, 1536x576 5.2 vs 5.1, 576x1536 5.7 vs 5.3,
 * 49152x576 155 vs 166. The BLAS path wins only on small matrices and by less than the noise of a
 * shared machine elsewhere, and it gives up the bit-exactness of batched vs alone, so it is off by
 * default; FOLIO_CPU_BLAS_MIN_N=<n> turns it on for n >= max(n, 65). Revisit after the weight
 * repacking (interleaved rows) speeds the tiled path up. */
int cpu_matmul_default_blas_min_n(void) { return INT32_MAX; }

/* Converts x [n][w->cols] to w's vec-dot type in cb->act (qs, d, s for Q8_1, xinit for the packed
 * Q4_0/Q8_0 kernel in ggml's order; the prompt order has its own start values, cpu_prompt_prepare);
 * 0 or FL_ENOMEM. */
static int quantize_act(cpu_backend_t *cb, const kern_weight_t *w, const float *x, int n, bool prompt, int8_t **qsp,
                        float **dp, float **sp, int32_t **xinitp)
{
    const size_t cols = (size_t)w->cols;
    const int nb = (int)(cols / 32);
    const size_t qbytes = ((size_t)n * cols + 63) & ~(size_t)63, fbytes = (size_t)n * nb * sizeof(float);
    if (cpu_grow(&cb->act, &cb->act_bytes, qbytes + 3 * fbytes + 8 * fbytes)) return FL_ENOMEM;
    int8_t *qs = cb->act;
    float *d = (float *)((char *)cb->act + qbytes), *s = d + (size_t)n * nb;
    int32_t *xinit = (int32_t *)(s + (size_t)n * nb);
    quant_job_t qj = {.x = x, .cols = (int)cols, .nb = nb, .qs = qs, .d = d, .s = w->type == FL_TYPE_Q4_1 ? s : NULL,
                      .xinit = w->packed && w->type != FL_TYPE_Q4_1 && !prompt ? xinit : NULL,
                      .mult = w->type == FL_TYPE_Q8_0 ? -128 : -8, .isa = cb->isa};
    /* a few tokens: on the caller; a batch: one range of tokens per thread */
    cpu_pool_range(cb->pool, n, 1, (int64_t)cols * n >= 8192 ? 2 : INT64_MAX, quant_range, &qj);
    *qsp = qs, *dp = d, *sp = s, *xinitp = xinit;
    return 0;
}

/* n activation rows for a float weight: as they are for F32, else rounded to the weight's type in
 * cb->act (what the float dots read); NULL when out of memory. */
static const float *float_act(cpu_backend_t *cb, const kern_weight_t *w, const float *x, int n)
{
    if (w->type == FL_TYPE_F32) return x;
    const int64_t cnt = (int64_t)n * w->cols;
    if (cpu_grow(&cb->act, &cb->act_bytes, (size_t)cnt * sizeof(float))) return NULL;
    float *xf = cb->act;
    if (w->type == FL_TYPE_F16 && cb->isa != CPU_ISA_SCALAR) round_act_f16_avx2(x, xf, cnt);
    else round_act(w->type, x, xf, cnt);
    return xf;
}

static bool is_quantized(int type) { return type == FL_TYPE_Q4_0 || type == FL_TYPE_Q4_1 || type == FL_TYPE_Q8_0; }

/* The outputs ids[0..n_ids) of one activation row (kern_matmul_rows), the rest -inf. */
static void chosen_outputs(cpu_backend_t *cb, float *y, const kern_weight_t *w, const float *x, const int32_t *ids,
                           int n_ids)
{
    for (int64_t r = 0; r < w->rows; r++) y[r] = -INFINITY;
    if (n_ids <= 0) return;
    mm_ctx_t c = {.type = w->type, .cols = (int)w->cols, .rows = w->rows, .n = 1, .w = w->data,
                  .row_bytes = w->row_bytes, .x = x, .isa = cb->isa};
    const bool quant = is_quantized(w->type);
    if (quant) {
        int32_t *xinit;
        float *d, *s;
        int8_t *qs;
        if (quantize_act(cb, w, x, 1, false, &qs, &d, &s, &xinit)) goto oom;
        c.nb = (int)(w->cols / 32), c.qs = qs, c.d = d, c.s = s;
    } else if (!(c.xf = float_act(cb, w, x, 1))) {
        goto oom;
    }
    if (cb->isa == CPU_ISA_SCALAR) {
        for (int i = 0; i < n_ids; i++) y[ids[i]] = quant ? qdot_scalar(&c, ids[i], 0) : fdot_scalar(&c, ids[i], 0);
        return;
    }
    /* the 8-row tile of one token (4 rows for float weights) over rows picked by id */
    const int step = quant ? 8 : 4;
    for (int i = 0; i < n_ids; i += step) {
        const uint8_t *wr[8];
        for (int k = 0; k < step; k++) wr[k] = c.w + (size_t)ids[i + k < n_ids ? i + k : n_ids - 1] * c.row_bytes;
        float out[8];
        if (!quant) ftile4_avx2(&c, wr, 0, out);
        else if (cb->isa == CPU_ISA_AVX512) tile8_dispatch_avx512(&c, wr, 0, out);
        else tile8_dispatch_avx2(&c, wr, 0, out);
        for (int k = 0; k < step && i + k < n_ids; k++) y[ids[i + k]] = out[k];
    }
    return;
oom:
    for (int i = 0; i < n_ids; i++) y[ids[i]] = NAN;
}

void cpu_matmul_rows(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n,
                     const int32_t *const *ids, const int32_t *n_ids)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    const size_t cols = (size_t)w->cols, rows = (size_t)w->rows;
    int n_full = 0;
    for (int i = 0; i < n; i++) n_full += !ids[i];
    if (n_full == n) {
        cpu_matmul(be, y, w, x, n);
        return;
    }
    if (n_full > 0) { /* one pass over the weights for all of them (a row's bits never depend on its batch) */
        if (cpu_grow(&cb->full_rows, &cb->full_rows_bytes, (size_t)n_full * cols * sizeof(float))) {
            for (size_t k = 0; k < (size_t)n * rows; k++) y[k] = NAN;
            return;
        }
        float *xs = cb->full_rows;
        for (int i = 0, j = 0; i < n; i++)
            if (!ids[i]) memcpy(xs + (size_t)j++ * cols, x + (size_t)i * cols, cols * sizeof(float));
        cpu_matmul(be, y, w, xs, n_full); /* into y's first n_full rows, then each to its place: the
                                              j-th whole row goes to row i >= j, last first */
        for (int i = n - 1, j = n_full - 1; i >= 0; i--)
            if (!ids[i]) {
                if (i != j) memmove(y + (size_t)i * rows, y + (size_t)j * rows, rows * sizeof(float));
                j--;
            }
    }
    for (int i = 0; i < n; i++)
        if (ids[i]) chosen_outputs(cb, y + (size_t)i * rows, w, x + (size_t)i * cols, ids[i], n_ids[i]);
}

/* One matmul with every row in one order: the prompt order (quantized weights only) or ggml's. */
static void matmul_in_order(cpu_backend_t *cb, float *y, const kern_weight_t *w, const float *x, int n, bool prompt)
{
    if (n <= 0 || w->rows <= 0) return;
    mm_ctx_t c = {
        .type = w->type, .cols = (int)w->cols, .rows = w->rows, .n = n, .w = w->data, .row_bytes = w->row_bytes,
        .x = x, .y = y, .isa = cb->isa, .prompt = prompt, .panel = cb->panel,
    };
    atomic_init(&c.next, 0);
    const bool float_w = w->type == FL_TYPE_F32 || w->type == FL_TYPE_F16 || w->type == FL_TYPE_BF16;

    if (!prompt && n >= cb->blas_min_n && cb->panel_floats >= (size_t)MM_PANEL * (size_t)w->cols) {
        cpu_pool_run(cb->pool, mm_task_blas, &c);
        return;
    }

    /* Convert the activations once, on the caller (n x cols is small next to the weights). */
    const size_t cols = (size_t)w->cols;
    if (float_w) {
        if (!(c.xf = float_act(cb, w, x, n))) goto oom;
    } else {
        const int nb = (int)(cols / 32);
        int8_t *qs;
        float *d, *s;
        int32_t *xinit;
        if (quantize_act(cb, w, x, n, prompt, &qs, &d, &s, &xinit)) goto oom;
        if (w->packed) {
            cpu_prompt_act_t pa;
            if (prompt && cpu_prompt_prepare(cb, w->type, qs, d, s, n, nb, &pa)) goto oom;
            cpu_matmul_packed(cb, y, w, qs, d, s, xinit, prompt ? &pa : NULL, n);
            return;
        }
        c.nb = nb, c.qs = qs, c.d = d, c.s = s;
    }
    (void)vec_dot_type;
    c.n_chunks = (int)((w->rows + MM_CHUNK - 1) / MM_CHUNK);
    c.n_tblocks = (n + MM_TBLOCK - 1) / MM_TBLOCK;
    /* Tiny products (a few thousand MACs) are not worth waking the workers. */
    if ((int64_t)n * w->rows * w->cols < 32 * 1024) mm_task_tiled(&c, 0, 1);
    else cpu_pool_run(cb->pool, mm_task_tiled, &c);
    return;
oom:
    /* No way to report from a void op: poison the output so the caller's checks see NaN. */
    for (size_t i = 0; i < (size_t)n * (size_t)w->rows; i++) y[i] = NAN;
}

static void matmul_multi_in_order(cpu_backend_t *cb, float *const *ys, const kern_weight_t *const *ws, int n_w,
                                  const float *x, int n, bool prompt)
{
    bool fused = n > 0 && n_w > 1 && (prompt || n < cb->blas_min_n);
    for (int k = 0; k < n_w && fused; k++)
        fused = ws[k]->packed && ws[k]->rows > 0 && ws[k]->type == ws[0]->type && ws[k]->cols == ws[0]->cols;
    if (!fused) {
        for (int k = 0; k < n_w; k++) matmul_in_order(cb, ys[k], ws[k], x, n, prompt && is_quantized(ws[k]->type));
        return;
    }
    int8_t *qs;
    float *d, *s;
    int32_t *xinit;
    cpu_prompt_act_t pa;
    if (quantize_act(cb, ws[0], x, n, prompt, &qs, &d, &s, &xinit) ||
        (prompt && cpu_prompt_prepare(cb, ws[0]->type, qs, d, s, n, (int)(ws[0]->cols / 32), &pa))) {
        for (int k = 0; k < n_w; k++)
            for (size_t i = 0; i < (size_t)n * (size_t)ws[k]->rows; i++) ys[k][i] = NAN;
        return;
    }
    cpu_matmul_packed_multi(cb, ys, ws, n_w, qs, d, s, xinit, prompt ? &pa : NULL, n);
}

void cpu_set_prompt_rows(kern_backend_t *be, const uint8_t *prompt_rows, int n)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    cb->prompt_rows = prompt_rows;
    cb->prompt_n = prompt_rows ? n : 0;
}

/* How many of this call's n rows take the prompt order (0: none, so ggml's for all). */
static int prompt_rows_in(const cpu_backend_t *cb, const kern_weight_t *const *ws, int n_w, int n)
{
    if (!cb->prompt_block || !cb->prompt_rows || n != cb->prompt_n) return 0;
    for (int k = 0; k < n_w; k++)
        if (!is_quantized(ws[k]->type)) return 0;
    int np = 0;
    for (int i = 0; i < n; i++) np += cb->prompt_rows[i] != 0;
    return np;
}

/* n rows of which np (0 < np < n) are prompt rows: each group of rows gathered and computed in its
 * order, the results put back in place. */
static void matmul_split(cpu_backend_t *cb, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                         int n, int np)
{
    const size_t cols = (size_t)ws[0]->cols;
    size_t out = 0;
    for (int k = 0; k < n_w; k++) out += (size_t)n * (size_t)ws[k]->rows;
    if (cpu_grow(&cb->split, &cb->split_bytes, ((size_t)n * cols + out) * sizeof(float))) {
        for (int k = 0; k < n_w; k++)
            for (size_t i = 0; i < (size_t)n * (size_t)ws[k]->rows; i++) ys[k][i] = NAN;
        return;
    }
    float *xs = cb->split, *yk[MM_SPLIT_MAX];
    const uint8_t *role = cb->prompt_rows;
    for (int part = 0; part < 2; part++) { /* part 0: prompt rows, part 1: the others */
        const int m = part ? n - np : np;
        for (int i = 0, j = 0; i < n; i++)
            if ((role[i] != 0) == !part) memcpy(xs + (size_t)j++ * cols, x + (size_t)i * cols, cols * sizeof(float));
        float *o = xs + (size_t)n * cols;
        for (int k = 0; k < n_w; k++) yk[k] = o, o += (size_t)m * (size_t)ws[k]->rows;
        if (n_w == 1) matmul_in_order(cb, yk[0], ws[0], xs, m, !part);
        else matmul_multi_in_order(cb, yk, ws, n_w, xs, m, !part);
        for (int k = 0; k < n_w; k++) {
            const size_t rows = (size_t)ws[k]->rows;
            for (int i = 0, j = 0; i < n; i++)
                if ((role[i] != 0) == !part)
                    memcpy(ys[k] + (size_t)i * rows, yk[k] + (size_t)j++ * rows, rows * sizeof(float));
        }
    }
}

void cpu_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    const int np = prompt_rows_in(cb, &w, 1, n);
    if (np == 0 || np == n) matmul_in_order(cb, y, w, x, n, np > 0);
    else matmul_split(cb, &y, &w, 1, x, n, np);
}

void cpu_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                      int n)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    const int np = n_w <= MM_SPLIT_MAX ? prompt_rows_in(cb, ws, n_w, n) : 0;
    if (np == 0 || np == n) matmul_multi_in_order(cb, ys, ws, n_w, x, n, np > 0);
    else matmul_split(cb, ys, ws, n_w, x, n, np);
}
