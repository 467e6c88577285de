/* fuzz_constraint.h - what fuzz_regex.c and fuzz_json_schema.c share: compiling untrusted text into
 * a constraint and checking what came out.
 *
 * Input: one flag byte (bit 0: compile against a small tokenizer and check its masks and forced
 * tokens), then the constraint's text. Invariants: no crash, leak, over-read or runaway time (small
 * limits); a failure has a code and a message; a compiled automaton has a start state, every state
 * reaches acceptance, and random walks to acceptance give strings the caller's check accepts; a
 * token is in a state's mask exactly when fl_constraint_next allows it; forced tokens are allowed
 * in sequence. */
#ifndef FOLIO_FUZZ_CONSTRAINT_H
#define FOLIO_FUZZ_CONSTRAINT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "constraint.h"
#include "mkmodel.h"
#include "tokenizer.h"

static tok_t *g_tok;

static void fuzz_tok_init(void)
{
    char **tokens, **merges;
    int n_merges;
    const int vocab = 400;
    if (mkmodel_vocab(vocab, &tokens, &merges, &n_merges, NULL)) abort();
    int32_t types[400];
    for (int i = 0; i < vocab; i++) types[i] = i < MKMODEL_N_SPECIAL ? TOK_TYPE_CONTROL : TOK_TYPE_NORMAL;
    tok_desc_t d = {.n_vocab = vocab,
                    .tokens = (const char *const *)tokens,
                    .token_types = types,
                    .n_merges = n_merges,
                    .merges = (const char *const *)merges,
                    .pre = "smollm",
                    .bos_id = 1,
                    .eos_id = 2,
                    .unk_id = -1,
                    .pad_id = -1};
    g_tok = tok_new(&d, NULL);
    mkmodel_vocab_free(tokens, vocab, merges, n_merges);
    if (!g_tok) abort();
}

/* Compiles, checks, and hands each walked string to check (which aborts on a bad one). */
static void fuzz_constraint(fl_constraint_kind_t kind, const uint8_t *data, size_t size,
                            void (*check)(const uint8_t *s, size_t n))
{
    if (!g_tok) fuzz_tok_init();
    if (size < 1 || size > 4096) return;
    const bool with_tok = data[0] & 1;
    char *text = malloc(size);
    memcpy(text, data + 1, size - 1);
    text[size - 1] = 0;
    fl_constraint_limits_t lim = {.max_dfa_states = 400};
    fl_error_t err = {0};
    fl_constraint_t *c = fl_constraint_compile(kind, text, NULL, 0, with_tok ? g_tok : NULL, &lim, &err);
    free(text);
    if (!c) {
        if (err.code >= 0 || !err.msg[0]) abort();
        return;
    }
    const int n = fl_constraint_n_states(c);
    if (n < 1 || fl_constraint_start(c) != 0) abort();
    /* The byte transitions, read once (the walks and the search below use this table). */
    int *next = malloc(sizeof *next * (size_t)n * 256);
    for (int s = 0; s < n; s++)
        for (int b = 0; b < 256; b++) {
            const uint8_t byte = (uint8_t)b;
            const int t = fl_constraint_next_bytes(c, s, &byte, 1);
            if (t >= n) abort();
            next[s * 256 + b] = t;
        }
    /* Bytes to acceptance per state: a breadth-first search back from the accepting states over
     * the reversed transitions (a relaxation would revisit every transition per round). */
    int *dist = malloc(sizeof *dist * (size_t)n), *queue = malloc(sizeof *queue * (size_t)n);
    int *edge_from = malloc(sizeof *edge_from * (size_t)n * 256), *edge_next = malloc(sizeof *edge_next * (size_t)n * 256);
    int *head = malloc(sizeof *head * (size_t)n);
    int n_edges = 0, q_head = 0, q_tail = 0;
    for (int s = 0; s < n; s++) head[s] = -1;
    for (int s = 0; s < n * 256; s++) {
        const int t = next[s];
        if (t >= 0) edge_from[n_edges] = s / 256, edge_next[n_edges] = head[t], head[t] = n_edges++;
    }
    for (int s = 0; s < n; s++) {
        dist[s] = fl_constraint_accepting(c, s) ? 0 : -1;
        if (!dist[s]) queue[q_tail++] = s;
    }
    while (q_head < q_tail) {
        const int t = queue[q_head++];
        for (int e = head[t]; e >= 0; e = edge_next[e])
            if (dist[edge_from[e]] < 0) dist[edge_from[e]] = dist[t] + 1, queue[q_tail++] = edge_from[e];
    }
    free(queue), free(edge_from), free(edge_next), free(head);
    for (int s = 0; s < n; s++)
        if (dist[s] < 0) abort(); /* trimmed: every state can finish */
    /* Walks: random live bytes, then the shortest way home. */
    uint32_t rng = (uint32_t)size * 2654435761u;
    uint8_t out[4096];
    for (int w = 0; w < 4; w++) {
        int s = 0;
        size_t len = 0;
        while (len < sizeof out) {
            if (fl_constraint_accepting(c, s) && (rng = rng * 1103515245u + 12345u) % 4 == 0) break;
            if (fl_constraint_finished(c, s)) break;
            uint8_t live[256];
            int nl = 0;
            for (int b = 0; b < 256; b++) {
                const int t = next[s * 256 + b];
                if (t >= 0 && (len < 64 || dist[t] < dist[s])) live[nl++] = (uint8_t)b;
            }
            if (nl == 0) {
                if (!fl_constraint_accepting(c, s)) abort();
                break;
            }
            rng = rng * 1103515245u + 12345u;
            out[len] = live[(rng >> 8) % (uint32_t)nl];
            s = next[s * 256 + out[len]];
            len++;
        }
        if (len == sizeof out) continue;
        if (!fl_constraint_match(c, out, len)) abort();
        check(out, len);
    }
    free(dist);
    free(next);
    if (with_tok) {
        int32_t f[32];
        for (int s = 0; s < n && s < 8; s++) {
            const uint64_t *m = fl_constraint_mask(c, s);
            if (!m) abort();
            for (int32_t id = 0; id < tok_n_vocab(g_tok); id++)
                if (((m[id >> 6] >> (id & 63)) & 1) != (fl_constraint_next(c, s, id) >= 0)) abort();
            const int k = fl_constraint_forced(c, s, f, 32);
            int t = s;
            for (int i = 0; i < k; i++)
                if ((t = fl_constraint_next(c, t, f[i])) < 0) abort();
        }
    }
    fl_constraint_free(&c);
}

#endif
