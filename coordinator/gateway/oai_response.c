/* oai_response.c - folio's results written as the OpenAI API's JSON; see openai.h.
 *
 * Responses follow OpenAI's shapes field for field (chat.completion, chat.completion.chunk,
 * text_completion, list/model, error) so that the official clients parse them; folio's additions
 * (token_ids when asked for, folio_model_id in the model list) are extra keys those clients ignore.
 * Strings that come from tokens (logprobs) can hold part of a UTF-8 character: they are written with
 * U+FFFD in its place and the exact bytes in `bytes`, as OpenAI does. */
#include "openai.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void oai_error_from_status(int code, uint32_t retry_after_ms, const char *message, oai_error_t *e)
{
    const char *m = message && *message ? message : "the cluster refused the request";
    switch (code) {
    case FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT:
        oai_fail(e, 400, NULL, "%s", m);
        break;
    case FOLIO__V1__STATUS_CODE__NOT_FOUND:
        oai_fail(e, 404, NULL, "%s", m);
        break;
    case FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED:
        if (retry_after_ms == 0) { /* it never fits: OpenAI's answer to a prompt over the context */
            oai_fail(e, 400, "context_length_exceeded", "%s", m);
        } else {
            oai_fail(e, 429, "rate_limit_exceeded", "%s", m);
            e->retry_after_s = (int)((retry_after_ms + 999) / 1000);
        }
        break;
    case FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED:
        oai_fail(e, 504, "timeout", "%s", m);
        break;
    case FOLIO__V1__STATUS_CODE__UNAVAILABLE:
        oai_fail(e, 503, "unavailable", "%s", m);
        break;
    case FOLIO__V1__STATUS_CODE__CANCELLED:
        oai_fail(e, 499, "cancelled", "%s", m);
        break;
    default:
        oai_fail(e, 500, "internal_error", "%s", m);
    }
}

static char *print_delete(cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

char *oai_error_json(const oai_error_t *e)
{
    cJSON *o = cJSON_CreateObject(), *er = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(er, "message", e->message);
    cJSON_AddStringToObject(er, "type", e->type ? e->type : "server_error");
    if (e->param[0])
        cJSON_AddStringToObject(er, "param", e->param);
    else
        cJSON_AddNullToObject(er, "param");
    if (e->code)
        cJSON_AddStringToObject(er, "code", e->code);
    else
        cJSON_AddNullToObject(er, "code");
    return print_delete(o);
}

const char *oai_finish_reason(int finish_reason)
{
    switch (finish_reason) {
    case FOLIO__V1__FINISH_REASON__FINISH_STOP:
        return "stop";
    case FOLIO__V1__FINISH_REASON__FINISH_LENGTH:
        return "length";
    case FOLIO__V1__FINISH_REASON__FINISH_CANCELLED:
        return "abort";
    case FOLIO__V1__FINISH_REASON__FINISH_ERROR:
        return "error";
    default:
        return NULL;
    }
}

/* ---- token strings (logprobs) ---- */

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 when it is not one. */
static int utf8_len(const unsigned char *s, size_t n)
{
    if (s[0] < 0x80) return 1;
    int len;
    unsigned cp;
    if ((s[0] & 0xE0) == 0xC0)
        len = 2, cp = s[0] & 0x1F;
    else if ((s[0] & 0xF0) == 0xE0)
        len = 3, cp = s[0] & 0x0F;
    else if ((s[0] & 0xF8) == 0xF0)
        len = 4, cp = s[0] & 0x07;
    else
        return 0;
    if ((size_t)len > n) return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    static const unsigned min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* The token's bytes (raw, n of them) and its text with every invalid byte as U+FFFD. */
typedef struct token_str {
    unsigned char raw[256];
    int n;
    char text[256 * 3 + 1];
} token_str_t;

/* false when the token's text is unknown and it is written "token_id:N" */
static bool token_str(const oai_writer_t *w, int32_t id, token_str_t *t)
{
    t->n = w->token_text ? w->token_text(w->token_ctx, id, (char *)t->raw, sizeof t->raw) : -1;
    if (t->n < 0) {
        t->n = snprintf((char *)t->raw, sizeof t->raw, "token_id:%d", (int)id);
        memcpy(t->text, t->raw, (size_t)t->n + 1);
        return false;
    }
    if (t->n > (int)sizeof t->raw) t->n = (int)sizeof t->raw;
    size_t o = 0;
    for (int i = 0; i < t->n;) {
        const int l = utf8_len(t->raw + i, (size_t)(t->n - i));
        if (l) {
            memcpy(t->text + o, t->raw + i, (size_t)l);
            o += (size_t)l;
            i += l;
        } else {
            memcpy(t->text + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    t->text[o] = 0;
    return true;
}

static cJSON *bytes_json(const token_str_t *t)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < t->n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(t->raw[i]));
    return a;
}

static cJSON *chat_token_json(const oai_writer_t *w, const Folio__V1__TokenLogprob *l, bool with_top,
                              const Folio__V1__TokenLogprobs *all)
{
    token_str_t t;
    token_str(w, l ? l->token : 0, &t);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "token", t.text);
    cJSON_AddNumberToObject(o, "logprob", l ? l->logprob : 0);
    cJSON_AddItemToObject(o, "bytes", bytes_json(&t));
    if (with_top) {
        cJSON *top = cJSON_AddArrayToObject(o, "top_logprobs");
        for (size_t k = 0; all && k < all->n_top; k++)
            cJSON_AddItemToArray(top, chat_token_json(w, all->top[k], false, NULL));
    }
    return o;
}

/* The choice's logprobs object, or JSON null when the request did not ask for them. */
static cJSON *logprobs_json(const oai_writer_t *w, const oai_choice_t *c)
{
    if (!w->rq->sampling.logprobs) return cJSON_CreateNull();
    const int n = c->logprobs ? c->n_logprobs : 0;
    cJSON *o = cJSON_CreateObject();
    if (w->rq->kind == OAI_CHAT) {
        cJSON *content = cJSON_AddArrayToObject(o, "content");
        for (int i = 0; i < n; i++)
            if (c->logprobs[i])
                cJSON_AddItemToArray(content, chat_token_json(w, c->logprobs[i]->chosen, true, c->logprobs[i]));
        cJSON_AddNullToObject(o, "refusal");
        return o;
    }
    cJSON *tokens = cJSON_AddArrayToObject(o, "tokens"), *lps = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *tops = w->rq->sampling.top_logprobs ? cJSON_AddArrayToObject(o, "top_logprobs") : NULL;
    if (!tops) cJSON_AddNullToObject(o, "top_logprobs");
    cJSON *offsets = cJSON_AddArrayToObject(o, "text_offset");
    size_t at = c->text_offset;
    for (int i = 0; i < n; i++) {
        const Folio__V1__TokenLogprobs *l = c->logprobs[i];
        const Folio__V1__TokenLogprob *ch = l ? l->chosen : NULL;
        token_str_t t;
        const bool known = token_str(w, ch ? ch->token : 0, &t);
        cJSON_AddItemToArray(tokens, cJSON_CreateString(t.text));
        cJSON_AddItemToArray(lps, cJSON_CreateNumber(ch ? ch->logprob : 0));
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)at));
        if (known) at += (size_t)t.n; /* byte offsets; without token text, the delta's start */
        if (tops) {
            cJSON *m = cJSON_CreateObject();
            for (size_t k = 0; l && k < l->n_top; k++) {
                token_str_t tt;
                token_str(w, l->top[k]->token, &tt);
                if (!cJSON_GetObjectItemCaseSensitive(m, tt.text))
                    cJSON_AddNumberToObject(m, tt.text, l->top[k]->logprob);
            }
            cJSON_AddItemToArray(tops, m);
        }
    }
    return o;
}

static void add_finish(cJSON *o, int finish_reason)
{
    const char *f = oai_finish_reason(finish_reason);
    if (f)
        cJSON_AddStringToObject(o, "finish_reason", f);
    else
        cJSON_AddNullToObject(o, "finish_reason");
}

static void add_token_ids(const oai_writer_t *w, cJSON *o, const oai_choice_t *c)
{
    if (!w->rq->return_token_ids) return;
    cJSON_AddItemToObject(o, "token_ids",
                          c->n_tokens > 0 ? cJSON_CreateIntArray(c->tokens, c->n_tokens) : cJSON_CreateArray());
}

static cJSON *envelope(const oai_writer_t *w, bool chunk)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", w->id);
    const bool chat = w->rq->kind == OAI_CHAT;
    cJSON_AddStringToObject(o, "object",
                            chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)w->created);
    cJSON_AddStringToObject(o, "model", w->model ? w->model : "");
    return o;
}

static cJSON *usage_json(const oai_usage_t *u)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "prompt_tokens", (double)u->prompt_tokens);
    cJSON_AddNumberToObject(o, "completion_tokens", (double)u->completion_tokens);
    cJSON_AddNumberToObject(o, "total_tokens", (double)(u->prompt_tokens + u->completion_tokens));
    cJSON *d = cJSON_AddObjectToObject(o, "prompt_tokens_details");
    cJSON_AddNumberToObject(d, "cached_tokens", (double)u->cached_tokens);
    return o;
}

char *oai_response_json(const oai_writer_t *w, const oai_choice_t *choices, int n, const oai_usage_t *usage)
{
    cJSON *o = envelope(w, false);
    cJSON *arr = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < n; i++) {
        const oai_choice_t *c = &choices[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", c->index);
        if (w->rq->kind == OAI_CHAT) {
            cJSON *m = cJSON_AddObjectToObject(ch, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            cJSON_AddStringToObject(m, "content", c->text ? c->text : "");
            cJSON_AddNullToObject(m, "refusal");
        } else {
            cJSON_AddStringToObject(ch, "text", c->text ? c->text : "");
        }
        cJSON_AddItemToObject(ch, "logprobs", logprobs_json(w, c));
        add_finish(ch, c->finish_reason);
        add_token_ids(w, ch, c);
        cJSON_AddItemToArray(arr, ch);
    }
    cJSON_AddItemToObject(o, "usage", usage_json(usage));
    return print_delete(o);
}

char *oai_chunk_json(const oai_writer_t *w, const oai_choice_t *c, bool role)
{
    cJSON *o = envelope(w, true);
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", c->index);
    const bool has = (c->text && *c->text) || c->n_tokens > 0;
    if (w->rq->kind == OAI_CHAT) {
        cJSON *d = cJSON_AddObjectToObject(ch, "delta");
        if (role) cJSON_AddStringToObject(d, "role", "assistant");
        if (role || has) cJSON_AddStringToObject(d, "content", c->text ? c->text : "");
    } else {
        cJSON_AddStringToObject(ch, "text", c->text ? c->text : "");
    }
    cJSON_AddItemToObject(ch, "logprobs", has ? logprobs_json(w, c) : cJSON_CreateNull());
    add_finish(ch, c->finish_reason);
    if (has || role) add_token_ids(w, ch, c);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "choices"), ch);
    if (w->rq->include_usage) cJSON_AddNullToObject(o, "usage");
    return print_delete(o);
}

char *oai_usage_chunk_json(const oai_writer_t *w, const oai_usage_t *usage)
{
    cJSON *o = envelope(w, true);
    cJSON_AddArrayToObject(o, "choices");
    cJSON_AddItemToObject(o, "usage", usage_json(usage));
    return print_delete(o);
}

/* ---- models ---- */

void oai_model_name(const char *model_id, char *out, size_t cap)
{
    if (!cap) return;
    const char *id = model_id ? model_id : "";
    size_t n = strlen(id);
    const char *colon = strrchr(id, ':');
    if (colon && colon[1] && strspn(colon + 1, "0123456789") == strlen(colon + 1)) n = (size_t)(colon - id);
    if (n > 5 && !memcmp(id + n - 5, ".gguf", 5)) n -= 5;
    if (n >= cap) n = cap - 1;
    memcpy(out, id, n);
    out[n] = 0;
}

bool oai_model_matches(const char *asked, const char *model_id)
{
    if (!asked || !model_id) return false;
    char name[256];
    oai_model_name(model_id, name, sizeof name);
    if (!strcmp(asked, name) || !strcmp(asked, model_id)) return true;
    const char *colon = strrchr(model_id, ':'); /* the file name: "tiny.gguf" */
    return colon && strlen(asked) == (size_t)(colon - model_id) &&
           !strncmp(asked, model_id, (size_t)(colon - model_id));
}

static cJSON *model_object(const char *model_id, long long created)
{
    char name[256];
    oai_model_name(model_id, name, sizeof name);
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)created);
    cJSON_AddStringToObject(m, "owned_by", "folio");
    cJSON_AddStringToObject(m, "folio_model_id", model_id);
    return m;
}

char *oai_models_json(const Folio__V1__StatusReply *s, long long created)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    for (size_t i = 0; s && i < s->n_groups; i++) {
        const char *id = s->groups[i]->model_id;
        if (!id || !*id) continue;
        bool seen = false;
        for (size_t k = 0; k < i && !seen; k++) seen = s->groups[k]->model_id && !strcmp(s->groups[k]->model_id, id);
        if (!seen) cJSON_AddItemToArray(data, model_object(id, created));
    }
    return print_delete(o);
}

char *oai_model_json(const Folio__V1__StatusReply *s, const char *name, long long created)
{
    for (size_t i = 0; s && i < s->n_groups; i++)
        if (s->groups[i]->model_id && oai_model_matches(name, s->groups[i]->model_id))
            return print_delete(model_object(s->groups[i]->model_id, created));
    return NULL;
}
