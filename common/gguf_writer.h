/* gguf_writer.h - writes GGUF v3 files: metadata of every type, tensors copied or streamed.
 *
 * Build the file in memory with the set/add calls, then gguf_writer_write() lays it out (tensor data
 * aligned to 32 bytes, or general.alignment when set with gguf_writer_set_alignment) and writes it to
 * PATH.tmp, renamed to PATH when complete. Tensors added with gguf_writer_add_tensor_fn() are not held
 * in memory: their callback produces rows in chunks while the file is written, so models larger than
 * RAM can be generated. The set/add calls return 0 or a negative FL_E* code; the first failure is also
 * kept and returned (with its message) by gguf_writer_write, so callers may check only that. */
#ifndef FOLIO_GGUF_WRITER_H
#define FOLIO_GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "gguf.h"

typedef struct gguf_writer gguf_writer_t;

/* Produces rows [row0, row0 + n_rows) of a tensor, already encoded in its type, into dst
 * (n_rows * row bytes). A row is ne[0] elements; rows count over ne[1] * ne[2] * ne[3]. Returns 0 or
 * a negative FL_E* code with err filled. Called in row order, from the thread calling write, or with
 * gguf_writer_set_threads(w, n > 1) from one of n threads (one tensor's rows all from one thread, in
 * order; different tensors concurrently). */
typedef int (*gguf_writer_fill_fn)(void *user, int64_t row0, int64_t n_rows, void *dst, fl_error_t *err);

gguf_writer_t *gguf_writer_new(void);
void gguf_writer_destroy(gguf_writer_t **wp);

int gguf_writer_set_u8(gguf_writer_t *w, const char *key, uint8_t v);
int gguf_writer_set_i8(gguf_writer_t *w, const char *key, int8_t v);
int gguf_writer_set_u16(gguf_writer_t *w, const char *key, uint16_t v);
int gguf_writer_set_i16(gguf_writer_t *w, const char *key, int16_t v);
int gguf_writer_set_u32(gguf_writer_t *w, const char *key, uint32_t v);
int gguf_writer_set_i32(gguf_writer_t *w, const char *key, int32_t v);
int gguf_writer_set_u64(gguf_writer_t *w, const char *key, uint64_t v);
int gguf_writer_set_i64(gguf_writer_t *w, const char *key, int64_t v);
int gguf_writer_set_f32(gguf_writer_t *w, const char *key, float v);
int gguf_writer_set_f64(gguf_writer_t *w, const char *key, double v);
int gguf_writer_set_bool(gguf_writer_t *w, const char *key, bool v);
int gguf_writer_set_str(gguf_writer_t *w, const char *key, const char *s);
int gguf_writer_set_strn(gguf_writer_t *w, const char *key, const char *s, size_t len);
/* Numeric array of n elements of elem_type (little-endian, copied); not STRING or ARRAY. */
int gguf_writer_set_arr(gguf_writer_t *w, const char *key, gguf_value_type_t elem_type, const void *data, uint64_t n);
/* Array of n NUL-terminated strings (copied). */
int gguf_writer_set_arr_str(gguf_writer_t *w, const char *key, const char *const *strs, uint64_t n);
/* Sets general.alignment (a power of two) and aligns the data with it. */
int gguf_writer_set_alignment(gguf_writer_t *w, uint32_t alignment);
/* Produces and writes tensor data on n threads (the file's bytes are the same as with one). */
void gguf_writer_set_threads(gguf_writer_t *w, int n);

/* Tensor of type F32, F16, BF16, Q4_0, Q4_1 or Q8_0 with n_dims (1..4) dims ne[]; data (its encoded
 * bytes, fl_dtype_row_bytes(type, ne[0]) per row) is copied. */
int gguf_writer_add_tensor(gguf_writer_t *w, const char *name, int type, int n_dims, const int64_t *ne, const void *data);
/* Same, with the data produced by fill(user, ...) while writing; user must outlive the write. */
int gguf_writer_add_tensor_fn(gguf_writer_t *w, const char *name, int type, int n_dims, const int64_t *ne,
                              gguf_writer_fill_fn fill, void *user);

int64_t gguf_writer_n_tensors(const gguf_writer_t *w);
/* Total bytes the file will have. */
uint64_t gguf_writer_file_size(const gguf_writer_t *w);

int gguf_writer_write(gguf_writer_t *w, const char *path, fl_error_t *err);

#endif
