/* cli_gen_flags.c - parsing of the generation flags; see cli_gen_flags.h. */
#include "cli_gen_flags.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "file_read.h"
#include "flags.h"

void cli_gen_flags_init(cli_gen_flags_t *g)
{
    memset(g, 0, sizeof *g);
    g->max_tokens = 128;
    folio__v1__sampling_params__init(&g->sampling);
}

/* A float flag's value, any finite number: the request layer says which are in range. */
static bool parse_float(const char *flag, const char *v, float *out)
{
    double d;
    if (!fl_flag_float(flag, v, -1e30, 1e30, &d)) return false;
    *out = (float)d;
    return true;
}

static bool parse_u32(const char *flag, const char *v, uint32_t *out)
{
    long n;
    if (!fl_flag_int(flag, v, 0, UINT32_MAX, &n)) return false;
    *out = (uint32_t)n;
    return true;
}

/* "ID=BIAS", e.g. 42=-100. */
static bool parse_bias(cli_gen_flags_t *g, const char *v)
{
    char *end;
    errno = 0;
    const long id = strtol(v, &end, 10);
    if (errno || end == v || *end != '=' || id < 0 || id > INT32_MAX || g->sampling.n_logit_bias == CLI_MAX_LOGIT_BIAS) {
        fprintf(stderr, "error: --logit-bias expects TOKEN_ID=BIAS (e.g. 42=-100), at most %d times, got '%s'\n",
                CLI_MAX_LOGIT_BIAS, v);
        return false;
    }
    Folio__V1__LogitBias *b = &g->bias[g->sampling.n_logit_bias];
    folio__v1__logit_bias__init(b);
    b->token = (int32_t)id;
    if (!parse_float("--logit-bias", end + 1, &b->bias)) return false;
    g->bias_ptrs[g->sampling.n_logit_bias++] = b;
    g->sampling.logit_bias = g->bias_ptrs;
    return true;
}

int cli_gen_flag_parse(cli_gen_flags_t *g, int argc, char **argv, int *i)
{
    const char *a = argv[*i], *v;
    Folio__V1__SamplingParams *s = &g->sampling;
    float f;
    uint32_t u;
    long n;
#define VALUE() (v = fl_flag_value(argc, argv, i))
    if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) {
        /* At least 1: the protocol's 0 means "the default", so 0 here could only mislead. */
        if (!VALUE() || !fl_flag_int(a, v, 1, 1 << 20, &g->max_tokens)) return -1;
    } else if (!strcmp(a, "--temperature")) {
        if (!VALUE() || !parse_float(a, v, &f)) return -1;
        folio_sampling_set_temperature(s, f);
    } else if (!strcmp(a, "--top-k")) {
        if (!VALUE() || !parse_u32(a, v, &u)) return -1;
        folio_sampling_set_top_k(s, u);
    } else if (!strcmp(a, "--top-p")) {
        if (!VALUE() || !parse_float(a, v, &f)) return -1;
        folio_sampling_set_top_p(s, f);
    } else if (!strcmp(a, "--min-p")) {
        if (!VALUE() || !parse_float(a, v, &f)) return -1;
        folio_sampling_set_min_p(s, f);
    } else if (!strcmp(a, "--repeat-penalty")) {
        if (!VALUE() || !parse_float(a, v, &f)) return -1;
        folio_sampling_set_repetition_penalty(s, f);
    } else if (!strcmp(a, "--repeat-last-n")) {
        if (!VALUE() || !parse_u32(a, v, &u)) return -1;
        folio_sampling_set_repetition_last_n(s, u);
    } else if (!strcmp(a, "--presence-penalty")) {
        if (!VALUE() || !parse_float(a, v, &f)) return -1;
        folio_sampling_set_presence_penalty(s, f);
    } else if (!strcmp(a, "--frequency-penalty")) {
        if (!VALUE() || !parse_float(a, v, &f)) return -1;
        folio_sampling_set_frequency_penalty(s, f);
    } else if (!strcmp(a, "--logit-bias")) {
        if (!VALUE() || !parse_bias(g, v)) return -1;
    } else if (!strcmp(a, "--logprobs")) {
        s->logprobs = true;
    } else if (!strcmp(a, "--top-logprobs")) {
        if (!VALUE() || !parse_u32(a, v, &u)) return -1;
        s->logprobs = true;
        s->top_logprobs = u;
    } else if (!strcmp(a, "--seed")) {
        if (!VALUE() || !fl_flag_int(a, v, 0, LONG_MAX, &n)) return -1;
        s->seed = (uint64_t)n;
    } else if (!strcmp(a, "--ignore-eos")) {
        g->ignore_eos = true;
    } else if (!strcmp(a, "--spec")) {
        if (!VALUE()) return -1;
        if (!folio_spec_mode_parse(v, &g->spec)) {
            fprintf(stderr, "error: --spec %s: expected auto, none, ngram or medusa\n", v);
            return -1;
        }
        g->spec_given = true;
    } else if (!strcmp(a, "--max-draft")) {
        if (!VALUE() || !parse_u32(a, v, &g->max_draft)) return -1;
    } else if (!strcmp(a, "--choice")) {
        if (!VALUE()) return -1;
        if (g->n_choices == FOLIO_MAX_CHOICES || !*v) {
            fprintf(stderr, "error: --choice takes a non-empty string, at most %d times\n", FOLIO_MAX_CHOICES);
            return -1;
        }
        g->choices[g->n_choices++] = (char *)v;
    } else if (!strcmp(a, "--regex")) {
        if (!VALUE()) return -1;
        g->regex = (char *)v;
    } else if (!strcmp(a, "--json-schema")) {
        if (!VALUE()) return -1;
        size_t len = 0;
        free(g->json_schema);
        if (!(g->json_schema = fl_read_file(v, &len))) {
            fprintf(stderr, "error: --json-schema %s: %s\n", v, strerror(errno));
            return -1;
        }
        if (len > FOLIO_MAX_SCHEMA_BYTES || strlen(g->json_schema) != len) {
            fprintf(stderr, "error: --json-schema %s: %zu bytes, or a NUL in it (at most %d bytes of text)\n", v, len,
                    FOLIO_MAX_SCHEMA_BYTES);
            return -1;
        }
    } else if (!strcmp(a, "--stop")) {
        if (!VALUE()) return -1;
        if (g->n_stops == FOLIO_MAX_STOPS || !*v) {
            fprintf(stderr, "error: --stop takes a non-empty string, at most %d times\n", FOLIO_MAX_STOPS);
            return -1;
        }
        g->stops[g->n_stops++] = (char *)v;
    } else {
        return 0;
    }
#undef VALUE
    return 1;
}

void cli_gen_request(const cli_gen_flags_t *f, Folio__V1__GenerateRequest *g)
{
    g->sampling = (Folio__V1__SamplingParams *)&f->sampling; /* read, never written */
    g->max_tokens = (uint32_t)f->max_tokens;
    g->stop = (char **)f->stops;
    g->n_stop = (size_t)f->n_stops;
    g->ignore_eos = f->ignore_eos;
    g->spec = f->spec;
    g->max_draft = f->max_draft;
    g->choices = (char **)f->choices;
    g->n_choices = (size_t)f->n_choices;
    if (f->regex) g->regex = f->regex;
    if (f->json_schema) g->json_schema = f->json_schema;
}

void cli_gen_flags_free(cli_gen_flags_t *g)
{
    free(g->json_schema);
    g->json_schema = NULL;
}

const char *cli_gen_flags_help(void)
{
    return "  -n, --max-tokens N    tokens to generate (default 128)\n"
           "  --temperature F       0 = greedy\n"
           "  --top-k N             sample among the N most likely (0: off)\n"
           "  --top-p F             nucleus sampling, in (0, 1] (1: off)\n"
           "  --min-p F             keep tokens at least F x as likely as the best (0: off)\n"
           "  --repeat-penalty F    llama.cpp's repetition penalty (1: off) ...\n"
           "  --repeat-last-n N     ... over the last N tokens of prompt and answer\n"
           "  --presence-penalty F  the OpenAI API's, in [-2, 2], over the answer's tokens\n"
           "  --frequency-penalty F the OpenAI API's, in [-2, 2]\n"
           "  --logit-bias ID=B     add B in [-100, 100] to token ID's logit (-100 bans it); repeatable\n"
           "  --logprobs            each token's log-probability (--json)\n"
           "  --top-logprobs N      and the N most likely alternatives (at most 20)\n"
           "  --seed N              sampling seed (default 0): a draw depends on (seed, position) only\n"
           "  --stop S              stop string, repeatable: the text ends where it begins\n"
           "  --ignore-eos          keep generating past end-of-generation tokens\n"
           "  --spec MODE           speculative decoding: auto (default: Medusa where heads are loaded, else\n"
           "                        n-gram), medusa, ngram or none; the output is the same, only faster\n"
           "  --max-draft N         at most N draft tokens verified per step (0: default; at most 16)\n"
           "  --choice S            the answer is exactly one of the --choice strings (repeatable)\n"
           "  --regex R             the answer matches the regular expression R (whole answer)\n"
           "  --json-schema FILE    the answer is JSON valid under the schema in FILE\n"
           "                        (the supported subsets: README, \"Constrained output\")\n"
           "  Sampling flags not given take the model's defaults: its GGUF's general.sampling.* keys where\n"
           "  present, else llama-cli's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition\n"
           "  penalty); the worker applies the same rule to generate and chat.\n";
}
