/* request.h - what one Generate request means, and what its client receives, decided in one place.
 *
 * request_resolve() turns a GenerateRequest (from the coordinator, or built by folioctl from its
 * flags) into the scheduler's request with every default, limit and rule applied: sampling fields
 * left unset take the model's defaults (request_defaults_init), values out of range are refused
 * with a message naming the field, max_tokens 0 means FOLIO_DEFAULT_MAX_TOKENS, spec and max_draft
 * become the scheduler's speculation mode and draft bound (0: the scheduler's default). The worker,
 * `folioctl run/chat --local` and the benchmarks all go through it, so they cannot disagree.
 *
 * request_stream_t turns the generated tokens into the output stream: incremental UTF-8 text, stop
 * strings (the text ends where one begins; bytes that could begin one are held back from deltas),
 * per-token log-probabilities, the count of completion tokens and the finish reason. Its state
 * (tokens counted and sent, held-back text, the UTF-8 decoder's pending bytes, whether a stop
 * string matched) is all a stream needs to continue elsewhere.
 *
 * Threading: a request_t or request_stream_t belongs to one thread. */
#ifndef FOLIO_REQUEST_H
#define FOLIO_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "folio_fields.h"
#include "gguf.h"
#include "scheduler.h"
#include "tokenizer.h"


/* The sampling a request gets for each field it leaves unset. */
typedef struct request_defaults {
    float temperature, top_p, min_p, repetition_penalty;
    int top_k, repetition_last_n;
    const char *source; /* where they came from, for logs and --help */
} request_defaults_t;

/* llama-cli's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition penalty off
 * over a window of 64), each replaced by the model's own recommendation where its GGUF carries
 * general.sampling.{temp,top_k,top_p,min_p,penalty_repeat,penalty_last_n}. g may be NULL. */
void request_defaults_init(request_defaults_t *d, const gguf_t *g);
/* "temperature 0.8, top-k 40, ... (source)", for --help and logs. */
void request_defaults_describe(const request_defaults_t *d, char *buf, size_t cap);

typedef struct request {
    sched_request_t sched;       /* ready for sched_submit; prompt and stop ids borrow from g */
    bool stream;
    char *const *stops;          /* borrowed from g */
    size_t n_stops;
    uint64_t resume_text_bytes;  /* of sched.resume's text, what the client has (request_stream_resume) */
    kern_logit_adjust_t *bias;   /* owned (sched.penalties.bias) */
} request_t;

/* Resolves g for id. tenant salts the prefix cache; timeout_ms 0 = no deadline. FL_EINVAL with a
 * message naming the field for anything out of range (an empty prompt, a token outside the
 * vocabulary, a sampling field outside folio_sampling_check's ranges, ...); FL_ENOMEM. r is zeroed first and
 * needs request_release() after success. */
int request_resolve(request_t *r, uint64_t id, const Folio__V1__GenerateRequest *g, const char *tenant,
                    uint32_t timeout_ms, const request_defaults_t *d, int32_t n_vocab, fl_error_t *err);
void request_release(request_t *r);
/* The scheduler's drafter for GenerateRequest.spec (folio_spec_check refuses numbers it does not
 * name; any such number is AUTO here). folio-worker's --spec goes through it too. */
sched_spec_t request_spec_mode(Folio__V1__SpecMode m);

/* --- the output stream ----------------------------------------------------------------------- */

typedef struct request_stream {
    const tok_t *tok;            /* NULL: tokens only, no text */
    tok_stream_t utf8;
    char *stop_buf;              /* one allocation: pointers, lengths, strings */
    const char **stops;
    size_t *stop_lens;
    int n_stops;
    size_t max_stop;
    bool stopped;                /* a stop string matched: text ends before it, nothing more comes */
    bool logprobs;               /* keep each token's log-probabilities for the deltas */
    int n_out;                   /* completion tokens (a stop-string's last token excluded) */
    int n_sent;                  /* of them, already handed out in deltas */
    int32_t *toks;               /* the n_out - n_sent tokens not handed out yet */
    sched_logprobs_t *lps;       /* and their log-probabilities (logprobs) */
    int n_toks, cap_toks, cap_lps;
    char *text;                  /* text not handed out yet, NUL-terminated; may end in held-back bytes */
    size_t n_text, cap_text;
    char *scratch;               /* one token's decoded bytes */
    size_t scratch_cap;
    size_t peek_len;             /* request_stream_peek: bytes handed out, and the byte its NUL hides */
    char peek_kept;
} request_stream_t;

/* A stream for tok's text (NULL: none) with copies of the stop strings. Reuses s's buffers when s
 * was used before (request_stream_close keeps them); a zeroed s is new. */
int request_stream_open(request_stream_t *s, const tok_t *tok, char *const *stops, size_t n_stops, bool logprobs,
                        fl_error_t *err);
/* Ends a use of s, keeping modest buffers for the next open. */
void request_stream_close(request_stream_t *s);
/* Frees everything. */
void request_stream_free(request_stream_t *s);

/* Token `index` of the completion. Returns 0, 1 when a stop string matched (the token is not part
 * of the output and the request should stop), or FL_ENOMEM (the caller ends the request: a lost
 * token would leave a gap in the indices). Tokens after a stop are ignored (0). */
int request_stream_push(request_stream_t *s, int index, int32_t token, const sched_logprobs_t *lp);
/* A request moved mid-stream (GenerateRequest.resume_tokens): replays the n tokens the client
 * already has through the stream as if generated here, without handing them out, so the UTF-8
 * decoder, the stop-string search and the held-back text are as the first stream left them; of
 * their text the first text_sent bytes count as sent, the rest comes with the next delta. Call
 * once, right after open. FL_EINVAL when the tokens cannot have been sent (one completes a stop
 * string) or make less text than text_sent; FL_ENOMEM. */
int request_stream_resume(request_stream_t *s, const int32_t *tokens, int n, uint64_t text_sent, fl_error_t *err);
/* The request finished: the UTF-8 decoder's held bytes become text (U+FFFD each). */
void request_stream_end(request_stream_t *s);

/* What may go to the client now: every token not yet handed out, and the text, all of it when
 * final (or after a stop) else all but the bytes that could begin a stop string. */
typedef struct request_delta {
    uint32_t index;              /* completion index of tokens[0] */
    const int32_t *tokens;
    int n_tokens;
    const sched_logprobs_t *logprobs; /* [n_tokens], or NULL */
    const char *text;            /* NUL-terminated */
    size_t n_text;
} request_delta_t;
/* Fills d; false (d empty) when there is nothing to hand out. Until request_stream_done the
 * pointers stay valid and the text is cut by a NUL. */
bool request_stream_peek(request_stream_t *s, bool final, request_delta_t *d);
/* After a peek: sent, the delta is dropped from the stream; not sent, it stays for the next one. */
void request_stream_done(request_stream_t *s, bool sent);

/* The FINAL's finish reason and status for how the scheduler ended a request (stopped: a stop
 * string matched). *message is a static string or error. */
void request_final_status(sched_finish_t f, bool stopped, const char *error, Folio__V1__FinishReason *reason,
                          Folio__V1__StatusCode *code, const char **message);

/* Exposed for tests: the start of the earliest stop string in text[from..n), or -1; and how many
 * trailing bytes of text[0..n) could begin one. */
long request_find_stop(const request_stream_t *s, const char *text, size_t n, size_t from);
size_t request_stop_holdback(const request_stream_t *s, const char *text, size_t n);

#endif
