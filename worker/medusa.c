/* medusa.c - Medusa heads on the kernel interface; see medusa.h.
 *
 * A proposal, per chunk of positions: for each head k, r_k = W_k h (kern_matmul), SiLU through
 * kern_swiglu against a buffer of ones, plus h (kern_add); then the vocabulary projection of every
 * head's rows (one kern_matmul over n_heads * n rows through the base model's output matrix when
 * shared, one per head when each has its own), and the top-k of each row on the host over the
 * downloaded logits. With a vocabulary subset (medusa.vocab) the shared projection is a copy of the
 * base output matrix's rows for those tokens, made at load. The rows are laid out head-major ([k][i]), so that each head's rows are
 * contiguous for kern_add and for its own projection; out[] is filled position-major (medusa.h).
 * Nothing is allocated per call: the buffers are sized at load for the model's max_logits. */
#include "medusa.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "gguf_writer.h"
#include "quant.h"

#define MEDUSA_CHUNK_ROWS 192 /* projection rows per call at most: bounds the logits buffer */
#define IDENTITY_SEED2 0x6d65647573612d32ull

struct medusa {
    kern_backend_t *be;
    gguf_t *g;      /* the file, mapped while the weights may borrow it */
    int n_heads, dim, n_vocab;
    bool shared;
    int n_out;          /* logits a head row: the subset's size, or n_vocab */
    int32_t *ids;       /* [n_out] the subset's token ids (ascending), NULL for the whole vocabulary */
    kern_weight_t *fc[MEDUSA_MAX_HEADS], *out[MEDUSA_MAX_HEADS];
    kern_weight_t *sub_out; /* shared: the base output matrix's rows for ids (NULL: model_t.output) */
    void *sub_rows;     /* their stored bytes, which the backend may borrow */
    float acc[MEDUSA_MAX_HEADS][MEDUSA_ACC_RANKS];
    int chunk;      /* positions per chunk: n_heads * chunk projection rows */
    float *ones;    /* [chunk * dim] backend */
    float *r;       /* [n_heads * chunk][dim] backend */
    float *logits;  /* [n_heads * chunk][n_out] backend */
    float *host;    /* [n_heads * chunk][n_out] host */
    float *row_logits;  /* [n_vocab] backend: one constrained head row's projection */
    float *row_host;    /* [n_vocab] host */
};

void medusa_model_identity(const model_t *m, char out[MEDUSA_IDENTITY_LEN + 1])
{
    XXH3_state_t a, b;
    memset(&a, 0, sizeof a); /* the reset reads fields it then sets (a false uninitialized warning) */
    memset(&b, 0, sizeof b);
    XXH3_128bits_reset(&a);
    XXH3_64bits_reset_withSeed(&b, IDENTITY_SEED2);
#define FEED(p, n) (XXH3_128bits_update(&a, (p), (n)), XXH3_64bits_update(&b, (p), (n)))
    static const char tag[] = "folio-medusa-identity-1";
    FEED(tag, sizeof tag);
    const model_config_t *c = &m->cfg;
    const int32_t sizes[] = {c->n_layers, c->dim, c->n_ff, c->n_heads, c->n_kv_heads, c->head_dim, c->n_vocab};
    FEED(sizes, sizeof sizes);
    for (int64_t i = 0; i < gguf_n_tensors(m->gguf); i++) {
        const gguf_tensor_t *t = gguf_tensor(m->gguf, i);
        const int64_t meta[] = {t->type, t->n_dims, t->ne[0], t->ne[1], t->ne[2], t->ne[3], (int64_t)t->nbytes};
        FEED(t->name, strlen(t->name) + 1);
        FEED(meta, sizeof meta);
        FEED(t->data, t->nbytes);
    }
#undef FEED
    const XXH128_hash_t h = XXH3_128bits_digest(&a);
    const uint64_t h2 = XXH3_64bits_digest(&b);
    snprintf(out, MEDUSA_IDENTITY_LEN + 1, "%016llx%016llx%08x", (unsigned long long)h.high64,
             (unsigned long long)h.low64, (unsigned)(h2 >> 32));
}

void medusa_default_path(const char *model_path, char *out, size_t out_len)
{
    size_t n = strlen(model_path);
    if (n >= 5 && !strcmp(model_path + n - 5, ".gguf")) n -= 5;
    snprintf(out, out_len, "%.*s.medusa.gguf", (int)n, model_path);
}

int medusa_n_heads(const medusa_t *h) { return h ? h->n_heads : 0; }
bool medusa_shared_output(const medusa_t *h) { return h && h->shared; }

float medusa_head_accuracy(const medusa_t *h, int head, int rank)
{
    if (!h || head < 0 || head >= h->n_heads || rank < 0 || rank >= MEDUSA_ACC_RANKS) return 0;
    return h->acc[head][rank];
}

void medusa_destroy(medusa_t **hp)
{
    medusa_t *h = hp ? *hp : NULL;
    if (!h) return;
    for (int k = 0; k < MEDUSA_MAX_HEADS; k++) {
        kern_weight_destroy(h->be, h->fc[k]);
        kern_weight_destroy(h->be, h->out[k]);
    }
    kern_weight_destroy(h->be, h->sub_out);
    free(h->sub_rows);
    free(h->ids);
    float *bufs[] = {h->ones, h->r, h->logits, h->row_logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) kern_free(h->be, bufs[i]);
    free(h->host);
    free(h->row_host);
    gguf_destroy(&h->g);
    free(h);
    *hp = NULL;
}

/* A required unsigned key; absent is a format error naming it. */
static int need_u32(const gguf_t *g, const char *key, uint32_t *v, fl_error_t *err)
{
    const int rc = gguf_get_u32(g, key, v, err);
    if (rc == FL_ENOTFOUND) return fl_fail(err, FL_EFORMAT, "%s: missing key '%s'", gguf_path(g), key);
    return rc;
}

/* Tensor `name` of shape [rows x cols] (ne[0] = cols) onto the backend; type F32 unless any_type. */
static kern_weight_t *load_tensor(medusa_t *h, const char *name, int64_t rows, int64_t cols, bool any_type,
                                  fl_error_t *err)
{
    const gguf_t *g = h->g;
    const gguf_tensor_t *t = gguf_find_tensor(g, name);
    if (!t) {
        fl_fail(err, FL_EFORMAT, "%s: missing tensor '%s'", gguf_path(g), name);
        return NULL;
    }
    if ((!any_type && t->type != FL_TYPE_F32) || t->n_dims != 2 || t->ne[0] != cols || t->ne[1] != rows) {
        fl_fail(err, FL_EFORMAT, "%s: tensor '%s' must be %s[%lld x %lld] (is %s [%lld x %lld])", gguf_path(g), name,
                any_type ? "" : "F32 ", (long long)rows, (long long)cols, fl_dtype_name(t->type),
                (long long)t->ne[1], (long long)t->ne[0]);
        return NULL;
    }
    fl_error_t e2 = {0};
    kern_weight_t *w = kern_weight_new(h->be, t->type, rows, cols, t->data, &e2);
    if (!w) fl_fail(err, e2.code ? e2.code : FL_EBACKEND, "%s: tensor '%s': %s", gguf_path(g), name, e2.msg);
    return w;
}

static int load_metadata(medusa_t *h, const model_t *m, fl_error_t *err)
{
    const gguf_t *g = h->g;
    const char *path = gguf_path(g), *s;
    size_t len;
    if (gguf_get_str(g, "general.architecture", &s, &len, NULL)) s = "", len = 0;
    if (len != 6 || memcmp(s, "medusa", 6))
        return fl_fail(err, FL_EFORMAT, "%s: not a Medusa heads file (general.architecture '%.*s', expected 'medusa')",
                       path, (int)(len > 64 ? 64 : len), s);
    char ident[MEDUSA_IDENTITY_LEN + 1];
    medusa_model_identity(m, ident);
    const char *base;
    size_t base_len;
    if (gguf_get_str(g, "medusa.base_model", &base, &base_len, NULL))
        return fl_fail(err, FL_EFORMAT, "%s: missing key 'medusa.base_model' (a string)", path);
    if (base_len != MEDUSA_IDENTITY_LEN || memcmp(base, ident, MEDUSA_IDENTITY_LEN)) {
        const char *name = "", *mname = "";
        size_t name_len = 0, mname_len = 0;
        gguf_get_str(g, "medusa.base_name", &name, &name_len, NULL);
        gguf_get_str(m->gguf, "general.name", &mname, &mname_len, NULL);
        return fl_fail(err, FL_EINVAL,
                       "%s: these heads were trained for base model %.*s ('%.*s'), not for %s, whose identity is "
                       "%s ('%.*s')",
                       path, (int)(base_len > 64 ? 64 : base_len), base, (int)(name_len > 64 ? 64 : name_len), name,
                       gguf_path(m->gguf), ident, (int)(mname_len > 64 ? 64 : mname_len), mname);
    }
    uint32_t n_heads, dim, vocab;
    int rc;
    if ((rc = need_u32(g, "medusa.head_count", &n_heads, err)) ||
        (rc = need_u32(g, "medusa.embedding_length", &dim, err)) ||
        (rc = need_u32(g, "medusa.vocab_size", &vocab, err)))
        return rc;
    if (n_heads < 1 || n_heads > MEDUSA_MAX_HEADS)
        return fl_fail(err, FL_EFORMAT, "%s: medusa.head_count %u outside 1..%d", path, n_heads, MEDUSA_MAX_HEADS);
    if ((int)dim != m->cfg.dim || (int)vocab != m->cfg.n_vocab)
        return fl_fail(err, FL_EFORMAT, "%s: heads of width %u over %u tokens, the model has %d and %d", path, dim,
                       vocab, m->cfg.dim, m->cfg.n_vocab);
    if ((rc = gguf_get_bool(g, "medusa.shared_output", &h->shared, err)))
        return rc == FL_ENOTFOUND ? fl_fail(err, FL_EFORMAT, "%s: missing key 'medusa.shared_output'", path) : rc;
    h->n_heads = (int)n_heads;
    h->dim = (int)dim;
    h->n_vocab = (int)vocab;
    gguf_value_type_t et;
    uint64_t n_acc;
    if (!gguf_get_arr(g, "medusa.accuracy", &et, &n_acc, NULL)) {
        if (et != GGUF_TYPE_FLOAT32 || n_acc != (uint64_t)n_heads * MEDUSA_ACC_RANKS)
            return fl_fail(err, FL_EFORMAT, "%s: medusa.accuracy must be %u F32 values", path,
                           n_heads * MEDUSA_ACC_RANKS);
        memcpy(h->acc, gguf_arr_data(g, "medusa.accuracy"), (size_t)n_acc * sizeof(float));
    }
    h->n_out = h->n_vocab;
    uint64_t n_ids;
    if (!gguf_get_arr(g, "medusa.vocab", &et, &n_ids, NULL)) {
        if (et != GGUF_TYPE_INT32 || n_ids < 1 || n_ids > vocab)
            return fl_fail(err, FL_EFORMAT, "%s: medusa.vocab must be 1..%u INT32 token ids", path, vocab);
        if (!(h->ids = malloc((size_t)n_ids * sizeof *h->ids))) return fl_fail(err, FL_ENOMEM, "medusa: out of memory");
        memcpy(h->ids, gguf_arr_data(g, "medusa.vocab"), (size_t)n_ids * sizeof *h->ids);
        for (uint64_t i = 0; i < n_ids; i++)
            if (h->ids[i] < 0 || h->ids[i] >= (int32_t)vocab || (i && h->ids[i] <= h->ids[i - 1]))
                return fl_fail(err, FL_EFORMAT, "%s: medusa.vocab must hold ascending ids below %u", path, vocab);
        h->n_out = (int)n_ids;
    }
    return FL_OK;
}

/* The base model's output matrix rows for the subset, as stored in its file, onto the backend. */
static int load_shared_subset(medusa_t *h, const model_t *m, fl_error_t *err)
{
    const char *name = m->cfg.tied_output ? "token_embd.weight" : "output.weight";
    const gguf_tensor_t *t = gguf_find_tensor(m->gguf, name);
    if (!t || t->ne[0] != h->dim || t->ne[1] != h->n_vocab)
        return fl_fail(err, FL_EFORMAT, "%s: no output matrix '%s' to project through", gguf_path(m->gguf), name);
    const size_t row_bytes = t->nbytes / (size_t)h->n_vocab;
    if (!(h->sub_rows = malloc((size_t)h->n_out * row_bytes))) return fl_fail(err, FL_ENOMEM, "medusa: out of memory");
    for (int i = 0; i < h->n_out; i++)
        memcpy((uint8_t *)h->sub_rows + (size_t)i * row_bytes, (const uint8_t *)t->data + (size_t)h->ids[i] * row_bytes,
               row_bytes);
    fl_error_t e2 = {0};
    if (!(h->sub_out = kern_weight_new(h->be, t->type, h->n_out, h->dim, h->sub_rows, &e2)))
        return fl_fail(err, e2.code ? e2.code : FL_EBACKEND, "%s: the heads' rows of '%s': %s", gguf_path(h->g), name,
                       e2.msg);
    return FL_OK;
}

medusa_t *medusa_load(const char *path, model_t *m, fl_error_t *err)
{
    medusa_t *h = calloc(1, sizeof *h);
    float *ones = NULL;
    if (!h) {
        fl_fail(err, FL_ENOMEM, "medusa: out of memory");
        return NULL;
    }
    h->be = m->be;
    if (!(h->g = gguf_open(path, err)) || load_metadata(h, m, err)) goto fail;
    for (int k = 0; k < h->n_heads; k++) {
        char name[64];
        snprintf(name, sizeof name, "medusa.%d.fc.weight", k);
        if (!(h->fc[k] = load_tensor(h, name, h->dim, h->dim, false, err))) goto fail;
        if (h->shared) continue;
        snprintf(name, sizeof name, "medusa.%d.output.weight", k);
        if (!(h->out[k] = load_tensor(h, name, h->n_out, h->dim, true, err))) goto fail;
    }
    if (h->shared && h->ids && load_shared_subset(h, m, err)) goto fail;
    /* Kernels take element counts as int: chunk * n_heads * n_out must fit. */
    int chunk = MEDUSA_CHUNK_ROWS / h->n_heads;
    if (chunk > m->max_logits) chunk = m->max_logits;
    while (chunk > 1 && (int64_t)chunk * h->n_heads * h->n_out > INT32_MAX) chunk /= 2;
    if (chunk < 1) chunk = 1;
    h->chunk = chunk;
    const size_t rows = (size_t)chunk * h->n_heads;
    h->ones = kern_alloc(h->be, (size_t)chunk * h->dim * sizeof(float));
    h->r = kern_alloc(h->be, rows * h->dim * sizeof(float));
    h->logits = kern_alloc(h->be, rows * h->n_out * sizeof(float));
    h->host = malloc(rows * h->n_out * sizeof(float));
    h->row_logits = kern_alloc(h->be, (size_t)h->n_vocab * sizeof(float));
    h->row_host = malloc((size_t)h->n_vocab * sizeof(float));
    ones = malloc((size_t)chunk * h->dim * sizeof(float));
    if (!h->ones || !h->r || !h->logits || !h->host || !h->row_logits || !h->row_host || !ones) {
        fl_fail(err, FL_ENOMEM, "%s: out of memory for the heads' buffers (%zu rows)", path, rows);
        goto fail;
    }
    for (size_t i = 0; i < (size_t)chunk * h->dim; i++) ones[i] = 1.0f;
    if (kern_upload(h->be, h->ones, ones, (size_t)chunk * h->dim * sizeof(float))) {
        fl_fail(err, FL_EBACKEND, "%s: uploading the heads' buffers failed", path);
        goto fail;
    }
    free(ones);
    return h;
fail:
    free(ones);
    medusa_destroy(&h);
    return NULL;
}

/* Keeps the k largest values pushed, best first, in val/out (*cnt of them); a value equal to one
 * kept goes after it, so that pushing in increasing id order sends ties to the lower id (as greedy
 * sampling). */
static void top_k_push(float *val, int32_t *out, int *cnt, int k, float v, int32_t id)
{
    if (*cnt == k && !(v > val[k - 1])) return;
    int j = *cnt < k ? (*cnt)++ : k - 1;
    for (; j > 0 && v > val[j - 1]; j--) {
        val[j] = val[j - 1];
        out[j] = out[j - 1];
    }
    val[j] = v;
    out[j] = id;
}

/* The k largest of x[0..n), best first, as indices. */
static void top_k_row(const float *x, int n, int k, int32_t *out)
{
    float val[MEDUSA_MAX_TOP_K];
    int cnt = 0;
    for (int t = 0; t < n; t++) top_k_push(val, out, &cnt, k, x[t], t);
}

/* The index of token id in the heads' subset (ascending ids), -1 when it is not there. */
static int subset_index(const medusa_t *h, int32_t id)
{
    if (!h->ids) return id < h->n_out ? id : -1;
    int lo = 0, hi = h->n_out;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (h->ids[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return lo < h->n_out && h->ids[lo] == id ? lo : -1;
}

/* The top_k of the n allowed tokens ids (ascending) by their logits, best first, -1 beyond them:
 * logits[ids[j]] for a row over the whole vocabulary (subset false), else the entry of each id the
 * heads' subset holds (those outside it are passed over). */
static void rank_ids(const medusa_t *h, const float *logits, bool subset, const int32_t *ids, int n, int top_k,
                     int32_t *o)
{
    float val[MEDUSA_MAX_TOP_K];
    int cnt = 0;
    for (int j = 0; j < top_k; j++) o[j] = -1;
    for (int j = 0; j < n; j++) {
        const int at = subset ? subset_index(h, ids[j]) : ids[j];
        if (at >= 0) top_k_push(val, o, &cnt, top_k, logits[at], ids[j]);
    }
}

/* The subset's projection of every head's rows of a chunk (h->r), downloaded to h->host. */
static int project_subset(medusa_t *h, model_t *m, int nc, fl_error_t *err)
{
    if (h->shared) kern_matmul(h->be, h->logits, h->sub_out ? h->sub_out : m->output, h->r, h->n_heads * nc);
    if (kern_download(h->be, h->host, h->logits, (size_t)h->n_heads * nc * h->n_out * sizeof(float)) ||
        kern_sync(h->be, err))
        return err && err->code ? err->code : fl_fail(err, FL_EBACKEND, "medusa: downloading logits failed");
    return FL_OK;
}

int medusa_propose(medusa_t *h, model_t *m, const int32_t *rows, int n, int top_k, int32_t *out, fl_error_t *err)
{
    return medusa_propose_allowed(h, m, rows, n, top_k, NULL, NULL, out, err);
}

int medusa_propose_allowed(medusa_t *h, model_t *m, const int32_t *rows, int n, int top_k, medusa_allowed_fn allowed,
                           void *user, int32_t *out, fl_error_t *err)
{
    if (n < 0 || n > m->max_logits || top_k < 1 || top_k > MEDUSA_MAX_TOP_K || top_k > h->n_out)
        return fl_fail(err, FL_EINVAL, "medusa: %d rows (limit %d), top %d (limit %d)", n, m->max_logits, top_k,
                       MEDUSA_MAX_TOP_K);
    if (m->cfg.dim != h->dim || m->cfg.n_vocab != h->n_vocab || m->be != h->be)
        return fl_fail(err, FL_EINVAL, "medusa: heads loaded for another model");
    for (int i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= m->max_logits)
            return fl_fail(err, FL_EINVAL, "medusa: logit row %d out of range", rows[i]);
    kern_backend_t *be = h->be;
    const int dim = h->dim, V = h->n_out, H = h->n_heads;
    if (!h->shared) allowed = NULL; /* own projections: ranked over their set, a constraint prunes later */
    for (int c0 = 0; c0 < n; c0 += h->chunk) {
        const int nc = n - c0 < h->chunk ? n - c0 : h->chunk;
        for (int k = 0; k < H; k++) {
            float *rk = h->r + (size_t)k * nc * dim;
            /* one call per run of consecutive rows (a decode step's rows are one run) */
            for (int i = 0, run; i < nc; i += run) {
                const int32_t first = rows[c0 + i];
                for (run = 1; i + run < nc && rows[c0 + i + run] == first + run;) run++;
                kern_matmul(be, rk + (size_t)i * dim, h->fc[k], m->logit_in + (size_t)first * dim, run);
            }
            kern_swiglu(be, rk, rk, h->ones, nc * dim);
            for (int i = 0, run; i < nc; i += run) {
                const int32_t first = rows[c0 + i];
                for (run = 1; i + run < nc && rows[c0 + i + run] == first + run;) run++;
                kern_add(be, rk + (size_t)i * dim, m->logit_in + (size_t)first * dim, run * dim);
            }
            if (!h->shared) kern_matmul(be, h->logits + (size_t)k * nc * V, h->out[k], rk, nc);
        }
        /* Constrained rows, head by head (each asks after the best candidates before it): the heads
         * the callback gives allowed tokens for rank only those, projected onto their own rows of
         * the output matrix where the backend can (kern_matmul_rows), else read from the subset's
         * projection, computed once beforehand; from its first -1 on, a row's heads rank the whole
         * subset. */
        const bool chosen = allowed && kern_has_matmul_rows(be);
        bool have_subset = false;
        if (allowed && !chosen) {
            const int rc = project_subset(h, m, nc, err);
            if (rc) return rc;
            have_subset = true;
        }
        int from[MEDUSA_CHUNK_ROWS];
        bool any_whole = !allowed;
        for (int i = 0; i < nc; i++) {
            int32_t *oi = out + (size_t)(c0 + i) * H * top_k;
            from[i] = allowed ? H : 0;
            for (int k = 0; k < H && allowed; k++) {
                const int32_t *ids = NULL;
                const int32_t cnt = allowed(user, c0 + i, k, oi, &ids);
                int32_t *o = oi + (size_t)k * top_k;
                if (cnt < 0) {
                    from[i] = k;
                    any_whole = true;
                    break;
                }
                if (cnt <= 1) { /* nothing to rank: the one token, or none */
                    for (int j = 0; j < top_k; j++) o[j] = j < cnt ? ids[j] : -1;
                    continue;
                }
                if (!chosen) { /* the subset's row, projected above */
                    rank_ids(h, h->host + ((size_t)k * nc + i) * V, true, ids, cnt, top_k, o);
                    continue;
                }
                kern_matmul_rows(be, h->row_logits, m->output, h->r + ((size_t)k * nc + i) * dim, 1, &ids, &cnt);
                if (kern_download(be, h->row_host, h->row_logits, (size_t)h->n_vocab * sizeof(float)) ||
                    kern_sync(be, err))
                    return err && err->code ? err->code : fl_fail(err, FL_EBACKEND, "medusa: downloading logits failed");
                rank_ids(h, h->row_host, false, ids, cnt, top_k, o);
            }
        }
        if (!any_whole) continue;
        if (!have_subset) {
            const int rc = project_subset(h, m, nc, err);
            if (rc) return rc;
        }
        for (int i = 0; i < nc; i++)
            for (int k = from[i]; k < H; k++) {
                int32_t *o = out + ((size_t)(c0 + i) * H + k) * top_k;
                top_k_row(h->host + ((size_t)k * nc + i) * V, V, top_k, o);
                for (int j = 0; h->ids && j < top_k; j++) o[j] = h->ids[o[j]];
            }
    }
    return FL_OK;
}

int medusa_save(const char *path, const model_t *m, const medusa_weights_t *w, fl_error_t *err)
{
    const int dim = m->cfg.dim, V = m->cfg.n_vocab;
    if (w->n_heads < 1 || w->n_heads > MEDUSA_MAX_HEADS)
        return fl_fail(err, FL_EINVAL, "medusa: %d heads (1..%d)", w->n_heads, MEDUSA_MAX_HEADS);
    const int out_type = w->output_type;
    if (!w->shared_output && !quant_row_ok(out_type, dim))
        return fl_fail(err, FL_EINVAL, "medusa: cannot store projections of width %d as %s", dim,
                       fl_dtype_name(out_type));
    for (int k = 0; k < w->n_heads; k++)
        if (!w->fc[k] || (!w->shared_output && !w->output[k]))
            return fl_fail(err, FL_EINVAL, "medusa: head %d has no weights", k);
    const int n_out = w->tokens ? w->n_tokens : V;
    if (w->tokens && (n_out < 1 || n_out > V))
        return fl_fail(err, FL_EINVAL, "medusa: a subset of %d tokens (1..%d)", n_out, V);
    for (int i = 0; w->tokens && i < n_out; i++)
        if (w->tokens[i] < 0 || w->tokens[i] >= V || (i && w->tokens[i] <= w->tokens[i - 1]))
            return fl_fail(err, FL_EINVAL, "medusa: the subset's ids must ascend below %d", V);
    gguf_writer_t *wr = gguf_writer_new();
    if (!wr) return fl_fail(err, FL_ENOMEM, "medusa: out of memory");
    char ident[MEDUSA_IDENTITY_LEN + 1];
    medusa_model_identity(m, ident);
    const char *name = "";
    size_t name_len = 0;
    gguf_get_str(m->gguf, "general.name", &name, &name_len, NULL);
    gguf_writer_set_str(wr, "general.architecture", "medusa");
    gguf_writer_set_u32(wr, "medusa.head_count", (uint32_t)w->n_heads);
    gguf_writer_set_u32(wr, "medusa.embedding_length", (uint32_t)dim);
    gguf_writer_set_u32(wr, "medusa.vocab_size", (uint32_t)V);
    gguf_writer_set_str(wr, "medusa.base_model", ident);
    gguf_writer_set_strn(wr, "medusa.base_name", name, name_len);
    gguf_writer_set_bool(wr, "medusa.shared_output", w->shared_output);
    bool measured = false;
    for (int k = 0; k < w->n_heads; k++)
        for (int j = 0; j < MEDUSA_ACC_RANKS; j++) measured |= w->accuracy[k][j] != 0;
    if (measured) {
        float acc[MEDUSA_MAX_HEADS * MEDUSA_ACC_RANKS];
        for (int k = 0; k < w->n_heads; k++) memcpy(acc + k * MEDUSA_ACC_RANKS, w->accuracy[k], sizeof w->accuracy[k]);
        gguf_writer_set_arr(wr, "medusa.accuracy", GGUF_TYPE_FLOAT32, acc, (uint64_t)w->n_heads * MEDUSA_ACC_RANKS);
    }
    if (w->tokens) gguf_writer_set_arr(wr, "medusa.vocab", GGUF_TYPE_INT32, w->tokens, (uint64_t)n_out);
    /* The writer keeps its first failure and gguf_writer_write returns it with its message. */
    const size_t row_bytes = fl_dtype_row_bytes(out_type, dim);
    uint8_t *enc = NULL;
    int rc = FL_OK;
    for (int k = 0; k < w->n_heads; k++) {
        char tname[64];
        snprintf(tname, sizeof tname, "medusa.%d.fc.weight", k);
        gguf_writer_add_tensor(wr, tname, FL_TYPE_F32, 2, (const int64_t[]){dim, dim}, w->fc[k]);
        if (w->shared_output) continue;
        const void *data = w->output[k];
        if (out_type != FL_TYPE_F32) {
            if (!enc && !(enc = malloc(row_bytes * (size_t)n_out))) {
                rc = fl_fail(err, FL_ENOMEM, "medusa: out of memory");
                break;
            }
            for (int r = 0; r < n_out; r++)
                quant_quantize_row(out_type, w->output[k] + (size_t)r * dim, enc + (size_t)r * row_bytes, dim);
            data = enc;
        }
        snprintf(tname, sizeof tname, "medusa.%d.output.weight", k);
        gguf_writer_add_tensor(wr, tname, out_type, 2, (const int64_t[]){dim, n_out}, data);
    }
    free(enc);
    if (!rc) rc = gguf_writer_write(wr, path, err);
    gguf_writer_destroy(&wr);
    return rc;
}
