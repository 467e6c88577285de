#!/usr/bin/env bash
# folio-gateway, the OpenAI-compatible HTTP API, end to end on a tiny random model: `folioctl up
# --http` starts it with the cluster and prints its URL; a second gateway with --api-keys fronts a
# second coordinator (one request in flight per tenant) and worker. curl checks the error answers in
# OpenAI's shape and status (malformed JSON 400, unknown model 404, a body over --max-body 413,
# n=2 400, no or a wrong key 401, a tenant over its share 429 with Retry-After, wrong method 405,
# unknown path 404, headers too large 431; /health and /metrics open without a key; every group
# drained: /health and requests 503); tests/e2e/gateway_client.py checks the rest with the official
# `openai` package (streamed and not, chat and completions, batches, logprobs, the tokens of
# `folioctl generate --json`, tenants from keys, 256 concurrent streams with no chunk lost or
# repeated, a client gone mid-stream cancelled). SIGTERM stops a gateway cleanly, also mid-stream,
# and SIGTERM to `up` stops its gateway.
set -uo pipefail
build="${FOLIO_BUILD_DIR:?}"
src="${FOLIO_SOURCE_DIR:?}"
py="${FOLIO_VENV:-$src/.venv}/bin/python"
if [ ! -x "$py" ] || ! "$py" -c "import openai, prometheus_client" 2>/dev/null; then
  echo "skipped: the openai and prometheus-client packages are missing (bash scripts/setup.sh --test-tools)"
  exit 77
fi
command -v curl >/dev/null || { echo "skipped: curl is missing"; exit 77; }
tmp="$(mktemp -d)"
export FOLIO_LOG=warn
ep="ipc://$tmp/c" wep="ipc://$tmp/w"
up_pid="" gw_pid=""
fails=0
check() { # name, command...
  local name="$1"; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}
cleanup() {
  [ -n "$gw_pid" ] && kill -TERM "$gw_pid" 2>/dev/null
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then kill -TERM "$up_pid" 2>/dev/null; sleep 1; fi
  for p in $(pgrep -f -- "$tmp/" 2>/dev/null | grep -vx "$$"); do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT
slow="${FOLIO_E2E_SLOW:-1}"
grep -q "FOLIO_SANITIZE:BOOL=ON" "$build/CMakeCache.txt" 2>/dev/null && slow="${FOLIO_E2E_SLOW:-5}"
free_port() { "$py" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
port="$(free_port)" kport="$(free_port)"
url="http://127.0.0.1:$port" kurl="http://127.0.0.1:$kport"

"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 400 \
  --ctx 2048 --type q8_0 --seed 11 >/dev/null || { echo "FAIL folio-mkmodel"; exit 1; }
"$build/folioctl" up --groups 2 -m "$tmp/tiny.gguf" --listen "$ep" --workers "$wep" --threads-per-worker 1 \
  --heartbeat-ms 200 --http "127.0.0.1:$port" --log-dir "$tmp/logs" >"$tmp/up.out" 2>"$tmp/up.err" &
up_pid=$!
for _ in $(seq 1 $((300 * slow))); do
  grep -q "folio cluster up" "$tmp/up.out" 2>/dev/null && break
  kill -0 "$up_pid" 2>/dev/null || break
  sleep 0.2
done
if ! grep -q "folio cluster up" "$tmp/up.out"; then
  echo "FAIL folioctl up --http did not come up"; cat "$tmp/up.err"; tail -n 20 "$tmp"/logs/*.log; exit 1
fi
check "folioctl up prints the gateway's URL" grep -q "http://127.0.0.1:$port" "$tmp/up.out"
printf 'sk-test-a tenant-a\n# a comment\n\nsk-test-b   tenant-b\n' >"$tmp/keys"
# The keyed gateway fronts a cluster of its own whose coordinator lets a tenant have one request in
# flight, so that the cluster's refusal (RESOURCE_EXHAUSTED) can be seen as 429.
ep2="ipc://$tmp/c2" wep2="ipc://$tmp/w2"
"$build/folio-coordinator" --listen "$ep2" --workers "$wep2" -m "$tmp/tiny.gguf" --max-inflight-per-tenant 1 \
  2>"$tmp/c2.log" &
c2_pid=$!
"$build/folio-worker" --workers "$wep2" --group k0 -m "$tmp/tiny.gguf" --threads 1 2>"$tmp/w2.log" &
w2_pid=$!
"$build/folio-gateway" --coordinator "$ep2" --http "127.0.0.1:$kport" --api-keys "$tmp/keys" --max-body 64KiB \
  2>"$tmp/keyed.log" &
gw_pid=$!
for _ in $(seq 1 $((100 * slow))); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$kurl/health")" = 200 ] && break
  sleep 0.1
done
check "GET /health: 200 while groups serve (open without a key)" \
  test "$(curl -s -o /dev/null -w '%{http_code}' "$kurl/health")" = 200

# status body_file url [curl args...]: the HTTP status, the body in body_file.
status() { local out="$1" u="$2"; shift 2; curl -s -o "$out" -w '%{http_code}' "$u" "$@"; }
# error_shape file: OpenAI's {"error": {"message", "type", "param", "code"}}.
error_shape() {
  "$py" -c "import json,sys; e=json.load(open(sys.argv[1]))['error']
assert {'message','type','param','code'} <= set(e) and e['message'], e" "$1"
}
post=(-H "Content-Type: application/json")
s="$(status "$tmp/b" "$url/v1/chat/completions" "${post[@]}" -d '{"model": "tiny", "messages": [')"
check "malformed JSON: 400 in OpenAI's error shape" test "$s" = 400 -a -n "$(error_shape "$tmp/b" && echo y)"
s="$(status "$tmp/b" "$url/v1/chat/completions" "${post[@]}" \
  -d '{"model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]}')"
check "unknown model: 404 model_not_found" test "$s" = 404 -a -n "$(grep -l model_not_found "$tmp/b")"
s="$(status "$tmp/b" "$url/v1/completions" "${post[@]}" -d '{"model": "tiny", "prompt": "hi", "n": 2}')"
check "n = 2: 400 naming the field" test "$s" = 400 -a -n "$(grep -l '"param":"n"' "$tmp/b")"
s="$(status "$tmp/b" "$url/v1/completions" "${post[@]}" -d '{"model": "tiny", "prompt": 7}')"
check "a prompt of the wrong type: 400" test "$s" = 400
head -c $((9 * 1024 * 1024)) /dev/zero | tr '\0' 'a' >"$tmp/big"
s="$(status "$tmp/b" "$url/v1/completions" "${post[@]}" --data-binary @"$tmp/big")"
check "a body over --max-body (8 MiB default): 413" test "$s" = 413 -a -n "$(error_shape "$tmp/b" && echo y)"
head -c $((100 * 1024)) /dev/zero | tr '\0' 'a' >"$tmp/big"
s="$(status "$tmp/b" "$kurl/v1/completions" "${post[@]}" -H "Authorization: Bearer sk-test-a" \
  -H "Transfer-Encoding: chunked" --data-binary @"$tmp/big")"
check "a chunked body over --max-body 64KiB: 413" test "$s" = 413
s="$(status "$tmp/b" "$url/health" -H "X-Huge: $(head -c 40000 /dev/zero | tr '\0' 'x')")"
check "headers over the limit are refused (431)" test "$s" = 431
s="$(status "$tmp/b" "$url/v1/completions")"
check "GET on a POST endpoint: 405" test "$s" = 405
s="$(status "$tmp/b" "$url/v2/nothing")"
check "an unknown path: 404" test "$s" = 404
body='{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
s="$(status "$tmp/b" "$kurl/v1/completions" "${post[@]}" -d "$body")"
check "--api-keys: no key: 401" test "$s" = 401 -a -n "$(error_shape "$tmp/b" && echo y)"
s="$(status "$tmp/b" "$kurl/v1/completions" "${post[@]}" -H "Authorization: Bearer sk-nope" -d "$body")"
check "--api-keys: a wrong key: 401" test "$s" = 401
s="$(status "$tmp/b" "$kurl/v1/completions" "${post[@]}" -H "Authorization: Bearer sk-test-b" -d "$body")"
check "--api-keys: a listed key: 200" test "$s" = 200
s="$(status "$tmp/b" "$kurl/metrics")"
check "--api-keys: /metrics stays open" test "$s" = 200
# A tenant over its share of requests in flight: 429 with Retry-After. The worker is stopped (for
# less than a heartbeat interval) so that the first request stays in flight.
kill -STOP "$w2_pid"
curl -s -o /dev/null -w '%{http_code}' "$kurl/v1/completions" "${post[@]}" -H "Authorization: Bearer sk-test-a" \
  -d "$body" >"$tmp/held.code" &
held_pid=$!
for _ in $(seq 1 $((50 * slow))); do
  [ "$("$build/folioctl" status --coordinator "$ep2" --json | "$py" -c "import json,sys; print(json.load(sys.stdin)['requests_inflight'])")" = 1 ] && break
  sleep 0.02
done
s="$(curl -s -D "$tmp/h" -o "$tmp/b" -w '%{http_code}' "$kurl/v1/completions" "${post[@]}" \
  -H "Authorization: Bearer sk-test-a" -d "$body")"
kill -CONT "$w2_pid"
check "a tenant over its share in flight: 429 with Retry-After" \
  test "$s" = 429 -a -n "$(grep -i '^retry-after: [1-9]' "$tmp/h")" -a -n "$(error_shape "$tmp/b" && echo y)"
wait "$held_pid"
check "the request held meanwhile is served" test "$(cat "$tmp/held.code")" = 200
s="$(status "$tmp/b" "$url/v1/completions" "${post[@]}" -d '{"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": true}')"
check "curl: a stream ends with data: [DONE]" test "$s" = 200 -a "$(grep -c '^data: ' "$tmp/b")" -ge 3 \
  -a "$(grep '^data: ' "$tmp/b" | tail -n 1)" = "data: [DONE]"

"$py" "$src/tests/e2e/gateway_client.py" --url "$url" --keyed-url "$kurl" --coordinator "$ep" \
  --folioctl "$build/folioctl" --slow "$slow" || fails=$((fails + 1))

# No group to serve: every group drained. /health says 503 and a request gets 503 UNAVAILABLE.
"$build/folioctl" drain g0 --coordinator "$ep" >/dev/null && "$build/folioctl" drain g1 --coordinator "$ep" >/dev/null
s="$(status "$tmp/b" "$url/health")"
check "GET /health: 503 while no group serves" test "$s" = 503
s="$(status "$tmp/b" "$url/v1/completions" "${post[@]}" -d '{"prompt": "hi", "max_tokens": 2}')"
check "no group to serve: 503 in OpenAI's error shape" test "$s" = 503 -a -n "$(error_shape "$tmp/b" && echo y)"
"$build/folioctl" undrain g0 --coordinator "$ep" >/dev/null && "$build/folioctl" undrain g1 --coordinator "$ep" >/dev/null
s="$(status "$tmp/b" "$url/health")"
check "GET /health: 200 again once a group serves" test "$s" = 200

inflight="$("$build/folioctl" status --coordinator "$ep" --json | "$py" -c "import json,sys; print(json.load(sys.stdin)['requests_inflight'])")"
check "nothing left in flight in the cluster" test "$inflight" = 0

# SIGTERM with a stream in flight: the stream ends with an error event and [DONE], the gateway exits 0.
curl -sN "$kurl/v1/completions" "${post[@]}" -H "Authorization: Bearer sk-test-a" -o "$tmp/cut" \
  -d '{"prompt": [1, 2, 3], "max_tokens": 1900, "ignore_eos": true, "stream": true}' &
curl_pid=$!
for _ in $(seq 1 $((50 * slow))); do [ "$(cat "$tmp/cut" 2>/dev/null | grep -c '^data: ')" -ge 2 ] && break; sleep 0.1; done
kill -TERM "$gw_pid"
wait "$gw_pid" 2>/dev/null
check "the keyed gateway exits 0 on SIGTERM" test $? -eq 0
wait "$curl_pid"
check "a stream cut by SIGTERM ends with an error event and [DONE]" \
  test -n "$(grep -l 'shutting down' "$tmp/cut")" -a "$(grep '^data: ' "$tmp/cut" | tail -n 1)" = "data: [DONE]"
gw_pid=""
kill -TERM "$w2_pid" "$c2_pid"
wait "$w2_pid" "$c2_pid" 2>/dev/null
kill -TERM "$up_pid"
for _ in $(seq 1 100); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
check "SIGTERM to up stops its gateway too" test -z "$(pgrep -f -- "--http 127.0.0.1:$port" | head -n 1)"
up_pid=""
if [ $fails -ne 0 ]; then
  echo "--- logs"; tail -n 20 "$tmp/up.err" "$tmp"/logs/*.log "$tmp/keyed.log"
  exit 1
fi
echo "all gateway checks passed"
