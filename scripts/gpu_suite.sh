#!/usr/bin/env bash
# The whole GPU suite, for a machine with an NVIDIA GPU, from a bare checkout:
#   bash scripts/gpu_suite.sh
# Steps (FOLIO_GPU_STEPS, default all, in this order):
#   build     configure and build with CUDA into build-gpu/
#   tests     the ctest tests labelled gpu (every op against the CPU backend; the reference prompts
#             greedily on CUDA vs CPU, which needs the default model)
#   memcheck  the op tests (quick set) under compute-sanitizer memcheck
#   bench     folio-bench engine --backend cuda on the default model, and PyTorch on its shape
#   bench8b   the same on a random-weight model of Llama-3-8B's shape in bf16 (written by
#             folio-mkmodel into /dev/shm, about 16 GB), and on one in Q4_1 (quantized reads)
#   variants8b  the graphs/GEMV/PDL/tiled-attention on-off runs on the bf16 8B shape (bench8b runs
#             them too; this step alone, for a lease that must split the work over calls)
#   models    only write those two models (the bench8b step does when they are missing)
#   profile   ncu on batch-1 decode steps of the bf16 8B shape: device time and DRAM bytes per
#             kernel (scripts/ncu_summary.py), graphs off so every kernel is seen
# FOLIO_GPU_VARIANTS: which on-off runs (default "plain nographs nogemv nopdl notiled laneattn nolaneattn
# gemvearly longctx", "" for none; default runs b=1,8 as the others do, with nothing changed;
# laneattn / nolaneattn force each decode attention kernel, where the
# default picks by grid size and context; gemvearly issues the GEMV's first weight loads before the
# PDL wait;
# longctx decodes after 4,096 prompt tokens a sequence, with and without split attention);
# FOLIO_GPU_TORCH=0 skips the PyTorch side; FOLIO_GPU_Q4=0 the Q4_1 8B runs.
# A machine without a package registry: pass FOLIO_DEPS=<folder of .deb files> (the list is in
# tests/README.md); they are unpacked under <folder>/root and used from there, never into /.
# Results go to ${OUT:-build-gpu}/gpu-*. A failing step is recorded and the next steps still run;
# the exit status is 1 when any step failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/build-gpu}"
mkdir -p "$out"
steps=" ${FOLIO_GPU_STEPS:-build tests memcheck bench bench8b} "
: >"$out/gpu-summary.txt"
status=0
fail() { echo "gpu_suite: FAILED: $*" | tee -a "$out/gpu-summary.txt"; status=1; }
pass() { echo "gpu_suite: ok: $*" | tee -a "$out/gpu-summary.txt"; }
want() { [[ "$steps" == *" $1 "* ]]; }

host_ld_path="${LD_LIBRARY_PATH:-}" # what Python (PyTorch) runs with: none of the unpacked libraries
if [ -n "${FOLIO_DEPS:-}" ]; then
  deps="$(cd "$FOLIO_DEPS" && pwd)"
  sys="$deps/root" fallback="$deps/fallback-root"
  if [ ! -e "$sys/.unpacked" ]; then
    mkdir -p "$sys" "$fallback"
    # fallback_*.deb: libzmq's own dependencies (Kerberos, libbsd), used only where the system lacks them.
    for deb in "$deps"/*.deb; do
      case "$(basename "$deb")" in
        fallback_*) dpkg -x "$deb" "$fallback" ;;
        *) dpkg -x "$deb" "$sys" ;;
      esac || fail "dpkg -x $deb"
    done
    # The .pc files name /usr: point them at the unpacked tree. Requires.private names packages
    # (Kerberos, libsodium, ...) whose .pc files are not brought along; shared linking needs none.
    find "$sys" -name '*.pc' -exec sed -i -e "s#=/usr#=$sys/usr#g; s# -I/usr/# -I$sys/usr/#g; s# -L/usr/# -L$sys/usr/#g" \
      -e '/^Requires.private:/d' {} +
    touch "$sys/.unpacked"
  fi
  lib="$sys/usr/lib/x86_64-linux-gnu"
  ld="$lib:$lib/openblas-pthread"
  ldconfig -p 2>/dev/null | grep -q 'libgssapi_krb5.so.2 ' || ld="$ld:$fallback/usr/lib/x86_64-linux-gnu:$fallback/lib/x86_64-linux-gnu"
  ldconfig -p 2>/dev/null | grep -q 'libbsd.so.0 ' || ld="$ld:$fallback/usr/lib/x86_64-linux-gnu:$fallback/lib/x86_64-linux-gnu"
  export PATH="$sys/usr/bin:$PATH"
  export PKG_CONFIG_PATH="$lib/pkgconfig:$lib/openblas-pthread/pkgconfig:$sys/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
  export LD_LIBRARY_PATH="$ld:${LD_LIBRARY_PATH:-}"
  export LIBRARY_PATH="$ld:${LIBRARY_PATH:-}"
  export CPATH="$sys/usr/include:${CPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-device.txt"
export FOLIO_SOURCE_DIR="$root" FOLIO_FIXTURES="$root/tests/fixtures"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"

if want build; then
  if cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DFOLIO_CUDA=ON -DFOLIO_FUZZ=OFF >"$out/gpu-build.txt" 2>&1 &&
     cmake --build build-gpu -j"$(nproc)" >>"$out/gpu-build.txt" 2>&1; then
    pass build
  else
    tail -n 40 "$out/gpu-build.txt"
    fail build
  fi
fi

if want tests; then
  # FOLIO_GPU_TEST_FILTER: a ctest -R regex, to run some of them.
  # -V: the logs of passing tests too (near-ties, per-case errors) are the evidence
  if ctest --test-dir build-gpu -V -L gpu --timeout 900 ${FOLIO_GPU_TEST_FILTER:+-R "$FOLIO_GPU_TEST_FILTER"} \
       >"$out/gpu-tests.txt" 2>&1; then
    pass "gpu tests"
  else
    fail "gpu tests (see gpu-tests.txt)"
  fi
  grep -E 'FAIL|near-tie|Skipped|tests passed|Passed|Failed|summary' "$out/gpu-tests.txt" | tail -n 40
fi

# Device memory errors (out-of-bounds, misaligned, uninitialised) in the kernels: the op tests under
# compute-sanitizer's memcheck, on the quick case set (memcheck is slow).
if want memcheck; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    FOLIO_CUDA_TEST_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 1 build-gpu/tests/test_cuda_backend \
      >"$out/gpu-memcheck.txt" 2>&1
    rc=$?
    tail -n 5 "$out/gpu-memcheck.txt"
    case $rc in
      0) pass "memcheck clean" ;;
      77) fail "memcheck skipped (no usable CUDA backend)" ;;
      *) fail "memcheck (exit $rc), see gpu-memcheck.txt" ;;
    esac
  else
    echo "memcheck: compute-sanitizer not on PATH, skipped" | tee "$out/gpu-memcheck.txt"
  fi
fi

# The random-weight models of Llama-3-8B's shape (bf16, and Q4_1 for the quantized-read comparison),
# in /dev/shm: about 16 and 4.5 GB, written in parallel.
big_bf16="${FOLIO_BIG_MODEL:-/dev/shm/llama3-8b-shape.bf16.gguf}" big_q4="/dev/shm/llama3-8b-shape.q4_1.gguf"
make_big_models() { # [bf16] [q4_1]: which ones (default both)
  local pids=() f t want_types=" ${*:-bf16 q4_1} "
  for f in "$big_bf16:bf16" "$big_q4:q4_1"; do
    [[ "$want_types" == *" ${f##*:} "* ]] || continue
    t=${f##*:} f=${f%:*}
    [ -f "$f" ] && continue
    # written under a temporary name: an interrupted write is never taken for a model
    (./build-gpu/folio-mkmodel -o "$f.part" --layers 32 --dim 4096 --ff 14336 --heads 32 --kv-heads 8 \
      --vocab 128256 --type "$t" --ctx 8192 --rope-theta 500000 --name "llama3-8b-shape-$t" && mv "$f.part" "$f") &
    pids+=($!)
  done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" || fail "folio-mkmodel 8b"; done
}

# folio-bench engine on one model: bench_folio NAME GGUF BATCHES [env VAR=VALUE ...] -- [folio flags...]
bench_folio() {
  local name=$1 gguf=$2 batches=$3 envs=()
  shift 3
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  if env ${envs[@]+"${envs[@]}"} ./build-gpu/folio-bench engine -m "$gguf" --backend cuda --no-llamacpp --batches "$batches" \
       --json "$out/gpu-engine-$name.json" "$@" >"$out/gpu-engine-$name.txt" 2>&1; then
    pass "folio-bench engine $name ${envs[*]}"
  else
    fail "folio-bench engine $name ${envs[*]}"
  fi
  grep -E '^(prefill|decode|folio decode|roofline)' "$out/gpu-engine-$name.txt"
}

# PyTorch (transformers, bf16) on a model shape: bench_torch NAME PRESET
bench_torch() {
  [ "${FOLIO_GPU_TORCH:-1}" = 1 ] || return 0
  LD_LIBRARY_PATH="$host_ld_path" python3 -c 'import torch, transformers' 2>/dev/null || return 0
  if LD_LIBRARY_PATH="$host_ld_path" PYTHONUNBUFFERED=1 python3 bench/torch_decode.py --preset "$2" --batches 1,8,64,256 \
       --json "$out/gpu-torch-$1.json" >"$out/gpu-torch-$1.txt" 2>&1; then
    pass "pytorch $1"
  else
    fail "pytorch $1"
  fi
  grep -E '^(prefill|decode)' "$out/gpu-torch-$1.txt"
}

# What CUDA graphs, the single-token GEMV kernel, programmatic dependent launch and the tiled
# prefill attention each contribute, measured in the same run.
bench_variants() {
  local v
  for v in ${FOLIO_GPU_VARIANTS-plain nographs nogemv nopdl notiled laneattn nolaneattn gemvearly longctx}; do
    case $v in
      laneattn) bench_folio "$1-laneattn" "$2" 1,8,64,256 FOLIO_CUDA_LANE_ATTN=1 -- --repeat 2 "${@:3}" ;;
      nolaneattn) bench_folio "$1-nolaneattn" "$2" 1,8 FOLIO_CUDA_LANE_ATTN=0 -- --repeat 2 "${@:3}" ;;
      gemvearly) bench_folio "$1-gemvearly" "$2" 1,8 FOLIO_CUDA_GEMV_EARLY=1 -- --repeat 2 "${@:3}" ;;
      longctx)
        bench_folio "$1-ctx4k" "$2" 1,8 -- --repeat 1 --decode-context 4096 "${@:3}"
        bench_folio "$1-ctx4k-nosplit" "$2" 1,8 FOLIO_CUDA_SPLIT_ATTN=0 -- --repeat 1 --decode-context 4096 "${@:3}" ;;
      default) bench_folio "$1-default" "$2" 1,8 -- --repeat 2 "${@:3}" ;; # an A/B partner for the others
      nopdl) bench_folio "$1-nopdl" "$2" 1,8 FOLIO_CUDA_PDL=0 -- --repeat 2 "${@:3}" ;;
      notiled) bench_folio "$1-notiled" "$2" 1 FOLIO_CUDA_TILED_ATTN=0 -- --repeat 2 "${@:3}" ;;
      plain) bench_folio "$1-plain" "$2" 1,8 FOLIO_CUDA_GRAPHS=0 FOLIO_CUDA_GEMV=0 -- --repeat 2 "${@:3}" ;;
      nographs) bench_folio "$1-nographs" "$2" 1,8 FOLIO_CUDA_GRAPHS=0 -- --repeat 2 "${@:3}" ;;
      nogemv) bench_folio "$1-nogemv" "$2" 1,8 FOLIO_CUDA_GEMV=0 -- --repeat 2 "${@:3}" ;;
    esac
  done
}

want models && make_big_models

if want bench; then
  if [ -f "$model" ]; then
    bench_folio smollm2 "$model" 1,8,64,256 -- --kv-budget 2GiB
    bench_variants smollm2 "$model" --kv-budget 2GiB
    # Q4_1 weights read as stored by the GEMV kernel, against their fp16 copies (the default)
    bench_folio smollm2-qgemv "$model" 1,8 FOLIO_CUDA_QGEMV=1 -- --repeat 2 --kv-budget 2GiB
    # Quantized KV pools on CUDA (issue 19): the engine figures with a Q8_0 cache, then the KV types
    # side by side (capacity, decode over 2,048-token contexts, the prefix workload on a tight budget)
    bench_folio smollm2-kvq8 "$model" 1,8,64,256 -- --repeat 2 --kv-budget 2GiB --kv-type q8_0
    if ./build-gpu/folio-bench kvquant --backend cuda --batches 1,32,128 --json "$out/gpu-kvquant.json" \
         >"$out/gpu-kvquant.txt" 2>&1; then
      pass "folio-bench kvquant --backend cuda"
    else
      fail "folio-bench kvquant --backend cuda"
    fi
    bench_torch smollm2 smollm2-135m
  else
    echo "bench: $model missing (scripts/setup.sh fetches it), skipped"
  fi
fi

if want bench8b; then
  make_big_models
  bench_folio llama3-8b "$big_bf16" 1,8,64,256 -- --kv-budget 8GiB
  bench_variants llama3-8b "$big_bf16" --kv-budget 8GiB
  bench_torch llama3-8b llama3-8b
  if [ "${FOLIO_GPU_Q4:-1}" = 1 ]; then
    # Decode over Q4_1 weights: their fp16 copies (the default) vs read as stored (4.5 bits a weight)
    bench_folio llama3-8b-q4_1 "$big_q4" 1,8 -- --repeat 2 --kv-budget 8GiB
    bench_folio llama3-8b-q4_1-qgemv "$big_q4" 1,8 FOLIO_CUDA_QGEMV=1 -- --repeat 2 --kv-budget 8GiB
  fi
fi

if want variants8b; then
  make_big_models bf16
  bench_variants llama3-8b "$big_bf16" --kv-budget 8GiB
fi
# Per-kernel device time and DRAM traffic of about one batch-1 decode step of the 8B shape. The
# launches skipped cover model load, the 16-token prefill and the first decode steps.
if want profile; then
  make_big_models bf16
  ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)"
  if [ -n "$ncu_bin" ]; then
    FOLIO_CUDA_GRAPHS=0 "$ncu_bin" --clock-control none --launch-skip "${FOLIO_NCU_SKIP:-6000}" \
      --launch-count "${FOLIO_NCU_COUNT:-800}" --csv --print-units base --log-file "$out/gpu-ncu.csv" \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      ./build-gpu/folio-bench engine -m "$big_bf16" --backend cuda --no-llamacpp --batches 1 --repeat 1 \
      --prompt-tokens 16 --decode-tokens 64 --kv-budget 8GiB >"$out/gpu-ncu-run.txt" 2>&1 || fail "ncu run"
    python3 scripts/ncu_summary.py "$out/gpu-ncu.csv" --bandwidth "${FOLIO_COPY_GBS:-4253}" | tee "$out/gpu-ncu-summary.txt" ||
      fail "ncu summary"
    # the same steps timed with graphs on, unprofiled: step time minus kernel time is launch gaps
    bench_folio llama3-8b-profiled "$big_bf16" 1,8 -- --repeat 2 --kv-budget 8GiB
  else
    fail "profile: ncu not found"
  fi
fi
cat "$out/gpu-summary.txt" 2>/dev/null
exit $status
