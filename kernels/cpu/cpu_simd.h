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

#endif
