/* worker_stream.c - what the worker sends for each Generate: PARTIALs of its output stream, the FINAL.
 *
 * Each live request has a slot from a fixed pool (sized to everything the scheduler can hold, so it
 * never grows), found by the coordinator's request id through an open-addressing map. A slot holds
 * the request's output stream (request.h: incremental text, stop strings and held-back text,
 * log-probabilities); the scheduler's on_token callback pushes each token into it, streaming
 * requests are put on a flush list, and after sched_step() returns worker_flush_partials() sends
 * one PARTIAL per request with everything that step produced. on_finish sends the one FINAL. A
 * stop string's last token is not output: it is in no delta and not counted in
 * usage.completion_tokens, exactly as an end-of-generation token. A request the coordinator moved
 * here mid-stream (resume_tokens) has its stream replayed first, so its deltas continue the
 * client's stream and its usage counts the whole completion.
 *
 * Threading: the loop's thread only (the callbacks run inside sched_step/sched_cancel). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "worker.h"

/* --- the slot pool and id map ---------------------------------------------------------------- */

static uint32_t id_hash(uint64_t id)
{
    return (uint32_t)((id * 0x9E3779B97F4A7C15ull) >> 32);
}

int worker_reqs_init(worker_t *w, int n_slots, fl_error_t *err)
{
    uint32_t cap = 16;
    while (cap < (uint32_t)n_slots * 2) cap <<= 1;
    w->n_reqs = n_slots;
    w->reqs = calloc((size_t)n_slots, sizeof *w->reqs);
    w->free_slots = malloc((size_t)n_slots * sizeof *w->free_slots);
    w->dirty = malloc((size_t)n_slots * sizeof *w->dirty);
    w->pending = malloc((size_t)n_slots * sizeof *w->pending);
    w->map = malloc((size_t)cap * sizeof *w->map);
    w->hb_ids = malloc((size_t)n_slots * sizeof *w->hb_ids);
    w->map_mask = cap - 1;
    if (!w->reqs || !w->free_slots || !w->dirty || !w->pending || !w->map || !w->hb_ids)
        return fl_fail(err, FL_ENOMEM, "worker: out of memory for %d request slots", n_slots);
    for (uint32_t i = 0; i < cap; i++) w->map[i] = -1;
    for (int i = 0; i < n_slots; i++) w->free_slots[i] = n_slots - 1 - i;
    w->n_free = n_slots;
    w->n_dirty = w->n_pending = 0;
    return FL_OK;
}

void worker_reqs_free(worker_t *w)
{
    for (int i = 0; w->reqs && i < w->n_reqs; i++) request_stream_free(&w->reqs[i].out);
    free(w->reqs);
    free(w->free_slots);
    free(w->dirty);
    free(w->pending);
    w->pending = NULL;
    free(w->map);
    free(w->hb_ids);
    w->hb_ids = NULL;
    w->reqs = NULL;
    w->free_slots = w->dirty = w->map = NULL;
}

worker_req_t *worker_req_find(worker_t *w, uint64_t id)
{
    for (uint32_t h = id_hash(id) & w->map_mask;; h = (h + 1) & w->map_mask) {
        const int32_t s = w->map[h];
        if (s < 0) return NULL;
        if (w->reqs[s].id == id) return &w->reqs[s];
    }
}

static void map_remove(worker_t *w, uint64_t id)
{
    uint32_t h = id_hash(id) & w->map_mask;
    while (w->map[h] >= 0 && w->reqs[w->map[h]].id != id) h = (h + 1) & w->map_mask;
    if (w->map[h] < 0) return;
    /* Backward-shift deletion: move later entries of the probe run into the hole. */
    uint32_t hole = h;
    for (uint32_t j = (h + 1) & w->map_mask; w->map[j] >= 0; j = (j + 1) & w->map_mask) {
        const uint32_t home = id_hash(w->reqs[w->map[j]].id) & w->map_mask;
        /* Entry j may fill the hole when its home is not cyclically within (hole, j]. */
        if (((j - home) & w->map_mask) >= ((j - hole) & w->map_mask)) {
            w->map[hole] = w->map[j];
            hole = j;
        }
    }
    w->map[hole] = -1;
}

worker_req_t *worker_req_open(worker_t *w, const request_t *rq, fl_error_t *err)
{
    if (w->n_free == 0) {
        fl_fail(err, FL_EBUSY, "worker: %d requests live, no room for more", w->n_reqs);
        return NULL;
    }
    const int slot = w->free_slots[w->n_free - 1];
    worker_req_t *r = &w->reqs[slot];
    if (request_stream_open(&r->out, w->tok, rq->stops, rq->n_stops, rq->sched.logprobs, err)) return NULL;
    /* A request moved here mid-stream: its stream goes on from where the client's is. */
    if (rq->sched.n_resume > 0 &&
        request_stream_resume(&r->out, rq->sched.resume, rq->sched.n_resume, rq->resume_text_bytes, err))
        return NULL;
    w->n_free--;
    r->id = rq->sched.id;
    r->live = true;
    r->stream = rq->stream;
    r->dirty = false;
    r->final_pending = false;
    uint32_t h = id_hash(r->id) & w->map_mask;
    while (w->map[h] >= 0) h = (h + 1) & w->map_mask;
    w->map[h] = slot;
    return r;
}

void worker_req_close(worker_t *w, worker_req_t *r)
{
    if (!r || !r->live) return;
    map_remove(w, r->id);
    r->live = false;
    r->dirty = false;
    request_stream_close(&r->out);
    w->free_slots[w->n_free++] = (int32_t)(r - w->reqs);
}

/* --- scheduler callbacks --------------------------------------------------------------------- */

bool worker_on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    worker_t *w = user;
    worker_req_t *r = worker_req_find(w, id);
    if (!r) {
        fl_log_error("worker: token for unknown request id=%llu", (unsigned long long)id);
        return false;
    }
    if (index != r->out.n_out && !r->out.stopped)
        fl_log_error("worker id=%llu: token index %d, expected %d", (unsigned long long)id, index, r->out.n_out);
    const int rc = request_stream_push(&r->out, index, token, lp);
    if (rc == 1) return true; /* a stop string matched */
    if (rc < 0) {
        /* Losing a token would leave a gap in the indices: end the request instead. */
        fl_log_error("worker id=%llu: out of memory for its output, cancelling", (unsigned long long)id);
        sched_cancel(w->sched, id);
        return false;
    }
    if (r->stream && !r->dirty) {
        r->dirty = true;
        w->dirty[w->n_dirty++] = (int32_t)(r - w->reqs);
    }
    return false;
}

/* TokenDelta.logprobs for a delta: one allocation holding every message, freed after the send. */
static void *logprobs_fill(Folio__V1__TokenDelta *d, const request_delta_t *rd)
{
    if (!rd->logprobs || rd->n_tokens == 0) return NULL;
    size_t n_top = 0;
    for (int i = 0; i < rd->n_tokens; i++) n_top += (size_t)rd->logprobs[i].n_top;
    const size_t n = (size_t)rd->n_tokens;
    char *mem = malloc(n * (sizeof(Folio__V1__TokenLogprobs *) + sizeof(Folio__V1__TokenLogprobs) +
                            sizeof(Folio__V1__TokenLogprob)) +
                       n_top * (sizeof(Folio__V1__TokenLogprob *) + sizeof(Folio__V1__TokenLogprob)));
    if (!mem) {
        fl_log_error("worker: out of memory for log-probabilities (sent without them)");
        return NULL;
    }
    Folio__V1__TokenLogprobs **list = (void *)mem;
    Folio__V1__TokenLogprobs *entries = (void *)(list + n);
    Folio__V1__TokenLogprob *chosen = (void *)(entries + n);
    Folio__V1__TokenLogprob **top_ptrs = (void *)(chosen + n);
    Folio__V1__TokenLogprob *tops = (void *)(top_ptrs + n_top);
    for (int i = 0; i < rd->n_tokens; i++) {
        const sched_logprobs_t *l = &rd->logprobs[i];
        folio__v1__token_logprobs__init(&entries[i]);
        folio__v1__token_logprob__init(&chosen[i]);
        chosen[i].token = l->chosen.token;
        chosen[i].logprob = l->chosen.logprob;
        entries[i].chosen = &chosen[i];
        entries[i].n_top = (size_t)l->n_top;
        entries[i].top = top_ptrs;
        for (int k = 0; k < l->n_top; k++) {
            folio__v1__token_logprob__init(tops);
            tops->token = l->top[k].token;
            tops->logprob = l->top[k].logprob;
            *top_ptrs++ = tops++;
        }
        list[i] = &entries[i];
    }
    d->n_logprobs = n;
    d->logprobs = list;
    return mem;
}

/* The TokenDelta of what the stream may send now; *lp_mem to free after sending. */
static bool delta_fill(Folio__V1__TokenDelta *d, worker_req_t *r, bool final, void **lp_mem)
{
    request_delta_t rd;
    const bool any = request_stream_peek(&r->out, final, &rd);
    folio__v1__token_delta__init(d);
    d->index = rd.index;
    d->n_tokens = (size_t)rd.n_tokens;
    d->tokens = (int32_t *)rd.tokens;
    d->text = (char *)rd.text;
    *lp_mem = logprobs_fill(d, &rd);
    return any;
}

static void flush_one(worker_t *w, worker_req_t *r)
{
    Folio__V1__TokenDelta d;
    void *lp_mem;
    if (!delta_fill(&d, r, false, &lp_mem)) {
        request_stream_done(&r->out, false);
        return;
    }
    Folio__V1__Response resp;
    wire_response_init(&resp, r->id, FOLIO__V1__METHOD__METHOD_GENERATE, false);
    resp.delta = &d;
    const int rc = worker_send(w, WIRE_CMD_PARTIAL, &resp.base);
    free(lp_mem);
    /* Not sent: kept, the next PARTIAL or the FINAL carries it, so no index is lost. */
    request_stream_done(&r->out, rc == 0);
}

void worker_flush_partials(worker_t *w)
{
    for (int i = 0; i < w->n_dirty; i++) {
        worker_req_t *r = &w->reqs[w->dirty[i]];
        if (!r->live || !r->dirty) continue; /* finished in this step: its FINAL carried everything */
        r->dirty = false;
        flush_one(w, r);
    }
    w->n_dirty = 0;
}

static double since(double t, double t0)
{
    return t > 0 && t >= t0 ? t - t0 : 0;
}

/* The FINAL of r, which ended as res: 0 when the socket took it, 1 when its queue was full (try
 * again), -1 when it could not go (no coordinator). */
static int send_final(worker_t *w, worker_req_t *r, const sched_result_t *res)
{
    Folio__V1__Status status = FOLIO__V1__STATUS__INIT;
    Folio__V1__GenerateResult result = FOLIO__V1__GENERATE_RESULT__INIT;
    Folio__V1__Usage usage = FOLIO__V1__USAGE__INIT;
    Folio__V1__Timings timings = FOLIO__V1__TIMINGS__INIT;
    const char *message;
    request_final_status(res->finish, r->out.stopped, res->error, &result.finish_reason, &status.code, &message);
    status.message = (char *)message;
    usage.prompt_tokens = (uint32_t)res->n_prompt;
    usage.cached_prompt_tokens = (uint32_t)res->n_cached;
    usage.completion_tokens = (uint32_t)r->out.n_out;
    usage.drafted_tokens = (uint32_t)res->n_drafted;
    usage.accepted_tokens = (uint32_t)res->n_accepted;
    timings.queued_s = since(res->t_scheduled, res->t_submit);
    timings.first_token_s = since(res->t_first_token, res->t_submit);
    timings.total_s = since(res->t_done, res->t_submit);
    result.usage = &usage;
    result.timings = &timings;
    result.group = (char *)w->group;

    Folio__V1__TokenDelta d;
    void *lp_mem;
    const bool any = delta_fill(&d, r, true, &lp_mem);
    Folio__V1__Response resp;
    wire_response_init(&resp, r->id, FOLIO__V1__METHOD__METHOD_GENERATE, true);
    resp.status = &status;
    resp.result = &result;
    /* Streamed: whatever is left (nothing held back now); not streamed: everything (n_sent is 0). */
    if (!r->stream || any) resp.delta = &d;
    const int rc = worker_send(w, WIRE_CMD_FINAL, &resp.base);
    const bool full = rc && errno == EAGAIN;
    free(lp_mem);
    request_stream_done(&r->out, rc == 0);
    fl_log_debug("worker final id=%llu finish=%s status=%s prompt=%d cached=%d completion=%d total_s=%.3f%s",
                 (unsigned long long)r->id, sched_finish_name(res->finish), wire_status_name(status.code),
                 res->n_prompt, res->n_cached, r->out.n_out, timings.total_s, rc ? " (not sent)" : "");
    return rc == 0 ? 0 : full ? 1 : -1;
}

void worker_on_finish(void *user, const sched_result_t *res)
{
    worker_t *w = user;
    worker_req_t *r = worker_req_find(w, res->id);
    if (!r) {
        fl_log_error("worker: finish for unknown request id=%llu", (unsigned long long)res->id);
        return;
    }
    request_stream_end(&r->out);
    if (send_final(w, r, res) == 1) {
        /* The queue is full: the FINAL waits (the loop steps no more until it is gone). */
        r->res = *res;
        r->final_pending = true;
        w->pending[w->n_pending++] = (int32_t)(r - w->reqs);
        return;
    }
    worker_req_close(w, r);
}

bool worker_retry_finals(worker_t *w)
{
    int kept = 0;
    for (int i = 0; i < w->n_pending; i++) {
        worker_req_t *r = &w->reqs[w->pending[i]];
        if (send_final(w, r, &r->res) == 1) {
            w->pending[kept++] = w->pending[i];
            continue;
        }
        worker_req_close(w, r);
    }
    w->n_pending = kept;
    return kept == 0;
}

void worker_drop_finals(worker_t *w)
{
    for (int i = 0; i < w->n_pending; i++) worker_req_close(w, &w->reqs[w->pending[i]]);
    w->n_pending = 0;
}
