/* test_worker_stream.c - the worker's stop-string matching (worker/main/worker_stream.c).
 *
 * Protects: the earliest match over several stop strings wins, a match is found when it straddles
 * the bytes already searched and the new ones, and the tail held back from a streamed delta is
 * exactly the longest proper prefix of a stop string that ends the text (no more: text must not
 * lag; no less: a stop string must never leak out in pieces). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "../../worker/main/worker.h"

/* worker_stream.c sends through worker_main.c, which is not linked here; the functions under test
 * never send. */
int worker_send(worker_t *w, int cmd, const ProtobufCMessage *body)
{
    (void)w, (void)cmd, (void)body;
    return 0;
}

static worker_req_t make_req(const char **stops, int n)
{
    static size_t lens[8];
    worker_req_t r;
    memset(&r, 0, sizeof r);
    r.stops = stops;
    r.stop_lens = lens;
    r.n_stops = n;
    for (int i = 0; i < n; i++) {
        lens[i] = strlen(stops[i]);
        if (lens[i] > r.max_stop) r.max_stop = lens[i];
    }
    return r;
}

static void earliest_match_over_all_stop_strings_wins(void **state)
{
    (void)state;
    const char *stops[] = {"END", "\n\n", "stop"};
    const worker_req_t r = make_req(stops, 3);
    const char *t = "one two\n\nthree END stop";
    assert_int_equal(worker_find_stop(&r, t, strlen(t), 0), 7);
    assert_int_equal(worker_find_stop(&r, t, strlen(t), 9), 15);
    assert_int_equal(worker_find_stop(&r, "nothing here", 12, 0), -1);
    /* from past the end, or too little text left: no match, no over-read */
    assert_int_equal(worker_find_stop(&r, t, strlen(t), strlen(t) + 5), -1);
    assert_int_equal(worker_find_stop(&r, "EN", 2, 0), -1);
}

static void a_match_straddling_old_and_new_bytes_is_found(void **state)
{
    (void)state;
    const char *stops[] = {"</answer>"};
    const worker_req_t r = make_req(stops, 1);
    const char *t = "42</answer> trailing";
    /* old text ended after "42</ans"; the search starts max_stop - 1 bytes back from there */
    const size_t old = 7, from = old >= r.max_stop ? old - (r.max_stop - 1) : 0;
    assert_int_equal(worker_find_stop(&r, t, strlen(t), from), 2);
}

static void holdback_is_the_longest_stop_prefix_ending_the_text(void **state)
{
    (void)state;
    const char *stops[] = {"STOP", "S!"};
    const worker_req_t r = make_req(stops, 2);
    assert_int_equal(worker_stop_holdback(&r, "abc", 3), 0);
    assert_int_equal(worker_stop_holdback(&r, "abcS", 4), 1);   /* "S" begins both */
    assert_int_equal(worker_stop_holdback(&r, "abcST", 5), 2);  /* "ST" of STOP */
    assert_int_equal(worker_stop_holdback(&r, "abcSTO", 6), 3); /* never the whole stop string */
    assert_int_equal(worker_stop_holdback(&r, "abcSTX", 6), 0);
    assert_int_equal(worker_stop_holdback(&r, "ST", 2), 2); /* text shorter than the stop string */
    assert_int_equal(worker_stop_holdback(&r, "", 0), 0);
    const worker_req_t none = make_req(stops, 0);
    assert_int_equal(worker_stop_holdback(&none, "abcST", 5), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(earliest_match_over_all_stop_strings_wins),
        cmocka_unit_test(a_match_straddling_old_and_new_bytes_is_found),
        cmocka_unit_test(holdback_is_the_longest_stop_prefix_ending_the_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
