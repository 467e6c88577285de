"""A folio client in Python, written from proto/README.md and proto/folio.proto alone.

It is the protocol's other-language check: if this works, the framing page is complete enough for
a client in any language with ZeroMQ and protobuf. Usage: python_client.py ENDPOINT GEN_DIR
(GEN_DIR holds folio_pb2.py from `protoc --python_out`). Exits non-zero on the first failed check.
"""
import sys

import zmq

sys.path.insert(0, sys.argv[2])
import folio_pb2 as pb  # noqa: E402

HEADER = b"FOLIOC1"
REQUEST, PARTIAL, FINAL = b"\x01", b"\x02", b"\x03"


def send(sock, req, header=HEADER, command=REQUEST):
    sock.send_multipart([header, command, req.SerializeToString()])


def recv(sock, timeout_ms=20000):
    if not sock.poll(timeout_ms):
        raise SystemExit("FAIL no reply within %d ms" % timeout_ms)
    frames = sock.recv_multipart()
    assert len(frames) == 3 and frames[0] == HEADER, frames
    resp = pb.Response()
    resp.ParseFromString(frames[2])
    assert resp.final == (frames[1] == FINAL), (frames[1], resp.final)
    return resp


def check(name, cond, quiet=False):
    if not cond or not quiet:
        print(("ok   " if cond else "FAIL ") + name)
    if not cond:
        sys.exit(1)


def main():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sys.argv[1])

    # Health (unary): one FINAL.
    send(sock, pb.Request(version=1, id=1, method=pb.METHOD_HEALTH))
    r = recv(sock)
    check("health answers serving", r.final and r.id == 1 and r.status.code == pb.OK and r.health.serving)

    # Two streaming Generates in flight at once: partial deltas, then exactly one FINAL each.
    for rid, text in ((2, "hello world"), (3, "the quick brown fox")):
        g = pb.GenerateRequest(text=text, max_tokens=12, stream=True, ignore_eos=True)
        send(sock, pb.Request(version=1, id=rid, method=pb.METHOD_GENERATE, generate=g))
    tokens, finals = {2: [], 3: []}, {}
    while len(finals) < 2:
        r = recv(sock)
        check("reply names a live request", r.id in tokens and r.id not in finals, quiet=True)
        if r.delta.tokens:
            check("delta index continues the stream", r.delta.index == len(tokens[r.id]), quiet=True)
            tokens[r.id].extend(r.delta.tokens)
        if r.final:
            finals[r.id] = r
    for rid in (2, 3):
        f = finals[rid]
        check("generate %d ends OK with length" % rid,
              f.status.code == pb.OK and f.result.finish_reason == pb.FINISH_LENGTH)
        check("generate %d streamed 12 tokens" % rid,
              len(tokens[rid]) == 12 and f.result.usage.completion_tokens == 12)
        check("generate %d names its group" % rid, f.result.group != "")

    # Non-streaming: everything in the FINAL's delta.
    g = pb.GenerateRequest(text="hello world", max_tokens=12, ignore_eos=True)
    send(sock, pb.Request(version=1, id=4, method=pb.METHOD_GENERATE, generate=g))
    r = recv(sock)
    check("non-streaming FINAL carries all tokens", r.final and list(r.delta.tokens) == tokens[2])

    # Errors: unknown version, foreign header version, no prompt.
    send(sock, pb.Request(version=2, id=5, method=pb.METHOD_STATUS))
    r = recv(sock)
    check("version 2 is INVALID_ARGUMENT", r.final and r.status.code == pb.INVALID_ARGUMENT and r.status.message)
    send(sock, pb.Request(version=1, id=6, method=pb.METHOD_STATUS), header=b"FOLIOC9")
    frames = sock.recv_multipart() if sock.poll(20000) else None
    check("a foreign header version gets an error FINAL", frames is not None and frames[1] == FINAL)
    send(sock, pb.Request(version=1, id=7, method=pb.METHOD_GENERATE, generate=pb.GenerateRequest()))
    r = recv(sock)
    check("generate without a prompt is INVALID_ARGUMENT", r.id == 7 and r.status.code == pb.INVALID_ARGUMENT)

    # Status (unary) lists the groups.
    send(sock, pb.Request(version=1, id=8, method=pb.METHOD_STATUS))
    r = recv(sock)
    check("status lists groups", r.final and r.status.code == pb.OK and len(r.cluster.groups) >= 1)

    # A REQ socket (empty delimiter frame) works too.
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(sys.argv[1])
    req.send_multipart([HEADER, REQUEST, pb.Request(version=1, id=9, method=pb.METHOD_HEALTH).SerializeToString()])
    ok = req.poll(20000)
    frames = req.recv_multipart() if ok else []
    check("a REQ client gets its reply", len(frames) == 3 and frames[1] == FINAL)

    # Id 0 is reserved: refused, under id 0.
    send(sock, pb.Request(version=1, id=0, method=pb.METHOD_HEALTH))
    r = recv(sock)
    check("id 0 is refused INVALID_ARGUMENT", r.id == 0 and r.status.code == pb.INVALID_ARGUMENT)

    # An unknown method comes back as the number sent.
    send(sock, pb.Request(version=1, id=10, method=42))
    r = recv(sock)
    check("an unknown method is echoed", r.id == 10 and r.method == 42 and r.status.code == pb.INVALID_ARGUMENT)

    # A string that is not UTF-8 (protobuf will not build one: patch the bytes).
    g = pb.GenerateRequest(text="caf\u00e9!", max_tokens=4)
    body = pb.Request(version=1, id=11, method=pb.METHOD_GENERATE, generate=g).SerializeToString()
    sock.send_multipart([HEADER, REQUEST, body.replace("\u00e9".encode(), b"\xc3\x28")])
    r = recv(sock)
    check("invalid UTF-8 is INVALID_ARGUMENT with a result",
          r.id == 11 and r.status.code == pb.INVALID_ARGUMENT and r.result.finish_reason == pb.FINISH_ERROR)

    # A reused id of a live stream: refused under id 0, naming it; the stream goes on. Then a
    # Cancel: answered first, no delta after its answer, one FINAL CANCELLED.
    long_gen = pb.GenerateRequest(text="a long one", max_tokens=3000, stream=True, ignore_eos=True)
    send(sock, pb.Request(version=1, id=20, method=pb.METHOD_GENERATE, generate=long_gen))
    send(sock, pb.Request(version=1, id=20, method=pb.METHOD_GENERATE, generate=long_gen))
    refused, received = None, 0
    while refused is None:
        r = recv(sock)
        check("nothing ends the live stream", not (r.id == 20 and r.final), quiet=True)
        if r.id == 20:
            received += len(r.delta.tokens)
        if r.id == 0:
            refused = r
    check("a reused live id is refused under id 0 naming it",
          refused.final and refused.status.code == pb.INVALID_ARGUMENT and "20" in refused.status.message)
    send(sock, pb.Request(version=1, id=21, method=pb.METHOD_CANCEL, cancel=pb.CancelRequest(target_id=20)))
    cancel_answered, target_final = False, None
    while target_final is None:
        r = recv(sock)
        if r.id == 21:
            check("the Cancel is answered OK before its target ends", r.final and r.status.code == pb.OK)
            cancel_answered = True
        elif r.id == 20:
            check("no delta after the Cancel's answer", r.final or not cancel_answered, quiet=True)
            received += len(r.delta.tokens)
            if r.final:
                target_final = r
    check("the cancelled stream ends CANCELLED counting what was received",
          cancel_answered and target_final.status.code == pb.CANCELLED
          and target_final.result.finish_reason == pb.FINISH_CANCELLED
          and target_final.result.usage.completion_tokens == received)

    # A tenant at its limit (this coordinator runs with --max-inflight-per-tenant 2): retryable.
    for rid in (30, 31, 32):
        send(sock, pb.Request(version=1, id=rid, method=pb.METHOD_GENERATE, tenant="busy", generate=long_gen))
    over = None
    while over is None:
        r = recv(sock)
        if r.id == 32:
            over = r
    check("a tenant over its limit gets RESOURCE_EXHAUSTED with retry_after_ms",
          over.final and over.status.code == pb.RESOURCE_EXHAUSTED and over.status.retry_after_ms > 0)
    for rid in (30, 31):
        send(sock, pb.Request(version=1, id=40 + rid, method=pb.METHOD_CANCEL, cancel=pb.CancelRequest(target_id=rid)))
    ended = set()
    while len(ended) < 4:
        r = recv(sock)
        if r.final and r.id in (30, 31, 70, 71):
            ended.add(r.id)
    # A prompt longer than any context the groups serve never fits: no retry hint.
    send(sock, pb.Request(version=1, id=50, method=pb.METHOD_GENERATE,
                          generate=pb.GenerateRequest(prompt_tokens=[5] * 5000, max_tokens=4)))
    r = recv(sock)
    check("a prompt that can never fit is RESOURCE_EXHAUSTED without a retry hint",
          r.id == 50 and r.status.code == pb.RESOURCE_EXHAUSTED and r.status.retry_after_ms == 0)


if __name__ == "__main__":
    main()
