/* cli_common.h - flag parsing the command-line tools share (engine and sampling flags), so
 * folioctl and folio-bench spell and check them the same way. */
#ifndef FOLIO_CLI_COMMON_H
#define FOLIO_CLI_COMMON_H

#include <stdbool.h>

#include "engine.h"

/* Parses the engine flag at argv[*i] (-m/--model, --backend, --device, --threads, --kv-budget,
 * --block-size, --ctx) and its value. Returns 1 when it consumed a flag, 0 when argv[*i] is not an
 * engine flag, -1 (after printing why) on a bad value. */
int cli_parse_engine_flag(engine_opts_t *o, int argc, char **argv, int *i);
const char *cli_engine_flags_help(void);

/* Value of flag argv[*i]: advances *i; prints an error and returns NULL when missing. */
const char *cli_value(int argc, char **argv, int *i);
bool cli_parse_int(const char *flag, const char *s, long lo, long hi, long *out);
bool cli_parse_float(const char *flag, const char *s, double lo, double hi, double *out);
/* "64MiB", "1GiB", "1048576" */
bool cli_parse_bytes(const char *flag, const char *s, size_t *out);

#endif
