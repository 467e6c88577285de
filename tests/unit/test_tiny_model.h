/* test_tiny_model.h - the tiny random-weight model fixture the engine and scheduler tests share:
 * written once per test program to /tmp under the program's name and pid, removed at teardown. */
#ifndef FOLIO_TEST_TINY_MODEL_H
#define FOLIO_TEST_TINY_MODEL_H

#include <stdio.h>
#include <unistd.h>

#include "mkmodel.h"

static char g_tiny_model[256];

/* Writes the model p describes (callers start from mkmodel_params_default); cmocka setup style. */
static inline int tiny_model_write(const char *name, const mkmodel_params_t *p)
{
    snprintf(g_tiny_model, sizeof g_tiny_model, "/tmp/folio_test_%s_%d.gguf", name, (int)getpid());
    fl_error_t err = {0};
    if (mkmodel_write(p, g_tiny_model, &err)) {
        fprintf(stderr, "mkmodel: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static inline int tiny_model_remove(void **state)
{
    (void)state;
    unlink(g_tiny_model);
    return 0;
}

#endif
