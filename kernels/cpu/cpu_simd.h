/* cpu_simd.h - small AVX2/AVX-512 helpers shared by the CPU kernels (private).
 *
 * Functions carry their own target attribute so the files compile with plain -O3; callers pick a
 * path at run time from cpu_backend_t.isa. The float dot products here follow the canonical order of
 * cpu_dot16_scalar (16 lanes, element i into lane i % 16 by fused multiply-add, lanes reduced
 * l[j]+l[j+8], +4, +2, +1), so every path returns the same bits. */
#ifndef FOLIO_CPU_SIMD_H
#define FOLIO_CPU_SIMD_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "../../common/dtype.h"

#define CPU_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CPU_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* Reduces 16 lanes given as two 8-lane halves (lanes 0-7, 8-15) in the canonical order. */
static inline CPU_AVX2 float cpu_reduce16_avx2(__m256 lo, __m256 hi)
{
    __m256 s8 = _mm256_add_ps(lo, hi);                                             /* l[j] + l[j+8] */
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)); /* + 4 */
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                             /* + 2 */
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));                         /* + 1 */
    return _mm_cvtss_f32(s1);
}

/* Finishes a canonical dot whose full 16-element chunks are in (lo, hi): adds the tail elements
 * a[i] * bt[i - i0] for i in [i0, n) into their lanes with scalar fmaf and reduces. */
static inline CPU_AVX2 float cpu_finish16_avx2(__m256 lo, __m256 hi, const float *a, const float *bt, int i0, int n)
{
    if (i0 == n) return cpu_reduce16_avx2(lo, hi);
    float l[16];
    _mm256_storeu_ps(l, lo);
    _mm256_storeu_ps(l + 8, hi);
    for (int i = i0; i < n; i++) l[i % 16] = fmaf(a[i], bt[i - i0], l[i % 16]);
    for (int j = 0; j < 8; j++) l[j] += l[j + 8];
    for (int j = 0; j < 4; j++) l[j] += l[j + 4];
    for (int j = 0; j < 2; j++) l[j] += l[j + 2];
    return l[0] + l[1];
}

/* A Q4 block's 16 nibble bytes as 32 values 0..15: the low nibbles (elements 0..15), then the high. */
static inline CPU_AVX2 __m256i cpu_nibbles_avx2(const uint8_t *qs)
{
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
}

/* ggml's hsum_float_8: (upper half + lower half), then + the high pair, then + the odd lane. */
static inline CPU_AVX2 float cpu_hsum8_avx2(__m256 x)
{
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* The sum of 8 int32 lanes (exact, wrapping as int32). */
static inline CPU_AVX2 int32_t cpu_hsum_epi32_avx2(__m256i v)
{
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    return _mm_cvtsi128_si32(s4);
}

static inline CPU_AVX2 __m256 cpu_load_f16x8(const fl_f16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline CPU_AVX2 __m256 cpu_load_bf16x8(const fl_bf16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Canonical dot of float a with f16 b (b converted exactly to f32). */
static inline CPU_AVX2 float cpu_dot16_f16_avx2(const float *a, const fl_f16_t *b, int n)
{
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), cpu_load_f16x8(b + i), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), cpu_load_f16x8(b + i + 8), hi);
    }
    if (i == n) return cpu_reduce16_avx2(lo, hi);
    float l[16], bt[16];
    _mm256_storeu_ps(l, lo);
    _mm256_storeu_ps(l + 8, hi);
    for (int k = i; k < n; k++) bt[k - i] = fl_f16_to_f32(b[k]);
    for (int k = i; k < n; k++) l[k % 16] = fmaf(a[k], bt[k - i], l[k % 16]);
    for (int j = 0; j < 8; j++) l[j] += l[j + 8];
    for (int j = 0; j < 4; j++) l[j] += l[j + 4];
    for (int j = 0; j < 2; j++) l[j] += l[j + 2];
    return l[0] + l[1];
}


/* ---- ggml's vectorised exp and its f16 dot product, bit for bit ----
 *
 * cpu_v_expf* reproduce ggml_v_expf as llama.cpp's AVX-512 build runs it (ggml-cpu/vec.h):
 *   z = fma(x, 0x1.715476p+0, 0x1.8p23); n = z - 0x1.8p23;
 *   b = fma(-n, 0x1.7f7d1cp-20, fma(-n, 0x1.62e4p-1, x)); u = b * b;
 *   j = fma(fma(fma(0x1.0e4020p-7, b, 0x1.573e2ep-5), u, fma(0x1.555e66p-3, b, 0x1.fffdb6p-2)), u,
 *           fma(0x1.ffffecp-1, b, 1));
 *   |n| > 192 ? (n <= 0 ? 0 : inf) : scalef(j, n)
 * scalef(j, n) = j * 2^n with one rounding: ldexpf in the scalar version, a multiply by 2^n built in
 * the exponent field when every |n| <= 126 in the AVX2 version (else per-lane ldexpf). */
static inline float cpu_v_expf_finish(float j, float n)
{
    if (n != n) return n;
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    return ldexpf(j, (int)n);
}

static inline __attribute__((always_inline)) float cpu_v_expf1(float x)
{
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                         u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    return cpu_v_expf_finish(j, n);
}

static inline CPU_AVX2 __m256 cpu_v_expf_avx2(__m256 x)
{
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b, _mm256_set1_ps(0x1.573e2ep-5f)), u,
                        _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b, _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_fmadd_ps(_mm256_set1_ps(0x1.ffffecp-1f), b, _mm256_set1_ps(1.0f)));
    const __m256 absn = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), n);
    if (_mm256_movemask_ps(_mm256_cmp_ps(absn, _mm256_set1_ps(126.0f), _CMP_LE_OQ)) == 0xff) {
        const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(j, _mm256_castsi256_ps(e));
    }
    float jj[8], nn[8];
    _mm256_storeu_ps(jj, j);
    _mm256_storeu_ps(nn, n);
    for (int k = 0; k < 8; k++) jj[k] = cpu_v_expf_finish(jj[k], nn[k]);
    return _mm256_loadu_ps(jj);
}

/* ggml_vec_dot_f16 (AVX-512 build) of f16 a with b (f16 values held as floats): chunks of 64 in four
 * 16-lane accumulators acc[k] (element 64c + 16k + l into acc[k][l], fma), combined as
 * (acc0 + acc2) + (acc1 + acc3) and reduced in the canonical 16-lane order; the n % 64 leftover
 * products (exact in f32) are added to that in double, one by one. */
static inline float cpu_vecdot_f16_scalar(const fl_f16_t *a, const float *b, int n)
{
    const int np = n & ~63;
    float acc[64] = {0};
    for (int i = 0; i < np; i += 64)
        for (int k = 0; k < 64; k++) acc[k] = fmaf(fl_f16_to_f32(a[i + k]), b[i + k], acc[k]);
    float s[16];
    for (int l = 0; l < 16; l++) s[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
    for (int j = 0; j < 8; j++) s[j] += s[j + 8];
    for (int j = 0; j < 4; j++) s[j] += s[j + 4];
    for (int j = 0; j < 2; j++) s[j] += s[j + 2];
    double sum = (double)(s[0] + s[1]);
    for (int i = np; i < n; i++) sum += (double)(fl_f16_to_f32(a[i]) * b[i]);
    return (float)sum;
}

static inline CPU_AVX2 float cpu_vecdot_f16_avx2(const fl_f16_t *a, const float *b, int n)
{
    const int np = n & ~63;
    __m256 acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
    for (int i = 0; i < np; i += 64)
        for (int k = 0; k < 8; k++)
            acc[k] = _mm256_fmadd_ps(cpu_load_f16x8(a + i + 8 * k), _mm256_loadu_ps(b + i + 8 * k), acc[k]);
    /* acc[2k], acc[2k+1] are the low and high halves of ggml's accumulator k */
    const __m256 lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
    const __m256 hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
    double sum = (double)cpu_reduce16_avx2(lo, hi);
    for (int i = np; i < n; i++) sum += (double)(_cvtsh_ss(a[i]) * b[i]);
    return (float)sum;
}

#endif
