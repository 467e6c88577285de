/* test_cli_cluster.c - cli/cli_cluster.c's supervisor (what `folioctl up` runs) on fake binaries:
 * shell scripts named folio-coordinator and folio-worker in a temporary directory that sleep (or,
 * once told to, exit at once) and record their arguments. A killed worker or coordinator is started
 * again after the minimum delay, with `--restarts N` exactly when the worker's --help lists it; a
 * child that keeps dying is restarted after delays that double; cluster_stop() restarts nothing;
 * `up --spec` and `--heads` reach every worker, and only when given. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli_cluster.h"
#include "clock.h"
#include "log.h"
#include "test_util.h"

static char g_dir[256];
static char g_model[300];

static double now_ms(void)
{
    return fl_clock_s() * 1e3;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

static void write_file(const char *name, const char *text, mode_t mode)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    assert_int_equal(chmod(path, mode), 0);
}

static void set_flag_file(const char *name, bool on)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    if (on)
        write_file(name, "", 0644);
    else
        unlink(path);
}

/* The fake worker: --help lists --restarts when the file has-restarts exists; otherwise it appends
 * its arguments to worker-args and sleeps, or exits 3 at once when the file crash exists. */
static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/folio-test-cli-cluster-%d", (int)getpid());
    assert_int_equal(mkdir(g_dir, 0755), 0);
    write_file("folio-coordinator", "#!/bin/sh\nexec sleep 600\n", 0755);
    write_file("folio-worker",
               "#!/bin/sh\n"
               "d=$(dirname \"$0\")\n"
               "if [ \"$1\" = --help ]; then\n"
               "  echo 'usage: folio-worker [flags]'\n"
               "  [ -f \"$d/has-restarts\" ] && echo '  --restarts N          times its supervisor restarted it'\n"
               "  exit 0\n"
               "fi\n"
               "echo \"$*\" >>\"$d/worker-args\"\n"
               "[ -f \"$d/crash\" ] && exit 3\n"
               "exec sleep 600\n",
               0755);
    write_file("model.gguf", "not read by the fakes", 0644);
    snprintf(g_model, sizeof g_model, "%s/model.gguf", g_dir);
    fl_log_set_level(FL_LOG_OFF);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* A cluster of the fakes; spec and heads (NULL: not given) as `folioctl up --spec --heads` pass them. */
static cluster_t *start_with(int n_groups, const char *spec, const char *heads, const char *spec_tree)
{
    set_flag_file("worker-args", false);
    cluster_opts_t o = {.bin_dir = g_dir,
                        .model = g_model,
                        .n_groups = n_groups,
                        .threads_per_worker = 1,
                        .client_endpoint = "ipc:///tmp/folio-test-cli-cluster.c",
                        .worker_endpoint = "ipc:///tmp/folio-test-cli-cluster.w",
                        .spec = spec,
                        .spec_tree = spec_tree,
                        .heads = heads};
    fl_error_t err = {0};
    cluster_t *c = cluster_start(&o, 0, &err); /* 0: no Health wait (the fakes do not serve) */
    if (!c) fail_msg("cluster_start: %s", err.msg);
    return c;
}

static cluster_t *start(int n_groups)
{
    return start_with(n_groups, NULL, NULL, NULL);
}

/* Supervises until *pid is a running process other than old; returns the ms it took (-1: wait_ms). */
static double supervise_until_new(cluster_t *c, const pid_t *pid, pid_t old, int wait_ms)
{
    const double t0 = now_ms();
    while (now_ms() - t0 < wait_ms) {
        cluster_supervise(c);
        if (*pid > 0 && *pid != old) return now_ms() - t0;
        sleep_ms(10);
    }
    return -1;
}

/* The last line the fake workers wrote. */
static void last_worker_args(char *buf, size_t cap)
{
    char path[512];
    snprintf(path, sizeof path, "%s/worker-args", g_dir);
    char *all = fl_read_file(path, NULL);
    assert_non_null(all);
    size_t n = strlen(all);
    while (n && all[n - 1] == '\n') all[--n] = 0;
    const char *last = strrchr(all, '\n');
    snprintf(buf, cap, "%s", last ? last + 1 : all);
    free(all);
}

static void restart_delay_starts_at_the_minimum_doubles_caps_and_resets_after_a_long_run(void **state)
{
    (void)state;
    assert_int_equal(cluster_restart_delay_ms(0, 10), CLUSTER_RESTART_MIN_MS);
    int d = 0, n = 0;
    for (; d < CLUSTER_RESTART_MAX_MS && n < 20; n++) {
        const int next = cluster_restart_delay_ms(d, 100);
        if (d) assert_int_equal(next, d * 2 > CLUSTER_RESTART_MAX_MS ? CLUSTER_RESTART_MAX_MS : d * 2);
        d = next;
    }
    assert_int_equal(d, CLUSTER_RESTART_MAX_MS);
    assert_true(n < 10); /* 0.5 s doubling reaches 30 s in a few steps */
    assert_int_equal(cluster_restart_delay_ms(CLUSTER_RESTART_MAX_MS, 100), CLUSTER_RESTART_MAX_MS);
    assert_int_equal(cluster_restart_delay_ms(CLUSTER_RESTART_MAX_MS, CLUSTER_RESTART_RESET_MS),
                     CLUSTER_RESTART_MIN_MS);
}

static void workers_get_the_spec_mode_and_heads_file_only_when_given(void **state)
{
    (void)state;
    char args[1024];
    cluster_t *c = start_with(1, "ngram", "/models/m.medusa.gguf", "0;0,0;1");
    sleep_ms(200); /* the fake writes its arguments after its start */
    last_worker_args(args, sizeof args);
    if (!strstr(args, "--spec ngram") || !strstr(args, "--heads /models/m.medusa.gguf") ||
        !strstr(args, "--spec-tree 0;0,0;1"))
        fail_msg("the worker's arguments lack --spec ngram, --heads and --spec-tree: %s", args);
    cluster_stop(&c);
    c = start(1);
    sleep_ms(200);
    last_worker_args(args, sizeof args);
    if (strstr(args, "--spec") || strstr(args, "--heads")) fail_msg("--spec, --spec-tree or --heads passed unasked: %s", args);
    cluster_stop(&c);
}

static void a_killed_worker_is_restarted_with_its_restart_count_when_the_worker_takes_the_flag(void **state)
{
    (void)state;
    for (int has_flag = 0; has_flag < 2; has_flag++) {
        set_flag_file("has-restarts", has_flag);
        cluster_t *c = start(2);
        const pid_t g0 = c->workers[0], g1 = c->workers[1], coord = c->coordinator;
        sleep_ms(100);
        cluster_supervise(c);
        assert_int_equal(c->workers[1], g1); /* nothing to do while all run */
        const double t_kill = now_ms();
        kill(g1, SIGKILL);
        const double took = supervise_until_new(c, &c->workers[1], g1, 5000);
        if (took < 0) fail_msg("the killed worker g1 was not restarted within 5 s");
        if (now_ms() - t_kill < CLUSTER_RESTART_MIN_MS - 10)
            fail_msg("g1 restarted %.0f ms after its death, before the %d ms delay", now_ms() - t_kill,
                     CLUSTER_RESTART_MIN_MS);
        assert_int_equal(c->children[1].restarts, 1);
        assert_int_equal(c->children[0].restarts, 0);
        assert_int_equal(c->workers[0], g0);
        assert_int_equal(c->coordinator, coord);
        assert_int_equal(kill(c->workers[1], 0), 0);
        sleep_ms(200); /* the fake writes its arguments after its start */
        char args[1024];
        last_worker_args(args, sizeof args);
        if (!strstr(args, "--group g1")) fail_msg("the restarted worker's arguments: %s", args);
        if (has_flag && !strstr(args, "--restarts 1")) fail_msg("no --restarts 1 although --help lists it: %s", args);
        if (!has_flag && strstr(args, "--restarts"))
            fail_msg("--restarts passed although --help does not list it: %s", args);

        /* The coordinator too. */
        kill(coord, SIGKILL);
        if (supervise_until_new(c, &c->coordinator, coord, 5000) < 0)
            fail_msg("the killed coordinator was not restarted within 5 s");
        assert_int_equal(c->children[c->n_workers].restarts, 1);
        cluster_stop(&c);
        assert_null(c);
    }
    set_flag_file("has-restarts", false);
}

static void a_worker_that_keeps_dying_is_restarted_after_doubling_delays(void **state)
{
    (void)state;
    cluster_t *c = start(1);
    const pid_t first = c->workers[0];
    set_flag_file("crash", true); /* every restart exits at once */
    kill(first, SIGKILL);
    double at[3] = {0};
    int n = 0;
    pid_t last = first;
    const double t0 = now_ms();
    while (n < 3 && now_ms() - t0 < 10000) {
        cluster_supervise(c);
        if (c->children[0].restarts > (unsigned)n) at[n++] = c->children[0].started_ms;
        if (c->workers[0] > 0) last = c->workers[0];
        sleep_ms(5);
    }
    set_flag_file("crash", false);
    if (n < 3) fail_msg("%d restarts in 10 s; expected 3 (0.5 + 1 + 2 s of delays)", n);
    for (int i = 1; i < 3; i++) {
        const double gap = at[i] - at[i - 1], want = CLUSTER_RESTART_MIN_MS << i;
        if (gap < want - 20 || gap > want + 1000)
            fail_msg("restart %d came %.0f ms after restart %d; expected the delay %.0f ms", i + 1, gap, i, want);
    }
    assert_true(last != first);
    cluster_stop(&c);
}

static void stop_restarts_nothing_and_leaves_no_process(void **state)
{
    (void)state;
    cluster_t *c = start(2);
    const pid_t pids[3] = {c->workers[0], c->workers[1], c->coordinator};
    sleep_ms(200); /* both fakes have written their arguments */
    kill(pids[0], SIGKILL);
    sleep_ms(50);
    cluster_supervise(c); /* reaped; its restart is pending */
    assert_int_equal(c->workers[0], 0);
    assert_true(c->children[0].restart_at_ms > 0);
    cluster_stop(&c);
    sleep_ms(CLUSTER_RESTART_MIN_MS + 100);
    for (int i = 0; i < 3; i++) assert_int_equal(kill(pids[i], 0), -1);
    char path[512];
    snprintf(path, sizeof path, "%s/worker-args", g_dir);
    char *all = fl_read_file(path, NULL);
    int lines = 0;
    for (const char *p = all; p && *p; p++) lines += *p == '\n';
    free(all);
    assert_int_equal(lines, 2); /* the two first starts, no restart */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(restart_delay_starts_at_the_minimum_doubles_caps_and_resets_after_a_long_run),
        cmocka_unit_test(workers_get_the_spec_mode_and_heads_file_only_when_given),
        cmocka_unit_test(a_killed_worker_is_restarted_with_its_restart_count_when_the_worker_takes_the_flag),
        cmocka_unit_test(a_worker_that_keeps_dying_is_restarted_after_doubling_delays),
        cmocka_unit_test(stop_restarts_nothing_and_leaves_no_process),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
