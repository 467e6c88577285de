/* cuda_small_ops.cu - the CUDA backend's small ops: embed, rmsnorm, rope, kv_store, swiglu, add, the
 * fused add_rmsnorm and rope_kv_store, and the ops of the families beyond Llama (add_bias, scale,
 * softcap, geglu).
 *
 * Each is one kernel following the CPU code's formulas (kernels/cpu/cpu_backend.c); the fused ones
 * are one kernel each too, so that with matmul_swiglu (cuda_matmul.cu) a decode step is 8 launches a
 * layer: at batch 1 every launch and every pass over the activations costs against one pass over the
 * weights. */
#include <math.h>

#include "cuda_internal.h"

#define ROPE_MAX_PAIRS 512

__global__ void k_embed(float *out, const __half *table, const int32_t *ids, int64_t rows, int64_t cols)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x;
    const int32_t id = ids[i];
    float *o = out + (size_t)i * cols;
    if (id < 0 || id >= rows) {
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = 0.0f;
        return;
    }
    const __half *t = table + (size_t)id * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = __half2float(t[c]);
}

/* One block per row, sized so that a thread holds a float4 or two (a decode step's norm is one row:
 * a loop of dependent loads on few threads would cost more than the row's bytes). The sum of x*x
 * (f32 products) is taken in double, as the CPU. ADD: x += delta first, written back (add_rmsnorm);
 * delta may be y. */
template <bool ADD>
__global__ void k_rmsnorm(float *y, float *x, const float *delta, const float *w, int dim, float eps, bool vec)
{
    pdl_trigger();
    pdl_wait();
    __shared__ double warp_sum[32];
    __shared__ float scale_s;
    float *xr = x + (size_t)blockIdx.x * dim;
    const float *dr = ADD ? delta + (size_t)blockIdx.x * dim : NULL;
    float *yr = y + (size_t)blockIdx.x * dim;
    double s = 0.0;
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = ((const float4 *)xr)[i];
            if (ADD) {
                const float4 d = ((const float4 *)dr)[i];
                v.x += d.x, v.y += d.y, v.z += d.z, v.w += d.w;
                ((float4 *)xr)[i] = v;
            }
            const float p0 = v.x * v.x, p1 = v.y * v.y, p2 = v.z * v.z, p3 = v.w * v.w;
            s += ((double)p0 + (double)p1) + ((double)p2 + (double)p3);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            float v = xr[i];
            if (ADD) xr[i] = v = v + dr[i];
            const float p = v * v;
            s += (double)p;
        }
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = s;
    __syncthreads(); /* also orders every read of delta before any write of y */
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int k = 0; k < (int)(blockDim.x >> 5); k++) t += warp_sum[k];
        const float mean = (float)(t / dim);
        scale_s = 1.0f / sqrtf(mean + eps);
    }
    __syncthreads();
    const float scale = scale_s;
    if (vec) {
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            const float4 v = ((const float4 *)xr)[i], g = ((const float4 *)w)[i];
            ((float4 *)yr)[i] = make_float4((v.x * scale) * g.x, (v.y * scale) * g.y, (v.z * scale) * g.z,
                                            (v.w * scale) * g.w);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = (xr[i] * scale) * w[i];
    }
}

/* Whether a norm's rows can be read as float4: dim a multiple of 4, every pointer 16-byte aligned. */
static bool norm_vec(int dim, const void *a, const void *b, const void *c, const void *d)
{
    return (dim & 3) == 0 && (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d) & 15) == 0;
}

/* Threads for a norm of `dim`: one float4 (or float) each, whole warps, 32 to 1024. */
static unsigned norm_threads(int dim, bool vec)
{
    const int per = vec ? dim / 4 : dim;
    const int t = (per + 31) / 32 * 32;
    return (unsigned)(t < 32 ? 32 : t > 1024 ? 1024 : t);
}

/* RoPE angles of position pos into cs/sn (shared, np entries): thread 0 builds them with the CPU's
 * iterative theta *= theta_scale, then the threads take sin and cos. Ends with a barrier. */
__device__ void rope_angles(float *cs, float *sn, int32_t pos, int np, float theta_scale, float freq_scale,
                            const float *freq_factors, float mscale = 1.0f)
{
    if (threadIdx.x == 0) {
        float theta = (float)pos;
        for (int i = 0; i < np; i++) {
            const float ff = freq_factors ? freq_factors[i] : 1.0f;
            cs[i] = freq_scale * (theta / ff);
            theta *= theta_scale;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < np; i += blockDim.x) {
        const float th = cs[i];
        sn[i] = sinf(th) * mscale;
        cs[i] = cosf(th) * mscale;
    }
    __syncthreads();
}

/* One block per token; each pair of each head is rotated: adjacent pairs (NORM mode, stride 2,
 * other 1) or i and i + np (NEOX mode, stride 1, other np). */
__global__ void k_rope(float *x, const int32_t *pos, int n_heads, int head_dim, int np, float theta_scale,
                       float freq_scale, const float *freq_factors, int stride, int other, float mscale)
{
    pdl_trigger();
    pdl_wait();
    __shared__ float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    const int t = blockIdx.x;
    rope_angles(cs, sn, pos[t], np, theta_scale, freq_scale, freq_factors, mscale);
    for (int idx = threadIdx.x; idx < n_heads * np; idx += blockDim.x) {
        const int h = idx / np, i = idx % np;
        float *v = x + ((size_t)t * n_heads + h) * head_dim + (size_t)i * stride;
        const float x0 = v[0], x1 = v[other];
        v[0] = fmaf(x0, cs[i], -(x1 * sn[i]));
        v[other] = fmaf(x0, sn[i], x1 * cs[i]);
    }
}

__global__ void k_kv_store(__half *kc, __half *vc, const float *k, const float *v, const int32_t *slots, int kv_dim)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x;
    const int32_t slot = slots[i];
    if (slot < 0) return; /* padding row */
    __half *kd = kc + (size_t)slot * kv_dim, *vd = vc + (size_t)slot * kv_dim;
    const float *ks = k + (size_t)i * kv_dim, *vs = v + (size_t)i * kv_dim;
    for (int d = threadIdx.x; d < kv_dim; d += blockDim.x) {
        kd[d] = __float2half_rn(ks[d]);
        vd[d] = __float2half_rn(vs[d]);
    }
}

/* k_rope on q and k and k_kv_store in one launch: block (token, head) over the n_heads query heads
 * then the n_kv_heads key heads; a key head's block also stores that head of v. head_dim even. */
__global__ void k_rope_kv(float *q, float *k, const float *v, __half *kc, __half *vc, const int32_t *pos,
                          const int32_t *slots, int n_heads, int n_kv_heads, int hd, int np, float theta_scale,
                          float freq_scale, const float *freq_factors)
{
    pdl_trigger();
    pdl_wait();
    __shared__ float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    const int t = blockIdx.x, h = blockIdx.y;
    rope_angles(cs, sn, pos[t], np, theta_scale, freq_scale, freq_factors);
    const bool is_q = h < n_heads;
    const int kvh = h - n_heads;
    const size_t kv_dim = (size_t)n_kv_heads * hd;
    float *x = is_q ? q + ((size_t)t * n_heads + h) * hd : k + (size_t)t * kv_dim + (size_t)kvh * hd;
    const int32_t slot = is_q ? -1 : slots[t];
    __half *kd = slot >= 0 ? kc + (size_t)slot * kv_dim + (size_t)kvh * hd : NULL;
    for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) {
        float x0 = x[2 * i], x1 = x[2 * i + 1];
        if (i < np) {
            const float r0 = fmaf(x0, cs[i], -(x1 * sn[i])), r1 = fmaf(x0, sn[i], x1 * cs[i]);
            x[2 * i] = x0 = r0;
            x[2 * i + 1] = x1 = r1;
        }
        if (kd) *(__half2 *)(kd + 2 * i) = __halves2half2(__float2half_rn(x0), __float2half_rn(x1));
    }
    if (kd) {
        __half *vd = vc + (size_t)slot * kv_dim + (size_t)kvh * hd;
        const float *vs = v + (size_t)t * kv_dim + (size_t)kvh * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) vd[d] = __float2half_rn(vs[d]);
    }
}

__global__ void k_swiglu(float *out, const float *gate, const float *up, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void k_add(float *y, const float *x, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}


void cuda_embed(kern_backend_t *be, float *out, const kern_weight_t *table, const int32_t *ids, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_embed, n, EW_THREADS, out, (const __half *)table->d, ids, table->rows, table->cols);
}

void cuda_rmsnorm(kern_backend_t *be, float *y, const float *x, const float *weight, int n, int dim, float eps)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || dim <= 0 || !op_begin(cb)) return;
    const bool vec = norm_vec(dim, y, x, x, weight);
    launch(cb, k_rmsnorm<false>, n, norm_threads(dim, vec), y, (float *)x, (const float *)NULL, weight, dim, eps,
           vec);
}

void cuda_add_rmsnorm(kern_backend_t *be, float *y, float *x, const float *delta, const float *weight, int n,
                             int dim, float eps)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || dim <= 0 || !op_begin(cb)) return;
    const bool vec = norm_vec(dim, y, x, delta, weight);
    launch(cb, k_rmsnorm<true>, n, norm_threads(dim, vec), y, x, delta, weight, dim, eps, vec);
}

void cuda_rope(kern_backend_t *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                      const kern_rope_t *rope)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const int n_rot = rope->n_rot < head_dim ? rope->n_rot : head_dim, np = n_rot / 2;
    if (n <= 0 || np <= 0 || np > ROPE_MAX_PAIRS || !op_begin(cb)) return; /* as the CPU: nothing to rotate */
    const float theta_scale = powf(rope->freq_base, -2.0f / (float)n_rot);
    launch(cb, k_rope, n, EW_THREADS, x, pos, n_heads, head_dim, np, theta_scale, rope->freq_scale,
           rope->freq_factors, rope->neox ? 1 : 2, rope->neox ? np : 1, rope->mscale != 0.0f ? rope->mscale : 1.0f);
}

bool cuda_kv_types_ok(cuda_backend_t *cb, int k_type, int v_type)
{
    if (kern_kv_type_ok(kern_kv_type(k_type)) && kern_kv_type_ok(kern_kv_type(v_type))) return true;
    note_error(cb, FL_EUNSUPPORTED, "cuda backend: KV cache type %s/%s is not supported (f16, q8_0, q4_0)",
               fl_dtype_name(kern_kv_type(k_type)), fl_dtype_name(kern_kv_type(v_type)));
    return false;
}

/* K's and V's row bytes for rows of kv_dim elements; false, with the error noted, for a type the
 * backend does not take or a quantized row that is not whole 32-element blocks. */
static bool kv_rows_ok(cuda_backend_t *cb, int k_type, int v_type, int kv_dim, size_t *k_row, size_t *v_row)
{
    if (!cuda_kv_types_ok(cb, k_type, v_type)) return false;
    *k_row = kern_kv_row_bytes(kern_kv_type(k_type), kv_dim), *v_row = kern_kv_row_bytes(kern_kv_type(v_type), kv_dim);
    if (*k_row && *v_row) return true;
    note_error(cb, FL_EINVAL, "cuda backend: a %s/%s KV row of %d elements is not whole 32-element blocks",
               fl_dtype_name(kern_kv_type(k_type)), fl_dtype_name(kern_kv_type(v_type)), kv_dim);
    return false;
}

/* One 32-element block of a row, x this lane's element, quantized by the warp exactly as the CPU
 * backend quantizes it (cpu_attention_q.c): Q8_0 as ggml's AVX2 quantize_row_q8_0 (d = f16(amax /
 * 127), q = round-half-even(x * (127 / amax))), Q4_0 as quantize_row_q4_0 (m the element of largest
 * magnitude, the first on ties, else 0; d = m / -8; q = min(15, trunc(x * (1 / d) + 8.5)), element j
 * in the low nibble of byte j, element j + 16 in its high nibble). No operation is fused, as on the
 * CPU. Where x / d is not finite (d below about 1e-37, or a NaN), the quant is what x86's conversion
 * gives and the CPU's quantizers spell out: -128 for Q8_0 (AVX2's saturating packs), 0 for Q4_0; a
 * NaN never counts as Q4_0's largest magnitude (the CPU's comparison skips it). */
__device__ void kv_quantize_block(uint8_t *blk, int type, float x, int lane)
{
    if (type == FL_TYPE_Q8_0) {
        float amax = fabsf(x);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        const float y = __fmul_rn(x, id);
        blk[2 + lane] = (uint8_t)(int8_t)(isfinite(y) ? __float2int_rn(y) : -128);
        if (lane == 0) *(__half *)blk = __float2half_rn(amax / 127.f);
        return;
    }
    float a = isnan(x) ? -1.0f : fabsf(x);
    int at = lane;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ao = __shfl_xor_sync(0xffffffffu, a, off);
        const int io = __shfl_xor_sync(0xffffffffu, at, off);
        if (ao > a || (ao == a && io < at)) a = ao, at = io;
    }
    const float m = __shfl_sync(0xffffffffu, x, at);
    const float d = (a > 0.0f ? m : 0.0f) / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const float y = __fadd_rn(__fmul_rn(x, id), 8.5f);
    const int q = isfinite(y) ? min(15, (int)(int8_t)__float2int_rz(y)) : 0;
    const int hi = __shfl_down_sync(0xffffffffu, q, 16);
    if (lane < 16) blk[2 + lane] = (uint8_t)(q | hi << 4);
    if (lane == 0) *(__half *)blk = __float2half_rn(d);
}

/* Quantized pools (either of them): block (token, pool), a warp a 32-element block of the row. */
__global__ void k_kv_store_q(uint8_t *kc, uint8_t *vc, int k_type, int v_type, size_t k_row, size_t v_row,
                             const float *k, const float *v, const int32_t *slots, int kv_dim)
{
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x, pool = blockIdx.y;
    const int32_t slot = slots[i];
    if (slot < 0) return; /* padding row */
    const int type = pool ? v_type : k_type, lane = threadIdx.x & 31;
    const float *src = (pool ? v : k) + (size_t)i * kv_dim;
    uint8_t *row = (pool ? vc : kc) + (size_t)slot * (pool ? v_row : k_row);
    if (type == FL_TYPE_F16) {
        for (int d = threadIdx.x; d < kv_dim; d += blockDim.x) ((__half *)row)[d] = __float2half_rn(src[d]);
        return;
    }
    const int bytes = type == FL_TYPE_Q8_0 ? 34 : 18;
    for (int b = threadIdx.x >> 5; b < kv_dim / 32; b += blockDim.x >> 5)
        kv_quantize_block(row + (size_t)b * bytes, type, src[32 * b + lane], lane);
}

void cuda_kv_store(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const float *k,
                   const float *v, const int32_t *slots, int n, int kv_dim)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    size_t k_row, v_row;
    if (n <= 0 || kv_dim <= 0 || !op_begin(cb) || !kv_rows_ok(cb, k_type, v_type, kv_dim, &k_row, &v_row)) return;
    k_type = kern_kv_type(k_type), v_type = kern_kv_type(v_type);
    if (k_type == FL_TYPE_F16 && v_type == FL_TYPE_F16) {
        launch(cb, k_kv_store, n, EW_THREADS, (__half *)k_cache, (__half *)v_cache, k, v, slots, kv_dim);
        return;
    }
    launch(cb, k_kv_store_q, dim3((unsigned)n, 2u), 256, (uint8_t *)k_cache, (uint8_t *)v_cache, k_type, v_type,
           k_row, v_row, k, v, slots, kv_dim);
}

/* Up to KV_MOVE_BATCH (src, dst) slot pairs by value: one block walks them in order (a pair's
 * destination may be a later pair's source). Rows move as 2-byte units (every KV row type's size is
 * even), K's and V's of their own sizes. */
#define KV_MOVE_BATCH 32
struct kv_move_pairs {
    int32_t src[KV_MOVE_BATCH], dst[KV_MOVE_BATCH];
};

__global__ void k_kv_move(uint16_t *kc, uint16_t *vc, kv_move_pairs p, int n, int k_units, int v_units)
{
    pdl_trigger();
    pdl_wait();
    for (int i = 0; i < n; i++) {
        uint16_t *kd = kc + (size_t)p.dst[i] * k_units, *vd = vc + (size_t)p.dst[i] * v_units;
        const uint16_t *ks = kc + (size_t)p.src[i] * k_units, *vs = vc + (size_t)p.src[i] * v_units;
        uint16_t kx[8], vx[8]; /* read all, sync, write: rows of one pair never overlap another's part */
        int c = 0;
        for (int d = threadIdx.x; d < k_units && c < 8; d += blockDim.x, c++) kx[c] = ks[d];
        c = 0;
        for (int d = threadIdx.x; d < v_units && c < 8; d += blockDim.x, c++) vx[c] = vs[d];
        __syncthreads();
        c = 0;
        for (int d = threadIdx.x; d < k_units && c < 8; d += blockDim.x, c++) kd[d] = kx[c];
        c = 0;
        for (int d = threadIdx.x; d < v_units && c < 8; d += blockDim.x, c++) vd[d] = vx[c];
        __syncthreads();
    }
}

void cuda_kv_move(kern_backend_t *be, void *k_cache, void *v_cache, int k_type, int v_type, const int32_t *src_slots,
                  const int32_t *dst_slots, int n, int kv_dim)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    size_t k_row, v_row;
    if (n <= 0 || kv_dim <= 0 || kv_dim > 8 * 1024 || !op_begin(cb) ||
        !kv_rows_ok(cb, k_type, v_type, kv_dim, &k_row, &v_row))
        return;
    const int k_units = (int)(k_row / 2), v_units = (int)(v_row / 2), most = k_units > v_units ? k_units : v_units;
    const int threads = (most + 7) / 8 < 1024 ? ((most + 7) / 8 + 31) / 32 * 32 : 1024;
    for (int i0 = 0; i0 < n; i0 += KV_MOVE_BATCH) {
        kv_move_pairs p;
        const int m = n - i0 < KV_MOVE_BATCH ? n - i0 : KV_MOVE_BATCH;
        for (int i = 0; i < m; i++) p.src[i] = src_slots[i0 + i], p.dst[i] = dst_slots[i0 + i];
        launch(cb, k_kv_move, 1, threads, (uint16_t *)k_cache, (uint16_t *)v_cache, p, m, k_units, v_units);
    }
}

void cuda_rope_kv_store(kern_backend_t *be, float *q, float *k, const float *v, void *k_cache, void *v_cache,
                        int k_type, int v_type, const int32_t *pos, const int32_t *slots, int n, int n_heads,
                               int n_kv_heads, int head_dim, const kern_rope_t *rope)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const int n_rot = rope->n_rot < head_dim ? rope->n_rot : head_dim, np = n_rot > 0 ? n_rot / 2 : 0;
    /* the ops one by one (NeoX and mscale RoPE too: the fused kernel rotates adjacent pairs) */
    if (head_dim % 2 || np > ROPE_MAX_PAIRS || n_heads + n_kv_heads > 65535 || rope->neox ||
        (rope->mscale != 0.0f && rope->mscale != 1.0f) || kern_kv_type(k_type) != FL_TYPE_F16 ||
        kern_kv_type(v_type) != FL_TYPE_F16) { /* quantized pools: a warp quantizes a block (k_kv_store_q) */
        cuda_rope(be, q, pos, n, n_heads, head_dim, rope);
        cuda_rope(be, k, pos, n, n_kv_heads, head_dim, rope);
        cuda_kv_store(be, k_cache, v_cache, k_type, v_type, k, v, slots, n, n_kv_heads * head_dim);
        return;
    }
    if (n <= 0 || head_dim <= 0 || n_heads < 0 || n_kv_heads <= 0 || !op_begin(cb) ||
        !cuda_kv_types_ok(cb, k_type, v_type))
        return;
    const float theta_scale = np ? powf(rope->freq_base, -2.0f / (float)n_rot) : 1.0f;
    const int pairs = head_dim / 2;
    const unsigned threads = pairs >= 128 ? 128 : (unsigned)((pairs + 31) / 32 * 32);
    launch(cb, k_rope_kv, dim3((unsigned)n, (unsigned)(n_heads + n_kv_heads)), threads, q, k, v, (__half *)k_cache,
           (__half *)v_cache, pos, slots, n_heads, n_kv_heads, head_dim, np, theta_scale, rope->freq_scale,
           rope->freq_factors);
}

void cuda_swiglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_swiglu, grid_for((size_t)n, EW_THREADS), EW_THREADS, out, gate, up, (size_t)n);
}

void cuda_add(kern_backend_t *be, float *y, const float *x, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_add, grid_for((size_t)n, EW_THREADS), EW_THREADS, y, x, (size_t)n);
}

/* ---- the families beyond Llama (kernels.h): one thread an element, the CPU's arithmetic ---- */

__global__ void k_add_bias(float *y, const float *bias, size_t n, int dim)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % (size_t)dim];
}

__global__ void k_scale(float *x, float s, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

/* tanhf on the device is not glibc's: within a few ulps of the CPU's (the op test's bound). */
__global__ void k_softcap(float *x, float cap, size_t n)
{
    pdl_trigger();
    pdl_wait();
    const float inv = 1.0f / cap;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = tanhf(x[i] * inv) * cap;
}

/* ggml's GELU through the same f16 table as the CPU (kernels/gelu.h, uploaded at creation): equal
 * to the CPU bit for bit. */
__global__ void k_geglu(float *out, const float *gate, const float *up, const __half *table, size_t n)
{
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float x = gate[i];
        const float g = x <= -10.0f ? 0.0f : x >= 10.0f ? x : __half2float(table[__half_as_ushort(__float2half_rn(x))]);
        out[i] = x <= -10.0f ? 0.0f : g * up[i];
    }
}

void cuda_add_bias(kern_backend_t *be, float *y, const float *bias, int n, int dim)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const size_t total = (size_t)n * (size_t)dim;
    if (n <= 0 || dim <= 0 || !op_begin(cb)) return;
    launch(cb, k_add_bias, grid_for(total, EW_THREADS), EW_THREADS, y, bias, total, dim);
}

void cuda_scale(kern_backend_t *be, float *x, float s, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_scale, grid_for((size_t)n, EW_THREADS), EW_THREADS, x, s, (size_t)n);
}

void cuda_softcap(kern_backend_t *be, float *x, float cap, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_softcap, grid_for((size_t)n, EW_THREADS), EW_THREADS, x, cap, (size_t)n);
}

void cuda_geglu(kern_backend_t *be, float *out, const float *gate, const float *up, int n)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (n <= 0 || !op_begin(cb)) return;
    launch(cb, k_geglu, grid_for((size_t)n, EW_THREADS), EW_THREADS, out, gate, up, (const __half *)cb->gelu_table,
           (size_t)n);
}
