#!/usr/bin/env bash
# A multi-host cluster on one machine: the coordinator, the HTTP gateway, two worker groups and the
# clients each in a network namespace of their own (ip netns), joined by veth pairs to a bridge in a
# sixth namespace (the "switch"), with addresses the test picks and removes. Requests cross it
# through HTTP (curl to the gateway) and the ZeroMQ protocol (tests/e2e/netns_load.py); then one
# worker host's link goes down mid-load, and the cluster's invariant must hold: each accepted request
# gets exactly one final status, no token index twice, none hung; new requests are then served by the
# host that is left. Skips (77) with the reason where namespaces cannot be made.
set -uo pipefail
build="${FOLIO_BUILD_DIR:?}"
src="${FOLIO_SOURCE_DIR:?}"
py=/usr/bin/python3
fails=0
check() { # name, command...
  local name="$1"; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}
if ! command -v ip >/dev/null; then echo "skipped: no ip command (Debian's iproute2)"; exit 77; fi
if ! "$py" -c "import zmq, google.protobuf" 2>/dev/null || ! command -v protoc >/dev/null; then
  echo "skipped: python3-zmq, python3-protobuf or protoc missing (scripts/setup.sh installs them)"; exit 77
fi
tag="f$$"                               # namespace and link names: short, this run's own
sw="${tag}sw"
hosts=(co gw w0 w1 cl)                  # coordinator, gateway, worker groups g0 and g1, clients
declare -A addr=([co]=10.213.7.1 [gw]=10.213.7.2 [w0]=10.213.7.3 [w1]=10.213.7.4 [cl]=10.213.7.5)
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  # Whatever still runs inside this test's namespaces (a process forked by one of them) goes too.
  for h in "${hosts[@]}"; do ip netns pids "$tag$h" 2>/dev/null | xargs -r kill -KILL 2>/dev/null; done
  wait 2>/dev/null
  for h in "${hosts[@]}"; do ip netns del "$tag$h" 2>/dev/null; done
  ip netns del "$sw" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' TERM INT
if ! ip netns add "$sw" 2>"$tmp/why"; then
  echo "skipped: network namespaces are not permitted here ($(cat "$tmp/why"))"; exit 77
fi
# A command on host h. In the background, started as `ip netns exec` itself (never through this
# function), so that $! is the process that becomes the program.
on_host() { local h="$1"; shift; ip netns exec "$tag$h" "$@"; }
. "$src/tests/e2e/netns_lib.sh"
netns_bridge "$sw" || { echo "FAIL bridge"; exit 1; }
for h in "${hosts[@]}"; do
  netns_host "$sw" "$tag$h" "${addr[$h]}/24" || { echo "FAIL link for $h"; exit 1; }
done

export FOLIO_LOG=warn
"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 400 \
  --type q8_0 --seed 11 --ctx 2048 >/dev/null || { echo "FAIL folio-mkmodel"; exit 1; }
protoc --proto_path="$src/proto" --python_out="$tmp" "$src/proto/folio.proto" || { echo "FAIL protoc"; exit 1; }
ep_c="tcp://${addr[co]}:5555" ep_w="tcp://${addr[co]}:5556"
ip netns exec "${tag}co" "$build/folio-coordinator" --listen "$ep_c" --workers "$ep_w" --insecure -m "$tmp/tiny.gguf" --heartbeat-ms 200 \
  2>"$tmp/coordinator.log" &
pids+=($!)
ip netns exec "${tag}w0" "$build/folio-worker" --workers "$ep_w" --group g0 -m "$tmp/tiny.gguf" --threads 1 --heartbeat-ms 200 \
  2>"$tmp/w0.log" &
pids+=($!)
ip netns exec "${tag}w1" "$build/folio-worker" --workers "$ep_w" --group g1 -m "$tmp/tiny.gguf" --threads 1 --heartbeat-ms 200 \
  2>"$tmp/w1.log" &
pids+=($!)
ip netns exec "${tag}gw" "$build/folio-gateway" --coordinator "$ep_c" --http "${addr[gw]}:8080" 2>"$tmp/gateway.log" &
pids+=($!)
both=0
for _ in $(seq 1 150); do
  if on_host cl "$build/folioctl" status --coordinator "$ep_c" --json 2>/dev/null >"$tmp/status.json" &&
     "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if sum(1 for g in d['groups'] if g['healthy'])==2 else 1)" \
       "$tmp/status.json" 2>/dev/null; then both=1; break; fi
  sleep 0.2
done
check "both worker groups, each on its own host, register with the coordinator's host" test $both -eq 1
if [ $both -ne 1 ]; then for f in "$tmp"/*.log; do echo "--- $f"; tail -n 20 "$f"; done; exit 1; fi

# The ZeroMQ protocol across hosts: folioctl generate from the client host.
g="$(on_host cl "$build/folioctl" generate --coordinator "$ep_c" -p "across hosts" -n 12 --ignore-eos --temperature 0 --json 2>/dev/null | tail -n 1)"
check "folioctl generate across hosts: 12 tokens" "$py" -c "import json,sys; assert len(json.loads(sys.argv[1])['tokens'])==12" "$g"

# HTTP across hosts: curl on the client host to the gateway's host, which relays to the coordinator's.
http_ok=0
for _ in $(seq 1 50); do
  code="$(on_host cl curl -s -o "$tmp/health.out" -w '%{http_code}' "http://${addr[gw]}:8080/health")"
  [ "$code" = 200 ] && { http_ok=1; break; }
  sleep 0.2
done
check "the gateway's /health answers 200 across hosts" test $http_ok -eq 1
on_host cl curl -s -m 30 "http://${addr[gw]}:8080/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model":"tiny","prompt":"across hosts","max_tokens":12,"temperature":0,"ignore_eos":true}' >"$tmp/http.json"
check "POST /v1/completions across hosts gives the same text as folioctl generate" "$py" -c "
import json,sys
h=json.load(open(sys.argv[1])); g=json.loads(sys.argv[2])
assert h['choices'][0]['text']==g['text'], (h, g)" "$tmp/http.json" "$g"

# Load over both groups, then worker host w1's link goes down (its switch port) mid-load.
ready="$tmp/ready"
ip netns exec "${tag}cl" "$py" "$src/tests/e2e/netns_load.py" "$ep_c" "$tmp" 24 300 "$ready" 30 >"$tmp/load1.out" 2>&1 &
load_pid=$!
# Streaming HTTP clients in the same load: each must end its stream (data: [DONE], after an error
# event when its request failed) rather than hang.
curl_pids=()
for i in 1 2 3 4 5 6; do
  ip netns exec "${tag}cl" curl -sN -m 40 "http://${addr[gw]}:8080/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"tiny\",\"prompt\":\"stream $i over http\",\"max_tokens\":300,\"ignore_eos\":true,\"stream\":true}" \
    >"$tmp/sse$i.out" 2>&1 &
  curl_pids+=($!)
done
for _ in $(seq 1 300); do [ -f "$ready" ] && break; kill -0 "$load_pid" 2>/dev/null || break; sleep 0.05; done
check "the load is streaming when the link is cut" test -f "$ready"
ip -n "$sw" link set "${tag}w1p" down
wait "$load_pid"; load_rc=$?
cat "$tmp/load1.out"
check "link down mid-load: each request got exactly one final, no index twice, none hung" test $load_rc -eq 0
sse_ended=0
for i in "${!curl_pids[@]}"; do
  wait "${curl_pids[$i]}" && [ "$(tail -n 2 "$tmp/sse$((i + 1)).out" | head -n 1)" = "data: [DONE]" ] && sse_ended=$((sse_ended + 1))
done
check "link down mid-load: all 6 HTTP streams ended with data: [DONE] (none hung)" test $sse_ended -eq 6

# After the cut: the coordinator has taken g1 out, and new requests are all served (by g0).
rm -f "$ready"
on_host cl "$py" "$src/tests/e2e/netns_load.py" "$ep_c" "$tmp" 8 20 "$ready" 30 >"$tmp/load2.out" 2>&1; load_rc=$?
cat "$tmp/load2.out"
check "after the cut every new request ends OK on the host left" "$py" -c "
import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert d['codes']=={'OK': 8} and set(d['groups'])=={'g0'}, d" "$tmp/load2.out"
check "the second load kept the invariant" test $load_rc -eq 0

if [ $fails -ne 0 ]; then for f in "$tmp"/*.log; do echo "--- $f"; tail -n 15 "$f"; done; fi
echo "$fails failed"
[ $fails -eq 0 ]
