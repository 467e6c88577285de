/* fuzz_regex.c - libFuzzer target for the regular-expression compiler (common/constraint_regex.c)
 * on untrusted patterns; see fuzz_constraint.h for the input and the invariants. Every string a
 * regex accepts is valid UTF-8 (its literals and classes are code points). */
#include "fuzz_constraint.h"
#include "unicode.h"

static void check_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        const int k = unicode_utf8_valid_prefix(s + i, n - i);
        if (k <= 0) abort();
        i += (size_t)k;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_constraint(FL_CONSTRAINT_REGEX, data, size, check_utf8);
    return 0;
}
