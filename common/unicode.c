/* unicode.c - UTF-8 decoding, code-point classes and the GPT-2 byte map (see unicode.h).
 *
 * Classes: ASCII comes from a table built at compile time from the same rules; everything else is a
 * binary search in the generated range tables. The byte map is computed arithmetically: GPT-2 keeps
 * '!'..'~', U+00A1..U+00AC and U+00AE..U+00FF as themselves and numbers the other 68 bytes from U+0100
 * in byte order. */
#include "unicode.h"

#include <stdbool.h>

bool unicode_in_ranges(const uint32_t (*r)[2], int n, uint32_t cp)
{
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < r[mid][0])
            hi = mid - 1;
        else if (cp > r[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

#define D UNICODE_DEFINED
#define L (UNICODE_DEFINED | UNICODE_LETTER)
#define N (UNICODE_DEFINED | UNICODE_NUMBER)
#define P (UNICODE_DEFINED | UNICODE_PUNCT)
#define S (UNICODE_DEFINED | UNICODE_SPACE)
/* ASCII: controls D, \t..\r S, space S, digits N, letters L; punctuation per Unicode's P* categories
 * ("$+<=>^`|~" are symbols, S*, so only D). */
static const uint8_t ascii_flags[128] = {
    D, D, D, D, D, D, D, D, D, S, S, S, S, S, D, D, /* 0x00 */
    D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, /* 0x10 */
    S, P, P, P, D, P, P, P, P, P, P, D, P, P, P, P, /*  !"#$%&'()*+,-./ */
    N, N, N, N, N, N, N, N, N, N, P, P, D, D, D, P, /* 0123456789:;<=>? */
    P, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L, /* @A-O */
    L, L, L, L, L, L, L, L, L, L, L, P, P, P, D, P, /* P-Z[\]^_ */
    D, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L, /* `a-o */
    L, L, L, L, L, L, L, L, L, L, L, P, D, P, D, D, /* p-z{|}~DEL */
};
#undef D
#undef L
#undef N
#undef P
#undef S

unsigned unicode_flags(uint32_t cp)
{
    if (cp < 128)
        return ascii_flags[cp];
    if (cp > UNICODE_MAX_CP)
        return 0;
    unsigned f = UNICODE_DEFINED;
    if (unicode_in_ranges(unicode_letter_ranges, unicode_letter_ranges_n, cp))
        return f | UNICODE_LETTER;
    if (unicode_in_ranges(unicode_number_ranges, unicode_number_ranges_n, cp))
        return f | UNICODE_NUMBER;
    if (unicode_in_ranges(unicode_space_ranges, unicode_space_ranges_n, cp))
        return f | UNICODE_SPACE;
    if (unicode_in_ranges(unicode_punct_ranges, unicode_punct_ranges_n, cp))
        return f | UNICODE_PUNCT;
    return f;
}

static bool cont(const char *s, size_t len, size_t i) { return i < len && ((uint8_t)s[i] & 0xC0) == 0x80; }

uint32_t unicode_decode_utf8(const char *s, size_t len, size_t *pos)
{
    size_t i = *pos;
    uint8_t b = (uint8_t)s[i];
    if (!(b & 0x80)) {
        *pos = i + 1;
        return b;
    }
    if ((b & 0x40) == 0) /* continuation byte */
        goto invalid;
    if (!(b & 0x20)) {
        if (!cont(s, len, i + 1))
            goto invalid;
        *pos = i + 2;
        return (uint32_t)(b & 0x1F) << 6 | ((uint8_t)s[i + 1] & 0x3F);
    }
    if (!(b & 0x10)) {
        if (!cont(s, len, i + 1) || !cont(s, len, i + 2))
            goto invalid;
        *pos = i + 3;
        return (uint32_t)(b & 0x0F) << 12 | (uint32_t)((uint8_t)s[i + 1] & 0x3F) << 6 | ((uint8_t)s[i + 2] & 0x3F);
    }
    if (!(b & 0x08)) {
        if (!cont(s, len, i + 1) || !cont(s, len, i + 2) || !cont(s, len, i + 3))
            goto invalid;
        *pos = i + 4;
        return (uint32_t)(b & 0x07) << 18 | (uint32_t)((uint8_t)s[i + 1] & 0x3F) << 12 |
               (uint32_t)((uint8_t)s[i + 2] & 0x3F) << 6 | ((uint8_t)s[i + 3] & 0x3F);
    }
invalid:
    *pos = i + 1;
    return UNICODE_REPLACEMENT;
}

int unicode_encode_utf8(uint32_t cp, char out[4])
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp <= UNICODE_MAX_CP) {
        out[0] = (char)(0xF0 | cp >> 18);
        out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        return 4;
    }
    return 0;
}

int unicode_utf8_len(uint8_t lead)
{
    static const uint8_t by_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return by_nibble[lead >> 4];
}

int unicode_utf8_valid_prefix(const uint8_t *s, size_t n)
{
    if (n == 0)
        return -1;
    uint8_t b = s[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b < 0x80)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        need = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0)
            lo = 0xA0; /* overlong */
        if (b == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0)
            lo = 0x90;
        if (b == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n)
            return -1;
        uint8_t c = s[i];
        if (i == 1 ? (c < lo || c > hi) : (c & 0xC0) != 0x80)
            return 0;
    }
    return need;
}

static bool byte_is_printable(unsigned b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); }

uint32_t unicode_byte_to_cp(uint8_t b)
{
    if (byte_is_printable(b))
        return b;
    /* Rank of b among the non-printable bytes: 0x00..0x20 (33), 0x7F..0xA0 (34), 0xAD (1). */
    unsigned n;
    if (b <= 0x20)
        n = b;
    else if (b <= 0xA0)
        n = 33 + (b - 0x7F);
    else
        n = 67;
    return 0x100 + n;
}

int unicode_cp_to_byte(uint32_t cp)
{
    if (cp < 0x100)
        return byte_is_printable(cp) ? (int)cp : -1;
    if (cp >= 0x100 + 68)
        return -1;
    unsigned n = cp - 0x100;
    if (n <= 0x20)
        return (int)n;
    if (n < 67)
        return (int)(0x7F + (n - 33));
    return 0xAD;
}
