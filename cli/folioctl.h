/* folioctl.h - what folioctl's files share: the parsed flags, the commands (one file per family:
 * cmd_local.c runs the model in this process, cmd_remote.c generates through a coordinator,
 * cmd_admin.c starts and inspects a cluster) and the few helpers more than one family uses
 * (folioctl.c). */
#ifndef FOLIO_FOLIOCTL_H
#define FOLIO_FOLIOCTL_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

#include "cli_gen_flags.h"
#include "engine.h"
#include "folio_client.h"
#include "tokenizer.h"

typedef struct ctl_flags {
    engine_opts_t engine;
    cli_gen_flags_t gen;     /* -n, sampling, --stop, --ignore-eos (run, chat, generate) */
    const char *prompt;
    bool json, chat;
    bool plain_text;         /* tokenize: special-token spellings stay text */
    const char *system;
    /* cluster commands */
    bool local;              /* chat --local: offline */
    const char *coordinator; /* client endpoint */
    const char *curve_secret, *coordinator_key; /* CURVE key files (folio_client_opts_t) */
    const char *out_dir, *key_name;             /* keygen --out DIR [--name NAME] */
    bool insecure;                              /* up: the coordinator's --insecure */
    const char *tenant;
    long timeout_ms;
    bool no_migrate;         /* generate, chat: end UNAVAILABLE if the group is lost mid-stream */
    const char *positional;  /* drain/undrain GROUP */
    /* up */
    long groups, threads_per_worker, max_batch_tokens, heartbeat_ms;
    long tp; /* up --tp: ranks (worker processes) per group */
    const char *policy, *listen, *workers, *log_dir;
    const char *spec_tree;      /* up: the workers' --spec-tree */
    const char *http;           /* up: the gateway's --http [ADDR:]PORT (NULL: $FOLIO_HTTP or 8080) */
    bool no_http;               /* up: no gateway */
    bool no_prefix_cache;
} ctl_flags_t;

/* cmd_local.c */
int cmd_run(const ctl_flags_t *f, bool chat);
int cmd_chat_local(const ctl_flags_t *f);
int cmd_tokenize(const ctl_flags_t *f);
/* cmd_remote.c */
int cmd_generate(const ctl_flags_t *f);
int cmd_chat(const ctl_flags_t *f);
/* cmd_admin.c */
int cmd_up(const ctl_flags_t *f);
int cmd_status(const ctl_flags_t *f);
int cmd_metrics(const ctl_flags_t *f);
int cmd_health(const ctl_flags_t *f);
int cmd_drain(const ctl_flags_t *f, bool undrain);
int cmd_keygen(const ctl_flags_t *f);

/* ---- shared (folioctl.c) ---- */

/* A conversation: the messages so far (strings owned), for chat's multi-turn REPLs. */
typedef struct conversation {
    tok_chat_msg_t *msgs;
    int n, cap;
} conversation_t;
bool conversation_add(conversation_t *c, const char *role, const char *content, size_t len);
void conversation_free(conversation_t *c);
/* chat's REPL: reads user turns from stdin (a "> " prompt on a terminal) until EOF; "/reset"
 * clears conv. turn() answers one line (and adds it and the answer to conv); a negative return
 * stops the loop with status 1. Returns the last turn's status. */
int ctl_repl(conversation_t *conv, int (*turn)(void *user, const char *line), void *user);

/* SIGINT/SIGTERM count, from ctl_on_interrupt. */
extern volatile sig_atomic_t ctl_interrupted;
void ctl_on_interrupt(int sig);
/* Installs fn without SA_RESTART, so a blocking poll returns EINTR and the loop can react. */
void ctl_set_handler(int sig, void (*fn)(int));
/* A client of --coordinator; prints the error and returns NULL on failure. */
folio_client_t *ctl_connect(const ctl_flags_t *f);

#endif
