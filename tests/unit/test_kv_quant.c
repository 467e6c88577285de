/* test_kv_quant.c - quantized KV pools (Q8_0, Q4_0) on the CPU backend: the store, the move, and
 * attention over them (kernels/cpu/cpu_attention_q.c).
 *
 * Checks, on every ISA the machine has (FOLIO_CPU_ISA forced):
 *   - the store writes ggml's blocks (Q8_0: d = amax / 127 as f16, q = round-half-even(x * 127 /
 *     amax); Q4_0: quant.c's reference, ggml's quantize_row_q4_0_ref), re-implemented here;
 *   - attention equals llama.cpp's flash-attention arithmetic (re-implemented here from ggml-cpu's
 *     ops.cpp: Q to Q8_0 or F16, vec_dot lanes, online softmax with expf, fma chains, 1/S) bit for bit,
 *     for every K/V type pair with a quantized member;
 *   - the result is within a stated bound of f16 attention over the same (unquantized) K and V:
 *     |out - out_f16| <= B * max|V| with B = 0.03 for Q8_0 K and V, 0.25 for Q4_0 (what 8-bit and
 *     4-bit blocks of random data give, with margin);
 *   - a token's numbers do not depend on the call: alone, in a batch, as a prompt token or not;
 *   - tree attention over quantized rows equals causal attention at the same position once the
 *     path is moved there (kern_kv_move moves whole quantized rows);
 *   - sliding windows and soft-capping as ggml's flash attention applies them (mask skipped,
 *     s = cap * tanh(q.k * scale / cap)), bit for bit. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/quant.h"
#include "kernels/cpu/cpu_internal.h"
#include "kernels/kernels.h"
#include "worker/engine.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rnd_f(float lo, float hi) { return lo + (hi - lo) * (float)(rnd_u32() & 0xffffff) / 16777216.0f; }

static const char *const isa_names[3] = {"scalar", "avx2", "avx512"};

/* The backend for isa, or NULL when the machine lacks it. */
static kern_backend_t *backend_for(int isa, int threads)
{
    setenv("FOLIO_CPU_ISA", isa_names[isa], 1);
    fl_error_t err = {0};
    kern_backend_t *be = kern_cpu_new(threads, &err);
    unsetenv("FOLIO_CPU_ISA");
    assert_non_null(be);
    if ((int)((cpu_backend_t *)be)->isa != isa) kern_destroy(&be);
    return be;
}

static float f16r(float x) { return fl_f16_to_f32(fl_f32_to_f16(x)); }

/* ---- the spec ---- */

static void spec_q8_row(const float *x, fl_block_q8_0_t *y, int n)
{
    for (int b = 0; b < n / 32; b++, x += 32) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        for (int j = 0; j < 32; j++) { /* x * id not finite (amax below ~1e-37): -128, as AVX2 packs it */
            const float q = x[j] * id;
            y[b].qs[j] = isfinite(q) ? (int8_t)nearbyintf(q) : INT8_MIN;
        }
        y[b].d = fl_f32_to_f16(amax / 127.f);
    }
}

static void spec_quant_row(int type, const float *x, void *y, int n)
{
    if (type == FL_TYPE_Q8_0) spec_q8_row(x, y, n);
    else if (type == FL_TYPE_Q4_0) quant_quantize_row(type, x, y, n);
    else
        for (int i = 0; i < n; i++) ((fl_f16_t *)y)[i] = fl_f32_to_f16(x[i]);
}

/* K element j of a head's row as an integer (quantized) with its block scale. */
static int k_int(int type, const void *row, int j, float *d)
{
    if (type == FL_TYPE_Q8_0) {
        const fl_block_q8_0_t *b = (const fl_block_q8_0_t *)row + j / 32;
        *d = fl_f16_to_f32(b->d);
        return b->qs[j % 32];
    }
    const fl_block_q4_0_t *b = (const fl_block_q4_0_t *)row + j / 32;
    *d = fl_f16_to_f32(b->d);
    const int k = j % 32;
    return (k < 16 ? b->qs[k] & 15 : b->qs[k - 16] >> 4) - 8;
}

static float spec_kdot(int k_type, const void *k, const float *q, int hd)
{
    if (k_type == FL_TYPE_F16) { /* ggml_vec_dot_f16 */
        float acc[64] = {0}, s[16];
        const int np = hd & ~63;
        for (int i = 0; i < np; i++) acc[i % 64] = fmaf(fl_f16_to_f32(((const fl_f16_t *)k)[i]), f16r(q[i]), acc[i % 64]);
        for (int l = 0; l < 16; l++) s[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
        for (int w = 8; w >= 1; w /= 2)
            for (int j = 0; j < w; j++) s[j] += s[j + w];
        double sum = s[0];
        for (int i = np; i < hd; i++) sum += (double)(fl_f16_to_f32(((const fl_f16_t *)k)[i]) * f16r(q[i]));
        return (float)sum;
    }
    fl_block_q8_0_t qb[16];
    spec_q8_row(q, qb, hd);
    float acc[8] = {0};
    for (int b = 0; b < hd / 32; b++) {
        float dk = 0;
        k_int(k_type, k, 32 * b, &dk);
        const float dd = dk * fl_f16_to_f32(qb[b].d);
        for (int l = 0; l < 8; l++) {
            int lane = 0;
            for (int e = 0; e < 4; e++) {
                float dummy;
                lane += k_int(k_type, k, 32 * b + 4 * l + e, &dummy) * qb[b].qs[4 * l + e];
            }
            acc[l] = fmaf(dd, (float)lane, acc[l]);
        }
    }
    return ((acc[4] + acc[0]) + (acc[6] + acc[2])) + ((acc[5] + acc[1]) + (acc[7] + acc[3]));
}

static void spec_vrow(int v_type, const void *v, float *out, int hd)
{
    if (v_type == FL_TYPE_F16)
        for (int d = 0; d < hd; d++) out[d] = fl_f16_to_f32(((const fl_f16_t *)v)[d]);
    else
        for (int d = 0; d < hd; d++) {
            float dv;
            const int qv = k_int(v_type, v, d, &dv);
            out[d] = (float)qv * dv;
        }
}

/* ggml_compute_forward_flash_attn_ext_f16 for one (token, head). */
static void spec_fa(const kern_attn_t *a, int i, int h, float *out)
{
    const int hd = a->head_dim, kvh = h / (a->n_heads / a->n_kv_heads), kv_dim = a->n_kv_heads * hd;
    const int kt = kern_kv_type(a->k_type), vt = kern_kv_type(a->v_type);
    const size_t krow = fl_dtype_row_bytes(kt, kv_dim), vrow = fl_dtype_row_bytes(vt, kv_dim);
    const int32_t *bt = a->block_tables + (size_t)a->tok_seq[i] * a->max_blocks;
    const float *q = a->q + ((size_t)i * a->n_heads + h) * hd;
    float M = -INFINITY, S = 0, vkq[512] = {0}, vr[512];
    /* soft-capping as ggml's flash attention applies it: scale /= cap, then s = cap * tanh(s) */
    const float scale = a->softcap > 0.0f ? a->scale / a->softcap : a->scale;
    for (int p = 0; p < kern_attn_len(a, i); p++) {
        if (!kern_attn_visible(a, i, p)) continue;
        if (a->window > 0 && p <= a->tok_pos[i] - a->window) continue; /* the SWA mask's -inf: skipped */
        const size_t slot = (size_t)bt[p / a->block_size] * a->block_size + p % a->block_size;
        const uint8_t *k = (const uint8_t *)a->k_cache + slot * krow + fl_dtype_row_bytes(kt, hd) * kvh;
        const uint8_t *v = (const uint8_t *)a->v_cache + slot * vrow + fl_dtype_row_bytes(vt, hd) * kvh;
        float s = spec_kdot(kt, k, q, hd) * scale;
        if (a->softcap > 0.0f) s = a->softcap * tanhf(s);
        float ms = 1, vs = 1;
        if (s > M) {
            ms = expf(M - s);
            M = s;
            for (int d = 0; d < hd; d++) vkq[d] = vt == FL_TYPE_F16 ? f16r(vkq[d] * ms) : vkq[d] * ms;
        } else {
            vs = expf(s - M);
        }
        spec_vrow(vt, v, vr, hd);
        for (int d = 0; d < hd; d++) vkq[d] = vt == FL_TYPE_F16 ? f16r(fmaf(vr[d], vs, vkq[d])) : fmaf(vr[d], vs, vkq[d]);
        S = fmaf(S, ms, vs);
    }
    const float inv = 1.0f / S;
    for (int d = 0; d < hd; d++) out[d] = vkq[d] * inv;
}

/* ---- tests ---- */

static void kv_store_writes_ggml_blocks_on_every_isa(void **state)
{
    (void)state;
    const int types[2] = {FL_TYPE_Q8_0, FL_TYPE_Q4_0}, kv_dim = 3 * 64, n = 4, n_slots = 9;
    float k[4 * 192], v[4 * 192];
    for (int i = 0; i < n * kv_dim; i++) k[i] = rnd_f(-4, 4), v[i] = rnd_f(-1, 1);
    k[5] = 0, k[kv_dim] = 100.0f; /* a zero and an outlier */
    for (int i = 64; i < 96; i++) v[i] = 0; /* an all-zero block: d = 0, q = 0 */
    /* a block of subnormals of both signs: 1 / d overflows (every ISA, and CUDA, give the same quants) */
    for (int i = 96; i < 128; i++) v[i] = (i % 3 ? 1e-41f : -2e-41f) * (float)(i - 95);
    const int32_t slots[4] = {8, 0, -1, 3};
    for (int t = 0; t < 2; t++) {
        const size_t row = kern_kv_row_bytes(types[t], kv_dim);
        assert_int_equal(row, types[t] == FL_TYPE_Q8_0 ? 6 * 34 : 6 * 18);
        for (int isa = 0; isa < 3; isa++) {
            kern_backend_t *be = backend_for(isa, 1);
            if (!be) continue;
            uint8_t *kc = kern_alloc(be, n_slots * row), *vc = kern_alloc(be, n_slots * row), want[6 * 34];
            kern_kv_store(be, kc, vc, types[t], types[t], k, v, slots, n, kv_dim);
            for (int i = 0; i < n; i++) {
                if (slots[i] < 0) continue;
                spec_quant_row(types[t], k + i * kv_dim, want, kv_dim);
                if (memcmp(kc + slots[i] * row, want, row)) fail_msg("%s K row %d", isa_names[isa], i);
                spec_quant_row(types[t], v + i * kv_dim, want, kv_dim);
                if (memcmp(vc + slots[i] * row, want, row)) fail_msg("%s V row %d", isa_names[isa], i);
            }
            for (size_t b = 0; b < row; b++) assert_int_equal(kc[1 * row + b], 0); /* untouched slot */
            /* a move copies whole rows, in order */
            const int32_t src[2] = {8, 0}, dst[2] = {1, 8};
            uint8_t row8[6 * 34], row0[6 * 34];
            memcpy(row8, kc + 8 * row, row), memcpy(row0, kc + 0 * row, row);
            kern_kv_move(be, kc, vc, types[t], types[t], src, dst, 2, kv_dim);
            assert_memory_equal(kc + 1 * row, row8, row);
            assert_memory_equal(kc + 8 * row, row0, row);
            kern_free(be, kc), kern_free(be, vc);
            kern_destroy(&be);
        }
    }
}

typedef struct attn_case {
    int n_heads, n_kv_heads, hd, block_size;
} attn_case_t;

/* Random K, V in f32; pools of k_type/v_type and of f16 written by the store. */
static void attention_matches_flash_spec_and_f16_within_bound(void **state)
{
    (void)state;
    static const attn_case_t cases[] = {{9, 3, 64, 16}, {4, 4, 32, 4}, {8, 2, 128, 8}, {20, 2, 32, 4}}; /* G 3, 1, 4, 10 */
    static const int pairs[][2] = {{FL_TYPE_Q8_0, FL_TYPE_Q8_0}, {FL_TYPE_Q4_0, FL_TYPE_Q4_0},
                                   {FL_TYPE_Q8_0, FL_TYPE_F16},  {FL_TYPE_F16, FL_TYPE_Q8_0},
                                   {FL_TYPE_Q4_0, FL_TYPE_Q8_0}};
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const attn_case_t *c = &cases[ci];
        const int n_seqs = 2, max_blocks = 80 / c->block_size + 1, n_blocks = n_seqs * max_blocks;
        const int kv_dim = c->n_kv_heads * c->hd, qdim = c->n_heads * c->hd, n_slots = n_blocks * c->block_size;
        int32_t tables[2 * 81];
        for (int s = 0; s < n_seqs; s++)
            for (int b = 0; b < max_blocks; b++) tables[s * max_blocks + b] = (b * n_seqs + s + 1) % n_blocks;
        float *k = malloc((size_t)n_slots * kv_dim * 4), *v = malloc((size_t)n_slots * kv_dim * 4);
        for (size_t i = 0; i < (size_t)n_slots * kv_dim; i++) k[i] = rnd_f(-2, 2), v[i] = rnd_f(-1, 1);
        int32_t all_slots[2 * 81 * 16];
        for (int i = 0; i < n_slots; i++) all_slots[i] = i;
        /* tokens: both sequences' last positions (decode), a prompt run, block-boundary positions, a run */
        int32_t seq[32], pos[32], prompt_len[2] = {70, 0};
        int n = 0;
        seq[n] = 0, pos[n++] = 69;
        seq[n] = 1, pos[n++] = 40;
        for (int p = 0; p < 10; p++) seq[n] = 0, pos[n++] = p * 7;
        seq[n] = 1, pos[n++] = c->block_size - 1;
        seq[n] = 1, pos[n++] = c->block_size;
        /* a run of consecutive positions across a block boundary (a verify chain, a prompt's
         * tokens): its tokens share each K/V row in one item, each still its own numbers */
        for (int p = 0; p < 9; p++) seq[n] = 1, pos[n++] = c->block_size + 3 + p;
        float *q = malloc((size_t)n * qdim * 4), *out = malloc((size_t)n * qdim * 4), *o16 = malloc((size_t)n * qdim * 4);
        for (int i = 0; i < n * qdim; i++) q[i] = rnd_f(-3, 3);
        for (size_t pi = 0; pi < sizeof pairs / sizeof *pairs; pi++) {
            const int kt = pairs[pi][0], vt = pairs[pi][1];
            for (int isa = 0; isa < 3; isa++) {
                kern_backend_t *be = backend_for(isa, 2);
                if (!be) continue;
                void *kc = kern_alloc(be, n_slots * kern_kv_row_bytes(kt, kv_dim));
                void *vc = kern_alloc(be, n_slots * kern_kv_row_bytes(vt, kv_dim));
                void *kh = kern_alloc(be, (size_t)n_slots * kv_dim * 2), *vh = kern_alloc(be, (size_t)n_slots * kv_dim * 2);
                kern_kv_store(be, kc, vc, kt, vt, k, v, all_slots, n_slots, kv_dim);
                kern_kv_store(be, kh, vh, FL_TYPE_F16, FL_TYPE_F16, k, v, all_slots, n_slots, kv_dim);
                kern_attn_t a = {.out = out, .q = q, .k_cache = kc, .v_cache = vc, .k_type = kt, .v_type = vt,
                                 .n_tokens = n, .tok_seq = seq, .tok_pos = pos, .block_tables = tables,
                                 .max_blocks = max_blocks, .block_size = c->block_size, .n_heads = c->n_heads,
                                 .n_kv_heads = c->n_kv_heads, .head_dim = c->hd, .scale = 1.0f / sqrtf((float)c->hd)};
                kern_attention(be, &a);
                kern_attn_t a16 = a;
                a16.k_cache = kh, a16.v_cache = vh, a16.k_type = a16.v_type = FL_TYPE_F16, a16.out = o16;
                kern_attention(be, &a16);
                const float bound = (kt == FL_TYPE_Q4_0 || vt == FL_TYPE_Q4_0 ? 0.25f : 0.03f) * 1.0f /* max|V| */;
                float ref[512];
                for (int i = 0; i < n; i++)
                    for (int h = 0; h < c->n_heads; h++) {
                        const float *got = out + ((size_t)i * c->n_heads + h) * c->hd;
                        spec_fa(&a, i, h, ref);
                        if (memcmp(got, ref, (size_t)c->hd * 4))
                            fail_msg("%s K %s V %s hd=%d token %d head %d: not the flash-attention spec's bits",
                                     isa_names[isa], fl_dtype_name(kt), fl_dtype_name(vt), c->hd, i, h);
                        for (int d = 0; d < c->hd; d++)
                            if (!(fabsf(got[d] - o16[((size_t)i * c->n_heads + h) * c->hd + d]) <= bound))
                                fail_msg("K %s V %s token %d head %d d %d: %g vs f16 %g", fl_dtype_name(kt),
                                         fl_dtype_name(vt), i, h, d, got[d], o16[((size_t)i * c->n_heads + h) * c->hd + d]);
                    }
                /* alone, or with prompt lengths given: the same bits */
                float *o1 = malloc((size_t)qdim * 4);
                for (int i = 0; i < n; i++) {
                    kern_attn_t one = a;
                    one.n_tokens = 1, one.q = q + (size_t)i * qdim, one.out = o1, one.tok_seq = seq + i,
                    one.tok_pos = pos + i;
                    kern_attention(be, &one);
                    assert_memory_equal(o1, out + (size_t)i * qdim, (size_t)qdim * 4);
                }
                a.seq_prompt_len = prompt_len, a.out = o16;
                kern_attention(be, &a);
                assert_memory_equal(o16, out, (size_t)n * qdim * 4);
                free(o1);
                kern_free(be, kc), kern_free(be, vc), kern_free(be, kh), kern_free(be, vh);
                kern_destroy(&be);
            }
        }
        free(k), free(v), free(q), free(out), free(o16);
    }
}

/* Sliding windows and soft-capping (Mistral, Gemma) over quantized pools: ggml's flash attention
 * masks the positions outside the window and caps each score as cap * tanh(q.k * scale / cap); the
 * kernel gives those bits on every ISA, for decode and prompt tokens past the window. */
static void window_and_softcap_match_flash_spec(void **state)
{
    (void)state;
    const int nh = 4, nkv = 2, hd = 64, bs = 8, kv_dim = nkv * hd, qdim = nh * hd, max_blocks = 12;
    const int n_slots = max_blocks * bs;
    int32_t table[12], all_slots[96];
    for (int b = 0; b < max_blocks; b++) table[b] = (b * 5 + 3) % max_blocks;
    for (int i = 0; i < n_slots; i++) all_slots[i] = i;
    float *k = malloc((size_t)n_slots * kv_dim * 4), *v = malloc((size_t)n_slots * kv_dim * 4);
    for (int i = 0; i < n_slots * kv_dim; i++) k[i] = rnd_f(-2, 2), v[i] = rnd_f(-1, 1);
    int32_t seq[8] = {0}, pos[8] = {0, 5, 11, 12, 40, 63, 80, 95};
    const int n = 8;
    float *q = malloc((size_t)n * qdim * 4), *out = malloc((size_t)n * qdim * 4), *full = malloc((size_t)n * qdim * 4);
    for (int i = 0; i < n * qdim; i++) q[i] = rnd_f(-3, 3);
    static const int pairs[][2] = {{FL_TYPE_Q8_0, FL_TYPE_Q8_0}, {FL_TYPE_Q4_0, FL_TYPE_Q4_0}, {FL_TYPE_Q8_0, FL_TYPE_F16}};
    static const struct { int window; float softcap, scale; } modes[] = {{12, 0, 0.125f}, {0, 5.0f, 1.0f}, {12, 5.0f, 1.0f}, {7, 2.0f, 0.125f}};
    for (size_t pi = 0; pi < sizeof pairs / sizeof *pairs; pi++)
        for (int isa = 0; isa < 3; isa++) {
            kern_backend_t *be = backend_for(isa, 2);
            if (!be) continue;
            const int kt = pairs[pi][0], vt = pairs[pi][1];
            void *kc = kern_alloc(be, n_slots * kern_kv_row_bytes(kt, kv_dim));
            void *vc = kern_alloc(be, n_slots * kern_kv_row_bytes(vt, kv_dim));
            kern_kv_store(be, kc, vc, kt, vt, k, v, all_slots, n_slots, kv_dim);
            for (size_t mi = 0; mi < sizeof modes / sizeof *modes; mi++) {
                kern_attn_t a = {.out = out, .q = q, .k_cache = kc, .v_cache = vc, .k_type = kt, .v_type = vt,
                                 .n_tokens = n, .tok_seq = seq, .tok_pos = pos, .block_tables = table,
                                 .max_blocks = max_blocks, .block_size = bs, .n_heads = nh, .n_kv_heads = nkv,
                                 .head_dim = hd, .scale = modes[mi].scale, .window = modes[mi].window,
                                 .softcap = modes[mi].softcap};
                kern_attention(be, &a);
                float ref[64];
                for (int i = 0; i < n; i++)
                    for (int h = 0; h < nh; h++) {
                        spec_fa(&a, i, h, ref);
                        if (memcmp(out + ((size_t)i * nh + h) * hd, ref, (size_t)hd * 4))
                            fail_msg("%s K %s V %s window %d softcap %g: token at %d head %d not the flash spec's bits",
                                     isa_names[isa], fl_dtype_name(kt), fl_dtype_name(vt), a.window, a.softcap, pos[i], h);
                    }
                /* the window and the cap do change the result past them (neither is ignored) */
                kern_attn_t plain = a;
                plain.window = 0, plain.softcap = 0, plain.out = full;
                kern_attention(be, &plain);
                const size_t last = (size_t)(n - 1) * qdim;
                if (!memcmp(out + last, full + last, (size_t)qdim * 4))
                    fail_msg("window %d softcap %g: the same numbers as without them", a.window, a.softcap);
            }
            kern_free(be, kc), kern_free(be, vc);
            kern_destroy(&be);
        }
    free(k), free(v), free(q), free(out), free(full);
}

/* A draft tree's node over quantized rows sums what the token at its depth sums once its path's rows
 * sit after the context. */
static void tree_attention_equals_causal_after_move(void **state)
{
    (void)state;
    const int nh = 4, nkv = 2, hd = 64, bs = 4, kv_dim = nkv * hd, qdim = nh * hd, ctx = 9, n_tree = 5;
    const int n_slots = 32, max_blocks = 8;
    int32_t table[8] = {3, 0, 5, 1, 2, 4, 6, 7};
    float k[32 * 128], v[32 * 128], q[5 * 256];
    for (int i = 0; i < n_slots * kv_dim; i++) k[i] = rnd_f(-2, 2), v[i] = rnd_f(-1, 1);
    for (int i = 0; i < n_tree * qdim; i++) q[i] = rnd_f(-3, 3);
    /* tree: 0 root; 1, 2 children of 0; 3 child of 1; 4 child of 3 */
    const uint64_t masks[5] = {1, 3, 5, 11, 27};
    int32_t starts[5], seqs[5] = {0}, tpos[5] = {ctx, ctx + 1, ctx + 1, ctx + 2, ctx + 3};
    for (int i = 0; i < n_tree; i++) starts[i] = ctx;
    int32_t slots[32];
    for (int p = 0; p < n_slots; p++) slots[p] = table[p / bs] * bs + p % bs;
    for (int isa = 0; isa < 3; isa++) {
        kern_backend_t *be = backend_for(isa, 1);
        if (!be) continue;
        void *kc = kern_alloc(be, n_slots * kern_kv_row_bytes(FL_TYPE_Q8_0, kv_dim));
        void *vc = kern_alloc(be, n_slots * kern_kv_row_bytes(FL_TYPE_Q4_0, kv_dim));
        kern_kv_store(be, kc, vc, FL_TYPE_Q8_0, FL_TYPE_Q4_0, k, v, slots, ctx + n_tree, kv_dim);
        float tree_out[5 * 256], causal[256];
        kern_attn_t a = {.out = tree_out, .q = q, .k_cache = kc, .v_cache = vc, .k_type = FL_TYPE_Q8_0,
                         .v_type = FL_TYPE_Q4_0, .n_tokens = n_tree, .tok_seq = seqs, .tok_pos = tpos,
                         .block_tables = table, .max_blocks = max_blocks, .block_size = bs, .n_heads = nh,
                         .n_kv_heads = nkv, .head_dim = hd, .scale = 0.125f, .tree_mask = masks, .tree_start = starts};
        kern_attention(be, &a);
        /* accept path 0, 1, 3, 4: node 4's rows move to ctx + 0..3 */
        const int32_t src[4] = {slots[ctx + 0], slots[ctx + 1], slots[ctx + 3], slots[ctx + 4]};
        const int32_t dst[4] = {slots[ctx + 0], slots[ctx + 1], slots[ctx + 2], slots[ctx + 3]};
        kern_kv_move(be, kc, vc, FL_TYPE_Q8_0, FL_TYPE_Q4_0, src, dst, 4, kv_dim);
        const int path[4] = {0, 1, 3, 4};
        for (int d = 0; d < 4; d++) {
            int32_t p = ctx + d;
            kern_attn_t one = a;
            one.tree_mask = NULL, one.tree_start = NULL, one.n_tokens = 1, one.q = q + (size_t)path[d] * qdim,
            one.out = causal, one.tok_pos = &p;
            kern_attention(be, &one);
            if (memcmp(causal, tree_out + (size_t)path[d] * qdim, (size_t)qdim * 4))
                fail_msg("%s tree node %d differs from causal attention at %d", isa_names[isa], path[d], p);
        }
        kern_free(be, kc), kern_free(be, vc);
        kern_destroy(&be);
    }
}

static void kv_types_and_row_bytes(void **state)
{
    (void)state;
    assert_true(kern_kv_type_ok(FL_TYPE_F16) && kern_kv_type_ok(FL_TYPE_Q8_0) && kern_kv_type_ok(FL_TYPE_Q4_0));
    assert_false(kern_kv_type_ok(FL_TYPE_F32) || kern_kv_type_ok(FL_TYPE_Q4_1) || kern_kv_type_ok(FL_TYPE_BF16));
    assert_int_equal(kern_kv_row_bytes(FL_TYPE_F16, 192), 384);
    assert_int_equal(kern_kv_row_bytes(FL_TYPE_Q8_0, 192), 204);
    assert_int_equal(kern_kv_row_bytes(FL_TYPE_Q4_0, 192), 108);
    assert_int_equal(kern_kv_row_bytes(FL_TYPE_Q8_0, 100), 0); /* not whole blocks */
    assert_int_equal(kern_kv_row_bytes(FL_TYPE_F32, 192), 0);
}

/* --kv-type's values, and caches that refuse what they cannot hold. */
static void kv_type_flags_and_cache_types(void **state)
{
    (void)state;
    engine_opts_t o = {0};
    char *ok[] = {"x", "--kv-type", "q8_0", "--kv-type-v", "q4_0", "--kv-type-k", "f16"};
    for (int i = 1; i < 7; i++) assert_int_equal(engine_parse_flag(&o, 7, ok, &i), 1);
    assert_int_equal(o.kv_type_k, FL_TYPE_F16);
    assert_int_equal(o.kv_type_v, FL_TYPE_Q4_0);
    const char *bad[] = {"q5_0", "Q8_0", "f32", "", "q8"};
    for (size_t b = 0; b < sizeof bad / sizeof *bad; b++) {
        char *argv[] = {"x", "--kv-type", (char *)bad[b]};
        int i = 1;
        assert_int_equal(engine_parse_flag(&o, 3, argv, &i), -1); /* prints why */
    }
    char *missing[] = {"x", "--kv-type-k"};
    int i = 1;
    assert_int_equal(engine_parse_flag(&o, 2, missing, &i), -1);
    assert_int_equal(kv_type_parse("q4_0"), FL_TYPE_Q4_0);
    assert_int_equal(kv_type_parse("bf16"), -1);

    fl_error_t err = {0};
    kern_backend_t *be = kern_cpu_new(1, &err);
    assert_non_null(be);
    assert_null(kv_cache_new(be, 2, 2, 64, 16, FL_TYPE_Q4_1, FL_TYPE_F16, 1 << 20, &err));
    assert_int_equal(err.code, FL_EINVAL);
    assert_non_null(strstr(err.msg, "not a KV type"));
    err = (fl_error_t){0};
    assert_null(kv_cache_new(be, 2, 2, 16, 16, FL_TYPE_F16, FL_TYPE_Q8_0, 1 << 20, &err)); /* head_dim 16 */
    assert_int_equal(err.code, FL_EINVAL);
    assert_non_null(strstr(err.msg, "multiple of 32"));
    /* each cache knows its types; bytes per token = layers x kv_dim x (K + V bytes per element) */
    kv_cache_t *a = kv_cache_new(be, 30, 3, 64, 16, FL_TYPE_Q8_0, FL_TYPE_Q8_0, (size_t)64 << 20, &err);
    kv_cache_t *b = kv_cache_new(be, 30, 3, 64, 16, FL_TYPE_Q8_0, FL_TYPE_F16, (size_t)64 << 20, &err);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->bytes_per_token, 30 * 192 * 34 / 32 * 2);
    assert_int_equal(b->bytes_per_token, 30 * (192 * 34 / 32 + 192 * 2));
    assert_true(kv_cache_capacity_tokens(a) * 100 >= 185 * (int)((64 << 20) / (23040 * 16) * 16));
    char n1[16], n2[16];
    assert_string_equal(kv_cache_type_name(a, n1, sizeof n1), "q8_0");
    assert_string_equal(kv_cache_type_name(b, n2, sizeof n2), "q8_0/f16");
    kv_cache_destroy(&a);
    kv_cache_destroy(&b);
    kern_destroy(&be);
}

/* The lanes' expf equals the C library's on every float in [-104, 0] (and -inf, below the
 * underflow bound, and 0): the quantized attention's softmax rests on it. With another libm the
 * lanes are off (cpu_expf_exact false) and the batch calls expf, which this checks just the same. */
static void batched_expf_equals_libm_on_every_softmax_argument(void **state)
{
    (void)state;
    fprintf(stderr, "expf lanes %s\n", cpu_expf_exact() ? "on (equal to this libm)" : "off: calling expf");
    enum { CHUNK = 1 << 16 };
    static float x[CHUNK], y[CHUNK];
#if defined(__SANITIZE_ADDRESS__)
    const uint32_t step = 61; /* every 61st float under the sanitizers (the full sweep: 10 s in Release) */
#else
    const uint32_t step = 1;
#endif
    const uint32_t hi = 0xc2d00000u; /* -104.0f */
    uint64_t checked = 0;
    for (uint64_t u = 0x80000000u; u <= hi;) {
        int n = 0;
        for (; n < CHUNK && u <= hi; n++, u += step) memcpy(&x[n], &(uint32_t){(uint32_t)u}, sizeof(float));
        cpu_expf_batch(x, y, n);
        for (int i = 0; i < n; i++) {
            const float want = expf(x[i]);
            if (memcmp(&want, &y[i], sizeof want)) fail_msg("expf(%a): libm %a, batch %a", (double)x[i], (double)want, (double)y[i]);
        }
        checked += (uint64_t)n;
    }
    const float edges[] = {-INFINITY, -1000.0f, -0x1.9fe368p+6f, -0x1.9fe366p+6f, -0x1.f8cbb2p+5f, -0.0f, 0.0f};
    const int ne = (int)(sizeof edges / sizeof *edges);
    cpu_expf_batch(edges, y, ne);
    for (int i = 0; i < ne; i++) {
        const float want = expf(edges[i]);
        assert_memory_equal(&want, &y[i], sizeof want);
    }
    fprintf(stderr, "expf: %llu floats equal\n", (unsigned long long)checked);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(kv_types_and_row_bytes),
        cmocka_unit_test(kv_store_writes_ggml_blocks_on_every_isa),
        cmocka_unit_test(attention_matches_flash_spec_and_f16_within_bound),
        cmocka_unit_test(tree_attention_equals_causal_after_move),
        cmocka_unit_test(kv_type_flags_and_cache_types),
        cmocka_unit_test(window_and_softcap_match_flash_spec),
        cmocka_unit_test(batched_expf_equals_libm_on_every_softmax_argument),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
