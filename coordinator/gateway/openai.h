/* openai.h - the OpenAI API's JSON on one side, folio's Generate on the other: request bodies of
 * POST /v1/chat/completions and /v1/completions parsed and checked into folio's parameters
 * (oai_request.c), and the responses, stream chunks, errors and model lists written back
 * (oai_response.c). Pure functions over cJSON: no sockets, no threads, so the unit tests drive
 * them directly.
 *
 * Errors carry what the HTTP answer needs: a status, OpenAI's error `type` and `code`, the
 * offending field as `param`, and a message naming the field and what was wrong with it. */
#ifndef FOLIO_GW_OPENAI_H
#define FOLIO_GW_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "folio_client.h"

#define OAI_MAX_PROMPTS 128 /* prompts in one /v1/completions batch */

typedef enum { OAI_CHAT, OAI_COMPLETION } oai_kind_t;

typedef struct oai_error {
    int http_status;  /* 400, 401, 404, 413, 429, 500, 503, 504 ... */
    const char *type; /* invalid_request_error, rate_limit_error, server_error, ... */
    const char *code; /* NULL or e.g. "model_not_found", "context_length_exceeded" */
    char param[64];   /* "" when no one field is at fault */
    char message[512];
    int retry_after_s; /* > 0: the Retry-After header (429) */
} oai_error_t;

/* One prompt of a batch: text, or token ids. */
typedef struct oai_prompt {
    const char *text; /* borrowed from the parsed JSON, or NULL */
    int32_t *tokens;  /* owned */
    int n_tokens;
} oai_prompt_t;

typedef struct oai_request {
    oai_kind_t kind;
    const char *model; /* NULL: not given (any model the cluster serves) */
    /* chat: the messages (strings borrowed or in owned) */
    folio_chat_message_t *messages;
    int n_messages;
    /* completions: one prompt, or several (a batch: one choice each, `index` = the prompt's) */
    oai_prompt_t *prompts;
    int n_prompts;
    int max_tokens;                     /* 0: the endpoint's default (16 for completions, the context for chat) */
    Folio__V1__SamplingParams sampling; /* fields with presence as the request set them */
    Folio__V1__LogitBias *bias, **bias_ptrs;
    const char **stop; /* borrowed strings */
    int n_stop;
    bool stream, include_usage;
    bool ignore_eos;       /* extension (vLLM's name) */
    bool return_token_ids; /* extension (vLLM's name): each choice's token ids in `token_ids` */
    uint32_t timeout_ms;   /* extension: the request's deadline; 0 none */
    const char *user;      /* accepted, not interpreted */
    /* Constrained output (GenerateRequest.choices/regex/json_schema): from response_format
     * (json_object, json_schema) or the guided_choice / guided_regex / guided_json extensions
     * (vLLM's names); at most one. Strings borrowed from json or owned. */
    const char **choices;
    int n_choices;
    const char *regex;
    const char *json_schema;
    /* what the parse allocated */
    void *json; /* the cJSON tree the borrowed strings point into */
    char **owned;
    int n_owned;
} oai_request_t;

/* Parses and checks body (len bytes, not necessarily NUL-terminated). 0 with out filled (free it
 * with oai_request_free), or -1 with err set (400, the field named in param). The value ranges of
 * sampling fields are folio_sampling_check's, the coordinator's own. */
int oai_request_parse(oai_kind_t kind, const char *body, size_t len, oai_request_t *out, oai_error_t *err);
void oai_request_free(oai_request_t *r);

/* The generation parameters of prompt i of r (pointers into r): what the client library sends. */
void oai_request_params(const oai_request_t *r, int i, const char *tenant, folio_generate_params_t *p);

/* ---- errors ---- */

/* Sets e (status, type, code, param ""): message printf-style. Returns -1 for `return oai_fail(...)`. */
int oai_fail(oai_error_t *e, int http_status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The answer to a FINAL with a non-OK status (folio's StatusCode, gRPC's numbers): INVALID_ARGUMENT
 * 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429 with Retry-After (400 context_length_exceeded when
 * retry_after_ms is 0: it never fits), DEADLINE_EXCEEDED 504, UNAVAILABLE 503, CANCELLED 499,
 * anything else 500. */
void oai_error_from_status(int code, uint32_t retry_after_ms, const char *message, oai_error_t *e);
/* {"error": {"message", "type", "param", "code"}}, malloc'd. */
char *oai_error_json(const oai_error_t *e);

/* ---- responses ---- */

/* Token text for logprobs: writes the token's bytes to buf (at most cap) and returns their count,
 * or -1 when unknown. NULL everywhere below: tokens are written "token_id:<id>" (vLLM's spelling). */
typedef int (*oai_token_text_fn)(void *ctx, int32_t id, char *buf, size_t cap);

typedef struct oai_writer {
    const oai_request_t *rq;
    const char *id;    /* "chatcmpl-..." / "cmpl-..." */
    long long created; /* unix seconds */
    const char *model; /* as the response names it */
    oai_token_text_fn token_text;
    void *token_ctx;
} oai_writer_t;

/* One choice as it is (whole) or as it grows (a chunk's delta). */
typedef struct oai_choice {
    int index;
    const char *text;
    const int32_t *tokens;
    int n_tokens;
    Folio__V1__TokenLogprobs *const *logprobs; /* one per token, or NULL */
    int n_logprobs;
    size_t text_offset; /* completions' logprobs: bytes of text before this one */
    int finish_reason;  /* Folio__V1__FinishReason; FINISH_NONE in a chunk that does not end it */
} oai_choice_t;

typedef struct oai_usage {
    uint64_t prompt_tokens, cached_tokens, completion_tokens;
} oai_usage_t;

/* OpenAI's spelling of a finish reason: "stop", "length", "abort" (cancelled), "error"; NULL for
 * FINISH_NONE (JSON null). */
const char *oai_finish_reason(int finish_reason);

/* The whole (non-streamed) response: chat.completion or text_completion, malloc'd. */
char *oai_response_json(const oai_writer_t *w, const oai_choice_t *choices, int n, const oai_usage_t *usage);
/* One stream chunk's JSON (no "data: " framing): a delta of one choice, with its finish_reason
 * when it ends it. role: chat's opening chunk ({"role": "assistant", "content": ""}). usage: with
 * stream_options.include_usage, the last chunk (choices []) carries it and the others "usage": null. */
char *oai_chunk_json(const oai_writer_t *w, const oai_choice_t *c, bool role);
char *oai_usage_chunk_json(const oai_writer_t *w, const oai_usage_t *usage);

/* The model name a client uses for a group's model_id ("tiny.gguf:123456" -> "tiny"), into out. */
void oai_model_name(const char *model_id, char *out, size_t cap);
/* Whether asked names model_id: its name, its file name or the whole model_id. */
bool oai_model_matches(const char *asked, const char *model_id);
/* GET /v1/models: every distinct model the groups serve, malloc'd. */
char *oai_models_json(const Folio__V1__StatusReply *s, long long created);
/* GET /v1/models/{name}: the model's object, or NULL when no group serves it. */
char *oai_model_json(const Folio__V1__StatusReply *s, const char *name, long long created);

#endif
