/* comm.h - what the ranks of a worker group (and groups between them) exchange: an all-reduce sum
 * of activations, a broadcast of each step's plan, point-to-point sends of KV blocks, barriers.
 *
 * One interface, two transports:
 *   COMM_HOST  shared memory between processes of one host (comm_host.c): the CPU path and the
 *              tests. Buffers are host memory.
 *   COMM_NCCL  NCCL, one communicator per group, in the CUDA module only (a CPU process never maps
 *              NCCL; comm_nccl.c reaches it through kernels/kern_nccl.h). The all-reduce takes
 *              device memory, on the CUDA backend's compute stream (comm_wait waits for it);
 *              broadcast, send and receive take host memory, staged through the device.
 *
 * Set-up: rank 0 makes an id (comm_id_new) and hands it to the other ranks through the coordinator
 * (WorkerHello / the group's registration: no side channel); every rank then calls comm_init with
 * it. Every rank must issue the same collectives in the same order.
 *
 * Failure: nothing waits forever. A wait longer than the communicator's timeout, a peer process
 * that is gone, a peer that aborted, or sizes that disagree end the call with FL_EPEER and a message
 * naming the peer and the operation; the communicator is then aborted (every later call fails at
 * once, and the peers' waits end too), and the group is expected to fail over.
 *
 * Results are deterministic: an all-reduce adds the ranks' buffers in rank order on every rank, so
 * every rank holds the same bits. */
#ifndef FOLIO_COMM_H
#define FOLIO_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define COMM_MAX_RANKS 8
#define COMM_ID_BYTES  128 /* NCCL's ncclUniqueId is 128 bytes; the host id is a name */

typedef enum { COMM_HOST = 1, COMM_NCCL = 2 } comm_kind_t;

typedef struct comm_id {
    uint8_t kind; /* comm_kind_t */
    uint8_t bytes[COMM_ID_BYTES];
} comm_id_t;

typedef struct comm_opts {
    int timeout_ms;    /* the longest one wait lasts (0: 10,000) */
    int join_timeout_ms; /* the longest comm_init waits for every rank (0: timeout_ms): ranks load
                            their shards first, which may take long */
    const volatile int *cancel; /* non-NULL: while comm_init waits, a non-zero value ends the wait
                                   (FL_EPEER): another thread of the caller gave up on the group */
    kern_backend_t *backend;    /* COMM_NCCL: the CUDA backend whose device and compute stream carry
                                   the collectives (comm_nccl.c) */
    size_t slot_bytes; /* COMM_HOST: bytes a rank stages per round (0: 1 MiB); larger ops go in chunks */
} comm_opts_t;

typedef struct comm comm_t;

/* A new id for a communicator of kind (rank 0 calls this). */
int comm_id_new(comm_kind_t kind, comm_id_t *id, fl_error_t *err);

/* Joins the communicator of id as rank of n_ranks; returns once every rank has joined, or NULL with
 * err set (a peer that never came within the timeout, a bad id). */
comm_t *comm_init(const comm_id_t *id, int rank, int n_ranks, const comm_opts_t *opts, fl_error_t *err);
void comm_destroy(comm_t **c);

int comm_rank(const comm_t *c);
int comm_size(const comm_t *c);

/* buf[0..n) = the sum over ranks of each rank's buf, added in rank order. */
int comm_allreduce_sum_f32(comm_t *c, float *buf, size_t n, fl_error_t *err);
/* buf[0..bytes) = root's buf on every rank; every rank passes the same bytes. */
int comm_broadcast(comm_t *c, void *buf, size_t bytes, int root, fl_error_t *err);
/* Point to point: peer's matching call receives exactly these bytes (sizes must agree). */
int comm_send(comm_t *c, const void *buf, size_t bytes, int peer, fl_error_t *err);
int comm_recv(comm_t *c, void *buf, size_t bytes, int peer, fl_error_t *err);
int comm_barrier(comm_t *c, fl_error_t *err);
/* Waits until the collectives issued so far are done (NCCL: enqueued on the compute stream, waited
 * for here within the timeout; the host transport's are done when they return). */
int comm_wait(comm_t *c, fl_error_t *err);
/* Ends every wait of this communicator's ranks with an error (a rank that is giving up). */
void comm_abort(comm_t *c);

/* The host transport (comm_host.c), behind the functions above. */
typedef struct comm_ops {
    void (*destroy)(comm_t *c);
    int (*allreduce_sum_f32)(comm_t *c, float *buf, size_t n, fl_error_t *err);
    int (*broadcast)(comm_t *c, void *buf, size_t bytes, int root, fl_error_t *err);
    int (*send)(comm_t *c, const void *buf, size_t bytes, int peer, fl_error_t *err);
    int (*recv)(comm_t *c, void *buf, size_t bytes, int peer, fl_error_t *err);
    int (*barrier)(comm_t *c, fl_error_t *err);
    void (*abort)(comm_t *c);
    int (*wait)(comm_t *c, fl_error_t *err); /* NULL: nothing is ever pending */
} comm_ops_t;

struct comm {
    const comm_ops_t *ops;
    int rank, n_ranks;
    bool failed; /* a call failed: later calls fail at once */
};

int comm_host_id_new(comm_id_t *id, fl_error_t *err);
comm_t *comm_host_init(const comm_id_t *id, int rank, int n_ranks, const comm_opts_t *opts, fl_error_t *err);
/* The NCCL transport (comm_nccl.c): reaches NCCL through the CUDA module (kernels/kern_nccl.h). */
int comm_nccl_id_new(comm_id_t *id, fl_error_t *err);
comm_t *comm_nccl_init(const comm_id_t *id, int rank, int n_ranks, const comm_opts_t *opts, fl_error_t *err);

#ifdef __cplusplus
}
#endif

#endif
