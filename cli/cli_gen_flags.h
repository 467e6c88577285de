/* cli_gen_flags.h - the generation flags `folioctl run`, `chat` and `generate` share (-n, sampling,
 * --stop, --ignore-eos, --spec, --max-draft), parsed in one place into the fields of a GenerateRequest: what the flags
 * say goes in, nothing else. What the request then means (defaults for what is unset, ranges) is
 * decided by the request layer (worker/request.c) once, locally for run and chat --local, in the
 * worker for generate and chat, so the two cannot disagree. */
#ifndef FOLIO_CLI_GEN_FLAGS_H
#define FOLIO_CLI_GEN_FLAGS_H

#include <stdbool.h>

#include "folio_fields.h"

#define CLI_MAX_LOGIT_BIAS 256

typedef struct cli_gen_flags {
    long max_tokens;                   /* -n; default 128 */
    Folio__V1__SamplingParams sampling;/* only the fields whose flags were given are set */
    Folio__V1__LogitBias bias[CLI_MAX_LOGIT_BIAS];
    Folio__V1__LogitBias *bias_ptrs[CLI_MAX_LOGIT_BIAS];
    bool ignore_eos;
    char *stops[FOLIO_MAX_STOPS];        /* --stop, repeatable; borrowed from argv */
    int n_stops;
    Folio__V1__SpecMode spec;          /* --spec; AUTO when not given (`up` passes it to its workers) */
    bool spec_given;
    uint32_t max_draft;                /* --max-draft; 0: the worker's default */
    /* Constrained output: --choice S (repeatable), --regex R or --json-schema FILE (read whole) */
    char *choices[FOLIO_MAX_CHOICES];  /* borrowed from argv */
    int n_choices;
    char *regex;                       /* borrowed from argv */
    char *json_schema;                 /* the file's text, malloc'd: cli_gen_flags_free */
} cli_gen_flags_t;

/* -n 128, every sampling field unset. */
void cli_gen_flags_init(cli_gen_flags_t *g);
/* Parses the generation flag at argv[*i] and its value, advancing *i past the value. Returns 1 when
 * it consumed a flag, 0 when argv[*i] is not a generation flag, -1 (after printing why) on a value
 * that is not a number of its kind (ranges are the request layer's to check). */
int cli_gen_flag_parse(cli_gen_flags_t *g, int argc, char **argv, int *i);
/* The GenerateRequest these flags describe, prompt aside (g's pointers point into f). */
void cli_gen_request(const cli_gen_flags_t *f, Folio__V1__GenerateRequest *g);
void cli_gen_flags_free(cli_gen_flags_t *g);
/* The flags' help lines. */
const char *cli_gen_flags_help(void);

#endif
