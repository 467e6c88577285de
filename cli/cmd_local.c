/* cmd_local.c - folioctl's offline commands: the model runs in this process, no cluster.
 *
 *   run -p TEXT        generation streamed as it is produced (--chat: the template applied)
 *   chat --local       chat; without -p a multi-turn REPL on stdin (/reset clears)
 *   tokenize -p TEXT   the token ids run (and the coordinator) feed the model
 *
 * Generation goes through gen_run, the batching loop the engine benchmark uses too; the prompt is
 * encoded as the coordinator encodes it (tok_encode_prompt), and the flags become a GenerateRequest
 * that the request layer resolves and streams as the worker does, so run and generate feed the
 * same ids with the same defaults and rules. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "folioctl.h"
#include "log.h"
#include "model_path.h"
#include "request.h"

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

/* One run's output, through the request layer's stream as the worker's: text as it becomes final
 * (held back while it could begin a stop string), the tokens, their log-probabilities. */
typedef struct run_out {
    request_stream_t stream;
    bool print;
    bool failed;      /* out of memory */
    int32_t *tokens;  /* the completion, as handed out */
    int n_tokens;
    char *text;
    size_t n_text, cap_text;
    cJSON *logprobs;  /* --logprobs with --json */
} run_out_t;

static cJSON *logprob_json(const kern_logprob_t *l)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "token", l->token);
    cJSON_AddNumberToObject(o, "logprob", l->logprob);
    return o;
}

/* Takes what the stream may hand out now (final: everything) and prints or keeps it. */
static void run_out_take(run_out_t *o, bool final)
{
    request_delta_t d;
    if (!request_stream_peek(&o->stream, final, &d)) {
        request_stream_done(&o->stream, false);
        return;
    }
    if (o->print && d.n_text) {
        fwrite(d.text, 1, d.n_text, stdout);
        fflush(stdout);
    }
    if (o->n_text + d.n_text + 1 > o->cap_text) {
        size_t cap = o->cap_text ? o->cap_text : 256;
        while (cap < o->n_text + d.n_text + 1) cap *= 2;
        char *t = realloc(o->text, cap);
        if (!t) {
            o->failed = true;
            request_stream_done(&o->stream, true);
            return;
        }
        o->text = t;
        o->cap_text = cap;
    }
    memcpy(o->text + o->n_text, d.text, d.n_text);
    o->n_text += d.n_text;
    o->text[o->n_text] = 0;
    memcpy(o->tokens + o->n_tokens, d.tokens, (size_t)d.n_tokens * sizeof *d.tokens);
    o->n_tokens += d.n_tokens;
    for (int i = 0; o->logprobs && d.logprobs && i < d.n_tokens; i++) {
        cJSON *e = logprob_json(&d.logprobs[i].chosen);
        cJSON *top = cJSON_AddArrayToObject(e, "top");
        for (int k = 0; k < d.logprobs[i].n_top; k++) cJSON_AddItemToArray(top, logprob_json(&d.logprobs[i].top[k]));
        cJSON_AddItemToArray(o->logprobs, e);
    }
    request_stream_done(&o->stream, true);
}

static bool on_token(void *user, int request, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)request;
    run_out_t *o = user;
    const int rc = request_stream_push(&o->stream, index, token, lp);
    if (rc < 0) {
        o->failed = true;
        return true;
    }
    run_out_take(o, false);
    return rc == 1; /* a stop string matched */
}

static const char *finish_name(const gen_request_t *r, const run_out_t *o)
{
    if (r->finish == GEN_FINISH_ERROR) return "error";
    return r->finish == GEN_FINISH_STOP || o->stream.stopped ? "stop" : "length";
}

static void print_json(int n_prompt, const gen_request_t *r, run_out_t *o, const gen_stats_t *st)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(j, "tokens");
    for (int i = 0; i < o->n_tokens; i++) cJSON_AddItemToArray(toks, cJSON_CreateNumber(o->tokens[i]));
    cJSON_AddStringToObject(j, "text", o->text ? o->text : "");
    cJSON_AddStringToObject(j, "finish_reason", finish_name(r, o));
    if (r->finish == GEN_FINISH_ERROR) cJSON_AddStringToObject(j, "error", r->error);
    cJSON *u = cJSON_AddObjectToObject(j, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", n_prompt);
    cJSON_AddNumberToObject(u, "cached_prompt_tokens", 0);
    cJSON_AddNumberToObject(u, "completion_tokens", o->stream.n_out);
    cJSON_AddNumberToObject(u, "drafted_tokens", r->n_drafted);
    cJSON_AddNumberToObject(u, "accepted_tokens", r->n_accepted);
    cJSON *t = cJSON_AddObjectToObject(j, "timings");
    const double ttft = r->t_first_token > 0 ? r->t_first_token - r->t_submit : 0;
    cJSON_AddNumberToObject(t, "queued_ms", 0);
    cJSON_AddNumberToObject(t, "first_token_ms", ttft * 1e3);
    cJSON_AddNumberToObject(t, "total_ms", (r->t_done - r->t_submit) * 1e3);
    cJSON_AddNumberToObject(t, "prefill_tokens_per_s", st->prefill_s > 0 ? st->prompt_tokens / st->prefill_s : 0);
    cJSON_AddNumberToObject(t, "decode_tokens_per_s",
                            st->decode_s > 0 && r->n_tokens > 1 ? (r->n_tokens - 1) / st->decode_s : 0);
    if (o->logprobs) {
        cJSON_AddItemToObject(j, "logprobs", o->logprobs);
        o->logprobs = NULL;
    }
    char *s = cJSON_PrintUnformatted(j);
    printf("%s\n", s);
    cJSON_free(s);
    cJSON_Delete(j);
}

/* Generates from one prompt; streams when not in JSON mode. The flags become a GenerateRequest
 * that the request layer resolves exactly as the worker resolves one from the network. With a
 * conversation, the prompt is the next user turn and both it and the answer are appended to it.
 * Returns the process exit status. */
static int generate_one(engine_t *e, const ctl_flags_t *f, const char *prompt_text, bool chat,
                        conversation_t *history)
{
    const model_t *m = e->model;
    int n_prompt = 0;
    int32_t *prompt = encode_prompt(m->tok, prompt_text, false, chat, f->system, history, &n_prompt);
    if (!prompt) return 1;
    if (n_prompt == 0) {
        fprintf(stderr, "error: empty prompt: nothing to generate from\n");
        free(prompt);
        return 1;
    }
    Folio__V1__GenerateRequest g = FOLIO__V1__GENERATE_REQUEST__INIT;
    cli_gen_request(&f->gen, &g);
    g.prompt_tokens = prompt;
    g.n_prompt_tokens = (size_t)n_prompt;
    request_defaults_t defaults;
    request_defaults_init(&defaults, m->gguf);
    request_t rq;
    fl_error_t err = {0};
    if (request_resolve(&rq, 0, &g, "", 0, &defaults, m->cfg.n_vocab, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        free(prompt);
        return 2;
    }
    const sched_request_t *q = &rq.sched;
    const int max_out = q->max_tokens > 0 ? q->max_tokens : 1;
    run_out_t o = {.print = !f->json, .tokens = malloc((size_t)max_out * sizeof *o.tokens),
                   .logprobs = f->json && q->logprobs ? cJSON_CreateArray() : NULL};
    int32_t *out = malloc((size_t)max_out * sizeof *out);
    gen_request_t r = {.req = *q, .tokens = out};
    gen_stats_t st = {0};
    int rc = out && o.tokens ? request_stream_open(&o.stream, m->tok, rq.stops, rq.n_stops, q->logprobs, &err)
                             : fl_fail(&err, FL_ENOMEM, "out of memory");
    if (!rc) rc = gen_run_with_heads(e->model, e->kv, e->medusa, &r, 1, on_token, &o, &st, &err);
    if (!rc) {
        request_stream_end(&o.stream);
        run_out_take(&o, true);
        if (o.failed) rc = fl_fail(&err, FL_ENOMEM, "out of memory for the output");
    }
    if (!rc && !f->json) {
        printf("\n");
        fflush(stdout);
        fl_log_info("generated prompt_tokens=%d completion_tokens=%d drafted_tokens=%d accepted_tokens=%d finish=%s "
                    "prefill_tok_s=%.1f decode_tok_s=%.1f",
                    n_prompt, o.stream.n_out, r.n_drafted, r.n_accepted, finish_name(&r, &o),
                    st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0,
                    st.decode_s > 0 ? (r.n_tokens - 1) / st.decode_s : 0.0);
    }
    if (rc) fprintf(stderr, "error: %s\n", err.msg);
    else if (f->json) print_json(n_prompt, &r, &o, &st);
    if (!rc && r.finish == GEN_FINISH_ERROR) {
        fprintf(stderr, "error: %s\n", r.error);
        rc = FL_EINVAL;
    }
    if (!rc && history) {
        const char *answer = o.text ? o.text : "";
        if (!conversation_add(history, "user", prompt_text, strlen(prompt_text)) ||
            !conversation_add(history, "assistant", answer, strlen(answer)))
            rc = FL_ENOMEM;
    }
    request_stream_free(&o.stream);
    request_release(&rq);
    cJSON_Delete(o.logprobs);
    free(o.tokens);
    free(o.text);
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
