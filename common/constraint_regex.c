/* constraint_regex.c - the expression tree of constraints (arena, constructors, code-point classes
 * and their UTF-8 byte sequences) and the regular-expression parser (the subset documented in
 * constraint.h). A recursive-descent parser over the pattern's UTF-8 text: alternation, then
 * concatenation, then an atom and its quantifier; every error names what was found and its byte
 * offset in the pattern. */
#include "constraint_fa.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

/* ---- arena ---- */

typedef struct cx_block {
    struct cx_block *prev;
    size_t used, cap;
    max_align_t data[];
} cx_block_t;

struct cx_arena {
    cx_block_t *head;
};

cx_arena_t *cx_arena_new(void)
{
    return calloc(1, sizeof(cx_arena_t));
}

void cx_arena_free(cx_arena_t **ap)
{
    if (!ap || !*ap) return;
    for (cx_block_t *b = (*ap)->head, *p; b; b = p) {
        p = b->prev;
        free(b);
    }
    free(*ap);
    *ap = NULL;
}

void *cx_alloc(cx_arena_t *a, size_t n)
{
    const size_t align = sizeof(max_align_t);
    n = (n + align - 1) / align * align;
    if (n == 0) n = align;
    cx_block_t *b = a->head;
    if (!b || b->cap - b->used < n) {
        const size_t cap = n > 65536 ? n : 65536;
        b = malloc(sizeof(cx_block_t) + cap);
        if (!b) return NULL;
        b->cap = cap;
        b->used = 0;
        b->prev = a->head;
        a->head = b;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    memset(p, 0, n);
    return p;
}

void cx_vfail(fl_error_t *err, bool *failed, int code, const char *head, const char *tail, const char *fmt, va_list ap)
{
    if (*failed) return;
    *failed = true;
    char msg[400];
    vsnprintf(msg, sizeof msg, fmt, ap);
    fl_fail(err, code, "%s: %s%s", head, msg, tail);
}

/* ---- tree constructors: NULL in, NULL out, so callers check once at the end ---- */

static cx_node_t *node(cx_arena_t *a, cx_kind_t kind)
{
    cx_node_t *x = cx_alloc(a, sizeof *x);
    if (x) x->kind = kind;
    return x;
}

cx_node_t *cx_empty(cx_arena_t *a)
{
    return node(a, CX_EMPTY);
}
cx_node_t *cx_nothing(cx_arena_t *a)
{
    return node(a, CX_NOTHING);
}

cx_node_t *cx_bytes(cx_arena_t *a, const void *bytes, size_t len)
{
    if (len == 0) return cx_empty(a);
    cx_node_t *x = node(a, CX_BYTES);
    uint8_t *copy = cx_alloc(a, len);
    if (!x || !copy) return NULL;
    memcpy(copy, bytes, len);
    x->bytes = copy;
    x->len = len;
    return x;
}

cx_node_t *cx_str(cx_arena_t *a, const char *s)
{
    return cx_bytes(a, s, strlen(s));
}

static int range_cmp(const void *x, const void *y)
{
    const cx_range_t *p = x, *q = y;
    return p->lo < q->lo ? -1 : p->lo > q->lo;
}

cx_node_t *cx_class(cx_arena_t *a, const cx_range_t *ranges, int n, bool negate)
{
    /* Sorted and merged, complemented if asked, then cut around the surrogates (n + 2 ranges at most). */
    cx_range_t *r = cx_alloc(a, sizeof *r * (size_t)(n + 2)), *m = cx_alloc(a, sizeof *m * (size_t)(n + 2));
    if (!r || !m) return NULL;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (ranges[i].lo <= ranges[i].hi && ranges[i].lo <= UNICODE_MAX_CP)
            r[k++] = (cx_range_t){ranges[i].lo, ranges[i].hi > UNICODE_MAX_CP ? UNICODE_MAX_CP : ranges[i].hi};
    qsort(r, (size_t)k, sizeof *r, range_cmp);
    int nm = 0;
    for (int i = 0; i < k; i++) {
        if (nm && r[i].lo <= m[nm - 1].hi + 1) {
            if (r[i].hi > m[nm - 1].hi) m[nm - 1].hi = r[i].hi;
        } else {
            m[nm++] = r[i];
        }
    }
    if (negate) {
        int nc = 0;
        uint32_t next = 0;
        bool open = true;
        for (int i = 0; i < nm; i++) {
            if (m[i].lo > next) r[nc++] = (cx_range_t){next, m[i].lo - 1};
            if (m[i].hi >= UNICODE_MAX_CP) {
                open = false;
                break;
            }
            next = m[i].hi + 1;
        }
        if (open) r[nc++] = (cx_range_t){next, UNICODE_MAX_CP};
        memcpy(m, r, sizeof *r * (size_t)nc);
        nm = nc;
    }
    cx_range_t *out = cx_alloc(a, sizeof *out * (size_t)(nm + 1));
    if (!out) return NULL;
    int no = 0;
    for (int i = 0; i < nm; i++) {
        if (m[i].hi < 0xD800 || m[i].lo > 0xDFFF) {
            out[no++] = m[i];
            continue;
        }
        if (m[i].lo < 0xD800) out[no++] = (cx_range_t){m[i].lo, 0xD7FF};
        if (m[i].hi > 0xDFFF) out[no++] = (cx_range_t){0xE000, m[i].hi};
    }
    if (no == 0) return cx_nothing(a);
    cx_node_t *x = node(a, CX_CLASS);
    if (!x) return NULL;
    x->ranges = out;
    x->n_ranges = no;
    return x;
}

static cx_node_t *list_node(cx_arena_t *a, cx_kind_t kind, cx_node_t *const *kids, int n)
{
    for (int i = 0; i < n; i++)
        if (!kids[i]) return NULL;
    if (n == 1) return kids[0];
    if (n == 0) return kind == CX_CONCAT ? cx_empty(a) : cx_nothing(a);
    cx_node_t *x = node(a, kind);
    cx_node_t **copy = cx_alloc(a, sizeof *copy * (size_t)n);
    if (!x || !copy) return NULL;
    memcpy(copy, kids, sizeof *copy * (size_t)n);
    x->kids = copy;
    x->n_kids = n;
    return x;
}

cx_node_t *cx_concat(cx_arena_t *a, cx_node_t *const *kids, int n)
{
    return list_node(a, CX_CONCAT, kids, n);
}
cx_node_t *cx_alt(cx_arena_t *a, cx_node_t *const *kids, int n)
{
    return list_node(a, CX_ALT, kids, n);
}
cx_node_t *cx_concat2(cx_arena_t *a, cx_node_t *x, cx_node_t *y)
{
    return cx_concat(a, (cx_node_t *[]){x, y}, 2);
}
cx_node_t *cx_alt2(cx_arena_t *a, cx_node_t *x, cx_node_t *y)
{
    return cx_alt(a, (cx_node_t *[]){x, y}, 2);
}

cx_node_t *cx_concat3(cx_arena_t *a, cx_node_t *x, cx_node_t *y, cx_node_t *z)
{
    return cx_concat(a, (cx_node_t *[]){x, y, z}, 3);
}

cx_node_t *cx_repeat(cx_arena_t *a, cx_node_t *kid, int min, int max)
{
    if (!kid) return NULL;
    if (min == 1 && max == 1) return kid;
    cx_node_t *x = node(a, CX_REPEAT);
    if (!x) return NULL;
    x->kid = kid;
    x->min = min;
    x->max = max;
    return x;
}

cx_node_t *cx_seplist(cx_arena_t *a, cx_node_t *kid, const char *sep, int min, int max)
{
    cx_node_t *x = node(a, CX_SEPLIST);
    cx_node_t *s = cx_str(a, sep);
    if (!x || !kid || !s) return NULL;
    x->kid = kid;
    x->bytes = s->bytes;
    x->len = s->len;
    x->min = min;
    x->max = max;
    return x;
}

cx_node_t *cx_choice(cx_arena_t *a, const char *const *choices, int n, fl_error_t *err)
{
    if (n <= 0 || !choices) {
        fl_fail(err, FL_EINVAL, "choice: no choices given");
        return NULL;
    }
    cx_node_t **kids = cx_alloc(a, sizeof *kids * (size_t)n);
    if (!kids) goto oom;
    for (int i = 0; i < n; i++) {
        if (!choices[i]) {
            fl_fail(err, FL_EINVAL, "choice: choice %d is NULL", i);
            return NULL;
        }
        if (!(kids[i] = cx_str(a, choices[i]))) goto oom;
    }
    cx_node_t *x = cx_alt(a, kids, n);
    if (x) return x;
oom:
    fl_fail(err, FL_ENOMEM, "choice: out of memory");
    return NULL;
}

/* ---- UTF-8 sequences of a code-point range (as in RE2 and Rust's utf8-ranges) ---- */

static int utf8_encode_len(uint32_t cp)
{
    return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
}

static int utf8_split(uint32_t lo, uint32_t hi, cx_utf8_emit_fn emit, void *ctx)
{
    static const uint32_t len_max[4] = {0x7F, 0x7FF, 0xFFFF, 0x10FFFF};
    int r;
    const int nlo = utf8_encode_len(lo), nhi = utf8_encode_len(hi);
    if (nlo != nhi) {
        const uint32_t mid = len_max[nlo - 1];
        if ((r = utf8_split(lo, mid, emit, ctx))) return r;
        return utf8_split(mid + 1, hi, emit, ctx);
    }
    /* Split until every continuation byte spans its whole range or none of it varies. */
    for (int i = 1; i < nlo; i++) {
        const uint32_t m = (1u << (6 * i)) - 1;
        if ((lo & ~m) != (hi & ~m)) {
            if (lo & m) {
                if ((r = utf8_split(lo, lo | m, emit, ctx))) return r;
                return utf8_split((lo | m) + 1, hi, emit, ctx);
            }
            if ((hi & m) != m) {
                if ((r = utf8_split(lo, (hi & ~m) - 1, emit, ctx))) return r;
                return utf8_split(hi & ~m, hi, emit, ctx);
            }
        }
    }
    char a[4], b[4];
    unicode_encode_utf8(lo, a);
    unicode_encode_utf8(hi, b);
    return emit(ctx, (const uint8_t *)a, (const uint8_t *)b, nlo);
}

int cx_utf8_sequences(uint32_t lo, uint32_t hi, cx_utf8_emit_fn emit, void *ctx)
{
    if (lo > hi) return 0;
    return utf8_split(lo, hi, emit, ctx);
}

/* ---- the regex parser ---- */

typedef struct {
    cx_arena_t *a;
    const char *s;
    size_t len, pos;
    const char *what;
    fl_error_t *err;
    int depth;
    bool failed;
} rparse_t;

__attribute__((format(printf, 4, 5))) static cx_node_t *rfail(rparse_t *p, int code, size_t at, const char *fmt, ...)
{
    char tail[48];
    snprintf(tail, sizeof tail, " at offset %zu", at);
    va_list ap;
    va_start(ap, fmt);
    cx_vfail(p->err, &p->failed, code, p->what, tail, fmt, ap);
    va_end(ap);
    return NULL;
}

static cx_node_t *room(rparse_t *p)
{
    if (p->failed) return NULL;
    p->failed = true;
    fl_fail(p->err, FL_ENOMEM, "%s: out of memory", p->what);
    return NULL;
}

static int peek(const rparse_t *p)
{
    return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1;
}
static int peek_at(const rparse_t *p, size_t k)
{
    return p->pos + k < p->len ? (unsigned char)p->s[p->pos + k] : -1;
}

/* Class escapes and the ranges they stand for. */
static const cx_range_t k_digit[] = {{'0', '9'}};
static const cx_range_t k_word[] = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
static const cx_range_t k_space[] = {{'\t', '\r'}, {' ', ' '}};

/* A growable list of ranges (a class being parsed) in the arena. */
typedef struct {
    cx_range_t *r;
    int n, cap;
} rlist_t;

static bool rlist_add(cx_arena_t *a, rlist_t *l, uint32_t lo, uint32_t hi)
{
    if (l->n == l->cap) {
        const int cap = l->cap ? l->cap * 2 : 16;
        cx_range_t *r = cx_alloc(a, sizeof *r * (size_t)cap);
        if (!r) return false;
        if (l->n) memcpy(r, l->r, sizeof *r * (size_t)l->n);
        l->r = r;
        l->cap = cap;
    }
    l->r[l->n++] = (cx_range_t){lo, hi};
    return true;
}

/* Adds the set (or its complement) to l. */
static bool rlist_add_set(cx_arena_t *a, rlist_t *l, const cx_range_t *set, int n, bool negate)
{
    if (!negate) {
        for (int i = 0; i < n; i++)
            if (!rlist_add(a, l, set[i].lo, set[i].hi)) return false;
        return true;
    }
    uint32_t next = 0;
    for (int i = 0; i < n; i++) {
        if (set[i].lo > next && !rlist_add(a, l, next, set[i].lo - 1)) return false;
        next = set[i].hi + 1;
    }
    return rlist_add(a, l, next, UNICODE_MAX_CP);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Reads n hex digits at p->pos; -1 when they are not there. */
static long read_hex(rparse_t *p, int n)
{
    long v = 0;
    for (int i = 0; i < n; i++) {
        const int h = hexval(peek_at(p, (size_t)i));
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    p->pos += (size_t)n;
    return v;
}

/* One literal code point of the pattern (UTF-8 decoded strictly). */
static bool read_literal(rparse_t *p, uint32_t *cp)
{
    const size_t at = p->pos;
    const int n = unicode_utf8_valid_prefix((const uint8_t *)p->s + at, p->len - at);
    if (n <= 0) {
        rfail(p, FL_EINVAL, at, "invalid UTF-8 in the pattern");
        return false;
    }
    size_t pos = at;
    *cp = unicode_decode_utf8(p->s, p->len, &pos);
    p->pos = at + (size_t)n;
    return true;
}

/* An escape at p->pos (the backslash): a code point (returns 1, *cp) or a set added to l (returns
 * 2); 0 on error. in_class: inside [...]. */
static int read_escape(rparse_t *p, bool in_class, uint32_t *cp, rlist_t *l)
{
    const size_t at = p->pos;
    p->pos++;
    const int c = peek(p);
    if (c < 0) {
        rfail(p, FL_EINVAL, at, "trailing backslash");
        return 0;
    }
    p->pos++;
    switch (c) {
    case 'd':
    case 'D':
    case 'w':
    case 'W':
    case 's':
    case 'S': {
        const int lower = c | 0x20;
        const cx_range_t *set = lower == 'd' ? k_digit : lower == 'w' ? k_word : k_space;
        const int n = lower == 'd' ? 1 : lower == 'w' ? 4 : 2;
        if (!rlist_add_set(p->a, l, set, n, c != lower)) return room(p), 0;
        return 2;
    }
    case 'n':
        *cp = '\n';
        return 1;
    case 't':
        *cp = '\t';
        return 1;
    case 'r':
        *cp = '\r';
        return 1;
    case 'f':
        *cp = '\f';
        return 1;
    case 'v':
        *cp = '\v';
        return 1;
    case '0':
        if (peek(p) >= '0' && peek(p) <= '9') return rfail(p, FL_EINVAL, at, "octal escapes are not supported"), 0;
        *cp = 0;
        return 1;
    case 'x': {
        const long v = read_hex(p, 2);
        if (v < 0) return rfail(p, FL_EINVAL, at, "\\x needs exactly two hex digits"), 0;
        *cp = (uint32_t)v;
        return 1;
    }
    case 'u': {
        long v;
        if (peek(p) == '{') {
            p->pos++;
            v = 0;
            int nd = 0;
            while (hexval(peek(p)) >= 0 && nd < 7) v = v * 16 + hexval(peek(p)), p->pos++, nd++;
            if (nd == 0 || nd > 6 || peek(p) != '}')
                return rfail(p, FL_EINVAL, at, "\\u{...} needs 1 to 6 hex digits"), 0;
            p->pos++;
        } else {
            v = read_hex(p, 4);
            if (v < 0) return rfail(p, FL_EINVAL, at, "\\u needs exactly four hex digits (or \\u{...})"), 0;
        }
        if (v > (long)UNICODE_MAX_CP || (v >= 0xD800 && v <= 0xDFFF))
            return rfail(p, FL_EINVAL, at, "\\u escape U+%lX is not a Unicode scalar value", v), 0;
        *cp = (uint32_t)v;
        return 1;
    }
    case 'b':
        return rfail(p, FL_EINVAL, at,
                     in_class ? "\\b inside a class is not supported" : "word boundary \\b is not supported"),
               0;
    case 'B':
        return rfail(p, FL_EINVAL, at, "word boundary \\B is not supported"), 0;
    case 'A':
    case 'z':
    case 'Z':
    case 'G':
        return rfail(p, FL_EINVAL, at, "anchor \\%c is not supported (the pattern is always anchored)", c), 0;
    case 'p':
    case 'P':
        return rfail(p, FL_EINVAL, at, "Unicode property \\%c{...} is not supported", c), 0;
    case 'k':
        return rfail(p, FL_EINVAL, at, "backreference \\k<...> is not supported"), 0;
    case 'Q':
    case 'E':
        return rfail(p, FL_EINVAL, at, "quoting \\Q...\\E is not supported"), 0;
    case 'c':
        return rfail(p, FL_EINVAL, at, "control escape \\c is not supported"), 0;
    default:
        break;
    }
    if (c >= '1' && c <= '9') return rfail(p, FL_EINVAL, at, "backreference \\%c is not supported", c), 0;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return rfail(p, FL_EINVAL, at, "unknown escape \\%c", c), 0;
    p->pos--; /* punctuation and any other character stand for themselves */
    if (!read_literal(p, cp)) return 0;
    return 1;
}

static cx_node_t *single_cp(rparse_t *p, uint32_t cp)
{
    char buf[4];
    const int n = unicode_encode_utf8(cp, buf);
    cx_node_t *x = cx_bytes(p->a, buf, (size_t)n);
    return x ? x : room(p);
}

static cx_node_t *parse_class(rparse_t *p)
{
    const size_t at = p->pos;
    p->pos++; /* [ */
    bool negate = false;
    if (peek(p) == '^') negate = true, p->pos++;
    rlist_t l = {0};
    bool first = true;
    for (;;) {
        int c = peek(p);
        if (c < 0) return rfail(p, FL_EINVAL, at, "unterminated class '['");
        if (c == ']' && !first) {
            p->pos++;
            break;
        }
        first = false;
        if (c == '[' && peek_at(p, 1) == ':')
            return rfail(p, FL_EINVAL, p->pos, "POSIX class [:...:] is not supported");
        uint32_t lo, hi;
        const size_t item_at = p->pos;
        if (c == '\\') {
            const int k = read_escape(p, true, &lo, &l);
            if (k == 0) return NULL;
            if (k == 2) {
                if (peek(p) == '-' && peek_at(p, 1) != ']' && peek_at(p, 1) >= 0)
                    return rfail(p, FL_EINVAL, item_at, "a class escape cannot start a range");
                continue;
            }
        } else if (!read_literal(p, &lo)) {
            return NULL;
        }
        hi = lo;
        if (peek(p) == '-' && peek_at(p, 1) != ']' && peek_at(p, 1) >= 0) {
            p->pos++;
            if (peek(p) == '\\') {
                const int k = read_escape(p, true, &hi, &l);
                if (k == 0) return NULL;
                if (k == 2) return rfail(p, FL_EINVAL, item_at, "a class escape cannot end a range");
            } else if (!read_literal(p, &hi)) {
                return NULL;
            }
            if (hi < lo) return rfail(p, FL_EINVAL, item_at, "range out of order in class");
        }
        if (!rlist_add(p->a, &l, lo, hi)) return room(p);
    }
    cx_node_t *x = cx_class(p->a, l.r, l.n, negate);
    return x ? x : room(p);
}

static cx_node_t *parse_alt(rparse_t *p);

static cx_node_t *parse_group(rparse_t *p)
{
    const size_t at = p->pos;
    p->pos++; /* ( */
    if (peek(p) == '?') {
        const int c = peek_at(p, 1), d = peek_at(p, 2);
        if (c == ':') {
            p->pos += 2;
        } else if (c == '=' || c == '!') {
            return rfail(p, FL_EINVAL, at, "lookahead (?%c...) is not supported", c);
        } else if (c == '<' && (d == '=' || d == '!')) {
            return rfail(p, FL_EINVAL, at, "lookbehind (?<%c...) is not supported", d);
        } else if (c == '<' || (c == 'P' && d == '<')) {
            /* A named group is a group: the name does not change what matches. */
            while (peek(p) >= 0 && peek(p) != '>') p->pos++;
            if (peek(p) != '>') return rfail(p, FL_EINVAL, at, "unterminated group name");
            p->pos++;
        } else if (c == 'P' && d == '=') {
            return rfail(p, FL_EINVAL, at, "backreference (?P=...) is not supported");
        } else if (c == '>') {
            return rfail(p, FL_EINVAL, at, "atomic group (?>...) is not supported");
        } else if (c == '#') {
            return rfail(p, FL_EINVAL, at, "comment group (?#...) is not supported");
        } else {
            return rfail(p, FL_EINVAL, at, "inline flags or group modifiers (?...) are not supported");
        }
    }
    if (++p->depth > CX_MAX_DEPTH) return rfail(p, FL_ERANGE, at, "groups nested deeper than %d", CX_MAX_DEPTH);
    cx_node_t *x = parse_alt(p);
    p->depth--;
    if (!x) return NULL;
    if (peek(p) != ')') return rfail(p, FL_EINVAL, at, "missing ')' for this '('");
    p->pos++;
    return x;
}

static cx_node_t *parse_atom(rparse_t *p)
{
    const size_t at = p->pos;
    const int c = peek(p);
    switch (c) {
    case '(':
        return parse_group(p);
    case '[':
        return parse_class(p);
    case '.': {
        p->pos++;
        static const cx_range_t nl[] = {{'\n', '\n'}};
        cx_node_t *x = cx_class(p->a, nl, 1, true);
        return x ? x : room(p);
    }
    case '*':
    case '+':
    case '?':
    case '{':
        return rfail(p, FL_EINVAL, at, "quantifier '%c' has nothing to repeat", c);
    case '^':
        return rfail(p, FL_EINVAL, at, "anchor '^' is only supported at the start of the pattern");
    case '$':
        return rfail(p, FL_EINVAL, at, "anchor '$' is only supported at the end of the pattern");
    case '\\': {
        rlist_t l = {0};
        uint32_t cp;
        const int k = read_escape(p, false, &cp, &l);
        if (k == 0) return NULL;
        if (k == 1) return single_cp(p, cp);
        cx_node_t *x = cx_class(p->a, l.r, l.n, false);
        return x ? x : room(p);
    }
    default: {
        uint32_t cp;
        if (!read_literal(p, &cp)) return NULL;
        return single_cp(p, cp);
    }
    }
}

/* A decimal count in {m,n}: -1 when there is none, -2 on error (reported). */
static long read_count(rparse_t *p, size_t at)
{
    if (peek(p) < '0' || peek(p) > '9') return -1;
    long v = 0;
    while (peek(p) >= '0' && peek(p) <= '9') {
        if (v <= CX_MAX_REPEAT) v = v * 10 + (peek(p) - '0');
        p->pos++;
    }
    if (v > CX_MAX_REPEAT) {
        rfail(p, FL_ERANGE, at, "repeat count above the limit %d", CX_MAX_REPEAT);
        return -2;
    }
    return v;
}

/* Parses a quantifier at p->pos if there is one: true with *min, *max (max -1: unbounded). */
static bool parse_quantifier(rparse_t *p, bool *found, int *min, int *max)
{
    const size_t at = p->pos;
    *found = true;
    switch (peek(p)) {
    case '*':
        *min = 0, *max = -1, p->pos++;
        break;
    case '+':
        *min = 1, *max = -1, p->pos++;
        break;
    case '?':
        *min = 0, *max = 1, p->pos++;
        break;
    case '{': {
        p->pos++;
        const long m = read_count(p, at);
        if (m == -2) return false;
        long n = m;
        if (peek(p) == ',') {
            p->pos++;
            n = read_count(p, at);
            if (n == -2) return false;
        } else if (m < 0) {
            n = -2;
        }
        if (peek(p) != '}' || (m < 0 && n < 0))
            return rfail(p, FL_EINVAL, at,
                         "'{' does not start a {m}, {m,}, {m,n} or {,n} quantifier (escape it as \\{)"),
                   false;
        p->pos++;
        *min = m < 0 ? 0 : (int)m;
        *max = (int)n;
        if (n >= 0 && n < m) return rfail(p, FL_EINVAL, at, "quantifier {%ld,%ld} has min above max", m, n), false;
        break;
    }
    default:
        *found = false;
        return true;
    }
    if (peek(p) == '?') return rfail(p, FL_EINVAL, p->pos, "lazy quantifier '?' is not supported"), false;
    if (peek(p) == '+') return rfail(p, FL_EINVAL, p->pos, "possessive quantifier '+' is not supported"), false;
    return true;
}

/* A growable list of nodes in the arena. */
typedef struct {
    cx_node_t **v;
    int n, cap;
} nlist_t;

static bool nlist_add(cx_arena_t *a, nlist_t *l, cx_node_t *x)
{
    if (l->n == l->cap) {
        const int cap = l->cap ? l->cap * 2 : 8;
        cx_node_t **v = cx_alloc(a, sizeof *v * (size_t)cap);
        if (!v) return false;
        if (l->n) memcpy(v, l->v, sizeof *v * (size_t)l->n);
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = x;
    return true;
}

static cx_node_t *parse_concat(rparse_t *p)
{
    nlist_t l = {0};
    for (;;) {
        const int c = peek(p);
        if (c < 0 || c == '|' || c == ')') break;
        if (c == '$' && p->pos + 1 == p->len && p->depth == 0) { /* a trailing $ is the anchoring we do anyway */
            p->pos++;
            break;
        }
        cx_node_t *x = parse_atom(p);
        if (!x) return NULL;
        bool found;
        int min, max;
        if (!parse_quantifier(p, &found, &min, &max)) return NULL;
        if (found) {
            const int q = peek(p);
            if (q == '*' || q == '+' || q == '?' || q == '{')
                return rfail(p, FL_EINVAL, p->pos, "quantifier '%c' follows another quantifier", q);
            if (!(x = cx_repeat(p->a, x, min, max))) return room(p);
        }
        if (!nlist_add(p->a, &l, x)) return room(p);
    }
    cx_node_t *x = cx_concat(p->a, l.v, l.n);
    return x ? x : room(p);
}

static cx_node_t *parse_alt(rparse_t *p)
{
    nlist_t l = {0};
    for (;;) {
        cx_node_t *x = parse_concat(p);
        if (!x) return NULL;
        if (!nlist_add(p->a, &l, x)) return room(p);
        if (peek(p) != '|') break;
        p->pos++;
    }
    cx_node_t *x = cx_alt(p->a, l.v, l.n);
    return x ? x : room(p);
}

cx_node_t *cx_parse_regex(cx_arena_t *a, const char *pattern, size_t len, const char *what, fl_error_t *err)
{
    rparse_t p = {.a = a, .s = pattern, .len = len, .what = what ? what : "regex", .err = err};
    if (!pattern && len) {
        fl_fail(err, FL_EINVAL, "%s: no pattern", p.what);
        return NULL;
    }
    if (peek(&p) == '^') p.pos++; /* the pattern is anchored anyway */
    cx_node_t *x = parse_alt(&p);
    if (!x) return NULL;
    if (p.pos < p.len) return rfail(&p, FL_EINVAL, p.pos, "unmatched ')'");
    return x;
}
