/* test_gateway_openai.c - coordinator/gateway/oai_request.c and oai_response.c: OpenAI request
 * bodies into folio's Generate parameters (every prompt form, sampling fields with presence, the
 * fields refused with 400 and the field named), the coordinator's status codes as HTTP answers, and
 * the response, chunk, error and model-list JSON in OpenAI's shapes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "folio_fields.h"
#include "openai.h"

static int parse(oai_kind_t kind, const char *body, oai_request_t *r, oai_error_t *e)
{
    memset(e, 0, sizeof *e);
    return oai_request_parse(kind, body, strlen(body), r, e);
}

/* body must be refused 400 naming param ("" for none). */
static void refused(oai_kind_t kind, const char *body, const char *param)
{
    oai_request_t r;
    oai_error_t e;
    if (parse(kind, body, &r, &e) == 0) fail_msg("accepted: %s", body);
    assert_int_equal(e.http_status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    if (strcmp(e.param, param)) fail_msg("%s: param '%s', expected '%s' (%s)", body, e.param, param, e.message);
    assert_true(e.message[0] != 0);
}

static void test_chat_request_fields_become_generate_parameters(void **state)
{
    (void)state;
    oai_request_t r;
    oai_error_t e;
    const char *body =
        "{\"model\": \"tiny\", \"messages\": [{\"role\": \"developer\", \"content\": \"be brief\"},"
        "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"}, {\"type\": \"text\", \"text\": "
        "\"b\"}]},"
        "{\"role\": \"assistant\", \"content\": null}],"
        "\"max_tokens\": 5, \"max_completion_tokens\": 7, \"temperature\": 0, \"top_p\": 0.5, \"top_k\": -1,"
        "\"seed\": -1, \"stop\": \"END\", \"presence_penalty\": 0.5, \"frequency_penalty\": -0.5,"
        "\"logit_bias\": {\"12\": -100, \"7\": 3.5}, \"logprobs\": true, \"top_logprobs\": 3,"
        "\"stream\": true, \"stream_options\": {\"include_usage\": true}, \"user\": \"u1\", \"n\": 1,"
        "\"ignore_eos\": true, \"return_token_ids\": true, \"timeout_ms\": 2500, \"tools\": [],"
        "\"future_field\": {\"ignored\": true}}";
    assert_int_equal(parse(OAI_CHAT, body, &r, &e), 0);
    assert_string_equal(r.model, "tiny");
    assert_int_equal(r.n_messages, 3);
    assert_string_equal(r.messages[0].role, "system"); /* developer is OpenAI's newer name for it */
    assert_string_equal(r.messages[1].content, "a\nb");
    assert_string_equal(r.messages[2].content, "");
    assert_int_equal(r.max_tokens, 7); /* max_completion_tokens wins */
    const Folio__V1__SamplingParams *s = &r.sampling;
    assert_true(FOLIO_SAMPLING_HAS(s, temperature) && s->temperature == 0);
    assert_true(FOLIO_SAMPLING_HAS(s, top_p) && s->top_p == 0.5f);
    assert_true(FOLIO_SAMPLING_HAS(s, top_k) && s->top_k == 0); /* -1: off */
    assert_false(FOLIO_SAMPLING_HAS(s, min_p));
    assert_false(FOLIO_SAMPLING_HAS(s, repetition_penalty));
    assert_true(s->seed == UINT64_MAX);
    assert_true(FOLIO_SAMPLING_HAS(s, presence_penalty) && s->presence_penalty == 0.5f);
    assert_true(FOLIO_SAMPLING_HAS(s, frequency_penalty) && s->frequency_penalty == -0.5f);
    assert_int_equal(s->n_logit_bias, 2);
    assert_int_equal(s->logit_bias[0]->token, 12);
    assert_true(s->logit_bias[0]->bias == -100);
    assert_true(s->logprobs && s->top_logprobs == 3);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "END");
    assert_true(r.stream && r.include_usage && r.ignore_eos && r.return_token_ids);
    assert_int_equal(r.timeout_ms, 2500);
    assert_string_equal(r.user, "u1");

    folio_generate_params_t p;
    oai_request_params(&r, 0, "tenant-a", &p);
    assert_int_equal(p.n_messages, 3);
    assert_ptr_equal(p.sampling, &r.sampling);
    assert_int_equal(p.max_tokens, 7);
    assert_string_equal(p.tenant, "tenant-a");
    assert_true(p.stream && p.ignore_eos);
    assert_int_equal(p.timeout_ms, 2500);
    oai_request_free(&r);
}

static void test_completion_prompt_forms(void **state)
{
    (void)state;
    oai_request_t r;
    oai_error_t e;
    folio_generate_params_t p;
    assert_int_equal(parse(OAI_COMPLETION, "{\"prompt\": \"hello\"}", &r, &e), 0);
    assert_null(r.model);
    assert_int_equal(r.n_prompts, 1);
    oai_request_params(&r, 0, "", &p);
    assert_string_equal(p.text, "hello");
    assert_null(p.tenant);
    assert_int_equal(p.max_tokens, 0);                          /* the legacy API's 16 (folio's 0) */
    assert_false(FOLIO_SAMPLING_HAS(&r.sampling, temperature)); /* unset: the model's default */
    oai_request_free(&r);

    assert_int_equal(parse(OAI_COMPLETION, "{\"prompt\": [1, 2, 3]}", &r, &e), 0);
    assert_int_equal(r.n_prompts, 1);
    assert_int_equal(r.prompts[0].n_tokens, 3);
    assert_int_equal(r.prompts[0].tokens[2], 3);
    oai_request_free(&r);

    assert_int_equal(parse(OAI_COMPLETION, "{\"prompt\": [\"a\", \"b\", \"c\"], \"logprobs\": 2}", &r, &e), 0);
    assert_int_equal(r.n_prompts, 3);
    oai_request_params(&r, 2, NULL, &p);
    assert_string_equal(p.text, "c");
    assert_true(r.sampling.logprobs && r.sampling.top_logprobs == 2); /* the legacy integer logprobs */
    oai_request_free(&r);

    assert_int_equal(parse(OAI_COMPLETION,
                           "{\"prompt\": [[1, 2], [3]], \"stream\": false, "
                           "\"stream_options\": {\"include_usage\": true}}",
                           &r, &e),
                     0);
    assert_int_equal(r.n_prompts, 2);
    assert_int_equal(r.prompts[1].n_tokens, 1);
    assert_false(r.include_usage); /* only with stream */
    oai_request_free(&r);

    /* chat without max_tokens runs to the context (the coordinator clamps) */
    assert_int_equal(parse(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", &r, &e), 0);
    oai_request_params(&r, 0, NULL, &p);
    assert_int_equal(p.max_tokens, INT_MAX);
    oai_request_free(&r);
}

static void test_bad_requests_are_400_naming_the_field(void **state)
{
    (void)state;
    refused(OAI_CHAT, "{\"messages\": [", "");
    refused(OAI_CHAT, "", "");
    refused(OAI_CHAT, "[1, 2]", "");
    refused(OAI_CHAT, "{\"messages\": []} trailing", "");
    refused(OAI_CHAT, "{}", "messages");
    refused(OAI_CHAT, "{\"messages\": []}", "messages");
    refused(OAI_CHAT, "{\"messages\": [{\"content\": \"x\"}]}", "messages");
    refused(OAI_CHAT, "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}", "messages");
    refused(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]}", "messages");
    const char *m = "\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]";
    char body[512];
#define REFUSED(kind, fields, param)                                                                                   \
    do {                                                                                                               \
        snprintf(body, sizeof body, "{%s, %s}", m, fields);                                                            \
        refused(kind, body, param);                                                                                    \
    } while (0)
    REFUSED(OAI_CHAT, "\"n\": 2", "n");
    REFUSED(OAI_CHAT, "\"n\": 0", "n");
    REFUSED(OAI_CHAT, "\"model\": 3", "model");
    REFUSED(OAI_CHAT, "\"max_tokens\": 0", "max_tokens");
    REFUSED(OAI_CHAT, "\"max_tokens\": 1.5", "max_tokens");
    REFUSED(OAI_CHAT, "\"max_completion_tokens\": \"9\"", "max_completion_tokens");
    REFUSED(OAI_CHAT, "\"temperature\": \"hot\"", "temperature");
    REFUSED(OAI_CHAT, "\"temperature\": -0.5", "temperature"); /* folio_sampling_check's range */
    REFUSED(OAI_CHAT, "\"top_p\": 0", "top_p");
    REFUSED(OAI_CHAT, "\"top_k\": -2", "top_k");
    REFUSED(OAI_CHAT, "\"presence_penalty\": 3", "presence_penalty");
    REFUSED(OAI_CHAT, "\"frequency_penalty\": -2.5", "frequency_penalty");
    REFUSED(OAI_CHAT, "\"seed\": 1.5", "seed");
    REFUSED(OAI_CHAT, "\"stop\": 5", "stop");
    REFUSED(OAI_CHAT, "\"stop\": [\"\"]", "stop");
    REFUSED(OAI_CHAT, "\"logit_bias\": {\"x\": 1}", "logit_bias");
    REFUSED(OAI_CHAT, "\"logit_bias\": {\"5\": 101}", "logit_bias");
    REFUSED(OAI_CHAT, "\"logit_bias\": {\"5\": 1, \"5\": 2}", "logit_bias");
    REFUSED(OAI_CHAT, "\"logprobs\": 1", "logprobs");
    REFUSED(OAI_CHAT, "\"top_logprobs\": 2", "top_logprobs"); /* without logprobs */
    REFUSED(OAI_CHAT, "\"logprobs\": true, \"top_logprobs\": 21", "top_logprobs");
    REFUSED(OAI_CHAT, "\"stream\": \"yes\"", "stream");
    REFUSED(OAI_CHAT, "\"stream_options\": 1", "stream_options");
    REFUSED(OAI_CHAT, "\"tools\": [{\"type\": \"function\"}]", "tools");
    REFUSED(OAI_CHAT, "\"response_format\": {\"type\": \"xml\"}", "response_format");
    REFUSED(OAI_CHAT, "\"response_format\": {\"type\": \"json_schema\"}", "response_format");
    REFUSED(OAI_CHAT, "\"response_format\": \"json\"", "response_format");
    REFUSED(OAI_CHAT, "\"guided_choice\": []", "guided_choice");
    REFUSED(OAI_CHAT, "\"guided_choice\": [\"a\", 3]", "guided_choice");
    REFUSED(OAI_CHAT, "\"guided_regex\": 5", "guided_regex");
    REFUSED(OAI_CHAT, "\"guided_json\": [1]", "guided_json");
    REFUSED(OAI_CHAT, "\"guided_regex\": \"a+\", \"guided_choice\": [\"b\"]", "response_format");
    REFUSED(OAI_CHAT, "\"timeout_ms\": -1", "timeout_ms");
#undef REFUSED
    refused(OAI_COMPLETION, "{\"prompt\": \"\"}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": []}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": 5}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": [1, \"a\"]}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": [\"a\", [1]]}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": [[1], []]}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": [-1]}", "prompt");
    refused(OAI_COMPLETION, "{\"prompt\": \"x\", \"echo\": true}", "echo");
    refused(OAI_COMPLETION, "{\"prompt\": \"x\", \"best_of\": 2}", "best_of");
    refused(OAI_COMPLETION, "{\"prompt\": \"x\", \"suffix\": \"y\"}", "suffix");
    refused(OAI_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": 21}", "logprobs");
    /* a batch over OAI_MAX_PROMPTS */
    char big[8 * (OAI_MAX_PROMPTS + 2)] = "{\"prompt\": [";
    for (int i = 0; i <= OAI_MAX_PROMPTS; i++) strcat(big, i ? ", \"p\"" : "\"p\"");
    strcat(big, "]}");
    refused(OAI_COMPLETION, big, "prompt");
}

/* response_format and the guided_* extensions become the request's one constraint. */
static void test_constraints_from_response_format_and_guided_fields(void **state)
{
    (void)state;
    oai_request_t r;
    oai_error_t e;
    folio_generate_params_t p;
    const char *m = "\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]";
    char body[1024];
    snprintf(body, sizeof body,
             "{%s, \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"p\", \"strict\": true, "
             "\"schema\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}}}}}", m);
    assert_int_equal(parse(OAI_CHAT, body, &r, &e), 0);
    oai_request_params(&r, 0, NULL, &p);
    assert_string_equal(p.json_schema, "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}");
    assert_null(p.regex);
    assert_int_equal(p.n_choices, 0);
    oai_request_free(&r);
    snprintf(body, sizeof body, "{%s, \"response_format\": {\"type\": \"json_object\"}}", m);
    assert_int_equal(parse(OAI_CHAT, body, &r, &e), 0);
    oai_request_params(&r, 0, NULL, &p);
    assert_string_equal(p.json_schema, "{\"type\":\"object\"}");
    oai_request_free(&r);
    snprintf(body, sizeof body, "{%s, \"response_format\": {\"type\": \"text\"}, \"guided_choice\": [\"yes\", \"no\"]}", m);
    assert_int_equal(parse(OAI_CHAT, body, &r, &e), 0);
    oai_request_params(&r, 0, NULL, &p);
    assert_int_equal(p.n_choices, 2);
    assert_string_equal(p.choices[1], "no");
    assert_null(p.json_schema);
    oai_request_free(&r);
    assert_int_equal(parse(OAI_COMPLETION, "{\"prompt\": \"x\", \"guided_regex\": \"[0-9]+\"}", &r, &e), 0);
    oai_request_params(&r, 0, NULL, &p);
    assert_string_equal(p.regex, "[0-9]+");
    oai_request_free(&r);
    assert_int_equal(parse(OAI_COMPLETION, "{\"prompt\": \"x\", \"guided_json\": \"{\\\"type\\\": \\\"boolean\\\"}\"}", &r, &e), 0);
    oai_request_params(&r, 0, NULL, &p);
    assert_string_equal(p.json_schema, "{\"type\": \"boolean\"}");
    oai_request_free(&r);
}

static void test_status_codes_map_to_http(void **state)
{
    (void)state;
    oai_error_t e;
    oai_error_from_status(FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT, 0, "bad", &e);
    assert_int_equal(e.http_status, 400);
    assert_string_equal(e.message, "bad");
    oai_error_from_status(FOLIO__V1__STATUS_CODE__NOT_FOUND, 0, "x", &e);
    assert_int_equal(e.http_status, 404);
    oai_error_from_status(FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, 1500, "full", &e);
    assert_int_equal(e.http_status, 429);
    assert_int_equal(e.retry_after_s, 2); /* rounded up */
    assert_string_equal(e.type, "rate_limit_error");
    oai_error_from_status(FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED, 0, "too long", &e);
    assert_int_equal(e.http_status, 400); /* never fits */
    assert_string_equal(e.code, "context_length_exceeded");
    assert_int_equal(e.retry_after_s, 0);
    oai_error_from_status(FOLIO__V1__STATUS_CODE__UNAVAILABLE, 0, "", &e);
    assert_int_equal(e.http_status, 503);
    assert_true(e.message[0] != 0); /* a message even when the cluster gave none */
    oai_error_from_status(FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED, 0, "late", &e);
    assert_int_equal(e.http_status, 504);
    oai_error_from_status(FOLIO__V1__STATUS_CODE__INTERNAL, 0, "boom", &e);
    assert_int_equal(e.http_status, 500);
    oai_error_from_status(99, 0, "odd", &e);
    assert_int_equal(e.http_status, 500);

    oai_fail(&e, 400, NULL, "field %s", "x");
    snprintf(e.param, sizeof e.param, "temperature");
    char *json = oai_error_json(&e);
    cJSON *o = cJSON_Parse(json), *er = cJSON_GetObjectItem(o, "error");
    assert_string_equal(cJSON_GetObjectItem(er, "message")->valuestring, "field x");
    assert_string_equal(cJSON_GetObjectItem(er, "type")->valuestring, "invalid_request_error");
    assert_string_equal(cJSON_GetObjectItem(er, "param")->valuestring, "temperature");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(er, "code")));
    cJSON_Delete(o);
    free(json);
}

static cJSON *choice0(cJSON *o)
{
    return cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0);
}

static int fake_token_text(void *ctx, int32_t id, char *buf, size_t cap)
{
    (void)ctx;
    if (id == 9) { /* the first byte of a two-byte character: not valid UTF-8 alone */
        buf[0] = (char)0xC3;
        return 1;
    }
    return snprintf(buf, cap, "t%d", (int)id);
}

static void test_responses_in_openai_shapes(void **state)
{
    (void)state;
    oai_request_t r;
    oai_error_t e;
    assert_int_equal(parse(OAI_CHAT,
                           "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": true,"
                           "\"top_logprobs\": 1, \"return_token_ids\": true, \"stream\": true,"
                           "\"stream_options\": {\"include_usage\": true}}",
                           &r, &e),
                     0);
    Folio__V1__TokenLogprob ch[2], top[2], *tops[2][1];
    Folio__V1__TokenLogprobs lps[2], *lp[2];
    for (int i = 0; i < 2; i++) {
        folio__v1__token_logprob__init(&ch[i]);
        folio__v1__token_logprob__init(&top[i]);
        folio__v1__token_logprobs__init(&lps[i]);
        ch[i].token = i ? 9 : 4;
        ch[i].logprob = -0.5f;
        top[i].token = 4;
        top[i].logprob = -0.25f;
        tops[i][0] = &top[i];
        lps[i].chosen = &ch[i];
        lps[i].top = tops[i];
        lps[i].n_top = 1;
        lp[i] = &lps[i];
    }
    const int32_t toks[2] = {4, 9};
    oai_writer_t w = {.rq = &r, .id = "chatcmpl-1", .created = 123, .model = "tiny", .token_text = fake_token_text};
    const oai_choice_t c = {.index = 0,
                            .text = "hi",
                            .tokens = toks,
                            .n_tokens = 2,
                            .logprobs = lp,
                            .n_logprobs = 2,
                            .finish_reason = FOLIO__V1__FINISH_REASON__FINISH_LENGTH};
    const oai_usage_t u = {.prompt_tokens = 10, .cached_tokens = 4, .completion_tokens = 2};

    char *json = oai_response_json(&w, &c, 1, &u);
    cJSON *o = cJSON_Parse(json);
    assert_non_null(o);
    assert_string_equal(cJSON_GetObjectItem(o, "object")->valuestring, "chat.completion");
    assert_string_equal(cJSON_GetObjectItem(o, "id")->valuestring, "chatcmpl-1");
    assert_int_equal(cJSON_GetObjectItem(o, "created")->valueint, 123);
    cJSON *c0 = choice0(o);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "message"), "content")->valuestring, "hi");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "message"), "role")->valuestring, "assistant");
    assert_string_equal(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "length");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(c0, "token_ids")), 2);
    cJSON *content = cJSON_GetObjectItem(cJSON_GetObjectItem(c0, "logprobs"), "content");
    assert_int_equal(cJSON_GetArraySize(content), 2);
    cJSON *t1 = cJSON_GetArrayItem(content, 1);
    assert_string_equal(cJSON_GetObjectItem(t1, "token")->valuestring, "\xEF\xBF\xBD");        /* U+FFFD ... */
    assert_int_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(t1, "bytes"), 0)->valueint, 0xC3); /* ... exact bytes */
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(t1, "top_logprobs")), 1);
    cJSON *usage = cJSON_GetObjectItem(o, "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "total_tokens")->valueint, 12);
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(usage, "prompt_tokens_details"), "cached_tokens")->valueint, 4);
    cJSON_Delete(o);
    free(json);

    /* chunks: the opening one with the role, content deltas, usage null until the usage chunk */
    const oai_choice_t open = {.index = 0};
    json = oai_chunk_json(&w, &open, true);
    o = cJSON_Parse(json);
    assert_string_equal(cJSON_GetObjectItem(o, "object")->valuestring, "chat.completion.chunk");
    cJSON *d = cJSON_GetObjectItem(choice0(o), "delta");
    assert_string_equal(cJSON_GetObjectItem(d, "role")->valuestring, "assistant");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(choice0(o), "finish_reason")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(o, "usage")));
    cJSON_Delete(o);
    free(json);
    const oai_choice_t end = {.index = 0, .finish_reason = FOLIO__V1__FINISH_REASON__FINISH_STOP};
    json = oai_chunk_json(&w, &end, false);
    o = cJSON_Parse(json);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(choice0(o), "delta")), 0); /* {} */
    assert_string_equal(cJSON_GetObjectItem(choice0(o), "finish_reason")->valuestring, "stop");
    assert_null(cJSON_GetObjectItem(choice0(o), "token_ids"));
    cJSON_Delete(o);
    free(json);
    json = oai_usage_chunk_json(&w, &u);
    o = cJSON_Parse(json);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(o, "choices")), 0);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "usage"), "completion_tokens")->valueint, 2);
    cJSON_Delete(o);
    free(json);
    oai_request_free(&r);

    /* completions: text, legacy logprobs (token_id:N without token text), finish reasons */
    assert_int_equal(parse(OAI_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": 1}", &r, &e), 0);
    w = (oai_writer_t){.rq = &r, .id = "cmpl-1", .created = 1, .model = "tiny"};
    json = oai_response_json(&w, &c, 1, &u);
    o = cJSON_Parse(json);
    assert_string_equal(cJSON_GetObjectItem(o, "object")->valuestring, "text_completion");
    c0 = choice0(o);
    assert_string_equal(cJSON_GetObjectItem(c0, "text")->valuestring, "hi");
    assert_null(cJSON_GetObjectItem(c0, "token_ids")); /* not asked for */
    cJSON *l = cJSON_GetObjectItem(c0, "logprobs");
    assert_string_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(l, "tokens"), 0)->valuestring, "token_id:4");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(l, "token_logprobs")), 2);
    assert_non_null(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(l, "top_logprobs"), 0), "token_id:4"));
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(l, "text_offset")), 2);
    cJSON_Delete(o);
    free(json);
    oai_request_free(&r);
    assert_string_equal(oai_finish_reason(FOLIO__V1__FINISH_REASON__FINISH_STOP), "stop");
    assert_string_equal(oai_finish_reason(FOLIO__V1__FINISH_REASON__FINISH_LENGTH), "length");
    assert_string_equal(oai_finish_reason(FOLIO__V1__FINISH_REASON__FINISH_CANCELLED), "abort");
    assert_null(oai_finish_reason(FOLIO__V1__FINISH_REASON__FINISH_NONE));
}

static void test_models_from_status(void **state)
{
    (void)state;
    char name[64];
    oai_model_name("SmolLM2-135M-Instruct.Q4_1.gguf:12345", name, sizeof name);
    assert_string_equal(name, "SmolLM2-135M-Instruct.Q4_1");
    oai_model_name("fake", name, sizeof name);
    assert_string_equal(name, "fake");
    assert_true(oai_model_matches("tiny", "tiny.gguf:99"));
    assert_true(oai_model_matches("tiny.gguf", "tiny.gguf:99"));
    assert_true(oai_model_matches("tiny.gguf:99", "tiny.gguf:99"));
    assert_false(oai_model_matches("tin", "tiny.gguf:99"));
    assert_false(oai_model_matches("tiny.gguf:9", "tiny.gguf:99"));

    Folio__V1__StatusReply s;
    Folio__V1__GroupStatus g[3], *gp[3];
    folio__v1__status_reply__init(&s);
    const char *ids[3] = {"tiny.gguf:99", "other.gguf:5", "tiny.gguf:99"};
    for (int i = 0; i < 3; i++) {
        folio__v1__group_status__init(&g[i]);
        g[i].model_id = (char *)ids[i];
        gp[i] = &g[i];
    }
    s.groups = gp;
    s.n_groups = 3;
    char *json = oai_models_json(&s, 7);
    cJSON *o = cJSON_Parse(json);
    assert_string_equal(cJSON_GetObjectItem(o, "object")->valuestring, "list");
    cJSON *data = cJSON_GetObjectItem(o, "data");
    assert_int_equal(cJSON_GetArraySize(data), 2); /* one entry per distinct model */
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(data, 0), "id")->valuestring, "tiny");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(data, 0), "object")->valuestring, "model");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(data, 1), "id")->valuestring, "other");
    cJSON_Delete(o);
    free(json);
    json = oai_model_json(&s, "other", 7);
    assert_non_null(json);
    free(json);
    assert_null(oai_model_json(&s, "absent", 7));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_request_fields_become_generate_parameters),
        cmocka_unit_test(test_completion_prompt_forms),
        cmocka_unit_test(test_bad_requests_are_400_naming_the_field),
        cmocka_unit_test(test_constraints_from_response_format_and_guided_fields),
        cmocka_unit_test(test_status_codes_map_to_http),
        cmocka_unit_test(test_responses_in_openai_shapes),
        cmocka_unit_test(test_models_from_status),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
