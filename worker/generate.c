/* generate.c - the batched generation loop; see generate.h. */
#include "generate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"

const char *gen_finish_name(gen_finish_t f)
{
    switch (f) {
    case GEN_FINISH_STOP: return "stop";
    case GEN_FINISH_LENGTH: return "length";
    case GEN_FINISH_ERROR: return "error";
    default: return "none";
    }
}

typedef struct slot {
    int req;             /* index into reqs, -1 when the slot is idle */
    kv_seq_t seq;
    int n_fed;           /* prompt tokens already run through the model */
    int32_t next_token;  /* last sampled token, fed on the next step */
} slot_t;

static void finish(gen_request_t *r, gen_finish_t f)
{
    r->finish = f;
    r->t_done = fl_clock_s();
}

int gen_run(model_t *m, kv_cache_t *kv, gen_request_t *reqs, int n_reqs, gen_token_fn on_token, void *user,
            gen_stats_t *stats, fl_error_t *err)
{
    const int n_slots = m->max_seqs < m->max_logits ? m->max_seqs : m->max_logits;
    const int max_pos = m->max_blocks * kv->block_size;
    slot_t *slots = calloc((size_t)n_slots, sizeof *slots);
    int32_t *tokens = malloc((size_t)m->max_tokens * sizeof(int32_t));
    int32_t *pos = malloc((size_t)m->max_tokens * sizeof(int32_t));
    int32_t *seq = malloc((size_t)m->max_tokens * sizeof(int32_t));
    int32_t *logit_rows = malloc((size_t)m->max_logits * sizeof(int32_t));
    int32_t *logit_slot = malloc((size_t)m->max_logits * sizeof(int32_t));
    int32_t *sampled = malloc((size_t)m->max_logits * sizeof(int32_t));
    kern_sampling_t *sp = malloc((size_t)m->max_logits * sizeof(kern_sampling_t));
    int32_t *tables = malloc((size_t)n_slots * m->max_blocks * sizeof(int32_t));
    int rc = FL_OK;
    if (!slots || !tokens || !pos || !seq || !logit_rows || !logit_slot || !sampled || !sp || !tables) {
        rc = fl_fail(err, FL_ENOMEM, "generate: out of memory");
        goto out;
    }
    for (int s = 0; s < n_slots; s++) {
        slots[s].req = -1;
        if (kv_seq_init(&slots[s].seq, m->max_blocks)) {
            rc = fl_fail(err, FL_ENOMEM, "generate: out of memory");
            goto out;
        }
    }
    const double t0 = fl_clock_s();
    for (int i = 0; i < n_reqs; i++) {
        gen_request_t *r = &reqs[i];
        r->n_tokens = 0;
        r->finish = GEN_FINISH_NONE;
        r->error[0] = 0;
        r->t_submit = t0;
        r->t_first_token = r->t_done = 0;
        if (r->n_prompt <= 0) {
            snprintf(r->error, sizeof r->error, "empty prompt: nothing to generate from");
            finish(r, GEN_FINISH_ERROR);
        } else if (r->n_prompt >= max_pos) {
            snprintf(r->error, sizeof r->error, "prompt of %d tokens does not fit the context of %d", r->n_prompt,
                     max_pos);
            finish(r, GEN_FINISH_ERROR);
        } else if (r->max_tokens <= 0) {
            finish(r, GEN_FINISH_LENGTH);
        }
    }
    int next_req = 0;
    for (;;) {
        /* Admit waiting requests into idle slots. */
        for (int s = 0; s < n_slots; s++) {
            if (slots[s].req >= 0) continue;
            while (next_req < n_reqs && reqs[next_req].finish != GEN_FINISH_NONE) next_req++;
            if (next_req == n_reqs) break;
            slots[s].req = next_req++;
            slots[s].n_fed = 0;
        }
        /* Build the step: decode tokens first, then prompt chunks under the token budget. */
        int n = 0, n_logits = 0, n_prompt_step = 0;
        bool has_prompt = false;
        for (int pass = 0; pass < 2; pass++) {
            for (int s = 0; s < n_slots && n < m->max_tokens; s++) {
                slot_t *sl = &slots[s];
                if (sl->req < 0) continue;
                gen_request_t *r = &reqs[sl->req];
                const bool decoding = sl->n_fed == r->n_prompt;
                if (decoding != (pass == 0)) continue;
                int take = decoding ? 1 : r->n_prompt - sl->n_fed;
                if (take > m->max_tokens - n) take = m->max_tokens - n;
                const int start = sl->seq.n_tokens;
                if (kv_seq_reserve(kv, &sl->seq, start + take)) {
                    if (start + take > max_pos) {
                        finish(r, GEN_FINISH_LENGTH);
                    } else {
                        snprintf(r->error, sizeof r->error, "KV cache exhausted (%d blocks of %d tokens)",
                                 kv->n_blocks, kv->block_size);
                        finish(r, GEN_FINISH_ERROR);
                    }
                    kv_seq_reset(kv, &sl->seq);
                    sl->req = -1;
                    continue;
                }
                for (int j = 0; j < take; j++) {
                    tokens[n + j] = decoding ? sl->next_token : r->prompt[sl->n_fed + j];
                    pos[n + j] = start + j;
                    seq[n + j] = s;
                }
                n += take;
                sl->seq.n_tokens += take;
                if (!decoding) {
                    sl->n_fed += take;
                    n_prompt_step += take;
                    has_prompt = true;
                }
                if (sl->n_fed == r->n_prompt) { /* this token's logits choose the next token */
                    logit_rows[n_logits] = n - 1;
                    logit_slot[n_logits] = s;
                    sp[n_logits] = r->sampling;
                    sp[n_logits].position = (uint64_t)r->n_tokens;
                    n_logits++;
                }
            }
        }
        if (n == 0) {
            bool waiting = false;
            for (int s = 0; s < n_slots; s++) waiting |= slots[s].req >= 0;
            if (!waiting && next_req >= n_reqs) break;
            if (!waiting) continue;
            rc = fl_fail(err, FL_ERANGE, "generate: no progress possible (KV cache too small)");
            goto out;
        }
        for (int s = 0; s < n_slots; s++)
            memcpy(tables + (size_t)s * m->max_blocks, slots[s].seq.blocks, (size_t)m->max_blocks * sizeof(int32_t));
        const model_batch_t batch = {.n_tokens = n, .tokens = tokens, .pos = pos, .seq = seq,
                                     .block_tables = tables, .n_seqs = n_slots, .logit_rows = logit_rows,
                                     .n_logits = n_logits};
        const double ts = fl_clock_s();
        if ((rc = model_forward(m, kv, &batch, err))) goto out;
        model_sample(m, sampled, n_logits, sp);
        const double te = fl_clock_s();
        if (stats) {
            stats->steps++;
            if (has_prompt) stats->prefill_s += te - ts;
            else {
                stats->decode_s += te - ts;
                stats->decode_step_tokens += n;
            }
            stats->prompt_tokens += n_prompt_step;
        }
        for (int i = 0; i < n_logits; i++) {
            slot_t *sl = &slots[logit_slot[i]];
            gen_request_t *r = &reqs[sl->req];
            const int32_t t = sampled[i];
            if (r->n_tokens == 0) r->t_first_token = te;
            if (!r->ignore_eog && tok_is_eog(m->tok, t)) {
                finish(r, GEN_FINISH_STOP);
            } else {
                r->tokens[r->n_tokens++] = t;
                if (stats) stats->decode_tokens++;
                if (on_token) on_token(user, sl->req, t);
                sl->next_token = t;
                if (r->n_tokens >= r->max_tokens) finish(r, GEN_FINISH_LENGTH);
                else if (sl->seq.n_tokens >= max_pos) finish(r, GEN_FINISH_LENGTH);
            }
            if (r->finish != GEN_FINISH_NONE) {
                kv_seq_reset(kv, &sl->seq);
                sl->req = -1;
            }
        }
    }
out:
    if (slots)
        for (int s = 0; s < n_slots; s++) kv_seq_free(kv, &slots[s].seq);
    free(slots);
    free(tokens);
    free(pos);
    free(seq);
    free(logit_rows);
    free(logit_slot);
    free(sampled);
    free(sp);
    free(tables);
    return rc;
}
