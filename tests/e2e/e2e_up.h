/* e2e_up.h - a real `folioctl up` for the supervisor's end-to-end tests, and a steady load on it
 * (header-only, beside e2e_util.h).
 *
 * - e2e_up_start() runs `folioctl up --groups N` on unique ipc:// endpoints (round-robin routing,
 *   so every healthy group serves), its stdout and stderr in the log folder as up.out and up.err,
 *   and waits until Health reports every group healthy. It dies with the test (PR_SET_PDEATHSIG).
 * - e2e_up_child() finds up's child by its job ("coordinator" or a group name) in /proc: the
 *   supervisor gives a restarted child a new pid.
 * - e2e_load_t keeps a number of Generates in flight on each client, tracked by an e2e_tracker_t,
 *   each tagged with the phase it was sent in (tag = phase * E2E_LOAD_PHASE + n).
 * - A cmocka fixture: the model made once per executable (e2e_up_group_setup/teardown), and per
 *   test one up (e2e_fx.up), one tracker and its clients, all stopped and freed by e2e_up_teardown. */
#ifndef FOLIO_E2E_UP_H
#define FOLIO_E2E_UP_H

#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/prctl.h>

#include "e2e_util.h"

typedef struct e2e_up {
    pid_t pid; /* folioctl up; 0 once it has exited and been reaped */
    int n_groups;
    char ep_client[128], ep_worker[128];
    char log_dir[1024];
} e2e_up_t;

/* Whether `folio-worker --help` mentions word (case-insensitively): a feature the worker has. */
static inline bool e2e_worker_help_mentions(const char *word)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "'%s/folio-worker' --help 2>&1", getenv("FOLIO_BUILD_DIR"));
    FILE *p = popen(cmd, "r");
    if (!p) return false;
    bool found = false;
    char line[512];
    const size_t n = strlen(word);
    while (fgets(line, sizeof line, p))
        for (const char *s = line; !found && *s; s++) found = !strncasecmp(s, word, n);
    pclose(p);
    return found;
}

/* argv of /proc/pid/cmdline, NUL-separated, in buf; returns its length (0: gone). */
static inline size_t e2e_proc_cmdline(pid_t pid, char *buf, size_t cap)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    const ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    return (size_t)n;
}

static inline pid_t e2e_proc_ppid(pid_t pid)
{
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    const ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0) return -1;
    stat[n] = 0;
    const char *p = strrchr(stat, ')'); /* "pid (comm) state ppid ..." */
    int ppid = -1;
    if (!p || sscanf(p + 1, " %*c %d", &ppid) != 1) return -1;
    return (pid_t)ppid;
}

/* Whether the NUL-separated argv holds the word `a`, followed by `b` when b is not NULL. */
static inline bool e2e_argv_has(const char *argv, size_t len, const char *a, const char *b)
{
    for (const char *s = argv; s < argv + len; s += strlen(s) + 1) {
        if (strcmp(s, a)) continue;
        const char *next = s + strlen(s) + 1;
        if (!b || (next < argv + len && !strcmp(next, b))) return true;
    }
    return false;
}

/* A live (not zombie) process of up's: who = "coordinator" or a group's name; 0 when none. */
static inline pid_t e2e_up_child(const e2e_up_t *u, const char *who)
{
    DIR *d = opendir("/proc");
    if (!d) return 0;
    pid_t found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        const pid_t pid = (pid_t)atoi(e->d_name);
        if (e2e_proc_ppid(pid) != u->pid) continue;
        char argv[4096];
        const size_t n = e2e_proc_cmdline(pid, argv, sizeof argv); /* a zombie has none */
        if (!n) continue;
        const char *slash = strrchr(argv, '/'), *exe = slash ? slash + 1 : argv;
        if (!strcmp(who, "coordinator") ? !strcmp(exe, "folio-coordinator")
                                        : !strcmp(exe, "folio-worker") && e2e_argv_has(argv, n, "--group", who))
            found = pid;
    }
    closedir(d);
    return found;
}

/* Every process whose arguments name this cluster's worker endpoint (left over after up exits). */
static inline int e2e_up_leftovers(const e2e_up_t *u)
{
    DIR *d = opendir("/proc");
    if (!d) return 0;
    int n_left = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        char argv[4096];
        const size_t n = e2e_proc_cmdline((pid_t)atoi(e->d_name), argv, sizeof argv);
        if (n && (e2e_argv_has(argv, n, u->ep_worker, NULL))) {
            fprintf(stderr, "[e2e] left over: pid %s %s\n", e->d_name, argv);
            n_left++;
        }
    }
    closedir(d);
    return n_left;
}

/* Waits for up's child `who` with a pid other than old; returns it (0 after wait_ms). */
static inline pid_t e2e_up_wait_child(const e2e_up_t *u, const char *who, pid_t old, int wait_ms)
{
    const double t0 = e2e_now_ms();
    for (;;) {
        const pid_t p = e2e_up_child(u, who);
        if (p > 0 && p != old) return p;
        if (e2e_now_ms() - t0 > wait_ms) return 0;
        e2e_sleep_ms(20);
    }
}

/* Reaps up if it has exited; returns its wait status, or -1 while it runs. */
static inline int e2e_up_reap(e2e_up_t *u, int flags)
{
    if (u->pid <= 0) return -1;
    int st = 0;
    const pid_t r = waitpid(u->pid, &st, flags);
    if (r != u->pid) return -1;
    u->pid = 0;
    return st;
}

/* Whether a line of the file holds text. */
static inline bool e2e_file_has(const char *path, const char *text)
{
    FILE *f = fopen(path, "r");
    if (!f) return false;
    bool found = false;
    char line[1024];
    while (!found && fgets(line, sizeof line, f)) found = strstr(line, text) != NULL;
    fclose(f);
    return found;
}

/* Whether up's stderr holds text. */
static inline bool e2e_up_log_has(const e2e_up_t *u, const char *text)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/up.err", u->log_dir);
    return e2e_file_has(path, text);
}

static inline void e2e_up_start(e2e_up_t *u, e2e_env_t *env, const char *name, int n_groups)
{
    memset(u, 0, sizeof *u);
    e2e_next_endpoints(env, name);
    u->n_groups = n_groups;
    snprintf(u->ep_client, sizeof u->ep_client, "%s", env->ep_client);
    snprintf(u->ep_worker, sizeof u->ep_worker, "%s", env->ep_worker);
    snprintf(u->log_dir, sizeof u->log_dir, "%s", env->log_dir);
    mkdir(u->log_dir, 0755);
    char ctl[1024], groups[16], out[1100], err[1100];
    snprintf(ctl, sizeof ctl, "%s/folioctl", getenv("FOLIO_BUILD_DIR"));
    snprintf(groups, sizeof groups, "%d", n_groups);
    snprintf(out, sizeof out, "%s/up.out", u->log_dir);
    snprintf(err, sizeof err, "%s/up.err", u->log_dir);
    const pid_t parent = getpid();
    fflush(NULL);
    const pid_t pid = fork();
    if (pid < 0) fail_msg("fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(1);
        const int fo = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644),
                  fe = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo >= 0) dup2(fo, STDOUT_FILENO);
        if (fe >= 0) dup2(fe, STDERR_FILENO);
        setenv("FOLIO_LOG", "info", 1);
        execl(ctl, ctl, "up", "--groups", groups, "-m", env->model, "--listen", u->ep_client, "--workers", u->ep_worker,
              "--threads-per-worker", "1", "--heartbeat-ms", "200", "--policy", "round-robin", "--log-dir", u->log_dir,
              "--no-http", (char *)NULL);
        _exit(127);
    }
    u->pid = pid;
    /* Serving, and up past its start (it prints this line once it supervises). */
    char banner[64];
    snprintf(banner, sizeof banner, "folio cluster up: %d group", n_groups);
    fl_error_t e = {0};
    folio_client_t *c = folio_client_new(u->ep_client, &e);
    if (!c) fail_msg("folio_client_new(%s): %s", u->ep_client, e.msg);
    const double t0 = e2e_now_ms();
    int healthy = -1;
    while ((healthy = e2e_healthy_groups(c, NULL)) < n_groups || !e2e_file_has(out, banner)) {
        const int st = e2e_up_reap(u, WNOHANG);
        if (st >= 0) fail_msg("folioctl up exited (wait status %d) before serving; see %s/up.err", st, u->log_dir);
        if (e2e_now_ms() - t0 > e2e_ms(30000))
            fail_msg("folioctl up: %d of %d groups healthy after %d ms; see %s", healthy, n_groups, e2e_ms(30000),
                     u->log_dir);
        e2e_sleep_ms(100);
    }
    folio_client_destroy(&c);
    fprintf(stderr, "[e2e] %s: folioctl up (pid %d) serving %d groups in %.0f ms at %s (logs %s)\n", name, (int)pid,
            n_groups, e2e_now_ms() - t0, u->ep_client, u->log_dir);
}

/* SIGTERM to up; returns its wait status once it has exited (-1: still running after wait_ms, and
 * then it is killed). */
static inline int e2e_up_stop(e2e_up_t *u, int wait_ms)
{
    if (u->pid <= 0) return -1;
    kill(u->pid, SIGTERM);
    const double t0 = e2e_now_ms();
    int st;
    while ((st = e2e_up_reap(u, WNOHANG)) < 0) {
        if (e2e_now_ms() - t0 > wait_ms) {
            kill(u->pid, SIGKILL);
            e2e_up_reap(u, 0);
            return -1;
        }
        e2e_sleep_ms(20);
    }
    return st;
}

/* For a teardown: up stopped, whatever state the test left it in, and its ipc files removed. */
static inline void e2e_up_cleanup(e2e_up_t *u)
{
    if (u->pid > 0 && e2e_up_stop(u, e2e_ms(15000)) < 0) fprintf(stderr, "[e2e] folioctl up ignored SIGTERM\n");
    const char *eps[2] = {u->ep_client, u->ep_worker};
    for (int i = 0; i < 2; i++)
        if (!strncmp(eps[i], "ipc://", 6)) unlink(eps[i] + 6);
}

/* ---- a steady load --------------------------------------------------------------------------- */

#define E2E_LOAD_PHASE 100000

typedef struct e2e_load {
    e2e_tracker_t *t;
    folio_client_t **cl;
    int n_clients;
    int per_client; /* Generates kept in flight on each client */
    int max_tokens;
    int phase; /* the tag's phase for requests sent from now on */
    int sent;
} e2e_load_t;

/* Sends one more Generate on client c (a prompt of 8 to 47 tokens, distinct per request). */
static inline e2e_req_t *e2e_load_send(e2e_load_t *l, int c)
{
    int32_t prompt[48];
    const int n = 8 + l->sent % 40;
    e2e_prompt_tokens(7000 + (uint32_t)l->sent, n, prompt);
    folio_generate_params_t p = {
        .tokens = prompt, .n_tokens = n, .max_tokens = l->max_tokens, .ignore_eos = true, .stream = true};
    return e2e_send_generate(l->t, c, l->cl[c], &p, l->phase * E2E_LOAD_PHASE + l->sent++);
}

/* Tops every client up to per_client requests in flight, then reads replies, for ms. */
static inline void e2e_load_run(e2e_load_t *l, int ms)
{
    const double deadline = e2e_now_ms() + ms;
    do {
        int pending[64] = {0};
        for (int i = 0; i < l->t->n; i++)
            if (!l->t->reqs[i].final && l->t->reqs[i].client < 64) pending[l->t->reqs[i].client]++;
        for (int c = 0; c < l->n_clients; c++)
            for (; pending[c] < l->per_client; pending[c]++) e2e_load_send(l, c);
        e2e_pump_ex(l->t, l->cl, l->n_clients, 20, false);
    } while (e2e_now_ms() < deadline);
}

/* The phase a tracked request was sent in. */
static inline int e2e_load_phase(const e2e_req_t *r)
{
    return r->tag / E2E_LOAD_PHASE;
}

/* Runs the load while polling Status until group name is healthy; the ms it took, or -1. */
static inline double e2e_load_until_healthy(e2e_load_t *l, folio_client_t *ctl, const char *name, int wait_ms)
{
    const double t0 = e2e_now_ms();
    for (;;) {
        e2e_load_run(l, 100);
        Folio__V1__Response *r = NULL;
        fl_error_t err = {0};
        if (folio_client_status(ctl, 2000, &r, &err) == 0) {
            const Folio__V1__GroupStatus *g = e2e_group(r, name);
            const bool ok = g && g->healthy;
            folio__v1__response__free_unpacked(r, NULL);
            if (ok) return e2e_now_ms() - t0;
        }
        if (e2e_now_ms() - t0 > wait_ms) return -1;
    }
}

/* ---- the fixture ----------------------------------------------------------------------------- */

static struct {
    e2e_env_t env;
    e2e_up_t up;
    e2e_tracker_t tr;
    folio_client_t *clients[16];
    int n_clients;
} e2e_fx;

static inline folio_client_t *e2e_up_client(void)
{
    assert_true(e2e_fx.n_clients < 16);
    fl_error_t err = {0};
    folio_client_t *c = folio_client_new(e2e_fx.up.ep_client, &err);
    if (!c) fail_msg("folio_client_new(%s): %s", e2e_fx.up.ep_client, err.msg);
    return e2e_fx.clients[e2e_fx.n_clients++] = c;
}

static inline int e2e_up_group_setup(void **state)
{
    (void)state;
    const char *b = getenv("FOLIO_BUILD_DIR");
    char dir[400];
    snprintf(dir, sizeof dir, "%s/Testing", b && *b ? b : "/tmp");
    mkdir(dir, 0755);
    snprintf(e2e_fx.env.model, sizeof e2e_fx.env.model, "%s/e2e-up-%d.gguf", dir, (int)getpid());
    return e2e_make_model(e2e_fx.env.model);
}

static inline int e2e_up_group_teardown(void **state)
{
    (void)state;
    unlink(e2e_fx.env.model);
    return 0;
}

static inline int e2e_up_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < e2e_fx.n_clients; i++) folio_client_destroy(&e2e_fx.clients[i]);
    e2e_fx.n_clients = 0;
    e2e_up_cleanup(&e2e_fx.up);
    e2e_tracker_free(&e2e_fx.tr);
    return 0;
}

#endif
