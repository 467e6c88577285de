/* folio_client.h - libfolio-client: talk to a folio coordinator from C.
 *
 * One folio_client_t is one ZeroMQ DEALER connection to the coordinator's client endpoint. Requests
 * are sent without waiting (many may be in flight); folio_client_recv() returns the next response
 * of any of them: zero or more partial token deltas, then exactly one final message per request.
 * folio_client_generate() and the other blocking calls wrap that for one request at a time.
 *
 * Link with -lfolio-client (or the static folio_client_static inside the build). The framing is
 * documented in proto/README.md; this library is one implementation of it.
 *
 * Threading: a client belongs to one thread at a time. */
#ifndef FOLIO_CLIENT_H
#define FOLIO_CLIENT_H

#include <stdbool.h>
#include <stdint.h>

#include "error.h"
#include "folio.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct folio_client folio_client_t;

typedef struct folio_chat_message {
    const char *role; /* system | user | assistant */
    const char *content;
} folio_chat_message_t;

typedef struct folio_generate_params {
    /* Exactly one prompt form. */
    const char *text;
    const folio_chat_message_t *messages;
    int n_messages;
    const int32_t *tokens;
    int n_tokens;
    bool plain_text;         /* text only: special-token markers in it stay plain text */
    int max_tokens;          /* 0: the server's default (16) */
    /* Sampling, sent with presence: a zeroed struct asks for greedy decoding. */
    float temperature;       /* 0: greedy */
    int top_k;               /* 0: off */
    float top_p;             /* 0 (or 1): off */
    uint64_t seed;
    /* Non-NULL: sent as is (each field with its own presence; unset ones take the server's
     * defaults), and the four fields above are ignored. Borrowed for the call. */
    const Folio__V1__SamplingParams *sampling;
    const char *const *stop; /* stop strings */
    int n_stop;
    const int32_t *stop_ids;
    int n_stop_ids;
    bool stream;             /* deltas as tokens are made; else one final message */
    bool ignore_eos;
    const char *tenant;      /* NULL: the default tenant */
    uint32_t timeout_ms;     /* 0: no deadline */
    int spec;                /* Folio__V1__SpecMode: 0 (AUTO) lets the worker choose */
    uint32_t max_draft;      /* draft tokens verified per step, at most 16; 0: the worker's default */
    /* Constrained output, at most one (proto/README.md): one of n_choices strings, a regular
     * expression, or a JSON Schema's text. */
    const char *const *choices;
    int n_choices;
    const char *regex;
    const char *json_schema;
    /* The old failover rule (proto/README.md, "Failover rule"): a group lost after the first token
     * reached us ends the request UNAVAILABLE, rather than the stream going on on another group. */
    bool no_migrate;
} folio_generate_params_t;

/* One response as received. */
typedef struct folio_event {
    uint64_t id;
    bool final;
    int status;              /* Folio__V1__StatusCode, on final events */
    const char *message;     /* status message, "" when none */
    /* Generate deltas (partial events, and the final one when stream was false) */
    uint32_t index;          /* completion index of tokens[0] */
    const int32_t *tokens;
    int n_tokens;
    const char *text;        /* UTF-8 text the tokens complete */
    /* one per token when the request asked for them (SamplingParams.logprobs), else 0 */
    Folio__V1__TokenLogprobs *const *logprobs;
    int n_logprobs;
    /* Generate final */
    int finish_reason;       /* Folio__V1__FinishReason */
    uint32_t prompt_tokens, cached_prompt_tokens, completion_tokens;
    uint32_t drafted_tokens, accepted_tokens; /* speculative decoding (Usage) */
    double queued_s, first_token_s, total_s;
    const char *group;
    /* the decoded message; every pointer above points into it */
    Folio__V1__Response *raw;
} folio_event_t;

/* endpoint NULL: $FOLIO_COORDINATOR, else tcp://127.0.0.1:5555. CURVE keys as in
 * folio_client_opts_t with no files named (from the environment, else none). */
folio_client_t *folio_client_new(const char *endpoint, fl_error_t *err);

typedef struct folio_client_opts {
    const char *endpoint;        /* NULL: as folio_client_new's */
    /* CURVE encryption (README.md, "Security"): this client's secret key file and the coordinator's
     * public key file (folioctl keygen writes both kinds). NULL: $FOLIO_CURVE_SECRET and
     * $FOLIO_COORDINATOR_KEY; with neither file the link is plaintext. A coordinator that refuses the
     * key (or a key that is not the coordinator's) answers nothing: calls time out. */
    const char *curve_secret;
    const char *coordinator_key;
} folio_client_opts_t;
folio_client_t *folio_client_new_opts(const folio_client_opts_t *o, fl_error_t *err);
void folio_client_destroy(folio_client_t **cp);

/* Asynchronous use. Ids are assigned by the client, increasing from 1. */
int folio_client_send_generate(folio_client_t *c, const folio_generate_params_t *p, uint64_t *id, fl_error_t *err);
int folio_client_send_cancel(folio_client_t *c, uint64_t target_id, fl_error_t *err);
/* Waits up to timeout_ms (-1: forever) for the next response. Returns 1 with ev filled (release
 * it with folio_event_clear), 0 on timeout, or a negative FL_E* code. */
int folio_client_recv(folio_client_t *c, folio_event_t *ev, int timeout_ms, fl_error_t *err);
void folio_event_clear(folio_event_t *ev);

/* Blocking Generate: calls on_delta (may be NULL) for each delta that carries tokens or text, as
 * it arrives, and fills out. on_delta returns what to do next (FOLIO_CANCEL is 1, so a callback may
 * return true to stop):
 *   FOLIO_CONTINUE  go on;
 *   FOLIO_CANCEL    send a Cancel (once) and go on reading until the final, so out still ends with
 *                   exactly one final status (CANCELLED, or how the request ended first);
 *   FOLIO_ABANDON   send a Cancel if none went out yet and return FL_EIO at once, without the final.
 * When a signal interrupts the wait, on_delta is also called with an empty event of the request's
 * id (no tokens, text ""), so a caller's signal handler can set a flag the callback turns into
 * FOLIO_CANCEL; without on_delta an interrupted wait returns FL_EIO with errno EINTR.
 * Returns 0 when a final message arrived (out->status says how it ended), FL_EIO on transport
 * failure, when nothing arrives for timeout_ms (-1: forever), when the coordinator restarted or
 * stopped answering Health probes, or when the final does not come within
 * FOLIO_CLIENT_CANCEL_WAIT_MS of a Cancel; FL_EFORMAT when the stream's token indices have a gap or
 * a repeat (a Cancel is sent). On an error out holds what arrived before it; clear it either way. */
enum { FOLIO_CONTINUE = 0, FOLIO_CANCEL = 1, FOLIO_ABANDON = 2 };
#define FOLIO_CLIENT_CANCEL_WAIT_MS 5000
typedef int (*folio_delta_fn)(void *user, const folio_event_t *delta);
#define FOLIO_MAX_TOP_LOGPROBS 20
typedef struct folio_logprob {
    int32_t token;
    float logprob;
} folio_logprob_t;
typedef struct folio_token_logprobs {
    folio_logprob_t chosen;
    folio_logprob_t top[FOLIO_MAX_TOP_LOGPROBS]; /* the best alternatives, best first */
    int n_top;
} folio_token_logprobs_t;
typedef struct folio_result {
    uint64_t id;             /* the request's id */
    int32_t *tokens;         /* malloc'd, every token in index order */
    int n_tokens;
    char *text;              /* malloc'd */
    folio_token_logprobs_t *logprobs; /* malloc'd, one per token when asked for, else NULL */
    int n_logprobs;
    int status;
    char message[256];
    int finish_reason;
    uint32_t prompt_tokens, cached_prompt_tokens, completion_tokens;
    uint32_t drafted_tokens, accepted_tokens; /* speculative decoding (Usage) */
    double queued_s, first_token_s, total_s;
    char group[64];
} folio_result_t;
int folio_client_generate(folio_client_t *c, const folio_generate_params_t *p, folio_delta_fn on_delta, void *user,
                          int timeout_ms, folio_result_t *out, fl_error_t *err);
void folio_result_clear(folio_result_t *r);

/* Unary methods. *reply (free with folio__v1__response__free_unpacked(r, NULL)) is the final
 * Response; a non-OK status is returned as FL_EINVAL etc. with the status message in err. */
int folio_client_status(folio_client_t *c, int timeout_ms, Folio__V1__Response **reply, fl_error_t *err);
int folio_client_health(folio_client_t *c, int timeout_ms, Folio__V1__Response **reply, fl_error_t *err);
int folio_client_drain(folio_client_t *c, const char *group, bool undrain, int timeout_ms, fl_error_t *err);

/* The underlying ZeroMQ socket, for tests that send hand-made frames. */
void *folio_client_socket(folio_client_t *c);

#ifdef __cplusplus
}
#endif

#endif
