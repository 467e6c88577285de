/* sampling.h - the token draw every backend reproduces exactly, on the host.
 *
 * The CPU backend samples with these functions, and the CUDA backend runs them on a row's logits
 * for stochastic rows, so a request draws the same token on either backend and in any batch: the
 * draw is a pure function of (logits, temperature, top_k, top_p, seed, position). */
#ifndef FOLIO_SAMPLING_H
#define FOLIO_SAMPLING_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The sampler's random number: never a shared stream. splitmix64 of seed xor splitmix64 of the
 * position; the top 53 bits as a double in [0, 1). */
static inline uint64_t kern_splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static inline double kern_sample_uniform(uint64_t seed, uint64_t position)
{
    return (double)(kern_splitmix64(seed ^ kern_splitmix64(position)) >> 11) * 0x1p-53;
}

/* Bytes of scratch kern_sample_row needs for a vocabulary. */
static inline size_t kern_sample_scratch_bytes(int vocab) { return 2 * (size_t)vocab * (sizeof(float) + sizeof(int32_t)); }

/* argmax, lowest id on ties (NaNs never win). */
int32_t kern_sample_argmax(const float *logits, int vocab);
/* One row's token under p (see sampling.c for the exact definition). */
int32_t kern_sample_row(const float *logits, int vocab, const kern_sampling_t *p, void *scratch);

#ifdef __cplusplus
}
#endif

#endif
