/* test_constraint.c - constrained output (common/constraint*.c): the regex and JSON Schema compilers
 * against tables of accepted and rejected strings and of unsupported features (each with its
 * message); integer and number bounds against brute force; token masks against a brute-force walk
 * of every token from random reachable states; random walks over allowed tokens always ending in a
 * match (regexes checked again by POSIX regexec, schemas parsed by cJSON and validated by a small
 * checker here); forced tokens allowed in sequence; the cache and the limits.
 *
 * The token tests run on a tokenizer built from the test kit's vocabulary (common/mkmodel.c) and,
 * when it is present, on the default model's (49,152 tokens); without the model the rest run and
 * the test exits 77 (ctest: Skipped). The model part prints compile and mask timings. */
#include <math.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "constraint.h"
#include "gguf.h"
#include "mkmodel.h"
#include "test_util.h"
#include "tokenizer.h"

#define MAXS 12

/* ---- helpers ---- */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}

static fl_constraint_t *compile_or_fail(fl_constraint_kind_t kind, const char *text, const tok_t *tok)
{
    fl_error_t err = {0};
    fl_constraint_t *c = fl_constraint_compile(kind, text, NULL, 0, tok, NULL, &err);
    if (!c) fail_msg("compiling %s: %s", text, err.msg);
    return c;
}

static bool matches(const fl_constraint_t *c, const char *s)
{
    return fl_constraint_match(c, s, strlen(s));
}

/* POSIX ERE as an independent oracle for the patterns written in its syntax. */
static bool ere_match(const char *pattern, const char *s, bool anchored)
{
    char buf[1024];
    snprintf(buf, sizeof buf, anchored ? "^(%s)$" : "%s", pattern);
    regex_t re;
    if (regcomp(&re, buf, REG_EXTENDED | REG_NOSUB)) fail_msg("regcomp(%s) failed", buf);
    const bool ok = regexec(&re, s, 0, NULL, 0) == 0;
    regfree(&re);
    return ok;
}

/* ---- the regex compiler ---- */

typedef struct {
    const char *pattern;
    bool ere; /* also valid POSIX ERE with the same meaning */
    const char *accept[MAXS];
    const char *reject[MAXS];
} regex_case_t;

static const regex_case_t k_regex_cases[] = {
    {"abc", true, {"abc"}, {"", "ab", "abcd", "abd"}},
    {"", true, {""}, {"a", " "}},
    {"a|b|cd", true, {"a", "b", "cd"}, {"", "c", "ab", "acd"}},
    {"a||b", false, {"a", "", "b"}, {"ab"}},
    {"(ab)*", true, {"", "ab", "abab"}, {"a", "aba", "ba"}},
    {"a+b?", true, {"a", "aa", "ab", "aab"}, {"", "b", "abb"}},
    {"a{3}", true, {"aaa"}, {"aa", "aaaa"}},
    {"a{2,}", true, {"aa", "aaaaaaa"}, {"a", ""}},
    {"a{2,4}", true, {"aa", "aaa", "aaaa"}, {"a", "aaaaa"}},
    {"a{,2}", false, {"", "a", "aa"}, {"aaa"}},
    {"a{0}b", true, {"b"}, {"ab"}},
    {"(a|ab)(c|bcd)(d*)", true, {"abcd", "ac", "abcdd", "abc"}, {"ab", "abd"}},
    {"[a-c]x", true, {"ax", "cx"}, {"dx", "x", "abx"}},
    {"[^a-c]", false, {"d", "\xC3\xA9", "\n", "\xF0\x9F\x98\x80"}, {"a", "", "dd", "\xC3", "\xED\xA0\x80"}},
    {"\\d{2}-\\w+\\s\\.", false, {"12-ab_9 .", "00-x\t."}, {"1-a .", "12- .", "12-a a"}},
    {"\\D\\W\\S", false, {"a-b", "\xC3\xA9 x"}, {"1-b", "aab", "a- "}},
    {"^ab$", false, {"ab"}, {"^ab$", "ab$"}},
    {"(a)$", false, {"a"}, {"a$"}},
    {".", false, {"a", "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "\r"}, {"\n", "", "ab", "\xFF", "\xC3"}},
    {"[\xC3\xA9-\xC3\xAB]+", false, {"\xC3\xA9", "\xC3\xAB\xC3\xA9"}, {"e", "\xC3\xAC", ""}},
    {"[\xF0\x9F\x98\x80-\xF0\x9F\x98\x82]", false, {"\xF0\x9F\x98\x81"}, {"\xF0\x9F\x98\x83", "\xF0\x9F\x98"}},
    {"\\u00e9|\\x41|\\u{1F600}", false, {"\xC3\xA9", "A", "\xF0\x9F\x98\x80"}, {"e", "x41"}},
    {"\\n\\t\\r\\f\\v", false, {"\n\t\r\f\v"}, {"ntr"}},
    {"(?:a|b)c", false, {"ac", "bc"}, {"c", "abc"}},
    {"(?<year>\\d{4})-(?P<m>\\d\\d)", false, {"2024-05"}, {"24-05"}},
    {"[]a]", true, {"]", "a"}, {"b", "]a"}},
    {"[a-]", true, {"a", "-"}, {"b"}},
    {"[-a]", true, {"a", "-"}, {"b"}},
    {"\\{\\}x}", false, {"{}x}"}, {"{}x"}},
    {"[\\d.]+", false, {"1.5", "."}, {"a", ""}},
    {"[^\\d]", false, {"a", "."}, {"1"}},
    {"[\\w-]+", false, {"a-b_1"}, {"a b"}},
    {"\\.\\*\\+\\?\\(\\)\\[\\]\\|\\^\\$\\\\\\/", false, {".*+?()[]|^$\\/"}, {"."}},
    {"(((a)))", true, {"a"}, {"aa"}},
    {"(a*)*b", true, {"b", "aab"}, {"a"}},
    {"(a|b)*abb", true, {"abb", "aababb", "babb"}, {"ab", "abba"}},
    {"\\w+@\\w+\\.com", false, {"me@x.com"}, {"me@x.co", "@x.com"}},
    {"x[\\x00-\\x1f]y", false, {"x\ty", "x\x01y"}, {"x y"}},
    {"[\xE4\xB8\x80-\xE9\xBE\xA5]{2}", false, {"\xE4\xB8\xAD\xE6\x96\x87"}, {"\xE4\xB8\xAD"}},
    {"(ab|cd){1,3}e", true, {"abe", "cdabcde"}, {"e", "ababcdabe"}},
};

static void check_regex_case(const regex_case_t *rc)
{
    fl_constraint_t *c = compile_or_fail(FL_CONSTRAINT_REGEX, rc->pattern, NULL);
    for (int i = 0; i < MAXS && rc->accept[i]; i++)
        if (!matches(c, rc->accept[i])) fail_msg("/%s/ rejects \"%s\"", rc->pattern, rc->accept[i]);
    for (int i = 0; i < MAXS && rc->reject[i]; i++)
        if (matches(c, rc->reject[i])) fail_msg("/%s/ accepts \"%s\"", rc->pattern, rc->reject[i]);
    if (rc->ere) {
        /* Random strings over the pattern's own characters: same verdict as POSIX. */
        char alphabet[64];
        int na = 0;
        for (const char *p = rc->pattern; *p && na < 60; p++)
            if (!strchr("()[]{}|*+?^$\\,-", *p) && !memchr(alphabet, *p, (size_t)na)) alphabet[na++] = *p;
        alphabet[na++] = 'z';
        for (int t = 0; t < 400; t++) {
            char s[16];
            const int len = (int)(rnd() % 9);
            for (int i = 0; i < len; i++) s[i] = alphabet[rnd() % (uint32_t)na];
            s[len] = 0;
            if (matches(c, s) != ere_match(rc->pattern, s, true))
                fail_msg("/%s/ on \"%s\": folio %d, regexec %d", rc->pattern, s, matches(c, s), !matches(c, s));
        }
    }
    fl_constraint_free(&c);
}

static void test_regex_cases_accept_and_reject_as_tabled(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof k_regex_cases / sizeof *k_regex_cases; i++) check_regex_case(&k_regex_cases[i]);
}

typedef struct {
    const char *pattern; /* or schema */
    int code;
    const char *msg; /* a part of the message */
} bad_case_t;

static const bad_case_t k_bad_regex[] = {
    {"a(?=b)", FL_EINVAL, "lookahead (?=...) is not supported at offset 1"},
    {"(?!a)b", FL_EINVAL, "lookahead"},
    {"(?<=a)b", FL_EINVAL, "lookbehind"},
    {"(?<!a)b", FL_EINVAL, "lookbehind"},
    {"(a)\\1", FL_EINVAL, "backreference \\1 is not supported at offset 3"},
    {"(?<x>a)\\k<x>", FL_EINVAL, "backreference \\k"},
    {"(?P<x>a)(?P=x)", FL_EINVAL, "backreference (?P=...)"},
    {"a*?", FL_EINVAL, "lazy quantifier '?' is not supported at offset 2"},
    {"a+?", FL_EINVAL, "lazy quantifier"},
    {"a{2,3}?", FL_EINVAL, "lazy quantifier"},
    {"a*+", FL_EINVAL, "possessive quantifier"},
    {"(?>a)", FL_EINVAL, "atomic group"},
    {"(?i)abc", FL_EINVAL, "inline flags"},
    {"\\bword", FL_EINVAL, "word boundary \\b"},
    {"\\p{L}", FL_EINVAL, "Unicode property"},
    {"a\\Z", FL_EINVAL, "anchor \\Z"},
    {"a**", FL_EINVAL, "quantifier '*' follows another quantifier at offset 2"},
    {"*a", FL_EINVAL, "quantifier '*' has nothing to repeat at offset 0"},
    {"a|+", FL_EINVAL, "nothing to repeat"},
    {"a{1001}", FL_ERANGE, "repeat count above the limit 1000"},
    {"a{1,99999999999999999999}", FL_ERANGE, "repeat count above the limit"},
    {"a{3,2}", FL_EINVAL, "min above max"},
    {"[z-a]", FL_EINVAL, "range out of order"},
    {"[\\d-z]", FL_EINVAL, "cannot start a range"},
    {"(ab", FL_EINVAL, "missing ')' for this '(' at offset 0"},
    {"ab)", FL_EINVAL, "unmatched ')' at offset 2"},
    {"[abc", FL_EINVAL, "unterminated class '[' at offset 0"},
    {"a{x}", FL_EINVAL, "does not start a {m}"},
    {"a{}", FL_EINVAL, "does not start a {m}"},
    {"a^b", FL_EINVAL, "anchor '^' is only supported at the start"},
    {"a$b", FL_EINVAL, "anchor '$' is only supported at the end"},
    {"(a$)", FL_EINVAL, "anchor '$'"},
    {"ab\\", FL_EINVAL, "trailing backslash at offset 2"},
    {"[[:alpha:]]", FL_EINVAL, "POSIX class"},
    {"\\q", FL_EINVAL, "unknown escape \\q"},
    {"a\xFF", FL_EINVAL, "invalid UTF-8 in the pattern at offset 1"},
    {"\\u{110000}", FL_EINVAL, "not a Unicode scalar value"},
    {"\\ud800", FL_EINVAL, "not a Unicode scalar value"},
    {"\\x4", FL_EINVAL, "\\x needs exactly two hex digits"},
    {"\\01", FL_EINVAL, "octal"},
    {"[^\\x00-\\x{10FFFF}]", FL_EINVAL, "needs exactly two hex digits"},
    {"[^\\x00-\\u{10FFFF}]", FL_EINVAL, "matches no string at all"},
};

/* Each text fails to compile with its code and a message containing the tabled part. */
static void check_bad_cases(fl_constraint_kind_t kind, const bad_case_t *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        fl_error_t err = {0};
        fl_constraint_t *c = fl_constraint_compile(kind, cases[i].pattern, NULL, 0, NULL, NULL, &err);
        if (c) fail_msg("%s compiled", cases[i].pattern);
        if (err.code != cases[i].code || !strstr(err.msg, cases[i].msg))
            fail_msg("%s: got %s \"%s\", want %s \"%s\"", cases[i].pattern, fl_strerror(err.code), err.msg,
                     fl_strerror(cases[i].code), cases[i].msg);
    }
}

static void test_regex_unsupported_features_give_clear_errors(void **state)
{
    (void)state;
    check_bad_cases(FL_CONSTRAINT_REGEX, k_bad_regex, sizeof k_bad_regex / sizeof *k_bad_regex);
    /* Nesting past the bound is a range error, not a stack overflow. */
    char deep[1024];
    memset(deep, '(', 300);
    deep[300] = 'a';
    memset(deep + 301, ')', 300);
    deep[601] = 0;
    fl_error_t err = {0};
    assert_null(fl_constraint_compile(FL_CONSTRAINT_REGEX, deep, NULL, 0, NULL, NULL, &err));
    assert_int_equal(err.code, FL_ERANGE);
    assert_non_null(strstr(err.msg, "nested deeper"));
}

/* The automaton is minimal: state counts of known minimal DFAs (the dead state not counted). */
static void test_automaton_is_minimal(void **state)
{
    (void)state;
    static const struct {
        const char *pattern;
        int states;
    } m[] = {
        {"a{3}", 4},
        {"(a|b)*abb", 4},
        {"(a|aa)*b{100}", 101},
        {"[a-z]{0,100}[0-9]{0,100}", 201},
        {"(ab|cd){1,30}e", 92},
        {"x(y|z)*(yy|zz){2,9}", 14},
        {"(a*b*)*c|d{3,8}", 10},
        {".{0,300}", 2401},
    };
    for (size_t i = 0; i < sizeof m / sizeof *m; i++) {
        fl_constraint_t *c = compile_or_fail(FL_CONSTRAINT_REGEX, m[i].pattern, NULL);
        if (fl_constraint_n_states(c) != m[i].states)
            fail_msg("/%s/: %d states, the minimal DFA has %d", m[i].pattern, fl_constraint_n_states(c), m[i].states);
        fl_constraint_free(&c);
    }
    /* A JSON string of at most 200 characters fits the default limits. */
    fl_constraint_t *c = compile_or_fail(FL_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"maxLength\":200}", NULL);
    fl_constraint_free(&c);
}

static void test_choice_is_exactly_one_of_the_strings(void **state)
{
    (void)state;
    const char *choices[] = {"yes", "no", "maybe so", "", "a|b*"};
    fl_error_t err = {0};
    fl_constraint_t *c = fl_constraint_compile(FL_CONSTRAINT_CHOICE, NULL, choices, 5, NULL, NULL, &err);
    assert_non_null(c);
    for (int i = 0; i < 5; i++) assert_true(matches(c, choices[i]));
    assert_false(matches(c, "ye"));
    assert_false(matches(c, "yesno"));
    assert_false(matches(c, "a"));
    assert_true(fl_constraint_accepting(c, fl_constraint_start(c))); /* the empty choice */
    fl_constraint_free(&c);
    /* \0 is NUL, which a C string cannot hold but a byte run can. */
    c = compile_or_fail(FL_CONSTRAINT_REGEX, "a\\0b", NULL);
    assert_true(fl_constraint_match(c, "a\0b", 3));
    assert_false(fl_constraint_match(c, "ab", 2));
    fl_constraint_free(&c);
    assert_null(fl_constraint_compile(FL_CONSTRAINT_CHOICE, NULL, choices, 0, NULL, NULL, &err));
    assert_int_equal(err.code, FL_EINVAL);
    assert_null(fl_constraint_compile(FL_CONSTRAINT_CHOICE, NULL, NULL, 2, NULL, NULL, &err));
    assert_null(fl_constraint_compile((fl_constraint_kind_t)9, "x", NULL, 0, NULL, NULL, &err));
    assert_int_equal(err.code, FL_EINVAL);
}

/* ---- the JSON Schema compiler ---- */

typedef struct {
    const char *schema;
    const char *valid[MAXS];
    const char *invalid[MAXS];
} schema_case_t;

static const schema_case_t k_schema_cases[] = {
    {"{\"type\":\"string\"}",
     {"\"\"", "\"abc\"", "\"a\\\"b\"", "\"\\u00e9\"", "\"\xC3\xA9\"", "\"\\ud83d\\ude00\"", "\"\\/\\b\\f\\n\\r\\t\""},
     {"abc", "\"a\"b\"", "\"\\x\"", "\"\\u0000\"", "\"\\ud800\"", "\"\\ude00\"", "\"a\nb\"", " \"a\"", "\"\\u12\""}},
    {"{\"type\":\"string\",\"minLength\":2,\"maxLength\":3}",
     {"\"ab\"", "\"abc\"", "\"\xC3\xA9\\n\"", "\"\\ud83d\\ude00x\""},
     {"\"a\"", "\"abcd\"", "\"\""}},
    {"{\"type\":\"string\",\"pattern\":\"^[a-z]+\\\\d$\"}", {"\"abc1\"", "\"x0\""}, {"\"1\"", "\"abc\"", "\"ab12\""}},
    {"{\"type\":\"string\",\"pattern\":\"a\\\"b|c\\\\\\\\d|\\\\n|[\\\"\\\\t]\"}",
     {"\"a\\\"b\"", "\"c\\\\d\"", "\"\\n\"", "\"\\\"\"", "\"\\t\""},
     {"\"a\"b\"", "\"ab\"", "\"\n\"", "\"\t\""}},
    {"{\"type\":\"integer\"}", {"0", "-5", "123", "-0"}, {"01", "1.0", "-", "+1", "1e3", ""}},
    {"{\"type\":\"integer\",\"minimum\":-12,\"maximum\":345}",
     {"-12", "-1", "0", "9", "99", "345", "100"},
     {"-13", "346", "999", "-0", "00"}},
    {"{\"type\":\"integer\",\"exclusiveMinimum\":0,\"exclusiveMaximum\":10}", {"1", "9"}, {"0", "10", "-1"}},
    {"{\"type\":\"integer\",\"minimum\":1.5,\"maximum\":3.5}", {"2", "3"}, {"1", "4"}},
    {"{\"type\":\"integer\",\"minimum\":5,\"exclusiveMinimum\":true}", {"6", "60"}, {"5"}},
    {"{\"type\":\"number\",\"minimum\":-2,\"maximum\":3}",
     {"-2", "-1.5", "0", "2.999", "3", "3.000", "-2.0", "-0.5", "-0"},
     {"3.01", "-2.01", "4", "1e2", "-3", "3.5"}},
    {"{\"type\":\"number\"}", {"1.5e-3", "-0.0", "0", "12E+4"}, {"1.", "01", ".5", "-", "1e"}},
    {"{\"type\":\"boolean\"}", {"true", "false"}, {"True", "1", "null"}},
    {"{\"type\":\"null\"}", {"null"}, {"nul", "\"null\""}},
    {"{\"enum\":[\"red\",1.50,null,true,{\"a\":[1]},\"x\\u00e9\\n\"]}",
     {"\"red\"", "1.50", "null", "true", "{\"a\":[1]}", "\"x\xC3\xA9\\n\""},
     {"1.5", "\"blue\"", "false", "{\"a\": [1]}", "\"x\\u00e9\\n\""}},
    {"{\"type\":\"string\",\"enum\":[\"a\",1,\"b\"]}", {"\"a\"", "\"b\""}, {"1"}},
    {"{\"const\":\"x\"}", {"\"x\""}, {"\"y\"", "x"}},
    {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"},\"b\":{\"type\":\"string\"},\"c\":{\"type\":"
     "\"boolean\"}},\"required\":[\"b\"]}",
     {"{\"b\":\"x\"}", "{\"a\":1,\"b\":\"x\"}", "{\"a\":1,\"b\":\"x\",\"c\":true}", "{\"b\":\"\",\"c\":false}"},
     {"{}", "{\"a\":1}", "{\"b\":\"x\",\"a\":1}", "{\"b\":\"x\",\"d\":1}", "{\"b\": \"x\"}", "{\"b\":\"x\",}",
      "{ \"b\":\"x\"}"}},
    {"{\"properties\":{\"a\":{\"type\":\"null\"},\"b\":{\"type\":\"null\"}}}",
     {"{}", "{\"a\":null}", "{\"b\":null}", "{\"a\":null,\"b\":null}"},
     {"{,\"b\":null}", "{\"a\":null,}", "{\"b\":null,\"a\":null}", "{\"a\":null\"b\":null}"}},
    {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"null\"},\"b\":{\"type\":\"null\"},\"c\":{\"type\":"
     "\"null\"}},"
     "\"required\":[\"c\"]}",
     {"{\"c\":null}", "{\"a\":null,\"c\":null}", "{\"b\":null,\"c\":null}", "{\"a\":null,\"b\":null,\"c\":null}"},
     {"{}", "{\"a\":null}", "{\"a\":null,\"b\":null}", "{,\"c\":null}"}},
    {"{\"type\":\"array\",\"items\":{\"type\":\"integer\"},\"minItems\":1,\"maxItems\":3}",
     {"[1]", "[1,2,3]", "[-1,0]"},
     {"[]", "[1,2,3,4]", "[1,]", "[\"a\"]", "[1 ,2]"}},
    {"{\"type\":\"array\",\"items\":{\"type\":\"integer\"}}", {"[]", "[1,2]"}, {"[,]", "[1,,2]"}},
    {"{\"type\":\"array\",\"items\":{\"type\":\"integer\"},\"minItems\":2}", {"[1,2]", "[1,2,3,4]"}, {"[1]", "[]"}},
    {"{\"type\":\"array\",\"items\":false}", {"[]"}, {"[1]"}},
    {"{\"type\":\"object\",\"properties\":{\"people\":{\"type\":\"array\",\"items\":{\"type\":\"object\","
     "\"properties\":"
     "{\"name\":{\"type\":\"string\"},\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"x\",\"y\"]},\"maxItems\":2}},"
     "\"required\":[\"name\",\"tags\"]}}},\"required\":[\"people\"]}",
     {"{\"people\":[]}", "{\"people\":[{\"name\":\"A\",\"tags\":[]},{\"name\":\"B\",\"tags\":[\"x\",\"y\"]}]}"},
     {"{\"people\":[{\"name\":\"A\"}]}", "{\"people\":[{\"name\":\"A\",\"tags\":[\"z\"]}]}"}},
    {"{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}],\"title\":\"x\",\"default\":null}",
     {"\"a\"", "null"},
     {"1"}},
    {"{\"oneOf\":[{\"type\":\"integer\"},{\"type\":\"boolean\"}]}", {"1", "true"}, {"null"}},
    {"{\"allOf\":[{\"type\":\"integer\",\"maximum\":3}]}", {"3"}, {"4"}},
    {"{\"$defs\":{\"p\":{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"integer\"}},\"required\":[\"x\"]}},"
     "\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/p\"}}",
     {"[]", "[{\"x\":1},{\"x\":2}]"},
     {"[{}]", "[{\"x\":\"1\"}]"}},
    {"{\"definitions\":{\"a/b\":{\"type\":\"null\"}},\"$ref\":\"#/definitions/a~1b\"}", {"null"}, {"1"}},
    {"{\"type\":[\"string\",\"null\"],\"maxLength\":1}", {"\"a\"", "null"}, {"\"ab\"", "1"}},
    {"{\"type\":\"integer\",\"nullable\":true}", {"1", "null"}, {"true"}},
    {"{\"type\":\"string\",\"format\":\"date\"}",
     {"\"2024-02-29\"", "\"1999-12-31\""},
     {"\"2024-13-01\"", "\"24-01-01\""}},
    {"{\"type\":\"string\",\"format\":\"time\"}",
     {"\"23:59:60Z\"", "\"08:30:00.5+02:00\""},
     {"\"24:00:00Z\"", "\"08:30:00\""}},
    {"{\"type\":\"string\",\"format\":\"date-time\"}", {"\"2024-02-29T08:30:00Z\""}, {"\"2024-02-29 08:30:00Z\""}},
    {"{\"type\":\"string\",\"format\":\"uuid\"}", {"\"123e4567-e89b-12d3-a456-426614174000\""}, {"\"123e4567\""}},
    {"{}",
     {"1", "\"a\"", "[1,{\"a\":[]}]", "{\"k\":{\"k\":[null]}}", "[[[[[1]]]]]", "{\"a\":{\"b\":{\"c\":{\"d\":{}}}}}"},
     {"[1,]", "{1:2}", "[[[[[[1]]]]]]", "", "nul"}},
    {"true", {"false", "[]"}, {"x"}},
    {"{\"type\":\"object\"}", {"{}", "{\"a\":1}", "{\"a\":{\"b\":[1,\"x\"]}}"}, {"[]", "1", "{\"a\"}"}},
    {"{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"},\"maxProperties\":2}",
     {"{}", "{\"x\":1,\"y\":2}"},
     {"{\"x\":\"a\"}", "{\"a\":1,\"b\":2,\"c\":3}"}},
    {"{\"type\":\"object\",\"additionalProperties\":false}", {"{}"}, {"{\"a\":1}"}},
    {"{\"prefixItems\":[{\"type\":\"integer\"},{\"type\":\"string\"}]}", {"[1,\"a\"]"}, {"[1]", "[1,\"a\",2]"}},
    {"{\"prefixItems\":[{\"type\":\"integer\"}],\"items\":{\"type\":\"null\"}}", {"[1]", "[1,null,null]"}, {"[1,2]"}},
    {"{\"properties\":{\"\xC3\xA9\\\"k\":{\"type\":\"null\"}},\"required\":[\"\xC3\xA9\\\"k\"]}",
     {"{\"\xC3\xA9\\\"k\":null}"},
     {"{}"}},
};

static void test_schema_cases_accept_valid_and_reject_invalid_documents(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof k_schema_cases / sizeof *k_schema_cases; i++) {
        const schema_case_t *sc = &k_schema_cases[i];
        fl_constraint_t *c = compile_or_fail(FL_CONSTRAINT_JSON_SCHEMA, sc->schema, NULL);
        for (int j = 0; j < MAXS && sc->valid[j]; j++)
            if (!matches(c, sc->valid[j])) fail_msg("%s rejects %s", sc->schema, sc->valid[j]);
        for (int j = 0; j < MAXS && sc->invalid[j]; j++)
            if (matches(c, sc->invalid[j])) fail_msg("%s accepts %s", sc->schema, sc->invalid[j]);
        fl_constraint_free(&c);
    }
}

static const bad_case_t k_bad_schema[] = {
    {"{\"not\":{}}", FL_EINVAL, "at #: keyword 'not' is not supported"},
    {"{\"properties\":{\"a\":{\"multipleOf\":2}}}", FL_EINVAL, "at #/properties/a: keyword 'multipleOf'"},
    {"{\"type\":\"string\",\"minLength\":1,\"pattern\":\"a\"}", FL_EINVAL, "together with pattern"},
    {"{\"type\":\"string\",\"pattern\":\"a(?=b)\"}", FL_EINVAL, "#/pattern: lookahead"},
    {"{\"items\":{\"type\":\"string\",\"pattern\":\"(\"}}", FL_EINVAL, "#/items/pattern: missing ')'"},
    {"{\"$ref\":\"#\"}", FL_EINVAL, "recursive $ref '#'"},
    {"{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/b\"},\"b\":{\"items\":{\"$ref\":\"#/$defs/a\"}}},\"$ref\":\"#/$defs/a\"}",
     FL_EINVAL, "recursive $ref"},
    {"{\"$ref\":\"http://x/y.json\"}", FL_EINVAL, "only references inside the schema"},
    {"{\"$ref\":\"#/$defs/none\"}", FL_EINVAL, "points to nothing"},
    {"{\"type\":\"number\",\"minimum\":0.5}", FL_EINVAL, "number bounds must be whole numbers"},
    {"{\"type\":\"number\",\"exclusiveMinimum\":0}", FL_EINVAL, "only supported for type integer"},
    {"{\"type\":\"string\",\"format\":\"email\"}", FL_EINVAL, "format 'email' is not supported"},
    {"{\"type\":\"array\",\"uniqueItems\":true}", FL_EINVAL, "'uniqueItems': true"},
    {"{\"allOf\":[{},{}]}", FL_EINVAL, "allOf' with more than one"},
    {"{\"anyOf\":[{}],\"type\":\"string\"}", FL_EINVAL, "together with other validation keywords"},
    {"{\"anyOf\":[]}", FL_EINVAL, "non-empty array"},
    {"{\"type\":\"foo\"}", FL_EINVAL, "unknown type 'foo'"},
    {"{\"type\":\"integer\",\"minimum\":5,\"maximum\":1}", FL_EINVAL, "minimum is above maximum"},
    {"{\"type\":\"integer\",\"minimum\":1e30}", FL_EINVAL, "out of the supported range"},
    {"false", FL_EINVAL, "matches nothing"},
    {"{\"enum\":[]}", FL_EINVAL, "no value of 'enum'"},
    {"{\"type\":\"string\",\"enum\":[1]}", FL_EINVAL, "no value of 'enum'"},
    {"{\"type\":\"string\",\"maxLength\":5000}", FL_ERANGE, "above the supported limit 1000"},
    {"{\"type\":\"string\",\"minLength\":3,\"maxLength\":2}", FL_EINVAL, "'minLength' is above 'maxLength'"},
    {"{\"properties\":{\"a\":{}},\"required\":[\"b\"]}", FL_EINVAL, "required property 'b' is not in 'properties'"},
    {"{\"type\":\"object\",\"required\":[\"b\"]}", FL_EINVAL, "'required' names properties"},
    {"{\"minLength\":1,\"minimum\":1}", FL_EINVAL, "keywords of several types"},
    {"{", FL_EINVAL, "invalid JSON at offset 1"},
    {"{\"type\":\"string\"} x", FL_EINVAL, "text after the schema"},
    {"{\"type\":\"str\\u00\"}", FL_EINVAL, "bad \\u escape"},
    {"[1]", FL_EINVAL, "a schema must be an object or a boolean"},
    {"", FL_EINVAL, "unexpected end"},
};

static void test_schema_unsupported_keywords_are_refused_clearly(void **state)
{
    (void)state;
    check_bad_cases(FL_CONSTRAINT_JSON_SCHEMA, k_bad_schema, sizeof k_bad_schema / sizeof *k_bad_schema);
    /* Deeply nested JSON is refused, not a stack overflow. */
    char deep[4096] = "";
    for (int i = 0; i < 300; i++) strcat(deep, "{\"items\":");
    strcat(deep, "{}");
    for (int i = 0; i < 300; i++) strcat(deep, "}");
    fl_error_t err = {0};
    assert_null(fl_constraint_compile(FL_CONSTRAINT_JSON_SCHEMA, deep, NULL, 0, NULL, NULL, &err));
    assert_non_null(strstr(err.msg, "nested deeper"));
}

/* Integer bounds are exact: every integer in a window around them. */
static void test_integer_and_number_bounds_are_exact(void **state)
{
    (void)state;
    static const struct {
        long long lo, hi;
        bool has_lo, has_hi;
    } b[] = {
        {0, 0, 1, 1},
        {0, 9, 1, 1},
        {1, 10, 1, 1},
        {5, 123, 1, 1},
        {-12, 345, 1, 1},
        {-100, -7, 1, 1},
        {7, 7, 1, 1},
        {99, 1000, 1, 1},
        {37, 0, 1, 0},
        {0, -5, 0, 1},
        {-1, 0, 1, 0},
        {0, 250, 0, 1},
        {101, 109, 1, 1},
        {999999999990LL, 1000000000010LL, 1, 1},
        {-9000000000000000000LL, 9000000000000000000LL, 1, 1},
    };
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) {
        for (int number = 0; number < 2; number++) {
            char schema[256] = "{\"type\":\"integer\"";
            if (number) strcpy(schema, "{\"type\":\"number\"");
            char part[64];
            if (b[i].has_lo) snprintf(part, sizeof part, ",\"minimum\":%lld", b[i].lo), strcat(schema, part);
            if (b[i].has_hi) snprintf(part, sizeof part, ",\"maximum\":%lld", b[i].hi), strcat(schema, part);
            strcat(schema, "}");
            fl_constraint_t *c = compile_or_fail(FL_CONSTRAINT_JSON_SCHEMA, schema, NULL);
            const long long centres[2] = {b[i].has_lo ? b[i].lo : b[i].hi, b[i].has_hi ? b[i].hi : b[i].lo};
            for (int k = 0; k < 2; k++)
                for (long long v = centres[k] - 150; v <= centres[k] + 150; v++) {
                    const bool in = (!b[i].has_lo || v >= b[i].lo) && (!b[i].has_hi || v <= b[i].hi);
                    char s[64];
                    snprintf(s, sizeof s, "%lld", v);
                    if (matches(c, s) != in) fail_msg("%s on %s: %d", schema, s, !in);
                    if (!number) continue;
                    /* Fractions: v + 0.25 and v - 0.25 written out, and v.0. */
                    for (int q = -1; q <= 1; q++) {
                        const double x = (double)v + 0.25 * q;
                        if (fabs(x) > 1e15) continue;
                        snprintf(s, sizeof s, q ? "%.2f" : "%.1f", x);
                        const bool xin =
                            (!b[i].has_lo || x >= (double)b[i].lo) && (!b[i].has_hi || x <= (double)b[i].hi);
                        if (matches(c, s) != xin) fail_msg("%s on %s: %d", schema, s, !xin);
                    }
                }
            fl_constraint_free(&c);
        }
    }
}

/* ---- token layer ---- */

static tok_t *g_tiny; /* the test kit's vocabulary */
static tok_t *g_model_tok;
static gguf_t *g_model_gguf;
static char g_model[4096];

static tok_t *tiny_tok(void)
{
    char **tokens, **merges;
    int n_merges;
    const int vocab = 2000;
    if (mkmodel_vocab(vocab, &tokens, &merges, &n_merges, NULL)) return NULL;
    int32_t *types = malloc(sizeof(int32_t) * (size_t)vocab);
    for (int i = 0; i < vocab; i++) types[i] = i < MKMODEL_N_SPECIAL ? TOK_TYPE_CONTROL : TOK_TYPE_NORMAL;
    tok_desc_t d = {.n_vocab = vocab,
                    .tokens = (const char *const *)tokens,
                    .token_types = types,
                    .n_merges = n_merges,
                    .merges = (const char *const *)merges,
                    .pre = "smollm",
                    .bos_id = 1,
                    .eos_id = 2,
                    .unk_id = -1,
                    .pad_id = -1};
    tok_t *t = tok_new(&d, NULL);
    mkmodel_vocab_free(tokens, vocab, merges, n_merges);
    free(types);
    return t;
}

/* A small JSON Schema checker over cJSON for the documents the walks produce (the subset above). */
static const cJSON *resolve_ref(const cJSON *root, const char *ref)
{
    const cJSON *t = root;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", ref + 1);
    for (char *seg = strtok(buf, "/"); seg && t; seg = strtok(NULL, "/")) t = cJSON_GetObjectItemCaseSensitive(t, seg);
    return t;
}

static size_t utf8_count(const char *s)
{
    size_t n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

static bool has_type(const cJSON *v, const char *t)
{
    if (!strcmp(t, "string")) return cJSON_IsString(v);
    if (!strcmp(t, "integer")) return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble);
    if (!strcmp(t, "number")) return cJSON_IsNumber(v);
    if (!strcmp(t, "boolean")) return cJSON_IsBool(v);
    if (!strcmp(t, "null")) return cJSON_IsNull(v);
    if (!strcmp(t, "object")) return cJSON_IsObject(v);
    if (!strcmp(t, "array")) return cJSON_IsArray(v);
    return false;
}

static bool valid(const cJSON *root, const cJSON *s, const cJSON *v)
{
    if (cJSON_IsBool(s)) return cJSON_IsTrue(s);
    const cJSON *k;
    if ((k = cJSON_GetObjectItem(s, "$ref"))) return valid(root, resolve_ref(root, k->valuestring), v);
    if ((k = cJSON_GetObjectItem(s, "nullable")) && cJSON_IsTrue(k) && cJSON_IsNull(v)) return true;
    if ((k = cJSON_GetObjectItem(s, "anyOf"))) {
        const cJSON *x;
        cJSON_ArrayForEach(x, k) if (valid(root, x, v)) return true;
        return false;
    }
    if ((k = cJSON_GetObjectItem(s, "oneOf"))) {
        int n = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, k) n += valid(root, x, v);
        return n == 1;
    }
    if ((k = cJSON_GetObjectItem(s, "allOf"))) {
        const cJSON *x;
        cJSON_ArrayForEach(x, k) if (!valid(root, x, v)) return false;
    }
    if ((k = cJSON_GetObjectItem(s, "enum"))) {
        bool any = false;
        const cJSON *x;
        cJSON_ArrayForEach(x, k) any |= cJSON_Compare(x, v, true);
        if (!any) return false;
    }
    if ((k = cJSON_GetObjectItem(s, "const")) && !cJSON_Compare(k, v, true)) return false;
    if ((k = cJSON_GetObjectItem(s, "type"))) {
        bool any = false;
        if (cJSON_IsString(k)) any = has_type(v, k->valuestring);
        const cJSON *x;
        if (cJSON_IsArray(k)) cJSON_ArrayForEach(x, k) any |= has_type(v, x->valuestring);
        if (!any) return false;
    }
    if (cJSON_IsString(v)) {
        const size_t n = utf8_count(v->valuestring);
        if ((k = cJSON_GetObjectItem(s, "minLength")) && n < (size_t)k->valuedouble) return false;
        if ((k = cJSON_GetObjectItem(s, "maxLength")) && n > (size_t)k->valuedouble) return false;
        if ((k = cJSON_GetObjectItem(s, "pattern")) && !ere_match(k->valuestring, v->valuestring, false)) return false;
        if ((k = cJSON_GetObjectItem(s, "format")) && !strcmp(k->valuestring, "date") &&
            !ere_match("^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$", v->valuestring, false))
            return false;
    }
    if (cJSON_IsNumber(v)) {
        const double x = v->valuedouble;
        if ((k = cJSON_GetObjectItem(s, "minimum")) && x < k->valuedouble) return false;
        if ((k = cJSON_GetObjectItem(s, "maximum")) && x > k->valuedouble) return false;
        if ((k = cJSON_GetObjectItem(s, "exclusiveMinimum")) && cJSON_IsNumber(k) && x <= k->valuedouble) return false;
        if ((k = cJSON_GetObjectItem(s, "exclusiveMaximum")) && cJSON_IsNumber(k) && x >= k->valuedouble) return false;
    }
    if (cJSON_IsObject(v)) {
        const cJSON *props = cJSON_GetObjectItem(s, "properties"),
                    *addl = cJSON_GetObjectItem(s, "additionalProperties");
        const cJSON *m;
        cJSON_ArrayForEach(m, v)
        {
            const cJSON *ps = props ? cJSON_GetObjectItemCaseSensitive(props, m->string) : NULL;
            if (ps && !valid(root, ps, m)) return false;
            if (!ps && addl && !valid(root, addl, m)) return false;
        }
        if ((k = cJSON_GetObjectItem(s, "required"))) {
            const cJSON *x;
            cJSON_ArrayForEach(x, k) if (!cJSON_GetObjectItemCaseSensitive(v, x->valuestring)) return false;
        }
    }
    if (cJSON_IsArray(v)) {
        const int n = cJSON_GetArraySize(v);
        if ((k = cJSON_GetObjectItem(s, "minItems")) && n < k->valueint) return false;
        if ((k = cJSON_GetObjectItem(s, "maxItems")) && n > k->valueint) return false;
        const cJSON *prefix = cJSON_GetObjectItem(s, "prefixItems"), *items = cJSON_GetObjectItem(s, "items");
        const int np = prefix ? cJSON_GetArraySize(prefix) : 0;
        for (int i = 0; i < n; i++) {
            const cJSON *sub = i < np ? cJSON_GetArrayItem(prefix, i) : items;
            if (sub && !valid(root, sub, cJSON_GetArrayItem(v, i))) return false;
        }
    }
    return true;
}

/* Bytes each state still needs to reach acceptance (breadth-first over the reversed automaton). */
static int *distances(const fl_constraint_t *c)
{
    const int n = fl_constraint_n_states(c);
    int *d = malloc(sizeof *d * (size_t)n);
    for (int s = 0; s < n; s++) d[s] = fl_constraint_accepting(c, s) ? 0 : -1;
    for (bool changed = true; changed;) {
        changed = false;
        for (int s = 0; s < n; s++)
            for (int b = 0; b < 256; b++) {
                const uint8_t byte = (uint8_t)b;
                const int t = fl_constraint_next_bytes(c, s, &byte, 1);
                if (t >= 0 && d[t] >= 0 && (d[s] < 0 || d[t] + 1 < d[s])) d[s] = d[t] + 1, changed = true;
            }
    }
    return d;
}

/* The mask of state against brute force over the vocabulary, and fl_constraint_next with it. */
static int check_mask(fl_constraint_t *c, const tok_t *tok, int32_t state)
{
    const uint64_t *m = fl_constraint_mask(c, state);
    assert_non_null(m);
    const int32_t n = tok_n_vocab(tok);
    int allowed = 0;
    char buf[256];
    for (int32_t id = 0; id < n; id++) {
        const int len = tok_token_bytes(tok, id, false, buf, sizeof buf);
        bool want;
        if (tok_is_eog(tok, id))
            want = fl_constraint_accepting(c, state);
        else
            want = len > 0 && fl_constraint_next_bytes(c, state, buf, (size_t)len) >= 0;
        const bool got = (m[id >> 6] >> (id & 63)) & 1;
        if (got != want) fail_msg("state %d token %d (%.*s): mask %d, brute force %d", state, id, len, buf, got, want);
        const int32_t next = fl_constraint_next(c, state, id);
        if ((next >= 0) != want) fail_msg("state %d token %d: next %d, allowed %d", state, id, next, want);
        allowed += want;
    }
    /* the id list: exactly the mask's tokens in order where few enough, none where more */
    const int max = n / 32;
    int32_t *ids = malloc(sizeof *ids * (size_t)(max + 1));
    const int n_ids = fl_constraint_allowed_ids(c, state, ids, max);
    if (allowed <= max) {
        assert_int_equal(n_ids, allowed);
        for (int i = 0; i < n_ids; i++) {
            assert_true((m[ids[i] >> 6] >> (ids[i] & 63)) & 1);
            if (i > 0) assert_true(ids[i] > ids[i - 1]);
        }
    } else {
        assert_int_equal(n_ids, -1);
    }
    free(ids);
    return allowed;
}

/* Forced tokens from state: each allowed in turn, their bytes the automaton's only way forward. */
static void check_forced(fl_constraint_t *c, const tok_t *tok, int32_t state)
{
    int32_t f[64];
    const int n = fl_constraint_forced(c, state, f, 64);
    int32_t s = state;
    char buf[256];
    for (int i = 0; i < n; i++) {
        const int len = tok_token_bytes(tok, f[i], false, buf, sizeof buf);
        for (int j = 0; j < len; j++) {
            assert_false(fl_constraint_accepting(c, s));
            int live = 0;
            for (int b = 0; b < 256; b++) {
                const uint8_t byte = (uint8_t)b;
                live += fl_constraint_next_bytes(c, s, &byte, 1) >= 0;
            }
            assert_int_equal(live, 1);
            s = fl_constraint_next_bytes(c, s, buf + j, 1);
        }
    }
    /* The same walk through fl_constraint_next. */
    s = state;
    for (int i = 0; i < n; i++) {
        s = fl_constraint_next(c, s, f[i]);
        assert_true(s >= 0);
    }
    /* A smaller max gives a prefix. */
    int32_t g[2];
    const int k = fl_constraint_forced(c, state, g, 2);
    assert_int_equal(k, n < 2 ? n : 2);
    for (int i = 0; i < k; i++) assert_int_equal(g[i], f[i]);
}

typedef struct {
    fl_constraint_kind_t kind;
    const char *text;
    const char *ere; /* the regex's POSIX ERE equivalent, or NULL */
} walk_case_t;

static const walk_case_t k_walk_cases[] = {
    {FL_CONSTRAINT_REGEX, "[0-9]{4}-[0-9]{2}-[0-9]{2}", "[0-9]{4}-[0-9]{2}-[0-9]{2}"},
    {FL_CONSTRAINT_REGEX, "(yes|no|maybe)( please)?", "(yes|no|maybe)( please)?"},
    {FL_CONSTRAINT_REGEX, "[a-z ]{3,30}\\.", "[a-z ]{3,30}[.]"},
    {FL_CONSTRAINT_REGEX, "(the|a) [a-z]+ (is|was) [0-9]+", "(the|a) [a-z]+ (is|was) [0-9]+"},
    {FL_CONSTRAINT_REGEX, "[^\"]{0,20}\"", NULL},
    {FL_CONSTRAINT_JSON_SCHEMA,
     "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":12},\"age\":{\"type\":"
     "\"integer\","
     "\"minimum\":0,\"maximum\":150},\"label\":{\"enum\":[\"positive\",\"negative\",\"neutral\"]},\"score\":{\"type\":"
     "\"number\",\"minimum\":-1,\"maximum\":1},\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"pattern\":"
     "\"^[a-z]{1,8}$\"},\"maxItems\":3},\"ok\":{\"type\":\"boolean\"}},\"required\":[\"name\",\"label\"]}",
     NULL},
    {FL_CONSTRAINT_JSON_SCHEMA,
     "{\"$defs\":{\"pt\":{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"integer\"},\"y\":{\"type\":\"integer\"}"
     "},"
     "\"required\":[\"x\",\"y\"]}},\"type\":\"array\",\"items\":{\"anyOf\":[{\"$ref\":\"#/$defs/"
     "pt\"},{\"type\":\"null\"}]},"
     "\"minItems\":1,\"maxItems\":4}",
     NULL},
    {FL_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"string\",\"format\":\"date\"}", NULL},
    {FL_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\"}", NULL},
    {FL_CONSTRAINT_JSON_SCHEMA, "{}", NULL},
};

/* Random walks over allowed tokens; after a while they head for acceptance (the allowed tokens
 * that leave the fewest bytes to go), then stop at an end-of-generation token. Every finished walk
 * must match. Masks and forced tokens are checked on a sample of the states passed. */
static void walk_case(const walk_case_t *wc, const tok_t *tok, int walks, int checks)
{
    fl_constraint_t *c = compile_or_fail(wc->kind, wc->text, tok);
    int *dist = distances(c);
    const int32_t n_vocab = tok_n_vocab(tok);
    int32_t *cand = malloc(sizeof *cand * (size_t)n_vocab);
    char *out = malloc(1 << 16);
    cJSON *schema = wc->kind == FL_CONSTRAINT_JSON_SCHEMA ? cJSON_Parse(wc->text) : NULL;
    int n_ended = 0;
    for (int w = 0; w < walks; w++) {
        int32_t s = fl_constraint_start(c);
        size_t len = 0;
        bool ended = false;
        for (int step = 0; step < 400 && !ended; step++) {
            if (checks > 0 && rnd() % 4 == 0) {
                check_mask(c, tok, s);
                check_forced(c, tok, s);
                checks--;
            }
            const uint64_t *m = fl_constraint_mask(c, s);
            int nc = 0, best = 1 << 30;
            const bool head_home = step > 25;
            for (int32_t id = 0; id < n_vocab; id++) {
                if (!((m[id >> 6] >> (id & 63)) & 1)) continue;
                if (head_home) {
                    const int d = tok_is_eog(tok, id) ? 0 : dist[fl_constraint_next(c, s, id)];
                    if (d > best) continue;
                    if (d < best) best = d, nc = 0;
                }
                cand[nc++] = id;
            }
            assert_true(nc > 0); /* a live state always has a way on */
            const int32_t id = cand[rnd() % (uint32_t)nc];
            if (tok_is_eog(tok, id)) {
                assert_true(fl_constraint_accepting(c, s));
                assert_int_equal(fl_constraint_next(c, s, id), s);
                ended = true;
                break;
            }
            const int k = tok_token_bytes(tok, id, false, out + len, (1 << 16) - len);
            len += (size_t)k;
            s = fl_constraint_next(c, s, id);
            assert_true(s >= 0);
            if (fl_constraint_finished(c, s)) ended = true;
        }
        if (!ended) continue;
        n_ended++;
        if (getenv("FOLIO_TEST_VERBOSE") && w < 3) /* a look at what the walks write */
            printf("walk: %.*s\n", (int)len, out);
        out[len] = 0;
        if (!fl_constraint_match(c, out, len))
            fail_msg("%s: walk produced \"%s\", which does not match", wc->text, out);
        if (wc->ere && !ere_match(wc->ere, out, true)) fail_msg("%s: regexec rejects \"%s\"", wc->ere, out);
        if (schema) {
            cJSON *doc = cJSON_ParseWithLength(out, len);
            if (!doc) fail_msg("%s: walk produced \"%s\", which cJSON cannot parse", wc->text, out);
            if (!valid(schema, schema, doc)) fail_msg("%s: \"%s\" is not valid under the schema", wc->text, out);
            cJSON_Delete(doc);
        }
    }
    /* Heading home after 25 tokens, nearly every walk ends well within 400. */
    if (n_ended < walks * 3 / 4) fail_msg("%s: only %d of %d walks ended", wc->text, n_ended, walks);
    cJSON_Delete(schema);
    free(out);
    free(cand);
    free(dist);
    fl_constraint_free(&c);
}

static void test_tiny_walks_over_allowed_tokens_always_match(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof k_walk_cases / sizeof *k_walk_cases; i++) walk_case(&k_walk_cases[i], g_tiny, 40, 30);
}

static void test_tiny_masks_next_and_forced_on_choice(void **state)
{
    (void)state;
    const char *choices[] = {"positive", "negative", "neutral", "mixed feelings", "n/a"};
    fl_error_t err = {0};
    fl_constraint_t *c = fl_constraint_compile(FL_CONSTRAINT_CHOICE, NULL, choices, 5, g_tiny, NULL, &err);
    assert_non_null(c);
    const int32_t s0 = fl_constraint_start(c);
    check_mask(c, g_tiny, s0);
    assert_false(fl_constraint_accepting(c, s0));
    /* After "ne" the choice is between negative and neutral; after "neg" it is fixed. */
    const int32_t s_ne = fl_constraint_next_bytes(c, s0, "ne", 2);
    int32_t f[16];
    assert_int_equal(fl_constraint_forced(c, s_ne, f, 16), 0);
    const int32_t s_neg = fl_constraint_next_bytes(c, s0, "neg", 3);
    const int n = fl_constraint_forced(c, s_neg, f, 16);
    assert_true(n > 0);
    char buf[64];
    const int len = tok_decode(g_tiny, f, n, false, buf, sizeof buf);
    assert_int_equal(len, 5);
    assert_memory_equal(buf, "ative", 5);
    int32_t s = s_neg;
    for (int i = 0; i < n; i++) s = fl_constraint_next(c, s, f[i]);
    assert_true(fl_constraint_finished(c, s));
    /* End of generation exactly where it accepts; the dead state has an empty mask. */
    for (int32_t id = 0; id < tok_n_vocab(g_tiny); id++)
        if (tok_is_eog(g_tiny, id)) {
            assert_int_equal(fl_constraint_next(c, s, id), s);
            assert_int_equal(fl_constraint_next(c, s_neg, id), FL_CSTATE_DEAD);
        }
    check_mask(c, g_tiny, s);
    const uint64_t *z = fl_constraint_mask(c, FL_CSTATE_DEAD);
    for (int i = 0; i < (tok_n_vocab(g_tiny) + 63) / 64; i++) assert_int_equal(z[i], 0);
    assert_int_equal(fl_constraint_next(c, FL_CSTATE_DEAD, 5), FL_CSTATE_DEAD);
    assert_int_equal(fl_constraint_next(c, s0, -1), FL_CSTATE_DEAD);
    assert_int_equal(fl_constraint_next(c, s0, tok_n_vocab(g_tiny)), FL_CSTATE_DEAD);
    /* Masks are kept: the same pointer the second time, and the bytes grew by them. */
    assert_ptr_equal(fl_constraint_mask(c, s0), fl_constraint_mask(c, s0));
    assert_true(fl_constraint_bytes(c) > (size_t)(tok_n_vocab(g_tiny) / 8));
    fl_constraint_free(&c);
    /* Control tokens are never allowed: no constraint lets "<|im_start|>" through as text. */
    c = compile_or_fail(FL_CONSTRAINT_REGEX, ".*", g_tiny);
    const uint64_t *m = fl_constraint_mask(c, fl_constraint_start(c));
    assert_false((m[1 >> 6] >> 1) & 1);
    assert_true((m[0] >> 0) & 1); /* <|endoftext|> is end of generation, allowed: ".*" accepts "" */
    fl_constraint_free(&c);
}

static void test_tiny_forced_json_keys_and_punctuation(void **state)
{
    (void)state;
    fl_constraint_t *c = compile_or_fail(
        FL_CONSTRAINT_JSON_SCHEMA,
        "{\"type\":\"object\",\"properties\":{\"label\":{\"enum\":[\"spam\",\"ham\"]},\"confidence\":{\"type\":"
        "\"integer\"}},\"required\":[\"label\",\"confidence\"]}",
        g_tiny);
    int32_t f[64];
    char buf[256];
    int n = fl_constraint_forced(c, fl_constraint_start(c), f, 64);
    int len = tok_decode(g_tiny, f, n, false, buf, sizeof buf);
    assert_int_equal(len, 10);
    assert_memory_equal(buf, "{\"label\":\"", 10);
    check_forced(c, g_tiny, fl_constraint_start(c));
    /* After the label "ham the rest of the member and the next key are fixed. */
    int32_t s = fl_constraint_next_bytes(c, fl_constraint_start(c), "{\"label\":\"h", 11);
    n = fl_constraint_forced(c, s, f, 64);
    len = tok_decode(g_tiny, f, n, false, buf, sizeof buf);
    buf[len] = 0;
    assert_string_equal(buf, "am\",\"confidence\":");
    check_forced(c, g_tiny, s);
    fl_constraint_free(&c);
}

static void test_cache_shares_compiled_constraints_and_evicts_lru(void **state)
{
    (void)state;
    fl_error_t err = {0};
    fl_constraint_cache_t *k = fl_constraint_cache_new(g_tiny, 2, 0, NULL, &err);
    assert_non_null(k);
    fl_constraint_t *a = fl_constraint_cache_get(k, FL_CONSTRAINT_REGEX, "a+", NULL, 0, &err);
    fl_constraint_t *a2 = fl_constraint_cache_get(k, FL_CONSTRAINT_REGEX, "a+", NULL, 0, &err);
    assert_ptr_equal(a, a2);
    const char *ch1[] = {"ab", "c"}, *ch2[] = {"a", "bc"};
    fl_constraint_t *b = fl_constraint_cache_get(k, FL_CONSTRAINT_CHOICE, NULL, ch1, 2, &err);
    fl_constraint_t *b2 = fl_constraint_cache_get(k, FL_CONSTRAINT_CHOICE, NULL, ch2, 2, &err);
    assert_ptr_not_equal(b, b2); /* same bytes, different choices */
    assert_int_equal(fl_constraint_cache_size(k), 2);
    /* "a+" was least recently used and is out of the cache, but still valid for its holders. */
    fl_constraint_t *a3 = fl_constraint_cache_get(k, FL_CONSTRAINT_REGEX, "a+", NULL, 0, &err);
    assert_ptr_not_equal(a3, a);
    assert_true(fl_constraint_match(a, "aaa", 3));
    assert_true(fl_constraint_next(a, fl_constraint_start(a), 3 + 'a') >= 0);
    /* A regex and a schema with the same text are different entries; failures are not cached. */
    fl_constraint_t *r = fl_constraint_cache_get(k, FL_CONSTRAINT_REGEX, "true", NULL, 0, &err);
    fl_constraint_t *j = fl_constraint_cache_get(k, FL_CONSTRAINT_JSON_SCHEMA, "true", NULL, 0, &err);
    assert_non_null(r);
    assert_non_null(j);
    assert_false(fl_constraint_match(r, "[1]", 3));
    assert_true(fl_constraint_match(j, "[1]", 3));
    assert_null(fl_constraint_cache_get(k, FL_CONSTRAINT_REGEX, "(", NULL, 0, &err));
    assert_int_equal(err.code, FL_EINVAL);
    fl_constraint_t *all[] = {a, a2, b, b2, a3, r, j};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) fl_constraint_free(&all[i]);
    fl_constraint_cache_destroy(&k);
    assert_null(k);
    fl_constraint_cache_destroy(NULL);
    fl_constraint_free(NULL);
}

static void test_limits_refuse_large_constraints_before_decoding(void **state)
{
    (void)state;
    fl_error_t err = {0};
    fl_constraint_limits_t lim = {.max_dfa_states = 50};
    assert_null(fl_constraint_compile(FL_CONSTRAINT_REGEX, "[a-z]{100}", NULL, 0, NULL, &lim, &err));
    assert_int_equal(err.code, FL_ERANGE);
    assert_non_null(strstr(err.msg, "too large"));
    /* Bytes: the masks every state could need count against max_bytes up front. */
    lim = (fl_constraint_limits_t){.max_bytes = 64 << 10};
    assert_null(fl_constraint_compile(FL_CONSTRAINT_REGEX, "[a-z]{300}", NULL, 0, g_tiny, &lim, &err));
    assert_int_equal(err.code, FL_ERANGE);
    assert_non_null(strstr(err.msg, "token masks"));
    /* Exponential determinisation is cut off, not run out: (a|b)*a(a|b){k} needs 2^k states. */
    assert_null(fl_constraint_compile(FL_CONSTRAINT_REGEX, "(a|b)*a(a|b){20}", NULL, 0, NULL, NULL, &err));
    assert_int_equal(err.code, FL_ERANGE);
    /* NFA growth by nested counted repeats. */
    assert_null(fl_constraint_compile(FL_CONSTRAINT_REGEX, "((a{1000}){1000}){1000}", NULL, 0, NULL, NULL, &err));
    assert_int_equal(err.code, FL_ERANGE);
}

/* ---- the default model's vocabulary ---- */

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static int setup_model(void **state)
{
    (void)state;
    fl_error_t err = {0};
    g_model_gguf = gguf_open(g_model, &err);
    if (!g_model_gguf) fail_msg("gguf_open(%s): %s", g_model, err.msg);
    g_model_tok = tok_new_from_gguf(g_model_gguf, &err);
    if (!g_model_tok) fail_msg("tok_new_from_gguf: %s", err.msg);
    return 0;
}

static int teardown_model(void **state)
{
    (void)state;
    tok_destroy(&g_model_tok);
    gguf_destroy(&g_model_gguf);
    return 0;
}

static void test_model_masks_match_brute_force_and_walks_match(void **state)
{
    (void)state;
    assert_int_equal(tok_n_vocab(g_model_tok), 49152);
    for (size_t i = 0; i < sizeof k_walk_cases / sizeof *k_walk_cases; i++)
        walk_case(&k_walk_cases[i], g_model_tok, 10, 12);
}

/* Prints compile and mask times on the default vocabulary (the figures in constraint.h). */
static void test_model_compile_and_mask_timings(void **state)
{
    (void)state;
    static const walk_case_t cases[] = {
        {FL_CONSTRAINT_REGEX, "[0-9]{4}-[0-9]{2}-[0-9]{2}", NULL},
        {FL_CONSTRAINT_JSON_SCHEMA, k_walk_cases[5].text, NULL},
        {FL_CONSTRAINT_JSON_SCHEMA, "{\"type\":\"object\"}", NULL},
        {FL_CONSTRAINT_JSON_SCHEMA, "{}", NULL},
    };
    fl_error_t err = {0};
    double t0 = now_ms();
    fl_constraint_cache_t *k = fl_constraint_cache_new(g_model_tok, 16, 0, NULL, &err);
    assert_non_null(k);
    printf("vocabulary index: %.1f ms\n", now_ms() - t0);
    const char *choices[] = {"positive", "negative", "neutral", "mixed", "unknown"};
    for (size_t i = 0; i <= sizeof cases / sizeof *cases; i++) {
        const bool choice = i == sizeof cases / sizeof *cases;
        t0 = now_ms();
        fl_constraint_t *c = choice ? fl_constraint_cache_get(k, FL_CONSTRAINT_CHOICE, NULL, choices, 5, &err)
                                    : fl_constraint_cache_get(k, cases[i].kind, cases[i].text, NULL, 0, &err);
        const double compile = now_ms() - t0;
        assert_non_null(c);
        const int n = fl_constraint_n_states(c);
        double total = 0, worst = 0;
        for (int s = 0; s < n; s++) {
            t0 = now_ms();
            fl_constraint_mask(c, s);
            const double dt = now_ms() - t0;
            total += dt;
            worst = dt > worst ? dt : worst;
        }
        t0 = now_ms();
        for (int r = 0; r < 1000; r++) fl_constraint_mask(c, r % n);
        const double warm = (now_ms() - t0) / 1000;
        printf("%-12s %5d states: compile %6.2f ms, first mask per state mean %.3f ms worst %.3f ms, warm %.5f ms, "
               "%zu KiB with all masks\n",
               choice                                 ? "choice"
               : cases[i].kind == FL_CONSTRAINT_REGEX ? "regex"
                                                      : "json schema",
               n, compile, total / n, worst, warm, fl_constraint_bytes(c) >> 10);
        fl_constraint_free(&c);
    }
    fl_constraint_cache_destroy(&k);
}

int main(void)
{
    g_tiny = tiny_tok();
    if (!g_tiny) {
        fprintf(stderr, "cannot build the tiny tokenizer\n");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_regex_cases_accept_and_reject_as_tabled),
        cmocka_unit_test(test_regex_unsupported_features_give_clear_errors),
        cmocka_unit_test(test_automaton_is_minimal),
        cmocka_unit_test(test_choice_is_exactly_one_of_the_strings),
        cmocka_unit_test(test_schema_cases_accept_valid_and_reject_invalid_documents),
        cmocka_unit_test(test_schema_unsupported_keywords_are_refused_clearly),
        cmocka_unit_test(test_integer_and_number_bounds_are_exact),
        cmocka_unit_test(test_tiny_walks_over_allowed_tokens_always_match),
        cmocka_unit_test(test_tiny_masks_next_and_forced_on_choice),
        cmocka_unit_test(test_tiny_forced_json_keys_and_punctuation),
        cmocka_unit_test(test_cache_shares_compiled_constraints_and_evicts_lru),
        cmocka_unit_test(test_limits_refuse_large_constraints_before_decoding),
    };
    const struct CMUnitTest model_tests[] = {
        cmocka_unit_test(test_model_masks_match_brute_force_and_walks_match),
        cmocka_unit_test(test_model_compile_and_mask_timings),
    };
    int rc = cmocka_run_group_tests_name("constraint", tests, NULL, NULL);
    if (!test_model_path(g_model, sizeof g_model)) {
        tok_destroy(&g_tiny);
        return rc ? rc : TEST_EXIT_SKIPPED;
    }
    rc |= cmocka_run_group_tests_name("constraint_model", model_tests, setup_model, teardown_model);
    tok_destroy(&g_tiny);
    return rc;
}
