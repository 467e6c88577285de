/* generate.h - batched generation of several requests at once on one model.
 *
 * gen_run() submits a fixed set of requests to the worker's scheduler (scheduler.h: continuous
 * batching, chunked prefill, preemption) with the prefix cache off, and steps it until all are
 * done: the one batching loop serves `folioctl run`, the engine tests, `folio-bench engine` and
 * the worker process.
 *
 * Sampling: each token is drawn from (request seed, token index), so a request's output does not
 * depend on what it is batched with. */
#ifndef FOLIO_GENERATE_H
#define FOLIO_GENERATE_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "scheduler.h"

typedef enum { GEN_FINISH_NONE = 0, GEN_FINISH_STOP, GEN_FINISH_LENGTH, GEN_FINISH_ERROR } gen_finish_t;

typedef struct gen_request {
    sched_request_t req;         /* in: what to generate (gen_run sets .id to the index in reqs) */
    /* out */
    int32_t *tokens;             /* caller-provided, room for req.max_tokens */
    int n_tokens;
    gen_finish_t finish;
    int n_drafted, n_accepted;   /* speculative decoding: draft tokens verified, and of them accepted */
    char error[256];
    double t_submit, t_first_token, t_done; /* seconds, monotonic clock */
} gen_request_t;

/* Called for every generated token as it is produced (may be NULL): token `index` of the completion
 * of reqs[request], with its log-probabilities when that request asked for them (else NULL).
 * Returning true stops that request here (finish STOP; the token stays in its output). */
typedef bool (*gen_token_fn)(void *user, int request, int index, int32_t token, const sched_logprobs_t *lp);

typedef struct gen_stats {
    int steps;
    long prompt_tokens, decode_tokens;
    long decode_step_tokens;     /* tokens run in steps that carried no prompt tokens */
    double prefill_s, decode_s;  /* time in steps that carried prompt tokens / only decode tokens */
} gen_stats_t;

struct medusa;

int gen_run(model_t *m, kv_cache_t *kv, gen_request_t *reqs, int n_reqs, gen_token_fn on_token, void *user,
            gen_stats_t *stats, fl_error_t *err);
/* gen_run with Medusa heads for the scheduler's speculation (NULL: none; stay the caller's). */
int gen_run_with_heads(model_t *m, kv_cache_t *kv, struct medusa *heads, gen_request_t *reqs, int n_reqs,
                       gen_token_fn on_token, void *user, gen_stats_t *stats, fl_error_t *err);

const char *gen_finish_name(gen_finish_t f);

#endif
