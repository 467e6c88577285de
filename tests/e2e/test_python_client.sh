#!/usr/bin/env bash
# The wire protocol from another language: tests/e2e/python_client.py, written from proto/README.md
# and proto/folio.proto alone, talks to a real coordinator and worker (tiny random model): health,
# two interleaved streams, a non-streaming request, error replies, status, a REQ socket, and the
# page's rules for ids, UTF-8, Cancel and limits (the coordinator runs with a tenant limit of 2).
# Needs Debian's python3-zmq, python3-protobuf and protoc (scripts/setup.sh installs them).
set -uo pipefail
build="${FOLIO_BUILD_DIR:?}"
src="${FOLIO_SOURCE_DIR:?}"
py=/usr/bin/python3
if ! "$py" -c "import zmq, google.protobuf" 2>/dev/null || ! command -v protoc >/dev/null; then
  echo "python3-zmq, python3-protobuf or protoc missing (scripts/setup.sh installs them)"
  exit 77
fi
tmp="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
export FOLIO_LOG=warn
"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 400 \
  --type q8_0 --seed 5 --ctx 4096 >/dev/null || { echo "FAIL folio-mkmodel"; exit 1; }
protoc --proto_path="$src/proto" --python_out="$tmp" "$src/proto/folio.proto" || { echo "FAIL protoc"; exit 1; }
ep_c="ipc://$tmp/c" ep_w="ipc://$tmp/w"
"$build/folio-coordinator" --listen "$ep_c" --workers "$ep_w" -m "$tmp/tiny.gguf" --heartbeat-ms 200 \
  --max-inflight-per-tenant 2 &
pids+=($!)
"$build/folio-worker" --workers "$ep_w" --group g0 -m "$tmp/tiny.gguf" --threads 1 --heartbeat-ms 200 &
pids+=($!)
for _ in $(seq 1 100); do
  "$build/folioctl" health --coordinator "$ep_c" >/dev/null 2>&1 && break
  sleep 0.2
done
"$py" "$src/tests/e2e/python_client.py" "$ep_c" "$tmp"
