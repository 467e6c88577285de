/* gguf.h - read-only GGUF v2/v3 model files, memory-mapped.
 *
 * gguf_open() maps the file, validates the header, every metadata key/value and every tensor info
 * (names, dims, types, offsets, sizes, alignment) against the file size before returning, so the
 * accessors below never read out of bounds. Strings and arrays point into the mapping (borrowed,
 * valid until gguf_destroy). A bad file gives NULL and an error naming the file and the problem. */
#ifndef FOLIO_GGUF_H
#define FOLIO_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef enum {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
} gguf_value_type_t;

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32

typedef struct gguf_tensor {
    const char *name;          /* NUL-terminated copy owned by the gguf_t */
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the contiguous (row) dimension; unused dims are 1 */
    int type;                  /* fl_dtype_t number (see dtype.h); may be a type folio can't compute with */
    uint64_t offset;           /* relative to the data section */
    const void *data;          /* into the mapping */
    size_t nbytes;
} gguf_tensor_t;

typedef struct gguf gguf_t;

gguf_t *gguf_open(const char *path, fl_error_t *err);
/* Parses a GGUF image already in memory (used by gguf_open and the fuzzer). data is borrowed and must
 * outlive the gguf_t; name is copied and used in error messages and gguf_path(). */
gguf_t *gguf_open_memory(const void *data, size_t size, const char *name, fl_error_t *err);
void gguf_destroy(gguf_t **gp);

const char *gguf_path(const gguf_t *g);
uint32_t gguf_version(const gguf_t *g);
size_t gguf_alignment(const gguf_t *g);
size_t gguf_file_size(const gguf_t *g);
size_t gguf_data_offset(const gguf_t *g); /* file offset of the (aligned) tensor data section */
/* "uint32", "string", "array", ...; "?" for numbers outside the enum. */
const char *gguf_type_name(gguf_value_type_t t);
/* Size in bytes of one element of a numeric value type; 0 for STRING, ARRAY and unknown types. */
size_t gguf_type_size(gguf_value_type_t t);

/* Metadata. Keys are looked up exactly; -1 when absent. */
int64_t gguf_n_kv(const gguf_t *g);
int64_t gguf_find_key(const gguf_t *g, const char *key);
const char *gguf_key_name(const gguf_t *g, int64_t i);
gguf_value_type_t gguf_kv_type(const gguf_t *g, int64_t i);

/* Typed getters by key: return 0 and store the value, FL_ENOTFOUND if the key is absent, or
 * FL_EFORMAT (with a message naming the key) if its type does not fit. Integer getters accept any
 * integer type whose value fits; gguf_get_f32 also accepts FLOAT64 and integers. */
int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out, fl_error_t *err);
int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out, fl_error_t *err);
int gguf_get_f32(const gguf_t *g, const char *key, float *out, fl_error_t *err);
int gguf_get_bool(const gguf_t *g, const char *key, bool *out, fl_error_t *err);
/* String value: pointer into the mapping (not NUL-terminated) and its length. */
int gguf_get_str(const gguf_t *g, const char *key, const char **s, size_t *len, fl_error_t *err);

/* Arrays: element type and count; numeric arrays expose their raw little-endian data; string arrays
 * are read element by element (O(1): offsets are indexed at open). */
int gguf_get_arr(const gguf_t *g, const char *key, gguf_value_type_t *elem_type, uint64_t *n, fl_error_t *err);
/* NULL for string arrays and absent keys. The data is not necessarily aligned for its type: memcpy. */
const void *gguf_arr_data(const gguf_t *g, const char *key);
/* 0, FL_ENOTFOUND (no such key / not a string array) or FL_ERANGE (i >= count). */
int gguf_arr_str(const gguf_t *g, const char *key, uint64_t i, const char **s, size_t *len);

/* Tensors. */
int64_t gguf_n_tensors(const gguf_t *g);
const gguf_tensor_t *gguf_tensor(const gguf_t *g, int64_t i);
const gguf_tensor_t *gguf_find_tensor(const gguf_t *g, const char *name);

#endif
