/* worker_stream.c - what the worker sends for each Generate: token deltas, stop strings, the FINAL.
 *
 * Each live request has a slot from a fixed pool (sized to everything the scheduler can hold, so it
 * never grows), found by the coordinator's request id through an open-addressing map. The
 * scheduler's on_token callback pushes each token through an incremental UTF-8 decoder
 * (tok_stream) and appends the bytes to the request's unsent text; streaming requests are put on a
 * flush list, and after sched_step() returns worker_flush_partials() sends one PARTIAL per request
 * with everything that step produced. on_finish sends the one FINAL.
 *
 * Stop strings: the text is searched for them as it grows. Trailing bytes that could be the start
 * of a stop string are held back from PARTIALs (they come later, or never). When one matches, the
 * text is cut where it begins and the request stops. The token that completed the match is not
 * part of the output: it is sent in no delta and not counted in usage.completion_tokens, exactly as
 * an end-of-generation token (the text before the stop string, which may include the start of that
 * token's bytes, is kept). Tokens whose text was held back and then cut stay in the output: they
 * were generated before the stop and may already have been streamed.
 *
 * Threading: the loop's thread only (the callbacks run inside sched_step/sched_cancel). */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "worker.h"

#define TEXT_KEEP_BYTES (64u << 10) /* a slot keeps buffers up to this size for its next request */

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
    w->map = malloc((size_t)cap * sizeof *w->map);
    w->hb_ids = malloc((size_t)n_slots * sizeof *w->hb_ids);
    w->map_mask = cap - 1;
    w->scratch_cap = (w->tok ? tok_max_token_len(w->tok) * 3 : 0) + 64;
    w->scratch = malloc(w->scratch_cap);
    if (!w->reqs || !w->free_slots || !w->dirty || !w->map || !w->scratch || !w->hb_ids)
        return fl_fail(err, FL_ENOMEM, "worker: out of memory for %d request slots", n_slots);
    for (uint32_t i = 0; i < cap; i++) w->map[i] = -1;
    for (int i = 0; i < n_slots; i++) w->free_slots[i] = n_slots - 1 - i;
    w->n_free = n_slots;
    w->n_dirty = 0;
    return FL_OK;
}

void worker_reqs_free(worker_t *w)
{
    for (int i = 0; w->reqs && i < w->n_reqs; i++) {
        free(w->reqs[i].toks);
        free(w->reqs[i].text);
        free(w->reqs[i].stop_buf);
    }
    free(w->reqs);
    free(w->free_slots);
    free(w->dirty);
    free(w->map);
    free(w->scratch);
    free(w->hb_ids);
    w->hb_ids = NULL;
    w->reqs = NULL;
    w->free_slots = w->dirty = w->map = NULL;
    w->scratch = NULL;
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

static bool reserve_text(worker_req_t *r, size_t extra)
{
    if (r->n_text + extra + 1 <= r->cap_text) return true;
    size_t cap = r->cap_text ? r->cap_text : 256;
    while (cap < r->n_text + extra + 1) cap *= 2;
    char *p = realloc(r->text, cap);
    if (!p) return false;
    r->text = p;
    r->cap_text = cap;
    return true;
}

static bool reserve_toks(worker_req_t *r, int extra)
{
    if (r->n_toks + extra <= r->cap_toks) return true;
    int cap = r->cap_toks ? r->cap_toks : 16;
    while (cap < r->n_toks + extra) cap *= 2;
    int32_t *p = realloc(r->toks, (size_t)cap * sizeof *p);
    if (!p) return false;
    r->toks = p;
    r->cap_toks = cap;
    return true;
}

worker_req_t *worker_req_open(worker_t *w, uint64_t id, bool stream, char *const *stops, size_t n_stops,
                              fl_error_t *err)
{
    if (w->n_free == 0) {
        fl_fail(err, FL_ERANGE, "worker: %d requests live, no room for more", w->n_reqs);
        return NULL;
    }
    const int slot = w->free_slots[w->n_free - 1];
    worker_req_t *r = &w->reqs[slot];
    size_t bytes = 0;
    for (size_t i = 0; i < n_stops; i++) bytes += strlen(stops[i]) + 1;
    r->stop_buf = NULL;
    if (n_stops) {
        /* One allocation: the pointers, the lengths, then the strings. */
        r->stop_buf = malloc(n_stops * (sizeof(char *) + sizeof(size_t)) + bytes);
        if (!r->stop_buf) {
            fl_fail(err, FL_ENOMEM, "worker: out of memory for %zu stop strings", n_stops);
            return NULL;
        }
    }
    if (!reserve_text(r, 0)) {
        free(r->stop_buf);
        r->stop_buf = NULL;
        fl_fail(err, FL_ENOMEM, "worker: out of memory");
        return NULL;
    }
    w->n_free--;
    r->stops = (const char **)(void *)r->stop_buf;
    r->stop_lens = r->stop_buf ? (size_t *)(void *)(r->stop_buf + n_stops * sizeof(char *)) : NULL;
    char *p = r->stop_buf ? r->stop_buf + n_stops * (sizeof(char *) + sizeof(size_t)) : NULL;
    r->n_stops = (int)n_stops;
    r->max_stop = 0;
    for (size_t i = 0; i < n_stops; i++) {
        const size_t len = strlen(stops[i]);
        memcpy(p, stops[i], len + 1);
        r->stops[i] = p;
        r->stop_lens[i] = len;
        if (len > r->max_stop) r->max_stop = len;
        p += len + 1;
    }
    r->id = id;
    r->live = true;
    r->stream = stream;
    r->stopped = false;
    r->dirty = false;
    r->n_out = r->n_sent = r->n_toks = 0;
    r->n_text = 0;
    r->text[0] = 0;
    tok_stream_init(&r->ts, false);
    uint32_t h = id_hash(id) & w->map_mask;
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
    free(r->stop_buf);
    r->stop_buf = NULL;
    r->stops = NULL;
    r->stop_lens = NULL;
    r->n_stops = 0;
    if (r->cap_text > TEXT_KEEP_BYTES) { /* a long non-streamed answer: do not keep its buffer */
        free(r->text);
        r->text = NULL;
        r->cap_text = 0;
    }
    if ((size_t)r->cap_toks * sizeof *r->toks > TEXT_KEEP_BYTES) {
        free(r->toks);
        r->toks = NULL;
        r->cap_toks = 0;
    }
    w->free_slots[w->n_free++] = (int32_t)(r - w->reqs);
}

/* --- stop strings ---------------------------------------------------------------------------- */

long worker_find_stop(const worker_req_t *r, const char *text, size_t n, size_t from)
{
    long best = -1;
    for (int i = 0; i < r->n_stops; i++) {
        const size_t len = r->stop_lens[i];
        if (len == 0 || from > n || n - from < len) continue;
        const char *p = memmem(text + from, n - from, r->stops[i], len);
        if (p && (best < 0 || p - text < best)) best = p - text;
    }
    return best;
}

size_t worker_stop_holdback(const worker_req_t *r, const char *text, size_t n)
{
    size_t hold = 0;
    for (int i = 0; i < r->n_stops; i++) {
        const char *s = r->stops[i];
        const size_t len = r->stop_lens[i];
        if (len == 0) continue;
        for (size_t k = (len - 1 < n ? len - 1 : n); k > hold; k--)
            if (text[n - k] == s[0] && !memcmp(text + n - k, s, k)) {
                hold = k;
                break;
            }
    }
    return hold;
}

/* Appends decoded bytes and looks for a stop string among them; true when one matched (the text
 * is then cut before it). */
static bool append_text(worker_req_t *r, const char *bytes, int n)
{
    if (n <= 0 || r->stopped) return false;
    /* protobuf-c sends strings up to their first NUL, so a generated U+0000 would cut the text:
     * it is sent as U+FFFD (the token ids still carry the exact output; proto/README.md). */
    size_t n_nul = 0;
    for (int i = 0; i < n; i++) n_nul += bytes[i] == 0;
    if (!reserve_text(r, (size_t)n + 2 * n_nul)) {
        fl_log_error("worker id=%llu: out of memory for %d bytes of text (dropped)", (unsigned long long)r->id, n);
        return false;
    }
    const size_t old = r->n_text;
    for (int i = 0; i < n; i++) {
        if (bytes[i])
            r->text[r->n_text++] = bytes[i];
        else {
            memcpy(r->text + r->n_text, "\xEF\xBF\xBD", 3);
            r->n_text += 3;
        }
    }
    r->text[r->n_text] = 0;
    if (!r->n_stops) return false;
    /* A match not found before ends in the new bytes, so it starts at most max_stop - 1 bytes back. */
    const size_t from = old >= r->max_stop ? old - (r->max_stop - 1) : 0;
    const long at = worker_find_stop(r, r->text, r->n_text, from);
    if (at < 0) return false;
    r->n_text = (size_t)at;
    r->text[r->n_text] = 0;
    r->stopped = true;
    return true;
}

/* --- scheduler callbacks --------------------------------------------------------------------- */

bool worker_on_token(void *user, uint64_t id, int index, int32_t token)
{
    worker_t *w = user;
    worker_req_t *r = worker_req_find(w, id);
    if (!r) {
        fl_log_error("worker: token for unknown request id=%llu", (unsigned long long)id);
        return false;
    }
    if (r->stopped) return true;
    if (index != r->n_out)
        fl_log_error("worker id=%llu: token index %d, expected %d", (unsigned long long)id, index, r->n_out);
    int n = tok_stream_push(&r->ts, w->tok, token, w->scratch, w->scratch_cap);
    if (n < 0) {
        fl_log_error("worker id=%llu: cannot decode token %d (%s)", (unsigned long long)id, token, fl_strerror(n));
        n = 0;
    }
    if (append_text(r, w->scratch, n)) return true; /* the stop-string token is not output */
    if (!reserve_toks(r, 1)) {
        /* Losing a token would leave a gap in the indices: end the request instead. */
        fl_log_error("worker id=%llu: out of memory for tokens, cancelling", (unsigned long long)id);
        sched_cancel(w->sched, id);
        return false;
    }
    r->toks[r->n_toks++] = token;
    r->n_out++;
    if (r->stream && !r->dirty) {
        r->dirty = true;
        w->dirty[w->n_dirty++] = (int32_t)(r - w->reqs);
    }
    return false;
}

static void delta_init(Folio__V1__TokenDelta *d, const worker_req_t *r)
{
    folio__v1__token_delta__init(d);
    d->index = (uint32_t)r->n_sent;
    d->n_tokens = (size_t)r->n_toks;
    d->tokens = r->toks;
    d->text = r->text; /* NUL-terminated at the length to send */
}

static void flush_one(worker_t *w, worker_req_t *r)
{
    const size_t hold = r->stopped ? 0 : worker_stop_holdback(r, r->text, r->n_text);
    const size_t n_send = r->n_text - hold;
    if (r->n_toks == 0 && n_send == 0) return;
    const char kept = r->text[n_send];
    r->text[n_send] = 0;
    Folio__V1__TokenDelta d;
    delta_init(&d, r);
    Folio__V1__Response resp;
    wire_response_init(&resp, r->id, FOLIO__V1__METHOD__METHOD_GENERATE, false);
    resp.delta = &d;
    const int rc = worker_send(w, WIRE_CMD_PARTIAL, &resp.base);
    r->text[n_send] = kept;
    if (rc) return; /* kept: the next PARTIAL or the FINAL carries it, so no index is lost */
    r->n_sent += r->n_toks;
    r->n_toks = 0;
    memmove(r->text, r->text + n_send, hold + 1);
    r->n_text = hold;
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

void worker_on_finish(void *user, const sched_result_t *res)
{
    worker_t *w = user;
    worker_req_t *r = worker_req_find(w, res->id);
    if (!r) {
        fl_log_error("worker: finish for unknown request id=%llu", (unsigned long long)res->id);
        return;
    }
    if (!r->stopped && w->tok) {
        const int n = tok_stream_flush(&r->ts, w->scratch, w->scratch_cap);
        append_text(r, w->scratch, n);
    }

    Folio__V1__Status status = FOLIO__V1__STATUS__INIT;
    Folio__V1__GenerateResult result = FOLIO__V1__GENERATE_RESULT__INIT;
    Folio__V1__Usage usage = FOLIO__V1__USAGE__INIT;
    Folio__V1__Timings timings = FOLIO__V1__TIMINGS__INIT;
    status.message = "";
    switch (res->finish) {
    case SCHED_FINISH_STOP:
    case SCHED_FINISH_LENGTH:
        result.finish_reason = (res->finish == SCHED_FINISH_STOP || r->stopped)
                                   ? FOLIO__V1__FINISH_REASON__FINISH_STOP
                                   : FOLIO__V1__FINISH_REASON__FINISH_LENGTH;
        status.code = FOLIO__V1__STATUS_CODE__OK;
        break;
    case SCHED_FINISH_CANCELLED:
        result.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
        status.code = FOLIO__V1__STATUS_CODE__CANCELLED;
        status.message = "cancelled";
        break;
    case SCHED_FINISH_DEADLINE:
        result.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
        status.code = FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED;
        status.message = "deadline exceeded";
        break;
    default:
        result.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_ERROR;
        status.code = FOLIO__V1__STATUS_CODE__INTERNAL;
        status.message = (char *)(res->error[0] ? res->error : "engine error");
        break;
    }
    usage.prompt_tokens = (uint32_t)res->n_prompt;
    usage.cached_prompt_tokens = (uint32_t)res->n_cached;
    usage.completion_tokens = (uint32_t)r->n_out;
    timings.queued_s = since(res->t_scheduled, res->t_submit);
    timings.first_token_s = since(res->t_first_token, res->t_submit);
    timings.total_s = since(res->t_done, res->t_submit);
    result.usage = &usage;
    result.timings = &timings;
    result.group = (char *)w->group;

    Folio__V1__TokenDelta d;
    delta_init(&d, r);
    Folio__V1__Response resp;
    wire_response_init(&resp, r->id, FOLIO__V1__METHOD__METHOD_GENERATE, true);
    resp.status = &status;
    resp.result = &result;
    /* Streamed: whatever is left (nothing held back now); not streamed: everything (n_sent is 0). */
    if (!r->stream || r->n_toks > 0 || r->n_text > 0) resp.delta = &d;
    const int rc = worker_send(w, WIRE_CMD_FINAL, &resp.base);
    fl_log_debug("worker final id=%llu finish=%s status=%s prompt=%d cached=%d completion=%d total_s=%.3f%s",
                 (unsigned long long)r->id, sched_finish_name(res->finish), wire_status_name(status.code),
                 res->n_prompt, res->n_cached, r->n_out, timings.total_s, rc ? " (not sent)" : "");
    worker_req_close(w, r);
}
