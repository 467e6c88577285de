/* request.c - see request.h. */
#define _GNU_SOURCE /* memmem */
#include "request.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"

#define KEEP_BYTES (64u << 10) /* a closed stream keeps buffers up to this size for its next use */

/* --- defaults -------------------------------------------------------------------------------- */

void request_defaults_init(request_defaults_t *d, const gguf_t *g)
{
    *d = (request_defaults_t){.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
                              .repetition_penalty = 1.0f, .repetition_last_n = 64,
                              .source = "llama-cli's defaults"};
    if (!g) return;
    bool any = false;
    float f;
    uint32_t u;
    fl_error_t ignored = {0};
    /* A key of the wrong type or out of range is ignored: the model's advice, not a requirement. */
    if (!gguf_get_f32(g, "general.sampling.temp", &f, &ignored) && f >= 0 && isfinite(f)) d->temperature = f, any = true;
    if (!gguf_get_u32(g, "general.sampling.top_k", &u, &ignored) && u <= INT_MAX) d->top_k = (int)u, any = true;
    if (!gguf_get_f32(g, "general.sampling.top_p", &f, &ignored) && f > 0 && f <= 1) d->top_p = f, any = true;
    if (!gguf_get_f32(g, "general.sampling.min_p", &f, &ignored) && f >= 0 && f <= 1) d->min_p = f, any = true;
    if (!gguf_get_f32(g, "general.sampling.penalty_repeat", &f, &ignored) && f > 0 && isfinite(f))
        d->repetition_penalty = f, any = true;
    if (!gguf_get_u32(g, "general.sampling.penalty_last_n", &u, &ignored) && u <= INT_MAX)
        d->repetition_last_n = (int)u, any = true;
    if (any) d->source = "the model's general.sampling.* metadata, llama-cli's defaults for the rest";
}

void request_defaults_describe(const request_defaults_t *d, char *buf, size_t cap)
{
    snprintf(buf, cap, "temperature %g, top-k %d, top-p %g, min-p %g, repetition penalty %g over %d tokens (%s)",
             (double)d->temperature, d->top_k, (double)d->top_p, (double)d->min_p, (double)d->repetition_penalty,
             d->repetition_last_n, d->source);
}

/* --- resolving a request --------------------------------------------------------------------- */

_Static_assert(FOLIO_MAX_DRAFT == SCHED_MAX_DRAFT, "GenerateRequest.max_draft's bound is the scheduler's");

sched_spec_t request_spec_mode(Folio__V1__SpecMode m)
{
    switch (m) {
    case FOLIO__V1__SPEC_MODE__SPEC_NONE: return SCHED_SPEC_NONE;
    case FOLIO__V1__SPEC_MODE__SPEC_NGRAM: return SCHED_SPEC_NGRAM;
    case FOLIO__V1__SPEC_MODE__SPEC_MEDUSA: return SCHED_SPEC_MEDUSA;
    default: return SCHED_SPEC_AUTO;
    }
}

static int cmp_bias(const void *a, const void *b)
{
    const int32_t x = ((const kern_logit_adjust_t *)a)->token, y = ((const kern_logit_adjust_t *)b)->token;
    return (x > y) - (x < y);
}

static int check_ids(const int32_t *ids, size_t n, int32_t n_vocab, const char *field, fl_error_t *err)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= n_vocab)
            return fl_fail(err, FL_EINVAL, "%s[%zu] = %d is outside the vocabulary of %d", field, i, ids[i], n_vocab);
    return FL_OK;
}

static int resolve_bias(request_t *r, const Folio__V1__SamplingParams *s, fl_error_t *err)
{
    if (s->n_logit_bias == 0) return FL_OK;
    r->bias = malloc(s->n_logit_bias * sizeof *r->bias);
    if (!r->bias) return fl_fail(err, FL_ENOMEM, "out of memory for %zu logit biases", s->n_logit_bias);
    int n = 0;
    for (size_t i = 0; i < s->n_logit_bias; i++) {
        const Folio__V1__LogitBias *b = s->logit_bias[i];
        if (b->bias == 0) continue;
        /* -100 bans the token, as in the OpenAI API: no finite bias can guarantee that. */
        r->bias[n++] = (kern_logit_adjust_t){.token = b->token, .penalty = 1.0f,
                                             .add = b->bias <= -100 ? -INFINITY : b->bias};
    }
    qsort(r->bias, (size_t)n, sizeof *r->bias, cmp_bias);
    for (int i = 1; i < n; i++)
        if (r->bias[i].token == r->bias[i - 1].token)
            return fl_fail(err, FL_EINVAL, "SamplingParams.logit_bias names token %d twice", r->bias[i].token);
    r->sched.penalties.bias = r->bias;
    r->sched.penalties.n_bias = n;
    return FL_OK;
}

static int resolve_sampling(request_t *r, const Folio__V1__SamplingParams *s, const request_defaults_t *d,
                            int32_t n_vocab, fl_error_t *err)
{
    static const Folio__V1__SamplingParams unset = FOLIO__V1__SAMPLING_PARAMS__INIT;
    if (!s) s = &unset;
    char msg[200];
    if (!folio_sampling_check(s, n_vocab, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    kern_sampling_t *k = &r->sched.sampling;
    sched_penalties_t *p = &r->sched.penalties;
    k->temperature = FOLIO_SAMPLING_HAS(s, temperature) ? s->temperature : d->temperature;
    k->top_k = FOLIO_SAMPLING_HAS(s, top_k) ? (s->top_k > INT_MAX ? INT_MAX : (int)s->top_k) : d->top_k;
    k->top_p = FOLIO_SAMPLING_HAS(s, top_p) ? s->top_p : d->top_p;
    k->min_p = FOLIO_SAMPLING_HAS(s, min_p) ? s->min_p : d->min_p;
    k->seed = s->seed;
    p->repetition = FOLIO_SAMPLING_HAS(s, repetition_penalty) ? s->repetition_penalty : d->repetition_penalty;
    p->repetition_last_n = FOLIO_SAMPLING_HAS(s, repetition_last_n) ? (s->repetition_last_n > INT_MAX ? INT_MAX : (int)s->repetition_last_n)
                                                    : d->repetition_last_n;
    p->presence = FOLIO_SAMPLING_HAS(s, presence_penalty) ? s->presence_penalty : 0;
    p->frequency = FOLIO_SAMPLING_HAS(s, frequency_penalty) ? s->frequency_penalty : 0;
    r->sched.logprobs = s->logprobs;
    r->sched.top_logprobs = (int)s->top_logprobs;
    return resolve_bias(r, s, err);
}

int request_resolve(request_t *r, uint64_t id, const Folio__V1__GenerateRequest *g, const char *tenant,
                    uint32_t timeout_ms, const request_defaults_t *d, int32_t n_vocab, fl_error_t *err)
{
    memset(r, 0, sizeof *r);
    if (!g) return fl_fail(err, FL_EINVAL, "Generate needs a GenerateRequest");
    if (g->n_prompt_tokens == 0)
        return fl_fail(err, FL_EINVAL, "GenerateRequest.prompt_tokens is empty (the coordinator tokenizes text and messages)");
    if (g->n_prompt_tokens > INT_MAX)
        return fl_fail(err, FL_EINVAL, "GenerateRequest has %zu prompt tokens", g->n_prompt_tokens);
    int rc = check_ids(g->prompt_tokens, g->n_prompt_tokens, n_vocab, "prompt_tokens", err);
    if (!rc) rc = check_ids(g->stop_token_ids, g->n_stop_token_ids, n_vocab, "stop_token_ids", err);
    if (!rc) rc = check_ids(g->resume_tokens, g->n_resume_tokens, n_vocab, "resume_tokens", err);
    if (rc) return rc;
    char msg[200];
    if (!folio_stops_check(g->stop, g->n_stop, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    if (!folio_spec_check(g, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    if (!folio_constraint_check(g, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    sched_request_t *q = &r->sched;
    q->id = id;
    q->prompt = g->prompt_tokens;
    q->n_prompt = (int)g->n_prompt_tokens;
    q->max_tokens = g->max_tokens == 0 ? FOLIO_DEFAULT_MAX_TOKENS : g->max_tokens > INT_MAX ? INT_MAX : (int)g->max_tokens;
    if (g->n_resume_tokens > (size_t)q->max_tokens)
        return fl_fail(err, FL_EINVAL, "GenerateRequest has %zu resume_tokens, more than its max_tokens %d",
                       g->n_resume_tokens, q->max_tokens);
    if (g->resume_text_bytes && !g->n_resume_tokens)
        return fl_fail(err, FL_EINVAL, "GenerateRequest.resume_text_bytes is %llu without resume_tokens",
                       (unsigned long long)g->resume_text_bytes);
    q->resume = g->resume_tokens;
    q->n_resume = (int)g->n_resume_tokens;
    r->resume_text_bytes = g->resume_text_bytes;
    q->stop_ids = g->stop_token_ids;
    q->n_stop_ids = (int)g->n_stop_token_ids;
    q->ignore_eog = g->ignore_eos;
    q->salt = block_hash_salt(tenant ? tenant : "", tenant ? strlen(tenant) : 0);
    q->deadline = timeout_ms ? fl_clock_s() + timeout_ms * 1e-3 : 0;
    q->spec = request_spec_mode(g->spec);
    q->max_draft = (int)g->max_draft;
    /* borrowed from g, which outlives the submission that compiles it */
    if (g->n_choices > 0)
        q->constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_CHOICE, .choices = (const char *const *)g->choices,
                                             .n_choices = (int)g->n_choices};
    else if (g->regex && *g->regex)
        q->constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_REGEX, .text = g->regex};
    else if (g->json_schema && *g->json_schema)
        q->constraint = (sched_constraint_t){.kind = FL_CONSTRAINT_JSON_SCHEMA, .text = g->json_schema};
    r->stream = g->stream;
    r->stops = g->stop;
    r->n_stops = g->n_stop;
    rc = resolve_sampling(r, g->sampling, d, n_vocab, err);
    if (rc) request_release(r);
    return rc;
}

void request_release(request_t *r)
{
    free(r->bias);
    r->bias = NULL;
    r->sched.penalties.bias = NULL;
    r->sched.penalties.n_bias = 0;
}

/* --- the output stream ----------------------------------------------------------------------- */

static bool reserve_text(request_stream_t *s, size_t extra)
{
    if (s->n_text + extra + 1 <= s->cap_text) return true;
    size_t cap = s->cap_text ? s->cap_text : 256;
    while (cap < s->n_text + extra + 1) cap *= 2;
    char *p = realloc(s->text, cap);
    if (!p) return false;
    s->text = p;
    s->cap_text = cap;
    return true;
}

static bool reserve_toks(request_stream_t *s, int extra)
{
    const int need = s->n_toks + extra;
    if (need > s->cap_toks) {
        int cap = s->cap_toks ? s->cap_toks : 16;
        while (cap < need) cap *= 2;
        int32_t *t = realloc(s->toks, (size_t)cap * sizeof *t);
        if (!t) return false;
        s->toks = t;
        s->cap_toks = cap;
    }
    if (s->logprobs && need > s->cap_lps) {
        sched_logprobs_t *l = realloc(s->lps, (size_t)s->cap_toks * sizeof *l);
        if (!l) return false;
        s->lps = l;
        s->cap_lps = s->cap_toks;
    }
    return true;
}

int request_stream_open(request_stream_t *s, const tok_t *tok, char *const *stops, size_t n_stops, bool logprobs,
                        fl_error_t *err)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n_stops; i++) bytes += strlen(stops[i]) + 1;
    const size_t scratch = (tok ? tok_max_token_len(tok) * 3 : 0) + 64;
    if (s->scratch_cap < scratch) {
        char *p = realloc(s->scratch, scratch);
        if (!p) return fl_fail(err, FL_ENOMEM, "out of memory for the output stream");
        s->scratch = p;
        s->scratch_cap = scratch;
    }
    free(s->stop_buf);
    s->stop_buf = NULL;
    if (n_stops && !(s->stop_buf = malloc(n_stops * (sizeof(char *) + sizeof(size_t)) + bytes)))
        return fl_fail(err, FL_ENOMEM, "out of memory for %zu stop strings", n_stops);
    s->n_text = 0;
    if (!reserve_text(s, 0)) return fl_fail(err, FL_ENOMEM, "out of memory for the output stream");
    s->stops = (const char **)(void *)s->stop_buf;
    s->stop_lens = s->stop_buf ? (size_t *)(void *)(s->stop_buf + n_stops * sizeof(char *)) : NULL;
    char *p = s->stop_buf ? s->stop_buf + n_stops * (sizeof(char *) + sizeof(size_t)) : NULL;
    s->n_stops = (int)n_stops;
    s->max_stop = 0;
    for (size_t i = 0; i < n_stops; i++) {
        const size_t len = strlen(stops[i]);
        memcpy(p, stops[i], len + 1);
        s->stops[i] = p;
        s->stop_lens[i] = len;
        if (len > s->max_stop) s->max_stop = len;
        p += len + 1;
    }
    s->tok = tok;
    s->logprobs = logprobs;
    s->stopped = false;
    s->n_out = s->n_sent = s->n_toks = 0;
    s->text[0] = 0;
    s->peek_len = 0;
    tok_stream_init(&s->utf8, false);
    return FL_OK;
}

void request_stream_close(request_stream_t *s)
{
    free(s->stop_buf);
    s->stop_buf = NULL;
    s->stops = NULL;
    s->stop_lens = NULL;
    s->n_stops = 0;
    if (s->cap_text > KEEP_BYTES) { /* a long non-streamed answer: do not keep its buffer */
        free(s->text);
        s->text = NULL;
        s->cap_text = 0;
    }
    if ((size_t)s->cap_toks * sizeof *s->toks > KEEP_BYTES) {
        free(s->toks);
        s->toks = NULL;
        s->cap_toks = 0;
    }
    if ((size_t)s->cap_lps * sizeof *s->lps > KEEP_BYTES) {
        free(s->lps);
        s->lps = NULL;
        s->cap_lps = 0;
    }
}

void request_stream_free(request_stream_t *s)
{
    free(s->stop_buf);
    free(s->text);
    free(s->toks);
    free(s->lps);
    free(s->scratch);
    memset(s, 0, sizeof *s);
}

long request_find_stop(const request_stream_t *s, const char *text, size_t n, size_t from)
{
    long best = -1;
    for (int i = 0; i < s->n_stops; i++) {
        const size_t len = s->stop_lens[i];
        if (len == 0 || from > n || n - from < len) continue;
        const char *p = memmem(text + from, n - from, s->stops[i], len);
        if (p && (best < 0 || p - text < best)) best = p - text;
    }
    return best;
}

size_t request_stop_holdback(const request_stream_t *s, const char *text, size_t n)
{
    size_t hold = 0;
    for (int i = 0; i < s->n_stops; i++) {
        const char *stop = s->stops[i];
        const size_t len = s->stop_lens[i];
        if (len == 0) continue;
        for (size_t k = (len - 1 < n ? len - 1 : n); k > hold; k--)
            if (text[n - k] == stop[0] && !memcmp(text + n - k, stop, k)) {
                hold = k;
                break;
            }
    }
    return hold;
}

/* Appends decoded bytes and looks for a stop string among them: 1 when one matched (the text is
 * then cut before it), 0, or FL_ENOMEM. */
static int append_text(request_stream_t *s, const char *bytes, int n)
{
    if (n <= 0 || s->stopped) return 0;
    /* protobuf-c sends strings up to their first NUL, so a generated U+0000 would cut the text:
     * it is sent as U+FFFD (the token ids still carry the exact output; proto/README.md). */
    size_t n_nul = 0;
    for (int i = 0; i < n; i++) n_nul += bytes[i] == 0;
    if (!reserve_text(s, (size_t)n + 2 * n_nul)) return FL_ENOMEM;
    const size_t old = s->n_text;
    for (int i = 0; i < n; i++) {
        if (bytes[i])
            s->text[s->n_text++] = bytes[i];
        else {
            memcpy(s->text + s->n_text, "\xEF\xBF\xBD", 3);
            s->n_text += 3;
        }
    }
    s->text[s->n_text] = 0;
    if (!s->n_stops) return 0;
    /* A match not found before ends in the new bytes, so it starts at most max_stop - 1 bytes back. */
    const size_t from = old >= s->max_stop ? old - (s->max_stop - 1) : 0;
    const long at = request_find_stop(s, s->text, s->n_text, from);
    if (at < 0) return 0;
    s->n_text = (size_t)at;
    s->text[s->n_text] = 0;
    s->stopped = true;
    return 1;
}

int request_stream_push(request_stream_t *s, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)index; /* the scheduler reports indices in order; n_out is the stream's own count */
    if (s->stopped) return 0;
    if (!reserve_toks(s, 1)) return FL_ENOMEM;
    if (s->tok) {
        int n = tok_stream_push(&s->utf8, s->tok, token, s->scratch, s->scratch_cap);
        if (n < 0) n = 0; /* an id the tokenizer cannot decode adds no text; the id is still sent */
        const int rc = append_text(s, s->scratch, n);
        if (rc) return rc; /* 1: the stop-string token is not output */
    }
    s->toks[s->n_toks] = token;
    if (s->logprobs) {
        if (lp) s->lps[s->n_toks] = *lp;
        else memset(&s->lps[s->n_toks], 0, sizeof s->lps[s->n_toks]);
    }
    s->n_toks++;
    s->n_out++;
    return 0;
}

int request_stream_resume(request_stream_t *s, const int32_t *tokens, int n, uint64_t text_sent, fl_error_t *err)
{
    for (int i = 0; i < n; i++) {
        const int rc = request_stream_push(s, s->n_out, tokens[i], NULL);
        if (rc < 0) return fl_fail(err, rc, "out of memory replaying %d resumed tokens", n);
        if (rc == 1)
            return fl_fail(err, FL_EINVAL, "resume_tokens[%d] completes a stop string: it cannot have been sent", i);
    }
    if (text_sent > s->n_text)
        return fl_fail(err, FL_EINVAL, "resume_text_bytes is %llu but the %d resumed tokens make %zu bytes of text",
                       (unsigned long long)text_sent, n, s->n_text);
    /* Everything replayed was sent, but for the text the client does not have yet: held back as a
     * possible stop string, or never handed out because the stream ended before (it is resent). */
    s->n_sent = s->n_out;
    s->n_toks = 0;
    memmove(s->text, s->text + text_sent, s->n_text - text_sent + 1);
    s->n_text -= text_sent;
    return FL_OK;
}

void request_stream_end(request_stream_t *s)
{
    if (s->stopped || !s->tok) return;
    const int n = tok_stream_flush(&s->utf8, s->scratch, s->scratch_cap);
    append_text(s, s->scratch, n); /* out of memory: the held bytes are dropped, the tokens kept */
}

bool request_stream_peek(request_stream_t *s, bool final, request_delta_t *d)
{
    const size_t hold = (final || s->stopped) ? 0 : request_stop_holdback(s, s->text, s->n_text);
    const size_t n_send = s->n_text - hold;
    *d = (request_delta_t){.index = (uint32_t)s->n_sent, .tokens = s->toks, .n_tokens = s->n_toks,
                           .logprobs = s->logprobs ? s->lps : NULL, .text = s->text, .n_text = n_send};
    s->peek_len = n_send;
    s->peek_kept = s->text[n_send];
    s->text[n_send] = 0;
    return s->n_toks > 0 || n_send > 0;
}

void request_stream_done(request_stream_t *s, bool sent)
{
    s->text[s->peek_len] = s->peek_kept;
    if (!sent) return;
    s->n_sent += s->n_toks;
    s->n_toks = 0;
    memmove(s->text, s->text + s->peek_len, s->n_text - s->peek_len + 1);
    s->n_text -= s->peek_len;
    s->peek_len = 0;
}

void request_final_status(sched_finish_t f, bool stopped, const char *error, Folio__V1__FinishReason *reason,
                          Folio__V1__StatusCode *code, const char **message)
{
    switch (f) {
    case SCHED_FINISH_STOP:
    case SCHED_FINISH_LENGTH:
        *reason = (f == SCHED_FINISH_STOP || stopped) ? FOLIO__V1__FINISH_REASON__FINISH_STOP
                                                      : FOLIO__V1__FINISH_REASON__FINISH_LENGTH;
        *code = FOLIO__V1__STATUS_CODE__OK;
        *message = "";
        break;
    case SCHED_FINISH_CANCELLED:
        *reason = FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
        *code = FOLIO__V1__STATUS_CODE__CANCELLED;
        *message = "cancelled";
        break;
    case SCHED_FINISH_DEADLINE:
        *reason = FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
        *code = FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED;
        *message = "deadline exceeded";
        break;
    default:
        *reason = FOLIO__V1__FINISH_REASON__FINISH_ERROR;
        *code = FOLIO__V1__STATUS_CODE__INTERNAL;
        *message = error && error[0] ? error : "engine error";
        break;
    }
}
