/* spec_prompts.h - the prompts of `folio-bench spec`'s workloads, and the constraints of the
 * constrained ones. They are the benchmark's own, written apart from the prompts folio-medusa-train
 * distils from, so that Medusa's figures measure heads on text they were not trained on. */
#ifndef FOLIO_SPEC_PROMPTS_H
#define FOLIO_SPEC_PROMPTS_H

#include <stdbool.h>
#include <stddef.h>

#include "constraint.h"

typedef enum {
    SPEC_WORKLOAD_SMALL_SET, /* (a) long outputs from a small token set */
    SPEC_WORKLOAD_CHAT,      /* (b) open-ended chat answers */
    SPEC_WORKLOAD_LABELS,    /* (c) one of five labels for each line of a 40-line list; a regex */
    SPEC_WORKLOAD_JSON,      /* (d) JSON records with enum fields; a JSON Schema */
    SPEC_WORKLOAD_COUNT
} spec_workload_t;

/* The workload's name on the command line and in the tables: "small-set", "chat", "labels", "json". */
const char *spec_workload_name(spec_workload_t w);

/* The number of prompts of workload w. Their order mixes the kinds of task, so that the first n of
 * them (--prompts n) cover every kind when n allows. */
int spec_prompt_count(spec_workload_t w);

/* The user message of prompt i of workload w, NUL-terminated, malloc'd (the caller frees); NULL when
 * out of memory. */
char *spec_prompt_text(spec_workload_t w, int i);

/* Whether workload w's prompts come with a constraint (labels, json). */
bool spec_workload_constrained(spec_workload_t w);

/* The constraint the answer to prompt i of a constrained workload must match: its kind (REGEX or
 * JSON_SCHEMA) and *text, the pattern or the schema (malloc'd; the caller frees). The pattern asks
 * for exactly the numbered format the prompt asks for; the schema for exactly as many records as
 * the prompt lists. Returns 0, or -1 when out of memory or w has no constraints. */
int spec_prompt_constraint(spec_workload_t w, int i, fl_constraint_kind_t *kind, char **text);

/* Whether text, a complete answer to prompt i of a constrained workload, matches its constraint,
 * checked apart from folio's constraint compiler: the labels by a POSIX regular expression (regcomp),
 * the JSON by parsing it with cJSON and checking each record's fields, enums and bounds. When not,
 * why says what is wrong. */
bool spec_output_valid(spec_workload_t w, int i, const char *text, char *why, size_t cap);

#endif
