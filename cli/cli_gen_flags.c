/* cli_gen_flags.c - parsing of the generation flags; see cli_gen_flags.h. Their help lines are in
 * folioctl's usage(). */
#include "cli_gen_flags.h"

#include <stdio.h>
#include <string.h>

#include "flags.h"

void cli_gen_flags_init(cli_gen_flags_t *g)
{
    memset(g, 0, sizeof *g);
    g->max_tokens = 128;
    g->top_p = 1.0;
}

int cli_gen_flag_parse(cli_gen_flags_t *g, int argc, char **argv, int *i)
{
    const char *a = argv[*i], *v;
    if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(a, v, 0, 1 << 20, &g->max_tokens)) return -1;
    } else if (!strcmp(a, "--temperature")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_float(a, v, 0, 100, &g->temperature)) return -1;
    } else if (!strcmp(a, "--top-k")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(a, v, 0, 1 << 24, &g->top_k)) return -1;
    } else if (!strcmp(a, "--top-p")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_float(a, v, 0, 1, &g->top_p)) return -1;
    } else if (!strcmp(a, "--seed")) {
        if (!(v = fl_flag_value(argc, argv, i)) || !fl_flag_int(a, v, 0, __LONG_MAX__, &g->seed)) return -1;
    } else if (!strcmp(a, "--ignore-eos")) {
        g->ignore_eos = true;
    } else if (!strcmp(a, "--stop")) {
        if (!(v = fl_flag_value(argc, argv, i))) return -1;
        if (g->n_stops == CLI_MAX_STOPS || !*v) {
            fprintf(stderr, "error: --stop takes a non-empty string, at most %d times\n", CLI_MAX_STOPS);
            return -1;
        }
        g->stops[g->n_stops++] = v;
    } else {
        return 0;
    }
    return 1;
}
