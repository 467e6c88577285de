/* metrics.c - the coordinator's request counters and histograms; see metrics.h.
 *
 * The bounds are vLLM's where it has them (time to first token; end-to-end and queue time with
 * three finer buckets below its 0.3 s, which a small model on one machine lives in; inter-token
 * latency with three below its 10 ms, which a GPU decodes in; tokens per request on the 1-2-5
 * scale), so dashboards written for vLLM read folio's alike. */
#include "metrics.h"

#include <string.h>

typedef struct bounds {
    const double *v;
    int n;
} bounds_t;

static const double TTFT_BOUNDS[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
                                     1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
static const double ITL_BOUNDS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2,  0.3,
                                    0.4,   0.5,    0.75,  1.0,  2.5,   5.0,  7.5,   10.0, 20.0, 40.0, 80.0};
static const double REQUEST_BOUNDS[] = {0.01, 0.025, 0.05,  0.1,   0.3,   0.5,    0.8,   1.0,  1.5,
                                        2.0,  2.5,   5.0,   10.0,  15.0,  20.0,   30.0,  40.0, 50.0,
                                        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
static const double TOKEN_BOUNDS[] = {1,    2,    5,     10,    20,    50,     100,    200,    500,    1000,
                                      2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000, 1000000};

#define BOUNDS(a) {a, (int)(sizeof a / sizeof *a)}
static const bounds_t BOUNDS_OF[METRICS_N_HIST] = {
    [METRICS_TTFT] = BOUNDS(TTFT_BOUNDS),
    [METRICS_ITL] = BOUNDS(ITL_BOUNDS),
    [METRICS_E2E] = BOUNDS(REQUEST_BOUNDS),
    [METRICS_QUEUE] = BOUNDS(REQUEST_BOUNDS),
    [METRICS_PROMPT_TOKENS] = BOUNDS(TOKEN_BOUNDS),
    [METRICS_GENERATION_TOKENS] = BOUNDS(TOKEN_BOUNDS),
};
_Static_assert(sizeof REQUEST_BOUNDS / sizeof *REQUEST_BOUNDS <= METRICS_MAX_BOUNDS, "bounds");
_Static_assert(sizeof TTFT_BOUNDS / sizeof *TTFT_BOUNDS <= METRICS_MAX_BOUNDS, "bounds");
_Static_assert(sizeof ITL_BOUNDS / sizeof *ITL_BOUNDS <= METRICS_MAX_BOUNDS, "bounds");
_Static_assert(sizeof TOKEN_BOUNDS / sizeof *TOKEN_BOUNDS <= METRICS_MAX_BOUNDS, "bounds");

static metrics_group_t *record(metrics_t *m, int slot)
{
    return &m->slot[slot >= 0 && slot < GROUPS_MAX ? slot + 1 : 0];
}

void metrics_finished(metrics_t *m, int slot, Folio__V1__FinishReason reason, Folio__V1__StatusCode code)
{
    const unsigned r = (unsigned)reason < METRICS_REASONS ? (unsigned)reason : FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    const unsigned k = (unsigned)code < METRICS_CODES ? (unsigned)code : FOLIO__V1__STATUS_CODE__UNKNOWN;
    record(m, slot)->finished[r][k]++;
}

void metrics_observe(metrics_t *m, int slot, metrics_hist_id_t h, double value, uint32_t n)
{
    if (!n || !(value >= 0)) return; /* a clock that stepped back, or NaN */
    metrics_hist_t *x = &record(m, slot)->hist[h];
    const bounds_t b = BOUNDS_OF[h];
    int i = 0;
    while (i < b.n && value > b.v[i]) i++; /* most values sit in the first buckets */
    x->bucket[i] += n;
    x->sum += value * n;
    x->count += n;
}

bool metrics_any(const metrics_t *m, int slot)
{
    const metrics_group_t *g = &m->slot[slot >= 0 && slot < GROUPS_MAX ? slot + 1 : 0];
    for (int r = 0; r < METRICS_REASONS; r++)
        for (int k = 0; k < METRICS_CODES; k++)
            if (g->finished[r][k]) return true;
    for (int h = 0; h < METRICS_N_HIST; h++)
        if (g->hist[h].count) return true;
    return false;
}

Folio__V1__RequestMetrics *metrics_reply(const metrics_t *m, int slot, metrics_reply_t *out)
{
    const metrics_group_t *g = &m->slot[slot >= 0 && slot < GROUPS_MAX ? slot + 1 : 0];
    Folio__V1__RequestMetrics *msg = &out->msg;
    folio__v1__request_metrics__init(msg);
    size_t nf = 0;
    for (int r = 0; r < METRICS_REASONS; r++)
        for (int k = 0; k < METRICS_CODES; k++) {
            if (!g->finished[r][k]) continue;
            Folio__V1__RequestsFinished *f = &out->finished[nf];
            folio__v1__requests_finished__init(f);
            f->finish_reason = (Folio__V1__FinishReason)r;
            f->code = (Folio__V1__StatusCode)k;
            f->count = g->finished[r][k];
            out->finished_ptrs[nf++] = f;
        }
    msg->finished = out->finished_ptrs;
    msg->n_finished = nf;
    Folio__V1__Histogram **dst[METRICS_N_HIST] = {
        [METRICS_TTFT] = &msg->time_to_first_token,
        [METRICS_ITL] = &msg->inter_token_latency,
        [METRICS_E2E] = &msg->e2e_request_latency,
        [METRICS_QUEUE] = &msg->request_queue_time,
        [METRICS_PROMPT_TOKENS] = &msg->request_prompt_tokens,
        [METRICS_GENERATION_TOKENS] = &msg->request_generation_tokens,
    };
    for (int h = 0; h < METRICS_N_HIST; h++) {
        const metrics_hist_t *x = &g->hist[h];
        Folio__V1__Histogram *p = &out->hist[h];
        folio__v1__histogram__init(p);
        const bounds_t b = BOUNDS_OF[h];
        uint64_t run = 0;
        for (int i = 0; i < b.n; i++) out->cumulative[h][i] = run += x->bucket[i];
        p->bounds = (double *)b.v;
        p->n_bounds = (size_t)b.n;
        p->cumulative = out->cumulative[h];
        p->n_cumulative = (size_t)b.n;
        p->sum = x->sum;
        p->count = x->count;
        *dst[h] = p;
    }
    return msg;
}
