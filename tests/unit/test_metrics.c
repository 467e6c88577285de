/* test_metrics.c - the Prometheus renderer (proto/folio_metrics.c) on Status replies built by hand.
 *
 * Protects: the text format 0.0.4 (each family once, HELP then TYPE then all its samples together,
 * every line ending in a newline, folio: names); group labels on per-group figures and none on the
 * coordinator's or on requests no group served; label values escaped (backslash, quote, newline)
 * and invalid UTF-8 replaced, so a worker's group name cannot break the text; histograms with
 * cumulative buckets in bound order, +Inf equal to _count, then _sum and _count, bounds spelled as
 * Prometheus' clients spell them; finish reasons in vLLM's words (a deadline is abort) and status
 * codes by name (by number where the schema has none); the workers' load figures as they came. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "folio_metrics.h"

/* True when text has this exact line. */
static bool has_line(const char *text, const char *line)
{
    const size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)); p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n') return true;
    return false;
}

static void expect_line(const char *text, const char *line)
{
    if (!has_line(text, line)) fail_msg("missing line: %s\n--- text:\n%s", line, text);
}

/* The byte offset of line in text (which has it). */
static size_t line_at(const char *text, const char *line)
{
    const size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)); p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n') return (size_t)(p - text);
    fail_msg("missing line: %s", line);
    return 0;
}

/* The format's rules, on any rendered text: lines end in '\n'; each family has HELP then TYPE,
 * once, and its samples follow before the next family; every name starts with "folio:". */
static void check_format(const char *text)
{
    assert_non_null(text);
    const size_t len = strlen(text);
    assert_true(len > 0 && text[len - 1] == '\n');
    char family[256] = "", type[32] = "";
    char seen[128][256];
    int n_seen = 0;
    for (const char *p = text; *p;) {
        const char *end = strchr(p, '\n');
        assert_non_null(end);
        char line[2048];
        const size_t n = (size_t)(end - p);
        assert_true(n < sizeof line);
        memcpy(line, p, n);
        line[n] = 0;
        char name[256];
        if (!strncmp(line, "# HELP ", 7)) {
            assert_int_equal(sscanf(line + 7, "%255s", name), 1);
            for (int i = 0; i < n_seen; i++)
                if (!strcmp(seen[i], name)) fail_msg("family %s twice", name);
            assert_true(n_seen < 128);
            snprintf(seen[n_seen++], sizeof seen[0], "%s", name);
            snprintf(family, sizeof family, "%s", name);
            type[0] = 0;
            assert_int_equal(strncmp(name, "folio:", 6), 0);
            /* TYPE comes next */
            const char *next = end + 1;
            char want[300];
            snprintf(want, sizeof want, "# TYPE %s ", name);
            assert_int_equal(strncmp(next, want, strlen(want)), 0);
        } else if (!strncmp(line, "# TYPE ", 7)) {
            assert_int_equal(sscanf(line + 7, "%255s %31s", name, type), 2);
            assert_string_equal(name, family);
            assert_true(!strcmp(type, "gauge") || !strcmp(type, "counter") || !strcmp(type, "histogram"));
        } else {
            assert_true(line[0] != '#');
            const size_t k = strcspn(line, "{ ");
            assert_true(k < sizeof name);
            memcpy(name, line, k);
            name[k] = 0;
            const size_t fl = strlen(family);
            if (strncmp(name, family, fl)) fail_msg("sample %s outside its family (in %s)", name, family);
            const char *suffix = name + fl;
            if (!strcmp(type, "histogram"))
                assert_true(!strcmp(suffix, "_bucket") || !strcmp(suffix, "_sum") || !strcmp(suffix, "_count"));
            else
                assert_string_equal(suffix, "");
            assert_non_null(strchr(line, ' '));
        }
        p = end + 1;
    }
}

/* ---- building replies ---- */

typedef struct group_fixture {
    Folio__V1__GroupStatus g;
    Folio__V1__WorkerLoad load;
    Folio__V1__RequestMetrics req;
    Folio__V1__Histogram hist[6];
    Folio__V1__RequestsFinished finished[8];
    Folio__V1__RequestsFinished *finished_ptrs[8];
} group_fixture_t;

static void group_init(group_fixture_t *f, const char *name, bool with_load)
{
    memset(f, 0, sizeof *f);
    folio__v1__group_status__init(&f->g);
    f->g.name = (char *)name;
    f->g.model_id = (char *)"tiny.gguf:1234";
    f->g.tp_size = 1;
    f->g.healthy = true;
    f->g.last_heartbeat_age_s = 0.25;
    folio__v1__worker_load__init(&f->load);
    if (with_load) f->g.load = &f->load;
    folio__v1__request_metrics__init(&f->req);
    Folio__V1__Histogram **h[6] = {&f->req.time_to_first_token, &f->req.inter_token_latency,
                                   &f->req.e2e_request_latency, &f->req.request_queue_time,
                                   &f->req.request_prompt_tokens, &f->req.request_generation_tokens};
    for (int i = 0; i < 6; i++) {
        folio__v1__histogram__init(&f->hist[i]);
        *h[i] = &f->hist[i];
    }
    f->req.finished = f->finished_ptrs;
    f->g.requests = &f->req;
}

static void add_finished(group_fixture_t *f, Folio__V1__FinishReason reason, int code, uint64_t count)
{
    Folio__V1__RequestsFinished *r = &f->finished[f->req.n_finished];
    folio__v1__requests_finished__init(r);
    r->finish_reason = reason;
    r->code = (Folio__V1__StatusCode)code;
    r->count = count;
    f->finished_ptrs[f->req.n_finished++] = r;
}

/* The text of a Status reply with these groups (and requests_no_group none, may be NULL), checked
 * by check_format; to free. */
static char *render(group_fixture_t *const *fixtures, size_t n, Folio__V1__RequestMetrics *none)
{
    Folio__V1__GroupStatus *groups[8];
    assert_true(n <= 8);
    for (size_t i = 0; i < n; i++) groups[i] = &fixtures[i]->g;
    Folio__V1__StatusReply s = FOLIO__V1__STATUS_REPLY__INIT;
    s.groups = groups;
    s.n_groups = n;
    s.requests_no_group = none;
    char *text = folio_metrics_render(&s);
    check_format(text);
    return text;
}

static void expect_lines(const char *text, const char *const *lines, size_t n)
{
    for (size_t i = 0; i < n; i++) expect_line(text, lines[i]);
}

/* ---- tests ---- */

static void test_an_empty_status_renders_every_family_once_and_no_group_label(void **state)
{
    (void)state;
    Folio__V1__StatusReply s = FOLIO__V1__STATUS_REPLY__INIT;
    char *text = folio_metrics_render(&s);
    check_format(text);
    assert_null(strstr(text, "group="));
    expect_line(text, "# TYPE folio:time_to_first_token_seconds histogram");
    expect_line(text, "# TYPE folio:request_success_total counter");
    expect_line(text, "# TYPE folio:num_requests_running gauge");
    expect_line(text, "folio:coordinator_requests_admitted_total 0");
    free(text);
}

static void test_the_workers_load_is_reported_per_group_as_it_came(void **state)
{
    (void)state;
    group_fixture_t a, b;
    group_init(&a, "g0", true);
    group_init(&b, "g1", false); /* no heartbeat yet: no load figures */
    b.g.healthy = false;
    b.g.last_heartbeat_age_s = -1;
    a.load.running = 3;
    a.load.waiting = 2;
    a.load.kv_blocks_total = 100;
    a.load.kv_blocks_used = 25;
    a.load.kv_blocks_cached = 10;
    a.load.prompt_tokens = 1000;
    a.load.cached_prompt_tokens = 400;
    a.load.generated_tokens = 77;
    a.load.preemptions = 5;
    a.load.drafted_tokens = 30;
    a.load.accepted_tokens = 12;
    a.load.spec_seq_steps = 9;
    a.load.tokens_per_s = 12.5;
    a.g.inflight = 4;
    a.g.restarts = 1;
    a.g.draining = true;
    Folio__V1__GroupStatus *groups[2] = {&a.g, &b.g};
    Folio__V1__StatusReply s = FOLIO__V1__STATUS_REPLY__INIT;
    s.groups = groups;
    s.n_groups = 2;
    s.requests_total = 42;
    s.requests_inflight = 4;
    s.requests_failed_over = 1;
    s.requests_migrated = 1;
    s.route_p50_us = 123;
    s.route_p99_us = 10;
    a.g.kv_index_blocks = 17;
    s.kv_index_entries = 17;
    s.kv_index_capacity = 1024;
    s.kv_index_evictions = 2;
    s.routed_by_cache = 5;
    s.routed_cached_blocks = 60;
    char *text = folio_metrics_render(&s);
    check_format(text);
    const char *want[] = {
        "folio:num_requests_running{group=\"g0\"} 3",
        "folio:num_requests_waiting{group=\"g0\"} 2",
        "folio:kv_cache_usage_perc{group=\"g0\"} 0.25",
        "folio:kv_cache_blocks{group=\"g0\",state=\"used\"} 25",
        "folio:kv_cache_blocks{group=\"g0\",state=\"cached\"} 10",
        "folio:kv_cache_blocks{group=\"g0\",state=\"free\"} 65",
        "folio:prefix_cache_queries_total{group=\"g0\"} 1000",
        "folio:prefix_cache_hits_total{group=\"g0\"} 400",
        "folio:prompt_tokens_total{group=\"g0\"} 1000",
        "folio:generation_tokens_total{group=\"g0\"} 77",
        "folio:num_preemptions_total{group=\"g0\"} 5",
        "folio:spec_decode_num_drafts_total{group=\"g0\"} 9",
        "folio:spec_decode_num_draft_tokens_total{group=\"g0\"} 30",
        "folio:spec_decode_num_accepted_tokens_total{group=\"g0\"} 12",
        "folio:generation_tokens_per_second{group=\"g0\"} 12.5",
        "folio:group_info{group=\"g0\",model=\"tiny.gguf:1234\",tp_size=\"1\"} 1",
        "folio:group_healthy{group=\"g0\"} 1",
        "folio:group_healthy{group=\"g1\"} 0",
        "folio:group_draining{group=\"g0\"} 1",
        "folio:group_draining{group=\"g1\"} 0",
        "folio:group_restarts_total{group=\"g0\"} 1",
        "folio:group_heartbeat_age_seconds{group=\"g0\"} 0.25",
        "folio:num_requests_inflight{group=\"g0\"} 4",
        "folio:coordinator_requests_admitted_total 42",
        "folio:coordinator_requests_inflight 4",
        "folio:coordinator_requests_failed_over_total 1",
        "folio:coordinator_requests_migrated_total 1",
        "folio:coordinator_route_latency_seconds{quantile=\"0.5\"} 0.000123",
        "folio:coordinator_route_latency_seconds{quantile=\"0.99\"} 1e-05",
        "folio:group_kv_index_blocks{group=\"g0\"} 17",
        "folio:group_kv_index_blocks{group=\"g1\"} 0",
        "folio:coordinator_kv_index_entries 17",
        "folio:coordinator_kv_index_capacity 1024",
        "folio:coordinator_kv_index_evictions_total 2",
        "folio:coordinator_routed_by_cache_total 5",
        "folio:coordinator_routed_cached_blocks_total 60",
    };
    expect_lines(text, want, sizeof want / sizeof *want);
    /* g1 has no load: none of the workers' figures, and no heartbeat age without a rank 0 */
    assert_null(strstr(text, "folio:num_requests_running{group=\"g1\"}"));
    assert_null(strstr(text, "folio:kv_cache_blocks{group=\"g1\""));
    assert_null(strstr(text, "folio:group_heartbeat_age_seconds{group=\"g1\"}"));
    free(text);
}

static void test_label_values_are_escaped_and_invalid_utf8_replaced(void **state)
{
    (void)state;
    group_fixture_t a;
    group_init(&a, "a\"b\\c\nd\xff\xc3\xa9", true); /* quote, backslash, newline, a bad byte, an e-acute */
    a.g.model_id = (char *)"m\xe2\x82"; /* a character cut short */
    group_fixture_t *fs[1] = {&a};
    char *text = render(fs, 1, NULL);
    expect_line(text, "folio:num_requests_running{group=\"a\\\"b\\\\c\\nd\xEF\xBF\xBD\xc3\xa9\"} 0");
    expect_line(text,
                "folio:group_info{group=\"a\\\"b\\\\c\\nd\xEF\xBF\xBD\xc3\xa9\",model=\"m\xEF\xBF\xBD\xEF\xBF\xBD\","
                "tp_size=\"1\"} 1");
    free(text);
}

static void test_histograms_have_cumulative_buckets_then_inf_sum_and_count(void **state)
{
    (void)state;
    group_fixture_t a;
    group_init(&a, "g0", true);
    const double bounds[5] = {0.005, 0.1, 1, 2560, 1e6};
    uint64_t cumulative[5] = {1, 3, 3, 4, 4};
    Folio__V1__Histogram *h = a.req.time_to_first_token;
    h->bounds = (double *)bounds;
    h->n_bounds = 5;
    h->cumulative = cumulative;
    h->n_cumulative = 5;
    h->count = 5;
    h->sum = 7.25;
    /* requests no group served: shown only where they have something */
    Folio__V1__RequestMetrics none = FOLIO__V1__REQUEST_METRICS__INIT;
    Folio__V1__Histogram e2e = FOLIO__V1__HISTOGRAM__INIT, empty = FOLIO__V1__HISTOGRAM__INIT;
    const double one[1] = {0.5};
    uint64_t one_c[1] = {2};
    e2e.bounds = (double *)one;
    e2e.n_bounds = 1;
    e2e.cumulative = one_c;
    e2e.n_cumulative = 1;
    e2e.count = 2;
    e2e.sum = 0.5;
    none.e2e_request_latency = &e2e;
    none.time_to_first_token = &empty;
    group_fixture_t *fs[1] = {&a};
    char *text = render(fs, 1, &none);
    const char *want[] = {
        "folio:time_to_first_token_seconds_bucket{group=\"g0\",le=\"0.005\"} 1",
        "folio:time_to_first_token_seconds_bucket{group=\"g0\",le=\"0.1\"} 3",
        "folio:time_to_first_token_seconds_bucket{group=\"g0\",le=\"1\"} 3",
        "folio:time_to_first_token_seconds_bucket{group=\"g0\",le=\"2560\"} 4",
        "folio:time_to_first_token_seconds_bucket{group=\"g0\",le=\"1e+06\"} 4",
        "folio:time_to_first_token_seconds_bucket{group=\"g0\",le=\"+Inf\"} 5",
        "folio:time_to_first_token_seconds_sum{group=\"g0\"} 7.25",
        "folio:time_to_first_token_seconds_count{group=\"g0\"} 5",
    };
    size_t at = 0;
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        const size_t p = line_at(text, want[i]);
        assert_true(p >= at); /* in this order */
        at = p;
    }
    /* a group's empty histograms are there (at zero), so rates start from 0 */
    expect_line(text, "folio:e2e_request_latency_seconds_count{group=\"g0\"} 0");
    expect_line(text, "folio:e2e_request_latency_seconds_bucket{group=\"g0\",le=\"+Inf\"} 0");
    /* no group: no label; its empty time-to-first-token histogram is left out */
    expect_line(text, "folio:e2e_request_latency_seconds_bucket{le=\"0.5\"} 2");
    expect_line(text, "folio:e2e_request_latency_seconds_bucket{le=\"+Inf\"} 2");
    expect_line(text, "folio:e2e_request_latency_seconds_sum 0.5");
    expect_line(text, "folio:e2e_request_latency_seconds_count 2");
    assert_null(strstr(text, "folio:time_to_first_token_seconds_count "));
    free(text);
}

static void test_requests_ended_count_by_vllms_finish_reasons_and_by_status_code(void **state)
{
    (void)state;
    group_fixture_t a;
    group_init(&a, "g0", true);
    add_finished(&a, FOLIO__V1__FINISH_REASON__FINISH_LENGTH, FOLIO__V1__STATUS_CODE__OK, 4);
    add_finished(&a, FOLIO__V1__FINISH_REASON__FINISH_STOP, FOLIO__V1__STATUS_CODE__OK, 2);
    add_finished(&a, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED, 1);
    add_finished(&a, FOLIO__V1__FINISH_REASON__FINISH_CANCELLED, FOLIO__V1__STATUS_CODE__CANCELLED, 2);
    add_finished(&a, FOLIO__V1__FINISH_REASON__FINISH_ERROR, FOLIO__V1__STATUS_CODE__UNAVAILABLE, 3);
    add_finished(&a, FOLIO__V1__FINISH_REASON__FINISH_ERROR, 6, 1); /* ALREADY_EXISTS: not in the schema */
    Folio__V1__RequestsFinished refused = FOLIO__V1__REQUESTS_FINISHED__INIT, *rp = &refused;
    refused.finish_reason = FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    refused.code = FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED;
    refused.count = 7;
    Folio__V1__RequestMetrics none = FOLIO__V1__REQUEST_METRICS__INIT;
    none.finished = &rp;
    none.n_finished = 1;
    group_fixture_t *fs[1] = {&a};
    char *text = render(fs, 1, &none);
    const char *want[] = {
        "folio:request_success_total{group=\"g0\",finished_reason=\"stop\"} 2",
        "folio:request_success_total{group=\"g0\",finished_reason=\"length\"} 4",
        "folio:request_success_total{group=\"g0\",finished_reason=\"abort\"} 3",
        "folio:request_success_total{group=\"g0\",finished_reason=\"error\"} 4",
        "folio:request_status_total{group=\"g0\",code=\"OK\"} 6",
        "folio:request_status_total{group=\"g0\",code=\"DEADLINE_EXCEEDED\"} 1",
        "folio:request_status_total{group=\"g0\",code=\"CANCELLED\"} 2",
        "folio:request_status_total{group=\"g0\",code=\"UNAVAILABLE\"} 3",
        "folio:request_status_total{group=\"g0\",code=\"6\"} 1",
        "folio:request_success_total{finished_reason=\"error\"} 7",
        "folio:request_success_total{finished_reason=\"stop\"} 0",
        "folio:request_status_total{code=\"RESOURCE_EXHAUSTED\"} 7",
    };
    expect_lines(text, want, sizeof want / sizeof *want);
    assert_null(strstr(text, "code=\"OK\"} 4")); /* OK's two entries are one series */
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_an_empty_status_renders_every_family_once_and_no_group_label),
        cmocka_unit_test(test_the_workers_load_is_reported_per_group_as_it_came),
        cmocka_unit_test(test_label_values_are_escaped_and_invalid_utf8_replaced),
        cmocka_unit_test(test_histograms_have_cumulative_buckets_then_inf_sum_and_count),
        cmocka_unit_test(test_requests_ended_count_by_vllms_finish_reasons_and_by_status_code),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
