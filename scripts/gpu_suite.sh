#!/usr/bin/env bash
# The whole GPU suite, for a machine with an NVIDIA GPU: builds with CUDA (FOLIO_SKIP_APT=1 and
# FOLIO_DEPS=<dir of unpacked .deb files> for machines without a package registry), runs the tests
# labelled gpu, then the GPU benchmarks, writing results to ${OUT:-build-gpu}/gpu-*.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/build-gpu}"
mkdir -p "$out"
if [ -n "${FOLIO_DEPS:-}" ]; then
  # Debian packages unpacked with `dpkg -x pkg.deb $FOLIO_DEPS` on a machine that has a registry.
  export PKG_CONFIG_PATH="$FOLIO_DEPS/usr/lib/x86_64-linux-gnu/pkgconfig:$FOLIO_DEPS/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
  export LD_LIBRARY_PATH="$FOLIO_DEPS/usr/lib/x86_64-linux-gnu:$FOLIO_DEPS/usr/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}"
  export CPATH="$FOLIO_DEPS/usr/include:${CPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-device.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DFOLIO_CUDA=ON -DFOLIO_FUZZ=OFF >/dev/null
cmake --build build-gpu -j"$(nproc)"
ctest --test-dir build-gpu --output-on-failure -L gpu | tee "$out/gpu-tests.txt"
if [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  ./build-gpu/folio-bench engine --backend cuda --no-llamacpp --batches 1,8,64,256 --json "$out/gpu-engine.json" ||
    echo "gpu benchmark: the CUDA backend is not available (see above)"
fi
