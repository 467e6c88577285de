#!/usr/bin/env bash
# Builds docker/Dockerfile into folio:cpu without Docker Hub or a Docker engine, then checks the
# image: Debian's buildah on a base image made from Debian's own packages (debootstrap), the
# build and the checks run with chroot isolation. For machines where `docker build` is not
# possible; with Docker, `docker build -f docker/Dockerfile -t folio:cpu .` is the same image.
#
#   bash docker/build-local.sh            base image (once), image, checks
#   FOLIO_IMAGE=folio:cpu                 the tag to build
#   FOLIO_SKIP_BUILD=1                    only the checks, on an image built before
#   FOLIO_SMOKE_MODEL=PATH                the GGUF the cluster check mounts (default: the
#                                         checkout's models/, which scripts/setup.sh fills)
#
# The checks: `folioctl --help` in the image, then a coordinator, a worker group and the gateway
# started in one container through the image's entry point, a request through folioctl and one
# through HTTP, the worker's liveness probe, and a drain. Ports 25555/25556/28080 on loopback (a
# chroot container shares the host's network). `podman run` is not used: where the sandbox
# forbids setrlimit (as on folio's build machines), crun cannot start a container.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
image="${FOLIO_IMAGE:-folio:cpu}"
base_dir="${FOLIO_BASE_DIR:-/var/tmp/folio-bookworm}"

need=()
for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "build-local: needs ${need[*]} (apt-get install buildah podman debootstrap) and root" >&2
    exit 1
  fi
  echo "build-local: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah podman debootstrap >/dev/null
fi

# debian:bookworm-slim from Debian's archive: a minbase debootstrap with the official image's
# package sources, imported and tagged under the name the Dockerfile asks for.
if ! podman image exists docker.io/library/debian:bookworm-slim; then
  if [ ! -x "$base_dir/bin/sh" ]; then
    echo "build-local: debootstrap --variant=minbase bookworm $base_dir"
    debootstrap --variant=minbase bookworm "$base_dir" http://deb.debian.org/debian >/dev/null
  fi
  rm -f "$base_dir/etc/apt/sources.list"
  cat >"$base_dir/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$base_dir"/var/cache/apt/archives/*.deb "$base_dir"/var/lib/apt/lists/*
  tar -C "$base_dir" -c . | podman import - localhost/debian:bookworm-slim >/dev/null
  podman tag localhost/debian:bookworm-slim docker.io/library/debian:bookworm-slim
  echo "build-local: base image debian:bookworm-slim imported from $base_dir"
fi

if [ "${FOLIO_SKIP_BUILD:-0}" != 1 ]; then
  echo "build-local: buildah bud -f docker/Dockerfile -t $image (compiles folio inside)"
  # --format docker keeps HEALTHCHECK, which the OCI format has no field for.
  buildah bud --isolation chroot --pull=never --format docker --layers -f docker/Dockerfile -t "$image" .
fi

ctr=$(buildah from --pull=never "$image")
trap 'buildah rm "$ctr" >/dev/null' EXIT
brun() { buildah run --isolation chroot "$@"; }

echo "build-local: check 1: folioctl --help in $image"
brun "$ctr" -- folioctl --help >/dev/null
# shellcheck disable=SC2016 # expanded inside the container
brun "$ctr" -- sh -c 'id; for b in folio-coordinator folio-worker folio-gateway folioctl; do
  ldd "$(command -v $b)" | grep "not found" && exit 1; done; echo "shared libraries: all found"'

model="${FOLIO_SMOKE_MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ ! -f "$model" ]; then
  echo "build-local: no model at $model (bash scripts/setup.sh fetches it): cluster check not run" >&2
  exit 0
fi
echo "build-local: check 2: coordinator, worker group, gateway in the container on $(basename "$model")"
models_dir=$(mktemp -d /var/tmp/folio-models.XXXXXX)
trap 'buildah rm "$ctr" >/dev/null; rm -rf "$models_dir"' EXIT
cp "$model" "$models_dir/"
chown -R 10001:10001 "$models_dir"
script="$models_dir/smoke.sh"
cat >"$script" <<'EOF'
set -eu
export FOLIO_LISTEN=tcp://127.0.0.1:25555 FOLIO_WORKERS_LISTEN=tcp://127.0.0.1:25556
export FOLIO_WORKER_ENDPOINT=tcp://127.0.0.1:25556 FOLIO_COORDINATOR=tcp://127.0.0.1:25555
export FOLIO_LOG=warn FOLIO_FETCH_MODEL=0 FOLIO_HEALTH_MAX_AGE_S=5
folio-entrypoint coordinator & cpid=$!
FOLIO_GROUP=g0 FOLIO_WORKER_FLAGS="--threads 1 --kv-budget 32MiB" folio-entrypoint worker & wpid=$!
FOLIO_HTTP=127.0.0.1:28080 folio-entrypoint gateway & gpid=$!
ok=0
for _ in $(seq 120); do folioctl health >/dev/null 2>&1 && ok=1 && break; sleep 0.5; done
[ "$ok" = 1 ] || { echo "smoke: the cluster never served" >&2; exit 1; }
folioctl health
folio-entrypoint alive && echo "smoke: worker liveness probe passes"
folioctl generate -p "The capital of France is" -n 8 --temperature 0 --json | tail -1
echo "smoke: HTTP check"
touch /opt/folio/models/smoke-http-ready
for _ in $(seq 600); do [ -f /opt/folio/models/smoke-http-done ] && break; sleep 0.1; done
folio-entrypoint prestop
kill -TERM "$wpid"; wait "$wpid" && echo "smoke: worker drained and exited 0"
kill -TERM "$gpid" 2>/dev/null; wait "$gpid" || true
kill -INT "$cpid"; wait "$cpid" && echo "smoke: coordinator exited 0"
EOF
# The HTTP side is checked from the host (curl is not in the image): the container's loopback is
# the host's. The two sides meet through files in the model folder.
brun -v "$models_dir:/opt/folio/models" "$ctr" -- /usr/bin/tini -s -- sh /opt/folio/models/smoke.sh &
smoke=$!
for _ in $(seq 900); do [ -f "$models_dir/smoke-http-ready" ] && break; sleep 0.1; done
http_ok=0
if [ -f "$models_dir/smoke-http-ready" ]; then
  for _ in $(seq 50); do # the gateway's view of the cluster follows it within a few seconds
    code=$(curl -sS -o /dev/null -w "%{http_code}" http://127.0.0.1:28080/health || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  echo "smoke: GET /health $code"
  answer=$(curl -fsS http://127.0.0.1:28080/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The capital of France is", "max_tokens": 8,
         "temperature": 0}' || true)
  echo "smoke: POST /v1/completions $answer"
  [ "$code" = 200 ] && [[ "$answer" == *'"choices"'* ]] && http_ok=1
fi
touch "$models_dir/smoke-http-done"
wait "$smoke"
if [ "$http_ok" != 1 ]; then
  echo "build-local: the gateway did not answer /health 200 and a completion" >&2
  exit 1
fi
echo "build-local: $image built and checked"
