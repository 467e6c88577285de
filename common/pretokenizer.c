/* pretokenizer.c - the pre-tokenizer table and its split rules (see pretokenizer.h).
 *
 * Each rule mirrors one of llama.cpp's regexes as its unicode_regex_split applies it: the GPT-2 and
 * Llama 3 regexes by hand-written state machines copied from unicode_regex_split_custom_*; the others,
 * which llama.cpp runs through std::regex, by matchers written for their shape ("runs of a class",
 * "an optional whitespace then a run", "trailing whitespace"). llama.cpp feeds std::regex either the
 * code points (non-ASCII whitespace replaced by \v) or a "collapsed" text where each non-ASCII code
 * point stands as one byte for its class; either way \s is the White_Space property, \p{L}, \p{N},
 * \p{P} are the Unicode classes, and a literal class like [A-Za-zµÀ-Ö...] never holds a non-ASCII
 * whitespace. The predicates below encode exactly that. */
#include "pretokenizer.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "unicode.h"

/* The text being split: code points and their unicode_flags. */
typedef struct {
    const uint32_t *cps;
    const uint8_t *fl;
} text_t;

/* "Runs of a class" regexes over each segment, keeping both matches and the text between them.
 * chunk = 0: a run is one match (\p{N}+); chunk = k: a run is cut into matches of exactly k code points,
 * a remainder shorter than k joins the following text ([0-9][0-9][0-9] with k = 3, \p{N} with k = 1). */
typedef bool (*cp_pred_t)(uint32_t cp, uint8_t fl);

/* A character class: code points whose unicode_flags meet mask (\p{N}, \p{L}, \p{P}), or else those
 * pred accepts (literal classes). The mask is tested inline: the common rules make no call per code
 * point. */
typedef struct {
    uint8_t mask;
    cp_pred_t pred;
} cls_t;

static inline __attribute__((always_inline)) bool in_class(cls_t c, uint32_t cp, uint8_t fl)
{
    return c.mask ? (fl & c.mask) != 0 : c.pred(cp, fl);
}

static int split_runs(const text_t *s, const int32_t *in, int n_in, int32_t *out, cls_t c, int chunk)
{
    int n_out = 0;
    int32_t start = 0;
    for (int k = 0; k < n_in; k++) {
        int32_t end = start + in[k], gap = start, pos = start;
        while (pos < end) {
            if (!in_class(c, s->cps[pos], s->fl[pos])) {
                pos++;
                continue;
            }
            int32_t run_end = pos;
            while (run_end < end && in_class(c, s->cps[run_end], s->fl[run_end])) run_end++;
            int32_t len = run_end - pos;
            int32_t matched = chunk ? len / chunk * chunk : len;
            if (matched > 0) {
                if (pos > gap) out[n_out++] = pos - gap;
                if (chunk)
                    for (int32_t m = 0; m < matched; m += chunk) out[n_out++] = chunk;
                else
                    out[n_out++] = matched;
                gap = pos + matched;
            }
            pos = run_end;
        }
        if (end > gap) out[n_out++] = end - gap;
        start = end;
    }
    return n_out;
}

/* \s?C+ (C never holds whitespace): words of the class, each taking one whitespace before it. */
static int split_space_runs(const text_t *s, const int32_t *in, int n_in, int32_t *out, cls_t c)
{
    int n_out = 0;
    int32_t start = 0;
    for (int k = 0; k < n_in; k++) {
        const int32_t end = start + in[k];
        int32_t gap = start, pos = start;
        while (pos < end) {
            int32_t m = pos, run;
            if ((s->fl[pos] & UNICODE_SPACE) && pos + 1 < end && in_class(c, s->cps[pos + 1], s->fl[pos + 1]))
                run = pos + 1;
            else if (in_class(c, s->cps[pos], s->fl[pos]))
                run = pos;
            else {
                pos++;
                continue;
            }
            while (run < end && in_class(c, s->cps[run], s->fl[run])) run++;
            if (m > gap) out[n_out++] = m - gap;
            out[n_out++] = run - m;
            gap = pos = run;
        }
        if (end > gap) out[n_out++] = end - gap;
        start = end;
    }
    return n_out;
}

/* \s+$: the whitespace that ends each word becomes a word of its own. */
static int split_trailing_space(const text_t *s, const int32_t *in, int n_in, int32_t *out)
{
    int n_out = 0;
    int32_t start = 0;
    for (int k = 0; k < n_in; k++) {
        const int32_t end = start + in[k];
        int32_t t = end;
        while (t > start && (s->fl[t - 1] & UNICODE_SPACE)) t--;
        if (t > start) out[n_out++] = t - start;
        if (end > t) out[n_out++] = end - t;
        start = end;
    }
    return n_out;
}

#define OUT_OF_RANGE 0xFFFFFFFFu
#define F_LETTER(f) ((f) & UNICODE_LETTER)
#define F_NUMBER(f) ((f) & UNICODE_NUMBER)
#define F_SPACE(f) ((f) & UNICODE_SPACE)

/* unicode_regex_split_custom_gpt2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static int split_gpt2(const text_t *s, const int32_t *in, int n_in, int32_t *out)
{
    const uint32_t *restrict cps = s->cps; /* restrict: out's stores leave them be */
    const uint8_t *restrict fl = s->fl;
    int n_out = 0;
    int32_t start = 0;
    for (int k = 0; k < n_in; k++) {
        const int32_t ini = start, end = start + in[k];
        start = end;
#define CPT(p) ((p) >= ini && (p) < end ? cps[p] : OUT_OF_RANGE)
#define FLG(p) ((p) >= ini && (p) < end ? fl[p] : 0)
        int32_t prev_end = ini;
#define ADD(e_)                                                                                                        \
    do {                                                                                                               \
        int32_t e__ = (e_);                                                                                            \
        if (e__ > prev_end) out[n_out++] = e__ - prev_end;                                                             \
        prev_end = e__;                                                                                                \
    } while (0)
        for (int32_t pos = ini; pos < end;) {
            const uint32_t cpt = CPT(pos);
            const uint8_t flags = FLG(pos);
            if (cpt == '\'' && pos + 1 < end) {
                uint32_t nx = CPT(pos + 1);
                if (nx == 's' || nx == 't' || nx == 'm' || nx == 'd') {
                    ADD(pos + 2);
                    pos += 2;
                    continue;
                }
                if (pos + 2 < end) {
                    uint32_t nn = CPT(pos + 2);
                    if ((nx == 'r' && nn == 'e') || (nx == 'v' && nn == 'e') || (nx == 'l' && nn == 'l')) {
                        ADD(pos + 3);
                        pos += 3;
                        continue;
                    }
                }
            }
            uint8_t f2 = cpt == ' ' ? FLG(pos + 1) : flags;
            if (F_LETTER(f2)) {
                pos += cpt == ' ';
                while (F_LETTER(f2)) f2 = (++pos, FLG(pos));
                ADD(pos);
                continue;
            }
            if (F_NUMBER(f2)) {
                pos += cpt == ' ';
                while (F_NUMBER(f2)) f2 = (++pos, FLG(pos));
                ADD(pos);
                continue;
            }
            if (!(F_SPACE(f2) | F_LETTER(f2) | F_NUMBER(f2)) && f2) {
                pos += cpt == ' ';
                while (!(F_SPACE(f2) | F_LETTER(f2) | F_NUMBER(f2)) && f2) f2 = (++pos, FLG(pos));
                ADD(pos);
                continue;
            }
            int32_t nws = 0;
            while (F_SPACE(FLG(pos + nws))) nws++;
            if (nws > 1 && CPT(pos + nws) != OUT_OF_RANGE) { /* \s+(?!\S) */
                pos += nws - 1;
                ADD(pos);
                continue;
            }
            if (nws > 0) {
                pos += nws;
                ADD(pos);
                continue;
            }
            ADD(++pos); /* no match */
        }
    }
    return n_out;
}

static uint32_t ascii_lower(uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* unicode_regex_split_custom_llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ with max_digits = 3. Qwen2's regex is the same with
 * \p{N} for \p{N}{1,3}: llama.cpp runs it through std::regex, which (leftmost, first alternative that
 * matches, greedy) cuts the same words as this matcher with max_digits = 1. */
static inline __attribute__((always_inline)) int split_llama3(const text_t *s, const int32_t *in, int n_in,
                                                             int32_t *out, int max_digits)
{
    const uint32_t *restrict cps = s->cps;
    const uint8_t *restrict fl = s->fl;
    int n_out = 0;
    int32_t start = 0;
    for (int k = 0; k < n_in; k++) {
        const int32_t ini = start, end = start + in[k];
        start = end;
        int32_t prev_end = ini;
        for (int32_t pos = ini; pos < end;) {
            const uint32_t cpt = CPT(pos);
            const uint8_t flags = FLG(pos);
            if (cpt == '\'' && pos + 1 < end) {
                uint32_t nx = ascii_lower(CPT(pos + 1));
                if (nx == 's' || nx == 't' || nx == 'm' || nx == 'd') {
                    ADD(pos + 2);
                    pos += 2;
                    continue;
                }
                if (pos + 2 < end) {
                    uint32_t nn = ascii_lower(CPT(pos + 2));
                    if ((nx == 'r' && nn == 'e') || (nx == 'v' && nn == 'e') || (nx == 'l' && nn == 'l')) {
                        ADD(pos + 3);
                        pos += 3;
                        continue;
                    }
                }
            }
            if (!(cpt == '\r' || cpt == '\n' || F_NUMBER(flags))) {
                if (F_LETTER(flags) || F_LETTER(FLG(pos + 1))) {
                    pos++;
                    while (F_LETTER(FLG(pos))) pos++;
                    ADD(pos);
                    continue;
                }
            }
            if (F_NUMBER(flags)) {
                int32_t i0 = pos;
                while (F_NUMBER(FLG(pos))) {
                    if (++pos - i0 >= max_digits) {
                        ADD(pos);
                        i0 = pos;
                    }
                }
                ADD(pos);
                continue;
            }
            uint8_t f2 = cpt == ' ' ? FLG(pos + 1) : flags;
            if (!(F_SPACE(f2) | F_LETTER(f2) | F_NUMBER(f2)) && flags) {
                pos += cpt == ' ';
                while (!(F_SPACE(f2) | F_LETTER(f2) | F_NUMBER(f2)) && f2) f2 = (++pos, FLG(pos));
                uint32_t c2 = CPT(pos);
                while (c2 == '\r' || c2 == '\n') c2 = (++pos, CPT(pos));
                ADD(pos);
                continue;
            }
            int32_t nws = 0, last_rn = 0;
            while (F_SPACE(FLG(pos + nws))) {
                uint32_t c2 = CPT(pos + nws);
                if (c2 == '\r' || c2 == '\n') last_rn = pos + nws + 1;
                nws++;
            }
            if (last_rn > 0) {
                pos = last_rn;
                ADD(pos);
                continue;
            }
            if (nws > 1 && CPT(pos + nws) != OUT_OF_RANGE) {
                pos += nws - 1;
                ADD(pos);
                continue;
            }
            if (nws > 0) {
                pos += nws;
                ADD(pos);
                continue;
            }
            ADD(++pos);
        }
    }
    return n_out;
#undef CPT
#undef FLG
#undef ADD
}

/* ---- classes ---- */

static bool is_ascii_digit(uint32_t cp, uint8_t fl) { return cp >= '0' && cp <= '9'; }
static bool is_newline(uint32_t cp, uint8_t fl) { return cp == '\r' || cp == '\n'; }

/* [\p{P}\$\+<=>\^~\|]: the default pre-tokenizer's first rule */
static bool is_default_punct(uint32_t cp, uint8_t fl)
{
    return (fl & UNICODE_PUNCT) || cp == '$' || cp == '+' || cp == '<' || cp == '=' || cp == '>' || cp == '^' ||
           cp == '~' || cp == '|';
}

/* [\p{P}\$\+<=>\^~\|`]: Falcon's */
static bool is_falcon_punct(uint32_t cp, uint8_t fl) { return is_default_punct(cp, fl) || cp == '`'; }

/* A literal class of llama.cpp's regexes (sorted ranges): matched against code points in which every
 * non-ASCII whitespace reads as \v, so none of those is ever in it. */
static bool in_literal_class(const uint32_t (*r)[2], int n, uint32_t cp, uint8_t fl)
{
    return !(cp > 0x7F && (fl & UNICODE_SPACE)) && unicode_in_ranges(r, n, cp);
}

/* DeepSeek LLM's letters, [A-Za-zµÀ-ÖØ-öø-ƺ...𞤀-𞥃] (a subset of \p{L}: cased scripts) */
static const uint32_t DEEPSEEK_LETTERS[][2] = {
    {0x41, 0x5A},       {0x61, 0x7A},       {0xB5, 0xB5},       {0xC0, 0xD6},       {0xD8, 0xF6},
    {0xF8, 0x1BA},      {0x1BC, 0x1BF},     {0x1C4, 0x293},     {0x295, 0x2AF},     {0x370, 0x373},
    {0x376, 0x377},     {0x37B, 0x37D},     {0x37F, 0x37F},     {0x386, 0x386},     {0x388, 0x38A},
    {0x38C, 0x38C},     {0x38E, 0x3A1},     {0x3A3, 0x3F5},     {0x3F7, 0x481},     {0x48A, 0x52F},
    {0x531, 0x556},     {0x10A0, 0x10C5},   {0x13A0, 0x13F5},   {0x13F8, 0x13FD},   {0x1C90, 0x1CBA},
    {0x1CBD, 0x1CBF},   {0x1D00, 0x1D2B},   {0x1D6B, 0x1D77},   {0x1D79, 0x1D9A},   {0x1E00, 0x1F15},
    {0x1F18, 0x1F1D},   {0x1F20, 0x1F45},   {0x1F48, 0x1F4D},   {0x1F50, 0x1F57},   {0x1F59, 0x1F59},
    {0x1F5B, 0x1F5B},   {0x1F5D, 0x1F5D},   {0x1F5F, 0x1F7D},   {0x1F80, 0x1FB4},   {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FC4},   {0x1FC6, 0x1FCC},   {0x1FD0, 0x1FD3},   {0x1FD6, 0x1FDB},
    {0x1FE0, 0x1FEC},   {0x1FF2, 0x1FF4},   {0x1FF6, 0x1FFC},   {0x2102, 0x2102},   {0x2107, 0x2107},
    {0x210A, 0x2113},   {0x2115, 0x2115},   {0x2119, 0x211D},   {0x2124, 0x2124},   {0x2126, 0x2126},
    {0x2128, 0x2128},   {0x212A, 0x212D},   {0x212F, 0x2134},   {0x2139, 0x2139},   {0x213C, 0x213F},
    {0x2145, 0x2149},   {0x214E, 0x214E},   {0x2183, 0x2184},   {0x2C00, 0x2C7B},   {0x2C7E, 0x2CE4},
    {0x2CEB, 0x2CEE},   {0x2CF2, 0x2CF3},   {0xA640, 0xA66D},   {0xA680, 0xA69B},   {0xA722, 0xA76F},
    {0xA771, 0xA787},   {0xA78B, 0xA78E},   {0xAB70, 0xABBF},   {0xFB00, 0xFB06},   {0xFB13, 0xFB17},
    {0xFF21, 0xFF3A},   {0xFF41, 0xFF5A},   {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};
/* [!-/:-~！-／：-～‘-‟　-。] */
static const uint32_t DEEPSEEK_PUNCT[][2] = {
    {0x21, 0x2F}, {0x3A, 0x7E}, {0x2018, 0x201F}, {0x3000, 0x3002}, {0xFF01, 0xFF0F}, {0xFF1A, 0xFF5E},
};
/* [一-龥ࠀ-一가-퟿]: CJK ideographs, everything from U+0800 below them, Hangul */
static const uint32_t DEEPSEEK_CJK[][2] = {{0x800, 0x9FA5}, {0xAC00, 0xD7FF}};
#define N_RANGES(r) ((int)(sizeof(r) / sizeof((r)[0])))

static bool is_deepseek_letter(uint32_t cp, uint8_t fl)
{
    return in_literal_class(DEEPSEEK_LETTERS, N_RANGES(DEEPSEEK_LETTERS), cp, fl);
}
static bool is_deepseek_punct(uint32_t cp, uint8_t fl)
{
    return in_literal_class(DEEPSEEK_PUNCT, N_RANGES(DEEPSEEK_PUNCT), cp, fl);
}
static bool is_deepseek_cjk(uint32_t cp, uint8_t fl) { return in_literal_class(DEEPSEEK_CJK, N_RANGES(DEEPSEEK_CJK), cp, fl); }

/* ---- the table ---- */

typedef enum {
    RULE_END = 0,
    RULE_RUNS,           /* runs of the class, cut into chunks of n (0: whole runs) */
    RULE_SPACE_RUNS,     /* \s?C+ with C the class */
    RULE_TRAILING_SPACE, /* \s+$ */
    RULE_GPT2,
    RULE_LLAMA3, /* n: the longest number a word holds (\p{N}{1,n}) */
} rule_kind_t;

typedef struct {
    rule_kind_t kind;
    cls_t cls;
    int n;
} rule_t;

#define MAX_NAMES 16
#define MAX_RULES 6

struct pretok {
    const char *names[MAX_NAMES]; /* tokenizer.ggml.pre values, as llama-vocab.cpp maps them */
    rule_t rules[MAX_RULES];
    bool ignore_merges, add_bos;
};

/* llama.cpp's llm_tokenizer_bpe regexes (llama-vocab.cpp), one row per distinct list. */
static const pretok_t PRETOKENIZERS[] = {
    {.names = {"default"}, /* [\p{P}\$\+<=>\^~\|]+ | gpt2 | \p{N}+ | [0-9][0-9][0-9] */
     .rules = {{RULE_RUNS, {0, is_default_punct}, 0}, {RULE_GPT2, {0, NULL}, 0}, {RULE_RUNS, {UNICODE_NUMBER, NULL}, 0},
               {RULE_RUNS, {0, is_ascii_digit}, 3}}},
    {.names = {"gpt2", "gpt-2", "mpt", "phi-2", "olmo", "jais", "trillion", "exaone4", "jina-es", "jina-de",
               "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum"},
     .rules = {{RULE_GPT2, {0, NULL}, 0}}},
    {.names = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}, /* \p{N} | gpt2 */
     .rules = {{RULE_RUNS, {UNICODE_NUMBER, NULL}, 1}, {RULE_GPT2, {0, NULL}, 0}}},
    {.names = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"},
     .rules = {{RULE_LLAMA3, {0, NULL}, 3}},
     .ignore_merges = true,
     .add_bos = true},
    {.names = {"dbrx", "smaug-bpe"}, .rules = {{RULE_LLAMA3, {0, NULL}, 3}}},
    {.names = {"qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"}, .rules = {{RULE_LLAMA3, {0, NULL}, 1}}},
    {.names = {"falcon"}, /* [\p{P}\$\+<=>\^~\|`]+ | gpt2 | [0-9][0-9][0-9] */
     .rules = {{RULE_RUNS, {0, is_falcon_punct}, 0}, {RULE_GPT2, {0, NULL}, 0}, {RULE_RUNS, {0, is_ascii_digit}, 3}}},
    {.names = {"deepseek-llm"}, /* [\r\n] | \s?[A-Za-zµÀ-Ö...]+ | \s?[!-/:-~...]+ | \s+$ | [一-龥ࠀ-一가-퟿]+ | \p{N}+ */
     .rules = {{RULE_RUNS, {0, is_newline}, 1},
               {RULE_SPACE_RUNS, {0, is_deepseek_letter}, 0},
               {RULE_SPACE_RUNS, {0, is_deepseek_punct}, 0},
               {RULE_TRAILING_SPACE, {0, NULL}, 0},
               {RULE_RUNS, {0, is_deepseek_cjk}, 0},
               {RULE_RUNS, {UNICODE_NUMBER, NULL}, 0}}},
    {.names = {"deepseek-coder"}, /* [\r\n] | \s?\p{L}+ | \s?\p{P}+ | [一-龥ࠀ-一가-퟿]+ | \p{N} */
     .rules = {{RULE_RUNS, {0, is_newline}, 1},
               {RULE_SPACE_RUNS, {UNICODE_LETTER, NULL}, 0},
               {RULE_SPACE_RUNS, {UNICODE_PUNCT, NULL}, 0},
               {RULE_RUNS, {0, is_deepseek_cjk}, 0},
               {RULE_RUNS, {UNICODE_NUMBER, NULL}, 1}}},
};
#define N_PRETOKENIZERS ((int)(sizeof PRETOKENIZERS / sizeof PRETOKENIZERS[0]))

const pretok_t *pretok_find(const char *name)
{
    if (!name) return NULL;
    for (int i = 0; i < N_PRETOKENIZERS; i++)
        for (int k = 0; k < MAX_NAMES && PRETOKENIZERS[i].names[k]; k++)
            if (!strcmp(PRETOKENIZERS[i].names[k], name)) return &PRETOKENIZERS[i];
    return NULL;
}

void pretok_names(char *buf, size_t cap)
{
    size_t o = 0;
    if (cap) buf[0] = '\0';
    for (int i = 0; i < N_PRETOKENIZERS; i++)
        for (int k = 0; k < MAX_NAMES && PRETOKENIZERS[i].names[k] && o < cap; k++)
            o += (size_t)snprintf(buf + o, cap - o, "%s%s", o ? ", " : "", PRETOKENIZERS[i].names[k]);
}

bool pretok_ignore_merges(const pretok_t *p) { return p && p->ignore_merges; }
bool pretok_add_bos(const pretok_t *p) { return p && p->add_bos; }

int pretok_split(const pretok_t *p, const uint32_t *cps, const uint8_t *fl, int32_t n, int32_t *seg_a,
                 int32_t *seg_b, const int32_t **words)
{
    *words = seg_a;
    if (n <= 0) return 0;
    const text_t s = {cps, fl};
    if (p->rules[0].kind == RULE_LLAMA3 && p->rules[1].kind == RULE_END && p->rules[0].n == 3) {
        /* Llama 3, the one-rule case that matters most for speed: its own inlined copy */
        const int32_t whole[1] = {n};
        return split_llama3(&s, whole, 1, seg_a, 3);
    }
    int32_t *a = seg_a, *b = seg_b;
    a[0] = n;
    int na = 1;
    for (int r = 0; r < MAX_RULES && p->rules[r].kind != RULE_END; r++) {
        const rule_t *ru = &p->rules[r];
        switch (ru->kind) {
        case RULE_RUNS: na = split_runs(&s, a, na, b, ru->cls, ru->n); break;
        case RULE_SPACE_RUNS: na = split_space_runs(&s, a, na, b, ru->cls); break;
        case RULE_TRAILING_SPACE: na = split_trailing_space(&s, a, na, b); break;
        case RULE_GPT2: na = split_gpt2(&s, a, na, b); break;
        case RULE_LLAMA3: na = split_llama3(&s, a, na, b, ru->n); break;
        case RULE_END: break;
        }
        int32_t *tmp = a;
        a = b;
        b = tmp;
    }
    *words = a;
    return na;
}
