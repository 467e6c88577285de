/* cpu_attention_q.c - attention over quantized KV pools (Q8_0 or Q4_0 K and/or V), in llama.cpp's
 * flash-attention order, and the quantizer the KV store writes quantized rows with.
 *
 * llama.cpp keeps a quantized V cache only with flash attention on, and its CPU kernel
 * (ggml_compute_forward_flash_attn_ext_f16, ggml-cpu/ops.cpp, as llama-cpp-python 0.3.16 builds it)
 * computes each (query token, head) on its own, so its numbers depend on neither the batch nor whether
 * the token is a prompt's or a generated one:
 *   Q is converted to the vec-dot type of K's type (Q8_0 for a Q8_0 or Q4_0 K, by ggml's AVX2
 *   quantize_row_q8_0; F16 for an F16 K);
 *   for each visible position j in order: s = vec_dot(K_j, Q) * scale; then
 *     s > M:  ms = expf(M - s), M = s, VKQ *= ms, vs = 1      else:  ms = 1, vs = expf(s - M)
 *     VKQ = fma(V_j, vs, VKQ)   (V_j dequantized to f32 as q * d; an F16 V keeps VKQ in f16, rounded
 *                                after each scale and each fma, as ggml_vec_scale_f16/ggml_vec_mad_f16)
 *     S = fma(S, ms, vs)        (GCC contracts ggml's S*ms + vs)
 *   out = VKQ * (1 / S).
 * expf is the C library's, as ggml calls it. The K dots are ggml_vec_dot_q8_0_q8_0 /
 * ggml_vec_dot_q4_0_q8_0 (8 float lanes, lane k of a block = the exact integer dot of elements
 * 4k..4k+3, acc[k] = fma(d_k * d_q, lane, acc[k]) block after block, then hsum_float_8) and
 * ggml_vec_dot_f16 (cpu_simd.h). The file builds with fp-contract off: every fma is written out.
 *
 * Tree attention reads the visible positions compacted in order, as cpu_attention.c does, so a
 * verified draft token sums what plain decoding sums at its position. A sliding window's masked
 * positions are skipped (ggml skips a -inf mask); soft-capping is ggml's flash form: s = cap *
 * tanh(dot * (scale / cap)), not the scale-tanh-scale of the f16 path (checked against this
 * description only, not against llama.cpp on a soft-capped model).
 *
 * Work items are (run of tokens, KV head): the query rows sharing a KV head walk the positions
 * together, so each K/V row is read and converted once for them (attnq_task). An item first
 * computes every score, then each row's running maximum and its expf values (4 lanes at a time with
 * libm's bits, cpu_expf.c), then the V sums.
 * The scalar, AVX2 and AVX-512 paths give the same bits (only the exact integer parts differ in how
 * they are computed); on AVX-512 the K dots take two heads a register with vpdpbusd and the V sums
 * keep VKQ in registers, each lane doing what the AVX2 path does to its element. */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC optimize("fp-contract=off")

#include "../../common/quant.h"
#include "cpu_internal.h"
#include "cpu_simd.h"

#define ATTNQ_MAX_HEAD_DIM 512
#define ATTNQ_MAX_GROUP 32 /* query rows an item takes at most: a run's tokens x the KV head's heads */
#define ATTNQ_RUN_MAX 4    /* tokens of one sequence at consecutive positions an item takes at most */

typedef struct attnq_ctx {
    const kern_attn_t *a;
    cpu_isa_t isa;
    int k_type, v_type;
    float **scratch;
    int maxlen;
    const int *runs;     /* [n_runs + 1]: the runs, by their first token (attnq_task) */
    int n_runs;
    bool heads_together; /* an item is a run's KV heads one after another */
    atomic_int next;
} attnq_ctx_t;

static inline float f16_round(float f) { return fl_f16_to_f32(fl_f32_to_f16(f)); }

/* ---- Q8_0 quantization: ggml's AVX2 quantize_row_q8_0 (d = amax / 127 stored as f16, q =
 * round-half-even(x * (127 / amax))) ---- */

static fl_f16_t q8_block_scalar(const float *x, int8_t *qs)
{
    float amax = 0.0f;
    for (int j = 0; j < FL_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    for (int j = 0; j < FL_QK; j++) { /* -128 where x * id is not finite (amax below ~1e-37): AVX2's packs */
        const float y = x[j] * id;
        qs[j] = isfinite(y) ? (int8_t)nearbyintf(y) : INT8_MIN;
    }
    return fl_f32_to_f16(amax / 127.f);
}

static CPU_AVX2 fl_f16_t q8_block_avx2(const float *x, int8_t *qs)
{
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(x + 8 * k);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v[0]), _mm256_andnot_ps(signbit, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(signbit, v[2]), _mm256_andnot_ps(signbit, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 vid = _mm256_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)qs, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return (fl_f16_t)_cvtss_sh(amax / 127.f, 0);
}

static void q8_row(cpu_isa_t isa, fl_block_q8_0_t *dst, const float *src, int n)
{
    for (int b = 0; b < n / FL_QK; b++) {
        const fl_f16_t d = isa == CPU_ISA_SCALAR ? q8_block_scalar(src + b * FL_QK, dst[b].qs)
                                                 : q8_block_avx2(src + b * FL_QK, dst[b].qs);
        memcpy(&dst[b].d, &d, sizeof d);
    }
}

void cpu_kv_quantize_row(cpu_isa_t isa, int type, void *dst, const float *src, int n)
{
    if (type == FL_TYPE_Q8_0) q8_row(isa, dst, src, n);
    else quant_quantize_row(type, src, dst, n); /* Q4_0: ggml's quantize_row_q4_0 is its _ref */
}

/* ---- K dots ---- */

static inline float block_d(const void *blk)
{
    fl_f16_t h;
    memcpy(&h, blk, sizeof h); /* d leads both block layouts */
    return fl_f16_to_f32(h);
}

/* hsum_float_8 */
static inline float hsum8(const float acc[8])
{
    return ((acc[4] + acc[0]) + (acc[6] + acc[2])) + ((acc[5] + acc[1]) + (acc[7] + acc[3]));
}

/* ggml_vec_dot_{q8_0,q4_0}_q8_0 of a K row of nb blocks with Q (q8_0 blocks). */
static float kdot_q_scalar(int k_type, const uint8_t *k, const fl_block_q8_0_t *q, int nb)
{
    float acc[8] = {0};
    for (int b = 0; b < nb; b++) {
        int kq[FL_QK];
        float dk;
        if (k_type == FL_TYPE_Q8_0) {
            const fl_block_q8_0_t *blk = (const fl_block_q8_0_t *)k + b;
            dk = block_d(blk);
            for (int j = 0; j < FL_QK; j++) kq[j] = blk->qs[j];
        } else {
            const fl_block_q4_0_t *blk = (const fl_block_q4_0_t *)k + b;
            dk = block_d(blk);
            for (int j = 0; j < FL_QK / 2; j++) kq[j] = (blk->qs[j] & 15) - 8, kq[j + 16] = (blk->qs[j] >> 4) - 8;
        }
        const float dd = dk * block_d(&q[b]);
        for (int l = 0; l < 8; l++) {
            const int lane = kq[4 * l] * q[b].qs[4 * l] + kq[4 * l + 1] * q[b].qs[4 * l + 1] +
                             kq[4 * l + 2] * q[b].qs[4 * l + 2] + kq[4 * l + 3] * q[b].qs[4 * l + 3];
            acc[l] = fmaf(dd, (float)lane, acc[l]);
        }
    }
    return hsum8(acc);
}

/* Block b of a Q8_0 or Q4_0 K row as 32 signed bytes (Q4_0: low nibbles, then high ones, less 8),
 * its scale in *dk: what both vector paths take the integer dots of. */
static CPU_AVX2 __m256i k_block_avx2(int k_type, const uint8_t *k, int b, float *dk)
{
    if (k_type == FL_TYPE_Q8_0) {
        const fl_block_q8_0_t *blk = (const fl_block_q8_0_t *)k + b;
        *dk = block_d(blk);
        return _mm256_loadu_si256((const __m256i *)blk->qs);
    }
    const fl_block_q4_0_t *blk = (const fl_block_q4_0_t *)k + b;
    *dk = block_d(blk);
    return _mm256_sub_epi8(cpu_nibbles_avx2(blk->qs), _mm256_set1_epi8(8));
}

/* The G heads' dots with one K row of nb blocks (each block decoded once for them); q holds the G
 * heads' Q8_0 rows one after another, qd their scales as floats. */
static CPU_AVX2 void kdot_q_avx2(int k_type, const uint8_t *k, const fl_block_q8_0_t *q, const float *qd, int nb,
                                 int G, float *out)
{
    __m256 acc[ATTNQ_MAX_GROUP];
    for (int h = 0; h < G; h++) acc[h] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        float dk;
        const __m256i kx = k_block_avx2(k_type, k, b, &dk);
        const __m256i ax = _mm256_sign_epi8(kx, kx);
        for (int h = 0; h < G; h++) {
            const __m256i qy = _mm256_loadu_si256((const __m256i *)q[(size_t)h * nb + b].qs);
            const __m256i p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy, kx));
            const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
            acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(dk * qd[(size_t)h * nb + b]), lanes, acc[h]);
        }
    }
    for (int h = 0; h < G; h++) out[h] = cpu_hsum8_avx2(acc[h]);
}

/* AVX-512 VNNI: two heads in one register (head h in lanes 0-7, h + 1 in 8-15), the K block's
 * integer dots by vpdpbusd (|k| x sign(q, k), four elements a lane: the exact integers maddubs and
 * madd give the AVX2 path), then the same float fma per lane and the same hsum per head. */
static CPU_AVX512 void kdot_q_avx512(int k_type, const uint8_t *k, const fl_block_q8_0_t *q, const float *qd, int nb,
                                     int G, float *out)
{
    __m512 acc[(ATTNQ_MAX_GROUP + 1) / 2];
    const int pairs = (G + 1) / 2;
    for (int p = 0; p < pairs; p++) acc[p] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        float dk;
        const __m256i kx = k_block_avx2(k_type, k, b, &dk);
        const __m512i k2 = _mm512_inserti64x4(_mm512_castsi256_si512(kx), kx, 1);
        const __m512i ax = _mm512_abs_epi8(k2);
        const __mmask64 neg = _mm512_movepi8_mask(k2), zero = _mm512_cmpeq_epi8_mask(k2, _mm512_setzero_si512());
        for (int p = 0; p < pairs; p++) {
            const int h0 = 2 * p, h1 = h0 + 1 < G ? h0 + 1 : h0;
            const __m512i qy = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)q[(size_t)h0 * nb + b].qs)),
                _mm256_loadu_si256((const __m256i *)q[(size_t)h1 * nb + b].qs), 1);
            /* sign(q, k): -q where k < 0, 0 where k == 0 */
            const __m512i sy = _mm512_maskz_mov_epi8(~zero, _mm512_mask_sub_epi8(qy, neg, _mm512_setzero_si512(), qy));
            const __m512 lanes = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy));
            const __m256 s0 = _mm256_set1_ps(dk * qd[(size_t)h0 * nb + b]), s1 = _mm256_set1_ps(dk * qd[(size_t)h1 * nb + b]);
            const __m512 sc = _mm512_castpd_ps(
                _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(s0)), _mm256_castps_pd(s1), 1));
            acc[p] = _mm512_fmadd_ps(sc, lanes, acc[p]);
        }
    }
    for (int h = 0; h < G; h++) /* each head's 8 lanes */
        out[h] = cpu_hsum8_avx2(h % 2 ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[h / 2]), 1))
                                  : _mm512_castps512_ps256(acc[h / 2]));
}

/* AVX-512 VNNI, 16 positions at once (zmm lane = position): for each ggml lane k of a block, the
 * 4-byte words of the 16 K rows are gathered into one register, so each of the 8 lanes of every head
 * is one vpdpbusd, one subtraction and one fma for 16 positions, and hsum_float_8 is 7 adds of whole
 * registers; kdot_q_avx512 spends a K block's decoding, a lane-pair shuffle and an hsum on every
 * position. The integers: vpdpbusd wants unsigned K bytes, so a Q8_0 K byte is taken as k + 128
 * (k ^ 0x80) and a Q4_0 nibble as is (k + 8), and the lane starts from -128 (or -8) times the sum of
 * Q's 4 bytes, plus CPU_LANE_MAGIC so that subtracting CPU_LANE_MAGIC_F gives the lane exactly
 * (cpu_internal.h). Every float operation is the one the other paths do, in the same order, so the
 * bits are theirs. Positions [0, return) get their dots in out[h * stride + j]; the rest (fewer than
 * 16, or a pool too large for 32-bit gather offsets) are left to kdot_q_avx512. */
static CPU_AVX512 int kdot16_q_avx512(int k_type, const uint8_t *kc, size_t krow, size_t khead, const int32_t *slots,
                                      int len, const fl_block_q8_0_t *q, const float *qd, int nb, int G, float *out,
                                      int stride, size_t kbytes, const uint8_t *vc, size_t vrow, size_t vhead,
                                      size_t vbytes)
{
    if (len < 16) return 0;
    int32_t max_slot = 0;
    for (int j = 0; j < len; j++) max_slot = slots[j] > max_slot ? slots[j] : max_slot;
    if ((int64_t)max_slot * (int64_t)krow + (int64_t)khead + (int64_t)krow >= INT32_MAX) return 0;
    const bool q8k = k_type == FL_TYPE_Q8_0;
    const int bb = q8k ? (int)sizeof(fl_block_q8_0_t) : (int)sizeof(fl_block_q4_0_t), off = q8k ? 128 : 8;
    /* per (head, block, lane): Q's word and the lane's start */
    int32_t qw[ATTNQ_MAX_GROUP * ATTNQ_MAX_HEAD_DIM / 4], qi[ATTNQ_MAX_GROUP * ATTNQ_MAX_HEAD_DIM / 4];
    for (int hb = 0; hb < G * nb; hb++)
        for (int l = 0; l < 8; l++) {
            const int8_t *w = q[hb].qs + 4 * l;
            memcpy(&qw[8 * hb + l], w, 4);
            qi[8 * hb + l] = CPU_LANE_MAGIC - off * (w[0] + w[1] + w[2] + w[3]);
        }
    const __m512 magic_f = _mm512_set1_ps(CPU_LANE_MAGIC_F);
    const __m512i flip = _mm512_set1_epi32((int)0x80808080u), nib = _mm512_set1_epi32(0x0f0f0f0f);
    int j0 = 0;
    for (; j0 + 16 <= len; j0 += 16) {
        /* K two passes ahead, and these positions' V rows for the sums (prefetch_row) */
        for (int j = j0 + 32; j < j0 + 48 && j < len; j++) prefetch_row(kc + (size_t)slots[j] * krow + khead, kbytes);
        for (int j = j0; j < j0 + 16; j++) prefetch_row(vc + (size_t)slots[j] * vrow + vhead, vbytes);
        const __m512i offs = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_loadu_si512((const void *)(slots + j0)),
                                                                 _mm512_set1_epi32((int)krow)),
                                              _mm512_set1_epi32((int)khead));
        for (int h0 = 0; h0 < G; h0 += 4) {
            const int nh = G - h0 < 4 ? G - h0 : 4;
            __m512 dd[ATTNQ_MAX_HEAD_DIM / FL_QK][4]; /* d_k * d_q per block and head, 16 positions */
            for (int b = 0; b < nb; b++) {
                const __m512i dw = _mm512_i32gather_epi32(offs, (const void *)(kc + (size_t)b * bb), 1);
                const __m512 dk = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw)); /* d leads the block */
                for (int h = 0; h < nh; h++) dd[b][h] = _mm512_mul_ps(dk, _mm512_set1_ps(qd[(size_t)(h0 + h) * nb + b]));
            }
            __m512 acc[8][4];
            for (int l = 0; l < 8; l++) {
                for (int h = 0; h < nh; h++) acc[l][h] = _mm512_setzero_ps();
                for (int b = 0; b < nb; b++) {
                    /* lane l of block b for the 16 positions, as unsigned bytes */
                    const int word = q8k ? l : l % 4;
                    const __m512i raw =
                        _mm512_i32gather_epi32(offs, (const void *)(kc + (size_t)b * bb + 2 + 4 * word), 1);
                    const __m512i kw = q8k ? _mm512_xor_si512(raw, flip)
                                           : l < 4 ? _mm512_and_si512(raw, nib)
                                                   : _mm512_and_si512(_mm512_srli_epi32(raw, 4), nib);
                    for (int h = 0; h < nh; h++) {
                        const int at = 8 * ((h0 + h) * nb + b) + l;
                        const __m512i li = _mm512_dpbusd_epi32(_mm512_set1_epi32(qi[at]), kw, _mm512_set1_epi32(qw[at]));
                        acc[l][h] = _mm512_fmadd_ps(dd[b][h], _mm512_sub_ps(_mm512_castsi512_ps(li), magic_f), acc[l][h]);
                    }
                }
            }
            for (int h = 0; h < nh; h++) { /* hsum_float_8: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)) */
                const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[4][h], acc[0][h]), _mm512_add_ps(acc[6][h], acc[2][h])),
                                               _mm512_add_ps(_mm512_add_ps(acc[5][h], acc[1][h]), _mm512_add_ps(acc[7][h], acc[3][h])));
                _mm512_storeu_ps(out + (size_t)(h0 + h) * stride + j0, r);
            }
        }
    }
    return j0;
}

/* ---- V sums: y = fma(x, v, y) and y *= v per element, in f32 or (F16 V) rounded to f16 ---- */

static void v_dequant(int v_type, const uint8_t *v, float *out, int hd)
{
    if (v_type == FL_TYPE_F16) {
        for (int d = 0; d < hd; d++) out[d] = fl_f16_to_f32(((const fl_f16_t *)v)[d]);
    } else {
        quant_dequantize_row(v_type, v, out, hd); /* ggml's dequantize_row_*: q * d */
    }
}

static void v_scale_scalar(float *y, float m, int hd, bool f16)
{
    for (int d = 0; d < hd; d++) y[d] = f16 ? f16_round(y[d] * m) : y[d] * m;
}

static void v_mad_scalar(float *y, const float *x, float v, int hd, bool f16)
{
    for (int d = 0; d < hd; d++) y[d] = f16 ? f16_round(fmaf(x[d], v, y[d])) : fmaf(x[d], v, y[d]);
}

static CPU_AVX2 __m256 round8(__m256 x, bool f16)
{
    return f16 ? _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)) : x;
}

static CPU_AVX2 void v_scale_avx2(float *y, float m, int hd, bool f16)
{
    const __m256 vm = _mm256_set1_ps(m);
    for (int d = 0; d < hd; d += 8) _mm256_storeu_ps(y + d, round8(_mm256_mul_ps(_mm256_loadu_ps(y + d), vm), f16));
}

static CPU_AVX2 void v_mad_avx2(float *y, const float *x, float v, int hd, bool f16)
{
    const __m256 vv = _mm256_set1_ps(v);
    for (int d = 0; d < hd; d += 8)
        _mm256_storeu_ps(y + d, round8(_mm256_fmadd_ps(_mm256_loadu_ps(x + d), vv, _mm256_loadu_ps(y + d)), f16));
}

static CPU_AVX2 void v_dequant_q8_avx2(const fl_block_q8_0_t *v, float *out, int hd)
{
    for (int b = 0; b < hd / FL_QK; b++) {
        const __m256 d = _mm256_set1_ps(block_d(&v[b]));
        for (int k = 0; k < 4; k++) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v[b].qs + 8 * k)));
            _mm256_storeu_ps(out + b * FL_QK + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
    }
}

/* AVX-512: the V sums with VKQ held in registers across the positions, instead of loaded and stored
 * for every position and head: the head dimension in chunks of 32 (two registers a head), up to 8
 * heads at once, each chunk of a V row dequantized once for them. Every lane does what the AVX2
 * path does to that element (the same dequantization q * d, mul, fma and f16 rounding: element-wise
 * IEEE operations do not depend on the vector width), so the bits are the same. */
#define ATTNQ_V_HEADS 8

static CPU_AVX512 __m512 round16(__m512 x, bool f16)
{
    return f16 ? _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)) : x;
}

static CPU_AVX512 void v_chunk_avx512(int v_type, const uint8_t *v, int c0, __m512 x[2])
{
    if (v_type == FL_TYPE_F16) {
        for (int k = 0; k < 2; k++)
            x[k] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const fl_f16_t *)v + c0 + 16 * k)));
        return;
    }
    const int b = c0 / FL_QK;
    if (v_type == FL_TYPE_Q8_0) {
        const fl_block_q8_0_t *blk = (const fl_block_q8_0_t *)v + b;
        const __m512 d = _mm512_set1_ps(block_d(blk));
        for (int k = 0; k < 2; k++)
            x[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk->qs + 16 * k)))), d);
    } else { /* Q4_0: element j is the low nibble of byte j, element j + 16 the high one, less 8 */
        const fl_block_q4_0_t *blk = (const fl_block_q4_0_t *)v + b;
        const __m512 d = _mm512_set1_ps(block_d(blk));
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)blk->qs));
        const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), _mm512_set1_epi32(8));
        const __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), _mm512_set1_epi32(8));
        x[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d);
        x[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d);
    }
}

static CPU_AVX512 void v_sums_avx512(int v_type, const uint8_t *vc, size_t vrow, size_t vhead, const int32_t *slots,
                                     int len, const int *row_len, const float *ms, const float *vs, int maxlen, int G,
                                     int hd, float *vkq)
{
    const bool f16 = v_type == FL_TYPE_F16;
    for (int h0 = 0; h0 < G; h0 += ATTNQ_V_HEADS) {
        const int nh = G - h0 < ATTNQ_V_HEADS ? G - h0 : ATTNQ_V_HEADS;
        for (int c0 = 0; c0 < hd; c0 += 32) {
            __m512 y[ATTNQ_V_HEADS][2];
            for (int h = 0; h < nh; h++) y[h][0] = y[h][1] = _mm512_setzero_ps();
            for (int j = 0; j < len; j++) {
                __m512 x[2];
                v_chunk_avx512(v_type, vc + (size_t)slots[j] * vrow + vhead, c0, x);
                for (int h = 0; h < nh; h++) {
                    if (j >= row_len[h0 + h]) continue; /* past this row's token (a run's earlier one) */
                    const float m = ms[(size_t)(h0 + h) * maxlen + j], w = vs[(size_t)(h0 + h) * maxlen + j];
                    const __m512 vw = _mm512_set1_ps(w);
                    if (m != 1.0f) {
                        const __m512 vm = _mm512_set1_ps(m);
                        y[h][0] = round16(_mm512_mul_ps(y[h][0], vm), f16);
                        y[h][1] = round16(_mm512_mul_ps(y[h][1], vm), f16);
                    }
                    y[h][0] = round16(_mm512_fmadd_ps(x[0], vw, y[h][0]), f16);
                    y[h][1] = round16(_mm512_fmadd_ps(x[1], vw, y[h][1]), f16);
                }
            }
            for (int h = 0; h < nh; h++) {
                _mm512_storeu_ps(vkq + (size_t)(h0 + h) * hd + c0, y[h][0]);
                _mm512_storeu_ps(vkq + (size_t)(h0 + h) * hd + c0 + 16, y[h][1]);
            }
        }
    }
}

/* After the batched exps: m holds each position's exp, v whether it raised the maximum. Turns them
 * into the chain's factors (a rise: rescale by the exp, weigh the position 1; else rescale by 1,
 * weigh it by the exp) and returns S, the fmaf chain of cpu_attention_q's header (inlined here:
 * this file has no FMA target of its own, and fmaf was a library call a position). */
static CPU_AVX2 float softmax_factors(float *m, float *v, int len)
{
    float sum = 0.0f;
    for (int j = 0; j < len; j++) {
        const float e = m[j];
        if (v[j] != 0.0f) {
            v[j] = 1.0f;
        } else {
            m[j] = 1.0f;
            v[j] = e;
        }
        sum = __builtin_fmaf(sum, m[j], v[j]);
    }
    return sum;
}

/* ---- one work item ---- */

/* Tokens an item takes at most (a run: attnq_task), its query rows R = T * G within ATTNQ_MAX_GROUP. */
static int attnq_run_max(int G) { return G * ATTNQ_RUN_MAX <= ATTNQ_MAX_GROUP ? ATTNQ_RUN_MAX : ATTNQ_MAX_GROUP / G; }

/* Per-thread scratch (floats): slots [maxlen] (int32), scores, ms, vs [R][maxlen] each, the Q rows
 * [R][hd] (as q8_0 blocks or floats), VKQ [R][hd], one V row [hd]; R: a run's query rows at most. */
static size_t attnq_scratch_floats(int maxlen, int hd, int G)
{
    const size_t R = (size_t)G * (size_t)attnq_run_max(G);
    return (size_t)maxlen * (1 + 3 * R) + R * hd * 2 + hd + 64;
}

/* One item: tokens i..i+T-1 (a run of one sequence at consecutive positions, no window or tree mask
 * when T > 1) and KV head kvh. Its R = T * G query rows (token t's heads at t * G..) share each K row
 * gather and V row load; token t's rows stop at its own length (row_len), so each row's chain and
 * numbers are those of its token alone. */
static void attnq_item(const attnq_ctx_t *c, int i, int T, int kvh, float *scratch)
{
    const kern_attn_t *a = c->a;
    const cpu_isa_t isa = c->isa;
    const int hd = a->head_dim, Gh = a->n_heads / a->n_kv_heads, G = T * Gh, kv_dim = a->n_kv_heads * hd;
    const int maxlen = c->maxlen, iL = i + T - 1; /* G: the item's query rows; iL: its last token */
    const size_t krow = kern_kv_row_bytes(c->k_type, kv_dim), vrow = kern_kv_row_bytes(c->v_type, kv_dim);
    const size_t khead = kern_kv_row_bytes(c->k_type, hd) * (size_t)kvh, vhead = kern_kv_row_bytes(c->v_type, hd) * (size_t)kvh;
    int32_t *slots = (int32_t *)(void *)scratch;
    float *sc = scratch + maxlen, *ms = sc + (size_t)G * maxlen, *vs = ms + (size_t)G * maxlen;
    float *qbuf = vs + (size_t)G * maxlen, *vkq = qbuf + (size_t)G * hd, *vrow_f = vkq + (size_t)G * hd;

    /* the visible positions' slots, in order (tree attention: context, then ancestors by depth) */
    const int32_t *bt = a->block_tables + (size_t)a->tok_seq[iL] * a->max_blocks;
    const int bs = a->block_size;
    int len = 0;
    const int n_pos = kern_attn_len(a, iL), lo = a->window > 0 ? a->tok_pos[iL] - a->window + 1 : 0;
    /* outside the window: masked, skipped as ggml skips -inf; before a tree's start every position is
     * visible, so those are walked block by block (one division a block, not one a position) */
    const int start = lo > 0 ? lo : 0, all_end = a->tree_mask && a->tree_start[iL] < n_pos ? a->tree_start[iL] : n_pos;
    for (int p = start; p < all_end;) {
        const int b = p / bs, end = (b + 1) * bs < all_end ? (b + 1) * bs : all_end;
        for (const int32_t base = bt[b] * bs - b * bs; p < end; p++) slots[len++] = base + p;
    }
    for (int p = all_end > start ? all_end : start; p < n_pos; p++)
        if (kern_attn_visible(a, iL, p)) slots[len++] = bt[p / bs] * bs + p % bs;
    /* row r's query (and output) offset: token i + r / Gh, head kvh * Gh + r % Gh */
#define ROW_OFF(r) (((size_t)(i + (r) / Gh) * a->n_heads + (size_t)kvh * Gh + (size_t)((r) % Gh)) * hd)
    if (len == 0) { /* nothing visible (T = 1): a zero row, as cpu_attention */
        memset(a->out + ROW_OFF(0), 0, (size_t)G * hd * sizeof(float));
        return;
    }
    int row_len[ATTNQ_MAX_GROUP]; /* token t of the run sees the first len - (T - 1 - t) positions */
    for (int r = 0; r < G; r++) row_len[r] = len - (T - 1 - r / Gh);

    /* Q in K's vec-dot type */
    const bool kf16 = c->k_type == FL_TYPE_F16, vf16 = c->v_type == FL_TYPE_F16;
    fl_block_q8_0_t *q8 = (fl_block_q8_0_t *)(void *)qbuf; /* G * hd / 32 blocks fit in G * hd floats */
    for (int h = 0; h < G; h++) {
        const float *qh = a->q + ROW_OFF(h);
        if (kf16)
            for (int d = 0; d < hd; d++) qbuf[(size_t)h * hd + d] = f16_round(qh[d]);
        else
            q8_row(isa, q8 + (size_t)h * (hd / FL_QK), qh, hd);
    }

    /* scores */
    const uint8_t *kc = a->k_cache, *vc = a->v_cache;
    const int nb = hd / FL_QK;
    /* soft-capping as ggml's flash attention does it: scale / cap, then cap * tanh */
    const float scale = a->softcap > 0.0f ? a->scale / a->softcap : a->scale;
    float qd[ATTNQ_MAX_GROUP * ATTNQ_MAX_HEAD_DIM / FL_QK], dots[ATTNQ_MAX_GROUP] = {0};
    if (!kf16)
        for (int b = 0; b < G * nb; b++) qd[b] = block_d(&q8[b]);
    const size_t kbytes = kern_kv_row_bytes(c->k_type, hd), vbytes = kern_kv_row_bytes(c->v_type, hd);
    /* on AVX-512, 16 positions at a time; their dots go to sc, read back below */
    const int j16 = !kf16 && isa == CPU_ISA_AVX512
                        ? kdot16_q_avx512(c->k_type, kc, krow, khead, slots, len, q8, qd, nb, G, sc, maxlen,
                                          kbytes, vc, vrow, vhead, vbytes)
                        : 0;
    for (int h = 0; h < G && j16; h++) { /* the same operations as below, a head's row at a time */
        float *s = sc + (size_t)h * maxlen;
        for (int j = 0; j < j16; j++) s[j] = s[j] * scale;
        if (a->softcap > 0.0f) {
            cpu_tanhf_batch(s, s, j16);
            for (int j = 0; j < j16; j++) s[j] = a->softcap * s[j];
        }
    }
    for (int j = j16; j < len; j++) {
        const uint8_t *k = kc + (size_t)slots[j] * krow + khead;
        if (j + 8 < len) prefetch_row(kc + (size_t)slots[j + 8] * krow + khead, kbytes); /* as kdot16 */
        prefetch_row(vc + (size_t)slots[j] * vrow + vhead, vbytes);
        if (!kf16 && isa == CPU_ISA_AVX512) kdot_q_avx512(c->k_type, k, q8, qd, nb, G, dots);
        else if (!kf16 && isa != CPU_ISA_SCALAR) kdot_q_avx2(c->k_type, k, q8, qd, nb, G, dots);
        for (int h = 0; h < G; h++) {
            float dot = dots[h];
            if (kf16)
                dot = isa == CPU_ISA_SCALAR ? cpu_vecdot_f16_scalar((const fl_f16_t *)k, qbuf + (size_t)h * hd, hd)
                                            : cpu_vecdot_f16_avx2((const fl_f16_t *)k, qbuf + (size_t)h * hd, hd);
            else if (isa == CPU_ISA_SCALAR)
                dot = kdot_q_scalar(c->k_type, k, q8 + (size_t)h * nb, nb);
            float sj = dot * scale;
            if (a->softcap > 0.0f) sj = a->softcap * tanhf(sj);
            sc[(size_t)h * maxlen + j] = sj;
        }
    }

    /* the online softmax's factors: ms (rescale at a new maximum) and vs (this position's weight) */
    float S[ATTNQ_MAX_GROUP];
    for (int h = 0; h < G; h++) {
        const float *s = sc + (size_t)h * maxlen;
        float *m_h = ms + (size_t)h * maxlen, *v_h = vs + (size_t)h * maxlen;
        float M = -INFINITY, sum = 0.0f;
        const int len_h = row_len[h];
        if (isa == CPU_ISA_SCALAR) {
            for (int j = 0; j < len_h; j++) {
                if (s[j] > M) {
                    m_h[j] = expf(M - s[j]);
                    v_h[j] = 1.0f;
                    M = s[j];
                } else {
                    m_h[j] = 1.0f;
                    v_h[j] = expf(s[j] - M);
                }
                sum = fmaf(sum, m_h[j], v_h[j]);
            }
        } else {
            /* The same chain with its exps batched: the running maximum first (each exp's argument
             * is known once it is), then the exps in lanes (cpu_expf.c: libm's bits), then the sums. */
            for (int j = 0; j < len_h; j++) {
                const bool rise = s[j] > M;
                m_h[j] = rise ? M - s[j] : s[j] - M; /* the argument, for now */
                v_h[j] = rise;
                if (rise) M = s[j];
            }
            cpu_expf_batch(m_h, m_h, len_h);
            sum = softmax_factors(m_h, v_h, len_h);
        }
        S[h] = sum;
    }

    /* VKQ = sum of V rows weighted as the chain says */
    memset(vkq, 0, (size_t)G * hd * sizeof(float));
    if (isa == CPU_ISA_AVX512)
        v_sums_avx512(c->v_type, vc, vrow, vhead, slots, len, row_len, ms, vs, maxlen, G, hd, vkq);
    for (int j = 0; j < len && isa != CPU_ISA_AVX512; j++) {
        const uint8_t *v = vc + (size_t)slots[j] * vrow + vhead;
        if (isa != CPU_ISA_SCALAR && c->v_type == FL_TYPE_Q8_0) v_dequant_q8_avx2((const fl_block_q8_0_t *)v, vrow_f, hd);
        else v_dequant(c->v_type, v, vrow_f, hd);
        for (int h = 0; h < G; h++) {
            if (j >= row_len[h]) continue;
            float *y = vkq + (size_t)h * hd;
            const float m = ms[(size_t)h * maxlen + j], w = vs[(size_t)h * maxlen + j];
            if (isa == CPU_ISA_SCALAR) {
                if (m != 1.0f) v_scale_scalar(y, m, hd, vf16);
                v_mad_scalar(y, vrow_f, w, hd, vf16);
            } else {
                if (m != 1.0f) v_scale_avx2(y, m, hd, vf16);
                v_mad_avx2(y, vrow_f, w, hd, vf16);
            }
        }
    }
    for (int h = 0; h < G; h++) {
        const float inv = 1.0f / S[h];
        float *out = a->out + ROW_OFF(h);
        for (int d = 0; d < hd; d++) out[d] = vkq[(size_t)h * hd + d] * inv;
    }
}
#undef ROW_OFF

/* Items are (run, KV head): a run is up to ATTNQ_RUN_MAX tokens of one sequence at consecutive
 * positions (a verify step's chain, a prompt's tokens; no window or tree mask), whose query rows share
 * each K gather and V load (attnq_item). With enough runs for the threads, an item is a run's KV heads
 * in turn on one thread: a KV head's slice of a quantized row (68 bytes for Q8_0 at head_dim 64)
 * shares its first and last cache lines with its neighbours', and the thread that reads the
 * neighbour next finds them in its own cache instead of asking memory again (a decode step at long
 * context waits on line requests: q8_0 at batch 32 over 2,048-token contexts rose 5%,
 * bench/README.md). Same numbers either way. */
static void attnq_task(void *arg, int ith, int nth)
{
    (void)nth;
    attnq_ctx_t *c = arg;
    const kern_attn_t *a = c->a;
    const int per_item = c->heads_together ? a->n_kv_heads : 1, n_items = c->n_runs * a->n_kv_heads / per_item;
    for (;;) {
        const int it = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        for (int k = 0; k < per_item; k++) {
            const int at = it * per_item + k, r = at / a->n_kv_heads, i = c->runs[r];
            attnq_item(c, i, c->runs[r + 1] - i, at % a->n_kv_heads, c->scratch[ith]);
        }
    }
}

void cpu_attention_q(kern_backend_t *be, const kern_attn_t *a)
{
    cpu_backend_t *cb = (cpu_backend_t *)be;
    const int k_type = kern_kv_type(a->k_type), v_type = kern_kv_type(a->v_type);
    const int hd = a->head_dim;
    if (!kern_kv_type_ok(k_type) || !kern_kv_type_ok(v_type) || hd > ATTNQ_MAX_HEAD_DIM || hd % FL_QK ||
        a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads || a->n_heads / a->n_kv_heads > ATTNQ_MAX_GROUP)
        goto fail;
    int maxlen = 1;
    int64_t work = 0;
    for (int i = 0; i < a->n_tokens; i++) {
        const int len = kern_attn_len(a, i);
        if (len > maxlen) maxlen = len;
        work += len;
    }
    work *= (int64_t)a->n_heads * hd;
    const int nth = cpu_pool_size(cb->pool);
    const size_t need = attnq_scratch_floats(maxlen, hd, a->n_heads / a->n_kv_heads) * sizeof(float);
    if (need > cb->scores_len) {
        size_t cap = 0;
        for (int t = 0; t < nth; t++) {
            cap = cb->scores_len;
            if (cpu_grow((void **)&cb->scores[t], &cap, need)) goto fail;
        }
        cb->scores_len = cap;
    }
    int *runs = malloc((size_t)(a->n_tokens + 1) * sizeof *runs);
    if (!runs) goto fail;
    attnq_ctx_t c = {.a = a, .isa = cb->isa, .k_type = k_type, .v_type = v_type, .scratch = cb->scores,
                     .maxlen = maxlen, .runs = runs};
    /* runs (cpu_attn_runs) of any role (this order has none), none with a window or a tree mask */
    const bool pooled = !(work < 64 * 1024 || nth == 1);
    c.n_runs = cpu_attn_runs(a, NULL, a->window > 0 || a->tree_mask ? 1 : attnq_run_max(a->n_heads / a->n_kv_heads),
                             pooled, nth, runs);
    c.heads_together = c.n_runs >= 2 * nth;
    atomic_init(&c.next, 0);
    if (!pooled) attnq_task(&c, 0, 1);
    else cpu_pool_run(cb->pool, attnq_task, &c);
    free(runs);
    return;
fail:
    for (size_t k = 0; k < (size_t)a->n_tokens * a->n_heads * hd; k++) a->out[k] = NAN;
}
