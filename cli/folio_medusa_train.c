/* folio_medusa_train.c - folio-medusa-train: trains Medusa heads (worker/medusa.h) for a model, the
 * base model frozen.
 *
 *   folio-medusa-train [-m MODEL] [-o OUT] [--heads K] [--prompts FILE] [--tokens N] [--epochs N] ...
 *
 * 1. Prompts: --prompts FILE (one user message a line, or a JSON list whose items are user
 *    messages or conversations: lists of {"role", "content"}), each put through the model's chat
 *    template; without a file the model writes them itself, sampled from short seed instructions
 *    over a list of topics and kinds of task.
 * 2. Self-distillation: the model's own greedy answers and the hidden states that produced them
 *    (medusa_generate), cached in <OUT without .gguf>.distill for reruns on the same model and inputs.
 * 3. Training (medusa_train) and the heads file (medusa_save), by default beside the model, where
 *    the engine finds it.
 * Flag parsing, prompts and progress lines only; the work is worker/medusa_train.c. */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "clock.h"
#include "engine.h"
#include "file_read.h"
#include "flags.h"
#include "medusa.h"
#include "medusa_train.h"
#include "model_path.h"

typedef struct opts {
    engine_opts_t eo;
    const char *out, *prompts, *cache;
    int heads, epochs, batch, gen_batch, max_answer, vocab;
    long tokens;
    double lr, holdout;
    bool own_output;
    uint64_t seed;
} opts_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folio-medusa-train [options] [engine flags]\n"
            "Trains Medusa heads for a model (the base frozen) on its own answers.\n"
            "  -o, --out FILE        heads file (default: <model>.medusa.gguf beside the model, which\n"
            "                        the engine loads by default)\n"
            "  --heads K             heads (default 3, at most %d)\n"
            "  --prompts FILE        prompts: one user message a line, or a JSON list of messages or\n"
            "                        conversations ([{\"role\":...,\"content\":...}, ...]); default: the\n"
            "                        model writes them\n"
            "  --tokens N            answer tokens to distill (default 150000)\n"
            "  --max-answer N        tokens per answer at most (default 256)\n"
            "  --epochs N            passes over the data (default 2)\n"
            "  --lr F                Adam's peak learning rate (default 0.003)\n"
            "  --batch N             positions per minibatch (default 256)\n"
            "  --gen-batch N         answers generated at once (default 64)\n"
            "  --holdout F           fraction of answers held out for evaluation (default 0.1)\n"
            "  --own-output          a vocabulary projection per head (default: the model's own, shared)\n"
            "  --vocab N             tokens the heads choose among: the answers' most frequent, then the\n"
            "                        lowest ids (default 8192; 0: the whole vocabulary)\n"
            "  --seed N              prompts, split and shuffle (default 1)\n"
            "  --cache FILE|none     distilled data (default: <OUT without .gguf>.distill)\n"
            "Engine flags (-t/--threads also sets the training threads):\n",
            MEDUSA_MAX_HEADS);
    /* the engine's own --heads (a heads file to load) means nothing here: leave its entry out */
    const char *help = engine_flags_help(), *cut = strstr(help, "  --heads "), *next = cut ? strstr(cut + 1, "\n  -") : NULL;
    if (!cut) fputs(help, f);
    else fprintf(f, "%.*s%s", (int)(cut - help), help, next ? next + 1 : "");
}

/* OpenBLAS 0.3.21 does not know recent Xeons and falls back to its generic SSE3 kernels, several
 * times slower; the core type is read when the library loads, so set it and start again. */
static void fix_openblas_core(char **argv)
{
    if (getenv("OPENBLAS_CORETYPE")) return;
    const char *core = openblas_get_corename();
    if (!core || strcasecmp(core, "prescott")) return;
    __builtin_cpu_init();
    const char *want = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : NULL;
    if (!want) return;
    char self[4096];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return;
    self[n] = 0;
    setenv("OPENBLAS_CORETYPE", want, 1);
    execv(self, argv);
}

static int parse_flags(opts_t *o, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v;
        long n;
        double x;
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(f, "--own-output")) {
            o->own_output = true;
        } else if (!strcmp(f, "-o") || !strcmp(f, "--out") || !strcmp(f, "--prompts") || !strcmp(f, "--cache")) {
            if (!(v = fl_flag_value(argc, argv, &i))) return -1;
            *(!strcmp(f, "--prompts") ? &o->prompts : !strcmp(f, "--cache") ? &o->cache : &o->out) = v;
        } else if (!strcmp(f, "--heads")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, MEDUSA_MAX_HEADS, &n)) return -1;
            o->heads = (int)n;
        } else if (!strcmp(f, "--tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 16, 100000000, &o->tokens)) return -1;
        } else if (!strcmp(f, "--max-answer") || !strcmp(f, "--epochs") || !strcmp(f, "--batch") ||
                   !strcmp(f, "--gen-batch")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 1, 1 << 16, &n)) return -1;
            *(!strcmp(f, "--max-answer") ? &o->max_answer : !strcmp(f, "--epochs") ? &o->epochs
              : !strcmp(f, "--batch")    ? &o->batch
                                         : &o->gen_batch) = (int)n;
        } else if (!strcmp(f, "--vocab")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(f, v, 0, 1 << 24, &n)) return -1;
            o->vocab = (int)n;
        } else if (!strcmp(f, "--lr")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(f, v, 1e-7, 1, &o->lr)) return -1;
        } else if (!strcmp(f, "--holdout")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(f, v, 0.01, 0.9, &o->holdout)) return -1;
        } else if (!strcmp(f, "--seed")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_float(f, v, 0, 1e15, &x)) return -1;
            o->seed = (uint64_t)x;
        } else {
            const int r = engine_parse_flag(&o->eo, argc, argv, &i);
            if (r < 0) return -1;
            if (r == 0) {
                fprintf(stderr, "folio-medusa-train: unknown flag %s (--help lists them)\n", f);
                return -1;
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Prompts: token arrays, each a chat turn through the model's template (raw text without one). */

typedef struct prompt_set {
    int32_t **ids;
    int *n;
    int count, cap;
} prompt_set_t;

static void prompts_free(prompt_set_t *p)
{
    for (int i = 0; i < p->count; i++) free(p->ids[i]);
    free(p->ids);
    free(p->n);
    memset(p, 0, sizeof *p);
}

/* Encodes a conversation (msgs) or, with n_msgs 0, a raw text. */
static int prompts_add(prompt_set_t *p, const tok_t *tok, const char *text, const tok_chat_msg_t *msgs, int n_msgs)
{
    if (p->count == p->cap) {
        const int cap = p->cap ? p->cap * 2 : 64;
        int32_t **ids = realloc(p->ids, (size_t)cap * sizeof *ids);
        if (ids) p->ids = ids;
        int *n = realloc(p->n, (size_t)cap * sizeof *n);
        if (n) p->n = n;
        if (!ids || !n) return FL_ENOMEM;
        p->cap = cap;
    }
    int32_t *ids = NULL;
    int cap = 0;
    fl_error_t err = {0};
    const int count = tok_encode_prompt(tok, text ? text : "", text ? strlen(text) : 0, false, msgs, n_msgs, &ids,
                                        &cap, &err);
    if (count < 0) {
        free(ids);
        fprintf(stderr, "folio-medusa-train: a prompt was not encoded: %s\n", err.msg);
        return count;
    }
    p->ids[p->count] = ids;
    p->n[p->count++] = count;
    return FL_OK;
}

/* One user message, through the chat template when the model has one. */
static int prompts_add_user(prompt_set_t *p, const tok_t *tok, const char *text)
{
    const tok_chat_msg_t msg = {"user", text};
    const bool chat = tok_chat_supported(tok, NULL) == 0;
    return chat ? prompts_add(p, tok, NULL, &msg, 1) : prompts_add(p, tok, text, NULL, 0);
}

static int prompts_from_json(prompt_set_t *p, const tok_t *tok, const cJSON *root, const char *path)
{
    const cJSON *item;
    int bad = 0;
    cJSON_ArrayForEach(item, root) {
        if (cJSON_IsString(item)) {
            if (prompts_add_user(p, tok, item->valuestring) == FL_ENOMEM) return FL_ENOMEM;
            continue;
        }
        const cJSON *turns = cJSON_IsObject(item) ? cJSON_GetObjectItemCaseSensitive(item, "messages") : item;
        const int nt = cJSON_IsArray(turns) ? cJSON_GetArraySize(turns) : 0;
        tok_chat_msg_t *msgs = nt ? calloc((size_t)nt, sizeof *msgs) : NULL;
        int nm = 0;
        const cJSON *turn;
        if (msgs)
            cJSON_ArrayForEach(turn, turns) {
                const cJSON *role = cJSON_GetObjectItemCaseSensitive(turn, "role");
                const cJSON *content = cJSON_GetObjectItemCaseSensitive(turn, "content");
                if (!cJSON_IsString(role) || !cJSON_IsString(content)) break;
                msgs[nm++] = (tok_chat_msg_t){role->valuestring, content->valuestring};
            }
        const int rc = nm && nm == nt ? prompts_add(p, tok, NULL, msgs, nm) : FL_EFORMAT;
        free(msgs);
        if (rc == FL_ENOMEM) return rc;
        bad += rc != FL_OK;
    }
    if (bad) fprintf(stderr, "folio-medusa-train: %s: %d items skipped (neither a string nor a list of turns)\n", path, bad);
    return FL_OK;
}

static int prompts_from_file(prompt_set_t *p, const tok_t *tok, const char *path, char *text)
{
    const char *s = text;
    while (isspace((unsigned char)*s)) s++;
    if (*s == '[') {
        cJSON *root = cJSON_Parse(s);
        if (!root || !cJSON_IsArray(root)) {
            cJSON_Delete(root);
            fprintf(stderr, "folio-medusa-train: %s: not a JSON list\n", path);
            return FL_EFORMAT;
        }
        const int rc = prompts_from_json(p, tok, root, path);
        cJSON_Delete(root);
        return rc;
    }
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        size_t n = strlen(line);
        while (n && isspace((unsigned char)line[n - 1])) line[--n] = 0;
        if (n && prompts_add_user(p, tok, line) == FL_ENOMEM) return FL_ENOMEM;
    }
    return FL_OK;
}

/* Seeds for prompts the model writes itself: the start of a numbered list of things people ask an
 * assistant, about a topic, in a raw completion (a small model continues a list better than it
 * follows an instruction to write one); its next line is a prompt. */
static const char *const TOPICS[] = {
    "cooking", "gardening", "ancient history", "space travel", "the ocean", "Python programming", "healthy eating",
    "travel in Europe", "music", "saving money", "school homework", "pets", "the weather", "football", "movies",
    "cars", "computers", "algebra", "physics", "chemistry", "books", "painting", "friendship", "job interviews",
    "the internet", "big cities", "mountains", "holidays", "coffee", "sleep", "exercise", "learning languages",
    "photography", "chess", "birds", "recycling", "electricity", "trains", "the human body", "small businesses",
    "SQL databases", "spreadsheets", "dates and calendars", "units of measurement", "shopping lists", "emails",
};
static const char *const KINDS[] = {
    "Questions people ask an AI assistant about %1$s:\n1. What is the best way to get started with %1$s?\n2.",
    "Tasks people give an AI assistant about %1$s:\n1. Write a list of five facts about %1$s.\n2.",
    "Requests people send to an AI assistant about %1$s:\n1. Explain %1$s to a ten-year-old in simple words.\n2.",
    "Writing tasks people give an AI assistant about %1$s:\n1. Write a short email to a friend about %1$s.\n2.",
    "Requests for structured answers about %1$s:\n1. Give three facts about %1$s as a JSON object.\n2.",
    "How-to questions people ask about %1$s:\n1. How do I plan a week of %1$s step by step?\n2.",
};

/* The model's line, cleaned into a prompt: no list number, quotes or label; NULL when too short. */
static char *clean_prompt(char *s)
{
    char *nl = strchr(s, '\n');
    if (nl) *nl = 0;
    while (isspace((unsigned char)*s) || *s == '"' || *s == '*' || isdigit((unsigned char)*s) ||
           (*s == '.' && s[1] == ' '))
        s++;
    size_t n = strlen(s);
    while (n && (isspace((unsigned char)s[n - 1]) || s[n - 1] == '"' || s[n - 1] == '*')) s[--n] = 0;
    return n >= 12 && n <= 400 ? s : NULL;
}

typedef struct progress {
    bool tty;
    double t0, last;
    const char *what, *unit;
    int64_t tokens_before; /* produced by earlier calls */
} progress_t;

static void fmt_time(char *buf, size_t cap, double s)
{
    if (s < 0) s = 0;
    if (s >= 60) snprintf(buf, cap, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else snprintf(buf, cap, "%ds", (int)s);
}

static void gen_progress(void *user, int64_t tokens, int done, int n_prompts)
{
    progress_t *p = user;
    const double now = fl_clock_s();
    if (now - p->last < (p->tty ? 0.25 : 30)) return;
    p->last = now;
    tokens += p->tokens_before;
    fprintf(stderr, p->tty ? "\r\033[K%s: %lld tokens, %d/%d %s, %.0f tok/s" : "%s: %lld tokens, %d/%d %s, %.0f tok/s\n",
            p->what, (long long)tokens, done, n_prompts, p->unit, tokens / (now - p->t0));
}

/* The model writes prompts until there are `want` (or the seeds run out of rounds). */
static int self_prompts(engine_t *e, const opts_t *o, int want, prompt_set_t *out)
{
    const tok_t *tok = e->model->tok;
    const int n_topics = sizeof TOPICS / sizeof TOPICS[0], n_kinds = sizeof KINDS / sizeof KINDS[0];
    prompt_set_t seeds = {0};
    for (int t = 0; t < n_topics; t++)
        for (int k = 0; k < n_kinds; k++) {
            char text[512];
            snprintf(text, sizeof text, KINDS[k], TOPICS[t]);
            if (prompts_add(&seeds, tok, text, NULL, 0)) {
                prompts_free(&seeds);
                return FL_ENOMEM;
            }
        }
    progress_t pr = {.tty = isatty(2), .t0 = fl_clock_s(), .last = fl_clock_s(), .what = "writing prompts", .unit = "seeds this round"};
    char samples[1024] = "";
    /* A line ends a prompt: every token whose text holds a newline. */
    const int V = tok_n_vocab(tok);
    uint8_t *ends = calloc((size_t)V, 1);
    uint64_t *seen = calloc((size_t)want, sizeof *seen);
    const int32_t **ids = malloc((size_t)seeds.count * sizeof *ids);
    int *lens = malloc((size_t)seeds.count * sizeof *lens);
    if (!ends || !seen || !ids || !lens) {
        free(ends);
        free(seen);
        free(ids);
        free(lens);
        prompts_free(&seeds);
        return FL_ENOMEM;
    }
    for (int v = 0; v < V; v++) {
        char piece[256];
        const int len = tok_token_bytes(tok, v, false, piece, sizeof piece);
        ends[v] = len > 0 && len <= (int)sizeof piece && memchr(piece, '\n', (size_t)len);
    }
    int rc = FL_OK;
    for (int round = 0; round < 16 && out->count < want && !rc; round++) {
        /* as many seeds as the prompts still wanted need (a fifth lost), from a point that moves */
        const int n = (want - out->count) * 5 / 4 + 16 < seeds.count ? (want - out->count) * 5 / 4 + 16 : seeds.count;
        for (int i = 0; i < n; i++) {
            const int j = (round * 97 + i) % seeds.count;
            ids[i] = seeds.ids[j];
            lens[i] = seeds.n[j];
        }
        medusa_data_t d = {0};
        const medusa_gen_opts_t g = {
            .max_new = 48, .batch = o->gen_batch, .ends = ends,
            .sampling = {.temperature = 0.9f, .top_k = 40, .top_p = 0.95f,
                         .seed = o->seed * 1000003u + (uint64_t)round * 7919u},
            .progress = gen_progress, .user = &pr};
        fl_error_t err = {0};
        if ((rc = medusa_generate(e->model, e->kv, ids, lens, n, &g, &d, &err))) {
            fprintf(stderr, "\nfolio-medusa-train: %s\n", err.msg);
            break;
        }
        for (int s = 0; s < d.n_seqs && out->count < want && !rc; s++) {
            char text[4096];
            const int64_t a = d.seq_start[s];
            const int len = tok_decode(tok, d.tokens + a, (int)(d.seq_start[s + 1] - a), false, text, sizeof text - 1);
            if (len < 0 || len >= (int)sizeof text) continue;
            text[len] = 0;
            const char *prompt = clean_prompt(text);
            if (!prompt) continue;
            const uint64_t h = XXH3_64bits(prompt, strlen(prompt));
            bool dup = false;
            for (int i = 0; i < out->count && !dup; i++) dup = seen[i] == h;
            if (dup) continue;
            seen[out->count] = h;
            if (out->count % (want / 3 + 1) == 0 && strlen(samples) + strlen(prompt) + 8 < sizeof samples)
                snprintf(samples + strlen(samples), sizeof samples - strlen(samples), "  %s\n", prompt);
            rc = prompts_add_user(out, tok, prompt);
        }
        pr.tokens_before += d.n_rows;
        medusa_data_free(&d);
    }
    if (pr.tty) fprintf(stderr, "\r\033[K");
    fprintf(stderr, "folio-medusa-train: the model wrote %d prompts in %.0f s, e.g.\n%s", out->count,
            fl_clock_s() - pr.t0, samples);
    prompts_free(&seeds);
    free(ends);
    free(seen);
    free(ids);
    free(lens);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */

typedef struct train_view {
    bool tty;
    int n_heads;
} train_view_t;

static void train_progress(void *user, const medusa_train_progress_t *p)
{
    train_view_t *v = user;
    static double last;
    const double now = fl_clock_s();
    if (!p->eval && (!v->tty || now - last < 0.25)) return;
    last = now;
    char line[512], eta[32];
    int n = snprintf(line, sizeof line, "step %d/%d", p->step, p->steps);
    if (p->step) n += snprintf(line + n, sizeof line - n, " loss %.3f", p->loss);
    n += snprintf(line + n, sizeof line - n, " | held-out top-1");
    for (int k = 0; k < p->n_heads; k++) n += snprintf(line + n, sizeof line - n, " %.3f", p->held_out.acc[k][0]);
    n += snprintf(line + n, sizeof line - n, " top-5");
    for (int k = 0; k < p->n_heads; k++) n += snprintf(line + n, sizeof line - n, " %.3f", p->held_out.acc[k][4]);
    fmt_time(eta, sizeof eta, p->eta_s);
    if (p->step) snprintf(line + n, sizeof line - n, " | %s left", eta);
    if (v->tty) fprintf(stderr, "\r\033[K%s", line);
    else fprintf(stderr, "%s\n", line);
}

int main(int argc, char **argv)
{
    fix_openblas_core(argv);
    opts_t o = {.heads = 3, .epochs = 2, .batch = 256, .gen_batch = 64, .max_answer = 256, .tokens = 150000,
                .lr = 3e-3, .holdout = 0.1, .seed = 1, .vocab = 8192};
    if (parse_flags(&o, argc, argv)) return 2;
    o.eo.heads_path = "none";
    o.eo.max_seqs = o.gen_batch;
    if (!o.eo.kv_budget_bytes && !(o.eo.kv_fraction > 0)) o.eo.kv_budget_bytes = (size_t)768 << 20;
    const char *model_path = fl_model_path(o.eo.model_path);
    o.eo.model_path = model_path;
    char out_path[4096], cache_path[4200];
    if (o.out) snprintf(out_path, sizeof out_path, "%s", o.out);
    else medusa_default_path(model_path, out_path, sizeof out_path);
    if (o.cache) {
        snprintf(cache_path, sizeof cache_path, "%s", o.cache);
    } else {
        size_t n = strlen(out_path);
        if (n >= 5 && !strcmp(out_path + n - 5, ".gguf")) n -= 5;
        snprintf(cache_path, sizeof cache_path, "%.*s.distill", (int)n, out_path);
    }
    const bool use_cache = strcmp(cache_path, "none") != 0;

    fl_error_t err = {0};
    const double t_start = fl_clock_s();
    engine_t *e = engine_new(&o.eo, &err);
    if (!e) {
        fprintf(stderr, "folio-medusa-train: %s\n", err.msg);
        return 1;
    }
    model_t *m = e->model;
    int rc = 1;
    char *prompt_text = NULL;
    prompt_set_t prompts = {0};
    medusa_data_t data = {0};
    medusa_trained_t trained = {0};
    char identity[MEDUSA_IDENTITY_LEN + 1], key[256];
    medusa_model_identity(m, identity);

    /* What the data set is made of: the cache is reused only for the same identity and inputs. */
    size_t prompt_len = 0;
    if (o.prompts && !(prompt_text = fl_read_file(o.prompts, &prompt_len))) {
        fprintf(stderr, "folio-medusa-train: cannot read %s\n", o.prompts);
        goto out;
    }
    snprintf(key, sizeof key, "v1 prompts=%016llx tokens=%ld answer=%d seed=%llu",
             prompt_text ? (unsigned long long)XXH3_64bits(prompt_text, prompt_len) : 0ull, o.tokens, o.max_answer,
             prompt_text ? 0ull : (unsigned long long)o.seed);
    double t_distill = 0;
    if (use_cache && medusa_data_load(cache_path, identity, key, &data, &err) == FL_OK && data.dim == m->cfg.dim) {
        fprintf(stderr, "folio-medusa-train: reusing %s (%lld tokens in %d answers)\n", cache_path,
                (long long)data.n_rows, data.n_seqs);
    } else {
        if (err.code == FL_EFORMAT) fprintf(stderr, "folio-medusa-train: %s; distilling again\n", err.msg);
        medusa_data_free(&data);
        const double t0 = fl_clock_s();
        if (prompt_text) {
            if (prompts_from_file(&prompts, m->tok, o.prompts, prompt_text)) goto out;
            fprintf(stderr, "folio-medusa-train: %d prompts from %s\n", prompts.count, o.prompts);
        } else if (self_prompts(e, &o, (int)(o.tokens / 150) + 16, &prompts)) {
            goto out;
        }
        if (!prompts.count) {
            fprintf(stderr, "folio-medusa-train: no prompts\n");
            goto out;
        }
        progress_t pr = {.tty = isatty(2), .t0 = fl_clock_s(), .last = fl_clock_s(), .what = "distilling", .unit = "prompts"};
        const medusa_gen_opts_t g = {.max_new = o.max_answer, .batch = o.gen_batch, .max_total = o.tokens,
                                     .keep_hidden = true, .progress = gen_progress, .user = &pr};
        if (medusa_generate(m, e->kv, (const int32_t *const *)prompts.ids, prompts.n, prompts.count, &g, &data,
                            &err)) {
            fprintf(stderr, "\nfolio-medusa-train: %s\n", err.msg);
            goto out;
        }
        if (pr.tty) fprintf(stderr, "\r\033[K");
        t_distill = fl_clock_s() - t0;
        fprintf(stderr, "folio-medusa-train: distilled %lld tokens in %d answers in %.0f s (%.0f tok/s)\n",
                (long long)data.n_rows, data.n_seqs, t_distill, data.n_rows / (fl_clock_s() - pr.t0));
        if (use_cache && medusa_data_save(cache_path, &data, identity, key, &err))
            fprintf(stderr, "folio-medusa-train: not cached: %s\n", err.msg);
    }

    medusa_train_opts_t to;
    medusa_train_opts_default(&to);
    train_view_t view = {.tty = isatty(2), .n_heads = o.heads};
    to.n_heads = o.heads;
    to.own_output = o.own_output;
    to.epochs = o.epochs;
    to.lr = (float)o.lr;
    to.batch = o.batch;
    to.holdout = (float)o.holdout;
    to.seed = o.seed;
    to.threads = o.eo.threads;
    to.vocab = o.vocab;
    to.progress = train_progress;
    to.user = &view;
    fprintf(stderr, "folio-medusa-train: %d heads (%s output, %d tokens), %d epochs over %lld positions\n", o.heads,
            o.own_output ? "own" : "shared", o.vocab > 0 && o.vocab < m->cfg.n_vocab ? o.vocab : m->cfg.n_vocab,
            o.epochs, (long long)data.n_rows);
    const double t_train0 = fl_clock_s();
    if (medusa_train(m, &data, &to, &trained, &err)) {
        fprintf(stderr, "\nfolio-medusa-train: %s\n", err.msg);
        goto out;
    }
    if (view.tty) fprintf(stderr, "\n");
    const double t_train = fl_clock_s() - t_train0;
    if (medusa_save(out_path, m, &trained.w, &err)) {
        fprintf(stderr, "folio-medusa-train: %s\n", err.msg);
        goto out;
    }
    printf("heads: %s (%d, %s output), base model %s\n", out_path, o.heads, o.own_output ? "own" : "shared", identity);
    printf("data: %lld positions in %d answers (%lld trained on, %lld held out), distilled in %.0f s\n",
           (long long)data.n_rows, data.n_seqs, (long long)trained.train_rows, (long long)trained.held_out_rows,
           t_distill);
    printf("training: %d steps in %.0f s; total %.0f s\n", trained.steps, t_train, fl_clock_s() - t_start);
    printf("head  predicts  top-1 before  top-1   top-5   loss before  loss\n");
    for (int k = 0; k < o.heads; k++)
        printf("%4d  t+%d       %.3f         %.3f   %.3f   %.3f        %.3f\n", k, k + 2, trained.first.acc[k][0],
               trained.last.acc[k][0], trained.last.acc[k][4], trained.first.loss[k], trained.last.loss[k]);
    rc = 0;
out:
    medusa_trained_free(&trained);
    medusa_data_free(&data);
    prompts_free(&prompts);
    free(prompt_text);
    engine_destroy(&e);
    return rc;
}
