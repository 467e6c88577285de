/* cpu_packed.c - the AVX-512 VNNI quantized matmul on weights repacked at load time.
 *
 * Same numbers as the other paths (ggml's x86 vec_dot order, see cpu_qtile.h): per output 8 float
 * lanes, lane k of a block = exact integer dot of block elements 4k..4k+3, acc[k] = fma(d_w * d_x,
 * lane, acc[k]) block after block, then hsum_float_8 (+ summs = fma(m_w, s_x, summs) for Q4_1).
 * Only the data layout and the vector shapes differ, so the results are bit-identical to the scalar
 * reference whatever the batch, tile or thread.
 *
 * Packed layout (cpu_pack_weight): rows in groups of 16 (the last group padded with zero rows),
 * chunk (group g, block b) at ((g * nb) + b) * chunk bytes, groups of a row range contiguous:
 *   d[16] f16 | m[16] f16 (Q4_1 only) | quants as 16-row x 4-byte columns, 64 bytes each:
 *   Q4_0/Q4_1: column p (p = 0..3) = bytes 4p..4p+3 of the 16 rows' nibble bytes: its low nibbles
 *              are ggml lane p (elements 4p..4p+3), its high nibbles lane p + 4 (16 + 4p..);
 *   Q8_0:      column k (k = 0..7) = bytes 4k..4k+3 of the 16 rows (lane k), each + 128.
 * Same size as the GGUF blocks (Q4_1 20, Q4_0 18, Q8_0 34 bytes per row and block).
 *
 * Kernel: a zmm holds one ggml lane of 16 rows. vpdpbusd(init, w_k, bcast(x word k)) gives lane k of
 * the 16 rows; init folds the offsets: -128 * (lane sum of x) for Q8_0 (weights stored + 128), -8 *
 * (lane sum of x) for Q4_0 (q - 8), 0 for Q4_1; it is precomputed per activation block. Each lane
 * is converted to float and fma'd with d_w * d_x (one multiply per 16 rows). The conversion is not a
 * vcvtdq2ps (the costliest instruction here): init also holds the bits of 1.5 * 2^23, so the lane's
 * bits are those of the float 1.5 * 2^23 + lane (|lane| < 2^22), and one subtraction gives the lane
 * exactly. At the end hsum_float_8, lanes being registers: h[k] = acc[k + 4] + acc[k], result =
 * (h0 + h2) + (h1 + h3), 16 rows at once.
 *
 * Tiles: one 16-row group x T tokens (T <= PK_TMAX) over a range of blocks. A group is the unit of
 * work: all tokens pass over it while its weights sit in L1, so each weight byte comes from memory
 * once per call whatever n (up to PK_TBLOCK tokens per pass). With a few tiles per group, Q4 groups
 * are first unpacked to lanes in a scratch (the nibble split done once, not per tile). The weights
 * stream from memory while the tiles compute: each thread walks a contiguous range of groups and
 * prefetches the next group during the current one, so a small batch costs its compute, not compute
 * plus memory (the 1-token step being all memory on the default model). */
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "cpu_simd.h"

#define PK_R 16        /* rows per group */
#define PK_TMAX 2      /* tokens per tile */
#define PK_TBLOCK 64   /* tokens per pass over a group */
#define PK_KC 32       /* most blocks per unpacked chunk (chunks of a group even): 20 KiB of scratch, in L1 */
#define PK_UW 640      /* bytes of an unpacked block: 8 lanes x 16 rows x 4 quants, d[16] and m[16] as floats */
/* The integer lanes become floats by CPU_LANE_MAGIC (cpu_internal.h), not vcvtdq2ps, the kernel's
 * costliest instruction. */
#define PK_UNPACK_MIN_N 4 /* tokens from which Q4 groups are unpacked once for all tiles (measured) */

size_t cpu_pack_chunk_bytes(int type)
{
    switch (type) {
    case FL_TYPE_Q4_0: return 32 + 16 * 16;
    case FL_TYPE_Q4_1: return 64 + 16 * 16;
    case FL_TYPE_Q8_0: return 32 + 16 * 32;
    default: return 0;
    }
}

uint8_t *cpu_pack_weight(int type, int64_t rows, int64_t cols, const uint8_t *data, size_t row_bytes)
{
    const size_t cb = cpu_pack_chunk_bytes(type);
    if (!cb || cols % 32) return NULL;
    const int64_t nb = cols / 32, ng = (rows + PK_R - 1) / PK_R;
    const size_t bytes = ((size_t)(ng * nb) * cb + 63) & ~(size_t)63;
    uint8_t *p = aligned_alloc(64, bytes);
    if (!p) return NULL;
    memset(p, 0, bytes);
    const size_t bb = type == FL_TYPE_Q8_0 ? 34 : type == FL_TYPE_Q4_0 ? 18 : 20;
    for (int64_t g = 0; g < ng; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *ch = p + (size_t)(g * nb + b) * cb;
            uint8_t *q = ch + (type == FL_TYPE_Q4_1 ? 64 : 32);
            for (int i = 0; i < PK_R; i++) {
                const int64_t r = g * PK_R + i;
                if (r >= rows) break;
                const uint8_t *blk = data + (size_t)r * row_bytes + (size_t)b * bb;
                memcpy(ch + 2 * i, blk, 2);                                   /* d */
                if (type == FL_TYPE_Q4_1) memcpy(ch + 32 + 2 * i, blk + 2, 2); /* m */
                if (type == FL_TYPE_Q8_0) {
                    for (int k = 0; k < 8; k++)
                        for (int e = 0; e < 4; e++) q[64 * k + 4 * i + e] = (uint8_t)(blk[2 + 4 * k + e] ^ 0x80);
                } else {
                    const uint8_t *nq = blk + (type == FL_TYPE_Q4_1 ? 4 : 2);
                    for (int k = 0; k < 4; k++) memcpy(q + 64 * k + 4 * i, nq + 4 * k, 4);
                }
            }
        }
    return p;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

/* Activation lane sums for the packed kernel: xinit[k] = CPU_LANE_MAGIC + mult * (q[4k] + ... + q[4k+3]). */
void cpu_pack_act_init(const int8_t *qs, int nb, int mult, int32_t *xinit)
{
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), m = _mm256_set1_epi32(mult);
    const __m256i magic = _mm256_set1_epi32(CPU_LANE_MAGIC);
    for (int b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(qs + 32 * b));
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x), ones16);
        _mm256_storeu_si256((__m256i *)(xinit + 8 * b), _mm256_add_epi32(_mm256_mullo_epi32(s, m), magic));
    }
}

typedef struct pk_ctx {
    int type, nb, cols, n;
    int64_t rows, ngroups;
    size_t cb;
    const uint8_t *w;
    const int8_t *qs;     /* [n][cols] */
    const float *d, *s;   /* [n][nb] */
    const int32_t *xinit; /* [n][nb][8] */
    const cpu_prompt_act_t *pa; /* prompt order (cpu_internal.h), or NULL: ggml's order */
    float *y;
} pk_ctx_t;

/* A tile's accumulators between two block chunks of an unpacked group. */
typedef struct pk_state {
    __m512 acc[PK_TMAX][8], sm[PK_TMAX];
} pk_state_t;

static inline int32_t pk_ld32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The tile's small loops must be unrolled for its accumulators to live in registers. */
#define PK_UNROLL _Pragma("GCC unroll 8")

/* Where a tile reads the 8 ggml lanes of a block's 16 rows. */
enum { PK_NIBBLES, /* Q4 chunks as packed: 4 columns, split into lanes p and p + 4 in registers */
       PK_LANES,   /* 8 columns of 64 bytes, one per lane: Q8_0 as packed, or a Q4 group unpacked to scratch */
};

/* Hints the lines of one block of the next group, a group's work ahead of its use. */
static inline __attribute__((always_inline)) void pk_prefetch_block(const uint8_t *pf, size_t cb)
{
    PK_UNROLL
    for (size_t off = 0; off < cb; off += 64) _mm_prefetch((const char *)pf + off, _MM_HINT_T0);
}

/* Lanes p and p + 4 of a block's 16 rows: from 64-byte columns p and p + 4 (Q8_0 as packed, or a
 * Q4 group unpacked), or split from the nibbles of column p (Q4 as packed). */
static inline __attribute__((always_inline)) void pk_lanes(const uint8_t *q, int p, bool nibbles, __m512i *w0,
                                                           __m512i *w1)
{
    if (!nibbles) {
        *w0 = _mm512_loadu_si512((const void *)(q + 64 * p));
        *w1 = _mm512_loadu_si512((const void *)(q + 64 * (p + 4)));
    } else {
        const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * p)), nib = _mm512_set1_epi8(0x0f);
        *w0 = _mm512_and_si512(v, nib);
        *w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    }
}

/* Token t's results r for the 16 rows of group g (the last group's padding rows not stored). */
static inline __attribute__((always_inline)) void pk_store_rows(const pk_ctx_t *c, int64_t g, int t, __m512 r)
{
    const int64_t r0 = g * PK_R;
    const int nr = c->rows - r0 < PK_R ? (int)(c->rows - r0) : PK_R;
    float *y = c->y + (size_t)t * c->rows + r0;
    if (nr == PK_R) _mm512_storeu_ps(y, r);
    else _mm512_mask_storeu_ps(y, (__mmask16)((1u << nr) - 1), r);
}

/* Rows of group g x tokens t0..t0+T-1 over blocks b0..b1. Lanes come from the packed chunks (mode
 * PK_NIBBLES for Q4, PK_LANES for Q8_0) or from uw, the group's blocks b0.. unpacked (PK_LANES, Q4).
 * A tile that does not start at block 0 resumes from *st, one that does not end at block nb saves
 * to *st; only the one ending at nb writes y. pf, when not NULL, is the next group's chunks. */
static inline __attribute__((always_inline)) void pk_tile(const pk_ctx_t *c, const int type, const int T,
                                                          const int mode, int64_t g, int t0, int b0, int b1,
                                                          const uint8_t *uw, pk_state_t *st, const uint8_t *pf,
                                                          int pf_phase, int pf_stride)
{
    const int nb = c->nb, cols = c->cols;
    const size_t cb = type == FL_TYPE_Q4_1 ? 64 + 16 * 16 : type == FL_TYPE_Q4_0 ? 32 + 16 * 16 : 32 + 16 * 32;
    const uint8_t *gw = c->w + (size_t)g * nb * cb;
    __m512 acc[PK_TMAX][8], sm[PK_TMAX];
    PK_UNROLL
    for (int t = 0; t < T; t++) {
        sm[t] = b0 ? st->sm[t] : _mm512_setzero_ps();
        PK_UNROLL
        for (int k = 0; k < 8; k++) acc[t][k] = b0 ? st->acc[t][k] : _mm512_setzero_ps();
    }
    const __m512i magic = _mm512_set1_epi32(CPU_LANE_MAGIC);
    const __m512 magic_f = _mm512_set1_ps(CPU_LANE_MAGIC_F);
    int pf_left = pf_phase;
    for (int b = b0; b < b1; b++) {
        const uint8_t *ch = gw + (size_t)b * cb;
        if (pf && pf_left-- == 0) {
            pk_prefetch_block(pf + (size_t)b * cb, cb);
            pf_left = pf_stride - 1;
        }
        const bool scratch = mode == PK_LANES && type != FL_TYPE_Q8_0;
        const uint8_t *q = scratch ? uw + (size_t)(b - b0) * PK_UW : ch + (type == FL_TYPE_Q4_1 ? 64 : 32);
        const __m512 dw = scratch ? _mm512_load_ps((const float *)(q + 512))
                                  : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ch));
        __m512 dd[PK_TMAX];
        const int8_t *xw[PK_TMAX];
        const int32_t *xi[PK_TMAX];
        PK_UNROLL
        for (int t = 0; t < T; t++) {
            const size_t ix = (size_t)(t0 + t) * nb + b;
            xw[t] = c->qs + (size_t)(t0 + t) * cols + 32 * b;
            xi[t] = c->xinit + 8 * ix;
            dd[t] = _mm512_mul_ps(dw, _mm512_set1_ps(c->d[ix]));
        }
        if (type == FL_TYPE_Q4_1) {
            const __m512 mw = scratch ? _mm512_load_ps((const float *)(q + 576))
                                      : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ch + 32)));
            PK_UNROLL
            for (int t = 0; t < T; t++)
                sm[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(c->s[(size_t)(t0 + t) * nb + b]), sm[t]);
        }
        /* lanes p and p + 4 */
        PK_UNROLL
        for (int p = 0; p < 4; p++) {
            __m512i w0, w1;
            pk_lanes(q, p, mode != PK_LANES, &w0, &w1);
            PK_UNROLL
            for (int t = 0; t < T; t++) {
                const __m512i i0 = type == FL_TYPE_Q4_1 ? magic : _mm512_set1_epi32(xi[t][p]);
                const __m512i l0 = _mm512_dpbusd_epi32(i0, w0, _mm512_set1_epi32(pk_ld32(xw[t] + 4 * p)));
                acc[t][p] = _mm512_fmadd_ps(dd[t], _mm512_sub_ps(_mm512_castsi512_ps(l0), magic_f), acc[t][p]);
                const __m512i i1 = type == FL_TYPE_Q4_1 ? magic : _mm512_set1_epi32(xi[t][p + 4]);
                const __m512i l1 = _mm512_dpbusd_epi32(i1, w1, _mm512_set1_epi32(pk_ld32(xw[t] + 4 * p + 16)));
                acc[t][p + 4] = _mm512_fmadd_ps(dd[t], _mm512_sub_ps(_mm512_castsi512_ps(l1), magic_f), acc[t][p + 4]);
            }
        }
    }
    if (b1 < nb) {
        PK_UNROLL
        for (int t = 0; t < T; t++) {
            st->sm[t] = sm[t];
            PK_UNROLL
            for (int k = 0; k < 8; k++) st->acc[t][k] = acc[t][k];
        }
        return;
    }
    PK_UNROLL
    for (int t = 0; t < T; t++) {
        __m512 h[4];
        PK_UNROLL
        for (int k = 0; k < 4; k++) h[k] = _mm512_add_ps(acc[t][k + 4], acc[t][k]);
        __m512 r = _mm512_add_ps(_mm512_add_ps(h[0], h[2]), _mm512_add_ps(h[1], h[3]));
        if (type == FL_TYPE_Q4_1) r = _mm512_add_ps(r, sm[t]);
        pk_store_rows(c, g, t0 + t, r);
    }
}

/* Q4 blocks b0..b1 of a group as 8 lanes of 64 bytes each (uw[(b - b0) * PK_UW + 64 * k]), then the
 * 16 rows' d and (Q4_1) m as floats. */
static void pk_unpack(const pk_ctx_t *c, int64_t g, int b0, int b1, uint8_t *uw)
{
    const size_t cb = c->cb;
    const uint8_t *gw = c->w + (size_t)g * c->nb * cb + (c->type == FL_TYPE_Q4_1 ? 64 : 32);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (int b = b0; b < b1; b++) {
        const uint8_t *q = gw + (size_t)b * cb;
        uint8_t *u = uw + (size_t)(b - b0) * PK_UW;
        const uint8_t *ch = q - (c->type == FL_TYPE_Q4_1 ? 64 : 32);
        _mm512_store_ps((float *)(u + 512), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ch)));
        if (c->type == FL_TYPE_Q4_1)
            _mm512_store_ps((float *)(u + 576), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ch + 32))));
        for (int p = 0; p < 4; p++) {
            const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * p));
            _mm512_storeu_si512((void *)(u + 64 * p), _mm512_and_si512(v, nib));
            _mm512_storeu_si512((void *)(u + 64 * (p + 4)), _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
        }
    }
}

/* pk_tile for a runtime (type, T, mode): each instance has them as constants. */
#define PK_TILE_T(TY, MODE)                                                               \
    if (T == 2) pk_tile(c, TY, 2, MODE, g, t0, b0, b1, uw, st, pf, pf_phase, pf_stride);   \
    else pk_tile(c, TY, 1, MODE, g, t0, b0, b1, uw, st, pf, pf_phase, pf_stride);          \
    return;
#if PK_TMAX != 2
#error "pk_tile_dispatch instantiates T = 1, 2"
#endif

static void pk_tile_dispatch(const pk_ctx_t *c, int T, bool unpacked, int64_t g, int t0, int b0, int b1,
                             const uint8_t *uw, pk_state_t *st, const uint8_t *pf, int pf_phase, int pf_stride)
{
    switch (c->type) {
    case FL_TYPE_Q4_1:
        if (unpacked) { PK_TILE_T(FL_TYPE_Q4_1, PK_LANES) }
        PK_TILE_T(FL_TYPE_Q4_1, PK_NIBBLES)
    case FL_TYPE_Q4_0:
        if (unpacked) { PK_TILE_T(FL_TYPE_Q4_0, PK_LANES) }
        PK_TILE_T(FL_TYPE_Q4_0, PK_NIBBLES)
    case FL_TYPE_Q8_0: PK_TILE_T(FL_TYPE_Q8_0, PK_LANES)
    default: abort();
    }
}

/* ---- Prompt order (cpu_internal.h, cpu_prompt_act_t): per (row, token) and 32-block one exact
 * integer sum S of the whole block, acc = fma(d_w * d_x, (float)S, acc) block after block, and for
 * Q4_1 sm = fma(m_w, s_x, sm); the result acc + sm (Q4_1) or acc. One float step per block instead of
 * eight, and the integer part can go to AMX. The two kernels below and cpu_matmul.c's scalar and AVX2
 * ones give the same bits. The sum starts from ci (CPU_LANE_MAGIC plus the Q4_0 / Q8_0 offsets times the
 * block's activation sum), so its bits read as the float 1.5 * 2^23 + S, as in pk_tile. */

/* The block-sum start of token t, block b (tiles of 16 tokens). */
static inline int32_t pkp_ci(const cpu_prompt_act_t *pa, int t, int b)
{
    return pa->ci[((size_t)(t >> 4) * pa->nb + b) * 16 + (t & 15)];
}

/* AVX-512 VNNI: rows of group g x tokens t0..t0+T-1 over every block, the lanes summed in four
 * independent chains (integer sums: any order is exact). */
static inline __attribute__((always_inline)) void pkp_tile(const pk_ctx_t *c, const int type, const int T, int64_t g,
                                                           int t0)
{
    const int nb = c->nb, cols = c->cols;
    const size_t cb = type == FL_TYPE_Q4_1 ? 64 + 16 * 16 : type == FL_TYPE_Q4_0 ? 32 + 16 * 16 : 32 + 16 * 32;
    const uint8_t *gw = c->w + (size_t)g * nb * cb;
    __m512 acc[4], sm[4];
    PK_UNROLL
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps(), sm[t] = _mm512_setzero_ps();
    const __m512 magic_f = _mm512_set1_ps(CPU_LANE_MAGIC_F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *ch = gw + (size_t)b * cb;
        const uint8_t *q = ch + (type == FL_TYPE_Q4_1 ? 64 : 32);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ch));
        __m512i l[4][4];
        const int8_t *xw[4];
        PK_UNROLL
        for (int t = 0; t < T; t++) {
            xw[t] = c->qs + (size_t)(t0 + t) * cols + 32 * b;
            l[t][0] = _mm512_set1_epi32(pkp_ci(c->pa, t0 + t, b));
            l[t][1] = l[t][2] = l[t][3] = _mm512_setzero_si512();
        }
        PK_UNROLL
        for (int p = 0; p < 4; p++) {
            __m512i w0, w1;
            pk_lanes(q, p, type != FL_TYPE_Q8_0, &w0, &w1);
            PK_UNROLL
            for (int t = 0; t < T; t++) {
                l[t][p] = _mm512_dpbusd_epi32(l[t][p], w0, _mm512_set1_epi32(pk_ld32(xw[t] + 4 * p)));
                l[t][p] = _mm512_dpbusd_epi32(l[t][p], w1, _mm512_set1_epi32(pk_ld32(xw[t] + 4 * p + 16)));
            }
        }
        const __m512 mw = type == FL_TYPE_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ch + 32)))
                                               : _mm512_setzero_ps();
        PK_UNROLL
        for (int t = 0; t < T; t++) {
            const size_t ix = (size_t)(t0 + t) * nb + b;
            const __m512i li = _mm512_add_epi32(_mm512_add_epi32(l[t][0], l[t][1]), _mm512_add_epi32(l[t][2], l[t][3]));
            const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(c->d[ix]));
            acc[t] = _mm512_fmadd_ps(dd, _mm512_sub_ps(_mm512_castsi512_ps(li), magic_f), acc[t]);
            if (type == FL_TYPE_Q4_1) sm[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(c->s[ix]), sm[t]);
        }
    }
    PK_UNROLL
    for (int t = 0; t < T; t++) pk_store_rows(c, g, t0 + t, type == FL_TYPE_Q4_1 ? _mm512_add_ps(acc[t], sm[t]) : acc[t]);
}

#define PKP_TILE_T(TY)                                 \
    switch (T) {                                       \
    case 4: pkp_tile(c, TY, 4, g, t0); return;         \
    case 3: pkp_tile(c, TY, 3, g, t0); return;         \
    case 2: pkp_tile(c, TY, 2, g, t0); return;         \
    default: pkp_tile(c, TY, 1, g, t0); return;        \
    }

static void pkp_tile_dispatch(const pk_ctx_t *c, int T, int64_t g, int t0)
{
    switch (c->type) {
    case FL_TYPE_Q4_1: PKP_TILE_T(FL_TYPE_Q4_1)
    case FL_TYPE_Q4_0: PKP_TILE_T(FL_TYPE_Q4_0)
    case FL_TYPE_Q8_0: PKP_TILE_T(FL_TYPE_Q8_0)
    default: abort();
    }
}

static void pkp_group_vnni(const pk_ctx_t *c, int64_t g)
{
    for (int t0 = 0; t0 < c->n; t0 += 4) pkp_tile_dispatch(c, c->n - t0 < 4 ? c->n - t0 : 4, g, t0);
}

#pragma GCC pop_options

/* ---- AMX: the block sums of 16 rows x 16 tokens in one tile multiply (TDPBUSD, K = 32: weights as
 * unsigned bytes in A, activations as signed bytes in B), then the float steps as above, 16 tokens a
 * register, one register per row. Tiles: C in tmm0 / tmm3 (16 x 16 int32, started from ci), A in
 * tmm1 / tmm4 (16 rows x 32 bytes), B in tmm2 / tmm5 (8 rows of 16 tokens x 4 bytes); two sets, so
 * the next block's multiply runs while this one's sums are turned into floats. */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

#define PKA_KC 64 /* blocks unpacked at a time: 40 KiB of stack */
#define PKA_UNROLL _Pragma("GCC unroll 16") /* the 16 rows' accumulators live in registers */

typedef struct pka_cfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} pka_cfg_t;

/* A static object: GCC 12 drops stores to a local configuration before ldtilecfg (it does not see
 * the instruction read them). */
static const pka_cfg_t pka_config = {
    .palette = 1,
    .colsb = {64, 32, 64, 64, 32, 64},
    .rows = {16, 16, 8, 16, 16, 8},
};

static void pka_begin(void) { _tile_loadconfig(&pka_config); }

static void pka_end(void) { _tile_release(); }

/* Blocks b0..b1 of group g as A tiles (16 rows x 32 unsigned bytes: Q4 nibbles split, Q8_0 + 128 as
 * packed) and the rows' d and m as floats. */
static void pka_unpack(const pk_ctx_t *c, int64_t g, int b0, int b1, uint8_t (*a)[512], float (*dw)[16],
                       float (*mw)[16])
{
    const size_t cb = c->cb;
    const int qoff = c->type == FL_TYPE_Q4_1 ? 64 : 32;
    const __m512i nib = _mm512_set1_epi8(0x0f), rows8 = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(8));
    for (int b = b0; b < b1; b++) {
        const uint8_t *ch = c->w + ((size_t)g * c->nb + b) * cb, *q = ch + qoff;
        int32_t *a32 = (int32_t *)a[b - b0];
        _mm512_store_ps(dw[b - b0], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ch)));
        if (c->type == FL_TYPE_Q4_1)
            _mm512_store_ps(mw[b - b0], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ch + 32))));
        /* column k of the packed chunk holds bytes 4k..4k+3 of the 16 rows: dword i -> a32[8 i + k] */
        if (c->type == FL_TYPE_Q8_0) {
            for (int k = 0; k < 8; k++)
                _mm512_i32scatter_epi32(a32 + k, rows8, _mm512_loadu_si512((const void *)(q + 64 * k)), 4);
        } else {
            for (int p = 0; p < 4; p++) {
                const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * p));
                _mm512_i32scatter_epi32(a32 + p, rows8, _mm512_and_si512(v, nib), 4);
                _mm512_i32scatter_epi32(a32 + 4 + p, rows8, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib), 4);
            }
        }
    }
}

/* The float steps of one block's sums (cbuf: 16 rows x 16 tokens) into acc. */
#define PKA_STEP(CT, b)                                                                                \
    do {                                                                                               \
        _tile_stored(CT, cbuf, 64);                                                                    \
        const __m512 dx = _mm512_load_ps(pa->dt + ((size_t)tt * nb + (b)) * 16);                       \
        const __m512i ci = _mm512_load_si512(pa->ci + ((size_t)tt * nb + (b)) * 16);                   \
        PKA_UNROLL                                                                                      \
        for (int r = 0; r < 16; r++) {                                                                 \
            const __m512i si = _mm512_add_epi32(_mm512_load_si512(cbuf + 16 * r), ci);                 \
            const __m512 v = _mm512_sub_ps(_mm512_castsi512_ps(si), magic_f);                          \
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(dw[(b) - b0][r]), dx), v, acc[r]);   \
        }                                                                                              \
    } while (0)
#define PKA_ISSUE(CT, AT, BT, b)                                                                       \
    do {                                                                                               \
        _tile_loadd(AT, a[(b) - b0], 32);                                                              \
        _tile_loadd(BT, pa->xt + ((size_t)tt * nb + (b)) * 512, 64);                                   \
        _tile_zero(CT);                                                                                \
        _tile_dpbusd(CT, AT, BT);                                                                      \
    } while (0)

/* Group g against every token, in chunks of PKA_KC blocks; state keeps each 16-token tile's acc and sm
 * ([tile][2][16 rows][16 tokens]) between chunks. */
static void pka_group(const pk_ctx_t *c, int64_t g, float *state)
{
    const cpu_prompt_act_t *pa = c->pa;
    const int nb = c->nb, ntt = pa->ntt;
    _Alignas(64) uint8_t a[PKA_KC][512];
    _Alignas(64) float dw[PKA_KC][16], mw[PKA_KC][16];
    _Alignas(64) int32_t cbuf[256];
    const __m512 magic_f = _mm512_set1_ps(CPU_LANE_MAGIC_F);
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
    for (int b0 = 0; b0 < nb; b0 += PKA_KC) {
        const int b1 = b0 + PKA_KC < nb ? b0 + PKA_KC : nb;
        pka_unpack(c, g, b0, b1, a, dw, mw);
        for (int tt = 0; tt < ntt; tt++) {
            float *st = state + (size_t)tt * 512;
            __m512 acc[16];
            PKA_UNROLL
            for (int r = 0; r < 16; r++) acc[r] = b0 ? _mm512_load_ps(st + 16 * r) : _mm512_setzero_ps();
            PKA_ISSUE(0, 1, 2, b0);
            for (int b = b0; b < b1; b += 2) {
                if (b + 1 < b1) PKA_ISSUE(3, 4, 5, b + 1);
                PKA_STEP(0, b);
                if (b + 1 < b1) {
                    if (b + 2 < b1) PKA_ISSUE(0, 1, 2, b + 2);
                    PKA_STEP(3, b + 1);
                }
            }
            PKA_UNROLL
            for (int r = 0; r < 16; r++) _mm512_store_ps(st + 16 * r, acc[r]);
            if (c->type == FL_TYPE_Q4_1) {
                __m512 sm[16];
                PKA_UNROLL
                for (int r = 0; r < 16; r++) sm[r] = b0 ? _mm512_load_ps(st + 256 + 16 * r) : _mm512_setzero_ps();
                for (int b = b0; b < b1; b++) {
                    const __m512 sx = _mm512_load_ps(pa->st + ((size_t)tt * nb + b) * 16);
                    PKA_UNROLL
                    for (int r = 0; r < 16; r++) sm[r] = _mm512_fmadd_ps(_mm512_set1_ps(mw[b - b0][r]), sx, sm[r]);
                }
                PKA_UNROLL
                for (int r = 0; r < 16; r++) _mm512_store_ps(st + 256 + 16 * r, sm[r]);
            }
            if (b1 < nb) continue;
            /* st is [row][token]: token t's 16 rows are column t */
            const int nt = c->n - 16 * tt < 16 ? c->n - 16 * tt : 16;
            for (int t = 0; t < nt; t++) {
                __m512 v = _mm512_i32gather_ps(col, st + t, 4);
                if (c->type == FL_TYPE_Q4_1) v = _mm512_add_ps(v, _mm512_i32gather_ps(col, st + 256 + t, 4));
                pk_store_rows(c, g, 16 * tt + t, v);
            }
        }
    }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

/* The prompt activations in the layouts above, from the quantized rows (qs, d, s). */
int cpu_prompt_prepare(cpu_backend_t *cb, int type, const int8_t *qs, const float *d, const float *s, int n,
                       int nb, cpu_prompt_act_t *pa)
{
    const int ntt = (n + 15) / 16, cols = nb * 32;
    const bool amx = cb->amx;
    const size_t tiles = (size_t)ntt * nb;
    const size_t bytes = tiles * 16 * sizeof(int32_t) + (amx ? tiles * (512 + 2 * 16 * sizeof(float)) : 0);
    if (cpu_grow(&cb->pact, &cb->pact_bytes, bytes)) return FL_ENOMEM;
    int32_t *ci = cb->pact;
    uint8_t *xt = (uint8_t *)(ci + tiles * 16);
    float *dt = (float *)(xt + (amx ? tiles * 512 : 0)), *sx = dt + (amx ? tiles * 16 : 0);
    const int mult = type == FL_TYPE_Q8_0 ? -128 : type == FL_TYPE_Q4_0 ? -8 : 0;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int t = 0; t < ntt * 16; t++) {
        const int tt = t >> 4, j = t & 15;
        for (int b = 0; b < nb; b++) {
            const size_t tile = (size_t)tt * nb + b;
            int32_t sum = 0;
            if (t < n) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(qs + (size_t)t * cols + 32 * b));
                sum = cpu_hsum_epi32_avx2(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x), ones16));
            }
            ci[tile * 16 + j] = CPU_LANE_MAGIC + mult * sum;
            if (!amx) continue;
            /* B tile: row k4 = the 4 bytes 4 k4.. of each of the 16 tokens */
            for (int k4 = 0; k4 < 8; k4++) {
                int32_t w = 0;
                if (t < n) memcpy(&w, qs + (size_t)t * cols + 32 * b + 4 * k4, 4);
                memcpy(xt + tile * 512 + 64 * k4 + 4 * j, &w, 4);
            }
            dt[tile * 16 + j] = t < n ? d[(size_t)t * nb + b] : 0.0f;
            sx[tile * 16 + j] = t < n && s ? s[(size_t)t * nb + b] : 0.0f;
        }
    }
    *pa = (cpu_prompt_act_t){.n = n, .ntt = ntt, .nb = nb, .ci = ci, .xt = amx ? xt : NULL, .dt = dt, .st = sx};
    return 0;
}

#pragma GCC pop_options

/* One group of 16 rows against all n tokens (token blocks of PK_TBLOCK), fetching the group at pf
 * meanwhile: a share of its blocks per tile of the first token block, so the fetch spreads over
 * the group's compute. With several tiles, Q4 weights are unpacked once per chunk of PK_KC blocks
 * into a scratch the tiles share (the tiles keep their accumulators in st between chunks). */
static void pk_group(const pk_ctx_t *c, int64_t g, const uint8_t *pf)
{
    _Alignas(64) uint8_t uw[PK_KC * PK_UW];
    pk_state_t st[PK_TBLOCK / PK_TMAX];
    for (int t0 = 0; t0 < c->n; t0 += PK_TBLOCK) {
        const int t1 = t0 + PK_TBLOCK < c->n ? t0 + PK_TBLOCK : c->n;
        const int n_tiles = (t1 - t0 + PK_TMAX - 1) / PK_TMAX;
        if (c->type == FL_TYPE_Q8_0 || t1 - t0 < PK_UNPACK_MIN_N) {
            for (int t = t0, i = 0; t < t1; i++) {
                const int T = t1 - t >= PK_TMAX ? PK_TMAX : t1 - t;
                pk_tile_dispatch(c, T, false, g, t, 0, c->nb, NULL, NULL, pf, i, n_tiles);
                t += T;
            }
        } else {
            const int n_chunks = (c->nb + PK_KC - 1) / PK_KC, kc = (c->nb + n_chunks - 1) / n_chunks;
            for (int b0 = 0; b0 < c->nb; b0 += kc) {
                const int b1 = b0 + kc < c->nb ? b0 + kc : c->nb;
                pk_unpack(c, g, b0, b1, uw);
                for (int t = t0, i = 0; t < t1; i++) {
                    const int T = t1 - t >= PK_TMAX ? PK_TMAX : t1 - t;
                    pk_tile_dispatch(c, T, true, g, t, b0, b1, uw, &st[i], pf, i, n_tiles);
                    t += T;
                }
            }
        }
        pf = NULL;
    }
}

#define PK_MULTI_MAX 8
#define PK_RANGES 64

/* The groups of n_w weights of one input, numbered weight after weight, cut into one contiguous
 * range per thread. A thread takes its own range's groups in order, fetching each next one while it
 * computes the current (the hardware prefetchers do not run a group ahead on their own), then helps
 * with the others' ranges from where they are. */
typedef struct pk_job {
    pk_ctx_t c[PK_MULTI_MAX];
    int64_t first[PK_MULTI_MAX + 1]; /* number of weight k's first group; first[n_w] = all groups */
    int n_w, n_ranges;
    bool amx;      /* prompt order on AMX tiles: each thread's state in pstate[ith] */
    float **pstate;
    struct {
        _Alignas(64) atomic_llong next;
        int64_t end;
    } range[PK_RANGES];
} pk_job_t;

static const uint8_t *pk_group_addr(const pk_job_t *j, int64_t u, int *k)
{
    while (u >= j->first[*k + 1]) (*k)++;
    const pk_ctx_t *c = &j->c[*k];
    return c->w + (size_t)(u - j->first[*k]) * c->nb * c->cb;
}

static void pk_task(void *arg, int ith, int nth)
{
    pk_job_t *j = arg;
    if (j->amx) pka_begin();
    for (int r = 0; r < j->n_ranges; r++) {
        const int ri = (ith + r) % j->n_ranges;
        for (;;) {
            const int64_t u = atomic_fetch_add_explicit(&j->range[ri].next, 1, memory_order_relaxed);
            if (u >= j->range[ri].end) break;
            int k = 0, kn = 0;
            pk_group_addr(j, u, &k);
            const uint8_t *pf = u + 1 < j->range[ri].end ? pk_group_addr(j, u + 1, &kn) : NULL;
            if (j->amx) pka_group(&j->c[k], u - j->first[k], j->pstate[ith]);
            else if (j->c[k].pa) pkp_group_vnni(&j->c[k], u - j->first[k]); /* prompt order without AMX */
            else pk_group(&j->c[k], u - j->first[k], pf);
        }
    }
    if (j->amx) pka_end();
}

static void pk_setup(pk_ctx_t *c, float *y, const kern_weight_t *w, const int8_t *qs, const float *d,
                     const float *s, const int32_t *xinit, const cpu_prompt_act_t *pa, int n)
{
    *c = (pk_ctx_t){
        .type = w->type, .nb = (int)(w->cols / 32), .cols = (int)w->cols, .n = n, .rows = w->rows,
        .ngroups = (w->rows + PK_R - 1) / PK_R, .cb = cpu_pack_chunk_bytes(w->type), .w = w->packed,
        .qs = qs, .d = d, .s = s, .xinit = xinit, .pa = pa, .y = y,
    };
}

static void pk_run(cpu_backend_t *cb, pk_job_t *j, int64_t macs)
{
    const int nth = cpu_pool_size(cb->pool);
    const int64_t total = j->first[j->n_w];
    j->amx = false, j->pstate = cb->pstate;
    if (j->c[0].pa && cb->amx) {
        const size_t need = (size_t)j->c[0].pa->ntt * 512 * sizeof(float);
        j->amx = true;
        for (int i = 0; i < nth && j->amx; i++) j->amx = !cpu_grow((void **)&cb->pstate[i], &cb->pstate_bytes[i], need);
    }
    j->n_ranges = nth < PK_RANGES ? nth : PK_RANGES;
    if (macs < 32 * 1024 || nth == 1) j->n_ranges = 1;
    for (int r = 0; r < j->n_ranges; r++) {
        atomic_init(&j->range[r].next, total * r / j->n_ranges);
        j->range[r].end = total * (r + 1) / j->n_ranges;
    }
    if (j->n_ranges == 1) pk_task(j, 0, 1);
    else cpu_pool_run(cb->pool, pk_task, j);
}

void cpu_matmul_packed(cpu_backend_t *cb, float *y, const kern_weight_t *w, const int8_t *qs, const float *d,
                       const float *s, const int32_t *xinit, const cpu_prompt_act_t *pa, int n)
{
    pk_job_t j;
    j.n_w = 1;
    pk_setup(&j.c[0], y, w, qs, d, s, xinit, pa, n);
    j.first[0] = 0, j.first[1] = j.c[0].ngroups;
    pk_run(cb, &j, (int64_t)n * w->rows * w->cols);
}

void cpu_matmul_packed_multi(cpu_backend_t *cb, float *const *ys, const kern_weight_t *const *ws, int n_w,
                             const int8_t *qs, const float *d, const float *s, const int32_t *xinit,
                             const cpu_prompt_act_t *pa, int n)
{
    if (n_w > PK_MULTI_MAX) {
        for (int k = 0; k < n_w; k++) cpu_matmul_packed(cb, ys[k], ws[k], qs, d, s, xinit, pa, n);
        return;
    }
    pk_job_t j;
    int64_t macs = 0;
    j.n_w = n_w, j.first[0] = 0;
    for (int k = 0; k < n_w; k++) {
        pk_setup(&j.c[k], ys[k], ws[k], qs, d, s, xinit, pa, n);
        j.first[k + 1] = j.first[k] + j.c[k].ngroups;
        macs += (int64_t)n * ws[k]->rows * ws[k]->cols;
    }
    pk_run(cb, &j, macs);
}
