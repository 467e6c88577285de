/* comm_host.c - the host transport of comm.h: shared memory between the processes of one host.
 *
 * Rank 0 creates a POSIX shared-memory segment named by the id, the others open it, and rank 0
 * unlinks the name once everyone is in (nothing is left in /dev/shm when processes die). The
 * segment holds a header of counters, each on its own cache line, then the staging areas:
 *
 *   collectives  2 sets x n_ranks slots of slot_bytes: a round writes its rank's slot of set
 *                (round & 1), meets the others at a barrier, then reads every slot. A rank writes a
 *                set again two rounds later, after a barrier every rank reached only once it had
 *                finished reading that set, so one barrier per round is enough.
 *   point to     one area of slot_bytes per sender, one chunk in flight: the sender waits until the
 *   point        receiver took the previous chunk, writes, and publishes a sequence number.
 *
 * A barrier is a counter per rank (the round it reached), so no two ranks write one line. Waits spin
 * briefly, then yield, then sleep in short steps (the ranks often share fewer cores than they are),
 * and check the clock, an abort flag and whether each peer's process still exists. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "comm.h"

#define HOST_MAGIC   0x666f6c696f636d31ull /* "foliocm1" */
#define NAME_BYTES   64
#define HEADER_BYTES 65536 /* room for the counters below, page aligned */

typedef struct {
    _Alignas(64) _Atomic uint64_t v;
} line_t;

typedef struct {
    _Atomic uint64_t magic; /* stored last by rank 0: the rest is ready */
    uint32_t n_ranks;
    uint64_t slot_bytes;
    _Atomic int32_t aborted_by; /* rank + 1 of the first rank that gave up, or 0 */
    _Atomic int32_t pid[COMM_MAX_RANKS];
    line_t joined[COMM_MAX_RANKS];
    line_t arrived[COMM_MAX_RANKS];    /* the barrier round each rank reached */
    line_t op[2][COMM_MAX_RANKS];      /* per set: what each rank is doing this round (kind, bytes) */
    line_t sent[COMM_MAX_RANKS];       /* chunks published by a sender */
    line_t taken[COMM_MAX_RANKS];      /* chunks its receiver took */
    line_t chunk[COMM_MAX_RANKS];      /* a sender's chunk: receiver << 48 | bytes */
    line_t total[COMM_MAX_RANKS];      /* a sender's message: its size, with its first chunk */
} host_header_t;

_Static_assert(sizeof(host_header_t) <= HEADER_BYTES, "comm header too large");

typedef struct {
    comm_t base;
    host_header_t *h;
    uint8_t *data; /* after the header */
    size_t map_bytes, slot_bytes;
    uint64_t round;           /* barrier rounds this rank completed */
    uint64_t taken_from[COMM_MAX_RANKS]; /* chunks received from each sender */
    int timeout_ms;
    const volatile int *cancel; /* comm_opts_t.cancel, during comm_init only */
    char name[NAME_BYTES];
} host_comm_t;

enum { OP_BARRIER = 1, OP_ALLREDUCE = 2, OP_BROADCAST = 3 };
static const char *const op_names[] = {"?", "barrier", "all-reduce", "broadcast"};

static uint8_t *coll_slot(host_comm_t *hc, uint64_t round, int rank)
{
    return hc->data + ((size_t)(round & 1) * (size_t)hc->base.n_ranks + (size_t)rank) * hc->slot_bytes;
}

static uint8_t *p2p_area(host_comm_t *hc, int sender)
{
    return hc->data + ((size_t)2 * hc->base.n_ranks + (size_t)sender) * hc->slot_bytes;
}

static size_t map_size(int n_ranks, size_t slot_bytes)
{
    return HEADER_BYTES + (size_t)3 * (size_t)n_ranks * slot_bytes;
}

int comm_host_id_new(comm_id_t *id, fl_error_t *err)
{
    uint64_t r[2];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
        r[0] = (uint64_t)getpid() << 32 ^ (uint64_t)(fl_clock_s() * 1e9);
        r[1] = (uint64_t)(uintptr_t)id;
    }
    memset(id, 0, sizeof *id);
    id->kind = COMM_HOST;
    snprintf((char *)id->bytes, NAME_BYTES, "/folio-comm-%016" PRIx64 "%016" PRIx64, r[0], r[1]);
    (void)err;
    return FL_OK;
}

/* --- waiting --------------------------------------------------------------------------------- */

/* Whether rank's process is gone: no such process, or (deep) a zombie its parent has not reaped
 * yet (kill() still finds one; its state in /proc says Z). */
static bool peer_gone(const host_header_t *h, int rank, bool deep)
{
    const pid_t pid = atomic_load_explicit(&h->pid[rank], memory_order_relaxed);
    if (pid <= 0) return false;
    if (kill(pid, 0) && errno == ESRCH) return true;
    if (!deep) return false;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return false;
    const size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *close_paren = strrchr(buf, ')'); /* "pid (comm) S ..." */
    return close_paren && close_paren[1] == ' ' && (close_paren[2] == 'Z' || close_paren[2] == 'X');
}

typedef bool (*ready_fn)(host_comm_t *hc, const void *arg);

/* Waits until ready(arg); FL_EPEER when the timeout passes, a peer aborted, or a process that
 * should answer (peer, or any rank when peer < 0) is gone. */
static int wait_for(host_comm_t *hc, ready_fn ready, const void *arg, const char *op, int peer, fl_error_t *err)
{
    const double deadline = fl_clock_s() + hc->timeout_ms * 1e-3;
    for (unsigned spins = 0;; spins++) {
        if (ready(hc, arg)) return FL_OK;
        if (spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        /* Checked often even while yielding: on a busy machine one yield may last a time slice. */
        if (spins < 1024 && (spins & 31)) {
            sched_yield();
            continue;
        }
        if (hc->cancel && *hc->cancel)
            return fl_fail(err, FL_EPEER, "comm %s: this rank gave up on the group (rank %d)", op, hc->base.rank);
        const int by = atomic_load_explicit(&hc->h->aborted_by, memory_order_acquire);
        if (by)
            return fl_fail(err, FL_EPEER, "comm %s: rank %d aborted the communicator (this is rank %d)", op, by - 1,
                           hc->base.rank);
        for (int r = 0; r < hc->base.n_ranks; r++)
            if (r != hc->base.rank && (peer < 0 || r == peer) && peer_gone(hc->h, r, (spins & 63) == 0)) {
                /* Between the check above and this one the peer may have done its part and exited
                 * (the last round of a test, a group stopping): what it wrote stays in the shared
                 * memory, so a wait it answered before going is not a failure. */
                if (ready(hc, arg)) return FL_OK;
                return fl_fail(err, FL_EPEER, "comm %s: rank %d's process is gone (this is rank %d)", op, r,
                               hc->base.rank);
            }
        if (fl_clock_s() > deadline) {
            if (ready(hc, arg)) return FL_OK; /* it came while this rank was asleep */
            if (peer >= 0)
                return fl_fail(err, FL_EPEER, "comm %s: no answer from rank %d within %d ms (this is rank %d)", op,
                               peer, hc->timeout_ms, hc->base.rank);
            return fl_fail(err, FL_EPEER, "comm %s: not every rank came within %d ms (this is rank %d of %d)", op,
                           hc->timeout_ms, hc->base.rank, hc->base.n_ranks);
        }
        if (spins < 1024) {
            sched_yield();
            continue;
        }
        /* Sleep longer the longer the wait: a follower idle between steps costs nothing. */
        struct timespec ts = {0, spins < 8192 ? 20000 : 200000};
        nanosleep(&ts, NULL);
    }
}

static bool all_arrived(host_comm_t *hc, const void *arg)
{
    const uint64_t round = *(const uint64_t *)arg;
    for (int r = 0; r < hc->base.n_ranks; r++)
        if (atomic_load_explicit(&hc->h->arrived[r].v, memory_order_acquire) < round) return false;
    return true;
}

/* One round: announce what this rank does (kind, bytes) and meet every rank; the others' op must be
 * the same, or the ranks disagree (a bug, or a rank that skipped a step). */
static int round_meet(host_comm_t *hc, int kind, uint64_t bytes, int root, fl_error_t *err)
{
    const uint64_t round = hc->round + 1, set = round & 1;
    const uint64_t op = (uint64_t)kind << 56 | (uint64_t)(root & 0xff) << 48 | (bytes & ((1ull << 48) - 1));
    atomic_store_explicit(&hc->h->op[set][hc->base.rank].v, op, memory_order_relaxed);
    atomic_store_explicit(&hc->h->arrived[hc->base.rank].v, round, memory_order_release);
    int rc = wait_for(hc, all_arrived, &round, op_names[kind], -1, err);
    if (rc) return rc;
    hc->round = round;
    for (int r = 0; r < hc->base.n_ranks; r++) {
        const uint64_t theirs = atomic_load_explicit(&hc->h->op[set][r].v, memory_order_relaxed);
        if (theirs != op) {
            const int tk = (int)(theirs >> 56);
            return fl_fail(err, FL_EPEER,
                           "comm %s of %" PRIu64 " bytes (root %d): rank %d is in a %s of %" PRIu64
                           " bytes (root %d) (this is rank %d)",
                           op_names[kind], bytes, root, r, op_names[tk >= 0 && tk <= 3 ? tk : 0],
                           (uint64_t)(theirs & ((1ull << 48) - 1)), (int)(theirs >> 48 & 0xff), hc->base.rank);
        }
    }
    return FL_OK;
}

/* --- collectives ----------------------------------------------------------------------------- */

static int host_barrier(comm_t *c, fl_error_t *err)
{
    return round_meet((host_comm_t *)c, OP_BARRIER, 0, 0, err);
}

static int host_allreduce(comm_t *c, float *buf, size_t n, fl_error_t *err)
{
    host_comm_t *hc = (host_comm_t *)c;
    const size_t per = hc->slot_bytes / sizeof(float);
    const int nr = c->n_ranks;
    for (size_t off = 0; off < n || (n == 0 && off == 0); off += per) {
        const size_t len = n - off < per ? n - off : per;
        memcpy(coll_slot(hc, hc->round + 1, c->rank), buf + off, len * sizeof(float));
        const int rc = round_meet(hc, OP_ALLREDUCE, len * sizeof(float), 0, err);
        if (rc) return rc;
        const float *s[COMM_MAX_RANKS];
        for (int r = 0; r < nr; r++) s[r] = (const float *)coll_slot(hc, hc->round, r);
        float *y = buf + off;
        /* Rank order, on every rank: the same bits everywhere. */
        if (nr == 2) {
            for (size_t i = 0; i < len; i++) y[i] = s[0][i] + s[1][i];
        } else {
            for (size_t i = 0; i < len; i++) {
                float acc = s[0][i];
                for (int r = 1; r < nr; r++) acc += s[r][i];
                y[i] = acc;
            }
        }
        if (n == 0) break;
    }
    return FL_OK;
}

static int host_broadcast(comm_t *c, void *buf, size_t bytes, int root, fl_error_t *err)
{
    host_comm_t *hc = (host_comm_t *)c;
    uint8_t *p = buf;
    for (size_t off = 0; off < bytes || (bytes == 0 && off == 0); off += hc->slot_bytes) {
        const size_t len = bytes - off < hc->slot_bytes ? bytes - off : hc->slot_bytes;
        if (c->rank == root) memcpy(coll_slot(hc, hc->round + 1, root), p + off, len);
        const int rc = round_meet(hc, OP_BROADCAST, len, root, err);
        if (rc) return rc;
        if (c->rank != root) memcpy(p + off, coll_slot(hc, hc->round, root), len);
        if (bytes == 0) break;
    }
    return FL_OK;
}

/* --- point to point -------------------------------------------------------------------------- */

typedef struct {
    int sender;
    uint64_t seq;
} p2p_wait_t;

static bool chunk_taken(host_comm_t *hc, const void *arg)
{
    const p2p_wait_t *w = arg;
    return atomic_load_explicit(&hc->h->taken[w->sender].v, memory_order_acquire) >= w->seq;
}

static bool chunk_sent(host_comm_t *hc, const void *arg)
{
    const p2p_wait_t *w = arg;
    return atomic_load_explicit(&hc->h->sent[w->sender].v, memory_order_acquire) >= w->seq;
}

static int host_send(comm_t *c, const void *buf, size_t bytes, int peer, fl_error_t *err)
{
    host_comm_t *hc = (host_comm_t *)c;
    host_header_t *h = hc->h;
    const int me = c->rank;
    const uint8_t *p = buf;
    for (size_t off = 0; off < bytes || (bytes == 0 && off == 0); off += hc->slot_bytes) {
        const size_t len = bytes - off < hc->slot_bytes ? bytes - off : hc->slot_bytes;
        const uint64_t seq = atomic_load_explicit(&h->sent[me].v, memory_order_relaxed);
        const p2p_wait_t w = {me, seq}; /* every chunk before this one taken */
        int rc = wait_for(hc, chunk_taken, &w, "send", peer, err);
        if (rc) return rc;
        memcpy(p2p_area(hc, me), p + off, len);
        atomic_store_explicit(&h->chunk[me].v, (uint64_t)peer << 48 | len, memory_order_relaxed);
        if (off == 0) atomic_store_explicit(&h->total[me].v, bytes, memory_order_relaxed);
        atomic_store_explicit(&h->sent[me].v, seq + 1, memory_order_release);
        if (bytes == 0) break;
    }
    /* Returns once the last chunk is taken: the caller may reuse or free what it sent. */
    const p2p_wait_t w = {me, atomic_load_explicit(&h->sent[me].v, memory_order_relaxed)};
    return wait_for(hc, chunk_taken, &w, "send", peer, err);
}

static int host_recv(comm_t *c, void *buf, size_t bytes, int peer, fl_error_t *err)
{
    host_comm_t *hc = (host_comm_t *)c;
    host_header_t *h = hc->h;
    uint8_t *p = buf;
    for (size_t off = 0; off < bytes || (bytes == 0 && off == 0); off += hc->slot_bytes) {
        const uint64_t seq = hc->taken_from[peer] + 1;
        const p2p_wait_t w = {peer, seq};
        int rc = wait_for(hc, chunk_sent, &w, "receive", peer, err);
        if (rc) return rc;
        const uint64_t chunk = atomic_load_explicit(&h->chunk[peer].v, memory_order_relaxed);
        const size_t want = bytes - off < hc->slot_bytes ? bytes - off : hc->slot_bytes;
        if ((int)(chunk >> 48) != c->rank)
            return fl_fail(err, FL_EPEER, "comm receive: rank %d's message is for rank %d (this is rank %d)", peer,
                           (int)(chunk >> 48), c->rank);
        if (off == 0) {
            const uint64_t total = atomic_load_explicit(&h->total[peer].v, memory_order_relaxed);
            if (total != bytes)
                return fl_fail(err, FL_EPEER, "comm receive: rank %d sent %" PRIu64 " bytes, rank %d expects %zu",
                               peer, total, c->rank, bytes);
        }
        if ((chunk & ((1ull << 48) - 1)) != want)
            return fl_fail(err, FL_EPEER, "comm receive: chunk of %" PRIu64 " bytes from rank %d, expected %zu",
                           (uint64_t)(chunk & ((1ull << 48) - 1)), peer, want);
        memcpy(p + off, p2p_area(hc, peer), want);
        hc->taken_from[peer] = seq;
        atomic_store_explicit(&h->taken[peer].v, seq, memory_order_release);
        if (bytes == 0) break;
    }
    return FL_OK;
}

/* --- life ------------------------------------------------------------------------------------ */

static void host_abort(comm_t *c)
{
    host_comm_t *hc = (host_comm_t *)c;
    int32_t none = 0;
    atomic_compare_exchange_strong(&hc->h->aborted_by, &none, c->rank + 1);
}

static void host_destroy(comm_t *c)
{
    host_comm_t *hc = (host_comm_t *)c;
    if (hc->h) munmap(hc->h, hc->map_bytes);
    free(hc);
}

static const comm_ops_t host_ops = {
    .destroy = host_destroy,
    .allreduce_sum_f32 = host_allreduce,
    .broadcast = host_broadcast,
    .send = host_send,
    .recv = host_recv,
    .barrier = host_barrier,
    .abort = host_abort,
};

static bool all_joined(host_comm_t *hc, const void *arg)
{
    (void)arg;
    for (int r = 0; r < hc->base.n_ranks; r++)
        if (!atomic_load_explicit(&hc->h->joined[r].v, memory_order_acquire)) return false;
    return true;
}

/* The other ranks open the segment rank 0 creates: they may come first, so they retry. */
static int open_segment(host_comm_t *hc, int n_ranks, fl_error_t *err)
{
    const bool create = hc->base.rank == 0;
    const double deadline = fl_clock_s() + hc->timeout_ms * 1e-3; /* comm_init's: the join timeout */
    int fd;
    for (;;) {
        fd = shm_open(hc->name, create ? O_RDWR | O_CREAT | O_EXCL : O_RDWR, 0600);
        if (fd >= 0) break;
        if (create || errno != ENOENT || fl_clock_s() > deadline || (hc->cancel && *hc->cancel))
            return fl_fail(err, create ? FL_EIO : FL_EPEER, "comm: %s shared memory %s: %s",
                           create ? "cannot create" : "rank 0 never created", hc->name, strerror(errno));
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
    if (create && ftruncate(fd, (off_t)hc->map_bytes)) {
        const int e = errno;
        close(fd);
        shm_unlink(hc->name);
        return fl_fail(err, FL_EIO, "comm: shared memory of %zu bytes: %s", hc->map_bytes, strerror(e));
    }
    /* A joiner maps only once the size is final (rank 0 truncates before it stores the magic). */
    for (;;) {
        struct stat st;
        if (fstat(fd, &st) == 0 && (size_t)st.st_size >= hc->map_bytes) break;
        if (fl_clock_s() > deadline) {
            close(fd);
            return fl_fail(err, FL_EPEER, "comm: shared memory %s never reached %zu bytes", hc->name, hc->map_bytes);
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    void *m = mmap(NULL, hc->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        if (create) shm_unlink(hc->name);
        return fl_fail(err, FL_EIO, "comm: mmap of %zu bytes: %s", hc->map_bytes, strerror(errno));
    }
    hc->h = m;
    hc->data = (uint8_t *)m + HEADER_BYTES;
    if (create) {
        hc->h->n_ranks = (uint32_t)n_ranks;
        hc->h->slot_bytes = hc->slot_bytes;
        atomic_store_explicit(&hc->h->magic, HOST_MAGIC, memory_order_release);
        return FL_OK;
    }
    while (atomic_load_explicit(&hc->h->magic, memory_order_acquire) != HOST_MAGIC) {
        if (fl_clock_s() > deadline) return fl_fail(err, FL_EPEER, "comm: %s never initialised", hc->name);
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (hc->h->n_ranks != (uint32_t)n_ranks || hc->h->slot_bytes != hc->slot_bytes)
        return fl_fail(err, FL_EPEER, "comm: %s has %u ranks of %" PRIu64 " bytes, this rank wants %d of %zu", hc->name,
                       hc->h->n_ranks, hc->h->slot_bytes, n_ranks, hc->slot_bytes);
    return FL_OK;
}

comm_t *comm_host_init(const comm_id_t *id, int rank, int n_ranks, const comm_opts_t *opts, fl_error_t *err)
{
    if (memchr(id->bytes, 0, NAME_BYTES) == NULL || id->bytes[0] != '/') {
        fl_fail(err, FL_EINVAL, "comm: not a host communicator id");
        return NULL;
    }
    host_comm_t *hc = calloc(1, sizeof *hc);
    if (!hc) {
        fl_fail(err, FL_ENOMEM, "out of memory");
        return NULL;
    }
    hc->base = (comm_t){.ops = &host_ops, .rank = rank, .n_ranks = n_ranks};
    hc->timeout_ms = opts->join_timeout_ms; /* while joining; opts->timeout_ms after */
    hc->cancel = opts->cancel;
    hc->slot_bytes = (opts->slot_bytes + 63) & ~(size_t)63;
    hc->map_bytes = map_size(n_ranks, hc->slot_bytes);
    memcpy(hc->name, id->bytes, NAME_BYTES);
    if (open_segment(hc, n_ranks, err)) {
        host_destroy(&hc->base);
        return NULL;
    }
    atomic_store_explicit(&hc->h->pid[rank], (int32_t)getpid(), memory_order_relaxed);
    atomic_store_explicit(&hc->h->joined[rank].v, 1, memory_order_release);
    const int rc = wait_for(hc, all_joined, NULL, "join", -1, err);
    /* Every rank has it mapped, or the group is failing: then any rank removes the name, so that a
     * rank 0 that died before the others came leaves nothing in /dev/shm. */
    if (rank == 0 || rc) shm_unlink(hc->name);
    hc->timeout_ms = opts->timeout_ms;
    hc->cancel = NULL;
    if (rc) {
        host_abort(&hc->base);
        host_destroy(&hc->base);
        return NULL;
    }
    return &hc->base;
}
