/* kern_nccl.h - NCCL communicators on the CUDA backend's device, in the CUDA module only
 * (kernels/cuda/comm_nccl.cu, linked against NCCL): a CPU process never maps NCCL. backend.c reaches
 * them through the module's dlsym, as it reaches the backend; without the module every call fails
 * FL_EUNSUPPORTED. worker/comm_nccl.c puts them behind worker/comm.h.
 *
 * The all-reduce is enqueued on the backend's compute stream (so a CUDA graph records it with the
 * step) and works on device memory; broadcast, send and receive move host memory, staged through a
 * device buffer and synchronous (the step plan: a few KiB). The communicator runs in NCCL's
 * non-blocking mode: every wait (init, an enqueue, kern_nccl_wait) polls with a deadline and aborts
 * the communicator (ncclCommAbort) when it passes or NCCL reports an asynchronous error, so a dead
 * peer never hangs a rank. */
#ifndef FOLIO_KERN_NCCL_H
#define FOLIO_KERN_NCCL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KERN_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */

typedef struct kern_nccl kern_nccl_t;

int kern_nccl_id(uint8_t id[KERN_NCCL_ID_BYTES], fl_error_t *err);
/* Rank `rank` of n_ranks on be's device and compute stream (be: a CUDA backend). */
kern_nccl_t *kern_nccl_init(kern_backend_t *be, const uint8_t id[KERN_NCCL_ID_BYTES], int rank, int n_ranks,
                            int timeout_ms, fl_error_t *err);
int kern_nccl_allreduce_sum_f32(kern_nccl_t *c, float *dev_buf, size_t n, fl_error_t *err);
int kern_nccl_broadcast(kern_nccl_t *c, void *host_buf, size_t bytes, int root, fl_error_t *err);
int kern_nccl_send(kern_nccl_t *c, const void *host_buf, size_t bytes, int peer, fl_error_t *err);
int kern_nccl_recv(kern_nccl_t *c, void *host_buf, size_t bytes, int peer, fl_error_t *err);
/* Waits until the stream's work (the step's all-reduces) is done, within the timeout. */
int kern_nccl_wait(kern_nccl_t *c, fl_error_t *err);
void kern_nccl_abort(kern_nccl_t *c);
void kern_nccl_destroy(kern_nccl_t *c);

#ifdef __cplusplus
}
#endif

#endif
