/* scheduler.h - the worker's scheduler: continuous batching over the paged KV cache with prefix caching.
 *
 * Requests are submitted at any time and join between steps. Each sched_step() runs one batched
 * model_forward() mixing one decode token per running sequence with chunks of prompts (chunked
 * prefill) under a budget of max_batch_tokens tokens and of cost: a prompt chunk costs its tokens
 * plus its attention (the (token, position) pairs it reads, at the backend's relative attention
 * cost), and a step may cost what a full chunk at the context's start does, so its duration does
 * not grow with the context. A new sequence first looks its prompt's full blocks up in the
 * prefix cache (block_hash.h chains, salted per tenant) and only computes what is missing; every
 * block a sequence fills is published to the cache, and blocks nobody references stay cached until
 * memory is needed (then evicted least-recently-used). When a running sequence needs a block and
 * none is left, the youngest running sequence is preempted: its blocks are released (its full
 * blocks stay cached) and it waits at the head of the queue to be recomputed. Waiting requests are
 * admitted first-come first-served, so none starves. A request that could never fit is refused at
 * submission.
 *
 * Outputs: greedy tokens are identical whether a request runs alone or batched, with or without
 * prefix-cache hits, preempted or not (per-row determinism of the kernels, and sampling drawn from
 * (seed, token index)).
 *
 * Threading: one thread owns a sched_t, its model and its KV cache. Callbacks run on that thread
 * inside sched_step()/sched_cancel()/sched_submit(); they may call sched_submit() and sched_cancel()
 * (never sched_step() or sched_destroy()). */
#ifndef FOLIO_SCHEDULER_H
#define FOLIO_SCHEDULER_H

#include <stdbool.h>
#include <stdint.h>

#include "block_hash.h"
#include "constraint.h"
#include "model.h"
#include "sampling.h"

typedef enum {
    SCHED_FINISH_STOP = 1,  /* end-of-generation token, a stop token id, or the caller's on_token said stop */
    SCHED_FINISH_LENGTH,    /* max_tokens or the context length */
    SCHED_FINISH_CANCELLED, /* sched_cancel() */
    SCHED_FINISH_DEADLINE,  /* the request's deadline passed */
    SCHED_FINISH_ERROR,     /* see sched_result_t.error */
} sched_finish_t;

/* Speculative decoding (spec.h): which drafter proposes the tokens a step verifies. */
typedef enum {
    SCHED_SPEC_AUTO = 0,    /* Medusa when heads are loaded (sched_opts_t.medusa; an n-gram match
                               drafts first where there is one), else n-gram */
    SCHED_SPEC_NONE,
    SCHED_SPEC_NGRAM,       /* prompt lookup: the continuation of the latest match of the last tokens */
    SCHED_SPEC_MEDUSA,      /* the heads' tree (n-gram when no heads are loaded) */
} sched_spec_t;

#define SCHED_MAX_DRAFT 16  /* draft tokens a sequence may verify in one step */
#define SCHED_STEP_SIZES 18 /* sched_stats_t.steps_by_size: 1..16 tokens, and more */

struct medusa;

typedef struct sched_opts {
    int max_batch_tokens; /* tokens per step; 0 = the model's max_batch_tokens */
    int max_running;      /* sequences in a step; 0 = the model's max_seqs */
    int max_waiting;      /* queued requests beyond which submit refuses (FL_ERANGE); 0 = 4096 */
    bool no_prefix_cache; /* never look blocks up (blocks are still reference counted) */
    sched_spec_t spec;    /* the most a request may ask for: NONE turns speculation off here, AUTO
                             allows any mode (requests default to AUTO) */
    struct medusa *medusa;/* Medusa heads for the model, or NULL (stays the caller's) */
    const struct spec_paths *spec_paths; /* Medusa's tree shape (spec.h), NULL: spec_paths_default();
                                            stays the caller's */
    bool spec_draft_all;  /* verify every draft the drafters propose (within max_draft and the step's
                             budgets) instead of cutting them by the measured step costs: a choice
                             that never depends on timing, for tests */
} sched_opts_t;

/* Logit adjustments drawn from the sequence's own tokens (so a preempted or resumed sequence draws
 * the same), turned into kern_logit_adjust_t entries before each draw. Zeroed: all off. */
typedef struct sched_penalties {
    float repetition;         /* llama.cpp's: l > 0 ? l / p : l * p for tokens among the last
                                 repetition_last_n of prompt + completion; 0 or 1: off */
    int repetition_last_n;
    float presence, frequency;/* the OpenAI API's: l -= presence (if seen) + frequency x count, over
                                 the completion's tokens */
    const kern_logit_adjust_t *bias; /* sorted by token, each once, .add the bias (-INFINITY bans); copied */
    int n_bias;
} sched_penalties_t;

#define SCHED_MAX_TOP_LOGPROBS 20

/* A generated token's log-probabilities under the raw logits (kern_logprobs_row). */
typedef struct sched_logprobs {
    kern_logprob_t chosen;
    kern_logprob_t top[SCHED_MAX_TOP_LOGPROBS];
    int n_top;
} sched_logprobs_t;

/* Constrained output (common/constraint.h): what the completion must match. kind 0: none. The
 * scheduler compiles it at submission (a bad one is refused then) and keeps compiled constraints by
 * their text, shared by the requests that name the same. */
typedef struct sched_constraint {
    fl_constraint_kind_t kind;
    const char *text;             /* REGEX: the pattern; JSON_SCHEMA: the schema's JSON */
    const char *const *choices;   /* CHOICE: [n_choices] */
    int n_choices;
} sched_constraint_t;

typedef struct sched_request {
    uint64_t id;              /* caller's id, unique among live requests */
    const int32_t *prompt;    /* copied */
    int n_prompt;
    int max_tokens;
    kern_sampling_t sampling; /* .position and .adjust are set per token */
    sched_penalties_t penalties;
    bool logprobs;            /* report each token's sched_logprobs_t ... */
    int top_logprobs;         /* ... with this many best alternatives (<= SCHED_MAX_TOP_LOGPROBS) */
    const int32_t *stop_ids;  /* extra stop token ids, copied */
    int n_stop_ids;
    bool ignore_eog;
    block_hash_t salt;        /* block_hash_salt(tenant) */
    double deadline;          /* absolute, fl_clock_s(); 0 = none */
    sched_spec_t spec;        /* speculative decoding for this request (AUTO by default) */
    int max_draft;            /* most draft tokens a step verifies for it; 0: the default, at most
                                 SCHED_MAX_DRAFT */
    sched_constraint_t constraint; /* copied (compiled) at submission */
    /* Completion tokens already generated elsewhere (a request moved mid-stream): the sequence is
     * prompt + resume and continues at completion index n_resume, exactly as if it had generated
     * them (sampling positions, penalties, the constraint's state; max_tokens counts them). Copied. */
    const int32_t *resume;
    int n_resume;
} sched_request_t;

typedef struct sched_result {
    uint64_t id;
    sched_finish_t finish;
    int n_prompt, n_cached, n_generated; /* n_cached: prompt tokens served from the prefix cache */
    int preemptions;
    int n_drafted, n_accepted;  /* draft tokens verified, and of them accepted (speculation) */
    double t_submit, t_scheduled, t_first_token, t_done; /* fl_clock_s(); 0 when it did not happen */
    char error[200];
} sched_result_t;

typedef struct sched_callbacks {
    /* Token `index` (0-based within the completion) of request id was generated; lp is its
     * log-probabilities when the request asked for them, else NULL. Return true to stop the request
     * here (a stop string matched): it then finishes with SCHED_FINISH_STOP. Not called for
     * end-of-generation or stop-id tokens, which end the request. May be NULL. */
    bool (*on_token)(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp);
    /* Exactly once per accepted request; r is valid during the call. */
    void (*on_finish)(void *user, const sched_result_t *r);
    /* A step of n_tokens is about to run, expected to take expected_s seconds by the cost model
     * (0 while nothing has been measured). May be NULL. */
    void (*on_step)(void *user, int n_tokens, double expected_s);
    void *user;
} sched_callbacks_t;

typedef struct sched_stats {
    int running, waiting;
    int kv_blocks_total;  /* usable blocks (the liveness block excluded) */
    int kv_blocks_used;   /* referenced by sequences */
    int kv_blocks_cached; /* unreferenced, holding cached prefixes */
    uint64_t prompt_tokens, cached_prompt_tokens, generated_tokens, preemptions, steps;
    /* Throughput accounting: tokens fed as prompt chunks (cache misses and recomputation after
     * preemption included), tokens of steps that carried only decode tokens, and the seconds of
     * forward + sampling in steps with and without prompt chunks. */
    uint64_t prefill_tokens, decode_step_tokens;
    double prefill_s, decode_s;
    /* Speculation: draft tokens verified and accepted, and the (sequence, step) verifications that
     * carried a draft; mean accepted length = 1 + accepted / spec_seq_steps tokens a step. */
    uint64_t drafted_tokens, accepted_tokens, spec_seq_steps;
    /* Decode-only steps by their token count (index: tokens, 1..SCHED_STEP_SIZES - 1; the last
     * counts that many or more): how many, and their seconds of forward and sampling (the Medusa
     * heads apart). What a verify of k tokens costs in the server, beside plain decoding. */
    uint64_t steps_by_size[SCHED_STEP_SIZES];
    double s_by_size[SCHED_STEP_SIZES];
    /* Medusa: seconds of the heads, and decode epochs run with them on and off (heads_epoch). */
    double heads_s;
    uint64_t heads_epochs_on, heads_epochs_off;
    /* Medusa head rows of constrained sequences ranked among the allowed tokens only (or fixed by
     * the constraint outright), not over the heads' whole token set. */
    uint64_t heads_allowed_rows;
} sched_stats_t;

typedef struct sched sched_t;

/* Takes one block of kv for the liveness step. model and kv stay the caller's. */
sched_t *sched_new(model_t *m, kv_cache_t *kv, const sched_opts_t *opts, const sched_callbacks_t *cb,
                   fl_error_t *err);
/* Finishes every live request with SCHED_FINISH_CANCELLED (callbacks run), frees everything. */
void sched_destroy(sched_t **sp);

/* Queues a request. FL_EINVAL: empty prompt, bad sizes, or the prompt does not fit the context;
 * FL_ERANGE: could never fit the KV cache (n_prompt + max_tokens tokens of blocks exceed the pool);
 * FL_EBUSY: the queue is full (it may have room later). On error nothing is queued and on_finish is not called. */
int sched_submit(sched_t *s, const sched_request_t *r, fl_error_t *err);
/* Stops a live request (on_finish with SCHED_FINISH_CANCELLED, its KV freed). FL_ENOTFOUND if none. */
int sched_cancel(sched_t *s, uint64_t id);
/* Cancels every live request. */
void sched_cancel_all(sched_t *s);

bool sched_has_work(const sched_t *s);
/* One batched step (expires deadlines first). Fails only when the engine fails; the requests of the
 * failed step are then finished with SCHED_FINISH_ERROR. */
int sched_step(sched_t *s, fl_error_t *err);
/* A one-token forward on the reserved block: proof that the engine still computes. Returns its
 * duration in seconds, or a negative FL_E* code. */
double sched_liveness(sched_t *s, fl_error_t *err);

void sched_get_stats(const sched_t *s, sched_stats_t *st);
/* Seconds a step of `tokens` tokens whose attention reads `pairs` (token, position) pairs is
 * expected to take: t = a tokens + b pairs, fitted over the steps run (0 before any). Prompt chunks
 * are sized by the same model so a step deep in a long context costs about what one at its start
 * does (max_batch_tokens tokens). */
double sched_expected_s(const sched_t *s, int tokens, double pairs);
const char *sched_finish_name(sched_finish_t f);

#endif
