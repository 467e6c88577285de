/* spec_prompts.h - the prompts of `folio-bench spec`'s two workloads. They are the benchmark's own,
 * written apart from the prompts folio-medusa-train distils from, so that Medusa's figures measure
 * heads on text they were not trained on. */
#ifndef FOLIO_SPEC_PROMPTS_H
#define FOLIO_SPEC_PROMPTS_H

typedef enum {
    SPEC_WORKLOAD_SMALL_SET, /* (a) long outputs from a small token set */
    SPEC_WORKLOAD_CHAT,      /* (b) open-ended chat answers */
    SPEC_WORKLOAD_COUNT
} spec_workload_t;

/* The workload's name on the command line and in the tables: "small-set", "chat". */
const char *spec_workload_name(spec_workload_t w);

/* The number of prompts of workload w. Their order mixes the kinds of task, so that the first n of
 * them (--prompts n) cover every kind when n allows. */
int spec_prompt_count(spec_workload_t w);

/* The user message of prompt i of workload w, NUL-terminated, malloc'd (the caller frees); NULL when
 * out of memory. */
char *spec_prompt_text(spec_workload_t w, int i);

#endif
