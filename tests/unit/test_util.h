/* test_util.h - small helpers the unit tests share (header-only: each test is one executable). */
#ifndef FOLIO_TEST_UTIL_H
#define FOLIO_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "file_read.h" /* fl_read_file, which the tests use */

/* ctest reports a test that exits with this status Skipped (SKIP_RETURN_CODE in tests/CMakeLists.txt).
 * cmocka's skip() alone exits 0, which ctest reports Passed: a test whose input is absent exits 77. */
#define TEST_EXIT_SKIPPED 77

/* The default model (FOLIO_MODEL, else $FOLIO_SOURCE_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf) in
 * buf, or NULL when it cannot be read; then a note naming it goes to stdout. */
static inline const char *test_model_path(char *buf, size_t cap)
{
    const char *env = getenv("FOLIO_MODEL"), *src = getenv("FOLIO_SOURCE_DIR");
    if (env && *env)
        snprintf(buf, cap, "%s", env);
    else
        snprintf(buf, cap, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", src ? src : ".");
    if (access(buf, R_OK) == 0) return buf;
    printf("SKIPPED: the model %s is missing (scripts/setup.sh fetches it; FOLIO_MODEL names another)\n", buf);
    return NULL;
}

#endif
