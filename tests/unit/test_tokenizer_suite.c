/* test_tokenizer_suite.c - llama.cpp's own tokenizer suite (test-tokenizer-0) through folio's tokenizer.
 *
 * The suite is the vocabulary-only GGUFs models/ggml-vocab-NAME.gguf of llama.cpp with NAME.gguf.inp
 * (texts separated by "\n__ggml_vocab_test__\n") and NAME.gguf.out (one line of token ids per text),
 * as shipped in the llama-cpp-python 0.3.16 source distribution. scripts/setup.sh --test-tools fetches
 * that archive once (pinned sha256) and extracts these files to .cache/llama-vocab/ (FOLIO_CACHE, else
 * $FOLIO_SOURCE_DIR/.cache; FOLIO_LLAMA_VOCAB names another directory). Each text is tokenized with
 * add_special and parse_special off, as test-tokenizer-0 does, and read as it reads the files (46
 * texts a file: a trailing separator ends the list). Every vector of every vocabulary must match; the
 * test exits 77 (Skipped) only when the files are absent. The sdist's gpt-neox vocabulary, which has
 * no vectors, checks the "default" pre-tokenizer (no tokenizer.ggml.pre) on ids llama.cpp gave, and
 * a chat through the qwen2, phi-3 and command-r vocabularies' own templates gives llama.cpp's ids. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gguf.h"
#include "test_util.h"
#include "tokenizer.h"

static const char *const VOCABS[] = {
    "llama-spm", "llama-bpe", "phi-3",  "deepseek-llm", "deepseek-coder", "falcon",
    "mpt",       "starcoder", "gpt-2",  "refact",       "command-r",      "qwen2",
};
#define N_VOCABS ((int)(sizeof VOCABS / sizeof VOCABS[0]))

static char g_dir[4096];
static int g_total, g_pass;

static void vocab_path(char *buf, size_t cap, const char *name, const char *ext)
{
    snprintf(buf, cap, "%s/ggml-vocab-%s.gguf%s", g_dir, name, ext);
}

/* The tokenizer of ggml-vocab-NAME.gguf (it keeps nothing of the file); NULL, the reason in err, when
 * folio cannot load it. */
static tok_t *load_vocab(const char *name, fl_error_t *err)
{
    char path[4200];
    vocab_path(path, sizeof path, name, "");
    gguf_t *g = gguf_open(path, err);
    if (!g) fail_msg("gguf_open(%s): %s", path, err->msg);
    tok_t *t = tok_new_from_gguf(g, err);
    gguf_destroy(&g);
    return t;
}

/* Ids of one .out line (llama.cpp strips it, then reads numbers separated by single spaces). */
static int parse_ids(const char *line, size_t n, int32_t *out, int cap)
{
    int k = 0;
    size_t i = 0;
    while (i < n) {
        while (i < n && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r')) i++;
        if (i >= n) break;
        char *end;
        long v = strtol(line + i, &end, 10);
        if (end == line + i) fail_msg("bad id in line '%.*s'", (int)n, line);
        if (k < cap) out[k] = (int32_t)v;
        k++;
        i = (size_t)(end - line);
    }
    return k;
}

static void run_vocab(const char *name)
{
    char inp_path[4200], out_path[4200];
    vocab_path(inp_path, sizeof inp_path, name, ".inp");
    vocab_path(out_path, sizeof out_path, name, ".out");
    fl_error_t err = {0};
    tok_t *t = load_vocab(name, &err);
    size_t inp_len = 0, out_len = 0;
    char *inp = fl_read_file(inp_path, &inp_len), *outs = fl_read_file(out_path, &out_len);
    assert_non_null(inp);
    assert_non_null(outs);

    static const char SEP[] = "\n__ggml_vocab_test__\n";
    const size_t sep_len = sizeof SEP - 1;
    static int32_t want[16384], got[16384];
    int n = 0, pass = 0;
    size_t ip = 0, op = 0;
    while (ip < inp_len) { /* test-tokenizer-0's read_tests: a trailing separator ends the list */
        const char *next = NULL;
        for (size_t k = ip; k + sep_len <= inp_len; k++)
            if (memcmp(inp + k, SEP, sep_len) == 0) {
                next = inp + k;
                break;
            }
        size_t tlen = next ? (size_t)(next - inp) - ip : inp_len - ip;
        const char *text = inp + ip;
        ip = next ? (size_t)(next - inp) + sep_len : inp_len;
        if (op >= out_len) fail_msg("%s: fewer lines than texts", out_path);
        const char *nl = memchr(outs + op, '\n', out_len - op);
        size_t llen = nl ? (size_t)(nl - outs) - op : out_len - op;
        int nw = parse_ids(outs + op, llen, want, 16384);
        op += llen + 1;
        n++;
        int ng = t ? tok_encode(t, text, tlen, false, false, got, 16384) : -1;
        if (ng == nw && memcmp(got, want, sizeof *got * (size_t)nw) == 0) {
            pass++;
            continue;
        }
        if (!t) continue;
        fprintf(stderr, "%s: MISMATCH on '%.*s'\n  want(%d):", name, (int)tlen, text, nw);
        for (int i = 0; i < nw; i++) fprintf(stderr, " %d", want[i]);
        fprintf(stderr, "\n  got (%d):", ng);
        for (int i = 0; i < ng && i < 16384; i++) fprintf(stderr, " %d", got[i]);
        fprintf(stderr, "\n");
    }
    printf("tokenizer suite: %-15s %2d/%d%s%s\n", name, pass, n, t ? "" : "  (not loaded: ", t ? "" : err.msg);
    if (!t) printf("  )\n");
    g_total += n;
    g_pass += pass;
    free(inp);
    free(outs);
    tok_destroy(&t);
    assert_int_equal(pass, n);
}

static void test_vocab(void **state) { run_vocab(*state); }

/* llama-cpp-python 0.3.16's ids for the gpt-neox vocabulary, which has no tokenizer.ggml.pre; the
 * first rule [\p{P}\$\+<=>\^~\|]+ takes '~' but not '`'. */
static void test_default_pre_tokenizer_matches_llama_cpp(void **state)
{
    static const struct {
        const char *text;
        int n;
        int32_t ids[16];
    } cases[] = {
        {"a ~b", 4, {66, 209, 95, 67}},
        {"a `b", 3, {66, 2634, 67}},
        {"Hello, world! 1234567 \xC2\xBD 12", 12, {12092, 13, 1533, 2, 209, 10683, 25133, 24, 209, 8313, 209, 805}},
        {"x  = y+1;  // done\n\n", 11, {89, 50276, 30, 340, 12, 18, 28, 50276, 605, 2218, 535}},
        {"<|endoftext|> ok", 7, {29, 93, 423, 1171, 1156, 49651, 8718}},
    };
    fl_error_t err = {0};
    tok_t *t = load_vocab("gpt-neox", &err);
    if (!t) fail_msg("%s", err.msg);
    assert_string_equal(tok_pre(t), "default");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t got[64];
        int n = tok_encode(t, cases[i].text, strlen(cases[i].text), false, false, got, 64);
        assert_int_equal(n, cases[i].n);
        assert_memory_equal(got, cases[i].ids, sizeof *got * (size_t)n);
    }
    tok_destroy(&t);
}

/* A chat through each suite vocabulary's own template: the prompt ids folio feeds the model (the
 * template's markers special, BOS per the vocabulary) equal llama.cpp's tokenize(special) of
 * llama_chat_apply_template's text (llama-cpp-python 0.3.16). Phi-3's markers eat the newline after
 * them (rstrip). */
static void test_chat_prompt_ids_match_llama_cpp(void **state)
{
    static const struct {
        const char *vocab;
        int n;
        int32_t ids[40];
    } cases[] = {
        {"qwen2", 38, {151644, 8948, 198, 3430, 9814, 13, 151645, 198, 151644, 872, 198, 9707, 1052,
                       11, 879, 525, 498, 30, 151645, 198, 151644, 77091, 198, 32, 13137, 13,
                       151645, 198, 151644, 872, 198, 12658, 0, 151645, 198, 151644, 77091, 198}},
        {"phi-3", 25, {1, 32006, 1522, 11473, 29889, 32007, 32010, 15043, 727, 29892, 1058, 526, 366,
                       29973, 32007, 32001, 319, 16876, 29889, 32007, 32010, 1834, 29991, 32007, 32001}},
        {"command-r", 30, {5, 255000, 255008, 6495, 14221, 21, 255001, 255000, 255006, 28339, 2782, 19, 2458,
                           1955, 1933, 38, 255001, 255000, 255007, 40, 40293, 21, 255001, 255000, 255006,
                           40911, 8, 255001, 255000, 255007}},
    };
    const tok_chat_msg_t msgs[] = {{"system", "Be brief."},
                                   {"user", "Hello there, who are you?"},
                                   {"assistant", "A helper."},
                                   {"user", "Thanks!"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fl_error_t err = {0};
        tok_t *t = load_vocab(cases[i].vocab, &err);
        if (!t) fail_msg("%s: %s", cases[i].vocab, err.msg);
        int32_t *ids = NULL;
        int cap = 0;
        const int n = tok_encode_prompt(t, NULL, 0, false, msgs, 4, &ids, &cap, &err);
        if (n != cases[i].n || memcmp(ids, cases[i].ids, sizeof *ids * (size_t)n) != 0) {
            fprintf(stderr, "%s: got %d ids:", cases[i].vocab, n);
            for (int k = 0; k < n; k++) fprintf(stderr, " %d", ids[k]);
            fprintf(stderr, "\n");
            fail();
        }
        free(ids);
        tok_destroy(&t);
    }
}

int main(void)
{
    const char *env = getenv("FOLIO_LLAMA_VOCAB"), *cache = getenv("FOLIO_CACHE"), *src = getenv("FOLIO_SOURCE_DIR");
    if (env && *env)
        snprintf(g_dir, sizeof g_dir, "%s", env);
    else if (cache && *cache)
        snprintf(g_dir, sizeof g_dir, "%s/llama-vocab", cache);
    else
        snprintf(g_dir, sizeof g_dir, "%s/.cache/llama-vocab", src ? src : ".");
    for (int i = 0; i <= N_VOCABS; i++) {
        char p[4200];
        const char *ext[] = {"", ".inp", ".out"};
        for (int k = 0; k < (i < N_VOCABS ? 3 : 1); k++) {
            vocab_path(p, sizeof p, i < N_VOCABS ? VOCABS[i] : "gpt-neox", ext[k]);
            if (access(p, R_OK) != 0) {
                printf("SKIPPED: %s is missing (bash scripts/setup.sh --test-tools extracts llama.cpp's "
                       "tokenizer suite from the llama-cpp-python 0.3.16 sdist; FOLIO_LLAMA_VOCAB names another "
                       "directory)\n",
                       p);
                return TEST_EXIT_SKIPPED;
            }
        }
    }
    struct CMUnitTest tests[N_VOCABS + 2];
    for (int i = 0; i < N_VOCABS; i++)
        tests[i] = (struct CMUnitTest){VOCABS[i], test_vocab, NULL, NULL, (void *)VOCABS[i]};
    tests[N_VOCABS] = (struct CMUnitTest)cmocka_unit_test(test_default_pre_tokenizer_matches_llama_cpp);
    tests[N_VOCABS + 1] = (struct CMUnitTest)cmocka_unit_test(test_chat_prompt_ids_match_llama_cpp);
    int failed = cmocka_run_group_tests_name("tokenizer_suite", tests, NULL, NULL);
    printf("tokenizer suite: %d of %d vectors match llama.cpp (%d vocabularies)\n", g_pass, g_total, N_VOCABS);
    return failed ? 1 : 0;
}
