/* scheduler.c - continuous batching with prefix caching and preemption; see scheduler.h.
 *
 * A sequence holds its tokens (prompt, then what it generated) and how many of them have K/V in the
 * cache (n_computed). Prompt and generation are one thing here: each step feeds a sequence's
 * tokens [n_computed, n_tokens), and when that reaches n_tokens the last row's logits choose the
 * next token. A decoding sequence has exactly one token pending; a new or preempted one has more.
 * Preemption therefore needs no special case: it drops the K/V (n_computed = 0) and keeps the
 * tokens; on re-admission the prefix cache returns most blocks and the rest is recomputed. As the
 * next token's sampling draw depends only on (seed, index in the completion) and the kernels give
 * each row the same result whatever the batch, a recomputed sequence continues exactly as it would
 * have.
 *
 * A step: expire deadlines; admit from the queue head (prefix-cache lookups, then a check that the
 * rest of the prompt fits in the free and evictable blocks); plan each running sequence's share of
 * the token budget (decode tokens first, then prompt chunks, oldest first), reserving its blocks and
 * preempting the youngest running sequence whenever a block cannot be had; run one forward; publish
 * the blocks that became full; sample and report.
 *
 * Memory: batch buffers are sized in sched_new; a request's buffers (tokens, block table, hashes)
 * are allocated once at submission. Finished sequences are freed only when no step is iterating
 * over them, so a callback may cancel or submit.
 *
 * Threading: everything here belongs to the thread that calls sched_*; see scheduler.h. */
#include "scheduler.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"
#include "medusa.h"
#include "spec.h"

#define SCHED_LOOKAHEAD_BLOCKS 4
#define SCHED_CONSTRAINTS 64   /* compiled constraints kept by their text (in use or recent) */
#define SCHED_EXPLORE_STEPS 16 /* steps between drafts tried against the cost table's advice */
#define SCHED_FORCED_CHANCE 0.95 /* a draft the constraint fixes: the model rarely tokenizes it otherwise */
#define SCHED_DEFAULT_DRAFT 10 /* draft tokens a step may verify for a request that names none */
#define SCHED_LIST_FRACTION 32 /* allowed tokens listed (projected alone) up to n_vocab / this; past it, all */

typedef struct seq {
    sched_request_t req;     /* prompt and stop_ids point into tokens / stop below */
    sched_result_t res;
    int32_t *tokens;         /* [n_prompt + max_tokens] prompt, then generated tokens */
    int32_t *stop;           /* [n_stop_ids] */
    kern_logit_adjust_t *bias;   /* [n_bias] the request's logit bias (sorted by token) */
    kern_logit_adjust_t *adjust; /* [adjust_cap] this draw's adjustments (build_adjust) */
    int64_t *seen;               /* [adjust_cap] scratch: the tokens the penalties look at */
    int adjust_cap;
    float *raw_logits;           /* [n_vocab] the row before sampling, when logprobs are asked */
    int max_tokens;          /* clamped to the context */
    int n_tokens;            /* n_prompt + res.n_generated */
    int n_computed;          /* tokens whose K/V are in kv.blocks */
    kv_seq_t kv;
    block_hash_t *hashes;    /* [max_blocks] chain hashes of full blocks; valid below n_hashed */
    int n_hashed, n_published;
    int take;                /* tokens planned for this step */
    /* Speculation (spec.h). */
    sched_spec_t spec;       /* resolved at submission: NONE, NGRAM or MEDUSA */
    bool spec_auto;          /* MEDUSA from AUTO: an n-gram match, when there is one, drafts first */
    bool tree_medusa;        /* this step's tree is the heads' (else an n-gram chain) */
    int max_draft;
    spec_tree_t tree;        /* this step's draft tree below the pending token (n = 1: none) */
    int row0;                /* the tree's first logit row in this step */
    int32_t *cand;           /* [n_heads * top_k] the heads' candidates after the pending token */
    bool has_cand;
    bool draft_cut;          /* this step's planner dropped the whole draft it had (not worth it now) */
    int since_cand;          /* steps the candidates were skipped since last computed */
    int cand_pause;          /* steps between candidates while drafts are cut (0: none yet) */
    double acc_yes, acc_no;  /* decayed counts of accepted and rejected draft tokens */
    double med_expect;       /* this step's Medusa tree: accepted tokens the heads' accuracies promise */
    /* Constrained output: the automaton's state after every token taken so far (the pending one
     * included), each tree node's state after its path, and the nodes of this step's tree whose
     * token the constraint itself fixed after their parent (bit k: free drafts, nearly sure);
     * cand_state is the state the heads are being asked at (propose_candidates). */
    fl_constraint_t *cons;   /* a reference, from the scheduler's cache */
    int32_t cstate;
    int32_t node_state[SPEC_MAX_NODES];
    uint32_t forced_nodes;
    int32_t cand_state;
    int32_t emit[SPEC_MAX_NODES]; /* this step's tokens (spec_walk), and the nodes they were drawn at */
    int emit_node[SPEC_MAX_NODES];
    int n_emit;
    bool finished;
    struct seq *next_dead;
} seq_t;

struct sched {
    model_t *m;
    kv_cache_t *kv;
    sched_opts_t o;
    sched_callbacks_t cb;
    int ctx;                 /* tokens of context: m->max_blocks * block_size */
    int32_t live_block;      /* reserved for sched_liveness */

    seq_t **running;         /* [max_running] in admission order: the last is the youngest */
    int n_running;
    seq_t **waiting;         /* ring of [wait_cap] */
    int wait_cap, wait_head, n_waiting;
    seq_t *dead;             /* finished, freed when no step iterates */
    int in_step;

    /* Batch buffers: tokens [max_batch_tokens], logit rows [max_logits]. */
    int32_t *tokens, *pos, *seq_row, *tables, *prompt_len, *logit_rows, *sampled;
    const int32_t **logit_ids; /* [max_rows] model_batch_t.logit_ids, and their counts */
    int32_t *logit_n_ids;
    int32_t *ids_buf;          /* [max_rows][ids_max] the lists themselves */
    int ids_max;               /* n_vocab / 32: past it a row is projected whole; 0: no lists
                                  (model_projects_chosen_rows false) */
    seq_t **logit_seq;
    kern_sampling_t *sampling;
    int max_rows;            /* logit rows a step may have: the model's max_logits */
    int32_t *tree_start;     /* [max_batch_tokens] a step's draft trees (model_batch_t) */
    uint64_t *tree_mask;
    int32_t *move_src, *move_dst; /* [max_rows] accepted paths' K/V moves */
    int32_t *cand_rows, *cand_out; /* Medusa: rows to propose from, and the candidates */
    seq_t **cand_seq;
    int32_t *cand_ids;       /* [n_vocab / SCHED_LIST_FRACTION] the tokens a constrained head may guess */
    int cand_listed;         /* this proposal's head rows given allowed tokens (Sched stat) */
    const spec_paths_t *paths;
    int top_k;               /* candidates per head the tree needs */
    spec_cost_t spec_cost;   /* measured decode step seconds by size (the forward: the heads apart) */
    /* Medusa's own price, measured: the heads' seconds a row (decayed mean; 0 until they run), what
     * they took this step, and how many drafted tokens the heads' held-out accuracies promised
     * against how many were accepted (decayed sums), which calibrates those accuracies to the
     * workload at hand. */
    double heads_s_per_row, heads_s_step, med_promised, med_accepted;
    /* Whether the heads pay at all, measured: decode steps go in epochs of SCHED_HEADS_EPOCH with the
     * heads on or off, and the tokens per second of each mode (decayed) decide the next epochs; the
     * mode that lost is tried again every SCHED_HEADS_PROBE epochs. This catches what the planner's
     * estimates miss (the heads' weights pushing the model's out of the caches, a calibration that
     * lags). */
    bool heads_off;
    int epoch_steps, epochs_since_probe;
    double epoch_tokens, epoch_s, heads_rate[2]; /* tokens per second with the heads on [0], off [1] */
    sched_logprobs_t logprobs; /* of the token being reported */
    fl_constraint_cache_t *cons_cache; /* compiled constraints by text; made on first use */

    /* Step cost: a prompt chunk costs its tokens plus its attention pairs (the (token, position)
     * pairs it reads) at pairs_per_token pairs a token. Seconds: t ~ a * tokens + b * pairs, fitted
     * online by decayed least squares over the steps run (sched_expected_s). */
    double pairs_per_token;
    double fit_s11, fit_s12, fit_s22, fit_s1t, fit_s2t, fit_n;
    double cost_a, cost_b;   /* seconds per token and per 1000 pairs; 0 until fitted */
    double step_pairs;       /* of the step being run */

    sched_stats_t st;
};

const char *sched_finish_name(sched_finish_t f)
{
    switch (f) {
    case SCHED_FINISH_STOP: return "stop";
    case SCHED_FINISH_LENGTH: return "length";
    case SCHED_FINISH_CANCELLED: return "cancelled";
    case SCHED_FINISH_DEADLINE: return "deadline";
    case SCHED_FINISH_ERROR: return "error";
    default: return "none";
    }
}

static void seq_free(sched_t *s, seq_t *q)
{
    fl_constraint_free(&q->cons);
    kv_seq_free(s->kv, &q->kv);
    free(q->tokens);
    free(q->stop);
    free(q->bias);
    free(q->adjust);
    free(q->seen);
    free(q->raw_logits);
    free(q->hashes);
    free(q->cand);
    free(q);
}

static void reap(sched_t *s)
{
    if (s->in_step) return;
    while (s->dead) {
        seq_t *q = s->dead;
        s->dead = q->next_dead;
        seq_free(s, q);
    }
}

/* --- queues --------------------------------------------------------------------------------- */

static seq_t *wait_at(const sched_t *s, int i) { return s->waiting[(s->wait_head + i) % s->wait_cap]; }

static void wait_push_back(sched_t *s, seq_t *q)
{
    s->waiting[(s->wait_head + s->n_waiting++) % s->wait_cap] = q;
}

static void wait_push_front(sched_t *s, seq_t *q)
{
    s->wait_head = (s->wait_head + s->wait_cap - 1) % s->wait_cap;
    s->waiting[s->wait_head] = q;
    s->n_waiting++;
}

static void wait_pop_front(sched_t *s)
{
    s->wait_head = (s->wait_head + 1) % s->wait_cap;
    s->n_waiting--;
}

static void wait_remove(sched_t *s, int i)
{
    for (int j = i; j + 1 < s->n_waiting; j++)
        s->waiting[(s->wait_head + j) % s->wait_cap] = s->waiting[(s->wait_head + j + 1) % s->wait_cap];
    s->n_waiting--;
}

static void running_remove(sched_t *s, const seq_t *q)
{
    for (int i = 0; i < s->n_running; i++)
        if (s->running[i] == q) {
            memmove(s->running + i, s->running + i + 1, (size_t)(s->n_running - i - 1) * sizeof *s->running);
            s->n_running--;
            return;
        }
}

/* Removes q from wherever it is, releases its blocks, reports it and queues it for freeing. */
static void finish(sched_t *s, seq_t *q, sched_finish_t f)
{
    if (q->finished) return;
    q->finished = true;
    running_remove(s, q);
    for (int i = 0; i < s->n_waiting; i++)
        if (wait_at(s, i) == q) {
            wait_remove(s, i);
            break;
        }
    kv_seq_reset(s->kv, &q->kv);
    q->res.finish = f;
    q->res.t_done = fl_clock_s();
    q->next_dead = s->dead;
    s->dead = q;
    if (s->cb.on_finish) s->cb.on_finish(s->cb.user, &q->res);
}

/* Drops q's K/V (its full blocks stay cached) and puts it back at the head of the queue. */
static void preempt(sched_t *s, seq_t *q)
{
    running_remove(s, q);
    kv_seq_reset(s->kv, &q->kv);
    q->n_computed = 0;
    q->n_published = 0;
    q->take = 0;
    q->tree.n = 1;
    q->res.preemptions++;
    s->st.preemptions++;
    wait_push_front(s, q);
    fl_log_debug("sched preempt id=%llu generated=%d", (unsigned long long)q->res.id, q->res.n_generated);
}

/* --- construction --------------------------------------------------------------------------- */

sched_t *sched_new(model_t *m, kv_cache_t *kv, const sched_opts_t *opts, const sched_callbacks_t *cb,
                   fl_error_t *err)
{
    if (kv->block_size != m->block_size) {
        fl_fail(err, FL_EINVAL, "sched: KV block size %d differs from the model's %d", kv->block_size,
                m->block_size);
        return NULL;
    }
    if (kv->n_blocks < 2) {
        fl_fail(err, FL_ERANGE, "sched: the KV cache has %d block(s); one is reserved, so at least 2 are needed",
                kv->n_blocks);
        return NULL;
    }
    sched_t *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->m = m;
    s->kv = kv;
    s->live_block = -1;
    if (opts) s->o = *opts;
    if (cb) s->cb = *cb;
    const int max_seqs = m->max_seqs < m->max_logits ? m->max_seqs : m->max_logits;
    if (s->o.max_running <= 0 || s->o.max_running > max_seqs) s->o.max_running = max_seqs;
    if (s->o.max_batch_tokens <= 0 || s->o.max_batch_tokens > m->max_batch_tokens) s->o.max_batch_tokens = m->max_batch_tokens;
    if (s->o.max_waiting <= 0) s->o.max_waiting = 4096;
    s->ctx = m->max_blocks * kv->block_size;
    /* Preempted sequences return to the queue beyond max_waiting, at most max_running of them. */
    s->wait_cap = s->o.max_waiting + s->o.max_running;
    const int nr = s->o.max_running, nt = s->o.max_batch_tokens, nl = s->max_rows = m->max_logits;
    s->running = calloc((size_t)nr, sizeof *s->running);
    s->waiting = calloc((size_t)s->wait_cap, sizeof *s->waiting);
    s->tokens = malloc((size_t)nt * sizeof *s->tokens);
    s->pos = malloc((size_t)nt * sizeof *s->pos);
    s->seq_row = malloc((size_t)nt * sizeof *s->seq_row);
    s->tables = malloc((size_t)nr * m->max_blocks * sizeof *s->tables);
    s->prompt_len = malloc((size_t)nr * sizeof *s->prompt_len);
    s->logit_rows = malloc((size_t)nl * sizeof *s->logit_rows);
    s->sampled = malloc((size_t)nl * sizeof *s->sampled);
    s->logit_seq = malloc((size_t)nl * sizeof *s->logit_seq);
    s->logit_ids = malloc((size_t)nl * sizeof *s->logit_ids);
    s->logit_n_ids = malloc((size_t)nl * sizeof *s->logit_n_ids);
    s->ids_max = model_projects_chosen_rows(m) ? m->cfg.n_vocab / SCHED_LIST_FRACTION : 0;
    s->ids_buf = malloc((size_t)nl * (size_t)(s->ids_max > 0 ? s->ids_max : 1) * sizeof *s->ids_buf);
    s->sampling = malloc((size_t)nl * sizeof *s->sampling);
    s->tree_start = malloc((size_t)nt * sizeof *s->tree_start);
    s->tree_mask = malloc((size_t)nt * sizeof *s->tree_mask);
    s->move_src = malloc((size_t)nl * sizeof *s->move_src);
    s->move_dst = malloc((size_t)nl * sizeof *s->move_dst);
    s->paths = s->o.spec_paths ? s->o.spec_paths : spec_paths_default();
    s->top_k = s->paths->max_rank;
    const int heads = s->o.medusa ? medusa_n_heads(s->o.medusa) : 0;
    s->cand_rows = malloc((size_t)nr * sizeof *s->cand_rows);
    s->cand_seq = malloc((size_t)nr * sizeof *s->cand_seq);
    s->cand_out = malloc((size_t)nr * (size_t)(heads > 0 ? heads : 1) * (size_t)s->top_k * sizeof *s->cand_out);
    s->cand_ids = malloc(((size_t)m->cfg.n_vocab / SCHED_LIST_FRACTION + 1) * sizeof *s->cand_ids);
    if (!s->running || !s->waiting || !s->tokens || !s->pos || !s->seq_row || !s->tables || !s->prompt_len ||
        !s->logit_rows || !s->sampled || !s->logit_seq || !s->logit_ids || !s->logit_n_ids || !s->ids_buf || !s->sampling || !s->tree_start || !s->tree_mask ||
        !s->move_src || !s->move_dst || !s->cand_rows || !s->cand_seq || !s->cand_out || !s->cand_ids)
        goto oom;
    s->live_block = kv_cache_alloc_block(kv);
    if (s->live_block < 0) {
        fl_fail(err, FL_ERANGE, "sched: no free KV block to reserve for the liveness check");
        sched_destroy(&s);
        return NULL;
    }
    s->st.kv_blocks_total = kv->n_blocks - 1;
    /* Multiply-adds of a token's pass through the weights against those of one attention position
     * (QK and PV over every head and layer), weighted by the backend's relative attention cost.
     * Fixed, not measured, so that how steps are composed never depends on timing. */
    const model_config_t *c = &m->cfg;
    const double q_dim = (double)c->n_heads * c->head_dim, kv_dim = (double)c->n_kv_heads * c->head_dim;
    const double weights = (double)c->n_layers * (2 * c->dim * q_dim + 2 * c->dim * kv_dim + 3.0 * c->dim * c->n_ff);
    s->pairs_per_token = weights / (2.0 * c->n_layers * q_dim * kern_attention_cost(m->be));
    fl_log_info("sched max_running=%d max_batch_tokens=%d max_waiting=%d kv_blocks=%d prefix_cache=%s", nr, nt,
                s->o.max_waiting, kv->n_blocks - 1, s->o.no_prefix_cache ? "off" : "on");
    return s;
oom:
    fl_fail(err, FL_ENOMEM, "sched: out of memory");
    sched_destroy(&s);
    return NULL;
}

void sched_destroy(sched_t **sp)
{
    sched_t *s = sp ? *sp : NULL;
    if (!s) return;
    if (s->running && s->waiting) sched_cancel_all(s);
    s->in_step = 0;
    reap(s);
    if (s->live_block >= 0) kv_cache_release_block(s->kv, s->live_block);
    free(s->running);
    free(s->waiting);
    free(s->tokens);
    free(s->pos);
    free(s->seq_row);
    free(s->tables);
    free(s->prompt_len);
    free(s->logit_rows);
    free(s->sampled);
    free(s->logit_seq);
    free(s->logit_ids);
    free(s->logit_n_ids);
    free(s->ids_buf);
    free(s->sampling);
    free(s->tree_start);
    free(s->tree_mask);
    free(s->move_src);
    free(s->move_dst);
    free(s->cand_rows);
    free(s->cand_seq);
    free(s->cand_out);
    free(s->cand_ids);
    fl_constraint_cache_destroy(&s->cons_cache);
    free(s);
    *sp = NULL;
}

/* --- requests ------------------------------------------------------------------------------- */

static seq_t *find_live(const sched_t *s, uint64_t id)
{
    for (int i = 0; i < s->n_running; i++)
        if (s->running[i]->res.id == id) return s->running[i];
    for (int i = 0; i < s->n_waiting; i++)
        if (wait_at(s, i)->res.id == id) return wait_at(s, i);
    return NULL;
}

static int cmp_i64(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static bool repetition_on(const sched_penalties_t *p)
{
    return p->repetition > 0 && p->repetition != 1 && p->repetition_last_n > 0;
}

static bool occurrence_on(const sched_penalties_t *p) { return p->presence != 0 || p->frequency != 0; }

/* The buffers a request's draws need beyond the plain ones, sized once at submission. */
static int seq_alloc_sampling(const sched_t *s, seq_t *q, const sched_request_t *r, int max_tokens)
{
    const sched_penalties_t *p = &r->penalties;
    if (p->n_bias > 0) {
        q->bias = malloc((size_t)p->n_bias * sizeof *q->bias);
        if (!q->bias) return FL_ENOMEM;
        memcpy(q->bias, p->bias, (size_t)p->n_bias * sizeof *q->bias);
    }
    const int window = repetition_on(p) ? (p->repetition_last_n < s->ctx ? p->repetition_last_n : s->ctx) : 0;
    const int seen = window + (occurrence_on(p) ? max_tokens : 0);
    if (seen + p->n_bias > 0) {
        q->adjust_cap = seen + p->n_bias;
        /* one draw's adjustments per node of a draft tree (each sees its own path) */
        const size_t draws = q->spec != SCHED_SPEC_NONE ? SPEC_MAX_NODES : 1;
        q->adjust = malloc(draws * (size_t)q->adjust_cap * sizeof *q->adjust);
        q->seen = malloc((size_t)(seen > 0 ? seen : 1) * sizeof *q->seen);
        if (!q->adjust || !q->seen) return FL_ENOMEM;
    }
    const size_t rows = q->spec != SCHED_SPEC_NONE ? SPEC_MAX_NODES : 1;
    if (r->logprobs && !(q->raw_logits = malloc(rows * (size_t)s->m->cfg.n_vocab * sizeof *q->raw_logits)))
        return FL_ENOMEM;
    if (q->spec == SCHED_SPEC_MEDUSA &&
        !(q->cand = malloc((size_t)medusa_n_heads(s->o.medusa) * (size_t)s->top_k * sizeof *q->cand)))
        return FL_ENOMEM;
    return FL_OK;
}

/* This draw's logit adjustments, sorted by token: the repetition penalty for tokens among the last
 * repetition_last_n of prompt + completion, presence and frequency penalties for tokens of the
 * completion, and the logit bias. Each token's additive term is summed here, on the host, in one
 * fixed order (bias, then presence, then frequency x count), so every backend applies the same
 * float. */
static int build_adjust(seq_t *q, kern_logit_adjust_t *out)
{
    const sched_penalties_t *p = &q->req.penalties;
    if (!q->adjust) return 0;
    /* Each token the penalties see becomes (id << 2 | role): bit 0 in the repetition window,
     * bit 1 one occurrence in the completion; sorted, a token's entries are adjacent. */
    int n_seen = 0;
    if (repetition_on(p)) {
        const int from = q->n_tokens > p->repetition_last_n ? q->n_tokens - p->repetition_last_n : 0;
        for (int i = from; i < q->n_tokens; i++) q->seen[n_seen++] = (int64_t)q->tokens[i] << 2 | 1;
    }
    if (occurrence_on(p))
        for (int i = q->res.n_prompt; i < q->n_tokens; i++) q->seen[n_seen++] = (int64_t)q->tokens[i] << 2 | 2;
    if (n_seen > 1) qsort(q->seen, (size_t)n_seen, sizeof *q->seen, cmp_i64);
    int n = 0, b = 0, i = 0;
    while (i < n_seen || b < p->n_bias) {
        const int32_t t_seen = i < n_seen ? (int32_t)(q->seen[i] >> 2) : INT32_MAX;
        const int32_t t_bias = b < p->n_bias ? p->bias[b].token : INT32_MAX;
        const int32_t t = t_seen < t_bias ? t_seen : t_bias;
        bool in_window = false;
        int count = 0;
        for (; i < n_seen && (int32_t)(q->seen[i] >> 2) == t; i++) {
            in_window |= (q->seen[i] & 1) != 0;
            count += (q->seen[i] & 2) != 0;
        }
        float add = 0;
        if (t_bias == t) add = p->bias[b++].add;
        if (count > 0) {
            add -= p->presence;
            add -= p->frequency * (float)count;
        }
        const float penalty = in_window ? p->repetition : 1.0f;
        if (penalty != 1.0f || add != 0.0f) out[n++] = (kern_logit_adjust_t){.token = t, .penalty = penalty, .add = add};
    }
    return n;
}

/* The drafter a request gets: what it asks for within what this scheduler allows; Medusa only with
 * heads (else n-gram). */
/* The compiled constraint of r (a new reference) into *out, from the scheduler's cache: a text
 * compiled before is not compiled again, and keeps the masks its earlier requests computed. */
static int cons_get(sched_t *s, const sched_constraint_t *r, fl_constraint_t **out, fl_error_t *err)
{
    fl_error_t why = {0};
    if (!s->cons_cache && !(s->cons_cache = fl_constraint_cache_new(s->m->tok, SCHED_CONSTRAINTS, 0, NULL, &why)))
        return fl_fail(err, why.code ? why.code : FL_ENOMEM, "%s", why.msg);
    if (!(*out = fl_constraint_cache_get(s->cons_cache, r->kind, r->text, r->choices, r->n_choices, &why)))
        return fl_fail(err, why.code ? why.code : FL_EINVAL, "%s", why.msg);
    return FL_OK;
}

static sched_spec_t resolve_spec(const sched_t *s, sched_spec_t want)
{
    if (s->o.spec == SCHED_SPEC_NONE || want == SCHED_SPEC_NONE) return SCHED_SPEC_NONE;
    if (want == SCHED_SPEC_AUTO) want = s->o.spec == SCHED_SPEC_AUTO ? SCHED_SPEC_MEDUSA : s->o.spec;
    if (s->o.spec == SCHED_SPEC_NGRAM) want = SCHED_SPEC_NGRAM;
    return want == SCHED_SPEC_MEDUSA && !s->o.medusa ? SCHED_SPEC_NGRAM : want;
}

int sched_submit(sched_t *s, const sched_request_t *r, fl_error_t *err)
{
    const int bs = s->kv->block_size;
    if (!r || r->n_prompt <= 0 || !r->prompt)
        return fl_fail(err, FL_EINVAL, "sched: request %llu has an empty prompt",
                       r ? (unsigned long long)r->id : 0ull);
    if (r->max_tokens < 0 || r->n_stop_ids < 0 || (r->n_stop_ids > 0 && !r->stop_ids) || r->n_resume < 0 ||
        (r->n_resume > 0 && !r->resume))
        return fl_fail(err, FL_EINVAL, "sched: request %llu has max_tokens %d, %d stop ids, %d resumed tokens",
                       (unsigned long long)r->id, r->max_tokens, r->n_stop_ids, r->n_resume);
    if (r->n_prompt >= s->ctx)
        return fl_fail(err, FL_EINVAL, "sched: request %llu: prompt of %d tokens does not fit the context of %d",
                       (unsigned long long)r->id, r->n_prompt, s->ctx);
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= s->m->cfg.n_vocab)
            return fl_fail(err, FL_EINVAL, "sched: request %llu: token id %d at %d out of vocabulary (%d)",
                           (unsigned long long)r->id, r->prompt[i], i, s->m->cfg.n_vocab);
    for (int i = 0; i < r->n_resume; i++)
        if (r->resume[i] < 0 || r->resume[i] >= s->m->cfg.n_vocab)
            return fl_fail(err, FL_EINVAL, "sched: request %llu: resumed token id %d at %d out of vocabulary (%d)",
                           (unsigned long long)r->id, r->resume[i], i, s->m->cfg.n_vocab);
    if (find_live(s, r->id))
        return fl_fail(err, FL_EINVAL, "sched: request id %llu is already live", (unsigned long long)r->id);
    const sched_penalties_t *pen = &r->penalties;
    if (pen->n_bias < 0 || (pen->n_bias > 0 && !pen->bias) || pen->repetition_last_n < 0 || r->top_logprobs < 0 ||
        r->top_logprobs > SCHED_MAX_TOP_LOGPROBS)
        return fl_fail(err, FL_EINVAL, "sched: request %llu has %d logit biases, repetition window %d, %d top logprobs",
                       (unsigned long long)r->id, pen->n_bias, pen->repetition_last_n, r->top_logprobs);
    for (int i = 0; i < pen->n_bias; i++) {
        if (pen->bias[i].token < 0 || pen->bias[i].token >= s->m->cfg.n_vocab)
            return fl_fail(err, FL_EINVAL, "sched: request %llu: logit bias for token %d out of vocabulary (%d)",
                           (unsigned long long)r->id, pen->bias[i].token, s->m->cfg.n_vocab);
        if (i > 0 && pen->bias[i].token <= pen->bias[i - 1].token) /* build_adjust merges in token order */
            return fl_fail(err, FL_EINVAL, "sched: request %llu: logit bias not sorted by token, or a token twice",
                           (unsigned long long)r->id);
    }
    /* Generation stops with LENGTH at the context's end. */
    const int max_tokens = r->max_tokens < s->ctx - r->n_prompt ? r->max_tokens : s->ctx - r->n_prompt;
    if (r->n_resume > max_tokens)
        return fl_fail(err, r->n_resume > r->max_tokens ? FL_EINVAL : FL_ERANGE,
                       "sched: request %llu resumes after %d completion tokens, more than the %d it may have here",
                       (unsigned long long)r->id, r->n_resume, max_tokens);
    const int64_t need = ((int64_t)r->n_prompt + max_tokens + bs - 1) / bs;
    if (need > s->st.kv_blocks_total)
        return fl_fail(err, FL_ERANGE,
                       "sched: request %llu needs %lld KV blocks (%d prompt + %d new tokens) but the cache has %d",
                       (unsigned long long)r->id, (long long)need, r->n_prompt, max_tokens, s->st.kv_blocks_total);
    if (s->n_waiting >= s->o.max_waiting)
        return fl_fail(err, FL_EBUSY, "queue full (%d waiting)", s->n_waiting);

    if (r->max_draft < 0 || r->max_draft > SCHED_MAX_DRAFT || (unsigned)r->spec > SCHED_SPEC_MEDUSA)
        return fl_fail(err, FL_EINVAL, "sched: request %llu: speculation mode %d, max_draft %d (0-%d)",
                       (unsigned long long)r->id, (int)r->spec, r->max_draft, SCHED_MAX_DRAFT);

    fl_constraint_t *cons = NULL;
    if (r->constraint.kind) {
        if (r->constraint.kind < FL_CONSTRAINT_CHOICE || r->constraint.kind > FL_CONSTRAINT_JSON_SCHEMA ||
            (r->constraint.kind == FL_CONSTRAINT_CHOICE && r->constraint.n_choices <= 0))
            return fl_fail(err, FL_EINVAL, "sched: request %llu: constraint kind %d with %d choices",
                           (unsigned long long)r->id, (int)r->constraint.kind, r->constraint.n_choices);
        const int rc = cons_get(s, &r->constraint, &cons, err);
        if (rc) return rc;
    }
    /* The constraint's state after the resumed tokens, as their generation left it. */
    int32_t cstate = cons ? fl_constraint_start(cons) : 0;
    for (int i = 0; cons && i < r->n_resume; i++)
        if ((cstate = fl_constraint_next(cons, cstate, r->resume[i])) == FL_CSTATE_DEAD) {
            fl_constraint_free(&cons);
            return fl_fail(err, FL_EINVAL, "sched: request %llu: resumed token %d (id %d) breaks its constraint",
                           (unsigned long long)r->id, i, r->resume[i]);
        }

    seq_t *q = calloc(1, sizeof *q);
    if (!q) {
        fl_constraint_free(&cons);
        return fl_fail(err, FL_ENOMEM, "sched: out of memory");
    }
    q->cons = cons; /* the reference cons_get took, released by seq_free */
    q->cstate = cstate;
    q->spec = resolve_spec(s, r->spec);
    q->spec_auto = q->spec == SCHED_SPEC_MEDUSA && r->spec == SCHED_SPEC_AUTO;
    q->max_draft = r->max_draft > 0 ? r->max_draft : SCHED_DEFAULT_DRAFT;
    q->acc_yes = 3, q->acc_no = 1; /* a hopeful prior, so a new sequence's drafts get tried */
    q->tree.n = 1;
    q->tokens = malloc(((size_t)r->n_prompt + (size_t)max_tokens) * sizeof *q->tokens);
    q->stop = malloc((size_t)(r->n_stop_ids > 0 ? r->n_stop_ids : 1) * sizeof *q->stop);
    q->hashes = malloc((size_t)s->m->max_blocks * sizeof *q->hashes);
    if (!q->tokens || !q->stop || !q->hashes || kv_seq_init(&q->kv, s->m->max_blocks) ||
        seq_alloc_sampling(s, q, r, max_tokens)) {
        seq_free(s, q);
        return fl_fail(err, FL_ENOMEM, "sched: out of memory");
    }
    memcpy(q->tokens, r->prompt, (size_t)r->n_prompt * sizeof *q->tokens);
    if (r->n_resume > 0) memcpy(q->tokens + r->n_prompt, r->resume, (size_t)r->n_resume * sizeof *q->tokens);
    if (r->n_stop_ids > 0) memcpy(q->stop, r->stop_ids, (size_t)r->n_stop_ids * sizeof *q->stop);
    q->req = *r;
    q->req.constraint = (sched_constraint_t){0}; /* compiled: q->cons */
    q->req.prompt = q->tokens;
    q->req.stop_ids = q->stop;
    q->req.penalties.bias = q->bias;
    q->req.resume = NULL; /* in tokens */
    q->max_tokens = max_tokens;
    q->n_tokens = r->n_prompt + r->n_resume;
    q->res.id = r->id;
    q->res.n_prompt = r->n_prompt;
    q->res.n_generated = r->n_resume;
    q->res.t_submit = fl_clock_s();
    /* Nothing to generate (max_tokens 0, or the resumed tokens ended it as take_token would have):
     * accepted and done. */
    sched_finish_t done = 0;
    if (r->n_resume > 0 && q->cons && fl_constraint_finished(q->cons, q->cstate))
        done = SCHED_FINISH_STOP;
    else if (r->n_resume >= max_tokens)
        done = SCHED_FINISH_LENGTH;
    if (done) {
        q->next_dead = s->dead;
        s->dead = q;
        q->finished = true;
        q->res.finish = done;
        q->res.t_done = q->res.t_submit;
        if (s->cb.on_finish) s->cb.on_finish(s->cb.user, &q->res);
        reap(s);
        return FL_OK;
    }
    wait_push_back(s, q);
    return FL_OK;
}

int sched_cancel(sched_t *s, uint64_t id)
{
    seq_t *q = find_live(s, id);
    if (!q) return FL_ENOTFOUND;
    finish(s, q, SCHED_FINISH_CANCELLED);
    reap(s);
    return FL_OK;
}

void sched_cancel_all(sched_t *s)
{
    while (s->n_running > 0) finish(s, s->running[s->n_running - 1], SCHED_FINISH_CANCELLED);
    while (s->n_waiting > 0) finish(s, wait_at(s, s->n_waiting - 1), SCHED_FINISH_CANCELLED);
    reap(s);
}

bool sched_has_work(const sched_t *s) { return s->n_running > 0 || s->n_waiting > 0; }

/* --- the step ------------------------------------------------------------------------------- */

static void expire(sched_t *s)
{
    const double now = fl_clock_s();
    /* Backwards, and re-checked, because an on_finish callback may cancel others. */
    for (int i = s->n_running - 1; i >= 0; i--) {
        if (i >= s->n_running) continue;
        seq_t *q = s->running[i];
        if (q->req.deadline > 0 && now >= q->req.deadline) finish(s, q, SCHED_FINISH_DEADLINE);
    }
    for (int i = s->n_waiting - 1; i >= 0; i--) {
        if (i >= s->n_waiting) continue;
        seq_t *q = wait_at(s, i);
        if (q->req.deadline > 0 && now >= q->req.deadline) finish(s, q, SCHED_FINISH_DEADLINE);
    }
}

/* Takes the queue head's cached prefix blocks and admits it if the rest of its tokens, plus the
 * first one it will generate, fit in the blocks an allocation can get. */
/* Blocks the running sequences will ask for soon: each one's growth up to its end (max_tokens),
 * capped at SCHED_LOOKAHEAD_BLOCKS so a large max_tokens does not lock memory it may never use. */
static int headroom(const sched_t *s)
{
    const int bs = s->kv->block_size;
    int n = 0;
    for (int i = 0; i < s->n_running; i++) {
        const seq_t *q = s->running[i];
        const int end = q->req.n_prompt + q->max_tokens;
        int grow = (end + bs - 1) / bs - q->kv.n_blocks;
        if (grow < 1) grow = 1;
        n += grow < SCHED_LOOKAHEAD_BLOCKS ? grow : SCHED_LOOKAHEAD_BLOCKS;
    }
    return n;
}

/* True when a running sequence is computing block `block` of q's prompt right now (the same chain
 * hash, not yet computed by it): q should wait for it to be published rather than compute it a
 * second time. Under load many requests with one system prompt arrive together, and admitting them
 * all at once made each compute the prefix itself: more KV room bought more duplicate prefill
 * (bench/README.md, "kvquant"). */
static bool block_in_flight(const sched_t *s, const seq_t *q, int block)
{
    const int bs = s->kv->block_size;
    if (block >= q->n_hashed) return false;
    for (int i = 0; i < s->n_running; i++) {
        const seq_t *r = s->running[i];
        if (r->n_hashed > block && r->n_computed < (block + 1) * bs && block_hash_equal(r->hashes[block], q->hashes[block]))
            return true;
    }
    return false;
}

/* try_admit's outcome: admitted, no room yet, or waiting for a prefix block another computes. */
typedef enum { ADMIT_OK, ADMIT_NO_ROOM, ADMIT_PREFIX_IN_FLIGHT } admit_t;

static admit_t try_admit(sched_t *s, seq_t *q)
{
    kv_cache_t *kv = s->kv;
    const int bs = kv->block_size;
    int n_hit = 0;
    if (!s->o.no_prefix_cache) {
        /* Tokens only ever append, so hashes from an earlier attempt or admission stay valid. */
        if (q->n_hashed == 0)
            q->n_hashed = block_hash_prefix(q->req.salt, q->tokens, q->n_tokens, bs, q->hashes, s->m->max_blocks);
        for (; q->n_hashed < q->n_tokens / bs; q->n_hashed++)
            q->hashes[q->n_hashed] = block_hash_next(q->n_hashed ? q->hashes[q->n_hashed - 1] : q->req.salt,
                                                     q->tokens + (size_t)q->n_hashed * bs, bs);
        while (n_hit < q->n_hashed) {
            const int32_t b = kv_cache_lookup(kv, q->hashes[n_hit], q->tokens + (size_t)n_hit * bs);
            if (b < 0) break;
            q->kv.blocks[q->kv.n_blocks++] = b;
            n_hit++;
        }
        if (n_hit * bs == q->n_tokens) { /* the last token must be computed to give logits */
            kv_cache_release_block(kv, q->kv.blocks[--q->kv.n_blocks]);
            n_hit--;
        }
        if (block_in_flight(s, q, n_hit)) {
            kv_seq_reset(kv, &q->kv);
            return ADMIT_PREFIX_IN_FLIGHT;
        }
    }
    /* Headroom: after admission every running sequence must still find its next block. Admitting
     * on an exact fit makes the next decode step preempt the newcomer at once, which then re-enters
     * as soon as it fits again: a recompute cycle every step (measured: 790 preemptions for 96
     * requests in the prefix benchmark without it). */
    const int need = (q->n_tokens + 1 + bs - 1) / bs - n_hit + headroom(s);
    if (need > kv_cache_free_blocks(kv)) {
        kv_seq_reset(kv, &q->kv);
        return ADMIT_NO_ROOM;
    }
    q->n_computed = q->kv.n_tokens = n_hit * bs;
    q->n_published = n_hit;
    if (q->res.t_scheduled == 0) { /* first admission: count the prompt and its cache hits */
        q->res.t_scheduled = fl_clock_s();
        q->res.n_cached = n_hit * bs < q->res.n_prompt ? n_hit * bs : q->res.n_prompt;
        s->st.prompt_tokens += (uint64_t)q->res.n_prompt;
        s->st.cached_prompt_tokens += (uint64_t)q->res.n_cached;
    }
    return ADMIT_OK;
}

static void admit(sched_t *s)
{
    while (s->n_waiting > 0 && s->n_running < s->o.max_running) {
        seq_t *q = wait_at(s, 0);
        const admit_t a = try_admit(s, q);
        if (a == ADMIT_PREFIX_IN_FLIGHT) return; /* first come, first served: the blocks come within steps */
        if (a == ADMIT_NO_ROOM) {
            if (s->n_running > 0) return; /* first come, first served: wait for room */
            /* Nothing runs, so every block is free or evictable and validation said it fits;
             * failing here would stall the queue for good, so finish the request instead. */
            snprintf(q->res.error, sizeof q->res.error, "does not fit the KV cache (%d blocks free)",
                     kv_cache_free_blocks(s->kv));
            finish(s, q, SCHED_FINISH_ERROR);
            continue;
        }
        wait_pop_front(s);
        s->running[s->n_running++] = q;
    }
}

/* --- step cost ------------------------------------------------------------------------------ */

/* Attention pairs of k prompt tokens from position `from`: each reads its own position and all
 * before it. */
static double chunk_pairs(int from, int k) { return (double)k * from + (double)k * (k + 1) / 2; }

/* The most prompt tokens (<= pending, <= tokens_left) a chunk from position `from` may take so its
 * cost, in tokens, stays within cost_left: a chunk deep in a long context reads many positions a
 * token, so it takes fewer tokens and a step stays about as long as at the context's start. */
static int chunk_tokens(const sched_t *s, int from, int pending, int tokens_left, double cost_left)
{
    const double per = 1.0 / s->pairs_per_token;
    int lo = 0, hi = pending < tokens_left ? pending : tokens_left;
    while (lo < hi) {
        const int mid = lo + (hi - lo + 1) / 2;
        if (mid + chunk_pairs(from, mid) * per <= cost_left) lo = mid;
        else hi = mid - 1;
    }
    return lo > 0 ? lo : (hi > 0 && tokens_left == s->o.max_batch_tokens ? 1 : 0); /* progress, always */
}

/* Folds a finished step into the fit (decayed sums: recent steps weigh most). */
static void cost_observe(sched_t *s, double tokens, double pairs, double seconds)
{
    const double decay = 0.97, x1 = tokens, x2 = pairs * 1e-3;
    s->fit_s11 = s->fit_s11 * decay + x1 * x1;
    s->fit_s12 = s->fit_s12 * decay + x1 * x2;
    s->fit_s22 = s->fit_s22 * decay + x2 * x2;
    s->fit_s1t = s->fit_s1t * decay + x1 * seconds;
    s->fit_s2t = s->fit_s2t * decay + x2 * seconds;
    s->fit_n = s->fit_n * decay + 1;
    const double det = s->fit_s11 * s->fit_s22 - s->fit_s12 * s->fit_s12;
    if (s->fit_n < 4 || !(det > 1e-9 * s->fit_s11 * s->fit_s22)) return; /* steps too alike to tell a from b */
    const double a = (s->fit_s1t * s->fit_s22 - s->fit_s2t * s->fit_s12) / det;
    const double b = (s->fit_s2t * s->fit_s11 - s->fit_s1t * s->fit_s12) / det;
    if (a > 0 && b > 0) s->cost_a = a, s->cost_b = b;
}

double sched_expected_s(const sched_t *s, int tokens, double pairs)
{
    if (s->cost_a > 0) return s->cost_a * tokens + s->cost_b * pairs * 1e-3;
    /* Before a two-parameter fit: the per-token rate of what ran, attention at the prior rate. */
    if (s->fit_s11 > 0) {
        const double per_token = s->fit_s1t / s->fit_s11;
        return per_token > 0 ? per_token * (tokens + pairs / s->pairs_per_token) : 0;
    }
    return 0;
}

/* --- speculation ---------------------------------------------------------------------------- */

/* How likely a sequence's next draft token is accepted: its decayed record, with a prior. */
static double seq_acceptance(const seq_t *q) { return (q->acc_yes + 1) / (q->acc_yes + q->acc_no + 2); }

/* Whether node k's token is one the constraint fixed (a free draft, nearly sure). */
static bool node_forced(const seq_t *q, int k) { return q->forced_nodes >> k & 1; }

/* What the heads' held-out accuracies promise for Medusa node k: the product over its path of the
 * chance that its head's candidate of that rank is the right token (a forced one: nearly sure). */
static double medusa_promise(const sched_t *s, const seq_t *q, int k)
{
    const spec_tree_t *t = &q->tree;
    double p = 1;
    for (int j = k; j > 0; j = t->parent[j]) {
        if (node_forced(q, j)) {
            p *= SCHED_FORCED_CHANCE;
            continue;
        }
        const int head = t->depth[j] - 1, r = t->rank[j];
        const double hit = medusa_head_accuracy(s->o.medusa, head, r) -
                           (r > 0 ? medusa_head_accuracy(s->o.medusa, head, r - 1) : 0);
        p *= hit > 0 ? hit : 0.01;
    }
    return p;
}

/* Accepted over promised Medusa draft tokens lately: the heads' accuracies on this workload, as a
 * factor (held-out answers are not the requests being served; a tree's deeper nodes also fare
 * worse than the product of independent accuracies). */
static double medusa_calibration(const sched_t *s)
{
    const double c = (s->med_accepted + 0.5) / (s->med_promised + 0.5);
    return c < 0.05 ? 0.05 : c > 1.5 ? 1.5 : c;
}

/* The chance node k of q's tree is accepted, as the greedy planner ranks it: forced nodes on its
 * path (a constraint's) nearly sure; Medusa nodes what the heads' accuracies promise
 * (medusa_promise), calibrated by how their drafts fared lately; other nodes the sequence's
 * acceptance rate a token, less for a runner-up (an earlier sibling came first). */
static double node_chance(const sched_t *s, const seq_t *q, int k)
{
    const spec_tree_t *t = &q->tree;
    int free_nodes = 0;
    double p = 1;
    for (int j = k; j > 0; j = t->parent[j]) {
        if (node_forced(q, j)) p *= SCHED_FORCED_CHANCE;
        else free_nodes++;
    }
    if (free_nodes == 0) return p;
    if (q->tree_medusa && medusa_head_accuracy(s->o.medusa, 0, 0) > 0)
        return medusa_promise(s, q, k) * medusa_calibration(s);
    int rank = 0;
    for (int j = 1; j < k; j++) rank += t->parent[j] == t->parent[k];
    for (int d = 0; d < free_nodes; d++) p *= seq_acceptance(q);
    for (int r = 0; r < rank; r++) p *= 0.3;
    return p;
}

/* Constrained output: each node's automaton state after its path, the tree without the nodes the
 * constraint rejects (they are never verified), and the nodes whose token it fixes outright after
 * their parent (forced_nodes). */
static void cons_prune(seq_t *q)
{
    spec_tree_t *t = &q->tree;
    int32_t st[SPEC_MAX_NODES];
    bool keep[SPEC_MAX_NODES], all = true;
    st[0] = q->cstate;
    keep[0] = true;
    for (int k = 1; k < t->n; k++) {
        const int32_t from = st[t->parent[k]];
        st[k] = from == FL_CSTATE_DEAD ? FL_CSTATE_DEAD : fl_constraint_next(q->cons, from, t->token[k]);
        keep[k] = st[k] != FL_CSTATE_DEAD;
        all &= keep[k];
    }
    if (all) {
        memcpy(q->node_state, st, (size_t)t->n * sizeof *st);
    } else {
        int map[SPEC_MAX_NODES];
        const int n_old = t->n;
        spec_tree_keep(t, keep, map);
        for (int k = 0; k < n_old; k++)
            if (map[k] >= 0) q->node_state[map[k]] = st[k];
    }
    q->forced_nodes = 0;
    for (int k = 1; k < t->n; k++) {
        int32_t fixed;
        if (fl_constraint_forced(q->cons, q->node_state[t->parent[k]], &fixed, 1) == 1 && fixed == t->token[k])
            q->forced_nodes |= 1u << k;
    }
}

/* spec_check_fn of a constraint: the draft's tokens it allows from a state on. */
typedef struct cons_walk {
    fl_constraint_t *cons;
    int32_t state;
} cons_walk_t;

static int cons_allows(void *user, const int32_t *draft, int n)
{
    const cons_walk_t *w = user;
    int32_t st = w->state;
    int k = 0;
    while (k < n && (st = fl_constraint_next(w->cons, st, draft[k])) != FL_CSTATE_DEAD) k++;
    return k;
}

/* A constrained sequence's chain of up to cap drafts from state, after q->tokens[0, n_ctx): what
 * the constraint fixes outright, then (ngram) the continuation of an earlier match that it allows
 * (a label or enum value like one before), then what that fixes, and so on. Returns the length;
 * *lead: how many leading tokens are fixed ones. The chain is written after n_ctx in q->tokens
 * too, as the n-gram's context (room: drafts stop at max_tokens). */
static int cons_chain(seq_t *q, int32_t state, int n_ctx, int32_t *chain, int cap, bool ngram, int *lead)
{
    int n = 0;
    *lead = -1;
    while (n < cap) {
        const int f = fl_constraint_forced(q->cons, state, chain + n, cap - n);
        for (int k = n; k < n + f; k++) state = fl_constraint_next(q->cons, state, chain[k]);
        n += f;
        if (*lead < 0) *lead = n;
        if (!ngram || n >= cap) break;
        memcpy(q->tokens + n_ctx, chain, (size_t)n * sizeof *chain);
        cons_walk_t w = {q->cons, state};
        const int g = spec_ngram_draft_checked(q->tokens, n_ctx + n, cap - n, chain + n, cons_allows, &w);
        if (g == 0) break;
        for (int k = n; k < n + g; k++) state = fl_constraint_next(q->cons, state, chain[k]);
        n += g;
    }
    if (*lead < 0) *lead = 0;
    return n;
}

/* The draft tokens q may verify in its next step once the `ahead` tokens of this step are taken:
 * its maximum, within its remaining tokens and the context. */
static int draft_cap(const sched_t *s, const seq_t *q, int ahead)
{
    int cap = q->max_draft;
    const int left = q->max_tokens - q->res.n_generated - ahead - 1, room = s->ctx - q->n_tokens - ahead;
    if (left < cap) cap = left;
    if (room < cap) cap = room;
    return cap;
}

/* Heads with a shared output rank a constrained sequence's candidates among its allowed tokens
 * (propose_candidates); heads with projections of their own rank without the constraint. */
static bool heads_rank_allowed(const sched_t *s, const seq_t *q)
{
    return q->cons && medusa_shared_output(s->o.medusa);
}

/* Each decoding sequence's draft tree for this step: its drafter's full proposal, then a greedy cut
 * over all sequences that keeps a draft token only while the expected tokens per second of the step
 * grow, by the measured cost of steps of each size (spec_cost): at batch 1 a verify of a few tokens
 * costs little more than one token, so drafts pay; in a large batch the step is compute bound and
 * they would cost throughput, so they shrink or stop. Drafts also fit the step's token and logit row
 * budgets and the request's remaining tokens. */
static void plan_drafts(sched_t *s)
{
    int n_dec = 0, n_cand = 0;
    int32_t chain[SCHED_MAX_DRAFT];
    for (int i = 0; i < s->n_running; i++) {
        seq_t *q = s->running[i];
        q->tree.n = 1;
        q->draft_cut = false;
        q->forced_nodes = 0;
        q->node_state[0] = q->cstate;
        if (q->n_tokens - q->n_computed != 1) continue;
        n_dec++;
        spec_tree_init(&q->tree, q->tokens[q->n_computed]);
        const int cap = draft_cap(s, q, 0);
        if (q->spec == SCHED_SPEC_NONE || cap <= 0) continue;
        /* What the constraint fixes outright is drafted first, for free, and an n-gram match that it
         * allows after it; without a constraint, with AUTO and heads, text the output copies (an
         * n-gram match) is drafted better by the match. The heads' tree otherwise: under a
         * constraint when they were asked with its lists and reach past what it fixes (their fixed
         * heads hold the same tokens). */
        const bool ngram = q->spec == SCHED_SPEC_NGRAM || q->spec_auto;
        int n = 0, lead = 0;
        if (q->cons) n = cons_chain(q, q->cstate, q->n_tokens, chain, cap, ngram, &lead);
        else if (ngram) n = spec_ngram_draft(q->tokens, q->n_tokens, cap, chain);
        const int heads = medusa_n_heads(s->o.medusa);
        q->tree_medusa = q->spec == SCHED_SPEC_MEDUSA && q->has_cand && n == lead &&
                         (n == 0 || (heads_rank_allowed(s, q) && lead < heads));
        if (q->tree_medusa) {
            spec_tree_medusa(&q->tree, q->tokens[q->n_computed], q->cand, heads, s->top_k, s->paths, 1 + cap);
        } else {
            for (int k = 0; k < n; k++) spec_tree_add(&q->tree, k, chain[k]);
        }
        if (q->cons) cons_prune(q);
        n_cand += q->tree.n - 1;
    }
    if (n_cand == 0) return;
    /* what is left for drafts: a logit row per running sequence is spoken for */
    int rows_left = s->max_rows - s->n_running, tokens_left = s->o.max_batch_tokens - n_dec;
    int keep[s->n_running];
    for (int i = 0; i < s->n_running; i++) keep[i] = 1;
    double expect = n_dec, t = spec_cost_s(&s->spec_cost, n_dec), heads_t = 0;
    int n = n_dec;
    while (rows_left > 0 && tokens_left > 0) {
        int best = -1;
        double best_p = 0;
        for (int i = 0; i < s->n_running; i++) {
            const seq_t *q = s->running[i];
            if (keep[i] >= q->tree.n) continue;
            const double p = node_chance(s, q, keep[i]);
            if (p > best_p) best = i, best_p = p;
        }
        if (best < 0) break;
        /* A sequence's first Medusa draft also pays for the heads: kept drafts keep them running on
         * its row every step (propose_candidates), a price plain decoding never pays. */
        const bool first_medusa = s->running[best]->tree_medusa && keep[best] == 1;
        const double heads2 = heads_t + (first_medusa ? s->heads_s_per_row : 0);
        const double t2 = spec_cost_s(&s->spec_cost, n + 1) + heads2;
        /* Every SCHED_EXPLORE_STEPS steps one draft token goes in even when the table says no: a
         * size measured in a slow minute (other load on the machine) would otherwise never be
         * measured again, and drafting would stay off for good. */
        const bool explore = n == n_dec && s->st.steps % SCHED_EXPLORE_STEPS == 0;
        if (!s->o.spec_draft_all && !explore && t > 0 && t2 > 0 && (expect + best_p) / t2 <= expect / t) break;
        keep[best]++, n++, rows_left--, tokens_left--;
        expect += best_p, t = t2, heads_t = heads2;
    }
    for (int i = 0; i < s->n_running; i++) {
        seq_t *q = s->running[i];
        q->draft_cut = q->tree.n > 1 && keep[i] == 1;
        spec_tree_truncate(&q->tree, keep[i]);
        q->med_expect = 0;
        /* the heads' own guesses only: what the constraint fixed says nothing of their accuracy */
        for (int k = 1; q->tree_medusa && k < q->tree.n; k++)
            if (!node_forced(q, k)) q->med_expect += medusa_promise(s, q, k);
    }
}

/* Gives each running sequence its share of the token budget, decode tokens first, then prompt
 * chunks, oldest first, and reserves the blocks. When a block cannot be had the youngest running
 * sequence is preempted (it may be the one asking); victims are always at the end of running[],
 * so the forward iteration stays valid. */
static void plan(sched_t *s)
{
    int budget = s->o.max_batch_tokens;
    /* In tokens: what a full chunk at the context's start costs, so a prompt of up to
     * max_batch_tokens still goes in one step and chunks deeper in a context take fewer tokens for
     * the same cost. Decode tokens count 1 each. */
    double cost = budget + chunk_pairs(0, budget) / s->pairs_per_token;
    for (int i = 0; i < s->n_running; i++) s->running[i]->take = 0;
    plan_drafts(s);
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < s->n_running && budget > 0; i++) {
            seq_t *q = s->running[i];
            const int pending = q->n_tokens - q->n_computed;
            if ((pending == 1) != (pass == 0)) continue;
            if (pass == 0) {
                q->take = q->tree.n; /* the pending token and its drafts */
                cost -= q->take;
            } else {
                q->take = chunk_tokens(s, q->n_computed, pending, budget, cost);
                cost -= q->take + chunk_pairs(q->n_computed, q->take) / s->pairs_per_token;
                if (q->take == 0) continue;
            }
            budget -= q->take;
            while (kv_seq_reserve(s->kv, &q->kv, q->n_computed + q->take)) {
                if (q->tree.n > 1) { /* drafts are the first thing to give up */
                    budget += q->take - 1;
                    cost += q->take - 1;
                    q->tree.n = q->take = 1;
                    continue;
                }
                seq_t *victim = s->running[s->n_running - 1];
                budget += victim->take;
                if (victim->take > 0)
                    cost += victim->n_tokens - victim->n_computed == 1
                                ? victim->take
                                : victim->take + chunk_pairs(victim->n_computed, victim->take) / s->pairs_per_token;
                preempt(s, victim);
                if (victim == q) break;
            }
        }
    }
}

/* The adjustments of node k's draw: those of the sequence extended by the node's path (a penalty
 * sees the draft tokens before it as generated). */
static int node_adjust(seq_t *q, int k, bool tree)
{
    if (!q->adjust) return 0;
    kern_logit_adjust_t *out = q->adjust + (size_t)k * q->adjust_cap;
    if (!tree || k == 0) return build_adjust(q, out);
    const int depth = q->tree.depth[k], saved = q->n_tokens;
    for (int j = k; j > 0; j = q->tree.parent[j]) q->tokens[saved + q->tree.depth[j] - 1] = q->tree.token[j];
    q->n_tokens += depth; /* within tokens[]: drafts stop at max_tokens */
    const int n = build_adjust(q, out);
    q->n_tokens = saved;
    return n;
}

/* The step's batch from the plan: rows of the block tables follow running[]. */
static int build_batch(sched_t *s, model_batch_t *b, int *n_prefill)
{
    const int mb = s->m->max_blocks;
    int n = 0, n_logits = 0;
    bool trees = false;
    *n_prefill = 0;
    s->step_pairs = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < s->n_running; i++) {
            seq_t *q = s->running[i];
            if (q->take == 0 || (q->n_tokens - q->n_computed == 1) != (pass == 0)) continue;
            s->step_pairs += chunk_pairs(q->n_computed, q->take);
            const spec_tree_t *t = &q->tree;
            const bool tree = pass == 0 && t->n > 1;
            trees |= tree && !spec_tree_is_chain(t);
            for (int j = 0; j < q->take; j++) {
                /* a tree node: stored at its place after the context, roped at its depth */
                s->tokens[n + j] = tree ? t->token[j] : q->tokens[q->n_computed + j];
                s->pos[n + j] = q->n_computed + (tree ? t->depth[j] : j);
                s->tree_start[n + j] = tree ? q->n_computed : q->n_computed + j;
                s->tree_mask[n + j] = tree ? t->mask[j] : 1;
                s->seq_row[n + j] = i;
            }
            n += q->take;
            if (pass == 1) *n_prefill += q->take;
            if (q->n_computed + q->take < q->n_tokens && !tree) continue;
            /* the last row chooses the next token; in a tree every node's row scores its child */
            const int rows = tree ? t->n : 1;
            q->row0 = n_logits;
            for (int k = 0; k < rows; k++) {
                s->logit_rows[n_logits] = n - rows + k;
                s->logit_seq[n_logits] = q;
                s->sampling[n_logits] = q->req.sampling;
                s->sampling[n_logits].position = (uint64_t)q->res.n_generated + (tree ? t->depth[k] : 0);
                s->sampling[n_logits].adjust = q->adjust ? q->adjust + (size_t)k * q->adjust_cap : NULL;
                s->sampling[n_logits].n_adjust = node_adjust(q, k, tree);
                const int32_t cstate = tree ? q->node_state[k] : q->cstate;
                s->sampling[n_logits].allowed = q->cons ? fl_constraint_mask(q->cons, cstate) : NULL;
                /* a few allowed tokens: only their logits (unless the raw row's log-probabilities are asked) */
                int32_t *ids = s->ids_buf + (size_t)n_logits * (size_t)s->ids_max;
                const int n_ids = q->cons && !q->req.logprobs && s->ids_max > 0
                                      ? fl_constraint_allowed_ids(q->cons, cstate, ids, s->ids_max)
                                      : -1;
                s->logit_ids[n_logits] = n_ids >= 0 ? ids : NULL;
                s->logit_n_ids[n_logits] = n_ids;
                n_logits++;
            }
        }
    }
    /* Prompt lengths fix each token's summation order by its role (kern_attn_t.seq_prompt_len): a
     * prompt chunked over steps, or recomputed after preemption, then computes as it would whole. */
    for (int i = 0; i < s->n_running; i++) {
        memcpy(s->tables + (size_t)i * mb, s->running[i]->kv.blocks, (size_t)mb * sizeof *s->tables);
        s->prompt_len[i] = s->running[i]->res.n_prompt;
    }
    *b = (model_batch_t){.n_tokens = n, .tokens = s->tokens, .pos = s->pos, .seq = s->seq_row,
                         .block_tables = s->tables, .n_seqs = s->n_running, .prompt_len = s->prompt_len,
                         .logit_rows = s->logit_rows, .n_logits = n_logits, .logit_ids = s->logit_ids,
                         .logit_n_ids = s->logit_n_ids, .tree_mask = trees ? s->tree_mask : NULL, .tree_start = trees ? s->tree_start : NULL};
    return n;
}

/* The slot of position pos of q (its block reserved). */
static int32_t seq_slot(const sched_t *s, const seq_t *q, int pos)
{
    const int bs = s->kv->block_size;
    return q->kv.blocks[pos / bs] * bs + pos % bs;
}

/* After a verify step: each tree's accepted path keeps its K/V, moved to the positions after the
 * context where a node was not already there (a chain's are); rejected nodes' K/V stay behind the
 * sequence's end, to be overwritten, never published (only positions below n_computed are). The
 * accepted tokens are written ahead so that the blocks they fill are published with them. */
static void accept_drafts(sched_t *s, int n_seqs)
{
    int n_moves = 0;
    for (int i = 0; i < n_seqs; i++) {
        seq_t *q = s->logit_seq[i];
        const int drafted = q->tree.n - 1, accepted = q->n_emit - 1;
        if (drafted == 0) continue;
        q->res.n_drafted += drafted;
        q->res.n_accepted += accepted;
        s->st.drafted_tokens += (uint64_t)drafted;
        s->st.accepted_tokens += (uint64_t)accepted;
        s->st.spec_seq_steps++;
        /* The drafter's record counts its guesses only: tokens the constraint fixed are nearly always
         * accepted and would price a guess after them (a label, an enum value) as just as sure. The
         * walk ended on a node with children: one of its drafts was rejected. */
        const int last = accepted > 0 ? q->emit_node[accepted - 1] : 0;
        bool rejected = false;
        for (int k = last + 1; k < q->tree.n && !rejected; k++) rejected = q->tree.parent[k] == last && !node_forced(q, k);
        int guessed = 0;
        for (int d = 1; d <= accepted; d++) guessed += !node_forced(q, q->emit_node[d - 1]);
        q->acc_yes = 0.9 * q->acc_yes + guessed;
        q->acc_no = 0.9 * q->acc_no + (rejected ? 1 : 0);
        if (q->tree_medusa && q->med_expect > 0) { /* the promise of this step's tree against its outcome */
            s->med_promised = 0.995 * s->med_promised + q->med_expect;
            s->med_accepted = 0.995 * s->med_accepted + guessed;
        }
        for (int d = 1; d <= accepted; d++) {
            const int node = q->emit_node[d - 1];
            q->tokens[q->n_tokens + d - 1] = q->emit[d - 1];
            if (node == d) continue;
            s->move_src[n_moves] = seq_slot(s, q, q->n_computed + node);
            s->move_dst[n_moves++] = seq_slot(s, q, q->n_computed + d);
        }
        q->take = 1 + accepted;
    }
    fl_error_t err = {0};
    if (model_kv_move(s->m, s->kv, s->move_src, s->move_dst, n_moves, &err))
        fl_log_error("sched: moving accepted drafts' K/V failed (the next step fails too): %s", err.msg);
}

/* Medusa: the heads' candidates for the token after each sequence's new pending one, from the row
 * that drew it, before the next step overwrites the hidden states. Skipped while the planner finds
 * drafting not worth its cost (it dropped a sequence's whole draft), but for one step in a pause, so
 * that it can weigh them again: 4 steps after the first cut, doubling while fresh candidates keep
 * being cut, up to 32 (a large batch that never drafts ran the heads every fourth step), and no
 * pause once a draft is kept. A step before an exploring plan (SCHED_EXPLORE_STEPS) computes them
 * whatever the pause, so that the plan has Medusa drafts to try. */
#define CAND_PAUSE_MIN 4
#define CAND_PAUSE_MAX 32
#define SCHED_HEADS_EPOCH 64 /* decode steps an epoch of heads on or off */
#define SCHED_HEADS_PROBE 8  /* epochs between tries of the losing mode */

/* One decode step with Medusa sequences (so heads are loaded) of `tokens` tokens taken in `seconds`
 * (the heads included) toward the epoch; at its end, the next epoch's mode. */
static void heads_epoch_observe(sched_t *s, int tokens, double seconds)
{
    s->epoch_tokens += tokens;
    s->epoch_s += seconds;
    if (++s->epoch_steps < SCHED_HEADS_EPOCH) return;
    const double tokens_done = s->epoch_tokens, epoch_s = s->epoch_s;
    s->epoch_steps = 0;
    s->epoch_tokens = s->epoch_s = 0;
    if (!(epoch_s > 0)) return; /* no time measured: nothing to weigh */
    const double rate = tokens_done / epoch_s;
    const int mode = s->heads_off;
    if (mode) s->st.heads_epochs_off++;
    else s->st.heads_epochs_on++;
    s->heads_rate[mode] = s->heads_rate[mode] > 0 ? 0.5 * s->heads_rate[mode] + 0.5 * rate : rate;
    const int other = !mode, better = s->heads_rate[1] > s->heads_rate[0];
    if (!(s->heads_rate[other] > 0) || ++s->epochs_since_probe >= SCHED_HEADS_PROBE) {
        s->heads_off = other; /* a try of the other mode */
        s->epochs_since_probe = 0;
    } else {
        s->heads_off = better;
    }
}
/* medusa_allowed_fn for constrained sequences: head k guesses where the automaton stands after the
 * best candidates of the heads before it; what it fixes there is the candidate outright. */
static int cand_allowed(void *user, int i, int head, const int32_t *cand, const int32_t **ids)
{
    sched_t *s = user;
    seq_t *q = s->cand_seq[i];
    if (!q->cons) return -1;
    int32_t st = q->cand_state;
    if (head > 0) {
        const int32_t best = cand[(size_t)(head - 1) * s->top_k];
        st = best < 0 || st == FL_CSTATE_DEAD ? FL_CSTATE_DEAD : fl_constraint_next(q->cons, st, best);
        q->cand_state = st;
    }
    *ids = s->cand_ids;
    if (st == FL_CSTATE_DEAD || fl_constraint_finished(q->cons, st)) return 0;
    int n = fl_constraint_forced(q->cons, st, s->cand_ids, 1);
    if (n != 1) n = fl_constraint_allowed_ids(q->cons, st, s->cand_ids, s->m->cfg.n_vocab / SCHED_LIST_FRACTION);
    s->cand_listed += n > 0;
    return n;
}

static void propose_candidates(sched_t *s, int n_seqs)
{
    s->heads_s_step = 0;
    if (!s->o.medusa) return;
    if (s->heads_off) { /* an epoch without the heads: Medusa sequences decode plainly (or n-gram, AUTO) */
        for (int i = 0; i < n_seqs; i++) s->logit_seq[i]->has_cand = false;
        return;
    }
    const int heads = medusa_n_heads(s->o.medusa), per = heads * s->top_k;
    const bool explore_next = (s->st.steps + 1) % SCHED_EXPLORE_STEPS == 0; /* st.steps counts this step after */
    int n = 0;
    for (int i = 0; i < n_seqs; i++) {
        seq_t *q = s->logit_seq[i];
        if (q->spec != SCHED_SPEC_MEDUSA) continue;
        q->has_cand = false;
        if (q->since_cand == 0) /* the candidates computed last were weighed this step */
            q->cand_pause = !q->draft_cut ? 0
                            : q->cand_pause ? (2 * q->cand_pause < CAND_PAUSE_MAX ? 2 * q->cand_pause : CAND_PAUSE_MAX)
                                            : CAND_PAUSE_MIN;
        if (!explore_next && (q->draft_cut || q->since_cand > 0) && ++q->since_cand < q->cand_pause)
            continue; /* in a pause */
        /* The tokens taken this step: the accepted ones are written ahead, the new pending one goes
         * where it will be. */
        const int n_next = q->n_tokens + q->n_emit;
        if (q->n_emit > 0) q->tokens[n_next - 1] = q->emit[q->n_emit - 1];
        if (q->cons) {
            /* The state after them; no heads where the constraint ends the output, fixes the next
             * tokens beyond the heads' reach, or (AUTO) lets an n-gram match draft first. */
            int32_t st = q->cstate;
            for (int j = 0; j < q->n_emit && st != FL_CSTATE_DEAD; j++) st = fl_constraint_next(q->cons, st, q->emit[j]);
            if (st == FL_CSTATE_DEAD || fl_constraint_finished(q->cons, st)) continue;
            const int cap = draft_cap(s, q, q->n_emit);
            if (cap <= 0) continue;
            int32_t chain[SCHED_MAX_DRAFT];
            int lead;
            const int c = cons_chain(q, st, n_next, chain, cap, q->spec_auto, &lead);
            /* heads with their own projections rank without the constraint: the planner takes
             * their tree only where it fixes nothing first */
            if (lead >= heads || lead >= cap || (q->spec_auto && c > lead) || (lead > 0 && !heads_rank_allowed(s, q)))
                continue;
            q->cand_state = st;
        } else if (q->spec_auto && q->n_emit > 0) {
            /* AUTO drafts an n-gram match first: when the next step has one, the heads would run for
             * nothing, and their weights would push the model's out of the caches. */
            int32_t one;
            if (spec_ngram_draft(q->tokens, n_next, 1, &one) > 0) continue;
        }
        q->since_cand = 0;
        s->cand_rows[n] = q->row0 + (q->n_emit > 1 ? q->emit_node[q->n_emit - 2] : 0);
        s->cand_seq[n++] = q;
    }
    if (n == 0) return;
    fl_error_t err = {0};
    const double t0 = fl_clock_s();
    s->cand_listed = 0;
    if (medusa_propose_allowed(s->o.medusa, s->m, s->cand_rows, n, s->top_k, cand_allowed, s, s->cand_out, &err)) {
        fl_log_warn("sched: Medusa heads failed (%s); drafting without them this step", err.msg);
        return;
    }
    s->heads_s_step = fl_clock_s() - t0;
    s->st.heads_s += s->heads_s_step;
    s->st.heads_allowed_rows += (uint64_t)s->cand_listed;
    const double per_row = s->heads_s_step / n;
    s->heads_s_per_row = s->heads_s_per_row > 0 ? 0.9 * s->heads_s_per_row + 0.1 * per_row : per_row;
    for (int i = 0; i < n; i++) {
        seq_t *q = s->cand_seq[i];
        memcpy(q->cand, s->cand_out + (size_t)i * per, (size_t)per * sizeof *s->cand_out);
        q->has_cand = true;
    }
}

/* Blocks that the step filled are published to the prefix cache. */
static void advance_and_publish(sched_t *s, seq_t *q)
{
    const int bs = s->kv->block_size;
    q->n_computed += q->take;
    q->kv.n_tokens = q->n_computed;
    q->take = 0;
    if (s->o.no_prefix_cache) return;
    while (q->n_published < q->n_computed / bs) {
        const int i = q->n_published;
        if (i >= q->n_hashed) {
            q->hashes[i] = block_hash_next(i ? q->hashes[i - 1] : q->req.salt, q->tokens + (size_t)i * bs, bs);
            q->n_hashed = i + 1;
        }
        kv_cache_publish(s->kv, q->kv.blocks[i], q->hashes[i], q->tokens + (size_t)i * bs);
        q->n_published++;
    }
}

static bool is_stop(const sched_t *s, const seq_t *q, int32_t t)
{
    if (!q->req.ignore_eog && tok_is_eog(s->m->tok, t)) return true;
    for (int i = 0; i < q->req.n_stop_ids; i++)
        if (q->stop[i] == t) return true;
    return false;
}

static void take_token(sched_t *s, seq_t *q, int32_t t, double now)
{
    const sched_logprobs_t *lp = NULL;
    if (q->req.logprobs) {
        sched_logprobs_t *l = &s->logprobs;
        l->n_top = kern_logprobs_row(q->raw_logits, s->m->cfg.n_vocab, t, q->req.top_logprobs, &l->chosen, l->top);
        lp = l;
    }
    if (q->res.t_first_token == 0) q->res.t_first_token = now;
    if (is_stop(s, q, t)) {
        finish(s, q, SCHED_FINISH_STOP);
        return;
    }
    if (q->cons) {
        const int32_t next = fl_constraint_next(q->cons, q->cstate, t);
        if (next == FL_CSTATE_DEAD) { /* only when the constraint allowed no token at all here */
            snprintf(q->res.error, sizeof q->res.error, "the constraint allows no token after %d generated",
                     q->res.n_generated);
            finish(s, q, SCHED_FINISH_ERROR);
            return;
        }
        q->cstate = next;
    }
    const int index = q->res.n_generated++;
    q->tokens[q->n_tokens++] = t;
    s->st.generated_tokens++;
    const bool stop = s->cb.on_token && s->cb.on_token(s->cb.user, q->res.id, index, t, lp);
    if (q->finished) return; /* the callback cancelled it */
    /* a constraint that is complete and allows nothing more ends the output, drafts or not */
    if (stop || (q->cons && fl_constraint_finished(q->cons, q->cstate))) finish(s, q, SCHED_FINISH_STOP);
    else if (q->res.n_generated >= q->max_tokens) finish(s, q, SCHED_FINISH_LENGTH);
}

int sched_step(sched_t *s, fl_error_t *err)
{
    s->in_step++;
    expire(s);
    admit(s);
    plan(s);
    model_batch_t b;
    int n_prefill;
    int rc = FL_OK;
    if (build_batch(s, &b, &n_prefill) == 0) goto out;
    if (s->cb.on_step) s->cb.on_step(s->cb.user, b.n_tokens, sched_expected_s(s, b.n_tokens, s->step_pairs));
    const double t0 = fl_clock_s();
    fl_error_t local = {0};
    if (!err) err = &local;
    rc = model_forward(s->m, s->kv, &b, err);
    /* Log-probabilities are of the raw logits: read them before sampling adjusts the rows. */
    for (int i = 0; !rc && i < b.n_logits; i++) {
        seq_t *q = s->logit_seq[i];
        if (q->req.logprobs &&
            (rc = model_logits_row(s->m, q->raw_logits + (size_t)(i - q->row0) * s->m->cfg.n_vocab, i)))
            fl_fail(err, rc, "cannot read logits row %d", i);
    }
    if (rc == FL_EPEER) goto out; /* the tensor-parallel group failed: its process exits without ending
                                     these requests, so that the coordinator fails them over */
    if (rc) {
        /* Nothing of this step is published: the blocks it wrote may hold garbage. */
        for (int i = s->n_running - 1; i >= 0; i--) {
            if (i >= s->n_running) continue; /* on_finish may cancel others */
            seq_t *q = s->running[i];
            if (q->take == 0) continue;
            snprintf(q->res.error, sizeof q->res.error, "engine step failed: %.170s", err->msg);
            finish(s, q, SCHED_FINISH_ERROR);
        }
        goto out;
    }
    model_sample(s->m, s->sampled, b.n_logits, s->sampling);
    /* Each sequence's tokens: the samples along its tree's walk (one, without a tree). */
    int n_seqs = 0;
    for (int i = 0; i < b.n_logits; i += s->logit_seq[i]->tree.n) {
        seq_t *q = s->logit_seq[i];
        s->logit_seq[n_seqs++] = q; /* compacted in place: one entry per sequence from here on */
        q->n_emit = spec_walk(&q->tree, s->sampled + i, q->emit, q->emit_node);
    }
    accept_drafts(s, n_seqs);
    propose_candidates(s, n_seqs);
    const double now = fl_clock_s();
    /* the cost tables are the forward's (and sampling's); the heads' share is priced apart (plan_drafts) */
    const double forward_s = now - t0 - s->heads_s_step;
    cost_observe(s, b.n_tokens, s->step_pairs, forward_s);
    s->st.steps++;
    s->st.prefill_tokens += (uint64_t)n_prefill;
    if (n_prefill > 0) {
        s->st.prefill_s += now - t0;
    } else {
        s->st.decode_s += now - t0;
        s->st.decode_step_tokens += (uint64_t)b.n_tokens;
        spec_cost_observe(&s->spec_cost, b.n_tokens, forward_s);
        int emitted = 0, medusa_seqs = 0;
        for (int i = 0; i < n_seqs; i++) {
            emitted += s->logit_seq[i]->n_emit;
            medusa_seqs += s->logit_seq[i]->spec == SCHED_SPEC_MEDUSA;
        }
        if (medusa_seqs) heads_epoch_observe(s, emitted, now - t0); /* steps the heads' mode can change */
        const int size = b.n_tokens < SCHED_STEP_SIZES - 1 ? b.n_tokens : SCHED_STEP_SIZES - 1;
        s->st.steps_by_size[size]++;
        s->st.s_by_size[size] += forward_s;
    }
    for (int i = 0; i < s->n_running; i++) advance_and_publish(s, s->running[i]);
    /* logit_seq holds pointers, not indices: callbacks may reshape running[] meanwhile. */
    for (int i = 0; i < n_seqs; i++) {
        seq_t *q = s->logit_seq[i];
        for (int j = 0; j < q->n_emit && !q->finished; j++) {
            if (q->req.logprobs && j > 0) /* the row that drew token j: its node's, rows follow nodes */
                memcpy(q->raw_logits, q->raw_logits + (size_t)q->emit_node[j - 1] * s->m->cfg.n_vocab,
                       (size_t)s->m->cfg.n_vocab * sizeof *q->raw_logits);
            take_token(s, q, q->emit[j], now);
        }
    }
out:
    s->in_step--;
    reap(s);
    return rc;
}

double sched_liveness(sched_t *s, fl_error_t *err)
{
    const int mb = s->m->max_blocks;
    for (int i = 0; i < mb; i++) s->tables[i] = s->live_block;
    const int32_t token = 0, pos = 0, row = 0, logit_row = 0;
    const model_batch_t b = {.n_tokens = 1, .tokens = &token, .pos = &pos, .seq = &row, .block_tables = s->tables,
                             .n_seqs = 1, .logit_rows = &logit_row, .n_logits = 1};
    const double t0 = fl_clock_s();
    const int rc = model_forward(s->m, s->kv, &b, err);
    if (rc) return rc;
    const double dt = fl_clock_s() - t0;
    return dt > 0 ? dt : 1e-9;
}

void sched_get_stats(const sched_t *s, sched_stats_t *st)
{
    *st = s->st;
    st->running = s->n_running;
    st->waiting = s->n_waiting;
    st->kv_blocks_cached = kv_cache_evictable_blocks(s->kv);
    st->kv_blocks_used = kv_cache_used_blocks(s->kv) - 1; /* the liveness block */
}
