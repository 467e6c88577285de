"""The HTTP gateway from the outside, for tests/e2e/test_gateway.sh: the official `openai` package
(chat and completions, streamed and not, logprobs, batches, errors, API keys), the tokens equal to
`folioctl generate --json`'s, hundreds of concurrent raw SSE streams each equal to the same request
unstreamed (no chunk lost or repeated), and a client that disconnects mid-stream having its request
cancelled in the cluster (seen in /metrics). Prints `ok   NAME` / `FAIL NAME` lines; exit status 1
when any check failed."""
import argparse
import asyncio
import http.client
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request

import openai
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

fails = 0


def check(name, cond, detail=""):
    global fails
    if cond:
        print(f"ok   {name}", flush=True)
    else:
        fails += 1
        print(f"FAIL {name} {detail}", flush=True)


def extra(obj, key):
    """A field the OpenAI types do not declare (folio's token_ids)."""
    return obj.model_dump().get(key)


def metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return text, samples


def total(samples, name, **labels):
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def folioctl_json(args, *flags):
    out = subprocess.run([args.folioctl, "generate", "--coordinator", args.coordinator, *flags, "--json"],
                         capture_output=True, text=True, timeout=120 * args.slow)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sse_events(lines):
    """The data payloads of an SSE body given as an iterator of lines (comments skipped)."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if line.startswith("data: "):
            yield line[6:]


def raw_stream(host, port, path, body, timeout):
    """POST body, read the whole SSE stream: (status, content type, [payloads])."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    ctype = resp.getheader("Content-Type", "")
    if resp.status != 200:
        data = [resp.read().decode()]
    else:
        data = list(sse_events(iter(resp.readline, b"")))
    conn.close()
    return resp.status, ctype, data


def check_client(args, client):
    # /v1/models
    ids = [m.id for m in client.models.list().data]
    check("GET /v1/models lists the served model (openai client)", args.model in ids, ids)
    check("GET /v1/models/{id} (openai client)", client.models.retrieve(args.model).id == args.model)

    # chat, unstreamed then streamed: the same greedy text
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there, gateway"}]
    common = dict(model=args.model, messages=msgs, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.chat.completions.create(**common)
    c = r.choices[0]
    check("chat: one choice, assistant message, finish_reason length", len(r.choices) == 1 and
          c.message.role == "assistant" and isinstance(c.message.content, str) and c.finish_reason == "length", r)
    check("chat: usage with prompt_tokens_details.cached_tokens", r.usage.completion_tokens == 12 and
          r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12 and
          r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens >= 0, r.usage)
    check("chat: object and id", r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r.id)
    chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    toks = [t for ch in chunks if ch.choices for t in (extra(ch.choices[0], "token_ids") or [])]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check("chat stream: the same text and tokens as unstreamed", text == c.message.content and
          toks == extra(c, "token_ids"), (text, c.message.content))
    check("chat stream: opens with the assistant role, one finish_reason", chunks[0].choices[0].delta.role ==
          "assistant" and finishes == ["length"], finishes)
    check("chat stream: include_usage puts usage in a last chunk without choices",
          chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12 and
          all(ch.usage is None for ch in chunks[:-1]), chunks[-1])

    # completions, unstreamed then streamed
    common = dict(model=args.model, prompt="Once upon a time", max_tokens=10, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.completions.create(**common)
    check("completions: text_completion with text and usage", r.object == "text_completion" and
          isinstance(r.choices[0].text, str) and r.usage.completion_tokens == 10, r)
    chunks = list(client.completions.create(**common, stream=True))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    check("completions stream: the same text as unstreamed", text == r.choices[0].text, (text, r.choices[0].text))
    check("completions: default max_tokens is 16 (the legacy API's)",
          client.completions.create(model=args.model, prompt="abc", temperature=0,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens == 16)

    # a batch: one choice per prompt, index = the prompt's; token-id prompts too
    r = client.completions.create(model=args.model, prompt=["first prompt", "second prompt", "third"], max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    check("completions batch: a choice per prompt, in order", [ch.index for ch in r.choices] == [0, 1, 2] and
          r.usage.completion_tokens == 15, r)
    alone = client.completions.create(model=args.model, prompt="second prompt", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    check("completions batch: each choice equals its prompt alone", r.choices[1].text == alone.choices[0].text)
    r = client.completions.create(model=args.model, prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    check("completions: token-id prompts", len(r.choices) == 2 and r.usage.prompt_tokens == 5, r.usage)
    streamed = list(client.completions.create(model=args.model, prompt=["a b", "c d"], max_tokens=4, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    check("completions batch stream: chunks of both indices, a finish each",
          sorted(ch.choices[0].index for ch in streamed if ch.choices[0].finish_reason) == [0, 1])

    # logprobs
    r = client.chat.completions.create(model=args.model, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs.content
    check("chat logprobs: one per token, two alternatives each, bytes", len(lp) == 4 and
          all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes is not None for t in lp), lp)
    r = client.completions.create(model=args.model, prompt="abc", max_tokens=3, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    check("completions logprobs: tokens, token_logprobs, top_logprobs", len(lp.tokens) == 3 and
          len(lp.token_logprobs) == 3 and len(lp.top_logprobs) == 3 and len(lp.top_logprobs[0]) >= 1, lp)

    # errors through the client's exception types
    for name, kwargs, exc in [
        ("unknown model: NotFoundError (404)", dict(model="gpt-nope"), openai.NotFoundError),
        ("n=2: BadRequestError (400)", dict(n=2), openai.BadRequestError),
        ("temperature -1: BadRequestError (400)", dict(temperature=-1), openai.BadRequestError),
    ]:
        kw = dict(model=args.model, messages=msgs, max_tokens=4)
        kw.update(kwargs)
        try:
            client.chat.completions.create(**kw)
            check(name, False, "no exception")
        except exc as e:
            check(name, isinstance(e.body, dict) and "message" in e.body, e.body)
    try:
        client.completions.create(model=args.model, prompt="x", max_tokens=2000, extra_body={"timeout_ms": 1,
                                                                                           "ignore_eos": True})
        check("a deadline passed: 504", False, "no exception")
    except openai.APIStatusError as e:
        check("a deadline passed: 504", e.status_code == 504, e.status_code)


def check_constraints(args, client):
    """response_format and the guided_* extensions through the official client: the random model's
    output obeys them (the constraint alone keeps it in line), and equals folioctl's with the flag."""
    schema = {"type": "object", "properties": {"label": {"enum": ["cat", "dog", "bird"]},
                                                "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["label", "count"]}
    msgs = [{"role": "user", "content": "describe one animal as JSON"}]
    r = client.chat.completions.create(model=args.model, messages=msgs, max_tokens=60, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "animal", "schema": schema}})
    text = r.choices[0].message.content
    try:
        doc = json.loads(text)
        ok = (set(doc) == {"label", "count"} and doc["label"] in ("cat", "dog", "bird") and
              isinstance(doc["count"], int) and 0 <= doc["count"] <= 99)
    except ValueError:
        ok = False
    check("response_format json_schema: the answer is JSON valid under the schema, finish stop",
          ok and r.choices[0].finish_reason == "stop", text)
    r = client.chat.completions.create(model=args.model, messages=msgs, max_tokens=80, temperature=0.7, seed=3,
                                       response_format={"type": "json_object"})
    try:
        ok = isinstance(json.loads(r.choices[0].message.content), dict)
    except ValueError:
        ok = r.choices[0].finish_reason == "length"  # a cut object is the length limit's doing
    check("response_format json_object: a JSON object (sampled)", ok, r.choices[0].message.content)
    r = client.completions.create(model=args.model, prompt="pick one:", max_tokens=20, temperature=0,
                                  extra_body={"guided_choice": ["red", "green", "blue"], "return_token_ids": True})
    g = folioctl_json(args, "-p", "pick one:", "-n", "20", "--temperature", "0", "--choice", "red", "--choice",
                      "green", "--choice", "blue")
    check("guided_choice: one of the choices, the tokens of folioctl generate --choice",
          r.choices[0].text in ("red", "green", "blue") and extra(r.choices[0], "token_ids") == g["tokens"],
          (r.choices[0].text, g))
    r = client.completions.create(model=args.model, prompt="a code:", max_tokens=20, temperature=0.9, seed=5,
                                  extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    check("guided_regex: the answer matches (sampled)", re.fullmatch("[A-Z]{2}-[0-9]{3}", r.choices[0].text) is not None,
          r.choices[0].text)
    try:
        client.completions.create(model=args.model, prompt="x", max_tokens=4, extra_body={"guided_regex": "(a"})
        check("a regex that does not compile: 400", False, "no exception")
    except openai.BadRequestError as e:
        check("a regex that does not compile: 400", isinstance(e.body, dict) and "message" in e.body, e.body)



def check_folioctl_equal(args, client):
    g = folioctl_json(args, "-p", "hello cluster", "-n", "16", "--temperature", "0", "--ignore-eos")
    r = client.completions.create(model=args.model, prompt="hello cluster", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    check("completions: the tokens and text of folioctl generate --json", extra(r.choices[0], "token_ids") ==
          g["tokens"] and r.choices[0].text == g["text"] and r.usage.prompt_tokens == g["usage"]["prompt_tokens"],
          (extra(r.choices[0], "token_ids"), g["tokens"]))
    g = folioctl_json(args, "--chat", "-p", "What is two plus two?", "-n", "12", "--temperature", "0",
                      "--ignore-eos")
    r = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "What is two plus two?"}],
                                       max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    check("chat: the tokens and text of folioctl generate --chat --json", extra(r.choices[0], "token_ids") ==
          g["tokens"] and r.choices[0].message.content == g["text"], (extra(r.choices[0], "token_ids"), g["tokens"]))
    g = folioctl_json(args, "-p", "seeded run", "-n", "12", "--seed", "7", "--temperature", "0.9", "--ignore-eos")
    r = client.completions.create(model=args.model, prompt="seeded run", max_tokens=12, temperature=0.9, seed=7,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    check("completions: a seeded sampled request gives folioctl's tokens", extra(r.choices[0], "token_ids") ==
          g["tokens"], (extra(r.choices[0], "token_ids"), g["tokens"]))


def check_keys(args):
    good = OpenAI(base_url=args.keyed_url + "/v1", api_key="sk-test-a", max_retries=0)
    bad = OpenAI(base_url=args.keyed_url + "/v1", api_key="sk-wrong", max_retries=0)
    try:
        bad.models.list()
        check("a wrong API key: AuthenticationError (401)", False, "no exception")
    except openai.AuthenticationError as e:
        check("a wrong API key: AuthenticationError (401)", e.status_code == 401)
    check("a listed API key is served", args.model in [m.id for m in good.models.list().data])
    # Tenants come from the keys: the same long prompt is cached for its own tenant only.
    prompt = "tenant test " * 40
    kw = dict(model=args.model, prompt=prompt, max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    good.completions.create(**kw)
    again = good.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
    other = OpenAI(base_url=args.keyed_url + "/v1", api_key="sk-test-b", max_retries=0)
    theirs = other.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
    check("tenants from API keys: a tenant's prompt is cached for it, not for another", again > 0 and theirs == 0,
          (again, theirs))


def check_concurrency(args):
    n = args.streams
    host, port = args.host, args.port
    bodies = [dict(model=args.model, prompt=f"request {i} of the crowd says", max_tokens=8 + i % 9, temperature=0,
                   ignore_eos=True, return_token_ids=True) for i in range(n)]
    # The references, unstreamed, 32 at a time.
    refs = [None] * n

    def ref(i):
        conn = http.client.HTTPConnection(host, port, timeout=120 * args.slow)
        conn.request("POST", "/v1/completions", json.dumps(bodies[i]), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        refs[i] = json.loads(resp.read()) if resp.status == 200 else None
        conn.close()

    for s in range(0, n, 32):
        ts = [threading.Thread(target=ref, args=(i,)) for i in range(s, min(n, s + 32))]
        [t.start() for t in ts]
        [t.join() for t in ts]
    check(f"{n} unstreamed references answered", all(r is not None for r in refs))

    results = [None] * n
    barrier = threading.Barrier(n)

    def stream(i):
        barrier.wait()
        try:
            results[i] = raw_stream(host, port, "/v1/completions", dict(bodies[i], stream=True), 300 * args.slow)
        except Exception as e:  # noqa: BLE001 - recorded and reported below
            results[i] = (0, "", [repr(e)])

    t0 = time.time()
    ts = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    elapsed = time.time() - t0
    bad = []
    for i, (status, ctype, data) in enumerate(results):
        ok = status == 200 and ctype.startswith("text/event-stream") and data and data[-1] == "[DONE]"
        if ok:
            chunks = [json.loads(d) for d in data[:-1]]
            ok = all("error" not in c for c in chunks)
            if ok:
                text = "".join(c["choices"][0]["text"] for c in chunks)
                toks = [t for c in chunks for t in c["choices"][0].get("token_ids", [])]
                fin = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
                want = refs[i]["choices"][0] if refs[i] else {}
                ok = text == want.get("text") and toks == want.get("token_ids") and fin == ["length"]
        if not ok:
            bad.append((i, status, data[:3]))
    check(f"{n} concurrent streams: each complete, text and tokens equal to unstreamed, no chunk lost or repeated "
          f"({elapsed:.1f} s)", not bad, bad[:3])


async def async_streams(args, n):
    client = AsyncOpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=300 * args.slow)

    async def one(i):
        kw = dict(model=args.model, messages=[{"role": "user", "content": f"async client {i}"}], max_tokens=6,
                  temperature=0, extra_body={"ignore_eos": True})
        full = (await client.chat.completions.create(**kw)).choices[0].message.content
        parts = []
        async for ch in await client.chat.completions.create(**kw, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
        return "".join(parts) == full

    oks = await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return all(oks)


def check_disconnect(args):
    _, before = metrics(args.url)
    aborts0 = total(before, "folio:request_success_total", finished_reason="abort")
    gone0 = total(before, "folio:http_client_disconnects_total")
    body = json.dumps(dict(model=args.model, prompt=[1, 2, 3, 4], max_tokens=args.long_tokens, temperature=0,
                           ignore_eos=True, stream=True)).encode()
    s = socket.create_connection((args.host, args.port), timeout=60 * args.slow)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        part = s.recv(4096)
        if not part:
            break
        got += part
    check("a long stream starts", got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") >= 3, got[:200])
    s.close()
    deadline = time.time() + 15 * args.slow
    ok = False
    while time.time() < deadline and not ok:
        time.sleep(0.2)
        _, m = metrics(args.url)
        ok = (total(m, "folio:request_success_total", finished_reason="abort") > aborts0 and
              total(m, "folio:http_client_disconnects_total") > gone0 and
              total(m, "folio:coordinator_requests_inflight") == 0)
    check("a client that disconnects mid-stream has its request cancelled (abort counted, nothing in flight)", ok,
          (total(m, "folio:request_success_total", finished_reason="abort"), aborts0,
           total(m, "folio:http_client_disconnects_total"), total(m, "folio:coordinator_requests_inflight")))


def check_metrics(args):
    text, m = metrics(args.url)
    check("/metrics parses as Prometheus text with the cluster's and the gateway's figures",
          total(m, "folio:http_requests_total", endpoint="/v1/chat/completions", code="200") > 0 and
          total(m, "folio:http_requests_total", endpoint="/v1/chat/completions", code="400") > 0 and
          "folio:num_requests_running" in m and total(m, "folio:gateway_coordinator_up") == 1, text[-600:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--keyed-url", required=True)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--folioctl", required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--slow", type=int, default=1)
    args = ap.parse_args()
    args.host, args.port = args.url.split("//")[1].split(":")[0], int(args.url.rsplit(":", 1)[1])
    client = OpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=120 * args.slow)
    check_client(args, client)
    check_folioctl_equal(args, client)
    check_constraints(args, client)
    check_keys(args)
    check_concurrency(args)
    check("64 concurrent streams through the official async client equal their unstreamed text",
          asyncio.run(async_streams(args, 64)))
    check_disconnect(args)
    check_metrics(args)
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
