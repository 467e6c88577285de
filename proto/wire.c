/* wire.c - folio's ZeroMQ framing and validated protobuf decoding; see wire.h and proto/README.md. */
#include "wire.h"

#include "folio_fields.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Limits a decoded message must respect beyond what protobuf itself checks. */
#define WIRE_MAX_PROMPT_TOKENS (1 << 20)
#define WIRE_MAX_MESSAGES 4096
#define WIRE_MAX_STOP_IDS 64
#define WIRE_MAX_METADATA 64
#define WIRE_MAX_NAME 256

void *wire_socket(void *zctx, int type, const char *identity, fl_error_t *err)
{
    void *s = zmq_socket(zctx, type);
    if (!s) {
        fl_fail(err, FL_EIO, "zmq_socket: %s", zmq_strerror(errno));
        return NULL;
    }
    const int zero = 0, one = 1;
    const int64_t max_msg = WIRE_MAX_MSG_BYTES;
    int rc = zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    if (!rc) rc = zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg);
    if (!rc && type == ZMQ_ROUTER) {
        rc = zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
        if (!rc) rc = zmq_setsockopt(s, ZMQ_ROUTER_HANDOVER, &one, sizeof one);
    }
    if (!rc && identity && *identity) rc = zmq_setsockopt(s, ZMQ_ROUTING_ID, identity, strlen(identity));
    if (rc) {
        fl_fail(err, FL_EIO, "zmq_setsockopt: %s", zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    return s;
}

void wire_msg_close(wire_msg_t *m)
{
    for (int i = 0; i < m->n_frames; i++) zmq_msg_close(&m->frames[i]);
    m->n_frames = 0;
}

static void drain_rest(void *sock)
{
    int more = 1;
    size_t len = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more) {
        zmq_msg_t f;
        zmq_msg_init(&f);
        zmq_msg_recv(&f, sock, 0);
        zmq_msg_close(&f);
    }
}

int wire_recv(void *sock, bool router, bool nonblocking, wire_msg_t *m, fl_error_t *err)
{
    memset(m, 0, sizeof *m);
    m->cmd = -1;
    const int n_max = (int)(sizeof m->frames / sizeof m->frames[0]);
    for (;;) {
        if (m->n_frames == n_max) {
            drain_rest(sock);
            return fl_fail(err, FL_EFORMAT, "message has more than %d frames", n_max);
        }
        zmq_msg_t *f = &m->frames[m->n_frames];
        zmq_msg_init(f);
        const int flags = (m->n_frames == 0 && nonblocking) ? ZMQ_DONTWAIT : 0;
        if (zmq_msg_recv(f, sock, flags) < 0) {
            const int e = errno;
            zmq_msg_close(f);
            errno = e;
            if (m->n_frames == 0 && e == EAGAIN) return FL_EIO;
            return fl_fail(err, FL_EIO, "zmq_msg_recv: %s", zmq_strerror(e));
        }
        m->n_frames++;
        if (!zmq_msg_more(f)) break;
    }
    int i = 0;
    if (router) {
        m->identity = zmq_msg_data(&m->frames[0]);
        m->identity_len = zmq_msg_size(&m->frames[0]);
        i = 1;
    }
    if (i < m->n_frames && zmq_msg_size(&m->frames[i]) == 0) {
        m->has_delimiter = true;
        i++;
    }
    if (i >= m->n_frames) return fl_fail(err, FL_EFORMAT, "message has no protocol header frame");
    m->header = zmq_msg_data(&m->frames[i]);
    m->header_len = zmq_msg_size(&m->frames[i]);
    i++;
    if (i < m->n_frames) {
        if (zmq_msg_size(&m->frames[i]) == 1) m->cmd = *(const uint8_t *)zmq_msg_data(&m->frames[i]);
        i++;
    }
    if (i < m->n_frames) {
        m->has_body = true;
        m->body = zmq_msg_data(&m->frames[i]);
        m->body_len = zmq_msg_size(&m->frames[i]);
        i++;
    }
    if (i < m->n_frames) return fl_fail(err, FL_EFORMAT, "message has %d frames after the body", m->n_frames - i);
    return FL_OK;
}

int wire_check_header(const wire_msg_t *m, const char *expected, fl_error_t *err)
{
    const size_t n = strlen(expected);
    if (m->header_len == n && !memcmp(m->header, expected, n)) {
        if (m->cmd < 0) return fl_fail(err, FL_EFORMAT, "message has no one-byte command frame");
        return FL_OK;
    }
    const size_t p = strlen(WIRE_HEADER_PREFIX);
    if (m->header_len >= p && m->header_len <= 32 && !memcmp(m->header, WIRE_HEADER_PREFIX, p))
        return fl_fail(err, FL_EUNSUPPORTED, "unsupported protocol header '%.*s' (this side speaks %s)",
                       (int)m->header_len, m->header, expected);
    return fl_fail(err, FL_EFORMAT, "not a folio message (first frame of %zu bytes is not a protocol header)",
                   m->header_len);
}

int wire_send(void *sock, const void *identity, size_t identity_len, bool delimiter, const char *header, int cmd,
              const ProtobufCMessage *body, fl_error_t *err)
{
    uint8_t stack[1024];
    uint8_t *buf = stack;
    size_t len = 0;
    if (body) {
        len = protobuf_c_message_get_packed_size(body);
        if (len > sizeof stack && !(buf = malloc(len))) return fl_fail(err, FL_ENOMEM, "wire: out of memory");
        protobuf_c_message_pack(body, buf);
    }
    const uint8_t cmd_byte = (uint8_t)cmd;
    int rc = 0;
    /* With ROUTER_MANDATORY an unroutable first frame fails at once; later frames of a message
     * whose first frame was accepted do not fail. */
    if (identity && zmq_send(sock, identity, identity_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) rc = -1;
    if (!rc && delimiter && zmq_send(sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) rc = -1;
    if (!rc && zmq_send(sock, header, strlen(header), ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) rc = -1;
    if (!rc && zmq_send(sock, &cmd_byte, 1, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) rc = -1;
    if (!rc && zmq_send(sock, buf, len, ZMQ_DONTWAIT) < 0) rc = -1;
    const int e = errno;
    if (buf != stack) free(buf);
    if (rc) {
        errno = e;
        return fl_fail(err, FL_EIO, "zmq_send: %s", zmq_strerror(e));
    }
    return FL_OK;
}

/* ---- validated decoding ---- */

static bool method_known(int m) { return m >= FOLIO__V1__METHOD__METHOD_GENERATE && m <= FOLIO__V1__METHOD__METHOD_DRAIN; }

/* The ranges every reader of a request applies (folio_fields.h); the vocabulary is the worker's. */
static int check_sampling(const Folio__V1__SamplingParams *s, fl_error_t *err)
{
    char msg[200];
    return folio_sampling_check(s, 0, msg, sizeof msg) ? FL_OK : fl_fail(err, FL_EINVAL, "%s", msg);
}

static int check_generate(const Folio__V1__GenerateRequest *g, fl_error_t *err)
{
    const int forms = (g->text && *g->text) + (g->n_messages > 0) + (g->n_prompt_tokens > 0);
    if (forms != 1)
        return fl_fail(err, FL_EINVAL, forms ? "generate: give exactly one of text, messages, prompt_tokens"
                                             : "generate: empty prompt (text, messages or prompt_tokens)");
    if (g->n_prompt_tokens > WIRE_MAX_PROMPT_TOKENS)
        return fl_fail(err, FL_ERANGE, "generate: %zu prompt tokens exceed the limit of %d", g->n_prompt_tokens,
                       WIRE_MAX_PROMPT_TOKENS);
    for (size_t i = 0; i < g->n_prompt_tokens; i++)
        if (g->prompt_tokens[i] < 0)
            return fl_fail(err, FL_EINVAL, "generate: prompt_tokens[%zu] = %d is negative", i, g->prompt_tokens[i]);
    if (g->n_resume_tokens > WIRE_MAX_PROMPT_TOKENS)
        return fl_fail(err, FL_ERANGE, "generate: %zu resume tokens exceed the limit of %d", g->n_resume_tokens,
                       WIRE_MAX_PROMPT_TOKENS);
    for (size_t i = 0; i < g->n_resume_tokens; i++)
        if (g->resume_tokens[i] < 0)
            return fl_fail(err, FL_EINVAL, "generate: resume_tokens[%zu] = %d is negative", i, g->resume_tokens[i]);
    if (g->n_messages > WIRE_MAX_MESSAGES)
        return fl_fail(err, FL_EINVAL, "generate: %zu messages exceed the limit of %d", g->n_messages,
                       WIRE_MAX_MESSAGES);
    for (size_t i = 0; i < g->n_messages; i++) {
        const char *role = g->messages[i]->role;
        if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant"))
            return fl_fail(err, FL_EINVAL, "generate: messages[%zu].role '%.32s' is not system, user or assistant", i,
                           role);
    }
    char msg[200];
    if (!folio_stops_check(g->stop, g->n_stop, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    if (g->n_stop_token_ids > WIRE_MAX_STOP_IDS)
        return fl_fail(err, FL_EINVAL, "generate: %zu stop token ids exceed the limit of %d", g->n_stop_token_ids,
                       WIRE_MAX_STOP_IDS);
    if (*g->kv_pull_endpoint && !wire_endpoint_ok(g->kv_pull_endpoint))
        return fl_fail(err, FL_EINVAL, "generate: kv_pull_endpoint '%.64s' is not a tcp:// or ipc:// endpoint",
                       g->kv_pull_endpoint);
    if (g->kv_pull_blocks > WIRE_MAX_PROMPT_TOKENS)
        return fl_fail(err, FL_ERANGE, "generate: kv_pull_blocks %u exceeds the limit of %d", g->kv_pull_blocks,
                       WIRE_MAX_PROMPT_TOKENS);
    if (!folio_spec_check(g, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    if (!folio_constraint_check(g, msg, sizeof msg)) return fl_fail(err, FL_EINVAL, "%s", msg);
    return check_sampling(g->sampling, err);
}

Folio__V1__Request *wire_decode_request(const uint8_t *body, size_t len, fl_error_t *err)
{
    if (len > WIRE_MAX_BODY_BYTES) {
        fl_fail(err, FL_ERANGE, "request of %zu bytes exceeds the limit of %u", len, WIRE_MAX_BODY_BYTES);
        return NULL;
    }
    Folio__V1__Request *r = folio__v1__request__unpack(NULL, len, body);
    if (!r) {
        fl_fail(err, FL_EFORMAT, "request body of %zu bytes is not a valid folio.v1.Request", len);
        return NULL;
    }
    int rc = FL_OK;
    if (r->version != WIRE_VERSION)
        rc = fl_fail(err, FL_EUNSUPPORTED, "protocol version %u is not supported (this server speaks %d)", r->version,
                     WIRE_VERSION);
    else if (r->id == 0)
        rc = fl_fail(err, FL_EINVAL, "request id 0 is reserved (it names replies to what could not be read)");
    else if (!method_known(r->method))
        rc = fl_fail(err, FL_EINVAL, "unknown method %d", (int)r->method);
    else if (strlen(r->tenant) > WIRE_MAX_NAME)
        rc = fl_fail(err, FL_EINVAL, "tenant name longer than %d bytes", WIRE_MAX_NAME);
    else if (r->n_metadata > WIRE_MAX_METADATA)
        rc = fl_fail(err, FL_EINVAL, "%zu metadata entries exceed the limit of %d", r->n_metadata, WIRE_MAX_METADATA);
    else if (r->method == FOLIO__V1__METHOD__METHOD_GENERATE && !r->generate)
        rc = fl_fail(err, FL_EINVAL, "Generate without a generate payload");
    else if (r->method == FOLIO__V1__METHOD__METHOD_GENERATE)
        rc = check_generate(r->generate, err);
    else if (r->method == FOLIO__V1__METHOD__METHOD_CANCEL && !r->cancel)
        rc = fl_fail(err, FL_EINVAL, "Cancel without a cancel payload");
    else if (r->method == FOLIO__V1__METHOD__METHOD_DRAIN && (!r->drain || strlen(r->drain->group) > WIRE_MAX_NAME))
        rc = fl_fail(err, FL_EINVAL, "Drain without a group");
    if (rc) {
        folio__v1__request__free_unpacked(r, NULL);
        return NULL;
    }
    return r;
}

/* A base-128 varint at *p, at most 10 bytes; false when it runs past end or is longer. */
static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        const uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

bool wire_peek_request(const uint8_t *body, size_t len, uint64_t *id, Folio__V1__Method *method)
{
    *id = 0;
    *method = FOLIO__V1__METHOD__METHOD_UNSPECIFIED;
    if (!body) return false;
    const uint8_t *p = body, *end = body + len;
    bool found = false;
    for (int n = 0; p < end && n < WIRE_PEEK_MAX_FIELDS; n++) {
        uint64_t key, v;
        if (!read_varint(&p, end, &key)) break;
        const uint64_t field = key >> 3;
        switch (key & 7) {
        case 0: /* varint: Request.id is field 2, Request.method field 3 (the last one counts, as protobuf says) */
            if (!read_varint(&p, end, &v)) return found;
            if (field == 2) *id = v;
            if (field == 3) *method = (Folio__V1__Method)(int32_t)v;
            found |= field == 2 || field == 3;
            break;
        case 1: /* 64-bit */
            if (end - p < 8) return found;
            p += 8;
            break;
        case 2: /* length-delimited: skipped unread */
            if (!read_varint(&p, end, &v) || v > (uint64_t)(end - p)) return found;
            p += v;
            break;
        case 5: /* 32-bit */
            if (end - p < 4) return found;
            p += 4;
            break;
        default: return found;
        }
    }
    return found;
}

Folio__V1__Response *wire_decode_response(const uint8_t *body, size_t len, fl_error_t *err)
{
    Folio__V1__Response *r = folio__v1__response__unpack(NULL, len, body);
    if (!r) {
        fl_fail(err, FL_EFORMAT, "response body of %zu bytes is not a valid folio.v1.Response", len);
        return NULL;
    }
    if (r->version != WIRE_VERSION) {
        fl_fail(err, FL_EUNSUPPORTED, "response protocol version %u is not supported", r->version);
        folio__v1__response__free_unpacked(r, NULL);
        return NULL;
    }
    return r;
}

Folio__V1__WorkerHello *wire_decode_hello(const uint8_t *body, size_t len, fl_error_t *err)
{
    Folio__V1__WorkerHello *h = folio__v1__worker_hello__unpack(NULL, len, body);
    if (!h) {
        fl_fail(err, FL_EFORMAT, "READY body of %zu bytes is not a valid folio.v1.WorkerHello", len);
        return NULL;
    }
    if (!*h->group || strlen(h->group) > WIRE_MAX_NAME || h->tp_size == 0 || h->rank >= h->tp_size ||
        h->block_size == 0 || h->kv_blocks == 0) {
        fl_fail(err, FL_EINVAL, "WorkerHello: group '%.64s' rank %u tp %u block_size %u kv_blocks %u is invalid",
                h->group, h->rank, h->tp_size, h->block_size, h->kv_blocks);
        folio__v1__worker_hello__free_unpacked(h, NULL);
        return NULL;
    }
    return h;
}

Folio__V1__WorkerLoad *wire_decode_load(const uint8_t *body, size_t len, fl_error_t *err)
{
    Folio__V1__WorkerLoad *l = folio__v1__worker_load__unpack(NULL, len, body);
    if (!l) fl_fail(err, FL_EFORMAT, "HEARTBEAT body of %zu bytes is not a valid folio.v1.WorkerLoad", len);
    return l;
}

bool wire_endpoint_ok(const char *endpoint)
{
    const size_t n = strlen(endpoint);
    return n > 6 && n <= WIRE_MAX_IDENTITY && (!strncmp(endpoint, "tcp://", 6) || !strncmp(endpoint, "ipc://", 6));
}

Folio__V1__KvPull *wire_decode_kv_pull(const uint8_t *body, size_t len, fl_error_t *err)
{
    Folio__V1__KvPull *p = folio__v1__kv_pull__unpack(NULL, len, body);
    if (!p) {
        fl_fail(err, FL_EFORMAT, "KV_PULL body of %zu bytes is not a valid folio.v1.KvPull", len);
        return NULL;
    }
    const char *bad = NULL;
    if (p->n_tokens == 0 || p->n_tokens > WIRE_MAX_PROMPT_TOKENS) bad = "its token count is 0 or over the limit";
    for (size_t i = 0; !bad && i < p->n_tokens; i++)
        if (p->tokens[i] < 0) bad = "a token id is negative";
    if (!bad && (strlen(p->layout) > 512 || strlen(p->tenant) > 512)) bad = "layout or tenant is too long";
    if (bad) {
        fl_fail(err, FL_EINVAL, "KvPull %llu: %s", (unsigned long long)p->pull_id, bad);
        folio__v1__kv_pull__free_unpacked(p, NULL);
        return NULL;
    }
    return p;
}

Folio__V1__KvBlocks *wire_decode_kv_blocks(const uint8_t *body, size_t len, fl_error_t *err)
{
    Folio__V1__KvBlocks *b = folio__v1__kv_blocks__unpack(NULL, len, body);
    if (!b) fl_fail(err, FL_EFORMAT, "KV_BLOCKS body of %zu bytes is not a valid folio.v1.KvBlocks", len);
    return b;
}

void wire_response_init(Folio__V1__Response *r, uint64_t id, Folio__V1__Method method, bool final)
{
    folio__v1__response__init(r);
    r->version = WIRE_VERSION;
    r->id = id;
    r->method = method;
    r->final = final;
}

void wire_error_reply_init(wire_error_reply_t *r, uint64_t id, Folio__V1__Method method, Folio__V1__StatusCode code,
                           const char *msg)
{
    wire_response_init(&r->resp, id, method, true);
    folio__v1__status__init(&r->status);
    r->status.code = code;
    r->status.message = (char *)msg;
    r->resp.status = &r->status;
}

const char *wire_status_name(int code)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(&folio__v1__status_code__descriptor, code);
    return v ? v->name : "UNKNOWN";
}

const char *wire_finish_name(int reason)
{
    switch (reason) {
    case FOLIO__V1__FINISH_REASON__FINISH_STOP: return "stop";
    case FOLIO__V1__FINISH_REASON__FINISH_LENGTH: return "length";
    case FOLIO__V1__FINISH_REASON__FINISH_CANCELLED: return "cancelled";
    case FOLIO__V1__FINISH_REASON__FINISH_ERROR: return "error";
    default: return "none";
    }
}

Folio__V1__StatusCode wire_status_from_error(int fl_code)
{
    switch (fl_code) {
    case FL_OK: return FOLIO__V1__STATUS_CODE__OK;
    case FL_EINVAL:
    case FL_EFORMAT:
    case FL_EUNSUPPORTED: return FOLIO__V1__STATUS_CODE__INVALID_ARGUMENT;
    case FL_ERANGE:
    case FL_EBUSY:
    case FL_ENOMEM: return FOLIO__V1__STATUS_CODE__RESOURCE_EXHAUSTED;
    case FL_ENOTFOUND: return FOLIO__V1__STATUS_CODE__NOT_FOUND;
    case FL_EPEER: return FOLIO__V1__STATUS_CODE__UNAVAILABLE;
    default: return FOLIO__V1__STATUS_CODE__INTERNAL;
    }
}

const char *wire_endpoint(const char *flag_value, const char *env_name, const char *fallback)
{
    if (flag_value && *flag_value) return flag_value;
    const char *e = env_name ? getenv(env_name) : NULL;
    return e && *e ? e : fallback;
}
