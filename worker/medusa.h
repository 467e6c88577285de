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
 * Threading: used by the thread that owns the model. */
#ifndef FOLIO_MEDUSA_H
#define FOLIO_MEDUSA_H

#include <stdint.h>

#include "model.h"

#define MEDUSA_MAX_HEADS 8
#define MEDUSA_MAX_TOP_K 16
#define MEDUSA_IDENTITY_LEN 40 /* characters of medusa_model_identity, without the NUL */

typedef struct medusa medusa_t;

/* The identity of a base model: a hex digest of its architecture sizes and its tensors' contents. */
void medusa_model_identity(const model_t *m, char out[MEDUSA_IDENTITY_LEN + 1]);

/* Loads heads for model m onto m's backend. FL_EFORMAT for a corrupt or foreign file, FL_EINVAL
 * when the heads were trained for another base model (the message names both identities). */
medusa_t *medusa_load(const char *path, model_t *m, fl_error_t *err);
void medusa_destroy(medusa_t **hp);
int medusa_n_heads(const medusa_t *h);

/* The default heads file of a model file: "<model path without .gguf>.medusa.gguf". */
void medusa_default_path(const char *model_path, char *out, size_t out_len);

/* After a model_forward: for each of the n logit rows rows[i] of that step, the top_k most likely
 * tokens of every head, best first: out[(i * n_heads + k) * top_k + j]. top_k <= MEDUSA_MAX_TOP_K,
 * n <= the model's max_logits. */
int medusa_propose(medusa_t *h, model_t *m, const int32_t *rows, int n, int top_k, int32_t *out,
                   fl_error_t *err);

#endif
