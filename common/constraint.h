/* constraint.h - constrained output: a choice among strings, a regular expression (a documented
 * subset) or a JSON Schema (a documented subset), compiled once into a byte-level automaton and
 * then into token transitions over a vocabulary, so that each decode step reads a precomputed
 * allowed-token bit set for the sequence's current state.
 *
 * A compiled constraint is immutable in what it accepts; its per-state token masks are computed on
 * first use and kept (so the cost after warm-up is independent of the vocabulary's size). Calls
 * on one constraint must not run concurrently (the worker's scheduler thread owns them). States are
 * small integers; FL_CSTATE_DEAD is the state after a rejected token. */
#ifndef FOLIO_CONSTRAINT_H
#define FOLIO_CONSTRAINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "tokenizer.h"

#define FL_CSTATE_DEAD (-1)

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
 * limits fail with a clear message (FL_EINVAL, FL_ERANGE), before any decoding. limits may be NULL. */
fl_constraint_t *fl_constraint_compile(fl_constraint_kind_t kind, const char *text, const char *const *choices,
                                       int n_choices, const tok_t *tok, const fl_constraint_limits_t *limits,
                                       fl_error_t *err);
void fl_constraint_free(fl_constraint_t **cp);

int32_t fl_constraint_start(const fl_constraint_t *c);
/* The state after token id from state (FL_CSTATE_DEAD when the token is not allowed there). The
 * end-of-generation tokens are allowed exactly in accepting states and lead to themselves. */
int32_t fl_constraint_next(fl_constraint_t *c, int32_t state, int32_t id);
/* The allowed tokens in state as a bit set of ceil(n_vocab / 64) words (bit id % 64 of word
 * id / 64), valid until the constraint is freed. */
const uint64_t *fl_constraint_mask(fl_constraint_t *c, int32_t state);
/* The output so far is a complete match (end-of-generation allowed). */
bool fl_constraint_accepting(const fl_constraint_t *c, int32_t state);
/* Accepting and nothing can follow: the sequence should end here. */
bool fl_constraint_finished(fl_constraint_t *c, int32_t state);
/* Tokens the constraint fixes outright from state (the only allowed token, then the only one after
 * it, ...), at most max, written to out; the count. Used as free speculative drafts. */
int fl_constraint_forced(fl_constraint_t *c, int32_t state, int32_t *out, int max);
/* Bytes held (automaton and the masks computed so far), for limits and reports. */
size_t fl_constraint_bytes(const fl_constraint_t *c);

#endif
