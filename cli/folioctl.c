/* folioctl - folio's command-line tool for users and operators.
 *
 *   folioctl run -p TEXT [-n N] [--chat] [sampling] [--json]   offline generation in this process
 *   folioctl chat [-p TEXT]                                     chat (template applied); without -p a
 *                                                               multi-turn REPL on stdin (/reset clears)
 *   folioctl tokenize -p TEXT [--chat] [--json]                 token ids as `run` feeds them
 *
 * Text streams to stdout as it is generated, in whole UTF-8 characters. --json prints one JSON
 * object on the last line of stdout (DESIGN.md's contract: tokens, text, finish_reason, usage,
 * timings). Logs go to stderr. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_common.h"
#include "engine.h"
#include "log.h"

typedef struct run_flags {
    engine_opts_t engine;
    const char *prompt;
    long max_tokens;
    double temperature, top_p;
    long top_k, seed;
    bool json, chat, ignore_eos;
    const char *system;
} run_flags_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folioctl <command> [flags]\n"
            "commands:\n"
            "  run        generate from a prompt in this process (raw completion; --chat applies the template)\n"
            "  chat       chat with the model (template applied); interactive without -p\n"
            "  tokenize   print the token ids of a prompt as run would feed it\n"
            "flags:\n"
            "  -p, --prompt TEXT     prompt text\n"
            "  -n, --max-tokens N    tokens to generate (default 128)\n"
            "  --temperature F       0 = greedy (default 0)\n"
            "  --top-k N             sample among the N most likely (default 0: off)\n"
            "  --top-p F             nucleus sampling (default 1: off)\n"
            "  --seed N              sampling seed (default 0)\n"
            "  --chat                apply the model's chat template to -p as a user message\n"
            "  --system TEXT         system message for --chat / chat\n"
            "  --ignore-eos          keep generating past end-of-generation tokens\n"
            "  --json                print one JSON object with tokens, text, finish_reason, usage, timings\n"
            "%s",
            cli_engine_flags_help());
}

static int parse_flags(run_flags_t *f, int argc, char **argv)
{
    memset(f, 0, sizeof *f);
    f->max_tokens = 128;
    f->top_p = 1.0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = cli_parse_engine_flag(&f->engine, argc, argv, &i);
        if (r < 0) return -1;
        if (r > 0) continue;
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(f->prompt = cli_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) {
            if (!(v = cli_value(argc, argv, &i)) || !cli_parse_int(a, v, 0, 1 << 20, &f->max_tokens)) return -1;
        } else if (!strcmp(a, "--temperature")) {
            if (!(v = cli_value(argc, argv, &i)) || !cli_parse_float(a, v, 0, 100, &f->temperature)) return -1;
        } else if (!strcmp(a, "--top-k")) {
            if (!(v = cli_value(argc, argv, &i)) || !cli_parse_int(a, v, 0, 1 << 24, &f->top_k)) return -1;
        } else if (!strcmp(a, "--top-p")) {
            if (!(v = cli_value(argc, argv, &i)) || !cli_parse_float(a, v, 0, 1, &f->top_p)) return -1;
        } else if (!strcmp(a, "--seed")) {
            if (!(v = cli_value(argc, argv, &i)) || !cli_parse_int(a, v, 0, __LONG_MAX__, &f->seed)) return -1;
        } else if (!strcmp(a, "--system")) {
            if (!(f->system = cli_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--json")) {
            f->json = true;
        } else if (!strcmp(a, "--chat")) {
            f->chat = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            f->ignore_eos = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "error: unknown flag '%s' (folioctl %s --help)\n", a, argv[1]);
            return -1;
        }
    }
    return 0;
}

/* A conversation: the messages so far (strings owned), for `chat`'s multi-turn REPL. */
typedef struct conversation {
    tok_chat_msg_t *msgs;
    int n, cap;
} conversation_t;

static bool conversation_add(conversation_t *c, const char *role, const char *content, size_t len)
{
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 8;
        tok_chat_msg_t *m = realloc(c->msgs, (size_t)cap * sizeof *m);
        if (!m) return false;
        c->msgs = m;
        c->cap = cap;
    }
    char *r = strdup(role), *t = strndup(content, len);
    if (!r || !t) {
        free(r);
        free(t);
        return false;
    }
    c->msgs[c->n++] = (tok_chat_msg_t){r, t};
    return true;
}

static void conversation_free(conversation_t *c)
{
    for (int i = 0; i < c->n; i++) {
        free((char *)c->msgs[i].role);
        free((char *)c->msgs[i].content);
    }
    free(c->msgs);
    *c = (conversation_t){0};
}

/* Tokenizes the prompt as `run` feeds it: raw text with the model's BOS policy, or (chat) the
 * conversation so far plus this user message through the chat template, special tokens parsed.
 * Returns a malloc'd array, *n its length; NULL on error. */
static int32_t *encode_prompt(const tok_t *tok, const char *text, bool chat, const char *system,
                              const conversation_t *history, int *n)
{
    char *templated = NULL;
    const char *src = text;
    if (chat) {
        const int n_hist = history ? history->n : 0;
        tok_chat_msg_t *msgs = malloc((size_t)(n_hist + 2) * sizeof *msgs);
        if (!msgs) return NULL;
        int nm = 0;
        if (system) msgs[nm++] = (tok_chat_msg_t){"system", system};
        for (int i = 0; i < n_hist; i++) msgs[nm++] = history->msgs[i];
        msgs[nm++] = (tok_chat_msg_t){"user", text};
        int len = tok_chat_apply(tok, msgs, nm, true, NULL, 0);
        if (len < 0 || !(templated = malloc((size_t)len + 1))) {
            fprintf(stderr, "error: cannot apply the model's chat template (%s)\n", fl_strerror(len));
            free(msgs);
            return NULL;
        }
        tok_chat_apply(tok, msgs, nm, true, templated, (size_t)len + 1);
        free(msgs);
        src = templated;
    }
    const size_t len = strlen(src);
    const int cap = (int)(len + 16);
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int count = ids ? tok_encode(tok, src, len, tok_add_bos(tok), chat, ids, cap) : FL_ENOMEM;
    free(templated);
    if (count < 0 || count > cap) {
        fprintf(stderr, "error: tokenizing the prompt failed (%s)\n", fl_strerror(count < 0 ? count : FL_ERANGE));
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

static void on_token(void *user, int request, int32_t token)
{
    (void)request;
    stream_ctx_t *s = user;
    char buf[4096];
    int n = tok_stream_push(&s->stream, s->tok, token, buf, sizeof buf);
    if (s->print && n > 0) {
        fwrite(buf, 1, (size_t)n, stdout);
        fflush(stdout);
    }
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
static int generate_one(engine_t *e, const run_flags_t *f, const char *prompt_text, bool chat,
                        conversation_t *history)
{
    int n_prompt = 0;
    int32_t *prompt = encode_prompt(e->model->tok, prompt_text, chat, f->system, history, &n_prompt);
    if (!prompt) return 1;
    int32_t *out = malloc((size_t)(f->max_tokens > 0 ? f->max_tokens : 1) * sizeof *out);
    gen_request_t r = {.prompt = prompt, .n_prompt = n_prompt, .max_tokens = (int)f->max_tokens,
                       .sampling = {.temperature = (float)f->temperature, .top_k = (int)f->top_k,
                                    .top_p = (float)f->top_p, .seed = (uint64_t)f->seed},
                       .ignore_eog = f->ignore_eos, .tokens = out};
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

static engine_t *open_engine(const run_flags_t *f)
{
    fl_error_t err = {0};
    fprintf(stderr, "loading %s ...\n", model_default_path(f->engine.model_path));
    engine_t *e = engine_new(&f->engine, &err);
    if (!e) fprintf(stderr, "error: %s\n", err.msg);
    return e;
}

static int cmd_run(const run_flags_t *f, bool chat)
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

static int cmd_chat(const run_flags_t *f)
{
    if (f->prompt) return cmd_run(f, true);
    engine_t *e = open_engine(f);
    if (!e) return 1;
    /* Interactive: each line is a user turn; the conversation so far is the context. "/reset"
     * starts over. A turn that no longer fits the context ends with its error, and the user can reset. */
    conversation_t conv = {0};
    char line[8192];
    if (isatty(0)) fprintf(stderr, "> ");
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "/reset")) {
            conversation_free(&conv);
        } else if (*line) {
            generate_one(e, f, line, true, &conv);
        }
        if (isatty(0)) fprintf(stderr, "> ");
    }
    conversation_free(&conv);
    engine_destroy(&e);
    return 0;
}

static int cmd_tokenize(const run_flags_t *f)
{
    if (!f->prompt) {
        fprintf(stderr, "error: tokenize needs -p TEXT\n");
        return 2;
    }
    fl_error_t err = {0};
    gguf_t *g = gguf_open(model_default_path(f->engine.model_path), &err);
    tok_t *tok = g ? tok_new_from_gguf(g, &err) : NULL;
    if (!tok) {
        fprintf(stderr, "error: %s\n", err.msg);
        gguf_destroy(&g);
        return 1;
    }
    int n = 0;
    int32_t *ids = encode_prompt(tok, f->prompt, f->chat, f->system, NULL, &n);
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

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    run_flags_t f;
    if (parse_flags(&f, argc, argv)) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run")) return cmd_run(&f, f.chat);
    if (!strcmp(cmd, "chat")) return cmd_chat(&f);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(&f);
    fprintf(stderr, "error: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
