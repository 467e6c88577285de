#!/usr/bin/env bash
# Create (or reuse) a Python venv with llama-cpp-python pinned to the version
# the folio reference fixtures and engine benchmark were generated with.
#
#   PY=$(tools/llamacpp_env.sh)        # prints the venv's python path
#
# Location: ${FOLIO_CACHE:-<repo>/.cache}/llamacpp-venv  (git-ignored).
# Idempotent: on reuse it prints only the python path.  Building
# llama-cpp-python from source takes several minutes on a small machine; set
# CMAKE_ARGS / FOLIO_PIP_ARGS to influence the build if needed.
set -euo pipefail

LLAMACPP_PY_VERSION="0.3.16"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FOLIO_CACHE:-$repo_root/.cache}"
venv="$cache/llamacpp-venv"
py="$venv/bin/python"

have_deps() {
    [ -x "$py" ] && "$py" - "$LLAMACPP_PY_VERSION" >/dev/null 2>&1 <<'PYEOF'
import sys
import importlib.metadata as md
assert md.version("llama_cpp_python") == sys.argv[1]
import llama_cpp, jinja2, numpy  # noqa: F401
PYEOF
}

if have_deps; then
    echo "$py"
    exit 0
fi

mkdir -p "$cache"
{
    if [ ! -x "$py" ]; then
        echo "llamacpp_env: creating venv at $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    echo "llamacpp_env: installing llama-cpp-python==$LLAMACPP_PY_VERSION (builds from source, may take minutes)" >&2
    "$py" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$py" -m pip install --quiet ${FOLIO_PIP_ARGS:-} \
        "llama-cpp-python==$LLAMACPP_PY_VERSION" jinja2 numpy
} 1>&2

if ! have_deps; then
    echo "llamacpp_env: installation in $venv failed" >&2
    exit 1
fi
echo "$py"
