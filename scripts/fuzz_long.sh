#!/usr/bin/env bash
# Long fuzzing: every libFuzzer target (tests/fuzz/fuzz_*.c) for a number of executions each, under
# AddressSanitizer and UndefinedBehaviorSanitizer (the targets are built with
# -fsanitize=fuzzer,address,undefined by tests/CMakeLists.txt; here UBSan reports also stop the run),
# starting from the committed corpora. 0 crashes are expected; the execution counts and times go to
# a results file. CI's short runs (ctest -L fuzz, 30 s a target) are separate.
#
#   scripts/fuzz_long.sh [--runs N] [--targets "gguf wire ..."] [--jobs J] [--max-time S]
#                        [--build DIR] [--out DIR]
#
#   --runs N       executions per target (default 10000000, 10^7)
#   --targets      a subset, by name without fuzz_ (default: every tests/fuzz/fuzz_*.c)
#   --jobs J       targets run at once (default 1: the machine may be shared)
#   --max-time S   also stop a target after S seconds (default: no limit); the results say so
#   --build DIR    the build whose fuzz targets run (default $FOLIO_BUILD_DIR, else build/); they
#                  are built or brought up to date there first (-DFOLIO_FUZZ=ON, clang needed)
#   --out DIR      logs, new corpus units and crash artifacts (default <build>/fuzz-long/)
#
# Results: <out>/results.txt, one line a target: name, executions done, seconds, executions per
# second, crashes (a crash, leak, timeout or out-of-memory artifact, or a non-zero exit), the
# corpus units found, and the log. Exit 1 when any target crashed or could not run.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs=10000000 targets="" jobs=1 max_time=0 build="${FOLIO_BUILD_DIR:-$root/build}" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --max-time) max_time="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "fuzz_long.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done
case "$runs" in ''|*[!0-9]*) echo "fuzz_long.sh: --runs wants a number" >&2; exit 2 ;; esac
if [ -z "$targets" ]; then
  for f in "$root"/tests/fuzz/fuzz_*.c; do n="$(basename "$f" .c)"; targets="$targets ${n#fuzz_}"; done
fi
out="${out:-$build/fuzz-long}"
mkdir -p "$out" || exit 2

# The binaries: those of the build (tests/CMakeLists.txt), brought up to date with the sources (so
# the results are the tree's at the commit they name).
command -v clang >/dev/null || command -v clang-14 >/dev/null || { echo "fuzz_long.sh: clang not found"; exit 2; }
build_targets=()
for t in $targets; do build_targets+=("fuzz_${t}_build"); done
if ! grep -q '^FOLIO_FUZZ:BOOL=ON' "$build/CMakeCache.txt" 2>/dev/null; then
  cmake -S "$root" -B "$build" -DFOLIO_FUZZ=ON >/dev/null || { echo "fuzz_long.sh: cmake failed for $build"; exit 2; }
fi
echo "building the fuzz targets in $build"
cmake --build "$build" -j"$(nproc)" --target "${build_targets[@]}" >"$out/build.log" 2>&1 ||
  { echo "fuzz_long.sh: the build failed ($out/build.log)"; tail -n 20 "$out/build.log"; exit 2; }
commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null)"
git -C "$root" diff --quiet HEAD -- 2>/dev/null || commit="$commit+changes"

one() { # target: runs it, writes $out/<target>.result
  local t="$1" bin="$build/tests/fuzz_$t" corpus="$root/tests/fuzz/corpus/$t"
  local work="$out/$t.corpus" art="$out/$t.artifacts" log="$out/$t.log"
  mkdir -p "$work" "$art"
  rm -f "$art"/*
  local limit=()
  [ "$max_time" -gt 0 ] && limit=(-max_total_time="$max_time")
  local start end rc
  start=$(date +%s.%N)
  # New units go to the first corpus directory (the committed one is read only here).
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$bin" -runs="$runs" "${limit[@]}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$art/" "$work" "$corpus" >"$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  local done_runs secs crashes units
  done_runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  secs="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
  crashes="$(find "$art" -type f | wc -l)"
  [ $rc -ne 0 ] && [ "$crashes" -eq 0 ] && crashes=1
  units="$(find "$work" -type f | wc -l)"
  printf '%-14s runs %12s  %7s s  %8s exec/s  crashes %s  rc %s  new-units %s  %s\n' "$t" "${done_runs:-0}" "$secs" \
    "$(awk -v r="${done_runs:-0}" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? r / s : 0) }')" "$crashes" "$rc" "$units" \
    "$log" >"$out/$t.result"
  cat "$out/$t.result"
}

cap=""
[ "$max_time" -gt 0 ] && cap=" (at most $max_time s each)"
echo "fuzz_long: $runs executions per target$cap, targets:$targets, $jobs at once, out $out"
running=0
for t in $targets; do
  if [ ! -x "$build/tests/fuzz_$t" ]; then
    printf '%-14s not built (see %s/build.log)\n' "$t" "$out" >"$out/$t.result"; cat "$out/$t.result"; continue
  fi
  one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait

results="$out/results.txt"
{
  echo "# scripts/fuzz_long.sh --runs $runs$cap, $(date -u +%Y-%m-%dT%H:%MZ), built at $commit, $(nproc) cores"
  for t in $targets; do cat "$out/$t.result"; done
} >"$results"
echo "results: $results"
fail=0
for t in $targets; do
  grep -q 'crashes 0  rc 0' "$out/$t.result" || { fail=1; echo "FAIL $t: $(cat "$out/$t.result")"; }
done
exit $fail
