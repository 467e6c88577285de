/* quant.h - scalar reference quantization and dequantization of rows of tensor elements.
 *
 * These are the slow, obviously-correct versions that the SIMD and CUDA kernels are tested against,
 * and that folio-mkmodel uses to write quantized weights. The quantizers follow ggml's reference
 * quantizers (quantize_row_*_ref) bit for bit, so files written by folio match llama.cpp's. Block
 * layouts are in dtype.h. Q8_1 uses folio's block (f32 d and s = d * sum(q)), not ggml's f16 one. */
#ifndef FOLIO_QUANT_H
#define FOLIO_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { /* the CUDA module calls quant_rows_to_f16 */
#endif

/* Decodes n elements of type `type` (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q8_1) from src into dst.
 * n must be a multiple of the type's block size (see quant_row_ok); other types or n write nothing. */
void quant_dequantize_row(int type, const void *src, float *dst, int64_t n);

/* Decodes rows [rows][cols] stored `row_bytes` apart into fp16 dst[rows][cols] (each value as
 * quant_dequantize_row gives it, rounded to fp16), on up to n_threads threads: what a GPU backend
 * that keeps fp16 weights does at load. Returns 0, or -1 when out of memory (dst then incomplete). */
int quant_rows_to_f16(int type, const void *src, size_t row_bytes, uint16_t *dst, int64_t rows, int64_t cols,
                      int n_threads);

/* True when quant_(de)quantize_row handle `type` for rows of n elements. */
bool quant_row_ok(int type, int64_t n);

/* Encodes n floats into dst as `type`; returns the bytes written (fl_dtype_row_bytes(type, n)), or 0
 * for an unsupported type or an n that is not a multiple of the block size. */
size_t quant_quantize_row(int type, const float *src, void *dst, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
