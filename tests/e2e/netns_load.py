"""Load for the multi-host test (test_multihost_netns.sh): streamed Generates over the wire protocol,
checked against the cluster's invariant (shared/DESIGN.md): each accepted request gets exactly one
final status, no token index is sent twice, none hangs.

Usage: netns_load.py ENDPOINT GEN_DIR N MAX_TOKENS READY_FILE TIMEOUT_S
Sends N streamed requests with distinct prompts at once; touches READY_FILE once half of them have
streamed a token (the shell cuts a link then); waits for every final until TIMEOUT_S. Prints one
JSON line of counts; exits 1 when the invariant breaks.
"""
import json
import sys
import time

import zmq

sys.path.insert(0, sys.argv[2])
import folio_pb2 as pb  # noqa: E402

HEADER = b"FOLIOC1"
REQUEST, PARTIAL, FINAL = b"\x01", b"\x02", b"\x03"


def main():
    endpoint, n, max_tokens = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
    ready_file, timeout_s = sys.argv[5], float(sys.argv[6])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    tokens = {}
    for rid in range(1, n + 1):
        g = pb.GenerateRequest(text="host %d asks: tell me about request number %d" % (rid % 7, rid),
                               max_tokens=max_tokens, stream=True, ignore_eos=True)
        req = pb.Request(version=1, id=rid, method=pb.METHOD_GENERATE, generate=g,
                         timeout_ms=int(timeout_s * 1000))
        sock.send_multipart([HEADER, REQUEST, req.SerializeToString()])
        tokens[rid] = []
    finals, problems, groups = {}, [], {}
    ready = False
    end = time.monotonic() + timeout_s + 5
    while len(finals) < n and time.monotonic() < end:
        if not sock.poll(200):
            continue
        frames = sock.recv_multipart()
        r = pb.Response()
        r.ParseFromString(frames[2])
        if r.id not in tokens:
            problems.append("reply for unknown id %d" % r.id)
            continue
        if r.id in finals:
            problems.append("request %d: a reply after its final" % r.id)
            continue
        if r.delta.tokens:
            if r.delta.index != len(tokens[r.id]):
                problems.append("request %d: delta index %d, expected %d" % (r.id, r.delta.index, len(tokens[r.id])))
            tokens[r.id].extend(r.delta.tokens)
        if frames[1] == FINAL:
            finals[r.id] = r
            if r.result.group:
                groups[r.result.group] = groups.get(r.result.group, 0) + 1
        if not ready and sum(1 for t in tokens.values() if t) >= n // 2:
            open(ready_file, "w").close()
            ready = True
    codes = {}
    for rid, f in finals.items():
        name = pb.StatusCode.Name(f.status.code)
        codes[name] = codes.get(name, 0) + 1
        if f.status.code == pb.OK and len(tokens[rid]) != max_tokens:
            problems.append("request %d: OK with %d of %d tokens" % (rid, len(tokens[rid]), max_tokens))
        if f.status.code not in (pb.OK, pb.UNAVAILABLE):
            problems.append("request %d: final %s (%s)" % (rid, name, f.status.message))
    hung = [rid for rid in tokens if rid not in finals]
    if hung:
        problems.append("%d requests got no final: %s" % (len(hung), hung[:10]))
    print(json.dumps({"finals": len(finals), "codes": codes, "groups": groups, "hung": len(hung),
                      "problems": problems[:20]}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
