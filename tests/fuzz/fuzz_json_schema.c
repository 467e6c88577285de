/* fuzz_json_schema.c - libFuzzer target for the JSON Schema compiler (common/constraint_schema.c)
 * on untrusted schemas; see fuzz_constraint.h for the input and the invariants. Every text a schema
 * accepts is one JSON value with no whitespace outside strings, checked by a small recursive
 * parser here. */
#include "fuzz_constraint.h"
#include "unicode.h"

static size_t json_value(const uint8_t *s, size_t n, size_t i, int depth);

static size_t json_string(const uint8_t *s, size_t n, size_t i)
{
    if (i >= n || s[i] != '"') abort();
    for (i++; i < n && s[i] != '"';) {
        if (s[i] < 0x20) abort();
        if (s[i] == '\\') {
            if (i + 1 >= n || !strchr("\"\\/bfnrtu", s[i + 1])) abort();
            if (s[i + 1] == 'u') {
                for (int k = 2; k < 6; k++)
                    if (i + (size_t)k >= n || !strchr("0123456789abcdefABCDEF", s[i + k]) || !s[i + k]) abort();
                i += 6;
            } else {
                i += 2;
            }
            continue;
        }
        const int k = unicode_utf8_valid_prefix(s + i, n - i);
        if (k <= 0) abort();
        i += (size_t)k;
    }
    if (i >= n) abort();
    return i + 1;
}

static size_t json_number(const uint8_t *s, size_t n, size_t i)
{
    if (i < n && s[i] == '-') i++;
    if (i < n && s[i] == '0')
        i++;
    else if (i < n && s[i] >= '1' && s[i] <= '9')
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    else
        abort();
    if (i < n && s[i] == '.') {
        if (++i >= n || s[i] < '0' || s[i] > '9') abort();
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        if (++i < n && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= n || s[i] < '0' || s[i] > '9') abort();
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    return i;
}

static size_t json_value(const uint8_t *s, size_t n, size_t i, int depth)
{
    if (i >= n || depth > 100) abort();
    if (s[i] == '"') return json_string(s, n, i);
    if (s[i] == '-' || (s[i] >= '0' && s[i] <= '9')) return json_number(s, n, i);
    static const char *const words[] = {"true", "false", "null"};
    for (int w = 0; w < 3; w++) {
        const size_t k = strlen(words[w]);
        if (n - i >= k && !memcmp(s + i, words[w], k)) return i + k;
    }
    if (s[i] != '[' && s[i] != '{') abort();
    const uint8_t close = s[i] == '[' ? ']' : '}';
    const bool obj = s[i] == '{';
    if (++i < n && s[i] == close) return i + 1;
    for (;;) {
        if (obj) {
            i = json_string(s, n, i);
            if (i >= n || s[i] != ':') abort();
            i++;
        }
        i = json_value(s, n, i, depth + 1);
        if (i < n && s[i] == ',') {
            i++;
            continue;
        }
        if (i < n && s[i] == close) return i + 1;
        abort();
    }
}

static void check_json(const uint8_t *s, size_t n)
{
    if (json_value(s, n, 0, 0) != n) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_constraint(FL_CONSTRAINT_JSON_SCHEMA, data, size, check_json);
    return 0;
}
