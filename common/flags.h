/* flags.h - command-line value parsing every program's main() shares, so the tools and the servers
 * spell and check values the same way. These print why a value is bad to stderr: they are for a
 * main() reading its argv, never for library code. */
#ifndef FOLIO_FLAGS_H
#define FOLIO_FLAGS_H

#include <stdbool.h>
#include <stddef.h>

/* Value of flag argv[*i]: advances *i; prints an error and returns NULL when missing. */
const char *fl_flag_value(int argc, char **argv, int *i);
bool fl_flag_int(const char *flag, const char *s, long lo, long hi, long *out);
bool fl_flag_float(const char *flag, const char *s, double lo, double hi, double *out);
/* "64MiB", "1GiB", "1048576" */
bool fl_flag_bytes(const char *flag, const char *s, size_t *out);

#endif
