/* test_worker_stream.c - what the worker sends when the coordinator's queue is full
 * (worker/main/worker_stream.c), with worker_send replaced by a recorder that can refuse.
 *
 * Protects: the worker's send queue is bounded without losing anything of a live stream. A PARTIAL
 * that finds the queue full (EAGAIN) keeps its tokens for the next one, which starts at the same
 * index; a FINAL that finds it full keeps its request's slot (still live, listed in heartbeats) until
 * worker_retry_finals gets it out, exactly once, with every token not yet sent; finals dropped for a
 * coordinator that is gone free their slots. A request moved here mid-stream (resume tokens) sends
 * its first delta at the index after them and its FINAL counts them; one whose resume cannot be
 * replayed is refused and takes no slot. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>

#include "../../worker/main/worker.h"

/* The recorder: refuses (EAGAIN) while g_full, else keeps what a Response carried. */
static bool g_full;
static int g_partials, g_finals, g_tokens_sent, g_next_index;
static int g_final_status;
static uint32_t g_final_completion;

int worker_send(worker_t *w, int cmd, const ProtobufCMessage *body)
{
    (void)w;
    if (g_full) {
        errno = EAGAIN;
        return FL_EIO;
    }
    const Folio__V1__Response *r = (const Folio__V1__Response *)body;
    if (cmd == WIRE_CMD_PARTIAL) g_partials++;
    if (cmd == WIRE_CMD_FINAL) {
        g_finals++;
        g_final_status = r->status ? (int)r->status->code : -1;
        g_final_completion = r->result && r->result->usage ? r->result->usage->completion_tokens : 0;
    }
    if (r->delta && r->delta->n_tokens) {
        assert_int_equal(r->delta->index, g_next_index); /* no gap, no index twice */
        g_next_index += (int)r->delta->n_tokens;
        g_tokens_sent += (int)r->delta->n_tokens;
    }
    return 0;
}

static void reset(void)
{
    g_full = false;
    g_partials = g_finals = g_tokens_sent = g_next_index = 0;
    g_final_status = -1;
}

static worker_t make_worker(void)
{
    worker_t w;
    memset(&w, 0, sizeof w);
    w.group = "g0";
    fl_error_t err = {0};
    assert_int_equal(worker_reqs_init(&w, 4, &err), 0);
    return w;
}

static worker_req_t *open_request(worker_t *w, uint64_t id)
{
    static int32_t prompt[] = {1, 2, 3};
    request_t rq;
    memset(&rq, 0, sizeof rq);
    rq.sched = (sched_request_t){.id = id, .prompt = prompt, .n_prompt = 3, .max_tokens = 8};
    rq.stream = true;
    fl_error_t err = {0};
    worker_req_t *r = worker_req_open(w, &rq, &err);
    assert_non_null(r);
    return r;
}

static void a_partial_that_finds_the_queue_full_is_sent_with_the_next(void **state)
{
    (void)state;
    reset();
    worker_t w = make_worker();
    open_request(&w, 7);
    worker_on_token(&w, 7, 0, 40, NULL);
    worker_on_token(&w, 7, 1, 41, NULL);
    g_full = true;
    worker_flush_partials(&w);
    assert_int_equal(g_partials, 0);
    g_full = false;
    worker_on_token(&w, 7, 2, 42, NULL);
    worker_flush_partials(&w);
    assert_int_equal(g_partials, 1);
    assert_int_equal(g_tokens_sent, 3); /* the refused two and the new one, from index 0 */
    worker_reqs_free(&w);
}

static void a_final_that_finds_the_queue_full_waits_and_goes_once(void **state)
{
    (void)state;
    reset();
    worker_t w = make_worker();
    worker_req_t *r = open_request(&w, 9);
    worker_on_token(&w, 9, 0, 40, NULL);
    worker_on_token(&w, 9, 1, 41, NULL);
    g_full = true;
    const sched_result_t res = {.id = 9, .finish = SCHED_FINISH_LENGTH, .n_prompt = 3, .n_generated = 2};
    worker_on_finish(&w, &res);
    assert_int_equal(g_finals, 0);
    assert_int_equal(w.n_pending, 1);
    assert_true(r->live); /* still held: listed in heartbeats, its slot not reused */
    assert_ptr_equal(worker_req_find(&w, 9), r);
    assert_false(worker_retry_finals(&w)); /* still full */
    g_full = false;
    assert_true(worker_retry_finals(&w));
    assert_int_equal(g_finals, 1);
    assert_int_equal(g_final_status, FOLIO__V1__STATUS_CODE__OK);
    assert_int_equal(g_tokens_sent, 2);
    assert_int_equal(w.n_pending, 0);
    assert_null(worker_req_find(&w, 9));
    assert_true(worker_retry_finals(&w)); /* nothing left: never sent twice */
    assert_int_equal(g_finals, 1);
    worker_reqs_free(&w);
}

static void a_moved_request_streams_on_after_its_resumed_tokens(void **state)
{
    (void)state;
    reset();
    worker_t w = make_worker();
    static int32_t prompt[] = {1, 2, 3}, resume[] = {40, 41, 42};
    request_t rq;
    memset(&rq, 0, sizeof rq);
    rq.sched =
        (sched_request_t){.id = 5, .prompt = prompt, .n_prompt = 3, .max_tokens = 8, .resume = resume, .n_resume = 3};
    rq.stream = true;
    fl_error_t err = {0};
    assert_non_null(worker_req_open(&w, &rq, &err));
    g_next_index = 3; /* the client has indices 0..2 */
    worker_on_token(&w, 5, 3, 43, NULL);
    worker_flush_partials(&w);
    assert_int_equal(g_partials, 1);
    assert_int_equal(g_tokens_sent, 1);
    const sched_result_t res = {.id = 5, .finish = SCHED_FINISH_LENGTH, .n_prompt = 3, .n_generated = 4};
    worker_on_finish(&w, &res);
    assert_int_equal(g_finals, 1);
    assert_int_equal(g_final_completion, 4); /* the whole completion */
    assert_int_equal(g_next_index, 4);

    /* Text the resumed tokens cannot have made (no tokenizer here: none): refused, no slot taken. */
    rq.sched.id = 6;
    rq.resume_text_bytes = 1;
    assert_null(worker_req_open(&w, &rq, &err));
    assert_int_equal(err.code, FL_EINVAL);
    assert_int_equal(w.n_free, 4);
    assert_null(worker_req_find(&w, 6));
    worker_reqs_free(&w);
}

static void finals_dropped_for_a_gone_coordinator_free_their_slots(void **state)
{
    (void)state;
    reset();
    worker_t w = make_worker();
    for (uint64_t id = 1; id <= 4; id++) open_request(&w, id);
    assert_int_equal(w.n_free, 0);
    g_full = true;
    for (uint64_t id = 1; id <= 4; id++) {
        const sched_result_t res = {.id = id, .finish = SCHED_FINISH_CANCELLED, .n_prompt = 3};
        worker_on_finish(&w, &res);
    }
    assert_int_equal(w.n_pending, 4);
    worker_drop_finals(&w);
    assert_int_equal(w.n_pending, 0);
    assert_int_equal(w.n_free, 4);
    assert_int_equal(g_finals, 0);
    worker_reqs_free(&w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_partial_that_finds_the_queue_full_is_sent_with_the_next),
        cmocka_unit_test(a_final_that_finds_the_queue_full_waits_and_goes_once),
        cmocka_unit_test(finals_dropped_for_a_gone_coordinator_free_their_slots),
        cmocka_unit_test(a_moved_request_streams_on_after_its_resumed_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
