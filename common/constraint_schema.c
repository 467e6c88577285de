/* constraint_schema.c - a JSON Schema (the subset documented in constraint.h) compiled to an
 * expression tree whose language is the compact JSON texts valid under the schema.
 *
 * The schema's own text is read by a small JSON parser here (numbers keep their text, so an enum's
 * 1.50 is written back as 1.50, and errors carry byte offsets). The compiler then walks the schema,
 * refusing every keyword it cannot enforce (so that whatever the automaton lets through is valid),
 * and builds: literal bytes for punctuation, keys, enum and const values; code-point classes for
 * string contents; digit-range alternations for bounded integers; CX_PROPS for objects (members in
 * the schema's order, optional ones may be absent); CX_SEPLIST for arrays. A $ref target is
 * compiled once and shared. */
#include "constraint_fa.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

#define SCHEMA_MAX_JSON_DEPTH 64
#define SCHEMA_MAX_NODES      100000 /* subschemas compiled, $ref expansions included */

/* ---- the schema's JSON ---- */

typedef enum { JV_NULL, JV_BOOL, JV_NUM, JV_STR, JV_ARR, JV_OBJ } jv_type_t;

typedef struct jv jv_t;
struct jv {
    jv_type_t type;
    bool b;
    double num;
    const char *text; /* JV_NUM: the number as written; JV_STR: the decoded bytes */
    size_t len;
    jv_t **items; /* JV_ARR items, JV_OBJ values */
    jv_t **keys;  /* JV_OBJ: JV_STR keys */
    int n;
    size_t pos; /* offset in the schema text */
};

typedef struct {
    cx_arena_t *a;
    const char *s;
    size_t len, pos;
    fl_error_t *err;
    bool failed;
} jparse_t;

__attribute__((format(printf, 2, 3))) static jv_t *jfail(jparse_t *p, const char *fmt, ...)
{
    char head[64];
    snprintf(head, sizeof head, "json schema: invalid JSON at offset %zu", p->pos);
    va_list ap;
    va_start(ap, fmt);
    cx_vfail(p->err, &p->failed, FL_EINVAL, head, "", fmt, ap);
    va_end(ap);
    return NULL;
}

static jv_t *joom(jparse_t *p)
{
    if (!p->failed) fl_fail(p->err, FL_ENOMEM, "json schema: out of memory");
    p->failed = true;
    return NULL;
}

static void jws(jparse_t *p)
{
    while (p->pos < p->len &&
           (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
        p->pos++;
}

static int jhex4(const char *s)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        const char c = s[i];
        const int h = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                             : -1;
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

static jv_t *jstring(jparse_t *p)
{
    jv_t *v = cx_alloc(p->a, sizeof *v);
    if (!v) return joom(p);
    v->type = JV_STR;
    v->pos = p->pos;
    p->pos++; /* " */
    /* Decoded text is never longer than its escaped form. */
    size_t end = p->pos;
    while (end < p->len && p->s[end] != '"') end += p->s[end] == '\\' ? 2 : 1;
    char *out = cx_alloc(p->a, end - p->pos + 1);
    if (!out) return joom(p);
    size_t n = 0;
    for (;;) {
        if (p->pos >= p->len) return jfail(p, "unterminated string");
        const unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) return jfail(p, "control character in a string");
        if (c != '\\') {
            const int k = unicode_utf8_valid_prefix((const uint8_t *)p->s + p->pos, p->len - p->pos);
            if (k <= 0) return jfail(p, "invalid UTF-8 in a string");
            memcpy(out + n, p->s + p->pos, (size_t)k);
            n += (size_t)k;
            p->pos += (size_t)k;
            continue;
        }
        if (p->pos + 1 >= p->len) return jfail(p, "unterminated string");
        const char e = p->s[p->pos + 1];
        p->pos += 2;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char map[] = "\"\\/\b\f\n\r\t";
            out[n++] = map[simple - "\"\\/bfnrt"];
            continue;
        }
        if (e != 'u' || p->pos + 4 > p->len) return jfail(p, "bad escape in a string");
        int cp = jhex4(p->s + p->pos);
        if (cp < 0) return jfail(p, "bad \\u escape in a string");
        p->pos += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            int lo = -1;
            if (p->pos + 6 <= p->len && p->s[p->pos] == '\\' && p->s[p->pos + 1] == 'u') lo = jhex4(p->s + p->pos + 2);
            if (lo < 0xDC00 || lo > 0xDFFF) return jfail(p, "unpaired surrogate in a string");
            p->pos += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return jfail(p, "unpaired surrogate in a string");
        }
        n += (size_t)unicode_encode_utf8((uint32_t)cp, out + n);
    }
    v->text = out;
    v->len = n;
    return v;
}

static jv_t *jnumber(jparse_t *p)
{
    const size_t at = p->pos;
    size_t i = at;
    const char *s = p->s;
    if (i < p->len && s[i] == '-') i++;
    if (i < p->len && s[i] == '0') {
        i++;
    } else if (i < p->len && s[i] >= '1' && s[i] <= '9') {
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    } else {
        return jfail(p, "bad number");
    }
    if (i < p->len && s[i] == '.') {
        i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') return jfail(p, "bad number");
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < p->len && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') return jfail(p, "bad number");
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    jv_t *v = cx_alloc(p->a, sizeof *v);
    char *text = cx_alloc(p->a, i - at + 1);
    if (!v || !text) return joom(p);
    memcpy(text, s + at, i - at);
    v->type = JV_NUM;
    v->pos = at;
    v->text = text;
    v->len = i - at;
    v->num = strtod(text, NULL);
    p->pos = i;
    return v;
}

static jv_t *jvalue(jparse_t *p, int depth);

/* Array items or object members, into a growing arena array. */
static bool jpush(jparse_t *p, jv_t ***v, int n, int *cap, jv_t *x)
{
    if (n == *cap) {
        const int c = *cap ? *cap * 2 : 8;
        jv_t **nv = cx_alloc(p->a, sizeof *nv * (size_t)c);
        if (!nv) return joom(p), false;
        if (n) memcpy(nv, *v, sizeof *nv * (size_t)n);
        *v = nv;
        *cap = c;
    }
    (*v)[n] = x;
    return true;
}

static jv_t *jcontainer(jparse_t *p, int depth)
{
    const bool obj = p->s[p->pos] == '{';
    if (depth >= SCHEMA_MAX_JSON_DEPTH) return jfail(p, "nested deeper than %d", SCHEMA_MAX_JSON_DEPTH);
    jv_t *v = cx_alloc(p->a, sizeof *v);
    if (!v) return joom(p);
    v->type = obj ? JV_OBJ : JV_ARR;
    v->pos = p->pos;
    p->pos++;
    jws(p);
    const char close = obj ? '}' : ']';
    if (p->pos < p->len && p->s[p->pos] == close) {
        p->pos++;
        return v;
    }
    int cap = 0, kcap = 0;
    for (;;) {
        jws(p);
        if (obj) {
            if (p->pos >= p->len || p->s[p->pos] != '"') return jfail(p, "expected a member name");
            jv_t *k = jstring(p);
            if (!k || !jpush(p, &v->keys, v->n, &kcap, k)) return NULL;
            jws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') return jfail(p, "expected ':'");
            p->pos++;
        }
        jv_t *x = jvalue(p, depth + 1);
        if (!x || !jpush(p, &v->items, v->n, &cap, x)) return NULL;
        v->n++;
        jws(p);
        if (p->pos < p->len && p->s[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->pos < p->len && p->s[p->pos] == close) {
            p->pos++;
            return v;
        }
        return jfail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static jv_t *jvalue(jparse_t *p, int depth)
{
    jws(p);
    if (p->pos >= p->len) return jfail(p, "unexpected end");
    const char c = p->s[p->pos];
    if (c == '{' || c == '[') return jcontainer(p, depth);
    if (c == '"') return jstring(p);
    if (c == '-' || (c >= '0' && c <= '9')) return jnumber(p);
    static const struct {
        const char *word;
        jv_type_t type;
        bool b;
    } words[] = {{"true", JV_BOOL, true}, {"false", JV_BOOL, false}, {"null", JV_NULL, false}};
    for (size_t i = 0; i < sizeof words / sizeof *words; i++) {
        const size_t n = strlen(words[i].word);
        if (p->len - p->pos >= n && !memcmp(p->s + p->pos, words[i].word, n)) {
            jv_t *v = cx_alloc(p->a, sizeof *v);
            if (!v) return joom(p);
            v->type = words[i].type;
            v->b = words[i].b;
            v->pos = p->pos;
            p->pos += n;
            return v;
        }
    }
    return jfail(p, "unexpected character");
}

static const jv_t *jget(const jv_t *obj, const char *key)
{
    if (!obj || obj->type != JV_OBJ) return NULL;
    const size_t n = strlen(key);
    for (int i = 0; i < obj->n; i++)
        if (obj->keys[i]->len == n && !memcmp(obj->keys[i]->text, key, n)) return obj->items[i];
    return NULL;
}

/* ---- canonical compact JSON (enum and const values, keys) ---- */

typedef struct {
    char *b;
    size_t n, cap;
    bool oom;
} sbuf_t;

static void sb_put(sbuf_t *s, const void *p, size_t n)
{
    if (s->oom) return;
    if (s->n + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        while (cap < s->n + n + 1) cap *= 2;
        char *b = realloc(s->b, cap);
        if (!b) {
            s->oom = true;
            return;
        }
        s->b = b;
        s->cap = cap;
    }
    memcpy(s->b + s->n, p, n);
    s->n += n;
    s->b[s->n] = 0;
}

static void sb_str(sbuf_t *s, const char *z)
{
    sb_put(s, z, strlen(z));
}

/* The escape JSON text must use for byte c of a string (NULL: c stands for itself). */
static const char *json_escape(uint8_t c, char buf[8])
{
    switch (c) {
    case '"':
        return "\\\"";
    case '\\':
        return "\\\\";
    case '\b':
        return "\\b";
    case '\f':
        return "\\f";
    case '\n':
        return "\\n";
    case '\r':
        return "\\r";
    case '\t':
        return "\\t";
    default:
        break;
    }
    if (c >= 0x20) return NULL;
    snprintf(buf, 8, "\\u%04x", c);
    return buf;
}

static void sb_json_string(sbuf_t *s, const char *p, size_t n)
{
    sb_put(s, "\"", 1);
    char buf[8];
    for (size_t i = 0; i < n; i++) {
        const char *e = json_escape((uint8_t)p[i], buf);
        if (e)
            sb_str(s, e);
        else
            sb_put(s, p + i, 1);
    }
    sb_put(s, "\"", 1);
}

static void sb_json(sbuf_t *s, const jv_t *v)
{
    switch (v->type) {
    case JV_NULL:
        sb_str(s, "null");
        break;
    case JV_BOOL:
        sb_str(s, v->b ? "true" : "false");
        break;
    case JV_NUM:
        sb_put(s, v->text, v->len);
        break;
    case JV_STR:
        sb_json_string(s, v->text, v->len);
        break;
    case JV_ARR:
    case JV_OBJ:
        sb_put(s, v->type == JV_ARR ? "[" : "{", 1);
        for (int i = 0; i < v->n; i++) {
            if (i) sb_put(s, ",", 1);
            if (v->type == JV_OBJ) {
                sb_json_string(s, v->keys[i]->text, v->keys[i]->len);
                sb_put(s, ":", 1);
            }
            sb_json(s, v->items[i]);
        }
        sb_put(s, v->type == JV_ARR ? "]" : "}", 1);
        break;
    }
}

/* ---- the compiler ---- */

typedef struct {
    const jv_t *target;
    cx_node_t *node;
} ref_memo_t;

typedef struct {
    cx_arena_t *a;
    fl_error_t *err;
    const jv_t *root;
    bool failed;
    char path[512]; /* JSON pointer of the subschema being compiled, for messages */
    size_t path_len;
    const jv_t *ref_stack[SCHEMA_MAX_JSON_DEPTH];
    int n_ref, depth;
    long n_nodes;
    ref_memo_t *memo;
    int n_memo, memo_cap;
    cx_node_t *any[CX_JSON_ANY_DEPTH + 1];
    cx_node_t *string, *number, *integer, *json_char;
} sctx_t;

__attribute__((format(printf, 3, 4))) static cx_node_t *sfail(sctx_t *s, int code, const char *fmt, ...)
{
    char head[600];
    snprintf(head, sizeof head, "json schema: at #%s", s->path);
    va_list ap;
    va_start(ap, fmt);
    cx_vfail(s->err, &s->failed, code, head, "", fmt, ap);
    va_end(ap);
    return NULL;
}

static cx_node_t *soom(sctx_t *s)
{
    return sfail(s, FL_ENOMEM, "out of memory");
}

/* Appends "/seg" to the path (truncated to fit); returns the old length for spop. */
static size_t spush(sctx_t *s, const char *seg, size_t n)
{
    const size_t old = s->path_len;
    const size_t room = sizeof s->path - 1 - s->path_len;
    if (room > 1) {
        const size_t k = n < room - 1 ? n : room - 1;
        s->path[s->path_len++] = '/';
        memcpy(s->path + s->path_len, seg, k);
        s->path_len += k;
        s->path[s->path_len] = 0;
    }
    return old;
}

static void spop(sctx_t *s, size_t old)
{
    s->path_len = old;
    s->path[old] = 0;
}

static cx_node_t *sregex(sctx_t *s, const char *re)
{
    cx_node_t *x = cx_parse_regex(s->a, re, strlen(re), "json schema (internal)", s->err);
    if (!x) s->failed = true;
    return x;
}

/* One character of a JSON string's contents: itself unless JSON requires an escape, or any escape
 * (\u escapes: not NUL, surrogates only as a valid pair). */
#define JSON_HEX "[0-9A-Fa-f]"
static const char k_json_char[] =
    "[^\"\\\\\\x00-\\x1F]|\\\\([\"\\\\/bfnrt]|u(00(0[1-9A-Fa-f]|[1-9A-Fa-f]" JSON_HEX ")|0[1-9A-Fa-f]" JSON_HEX "{2}|"
    "[1-9A-CEFa-cef]" JSON_HEX "{3}|[Dd][0-7]" JSON_HEX "{2}|[Dd][89ABab]" JSON_HEX "{2}\\\\u[Dd][C-Fc-f]" JSON_HEX
    "{2}))";
static const char k_json_integer[] = "-?(0|[1-9][0-9]*)";
static const char k_json_number[] = "-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?";

static const char *const k_formats[][2] = {
    {"date", "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"},
    {"time", "([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"},
    {"date-time", "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)"
                  "(\\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"},
    {"uuid", "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"},
};

static cx_node_t *json_char(sctx_t *s)
{
    return s->json_char ? s->json_char : (s->json_char = sregex(s, k_json_char));
}

static cx_node_t *json_string(sctx_t *s, int min, int max)
{
    if (min == 0 && max < 0 && s->string) return s->string;
    cx_node_t *q = cx_str(s->a, "\"");
    cx_node_t *x = cx_concat3(s->a, q, cx_repeat(s->a, json_char(s), min, max), q);
    if (!x) return s->failed ? NULL : soom(s);
    if (min == 0 && max < 0) s->string = x;
    return x;
}

/* Any JSON value with at most depth levels of arrays and objects. */
static cx_node_t *json_any(sctx_t *s, int depth, bool object_only)
{
    if (!object_only && s->any[depth]) return s->any[depth];
    cx_node_t *kids[7];
    int n = 0;
    if (!object_only) {
        if (!s->number) s->number = sregex(s, k_json_number);
        kids[n++] = json_string(s, 0, -1);
        kids[n++] = s->number;
        kids[n++] = cx_str(s->a, "true");
        kids[n++] = cx_str(s->a, "false");
        kids[n++] = cx_str(s->a, "null");
    }
    if (depth > 0) {
        cx_node_t *inner = json_any(s, depth - 1, false);
        if (!object_only)
            kids[n++] = cx_concat3(s->a, cx_str(s->a, "["), cx_seplist(s->a, inner, ",", 0, -1), cx_str(s->a, "]"));
        cx_node_t *member = cx_concat3(s->a, json_string(s, 0, -1), cx_str(s->a, ":"), inner);
        kids[n++] = cx_concat3(s->a, cx_str(s->a, "{"), cx_seplist(s->a, member, ",", 0, -1), cx_str(s->a, "}"));
    } else if (object_only) {
        kids[n++] = cx_str(s->a, "{}");
    }
    cx_node_t *x = cx_alt(s->a, kids, n);
    if (!x) return s->failed ? NULL : soom(s);
    if (!object_only) s->any[depth] = x;
    return x;
}

/* The pattern's tree rewritten for the inside of a JSON string: characters JSON must escape are
 * written escaped (their short escape, else \u00xx), everything else raw. In place. */
static cx_node_t *escape_tree(sctx_t *s, cx_node_t *x)
{
    char buf[8];
    switch (x->kind) {
    case CX_BYTES: {
        sbuf_t b = {0};
        for (size_t i = 0; i < x->len; i++) {
            const char *e = json_escape(x->bytes[i], buf);
            if (e)
                sb_str(&b, e);
            else
                sb_put(&b, x->bytes + i, 1);
        }
        cx_node_t *y = b.oom ? NULL : cx_bytes(s->a, b.b, b.n);
        free(b.b);
        return y ? y : soom(s);
    }
    case CX_CLASS: {
        /* The code points below 0x20, '"' and '\\' come out as alternatives of their escapes. */
        cx_range_t *keep = cx_alloc(s->a, sizeof *keep * (size_t)(x->n_ranges + 3));
        cx_node_t **alts = cx_alloc(s->a, sizeof *alts * 36);
        if (!keep || !alts) return soom(s);
        int nk = 0, na = 0;
        for (int i = 0; i < x->n_ranges; i++) {
            const cx_range_t r = x->ranges[i];
            for (uint32_t c = r.lo; c <= r.hi && c < 0x80; c++)
                if (json_escape((uint8_t)c, buf) && !(alts[na++] = cx_str(s->a, json_escape((uint8_t)c, buf))))
                    return soom(s);
            /* r minus {0..0x1F, 0x22, 0x5C} */
            const cx_range_t holes[] = {{0x00, 0x1F}, {0x22, 0x22}, {0x5C, 0x5C}};
            uint32_t lo = r.lo;
            for (int h = 0; h < 3 && lo <= r.hi; h++) {
                if (holes[h].hi < lo) continue;
                if (holes[h].lo > r.hi) break;
                if (holes[h].lo > lo) keep[nk++] = (cx_range_t){lo, holes[h].lo - 1};
                lo = holes[h].hi + 1;
            }
            if (lo <= r.hi) keep[nk++] = (cx_range_t){lo, r.hi};
        }
        if (nk) alts[na++] = cx_class(s->a, keep, nk, false);
        cx_node_t *y = cx_alt(s->a, alts, na);
        return y ? y : soom(s);
    }
    case CX_CONCAT:
    case CX_ALT:
        for (int i = 0; i < x->n_kids; i++)
            if (!(x->kids[i] = escape_tree(s, x->kids[i]))) return NULL;
        return x;
    case CX_REPEAT:
        if (!(x->kid = escape_tree(s, x->kid))) return NULL;
        return x;
    default:
        return x;
    }
}

/* Non-negative integers from lo to hi (hi_inf: no upper bound) as regex alternatives into b. */
static void range_same_len(sbuf_t *b, const char *prefix, const char *a, const char *z, int n)
{
    if (n == 0 || !strcmp(a, z)) {
        sb_str(b, "|");
        sb_str(b, prefix);
        sb_str(b, a);
        return;
    }
    char p2[64];
    if (a[0] == z[0]) {
        snprintf(p2, sizeof p2, "%s%c", prefix, a[0]);
        range_same_len(b, p2, a + 1, z + 1, n - 1);
        return;
    }
    char zeros[24], nines[24];
    memset(zeros, '0', (size_t)n - 1);
    memset(nines, '9', (size_t)n - 1);
    zeros[n - 1] = nines[n - 1] = 0;
    const bool lo_full = !strcmp(a + 1, zeros), hi_full = !strcmp(z + 1, nines);
    const char from = lo_full ? a[0] : (char)(a[0] + 1), to = hi_full ? z[0] : (char)(z[0] - 1);
    if (!lo_full) {
        snprintf(p2, sizeof p2, "%s%c", prefix, a[0]);
        range_same_len(b, p2, a + 1, nines, n - 1);
    }
    if (from <= to) {
        char part[96];
        if (n > 1)
            snprintf(part, sizeof part, "|%s[%c-%c][0-9]{%d}", prefix, from, to, n - 1);
        else
            snprintf(part, sizeof part, "|%s[%c-%c]", prefix, from, to);
        sb_str(b, part);
    }
    if (!hi_full) {
        snprintf(p2, sizeof p2, "%s%c", prefix, z[0]);
        range_same_len(b, p2, zeros, z + 1, n - 1);
    }
}

static int ndigits(uint64_t v)
{
    int n = 1;
    while (v >= 10) v /= 10, n++;
    return n;
}

static void range_regex(sbuf_t *b, uint64_t lo, uint64_t hi, bool hi_inf)
{
    const int nlo = ndigits(lo), nhi = hi_inf ? nlo : ndigits(hi);
    for (int L = nlo; L <= nhi; L++) {
        uint64_t p10 = 1;
        for (int i = 1; i < L; i++) p10 *= 10;
        const uint64_t first = L == 1 ? 0 : p10, last = L == 20 ? UINT64_MAX : p10 * 10 - 1;
        const uint64_t a = lo > first ? lo : first, z = hi_inf || hi > last ? last : hi;
        char as[24], zs[24];
        snprintf(as, sizeof as, "%llu", (unsigned long long)a);
        snprintf(zs, sizeof zs, "%llu", (unsigned long long)z);
        range_same_len(b, "", as, zs, L);
    }
    if (hi_inf && nlo < 20) {
        char part[48];
        snprintf(part, sizeof part, "|[1-9][0-9]{%d,}", nlo);
        sb_str(b, part);
    }
}

/* A bound read from the schema: none, or an integer value. */
typedef struct {
    bool set;
    int64_t v;
} bound_t;

/* Magnitudes (no sign) from lo to hi (hi.inf: unbounded) as a regex; with fraction, numbers whose
 * integer part is below hi take any fraction and hi itself only zeros. */
static void magnitude_regex(sbuf_t *b, uint64_t lo, uint64_t hi, bool hi_inf, bool fraction)
{
    if (!fraction) {
        sb_str(b, "(");
        range_regex(b, lo, hi, hi_inf);
        sb_str(b, ")");
        return;
    }
    sb_str(b, "(");
    if (hi_inf || hi > lo) {
        sb_str(b, "(");
        range_regex(b, lo, hi_inf ? 0 : hi - 1, hi_inf);
        sb_str(b, ")(\\.[0-9]+)?");
    }
    if (!hi_inf) {
        char part[48];
        snprintf(part, sizeof part, "|%llu(\\.0+)?", (unsigned long long)hi);
        sb_str(b, part);
    }
    sb_str(b, ")");
}

static uint64_t neg_magnitude(int64_t v)
{
    return (uint64_t)(-(v + 1)) + 1;
}

/* A JSON integer (or number with integer bounds, fraction) in [lo, hi]. */
static cx_node_t *bounded_number(sctx_t *s, bound_t lo, bound_t hi, bool fraction)
{
    if (lo.set && hi.set && lo.v > hi.v) return sfail(s, FL_EINVAL, "minimum is above maximum");
    sbuf_t b = {0};
    sb_str(&b, "(");
    bool first = true;
    if (!hi.set || hi.v >= 0) {
        magnitude_regex(&b, lo.set && lo.v > 0 ? (uint64_t)lo.v : 0, hi.set ? (uint64_t)hi.v : 0, !hi.set, fraction);
        first = false;
    }
    if (!lo.set || lo.v < 0) {
        sb_str(&b, first ? "-" : "|-");
        const uint64_t mlo = hi.set && hi.v < 0 ? neg_magnitude(hi.v) : fraction ? 0 : 1;
        magnitude_regex(&b, mlo, lo.set ? neg_magnitude(lo.v) : 0, !lo.set, fraction);
    }
    sb_str(&b, ")");
    /* range_regex writes "|x" parts: drop the '|' right after each '('. */
    if (b.oom) {
        free(b.b);
        return soom(s);
    }
    size_t w = 0;
    for (size_t r = 0; r < b.n; r++) {
        if (b.b[r] == '|' && w > 0 && b.b[w - 1] == '(') continue;
        b.b[w++] = b.b[r];
    }
    cx_node_t *x = cx_parse_regex(s->a, b.b, w, "json schema (internal range)", s->err);
    free(b.b);
    if (!x) s->failed = true;
    return x;
}

/* Reads a numeric keyword as a bound: integer-valued, within int64; for integers a fractional
 * value rounds inward (up for a minimum). */
static bool read_bound(sctx_t *s, const jv_t *v, const char *kw, bool integer, bool is_min, bound_t *out)
{
    if (!v) return true;
    if (v->type != JV_NUM) return sfail(s, FL_EINVAL, "'%s' must be a number", kw), false;
    double d = v->num;
    if (d != floor(d)) {
        if (!integer)
            return sfail(s, FL_EINVAL,
                         "'%s' %.*s: number bounds must be whole numbers (a fractional bound is only "
                         "supported for type integer)",
                         kw, (int)v->len, v->text),
                   false;
        d = is_min ? ceil(d) : floor(d);
    }
    if (!(d >= -9.2e18 && d <= 9.2e18))
        return sfail(s, FL_EINVAL, "'%s' %.*s is out of the supported range (+-9.2e18)", kw, (int)v->len, v->text),
               false;
    out->set = true;
    out->v = (int64_t)d;
    return true;
}

static cx_node_t *sschema(sctx_t *s, const jv_t *sch);

/* Keywords: which type each belongs to (annotations compile to nothing). */
typedef enum { KW_ANNOTATION, KW_ANY, KW_STRING, KW_NUMBER, KW_OBJECT, KW_ARRAY } kw_kind_t;

static const struct {
    const char *name;
    kw_kind_t kind;
} k_keywords[] = {
    {"$schema", KW_ANNOTATION},
    {"$id", KW_ANNOTATION},
    {"$comment", KW_ANNOTATION},
    {"title", KW_ANNOTATION},
    {"description", KW_ANNOTATION},
    {"default", KW_ANNOTATION},
    {"examples", KW_ANNOTATION},
    {"deprecated", KW_ANNOTATION},
    {"readOnly", KW_ANNOTATION},
    {"writeOnly", KW_ANNOTATION},
    {"$defs", KW_ANNOTATION},
    {"definitions", KW_ANNOTATION},
    {"contentMediaType", KW_ANNOTATION},
    {"contentEncoding", KW_ANNOTATION},
    {"type", KW_ANY},
    {"enum", KW_ANY},
    {"const", KW_ANY},
    {"anyOf", KW_ANY},
    {"oneOf", KW_ANY},
    {"allOf", KW_ANY},
    {"$ref", KW_ANY},
    {"nullable", KW_ANY},
    {"minLength", KW_STRING},
    {"maxLength", KW_STRING},
    {"pattern", KW_STRING},
    {"format", KW_STRING},
    {"minimum", KW_NUMBER},
    {"maximum", KW_NUMBER},
    {"exclusiveMinimum", KW_NUMBER},
    {"exclusiveMaximum", KW_NUMBER},
    {"properties", KW_OBJECT},
    {"required", KW_OBJECT},
    {"additionalProperties", KW_OBJECT},
    {"minProperties", KW_OBJECT},
    {"maxProperties", KW_OBJECT},
    {"items", KW_ARRAY},
    {"prefixItems", KW_ARRAY},
    {"minItems", KW_ARRAY},
    {"maxItems", KW_ARRAY},
    {"uniqueItems", KW_ARRAY},
};

static int keyword_kind(const jv_t *key)
{
    for (size_t i = 0; i < sizeof k_keywords / sizeof *k_keywords; i++)
        if (strlen(k_keywords[i].name) == key->len && !memcmp(k_keywords[i].name, key->text, key->len))
            return (int)k_keywords[i].kind;
    return -1;
}

static bool type_is(const jv_t *t, const char *name)
{
    return t->type == JV_STR && t->len == strlen(name) && !memcmp(t->text, name, t->len);
}

/* A count keyword (minLength, maxItems...): absent -> def; else 0..CX_MAX_REPEAT. */
static bool read_count(sctx_t *s, const jv_t *sch, const char *kw, int def, int *out)
{
    const jv_t *v = jget(sch, kw);
    *out = def;
    if (!v) return true;
    if (v->type != JV_NUM || v->num < 0 || v->num != floor(v->num))
        return sfail(s, FL_EINVAL, "'%s' must be a non-negative integer", kw), false;
    if (v->num > CX_MAX_REPEAT)
        return sfail(s, FL_ERANGE, "'%s' %.*s is above the supported limit %d", kw, (int)v->len, v->text,
                     CX_MAX_REPEAT),
               false;
    *out = (int)v->num;
    return true;
}

static bool read_counts(sctx_t *s, const jv_t *sch, const char *kmin, const char *kmax, int *min, int *max)
{
    if (!read_count(s, sch, kmin, 0, min) || !read_count(s, sch, kmax, -1, max)) return false;
    if (*max >= 0 && *min > *max) return sfail(s, FL_EINVAL, "'%s' is above '%s'", kmin, kmax), false;
    return true;
}

static cx_node_t *string_schema(sctx_t *s, const jv_t *sch)
{
    const jv_t *pattern = jget(sch, "pattern"), *format = jget(sch, "format");
    int min, max;
    if (!read_counts(s, sch, "minLength", "maxLength", &min, &max)) return NULL;
    const bool lengths = jget(sch, "minLength") || jget(sch, "maxLength");
    if ((pattern || format) && lengths)
        return sfail(s, FL_EINVAL, "minLength/maxLength together with pattern or format is not supported");
    if (pattern && format) return sfail(s, FL_EINVAL, "pattern together with format is not supported");
    if (format) {
        if (format->type != JV_STR) return sfail(s, FL_EINVAL, "'format' must be a string");
        for (size_t i = 0; i < sizeof k_formats / sizeof *k_formats; i++)
            if (type_is(format, k_formats[i][0]))
                return cx_concat3(s->a, cx_str(s->a, "\""), sregex(s, k_formats[i][1]), cx_str(s->a, "\""));
        return sfail(s, FL_EINVAL, "format '%.*s' is not supported (supported: date, time, date-time, uuid)",
                     (int)format->len, format->text);
    }
    if (pattern) {
        if (pattern->type != JV_STR) return sfail(s, FL_EINVAL, "'pattern' must be a string");
        char what[600];
        snprintf(what, sizeof what, "json schema: at #%s/pattern", s->path);
        cx_node_t *x = cx_parse_regex(s->a, pattern->text, pattern->len, what, s->err);
        if (!x) return s->failed = true, NULL;
        x = escape_tree(s, x);
        return cx_concat3(s->a, cx_str(s->a, "\""), x, cx_str(s->a, "\""));
    }
    return json_string(s, min, max);
}

static cx_node_t *number_schema(sctx_t *s, const jv_t *sch, bool integer)
{
    bound_t lo = {0}, hi = {0};
    if (!read_bound(s, jget(sch, "minimum"), "minimum", integer, true, &lo) ||
        !read_bound(s, jget(sch, "maximum"), "maximum", integer, false, &hi))
        return NULL;
    const char *ex[2] = {"exclusiveMinimum", "exclusiveMaximum"};
    for (int k = 0; k < 2; k++) {
        const jv_t *v = jget(sch, ex[k]);
        if (!v || (v->type == JV_BOOL && !v->b)) continue;
        if (!integer) return sfail(s, FL_EINVAL, "'%s' is only supported for type integer", ex[k]);
        bound_t *b = k == 0 ? &lo : &hi;
        if (v->type == JV_BOOL) { /* draft 4: minimum/maximum itself is exclusive */
            if (!b->set) return sfail(s, FL_EINVAL, "'%s': true needs '%s'", ex[k], k == 0 ? "minimum" : "maximum");
            if (b->v == (k == 0 ? INT64_MAX : INT64_MIN)) return sfail(s, FL_EINVAL, "'%s' leaves no integer", ex[k]);
            b->v += k == 0 ? 1 : -1;
            continue;
        }
        if (v->type != JV_NUM) return sfail(s, FL_EINVAL, "'%s' must be a number or a boolean", ex[k]);
        /* x > v is x >= floor(v) + 1 for integers; x < v is x <= ceil(v) - 1. */
        const double d = k == 0 ? floor(v->num) + 1 : ceil(v->num) - 1;
        if (!(d >= -9.2e18 && d <= 9.2e18))
            return sfail(s, FL_EINVAL, "'%s' %.*s is out of the supported range (+-9.2e18)", ex[k], (int)v->len,
                         v->text);
        const int64_t e = (int64_t)d;
        if (!b->set || (k == 0 ? e > b->v : e < b->v)) *b = (bound_t){true, e};
    }
    if (!lo.set && !hi.set) {
        cx_node_t **slot = integer ? &s->integer : &s->number;
        return *slot ? *slot : (*slot = sregex(s, integer ? k_json_integer : k_json_number));
    }
    return bounded_number(s, lo, hi, !integer);
}

static cx_node_t *json_key(sctx_t *s, const jv_t *key)
{
    sbuf_t b = {0};
    sb_json_string(&b, key->text, key->len);
    sb_put(&b, ":", 1);
    cx_node_t *x = b.oom ? NULL : cx_bytes(s->a, b.b, b.n);
    free(b.b);
    return x ? x : soom(s);
}

static cx_node_t *object_schema(sctx_t *s, const jv_t *sch)
{
    const jv_t *props = jget(sch, "properties"), *req = jget(sch, "required"),
               *addl = jget(sch, "additionalProperties");
    if (req && req->type != JV_ARR) return sfail(s, FL_EINVAL, "'required' must be an array");
    for (int i = 0; req && i < req->n; i++)
        if (req->items[i]->type != JV_STR) return sfail(s, FL_EINVAL, "'required' must hold strings");
    if (props && props->type != JV_OBJ) return sfail(s, FL_EINVAL, "'properties' must be an object");
    if (props && props->n > 0) {
        if (jget(sch, "minProperties") || jget(sch, "maxProperties"))
            return sfail(s, FL_EINVAL, "minProperties/maxProperties together with properties is not supported");
        for (int i = 0; req && i < req->n; i++) {
            int j = 0;
            while (j < props->n && !(props->keys[j]->len == req->items[i]->len &&
                                     !memcmp(props->keys[j]->text, req->items[i]->text, req->items[i]->len)))
                j++;
            if (j == props->n)
                return sfail(s, FL_EINVAL, "required property '%.*s' is not in 'properties'", (int)req->items[i]->len,
                             req->items[i]->text);
        }
        cx_node_t *x = cx_alloc(s->a, sizeof *x);
        cx_node_t **keys = cx_alloc(s->a, sizeof *keys * (size_t)props->n);
        cx_node_t **values = cx_alloc(s->a, sizeof *values * (size_t)props->n);
        bool *required = cx_alloc(s->a, sizeof *required * (size_t)props->n);
        if (!x || !keys || !values || !required) return soom(s);
        const size_t old = spush(s, "properties", 10);
        for (int i = 0; i < props->n; i++) {
            const size_t o2 = spush(s, props->keys[i]->text, props->keys[i]->len);
            for (int j = 0; req && j < req->n; j++)
                required[i] |= req->items[j]->len == props->keys[i]->len &&
                               !memcmp(req->items[j]->text, props->keys[i]->text, props->keys[i]->len);
            keys[i] = json_key(s, props->keys[i]);
            values[i] = sschema(s, props->items[i]);
            if (!keys[i] || !values[i]) return NULL;
            spop(s, o2);
        }
        spop(s, old);
        x->kind = CX_PROPS;
        x->kids = values;
        x->keys = keys;
        x->required = required;
        x->n_kids = props->n;
        return cx_concat3(s->a, cx_str(s->a, "{"), x, cx_str(s->a, "}"));
    }
    if (req && req->n > 0) return sfail(s, FL_EINVAL, "'required' names properties that 'properties' does not define");
    int min, max;
    if (!read_counts(s, sch, "minProperties", "maxProperties", &min, &max)) return NULL;
    if (addl && addl->type == JV_BOOL && !addl->b) {
        if (min > 0) return sfail(s, FL_EINVAL, "minProperties above 0 with no properties allowed");
        return cx_str(s->a, "{}");
    }
    if (addl && addl->type == JV_OBJ) {
        const size_t old = spush(s, "additionalProperties", 20);
        cx_node_t *value = sschema(s, addl);
        spop(s, old);
        if (!value) return NULL;
        cx_node_t *member = cx_concat3(s->a, json_string(s, 0, -1), cx_str(s->a, ":"), value);
        return cx_concat3(s->a, cx_str(s->a, "{"), cx_seplist(s->a, member, ",", min, max), cx_str(s->a, "}"));
    }
    if (addl && addl->type != JV_BOOL)
        return sfail(s, FL_EINVAL, "'additionalProperties' must be a boolean or a schema");
    if (min > 0 || max >= 0) {
        cx_node_t *member =
            cx_concat3(s->a, json_string(s, 0, -1), cx_str(s->a, ":"), json_any(s, CX_JSON_ANY_DEPTH - 1, false));
        return cx_concat3(s->a, cx_str(s->a, "{"), cx_seplist(s->a, member, ",", min, max), cx_str(s->a, "}"));
    }
    return json_any(s, CX_JSON_ANY_DEPTH, true);
}

static cx_node_t *array_schema(sctx_t *s, const jv_t *sch)
{
    const jv_t *items = jget(sch, "items"), *prefix = jget(sch, "prefixItems"), *unique = jget(sch, "uniqueItems");
    if (unique && !(unique->type == JV_BOOL && !unique->b))
        return sfail(s, FL_EINVAL, "'uniqueItems': true is not supported");
    int min, max;
    if (!read_counts(s, sch, "minItems", "maxItems", &min, &max)) return NULL;
    cx_node_t *item = NULL;
    const bool no_more = items && items->type == JV_BOOL && !items->b;
    if (items && !no_more) {
        const size_t old = spush(s, "items", 5);
        item = sschema(s, items);
        spop(s, old);
        if (!item) return NULL;
    } else if (!items) {
        item = json_any(s, CX_JSON_ANY_DEPTH - 1, false);
    }
    if (prefix) {
        if (prefix->type != JV_ARR) return sfail(s, FL_EINVAL, "'prefixItems' must be an array");
        if (jget(sch, "minItems") || jget(sch, "maxItems"))
            return sfail(s, FL_EINVAL, "minItems/maxItems together with prefixItems is not supported");
        /* The tuple, then more items only where "items" allows them explicitly. */
        cx_node_t **parts = cx_alloc(s->a, sizeof *parts * (size_t)(2 * prefix->n + 3));
        if (!parts) return soom(s);
        int n = 0;
        parts[n++] = cx_str(s->a, "[");
        const size_t old = spush(s, "prefixItems", 11);
        for (int i = 0; i < prefix->n; i++) {
            char idx[16];
            const size_t o2 = spush(s, idx, (size_t)snprintf(idx, sizeof idx, "%d", i));
            if (i) parts[n++] = cx_str(s->a, ",");
            if (!(parts[n++] = sschema(s, prefix->items[i]))) return NULL;
            spop(s, o2);
        }
        spop(s, old);
        if (items && !no_more) {
            cx_node_t *more = prefix->n ? cx_repeat(s->a, cx_concat2(s->a, cx_str(s->a, ","), item), 0, -1)
                                        : cx_seplist(s->a, item, ",", 0, -1);
            parts[n++] = more;
        }
        parts[n++] = cx_str(s->a, "]");
        return cx_concat(s->a, parts, n);
    }
    if (no_more) {
        if (min > 0) return sfail(s, FL_EINVAL, "minItems above 0 with 'items': false");
        return cx_str(s->a, "[]");
    }
    return cx_concat3(s->a, cx_str(s->a, "["), cx_seplist(s->a, item, ",", min, max), cx_str(s->a, "]"));
}

/* Does JSON value v have JSON Schema type t? */
static bool value_has_type(const jv_t *v, const jv_t *t)
{
    if (type_is(t, "null")) return v->type == JV_NULL;
    if (type_is(t, "boolean")) return v->type == JV_BOOL;
    if (type_is(t, "number")) return v->type == JV_NUM;
    if (type_is(t, "integer")) return v->type == JV_NUM && v->num == floor(v->num);
    if (type_is(t, "string")) return v->type == JV_STR;
    if (type_is(t, "array")) return v->type == JV_ARR;
    if (type_is(t, "object")) return v->type == JV_OBJ;
    return false;
}

static bool value_allowed(const jv_t *v, const jv_t *type)
{
    if (!type) return true;
    if (type->type == JV_STR) return value_has_type(v, type);
    for (int i = 0; i < type->n; i++)
        if (value_has_type(v, type->items[i])) return true;
    return false;
}

static cx_node_t *enum_schema(sctx_t *s, const jv_t *values, const jv_t *type)
{
    cx_node_t **alts = cx_alloc(s->a, sizeof *alts * (size_t)(values->n + 1));
    if (!alts) return soom(s);
    int n = 0;
    for (int i = 0; i < values->n; i++) {
        if (!value_allowed(values->items[i], type)) continue;
        sbuf_t b = {0};
        sb_json(&b, values->items[i]);
        alts[n] = b.oom ? NULL : cx_bytes(s->a, b.b, b.n);
        free(b.b);
        if (!alts[n++]) return soom(s);
    }
    if (n == 0) return sfail(s, FL_EINVAL, "no value of 'enum'/'const' has the schema's type");
    return cx_alt(s->a, alts, n);
}

static cx_node_t *typed_schema(sctx_t *s, const jv_t *sch, const jv_t *t)
{
    if (type_is(t, "string")) return string_schema(s, sch);
    if (type_is(t, "integer")) return number_schema(s, sch, true);
    if (type_is(t, "number")) return number_schema(s, sch, false);
    if (type_is(t, "boolean")) return cx_alt2(s->a, cx_str(s->a, "true"), cx_str(s->a, "false"));
    if (type_is(t, "null")) return cx_str(s->a, "null");
    if (type_is(t, "object")) return object_schema(s, sch);
    if (type_is(t, "array")) return array_schema(s, sch);
    if (t->type != JV_STR) return sfail(s, FL_EINVAL, "'type' must be a string or an array of strings");
    return sfail(s, FL_EINVAL, "unknown type '%.*s'", (int)t->len, t->text);
}

static cx_node_t *ref_schema(sctx_t *s, const jv_t *ref)
{
    if (ref->type != JV_STR) return sfail(s, FL_EINVAL, "'$ref' must be a string");
    if (ref->len < 1 || ref->text[0] != '#')
        return sfail(s, FL_EINVAL, "$ref '%.*s': only references inside the schema (#/...) are supported",
                     (int)ref->len, ref->text);
    /* A JSON pointer from the root: segments between '/', with ~1 for '/' and ~0 for '~'. */
    const jv_t *target = s->root;
    size_t i = 1;
    while (i < ref->len && target) {
        if (ref->text[i] != '/')
            return sfail(s, FL_EINVAL, "$ref '%.*s' is not a JSON pointer", (int)ref->len, ref->text);
        size_t j = ++i;
        while (j < ref->len && ref->text[j] != '/') j++;
        char seg[256];
        size_t n = 0;
        for (size_t k = i; k < j && n < sizeof seg - 1; k++) {
            if (ref->text[k] == '~' && k + 1 < j && (ref->text[k + 1] == '0' || ref->text[k + 1] == '1'))
                seg[n++] = ref->text[++k] == '0' ? '~' : '/';
            else
                seg[n++] = ref->text[k];
        }
        seg[n] = 0;
        if (target->type == JV_OBJ) {
            const jv_t *next = NULL;
            for (int m = 0; m < target->n && !next; m++)
                if (target->keys[m]->len == n && !memcmp(target->keys[m]->text, seg, n)) next = target->items[m];
            target = next;
        } else if (target->type == JV_ARR) {
            char *end;
            const long idx = strtol(seg, &end, 10);
            target = *seg && !*end && idx >= 0 && idx < target->n ? target->items[idx] : NULL;
        } else {
            target = NULL;
        }
        i = j;
    }
    if (!target) return sfail(s, FL_EINVAL, "$ref '%.*s' points to nothing", (int)ref->len, ref->text);
    for (int k = 0; k < s->n_memo; k++)
        if (s->memo[k].target == target) return s->memo[k].node;
    for (int k = 0; k < s->n_ref; k++)
        if (s->ref_stack[k] == target)
            return sfail(s, FL_EINVAL, "recursive $ref '%.*s' is not supported", (int)ref->len, ref->text);
    if (s->n_ref == SCHEMA_MAX_JSON_DEPTH)
        return sfail(s, FL_ERANGE, "$ref chain deeper than %d", SCHEMA_MAX_JSON_DEPTH);
    s->ref_stack[s->n_ref++] = target;
    const size_t old = spush(s, ref->text + 1, ref->len - 1);
    cx_node_t *x = sschema(s, target);
    spop(s, old);
    s->n_ref--;
    if (!x) return NULL;
    if (s->n_memo == s->memo_cap) {
        const int cap = s->memo_cap ? s->memo_cap * 2 : 16;
        ref_memo_t *m = realloc(s->memo, sizeof *m * (size_t)cap);
        if (!m) return soom(s);
        s->memo = m;
        s->memo_cap = cap;
    }
    s->memo[s->n_memo++] = (ref_memo_t){target, x};
    return x;
}

static cx_node_t *alternatives(sctx_t *s, const jv_t *list, const char *kw)
{
    if (list->type != JV_ARR || list->n == 0) return sfail(s, FL_EINVAL, "'%s' must be a non-empty array", kw);
    cx_node_t **alts = cx_alloc(s->a, sizeof *alts * (size_t)list->n);
    if (!alts) return soom(s);
    const size_t old = spush(s, kw, strlen(kw));
    for (int i = 0; i < list->n; i++) {
        char idx[16];
        const size_t o2 = spush(s, idx, (size_t)snprintf(idx, sizeof idx, "%d", i));
        if (!(alts[i] = sschema(s, list->items[i]))) return NULL;
        spop(s, o2);
    }
    spop(s, old);
    return cx_alt(s->a, alts, list->n);
}

static cx_node_t *sschema_inner(sctx_t *s, const jv_t *sch)
{
    if (sch->type == JV_BOOL) {
        if (sch->b) return json_any(s, CX_JSON_ANY_DEPTH, false);
        return sfail(s, FL_EINVAL, "the schema false matches nothing");
    }
    if (sch->type != JV_OBJ) return sfail(s, FL_EINVAL, "a schema must be an object or a boolean");
    /* Which keywords are there: unknown ones are refused, so nothing is silently not enforced. */
    bool kinds[KW_ARRAY + 1] = {0};
    int n_generic = 0;
    for (int i = 0; i < sch->n; i++) {
        const int k = keyword_kind(sch->keys[i]);
        if (k < 0)
            return sfail(s, FL_EINVAL, "keyword '%.*s' is not supported", (int)sch->keys[i]->len, sch->keys[i]->text);
        kinds[k] = true;
        n_generic += k != KW_ANNOTATION && !type_is(sch->keys[i], "nullable");
    }
    const jv_t *type = jget(sch, "type"), *nullable = jget(sch, "nullable");
    cx_node_t *x = NULL;
    const char *combiners[] = {"$ref", "anyOf", "oneOf", "allOf"};
    for (int c = 0; c < 4; c++) {
        const jv_t *v = jget(sch, combiners[c]);
        if (!v) continue;
        if (n_generic > 1)
            return sfail(s, FL_EINVAL, "'%s' together with other validation keywords is not supported", combiners[c]);
        if (c == 0) {
            x = ref_schema(s, v);
        } else if (c == 3) {
            if (v->type != JV_ARR || v->n != 1)
                return sfail(s, FL_EINVAL, "'allOf' with more than one schema is not supported");
            const size_t old = spush(s, "allOf/0", 7);
            x = sschema(s, v->items[0]);
            spop(s, old);
        } else {
            x = alternatives(s, v, combiners[c]); /* oneOf as anyOf: see constraint.h */
        }
        goto done;
    }
    if (type && type->type == JV_ARR) {
        for (int i = 0; i < type->n; i++)
            if (type->items[i]->type != JV_STR) return sfail(s, FL_EINVAL, "'type' must hold strings");
        if (type->n == 0) return sfail(s, FL_EINVAL, "'type' is an empty array");
    } else if (type && type->type != JV_STR) {
        return sfail(s, FL_EINVAL, "'type' must be a string or an array of strings");
    }
    const jv_t *en = jget(sch, "enum"), *cn = jget(sch, "const");
    if (en || cn) {
        if (en && cn) return sfail(s, FL_EINVAL, "'enum' together with 'const' is not supported");
        if (en && en->type != JV_ARR) return sfail(s, FL_EINVAL, "'enum' must be an array");
        jv_t one = {.type = JV_ARR, .n = 1, .items = (jv_t **)&cn};
        x = enum_schema(s, en ? en : &one, type);
        goto done;
    }
    if (!type) {
        /* The type the keywords imply, or any value. */
        static const char *const names[] = {
            [KW_STRING] = "string", [KW_NUMBER] = "number", [KW_OBJECT] = "object", [KW_ARRAY] = "array"};
        int implied = -1;
        for (int k = KW_STRING; k <= KW_ARRAY; k++) {
            if (!kinds[k]) continue;
            if (implied >= 0) return sfail(s, FL_EINVAL, "keywords of several types without 'type'");
            implied = k;
        }
        if (implied < 0) {
            x = json_any(s, CX_JSON_ANY_DEPTH, false);
        } else {
            jv_t t = {.type = JV_STR, .text = names[implied], .len = strlen(names[implied])};
            x = typed_schema(s, sch, &t);
        }
        goto done;
    }
    if (type->type == JV_STR) {
        x = typed_schema(s, sch, type);
    } else {
        cx_node_t **alts = cx_alloc(s->a, sizeof *alts * (size_t)type->n);
        if (!alts) return soom(s);
        for (int i = 0; i < type->n; i++)
            if (!(alts[i] = typed_schema(s, sch, type->items[i]))) return NULL;
        x = cx_alt(s->a, alts, type->n);
    }
done:
    if (!x) return s->failed ? NULL : soom(s);
    if (nullable && nullable->type == JV_BOOL && nullable->b) x = cx_alt2(s->a, x, cx_str(s->a, "null"));
    return x ? x : soom(s);
}

static cx_node_t *sschema(sctx_t *s, const jv_t *sch)
{
    if (s->failed) return NULL;
    if (++s->n_nodes > SCHEMA_MAX_NODES)
        return sfail(s, FL_ERANGE, "the schema expands to more than %d subschemas", SCHEMA_MAX_NODES);
    if (++s->depth > CX_MAX_DEPTH) return sfail(s, FL_ERANGE, "subschemas nested deeper than %d", CX_MAX_DEPTH);
    cx_node_t *x = sschema_inner(s, sch);
    s->depth--;
    return x;
}

cx_node_t *cx_parse_schema(cx_arena_t *a, const char *text, size_t len, fl_error_t *err)
{
    if (!text) {
        fl_fail(err, FL_EINVAL, "json schema: no schema text");
        return NULL;
    }
    jparse_t p = {.a = a, .s = text, .len = len, .err = err};
    jv_t *root = jvalue(&p, 0);
    if (!root) return NULL;
    jws(&p);
    if (p.pos < p.len) return jfail(&p, "text after the schema"), NULL;
    sctx_t s = {.a = a, .err = err, .root = root};
    cx_node_t *x = sschema(&s, root);
    free(s.memo);
    return x;
}
