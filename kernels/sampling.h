/* sampling.h - the token draw every backend reproduces exactly.
 *
 * The CPU backend samples with kern_sample_row; the CUDA backend implements the same definition on
 * the device (kernels/cuda/sample_cuda.cu). Given the same logits a request therefore draws the same
 * token on either backend and in any batch: the draw is a pure function of (logits, adjustments,
 * temperature, top_k, top_p, min_p, seed, position). Log-probabilities for the stream
 * (kern_logprobs_row) are host-only and need no such care. */
#ifndef FOLIO_SAMPLING_H
#define FOLIO_SAMPLING_H

#include <stddef.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

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

/* The draw for one row, defined with integer weights so that any backend reproduces it exactly
 * (integer sums do not depend on the order a GPU reduces in). First, in every row, greedy or not,
 * each token outside p->allowed (when given) gets l_t = -INFINITY; then each adjustment (token t, penalty, add) of p->adjust replaces l_t by kern_sample_adjust_logit:
 * l / penalty + add for l > 0, fma(l, penalty, add) otherwise (penalty 1: l + add; add -INFINITY
 * bans t). Then:
 *  1. temperature <= 0 or so small that 1 / temperature is not finite, vocab 1, or no finite
 *     maximum logit: argmax, lowest id on ties (top_k, top_p and min_p play no part).
 *  2. Rank: larger logit first (kern_sample_key; NaN last), lower id on ties.
 *     Weight: w_i = trunc(2^40 * exp((l_i - max_l) * (1 / temperature))) with the exp of
 *     kern_sample_weight_of: the best token weighs 2^40, one under ~2^-40 of it weighs 0 and is
 *     never drawn.
 *  3. top_k in (0, vocab): keep the k best by rank.
 *  4. top_p < 1: want = trunc(top_p * W) with W the kept weight; keep the shortest rank prefix whose
 *     weight reaches want (at least one token).
 *  5. min_p > 0: keep the kept tokens whose weight reaches T = kern_sample_min_weight(min_p) =
 *     trunc(2^40 * min(min_p, 1)), i.e. p_i >= min_p * p_max in the distribution at the temperature
 *     (vLLM's order: after temperature, top-k and top-p). The best token (2^40) always stays.
 *  6. target = trunc(u * S), u = kern_sample_uniform(seed, position), S the kept weight; walk the
 *     kept in id order summing weights, return the first id whose running sum exceeds target (the
 *     last kept id if none does). */
#ifdef __CUDACC__
#define KERN_SAMPLE_HD __host__ __device__
#else
#define KERN_SAMPLE_HD
#endif

/* Order-preserving key of a logit: a larger key ranks first; NaN gets 0, below everything. */
static inline KERN_SAMPLE_HD uint32_t kern_sample_key(float l)
{
    uint32_t b;
    memcpy(&b, &l, sizeof b);
    if (l != l) return 0;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* trunc(2^40 * exp(x)) for x <= 0, from float operations that round the same on every IEEE machine
 * (each multiply-add an explicit fmaf, no library exp whose last bit differs between libm and the
 * device): x = k ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error
 * below 2e-7), times 2^k. Below x = -32 the weight is 0 anyway (2^40 e^-32 < 1e-2). */
static inline KERN_SAMPLE_HD uint64_t kern_sample_weight_of(float x)
{
    if (!(x >= -32.0f)) return 0; /* NaN too */
    const float k = rintf(x * 1.44269504f);
    float r = fmaf(-k, 0.693145752f, x);  /* ln2, high bits: k * ln2_hi is exact */
    r = fmaf(-k, 1.42860677e-06f, r);     /* ln2, the rest */
    float p = 1.0f / 720;
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    return (uint64_t)ldexpf(p, (int)k + 40);
}

static inline KERN_SAMPLE_HD uint64_t kern_sample_weight(float l, float mx, float inv_t)
{
    if (l != l) return 0;
    const float d = l - mx; /* two separate roundings (no fused form exists for (a - b) * c) */
    return kern_sample_weight_of(d * inv_t);
}

/* An adjusted logit: the repetition penalty then the additive term, each result rounded the same
 * on every IEEE machine (the product and the sum are one explicit fma, so no compiler contracts them
 * differently; a division cannot fuse with the sum). */
static inline KERN_SAMPLE_HD float kern_sample_adjust_logit(float l, float penalty, float add)
{
#ifdef __CUDA_ARCH__
    if (penalty != 1.0f) return l > 0.0f ? __fadd_rn(__fdiv_rn(l, penalty), add) : __fmaf_rn(l, penalty, add);
    return __fadd_rn(l, add);
#else
    if (penalty != 1.0f) return l > 0.0f ? l / penalty + add : fmaf(l, penalty, add);
    return l + add;
#endif
}

/* min-p's weight threshold T (step 5): 0 when off; min_p >= 1 keeps the tokens as heavy as the best. */
static inline uint64_t kern_sample_min_weight(float min_p)
{
    if (!(min_p > 0.0f)) return 0;
    if (min_p >= 1.0f) return (uint64_t)1 << 40;
    return (uint64_t)ldexp((double)min_p, 40);
}

/* Whether p draws at random (else the row is greedy: step 1). */
static inline bool kern_sample_is_stochastic(const kern_sampling_t *p)
{
    return p->temperature > 0.0f && 1.0f / p->temperature < INFINITY;
}

/* Bytes of scratch kern_sample_row needs for a vocabulary. */
static inline size_t kern_sample_scratch_bytes(int vocab) { return 2 * (size_t)vocab * (sizeof(uint32_t) + sizeof(int32_t)); }

/* argmax, lowest id on ties (NaNs never win). */
int32_t kern_sample_argmax(const float *logits, int vocab);
/* Applies a row's adjustments in place (tokens outside [0, vocab) are skipped; tokens must be
 * distinct, checked in debug builds). */
void kern_sample_adjust_row(float *logits, int vocab, const kern_logit_adjust_t *adjust, int n_adjust);
/* -INFINITY for every token whose bit in allowed (ceil(vocab / 64) words) is clear. */
void kern_sample_mask_row(float *logits, int vocab, const uint64_t *allowed);
/* Whether the n tokens of adjust are distinct (the debug check of both backends). */
bool kern_sample_adjust_distinct(const kern_logit_adjust_t *adjust, int n);
/* One row's token under p (the definition above) from a row whose adjustments are already applied
 * (kern_sample_adjust_row): steps 1-6. */
int32_t kern_sample_row(const float *logits, int vocab, const kern_sampling_t *p, void *scratch);

/* Log-probabilities for the stream, host only. */
#define KERN_LOGPROBS_MAX_TOP 20
typedef struct kern_logprob {
    int32_t token;
    float logprob; /* natural log */
} kern_logprob_t;

/* The log-softmax of a raw logits row (temperature 1, before adjustments: read the row before
 * sampling overwrites it), computed in double: of the chosen token into *chosen_out (may be NULL),
 * and of the n_top (<= KERN_LOGPROBS_MAX_TOP) best tokens by (logit desc, id asc) into top_out.
 * NaN logits have logprob -INFINITY and never enter the top; where the maximum is infinite the
 * tokens equal to it share the whole mass. Allocates nothing. Returns the number of top entries
 * written (n_top clamped to [0, KERN_LOGPROBS_MAX_TOP] and to the non-NaN tokens). */
int kern_logprobs_row(const float *logits, int vocab, int32_t chosen, int n_top, kern_logprob_t *chosen_out,
                      kern_logprob_t *top_out);

#ifdef __cplusplus
}
#endif

#endif
