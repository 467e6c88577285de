/* cuda_attention.cu - paged attention on the CUDA backend: decode, split (flash-decoding), tiled
 * prefill, and tree masks, all reading the f16 KV pools in place through each sequence's block table.
 *
 * How it works: cuda_attention picks a kernel per call. Runs of many tokens of one sequence (prefill,
 * kern_attn_t.n_seqs) go to k_attention_tiled, which reads each K/V row once per tile of query rows.
 * Decode tokens go to k_attention, one thread block (8 warps) per (token, head) with an fp32 online
 * softmax, q rounded to fp16 as the CPU's f16 path does; long contexts with few (token, head) pairs are split
 * over several blocks whose last merges the shares (kern_attn_t.max_len sizes the split, by its
 * power-of-two class so a recorded step stays valid). k_attention<true> (a position a lane) or
 * <false> (a position a warp) by the grid's size: cuda_attention says why. head_dim up to 256.
 *
 * Quantized pools (Q8_0, Q4_0; K and V each F16 or either) are read in place, each element q * d
 * (kv_load1, kv_load8 in cuda_internal.h), into the same fp32 arithmetic; the tiled kernel stages
 * them in shared memory as fp16 (one rounding of q * d, about 2^-11 of it, against a quantization
 * step of up to 2^-7 of the block's largest element for Q8_0). With a quantized pool the soft-cap is
 * the one the CPU then applies, llama.cpp's flash-attention form (attn_score). q stays fp16 where
 * the CPU quantizes it to Q8_0 for a quantized K (ggml's vec-dot type), so the two backends differ
 * by that rounding: tests/unit/test_cuda_backend.c bounds it. */
#include <limits.h>
#include <math.h>

#include "cuda_internal.h"

#define ATT_WARPS 8
#define ATT_MAX_HEAD_DIM 256
#define ATT_SPLIT_SPAN 256 /* positions a split block takes at least */
#define ATT_MAX_SPLITS 32

/* One block of ATT_WARPS warps per (token, head) and split: blockIdx.x = token * n_heads + head,
 * blockIdx.y one of gridDim.y equal shares of the token's positions (one share unless the context
 * is long and the batch small: cuda_attention). Lane l of a warp owns dimensions l, l+32, ... (up
 * to 8 of them: head_dim <= 256). Warp w handles positions w, w+ATT_WARPS, ... of its share with
 * its own running max m, sum l and accumulators; the warps' states are merged through shared memory
 * at the end, and the shares' through `part` by the last block of the (token, head) to finish. */
/* LANES (head_dim a multiple of 8): a warp takes 32 positions at a time, one a lane, each lane
 * computing its position's whole score from 16-byte K loads (ATT_K_ROUND in flight together), then
 * adds the 32 V rows with hd/8 lanes a row, 16 bytes a lane, 32 / (hd/8) rows at a time
 * (ATT_V_ROUND loads in flight a lane). A warp then pays a few memory latencies per 32 positions
 * instead of one per position, which is what a decode at small batch waits on, over a short context
 * or a long one (bench/README.md). It holds more registers: cuda_attention picks it for split grids
 * and for grids that fit the device at once (FOLIO_CUDA_LANE_ATTN=1: always, 0: never). */
#define ATT_K_ROUND 8
#define ATT_V_ROUND 8

/* A score from q.k: soft-capped (kern_attn_t.softcap: tanh(s / cap) * cap, scale-tanh-scale) and
 * scaled; with flash_cap (a quantized pool) cap * tanh(s * (scale / cap)), as the CPU's
 * cpu_attention_q.c. Positions before the sliding window (kern_attn_t.window) are masked by the
 * callers. */
__device__ __forceinline__ float attn_score(float dot, float scale, float softcap, bool flash_cap)
{
    if (softcap > 0.0f) {
        if (flash_cap) return softcap * tanhf(dot * (scale / softcap));
        dot = tanhf(dot * (1.0f / softcap)) * softcap;
    }
    return dot * scale;
}

/* Elements e .. e+7 of a pool row as fp16, for the tiled kernel's shared rows. A quantized block's
 * q x d can pass 65504 by a rounding of d (a block whose largest element is near f16's end): it is
 * held at +-65504 there, not made infinite. */
template <bool QKV>
__device__ __forceinline__ uint4 kv_halves8(const kv_pool &p, int32_t slot, int e)
{
    if (!QKV || p.type == FL_TYPE_F16) return *(const uint4 *)(p.base + (size_t)slot * p.row_bytes + (size_t)e * 2);
    float f[8];
    kv_load8(p, slot, e, f);
    uint4 u;
    __half2 *h = (__half2 *)&u;
#pragma unroll
    for (int t = 0; t < 4; t++)
        h[t] = __floats2half2_rn(fminf(fmaxf(f[2 * t], -65504.0f), 65504.0f),
                                 fminf(fmaxf(f[2 * t + 1], -65504.0f), 65504.0f));
    return u;
}

/* QKV: a pool may be quantized (the type tests compiled in); false for two F16 pools, which then
 * take the kernel exactly as it was before quantized pools, registers included. */
template <bool LANES, bool QKV>
__global__ void __launch_bounds__(ATT_WARPS * 32) k_attention(float *out, const float *q, kv_pool kp,
                                                              kv_pool vp, const int32_t *tok_seq,
                                                              const int32_t *tok_pos, const int32_t *block_tables,
                                                              int max_blocks, int bs, int n_heads, int n_kv_heads,
                                                              int hd, float scale, const uint64_t *tree_mask,
                                                              const int32_t *tree_start, float *part,
                                                              unsigned *arrived, int window, float softcap)
{
    pdl_trigger();
    pdl_wait();
    __shared__ float qs[ATT_MAX_HEAD_DIM];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][ATT_MAX_HEAD_DIM];
    __shared__ float chunk_p[LANES ? ATT_WARPS : 1][32];
    __shared__ int32_t chunk_slot[LANES ? ATT_WARPS : 1][32];
    const int i = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
    const int kvh = h / (n_heads / n_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t qoff = ((size_t)i * n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = __half2float(__float2half_rn(q[qoff + d]));
    __syncthreads();
    float *o = out + qoff;
    /* kern_attn_len / kern_attn_visible, on the device */
    const uint64_t tm = tree_mask ? tree_mask[i] : 0;
    const int ts = tree_mask ? tree_start[i] : 0;
    const int len = tree_mask ? ts + (tm ? 64 - __clzll((long long)tm) : 0) : tok_pos[i] + 1;
    if (len <= 0) { /* uniform over the block */
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    const int32_t *bt = block_tables + (size_t)tok_seq[i] * max_blocks;
    const size_t kv_stride = (size_t)n_kv_heads * hd, hoff = (size_t)kvh * hd;
    const __half *kc = (const __half *)kp.base, *vc = (const __half *)vp.base; /* as F16 pools */
    const bool flash_cap = QKV && (kp.type != FL_TYPE_F16 || vp.type != FL_TYPE_F16);
    /* This block's share of the positions: split blockIdx.y of gridDim.y (flash-decoding) */
    const int splits = (int)gridDim.y, split = (int)blockIdx.y;
    const int lo = (int)((int64_t)len * split / splits), hi = (int)((int64_t)len * (split + 1) / splits);
    const int wlo = window > 0 ? tok_pos[i] - window + 1 : 0; /* first position in the window */

    float m = -INFINITY, l = 0.0f, acc[ATT_MAX_HEAD_DIM / 32];
#pragma unroll
    for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) acc[r] = 0.0f;
    /* LANES: the V rows' lanes. Lane `lane` adds dimensions 8 vsub .. 8 vsub + 7 of rows vgrp,
     * vgrp + vgroups, ... of a chunk (lanes past vgroups * vlanes idle there). */
    const int vlanes = LANES ? hd / 8 : 1, vgroups = LANES ? 32 / vlanes : 1;
    const int vgrp = lane / vlanes, vsub = lane % vlanes;
    float vacc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (LANES) {
        for (int j0 = lo + 32 * warp; j0 < hi; j0 += 32 * ATT_WARPS) {
            const int j = j0 + lane;
            const bool vis = j < hi && j >= wlo && !(tree_mask && j >= ts && !((tm >> (j - ts)) & 1u)); /* masked: weighs 0 */
            int32_t slot = -1;
            float s = -INFINITY;
            if (vis) {
                slot = bt[j / bs] * bs + j % bs; /* < 2^31 slots: the pools would not fit a device */
                const uint4 *kr = (const uint4 *)(kc + (size_t)slot * kv_stride + hoff);
                float dot = 0.0f;
                if (QKV && kp.type != FL_TYPE_F16) { /* a quantized K: 8 elements of one block at a time */
                    for (int d8 = 0; d8 < hd / 8; d8++) {
                        float kf[8];
                        kv_load8(kp, slot, (int)hoff + 8 * d8, kf);
#pragma unroll
                        for (int t = 0; t < 8; t++) dot = fmaf(qs[8 * d8 + t], kf[t], dot);
                    }
                } else {
                    for (int d0 = 0; d0 < hd / 8; d0 += ATT_K_ROUND) {
                        uint4 kv[ATT_K_ROUND];
#pragma unroll
                        for (int u = 0; u < ATT_K_ROUND; u++)
                            if (d0 + u < hd / 8) kv[u] = kr[d0 + u];
#pragma unroll
                        for (int u = 0; u < ATT_K_ROUND; u++) {
                            if (d0 + u >= hd / 8) break;
                            const __half2 *k2 = (const __half2 *)&kv[u];
#pragma unroll
                            for (int t = 0; t < 4; t++) {
                                const float2 kf = __half22float2(k2[t]);
                                dot = fmaf(qs[8 * (d0 + u) + 2 * t], kf.x, dot);
                                dot = fmaf(qs[8 * (d0 + u) + 2 * t + 1], kf.y, dot);
                            }
                        }
                    }
                }
                s = attn_score(dot, scale, softcap, flash_cap);
            }
            float cmax = s;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
            const float mn = fmaxf(m, cmax);
            if (mn == -INFINITY) continue; /* uniform: -inf scores before any finite one weigh 0 */
            const float corr = m == -INFINITY ? 0.0f : expf(m - mn);
            const float p = vis ? expf(s - mn) : 0.0f;
            float psum = p;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
            l = l * corr + psum;
            m = mn;
            chunk_p[warp][lane] = p;
            chunk_slot[warp][lane] = slot;
            __syncwarp();
#pragma unroll
            for (int k = 0; k < 8; k++) vacc[k] *= corr;
            if (QKV && vgrp < vgroups && vp.type != FL_TYPE_F16) {
                for (int t = vgrp; t < 32; t += vgroups) {
                    const float pv = chunk_p[warp][t];
                    if (pv == 0.0f) continue; /* masked (or underflowed): absent */
                    float vf[8];
                    kv_load8(vp, chunk_slot[warp][t], (int)hoff + 8 * vsub, vf);
#pragma unroll
                    for (int k = 0; k < 8; k++) vacc[k] = fmaf(pv, vf[k], vacc[k]);
                }
            } else if (vgrp < vgroups) {
                for (int t0 = vgrp; t0 < 32; t0 += vgroups * ATT_V_ROUND) {
                    uint4 vv[ATT_V_ROUND];
                    float pv[ATT_V_ROUND];
#pragma unroll
                    for (int u = 0; u < ATT_V_ROUND; u++) {
                        const int t = t0 + u * vgroups;
                        pv[u] = t < 32 ? chunk_p[warp][t] : 0.0f;
                        /* masked (or underflowed): absent, even where V holds inf */
                        vv[u] = pv[u] != 0.0f
                                    ? ((const uint4 *)(vc + (size_t)chunk_slot[warp][t] * kv_stride + hoff))[vsub]
                                    : make_uint4(0u, 0u, 0u, 0u);
                    }
#pragma unroll
                    for (int u = 0; u < ATT_V_ROUND; u++) {
                        if (pv[u] == 0.0f) continue;
                        const __half2 *v2 = (const __half2 *)&vv[u];
#pragma unroll
                        for (int t = 0; t < 4; t++) {
                            const float2 vf = __half22float2(v2[t]);
                            vacc[2 * t] = fmaf(pv[u], vf.x, vacc[2 * t]);
                            vacc[2 * t + 1] = fmaf(pv[u], vf.y, vacc[2 * t + 1]);
                        }
                    }
                }
            }
            __syncwarp(); /* the chunk's p and slots are read before the next chunk writes them */
        }
    } else
    for (int j = lo + warp; j < hi; j += ATT_WARPS) {
        if (j < wlo || (tree_mask && j >= ts && !((tm >> (j - ts)) & 1u))) continue; /* masked: weighs 0 */
        const int32_t slot = bt[j / bs] * bs + j % bs;
        const __half *kr = kc + (size_t)slot * kv_stride + hoff, *vr = vc + (size_t)slot * kv_stride + hoff; /* F16 */
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) {
            const int d = lane + 32 * r;
            if (d < hd) s += qs[d] * (QKV ? kv_load1(kp, slot, (int)hoff + d) : __half2float(kr[d]));
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        s = attn_score(s, scale, softcap, flash_cap);
        const float mn = fmaxf(m, s);
        if (mn == -INFINITY) continue; /* a -inf score before any finite one weighs 0 */
        const float corr = m == -INFINITY ? 0.0f : expf(m - mn);
        const float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) {
            const int d = lane + 32 * r;
            if (d < hd) acc[r] = acc[r] * corr + p * (QKV ? kv_load1(vp, slot, (int)hoff + d) : __half2float(vr[d]));
        }
        m = mn;
    }
    if (lane == 0) wm[warp] = m, wl[warp] = l;
    if constexpr (LANES) { /* the row groups' sums, one group after another */
        for (int g = 0; g < vgroups; g++) {
            if (vgrp == g) {
#pragma unroll
                for (int k = 0; k < 8; k++)
                    wacc[warp][8 * vsub + k] = g ? wacc[warp][8 * vsub + k] + vacc[k] : vacc[k];
            }
            __syncwarp();
        }
    } else {
#pragma unroll
        for (int r = 0; r < ATT_MAX_HEAD_DIM / 32; r++) {
            const int d = lane + 32 * r;
            if (d < hd) wacc[warp][d] = acc[r];
        }
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, wm[w]);
    /* The warps' states merged: the output, or with a split this block's (max, sum, unnormalized
     * output) into part, where the last block of the (token, head) to arrive merges every split's
     * (threadFenceReduction's pattern) and resets the counter for the next launch. */
    const size_t th = (size_t)i * n_heads + h, rec = (size_t)hd + 2;
    float *mine = splits > 1 ? part + (th * splits + split) * rec : NULL;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            const float f = wm[w] == -INFINITY ? 0.0f : expf(wm[w] - M);
            num += wacc[w][d] * f;
            den += wl[w] * f;
        }
        if (!mine) {
            o[d] = den > 0.0f ? num / den : 0.0f;
            continue;
        }
        mine[2 + d] = num;
        if (d == 0) mine[0] = M, mine[1] = den;
    }
    if (!mine) return;
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) {
        last = atomicAdd(&arrived[th], 1u) == (unsigned)splits - 1;
        if (last) arrived[th] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const volatile float *all = part + th * splits * rec;
    float MS = -INFINITY;
    for (int sp = 0; sp < splits; sp++) MS = fmaxf(MS, all[sp * rec]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int sp = 0; sp < splits; sp++) {
            const float ms = all[sp * rec];
            const float f = ms == -INFINITY ? 0.0f : expf(ms - MS);
            num += all[sp * rec + 2 + d] * f;
            den += all[sp * rec + 1] * f;
        }
        o[d] = den > 0.0f ? num / den : 0.0f;
    }
}

/* Attention for runs of tokens of one sequence (prefill): block (tile of qt consecutive tokens,
 * KV head g) holds the query rows of the tile's tokens for the heads sharing g (rows = qt x group
 * <= TA_ROWS, q rounded to fp16 as k_attention does) and walks the sequence's positions TA_KT at a
 * time: the K/V rows of a tile go through shared memory once for all those rows, where k_attention
 * reads each once per (token, head). A tile whose tokens come from several sequences is taken one
 * run of one sequence at a time. Four threads per row: for scores thread c takes positions c, c+4,
 * ...; for the output, dimension pairs 2c, 2c+8, .... Online fp32 softmax per row; masked positions
 * (beyond a token's length, or outside its tree mask) weigh exactly 0, as in k_attention. head_dim
 * a multiple of 8, at most TA_MAX_HD. */
#define TA_THREADS 256
#define TA_ROWS 64
#define TA_KT 32
#define TA_MAX_HD 128
#define TA_PAD 8 /* halves after each shared row: 16-byte aligned rows, rows 4 banks apart */

template <bool QKV>
__global__ void __launch_bounds__(TA_THREADS) k_attention_tiled(
    float *out, const float *q, kv_pool kp, kv_pool vp, const int32_t *tok_seq, const int32_t *tok_pos,
    const int32_t *block_tables, int max_blocks, int bs, int n_tokens, int n_heads, int n_kv_heads, int hd,
    float scale, const uint64_t *tree_mask, const int32_t *tree_start, int qt, int window, float softcap)
{
    pdl_trigger();
    pdl_wait();
    __shared__ __align__(16) __half qs[TA_ROWS][TA_MAX_HD + TA_PAD];
    __shared__ __align__(16) __half ks[TA_KT][TA_MAX_HD + TA_PAD];
    __shared__ __align__(16) __half vs[TA_KT][TA_MAX_HD + TA_PAD];
    __shared__ float ps[TA_ROWS][TA_KT + 1];
    __shared__ int32_t t_seq[TA_ROWS], t_len[TA_ROWS], t_ts[TA_ROWS];
    __shared__ uint64_t t_tm[TA_ROWS];
    __shared__ int32_t slot_s[TA_KT];
    const int group = n_heads / n_kv_heads, g = blockIdx.y;
    const int t0 = blockIdx.x * qt, nt = min(qt, n_tokens - t0), n_rows = nt * group;
    const int tid = threadIdx.x, r = tid >> 2, c = tid & 3;
    const int ti = r / group, h = g * group + r % group; /* this thread's row: token t0 + ti, head h */
    const int hoff = g * hd;
    const bool flash_cap = QKV && (kp.type != FL_TYPE_F16 || vp.type != FL_TYPE_F16);

    for (int i = tid; i < nt; i += blockDim.x) { /* kern_attn_len, on the device */
        const int t = t0 + i;
        t_seq[i] = tok_seq[t];
        t_tm[i] = tree_mask ? tree_mask[t] : 0;
        t_ts[i] = tree_mask ? tree_start[t] : 0;
        t_len[i] = tree_mask ? t_ts[i] + (t_tm[i] ? 64 - __clzll((long long)t_tm[i]) : 0) : tok_pos[t] + 1;
    }
    for (int e = tid; e < n_rows * (hd / 2); e += blockDim.x) {
        const int rr = e / (hd / 2), d = 2 * (e % (hd / 2));
        const float *qr = q + ((size_t)(t0 + rr / group) * n_heads + g * group + rr % group) * hd + d;
        *(__half2 *)&qs[rr][d] = __floats2half2_rn(qr[0], qr[1]);
    }
    __syncthreads();

    for (int sub = 0, end; sub < nt; sub = end) { /* each run of one sequence (uniform over the block) */
        const int seq = t_seq[sub];
        int max_len = 0;
        for (end = sub; end < nt && t_seq[end] == seq; end++) max_len = max(max_len, t_len[end]);
        const bool active = r < n_rows && ti >= sub && ti < end;
        const int len = active ? t_len[ti] : 0, ts = active ? t_ts[ti] : 0;
        const int wlo = active && window > 0 ? tok_pos[t0 + ti] - window + 1 : 0;
        const uint64_t tm = active ? t_tm[ti] : 0;
        const int32_t *bt = block_tables + (size_t)seq * max_blocks;
        float m = -INFINITY, l = 0.0f, acc[TA_MAX_HD / 4];
#pragma unroll
        for (int k = 0; k < TA_MAX_HD / 4; k++) acc[k] = 0.0f;

        for (int kt = 0; kt < max_len; kt += TA_KT) {
            if (tid < TA_KT) {
                const int j = kt + tid;
                slot_s[tid] = j < max_len ? bt[j / bs] * bs + j % bs : -1;
            }
            __syncthreads();
            for (int e = tid; e < TA_KT * (hd / 8); e += blockDim.x) {
                const int jj = e / (hd / 8), d = 8 * (e % (hd / 8));
                const int32_t slot = slot_s[jj];
                uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
                if (slot >= 0) {
                    kv = kv_halves8<QKV>(kp, slot, hoff + d);
                    vv = kv_halves8<QKV>(vp, slot, hoff + d);
                }
                *(uint4 *)&ks[jj][d] = kv;
                *(uint4 *)&vs[jj][d] = vv;
            }
            __syncthreads();
            float s[TA_KT / 4], tile_max = -INFINITY;
#pragma unroll
            for (int u = 0; u < TA_KT / 4; u++) {
                const int j = kt + c + 4 * u;
                float dot = 0.0f;
                if (active && j < len && j >= wlo && (!tree_mask || j < ts || ((tm >> (j - ts)) & 1u))) {
                    for (int d = 0; d < hd; d += 2) {
                        const float2 qv = __half22float2(*(const __half2 *)&qs[r][d]);
                        const float2 kv = __half22float2(*(const __half2 *)&ks[c + 4 * u][d]);
                        dot = fmaf(qv.x, kv.x, dot);
                        dot = fmaf(qv.y, kv.y, dot);
                    }
                    s[u] = attn_score(dot, scale, softcap, flash_cap);
                } else {
                    s[u] = -INFINITY; /* masked: weighs 0 */
                }
                tile_max = fmaxf(tile_max, s[u]);
            }
            /* the row's four threads are lanes 4k..4k+3 of one warp */
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float mn = fmaxf(m, tile_max);
            float corr = 1.0f, psum = 0.0f;
            if (mn != -INFINITY) { /* else nothing finite yet: -inf scores weigh 0 */
                corr = m == -INFINITY ? 0.0f : expf(m - mn);
#pragma unroll
                for (int u = 0; u < TA_KT / 4; u++) {
                    s[u] = expf(s[u] - mn);
                    psum += s[u];
                }
            } else {
#pragma unroll
                for (int u = 0; u < TA_KT / 4; u++) s[u] = 0.0f;
            }
            psum += __shfl_xor_sync(0xffffffffu, psum, 1);
            psum += __shfl_xor_sync(0xffffffffu, psum, 2);
            l = l * corr + psum;
            m = mn;
            if (r < TA_ROWS) {
#pragma unroll
                for (int u = 0; u < TA_KT / 4; u++) ps[r][c + 4 * u] = s[u];
            }
            __syncthreads();
            if (active) {
#pragma unroll
                for (int k = 0; k < TA_MAX_HD / 8; k++) acc[2 * k] *= corr, acc[2 * k + 1] *= corr;
                for (int jj = 0; jj < TA_KT; jj++) {
                    const float p = ps[r][jj];
                    if (p == 0.0f) continue; /* a masked position is absent, even where V holds inf */
#pragma unroll
                    for (int k = 0; k < TA_MAX_HD / 8; k++) {
                        const int d = 2 * c + 8 * k;
                        if (d < hd) {
                            const float2 v = __half22float2(*(const __half2 *)&vs[jj][d]);
                            acc[2 * k] = fmaf(p, v.x, acc[2 * k]);
                            acc[2 * k + 1] = fmaf(p, v.y, acc[2 * k + 1]);
                        }
                    }
                }
            }
            __syncthreads(); /* before the next tile overwrites slot_s, ks, vs, ps */
        }
        if (active) {
            float *o = out + ((size_t)(t0 + ti) * n_heads + h) * hd;
#pragma unroll
            for (int k = 0; k < TA_MAX_HD / 8; k++) {
                const int d = 2 * c + 8 * k;
                if (d < hd) {
                    o[d] = l > 0.0f ? acc[2 * k] / l : 0.0f;
                    o[d + 1] = l > 0.0f ? acc[2 * k + 1] / l : 0.0f;
                }
            }
        }
    }
}

void cuda_attention(kern_backend_t *be, const kern_attn_t *a)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (a->n_tokens <= 0 || !op_begin(cb) || !cuda_kv_types_ok(cb, a->k_type, a->v_type)) return;
    if (a->head_dim <= 0 || a->head_dim > ATT_MAX_HEAD_DIM || a->n_kv_heads <= 0 || a->n_heads <= 0 ||
        a->n_heads % a->n_kv_heads || a->block_size <= 0) {
        note_error(cb, FL_EUNSUPPORTED,
                   "cuda backend: attention with head_dim %d, %d heads, %d KV heads, block size %d is not supported "
                   "(head_dim <= %d, heads a multiple of KV heads)",
                   a->head_dim, a->n_heads, a->n_kv_heads, a->block_size, ATT_MAX_HEAD_DIM);
        return;
    }
    const int kv_dim = a->n_kv_heads * a->head_dim;
    const kv_pool kp = kv_pool_of(a->k_cache, a->k_type, kv_dim), vp = kv_pool_of(a->v_cache, a->v_type, kv_dim);
    if ((kp.type != FL_TYPE_F16 || vp.type != FL_TYPE_F16) && a->head_dim % 32) {
        note_error(cb, FL_EUNSUPPORTED, "cuda backend: a %s/%s KV cache needs head_dim a multiple of 32 (got %d)",
                   fl_dtype_name(kp.type), fl_dtype_name(vp.type), a->head_dim);
        return;
    }
    const bool qkv = kp.type != FL_TYPE_F16 || vp.type != FL_TYPE_F16;
    const int64_t blocks = (int64_t)a->n_tokens * a->n_heads;
    if (blocks > INT_MAX) {
        note_error(cb, FL_ERANGE, "cuda backend: attention over %d tokens x %d heads is too large", a->n_tokens,
                   a->n_heads);
        return;
    }
    const int group = a->n_heads / a->n_kv_heads;
    if (cb->tiled_attn && a->n_seqs > 0 && a->n_tokens >= KERN_ATTN_RUN_MIN * a->n_seqs && a->head_dim % 8 == 0 &&
        a->head_dim <= TA_MAX_HD && group <= TA_ROWS) { /* prefill: runs of many tokens of one sequence */
        const int qt = TA_ROWS / group;
        launch(cb, qkv ? k_attention_tiled<true> : k_attention_tiled<false>, dim3((unsigned)((a->n_tokens + qt - 1) / qt), (unsigned)a->n_kv_heads),
               TA_THREADS, a->out, a->q, kp, vp, a->tok_seq,
               a->tok_pos, a->block_tables, a->max_blocks, a->block_size, a->n_tokens, a->n_heads, a->n_kv_heads,
               a->head_dim, a->scale, a->tree_mask, a->tree_start, qt, a->window, a->softcap);
        return;
    }
    /* Contexts longer than ATT_SPLIT_SPAN positions are split over up to ATT_MAX_SPLITS blocks a
     * (token, head) where the (token, head) pairs alone leave multiprocessors idle, the grid staying
     * within two waves of k_attention<false> (the lanes kernel, which runs split grids, holds fewer
     * blocks: at batch 1 that is 32 shares, about four of its waves, the configuration measured): a
     * 4,096-position context is otherwise 32 blocks of 8 warps walking 512 positions each. Where the
     * pairs already cover the device (the 8B shape's 256 at batch 8) the grid is left whole: split,
     * it was slower there. Sized by the class of max_len (a recorded step stays valid within it);
     * blocks split the real lengths. Measurements: bench/README.md, long contexts. */
    int splits = 1;
    if (cb->split_attn && a->max_len > ATT_SPLIT_SPAN && blocks < cb->sms) {
        const int64_t span = (int64_t)1 << kern_attn_len_class(a->max_len);
        const int64_t by_len = (span + ATT_SPLIT_SPAN - 1) / ATT_SPLIT_SPAN;
        const int64_t by_fill = 2 * (int64_t)cb->attn_blocks / blocks;
        splits = (int)(by_len < by_fill ? by_len : by_fill);
        if (splits > ATT_MAX_SPLITS) splits = ATT_MAX_SPLITS;
        if (splits < 1) splits = 1;
    }
    if (splits > 1) {
        const size_t th = (size_t)blocks, part_bytes = th * splits * ((size_t)a->head_dim + 2) * sizeof(float);
        if (!grow_device(cb, (void **)&cb->attn_part, &cb->attn_part_cap, part_bytes, "split attention", true))
            return;
        const size_t had = cb->attn_arrived_cap;
        if (!grow_device(cb, (void **)&cb->attn_arrived, &cb->attn_arrived_cap, th * sizeof(unsigned),
                         "split attention", true))
            return;
        if (cb->attn_arrived_cap != had)
            OP_CUDA(cb, cudaMemsetAsync(cb->attn_arrived, 0, cb->attn_arrived_cap, cb->stream));
    }
    /* The lanes kernel holds more registers (2 blocks an SM against 5): it pays where few (token, head)
     * pairs leave the device latency-bound, short contexts or long, and loses where many would fill
     * it with the other kernel (large batches; bench/README.md). A split grid has fewer pairs than
     * multiprocessors, so it always takes the lanes kernel. */
    const bool lanes = a->head_dim % 8 == 0 &&
                       (cb->lane_attn == 1 || (cb->lane_attn < 0 && blocks <= cb->lane_attn_blocks));
    launch(cb, qkv ? (lanes ? k_attention<true, true> : k_attention<false, true>)
                   : (lanes ? k_attention<true, false> : k_attention<false, false>),
           dim3((unsigned)blocks, (unsigned)splits),
           ATT_WARPS * 32, a->out, a->q, kp, vp, a->tok_seq,
           a->tok_pos, a->block_tables, a->max_blocks, a->block_size, a->n_heads, a->n_kv_heads, a->head_dim,
           a->scale, a->tree_mask, a->tree_start, splits > 1 ? cb->attn_part : (float *)NULL,
           splits > 1 ? cb->attn_arrived : (unsigned *)NULL, a->window, a->softcap);
}

int cuda_attention_setup(cuda_backend_t *cb, int sms, fl_error_t *err)
{
    int per_sm = 0;
    /* sized by the F16 kernels (quantized pools' may hold more registers) */
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_attention<true, false>, ATT_WARPS * 32, 0), err);
    cb->lane_attn_blocks = sms * per_sm;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_attention<false, false>, ATT_WARPS * 32, 0), err);
    cb->attn_blocks = sms * per_sm;
    cb->sms = sms;
    return FL_OK;
}
