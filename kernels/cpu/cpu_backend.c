/* cpu_backend.c - the CPU implementation of kernels.h: creation, weights, element-wise ops, embed
 * and sampling. Matrix products are in cpu_matmul.c, attention in cpu_attention.c.
 *
 * kern_cpu_new() picks the instruction set once (AVX-512 VNNI > AVX2+FMA+F16C > scalar, from
 * __builtin_cpu_supports, capped by FOLIO_CPU_ISA=scalar|avx2|avx512) and starts the thread pool.
 * Weights borrow the file mapping; on AVX-512 VNNI quantized weights are also repacked once into the
 * layout of cpu_packed.c (same size; FOLIO_CPU_REPACK=0 turns it off). Small ops (rmsnorm, rope,
 * swiglu, add on a few thousand floats) run on the calling thread: waking the pool would cost more
 * than the op; batches of them are split over the pool.
 *
 * Numerics follow ggml's CPU ops bit for bit (llama.cpp's AVX-512 build), so that greedy decoding
 * is llama.cpp's:
 *   rmsnorm: sum of x*x (f32 products) in double, scale = 1/sqrtf(mean + eps), y = (x*scale)*w.
 *   rope:    LLAMA_ROPE_TYPE_NORM, adjacent pairs; theta_scale = powf(base, -2/n_rot) multiplied in
 *            iteratively, theta = freq_scale * (theta_base / freq_factor), cosf/sinf; the rotation as
 *            GCC contracts ggml's: x0' = fma(x0, cos, -(x1 sin)), x1' = fma(x0, sin, x1 cos).
 *   swiglu:  ggml_vec_swiglu_f32: silu(g) * u with silu(x) = x / (1 + v_expf(-x)), v_expf being
 *            ggml's vectorised exp polynomial (cpu_v_expf*, cpu_simd.h); expf on a n % 16 tail.
 * Element-wise ops over a batch are split over the pool (one range per thread); the results do not
 * depend on the split.
 *
 * Sampling is a pure function of (logits, params): see kernels/sampling.c, shared with CUDA;
 * the CUDA backend must reproduce it (or run this code on downloaded logits). */
#pragma GCC optimize("fp-contract=off")

#include <cblas.h>
#include <cpuid.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../../common/quant.h"
#include "../gelu.h"
#include "cpu_internal.h"
#include "cpu_simd.h"
#include "sampling.h"

/* ------------------------------------------------------------------------------------------------
 * Memory */

/* Buffers are 64-byte aligned and zeroed. Large ones (the KV pools) come straight from mmap, whose
 * pages are zero and become resident only when first written, so a 64 MiB KV budget costs memory
 * only for the blocks in use. A header just below each buffer says how to free it. */
typedef struct alloc_header {
    void *base;
    size_t total;
    int mapped;
} alloc_header_t;

#define ALLOC_HEADER 64
#define ALLOC_MMAP_MIN ((size_t)1 << 20)

static void *cpu_alloc(kern_backend_t *be, size_t bytes)
{
    const size_t n = ((bytes ? bytes : 1) + 63) & ~(size_t)63;
    if (n >= ALLOC_MMAP_MIN) {
        const size_t page = 4096, total = n + page;
        char *base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) return NULL;
        char *p = base + page;
        *(alloc_header_t *)(p - ALLOC_HEADER) = (alloc_header_t){base, total, 1};
        return p;
    }
    char *base = aligned_alloc(64, n + ALLOC_HEADER);
    if (!base) return NULL;
    memset(base, 0, n + ALLOC_HEADER);
    char *p = base + ALLOC_HEADER;
    *(alloc_header_t *)(p - ALLOC_HEADER) = (alloc_header_t){base, n + ALLOC_HEADER, 0};
    return p;
}

static void cpu_free(kern_backend_t *be, void *p)
{
    if (!p) return;
    const alloc_header_t h = *(alloc_header_t *)((char *)p - ALLOC_HEADER);
    if (h.mapped) munmap(h.base, h.total);
    else free(h.base);
}

static int cpu_copy(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    if (bytes) memmove(dst, src, bytes);
    return 0;
}

static int cpu_sync(kern_backend_t *be, fl_error_t *err) { return 0; }

/* ------------------------------------------------------------------------------------------------
 * Weights */

static kern_weight_t *cpu_weight_new(kern_backend_t *be, int type, int64_t rows, int64_t cols, const void *data,
                                     fl_error_t *err)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    const size_t row_bytes = kern_weight_check("cpu", type, rows, cols, data, err);
    if (!row_bytes) return NULL;
    kern_weight_t *w = calloc(1, sizeof *w);
    if (!w) {
        fl_fail(err, FL_ENOMEM, "cpu backend: out of memory for a weight");
        return NULL;
    }
    *w = (kern_weight_t){.type = type, .rows = rows, .cols = cols, .data = data, .row_bytes = row_bytes};
    if (cb->repack && cpu_pack_chunk_bytes(type)) {
        w->packed = cpu_pack_weight(type, rows, cols, data, row_bytes);
        if (!w->packed) {
            free(w);
            fl_fail(err, FL_ENOMEM, "cpu backend: out of memory repacking a %lld x %lld weight", (long long)rows,
                    (long long)cols);
            return NULL;
        }
    }
    if (cb->blas_min_n < INT32_MAX && cpu_matmul_reserve(cb, cols)) {
        free(w);
        fl_fail(err, FL_ENOMEM, "cpu backend: out of memory for BLAS panels of %lld columns", (long long)cols);
        return NULL;
    }
    return w;
}

static void cpu_weight_destroy(kern_backend_t *be, kern_weight_t *w)
{
    if (!w) return;
    free(w->packed);
    free(w);
}

static void cpu_embed(kern_backend_t *be, float *out, const kern_weight_t *t, const int32_t *ids, int n)
{
    for (int i = 0; i < n; i++) {
        float *o = out + (size_t)i * t->cols;
        if (ids[i] < 0 || ids[i] >= t->rows) {
            memset(o, 0, (size_t)t->cols * sizeof(float));
            continue;
        }
        quant_dequantize_row(t->type, t->data + (size_t)ids[i] * t->row_bytes, o, t->cols);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Element-wise ops */

/* Element-wise ops over a batch go to the pool (one range of rows / elements per thread) from this
 * many elements on; below, waking the workers costs more than the op. Results do not depend on the
 * split (every row / element is computed the same way). */
#define EW_PARALLEL 8192

typedef struct rms_job {
    float *y;
    const float *x, *w;
    int dim;
    float eps;
} rms_job_t;

static void rmsnorm_range(void *ctx, int64_t r0, int64_t r1)
{
    const rms_job_t *j = ctx;
    const int dim = j->dim;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = j->x + (size_t)r * dim;
        float *yr = j->y + (size_t)r * dim;
        double sum = 0.0;
        for (int i = 0; i < dim; i++) sum += (double)(xr[i] * xr[i]);
        const float mean = (float)(sum / dim);
        const float scale = 1.0f / sqrtf(mean + j->eps);
        for (int i = 0; i < dim; i++) yr[i] = (xr[i] * scale) * j->w[i];
    }
}

static void cpu_rmsnorm(kern_backend_t *be, float *y, const float *x, const float *w, int n, int dim, float eps)
{
    rms_job_t j = {.y = y, .x = x, .w = w, .dim = dim, .eps = eps};
    cpu_pool_range(((cpu_backend_t *)be)->pool, n, 1, (int64_t)n * dim >= EW_PARALLEL ? 2 : INT64_MAX, rmsnorm_range, &j);
}

#define ROPE_MAX_PAIRS 512

/* ggml's rope as compiled for x86 with FMA: the pair rotation contracts to
 * x0' = fma(x0, cos, -(x1 * sin)), x1' = fma(x1, cos, x0 * sin), where a pair is two adjacent
 * dimensions (NORM mode) or dimensions i and i + n_rot/2 (NEOX mode); cos and sin carry the mscale
 * factor (ggml's rope_yarn with ext_factor 0). The body is inlined twice: into a plain function
 * (fmaf from libm) and into an FMA-target one (vfmadd), with the same results. */
static inline __attribute__((always_inline)) void rope_body(float *x, const int32_t *pos, int n, int n_heads,
                                                            int head_dim, const kern_rope_t *rope)
{
    const int n_rot = rope->n_rot < head_dim ? rope->n_rot : head_dim, np = n_rot / 2;
    if (np <= 0 || np > ROPE_MAX_PAIRS) return;
    const float theta_scale = powf(rope->freq_base, -2.0f / (float)n_rot);
    const float mscale = rope->mscale != 0.0f ? rope->mscale : 1.0f;
    const int stride = rope->neox ? 1 : 2, other = rope->neox ? np : 1; /* x0 at i * stride, x1 + other */
    float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    for (int t = 0; t < n; t++) {
        float theta = (float)pos[t];
        for (int i = 0; i < np; i++) {
            const float ff = rope->freq_factors ? rope->freq_factors[i] : 1.0f;
            const float th = rope->freq_scale * (theta / ff);
            cs[i] = cosf(th) * mscale;
            sn[i] = sinf(th) * mscale;
            theta *= theta_scale;
        }
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < np; i++) {
                float *p = v + i * stride;
                const float x0 = p[0], x1 = p[other];
                p[0] = fmaf(x0, cs[i], -(x1 * sn[i]));
                p[other] = fmaf(x0, sn[i], x1 * cs[i]);
            }
        }
    }
}

static void rope_scalar(float *x, const int32_t *pos, int n, int n_heads, int head_dim, const kern_rope_t *rope)
{
    rope_body(x, pos, n, n_heads, head_dim, rope);
}

static CPU_AVX2 void rope_avx2(float *x, const int32_t *pos, int n, int n_heads, int head_dim, const kern_rope_t *rope)
{
    rope_body(x, pos, n, n_heads, head_dim, rope);
}

typedef struct rope_job {
    float *x;
    const int32_t *pos;
    int n_heads, head_dim;
    const kern_rope_t *rope;
    bool scalar;
} rope_job_t;

static void rope_range(void *ctx, int64_t t0, int64_t t1)
{
    const rope_job_t *j = ctx;
    float *x = j->x + (size_t)t0 * j->n_heads * j->head_dim;
    if (j->scalar) rope_scalar(x, j->pos + t0, (int)(t1 - t0), j->n_heads, j->head_dim, j->rope);
    else rope_avx2(x, j->pos + t0, (int)(t1 - t0), j->n_heads, j->head_dim, j->rope);
}

static void cpu_rope(kern_backend_t *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                     const kern_rope_t *rope)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    rope_job_t j = {.x = x, .pos = pos, .n_heads = n_heads, .head_dim = head_dim, .rope = rope,
                    .scalar = cb->isa == CPU_ISA_SCALAR};
    cpu_pool_range(cb->pool, n, 1, (int64_t)n * n_heads * head_dim >= EW_PARALLEL ? 2 : INT64_MAX, rope_range, &j);
}

/* ggml_vec_swiglu_f32 (AVX-512 build): 16-element chunks use ggml_v_silu = x / (1 + v_expf(-x)) with
 * ggml's exp polynomial (cpu_v_expf*), times up; the n % 16 tail uses expf. ggml applies it per row
 * of n_ff: identical here whenever n_ff % 16 == 0. */
static void swiglu_scalar(float *out, const float *gate, const float *up, int n)
{
    const int nv = n & ~15;
    for (int i = 0; i < nv; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + cpu_v_expf1(0.0f - g)) * up[i];
    }
    for (int i = nv; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static CPU_AVX2 void swiglu_avx2(float *out, const float *gate, const float *up, int n)
{
    const int nv = n & ~15;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int i = 0; i < nv; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = cpu_v_expf_avx2(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (int i = nv; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

typedef struct ew_job {
    float *out;
    const float *a, *b;
    bool scalar;
} ew_job_t;

static void swiglu_range(void *ctx, int64_t i0, int64_t i1)
{
    const ew_job_t *j = ctx;
    if (j->scalar) swiglu_scalar(j->out + i0, j->a + i0, j->b + i0, (int)(i1 - i0));
    else swiglu_avx2(j->out + i0, j->a + i0, j->b + i0, (int)(i1 - i0));
}

static void cpu_swiglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    ew_job_t j = {.out = out, .a = gate, .b = up, .scalar = cb->isa == CPU_ISA_SCALAR};
    /* ranges of whole 16-element chunks, so the vector/tail split is the one of a single call */
    cpu_pool_range(cb->pool, n, 16, n >= EW_PARALLEL ? 2 : INT64_MAX, swiglu_range, &j);
}

static void add_range(void *ctx, int64_t i0, int64_t i1)
{
    const ew_job_t *j = ctx;
    for (int64_t i = i0; i < i1; i++) j->out[i] += j->a[i];
}

static void cpu_add(kern_backend_t *be, float *y, const float *x, int n)
{
    ew_job_t j = {.out = y, .a = x};
    cpu_pool_range(((cpu_backend_t *)be)->pool, n, 16, n >= EW_PARALLEL ? 2 : INT64_MAX, add_range, &j);
}

/* ---- ops of the families beyond Llama (kernels.h): one range of elements per pool thread, each
 * element computed on its own as ggml does, so the split changes nothing ---- */

typedef struct fam_job {
    float *y;
    const float *a, *b;
    float s;
    int dim;
    cpu_isa_t isa;
} fam_job_t;

static void add_bias_range(void *ctx, int64_t r0, int64_t r1)
{
    const fam_job_t *j = ctx;
    for (int64_t r = r0; r < r1; r++) {
        float *y = j->y + (size_t)r * j->dim;
        for (int d = 0; d < j->dim; d++) y[d] += j->a[d];
    }
}

static void cpu_add_bias(kern_backend_t *be, float *y, const float *bias, int n, int dim)
{
    fam_job_t j = {.y = y, .a = bias, .dim = dim};
    cpu_pool_range(((cpu_backend_t *)be)->pool, n, 1, (int64_t)n * dim >= EW_PARALLEL ? 2 : INT64_MAX, add_bias_range, &j);
}

static void scale_range(void *ctx, int64_t i0, int64_t i1)
{
    const fam_job_t *j = ctx;
    for (int64_t i = i0; i < i1; i++) j->y[i] *= j->s;
}

static void cpu_scale(kern_backend_t *be, float *x, float s, int n)
{
    fam_job_t j = {.y = x, .s = s};
    cpu_pool_range(((cpu_backend_t *)be)->pool, n, 16, n >= EW_PARALLEL ? 2 : INT64_MAX, scale_range, &j);
}

/* ggml_scale(1/cap), ggml_tanh (tanhf), ggml_scale(cap): three roundings, as three ops; the
 * tanhf 8 lanes at a time with libm's bits (cpu_tanhf.c) but on the scalar ISA. */
static void softcap_range(void *ctx, int64_t i0, int64_t i1)
{
    const fam_job_t *j = ctx;
    const float inv = 1.0f / j->s;
    if (j->isa == CPU_ISA_SCALAR) {
        for (int64_t i = i0; i < i1; i++) j->y[i] = tanhf(j->y[i] * inv) * j->s;
        return;
    }
    for (int64_t i = i0; i < i1; i++) j->y[i] *= inv;
    cpu_tanhf_batch(j->y + i0, j->y + i0, (int)(i1 - i0));
    for (int64_t i = i0; i < i1; i++) j->y[i] *= j->s;
}

static void cpu_softcap(kern_backend_t *be, float *x, float cap, int n)
{
    fam_job_t j = {.y = x, .s = cap, .isa = ((cpu_backend_t *)be)->isa};
    cpu_pool_range(((cpu_backend_t *)be)->pool, n, 16, n >= EW_PARALLEL ? 2 : INT64_MAX, softcap_range, &j);
}

/* ggml's GELU table (kernels/gelu.h), built once; one spare entry, since the vector paths gather
 * 32 bits at an entry's address and keep its low 16. */
static fl_f16_t g_gelu_table[KERN_GELU_TABLE_SIZE + 1];
static pthread_once_t g_gelu_once = PTHREAD_ONCE_INIT;

static void gelu_table_init(void) { kern_gelu_table_fill(g_gelu_table); }

float cpu_gelu(float x)
{
    pthread_once(&g_gelu_once, gelu_table_init);
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    return fl_f16_to_f32(g_gelu_table[fl_f32_to_f16(x)]);
}

/* ggml_vec_geglu_f32: 0 at or below -10, x * g at or above 10, else the table's value at the
 * f16-rounded x, times g. The vector paths round with the F16C conversion (round to nearest even,
 * as fl_f32_to_f16 and ggml's own conversion on x86) and gather the entries: the same bits, 8 or 16
 * at a time (the scalar code spent 6 ns an element in its software conversions). */
static inline float geglu_one(float x, float g)
{
    return x <= -10.0f ? 0.0f : x >= 10.0f ? x * g : fl_f16_to_f32(g_gelu_table[fl_f32_to_f16(x)]) * g;
}

static CPU_AVX512 void geglu_avx512(float *y, const float *gate, const float *up, int64_t i0, int64_t i1)
{
    const int *table = (const int *)(const void *)g_gelu_table;
    const __m512 lo = _mm512_set1_ps(-10.0f), hi = _mm512_set1_ps(10.0f);
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        const __m512 x = _mm512_loadu_ps(gate + i), g = _mm512_loadu_ps(up + i);
        const __m512i idx = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m512i entry = _mm512_i32gather_epi32(idx, table, 2);
        __m512 v = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(entry));
        v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, hi, _CMP_GE_OQ), x);
        v = _mm512_mul_ps(v, g);
        _mm512_storeu_ps(y + i, _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ), _mm512_setzero_ps()));
    }
    for (; i < i1; i++) y[i] = geglu_one(gate[i], up[i]);
}

static CPU_AVX2 void geglu_avx2(float *y, const float *gate, const float *up, int64_t i0, int64_t i1)
{
    const int *table = (const int *)(const void *)g_gelu_table;
    const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
    const __m256i low16 = _mm256_set1_epi32(0xffff);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 x = _mm256_loadu_ps(gate + i), g = _mm256_loadu_ps(up + i);
        const __m256i idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i entry = _mm256_and_si256(_mm256_i32gather_epi32(table, idx, 2), low16);
        /* 8 entries' low halves to 8 f16 in a row, then to floats */
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(entry), _mm256_extracti128_si256(entry, 1));
        __m256 v = _mm256_cvtph_ps(packed);
        v = _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, hi, _CMP_GE_OQ));
        v = _mm256_mul_ps(v, g);
        _mm256_storeu_ps(y + i, _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LE_OQ)));
    }
    for (; i < i1; i++) y[i] = geglu_one(gate[i], up[i]);
}

static void geglu_range(void *ctx, int64_t i0, int64_t i1)
{
    const fam_job_t *j = ctx;
    if (j->isa >= CPU_ISA_AVX512)
        geglu_avx512(j->y, j->a, j->b, i0, i1);
    else if (j->isa == CPU_ISA_AVX2)
        geglu_avx2(j->y, j->a, j->b, i0, i1);
    else
        for (int64_t i = i0; i < i1; i++) j->y[i] = geglu_one(j->a[i], j->b[i]);
}

static void cpu_geglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n)
{
    pthread_once(&g_gelu_once, gelu_table_init);
    const cpu_backend_t *cb = (const cpu_backend_t *)be;
    fam_job_t j = {.y = out, .a = gate, .b = up, .isa = cb->isa};
    cpu_pool_range(cb->pool, n, 16, n >= EW_PARALLEL ? 2 : INT64_MAX, geglu_range, &j);
}

/* ------------------------------------------------------------------------------------------------
 * Sampling */

typedef struct argmax_job {
    int32_t *out;
    const float *logits;
    int vocab;
} argmax_job_t;

static void argmax_range(void *ctx, int64_t r0, int64_t r1)
{
    const argmax_job_t *j = ctx;
    for (int64_t r = r0; r < r1; r++) j->out[r] = kern_sample_argmax(j->logits + (size_t)r * j->vocab, j->vocab);
}

static void cpu_sample(kern_backend_t *be, int32_t *out, float *logits, int n, int vocab,
                       const kern_sampling_t *params)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    /* The mask and the adjustments, in place (kernels.h allows it: the rows are the caller's
     * writable logits). */
    for (int i = 0; i < n; i++) {
        if (params[i].allowed) kern_sample_mask_row(logits + (size_t)i * vocab, vocab, params[i].allowed);
        if (params[i].adjust && params[i].n_adjust > 0)
            kern_sample_adjust_row(logits + (size_t)i * vocab, vocab, params[i].adjust, params[i].n_adjust);
    }
    const size_t need = kern_sample_scratch_bytes(vocab);
    if (cb->samp_len < need) {
        size_t c1 = cb->samp_len;
        if (cpu_grow(&cb->samp_scratch, &c1, need)) {
            for (int i = 0; i < n; i++) out[i] = kern_sample_argmax(logits + (size_t)i * vocab, vocab);
            return;
        }
        cb->samp_len = c1;
    }
    bool greedy = true;
    for (int i = 0; i < n; i++) greedy = greedy && (params[i].temperature <= 0.0f || vocab == 1);
    if (greedy) { /* argmax rows need no scratch: one range of rows per thread */
        argmax_job_t j = {.out = out, .logits = logits, .vocab = vocab};
        cpu_pool_range(cb->pool, n, 1, (int64_t)n * vocab >= 4 * EW_PARALLEL ? 2 : INT64_MAX, argmax_range, &j);
        return;
    }
    for (int i = 0; i < n; i++) out[i] = kern_sample_row(logits + (size_t)i * vocab, vocab, &params[i], cb->samp_scratch);
}

/* ------------------------------------------------------------------------------------------------
 * Creation */

static void cpu_destroy(kern_backend_t *be)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    if (!cb) return;
    const int nth = cb->pool ? cpu_pool_size(cb->pool) : 0;
    for (int i = 0; i < nth; i++) {
        if (cb->panel) free(cb->panel[i]);
        if (cb->scores) free(cb->scores[i]);
        if (cb->pstate) free(cb->pstate[i]);
    }
    free(cb->panel);
    free(cb->scores);
    free(cb->pstate);
    free(cb->pstate_bytes);
    free(cb->act);
    free(cb->full_rows);
    free(cb->pact);
    free(cb->split);
    free(cb->samp_scratch);
    cpu_pool_destroy(&cb->pool);
    free(cb);
}

/* Host memory: MemAvailable (free plus reclaimable page cache) from /proc/meminfo, else the free
 * pages alone. */
static int cpu_mem_info(kern_backend_t *be, size_t *free_bytes, size_t *total_bytes)
{
    (void)be;
    const long page = sysconf(_SC_PAGESIZE), avail = sysconf(_SC_AVPHYS_PAGES), total = sysconf(_SC_PHYS_PAGES);
    if (page <= 0 || avail < 0 || total <= 0) return FL_EUNSUPPORTED;
    *free_bytes = (size_t)avail * (size_t)page;
    *total_bytes = (size_t)total * (size_t)page;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[128];
        unsigned long long kib;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) {
                *free_bytes = (size_t)kib * 1024;
                break;
            }
        fclose(f);
    }
    return FL_OK;
}

static const kern_ops_t cpu_ops = {
    .name = "cpu",
    .device_memory = false, /* host memory, shared with the rest of the machine */
    /* f16 K/V dot products a position at a time (llama.cpp's order) against quantized GEMMs: a
     * 512-token chunk after 512 positions took 1.74x one at position 0 on the default model. */
    .attention_cost = 8.0f,
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .weight_new = cpu_weight_new,
    .weight_destroy = cpu_weight_destroy,
    .embed = cpu_embed,
    .matmul = cpu_matmul,
    .matmul_rows = cpu_matmul_rows,
    .set_prompt_rows = cpu_set_prompt_rows,
    .matmul_multi = cpu_matmul_multi,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .kv_move = cpu_kv_move,
    .add_bias = cpu_add_bias,
    .scale = cpu_scale,
    .softcap = cpu_softcap,
    .geglu = cpu_geglu,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .sample = cpu_sample,
    .mem_info = cpu_mem_info,
};

static cpu_isa_t detect_isa(void)
{
    __builtin_cpu_init();
    cpu_isa_t isa = CPU_ISA_SCALAR;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        isa = CPU_ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            isa = CPU_ISA_AVX512;
    }
    const char *env = getenv("FOLIO_CPU_ISA");
    if (env) {
        cpu_isa_t cap = strcmp(env, "scalar") == 0 ? CPU_ISA_SCALAR
                        : strcmp(env, "avx2") == 0 ? CPU_ISA_AVX2
                                                   : CPU_ISA_AVX512;
        if (cap < isa) isa = cap;
    }
    return isa;
}

/* AMX int8 tiles: in the CPU (CPUID 7.0 EDX bits 24 and 25) and granted to this process by the
 * kernel (arch_prctl ARCH_REQ_XCOMP_PERM for the tile data; Linux 5.16 and later). */
static bool detect_amx(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    const char *env = getenv("FOLIO_CPU_AMX");
    if (env && strcmp(env, "0") == 0) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

const char *cpu_isa_name(cpu_isa_t isa)
{
    return isa == CPU_ISA_AVX512 ? "avx512vnni" : isa == CPU_ISA_AVX2 ? "avx2" : "scalar";
}

kern_backend_t *kern_cpu_new(int n_threads, fl_error_t *err)
{
    cpu_backend_t *cb = calloc(1, sizeof *cb);
    if (!cb) {
        fl_fail(err, FL_ENOMEM, "cpu backend: out of memory");
        return NULL;
    }
    cb->base.ops = &cpu_ops;
    cb->isa = detect_isa();
    cb->pool = cpu_pool_new(n_threads, err);
    if (!cb->pool) {
        free(cb);
        return NULL;
    }
    const int nth = cpu_pool_size(cb->pool);
    cb->panel = calloc((size_t)nth, sizeof *cb->panel);
    cb->scores = calloc((size_t)nth, sizeof *cb->scores);
    cb->pstate = calloc((size_t)nth, sizeof *cb->pstate);
    cb->pstate_bytes = calloc((size_t)nth, sizeof *cb->pstate_bytes);
    if (!cb->panel || !cb->scores || !cb->pstate || !cb->pstate_bytes) {
        cpu_destroy(&cb->base);
        fl_fail(err, FL_ENOMEM, "cpu backend: out of memory");
        return NULL;
    }
    /* Quantized weights are repacked for the AVX-512 kernel (same size as the file's blocks) unless
     * FOLIO_CPU_REPACK=0; the other ISAs read the file mapping in place. */
    const char *rp = getenv("FOLIO_CPU_REPACK");
    cb->repack = cb->isa == CPU_ISA_AVX512 && !(rp && strcmp(rp, "0") == 0);
    /* Prompt tokens in ggml's order like every token, unless FOLIO_CPU_PROMPT=block (cpu_matmul.c's
     * prompt order: faster, but it leaves llama.cpp's greedy outputs on the default model; README). */
    const char *po = getenv("FOLIO_CPU_PROMPT");
    cb->prompt_block = po && strcmp(po, "block") == 0;
    cb->amx = cb->repack && detect_amx();
    cb->blas_min_n = cpu_matmul_default_blas_min_n();
    const char *env = getenv("FOLIO_CPU_BLAS_MIN_N");
    if (env && *env) {
        long v = strtol(env, NULL, 10);
        cb->blas_min_n = v <= 0 ? INT32_MAX : v < 65 ? 65 : v > INT32_MAX ? INT32_MAX : (int)v;
    }
    /* Our pool is the parallelism: each thread calls a single-threaded sgemm on its own panel. */
    openblas_set_num_threads(1);
    return &cb->base;
}
