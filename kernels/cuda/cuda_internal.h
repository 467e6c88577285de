/* cuda_internal.h - private types and helpers shared by the CUDA backend's files (not part of kernels.h).
 *
 * The CUDA backend (libfolio_cuda.so) is split by job, as the CPU backend is: cuda_backend.cu (memory,
 * weights, CUDA graphs, the ops table, creation), cuda_matmul.cu (the single-token GEMV and cuBLASLt
 * products), cuda_attention.cu (paged decode, split and tiled prefill attention), cuda_small_ops.cu
 * (embed, norms, RoPE, KV store, SwiGLU, add, and their fused forms), cuda_sampling.cu (the sample op:
 * argmax, then sample_cuda.cu's draw). This header holds what they share: the checking macros, the
 * backend struct, and the launch helpers every op uses.
 *
 * Errors: setup code returns a status through CUDA_CHECK / CUBLAS_CHECK; the ops return void, so
 * OP_CUDA / OP_CUBLAS record the first failure in the backend (note_error), later ops skip their work
 * (op_begin) and sync() reports it.
 *
 * Threads: one thread (the model's) calls every op; the backend and its scratch are that thread's. */
#ifndef FOLIO_CUDA_INTERNAL_H
#define FOLIO_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "../backend_internal.h"
#include "sample_cuda.h"

/* Shared between the module's files, not exported from it: kernels/backend.c finds only the
 * kern_cuda_module_* entry points. */
#pragma GCC visibility push(hidden)

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
    cuda_sample_adjust_t adjust;        /* the rows' logit adjustments, staged for the device */
    cuda_sample_mask_t mask;            /* the rows' allowed-token masks, staged likewise */
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
                                         * (FOLIO_CUDA_GEMV_EARLY=1: on; slower, bench/README.md) */
    void *gelu_table;                   /* kernels/gelu.h's table, device (kern_geglu) */
    cuda_graph_t graph[GRAPH_SLOTS];
    uint64_t graph_clock;               /* LRU stamp */
    unsigned buf_gen;                   /* bumped when a scratch buffer moves: recordings hold old pointers */
    cuda_graph_t *capturing, *replaying;
    bool capture_failed;                /* something during the recording could not be recorded */
} cuda_backend_t;

/* Records the first error of a void op (later ones are dropped: the first is the cause). */
__attribute__((format(printf, 3, 4))) void note_error(cuda_backend_t *cb, int code, const char *fmt, ...);

/* True when the op may run: no error recorded and the calling thread talks to our device. */
static inline bool op_begin(cuda_backend_t *cb)
{
    if (cb->first.code || cb->replaying) return false; /* replaying: the recording does the work */
    OP_CUDA(cb, cudaSetDevice(cb->device));
    return cb->first.code == 0;
}

static inline unsigned grid_for(size_t n, unsigned threads)
{
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g > 65535 * 16 ? 65535 * 16 : g < 1 ? 1 : g);
}

/* Grows a device scratch buffer to at least `bytes` (rarely: 1.5x the need). */
/* in_graphs: recorded steps use the buffer (they hold its address, so a move invalidates them). */
bool grow_device(cuda_backend_t *cb, void **p, size_t *cap, size_t bytes, const char *what, bool in_graphs);

/* ------------------------------------------------------------------------------------------------
 * Programmatic dependent launch (Hopper): a kernel may start while the one before it on the stream
 * still runs. Every kernel here first lets its successor launch (pdl_trigger), then waits for its
 * predecessor to finish and its writes to show (pdl_wait) before it touches anything. A decode step
 * at batch 1 is a chain of ~260 dependent kernels: the next one's launch and block start-up then
 * overlap the current one's tail. Pulling the GEMV's weight rows into L2 before the wait was tried
 * and made steps slower, so it was removed (bench/README.md has both measurements). Safe by
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

/* ---- matmul (cuda_matmul.cu) ---- */

void cuda_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n);
void cuda_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                       int n);
void cuda_matmul_swiglu(kern_backend_t *be, float *out, float *up, const kern_weight_t *w_gate,
                        const kern_weight_t *w_up, int rows, const float *x, int n);
/* Drops the cached cuBLASLt plans (at destroy). */
void cuda_matmul_release(cuda_backend_t *cb);

/* ---- attention (cuda_attention.cu) ---- */

void cuda_attention(kern_backend_t *be, const kern_attn_t *a);
/* Sizes the launch rules by the device: the decode kernels' resident blocks on `sms` multiprocessors. */
int cuda_attention_setup(cuda_backend_t *cb, int sms, fl_error_t *err);

/* ---- small ops (cuda_small_ops.cu) ---- */

void cuda_embed(kern_backend_t *be, float *out, const kern_weight_t *table, const int32_t *ids, int n);
void cuda_rmsnorm(kern_backend_t *be, float *y, const float *x, const float *weight, int n, int dim, float eps);
void cuda_add_rmsnorm(kern_backend_t *be, float *y, float *x, const float *delta, const float *weight, int n, int dim,
                      float eps);
void cuda_rope(kern_backend_t *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
               const kern_rope_t *rope);
/* KV pools of F16, Q8_0 or Q4_0 (kernels.h), K and V each their own; anything else is refused with
 * FL_EUNSUPPORTED. */
bool cuda_kv_types_ok(cuda_backend_t *cb, int k_type, int v_type);

/* A KV pool as the kernels read it: one token's row is row_bytes, element e of a row is element e of
 * its F16 array, or of its GGUF blocks of 32 (a Q8_0 block: f16 d, then 32 int8; Q4_0: f16 d, then 16
 * bytes whose low nibbles are elements 0-15 and high nibbles 16-31, each nibble - 8), value q * d as
 * ggml's dequantize_row_* computes it. */
struct kv_pool {
    const uint8_t *base;
    size_t row_bytes;
    int type;
};

static inline kv_pool kv_pool_of(const void *base, int type, int kv_dim)
{
    kv_pool p;
    p.base = (const uint8_t *)base;
    p.type = kern_kv_type(type);
    p.row_bytes = kern_kv_row_bytes(p.type, kv_dim);
    return p;
}

/* Element e of the row at slot, as a float. */
__device__ __forceinline__ float kv_load1(const kv_pool &p, int32_t slot, int e)
{
    const uint8_t *row = p.base + (size_t)slot * p.row_bytes;
    if (p.type == FL_TYPE_F16) return __half2float(((const __half *)row)[e]);
    const int j = e & 31;
    if (p.type == FL_TYPE_Q8_0) {
        const uint8_t *blk = row + (size_t)(e >> 5) * 34;
        return (float)(int8_t)blk[2 + j] * __half2float(*(const __half *)blk);
    }
    const uint8_t *blk = row + (size_t)(e >> 5) * 18;
    return (float)((int)((blk[2 + (j & 15)] >> (j < 16 ? 0 : 4)) & 15) - 8) * __half2float(*(const __half *)blk);
}

/* Elements e .. e+7 of the row at slot (e a multiple of 8: one aligned 16-byte load for F16, 8 bytes
 * of one block for the quantized types, read as 2-byte words since blocks are 34 or 18 bytes). */
__device__ __forceinline__ void kv_load8(const kv_pool &p, int32_t slot, int e, float f[8])
{
    const uint8_t *row = p.base + (size_t)slot * p.row_bytes;
    if (p.type == FL_TYPE_F16) {
        const uint4 u = *(const uint4 *)(row + (size_t)e * 2);
        const __half2 *h = (const __half2 *)&u;
#pragma unroll
        for (int t = 0; t < 4; t++) {
            const float2 x = __half22float2(h[t]);
            f[2 * t] = x.x, f[2 * t + 1] = x.y;
        }
        return;
    }
    const int j = e & 31;
    const bool q8 = p.type == FL_TYPE_Q8_0;
    const uint8_t *blk = row + (size_t)(e >> 5) * (q8 ? 34 : 18);
    const float d = __half2float(*(const __half *)blk);
    const unsigned short *w = (const unsigned short *)(blk + 2 + (q8 ? j : (j & 15)));
    const int shift = j < 16 ? 0 : 4;
#pragma unroll
    for (int t = 0; t < 4; t++) {
        const unsigned x = w[t];
        if (q8) {
            f[2 * t] = (float)(int8_t)(x & 0xffu) * d;
            f[2 * t + 1] = (float)(int8_t)(x >> 8) * d;
        } else {
            f[2 * t] = (float)((int)((x >> shift) & 15u) - 8) * d;
            f[2 * t + 1] = (float)((int)((x >> (8 + shift)) & 15u) - 8) * d;
        }
    }
}
void cuda_kv_store(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const float *k,
                   const float *v, const int32_t *slots, int n, int kv_dim);
void cuda_rope_kv_store(kern_backend_t *be, float *q, float *k, const float *v, void *k_cache, void *v_cache,
                        int k_type, int v_type, const int32_t *pos, const int32_t *slots, int n, int n_heads, int n_kv_heads, int head_dim,
                        const kern_rope_t *rope);
void cuda_kv_move(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const int32_t *src_slots,
                  const int32_t *dst_slots, int n, int kv_dim);
void cuda_swiglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n);
void cuda_add(kern_backend_t *be, float *y, const float *x, int n);
void cuda_add_bias(kern_backend_t *be, float *y, const float *bias, int n, int dim);
void cuda_scale(kern_backend_t *be, float *x, float s, int n);
void cuda_softcap(kern_backend_t *be, float *x, float cap, int n);
void cuda_geglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n);

/* ---- sampling (cuda_sampling.cu) ---- */

void cuda_sample(kern_backend_t *be, int32_t *out, float *logits, int n, int vocab,
                 const kern_sampling_t *params);

#pragma GCC visibility pop

#endif
