/* model_path.c - see model_path.h. FOLIO_DEFAULT_MODEL comes from the build. */
#include "model_path.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifndef FOLIO_DEFAULT_MODEL /* builds outside CMake (the fuzz targets) */
#define FOLIO_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

const char *fl_model_path(const char *explicit_path)
{
    if (explicit_path && *explicit_path) return explicit_path;
    const char *env = getenv("FOLIO_MODEL");
    if (env && *env) return env;
    return FOLIO_DEFAULT_MODEL;
}

void fl_model_id(const char *path, char *out, size_t cap)
{
    struct stat st;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (stat(path, &st) == 0)
        snprintf(out, cap, "%s:%lld", base, (long long)st.st_size);
    else
        snprintf(out, cap, "%s", base);
}
