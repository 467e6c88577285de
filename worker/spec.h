/* spec.h - speculative decoding's pieces that know nothing of the scheduler: draft trees, the
 * n-gram drafter, Medusa trees from the heads' candidates, the acceptance walk, and the measured
 * cost of steps by size that decides how much to draft.
 *
 * A draft tree holds one sequence's pending token as its root (node 0, not a draft: its K/V are not
 * computed yet) and draft tokens below it, in topological order (a node's parent comes before it).
 * The verify step stores node k's K/V at position start + k and ropes it at start + depth; the
 * attention mask of a node is its ancestors and itself (bit k for node k). Its logits row then
 * scores the token after it. Acceptance samples every row as plain decoding would (the draw of the
 * completion's token index, spec_walk) and follows the child whose token the sample is: the tokens
 * emitted are the samples along the walk, so the output is the model's, token for token where the
 * logits are bit-exact, and in distribution otherwise. */
#ifndef FOLIO_SPEC_H
#define FOLIO_SPEC_H

#include <stdbool.h>
#include <stdint.h>

#define SPEC_MAX_NODES 17 /* the root and SCHED_MAX_DRAFT drafts */
#define SPEC_MAX_PATHS 64
#define SPEC_MAX_DEPTH 8

typedef struct spec_tree {
    int n;                            /* nodes, the root included */
    int32_t token[SPEC_MAX_NODES];
    int8_t parent[SPEC_MAX_NODES];    /* -1 for the root */
    uint8_t depth[SPEC_MAX_NODES];    /* 0 for the root */
    uint64_t mask[SPEC_MAX_NODES];    /* ancestors and itself */
    uint8_t rank[SPEC_MAX_NODES];     /* Medusa: the candidate's rank in its head's list (0: best) */
} spec_tree_t;

void spec_tree_init(spec_tree_t *t, int32_t root_token);
/* Adds token under node parent; returns its index, the existing child with that token, or -1 when
 * the tree is full. */
int spec_tree_add(spec_tree_t *t, int parent, int32_t token);
/* Whether every node's parent is the node before it (a chain: causal attention suffices). */
bool spec_tree_is_chain(const spec_tree_t *t);
/* Keeps the first n nodes (a prefix of a topological order is a tree). */
static inline void spec_tree_truncate(spec_tree_t *t, int n) { if (n < t->n) t->n = n < 1 ? 1 : n; }
/* Keeps the root and every node k with keep[k] whose ancestors are all kept, in their order (a
 * constraint pruning drafts it rejects); map[k] (when not NULL) receives node k's new index, or -1. */
void spec_tree_keep(spec_tree_t *t, const bool *keep, int *map);

/* Prompt lookup: the longest suffix of tokens[0, n) of between SPEC_NGRAM_MIN and SPEC_NGRAM_MAX
 * tokens that occurred before, at its latest occurrence; writes up to max_len tokens that followed
 * it to out and returns their count (0: no match). */
#define SPEC_NGRAM_MIN 2
#define SPEC_NGRAM_MAX 4
int spec_ngram_draft(const int32_t *tokens, int n, int max_len, int32_t *out);
/* A check of draft tokens (a constraint's automaton walking them): how many leading tokens of
 * draft[0, n) it allows. */
typedef int (*spec_check_fn)(void *user, const int32_t *draft, int n);
/* spec_ngram_draft that proposes only what check allows: an occurrence whose continuation it
 * rejects at once is passed over for the next earlier one (at most SPEC_NGRAM_TRIES a suffix
 * length), and the continuation is cut before the first token it rejects. (One-token suffixes were
 * tried too: after a constraint's fixed text they guessed a label or value right too rarely to pay
 * for verifying it, bench/README.md.) check NULL: spec_ngram_draft. */
#define SPEC_NGRAM_TRIES 64
int spec_ngram_draft_checked(const int32_t *tokens, int n, int max_len, int32_t *out, spec_check_fn check,
                             void *user);

/* Medusa tree shapes: a list of paths, each a sequence of candidate ranks (path {0, 1}: head 0's
 * best token, then head 1's second best below it), every path's prefix listed before it. */
typedef struct spec_paths {
    int n;
    uint8_t len[SPEC_MAX_PATHS];
    uint8_t rank[SPEC_MAX_PATHS][SPEC_MAX_DEPTH];
    int max_rank;                     /* the largest rank + 1: the top-k the heads must give */
    int max_depth;
} spec_paths_t;

/* Parses "0;1;0,0;0,1;..." (paths separated by ';', ranks by ','); FL_EINVAL with a message. */
int spec_paths_parse(const char *text, spec_paths_t *out, char *why, int why_len);
/* The default tree: 16 draft nodes over 3 heads (the most likely paths of Medusa's sparse trees,
 * trimmed to what a CPU verifies cheaply). */
const spec_paths_t *spec_paths_default(void);
/* The tree of paths over the candidates cand[head][top_k] (medusa_propose's layout for one row),
 * below root; paths deeper than n_heads, ranks beyond top_k and candidates < 0 (none) are skipped;
 * stops at max_nodes. */
void spec_tree_medusa(spec_tree_t *t, int32_t root, const int32_t *cand, int n_heads, int top_k,
                      const spec_paths_t *paths, int max_nodes);

/* The acceptance walk: sampled[k] is the token drawn from node k's row. Follows the child whose
 * token is the sample from the root down; writes the emitted tokens (the samples along the walk,
 * the last one the model's own next token) to out and the nodes taken (after the root) to nodes,
 * and returns the number emitted (>= 1; accepted drafts = that - 1). */
int spec_walk(const spec_tree_t *t, const int32_t *sampled, int32_t *out, int *nodes);

/* Measured seconds of decode steps (no prompt chunk) by their token count, in power-of-two buckets,
 * averaged with decay. spec_cost_s estimates a size: between measured buckets by interpolation,
 * beyond them from the nearest measured one, so that unmeasured sizes get tried. */
#define SPEC_COST_BUCKETS 12
typedef struct spec_cost {
    double s[SPEC_COST_BUCKETS];      /* 0: not measured */
    double n[SPEC_COST_BUCKETS];      /* mean token count of the bucket's steps */
} spec_cost_t;

void spec_cost_observe(spec_cost_t *c, int tokens, double seconds);
double spec_cost_s(const spec_cost_t *c, int tokens);

#endif
