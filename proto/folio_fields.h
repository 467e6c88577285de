/* folio_fields.h - presence of SamplingParams' optional fields in C, and the rules on
 * GenerateRequest's fields that the coordinator and the worker's request layer both apply.
 *
 * folio.proto gives those fields presence with one-field oneofs (`oneof _temperature { float
 * temperature = 1; }`, what proto3 `optional` compiles to; protoc-c 1.4 lacks the keyword), so
 * protobuf-c stores a case next to each value. These say "set" and "is it set" without the
 * generated enum names at every call site. Header-only: it needs the generated header alone. */
#ifndef FOLIO_FIELDS_H
#define FOLIO_FIELDS_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "folio.pb-c.h"

#define FOLIO_DEFAULT_MAX_TOKENS 16 /* GenerateRequest.max_tokens 0 */
#define FOLIO_MAX_TOP_LOGPROBS 20
#define FOLIO_MAX_LOGIT_BIAS   1024
#define FOLIO_MAX_STOPS        16  /* GenerateRequest.stop strings ... */
#define FOLIO_MAX_STOP_BYTES   256 /* ... of 1 to this many bytes each */
#define FOLIO_MAX_DRAFT        16  /* GenerateRequest.max_draft (the scheduler's SCHED_MAX_DRAFT) */
#define FOLIO_MAX_CHOICES      256 /* GenerateRequest.choices ... */
#define FOLIO_MAX_CHOICE_BYTES 1024 /* ... of 1 to this many bytes each */
#define FOLIO_MAX_REGEX_BYTES  4096
#define FOLIO_MAX_SCHEMA_BYTES 65536

#define FOLIO_SAMPLING_HAS(s, field) ((s)->_##field##_case != 0)

#define FOLIO_SAMPLING_SETTER(type, field, FIELD)                                                      \
    static inline void folio_sampling_set_##field(Folio__V1__SamplingParams *s, type v)                \
    {                                                                                                  \
        s->_##field##_case = FOLIO__V1__SAMPLING_PARAMS___##FIELD##_##FIELD;                            \
        s->field = v;                                                                                  \
    }
FOLIO_SAMPLING_SETTER(float, temperature, TEMPERATURE)
FOLIO_SAMPLING_SETTER(uint32_t, top_k, TOP_K)
FOLIO_SAMPLING_SETTER(float, top_p, TOP_P)
FOLIO_SAMPLING_SETTER(float, min_p, MIN_P)
FOLIO_SAMPLING_SETTER(float, repetition_penalty, REPETITION_PENALTY)
FOLIO_SAMPLING_SETTER(uint32_t, repetition_last_n, REPETITION_LAST_N)
FOLIO_SAMPLING_SETTER(float, presence_penalty, PRESENCE_PENALTY)
FOLIO_SAMPLING_SETTER(float, frequency_penalty, FREQUENCY_PENALTY)
#undef FOLIO_SAMPLING_SETTER

/* GenerateRequest.stop within its bounds; false with a message naming the string otherwise. The
 * coordinator and the worker's request layer both apply it. */
static inline bool folio_stops_check(char *const *stops, size_t n, char *msg, size_t cap)
{
    if (n > FOLIO_MAX_STOPS)
        return snprintf(msg, cap, "GenerateRequest has %zu stop strings (at most %d)", n, FOLIO_MAX_STOPS), false;
    for (size_t i = 0; i < n; i++) {
        const size_t len = strlen(stops[i]);
        if (len == 0 || len > FOLIO_MAX_STOP_BYTES)
            return snprintf(msg, cap, "GenerateRequest.stop[%zu] has %zu bytes (1 to %d)", i, len,
                            FOLIO_MAX_STOP_BYTES), false;
    }
    return true;
}

/* GenerateRequest.spec's flag name (--spec auto|none|ngram|medusa), or NULL for a number the
 * schema does not name. */
static inline const char *folio_spec_mode_name(int mode)
{
    static const char *const names[] = {"auto", "none", "ngram", "medusa"};
    return mode >= 0 && mode < (int)(sizeof names / sizeof *names) ? names[mode] : NULL;
}

/* The mode a flag names; false for another name. */
static inline bool folio_spec_mode_parse(const char *name, Folio__V1__SpecMode *out)
{
    for (int i = 0; folio_spec_mode_name(i); i++)
        if (!strcmp(name, folio_spec_mode_name(i))) return *out = (Folio__V1__SpecMode)i, true;
    return false;
}

/* GenerateRequest.spec and max_draft within their bounds: a mode the schema names (a newer
 * client's unknown number is refused, not taken for AUTO) and at most FOLIO_MAX_DRAFT draft tokens.
 * false with a message naming the field otherwise. */
static inline bool folio_spec_check(const Folio__V1__GenerateRequest *g, char *msg, size_t cap)
{
    if (!folio_spec_mode_name((int)g->spec))
        return snprintf(msg, cap, "GenerateRequest.spec = %d: not a SpecMode (0 auto, 1 none, 2 ngram, 3 medusa)",
                        (int)g->spec), false;
    if (g->max_draft > FOLIO_MAX_DRAFT)
        return snprintf(msg, cap, "GenerateRequest.max_draft = %u: at most %d (0 = the default)", g->max_draft,
                        FOLIO_MAX_DRAFT), false;
    return true;
}

/* GenerateRequest's constraint fields: at most one set, each within its bounds (whether it compiles
 * is the worker's to say). */
static inline bool folio_constraint_check(const Folio__V1__GenerateRequest *g, char *msg, size_t cap)
{
    const size_t regex = g->regex ? strlen(g->regex) : 0, schema = g->json_schema ? strlen(g->json_schema) : 0;
    if ((g->n_choices > 0) + (regex > 0) + (schema > 0) > 1)
        return snprintf(msg, cap, "GenerateRequest: choices, regex and json_schema are exclusive (%zu choices, "
                                  "regex of %zu bytes, json_schema of %zu bytes)", g->n_choices, regex, schema), false;
    if (g->n_choices > FOLIO_MAX_CHOICES)
        return snprintf(msg, cap, "GenerateRequest has %zu choices (at most %d)", g->n_choices, FOLIO_MAX_CHOICES), false;
    for (size_t i = 0; i < g->n_choices; i++) {
        const size_t len = strlen(g->choices[i]);
        if (len == 0 || len > FOLIO_MAX_CHOICE_BYTES)
            return snprintf(msg, cap, "GenerateRequest.choices[%zu] has %zu bytes (1 to %d)", i, len,
                            FOLIO_MAX_CHOICE_BYTES), false;
    }
    if (regex > FOLIO_MAX_REGEX_BYTES)
        return snprintf(msg, cap, "GenerateRequest.regex has %zu bytes (at most %d)", regex, FOLIO_MAX_REGEX_BYTES), false;
    if (schema > FOLIO_MAX_SCHEMA_BYTES)
        return snprintf(msg, cap, "GenerateRequest.json_schema has %zu bytes (at most %d)", schema,
                        FOLIO_MAX_SCHEMA_BYTES), false;
    return true;
}

/* GroupStatus.mean_accepted_length of a load: tokens a sequence gains per verification step with a
 * draft, 1 + accepted / spec_seq_steps; 0 when no speculation ran. */
static inline double folio_mean_accepted_length(const Folio__V1__WorkerLoad *l)
{
    if (!l || !l->spec_seq_steps) return 0;
    return 1.0 + (double)l->accepted_tokens / (double)l->spec_seq_steps;
}

/* The ranges of SamplingParams' fields that are set (proto/README.md, "Generate"): the one
 * definition the coordinator checks at the door and the worker's request layer applies, so a
 * request is refused or taken alike wherever it is read. Tokens are checked against a vocabulary
 * where one is known (n_vocab > 0). false with a message naming the field when one is out of range. */
static inline bool folio_sampling_check(const Folio__V1__SamplingParams *s, int32_t n_vocab, char *msg, size_t cap)
{
    if (!s) return true;
    if (FOLIO_SAMPLING_HAS(s, temperature) && !(s->temperature >= 0 && s->temperature <= 100))
        return snprintf(msg, cap, "SamplingParams.temperature = %g: must be in [0, 100] (0 = greedy)",
                        (double)s->temperature), false;
    if (FOLIO_SAMPLING_HAS(s, top_p) && !(s->top_p > 0 && s->top_p <= 1))
        return snprintf(msg, cap, "SamplingParams.top_p = %g: must be in (0, 1] (1 = off; temperature 0 for greedy)",
                        (double)s->top_p), false;
    if (FOLIO_SAMPLING_HAS(s, min_p) && !(s->min_p >= 0 && s->min_p <= 1))
        return snprintf(msg, cap, "SamplingParams.min_p = %g: must be in [0, 1] (0 = off)", (double)s->min_p), false;
    if (FOLIO_SAMPLING_HAS(s, repetition_penalty) && !(s->repetition_penalty > 0 && isfinite(s->repetition_penalty)))
        return snprintf(msg, cap, "SamplingParams.repetition_penalty = %g: must be above 0 (1 = off)",
                        (double)s->repetition_penalty), false;
    if (FOLIO_SAMPLING_HAS(s, presence_penalty) && !(s->presence_penalty >= -2 && s->presence_penalty <= 2))
        return snprintf(msg, cap, "SamplingParams.presence_penalty = %g: must be in [-2, 2]", (double)s->presence_penalty),
               false;
    if (FOLIO_SAMPLING_HAS(s, frequency_penalty) && !(s->frequency_penalty >= -2 && s->frequency_penalty <= 2))
        return snprintf(msg, cap, "SamplingParams.frequency_penalty = %g: must be in [-2, 2]",
                        (double)s->frequency_penalty), false;
    if (s->top_logprobs > FOLIO_MAX_TOP_LOGPROBS)
        return snprintf(msg, cap, "SamplingParams.top_logprobs = %u: at most %d", s->top_logprobs,
                        FOLIO_MAX_TOP_LOGPROBS), false;
    if (s->top_logprobs > 0 && !s->logprobs)
        return snprintf(msg, cap, "SamplingParams.top_logprobs needs logprobs set"), false;
    if (s->n_logit_bias > FOLIO_MAX_LOGIT_BIAS)
        return snprintf(msg, cap, "SamplingParams.logit_bias has %zu entries (at most %d)", s->n_logit_bias,
                        FOLIO_MAX_LOGIT_BIAS), false;
    for (size_t i = 0; i < s->n_logit_bias; i++) {
        const Folio__V1__LogitBias *b = s->logit_bias[i];
        if (b->token < 0 || (n_vocab > 0 && b->token >= n_vocab))
            return snprintf(msg, cap, "SamplingParams.logit_bias[%zu].token = %d is outside the vocabulary%s", i,
                            b->token, n_vocab > 0 ? "" : " (negative)"), false;
        if (!(b->bias >= -100 && b->bias <= 100))
            return snprintf(msg, cap, "SamplingParams.logit_bias[%zu].bias = %g: must be in [-100, 100]", i,
                            (double)b->bias), false;
    }
    return true;
}

#endif
