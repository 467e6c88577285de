/* cmd_remote.c - folioctl's generation through a coordinator (--coordinator EP):
 *
 *   generate -p TEXT   one request, streamed (--chat: -p as a user message)
 *   chat               chat; without -p a multi-turn REPL on stdin whose history travels as messages
 *
 * The request goes through libfolio-client's folio_client_generate, whose delta callback prints the
 * text as it comes and turns Ctrl-C into a Cancel (the stream still ends with its final status); a
 * second Ctrl-C gives up waiting. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "cli_json.h"
#include "clock.h"
#include "folioctl.h"
#include "log.h"
#include "wire.h"

/* Fails fast (with a hint) when nothing answers at the endpoint, rather than waiting forever. */
static int check_reachable(folio_client_t *c, const ctl_flags_t *f)
{
    fl_error_t err = {0};
    Folio__V1__Response *r = NULL;
    if (folio_client_health(c, 5000, &r, &err) != FL_OK) {
        fprintf(stderr, "error: %s\n", err.msg);
        if (err.code == FL_EIO)
            fprintf(stderr, "hint: start a cluster with `folioctl up`, or point --coordinator at one (now %s)\n",
                    wire_endpoint(f->coordinator, "FOLIO_COORDINATOR", WIRE_DEFAULT_CLIENT_ENDPOINT));
        return -1;
    }
    folio__v1__response__free_unpacked(r, NULL);
    return 0;
}

typedef struct remote_ctx {
    bool print;      /* stream text to stdout (not --json) */
    bool cancelling; /* the Cancel notice was printed */
    bool waiting;    /* a progress line is up */
    bool started;    /* a token came: no more progress */
    double t0;       /* when the request was sent */
} remote_ctx_t;

/* Progress while a request queues (stderr a terminal): a timer interrupts the client's wait once a
 * second, and the callback, called for the interruption, rewrites one line until the first token. */
static volatile sig_atomic_t progress_tick;
static void on_progress_tick(int sig)
{
    (void)sig;
    progress_tick = 1;
}

static void progress_timer(bool on)
{
    const struct itimerval t = {.it_interval = {on, 0}, .it_value = {on, 0}};
    if (on) ctl_set_handler(SIGALRM, on_progress_tick);
    setitimer(ITIMER_REAL, &t, NULL);
    if (!on) signal(SIGALRM, SIG_DFL);
}

/* Prints each delta's text; Ctrl-C (ctl_interrupted, also when it interrupts the wait) cancels,
 * a second one abandons. */
static int on_delta(void *user, const folio_event_t *ev)
{
    remote_ctx_t *x = user;
    if (ev->n_tokens > 0 || *ev->text) x->started = true;
    if (progress_tick) {
        progress_tick = 0;
        if (!x->started) {
            fprintf(stderr, "\r[waiting for the first token: %.0f s; the request is queued or its prompt computing]",
                    fl_clock_s() - x->t0);
            x->waiting = true;
        }
    }
    if (x->waiting && x->started) {
        fprintf(stderr, "\r%90s\r", "");
        x->waiting = false;
    }
    if (x->print && *ev->text) {
        fputs(ev->text, stdout);
        fflush(stdout);
    }
    if (!ctl_interrupted) return FOLIO_CONTINUE;
    if (!x->cancelling) {
        x->cancelling = true;
        fprintf(stderr, "\n[cancelling request %llu]\n", (unsigned long long)ev->id);
    }
    return ctl_interrupted > 1 ? FOLIO_ABANDON : FOLIO_CANCEL;
}

/* Sends one Generate and streams its deltas to stdout (unless --json) until its final message.
 * Ctrl-C sends a Cancel and waits for the cancelled stream's end; a second Ctrl-C gives up. With
 * answer non-NULL the generated text is returned there (malloc'd). Returns the exit status. */
static int remote_generate(folio_client_t *c, const ctl_flags_t *f, const folio_chat_message_t *msgs, int n_msgs,
                           char **answer)
{
    const fl_log_level_t summary_level = answer ? FL_LOG_DEBUG : FL_LOG_INFO; /* quiet in the chat REPL */
    folio_generate_params_t p = {.text = n_msgs ? NULL : f->prompt,
                                 .messages = msgs,
                                 .n_messages = n_msgs,
                                 .max_tokens = (int)f->gen.max_tokens,
                                 .sampling = &f->gen.sampling, /* as given: the worker applies the defaults */
                                 .stop = (const char *const *)f->gen.stops,
                                 .n_stop = f->gen.n_stops,
                                 .stream = true,
                                 .ignore_eos = f->gen.ignore_eos,
                                 .tenant = f->tenant,
                                 .timeout_ms = (uint32_t)f->timeout_ms,
                                 .spec = (int)f->gen.spec,
                                 .max_draft = f->gen.max_draft,
                                 .choices = (const char *const *)f->gen.choices,
                                 .n_choices = f->gen.n_choices,
                                 .regex = f->gen.regex,
                                 .json_schema = f->gen.json_schema,
                                 .no_migrate = f->no_migrate};
    ctl_interrupted = 0;
    ctl_set_handler(SIGINT, ctl_on_interrupt);
    /* Without a deadline the coordinator answers when it can; with one, it must end the stream by then. */
    const int idle_ms = f->timeout_ms > 0 ? (int)f->timeout_ms + 30000 : -1;
    remote_ctx_t ctx = {.print = !f->json, .t0 = fl_clock_s()};
    folio_result_t r;
    fl_error_t err = {0};
    const char *want_progress = getenv("FOLIO_PROGRESS");
    const bool progress = want_progress ? *want_progress == '1' : !f->json && isatty(STDERR_FILENO);
    if (progress) progress_timer(true);
    const int got = folio_client_generate(c, &p, on_delta, &ctx, idle_ms, &r, &err);
    if (progress) progress_timer(false);
    if (ctx.waiting) fprintf(stderr, "\r%90s\r", "");
    signal(SIGINT, SIG_DFL);
    const bool have_fin = got == FL_OK;
    int rc = 0;
    if (!f->json && r.text && *r.text) printf("\n");
    if (!have_fin) {
        if (r.id == 0 || ctl_interrupted < 2) fprintf(stderr, "error: %s\n", err.msg); /* not when we gave up */
        rc = 1;
    } else if (r.status != FOLIO__V1__STATUS_CODE__OK) {
        fprintf(stderr, "error: %s: %s\n", wire_status_name(r.status), *r.message ? r.message : "(no message)");
        rc = 1;
    } else if (!f->json) {
        fl_log(summary_level,
               "generated group=%s prompt_tokens=%u cached_prompt_tokens=%u completion_tokens=%u drafted_tokens=%u "
               "accepted_tokens=%u finish=%s first_token_ms=%.1f total_ms=%.1f",
               r.group, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens, r.drafted_tokens, r.accepted_tokens,
               wire_finish_name(r.finish_reason), r.first_token_s * 1e3, r.total_s * 1e3);
    }
    if (f->json && r.id) cli_json_print_result(&r, have_fin);
    if (answer && !rc) {
        *answer = r.text ? r.text : strdup("");
        r.text = NULL;
    }
    folio_result_clear(&r);
    return rc;
}

int cmd_generate(const ctl_flags_t *f)
{
    if (!f->prompt || !*f->prompt) {
        fprintf(stderr, "error: generate needs -p TEXT\n");
        return 2;
    }
    folio_client_t *c = ctl_connect(f);
    if (!c) return 1;
    int rc = 1;
    if (!check_reachable(c, f)) {
        folio_chat_message_t msgs[2];
        int n = 0;
        if (f->chat) {
            if (f->system) msgs[n++] = (folio_chat_message_t){"system", f->system};
            msgs[n++] = (folio_chat_message_t){"user", f->prompt};
        } else if (f->system) {
            fprintf(stderr, "warning: --system is ignored without --chat\n");
        }
        rc = remote_generate(c, f, msgs, n, NULL);
    }
    folio_client_destroy(&c);
    return rc;
}

typedef struct remote_chat {
    folio_client_t *c;
    const ctl_flags_t *f;
    conversation_t conv;
    folio_chat_message_t *msgs; /* the request's messages, grown with conv */
} remote_chat_t;

static int remote_turn(void *user, const char *line)
{
    remote_chat_t *x = user;
    folio_chat_message_t *m = realloc(x->msgs, (size_t)(x->conv.n + 2) * sizeof *m);
    if (!m) return -1;
    x->msgs = m;
    int n = 0;
    if (x->f->system) m[n++] = (folio_chat_message_t){"system", x->f->system};
    for (int i = 0; i < x->conv.n; i++) m[n++] = (folio_chat_message_t){x->conv.msgs[i].role, x->conv.msgs[i].content};
    m[n++] = (folio_chat_message_t){"user", line};
    char *answer = NULL;
    int rc = remote_generate(x->c, x->f, m, n, &answer);
    if (!rc && (!conversation_add(&x->conv, "user", line, strlen(line)) ||
                !conversation_add(&x->conv, "assistant", answer, strlen(answer))))
        rc = 1;
    free(answer);
    return rc;
}

/* chat through the coordinator: the history (system, user, assistant, ...) travels as messages. */
int cmd_chat(const ctl_flags_t *f)
{
    folio_client_t *c = ctl_connect(f);
    if (!c) return 1;
    if (check_reachable(c, f)) {
        folio_client_destroy(&c);
        return 1;
    }
    int rc = 0;
    if (f->prompt) {
        folio_chat_message_t msgs[2];
        int n = 0;
        if (f->system) msgs[n++] = (folio_chat_message_t){"system", f->system};
        msgs[n++] = (folio_chat_message_t){"user", f->prompt};
        rc = remote_generate(c, f, msgs, n, NULL);
        folio_client_destroy(&c);
        return rc;
    }
    remote_chat_t chat = {.c = c, .f = f};
    rc = ctl_repl(&chat.conv, remote_turn, &chat);
    free(chat.msgs);
    conversation_free(&chat.conv);
    folio_client_destroy(&c);
    return rc;
}
