/* cpu_expf.c - the C library's expf, 4 lanes at a time, bit for bit (cpu_internal.h).
 *
 * llama.cpp's flash attention calls libm's expf once per position and head, and folio reproduces
 * that kernel for quantized KV caches (cpu_attention_q.c), so its exps must be glibc's to the bit.
 * glibc's expf (the algorithm of Arm's optimized-routines, sysdeps/ieee754/flt-32/e_expf.c) works in
 * double precision: z = x * 32/ln2, k = round(z) by adding 1.5 * 2^52, r = z - k, 2^(k/32) from a
 * 32-entry table of 2^(i/32) bit patterns with k's high part added to the exponent, and a cubic in
 * r; the result is rounded to float once. On x86-64 with FMA glibc runs that code compiled with
 * -mfma, where r = fma(x, 32/ln2, -k) and the cubic's three multiply-adds are fused: those are the
 * operations here, on 4 doubles at a time. Being every step the same IEEE operation, the lanes give
 * glibc's bits; a check at first use compares them with the running libm on probes (one of them an
 * input only the fused r gets right) and falls back to calling expf when anything differs, so a
 * different C library costs speed, never a bit. tests/unit/test_kv_quant.c sweeps every float in
 * [-104, 0]. Inputs here are <= 0 (softmax arguments); below -103.97 the result is +0 as glibc's. */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#pragma GCC optimize("fp-contract=off")

#include "cpu_internal.h"
#include "cpu_simd.h"

#define EXPF_TABLE_BITS 5
#define EXPF_N          (1 << EXPF_TABLE_BITS)

static const double k_invln2_n = 0x1.71547652b82fep+0 * EXPF_N; /* N / ln 2 */
static const double k_shift = 0x1.8p+52;                          /* rounds to an integer when added */
static const double k_c0 = 0x1.c6af84b912394p-5 / EXPF_N / EXPF_N / EXPF_N, k_c1 = 0x1.ebfce50fac4f3p-3 / EXPF_N / EXPF_N,
                    k_c2 = 0x1.62e42ff0c52d6p-1 / EXPF_N;
static const float k_underflow = -0x1.9fe368p+6f; /* below: +0 (glibc's -103.97...) */

static uint64_t g_tab[EXPF_N]; /* bits of 2^(i/N), less i << (52 - bits): 2^(k/N) = tab[k % N] + (k << 47) */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static bool g_exact; /* the lanes equal this libm's expf */

static inline uint64_t bits_of(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static CPU_AVX2 __m128 expf4(__m128 x)
{
    const __m256d xd = _mm256_cvtps_pd(x);
    const __m256d z = _mm256_mul_pd(xd, _mm256_set1_pd(k_invln2_n));
    const __m256d kd_shifted = _mm256_add_pd(z, _mm256_set1_pd(k_shift));
    const __m256i ki = _mm256_castpd_si256(kd_shifted);
    const __m256d kd = _mm256_sub_pd(kd_shifted, _mm256_set1_pd(k_shift));
    const __m256d r = _mm256_fmadd_pd(xd, _mm256_set1_pd(k_invln2_n), _mm256_sub_pd(_mm256_setzero_pd(), kd));
    const __m256i idx = _mm256_and_si256(ki, _mm256_set1_epi64x(EXPF_N - 1));
    __m256i t = _mm256_i64gather_epi64((const long long *)g_tab, idx, 8);
    t = _mm256_add_epi64(t, _mm256_slli_epi64(ki, 52 - EXPF_TABLE_BITS));
    const __m256d s = _mm256_castsi256_pd(t);
    const __m256d zc = _mm256_fmadd_pd(_mm256_set1_pd(k_c0), r, _mm256_set1_pd(k_c1));
    const __m256d r2 = _mm256_mul_pd(r, r);
    __m256d y = _mm256_fmadd_pd(_mm256_set1_pd(k_c2), r, _mm256_set1_pd(1.0));
    y = _mm256_fmadd_pd(zc, r2, y);
    y = _mm256_mul_pd(y, s);
    const __m128 out = _mm256_cvtpd_ps(y);
    /* below the underflow bound (and -inf): +0, as glibc; NaN stays NaN through the arithmetic */
    const __m128 under = _mm_cmp_ps(x, _mm_set1_ps(k_underflow), _CMP_LT_OQ);
    return _mm_andnot_ps(under, out);
}

static CPU_AVX2 void expf_lanes(const float *x, float *y, int n)
{
    int i = 0;
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, expf4(_mm_loadu_ps(x + i)));
    if (i < n) {
        float in[4] = {0, 0, 0, 0}, out[4];
        memcpy(in, x + i, sizeof(float) * (size_t)(n - i));
        _mm_storeu_ps(out, expf4(_mm_loadu_ps(in)));
        memcpy(y + i, out, sizeof(float) * (size_t)(n - i));
    }
}

static void expf_init(void)
{
    for (int i = 0; i < EXPF_N; i++) g_tab[i] = bits_of(exp2((double)i / EXPF_N)) - ((uint64_t)i << (52 - EXPF_TABLE_BITS));
    if (!cpu_lanes_supported()) return;
    /* Probes: a spread over the softmax range, the table's every index, the underflow edge, and
     * -0x1.f8cbb2p+5, whose result only the fused r = fma(x, N/ln2, -k) rounds as glibc does. */
    enum { P = 4096 };
    static float px[P], py[P];
    int n = 0;
    px[n++] = -0x1.f8cbb2p+5f;
    px[n++] = k_underflow;
    px[n++] = nextafterf(k_underflow, 0.0f);
    px[n++] = -INFINITY;
    px[n++] = 0.0f;
    px[n++] = -0.0f;
    const uint32_t lo = 0x80000000u, hi = 0xc2dc0000u; /* the bit patterns of -0 and -110: every float between */
    for (int i = 0; n < P; i++) {
        const uint32_t u = lo + (uint32_t)((uint64_t)(hi - lo) * (uint64_t)i / (P - 7));
        memcpy(&px[n++], &u, sizeof u);
    }
    expf_lanes(px, py, P);
    g_exact = cpu_lanes_equal_libm(expf, px, py, P); /* else another libm: call it instead */
}

bool cpu_lanes_equal_libm(float (*libm)(float), const float *x, const float *y, int n)
{
    for (int i = 0; i < n; i++) {
        const float want = libm(x[i]);
        if (memcmp(&want, &y[i], sizeof want) && !(isnan(want) && isnan(y[i]))) return false;
    }
    return true;
}

bool cpu_expf_exact(void)
{
    pthread_once(&g_once, expf_init);
    return g_exact;
}

void cpu_expf_batch(const float *x, float *y, int n)
{
    if (cpu_expf_exact()) {
        expf_lanes(x, y, n);
        return;
    }
    for (int i = 0; i < n; i++) y[i] = expf(x[i]);
}
