#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: a Release build with -Werror (all labels: unit, e2e,
# fuzz, slow; gpu tests report themselves skipped without a GPU), then a Debug build with
# AddressSanitizer and UndefinedBehaviorSanitizer running the unit and e2e tests.
#   FOLIO_TEST_QUICK=1   skip the sanitizer build
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh --test-tools
jobs="$(nproc)"

echo "== Release build (-Werror) =="
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DFOLIO_WERROR=ON >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

if [ "${FOLIO_TEST_QUICK:-0}" != 1 ]; then
  echo "== Debug build with ASan + UBSan =="
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DFOLIO_SANITIZE=ON -DFOLIO_WERROR=ON -DFOLIO_FUZZ=OFF \
        -DFOLIO_CUDA=OFF -DCMAKE_C_FLAGS="-O1" >/dev/null
  cmake --build build-asan -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs" -L "unit|e2e" -LE slow
fi
