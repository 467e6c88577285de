/* bench_spec.c - `folio-bench spec`: what speculative decoding buys, and what it costs.
 *
 * 1. Verify cost: one forward step that feeds k = 1, 2, 4, 8, 16 tokens of one sequence at
 *    consecutive positions after a context of --verify-context tokens, with logits (and a greedy
 *    pick) for every token, as the scheduler's verify step does for a chain of k - 1 draft tokens
 *    plus the last accepted one, over the time of a 1-token step at the same context. The step goes
 *    straight to model_forward on a sequence whose blocks come from the engine's KV cache; each
 *    round times every size once, starting from a different size each round, so noise on this
 *    shared machine falls on all sizes alike; medians and bests over the rounds.
 * 2. Workloads: (a) long outputs from a small token set and (b) open-ended chat (spec_prompts.c),
 *    chat template applied, greedy, through the scheduler at each --batches size B: max(prompts, B)
 *    requests (prompts reused round-robin) in waves of B, each wave run with no speculation, n-gram
 *    drafts and Medusa heads back to back, so the machine's other load falls on all three alike.
 *    Tokens/s is generated tokens over the waves' wall time, from submission to the last token
 *    (prompt processing included); "decode" counts only the steps without a prompt chunk. Accepted
 *    tokens per step is 1 + accepted / (sequence, step) verifications that carried a draft;
 *    speed-up is over no speculation at the same batch. Lossless check: every request's tokens
 *    must equal those of the same prompt's first run without speculation (in the first batch
 *    size), token for token; any difference makes the exit status 1.
 * 3. Constrained workloads: (c) labels for a 40-line list, the answer's numbered format a regex, and
 *    (d) JSON records against a JSON Schema (spec_prompts.c builds prompt, constraint and check from
 *    one task). Each wave also runs every drafter with the constraint, after the same drafters
 *    without it; speed-ups of constrained rows are over the constraint without speculation, and
 *    their references (the lossless check) are the constrained runs without speculation. Every
 *    complete output is checked apart from folio's compiler (spec_output_valid: POSIX regex, cJSON);
 *    a constrained one that does not match makes the exit status 1. Before the timed waves each
 *    scheduler runs every constrained prompt once, untimed, so that no timed run pays for compiling
 *    its constraint or the first use of its token masks; the compile time, the masks' warm-up and
 *    the memory are measured apart on a copy compiled here.
 *
 * Medusa heads: the engine's (--heads FILE, or the default file beside the model); when there are
 * none the benchmark trains them once with the folio-medusa-train beside this binary (-m MODEL),
 * unless --no-medusa or --quick. The prefix cache is off by default so every drafter's run pays
 * the same prompt processing (--prefix-cache turns it on). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "clock.h"
#include "engine.h"
#include "flags.h"
#include "log.h"
#include "medusa.h"
#include "scheduler.h"
#include "spec_prompts.h"

#define MAX_BATCHES 8
#define MAX_REPEAT 20
static const int verify_sizes[] = {1, 2, 4, 8, 16};
#define N_VERIFY_SIZES ((int)(sizeof verify_sizes / sizeof verify_sizes[0]))

/* auto: what a request gets by default (GenerateRequest.spec unset): an n-gram match where the
 * output copies its context, Medusa's tree elsewhere. */
typedef enum { DRAFTER_NONE, DRAFTER_NGRAM, DRAFTER_MEDUSA, DRAFTER_AUTO, DRAFTER_COUNT } drafter_t;
static const char *const drafter_names[DRAFTER_COUNT] = {"none", "ngram", "medusa", "auto"};
static const sched_spec_t drafter_spec[DRAFTER_COUNT] = {SCHED_SPEC_NONE, SCHED_SPEC_NGRAM, SCHED_SPEC_MEDUSA,
                                                         SCHED_SPEC_AUTO};

typedef struct verify_row {
    int tokens;
    double median_s, best_s;
} verify_row_t;

/* A request's completion: its tokens and how it ended. */
typedef struct completion {
    int32_t *tokens; /* [max_tokens] */
    int n;
    sched_finish_t finish;
} completion_t;

typedef struct workload {
    spec_workload_t w;
    int n_prompts;
    int32_t **ids; /* [n_prompts] the chat-templated prompts */
    int *n_ids;
    int *number;          /* [n_prompts] index in spec_prompts (prompts that do not fit are left out) */
    completion_t *ref[2]; /* [without, with the constraint][n_prompts] first run without speculation */
    bool *have_ref[2];
    sched_constraint_t *cons; /* [n_prompts] kind 0 for workloads without constraints */
    double compile_s, warm_s; /* constrained: compiling every prompt's constraint, and computing the */
    size_t cons_bytes;        /* masks its reference output needs; the largest memory of one */
} workload_t;

/* One (workload, batch, drafter) figure, summed over its waves and --repeat passes. */
typedef struct row {
    spec_workload_t w;
    int batch;
    drafter_t d;
    bool constrained; /* the requests carried their prompt's constraint */
    int requests;
    uint64_t generated;
    double wall_s;
    uint64_t decode_generated; /* in steps without prompt chunks ... */
    double decode_s;           /* ... and their wall time */
    uint64_t drafted, accepted, spec_seq_steps;
    int differ; /* requests whose tokens differ from the reference, over all repeats */
    int first_differ_prompt, first_differ_at;
    int checked, valid, cut; /* constrained workloads: outputs checked, those matching, those cut at max tokens */
    char first_invalid[200];
    bool ran;
} row_t;

/* What the scheduler's callbacks fill during a run. */
typedef struct collect {
    completion_t *out; /* [requests], by id - 1 */
    int n_out, max_tokens;
    int errors;
    char error[256];
} collect_t;

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static int32_t random_token(uint32_t *seed, int vocab)
{
    const int first = vocab > 512 ? 256 : 0; /* past the special tokens of most vocabularies */
    return first + (int32_t)(lcg(seed) % (uint32_t)(vocab - first));
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- 1. verify cost ---- */

/* One step of the tokens [0, n) at positions ctx.. of the sequence in table, logits and a greedy pick
 * for each; returns its duration or a negative FL_E* code. */
static double verify_step(model_t *m, kv_cache_t *kv, const int32_t *table, int ctx, int n, uint32_t *seed,
                          fl_error_t *err)
{
    int32_t tokens[16], pos[16], seq[16], rows[16], out[16];
    kern_sampling_t greedy[16];
    for (int j = 0; j < n; j++) {
        tokens[j] = random_token(seed, m->cfg.n_vocab);
        pos[j] = ctx + j;
        seq[j] = 0;
        rows[j] = j;
        greedy[j] = (kern_sampling_t){.temperature = 0, .top_p = 1};
    }
    const model_batch_t b = {.n_tokens = n, .tokens = tokens, .pos = pos, .seq = seq, .block_tables = table,
                             .n_seqs = 1, .prompt_len = &ctx, .logit_rows = rows, .n_logits = n};
    const double t0 = fl_clock_s();
    const int rc = model_forward(m, kv, &b, err);
    if (rc) return rc;
    model_sample(m, out, n, greedy);
    const double dt = fl_clock_s() - t0;
    return dt > 0 ? dt : 1e-9;
}

/* Fills rows[] for the sizes that fit the model's buffers; returns how many, or a negative code. */
static int measure_verify(engine_t *e, int ctx, int rounds, verify_row_t *rows, fl_error_t *err)
{
    model_t *m = e->model;
    int sizes[N_VERIFY_SIZES], n_sizes = 0;
    for (int i = 0; i < N_VERIFY_SIZES; i++)
        if (verify_sizes[i] <= m->max_logits && verify_sizes[i] <= m->max_batch_tokens)
            sizes[n_sizes++] = verify_sizes[i];
    const int last = sizes[n_sizes - 1];
    if (ctx + last > m->max_blocks * e->kv->block_size)
        return fl_fail(err, FL_EINVAL, "--verify-context %d: context + %d tokens exceed the model's %d", ctx, last,
                       m->max_blocks * e->kv->block_size);
    kv_seq_t s;
    int32_t *table = calloc((size_t)m->max_blocks, sizeof *table);
    double *t = malloc((size_t)n_sizes * (size_t)rounds * sizeof *t);
    int32_t *prompt = malloc((size_t)m->max_batch_tokens * sizeof *prompt), *pos = NULL, *seq = NULL;
    pos = malloc((size_t)m->max_batch_tokens * sizeof *pos);
    seq = calloc((size_t)m->max_batch_tokens, sizeof *seq);
    int rc = kv_seq_init(&s, m->max_blocks);
    if (rc || !table || !t || !prompt || !pos || !seq) {
        rc = fl_fail(err, FL_ENOMEM, "bench: out of memory");
        goto out;
    }
    if ((rc = kv_seq_reserve(e->kv, &s, ctx + last))) {
        fl_fail(err, rc, "bench: the KV cache has no room for %d tokens", ctx + last);
        goto out;
    }
    memcpy(table, s.blocks, (size_t)m->max_blocks * sizeof *table);
    /* The context, as a prompt, in chunks the model takes. */
    uint32_t seed = 4321;
    for (int at = 0; at < ctx;) {
        const int n = ctx - at < m->max_batch_tokens ? ctx - at : m->max_batch_tokens;
        for (int j = 0; j < n; j++) prompt[j] = random_token(&seed, m->cfg.n_vocab), pos[j] = at + j;
        const int32_t row = n - 1;
        const model_batch_t b = {.n_tokens = n, .tokens = prompt, .pos = pos, .seq = seq, .block_tables = table,
                                 .n_seqs = 1, .prompt_len = &ctx, .logit_rows = &row, .n_logits = 1};
        if ((rc = model_forward(m, e->kv, &b, err))) goto out;
        at += n;
    }
    /* Round -1 warms up. Each round starts at another size, so each size is timed as often first,
     * second, ... after the others. */
    for (int r = -1; r < rounds; r++) {
        for (int k = 0; k < n_sizes; k++) {
            const int i = (k + (r < 0 ? 0 : r)) % n_sizes;
            const double dt = verify_step(m, e->kv, table, ctx, sizes[i], &seed, err);
            if (dt < 0) {
                rc = (int)dt;
                goto out;
            }
            if (r >= 0) t[(size_t)i * rounds + r] = dt;
        }
    }
    for (int i = 0; i < n_sizes; i++) {
        double *ti = t + (size_t)i * rounds;
        rows[i].tokens = sizes[i];
        rows[i].median_s = median(ti, rounds);
        rows[i].best_s = ti[0]; /* sorted by median() */
    }
    rc = n_sizes;
out:
    kv_seq_free(e->kv, &s);
    free(table);
    free(t);
    free(prompt);
    free(pos);
    free(seq);
    return rc;
}

/* ---- 2. workloads ---- */

static bool on_token(void *user, uint64_t id, int index, int32_t token, const sched_logprobs_t *lp)
{
    (void)lp;
    collect_t *c = user;
    if (id >= 1 && (int)id <= c->n_out && index < c->max_tokens) {
        completion_t *o = &c->out[id - 1];
        o->tokens[index] = token;
        if (index + 1 > o->n) o->n = index + 1;
    }
    return false;
}

static void on_finish(void *user, const sched_result_t *r)
{
    collect_t *c = user;
    if (r->id < 1 || (int)r->id > c->n_out) return;
    c->out[r->id - 1].finish = r->finish;
    if (r->finish == SCHED_FINISH_ERROR && c->errors++ == 0)
        snprintf(c->error, sizeof c->error, "request %d: %.200s", (int)r->id, r->error);
}

/* Runs requests first .. first + count - 1 of wl (prompt i % n_prompts for request i) through s,
 * all with drafter d and with their constraints or not, and adds the figures (the scheduler's
 * counters before and after) to row; c gets their completions. */
static int run_wave(sched_t *s, const workload_t *wl, int first, int count, drafter_t d, bool constrained,
                    int max_tokens, collect_t *c, row_t *row, fl_error_t *err)
{
    c->n_out = count;
    c->errors = 0;
    for (int i = 0; i < count; i++) c->out[i].n = 0, c->out[i].finish = 0;
    sched_stats_t st0, st;
    sched_get_stats(s, &st0);
    int rc = 0;
    const double t0 = fl_clock_s();
    for (int i = 0; i < count && !rc; i++) {
        const int p = (first + i) % wl->n_prompts;
        const sched_request_t r = {.id = (uint64_t)i + 1, .prompt = wl->ids[p], .n_prompt = wl->n_ids[p],
                                   .max_tokens = max_tokens, .sampling = {.temperature = 0, .top_p = 1},
                                   .spec = drafter_spec[d],
                                   .constraint = constrained ? wl->cons[p] : (sched_constraint_t){0}};
        rc = sched_submit(s, &r, err);
    }
    /* Steps that carried no prompt chunk, timed here (drafting and verification with everything
     * around them), and the tokens they generated: decoding's own rate, without prompt processing. */
    sched_stats_t before = st0;
    while (!rc && sched_has_work(s)) {
        const double ts = fl_clock_s();
        rc = sched_step(s, err);
        const double dt = fl_clock_s() - ts;
        sched_get_stats(s, &st);
        if (st.prefill_tokens == before.prefill_tokens) {
            row->decode_s += dt;
            row->decode_generated += st.generated_tokens - before.generated_tokens;
        }
        before = st;
    }
    const double wall = fl_clock_s() - t0;
    sched_get_stats(s, &st);
    if (rc) {
        sched_cancel_all(s);
        return rc;
    }
    if (c->errors) return fl_fail(err, FL_EBACKEND, "bench: %d requests failed; %s", c->errors, c->error);
    row->requests += count;
    row->generated += st.generated_tokens - st0.generated_tokens;
    row->wall_s += wall;
    row->drafted += st.drafted_tokens - st0.drafted_tokens;
    row->accepted += st.accepted_tokens - st0.accepted_tokens;
    row->spec_seq_steps += st.spec_seq_steps - st0.spec_seq_steps;
    return 0;
}

static bool same_completion(const completion_t *a, const completion_t *b, int *at)
{
    const int n = a->n < b->n ? a->n : b->n;
    for (*at = 0; *at < n; (*at)++)
        if (a->tokens[*at] != b->tokens[*at]) return false;
    return a->n == b->n && a->finish == b->finish;
}

/* Whether a constrained workload's completion matches its prompt's constraint (row's counts); one
 * cut at max tokens is counted apart, unchecked. */
static void check_valid(const workload_t *wl, int p, const completion_t *got, const tok_t *tok, row_t *row)
{
    if (got->finish == SCHED_FINISH_LENGTH) {
        row->cut++;
        return;
    }
    const size_t cap = (size_t)got->n * tok_max_token_len(tok) + 1;
    char *text = malloc(cap), why[160] = "out of memory";
    const int len = text ? tok_decode(tok, got->tokens, got->n, false, text, cap) : -1;
    row->checked++;
    if (len >= 0 && (size_t)len < cap) {
        text[len] = 0;
        if (spec_output_valid(wl->w, wl->number[p], text, why, sizeof why)) row->valid++, why[0] = 0;
    }
    if (why[0] && !row->first_invalid[0])
        snprintf(row->first_invalid, sizeof row->first_invalid, "prompt %d: %s", wl->number[p], why);
    free(text);
}

/* Compares a wave's completions with the references (the first run of a prompt without speculation
 * sets its reference, apart for the runs with and without constraints), and checks the outputs of
 * constrained workloads against their constraints. */
static void check_wave(workload_t *wl, const collect_t *c, int first, drafter_t d, bool constrained, int max_tokens,
                       const tok_t *tok, row_t *row)
{
    for (int i = 0; i < c->n_out; i++) {
        const int p = (first + i) % wl->n_prompts;
        const completion_t *got = &c->out[i];
        if (spec_workload_constrained(wl->w)) check_valid(wl, p, got, tok, row);
        if (!wl->have_ref[constrained][p] && d == DRAFTER_NONE) {
            completion_t *ref = &wl->ref[constrained][p];
            memcpy(ref->tokens, got->tokens, (size_t)max_tokens * sizeof *got->tokens);
            ref->n = got->n;
            ref->finish = got->finish;
            wl->have_ref[constrained][p] = true;
            continue;
        }
        int at;
        if (!wl->have_ref[constrained][p] || same_completion(got, &wl->ref[constrained][p], &at)) continue;
        if (row->differ++ == 0) row->first_differ_prompt = wl->number[p], row->first_differ_at = at;
    }
}

static double row_tok_s(const row_t *r) { return r->wall_s > 0 ? (double)r->generated / r->wall_s : 0; }
static double row_decode_tok_s(const row_t *r)
{
    return r->decode_s > 0 ? (double)r->decode_generated / r->decode_s : 0;
}
static double row_accept_len(const row_t *r)
{
    return r->spec_seq_steps ? 1.0 + (double)r->accepted / (double)r->spec_seq_steps : 1.0;
}

/* Tokenizes the workload's prompts with the chat template (raw text when the model has none), with
 * their constraints where the workload has them; prompts that leave no room for max_tokens in the
 * context are left out with a note. */
static int workload_init(workload_t *wl, spec_workload_t w, int limit, const model_t *m, int ctx, int max_tokens,
                         fl_error_t *err)
{
    const int total = spec_prompt_count(w);
    const int n = limit > 0 && limit < total ? limit : total;
    *wl = (workload_t){.w = w};
    wl->ids = calloc((size_t)n, sizeof *wl->ids);
    wl->n_ids = calloc((size_t)n, sizeof *wl->n_ids);
    wl->number = calloc((size_t)n, sizeof *wl->number);
    wl->cons = calloc((size_t)n, sizeof *wl->cons);
    for (int c = 0; c < 2; c++) {
        wl->ref[c] = calloc((size_t)n, sizeof *wl->ref[c]);
        wl->have_ref[c] = calloc((size_t)n, sizeof *wl->have_ref[c]);
        if (!wl->ref[c] || !wl->have_ref[c]) return fl_fail(err, FL_ENOMEM, "bench: out of memory");
    }
    if (!wl->ids || !wl->n_ids || !wl->number || !wl->cons) return fl_fail(err, FL_ENOMEM, "bench: out of memory");
    const bool chat = tok_chat_supported(m->tok, NULL) == 0;
    for (int i = 0; i < n; i++) {
        char *text = spec_prompt_text(w, i);
        if (!text) return fl_fail(err, FL_ENOMEM, "bench: out of memory");
        const tok_chat_msg_t msg = {"user", text};
        int32_t *ids = NULL;
        int cap = 0;
        const int len = tok_encode_prompt(m->tok, text, strlen(text), false, chat ? &msg : NULL, chat ? 1 : 0, &ids,
                                          &cap, err);
        free(text);
        if (len < 0) return len;
        if (len + max_tokens > ctx) {
            fprintf(stderr, "note: %s prompt %d (%d tokens) leaves no room for %d tokens in the %d-token context; "
                            "left out\n", spec_workload_name(w), i, len, max_tokens, ctx);
            free(ids);
            continue;
        }
        const int k = wl->n_prompts++;
        wl->ids[k] = ids;
        wl->n_ids[k] = len;
        wl->number[k] = i;
        for (int c = 0; c < 2; c++)
            if (!(wl->ref[c][k].tokens = malloc((size_t)max_tokens * sizeof(int32_t))))
                return fl_fail(err, FL_ENOMEM, "bench: out of memory");
        if (spec_workload_constrained(w)) {
            char *cons = NULL;
            if (spec_prompt_constraint(w, i, &wl->cons[k].kind, &cons))
                return fl_fail(err, FL_ENOMEM, "bench: out of memory");
            wl->cons[k].text = cons;
        }
    }
    if (!chat) fprintf(stderr, "note: the model has no chat template this benchmark can apply; raw prompts\n");
    return 0;
}

static int workload_tokens(const workload_t *wl)
{
    int n = 0;
    for (int i = 0; i < wl->n_prompts; i++) n += wl->n_ids[i];
    return n;
}

static void workload_free(workload_t *wl)
{
    for (int i = 0; i < wl->n_prompts; i++) {
        free(wl->ids[i]);
        free((char *)wl->cons[i].text);
        for (int c = 0; c < 2; c++) free(wl->ref[c][i].tokens);
    }
    free(wl->ids);
    free(wl->n_ids);
    free(wl->number);
    free(wl->cons);
    for (int c = 0; c < 2; c++) free(wl->ref[c]), free(wl->have_ref[c]);
}

/* ---- constraints ---- */

/* Compiles each prompt's constraint of wl again, apart from the schedulers, through a cache of its
 * own (which indexes the vocabulary once, as a scheduler's does: *index_s), and walks its reference
 * output (the constrained run without speculation) asking for the mask of every state on the way,
 * as decoding does: the largest compile time, mask warm-up and memory of one constraint. */
static int cons_measure(workload_t *wl, const tok_t *tok, double *index_s, fl_error_t *err)
{
    const double t = fl_clock_s();
    fl_constraint_cache_t *cache = fl_constraint_cache_new(tok, wl->n_prompts, 0, NULL, err);
    if (!cache) return err->code;
    *index_s = fl_clock_s() - t;
    for (int i = 0; i < wl->n_prompts; i++) {
        const sched_constraint_t *r = &wl->cons[i];
        const double t0 = fl_clock_s();
        fl_constraint_t *c = fl_constraint_cache_get(cache, r->kind, r->text, NULL, 0, err);
        if (!c) {
            fl_constraint_cache_destroy(&cache);
            return err->code;
        }
        const double t1 = fl_clock_s();
        int32_t st = fl_constraint_start(c);
        const completion_t *ref = &wl->ref[1][i];
        for (int k = 0; wl->have_ref[1][i] && k <= ref->n && st != FL_CSTATE_DEAD; k++) {
            fl_constraint_mask(c, st);
            if (k < ref->n) st = fl_constraint_next(c, st, ref->tokens[k]);
        }
        const double t2 = fl_clock_s();
        if (t1 - t0 > wl->compile_s) wl->compile_s = t1 - t0;
        if (t2 - t1 > wl->warm_s) wl->warm_s = t2 - t1;
        if (fl_constraint_bytes(c) > wl->cons_bytes) wl->cons_bytes = fl_constraint_bytes(c);
        fl_constraint_free(&c);
    }
    fl_constraint_cache_destroy(&cache);
    return 0;
}

/* ---- Medusa heads ---- */

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Runs the folio-medusa-train next to this executable on the model (its default flags: it writes
 * the default heads file). Its output goes to stderr, so stdout keeps the tables. */
static int train_heads(const char *model_path, fl_error_t *err)
{
    char self[PATH_MAX], trainer[PATH_MAX + 32];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return fl_fail(err, FL_EIO, "bench: cannot find this executable: %s", strerror(errno));
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (slash) *slash = 0;
    snprintf(trainer, sizeof trainer, "%s/folio-medusa-train", self);
    if (access(trainer, X_OK)) return fl_fail(err, FL_ENOTFOUND, "bench: %s: %s", trainer, strerror(errno));
    fprintf(stderr, "bench spec: no Medusa heads for %s; training them once: %s -m %s\n", model_path, trainer,
            model_path);
    fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0) return fl_fail(err, FL_EIO, "bench: fork: %s", strerror(errno));
    if (pid == 0) {
        dup2(STDERR_FILENO, STDOUT_FILENO);
        execl(trainer, trainer, "-m", model_path, (char *)NULL);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return fl_fail(err, FL_EIO, "bench: waitpid: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status))
        return fl_fail(err, FL_EIO, "bench: %s -m %s failed (status %d)", trainer, model_path, status);
    return 0;
}

/* ---- report ---- */

static void print_verify(const verify_row_t *v, int n, int ctx, int rounds)
{
    printf("verify cost: one sequence, %d tokens of context, k tokens at once with logits for each, %d rounds "
           "(sizes interleaved)\n", ctx, rounds);
    printf("%8s %11s %9s %14s %12s %12s\n", "tokens", "median ms", "best ms", "median / k=1", "best / k=1",
           "tok/s (med)");
    for (int i = 0; i < n; i++)
        printf("%8d %11.2f %9.2f %13.2fx %11.2fx %12.1f\n", v[i].tokens, v[i].median_s * 1e3, v[i].best_s * 1e3,
               v[i].median_s / v[0].median_s, v[i].best_s / v[0].best_s, v[i].tokens / v[i].median_s);
    for (int i = 0; i < n; i++)
        if (v[i].tokens == 8)
            printf("goal: a step of 8 tokens <= 2x a 1-token step (aim 1.6x): %.2fx (median), %.2fx (best)\n",
                   v[i].median_s / v[0].median_s, v[i].best_s / v[0].best_s);
}

/* The server's own decode steps over every run at batch 1: their time by size (forward and sampling,
 * Medusa's heads apart), what a verify of k tokens cost beside a plain step as the runs went. */
static void print_server_steps(const sched_stats_t *st)
{
    if (!st->steps_by_size[1]) return;
    const double one = st->s_by_size[1] / (double)st->steps_by_size[1];
    printf("\nbatch-1 decode steps of the runs above, by tokens (forward and sampling; the Medusa heads took %.2f s "
           "apart, %llu epochs on, %llu off):\n",
           st->heads_s, (unsigned long long)st->heads_epochs_on, (unsigned long long)st->heads_epochs_off);
    printf("%8s %8s %9s %9s\n", "tokens", "steps", "mean ms", "/ 1 token");
    for (int k = 1; k < SCHED_STEP_SIZES; k++) {
        if (!st->steps_by_size[k]) continue;
        const double mean = st->s_by_size[k] / (double)st->steps_by_size[k];
        printf("%7d%s %8llu %9.2f %8.2fx\n", k, k == SCHED_STEP_SIZES - 1 ? "+" : " ",
               (unsigned long long)st->steps_by_size[k], mean * 1e3, mean / one);
    }
}

static const row_t *find_row(const row_t *rows, int n, spec_workload_t w, int batch, bool constrained, drafter_t d)
{
    for (int i = 0; i < n; i++)
        if (rows[i].ran && rows[i].w == w && rows[i].batch == batch && rows[i].constrained == constrained &&
            rows[i].d == d)
            return &rows[i];
    return NULL;
}

/* r's rate over the rate without speculation at the same batch, with the constraint or without as r
 * (rate: row_tok_s or row_decode_tok_s). */
static double speedup_by(const row_t *rows, int n, const row_t *r, double (*rate)(const row_t *))
{
    const row_t *base = find_row(rows, n, r->w, r->batch, r->constrained, DRAFTER_NONE);
    return base && rate(base) > 0 ? rate(r) / rate(base) : 0;
}

/* r's tokens/s over plain decoding's (no constraint, no speculation) at the same batch. */
static double speedup_over_plain(const row_t *rows, int n, const row_t *r)
{
    const row_t *base = find_row(rows, n, r->w, r->batch, false, DRAFTER_NONE);
    return base && row_tok_s(base) > 0 ? row_tok_s(r) / row_tok_s(base) : 0;
}

static double speedup(const row_t *rows, int n, const row_t *r) { return speedup_by(rows, n, r, row_tok_s); }

/* The table of the workloads without constraints. */
static void print_rows(const row_t *rows, int n)
{
    printf("%-10s %5s %-7s %5s %7s %8s %8s %10s %8s %10s %8s %9s\n", "workload", "batch", "drafter", "reqs", "tokens",
           "tok/s", "speed-up", "decode t/s", "speed-up", "accept/st", "accepted", "identical");
    for (int i = 0; i < n; i++) {
        const row_t *r = &rows[i];
        if (!r->ran || spec_workload_constrained(r->w)) continue;
        char rate[16] = "-"; /* of the drafted tokens; none drafted: "-" */
        if (r->drafted) snprintf(rate, sizeof rate, "%.1f%%", 100.0 * (double)r->accepted / (double)r->drafted);
        printf("%-10s %5d %-7s %5d %7llu %8.1f %7.2fx %10.1f %7.2fx %10.2f %8s %9s\n", spec_workload_name(r->w),
               r->batch, drafter_names[r->d], r->requests, (unsigned long long)r->generated, row_tok_s(r),
               speedup(rows, n, r), row_decode_tok_s(r), speedup_by(rows, n, r, row_decode_tok_s), row_accept_len(r),
               rate, r->differ ? "no" : "yes");
    }
}

/* The table of the constrained workloads: each drafter without and with the constraint; speed-up
 * over no speculation with the same, and over plain decoding. */
static void print_cons_rows(const row_t *rows, int n)
{
    printf("%-8s %5s %-5s %-7s %5s %7s %8s %8s %8s %10s %8s %10s %8s %-13s %9s\n", "workload", "batch", "cons",
           "drafter", "reqs", "tokens", "tok/s", "speed-up", "vs plain", "decode t/s", "speed-up", "accept/st",
           "accepted", "valid", "identical");
    for (int i = 0; i < n; i++) {
        const row_t *r = &rows[i];
        if (!r->ran || !spec_workload_constrained(r->w)) continue;
        char rate[16] = "-", valid[32];
        if (r->drafted) snprintf(rate, sizeof rate, "%.1f%%", 100.0 * (double)r->accepted / (double)r->drafted);
        snprintf(valid, sizeof valid, "%d/%d", r->valid, r->checked);
        if (r->cut) snprintf(valid + strlen(valid), sizeof valid - strlen(valid), " +%d cut", r->cut);
        printf("%-8s %5d %-5s %-7s %5d %7llu %8.1f %7.2fx %7.2fx %10.1f %7.2fx %10.2f %8s %-13s %9s\n",
               spec_workload_name(r->w), r->batch, r->constrained ? "yes" : "no", drafter_names[r->d], r->requests,
               (unsigned long long)r->generated, row_tok_s(r), speedup(rows, n, r), speedup_over_plain(rows, n, r),
               row_decode_tok_s(r), speedup_by(rows, n, r, row_decode_tok_s), row_accept_len(r), rate, valid,
               r->differ ? "no" : "yes");
    }
}

/* The goals, from the rows that measure them. */
static void print_goals(const row_t *rows, int n, const int *batches, int n_batches)
{
    for (int w = 0; w < SPEC_WORKLOAD_COUNT; w++) {
        const bool cons = spec_workload_constrained((spec_workload_t)w);
        const row_t *best = NULL;
        for (int d = DRAFTER_NGRAM; d < DRAFTER_COUNT; d++) {
            const row_t *r = find_row(rows, n, (spec_workload_t)w, 1, cons, (drafter_t)d);
            if (r && (!best || speedup(rows, n, r) > speedup(rows, n, best))) best = r;
        }
        if (best && cons)
            printf("goal: batch 1, %s, constraint + speculation >= 3x the constraint alone: %s %.2fx (decode steps "
                   "alone %.2fx; %.2fx plain decoding)\n",
                   spec_workload_name((spec_workload_t)w), drafter_names[best->d], speedup(rows, n, best),
                   speedup_by(rows, n, best, row_decode_tok_s), speedup_over_plain(rows, n, best));
        else if (best)
            printf("goal: batch 1, %s, best drafter >= %s: %s %.2fx (decode steps alone %.2fx)\n",
                   spec_workload_name((spec_workload_t)w), w == SPEC_WORKLOAD_SMALL_SET ? "2.5x (aim 3x)" : "1.5x",
                   drafter_names[best->d], speedup(rows, n, best), speedup_by(rows, n, best, row_decode_tok_s));
    }
    const int big = batches[n_batches - 1];
    if (big < 16) return;
    double worst = 0;
    const row_t *at = NULL;
    for (int i = 0; i < n; i++)
        if (rows[i].ran && rows[i].batch == big && rows[i].d != DRAFTER_NONE && !spec_workload_constrained(rows[i].w) &&
            (!at || speedup(rows, n, &rows[i]) < worst))
            at = &rows[i], worst = speedup(rows, n, &rows[i]);
    if (at)
        printf("goal: batch %d, every drafter >= 0.95x: lowest %.2fx (%s, %s)\n", big, worst,
               spec_workload_name(at->w), drafter_names[at->d]);
}

static int write_json(const char *path, const char *model_path, const char *backend, int threads, int max_tokens,
                      const char *heads, int n_heads, int verify_ctx, int rounds, const verify_row_t *v, int n_v,
                      const workload_t *wls, int n_wl, const row_t *rows, int n_rows, bool identical, bool valid,
                      const sched_stats_t *server)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "benchmark", "spec");
    cJSON_AddStringToObject(o, "model", model_path);
    cJSON_AddStringToObject(o, "backend", backend);
    cJSON_AddNumberToObject(o, "threads", threads);
    cJSON_AddNumberToObject(o, "max_tokens", max_tokens);
    if (heads) {
        cJSON_AddStringToObject(o, "medusa_heads", heads);
        cJSON_AddNumberToObject(o, "medusa_n_heads", n_heads);
    } else {
        cJSON_AddNullToObject(o, "medusa_heads");
    }
    cJSON *vo = cJSON_AddObjectToObject(o, "verify");
    cJSON_AddNumberToObject(vo, "context", verify_ctx);
    cJSON_AddNumberToObject(vo, "rounds", rounds);
    cJSON *va = cJSON_AddArrayToObject(vo, "steps");
    for (int i = 0; i < n_v; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "tokens", v[i].tokens);
        cJSON_AddNumberToObject(e, "median_ms", v[i].median_s * 1e3);
        cJSON_AddNumberToObject(e, "best_ms", v[i].best_s * 1e3);
        cJSON_AddNumberToObject(e, "median_over_1", v[i].median_s / v[0].median_s);
        cJSON_AddNumberToObject(e, "best_over_1", v[i].best_s / v[0].best_s);
        cJSON_AddItemToArray(va, e);
    }
    if (server->steps_by_size[1]) { /* batch 1's decode steps in the runs, by size */
        cJSON *so = cJSON_AddObjectToObject(o, "server_steps_batch1");
        cJSON_AddNumberToObject(so, "heads_s", server->heads_s);
        cJSON_AddNumberToObject(so, "heads_epochs_on", (double)server->heads_epochs_on);
        cJSON_AddNumberToObject(so, "heads_epochs_off", (double)server->heads_epochs_off);
        cJSON *sa = cJSON_AddArrayToObject(so, "steps");
        const double one = server->s_by_size[1] / (double)server->steps_by_size[1];
        for (int k = 1; k < SCHED_STEP_SIZES; k++) {
            if (!server->steps_by_size[k]) continue;
            const double mean = server->s_by_size[k] / (double)server->steps_by_size[k];
            cJSON *e = cJSON_CreateObject();
            cJSON_AddNumberToObject(e, "tokens", k);
            cJSON_AddBoolToObject(e, "or_more", k == SCHED_STEP_SIZES - 1);
            cJSON_AddNumberToObject(e, "steps", (double)server->steps_by_size[k]);
            cJSON_AddNumberToObject(e, "mean_ms", mean * 1e3);
            cJSON_AddNumberToObject(e, "over_1", mean / one);
            cJSON_AddItemToArray(sa, e);
        }
    }
    cJSON *wa = cJSON_AddArrayToObject(o, "workloads");
    for (int w = 0; w < n_wl; w++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "workload", spec_workload_name(wls[w].w));
        cJSON_AddNumberToObject(e, "prompts", wls[w].n_prompts);
        cJSON_AddNumberToObject(e, "prompt_tokens", workload_tokens(&wls[w]));
        if (spec_workload_constrained(wls[w].w)) {
            cJSON_AddStringToObject(e, "constraint",
                                    wls[w].cons[0].kind == FL_CONSTRAINT_REGEX ? "regex" : "json_schema");
            cJSON_AddNumberToObject(e, "compile_ms_max", wls[w].compile_s * 1e3);
            cJSON_AddNumberToObject(e, "mask_warmup_ms_max", wls[w].warm_s * 1e3);
            cJSON_AddNumberToObject(e, "constraint_bytes_max", (double)wls[w].cons_bytes);
        }
        cJSON_AddItemToArray(wa, e);
    }
    cJSON *ra = cJSON_AddArrayToObject(o, "runs");
    for (int i = 0; i < n_rows; i++) {
        const row_t *r = &rows[i];
        if (!r->ran) continue;
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "workload", spec_workload_name(r->w));
        cJSON_AddNumberToObject(e, "batch", r->batch);
        cJSON_AddStringToObject(e, "drafter", drafter_names[r->d]);
        cJSON_AddBoolToObject(e, "constraint", r->constrained);
        cJSON_AddNumberToObject(e, "requests", r->requests);
        cJSON_AddNumberToObject(e, "generated_tokens", (double)r->generated);
        cJSON_AddNumberToObject(e, "wall_s", r->wall_s);
        cJSON_AddNumberToObject(e, "tok_s", row_tok_s(r));
        cJSON_AddNumberToObject(e, "drafted_tokens", (double)r->drafted);
        cJSON_AddNumberToObject(e, "accepted_tokens", (double)r->accepted);
        cJSON_AddNumberToObject(e, "spec_seq_steps", (double)r->spec_seq_steps);
        cJSON_AddNumberToObject(e, "accepted_per_step", row_accept_len(r));
        cJSON_AddNumberToObject(e, "speedup", speedup(rows, n_rows, r));
        cJSON_AddNumberToObject(e, "decode_generated_tokens", (double)r->decode_generated);
        cJSON_AddNumberToObject(e, "decode_s", r->decode_s);
        cJSON_AddNumberToObject(e, "decode_tok_s", row_decode_tok_s(r));
        cJSON_AddNumberToObject(e, "decode_speedup", speedup_by(rows, n_rows, r, row_decode_tok_s));
        cJSON_AddBoolToObject(e, "identical", r->differ == 0);
        cJSON_AddNumberToObject(e, "requests_differing", r->differ);
        if (spec_workload_constrained(r->w)) {
            cJSON_AddNumberToObject(e, "speedup_over_plain", speedup_over_plain(rows, n_rows, r));
            cJSON_AddNumberToObject(e, "outputs_checked", r->checked);
            cJSON_AddNumberToObject(e, "outputs_valid", r->valid);
            cJSON_AddNumberToObject(e, "outputs_cut", r->cut);
        }
        cJSON_AddItemToArray(ra, e);
    }
    cJSON_AddBoolToObject(o, "identical", identical);
    cJSON_AddBoolToObject(o, "constrained_valid", valid);
    char *s = cJSON_Print(o);
    FILE *f = fopen(path, "w");
    const int rc = !f || fprintf(f, "%s\n", s) < 0 ? -1 : 0;
    if (f && fclose(f)) return -1;
    cJSON_free(s);
    cJSON_Delete(o);
    return rc;
}

/* ---- main ---- */

static bool parse_batches(const char *s, int *batches, int *n)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s", s);
    *n = 0;
    for (char *save = NULL, *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        long b;
        if (*n == MAX_BATCHES) {
            fprintf(stderr, "error: --batches: at most %d sizes\n", MAX_BATCHES);
            return false;
        }
        if (!fl_flag_int("--batches", t, 1, 256, &b)) return false;
        batches[(*n)++] = (int)b;
    }
    if (*n == 0) fprintf(stderr, "error: --batches: no size given\n");
    return *n > 0;
}

static bool parse_workloads(const char *s, bool *on)
{
    char tmp[128];
    snprintf(tmp, sizeof tmp, "%s", s);
    for (int w = 0; w < SPEC_WORKLOAD_COUNT; w++) on[w] = false;
    for (char *save = NULL, *t = strtok_r(tmp, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int w = 0;
        while (w < SPEC_WORKLOAD_COUNT && strcmp(t, spec_workload_name((spec_workload_t)w))) w++;
        if (w == SPEC_WORKLOAD_COUNT) {
            fprintf(stderr, "error: --workloads: unknown workload '%s' (small-set, chat, labels, json)\n", t);
            return false;
        }
        on[w] = true;
    }
    return true;
}

/* The default KV budget of a CPU engine (64 MiB) holds a few sequences; this run needs max_batch of
 * the longest prompt plus the completion and a draft. Unless a budget was given, the pool is
 * remade to fit. */
static int fit_kv(engine_t *e, const workload_t *wls, int n_wl, int max_batch, int max_tokens, fl_error_t *err)
{
    int longest = 0;
    for (int w = 0; w < n_wl; w++)
        for (int i = 0; i < wls[w].n_prompts; i++) longest = wls[w].n_ids[i] > longest ? wls[w].n_ids[i] : longest;
    const int bs = e->kv->block_size;
    const int per_seq = (longest + max_tokens + SCHED_MAX_DRAFT + 2 * bs - 1) / bs;
    const int blocks = max_batch * per_seq + MAX_BATCHES; /* + each scheduler's liveness block */
    if (e->kv->n_blocks >= blocks) return 0;
    const model_config_t *c = &e->model->cfg;
    const size_t budget = (size_t)blocks * (size_t)bs * e->kv->bytes_per_token;
    const int k_type = e->kv->k_type, v_type = e->kv->v_type;
    kv_cache_destroy(&e->kv);
    e->kv = kv_cache_new(e->be, c->n_layers, c->n_kv_heads, c->head_dim, bs, k_type, v_type, budget, err);
    return e->kv ? 0 : err->code;
}

int bench_spec(int argc, char **argv)
{
    engine_opts_t eo = {0};
    long max_tokens = 256, verify_ctx = 128, rounds = 30, repeat = 1, prompts = 0;
    const char *batches_s = "1,4,16", *workloads_s = "small-set,chat,labels,json", *json_path = NULL;
    bool quick = false, no_medusa = false, prefix_cache = false, set_max_tokens = false, set_batches = false,
         set_rounds = false, set_prompts = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = engine_parse_flag(&eo, argc, argv, &i);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(a, "--batches")) {
            if (!(batches_s = fl_flag_value(argc, argv, &i))) return 2;
            set_batches = true;
        } else if (!strcmp(a, "--workloads")) {
            if (!(workloads_s = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--max-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 16, &max_tokens)) return 2;
            set_max_tokens = true;
        } else if (!strcmp(a, "--prompts")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1000, &prompts)) return 2;
            set_prompts = true;
        } else if (!strcmp(a, "--repeat")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, MAX_REPEAT, &repeat)) return 2;
        } else if (!strcmp(a, "--verify-context")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 20, &verify_ctx)) return 2;
        } else if (!strcmp(a, "--verify-rounds")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 10000, &rounds)) return 2;
            set_rounds = true;
        } else if (!strcmp(a, "--no-medusa")) {
            no_medusa = true;
        } else if (!strcmp(a, "--prefix-cache")) {
            prefix_cache = true;
        } else if (!strcmp(a, "--quick")) {
            quick = true;
        } else if (!strcmp(a, "--json")) {
            if (!(json_path = fl_flag_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: folio-bench spec [flags]\n"
                   "  --batches LIST        batch sizes: requests go in waves of that many (default 1,4,16)\n"
                   "  --workloads LIST      small-set (labels, JSON enums, rewritten lists, copies with edits),\n"
                   "                        chat (open-ended answers), and the constrained ones: labels (a 40-line\n"
                   "                        list, a regex) and json (records, a JSON Schema), each run without and\n"
                   "                        with its constraint (default small-set,chat,labels,json)\n"
                   "  --max-tokens N        completion tokens per request at most (default 256)\n"
                   "  --prompts N           the first N prompts of each workload (default: all: 16, 8, 4, 4)\n"
                   "  --repeat N            passes over the prompts; figures over all of them (default 1)\n"
                   "  --verify-context N    context before the verify-cost steps (default 128)\n"
                   "  --verify-rounds N     timed rounds of the verify-cost table (default 30)\n"
                   "  --no-medusa           no Medusa column, and no training of heads\n"
                   "  --prefix-cache        keep the prefix cache on (default off: every drafter computes its\n"
                   "                        prompts; with it, a wave's later drafters find them cached)\n"
                   "  --quick               a smoke run: batches 1,4, 32 tokens, 2 prompts per workload,\n"
                   "                        5 verify rounds, Medusa only with heads already there\n"
                   "  --json FILE           write the figures as JSON\n"
                   "Exit status 1 when a speculative run's tokens differ from the same prompt's without\n"
                   "speculation (with the same constraint or none), or a constrained output does not match.\n%s",
                   engine_flags_help());
            return 0;
        } else {
            fprintf(stderr, "error: unknown flag '%s'\n", a);
            return 2;
        }
    }
    if (quick) {
        if (!set_batches) batches_s = "1,4";
        if (!set_max_tokens) max_tokens = 32;
        if (!set_prompts) prompts = 2;
        if (!set_rounds) rounds = 5;
    }
    int batches[MAX_BATCHES], n_batches;
    bool wl_on[SPEC_WORKLOAD_COUNT];
    if (!parse_batches(batches_s, batches, &n_batches) || !parse_workloads(workloads_s, wl_on)) return 2;
    int max_batch = 1;
    for (int i = 0; i < n_batches; i++) max_batch = batches[i] > max_batch ? batches[i] : max_batch;
    /* Logit rows for the verify table's 16 tokens of one sequence. */
    if (!eo.max_seqs) eo.max_seqs = max_batch > 16 ? max_batch : 16;
    eo.threads = eo.threads > 0 ? eo.threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    const bool kv_given = eo.kv_budget_bytes || eo.kv_fraction > 0;

    fl_error_t err = {0};
    engine_t *e = engine_new(&eo, &err);
    if (!e) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    /* The schedulers' start-up lines would bury the progress lines (FOLIO_LOG still chooses). */
    if (!getenv("FOLIO_LOG")) fl_log_set_level(FL_LOG_WARN);
    int status = 1;
    char model_path[1024], backend[32], heads_path[1100] = "";
    snprintf(model_path, sizeof model_path, "%s", gguf_path(e->model->gguf));
    snprintf(backend, sizeof backend, "%s", kern_backend_name(e->be));
    workload_t wls[SPEC_WORKLOAD_COUNT] = {0};
    int n_wl = 0;
    row_t *rows = NULL;
    collect_t c = {0};
    medusa_t *own_heads = NULL, *heads = NULL;
    sched_t *scheds[MAX_BATCHES] = {0};
    sched_stats_t server_steps = {0};
    verify_row_t verify[N_VERIFY_SIZES];
    int n_verify = 0, n_drafters = 0, n_rows = 0, most_req = 0;
    bool identical = true, valid = true;
    char prompts_s[192] = "";
    const int ctx = e->model->max_blocks * e->kv->block_size;

    for (int w = 0; w < SPEC_WORKLOAD_COUNT; w++) {
        if (!wl_on[w]) continue;
        if (workload_init(&wls[n_wl], (spec_workload_t)w, (int)prompts, e->model, ctx, (int)max_tokens, &err))
            goto fail;
        if (wls[n_wl].n_prompts == 0) {
            fprintf(stderr, "note: workload %s has no prompt that fits; skipped\n",
                    spec_workload_name((spec_workload_t)w));
            workload_free(&wls[n_wl]);
            continue;
        }
        n_wl++;
    }
    if (!kv_given && fit_kv(e, wls, n_wl, max_batch, (int)max_tokens, &err)) goto fail;

    /* Medusa heads: the engine's (--heads FILE, or the default file beside the model), else that
     * default file trained now, once. */
    const bool heads_off = no_medusa || (eo.heads_path && !strcmp(eo.heads_path, "none"));
    if (eo.heads_path && !heads_off) snprintf(heads_path, sizeof heads_path, "%s", eo.heads_path);
    else medusa_default_path(model_path, heads_path, sizeof heads_path);
    heads = heads_off ? NULL : e->medusa;
    if (!heads && !heads_off && !quick) {
        if (file_exists(heads_path)) {
            fprintf(stderr, "warning: no Medusa column: %s was not loaded (see the warning above)\n", heads_path);
        } else if (train_heads(model_path, &err) || !(own_heads = medusa_load(heads_path, e->model, &err))) {
            fprintf(stderr, "warning: no Medusa column: %s\n", err.msg);
        }
        heads = own_heads;
    }
    if (!heads) heads_path[0] = 0;

    fprintf(stderr, "bench spec: verify cost (%ld rounds) ...\n", rounds);
    n_verify = measure_verify(e, (int)verify_ctx, (int)rounds, verify, &err);
    if (n_verify < 0) goto fail;

    n_drafters = heads ? DRAFTER_COUNT : DRAFTER_MEDUSA;
    /* rows[((w * n_batches + b) * 2 + constrained) * n_drafters + d]; workloads without constraints
     * leave their constrained rows unused (ran false) */
    n_rows = n_wl * n_batches * 2 * n_drafters;
    most_req = max_batch;
    for (int w = 0; w < n_wl; w++) most_req = wls[w].n_prompts > most_req ? wls[w].n_prompts : most_req;
    rows = calloc((size_t)n_rows, sizeof *rows);
    c.out = calloc((size_t)most_req, sizeof *c.out);
    c.max_tokens = (int)max_tokens;
    if (!rows || !c.out) goto oom;
    for (int i = 0; i < most_req; i++)
        if (!(c.out[i].tokens = malloc((size_t)max_tokens * sizeof(int32_t)))) goto oom;

    /* One scheduler per batch size for the whole run, as a server keeps one: its cost model (which
     * sizes prompt chunks and decides how much to draft) learns from every run before. Each starts
     * with a short untimed request, so no timed run pays for page faults, then runs every constrained
     * prompt once with its constraint and n-gram drafts, untimed, so no timed run pays for compiling
     * a constraint (the scheduler keeps it by its text) or for the first use of the masks of the
     * states its answer passes through. */
    const sched_callbacks_t cb = {.on_token = on_token, .on_finish = on_finish, .user = &c};
    for (int b = 0; b < n_batches && n_wl; b++) {
        const sched_opts_t so = {.max_running = batches[b], .no_prefix_cache = !prefix_cache,
                                 .spec = SCHED_SPEC_AUTO, .medusa = heads};
        if (!(scheds[b] = sched_new(e->model, e->kv, &so, &cb, &err))) goto fail;
        row_t ignore = {0};
        if (run_wave(scheds[b], &wls[0], 0, 1, DRAFTER_NONE, false, 8, &c, &ignore, &err)) goto fail;
        for (int w = 0; w < n_wl; w++) {
            if (!spec_workload_constrained(wls[w].w)) continue;
            fprintf(stderr, "bench spec: %s batch %d, warming up the constraints (untimed) ...\n",
                    spec_workload_name(wls[w].w), batches[b]);
            for (int first = 0; first < wls[w].n_prompts; first += batches[b]) {
                const int left = wls[w].n_prompts - first, count = left < batches[b] ? left : batches[b];
                if (run_wave(scheds[b], &wls[w], first, count, DRAFTER_NGRAM, true, (int)max_tokens, &c, &ignore, &err))
                    goto fail;
            }
        }
    }
    for (int k = 0; k < n_rows; k++) {
        const int d = k % n_drafters, cons = k / n_drafters % 2, b = k / n_drafters / 2 % n_batches,
                  w = k / n_drafters / 2 / n_batches;
        rows[k] = (row_t){.w = wls[w].w, .batch = batches[b], .d = (drafter_t)d, .constrained = cons,
                          .ran = !cons || spec_workload_constrained(wls[w].w)};
    }
    /* Waves of `batch` requests, each run once per drafter back to back (and for constrained
     * workloads, once more per drafter with the constraint), so that the machine's other load falls
     * on every drafter alike. */
    for (int rep = 0; rep < repeat; rep++)
        for (int w = 0; w < n_wl; w++)
            for (int b = 0; b < n_batches; b++) {
                const int B = batches[b], n_req = wls[w].n_prompts > B ? wls[w].n_prompts : B;
                const int n_cons = spec_workload_constrained(wls[w].w) ? 2 : 1;
                fprintf(stderr, "bench spec: %s batch %d, %d requests in waves of %d (run %d of %ld) ...\n",
                        spec_workload_name(wls[w].w), B, n_req, B, rep + 1, repeat);
                for (int first = 0; first < n_req; first += B) {
                    const int count = n_req - first < B ? n_req - first : B;
                    for (int cons = 0; cons < n_cons; cons++)
                        for (int d = 0; d < n_drafters; d++) {
                            row_t *row = &rows[((w * n_batches + b) * 2 + cons) * n_drafters + d];
                            if (run_wave(scheds[b], &wls[w], first, count, (drafter_t)d, cons, (int)max_tokens, &c, row,
                                         &err))
                                goto fail;
                            check_wave(&wls[w], &c, first, (drafter_t)d, cons, (int)max_tokens, e->model->tok, row);
                        }
                }
            }
    double index_s = 0;
    for (int w = 0; w < n_wl; w++)
        if (spec_workload_constrained(wls[w].w) && cons_measure(&wls[w], e->model->tok, &index_s, &err)) goto fail;

    for (int w = 0; w < n_wl; w++)
        snprintf(prompts_s + strlen(prompts_s), sizeof prompts_s - strlen(prompts_s), "%s%s:%d (%d tokens)",
                 w ? "," : "", spec_workload_name(wls[w].w), wls[w].n_prompts, workload_tokens(&wls[w]));
    printf("folio-bench spec  model=%s backend=%s threads=%d max_tokens=%ld prompts=%s medusa=%s%s\n", model_path,
           backend, eo.threads, max_tokens, prompts_s, heads ? heads_path : "none",
           prefix_cache ? " prefix-cache=on" : "");
    print_verify(verify, n_verify, (int)verify_ctx, (int)rounds);
    bool any_plain = false, any_cons = false;
    for (int w = 0; w < n_wl; w++) {
        any_cons |= spec_workload_constrained(wls[w].w);
        any_plain |= !spec_workload_constrained(wls[w].w);
    }
    if (any_plain) {
        printf("\n");
        print_rows(rows, n_rows);
    }
    if (any_cons) {
        printf("\nconstrained output (cons: the prompt's constraint on or off); speed-up over no speculation with the "
               "same, vs plain: over no constraint and no speculation\n");
        print_cons_rows(rows, n_rows);
        printf("constraints: the vocabulary's index takes %.1f ms (once per scheduler)\n", index_s * 1e3);
        for (int w = 0; w < n_wl; w++)
            if (spec_workload_constrained(wls[w].w))
                printf("%s: %s per prompt; the largest compiles in %.1f ms, its answer's masks take %.1f ms, "
                       "%.1f MiB\n",
                       spec_workload_name(wls[w].w),
                       wls[w].cons[0].kind == FL_CONSTRAINT_REGEX ? "a regex" : "a JSON Schema", wls[w].compile_s * 1e3,
                       wls[w].warm_s * 1e3, (double)wls[w].cons_bytes / (1 << 20));
    }
    int checked = 0, cut = 0;
    for (int i = 0; i < n_rows; i++) {
        const row_t *r = &rows[i];
        if (!r->ran) continue;
        if (r->differ) {
            identical = false;
            printf("DIFFERS: %s batch %d %s%s: %d requests; first: prompt %d at token %d\n", spec_workload_name(r->w),
                   r->batch, drafter_names[r->d], r->constrained ? " constrained" : "", r->differ,
                   r->first_differ_prompt, r->first_differ_at);
        }
        if (!r->constrained) continue;
        checked += r->checked;
        cut += r->cut;
        if (r->valid < r->checked) {
            valid = false;
            printf("INVALID: %s batch %d %s constrained: %d of %d outputs; first: %s\n", spec_workload_name(r->w),
                   r->batch, drafter_names[r->d], r->checked - r->valid, r->checked, r->first_invalid);
        }
    }
    for (int b = 0; b < n_batches; b++)
        if (batches[b] == 1) {
            sched_get_stats(scheds[b], &server_steps);
            print_server_steps(&server_steps);
        }
    print_goals(rows, n_rows, batches, n_batches);
    printf("lossless (greedy tokens identical with and without speculation, every prompt): %s\n",
           identical ? "yes" : "NO");
    if (any_cons)
        printf("valid (every complete constrained output matches its constraint, by POSIX regex or cJSON): %s "
               "(%d checked, %d cut at max tokens)\n",
               valid ? "yes" : "NO", checked, cut);
    if (json_path && write_json(json_path, model_path, backend, eo.threads, (int)max_tokens,
                                heads ? heads_path : NULL, heads ? medusa_n_heads(heads) : 0,
                                (int)verify_ctx, (int)rounds, verify, n_verify, wls, n_wl, rows, n_rows,
                                identical, valid, &server_steps))
        fprintf(stderr, "error: cannot write %s\n", json_path);
    status = identical && valid ? 0 : 1;
    goto out;
oom:
    fl_fail(&err, FL_ENOMEM, "bench: out of memory");
fail:
    fprintf(stderr, "error: %s\n", err.msg);
    status = 1;
out:
    for (int b = 0; b < n_batches; b++) sched_destroy(&scheds[b]);
    for (int i = 0; c.out && i < most_req; i++) free(c.out[i].tokens);
    free(c.out);
    free(rows);
    for (int w = 0; w < n_wl; w++) workload_free(&wls[w]);
    medusa_destroy(&own_heads);
    engine_destroy(&e);
    return status;
}
