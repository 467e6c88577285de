/* comm_nccl.cu - NCCL communicators on the CUDA backend's device; see kern_nccl.h.
 *
 * Non-blocking mode (ncclConfig_t.blocking = 0): a call may return ncclInProgress, and
 * ncclCommGetAsyncError says when it has finished or failed. Every wait here polls that (and
 * cudaStreamQuery for work on the stream) until a deadline, then aborts the communicator: a rank whose
 * peer died gets an error instead of a hang. Unverified on a GPU in this tree (no GPU was lent):
 * tests/unit/test_cuda_nccl.c is the check to run where one is. */
#include <nccl.h>
#include <stdlib.h>
#include <time.h>

#include "../kern_nccl.h"
#include "cuda_internal.h"

struct kern_nccl {
    ncclComm_t comm;
    cudaStream_t stream;
    int device, rank, n_ranks, timeout_ms;
    void *stage; /* device staging of host buffers */
    size_t stage_bytes;
    bool aborted;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void do_abort(kern_nccl_t *c)
{
    if (c->aborted) return;
    c->aborted = true;
    ncclCommAbort(c->comm);
}

/* Waits for NCCL's pending call (r: what it returned) and, with stream set, for the stream's work. */
static int settle(kern_nccl_t *c, ncclResult_t r, bool stream, const char *what, fl_error_t *err)
{
    if (c->aborted) return fl_fail(err, FL_EPEER, "nccl %s: the communicator was aborted", what);
    const double deadline = now_s() + c->timeout_ms * 1e-3;
    for (;;) {
        if (r != ncclSuccess && r != ncclInProgress) {
            do_abort(c);
            return fl_fail(err, FL_EPEER, "nccl %s (rank %d of %d): %s", what, c->rank, c->n_ranks, ncclGetErrorString(r));
        }
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(c->comm, &async);
        if (async != ncclSuccess && async != ncclInProgress) {
            do_abort(c);
            return fl_fail(err, FL_EPEER, "nccl %s (rank %d of %d): %s", what, c->rank, c->n_ranks,
                           ncclGetErrorString(async));
        }
        bool done = async == ncclSuccess;
        if (done && stream) {
            const cudaError_t q = cudaStreamQuery(c->stream);
            if (q != cudaSuccess && q != cudaErrorNotReady) {
                do_abort(c);
                return fl_fail(err, FL_EBACKEND, "nccl %s: %s", what, cudaGetErrorString(q));
            }
            done = q == cudaSuccess;
        }
        if (done) return FL_OK;
        if (now_s() > deadline) {
            do_abort(c);
            return fl_fail(err, FL_EPEER, "nccl %s (rank %d of %d): no progress within %d ms", what, c->rank,
                           c->n_ranks, c->timeout_ms);
        }
        r = ncclSuccess;
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

static int stage(kern_nccl_t *c, size_t bytes, fl_error_t *err)
{
    if (bytes <= c->stage_bytes) return FL_OK;
    if (c->stage) cudaFree(c->stage);
    c->stage = NULL;
    c->stage_bytes = 0;
    CUDA_CHECK(cudaMalloc(&c->stage, bytes), err);
    c->stage_bytes = bytes;
    return FL_OK;
}

extern "C" int kern_cuda_module_nccl_id(uint8_t *id, fl_error_t *err)
{
    ncclUniqueId u;
    const ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess) return fl_fail(err, FL_EBACKEND, "ncclGetUniqueId: %s", ncclGetErrorString(r));
    memcpy(id, &u, sizeof u);
    return FL_OK;
}

extern "C" kern_nccl_t *kern_cuda_module_nccl_init(kern_backend_t *be, const uint8_t *id, int rank, int n_ranks,
                                                   int timeout_ms, fl_error_t *err)
{
    cuda_backend_t *cb = (cuda_backend_t *)be;
    kern_nccl_t *c = (kern_nccl_t *)calloc(1, sizeof *c);
    if (!c) {
        fl_fail(err, FL_ENOMEM, "nccl: out of memory");
        return NULL;
    }
    c->stream = cb->stream;
    c->device = cb->device;
    c->rank = rank;
    c->n_ranks = n_ranks;
    c->timeout_ms = timeout_ms;
    if (cudaSetDevice(cb->device) != cudaSuccess) {
        fl_fail(err, FL_EBACKEND, "nccl: cudaSetDevice(%d) failed", cb->device);
        free(c);
        return NULL;
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    const ncclResult_t r = ncclCommInitRankConfig(&c->comm, n_ranks, u, rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        fl_fail(err, FL_EPEER, "ncclCommInitRankConfig (rank %d of %d): %s", rank, n_ranks, ncclGetErrorString(r));
        free(c);
        return NULL;
    }
    if (settle(c, r, false, "init", err)) {
        free(c);
        return NULL;
    }
    return c;
}

extern "C" int kern_cuda_module_nccl_allreduce(kern_nccl_t *c, float *buf, size_t n, fl_error_t *err)
{
    /* Enqueued on the compute stream: ordered after the product it sums, recorded into a graph with
     * it. Only the enqueue is waited for here; kern_nccl_wait waits for the result. */
    return settle(c, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, c->comm, c->stream), false, "all-reduce", err);
}

extern "C" int kern_cuda_module_nccl_broadcast(kern_nccl_t *c, void *buf, size_t bytes, int root, fl_error_t *err)
{
    if (stage(c, bytes, err)) return FL_EBACKEND;
    if (c->rank == root) CUDA_CHECK(cudaMemcpyAsync(c->stage, buf, bytes, cudaMemcpyHostToDevice, c->stream), err);
    int rc = settle(c, ncclBroadcast(c->stage, c->stage, bytes, ncclUint8, root, c->comm, c->stream), false,
                    "broadcast", err);
    if (rc) return rc;
    if (c->rank != root) CUDA_CHECK(cudaMemcpyAsync(buf, c->stage, bytes, cudaMemcpyDeviceToHost, c->stream), err);
    return settle(c, ncclSuccess, true, "broadcast", err);
}

extern "C" int kern_cuda_module_nccl_send(kern_nccl_t *c, const void *buf, size_t bytes, int peer, fl_error_t *err)
{
    if (stage(c, bytes, err)) return FL_EBACKEND;
    CUDA_CHECK(cudaMemcpyAsync(c->stage, buf, bytes, cudaMemcpyHostToDevice, c->stream), err);
    int rc = settle(c, ncclSend(c->stage, bytes, ncclUint8, peer, c->comm, c->stream), false, "send", err);
    return rc ? rc : settle(c, ncclSuccess, true, "send", err);
}

extern "C" int kern_cuda_module_nccl_recv(kern_nccl_t *c, void *buf, size_t bytes, int peer, fl_error_t *err)
{
    if (stage(c, bytes, err)) return FL_EBACKEND;
    int rc = settle(c, ncclRecv(c->stage, bytes, ncclUint8, peer, c->comm, c->stream), false, "receive", err);
    if (rc) return rc;
    CUDA_CHECK(cudaMemcpyAsync(buf, c->stage, bytes, cudaMemcpyDeviceToHost, c->stream), err);
    return settle(c, ncclSuccess, true, "receive", err);
}

extern "C" int kern_cuda_module_nccl_wait(kern_nccl_t *c, fl_error_t *err)
{
    return settle(c, ncclSuccess, true, "step", err);
}

extern "C" void kern_cuda_module_nccl_abort(kern_nccl_t *c) { do_abort(c); }

extern "C" void kern_cuda_module_nccl_destroy(kern_nccl_t *c)
{
    if (!c) return;
    if (!c->aborted) {
        fl_error_t err = {0};
        if (settle(c, ncclCommFinalize(c->comm), false, "finalize", &err) == FL_OK) ncclCommDestroy(c->comm);
    }
    if (c->stage) cudaFree(c->stage);
    free(c);
}
