/* folioctl - folio's command-line tool for users and operators.
 *
 * Offline, in this process (no cluster):
 *   folioctl run -p TEXT [-n N] [--chat] [sampling] [--json]   generation, like llama-cli
 *   folioctl chat --local [-p TEXT]                             chat (template applied); without -p a
 *                                                               multi-turn REPL on stdin (/reset clears)
 *   folioctl tokenize -p TEXT [--chat] [--plain-text] [--json]  token ids as `run` feeds them
 * Through a coordinator (--coordinator EP, $FOLIO_COORDINATOR, tcp://127.0.0.1:5555):
 *   folioctl up [--groups N] ...                                start a local cluster in the foreground
 *   folioctl generate -p TEXT [--chat] [sampling] [--json]      streamed generation
 *   folioctl chat [-p TEXT]                                     chat, multi-turn REPL without -p
 *   folioctl status|health [--json]; folioctl drain|undrain GROUP
 *
 * Text streams to stdout as it is generated, in whole UTF-8 characters. --json prints one JSON
 * object on the last line of stdout (DESIGN.md's contract: tokens, text, finish_reason, usage,
 * timings). Logs go to stderr. Cluster commands are in the second half of this file. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli_cluster.h"
#include "model_path.h"
#include "flags.h"
#include "engine.h"
#include "folio_client.h"
#include "log.h"
#include "wire.h"

#define MAX_STOPS 64

typedef struct run_flags {
    engine_opts_t engine;
    const char *prompt;
    long max_tokens;
    double temperature, top_p;
    long top_k, seed;
    bool json, chat, ignore_eos;
    bool plain_text; /* tokenize: special-token spellings stay text */
    const char *system;
    /* cluster commands */
    bool local;              /* chat --local: offline */
    const char *coordinator; /* client endpoint */
    const char *tenant;
    long timeout_ms;
    const char *stops[MAX_STOPS];
    int n_stops;
    const char *positional; /* drain/undrain GROUP */
    /* up */
    long groups, threads_per_worker, max_batch_tokens, heartbeat_ms;
    const char *policy, *listen, *workers, *log_dir;
    bool no_prefix_cache;
} run_flags_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folioctl <command> [flags]\n"
            "commands, offline (the model runs in this process):\n"
            "  run        generate from a prompt (raw completion; --chat applies the template)\n"
            "  chat --local  chat with the model (template applied); interactive without -p\n"
            "  tokenize   print the token ids of a prompt as run would feed it\n"
            "commands, through a coordinator (--coordinator EP):\n"
            "  up         start a local cluster (coordinator + worker groups) in the foreground; Ctrl-C stops it\n"
            "  generate   generate from -p TEXT (--chat: as a user message), streamed\n"
            "  chat       chat (template applied); a multi-turn REPL on stdin without -p (/reset clears)\n"
            "  status     groups, load, KV use, prefix-cache hit rate, routing latency (--json: StatusReply)\n"
            "  health     whether the cluster serves (exit 0 when it does)\n"
            "  drain GROUP / undrain GROUP   stop / resume routing new requests to a worker group\n"
            "flags:\n"
            "  -p, --prompt TEXT     prompt text\n"
            "  -n, --max-tokens N    tokens to generate (default 128)\n"
            "  --temperature F       0 = greedy (default 0)\n"
            "  --top-k N             sample among the N most likely (default 0: off)\n"
            "  --top-p F             nucleus sampling (default 1: off)\n"
            "  --seed N              sampling seed (default 0)\n"
            "  --chat                apply the model's chat template to -p as a user message\n"
            "  --system TEXT         system message for --chat / chat\n"
            "  --plain-text          tokenize: \"<|im_start|>\" and other special-token spellings in -p stay\n"
            "                        text (default: they become the special tokens, as llama.cpp parses a raw\n"
            "                        prompt; chat message contents are always text)\n"
            "  --ignore-eos          keep generating past end-of-generation tokens\n"
            "  --json                print one JSON object with tokens, text, finish_reason, usage, timings\n"
            "cluster flags:\n"
            "  --coordinator EP      coordinator client endpoint (default $FOLIO_COORDINATOR or %s)\n"
            "  --stop S              stop string, repeatable (generate, chat)\n"
            "  --tenant T            prefix-cache tenant (requests of different tenants share no KV)\n"
            "  --timeout-ms N        request deadline (default: none)\n"
            "  --local               chat offline in this process instead of through a coordinator\n"
            "up flags (with -m, --kv-budget, --block-size below, passed to every worker):\n"
            "  --groups N            worker groups, one process each (default 2)\n"
            "  --threads-per-worker N  CPU threads per worker (default: cores / groups)\n"
            "  --policy P            coordinator routing policy (default: the coordinator's)\n"
            "  --listen EP           client endpoint to listen on (default: as --coordinator)\n"
            "  --workers EP          worker endpoint (default $FOLIO_WORKER_ENDPOINT or %s)\n"
            "  --max-batch-tokens N, --no-prefix-cache, --heartbeat-ms N   worker and coordinator tuning\n"
            "  --log-dir DIR         each process's log to DIR/<coordinator|worker-gN>.log (default: stderr)\n"
            "engine flags:\n"
            "%s",
            WIRE_DEFAULT_CLIENT_ENDPOINT, WIRE_DEFAULT_WORKER_ENDPOINT, engine_flags_help());
}

static int parse_flags(run_flags_t *f, int argc, char **argv)
{
    memset(f, 0, sizeof *f);
    f->max_tokens = 128;
    f->top_p = 1.0;
    f->groups = 2;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = engine_parse_flag(&f->engine, argc, argv, &i);
        if (r < 0) return -1;
        if (r > 0) continue;
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(f->prompt = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1 << 20, &f->max_tokens)) return -1;
        } else if (!strcmp(a, "--temperature")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(a, v, 0, 100, &f->temperature)) return -1;
        } else if (!strcmp(a, "--top-k")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1 << 24, &f->top_k)) return -1;
        } else if (!strcmp(a, "--top-p")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(a, v, 0, 1, &f->top_p)) return -1;
        } else if (!strcmp(a, "--seed")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, __LONG_MAX__, &f->seed)) return -1;
        } else if (!strcmp(a, "--system")) {
            if (!(f->system = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--json")) {
            f->json = true;
        } else if (!strcmp(a, "--chat")) {
            f->chat = true;
        } else if (!strcmp(a, "--plain-text") && !strcmp(argv[1], "tokenize")) { /* run would ignore it */
            f->plain_text = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            f->ignore_eos = true;
        } else if (!strcmp(a, "--local")) {
            f->local = true;
        } else if (!strcmp(a, "--no-prefix-cache")) {
            f->no_prefix_cache = true;
        } else if (!strcmp(a, "--coordinator")) {
            if (!(f->coordinator = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--tenant")) {
            if (!(f->tenant = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--policy")) {
            if (!(f->policy = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--listen")) {
            if (!(f->listen = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--workers")) {
            if (!(f->workers = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--log-dir")) {
            if (!(f->log_dir = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--stop")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            if (f->n_stops == MAX_STOPS || !*v) {
                fprintf(stderr, "error: --stop takes a non-empty string, at most %d times\n", MAX_STOPS);
                return -1;
            }
            f->stops[f->n_stops++] = v;
        } else if (!strcmp(a, "--timeout-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, UINT32_MAX, &f->timeout_ms)) return -1;
        } else if (!strcmp(a, "--groups")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1024, &f->groups)) return -1;
        } else if (!strcmp(a, "--threads-per-worker")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1024, &f->threads_per_worker)) return -1;
        } else if (!strcmp(a, "--max-batch-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 20, &f->max_batch_tokens)) return -1;
        } else if (!strcmp(a, "--heartbeat-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 10, 600000, &f->heartbeat_ms)) return -1;
        } else if (a[0] != '-' && !f->positional) {
            f->positional = a;
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
    int32_t *prompt = encode_prompt(e->model->tok, prompt_text, false, chat, f->system, history, &n_prompt);
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
    fprintf(stderr, "loading %s ...\n", fl_model_path(f->engine.model_path));
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

static int cmd_chat_local(const run_flags_t *f)
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

/* ---- through a coordinator ---- */

static volatile sig_atomic_t g_interrupted, g_child_exited;

static void on_interrupt(int sig)
{
    (void)sig;
    g_interrupted++;
}

static void on_child(int sig)
{
    (void)sig;
    g_child_exited = 1;
}

/* Handlers without SA_RESTART, so a blocking poll returns EINTR and the loop can react. */
static void set_handler(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static folio_client_t *connect_client(const run_flags_t *f)
{
    fl_error_t err = {0};
    folio_client_t *c = folio_client_new(f->coordinator, &err);
    if (!c) fprintf(stderr, "error: %s\n", err.msg);
    return c;
}

/* Fails fast (with a hint) when nothing answers at the endpoint, rather than waiting forever. */
static int check_reachable(folio_client_t *c, const run_flags_t *f)
{
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    if (folio_client_health(c, 5000, &r, &err) != FL_OK) {
        fprintf(stderr, "error: %s\n", err.msg);
        if (err.code == FL_EIO)
            fprintf(stderr, "hint: start a cluster with `folioctl up`, or point --coordinator at one (now %s)\n",
                    wire_endpoint(f->coordinator, "FOLIO_COORDINATOR", WIRE_DEFAULT_CLIENT_ENDPOINT));
        return -1;
    }
    folio__v1__response__free_unpacked(r, NULL);
    return 0;
}

/* One remote generation's output as it accumulates. */
typedef struct remote_out {
    int32_t *tokens;
    int n_tokens, cap_tokens;
    char *text;
    size_t len_text, cap_text;
    bool index_error;
} remote_out_t;

static bool remote_append(remote_out_t *o, const folio_event_t *ev)
{
    if (ev->n_tokens > 0 && ev->index != (uint32_t)o->n_tokens) o->index_error = true;
    if (o->n_tokens + ev->n_tokens > o->cap_tokens) {
        int cap = o->cap_tokens ? o->cap_tokens * 2 : 256;
        while (cap < o->n_tokens + ev->n_tokens) cap *= 2;
        int32_t *t = realloc(o->tokens, (size_t)cap * sizeof *t);
        if (!t) return false;
        o->tokens = t;
        o->cap_tokens = cap;
    }
    if (ev->n_tokens) memcpy(o->tokens + o->n_tokens, ev->tokens, (size_t)ev->n_tokens * sizeof *ev->tokens);
    o->n_tokens += ev->n_tokens;
    const size_t tl = strlen(ev->text);
    if (o->len_text + tl + 1 > o->cap_text) {
        size_t cap = o->cap_text ? o->cap_text * 2 : 1024;
        while (cap < o->len_text + tl + 1) cap *= 2;
        char *t = realloc(o->text, cap);
        if (!t) return false;
        o->text = t;
        o->cap_text = cap;
    }
    memcpy(o->text + o->len_text, ev->text, tl);
    o->len_text += tl;
    o->text[o->len_text] = 0;
    return true;
}

static void print_remote_json(const remote_out_t *o, const folio_event_t *fin)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(j, "tokens");
    for (int i = 0; i < o->n_tokens; i++) cJSON_AddItemToArray(toks, cJSON_CreateNumber(o->tokens[i]));
    cJSON_AddStringToObject(j, "text", o->text ? o->text : "");
    const bool ok = fin && fin->status == FOLIO__V1__STATUS_CODE__OK;
    int reason = fin ? fin->finish_reason : FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    if (reason == FOLIO__V1__FINISH_REASON__FINISH_NONE) reason = FOLIO__V1__FINISH_REASON__FINISH_ERROR;
    if (fin && !ok && reason == FOLIO__V1__FINISH_REASON__FINISH_ERROR &&
        (fin->status == FOLIO__V1__STATUS_CODE__CANCELLED || fin->status == FOLIO__V1__STATUS_CODE__DEADLINE_EXCEEDED))
        reason = FOLIO__V1__FINISH_REASON__FINISH_CANCELLED;
    cJSON_AddStringToObject(j, "finish_reason", wire_finish_name(reason));
    cJSON_AddStringToObject(j, "status", fin ? wire_status_name(fin->status) : "UNAVAILABLE");
    if (fin && !ok) cJSON_AddStringToObject(j, "message", fin->message);
    cJSON *u = cJSON_AddObjectToObject(j, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", fin ? fin->prompt_tokens : 0);
    cJSON_AddNumberToObject(u, "cached_prompt_tokens", fin ? fin->cached_prompt_tokens : 0);
    cJSON_AddNumberToObject(u, "completion_tokens",
                            fin && fin->completion_tokens ? fin->completion_tokens : (unsigned)o->n_tokens);
    cJSON *t = cJSON_AddObjectToObject(j, "timings");
    cJSON_AddNumberToObject(t, "queued_ms", fin ? fin->queued_s * 1e3 : 0);
    cJSON_AddNumberToObject(t, "first_token_ms", fin ? fin->first_token_s * 1e3 : 0);
    cJSON_AddNumberToObject(t, "total_ms", fin ? fin->total_s * 1e3 : 0);
    cJSON_AddStringToObject(j, "group", fin ? fin->group : "");
    char *s = cJSON_PrintUnformatted(j);
    printf("%s\n", s);
    fflush(stdout);
    cJSON_free(s);
    cJSON_Delete(j);
}

/* Sends one Generate and streams its deltas to stdout (unless --json) until its final message.
 * Ctrl-C sends a Cancel and waits for the cancelled stream's end; a second Ctrl-C gives up. With
 * answer non-NULL the generated text is returned there (malloc'd). Returns the exit status. */
static int remote_generate(folio_client_t *c, const run_flags_t *f, const folio_chat_message_t *msgs, int n_msgs,
                           char **answer)
{
    const fl_log_level_t summary_level = answer ? FL_LOG_DEBUG : FL_LOG_INFO; /* quiet in the chat REPL */
    folio_generate_params_t p = {.text = n_msgs ? NULL : f->prompt,
                                 .messages = msgs,
                                 .n_messages = n_msgs,
                                 .max_tokens = (int)f->max_tokens,
                                 .temperature = (float)f->temperature,
                                 .top_k = (int)f->top_k,
                                 .top_p = (float)f->top_p,
                                 .seed = (uint64_t)f->seed,
                                 .stop = f->stops,
                                 .n_stop = f->n_stops,
                                 .stream = true,
                                 .ignore_eos = f->ignore_eos,
                                 .tenant = f->tenant,
                                 .timeout_ms = (uint32_t)f->timeout_ms};
    if (f->max_tokens == 0) {
        fprintf(stderr, "error: -n 0: nothing to generate\n");
        return 2;
    }
    fl_error_t err = {0};
    uint64_t id = 0;
    if (folio_client_send_generate(c, &p, &id, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    g_interrupted = 0;
    set_handler(SIGINT, on_interrupt);
    remote_out_t o = {0};
    folio_event_t fin = {0};
    bool have_fin = false, cancel_sent = false;
    int rc = 0;
    /* Without a deadline the coordinator answers when it can; with one, it must end the stream by then. */
    const int idle_ms = f->timeout_ms > 0 ? (int)f->timeout_ms + 30000 : -1;
    double cancel_at = 0;
    while (!have_fin) {
        if (g_interrupted && !cancel_sent) {
            fl_error_t e2 = {0};
            if (folio_client_send_cancel(c, id, &e2)) break;
            cancel_sent = true;
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            cancel_at = ts.tv_sec + ts.tv_nsec * 1e-9;
            fprintf(stderr, "\n[cancelling request %llu]\n", (unsigned long long)id);
        }
        if (g_interrupted > 1) break;
        folio_event_t ev;
        const int got = folio_client_recv(c, &ev, cancel_sent ? 1000 : idle_ms, &err);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            fprintf(stderr, "error: %s\n", err.msg);
            rc = 1;
            break;
        }
        if (got == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            if (cancel_sent && ts.tv_sec + ts.tv_nsec * 1e-9 - cancel_at < 5) continue;
            fprintf(stderr, "error: no reply from the coordinator for request %llu\n", (unsigned long long)id);
            rc = 1;
            break;
        }
        if (ev.id != id && !(ev.final && ev.id == 0)) {
            folio_event_clear(&ev);
            continue;
        }
        if (ev.n_tokens > 0 || *ev.text) {
            if (!remote_append(&o, &ev)) {
                fprintf(stderr, "error: out of memory\n");
                folio_event_clear(&ev);
                rc = 1;
                break;
            }
            if (!f->json) {
                fputs(ev.text, stdout);
                fflush(stdout);
            }
        }
        if (ev.final) {
            fin = ev;
            have_fin = true;
        } else {
            folio_event_clear(&ev);
        }
    }
    signal(SIGINT, SIG_DFL);
    if (!f->json && o.len_text) printf("\n");
    if (o.index_error) fprintf(stderr, "warning: the stream's token indices had gaps or repeats\n");
    if (have_fin) {
        if (fin.status != FOLIO__V1__STATUS_CODE__OK) {
            fprintf(stderr, "error: %s: %s\n", wire_status_name(fin.status),
                    *fin.message ? fin.message : "(no message)");
            rc = 1;
        } else if (!f->json) {
            fl_log(summary_level,
                   "generated group=%s prompt_tokens=%u cached_prompt_tokens=%u completion_tokens=%u finish=%s "
                   "first_token_ms=%.1f total_ms=%.1f",
                   fin.group, fin.prompt_tokens, fin.cached_prompt_tokens, fin.completion_tokens,
                   wire_finish_name(fin.finish_reason), fin.first_token_s * 1e3, fin.total_s * 1e3);
        }
    } else if (!rc) {
        rc = 1;
    }
    if (f->json) print_remote_json(&o, have_fin ? &fin : NULL);
    if (answer && !rc)
        *answer = o.text ? o.text : strdup("");
    else
        free(o.text);
    free(o.tokens);
    folio_event_clear(&fin);
    return rc;
}

static int cmd_generate(const run_flags_t *f)
{
    if (!f->prompt || !*f->prompt) {
        fprintf(stderr, "error: generate needs -p TEXT\n");
        return 2;
    }
    folio_client_t *c = connect_client(f);
    if (!c) return 1;
    int rc = 1;
    if (!check_reachable(c, f)) {
        folio_chat_message_t msgs[2];
        int n = 0;
        if (f->chat) {
            if (f->system) msgs[n++] = (folio_chat_message_t){"system", f->system};
            msgs[n++] = (folio_chat_message_t){"user", f->prompt};
        } else if (f->system) {
            fprintf(stderr, "warning: --system is ignored without --chat\n");
        }
        rc = remote_generate(c, f, msgs, n, NULL);
    }
    folio_client_destroy(&c);
    return rc;
}

/* chat through the coordinator: the history (system, user, assistant, ...) travels as messages. */
static int cmd_chat(const run_flags_t *f)
{
    if (f->local) return cmd_chat_local(f);
    folio_client_t *c = connect_client(f);
    if (!c) return 1;
    if (check_reachable(c, f)) {
        folio_client_destroy(&c);
        return 1;
    }
    int rc = 0;
    if (f->prompt) {
        folio_chat_message_t msgs[2];
        int n = 0;
        if (f->system) msgs[n++] = (folio_chat_message_t){"system", f->system};
        msgs[n++] = (folio_chat_message_t){"user", f->prompt};
        rc = remote_generate(c, f, msgs, n, NULL);
        folio_client_destroy(&c);
        return rc;
    }
    conversation_t conv = {0};
    folio_chat_message_t *msgs = NULL;
    char line[8192];
    if (isatty(0)) fprintf(stderr, "> ");
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "/reset")) {
            conversation_free(&conv);
        } else if (*line) {
            folio_chat_message_t *m = realloc(msgs, (size_t)(conv.n + 2) * sizeof *m);
            if (!m) {
                rc = 1;
                break;
            }
            msgs = m;
            int n = 0;
            if (f->system) msgs[n++] = (folio_chat_message_t){"system", f->system};
            for (int i = 0; i < conv.n; i++)
                msgs[n++] = (folio_chat_message_t){conv.msgs[i].role, conv.msgs[i].content};
            msgs[n++] = (folio_chat_message_t){"user", line};
            char *answer = NULL;
            rc = remote_generate(c, f, msgs, n, &answer);
            if (!rc && (!conversation_add(&conv, "user", line, strlen(line)) ||
                        !conversation_add(&conv, "assistant", answer, strlen(answer))))
                rc = 1;
            free(answer);
        }
        if (isatty(0)) fprintf(stderr, "> ");
    }
    free(msgs);
    conversation_free(&conv);
    folio_client_destroy(&c);
    return rc;
}

/* A protobuf-c message as JSON through its descriptor: proto field names (snake_case) as keys,
 * every field present (defaults included), enums by name, repeated fields as arrays. */
static cJSON *pb_value_json(const ProtobufCFieldDescriptor *fd, const void *p)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        return cJSON_CreateNumber(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return cJSON_CreateNumber(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        return cJSON_CreateNumber((double)*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return cJSON_CreateNumber((double)*(const uint64_t *)p);
    case PROTOBUF_C_TYPE_FLOAT:
        return cJSON_CreateNumber(*(const float *)p);
    case PROTOBUF_C_TYPE_DOUBLE:
        return cJSON_CreateNumber(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL:
        return cJSON_CreateBool(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM: {
        const int v = *(const int *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(fd->descriptor, v);
        return ev ? cJSON_CreateString(ev->name) : cJSON_CreateNumber(v);
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *str = *(char *const *)p;
        return cJSON_CreateString(str ? str : "");
    }
    case PROTOBUF_C_TYPE_BYTES:
        return cJSON_CreateNull();
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *m = *(ProtobufCMessage *const *)p;
        if (!m) return cJSON_CreateNull();
        cJSON *o = cJSON_CreateObject();
        const ProtobufCMessageDescriptor *d = m->descriptor;
        for (unsigned i = 0; i < d->n_fields; i++) {
            const ProtobufCFieldDescriptor *f = &d->fields[i];
            const char *base = (const char *)m;
            if (f->label == PROTOBUF_C_LABEL_REPEATED) {
                const size_t n = *(const size_t *)(base + f->quantifier_offset);
                const char *arr = *(char *const *)(base + f->offset);
                size_t sz = 0;
                switch (f->type) {
                case PROTOBUF_C_TYPE_INT64:
                case PROTOBUF_C_TYPE_SINT64:
                case PROTOBUF_C_TYPE_SFIXED64:
                case PROTOBUF_C_TYPE_UINT64:
                case PROTOBUF_C_TYPE_FIXED64:
                case PROTOBUF_C_TYPE_DOUBLE:
                    sz = 8;
                    break;
                case PROTOBUF_C_TYPE_STRING:
                case PROTOBUF_C_TYPE_MESSAGE:
                    sz = sizeof(void *);
                    break;
                case PROTOBUF_C_TYPE_BOOL:
                    sz = sizeof(protobuf_c_boolean);
                    break;
                case PROTOBUF_C_TYPE_BYTES:
                    sz = sizeof(ProtobufCBinaryData);
                    break;
                default:
                    sz = 4;
                    break;
                }
                cJSON *a = cJSON_AddArrayToObject(o, f->name);
                for (size_t k = 0; k < n; k++) cJSON_AddItemToArray(a, pb_value_json(f, arr + k * sz));
            } else {
                cJSON_AddItemToObject(o, f->name, pb_value_json(f, base + f->offset));
            }
        }
        return o;
    }
    }
    return cJSON_CreateNull();
}

static void print_pb_json(const ProtobufCMessage *m)
{
    const ProtobufCFieldDescriptor fd = {.type = PROTOBUF_C_TYPE_MESSAGE};
    cJSON *o = pb_value_json(&fd, &m);
    char *s = cJSON_PrintUnformatted(o);
    printf("%s\n", s);
    cJSON_free(s);
    cJSON_Delete(o);
}

static int cmd_status(const run_flags_t *f)
{
    folio_client_t *c = connect_client(f);
    if (!c) return 1;
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    if (folio_client_status(c, 5000, &r, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        folio_client_destroy(&c);
        return 1;
    }
    const Folio__V1__StatusReply *s = r->cluster;
    if (f->json) {
        print_pb_json(&s->base);
    } else {
        printf("%-12s %-6s %-7s %-5s %7s %7s %8s %18s %6s %8s %7s\n", "GROUP", "RANKS", "HEALTHY", "DRAIN", "RUNNING",
               "WAITING", "INFLIGHT", "KV USED/CACHED/TOT", "HIT%", "TOK/S", "HB AGE");
        uint64_t prompt = 0, cached = 0, generated = 0;
        double tps = 0;
        for (size_t i = 0; i < s->n_groups; i++) {
            const Folio__V1__GroupStatus *g = s->groups[i];
            const Folio__V1__WorkerLoad *l = g->load;
            char ranks[32] = "", kv[32] = "-", hit[16] = "-";
            for (size_t k = 0; k < g->n_ranks && strlen(ranks) < 24; k++)
                snprintf(ranks + strlen(ranks), sizeof ranks - strlen(ranks), "%s%u", k ? "," : "", g->ranks[k]);
            if (!g->n_ranks) snprintf(ranks, sizeof ranks, "-");
            if (l) {
                snprintf(kv, sizeof kv, "%u/%u/%u", l->kv_blocks_used, l->kv_blocks_cached, l->kv_blocks_total);
                if (l->prompt_tokens)
                    snprintf(hit, sizeof hit, "%.1f",
                             100.0 * (double)l->cached_prompt_tokens / (double)l->prompt_tokens);
                prompt += l->prompt_tokens;
                cached += l->cached_prompt_tokens;
                generated += l->generated_tokens;
                tps += l->tokens_per_s;
            }
            printf("%-12s %-6s %-7s %-5s %7u %7u %8u %18s %6s %8.1f %6.1fs\n", g->name, ranks,
                   g->healthy ? "yes" : "NO", g->draining ? "yes" : "no", l ? l->running : 0, l ? l->waiting : 0,
                   g->inflight, kv, hit, l ? l->tokens_per_s : 0.0, g->last_heartbeat_age_s);
        }
        if (!s->n_groups) printf("(no worker groups registered)\n");
        printf("policy %s, block size %u; requests: %llu total, %llu in flight, %llu failed over\n",
               *s->policy ? s->policy : "-", s->block_size, (unsigned long long)s->requests_total,
               (unsigned long long)s->requests_inflight, (unsigned long long)s->requests_failed_over);
        printf("tokens: %llu prompt (%.1f%% from the prefix cache), %llu generated, %.1f tok/s now; "
               "route p50 %.0f us, p99 %.0f us\n",
               (unsigned long long)prompt, prompt ? 100.0 * (double)cached / (double)prompt : 0.0,
               (unsigned long long)generated, tps, s->route_p50_us, s->route_p99_us);
    }
    folio__v1__response__free_unpacked(r, NULL);
    folio_client_destroy(&c);
    return 0;
}

static int cmd_health(const run_flags_t *f)
{
    folio_client_t *c = connect_client(f);
    if (!c) return 1;
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    if (folio_client_health(c, 5000, &r, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        folio_client_destroy(&c);
        return 1;
    }
    const Folio__V1__HealthReply *h = r->health;
    const bool serving = h->serving;
    if (f->json)
        print_pb_json(&h->base);
    else
        printf("%s: %u of %u groups healthy\n", serving ? "serving" : "NOT serving", h->healthy_groups, h->groups);
    folio__v1__response__free_unpacked(r, NULL);
    folio_client_destroy(&c);
    return serving ? 0 : 1;
}

static int cmd_drain(const run_flags_t *f, bool undrain)
{
    if (!f->positional) {
        fprintf(stderr, "error: %s needs a GROUP (see folioctl status)\n", undrain ? "undrain" : "drain");
        return 2;
    }
    folio_client_t *c = connect_client(f);
    if (!c) return 1;
    fl_error_t err = {0};
    int rc = folio_client_drain(c, f->positional, undrain, 5000, &err);
    if (rc)
        fprintf(stderr, "error: %s\n", err.msg);
    else
        printf("%s %s\n", f->positional, undrain ? "undrained: admitting new requests" : "draining: no new requests");
    folio_client_destroy(&c);
    return rc ? 1 : 0;
}

static const char *cluster_child_name(const cluster_t *cl, pid_t pid, char *buf, size_t cap)
{
    if (pid == cl->coordinator) return "coordinator";
    for (int i = 0; i < cl->n_workers; i++)
        if (pid == cl->workers[i]) {
            snprintf(buf, cap, "worker g%d", i);
            return buf;
        }
    return NULL;
}

static int cmd_up(const run_flags_t *f)
{
    cluster_opts_t o = {.model = f->engine.model_path,
                        .n_groups = (int)f->groups,
                        .threads_per_worker = (int)f->threads_per_worker,
                        .client_endpoint = f->listen ? f->listen : f->coordinator,
                        .worker_endpoint = f->workers,
                        .policy = f->policy,
                        .kv_budget_bytes = f->engine.kv_budget_bytes,
                        .block_size = f->engine.block_size,
                        .max_batch_tokens = (int)f->max_batch_tokens,
                        .no_prefix_cache = f->no_prefix_cache,
                        .heartbeat_ms = (int)f->heartbeat_ms,
                        .log_dir = f->log_dir};
    g_interrupted = 0;
    set_handler(SIGINT, on_interrupt);
    set_handler(SIGTERM, on_interrupt);
    set_handler(SIGCHLD, on_child);
    fprintf(stderr, "starting coordinator and %d worker group%s on %s ...\n", o.n_groups, o.n_groups == 1 ? "" : "s",
            fl_model_path(o.model));
    fl_error_t err = {0};
    cluster_t *cl = cluster_start(&o, 600000, &err);
    if (!cl) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    printf("coordinator pid %d  clients: %s  workers: %s\n", (int)cl->coordinator, cl->client_endpoint,
           cl->worker_endpoint);
    for (int i = 0; i < cl->n_workers; i++) printf("group g%d  pid %d  healthy\n", i, (int)cl->workers[i]);
    printf("folio cluster up: %d group%s serving at %s (Ctrl-C stops it)\n", cl->n_workers,
           cl->n_workers == 1 ? "" : "s", cl->client_endpoint);
    fflush(stdout);
    int alive = cl->n_workers + 1;
    while (!g_interrupted && alive > 0) {
        struct timespec ts = {0, 200 * 1000000L};
        nanosleep(&ts, NULL);
        if (g_interrupted) break;
        g_child_exited = 0;
        int st;
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            char buf[32];
            const char *name = cluster_child_name(cl, pid, buf, sizeof buf);
            if (!name) continue;
            if (WIFSIGNALED(st))
                fl_log_error("folioctl up: %s (pid %d) was killed by signal %d; the rest keep running", name, (int)pid,
                             WTERMSIG(st));
            else
                fl_log_error("folioctl up: %s (pid %d) exited with status %d; the rest keep running", name, (int)pid,
                             WEXITSTATUS(st));
            if (pid == cl->coordinator) cl->coordinator = 0;
            for (int i = 0; i < cl->n_workers; i++)
                if (pid == cl->workers[i]) cl->workers[i] = 0;
            alive--;
        }
    }
    const bool stopped = g_interrupted;
    fprintf(stderr, "%s\n", stopped ? "stopping the cluster ..." : "every cluster process has exited");
    cluster_stop(&cl);
    return stopped ? 0 : 1;
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
    if (f.positional && strcmp(cmd, "drain") && strcmp(cmd, "undrain")) {
        fprintf(stderr, "error: unexpected argument '%s' (folioctl %s --help)\n", f.positional, cmd);
        return 2;
    }
    if (!strcmp(cmd, "run")) return cmd_run(&f, f.chat);
    if (!strcmp(cmd, "chat")) return cmd_chat(&f);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(&f);
    if (!strcmp(cmd, "generate")) return cmd_generate(&f);
    if (!strcmp(cmd, "status")) return cmd_status(&f);
    if (!strcmp(cmd, "health")) return cmd_health(&f);
    if (!strcmp(cmd, "drain")) return cmd_drain(&f, false);
    if (!strcmp(cmd, "undrain")) return cmd_drain(&f, true);
    if (!strcmp(cmd, "up")) return cmd_up(&f);
    fprintf(stderr, "error: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
