/* relay.h - the gateway's generation requests: an OpenAI request sent to the coordinator as one
 * Generate per prompt, the coordinator's replies routed back by request id and turned into the
 * HTTP answer, either one JSON reply or a stream of Server-Sent Events.
 *
 * Everything here belongs to the thread that owns the client connection (the gateway's event
 * loop): the relay never blocks and never touches HTTP; it tells its owner through the wake
 * callback when a request has something new for its connection (its status decided, or more
 * stream bytes), and the owner reads the answer when the connection can take it. */
#ifndef FOLIO_GW_RELAY_H
#define FOLIO_GW_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "folio_client.h"
#include "openai.h"

typedef struct relay relay_t;
typedef struct relay_req relay_req_t;

typedef void (*relay_wake_fn)(void *owner);

typedef struct relay_opts {
    folio_client_t *client; /* borrowed; its events come in through relay_on_event */
    relay_wake_fn wake;
    oai_token_text_fn token_text; /* NULL: logprob tokens as "token_id:N" */
    void *token_ctx;
    size_t max_buffered; /* stream bytes a slow client may leave unread (0: 16 MiB) */
} relay_opts_t;

typedef enum {
    RELAY_WAITING, /* nothing decided: no status can be sent yet */
    RELAY_STREAM,  /* 200 and an event stream: relay_read */
    RELAY_REPLY,   /* one whole answer: relay_reply */
} relay_phase_t;

typedef struct relay_stats {
    uint64_t requests; /* Generate messages sent */
    uint64_t cancels;  /* Cancels sent (a client gone, or a batch ended by an error) */
    uint64_t live;     /* Generates without their FINAL yet */
} relay_stats_t;

relay_t *relay_new(const relay_opts_t *o);
/* Cancels and frees whatever is left. */
void relay_destroy(relay_t **rp);

/* Sends rq's Generates (one per prompt, one for a chat) under tenant; model is the name the
 * responses carry. Takes rq, also on failure (NULL with err: 503 when the sends failed). */
relay_req_t *relay_start(relay_t *r, oai_request_t *rq, const char *tenant, const char *model, void *owner,
                         oai_error_t *err);
/* One reply from the client connection; takes ev (cleared on return). Replies to requests no
 * longer here (a client gone, a Cancel's own answer) are dropped. */
void relay_on_event(relay_t *r, folio_event_t *ev);

relay_phase_t relay_phase(const relay_req_t *q);
/* Whether some Generate of q has not had its FINAL yet (the generation goes on). */
bool relay_live(const relay_req_t *q);
/* RELAY_REPLY: the HTTP status, the JSON body (borrowed) and Retry-After seconds (0: none). */
int relay_reply(const relay_req_t *q, const char **body, size_t *len, int *retry_after_s);
/* RELAY_STREAM: copies up to max bytes of the stream; 0 when nothing is ready (wake says when
 * more is), -1 when the stream has ended and every byte was read. */
ssize_t relay_read(relay_req_t *q, char *buf, size_t max);
/* The connection is done with q: Generates still live are cancelled (client_gone: it went away
 * before the end). Frees q and NULLs *qp. */
void relay_finish(relay_req_t **qp, bool client_gone);

/* Ends, as UNAVAILABLE with message, every live Generate sent before t (sent_before) that has heard
 * nothing since quiet_since; the coordinator that held them restarted or stopped answering.
 * Returns how many. */
int relay_fail_lost(relay_t *r, double sent_before, double quiet_since, const char *message);
/* Streams with nothing sent for idle_s get an SSE comment, so a client gone is noticed and proxies
 * keep the connection open while a request waits. */
void relay_keepalive(relay_t *r, double now, double idle_s);
relay_stats_t relay_stats(const relay_t *r);

#endif
