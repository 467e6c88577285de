/* gateway.h - folio-gateway: the OpenAI-compatible HTTP API in front of a coordinator.
 *
 * One gateway is one libmicrohttpd daemon and one client connection to the coordinator, driven by
 * one event loop on one thread (gateway.c says why), plus the control thread of control.h. */
#ifndef FOLIO_GW_GATEWAY_H
#define FOLIO_GW_GATEWAY_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

#include "api_keys.h"
#include "error.h"
#include "openai.h"

#define GATEWAY_DEFAULT_PORT      8080
#define GATEWAY_DEFAULT_MAX_BODY  (8u << 20)
#define GATEWAY_DEFAULT_MAX_CONNS 4096

typedef struct gateway_opts {
    const char *coordinator; /* client endpoint */
    const char *http_addr;   /* host or address to listen on; NULL or "": every IPv4 address */
    int http_port;
    const api_keys_t *keys; /* borrowed; NULL: /v1 is open and every request has tenant "" */
    size_t max_body;        /* request body bytes at most (413 beyond) */
    int max_connections;
    int status_interval_ms; /* Status and Health fetched this often (0: 1000) */
} gateway_opts_t;

typedef struct gateway gateway_t;

/* Listens and connects; NULL with err set (e.g. the port is taken). */
gateway_t *gateway_new(const gateway_opts_t *o, fl_error_t *err);
/* The event loop, until *stop is set (by a signal handler); then answers what is in flight with
 * 503 and returns 0, or a negative code when the loop failed. */
int gateway_run(gateway_t *g, volatile sig_atomic_t *stop);
void gateway_destroy(gateway_t **gp);
/* Logprob token strings from token_text (NULL: "token_id:N"), used only while the cluster serves
 * model_id ("file.gguf:size", the model the function reads). Set after gateway_new, which binds
 * the port first so that a taken port fails at once, before a vocabulary is loaded. */
void gateway_set_token_text(gateway_t *g, oai_token_text_fn fn, void *ctx, const char *model_id);
/* The URL clients use ("http://127.0.0.1:8080"). */
const char *gateway_url(const gateway_t *g);

#endif
