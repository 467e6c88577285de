/* model.c - the decoder forward pass over the kernel interface, for every family folio loads.
 *
 * Reads like llama2.c's forward(): for each layer, RMSNorm -> Q,K,V projections -> RoPE -> store
 * K,V into the paged cache -> attention over the cache -> output projection + residual ->
 * RMSNorm -> SwiGLU feed-forward + residual; then the final norm and the vocabulary projection for
 * the rows that want logits. The families beyond Llama are switches on that one pass, each placed
 * where llama.cpp's graph has it (llama-model.cpp), so the arithmetic is llama.cpp's: Q/K/V biases
 * after the projections (Qwen2), per-head RMSNorm of Q and K before RoPE (Qwen3, Gemma 3), NeoX
 * RoPE (all but Llama), queries scaled after RoPE (Phi-3, Gemma), sliding-window layers (Mistral,
 * Gemma), embedding scaling, post-norms, GeGLU and soft-capping (Gemma). Phi-3's fused tensors are
 * loaded as row ranges of their halves. Every call goes to the backend table, so the same code drives
 * the CPU and CUDA backends. Sizes come from the GGUF metadata; weight shapes are checked against them. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "quant.h"
#include "log.h"
#include "tp.h"

#ifndef FOLIO_DEFAULT_MODEL
#define FOLIO_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

static int get_u32_req(const gguf_t *g, const char *arch, const char *key, int *out, fl_error_t *err)
{
    char full[256];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    uint32_t v;
    int rc = gguf_get_u32(g, full, &v, err);
    if (rc == FL_ENOTFOUND) return fl_fail(err, FL_EFORMAT, "%s: missing metadata key '%s'", gguf_path(g), full);
    if (rc) return rc;
    if (v == 0 || v > (1u << 24))
        return fl_fail(err, FL_EFORMAT, "%s: metadata '%s' = %u is out of range", gguf_path(g), full, v);
    *out = (int)v;
    return FL_OK;
}

static int get_f32_opt(const gguf_t *g, const char *arch, const char *key, float *out, fl_error_t *err)
{
    char full[256];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    int rc = gguf_get_f32(g, full, out, err);
    return rc == FL_ENOTFOUND ? FL_OK : rc;
}

static const struct {
    const char *name;
    model_arch_t arch;
} arch_names[] = {
    {"llama", MODEL_ARCH_LLAMA}, {"mistral", MODEL_ARCH_LLAMA}, {"qwen2", MODEL_ARCH_QWEN2},
    {"qwen3", MODEL_ARCH_QWEN3}, {"phi3", MODEL_ARCH_PHI3},     {"gemma2", MODEL_ARCH_GEMMA2},
    {"gemma3", MODEL_ARCH_GEMMA3},
};

static bool str_is(const char *s, size_t n, const char *lit) { return n == strlen(lit) && !memcmp(s, lit, n); }

/* Each family's switches, as llama.cpp's llm_load_hparams and graph builders set them (llama-model.cpp,
 * llama-cpp-python 0.3.16): what is in the GGUF is read, what llama.cpp fixes per architecture is
 * fixed here the same way. */
static int read_family(const gguf_t *g, const char *arch, model_config_t *c, fl_error_t *err)
{
    int rc;
    uint32_t u;
    char key[256];
    snprintf(key, sizeof key, "%s.attention.sliding_window", arch);
    const bool has_window = gguf_get_u32(g, key, &u, NULL) == FL_OK && u > 0 && u <= (1u << 24);
    const int window = has_window ? (int)u : 0;
    switch (c->arch) {
    case MODEL_ARCH_LLAMA:
        /* Mistral: llama.cpp 0.3.16 reads no window for "llama" (it attends to everything); folio
         * honours the window the GGUF names, on every layer. */
        c->sliding_window = window;
        break;
    case MODEL_ARCH_QWEN2:
    case MODEL_ARCH_QWEN3:
        c->rope.neox = true;
        break;
    case MODEL_ARCH_PHI3:
        /* llama.cpp disables Phi-3's sliding window ("Phi SWA is currently disabled"); so does folio,
         * so that the two agree. */
        c->rope.neox = true;
        c->q_scale = 1.0f / sqrtf((float)c->head_dim);
        c->rope_orig_ctx = c->n_ctx_train;
        snprintf(key, sizeof key, "%s.rope.scaling.original_context_length", arch);
        if (gguf_get_u32(g, key, &u, NULL) == FL_OK && u > 0) c->rope_orig_ctx = (int)u;
        break;
    case MODEL_ARCH_GEMMA2:
    case MODEL_ARCH_GEMMA3:
        c->rope.neox = true;
        c->geglu = true;
        c->post_norms = true;
        c->embed_scale = sqrtf((float)c->dim);
        /* gemma_pytorch's query_pre_attn_scalar, as llama.cpp hard-codes it: dim / heads for the 27B
         * shapes (46 and 62 layers), head_dim for the others. */
        c->q_scale = 1.0f / sqrtf((float)(c->n_layers == (c->arch == MODEL_ARCH_GEMMA2 ? 46 : 62)
                                              ? c->dim / c->n_heads : c->head_dim));
        if (c->arch == MODEL_ARCH_GEMMA2) {
            c->sliding_window = has_window ? window : 4096;
            c->attn_softcap = 50.0f;
            c->final_softcap = 30.0f;
            if ((rc = get_f32_opt(g, arch, "attn_logit_softcapping", &c->attn_softcap, err)) ||
                (rc = get_f32_opt(g, arch, "final_logit_softcapping", &c->final_softcap, err)))
                return rc;
        } else {
            if (!has_window)
                return fl_fail(err, FL_EFORMAT, "%s: missing metadata key '%s'", gguf_path(g), key);
            c->sliding_window = window;
        }
        break;
    }
    c->rope_swa = c->rope;
    if (c->arch == MODEL_ARCH_GEMMA3) { /* llama.cpp's rope_freq_base_train_swa / _scale_train_swa */
        c->rope_swa.freq_base = 10000.0f;
        c->rope_swa.freq_scale = 1.0f;
    }
    if (!(c->attn_softcap >= 0) || !(c->final_softcap >= 0))
        return fl_fail(err, FL_EFORMAT, "%s: invalid soft-capping", gguf_path(g));
    return FL_OK;
}

/* Whether layer l attends through the sliding window: llama.cpp's swa pattern (set_swa_pattern(n):
 * layers with l % n < n - 1), 2 for Gemma 2, 6 for Gemma 3, every layer for Mistral. */
static bool layer_is_swa(const model_config_t *c, int l)
{
    if (!c->sliding_window) return false;
    const int period = c->arch == MODEL_ARCH_GEMMA2 ? 2 : c->arch == MODEL_ARCH_GEMMA3 ? 6 : 0;
    return period == 0 || l % period < period - 1;
}

static int read_config(const gguf_t *g, model_config_t *c, fl_error_t *err)
{
    const char *arch_s;
    size_t arch_n;
    int rc = gguf_get_str(g, "general.architecture", &arch_s, &arch_n, err);
    if (rc) return rc == FL_ENOTFOUND ? fl_fail(err, FL_EFORMAT, "%s: no general.architecture", gguf_path(g)) : rc;
    char arch[64];
    if (arch_n >= sizeof arch) return fl_fail(err, FL_EFORMAT, "%s: architecture name too long", gguf_path(g));
    memcpy(arch, arch_s, arch_n);
    arch[arch_n] = 0;
    size_t ai = 0;
    while (ai < sizeof arch_names / sizeof arch_names[0] && strcmp(arch, arch_names[ai].name)) ai++;
    if (ai == sizeof arch_names / sizeof arch_names[0])
        return fl_fail(err, FL_EUNSUPPORTED,
                       "%s: architecture '%s' is not supported (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 are)",
                       gguf_path(g), arch);
    c->arch = arch_names[ai].arch;
    snprintf(c->arch_name, sizeof c->arch_name, "%s", arch_names[ai].name);

    if ((rc = get_u32_req(g, arch, "block_count", &c->n_layers, err)) ||
        (rc = get_u32_req(g, arch, "embedding_length", &c->dim, err)) ||
        (rc = get_u32_req(g, arch, "feed_forward_length", &c->n_ff, err)) ||
        (rc = get_u32_req(g, arch, "attention.head_count", &c->n_heads, err)))
        return rc;
    c->n_kv_heads = c->n_heads;
    char key[256];
    snprintf(key, sizeof key, "%s.attention.head_count_kv", arch);
    uint32_t kvh;
    if ((rc = gguf_get_u32(g, key, &kvh, err)) == FL_OK) c->n_kv_heads = (int)kvh;
    else if (rc != FL_ENOTFOUND) return rc;
    if (c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads)
        return fl_fail(err, FL_EFORMAT, "%s: head_count %d is not a multiple of head_count_kv %d", gguf_path(g),
                       c->n_heads, c->n_kv_heads);
    /* head_dim: key_length where given (Qwen3 and Gemma's differ from dim / heads), else dim / heads. */
    snprintf(key, sizeof key, "%s.attention.key_length", arch);
    uint32_t kl, vl;
    if (gguf_get_u32(g, key, &kl, NULL) == FL_OK) {
        if (kl == 0 || kl > 4096 || kl % 2)
            return fl_fail(err, FL_EFORMAT, "%s: metadata '%s' = %u is out of range", gguf_path(g), key, kl);
        c->head_dim = (int)kl;
    } else {
        if (c->dim % c->n_heads)
            return fl_fail(err, FL_EFORMAT, "%s: embedding_length %d not divisible by head_count %d", gguf_path(g),
                           c->dim, c->n_heads);
        c->head_dim = c->dim / c->n_heads;
    }
    snprintf(key, sizeof key, "%s.attention.value_length", arch);
    if (gguf_get_u32(g, key, &vl, NULL) == FL_OK && (int)vl != c->head_dim)
        return fl_fail(err, FL_EUNSUPPORTED, "%s: value_length %u differs from key_length %d", gguf_path(g), vl,
                       c->head_dim);
    if ((c->arch == MODEL_ARCH_LLAMA || c->arch == MODEL_ARCH_PHI3) && c->head_dim * c->n_heads != c->dim)
        return fl_fail(err, FL_EUNSUPPORTED, "%s: key_length %d differs from embedding/heads %d", gguf_path(g),
                       c->head_dim, c->dim / c->n_heads);
    c->n_ctx_train = 4096;
    snprintf(key, sizeof key, "%s.context_length", arch);
    uint32_t ctx;
    if (gguf_get_u32(g, key, &ctx, NULL) == FL_OK && ctx > 0) {
        /* The default context sizes every block table, so an absurd one must not reach the allocator. */
        if (ctx > (1u << 24))
            return fl_fail(err, FL_EFORMAT, "%s: metadata '%s' = %u is out of range", gguf_path(g), key, ctx);
        c->n_ctx_train = (int)ctx;
    }

    c->norm_eps = 1e-5f;
    c->rope.freq_base = 10000.0f;
    c->rope.freq_scale = 1.0f;
    c->rope.n_rot = c->head_dim;
    c->rope.freq_factors = NULL;
    c->rope.mscale = 1.0f;
    if ((rc = get_f32_opt(g, arch, "attention.layer_norm_rms_epsilon", &c->norm_eps, err)) ||
        (rc = get_f32_opt(g, arch, "rope.freq_base", &c->rope.freq_base, err)) ||
        (rc = get_f32_opt(g, arch, "rope.scaling.attn_factor", &c->rope.mscale, err)))
        return rc;
    snprintf(key, sizeof key, "%s.rope.dimension_count", arch);
    uint32_t nrot;
    if (gguf_get_u32(g, key, &nrot, NULL) == FL_OK) {
        if (nrot == 0 || (int)nrot > c->head_dim || nrot % 2)
            return fl_fail(err, FL_EFORMAT, "%s: rope.dimension_count %u invalid for head_dim %d", gguf_path(g), nrot,
                           c->head_dim);
        c->rope.n_rot = (int)nrot;
    }
    /* Linear RoPE scaling; Llama-3 style scaling arrives as the rope_freqs tensor, Phi-3's (longrope)
     * as the rope_factors_long / _short tensors. */
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    const char *st;
    size_t stn;
    if (gguf_get_str(g, key, &st, &stn, NULL) == FL_OK && str_is(st, stn, "linear")) {
        float factor = 1.0f;
        if ((rc = get_f32_opt(g, arch, "rope.scaling.factor", &factor, err))) return rc;
        if (factor > 0) c->rope.freq_scale = 1.0f / factor;
    } else if (gguf_get_str(g, key, &st, &stn, NULL) == FL_OK && !str_is(st, stn, "none") &&
               !str_is(st, stn, "llama3") && !str_is(st, stn, "longrope")) {
        return fl_fail(err, FL_EUNSUPPORTED, "%s: rope scaling '%.*s' is not supported", gguf_path(g), (int)stn, st);
    }
    if (!(c->norm_eps > 0) || !(c->rope.freq_base > 0) || !(c->rope.mscale > 0))
        return fl_fail(err, FL_EFORMAT, "%s: invalid rms epsilon, rope base or rope attn_factor", gguf_path(g));
    return read_family(g, arch, c, err);
}

/* Finds a 2-D weight of shape [total_rows][total_cols] and loads its rows [row0, row0 + rows) and
 * columns [col0, col0 + cols) as a matrix of its own. Rows: how a fused tensor (Phi-3's attn_qkv,
 * its gate-and-up ffn_up) becomes the separate matrices the forward pass multiplies by, and how a
 * tensor-parallel rank takes its share of a column-parallel matrix, with the same bits (each output
 * row is its own dot); they stay in the file's mapping. Columns: a rank's share of a row-parallel
 * matrix, copied out row by row; they must start and end on the type's block boundaries. */
static kern_weight_t *load_matrix_part(model_t *m, const char *name, int64_t row0, int64_t rows, int64_t total_rows,
                                       int64_t col0, int64_t cols, int64_t total_cols, fl_error_t *err)
{
    const gguf_tensor_t *t = gguf_find_tensor(m->gguf, name);
    if (!t) {
        fl_fail(err, FL_EFORMAT, "%s: missing tensor '%s'", gguf_path(m->gguf), name);
        return NULL;
    }
    if (t->ne[0] != total_cols || t->ne[1] != total_rows || t->ne[2] != 1 || t->ne[3] != 1) {
        fl_fail(err, FL_EFORMAT, "%s: tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]", gguf_path(m->gguf),
                name, (long long)t->ne[0], (long long)t->ne[1], (long long)total_cols, (long long)total_rows);
        return NULL;
    }
    if (!fl_dtype_supported(t->type)) {
        fl_fail(err, FL_EUNSUPPORTED, "%s: tensor '%s' has unsupported type %s (%d)", gguf_path(m->gguf), name,
                fl_dtype_name(t->type), t->type);
        return NULL;
    }
    fl_error_t e2 = {0};
    int type = t->type;
    size_t row_bytes = t->nbytes / (size_t)total_rows;
    const void *data = (const uint8_t *)t->data + (size_t)row0 * row_bytes;
    if (cols != total_cols) {
        const int64_t be = fl_dtype_block_elems(type);
        if (col0 % be || cols % be) {
            fl_fail(err, FL_EUNSUPPORTED,
                    "%s: tensor '%s': columns [%lld, %lld) of this rank's share do not fall on %s's %lld-wide blocks",
                    gguf_path(m->gguf), name, (long long)col0, (long long)(col0 + cols), fl_dtype_name(type),
                    (long long)be);
            return NULL;
        }
        const size_t skip = fl_dtype_row_bytes(type, col0), part = fl_dtype_row_bytes(type, cols);
        uint8_t *copy = malloc((size_t)rows * part);
        void **list = realloc(m->f32_copies, (size_t)(m->n_f32_copies + 1) * sizeof *list);
        if (list) m->f32_copies = list;
        if (!copy || !list) {
            free(copy);
            fl_fail(err, FL_ENOMEM, "%s: out of memory for this rank's columns of '%s'", gguf_path(m->gguf), name);
            return NULL;
        }
        m->f32_copies[m->n_f32_copies++] = copy;
        for (int64_t r = 0; r < rows; r++)
            memcpy(copy + (size_t)r * part, (const uint8_t *)data + (size_t)r * row_bytes + skip, part);
        data = copy;
        row_bytes = part;
    }
    if (m->weights_f32 && type != FL_TYPE_F32) {
        float *f = malloc((size_t)rows * (size_t)cols * sizeof(float));
        void **list = realloc(m->f32_copies, (size_t)(m->n_f32_copies + 1) * sizeof *list);
        if (list) m->f32_copies = list;
        if (!f || !list) {
            free(f);
            fl_fail(err, FL_ENOMEM, "%s: out of memory for an F32 copy of '%s'", gguf_path(m->gguf), name);
            return NULL;
        }
        m->f32_copies[m->n_f32_copies++] = f;
        for (int64_t r = 0; r < rows; r++)
            quant_dequantize_row(type, (const uint8_t *)data + (size_t)r * row_bytes, f + (size_t)r * (size_t)cols, cols);
        type = FL_TYPE_F32;
        data = f;
    }
    kern_weight_t *w = kern_weight_new(m->be, type, rows, cols, data, &e2);
    if (!w) fl_fail(err, e2.code ? e2.code : FL_EBACKEND, "%s: tensor '%s': %s", gguf_path(m->gguf), name, e2.msg);
    m->weight_bytes += (size_t)rows * row_bytes;
    return w;
}

static kern_weight_t *load_matrix_rows(model_t *m, const char *name, int64_t row0, int64_t rows, int64_t total_rows,
                                       int64_t cols, fl_error_t *err)
{
    return load_matrix_part(m, name, row0, rows, total_rows, 0, cols, cols, err);
}

/* Finds a 2-D weight and checks its shape [rows][cols]. */
static kern_weight_t *load_matrix(model_t *m, const char *name, int64_t rows, int64_t cols, fl_error_t *err)
{
    return load_matrix_rows(m, name, 0, rows, rows, cols, err);
}

/* Copies elements [first, first + n) of a 1-D F32 vector of length total to backend memory. */
static float *load_vector_part(model_t *m, const char *name, int64_t first, int64_t n, int64_t total, bool required,
                               fl_error_t *err)
{
    const gguf_tensor_t *t = gguf_find_tensor(m->gguf, name);
    if (!t) {
        if (required) fl_fail(err, FL_EFORMAT, "%s: missing tensor '%s'", gguf_path(m->gguf), name);
        return NULL;
    }
    if (t->type != FL_TYPE_F32 || t->ne[0] != total || t->ne[1] != 1 || t->ne[2] != 1 || t->ne[3] != 1) {
        fl_fail(err, FL_EFORMAT, "%s: tensor '%s' must be F32 [%lld] (is %s [%lld, %lld])", gguf_path(m->gguf), name,
                (long long)total, fl_dtype_name(t->type), (long long)t->ne[0], (long long)t->ne[1]);
        return NULL;
    }
    float *d = kern_alloc(m->be, (size_t)n * sizeof(float));
    if (!d) {
        fl_fail(err, FL_ENOMEM, "%s: out of backend memory for '%s'", gguf_path(m->gguf), name);
        return NULL;
    }
    if (kern_upload(m->be, d, (const float *)t->data + first, (size_t)n * sizeof(float))) {
        kern_free(m->be, d);
        fl_fail(err, FL_EBACKEND, "%s: uploading '%s' failed", gguf_path(m->gguf), name);
        return NULL;
    }
    m->weight_bytes += (size_t)n * sizeof(float);
    return d;
}

/* Copies a 1-D F32 vector of length n to backend memory. */
static float *load_vector(model_t *m, const char *name, int64_t n, bool required, fl_error_t *err)
{
    return load_vector_part(m, name, 0, n, n, required, err);
}

static int alloc_scratch(model_t *m, fl_error_t *err)
{
    const model_config_t *c = &m->cfg;
    const model_shard_t *sh = &m->shard;
    const size_t T = (size_t)m->max_batch_tokens, kv_dim = (size_t)sh->n_kv_heads * c->head_dim,
                 q_dim = (size_t)sh->n_heads * c->head_dim;
    const size_t logit_rows = sh->rank == 0 ? (size_t)m->max_logits : 1; /* rank 0 computes logits */
    /* A step's inputs, packed: tokens, positions, sequences, KV slots ([n] each), block tables,
     * prompt lengths. */
    const size_t step_ints = 4 * T + (size_t)m->max_seqs * m->max_blocks + (size_t)m->max_seqs +
                             T /* tree starts */ + 1 /* alignment */ + 2 * T /* tree masks */;
    struct { void **p; size_t bytes; } bufs[] = {
        {(void **)&m->x, T * c->dim * sizeof(float)},
        {(void **)&m->xb, T * c->dim * sizeof(float)},
        {(void **)&m->q, T * q_dim * sizeof(float)},
        {(void **)&m->k, T * kv_dim * sizeof(float)},
        {(void **)&m->v, T * kv_dim * sizeof(float)},
        {(void **)&m->att, T * q_dim * sizeof(float)},
        {(void **)&m->gate, T * sh->n_ff * sizeof(float)},
        {(void **)&m->up, T * sh->n_ff * sizeof(float)},
        {(void **)&m->logit_in, logit_rows * c->dim * sizeof(float)},
        {(void **)&m->logits, logit_rows * c->n_vocab * sizeof(float)},
        {(void **)&m->d_step, step_ints * sizeof(int32_t)},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i].p = kern_alloc(m->be, bufs[i].bytes);
        if (!*bufs[i].p) return fl_fail(err, FL_ENOMEM, "model: out of memory for scratch (%zu bytes)", bufs[i].bytes);
    }
    m->h_step = malloc(step_ints * sizeof(int32_t));
    m->prompt_rows = malloc((size_t)m->max_batch_tokens);
    if (!m->h_step || !m->prompt_rows) return fl_fail(err, FL_ENOMEM, "model: out of memory");
    if (sh->size > 1 && !(m->plan = malloc(tp_plan_ints(m) * sizeof(int32_t))))
        return fl_fail(err, FL_ENOMEM, "model: out of memory");
    return FL_OK;
}

model_t *model_new(const char *path, kern_backend_t *be, const model_params_t *params, fl_error_t *err)
{
    model_t *m = calloc(1, sizeof *m);
    if (!m) {
        fl_fail(err, FL_ENOMEM, "model: out of memory");
        return NULL;
    }
    m->be = be;
    m->weights_f32 = params->weights_f32;
    m->gguf = gguf_open(path, err);
    if (!m->gguf) goto fail;
    if (read_config(m->gguf, &m->cfg, err)) goto fail;
    if (tp_shard_of(&m->cfg, params ? params->tp_rank : 0, params && params->tp_size > 0 ? params->tp_size : 1,
                    &m->shard, err))
        goto fail;
    m->tok = tok_new_from_gguf(m->gguf, err);
    if (!m->tok) goto fail;
    model_config_t *c = &m->cfg;

    const gguf_tensor_t *emb = gguf_find_tensor(m->gguf, "token_embd.weight");
    if (!emb) {
        fl_fail(err, FL_EFORMAT, "%s: missing tensor 'token_embd.weight'", path);
        goto fail;
    }
    c->n_vocab = (int)emb->ne[1];
    if (c->n_vocab != tok_n_vocab(m->tok)) {
        fl_fail(err, FL_EFORMAT, "%s: token_embd has %d rows but the vocabulary has %d tokens", path, c->n_vocab,
                tok_n_vocab(m->tok));
        goto fail;
    }
    const int64_t kv_dim = (int64_t)c->n_kv_heads * c->head_dim, q_dim = (int64_t)c->n_heads * c->head_dim;
    if (!(m->tok_embd = load_matrix(m, "token_embd.weight", c->n_vocab, c->dim, err))) goto fail;
    /* Gemma 2 always projects with the token embedding (llama.cpp ignores an output.weight there).
     * Only rank 0 of a tensor-parallel group computes logits (the final hidden state is the same on
     * every rank), so only it loads the output matrix. */
    if (gguf_find_tensor(m->gguf, "output.weight") && c->arch != MODEL_ARCH_GEMMA2) {
        if (m->shard.rank == 0 && !(m->output = load_matrix(m, "output.weight", c->n_vocab, c->dim, err))) goto fail;
    } else {
        c->tied_output = true;
        m->output = m->tok_embd;
    }
    if (!(m->output_norm = load_vector(m, "output_norm.weight", c->dim, true, err))) goto fail;
    /* Frequency factors: Llama 3's rope_freqs; Phi-3's long factors when the context asked for is
     * beyond the original one, else its short ones (llama.cpp's get_rope_factors, n_ctx per sequence). */
    const int ctx_asked = params && params->max_ctx > 0 ? params->max_ctx : c->n_ctx_train;
    const char *factors = c->arch != MODEL_ARCH_PHI3        ? "rope_freqs.weight"
                          : ctx_asked > c->rope_orig_ctx ? "rope_factors_long.weight"
                                                            : "rope_factors_short.weight";
    fl_error_t ferr = {0};
    m->rope_freqs = load_vector(m, factors, c->rope.n_rot / 2, false, &ferr);
    if (!m->rope_freqs && ferr.code) {
        *err = ferr;
        goto fail;
    }
    c->rope.freq_factors = m->rope_freqs;
    if (c->arch != MODEL_ARCH_GEMMA3) c->rope_swa.freq_factors = m->rope_freqs;
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) {
        fl_fail(err, FL_ENOMEM, "model: out of memory");
        goto fail;
    }
    for (int l = 0; l < c->n_layers; l++) {
        model_layer_t *L = &m->layers[l];
        char name[96];
        L->swa = layer_is_swa(c, l);
#define NAME(suffix, kind) snprintf(name, sizeof name, "blk.%d." suffix "." kind, l)
#define MAT(field, suffix, rows, cols)                                                                          \
    NAME(suffix, "weight");                                                                                     \
    if (!(L->field = load_matrix(m, name, rows, cols, err))) goto fail;
#define MAT_ROWS(field, suffix, row0, rows, total, cols)                                                        \
    NAME(suffix, "weight");                                                                                     \
    if (!(L->field = load_matrix_rows(m, name, row0, rows, total, cols, err))) goto fail;
#define MAT_COLS(field, suffix, rows, col0, cols, total)                                                        \
    NAME(suffix, "weight");                                                                                     \
    if (!(L->field = load_matrix_part(m, name, 0, rows, rows, col0, cols, total, err))) goto fail;
#define VEC_PART(field, suffix, kind, first, n, total, required)                                                \
    NAME(suffix, kind);                                                                                         \
    L->field = load_vector_part(m, name, first, n, total, required, &ferr);                                     \
    if (ferr.code) {                                                                                            \
        *err = ferr;                                                                                            \
        goto fail;                                                                                              \
    }
#define VEC(field, suffix, kind, n, required) VEC_PART(field, suffix, kind, 0, n, n, required)
        VEC(attn_norm, "attn_norm", "weight", c->dim, true)
        VEC(ffn_norm, "ffn_norm", "weight", c->dim, true)
        /* This rank's share (tp.h): rows of Q/K/V, gate and up; columns of the output and down. */
        const int64_t q0 = (int64_t)m->shard.head0 * c->head_dim, qn = (int64_t)m->shard.n_heads * c->head_dim,
                      k0 = (int64_t)m->shard.kv_head0 * c->head_dim, kn = (int64_t)m->shard.n_kv_heads * c->head_dim,
                      f0 = m->shard.ff0, fn = m->shard.n_ff;
        if (c->arch == MODEL_ARCH_PHI3) { /* fused: Q, K, V rows in one tensor; gate then up in ffn_up */
            const int64_t qkv = q_dim + 2 * kv_dim;
            MAT_ROWS(wq, "attn_qkv", q0, qn, qkv, c->dim)
            MAT_ROWS(wk, "attn_qkv", q_dim + k0, kn, qkv, c->dim)
            MAT_ROWS(wv, "attn_qkv", q_dim + kv_dim + k0, kn, qkv, c->dim)
            MAT_ROWS(w_gate, "ffn_up", f0, fn, 2 * (int64_t)c->n_ff, c->dim)
            MAT_ROWS(w_up, "ffn_up", c->n_ff + f0, fn, 2 * (int64_t)c->n_ff, c->dim)
        } else {
            MAT_ROWS(wq, "attn_q", q0, qn, q_dim, c->dim)
            MAT_ROWS(wk, "attn_k", k0, kn, kv_dim, c->dim)
            MAT_ROWS(wv, "attn_v", k0, kn, kv_dim, c->dim)
            MAT_ROWS(w_gate, "ffn_gate", f0, fn, c->n_ff, c->dim)
            MAT_ROWS(w_up, "ffn_up", f0, fn, c->n_ff, c->dim)
        }
        MAT_COLS(wo, "attn_output", c->dim, q0, qn, q_dim)
        MAT_COLS(w_down, "ffn_down", c->dim, f0, fn, c->n_ff)
        /* Optional everywhere (llama.cpp adds them where present), required where the family has them. */
        const bool qwen2 = c->arch == MODEL_ARCH_QWEN2, qk_norm = c->arch == MODEL_ARCH_QWEN3 || c->arch == MODEL_ARCH_GEMMA3;
        VEC_PART(bq, "attn_q", "bias", q0, qn, q_dim, qwen2)
        VEC_PART(bk, "attn_k", "bias", k0, kn, kv_dim, qwen2)
        VEC_PART(bv, "attn_v", "bias", k0, kn, kv_dim, qwen2)
        if (qk_norm) {
            VEC(q_norm, "attn_q_norm", "weight", c->head_dim, true)
            VEC(k_norm, "attn_k_norm", "weight", c->head_dim, true)
        }
        if (c->post_norms) {
            VEC(attn_post_norm, "post_attention_norm", "weight", c->dim, true)
            VEC(ffn_post_norm, "post_ffw_norm", "weight", c->dim, true)
        }
#undef MAT
#undef MAT_ROWS
#undef MAT_COLS
#undef VEC
#undef VEC_PART
#undef NAME
    }
    const gguf_tensor_t *tq = gguf_find_tensor(m->gguf, c->arch == MODEL_ARCH_PHI3 ? "blk.0.attn_qkv.weight" : "blk.0.attn_q.weight");
    c->weight_type = tq ? tq->type : FL_TYPE_F32;

    const model_params_t defaults = {.max_batch_tokens = 512, .max_logits = 64, .max_seqs = 64, .max_ctx = 0,
                                      .block_size = 16};
    if (!params) params = &defaults;
    m->max_batch_tokens = params->max_batch_tokens > 0 ? params->max_batch_tokens : defaults.max_batch_tokens;
    m->max_logits = params->max_logits > 0 ? params->max_logits : defaults.max_logits;
    m->max_seqs = params->max_seqs > 0 ? params->max_seqs : defaults.max_seqs;
    const int block_size = m->block_size = params->block_size > 0 ? params->block_size : defaults.block_size;
    const int max_ctx = params->max_ctx > 0 ? params->max_ctx : c->n_ctx_train;
    m->max_blocks = (int)(((int64_t)max_ctx + block_size - 1) / block_size);
    /* Kernels take element counts as int: n * dim, n * n_ff and rows * n_vocab must fit. */
    const int64_t widest = c->n_ff > c->dim ? c->n_ff : c->dim;
    if ((int64_t)m->max_batch_tokens * widest > INT32_MAX || (int64_t)m->max_logits * c->n_vocab > INT32_MAX) {
        fl_fail(err, FL_ERANGE, "%s: %d tokens or %d logit rows per step are too many for this model's sizes",
                path, m->max_batch_tokens, m->max_logits);
        goto fail;
    }
    if (alloc_scratch(m, err)) goto fail;
    const char *prof = getenv("FOLIO_PROFILE");
    m->profile = prof && *prof && strcmp(prof, "0");
    fl_log_info("model loaded path=%s arch=%s layers=%d dim=%d ff=%d heads=%d kv_heads=%d head_dim=%d vocab=%d ctx=%d "
                "window=%d type=%s tied=%d weights_mib=%.1f backend=%s tp_rank=%d tp_size=%d",
                path, c->arch_name, c->n_layers, c->dim, c->n_ff, c->n_heads, c->n_kv_heads, c->head_dim, c->n_vocab,
                c->n_ctx_train, c->sliding_window, fl_dtype_name(c->weight_type), c->tied_output, m->weight_bytes / 1048576.0,
                kern_backend_name(be), m->shard.rank, m->shard.size);
    return m;
fail:
    model_destroy(&m);
    return NULL;
}

void model_destroy(model_t **mp)
{
    model_t *m = mp ? *mp : NULL;
    if (!m) return;
    kern_backend_t *be = m->be;
    if (m->layers) {
        for (int l = 0; l < m->cfg.n_layers; l++) {
            model_layer_t *L = &m->layers[l];
            kern_weight_t *ws[] = {L->wq, L->wk, L->wv, L->wo, L->w_gate, L->w_up, L->w_down};
            for (size_t i = 0; i < 7; i++)
                if (ws[i]) kern_weight_destroy(be, ws[i]);
            float *vs[] = {L->attn_norm, L->ffn_norm, L->bq, L->bk, L->bv, L->q_norm, L->k_norm, L->attn_post_norm,
                           L->ffn_post_norm};
            for (size_t i = 0; i < sizeof vs / sizeof vs[0]; i++)
                if (vs[i]) kern_free(be, vs[i]);
        }
        free(m->layers);
    }
    if (m->output && m->output != m->tok_embd) kern_weight_destroy(be, m->output);
    if (m->tok_embd) kern_weight_destroy(be, m->tok_embd);
    void *bufs[] = {m->output_norm, m->rope_freqs, m->x, m->xb, m->q, m->k, m->v, m->att, m->gate, m->up,
                    m->logit_in, m->logits, m->d_step};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) kern_free(be, bufs[i]);
    free(m->h_step);
    free(m->prompt_rows);
    free(m->plan);
    kern_graph_reset(be); /* recordings point into this model's buffers */
    for (int i = 0; i < m->n_f32_copies; i++) free(m->f32_copies[i]);
    free(m->f32_copies);
    tok_destroy(&m->tok);
    gguf_destroy(&m->gguf);
    free(m);
    *mp = NULL;
}

/* Where token i's K/V go: its position, or in a draft tree its node's place (tree_start + its own
 * bit, the highest of its mask). */
static int32_t store_pos(const model_batch_t *b, int i)
{
    if (!b->tree_mask) return b->pos[i];
    return b->tree_start[i] + 63 - __builtin_clzll(b->tree_mask[i]);
}

/* Checks the batch against the model's limits and the cache, and fills the slots part of m->h_step
 * (see model_forward) with each token's
 * KV slot (block * block_size + offset) on the way, since the check already looks the block up. */
static int check_batch(model_t *m, const kv_cache_t *kv, const model_batch_t *b, fl_error_t *err)
{
    if (b->n_tokens <= 0 || b->n_tokens > m->max_batch_tokens)
        return fl_fail(err, FL_EINVAL, "forward: %d tokens (limit %d)", b->n_tokens, m->max_batch_tokens);
    if (b->n_logits < 0 || b->n_logits > m->max_logits)
        return fl_fail(err, FL_EINVAL, "forward: %d logit rows (limit %d)", b->n_logits, m->max_logits);
    if (b->n_seqs <= 0 || b->n_seqs > m->max_seqs)
        return fl_fail(err, FL_EINVAL, "forward: %d sequences (limit %d)", b->n_seqs, m->max_seqs);
    for (int i = 0; i < b->n_tokens; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= m->cfg.n_vocab)
            return fl_fail(err, FL_EINVAL, "forward: token id %d out of vocabulary (%d)", b->tokens[i], m->cfg.n_vocab);
        if (b->tree_mask && (!b->tree_mask[i] || b->tree_start[i] < 0 || b->tree_start[i] > b->pos[i] ||
                             b->pos[i] > store_pos(b, i)))
            return fl_fail(err, FL_EINVAL, "forward: token %d has a bad tree mask", i);
        const int32_t at = store_pos(b, i);
        if (b->seq[i] < 0 || b->seq[i] >= b->n_seqs || b->pos[i] < 0 || at >= m->max_blocks * kv->block_size)
            return fl_fail(err, FL_EINVAL, "forward: token %d has bad sequence %d or position %d", i, b->seq[i],
                           b->pos[i]);
        const int32_t blk = b->block_tables[(size_t)b->seq[i] * m->max_blocks + at / kv->block_size];
        if (blk < 0 || blk >= kv->n_blocks)
            return fl_fail(err, FL_EINVAL, "forward: position %d of sequence %d has no KV block", at, b->seq[i]);
        m->h_step[3 * b->n_tokens + i] = blk * kv->block_size + at % kv->block_size;
    }
    for (int i = 0; i < b->n_logits; i++)
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= b->n_tokens)
            return fl_fail(err, FL_EINVAL, "forward: logit row %d out of range", b->logit_rows[i]);
    return FL_OK;
}

/* Runs the statements; with profiling on, syncs the backend and adds their time to the op's slot. */
#define PROF(slot, ...)                                                                                              \
    do {                                                                                                             \
        const double t0_ = m->profile ? fl_clock_s() : 0;                                                            \
        __VA_ARGS__;                                                                                                 \
        if (m->profile) {                                                                                            \
            kern_sync(be, NULL);                                                                                     \
            m->prof_s[MODEL_PROF_##slot] += fl_clock_s() - t0_;                                                      \
        }                                                                                                            \
    } while (0)

void model_set_profile(model_t *m, bool on) { m->profile = on; }

const char *model_prof_name(int i)
{
    static const char *names[MODEL_PROF_COUNT] = {"embed",      "residual+norm", "qkv matmul",  "rope+kv store",
                                                  "attention",  "out matmul",    "gate+up+swiglu", "down matmul",
                                                  "residual add", "logits"};
    return i >= 0 && i < MODEL_PROF_COUNT ? names[i] : "?";
}

/* Where a batch's attention splits: tokens before the returned index come in runs (consecutive
 * tokens of one sequence) of fewer than KERN_ATTN_RUN_MIN, or precede such a run; the tokens from it
 * on all come in longer runs (prompt chunks), *n_runs of them. A backend may tile the latter
 * (kern_attn_t.n_seqs); a mixed step (decode tokens first, then a chunk, as scheduler.c builds it) must
 * not make the tiled kernel walk each decode token's context on its own. */
static int attention_split(const model_batch_t *b, int *n_runs)
{
    int split = 0, runs = 0;
    for (int i = 0, j; i < b->n_tokens; i = j) {
        for (j = i + 1; j < b->n_tokens && b->seq[j] == b->seq[i];) j++;
        if (j - i < KERN_ATTN_RUN_MIN) split = j, runs = 0;
        else runs++;
    }
    *n_runs = runs;
    return split;
}

/* The most positions a token of b[first, first + count) attends to (causal: its position + 1). */
static int attention_max_len(const model_batch_t *b, int first, int count)
{
    int len = 0;
    for (int i = first; i < first + count; i++)
        if (store_pos(b, i) + 1 > len) len = store_pos(b, i) + 1;
    return len;
}

/* Attention of layer l over tokens [0, split) without the tiling hint and [split, n) with it;
 * max_len[part]: attention_max_len of each part, the same for every layer. */
static void attention_ops(model_t *m, kv_cache_t *kv, int l, int n, int split, int runs_after, const int max_len[2])
{
    const model_config_t *c = &m->cfg;
    const model_layer_t *L = &m->layers[l];
    const size_t q_dim = (size_t)m->shard.n_heads * c->head_dim;
    for (int part = 0; part < 2; part++) {
        const int first = part ? split : 0, count = part ? n - split : split;
        if (count <= 0) continue;
        const kern_attn_t attn = {
            .out = m->att + first * q_dim, .q = m->q + first * q_dim, .k_cache = kv->k[l], .v_cache = kv->v[l],
            .k_type = kv->k_type, .v_type = kv->v_type, .n_tokens = count, .tok_seq = m->d_seq + first, .tok_pos = m->d_pos + first,
            .block_tables = m->d_block_tables, .max_blocks = m->max_blocks, .block_size = kv->block_size,
            .n_heads = m->shard.n_heads, .n_kv_heads = m->shard.n_kv_heads, .head_dim = c->head_dim,
            .scale = c->q_scale > 0 ? 1.0f : 1.0f / sqrtf((float)c->head_dim), .n_seqs = part ? runs_after : 0,
            .window = L->swa ? c->sliding_window : 0, .softcap = c->attn_softcap,
            .max_len = max_len[part], .seq_prompt_len = m->d_prompt_len,
            .tree_mask = m->d_tree_mask ? m->d_tree_mask + first : NULL,
            .tree_start = m->d_tree_mask ? m->d_tree_start + first : NULL,
        };
        kern_attention(m->be, &attn);
    }
}

/* Tensor parallelism: a row-parallel product's partial sums, added over the group's ranks. The first
 * failure is kept for model_forward (later calls fail at once: the communicator is aborted). */
static void tp_sum(model_t *m, float *x, size_t n)
{
    if (m->comm && !m->tp_err.code) comm_allreduce_sum_f32(m->comm, x, n, &m->tp_err);
}

/* Not with final soft-capping, which would turn the -inf of the tokens left out into -cap. */
bool model_projects_chosen_rows(const model_t *m)
{
    return m->cfg.final_softcap <= 0 && kern_has_matmul_rows(m->be);
}

/* The vocabulary projection with the rows that have a list (model_batch_t.logit_ids: a constraint
 * that allows few tokens) projected onto those tokens only, the same bits for them; false, having
 * computed nothing, without any list or where the model cannot (model_projects_chosen_rows). */
static bool logits_of_chosen_rows(model_t *m, const model_batch_t *b)
{
    if (!b->logit_ids || !model_projects_chosen_rows(m)) return false;
    int chosen = 0;
    for (int i = 0; i < b->n_logits; i++) chosen += b->logit_ids[i] != NULL;
    if (chosen == 0) return false;
    kern_matmul_rows(m->be, m->logits, m->output, m->logit_in, b->n_logits, b->logit_ids, b->logit_n_ids);
    m->chosen_logit_rows += (uint64_t)chosen;
    return true;
}

/* The kernels of one forward step, on inputs already uploaded (model_forward). */
static void forward_ops(model_t *m, kv_cache_t *kv, const model_batch_t *b)
{
    kern_backend_t *be = m->be;
    const model_config_t *c = &m->cfg;
    const model_shard_t *sh = &m->shard; /* this rank's heads and feed-forward width */
    const int n = b->n_tokens, dim = c->dim;
    int runs_after;
    const int split = attention_split(b, &runs_after);
    const int max_len[2] = {attention_max_len(b, 0, split), attention_max_len(b, split, n - split)};
    /* Prompt tokens (kern_attn_t.seq_prompt_len's rule) may be summed in the backend's prompt order;
     * the logits below are not (they decide the first token the way decode decides the rest). */
    if (b->prompt_len) {
        for (int i = 0; i < n; i++) m->prompt_rows[i] = kern_prompt_token(b->prompt_len[b->seq[i]], b->pos[i]);
        kern_set_prompt_rows(be, m->prompt_rows, n);
    }
    PROF(EMBED, kern_embed(be, m->x, m->tok_embd, m->d_tokens, n);
                if (c->embed_scale > 0) kern_scale(be, m->x, c->embed_scale, n * dim));
    /* Each residual add is fused with the norm that reads its result (kern_add_rmsnorm), but the last. */
    PROF(NORM, kern_rmsnorm(be, m->xb, m->x, m->layers[0].attn_norm, n, dim, c->norm_eps));
    const int q_dim = sh->n_heads * c->head_dim, kv_dim = sh->n_kv_heads * c->head_dim;
    for (int l = 0; l < c->n_layers; l++) {
        const model_layer_t *L = &m->layers[l];
        /* attention block, on xb = rmsnorm(x) */
        PROF(QKV, float *const qkv_y[3] = {m->q, m->k, m->v};
                  const kern_weight_t *const qkv_w[3] = {L->wq, L->wk, L->wv};
                  kern_matmul_multi(be, qkv_y, qkv_w, 3, m->xb, n);
                  if (L->bq) kern_add_bias(be, m->q, L->bq, n, q_dim);
                  if (L->bk) kern_add_bias(be, m->k, L->bk, n, kv_dim);
                  if (L->bv) kern_add_bias(be, m->v, L->bv, n, kv_dim);
                  /* per-head RMSNorm of Q and K: rows of head_dim */
                  if (L->q_norm) kern_rmsnorm(be, m->q, m->q, L->q_norm, n * sh->n_heads, c->head_dim, c->norm_eps);
                  if (L->k_norm) kern_rmsnorm(be, m->k, m->k, L->k_norm, n * sh->n_kv_heads, c->head_dim, c->norm_eps));
        PROF(ROPE_KV, kern_rope_kv_store(be, m->q, m->k, m->v, kv->k[l], kv->v[l], kv->k_type, kv->v_type, m->d_pos,
                                         m->d_slots, n,
                                         sh->n_heads, sh->n_kv_heads, c->head_dim, L->swa ? &c->rope_swa : &c->rope);
                      if (c->q_scale > 0) kern_scale(be, m->q, c->q_scale, n * q_dim));
        PROF(ATTENTION, attention_ops(m, kv, l, n, split, runs_after, max_len));
        PROF(OUT_PROJ, kern_matmul(be, m->xb, L->wo, m->att, n); tp_sum(m, m->xb, (size_t)n * dim);
                       if (L->attn_post_norm) kern_rmsnorm(be, m->xb, m->xb, L->attn_post_norm, n, dim, c->norm_eps));
        /* feed-forward block */
        PROF(NORM, kern_add_rmsnorm(be, m->xb, m->x, m->xb, L->ffn_norm, n, dim, c->norm_eps));
        if (c->geglu) {
            PROF(FFN_UP, float *const ys[2] = {m->gate, m->up};
                         const kern_weight_t *const ws[2] = {L->w_gate, L->w_up};
                         kern_matmul_multi(be, ys, ws, 2, m->xb, n);
                         kern_geglu(be, m->gate, m->gate, m->up, n * sh->n_ff));
        } else {
            PROF(FFN_UP, kern_matmul_swiglu(be, m->gate, m->up, L->w_gate, L->w_up, sh->n_ff, m->xb, n));
        }
        PROF(FFN_DOWN, kern_matmul(be, m->xb, L->w_down, m->gate, n); tp_sum(m, m->xb, (size_t)n * dim);
                       if (L->ffn_post_norm) kern_rmsnorm(be, m->xb, m->xb, L->ffn_post_norm, n, dim, c->norm_eps));
        if (l + 1 < c->n_layers)
            PROF(NORM, kern_add_rmsnorm(be, m->xb, m->x, m->xb, m->layers[l + 1].attn_norm, n, dim, c->norm_eps));
        else
            PROF(RESIDUAL, kern_add(be, m->x, m->xb, n * dim));
    }
    kern_set_prompt_rows(be, NULL, 0);
    /* Final norm and vocabulary projection only for the rows that want logits, on rank 0 only. */
    if (sh->rank != 0) return;
    PROF(LOGITS, for (int i = 0, run; i < b->n_logits; i += run) {
                     /* one call per run of consecutive rows (a decode batch is one run) */
                     for (run = 1; i + run < b->n_logits && b->logit_rows[i + run] == b->logit_rows[i] + run;) run++;
                     kern_rmsnorm(be, m->logit_in + (size_t)i * dim, m->x + (size_t)b->logit_rows[i] * dim,
                                  m->output_norm, run, dim, c->norm_eps);
                 }
                 if (b->n_logits > 0 && !logits_of_chosen_rows(m, b))
                     kern_matmul(be, m->logits, m->output, m->logit_in, b->n_logits);
                 if (b->n_logits > 0 && c->final_softcap > 0)
                     kern_softcap(be, m->logits, c->final_softcap, b->n_logits * c->n_vocab));
}

/* Names a decode step's recording: the model, the KV cache, the batch size and the class of its
 * longest context (kern_attn_t.max_len) fix every pointer and shape in it. */
static uint64_t graph_key_of(const model_t *m, const kv_cache_t *kv, const model_batch_t *b)
{
    uint64_t h = 0x9E3779B97F4A7C15ull;
    const int n = b->n_tokens;
    const uint64_t parts[] = {(uint64_t)(uintptr_t)m, (uint64_t)(uintptr_t)kv, (uint64_t)n, (uint64_t)m->max_blocks,
                              (uint64_t)kern_attn_len_class(attention_max_len(b, 0, n))};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        h ^= parts[i] + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
        h *= 0xBF58476D1CE4E5B9ull;
    }
    return h | 1; /* never 0, which means "no recording" */
}

int model_forward(model_t *m, kv_cache_t *kv, const model_batch_t *b, fl_error_t *err)
{
    int rc = check_batch(m, kv, b, err);
    if (rc) return rc;
    if (m->shard.size > 1) {
        if (!m->comm) return fl_fail(err, FL_EINVAL, "forward: tensor-parallel rank %d has no communicator", m->shard.rank);
        if (m->shard.rank == 0 && (rc = tp_send_forward(m, b, err))) return rc;
    }
    m->tp_err = (fl_error_t){0};
    kern_backend_t *be = m->be;
    const int n = b->n_tokens;

    /* One upload a step (each is a round trip on a GPU): tokens, positions, sequences, slots, then
     * the block tables, laid out [n_seqs][max_blocks] by the caller. The device pointers depend on n
     * only, as a recorded step needs. */
    const size_t nb = (size_t)b->n_seqs * m->max_blocks, row = (size_t)n * sizeof(int32_t);
    memcpy(m->h_step, b->tokens, row);
    memcpy(m->h_step + n, b->pos, row);
    memcpy(m->h_step + 2 * n, b->seq, row);
    /* h_step + 3n: the slots, written by check_batch */
    memcpy(m->h_step + 4 * n, b->block_tables, nb * sizeof(int32_t));
    const size_t np = b->prompt_len ? (size_t)b->n_seqs : 0;
    if (np) memcpy(m->h_step + 4 * n + nb, b->prompt_len, np * sizeof(int32_t));
    m->d_tokens = m->d_step, m->d_pos = m->d_step + n, m->d_seq = m->d_step + 2 * n;
    m->d_slots = m->d_step + 3 * n, m->d_block_tables = m->d_step + 4 * n;
    m->d_prompt_len = np ? m->d_step + 4 * n + nb : NULL;
    size_t ints = 4 * (size_t)n + nb + np;
    m->d_tree_mask = NULL, m->d_tree_start = NULL;
    if (b->tree_mask) {
        memcpy(m->h_step + ints, b->tree_start, row);
        m->d_tree_start = m->d_step + ints;
        ints += (size_t)n + (ints + n) % 2; /* the masks start 8-byte aligned */
        memcpy(m->h_step + ints, b->tree_mask, (size_t)n * sizeof(uint64_t));
        m->d_tree_mask = (uint64_t *)(void *)(m->d_step + ints);
        ints += 2 * (size_t)n;
    }
    if (kern_upload(be, m->d_step, m->h_step, ints * sizeof(int32_t))) {
        if (m->comm) comm_abort(m->comm); /* the other ranks wait for this step's all-reduces */
        return fl_fail(err, FL_EBACKEND, "forward: uploading the batch to the %s backend failed",
                       kern_backend_name(be));
    }

    /* A pure decode step (one token and one logit row per sequence, in order) repeats with the same
     * shapes and buffers: the backend may record it once and replay it (CUDA graphs). */
    uint64_t graph_key = 0;
    if (!m->profile && b->n_logits == n && b->n_seqs == n && !b->tree_mask) {
        bool in_order = true;
        for (int i = 0; i < n && in_order; i++) in_order = b->logit_rows[i] == i && b->seq[i] == i;
        if (in_order) graph_key = graph_key_of(m, kv, b);
    }
    for (;;) {
        const int replay = graph_key ? kern_graph_begin(be, graph_key) : 0;
        if (!replay) forward_ops(m, kv, b);
        if (!graph_key || kern_graph_end(be) != KERN_GRAPH_RETRY) break;
        graph_key = 0; /* the recording failed: issue the ops again, directly */
    }
    if (m->comm && !m->tp_err.code) comm_wait(m->comm, &m->tp_err); /* NCCL: the step's all-reduces */
    rc = kern_sync(be, err);
    if (!rc && m->tp_err.code) {
        if (err) *err = m->tp_err;
        return m->tp_err.code;
    }
    return rc;
}

int model_kv_move(model_t *m, kv_cache_t *kv, const int32_t *src, const int32_t *dst, int n, fl_error_t *err)
{
    if (m->shard.size > 1 && m->shard.rank == 0) {
        if (!m->comm) return fl_fail(err, FL_EINVAL, "kv move: tensor-parallel rank 0 has no communicator");
        const int rc = tp_send_move(m, src, dst, n, err);
        if (rc) return rc;
    }
    kv_cache_move(kv, src, dst, n);
    return FL_OK;
}

int model_set_comm(model_t *m, comm_t *comm, fl_error_t *err)
{
    if (comm && (comm_size(comm) != m->shard.size || comm_rank(comm) != m->shard.rank))
        return fl_fail(err, FL_EINVAL, "model: communicator of rank %d of %d for a shard of rank %d of %d",
                       comm_rank(comm), comm_size(comm), m->shard.rank, m->shard.size);
    m->comm = comm;
    return FL_OK;
}

int model_logits(model_t *m, float *dst, int n)
{
    if (n < 0 || n > m->max_logits) return FL_EINVAL;
    return kern_download(m->be, dst, m->logits, (size_t)n * m->cfg.n_vocab * sizeof(float));
}

int model_logits_row(model_t *m, float *dst, int row)
{
    if (row < 0 || row >= m->max_logits) return FL_EINVAL;
    const size_t bytes = (size_t)m->cfg.n_vocab * sizeof(float);
    return kern_download(m->be, dst, m->logits + (size_t)row * m->cfg.n_vocab, bytes);
}

void model_sample(model_t *m, int32_t *out, int n, const kern_sampling_t *params)
{
    kern_sample(m->be, out, m->logits, n, m->cfg.n_vocab, params);
}
