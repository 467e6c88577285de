/* backend_internal.h - what a backend implements: the table of operations behind kernels.h's opaque
 * kern_backend_t. Not part of kernels.h: kernels/backend.c, the backends (kernels/cpu, kernels/cuda)
 * and the kernel tests include it; the model and everything above see only kernels.h.
 *
 * A backend's own struct begins with a struct kern_backend pointing at its static kern_ops_t, and
 * kernels/backend.c's kern_* functions call through it. Each entry implements the kern_* function of
 * its name, as kernels.h documents it. The optional entries may be NULL: kern_* then runs the plain
 * ops a fused one stands for (matmul_multi, add_rmsnorm, rope_kv_store, matmul_swiglu), runs ops
 * directly (graph_*), or reports FL_EUNSUPPORTED (mem_info). */
#ifndef FOLIO_BACKEND_INTERNAL_H
#define FOLIO_BACKEND_INTERNAL_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kern_ops {
    const char *name;
    bool device_memory; /* kern_uses_device_memory */
    float attention_cost; /* kern_attention_cost */
    void (*destroy)(kern_backend_t *be);
    void *(*alloc)(kern_backend_t *be, size_t bytes);
    void (*free)(kern_backend_t *be, void *p);
    int (*upload)(kern_backend_t *be, void *dst, const void *src, size_t bytes);
    int (*download)(kern_backend_t *be, void *dst, const void *src, size_t bytes);
    int (*sync)(kern_backend_t *be, fl_error_t *err);

    kern_weight_t *(*weight_new)(kern_backend_t *be, int type, int64_t rows, int64_t cols, const void *data,
                                 fl_error_t *err);
    void (*weight_destroy)(kern_backend_t *be, kern_weight_t *w);

    void (*embed)(kern_backend_t *be, float *out, const kern_weight_t *table, const int32_t *ids, int n);
    void (*matmul)(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n);
    void (*matmul_multi)(kern_backend_t *be, float *const *ys, const kern_weight_t *const *ws, int n_w,
                         const float *x, int n); /* optional */
    void (*rmsnorm)(kern_backend_t *be, float *y, const float *x, const float *weight, int n, int dim, float eps);
    void (*rope)(kern_backend_t *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                 const kern_rope_t *rope);
    void (*kv_store)(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const float *k,
                     const float *v, const int32_t *slots, int n, int kv_dim);
    void (*attention)(kern_backend_t *be, const kern_attn_t *a);
    void (*swiglu)(kern_backend_t *be, float *out, const float *gate, const float *up, int n);
    void (*add)(kern_backend_t *be, float *y, const float *x, int n);
    void (*sample)(kern_backend_t *be, int32_t *out, float *logits, int n, int vocab,
                   const kern_sampling_t *params);

    /* Fused ops, optional. */
    void (*add_rmsnorm)(kern_backend_t *be, float *y, float *x, const float *delta, const float *weight, int n,
                        int dim, float eps);
    void (*rope_kv_store)(kern_backend_t *be, float *q, float *k, const float *v, void *k_cache,
                          void *v_cache, int k_type, int v_type, const int32_t *pos, const int32_t *slots, int n, int n_heads,
                          int n_kv_heads, int head_dim, const kern_rope_t *rope);
    void (*matmul_swiglu)(kern_backend_t *be, float *out, float *up, const kern_weight_t *w_gate,
                          const kern_weight_t *w_up, int rows, const float *x, int n);

    /* Recorded op sequences, optional. */
    int (*graph_begin)(kern_backend_t *be, uint64_t key);
    int (*graph_end)(kern_backend_t *be);
    void (*graph_reset)(kern_backend_t *be);

    int (*mem_info)(kern_backend_t *be, size_t *free_bytes, size_t *total_bytes); /* optional */
    void (*kv_move)(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type,
                    const int32_t *src_slots, const int32_t *dst_slots, int n, int kv_dim);
    /* The ops of the families beyond Llama (kernels.h). */
    void (*add_bias)(kern_backend_t *be, float *y, const float *bias, int n, int dim);
    void (*scale)(kern_backend_t *be, float *x, float s, int n);
    void (*softcap)(kern_backend_t *be, float *x, float cap, int n);
    void (*geglu)(kern_backend_t *be, float *out, const float *gate, const float *up, int n);
    /* kern_set_prompt_rows; NULL where every row is summed in one order (CUDA) */
    void (*set_prompt_rows)(kern_backend_t *be, const uint8_t *prompt_rows, int n);
    /* kern_matmul_rows; NULL where whole rows are computed (CUDA: its vocabulary projection is cheap
     * next to a step). Members after the CUDA table's last initialiser are NULL there. */
    void (*matmul_rows)(kern_backend_t *be, float *y, const kern_weight_t *w, const float *x, int n,
                        const int32_t *const *ids, const int32_t *n_ids);
} kern_ops_t;

struct kern_backend {
    const kern_ops_t *ops;
};

/* The argument checks every backend's weight_new makes: a type the backends compute with, a shape
 * that fits int32, whole quantization blocks a row, data given. Returns a stored row's bytes, or 0
 * with err set; `who` names the backend in the message. */
static inline size_t kern_weight_check(const char *who, int type, int64_t rows, int64_t cols, const void *data,
                                       fl_error_t *err)
{
    switch (type) {
    case FL_TYPE_F32: case FL_TYPE_F16: case FL_TYPE_BF16:
    case FL_TYPE_Q4_0: case FL_TYPE_Q4_1: case FL_TYPE_Q8_0: break;
    default:
        fl_fail(err, FL_EUNSUPPORTED, "%s backend: weight type %s (%d) is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)",
                who, fl_dtype_name(type), type);
        return 0;
    }
    if (rows <= 0 || cols <= 0 || rows > INT32_MAX || cols > INT32_MAX) {
        fl_fail(err, FL_EINVAL, "%s backend: bad weight shape %lld x %lld", who, (long long)rows, (long long)cols);
        return 0;
    }
    const size_t row_bytes = fl_dtype_row_bytes(type, cols);
    if (row_bytes == 0) {
        fl_fail(err, FL_EINVAL, "%s backend: %s weight has %lld columns, not a multiple of the block size %d", who,
                fl_dtype_name(type), (long long)cols, FL_QK);
        return 0;
    }
    if (!data) {
        fl_fail(err, FL_EINVAL, "%s backend: weight data is NULL", who);
        return 0;
    }
    return row_bytes;
}

#ifdef __cplusplus
}
#endif

#endif
