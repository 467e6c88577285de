/* fuzz_wire.c - libFuzzer target for every decoder of untrusted protocol bytes (proto/wire.c).
 *
 * Input: one selector byte, then a message body as it would arrive in a frame. The selector picks
 * the decoder (client Request, worker Response, WorkerHello, WorkerLoad; with bit 3, KvPull or
 * KvBlocks between workers), or (bit 2) whole
 * multipart messages: the bytes are cut into frames at 0xFF separators and sent over an inproc
 * DEALER to a ROUTER, where wire_recv(), wire_check_header() and the decoders take them as the
 * coordinator does. Invariants: no crash,
 * leak or over-read; a Request that decodes is valid by wire.c's rules (version, method, exactly
 * one prompt form for Generate, bounded sizes) and can be packed again; when that packing decodes
 * (protobuf-c keeps unknown fields, even ones numbered 0 that it then refuses), it is a fixed point. The coordinator and workers run these same decoders before touching a message. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static void *g_router, *g_dealer;

static void frames_setup(void)
{
    void *ctx = zmq_ctx_new();
    g_router = wire_socket(ctx, ZMQ_ROUTER, NULL, NULL);
    g_dealer = wire_socket(ctx, ZMQ_DEALER, "fuzz", NULL);
    if (!g_router || !g_dealer || zmq_bind(g_router, "inproc://fuzz") || zmq_connect(g_dealer, "inproc://fuzz"))
        abort();
}

/* Sends data cut at 0xFF bytes as one multipart message and takes it apart as the coordinator does. */
static void fuzz_frames(const uint8_t *data, size_t size)
{
    if (!g_router) frames_setup();
    size_t start = 0;
    for (size_t i = 0; i <= size; i++) {
        if (i < size && data[i] != 0xFF) continue;
        zmq_send(g_dealer, data + start, i - start, i < size ? ZMQ_SNDMORE : 0);
        start = i + 1;
    }
    wire_msg_t m;
    fl_error_t err = {0};
    const int rc = wire_recv(g_router, true, false, &m, &err);
    if (!rc && !wire_check_header(&m, WIRE_HEADER_CLIENT, &err)) {
        assert(m.cmd >= 0 && m.cmd <= 255);
        Folio__V1__Request *r = wire_decode_request(m.body, m.body_len, &err);
        if (r) folio__v1__request__free_unpacked(r, NULL);
    }
    assert(rc || m.header);
    wire_msg_close(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    if (data[0] & 4) {
        fuzz_frames(data + 1, size - 1);
        return 0;
    }
    const uint8_t *body = data + 1;
    const size_t len = size - 1;
    fl_error_t err = {0};
    if (data[0] & 8) { /* the worker <-> worker decoders (KV block pulls) */
        if (data[0] & 1) {
            Folio__V1__KvBlocks *b = wire_decode_kv_blocks(body, len, &err);
            if (b) folio__v1__kv_blocks__free_unpacked(b, NULL);
        } else {
            Folio__V1__KvPull *p = wire_decode_kv_pull(body, len, &err);
            if (p) {
                assert(p->n_tokens > 0);
                for (size_t i = 0; i < p->n_tokens; i++) assert(p->tokens[i] >= 0);
                folio__v1__kv_pull__free_unpacked(p, NULL);
            } else {
                assert(err.msg[0]);
            }
        }
        return 0;
    }
    switch (data[0] & 3) {
    case 0: {
        Folio__V1__Request *r = wire_decode_request(body, len, &err);
        if (!r) {
            assert(err.msg[0]); /* every refusal says why */
            break;
        }
        assert(r->version == WIRE_VERSION);
        if (r->method == FOLIO__V1__METHOD__METHOD_GENERATE) assert(r->generate);
        const size_t n = folio__v1__request__get_packed_size(r);
        uint8_t *buf = malloc(n ? n : 1);
        folio__v1__request__pack(r, buf);
        Folio__V1__Request *again = wire_decode_request(buf, n, NULL);
        if (again) {
            assert(folio__v1__request__get_packed_size(again) == n);
            uint8_t *buf2 = malloc(n ? n : 1);
            folio__v1__request__pack(again, buf2);
            assert(!memcmp(buf, buf2, n));
            folio__v1__request__free_unpacked(again, NULL);
            free(buf2);
        }
        free(buf);
        folio__v1__request__free_unpacked(r, NULL);
        break;
    }
    case 1: {
        Folio__V1__Response *r = wire_decode_response(body, len, &err);
        if (r) folio__v1__response__free_unpacked(r, NULL);
        break;
    }
    case 2: {
        Folio__V1__WorkerHello *h = wire_decode_hello(body, len, &err);
        if (h) {
            assert(h->tp_size > 0 && h->rank < h->tp_size && h->block_size > 0);
            folio__v1__worker_hello__free_unpacked(h, NULL);
        }
        break;
    }
    default: {
        Folio__V1__WorkerLoad *l = wire_decode_load(body, len, &err);
        if (l) folio__v1__worker_load__free_unpacked(l, NULL);
        break;
    }
    }
    return 0;
}
