/* medusa_train.c - self-distillation data and training of Medusa heads; see medusa_train.h.
 *
 * Generation keeps `batch` sequences in flight: each step runs every running answer's last token
 * plus chunks of newly admitted prompts in one model_forward (a slot that finishes takes the next
 * prompt at once), samples one token per sequence that wants one and copies those rows of
 * model_t.logit_in. Each admitted prompt reserves the KV blocks of its whole answer up front, so a
 * running answer never runs out of cache.
 *
 * Training: per minibatch and head, Z = H W^T, R = H + SiLU(Z), L = R E^T (sgemm), then on the
 * threads the softmax, loss and G = (softmax(L) - onehot) / rows in place of L, then dR = G E,
 * dZ = dR * SiLU'(Z), dW = dZ^T H (and dE = G^T R for an own projection), then Adam. The logits of
 * a minibatch are the big buffer: batch x n_vocab floats (50 MB at 256 x 49152). */
#include "medusa_train.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "clock.h"
#include "quant.h"

/* ------------------------------------------------------------------------------------------------
 * Data sets */

void medusa_data_free(medusa_data_t *d)
{
    if (!d) return;
    free(d->seq_start);
    free(d->tokens);
    free(d->hidden);
    memset(d, 0, sizeof *d);
}

/* Room for `rows` more rows and one more sequence. */
static int data_reserve(medusa_data_t *d, int64_t rows)
{
    if (!d->seq_start || d->n_seqs + 1 >= d->cap_seqs) {
        const int cap = d->cap_seqs ? d->cap_seqs * 2 : 256;
        int64_t *p = realloc(d->seq_start, (size_t)(cap + 1) * sizeof *p);
        if (!p) return FL_ENOMEM;
        if (!d->seq_start) p[0] = 0;
        d->seq_start = p;
        d->cap_seqs = cap;
    }
    if (d->n_rows + rows > d->cap_rows) {
        int64_t cap = d->cap_rows ? d->cap_rows : 4096;
        while (cap < d->n_rows + rows) cap *= 2;
        int32_t *t = realloc(d->tokens, (size_t)cap * sizeof *t);
        if (!t) return FL_ENOMEM;
        d->tokens = t;
        if (d->dim) {
            float *h = realloc(d->hidden, (size_t)cap * d->dim * sizeof *h);
            if (!h) return FL_ENOMEM;
            d->hidden = h;
        }
        d->cap_rows = cap;
    }
    return FL_OK;
}

static int data_append(medusa_data_t *d, const int32_t *tokens, const float *hidden, int n)
{
    if (n <= 0) return FL_OK;
    if (data_reserve(d, n)) return FL_ENOMEM;
    memcpy(d->tokens + d->n_rows, tokens, (size_t)n * sizeof *tokens);
    if (d->dim) memcpy(d->hidden + (size_t)d->n_rows * d->dim, hidden, (size_t)n * d->dim * sizeof *hidden);
    d->n_rows += n;
    d->seq_start[++d->n_seqs] = d->n_rows;
    return FL_OK;
}

/* ------------------------------------------------------------------------------------------------
 * Batched generation */

typedef struct gen_slot {
    int prompt;         /* index into the prompts, -1 when free */
    kv_seq_t kv;
    int fed;            /* prompt tokens already run */
    int n_out;
    int32_t *out;       /* [max_new] */
    float *hidden;      /* [max_new][dim] */
} gen_slot_t;

int medusa_generate(model_t *m, kv_cache_t *kv, const int32_t *const *prompts, const int *n_prompt, int n_prompts,
                    const medusa_gen_opts_t *o, medusa_data_t *out, fl_error_t *err)
{
    const int dim = m->cfg.dim, B = o->batch, T = m->max_batch_tokens;
    if (B < 1 || B > m->max_seqs || B > m->max_logits || o->max_new < 1)
        return fl_fail(err, FL_EINVAL, "generate: batch %d (model: %d sequences, %d logit rows), %d new tokens", B,
                       m->max_seqs, m->max_logits, o->max_new);
    if (o->keep_hidden) {
        if (out->n_seqs && out->dim != dim)
            return fl_fail(err, FL_EINVAL, "generate: the data set holds rows of %d, the model %d", out->dim, dim);
        out->dim = dim;
    } else if (out->n_seqs && out->dim) {
        return fl_fail(err, FL_EINVAL, "generate: the data set keeps hidden states, this run does not");
    }
    const int hd = o->keep_hidden ? dim : 0, ctx = m->max_blocks * kv->block_size;
    gen_slot_t *slots = calloc((size_t)B, sizeof *slots);
    int32_t *tokens = malloc((size_t)T * sizeof *tokens), *pos = malloc((size_t)T * sizeof *pos);
    int32_t *seq = malloc((size_t)T * sizeof *seq), *tables = malloc((size_t)B * m->max_blocks * sizeof *tables);
    int32_t *plen = malloc((size_t)B * sizeof *plen), *rows = malloc((size_t)B * sizeof *rows);
    int32_t *row_slot = malloc((size_t)B * sizeof *row_slot), *picked = malloc((size_t)B * sizeof *picked);
    kern_sampling_t *params = malloc((size_t)B * sizeof *params);
    float *hid = hd ? malloc((size_t)B * hd * sizeof *hid) : NULL;
    int rc = FL_OK;
    if (!slots || !tokens || !pos || !seq || !tables || !plen || !rows || !row_slot || !picked || !params ||
        (hd && !hid)) {
        rc = fl_fail(err, FL_ENOMEM, "generate: out of memory");
        goto out;
    }
    for (int s = 0; s < B; s++) {
        slots[s].prompt = -1;
        if (kv_seq_init(&slots[s].kv, m->max_blocks) || !(slots[s].out = malloc((size_t)o->max_new * sizeof(int32_t))) ||
            (hd && !(slots[s].hidden = malloc((size_t)o->max_new * hd * sizeof(float))))) {
            rc = fl_fail(err, FL_ENOMEM, "generate: out of memory");
            goto out;
        }
    }
    int next = 0, done = 0, active = 0;
    int64_t total = 0;
    for (;;) {
        /* Admit prompts into free slots while the cache holds their whole answers. */
        for (int s = 0; s < B && next < n_prompts; s++) {
            gen_slot_t *sl = &slots[s];
            if (sl->prompt >= 0) continue;
            while (next < n_prompts && (n_prompt[next] <= 0 || n_prompt[next] + o->max_new > ctx)) next++, done++;
            if (next == n_prompts) break;
            if (kv_seq_reserve(kv, &sl->kv, n_prompt[next] + o->max_new)) {
                kv_seq_reset(kv, &sl->kv);
                if (!active) {
                    rc = fl_fail(err, FL_ERANGE, "generate: the KV cache (%d tokens) cannot hold one answer of %d",
                                 kv_cache_capacity_tokens(kv), n_prompt[next] + o->max_new);
                    goto out;
                }
                break;
            }
            *sl = (gen_slot_t){.prompt = next++, .kv = sl->kv, .out = sl->out, .hidden = sl->hidden};
            active++;
        }
        if (!active) break;
        /* The step: every running answer's last token, then prompt chunks while tokens remain. */
        int n_tok = 0, n_seqs = 0, n_rows = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int s = 0; s < B; s++) {
                gen_slot_t *sl = &slots[s];
                if (sl->prompt < 0) continue;
                const int np = n_prompt[sl->prompt];
                const bool decoding = sl->fed == np;
                if (decoding != (pass == 0) || n_tok == T) continue;
                int take = 1;
                if (decoding) {
                    tokens[n_tok] = sl->out[sl->n_out - 1];
                    pos[n_tok] = np + sl->n_out - 1;
                    seq[n_tok] = n_seqs;
                } else {
                    take = np - sl->fed < T - n_tok ? np - sl->fed : T - n_tok;
                    for (int j = 0; j < take; j++) {
                        tokens[n_tok + j] = prompts[sl->prompt][sl->fed + j];
                        pos[n_tok + j] = sl->fed + j;
                        seq[n_tok + j] = n_seqs;
                    }
                    sl->fed += take;
                }
                n_tok += take;
                if (sl->fed == np) {
                    row_slot[n_rows] = s;
                    rows[n_rows++] = n_tok - 1;
                }
                int32_t *tb = tables + (size_t)n_seqs * m->max_blocks;
                memcpy(tb, sl->kv.blocks, (size_t)sl->kv.n_blocks * sizeof *tb);
                for (int j = sl->kv.n_blocks; j < m->max_blocks; j++) tb[j] = -1;
                plen[n_seqs++] = np;
            }
        const model_batch_t b = {.n_tokens = n_tok, .tokens = tokens, .pos = pos, .seq = seq,
                                 .block_tables = tables, .n_seqs = n_seqs, .prompt_len = plen,
                                 .logit_rows = rows, .n_logits = n_rows};
        if ((rc = model_forward(m, kv, &b, err))) goto out;
        if (!n_rows) continue;
        if (hd && kern_download(m->be, hid, m->logit_in, (size_t)n_rows * hd * sizeof *hid)) {
            rc = fl_fail(err, FL_EBACKEND, "generate: downloading hidden states failed");
            goto out;
        }
        for (int i = 0; i < n_rows; i++) {
            const gen_slot_t *sl = &slots[row_slot[i]];
            params[i] = o->sampling;
            params[i].seed = o->sampling.seed + (uint64_t)sl->prompt;
            params[i].position = (uint64_t)sl->n_out;
            params[i].adjust = NULL;
            params[i].n_adjust = 0;
        }
        model_sample(m, picked, n_rows, params);
        if ((rc = kern_sync(m->be, err))) goto out;
        const bool budget_met = o->max_total > 0 && total + n_rows >= o->max_total;
        for (int i = 0; i < n_rows; i++) {
            gen_slot_t *sl = &slots[row_slot[i]];
            sl->out[sl->n_out] = picked[i];
            if (hd) memcpy(sl->hidden + (size_t)sl->n_out * hd, hid + (size_t)i * hd, (size_t)hd * sizeof *hid);
            sl->n_out++;
            total++;
            if (tok_is_eog(m->tok, picked[i]) || (o->ends && o->ends[picked[i]]) || sl->n_out == o->max_new ||
                budget_met) {
                if (data_append(out, sl->out, sl->hidden, sl->n_out)) {
                    rc = fl_fail(err, FL_ENOMEM, "generate: out of memory for the data set");
                    goto out;
                }
                kv_seq_reset(kv, &sl->kv);
                sl->prompt = -1;
                active--;
                done++;
            }
        }
        if (o->progress) o->progress(o->user, total, done, n_prompts);
        if (budget_met) break;
    }
out:
    if (slots)
        for (int s = 0; s < B; s++) {
            kv_seq_free(kv, &slots[s].kv);
            free(slots[s].out);
            free(slots[s].hidden);
        }
    free(slots);
    free(tokens);
    free(pos);
    free(seq);
    free(tables);
    free(plen);
    free(rows);
    free(row_slot);
    free(picked);
    free(params);
    free(hid);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * The data set cache: a header, the arrays, and an XXH3-64 of everything before it. */

static const char DATA_MAGIC[8] = {'F', 'M', 'D', 'A', 'T', 'A', '0', '1'};

typedef struct data_header {
    char magic[8];
    char identity[256];
    char key[256];
    int32_t dim, n_seqs;
    int64_t n_rows;
} data_header_t;

int medusa_data_save(const char *path, const medusa_data_t *d, const char *identity, const char *key,
                     fl_error_t *err)
{
    if (strlen(identity) > 255 || strlen(key) > 255) return fl_fail(err, FL_EINVAL, "%s: identity or key too long", path);
    data_header_t h = {.dim = d->dim, .n_seqs = d->n_seqs, .n_rows = d->n_rows};
    memcpy(h.magic, DATA_MAGIC, sizeof h.magic);
    snprintf(h.identity, sizeof h.identity, "%s", identity);
    snprintf(h.key, sizeof h.key, "%s", key);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return fl_fail(err, FL_EIO, "%s: cannot create", tmp);
    XXH3_state_t st;
    memset(&st, 0, sizeof st);
    XXH3_64bits_reset(&st);
    const int64_t seq_n = d->n_seqs ? d->n_seqs + 1 : 0;
    const struct { const void *p; size_t n; } parts[] = {
        {&h, sizeof h},
        {d->seq_start, (size_t)seq_n * sizeof(int64_t)},
        {d->tokens, (size_t)d->n_rows * sizeof(int32_t)},
        {d->hidden, (size_t)d->n_rows * d->dim * sizeof(float)},
    };
    bool ok = true;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0] && ok; i++) {
        if (!parts[i].n) continue;
        XXH3_64bits_update(&st, parts[i].p, parts[i].n);
        ok = fwrite(parts[i].p, 1, parts[i].n, f) == parts[i].n;
    }
    const uint64_t digest = XXH3_64bits_digest(&st);
    ok = ok && fwrite(&digest, sizeof digest, 1, f) == 1;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path)) {
        unlink(tmp);
        return fl_fail(err, FL_EIO, "%s: writing failed", path);
    }
    return FL_OK;
}

int medusa_data_load(const char *path, const char *identity, const char *key, medusa_data_t *d, fl_error_t *err)
{
    memset(d, 0, sizeof *d);
    FILE *f = fopen(path, "rb");
    if (!f) return fl_fail(err, FL_ENOTFOUND, "%s: no such file", path);
    data_header_t h;
    int rc = FL_OK;
    if (fread(&h, sizeof h, 1, f) != 1 || memcmp(h.magic, DATA_MAGIC, sizeof h.magic) || h.identity[255] ||
        h.key[255]) {
        rc = fl_fail(err, FL_EFORMAT, "%s: not a folio-medusa-train data file", path);
        goto out;
    }
    if (strcmp(h.identity, identity) || strcmp(h.key, key)) {
        rc = fl_fail(err, FL_ENOTFOUND, "%s: made for other inputs", path);
        goto out;
    }
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    fseek(f, (long)sizeof h, SEEK_SET);
    const int64_t seq_n = h.n_seqs > 0 ? (int64_t)h.n_seqs + 1 : 0;
    if (h.dim < 0 || h.dim > 1 << 20 || h.n_seqs < 0 || h.n_rows < 0 || h.n_rows > ((int64_t)1 << 40) ||
        (int64_t)sizeof h + seq_n * 8 + h.n_rows * 4 + h.n_rows * h.dim * 4 + 8 != size) {
        rc = fl_fail(err, FL_EFORMAT, "%s: sizes do not match the file's length (truncated?)", path);
        goto out;
    }
    d->dim = h.dim;
    d->n_seqs = h.n_seqs;
    d->n_rows = d->cap_rows = h.n_rows;
    d->cap_seqs = h.n_seqs + 1;
    d->seq_start = malloc((size_t)(h.n_seqs + 2) * sizeof(int64_t));
    d->tokens = malloc((size_t)(h.n_rows ? h.n_rows : 1) * sizeof(int32_t));
    d->hidden = h.dim ? malloc((size_t)(h.n_rows ? h.n_rows : 1) * h.dim * sizeof(float)) : NULL;
    if (!d->seq_start || !d->tokens || (h.dim && !d->hidden)) {
        rc = fl_fail(err, FL_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    d->seq_start[0] = 0;
    XXH3_state_t st;
    memset(&st, 0, sizeof st);
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, &h, sizeof h);
    const struct { void *p; size_t n; } parts[] = {
        {d->seq_start, (size_t)seq_n * sizeof(int64_t)},
        {d->tokens, (size_t)h.n_rows * sizeof(int32_t)},
        {d->hidden, (size_t)h.n_rows * h.dim * sizeof(float)},
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        if (!parts[i].n) continue;
        if (fread(parts[i].p, 1, parts[i].n, f) != parts[i].n) {
            rc = fl_fail(err, FL_EFORMAT, "%s: truncated", path);
            goto out;
        }
        XXH3_64bits_update(&st, parts[i].p, parts[i].n);
    }
    uint64_t digest;
    if (fread(&digest, sizeof digest, 1, f) != 1 || digest != XXH3_64bits_digest(&st)) {
        rc = fl_fail(err, FL_EFORMAT, "%s: damaged (digest mismatch)", path);
        goto out;
    }
    for (int s = 0; s < h.n_seqs; s++)
        if (d->seq_start[s + 1] < d->seq_start[s] || (s == 0 && d->seq_start[0] != 0)) {
            rc = fl_fail(err, FL_EFORMAT, "%s: bad sequence offsets", path);
            goto out;
        }
    if (h.n_seqs && d->seq_start[h.n_seqs] != h.n_rows) rc = fl_fail(err, FL_EFORMAT, "%s: bad sequence offsets", path);
out:
    fclose(f);
    if (rc) medusa_data_free(d);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Threads for the element-wise work (OpenBLAS has its own for the products). */

typedef void (*range_fn)(void *ctx, int64_t i0, int64_t i1);

typedef struct par_part {
    range_fn fn;
    void *ctx;
    int64_t i0, i1;
} par_part_t;

static void *par_main(void *arg)
{
    par_part_t *p = arg;
    p->fn(p->ctx, p->i0, p->i1);
    return NULL;
}

#define PAR_MAX 64

/* fn over [0, n) cut into n_threads ranges, the first on the calling thread. */
static void par_for(int n_threads, int64_t n, range_fn fn, void *ctx)
{
    if (n_threads > PAR_MAX) n_threads = PAR_MAX;
    if (n_threads <= 1 || n < 2 * n_threads) {
        fn(ctx, 0, n);
        return;
    }
    par_part_t parts[PAR_MAX];
    pthread_t tids[PAR_MAX];
    bool started[PAR_MAX] = {0};
    const int64_t per = (n + n_threads - 1) / n_threads;
    for (int t = 0; t < n_threads; t++) {
        const int64_t i0 = t * per, i1 = i0 + per < n ? i0 + per : n;
        parts[t] = (par_part_t){fn, ctx, i0 < n ? i0 : n, i1};
        if (t > 0) started[t] = pthread_create(&tids[t], NULL, par_main, &parts[t]) == 0;
    }
    fn(ctx, parts[0].i0, parts[0].i1);
    for (int t = 1; t < n_threads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else fn(ctx, parts[t].i0, parts[t].i1);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Cross-entropy rows */

/* e^x for x <= 0 (a softmax after its max is subtracted), relative error ~2e-7 (Cephes' exp2f
 * polynomial), written so that the loop around it vectorizes. */
static inline float exp_nonpos(float x)
{
    x = x > -87.0f ? x : -87.0f;
    const float t = x * 1.44269504088896341f;
    const float r = (t + 12582912.0f) - 12582912.0f; /* round to nearest */
    const float f = t - r;                           /* [-0.5, 0.5] */
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const int32_t bits = ((int32_t)r + 127) * (1 << 23);
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

/* y[j] = e^(x[j] - shift) for j < n; returns their sum (in 8 lanes, so that both loops vectorize). */
static float exp_shifted(float *y, const float *x, int n, float shift)
{
    for (int j = 0; j < n; j++) y[j] = exp_nonpos(x[j] - shift);
    float acc[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += y[j + l];
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++) sum += y[j];
    return sum;
}

static float max_of(const float *x, int n)
{
    float acc[8];
    for (int l = 0; l < 8; l++) acc[l] = x[0];
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
    float mx = acc[0];
    for (int l = 1; l < 8; l++) mx = acc[l] > mx ? acc[l] : mx;
    for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    return mx;
}

typedef struct ce_job {
    float *logits;          /* [n][V]: logits in; with grad, (softmax - onehot) * scale out */
    const int32_t *target;  /* [n], -1: no target (a zero gradient row) */
    int V;
    bool grad;
    float scale;
    double *loss;           /* [n] out (0 without a target) */
    int32_t *rank;          /* [n] out when not NULL: the target's rank (ties to the lower id) */
} ce_job_t;

static void ce_range(void *ctx, int64_t i0, int64_t i1)
{
    const ce_job_t *j = ctx;
    const int V = j->V;
    for (int64_t i = i0; i < i1; i++) {
        float *row = j->logits + (size_t)i * V;
        const int32_t t = j->target[i];
        if (t < 0) {
            if (j->grad) memset(row, 0, (size_t)V * sizeof *row);
            j->loss[i] = 0;
            if (j->rank) j->rank[i] = -1;
            continue;
        }
        const float mx = max_of(row, V), lt = row[t];
        if (j->rank) {
            int32_t r = 0;
            for (int v = 0; v < V; v++) r += row[v] > lt || (row[v] == lt && v < t);
            j->rank[i] = r;
        }
        const float sum = exp_shifted(row, row, V, mx); /* the logits are not needed again */
        j->loss[i] = (double)logf(sum) + mx - lt;
        if (j->grad) {
            const float s = j->scale / sum;
            for (int v = 0; v < V; v++) row[v] *= s;
            row[t] -= j->scale;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Training */

typedef struct trainer {
    const medusa_train_opts_t *o;
    int dim, V, H, B, threads; /* V: the heads' vocabulary size */
    const medusa_data_t *d;
    const int32_t *index;   /* [model vocab] a token's place in the heads' vocabulary, -1 if absent */
    const float *E;         /* [V][dim] the base model's output matrix (its rows for the vocabulary) */
    float *fc, *out;        /* heads: [H][dim][dim], [H][V][dim] (own) */
    float *fc_m, *fc_v, *out_m, *out_v; /* Adam moments */
    float *h, *z, *r, *dr, *logits, *dw, *de; /* minibatch buffers */
    int32_t *target, *rank;
    double *loss;
} trainer_t;

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void shuffle64(int64_t *a, int64_t n, uint64_t *rng)
{
    for (int64_t i = n - 1; i > 0; i--) {
        const int64_t j = (int64_t)(splitmix(rng) % (uint64_t)(i + 1));
        const int64_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static const float *head_E(const trainer_t *t, int k)
{
    return t->out ? t->out + (size_t)k * t->V * t->dim : t->E;
}

/* Rows of a minibatch: their hidden states into t->h; their sequence ends into end[]. */
static void gather(trainer_t *t, const int64_t *rows, int n, const int64_t *row_end, int64_t *end)
{
    for (int i = 0; i < n; i++) {
        memcpy(t->h + (size_t)i * t->dim, t->d->hidden + (size_t)rows[i] * t->dim, (size_t)t->dim * sizeof(float));
        end[i] = row_end[rows[i]];
    }
}

#define NO_TARGET (-1)   /* past the sequence's end */
#define UNREACHABLE (-2) /* a token outside the heads' vocabulary: no gradient, a miss */

/* Head k's targets for the gathered rows, as places in the heads' vocabulary; returns how many
 * can be learnt. */
static int targets(trainer_t *t, const int64_t *rows, const int64_t *end, int n, int k)
{
    int valid = 0;
    for (int i = 0; i < n; i++) {
        const int64_t at = rows[i] + k + 1;
        const int32_t tok = at < end[i] ? t->d->tokens[at] : -1;
        t->target[i] = tok < 0 ? NO_TARGET : t->index ? (t->index[tok] < 0 ? UNREACHABLE : t->index[tok]) : tok;
        valid += t->target[i] >= 0;
    }
    return valid;
}

/* z = h W_k^T, r = h + SiLU(z), logits = r E_k^T for n rows. */
static void head_forward(trainer_t *t, int k, int n)
{
    const int dim = t->dim;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, dim, dim, 1.0f, t->h, dim,
                t->fc + (size_t)k * dim * dim, dim, 0.0f, t->z, dim);
    for (size_t i = 0; i < (size_t)n * dim; i++) {
        const float z = t->z[i];
        t->r[i] = t->h[i] + z / (1.0f + expf(-z));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, t->V, dim, 1.0f, t->r, dim, head_E(t, k), dim, 0.0f,
                t->logits, t->V);
}

typedef struct adam_job {
    float *w, *m, *v;
    const float *g;
    float lr, b1, b2, eps;
} adam_job_t;

static void adam_range(void *ctx, int64_t i0, int64_t i1)
{
    const adam_job_t *a = ctx;
    for (int64_t i = i0; i < i1; i++) {
        const float g = a->g[i];
        a->m[i] = a->b1 * a->m[i] + (1 - a->b1) * g;
        a->v[i] = a->b2 * a->v[i] + (1 - a->b2) * g * g;
        a->w[i] -= a->lr * a->m[i] / (sqrtf(a->v[i]) + a->eps);
    }
}

/* One step of Adam (bias-corrected through lr) over n parameters. */
static void adam(trainer_t *t, float *w, const float *g, float *m, float *v, int64_t n, float lr, int step)
{
    const float b1 = 0.9f, b2 = 0.999f;
    const float lr_t = lr * sqrtf(1.0f - powf(b2, (float)step)) / (1.0f - powf(b1, (float)step));
    adam_job_t a = {w, m, v, g, lr_t, b1, b2, 1e-8f};
    par_for(n > (1 << 16) ? t->threads : 1, n, adam_range, &a);
}

/* Trains head k on the gathered rows; returns the summed loss. */
static double head_step(trainer_t *t, int k, const int64_t *rows, const int64_t *end, int n, float lr, int step)
{
    const int dim = t->dim, V = t->V;
    const int valid = targets(t, rows, end, n, k);
    if (!valid) return 0;
    head_forward(t, k, n);
    ce_job_t ce = {.logits = t->logits, .target = t->target, .V = V, .grad = true, .scale = 1.0f / (float)valid,
                   .loss = t->loss};
    par_for(t->threads, n, ce_range, &ce);
    double loss = 0;
    for (int i = 0; i < n; i++) loss += t->loss[i];
    float *E = (float *)head_E(t, k);
    /* dR = G E; with an own projection dE = G^T R (before E moves) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, dim, V, 1.0f, t->logits, V, E, dim, 0.0f, t->dr, dim);
    if (t->out) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, V, dim, n, 1.0f, t->logits, V, t->r, dim, 0.0f, t->de,
                    dim);
        const size_t off = (size_t)k * V * dim;
        adam(t, E, t->de, t->out_m + off, t->out_v + off, (int64_t)V * dim, lr, step);
    }
    /* dZ = dR * SiLU'(z), SiLU'(z) = s (1 + z (1 - s)) with s = sigmoid(z); in place in dr */
    for (size_t i = 0; i < (size_t)n * dim; i++) {
        const float z = t->z[i], s = 1.0f / (1.0f + expf(-z));
        t->dr[i] *= s * (1.0f + z * (1.0f - s));
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, dim, dim, n, 1.0f, t->dr, dim, t->h, dim, 0.0f, t->dw, dim);
    const size_t off = (size_t)k * dim * dim;
    adam(t, t->fc + off, t->dw, t->fc_m + off, t->fc_v + off, (int64_t)dim * dim, lr, step);
    return loss;
}

static void evaluate(trainer_t *t, const int64_t *rows, int64_t n_rows, const int64_t *row_end, medusa_eval_t *ev)
{
    memset(ev, 0, sizeof *ev);
    int64_t loss_rows[MEDUSA_MAX_HEADS] = {0};
    int64_t *end = malloc((size_t)t->B * sizeof *end);
    if (!end) return;
    for (int64_t b0 = 0; b0 < n_rows; b0 += t->B) {
        const int n = n_rows - b0 < t->B ? (int)(n_rows - b0) : t->B;
        gather(t, rows + b0, n, row_end, end);
        for (int k = 0; k < t->H; k++) {
            if (!targets(t, rows + b0, end, n, k)) continue;
            head_forward(t, k, n);
            ce_job_t ce = {.logits = t->logits, .target = t->target, .V = t->V, .loss = t->loss, .rank = t->rank};
            par_for(t->threads, n, ce_range, &ce);
            for (int i = 0; i < n; i++) {
                if (t->target[i] == NO_TARGET) continue;
                ev->rows[k]++;
                if (t->target[i] == UNREACHABLE) continue;
                ev->loss[k] += t->loss[i];
                loss_rows[k]++;
                for (int r = t->rank[i]; r < MEDUSA_ACC_RANKS; r++) ev->acc[k][r] += 1;
            }
        }
    }
    for (int k = 0; k < t->H; k++) {
        if (!ev->rows[k]) continue;
        if (loss_rows[k]) ev->loss[k] /= (double)loss_rows[k];
        for (int r = 0; r < MEDUSA_ACC_RANKS; r++) ev->acc[k][r] /= (double)ev->rows[k];
    }
    free(end);
}

void medusa_train_opts_default(medusa_train_opts_t *o)
{
    *o = (medusa_train_opts_t){.n_heads = 3, .epochs = 2, .lr = 3e-3f, .batch = 256, .holdout = 0.1f, .seed = 1,
                               .evals = 8, .eval_rows = 4096, .vocab = 8192};
}

void medusa_trained_free(medusa_trained_t *t)
{
    if (!t) return;
    free(t->fc);
    free(t->output);
    free(t->tokens);
    memset(t, 0, sizeof *t);
}

typedef struct token_count {
    int64_t count;
    int32_t id;
} token_count_t;

static int by_count_desc(const void *a, const void *b)
{
    const token_count_t *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The heads' vocabulary: the tokens of the training rows, most frequent first (ties to the lower id),
 * then the lowest ids (BPE merges the most frequent pairs first), up to n; returned ascending. */
static int32_t *choose_vocab(const medusa_data_t *d, const int64_t *rows, int64_t n_rows, int V, int n)
{
    token_count_t *c = calloc((size_t)V, sizeof *c);
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    uint8_t *taken = calloc((size_t)V, 1);
    if (!c || !ids || !taken) {
        free(ids);
        ids = NULL;
        goto out;
    }
    for (int v = 0; v < V; v++) c[v].id = v;
    for (int64_t i = 0; i < n_rows; i++) {
        const int32_t tok = d->tokens[rows[i]];
        if (tok >= 0 && tok < V) c[tok].count++;
    }
    qsort(c, (size_t)V, sizeof *c, by_count_desc);
    int got = 0;
    for (int i = 0; i < V && got < n && c[i].count; i++) taken[c[i].id] = 1, got++;
    for (int v = 0; v < V && got < n; v++)
        if (!taken[v]) taken[v] = 1, got++;
    got = 0;
    for (int v = 0; v < V; v++)
        if (taken[v]) ids[got++] = v;
out:
    free(c);
    free(taken);
    return ids;
}

/* The base model's output matrix as F32 [V][dim] (dequantized from its GGUF tensor). */
static float *base_output(const model_t *m, fl_error_t *err)
{
    const char *name = m->cfg.tied_output ? "token_embd.weight" : "output.weight";
    const gguf_tensor_t *t = gguf_find_tensor(m->gguf, name);
    const int dim = m->cfg.dim, V = m->cfg.n_vocab;
    if (!t || t->ne[0] != dim || t->ne[1] != V || !quant_row_ok(t->type, dim)) {
        fl_fail(err, FL_EFORMAT, "%s: no output matrix '%s' to train heads against", gguf_path(m->gguf), name);
        return NULL;
    }
    float *E = malloc((size_t)V * dim * sizeof *E);
    if (!E) {
        fl_fail(err, FL_ENOMEM, "train: out of memory for the output matrix");
        return NULL;
    }
    const size_t row_bytes = t->nbytes / (size_t)V;
    for (int r = 0; r < V; r++)
        quant_dequantize_row(t->type, (const uint8_t *)t->data + (size_t)r * row_bytes, E + (size_t)r * dim, dim);
    return E;
}

int medusa_train(const model_t *m, const medusa_data_t *d, const medusa_train_opts_t *o, medusa_trained_t *res,
                 fl_error_t *err)
{
    memset(res, 0, sizeof *res);
    const int dim = m->cfg.dim, V = m->cfg.n_vocab, H = o->n_heads, B = o->batch;
    if (d->dim != dim || !d->hidden)
        return fl_fail(err, FL_EINVAL, "train: the data set holds hidden states of width %d, the model %d", d->dim,
                       dim);
    if (H < 1 || H > MEDUSA_MAX_HEADS || B < 1 || o->epochs < 1 || !(o->lr > 0) || !(o->holdout > 0 && o->holdout < 1))
        return fl_fail(err, FL_EINVAL, "train: bad options (%d heads, batch %d, %d epochs, lr %g, held out %g)", H, B,
                       o->epochs, (double)o->lr, (double)o->holdout);
    if (d->n_seqs < 2) return fl_fail(err, FL_EINVAL, "train: %d sequences: need two at least", d->n_seqs);
    trainer_t t = {.o = o, .dim = dim, .V = V, .H = H, .B = B, .d = d};
    t.threads = o->threads > 0 ? o->threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (t.threads < 1) t.threads = 1;
    const int blas_threads = openblas_get_num_threads();
    openblas_set_num_threads(t.threads);
    int rc = FL_OK;
    int64_t *row_end = malloc((size_t)d->n_rows * sizeof *row_end);
    int64_t *train_rows = malloc((size_t)d->n_rows * sizeof *train_rows);
    int64_t *held_rows = malloc((size_t)d->n_rows * sizeof *held_rows);
    int64_t *seqs = malloc((size_t)d->n_seqs * sizeof *seqs), *end = malloc((size_t)B * sizeof *end);
    int32_t *index = NULL;
    float *E = NULL;
    if (!row_end || !train_rows || !held_rows || !seqs || !end) {
        rc = fl_fail(err, FL_ENOMEM, "train: out of memory");
        goto out;
    }

    /* Held-out split by sequence. */
    uint64_t rng = o->seed * 0x2545F4914F6CDD1Dull + 1;
    for (int s = 0; s < d->n_seqs; s++) {
        seqs[s] = s;
        for (int64_t i = d->seq_start[s]; i < d->seq_start[s + 1]; i++) row_end[i] = d->seq_start[s + 1];
    }
    shuffle64(seqs, d->n_seqs, &rng);
    int n_hold = (int)lround(o->holdout * d->n_seqs);
    n_hold = n_hold < 1 ? 1 : n_hold > d->n_seqs - 1 ? d->n_seqs - 1 : n_hold;
    int64_t n_train = 0, n_held = 0;
    for (int j = 0; j < d->n_seqs; j++) {
        const int64_t s = seqs[j];
        for (int64_t i = d->seq_start[s]; i < d->seq_start[s + 1]; i++) {
            if (j < n_hold) held_rows[n_held++] = i;
            else train_rows[n_train++] = i;
        }
    }
    if (!n_train || !n_held) {
        rc = fl_fail(err, FL_EINVAL, "train: %lld training and %lld held-out positions: not enough data",
                     (long long)n_train, (long long)n_held);
        goto out;
    }

    /* The heads' vocabulary (chosen from the training rows only) and its rows of the output matrix. */
    float *E_full = base_output(m, err);
    if (!E_full) {
        rc = err ? err->code : FL_EFORMAT;
        goto out;
    }
    if (o->vocab > 0 && o->vocab < V) {
        res->tokens = choose_vocab(d, train_rows, n_train, V, o->vocab);
        index = malloc((size_t)V * sizeof *index);
        E = malloc((size_t)o->vocab * dim * sizeof *E);
        if (!res->tokens || !index || !E) {
            free(E_full);
            rc = fl_fail(err, FL_ENOMEM, "train: out of memory");
            goto out;
        }
        for (int v = 0; v < V; v++) index[v] = -1;
        for (int i = 0; i < o->vocab; i++) {
            index[res->tokens[i]] = i;
            memcpy(E + (size_t)i * dim, E_full + (size_t)res->tokens[i] * dim, (size_t)dim * sizeof *E);
        }
        free(E_full);
        t.V = o->vocab;
        t.index = index;
    } else {
        E = E_full;
    }
    t.E = E;
    const int64_t NV = t.V;
    const size_t fc_n = (size_t)H * dim * dim, out_n = o->own_output ? (size_t)H * NV * dim : 0;
    res->fc = t.fc = calloc(fc_n, sizeof(float));
    t.fc_m = calloc(fc_n, sizeof(float));
    t.fc_v = calloc(fc_n, sizeof(float));
    if (out_n) {
        res->output = t.out = malloc(out_n * sizeof(float));
        t.out_m = calloc(out_n, sizeof(float));
        t.out_v = calloc(out_n, sizeof(float));
        t.de = malloc((size_t)NV * dim * sizeof(float));
    }
    t.h = malloc((size_t)B * dim * sizeof(float));
    t.z = malloc((size_t)B * dim * sizeof(float));
    t.r = malloc((size_t)B * dim * sizeof(float));
    t.dr = malloc((size_t)B * dim * sizeof(float));
    t.dw = malloc((size_t)dim * dim * sizeof(float));
    t.logits = malloc((size_t)B * NV * sizeof(float));
    t.target = malloc((size_t)B * sizeof(int32_t));
    t.rank = malloc((size_t)B * sizeof(int32_t));
    t.loss = malloc((size_t)B * sizeof(double));
    if (!t.fc || !t.fc_m || !t.fc_v || (out_n && (!t.out || !t.out_m || !t.out_v || !t.de)) || !t.h || !t.z ||
        !t.r || !t.dr || !t.dw || !t.logits || !t.target || !t.rank || !t.loss) {
        rc = fl_fail(err, FL_ENOMEM, "train: out of memory");
        goto out;
    }
    for (int k = 0; k < H && out_n; k++) memcpy(t.out + (size_t)k * NV * dim, E, (size_t)NV * dim * sizeof(float));
    res->train_rows = n_train;
    res->held_out_rows = n_held;
    const int per_epoch = (int)((n_train + B - 1) / B), steps = per_epoch * o->epochs;
    const int warmup = steps / 20 < 100 ? steps / 20 : 100;
    /* The intermediate evaluations use the first eval_rows of the (shuffled) held-out rows. */
    shuffle64(held_rows, n_held, &rng);
    const int64_t n_eval = o->eval_rows > 0 && o->eval_rows < n_held ? o->eval_rows : n_held;

    medusa_train_progress_t p = {.steps = steps, .n_heads = H, .eval = true};
    const double t0 = fl_clock_s();
    evaluate(&t, held_rows, n_held, row_end, &res->first);
    p.held_out = res->first;
    if (o->progress) o->progress(o->user, &p);
    double loss_sum = 0;
    int64_t loss_rows = 0;
    const double t_train = fl_clock_s();
    for (int step = 0; step < steps; step++) {
        if (step % per_epoch == 0) shuffle64(train_rows, n_train, &rng);
        const int64_t b0 = (int64_t)(step % per_epoch) * B;
        const int n = n_train - b0 < B ? (int)(n_train - b0) : B;
        const float frac = (float)step / (float)steps;
        const float lr = step < warmup ? o->lr * (float)(step + 1) / (float)warmup
                                       : o->lr * (0.55f + 0.45f * cosf(3.14159265f * frac));
        gather(&t, train_rows + b0, n, row_end, end);
        for (int k = 0; k < H; k++) {
            loss_sum += head_step(&t, k, train_rows + b0, end, n, lr, step + 1);
            for (int i = 0; i < n; i++) loss_rows += t.target[i] >= 0;
        }
        p.step = step + 1;
        p.epoch = step / per_epoch;
        p.eval = false;
        const int every = steps / (o->evals + 1);
        if (p.step == steps) {
            evaluate(&t, held_rows, n_held, row_end, &res->last);
            p.held_out = res->last;
            p.eval = true;
        } else if (o->evals > 0 && every > 0 && p.step % every == 0) {
            evaluate(&t, held_rows, n_eval, row_end, &p.held_out);
            p.eval = true;
        }
        p.loss = loss_rows ? loss_sum / (double)loss_rows : 0;
        const double now = fl_clock_s();
        p.elapsed_s = now - t0;
        p.eta_s = (now - t_train) / p.step * (steps - p.step);
        if (o->progress) o->progress(o->user, &p);
        if (p.eval) loss_sum = 0, loss_rows = 0;
    }
    res->steps = steps;
    res->w.n_heads = H;
    res->w.shared_output = !o->own_output;
    res->w.output_type = FL_TYPE_F16;
    res->w.tokens = res->tokens;
    res->w.n_tokens = res->tokens ? t.V : 0;
    for (int k = 0; k < H; k++) {
        res->w.fc[k] = t.fc + (size_t)k * dim * dim;
        if (t.out) res->w.output[k] = t.out + (size_t)k * t.V * dim;
        for (int r = 0; r < MEDUSA_ACC_RANKS; r++) res->w.accuracy[k][r] = (float)res->last.acc[k][r];
    }
out:
    openblas_set_num_threads(blas_threads);
    free(E);
    free(index);
    free(t.fc_m);
    free(t.fc_v);
    free(t.out_m);
    free(t.out_v);
    free(t.de);
    free(t.h);
    free(t.z);
    free(t.r);
    free(t.dr);
    free(t.dw);
    free(t.logits);
    free(t.target);
    free(t.rank);
    free(t.loss);
    free(row_end);
    free(train_rows);
    free(held_rows);
    free(seqs);
    free(end);
    if (rc) medusa_trained_free(res);
    return rc;
}
