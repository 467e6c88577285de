/* cuda_matmul.cu - matrix products on the CUDA backend: y[n][rows] = x[n][cols] W^T.
 *
 * How it works:
 *   - Single-token products (n = 1, a batch-1 decode step: one pass over the weights) run on k_gemv1,
 *     which streams fp16 rows (or, with FOLIO_CUDA_QGEMV=1, the stored quantized blocks) a warp a row;
 *     the weights of one matmul_multi call (Q, K, V; gate, up) share one launch, and matmul_swiglu's
 *     gate and up rows share a warp.
 *   - Larger n runs on cuBLASLt with fp16 A/B, fp32 C/D and fp32 compute: y[n][rows] = x[n][cols] W^T
 *     is, in cuBLAS's column-major terms, D (rows x n) = op(A) B with A = W seen as (cols x rows) and
 *     TRANSA = T, B = x seen as (cols x n). x is first rounded to fp16 in a scratch buffer (once for
 *     matmul_multi). Descriptors and the heuristic's algorithm are cached per (rows, cols, n,
 *     alignment of y) in a small table with round-robin eviction. */
#include <limits.h>
#include <string.h>

#include "cuda_internal.h"

__global__ void k_f32_to_f16(__half *dst, const float *src, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}

/* Single-token products (a decode step at batch 1 is one pass over the weights): one warp per weight
 * row streams the row once, lanes on consecutive 16-byte vectors (or quantized blocks), several loads
 * in flight a lane, the token's f32 activations read through L1 (where they stay), fp32 accumulation.
 * A GEMM kernel tiles for n in the hundreds and leaves bandwidth unused at n = 1. The weights of one
 * matmul_multi call (Q, K, V; gate, up) share one launch. Quantized weights (Q4_0, Q4_1, Q8_0) are
 * read as stored blocks when the backend keeps them (w->q): 4.5 to 8.5 bits a weight instead of 16. */
#define GEMV_WARPS 8
#define GEMV_MAX_JOBS 3

typedef struct gemv_job {
    const __half *w;        /* fp16 [rows][cols], or NULL when q is used */
    const uint8_t *q;       /* stored blocks [rows][row_bytes] */
    float *y;
    int rows, type, row_bytes;
} gemv_job_t;

typedef struct gemv_batch {
    gemv_job_t job[GEMV_MAX_JOBS];
    int first_block[GEMV_MAX_JOBS + 1];
    int n_jobs;
    int swiglu; /* jobs 0 (gate) and 1 (up): a warp takes row r of both, job 0's y gets silu(g) * u */
    int early;  /* a warp's first round of fp16 weight loads goes before the PDL wait */
} gemv_batch_t;

__device__ __forceinline__ float dot8_f16(uint4 wv, const float *x)
{
    const float4 x0 = *(const float4 *)x, x1 = *(const float4 *)(x + 4);
    const __half2 *w2 = (const __half2 *)&wv;
    const float2 a = __half22float2(w2[0]), b = __half22float2(w2[1]), c = __half22float2(w2[2]),
                 d = __half22float2(w2[3]);
    float s = a.x * x0.x;
    s = fmaf(a.y, x0.y, s);
    s = fmaf(b.x, x0.z, s);
    s = fmaf(b.y, x0.w, s);
    s = fmaf(c.x, x1.x, s);
    s = fmaf(c.y, x1.y, s);
    s = fmaf(d.x, x1.z, s);
    return fmaf(d.y, x1.w, s);
}

/* One row of fp16 weights dotted with x: each lane takes every 32nd 16-byte vector, eight loads
 * issued before any is used (a 4096-wide row is two such rounds: latency, not bandwidth, is what a
 * short row pays for). The sum goes on from vector i with acc (the lane's first round may have
 * been taken by k_gemv1 itself: the order of the sum is the same). */
#define GEMV_UNROLL 8
__device__ __forceinline__ float row_dot_f16(const __half *wrow, const float *x, int cols, int i, float acc)
{
    const uint4 *wr = (const uint4 *)wrow;
    const int nv = cols / 8;
    for (; i + 32 * (GEMV_UNROLL - 1) < nv; i += 32 * GEMV_UNROLL) {
        uint4 w[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) w[u] = __ldcs(wr + i + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) acc += dot8_f16(w[u], x + 8 * (i + 32 * u));
    }
    for (; i < nv; i += 32) acc += dot8_f16(__ldcs(wr + i), x + 8 * i);
    return acc;
}

/* 16 bytes of 4-bit codes (low nibbles: elements 0..15, high: 16..31) against 32 activations:
 * sum(code_i * x_i) and sum(x_i), so that Q4_1 is d * dot + m * sum and Q4_0 d * (dot - 8 sum). */
__device__ __forceinline__ void nibble_dot(const uint32_t qs[4], const float *x, float *dot, float *sum)
{
    float dq = 0.0f, sx = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float4 lo = *(const float4 *)(x + 4 * k), hi = *(const float4 *)(x + 16 + 4 * k);
        const uint32_t v = qs[k];
        dq = fmaf((float)(v & 15u), lo.x, dq);
        dq = fmaf((float)((v >> 8) & 15u), lo.y, dq);
        dq = fmaf((float)((v >> 16) & 15u), lo.z, dq);
        dq = fmaf((float)((v >> 24) & 15u), lo.w, dq);
        dq = fmaf((float)((v >> 4) & 15u), hi.x, dq);
        dq = fmaf((float)((v >> 12) & 15u), hi.y, dq);
        dq = fmaf((float)((v >> 20) & 15u), hi.z, dq);
        dq = fmaf((float)(v >> 28), hi.w, dq);
        sx += (lo.x + lo.y) + (lo.z + lo.w) + (hi.x + hi.y) + (hi.z + hi.w);
    }
    *dot = dq;
    *sum = sx;
}

__device__ __forceinline__ uint32_t load_u32_2aligned(const uint8_t *p)
{
    const uint16_t *h = (const uint16_t *)p;
    return (uint32_t)__ldcs(h) | ((uint32_t)__ldcs(h + 1) << 16);
}

/* One row of stored blocks dotted with x: each lane takes every 32nd block. */
__device__ float row_dot_quant(const uint8_t *row, int type, const float *x, int cols, int lane)
{
    const int nb = cols / FL_QK;
    float acc = 0.0f;
    if (type == FL_TYPE_Q4_1) { /* 20-byte blocks, 4-byte aligned: d, m, 16 bytes of codes */
        for (int b = lane; b < nb; b += 32) {
            const uint32_t *blk = (const uint32_t *)(row + (size_t)b * 20);
            const uint32_t dm = __ldcs(blk);
            const uint32_t qs[4] = {__ldcs(blk + 1), __ldcs(blk + 2), __ldcs(blk + 3), __ldcs(blk + 4)};
            const float2 f = __half22float2(*(const __half2 *)&dm);
            float dot, sum;
            nibble_dot(qs, x + (size_t)b * FL_QK, &dot, &sum);
            acc = fmaf(f.x, dot, fmaf(f.y, sum, acc));
        }
    } else if (type == FL_TYPE_Q4_0) { /* 18-byte blocks, 2-byte aligned: d, 16 bytes of codes */
        for (int b = lane; b < nb; b += 32) {
            const uint8_t *blk = row + (size_t)b * 18;
            const __half d = __ushort_as_half(__ldcs((const unsigned short *)blk));
            const uint32_t qs[4] = {load_u32_2aligned(blk + 2), load_u32_2aligned(blk + 6), load_u32_2aligned(blk + 10),
                                    load_u32_2aligned(blk + 14)};
            float dot, sum;
            nibble_dot(qs, x + (size_t)b * FL_QK, &dot, &sum);
            acc = fmaf(__half2float(d), dot - 8.0f * sum, acc);
        }
    } else { /* Q8_0: 34-byte blocks, 2-byte aligned: d, 32 signed codes */
        for (int b = lane; b < nb; b += 32) {
            const uint8_t *blk = row + (size_t)b * 34;
            const float d = __half2float(__ushort_as_half(__ldcs((const unsigned short *)blk)));
            const float *xb = x + (size_t)b * FL_QK;
            float dq = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const uint32_t v = load_u32_2aligned(blk + 2 + 4 * k);
                const float4 xv = *(const float4 *)(xb + 4 * k);
                dq = fmaf((float)(int8_t)(v & 255u), xv.x, dq);
                dq = fmaf((float)(int8_t)((v >> 8) & 255u), xv.y, dq);
                dq = fmaf((float)(int8_t)((v >> 16) & 255u), xv.z, dq);
                dq = fmaf((float)(int8_t)(v >> 24), xv.w, dq);
            }
            acc = fmaf(d, dq, acc);
        }
    }
    return acc;
}

/* x is written by the kernel before, which may still run (PDL): not __restrict__, whose
 * non-coherent loads ptxas may hoist above the wait (it did, on the early path: a race). */
__global__ void __launch_bounds__(GEMV_WARPS * 32, 4) k_gemv1(gemv_batch_t b, const float *x, int cols)
{
    int j = 0;
    while (j + 1 < b.n_jobs && (int)blockIdx.x >= b.first_block[j + 1]) j++;
    const gemv_job_t *jb = &b.job[j];
    const int lane = threadIdx.x & 31;
    const int row = ((int)blockIdx.x - b.first_block[j]) * GEMV_WARPS + (int)(threadIdx.x >> 5);
    if (row >= jb->rows) return;
    pdl_trigger();
    /* Weights are never written, so they may be read while the predecessor still runs: the loads of
     * the first round are then in flight during its tail (into registers: an L2 prefetch was slower
     * still). Off by default: they slow the predecessor, the step's critical path, more than they
     * gain (bench/README.md). */
    float acc = 0.0f;
    int from = lane;
    if (b.early && !jb->q && lane + 32 * (GEMV_UNROLL - 1) < cols / 8) {
        const uint4 *wr = (const uint4 *)(jb->w + (size_t)row * cols);
        uint4 w[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) w[u] = __ldcs(wr + lane + 32 * u);
        pdl_wait();
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) acc += dot8_f16(w[u], x + 8 * (lane + 32 * u));
        from += 32 * GEMV_UNROLL;
    } else {
        pdl_wait();
    }
    acc = jb->q ? row_dot_quant(jb->q + (size_t)row * jb->row_bytes, jb->type, x, cols, lane)
                : row_dot_f16(jb->w + (size_t)row * cols, x, cols, from, acc);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (b.swiglu) {
        const gemv_job_t *ju = &b.job[1];
        float up = ju->q ? row_dot_quant(ju->q + (size_t)row * ju->row_bytes, ju->type, x, cols, lane)
                         : row_dot_f16(ju->w + (size_t)row * cols, x, cols, lane, 0.0f);
        for (int o = 16; o > 0; o >>= 1) up += __shfl_xor_sync(0xffffffffu, up, o);
        if (lane == 0) jb->y[row] = acc / (1.0f + expf(-acc)) * up; /* k_swiglu's formula */
        return;
    }
    if (lane == 0) jb->y[row] = acc;
}

/* ------------------------------------------------------------------------------------------------
 * Matmul on cuBLASLt */

static void plan_release(mm_plan_t *p)
{
    if (!p->used) return;
    cublasLtMatrixLayoutDestroy(p->c);
    cublasLtMatrixLayoutDestroy(p->b);
    cublasLtMatrixLayoutDestroy(p->a);
    cublasLtMatmulDescDestroy(p->op);
    memset(p, 0, sizeof *p);
}

void cuda_matmul_release(cuda_backend_t *cb)
{
    for (int i = 0; i < MM_PLANS; i++) plan_release(&cb->plans[i]);
}

static uint32_t ptr_align(const void *p)
{
    const uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 4 && a % al) al >>= 1;
    return al;
}

/* The cached descriptors and algorithm for y[n][rows] = x[n][cols] W^T, or NULL (error recorded). */
static const mm_plan_t *plan_get(cuda_backend_t *cb, int rows, int cols, int n, uint32_t y_align)
{
    for (int i = 0; i < MM_PLANS; i++) {
        const mm_plan_t *p = &cb->plans[i];
        if (p->used && p->rows == rows && p->cols == cols && p->n == n && p->y_align == y_align) return p;
    }
    mm_plan_t *p = &cb->plans[cb->next_plan];
    cb->next_plan = (cb->next_plan + 1) % MM_PLANS;
    plan_release(p);

    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t a = NULL, b = NULL, c = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const uint64_t ws = WORKSPACE_BYTES;
    cublasLtMatmulHeuristicResult_t res;
    int count = 0;
    memset(&res, 0, sizeof res);
    OP_CUBLAS(cb, cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    /* A: W row-major [rows][cols] = column-major cols x rows (ld cols), used transposed. */
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatrixLayoutCreate(&a, CUDA_R_16F, (uint64_t)cols, (uint64_t)rows, cols));
    /* B: x row-major [n][cols] = column-major cols x n. */
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatrixLayoutCreate(&b, CUDA_R_16F, (uint64_t)cols, (uint64_t)n, cols));
    /* C = D: y row-major [n][rows] = column-major rows x n. */
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatrixLayoutCreate(&c, CUDA_R_32F, (uint64_t)rows, (uint64_t)n, rows));
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatmulPreferenceCreate(&pref));
    if (!cb->first.code)
        OP_CUBLAS(cb, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    if (!cb->first.code)
        OP_CUBLAS(cb, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &y_align,
                                                           sizeof y_align));
    if (!cb->first.code)
        OP_CUBLAS(cb, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &y_align,
                                                           sizeof y_align));
    if (!cb->first.code) OP_CUBLAS(cb, cublasLtMatmulAlgoGetHeuristic(cb->lt, op, a, b, c, c, pref, 1, &res, &count));
    if (!cb->first.code && count < 1)
        note_error(cb, FL_EBACKEND, "cuBLASLt has no algorithm for an fp16 matmul of %d x %d by %d rows", rows, cols, n);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (cb->first.code) {
        if (c) cublasLtMatrixLayoutDestroy(c);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (op) cublasLtMatmulDescDestroy(op);
        return NULL;
    }
    p->used = 1;
    p->rows = rows;
    p->cols = cols;
    p->n = n;
    p->y_align = y_align;
    p->op = op;
    p->a = a;
    p->b = b;
    p->c = c;
    p->algo = res.algo;
    return p;
}

/* x (f32, [n][cols]) to fp16 in cb->xh; false on error (recorded). */
static bool convert_x(cuda_backend_t *cb, const float *x, int n, int64_t cols)
{
    const size_t elems = (size_t)n * (size_t)cols;
    size_t cap = cb->xh_elems * sizeof(__half);
    if (!grow_device(cb, (void **)&cb->xh, &cap, elems * sizeof(__half), "matmul activations", true)) return false;
    cb->xh_elems = cap / sizeof(__half);
    launch(cb, k_f32_to_f16, grid_for(elems, EW_THREADS), EW_THREADS, cb->xh, x, elems);
    return cb->first.code == 0;
}

/* Whether a single-token product with w runs on k_gemv1 (x: f32, 16-byte aligned). */
static bool gemv_ok(const cuda_backend_t *cb, const kern_weight_t *w, const float *x, int n)
{
    return n == 1 && cb->gemv && w->cols % 8 == 0 && w->rows <= INT_MAX && ((uintptr_t)x & 15) == 0;
}

/* swiglu: ws = {gate, up} of equal shape, ys[0] receives silu(gate) * up (ys[1] is unused). */
static void gemv_launch(cuda_backend_t *cb, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                        bool swiglu)
{
    gemv_batch_t b;
    memset(&b, 0, sizeof b);
    b.n_jobs = swiglu ? 1 : n_w; /* blocks cover job 0's rows only */
    b.swiglu = swiglu;
    b.early = cb->gemv_early && cb->pdl;
    int blocks = 0;
    for (int k = 0; k < n_w; k++) {
        const kern_weight_t *w = ws[k];
        const bool quant = w->q && cb->qgemv;
        b.job[k].w = quant ? NULL : w->d;
        b.job[k].q = quant ? w->q : NULL;
        b.job[k].y = ys[k];
        b.job[k].rows = (int)w->rows;
        b.job[k].type = w->type;
        b.job[k].row_bytes = (int)w->row_bytes;
        if (k >= b.n_jobs) continue;
        b.first_block[k] = blocks;
        blocks += ((int)w->rows + GEMV_WARPS - 1) / GEMV_WARPS;
    }
    b.first_block[b.n_jobs] = blocks;
    launch(cb, k_gemv1, blocks, GEMV_WARPS * 32, b, x, (int)ws[0]->cols);
}

static void matmul_converted(cuda_backend_t *cb, float *y, const kern_weight_t *w, int n)
{
    const mm_plan_t *p = plan_get(cb, (int)w->rows, (int)w->cols, n, ptr_align(y));
    if (!p) return;
    const float alpha = 1.0f, beta = 0.0f;
    OP_CUBLAS(cb, cublasLtMatmul(cb->lt, p->op, &alpha, w->d, p->a, cb->xh, p->b, &beta, y, p->c, y, p->c, &p->algo,
                                 cb->workspace, WORKSPACE_BYTES, cb->stream));
}

void cuda_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    if (gemv_ok(cb, w, x, n)) {
        gemv_launch(cb, &y, &w, 1, x, false);
        return;
    }
    if (!convert_x(cb, x, n, w->cols)) return;
    matmul_converted(cb, y, w, n);
}

void cuda_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w,
                              const float *x, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || n_w <= 0 || !op_begin(cb)) return;
    bool gemv = n_w <= GEMV_MAX_JOBS;
    for (int k = 0; k < n_w && gemv; k++) gemv = gemv_ok(cb, ws[k], x, n) && ws[k]->cols == ws[0]->cols;
    if (gemv) {
        gemv_launch(cb, ys, ws, n_w, x, false);
        return;
    }
    if (!convert_x(cb, x, n, ws[0]->cols)) return;
    for (int k = 0; k < n_w && !cb->first.code; k++) {
        if (ws[k]->cols != ws[0]->cols) {
            note_error(cb, FL_EINVAL, "cuda backend: matmul_multi weights differ in columns (%lld, %lld)",
                       (long long)ws[0]->cols, (long long)ws[k]->cols);
            return;
        }
        matmul_converted(cb, ys[k], ws[k], n);
    }
}

void cuda_matmul_swiglu(kern_backend_t *be, float *out, float *up, const kern_weight_t *w_gate,
                               const kern_weight_t *w_up, int rows, const float *x, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    if (w_gate->rows != rows || w_up->rows != rows || w_gate->cols != w_up->cols) {
        note_error(cb, FL_EINVAL, "cuda backend: matmul_swiglu weights of %lldx%lld and %lldx%lld for %d rows",
                   (long long)w_gate->rows, (long long)w_gate->cols, (long long)w_up->rows, (long long)w_up->cols, rows);
        return;
    }
    float *const ys[2] = {out, up};
    const kern_weight_t *const ws[2] = {w_gate, w_up};
    if (gemv_ok(cb, w_gate, x, n) && gemv_ok(cb, w_up, x, n)) {
        gemv_launch(cb, ys, ws, 2, x, true);
        return;
    }
    cuda_matmul_multi(be, ys, ws, 2, x, n);
    cuda_swiglu(be, out, out, up, n * rows);
}
