/* chat_template.c - the chat templates folio renders (see tokenizer.h), and a prompt's token ids.
 *
 * folio does not run Jinja: it recognises the two template families it renders by their markers
 * (ChatML's "<|im_start|>", Llama 3's "<|start_header_id|>") and writes them out in C. The only thing
 * read from the template's text is a ChatML template's default system message. A template is
 * recognised from tok_chat_template(t) on each call (a few string searches, next to tokenizing the
 * result), so the tokenizer needs to know nothing about templates.
 *
 * tok_encode_prompt is where the special-token rule for prompts lives: a raw prompt's marker
 * spellings become special tokens unless plain_text; in a chat, only the template's own markers do,
 * the text a user wrote (roles, contents) is marked plain for tok_encode_plain_spans. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

typedef enum { CHAT_NONE, CHAT_CHATML, CHAT_LLAMA3, CHAT_UNKNOWN } chat_kind_t;

typedef struct {
    chat_kind_t kind;
    char *default_system; /* ChatML: text the template inserts when messages[0] is not system */
} chat_t;

/* Parses the Jinja string literal at p (quote char first) into a new string; NULL if malformed. */
static char *jinja_string(const char *p, const char *end)
{
    if (p >= end || (*p != '\'' && *p != '"')) return NULL;
    char q = *p++;
    char *out = malloc((size_t)(end - p) + 1);
    if (!out) return NULL;
    size_t o = 0;
    while (p < end && *p != q) {
        if (*p == '\\' && p + 1 < end) {
            p++;
            switch (*p) {
            case 'n': out[o++] = '\n'; break;
            case 't': out[o++] = '\t'; break;
            case 'r': out[o++] = '\r'; break;
            default: out[o++] = *p; break; /* \\ \' \" */
            }
            p++;
        } else
            out[o++] = *p++;
    }
    if (p >= end) {
        free(out);
        return NULL;
    }
    out[o] = '\0';
    return out;
}

/* Recognises t's template; chat_free releases what it filled. */
static chat_t chat_parse(const tok_t *t)
{
    chat_t ch = {CHAT_NONE, NULL};
    const char *tp = tok_chat_template(t);
    if (!tp) return ch;
    if (strstr(tp, "<|im_start|>")) {
        ch.kind = CHAT_CHATML;
        static const char *const conds[] = {"messages[0]['role'] != 'system'", "messages[0][\"role\"] != \"system\"",
                                            "messages[0].role != 'system'", "messages[0].role != \"system\""};
        const char *c = NULL;
        for (size_t k = 0; k < sizeof conds / sizeof conds[0] && !c; k++) c = strstr(tp, conds[k]);
        if (c) {
            /* the default system message: the first string literal printed after the condition */
            const char *end = tp + strlen(tp);
            const char *blk = strstr(c, "{{");
            const char *q = blk ? blk + 2 : NULL;
            while (q && q < end && (*q == ' ' || *q == '-')) q++;
            char *sys = q ? jinja_string(q, end) : NULL;
            if (!sys) {
                ch.kind = CHAT_UNKNOWN; /* reported by tok_chat_supported / tok_chat_apply */
                return ch;
            }
            ch.default_system = sys;
        }
    } else if (strstr(tp, "<|start_header_id|>"))
        ch.kind = CHAT_LLAMA3;
    else
        ch.kind = CHAT_UNKNOWN;
    return ch;
}

static void chat_free(chat_t *ch)
{
    free(ch->default_system);
    ch->default_system = NULL;
}

int tok_chat_supported(const tok_t *t, fl_error_t *err)
{
    if (!t) return fl_fail(err, FL_EINVAL, "tok_chat_supported: no tokenizer");
    chat_t ch = chat_parse(t);
    chat_free(&ch);
    switch (ch.kind) {
    case CHAT_CHATML:
    case CHAT_LLAMA3: return 0;
    case CHAT_NONE: return fl_fail(err, FL_EUNSUPPORTED, "chat template: the model has no tokenizer.chat_template");
    default:
        return fl_fail(err, FL_EUNSUPPORTED,
                       "chat template: not recognised (folio renders ChatML and Llama 3 templates): \"%.120s\"",
                       tok_chat_template(t));
    }
}

typedef struct {
    char *out;
    size_t cap, n;
    tok_span_t *spans; /* NULL, or room for two per message: where each role and content went */
    int n_spans;
} sbuf_t;

static void put(sbuf_t *b, const char *s, size_t n)
{
    if (b->n + n < b->cap) memcpy(b->out + b->n, s, n);
    b->n += n;
}
static void puts_(sbuf_t *b, const char *s) { put(b, s, strlen(s)); }

/* Text the user wrote: recorded as a plain span. */
static void put_user(sbuf_t *b, const char *s, size_t n)
{
    if (b->spans && n) b->spans[b->n_spans++] = (tok_span_t){b->n, n};
    put(b, s, n);
}

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* Renders msgs into b; returns the length, FL_EINVAL or FL_EUNSUPPORTED. */
static int render(const chat_t *ch, const tok_chat_msg_t *msgs, int n, bool add_generation_prompt, sbuf_t *b)
{
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content) return FL_EINVAL;
    if (ch->kind != CHAT_CHATML && ch->kind != CHAT_LLAMA3) return FL_EUNSUPPORTED;
    if (ch->kind == CHAT_CHATML) {
        for (int i = 0; i < n; i++) {
            if (i == 0 && ch->default_system && strcmp(msgs[0].role, "system") != 0) puts_(b, ch->default_system);
            puts_(b, "<|im_start|>");
            put_user(b, msgs[i].role, strlen(msgs[i].role));
            puts_(b, "\n");
            put_user(b, msgs[i].content, strlen(msgs[i].content));
            puts_(b, "<|im_end|>\n");
        }
        if (add_generation_prompt) puts_(b, "<|im_start|>assistant\n");
    } else {
        for (int i = 0; i < n; i++) {
            const char *c = msgs[i].content, *e = c + strlen(c);
            while (c < e && is_ws(*c)) c++;
            while (e > c && is_ws(e[-1])) e--;
            puts_(b, "<|start_header_id|>");
            put_user(b, msgs[i].role, strlen(msgs[i].role));
            puts_(b, "<|end_header_id|>\n\n");
            put_user(b, c, (size_t)(e - c));
            puts_(b, "<|eot_id|>");
        }
        if (add_generation_prompt) puts_(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    if (b->n > INT_MAX - 1) return FL_ERANGE;
    if (b->n < b->cap) b->out[b->n] = '\0';
    return (int)b->n;
}

int tok_chat_apply(const tok_t *t, const tok_chat_msg_t *msgs, int n, bool add_generation_prompt, char *out,
                   size_t cap)
{
    if (!t || n < 0 || (!msgs && n) || (!out && cap)) return FL_EINVAL;
    chat_t ch = chat_parse(t);
    sbuf_t b = {out, cap, 0, NULL, 0};
    const int len = render(&ch, msgs, n, add_generation_prompt, &b);
    chat_free(&ch);
    return len;
}

int tok_encode_prompt(const tok_t *t, const char *text, size_t len, bool plain_text, const tok_chat_msg_t *msgs,
                      int n_msgs, int32_t **ids, int *cap, fl_error_t *err)
{
    if (!t || !ids || !cap || n_msgs < 0 || n_msgs > INT_MAX / 2 || (n_msgs == 0 && !text && len) ||
        (n_msgs > 0 && !msgs))
        return fl_fail(err, FL_EINVAL, "tok_encode_prompt: bad arguments");
    char stack[4096], *templated = NULL;
    tok_span_t *spans = NULL;
    const char *src = text ? text : "";
    const bool chat = n_msgs > 0;
    int n_spans = 0, count;
    if (chat) {
        chat_t ch = chat_parse(t);
        spans = malloc(2 * (size_t)n_msgs * sizeof *spans);
        sbuf_t b = {stack, sizeof stack, 0, spans, 0};
        int n = spans ? render(&ch, msgs, n_msgs, true, &b) : FL_ENOMEM;
        if (n >= 0 && (size_t)n >= sizeof stack) {
            b = (sbuf_t){templated = malloc((size_t)n + 1), (size_t)n + 1, 0, spans, 0};
            n = templated ? render(&ch, msgs, n_msgs, true, &b) : FL_ENOMEM;
        }
        chat_free(&ch);
        if (n < 0) {
            count = fl_fail(err, n, "cannot apply the model's chat template (%s)", fl_strerror(n));
            goto done;
        }
        src = templated ? templated : stack;
        len = (size_t)n;
        n_spans = b.n_spans;
    }
    if (len > INT32_MAX / 2 - 16) {
        count = fl_fail(err, FL_ERANGE, "prompt of %zu bytes is too long", len);
        goto done;
    }
    /* Byte-level BPE gives at most one token per byte of valid UTF-8, plus BOS; an invalid byte
     * becomes U+FFFD, up to three tokens, and a second pass then has the exact count. */
    int need = (int)len + 16;
    for (;;) {
        if (*cap < need) {
            int32_t *p = realloc(*ids, (size_t)need * sizeof *p);
            if (!p) {
                count = fl_fail(err, FL_ENOMEM, "out of memory for %d prompt tokens", need);
                break;
            }
            *ids = p;
            *cap = need;
        }
        count = chat ? tok_encode_plain_spans(t, src, len, tok_add_bos(t), spans, n_spans, *ids, *cap)
                     : tok_encode(t, src, len, tok_add_bos(t), !plain_text, *ids, *cap);
        if (count < 0) count = fl_fail(err, count, "tokenizing the prompt failed (%s)", fl_strerror(count));
        if (count <= *cap) break;
        need = count;
    }
done:
    free(templated);
    free(spans);
    return count;
}
