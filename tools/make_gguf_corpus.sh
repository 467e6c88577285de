#!/usr/bin/env bash
# make_gguf_corpus.sh - regenerates tests/fuzz/corpus/gguf/: the hand-made good and bad files
# (make_gguf_corpus.py) and a tiny valid model from folio-mkmodel (built in BUILD_DIR, default build/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/tests/fuzz/corpus/gguf
build=${1:-$root/build}
python3 "$root/tools/make_gguf_corpus.py" "$out"
"$build/folio-mkmodel" -o "$out/valid_tiny_model.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 \
  --vocab 300 --type q4_0 --seed 7
du -sh "$out"
