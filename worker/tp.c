/* tp.c - tensor parallelism's cut and step plan; see tp.h.
 *
 * A plan is two broadcasts from rank 0: a fixed header (what, and the sizes), then the arrays the
 * header sized, packed into m->plan. A follower checks the sizes against its own limits before it
 * receives the arrays (the ranks load with the same parameters; a disagreement is an error, never
 * an overrun), then builds the same model_batch_t and calls model_forward, which on a follower runs
 * its shard without broadcasting. A KV read or write (pulls) is the header and the block ids, then
 * the blocks' bytes: each follower sends its slices to rank 0 (read), or rank 0 broadcasts the
 * whole blocks and each rank keeps its slice (write). */
#include "tp.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"

#define TP_MAGIC 0x74703031 /* "tp01" */

enum { TP_FORWARD = 1, TP_MOVE = 2, TP_STOP = 3, TP_KV_READ = 4, TP_KV_WRITE = 5 };
enum { TP_HAS_PROMPT_LEN = 1, TP_HAS_TREE = 2 };

typedef struct {
    int32_t magic, op, n, n_seqs, n_logits, flags, max_blocks, reserved;
} tp_header_t;

/* Floor of the r-th cut of total units into size shares. */
static int cut(int total, int r, int size) { return (int)((int64_t)total * r / size); }

int tp_shard_of(const model_config_t *c, int rank, int size, model_shard_t *s, fl_error_t *err)
{
    if (size < 1 || rank < 0 || rank >= size) return fl_fail(err, FL_EINVAL, "tensor parallel: rank %d of %d", rank, size);
    const int units = size > 1 ? c->n_ff / TP_FF_ALIGN : 1;
    if (size > c->n_kv_heads)
        return fl_fail(err, FL_EINVAL, "tensor parallel: %d ranks but the model has %d KV heads (at most one rank each)",
                       size, c->n_kv_heads);
    if (size > 1 && (c->n_ff % TP_FF_ALIGN || units < size))
        return fl_fail(err, FL_EINVAL,
                       "tensor parallel: feed-forward width %d does not split into %d ranks of whole %d-column blocks",
                       c->n_ff, size, TP_FF_ALIGN);
    const int group = c->n_heads / c->n_kv_heads;
    *s = (model_shard_t){.rank = rank, .size = size};
    s->kv_head0 = cut(c->n_kv_heads, rank, size);
    s->n_kv_heads = cut(c->n_kv_heads, rank + 1, size) - s->kv_head0;
    s->head0 = s->kv_head0 * group;
    s->n_heads = s->n_kv_heads * group;
    if (size == 1) {
        s->ff0 = 0;
        s->n_ff = c->n_ff;
    } else {
        s->ff0 = cut(units, rank, size) * TP_FF_ALIGN;
        s->n_ff = cut(units, rank + 1, size) * TP_FF_ALIGN - s->ff0;
    }
    return FL_OK;
}

size_t tp_plan_ints(const model_t *m)
{
    const size_t T = (size_t)m->max_batch_tokens, S = (size_t)m->max_seqs;
    /* tokens, positions, sequences, tree starts, tree masks (2 each), one for alignment */
    return 6 * T + 1 + S * (size_t)m->max_blocks + S + (size_t)m->max_logits;
}

static int send_header(model_t *m, tp_header_t *h, fl_error_t *err)
{
    h->magic = TP_MAGIC;
    h->max_blocks = m->max_blocks;
    return comm_broadcast(m->comm, h, sizeof *h, 0, err);
}

/* Packs b's arrays into m->plan; their count in ints. */
static size_t pack_forward(model_t *m, const model_batch_t *b, int flags)
{
    int32_t *p = m->plan;
    const size_t n = (size_t)b->n_tokens, nt = (size_t)b->n_seqs * m->max_blocks;
    size_t at = 0;
#define PUT(src, count)                                                                                              \
    do {                                                                                                             \
        memcpy(p + at, (src), (count) * sizeof(int32_t));                                                            \
        at += (count);                                                                                               \
    } while (0)
    PUT(b->tokens, n);
    PUT(b->pos, n);
    PUT(b->seq, n);
    PUT(b->block_tables, nt);
    if (flags & TP_HAS_PROMPT_LEN) PUT(b->prompt_len, (size_t)b->n_seqs);
    PUT(b->logit_rows, (size_t)b->n_logits);
    if (flags & TP_HAS_TREE) {
        PUT(b->tree_start, n);
        at += at & 1; /* the masks start 8-byte aligned */
        PUT(b->tree_mask, 2 * n);
    }
#undef PUT
    return at;
}

/* The batch a packed plan describes, pointing into m->plan; the ints it spans. */
static size_t unpack_forward(model_t *m, const tp_header_t *h, model_batch_t *b)
{
    int32_t *p = m->plan;
    const size_t n = (size_t)h->n;
    size_t at = 0;
    *b = (model_batch_t){.n_tokens = h->n, .n_seqs = h->n_seqs, .n_logits = h->n_logits};
    b->tokens = p + at, at += n;
    b->pos = p + at, at += n;
    b->seq = p + at, at += n;
    b->block_tables = p + at, at += (size_t)h->n_seqs * m->max_blocks;
    if (h->flags & TP_HAS_PROMPT_LEN) b->prompt_len = p + at, at += (size_t)h->n_seqs;
    b->logit_rows = p + at, at += (size_t)h->n_logits;
    if (h->flags & TP_HAS_TREE) {
        b->tree_start = p + at, at += n;
        at += at & 1;
        b->tree_mask = (const uint64_t *)(const void *)(p + at), at += 2 * n;
    }
    return at;
}

int tp_send_forward(model_t *m, const model_batch_t *b, fl_error_t *err)
{
    const int flags = (b->prompt_len ? TP_HAS_PROMPT_LEN : 0) | (b->tree_mask ? TP_HAS_TREE : 0);
    tp_header_t h = {.op = TP_FORWARD, .n = b->n_tokens, .n_seqs = b->n_seqs, .n_logits = b->n_logits, .flags = flags};
    const size_t ints = pack_forward(m, b, flags);
    int rc = send_header(m, &h, err);
    return rc ? rc : comm_broadcast(m->comm, m->plan, ints * sizeof(int32_t), 0, err);
}

int tp_send_move(model_t *m, const int32_t *src, const int32_t *dst, int n, fl_error_t *err)
{
    const int chunk = (int)(tp_plan_ints(m) / 2);
    for (int at = 0; at < n; at += chunk) {
        const int k = n - at < chunk ? n - at : chunk;
        tp_header_t h = {.op = TP_MOVE, .n = k};
        memcpy(m->plan, src + at, (size_t)k * sizeof(int32_t));
        memcpy(m->plan + k, dst + at, (size_t)k * sizeof(int32_t));
        int rc = send_header(m, &h, err);
        if (!rc) rc = comm_broadcast(m->comm, m->plan, 2 * (size_t)k * sizeof(int32_t), 0, err);
        if (rc) return rc;
    }
    return FL_OK;
}

int tp_stop(model_t *m, fl_error_t *err)
{
    if (!m->comm || m->shard.rank != 0) return FL_OK;
    tp_header_t h = {.op = TP_STOP};
    return send_header(m, &h, err);
}

/* The payload's size in *ints; FL_EPEER when the header is outside this rank's limits. */
static int check_header(const model_t *m, const tp_header_t *h, size_t *ints, fl_error_t *err)
{
    if (h->magic != TP_MAGIC || h->max_blocks != m->max_blocks)
        return fl_fail(err, FL_EPEER,
                       "tensor parallel: rank 0's plan has max_blocks %d, this rank %d (started with other flags?)",
                       h->max_blocks, m->max_blocks);
    const size_t cap = tp_plan_ints(m), n = h->n > 0 ? (size_t)h->n : 0;
    if (h->op == TP_MOVE) {
        *ints = 2 * n;
        if (h->n >= 0 && *ints <= cap) return FL_OK;
    } else if (h->op == TP_KV_READ || h->op == TP_KV_WRITE) {
        *ints = n;
        if (h->n > 0 && *ints <= cap) return FL_OK;
    } else if (h->n > 0 && h->n <= m->max_batch_tokens && h->n_seqs > 0 && h->n_seqs <= m->max_seqs &&
               h->n_logits >= 0 && h->n_logits <= m->max_logits) {
        *ints = 3 * n + (size_t)h->n_seqs * m->max_blocks + (size_t)h->n_logits;
        if (h->flags & TP_HAS_PROMPT_LEN) *ints += (size_t)h->n_seqs;
        if (h->flags & TP_HAS_TREE) *ints += n + (*ints + n) % 2 + 2 * n;
        return FL_OK;
    }
    return fl_fail(err, FL_EPEER,
                   "tensor parallel: rank 0's plan (op %d, %d tokens, %d sequences, %d logit rows) is beyond this "
                   "rank's limits (started with other flags?)",
                   h->op, h->n, h->n_seqs, h->n_logits);
}

/* ---- KV blocks whole, for pulls ---- */

size_t tp_kv_block_bytes(const model_t *m, const kv_cache_t *kv)
{
    return kv_cache_block_bytes_all(kv, m->cfg.n_kv_heads);
}

/* This rank's blocks[0..n) as it holds them (kv_cache_block_bytes each) into out, one after another. */
static int read_own(kv_cache_t *kv, const int32_t *blocks, int n, uint8_t *out, fl_error_t *err)
{
    const size_t mine = kv_cache_block_bytes(kv);
    for (int i = 0; i < n; i++)
        if (kv_cache_block_read(kv, blocks[i], out + (size_t)i * mine))
            return fl_fail(err, FL_EIO, "reading KV block %d failed", blocks[i]);
    return FL_OK;
}

/* This rank's heads of n whole blocks (tp_kv_block_bytes each) written into blocks[0..n); slice:
 * room for one of this rank's blocks, NULL when this rank holds every head (no communicator). */
static int write_own(const model_t *m, kv_cache_t *kv, const int32_t *blocks, int n, const uint8_t *whole,
                     uint8_t *slice, fl_error_t *err)
{
    const size_t all = tp_kv_block_bytes(m, kv);
    for (int i = 0; i < n; i++) {
        const uint8_t *src = whole + (size_t)i * all;
        if (slice) {
            kv_cache_block_slice(kv, m->shard.kv_head0, m->cfg.n_kv_heads, (uint8_t *)src, slice, false);
            src = slice;
        }
        if (kv_cache_block_write(kv, blocks[i], src)) return fl_fail(err, FL_EIO, "writing KV block %d failed", blocks[i]);
    }
    return FL_OK;
}

/* A follower's part of a KV read or write of the blocks in m->plan. */
static int follow_kv(model_t *m, kv_cache_t *kv, const tp_header_t *h, fl_error_t *err)
{
    const size_t all = tp_kv_block_bytes(m, kv), mine = kv_cache_block_bytes(kv);
    uint8_t *buf = malloc((h->op == TP_KV_WRITE ? all : mine) * (size_t)h->n), *slice = malloc(mine);
    int rc = buf && slice ? FL_OK : fl_fail(err, FL_ENOMEM, "tensor parallel: no memory for %d KV blocks", h->n);
    if (!rc && h->op == TP_KV_READ) {
        rc = read_own(kv, m->plan, h->n, buf, err);
        if (!rc) rc = comm_send(m->comm, buf, mine * (size_t)h->n, 0, err);
    } else if (!rc) {
        rc = comm_broadcast(m->comm, buf, all * (size_t)h->n, 0, err);
        if (!rc) rc = write_own(m, kv, m->plan, h->n, buf, slice, err);
    }
    free(buf);
    free(slice);
    return rc;
}

/* Rank 0: a KV plan's header and block ids, chunked by the caller to fit the plan buffer. */
static int send_kv_plan(model_t *m, int op, const int32_t *blocks, int n, fl_error_t *err)
{
    tp_header_t h = {.op = op, .n = n};
    memcpy(m->plan, blocks, (size_t)n * sizeof(int32_t));
    int rc = send_header(m, &h, err);
    return rc ? rc : comm_broadcast(m->comm, m->plan, (size_t)n * sizeof(int32_t), 0, err);
}

int tp_kv_read(model_t *m, kv_cache_t *kv, const int32_t *blocks, int n, uint8_t *out, fl_error_t *err)
{
    if (!m->comm) return read_own(kv, blocks, n, out, err); /* one rank: its blocks are whole */
    const size_t all = tp_kv_block_bytes(m, kv);
    const int chunk = (int)tp_plan_ints(m);
    uint8_t *got = malloc(all * (size_t)(n < chunk ? n : chunk)); /* a rank's slices: at most the whole */
    if (!got) return fl_fail(err, FL_ENOMEM, "tensor parallel: no memory for %d KV blocks", n);
    int rc = FL_OK;
    for (int at = 0; at < n && !rc; at += chunk) {
        const int k = n - at < chunk ? n - at : chunk;
        if ((rc = send_kv_plan(m, TP_KV_READ, blocks + at, k, err))) break;
        for (int r = 0; r < m->shard.size && !rc; r++) { /* rank r's slices into their places */
            model_shard_t s;
            if ((rc = tp_shard_of(&m->cfg, r, m->shard.size, &s, err))) break;
            kv_cache_t theirs = *kv; /* the shape of rank r's blocks: its heads (only sizes are read) */
            theirs.n_kv_heads = s.n_kv_heads;
            const size_t r_mine = kv_cache_block_bytes(&theirs);
            rc = r ? comm_recv(m->comm, got, r_mine * (size_t)k, r, err) : read_own(kv, blocks + at, k, got, err);
            for (int i = 0; i < k && !rc; i++)
                kv_cache_block_slice(&theirs, s.kv_head0, m->cfg.n_kv_heads, out + (size_t)(at + i) * all,
                                     got + (size_t)i * r_mine, true);
        }
    }
    free(got);
    if (rc) comm_abort(m->comm); /* the followers may wait in this plan: the group fails over */
    return rc;
}

int tp_kv_write(model_t *m, kv_cache_t *kv, const int32_t *blocks, int n, const uint8_t *in, fl_error_t *err)
{
    if (!m->comm) return write_own(m, kv, blocks, n, in, NULL, err); /* one rank: the blocks are its own */
    const size_t all = tp_kv_block_bytes(m, kv);
    uint8_t *slice = malloc(kv_cache_block_bytes(kv));
    if (!slice) return fl_fail(err, FL_ENOMEM, "tensor parallel: no memory for a KV block");
    const int chunk = (int)tp_plan_ints(m);
    int rc = FL_OK;
    for (int at = 0; at < n && !rc; at += chunk) {
        const int k = n - at < chunk ? n - at : chunk;
        rc = send_kv_plan(m, TP_KV_WRITE, blocks + at, k, err);
        if (!rc) rc = comm_broadcast(m->comm, (void *)(in + (size_t)at * all), all * (size_t)k, 0, err);
        if (!rc) rc = write_own(m, kv, blocks + at, k, in + (size_t)at * all, slice, err);
    }
    free(slice);
    if (rc) comm_abort(m->comm);
    return rc;
}

int tp_check_group(model_t *m, const kv_cache_t *kv, fl_error_t *err)
{
    if (!m->comm) return fl_fail(err, FL_EINVAL, "tensor parallel: no communicator");
    static const char *const names[] = {"layers", "dim", "vocabulary", "heads", "KV heads", "feed-forward width",
                                        "batch tokens", "sequences", "logit rows", "blocks per sequence",
                                        "block size", "K type", "V type", "KV blocks"};
    const model_config_t *c = &m->cfg;
    const int32_t mine[14] = {c->n_layers,        c->dim,         c->n_vocab,      c->n_heads,       c->n_kv_heads,
                              c->n_ff,            m->max_batch_tokens, m->max_seqs, m->max_logits, m->max_blocks,
                              kv->block_size,     kv->k_type,     kv->v_type,      kv->n_blocks};
    int32_t root[14];
    memcpy(root, mine, sizeof root);
    int rc = comm_broadcast(m->comm, root, sizeof root, 0, err);
    if (rc) return rc;
    int bad = -1;
    for (int i = 0; i < 14 && bad < 0; i++)
        if (i == 13 ? mine[i] < root[i] : mine[i] != root[i]) bad = i;
    float n_bad = bad >= 0 ? 1.0f : 0.0f;
    if ((rc = comm_allreduce_sum_f32(m->comm, &n_bad, 1, err))) return rc;
    if (bad >= 0)
        return fl_fail(err, FL_EINVAL, "tensor parallel: rank %d has %s %d, rank 0 %d (start every rank with the same "
                       "model and flags)", m->shard.rank, names[bad], mine[bad], root[bad]);
    if (n_bad > 0) return fl_fail(err, FL_EINVAL, "tensor parallel: another rank was started with another model or flags");
    return FL_OK;
}

int tp_follow(model_t *m, kv_cache_t *kv, fl_error_t *err)
{
    if (!m->comm || m->shard.rank == 0) return fl_fail(err, FL_EINVAL, "tp_follow: not a follower rank");
    for (;;) {
        tp_header_t h;
        int rc = comm_broadcast(m->comm, &h, sizeof h, 0, err);
        if (rc) return rc;
        if (h.op == TP_STOP) return FL_OK;
        if (h.op < TP_FORWARD || h.op > TP_KV_WRITE) return fl_fail(err, FL_EPEER, "tensor parallel: unknown plan %d", h.op);
        size_t ints = 0;
        if ((rc = check_header(m, &h, &ints, err))) {
            comm_abort(m->comm); /* rank 0 goes on to the payload's broadcast: end its wait too */
            return rc;
        }
        if ((rc = comm_broadcast(m->comm, m->plan, ints * sizeof(int32_t), 0, err))) return rc;
        if (h.op == TP_MOVE) {
            kv_cache_move(kv, m->plan, m->plan + h.n, h.n);
            continue;
        }
        if (h.op == TP_KV_READ || h.op == TP_KV_WRITE) {
            if ((rc = follow_kv(m, kv, &h, err))) {
                comm_abort(m->comm); /* rank 0 waits for this rank's slices, or will */
                return rc;
            }
            continue;
        }
        model_batch_t b;
        unpack_forward(m, &h, &b);
        if ((rc = model_forward(m, kv, &b, err))) {
            comm_abort(m->comm); /* the others wait in this step's all-reduces */
            return rc;
        }
    }
}
