/* curve.h - CurveZMQ keys for folio's links: key files, and the socket options of each side.
 *
 * A key is 32 bytes, written as 40 Z85 characters (ZeroMQ's text form). `folioctl keygen` writes a
 * pair: NAME.secret (mode 0600) and NAME.public, each a '#' comment line and the key; the public
 * file's key line also carries NAME, so `cat *.public` makes a key list (proto/auth.h). A key
 * file is read as its first line that is neither blank nor a comment, whose first field is the key.
 * A comment is a line whose first character other than a blank is '#' (a Z85 key never starts so:
 * its first character stands for a value below 83 of the 85).
 *
 * The coordinator is the CURVE server of both its sockets; workers and clients are CURVE clients
 * that know the coordinator's public key in advance (from a file), so a man in the middle cannot
 * pose as the coordinator, and the coordinator's ZAP handler (proto/auth.c) decides which
 * client keys it accepts. A worker's KV peer socket is a CURVE server of the worker's own key too,
 * behind a ZAP handler of its own, and a pulling worker is its CURVE client (worker_peer.c). No
 * state here; the functions are safe on any thread. */
#ifndef FOLIO_CURVE_H
#define FOLIO_CURVE_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

#define CURVE_KEY_Z85         40 /* characters of a key in Z85, without the NUL */
#define CURVE_KEY_BYTES       32
#define CURVE_KEYGEN_NAME_MAX 64

/* Environment variables a client reads when its options name no key files (proto/folio_client.h). */
#define CURVE_ENV_SECRET          "FOLIO_CURVE_SECRET"
#define CURVE_ENV_COORDINATOR_KEY "FOLIO_COORDINATOR_KEY"

/* Whether this libzmq was built with CURVE (libsodium). */
bool curve_available(void);

/* True when s is exactly CURVE_KEY_Z85 characters that decode as Z85. */
bool curve_key_valid(const char *s, size_t len);

/* The key of a key file's text (see above) into key (CURVE_KEY_Z85 + 1 bytes). name names the text
 * in error messages. */
int curve_key_parse(const char *text, size_t len, const char *name, char *key, fl_error_t *err);
/* The same, read from the file at path. */
int curve_key_read(const char *path, char *key, fl_error_t *err);

/* The public key of a secret one (both Z85; public_key: CURVE_KEY_Z85 + 1 bytes). */
int curve_public_of(const char *secret_key, char *public_key, fl_error_t *err);

/* A new key pair written as DIR/NAME.secret (0600, created, never overwritten) and DIR/NAME.public
 * (0644). NAME: letters, digits, '.', '_', '-'. public_key (may be NULL) gets the public key. */
int curve_keygen(const char *dir, const char *name, char *public_key, fl_error_t *err);

/* A CURVE client side on sock (before zmq_connect): our secret key and the server's public key, both
 * Z85. */
int curve_client_setup(void *sock, const char *secret_key, const char *server_key, fl_error_t *err);
/* The same with both keys read from files. */
int curve_client_setup_files(void *sock, const char *secret_path, const char *server_key_path, fl_error_t *err);
/* A CURVE server side on sock (before zmq_bind): our secret key, and the ZAP domain the handler is
 * told for this socket's connections. */
int curve_server_setup(void *sock, const char *secret_key, const char *zap_domain, fl_error_t *err);

#endif
