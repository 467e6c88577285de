/* gelu.h - ggml's GELU table, shared by the CPU and CUDA backends (kern_geglu).
 *
 * ggml computes GELU on the CPU (GGML_GELU_FP16) by looking up the f16-rounded input in a table of
 * f16(gelu(x)) for every f16 x, gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) in f32 as
 * GCC compiles ggml_gelu_f32 for x86 with FMA: 1 + 0.044715 x x contracts to fma(0.044715 x, x, 1).
 * The table equals llama-cpp-python 0.3.16's ggml_table_gelu_f16 entry for entry (checked against
 * the library's exported table). Written with an explicit fmaf so that no compiler's contraction
 * choice changes it. */
#ifndef FOLIO_GELU_H
#define FOLIO_GELU_H

#include <math.h>

#include "../common/dtype.h"

#define KERN_GELU_TABLE_SIZE 65536

static inline void kern_gelu_table_fill(fl_f16_t *table)
{
    for (int h = 0; h < KERN_GELU_TABLE_SIZE; h++) {
        const float x = fl_f16_to_f32((fl_f16_t)h);
        const float inner = fmaf(0.044715f * x, x, 1.0f);
        const float g = 0.5f * x * (1.0f + tanhf(0.79788456080286535587989211986876f * x * inner));
        table[h] = fl_f32_to_f16(g);
    }
}

#endif
