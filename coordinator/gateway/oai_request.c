/* oai_request.c - an OpenAI request body into folio's Generate parameters; see openai.h.
 *
 * Fields are read by type first (a wrong type is a 400 naming the field, as OpenAI answers), then
 * the sampling values go through folio_sampling_check and the stop strings through
 * folio_stops_check: the coordinator applies the same two at its door, so the gateway refuses
 * exactly what the cluster would, only earlier and with the field's OpenAI name in `param`.
 * Unknown fields are ignored (clients send newer fields); fields whose meaning folio cannot honour
 * (n > 1, best_of > 1, echo, suffix, tools) are refused rather than
 * silently dropped. Strings point into the parsed cJSON tree, kept in the request until
 * oai_request_free. */
#include "openai.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "folio_fields.h"

int oai_fail(oai_error_t *e, int http_status, const char *code, const char *fmt, ...)
{
    if (!e) return -1;
    e->http_status = http_status;
    e->code = code;
    e->param[0] = 0;
    e->retry_after_s = 0;
    switch (http_status) {
    case 401:
        e->type = "authentication_error";
        break;
    case 404:
        e->type = "not_found_error";
        break;
    case 429:
        e->type = "rate_limit_error";
        break;
    case 503:
        e->type = "service_unavailable";
        break;
    case 504:
        e->type = "timeout_error";
        break;
    default:
        e->type = http_status >= 500 ? "server_error" : "invalid_request_error";
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* A 400 about one field. */
static int field_fail(oai_error_t *e, const char *param, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int field_fail(oai_error_t *e, const char *param, const char *fmt, ...)
{
    char msg[sizeof e->message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    oai_fail(e, 400, NULL, "%s", msg);
    snprintf(e->param, sizeof e->param, "%s", param);
    return -1;
}

static const cJSON *field(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static int get_bool(const cJSON *o, const char *name, bool *out, oai_error_t *e)
{
    const cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) return field_fail(e, name, "'%s' must be a boolean", name);
    *out = cJSON_IsTrue(v);
    return 0;
}

static bool is_integer(const cJSON *v, double lo, double hi)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble) &&
           v->valuedouble >= lo && v->valuedouble <= hi;
}

/* *set tells whether the field was given (not absent, not null). */
static int get_int(const cJSON *o, const char *name, double lo, double hi, bool *set, double *out, oai_error_t *e)
{
    const cJSON *v = field(o, name);
    *set = v != NULL;
    if (!v) return 0;
    if (!is_integer(v, lo, hi)) return field_fail(e, name, "'%s' must be an integer in [%.0f, %.0f]", name, lo, hi);
    *out = v->valuedouble;
    return 0;
}

static int get_number(const cJSON *o, const char *name, bool *set, float *out, oai_error_t *e)
{
    const cJSON *v = field(o, name);
    *set = v != NULL;
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return field_fail(e, name, "'%s' must be a number", name);
    *out = (float)v->valuedouble;
    return 0;
}

static int get_string(const cJSON *o, const char *name, const char **out, oai_error_t *e)
{
    const cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsString(v)) return field_fail(e, name, "'%s' must be a string", name);
    *out = v->valuestring;
    return 0;
}

static char *own(oai_request_t *r, char *s)
{
    if (!s) return NULL;
    char **o = realloc(r->owned, (size_t)(r->n_owned + 1) * sizeof *o);
    if (!o) {
        free(s);
        return NULL;
    }
    r->owned = o;
    r->owned[r->n_owned++] = s;
    return s;
}

/* ---- fields folio cannot honour ---- */

static int refuse_unsupported(const cJSON *root, oai_kind_t kind, oai_error_t *e)
{
    bool set;
    double n = 1;
    if (get_int(root, "n", 1, 128, &set, &n, e))
        return field_fail(e, "n", "'n' must be 1: folio returns one choice per prompt");
    if (set && n != 1)
        return field_fail(e, "n", "'n' = %.0f is not supported: folio returns one choice per prompt (n = 1)", n);
    if (kind == OAI_COMPLETION) {
        double best_of = 1;
        if (get_int(root, "best_of", 1, 128, &set, &best_of, e) || best_of != 1)
            return field_fail(e, "best_of", "'best_of' must be 1 (not supported otherwise)");
        bool echo = false;
        if (get_bool(root, "echo", &echo, e)) return -1;
        if (echo) return field_fail(e, "echo", "'echo' is not supported");
        const char *suffix = NULL;
        if (get_string(root, "suffix", &suffix, e)) return -1;
        if (suffix && *suffix) return field_fail(e, "suffix", "'suffix' is not supported");
    }
    static const char *const tools[] = {"tools", "functions"};
    for (int i = 0; i < 2; i++) {
        const cJSON *t = field(root, tools[i]);
        if (t && !(cJSON_IsArray(t) && cJSON_GetArraySize(t) == 0))
            return field_fail(e, tools[i], "'%s' is not supported: folio has no tool calling", tools[i]);
    }
    return 0;
}

/* ---- constrained output ---- */

/* A schema given as an object or as its JSON text, as text (owned when printed). */
static int schema_text(oai_request_t *r, const cJSON *v, const char *param, const char **out, oai_error_t *e)
{
    if (cJSON_IsString(v)) {
        *out = v->valuestring;
        return 0;
    }
    if (!cJSON_IsObject(v)) return field_fail(e, param, "'%s' must be a JSON Schema object", param);
    if (!(*out = own(r, cJSON_PrintUnformatted(v)))) return oai_fail(e, 500, NULL, "out of memory");
    return 0;
}

/* response_format ({"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
 * "schema", "strict"}}) and the guided_* extensions, into one constraint. */
static int parse_constraint(const cJSON *root, oai_request_t *r, oai_error_t *e)
{
    int given = 0;
    const cJSON *rf = field(root, "response_format");
    if (rf) {
        const cJSON *type = cJSON_IsObject(rf) ? field(rf, "type") : NULL;
        if (!cJSON_IsObject(rf) || !cJSON_IsString(type))
            return field_fail(e, "response_format", "'response_format' must be an object with a string 'type'");
        if (!strcmp(type->valuestring, "json_object")) {
            r->json_schema = "{\"type\":\"object\"}"; /* any JSON object */
            given++;
        } else if (!strcmp(type->valuestring, "json_schema")) {
            const cJSON *js = field(rf, "json_schema"), *schema = js && cJSON_IsObject(js) ? field(js, "schema") : NULL;
            if (!schema)
                return field_fail(e, "response_format",
                                  "'response_format' of type json_schema needs 'json_schema': {'name', 'schema'}");
            if (schema_text(r, schema, "response_format", &r->json_schema, e)) return -1;
            given++;
        } else if (strcmp(type->valuestring, "text")) {
            return field_fail(e, "response_format", "'response_format.type' '%.40s' is not text, json_object or json_schema",
                              type->valuestring);
        }
    }
    const cJSON *choice = field(root, "guided_choice"), *regex = field(root, "guided_regex"),
                *json = field(root, "guided_json");
    if (choice) {
        const int n = cJSON_IsArray(choice) ? cJSON_GetArraySize(choice) : -1;
        if (n < 1 || n > FOLIO_MAX_CHOICES)
            return field_fail(e, "guided_choice", "'guided_choice' must be a list of 1 to %d strings", FOLIO_MAX_CHOICES);
        if (!(r->choices = calloc((size_t)n, sizeof *r->choices))) return oai_fail(e, 500, NULL, "out of memory");
        const cJSON *c;
        cJSON_ArrayForEach(c, choice)
        {
            if (!cJSON_IsString(c)) return field_fail(e, "guided_choice", "'guided_choice' must hold strings only");
            r->choices[r->n_choices++] = c->valuestring;
        }
        given++;
    }
    if (regex) {
        if (!cJSON_IsString(regex)) return field_fail(e, "guided_regex", "'guided_regex' must be a string");
        r->regex = regex->valuestring;
        given++;
    }
    if (json) {
        if (schema_text(r, json, "guided_json", &r->json_schema, e)) return -1;
        given++;
    }
    if (given > 1)
        return field_fail(e, "response_format",
                          "one constraint at most: response_format (json), guided_choice, guided_regex or guided_json");
    return 0;
}

/* ---- prompts ---- */

static int token_array(oai_request_t *r, const cJSON *a, const char *param, oai_prompt_t *p, oai_error_t *e)
{
    const int n = cJSON_GetArraySize(a);
    if (n == 0) return field_fail(e, param, "'%s' has an empty list of token ids", param);
    if (!(p->tokens = malloc((size_t)n * sizeof *p->tokens))) return oai_fail(e, 500, NULL, "out of memory");
    int i = 0;
    for (const cJSON *t = a->child; t; t = t->next) {
        if (!is_integer(t, 0, INT32_MAX))
            return field_fail(e, param, "'%s' token ids must be integers in [0, %d]", param, INT32_MAX);
        p->tokens[i++] = (int32_t)t->valuedouble;
    }
    p->n_tokens = n;
    (void)r;
    return 0;
}

static int parse_prompt(const cJSON *root, oai_request_t *r, oai_error_t *e)
{
    const cJSON *p = field(root, "prompt");
    if (!p) return field_fail(e, "prompt", "'prompt' is required");
    if (cJSON_IsString(p)) {
        if (!*p->valuestring) return field_fail(e, "prompt", "'prompt' is empty");
        if (!(r->prompts = calloc(1, sizeof *r->prompts))) return oai_fail(e, 500, NULL, "out of memory");
        r->n_prompts = 1;
        r->prompts[0].text = p->valuestring;
        return 0;
    }
    const int n = cJSON_IsArray(p) ? cJSON_GetArraySize(p) : 0;
    if (!cJSON_IsArray(p) || n == 0)
        return field_fail(e, "prompt",
                          "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists");
    if (cJSON_IsNumber(p->child)) { /* one prompt as token ids */
        if (!(r->prompts = calloc(1, sizeof *r->prompts))) return oai_fail(e, 500, NULL, "out of memory");
        r->n_prompts = 1;
        return token_array(r, p, "prompt", &r->prompts[0], e);
    }
    if (n > OAI_MAX_PROMPTS)
        return field_fail(e, "prompt", "'prompt' has %d prompts (at most %d in one request)", n, OAI_MAX_PROMPTS);
    if (!(r->prompts = calloc((size_t)n, sizeof *r->prompts))) return oai_fail(e, 500, NULL, "out of memory");
    r->n_prompts = n;
    const bool strings = cJSON_IsString(p->child);
    int i = 0;
    for (const cJSON *q = p->child; q; q = q->next, i++) {
        if (strings && cJSON_IsString(q) && *q->valuestring) {
            r->prompts[i].text = q->valuestring;
        } else if (!strings && cJSON_IsArray(q)) {
            if (token_array(r, q, "prompt", &r->prompts[i], e)) return -1;
        } else {
            return field_fail(
                e, "prompt", "'prompt' lists must hold non-empty strings only or lists of token ids only (item %d)", i);
        }
    }
    return 0;
}

/* A message's content: a string, null (""), or text parts joined by newlines. */
static int message_content(oai_request_t *r, const cJSON *c, int i, const char **out, oai_error_t *e)
{
    if (!c || cJSON_IsNull(c)) {
        *out = "";
        return 0;
    }
    if (cJSON_IsString(c)) {
        *out = c->valuestring;
        return 0;
    }
    if (!cJSON_IsArray(c))
        return field_fail(e, "messages", "messages[%d].content must be a string or a list of parts", i);
    size_t len = 0;
    for (const cJSON *part = c->child; part; part = part->next) {
        const cJSON *type = cJSON_IsObject(part) ? field(part, "type") : NULL;
        const cJSON *text = cJSON_IsObject(part) ? field(part, "text") : NULL;
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") || !cJSON_IsString(text))
            return field_fail(e, "messages",
                              "messages[%d].content: only parts {\"type\": \"text\", \"text\": ...} are supported", i);
        len += strlen(text->valuestring) + 1;
    }
    char *s = own(r, malloc(len + 1));
    if (!s) return oai_fail(e, 500, NULL, "out of memory");
    size_t at = 0;
    for (const cJSON *part = c->child; part; part = part->next) {
        const char *t = field(part, "text")->valuestring;
        if (at) s[at++] = '\n';
        memcpy(s + at, t, strlen(t));
        at += strlen(t);
    }
    s[at] = 0;
    *out = s;
    return 0;
}

static int parse_messages(const cJSON *root, oai_request_t *r, oai_error_t *e)
{
    const cJSON *m = field(root, "messages");
    if (!m) return field_fail(e, "messages", "'messages' is required");
    const int n = cJSON_IsArray(m) ? cJSON_GetArraySize(m) : 0;
    if (n == 0) return field_fail(e, "messages", "'messages' must be a non-empty list");
    if (!(r->messages = calloc((size_t)n, sizeof *r->messages))) return oai_fail(e, 500, NULL, "out of memory");
    r->n_messages = n;
    int i = 0;
    for (const cJSON *msg = m->child; msg; msg = msg->next, i++) {
        const cJSON *role = cJSON_IsObject(msg) ? field(msg, "role") : NULL;
        if (!cJSON_IsString(role)) return field_fail(e, "messages", "messages[%d] needs a string 'role'", i);
        const char *rs = role->valuestring;
        if (!strcmp(rs, "developer")) rs = "system"; /* OpenAI's newer name for the system role */
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant"))
            return field_fail(e, "messages",
                              "messages[%d].role '%.32s' is not supported (system, developer, user, assistant)", i,
                              role->valuestring);
        r->messages[i].role = rs;
        if (message_content(r, cJSON_GetObjectItemCaseSensitive(msg, "content"), i, &r->messages[i].content, e))
            return -1;
    }
    return 0;
}

/* ---- sampling ---- */

static int parse_stop(const cJSON *root, oai_request_t *r, oai_error_t *e)
{
    const cJSON *s = field(root, "stop");
    if (!s) return 0;
    if (cJSON_IsString(s)) {
        if (!(r->stop = malloc(sizeof *r->stop))) return oai_fail(e, 500, NULL, "out of memory");
        r->stop[0] = s->valuestring;
        r->n_stop = 1;
    } else if (cJSON_IsArray(s)) {
        const int n = cJSON_GetArraySize(s);
        if (n > FOLIO_MAX_STOPS) return field_fail(e, "stop", "'stop' has %d strings (at most %d)", n, FOLIO_MAX_STOPS);
        if (n && !(r->stop = malloc((size_t)n * sizeof *r->stop))) return oai_fail(e, 500, NULL, "out of memory");
        for (const cJSON *x = s->child; x; x = x->next) {
            if (!cJSON_IsString(x)) return field_fail(e, "stop", "'stop' must be a string or a list of strings");
            r->stop[r->n_stop++] = x->valuestring;
        }
    } else {
        return field_fail(e, "stop", "'stop' must be a string or a list of strings");
    }
    char msg[256];
    if (!folio_stops_check((char *const *)r->stop, (size_t)r->n_stop, msg, sizeof msg))
        return field_fail(e, "stop", "'stop': %s", msg);
    return 0;
}

static int parse_logit_bias(const cJSON *root, oai_request_t *r, oai_error_t *e)
{
    const cJSON *b = field(root, "logit_bias");
    if (!b) return 0;
    if (!cJSON_IsObject(b)) return field_fail(e, "logit_bias", "'logit_bias' must be an object of token id -> bias");
    const int n = cJSON_GetArraySize(b);
    if (n > FOLIO_MAX_LOGIT_BIAS)
        return field_fail(e, "logit_bias", "'logit_bias' has %d entries (at most %d)", n, FOLIO_MAX_LOGIT_BIAS);
    if (n == 0) return 0;
    r->bias = calloc((size_t)n, sizeof *r->bias);
    r->bias_ptrs = calloc((size_t)n, sizeof *r->bias_ptrs);
    if (!r->bias || !r->bias_ptrs) return oai_fail(e, 500, NULL, "out of memory");
    int i = 0;
    for (const cJSON *x = b->child; x; x = x->next, i++) {
        char *end;
        const long tok = strtol(x->string, &end, 10);
        if (end == x->string || *end || tok < 0 || tok > INT32_MAX)
            return field_fail(e, "logit_bias", "'logit_bias' keys must be token ids, got '%.32s'", x->string);
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
            return field_fail(e, "logit_bias", "'logit_bias' values must be numbers (token %ld)", tok);
        for (int k = 0; k < i; k++)
            if (r->bias[k].token == (int32_t)tok)
                return field_fail(e, "logit_bias", "'logit_bias' names token %ld twice", tok);
        folio__v1__logit_bias__init(&r->bias[i]);
        r->bias[i].token = (int32_t)tok;
        r->bias[i].bias = (float)x->valuedouble;
        r->bias_ptrs[i] = &r->bias[i];
    }
    r->sampling.logit_bias = r->bias_ptrs;
    r->sampling.n_logit_bias = (size_t)n;
    return 0;
}

/* folio_sampling_check's message names a SamplingParams field; param is the OpenAI field. */
static const char *param_of(const char *msg)
{
    static const char *const names[] = {
        "temperature",       "top_p",        "top_k",      "min_p",   "repetition_penalty", "presence_penalty",
        "frequency_penalty", "top_logprobs", "logit_bias", "logprobs"};
    const char *f = strstr(msg, "SamplingParams.");
    if (!f) return "";
    f += strlen("SamplingParams.");
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (!strncmp(f, names[i], strlen(names[i])) && !isalnum((unsigned char)f[strlen(names[i])]) &&
            f[strlen(names[i])] != '_')
            return names[i];
    return "";
}

static int parse_sampling(const cJSON *root, oai_request_t *r, oai_error_t *e)
{
    Folio__V1__SamplingParams *s = &r->sampling;
    bool set;
    float f = 0;
    double d = 0;
    if (get_number(root, "temperature", &set, &f, e)) return -1;
    if (set) folio_sampling_set_temperature(s, f);
    if (get_number(root, "top_p", &set, &f, e)) return -1;
    if (set) folio_sampling_set_top_p(s, f);
    if (get_int(root, "top_k", -1, INT32_MAX, &set, &d, e)) return -1;
    if (set) folio_sampling_set_top_k(s, d < 0 ? 0 : (uint32_t)d); /* -1: off, as vLLM spells it */
    if (get_number(root, "min_p", &set, &f, e)) return -1;
    if (set) folio_sampling_set_min_p(s, f);
    if (get_number(root, "repetition_penalty", &set, &f, e)) return -1;
    if (set) folio_sampling_set_repetition_penalty(s, f);
    if (get_number(root, "presence_penalty", &set, &f, e)) return -1;
    if (set) folio_sampling_set_presence_penalty(s, f);
    if (get_number(root, "frequency_penalty", &set, &f, e)) return -1;
    if (set) folio_sampling_set_frequency_penalty(s, f);
    if (get_int(root, "seed", -9223372036854775807.0, 18446744073709551615.0, &set, &d, e)) return -1;
    if (set) s->seed = d < 0 ? (uint64_t)(int64_t)d : d >= 18446744073709551615.0 ? UINT64_MAX : (uint64_t)d;
    if (r->kind == OAI_CHAT) {
        bool lp = false;
        if (get_bool(root, "logprobs", &lp, e)) return -1;
        if (get_int(root, "top_logprobs", 0, FOLIO_MAX_TOP_LOGPROBS, &set, &d, e)) return -1;
        if (set && d > 0 && !lp) return field_fail(e, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
        s->logprobs = lp;
        s->top_logprobs = set ? (uint32_t)d : 0;
    } else { /* the legacy API: logprobs is the number of alternatives, and asks for logprobs */
        if (get_int(root, "logprobs", 0, FOLIO_MAX_TOP_LOGPROBS, &set, &d, e)) return -1;
        s->logprobs = set;
        s->top_logprobs = set ? (uint32_t)d : 0;
    }
    if (parse_logit_bias(root, r, e)) return -1;
    char msg[256];
    if (!folio_sampling_check(s, 0, msg, sizeof msg)) return field_fail(e, param_of(msg), "%s", msg);
    return 0;
}

int oai_request_parse(oai_kind_t kind, const char *body, size_t len, oai_request_t *out, oai_error_t *err)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    folio__v1__sampling_params__init(&out->sampling);
    const char *end = NULL;
    cJSON *root = body && len ? cJSON_ParseWithLengthOpts(body, len, &end, false) : NULL;
    if (root) /* only white space may follow the value */
        while (end < body + len && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n')) end++;
    if (!root || end != body + len) {
        const size_t at = end && end >= body ? (size_t)(end - body) : 0;
        cJSON_Delete(root);
        return oai_fail(err, 400, "invalid_json",
                        len ? "the request body is not valid JSON (at byte %zu of %zu)"
                            : "the request body is empty: a JSON object was expected",
                        at, len);
    }
    out->json = root;
    if (!cJSON_IsObject(root)) {
        oai_fail(err, 400, "invalid_json", "the request body must be a JSON object");
        goto fail;
    }
    bool set;
    double d = 0;
    if (get_string(root, "model", &out->model, err) || get_string(root, "user", &out->user, err) ||
        refuse_unsupported(root, kind, err))
        goto fail;
    if (kind == OAI_CHAT ? parse_messages(root, out, err) : parse_prompt(root, out, err)) goto fail;
    /* max_completion_tokens is chat's newer name; where both come, it wins */
    if (get_int(root, "max_tokens", 1, INT32_MAX, &set, &d, err)) goto fail;
    if (set) out->max_tokens = (int)d;
    if (get_int(root, "max_completion_tokens", 1, INT32_MAX, &set, &d, err)) goto fail;
    if (set) out->max_tokens = (int)d;
    if (get_bool(root, "stream", &out->stream, err) || get_bool(root, "ignore_eos", &out->ignore_eos, err) ||
        get_bool(root, "return_token_ids", &out->return_token_ids, err))
        goto fail;
    const cJSON *so = field(root, "stream_options");
    if (so && !cJSON_IsObject(so)) {
        field_fail(err, "stream_options", "'stream_options' must be an object");
        goto fail;
    }
    if (so && get_bool(so, "include_usage", &out->include_usage, err)) goto fail;
    if (!out->stream) out->include_usage = false;
    if (get_int(root, "timeout_ms", 0, UINT32_MAX, &set, &d, err)) goto fail;
    if (set) out->timeout_ms = (uint32_t)d;
    if (parse_stop(root, out, err) || parse_sampling(root, out, err) || parse_constraint(root, out, err)) goto fail;
    return 0;
fail:
    oai_request_free(out);
    return -1;
}

void oai_request_free(oai_request_t *r)
{
    if (!r) return;
    for (int i = 0; i < r->n_prompts; i++) free(r->prompts[i].tokens);
    free(r->prompts);
    free(r->messages);
    free(r->stop);
    free(r->bias);
    free(r->bias_ptrs);
    free(r->choices);
    for (int i = 0; i < r->n_owned; i++) free(r->owned[i]);
    free(r->owned);
    cJSON_Delete(r->json);
    memset(r, 0, sizeof *r);
}

void oai_request_params(const oai_request_t *r, int i, const char *tenant, folio_generate_params_t *p)
{
    memset(p, 0, sizeof *p);
    if (r->kind == OAI_CHAT) {
        p->messages = r->messages;
        p->n_messages = r->n_messages;
    } else if (i >= 0 && i < r->n_prompts) {
        p->text = r->prompts[i].text;
        p->tokens = r->prompts[i].tokens;
        p->n_tokens = r->prompts[i].n_tokens;
    }
    /* Unset: the legacy completions API's 16 (folio's 0); a chat answer runs to its end or the
     * context, as OpenAI's does (the coordinator clamps to the context left). */
    p->max_tokens = r->max_tokens ? r->max_tokens : r->kind == OAI_CHAT ? INT_MAX : 0;
    p->sampling = &r->sampling;
    p->stop = r->stop;
    p->n_stop = r->n_stop;
    p->stream = r->stream;
    p->ignore_eos = r->ignore_eos;
    p->tenant = tenant && *tenant ? tenant : NULL;
    p->timeout_ms = r->timeout_ms;
    p->choices = (const char *const *)r->choices;
    p->n_choices = r->n_choices;
    p->regex = r->regex;
    p->json_schema = r->json_schema;
}
