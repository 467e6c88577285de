/* chat_template.c - the chat templates folio renders (see tokenizer.h), and a prompt's token ids.
 *
 * folio does not run Jinja: as llama.cpp's llama_chat_apply_template does, it recognises a template
 * family by the markers in the template's text (llm_chat_detect_template's tests, in its order) and
 * writes the family's format out in C, as llm_chat_apply_template does: ChatML (and Phi-4's and
 * SmolVLM's variants of it), Mistral's [INST] formats (v1, v3, v3-tekken, v7) and Llama 2's, Phi-3,
 * Gemma, Command-R and Llama 3; a template llama.cpp gives to another family is not rendered. The one
 * departure: a ChatML template's default system message (what Qwen's and SmolLM's templates write
 * when messages[0] is not 'system') is read from the template's text and written, as the template
 * itself would (llama.cpp's built-in ChatML leaves it out). A template is
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

typedef enum {
    CHAT_NONE,
    CHAT_UNKNOWN,
    CHAT_CHATML,
    CHAT_PHI4,
    CHAT_SMOLVLM,
    CHAT_MISTRAL_V1,
    CHAT_MISTRAL_V3,
    CHAT_MISTRAL_V3_TEKKEN,
    CHAT_MISTRAL_V7,
    CHAT_MISTRAL_V7_TEKKEN,
    CHAT_LLAMA2,
    CHAT_LLAMA2_SYS,
    CHAT_LLAMA2_SYS_BOS,
    CHAT_LLAMA2_SYS_STRIP,
    CHAT_PHI3,
    CHAT_GEMMA,
    CHAT_COMMAND_R,
    CHAT_LLAMA3,
} chat_kind_t;

/* llama.cpp's template names (a GGUF's template may be just one of them). */
static const struct {
    const char *name;
    chat_kind_t kind;
} CHAT_NAMES[] = {
    {"chatml", CHAT_CHATML},
    {"llama2", CHAT_LLAMA2},
    {"llama2-sys", CHAT_LLAMA2_SYS},
    {"llama2-sys-bos", CHAT_LLAMA2_SYS_BOS},
    {"llama2-sys-strip", CHAT_LLAMA2_SYS_STRIP},
    {"mistral-v1", CHAT_MISTRAL_V1},
    {"mistral-v3", CHAT_MISTRAL_V3},
    {"mistral-v3-tekken", CHAT_MISTRAL_V3_TEKKEN},
    {"mistral-v7", CHAT_MISTRAL_V7},
    {"mistral-v7-tekken", CHAT_MISTRAL_V7_TEKKEN},
    {"phi3", CHAT_PHI3},
    {"phi4", CHAT_PHI4},
    {"gemma", CHAT_GEMMA},
    {"command-r", CHAT_COMMAND_R},
    {"llama3", CHAT_LLAMA3},
    {"smolvlm", CHAT_SMOLVLM},
};

static bool has(const char *tp, const char *s) { return strstr(tp, s) != NULL; }

/* llm_chat_detect_template, in its order; families folio does not render are CHAT_UNKNOWN where
 * llama.cpp would pick them, so that a later test cannot claim their templates. */
static chat_kind_t detect(const char *tp)
{
    for (size_t k = 0; k < sizeof CHAT_NAMES / sizeof CHAT_NAMES[0]; k++)
        if (!strcmp(tp, CHAT_NAMES[k].name)) return CHAT_NAMES[k].kind;
    if (has(tp, "<|im_start|>"))
        return has(tp, "<|im_sep|>") ? CHAT_PHI4 : has(tp, "<end_of_utterance>") ? CHAT_SMOLVLM : CHAT_CHATML;
    if (!strncmp(tp, "mistral", 7) || has(tp, "[INST]")) {
        if (has(tp, "[SYSTEM_PROMPT]")) return CHAT_MISTRAL_V7;
        if (has(tp, "' [INST] ' + system_message") || has(tp, "[AVAILABLE_TOOLS]")) {
            if (has(tp, " [INST]")) return CHAT_MISTRAL_V1;
            if (has(tp, "\"[INST]\"")) return CHAT_MISTRAL_V3_TEKKEN;
            return CHAT_MISTRAL_V3;
        }
        if (has(tp, "content.strip()")) return CHAT_LLAMA2_SYS_STRIP;
        if (has(tp, "bos_token + '[INST]")) return CHAT_LLAMA2_SYS_BOS;
        return has(tp, "<<SYS>>") ? CHAT_LLAMA2_SYS : CHAT_LLAMA2;
    }
    if (has(tp, "<|assistant|>") && has(tp, "<|end|>")) return CHAT_PHI3;
    if (has(tp, "[gMASK]<sop>") || (has(tp, "<|assistant|>") && has(tp, "<|user|>")) ||
        (has(tp, "<|{{ item['role'] }}|>") && has(tp, "<|begin_of_image|>")) ||
        (has(tp, "<|user|>") && has(tp, "<|endoftext|>")) || has(tp, "bos_token + message['role']"))
        return CHAT_UNKNOWN; /* ChatGLM 4, Falcon 3, GLM-Edge, Zephyr, Monarch */
    if (has(tp, "<start_of_turn>")) return CHAT_GEMMA;
    if (has(tp, "'\\n\\nAssistant: ' + eos_token") || has(tp, "GPT4 Correct ") ||
        (has(tp, "USER: ") && has(tp, "ASSISTANT: ")) || (has(tp, "### Instruction:") && has(tp, "<|EOT|>")))
        return CHAT_UNKNOWN; /* Orion, OpenChat, Vicuna, DeepSeek Coder */
    if (has(tp, "<|START_OF_TURN_TOKEN|>") && has(tp, "<|USER_TOKEN|>")) return CHAT_COMMAND_R;
    if (has(tp, "<|start_header_id|>") && has(tp, "<|end_header_id|>")) return CHAT_LLAMA3;
    return CHAT_UNKNOWN;
}

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

/* The first string literal printed ({{ '...' }}) after p, or NULL. */
static char *jinja_printed_string(const char *p, const char *end)
{
    const char *blk = strstr(p, "{{");
    const char *q = blk ? blk + 2 : NULL;
    while (q && q < end && (*q == ' ' || *q == '-')) q++;
    return q ? jinja_string(q, end) : NULL;
}

/* The keyword of the first {% else / elif / endif %} tag after p (pointing at the keyword), or NULL. */
static const char *next_branch_tag(const char *p, const char *end)
{
    for (const char *q = strstr(p, "{%"); q && q < end; q = strstr(q + 2, "{%")) {
        const char *k = q + 2;
        while (k < end && (*k == ' ' || *k == '-')) k++;
        if (!strncmp(k, "else", 4) || !strncmp(k, "elif", 4) || !strncmp(k, "endif", 5)) return k;
        if (!strncmp(k, "if", 2)) return NULL; /* a nested if: not a form this reader knows */
    }
    return NULL;
}

/* Recognises t's template; chat_free releases what it filled. */
static chat_t chat_parse(const tok_t *t)
{
    chat_t ch = {CHAT_NONE, NULL};
    const char *tp = tok_chat_template(t);
    if (!tp) return ch;
    ch.kind = detect(tp);
    if (ch.kind != CHAT_CHATML) return ch;
    const char *end = tp + strlen(tp);
    static const char *const conds[] = {"messages[0]['role'] != 'system'", "messages[0][\"role\"] != \"system\"",
                                        "messages[0].role != 'system'", "messages[0].role != \"system\""};
    const char *c = NULL;
    for (size_t k = 0; k < sizeof conds / sizeof conds[0] && !c; k++) c = strstr(tp, conds[k]);
    if (c) {
        /* the default system message: the first string literal printed after the condition */
        char *sys = jinja_printed_string(c, end);
        if (!sys) {
            ch.kind = CHAT_UNKNOWN; /* reported by tok_chat_supported / tok_chat_apply */
            return ch;
        }
        ch.default_system = sys;
        return ch;
    }
    /* Qwen 2.5's form: {% if messages[0]['role'] == 'system' %}...{% else %}{{ '<|im_start|>system\n...' }}:
     * the first such else branch that prints a whole system turn */
    static const char *const eq[] = {"messages[0]['role'] == 'system'", "messages[0][\"role\"] == \"system\"",
                                     "messages[0].role == 'system'", "messages[0].role == \"system\""};
    for (size_t k = 0; k < sizeof eq / sizeof eq[0]; k++)
        for (c = strstr(tp, eq[k]); c; c = strstr(c + 1, eq[k])) {
            const char *br = next_branch_tag(c, end);
            if (!br || strncmp(br, "else", 4) != 0) continue;
            char *sys = jinja_printed_string(br, end);
            if (sys && !strncmp(sys, "<|im_start|>system", 18)) {
                ch.default_system = sys;
                return ch;
            }
            free(sys);
        }
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
    case CHAT_NONE: return fl_fail(err, FL_EUNSUPPORTED, "chat template: the model has no tokenizer.chat_template");
    case CHAT_UNKNOWN:
        return fl_fail(err, FL_EUNSUPPORTED,
                       "chat template: not recognised (folio renders ChatML, Phi-4, SmolVLM, Mistral [INST], Llama 2, "
                       "Phi-3, Gemma, Command-R and Llama 3 templates): \"%.120s\"",
                       tok_chat_template(t));
    default: return 0;
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

/* Text the user wrote, with llama.cpp's trim (C-locale isspace) when asked. */
static void put_content(sbuf_t *b, const char *s, bool trim)
{
    const char *e = s + strlen(s);
    if (trim) {
        while (s < e && is_ws(*s)) s++;
        while (e > s && is_ws(e[-1])) e--;
    }
    put_user(b, s, (size_t)(e - s));
}

static bool role_is(const tok_chat_msg_t *m, const char *r) { return !strcmp(m->role, r); }

/* Mistral's v1, v3 and v3-tekken formats (llm_chat_apply_template). */
static void render_mistral(chat_kind_t kind, const tok_chat_msg_t *msgs, int n, sbuf_t *b)
{
    const char *lead = kind == CHAT_MISTRAL_V1 ? " " : "", *trail = kind == CHAT_MISTRAL_V3_TEKKEN ? "" : " ";
    bool inside_turn = false;
    for (int i = 0; i < n; i++) {
        if (!inside_turn) {
            puts_(b, lead);
            puts_(b, "[INST]");
            puts_(b, trail);
            inside_turn = true;
        }
        if (role_is(&msgs[i], "system")) {
            put_content(b, msgs[i].content, false);
            puts_(b, "\n\n");
        } else if (role_is(&msgs[i], "user")) {
            put_content(b, msgs[i].content, false);
            puts_(b, lead);
            puts_(b, "[/INST]");
        } else {
            puts_(b, trail);
            put_content(b, msgs[i].content, kind == CHAT_MISTRAL_V3);
            puts_(b, "</s>");
            inside_turn = false;
        }
    }
}

/* Llama 2's format and its variants: <<SYS>> blocks, BOS inside the history, trimmed contents. */
static void render_llama2(chat_kind_t kind, const tok_chat_msg_t *msgs, int n, sbuf_t *b)
{
    const bool sys = kind != CHAT_LLAMA2, strip = kind == CHAT_LLAMA2_SYS_STRIP;
    bool inside_turn = true; /* no BOS at the start: the tokenizer adds it */
    puts_(b, "[INST] ");
    for (int i = 0; i < n; i++) {
        if (!inside_turn) {
            inside_turn = true;
            puts_(b, kind == CHAT_LLAMA2_SYS_BOS ? "<s>[INST] " : "[INST] ");
        }
        if (role_is(&msgs[i], "system")) {
            if (sys) puts_(b, "<<SYS>>\n");
            put_content(b, msgs[i].content, strip);
            puts_(b, sys ? "\n<</SYS>>\n\n" : "\n");
        } else if (role_is(&msgs[i], "user")) {
            put_content(b, msgs[i].content, strip);
            puts_(b, " [/INST]");
        } else {
            put_content(b, msgs[i].content, strip);
            puts_(b, "</s>");
            inside_turn = false;
        }
    }
}

/* Renders msgs into b; returns the length, FL_EINVAL or FL_EUNSUPPORTED. */
static int render(const chat_t *ch, const tok_chat_msg_t *msgs, int n, bool add_generation_prompt, sbuf_t *b)
{
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content) return FL_EINVAL;
    switch (ch->kind) {
    case CHAT_NONE:
    case CHAT_UNKNOWN: return FL_EUNSUPPORTED;
    case CHAT_CHATML:
    case CHAT_PHI4: {
        const char *sep = ch->kind == CHAT_PHI4 ? "<|im_sep|>" : "\n", *end = ch->kind == CHAT_PHI4 ? "<|im_end|>" : "<|im_end|>\n";
        for (int i = 0; i < n; i++) {
            if (i == 0 && ch->default_system && !role_is(&msgs[0], "system")) puts_(b, ch->default_system);
            puts_(b, "<|im_start|>");
            put_user(b, msgs[i].role, strlen(msgs[i].role));
            puts_(b, sep);
            put_content(b, msgs[i].content, false);
            puts_(b, end);
        }
        if (add_generation_prompt) {
            puts_(b, "<|im_start|>assistant");
            puts_(b, sep);
        }
        break;
    }
    case CHAT_SMOLVLM:
        puts_(b, "<|im_start|>");
        for (int i = 0; i < n; i++) {
            const bool system = role_is(&msgs[i], "system");
            if (!system) puts_(b, role_is(&msgs[i], "user") ? "User: " : "Assistant: ");
            put_content(b, msgs[i].content, false);
            puts_(b, system ? "\n\n" : "<end_of_utterance>\n");
        }
        if (add_generation_prompt) puts_(b, "Assistant:");
        break;
    case CHAT_MISTRAL_V7:
    case CHAT_MISTRAL_V7_TEKKEN: {
        const char *sp = ch->kind == CHAT_MISTRAL_V7 ? " " : "";
        for (int i = 0; i < n; i++) {
            const bool system = role_is(&msgs[i], "system"), user = role_is(&msgs[i], "user");
            puts_(b, system ? "[SYSTEM_PROMPT]" : user ? "[INST]" : "");
            puts_(b, sp);
            put_content(b, msgs[i].content, false);
            puts_(b, system ? "[/SYSTEM_PROMPT]" : user ? "[/INST]" : "</s>");
        }
        break;
    }
    case CHAT_MISTRAL_V1:
    case CHAT_MISTRAL_V3:
    case CHAT_MISTRAL_V3_TEKKEN: render_mistral(ch->kind, msgs, n, b); break;
    case CHAT_LLAMA2:
    case CHAT_LLAMA2_SYS:
    case CHAT_LLAMA2_SYS_BOS:
    case CHAT_LLAMA2_SYS_STRIP: render_llama2(ch->kind, msgs, n, b); break;
    case CHAT_PHI3:
        for (int i = 0; i < n; i++) {
            /* a known role's marker is one special token ("<|user|>"): written whole, as the template's */
            if (role_is(&msgs[i], "system") || role_is(&msgs[i], "user") || role_is(&msgs[i], "assistant")) {
                puts_(b, "<|");
                puts_(b, msgs[i].role);
                puts_(b, "|>\n");
            } else {
                puts_(b, "<|");
                put_user(b, msgs[i].role, strlen(msgs[i].role));
                puts_(b, "|>\n");
            }
            put_content(b, msgs[i].content, false);
            puts_(b, "<|end|>\n");
        }
        if (add_generation_prompt) puts_(b, "<|assistant|>\n");
        break;
    case CHAT_GEMMA: {
        int sys_from = -1, sys_to = -1; /* system messages waiting for the next non-model turn */
        for (int i = 0; i < n; i++) {
            if (role_is(&msgs[i], "system")) {
                if (sys_from < 0) sys_from = i;
                sys_to = i + 1;
                continue;
            }
            const bool assistant = role_is(&msgs[i], "assistant"), model = assistant || role_is(&msgs[i], "model");
            puts_(b, "<start_of_turn>");
            if (assistant)
                puts_(b, "model");
            else
                put_user(b, msgs[i].role, strlen(msgs[i].role));
            puts_(b, "\n");
            if (sys_from >= 0 && !model) {
                bool any = false;
                for (int k = sys_from; k < sys_to; k++) {
                    if (!role_is(&msgs[k], "system")) continue;
                    const size_t before = b->n;
                    put_content(b, msgs[k].content, true);
                    any |= b->n > before;
                }
                if (any) puts_(b, "\n\n");
                sys_from = sys_to = -1;
            }
            put_content(b, msgs[i].content, true);
            puts_(b, "<end_of_turn>\n");
        }
        if (add_generation_prompt) puts_(b, "<start_of_turn>model\n");
        break;
    }
    case CHAT_COMMAND_R:
        for (int i = 0; i < n; i++) {
            const char *turn = role_is(&msgs[i], "system")      ? "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>"
                               : role_is(&msgs[i], "user")      ? "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>"
                               : role_is(&msgs[i], "assistant") ? "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
                                                                : NULL;
            if (!turn) continue;
            puts_(b, turn);
            put_content(b, msgs[i].content, true);
            puts_(b, "<|END_OF_TURN_TOKEN|>");
        }
        if (add_generation_prompt) puts_(b, "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>");
        break;
    case CHAT_LLAMA3:
        for (int i = 0; i < n; i++) {
            puts_(b, "<|start_header_id|>");
            put_user(b, msgs[i].role, strlen(msgs[i].role));
            puts_(b, "<|end_header_id|>\n\n");
            put_content(b, msgs[i].content, true);
            puts_(b, "<|eot_id|>");
        }
        if (add_generation_prompt) puts_(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
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
