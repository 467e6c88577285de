/* cpu_qtile.h - register-tiled quantized dot products, included twice by cpu_matmul.c: once under
 * target("avx2,fma,f16c") with QT_VNNI 0 and once under the AVX-512 VNNI target with QT_VNNI 1.
 * QT(name) appends the ISA suffix. No include guard on purpose.
 *
 * Numerics are ggml's x86 ggml_vec_dot_{q4_0,q8_0}_q8_0 / ggml_vec_dot_q4_1_q8_1, bit for bit (see
 * the order in cpu_matmul.c): per output 8 float lanes, lane k of a block is the exact integer sum
 * of the 4 products of block elements 4k..4k+3 (mul_sum_*_pairs_float), converted to float and
 * accumulated as acc[k] = fma(d_w * d_x, lane, acc[k]) block after block; the result is
 * hsum_float_8(acc) (+ summs for Q4_1, summs = fma(m_w, s_x, summs) in block order).
 *
 * A tile computes 8 (row, token) pairs per block of 32: tile4 takes 4 weight rows x 2 tokens (TP=2
 * does two such token pairs, reusing the loaded weight rows), tile8 takes 8 rows x 1 token. The
 * integer lanes are computed with maddubs/madd on AVX2 and vpdpbusd with VNNI (exact either way), so
 * the result of a pair depends neither on the tile, the ISA, nor on n.
 *
 * Integer tricks (all exact):
 *   Q8_0 x Q8_0, AVX2: maddubs(|w|, sign(x, w)) (|x| <= 127 so no int16 saturation).
 *   Q8_0, VNNI: vpdpbusd(init, x + 128, w) with init = -128 * lane sums of w, once per row block.
 *   Q4_0: q in 0..15 is unsigned: AVX2 uses q - 8 with the sign trick; VNNI starts the accumulator
 *         at -8 * lane sums of x (once per token block).
 *   Q4_1: dot(q, x) directly. */

static inline float QT(h2f)(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Weight block -> 32 bytes (s8 for Q8_0, u8 0..15 for Q4_*). */
static inline __attribute__((always_inline)) __m256i QT(wload)(const uint8_t *blk, const int type)
{
    if (type == FL_TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    if (type == FL_TYPE_Q4_0) return cpu_nibbles_avx2(blk + 2);
    return cpu_nibbles_avx2(blk + 4);
}

#if QT_VNNI
/* Per-row and per-token accumulator starts (see the header comment). */
static inline __m256i QT(wbias)(__m256i w, const int type)
{
    if (type != FL_TYPE_Q8_0) return _mm256_setzero_si256();
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), w));
}
static inline __m256i QT(xbias)(__m256i x, const int type)
{
    if (type != FL_TYPE_Q4_0) return _mm256_setzero_si256();
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(8), x));
}
static inline __m256i QT(xprep)(__m256i x, const int type)
{
    return type == FL_TYPE_Q8_0 ? _mm256_xor_si256(x, _mm256_set1_epi8((char)0x80)) : x;
}
/* bias: row bias for Q8_0, token bias for Q4_0 */
static inline __attribute__((always_inline)) __m256i QT(dot)(__m256i w, __m256i xp, __m256i wb, __m256i xb,
                                                             const int type)
{
    if (type == FL_TYPE_Q8_0) return _mm256_dpbusd_epi32(wb, xp, w);
    return _mm256_dpbusd_epi32(xb, w, xp);
}
#else
/* Q4_0 weights are recentred to q - 8 so every type but Q4_1 is a signed x signed product. */
static inline __m256i QT(wprep)(__m256i w, const int type)
{
    return type == FL_TYPE_Q4_0 ? _mm256_sub_epi8(w, _mm256_set1_epi8(8)) : w;
}
static inline __attribute__((always_inline)) __m256i QT(dot)(__m256i w, __m256i x, const int type)
{
    const __m256i ones = _mm256_set1_epi16(1);
    if (type != FL_TYPE_Q4_1)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
}
#endif

/* 4 weight rows x (2 * TP) tokens. out[t][r]. */
static inline __attribute__((always_inline)) void QT(tile4)(const mm_ctx_t *c, const int type, const int TP,
                                                             const uint8_t *const wr[4], const int tok[4],
                                                             float out[4][4])
{
    const int nb = c->nb, cols = c->cols;
    const size_t bb = type == FL_TYPE_Q8_0 ? 34 : type == FL_TYPE_Q4_0 ? 18 : 20;
    __m256 acc[4][4];
    for (int t = 0; t < 4; t++)
        for (int r = 0; r < 4; r++) acc[t][r] = _mm256_setzero_ps();
    float summs[4][4] = {{0}};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk[4];
        __m256i w[4];
        float dw[4], mw[4];
        for (int r = 0; r < 4; r++) {
            blk[r] = wr[r] + (size_t)b * bb;
            w[r] = QT(wload)(blk[r], type);
            dw[r] = QT(h2f)(blk[r]);
            if (type == FL_TYPE_Q4_1) mw[r] = QT(h2f)(blk[r] + 2);
        }
#if QT_VNNI
        __m256i wb[4];
        for (int r = 0; r < 4; r++) wb[r] = QT(wbias)(w[r], type);
#else
        for (int r = 0; r < 4; r++) w[r] = QT(wprep)(w[r], type);
#endif
        for (int t = 0; t < 2 * TP; t++) {
            const size_t ix = (size_t)tok[t] * nb + b;
            const __m256i x = _mm256_loadu_si256((const __m256i *)(c->qs + (size_t)tok[t] * cols + (size_t)b * 32));
            const float dx = c->d[ix];
#if QT_VNNI
            const __m256i xp = QT(xprep)(x, type), xb = QT(xbias)(x, type);
#endif
            for (int r = 0; r < 4; r++) {
#if QT_VNNI
                const __m256i v = QT(dot)(w[r], xp, wb[r], xb, type);
#else
                const __m256i v = QT(dot)(w[r], x, type);
#endif
                acc[t][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), _mm256_cvtepi32_ps(v), acc[t][r]);
                if (type == FL_TYPE_Q4_1) summs[t][r] = fmaf(mw[r], c->s[ix], summs[t][r]);
            }
        }
    }
    for (int t = 0; t < 2 * TP; t++)
        for (int r = 0; r < 4; r++) {
            const float h = cpu_hsum8_avx2(acc[t][r]);
            out[t][r] = type == FL_TYPE_Q4_1 ? h + summs[t][r] : h;
        }
}

/* 8 weight rows x 1 token. out[r]. */
static inline __attribute__((always_inline)) void QT(tile8)(const mm_ctx_t *c, const int type,
                                                             const uint8_t *const wr[8], int t, float out[8])
{
    const int nb = c->nb, cols = c->cols;
    const size_t bb = type == FL_TYPE_Q8_0 ? 34 : type == FL_TYPE_Q4_0 ? 18 : 20;
    __m256 acc[8];
    float summs[8] = {0};
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
    const int8_t *xq = c->qs + (size_t)t * cols;
    for (int b = 0; b < nb; b++) {
        const size_t ix = (size_t)t * nb + b;
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * 32));
        const float dx = c->d[ix];
#if QT_VNNI
        const __m256i xp = QT(xprep)(x, type), xb = QT(xbias)(x, type);
#endif
        for (int r = 0; r < 8; r++) {
            const uint8_t *blk = wr[r] + (size_t)b * bb;
            const __m256i w = QT(wload)(blk, type);
#if QT_VNNI
            const __m256i v = QT(dot)(w, xp, QT(wbias)(w, type), xb, type);
#else
            const __m256i v = QT(dot)(QT(wprep)(w, type), x, type);
#endif
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(QT(h2f)(blk) * dx), _mm256_cvtepi32_ps(v), acc[r]);
            if (type == FL_TYPE_Q4_1) summs[r] = fmaf(QT(h2f)(blk + 2), c->s[ix], summs[r]);
        }
    }
    for (int r = 0; r < 8; r++) {
        const float h = cpu_hsum8_avx2(acc[r]);
        out[r] = type == FL_TYPE_Q4_1 ? h + summs[r] : h;
    }
}

static void QT(tile4_dispatch)(const mm_ctx_t *c, int TP, const uint8_t *const wr[4], const int tok[4],
                               float out[4][4])
{
    switch (c->type * 4 + TP) {
    case FL_TYPE_Q8_0 * 4 + 1: QT(tile4)(c, FL_TYPE_Q8_0, 1, wr, tok, out); break;
    case FL_TYPE_Q8_0 * 4 + 2: QT(tile4)(c, FL_TYPE_Q8_0, 2, wr, tok, out); break;
    case FL_TYPE_Q4_0 * 4 + 1: QT(tile4)(c, FL_TYPE_Q4_0, 1, wr, tok, out); break;
    case FL_TYPE_Q4_0 * 4 + 2: QT(tile4)(c, FL_TYPE_Q4_0, 2, wr, tok, out); break;
    case FL_TYPE_Q4_1 * 4 + 1: QT(tile4)(c, FL_TYPE_Q4_1, 1, wr, tok, out); break;
    case FL_TYPE_Q4_1 * 4 + 2: QT(tile4)(c, FL_TYPE_Q4_1, 2, wr, tok, out); break;
    default: break;
    }
}

static void QT(tile8_dispatch)(const mm_ctx_t *c, const uint8_t *const wr[8], int t, float out[8])
{
    switch (c->type) {
    case FL_TYPE_Q8_0: QT(tile8)(c, FL_TYPE_Q8_0, wr, t, out); break;
    case FL_TYPE_Q4_0: QT(tile8)(c, FL_TYPE_Q4_0, wr, t, out); break;
    case FL_TYPE_Q4_1: QT(tile8)(c, FL_TYPE_Q4_1, wr, t, out); break;
    default: break;
    }
}
