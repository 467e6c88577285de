/* metrics.h - what the coordinator measures of the Generate requests it relays, for Status (and so
 * for Prometheus: proto/folio_metrics.h renders the reply).
 *
 * Per group slot (and one record for requests no group served): requests ended by finish reason
 * and status code, and histograms of time to first token, inter-token latency, end-to-end latency,
 * queue time, prompt and generation tokens per request, with fixed bounds close to vLLM's. The
 * counters live in fixed arrays and an observation is a bucket search and two additions: the relay
 * path allocates nothing. Counts per bucket are kept apart and made cumulative only when a Status
 * reply is built. One thread (the event loop) owns it, like the rest of coord_t. */
#ifndef FOLIO_COORD_METRICS_H
#define FOLIO_COORD_METRICS_H

#include <stdbool.h>
#include <stdint.h>

#include "folio.pb-c.h"
#include "groups.h"

#define METRICS_MAX_BOUNDS 32
#define METRICS_REASONS    5  /* FinishReason values */
#define METRICS_CODES      17 /* gRPC status codes 0..16; others count as UNKNOWN */

typedef enum metrics_hist_id {
    METRICS_TTFT,              /* receipt to the first token relayed, seconds */
    METRICS_ITL,               /* between tokens relayed, seconds, one observation per token */
    METRICS_E2E,               /* receipt to the end */
    METRICS_QUEUE,             /* receipt to the worker's scheduling (Timings.queued_s) */
    METRICS_PROMPT_TOKENS,     /* per request */
    METRICS_GENERATION_TOKENS, /* per request: completion tokens the client received */
    METRICS_N_HIST
} metrics_hist_id_t;

typedef struct metrics_hist {
    uint64_t bucket[METRICS_MAX_BOUNDS + 1]; /* per bucket (not cumulative); the last is above every bound */
    double sum;
    uint64_t count;
} metrics_hist_t;

typedef struct metrics_group {
    uint64_t finished[METRICS_REASONS][METRICS_CODES];
    metrics_hist_t hist[METRICS_N_HIST];
} metrics_group_t;

typedef struct metrics {
    metrics_group_t slot[GROUPS_MAX + 1]; /* group slot + 1; [0]: requests no group served */
} metrics_t;

/* A Status reply's RequestMetrics for one record, in storage the reply borrows. */
typedef struct metrics_reply {
    Folio__V1__RequestMetrics msg;
    Folio__V1__Histogram hist[METRICS_N_HIST];
    uint64_t cumulative[METRICS_N_HIST][METRICS_MAX_BOUNDS];
    Folio__V1__RequestsFinished finished[METRICS_REASONS * METRICS_CODES];
    Folio__V1__RequestsFinished *finished_ptrs[METRICS_REASONS * METRICS_CODES];
} metrics_reply_t;

/* A request of group slot (-1: none) ended with this finish reason and status code. */
void metrics_finished(metrics_t *m, int slot, Folio__V1__FinishReason reason, Folio__V1__StatusCode code);
/* n observations of value each (n > 1: the tokens of one delta share its interval), for group slot. */
void metrics_observe(metrics_t *m, int slot, metrics_hist_id_t h, double value, uint32_t n);
/* True when group slot's record has anything to show. */
bool metrics_any(const metrics_t *m, int slot);
/* Fills out (its msg points into out) with group slot's record; returns &out->msg. */
Folio__V1__RequestMetrics *metrics_reply(const metrics_t *m, int slot, metrics_reply_t *out);

#endif
