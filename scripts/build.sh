#!/usr/bin/env bash
# Configures and builds folio into build/ (Release). Extra arguments go to cmake's configure step.
#   FOLIO_BUILD_DIR   build directory (default build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${FOLIO_BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
