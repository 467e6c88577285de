/* test_util.h - small helpers the unit tests share (header-only: each test is one executable). */
#ifndef FOLIO_TEST_UTIL_H
#define FOLIO_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>

/* Whole file, NUL-terminated, malloc'd; *len (if not NULL) gets its length. NULL if unreadable. */
static inline char *test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        if (len) *len = (size_t)n;
    }
    return buf;
}

#endif
