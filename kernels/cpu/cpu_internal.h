/* cpu_internal.h - private types shared by the CPU backend's files (not part of kernels.h).
 *
 * The CPU backend is split by job: cpu_backend.c (creation, small element-wise ops, embed, sampling),
 * cpu_pool.c (the thread pool), cpu_matmul.c (quantized and float matrix products, BLAS path),
 * cpu_attention.c (paged attention, KV store). Tests include this header to force an ISA and to
 * reach the scalar reference paths.
 *
 * Threads: every op is called from one thread (the model's), which owns the backend and all its
 * scratch. During a pool dispatch the workers only touch the job they were handed and their own
 * per-thread scratch slot (index = thread id). */
#ifndef FOLIO_CPU_INTERNAL_H
#define FOLIO_CPU_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../backend_internal.h"

/* Instruction sets the CPU kernels have paths for. Selected once at kern_cpu_new() from
 * __builtin_cpu_supports(), capped by the environment variable FOLIO_CPU_ISA=scalar|avx2|avx512.
 * All three paths give bit-identical results (the float operations and their order are the same;
 * only the integer parts, which are exact, are computed differently), and those results are
 * llama.cpp's (ggml CPU, AVX-512 build) bit for bit: see cpu_matmul.c, cpu_attention.c and
 * cpu_backend.c for the orders. The kernel files build with fp-contract off: every fused multiply-add
 * is written out where ggml's compiled code has one. */
typedef enum { CPU_ISA_SCALAR = 0, CPU_ISA_AVX2 = 1, CPU_ISA_AVX512 = 2 } cpu_isa_t;

/* ---- thread pool (cpu_pool.c) ---- */

/* A task runs on every pool thread; ith is 0 for the calling thread. */
typedef void (*cpu_task_fn)(void *arg, int ith, int nth);
typedef struct cpu_pool cpu_pool_t;

cpu_pool_t *cpu_pool_new(int n_threads, fl_error_t *err);
void cpu_pool_destroy(cpu_pool_t **pp);
int cpu_pool_size(const cpu_pool_t *p);
/* Runs fn(arg, i, n) on all n threads (the caller is thread 0) and returns when all are done. */
void cpu_pool_run(cpu_pool_t *p, cpu_task_fn fn, void *arg);
/* How many cpu_pool_run calls went to the worker threads (none do in a pool of one): how a test
 * tells that an op used the pool, whose results are the same bits without it. */
uint64_t cpu_pool_dispatches(const cpu_pool_t *p);

/* Runs fn(ctx, i0, i1) over [0, n) split into one contiguous range per thread, each range a
 * multiple of align (but the last); on the caller alone when n < min_parallel. */
typedef void (*cpu_range_fn)(void *ctx, int64_t i0, int64_t i1);
void cpu_pool_range(cpu_pool_t *p, int64_t n, int64_t align, int64_t min_parallel, cpu_range_fn fn, void *ctx);

/* ---- weights and backend ---- */

struct kern_weight {
    int type;
    int64_t rows, cols;
    const uint8_t *data; /* borrowed from the file mapping */
    size_t row_bytes;
    uint8_t *packed;     /* owned: quantized rows repacked for the AVX-512 kernel (cpu_packed.c), or NULL */
};

typedef struct cpu_backend {
    kern_backend_t base;
    cpu_isa_t isa;
    cpu_pool_t *pool;
    int blas_min_n;       /* matmul with n >= this uses dequantize + sgemm; INT32_MAX: never */
    bool repack;          /* weight_new repacks quantized weights (AVX-512 VNNI path, cpu_packed.c) */
    int64_t max_cols;     /* largest weight cols seen by weight_new (sizes the BLAS panels) */

    /* matmul: activations converted to the weight's vec-dot type (grown, never shrunk) */
    void *act;
    size_t act_bytes;
    /* Prompt rows (kern_set_prompt_rows) and their summation order: prompt_block (FOLIO_CPU_PROMPT=block)
     * sums them per 32-block (cpu_prompt_act_t), else in ggml's order like every other row (default). */
    bool prompt_block;
    bool amx;                   /* AMX tiles for the prompt order (granted by the kernel; FOLIO_CPU_AMX=0: off) */
    const uint8_t *prompt_rows;
    int prompt_n;
    void *pact;                 /* cpu_prompt_act_t's arrays */
    size_t pact_bytes;
    void *split;                /* a mixed call's rows, gathered by role */
    size_t split_bytes;
    void *full_rows;            /* matmul_rows: the activation rows that want every output, gathered */
    size_t full_rows_bytes;
    float **pstate;             /* per thread: AMX prompt tiles' state */
    size_t *pstate_bytes;
    /* BLAS path: per-thread f32 panel of dequantized weight rows */
    float **panel;
    size_t panel_floats;
    /* attention: per-thread score rows */
    float **scores;
    size_t scores_len;
    /* sampling scratch [vocab] */
    void *samp_scratch; /* kern_sample_row's candidates */
    size_t samp_len;
} cpu_backend_t;

/* Grows *buf (64-byte aligned, zeroed, old contents dropped) to at least bytes; 0 or FL_ENOMEM. */
int cpu_grow(void **buf, size_t *cap, size_t bytes);

/* ---- matmul (cpu_matmul.c) ---- */

void cpu_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n);
/* kern_matmul_rows: rows wanting every output in one cpu_matmul (gathered), the chosen outputs of
 * the others in ggml's order on the calling thread (the tiles of any ISA, equal to the packed
 * kernel's bits). */
void cpu_matmul_rows(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n,
                     const int32_t *const *ids, const int32_t *n_ids);
void cpu_set_prompt_rows(kern_backend_t *be, const uint8_t *prompt_rows, int n);
/* n_w products of one x: one activation quantization and one dispatch when the weights are packed,
 * of one type and width; otherwise cpu_matmul per weight. Same bits either way. */
void cpu_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                      int n);
/* Sizes the per-thread BLAS panels for weights of cols columns; called from weight_new. */
int cpu_matmul_reserve(cpu_backend_t *cb, int64_t cols);
/* The n at and above which the BLAS path is faster (measured; see cpu_matmul.c). */
int cpu_matmul_default_blas_min_n(void);

/* An exact integer lane l (|l| < 2^22) becomes a float without vcvtdq2ps: a vpdpbusd that starts
 * from CPU_LANE_MAGIC (the bits of 1.5 * 2^23) leaves the bits of the float 1.5 * 2^23 + l, and
 * subtracting CPU_LANE_MAGIC_F gives l exactly (Sterbenz). The packed matmul and the quantized-KV K
 * dots both use it. */
#define CPU_LANE_MAGIC 0x4B400000
#define CPU_LANE_MAGIC_F 12582912.0f

/* ---- packed AVX-512 VNNI matmul (cpu_packed.c) ---- */

/* Bytes of one packed chunk (16 rows x 1 block) of a Q4_0/Q4_1/Q8_0 weight; 0 for other types. */
size_t cpu_pack_chunk_bytes(int type);
/* The packed copy of a quantized weight (64-byte aligned, free()), or NULL (type or out of memory). */
uint8_t *cpu_pack_weight(int type, int64_t rows, int64_t cols, const uint8_t *data, size_t row_bytes);
/* xinit[8 * b + k] = CPU_LANE_MAGIC + mult * (sum of the 4 activation quants of
 * lane k of block b): the vpdpbusd start, which also makes its result a float (cpu_packed.c); AVX-512 only. */
void cpu_pack_act_init(const int8_t *qs, int nb, int mult, int32_t *xinit);
/* Prompt-order activations (cpu_matmul.c's qdot_prompt_scalar is the definition: per block one exact
 * integer sum S, acc = fma(d_w * d_x, (float)S, acc), for Q4_1 also sm = fma(m_w, s_x, sm), result
 * acc (+ sm)), in tiles of 16 tokens: ci[tile][block][16] = CPU_LANE_MAGIC + offset * (block's activation
 * sum) (offset -128 for Q8_0, -8 for Q4_0, 0 for Q4_1), and for AMX the B tiles xt[tile][block][8][16][4]
 * and d, s as dt / st[tile][block][16] (zero past n). */
typedef struct cpu_prompt_act {
    int n, ntt, nb;
    const int32_t *ci;
    const uint8_t *xt; /* NULL without AMX */
    const float *dt, *st;
} cpu_prompt_act_t;
int cpu_prompt_prepare(cpu_backend_t *cb, int type, const int8_t *qs, const float *d, const float *s, int n, int nb,
                       cpu_prompt_act_t *pa);
/* y = x W^T from activations already quantized to the vec-dot type (qs, d, s) plus xinit, in ggml's
 * order, or in the prompt order when pa is not NULL. */
void cpu_matmul_packed(cpu_backend_t *cb, float *y, const kern_weight_t *w, const int8_t *qs, const float *d,
                       const float *s, const int32_t *xinit, const cpu_prompt_act_t *pa, int n);
/* The same for n_w weights of one type and width (all packed), in one pool dispatch. */
void cpu_matmul_packed_multi(cpu_backend_t *cb, float *const *ys, const kern_weight_t *const *ws, int n_w,
                             const int8_t *qs, const float *d, const float *s, const int32_t *xinit,
                             const cpu_prompt_act_t *pa, int n);

/* ---- attention (cpu_attention.c) ---- */

void cpu_attention(kern_backend_t *be, const kern_attn_t *a);
void cpu_kv_move(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const int32_t *src_slots,
                 const int32_t *dst_slots, int n, int kv_dim);
void cpu_kv_store(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const float *k,
                  const float *v, const int32_t *slots, int n, int kv_dim);

/* Both attention paths' work items take runs: tokens of one sequence at consecutive positions (and
 * of one role where role is given) that share each K/V row. Fills runs[0..n] with each run's first
 * token and runs[n] = n_tokens, returns n. A run holds at most run_max tokens (1: every token alone),
 * fewer where pooled threads would get under two items each (items: runs x KV heads), and a span
 * splits into runs of near-equal length so that items weigh about the same (cpu_attention.c). */
int cpu_attn_runs(const kern_attn_t *a, const uint8_t *role, int run_max, bool pooled, int nth, int *runs);

/* ---- attention over quantized KV pools (cpu_attention_q.c) ---- */

/* llama.cpp's flash-attention order (ggml_compute_forward_flash_attn_ext_f16), for any call whose K
 * or V pool is quantized. */
void cpu_attention_q(kern_backend_t *be, const kern_attn_t *a);
/* One KV row of n floats quantized to type (Q8_0, Q4_0) as ggml stores it: ggml's AVX2
 * quantize_row_q8_0, quantize_row_q4_0_ref. */
void cpu_kv_quantize_row(cpu_isa_t isa, int type, void *dst, const float *src, int n);
/* cpu_expf.c: y[i] = expf(x[i]) with the C library's bits, 4 lanes at a time where the lanes were
 * found equal to this libm (cpu_expf_exact), else by calling expf. For x <= 0 (softmax arguments). */
void cpu_expf_batch(const float *x, float *y, int n);
bool cpu_expf_exact(void);
/* cpu_tanhf.c: y[i] = tanhf(x[i]) with the C library's bits, 8 lanes at a time where the lanes were
 * found equal to this libm (cpu_tanhf_exact), else by calling tanhf. Any x; y may be x. */
void cpu_tanhf_batch(float *y, const float *x, int n);
bool cpu_tanhf_exact(void);
/* The lanes alone, whatever the libm (tests compare them with the algorithm itself); nothing is
 * written without cpu_lanes_supported(). */
void cpu_tanhf_lanes(float *y, const float *x, int n);
/* The CPU runs the lanes of cpu_expf.c and cpu_tanhf.c (compiled for CPU_AVX2: AVX2, FMA, F16C). */
static inline bool cpu_lanes_supported(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
/* Lanes y[i] computed from x[i] equal libm(x[i]) bit for bit (any NaN equal to any NaN). */
bool cpu_lanes_equal_libm(float (*libm)(float), const float *x, const float *y, int n);

/* Asks for the cache lines of bytes [p, p + n) (a hint: never a fault). Attention reads the KV rows
 * of a position in scattered blocks, which the hardware's stream prefetch does not follow, and a
 * decode step reads the whole cache once, from memory: latency, not arithmetic, bounded it. */
static inline void prefetch_row(const void *p, size_t n)
{
    const char *line = (const char *)((uintptr_t)p & ~(uintptr_t)63), *end = (const char *)p + n;
    for (; line < end; line += 64) __builtin_prefetch(line, 0, 3);
}

/* Deterministic float helpers shared by matmul and attention: a dot product of n floats summed in 16
 * lanes (element i into lane i % 16, fused multiply-add), the lanes then added pairwise as
 * l[j] + l[j+8], then +4, +2, +1. Every ISA path reproduces exactly this order. */
float cpu_dot16_scalar(const float *a, const float *b, int n);

const char *cpu_isa_name(cpu_isa_t isa);

/* ggml's GELU (kern_geglu's gelu(x)): its f16 table looked up at the f16-rounded x, x past 10, 0
 * below -10. */
float cpu_gelu(float x);


#endif
