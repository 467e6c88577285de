/* cuda_sampling.cu - the CUDA backend's sample op: an argmax of every row on the device, then
 * sample_cuda.cu's draw over the stochastic rows, which replaces their ids; only the ids come back.
 *
 * Both follow kernels/sampling.h's definition (the argmax the CPU's argmax_row, lowest id on ties),
 * so the token equals the CPU backend's on equal logits. */
#include <stdlib.h>

#include "cuda_internal.h"
#include "sampling.h"

/* Greedy ids as the CPU's argmax_row: only values > -inf count (NaN never wins), the lowest id wins
 * ties, a row with none is 0. A row of a large vocabulary is split over many blocks (one block
 * would walk 128k logits on 256 threads, a serial tail at the end of every step); each block folds its part into one 64-bit key
 * per row by atomicMax: the value's bits made order-preserving above, the complement of the id
 * below (so equal values keep the lowest id). -0 counts as +0, as the comparison does. */
#define ARGMAX_THREADS 256
#define ARGMAX_PER_THREAD 8

__device__ __forceinline__ unsigned long long argmax_key(float v, int i)
{
    uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (0xffffffffu - (uint32_t)i);
}

__global__ void k_argmax_part(unsigned long long *keys, const float *logits, int vocab)
{
    pdl_trigger();
    pdl_wait();
    __shared__ unsigned long long warp_best[ARGMAX_THREADS / 32];
    const float *l = logits + (size_t)blockIdx.x * vocab; /* rows on x (up to 2^31 - 1), parts on y */
    const int start = blockIdx.y * ARGMAX_THREADS * ARGMAX_PER_THREAD + threadIdx.x;
    unsigned long long best = 0; /* below every real key: -inf's key is not 0 and is never made */
#pragma unroll
    for (int k = 0; k < ARGMAX_PER_THREAD; k++) {
        const int i = start + k * ARGMAX_THREADS;
        if (i < vocab) {
            const float v = l[i];
            if (v > -INFINITY) best = max(best, argmax_key(v, i));
        }
    }
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < ARGMAX_THREADS / 32; k++) best = max(best, warp_best[k]);
        if (best) atomicMax(&keys[blockIdx.x], best);
    }
}

__global__ void k_argmax_ids(int32_t *ids, const unsigned long long *keys, int n)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[i] = keys[i] ? (int32_t)(0xffffffffu - (uint32_t)keys[i]) : 0;
}

void cuda_sample(kern_backend_t *be, int32_t *out, float *logits, int n, int vocab,
                        const kern_sampling_t *params)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0) return;
    for (int i = 0; i < n; i++) out[i] = 0;
    if (vocab <= 0 || !op_begin(cb)) return;
    if (!grow_device(cb, (void **)&cb->d_ids, &cb->ids_cap, (size_t)n * sizeof(int32_t), "sampled ids", false)) return;
    if (!grow_device(cb, (void **)&cb->d_keys, &cb->keys_cap, (size_t)n * sizeof(unsigned long long), "argmax keys",
                     false))
        return;
    /* The mask and the adjustments first, in place (kernels.h allows it): greedy rows take the
     * adjusted argmax. */
    OP_CUDA(cb, cuda_sample_mask(&cb->mask, logits, n, vocab, params, cb->stream));
    OP_CUDA(cb, cuda_sample_adjust(&cb->adjust, logits, n, vocab, params, cb->stream));
    OP_CUDA(cb, cudaMemsetAsync(cb->d_keys, 0, (size_t)n * sizeof(unsigned long long), cb->stream));
    const int per_block = ARGMAX_THREADS * ARGMAX_PER_THREAD;
    launch(cb, k_argmax_part, dim3((unsigned)n, (unsigned)((vocab + per_block - 1) / per_block)), ARGMAX_THREADS,
           cb->d_keys, logits, vocab);
    launch(cb, k_argmax_ids, (unsigned)((n + 255) / 256), 256, cb->d_ids, (const unsigned long long *)cb->d_keys, n);
    bool stochastic = false;
    for (int i = 0; i < n; i++) stochastic |= kern_sample_is_stochastic(&params[i]) && vocab > 1;
    if (stochastic) {
        const size_t bytes = (size_t)n * sizeof(cuda_sample_row_t);
        const size_t old_cap = cb->rows_cap;
        if (!grow_device(cb, (void **)&cb->d_rows, &cb->rows_cap, bytes, "sampling parameters", false)) return;
        if (cb->rows_cap != old_cap || !cb->h_rows) {
            cuda_sample_row_t *h = (cuda_sample_row_t *)realloc(cb->h_rows, cb->rows_cap);
            if (!h) {
                note_error(cb, FL_ENOMEM, "cuda backend: out of host memory for sampling parameters");
                return;
            }
            cb->h_rows = h;
        }
        for (int i = 0; i < n; i++) {
            const kern_sampling_t *p = &params[i];
            cuda_sample_row_t *r = &cb->h_rows[i];
            r->active = kern_sample_is_stochastic(p);
            r->u = kern_sample_uniform(p->seed, p->position);
            r->inv_t = r->active ? 1.0f / p->temperature : 0.0f; /* as kern_sample_row rounds it */
            r->top_p = p->top_p;
            r->top_k = p->top_k;
            r->min_w = kern_sample_min_weight(p->min_p);
        }
        /* Pageable source: the copy has read h_rows when the call returns. */
        OP_CUDA(cb, cudaMemcpyAsync(cb->d_rows, cb->h_rows, bytes, cudaMemcpyHostToDevice, cb->stream));
        OP_CUDA(cb, cuda_sample_launch(logits, n, vocab, cb->d_rows, cb->d_ids, cb->stream));
    }
    OP_CUDA(cb, cudaMemcpyAsync(out, cb->d_ids, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost, cb->stream));
    OP_CUDA(cb, cudaStreamSynchronize(cb->stream));
    if (cb->first.code)
        for (int i = 0; i < n; i++) out[i] = 0;
}
