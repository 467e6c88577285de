/* sampling.c - the exact token draw shared by every backend; see sampling.h. */
#include "sampling.h"

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

    /* 5. The draw over the kept, in id order. */
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
