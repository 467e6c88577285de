/* folio_metrics.c - the Status reply in the Prometheus text format; see folio_metrics.h.
 *
 * Each family is written whole (HELP, TYPE, then its samples for every group), as the format
 * requires. Per-group figures carry group="NAME"; the coordinator's figures of requests no group
 * served carry no group label. Floats are printed as Go's strconv does ('g', shortest), the
 * spelling Prometheus' own clients use, so bucket bounds read alike everywhere. Label values are
 * escaped (backslash, quote, newline) and bytes that are not UTF-8 become U+FFFD: group and model
 * names come from the workers. */
#include "folio_metrics.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

/* ---- a growing text buffer ---- */

typedef struct text {
    char *p;
    size_t len, cap;
    bool oom;
} text_t;

static bool reserve(text_t *t, size_t more)
{
    if (t->oom) return false;
    if (t->len + more + 1 <= t->cap) return true;
    size_t cap = t->cap ? t->cap : 4096;
    while (cap < t->len + more + 1) cap *= 2;
    char *p = realloc(t->p, cap);
    if (!p) return !(t->oom = true);
    t->p = p;
    t->cap = cap;
    return true;
}

static void put(text_t *t, const char *s, size_t n)
{
    if (!reserve(t, n)) return;
    memcpy(t->p + t->len, s, n);
    t->len += n;
    t->p[t->len] = 0;
}

static void puts_(text_t *t, const char *s)
{
    put(t, s, strlen(s));
}

static void printf_(text_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void printf_(text_t *t, const char *fmt, ...)
{
    char buf[128];
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof buf) {
        put(t, buf, (size_t)n);
        return;
    }
    if (!reserve(t, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(t->p + t->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

/* ---- values ---- */

#define FLOAT_CHARS 40

/* Go's strconv.FormatFloat(v, 'g', -1, 64) into buf: the fewest digits that read back as v, in %e
 * form when the exponent is below -4 or at least 6 (1e+06, 0.005, 2560). */
static const char *format_float(char buf[FLOAT_CHARS], double v)
{
    if (isnan(v)) return "NaN";
    if (isinf(v)) return v > 0 ? "+Inf" : "-Inf";
    if (v == 0) return signbit(v) ? "-0" : "0";
    int digits = 1;
    for (; digits < 17; digits++) {
        snprintf(buf, FLOAT_CHARS, "%.*e", digits - 1, v);
        if (strtod(buf, NULL) == v) break;
    }
    snprintf(buf, FLOAT_CHARS, "%.*e", digits - 1, v);
    const int exp = atoi(strchr(buf, 'e') + 1);
    if (exp >= -4 && exp < 6) snprintf(buf, FLOAT_CHARS, "%.*f", digits - 1 - exp > 0 ? digits - 1 - exp : 0, v);
    return buf;
}

/* The length of the valid UTF-8 sequence at s (n bytes left), or 0. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    const unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t k;
    unsigned cp, min;
    if ((c & 0xE0) == 0xC0)
        k = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
        k = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
        k = 4, cp = c & 0x07, min = 0x10000;
    else
        return 0;
    if (n < k) return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

/* s escaped for a label value (quote too) or a HELP text (quote kept), invalid UTF-8 as U+FFFD. */
static void put_escaped(text_t *t, const char *s, bool label)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    while (n) {
        const size_t k = utf8_seq(p, n);
        if (!k) {
            puts_(t, "\xEF\xBF\xBD");
            p++, n--;
        } else if (*p == '\\') {
            puts_(t, "\\\\");
        } else if (*p == '\n') {
            puts_(t, "\\n");
        } else if (*p == '"' && label) {
            puts_(t, "\\\"");
        } else {
            put(t, (const char *)p, k);
        }
        if (k) p += k, n -= k;
    }
}

/* ---- families and samples ---- */

typedef struct label {
    const char *name, *value; /* a NULL or empty value leaves the label out */
} label_t;

static void family(text_t *t, const char *name, const char *type, const char *help)
{
    printf_(t, "# HELP %s ", name);
    put_escaped(t, help, false);
    printf_(t, "\n# TYPE %s %s\n", name, type);
}

/* name+suffix{labels} and a space, ready for the value. */
static void sample_head(text_t *t, const char *name, const char *suffix, const label_t *l, int n)
{
    puts_(t, name);
    puts_(t, suffix);
    bool open = false;
    for (int i = 0; i < n; i++) {
        if (!l[i].value || !*l[i].value) continue;
        puts_(t, open ? "," : "{");
        open = true;
        printf_(t, "%s=\"", l[i].name);
        put_escaped(t, l[i].value, true);
        puts_(t, "\"");
    }
    puts_(t, open ? "} " : " ");
}

static void sample(text_t *t, const char *name, const char *suffix, const label_t *l, int n, double v)
{
    char buf[FLOAT_CHARS];
    sample_head(t, name, suffix, l, n);
    puts_(t, format_float(buf, v));
    puts_(t, "\n");
}

static void sample_u64(text_t *t, const char *name, const char *suffix, const label_t *l, int n, uint64_t v)
{
    sample_head(t, name, suffix, l, n);
    printf_(t, "%llu\n", (unsigned long long)v);
}

/* ---- per group: the worker's load ---- */

typedef struct load_metric {
    const char *name, *type, *help;
    size_t offset;
    bool wide; /* uint64_t, else uint32_t */
} load_metric_t;

#define LOAD32(field) offsetof(Folio__V1__WorkerLoad, field), false
#define LOAD64(field) offsetof(Folio__V1__WorkerLoad, field), true
static const load_metric_t LOAD_METRICS[] = {
    {"folio:num_requests_running", "gauge", "Requests in the group's running batch.", LOAD32(running)},
    {"folio:num_requests_waiting", "gauge", "Requests waiting in the group's queue.", LOAD32(waiting)},
    {"folio:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
     LOAD64(prompt_tokens)},
    {"folio:prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
     LOAD64(cached_prompt_tokens)},
    {"folio:prompt_tokens_total", "counter", "Prompt tokens the group processed (cache hits included).",
     LOAD64(prompt_tokens)},
    {"folio:generation_tokens_total", "counter", "Tokens the group generated.", LOAD64(generated_tokens)},
    {"folio:num_preemptions_total", "counter", "Sequences preempted (recomputed later) for want of KV blocks.",
     LOAD64(preemptions)},
    {"folio:spec_decode_num_drafts_total", "counter",
     "Speculative decoding: verifications of a sequence that carried a draft.", LOAD64(spec_seq_steps)},
    {"folio:spec_decode_num_draft_tokens_total", "counter", "Speculative decoding: draft tokens verified.",
     LOAD64(drafted_tokens)},
    {"folio:spec_decode_num_accepted_tokens_total", "counter",
     "Speculative decoding: draft tokens accepted into completions.", LOAD64(accepted_tokens)},
};

static void render_loads(text_t *t, const Folio__V1__StatusReply *s)
{
    for (size_t k = 0; k < sizeof LOAD_METRICS / sizeof *LOAD_METRICS; k++) {
        const load_metric_t *m = &LOAD_METRICS[k];
        family(t, m->name, m->type, m->help);
        for (size_t i = 0; i < s->n_groups; i++) {
            const Folio__V1__GroupStatus *g = s->groups[i];
            if (!g->load) continue;
            const label_t l[] = {{"group", g->name}};
            const char *p = (const char *)g->load + m->offset;
            sample_u64(t, m->name, "", l, 1, m->wide ? *(const uint64_t *)p : *(const uint32_t *)p);
        }
    }
    family(t, "folio:kv_cache_usage_perc", "gauge",
           "Fraction of the group's KV-cache blocks held by running sequences (0 to 1).");
    for (size_t i = 0; i < s->n_groups; i++) {
        const Folio__V1__WorkerLoad *l = s->groups[i]->load;
        if (!l) continue;
        const label_t lb[] = {{"group", s->groups[i]->name}};
        sample(t, "folio:kv_cache_usage_perc", "", lb, 1,
               l->kv_blocks_total ? (double)l->kv_blocks_used / l->kv_blocks_total : 0);
    }
    family(t, "folio:kv_cache_blocks", "gauge",
           "The group's KV-cache blocks by state: used (running sequences), cached (kept for prefix hits), free.");
    for (size_t i = 0; i < s->n_groups; i++) {
        const Folio__V1__WorkerLoad *l = s->groups[i]->load;
        if (!l) continue;
        const uint64_t held = (uint64_t)l->kv_blocks_used + l->kv_blocks_cached;
        const uint64_t v[3] = {l->kv_blocks_used, l->kv_blocks_cached,
                               l->kv_blocks_total > held ? l->kv_blocks_total - held : 0};
        static const char *const state[3] = {"used", "cached", "free"};
        for (int k = 0; k < 3; k++) {
            const label_t lb[] = {{"group", s->groups[i]->name}, {"state", state[k]}};
            sample_u64(t, "folio:kv_cache_blocks", "", lb, 2, v[k]);
        }
    }
    family(t, "folio:generation_tokens_per_second", "gauge", "Tokens the group generates per second, recently.");
    for (size_t i = 0; i < s->n_groups; i++) {
        if (!s->groups[i]->load) continue;
        const label_t lb[] = {{"group", s->groups[i]->name}};
        sample(t, "folio:generation_tokens_per_second", "", lb, 1, s->groups[i]->load->tokens_per_s);
    }
}

/* ---- per group: the coordinator's view ---- */

static void render_groups(text_t *t, const Folio__V1__StatusReply *s)
{
    family(t, "folio:group_info", "gauge", "A worker group, its model and tensor-parallel size (value 1).");
    for (size_t i = 0; i < s->n_groups; i++) {
        const Folio__V1__GroupStatus *g = s->groups[i];
        char tp[16];
        snprintf(tp, sizeof tp, "%u", g->tp_size);
        const label_t l[] = {{"group", g->name}, {"model", g->model_id}, {"tp_size", tp}};
        sample(t, "folio:group_info", "", l, 3, 1);
    }
    family(t, "folio:group_healthy", "gauge",
           "1 when the group's rank 0 is registered, heard lately and its engine runs, else 0.");
    for (size_t i = 0; i < s->n_groups; i++) {
        const label_t l[] = {{"group", s->groups[i]->name}};
        sample(t, "folio:group_healthy", "", l, 1, s->groups[i]->healthy);
    }
    family(t, "folio:group_draining", "gauge", "1 when the group takes no new requests (drained, or stopping).");
    for (size_t i = 0; i < s->n_groups; i++) {
        const Folio__V1__GroupStatus *g = s->groups[i];
        const label_t l[] = {{"group", g->name}};
        sample(t, "folio:group_draining", "", l, 1, g->draining || (g->load && g->load->draining));
    }
    family(t, "folio:group_restarts_total", "counter", "Times the group's rank 0 was restarted by its supervisor.");
    for (size_t i = 0; i < s->n_groups; i++) {
        const label_t l[] = {{"group", s->groups[i]->name}};
        sample_u64(t, "folio:group_restarts_total", "", l, 1, s->groups[i]->restarts);
    }
    family(t, "folio:group_heartbeat_age_seconds", "gauge", "Seconds since the group's rank 0 was last heard.");
    for (size_t i = 0; i < s->n_groups; i++) {
        if (s->groups[i]->last_heartbeat_age_s < 0) continue; /* no rank 0 registered */
        const label_t l[] = {{"group", s->groups[i]->name}};
        sample(t, "folio:group_heartbeat_age_seconds", "", l, 1, s->groups[i]->last_heartbeat_age_s);
    }
    family(t, "folio:num_requests_inflight", "gauge",
           "Requests the coordinator has routed to the group and not yet finished.");
    for (size_t i = 0; i < s->n_groups; i++) {
        const label_t l[] = {{"group", s->groups[i]->name}};
        sample_u64(t, "folio:num_requests_inflight", "", l, 1, s->groups[i]->inflight);
    }
    family(t, "folio:group_kv_index_blocks", "gauge",
           "Blocks of the group's prefix cache in the coordinator's index (from its KV events).");
    for (size_t i = 0; i < s->n_groups; i++) {
        const label_t l[] = {{"group", s->groups[i]->name}};
        sample_u64(t, "folio:group_kv_index_blocks", "", l, 1, s->groups[i]->kv_index_blocks);
    }
}

/* ---- per group: the requests the coordinator relayed ---- */

/* Record i of the reply: each group's, then that of requests no group served (group ""). NULL
 * where there is none. */
static const Folio__V1__RequestMetrics *record(const Folio__V1__StatusReply *s, size_t i, const char **group)
{
    if (i < s->n_groups) {
        *group = s->groups[i]->name;
        return s->groups[i]->requests;
    }
    *group = "";
    return s->requests_no_group;
}

/* vLLM's finished_reason label values, and which a FinishReason counts as. */
static const char *const REASONS[] = {"stop", "length", "abort", "error"};
static int reason_index(int reason)
{
    switch (reason) {
    case FOLIO__V1__FINISH_REASON__FINISH_STOP: return 0;
    case FOLIO__V1__FINISH_REASON__FINISH_LENGTH: return 1;
    case FOLIO__V1__FINISH_REASON__FINISH_CANCELLED: return 2;
    default: return 3;
    }
}

static void render_finished(text_t *t, const Folio__V1__StatusReply *s)
{
    family(t, "folio:request_success_total", "counter",
           "Generate requests ended, by finish reason: stop, length, abort (cancelled, deadline, client gone), error.");
    for (size_t i = 0; i <= s->n_groups; i++) {
        const char *group;
        const Folio__V1__RequestMetrics *r = record(s, i, &group);
        if (!r) continue;
        uint64_t n[4] = {0};
        for (size_t j = 0; j < r->n_finished; j++)
            n[reason_index(r->finished[j]->finish_reason)] += r->finished[j]->count;
        for (int k = 0; k < 4; k++) {
            const label_t l[] = {{"group", group}, {"finished_reason", REASONS[k]}};
            sample_u64(t, "folio:request_success_total", "", l, 2, n[k]);
        }
    }
    family(t, "folio:request_status_total", "counter", "Generate requests ended, by the status code of their FINAL.");
    for (size_t i = 0; i <= s->n_groups; i++) {
        const char *group;
        const Folio__V1__RequestMetrics *r = record(s, i, &group);
        if (!r) continue;
        for (size_t j = 0; j < r->n_finished; j++) {
            const int code = r->finished[j]->code;
            bool seen = false;
            for (size_t q = 0; q < j && !seen; q++) seen = (int)r->finished[q]->code == code;
            if (seen) continue;
            uint64_t n = 0;
            for (size_t q = j; q < r->n_finished; q++)
                if ((int)r->finished[q]->code == code) n += r->finished[q]->count;
            char number[16];
            const char *name = wire_status_name(code);
            if (!strcmp(name, "UNKNOWN") && code != FOLIO__V1__STATUS_CODE__UNKNOWN) {
                snprintf(number, sizeof number, "%d", code); /* a code the schema does not name */
                name = number;
            }
            const label_t l[] = {{"group", group}, {"code", name}};
            sample_u64(t, "folio:request_status_total", "", l, 2, n);
        }
    }
}

typedef struct hist_family {
    const char *name, *help;
    size_t offset; /* of the Histogram pointer in RequestMetrics */
} hist_family_t;

#define HIST(field) offsetof(Folio__V1__RequestMetrics, field)
static const hist_family_t HISTOGRAMS[] = {
    {"folio:time_to_first_token_seconds", "Seconds from a request's receipt to its first token.",
     HIST(time_to_first_token)},
    {"folio:inter_token_latency_seconds", "Seconds between the tokens of a request, one observation per token.",
     HIST(inter_token_latency)},
    {"folio:e2e_request_latency_seconds", "Seconds from a request's receipt to its end.", HIST(e2e_request_latency)},
    {"folio:request_queue_time_seconds", "Seconds from a request's receipt to its scheduling on a worker.",
     HIST(request_queue_time)},
    {"folio:request_prompt_tokens", "Prompt tokens per request.", HIST(request_prompt_tokens)},
    {"folio:request_generation_tokens", "Completion tokens per request (those the client received).",
     HIST(request_generation_tokens)},
};

static void render_histogram(text_t *t, const char *name, const char *group, const Folio__V1__Histogram *h)
{
    const size_t n = h->n_bounds < h->n_cumulative ? h->n_bounds : h->n_cumulative;
    for (size_t i = 0; i < n; i++) {
        char le[FLOAT_CHARS];
        const label_t l[] = {{"group", group}, {"le", format_float(le, h->bounds[i])}};
        sample_u64(t, name, "_bucket", l, 2, h->cumulative[i]);
    }
    const label_t inf[] = {{"group", group}, {"le", "+Inf"}};
    sample_u64(t, name, "_bucket", inf, 2, h->count);
    const label_t l[] = {{"group", group}};
    sample(t, name, "_sum", l, 1, h->sum);
    sample_u64(t, name, "_count", l, 1, h->count);
}

static void render_histograms(text_t *t, const Folio__V1__StatusReply *s)
{
    for (size_t k = 0; k < sizeof HISTOGRAMS / sizeof *HISTOGRAMS; k++) {
        const hist_family_t *f = &HISTOGRAMS[k];
        family(t, f->name, "histogram", f->help);
        for (size_t i = 0; i <= s->n_groups; i++) {
            const char *group;
            const Folio__V1__RequestMetrics *r = record(s, i, &group);
            if (!r) continue;
            const Folio__V1__Histogram *h = *(Folio__V1__Histogram *const *)((const char *)r + f->offset);
            if (!h || (i == s->n_groups && !h->count)) continue; /* no group: only what it has */
            render_histogram(t, f->name, group, h);
        }
    }
}

/* ---- the coordinator ---- */

static void render_coordinator(text_t *t, const Folio__V1__StatusReply *s)
{
    family(t, "folio:coordinator_requests_admitted_total", "counter",
           "Generate requests the coordinator admitted (routed to a group or ended by it).");
    sample_u64(t, "folio:coordinator_requests_admitted_total", "", NULL, 0, s->requests_total);
    family(t, "folio:coordinator_requests_inflight", "gauge", "Generate requests admitted and not yet finished.");
    sample_u64(t, "folio:coordinator_requests_inflight", "", NULL, 0, s->requests_inflight);
    family(t, "folio:coordinator_requests_failed_over_total", "counter",
           "Requests moved to another group after theirs died or lost them.");
    sample_u64(t, "folio:coordinator_requests_failed_over_total", "", NULL, 0, s->requests_failed_over);
    family(t, "folio:coordinator_requests_migrated_total", "counter",
           "Of those, requests moved after their first token had reached the client (the stream went on).");
    sample_u64(t, "folio:coordinator_requests_migrated_total", "", NULL, 0, s->requests_migrated);
    family(t, "folio:coordinator_route_latency_seconds", "gauge",
           "The coordinator's own added latency per request over its recent requests, by quantile.");
    const label_t p50[] = {{"quantile", "0.5"}}, p99[] = {{"quantile", "0.99"}};
    sample(t, "folio:coordinator_route_latency_seconds", "", p50, 1, s->route_p50_us / 1e6);
    sample(t, "folio:coordinator_route_latency_seconds", "", p99, 1, s->route_p99_us / 1e6);
    family(t, "folio:coordinator_kv_index_entries", "gauge",
           "(block, group) entries in the index of the groups' prefix caches that cache-aware routing reads.");
    sample_u64(t, "folio:coordinator_kv_index_entries", "", NULL, 0, s->kv_index_entries);
    family(t, "folio:coordinator_kv_index_capacity", "gauge", "The most entries that index holds.");
    sample_u64(t, "folio:coordinator_kv_index_capacity", "", NULL, 0, s->kv_index_capacity);
    family(t, "folio:coordinator_kv_index_evictions_total", "counter", "Index entries evicted to make room.");
    sample_u64(t, "folio:coordinator_kv_index_evictions_total", "", NULL, 0, s->kv_index_evictions);
    family(t, "folio:coordinator_routed_by_cache_total", "counter",
           "Requests the cache-aware policy sent to a group for the leading prompt blocks it holds.");
    sample_u64(t, "folio:coordinator_routed_by_cache_total", "", NULL, 0, s->routed_by_cache);
    family(t, "folio:coordinator_routed_cached_blocks_total", "counter",
           "The prompt blocks those requests found held, summed.");
    sample_u64(t, "folio:coordinator_routed_cached_blocks_total", "", NULL, 0, s->routed_cached_blocks);
}

char *folio_metrics_render(const Folio__V1__StatusReply *status)
{
    text_t t = {0};
    if (!reserve(&t, 0)) return NULL;
    t.p[0] = 0;
    render_loads(&t, status);
    render_groups(&t, status);
    render_finished(&t, status);
    render_histograms(&t, status);
    render_coordinator(&t, status);
    if (t.oom) {
        free(t.p);
        return NULL;
    }
    return t.p;
}
