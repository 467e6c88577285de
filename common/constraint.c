/* constraint.c - compiled constraints over a vocabulary: the token layer above the byte automaton
 * (constraint_fa.h), and the cache of compiled constraints. See constraint.h.
 *
 * The vocabulary is indexed once as a byte trie laid out in preorder, each node knowing where its
 * subtree ends. A state's allowed-token mask is then one linear pass over that array that walks
 * the DFA alongside and jumps over every subtree whose first byte is already dead there: a state
 * inside a free JSON string visits most of the trie, a state that wants a digit visits a few
 * hundred nodes. Masks and forced runs are computed on first use per state and kept. */
#include "constraint.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "constraint_fa.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#define FORCED_MAX_BYTES 256 /* longest fixed byte run tokenized for fl_constraint_forced */

/* ---- the vocabulary index (shared, refcounted) ---- */

typedef struct {
    uint8_t byte;
    uint16_t depth;  /* 1 for a first byte */
    uint32_t skip;   /* the node after this one's subtree */
    uint32_t tok_at; /* its tokens: trie_tokens[tok_at .. next node's tok_at) */
} trie_node_t;

typedef struct cvocab {
    atomic_int refs;
    int32_t n_vocab;
    uint32_t *tok_off; /* token id's bytes: bytes[tok_off[id] .. tok_off[id + 1]) */
    uint8_t *bytes;
    bool *eog;
    int32_t *eog_ids;
    int n_eog;
    trie_node_t *nodes; /* n_nodes + 1, the last a sentinel for tok_at */
    uint32_t n_nodes;
    int32_t *trie_tokens;
    int max_len;
} cvocab_t;

static void cvocab_unref(cvocab_t **vp)
{
    cvocab_t *v = *vp;
    *vp = NULL;
    if (!v || atomic_fetch_sub(&v->refs, 1) != 1) return;
    free(v->tok_off);
    free(v->bytes);
    free(v->eog);
    free(v->eog_ids);
    free(v->nodes);
    free(v->trie_tokens);
    free(v);
}

typedef struct {
    const uint8_t *p;
    uint32_t len;
    int32_t id;
} tok_ref_t;

static int tok_ref_cmp(const void *x, const void *y)
{
    const tok_ref_t *a = x, *b = y;
    const uint32_t n = a->len < b->len ? a->len : b->len;
    const int c = memcmp(a->p, b->p, n);
    if (c) return c;
    if (a->len != b->len) return a->len < b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

static cvocab_t *cvocab_new(const tok_t *tok, fl_error_t *err)
{
    const int32_t n = tok_n_vocab(tok);
    cvocab_t *v = calloc(1, sizeof *v);
    tok_ref_t *refs = NULL;
    if (!v) goto oom;
    atomic_init(&v->refs, 1);
    v->n_vocab = n;
    v->tok_off = malloc(sizeof *v->tok_off * ((size_t)n + 1));
    v->eog = calloc((size_t)n + 1, sizeof *v->eog);
    v->eog_ids = malloc(sizeof *v->eog_ids * ((size_t)n + 1));
    size_t total = 0;
    for (int32_t id = 0; id < n; id++) {
        const int k = tok_token_bytes(tok, id, false, NULL, 0);
        total += k > 0 ? (size_t)k : 0;
    }
    v->bytes = malloc(total + 1);
    refs = malloc(sizeof *refs * ((size_t)n + 1));
    if (!v->tok_off || !v->eog || !v->eog_ids || !v->bytes || !refs) goto oom;
    /* Token bytes back to back; end-of-generation and empty tokens stay out of the trie. */
    size_t at = 0;
    int32_t nr = 0;
    for (int32_t id = 0; id < n; id++) {
        v->tok_off[id] = (uint32_t)at;
        const int k = tok_token_bytes(tok, id, false, (char *)v->bytes + at, total - at);
        if (tok_is_eog(tok, id)) {
            v->eog[id] = true;
            v->eog_ids[v->n_eog++] = id;
            continue;
        }
        if (k <= 0 || k > UINT16_MAX) continue; /* trie depths are 16-bit: such a token is never allowed */
        refs[nr++] = (tok_ref_t){v->bytes + at, (uint32_t)k, id};
        if (k > v->max_len) v->max_len = k;
        at += (size_t)k;
    }
    v->tok_off[n] = (uint32_t)at;
    qsort(refs, (size_t)nr, sizeof *refs, tok_ref_cmp);
    /* Preorder trie from the sorted strings: each string opens nodes past its common prefix with
     * the one before; a node closes (its skip is set) when a string diverges above it. */
    v->nodes = malloc(sizeof *v->nodes * (at + 1));
    v->trie_tokens = malloc(sizeof *v->trie_tokens * ((size_t)nr + 1));
    uint32_t *open = malloc(sizeof *open * ((size_t)v->max_len + 1));
    if (!v->nodes || !v->trie_tokens || !open) {
        free(open);
        goto oom;
    }
    uint32_t nn = 0, nt = 0;
    int depth = 0; /* of the previous string */
    for (int32_t i = 0; i < nr; i++) {
        int lcp = 0;
        if (i > 0) {
            const int m = (int)(refs[i].len < refs[i - 1].len ? refs[i].len : refs[i - 1].len);
            while (lcp < m && refs[i].p[lcp] == refs[i - 1].p[lcp]) lcp++;
        }
        for (int d = depth; d > lcp; d--) v->nodes[open[d]].skip = nn;
        for (int d = lcp + 1; d <= (int)refs[i].len; d++) {
            open[d] = nn;
            v->nodes[nn++] = (trie_node_t){refs[i].p[d - 1], (uint16_t)d, 0, nt};
        }
        depth = (int)refs[i].len;
        v->trie_tokens[nt++] = refs[i].id;
    }
    for (int d = depth; d > 0; d--) v->nodes[open[d]].skip = nn;
    v->nodes[nn] = (trie_node_t){0, 0, nn, nt};
    v->n_nodes = nn;
    free(open);
    free(refs);
    return v;
oom:
    free(refs);
    cvocab_unref(&v);
    fl_fail(err, FL_ENOMEM, "constraint: out of memory indexing the vocabulary");
    return NULL;
}

/* ---- the compiled constraint ---- */

struct fl_constraint {
    atomic_int refs;
    cx_dfa_t dfa;
    const tok_t *tok;
    cvocab_t *voc; /* NULL: compiled without a vocabulary */
    size_t mask_words;
    uint64_t *zero_mask;
    uint64_t **masks;  /* per state, computed on first use */
    int32_t **forced;  /* per state, computed on first use */
    int16_t *n_forced; /* -1: not computed yet */
    int16_t *n_out;    /* bytes with a live transition */
    uint8_t *only_out; /* that byte when n_out is 1 */
    size_t bytes;
    /* The cache's key. */
    uint8_t *key;
    size_t key_len;
    uint64_t key_hash;
    uint64_t last_use;
};

static const char *kind_name(fl_constraint_kind_t kind)
{
    return kind == FL_CONSTRAINT_CHOICE ? "choice" : kind == FL_CONSTRAINT_REGEX ? "regex" : "json schema";
}

static fl_constraint_t *compile_with(fl_constraint_kind_t kind, const char *text, const char *const *choices,
                                     int n_choices, const tok_t *tok, cvocab_t *voc,
                                     const fl_constraint_limits_t *limits, fl_error_t *err)
{
    const size_t max_states =
        limits && limits->max_dfa_states ? limits->max_dfa_states : FL_CONSTRAINT_DEFAULT_MAX_STATES;
    const size_t max_bytes = limits && limits->max_bytes ? limits->max_bytes : FL_CONSTRAINT_DEFAULT_MAX_BYTES;
    cx_arena_t *a = cx_arena_new();
    fl_constraint_t *c = calloc(1, sizeof *c);
    if (!a || !c) {
        fl_fail(err, FL_ENOMEM, "constraint: out of memory");
        goto fail;
    }
    atomic_init(&c->refs, 1);
    cx_node_t *x = NULL;
    switch (kind) {
    case FL_CONSTRAINT_CHOICE:
        x = cx_choice(a, choices, n_choices, err);
        break;
    case FL_CONSTRAINT_REGEX:
        if (!text) {
            fl_fail(err, FL_EINVAL, "regex: no pattern");
            goto fail;
        }
        x = cx_parse_regex(a, text, strlen(text), "regex", err);
        break;
    case FL_CONSTRAINT_JSON_SCHEMA:
        x = cx_parse_schema(a, text, text ? strlen(text) : 0, err);
        break;
    default:
        fl_fail(err, FL_EINVAL, "constraint: unknown kind %d", (int)kind);
        goto fail;
    }
    if (!x || cx_dfa_build(x, max_states, kind_name(kind), &c->dfa, err)) goto fail;
    cx_arena_free(&a);
    const int32_t n = c->dfa.n_states;
    c->tok = tok;
    if (voc) {
        atomic_fetch_add(&voc->refs, 1);
        c->voc = voc;
        c->mask_words = ((size_t)voc->n_vocab + 63) / 64;
    }
    c->bytes = sizeof *c + cx_dfa_bytes(&c->dfa) +
               (size_t)n * (sizeof *c->masks + sizeof *c->forced + sizeof *c->n_forced + sizeof *c->n_out + 1);
    /* Bounded up front for every state's mask, so that computing them later cannot pass it. */
    const size_t worst = c->bytes + (size_t)n * c->mask_words * sizeof(uint64_t);
    if (worst > max_bytes) {
        fl_fail(err, FL_ERANGE,
                "%s: too large (%d automaton states need up to %zu MiB with their token masks, the "
                "limit is %zu MiB)",
                kind_name(kind), n, worst >> 20, max_bytes >> 20);
        goto fail;
    }
    c->masks = calloc((size_t)n, sizeof *c->masks);
    c->forced = calloc((size_t)n, sizeof *c->forced);
    c->n_forced = malloc(sizeof *c->n_forced * (size_t)n);
    c->n_out = malloc(sizeof *c->n_out * (size_t)n);
    c->only_out = malloc((size_t)n);
    c->zero_mask = calloc(c->mask_words + 1, sizeof *c->zero_mask);
    if (!c->masks || !c->forced || !c->n_forced || !c->n_out || !c->only_out || !c->zero_mask) {
        fl_fail(err, FL_ENOMEM, "constraint: out of memory");
        goto fail;
    }
    for (int32_t s = 0; s < n; s++) {
        c->n_forced[s] = -1;
        int k = 0;
        uint8_t only = 0;
        for (int b = 0; b < 256; b++)
            if (cx_dfa_step(&c->dfa, s, (uint8_t)b) >= 0) k++, only = (uint8_t)b;
        c->n_out[s] = (int16_t)k;
        c->only_out[s] = only;
    }
    return c;
fail:
    cx_arena_free(&a);
    fl_constraint_free(&c);
    return NULL;
}

fl_constraint_t *fl_constraint_compile(fl_constraint_kind_t kind, const char *text, const char *const *choices,
                                       int n_choices, const tok_t *tok, const fl_constraint_limits_t *limits,
                                       fl_error_t *err)
{
    cvocab_t *voc = NULL;
    if (tok && !(voc = cvocab_new(tok, err))) return NULL;
    fl_constraint_t *c = compile_with(kind, text, choices, n_choices, tok, voc, limits, err);
    cvocab_unref(&voc);
    return c;
}

void fl_constraint_free(fl_constraint_t **cp)
{
    if (!cp || !*cp) return;
    fl_constraint_t *c = *cp;
    *cp = NULL;
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    for (int32_t s = 0; s < c->dfa.n_states; s++) {
        if (c->masks) free(c->masks[s]);
        if (c->forced) free(c->forced[s]);
    }
    free(c->masks);
    free(c->forced);
    free(c->n_forced);
    free(c->n_out);
    free(c->only_out);
    free(c->zero_mask);
    free(c->key);
    cx_dfa_free(&c->dfa);
    cvocab_unref(&c->voc);
    free(c);
}

fl_constraint_t *fl_constraint_ref(fl_constraint_t *c)
{
    if (c) atomic_fetch_add(&c->refs, 1);
    return c;
}

static bool valid_state(const fl_constraint_t *c, int32_t state)
{
    return c && state >= 0 && state < c->dfa.n_states;
}

int32_t fl_constraint_start(const fl_constraint_t *c)
{
    return c ? 0 : FL_CSTATE_DEAD;
}
int32_t fl_constraint_n_states(const fl_constraint_t *c)
{
    return c ? c->dfa.n_states : 0;
}

int32_t fl_constraint_next_bytes(const fl_constraint_t *c, int32_t state, const void *bytes, size_t len)
{
    if (!valid_state(c, state) || (!bytes && len)) return FL_CSTATE_DEAD;
    const uint8_t *p = bytes;
    for (size_t i = 0; i < len && state >= 0; i++) state = cx_dfa_step(&c->dfa, state, p[i]);
    return state < 0 ? FL_CSTATE_DEAD : state;
}

bool fl_constraint_match(const fl_constraint_t *c, const void *bytes, size_t len)
{
    const int32_t s = fl_constraint_next_bytes(c, fl_constraint_start(c), bytes, len);
    return s >= 0 && c->dfa.accept[s];
}

int32_t fl_constraint_next(fl_constraint_t *c, int32_t state, int32_t id)
{
    if (!valid_state(c, state) || !c->voc || id < 0 || id >= c->voc->n_vocab) return FL_CSTATE_DEAD;
    const cvocab_t *v = c->voc;
    if (v->eog[id]) return c->dfa.accept[state] ? state : FL_CSTATE_DEAD;
    const uint32_t from = v->tok_off[id], to = v->tok_off[id + 1];
    if (from == to) return FL_CSTATE_DEAD;
    return fl_constraint_next_bytes(c, state, v->bytes + from, to - from);
}

/* One pass over the preorder trie, walking the DFA beside it; dead subtrees are jumped over. */
static void compute_mask(const fl_constraint_t *c, int32_t state, uint64_t *mask)
{
    const cvocab_t *v = c->voc;
    const trie_node_t *nodes = v->nodes;
    const int k = c->dfa.n_classes;
    const int32_t *next = c->dfa.next;
    const uint8_t *cls = c->dfa.byte_class;
    int32_t st[v->max_len + 1];
    st[0] = state;
    for (uint32_t i = 0; i < v->n_nodes;) {
        const trie_node_t *nd = &nodes[i];
        const int32_t s = next[(size_t)st[nd->depth - 1] * (size_t)k + cls[nd->byte]];
        if (s < 0) {
            i = nd->skip;
            continue;
        }
        st[nd->depth] = s;
        for (uint32_t t = nd->tok_at; t < nodes[i + 1].tok_at; t++) {
            const int32_t id = v->trie_tokens[t];
            mask[id >> 6] |= 1ull << (id & 63);
        }
        i++;
    }
    if (c->dfa.accept[state])
        for (int e = 0; e < v->n_eog; e++) mask[v->eog_ids[e] >> 6] |= 1ull << (v->eog_ids[e] & 63);
}

const uint64_t *fl_constraint_mask(fl_constraint_t *c, int32_t state)
{
    if (!c || !c->voc) return NULL;
    if (!valid_state(c, state)) return c->zero_mask;
    if (c->masks[state]) return c->masks[state];
    uint64_t *m = calloc(c->mask_words, sizeof *m);
    if (!m) return NULL;
    compute_mask(c, state, m);
    c->masks[state] = m;
    c->bytes += c->mask_words * sizeof *m;
    return m;
}

int fl_constraint_allowed_ids(fl_constraint_t *c, int32_t state, int32_t *out, int max)
{
    const uint64_t *m = fl_constraint_mask(c, state);
    if (!m) return -1;
    int k = 0;
    for (size_t w = 0; w < c->mask_words && k <= max; w++) k += __builtin_popcountll(m[w]);
    if (k > max) return -1;
    int j = 0;
    for (size_t w = 0; w < c->mask_words; w++)
        for (uint64_t bits = m[w]; bits; bits &= bits - 1) out[j++] = (int32_t)(w * 64 + (size_t)__builtin_ctzll(bits));
    return j;
}

bool fl_constraint_accepting(const fl_constraint_t *c, int32_t state)
{
    return valid_state(c, state) && c->dfa.accept[state];
}

bool fl_constraint_finished(fl_constraint_t *c, int32_t state)
{
    return valid_state(c, state) && c->dfa.accept[state] && c->n_out[state] == 0;
}

/* The bytes the automaton fixes from state: the run of non-accepting states with one live byte. */
static size_t forced_run(const fl_constraint_t *c, int32_t state, uint8_t *run, size_t cap, bool *cut)
{
    size_t n = 0;
    while (n < cap && !c->dfa.accept[state] && c->n_out[state] == 1) {
        run[n++] = c->only_out[state];
        state = cx_dfa_step(&c->dfa, state, c->only_out[state]);
    }
    *cut = n == cap && !c->dfa.accept[state] && c->n_out[state] == 1;
    return n;
}

/* The tokenizer's encoding of the forced run, cut at the first token that leaves it; the last one
 * is dropped when the run was cut short (a longer token could continue past the cut). */
static int compute_forced(fl_constraint_t *c, int32_t state)
{
    uint8_t run[FORCED_MAX_BYTES];
    bool cut;
    const size_t n = forced_run(c, state, run, sizeof run, &cut);
    c->n_forced[state] = 0;
    if (n == 0 || !c->tok) return 0;
    int32_t ids[3 * FORCED_MAX_BYTES + 8];
    int k = tok_encode(c->tok, (const char *)run, n, false, false, ids, (int)(sizeof ids / sizeof *ids));
    if (k <= 0) return 0;
    if (k > (int)(sizeof ids / sizeof *ids)) k = (int)(sizeof ids / sizeof *ids);
    int32_t out[3 * FORCED_MAX_BYTES + 8];
    int m = 0;
    size_t pos = 0;
    int32_t s = state;
    for (int i = 0; i < k; i++) {
        const cvocab_t *v = c->voc;
        const uint32_t len = v->tok_off[ids[i] + 1] - v->tok_off[ids[i]];
        if (v->eog[ids[i]] || len == 0 || pos + len > n || memcmp(v->bytes + v->tok_off[ids[i]], run + pos, len)) break;
        const int32_t t = fl_constraint_next(c, s, ids[i]);
        if (t < 0) break;
        out[m++] = ids[i];
        pos += len;
        s = t;
    }
    if (cut && m > 0 && pos == n) m--;
    /* A last token that ends where the run does may be one the model never writes: where the run
     * meets a choice ("\n12." then " positive"), the model picks a longer token that starts with the
     * last one's bytes and carries on into the choice (" positive" over " "). Such a draft would be
     * rejected nearly always, so it is left to the model. */
    if (!cut && m > 0 && pos == n) {
        const cvocab_t *v = c->voc;
        const int32_t last = out[m - 1];
        const uint8_t *lb = v->bytes + v->tok_off[last];
        const uint32_t ll = v->tok_off[last + 1] - v->tok_off[last];
        int32_t before = state;
        for (int i = 0; i < m - 1; i++) before = fl_constraint_next(c, before, out[i]);
        bool longer = false;
        for (int32_t id = 0; id < v->n_vocab && !longer; id++) {
            const uint32_t len = v->tok_off[id + 1] - v->tok_off[id];
            longer = len > ll && !memcmp(v->bytes + v->tok_off[id], lb, ll) &&
                     fl_constraint_next(c, before, id) != FL_CSTATE_DEAD;
        }
        if (longer) m--;
    }
    if (m == 0) return 0;
    int32_t *keep = malloc(sizeof *keep * (size_t)m);
    if (!keep) return 0;
    memcpy(keep, out, sizeof *keep * (size_t)m);
    c->forced[state] = keep;
    c->n_forced[state] = (int16_t)m;
    c->bytes += sizeof *keep * (size_t)m;
    return m;
}

int fl_constraint_forced(fl_constraint_t *c, int32_t state, int32_t *out, int max)
{
    if (!valid_state(c, state) || !c->voc || max <= 0 || !out) return 0;
    const int n = c->n_forced[state] >= 0 ? c->n_forced[state] : compute_forced(c, state);
    const int k = n < max ? n : max;
    if (k > 0) memcpy(out, c->forced[state], sizeof *out * (size_t)k);
    return k;
}

size_t fl_constraint_bytes(const fl_constraint_t *c)
{
    return c ? c->bytes : 0;
}

/* ---- the cache ---- */

struct fl_constraint_cache {
    const tok_t *tok;
    cvocab_t *voc;
    fl_constraint_limits_t limits;
    fl_constraint_t **slots;
    int n, cap;
    size_t max_bytes;
    uint64_t clock;
};

fl_constraint_cache_t *fl_constraint_cache_new(const tok_t *tok, int max_entries, size_t max_bytes,
                                               const fl_constraint_limits_t *limits, fl_error_t *err)
{
    if (max_entries <= 0) max_entries = 64;
    fl_constraint_cache_t *k = calloc(1, sizeof *k);
    if (!k || !(k->slots = calloc((size_t)max_entries, sizeof *k->slots))) {
        free(k);
        fl_fail(err, FL_ENOMEM, "constraint cache: out of memory");
        return NULL;
    }
    if (tok && !(k->voc = cvocab_new(tok, err))) {
        free(k->slots);
        free(k);
        return NULL;
    }
    k->tok = tok;
    k->cap = max_entries;
    k->max_bytes = max_bytes;
    if (limits) k->limits = *limits;
    return k;
}

void fl_constraint_cache_destroy(fl_constraint_cache_t **kp)
{
    if (!kp || !*kp) return;
    fl_constraint_cache_t *k = *kp;
    for (int i = 0; i < k->n; i++) fl_constraint_free(&k->slots[i]);
    free(k->slots);
    cvocab_unref(&k->voc);
    free(k);
    *kp = NULL;
}

/* The key: the kind, then the text or each choice with its length. */
static uint8_t *cache_key(fl_constraint_kind_t kind, const char *text, const char *const *choices, int n_choices,
                          size_t *len)
{
    size_t n = 1;
    if (kind == FL_CONSTRAINT_CHOICE) {
        for (int i = 0; i < n_choices; i++) n += sizeof(size_t) + (choices && choices[i] ? strlen(choices[i]) : 0);
    } else {
        n += text ? strlen(text) : 0;
    }
    uint8_t *key = malloc(n);
    if (!key) return NULL;
    key[0] = (uint8_t)kind;
    size_t at = 1;
    if (kind == FL_CONSTRAINT_CHOICE) {
        for (int i = 0; i < n_choices; i++) {
            const size_t l = choices && choices[i] ? strlen(choices[i]) : 0;
            memcpy(key + at, &l, sizeof l);
            if (l) memcpy(key + at + sizeof l, choices[i], l);
            at += sizeof l + l;
        }
    } else if (text) {
        memcpy(key + at, text, n - 1);
    }
    *len = n;
    return key;
}

static void cache_evict(fl_constraint_cache_t *k, int i)
{
    fl_constraint_free(&k->slots[i]);
    k->slots[i] = k->slots[--k->n];
    k->slots[k->n] = NULL;
}

fl_constraint_t *fl_constraint_cache_get(fl_constraint_cache_t *k, fl_constraint_kind_t kind, const char *text,
                                         const char *const *choices, int n_choices, fl_error_t *err)
{
    if (!k) {
        fl_fail(err, FL_EINVAL, "constraint cache: none given");
        return NULL;
    }
    if (kind == FL_CONSTRAINT_CHOICE && (n_choices <= 0 || !choices)) {
        fl_fail(err, FL_EINVAL, "choice: no choices given");
        return NULL;
    }
    size_t len;
    uint8_t *key = cache_key(kind, text, choices, n_choices, &len);
    if (!key) {
        fl_fail(err, FL_ENOMEM, "constraint cache: out of memory");
        return NULL;
    }
    const uint64_t h = XXH3_64bits(key, len);
    for (int i = 0; i < k->n; i++) {
        fl_constraint_t *c = k->slots[i];
        if (c->key_hash == h && c->key_len == len && !memcmp(c->key, key, len)) {
            free(key);
            c->last_use = ++k->clock;
            return fl_constraint_ref(c);
        }
    }
    fl_constraint_t *c = compile_with(kind, text, choices, n_choices, k->tok, k->voc, &k->limits, err);
    if (!c) {
        free(key);
        return NULL;
    }
    c->key = key;
    c->key_len = len;
    c->key_hash = h;
    c->last_use = ++k->clock;
    /* Least recently used out while full or over the byte budget (masks grow with use). */
    for (;;) {
        size_t total = fl_constraint_bytes(c);
        int lru = -1;
        for (int i = 0; i < k->n; i++) {
            total += fl_constraint_bytes(k->slots[i]);
            if (lru < 0 || k->slots[i]->last_use < k->slots[lru]->last_use) lru = i;
        }
        if (lru < 0 || (k->n < k->cap && (!k->max_bytes || total <= k->max_bytes))) break;
        cache_evict(k, lru);
    }
    k->slots[k->n++] = fl_constraint_ref(c);
    return c;
}

int fl_constraint_cache_size(const fl_constraint_cache_t *k)
{
    return k ? k->n : 0;
}
