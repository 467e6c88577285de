/* test_request.c - the request layer (worker/request.c): what a GenerateRequest means and the
 * output stream every front end shares.
 *
 * Protects: unset sampling fields take the defaults and set ones (0 included) keep their value;
 * out-of-range fields are refused naming the field; spec and max_draft reach the scheduler (AUTO and
 * 0 when an old client sends neither), a max_draft over 16 or a spec the schema does not name is
 * refused naming the field; logit bias is sorted, -100 bans, duplicates are
 * refused; the earliest of several stop strings wins, a match straddling old and new bytes is
 * found, the held-back tail is exactly the longest proper prefix of a stop string ending the text;
 * deltas hand out each token once, in order, and keep what a failed send did not deliver; the
 * stop string's token is not output; a stream resumed elsewhere after whatever its client had
 * (request_stream_resume: any cut, any pattern of failed sends, characters split across tokens,
 * stop-string prefixes held back) hands out exactly the rest: the same tokens and text as one
 * uninterrupted stream, no index twice, and the same stop; resumes that cannot be are refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "request.h"

#define N_VOCAB 100

/* --- resolving ------------------------------------------------------------------------------ */

static int32_t g_prompt[] = {1, 2, 3};

static Folio__V1__GenerateRequest base_request(void)
{
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    g.prompt_tokens = g_prompt;
    g.n_prompt_tokens = 3;
    return g;
}

static const request_defaults_t *defaults(void)
{
    static request_defaults_t d;
    request_defaults_init(&d, NULL);
    return &d;
}

static void unset_fields_take_the_defaults_and_zero_is_kept(void **state)
{
    (void)state;
    Folio__V1__GenerateRequest g = base_request();
    request_t r;
    fl_error_t err = {0};
    assert_int_equal(request_resolve(&r, 7, &g, "", 0, defaults(), N_VOCAB, &err), 0);
    assert_true(r.sched.id == 7);
    assert_int_equal(r.sched.max_tokens, FOLIO_DEFAULT_MAX_TOKENS);
    assert_true(r.sched.sampling.temperature == 0.8f);
    assert_int_equal(r.sched.sampling.top_k, 40);
    assert_true(r.sched.sampling.top_p == 0.95f);
    assert_true(r.sched.sampling.min_p == 0.05f);
    assert_true(r.sched.penalties.repetition == 1.0f);
    assert_int_equal(r.sched.penalties.n_bias, 0);
    request_release(&r);

    Folio__V1__SamplingParams s = FOLIO__V1__SAMPLING_PARAMS__INIT;
    folio_sampling_set_temperature(&s, 0); /* an explicit 0 is greedy, not "unset" */
    folio_sampling_set_top_k(&s, 0);
    folio_sampling_set_min_p(&s, 0);
    s.seed = 99;
    g.sampling = &s;
    g.max_tokens = 5;
    assert_int_equal(request_resolve(&r, 8, &g, "t", 1000, defaults(), N_VOCAB, &err), 0);
    assert_true(r.sched.sampling.temperature == 0);
    assert_int_equal(r.sched.sampling.top_k, 0);
    assert_true(r.sched.sampling.min_p == 0);
    assert_true(r.sched.sampling.top_p == 0.95f); /* still unset */
    assert_true(r.sched.sampling.seed == 99);
    assert_int_equal(r.sched.max_tokens, 5);
    assert_true(r.sched.deadline > 0);
    request_release(&r);
}

static void expect_refused(Folio__V1__GenerateRequest *g, const char *field)
{
    request_t r;
    fl_error_t err = {0};
    assert_int_equal(request_resolve(&r, 1, g, "", 0, defaults(), N_VOCAB, &err), FL_EINVAL);
    if (!strstr(err.msg, field)) fail_msg("message '%s' does not name %s", err.msg, field);
}

static void out_of_range_fields_are_refused_by_name(void **state)
{
    (void)state;
    Folio__V1__GenerateRequest g = base_request();
    Folio__V1__SamplingParams s = FOLIO__V1__SAMPLING_PARAMS__INIT;
    g.sampling = &s;
    folio_sampling_set_top_p(&s, 0); /* would keep no token: refused rather than read as "off" */
    expect_refused(&g, "top_p");
    folio_sampling_set_top_p(&s, 1.5f);
    expect_refused(&g, "top_p");
    folio_sampling_set_top_p(&s, 1);
    folio_sampling_set_temperature(&s, -1);
    expect_refused(&g, "temperature");
    folio_sampling_set_temperature(&s, NAN);
    expect_refused(&g, "temperature");
    folio_sampling_set_temperature(&s, 1);
    folio_sampling_set_min_p(&s, 2);
    expect_refused(&g, "min_p");
    folio_sampling_set_min_p(&s, 0);
    folio_sampling_set_repetition_penalty(&s, 0);
    expect_refused(&g, "repetition_penalty");
    folio_sampling_set_repetition_penalty(&s, 1.1f);
    folio_sampling_set_presence_penalty(&s, 3);
    expect_refused(&g, "presence_penalty");
    folio_sampling_set_presence_penalty(&s, 0);
    s.top_logprobs = 2; /* without logprobs */
    expect_refused(&g, "top_logprobs");
    s.logprobs = true;
    s.top_logprobs = SCHED_MAX_TOP_LOGPROBS + 1;
    expect_refused(&g, "top_logprobs");
    s.top_logprobs = 2;

    int32_t bad_prompt[] = {1, N_VOCAB};
    g.prompt_tokens = bad_prompt;
    g.n_prompt_tokens = 2;
    expect_refused(&g, "prompt_tokens[1]");
    g.n_prompt_tokens = 0;
    expect_refused(&g, "prompt_tokens");
    g = base_request();
    char *stops[] = {"ok", ""};
    g.stop = stops;
    g.n_stop = 2;
    expect_refused(&g, "stop[1]");
}

static void spec_and_max_draft_reach_the_scheduler_and_bad_values_are_refused(void **state)
{
    (void)state;
    Folio__V1__GenerateRequest g = base_request();
    request_t r;
    fl_error_t err = {0};
    /* An old client sends neither field: AUTO and the default draft length. */
    assert_int_equal(request_resolve(&r, 1, &g, "", 0, defaults(), N_VOCAB, &err), 0);
    assert_int_equal(r.sched.spec, SCHED_SPEC_AUTO);
    assert_int_equal(r.sched.max_draft, 0);
    request_release(&r);
    const struct { Folio__V1__SpecMode mode; sched_spec_t sched; const char *name; } modes[] = {
        {FOLIO__V1__SPEC_MODE__SPEC_AUTO, SCHED_SPEC_AUTO, "auto"},
        {FOLIO__V1__SPEC_MODE__SPEC_NONE, SCHED_SPEC_NONE, "none"},
        {FOLIO__V1__SPEC_MODE__SPEC_NGRAM, SCHED_SPEC_NGRAM, "ngram"},
        {FOLIO__V1__SPEC_MODE__SPEC_MEDUSA, SCHED_SPEC_MEDUSA, "medusa"},
    };
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) {
        g.spec = modes[i].mode;
        g.max_draft = (uint32_t)i * 5 + 1;
        assert_int_equal(request_resolve(&r, 1, &g, "", 0, defaults(), N_VOCAB, &err), 0);
        assert_int_equal(r.sched.spec, modes[i].sched);
        assert_int_equal(r.sched.max_draft, (int)i * 5 + 1);
        request_release(&r);
        /* The flag names (folioctl and folio-worker --spec) are the same modes. */
        Folio__V1__SpecMode parsed;
        assert_true(folio_spec_mode_parse(modes[i].name, &parsed));
        assert_int_equal(parsed, modes[i].mode);
        assert_string_equal(folio_spec_mode_name(modes[i].mode), modes[i].name);
    }
    Folio__V1__SpecMode parsed;
    assert_false(folio_spec_mode_parse("eagle", &parsed));
    assert_null(folio_spec_mode_name(4));

    g.spec = FOLIO__V1__SPEC_MODE__SPEC_NGRAM;
    g.max_draft = FOLIO_MAX_DRAFT;
    assert_int_equal(request_resolve(&r, 1, &g, "", 0, defaults(), N_VOCAB, &err), 0);
    assert_int_equal(r.sched.max_draft, SCHED_MAX_DRAFT);
    request_release(&r);
    g.max_draft = FOLIO_MAX_DRAFT + 1;
    expect_refused(&g, "max_draft");
    g.max_draft = UINT32_MAX;
    expect_refused(&g, "max_draft");
    g.max_draft = 0;
    g.spec = (Folio__V1__SpecMode)4;
    expect_refused(&g, "spec");
    g.spec = (Folio__V1__SpecMode)-1;
    expect_refused(&g, "spec");

    /* A number this schema does not name survives decoding (proto3 enums are open) and is refused,
     * not taken for AUTO. */
    g.spec = (Folio__V1__SpecMode)9;
    uint8_t buf[256];
    const size_t n = folio__v1__generate_request__pack(&g, buf);
    Folio__V1__GenerateRequest *d = folio__v1__generate_request__unpack(NULL, n, buf);
    assert_non_null(d);
    assert_int_equal(d->spec, 9);
    expect_refused(d, "spec");
    folio__v1__generate_request__free_unpacked(d, NULL);
}

static void logit_bias_is_sorted_bans_at_minus_100_and_refuses_duplicates(void **state)
{
    (void)state;
    Folio__V1__GenerateRequest g = base_request();
    Folio__V1__SamplingParams s = FOLIO__V1__SAMPLING_PARAMS__INIT;
    Folio__V1__LogitBias b[4];
    Folio__V1__LogitBias *bp[4];
    const int32_t tokens[4] = {50, 3, 9, 3};
    const float biases[4] = {2.5f, -100, 0, 1};
    for (int i = 0; i < 4; i++) {
        folio__v1__logit_bias__init(&b[i]);
        b[i].token = tokens[i];
        b[i].bias = biases[i];
        bp[i] = &b[i];
    }
    s.logit_bias = bp;
    s.n_logit_bias = 3;
    g.sampling = &s;
    request_t r;
    fl_error_t err = {0};
    assert_int_equal(request_resolve(&r, 1, &g, "", 0, defaults(), N_VOCAB, &err), 0);
    assert_int_equal(r.sched.penalties.n_bias, 2); /* the zero bias is dropped */
    assert_int_equal(r.sched.penalties.bias[0].token, 3);
    assert_true(isinf(r.sched.penalties.bias[0].add) && r.sched.penalties.bias[0].add < 0);
    assert_int_equal(r.sched.penalties.bias[1].token, 50);
    assert_true(r.sched.penalties.bias[1].add == 2.5f && r.sched.penalties.bias[1].penalty == 1.0f);
    request_release(&r);
    s.n_logit_bias = 4;
    expect_refused(&g, "twice");
    b[3].token = N_VOCAB;
    expect_refused(&g, "logit_bias[3]");
    b[3].token = 4;
    b[3].bias = 101;
    expect_refused(&g, "logit_bias[3]");
}

/* --- the output stream ---------------------------------------------------------------------- */

static request_stream_t stream_with(char *const *stops, size_t n, const tok_t *tok)
{
    request_stream_t s;
    memset(&s, 0, sizeof s);
    fl_error_t err = {0};
    assert_int_equal(request_stream_open(&s, tok, stops, n, false, &err), 0);
    return s;
}

static void earliest_match_over_all_stop_strings_wins(void **state)
{
    (void)state;
    char *stops[] = {"END", "\n\n", "stop"};
    request_stream_t s = stream_with(stops, 3, NULL);
    const char *t = "one two\n\nthree END stop";
    assert_int_equal(request_find_stop(&s, t, strlen(t), 0), 7);
    assert_int_equal(request_find_stop(&s, t, strlen(t), 9), 15);
    assert_int_equal(request_find_stop(&s, "nothing here", 12, 0), -1);
    /* from past the end, or too little text left: no match, no over-read */
    assert_int_equal(request_find_stop(&s, t, strlen(t), strlen(t) + 5), -1);
    assert_int_equal(request_find_stop(&s, "EN", 2, 0), -1);
    request_stream_free(&s);
}

static void a_match_straddling_old_and_new_bytes_is_found(void **state)
{
    (void)state;
    char *stops[] = {"</answer>"};
    request_stream_t s = stream_with(stops, 1, NULL);
    const char *t = "42</answer> trailing";
    /* old text ended after "42</ans"; the search starts max_stop - 1 bytes back from there */
    const size_t old = 7, from = old >= s.max_stop ? old - (s.max_stop - 1) : 0;
    assert_int_equal(request_find_stop(&s, t, strlen(t), from), 2);
    request_stream_free(&s);
}

static void holdback_is_the_longest_stop_prefix_ending_the_text(void **state)
{
    (void)state;
    char *stops[] = {"STOP", "S!"};
    request_stream_t s = stream_with(stops, 2, NULL);
    assert_int_equal(request_stop_holdback(&s, "abc", 3), 0);
    assert_int_equal(request_stop_holdback(&s, "abcS", 4), 1);   /* "S" begins both */
    assert_int_equal(request_stop_holdback(&s, "abcST", 5), 2);  /* "ST" of STOP */
    assert_int_equal(request_stop_holdback(&s, "abcSTO", 6), 3); /* never the whole stop string */
    assert_int_equal(request_stop_holdback(&s, "abcSTX", 6), 0);
    assert_int_equal(request_stop_holdback(&s, "ST", 2), 2); /* text shorter than the stop string */
    assert_int_equal(request_stop_holdback(&s, "", 0), 0);
    request_stream_free(&s);
    request_stream_t none = stream_with(NULL, 0, NULL);
    assert_int_equal(request_stop_holdback(&none, "abcST", 5), 0);
    request_stream_free(&none);
}

/* A tokenizer of the texts "Hello", " wor", "ld", " ST", "OP", " more", "!" (GPT-2's byte-level
 * spelling writes a space as U+0120, "\xC4\xA0"). */
static tok_t *tiny_tok(void)
{
    static const char *const vocab[] = {"<eos>", "Hello", "\xC4\xA0wor", "ld", "\xC4\xA0ST", "OP", "\xC4\xA0more", "!"};
    const int32_t types[] = {TOK_TYPE_CONTROL, 1, 1, 1, 1, 1, 1, 1};
    tok_desc_t d = {.n_vocab = 8, .tokens = vocab, .token_types = types, .bos_id = -1, .eos_id = 0, .unk_id = -1,
                    .pad_id = -1};
    fl_error_t err = {0};
    tok_t *t = tok_new(&d, &err);
    if (!t) fail_msg("tok_new: %s", err.msg);
    return t;
}

static void deltas_hand_out_each_token_once_and_hold_stop_prefixes(void **state)
{
    (void)state;
    tok_t *tok = tiny_tok();
    char *stops[] = {" STOP"};
    request_stream_t s = stream_with(stops, 1, tok);
    request_delta_t d;
    assert_int_equal(request_stream_push(&s, 0, 1, NULL), 0);
    assert_int_equal(request_stream_push(&s, 1, 2, NULL), 0);
    assert_true(request_stream_peek(&s, false, &d));
    assert_int_equal(d.index, 0);
    assert_int_equal(d.n_tokens, 2);
    assert_string_equal(d.text, "Hello wor");
    request_stream_done(&s, false); /* the send failed: kept for the next delta */
    assert_int_equal(request_stream_push(&s, 2, 3, NULL), 0);
    assert_int_equal(request_stream_push(&s, 3, 4, NULL), 0); /* " ST": could begin " STOP" */
    assert_true(request_stream_peek(&s, false, &d));
    assert_int_equal(d.index, 0);
    assert_int_equal(d.n_tokens, 4);
    assert_string_equal(d.text, "Hello world"); /* " ST" held back */
    request_stream_done(&s, true);
    assert_int_equal(s.n_sent, 4);
    assert_int_equal(request_stream_push(&s, 4, 5, NULL), 1); /* "OP" completes the stop string */
    assert_true(s.stopped);
    assert_int_equal(s.n_out, 4); /* the stop string's token is not output */
    assert_int_equal(request_stream_push(&s, 5, 6, NULL), 0); /* ignored after the stop */
    request_stream_end(&s);
    assert_false(request_stream_peek(&s, true, &d)); /* the held " ST" was cut with the stop */
    request_stream_done(&s, true);
    request_stream_free(&s);
    tok_destroy(&tok);
}

static void a_final_delta_releases_the_held_back_text(void **state)
{
    (void)state;
    tok_t *tok = tiny_tok();
    char *stops[] = {" STOP"};
    request_stream_t s = stream_with(stops, 1, tok);
    request_delta_t d;
    assert_int_equal(request_stream_push(&s, 0, 1, NULL), 0);
    assert_int_equal(request_stream_push(&s, 1, 4, NULL), 0);
    assert_true(request_stream_peek(&s, false, &d));
    assert_string_equal(d.text, "Hello");
    request_stream_done(&s, true);
    request_stream_end(&s);
    assert_true(request_stream_peek(&s, true, &d));
    assert_int_equal(d.n_tokens, 0);
    assert_int_equal(d.index, 2);
    assert_string_equal(d.text, " ST");
    request_stream_done(&s, true);
    request_stream_close(&s);
    request_stream_free(&s);
    tok_destroy(&tok);
}

static void logprobs_travel_with_their_tokens(void **state)
{
    (void)state;
    request_stream_t s;
    memset(&s, 0, sizeof s);
    fl_error_t err = {0};
    assert_int_equal(request_stream_open(&s, NULL, NULL, 0, true, &err), 0);
    for (int i = 0; i < 40; i++) { /* past the first buffer size */
        sched_logprobs_t lp = {.chosen = {.token = i, .logprob = -(float)i}, .n_top = 1};
        lp.top[0] = (kern_logprob_t){.token = i + 1, .logprob = -0.5f};
        assert_int_equal(request_stream_push(&s, i, i, &lp), 0);
    }
    request_delta_t d;
    assert_true(request_stream_peek(&s, false, &d));
    assert_int_equal(d.n_tokens, 40);
    assert_non_null(d.logprobs);
    for (int i = 0; i < 40; i++) {
        assert_int_equal(d.logprobs[i].chosen.token, i);
        assert_true(d.logprobs[i].chosen.logprob == -(float)i);
        assert_int_equal(d.logprobs[i].top[0].token, i + 1);
    }
    request_stream_done(&s, true);
    request_stream_free(&s);
}

/* --- resuming a stream elsewhere --------------------------------------------------------------- */

/* tiny_tok's words plus UTF-8 characters split over tokens, as GPT-2's byte-level spelling writes
 * bytes: "\xC3\x83" is byte C3 and "\xC2\xA9" byte A9 (together U+00E9); E2 82 | AC (U+20AC);
 * F0 9F | 98 80 (U+1F600); and U+00E9 whole. */
static tok_t *utf8_tok(void)
{
    static const char *const vocab[] = {"<eos>",
                                        "Hello",
                                        "\xC4\xA0wor",
                                        "ld",
                                        "\xC4\xA0ST",
                                        "OP",
                                        "\xC4\xA0more",
                                        "!",
                                        "\xC3\x83",
                                        "\xC2\xA9",
                                        "\xC3\xA2\xC4\xA4",
                                        "\xC2\xAC",
                                        "\xC3\xB0\xC5\x81",
                                        "\xC4\xBA\xC4\xA2",
                                        "\xC3\x83\xC2\xA9"};
    int32_t types[15];
    for (int i = 0; i < 15; i++) types[i] = i ? 1 : TOK_TYPE_CONTROL;
    tok_desc_t d = {
        .n_vocab = 15, .tokens = vocab, .token_types = types, .bos_id = -1, .eos_id = 0, .unk_id = -1, .pad_id = -1};
    fl_error_t err = {0};
    tok_t *t = tok_new(&d, &err);
    if (!t) fail_msg("tok_new: %s", err.msg);
    return t;
}

/* What a client got from a stream: tokens in index order and the text. */
typedef struct got {
    int32_t tokens[64];
    int n;
    char text[512];
    size_t n_text;
} got_t;

static void take_delta(request_stream_t *s, bool final, bool sent, got_t *g)
{
    request_delta_t d;
    if (!request_stream_peek(s, final, &d)) {
        request_stream_done(s, false);
        return;
    }
    if (sent) {
        assert_int_equal(d.index, g->n); /* no gap, no index twice */
        memcpy(g->tokens + g->n, d.tokens, (size_t)d.n_tokens * sizeof *d.tokens);
        g->n += d.n_tokens;
        assert_true(g->n_text + d.n_text < sizeof g->text);
        memcpy(g->text + g->n_text, d.text, d.n_text + 1);
        g->n_text += d.n_text;
    }
    request_stream_done(s, sent);
}

/* Pushes tokens [from, to), a delta after each; the send of token i's delta fails when fail_every
 * divides i + 1 (0: never). */
static void feed(request_stream_t *s, const int32_t *t, int from, int to, int fail_every, got_t *g)
{
    for (int i = from; i < to; i++) {
        assert_true(request_stream_push(s, s->n_out, t[i], NULL) >= 0);
        take_delta(s, false, !fail_every || (i + 1) % fail_every, g);
    }
}

static void finish_stream(request_stream_t *s, got_t *g)
{
    request_stream_end(s);
    take_delta(s, true, true, g);
}

static void a_resumed_stream_hands_out_exactly_the_rest(void **state)
{
    (void)state;
    tok_t *tok = utf8_tok();
    char *stops[] = {" STOP", "\xE2\x82\xAC!", "ld\xC3\xA9"};
    /* "Hello" é " wor" "ld" € " ST" 😀 "!" é " more" " ST" "OP": ends at the stop " STOP" */
    static const int32_t seq_stop[] = {1, 8, 9, 2, 3, 10, 11, 4, 12, 13, 7, 14, 6, 4, 5, 6};
    /* the same without the stop, and a split character left open at the end */
    static const int32_t seq_open[] = {1, 8, 9, 2, 3, 10, 11, 4, 12, 13, 7, 14, 6, 4, 7, 10};
    const struct {
        const int32_t *t;
        int n;
    } seqs[] = {{seq_stop, 16}, {seq_open, 16}};
    int cases = 0;
    for (size_t q = 0; q < sizeof seqs / sizeof *seqs; q++)
        for (int fail_every = 0; fail_every <= 3; fail_every++) {
            got_t ref = {0};
            request_stream_t a = stream_with(stops, 3, tok);
            feed(&a, seqs[q].t, 0, seqs[q].n, fail_every, &ref);
            finish_stream(&a, &ref);
            if (q == 0)
                assert_string_equal(ref.text, "Hello\xC3\xA9 world\xE2\x82\xAC ST\xF0\x9F\x98\x80!\xC3\xA9 more");
            else /* and the open E2 82 flushed as two U+FFFD */
                assert_string_equal(ref.text, "Hello\xC3\xA9 world\xE2\x82\xAC ST\xF0\x9F\x98\x80!\xC3\xA9 more ST!"
                                              "\xEF\xBF\xBD\xEF\xBF\xBD");
            for (int k = 0; k <= seqs[q].n; k++) {
                /* The first group streams k tokens and dies; the client has what was handed out. */
                got_t cl = {0};
                request_stream_t b1 = stream_with(stops, 3, tok);
                feed(&b1, seqs[q].t, 0, k, fail_every, &cl);
                const int m = cl.n;
                /* The next group replays those m tokens and goes on from token m. */
                request_stream_t b2 = stream_with(stops, 3, tok);
                fl_error_t err = {0};
                if (request_stream_resume(&b2, cl.tokens, m, cl.n_text, &err))
                    fail_msg("sequence %zu, cut %d, %d sent: %s", q, k, m, err.msg);
                assert_int_equal(b2.n_out, m);
                feed(&b2, seqs[q].t, m, seqs[q].n, fail_every, &cl);
                finish_stream(&b2, &cl);
                assert_int_equal(cl.n, ref.n);
                assert_memory_equal(cl.tokens, ref.tokens, (size_t)ref.n * sizeof *ref.tokens);
                if (strcmp(cl.text, ref.text))
                    fail_msg("sequence %zu, failing every %d, cut %d: '%s' resumed, '%s' uninterrupted", q, fail_every,
                             k, cl.text, ref.text);
                assert_int_equal(b2.n_out, a.n_out);
                assert_int_equal(b2.stopped, a.stopped);
                request_stream_free(&b1);
                request_stream_free(&b2);
                cases++;
            }
            assert_int_equal(a.stopped, q == 0);
            request_stream_free(&a);
        }
    print_message("%d resumed streams equal their uninterrupted ones\n", cases);

    /* Resumes that cannot be: more text than the tokens make, a token that completes a stop string. */
    request_stream_t s = stream_with(stops, 3, tok);
    fl_error_t err = {0};
    const int32_t hello[2] = {1, 2};
    assert_int_equal(request_stream_resume(&s, hello, 2, 10, &err), FL_EINVAL); /* "Hello wor" is 9 bytes */
    request_stream_close(&s);
    fl_error_t e2 = {0};
    assert_int_equal(request_stream_open(&s, tok, stops, 3, false, &e2), 0);
    const int32_t stop[3] = {1, 4, 5};
    assert_int_equal(request_stream_resume(&s, stop, 3, 5, &err), FL_EINVAL);
    request_stream_free(&s);
    tok_destroy(&tok);
}

static void resume_tokens_are_checked_against_the_vocabulary_and_max_tokens(void **state)
{
    (void)state;
    Folio__V1__GenerateRequest g = base_request();
    int32_t resume[3] = {4, 5, 6};
    g.resume_tokens = resume;
    g.n_resume_tokens = 3;
    g.resume_text_bytes = 2;
    request_t r;
    fl_error_t err = {0};
    assert_int_equal(request_resolve(&r, 1, &g, "", 0, defaults(), N_VOCAB, &err), 0);
    assert_int_equal(r.sched.n_resume, 3);
    assert_ptr_equal(r.sched.resume, resume);
    assert_int_equal(r.resume_text_bytes, 2);
    assert_int_equal(r.sched.n_prompt, 3); /* the prompt alone */
    request_release(&r);
    resume[1] = N_VOCAB;
    expect_refused(&g, "resume_tokens[1]");
    resume[1] = 5;
    g.max_tokens = 2;
    expect_refused(&g, "max_tokens");
    g.max_tokens = 0;
    g.n_resume_tokens = 0;
    expect_refused(&g, "resume_text_bytes");
}

static void final_status_names_every_ending(void **state)
{
    (void)state;
    Folio__V1__FinishReason reason;
    Folio__V1__StatusCode code;
    const char *msg;
    request_final_status(SCHED_FINISH_LENGTH, true, NULL, &reason, &code, &msg);
    assert_int_equal(reason, FOLIO__V1__FINISH_REASON__FINISH_STOP); /* a stop string */
    assert_int_equal(code, FOLIO__V1__STATUS_CODE__OK);
    request_final_status(SCHED_FINISH_LENGTH, false, NULL, &reason, &code, &msg);
    assert_int_equal(reason, FOLIO__V1__FINISH_REASON__FINISH_LENGTH);
    request_final_status(SCHED_FINISH_DEADLINE, false, NULL, &reason, &code, &msg);
    assert_int_equal(code, FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED);
    request_final_status(SCHED_FINISH_CANCELLED, false, NULL, &reason, &code, &msg);
    assert_int_equal(code, FOLIO__V1__STATUS_CODE__CANCELLED);
    request_final_status(SCHED_FINISH_ERROR, false, "boom", &reason, &code, &msg);
    assert_int_equal(reason, FOLIO__V1__FINISH_REASON__FINISH_ERROR);
    assert_int_equal(code, FOLIO__V1__STATUS_CODE__INTERNAL);
    assert_string_equal(msg, "boom");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(unset_fields_take_the_defaults_and_zero_is_kept),
        cmocka_unit_test(out_of_range_fields_are_refused_by_name),
        cmocka_unit_test(spec_and_max_draft_reach_the_scheduler_and_bad_values_are_refused),
        cmocka_unit_test(logit_bias_is_sorted_bans_at_minus_100_and_refuses_duplicates),
        cmocka_unit_test(earliest_match_over_all_stop_strings_wins),
        cmocka_unit_test(a_match_straddling_old_and_new_bytes_is_found),
        cmocka_unit_test(holdback_is_the_longest_stop_prefix_ending_the_text),
        cmocka_unit_test(deltas_hand_out_each_token_once_and_hold_stop_prefixes),
        cmocka_unit_test(a_final_delta_releases_the_held_back_text),
        cmocka_unit_test(logprobs_travel_with_their_tokens),
        cmocka_unit_test(a_resumed_stream_hands_out_exactly_the_rest),
        cmocka_unit_test(resume_tokens_are_checked_against_the_vocabulary_and_max_tokens),
        cmocka_unit_test(final_status_names_every_ending),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
