/* cpu_qtile.h - register-tiled quantized dot products, included twice by cpu_matmul.c: once under
 * target("avx2,fma,f16c") with QT_VNNI 0 and once under the AVX-512 VNNI target with QT_VNNI 1.
 * QT(name) appends the ISA suffix. No include guard on purpose.
 *
 * A tile computes 8 (row, token) pairs per block of 32: tile4 takes 4 weight rows x 2 tokens (and
 * TP=2 does two such token pairs, reusing the loaded weight rows), tile8 takes 8 rows x 1 token.
 * For each pair the 32-element integer dot product is exact (maddubs/madd on AVX2, vpdpbusd with
 * VNNI, both in 8 int32 lanes that are then summed by one transpose-add of the 8 pairs), and it
 * enters the float accumulator as acc = fma((float)isum, d_w * d_x, acc) block after block. That is
 * the scalar reference's order too, so the result of a pair does not depend on the tile, the ISA or
 * on n. Q4_1 adds accm = fma(m_w, s_x, accm) per block and returns acc + accm.
 *
 * Integer tricks (all exact):
 *   Q8_0 x Q8_0, AVX2: maddubs(|w|, sign(x, w)) (|x| <= 127 so no int16 saturation).
 *   Q8_0, VNNI: vpdpbusd(init, x + 128, w) with init = -128 * sum(w), computed once per row block.
 *   Q4_0: q in 0..15 is unsigned: dot(q, x) - 8 * sum(x); AVX2 subtracts 8 * sum(x) after the
 *         reduction, VNNI starts the accumulator at -8 * sum(x) (once per token block).
 *   Q4_1: dot(q, x) directly. */

static inline __m256i QT(nibbles)(const uint8_t *qs)
{
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
}

/* Sums each of 8 vectors of 8 int32 lanes: lane k of the result is the total of v[k]. */
static inline __m256i QT(reduce8)(const __m256i v[8])
{
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, c, 0x20), _mm256_permute2x128_si256(a, c, 0x31));
}

static inline float QT(h2f)(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline __m128 QT(h2f4)(const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, const uint8_t *p3)
{
    uint16_t h0, h1, h2, h3;
    memcpy(&h0, p0, 2), memcpy(&h1, p1, 2), memcpy(&h2, p2, 2), memcpy(&h3, p3, 2);
    return _mm_cvtph_ps(_mm_setr_epi16((short)h0, (short)h1, (short)h2, (short)h3, 0, 0, 0, 0));
}

/* Weight block -> 32 bytes (s8 for Q8_0, u8 0..15 for Q4_*). */
static inline __attribute__((always_inline)) __m256i QT(wload)(const uint8_t *blk, const int type)
{
    if (type == FL_TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    if (type == FL_TYPE_Q4_0) return QT(nibbles)(blk + 2);
    return QT(nibbles)(blk + 4);
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
static inline __attribute__((always_inline)) __m256i QT(dot)(__m256i w, __m256i x, const int type)
{
    const __m256i ones = _mm256_set1_epi16(1);
    if (type == FL_TYPE_Q8_0)
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
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 accm[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk[4];
        __m256i w[4];
        for (int r = 0; r < 4; r++) {
            blk[r] = wr[r] + (size_t)b * bb;
            w[r] = QT(wload)(blk[r], type);
        }
#if QT_VNNI
        __m256i wb[4];
        for (int r = 0; r < 4; r++) wb[r] = QT(wbias)(w[r], type);
#endif
        const __m128 dw4 = QT(h2f4)(blk[0], blk[1], blk[2], blk[3]);
        const __m256 dwd = _mm256_set_m128(dw4, dw4);
        __m256 mwd = _mm256_setzero_ps();
        if (type == FL_TYPE_Q4_1) {
            const __m128 mw4 = QT(h2f4)(blk[0] + 2, blk[1] + 2, blk[2] + 2, blk[3] + 2);
            mwd = _mm256_set_m128(mw4, mw4);
        }
        for (int p = 0; p < TP; p++) {
            const int t0 = tok[2 * p], t1 = tok[2 * p + 1];
            const size_t i0 = (size_t)t0 * nb + b, i1 = (size_t)t1 * nb + b;
            __m256i x[2];
            x[0] = _mm256_loadu_si256((const __m256i *)(c->qs + (size_t)t0 * cols + (size_t)b * 32));
            x[1] = _mm256_loadu_si256((const __m256i *)(c->qs + (size_t)t1 * cols + (size_t)b * 32));
            __m256i v[8];
#if QT_VNNI
            for (int t = 0; t < 2; t++) {
                const __m256i xp = QT(xprep)(x[t], type), xb = QT(xbias)(x[t], type);
                for (int r = 0; r < 4; r++) v[t * 4 + r] = QT(dot)(w[r], xp, wb[r], xb, type);
            }
            __m256i isum = QT(reduce8)(v);
#else
            for (int t = 0; t < 2; t++)
                for (int r = 0; r < 4; r++) v[t * 4 + r] = QT(dot)(w[r], x[t], type);
            __m256i isum = QT(reduce8)(v);
            if (type == FL_TYPE_Q4_0)
                isum = _mm256_sub_epi32(isum, _mm256_set_m128i(_mm_set1_epi32(8 * c->qsum[i1]),
                                                               _mm_set1_epi32(8 * c->qsum[i0])));
#endif
            const __m256 dx = _mm256_set_m128(_mm_set1_ps(c->d[i1]), _mm_set1_ps(c->d[i0]));
            acc[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dwd, dx), acc[p]);
            if (type == FL_TYPE_Q4_1) {
                const __m256 sx = _mm256_set_m128(_mm_set1_ps(c->s[i1]), _mm_set1_ps(c->s[i0]));
                accm[p] = _mm256_fmadd_ps(mwd, sx, accm[p]);
            }
        }
    }
    for (int p = 0; p < TP; p++) {
        __m256 r = type == FL_TYPE_Q4_1 ? _mm256_add_ps(acc[p], accm[p]) : acc[p];
        _mm_storeu_ps(out[2 * p], _mm256_castps256_ps128(r));
        _mm_storeu_ps(out[2 * p + 1], _mm256_extractf128_ps(r, 1));
    }
}

/* 8 weight rows x 1 token. out[r]. */
static inline __attribute__((always_inline)) void QT(tile8)(const mm_ctx_t *c, const int type,
                                                             const uint8_t *const wr[8], int t, float out[8])
{
    const int nb = c->nb, cols = c->cols;
    const size_t bb = type == FL_TYPE_Q8_0 ? 34 : type == FL_TYPE_Q4_0 ? 18 : 20;
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    const int8_t *xq = c->qs + (size_t)t * cols;
    for (int b = 0; b < nb; b++) {
        const size_t ix = (size_t)t * nb + b;
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * 32));
        const uint8_t *blk[8];
        __m256i v[8];
#if QT_VNNI
        const __m256i xp = QT(xprep)(x, type), xb = QT(xbias)(x, type);
        for (int r = 0; r < 8; r++) {
            blk[r] = wr[r] + (size_t)b * bb;
            const __m256i w = QT(wload)(blk[r], type);
            v[r] = QT(dot)(w, xp, QT(wbias)(w, type), xb, type);
        }
        __m256i isum = QT(reduce8)(v);
#else
        for (int r = 0; r < 8; r++) {
            blk[r] = wr[r] + (size_t)b * bb;
            v[r] = QT(dot)(QT(wload)(blk[r], type), x, type);
        }
        __m256i isum = QT(reduce8)(v);
        if (type == FL_TYPE_Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * c->qsum[ix]));
#endif
        const __m256 dw = _mm256_set_m128(QT(h2f4)(blk[4], blk[5], blk[6], blk[7]), QT(h2f4)(blk[0], blk[1], blk[2], blk[3]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(c->d[ix])), acc);
        if (type == FL_TYPE_Q4_1) {
            const __m256 mw = _mm256_set_m128(QT(h2f4)(blk[4] + 2, blk[5] + 2, blk[6] + 2, blk[7] + 2),
                                              QT(h2f4)(blk[0] + 2, blk[1] + 2, blk[2] + 2, blk[3] + 2));
            accm = _mm256_fmadd_ps(mw, _mm256_set1_ps(c->s[ix]), accm);
        }
    }
    _mm256_storeu_ps(out, type == FL_TYPE_Q4_1 ? _mm256_add_ps(acc, accm) : acc);
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
