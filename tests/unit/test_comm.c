/* test_comm.c - the communication layer's host transport (worker/comm.h, worker/comm_host.c),
 * with one forked process per rank, as a worker group runs.
 *
 * Protects: an all-reduce equals, bit for bit and on every rank, the ranks' buffers added in rank
 * order (single rounds and chunked ones, 2 to 4 ranks); a broadcast gives the root's bytes
 * everywhere; a point-to-point message arrives whole, in chunks; nothing waits forever: a peer that
 * stops answering ends the wait after the timeout, a peer process that is gone ends it at once, a
 * size or operation the ranks disagree on is an error on both sides, and one rank's failure ends
 * the others' waits; a rank that never joins fails comm_init, and no shared-memory name is left. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "comm.h"

typedef int (*rank_fn)(comm_t *c, const void *arg);

/* A child's exit code: 0 pass, 10 + line of the failed check. */
#define CHILD_CHECK(cond)                                                                                              \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "rank check failed at line %d: %s\n", __LINE__, #cond);                                   \
            return 10 + __LINE__ % 200;                                                                                \
        }                                                                                                              \
    } while (0)

typedef struct {
    int n_ranks;
    comm_opts_t opts;
    int skip_rank; /* this rank never joins (-1: none) */
} group_spec_t;

/* Forks one process per rank; each joins the communicator and runs fn. Returns each rank's exit. */
static void run_ranks(const group_spec_t *g, rank_fn fn, const void *arg, int *codes)
{
    comm_id_t id;
    assert_int_equal(comm_id_new(COMM_HOST, &id, NULL), 0);
    pid_t pids[COMM_MAX_RANKS];
    for (int r = 0; r < g->n_ranks; r++) {
        if (r == g->skip_rank) {
            pids[r] = -1;
            continue;
        }
        pids[r] = fork();
        assert_true(pids[r] >= 0);
        if (pids[r] == 0) {
            fl_error_t err = {0};
            comm_t *c = comm_init(&id, r, g->n_ranks, &g->opts, &err);
            int code;
            if (!c) {
                fprintf(stderr, "rank %d: %s\n", r, err.msg);
                code = 2;
            } else {
                code = fn(c, arg);
            }
            comm_destroy(&c);
            _exit(code);
        }
    }
    /* Any order: a rank that ends early is reaped at once, so its peers see it gone. */
    for (int done = 0; done < g->n_ranks - (g->skip_rank >= 0);) {
        int status;
        const pid_t p = wait(&status);
        assert_true(p > 0);
        for (int r = 0; r < g->n_ranks; r++)
            if (pids[r] == p) codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status), done++;
    }
}

static void expect_all(const int *codes, int n, int code)
{
    for (int r = 0; r < n; r++) {
        if (codes[r] != code) fail_msg("rank %d exited %d, expected %d", r, codes[r], code);
    }
}

static float value(int rank, size_t i)
{
    uint32_t x = (uint32_t)(rank * 2654435761u) ^ (uint32_t)(i * 40503u + 17);
    x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
    return ((float)(x & 0xffffff) / (float)0x1000000 - 0.5f) * (float)(1 + (i % 7) * 100);
}

/* --- all-reduce ------------------------------------------------------------------------------ */

static int allreduce_rank(comm_t *c, const void *arg)
{
    const size_t n = *(const size_t *)arg;
    float *buf = malloc((n + 1) * sizeof *buf), *want = malloc((n + 1) * sizeof *want);
    for (size_t i = 0; i < n; i++) {
        buf[i] = value(comm_rank(c), i);
        float acc = value(0, i);
        for (int r = 1; r < comm_size(c); r++) acc += value(r, i);
        want[i] = acc;
    }
    /* Twice: the second round reuses the first's staging set only after everyone read it. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass) for (size_t i = 0; i < n; i++) buf[i] = value(comm_rank(c), i);
        fl_error_t err = {0};
        CHILD_CHECK(comm_allreduce_sum_f32(c, buf, n, &err) == 0);
        CHILD_CHECK(n == 0 || memcmp(buf, want, n * sizeof *buf) == 0);
    }
    free(buf), free(want);
    return 0;
}

static void allreduce_is_the_rank_order_sum_on_every_rank(void **state)
{
    (void)state;
    const size_t sizes[] = {0, 1, 1000, 50000};
    for (int n_ranks = 2; n_ranks <= 4; n_ranks++)
        for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
            /* 4 KiB slots: 50,000 floats take 49 rounds. */
            const group_spec_t g = {.n_ranks = n_ranks, .opts = {.slot_bytes = 4096}, .skip_rank = -1};
            int codes[COMM_MAX_RANKS];
            run_ranks(&g, allreduce_rank, &sizes[k], codes);
            expect_all(codes, n_ranks, 0);
        }
}

/* --- broadcast ------------------------------------------------------------------------------- */

static int broadcast_rank(comm_t *c, const void *arg)
{
    const size_t bytes = *(const size_t *)arg;
    uint8_t *buf = malloc(bytes + 1);
    for (int root = 0; root < comm_size(c); root++) {
        for (size_t i = 0; i < bytes; i++) buf[i] = (uint8_t)(comm_rank(c) == root ? i * 7 + root : 0xEE);
        fl_error_t err = {0};
        CHILD_CHECK(comm_broadcast(c, buf, bytes, root, &err) == 0);
        for (size_t i = 0; i < bytes; i++) CHILD_CHECK(buf[i] == (uint8_t)(i * 7 + root));
    }
    free(buf);
    return 0;
}

static void broadcast_gives_the_roots_bytes(void **state)
{
    (void)state;
    const size_t sizes[] = {1, 4096, 100000};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        const group_spec_t g = {.n_ranks = 3, .opts = {.slot_bytes = 4096}, .skip_rank = -1};
        int codes[COMM_MAX_RANKS];
        run_ranks(&g, broadcast_rank, &sizes[k], codes);
        expect_all(codes, 3, 0);
    }
}

/* --- point to point -------------------------------------------------------------------------- */

static int p2p_rank(comm_t *c, const void *arg)
{
    (void)arg;
    const size_t bytes = 100000;
    uint8_t *buf = malloc(bytes);
    fl_error_t err = {0};
    /* 0 -> 1, then 2 -> 0 and 1 -> 2, each in 25 chunks of 4 KiB. */
    if (comm_rank(c) == 0) {
        for (size_t i = 0; i < bytes; i++) buf[i] = (uint8_t)(i * 13);
        CHILD_CHECK(comm_send(c, buf, bytes, 1, &err) == 0);
        CHILD_CHECK(comm_recv(c, buf, bytes, 2, &err) == 0);
        for (size_t i = 0; i < bytes; i++) CHILD_CHECK(buf[i] == (uint8_t)(i * 3 + 2));
    } else if (comm_rank(c) == 1) {
        CHILD_CHECK(comm_recv(c, buf, bytes, 0, &err) == 0);
        for (size_t i = 0; i < bytes; i++) CHILD_CHECK(buf[i] == (uint8_t)(i * 13));
        for (size_t i = 0; i < bytes; i++) buf[i] = (uint8_t)(i * 5 + 1);
        CHILD_CHECK(comm_send(c, buf, bytes, 2, &err) == 0);
    } else {
        for (size_t i = 0; i < bytes; i++) buf[i] = (uint8_t)(i * 3 + 2);
        CHILD_CHECK(comm_send(c, buf, bytes, 0, &err) == 0);
        CHILD_CHECK(comm_recv(c, buf, bytes, 1, &err) == 0);
        for (size_t i = 0; i < bytes; i++) CHILD_CHECK(buf[i] == (uint8_t)(i * 5 + 1));
    }
    CHILD_CHECK(comm_send(c, buf, 1, comm_rank(c), &err) == FL_EINVAL); /* to itself */
    free(buf);
    return 0;
}

static void send_and_receive_arrive_whole(void **state)
{
    (void)state;
    const group_spec_t g = {.n_ranks = 3, .opts = {.slot_bytes = 4096}, .skip_rank = -1};
    int codes[COMM_MAX_RANKS];
    run_ranks(&g, p2p_rank, NULL, codes);
    expect_all(codes, 3, 0);
}

/* --- failures -------------------------------------------------------------------------------- */

static int size_mismatch_rank(comm_t *c, const void *arg)
{
    (void)arg;
    uint8_t buf[100] = {0};
    fl_error_t err = {0};
    if (comm_rank(c) == 0) {
        /* The receiver refuses and aborts: the sender's wait for it to take the chunk ends too. */
        CHILD_CHECK(comm_send(c, buf, 100, 1, &err) == FL_EPEER);
        CHILD_CHECK(strstr(err.msg, "aborted") != NULL);
    } else {
        CHILD_CHECK(comm_recv(c, buf, 50, 0, &err) == FL_EPEER);
        CHILD_CHECK(strstr(err.msg, "sent 100 bytes") != NULL);
    }
    CHILD_CHECK(comm_barrier(c, &err) == FL_EPEER); /* failed: refuses at once */
    return 0;
}

static int op_mismatch_rank(comm_t *c, const void *arg)
{
    (void)arg;
    float buf[16] = {0};
    fl_error_t err = {0};
    const int rc = comm_rank(c) == 0 ? comm_broadcast(c, buf, sizeof buf, 0, &err)
                                     : comm_allreduce_sum_f32(c, buf, 16, &err);
    CHILD_CHECK(rc == FL_EPEER);
    CHILD_CHECK(strstr(err.msg, "is in a") != NULL);
    return 0;
}

static void disagreements_fail_on_both_sides(void **state)
{
    (void)state;
    const group_spec_t g = {.n_ranks = 2, .opts = {.timeout_ms = 5000}, .skip_rank = -1};
    int codes[COMM_MAX_RANKS];
    run_ranks(&g, size_mismatch_rank, NULL, codes);
    expect_all(codes, 2, 0);
    run_ranks(&g, op_mismatch_rank, NULL, codes);
    expect_all(codes, 2, 0);
}

static int slow_peer_rank(comm_t *c, const void *arg)
{
    (void)arg;
    float buf[4] = {1, 2, 3, 4};
    fl_error_t err = {0};
    if (comm_rank(c) == 0) {
        struct timespec ts = {1, 0}; /* alive, but silent past the others' timeout */
        nanosleep(&ts, NULL);
        return 0;
    }
    const double t0 = fl_clock_s();
    CHILD_CHECK(comm_allreduce_sum_f32(c, buf, 4, &err) == FL_EPEER);
    const double waited = fl_clock_s() - t0;
    CHILD_CHECK(strstr(err.msg, "within 200 ms") != NULL);
    CHILD_CHECK(waited >= 0.19 && waited < 0.9);
    return 0;
}

static int dead_peer_rank(comm_t *c, const void *arg)
{
    (void)arg;
    float buf[4] = {1, 2, 3, 4};
    fl_error_t err = {0};
    if (comm_rank(c) == 0) _exit(0); /* as a killed rank: no abort, no goodbye */
    const double t0 = fl_clock_s();
    CHILD_CHECK(comm_allreduce_sum_f32(c, buf, 4, &err) == FL_EPEER);
    CHILD_CHECK(strstr(err.msg, "rank 0's process is gone") != NULL);
    CHILD_CHECK(fl_clock_s() - t0 < 5.0); /* long before the 20 s timeout */
    return 0;
}

static void nothing_waits_forever(void **state)
{
    (void)state;
    int codes[COMM_MAX_RANKS];
    const group_spec_t slow = {.n_ranks = 2, .opts = {.timeout_ms = 200}, .skip_rank = -1};
    run_ranks(&slow, slow_peer_rank, NULL, codes);
    expect_all(codes, 2, 0);
    const group_spec_t dead = {.n_ranks = 2, .opts = {.timeout_ms = 20000}, .skip_rank = -1};
    run_ranks(&dead, dead_peer_rank, NULL, codes);
    expect_all(codes, 2, 0);
}

static int count_shm_names(void)
{
    DIR *d = opendir("/dev/shm");
    if (!d) return 0;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += strncmp(e->d_name, "folio-comm-", 11) == 0;
    closedir(d);
    return n;
}

static void a_rank_that_never_joins_fails_init_and_leaves_nothing(void **state)
{
    (void)state;
    const int before = count_shm_names();
    const group_spec_t g = {.n_ranks = 2, .opts = {.timeout_ms = 300}, .skip_rank = 1};
    int codes[COMM_MAX_RANKS];
    run_ranks(&g, allreduce_rank, &(size_t){4}, codes);
    assert_int_equal(codes[0], 2); /* comm_init failed */
    assert_int_equal(count_shm_names(), before);
}

static void bad_arguments_are_refused(void **state)
{
    (void)state;
    comm_id_t id;
    fl_error_t err = {0};
    assert_int_equal(comm_id_new(COMM_HOST, &id, &err), 0);
    assert_null(comm_init(&id, 2, 2, NULL, &err));
    assert_int_equal(err.code, FL_EINVAL);
    assert_null(comm_init(&id, 0, COMM_MAX_RANKS + 1, NULL, &err));
    assert_int_equal(err.code, FL_EINVAL);
    comm_id_t bad = {.kind = COMM_HOST};
    memcpy(bad.bytes, "no-slash", 9);
    assert_null(comm_init(&bad, 0, 1, NULL, &err));
    assert_int_equal(err.code, FL_EINVAL);
    /* Without the CUDA module there is no NCCL; with it, making an id needs no GPU. */
    const int nccl = comm_id_new(COMM_NCCL, &id, &err);
    assert_true(nccl == 0 || nccl == FL_EUNSUPPORTED);
    if (nccl == 0) assert_int_equal(id.kind, COMM_NCCL);
    /* One rank alone: collectives are copies. */
    assert_int_equal(comm_id_new(COMM_HOST, &id, &err), 0);
    comm_t *c = comm_init(&id, 0, 1, NULL, &err);
    assert_non_null(c);
    float x[3] = {1, 2, 3};
    assert_int_equal(comm_allreduce_sum_f32(c, x, 3, &err), 0);
    assert_true(x[0] == 1 && x[1] == 2 && x[2] == 3);
    assert_int_equal(comm_broadcast(c, x, sizeof x, 1, &err), FL_EINVAL);
    comm_destroy(&c);
    assert_null(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(allreduce_is_the_rank_order_sum_on_every_rank),
        cmocka_unit_test(broadcast_gives_the_roots_bytes),
        cmocka_unit_test(send_and_receive_arrive_whole),
        cmocka_unit_test(disagreements_fail_on_both_sides),
        cmocka_unit_test(nothing_waits_forever),
        cmocka_unit_test(a_rank_that_never_joins_fails_init_and_leaves_nothing),
        cmocka_unit_test(bad_arguments_are_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
