/* fuzz_oai_request.c - libFuzzer target for the HTTP gateway's OpenAI request parser and response
 * writers (coordinator/gateway/oai_request.c, oai_response.c) on untrusted request bodies.
 *
 * Input: one flag byte (bit 0: /v1/chat/completions, else /v1/completions; bits 1-7 pick the
 * bytes the token-text callback returns, see below), then the body exactly as an HTTP client sent
 * it (not NUL-terminated: an exact-size heap copy, so ASan catches any read past it).
 * Invariants: no crash, leak or over-read; a refusal has a 4xx/5xx status, a type and a message,
 * and its error JSON parses; an accepted request is within folio's rules (prompts or messages
 * present and non-empty, token ids >= 0, at most OAI_MAX_PROMPTS prompts, the sampling fields
 * and stop strings pass the coordinator's own checks, at most one constraint, include_usage only
 * with stream), its Generate parameters can be formed for every prompt, and the responses written
 * for it (whole, a chunk with and without the role, the usage chunk) are valid JSON even when the
 * prompt's text and the tokens' bytes are arbitrary (invalid UTF-8, NULs, control characters). */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "folio_fields.h"
#include "openai.h"

static const uint8_t *g_tok_bytes;
static size_t g_tok_len;

/* A token's text: a window of the input's bytes (any bytes at all), or unknown (-1) for some ids. */
static int token_text(void *ctx, int32_t id, char *buf, size_t cap)
{
    (void)ctx;
    if (id % 7 == 3 || !g_tok_len) return -1;
    const size_t at = (size_t)(uint32_t)id % g_tok_len;
    size_t n = g_tok_len - at < 9 ? g_tok_len - at : 9;
    if (n > cap) n = cap;
    memcpy(buf, g_tok_bytes + at, n);
    return (int)n;
}

static void must_be_json(char *s)
{
    if (!s) abort();
    cJSON *j = cJSON_Parse(s);
    if (!j) abort();
    cJSON_Delete(j);
    free(s);
}

static void check_error(const oai_error_t *e)
{
    if (e->http_status < 400 || e->http_status > 599 || !e->type || !e->message[0]) abort();
    if (!memchr(e->message, 0, sizeof e->message) || !memchr(e->param, 0, sizeof e->param)) abort();
    must_be_json(oai_error_json(e));
}

static void check_accepted(const oai_request_t *r)
{
    char msg[256];
    if (r->kind == OAI_CHAT) {
        if (r->n_messages < 1 || !r->messages) abort();
        for (int i = 0; i < r->n_messages; i++) {
            if (!r->messages[i].role || !r->messages[i].content) abort();
            (void)strlen(r->messages[i].content);
        }
    } else {
        if (r->n_prompts < 1 || r->n_prompts > OAI_MAX_PROMPTS) abort();
        for (int i = 0; i < r->n_prompts; i++) {
            const oai_prompt_t *p = &r->prompts[i];
            if (!!p->text == !!p->tokens) abort(); /* exactly one form */
            if (p->text && !p->text[0]) abort();
            if (p->tokens && p->n_tokens < 1) abort();
            for (int k = 0; k < p->n_tokens; k++)
                if (p->tokens[k] < 0) abort();
        }
    }
    if (r->max_tokens < 0) abort();
    if (!folio_sampling_check(&r->sampling, 0, msg, sizeof msg)) abort();
    if (r->n_stop < 0 || r->n_stop > FOLIO_MAX_STOPS) abort();
    if (r->n_stop && !folio_stops_check((char *const *)r->stop, (size_t)r->n_stop, msg, sizeof msg)) abort();
    if ((r->n_choices > 0) + !!r->regex + !!r->json_schema > 1) abort();
    for (int i = 0; i < r->n_choices; i++)
        if (!r->choices[i]) abort();
    if (r->include_usage && !r->stream) abort();
    const int n = r->kind == OAI_CHAT ? 1 : r->n_prompts;
    for (int i = 0; i < n; i++) {
        folio_generate_params_t p;
        oai_request_params(r, i, "tenant", &p);
        if (p.sampling != &r->sampling || p.n_stop != r->n_stop) abort();
    }
}

/* The answers written for an accepted request: its own prompt as the output text, its token ids
 * (or a few) as the output tokens, with logprobs when it asked for them. */
static void write_responses(const oai_request_t *r)
{
    const char *text = r->kind == OAI_CHAT ? r->messages[r->n_messages - 1].content
                       : r->prompts[0].text ? r->prompts[0].text
                                            : "";
    static const int32_t some[4] = {3, 10, 11, 1 << 30};
    const int32_t *tokens = some;
    int n_tokens = 4;
    if (r->kind == OAI_COMPLETION && r->prompts[0].tokens) {
        tokens = r->prompts[0].tokens;
        n_tokens = r->prompts[0].n_tokens < 64 ? r->prompts[0].n_tokens : 64;
    }
    Folio__V1__TokenLogprob chosen[64], top[64][2];
    Folio__V1__TokenLogprob *top_ptrs[64][2];
    Folio__V1__TokenLogprobs lps[64], *lp_ptrs[64];
    for (int i = 0; i < n_tokens; i++) {
        folio__v1__token_logprob__init(&chosen[i]);
        chosen[i].token = tokens[i];
        chosen[i].logprob = -0.5f * (float)i;
        folio__v1__token_logprobs__init(&lps[i]);
        lps[i].chosen = &chosen[i];
        for (int k = 0; k < 2; k++) {
            folio__v1__token_logprob__init(&top[i][k]);
            top[i][k].token = tokens[i] + k;
            top[i][k].logprob = -1.0f - (float)k;
            top_ptrs[i][k] = &top[i][k];
        }
        lps[i].n_top = r->sampling.top_logprobs < 2 ? r->sampling.top_logprobs : 2;
        lps[i].top = top_ptrs[i];
        lp_ptrs[i] = &lps[i];
    }
    oai_writer_t w = {.rq = r, .id = "cmpl-fuzz", .created = 1, .model = r->model ? r->model : "tiny",
                      .token_text = token_text};
    oai_choice_t c = {.index = 0, .text = text, .tokens = tokens, .n_tokens = n_tokens,
                      .logprobs = r->sampling.logprobs ? lp_ptrs : NULL,
                      .n_logprobs = r->sampling.logprobs ? n_tokens : 0,
                      .finish_reason = FOLIO__V1__FINISH_REASON__FINISH_LENGTH};
    oai_usage_t u = {.prompt_tokens = 5, .cached_tokens = 2, .completion_tokens = (uint64_t)n_tokens};
    must_be_json(oai_response_json(&w, &c, 1, &u));
    must_be_json(oai_chunk_json(&w, &c, true));
    c.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_NONE;
    must_be_json(oai_chunk_json(&w, &c, false));
    if (r->include_usage) must_be_json(oai_usage_chunk_json(&w, &u));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    const oai_kind_t kind = data[0] & 1 ? OAI_CHAT : OAI_COMPLETION;
    const size_t len = size - 1;
    char *body = malloc(len ? len : 1);
    if (!body) return 0;
    memcpy(body, data + 1, len);
    /* The token bytes: the body's tail from an offset the flag byte picks. */
    const size_t off = len ? (size_t)(data[0] >> 1) % len : 0;
    g_tok_bytes = (const uint8_t *)body + off;
    g_tok_len = len - off;
    oai_request_t r;
    oai_error_t e;
    memset(&e, 0, sizeof e);
    const int rc = oai_request_parse(kind, body, len, &r, &e);
    if (rc == 0) {
        check_accepted(&r);
        write_responses(&r);
        oai_request_free(&r);
    } else if (rc == -1) {
        check_error(&e);
    } else {
        abort();
    }
    free(body);
    return 0;
}
