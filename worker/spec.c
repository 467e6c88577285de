/* spec.c - draft trees, drafters, the acceptance walk and the step-cost table; see spec.h. */
#include "spec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

void spec_tree_init(spec_tree_t *t, int32_t root_token)
{
    t->n = 1;
    t->token[0] = root_token;
    t->parent[0] = -1;
    t->depth[0] = 0;
    t->mask[0] = 1;
    t->rank[0] = 0;
}

/* The child of node parent with this token, or -1. */
static int tree_child(const spec_tree_t *t, int parent, int32_t token)
{
    for (int k = parent + 1; k < t->n; k++)
        if (t->parent[k] == parent && t->token[k] == token) return k;
    return -1;
}

int spec_tree_add(spec_tree_t *t, int parent, int32_t token)
{
    const int existing = tree_child(t, parent, token);
    if (existing >= 0) return existing;
    if (t->n >= SPEC_MAX_NODES || parent < 0 || parent >= t->n) return -1;
    const int k = t->n++;
    t->token[k] = token;
    t->parent[k] = (int8_t)parent;
    t->depth[k] = (uint8_t)(t->depth[parent] + 1);
    t->mask[k] = t->mask[parent] | (1ull << k);
    t->rank[k] = 0;
    return k;
}

void spec_tree_keep(spec_tree_t *t, const bool *keep, int *map)
{
    int to[SPEC_MAX_NODES];
    const spec_tree_t old = *t;
    t->n = 1;
    to[0] = 0;
    for (int k = 1; k < old.n; k++) {
        to[k] = -1;
        const int p = to[old.parent[k]];
        if (!keep[k] || p < 0) continue;
        const int j = t->n++;
        t->token[j] = old.token[k];
        t->parent[j] = (int8_t)p;
        t->depth[j] = old.depth[k];
        t->mask[j] = t->mask[p] | (1ull << j);
        t->rank[j] = old.rank[k];
        to[k] = j;
    }
    if (map)
        for (int k = 0; k < old.n; k++) map[k] = to[k];
}

bool spec_tree_is_chain(const spec_tree_t *t)
{
    for (int k = 1; k < t->n; k++)
        if (t->parent[k] != k - 1) return false;
    return true;
}

int spec_ngram_draft_checked(const int32_t *tokens, int n, int max_len, int32_t *out, spec_check_fn check,
                             void *user)
{
    if (max_len <= 0) return 0;
    for (int g = SPEC_NGRAM_MAX; g >= SPEC_NGRAM_MIN; g--) {
        if (n < g + 1) continue;
        const int32_t *suffix = tokens + n - g;
        /* latest earlier occurrence: its continuation is the likeliest to repeat (lists, code) */
        for (int start = n - g - 1, tries = 0; start >= 0 && tries < SPEC_NGRAM_TRIES; start--) {
            if (tokens[start] != suffix[0] || memcmp(tokens + start, suffix, (size_t)g * sizeof *tokens)) continue;
            tries++;
            const int from = start + g;
            int len = n - from < max_len ? n - from : max_len;
            if (check && (len = check(user, tokens + from, len)) <= 0) continue;
            memcpy(out, tokens + from, (size_t)len * sizeof *out);
            return len;
        }
    }
    return 0;
}

int spec_ngram_draft(const int32_t *tokens, int n, int max_len, int32_t *out)
{
    return spec_ngram_draft_checked(tokens, n, max_len, out, NULL, NULL);
}

int spec_paths_parse(const char *text, spec_paths_t *out, char *why, int why_len)
{
    memset(out, 0, sizeof *out);
    const char *p = text;
    while (*p) {
        if (out->n >= SPEC_MAX_PATHS) {
            snprintf(why, (size_t)why_len, "more than %d paths", SPEC_MAX_PATHS);
            return FL_EINVAL;
        }
        const int i = out->n;
        for (;;) {
            char *end;
            const long r = strtol(p, &end, 10);
            if (end == p || r < 0 || r >= 16) {
                snprintf(why, (size_t)why_len, "path %d: expected a rank 0-15 at '%.20s'", i + 1, p);
                return FL_EINVAL;
            }
            if (out->len[i] >= SPEC_MAX_DEPTH) {
                snprintf(why, (size_t)why_len, "path %d is deeper than %d", i + 1, SPEC_MAX_DEPTH);
                return FL_EINVAL;
            }
            out->rank[i][out->len[i]++] = (uint8_t)r;
            if (r + 1 > out->max_rank) out->max_rank = (int)r + 1;
            p = end;
            if (*p != ',') break;
            p++;
        }
        if (*p && *p != ';') {
            snprintf(why, (size_t)why_len, "path %d: unexpected '%c'", i + 1, *p);
            return FL_EINVAL;
        }
        if (out->len[i] > out->max_depth) out->max_depth = out->len[i];
        /* every prefix must come first, so that a prefix of the list is a tree */
        bool has_parent = out->len[i] == 1;
        for (int j = 0; j < i && !has_parent; j++)
            has_parent = out->len[j] == out->len[i] - 1 && !memcmp(out->rank[j], out->rank[i], out->len[j]);
        if (!has_parent) {
            snprintf(why, (size_t)why_len, "path %d comes before its prefix", i + 1);
            return FL_EINVAL;
        }
        out->n++;
        if (*p == ';') p++;
    }
    if (out->n == 0) {
        snprintf(why, (size_t)why_len, "no paths");
        return FL_EINVAL;
    }
    return FL_OK;
}

const spec_paths_t *spec_paths_default(void)
{
    static spec_paths_t paths;
    static bool ready;
    if (!ready) {
        char why[128];
        /* Ordered by how often each path is taken (Medusa's sparse-tree construction): the best
         * chain first, then the runners-up near the root. */
        const int rc = spec_paths_parse("0;0,0;1;0,0,0;0,1;2;1,0;0,0,1;0,2;0,1,0;3;1,1;2,0;0,0,2;1,0,0;0,3", &paths,
                                        why, sizeof why);
        (void)rc;
        ready = true;
    }
    return &paths;
}

void spec_tree_medusa(spec_tree_t *t, int32_t root, const int32_t *cand, int n_heads, int top_k,
                      const spec_paths_t *paths, int max_nodes)
{
    spec_tree_init(t, root);
    if (max_nodes > SPEC_MAX_NODES) max_nodes = SPEC_MAX_NODES;
    for (int i = 0; i < paths->n && t->n < max_nodes; i++) {
        if (paths->len[i] > n_heads) continue;
        int node = 0;
        for (int d = 0; d < paths->len[i] && node >= 0; d++) {
            const int r = paths->rank[i][d];
            if (r >= top_k) {
                node = -1;
                break;
            }
            const int32_t tok = cand[d * top_k + r];
            if (tok < 0) { /* the head had no candidate of that rank (a constraint allowed fewer) */
                node = -1;
                break;
            }
            int child = tree_child(t, node, tok);
            if (child < 0) {
                if (d + 1 < paths->len[i]) { /* the prefix was skipped: so is the path */
                    node = -1;
                    break;
                }
                child = spec_tree_add(t, node, tok);
                if (child >= 0) t->rank[child] = (uint8_t)r;
            }
            node = child;
        }
    }
}

int spec_walk(const spec_tree_t *t, const int32_t *sampled, int32_t *out, int *nodes)
{
    int node = 0, n = 0;
    for (;;) {
        const int32_t y = sampled[node];
        out[n] = y;
        const int next = tree_child(t, node, y);
        if (next < 0) return n + 1;
        nodes[n++] = next;
        node = next;
    }
}

static int bucket_of(int tokens)
{
    int b = 0;
    while (b + 1 < SPEC_COST_BUCKETS && (1 << (b + 1)) <= tokens) b++;
    return b;
}

void spec_cost_observe(spec_cost_t *c, int tokens, double seconds)
{
    if (tokens <= 0 || !(seconds > 0)) return;
    const int b = bucket_of(tokens);
    /* recent steps weigh most (contexts grow), over about 20 of them: one step's time moves by 20% and
     * more on a busy machine, and the planner weighs differences of that size */
    const double w = c->s[b] > 0 ? 0.05 : 1.0;
    c->s[b] += w * (seconds - c->s[b]);
    c->n[b] += w * (tokens - c->n[b]);
}

/* Beyond what was measured: each extra token costs half of what the measured size's tokens cost on
 * average, an optimistic guess (small steps stream the weights once), so that the size gets tried
 * and measured; the table then corrects it. */
#define SPEC_COST_GUESS 0.5

double spec_cost_s(const spec_cost_t *c, int tokens)
{
    int lo = -1, hi = -1;
    double floor = 0; /* the dearest size measured at or below tokens: more tokens never cost less */
    for (int b = 0; b < SPEC_COST_BUCKETS; b++) {
        if (!(c->s[b] > 0)) continue;
        if (c->n[b] <= tokens) {
            lo = b;
            if (c->s[b] > floor) floor = c->s[b];
        } else if (hi < 0) {
            hi = b;
        }
    }
    double est;
    if (lo >= 0 && hi >= 0) {
        const double f = (tokens - c->n[lo]) / (c->n[hi] - c->n[lo]);
        est = c->s[lo] + f * (c->s[hi] - c->s[lo]);
    } else {
        const int m = lo >= 0 ? lo : hi;
        if (m < 0) return 0;
        const double per = c->s[m] / c->n[m];
        est = c->s[m] + (tokens - c->n[m]) * per * (tokens > c->n[m] ? SPEC_COST_GUESS : 1.0);
    }
    return est > floor ? est : floor;
}
