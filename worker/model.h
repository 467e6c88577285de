/* model.h - a decoder of the Llama, Qwen2/3, Mistral, Phi-3 and Gemma 2/3 families read from GGUF, run
 * through the kernel interface.
 *
 * model_new() reads every size from the GGUF metadata (nothing is fixed for the default model),
 * builds the tokenizer, hands each weight to the backend and sizes the scratch buffers for at most
 * max_batch_tokens tokens and max_logits rows of logits per forward call. model_forward() runs one
 * batched step over tokens of several sequences of different lengths: each token names its
 * sequence, its position and, through the sequence's block table, where its K/V go in the paged
 * cache. Only the rows listed in logit_rows get logits.
 *
 * Threading: a model_t is used by one thread at a time. */
#ifndef FOLIO_MODEL_H
#define FOLIO_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "comm.h"
#include "gguf.h"
#include "kernels.h"
#include "kv_cache.h"
#include "tokenizer.h"

/* The families differ only in the switches of model_config_t, read from the GGUF's architecture and
 * metadata as llama.cpp reads them (model.c's read_config); the forward pass is written once. */
typedef enum {
    MODEL_ARCH_LLAMA,  /* also Mistral: "llama" with <arch>.attention.sliding_window */
    MODEL_ARCH_QWEN2,
    MODEL_ARCH_QWEN3,
    MODEL_ARCH_PHI3,
    MODEL_ARCH_GEMMA2,
    MODEL_ARCH_GEMMA3,
} model_arch_t;

typedef struct model_config {
    model_arch_t arch;
    char arch_name[32];     /* general.architecture */
    int n_layers, dim, n_ff, n_heads, n_kv_heads, head_dim, n_vocab, n_ctx_train;
    float norm_eps;
    kern_rope_t rope;       /* every layer's, or the global layers' where local ones differ */
    kern_rope_t rope_swa;   /* the sliding-window layers' (Gemma 3: base 10000, unscaled) */
    bool tied_output;       /* no output.weight: the token embedding doubles as the output matrix */
    int weight_type;        /* type of the attention Q matrix, for display */
    int sliding_window;     /* positions a sliding-window layer sees, 0: none (model_layer_t.swa) */
    bool geglu;             /* GELU-gated feed-forward (Gemma), else SwiGLU */
    bool post_norms;        /* RMSNorm of the attention and feed-forward outputs too (Gemma) */
    float embed_scale;      /* token embeddings times this (Gemma: sqrt(dim)), 0: none */
    float q_scale;          /* queries times this after RoPE, the attention's own scale then 1 (Phi-3,
                               Gemma); 0: none, the attention scales by 1/sqrt(head_dim) */
    float attn_softcap;     /* kern_attn_t.softcap (Gemma 2), 0: none */
    float final_softcap;    /* logits = tanh(logits / c) * c (Gemma 2), 0: none */
    int rope_orig_ctx;      /* Phi-3: rope.scaling.original_context_length (long or short factors) */
} model_config_t;

typedef struct model_layer {
    float *attn_norm, *ffn_norm; /* backend memory */
    kern_weight_t *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down;
    float *bq, *bk, *bv;             /* Q/K/V biases (Qwen2), or NULL */
    float *q_norm, *k_norm;          /* per-head RMSNorm weights [head_dim] (Qwen3, Gemma 3), or NULL */
    float *attn_post_norm, *ffn_post_norm; /* Gemma, or NULL */
    bool swa;                        /* attends through the sliding window (model_config_t) */
} model_layer_t;

/* What of each layer this rank of a tensor-parallel group holds (tp.h says how the model is cut):
 * query heads [head0, head0 + n_heads), their KV heads [kv_head0, kv_head0 + n_kv_heads), and
 * feed-forward columns [ff0, ff0 + n_ff). With one rank, everything. model_config_t stays the whole
 * model's. */
typedef struct model_shard {
    int rank, size;
    int head0, n_heads, kv_head0, n_kv_heads, ff0, n_ff;
} model_shard_t;

/* Where a forward pass spends its time, measured when profiling is on (FOLIO_PROFILE=1 or
 * model_set_profile): the backend is synchronised around each op, so the figures are per op. */
typedef enum {
    MODEL_PROF_EMBED,
    MODEL_PROF_NORM,       /* RMSNorm, with the residual add before it */
    MODEL_PROF_QKV,        /* Q, K, V projections */
    MODEL_PROF_ROPE_KV,    /* RoPE and the KV store */
    MODEL_PROF_ATTENTION,
    MODEL_PROF_OUT_PROJ,
    MODEL_PROF_FFN_UP,     /* gate and up projections, SwiGLU */
    MODEL_PROF_FFN_DOWN,
    MODEL_PROF_RESIDUAL,   /* the last layer's residual add */
    MODEL_PROF_LOGITS,     /* final norm and vocabulary projection */
    MODEL_PROF_COUNT
} model_prof_t;

typedef struct model {
    model_config_t cfg;
    gguf_t *gguf;
    tok_t *tok;
    kern_backend_t *be;
    kern_weight_t *tok_embd, *output;
    float *output_norm, *rope_freqs;
    model_layer_t *layers;
    size_t weight_bytes;    /* bytes of weights as stored (this rank's share) */
    bool weights_f32;       /* model_params_t.weights_f32 */
    void **f32_copies;      /* host copies the backend may borrow (F32 ones for weights_f32, a rank's
                               columns of a row-parallel matrix), freed last */
    int n_f32_copies;

    /* Scratch, sized at creation (no allocation per step). Backend memory unless noted. */
    int max_batch_tokens, max_logits, max_seqs, max_blocks; /* per forward call */
    int block_size;         /* KV block size the block tables use (the KV cache must use the same) */
    float *x, *xb, *q, *k, *v, *att, *gate, *up, *logit_in, *logits;
    int32_t *d_step;        /* a step's inputs, packed (model_forward); the six below point into it */
    int32_t *d_tokens, *d_pos, *d_seq, *d_slots, *d_block_tables, *d_prompt_len, *d_tree_start;
    uint64_t *d_tree_mask;  /* 8-byte aligned, after the ints */
    int32_t *h_step;        /* host staging of d_step */
    uint8_t *prompt_rows;   /* host [max_batch_tokens]: a step's prompt tokens (kern_set_prompt_rows) */

    bool profile;
    double prof_s[MODEL_PROF_COUNT];
    uint64_t chosen_logit_rows; /* logit rows projected onto their chosen tokens only (logit_ids) */

    /* Tensor parallelism (tp.h): this rank's share, and the group's communicator (borrowed,
     * model_set_comm; NULL with one rank). Rank 0 alone has the output matrix and computes logits. */
    model_shard_t shard;
    comm_t *comm;
    int32_t *plan;          /* host: a step's plan as rank 0 broadcasts it (tp.c) */
    fl_error_t tp_err;      /* the step's first communication failure */
} model_t;

typedef struct model_batch {
    int n_tokens;
    const int32_t *tokens;       /* [n_tokens] */
    const int32_t *pos;          /* [n_tokens] position within its sequence */
    const int32_t *seq;          /* [n_tokens] row of block_tables */
    const int32_t *block_tables; /* [n_seqs][max_blocks] (host) */
    int n_seqs;
    const int32_t *prompt_len;   /* [n_seqs] each sequence's prompt length (host), or NULL:
                                    kern_attn_t.seq_prompt_len */
    const int32_t *logit_rows;   /* token indices that want logits, in output order */
    int n_logits;
    /* Per logit row, the only tokens whose logits are wanted (a constraint's allowed set, ascending),
     * or NULL for all; the others come out -INFINITY where model_projects_chosen_rows, else every
     * logit is computed. NULL: no lists. */
    const int32_t *const *logit_ids;
    const int32_t *logit_n_ids;
    /* Draft trees (speculative verification), or both NULL: kern_attn_t.tree_mask / tree_start per
     * token (host). A token outside any tree has tree_start = pos, tree_mask = 1. */
    const uint64_t *tree_mask;
    const int32_t *tree_start;
} model_batch_t;

typedef struct model_params {
    int max_batch_tokens;   /* tokens per forward call (prefill chunk + decode tokens) */
    int max_logits;         /* logit rows per call */
    int max_seqs;           /* sequences per call */
    int max_ctx;            /* longest sequence (0: the model's trained context) */
    int block_size;         /* KV block size the block tables use */
    bool weights_f32;       /* dequantize every matrix to F32 at load: the precise reference the
                               CUDA test compares with (the CPU's quantized paths also round
                               activations to 8 bits) */
    int tp_rank, tp_size;   /* load rank tp_rank's share of a tensor-parallel group of tp_size
                               (0: one rank, the whole model) */
} model_params_t;

model_t *model_new(const char *path, kern_backend_t *be, const model_params_t *params, fl_error_t *err);
void model_destroy(model_t **mp);

/* One batched forward step; fills the model's logits buffer with n_logits rows (on rank 0 of a
 * tensor-parallel group, which first sends the step to the other ranks: tp.h). */
int model_forward(model_t *m, kv_cache_t *kv, const model_batch_t *b, fl_error_t *err);
/* model_batch_t.logit_ids take effect: the backend projects onto chosen rows (the CPU's does) and
 * the model has no final soft-capping. Without, lists are not worth building. */
bool model_projects_chosen_rows(const model_t *m);
/* Copies n rows of logits to host memory dst[n][n_vocab]. */
int model_logits(model_t *m, float *dst, int n);
/* Copies logits row `row` to host memory dst[n_vocab]. */
int model_logits_row(model_t *m, float *dst, int row);
/* Picks one token per logit row with the given sampling parameters (one per row); may overwrite
 * the rows (logit adjustments are applied in place). */
void model_sample(model_t *m, int32_t *out, int n, const kern_sampling_t *params);

/* Copies the K/V of every layer from slots src[i] to dst[i] (kv_cache_move), on every rank of a
 * tensor-parallel group. */
int model_kv_move(model_t *m, kv_cache_t *kv, const int32_t *src, const int32_t *dst, int n, fl_error_t *err);
/* The communicator of this rank's group (its size and rank must be the shard's); borrowed: the
 * caller destroys it after the model. Every rank must call it before the first forward step. */
int model_set_comm(model_t *m, comm_t *comm, fl_error_t *err);

void model_set_profile(model_t *m, bool on);
const char *model_prof_name(int i);

#endif
