/* flags.c - see flags.h. */
#include "flags.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *fl_flag_value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        fprintf(stderr, "error: %s needs a value\n", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

bool fl_flag_int(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "error: %s expects an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

bool fl_flag_float(const char *flag, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "error: %s expects a number in [%g, %g], got '%s'\n", flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

bool fl_flag_bytes(const char *flag, const char *s, size_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mult = 1;
    if (!strcasecmp(end, "k") || !strcasecmp(end, "kib")) mult = 1024.0;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib")) mult = 1048576.0;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib")) mult = 1073741824.0;
    else if (*end) mult = -1;
    if (errno || end == s || mult < 0 || !(v * mult >= 1) || v * mult > 1e15) {
        fprintf(stderr, "error: %s expects a size like 64MiB, got '%s'\n", flag, s);
        return false;
    }
    *out = (size_t)(v * mult);
    return true;
}
