/* cpu_attention.c - paged attention over the f16 KV pools, and the KV store.
 *
 * Numerics mimic ggml's non-flash path (KQ = mul_mat(K f16, q), soft_max_ext, KQV = mul_mat(V f16,
 * KQ)): ggml converts src1 to the f16 vec-dot type, so q is rounded to f16 before the dot with K,
 * scores are scaled, softmax runs in f32 with the max subtracted and the sum in double, and the
 * probabilities are rounded to f16 before the weighted sum of V, which accumulates in f32. The dot
 * with K uses the canonical 16-lane order (cpu_simd.h); the V sum goes position by position
 * (out[d] = fma(p_j, v_j[d], out[d]) for j = 0..pos), so SIMD and scalar paths agree bit for bit
 * and a token's output does not depend on the other tokens of the call.
 *
 * Work items are (token, head) pairs handed out by an atomic counter; calls with little work (short
 * contexts in decode) run on the caller without waking the pool. Each thread has its own score row
 * (cpu_backend_t.scores[ith]), grown by the caller before the dispatch. */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "cpu_simd.h"

#define ATTN_MAX_HEAD_DIM 512

typedef struct attn_ctx {
    const kern_attn_t *a;
    cpu_isa_t isa;
    float **scores;
    atomic_int next;
} attn_ctx_t;

static inline float f16_round(float f) { return fl_f16_to_f32(fl_f32_to_f16(f)); }

static void attn_vsum_scalar(float *out, const float *p, const fl_f16_t *const *vrows, int len, int hd)
{
    for (int d = 0; d < hd; d++) out[d] = 0.0f;
    for (int j = 0; j < len; j++)
        for (int d = 0; d < hd; d++) out[d] = fmaf(p[j], fl_f16_to_f32(vrows[j][d]), out[d]);
}

static CPU_AVX2 void attn_vsum_avx2(float *out, const float *p, const fl_f16_t *const *vrows, int len, int hd)
{
    int d = 0;
    for (; d + 32 <= hd; d += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < len; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const fl_f16_t *v = vrows[j] + d;
            a0 = _mm256_fmadd_ps(pj, cpu_load_f16x8(v), a0);
            a1 = _mm256_fmadd_ps(pj, cpu_load_f16x8(v + 8), a1);
            a2 = _mm256_fmadd_ps(pj, cpu_load_f16x8(v + 16), a2);
            a3 = _mm256_fmadd_ps(pj, cpu_load_f16x8(v + 24), a3);
        }
        _mm256_storeu_ps(out + d, a0);
        _mm256_storeu_ps(out + d + 8, a1);
        _mm256_storeu_ps(out + d + 16, a2);
        _mm256_storeu_ps(out + d + 24, a3);
    }
    for (; d + 8 <= hd; d += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (int j = 0; j < len; j++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), cpu_load_f16x8(vrows[j] + d), a0);
        _mm256_storeu_ps(out + d, a0);
    }
    for (; d < hd; d++) {
        float acc = 0.0f;
        for (int j = 0; j < len; j++) acc = fmaf(p[j], fl_f16_to_f32(vrows[j][d]), acc);
        out[d] = acc;
    }
}

static inline float cpu_dot16_f16_scalar(const float *a, const fl_f16_t *b, int n)
{
    float l[16] = {0};
    for (int i = 0; i < n; i++) l[i % 16] = fmaf(a[i], fl_f16_to_f32(b[i]), l[i % 16]);
    for (int j = 0; j < 8; j++) l[j] += l[j + 8];
    for (int j = 0; j < 4; j++) l[j] += l[j + 4];
    for (int j = 0; j < 2; j++) l[j] += l[j + 2];
    return l[0] + l[1];
}

/* One (token, head): sc has room for pos + 1 scores; vrows for pos + 1 pointers. */
static void attn_one(const kern_attn_t *a, cpu_isa_t isa, int i, int h, float *sc, const fl_f16_t **rows)
{
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads, kvh = h / group;
    const size_t qoff = ((size_t)i * a->n_heads + h) * hd, kv_stride = (size_t)a->n_kv_heads * hd;
    const int pos = a->tok_pos[i], len = pos + 1, bs = a->block_size;
    const int32_t *bt = a->block_tables + (size_t)a->tok_seq[i] * a->max_blocks;
    float q16[ATTN_MAX_HEAD_DIM];
    for (int d = 0; d < hd; d++) q16[d] = f16_round(a->q[qoff + d]);

    float mx = -INFINITY;
    for (int j = 0; j < len; j++) {
        const size_t slot = (size_t)bt[j / bs] * bs + (size_t)(j % bs);
        const fl_f16_t *k = a->k_cache + slot * kv_stride + (size_t)kvh * hd;
        rows[j] = a->v_cache + slot * kv_stride + (size_t)kvh * hd;
        const float dot = isa == CPU_ISA_SCALAR ? cpu_dot16_f16_scalar(q16, k, hd) : cpu_dot16_f16_avx2(q16, k, hd);
        sc[j] = dot * a->scale;
        mx = fmaxf(mx, sc[j]);
    }
    double sum = 0.0;
    for (int j = 0; j < len; j++) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += (double)e;
    }
    const float inv = (float)(1.0 / sum);
    for (int j = 0; j < len; j++) sc[j] = f16_round(sc[j] * inv);
    float *out = a->out + qoff;
    if (isa == CPU_ISA_SCALAR) attn_vsum_scalar(out, sc, rows, len, hd);
    else attn_vsum_avx2(out, sc, rows, len, hd);
}

static void attn_task(void *arg, int ith, int nth)
{
    attn_ctx_t *c = arg;
    const kern_attn_t *a = c->a;
    const int n_items = a->n_tokens * a->n_heads;
    float *sc = c->scores[ith];
    /* the pointer rows live right after the scores (see cpu_attention's sizing) */
    const fl_f16_t **rows = NULL;
    int maxlen = 0;
    for (int i = 0; i < a->n_tokens; i++)
        if (a->tok_pos[i] + 1 > maxlen) maxlen = a->tok_pos[i] + 1;
    rows = (const fl_f16_t **)(void *)(sc + (((size_t)maxlen + 15) & ~(size_t)15));
    for (;;) {
        const int it = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        attn_one(a, c->isa, it / a->n_heads, it % a->n_heads, sc, rows);
    }
}

void cpu_attention(kern_backend_t *be, const kern_attn_t *a)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    if (a->n_tokens <= 0) return;
    int maxlen = 0;
    int64_t work = 0;
    for (int i = 0; i < a->n_tokens; i++) {
        if (a->tok_pos[i] + 1 > maxlen) maxlen = a->tok_pos[i] + 1;
        work += a->tok_pos[i] + 1;
    }
    work *= (int64_t)a->n_heads * a->head_dim;
    /* floats for scores (rounded to 16) + room for as many pointers */
    const size_t need = ((((size_t)maxlen + 15) & ~(size_t)15) + 2 * (size_t)maxlen) * sizeof(float);
    const int nth = cpu_pool_size(cb->pool);
    if (need > cb->scores_len) {
        size_t cap = 0;
        for (int t = 0; t < nth; t++) {
            cap = cb->scores_len;
            if (cpu_grow((void **)&cb->scores[t], &cap, need)) {
                for (size_t k = 0; k < (size_t)a->n_tokens * a->n_heads * a->head_dim; k++) a->out[k] = NAN;
                return;
            }
        }
        cb->scores_len = cap; /* every thread's buffer got the same capacity */
    }
    if (a->head_dim > ATTN_MAX_HEAD_DIM || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads) {
        for (size_t k = 0; k < (size_t)a->n_tokens * a->n_heads * a->head_dim; k++) a->out[k] = NAN;
        return;
    }
    attn_ctx_t c = {.a = a, .isa = cb->isa, .scores = cb->scores};
    atomic_init(&c.next, 0);
    if (work < 64 * 1024 || nth == 1) attn_task(&c, 0, 1);
    else cpu_pool_run(cb->pool, attn_task, &c);
}

static CPU_AVX2 void kv_row_avx2(fl_f16_t *dst, const float *src, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = fl_f32_to_f16(src[i]);
}

void cpu_kv_store(kern_backend_t *be, fl_f16_t *k_cache, fl_f16_t *v_cache, const float *k, const float *v,
                  const int32_t *slots, int n, int kv_dim)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    for (int i = 0; i < n; i++) {
        if (slots[i] < 0) continue; /* padding row */
        fl_f16_t *kd = k_cache + (size_t)slots[i] * kv_dim, *vd = v_cache + (size_t)slots[i] * kv_dim;
        const float *ks = k + (size_t)i * kv_dim, *vs = v + (size_t)i * kv_dim;
        if (cb->isa == CPU_ISA_SCALAR) {
            for (int d = 0; d < kv_dim; d++) kd[d] = fl_f32_to_f16(ks[d]), vd[d] = fl_f32_to_f16(vs[d]);
        } else {
            kv_row_avx2(kd, ks, kv_dim);
            kv_row_avx2(vd, vs, kv_dim);
        }
    }
}
