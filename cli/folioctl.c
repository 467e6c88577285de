/* folioctl - folio's command-line tool for users and operators.
 *
 * Offline, in this process (no cluster; cmd_local.c):
 *   folioctl run -p TEXT [-n N] [--chat] [sampling] [--json]   generation, like llama-cli
 *   folioctl chat --local [-p TEXT]                             chat (template applied); without -p a
 *                                                               multi-turn REPL on stdin (/reset clears)
 *   folioctl tokenize -p TEXT [--chat] [--plain-text] [--json]  token ids as `run` feeds them
 * Through a coordinator (--coordinator EP, $FOLIO_COORDINATOR, tcp://127.0.0.1:5555; cmd_remote.c):
 *   folioctl generate -p TEXT [--chat] [sampling] [--json]      streamed generation
 *   folioctl chat [-p TEXT]                                     chat, multi-turn REPL without -p
 * Cluster administration (cmd_admin.c):
 *   folioctl up [--groups N] ...                                start a local cluster in the foreground
 *   folioctl status|health [--json]; folioctl metrics; folioctl drain|undrain GROUP
 *   folioctl keygen --out DIR [--name NAME]                     a CURVE key pair (README.md, "Security")
 *
 * Text streams to stdout as it is generated, in whole UTF-8 characters. --json prints one JSON
 * object on the last line of stdout (DESIGN.md's contract: tokens, text, finish_reason, usage,
 * timings; cli_json.c). Logs go to stderr. This file holds main(), the flags (the generation flags
 * in cli_gen_flags.c), the usage text and the helpers the command files share. */
#include "folioctl.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "flags.h"
#include "wire.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: folioctl <command> [flags]\n"
            "commands, offline (the model runs in this process):\n"
            "  run        generate from a prompt (raw completion; --chat applies the template)\n"
            "  chat --local  chat with the model (template applied); interactive without -p\n"
            "  tokenize   print the token ids of a prompt as run would feed it\n"
            "commands, through a coordinator (--coordinator EP):\n"
            "  up         start a local cluster (coordinator, worker groups, HTTP gateway) in the foreground, restarting\n"
            "             a process that dies (with backoff); Ctrl-C stops it\n"
            "  generate   generate from -p TEXT (--chat: as a user message), streamed\n"
            "  chat       chat (template applied); a multi-turn REPL on stdin without -p (/reset clears)\n"
            "  status     groups, restarts, load, KV use, prefix-cache hit rate, mean accepted length of\n"
            "             speculative decoding (ACCEPT), routing latency\n"
            "             (--json: StatusReply)\n"
            "  metrics    the cluster's figures in the Prometheus text format (as the gateway's /metrics)\n"
            "  health     whether the cluster serves (exit 0 when it does)\n"
            "  drain GROUP / undrain GROUP   stop / resume routing new requests to a worker group\n"
            "  keygen --out DIR [--name NAME]  a CURVE key pair: DIR/NAME.secret (mode 0600) and DIR/NAME.public\n"
            "             (NAME default folio), for --curve-secret, --worker-keys, --client-keys, --coordinator-key\n"
            "flags:\n"
            "  -p, --prompt TEXT     prompt text\n"
            "%s"
            "  --chat                apply the model's chat template to -p as a user message\n"
            "  --system TEXT         system message for --chat / chat\n"
            "  --plain-text          tokenize: \"<|im_start|>\" and other special-token spellings in -p stay\n"
            "                        text (default: they become the special tokens, as llama.cpp parses a raw\n"
            "                        prompt; chat message contents are always text)\n"
            "  --json                print one JSON object with tokens, text, finish_reason, usage, timings\n"
            "cluster flags:\n"
            "  --coordinator EP      coordinator client endpoint (default $FOLIO_COORDINATOR or %s)\n"
            "  --curve-secret FILE   this client's CURVE secret key ($FOLIO_CURVE_SECRET): encrypted link\n"
            "  --coordinator-key FILE  the coordinator's public key ($FOLIO_COORDINATOR_KEY), with --curve-secret\n"
            "  --tenant T            prefix-cache tenant (requests of different tenants share no KV)\n"
            "  --timeout-ms N        request deadline (default: none)\n"
            "  --no-migrate          a group lost mid-stream ends the request UNAVAILABLE with the tokens sent\n"
            "                        (default: the stream goes on on another group, the same output)\n"
            "  --local               chat offline in this process instead of through a coordinator\n"
            "up flags (with -m, --kv-budget, --kv-type, --block-size, --heads below, passed to every worker):\n"
            "  --groups N            worker groups, one process each (default 2)\n"
            "  --tp N                tensor parallelism: N worker processes (ranks) per group, each with\n"
            "                        1/N of the model (default 1)\n"
            "  --threads-per-worker N  CPU threads per worker process (default: cores / processes)\n"
            "  --policy P            coordinator routing policy (default: the coordinator's)\n"
            "  --listen EP           client endpoint to listen on (default: as --coordinator)\n"
            "  --workers EP          worker endpoint (default $FOLIO_WORKER_ENDPOINT or %s)\n"
            "  --max-batch-tokens N, --no-prefix-cache, --heartbeat-ms N   worker and coordinator tuning\n"
            "  --spec MODE           the most speculative decoding the workers allow (auto: any a request asks\n"
            "                        for; none turns it off)\n"
            "  --spec-tree PATHS     the workers' Medusa draft tree (folio-worker --help)\n"
            "  --log-dir DIR         each process's log to DIR/<coordinator|worker-gN|gateway>.log (default: stderr)\n"
            "  --http [ADDR:]PORT    the OpenAI-compatible HTTP gateway's address (default $FOLIO_HTTP or 8080:\n"
            "                        every IPv4 address; 127.0.0.1:8080 keeps it to this machine)\n"
            "  --no-http             no HTTP gateway\n"
            "  --insecure            let the coordinator listen beyond loopback unencrypted (its --insecure)\n"
            "engine flags:\n"
            "%s",
            cli_gen_flags_help(), WIRE_DEFAULT_CLIENT_ENDPOINT, WIRE_DEFAULT_WORKER_ENDPOINT, engine_flags_help());
}

static int parse_flags(ctl_flags_t *f, int argc, char **argv)
{
    memset(f, 0, sizeof *f);
    cli_gen_flags_init(&f->gen);
    f->groups = 2;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = engine_parse_flag(&f->engine, argc, argv, &i);
        if (r == 0) r = cli_gen_flag_parse(&f->gen, argc, argv, &i);
        if (r < 0) return -1;
        if (r > 0) continue;
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(f->prompt = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--system")) {
            if (!(f->system = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--json")) {
            f->json = true;
        } else if (!strcmp(a, "--chat")) {
            f->chat = true;
        } else if (!strcmp(a, "--plain-text") && !strcmp(argv[1], "tokenize")) { /* run would ignore it */
            f->plain_text = true;
        } else if (!strcmp(a, "--local")) {
            f->local = true;
        } else if (!strcmp(a, "--no-migrate")) {
            f->no_migrate = true;
        } else if (!strcmp(a, "--no-prefix-cache")) {
            f->no_prefix_cache = true;
        } else if (!strcmp(a, "--no-http")) {
            f->no_http = true;
        } else if (!strcmp(a, "--http")) {
            if (!(f->http = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--coordinator")) {
            if (!(f->coordinator = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--curve-secret")) {
            if (!(f->curve_secret = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--coordinator-key")) {
            if (!(f->coordinator_key = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--out") && !strcmp(argv[1], "keygen")) {
            if (!(f->out_dir = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--name") && !strcmp(argv[1], "keygen")) {
            if (!(f->key_name = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--insecure")) {
            f->insecure = true;
        } else if (!strcmp(a, "--tenant")) {
            if (!(f->tenant = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--policy")) {
            if (!(f->policy = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--listen")) {
            if (!(f->listen = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--workers")) {
            if (!(f->workers = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--spec-tree")) {
            if (!(f->spec_tree = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--log-dir")) {
            if (!(f->log_dir = fl_flag_value(argc, argv, &i))) return -1;
        } else if (!strcmp(a, "--timeout-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, UINT32_MAX, &f->timeout_ms)) return -1;
        } else if (!strcmp(a, "--groups")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1024, &f->groups)) return -1;
        } else if (!strcmp(a, "--tp")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 8, &f->tp)) return -1;
        } else if (!strcmp(a, "--threads-per-worker")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 0, 1024, &f->threads_per_worker)) return -1;
        } else if (!strcmp(a, "--max-batch-tokens")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 1, 1 << 20, &f->max_batch_tokens)) return -1;
        } else if (!strcmp(a, "--heartbeat-ms")) {
            if (!(v = fl_flag_value(argc, argv, &i)) || !fl_flag_int(a, v, 10, 600000, &f->heartbeat_ms)) return -1;
        } else if (a[0] != '-' && !f->positional) {
            f->positional = a;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "error: unknown flag '%s' (folioctl %s --help)\n", a, argv[1]);
            return -1;
        }
    }
    return 0;
}

/* ---- helpers the command files share ---- */

bool conversation_add(conversation_t *c, const char *role, const char *content, size_t len)
{
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 8;
        tok_chat_msg_t *m = realloc(c->msgs, (size_t)cap * sizeof *m);
        if (!m) return false;
        c->msgs = m;
        c->cap = cap;
    }
    char *r = strdup(role), *t = strndup(content, len);
    if (!r || !t) {
        free(r);
        free(t);
        return false;
    }
    c->msgs[c->n++] = (tok_chat_msg_t){r, t};
    return true;
}

void conversation_free(conversation_t *c)
{
    for (int i = 0; i < c->n; i++) {
        free((char *)c->msgs[i].role);
        free((char *)c->msgs[i].content);
    }
    free(c->msgs);
    *c = (conversation_t){0};
}

int ctl_repl(conversation_t *conv, int (*turn)(void *user, const char *line), void *user)
{
    int rc = 0;
    char line[8192];
    if (isatty(0)) fprintf(stderr, "> ");
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "/reset")) {
            conversation_free(conv);
        } else if (*line && (rc = turn(user, line)) < 0) {
            rc = 1;
            break;
        }
        if (isatty(0)) fprintf(stderr, "> ");
    }
    return rc;
}

volatile sig_atomic_t ctl_interrupted;

void ctl_on_interrupt(int sig)
{
    (void)sig;
    ctl_interrupted++;
}

void ctl_set_handler(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

folio_client_t *ctl_connect(const ctl_flags_t *f)
{
    fl_error_t err = {0};
    const folio_client_opts_t o = {
        .endpoint = f->coordinator, .curve_secret = f->curve_secret, .coordinator_key = f->coordinator_key};
    folio_client_t *c = folio_client_new_opts(&o, &err);
    if (!c) fprintf(stderr, "error: %s\n", err.msg);
    return c;
}

static int dispatch(ctl_flags_t *f, const char *cmd)
{
    if (f->positional && strcmp(cmd, "drain") && strcmp(cmd, "undrain")) {
        fprintf(stderr, "error: unexpected argument '%s' (folioctl %s --help)\n", f->positional, cmd);
        return 2;
    }
    if (!strcmp(cmd, "run")) return cmd_run(f, f->chat);
    if (!strcmp(cmd, "chat")) return f->local ? cmd_chat_local(f) : cmd_chat(f);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(f);
    if (!strcmp(cmd, "generate")) return cmd_generate(f);
    if (!strcmp(cmd, "status")) return cmd_status(f);
    if (!strcmp(cmd, "metrics")) return cmd_metrics(f);
    if (!strcmp(cmd, "health")) return cmd_health(f);
    if (!strcmp(cmd, "drain")) return cmd_drain(f, false);
    if (!strcmp(cmd, "undrain")) return cmd_drain(f, true);
    if (!strcmp(cmd, "up")) return cmd_up(f);
    if (!strcmp(cmd, "keygen")) return cmd_keygen(f);
    fprintf(stderr, "error: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    ctl_flags_t f;
    const int rc = parse_flags(&f, argc, argv) ? 2 : dispatch(&f, argv[1]);
    cli_gen_flags_free(&f.gen);
    return rc;
}
