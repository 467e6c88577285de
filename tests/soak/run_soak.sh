#!/usr/bin/env bash
# The soak test: a coordinator and N worker groups on a tiny random model under mixed load while a
# fault injector kills, stops and restarts them (tests/soak/soak.py says what is checked).
#
#   run_soak.sh --duration SECONDS [--groups N] [--netns] [--lanes N] [--per-lane N] [--seed N]
#               [--faults kill,stop,coordinator,link] [--report FILE] [--keep] [--build DIR]
#
# --netns puts the coordinator, each worker group and the client in network namespaces of their own
# (as tests/e2e/test_multihost_netns.sh does, on 10.213.9.0/24) so that the fault injector can also
# take a worker host's link down and up; without root (or where namespaces cannot be made) that
# part is skipped with the reason and the rest runs on ipc endpoints. The build directory is
# $FOLIO_BUILD_DIR (ctest sets it), else --build, else build/. Exit: 0 pass, 1 fail, 77 skipped
# (python3-zmq, python3-protobuf or protoc missing). Logs of a failed run are kept under
# <build>/Testing/soak-logs/; --keep keeps them always.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="${FOLIO_SOURCE_DIR:-$(cd "$here/../.." && pwd)}"
build="${FOLIO_BUILD_DIR:-}"
duration=180 groups=3 netns=0 keep=0 report="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --groups) groups="$2"; shift 2 ;;
    --netns) netns=1; shift ;;
    --keep) keep=1; shift ;;
    --build) build="$2"; shift 2 ;;
    --report) report="$2"; shift 2 ;;
    --lanes|--per-lane|--seed|--fault-gap-s|--faults|--checkpoint-s|--warmup|--kv-budget)
      extra+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run_soak.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done
build="${build:-$src/build}"
build="$(cd "$build" && pwd)" || exit 2
py=/usr/bin/python3
if ! "$py" -c "import zmq, google.protobuf" 2>/dev/null || ! command -v protoc >/dev/null; then
  echo "skipped: python3-zmq, python3-protobuf or protoc missing (scripts/setup.sh installs them)"
  exit 77
fi
for b in folio-coordinator folio-worker folio-mkmodel; do
  [ -x "$build/$b" ] || { echo "run_soak.sh: $build/$b not built"; exit 2; }
done

# Sanitizer and debug builds are slower (timeouts x5 and x3, as the e2e tests scale them); under
# AddressSanitizer the freed-memory quarantine makes RSS grow by design, so RSS is reported but not
# judged there (descriptors are).
slow=1
if ldd "$build/folio-coordinator" 2>/dev/null | grep -q 'libasan\|libubsan' ||
   nm "$build/folio-coordinator" 2>/dev/null | grep -q '__asan_init'; then
  slow=5; extra+=(--no-rss-check)
elif grep -q '^CMAKE_BUILD_TYPE:STRING=Debug' "$build/CMakeCache.txt" 2>/dev/null; then
  slow=3
fi

tmp="$(mktemp -d /tmp/folio-soak-XXXXXX)"
tag="s$$"
hosts=()
pids=()
cleanup() {
  # soak.py stops the cluster it started on SIGTERM; KILL only if it has not gone within 10 s.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  for h in "${hosts[@]}"; do ip netns pids "$tag$h" 2>/dev/null | xargs -r kill -KILL 2>/dev/null; done
  wait 2>/dev/null
  for h in "${hosts[@]}"; do ip netns del "$tag$h" 2>/dev/null; done
  [ ${#hosts[@]} -gt 0 ] && ip netns del "${tag}sw" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' TERM INT

export FOLIO_LOG=warn
"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 400 \
  --type q8_0 --seed 17 --ctx 4096 >/dev/null || { echo "FAIL folio-mkmodel"; exit 2; }
protoc --proto_path="$src/proto" --python_out="$tmp" "$src/proto/folio.proto" || { echo "FAIL protoc"; exit 2; }

ep_c="ipc://$tmp/c" ep_w="ipc://$tmp/w"
run_in=()
if [ $netns -eq 1 ]; then
  why=""
  if [ "$(id -u)" -ne 0 ]; then why="not root"
  elif ! command -v ip >/dev/null; then why="no ip command (Debian's iproute2)"
  elif ! ip netns add "${tag}sw" 2>"$tmp/why"; then why="$(cat "$tmp/why")"
  fi
  if [ -n "$why" ]; then
    echo "run_soak.sh: --netns part skipped ($why): no link faults, ipc endpoints"
    netns=0
  else
    # A bridge in the switch namespace; one veth pair a host (eth0 inside, its peer a bridge port
    # named TAG<host>p, which the fault injector sets down and up).
    hosts=(co cl)
    for i in $(seq 0 $((groups - 1))); do hosts+=("w$i"); done
    . "$src/tests/e2e/netns_lib.sh"
    netns_bridge "${tag}sw" || { echo "FAIL bridge"; exit 2; }
    n=1
    for h in "${hosts[@]}"; do
      a="10.213.9.$n"; n=$((n + 1))
      [ "$h" = co ] && co_addr="$a"
      netns_host "${tag}sw" "$tag$h" "$a/24" || { echo "FAIL link for $h"; exit 2; }
    done
    ep_c="tcp://$co_addr:5555" ep_w="tcp://$co_addr:5556"
    run_in=(ip netns exec "${tag}cl")
    extra+=(--netns "$tag")
  fi
fi

[ -n "$report" ] || report="$tmp/report.json"
"${run_in[@]}" "$py" "$here/soak.py" --build "$build" --gen "$tmp" --model "$tmp/tiny.gguf" --workdir "$tmp" \
  --client-endpoint "$ep_c" --worker-endpoint "$ep_w" --duration "$duration" --groups "$groups" \
  --slow "$slow" --report "$report" "${extra[@]}" &
pids+=($!)
wait "${pids[0]}"; rc=$?
pids=()
if [ $rc -ne 0 ] || [ $keep -eq 1 ]; then
  logs="$build/Testing/soak-logs/soak-$$"
  mkdir -p "$logs" && cp "$tmp"/*.log "$logs"/ 2>/dev/null && cp "$report" "$logs"/ 2>/dev/null
  echo "logs: $logs"
  if [ $rc -ne 0 ]; then for f in "$tmp"/*.log; do echo "--- $f"; tail -n 8 "$f"; done; fi
fi
exit $rc
