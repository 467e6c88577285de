/* model_path.c - see model_path.h. FOLIO_DEFAULT_MODEL comes from the build. */
#include "model_path.h"

#include <stdlib.h>

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
