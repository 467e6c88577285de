#!/usr/bin/env bash
# The main job: set up (packages, default model), build, and generate from the default model.
# Extra arguments go to `folioctl run` (default: a short prompt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh
if [ $# -eq 0 ]; then
  set -- -p "The three primary colors are" -n 48
fi
exec ./build/folioctl run "$@"
