/* test_migration.c - mid-stream migration end to end (proto/README.md, "Failover rule"): a real
 * folio-coordinator and three folio-worker groups on a tiny random model (e2e_util.h).
 *
 * The serving worker is SIGKILLed or SIGSTOPped after a random number of a stream's tokens had
 * reached the client; the coordinator moves the request to another group, which goes on from
 * there. Protects: the client sees one uninterrupted stream equal to a run without the fault,
 * token for token and text for text (greedy and seeded sampling; stop strings, one of which ends
 * the output and one whose first character holds text back all along; the random model's bytes
 * make multi-byte and invalid UTF-8 split over tokens), indices continuous with none twice, exactly
 * one FINAL, OK with the reference's finish reason, usage with the prompt's tokens and every
 * completion token; alone and for 8 concurrent streams; Status counts the migrations. A request
 * that asked for the old rule (no_migrate) ends UNAVAILABLE with a prefix of the reference.
 *
 * The serving group is chosen by draining the others until the stream has its first token; the
 * fault comes once the stream has k tokens (k random; the seed is printed, FOLIO_E2E_SEED replays
 * it). A SIGKILLed worker is started again through cli_cluster's supervisor, a SIGSTOPped one
 * continued, before the next case. Logs: $FOLIO_BUILD_DIR/Testing/e2e-logs/migration-<pid>-<n>/. */
#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;
static folio_client_t *g_clients[8];
static int g_n_clients;
static e2e_tracker_t g_tr;
static unsigned g_seed;
static uint64_t g_rng; /* the cases' own generator: rand() is shared with the libraries */

static int rnd(int n)
{
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (int)(g_rng % (uint64_t)n);
}

#define N_GROUPS   3
#define MAX_PROMPT 64

static int group_setup(void **state)
{
    (void)state;
    snprintf(g_env.model, sizeof g_env.model, "/tmp/folio-e2e-migration-%d.gguf", (int)getpid());
    const char *s = getenv("FOLIO_E2E_SEED");
    g_seed = s && *s ? (unsigned)strtoul(s, NULL, 10) : (unsigned)time(NULL) ^ (unsigned)getpid();
    fprintf(stderr, "[e2e] migration: seed %u (FOLIO_E2E_SEED=%u replays it)\n", g_seed, g_seed);
    g_rng = 0x9E3779B97F4A7C15ull ^ g_seed;
    return e2e_make_model(g_env.model);
}

static int group_teardown(void **state)
{
    (void)state;
    unlink(g_env.model);
    return 0;
}

static int test_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_clients; i++) folio_client_destroy(&g_clients[i]);
    g_n_clients = 0;
    e2e_cluster_stop(&g_cluster);
    e2e_tracker_free(&g_tr);
    return 0;
}

static folio_client_t *new_client(void)
{
    assert_true(g_n_clients < 8);
    return g_clients[g_n_clients++] = e2e_client(g_cluster);
}

static const char *st(int code)
{
    return wire_status_name(code);
}

/* ---- jobs and their references ------------------------------------------------------------ */

typedef struct job {
    int32_t prompt[MAX_PROMPT];
    int n_prompt;
    float temperature; /* 0: greedy; else seeded sampling */
    uint64_t seed;
    int max_tokens;
    char stop[2][64];
    int n_stops;
    bool no_migrate;
    /* the uninterrupted run with the stops */
    int32_t *ref_tokens;
    int n_ref;
    char *ref_text;
    int ref_finish;
} job_t;

static folio_generate_params_t job_params(const job_t *j, const char *const *stops)
{
    folio_generate_params_t p = {.tokens = j->prompt,
                                 .n_tokens = j->n_prompt,
                                 .max_tokens = j->max_tokens,
                                 .ignore_eos = true,
                                 .stream = true,
                                 .temperature = j->temperature,
                                 .top_k = j->temperature > 0 ? 40 : 0,
                                 .top_p = j->temperature > 0 ? 0.95f : 0,
                                 .seed = j->seed,
                                 .stop = stops,
                                 .n_stop = stops ? j->n_stops : 0,
                                 .no_migrate = j->no_migrate};
    return p;
}

static void job_init(job_t *j, int i, bool sampled)
{
    memset(j, 0, sizeof *j);
    j->n_prompt = 16 + (int)(((unsigned)i * 13u + g_seed) % 40u);
    e2e_prompt_tokens(7000 + (uint32_t)i * 31u + g_seed % 1000u, j->n_prompt, j->prompt);
    j->temperature = sampled ? 0.9f : 0.0f;
    j->seed = sampled ? 100 + (uint64_t)i + g_seed % 977u : 0;
    j->max_tokens = e2e_long_tokens(900);
}

static size_t utf8_char_len(const char *s)
{
    const unsigned char c = (unsigned char)*s;
    size_t n = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    for (size_t k = 1; k < n; k++)
        if (!s[k]) return k;
    return n;
}

/* A control character c for which prefix + c does not occur in text (the random model writes
 * control bytes too), written after prefix into out. */
static void absent_after(const char *text, const char *prefix, char *out, size_t cap)
{
    for (int c = 1; c < 32; c++) {
        snprintf(out, cap, "%s%c", prefix, c);
        if (!strstr(text, out)) return;
    }
    fail_msg("every control character follows '%s' in the reference text", prefix);
}

/* The stops of j from its output without stops (text, valid UTF-8): a few characters from two
 * thirds in or later that do not occur earlier (the output ends there; a text that only repeats
 * itself gets one it never writes and runs to max_tokens), and the text's most frequent character
 * followed by a control character that never follows it there: every time the text ends in that
 * character it is held back until the next token. */
static void pick_stops(job_t *j, const char *text)
{
    const size_t n = strlen(text);
    assert_true(n > 32);
    absent_after(text, "\x02", j->stop[0], sizeof j->stop[0]);
    size_t at = n * 2 / 3;
    while (at > 0 && ((unsigned char)text[at] & 0xC0) == 0x80) at--;
    bool found = false;
    for (; !found && at < n; at += utf8_char_len(text + at))
        for (int chars = 3; chars <= 12; chars++) {
            size_t len = 0;
            for (int c = 0; c < chars && text[at + len]; c++) len += utf8_char_len(text + at + len);
            if (len >= sizeof j->stop[0]) break;
            char cand[sizeof j->stop[0]];
            memcpy(cand, text + at, len);
            cand[len] = 0;
            if ((size_t)(strstr(text, cand) - text) == at) {
                memcpy(j->stop[0], cand, len + 1);
                found = true;
                break;
            }
        }
    /* the most frequent character */
    size_t best_at = 0, best_len = 1;
    int best = 0;
    for (size_t i = 0; i < n; i += utf8_char_len(text + i)) {
        const size_t l = utf8_char_len(text + i);
        int count = 0;
        for (size_t k = 0; k + l <= n; k += utf8_char_len(text + k)) count += !memcmp(text + k, text + i, l);
        if (count > best) best = count, best_at = i, best_len = l;
        if (i > 400) break; /* enough to find a frequent one */
    }
    char c[8];
    memcpy(c, text + best_at, best_len);
    c[best_len] = 0;
    absent_after(text, c, j->stop[1], sizeof j->stop[1]);
    j->n_stops = 2;
}

/* Runs every job without a fault on a healthy cluster: first without stops to choose them, then
 * with them, the reference. */
static void make_references(job_t *jobs, int n, folio_client_t *const *cl, int n_cl)
{
    for (int pass = 0; pass < 2; pass++) {
        e2e_tracker_t t = {0};
        e2e_req_t *rs[16];
        const char *stops[16][2];
        for (int i = 0; i < n; i++) {
            stops[i][0] = jobs[i].stop[0];
            stops[i][1] = jobs[i].stop[1];
            job_t plain = jobs[i];
            plain.no_migrate = false;
            const folio_generate_params_t p = job_params(&plain, pass ? stops[i] : NULL);
            rs[i] = e2e_send_generate(&t, i % n_cl, cl[i % n_cl], &p, i);
        }
        e2e_pump(&t, cl, n_cl, e2e_ms(60000));
        e2e_assert_invariant(&t, "references");
        for (int i = 0; i < n; i++) {
            const e2e_req_t *r = rs[i];
            if (r->status != FOLIO__V1__STATUS_CODE__OK)
                fail_msg("reference %d: %s (%s)", i, st(r->status), r->message);
            if (!pass) {
                pick_stops(&jobs[i], r->text);
                continue;
            }
            jobs[i].n_ref = r->n_tokens;
            jobs[i].ref_tokens = malloc((size_t)r->n_tokens * sizeof *r->tokens);
            assert_non_null(jobs[i].ref_tokens);
            memcpy(jobs[i].ref_tokens, r->tokens, (size_t)r->n_tokens * sizeof *r->tokens);
            jobs[i].ref_text = strdup(r->text);
            jobs[i].ref_finish = r->finish;
            assert_int_equal(r->prompt_tokens, (uint32_t)jobs[i].n_prompt);
            if (jobs[i].n_ref < 40)
                fail_msg("reference %d: only %d tokens (stop '%s')", i, jobs[i].n_ref, jobs[i].stop[0]);
        }
        e2e_tracker_free(&t);
    }
}

static void jobs_free(job_t *jobs, int n)
{
    for (int i = 0; i < n; i++) {
        free(jobs[i].ref_tokens);
        free(jobs[i].ref_text);
    }
}

/* r, which ended, against its job's reference: the same stream whatever happened on the way. */
static void expect_reference(const e2e_req_t *r, const job_t *j, const char *what)
{
    if (r->status != FOLIO__V1__STATUS_CODE__OK)
        fail_msg("%s: %s (%s) after %d tokens", what, st(r->status), r->message, r->n_tokens);
    if (!e2e_tokens_equal(r->tokens, r->n_tokens, j->ref_tokens, j->n_ref)) {
        int d = 0;
        while (d < r->n_tokens && d < j->n_ref && r->tokens[d] == j->ref_tokens[d]) d++;
        fail_msg("%s: %d tokens, the reference %d; they part at index %d", what, r->n_tokens, j->n_ref, d);
    }
    if (strcmp(r->text, j->ref_text)) {
        size_t d = 0;
        while (r->text[d] && r->text[d] == j->ref_text[d]) d++;
        fail_msg("%s: the text parts from the reference at byte %zu of %zu", what, d, strlen(j->ref_text));
    }
    assert_int_equal(r->finish, j->ref_finish);
    assert_int_equal(r->prompt_tokens, (uint32_t)j->n_prompt);
    assert_int_equal(r->completion, (uint32_t)j->n_ref);
    assert_true(r->cached <= r->prompt_tokens);
}

/* ---- placing, faulting, recovering ----------------------------------------------------------- */

static void drain_others(folio_client_t *ctl, int target, bool undrain)
{
    for (int g = 0; g < N_GROUPS; g++) {
        if (g == target) continue;
        char name[16];
        snprintf(name, sizeof name, "g%d", g);
        fl_error_t err = {0};
        if (folio_client_drain(ctl, name, undrain, e2e_ms(5000), &err))
            fail_msg("%s %s: %s", undrain ? "undrain" : "drain", name, err.msg);
    }
}

static uint64_t migrated(folio_client_t *ctl)
{
    Folio__V1__Response *r = e2e_status(ctl);
    const uint64_t n = r->cluster->requests_migrated;
    folio__v1__response__free_unpacked(r, NULL);
    return n;
}

/* Pumps until every request in rs has at least need[i] tokens (or is final). */
static void pump_until(folio_client_t *const *cl, int n_cl, e2e_req_t *const *rs, const int *need, int n, int wait_ms)
{
    const double deadline = e2e_now_ms() + wait_ms;
    for (;;) {
        bool all = true;
        for (int i = 0; i < n; i++) all &= rs[i]->final || rs[i]->n_tokens >= need[i];
        if (all) return;
        if (e2e_now_ms() > deadline) fail_msg("streams did not reach their token counts within %d ms", wait_ms);
        e2e_pump_ex(&g_tr, cl, n_cl, 2, false);
    }
}

/* The worker of group g comes back: a SIGSTOPped one is continued, a SIGKILLed one started again
 * by the supervisor. */
static void recover(folio_client_t *ctl, int g, bool killed)
{
    char name[16];
    snprintf(name, sizeof name, "g%d", g);
    const double t0 = e2e_now_ms();
    if (!killed) kill(g_cluster->workers[g], SIGCONT);
    for (;;) {
        if (killed) cluster_supervise(g_cluster);
        if (e2e_wait_group(ctl, name, true, false, 100) >= 0) break;
        if (e2e_now_ms() - t0 > e2e_ms(20000)) fail_msg("%s did not come back healthy", name);
    }
    /* a continued worker's old stream, if it still says anything, must reach nobody */
    e2e_pump_ex(&g_tr, g_clients + 1, g_n_clients - 1, 300, false);
    e2e_assert_invariant(&g_tr, "after recovery");
}

/* ---- 1: alone -------------------------------------------------------------------------------- */

static void a_stream_whose_worker_is_killed_or_stopped_goes_on_as_if_nothing_happened(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "migration", N_GROUPS, NULL);
    folio_client_t *ctl = new_client();
    folio_client_t *cl[1] = {new_client()};
    enum { N_JOBS = 5 };
    static job_t jobs[N_JOBS];
    for (int i = 0; i < N_JOBS; i++) job_init(&jobs[i], i, i % 2 == 1);
    jobs[4].no_migrate = true;
    make_references(jobs, N_JOBS, cl, 1);

    /* greedy and sampled, each under SIGKILL and SIGSTOP, on a group that changes every case */
    for (int c = 0; c < N_JOBS; c++) {
        job_t *j = &jobs[c];
        const bool killed = c == 0 || c == 3 || c == 4; /* 0 greedy, 3 sampled; 4 the old rule */
        const int target = c % N_GROUPS;
        const int k = 1 + rnd(j->n_ref / 2);
        const uint64_t before = migrated(ctl);
        drain_others(ctl, target, false);
        const char *stops[2] = {j->stop[0], j->stop[1]};
        const folio_generate_params_t p = job_params(j, stops);
        e2e_req_t *r = e2e_send_generate(&g_tr, 0, cl[0], &p, c);
        const int one = 1;
        pump_until(cl, 1, &r, &one, 1, e2e_ms(10000));
        drain_others(ctl, target, true);
        pump_until(cl, 1, &r, &k, 1, e2e_ms(10000));
        const bool midstream = !r->final;
        const int had = r->n_tokens;
        kill(g_cluster->workers[target], killed ? SIGKILL : SIGSTOP);
        e2e_pump(&g_tr, cl, 1, e2e_ms(30000));
        e2e_assert_invariant(&g_tr, "alone");
        char what[160];
        snprintf(what, sizeof what, "case %d (%s, %s g%d after %d tokens, k %d)", c,
                 j->temperature > 0 ? "sampled" : "greedy", killed ? "SIGKILL" : "SIGSTOP", target, had, k);
        fprintf(stderr, "[e2e] migration: %s: %s on %s, %d tokens, text %zu bytes\n", what, st(r->status), r->group,
                r->n_tokens, r->n_text);
        if (j->no_migrate && midstream) {
            /* The old rule: UNAVAILABLE, and what was sent is the reference's beginning. */
            if (r->status != FOLIO__V1__STATUS_CODE__UNAVAILABLE)
                fail_msg("%s: %s, not UNAVAILABLE", what, st(r->status));
            assert_non_null(strstr(r->message, "tokens were sent"));
            assert_true(r->n_tokens >= had && r->n_tokens < j->n_ref);
            assert_memory_equal(r->tokens, j->ref_tokens, (size_t)r->n_tokens * sizeof *r->tokens);
            assert_int_equal(strncmp(r->text, j->ref_text, r->n_text), 0);
            assert_int_equal(r->completion, (uint32_t)r->n_tokens);
            assert_int_equal(migrated(ctl), before);
        } else {
            expect_reference(r, j, what);
            if (midstream) {
                char name[16];
                snprintf(name, sizeof name, "g%d", target);
                if (!strcmp(r->group, name)) fail_msg("%s: finished on the group that was lost", what);
                assert_int_equal(migrated(ctl), before + 1);
            }
        }
        recover(ctl, target, killed);
    }
    jobs_free(jobs, N_JOBS);
}

/* ---- 2: under load --------------------------------------------------------------------------- */

static void concurrent_streams_of_a_lost_group_all_go_on_and_equal_their_references(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "migration-load", N_GROUPS, NULL);
    folio_client_t *ctl = new_client();
    enum { NC = 4, N_JOBS = 8 };
    folio_client_t *cl[NC];
    for (int i = 0; i < NC; i++) cl[i] = new_client();
    static job_t jobs[N_JOBS];
    for (int i = 0; i < N_JOBS; i++) job_init(&jobs[i], 100 + i, i % 2 == 0);
    make_references(jobs, N_JOBS, cl, NC);

    for (int round = 0; round < 2; round++) {
        const bool killed = round == 0;
        const int target = round == 0 ? 1 : 2;
        const uint64_t before = migrated(ctl);
        drain_others(ctl, target, false);
        e2e_req_t *rs[N_JOBS];
        int need[N_JOBS], one[N_JOBS];
        const char *stops[N_JOBS][2];
        for (int i = 0; i < N_JOBS; i++) {
            stops[i][0] = jobs[i].stop[0];
            stops[i][1] = jobs[i].stop[1];
            const folio_generate_params_t p = job_params(&jobs[i], stops[i]);
            rs[i] = e2e_send_generate(&g_tr, i % NC, cl[i % NC], &p, round * 100 + i);
            one[i] = 1;
            need[i] = 1 + rnd(jobs[i].n_ref / 3);
        }
        pump_until(cl, NC, rs, one, N_JOBS, e2e_ms(20000));
        drain_others(ctl, target, true);
        /* the fault once the first of them reaches its k: the others are wherever they are */
        const double deadline = e2e_now_ms() + e2e_ms(20000);
        for (bool any = false; !any;) {
            for (int i = 0; i < N_JOBS; i++) any |= rs[i]->final || rs[i]->n_tokens >= need[i];
            if (e2e_now_ms() > deadline) fail_msg("no stream reached its token count");
            if (!any) e2e_pump_ex(&g_tr, cl, NC, 2, false);
        }
        int streaming = 0;
        for (int i = 0; i < N_JOBS; i++) streaming += !rs[i]->final && rs[i]->n_tokens > 0;
        kill(g_cluster->workers[target], killed ? SIGKILL : SIGSTOP);
        e2e_pump(&g_tr, cl, NC, e2e_ms(60000));
        e2e_summary(&g_tr, "migration under load");
        e2e_assert_invariant(&g_tr, "migration under load");
        const uint64_t moved = migrated(ctl) - before;
        fprintf(stderr, "[e2e] migration: %s g%d with %d of %d streams mid-stream: %llu migrated\n",
                killed ? "SIGKILL" : "SIGSTOP", target, streaming, N_JOBS, (unsigned long long)moved);
        for (int i = 0; i < N_JOBS; i++) {
            char what[96];
            snprintf(what, sizeof what, "round %d stream %d (%s)", round, i,
                     jobs[i].temperature > 0 ? "sampled" : "greedy");
            expect_reference(rs[i], &jobs[i], what);
        }
        assert_true(moved >= 1 && moved <= (uint64_t)streaming);
        recover(ctl, target, killed);
    }
    jobs_free(jobs, N_JOBS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(a_stream_whose_worker_is_killed_or_stopped_goes_on_as_if_nothing_happened,
                                  test_teardown),
        cmocka_unit_test_teardown(concurrent_streams_of_a_lost_group_all_go_on_and_equal_their_references,
                                  test_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
