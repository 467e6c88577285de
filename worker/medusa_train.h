/* medusa_train.h - training Medusa heads (medusa.h) on a frozen base model: folio-medusa-train's
 * engine, and what its tests drive on tiny models.
 *
 * Data by self-distillation: medusa_generate() runs the base model over a set of prompts, many
 * sequences at once in one batched forward a step, and keeps each produced token with the
 * final-normed hidden state that produced it (the step's model_t.logit_in row: what the heads read
 * at inference, so no second pass over prompt + answer is needed). The set is cached in a file
 * (medusa_data_save/load) keyed by the base model's identity and the caller's description of the
 * inputs, so that epochs and reruns never run the base model again.
 *
 * Training (medusa_train): head k at row i of a sequence predicts the token of row i + k + 1 (the
 * base model itself predicts row i's own token), cross-entropy per head, Adam, shuffled minibatches,
 * a held-out split by sequence; W_k starts at 0, so each head starts as the base model's own
 * next-token head. The products are cblas_sgemm calls (OpenBLAS, --threads threads); with a shared
 * output the gradient reaches W_k through the frozen output matrix E as dR = (softmax - onehot) E.
 *
 * Threading: one caller thread; medusa_train uses `threads` threads inside. */
#ifndef FOLIO_MEDUSA_TRAIN_H
#define FOLIO_MEDUSA_TRAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "kv_cache.h"
#include "medusa.h"
#include "model.h"

/* Sequences of produced tokens, each with the hidden state that produced it. */
typedef struct medusa_data {
    int dim;            /* 0 when no hidden states are kept */
    int n_seqs;
    int64_t n_rows;
    int64_t *seq_start; /* [n_seqs + 1] first row of each sequence */
    int32_t *tokens;    /* [n_rows] the token the model produced at row i */
    float *hidden;      /* [n_rows][dim] the final-normed hidden state it was produced from */
    int64_t cap_rows;
    int cap_seqs;
} medusa_data_t;

void medusa_data_free(medusa_data_t *d);

typedef struct medusa_gen_opts {
    int max_new;              /* tokens per answer at most (an end-of-generation token ends it sooner) */
    int batch;                /* sequences at once: <= the model's max_seqs and max_logits */
    int64_t max_total;        /* stop once this many tokens were produced (the running answers are kept,
                                 cut there); 0: no limit */
    kern_sampling_t sampling; /* temperature 0: greedy; .seed + the prompt's index seeds each answer */
    bool keep_hidden;
    const uint8_t *ends;      /* [n_vocab] nonzero: the token ends an answer (kept, as an
                                 end-of-generation token is); NULL: none */
    /* Called after each step (may be NULL). */
    void (*progress)(void *user, int64_t tokens, int prompts_done, int n_prompts);
    void *user;
} medusa_gen_opts_t;

/* Answers prompts[i] (n_prompt[i] tokens) in order of admission, appending each answer (its
 * tokens, and hidden rows when keep_hidden) to out as a sequence; prompts that do not fit the context
 * with max_new more tokens are skipped. out may already hold sequences (its dim must match). */
int medusa_generate(model_t *m, kv_cache_t *kv, const int32_t *const *prompts, const int *n_prompt, int n_prompts,
                    const medusa_gen_opts_t *o, medusa_data_t *out, fl_error_t *err);

/* The data set cache. save writes path (via path.tmp, renamed); load returns FL_ENOTFOUND when the
 * file is absent or was made for another identity or key (the caller regenerates it), FL_EFORMAT
 * when it is damaged (checked by a digest). identity and key are strings of at most 255 bytes. */
int medusa_data_save(const char *path, const medusa_data_t *d, const char *identity, const char *key,
                     fl_error_t *err);
int medusa_data_load(const char *path, const char *identity, const char *key, medusa_data_t *d, fl_error_t *err);

typedef struct medusa_eval {
    double loss[MEDUSA_MAX_HEADS];                   /* mean held-out cross-entropy (over the positions
                                                        whose token is among the heads' vocabulary) */
    double acc[MEDUSA_MAX_HEADS][MEDUSA_ACC_RANKS];  /* acc[k][r]: right token among the best r + 1 */
    int64_t rows[MEDUSA_MAX_HEADS];                  /* held-out positions scored per head (a token
                                                        outside the heads' vocabulary counts as a miss) */
} medusa_eval_t;

typedef struct medusa_train_progress {
    int step, steps, epoch, n_heads;
    double loss;                    /* mean training loss (all heads) since the previous evaluation */
    bool eval;                      /* `held_out` is new in this report */
    medusa_eval_t held_out;         /* the latest evaluation */
    double elapsed_s, eta_s;
} medusa_train_progress_t;

typedef struct medusa_train_opts {
    int n_heads;        /* 1..MEDUSA_MAX_HEADS */
    bool own_output;    /* a projection per head, starting as the base's output matrix, trained too */
    int epochs;
    float lr;           /* Adam's peak learning rate (linear warm-up, cosine decay) */
    int batch;          /* positions per minibatch */
    float holdout;      /* fraction of the sequences held out for evaluation */
    uint64_t seed;      /* split and shuffle */
    int threads;        /* for OpenBLAS and the element-wise work; 0: the online cores */
    int vocab;          /* tokens the heads choose among: those of the training answers, most frequent
                           first, then the lowest ids, up to this many; 0: the whole vocabulary */
    int evals;          /* evaluations during training besides the first and the last */
    int eval_rows;      /* held-out positions those use (0: all); the first and last use all */
    void (*progress)(void *user, const medusa_train_progress_t *p); /* after each step; may be NULL */
    void *user;
} medusa_train_opts_t;

/* Trained heads: w points into fc and output (owned, freed by medusa_trained_free). */
typedef struct medusa_trained {
    medusa_weights_t w;
    float *fc;          /* [n_heads][dim][dim] */
    float *output;      /* [n_heads][n_tokens][dim] (own_output) */
    int32_t *tokens;    /* [n_tokens] the heads' vocabulary, NULL for all */
    medusa_eval_t first, last; /* held-out, before the first step and after the last */
    int steps;
    int64_t train_rows, held_out_rows;
} medusa_trained_t;

void medusa_train_opts_default(medusa_train_opts_t *o);
/* Trains heads for m on d (which must hold hidden states of m's width). */
int medusa_train(const model_t *m, const medusa_data_t *d, const medusa_train_opts_t *o, medusa_trained_t *out,
                 fl_error_t *err);
void medusa_trained_free(medusa_trained_t *t);

#endif
