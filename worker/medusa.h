/* medusa.h - Medusa heads: extra decoding heads on the base model's last hidden state that guess
 * the tokens after the next one (Cai et al., 2024, "Medusa").
 *
 * Head k (0-based) reads the final-normed hidden state h of a position (model_t.logit_in, the row
 * the base model's vocabulary projection reads) and predicts the token k + 2 places after that
 * position (the base model itself predicts the token 1 place after): r = h + SiLU(W_k h), then the
 * vocabulary projection of r. The heads are stored as their own GGUF (architecture "medusa") with
 * the identity of the base model they were trained for (medusa_model_identity: a digest of its
 * tensors and shape, not its file name); loading them for another model fails with a clear error.
 *
 * File: general.architecture "medusa"; medusa.head_count, medusa.embedding_length,
 * medusa.vocab_size, medusa.base_model (the identity), medusa.base_name (the base's general.name,
 * informational), medusa.shared_output (bool), medusa.accuracy (optional F32 array [head_count *
 * MEDUSA_ACC_RANKS], see medusa_head_accuracy), medusa.vocab (optional INT32 array: the tokens the
 * heads choose among, ascending ids; absent: the whole vocabulary); tensors medusa.<k>.fc.weight
 * (F32 [dim x dim]) and, without a shared output, medusa.<k>.output.weight ([tokens x dim], any type
 * the backends compute with). With a shared output the heads project through the base model's own
 * frozen output matrix (its rows for medusa.vocab), all heads' rows in one product so its weights
 * are read once a call.
 *
 * Why a vocabulary subset: a head's projection costs what the model's own logits do (49152 x 576
 * for the default model, ~20% of its forward a row), so three heads over the whole vocabulary cost
 * ~60% of a step a sequence; the trainer keeps the tokens its data uses plus the lowest ids (BPE's
 * most frequent), 8192 by default, which hold ~95% of held-out answer tokens at a sixth of the cost.
 *
 * Threading: used by the thread that owns the model. */
#ifndef FOLIO_MEDUSA_H
#define FOLIO_MEDUSA_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"

#define MEDUSA_MAX_HEADS 8
#define MEDUSA_MAX_TOP_K 16
#define MEDUSA_IDENTITY_LEN 40 /* characters of medusa_model_identity, without the NUL */
#define MEDUSA_ACC_RANKS 10    /* ranks of medusa_head_accuracy */

typedef struct medusa medusa_t;

/* The identity of a base model: a hex digest of its architecture sizes and its tensors' names, types,
 * shapes and contents (160 bits: XXH3-128 and the top of an XXH3-64 under another seed, both over
 * the same bytes). It reads every weight once: about 10 ms for the default model. */
void medusa_model_identity(const model_t *m, char out[MEDUSA_IDENTITY_LEN + 1]);

/* Loads heads for model m onto m's backend. FL_EFORMAT for a corrupt or foreign file, FL_EINVAL
 * when the heads were trained for another base model (the message names both identities). */
medusa_t *medusa_load(const char *path, model_t *m, fl_error_t *err);
void medusa_destroy(medusa_t **hp);
int medusa_n_heads(const medusa_t *h);
/* Whether the heads project through the base model's output matrix (else each has its own). */
bool medusa_shared_output(const medusa_t *h);
/* The held-out accuracy the trainer measured: the fraction of positions where head `head`'s
 * rank + 1 best candidates hold the right token (rank < MEDUSA_ACC_RANKS), for sizing draft trees;
 * 0 when the file does not say. */
float medusa_head_accuracy(const medusa_t *h, int head, int rank);

/* The default heads file of a model file: "<model path without .gguf>.medusa.gguf". */
void medusa_default_path(const char *model_path, char *out, size_t out_len);

/* After a model_forward: for each of the n logit rows rows[i] of that step, the top_k most likely
 * tokens of every head (among medusa.vocab), best first, ties to the lower id:
 * out[(i * n_heads + k) * top_k + j]. top_k <= MEDUSA_MAX_TOP_K, n <= the model's max_logits. */
int medusa_propose(medusa_t *h, model_t *m, const int32_t *rows, int n, int top_k, int32_t *out,
                   fl_error_t *err);
/* Constrained output: which tokens may stand where head `head` of row i guesses, asked head by head
 * once the heads before it are ranked (cand: row i's candidates so far, heads below `head`; a
 * constraint follows their best). Sets *ids to them (ascending) and returns their count (0: none),
 * or -1: any token (free text, or too many to list); after a -1 a row's later heads are not asked. */
typedef int (*medusa_allowed_fn)(void *user, int i, int head, const int32_t *cand, const int32_t **ids);
/* medusa_propose where the heads rank only the tokens `allowed` lists: one token is the candidate
 * outright; more are scored alone, through the base output matrix's rows for them where the backend
 * projects chosen rows (kern_matmul_rows: a choice among five costs five rows, not the subset), else
 * read from the subset's projection (tokens outside it are then lost). Ranks beyond the allowed
 * tokens are -1. Heads with projections of their own ignore the lists (a constraint prunes later).
 * allowed NULL: medusa_propose. */
int medusa_propose_allowed(medusa_t *h, model_t *m, const int32_t *rows, int n, int top_k, medusa_allowed_fn allowed,
                           void *user, int32_t *out, fl_error_t *err);

/* Heads as the trainer holds them, for medusa_save (host memory, borrowed). */
typedef struct medusa_weights {
    int n_heads;
    bool shared_output;
    const float *fc[MEDUSA_MAX_HEADS];     /* [dim][dim] row-major W_k (y = W_k h) */
    const int32_t *tokens;                 /* [n_tokens] ascending ids the heads choose among; NULL: all */
    int n_tokens;
    const float *output[MEDUSA_MAX_HEADS]; /* [n_tokens or n_vocab][dim] own projections; unused when shared */
    int output_type;                       /* fl_dtype_t the own projections are stored as (F32: as given) */
    float accuracy[MEDUSA_MAX_HEADS][MEDUSA_ACC_RANKS]; /* held-out; all 0: not measured */
} medusa_weights_t;

/* Writes heads for base model m (its identity, sizes and name go in the metadata) to path. */
int medusa_save(const char *path, const model_t *m, const medusa_weights_t *w, fl_error_t *err);

#endif
