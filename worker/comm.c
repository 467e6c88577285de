/* comm.c - see comm.h: the transport-independent half (ids, argument checks, the failed state). */
#include "comm.h"

#include <stdlib.h>

int comm_id_new(comm_kind_t kind, comm_id_t *id, fl_error_t *err)
{
    switch (kind) {
    case COMM_HOST: return comm_host_id_new(id, err);
    case COMM_NCCL: return comm_nccl_id_new(id, err);
    }
    return fl_fail(err, FL_EINVAL, "comm: unknown transport %d", (int)kind);
}

comm_t *comm_init(const comm_id_t *id, int rank, int n_ranks, const comm_opts_t *opts, fl_error_t *err)
{
    if (n_ranks < 1 || n_ranks > COMM_MAX_RANKS || rank < 0 || rank >= n_ranks) {
        fl_fail(err, FL_EINVAL, "comm: rank %d of %d (1 to %d ranks)", rank, n_ranks, COMM_MAX_RANKS);
        return NULL;
    }
    comm_opts_t o = opts ? *opts : (comm_opts_t){0};
    if (o.timeout_ms <= 0) o.timeout_ms = 10000;
    if (o.join_timeout_ms <= 0) o.join_timeout_ms = o.timeout_ms;
    if (!o.slot_bytes) o.slot_bytes = 1u << 20;
    if (id->kind == COMM_HOST) return comm_host_init(id, rank, n_ranks, &o, err);
    if (id->kind == COMM_NCCL) return comm_nccl_init(id, rank, n_ranks, &o, err);
    fl_fail(err, FL_EINVAL, "comm: unknown transport in id");
    return NULL;
}

void comm_destroy(comm_t **c)
{
    if (!c || !*c) return;
    (*c)->ops->destroy(*c);
    *c = NULL;
}

int comm_rank(const comm_t *c) { return c->rank; }
int comm_size(const comm_t *c) { return c->n_ranks; }

/* A failed communicator refuses at once: its peers may be waiting in a round it will never join. */
static int check(comm_t *c, const char *op, int peer, fl_error_t *err)
{
    if (c->failed) return fl_fail(err, FL_EPEER, "comm %s: the communicator failed earlier", op);
    if (peer != -1 && (peer < 0 || peer >= c->n_ranks || peer == c->rank))
        return fl_fail(err, FL_EINVAL, "comm %s: peer %d (rank %d of %d)", op, peer, c->rank, c->n_ranks);
    return FL_OK;
}

/* Any failure aborts: a collective that one rank left cannot be finished by the others. */
static int done(comm_t *c, int rc)
{
    if (rc && !c->failed) {
        c->failed = true;
        c->ops->abort(c);
    }
    return rc;
}

int comm_allreduce_sum_f32(comm_t *c, float *buf, size_t n, fl_error_t *err)
{
    const int rc = check(c, "all-reduce", -1, err);
    return rc ? rc : done(c, c->ops->allreduce_sum_f32(c, buf, n, err));
}

int comm_broadcast(comm_t *c, void *buf, size_t bytes, int root, fl_error_t *err)
{
    if (root < 0 || root >= c->n_ranks) return fl_fail(err, FL_EINVAL, "comm broadcast: root %d", root);
    const int rc = check(c, "broadcast", -1, err);
    return rc ? rc : done(c, c->ops->broadcast(c, buf, bytes, root, err));
}

int comm_send(comm_t *c, const void *buf, size_t bytes, int peer, fl_error_t *err)
{
    const int rc = check(c, "send", peer, err);
    return rc ? rc : done(c, c->ops->send(c, buf, bytes, peer, err));
}

int comm_recv(comm_t *c, void *buf, size_t bytes, int peer, fl_error_t *err)
{
    const int rc = check(c, "receive", peer, err);
    return rc ? rc : done(c, c->ops->recv(c, buf, bytes, peer, err));
}

int comm_barrier(comm_t *c, fl_error_t *err)
{
    const int rc = check(c, "barrier", -1, err);
    return rc ? rc : done(c, c->ops->barrier(c, err));
}

int comm_wait(comm_t *c, fl_error_t *err)
{
    const int rc = check(c, "wait", -1, err);
    return rc || !c->ops->wait ? rc : done(c, c->ops->wait(c, err));
}

void comm_abort(comm_t *c)
{
    if (!c || c->failed) return;
    c->failed = true;
    c->ops->abort(c);
}
