/* sampling.c - the exact token draw shared by every backend; see sampling.h. */
#include "sampling.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float e;
    int32_t id;
} samp_cand_t;

/* Candidate order: larger weight first, lower id on ties. */
static inline int cand_better(samp_cand_t a, samp_cand_t b) { return a.e > b.e || (a.e == b.e && a.id < b.id); }

static int cand_cmp_desc(const void *pa, const void *pb)
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

/* The draw for one row, defined so any backend can reproduce it exactly:
 *  1. temperature <= 0 (or vocab 1): argmax, lowest id on ties.
 *  2. e_i = expf((l_i - max_l) / temperature) in f32 (NaN counts as 0).
 *  3. top_k in (0, vocab): keep the k best by (e desc, id asc).
 *  4. top_p < 1: sort the kept by (e desc, id asc); total = sum of their e in double, in id order;
 *     keep the shortest prefix whose running double sum (in sorted order) is >= top_p * total.
 *  5. u = kern_sample_uniform(seed, position); target = u * S with S the double sum of the kept e in
 *     id order; walk the kept in id order summing e in double, return the first id whose running sum
 *     exceeds target (the last kept id if rounding leaves none). */
int32_t kern_sample_row(const float *l, int vocab, const kern_sampling_t *p, void *scratch)
{
    if (p->temperature <= 0.0f || vocab == 1) return kern_sample_argmax(l, vocab);
    samp_cand_t *c = scratch;
    float mx = -INFINITY;
    for (int i = 0; i < vocab; i++) mx = fmaxf(mx, l[i]);
    if (!(mx > -INFINITY)) return kern_sample_argmax(l, vocab);

    int nk = 0;
    const bool topk = p->top_k > 0 && p->top_k < vocab;
    for (int i = 0; i < vocab; i++) {
        float e = expf((l[i] - mx) / p->temperature);
        if (e != e) e = 0.0f;
        samp_cand_t ci = {e, i};
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
    if (topk) qsort(c, (size_t)nk, sizeof *c, cand_cmp_id);

    if (p->top_p < 1.0f) {
        double total = 0.0;
        for (int i = 0; i < nk; i++) total += (double)c[i].e;
        const double want = (double)p->top_p * total;
        samp_cand_t *s = c + vocab;
        /* Sorting all candidates is slow for a large vocabulary; the nucleus lies within the
         * candidates of weight >= eps as soon as their sorted running sum reaches `want`. */
        int keep = nk;
        for (float eps = 0x1p-10f;; eps = eps > 0x1p-40f ? eps * 0x1p-10f : 0.0f) {
            int ns = 0;
            for (int i = 0; i < nk; i++)
                if (c[i].e >= eps) s[ns++] = c[i];
            qsort(s, (size_t)ns, sizeof *s, cand_cmp_desc);
            double run = 0.0;
            int k = 0;
            while (k < ns) {
                run += (double)s[k++].e;
                if (run >= want) break;
            }
            if (run >= want || eps == 0.0f) {
                keep = k > 0 ? k : 1;
                memcpy(c, s, (size_t)keep * sizeof *c);
                break;
            }
        }
        nk = keep;
        qsort(c, (size_t)nk, sizeof *c, cand_cmp_id);
    }

    double S = 0.0;
    for (int i = 0; i < nk; i++) S += (double)c[i].e;
    const double target = kern_sample_uniform(p->seed, p->position) * S;
    double run = 0.0;
    for (int i = 0; i < nk; i++) {
        run += (double)c[i].e;
        if (run > target) return c[i].id;
    }
    return c[nk - 1].id;
}

