/* generate.c - gen_run() as a thin client of the scheduler (worker/scheduler.c), so one batching loop
 * exists: every request is submitted up front and the scheduler steps until all are done. The
 * prefix cache is off, so prefill figures measure computation, and a request that does not fit
 * alongside the others is preempted and recomputed rather than failed. */
#include "generate.h"

#include <stdio.h>
#include <string.h>

#include "clock.h"
#include "scheduler.h"

const char *gen_finish_name(gen_finish_t f)
{
    switch (f) {
    case GEN_FINISH_STOP: return "stop";
    case GEN_FINISH_LENGTH: return "length";
    case GEN_FINISH_ERROR: return "error";
    default: return "none";
    }
}

typedef struct gen_ctx {
    gen_request_t *reqs;
    gen_token_fn on_token;
    void *user;
} gen_ctx_t;

static bool gen_on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    gen_ctx_t *c = user;
    gen_request_t *r = &c->reqs[id];
    r->tokens[index] = token;
    r->n_tokens = index + 1;
    return c->on_token && c->on_token(c->user, (int)id, index, token, lp);
}

static void gen_on_finish(void *user, const sched_result_t *res)
{
    gen_ctx_t *c = user;
    gen_request_t *r = &c->reqs[res->id];
    switch (res->finish) {
    case SCHED_FINISH_STOP: r->finish = GEN_FINISH_STOP; break;
    case SCHED_FINISH_LENGTH: r->finish = GEN_FINISH_LENGTH; break;
    default: /* an engine error, or cancelled because gen_run is failing */
        r->finish = GEN_FINISH_ERROR;
        snprintf(r->error, sizeof r->error, "%s", res->error[0] ? res->error : sched_finish_name(res->finish));
    }
    r->t_first_token = res->t_first_token;
    r->t_done = res->t_done;
    r->n_drafted = res->n_drafted;
    r->n_accepted = res->n_accepted;
}

static void finish(gen_request_t *r, gen_finish_t f)
{
    r->finish = f;
    r->t_done = fl_clock_s();
}

int gen_run(model_t *m, kv_cache_t *kv, gen_request_t *reqs, int n_reqs, gen_token_fn on_token, void *user,
            gen_stats_t *stats, fl_error_t *err)
{
    return gen_run_with_heads(m, kv, NULL, reqs, n_reqs, on_token, user, stats, err);
}

int gen_run_with_heads(model_t *m, kv_cache_t *kv, struct medusa *heads, gen_request_t *reqs, int n_reqs,
                       gen_token_fn on_token, void *user, gen_stats_t *stats, fl_error_t *err)
{
    gen_ctx_t ctx = {.reqs = reqs, .on_token = on_token, .user = user};
    const sched_callbacks_t cb = {.on_token = gen_on_token, .on_finish = gen_on_finish, .user = &ctx};
    const sched_opts_t opts = {.no_prefix_cache = true, .max_waiting = n_reqs > 0 ? n_reqs : 1, .medusa = heads};
    const int max_pos = m->max_blocks * kv->block_size;
    sched_t *s = sched_new(m, kv, &opts, &cb, err);
    if (!s) return err ? err->code : FL_ENOMEM;
    int rc = FL_OK;
    const double t0 = fl_clock_s();
    for (int i = 0; i < n_reqs; i++) {
        gen_request_t *r = &reqs[i];
        r->n_tokens = r->n_drafted = r->n_accepted = 0;
        r->finish = GEN_FINISH_NONE;
        r->error[0] = 0;
        r->t_submit = t0;
        r->t_first_token = r->t_done = 0;
        if (r->req.n_prompt <= 0) {
            snprintf(r->error, sizeof r->error, "empty prompt: nothing to generate from");
            finish(r, GEN_FINISH_ERROR);
            continue;
        }
        if (r->req.n_prompt >= max_pos) {
            snprintf(r->error, sizeof r->error, "prompt of %d tokens does not fit the context of %d", r->req.n_prompt,
                     max_pos);
            finish(r, GEN_FINISH_ERROR);
            continue;
        }
        if (r->req.max_tokens <= 0) {
            finish(r, GEN_FINISH_LENGTH);
            continue;
        }
        sched_request_t sr = r->req;
        sr.id = (uint64_t)i;
        fl_error_t serr = {0};
        const int src = sched_submit(s, &sr, &serr);
        if (src == FL_ERANGE) { /* this request alone exceeds the KV cache: its error, not the run's */
            snprintf(r->error, sizeof r->error, "KV cache exhausted: %.200s", serr.msg);
            finish(r, GEN_FINISH_ERROR);
        } else if (src) {
            rc = fl_fail(err, src, "%s", serr.msg);
            goto out;
        }
    }
    while (sched_has_work(s))
        if ((rc = sched_step(s, err))) goto out;
out:
    if (stats) {
        sched_stats_t st;
        sched_get_stats(s, &st);
        stats->steps += (int)st.steps;
        stats->prompt_tokens += (long)st.prefill_tokens;
        stats->decode_tokens += (long)st.generated_tokens;
        stats->decode_step_tokens += (long)st.decode_step_tokens;
        stats->prefill_s += st.prefill_s;
        stats->decode_s += st.decode_s;
    }
    sched_destroy(&s);
    return rc;
}
