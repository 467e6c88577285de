/* folio_fields.h - presence of SamplingParams' optional fields in C.
 *
 * folio.proto gives those fields presence with one-field oneofs (`oneof _temperature { float
 * temperature = 1; }`, what proto3 `optional` compiles to; protoc-c 1.4 lacks the keyword), so
 * protobuf-c stores a case next to each value. These say "set" and "is it set" without the
 * generated enum names at every call site. Header-only: it needs the generated header alone. */
#ifndef FOLIO_FIELDS_H
#define FOLIO_FIELDS_H

#include <stdbool.h>

#include "folio.pb-c.h"

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

#endif
