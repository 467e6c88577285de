/* model_path.h - which GGUF a tool opens when none is named. */
#ifndef FOLIO_MODEL_PATH_H
#define FOLIO_MODEL_PATH_H

#include <stddef.h>

/* The explicit path, else $FOLIO_MODEL, else the default model set-up fetched
 * (models/SmolLM2-135M-Instruct.Q4_1.gguf in the source tree). Never NULL. */
const char *fl_model_path(const char *explicit_path);

/* A model's identity as the workers report it (WorkerHello.model_id) and the gateway compares it:
 * "file-name:size", the same on every machine holding the same file; the file name alone when it
 * cannot be read. */
void fl_model_id(const char *path, char *out, size_t cap);

#endif
