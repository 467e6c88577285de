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
 * no vectors, checks the "default" pre-tokenizer (no tokenizer.ggml.pre) on ids llama.cpp gave. */
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
    char path[4200], inp_path[4200], out_path[4200];
    vocab_path(path, sizeof path, name, "");
    vocab_path(inp_path, sizeof inp_path, name, ".inp");
    vocab_path(out_path, sizeof out_path, name, ".out");
    fl_error_t err = {0};
    gguf_t *g = gguf_open(path, &err);
    if (!g) fail_msg("gguf_open(%s): %s", path, err.msg);
    tok_t *t = tok_new_from_gguf(g, &err);
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
    gguf_destroy(&g);
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
    char path[4200];
    vocab_path(path, sizeof path, "gpt-neox", "");
    fl_error_t err = {0};
    gguf_t *g = gguf_open(path, &err);
    if (!g) fail_msg("gguf_open(%s): %s", path, err.msg);
    tok_t *t = tok_new_from_gguf(g, &err);
    if (!t) fail_msg("%s", err.msg);
    assert_string_equal(tok_pre(t), "default");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t got[64];
        int n = tok_encode(t, cases[i].text, strlen(cases[i].text), false, false, got, 64);
        assert_int_equal(n, cases[i].n);
        assert_memory_equal(got, cases[i].ids, sizeof *got * (size_t)n);
    }
    tok_destroy(&t);
    gguf_destroy(&g);
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
    struct CMUnitTest tests[N_VOCABS + 1];
    for (int i = 0; i < N_VOCABS; i++)
        tests[i] = (struct CMUnitTest){VOCABS[i], test_vocab, NULL, NULL, (void *)VOCABS[i]};
    tests[N_VOCABS] = (struct CMUnitTest)cmocka_unit_test(test_default_pre_tokenizer_matches_llama_cpp);
    int failed = cmocka_run_group_tests_name("tokenizer_suite", tests, NULL, NULL);
    printf("tokenizer suite: %d of %d vectors match llama.cpp (%d vocabularies)\n", g_pass, g_total, N_VOCABS);
    return failed ? 1 : 0;
}
