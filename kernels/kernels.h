/* kernels.h - the one kernel interface the model forward pass is written against.
 *
 * A backend is a table of operations behind an opaque handle (ggml's pattern; the table is
 * backend_internal.h's, which only the backends see): the model calls kern_matmul(be, ...) and never
 * sees whether the CPU or CUDA code runs. All float buffers passed
 * to a backend (activations, KV cache, norms) are allocated with kern_alloc() on that backend: host
 * memory for the CPU backend, device memory for CUDA. Operations are issued in order on the
 * backend's stream; kern_sync() waits for them (a no-op on the CPU, where each call is synchronous).
 *
 * Shapes: activations are row-major [n][dim] float32. A weight W is [rows][cols] in its stored type
 * (GGUF ne[0] = cols, ne[1] = rows); kern_matmul computes y[n][rows] = x[n][cols] * W^T.
 *
 * KV cache: per layer, K and V pools shaped [n_blocks][block_size][n_kv_heads * head_dim] elements of
 * the pool's KV type (kern_kv_type_ok: F16, or Q8_0 / Q4_0 rows in GGUF's block layout, head_dim a
 * multiple of 32, so each head is whole blocks). A token's slot is block * block_size + offset; its row
 * is kern_kv_row_bytes(type, n_kv_heads * head_dim) bytes. Each sequence has a block table (block ids
 * in position order); attention reads the pools in place through it (paged attention). */
#ifndef FOLIO_KERNELS_H
#define FOLIO_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/dtype.h"
#include "../common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kern_backend kern_backend_t;
typedef struct kern_weight kern_weight_t;

typedef struct kern_rope {
    int n_rot;                  /* dimensions rotated per head (<= head_dim), from rope.dimension_count */
    float freq_base;            /* theta */
    float freq_scale;           /* 1 / linear scaling factor (1 when none) */
    const float *freq_factors;  /* [n_rot/2] divisors of each frequency (Llama-3 rope_freqs, Phi-3's
                                   long/short factors), or NULL */
    bool neox;                  /* rotate dimension i with i + n_rot/2 (GPT-NeoX: Qwen, Phi-3, Gemma), not
                                   adjacent pairs (Llama) */
    float mscale;               /* cos and sin multiplier (rope.scaling.attn_factor); 0 means 1 */
} kern_rope_t;

typedef struct kern_attn {
    float *out;                 /* [n_tokens][n_heads * head_dim] */
    const float *q;             /* [n_tokens][n_heads * head_dim], RoPE already applied */
    const void *k_cache;        /* this layer's K pool */
    const void *v_cache;        /* this layer's V pool */
    int k_type, v_type;         /* the pools' KV types; 0 reads as FL_TYPE_F16 */
    int n_tokens;
    const int32_t *tok_seq;     /* [n_tokens] index of the token's sequence in block_tables */
    const int32_t *tok_pos;     /* [n_tokens] position; the token attends to positions 0..pos of its sequence */
    const int32_t *block_tables;/* [n_seqs][max_blocks] */
    int max_blocks;
    int block_size;
    int n_heads, n_kv_heads, head_dim;
    float scale;                /* usually 1/sqrt(head_dim) */
    /* Tree attention, for verifying a tree of draft tokens in one pass (speculative decoding); both
     * NULL for causal attention. Token i then attends to positions 0..tree_start[i]-1 of its
     * sequence (the accepted context) and to tree_start[i] + j for each bit j of tree_mask[i] (its
     * ancestors in the tree and itself, the tree's tokens stored from tree_start on); tok_pos only
     * positions RoPE. A masked position weighs exactly 0, as if absent. The CPU reads the visible
     * positions compacted in order, so a node of depth d (tok_pos = tree_start + d) gives the bits
     * of causal attention at that position once its path's K/V sit at tree_start.. (kern_kv_move). */
    const uint64_t *tree_mask;  /* [n_tokens] */
    const int32_t *tree_start;  /* [n_tokens] */
    /* Sequences the tokens come from, 0 when unknown. A hint only: when every sequence brings
     * KERN_ATTN_RUN_MIN tokens or more (prefill chunks) a backend may tile queries, so that each K/V
     * row is read once for a run of tokens of one sequence, not once a token. */
    int n_seqs;
    /* The most positions any token of the call reads (kern_attn_len), 0 when unknown. A hint only: a
     * backend may split long contexts over more thread blocks (flash-decoding). It sizes launches by
     * kern_attn_len_class(max_len), so a recorded step stays valid while the class does not change. */
    int max_len;
    /* Per sequence (indexed like block_tables), the length of its prompt; NULL when unknown. For
     * backends whose summation order differs between prompt processing and decode (the CPU's, as
     * llama.cpp's): with it, a token at a position below its sequence's prompt length (of 2 tokens or
     * more) is summed in prompt order and any other token in decode order, whatever else the call
     * holds, so a prompt split over steps or a sequence recomputed after preemption gets the numbers
     * of one run straight through. Without it, the order follows the number of tokens the sequence
     * has in the call. */
    const int32_t *seq_prompt_len;
    /* Sliding-window attention (Mistral, Gemma's local layers), 0 for none: a token at position p
     * attends to the positions p - window + 1 .. p only (llama.cpp's LLAMA_SWA_TYPE_STANDARD; in tree
     * attention p is the token's own position, tok_pos). The masked positions weigh exactly 0. */
    int window;
    /* Score soft-capping (Gemma 2), 0 for none: each score s = q.k becomes tanh(s * (1/softcap)) *
     * softcap before the scale, as llama.cpp's scale-tanh-scale. */
    float softcap;
} kern_attn_t;

#define KERN_ATTN_RUN_MIN 8

/* KV element types: F16, Q8_0, Q4_0 (llama.cpp's -ctk/-ctv q8_0|q4_0). A quantized row holds whole
 * 32-element blocks per head, quantized as the row is stored; attention reads the blocks in place. */
static inline bool kern_kv_type_ok(int type)
{
    return type == FL_TYPE_F16 || type == FL_TYPE_Q8_0 || type == FL_TYPE_Q4_0;
}
/* kern_attn_t's type fields: 0 (unset) is F16. */
static inline int kern_kv_type(int type) { return type ? type : FL_TYPE_F16; }
/* Bytes of one token's K (or V) row of kv_dim elements; 0 for a type or width a pool cannot hold. */
static inline size_t kern_kv_row_bytes(int type, int kv_dim)
{
    return kern_kv_type_ok(type) ? fl_dtype_row_bytes(type, kv_dim) : 0;
}

/* The power of two at or above max_len, as its exponent (0 for max_len <= 1). */
static inline int kern_attn_len_class(int max_len)
{
    int c = 0;
    while (c < 31 && (1 << c) < max_len) c++;
    return c;
}

/* Positions token i of a reads: 0..len-1, some masked out in tree attention. */
static inline int kern_attn_len(const kern_attn_t *a, int i)
{
    if (!a->tree_mask) return a->tok_pos[i] + 1;
    const uint64_t m = a->tree_mask[i];
    return a->tree_start[i] + (m ? 64 - __builtin_clzll(m) : 0);
}

/* Whether a token at position pos of a sequence whose prompt has prompt_len tokens is a prompt token
 * (kern_attn_t.seq_prompt_len, kern_set_prompt_rows): a prompt of one token is decoded like output. */
static inline bool kern_prompt_token(int32_t prompt_len, int32_t pos) { return prompt_len >= 2 && pos < prompt_len; }

/* Whether token i of a attends to position j (< kern_attn_len). */
static inline bool kern_attn_visible(const kern_attn_t *a, int i, int j)
{
    return !a->tree_mask || j < a->tree_start[i] || ((a->tree_mask[i] >> (j - a->tree_start[i])) & 1u);
}

/* One token's logit adjustment (kernels/sampling.h defines the arithmetic): llama.cpp's repetition
 * penalty, then an additive term the host has summed (presence and frequency penalties, logit bias);
 * add == -INFINITY bans the token. */
typedef struct kern_logit_adjust {
    int32_t token;
    float penalty;              /* 1: none; l > 0 ? l / penalty : l * penalty */
    float add;
} kern_logit_adjust_t;

typedef struct kern_sampling {
    float temperature;          /* <= 0: greedy (argmax, lowest id wins ties) */
    int top_k;                  /* <= 0: off */
    float top_p;                /* >= 1: off */
    uint64_t seed;
    uint64_t position;          /* the draw is a pure function of (seed, position) */
    float min_p;                /* <= 0: off; applied after top-k and top-p */
    const kern_logit_adjust_t *adjust; /* [n_adjust] host memory, distinct tokens; applied before all
                                        * else, greedy rows included */
    int n_adjust;
    /* Constrained output: host memory, ceil(vocab / 64) words, bit t % 64 of word t / 64 set when
     * token t may be drawn; a token whose bit is clear gets -INFINITY first (before the
     * adjustments), greedy rows included. NULL: every token. */
    const uint64_t *allowed;
} kern_sampling_t;

#define KERN_GRAPH_RETRY 2

/* Backends. kern_cpu_new(0, ...) uses every online core. kern_cuda_new returns NULL with
 * FL_EUNSUPPORTED when folio was built without CUDA or no device is present. */
kern_backend_t *kern_cpu_new(int n_threads, fl_error_t *err);
kern_backend_t *kern_cuda_new(int device, fl_error_t *err);
bool kern_cuda_available(void);
/* NULL when libfolio_cuda.so was found and loaded with every symbol resolved (no GPU needed), else
 * why not. */
const char *kern_cuda_module_error(void);
/* Device-to-device copy bandwidth of `device` in bytes/s, counting bytes read and written (best of
 * ten copies of `bytes`): the roofline folio-bench compares decode steps with. */
int kern_cuda_copy_bandwidth(int device, size_t bytes, double *bytes_per_s, fl_error_t *err);
void kern_destroy(kern_backend_t **bep);

/* The backend's name ("cpu", "cuda"), for messages. */
const char *kern_backend_name(const kern_backend_t *be);
/* Whether kern_alloc hands out memory of the backend's own (a GPU's, which the process may fill),
 * rather than host memory shared with everything else on the machine. */
bool kern_uses_device_memory(const kern_backend_t *be);
/* What one attention multiply-add (a query against one cached position) costs against one
 * multiply-add of a weight matrix on this backend: schedulers size prompt chunks with it so a step's
 * duration does not grow with the context. */
float kern_attention_cost(const kern_backend_t *be);
/* Free and total bytes of the memory this backend allocates from (device memory for CUDA);
 * FL_EUNSUPPORTED where the backend cannot tell. */
int kern_mem_info(kern_backend_t *be, size_t *free_bytes, size_t *total_bytes);

/* Memory. kern_alloc's buffers are zeroed (NULL on failure). upload / download copy between host
 * memory and a buffer, ordered after the ops issued before them, and return 0 or FL_EBACKEND.
 * kern_sync waits for every issued op and returns the first error one of them met (err filled); it
 * stays: after a failed op the backend's results are not trusted again. */
void *kern_alloc(kern_backend_t *be, size_t bytes);
void kern_free(kern_backend_t *be, void *p);
int kern_upload(kern_backend_t *be, void *dst, const void *src, size_t bytes);
int kern_download(kern_backend_t *be, void *dst, const void *src, size_t bytes);
int kern_sync(kern_backend_t *be, fl_error_t *err);

/* Weights: data points at the file mapping (kept mapped while the weight lives); the backend may
 * borrow it (CPU), repack it or copy it to the device. NULL with err set for a type or shape the
 * backends do not compute with. kern_weight_destroy accepts NULL. */
kern_weight_t *kern_weight_new(kern_backend_t *be, int type, int64_t rows, int64_t cols, const void *data,
                               fl_error_t *err);
void kern_weight_destroy(kern_backend_t *be, kern_weight_t *w);

/* Ops, issued in order on the backend; the calls read like the functions of llama2.c. */
void kern_embed(kern_backend_t *be, float *out, const kern_weight_t *table, const int32_t *ids, int n);
void kern_matmul(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n);
/* Which rows of the following matmuls' inputs are prompt tokens (prompt_rows[i] != 0), for backends
 * that can sum prompt tokens' quantized products in an order of their own (the CPU's, opt-in with
 * FOLIO_CPU_PROMPT=block: one float step per 32-block instead of ggml's eight, README design notes):
 * a matmul of exactly n rows then sums each row by its role, whatever else the call holds, so a
 * row's numbers never depend on its batch.
 * Prompt tokens are those kern_attn_t.seq_prompt_len names (a position below a prompt of >= 2
 * tokens). NULL (or a matmul of another n) sums every row in decode order. The array is host memory,
 * read until the next call. */
void kern_set_prompt_rows(kern_backend_t *be, const uint8_t *prompt_rows, int n);
/* y[n][rows] = x W^T where each row i of x wants only the weight rows ids[i][0..n_ids[i]) (a
 * vocabulary projection restricted to the tokens a constraint allows): those come out with the bits
 * kern_matmul gives them, every other entry of that y row is -INFINITY; ids[i] NULL: the whole row,
 * as kern_matmul. ids and n_ids are host memory. Returns false, touching nothing, where the backend
 * has no such op (then run kern_matmul). (With the CPU's opt-in BLAS path, FOLIO_CPU_BLAS_MIN_N, a
 * large call's whole rows are not bit-equal to the listed ones; by default there is none.) */
bool kern_matmul_rows(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n,
                      const int32_t *const *ids, const int32_t *n_ids);
/* The backend has kern_matmul_rows (then it never returns false). */
bool kern_has_matmul_rows(const kern_backend_t *be);
/* ys[k][n][rows_k] = x W_k^T for k < n_w: the same bits as n_w kern_matmul calls on the same x (one
 * activation conversion, one dispatch where the backend can). */
void kern_matmul_multi(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w, const float *x,
                       int n);
void kern_rmsnorm(kern_backend_t *be, float *y, const float *x, const float *weight, int n, int dim, float eps);
void kern_rope(kern_backend_t *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
               const kern_rope_t *rope);
/* Writes k, v ([n][n_kv_heads*head_dim] f32) to the pools (of KV types k_type, v_type) at slots[n],
 * quantizing each row as llama.cpp stores it (ggml's quantize_row_q8_0 / q4_0). */
void kern_kv_store(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const float *k,
                   const float *v, const int32_t *slots, int n, int kv_dim);
/* Copies the K and V rows at src_slots[i] to dst_slots[i] (host arrays) for i = 0..n-1, in that
 * order, as if one after the other: how a verified draft path's K/V reach the positions after the
 * accepted context (a speculative step keeps them). */
void kern_kv_move(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const int32_t *src_slots,
                  const int32_t *dst_slots, int n, int kv_dim);
void kern_attention(kern_backend_t *be, const kern_attn_t *a);
void kern_swiglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n); /* silu(gate)*up */
void kern_add(kern_backend_t *be, float *y, const float *x, int n);                          /* y += x */
/* Ops of the families beyond Llama (each a plain loop of ggml's, the same arithmetic per element):
 *   add_bias: y[i][d] += bias[d] for i < n, d < dim (Qwen's Q/K/V biases).
 *   scale:    x[i] *= s (Gemma's embedding scale, the query pre-scaling of Phi-3 and Gemma).
 *   softcap:  x[i] = tanh(x[i] * (1/cap)) * cap (Gemma 2's final logits).
 *   geglu:    out = gelu(gate) * up, gelu as ggml computes it: GELU's tanh form looked up in a table of
 *             its f16-rounded values at the f16-rounded input, x for x >= 10 and 0 for x <= -10. */
void kern_add_bias(kern_backend_t *be, float *y, const float *bias, int n, int dim);
void kern_scale(kern_backend_t *be, float *x, float s, int n);
void kern_softcap(kern_backend_t *be, float *x, float cap, int n);
void kern_geglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n);
/* One token per row of logits [n][vocab] (device memory), chosen per row's params (host);
 * out (host) receives n ids. The op may overwrite the rows (each row's adjustments are applied
 * to it in place): read a row first if its raw values are wanted (log-probabilities). */
void kern_sample(kern_backend_t *be, int32_t *out, float *logits, int n, int vocab,
                 const kern_sampling_t *params);

/* Fused ops, so that a decode step issues fewer, fuller kernels (at batch 1 every launch and every
 * pass over the activations costs against one pass over the weights). Each equals the sequence of
 * plain ops it runs where the backend has no fused form (the CPU has none):
 *   add_rmsnorm:   x += delta ([n][dim]); then y = rmsnorm(x) * weight.
 *   rope_kv_store: RoPE on q ([n][n_heads*head_dim]) and k ([n][n_kv_heads*head_dim]) in place,
 *                  then k and v stored to the pools at slots[n] as kv_store does.
 *   matmul_swiglu: out[n][rows] = silu(x W_gate^T) * (x W_up^T), rows those of both weights;
 *                  up ([n][rows]) is scratch. */
void kern_add_rmsnorm(kern_backend_t *be, float *y, float *x, const float *delta, const float *weight, int n, int dim,
                      float eps);
void kern_rope_kv_store(kern_backend_t *be, float *q, float *k, const float *v, void *k_cache, void *v_cache,
                        int k_type, int v_type, const int32_t *pos, const int32_t *slots, int n, int n_heads, int n_kv_heads, int head_dim,
                        const kern_rope_t *rope);
void kern_matmul_swiglu(kern_backend_t *be, float *out, float *up, const kern_weight_t *w_gate,
                        const kern_weight_t *w_up, int rows, const float *x, int n);

/* Recorded op sequences (CUDA graphs; a backend without them runs every op directly). Between
 * kern_graph_begin(key) and kern_graph_end the caller issues a step's ops, the same ones (kernels,
 * shapes, pointers) for the same key, with every input that changes between steps already uploaded
 * to fixed buffers. kern_graph_begin returns 1 when a recording for key will run at kern_graph_end
 * (issue no ops), else 0 (issue them: they run directly, or are being recorded and run at
 * kern_graph_end). kern_graph_end returns 0, or KERN_GRAPH_RETRY when a recording failed and the ops
 * must be issued again directly. kern_graph_reset drops every recording (the pointers they hold are
 * about to change). */
int kern_graph_begin(kern_backend_t *be, uint64_t key);
int kern_graph_end(kern_backend_t *be);
void kern_graph_reset(kern_backend_t *be);

#ifdef __cplusplus
}
#endif

#endif
