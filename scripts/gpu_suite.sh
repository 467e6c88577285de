#!/usr/bin/env bash
# The whole GPU suite, for a machine with an NVIDIA GPU: builds with CUDA (FOLIO_SKIP_APT=1 and
# FOLIO_DEPS=<dir of unpacked .deb files> for machines without a package registry), runs the tests
# labelled gpu, the op tests under compute-sanitizer memcheck (when it is on PATH), then the GPU
# benchmarks, writing results to ${OUT:-build-gpu}/gpu-*. Exits 1 when a test or memcheck failed.
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
# The gpu tests (test_cuda_backend: every op against the CPU backend; test_cuda_model: the reference
# prompts greedily on CUDA vs CPU). A failure is recorded, and the memcheck and benchmark still run.
status=0
ctest --test-dir build-gpu --output-on-failure -L gpu | tee "$out/gpu-tests.txt" || status=1
# Device memory errors (out-of-bounds, misaligned, uninitialised) in the kernels: the op tests under
# compute-sanitizer's memcheck, on the quick case set (FOLIO_CUDA_TEST_QUICK=1: memcheck is slow).
if command -v compute-sanitizer >/dev/null 2>&1; then
  set +e
  FOLIO_CUDA_TEST_QUICK=1 FOLIO_SOURCE_DIR="$root" FOLIO_FIXTURES="$root/tests/fixtures" \
    compute-sanitizer --tool memcheck --error-exitcode 1 build-gpu/tests/test_cuda_backend \
    >"$out/gpu-memcheck.txt" 2>&1
  rc=$?
  set -e
  tail -n 5 "$out/gpu-memcheck.txt"
  case $rc in
    0) echo "memcheck: clean" ;;
    77) echo "memcheck: skipped (no usable CUDA backend)" ;;
    *) echo "memcheck: FAILED (exit $rc), see $out/gpu-memcheck.txt"; status=1 ;;
  esac
else
  echo "memcheck: compute-sanitizer not on PATH, skipped" | tee "$out/gpu-memcheck.txt"
fi
if [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  ./build-gpu/folio-bench engine --backend cuda --no-llamacpp --batches 1,8,64,256 --json "$out/gpu-engine.json" ||
    echo "gpu benchmark: the CUDA backend is not available (see above)"
fi
exit $status
