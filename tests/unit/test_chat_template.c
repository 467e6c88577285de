/* test_chat_template.c - folio's chat templates (common/chat_template.c) against llama.cpp's
 * llama_chat_apply_template.
 *
 * tests/fixtures/chat_templates.json (tools/gen_chat_templates.py) holds llama.cpp's tests'
 * templates, real Hugging Face templates of each family folio renders (Qwen 2.5/3 ChatML, Mistral,
 * Phi-3, Gemma, Llama 3) and llama.cpp's template names, each applied to a few conversations by
 * llama-cpp-python 0.3.16. Every case must render byte for byte as the fixture expects (llama.cpp's
 * output, or the template's own for a ChatML default system message), templates of families folio
 * does not render must be refused, and the rendered prompt must tokenize (its plain spans valid). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "test_util.h"
#include "tokenizer.h"

static cJSON *load_fixture(void)
{
    const char *dir = getenv("FOLIO_FIXTURES");
    char path[4096];
    snprintf(path, sizeof path, "%s/chat_templates.json", dir ? dir : "tests/fixtures");
    char *text = fl_read_file(path, NULL);
    if (!text) fail_msg("cannot read %s", path);
    cJSON *doc = cJSON_Parse(text);
    free(text);
    assert_non_null(doc);
    return doc;
}

static tok_t *tok_with_template(const char *tmpl)
{
    static const char *const tokens[] = {"<|im_start|>", "<|im_end|>", "a"};
    static const int32_t types[] = {TOK_TYPE_CONTROL, TOK_TYPE_CONTROL, TOK_TYPE_NORMAL};
    tok_desc_t d = {.n_vocab = 3, .tokens = tokens, .token_types = types, .pre = "gpt2", .bos_id = -1,
                    .eos_id = 1, .unk_id = -1, .pad_id = -1, .chat_template = tmpl};
    fl_error_t err = {0};
    tok_t *t = tok_new(&d, &err);
    if (!t) fail_msg("tok_new: %s", err.msg);
    return t;
}

static void test_chat_templates_render_as_llama_cpp(void **state)
{
    (void)state;
    cJSON *doc = load_fixture();
    const cJSON *convs = cJSON_GetObjectItem(doc, "conversations"), *tmpl;
    int n_cases = 0, n_pass = 0, n_refused = 0;
    cJSON_ArrayForEach(tmpl, cJSON_GetObjectItem(doc, "templates"))
    {
        const char *name = cJSON_GetObjectItem(tmpl, "name")->valuestring;
        const cJSON *folio = cJSON_GetObjectItem(tmpl, "folio");
        const bool unsupported = folio && !strcmp(folio->valuestring, "unsupported");
        tok_t *t = tok_with_template(cJSON_GetObjectItem(tmpl, "template")->valuestring);
        const cJSON *c;
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(tmpl, "cases"))
        {
            const cJSON *conv = cJSON_GetArrayItem(convs, cJSON_GetObjectItem(c, "conversation")->valueint);
            tok_chat_msg_t msgs[16];
            int n = 0;
            const cJSON *m;
            cJSON_ArrayForEach(m, conv)
            {
                assert_true(n < 16);
                msgs[n].role = cJSON_GetObjectItem(m, "role")->valuestring;
                msgs[n].content = cJSON_GetObjectItem(m, "content")->valuestring;
                n++;
            }
            const bool add_ass = cJSON_IsTrue(cJSON_GetObjectItem(c, "add_ass"));
            const cJSON *expect = cJSON_GetObjectItem(c, "expect");
            n_cases++;
            const int len = tok_chat_apply(t, msgs, n, add_ass, NULL, 0);
            if (unsupported || cJSON_IsNull(expect)) {
                if (len == FL_EUNSUPPORTED) {
                    n_pass++;
                    n_refused++;
                } else
                    fprintf(stderr, "%s: rendered (%d) a template folio should refuse\n", name, len);
                continue;
            }
            char *out = len >= 0 ? malloc((size_t)len + 1) : NULL;
            if (out && tok_chat_apply(t, msgs, n, add_ass, out, (size_t)len + 1) == len &&
                !strcmp(out, expect->valuestring))
                n_pass++;
            else
                fprintf(stderr, "%s (conversation %d, add_ass %d): got (%d)\n%s\n---- want\n%s\n----\n", name,
                        cJSON_GetObjectItem(c, "conversation")->valueint, add_ass, len, out ? out : "",
                        expect->valuestring);
            free(out);
            /* the prompt ids: the template's plain spans must be valid whatever the family */
            int32_t *ids = NULL;
            int cap = 0;
            fl_error_t err = {0};
            const int ni = tok_encode_prompt(t, NULL, 0, false, msgs, n, &ids, &cap, &err);
            if (ni < 0) fail_msg("%s: tok_encode_prompt: %s", name, err.msg);
            free(ids);
        }
        tok_destroy(&t);
    }
    fprintf(stderr, "chat templates: %d/%d cases as llama.cpp (%d refused as llama.cpp's other families)\n", n_pass,
            n_cases, n_refused);
    assert_true(n_cases >= 400);
    assert_int_equal(n_pass, n_cases);
    cJSON_Delete(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_templates_render_as_llama_cpp),
    };
    return cmocka_run_group_tests_name("chat_template", tests, NULL, NULL);
}
