/* cuda_backend.cu - the CUDA implementation of kernels.h (libfolio_cuda.so, opened by kernels/backend.c):
 * memory, weights, CUDA graphs, the ops table and creation. The ops live by job in the other files
 * (cuda_internal.h lists them).
 *
 * How it works:
 *   - One struct cuda_backend per device: a non-blocking cudaStream_t every op is issued on, a
 *     cuBLASLt handle with a 32 MiB workspace, scratch buffers (fp16 activations for matmul, sampled
 *     ids) grown when needed, and a sticky first error. Ops return void, so each records the first
 *     CUDA/cuBLASLt failure (and skips its work once one is recorded); sync() waits for the stream
 *     and returns that error. The error stays recorded: after a failed op the stream's results are
 *     not trusted again (a failed kernel usually poisons the CUDA context anyway).
 *   - Memory: alloc = cudaMalloc + cudaMemsetAsync(0) on the stream, then a stream sync; upload /
 *     download = cudaMemcpyAsync on the stream + stream sync (ordered after earlier ops, and
 *     synchronous for the caller).
 *   - Weights (F32, F16, BF16, Q4_0, Q4_1, Q8_0, what the CPU backend accepts) are dequantized on the
 *     host (quant_rows_to_f16, up to 16 threads), a slab of rows at a time, into fp16 [rows][cols] and
 *     uploaded; quantized ones also keep their stored blocks for the single-token GEMV where
 *     FOLIO_CUDA_QGEMV=1 asks for it (cuda_matmul.cu).
 *   - A decode step at a repeating batch size is recorded once as a CUDA graph and replayed.
 *
 * Approximations versus the CPU backend: weights are fp16 (the CPU takes quantized dot products on
 * the stored blocks, or f32/BF16 values), activations are rounded to fp16 before a cuBLASLt matmul, softmax is
 * an online fp32 one without the CPU's f16 rounding of probabilities, device cosf/sinf/expf differ
 * from glibc by an ulp or two, and rmsnorm's double sum is taken in another order. Expect ~1e-3
 * relative differences; greedy decoding may diverge from the CPU after some tokens. F32 weights
 * beyond the fp16 range (65504) would become inf.
 *
 * Verified on an H200 by tests/unit/test_cuda_backend.c (every op against the CPU backend) and
 * test_cuda_model.c (greedy continuations against the CPU's F32 path); see tests/README.md. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_internal.h"
#include "../gelu.h"
#include "quant.h"

void note_error(cuda_backend_t *cb, int code, const char *fmt, ...)
{
    if (cb->first.code) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cb->first.msg, sizeof cb->first.msg, fmt, ap);
    va_end(ap);
    cb->first.code = code;
}

/* ------------------------------------------------------------------------------------------------
 * Memory */

static void *cuda_alloc(kern_backend_t *be, size_t bytes)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (cudaSetDevice(cb->device) != cudaSuccess) return NULL;
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        (void)cudaGetLastError(); /* an allocation failure is not sticky: the caller sees NULL */
        return NULL;
    }
    if (cudaMemsetAsync(p, 0, bytes ? bytes : 1, cb->stream) != cudaSuccess ||
        cudaStreamSynchronize(cb->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* or the next op's launch check would report it */
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cuda_free(kern_backend_t *be, void *p)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!p) return;
    cudaSetDevice(cb->device);
    cudaFree(p); /* waits for the device's outstanding work */
}

static int cuda_copy(cuda_backend_t *cb, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
    if (!bytes) return 0;
    if (cudaSetDevice(cb->device) != cudaSuccess || cudaMemcpyAsync(dst, src, bytes, kind, cb->stream) != cudaSuccess ||
        cudaStreamSynchronize(cb->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* reported here: not again by the next op's launch check */
        return FL_EBACKEND;
    }
    return 0;
}

static int cuda_upload(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return cuda_copy((cuda_backend_t *)be, dst, src, bytes, cudaMemcpyHostToDevice);
}

static int cuda_download(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return cuda_copy((cuda_backend_t *)be, dst, src, bytes, cudaMemcpyDeviceToHost);
}

static int cuda_sync(kern_backend_t *be, fl_error_t *err)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!cb->first.code) {
        OP_CUDA(cb, cudaSetDevice(cb->device));
        OP_CUDA(cb, cudaStreamSynchronize(cb->stream));
    }
    if (cb->first.code) {
        if (err) *err = cb->first;
        return cb->first.code;
    }
    return 0;
}

/* Grows a device scratch buffer to at least `bytes` (rarely: 1.5x the need). */
/* in_graphs: recorded steps use the buffer (they hold its address, so a move invalidates them). */
bool grow_device(cuda_backend_t *cb, void **p, size_t *cap, size_t bytes, const char *what, bool in_graphs)
{
    if (*cap >= bytes) return true;
    if (cb->capturing) { /* no allocation inside a recording: give it up, the step reruns directly */
        cb->capture_failed = true;
        return false;
    }
    if (in_graphs) cb->buf_gen++;
    const size_t want = bytes + bytes / 2;
    void *np = NULL;
    if (cudaMalloc(&np, want) != cudaSuccess) {
        (void)cudaGetLastError();
        note_error(cb, FL_ENOMEM, "CUDA out of memory allocating %zu MiB for %s", (want + ((1u << 20) - 1)) >> 20, what);
        return false;
    }
    if (*p) cudaFree(*p);
    *p = np;
    *cap = want;
    return true;
}

/* ------------------------------------------------------------------------------------------------
 * Weights: dequantized on the host to fp16 */


static void cuda_weight_destroy(kern_backend_t *be, kern_weight_t *w);

static int convert_threads(void)
{
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 16 ? 16 : (int)n;
}

static kern_weight_t *cuda_weight_new(kern_backend_t *be, int type, int64_t rows, int64_t cols, const void *data,
                                      fl_error_t *err)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    const size_t row_bytes = kern_weight_check("cuda", type, rows, cols, data, err);
    if (!row_bytes) return NULL;
    if (cudaSetDevice(cb->device) != cudaSuccess) {
        fl_fail(err, FL_EBACKEND, "cuda backend: cudaSetDevice(%d) failed", cb->device);
        return NULL;
    }
    kern_weight_t *w = (kern_weight_t *)calloc(1, sizeof *w);
    /* The host staging slab: whole rows, about 32M elements (64 MiB) at a time, converted on up to 16
     * threads (an 8B model's 8G elements take minutes on one). */
    int64_t slab_rows = ((int64_t)32 << 20) / cols;
    if (slab_rows < 1) slab_rows = 1;
    if (slab_rows > rows) slab_rows = rows;
    fl_f16_t *slab = (fl_f16_t *)malloc((size_t)slab_rows * (size_t)cols * sizeof(fl_f16_t));
    if (!w || !slab) {
        free(w);
        free(slab);
        fl_fail(err, FL_ENOMEM, "cuda backend: out of host memory converting a %lld x %lld weight", (long long)rows,
                (long long)cols);
        return NULL;
    }
    const size_t bytes = (size_t)rows * (size_t)cols * sizeof(__half);
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    if (cudaMalloc((void **)&w->d, bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        free(w);
        free(slab);
        fl_fail(err, FL_ENOMEM, "CUDA out of memory allocating %zu MiB for weight %lld x %lld",
                (bytes + ((1u << 20) - 1)) >> 20, (long long)rows, (long long)cols);
        return NULL;
    }
    const uint8_t *src = (const uint8_t *)data;
    for (int64_t r0 = 0; r0 < rows; r0 += slab_rows) {
        const int64_t nr = rows - r0 < slab_rows ? rows - r0 : slab_rows;
        if (quant_rows_to_f16(type, src + (size_t)r0 * row_bytes, row_bytes, slab, nr, cols, convert_threads())) {
            cudaFree(w->d);
            free(w);
            free(slab);
            fl_fail(err, FL_ENOMEM, "cuda backend: out of host memory converting a %lld x %lld weight",
                    (long long)rows, (long long)cols);
            return NULL;
        }
        /* On our stream and waited for: a plain cudaMemcpy from pageable memory may return before its
         * DMA lands, and the legacy stream it runs on is not ordered with our non-blocking stream. The
         * wait also frees the slab for the next rows. */
        cudaError_t e = cudaMemcpyAsync(w->d + (size_t)r0 * cols, slab, (size_t)nr * cols * sizeof(__half),
                                        cudaMemcpyHostToDevice, cb->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(cb->stream);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            cudaFree(w->d);
            free(w);
            free(slab);
            fl_fail(err, FL_EBACKEND, "cuda backend: uploading a %lld x %lld weight: %s", (long long)rows,
                    (long long)cols, cudaGetErrorString(e));
            return NULL;
        }
    }
    free(slab);
    w->row_bytes = row_bytes;
    /* Quantized weights also keep their stored blocks for single-token products (k_gemv1). */
    if (cb->qgemv && (type == FL_TYPE_Q4_0 || type == FL_TYPE_Q4_1 || type == FL_TYPE_Q8_0)) {
        const size_t qbytes = (size_t)rows * row_bytes;
        cudaError_t e = cudaMalloc((void **)&w->q, qbytes);
        if (e == cudaSuccess) e = cudaMemcpyAsync(w->q, data, qbytes, cudaMemcpyHostToDevice, cb->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(cb->stream);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            fl_fail(err, e == cudaErrorMemoryAllocation ? FL_ENOMEM : FL_EBACKEND,
                    "cuda backend: keeping the %s blocks of a %lld x %lld weight (%zu MiB): %s", fl_dtype_name(type),
                    (long long)rows, (long long)cols, qbytes >> 20, cudaGetErrorString(e));
            cuda_weight_destroy(be, w);
            return NULL;
        }
    }
    return w;
}

static void cuda_weight_destroy(kern_backend_t *be, kern_weight_t *w)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!w) return;
    cudaSetDevice(cb->device);
    cudaFree(w->d);
    if (w->q) cudaFree(w->q);
    free(w);
}

/* ------------------------------------------------------------------------------------------------
 * Creation */

static void cuda_destroy(kern_backend_t *be)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!cb) return;
    cudaSetDevice(cb->device);
    if (cb->stream) cudaStreamSynchronize(cb->stream);
    cuda_matmul_release(cb);
    for (int i = 0; i < GRAPH_SLOTS; i++)
        if (cb->graph[i].exec) cudaGraphExecDestroy(cb->graph[i].exec);
    if (cb->xh) cudaFree(cb->xh);
    if (cb->d_ids) cudaFree(cb->d_ids);
    if (cb->d_keys) cudaFree(cb->d_keys);
    if (cb->attn_part) cudaFree(cb->attn_part);
    if (cb->attn_arrived) cudaFree(cb->attn_arrived);
    if (cb->workspace) cudaFree(cb->workspace);
    if (cb->gelu_table) cudaFree(cb->gelu_table);
    if (cb->lt) cublasLtDestroy(cb->lt);
    if (cb->stream) cudaStreamDestroy(cb->stream);
    if (cb->d_rows) cudaFree(cb->d_rows);
    free(cb->h_rows);
    cuda_sample_adjust_free(&cb->adjust);
    cuda_sample_mask_free(&cb->mask);
    free(cb);
}

/* ------------------------------------------------------------------------------------------------
 * CUDA graphs: a decode step is several launches a layer, each a few microseconds of host time, which
 * is most of a step for a small model; replaying a recording is one launch. */

static void graph_drop(cuda_graph_t *g)
{
    if (g->exec) cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
}

static int cuda_graph_begin(kern_backend_t *be, uint64_t key)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (!cb->graphs || cb->first.code || cb->capturing || cb->replaying) return 0;
    cuda_graph_t *g = NULL, *lru = &cb->graph[0];
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        if (cb->graph[i].seen && cb->graph[i].key == key) g = &cb->graph[i];
        if (cb->graph[i].used < lru->used) lru = &cb->graph[i];
    }
    if (!g) { /* first sight: run directly */
        graph_drop(lru);
        lru->key = key;
        lru->seen = 1;
        lru->gen = cb->buf_gen;
        lru->used = ++cb->graph_clock;
        return 0;
    }
    g->used = ++cb->graph_clock;
    if (g->gen != cb->buf_gen) { /* a buffer it uses has moved: record again (a failure may not recur) */
        if (g->exec) cudaGraphExecDestroy(g->exec);
        g->exec = NULL;
        g->no_capture = false;
    }
    if (g->exec) {
        cb->replaying = g;
        return 1;
    }
    g->seen++;
    if (g->no_capture || cudaSetDevice(cb->device) != cudaSuccess ||
        cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    cb->capturing = g;
    cb->capture_failed = false;
    return 0;
}

static int cuda_graph_end(kern_backend_t *be)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (cb->replaying) {
        cuda_graph_t *g = cb->replaying;
        cb->replaying = NULL;
        OP_CUDA(cb, cudaGraphLaunch(g->exec, cb->stream));
        return 0;
    }
    cuda_graph_t *g = cb->capturing;
    if (!g) return 0;
    cb->capturing = NULL;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(cb->stream, &graph);
    cudaGraphExec_t exec = NULL;
    if (e == cudaSuccess && !cb->capture_failed && !cb->first.code) e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess || cb->capture_failed || cb->first.code || !exec) {
        (void)cudaGetLastError();
        if (exec) cudaGraphExecDestroy(exec);
        g->no_capture = !cb->first.code; /* this step cannot be recorded: run it directly, until buffers move */
        g->gen = cb->buf_gen;
        cb->capture_failed = false;
        return cb->first.code ? 0 : KERN_GRAPH_RETRY;
    }
    g->exec = exec;
    g->gen = cb->buf_gen;
    OP_CUDA(cb, cudaGraphLaunch(g->exec, cb->stream));
    return 0;
}

static int cuda_mem_info(kern_backend_t *be, size_t *free_bytes, size_t *total_bytes)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    if (cudaSetDevice(cb->device) != cudaSuccess || cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        return FL_EBACKEND;
    }
    return FL_OK;
}

static void cuda_graph_reset(kern_backend_t *be)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    for (int i = 0; i < GRAPH_SLOTS; i++) graph_drop(&cb->graph[i]);
}

static const kern_ops_t cuda_ops = {
    "cuda",
    true, /* device_memory */
    1.0f, /* attention_cost: the attention kernels stream K/V at about the GEMMs' rate per multiply-add */
    cuda_destroy,
    cuda_alloc,
    cuda_free,
    cuda_upload,
    cuda_download,
    cuda_sync,
    cuda_weight_new,
    cuda_weight_destroy,
    cuda_embed,
    cuda_matmul,
    cuda_matmul_multi,
    cuda_rmsnorm,
    cuda_rope,
    cuda_kv_store,
    cuda_attention,
    cuda_swiglu,
    cuda_add,
    cuda_sample,
    cuda_add_rmsnorm,
    cuda_rope_kv_store,
    cuda_matmul_swiglu,
    cuda_graph_begin,
    cuda_graph_end,
    cuda_graph_reset,
    cuda_mem_info,
    cuda_kv_move,
    cuda_add_bias,
    cuda_scale,
    cuda_softcap,
    cuda_geglu,
};

static int probe_device(int device, fl_error_t *err)
{
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count), err);
    if (device < 0 || device >= count)
        return fl_fail(err, FL_ENOTFOUND, "CUDA device %d not present (%d devices)", device, count);
    CUDA_CHECK(cudaSetDevice(device), err);
    return FL_OK;
}

static int cuda_setup(cuda_backend_t *cb, fl_error_t *err)
{
    CUDA_CHECK(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), err);
    CUBLAS_CHECK(cublasLtCreate(&cb->lt), err);
    int major = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cb->device), err);
    cb->pdl = cb->pdl && major >= 9; /* programmatic dependent launch is Hopper's */
    int sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cb->device), err);
    const int rc = cuda_attention_setup(cb, sms, err);
    if (rc) return rc;
    if (cudaMalloc(&cb->workspace, WORKSPACE_BYTES) != cudaSuccess) {
        (void)cudaGetLastError();
        cb->workspace = NULL;
        return fl_fail(err, FL_ENOMEM, "CUDA out of memory allocating %zu MiB for the cuBLASLt workspace",
                       WORKSPACE_BYTES >> 20);
    }
    /* GELU's table (kern_geglu), built on the host as the CPU builds it */
    fl_f16_t *table = (fl_f16_t *)malloc(KERN_GELU_TABLE_SIZE * sizeof(fl_f16_t));
    if (!table) return fl_fail(err, FL_ENOMEM, "cuda backend: out of memory");
    kern_gelu_table_fill(table);
    const size_t table_bytes = KERN_GELU_TABLE_SIZE * sizeof(fl_f16_t);
    cudaError_t ce = cudaMalloc(&cb->gelu_table, table_bytes);
    if (ce == cudaSuccess) ce = cudaMemcpy(cb->gelu_table, table, table_bytes, cudaMemcpyHostToDevice);
    free(table);
    CUDA_CHECK(ce, err);
    return FL_OK;
}

extern "C" bool kern_cuda_module_available(void)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return count >= 1;
}

extern "C" kern_backend_t *kern_cuda_module_new(int device, fl_error_t *err)
{
    if (probe_device(device, err)) return NULL;
    cuda_backend_t *cb = (cuda_backend_t *)calloc(1, sizeof *cb);
    if (!cb) {
        fl_fail(err, FL_ENOMEM, "cuda backend: out of memory");
        return NULL;
    }
    cb->base.ops = &cuda_ops;
    cb->device = device;
    const char *gemv = getenv("FOLIO_CUDA_GEMV"), *graphs = getenv("FOLIO_CUDA_GRAPHS");
    cb->gemv = !(gemv && !strcmp(gemv, "0"));
    const char *qgemv = getenv("FOLIO_CUDA_QGEMV");
    cb->qgemv = cb->gemv && qgemv && !strcmp(qgemv, "1");
    cb->graphs = !(graphs && !strcmp(graphs, "0"));
    const char *pdl = getenv("FOLIO_CUDA_PDL");
    cb->pdl = !(pdl && !strcmp(pdl, "0"));
    const char *tiled = getenv("FOLIO_CUDA_TILED_ATTN");
    cb->tiled_attn = !(tiled && !strcmp(tiled, "0"));
    const char *lanes = getenv("FOLIO_CUDA_LANE_ATTN");
    cb->lane_attn = lanes && !strcmp(lanes, "1") ? 1 : lanes && !strcmp(lanes, "0") ? 0 : -1;
    const char *early = getenv("FOLIO_CUDA_GEMV_EARLY");
    cb->gemv_early = early && !strcmp(early, "1");
    const char *split = getenv("FOLIO_CUDA_SPLIT_ATTN");
    cb->split_attn = !(split && !strcmp(split, "0"));
    if (cuda_setup(cb, err)) {
        cuda_destroy(&cb->base);
        return NULL;
    }
    return &cb->base;
}
