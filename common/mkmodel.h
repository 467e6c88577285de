/* mkmodel.h - writes random-weight models as GGUF files (the core of folio-mkmodel).
 *
 * Tests, benchmarks and the e2e suite call mkmodel_write() to make models of any shape without
 * downloading anything. The file carries the metadata and tensors llama.cpp's converter writes for a
 * model of the chosen architecture (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3) and a
 * byte-level BPE vocabulary (GPT-2 byte alphabet): ids 0..2 are <|endoftext|>, <|im_start|>,
 * <|im_end|>; ids 3..258 are the 256 bytes; the rest are merges, first learned from a built-in
 * English text, then generated, all deterministic. Weights are seeded random (std 0.02, norms about
 * 1.0) and streamed to the file, so an 8B-shaped model needs only a few MB of memory. */
#ifndef FOLIO_MKMODEL_H
#define FOLIO_MKMODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"

#define MKMODEL_N_SPECIAL 3
#define MKMODEL_FIRST_BYTE_TOKEN 3 /* token id of byte 0 */

typedef struct {
    int n_layers;
    int dim;        /* embedding_length */
    int ff;         /* feed_forward_length */
    int n_heads;
    int n_kv_heads;
    int vocab;      /* >= 256 + MKMODEL_N_SPECIAL */
    int ctx;        /* context_length */
    int type;       /* fl_dtype_t of the matrices (and token embedding / output); norms are F32 */
    bool tied;      /* no output.weight: the token embedding doubles as the output matrix */
    float rope_theta;
    float eps;      /* rms norm epsilon */
    uint64_t seed;
    const char *name; /* general.name; NULL: "folio-mkmodel" */
    int threads;    /* tensors produced at once; 0: the online cores, at most 16 (same bytes either way) */
    /* Architecture: "llama" (NULL), "mistral" (llama with attention.sliding_window), "qwen2" (Q/K/V
     * biases), "qwen3" (per-head Q/K norms), "phi3" (fused attn_qkv and gate-up ffn_up, long/short
     * RoPE factors, rope.scaling.attn_factor), "gemma2" (post-norms, soft-capping, tied output),
     * "gemma3" (post-norms, Q/K norms, local RoPE base 10000, global base rope_theta). */
    const char *arch;
    int head_dim;       /* attention.key_length; 0: dim / heads (Llama, Mistral and Phi-3 need that) */
    int sliding_window; /* attention.sliding_window; 0: none written (Gemma 3 then gets 4096) */
} mkmodel_params_t;

/* Whether arch names an architecture mkmodel writes. */
bool mkmodel_arch_known(const char *arch);

/* A small model: 2 layers, dim 64, ff 128, 4 heads, 2 kv heads, vocab 512, ctx 256, F32, seed 1. */
void mkmodel_params_default(mkmodel_params_t *p);

/* 0, or FL_EINVAL naming the bad parameter. */
int mkmodel_check(const mkmodel_params_t *p, fl_error_t *err);

/* Writes the model to path. */
int mkmodel_write(const mkmodel_params_t *p, const char *path, fl_error_t *err);

/* The vocabulary alone: n_vocab token strings and n_merges "a b" merge strings (vocab - 259 of
 * them), malloc'd; free with mkmodel_vocab_free. For tokenizer tests. */
int mkmodel_vocab(int vocab, char ***tokens, char ***merges, int *n_merges, fl_error_t *err);
void mkmodel_vocab_free(char **tokens, int n_tokens, char **merges, int n_merges);

#endif
