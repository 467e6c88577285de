/* tokenizer.c - byte-level BPE matching llama.cpp's llm_tokenizer_bpe (see tokenizer.h).
 *
 * Build: every vocab string gets an id; a string hash maps spelling -> id (a later duplicate wins, as
 * in llama.cpp's token_to_id). Merges are turned into a pair hash (left id, right id) -> (rank, id of
 * the joined string); strings a merge names that are not in the vocab get "virtual" ids past n_vocab
 * so that BPE can run on ids alone and still behave like llama.cpp's string-keyed version. The first
 * occurrence of a pair keeps its rank (std::map::emplace). Every token's decoded bytes are computed
 * once here, so decoding never allocates.
 *
 * Encode, per call (one scratch allocation sized from the text):
 *   1. special tokens: for each control/user-defined/unknown token, longest first, every raw fragment
 *      is split around its occurrences (llama.cpp's tokenizer_st_partition);
 *   2. each raw fragment is decoded to code points (bad bytes -> U+FFFD) and cut into words by the
 *      pre-tokenizer of tokenizer.ggml.pre (common/pretokenizer.c: a table of llama.cpp's split rules);
 *   3. each word's UTF-8 bytes start as one symbol per byte (the id of bytes_to_unicode(byte)); the
 *      adjacent pair of lowest rank is merged, leftmost first, using a binary heap with lazy deletion
 *      (an entry is stale when either side has changed since it was pushed).
 * A symbol left with a virtual id falls back to its single-byte pieces, as llama.cpp does. */
#include "tokenizer.h"

#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pretokenizer.h"
#include "unicode.h"

typedef struct {
    uint64_t key; /* (left << 32) | right, both + 1 so that 0 means empty */
    int32_t rank;
    int32_t result;
} merge_slot_t;

struct tok {
    int32_t n_vocab;
    int32_t n_ids; /* vocab + virtual strings */
    int32_t ids_cap;
    char *arena; /* NUL-terminated spellings, then decoded bytes */
    size_t arena_len, arena_cap;
    size_t *text_off; /* per id */
    uint32_t *text_len;
    uint8_t *type;     /* per vocab id: tok_type_t after llama.cpp's promotions */
    size_t *dec_off;   /* per vocab id: bytes tok_token_bytes gives with special = true */
    uint32_t *dec_len;
    uint8_t *eog;      /* per vocab id */
    int32_t *str_slots; /* id + 1, 0 = empty */
    size_t str_mask;
    merge_slot_t *merges;
    size_t merge_mask;
    int32_t byte_id[256]; /* BPE: the symbol of each byte; SentencePiece: its <0xXX> token or -1 */
    int32_t *special; /* ids split out before BPE, longest first */
    int n_special;
    uint8_t *rstrip;    /* per vocab id, NULL when none: whitespace after the token is dropped */
    bool spm;           /* SentencePiece */
    bool add_space_prefix;
    int32_t *spm_rank;  /* SentencePiece, per vocab id: 0 for the highest score, equal scores equal */
    const pretok_t *pre;
    char pre_name[64];
    bool ignore_merges;
    int32_t bos, eos, unk, pad;
    bool add_bos;
    size_t max_token_len;
    char *chat_template; /* rendered by chat_template.c */
};

/* ---- hashing and interning ---- */

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static const char *id_text(const tok_t *t, int32_t id) { return t->arena + t->text_off[id]; }

/* Slot for s: either the one holding its id or the empty one where it would go. */
static size_t str_slot(const tok_t *t, const char *s, size_t n)
{
    size_t i = hash_bytes(s, n) & t->str_mask;
    for (;;) {
        int32_t v = t->str_slots[i];
        if (v == 0) return i;
        int32_t id = v - 1;
        if (t->text_len[id] == n && memcmp(id_text(t, id), s, n) == 0) return i;
        i = (i + 1) & t->str_mask;
    }
}

static int32_t str_find(const tok_t *t, const char *s, size_t n)
{
    return t->str_slots[str_slot(t, s, n)] - 1;
}

static int arena_put(tok_t *t, const char *s, size_t n, size_t *off)
{
    if (t->arena_len + n + 1 > t->arena_cap) {
        size_t cap = t->arena_cap ? t->arena_cap : 1 << 16;
        while (cap < t->arena_len + n + 1) cap *= 2;
        char *a = realloc(t->arena, cap);
        if (!a) return FL_ENOMEM;
        t->arena = a;
        t->arena_cap = cap;
    }
    *off = t->arena_len;
    if (n) memcpy(t->arena + t->arena_len, s, n);
    t->arena[t->arena_len + n] = '\0';
    t->arena_len += n + 1;
    return 0;
}

/* Appends a new id spelled s (the caller has checked the table has room). */
static int add_id(tok_t *t, const char *s, size_t n, int32_t *id)
{
    if (t->n_ids >= t->ids_cap) return FL_ENOMEM;
    int32_t i = t->n_ids;
    int rc = arena_put(t, s, n, &t->text_off[i]);
    if (rc) return rc;
    t->text_len[i] = (uint32_t)n;
    t->n_ids++;
    *id = i;
    return 0;
}

/* Id of s, creating a virtual one when it is not a vocab string. */
static int intern(tok_t *t, const char *s, size_t n, int32_t *id)
{
    size_t slot = str_slot(t, s, n);
    if (t->str_slots[slot]) {
        *id = t->str_slots[slot] - 1;
        return 0;
    }
    int rc = add_id(t, s, n, id);
    if (rc) return rc;
    t->str_slots[slot] = *id + 1;
    return 0;
}

static uint64_t merge_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)(a + 1) << 32) | (uint32_t)(b + 1); }

/* Slot holding pair (a, b), or the empty slot where it would go. */
static merge_slot_t *merge_slot(const tok_t *t, int32_t a, int32_t b)
{
    uint64_t key = merge_key(a, b);
    size_t i = mix64(key) & t->merge_mask;
    while (t->merges[i].key != 0 && t->merges[i].key != key) i = (i + 1) & t->merge_mask;
    return &t->merges[i];
}

/* ---- construction ---- */

static const char *const EOG_TEXTS[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    /* FIM pad / repo / file-separator tokens, which llama.cpp also treats as end of generation */
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
    "<reponame>", "<|file_sep|>", "<PAD>", "<｜end▁of▁sentence｜>",
};

/* FIM prefix / suffix / middle tokens: llama.cpp makes them CONTROL (so not parsed from plain text). */
static const char *const FIM_TEXTS[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
};

static int set_pre(tok_t *t, const char *pre, fl_error_t *err)
{
    if (!pre) pre = "default";
    snprintf(t->pre_name, sizeof t->pre_name, "%s", pre);
    t->pre = pretok_find(pre);
    if (!t->pre) {
        char names[1024];
        pretok_names(names, sizeof names);
        return fl_fail(err, FL_EUNSUPPORTED, "tokenizer: pre-tokenizer '%s' is not supported (supported: %s)", pre,
                       names);
    }
    t->ignore_merges = pretok_ignore_merges(t->pre);
    return 0;
}

/* llama_decode_text: byte-level spelling -> bytes; a code point outside the byte map is written as
 * "[UNK_BYTE_0x<hex><whole text>]", llama.cpp's marker. Returns the decoded length; out must hold
 * n * (n + 22) bytes. */
static size_t decode_byte_level(const char *s, size_t n, char *out)
{
    size_t o = 0, pos = 0;
    while (pos < n) {
        uint32_t cp = unicode_decode_utf8(s, n, &pos);
        int b = unicode_cp_to_byte(cp);
        if (b >= 0) {
            out[o++] = (char)b;
            continue;
        }
        char u[4];
        int ul = unicode_encode_utf8(cp, u);
        o += (size_t)sprintf(out + o, "[UNK_BYTE_0x");
        for (int k = 0; k < ul; k++) o += (size_t)sprintf(out + o, "%02x", (uint8_t)u[k]);
        memcpy(out + o, s, n);
        o += n;
        out[o++] = ']';
    }
    return o;
}

/* SentencePiece token_to_piece: U+2581 -> ' ' for normal tokens, the byte of <0xXX> for byte tokens
 * (read as llama.cpp's strtol of the two characters after "<0x"). Returns the length; out holds n. */
static size_t decode_spm(const char *s, size_t n, uint8_t type, char *out)
{
    if (type == TOK_TYPE_BYTE) {
        char hex[3] = {n > 3 ? s[3] : 0, n > 4 ? s[4] : 0, 0};
        out[0] = (char)strtol(hex, NULL, 16);
        return 1;
    }
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (type == TOK_TYPE_NORMAL && i + 2 < n && !memcmp(s + i, "\xE2\x96\x81", 3)) {
            out[o++] = ' ';
            i += 2;
        } else
            out[o++] = s[i];
    }
    return o;
}

typedef struct {
    float score;
    int32_t id;
} scored_t;

static int by_score_desc(const void *a, const void *b)
{
    const float x = ((const scored_t *)a)->score, y = ((const scored_t *)b)->score;
    return x > y ? -1 : x < y ? 1 : 0;
}

/* SentencePiece: rank[id] orders tokens by score, highest first (equal scores, equal ranks), so that
 * BPE's bigram heap (lowest rank, then leftmost) pops what llama.cpp's score queue pops. */
static int spm_ranks(tok_t *t, const float *scores)
{
    const int32_t nv = t->n_vocab;
    t->spm_rank = malloc(sizeof *t->spm_rank * (size_t)nv);
    scored_t *v = malloc(sizeof *v * (size_t)nv);
    if (!t->spm_rank || !v) {
        free(v);
        return FL_ENOMEM;
    }
    for (int32_t i = 0; i < nv; i++) v[i] = (scored_t){scores ? scores[i] : 0.0f, i};
    qsort(v, (size_t)nv, sizeof *v, by_score_desc);
    int32_t rank = 0;
    for (int32_t i = 0; i < nv; i++) {
        if (i > 0 && v[i].score != v[i - 1].score) rank = i;
        t->spm_rank[v[i].id] = rank;
    }
    free(v);
    return 0;
}

tok_t *tok_new(const tok_desc_t *d, fl_error_t *err)
{
    if (!d || d->n_vocab <= 0 || !d->tokens || d->n_merges < 0 || (d->n_merges > 0 && !d->merges)) {
        fl_fail(err, FL_EINVAL, "tok_new: missing vocabulary (n_vocab=%d)", d ? d->n_vocab : 0);
        return NULL;
    }
    if (d->n_vocab > (1 << 24) || d->n_merges > (1 << 24)) {
        fl_fail(err, FL_ERANGE, "tok_new: vocabulary too large (n_vocab=%d n_merges=%d)", d->n_vocab, d->n_merges);
        return NULL;
    }
    tok_t *t = calloc(1, sizeof *t);
    if (!t) goto nomem;
    t->spm = d->spm;
    t->add_space_prefix = d->spm && d->add_space_prefix;
    if (t->spm) /* llama.cpp gives SentencePiece no pre-tokenizer, whatever tokenizer.ggml.pre says */
        snprintf(t->pre_name, sizeof t->pre_name, "%s", d->pre ? d->pre : "default");
    else if (set_pre(t, d->pre, err))
        goto fail;
    const int32_t n_merges = t->spm ? 0 : d->n_merges;
    int32_t nv = d->n_vocab;
    t->n_vocab = nv;
    t->ids_cap = nv + 3 * n_merges + 256;
    t->text_off = malloc(sizeof *t->text_off * (size_t)t->ids_cap);
    t->text_len = malloc(sizeof *t->text_len * (size_t)t->ids_cap);
    t->type = malloc((size_t)nv);
    t->eog = calloc((size_t)nv, 1);
    t->dec_off = malloc(sizeof *t->dec_off * (size_t)nv);
    t->dec_len = malloc(sizeof *t->dec_len * (size_t)nv);
    t->str_mask = pow2_at_least((size_t)t->ids_cap * 2) - 1;
    t->str_slots = calloc(t->str_mask + 1, sizeof *t->str_slots);
    t->merge_mask = pow2_at_least((size_t)n_merges * 2 + 16) - 1;
    t->merges = calloc(t->merge_mask + 1, sizeof *t->merges);
    if (!t->text_off || !t->text_len || !t->type || !t->eog || !t->dec_off || !t->dec_len || !t->str_slots ||
        !t->merges)
        goto nomem;

    /* Vocab: ids 0..nv-1 in order; an empty string becomes "[EMPTY_<id>]" as in llama.cpp. */
    for (int32_t i = 0; i < nv; i++) {
        const char *s = d->tokens[i];
        if (!s) {
            fl_fail(err, FL_EINVAL, "tok_new: token %d is NULL", i);
            goto fail;
        }
        size_t n = d->token_lens ? d->token_lens[i] : strlen(s);
        char empty[32];
        if (n == 0) {
            n = (size_t)snprintf(empty, sizeof empty, "[EMPTY_%d]", i);
            s = empty;
        }
        if (n > (1u << 20)) {
            fl_fail(err, FL_ERANGE, "tok_new: token %d is %zu bytes long", i, n);
            goto fail;
        }
        int32_t id;
        if (add_id(t, s, n, &id)) goto nomem;
        t->str_slots[str_slot(t, s, n)] = id + 1; /* a later duplicate wins */
        int ty = d->token_types ? d->token_types[i] : TOK_TYPE_NORMAL;
        t->type[i] = (uint8_t)(ty >= 0 && ty <= TOK_TYPE_BYTE ? ty : TOK_TYPE_UNDEFINED);
    }

    /* Byte symbols and merges (SentencePiece: byte tokens, as llama.cpp's byte_to_token finds them). */
    for (int b = 0; b < 256; b++) {
        if (t->spm) {
            char hex[8], one[1] = {(char)b};
            snprintf(hex, sizeof hex, "<0x%02X>", b);
            int32_t id = str_find(t, hex, 6);
            if (id < 0) id = str_find(t, one, 1);
            t->byte_id[b] = id;
            continue;
        }
        char u[4];
        int n = unicode_encode_utf8(unicode_byte_to_cp((uint8_t)b), u);
        if (intern(t, u, (size_t)n, &t->byte_id[b])) goto nomem;
    }
    if (t->spm && spm_ranks(t, d->scores)) goto nomem;
    char *joined = NULL;
    size_t joined_cap = 0;
    for (int32_t r = 0; r < n_merges; r++) {
        const char *m = d->merges[r];
        if (!m) continue;
        size_t n = d->merge_lens ? d->merge_lens[r] : strlen(m);
        /* llama.cpp: word.find(' ', 1); no space gives the pair ("", "") */
        const char *sp = n > 1 ? memchr(m + 1, ' ', n - 1) : NULL;
        const char *a = "", *b = "";
        size_t na = 0, nb = 0;
        if (sp) {
            a = m;
            na = (size_t)(sp - m);
            b = sp + 1;
            nb = n - na - 1;
        }
        if (na + nb > joined_cap) {
            joined_cap = (na + nb) * 2 + 64;
            char *j = realloc(joined, joined_cap);
            if (!j) {
                free(joined);
                goto nomem;
            }
            joined = j;
        }
        int32_t ia, ib, ij;
        if (intern(t, a, na, &ia) || intern(t, b, nb, &ib)) {
            free(joined);
            goto nomem;
        }
        if (na) memcpy(joined, a, na);
        if (nb) memcpy(joined + na, b, nb);
        if (intern(t, joined, na + nb, &ij)) {
            free(joined);
            goto nomem;
        }
        merge_slot_t *ms = merge_slot(t, ia, ib);
        if (ms->key == 0) {
            ms->key = merge_key(ia, ib);
            ms->rank = r;
            ms->result = ij;
        }
    }
    free(joined);

    /* End-of-generation and FIM tokens (promoted to CONTROL, as llama.cpp does). */
    for (size_t k = 0; k < sizeof EOG_TEXTS / sizeof EOG_TEXTS[0]; k++) {
        int32_t id = str_find(t, EOG_TEXTS[k], strlen(EOG_TEXTS[k]));
        if (id >= 0 && id < nv) {
            t->eog[id] = 1;
            t->type[id] = TOK_TYPE_CONTROL;
        }
    }
    for (size_t k = 0; k < sizeof FIM_TEXTS / sizeof FIM_TEXTS[0]; k++) {
        int32_t id = str_find(t, FIM_TEXTS[k], strlen(FIM_TEXTS[k]));
        if (id >= 0 && id < nv) t->type[id] = TOK_TYPE_CONTROL;
    }
    t->bos = d->bos_id >= 0 && d->bos_id < nv ? d->bos_id : -1;
    t->eos = d->eos_id >= 0 && d->eos_id < nv ? d->eos_id : -1;
    t->unk = d->unk_id >= 0 && d->unk_id < nv ? d->unk_id : -1;
    t->pad = d->pad_id >= 0 && d->pad_id < nv ? d->pad_id : -1;
    t->add_bos = d->add_bos;
    if (t->eos >= 0) t->eog[t->eos] = 1;

    /* Decoded bytes of every token. */
    char *tmp = NULL;
    size_t tmp_cap = 0;
    for (int32_t i = 0; i < nv; i++) {
        const char *s = id_text(t, i);
        size_t n = t->text_len[i];
        size_t need = 64 + n * (n + 32);
        if (t->spm && (t->type[i] == TOK_TYPE_NORMAL || t->type[i] == TOK_TYPE_BYTE)) {
            if (n + 1 > tmp_cap) {
                tmp_cap = n * 2 + 64;
                char *p = realloc(tmp, tmp_cap);
                if (!p) {
                    free(tmp);
                    goto nomem;
                }
                tmp = p;
            }
            n = decode_spm(s, n, t->type[i], tmp);
            s = tmp;
        } else if (!t->spm && t->type[i] == TOK_TYPE_NORMAL) {
            if (need > tmp_cap) {
                tmp_cap = need * 2;
                char *p = realloc(tmp, tmp_cap);
                if (!p) {
                    free(tmp);
                    goto nomem;
                }
                tmp = p;
            }
            n = decode_byte_level(s, n, tmp);
            s = tmp;
        }
        if (arena_put(t, s, n, &t->dec_off[i])) {
            free(tmp);
            goto nomem;
        }
        t->dec_len[i] = (uint32_t)n;
        if (n > t->max_token_len) t->max_token_len = n;
    }
    free(tmp);

    /* Special tokens, longest first (ties by id, for a deterministic order). */
    t->special = malloc(sizeof *t->special * (size_t)nv);
    if (!t->special) goto nomem;
    for (int32_t i = 0; i < nv; i++)
        if (t->type[i] == TOK_TYPE_CONTROL || t->type[i] == TOK_TYPE_USER_DEFINED || t->type[i] == TOK_TYPE_UNKNOWN)
            t->special[t->n_special++] = i;
    for (int i = 1; i < t->n_special; i++) { /* insertion sort: stable, and the list is short */
        int32_t v = t->special[i];
        int j = i;
        while (j > 0 && t->text_len[t->special[j - 1]] < t->text_len[v]) {
            t->special[j] = t->special[j - 1];
            j--;
        }
        t->special[j] = v;
    }
    if (d->special_rstrip) { /* llama.cpp's Phi-3 rule: every special token and </s>, but not these three */
        t->rstrip = calloc((size_t)nv, 1);
        if (!t->rstrip) goto nomem;
        for (int k = 0; k < t->n_special; k++) t->rstrip[t->special[k]] = 1;
        static const char *const set[] = {"</s>"}, *const unset[] = {"<unk>", "<s>", "<|endoftext|>"};
        int32_t id = str_find(t, set[0], strlen(set[0]));
        if (id >= 0 && id < nv) t->rstrip[id] = 1;
        for (size_t k = 0; k < sizeof unset / sizeof unset[0]; k++)
            if ((id = str_find(t, unset[k], strlen(unset[k]))) >= 0 && id < nv) t->rstrip[id] = 0;
    }

    if (d->chat_template) {
        size_t n = d->chat_template_len ? d->chat_template_len : strlen(d->chat_template);
        t->chat_template = malloc(n + 1);
        if (!t->chat_template) goto nomem;
        memcpy(t->chat_template, d->chat_template, n);
        t->chat_template[n] = '\0';
    }
    return t;

nomem:
    fl_fail(err, FL_ENOMEM, "tok_new: out of memory");
fail:
    tok_destroy(&t);
    return NULL;
}

void tok_destroy(tok_t **tp)
{
    if (!tp || !*tp) return;
    tok_t *t = *tp;
    free(t->arena);
    free(t->text_off);
    free(t->text_len);
    free(t->type);
    free(t->dec_off);
    free(t->dec_len);
    free(t->eog);
    free(t->str_slots);
    free(t->merges);
    free(t->special);
    free(t->rstrip);
    free(t->spm_rank);
    free(t->chat_template);
    free(t);
    *tp = NULL;
}

/* ---- GGUF ---- */

static int gguf_str_dup(const gguf_t *g, const char *key, char **out, fl_error_t *err)
{
    const char *s;
    size_t n;
    int rc = gguf_get_str(g, key, &s, &n, err);
    if (rc) return rc;
    *out = malloc(n + 1);
    if (!*out) return fl_fail(err, FL_ENOMEM, "tokenizer: out of memory");
    memcpy(*out, s, n);
    (*out)[n] = '\0';
    return 0;
}

static int gguf_opt_id(const gguf_t *g, const char *key, int32_t *out, fl_error_t *err)
{
    int64_t v;
    int rc = gguf_get_i64(g, key, &v, err);
    if (rc == FL_ENOTFOUND) return 0;
    if (rc) return rc;
    *out = v >= 0 && v <= INT32_MAX ? (int32_t)v : -1;
    return 0;
}

tok_t *tok_new_from_gguf(const gguf_t *g, fl_error_t *err)
{
    tok_t *t = NULL;
    char *model = NULL, *pre = NULL, *tmpl = NULL, *name = NULL;
    const char **tokens = NULL, **merges = NULL;
    size_t *token_lens = NULL, *merge_lens = NULL;
    int32_t *types = NULL;
    float *scores = NULL;
    const char *path = g ? gguf_path(g) : "?";
    if (!g) {
        fl_fail(err, FL_EINVAL, "tok_new_from_gguf: no model");
        return NULL;
    }
    int rc = gguf_str_dup(g, "tokenizer.ggml.model", &model, err);
    if (rc == FL_ENOTFOUND) {
        fl_fail(err, FL_EFORMAT, "%s: no tokenizer.ggml.model key", path);
        goto done;
    }
    if (rc) goto done;
    const bool spm = !strcmp(model, "llama");
    if (!spm && strcmp(model, "gpt2") != 0) {
        const char *what = !strcmp(model, "bert") ? " (WordPiece)" : !strcmp(model, "t5") ? " (Unigram)" : "";
        fl_fail(err, FL_EUNSUPPORTED,
                "%s: tokenizer model '%s'%s is not supported; folio supports byte-level BPE ('gpt2') and "
                "SentencePiece ('llama')",
                path, model, what);
        goto done;
    }
    rc = gguf_str_dup(g, "tokenizer.ggml.pre", &pre, err);
    if (rc && rc != FL_ENOTFOUND) goto done;

    gguf_value_type_t et;
    uint64_t n_vocab = 0, n_merges = 0, n_types = 0;
    if (gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n_vocab, err)) goto done;
    if (et != GGUF_TYPE_STRING || n_vocab == 0 || n_vocab > (1u << 24)) {
        fl_fail(err, FL_EFORMAT, "%s: tokenizer.ggml.tokens must be a non-empty string array (%llu entries)", path,
                (unsigned long long)n_vocab);
        goto done;
    }
    tokens = malloc(sizeof *tokens * n_vocab);
    token_lens = malloc(sizeof *token_lens * n_vocab);
    if (!tokens || !token_lens) goto nomem;
    for (uint64_t i = 0; i < n_vocab; i++)
        if (gguf_arr_str(g, "tokenizer.ggml.tokens", i, &tokens[i], &token_lens[i])) {
            fl_fail(err, FL_EFORMAT, "%s: tokenizer.ggml.tokens[%llu] unreadable", path, (unsigned long long)i);
            goto done;
        }
    if (!spm) { /* SentencePiece merges by score, not by a merge list */
        rc = gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n_merges, err);
        if (rc == FL_ENOTFOUND) {
            fl_fail(err, FL_EFORMAT, "%s: BPE tokenizer without tokenizer.ggml.merges", path);
            goto done;
        }
        if (rc) goto done;
        if (et != GGUF_TYPE_STRING || n_merges > (1u << 24)) {
            fl_fail(err, FL_EFORMAT, "%s: tokenizer.ggml.merges must be a string array", path);
            goto done;
        }
    }
    merges = malloc(sizeof *merges * (n_merges + 1));
    merge_lens = malloc(sizeof *merge_lens * (n_merges + 1));
    if (!merges || !merge_lens) goto nomem;
    for (uint64_t i = 0; i < n_merges; i++)
        if (gguf_arr_str(g, "tokenizer.ggml.merges", i, &merges[i], &merge_lens[i])) {
            fl_fail(err, FL_EFORMAT, "%s: tokenizer.ggml.merges[%llu] unreadable", path, (unsigned long long)i);
            goto done;
        }
    rc = gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types, err);
    if (rc == 0) {
        const uint8_t *raw = gguf_arr_data(g, "tokenizer.ggml.token_type");
        if (n_types != n_vocab || !raw || (et != GGUF_TYPE_INT32 && et != GGUF_TYPE_UINT32)) {
            fl_fail(err, FL_EFORMAT, "%s: tokenizer.ggml.token_type must be %llu int32 values", path,
                    (unsigned long long)n_vocab);
            goto done;
        }
        types = malloc(sizeof *types * n_vocab);
        if (!types) goto nomem;
        memcpy(types, raw, sizeof *types * n_vocab); /* little-endian host assumed, as gguf.c */
    } else if (rc != FL_ENOTFOUND)
        goto done;
    uint64_t n_scores = 0;
    rc = gguf_get_arr(g, "tokenizer.ggml.scores", &et, &n_scores, err);
    if (rc == 0) {
        const uint8_t *raw = gguf_arr_data(g, "tokenizer.ggml.scores");
        if (n_scores != n_vocab || !raw || et != GGUF_TYPE_FLOAT32) {
            fl_fail(err, FL_EFORMAT, "%s: tokenizer.ggml.scores must be %llu float32 values", path,
                    (unsigned long long)n_vocab);
            goto done;
        }
        scores = malloc(sizeof *scores * n_vocab);
        if (!scores) goto nomem;
        memcpy(scores, raw, sizeof *scores * n_vocab); /* unaligned in the file */
    } else if (rc != FL_ENOTFOUND)
        goto done;

    tok_desc_t d = {
        .n_vocab = (int32_t)n_vocab,
        .tokens = tokens,
        .token_lens = token_lens,
        .token_types = types,
        .n_merges = (int32_t)n_merges,
        .merges = merges,
        .merge_lens = merge_lens,
        .pre = pre ? pre : "default",
        .bos_id = spm ? 1 : 11, /* llama.cpp's defaults */
        .eos_id = spm ? 2 : 11,
        .unk_id = spm ? 0 : -1,
        .pad_id = -1,
        .add_bos = spm,
        .spm = spm,
        .scores = scores,
        .add_space_prefix = spm,
    };
    bool add_bos_set = false;
    if (gguf_opt_id(g, "tokenizer.ggml.bos_token_id", &d.bos_id, err) ||
        gguf_opt_id(g, "tokenizer.ggml.eos_token_id", &d.eos_id, err) ||
        gguf_opt_id(g, "tokenizer.ggml.unknown_token_id", &d.unk_id, err) ||
        gguf_opt_id(g, "tokenizer.ggml.padding_token_id", &d.pad_id, err))
        goto done;
    rc = gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &d.add_bos, err);
    if (rc == 0)
        add_bos_set = true;
    else if (rc != FL_ENOTFOUND)
        goto done;
    if (!add_bos_set && !spm) d.add_bos = pretok_add_bos(pretok_find(d.pre));
    rc = gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &d.add_space_prefix, err);
    if (rc && rc != FL_ENOTFOUND) goto done;
    /* llama.cpp marks Phi-3's special tokens rstrip by the model's name */
    rc = gguf_str_dup(g, "general.name", &name, err);
    if (rc && rc != FL_ENOTFOUND) goto done;
    for (char *c = name; c && *c; c++) *c = (char)tolower((unsigned char)*c);
    d.special_rstrip = name && (strstr(name, "phi-3") || strstr(name, "phi3"));
    rc = gguf_str_dup(g, "tokenizer.chat_template", &tmpl, err);
    if (rc && rc != FL_ENOTFOUND) goto done;
    d.chat_template = tmpl;

    fl_error_t e2 = {0};
    t = tok_new(&d, &e2);
    if (!t) fl_fail(err, e2.code, "%s: %s", path, e2.msg);
    goto done;
nomem:
    fl_fail(err, FL_ENOMEM, "%s: out of memory reading the tokenizer", path);
done:
    free(model);
    free(name);
    free(pre);
    free(tmpl);
    free(tokens);
    free(token_lens);
    free(merges);
    free(merge_lens);
    free(types);
    free(scores);
    return t;
}

/* ---- accessors ---- */

int32_t tok_n_vocab(const tok_t *t) { return t ? t->n_vocab : 0; }
int32_t tok_bos(const tok_t *t) { return t ? t->bos : -1; }
int32_t tok_eos(const tok_t *t) { return t ? t->eos : -1; }
int32_t tok_unk(const tok_t *t) { return t ? t->unk : -1; }
int32_t tok_pad(const tok_t *t) { return t ? t->pad : -1; }
bool tok_add_bos(const tok_t *t) { return t && t->add_bos; }
size_t tok_max_token_len(const tok_t *t) { return t ? t->max_token_len : 0; }
const char *tok_pre(const tok_t *t) { return t ? t->pre_name : NULL; }
const char *tok_chat_template(const tok_t *t) { return t ? t->chat_template : NULL; }
static bool valid_id(const tok_t *t, int32_t id) { return t && id >= 0 && id < t->n_vocab; }
bool tok_is_eog(const tok_t *t, int32_t id) { return valid_id(t, id) && t->eog[id]; }
bool tok_is_control(const tok_t *t, int32_t id) { return valid_id(t, id) && t->type[id] == TOK_TYPE_CONTROL; }
tok_type_t tok_type(const tok_t *t, int32_t id) { return valid_id(t, id) ? (tok_type_t)t->type[id] : TOK_TYPE_UNDEFINED; }
const char *tok_piece(const tok_t *t, int32_t id) { return valid_id(t, id) ? id_text(t, id) : NULL; }

int32_t tok_find(const tok_t *t, const char *s, size_t len)
{
    if (!t || (!s && len)) return -1;
    int32_t id = str_find(t, s ? s : "", len);
    return id < t->n_vocab ? id : -1;
}

/* ---- encoding ---- */

typedef struct {
    int32_t rank, left, right, lid, rid, result;
} bigram_t;

/* Per-call scratch, sized from the text length. */
typedef struct {
    uint32_t *cps;
    uint8_t *fl;
    int32_t *seg_a, *seg_b; /* word lengths in code points */
    char *word;             /* one word's UTF-8 bytes */
    char *spelled;          /* its byte-level spelling (ignore_merges lookup) */
    int32_t *sym_id, *sym_prev, *sym_next;
    int32_t *sym_off; /* SentencePiece: where each symbol starts (sym_id holds its length) */
    bigram_t *heap;
    int n_heap;
    size_t word_cap; /* bytes the per-word buffers above hold */
    bool oom;
} scratch_t;

/* Grows the per-word buffers to a word of n bytes: symbols <= n, heap entries <= 3n (n - 1 initial
 * pairs, at most two more per merge). */
static bool word_grow(scratch_t *s, size_t n)
{
    size_t c = s->word_cap ? s->word_cap : 64;
    while (c < n) c *= 2;
    char *w = realloc(s->spelled, 2 * c + 8);
    if (!w) return false;
    s->spelled = w;
    int32_t *a = realloc(s->sym_id, sizeof *a * c);
    if (!a) return false;
    s->sym_id = a;
    a = realloc(s->sym_prev, sizeof *a * c);
    if (!a) return false;
    s->sym_prev = a;
    a = realloc(s->sym_next, sizeof *a * c);
    if (!a) return false;
    s->sym_next = a;
    a = realloc(s->sym_off, sizeof *a * c);
    if (!a) return false;
    s->sym_off = a;
    bigram_t *h = realloc(s->heap, sizeof *h * (3 * c + 4));
    if (!h) return false;
    s->heap = h;
    s->word_cap = c;
    return true;
}

static inline bool word_reserve(scratch_t *s, size_t n) { return n <= s->word_cap || word_grow(s, n); }

static bool bigram_less(const bigram_t *a, const bigram_t *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

/* Inlined: the BPE and SentencePiece loops both call them once per merge. */
static inline __attribute__((always_inline)) void heap_push(scratch_t *s, bigram_t b)
{
    int i = s->n_heap++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!bigram_less(&b, &s->heap[p])) break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = b;
}

static inline __attribute__((always_inline)) bigram_t heap_pop(scratch_t *s)
{
    bigram_t top = s->heap[0], last = s->heap[--s->n_heap];
    int i = 0, n = s->n_heap;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && bigram_less(&s->heap[c + 1], &s->heap[c])) c++;
        if (!bigram_less(&s->heap[c], &last)) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n > 0) s->heap[i] = last;
    return top;
}

typedef struct {
    int32_t *out;
    int cap;
    int n;
} emit_t;

static void emit(emit_t *e, int32_t id)
{
    if (e->n < e->cap) e->out[e->n] = id;
    e->n++;
}

static void emit_symbol(const tok_t *t, emit_t *e, int32_t id)
{
    if (id < t->n_vocab) {
        emit(e, id);
        return;
    }
    /* Not a vocab string: llama.cpp emits whichever of its single bytes are tokens. */
    const char *s = id_text(t, id);
    for (uint32_t k = 0; k < t->text_len[id]; k++) {
        int32_t b = str_find(t, s + k, 1);
        if (b >= 0 && b < t->n_vocab) emit(e, b);
    }
}

static void try_bigram(const tok_t *t, scratch_t *s, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return;
    int32_t a = s->sym_id[left], b = s->sym_id[right];
    uint64_t key = merge_key(a, b);
    size_t i = mix64(key) & t->merge_mask;
    for (;; i = (i + 1) & t->merge_mask) {
        const merge_slot_t *m = &t->merges[i];
        if (m->key == 0) return;
        if (m->key == key) {
            heap_push(s, (bigram_t){m->rank, left, right, a, b, m->result});
            return;
        }
    }
}

static void bpe_word(const tok_t *t, scratch_t *s, const char *w, int n, emit_t *e)
{
    if (!word_reserve(s, (size_t)n)) {
        s->oom = true;
        return;
    }
    if (t->ignore_merges) {
        int o = 0;
        for (int i = 0; i < n; i++) {
            char u[4];
            int k = unicode_encode_utf8(unicode_byte_to_cp((uint8_t)w[i]), u);
            memcpy(s->spelled + o, u, (size_t)k);
            o += k;
        }
        int32_t id = str_find(t, s->spelled, (size_t)o);
        if (id >= 0 && id < t->n_vocab) {
            emit(e, id);
            return;
        }
    }
    for (int i = 0; i < n; i++) {
        s->sym_id[i] = t->byte_id[(uint8_t)w[i]];
        s->sym_prev[i] = i - 1;
        s->sym_next[i] = i + 1 < n ? i + 1 : -1;
    }
    s->n_heap = 0;
    for (int i = 1; i < n; i++) try_bigram(t, s, i - 1, i);
    while (s->n_heap > 0) {
        bigram_t b = heap_pop(s);
        if (s->sym_id[b.left] != b.lid || s->sym_id[b.right] != b.rid || s->sym_next[b.left] != b.right) continue;
        s->sym_id[b.left] = b.result;
        s->sym_id[b.right] = -1;
        s->sym_next[b.left] = s->sym_next[b.right];
        if (s->sym_next[b.right] >= 0) s->sym_prev[s->sym_next[b.right]] = b.left;
        s->sym_next[b.right] = -2; /* dead: never matches a pushed right */
        try_bigram(t, s, s->sym_prev[b.left], b.left);
        try_bigram(t, s, b.left, s->sym_next[b.left]);
    }
    for (int i = 0; i >= 0 && i < n; i = s->sym_next[i]) emit_symbol(t, e, s->sym_id[i]);
}

/* Pre-tokenizes and BPE-encodes one raw fragment. */
static void encode_fragment(const tok_t *t, scratch_t *s, const char *text, size_t len, emit_t *e)
{
    int32_t n = 0;
    for (size_t pos = 0; pos < len;) {
        uint32_t cp = unicode_decode_utf8(text, len, &pos);
        s->cps[n] = cp;
        s->fl[n] = (uint8_t)unicode_flags(cp);
        n++;
    }
    if (n == 0) return;
    const int32_t *a;
    const int na = pretok_split(t->pre, s->cps, s->fl, n, s->seg_a, s->seg_b, &a);
    int32_t c = 0;
    for (int k = 0; k < na; k++) {
        int wl = 0;
        for (int32_t i = c; i < c + a[k]; i++) {
            int l = unicode_encode_utf8(s->cps[i], s->word + wl);
            if (l == 0) l = unicode_encode_utf8(UNICODE_REPLACEMENT, s->word + wl); /* llama.cpp aborts here */
            wl += l;
        }
        c += a[k];
        bpe_word(t, s, s->word, wl, e);
    }
}

/* SentencePiece: the bigram of symbols left and right when the vocab spells their joined text. The
 * heap's order (rank = score order, then leftmost) is llama.cpp's; result holds the joined length,
 * which tells a stale entry as llama.cpp does (a side emptied or grown since). */
static void spm_try_bigram(const tok_t *t, scratch_t *s, const char *w, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return;
    const int32_t n = s->sym_id[left] + s->sym_id[right];
    const int32_t id = str_find(t, w + s->sym_off[left], (size_t)n);
    if (id < 0 || id >= t->n_vocab) return;
    heap_push(s, (bigram_t){t->spm_rank[id], left, right, 0, 0, n});
}

/* llm_tokenizer_spm_session::tokenize of w[0..n) (spaces already written as U+2581). */
static void spm_word(const tok_t *t, scratch_t *s, const char *w, int n, emit_t *e)
{
    if (!word_reserve(s, (size_t)n)) {
        s->oom = true;
        return;
    }
    int k = 0;
    for (int off = 0; off < n; k++) { /* one symbol per UTF-8 character, cut short at the end */
        int l = unicode_utf8_len((uint8_t)w[off]);
        if (l > n - off) l = n - off;
        s->sym_off[k] = off;
        s->sym_id[k] = l;
        s->sym_prev[k] = k - 1;
        off += l;
        s->sym_next[k] = off == n ? -1 : k + 1;
    }
    s->n_heap = 0;
    for (int i = 1; i < k; i++) spm_try_bigram(t, s, w, i - 1, i);
    while (s->n_heap > 0) {
        const bigram_t b = heap_pop(s);
        int32_t *len = s->sym_id;
        if (len[b.left] == 0 || len[b.right] == 0 || len[b.left] + len[b.right] != b.result) continue;
        len[b.left] += len[b.right];
        len[b.right] = 0;
        s->sym_next[b.left] = s->sym_next[b.right];
        if (s->sym_next[b.right] >= 0) s->sym_prev[s->sym_next[b.right]] = b.left;
        spm_try_bigram(t, s, w, s->sym_prev[b.left], b.left);
        spm_try_bigram(t, s, w, b.left, s->sym_next[b.left]);
    }
    for (int i = 0; i >= 0 && k > 0; i = s->sym_next[i]) {
        const char *p = w + s->sym_off[i];
        const int32_t id = str_find(t, p, (size_t)s->sym_id[i]);
        if (id >= 0 && id < t->n_vocab) {
            emit(e, id);
            continue;
        }
        for (int32_t j = 0; j < s->sym_id[i]; j++) { /* byte fallback; llama.cpp throws without a byte token */
            const int32_t bt = t->byte_id[(uint8_t)p[j]];
            if (bt >= 0 || t->unk >= 0) emit(e, bt >= 0 ? bt : t->unk);
        }
    }
}

/* A SentencePiece text piece: a space first when asked, every space written as U+2581. */
static void spm_fragment(const tok_t *t, scratch_t *s, const char *text, size_t len, bool space_first, emit_t *e)
{
    int n = 0;
    for (size_t i = 0; i < len + space_first; i++) {
        const char c = i == 0 && space_first ? ' ' : text[i - space_first];
        if (c == ' ') {
            memcpy(s->word + n, "\xE2\x96\x81", 3);
            n += 3;
        } else
            s->word[n++] = c;
    }
    spm_word(t, s, s->word, n, e);
}

typedef struct {
    size_t off, len;
    int32_t id; /* -1: raw text */
} frag_t;

static const char *find_bytes(const char *hay, size_t n, const char *needle, size_t m)
{
    if (m == 0 || m > n) return NULL;
    const char *p = hay, *last = hay + (n - m);
    while (p <= last) {
        p = memchr(p, needle[0], (size_t)(last - p) + 1);
        if (!p) return NULL;
        if (memcmp(p, needle, m) == 0) return p;
        p++;
    }
    return NULL;
}

/* Whether [at, at + n) overlaps one of plain[0..n_plain) (sorted, disjoint, none empty). */
static bool in_plain(const tok_span_t *plain, int n_plain, size_t at, size_t n)
{
    int lo = 0, hi = n_plain; /* the first span ending after at */
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (plain[mid].off + plain[mid].len > at)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo < n_plain && plain[lo].off < at + n;
}

static int encode(const tok_t *t, const char *text, size_t len, bool add_bos, bool parse_special,
                  const tok_span_t *plain, int n_plain, int32_t *out, int cap)
{
    if (!t || (!text && len) || cap < 0 || (!out && cap > 0) || n_plain < 0 || (n_plain && !plain))
        return FL_EINVAL;
    if (len > (size_t)INT32_MAX / 2) return FL_ERANGE;
    for (int i = 0; i < n_plain; i++)
        if (plain[i].len == 0 || plain[i].off > len || plain[i].len > len - plain[i].off ||
            (i && plain[i].off < plain[i - 1].off + plain[i - 1].len))
            return FL_EINVAL;
    emit_t e = {out, cap, 0};
    if (add_bos && t->bos >= 0) emit(&e, t->bos);
    if (len == 0) return e.n;

    /* 1. special tokens */
    size_t n_frag = 1;
    frag_t *fr = malloc(sizeof *fr), *nf = NULL;
    if (!fr) return FL_ENOMEM;
    fr[0] = (frag_t){0, len, -1};
    for (int k = 0; k < t->n_special; k++) {
        int32_t sid = t->special[k];
        uint8_t ty = t->type[sid];
        const bool control = ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNKNOWN;
        if (!parse_special && control) continue;
        const int n_mask = control ? n_plain : 0; /* user-defined tokens split out everywhere */
        const char *st = id_text(t, sid);
        size_t sl = t->text_len[sid];
        size_t n_new = 0, new_cap = 0;
        nf = NULL;
        for (size_t f = 0; f < n_frag; f++) {
            size_t off = fr[f].off, flen = fr[f].len;
            for (;;) {
                const char *m = NULL;
                for (size_t from = off; fr[f].id < 0; from = (size_t)(m - text) + 1) {
                    m = find_bytes(text + from, off + flen - from, st, sl);
                    if (!m || !in_plain(plain, n_mask, (size_t)(m - text), sl)) break;
                }
                size_t need = n_new + 3;
                if (need > new_cap) {
                    new_cap = need * 2 + n_frag;
                    frag_t *p = realloc(nf, sizeof *nf * new_cap);
                    if (!p) {
                        free(nf);
                        free(fr);
                        return FL_ENOMEM;
                    }
                    nf = p;
                }
                if (!m) {
                    if (fr[f].id >= 0)
                        nf[n_new++] = fr[f];
                    else if (flen > 0)
                        nf[n_new++] = (frag_t){off, flen, -1};
                    break;
                }
                size_t at = (size_t)(m - text);
                if (at > off) nf[n_new++] = (frag_t){off, at - off, -1};
                nf[n_new++] = (frag_t){at, sl, sid};
                flen -= at + sl - off;
                off = at + sl;
                if (t->rstrip && t->rstrip[sid]) /* isspace in the C locale, as llama.cpp */
                    for (; flen > 0 && strchr(" \t\n\v\f\r", text[off]) && text[off]; off++) flen--;
            }
        }
        free(fr);
        fr = nf;
        n_frag = n_new;
    }

    /* 2-3. pre-tokenize and BPE each raw fragment */
    size_t max_raw = 0;
    for (size_t f = 0; f < n_frag; f++)
        if (fr[f].id < 0 && fr[f].len > max_raw) max_raw = fr[f].len;
    scratch_t s = {0};
    if (max_raw > 0) {
        size_t n = max_raw; /* code points <= bytes; a word's UTF-8 <= 3 bytes per input byte (U+FFFD) */
        s.cps = malloc(sizeof *s.cps * n);
        s.fl = malloc(n);
        s.seg_a = malloc(sizeof *s.seg_a * n);
        s.seg_b = malloc(sizeof *s.seg_b * n);
        s.word = malloc(3 * n + 4);
        if (!s.cps || !s.fl || !s.seg_a || !s.seg_b || !s.word) {
            e.n = FL_ENOMEM;
            goto out;
        }
    }
    bool after_special = true; /* SentencePiece: text that starts or follows a special token */
    for (size_t f = 0; f < n_frag; f++) {
        if (fr[f].id >= 0)
            emit(&e, fr[f].id);
        else if (t->spm)
            spm_fragment(t, &s, text + fr[f].off, fr[f].len, t->add_space_prefix && after_special, &e);
        else
            encode_fragment(t, &s, text + fr[f].off, fr[f].len, &e);
        after_special = fr[f].id >= 0;
    }
    if (s.oom) e.n = FL_ENOMEM;
out:
    free(s.cps);
    free(s.fl);
    free(s.seg_a);
    free(s.seg_b);
    free(s.word);
    free(s.spelled);
    free(s.sym_id);
    free(s.sym_prev);
    free(s.sym_next);
    free(s.sym_off);
    free(s.heap);
    free(fr);
    return e.n;
}

int tok_encode(const tok_t *t, const char *text, size_t len, bool add_bos, bool parse_special, int32_t *out,
               int cap)
{
    return encode(t, text, len, add_bos, parse_special, NULL, 0, out, cap);
}

int tok_encode_plain_spans(const tok_t *t, const char *text, size_t len, bool add_bos, const tok_span_t *plain,
                           int n_plain, int32_t *out, int cap)
{
    return encode(t, text, len, add_bos, true, plain, n_plain, out, cap);
}

/* ---- decoding ---- */

/* The bytes id shows as (borrowed), per llama.cpp's token_to_piece for BPE vocabularies. */
static size_t piece_bytes(const tok_t *t, int32_t id, bool special, const char **p)
{
    uint8_t ty = t->type[id];
    bool shown = ty == TOK_TYPE_NORMAL || ty == TOK_TYPE_USER_DEFINED || (ty == TOK_TYPE_BYTE && t->spm) ||
                 (special && (ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNKNOWN));
    *p = t->arena + t->dec_off[id];
    return shown ? t->dec_len[id] : 0;
}

int tok_token_bytes(const tok_t *t, int32_t id, bool special, char *buf, size_t cap)
{
    if (!valid_id(t, id) || (!buf && cap)) return FL_EINVAL;
    const char *p;
    size_t n = piece_bytes(t, id, special, &p);
    if (n <= cap && n) memcpy(buf, p, n);
    return (int)n;
}

int tok_decode(const tok_t *t, const int32_t *ids, int n, bool special, char *out, size_t cap)
{
    if (!t || n < 0 || (!ids && n) || (!out && cap)) return FL_EINVAL;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (!valid_id(t, ids[i])) return FL_EINVAL;
        const char *p;
        size_t k = piece_bytes(t, ids[i], special, &p);
        if (total < cap) memcpy(out + total, p, k < cap - total ? k : cap - total);
        total += k;
        if (total > INT_MAX) return FL_ERANGE;
    }
    return (int)total;
}

void tok_stream_init(tok_stream_t *s, bool special)
{
    if (!s) return;
    memset(s, 0, sizeof *s);
    s->special = special;
}

static const char REPL[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

int tok_stream_push(tok_stream_t *s, const tok_t *t, int32_t id, char *out, size_t cap)
{
    if (!s || !valid_id(t, id) || (!out && cap) || s->n_pending < 0 || s->n_pending > 3) return FL_EINVAL;
    const char *pc;
    size_t np = piece_bytes(t, id, s->special, &pc);
    const uint8_t *p = (const uint8_t *)pc;
    /* Walk pending ++ piece without copying it; b(i) is byte i of the concatenation. */
    size_t total = (size_t)s->n_pending + np;
#define BYTE(i) ((i) < (size_t)s->n_pending ? s->pending[i] : p[(i) - (size_t)s->n_pending])
    /* First pass: how much output, and where the held-back tail starts. */
    size_t need = 0, i = 0, hold = total;
    while (i < total) {
        uint8_t w[4];
        size_t avail = total - i < 4 ? total - i : 4;
        for (size_t k = 0; k < avail; k++) w[k] = BYTE(i + k);
        int l = unicode_utf8_valid_prefix(w, avail);
        if (l > 0) {
            need += (size_t)l;
            i += (size_t)l;
        } else if (l < 0) {
            hold = i;
            break;
        } else {
            need += 3;
            i++;
        }
    }
    if (need > cap) return FL_ERANGE;
    size_t o = 0;
    i = 0;
    while (i < hold) {
        uint8_t w[4];
        size_t avail = total - i < 4 ? total - i : 4;
        for (size_t k = 0; k < avail; k++) w[k] = BYTE(i + k);
        int l = unicode_utf8_valid_prefix(w, avail);
        if (l > 0) {
            memcpy(out + o, w, (size_t)l);
            o += (size_t)l;
            i += (size_t)l;
        } else {
            memcpy(out + o, REPL, 3);
            o += 3;
            i++;
        }
    }
    uint8_t keep[4];
    int nk = 0;
    for (size_t k = hold; k < total; k++) keep[nk++] = BYTE(k);
#undef BYTE
    memcpy(s->pending, keep, (size_t)nk);
    s->n_pending = nk;
    return (int)o;
}

int tok_stream_flush(tok_stream_t *s, char *out, size_t cap)
{
    if (!s || (!out && cap) || s->n_pending < 0 || s->n_pending > 3) return FL_EINVAL;
    size_t need = 3 * (size_t)s->n_pending;
    if (need > cap) return FL_ERANGE;
    for (int k = 0; k < s->n_pending; k++) memcpy(out + 3 * k, REPL, 3);
    s->n_pending = 0;
    return (int)need;
}
