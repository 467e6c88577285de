/* comm_nccl.c - the NCCL transport of comm.h: a comm_t over the CUDA module's communicator
 * (kernels/kern_nccl.h), so that this file, like every CPU process, never maps NCCL itself.
 *
 * The id is the kind byte and NCCL's 128-byte ncclUniqueId. The all-reduce takes device memory and
 * is enqueued on the CUDA backend's compute stream (comm_opts_t.backend): the model's forward step
 * issues it between its kernels, a CUDA graph records it, and comm_wait (before the step's sync)
 * waits for it within the timeout. Broadcast, send and receive take host memory (the step plan),
 * staged through the device. Unverified on a GPU in this tree: see tests/unit/test_cuda_nccl.c. */
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "kern_nccl.h"

_Static_assert(KERN_NCCL_ID_BYTES <= COMM_ID_BYTES, "an ncclUniqueId fits a comm_id_t");

typedef struct {
    comm_t base;
    kern_nccl_t *nccl;
} nccl_comm_t;

static kern_nccl_t *N(comm_t *c) { return ((nccl_comm_t *)c)->nccl; }

static void nccl_destroy(comm_t *c)
{
    kern_nccl_destroy(N(c));
    free(c);
}

static int nccl_allreduce(comm_t *c, float *buf, size_t n, fl_error_t *err)
{
    return kern_nccl_allreduce_sum_f32(N(c), buf, n, err);
}

static int nccl_broadcast(comm_t *c, void *buf, size_t bytes, int root, fl_error_t *err)
{
    return kern_nccl_broadcast(N(c), buf, bytes, root, err);
}

static int nccl_send(comm_t *c, const void *buf, size_t bytes, int peer, fl_error_t *err)
{
    return kern_nccl_send(N(c), buf, bytes, peer, err);
}

static int nccl_recv(comm_t *c, void *buf, size_t bytes, int peer, fl_error_t *err)
{
    return kern_nccl_recv(N(c), buf, bytes, peer, err);
}

static int nccl_barrier(comm_t *c, fl_error_t *err)
{
    uint8_t b = 0;
    return kern_nccl_broadcast(N(c), &b, 1, 0, err);
}

static int nccl_wait(comm_t *c, fl_error_t *err) { return kern_nccl_wait(N(c), err); }

static void nccl_abort(comm_t *c) { kern_nccl_abort(N(c)); }

static const comm_ops_t nccl_ops = {
    .destroy = nccl_destroy,
    .allreduce_sum_f32 = nccl_allreduce,
    .broadcast = nccl_broadcast,
    .send = nccl_send,
    .recv = nccl_recv,
    .barrier = nccl_barrier,
    .abort = nccl_abort,
    .wait = nccl_wait,
};

int comm_nccl_id_new(comm_id_t *id, fl_error_t *err)
{
    memset(id, 0, sizeof *id);
    id->kind = COMM_NCCL;
    return kern_nccl_id(id->bytes, err);
}

comm_t *comm_nccl_init(const comm_id_t *id, int rank, int n_ranks, const comm_opts_t *opts, fl_error_t *err)
{
    if (!opts->backend) {
        fl_fail(err, FL_EINVAL, "comm: the NCCL transport needs the CUDA backend (comm_opts_t.backend)");
        return NULL;
    }
    nccl_comm_t *nc = calloc(1, sizeof *nc);
    if (!nc) {
        fl_fail(err, FL_ENOMEM, "out of memory");
        return NULL;
    }
    nc->base = (comm_t){.ops = &nccl_ops, .rank = rank, .n_ranks = n_ranks};
    /* NCCL's init has one deadline: the join's (ranks load their shards first). */
    nc->nccl = kern_nccl_init(opts->backend, id->bytes, rank, n_ranks, opts->join_timeout_ms, err);
    if (!nc->nccl) {
        free(nc);
        return NULL;
    }
    return &nc->base;
}
