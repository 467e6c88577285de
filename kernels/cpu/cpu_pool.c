/* cpu_pool.c - the CPU backend's thread pool: n-1 worker threads plus the calling thread.
 *
 * A dispatch publishes (fn, arg) and bumps a generation counter; workers watch the counter, run the
 * task and bump a done counter, which the caller spins on after running its own share as thread 0.
 * Between dispatches a worker spins for a while (a decode step issues ~200 ops a few microseconds
 * apart, so it usually finds the next one while spinning), then sleeps on a futex on the
 * generation word. Dispatch plus join costs ~1 us when the workers are spinning.
 *
 * Ownership: only the thread that owns the backend calls cpu_pool_run (never concurrently). The
 * workers read the job fields after seeing the generation change (acquire) and own nothing else. */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_internal.h"

/* Spin iterations (each a pause, ~10-40 ns) before a worker goes to sleep: ~100-200 us. */
#define POOL_SPIN 8192
/* Pauses the caller spins on the join before yielding its core (~20-50 us). */
#define POOL_JOIN_SPIN 1024

typedef struct pool_worker {
    cpu_pool_t *pool;
    pthread_t tid;
    int ith;
} pool_worker_t;

struct cpu_pool {
    int n;                        /* threads including the caller */
    pool_worker_t *workers;       /* [n - 1] */
    _Alignas(64) atomic_uint gen; /* bumped once per dispatch (and at shutdown) */
    _Alignas(64) atomic_int done; /* workers finished with the current generation */
    _Alignas(64) atomic_int sleepers;
    cpu_task_fn fn;
    void *arg;
    atomic_bool quit;
    uint64_t dispatches;          /* cpu_pool_run calls handed to the workers (the caller's alone) */
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void futex_wait(atomic_uint *addr, unsigned val)
{
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(atomic_uint *addr)
{
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static void *worker_main(void *p)
{
    pool_worker_t *w = p;
    cpu_pool_t *pool = w->pool;
    unsigned seen = 0; /* the generation at creation: a dispatch may come before this thread runs */
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) == seen) {
            if (++spins < POOL_SPIN) {
                cpu_relax();
                continue;
            }
            /* Dekker with cpu_pool_run: either it sees sleepers > 0 and wakes us, or the futex
             * sees the new generation and returns at once. */
            atomic_fetch_add(&pool->sleepers, 1);
            futex_wait(&pool->gen, seen);
            atomic_fetch_sub(&pool->sleepers, 1);
            spins = 0;
        }
        seen = g;
        if (atomic_load_explicit(&pool->quit, memory_order_acquire)) break;
        pool->fn(pool->arg, w->ith, pool->n);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
    }
    return NULL;
}

cpu_pool_t *cpu_pool_new(int n_threads, fl_error_t *err)
{
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    cpu_pool_t *p = calloc(1, sizeof *p);
    if (!p) {
        fl_fail(err, FL_ENOMEM, "cpu backend: out of memory for the thread pool");
        return NULL;
    }
    p->n = n_threads;
    atomic_init(&p->gen, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->quit, false);
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->workers) {
            free(p);
            fl_fail(err, FL_ENOMEM, "cpu backend: out of memory for %d threads", n_threads);
            return NULL;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        p->workers[i].pool = p;
        p->workers[i].ith = i + 1;
        int rc = pthread_create(&p->workers[i].tid, NULL, worker_main, &p->workers[i]);
        if (rc) {
            p->n = i + 1; /* destroy joins the ones started */
            cpu_pool_destroy(&p);
            fl_fail(err, FL_EBACKEND, "cpu backend: pthread_create failed for thread %d of %d (errno %d)", i + 1,
                    n_threads, rc);
            return NULL;
        }
    }
    return p;
}

void cpu_pool_destroy(cpu_pool_t **pp)
{
    if (!pp || !*pp) return;
    cpu_pool_t *p = *pp;
    atomic_store_explicit(&p->quit, true, memory_order_release);
    atomic_fetch_add(&p->gen, 1);
    futex_wake_all(&p->gen);
    for (int i = 0; i < p->n - 1; i++) pthread_join(p->workers[i].tid, NULL);
    free(p->workers);
    free(p);
    *pp = NULL;
}

int cpu_pool_size(const cpu_pool_t *p) { return p->n; }

uint64_t cpu_pool_dispatches(const cpu_pool_t *p) { return p->dispatches; }

void cpu_pool_run(cpu_pool_t *p, cpu_task_fn fn, void *arg)
{
    if (p->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    p->dispatches++;
    p->fn = fn;
    p->arg = arg;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_fetch_add(&p->gen, 1); /* seq_cst: publishes fn/arg/done before any worker starts */
    if (atomic_load(&p->sleepers) > 0) futex_wake_all(&p->gen);
    fn(arg, 0, p->n);
    /* Join. Yield after a while: on an oversubscribed machine a preempted worker needs our core. */
    for (int spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) != p->n - 1; spins++) {
        if (spins < POOL_JOIN_SPIN) cpu_relax();
        else sched_yield();
    }
}

/* cpu_pool_range: fn over [0, n) cut into one contiguous range per thread. */
typedef struct range_job {
    cpu_range_fn fn;
    void *ctx;
    int64_t n, align;
} range_job_t;

static void range_task(void *arg, int ith, int nth)
{
    const range_job_t *j = arg;
    int64_t per = (j->n + nth - 1) / nth;
    per = (per + j->align - 1) / j->align * j->align;
    const int64_t i0 = (int64_t)ith * per, i1 = i0 + per < j->n ? i0 + per : j->n;
    if (i0 < i1) j->fn(j->ctx, i0, i1);
}

void cpu_pool_range(cpu_pool_t *p, int64_t n, int64_t align, int64_t min_parallel, cpu_range_fn fn, void *ctx)
{
    if (n <= 0) return;
    if (p->n == 1 || n < min_parallel) {
        fn(ctx, 0, n);
        return;
    }
    range_job_t j = {.fn = fn, .ctx = ctx, .n = n, .align = align > 0 ? align : 1};
    cpu_pool_run(p, range_task, &j);
}
