/* cpu_attention.c - paged attention over f16 KV pools, and the KV store (any KV type; quantized pools'
 * attention is cpu_attention_q.c's).
 *
 * Numerics are llama.cpp's non-flash CPU path, bit for bit, because a quantized forward pass carries
 * a last-bit difference through every layer (README.md, design). ggml sums the score and output dot
 * products in one of two orders, by the number of query tokens in its mul_mat: tinyBLAS's for >= 2
 * (prompt processing: lane i % 16, needs head_dim % 16 == 0), ggml_vec_dot_f16's for 1 (decode).
 * folio chooses per token, so that the batch a token shares never changes its numbers: by its role
 * where the caller gives prompt lengths (kern_attn_t.seq_prompt_len: a token of a prompt of >= 2
 * tokens in tinyBLAS's order, any other in vec_dot's, as llama.cpp for a prompt fed whole; a prompt
 * split over steps or recomputed after preemption then still matches), else by the tokens of its
 * sequence in the call. The scalar functions spell out each order.
 *
 * Work items are (token, head) pairs, or (token, KV head) on AVX-512 with head_dim % 64 == 0
 * (a group's query heads share each K/V row load), handed out by an atomic counter; small calls run
 * on the caller without waking the pool. Each thread has its own scratch (cpu_backend_t.scores).
 *
 * Sliding windows and soft-capping (attn_score) change a score, never the order: a position outside
 * the window scores -inf, as in llama.cpp's mask, and so weighs exactly 0 in the same sums. Whole
 * 64-position runs before a window's start are not computed at all (attn_window_skip): each sum
 * above is lane j % 16 or j % 64 of the position, or a double sum of 16-position chunks, so the
 * runs' zeros (x + 0 = x, and +0 accumulators stay +0) leave every sum's bits as they were. */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC optimize("fp-contract=off")

#include "cpu_internal.h"
#include "cpu_simd.h"

#define ATTN_MAX_HEAD_DIM 512
#define ATTN_MAX_GROUP 16 /* query rows sharing a KV head, at most, in the grouped path: run tokens x heads */
#define ATTN_RUN_MAX 4    /* tokens of one sequence a grouped work item takes at most */

typedef struct attn_ctx {
    const kern_attn_t *a;
    cpu_isa_t isa;
    float **scores;
    const uint8_t *multi; /* [n_tokens] 1: the token's sequence has >= 2 tokens in this call */
    int maxlen;
    int sstride;          /* floats between the G score rows of the grouped path */
    bool grouped;         /* items are (run, kv head): attn_group_avx512 */
    const int *runs;      /* [n_runs + 1]: the grouped path's runs, by their first token */
    int n_runs;
    atomic_int next;
} attn_ctx_t;

static inline float f16_round(float f) { return fl_f16_to_f32(fl_f32_to_f16(f)); }

static inline int pad32(int len) { return (len + 31) & ~31; }

/* Score of compacted position j for a token whose window starts at lo (kern_attn_t.window): -inf
 * before it; else ggml's kq, soft-capped as llama.cpp's scale-tanh-scale, times the softmax scale. */
static inline float attn_score(const kern_attn_t *a, float dot, int lo, int j)
{
    if (j < lo) return -INFINITY;
    if (a->softcap > 0.0f) dot = tanhf(dot * (1.0f / a->softcap)) * a->softcap;
    return dot * a->scale;
}

/* attn_score over n positions from j0 (dots in, scores out; may be the same), the tanhf of
 * soft-capping 8 lanes at a time (cpu_tanhf.c: libm's bits). */
static void attn_scores(const kern_attn_t *a, const float *dots, int n, int lo, int j0, float *out)
{
    if (a->softcap <= 0.0f) { /* the masked run, then one product a score (a loop the compiler vectorises) */
        const float scale = a->scale;
        int r = 0;
        for (; r < n && j0 + r < lo; r++) out[r] = -INFINITY;
        for (; r < n; r++) out[r] = dots[r] * scale;
        return;
    }
    float t[16];
    for (int r0 = 0; r0 < n; r0 += 16) {
        const int m = n - r0 < 16 ? n - r0 : 16;
        for (int r = 0; r < m; r++) t[r] = dots[r0 + r] * (1.0f / a->softcap);
        cpu_tanhf_batch(t, t, m);
        for (int r = 0; r < m; r++) out[r0 + r] = j0 + r0 + r < lo ? -INFINITY : t[r] * a->softcap * a->scale;
    }
}

/* The first position token i attends to under the window (0 without one). */
static inline int attn_window_lo(const kern_attn_t *a, int i)
{
    return a->window > 0 ? a->tok_pos[i] - a->window + 1 : 0;
}

/* Positions before this one (a multiple of 64, at most `upto`'s) are masked for token i and are
 * skipped: the window's start rounded down to 64 (see the head of the file). upto: the first
 * compacted index that may not be a position (a tree's start), else the length. */
static inline int attn_window_skip(const kern_attn_t *a, int i, int upto)
{
    const int lo = attn_window_lo(a, i);
    if (lo <= 0) return 0;
    return (lo < upto ? lo : upto) & ~63;
}

/* out[d] = sum_j p[j] * v_j[d] over j < len. tb: tinyBLAS order (lane j % 16); else vec_dot order
 * over n_kv = pad32(len) cells (lane j % 64 for j < n_kv & ~63, then double). acc: [64][hd]. */
static void attn_vsum_scalar(float *out, const float *p, const fl_f16_t *const *rows, int len, int hd, bool tb,
                             float *acc)
{
    const int L = tb ? 16 : 64, np = tb ? len : pad32(len) & ~63, nl = np < len ? np : len;
    memset(acc, 0, (size_t)L * hd * sizeof(float));
    for (int j = 0; j < nl; j++) {
        float *a = acc + (size_t)(j % L) * hd;
        for (int d = 0; d < hd; d++) a[d] = fmaf(p[j], fl_f16_to_f32(rows[j][d]), a[d]);
    }
    for (int d = 0; d < hd; d++) {
        float s[16];
        for (int l = 0; l < 16; l++) {
#define A(k) acc[(size_t)(k) * hd + d]
            s[l] = tb ? A(l) : (A(l) + A(32 + l)) + (A(16 + l) + A(48 + l));
#undef A
        }
        for (int j = 0; j < 8; j++) s[j] += s[j + 8];
        for (int j = 0; j < 4; j++) s[j] += s[j + 4];
        for (int j = 0; j < 2; j++) s[j] += s[j + 2];
        const float r = s[0] + s[1];
        if (tb) {
            out[d] = r;
        } else {
            double sum = np > 0 ? (double)r : 0.0;
            for (int j = np; j < len; j++) sum += (double)(p[j] * fl_f16_to_f32(rows[j][d]));
            out[d] = (float)sum;
        }
    }
}

/* Sum over j = o, o + L, ... < nl of p[j] * v_j[d..d+8) by fma, from +0. */
static inline CPU_AVX2 __m256 vsum_lane(const float *p, const fl_f16_t *const *rows, int o, int L, int nl, int d)
{
    __m256 acc = _mm256_setzero_ps();
    for (int j = o; j < nl; j += L) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), cpu_load_f16x8(rows[j] + d), acc);
    return acc;
}

/* Same numbers as attn_vsum_scalar, 8 dims at a time, the lane accumulators in registers. */
static CPU_AVX2 void attn_vsum_avx2(float *out, const float *p, const fl_f16_t *const *rows, int len, int hd, bool tb,
                                    float *acc)
{
    const int L = tb ? 16 : 64, np = tb ? len : pad32(len) & ~63, nl = np < len ? np : len;
    if (hd % 8) {
        attn_vsum_scalar(out, p, rows, len, hd, tb, acc);
        return;
    }
    for (int d = 0; d < hd; d += 8) {
        __m256 r = _mm256_setzero_ps();
        if (nl > 0) {
            __m256 s8[8];
            for (int l = 0; l < 8; l++) {
                __m256 t0, t1;
                if (tb) {
                    t0 = vsum_lane(p, rows, l, L, nl, d);
                    t1 = vsum_lane(p, rows, l + 8, L, nl, d);
                } else {
                    t0 = _mm256_add_ps(_mm256_add_ps(vsum_lane(p, rows, l, L, nl, d), vsum_lane(p, rows, 32 + l, L, nl, d)),
                                       _mm256_add_ps(vsum_lane(p, rows, 16 + l, L, nl, d), vsum_lane(p, rows, 48 + l, L, nl, d)));
                    t1 = _mm256_add_ps(
                        _mm256_add_ps(vsum_lane(p, rows, l + 8, L, nl, d), vsum_lane(p, rows, 40 + l, L, nl, d)),
                        _mm256_add_ps(vsum_lane(p, rows, 24 + l, L, nl, d), vsum_lane(p, rows, 56 + l, L, nl, d)));
                }
                s8[l] = _mm256_add_ps(t0, t1);
            }
            for (int j = 0; j < 4; j++) s8[j] = _mm256_add_ps(s8[j], s8[j + 4]);
            for (int j = 0; j < 2; j++) s8[j] = _mm256_add_ps(s8[j], s8[j + 2]);
            r = _mm256_add_ps(s8[0], s8[1]);
        }
        if (tb || np >= len) {
            _mm256_storeu_ps(out + d, r); /* (float)(double)r == r: nothing left for the double tail */
        } else {
            /* vec_dot leftovers: products (exact in f32) added in double, position by position */
            __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(r)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(r, 1));
            for (int j = np; j < len; j++) {
                const __m256 pr = _mm256_mul_ps(_mm256_set1_ps(p[j]), cpu_load_f16x8(rows[j] + d));
                lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(pr)));
                hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(pr, 1)));
            }
            _mm256_storeu_ps(out + d, _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)));
        }
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

/* Softmax of sc[0..len) in place (scores -> f16-rounded probabilities), ggml_vec_soft_max_f32 over
 * pad32(len) cells of which those >= len are masked (weigh 0). */
static void attn_softmax_scalar(float *sc, int len)
{
    float mx = -INFINITY;
    for (int j = 0; j < len; j++) mx = fmaxf(mx, sc[j]);
    double sum = 0.0;
    for (int c = 0; c < len; c += 16) {
        float e[16] = {0};
        for (int k = 0; k < 16 && c + k < len; k++) e[k] = sc[c + k] = cpu_v_expf1(sc[c + k] - mx);
        for (int j = 0; j < 8; j++) e[j] += e[j + 8];
        for (int j = 0; j < 4; j++) e[j] += e[j + 4];
        for (int j = 0; j < 2; j++) e[j] += e[j + 2];
        sum += (double)(e[0] + e[1]);
    }
    const float inv = (float)(1.0 / sum);
    for (int j = 0; j < len; j++) sc[j] = f16_round(sc[j] * inv);
}

/* sc has room for pad32(len) floats; the cells past len are used as zero padding. */
static CPU_AVX2 void attn_softmax_avx2(float *sc, int len)
{
    const int n = (len + 15) & ~15;
    for (int j = len; j < n; j++) sc[j] = -INFINITY;
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sc + j));
    float mm[8];
    _mm256_storeu_ps(mm, m8);
    float mx = mm[0];
    for (int k = 1; k < 8; k++) mx = fmaxf(mx, mm[k]);
    const __m256 vmx = _mm256_set1_ps(mx);
    double sum = 0.0;
    for (int c = 0; c < n; c += 16) {
        const __m256 lo = cpu_v_expf_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + c), vmx));
        const __m256 hi = cpu_v_expf_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + c + 8), vmx));
        _mm256_storeu_ps(sc + c, lo);
        _mm256_storeu_ps(sc + c + 8, hi);
        sum += (double)cpu_reduce16_avx2(lo, hi);
    }
    const __m256 inv = _mm256_set1_ps((float)(1.0 / sum));
    for (int j = 0; j < n; j += 8)
        _mm256_storeu_ps(sc + j,
                         _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(sc + j), inv), _MM_FROUND_TO_NEAREST_INT)));
}

static CPU_AVX2 void round_f16_avx2(float *dst, const float *src, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; i++) dst[i] = _cvtsh_ss(_cvtss_sh(src[i], 0));
}

/* ---- AVX-512 versions (16 dims / elements per vector; the same operations per element) ---- */

static inline CPU_AVX512 __m512 load_f16x16(const fl_f16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline CPU_AVX512 float reduce16_512(__m512 v)
{
    return cpu_reduce16_avx2(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* cpu_vecdot_f16_avx2 with zmm accumulators (n % 64 leftovers in double). */
static CPU_AVX512 float vecdot_f16_avx512(const fl_f16_t *a, const float *b, int n)
{
    const int np = n & ~63;
    __m512 acc[4];
    for (int k = 0; k < 4; k++) acc[k] = _mm512_setzero_ps();
    for (int i = 0; i < np; i += 64)
        for (int k = 0; k < 4; k++)
            acc[k] = _mm512_fmadd_ps(load_f16x16(a + i + 16 * k), _mm512_loadu_ps(b + i + 16 * k), acc[k]);
    double sum = (double)reduce16_512(_mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3])));
    for (int i = np; i < n; i++) sum += (double)(_cvtsh_ss(a[i]) * b[i]);
    return (float)sum;
}

/* cpu_v_expf_avx2 16 lanes at a time: scalef(j, n) is j * 2^n with one rounding (= ldexpf), as
 * ggml's AVX-512 ggml_v_expf computes it; |n| > 192 -> 0 or inf, NaN n -> n. */
static inline CPU_AVX512 __m512 v_expf_avx512(__m512 x)
{
    const __m512 r = _mm512_set1_ps(0x1.8p23f);
    const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), r);
    const __m512 n = _mm512_sub_ps(z, r);
    const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
    const __m512 u = _mm512_mul_ps(b, b);
    const __m512 j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f)), u,
                        _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f))),
        u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f)));
    __m512 res = _mm512_scalef_ps(j, n);
    const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192.0f), _CMP_GT_OQ);
    if (big) {
        const __mmask16 pos = _mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_GT_OQ);
        res = _mm512_mask_mov_ps(res, big, _mm512_setzero_ps());
        res = _mm512_mask_mov_ps(res, big & pos, _mm512_set1_ps(INFINITY));
    }
    const __mmask16 nan = _mm512_cmp_ps_mask(n, n, _CMP_UNORD_Q);
    if (nan) res = _mm512_mask_mov_ps(res, nan, n);
    return res;
}

/* attn_softmax_avx2 16 cells at a time (sc has room for pad32(len) floats). */
static CPU_AVX512 void attn_softmax_avx512(float *sc, int len)
{
    const int n = (len + 15) & ~15;
    for (int j = len; j < n; j++) sc[j] = -INFINITY;
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(sc + j));
    const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(m16));
    double sum = 0.0;
    for (int c = 0; c < n; c += 16) {
        const __m512 e = v_expf_avx512(_mm512_sub_ps(_mm512_loadu_ps(sc + c), vmx));
        _mm512_storeu_ps(sc + c, e);
        sum += (double)reduce16_512(e);
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    for (int j = 0; j < n; j += 16)
        _mm512_storeu_ps(sc + j, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(sc + j), inv),
                                                                 _MM_FROUND_TO_NEAREST_INT)));
}

/* tinyBLAS order, n % 16 == 0. */
static CPU_AVX512 float dot16_f16_avx512(const float *a, const fl_f16_t *b, int n)
{
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load_f16x16(b + i), acc);
    return reduce16_512(acc);
}

/* out[j] = the canonical 16-lane reduction of v[j] (l[k] + l[k+8], then +4, +2, +1), 16 rows at
 * once by a transpose-add network; each row's result depends on its own lanes only. */
static inline CPU_AVX512 void reduce16x16_avx512(const __m512 v[16], float out[16])
{
    __m512 w[8], u[4], z[2];
    for (int j = 0; j < 8; j++) /* l[k] + l[k+8]: rows j, j+8 */
        w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[j], v[j + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 4; j++) /* + 4: quarters rows j, j+8, j+4, j+12 */
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[j], w[j + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[j], w[j + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int j = 0; j < 2; j++) /* + 2 */
        z[j] = _mm512_add_ps(_mm512_shuffle_ps(u[j], u[j + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[j], u[j + 2], _MM_SHUFFLE(3, 2, 3, 2)));
    /* + 1; element 4Q + e holds row (0, 8, 4, 12)[Q] + (0, 2, 1, 3)[e] */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(idx, r));
}

/* 16 scores at once: the dots of q16 with 16 K rows, each in tinyBLAS order (tb, hd % 16 == 0) or
 * ggml_vec_dot_f16 order (hd % 64 == 0: no leftovers), the 16-lane reductions done together by a
 * transpose-add network that adds, for every row, l[k] + l[k+8], then +4, +2, +1 (the canonical
 * order of cpu_reduce16_avx2), so each score has the bits of the one-row functions. */
static CPU_AVX512 void kq16_avx512(const float *q16, const fl_f16_t *const *k, int hd, bool tb, float out[16])
{
    __m512 v[16];
    for (int j = 0; j < 16; j++) {
        if (tb) {
            __m512 acc = _mm512_setzero_ps();
            for (int i = 0; i < hd; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q16 + i), load_f16x16(k[j] + i), acc);
            v[j] = acc;
        } else {
            __m512 acc[4];
            for (int c = 0; c < 4; c++) acc[c] = _mm512_setzero_ps();
            for (int i = 0; i < hd; i += 64)
                for (int c = 0; c < 4; c++)
                    acc[c] = _mm512_fmadd_ps(load_f16x16(k[j] + i + 16 * c), _mm512_loadu_ps(q16 + i + 16 * c), acc[c]);
            v[j] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
        }
    }
    reduce16x16_avx512(v, out);
}

/* Chains of the V sums: for the NL lanes lane[0..NL), each of the T * G query rows (token t's G heads
 * at rows t * G..) sums p_j * v_j[d..d+16) by fma from +0 over positions j = lane, lane + L, ... below
 * its token's n[t], in that order, into res[row * 8 + col + u]. The probabilities are position-major,
 * row r's p_j at pt[j * T * G + r] (one base address for every row: T * G row pointers spilled out of
 * the registers). The rows share each V row load while every token has the position (below n[0]: n[]
 * grows with t), and NL lanes advance together (NL * T * G independent chains hide the FMA latency,
 * which one chain at a time left exposed); each chain's order, so its bits, is that of one row alone. */
static inline __attribute__((always_inline)) CPU_AVX512 void
vsum_chains(const float *pt, const fl_f16_t *const *rows, const int *lane, const int NL, const int L, const int *n,
            const int T, const int G, int d, __m512 *res, int col)
{
    __m512 acc[ATTN_MAX_GROUP][8];
    for (int r = 0; r < T * G; r++)
        for (int u = 0; u < NL; u++) acc[r][u] = _mm512_setzero_ps();
    int jb = 0;
    for (; jb + L <= n[0]; jb += L) /* every lane < L: the NL positions exist for every token */
        for (int u = 0; u < NL; u++) {
            const int j = jb + lane[u];
            const __m512 vv = load_f16x16(rows[j] + d);
            const float *pj = pt + (size_t)j * (T * G);
            for (int r = 0; r < T * G; r++) acc[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(pj[r]), vv, acc[r][u]);
        }
    for (int t = 0; t < T; t++) /* each token's rest: what only it (and those after it) reach */
        for (int jt = jb; jt < n[t]; jt += L)
            for (int u = 0; u < NL; u++) {
                const int j = jt + lane[u];
                if (j >= n[t]) continue;
                const __m512 vv = load_f16x16(rows[j] + d);
                for (int h = 0; h < G; h++) {
                    const int r = t * G + h;
                    acc[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(pt[(size_t)j * (T * G) + r]), vv, acc[r][u]);
                }
            }
    for (int r = 0; r < T * G; r++)
        for (int u = 0; u < NL; u++) res[r * 8 + col + u] = acc[r][u];
}

/* The 16 dims from d of sum_j p_j v_j for the T * G rows (token t's over j < n[t]; pt as vsum_chains), into out[row]:
 * lane j % 16, s8[l] = lane l + lane l + 8, then +4, +2, +1 (tb); or lane j % 64, s8[l] = ((l + 32+l)
 * + (16+l + 48+l)) + ((8+l + 40+l) + (24+l + 56+l)), then the same (vec_dot's order; the caller adds
 * its double leftovers). */
static inline __attribute__((always_inline)) CPU_AVX512 void vsum_dims16(const float *pt, const fl_f16_t *const *rows,
                                                                        const int *n, const int T, int d, bool tb,
                                                                        const int G, __m512 out[])
{
    const int TG = T * G, NL = TG <= 3 ? 8 : TG <= 6 ? 4 : TG <= 12 ? 2 : 1; /* NL * TG <= 24 registers */
    __m512 res[ATTN_MAX_GROUP * 8], s8[ATTN_MAX_GROUP][8];
    for (int g = 0; g < 8; g += tb ? 4 : 1) { /* 8 lanes a group: s8[g..g+4) (tb) or s8[g] */
        int lane[8];
        static const int offs[8] = {0, 32, 16, 48, 8, 40, 24, 56};
        for (int u = 0; u < 8; u++) lane[u] = tb ? g + u / 2 + (u % 2) * 8 : g + offs[u];
        for (int c = 0; c < 8; c += NL) vsum_chains(pt, rows, lane + c, NL, tb ? 16 : 64, n, T, G, d, res, c);
        for (int r = 0; r < TG; r++) {
            const __m512 *x = res + r * 8;
            if (tb) {
                for (int u = 0; u < 4; u++) s8[r][g + u] = _mm512_add_ps(x[2 * u], x[2 * u + 1]);
            } else {
                const __m512 t0 = _mm512_add_ps(_mm512_add_ps(x[0], x[1]), _mm512_add_ps(x[2], x[3]));
                const __m512 t1 = _mm512_add_ps(_mm512_add_ps(x[4], x[5]), _mm512_add_ps(x[6], x[7]));
                s8[r][g] = _mm512_add_ps(t0, t1);
            }
        }
    }
    for (int r = 0; r < TG; r++) {
        for (int j = 0; j < 4; j++) s8[r][j] = _mm512_add_ps(s8[r][j], s8[r][j + 4]);
        for (int j = 0; j < 2; j++) s8[r][j] = _mm512_add_ps(s8[r][j], s8[r][j + 2]);
        out[r] = _mm512_add_ps(s8[r][0], s8[r][1]);
    }
}

/* attn_vsum_avx2 16 dims at a time (hd % 16 == 0). */
static CPU_AVX512 void attn_vsum_avx512(float *out, const float *p, const fl_f16_t *const *rows, int len, int hd,
                                        bool tb)
{
    const int np = tb ? len : pad32(len) & ~63, nl = np < len ? np : len;
    for (int d = 0; d < hd; d += 16) {
        __m512 r = _mm512_setzero_ps();
        if (nl > 0) vsum_dims16(p, rows, &nl, 1, d, tb, 1, &r);
        if (tb || np >= len) {
            _mm512_storeu_ps(out + d, r);
        } else {
            __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(r));
            __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
            for (int j = np; j < len; j++) {
                const __m512 pr = _mm512_mul_ps(_mm512_set1_ps(p[j]), load_f16x16(rows[j] + d));
                lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(pr)));
                hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pr), 1))));
            }
            _mm256_storeu_ps(out + d, _mm512_cvtpd_ps(lo));
            _mm256_storeu_ps(out + d + 8, _mm512_cvtpd_ps(hi));
        }
    }
}

/* The cache slot of compacted index j (attn_one). */
static inline size_t attn_slot(const int32_t *bt, int bs, int ts, const int8_t *tbit, int j)
{
    const int p = j < ts ? j : ts + tbit[j - ts];
    return (size_t)bt[p / bs] * bs + (size_t)(p % bs);
}

/* One (token, head). In tree attention the token reads its visible positions compacted, in order:
 * the context, then its ancestors by depth and itself, so that a node at depth d sums exactly what
 * the token at position tree_start + d sums in causal attention (same values at the same indices):
 * a verified draft's logits are those plain decoding computes, bit for bit. */
static void attn_one(const attn_ctx_t *c, int i, int h, float *sc, float *vacc, const fl_f16_t **rows)
{
    const kern_attn_t *a = c->a;
    const cpu_isa_t isa = c->isa;
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads, kvh = h / group;
    const size_t qoff = ((size_t)i * a->n_heads + h) * hd, kv_stride = (size_t)a->n_kv_heads * hd;
    const int bs = a->block_size;
    int len = kern_attn_len(a, i), ts = len; /* compacted index j >= ts reads position ts + tbit[j - ts] */
    int8_t tbit[64];
    if (a->tree_mask) {
        ts = a->tree_start[i];
        len = ts;
        for (uint64_t m = a->tree_mask[i]; m; m &= m - 1) tbit[len++ - ts] = (int8_t)__builtin_ctzll(m);
    }
    if (len <= 0) { /* nothing visible (an empty tree mask at position 0): a zero row */
        memset(a->out + ((size_t)i * a->n_heads + h) * hd, 0, (size_t)hd * sizeof(float));
        return;
    }
    const int32_t *bt = a->block_tables + (size_t)a->tok_seq[i] * a->max_blocks;
    const bool multi = c->multi[i], kq_tb = multi && hd % 16 == 0, kqv_tb = multi && hd % 4 == 0;
    float q16[ATTN_MAX_HEAD_DIM]; /* q rounded to f16: ggml's mul_mat converts it to the vec-dot type */
    if (isa == CPU_ISA_SCALAR)
        for (int d = 0; d < hd; d++) q16[d] = f16_round(a->q[qoff + d]);
    else
        round_f16_avx2(q16, a->q + qoff, hd);

    const int lo = attn_window_lo(a, i), skip = attn_window_skip(a, i, ts);
    int j0 = skip;
    if (isa == CPU_ISA_AVX512 && (kq_tb ? hd % 16 == 0 : hd % 64 == 0)) {
        for (; j0 + 16 <= len; j0 += 16) {
            const fl_f16_t *kr[16];
            for (int j = j0; j < j0 + 16; j++) {
                const size_t slot = attn_slot(bt, bs, ts, tbit, j);
                kr[j - j0] = (const fl_f16_t *)a->k_cache + slot * kv_stride + (size_t)kvh * hd;
                rows[j] = (const fl_f16_t *)a->v_cache + slot * kv_stride + (size_t)kvh * hd;
                prefetch_row(rows[j], hd * sizeof(fl_f16_t)); /* for the sums below; K two passes ahead */
                if (j + 32 < len)
                    prefetch_row((const fl_f16_t *)a->k_cache + attn_slot(bt, bs, ts, tbit, j + 32) * kv_stride +
                                     (size_t)kvh * hd,
                                 hd * sizeof(fl_f16_t));
            }
            float dots[16];
            kq16_avx512(q16, kr, hd, kq_tb, dots);
            attn_scores(a, dots, 16, lo, j0, sc + j0);
        }
    }
    for (int j = j0; j < len; j++) {
        const size_t slot = attn_slot(bt, bs, ts, tbit, j);
        const fl_f16_t *k = (const fl_f16_t *)a->k_cache + slot * kv_stride + (size_t)kvh * hd;
        rows[j] = (const fl_f16_t *)a->v_cache + slot * kv_stride + (size_t)kvh * hd;
        prefetch_row(rows[j], hd * sizeof(fl_f16_t));
        float dot;
        if (isa == CPU_ISA_SCALAR) dot = kq_tb ? cpu_dot16_f16_scalar(q16, k, hd) : cpu_vecdot_f16_scalar(k, q16, hd);
        else if (isa == CPU_ISA_AVX512) dot = kq_tb ? dot16_f16_avx512(q16, k, hd) : vecdot_f16_avx512(k, q16, hd);
        else dot = kq_tb ? cpu_dot16_f16_avx2(q16, k, hd) : cpu_vecdot_f16_avx2(k, q16, hd);
        sc[j] = attn_score(a, dot, lo, j);
    }
    float *out = a->out + qoff;
    sc += skip, rows += skip, len -= skip; /* from here the same sums over the positions left */
    if (isa == CPU_ISA_SCALAR) {
        attn_softmax_scalar(sc, len);
        attn_vsum_scalar(out, sc, rows, len, hd, kqv_tb, vacc);
    } else {
        if (isa == CPU_ISA_AVX512) attn_softmax_avx512(sc, len);
        else attn_softmax_avx2(sc, len);
        if (isa == CPU_ISA_AVX512 && hd % 16 == 0) attn_vsum_avx512(out, sc, rows, len, hd, kqv_tb);
        else attn_vsum_avx2(out, sc, rows, len, hd, kqv_tb, vacc);
    }
}

/* The grouped paths' start: the K and V rows of KV head kvh at positions 0..len of token i's sequence
 * (len: the run's last token's), from one walk of its block table, and the G query heads of tokens
 * i..i+T-1 rounded to f16 in q16 (token t's at t * G * hd). */
static inline __attribute__((always_inline)) CPU_AVX512 void group_rows(const attn_ctx_t *c, int i, int T, int kvh,
                                                                        float *q16, const fl_f16_t **krows,
                                                                        const fl_f16_t **vrows, const int G,
                                                                        const int hd)
{
    const kern_attn_t *a = c->a;
    const size_t kv_stride = (size_t)a->n_kv_heads * hd, hoff = (size_t)kvh * hd;
    const int len = a->tok_pos[i + T - 1] + 1, bs = a->block_size;
    const int32_t *bt = a->block_tables + (size_t)a->tok_seq[i] * a->max_blocks;
    for (int j = 0, b = 0; j < len; b++) {
        const size_t base = (size_t)bt[b] * bs;
        for (int o = 0; o < bs && j < len; o++, j++) {
            const size_t off = (base + (size_t)o) * kv_stride + hoff;
            krows[j] = (const fl_f16_t *)a->k_cache + off;
            vrows[j] = (const fl_f16_t *)a->v_cache + off;
        }
    }
    for (int t = 0; t < T; t++)
        round_f16_avx2(q16 + (size_t)t * G * hd, a->q + ((size_t)(i + t) * a->n_heads + (size_t)kvh * G) * hd, G * hd);
}

/* Grouped fast path (AVX-512, hd % 64 == 0, no tree mask): a run of T tokens of one sequence at
 * consecutive positions, of one role (attn_task's runs), and the G query heads that share one KV head.
 * The same operations per score and output element as attn_one (kq16_avx512, the softmax,
 * attn_vsum_avx512: in tinyBLAS order for prompt tokens, tb, else in vec_dot order with its double
 * leftovers), only shared: the block table is walked once (no division per position), and each K/V
 * row is loaded and converted once for the T * G query rows. For prompt tokens, sharing among a
 * token's G heads took a 512-token prefill from 961 to 1,150 tokens/s and a 2,048-token one from 379
 * to 663 (bench/README.md); runs share among tokens too, as a verify step's chain and a prompt's
 * tokens are. Token t of the run attends to len0 + t positions (a run has no window: T = 1 with one). */
static inline __attribute__((always_inline)) CPU_AVX512 void
attn_group_body(const attn_ctx_t *c, int i, int kvh, float *q16, float *sc, float *pt, const fl_f16_t **krows,
                const fl_f16_t **vrows, const int T, const int G, const int hd, const bool tb)
{
    const kern_attn_t *a = c->a;
    const int ss = c->sstride, skip = attn_window_skip(a, i, a->tok_pos[i] + 1);
    group_rows(c, i, T, kvh, q16, krows, vrows, G, hd);
    /* the masked runs before the window skipped (attn_window_skip): indices below are from skip on */
    const int len0 = a->tok_pos[i] + 1 - skip, lenT = len0 + T - 1, wlo = attn_window_lo(a, i) - skip;
    krows += skip, vrows += skip, sc += skip;

    /* scores (row t * G + h of sc): per K row one 16-lane accumulator (tb), or the 4 vec_dot
     * accumulators combined as (a0 + a2) + (a1 + a3), for each token that reaches the row; then
     * reduced 16 rows at once */
    for (int j0 = 0; j0 < lenT; j0 += 16) {
        const int nr = lenT - j0 < 16 ? lenT - j0 : 16;
        __m512 v[ATTN_MAX_GROUP][16];
        for (int r = 0; r < 16; r++) {
            const int j = j0 + r;
            if (r >= nr) {
                for (int x = 0; x < T * G; x++) v[x][r] = _mm512_setzero_ps();
                continue;
            }
            const fl_f16_t *k = krows[j];
            /* K two passes ahead, and this position's V row for the sums below (which read it once
             * per 16 dims): rows scattered over blocks defeat the hardware's prefetch, and a
             * decode step reads the whole cache once, from memory */
            if (j + 32 < lenT) prefetch_row(krows[j + 32], hd * sizeof(fl_f16_t));
            prefetch_row(vrows[j], hd * sizeof(fl_f16_t));
            __m512 kc[ATTN_MAX_HEAD_DIM / 16];
            for (int e = 0; e < hd / 16; e++) kc[e] = load_f16x16(k + 16 * e);
            for (int t = 0; t < T; t++) {
                if (j >= len0 + t) { /* past this token */
                    for (int h = 0; h < G; h++) v[t * G + h][r] = _mm512_setzero_ps();
                    continue;
                }
                for (int h = 0; h < G; h++) {
                    const float *qh = q16 + (size_t)(t * G + h) * hd;
                    if (tb) { /* element e into lane e % 16, as kq16 with tb */
                        __m512 acc = _mm512_setzero_ps();
                        for (int e = 0; e < hd / 16; e++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * e), kc[e], acc);
                        v[t * G + h][r] = acc;
                    } else {
                        __m512 acc[4];
                        for (int cc = 0; cc < 4; cc++) acc[cc] = _mm512_setzero_ps();
                        for (int e = 0; e < hd / 16; e += 4)
                            for (int cc = 0; cc < 4; cc++)
                                acc[cc] = _mm512_fmadd_ps(kc[e + cc], _mm512_loadu_ps(qh + 16 * (e + cc)), acc[cc]);
                        v[t * G + h][r] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
                    }
                }
            }
        }
        for (int t = 0; t < T; t++) {
            const int nt = len0 + t - j0 < 16 ? len0 + t - j0 : 16;
            if (nt <= 0) continue;
            for (int h = 0; h < G; h++) {
                float dots[16];
                reduce16x16_avx512(v[t * G + h], dots);
                attn_scores(a, dots, nt, wlo, j0, sc + (size_t)(t * G + h) * ss + j0);
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < G; h++) attn_softmax_avx512(sc + (size_t)(t * G + h) * ss, len0 + t);
    /* the probabilities position-major for the V sums (vsum_chains); a token's past its length unread */
    for (int j = 0; j < lenT; j++)
        for (int t = 0; t < T; t++)
            if (j < len0 + t)
                for (int h = 0; h < G; h++) pt[(size_t)j * (T * G) + t * G + h] = sc[(size_t)(t * G + h) * ss + j];

    /* out = sum p_j v_j (vsum_dims16): lanes j % 16 (tb), or j % 64 for j < np, then double */
    int np[ATTN_RUN_MAX], nl[ATTN_RUN_MAX];
    for (int t = 0; t < T; t++) {
        np[t] = tb ? len0 + t : pad32(len0 + t) & ~63;
        nl[t] = np[t] < len0 + t ? np[t] : len0 + t;
    }
    for (int d = 0; d < hd; d += 16) {
        __m512 r[ATTN_MAX_GROUP];
        vsum_dims16(pt, vrows, nl, T, d, tb, G, r);
        for (int t = 0; t < T; t++) {
            const int len = len0 + t;
            float *out = a->out + ((size_t)(i + t) * a->n_heads + (size_t)kvh * G) * hd + d;
            const float *st = sc + (size_t)t * G * ss;
            if (np[t] >= len) {
                for (int h = 0; h < G; h++) _mm512_storeu_ps(out + (size_t)h * hd, r[t * G + h]);
                continue;
            }
            __m512d lo[ATTN_MAX_GROUP], hi[ATTN_MAX_GROUP];
            for (int h = 0; h < G; h++) {
                lo[h] = _mm512_cvtps_pd(_mm512_castps512_ps256(r[t * G + h]));
                hi[h] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r[t * G + h]), 1)));
            }
            for (int j = np[t]; j < len; j++) {
                const __m512 vv = load_f16x16(vrows[j] + d);
                for (int h = 0; h < G; h++) {
                    const __m512 pr = _mm512_mul_ps(_mm512_set1_ps(st[(size_t)h * ss + j]), vv);
                    lo[h] = _mm512_add_pd(lo[h], _mm512_cvtps_pd(_mm512_castps512_ps256(pr)));
                    hi[h] = _mm512_add_pd(
                        hi[h], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pr), 1))));
                }
            }
            for (int h = 0; h < G; h++) {
                _mm256_storeu_ps(out + (size_t)h * hd, _mm512_cvtpd_ps(lo[h]));
                _mm256_storeu_ps(out + (size_t)h * hd + 8, _mm512_cvtpd_ps(hi[h]));
            }
        }
    }
}

/* attn_group_body with the common shapes as compile-time constants (registers, no spills); tb: the
 * tokens are prompt tokens (tinyBLAS order), else decode tokens (ggml_vec_dot_f16 order). */
static CPU_AVX512 void attn_group_avx512(const attn_ctx_t *c, int i, int T, int kvh, float *q16, float *sc,
                                         float *pt, const fl_f16_t **krows, const fl_f16_t **vrows, bool tb)
{
    const int G = c->a->n_heads / c->a->n_kv_heads, hd = c->a->head_dim;
#define GROUP(T_, G_, HD_, TB_) attn_group_body(c, i, kvh, q16, sc, pt, krows, vrows, T_, G_, HD_, TB_)
#define GROUP_RUNS(G_, TB_)                  \
    switch (T) {                             \
    case 1: GROUP(1, G_, 64, TB_); return;   \
    case 2: GROUP(2, G_, 64, TB_); return;   \
    case 3: GROUP(3, G_, 64, TB_); return;   \
    default: GROUP(4, G_, 64, TB_); return;  \
    }
    _Static_assert(ATTN_RUN_MAX == 4, "GROUP_RUNS spells out runs of 1 to 4 tokens");
    if (G == 3 && hd == 64) {
        if (tb) GROUP_RUNS(3, true)
        else GROUP_RUNS(3, false)
    }
    if (G == 1 && hd == 64 && T == 1 && !tb) GROUP(1, 1, 64, false);
    else if (G == 4 && hd == 64 && T == 1 && !tb) GROUP(1, 4, 64, false);
    else if (tb) GROUP(T, G, hd, true);
    else GROUP(T, G, hd, false);
#undef GROUP_RUNS
#undef GROUP
}

/* Tokens a grouped work item takes at most: its T * G query rows fit ATTN_MAX_GROUP. */
static int attn_run_max(int G) { return G > ATTN_MAX_GROUP ? 1 : G * ATTN_RUN_MAX <= ATTN_MAX_GROUP ? ATTN_RUN_MAX : ATTN_MAX_GROUP / G; }

/* Per-thread scratch layout (floats): scores [pad64(maxlen)], V accumulators [64 * head_dim], then
 * maxlen row pointers; then for the grouped path q16 [R * head_dim], R score rows [pad64(maxlen)],
 * their transpose [maxlen * R] and 2 * maxlen row pointers, R = a run's query rows at most. */
static size_t attn_scratch_floats(int maxlen, int hd, int G)
{
    const size_t sp = ((size_t)maxlen + 63) & ~(size_t)63, R = (size_t)G * (size_t)attn_run_max(G);
    return sp + (size_t)64 * hd + 2 * (size_t)maxlen + 16 + R * hd + 2 * R * sp + 4 * (size_t)maxlen + 32;
}

static void attn_task(void *arg, int ith, int nth)
{
    attn_ctx_t *c = arg;
    const kern_attn_t *a = c->a;
    const int G = a->n_heads / a->n_kv_heads;
    const int n_items = c->grouped ? c->n_runs * a->n_kv_heads : a->n_tokens * a->n_heads;
    float *sc = c->scores[ith];
    const size_t sp = ((size_t)c->maxlen + 63) & ~(size_t)63;
    float *vacc = sc + sp;
    const fl_f16_t **rows = (const fl_f16_t **)(void *)(vacc + (size_t)64 * a->head_dim);
    float *q16 = (float *)(void *)(rows + c->maxlen) + 16;
    q16 = (float *)(((uintptr_t)q16 + 63) & ~(uintptr_t)63);
    const size_t R = (size_t)G * (size_t)attn_run_max(G);
    float *gsc = q16 + R * a->head_dim, *pt = gsc + R * sp;
    const fl_f16_t **krows = (const fl_f16_t **)(void *)(pt + R * sp), **vrows = krows + c->maxlen;
    for (;;) {
        const int it = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        if (!c->grouped) {
            attn_one(c, it / a->n_heads, it % a->n_heads, sc, vacc, rows);
            continue;
        }
        const int r = it / a->n_kv_heads, kvh = it % a->n_kv_heads, i = c->runs[r];
        attn_group_avx512(c, i, c->runs[r + 1] - i, kvh, q16, gsc, pt, krows, vrows, c->multi[i]);
    }
}

int cpu_attn_runs(const kern_attn_t *a, const uint8_t *role, int run_max, bool pooled, int nth, int *runs)
{
    int run_len = run_max, n_runs = 0;
    if (pooled) { /* a 4-token run of 3 KV heads is 3 items: one of 2 threads would take two */
        const int fit = a->n_tokens * a->n_kv_heads / (2 * nth);
        run_len = fit < 1 ? 1 : fit < run_len ? fit : run_len;
    }
    for (int i = 0; i < a->n_tokens;) {
        int m = 1; /* the span from i */
        while (i + m < a->n_tokens && a->tok_seq[i + m] == a->tok_seq[i] && a->tok_pos[i + m] == a->tok_pos[i] + m &&
               (!role || role[i + m] == role[i]))
            m++;
        const int k = (m + run_len - 1) / run_len;
        for (int r = 0; r < k; r++) runs[n_runs++] = i + r * (m / k) + (r < m % k ? r : m % k);
        i += m;
    }
    runs[n_runs] = a->n_tokens;
    return n_runs;
}

void cpu_attention(kern_backend_t *be, const kern_attn_t *a)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    if (a->n_tokens <= 0) return;
    if (kern_kv_type(a->k_type) != FL_TYPE_F16 || kern_kv_type(a->v_type) != FL_TYPE_F16) {
        cpu_attention_q(be, a); /* llama.cpp's flash-attention order (cpu_attention_q.c) */
        return;
    }
    if (a->head_dim > ATTN_MAX_HEAD_DIM || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads) goto fail;
    int maxlen = 0, maxseq = 0;
    int64_t work = 0;
    for (int i = 0; i < a->n_tokens; i++) {
        const int len = kern_attn_len(a, i);
        if (len > maxlen) maxlen = len;
        if (a->tok_seq[i] > maxseq) maxseq = a->tok_seq[i];
        work += len;
    }
    work *= (int64_t)a->n_heads * a->head_dim;
    const int G = a->n_heads / a->n_kv_heads;
    const size_t need = attn_scratch_floats(maxlen, a->head_dim, G) * sizeof(float);
    const int nth = cpu_pool_size(cb->pool);
    if (need > cb->scores_len) {
        size_t cap = 0;
        for (int t = 0; t < nth; t++) {
            cap = cb->scores_len;
            if (cpu_grow((void **)&cb->scores[t], &cap, need)) goto fail;
        }
        cb->scores_len = cap; /* every thread's buffer got the same capacity */
    }
    /* Each token's summation order (see the header): by its role where prompt lengths are given,
     * else by the tokens of its sequence in this call. */
    const size_t mbytes = ((size_t)a->n_tokens + 7) & ~(size_t)7;
    uint8_t *multi = malloc(mbytes + (size_t)(a->n_tokens + 1) * sizeof(int) +
                            (a->seq_prompt_len ? 0 : (size_t)(maxseq + 1) * sizeof(int)));
    if (!multi) goto fail;
    int *runs = (int *)(void *)(multi + mbytes);
    if (a->seq_prompt_len) {
        for (int i = 0; i < a->n_tokens; i++) multi[i] = kern_prompt_token(a->seq_prompt_len[a->tok_seq[i]], a->tok_pos[i]);
    } else {
        int *cnt = runs + a->n_tokens + 1;
        memset(cnt, 0, (size_t)(maxseq + 1) * sizeof(int));
        for (int i = 0; i < a->n_tokens; i++) cnt[a->tok_seq[i]]++;
        for (int i = 0; i < a->n_tokens; i++) multi[i] = cnt[a->tok_seq[i]] >= 2;
    }
    attn_ctx_t c = {.a = a, .isa = cb->isa, .scores = cb->scores, .multi = multi, .runs = runs, .maxlen = maxlen,
                    .sstride = (maxlen + 63) & ~63,
                    .grouped = cb->isa == CPU_ISA_AVX512 && a->head_dim % 64 == 0 && G <= ATTN_MAX_GROUP &&
                               !a->tree_mask}; /* the grouped path knows no mask */
    /* The grouped path's runs (cpu_attn_runs): a verify step's chain, a prompt's tokens, of one role;
     * none with a window (each token's skip differs) */
    const bool pooled = !(work < 64 * 1024 || nth == 1);
    c.n_runs = cpu_attn_runs(a, multi, a->window > 0 ? 1 : attn_run_max(G), pooled, nth, runs);
    atomic_init(&c.next, 0);
    if (!pooled) attn_task(&c, 0, 1);
    else cpu_pool_run(cb->pool, attn_task, &c);
    free(multi);
    return;
fail:
    for (size_t k = 0; k < (size_t)a->n_tokens * a->n_heads * a->head_dim; k++) a->out[k] = NAN;
}

static CPU_AVX2 void kv_row_avx2(fl_f16_t *dst, const float *src, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = fl_f32_to_f16(src[i]);
}

void cpu_kv_store(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const float *k,
                  const float *v, const int32_t *slots, int n, int kv_dim)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    const size_t krow = kern_kv_row_bytes(k_type, kv_dim), vrow = kern_kv_row_bytes(v_type, kv_dim);
    for (int i = 0; i < n; i++) {
        if (slots[i] < 0) continue; /* padding row */
        const float *ks = k + (size_t)i * kv_dim, *vs = v + (size_t)i * kv_dim;
        void *pools[2] = {(uint8_t *)k_cache + (size_t)slots[i] * krow, (uint8_t *)v_cache + (size_t)slots[i] * vrow};
        const float *src[2] = {ks, vs};
        const int types[2] = {k_type, v_type};
        for (int p = 0; p < 2; p++) {
            fl_f16_t *dst = pools[p];
            if (types[p] != FL_TYPE_F16) cpu_kv_quantize_row(cb->isa, types[p], pools[p], src[p], kv_dim);
            else if (cb->isa == CPU_ISA_SCALAR)
                for (int d = 0; d < kv_dim; d++) dst[d] = fl_f32_to_f16(src[p][d]);
            else kv_row_avx2(dst, src[p], kv_dim);
        }
    }
}

void cpu_kv_move(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const int32_t *src_slots,
                 const int32_t *dst_slots, int n, int kv_dim)
{
    (void)be;
    const size_t krow = kern_kv_row_bytes(k_type, kv_dim), vrow = kern_kv_row_bytes(v_type, kv_dim);
    uint8_t *kc = k_cache, *vc = v_cache;
    for (int i = 0; i < n; i++) {
        if (src_slots[i] == dst_slots[i]) continue;
        memmove(kc + (size_t)dst_slots[i] * krow, kc + (size_t)src_slots[i] * krow, krow);
        memmove(vc + (size_t)dst_slots[i] * vrow, vc + (size_t)src_slots[i] * vrow, vrow);
    }
}
