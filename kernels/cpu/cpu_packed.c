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
 * is converted and fma'd with d_w * d_x (one multiply per 16 rows). At the end hsum_float_8, lanes
 * being registers: h[k] = acc[k + 4] + acc[k], result = (h0 + h2) + (h1 + h3), 16 rows at once.
 *
 * Tiles: one 16-row group x T tokens (T <= PK_TMAX) over all blocks; a work item is a range of
 * groups x a block of tokens, the group loop outside so a group's weights stay in L1 while the token
 * tiles pass over them. */
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"

#define PK_R 16        /* rows per group */
#define PK_TMAX 2      /* tokens per tile */
#define PK_TBLOCK 64   /* tokens per work item */

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

/* Activation lane sums for the packed kernel: xinit[k] = mult * (q[4k] + ... + q[4k+3]). */
void cpu_pack_act_init(const int8_t *qs, int nb, int mult, int32_t *xinit)
{
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), m = _mm256_set1_epi32(mult);
    for (int b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(qs + 32 * b));
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x), ones16);
        _mm256_storeu_si256((__m256i *)(xinit + 8 * b), _mm256_mullo_epi32(s, m));
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
    float *y;
    int gchunk, n_gitems, n_titems;
    atomic_int next;
} pk_ctx_t;

static inline int32_t pk_ld32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __attribute__((always_inline)) void pk_tile(const pk_ctx_t *c, const int type, const int T,
                                                          int64_t g, int t0)
{
    const int nb = c->nb, cols = c->cols;
    const size_t cb = c->cb;
    const uint8_t *gw = c->w + (size_t)g * nb * cb;
    __m512 acc[PK_TMAX][8], sm[PK_TMAX];
    for (int t = 0; t < T; t++) {
        sm[t] = _mm512_setzero_ps();
        for (int k = 0; k < 8; k++) acc[t][k] = _mm512_setzero_ps();
    }
    const __m512i nib = _mm512_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *ch = gw + (size_t)b * cb;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ch));
        const uint8_t *q = ch + (type == FL_TYPE_Q4_1 ? 64 : 32);
        __m512 dd[PK_TMAX];
        const int8_t *xw[PK_TMAX];
        const int32_t *xi[PK_TMAX];
        for (int t = 0; t < T; t++) {
            const size_t ix = (size_t)(t0 + t) * nb + b;
            xw[t] = c->qs + (size_t)(t0 + t) * cols + 32 * b;
            xi[t] = c->xinit + 8 * ix;
            dd[t] = _mm512_mul_ps(dw, _mm512_set1_ps(c->d[ix]));
        }
        if (type == FL_TYPE_Q4_1) {
            const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ch + 32)));
            for (int t = 0; t < T; t++)
                sm[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(c->s[(size_t)(t0 + t) * nb + b]), sm[t]);
        }
        for (int p = 0; p < (type == FL_TYPE_Q8_0 ? 8 : 4); p++) {
            __m512i w0, w1 = _mm512_setzero_si512();
            if (type == FL_TYPE_Q8_0) {
                w0 = _mm512_loadu_si512((const void *)(q + 64 * p));
            } else {
                const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * p));
                w0 = _mm512_and_si512(v, nib);
                w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            }
            for (int t = 0; t < T; t++) {
                const __m512i i0 = type == FL_TYPE_Q4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(xi[t][p]);
                const __m512i l0 = _mm512_dpbusd_epi32(i0, w0, _mm512_set1_epi32(pk_ld32(xw[t] + 4 * p)));
                acc[t][p] = _mm512_fmadd_ps(dd[t], _mm512_cvtepi32_ps(l0), acc[t][p]);
                if (type != FL_TYPE_Q8_0) {
                    const __m512i i1 = type == FL_TYPE_Q4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(xi[t][p + 4]);
                    const __m512i l1 = _mm512_dpbusd_epi32(i1, w1, _mm512_set1_epi32(pk_ld32(xw[t] + 4 * p + 16)));
                    acc[t][p + 4] = _mm512_fmadd_ps(dd[t], _mm512_cvtepi32_ps(l1), acc[t][p + 4]);
                }
            }
        }
    }
    const int64_t r0 = g * PK_R;
    const int nr = c->rows - r0 < PK_R ? (int)(c->rows - r0) : PK_R;
    for (int t = 0; t < T; t++) {
        __m512 h[4];
        for (int k = 0; k < 4; k++) h[k] = _mm512_add_ps(acc[t][k + 4], acc[t][k]);
        __m512 r = _mm512_add_ps(_mm512_add_ps(h[0], h[2]), _mm512_add_ps(h[1], h[3]));
        if (type == FL_TYPE_Q4_1) r = _mm512_add_ps(r, sm[t]);
        float *y = c->y + (size_t)(t0 + t) * c->rows + r0;
        if (nr == PK_R) _mm512_storeu_ps(y, r);
        else _mm512_mask_storeu_ps(y, (__mmask16)((1u << nr) - 1), r);
    }
}

/* pk_tile for a runtime (type, T): T is a compile-time constant in each instance. */
#define PK_T(TY, TT) \
    case TT: pk_tile(c, TY, TT, g, t0); return;
#if PK_TMAX > 8
#error "PK_TMAX <= 8"
#endif
#define PK_TS(TY)                                         \
    switch (T) {                                          \
        PK_T(TY, 1)                                       \
        PK_IF2(PK_T(TY, 2)) PK_IF3(PK_T(TY, 3)) PK_IF4(PK_T(TY, 4)) \
        PK_IF5(PK_T(TY, 5)) PK_IF6(PK_T(TY, 6)) PK_IF7(PK_T(TY, 7)) PK_IF8(PK_T(TY, 8)) \
    default: abort();                                     \
    }
#define PK_ON(x) x
#define PK_OFF(x)
#if PK_TMAX >= 2
#define PK_IF2 PK_ON
#else
#define PK_IF2 PK_OFF
#endif
#if PK_TMAX >= 3
#define PK_IF3 PK_ON
#else
#define PK_IF3 PK_OFF
#endif
#if PK_TMAX >= 4
#define PK_IF4 PK_ON
#else
#define PK_IF4 PK_OFF
#endif
#if PK_TMAX >= 5
#define PK_IF5 PK_ON
#else
#define PK_IF5 PK_OFF
#endif
#if PK_TMAX >= 6
#define PK_IF6 PK_ON
#else
#define PK_IF6 PK_OFF
#endif
#if PK_TMAX >= 7
#define PK_IF7 PK_ON
#else
#define PK_IF7 PK_OFF
#endif
#if PK_TMAX >= 8
#define PK_IF8 PK_ON
#else
#define PK_IF8 PK_OFF
#endif

static void pk_tile_dispatch(const pk_ctx_t *c, int T, int64_t g, int t0)
{
    switch (c->type) {
    case FL_TYPE_Q4_1: PK_TS(FL_TYPE_Q4_1)
    case FL_TYPE_Q4_0: PK_TS(FL_TYPE_Q4_0)
    case FL_TYPE_Q8_0: PK_TS(FL_TYPE_Q8_0)
    default: abort();
    }
}

#pragma GCC pop_options

static void pk_item(const pk_ctx_t *c, int it)
{
    const int gi = it % c->n_gitems, ti = it / c->n_gitems;
    const int64_t g0 = (int64_t)gi * c->gchunk, g1 = g0 + c->gchunk < c->ngroups ? g0 + c->gchunk : c->ngroups;
    const int t0 = ti * PK_TBLOCK, t1 = t0 + PK_TBLOCK < c->n ? t0 + PK_TBLOCK : c->n;
    for (int64_t g = g0; g < g1; g++)
        for (int t = t0; t < t1;) {
            const int T = t1 - t >= PK_TMAX ? PK_TMAX : t1 - t;
            pk_tile_dispatch(c, T, g, t);
            t += T;
        }
}

static void pk_task(void *arg, int ith, int nth)
{
    pk_ctx_t *c = arg;
    const int n_items = c->n_gitems * c->n_titems;
    for (;;) {
        const int it = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        pk_item(c, it);
    }
}

static void pk_setup(pk_ctx_t *c, int nth, float *y, const kern_weight_t *w, const int8_t *qs, const float *d,
                     const float *s, const int32_t *xinit, int n)
{
    *c = (pk_ctx_t){
        .type = w->type, .nb = (int)(w->cols / 32), .cols = (int)w->cols, .n = n, .rows = w->rows,
        .ngroups = (w->rows + PK_R - 1) / PK_R, .cb = cpu_pack_chunk_bytes(w->type), .w = w->packed,
        .qs = qs, .d = d, .s = s, .xinit = xinit, .y = y,
    };
    atomic_init(&c->next, 0);
    c->n_titems = (n + PK_TBLOCK - 1) / PK_TBLOCK;
    /* Enough items for the threads to balance: ~8 per thread, at least 1 group each. */
    int64_t want = (int64_t)nth * 8 / c->n_titems;
    if (want < 1) want = 1;
    c->gchunk = (int)((c->ngroups + want - 1) / want);
    if (c->gchunk < 1) c->gchunk = 1;
    c->n_gitems = (int)((c->ngroups + c->gchunk - 1) / c->gchunk);
}

void cpu_matmul_packed(cpu_backend_t *cb, float *y, const kern_weight_t *w, const int8_t *qs, const float *d,
                       const float *s, const int32_t *xinit, int n)
{
    pk_ctx_t c;
    const int nth = cpu_pool_size(cb->pool);
    pk_setup(&c, nth, y, w, qs, d, s, xinit, n);
    if ((int64_t)n * w->rows * w->cols < 32 * 1024 || nth == 1) pk_task(&c, 0, 1);
    else cpu_pool_run(cb->pool, pk_task, &c);
}

#define PK_MULTI_MAX 8

typedef struct pk_multi {
    pk_ctx_t c[PK_MULTI_MAX];
    int n_w, total;
    atomic_int next;
} pk_multi_t;

/* Items of all the weights, weight after weight, from one counter. */
static void pk_multi_task(void *arg, int ith, int nth)
{
    pk_multi_t *m = arg;
    for (;;) {
        int it = atomic_fetch_add_explicit(&m->next, 1, memory_order_relaxed);
        if (it >= m->total) break;
        int k = 0;
        while (it >= m->c[k].n_gitems * m->c[k].n_titems) it -= m->c[k].n_gitems * m->c[k].n_titems, k++;
        pk_item(&m->c[k], it);
    }
}

void cpu_matmul_packed_multi(cpu_backend_t *cb, float *const *ys, const kern_weight_t *const *ws, int n_w,
                             const int8_t *qs, const float *d, const float *s, const int32_t *xinit, int n)
{
    if (n_w > PK_MULTI_MAX) {
        for (int k = 0; k < n_w; k++) cpu_matmul_packed(cb, ys[k], ws[k], qs, d, s, xinit, n);
        return;
    }
    pk_multi_t m;
    const int nth = cpu_pool_size(cb->pool);
    int64_t macs = 0;
    m.n_w = n_w, m.total = 0;
    for (int k = 0; k < n_w; k++) {
        pk_setup(&m.c[k], nth, ys[k], ws[k], qs, d, s, xinit, n);
        m.total += m.c[k].n_gitems * m.c[k].n_titems;
        macs += (int64_t)n * ws[k]->rows * ws[k]->cols;
    }
    atomic_init(&m.next, 0);
    if (macs < 32 * 1024 || nth == 1) pk_multi_task(&m, 0, 1);
    else cpu_pool_run(cb->pool, pk_multi_task, &m);
}
