/* test_kv_pull.c - KV block pulls between groups end to end: 2 groups on a tiny random model, the
 * workers reporting their prefix caches and serving pulls on loopback (their default).
 *
 * Protects: a prompt cached on one group, sent again once that group is drained, goes to the
 * other group, which pulls the prompt's blocks from the holder instead of computing them (Usage:
 * its cached prompt tokens; Status: blocks pulled and served, hints given) and answers exactly
 * what the holder answered (greedy, the CPU backend: pulled KV is the holder's, bit for bit); the
 * same prompt under another tenant pulls nothing and hits nothing (tenants never share blocks);
 * a holder that stops answering (SIGSTOP) makes the pull end at its timeout and the prompt be
 * computed, with the same answer; malformed messages and pulls on a worker's peer socket are
 * answered or ignored and it goes on serving; tensor-parallel groups (2 ranks each) pull and serve
 * the same way, each block whole (every rank's KV heads). */
#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;

enum { BS = 16, BLOCKS = 12, LEN = BLOCKS * BS + 5, MAX_TOKENS = 8 };

E2E_MODEL_FIXTURES(g_env, "kvpull")

static int test_teardown(void **state)
{
    (void)state;
    e2e_cluster_stop(&g_cluster);
    return 0;
}

static void generate(folio_client_t *c, const int32_t *toks, const char *tenant, folio_result_t *res)
{
    /* Greedy (a zeroed sampling asks for it). */
    folio_generate_params_t p = {.tokens = toks, .n_tokens = LEN, .max_tokens = MAX_TOKENS, .ignore_eos = true,
                                 .tenant = tenant};
    e2e_generate(c, &p, FOLIO__V1__STATUS_CODE__OK, res);
}

typedef struct pull_figures {
    uint64_t pulled, failures, served, index_blocks, hints;
    bool has_peer;
} pull_figures_t;

static pull_figures_t figures(folio_client_t *ctl, const char *group)
{
    Folio__V1__Response *r = e2e_status(ctl);
    const Folio__V1__GroupStatus *g = e2e_group(r, group);
    assert_non_null(g);
    const pull_figures_t f = {g->kv_pulled_blocks, g->kv_pull_failures, g->kv_served_blocks, g->kv_index_blocks,
                              r->cluster->kv_pull_hints, *g->kv_peer_endpoint != 0};
    folio__v1__response__free_unpacked(r, NULL);
    return f;
}

/* Waits until group's first `blocks` blocks are in the coordinator's index (its KV events). */
static void wait_indexed(folio_client_t *ctl, const char *group, uint64_t blocks)
{
    const double t0 = e2e_now_ms();
    while (figures(ctl, group).index_blocks < blocks) {
        if (e2e_now_ms() - t0 > e2e_ms(5000)) fail_msg("%s's blocks never reached the coordinator's index", group);
        e2e_sleep_ms(20);
    }
}

/* Status's pull figures come with each group's own heartbeats: polls group's until its pulled
 * blocks reach `pulled`, its ended pulls `failures` and its served blocks `served` (or 5 s pass),
 * and returns them. */
static pull_figures_t figures_after(folio_client_t *ctl, const char *group, uint64_t pulled, uint64_t failures,
                                    uint64_t served)
{
    const double t0 = e2e_now_ms();
    pull_figures_t f;
    while (f = figures(ctl, group), (f.pulled < pulled || f.failures < failures || f.served < served) &&
                                        e2e_now_ms() - t0 < e2e_ms(5000))
        e2e_sleep_ms(50);
    return f;
}

static void drain(folio_client_t *ctl, const char *group, bool undrain)
{
    fl_error_t err = {0};
    if (folio_client_drain(ctl, group, undrain, e2e_ms(5000), &err)) fail_msg("drain %s: %s", group, err.msg);
}

static void expect_same_tokens(const folio_result_t *a, const folio_result_t *b, const char *what)
{
    if (!e2e_tokens_equal(a->tokens, a->n_tokens, b->tokens, b->n_tokens))
        fail_msg("%s: the answer differs from the holder's", what);
}

/* A prompt answered by one group (home), that group drained, the prompt again: the other group pulls
 * all its blocks from home and answers the same. Its figures after. */
static pull_figures_t pulled_from_drained_holder(folio_client_t *ctl, const int32_t *prompt, const char *tag,
                                                 char *home, char *other, folio_result_t *first)
{
    folio_result_t res = {0};
    generate(ctl, prompt, NULL, first);
    snprintf(home, 64, "%s", first->group);
    snprintf(other, 64, "%s", strcmp(home, "g0") ? "g0" : "g1");
    assert_true(figures(ctl, home).has_peer && figures(ctl, other).has_peer);
    wait_indexed(ctl, home, BLOCKS);
    drain(ctl, home, false);
    const pull_figures_t before = figures(ctl, other);
    generate(ctl, prompt, NULL, &res);
    assert_string_equal(res.group, other);
    const pull_figures_t after = figures_after(ctl, other, before.pulled + BLOCKS, 0, 0);
    const pull_figures_t holder = figures_after(ctl, home, 0, 0, BLOCKS);
    fprintf(stderr, "[e2e] %s: %s -> %s: %u of %u prompt tokens cached, %llu blocks pulled, %llu served, %llu hints\n",
            tag, home, other, res.cached_prompt_tokens, res.prompt_tokens,
            (unsigned long long)(after.pulled - before.pulled), (unsigned long long)holder.served,
            (unsigned long long)after.hints);
    if (res.cached_prompt_tokens < BLOCKS * BS)
        fail_msg("%u cached prompt tokens on %s, expected the %d pulled", res.cached_prompt_tokens, other, BLOCKS * BS);
    assert_true(after.pulled - before.pulled >= BLOCKS);
    assert_true(holder.served >= BLOCKS);
    assert_true(after.hints > before.hints);
    assert_int_equal(after.failures, before.failures);
    expect_same_tokens(first, &res, "pulled");
    folio_result_clear(&res);
    return after;
}

static void a_drained_holders_blocks_are_pulled_not_computed(void **state)
{
    (void)state;
    static const char *const wargs[] = {"--kv-events-ms", "20", "--kv-pull-timeout-ms", "300", NULL};
    const cluster_opts_t o = {.worker_args = wargs, .heartbeat_ms = 500};
    g_cluster = e2e_cluster_start(&g_env, "kvpull", 2, &o);
    folio_client_t *ctl = e2e_client(g_cluster);
    int32_t prompt[LEN];
    e2e_prompt_tokens(7, LEN, prompt);

    /* The holder drained: the prompt goes to the other group, which pulls its blocks. */
    folio_result_t first = {0}, res = {0};
    char home[64], other[64];
    const pull_figures_t after = pulled_from_drained_holder(ctl, prompt, "kvpull", home, other, &first);

    /* Another tenant: its chain differs, so nothing is pulled and nothing hits. */
    generate(ctl, prompt, "someone-else", &res);
    assert_string_equal(res.group, other);
    assert_int_equal(res.cached_prompt_tokens, 0);
    assert_int_equal(figures(ctl, other).pulled, after.pulled);
    expect_same_tokens(&first, &res, "another tenant");
    folio_result_clear(&res);
    folio_result_clear(&first);

    /* A holder that stops answering: the pull times out and the prompt is computed. */
    drain(ctl, home, true);
    int32_t prompt2[LEN];
    char home2[64] = "";
    for (uint32_t seed = 100; seed < 140 && strcmp(home2, home); seed++) { /* a prompt the same group holds */
        e2e_prompt_tokens(seed, LEN, prompt2);
        generate(ctl, prompt2, NULL, &first);
        snprintf(home2, sizeof home2, "%s", first.group);
        if (strcmp(home2, home)) folio_result_clear(&first);
    }
    assert_string_equal(home2, home);
    wait_indexed(ctl, home, 2 * BLOCKS);
    drain(ctl, home, false);
    const int wi = home[1] - '0';
    kill(g_cluster->workers[wi], SIGSTOP);
    const pull_figures_t before2 = figures(ctl, other);
    generate(ctl, prompt2, NULL, &res);
    kill(g_cluster->workers[wi], SIGCONT);
    assert_string_equal(res.group, other);
    const pull_figures_t after2 = figures_after(ctl, other, 0, before2.failures + 1, 0);
    fprintf(stderr, "[e2e] kvpull: holder stopped: %u cached prompt tokens, %llu pulls ended early\n",
            res.cached_prompt_tokens, (unsigned long long)(after2.failures - before2.failures));
    assert_true(after2.failures > before2.failures);
    assert_int_equal(res.cached_prompt_tokens, 0);
    expect_same_tokens(&first, &res, "after a timed-out pull");
    folio_result_clear(&res);
    folio_result_clear(&first);
    folio_client_destroy(&ctl);
}

/* Two tensor-parallel groups (2 ranks each): the holder's rank 0 gathers each block's KV heads from
 * both ranks, the puller's rank 0 hands them out to its ranks, and the answer is the holder's. */
static void tensor_parallel_groups_pull_and_serve_whole_blocks(void **state)
{
    (void)state;
    static const char *const wargs[] = {"--kv-events-ms", "20", "--kv-pull-timeout-ms", "3000", NULL};
    const cluster_opts_t o = {.worker_args = wargs, .heartbeat_ms = 1000, .tp = 2, .threads_per_worker = 1};
    g_cluster = e2e_cluster_start(&g_env, "kvpull-tp", 2, &o);
    folio_client_t *ctl = e2e_client(g_cluster);
    int32_t prompt[LEN];
    e2e_prompt_tokens(8, LEN, prompt);
    folio_result_t first = {0};
    char home[64], other[64];
    pulled_from_drained_holder(ctl, prompt, "kvpull-tp", home, other, &first);
    folio_result_clear(&first);
    folio_client_destroy(&ctl);
}

/* Receives one KvBlocks on sock within 5 s (NULL: none came). */
static Folio__V1__KvBlocks *answer(void *sock)
{
    zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, e2e_ms(5000)) <= 0) return NULL;
    wire_msg_t m;
    fl_error_t err = {0};
    Folio__V1__KvBlocks *b = NULL;
    if (!wire_recv(sock, false, false, &m, &err) && !wire_check_header(&m, WIRE_HEADER_PEER, &err) &&
        m.cmd == WIRE_CMD_KV_BLOCKS)
        b = wire_decode_kv_blocks(m.body, m.body_len, &err);
    wire_msg_close(&m);
    return b;
}

/* Bad input on a worker's peer socket: junk frames, an undecodable body, a pull of another layout,
 * one whose first block lies past its tokens, another tenant's blocks. Each pull is answered (no
 * blocks, the layout's refusal saying why), nothing crashes, and the worker goes on serving. */
static void bad_pulls_are_answered_or_ignored_and_the_holder_lives_on(void **state)
{
    (void)state;
    static const char *const wargs[] = {"--kv-events-ms", "20", NULL};
    const cluster_opts_t o = {.worker_args = wargs};
    g_cluster = e2e_cluster_start(&g_env, "kvpull-bad", 1, &o);
    folio_client_t *ctl = e2e_client(g_cluster);
    int32_t prompt[LEN];
    e2e_prompt_tokens(9, LEN, prompt);
    folio_result_t res = {0};
    generate(ctl, prompt, NULL, &res);
    folio_result_clear(&res);
    Folio__V1__Response *st = e2e_status(ctl);
    const Folio__V1__GroupStatus *g = e2e_group(st, "g0");
    assert_non_null(g);
    char endpoint[300], layout[600];
    snprintf(endpoint, sizeof endpoint, "%s", g->kv_peer_endpoint);
    snprintf(layout, sizeof layout, "%s|%s|%u", g->model_id, g->kv_type, st->cluster->block_size);
    folio__v1__response__free_unpacked(st, NULL);
    assert_true(endpoint[0]);

    void *zctx = zmq_ctx_new();
    fl_error_t err = {0};
    void *sock = wire_socket(zctx, ZMQ_DEALER, NULL, &err);
    assert_non_null(sock);
    assert_int_equal(zmq_connect(sock, endpoint), 0);
    zmq_send(sock, "junk", 4, 0);                                       /* no folio framing */
    wire_send(sock, NULL, 0, false, WIRE_HEADER_WORKER, WIRE_CMD_KV_PULL, NULL, &err); /* the wrong side */
    zmq_send(sock, WIRE_HEADER_PEER, strlen(WIRE_HEADER_PEER), ZMQ_SNDMORE);
    const uint8_t cmd = WIRE_CMD_KV_PULL;
    zmq_send(sock, &cmd, 1, ZMQ_SNDMORE);
    zmq_send(sock, "\xff\xff\xff", 3, 0);                                /* a body that does not decode */

    Folio__V1__KvPull p = FOLIO__V1__KV_PULL__INIT;
    p.tokens = prompt;
    p.n_tokens = BLOCKS * BS;
    p.tenant = (char *)"";
    struct {
        const char *layout, *tenant;
        uint32_t first;
        uint32_t want_blocks;
        bool want_error;
    } cases[] = {
        {"some-other-model|f16|16", "", 0, 0, true},
        {layout, "", 1000000, 0, false},
        {layout, "someone-else", 0, 0, false},
        {layout, "", 0, BLOCKS, false}, /* and a good one still works */
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        p.pull_id = 100 + k;
        p.layout = (char *)cases[k].layout;
        p.tenant = (char *)cases[k].tenant;
        p.first_block = cases[k].first;
        assert_int_equal(wire_send(sock, NULL, 0, false, WIRE_HEADER_PEER, WIRE_CMD_KV_PULL, &p.base, &err), 0);
        uint32_t blocks = 0;
        bool last = false, error = false;
        while (!last) {
            Folio__V1__KvBlocks *b = answer(sock);
            if (!b) fail_msg("pull case %zu: no answer", k);
            assert_int_equal(b->pull_id, p.pull_id);
            blocks += b->n_blocks;
            last = b->last;
            error = error || *b->error;
            folio__v1__kv_blocks__free_unpacked(b, NULL);
        }
        fprintf(stderr, "[e2e] kvpull-bad: case %zu: %u blocks%s\n", k, blocks, error ? ", refused" : "");
        assert_int_equal(blocks, cases[k].want_blocks);
        assert_int_equal(error, cases[k].want_error);
    }
    zmq_close(sock);
    zmq_ctx_term(zctx);
    generate(ctl, prompt, NULL, &res);
    assert_int_equal(res.cached_prompt_tokens, BLOCKS * BS);
    folio_result_clear(&res);
    folio_client_destroy(&ctl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(a_drained_holders_blocks_are_pulled_not_computed, test_teardown),
        cmocka_unit_test_teardown(bad_pulls_are_answered_or_ignored_and_the_holder_lives_on, test_teardown),
        cmocka_unit_test_teardown(tensor_parallel_groups_pull_and_serve_whole_blocks, test_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
