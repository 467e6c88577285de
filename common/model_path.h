/* model_path.h - which GGUF a tool opens when none is named. */
#ifndef FOLIO_MODEL_PATH_H
#define FOLIO_MODEL_PATH_H

/* The explicit path, else $FOLIO_MODEL, else the default model set-up fetched
 * (models/SmolLM2-135M-Instruct.Q4_1.gguf in the source tree). Never NULL. */
const char *fl_model_path(const char *explicit_path);

#endif
