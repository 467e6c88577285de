/* sample_cuda.cu - kernels/sampling.h's draw on the device, one thread block per row.
 *
 * The definition ranks tokens by (logit desc, id asc) and weighs them with integers, so the device
 * reproduces the CPU's choice exactly with order-free reductions:
 *   - top-k and top-p are each a boundary in rank order: the first token at which the count (top-k)
 *     or the weight (top-p) of the tokens ranked at or above it reaches a need. The boundary's key
 *     is found by a radix select over the 32-bit keys, 8 bits a pass, with shared histograms of
 *     counts or weights; among the tokens that share that key, the need is met in id order by a
 *     block scan over contiguous id chunks.
 *   - The kept set is then {key > tau} + {key == tau, id <= id_tau}; min-p, a filter on weight,
 *     applies within the draw, which walks the kept in id order by the same chunked scan.
 * Passes recompute weights from the logits (cheap next to reading them). The logit adjustments run
 * before all this, as a small kernel writing the adjusted values into the rows (one thread each;
 * a row's tokens are distinct, so no two threads write one logit). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sample_cuda.h"
#include "sampling.h"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)

typedef struct {
    uint32_t tau;   /* boundary key */
    int id;         /* last id kept among the tokens of key tau */
} bound_t;

__device__ __forceinline__ bool kept(uint32_t key, int id, bound_t b) { return key > b.tau || (key == b.tau && id <= b.id); }

struct sample_shared {
    unsigned long long hist[256];
    unsigned long long warp[SAMPLE_WARPS];
    float fwarp[SAMPLE_WARPS];
    unsigned long long bcast_u64;
    uint32_t bcast_key;
    int bcast_id;
    int last_kept;
};

__device__ float block_max(float v, sample_shared *sh)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0) sh->fwarp[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < SAMPLE_WARPS; w++) m = fmaxf(m, sh->fwarp[w]);
    __syncthreads();
    return m;
}

/* Exclusive prefix of v over the threads in order; *total gets the sum of all. */
__device__ unsigned long long block_scan(unsigned long long v, sample_shared *sh, unsigned long long *total)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long x = v;
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh->warp[warp] = x;
    __syncthreads();
    unsigned long long before = 0, all = 0;
    for (int w = 0; w < SAMPLE_WARPS; w++) {
        if (w < warp) before += sh->warp[w];
        all += sh->warp[w];
    }
    __syncthreads();
    *total = all;
    return before + x - v;
}

/* The value a token contributes: 1 (count) or its weight. */
__device__ __forceinline__ unsigned long long value_of(float l, float mx, float inv_t, bool count)
{
    return count ? 1ull : (unsigned long long)kern_sample_weight(l, mx, inv_t);
}

/* The rank boundary at which the kept tokens' count or weight first reaches need (need >= 1 and
 * at most the kept total). */
__device__ bound_t select_bound(const float *l, int vocab, float mx, float inv_t, bound_t set, bool count,
                                unsigned long long need, sample_shared *sh)
{
    uint32_t prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const uint32_t hi_mask = shift == 24 ? 0u : ~0u << (shift + 8);
        for (int b = threadIdx.x; b < 256; b += SAMPLE_THREADS) sh->hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const uint32_t key = kern_sample_key(l[i]);
            if (!kept(key, i, set) || (key & hi_mask) != prefix) continue;
            const unsigned long long v = value_of(l[i], mx, inv_t, count);
            if (v) atomicAdd(&sh->hist[(key >> shift) & 255u], v);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned long long acc = 0;
            int bin = 0;
            for (int b = 255; b >= 0; b--) {
                if (acc + sh->hist[b] >= need) {
                    bin = b;
                    break;
                }
                acc += sh->hist[b];
            }
            sh->bcast_key = prefix | ((uint32_t)bin << shift);
            sh->bcast_u64 = need - acc;
        }
        __syncthreads();
        prefix = sh->bcast_key;
        need = sh->bcast_u64;
        __syncthreads();
    }
    /* Tokens of key `prefix`, in id order: the one at which the running value reaches need. */
    const int chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    unsigned long long mine = 0;
    for (int i = lo; i < hi; i++) {
        const uint32_t key = kern_sample_key(l[i]);
        if (key == prefix && kept(key, i, set)) mine += value_of(l[i], mx, inv_t, count);
    }
    if (threadIdx.x == 0) sh->bcast_id = -1;
    unsigned long long total;
    const unsigned long long before = block_scan(mine, sh, &total);
    if (before < need && before + mine >= need) {
        unsigned long long run = before;
        for (int i = lo; i < hi; i++) {
            const uint32_t key = kern_sample_key(l[i]);
            if (key != prefix || !kept(key, i, set)) continue;
            run += value_of(l[i], mx, inv_t, count);
            if (run >= need) {
                sh->bcast_id = i;
                break;
            }
        }
    }
    __syncthreads();
    bound_t b = {prefix, sh->bcast_id};
    if (b.id < 0) b = set; /* unreachable when need is within the total; keep the set as it is */
    __syncthreads();
    return b;
}

__global__ void k_sample_rows(const float *logits, int vocab, const cuda_sample_row_t *rows, int32_t *out)
{
    __shared__ sample_shared sh;
    const cuda_sample_row_t p = rows[blockIdx.x];
    if (!p.active) return;
    const float *l = logits + (size_t)blockIdx.x * vocab;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) m = fmaxf(m, l[i]);
    const float mx = block_max(m, &sh);
    if (!(mx > -INFINITY) || mx == INFINITY) return;
    const float inv_t = p.inv_t;

    bound_t set = {0u, vocab - 1}; /* every token: keys are >= 0 */
    if (p.top_k > 0 && p.top_k < vocab) set = select_bound(l, vocab, mx, inv_t, set, true, (unsigned long long)p.top_k, &sh);
    if (p.top_p < 1.0f) {
        unsigned long long w = 0, total;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const float li = l[i];
            if (kept(kern_sample_key(li), i, set)) w += kern_sample_weight(li, mx, inv_t);
        }
        block_scan(w, &sh, &total);
        unsigned long long want = (unsigned long long)((double)p.top_p * (double)total);
        if (want < 1) want = 1; /* the best token weighs 2^40: the same shortest prefix */
        set = select_bound(l, vocab, mx, inv_t, set, false, want, &sh);
    }

    /* min-p, then the draw: the first kept id, in id order, whose running weight exceeds target. */
    const int chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    unsigned long long mine = 0;
    int last = -1;
    for (int i = lo; i < hi; i++) {
        const float li = l[i];
        if (!kept(kern_sample_key(li), i, set)) continue;
        const unsigned long long w = kern_sample_weight(li, mx, inv_t);
        if (w < p.min_w) continue;
        mine += w;
        last = i;
    }
    unsigned long long S;
    const unsigned long long before = block_scan(mine, &sh, &S);
    const unsigned long long target = (unsigned long long)(p.u * (double)S);
    if (threadIdx.x == 0) sh.bcast_id = -1, sh.last_kept = -1;
    __syncthreads();
    if (before <= target && before + mine > target) {
        unsigned long long run = before;
        for (int i = lo; i < hi; i++) {
            const float li = l[i];
            if (!kept(kern_sample_key(li), i, set)) continue;
            const unsigned long long w = kern_sample_weight(li, mx, inv_t);
            if (w < p.min_w) continue;
            run += w;
            if (run > target) {
                sh.bcast_id = i;
                break;
            }
        }
    }
    /* None exceeded it (rounding of u * S): the last kept id, as the CPU. */
    if (last >= 0) atomicMax(&sh.last_kept, last);
    __syncthreads();
    if (threadIdx.x == 0) {
        const int id = sh.bcast_id >= 0 ? sh.bcast_id : sh.last_kept;
        if (id >= 0) out[blockIdx.x] = id;
    }
}

cudaError_t cuda_sample_launch(const float *logits, int n, int vocab, const cuda_sample_row_t *rows, int32_t *out,
                               cudaStream_t stream)
{
    if (n <= 0 || vocab <= 1) return cudaSuccess;
    k_sample_rows<<<n, SAMPLE_THREADS, 0, stream>>>(logits, vocab, rows, out);
    return cudaGetLastError();
}

/* ------------------------------------------------------------------------------------------------
 * Logit adjustments */

struct cuda_adjust_entry {
    int32_t row, token;
    float penalty, add;
};

__global__ void k_adjust(float *logits, int vocab, const cuda_adjust_entry *e, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float *l = logits + (size_t)e[i].row * vocab + e[i].token;
    *l = kern_sample_adjust_logit(*l, e[i].penalty, e[i].add);
}

cudaError_t cuda_sample_adjust(cuda_sample_adjust_t *a, float *logits, int n, int vocab,
                               const kern_sampling_t *params, cudaStream_t stream)
{
    size_t total = 0;
    for (int r = 0; r < n; r++)
        if (params[r].adjust && params[r].n_adjust > 0) total += (size_t)params[r].n_adjust;
    if (total == 0 || vocab <= 0) return cudaSuccess;
    if (total > a->cap) {
        size_t cap = a->cap * 2 > total ? a->cap * 2 : total;
        if (cap < 1024) cap = 1024;
        cuda_adjust_entry *h = (cuda_adjust_entry *)realloc(a->h, cap * sizeof *h);
        if (!h) return cudaErrorMemoryAllocation;
        a->h = h;
        if (a->d) cudaFree(a->d); /* waits for the device: no earlier call still reads it */
        a->d = NULL;
        a->cap = 0;
        const cudaError_t e = cudaMalloc((void **)&a->d, cap * sizeof *a->d);
        if (e != cudaSuccess) return e;
        a->cap = cap;
    }
    int k = 0;
    for (int r = 0; r < n; r++) {
        const kern_logit_adjust_t *adj = params[r].adjust;
        if (!adj) continue;
        assert(kern_sample_adjust_distinct(adj, params[r].n_adjust));
        for (int j = 0; j < params[r].n_adjust; j++)
            if (adj[j].token >= 0 && adj[j].token < vocab) /* as kern_sample_adjust_row skips the rest */
                a->h[k++] = cuda_adjust_entry{r, adj[j].token, adj[j].penalty, adj[j].add};
    }
    if (k == 0) return cudaSuccess;
    /* Pageable source: the copy has read a->h when the call returns. */
    cudaError_t e = cudaMemcpyAsync(a->d, a->h, (size_t)k * sizeof *a->h, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return e;
    k_adjust<<<(k + 255) / 256, 256, 0, stream>>>(logits, vocab, a->d, k);
    return cudaGetLastError();
}

void cuda_sample_adjust_free(cuda_sample_adjust_t *a)
{
    if (a->d) cudaFree(a->d);
    free(a->h);
    *a = cuda_sample_adjust_t{};
}

/* ------------------------------------------------------------------------------------------------
 * Allowed-token masks (constrained output): one thread per (masked row, token). */

__global__ void k_mask(float *logits, int vocab, const uint64_t *masks, const int32_t *rows, int words)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
    if (t >= vocab) return;
    if (!((masks[(size_t)m * words + t / 64] >> (t % 64)) & 1ull)) logits[(size_t)rows[m] * vocab + t] = -INFINITY;
}

cudaError_t cuda_sample_mask(cuda_sample_mask_t *m, float *logits, int n, int vocab, const kern_sampling_t *params,
                             cudaStream_t stream)
{
    int rows = 0;
    for (int r = 0; r < n; r++) rows += params[r].allowed != NULL;
    if (rows == 0 || vocab <= 0) return cudaSuccess;
    const int words = (vocab + 63) / 64;
    const size_t need = (size_t)rows * words;
    if (need > m->cap_words || (size_t)rows > m->cap_rows) {
        uint64_t *h = (uint64_t *)realloc(m->h, need * sizeof *h);
        if (h) m->h = h;
        int32_t *hr = (int32_t *)realloc(m->h_row, (size_t)rows * sizeof *hr);
        if (hr) m->h_row = hr;
        if (!h || !hr) return cudaErrorMemoryAllocation;
        if (m->d) cudaFree(m->d); /* waits for the device: no earlier call still reads them */
        if (m->d_row) cudaFree(m->d_row);
        m->d = NULL, m->d_row = NULL, m->cap_words = m->cap_rows = 0;
        cudaError_t e = cudaMalloc((void **)&m->d, need * sizeof *m->d);
        if (e == cudaSuccess) e = cudaMalloc((void **)&m->d_row, (size_t)rows * sizeof *m->d_row);
        if (e != cudaSuccess) return e;
        m->cap_words = need, m->cap_rows = (size_t)rows;
    }
    int k = 0;
    for (int r = 0; r < n; r++) {
        if (!params[r].allowed) continue;
        memcpy(m->h + (size_t)k * words, params[r].allowed, (size_t)words * sizeof *m->h);
        m->h_row[k++] = r;
    }
    /* Pageable sources: the copies have read the staging when the calls return. */
    cudaError_t e = cudaMemcpyAsync(m->d, m->h, need * sizeof *m->h, cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess) e = cudaMemcpyAsync(m->d_row, m->h_row, (size_t)rows * sizeof *m->h_row, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return e;
    k_mask<<<dim3((unsigned)((vocab + 255) / 256), (unsigned)rows), 256, 0, stream>>>(logits, vocab, m->d, m->d_row, words);
    return cudaGetLastError();
}

void cuda_sample_mask_free(cuda_sample_mask_t *m)
{
    if (m->d) cudaFree(m->d);
    if (m->d_row) cudaFree(m->d_row);
    free(m->h);
    free(m->h_row);
    *m = cuda_sample_mask_t{};
}
