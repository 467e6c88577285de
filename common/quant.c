/* quant.c - scalar reference (de)quantizers; see quant.h. Formulas are ggml's:
 *   Q4_0: d = max / -8 where max is the element of largest magnitude (sign kept),
 *         q = min(15, (int8)(x/d + 8.5))
 *   Q4_1: d = (max - min) / 15, m = min, q = min(15, (int8)((x - min)/d + 0.5))
 *   Q8_0: d = amax / 127, q = roundf(x/d)
 *   Q8_1: as Q8_0, plus s = d * sum(q)
 * with 1/d taken as 0 for an all-zero block. */
#include "quant.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"

static void quantize_q4_0(const float *x, fl_block_q4_0_t *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += FL_QK) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < FL_QK; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8, id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_f32_to_f16(d);
        for (int j = 0; j < FL_QK / 2; j++) {
            /* a quant whose x / d is not finite (d below ~2e-38) is 0, what x86's conversion gives */
            const float y0 = x[j] * id + 8.5f, y1 = x[FL_QK / 2 + j] * id + 8.5f;
            const int8_t q0 = isfinite(y0) ? (int8_t)y0 : 0, q1 = isfinite(y1) ? (int8_t)y1 : 0;
            const uint8_t a = (uint8_t)(q0 < 15 ? q0 : 15), b = (uint8_t)(q1 < 15 ? q1 : 15);
            y[i].qs[j] = (uint8_t)(a | b << 4);
        }
    }
}

static void quantize_q4_1(const float *x, fl_block_q4_1_t *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += FL_QK) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < FL_QK; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 15, id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_f32_to_f16(d);
        y[i].m = fl_f32_to_f16(min);
        for (int j = 0; j < FL_QK / 2; j++) {
            const int8_t q0 = (int8_t)((x[j] - min) * id + 0.5f), q1 = (int8_t)((x[FL_QK / 2 + j] - min) * id + 0.5f);
            const uint8_t a = (uint8_t)(q0 < 15 ? q0 : 15), b = (uint8_t)(q1 < 15 ? q1 : 15);
            y[i].qs[j] = (uint8_t)(a | b << 4);
        }
    }
}

static float block_amax(const float *x)
{
    float amax = 0.0f;
    for (int j = 0; j < FL_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

static void quantize_q8_0(const float *x, fl_block_q8_0_t *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += FL_QK) {
        const float d = block_amax(x) / 127, id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_f32_to_f16(d);
        for (int j = 0; j < FL_QK; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

static void quantize_q8_1(const float *x, fl_block_q8_1_t *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += FL_QK) {
        const float d = block_amax(x) / 127, id = d ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < FL_QK; j++) {
            y[i].qs[j] = (int8_t)roundf(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].d = d;
        y[i].s = (float)sum * d;
    }
}

size_t quant_quantize_row(int type, const float *src, void *dst, int64_t n)
{
    if (!quant_row_ok(type, n)) return 0;
    const size_t bytes = fl_dtype_row_bytes(type, n);
    const int64_t nb = n / FL_QK;
    switch (type) {
    case FL_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case FL_TYPE_F16:
        for (int64_t i = 0; i < n; i++) ((fl_f16_t *)dst)[i] = fl_f32_to_f16(src[i]);
        break;
    case FL_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) ((fl_bf16_t *)dst)[i] = fl_f32_to_bf16(src[i]);
        break;
    case FL_TYPE_Q4_0: quantize_q4_0(src, dst, nb); break;
    case FL_TYPE_Q4_1: quantize_q4_1(src, dst, nb); break;
    case FL_TYPE_Q8_0: quantize_q8_0(src, dst, nb); break;
    case FL_TYPE_Q8_1: quantize_q8_1(src, dst, nb); break;
    default: return 0;
    }
    return bytes;
}

bool quant_row_ok(int type, int64_t n)
{
    const int64_t be = fl_dtype_block_elems(type);
    return be > 0 && n >= 0 && n % be == 0;
}

void quant_dequantize_row(int type, const void *src, float *dst, int64_t n)
{
    if (!quant_row_ok(type, n)) return;
    const int64_t nb = n / FL_QK;
    switch (type) {
    case FL_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case FL_TYPE_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = fl_f16_to_f32(((const fl_f16_t *)src)[i]);
        break;
    case FL_TYPE_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = fl_bf16_to_f32(((const fl_bf16_t *)src)[i]);
        break;
    case FL_TYPE_Q4_0:
        for (int64_t i = 0; i < nb; i++, dst += FL_QK) {
            const fl_block_q4_0_t *b = (const fl_block_q4_0_t *)src + i;
            const float d = fl_f16_to_f32(b->d);
            for (int j = 0; j < FL_QK / 2; j++) {
                dst[j] = (float)((b->qs[j] & 0x0f) - 8) * d;
                dst[j + FL_QK / 2] = (float)((b->qs[j] >> 4) - 8) * d;
            }
        }
        break;
    case FL_TYPE_Q4_1:
        for (int64_t i = 0; i < nb; i++, dst += FL_QK) {
            const fl_block_q4_1_t *b = (const fl_block_q4_1_t *)src + i;
            const float d = fl_f16_to_f32(b->d), m = fl_f16_to_f32(b->m);
            for (int j = 0; j < FL_QK / 2; j++) {
                dst[j] = (float)(b->qs[j] & 0x0f) * d + m;
                dst[j + FL_QK / 2] = (float)(b->qs[j] >> 4) * d + m;
            }
        }
        break;
    case FL_TYPE_Q8_0:
        for (int64_t i = 0; i < nb; i++, dst += FL_QK) {
            const fl_block_q8_0_t *b = (const fl_block_q8_0_t *)src + i;
            const float d = fl_f16_to_f32(b->d);
            for (int j = 0; j < FL_QK; j++) dst[j] = (float)b->qs[j] * d;
        }
        break;
    case FL_TYPE_Q8_1:
        for (int64_t i = 0; i < nb; i++, dst += FL_QK) {
            const fl_block_q8_1_t *b = (const fl_block_q8_1_t *)src + i;
            for (int j = 0; j < FL_QK; j++) dst[j] = (float)b->qs[j] * b->d;
        }
        break;
    default: break;
    }
}

typedef struct {
    int type;
    const uint8_t *src;
    size_t row_bytes;
    uint16_t *dst;
    int64_t r0, r1, cols;
    int rc;
} rows_f16_job_t;

static void *rows_f16_run(void *arg)
{
    rows_f16_job_t *j = arg;
    float *row = malloc((size_t)j->cols * sizeof(float));
    if (!row) {
        j->rc = -1;
        return NULL;
    }
    for (int64_t r = j->r0; r < j->r1; r++) {
        quant_dequantize_row(j->type, j->src + (size_t)r * j->row_bytes, row, j->cols);
        uint16_t *d = j->dst + (size_t)r * (size_t)j->cols;
        for (int64_t i = 0; i < j->cols; i++) d[i] = fl_f32_to_f16(row[i]);
    }
    free(row);
    return NULL;
}

int quant_rows_to_f16(int type, const void *src, size_t row_bytes, uint16_t *dst, int64_t rows, int64_t cols,
                      int n_threads)
{
    enum { MAX_THREADS = 64 };
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > rows) n_threads = rows > 0 ? (int)rows : 1;
    rows_f16_job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    bool started[MAX_THREADS] = {false};
    for (int t = 0; t < n_threads; t++) {
        jobs[t] = (rows_f16_job_t){.type = type, .src = src, .row_bytes = row_bytes, .dst = dst,
                                   .r0 = rows * t / n_threads, .r1 = rows * (t + 1) / n_threads, .cols = cols};
        /* thread 0's share runs here; a thread that cannot start has its share run here too */
        if (t > 0) started[t] = pthread_create(&tids[t], NULL, rows_f16_run, &jobs[t]) == 0;
    }
    rows_f16_run(&jobs[0]);
    int rc = jobs[0].rc;
    for (int t = 1; t < n_threads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else rows_f16_run(&jobs[t]);
        if (jobs[t].rc) rc = jobs[t].rc;
    }
    return rc;
}
