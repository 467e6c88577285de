/* auth.h - who is at the other end of a CURVE-encrypted socket: key lists and a ZAP handler.
 *
 * --curve-secret makes the coordinator the CURVE server of both its sockets (proto/curve.h), and a
 * ZAP handler (ZeroMQ RFC 27) on a thread of its own decides each connection from its public key:
 *   - the worker socket (ZAP domain AUTH_DOMAIN_WORKERS) takes the keys of --worker-keys, lines
 *     `PUBLICKEY [NAME]`; any other key cannot connect, so it cannot register;
 *   - the client socket (AUTH_DOMAIN_CLIENTS) takes the keys of --client-keys, lines
 *     `PUBLICKEY TENANT [ROLE...]` (TENANT `-` is the default tenant ""; ROLE `admin` or `gateway`),
 *     and with --clients-open any other key too, as the default tenant without roles.
 * A worker with --curve-secret serves KV block pulls on a CURVE socket of its own (worker_peer.c)
 * with the same handler in its process: its domain AUTH_DOMAIN_PEERS takes the keys of the worker's
 * --peer-keys (the coordinator's --worker-keys list), so only the cluster's workers pull.
 * A refused peer gets nothing: libzmq ends its handshake. The handler answers with the key itself
 * as the ZAP User-Id, which libzmq attaches to every message of that connection; the event loop
 * reads it back (auth_user_key, auth_client_peer) and finds the key's tenant and roles in the same
 * list. The lists never change after start, so the two threads share them without locks.
 *
 * What a client's key decides (clients.c): a Generate runs as the key's tenant, whatever its
 * Request.tenant says, except from a `gateway` key (folio-gateway, which maps its HTTP API keys to
 * tenants itself), whose Request.tenant is taken as is (its own tenant when empty); Drain needs an
 * `admin` key; Status shows a key that is neither admin nor gateway its own tenant's view. Without
 * --curve-secret there is no handler: every peer is trusted as before (the endpoints then default
 * to loopback; coordinator_main.c). */
#ifndef FOLIO_AUTH_H
#define FOLIO_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include "curve.h"
#include "error.h"
#include "wire.h"

#define AUTH_DOMAIN_CLIENTS "folio-clients"
#define AUTH_DOMAIN_WORKERS "folio-workers"
#define AUTH_DOMAIN_PEERS   "folio-peers" /* a worker's KV peer socket: the workers list too */
#define AUTH_NAME_MAX       256 /* bytes of a tenant or worker name (the wire allows 256 for a tenant) */

enum { AUTH_ROLE_ADMIN = 1u << 0, AUTH_ROLE_GATEWAY = 1u << 1 };

typedef struct auth_key {
    char key[CURVE_KEY_Z85 + 1];
    char name[AUTH_NAME_MAX + 1]; /* a client's tenant ("" the default); a worker's name, may be "" */
    unsigned roles;               /* clients: AUTH_ROLE_* */
} auth_key_t;

/* A key list, sorted by key. */
typedef struct auth_keys {
    auth_key_t *keys;
    int n;
} auth_keys_t;

/* A list from a file's text (clients: `PUBLICKEY TENANT [ROLE...]`, else `PUBLICKEY [NAME]`; blank
 * lines and comments, as curve.h says, skipped); name names it in messages ("clients.keys:3: ..."). A key listed
 * twice, a bad key, tenant or role, or no key at all is an error. */
auth_keys_t *auth_keys_parse(const char *text, size_t len, const char *name, bool clients, fl_error_t *err);
auth_keys_t *auth_keys_load(const char *path, bool clients, fl_error_t *err);
void auth_keys_destroy(auth_keys_t **kp);
/* The entry of a Z85 key, or NULL. */
const auth_key_t *auth_keys_find(const auth_keys_t *k, const char *key);

typedef struct auth auth_t;

/* Binds the ZAP handler in zctx and starts its thread; call before binding a CURVE socket (libzmq
 * lets every key in while no handler is bound). workers and clients are borrowed until
 * auth_destroy; clients may be NULL (no client is admitted unless clients_open). */
auth_t *auth_new(void *zctx, const auth_keys_t *workers, const auth_keys_t *clients, bool clients_open,
                 fl_error_t *err);
/* Stops the thread and closes its socket (before zmq_ctx_term). Accepts NULL. */
void auth_destroy(auth_t **ap);

/* The sender of a client message, as its key says. */
typedef struct auth_peer {
    const char *tenant; /* borrowed from the list, or "" */
    unsigned roles;
    bool listed; /* its key is in --client-keys (else admitted by --clients-open) */
} auth_peer_t;
void auth_client_peer(const auth_t *a, const wire_msg_t *m, auth_peer_t *out);
/* The public key (Z85) a received message's connection was admitted with, into key (CURVE_KEY_Z85
 * + 1 bytes); false, and key "", on a connection without CURVE. */
bool auth_user_key(const wire_msg_t *m, char *key);
/* The tenant a Generate of p runs as, given the Request.tenant it claimed. */
const char *auth_tenant(const auth_peer_t *p, const char *claimed);

#endif
