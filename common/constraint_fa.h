/* constraint_fa.h - the inside of common/constraint.c: the expression tree that regexes, choices and
 * JSON Schemas compile to, and the byte automaton built from it. Not a public interface.
 *
 * Pipeline: text -> cx_node_t tree (constraint_regex.c parses regexes, constraint_schema.c turns a
 * schema into a tree) -> Thompson NFA over bytes, built continuation-first so that shared tails are
 * built once -> DFA by subset construction over byte equivalence classes -> trimmed (states that
 * cannot reach acceptance become dead) -> minimised (Hopcroft).
 * Everything in a tree lives in one arena, freed at once. */
#ifndef FOLIO_CONSTRAINT_FA_H
#define FOLIO_CONSTRAINT_FA_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

#define CX_MAX_REPEAT      1000 /* largest m or n in {m,n}, maxLength, maxItems */
#define CX_MAX_DEPTH       200  /* nesting of groups in a regex, of nodes in a schema */
#define CX_MAX_NFA_STATES  2000000
#define CX_MAX_SUBSET_WORK 20000000LL /* NFA states visited and kept while determinising (~0.4 s) */
#define CX_JSON_ANY_DEPTH  5          /* arrays/objects inside a schema-less ("any") value */

/* ---- arena ---- */

typedef struct cx_arena cx_arena_t;
cx_arena_t *cx_arena_new(void);
void cx_arena_free(cx_arena_t **ap);
/* Zeroed memory that lives as long as the arena; NULL when out of memory. */
void *cx_alloc(cx_arena_t *a, size_t n);

/* Records the first failure of a parse in err as "<head>: <message><tail>" and sets *failed;
 * later failures are dropped (the first names the cause). */
void cx_vfail(fl_error_t *err, bool *failed, int code, const char *head, const char *tail, const char *fmt, va_list ap);

/* ---- expression tree ---- */

typedef enum {
    CX_EMPTY,   /* the empty string */
    CX_NOTHING, /* matches nothing (an empty class, an empty enum) */
    CX_BYTES,   /* a literal byte string */
    CX_CLASS,   /* one code point from a set, as UTF-8 */
    CX_CONCAT,
    CX_ALT,
    CX_REPEAT,  /* kid{min,max}, max -1: unbounded */
    CX_SEPLIST, /* kid (sep kid)*, between min and max items (max -1: unbounded); 0 items: empty */
    CX_PROPS,   /* JSON object members in order: keys[i] values[i], optional unless required[i], comma-separated */
} cx_kind_t;

typedef struct cx_range {
    uint32_t lo, hi; /* inclusive code points */
} cx_range_t;

typedef struct cx_node cx_node_t;
struct cx_node {
    cx_kind_t kind;
    const uint8_t *bytes; /* BYTES; also SEPLIST's separator */
    size_t len;
    const cx_range_t *ranges; /* CLASS: sorted, disjoint, not adjacent, no surrogates */
    int n_ranges;
    cx_node_t **kids; /* CONCAT, ALT; PROPS: the values */
    int n_kids;
    cx_node_t *kid; /* REPEAT, SEPLIST */
    int min, max;
    cx_node_t **keys; /* PROPS: `"key":` as BYTES */
    const bool *required;
};

cx_node_t *cx_empty(cx_arena_t *a);
cx_node_t *cx_nothing(cx_arena_t *a);
cx_node_t *cx_bytes(cx_arena_t *a, const void *bytes, size_t len); /* copies */
cx_node_t *cx_str(cx_arena_t *a, const char *s);
/* A class from ranges (any order, may overlap; surrogates are removed); negate: the complement
 * within U+0000..U+10FFFF. An empty result is CX_NOTHING. */
cx_node_t *cx_class(cx_arena_t *a, const cx_range_t *ranges, int n, bool negate);
cx_node_t *cx_concat(cx_arena_t *a, cx_node_t *const *kids, int n);
cx_node_t *cx_concat2(cx_arena_t *a, cx_node_t *x, cx_node_t *y);
cx_node_t *cx_concat3(cx_arena_t *a, cx_node_t *x, cx_node_t *y, cx_node_t *z);
cx_node_t *cx_alt(cx_arena_t *a, cx_node_t *const *kids, int n);
cx_node_t *cx_alt2(cx_arena_t *a, cx_node_t *x, cx_node_t *y);
cx_node_t *cx_repeat(cx_arena_t *a, cx_node_t *kid, int min, int max);
cx_node_t *cx_seplist(cx_arena_t *a, cx_node_t *kid, const char *sep, int min, int max);

/* Parses pattern[0..len) (the subset documented in constraint.h) into a tree in a. what names the
 * pattern in messages ("regex", "#/properties/id/pattern"). NULL with FL_EINVAL / FL_ERANGE. */
cx_node_t *cx_parse_regex(cx_arena_t *a, const char *pattern, size_t len, const char *what, fl_error_t *err);
/* Compiles a JSON Schema's text into a tree in a (subset documented in constraint.h). */
cx_node_t *cx_parse_schema(cx_arena_t *a, const char *text, size_t len, fl_error_t *err);
/* The tree for a choice among n byte strings. */
cx_node_t *cx_choice(cx_arena_t *a, const char *const *choices, int n, fl_error_t *err);

/* The UTF-8 byte-range sequences of code points lo..hi (no surrogates inside): calls emit with up
 * to 4 [lo, hi] byte pairs per sequence; stops and returns emit's nonzero value. */
typedef int (*cx_utf8_emit_fn)(void *ctx, const uint8_t *lo, const uint8_t *hi, int n);
int cx_utf8_sequences(uint32_t lo, uint32_t hi, cx_utf8_emit_fn emit, void *ctx);

/* ---- automaton ---- */

/* A DFA over byte classes: state s on byte b goes to next[s * n_classes + byte_class[b]], -1 being
 * dead. State 0 is the start. Every state can reach an accepting state. */
typedef struct cx_dfa {
    int32_t n_states;
    int n_classes;
    uint8_t byte_class[256];
    int32_t *next;
    bool *accept;
} cx_dfa_t;

/* Builds the DFA of tree x; more than max_states states (before or after minimising) is FL_ERANGE,
 * a language with no string at all FL_EINVAL. what names the constraint in messages. */
int cx_dfa_build(const cx_node_t *x, size_t max_states, const char *what, cx_dfa_t *out, fl_error_t *err);
void cx_dfa_free(cx_dfa_t *d);
size_t cx_dfa_bytes(const cx_dfa_t *d);
static inline int32_t cx_dfa_step(const cx_dfa_t *d, int32_t s, uint8_t b)
{
    return d->next[(size_t)s * (size_t)d->n_classes + d->byte_class[b]];
}

#endif
