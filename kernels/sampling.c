/* sampling.c - the exact token draw shared by every backend, and the stream's log-probabilities;
 * see sampling.h. */
#include "sampling.h"

#include <assert.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint32_t key;
    int32_t id;
} samp_cand_t;

/* Rank order: larger key first, lower id on ties. */
static inline int cand_better(samp_cand_t a, samp_cand_t b) { return a.key > b.key || (a.key == b.key && a.id < b.id); }

static int cand_cmp_rank(const void *pa, const void *pb)
{
    const samp_cand_t *a = pa, *b = pb;
    return cand_better(*a, *b) ? -1 : cand_better(*b, *a) ? 1 : 0;
}

static int cand_cmp_id(const void *pa, const void *pb)
{
    const samp_cand_t *a = pa, *b = pb;
    return (a->id > b->id) - (a->id < b->id);
}

/* Min-heap on cand_better (root = worst kept). */
static void heap_sift_down(samp_cand_t *h, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && cand_better(h[m], h[l])) m = l;
        if (r < n && cand_better(h[m], h[r])) m = r;
        if (m == i) return;
        samp_cand_t t = h[i];
        h[i] = h[m], h[m] = t;
        i = m;
    }
}

static void heap_sift_up(samp_cand_t *h, int i)
{
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_better(h[p], h[i])) return;
        samp_cand_t t = h[i];
        h[i] = h[p], h[p] = t;
        i = p;
    }
}

int32_t kern_sample_argmax(const float *l, int vocab)
{
    int32_t best = 0;
    float bv = -INFINITY;
    for (int i = 0; i < vocab; i++)
        if (l[i] > bv) bv = l[i], best = i;
    return best;
}

bool kern_sample_adjust_distinct(const kern_logit_adjust_t *a, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = 0; j < i; j++)
            if (a[i].token == a[j].token) return false;
    return true;
}

void kern_sample_adjust_row(float *l, int vocab, const kern_logit_adjust_t *a, int n)
{
    assert(kern_sample_adjust_distinct(a, n));
    for (int i = 0; i < n; i++) {
        const int32_t t = a[i].token;
        if (t >= 0 && t < vocab) l[t] = kern_sample_adjust_logit(l[t], a[i].penalty, a[i].add);
    }
}

void kern_sample_mask_row(float *l, int vocab, const uint64_t *allowed)
{
    for (int w = 0; w * 64 < vocab; w++) {
        uint64_t off = ~allowed[w];
        while (off) {
            const int t = w * 64 + __builtin_ctzll(off);
            off &= off - 1;
            if (t < vocab) l[t] = -INFINITY;
        }
    }
}

/* The draw for one row (the definition is in sampling.h). */
int32_t kern_sample_row(const float *l, int vocab, const kern_sampling_t *p, void *scratch)
{
    if (!kern_sample_is_stochastic(p) || vocab == 1) return kern_sample_argmax(l, vocab);
    float mx = -INFINITY;
    for (int i = 0; i < vocab; i++) mx = fmaxf(mx, l[i]);
    if (!(mx > -INFINITY) || mx == INFINITY) return kern_sample_argmax(l, vocab);
    const float inv_t = 1.0f / p->temperature;
    samp_cand_t *c = scratch;

    /* 3. top-k by rank: a heap of the k best. */
    int nk = 0;
    const bool topk = p->top_k > 0 && p->top_k < vocab;
    for (int i = 0; i < vocab; i++) {
        const samp_cand_t ci = {kern_sample_key(l[i]), i};
        if (!topk) {
            c[nk++] = ci;
        } else if (nk < p->top_k) {
            c[nk] = ci;
            heap_sift_up(c, nk++);
        } else if (cand_better(ci, c[0])) {
            c[0] = ci;
            heap_sift_down(c, nk, 0);
        }
    }

    /* 4. top-p: the shortest rank prefix whose weight reaches want. Sorting every candidate is slow
     * for a large vocabulary: sort the heaviest (a rank prefix) while they suffice. */
    if (p->top_p < 1.0f) {
        uint64_t total = 0;
        for (int i = 0; i < nk; i++) total += kern_sample_weight(l[c[i].id], mx, inv_t);
        const uint64_t want = (uint64_t)((double)p->top_p * (double)total);
        samp_cand_t *s = c + vocab;
        for (uint64_t t = (uint64_t)1 << 30;; t >>= 10) {
            /* The weight's exp is not exactly monotone: take every candidate ranked at least as
             * high as the lowest one of weight >= t, so the set is a rank prefix exactly. */
            uint32_t kmin = UINT32_MAX;
            for (int i = 0; i < nk; i++)
                if (kern_sample_weight(l[c[i].id], mx, inv_t) >= t && c[i].key < kmin) kmin = c[i].key;
            int ns = 0;
            for (int i = 0; i < nk; i++)
                if (c[i].key >= kmin) s[ns++] = c[i];
            if (ns == 0) continue; /* none that heavy (t > 0 only: at t == 0 every candidate is taken) */
            qsort(s, (size_t)ns, sizeof *s, cand_cmp_rank);
            uint64_t run = 0;
            int k = 0;
            while (k < ns) {
                run += kern_sample_weight(l[s[k++].id], mx, inv_t);
                if (run >= want) break;
            }
            if (run >= want || t == 0) {
                nk = k > 0 ? k : 1;
                memcpy(c, s, (size_t)nk * sizeof *c);
                break;
            }
        }
    }

    /* 5. min-p: a filter on weight (the best token, 2^40, is kept since T <= 2^40). */
    const uint64_t min_w = kern_sample_min_weight(p->min_p);
    if (min_w > 0) {
        int k = 0;
        for (int i = 0; i < nk; i++)
            if (kern_sample_weight(l[c[i].id], mx, inv_t) >= min_w) c[k++] = c[i];
        nk = k;
    }

    /* 6. The draw over the kept, in id order. */
    qsort(c, (size_t)nk, sizeof *c, cand_cmp_id);
    uint64_t S = 0;
    for (int i = 0; i < nk; i++) S += kern_sample_weight(l[c[i].id], mx, inv_t);
    const uint64_t target = (uint64_t)(kern_sample_uniform(p->seed, p->position) * (double)S);
    uint64_t run = 0;
    for (int i = 0; i < nk; i++) {
        run += kern_sample_weight(l[c[i].id], mx, inv_t);
        if (run > target) return c[i].id;
    }
    return c[nk - 1].id;
}

/* Whether logit a (id ia) ranks above b (id ib) for the top: larger first, lower id on ties. */
static inline bool logprob_better(float a, int32_t ia, float b, int32_t ib) { return a > b || (a == b && ia < ib); }

/* log p of logit v given the maximum mx and log_z = log(sum exp(l - mx)) (finite mx), or the count
 * of the maximum's copies (infinite mx). */
static float logprob_of(float v, double mx, double log_z)
{
    if (v != v) return -INFINITY;
    if (isfinite(mx)) return (float)(((double)v - mx) - log_z);
    return (double)v == mx ? (float)-log_z : -INFINITY;
}

int kern_logprobs_row(const float *l, int vocab, int32_t chosen, int n_top, kern_logprob_t *chosen_out,
                      kern_logprob_t *top_out)
{
    if (n_top < 0) n_top = 0;
    if (n_top > KERN_LOGPROBS_MAX_TOP) n_top = KERN_LOGPROBS_MAX_TOP;
    if (vocab < 0) vocab = 0;
    double mx = -INFINITY;
    int n_num = 0; /* non-NaN logits */
    for (int i = 0; i < vocab; i++)
        if (l[i] == l[i]) mx = fmax(mx, (double)l[i]), n_num++;
    double z = 0;
    if (isfinite(mx)) {
        for (int i = 0; i < vocab; i++)
            if (l[i] == l[i]) z += exp((double)l[i] - mx);
    } else {
        for (int i = 0; i < vocab; i++) z += (double)l[i] == mx;
    }
    const double log_z = log(z);
    if (chosen_out) {
        chosen_out->token = chosen;
        chosen_out->logprob = chosen >= 0 && chosen < vocab ? logprob_of(l[chosen], mx, log_z) : -INFINITY;
    }
    /* The top: insertion into a list sorted best first (most logits lose to its last entry at once). */
    if (n_top > n_num) n_top = n_num;
    int n = 0;
    for (int i = 0; i < vocab && n_top > 0; i++) {
        const float v = l[i];
        if (v != v) continue;
        if (n == n_top && !logprob_better(v, i, l[top_out[n - 1].token], top_out[n - 1].token)) continue;
        int j = n < n_top ? n++ : n - 1;
        for (; j > 0 && logprob_better(v, i, l[top_out[j - 1].token], top_out[j - 1].token); j--)
            top_out[j] = top_out[j - 1];
        top_out[j].token = i;
    }
    for (int j = 0; j < n; j++) top_out[j].logprob = logprob_of(l[top_out[j].token], mx, log_z);
    return n;
}
