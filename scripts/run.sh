#!/usr/bin/env bash
# The main job: set up (packages, default model), build, start a local folio cluster (a coordinator,
# worker groups serving the default model and the OpenAI-compatible HTTP gateway), send it a
# request, show its status, and keep serving in the foreground until Ctrl-C (which stops every
# process).
#   bash scripts/run.sh [folioctl generate flags]   e.g. -p "Write a haiku about the sea" -n 64
#   FOLIO_GROUPS=N      worker groups (default 2)
#   FOLIO_RUN_ONCE=1    stop the cluster after the first request instead of serving on
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh
if [ $# -eq 0 ]; then
  set -- --chat -p "What are the three primary colors?" -n 64
fi

./build/folioctl up --groups "${FOLIO_GROUPS:-2}" &
up_pid=$!
stop() { kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 600); do
  ./build/folioctl health >/dev/null 2>&1 && break
  kill -0 "$up_pid" 2>/dev/null || { echo "error: the cluster did not start (see the log above)" >&2; exit 1; }
  sleep 0.2
done
./build/folioctl health >/dev/null || { echo "error: the cluster is not healthy after 120 s" >&2; exit 1; }

echo "== folioctl generate $* =="
./build/folioctl generate "$@"
echo
echo "== folioctl status =="
./build/folioctl status
if [ "${FOLIO_RUN_ONCE:-0}" = 1 ]; then
  exit 0
fi
echo
echo "Serving on ${FOLIO_COORDINATOR:-tcp://127.0.0.1:5555}: try ./build/folioctl generate -p \"Once upon a time\""
http_port="${FOLIO_HTTP:-8080}"
echo "or ./build/folioctl chat in another terminal; the OpenAI-compatible API (when up printed its URL above):"
echo "  curl http://127.0.0.1:${http_port##*:}/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}], \"max_tokens\": 32}'"
echo "Ctrl-C stops the cluster."
wait "$up_pid"
