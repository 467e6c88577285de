/* cpu_tanhf.c - the C library's tanhf, 8 lanes at a time, bit for bit (cpu_internal.h).
 *
 * Soft-capping (Gemma 2's attention scores and final logits) is llama.cpp's ggml_tanh, one libm
 * tanhf per element, and folio reproduces it to the bit; at about 5 ns a call it was a tenth of a
 * Gemma 2 prompt step. glibc's tanhf (the SunPro algorithm of sysdeps/ieee754/flt-32/s_tanhf.c, plain
 * single precision, no fused operations on x86-64) reduces to expm1f of 2|x| (|x| >= 1: 1 - 2/(t+2))
 * or of -2|x| (|x| < 1: -t/(t+2)), with x itself below 2^-55 and +-1 from 22 up. expm1f reduces its
 * argument by k ln2 (k = +-1 near ln2, else invln2 * x +- 0.5 truncated), evaluates a rational form
 * in float and rebuilds 2^k (expm1 + 1) by one of five formulas chosen by k. Every one of those
 * float operations is done here on 8 lanes, each lane's formula picked by blending, so the lanes give
 * glibc's bits. As with cpu_expf.c, a check at first use compares the lanes with the running libm on
 * probes and calls tanhf instead when anything differs: another C library costs speed, never a bit.
 * tests/unit/test_kernels_cpu.c sweeps a stride over every float (checked exhaustively when written). */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#pragma GCC optimize("fp-contract=off")

#include "cpu_internal.h"
#include "cpu_simd.h"

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static bool g_exact; /* the lanes equal this libm's tanhf */

#define F(x)  _mm256_set1_ps(x)
#define I(x)  _mm256_set1_epi32((int)(x))
#define FB(x) _mm256_castsi256_ps(I(x)) /* a float by its bits */

static inline CPU_AVX2 __m256 sel(__m256 mask, __m256 if_true, __m256 if_false) { return _mm256_blendv_ps(if_false, if_true, mask); }
static inline CPU_AVX2 __m256 mask_of(__m256i m) { return _mm256_castsi256_ps(m); }
/* |bits| compared as signed ints: every operand here is below 2^31 */
static inline CPU_AVX2 __m256 bits_gt(__m256i a, uint32_t b) { return mask_of(_mm256_cmpgt_epi32(a, I(b))); }
static inline CPU_AVX2 __m256 bits_lt(__m256i a, uint32_t b) { return mask_of(_mm256_cmpgt_epi32(I(b), a)); }

/* expm1f for finite u with |u| < 88 (tanhf's arguments stay within (-44, 44)). */
static inline __attribute__((always_inline)) CPU_AVX2 __m256 expm1f8(__m256 u)
{
    const __m256 ln2_hi = FB(0x3f317180), ln2_lo = FB(0x3717f7d1), invln2 = FB(0x3fb8aa3b);
    const __m256i hx = _mm256_and_si256(_mm256_castps_si256(u), I(0x7fffffff));
    const __m256 neg = _mm256_cmp_ps(u, F(0.0f), _CMP_LT_OQ);
    /* argument reduction: k = +-1 for 0.5 ln2 < |u| < 1.5 ln2, else invln2 * u +- 0.5 truncated */
    const __m256 reduce = bits_gt(hx, 0x3eb17218), near = bits_lt(hx, 0x3f851592);
    const __m256 kf_general = _mm256_add_ps(_mm256_mul_ps(invln2, u), sel(neg, F(-0.5f), F(0.5f)));
    const __m256i k_general = _mm256_cvttps_epi32(kf_general);
    const __m256 t_general = _mm256_cvtepi32_ps(k_general);
    const __m256 hi_general = _mm256_sub_ps(u, _mm256_mul_ps(t_general, ln2_hi));
    const __m256 lo_general = _mm256_mul_ps(t_general, ln2_lo);
    const __m256 hi_near = sel(neg, _mm256_add_ps(u, ln2_hi), _mm256_sub_ps(u, ln2_hi));
    const __m256 lo_near = sel(neg, _mm256_sub_ps(F(0.0f), ln2_lo), ln2_lo);
    const __m256i k_near = _mm256_castps_si256(sel(neg, _mm256_castsi256_ps(I(-1)), _mm256_castsi256_ps(I(1))));
    const __m256 hi = sel(near, hi_near, hi_general), lo = sel(near, lo_near, lo_general);
    const __m256i k_red = _mm256_castps_si256(sel(near, _mm256_castsi256_ps(k_near), _mm256_castsi256_ps(k_general)));
    const __m256 x_red = _mm256_sub_ps(hi, lo);
    const __m256 c_red = _mm256_sub_ps(_mm256_sub_ps(hi, x_red), lo);
    const __m256 x = sel(reduce, x_red, u), c = sel(reduce, c_red, F(0.0f));
    const __m256i k = _mm256_and_si256(k_red, _mm256_castps_si256(reduce)); /* 0 where not reduced */

    /* x is in [-0.5 ln2, 0.5 ln2]: the rational form */
    const __m256 hfx = _mm256_mul_ps(F(0.5f), x);
    const __m256 hxs = _mm256_mul_ps(x, hfx);
    __m256 p = _mm256_add_ps(FB(0x36867e54), _mm256_mul_ps(hxs, FB(0xb457edbb))); /* Q4 + hxs Q5 */
    p = _mm256_add_ps(FB(0xb8a670cd), _mm256_mul_ps(hxs, p));                       /* Q3 + ... */
    p = _mm256_add_ps(FB(0x3ad00d01), _mm256_mul_ps(hxs, p));                       /* Q2 + ... */
    p = _mm256_add_ps(FB(0xbd088889), _mm256_mul_ps(hxs, p));                       /* Q1 + ... */
    const __m256 r1 = _mm256_add_ps(F(1.0f), _mm256_mul_ps(hxs, p));
    const __m256 t = _mm256_sub_ps(F(3.0f), _mm256_mul_ps(r1, hfx));
    __m256 e = _mm256_mul_ps(hxs, _mm256_div_ps(_mm256_sub_ps(r1, t), _mm256_sub_ps(F(6.0f), _mm256_mul_ps(x, t))));
    const __m256 res_k0 = _mm256_sub_ps(x, _mm256_sub_ps(_mm256_mul_ps(x, e), hxs));

    e = _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(x, _mm256_sub_ps(e, c)), c), hxs);
    const __m256 e_x = _mm256_sub_ps(e, x);
    const __m256i k_exp = _mm256_slli_epi32(k, 23);
    const __m256 res_km1 = _mm256_sub_ps(_mm256_mul_ps(F(0.5f), _mm256_sub_ps(x, e)), F(0.5f));
    const __m256 res_k1 = sel(_mm256_cmp_ps(x, F(-0.25f), _CMP_LT_OQ),
                              _mm256_mul_ps(F(-2.0f), _mm256_sub_ps(e, _mm256_add_ps(x, F(0.5f)))),
                              _mm256_add_ps(F(1.0f), _mm256_mul_ps(F(2.0f), _mm256_sub_ps(x, e))));
    /* k <= -2 or k > 56: (1 - (e - x)) * 2^k - 1 */
    const __m256 y_far = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(_mm256_sub_ps(F(1.0f), e_x)), k_exp));
    const __m256 res_far = _mm256_sub_ps(y_far, F(1.0f));
    /* 2 <= k < 23: ((1 - 2^-k) - (e - x)) * 2^k */
    const __m256 t_mid = _mm256_castsi256_ps(_mm256_sub_epi32(I(0x3f800000), _mm256_srlv_epi32(I(0x1000000), k)));
    const __m256 res_mid = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(_mm256_sub_ps(t_mid, e_x)), k_exp));
    /* 23 <= k <= 56: ((x - (e + 2^-k)) + 1) * 2^k */
    const __m256 t_high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(I(0x7f), k), 23));
    const __m256 y_high = _mm256_add_ps(_mm256_sub_ps(x, _mm256_add_ps(e, t_high)), F(1.0f));
    const __m256 res_high = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y_high), k_exp));

    const __m256 is_k0 = mask_of(_mm256_cmpeq_epi32(k, I(0)));
    const __m256 is_km1 = mask_of(_mm256_cmpeq_epi32(k, I(-1)));
    const __m256 is_k1 = mask_of(_mm256_cmpeq_epi32(k, I(1)));
    const __m256 is_far = mask_of(_mm256_or_si256(_mm256_cmpgt_epi32(I(-1), k), _mm256_cmpgt_epi32(k, I(56))));
    const __m256 is_mid = mask_of(_mm256_cmpgt_epi32(I(23), k));
    __m256 res = sel(is_mid, res_mid, res_high);
    res = sel(is_far, res_far, res);
    res = sel(is_k1, res_k1, res);
    res = sel(is_km1, res_km1, res);
    res = sel(is_k0, res_k0, res);
    res = sel(bits_lt(hx, 0x33000000), u, res);                              /* |u| < 2^-25: u */
    return sel(_mm256_and_ps(neg, bits_gt(hx, 0x4195b843)), F(-1.0f), res); /* u <= -27 ln2: -1 */
}

static inline __attribute__((always_inline)) CPU_AVX2 __m256 tanhf8(__m256 v)
{
    const __m256i jx = _mm256_castps_si256(v);
    const __m256i ix = _mm256_and_si256(jx, I(0x7fffffff));
    const __m256 ax = _mm256_castsi256_ps(ix);
    const __m256 ge1 = bits_gt(ix, 0x3f7fffff);
    const __m256 two_ax = _mm256_mul_ps(F(2.0f), ax);
    const __m256 u = sel(ge1, two_ax, _mm256_sub_ps(F(0.0f), two_ax));
    /* lanes at or past 22 (and infinities, NaNs) take u = 0 into expm1f and are replaced below */
    const __m256 t = expm1f8(_mm256_and_ps(u, bits_lt(ix, 0x41b00000)));
    const __m256 den = _mm256_add_ps(t, F(2.0f));
    const __m256 z_ge1 = _mm256_sub_ps(F(1.0f), _mm256_div_ps(F(2.0f), den));
    const __m256 z_lt1 = _mm256_div_ps(_mm256_sub_ps(F(0.0f), t), den);
    __m256 z = sel(ge1, z_ge1, z_lt1);
    z = sel(bits_lt(ix, 0x41b00000), z, F(1.0f)); /* |x| >= 22 and infinities: 1 */
    z = _mm256_or_ps(z, _mm256_and_ps(v, FB(0x80000000))); /* z >= 0 here: the sign of x */
    z = sel(bits_lt(ix, 0x24000000), _mm256_mul_ps(v, _mm256_add_ps(F(1.0f), v)), z); /* tiny, and +-0 */
    return sel(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_add_ps(v, v), z);
}

static CPU_AVX2 void tanhf_lanes(float *y, const float *x, int n)
{
    int i = 0;
    /* 4 vectors a pass: each one is a long chain of dependent operations (three divisions) */
    for (; i + 32 <= n; i += 32) {
        const __m256 a = tanhf8(_mm256_loadu_ps(x + i)), b = tanhf8(_mm256_loadu_ps(x + i + 8));
        const __m256 c = tanhf8(_mm256_loadu_ps(x + i + 16)), d = tanhf8(_mm256_loadu_ps(x + i + 24));
        _mm256_storeu_ps(y + i, a), _mm256_storeu_ps(y + i + 8, b);
        _mm256_storeu_ps(y + i + 16, c), _mm256_storeu_ps(y + i + 24, d);
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, tanhf8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float in[8] = {0}, out[8];
        memcpy(in, x + i, sizeof(float) * (size_t)(n - i));
        _mm256_storeu_ps(out, tanhf8(_mm256_loadu_ps(in)));
        memcpy(y + i, out, sizeof(float) * (size_t)(n - i));
    }
}

static void tanhf_init(void)
{
    if (!cpu_lanes_supported()) return;
    /* Probes: a spread over every float bit pattern of either sign, and each branch's edges. */
    enum { P = 8192 };
    static float px[P], py[P];
    const uint32_t edges[] = {0x00000000, 0x00000001, 0x23ffffff, 0x24000000, 0x33000000, 0x3e317218, 0x3eb17218,
                              0x3eb17219, 0x3f051592, 0x3f7fffff, 0x3f800000, 0x41b00000, 0x41afffff, 0x7f800000,
                              0x7fc00000, 0x3f000000, 0x3e800000, 0x40000000, 0x41000000, 0x41600000};
    int n = 0;
    for (size_t e = 0; e < sizeof edges / sizeof *edges; e++)
        for (int neg = 0; neg < 2; neg++) {
            const uint32_t b = edges[e] | (neg ? 0x80000000u : 0);
            memcpy(&px[n++], &b, 4);
        }
    for (uint32_t i = 0; n < P; i++) {
        const uint32_t b = (uint32_t)((uint64_t)i * 0xffffffffu / (P - 41));
        memcpy(&px[n++], &b, 4);
    }
    tanhf_lanes(py, px, P);
    g_exact = cpu_lanes_equal_libm(tanhf, px, py, P); /* else another libm: call it instead */
}

void cpu_tanhf_lanes(float *y, const float *x, int n)
{
    if (cpu_lanes_supported()) tanhf_lanes(y, x, n);
}

bool cpu_tanhf_exact(void)
{
    pthread_once(&g_once, tanhf_init);
    return g_exact;
}

void cpu_tanhf_batch(float *y, const float *x, int n)
{
    if (cpu_tanhf_exact()) {
        tanhf_lanes(y, x, n);
        return;
    }
    for (int i = 0; i < n; i++) y[i] = tanhf(x[i]);
}
