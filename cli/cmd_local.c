/* cmd_local.c - folioctl's offline commands: the model runs in this process, no cluster.
 *
 *   run -p TEXT        generation streamed as it is produced (--chat: the template applied)
 *   chat --local       chat; without -p a multi-turn REPL on stdin (/reset clears)
 *   tokenize -p TEXT   the token ids run (and the coordinator) feed the model
 *
 * Generation goes through gen_run, the batching loop the engine benchmark uses too; the prompt is
 * encoded as the coordinator encodes it (tok_encode_prompt), so run and generate feed the same ids. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "folioctl.h"
#include "log.h"
#include "model_path.h"

/* Tokenizes the prompt as `run` feeds it: raw text with the model's BOS policy, its special-token
 * spellings parsed unless plain_text, or (chat) the conversation so far plus this user message
 * through the chat template (the template's markers special, the messages plain text).
 * Returns a malloc'd array, *n its length; NULL on error. */
static int32_t *encode_prompt(const tok_t *tok, const char *text, bool plain_text, bool chat, const char *system,
                              const conversation_t *history, int *n)
{
    /* The same encoding the coordinator applies (tok_encode_prompt), so run and generate feed the
     * model identical ids. */
    tok_chat_msg_t *msgs = NULL;
    int nm = 0;
    if (chat) {
        const int n_hist = history ? history->n : 0;
        if (!(msgs = malloc((size_t)(n_hist + 2) * sizeof *msgs))) return NULL;
        if (system) msgs[nm++] = (tok_chat_msg_t){"system", system};
        for (int i = 0; i < n_hist; i++) msgs[nm++] = history->msgs[i];
        msgs[nm++] = (tok_chat_msg_t){"user", text};
    }
    int32_t *ids = NULL;
    int cap = 0;
    fl_error_t err = {0};
    const int count = tok_encode_prompt(tok, text, strlen(text), plain_text, msgs, nm, &ids, &cap, &err);
    free(msgs);
    if (count < 0) {
        fprintf(stderr, "error: %s\n", err.msg);
        free(ids);
        return NULL;
    }
    *n = count;
    return ids;
}

typedef struct stream_ctx {
    const tok_t *tok;
    tok_stream_t stream;
    bool print;
} stream_ctx_t;

static bool on_token(void *user, int request, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)request;
    (void)index;
    (void)lp;
    stream_ctx_t *s = user;
    char buf[4096];
    int n = tok_stream_push(&s->stream, s->tok, token, buf, sizeof buf);
    if (s->print && n > 0) {
        fwrite(buf, 1, (size_t)n, stdout);
        fflush(stdout);
    }
    return false;
}

/* The generated text as the stream prints it: whole UTF-8 characters, bytes that never form one as
 * U+FFFD (JSON must be valid UTF-8). Returns a malloc'd NUL-terminated string, or NULL. */
static char *decode_text(const tok_t *tok, const int32_t *ids, int n)
{
    /* U+FFFD is 3 bytes and replaces at most one byte, so 3x the raw length plus the flush is enough. */
    const int raw = tok_decode(tok, ids, n, false, NULL, 0);
    const size_t cap = (raw > 0 ? (size_t)raw * 3 : 0) + 17;
    char *text = malloc(cap);
    if (!text) return NULL;
    tok_stream_t st;
    tok_stream_init(&st, false);
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        const int got = tok_stream_push(&st, tok, ids[i], text + len, cap - 1 - len);
        if (got > 0) len += (size_t)got;
    }
    const int got = tok_stream_flush(&st, text + len, cap - 1 - len);
    if (got > 0) len += (size_t)got;
    text[len] = 0;
    return text;
}

static void print_json(const model_t *m, int n_prompt, const gen_request_t *r, const gen_stats_t *st)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens");
    for (int i = 0; i < r->n_tokens; i++) cJSON_AddItemToArray(toks, cJSON_CreateNumber(r->tokens[i]));
    char *text = decode_text(m->tok, r->tokens, r->n_tokens);
    cJSON_AddStringToObject(o, "text", text ? text : "");
    free(text);
    cJSON_AddStringToObject(o, "finish_reason", gen_finish_name(r->finish));
    if (r->finish == GEN_FINISH_ERROR) cJSON_AddStringToObject(o, "error", r->error);
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", n_prompt);
    cJSON_AddNumberToObject(u, "cached_prompt_tokens", 0);
    cJSON_AddNumberToObject(u, "completion_tokens", r->n_tokens);
    cJSON *t = cJSON_AddObjectToObject(o, "timings");
    const double ttft = r->t_first_token > 0 ? r->t_first_token - r->t_submit : 0;
    cJSON_AddNumberToObject(t, "queued_ms", 0);
    cJSON_AddNumberToObject(t, "first_token_ms", ttft * 1e3);
    cJSON_AddNumberToObject(t, "total_ms", (r->t_done - r->t_submit) * 1e3);
    cJSON_AddNumberToObject(t, "prefill_tokens_per_s", st->prefill_s > 0 ? st->prompt_tokens / st->prefill_s : 0);
    cJSON_AddNumberToObject(t, "decode_tokens_per_s",
                            st->decode_s > 0 && r->n_tokens > 1 ? (r->n_tokens - 1) / st->decode_s : 0);
    char *s = cJSON_PrintUnformatted(o);
    printf("%s\n", s);
    cJSON_free(s);
    cJSON_Delete(o);
}

/* Generates from one prompt; streams when not in JSON mode. With a conversation, the prompt is the
 * next user turn and both it and the answer are appended to it. Returns the process exit status. */
static int generate_one(engine_t *e, const ctl_flags_t *f, const char *prompt_text, bool chat,
                        conversation_t *history)
{
    int n_prompt = 0;
    int32_t *prompt = encode_prompt(e->model->tok, prompt_text, false, chat, f->system, history, &n_prompt);
    if (!prompt) return 1;
    int32_t *out = malloc((size_t)(f->gen.max_tokens > 0 ? f->gen.max_tokens : 1) * sizeof *out);
    gen_request_t r = {.prompt = prompt, .n_prompt = n_prompt, .max_tokens = (int)f->gen.max_tokens,
                       .sampling = {.temperature = (float)f->gen.temperature, .top_k = (int)f->gen.top_k,
                                    .top_p = (float)f->gen.top_p, .seed = (uint64_t)f->gen.seed},
                       .ignore_eog = f->gen.ignore_eos, .tokens = out};
    stream_ctx_t sc = {.tok = e->model->tok, .print = !f->json};
    tok_stream_init(&sc.stream, false);
    gen_stats_t st = {0};
    fl_error_t err = {0};
    int rc = out ? gen_run(e->model, e->kv, &r, 1, on_token, &sc, &st, &err) : FL_ENOMEM;
    if (!rc && !f->json) {
        char buf[64];
        int n = tok_stream_flush(&sc.stream, buf, sizeof buf);
        if (n > 0) fwrite(buf, 1, (size_t)n, stdout);
        printf("\n");
        fflush(stdout);
        fl_log_info("generated prompt_tokens=%d completion_tokens=%d finish=%s prefill_tok_s=%.1f decode_tok_s=%.1f",
                    n_prompt, r.n_tokens, gen_finish_name(r.finish),
                    st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0,
                    st.decode_s > 0 ? (r.n_tokens - 1) / st.decode_s : 0.0);
    }
    if (rc) fprintf(stderr, "error: %s\n", err.msg);
    else if (f->json) print_json(e->model, n_prompt, &r, &st);
    if (!rc && r.finish == GEN_FINISH_ERROR) {
        fprintf(stderr, "error: %s\n", r.error);
        rc = FL_EINVAL;
    }
    if (!rc && history) {
        char *answer = decode_text(e->model->tok, r.tokens, r.n_tokens);
        if (!answer || !conversation_add(history, "user", prompt_text, strlen(prompt_text)) ||
            !conversation_add(history, "assistant", answer, strlen(answer)))
            rc = FL_ENOMEM;
        free(answer);
    }
    free(out);
    free(prompt);
    return rc ? 1 : 0;
}

static engine_t *open_engine(const ctl_flags_t *f)
{
    fl_error_t err = {0};
    fprintf(stderr, "loading %s ...\n", fl_model_path(f->engine.model_path));
    engine_t *e = engine_new(&f->engine, &err);
    if (!e) fprintf(stderr, "error: %s\n", err.msg);
    return e;
}

int cmd_run(const ctl_flags_t *f, bool chat)
{
    if (!f->prompt) {
        fprintf(stderr, "error: run needs -p TEXT\n");
        return 2;
    }
    engine_t *e = open_engine(f);
    if (!e) return 1;
    int rc = generate_one(e, f, f->prompt, chat, NULL);
    engine_destroy(&e);
    return rc;
}

typedef struct local_chat {
    engine_t *e;
    const ctl_flags_t *f;
    conversation_t conv;
} local_chat_t;

static int local_turn(void *user, const char *line)
{
    local_chat_t *lc = user;
    generate_one(lc->e, lc->f, line, true, &lc->conv);
    return 0;
}

int cmd_chat_local(const ctl_flags_t *f)
{
    if (f->prompt) return cmd_run(f, true);
    engine_t *e = open_engine(f);
    if (!e) return 1;
    /* Interactive: each line is a user turn; the conversation so far is the context. "/reset"
     * starts over. A turn that no longer fits the context ends with its error, and the user can reset. */
    local_chat_t lc = {.e = e, .f = f};
    ctl_repl(&lc.conv, local_turn, &lc);
    conversation_free(&lc.conv);
    engine_destroy(&e);
    return 0;
}

int cmd_tokenize(const ctl_flags_t *f)
{
    if (!f->prompt) {
        fprintf(stderr, "error: tokenize needs -p TEXT\n");
        return 2;
    }
    fl_error_t err = {0};
    gguf_t *g = gguf_open(fl_model_path(f->engine.model_path), &err);
    tok_t *tok = g ? tok_new_from_gguf(g, &err) : NULL;
    if (!tok) {
        fprintf(stderr, "error: %s\n", err.msg);
        gguf_destroy(&g);
        return 1;
    }
    int n = 0;
    int32_t *ids = encode_prompt(tok, f->prompt, f->plain_text, f->chat, f->system, NULL, &n);
    if (ids) {
        if (f->json) {
            cJSON *o = cJSON_CreateObject();
            cJSON *a = cJSON_AddArrayToObject(o, "tokens");
            for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
            char *s = cJSON_PrintUnformatted(o);
            printf("%s\n", s);
            cJSON_free(s);
            cJSON_Delete(o);
        } else {
            for (int i = 0; i < n; i++) {
                char piece[256];
                int len = tok_token_bytes(tok, ids[i], true, piece, sizeof piece - 1);
                piece[len > 0 && len < (int)sizeof piece ? len : 0] = 0;
                printf("%6d  '%s'\n", ids[i], piece);
            }
        }
    }
    free(ids);
    tok_destroy(&tok);
    gguf_destroy(&g);
    return ids ? 0 : 1;
}
