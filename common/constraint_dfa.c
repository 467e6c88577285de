/* constraint_dfa.c - from an expression tree to a minimal byte DFA (see constraint_fa.h).
 *
 * The NFA is built continuation-first: building a node takes the state that follows it and returns
 * its entry, so a tail shared by several branches (the members after an optional JSON property, the
 * loop of a separated list) is built once. Its byte ranges split the 256 bytes into equivalence
 * classes, and subset construction runs over classes, not bytes, which keeps the transition table
 * n_states x n_classes (tens of classes for JSON, not 256). Sets hold only the states that consume a
 * byte or accept, so two subsets that differ only in epsilon states are one DFA state. */
#include "constraint_fa.h"

#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

/* ---- NFA ---- */

enum { NS_RANGE, NS_SPLIT, NS_MATCH, NS_NONE };

typedef struct {
    uint8_t type, lo, hi;
    int32_t out1, out2;
} nstate_t;

typedef struct {
    nstate_t *s;
    int32_t n, cap;
    int err; /* 0, FL_ENOMEM or FL_ERANGE */
} nfa_t;

static int32_t nfa_add(nfa_t *n, uint8_t type, uint8_t lo, uint8_t hi, int32_t out1, int32_t out2)
{
    if (n->err || out1 < 0 || (type == NS_SPLIT && out2 < 0)) return -1;
    if (n->n >= CX_MAX_NFA_STATES) {
        n->err = FL_ERANGE;
        return -1;
    }
    if (n->n == n->cap) {
        const int32_t cap = n->cap ? n->cap * 2 : 1024;
        nstate_t *s = realloc(n->s, sizeof *s * (size_t)cap);
        if (!s) {
            n->err = FL_ENOMEM;
            return -1;
        }
        n->s = s;
        n->cap = cap;
    }
    n->s[n->n] = (nstate_t){type, lo, hi, out1, out2};
    return n->n++;
}

static int32_t add_range(nfa_t *n, uint8_t lo, uint8_t hi, int32_t out)
{
    return nfa_add(n, NS_RANGE, lo, hi, out, 0);
}
static int32_t add_split(nfa_t *n, int32_t a, int32_t b)
{
    return nfa_add(n, NS_SPLIT, 0, 0, a, b);
}

static int32_t add_bytes(nfa_t *n, const uint8_t *b, size_t len, int32_t next)
{
    for (size_t i = len; i-- > 0;) next = add_range(n, b[i], b[i], next);
    return next;
}

typedef struct {
    nfa_t *n;
    int32_t next, entry; /* entry: the alternation of the sequences so far, -1 before the first */
} class_ctx_t;

static int class_emit(void *ctx, const uint8_t *lo, const uint8_t *hi, int len)
{
    class_ctx_t *c = ctx;
    int32_t s = c->next;
    for (int i = len; i-- > 0;) s = add_range(c->n, lo[i], hi[i], s);
    c->entry = c->entry < 0 ? s : add_split(c->n, s, c->entry);
    return c->entry < 0;
}

static int32_t build(nfa_t *n, const cx_node_t *x, int32_t next);

static int32_t build_class(nfa_t *n, const cx_node_t *x, int32_t next)
{
    class_ctx_t c = {n, next, -1};
    for (int i = 0; i < x->n_ranges && !n->err; i++)
        if (cx_utf8_sequences(x->ranges[i].lo, x->ranges[i].hi, class_emit, &c)) return -1;
    return c.entry;
}

/* Loops are built around one copy of the body: x+ enters the body, whose exit may go round again;
 * x* is the same behind a skip. Copying the body for the first pass (x x*) would give the subset
 * construction two sets for one position, at every level of nesting. */
static int32_t build_repeat(nfa_t *n, const cx_node_t *x, int32_t next)
{
    if (x->max == 0) return next;
    int32_t tail = next;
    int copies = x->min;
    if (x->max < 0) {
        const int32_t loop = add_split(n, next, next); /* out1 patched to the body below */
        const int32_t body = build(n, x->kid, loop);
        if (loop < 0 || body < 0) return -1;
        n->s[loop].out1 = body;
        if (copies == 0) return loop;
        tail = body; /* the last of the min copies is the loop's body */
        copies--;
    } else {
        for (int i = 0; i < x->max - x->min; i++) tail = add_split(n, build(n, x->kid, tail), next);
    }
    for (int i = 0; i < copies; i++) tail = build(n, x->kid, tail);
    return tail;
}

static int32_t build_seplist(nfa_t *n, const cx_node_t *x, int32_t next)
{
    if (x->max == 0) return next;
    const int m = x->min < 1 ? 1 : x->min;
    int32_t first;
    if (x->max < 0) {
        /* item (sep item)*: the loop's item is also the first one. */
        const int32_t loop = add_split(n, next, next);
        const int32_t item = build(n, x->kid, loop);
        const int32_t sep = add_bytes(n, x->bytes, x->len, item);
        if (loop < 0 || sep < 0) return -1;
        n->s[loop].out1 = sep;
        first = item;
        for (int i = 1; i < m; i++) first = build(n, x->kid, add_bytes(n, x->bytes, x->len, first));
    } else {
        int32_t tail = next;
        for (int i = 0; i < x->max - m; i++)
            tail = add_split(n, add_bytes(n, x->bytes, x->len, build(n, x->kid, tail)), next);
        for (int i = 1; i < m; i++) tail = add_bytes(n, x->bytes, x->len, build(n, x->kid, tail));
        first = build(n, x->kid, tail);
    }
    return x->min == 0 ? add_split(n, first, next) : first;
}

/* Members in order, each optional unless required, commas between the present ones. after[i]: the
 * rest from member i once one was written (each present member preceded by a comma); first[i]: the
 * rest from member i while none was written yet. */
static int32_t build_props(nfa_t *n, const cx_node_t *x, int32_t next)
{
    int32_t after = next, first = next;
    for (int i = x->n_kids; i-- > 0;) {
        const int32_t value = build(n, x->kids[i], after);
        const int32_t key = build(n, x->keys[i], value);
        const int32_t comma = add_range(n, ',', ',', key);
        if (x->required[i]) {
            after = comma;
            first = key;
        } else {
            after = add_split(n, comma, after);
            first = add_split(n, key, first);
        }
    }
    return first;
}

static int32_t build(nfa_t *n, const cx_node_t *x, int32_t next)
{
    if (n->err || next < 0) return -1;
    switch (x->kind) {
    case CX_EMPTY:
        return next;
    case CX_NOTHING:
        return nfa_add(n, NS_NONE, 0, 0, 0, 0);
    case CX_BYTES:
        return add_bytes(n, x->bytes, x->len, next);
    case CX_CLASS:
        return build_class(n, x, next);
    case CX_CONCAT:
        for (int i = x->n_kids; i-- > 0;) next = build(n, x->kids[i], next);
        return next;
    case CX_ALT: {
        int32_t entry = build(n, x->kids[x->n_kids - 1], next);
        for (int i = x->n_kids - 1; i-- > 0;) entry = add_split(n, build(n, x->kids[i], next), entry);
        return entry;
    }
    case CX_REPEAT:
        return build_repeat(n, x, next);
    case CX_SEPLIST:
        return build_seplist(n, x, next);
    case CX_PROPS:
        return build_props(n, x, next);
    }
    return -1;
}

/* ---- subset construction ---- */

typedef struct {
    const nfa_t *nfa;
    uint32_t *mark; /* generation per NFA state */
    uint32_t gen;
    long long work; /* states visited so far, against CX_MAX_SUBSET_WORK */
    int32_t *stack, *out;
    int32_t n_out;
} closure_t;

static int cmp_i32(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/* The states reachable from seeds[0..n) by epsilon moves that consume a byte or accept, sorted. */
static void closure(closure_t *c, const int32_t *seeds, int32_t n)
{
    const nstate_t *s = c->nfa->s;
    c->gen++;
    int32_t sp = 0;
    c->n_out = 0;
    for (int32_t i = 0; i < n; i++) {
        if (c->mark[seeds[i]] == c->gen) continue;
        c->mark[seeds[i]] = c->gen;
        c->stack[sp++] = seeds[i];
    }
    while (sp) {
        const int32_t q = c->stack[--sp];
        c->work++;
        if (s[q].type == NS_SPLIT) {
            const int32_t o[2] = {s[q].out1, s[q].out2};
            for (int k = 0; k < 2; k++)
                if (c->mark[o[k]] != c->gen) c->mark[o[k]] = c->gen, c->stack[sp++] = o[k];
        } else if (s[q].type != NS_NONE) {
            c->out[c->n_out++] = q;
        }
    }
    qsort(c->out, (size_t)c->n_out, sizeof *c->out, cmp_i32);
    c->work += c->n_out; /* sorting, hashing and storing the set */
}

typedef struct {
    int32_t *pool; /* the sets, back to back */
    size_t pool_n, pool_cap;
    size_t *off;    /* per DFA state: its set's offset in pool; off[i + 1] - off[i] its size */
    int32_t *table; /* open addressing: DFA state + 1, 0 empty */
    size_t table_cap;
    int32_t n, cap;
    int32_t *next;
    bool *accept;
    int n_classes;
} subset_t;

static uint64_t set_hash(const int32_t *v, int32_t n)
{
    return XXH3_64bits(v, sizeof *v * (size_t)n);
}

static bool subset_grow_table(subset_t *d)
{
    const size_t cap = d->table_cap ? d->table_cap * 2 : 4096;
    int32_t *t = calloc(cap, sizeof *t);
    if (!t) return false;
    for (int32_t i = 0; i < d->n; i++) {
        size_t h = set_hash(d->pool + d->off[i], (int32_t)(d->off[i + 1] - d->off[i])) & (cap - 1);
        while (t[h]) h = (h + 1) & (cap - 1);
        t[h] = i + 1;
    }
    free(d->table);
    d->table = t;
    d->table_cap = cap;
    return true;
}

/* The DFA state of set v[0..n): found, or added (-2 out of memory, -3 over the cap). */
static int32_t subset_intern(subset_t *d, const int32_t *v, int32_t n, int32_t max_states, bool acc)
{
    const uint64_t hv = set_hash(v, n);
    size_t h = hv & (d->table_cap - 1);
    for (; d->table[h]; h = (h + 1) & (d->table_cap - 1)) {
        const int32_t i = d->table[h] - 1;
        if (d->off[i + 1] - d->off[i] == (size_t)n && !memcmp(d->pool + d->off[i], v, sizeof *v * (size_t)n)) return i;
    }
    if (d->n >= max_states) return -3;
    if (d->n + 1 >= d->cap) {
        const int32_t cap = d->cap ? d->cap * 2 : 256;
        size_t *off = realloc(d->off, sizeof *off * (size_t)(cap + 1));
        if (off) d->off = off;
        int32_t *next = realloc(d->next, sizeof *next * (size_t)cap * (size_t)d->n_classes);
        if (next) d->next = next;
        bool *accept = realloc(d->accept, sizeof *accept * (size_t)cap);
        if (accept) d->accept = accept;
        if (!off || !next || !accept) return -2;
        d->cap = cap;
    }
    if (d->pool_n + (size_t)n > d->pool_cap) {
        size_t cap = d->pool_cap ? d->pool_cap * 2 : 65536;
        while (cap < d->pool_n + (size_t)n) cap *= 2;
        int32_t *pool = realloc(d->pool, sizeof *pool * cap);
        if (!pool) return -2;
        d->pool = pool;
        d->pool_cap = cap;
    }
    const int32_t id = d->n++;
    if (id == 0) d->off[0] = 0;
    if (n) memcpy(d->pool + d->pool_n, v, sizeof *v * (size_t)n);
    d->pool_n += (size_t)n;
    d->off[id + 1] = d->pool_n;
    d->accept[id] = acc;
    for (int c = 0; c < d->n_classes; c++) d->next[(size_t)id * (size_t)d->n_classes + (size_t)c] = -1;
    d->table[h] = id + 1;
    if ((size_t)d->n * 2 > d->table_cap && !subset_grow_table(d)) return -2;
    return id;
}

static void subset_free(subset_t *d)
{
    free(d->pool);
    free(d->off);
    free(d->table);
    free(d->next);
    free(d->accept);
}

/* ---- trimming and minimising ---- */

/* Keeps the states that can reach acceptance, numbered in breadth-first order from the start. */
static int trim(cx_dfa_t *d)
{
    const int32_t n = d->n_states;
    const int k = d->n_classes;
    int32_t *deg = calloc((size_t)n + 1, sizeof *deg), *src = malloc(sizeof *src * (size_t)n * (size_t)k + 1);
    int32_t *queue = malloc(sizeof *queue * (size_t)n), *map = malloc(sizeof *map * (size_t)n);
    bool *live = calloc((size_t)n, sizeof *live);
    int rc = FL_ENOMEM;
    if (!deg || !src || !queue || !map || !live) goto done;
    /* Reverse edges (CSR), then a backward search from the accepting states. */
    for (int32_t s = 0; s < n; s++)
        for (int c = 0; c < k; c++) {
            const int32_t t = d->next[(size_t)s * k + c];
            if (t >= 0) deg[t + 1]++;
        }
    for (int32_t s = 0; s < n; s++) deg[s + 1] += deg[s];
    for (int32_t s = 0; s < n; s++) map[s] = deg[s];
    for (int32_t s = 0; s < n; s++)
        for (int c = 0; c < k; c++) {
            const int32_t t = d->next[(size_t)s * k + c];
            if (t >= 0) src[map[t]++] = s;
        }
    int32_t qn = 0;
    for (int32_t s = 0; s < n; s++)
        if (d->accept[s]) live[s] = true, queue[qn++] = s;
    for (int32_t qi = 0; qi < qn; qi++)
        for (int32_t e = deg[queue[qi]]; e < deg[queue[qi] + 1]; e++)
            if (!live[src[e]]) live[src[e]] = true, queue[qn++] = src[e];
    rc = FL_EINVAL;
    if (!live[0]) goto done;
    /* Forward breadth-first numbering over live states. */
    for (int32_t s = 0; s < n; s++) map[s] = -1;
    qn = 0;
    map[0] = 0;
    queue[qn++] = 0;
    for (int32_t qi = 0; qi < qn; qi++)
        for (int c = 0; c < k; c++) {
            const int32_t t = d->next[(size_t)queue[qi] * k + c];
            if (t >= 0 && live[t] && map[t] < 0) map[t] = qn, queue[qn++] = t;
        }
    int32_t *next = malloc(sizeof *next * (size_t)qn * (size_t)k);
    bool *accept = malloc(sizeof *accept * (size_t)qn);
    rc = FL_ENOMEM;
    if (!next || !accept) {
        free(next);
        free(accept);
        goto done;
    }
    for (int32_t i = 0; i < qn; i++) {
        const int32_t s = queue[i];
        accept[i] = d->accept[s];
        for (int c = 0; c < k; c++) {
            const int32_t t = d->next[(size_t)s * k + c];
            next[(size_t)i * k + c] = t >= 0 && live[t] ? map[t] : -1;
        }
    }
    free(d->next);
    free(d->accept);
    d->next = next;
    d->accept = accept;
    d->n_states = qn;
    rc = 0;
done:
    free(deg);
    free(src);
    free(queue);
    free(map);
    free(live);
    return rc;
}

/* Hopcroft's partition refinement, O(k n log n) for k byte classes (Moore's simpler refinement
 * needs as many rounds as the longest chain: a string of maxLength 200 took 200). The dead state
 * is made explicit as a sink so that every state has k successors. Blocks are ranges of one
 * permutation of the states; a block's states that have a successor in the splitter are swapped
 * to its front, and a block split in two hands the worklist the smaller part unless it is queued
 * already. Leaves d as it is when memory runs out. */
static void minimise(cx_dfa_t *d)
{
    const int32_t n = d->n_states + 1, sink = d->n_states; /* n includes the sink */
    const int k = d->n_classes;
    if (n < 3) return;
    int32_t *elems = malloc(sizeof(int32_t) * (size_t)n), *loc = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *blk = malloc(sizeof(int32_t) * (size_t)n), *first = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *end = malloc(sizeof(int32_t) * (size_t)n), *marked = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *work = malloc(sizeof(int32_t) * (size_t)n), *touched = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *split = malloc(sizeof(int32_t) * (size_t)n), *map = malloc(sizeof(int32_t) * (size_t)n);
    bool *queued = calloc((size_t)n, sizeof(bool));
    /* Predecessors per class and target: inv[inv_at[c * (n + 1) + t] ..) */
    int32_t *inv_at = calloc((size_t)k * (size_t)(n + 1) + 1, sizeof(int32_t));
    int32_t *inv = malloc(sizeof(int32_t) * (size_t)n * (size_t)k);
    int32_t *next = NULL;
    bool *accept = NULL;
    if (!elems || !loc || !blk || !first || !end || !marked || !work || !touched || !split || !map || !queued ||
        !inv_at || !inv)
        goto done;
#define SUCC(s, c) ((s) == sink ? sink : d->next[(size_t)(s)*k + (c)] < 0 ? sink : d->next[(size_t)(s)*k + (c)])
    for (int c = 0; c < k; c++) {
        int32_t *at = inv_at + (size_t)c * (size_t)(n + 1);
        for (int32_t s = 0; s < n; s++) at[SUCC(s, c) + 1]++;
        for (int32_t t = 0; t < n; t++) at[t + 1] += at[t];
        int32_t *base = inv + (size_t)c * (size_t)n;
        for (int32_t s = 0; s < n; s++) base[at[SUCC(s, c)]++] = s;
        for (int32_t t = n; t > 0; t--) at[t] = at[t - 1]; /* back to starts */
        at[0] = 0;
    }
    /* Accepting states first, then the rest (the sink among them). */
    int32_t na = 0, nb = 0, nw = 0;
    for (int32_t s = 0; s < n; s++)
        if (s != sink && d->accept[s]) elems[na++] = s;
    int32_t at = na;
    for (int32_t s = 0; s < n; s++)
        if (s == sink || !d->accept[s]) elems[at++] = s;
    if (na) first[nb] = 0, end[nb] = na, nb++;
    first[nb] = na, end[nb] = n, nb++;
    for (int32_t b = 0; b < nb; b++) {
        marked[b] = first[b];
        for (int32_t i = first[b]; i < end[b]; i++) blk[elems[i]] = b, loc[elems[i]] = i;
        work[nw++] = b;
        queued[b] = true;
    }
    while (nw) {
        const int32_t a = work[--nw];
        queued[a] = false;
        /* The splitter as it is now: it may itself be split below. */
        const int32_t na_ = end[a] - first[a];
        memcpy(split, elems + first[a], sizeof(int32_t) * (size_t)na_);
        for (int c = 0; c < k; c++) {
            const int32_t *at_c = inv_at + (size_t)c * (size_t)(n + 1);
            const int32_t *base = inv + (size_t)c * (size_t)n;
            int32_t nt = 0;
            for (int32_t i = 0; i < na_; i++) {
                const int32_t t = split[i];
                for (int32_t e = at_c[t]; e < at_c[t + 1]; e++) {
                    const int32_t p = base[e], y = blk[p];
                    if (loc[p] < marked[y]) continue;
                    if (marked[y] == first[y]) touched[nt++] = y;
                    const int32_t q = elems[marked[y]];
                    elems[loc[p]] = q;
                    loc[q] = loc[p];
                    elems[marked[y]] = p;
                    loc[p] = marked[y]++;
                }
            }
            for (int32_t i = 0; i < nt; i++) {
                const int32_t y = touched[i];
                if (marked[y] == end[y]) {
                    marked[y] = first[y];
                    continue;
                }
                const int32_t z = nb++;
                first[z] = first[y];
                end[z] = marked[y];
                first[y] = marked[y];
                marked[y] = first[y];
                marked[z] = first[z];
                for (int32_t j = first[z]; j < end[z]; j++) blk[elems[j]] = z;
                int32_t add = z;
                if (!queued[y] && end[y] - first[y] < end[z] - first[z]) add = y;
                if (!queued[add]) queued[add] = true, work[nw++] = add;
            }
        }
    }
    if (nb == n) goto done;
    /* One state per block, the start's first; the sink's block goes (nothing else is dead). */
    const int32_t sink_blk = blk[sink];
    for (int32_t b = 0; b < nb; b++) map[b] = -1;
    int32_t m = 0;
    map[blk[0]] = m++;
    for (int32_t b = 0; b < nb; b++)
        if (map[b] < 0 && b != sink_blk) map[b] = m++;
    next = malloc(sizeof *next * (size_t)m * (size_t)k);
    accept = malloc(sizeof *accept * (size_t)m);
    if (!next || !accept) goto done;
    for (int32_t b = 0; b < nb; b++) {
        if (b == sink_blk) continue;
        const int32_t s = elems[first[b]];
        accept[map[b]] = d->accept[s];
        for (int c = 0; c < k; c++) {
            const int32_t t = SUCC(s, c);
            next[(size_t)map[b] * k + c] = t == sink ? -1 : map[blk[t]];
        }
    }
#undef SUCC
    free(d->next);
    free(d->accept);
    d->next = next;
    d->accept = accept;
    d->n_states = m;
    next = NULL;
    accept = NULL;
    trim(d); /* renumbers breadth-first; cannot fail for lack of live states */
done:
    free(next);
    free(accept);
    free(elems);
    free(loc);
    free(blk);
    free(first);
    free(end);
    free(marked);
    free(work);
    free(touched);
    free(split);
    free(map);
    free(queued);
    free(inv_at);
    free(inv);
}

/* ---- the whole build ---- */

int cx_dfa_build(const cx_node_t *x, size_t max_states, const char *what, cx_dfa_t *out, fl_error_t *err)
{
    memset(out, 0, sizeof *out);
    if (!what) what = "constraint";
    nfa_t nfa = {0};
    const int32_t match = nfa_add(&nfa, NS_MATCH, 0, 0, 0, 0);
    const int32_t start = build(&nfa, x, match);
    if (start < 0 || nfa.err) {
        free(nfa.s);
        if (nfa.err == FL_ERANGE)
            return fl_fail(err, FL_ERANGE, "%s: too large (more than %d automaton states before determinising)", what,
                           CX_MAX_NFA_STATES);
        return fl_fail(err, FL_ENOMEM, "%s: out of memory building the automaton", what);
    }
    /* Byte classes: bytes between the same range boundaries behave alike everywhere. */
    bool cut[257] = {0};
    for (int32_t i = 0; i < nfa.n; i++)
        if (nfa.s[i].type == NS_RANGE) cut[nfa.s[i].lo] = cut[nfa.s[i].hi + 1] = true;
    int nc = 0;
    for (int b = 0; b < 256; b++) {
        if (b > 0 && cut[b]) nc++;
        out->byte_class[b] = (uint8_t)nc;
    }
    nc++;
    subset_t d = {.n_classes = nc};
    closure_t c = {.nfa = &nfa};
    c.mark = calloc((size_t)nfa.n, sizeof *c.mark);
    c.stack = malloc(sizeof *c.stack * (size_t)nfa.n);
    c.out = malloc(sizeof *c.out * (size_t)nfa.n);
    /* The moves of one set grouped by byte class: counts, then offsets into one flat array. */
    size_t *bucket_at = calloc((size_t)nc + 1, sizeof *bucket_at), flat_cap = 0;
    int32_t *flat = NULL;
    /* Determinising may pass the cap before minimising brings the count under it. */
    const size_t cap = max_states > (size_t)INT32_MAX / 4 ? (size_t)INT32_MAX : max_states * 4;
    int rc = 0;
    if (!c.mark || !c.stack || !c.out || !bucket_at || !subset_grow_table(&d)) goto oom;
    closure(&c, &start, 1);
    bool acc = false;
    for (int32_t i = 0; i < c.n_out; i++) acc |= nfa.s[c.out[i]].type == NS_MATCH;
    if (subset_intern(&d, c.out, c.n_out, (int32_t)cap, acc) != 0) goto oom;
    for (int32_t id = 0; id < d.n; id++) {
        /* The moves of this set, per byte class; a state's range covers consecutive classes. */
        memset(bucket_at, 0, sizeof *bucket_at * ((size_t)nc + 1));
        for (size_t i = d.off[id]; i < d.off[id + 1]; i++) {
            const nstate_t *q = &nfa.s[d.pool[i]];
            if (q->type != NS_RANGE) continue;
            for (int k = out->byte_class[q->lo]; k <= out->byte_class[q->hi]; k++) bucket_at[k + 1]++;
        }
        for (int k = 0; k < nc; k++) bucket_at[k + 1] += bucket_at[k];
        if (bucket_at[nc] > flat_cap) {
            flat_cap = bucket_at[nc] * 2;
            free(flat);
            if (!(flat = malloc(sizeof *flat * flat_cap))) goto oom;
        }
        for (size_t i = d.off[id]; i < d.off[id + 1]; i++) {
            const nstate_t *q = &nfa.s[d.pool[i]];
            if (q->type != NS_RANGE) continue;
            for (int k = out->byte_class[q->lo]; k <= out->byte_class[q->hi]; k++) flat[bucket_at[k]++] = q->out1;
        }
        /* bucket_at[k] now ends class k's moves; class k starts where class k - 1 ended. */
        for (int k = 0; k < nc; k++) {
            const size_t from = k ? bucket_at[k - 1] : 0;
            if (bucket_at[k] == from) continue;
            closure(&c, flat + from, (int32_t)(bucket_at[k] - from));
            if (c.work > CX_MAX_SUBSET_WORK) {
                rc = fl_fail(err, FL_ERANGE, "%s: too large (determinising passed %lld steps with %d states so far)",
                             what, CX_MAX_SUBSET_WORK, d.n);
                goto done;
            }
            if (c.n_out == 0) continue;
            acc = false;
            for (int32_t i = 0; i < c.n_out; i++) acc |= nfa.s[c.out[i]].type == NS_MATCH;
            const int32_t t = subset_intern(&d, c.out, c.n_out, (int32_t)cap, acc);
            if (t == -3) {
                rc = fl_fail(err, FL_ERANGE, "%s: too large (more than %zu automaton states while determinising)", what,
                             cap);
                goto done;
            }
            if (t < 0) goto oom;
            d.next[(size_t)id * nc + k] = t;
        }
    }
    out->n_classes = nc;
    out->n_states = d.n;
    out->next = d.next;
    out->accept = d.accept;
    d.next = NULL;
    d.accept = NULL;
    rc = trim(out);
    if (rc == FL_EINVAL) {
        rc = fl_fail(err, FL_EINVAL, "%s: matches no string at all", what);
        goto done;
    }
    if (rc) goto oom;
    minimise(out);
    if ((size_t)out->n_states > max_states) {
        rc = fl_fail(err, FL_ERANGE, "%s: too large (%d automaton states, the limit is %zu)", what, out->n_states,
                     max_states);
        goto done;
    }
    goto done;
oom:
    rc = fl_fail(err, FL_ENOMEM, "%s: out of memory building the automaton", what);
done:
    if (rc) cx_dfa_free(out);
    free(bucket_at);
    free(flat);
    free(c.mark);
    free(c.stack);
    free(c.out);
    subset_free(&d);
    free(nfa.s);
    return rc;
}

void cx_dfa_free(cx_dfa_t *d)
{
    if (!d) return;
    free(d->next);
    free(d->accept);
    d->next = NULL;
    d->accept = NULL;
    d->n_states = 0;
}

size_t cx_dfa_bytes(const cx_dfa_t *d)
{
    return sizeof *d + (size_t)d->n_states * ((size_t)d->n_classes * sizeof *d->next + sizeof *d->accept);
}
