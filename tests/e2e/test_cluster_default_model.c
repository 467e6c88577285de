/* test_cluster_default_model.c - the cluster on the default model (SmolLM2-135M-Instruct Q4_1):
 * real chat prompts streamed concurrently through 2 worker groups keep the invariant and give
 * readable text, and a raw completion through the cluster equals `folioctl run`'s token for token.
 * Skipped (exit 77) when the model is missing (scripts/setup.sh fetches it). Label: e2e, slow. */
#include "e2e_util.h"

static e2e_env_t g_env;
static cluster_t *g_cluster;
static folio_client_t *g_clients[8];
static int g_n_clients;
static e2e_tracker_t g_tr;

static int test_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_clients; i++) folio_client_destroy(&g_clients[i]);
    g_n_clients = 0;
    e2e_cluster_stop(&g_cluster);
    e2e_tracker_free(&g_tr);
    return 0;
}

static folio_client_t *new_client(void) { return g_clients[g_n_clients++] = e2e_client(g_cluster); }

/* Whole-string UTF-8 check (no overlongs, no surrogates, nothing above U+10FFFF). */
static bool valid_utf8(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p, n;
        uint32_t cp;
        if (c < 0x80) {
            p++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            n = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        for (unsigned i = 1; i <= n; i++) {
            if ((p[i] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (p[i] & 0x3f);
        }
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        p += n + 1;
    }
    return true;
}

static void chat_streams_through_two_groups_keep_the_invariant_and_read_as_text(void **state)
{
    (void)state;
    g_cluster = e2e_cluster_start(&g_env, "default-chat", 2, NULL);
    static const char *const questions[] = {
        "What is the capital of France? Answer in one sentence.",
        "Write a haiku about the sea.",
        "List three primary colors.",
        "Explain in two sentences why the sky is blue.",
        "Translate 'good morning' into Spanish.",
        "Give me a short tip for learning to program.",
    };
    enum { NQ = sizeof questions / sizeof *questions, NC = 3 };
    folio_client_t *cl[NC];
    for (int i = 0; i < NC; i++) cl[i] = new_client();
    folio_chat_message_t msgs[NQ][2];
    for (int q = 0; q < NQ; q++) {
        msgs[q][0] = (folio_chat_message_t){"system", "You are a helpful assistant."};
        msgs[q][1] = (folio_chat_message_t){"user", questions[q]};
        folio_generate_params_t p = {.messages = msgs[q], .n_messages = 2, .max_tokens = 48, .stream = true};
        e2e_send_generate(&g_tr, q % NC, cl[q % NC], &p, q);
    }
    e2e_pump(&g_tr, cl, NC, e2e_ms(120000));
    e2e_summary(&g_tr, "default-chat");
    e2e_assert_invariant(&g_tr, "default-chat");
    bool used[2] = {false, false};
    for (int i = 0; i < g_tr.n; i++) {
        const e2e_req_t *r = &g_tr.reqs[i];
        fprintf(stderr, "[e2e] %s -> [%s, %d tokens, %s] %s\n", questions[r->tag], r->group, r->n_tokens,
                wire_finish_name(r->finish), r->text);
        if (r->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("'%s': %s (%s)", questions[r->tag], wire_status_name(r->status), r->message);
        if (r->finish != FOLIO__V1__FINISH_REASON__FINISH_STOP && r->finish != FOLIO__V1__FINISH_REASON__FINISH_LENGTH)
            fail_msg("'%s': finish reason %d", questions[r->tag], r->finish);
        if (r->finish == FOLIO__V1__FINISH_REASON__FINISH_LENGTH) assert_int_equal(r->n_tokens, 48);
        if (r->n_tokens == 0 || r->n_text == 0) fail_msg("'%s': empty answer", questions[r->tag]);
        if (!valid_utf8(r->text)) fail_msg("'%s': the streamed text is not valid UTF-8", questions[r->tag]);
        if (r->prompt_tokens < 10) fail_msg("'%s': %u prompt tokens for a templated chat", questions[r->tag], r->prompt_tokens);
        used[0] |= !strcmp(r->group, "g0");
        used[1] |= !strcmp(r->group, "g1");
    }
    if (!used[0] || !used[1]) fprintf(stderr, "[e2e] note: all chat requests ran on one group\n");
}

/* The tokens of `folioctl run -p TEXT -n N --temperature 0 --json` (raw completion, greedy), or -1. */
static int folioctl_run_tokens(const char *text, int n, int32_t *out, int cap)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "FOLIO_LOG=warn '%s/folioctl' run -m '%s' -p '%s' -n %d --temperature 0 --threads 1 --json 2>/dev/null",
             getenv("FOLIO_BUILD_DIR"), g_env.model, text, n);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    static char buf[1 << 20];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    buf[len] = 0;
    if (pclose(f) != 0) return -1;
    char *last = buf, *nl;
    while ((nl = strchr(last, '\n')) && nl[1]) last = nl + 1;
    char *t = strstr(last, "\"tokens\":[");
    if (!t) return -1;
    t += strlen("\"tokens\":[");
    int k = 0;
    while (*t && *t != ']' && k < cap) {
        char *end;
        out[k++] = (int32_t)strtol(t, &end, 10);
        if (end == t) return -1;
        t = end;
        if (*t == ',') t++;
    }
    return k;
}

static void raw_completions_equal_folioctl_run_token_for_token(void **state)
{
    (void)state;
    static const char *const prompts[] = {
        "The history of the Roman Empire",
        "Once upon a time, in a small village",
        "def fibonacci(n):",
    };
    enum { NP = sizeof prompts / sizeof *prompts, N = 32 };
    int32_t ref[NP][N];
    int n_ref[NP];
    for (int i = 0; i < NP; i++) {
        n_ref[i] = folioctl_run_tokens(prompts[i], N, ref[i], N);
        if (n_ref[i] <= 0) fail_msg("folioctl run -p '%s' failed", prompts[i]);
    }
    g_cluster = e2e_cluster_start(&g_env, "default-raw", 2, NULL);
    folio_client_t *cl[2] = {new_client(), new_client()};
    /* All at once (batched together on the workers), and then each again alone. */
    for (int i = 0; i < NP; i++) {
        folio_generate_params_t p = {.text = prompts[i], .max_tokens = N, .stream = true};
        e2e_send_generate(&g_tr, i % 2, cl[i % 2], &p, i);
    }
    e2e_pump(&g_tr, cl, 2, e2e_ms(120000));
    e2e_assert_invariant(&g_tr, "default-raw");
    for (int i = 0; i < g_tr.n; i++) {
        const e2e_req_t *r = &g_tr.reqs[i];
        if (r->status != FOLIO__V1__STATUS_CODE__OK) fail_msg("'%s': %s (%s)", prompts[r->tag], wire_status_name(r->status), r->message);
        if (!e2e_tokens_equal(r->tokens, r->n_tokens, ref[r->tag], n_ref[r->tag])) {
            int d = 0;
            while (d < r->n_tokens && d < n_ref[r->tag] && r->tokens[d] == ref[r->tag][d]) d++;
            fail_msg("'%s' on %s: %d tokens, folioctl run gave %d; first difference at %d", prompts[r->tag], r->group,
                     r->n_tokens, n_ref[r->tag], d);
        }
        if (!valid_utf8(r->text)) fail_msg("'%s': text is not valid UTF-8", prompts[r->tag]);
    }
    for (int i = 0; i < NP; i++) {
        folio_generate_params_t p = {.text = prompts[i], .max_tokens = N, .stream = false};
        folio_result_t res;
        e2e_generate(cl[0], &p, FOLIO__V1__STATUS_CODE__OK, &res);
        if (!e2e_tokens_equal(res.tokens, res.n_tokens, ref[i], n_ref[i]))
            fail_msg("'%s' alone, unstreamed, on %s: differs from folioctl run", prompts[i], res.group);
        folio_result_clear(&res);
    }
}

int main(void)
{
    const char *src = getenv("FOLIO_SOURCE_DIR");
    const char *m = getenv("FOLIO_MODEL");
    if (m && *m) snprintf(g_env.model, sizeof g_env.model, "%s", m);
    else snprintf(g_env.model, sizeof g_env.model, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", src ? src : ".");
    if (access(g_env.model, R_OK) != 0) {
        printf("SKIP: default model %s not found (run scripts/setup.sh)\n", g_env.model);
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(chat_streams_through_two_groups_keep_the_invariant_and_read_as_text, test_teardown),
        cmocka_unit_test_teardown(raw_completions_equal_folioctl_run_token_for_token, test_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
