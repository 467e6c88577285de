/* backend_cuda.cu - the CUDA implementation of kernels.h (libfolio_cuda.so, opened by kernels/backend.c).
 *
 * How it works:
 *   - One struct cuda_backend per device: a non-blocking cudaStream_t every op is issued on, a
 *     cuBLASLt handle with a 32 MiB workspace, scratch buffers (fp16 activations for matmul, sampled
 *     ids) grown when needed, and a sticky first error. Ops return void, so each records the first
 *     CUDA/cuBLASLt failure (and skips its work once one is recorded); sync() waits for the stream
 *     and returns that error. The error stays recorded: after a failed op the stream's results are
 *     not trusted again (a failed kernel usually poisons the CUDA context anyway).
 *   - Memory: alloc = cudaMalloc + cudaMemsetAsync(0) on the stream, then a stream sync; upload /
 *     download = cudaMemcpyAsync on the stream + stream sync (ordered after earlier ops, and
 *     synchronous for the caller).
 *   - Weights (F32, F16, BF16, Q4_0, Q4_1, Q8_0, what the CPU backend accepts) are dequantized on the
 *     host (quant_rows_to_f16, up to 16 threads), a slab of rows at a time, into fp16 [rows][cols] and
 *     uploaded; quantized ones also keep their stored blocks for the single-token GEMV. Matmuls then run on
 *     cuBLASLt with fp16 A/B, fp32 C/D and fp32 compute: y[n][rows] = x[n][cols] W^T is, in cuBLAS's
 *     column-major terms, D (rows x n) = op(A) B with A = W seen as (cols x rows) and TRANSA = T,
 *     B = x seen as (cols x n). x is first rounded to fp16 in a scratch buffer (once for
 *     matmul_multi). Descriptors and the heuristic's algorithm are cached per (rows, cols, n,
 *     alignment of y) in a small table with round-robin eviction.
 *   - embed, rmsnorm, rope, kv_store, swiglu, add are one kernel each following the CPU code's
 *     formulas (kernels/cpu/cpu_backend.c); the fused ops (add_rmsnorm, rope_kv_store,
 *     matmul_swiglu) are one kernel each too, so a decode step is 8 launches a layer. attention is
 *     one thread block (8 warps) per (token, head): q rounded to fp16 as the CPU does, each warp
 *     walks every 8th position of the sequence through its block table with an fp32 online
 *     softmax, the warps are merged at the end; head_dim up to 256.
 *   - Single-token products (n = 1) run on k_gemv1, which streams fp16 rows or quantized blocks;
 *     larger n on cuBLASLt. A decode step at a repeating batch size is replayed as a CUDA graph.
 *   - sample: an argmax over each row split across blocks (lowest id on ties, as the CPU), then
 *     the stochastic rows' draw on the device (sample_cuda.cu: temperature, top-k, top-p,
 *     kernels/sampling.h's exact definition); only the ids are copied back.
 *
 * Approximations versus the CPU backend: weights are fp16 (the CPU takes quantized dot products on
 * the stored blocks, or f32/BF16 values), activations are rounded to fp16 before a cuBLASLt matmul, softmax is
 * an online fp32 one without the CPU's f16 rounding of probabilities, device cosf/sinf/expf differ
 * from glibc by an ulp or two, and rmsnorm's double sum is taken in another order. Expect ~1e-3
 * relative differences; greedy decoding may diverge from the CPU after some tokens. F32 weights
 * beyond the fp16 range (65504) would become inf.
 *
 * Verified on an H200 by tests/unit/test_cuda_backend.c (every op against the CPU backend) and
 * test_cuda_model.c (greedy continuations against the CPU's F32 path); see tests/README.md. */
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels.h"
#include "quant.h"
#include "sample_cuda.h"
#include "sampling.h"

/* One check for every CUDA runtime call: a failure becomes an fl_error_t naming the call. */
#define CUDA_CHECK(call, err)                                                                              \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        if (e_ != cudaSuccess)                                                                             \
            return fl_fail((err), FL_EBACKEND, "%s:%d: %s: %s", __FILE__, __LINE__, #call,                 \
                           cudaGetErrorString(e_));                                                        \
    } while (0)

#define CUBLAS_CHECK(call, err)                                                                            \
    do {                                                                                                   \
        cublasStatus_t s_ = (call);                                                                        \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            return fl_fail((err), FL_EBACKEND, "%s:%d: %s: cuBLAS status %d", __FILE__, __LINE__, #call,   \
                           (int)s_);                                                                       \
    } while (0)

/* The same checks inside void ops: the failure becomes the backend's sticky error. */
#define OP_CUDA(cb, call)                                                                                  \
    do {                                                                                                   \
        cudaError_t e_ = (call);                                                                           \
        if (e_ != cudaSuccess)                                                                             \
            note_error((cb), FL_EBACKEND, "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
    } while (0)

#define OP_CUBLAS(cb, call)                                                                                \
    do {                                                                                                   \
        cublasStatus_t s_ = (call);                                                                        \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            note_error((cb), FL_EBACKEND, "%s:%d: %s: cuBLAS status %d", __FILE__, __LINE__, #call, (int)s_); \
    } while (0)


#define WORKSPACE_BYTES ((size_t)32 << 20)
#define MM_PLANS 64
#define ATT_WARPS 8
#define ATT_MAX_HEAD_DIM 256
#define ATT_SPLIT_SPAN 256 /* positions a split block takes at least */
#define ATT_MAX_SPLITS 32
#define ROPE_MAX_PAIRS 512
#define EW_THREADS 256

struct kern_weight {
    int type;
    int64_t rows, cols;
    __half *d;      /* [rows][cols] fp16, device */
    uint8_t *q;     /* the stored blocks of a quantized weight (for k_gemv1), device; NULL otherwise */
    size_t row_bytes;
};

typedef struct mm_plan {
    int used;
    int rows, cols, n;
    uint32_t y_align;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
} mm_plan_t;

/* A recorded decode step: recorded the second time its key is seen (the first run, direct, has
 * grown every scratch buffer and cached every plan the step needs), replayed from the third. */
#define GRAPH_SLOTS 64
typedef struct cuda_graph {
    uint64_t key;
    int seen;
    bool no_capture;        /* recording failed for this key: run it directly */
    cudaGraphExec_t exec;
    unsigned gen;           /* cb->buf_gen when recorded */
    uint64_t used;
} cuda_graph_t;

typedef struct cuda_backend {
    kern_backend_t base;
    int device;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *workspace;
    fl_error_t first; /* sticky first error of a void op */
    __half *xh;       /* fp16 copy of a matmul's x */
    size_t xh_elems;
    int32_t *d_ids; /* sampled ids, device */
    size_t ids_cap;
    unsigned long long *d_keys; /* per-row argmax keys (k_argmax_part) */
    size_t keys_cap;
    mm_plan_t plans[MM_PLANS];
    int next_plan;
    cuda_sample_row_t *h_rows, *d_rows; /* stochastic rows' parameters, host and device */
    size_t rows_cap;                    /* bytes of d_rows; h_rows holds as many */
    bool gemv;                          /* single-token products on k_gemv1 (FOLIO_CUDA_GEMV=0: cuBLASLt) */
    bool qgemv;                         /* ... reading quantized weights as stored (FOLIO_CUDA_QGEMV=1; off:
                                         * slower than fp16 rows on an H200, bench/README.md) */
    bool graphs;                        /* CUDA graphs (FOLIO_CUDA_GRAPHS=0: off) */
    bool pdl;                           /* programmatic dependent launch (FOLIO_CUDA_PDL=0: off) */
    bool tiled_attn;                    /* k_attention_tiled for prefill (FOLIO_CUDA_TILED_ATTN=0: off) */
    int lane_attn;                      /* FOLIO_CUDA_LANE_ATTN: 1 always k_attention<true> for decode, 0 never,
                                         * unset: where the (token, head) grid fits the device at once
                                         * (lane_attn_blocks), split grids included */
    int lane_attn_blocks;               /* k_attention<true>'s resident blocks, device-wide */
    int attn_blocks;                    /* k_attention<false>'s */
    int sms;                            /* the device's multiprocessors */
    bool split_attn;                    /* long decode contexts split over blocks (FOLIO_CUDA_SPLIT_ATTN=0: off) */
    float *attn_part;                   /* split attention's per-block partial results */
    size_t attn_part_cap;
    unsigned *attn_arrived;             /* split attention's per-(token, head) counters, zero between launches */
    size_t attn_arrived_cap;
    bool gemv_early;                    /* k_gemv1 loads its first weights before the PDL wait
                                         * (FOLIO_CUDA_GEMV_EARLY=1: on; 4.6% slower at b=1) */
    cuda_graph_t graph[GRAPH_SLOTS];
    uint64_t graph_clock;               /* LRU stamp */
    unsigned buf_gen;                   /* bumped when a scratch buffer moves: recordings hold old pointers */
    cuda_graph_t *capturing, *replaying;
    bool capture_failed;                /* something during the recording could not be recorded */
} cuda_backend_t;

__attribute__((format(printf, 3, 4))) static void note_error(cuda_backend_t *cb, int code, const char *fmt, ...)
{
    if (cb->first.code) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cb->first.msg, sizeof cb->first.msg, fmt, ap);
    va_end(ap);
    cb->first.code = code;
}

/* True when the op may run: no error recorded and the calling thread talks to our device. */
static bool op_begin(cuda_backend_t *cb)
{
    if (cb->first.code || cb->replaying) return false; /* replaying: the recording does the work */
    OP_CUDA(cb, cudaSetDevice(cb->device));
    return cb->first.code == 0;
}

static unsigned grid_for(size_t n, unsigned threads)
{
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g > 65535 * 16 ? 65535 * 16 : g < 1 ? 1 : g);
}

/* ------------------------------------------------------------------------------------------------
 * Programmatic dependent launch (Hopper): a kernel may start while the one before it on the stream
 * still runs. Every kernel here first lets its successor launch (pdl_trigger), then waits for its
 * predecessor to finish and its writes to show (pdl_wait) before it touches anything. A decode step
 * at batch 1 is a chain of ~260 dependent kernels: the next one's launch and block start-up now
 * overlap the current one's tail (H200, 8B shape: 217.5 -> 222.6 tok/s). Pulling the GEMV's weight
 * rows into L2 before the wait was tried and cost 14% (191.3 tok/s): measured, removed. Safe by
 * induction: kernel k+1 may run alongside kernel k, but its wait returns only once k has returned
 * from its own wait and finished. Launched without the attribute (FOLIO_CUDA_PDL=0, or cuBLASLt's
 * kernels), a kernel waits for its predecessor as usual and the two instructions do nothing. */
__device__ __forceinline__ void pdl_trigger()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* kernel<<<grid, block, 0, stream>>>(args), with programmatic serialization where enabled; the
 * launch's error is recorded. */
template <typename... Params, typename... Args>
static void launch(cuda_backend_t *cb, void (*kernel)(Params...), dim3 grid, dim3 block, Args... args)
{
    cudaLaunchAttribute attr;
    memset(&attr, 0, sizeof attr);
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = cb->stream;
    cfg.attrs = &attr;
    cfg.numAttrs = cb->pdl ? 1 : 0;
    OP_CUDA(cb, cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...));
}

/* ------------------------------------------------------------------------------------------------
 * Kernels */

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
     * the first round are then in flight during its tail (registers, not an L2 prefetch: that one
     * measured 14% slower). Off by default: they slow the predecessor, the step's critical path,
     * more than they gain (H200, 8B shape, b=1: 217.6 against 228.2 tok/s). */
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

__global__ void k_embed(float *out, const __half *table, const int32_t *ids, int64_t rows, int64_t cols)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x;
    const int32_t id = ids[i];
    float *o = out + (size_t)i * cols;
    if (id < 0 || id >= rows) {
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = 0.0f;
        return;
    }
    const __half *t = table + (size_t)id * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = __half2float(t[c]);
}

/* One block per row, sized so that a thread holds a float4 or two (a decode step's norm is one row:
 * a loop of dependent loads on few threads would cost more than the row's bytes). The sum of x*x
 * (f32 products) is taken in double, as the CPU. ADD: x += delta first, written back (add_rmsnorm);
 * delta may be y. */
template <bool ADD>
__global__ void k_rmsnorm(float *y, float *x, const float *delta, const float *w, int dim, float eps, bool vec)
{
    pdl_trigger();
    pdl_wait();
    __shared__ double warp_sum[32];
    __shared__ float scale_s;
    float *xr = x + (size_t)blockIdx.x * dim;
    const float *dr = ADD ? delta + (size_t)blockIdx.x * dim : NULL;
    float *yr = y + (size_t)blockIdx.x * dim;
    double s = 0.0;
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = ((const float4 *)xr)[i];
            if (ADD) {
                const float4 d = ((const float4 *)dr)[i];
                v.x += d.x, v.y += d.y, v.z += d.z, v.w += d.w;
                ((float4 *)xr)[i] = v;
            }
            const float p0 = v.x * v.x, p1 = v.y * v.y, p2 = v.z * v.z, p3 = v.w * v.w;
            s += ((double)p0 + (double)p1) + ((double)p2 + (double)p3);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            float v = xr[i];
            if (ADD) xr[i] = v = v + dr[i];
            const float p = v * v;
            s += (double)p;
        }
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = s;
    __syncthreads(); /* also orders every read of delta before any write of y */
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int k = 0; k < (int)(blockDim.x >> 5); k++) t += warp_sum[k];
        const float mean = (float)(t / dim);
        scale_s = 1.0f / sqrtf(mean + eps);
    }
    __syncthreads();
    const float scale = scale_s;
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            const float4 v = ((const float4 *)xr)[i], g = ((const float4 *)w)[i];
            ((float4 *)yr)[i] = make_float4((v.x * scale) * g.x, (v.y * scale) * g.y, (v.z * scale) * g.z,
                                            (v.w * scale) * g.w);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = (xr[i] * scale) * w[i];
    }
}

/* Whether a norm's rows can be read as float4: dim a multiple of 4, every pointer 16-byte aligned. */
static bool norm_vec(int dim, const void *a, const void *b, const void *c, const void *d)
{
    return (dim & 3) == 0 && (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d) & 15) == 0;
}

/* Threads for a norm of `dim`: one float4 (or float) each, whole warps, 32 to 1024. */
static unsigned norm_threads(int dim, bool vec)
{
    const int per = vec ? dim / 4 : dim;
    const int t = (per + 31) / 32 * 32;
    return (unsigned)(t < 32 ? 32 : t > 1024 ? 1024 : t);
}

/* RoPE angles of position pos into cs/sn (shared, np entries): thread 0 builds them with the CPU's
 * iterative theta *= theta_scale, then the threads take sin and cos. Ends with a barrier. */
__device__ void rope_angles(float *cs, float *sn, int32_t pos, int np, float theta_scale, float freq_scale,
                            const float *freq_factors)
{
    if (threadIdx.x == 0) {
        float theta = (float)pos;
        for (int i = 0; i < np; i++) {
            const float ff = freq_factors ? freq_factors[i] : 1.0f;
            cs[i] = freq_scale * (theta / ff);
            theta *= theta_scale;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < np; i += blockDim.x) {
        const float th = cs[i];
        sn[i] = sinf(th);
        cs[i] = cosf(th);
    }
    __syncthreads();
}

/* One block per token; each pair of each head is rotated (NORM mode: adjacent pairs). */
__global__ void k_rope(float *x, const int32_t *pos, int n_heads, int head_dim, int np, float theta_scale,
                       float freq_scale, const float *freq_factors)
{
    pdl_trigger();
    pdl_wait();
    __shared__ float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    const int t = blockIdx.x;
    rope_angles(cs, sn, pos[t], np, theta_scale, freq_scale, freq_factors);
    for (int idx = threadIdx.x; idx < n_heads * np; idx += blockDim.x) {
        const int h = idx / np, i = idx % np;
        float *v = x + ((size_t)t * n_heads + h) * head_dim;
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i] = fmaf(x0, cs[i], -(x1 * sn[i]));
        v[2 * i + 1] = fmaf(x0, sn[i], x1 * cs[i]);
    }
}

__global__ void k_kv_store(__half *kc, __half *vc, const float *k, const float *v, const int32_t *slots, int kv_dim)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x;
    const int32_t slot = slots[i];
    if (slot < 0) return; /* padding row */
    __half *kd = kc + (size_t)slot * kv_dim, *vd = vc + (size_t)slot * kv_dim;
    const float *ks = k + (size_t)i * kv_dim, *vs = v + (size_t)i * kv_dim;
    for (int d = threadIdx.x; d < kv_dim; d += blockDim.x) {
        kd[d] = __float2half_rn(ks[d]);
        vd[d] = __float2half_rn(vs[d]);
    }
}

/* k_rope on q and k and k_kv_store in one launch: block (token, head) over the n_heads query heads
 * then the n_kv_heads key heads; a key head's block also stores that head of v. head_dim even. */
__global__ void k_rope_kv(float *q, float *k, const float *v, __half *kc, __half *vc, const int32_t *pos,
                          const int32_t *slots, int n_heads, int n_kv_heads, int hd, int np, float theta_scale,
                          float freq_scale, const float *freq_factors)
{
    pdl_trigger();
    pdl_wait();
    __shared__ float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    const int t = blockIdx.x, h = blockIdx.y;
    rope_angles(cs, sn, pos[t], np, theta_scale, freq_scale, freq_factors);
    const bool is_q = h < n_heads;
    const int kvh = h - n_heads;
    const size_t kv_dim = (size_t)n_kv_heads * hd;
    float *x = is_q ? q + ((size_t)t * n_heads + h) * hd : k + (size_t)t * kv_dim + (size_t)kvh * hd;
    const int32_t slot = is_q ? -1 : slots[t];
    __half *kd = slot >= 0 ? kc + (size_t)slot * kv_dim + (size_t)kvh * hd : NULL;
    for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) {
        float x0 = x[2 * i], x1 = x[2 * i + 1];
        if (i < np) {
            const float r0 = fmaf(x0, cs[i], -(x1 * sn[i])), r1 = fmaf(x0, sn[i], x1 * cs[i]);
            x[2 * i] = x0 = r0;
            x[2 * i + 1] = x1 = r1;
        }
        if (kd) *(__half2 *)(kd + 2 * i) = __halves2half2(__float2half_rn(x0), __float2half_rn(x1));
    }
    if (kd) {
        __half *vd = vc + (size_t)slot * kv_dim + (size_t)kvh * hd;
        const float *vs = v + (size_t)t * kv_dim + (size_t)kvh * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) vd[d] = __float2half_rn(vs[d]);
    }
}

/* One block of ATT_WARPS warps per (token, head) and split: blockIdx.x = token * n_heads + head,
 * blockIdx.y one of gridDim.y equal shares of the token's positions (one share unless the context
 * is long and the batch small: cuda_attention). Lane l of a warp owns dimensions l, l+32, ... (up
 * to 8 of them: head_dim <= 256). Warp w handles positions w, w+ATT_WARPS, ... of its share with
 * its own running max m, sum l and accumulators; the warps' states are merged through shared memory
 * at the end, and the shares' through `part` by the last block of the (token, head) to finish. */
/* LANES (head_dim a multiple of 8): a warp takes 32 positions at a time, one a lane, each lane
 * computing its position's whole score from 16-byte K loads (ATT_K_ROUND in flight together), then
 * adds the 32 V rows with hd/8 lanes a row, 16 bytes a lane, 32 / (hd/8) rows at a time
 * (ATT_V_ROUND loads in flight a lane). A warp then pays a few memory latencies per 32 positions
 * instead of one per position, which is what a decode at small batch waits on, over a short context
 * or a long one (H200, 8B shape, 4,096 positions unsplit: 141.2 against 37.8 tok/s at b=1, 550.3
 * against 161.7 at b=8). It holds more registers: cuda_attention picks it for split grids and for
 * grids that fit the device at once (FOLIO_CUDA_LANE_ATTN=1: always, 0: never). */
#define ATT_K_ROUND 8
#define ATT_V_ROUND 8
template <bool LANES>
__global__ void __launch_bounds__(ATT_WARPS * 32) k_attention(float *out, const float *q, const __half *kc,
                                                              const __half *vc, const int32_t *tok_seq,
                                                              const int32_t *tok_pos, const int32_t *block_tables,
                                                              int max_blocks, int bs, int n_heads, int n_kv_heads,
                                                              int hd, float scale, const uint64_t *tree_mask,
                                                              const int32_t *tree_start, float *part,
                                                              unsigned *arrived)
{
    pdl_trigger();
    pdl_wait();
    __shared__ float qs[ATT_MAX_HEAD_DIM];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][ATT_MAX_HEAD_DIM];
    __shared__ float chunk_p[LANES ? ATT_WARPS : 1][32];
    __shared__ int32_t chunk_slot[LANES ? ATT_WARPS : 1][32];
    const int i = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
    const int kvh = h / (n_heads / n_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t qoff = ((size_t)i * n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = __half2float(__float2half_rn(q[qoff + d]));
    __syncthreads();
    float *o = out + qoff;
    /* kern_attn_len / kern_attn_visible, on the device */
    const uint64_t tm = tree_mask ? tree_mask[i] : 0;
    const int ts = tree_mask ? tree_start[i] : 0;
    const int len = tree_mask ? ts + (tm ? 64 - __clzll((long long)tm) : 0) : tok_pos[i] + 1;
    if (len <= 0) { /* uniform over the block */
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    const int32_t *bt = block_tables + (size_t)tok_seq[i] * max_blocks;
    const size_t kv_stride = (size_t)n_kv_heads * hd, hoff = (size_t)kvh * hd;
    /* This block's share of the positions: split blockIdx.y of gridDim.y (flash-decoding) */
    const int splits = (int)gridDim.y, split = (int)blockIdx.y;
    const int lo = (int)((int64_t)len * split / splits), hi = (int)((int64_t)len * (split + 1) / splits);

    float m = -INFINITY, l = 0.0f, acc[ATT_MAX_HEAD_DIM / 32];
#pragma unroll
    for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) acc[r] = 0.0f;
    /* LANES: the V rows' lanes. Lane `lane` adds dimensions 8 vsub .. 8 vsub + 7 of rows vgrp,
     * vgrp + vgroups, ... of a chunk (lanes past vgroups * vlanes idle there). */
    const int vlanes = LANES ? hd / 8 : 1, vgroups = LANES ? 32 / vlanes : 1;
    const int vgrp = lane / vlanes, vsub = lane % vlanes;
    float vacc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (LANES) {
        for (int j0 = lo + 32 * warp; j0 < hi; j0 += 32 * ATT_WARPS) {
            const int j = j0 + lane;
            const bool vis = j < hi && !(tree_mask && j >= ts && !((tm >> (j - ts)) & 1u)); /* masked: weighs 0 */
            int32_t slot = -1;
            float s = -INFINITY;
            if (vis) {
                slot = bt[j / bs] * bs + j % bs; /* < 2^31 slots: the pools would not fit a device */
                const uint4 *kr = (const uint4 *)(kc + (size_t)slot * kv_stride + hoff);
                float dot = 0.0f;
                for (int d0 = 0; d0 < hd / 8; d0 += ATT_K_ROUND) {
                    uint4 kv[ATT_K_ROUND];
#pragma unroll
                    for (int u = 0; u < ATT_K_ROUND; u++)
                        if (d0 + u < hd / 8) kv[u] = kr[d0 + u];
#pragma unroll
                    for (int u = 0; u < ATT_K_ROUND; u++) {
                        if (d0 + u >= hd / 8) break;
                        const __half2 *k2 = (const __half2 *)&kv[u];
#pragma unroll
                        for (int t = 0; t < 4; t++) {
                            const float2 kf = __half22float2(k2[t]);
                            dot = fmaf(qs[8 * (d0 + u) + 2 * t], kf.x, dot);
                            dot = fmaf(qs[8 * (d0 + u) + 2 * t + 1], kf.y, dot);
                        }
                    }
                }
                s = dot * scale;
            }
            float cmax = s;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
            const float mn = fmaxf(m, cmax);
            if (mn == -INFINITY) continue; /* uniform: -inf scores before any finite one weigh 0 */
            const float corr = m == -INFINITY ? 0.0f : expf(m - mn);
            const float p = vis ? expf(s - mn) : 0.0f;
            float psum = p;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
            l = l * corr + psum;
            m = mn;
            chunk_p[warp][lane] = p;
            chunk_slot[warp][lane] = slot;
            __syncwarp();
#pragma unroll
            for (int k = 0; k < 8; k++) vacc[k] *= corr;
            if (vgrp < vgroups) {
                for (int t0 = vgrp; t0 < 32; t0 += vgroups * ATT_V_ROUND) {
                    uint4 vv[ATT_V_ROUND];
                    float pv[ATT_V_ROUND];
#pragma unroll
                    for (int u = 0; u < ATT_V_ROUND; u++) {
                        const int t = t0 + u * vgroups;
                        pv[u] = t < 32 ? chunk_p[warp][t] : 0.0f;
                        /* masked (or underflowed): absent, even where V holds inf */
                        vv[u] = pv[u] != 0.0f
                                    ? ((const uint4 *)(vc + (size_t)chunk_slot[warp][t] * kv_stride + hoff))[vsub]
                                    : make_uint4(0u, 0u, 0u, 0u);
                    }
#pragma unroll
                    for (int u = 0; u < ATT_V_ROUND; u++) {
                        if (pv[u] == 0.0f) continue;
                        const __half2 *v2 = (const __half2 *)&vv[u];
#pragma unroll
                        for (int t = 0; t < 4; t++) {
                            const float2 vf = __half22float2(v2[t]);
                            vacc[2 * t] = fmaf(pv[u], vf.x, vacc[2 * t]);
                            vacc[2 * t + 1] = fmaf(pv[u], vf.y, vacc[2 * t + 1]);
                        }
                    }
                }
            }
            __syncwarp(); /* the chunk's p and slots are read before the next chunk writes them */
        }
    } else
    for (int j = lo + warp; j < hi; j += ATT_WARPS) {
        if (tree_mask && j >= ts && !((tm >> (j - ts)) & 1u)) continue; /* masked: weighs 0 */
        const size_t slot = (size_t)bt[j / bs] * bs + (size_t)(j % bs);
        const __half *kr = kc + slot * kv_stride + hoff, *vr = vc + slot * kv_stride + hoff;
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) {
            const int d = lane + 32 * r;
            if (d < hd) s += qs[d] * __half2float(kr[d]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        s *= scale;
        const float mn = fmaxf(m, s);
        if (mn == -INFINITY) continue; /* a -inf score before any finite one weighs 0 */
        const float corr = m == -INFINITY ? 0.0f : expf(m - mn);
        const float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) {
            const int d = lane + 32 * r;
            if (d < hd) acc[r] = acc[r] * corr + p * __half2float(vr[d]);
        }
        m = mn;
    }
    if (lane == 0) wm[warp] = m, wl[warp] = l;
    if constexpr (LANES) { /* the row groups' sums, one group after another */
        for (int g = 0; g < vgroups; g++) {
            if (vgrp == g) {
#pragma unroll
                for (int k = 0; k < 8; k++)
                    wacc[warp][8 * vsub + k] = g ? wacc[warp][8 * vsub + k] + vacc[k] : vacc[k];
            }
            __syncwarp();
        }
    } else {
#pragma unroll
        for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) {
            const int d = lane + 32 * r;
            if (d < hd) wacc[warp][d] = acc[r];
        }
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, wm[w]);
    /* The warps' states merged: the output, or with a split this block's (max, sum, unnormalized
     * output) into part, where the last block of the (token, head) to arrive merges every split's
     * (threadFenceReduction's pattern) and resets the counter for the next launch. */
    const size_t th = (size_t)i * n_heads + h, rec = (size_t)hd + 2;
    float *mine = splits > 1 ? part + (th * splits + split) * rec : NULL;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            const float f = wm[w] == -INFINITY ? 0.0f : expf(wm[w] - M);
            num += wacc[w][d] * f;
            den += wl[w] * f;
        }
        if (!mine) {
            o[d] = den > 0.0f ? num / den : 0.0f;
            continue;
        }
        mine[2 + d] = num;
        if (d == 0) mine[0] = M, mine[1] = den;
    }
    if (!mine) return;
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) {
        last = atomicAdd(&arrived[th], 1u) == (unsigned)splits - 1;
        if (last) arrived[th] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const volatile float *all = part + th * splits * rec;
    float MS = -INFINITY;
    for (int sp = 0; sp < splits; sp++) MS = fmaxf(MS, all[sp * rec]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int sp = 0; sp < splits; sp++) {
            const float ms = all[sp * rec];
            const float f = ms == -INFINITY ? 0.0f : expf(ms - MS);
            num += all[sp * rec + 2 + d] * f;
            den += all[sp * rec + 1] * f;
        }
        o[d] = den > 0.0f ? num / den : 0.0f;
    }
}

/* Attention for runs of tokens of one sequence (prefill): block (tile of qt consecutive tokens,
 * KV head g) holds the query rows of the tile's tokens for the heads sharing g (rows = qt x group
 * <= TA_ROWS, q rounded to fp16 as k_attention does) and walks the sequence's positions TA_KT at a
 * time: the K/V rows of a tile go through shared memory once for all those rows, where k_attention
 * reads each once per (token, head). A tile whose tokens come from several sequences is taken one
 * run of one sequence at a time. Four threads per row: for scores thread c takes positions c, c+4,
 * ...; for the output, dimension pairs 2c, 2c+8, .... Online fp32 softmax per row; masked positions
 * (beyond a token's length, or outside its tree mask) weigh exactly 0, as in k_attention. head_dim
 * a multiple of 8, at most TA_MAX_HD. */
#define TA_THREADS 256
#define TA_ROWS 64
#define TA_KT 32
#define TA_MAX_HD 128
#define TA_PAD 8 /* halves after each shared row: 16-byte aligned rows, rows 4 banks apart */

__global__ void __launch_bounds__(TA_THREADS) k_attention_tiled(
    float *out, const float *q, const __half *kc, const __half *vc, const int32_t *tok_seq, const int32_t *tok_pos,
    const int32_t *block_tables, int max_blocks, int bs, int n_tokens, int n_heads, int n_kv_heads, int hd,
    float scale, const uint64_t *tree_mask, const int32_t *tree_start, int qt)
{
    pdl_trigger();
    pdl_wait();
    __shared__ __align__(16) __half qs[TA_ROWS][TA_MAX_HD + TA_PAD];
    __shared__ __align__(16) __half ks[TA_KT][TA_MAX_HD + TA_PAD];
    __shared__ __align__(16) __half vs[TA_KT][TA_MAX_HD + TA_PAD];
    __shared__ float ps[TA_ROWS][TA_KT + 1];
    __shared__ int32_t t_seq[TA_ROWS], t_len[TA_ROWS], t_ts[TA_ROWS];
    __shared__ uint64_t t_tm[TA_ROWS];
    __shared__ int32_t slot_s[TA_KT];
    const int group = n_heads / n_kv_heads, g = blockIdx.y;
    const int t0 = blockIdx.x * qt, nt = min(qt, n_tokens - t0), n_rows = nt * group;
    const int tid = threadIdx.x, r = tid >> 2, c = tid & 3;
    const int ti = r / group, h = g * group + r % group; /* this thread's row: token t0 + ti, head h */
    const size_t kv_stride = (size_t)n_kv_heads * hd, hoff = (size_t)g * hd;

    for (int i = tid; i < nt; i += blockDim.x) { /* kern_attn_len, on the device */
        const int t = t0 + i;
        t_seq[i] = tok_seq[t];
        t_tm[i] = tree_mask ? tree_mask[t] : 0;
        t_ts[i] = tree_mask ? tree_start[t] : 0;
        t_len[i] = tree_mask ? t_ts[i] + (t_tm[i] ? 64 - __clzll((long long)t_tm[i]) : 0) : tok_pos[t] + 1;
    }
    for (int e = tid; e < n_rows * (hd / 2); e += blockDim.x) {
        const int rr = e / (hd / 2), d = 2 * (e % (hd / 2));
        const float *qr = q + ((size_t)(t0 + rr / group) * n_heads + g * group + rr % group) * hd + d;
        *(__half2 *)&qs[rr][d] = __floats2half2_rn(qr[0], qr[1]);
    }
    __syncthreads();

    for (int sub = 0, end; sub < nt; sub = end) { /* each run of one sequence (uniform over the block) */
        const int seq = t_seq[sub];
        int max_len = 0;
        for (end = sub; end < nt && t_seq[end] == seq; end++) max_len = max(max_len, t_len[end]);
        const bool active = r < n_rows && ti >= sub && ti < end;
        const int len = active ? t_len[ti] : 0, ts = active ? t_ts[ti] : 0;
        const uint64_t tm = active ? t_tm[ti] : 0;
        const int32_t *bt = block_tables + (size_t)seq * max_blocks;
        float m = -INFINITY, l = 0.0f, acc[TA_MAX_HD / 4];
#pragma unroll
        for (int k = 0; k < TA_MAX_HD / 4; k++) acc[k] = 0.0f;

        for (int kt = 0; kt < max_len; kt += TA_KT) {
            if (tid < TA_KT) {
                const int j = kt + tid;
                slot_s[tid] = j < max_len ? bt[j / bs] * bs + j % bs : -1;
            }
            __syncthreads();
            for (int e = tid; e < TA_KT * (hd / 8); e += blockDim.x) {
                const int jj = e / (hd / 8), d = 8 * (e % (hd / 8));
                const int32_t slot = slot_s[jj];
                uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
                if (slot >= 0) {
                    kv = *(const uint4 *)(kc + (size_t)slot * kv_stride + hoff + d);
                    vv = *(const uint4 *)(vc + (size_t)slot * kv_stride + hoff + d);
                }
                *(uint4 *)&ks[jj][d] = kv;
                *(uint4 *)&vs[jj][d] = vv;
            }
            __syncthreads();
            float s[TA_KT / 4], tile_max = -INFINITY;
#pragma unroll
            for (int u = 0; u < TA_KT / 4; u++) {
                const int j = kt + c + 4 * u;
                float dot = 0.0f;
                if (active && j < len && (!tree_mask || j < ts || ((tm >> (j - ts)) & 1u))) {
                    for (int d = 0; d < hd; d += 2) {
                        const float2 qv = __half22float2(*(const __half2 *)&qs[r][d]);
                        const float2 kv = __half22float2(*(const __half2 *)&ks[c + 4 * u][d]);
                        dot = fmaf(qv.x, kv.x, dot);
                        dot = fmaf(qv.y, kv.y, dot);
                    }
                    s[u] = dot * scale;
                } else {
                    s[u] = -INFINITY; /* masked: weighs 0 */
                }
                tile_max = fmaxf(tile_max, s[u]);
            }
            /* the row's four threads are lanes 4k..4k+3 of one warp */
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float mn = fmaxf(m, tile_max);
            float corr = 1.0f, psum = 0.0f;
            if (mn != -INFINITY) { /* else nothing finite yet: -inf scores weigh 0 */
                corr = m == -INFINITY ? 0.0f : expf(m - mn);
#pragma unroll
                for (int u = 0; u < TA_KT / 4; u++) {
                    s[u] = expf(s[u] - mn);
                    psum += s[u];
                }
            } else {
#pragma unroll
                for (int u = 0; u < TA_KT / 4; u++) s[u] = 0.0f;
            }
            psum += __shfl_xor_sync(0xffffffffu, psum, 1);
            psum += __shfl_xor_sync(0xffffffffu, psum, 2);
            l = l * corr + psum;
            m = mn;
            if (r < TA_ROWS) {
#pragma unroll
                for (int u = 0; u < TA_KT / 4; u++) ps[r][c + 4 * u] = s[u];
            }
            __syncthreads();
            if (active) {
#pragma unroll
                for (int k = 0; k < TA_MAX_HD / 8; k++) acc[2 * k] *= corr, acc[2 * k + 1] *= corr;
                for (int jj = 0; jj < TA_KT; jj++) {
                    const float p = ps[r][jj];
                    if (p == 0.0f) continue; /* a masked position is absent, even where V holds inf */
#pragma unroll
                    for (int k = 0; k < TA_MAX_HD / 8; k++) {
                        const int d = 2 * c + 8 * k;
                        if (d < hd) {
                            const float2 v = __half22float2(*(const __half2 *)&vs[jj][d]);
                            acc[2 * k] = fmaf(p, v.x, acc[2 * k]);
                            acc[2 * k + 1] = fmaf(p, v.y, acc[2 * k + 1]);
                        }
                    }
                }
            }
            __syncthreads(); /* before the next tile overwrites slot_s, ks, vs, ps */
        }
        if (active) {
            float *o = out + ((size_t)(t0 + ti) * n_heads + h) * hd;
#pragma unroll
            for (int k = 0; k < TA_MAX_HD / 8; k++) {
                const int d = 2 * c + 8 * k;
                if (d < hd) {
                    o[d] = l > 0.0f ? acc[2 * k] / l : 0.0f;
                    o[d + 1] = l > 0.0f ? acc[2 * k + 1] / l : 0.0f;
                }
            }
        }
    }
}

__global__ void k_swiglu(float *out, const float *gate, const float *up, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void k_add(float *y, const float *x, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

/* Greedy ids as the CPU's argmax_row: only values > -inf count (NaN never wins), the lowest id wins
 * ties, a row with none is 0. A row of a large vocabulary is split over many blocks (one block
 * would walk 128k logits on 256 threads, ~0.2 ms); each block folds its part into one 64-bit key
 * per row by atomicMax: the value's bits made order-preserving above, the complement of the id
 * below (so equal values keep the lowest id). -0 counts as +0, as the comparison does. */
#define ARGMAX_THREADS 256
#define ARGMAX_PER_THREAD 8

__device__ __forceinline__ unsigned long long argmax_key(float v, int i)
{
    uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (0xffffffffu - (uint32_t)i);
}

__global__ void k_argmax_part(unsigned long long *keys, const float *logits, int vocab)
{
    pdl_trigger();
    pdl_wait();
    __shared__ unsigned long long warp_best[ARGMAX_THREADS / 32];
    const float *l = logits + (size_t)blockIdx.x * vocab; /* rows on x (up to 2^31 - 1), parts on y */
    const int start = blockIdx.y * ARGMAX_THREADS * ARGMAX_PER_THREAD + threadIdx.x;
    unsigned long long best = 0; /* below every real key: -inf's key is not 0 and is never made */
#pragma unroll
    for (int k = 0; k < ARGMAX_PER_THREAD; k++) {
        const int i = start + k * ARGMAX_THREADS;
        if (i < vocab) {
            const float v = l[i];
            if (v > -INFINITY) best = max(best, argmax_key(v, i));
        }
    }
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < ARGMAX_THREADS / 32; k++) best = max(best, warp_best[k]);
        if (best) atomicMax(&keys[blockIdx.x], best);
    }
}

__global__ void k_argmax_ids(int32_t *ids, const unsigned long long *keys, int n)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[i] = keys[i] ? (int32_t)(0xffffffffu - (uint32_t)keys[i]) : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Memory */

static void *cuda_alloc(kern_backend_t *be, size_t bytes)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (cudaSetDevice(cb->device) != cudaSuccess) return NULL;
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        (void)cudaGetLastError(); /* an allocation failure is not sticky: the caller sees NULL */
        return NULL;
    }
    if (cudaMemsetAsync(p, 0, bytes ? bytes : 1, cb->stream) != cudaSuccess ||
        cudaStreamSynchronize(cb->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* or the next op's launch check would report it */
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cuda_free(kern_backend_t *be, void *p)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!p) return;
    cudaSetDevice(cb->device);
    cudaFree(p); /* waits for the device's outstanding work */
}

static int cuda_copy(cuda_backend_t *cb, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
    if (!bytes) return 0;
    if (cudaSetDevice(cb->device) != cudaSuccess || cudaMemcpyAsync(dst, src, bytes, kind, cb->stream) != cudaSuccess ||
        cudaStreamSynchronize(cb->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* reported here: not again by the next op's launch check */
        return FL_EBACKEND;
    }
    return 0;
}

static int cuda_upload(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return cuda_copy((cuda_backend_t *)be, dst, src, bytes, cudaMemcpyHostToDevice);
}

static int cuda_download(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return cuda_copy((cuda_backend_t *)be, dst, src, bytes, cudaMemcpyDeviceToHost);
}

static int cuda_sync(kern_backend_t *be, fl_error_t *err)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!cb->first.code) {
        OP_CUDA(cb, cudaSetDevice(cb->device));
        OP_CUDA(cb, cudaStreamSynchronize(cb->stream));
    }
    if (cb->first.code) {
        if (err) *err = cb->first;
        return cb->first.code;
    }
    return 0;
}

/* Grows a device scratch buffer to at least `bytes` (rarely: 1.5x the need). */
/* in_graphs: recorded steps use the buffer (they hold its address, so a move invalidates them). */
static bool grow_device(cuda_backend_t *cb, void **p, size_t *cap, size_t bytes, const char *what, bool in_graphs)
{
    if (*cap >= bytes) return true;
    if (cb->capturing) { /* no allocation inside a recording: give it up, the step reruns directly */
        cb->capture_failed = true;
        return false;
    }
    if (in_graphs) cb->buf_gen++;
    const size_t want = bytes + bytes / 2;
    void *np = NULL;
    if (cudaMalloc(&np, want) != cudaSuccess) {
        (void)cudaGetLastError();
        note_error(cb, FL_ENOMEM, "CUDA out of memory allocating %zu MiB for %s", (want + ((1u << 20) - 1)) >> 20, what);
        return false;
    }
    if (*p) cudaFree(*p);
    *p = np;
    *cap = want;
    return true;
}

/* ------------------------------------------------------------------------------------------------
 * Weights: dequantized on the host to fp16 */


static void cuda_weight_destroy(kern_backend_t *be, kern_weight_t *w);

static int convert_threads(void)
{
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 16 ? 16 : (int)n;
}

static kern_weight_t *cuda_weight_new(kern_backend_t *be, int type, int64_t rows, int64_t cols, const void *data,
                                      fl_error_t *err)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const size_t row_bytes = kern_weight_check("cuda", type, rows, cols, data, err);
    if (!row_bytes) return NULL;
    if (cudaSetDevice(cb->device) != cudaSuccess) {
        fl_fail(err, FL_EBACKEND, "cuda backend: cudaSetDevice(%d) failed", cb->device);
        return NULL;
    }
    kern_weight_t *w = (kern_weight_t *)calloc(1, sizeof *w);
    /* The host staging slab: whole rows, about 32M elements (64 MiB) at a time, converted on up to 16
     * threads (an 8B model's 8G elements take minutes on one). */
    int64_t slab_rows = ((int64_t)32 << 20) / cols;
    if (slab_rows < 1) slab_rows = 1;
    if (slab_rows > rows) slab_rows = rows;
    fl_f16_t *slab = (fl_f16_t *)malloc((size_t)slab_rows * (size_t)cols * sizeof(fl_f16_t));
    if (!w || !slab) {
        free(w);
        free(slab);
        fl_fail(err, FL_ENOMEM, "cuda backend: out of host memory converting a %lld x %lld weight", (long long)rows,
                (long long)cols);
        return NULL;
    }
    const size_t bytes = (size_t)rows * (size_t)cols * sizeof(__half);
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    if (cudaMalloc((void **)&w->d, bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        free(w);
        free(slab);
        fl_fail(err, FL_ENOMEM, "CUDA out of memory allocating %zu MiB for weight %lld x %lld",
                (bytes + ((1u << 20) - 1)) >> 20, (long long)rows, (long long)cols);
        return NULL;
    }
    const uint8_t *src = (const uint8_t *)data;
    for (int64_t r0 = 0; r0 < rows; r0 += slab_rows) {
        const int64_t nr = rows - r0 < slab_rows ? rows - r0 : slab_rows;
        if (quant_rows_to_f16(type, src + (size_t)r0 * row_bytes, row_bytes, slab, nr, cols, convert_threads())) {
            cudaFree(w->d);
            free(w);
            free(slab);
            fl_fail(err, FL_ENOMEM, "cuda backend: out of host memory converting a %lld x %lld weight",
                    (long long)rows, (long long)cols);
            return NULL;
        }
        /* On our stream and waited for: a plain cudaMemcpy from pageable memory may return before its
         * DMA lands, and the legacy stream it runs on is not ordered with our non-blocking stream. The
         * wait also frees the slab for the next rows. */
        cudaError_t e = cudaMemcpyAsync(w->d + (size_t)r0 * cols, slab, (size_t)nr * cols * sizeof(__half),
                                        cudaMemcpyHostToDevice, cb->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(cb->stream);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            cudaFree(w->d);
            free(w);
            free(slab);
            fl_fail(err, FL_EBACKEND, "cuda backend: uploading a %lld x %lld weight: %s", (long long)rows,
                    (long long)cols, cudaGetErrorString(e));
            return NULL;
        }
    }
    free(slab);
    w->row_bytes = row_bytes;
    /* Quantized weights also keep their stored blocks for single-token products (k_gemv1). */
    if (cb->qgemv && (type == FL_TYPE_Q4_0 || type == FL_TYPE_Q4_1 || type == FL_TYPE_Q8_0)) {
        const size_t qbytes = (size_t)rows * row_bytes;
        cudaError_t e = cudaMalloc((void **)&w->q, qbytes);
        if (e == cudaSuccess) e = cudaMemcpyAsync(w->q, data, qbytes, cudaMemcpyHostToDevice, cb->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(cb->stream);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            fl_fail(err, e == cudaErrorMemoryAllocation ? FL_ENOMEM : FL_EBACKEND,
                    "cuda backend: keeping the %s blocks of a %lld x %lld weight (%zu MiB): %s", fl_dtype_name(type),
                    (long long)rows, (long long)cols, qbytes >> 20, cudaGetErrorString(e));
            cuda_weight_destroy(be, w);
            return NULL;
        }
    }
    return w;
}

static void cuda_weight_destroy(kern_backend_t *be, kern_weight_t *w)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!w) return;
    cudaSetDevice(cb->device);
    cudaFree(w->d);
    if (w->q) cudaFree(w->q);
    free(w);
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

static void cuda_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n)
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

static void cuda_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w,
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

static void cuda_swiglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n);

static void cuda_matmul_swiglu(kern_backend_t *be, float *out, float *up, const kern_weight_t *w_gate,
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

/* ------------------------------------------------------------------------------------------------
 * Other ops */

static void cuda_embed(kern_backend_t *be, float *out, const kern_weight_t *table, const int32_t *ids, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_embed, n, EW_THREADS, out, (const __half *)table->d, ids, table->rows, table->cols);
}

static void cuda_rmsnorm(kern_backend_t *be, float *y, const float *x, const float *weight, int n, int dim, float eps)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || dim <= 0 || !op_begin(cb)) return;
    const bool vec = norm_vec(dim, y, x, x, weight);
    launch(cb, k_rmsnorm<false>, n, norm_threads(dim, vec), y, (float *)x, (const float *)NULL, weight, dim, eps,
           vec);
}

static void cuda_add_rmsnorm(kern_backend_t *be, float *y, float *x, const float *delta, const float *weight, int n,
                             int dim, float eps)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || dim <= 0 || !op_begin(cb)) return;
    const bool vec = norm_vec(dim, y, x, delta, weight);
    launch(cb, k_rmsnorm<true>, n, norm_threads(dim, vec), y, x, delta, weight, dim, eps, vec);
}

static void cuda_rope(kern_backend_t *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                      const kern_rope_t *rope)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const int n_rot = rope->n_rot < head_dim ? rope->n_rot : head_dim, np = n_rot / 2;
    if (n <= 0 || np <= 0 || np > ROPE_MAX_PAIRS || !op_begin(cb)) return; /* as the CPU: nothing to rotate */
    const float theta_scale = powf(rope->freq_base, -2.0f / (float)n_rot);
    launch(cb, k_rope, n, EW_THREADS, x, pos, n_heads, head_dim, np, theta_scale, rope->freq_scale,
           rope->freq_factors);
}

static void cuda_kv_store(kern_backend_t *be, fl_f16_t *k_cache, fl_f16_t *v_cache, const float *k, const float *v,
                          const int32_t *slots, int n, int kv_dim)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || kv_dim <= 0 || !op_begin(cb)) return;
    launch(cb, k_kv_store, n, EW_THREADS, (__half *)k_cache, (__half *)v_cache, k, v, slots, kv_dim);
}

static void cuda_rope_kv_store(kern_backend_t *be, float *q, float *k, const float *v, fl_f16_t *k_cache,
                               fl_f16_t *v_cache, const int32_t *pos, const int32_t *slots, int n, int n_heads,
                               int n_kv_heads, int head_dim, const kern_rope_t *rope)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const int n_rot = rope->n_rot < head_dim ? rope->n_rot : head_dim, np = n_rot > 0 ? n_rot / 2 : 0;
    if (head_dim % 2 || np > ROPE_MAX_PAIRS || n_heads + n_kv_heads > 65535) { /* the ops one by one */
        cuda_rope(be, q, pos, n, n_heads, head_dim, rope);
        cuda_rope(be, k, pos, n, n_kv_heads, head_dim, rope);
        cuda_kv_store(be, k_cache, v_cache, k, v, slots, n, n_kv_heads * head_dim);
        return;
    }
    if (n <= 0 || head_dim <= 0 || n_heads < 0 || n_kv_heads <= 0 || !op_begin(cb)) return;
    const float theta_scale = np ? powf(rope->freq_base, -2.0f / (float)n_rot) : 1.0f;
    const int pairs = head_dim / 2;
    const unsigned threads = pairs >= 128 ? 128 : (unsigned)((pairs + 31) / 32 * 32);
    launch(cb, k_rope_kv, dim3((unsigned)n, (unsigned)(n_heads + n_kv_heads)), threads, q, k, v, (__half *)k_cache,
           (__half *)v_cache, pos, slots, n_heads, n_kv_heads, head_dim, np, theta_scale, rope->freq_scale,
           rope->freq_factors);
}

static void cuda_attention(kern_backend_t *be, const kern_attn_t *a)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (a->n_tokens <= 0 || !op_begin(cb)) return;
    if (a->head_dim <= 0 || a->head_dim > ATT_MAX_HEAD_DIM || a->n_kv_heads <= 0 || a->n_heads <= 0 ||
        a->n_heads % a->n_kv_heads || a->block_size <= 0) {
        note_error(cb, FL_EUNSUPPORTED,
                   "cuda backend: attention with head_dim %d, %d heads, %d KV heads, block size %d is not supported "
                   "(head_dim <= %d, heads a multiple of KV heads)",
                   a->head_dim, a->n_heads, a->n_kv_heads, a->block_size, ATT_MAX_HEAD_DIM);
        return;
    }
    const int64_t blocks = (int64_t)a->n_tokens * a->n_heads;
    if (blocks > INT_MAX) {
        note_error(cb, FL_ERANGE, "cuda backend: attention over %d tokens x %d heads is too large", a->n_tokens,
                   a->n_heads);
        return;
    }
    const int group = a->n_heads / a->n_kv_heads;
    if (cb->tiled_attn && a->n_seqs > 0 && a->n_tokens >= KERN_ATTN_RUN_MIN * a->n_seqs && a->head_dim % 8 == 0 &&
        a->head_dim <= TA_MAX_HD && group <= TA_ROWS) { /* prefill: runs of many tokens of one sequence */
        const int qt = TA_ROWS / group;
        launch(cb, k_attention_tiled, dim3((unsigned)((a->n_tokens + qt - 1) / qt), (unsigned)a->n_kv_heads),
               TA_THREADS, a->out, a->q, (const __half *)a->k_cache, (const __half *)a->v_cache, a->tok_seq,
               a->tok_pos, a->block_tables, a->max_blocks, a->block_size, a->n_tokens, a->n_heads, a->n_kv_heads,
               a->head_dim, a->scale, a->tree_mask, a->tree_start, qt);
        return;
    }
    /* Contexts longer than ATT_SPLIT_SPAN positions are split over up to ATT_MAX_SPLITS blocks a
     * (token, head) where the (token, head) pairs alone leave multiprocessors idle, the grid staying
     * within two waves of k_attention<false> (the lanes kernel, which runs split grids, holds fewer
     * blocks: at batch 1 that is 32 shares, about four of its waves, the configuration measured): a
     * 4,096-position context is otherwise 32 blocks of 8 warps walking 512 positions each (H200, 8B
     * shape, one lease: split in 32, 188.1 tok/s on the lanes kernel and 169.2 on the per-position
     * one, against 141.5 whole on the lanes kernel). At batch 8 (256 pairs) the grid covers the
     * device already and is left whole (the lanes kernel whole: 550.3 tok/s; split in 5 on the
     * per-position loop: 407.0). Sized by the class of max_len (a recorded step stays valid within
     * it); blocks split the real lengths. */
    int splits = 1;
    if (cb->split_attn && a->max_len > ATT_SPLIT_SPAN && blocks < cb->sms) {
        const int64_t span = (int64_t)1 << kern_attn_len_class(a->max_len);
        const int64_t by_len = (span + ATT_SPLIT_SPAN - 1) / ATT_SPLIT_SPAN;
        const int64_t by_fill = 2 * (int64_t)cb->attn_blocks / blocks;
        splits = (int)(by_len < by_fill ? by_len : by_fill);
        if (splits > ATT_MAX_SPLITS) splits = ATT_MAX_SPLITS;
        if (splits < 1) splits = 1;
    }
    if (splits > 1) {
        const size_t th = (size_t)blocks, part_bytes = th * splits * ((size_t)a->head_dim + 2) * sizeof(float);
        if (!grow_device(cb, (void **)&cb->attn_part, &cb->attn_part_cap, part_bytes, "split attention", true))
            return;
        const size_t had = cb->attn_arrived_cap;
        if (!grow_device(cb, (void **)&cb->attn_arrived, &cb->attn_arrived_cap, th * sizeof(unsigned),
                         "split attention", true))
            return;
        if (cb->attn_arrived_cap != had)
            OP_CUDA(cb, cudaMemsetAsync(cb->attn_arrived, 0, cb->attn_arrived_cap, cb->stream));
    }
    /* The lanes kernel holds more registers (2 blocks an SM against 5): it pays where few (token, head)
     * pairs leave the device latency-bound (8B shape, 16-80 positions: 228.2 against 222.1 tok/s at
     * b=1; 4,096 positions: above), and loses where many would fill it with the other kernel (b=64
     * and 256 at 16-80 positions: 8,499 and 15,645 against 8,803 and 16,425). A split grid has
     * fewer pairs than multiprocessors, so it always takes the lanes kernel. */
    const bool lanes = a->head_dim % 8 == 0 &&
                       (cb->lane_attn == 1 || (cb->lane_attn < 0 && blocks <= cb->lane_attn_blocks));
    launch(cb, lanes ? k_attention<true> : k_attention<false>, dim3((unsigned)blocks, (unsigned)splits),
           ATT_WARPS * 32, a->out, a->q, (const __half *)a->k_cache, (const __half *)a->v_cache, a->tok_seq,
           a->tok_pos, a->block_tables, a->max_blocks, a->block_size, a->n_heads, a->n_kv_heads, a->head_dim,
           a->scale, a->tree_mask, a->tree_start, splits > 1 ? cb->attn_part : (float *)NULL,
           splits > 1 ? cb->attn_arrived : (unsigned *)NULL);
}

static void cuda_swiglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_swiglu, grid_for((size_t)n, EW_THREADS), EW_THREADS, out, gate, up, (size_t)n);
}

static void cuda_add(kern_backend_t *be, float *y, const float *x, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_add, grid_for((size_t)n, EW_THREADS), EW_THREADS, y, x, (size_t)n);
}

/* ------------------------------------------------------------------------------------------------
 * Sampling, on the device: an argmax kernel for every row (lowest id on ties, as the CPU), then
 * sample_cuda.cu's draw over the stochastic rows, which replaces their ids; only the ids come back.
 * Both follow kernels/sampling.h's definition, so the draw equals the CPU backend's on equal logits. */

static void cuda_sample(kern_backend_t *be, int32_t *out, const float *logits, int n, int vocab,
                        const kern_sampling_t *params)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0) return;
    for (int i = 0; i < n; i++) out[i] = 0;
    if (vocab <= 0 || !op_begin(cb)) return;
    if (!grow_device(cb, (void **)&cb->d_ids, &cb->ids_cap, (size_t)n * sizeof(int32_t), "sampled ids", false)) return;
    if (!grow_device(cb, (void **)&cb->d_keys, &cb->keys_cap, (size_t)n * sizeof(unsigned long long), "argmax keys",
                     false))
        return;
    OP_CUDA(cb, cudaMemsetAsync(cb->d_keys, 0, (size_t)n * sizeof(unsigned long long), cb->stream));
    const int per_block = ARGMAX_THREADS * ARGMAX_PER_THREAD;
    launch(cb, k_argmax_part, dim3((unsigned)n, (unsigned)((vocab + per_block - 1) / per_block)), ARGMAX_THREADS,
           cb->d_keys, logits, vocab);
    launch(cb, k_argmax_ids, (unsigned)((n + 255) / 256), 256, cb->d_ids, (const unsigned long long *)cb->d_keys, n);
    bool stochastic = false;
    for (int i = 0; i < n; i++) stochastic |= kern_sample_is_stochastic(&params[i]) && vocab > 1;
    if (stochastic) {
        const size_t bytes = (size_t)n * sizeof(cuda_sample_row_t);
        const size_t old_cap = cb->rows_cap;
        if (!grow_device(cb, (void **)&cb->d_rows, &cb->rows_cap, bytes, "sampling parameters", false)) return;
        if (cb->rows_cap != old_cap || !cb->h_rows) {
            cuda_sample_row_t *h = (cuda_sample_row_t *)realloc(cb->h_rows, cb->rows_cap);
            if (!h) {
                note_error(cb, FL_ENOMEM, "cuda backend: out of host memory for sampling parameters");
                return;
            }
            cb->h_rows = h;
        }
        for (int i = 0; i < n; i++) {
            const kern_sampling_t *p = &params[i];
            cuda_sample_row_t *r = &cb->h_rows[i];
            r->active = kern_sample_is_stochastic(p);
            r->u = kern_sample_uniform(p->seed, p->position);
            r->inv_t = r->active ? 1.0f / p->temperature : 0.0f; /* as kern_sample_row rounds it */
            r->top_p = p->top_p;
            r->top_k = p->top_k;
        }
        /* Pageable source: the copy has read h_rows when the call returns. */
        OP_CUDA(cb, cudaMemcpyAsync(cb->d_rows, cb->h_rows, bytes, cudaMemcpyHostToDevice, cb->stream));
        OP_CUDA(cb, cuda_sample_launch(logits, n, vocab, cb->d_rows, cb->d_ids, cb->stream));
    }
    OP_CUDA(cb, cudaMemcpyAsync(out, cb->d_ids, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost, cb->stream));
    OP_CUDA(cb, cudaStreamSynchronize(cb->stream));
    if (cb->first.code)
        for (int i = 0; i < n; i++) out[i] = 0;
}

/* ------------------------------------------------------------------------------------------------
 * Creation */

static void cuda_destroy(kern_backend_t *be)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!cb) return;
    cudaSetDevice(cb->device);
    if (cb->stream) cudaStreamSynchronize(cb->stream);
    for (int i = 0; i < MM_PLANS; i++) plan_release(&cb->plans[i]);
    for (int i = 0; i < GRAPH_SLOTS; i++)
        if (cb->graph[i].exec) cudaGraphExecDestroy(cb->graph[i].exec);
    if (cb->xh) cudaFree(cb->xh);
    if (cb->d_ids) cudaFree(cb->d_ids);
    if (cb->d_keys) cudaFree(cb->d_keys);
    if (cb->attn_part) cudaFree(cb->attn_part);
    if (cb->attn_arrived) cudaFree(cb->attn_arrived);
    if (cb->workspace) cudaFree(cb->workspace);
    if (cb->lt) cublasLtDestroy(cb->lt);
    if (cb->stream) cudaStreamDestroy(cb->stream);
    if (cb->d_rows) cudaFree(cb->d_rows);
    free(cb->h_rows);
    free(cb);
}

/* ------------------------------------------------------------------------------------------------
 * CUDA graphs: a decode step is ~15 launches a layer, each a few microseconds of host time, which is
 * most of a step for a small model; replaying a recording is one launch. */

static void graph_drop(cuda_graph_t *g)
{
    if (g->exec) cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
}

static int cuda_graph_begin(kern_backend_t *be, uint64_t key)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!cb->graphs || cb->first.code || cb->capturing || cb->replaying) return 0;
    cuda_graph_t *g = NULL, *lru = &cb->graph[0];
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        if (cb->graph[i].seen && cb->graph[i].key == key) g = &cb->graph[i];
        if (cb->graph[i].used < lru->used) lru = &cb->graph[i];
    }
    if (!g) { /* first sight: run directly */
        graph_drop(lru);
        lru->key = key;
        lru->seen = 1;
        lru->gen = cb->buf_gen;
        lru->used = ++cb->graph_clock;
        return 0;
    }
    g->used = ++cb->graph_clock;
    if (g->gen != cb->buf_gen) { /* a buffer it uses has moved: record again (a failure may not recur) */
        if (g->exec) cudaGraphExecDestroy(g->exec);
        g->exec = NULL;
        g->no_capture = false;
    }
    if (g->exec) {
        cb->replaying = g;
        return 1;
    }
    g->seen++;
    if (g->no_capture || cudaSetDevice(cb->device) != cudaSuccess ||
        cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    cb->capturing = g;
    cb->capture_failed = false;
    return 0;
}

static int cuda_graph_end(kern_backend_t *be)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (cb->replaying) {
        cuda_graph_t *g = cb->replaying;
        cb->replaying = NULL;
        OP_CUDA(cb, cudaGraphLaunch(g->exec, cb->stream));
        return 0;
    }
    cuda_graph_t *g = cb->capturing;
    if (!g) return 0;
    cb->capturing = NULL;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(cb->stream, &graph);
    cudaGraphExec_t exec = NULL;
    if (e == cudaSuccess && !cb->capture_failed && !cb->first.code) e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess || cb->capture_failed || cb->first.code || !exec) {
        (void)cudaGetLastError();
        if (exec) cudaGraphExecDestroy(exec);
        g->no_capture = !cb->first.code; /* this step cannot be recorded: run it directly, until buffers move */
        g->gen = cb->buf_gen;
        cb->capture_failed = false;
        return cb->first.code ? 0 : KERN_GRAPH_RETRY;
    }
    g->exec = exec;
    g->gen = cb->buf_gen;
    OP_CUDA(cb, cudaGraphLaunch(g->exec, cb->stream));
    return 0;
}

static int cuda_mem_info(kern_backend_t *be, size_t *free_bytes, size_t *total_bytes)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (cudaSetDevice(cb->device) != cudaSuccess || cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        return FL_EBACKEND;
    }
    return FL_OK;
}

static void cuda_graph_reset(kern_backend_t *be)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    for (int i = 0; i < GRAPH_SLOTS; i++) graph_drop(&cb->graph[i]);
}

static const kern_ops_t cuda_ops = {
    "cuda",
    cuda_destroy,
    cuda_alloc,
    cuda_free,
    cuda_upload,
    cuda_download,
    cuda_sync,
    cuda_weight_new,
    cuda_weight_destroy,
    cuda_embed,
    cuda_matmul,
    cuda_matmul_multi,
    cuda_rmsnorm,
    cuda_rope,
    cuda_kv_store,
    cuda_attention,
    cuda_swiglu,
    cuda_add,
    cuda_sample,
    cuda_add_rmsnorm,
    cuda_rope_kv_store,
    cuda_matmul_swiglu,
    cuda_graph_begin,
    cuda_graph_end,
    cuda_graph_reset,
    cuda_mem_info,
};

static int probe_device(int device, fl_error_t *err)
{
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count), err);
    if (device < 0 || device >= count)
        return fl_fail(err, FL_ENOTFOUND, "CUDA device %d not present (%d devices)", device, count);
    CUDA_CHECK(cudaSetDevice(device), err);
    return FL_OK;
}

static int cuda_setup(cuda_backend_t *cb, fl_error_t *err)
{
    CUDA_CHECK(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), err);
    CUBLAS_CHECK(cublasLtCreate(&cb->lt), err);
    int major = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cb->device), err);
    cb->pdl = cb->pdl && major >= 9; /* programmatic dependent launch is Hopper's */
    int sms = 0, per_sm = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cb->device), err);
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_attention<true>, ATT_WARPS * 32, 0), err);
    cb->lane_attn_blocks = sms * per_sm;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_attention<false>, ATT_WARPS * 32, 0), err);
    cb->attn_blocks = sms * per_sm;
    cb->sms = sms;
    if (cudaMalloc(&cb->workspace, WORKSPACE_BYTES) != cudaSuccess) {
        (void)cudaGetLastError();
        cb->workspace = NULL;
        return fl_fail(err, FL_ENOMEM, "CUDA out of memory allocating %zu MiB for the cuBLASLt workspace",
                       WORKSPACE_BYTES >> 20);
    }
    return FL_OK;
}

extern "C" bool kern_cuda_module_available(void)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return count >= 1;
}

extern "C" kern_backend_t *kern_cuda_module_new(int device, fl_error_t *err)
{
    if (probe_device(device, err)) return NULL;
    cuda_backend_t *cb = (cuda_backend_t *)calloc(1, sizeof *cb);
    if (!cb) {
        fl_fail(err, FL_ENOMEM, "cuda backend: out of memory");
        return NULL;
    }
    cb->base.ops = &cuda_ops;
    cb->base.n_threads = 1;
    cb->device = device;
    const char *gemv = getenv("FOLIO_CUDA_GEMV"), *graphs = getenv("FOLIO_CUDA_GRAPHS");
    cb->gemv = !(gemv && !strcmp(gemv, "0"));
    const char *qgemv = getenv("FOLIO_CUDA_QGEMV");
    cb->qgemv = cb->gemv && qgemv && !strcmp(qgemv, "1");
    cb->graphs = !(graphs && !strcmp(graphs, "0"));
    const char *pdl = getenv("FOLIO_CUDA_PDL");
    cb->pdl = !(pdl && !strcmp(pdl, "0"));
    const char *tiled = getenv("FOLIO_CUDA_TILED_ATTN");
    cb->tiled_attn = !(tiled && !strcmp(tiled, "0"));
    const char *lanes = getenv("FOLIO_CUDA_LANE_ATTN");
    cb->lane_attn = lanes && !strcmp(lanes, "1") ? 1 : lanes && !strcmp(lanes, "0") ? 0 : -1;
    const char *early = getenv("FOLIO_CUDA_GEMV_EARLY");
    cb->gemv_early = early && !strcmp(early, "1");
    const char *split = getenv("FOLIO_CUDA_SPLIT_ATTN");
    cb->split_attn = !(split && !strcmp(split, "0"));
    if (cuda_setup(cb, err)) {
        cuda_destroy(&cb->base);
        return NULL;
    }
    return &cb->base;
}
