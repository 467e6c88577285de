/* constraint.h - constrained output: a choice among strings, a regular expression (a documented
 * subset) or a JSON Schema (a documented subset), compiled once into a byte-level automaton and
 * then into token transitions over a vocabulary, so that each decode step reads a precomputed
 * allowed-token bit set for the sequence's current state.
 *
 * A compiled constraint is immutable in what it accepts; its per-state token masks are computed on
 * first use and kept (so the cost after warm-up is independent of the vocabulary's size). Calls
 * on one constraint must not run concurrently (the worker's scheduler thread owns them). States are
 * small integers; FL_CSTATE_DEAD is the state after a rejected token.
 *
 * How it works (common/constraint_*.c): text -> expression tree -> Thompson NFA over UTF-8 bytes ->
 * DFA by subset construction over byte equivalence classes -> trimmed (every live state can still
 * reach acceptance, so a sequence never walks into a state it cannot finish from) -> minimised.
 * The vocabulary is indexed once as a byte trie; a state's mask is one pass over that trie, pruned
 * where the automaton dies. Measured on SmolLM2-135M's vocabulary (49,152 tokens), one core of the
 * 2-core development machine, Release (test_constraint prints them): indexing the vocabulary 16-19
 * ms (once per cache, or per fl_constraint_compile); compiling, that index aside, a date regex (11
 * states) 0.02 ms, a choice of 5 labels (26 states) 0.07 ms, a 6-property record schema (396 states)
 * 2.5 ms, {"type":"object"} (1,735 states) 9 ms, {} (3,483 states) 19 ms; a state's first mask
 * 0.65-0.75 ms inside a free JSON string (most of the trie survives), 1-10 us where only digits or
 * punctuation may follow, 0.025 ms averaged over all states of the schemas; after that a pointer
 * read. Masks take n_vocab / 8 bytes per state (6 KiB here: 2.4 MiB for all of the record schema's).
 * fl_constraint_next walks the token's bytes through the automaton (a few ns per byte) instead of
 * caching an end state per allowed token per state, which would cost up to ~200 KiB per state.
 *
 * Regular expressions (FL_CONSTRAINT_REGEX, and JSON Schema "pattern"). The whole output must match:
 * the pattern is anchored at both ends; a leading ^ and a trailing $ are accepted and ignored.
 *   literals        any UTF-8 character; \ before punctuation makes it literal (\. \* \( \\ \{ ...)
 *   escapes         \n \t \r \f \v \0, \xHH (U+00HH), \uHHHH and \u{H...} (Unicode scalar values)
 *   classes         \d [0-9], \w [0-9A-Za-z_], \s [\t\n\v\f\r ] (ASCII), \D \W \S their complements;
 *                   [a-z0-9_], [^...] (complement over all code points), escapes inside, ']' first
 *                   or '-' first/last are literal; '.' is any code point but \n
 *   grouping        ( ), (?: ), named (?<name> ) and (?P<name> ) (the name is ignored); alternation |
 *   quantifiers     ? * + {m} {m,} {m,n} {,n}; m and n at most 1000 (FL_ERANGE above)
 * Matching is over Unicode code points encoded as UTF-8 (surrogates excluded): a class with
 * non-ASCII ranges becomes the byte sequences of its code points. Refused with FL_EINVAL, naming the
 * feature and its byte offset: backreferences (\1, \k<>, (?P=)), lookahead/lookbehind, lazy (*?)
 * and possessive (*+) quantifiers, atomic groups, inline flags ((?i)...), \b \B \A \z \Z \G \p{}
 * \Q..\E \c, octal escapes, POSIX [:classes:], ^ or $ anywhere else, a quantifier on nothing or on
 * a quantifier, and a '{' that does not start a quantifier (write \{; a lone '}' is literal).
 *
 * Choices (FL_CONSTRAINT_CHOICE): exactly one of the strings, byte for byte (any bytes).
 *
 * JSON Schema (FL_CONSTRAINT_JSON_SCHEMA). The output is one JSON value valid under the schema,
 * written compactly: no whitespace outside strings at all ({"a":1,"b":[true,null]}), so that
 * punctuation and keys are fixed runs that fl_constraint_forced can hand out as drafts. Supported:
 *   type            "string" "integer" "number" "boolean" "null" "object" "array", or a list of them;
 *                   without "type", the type the other keywords imply, or any value
 *   enum, const     any JSON values, written in canonical compact form (numbers as written in the
 *                   schema; strings with the escapes JSON requires only); values not of "type" dropped
 *   object          "properties" in the order given: the "required" ones always, the others
 *                   optional (each may be absent); no other members are ever generated
 *                   (additionalProperties false implied, whatever the schema says). Without
 *                   "properties": "additionalProperties": a schema (any keys, values under it, with
 *                   minProperties/maxProperties), false ({} only), or absent/true (any object)
 *   string          minLength/maxLength (code points, at most 1000; each counted character costs
 *                   ~23 automaton states, so maxLength ~850 meets the default limit), or "pattern" (the regex subset
 *                   above over the decoded contents, matched whole; its characters that JSON must
 *                   escape are written with their short escape or \u00xx, all others raw), or
 *                   "format": date, time, date-time (RFC 3339 syntax; days 01-31 in any month) or
 *                   uuid. Free contents may use any JSON escape except \u0000 and lone surrogates.
 *   integer         minimum/maximum and exclusiveMinimum/exclusiveMaximum (numbers, or draft-4
 *                   booleans), enforced exactly by digit-range alternations (bounds within +-9.2e18)
 *   number          minimum/maximum when they are whole numbers: enforced exactly, and then no
 *                   exponent is generated; without bounds the full JSON number syntax
 *   array           "items" (absent: any values), minItems/maxItems (at most 1000), "prefixItems"
 *                   (a tuple, then more "items" only when "items" is given), uniqueItems false
 *   combinators     anyOf and oneOf as alternation (oneOf does not exclude a value that matches
 *                   several branches: keep the branches disjoint), allOf with one schema, $ref to a
 *                   JSON pointer in the same document (#/$defs/x, #/definitions/x; recursion refused),
 *                   OpenAPI "nullable": true
 *   annotations     $schema $id $comment title description default examples deprecated readOnly
 *                   writeOnly $defs definitions contentMediaType contentEncoding: ignored
 * "Any value" (the empty schema {}, true, an object or array without a structure) is any JSON
 * value with at most 5 levels of nested arrays/objects. Every other keyword is refused with
 * FL_EINVAL naming it and its place (#/properties/x), so nothing is silently left unenforced:
 * not, if/then/else, patternProperties, propertyNames, dependent*, contains, multipleOf,
 * uniqueItems true, unevaluated*, external or recursive $ref, several allOf schemas, length
 * bounds together with pattern or format, fractional or exclusive bounds on "number".
 *
 * Tokens: a token is allowed in a state when its bytes (tok_token_bytes without specials) walk the
 * automaton without dying; tokens with no bytes (control tokens) never are, except the
 * end-of-generation tokens (tok_is_eog), allowed exactly in accepting states. Tokens may end inside
 * a UTF-8 character: the automaton is over bytes. Every live state can be finished with byte-level
 * tokens, which byte-level BPE vocabularies always have. */
#ifndef FOLIO_CONSTRAINT_H
#define FOLIO_CONSTRAINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "tokenizer.h"

#define FL_CSTATE_DEAD (-1)

/* Defaults for fl_constraint_limits_t: states of the minimised automaton, and bytes for the
 * automaton plus a mask for every one of its states (checked at compile time, so lazily computed
 * masks can never pass it): 128 MiB holds ~21,000 masks of a 49,152-token vocabulary. Fixed bounds
 * besides (constraint_fa.h): 2,000,000 NFA states, 4x max states and 50 million NFA-state visits
 * while determinising, so the worst pattern fails with FL_ERANGE within about half a second. */
#define FL_CONSTRAINT_DEFAULT_MAX_STATES 20000
#define FL_CONSTRAINT_DEFAULT_MAX_BYTES  ((size_t)128 << 20)

typedef enum {
    FL_CONSTRAINT_CHOICE = 1, /* one of n strings, exactly */
    FL_CONSTRAINT_REGEX,      /* the whole output matches (anchored at both ends) */
    FL_CONSTRAINT_JSON_SCHEMA /* the output is one JSON value valid under the schema */
} fl_constraint_kind_t;

typedef struct fl_constraint_limits {
    size_t max_dfa_states; /* 0: a default; beyond it compiling fails with FL_ERANGE */
    size_t max_bytes;      /* memory for automaton plus masks; 0: a default */
} fl_constraint_limits_t;

typedef struct fl_constraint fl_constraint_t;

/* Compiles a constraint against the vocabulary of tok. For CHOICE, choices[0..n_choices); otherwise
 * text (the pattern, or the schema's JSON). Invalid or unsupported input and constraints over the
 * limits fail with a clear message (FL_EINVAL, FL_ERANGE), before any decoding. limits may be NULL.
 * tok may be NULL: the automaton alone (to validate a constraint, or fl_constraint_match output),
 * with no token layer (fl_constraint_mask NULL, fl_constraint_next and _forced find nothing). tok is
 * borrowed and must outlive the constraint. Each call indexes the vocabulary anew (16-19 ms for 49k
 * tokens): servers compile through a cache (below), which indexes it once. */
fl_constraint_t *fl_constraint_compile(fl_constraint_kind_t kind, const char *text, const char *const *choices,
                                       int n_choices, const tok_t *tok, const fl_constraint_limits_t *limits,
                                       fl_error_t *err);
/* Drops one reference (a constraint from fl_constraint_compile or fl_constraint_cache_get holds
 * one; fl_constraint_ref adds one) and frees it with the last. NULL-safe; NULLs *cp. */
void fl_constraint_free(fl_constraint_t **cp);
fl_constraint_t *fl_constraint_ref(fl_constraint_t *c);

int32_t fl_constraint_start(const fl_constraint_t *c);
/* The state after token id from state (FL_CSTATE_DEAD when the token is not allowed there). The
 * end-of-generation tokens are allowed exactly in accepting states and lead to themselves. */
int32_t fl_constraint_next(fl_constraint_t *c, int32_t state, int32_t id);
/* The allowed tokens in state as a bit set of ceil(n_vocab / 64) words (bit id % 64 of word
 * id / 64), valid until the constraint is freed. FL_CSTATE_DEAD (or any invalid state) gives an
 * all-zero set. NULL only without a tokenizer or when out of memory. */
const uint64_t *fl_constraint_mask(fl_constraint_t *c, int32_t state);
/* The same set as token ids in increasing order, written to out when there are at most max of them
 * (a vocabulary projection restricted to them is then cheaper than a full one): their count (0 in a
 * dead state); -1 when more, or without a token layer. A pass over the mask (n_vocab / 64 words). */
int fl_constraint_allowed_ids(fl_constraint_t *c, int32_t state, int32_t *out, int max);
/* The output so far is a complete match (end-of-generation allowed). */
bool fl_constraint_accepting(const fl_constraint_t *c, int32_t state);
/* Accepting and nothing can follow: the sequence should end here. */
bool fl_constraint_finished(fl_constraint_t *c, int32_t state);
/* Tokens the constraint fixes outright from state, at most max, written to out; the count. The
 * automaton's fixed byte run from state (states with one live byte that do not accept: a JSON key,
 * punctuation, the rest of the only choice left; up to 256 bytes) is tokenized as plain text and
 * the tokens lying wholly inside it are returned: a likely tokenization (for free speculative
 * drafts the model verifies), not the only allowed one; each is allowed in sequence. Computed once
 * per state and kept. */
int fl_constraint_forced(fl_constraint_t *c, int32_t state, int32_t *out, int max);
/* Bytes held (automaton and the masks computed so far), for limits and reports; the vocabulary
 * index, shared by a cache's constraints, is not counted. */
size_t fl_constraint_bytes(const fl_constraint_t *c);

/* The automaton at byte level: the state after bytes[0..len) from state (FL_CSTATE_DEAD if they
 * leave the language), whether a whole text matches, and the number of states. */
int32_t fl_constraint_next_bytes(const fl_constraint_t *c, int32_t state, const void *bytes, size_t len);
bool fl_constraint_match(const fl_constraint_t *c, const void *bytes, size_t len);
int32_t fl_constraint_n_states(const fl_constraint_t *c);

/* A cache of compiled constraints for one tokenizer, keyed by kind and text (or the choices, in
 * order), least recently used out past max_entries (0: 64) or when the entries' bytes (growing as
 * masks are computed) pass max_bytes (0: no byte bound). fl_constraint_cache_get returns a new
 * reference (release it with fl_constraint_free); eviction only drops the cache's own reference,
 * so a constraint in use stays valid. A hit keeps the masks computed by earlier requests. The cache
 * indexes the vocabulary once and its constraints share that index. Failed compiles are not
 * cached. One thread owns a cache and the constraints it hands out (their masks fill in lazily);
 * tok must outlive the cache and its constraints. limits (may be NULL) apply to every compile. */
typedef struct fl_constraint_cache fl_constraint_cache_t;
fl_constraint_cache_t *fl_constraint_cache_new(const tok_t *tok, int max_entries, size_t max_bytes,
                                               const fl_constraint_limits_t *limits, fl_error_t *err);
void fl_constraint_cache_destroy(fl_constraint_cache_t **kp);
fl_constraint_t *fl_constraint_cache_get(fl_constraint_cache_t *k, fl_constraint_kind_t kind, const char *text,
                                         const char *const *choices, int n_choices, fl_error_t *err);
int fl_constraint_cache_size(const fl_constraint_cache_t *k);

#endif
