/* cli_gen_flags.h - the generation flags `folioctl run`, `chat` and `generate` share (-n, sampling,
 * --stop, --ignore-eos), parsed in one place so the three spell and check them alike. */
#ifndef FOLIO_CLI_GEN_FLAGS_H
#define FOLIO_CLI_GEN_FLAGS_H

#include <stdbool.h>

#define CLI_MAX_STOPS 64

typedef struct cli_gen_flags {
    long max_tokens;                   /* -n; default 128 */
    double temperature, top_p;         /* default 0 (greedy) and 1 (off) */
    long top_k, seed;
    bool ignore_eos;
    const char *stops[CLI_MAX_STOPS];  /* --stop, repeatable; borrowed from argv */
    int n_stops;
} cli_gen_flags_t;

/* The defaults above. */
void cli_gen_flags_init(cli_gen_flags_t *g);
/* Parses the generation flag at argv[*i] and its value, advancing *i past the value. Returns 1 when
 * it consumed a flag, 0 when argv[*i] is not a generation flag, -1 (after printing why) on a bad
 * value. */
int cli_gen_flag_parse(cli_gen_flags_t *g, int argc, char **argv, int *i);

#endif
