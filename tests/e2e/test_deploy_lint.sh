#!/usr/bin/env bash
# The container and Kubernetes files, checked offline:
#   yamllint (.yamllint) over deploy/ and docker/compose.yaml; hadolint over docker/Dockerfile*;
#   ShellCheck over docker/*.sh where it is installed (Debian's package; not a pinned tool);
#   deploy/ and its overlays rendered and validated against Kubernetes 1.30 with
#   kubernetes-validate, the LeaderWorkerSet checked by hand, flags and roles tied to the code
#   (deploy_check.py); the worker's liveness probe (folio-entrypoint alive) passing on a live
#   worker and failing on a stopped one.
# Skipped (77) only where the test tools are absent (bash scripts/setup.sh --test-tools).
set -euo pipefail
src="${FOLIO_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}"
build="${FOLIO_BUILD_DIR:-$src/build}"
venv="${FOLIO_VENV:-$src/.venv}"
k8s_version=1.30.0
cd "$src"
for tool in python yamllint hadolint; do
  if [ ! -x "$venv/bin/$tool" ]; then
    echo "SKIP: $venv/bin/$tool missing (bash scripts/setup.sh --test-tools)"
    exit 77
  fi
done

echo "== yamllint"
"$venv/bin/yamllint" --strict -c .yamllint deploy docker/compose.yaml
echo "ok   yamllint: deploy/ docker/compose.yaml"

echo "== hadolint"
for f in docker/Dockerfile*; do
  "$venv/bin/hadolint" "$f"
  echo "ok   hadolint: $f"
done

echo "== shellcheck"
if command -v shellcheck >/dev/null; then
  shellcheck docker/*.sh tests/e2e/test_deploy_lint.sh
  echo "ok   shellcheck: docker/*.sh"
else
  echo "note shellcheck not installed: docker/*.sh not checked by it"
fi

echo "== render and validate (Kubernetes $k8s_version)"
"$venv/bin/python" tests/e2e/deploy_check.py "$src" "$k8s_version" "$build"

echo "== the worker's liveness probe"
# A live worker on a tiny model passes `folio-entrypoint alive`; stopped (SIGSTOP: an engine that
# neither beats nor touches), it fails within FOLIO_HEALTH_MAX_AGE_S; resumed, it passes again.
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --seed 3 >/dev/null
port=$((20000 + RANDOM % 20000))
export FOLIO_LOG=warn FOLIO_HEALTH_FILE="$tmp/worker.health" FOLIO_HEALTH_MAX_AGE_S=2
"$build/folio-coordinator" --listen "tcp://127.0.0.1:$port" --workers "tcp://127.0.0.1:$((port + 1))" \
  -m "$tmp/tiny.gguf" --heartbeat-ms 200 &
pids+=($!)
"$build/folio-worker" --workers "tcp://127.0.0.1:$((port + 1))" -m "$tmp/tiny.gguf" --threads 1 \
  --heartbeat-ms 200 --health-file "$FOLIO_HEALTH_FILE" &
worker=$!
pids+=("$worker")
alive() { sh docker/entrypoint.sh alive 2>/dev/null; }
for _ in $(seq 100); do alive && break; sleep 0.1; done
alive || { echo "FAIL: the worker's health file never became fresh"; exit 1; }
echo "ok   alive passes on a serving worker"
kill -STOP "$worker"
sleep 3.5
if alive; then
  echo "FAIL: alive still passes 3.5 s after the worker stopped (max age 2 s)"
  exit 1
fi
echo "ok   alive fails on a stopped worker: $(sh docker/entrypoint.sh alive 2>&1 || true)"
kill -CONT "$worker"
for _ in $(seq 50); do alive && break; sleep 0.1; done
alive || { echo "FAIL: alive does not pass again after the worker resumed"; exit 1; }
echo "ok   alive passes again once the worker resumes"
kill -TERM "$worker"
wait "$worker" || true
[ ! -e "$FOLIO_HEALTH_FILE" ] || { echo "FAIL: the worker left its health file behind"; exit 1; }
echo "ok   the worker removes its health file when it stops"
echo "test_deploy_lint: all checks passed"
