/* wire.h - folio's ZeroMQ framing, shared by the coordinator, workers, clients and tests.
 *
 * Every message is a multipart ZeroMQ message (proto/README.md is the full description):
 *   [identity]       added/stripped by ROUTER sockets only
 *   [empty]          optional, from REQ-style clients; echoed back when present
 *   header           "FOLIOC1" (client side) or "FOLIOW1" (worker side): protocol, side, version
 *   command          one byte (WIRE_CMD_*)
 *   body             a protobuf message of folio.proto (may be empty for HEARTBEAT/DISCONNECT)
 * wire_recv() checks the frame structure and header before anything is decoded; the wire_decode_*
 * functions unpack a body and validate it, so malformed bytes end as an error the caller answers,
 * never a crash. Sends never block: ROUTER sockets use ZMQ_ROUTER_MANDATORY and every send
 * ZMQ_DONTWAIT, so an unknown peer or a full queue is an error code.
 *
 * Threading: ZeroMQ sockets belong to one thread; these helpers keep no state of their own. */
#ifndef FOLIO_WIRE_H
#define FOLIO_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <zmq.h>

#include "error.h"
#include "folio.pb-c.h"

#define WIRE_VERSION 1
#define WIRE_HEADER_CLIENT "FOLIOC1"
#define WIRE_HEADER_WORKER "FOLIOW1"
#define WIRE_HEADER_PEER "FOLIOP1" /* worker <-> worker: KV block pulls */
#define WIRE_HEADER_PREFIX "FOLIO" /* a header with this prefix but another side/version is answered */

/* Hard cap before decoding (ZMQ_MAXMSGSIZE: the peer is disconnected above it) and the soft cap above
 * which a well-framed request gets RESOURCE_EXHAUSTED. */
#define WIRE_MAX_MSG_BYTES (64u << 20)
#define WIRE_MAX_BODY_BYTES (8u << 20)
#define WIRE_MAX_IDENTITY 255

/* Default endpoints (contract), each overridable by a flag and environment variable. */
#define WIRE_DEFAULT_CLIENT_ENDPOINT "tcp://127.0.0.1:5555" /* FOLIO_COORDINATOR */
#define WIRE_DEFAULT_WORKER_ENDPOINT "tcp://127.0.0.1:5556" /* FOLIO_WORKER_ENDPOINT */

typedef enum {
    /* client side */
    WIRE_CMD_REQUEST = 0x01,   /* client -> coordinator: Request; coordinator -> worker: Request */
    WIRE_CMD_PARTIAL = 0x02,   /* Response, more follow */
    WIRE_CMD_FINAL = 0x03,     /* Response, the last for its id */
    /* worker side */
    WIRE_CMD_READY = 0x04,     /* worker -> coordinator: WorkerHello (register or re-register) */
    WIRE_CMD_HEARTBEAT = 0x05, /* worker -> coordinator: WorkerLoad; coordinator -> worker: empty */
    WIRE_CMD_DISCONNECT = 0x06, /* either way, empty: the sender forgets the peer (worker re-sends READY) */
    WIRE_CMD_KV_EVENTS = 0x07,  /* worker -> coordinator: KvEvents (its prefix cache's changes) */
    WIRE_CMD_JOIN = 0x08,       /* coordinator -> worker of rank > 0: GroupJoin (rank 0's communicator) */
    /* peer side (worker <-> worker, header FOLIOP1) */
    WIRE_CMD_KV_PULL = 0x09,    /* puller -> holder: KvPull */
    WIRE_CMD_KV_BLOCKS = 0x0a   /* holder -> puller: KvBlocks, one or more per KvPull */
} wire_cmd_t;

/* A received message; frames stay owned by it until wire_msg_close(). */
typedef struct wire_msg {
    zmq_msg_t frames[6];
    int n_frames;
    const uint8_t *identity; /* ROUTER only, else NULL */
    size_t identity_len;
    bool has_delimiter;      /* an empty frame preceded the header */
    const char *header;      /* not NUL-terminated */
    size_t header_len;
    int cmd;                 /* -1 when the command frame is missing or not one byte */
    bool has_body;           /* a body frame came (it may be empty) */
    const uint8_t *body;
    size_t body_len;
} wire_msg_t;

/* Creates a socket with folio's options: LINGER 0, MAXMSGSIZE, ROUTER_MANDATORY and
 * ROUTER_HANDOVER on ROUTER sockets, the identity (if not NULL) on DEALERs. */
void *wire_socket(void *zctx, int type, const char *identity, fl_error_t *err);

/* Receives one whole multipart message (ZMQ_DONTWAIT when nonblocking). Returns 0, FL_EIO with
 * errno EAGAIN when nothing is waiting, or FL_EFORMAT for a message whose framing is wrong (too many
 * frames, no header); in every case but EAGAIN m must be closed. Header and command are not
 * judged here: see wire_check_header(). */
int wire_recv(void *sock, bool router, bool nonblocking, wire_msg_t *m, fl_error_t *err);
void wire_msg_close(wire_msg_t *m);
/* 0 when m carries the expected header and a command byte; FL_EUNSUPPORTED for a folio header of
 * another version or side; FL_EFORMAT otherwise. */
int wire_check_header(const wire_msg_t *m, const char *expected_header, fl_error_t *err);

/* Sends [identity] [empty if delimiter] header cmd body, never blocking. body may be NULL (empty
 * frame). Returns 0, or FL_EIO with errno EHOSTUNREACH (peer gone) / EAGAIN (queue full). */
int wire_send(void *sock, const void *identity, size_t identity_len, bool delimiter, const char *header, int cmd,
              const ProtobufCMessage *body, fl_error_t *err);

/* Decoders for untrusted bytes: unpack, then validate versions, enums, sizes and which payload is
 * set (a Request's id 0 is reserved: refused). Return NULL with a message (for the error reply) on
 * any problem. Free with the matching folio__v1__*__free_unpacked(x, NULL). */
Folio__V1__Request *wire_decode_request(const uint8_t *body, size_t len, fl_error_t *err);
Folio__V1__Response *wire_decode_response(const uint8_t *body, size_t len, fl_error_t *err);
Folio__V1__WorkerHello *wire_decode_hello(const uint8_t *body, size_t len, fl_error_t *err);
Folio__V1__WorkerLoad *wire_decode_load(const uint8_t *body, size_t len, fl_error_t *err);
Folio__V1__KvPull *wire_decode_kv_pull(const uint8_t *body, size_t len, fl_error_t *err);
Folio__V1__KvBlocks *wire_decode_kv_blocks(const uint8_t *body, size_t len, fl_error_t *err);
/* An endpoint a worker may be told to connect to: tcp:// or ipc://, at most WIRE_MAX_IDENTITY bytes. */
bool wire_endpoint_ok(const char *endpoint);

/* The id and method of a request body that wire_decode_request() refused, so the error reply can
 * name them: a scan of the body's top-level fields (at most WIRE_PEEK_MAX_FIELDS, length-delimited
 * ones skipped unread), so an oversized, truncated or otherwise invalid body still gives the id and
 * the method number it carries, whatever that number is. True when either was found; id 0 and
 * METHOD_UNSPECIFIED for what was not. */
#define WIRE_PEEK_MAX_FIELDS 4096
bool wire_peek_request(const uint8_t *body, size_t len, uint64_t *id, Folio__V1__Method *method);

/* A Response of this protocol version for request id (fields beyond these left empty). */
void wire_response_init(Folio__V1__Response *r, uint64_t id, Folio__V1__Method method, bool final);

/* Builds a final error Response in caller storage (status and its message borrowed from msg). */
typedef struct wire_error_reply {
    Folio__V1__Response resp;
    Folio__V1__Status status;
} wire_error_reply_t;
void wire_error_reply_init(wire_error_reply_t *r, uint64_t id, Folio__V1__Method method, Folio__V1__StatusCode code,
                           const char *msg);

/* gRPC-style names ("UNAVAILABLE") and folio's finish reasons ("stop", "length", ...). */
const char *wire_status_name(int code);
const char *wire_finish_name(int reason);

/* Maps an FL_E* code to the status a reply carries. */
Folio__V1__StatusCode wire_status_from_error(int fl_code);

/* The endpoint to use: flag value, else the environment variable, else the default. */
const char *wire_endpoint(const char *flag_value, const char *env_name, const char *fallback);

#endif
