/* test_long_prompts_slow.c - long prompts through a cluster of several groups: liveness does not
 * depend on how long a step takes.
 *
 * Protects: a worker's heartbeats keep coming while it computes a long prompt (worker_beat.c), so
 * with 100 ms heartbeats (dead after 0.3 s of silence) and prefill chunks that take longer than
 * that, prompts of 1k, 2k and 4k tokens are served with no group declared dead and nothing failed
 * over; prompt chunks deep in a context are sized by their cost (scheduler.c), and the first token
 * of each prompt comes within 2x of the engine's own prefill time for it (gen_run in this
 * process, one thread, as a worker has; the goal, 1.2x, is printed, not asserted: timings on
 * shared cores are noisy). Before the heartbeat thread, every group died on the way
 * and the requests bounced between them. */
#include "e2e_util.h"

#include "engine.h"

#define N_GROUPS 2
#define HEARTBEAT_MS 100

static e2e_env_t g_env;
static cluster_t *g_cluster;
static folio_client_t *g_client;

/* Slower than e2e_make_model's a token, so that one 512-token chunk takes several heartbeats. */
static int make_model(const char *path)
{
    mkmodel_params_t p;
    mkmodel_params_default(&p);
    p.n_layers = 8;
    p.dim = 512;
    p.ff = 1536;
    p.n_heads = 8;
    p.n_kv_heads = 4;
    p.vocab = E2E_VOCAB;
    p.ctx = 8192;
    p.type = FL_TYPE_Q8_0;
    p.seed = 5;
    return e2e_write_model(path, &p);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(g_env.model, sizeof g_env.model, "/tmp/folio-e2e-long-%d.gguf", (int)getpid());
    return make_model(g_env.model);
}

static int group_teardown(void **state)
{
    (void)state;
    unlink(g_env.model);
    return 0;
}

/* The engine's own time to a prompt's first token: the same scheduler in this process, one thread. */
static double engine_prefill_s(const int32_t *prompt, int n)
{
    engine_opts_t o = {.model_path = g_env.model, .backend = "cpu", .threads = 1, .kv_budget_bytes = 64u << 20};
    fl_error_t err = {0};
    engine_t *e = engine_new(&o, &err);
    if (!e) fail_msg("engine: %s", err.msg);
    int32_t out[2];
    gen_request_t r = {.req.prompt = prompt, .req.n_prompt = n, .req.max_tokens = 1, .req.ignore_eog = true, .tokens = out};
    if (gen_run(e->model, e->kv, &r, 1, NULL, NULL, NULL, &err)) fail_msg("gen_run: %s", err.msg);
    engine_destroy(&e);
    return r.t_first_token - r.t_submit;
}

typedef struct first_token {
    double t0, first;
} first_token_t;

static int on_delta(void *user, const folio_event_t *ev)
{
    first_token_t *f = user;
    if (ev->n_tokens > 0 && f->first == 0) f->first = e2e_now_ms();
    return FOLIO_CONTINUE;
}

static void long_prompts_on_several_groups_keep_every_group_alive(void **state)
{
    (void)state;
    const char *worker_args[] = {"--kv-budget", "64MiB", NULL};
    cluster_opts_t o = {.heartbeat_ms = HEARTBEAT_MS, .worker_args = worker_args};
    g_cluster = e2e_cluster_start(&g_env, "long", N_GROUPS, &o);
    g_client = e2e_client(g_cluster);
    const int sizes[] = {1024, 2048, 4096};
    for (int i = 0; i < 3; i++) {
        const int n = sizes[i];
        int32_t *prompt = malloc((size_t)n * sizeof *prompt);
        /* The best of two runs on each side (different prompts through the cluster, so neither
         * is a prefix-cache hit): the machine's other work adds noise, not the cluster. */
        double cluster_s = 1e9, engine_s = 1e9;
        const char *group = "";
        for (int run = 0; run < 2; run++) {
            e2e_prompt_tokens(900 + (uint32_t)(2 * i + run), n, prompt);
            folio_generate_params_t p = {.tokens = prompt, .n_tokens = n, .max_tokens = 2, .ignore_eos = true,
                                         .stream = true};
            first_token_t f = {.t0 = e2e_now_ms()};
            folio_result_t res;
            fl_error_t err = {0};
            if (folio_client_generate(g_client, &p, on_delta, &f, e2e_ms(120000), &res, &err))
                fail_msg("generate %d: %s", n, err.msg);
            if (res.status != FOLIO__V1__STATUS_CODE__OK)
                fail_msg("a %d-token prompt: %s (%s)", n, wire_status_name(res.status), res.message);
            if ((f.first - f.t0) * 1e-3 < cluster_s) cluster_s = (f.first - f.t0) * 1e-3;
            group = res.group[0] == 'g' && res.group[1] == '1' ? "g1" : "g0";
            folio_result_clear(&res);
            const double e = engine_prefill_s(prompt, n);
            if (e < engine_s) engine_s = e;
        }
        fprintf(stderr, "[e2e] long: %d tokens (last on %s): first token after %.2fs, the engine alone %.2fs (x%.2f)\n",
                n, group, cluster_s, engine_s, cluster_s / engine_s);
        assert_true(engine_s > 3.0 * HEARTBEAT_MS * 1e-3); /* the case this test is about */
        /* The goal is 1.2x (printed above); the check is loose because ctest runs another test on
         * the same two cores, which lands on one side of the comparison and not the other (CI saw
         * 1.26x). What it catches is the cluster's own overhead: chunks cut far too small, or
         * heartbeats stalling the compute thread. */
        if (!E2E_ASAN && cluster_s > 2.0 * engine_s)
            fail_msg("a %d-token prompt's first token came after %.2fs, over 2x the engine's %.2fs", n, cluster_s,
                     engine_s);
        free(prompt);
    }
    Folio__V1__Response *st = e2e_status(g_client);
    fprintf(stderr, "[e2e] long: %llu requests failed over\n", (unsigned long long)st->cluster->requests_failed_over);
    assert_int_equal(st->cluster->requests_failed_over, 0);
    for (size_t i = 0; i < st->cluster->n_groups; i++) assert_true(st->cluster->groups[i]->healthy);
    folio__v1__response__free_unpacked(st, NULL);
    /* And the coordinator never declared a group dead on the way. */
    char path[1200], line[512];
    snprintf(path, sizeof path, "%s/coordinator.log", g_env.log_dir);
    FILE *log = fopen(path, "r");
    assert_non_null(log);
    while (fgets(line, sizeof line, log))
        if (strstr(line, "group dead")) fail_msg("the coordinator logged: %s", line);
    fclose(log);
}

static int test_teardown(void **state)
{
    (void)state;
    folio_client_destroy(&g_client);
    e2e_cluster_stop(&g_cluster);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(long_prompts_on_several_groups_keep_every_group_alive, test_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
