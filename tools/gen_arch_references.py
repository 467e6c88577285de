#!/usr/bin/env python3
"""Generate llama.cpp's outputs for folio's model-family parity test (tests/unit/test_families.c).

Run with the python of the venv made by tools/llamacpp_env.sh and a built folio-mkmodel:

    PY=$(tools/llamacpp_env.sh)
    $PY tools/gen_arch_references.py --mkmodel build/folio-mkmodel

For each family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3) folio-mkmodel writes a small
random-weight GGUF from the parameters below (deterministic from the seed; the test writes the same
file again, so no weights are committed), and llama.cpp (llama-cpp-python 0.3.16, CPU, the settings of
tools/gen_references.py) decodes a fixed prompt of token ids in one batch, then greedily one token per
step. Recorded per step: the greedy token and the top-8 logits as exact float32 values, which the test
compares bit for bit. Prompt plus continuation run past every sliding window.

Output: tests/fixtures/reference_families.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp  # noqa: E402
from gen_references import Model, N_CTX, sha256_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "reference_families.json")

N_PROMPT = 40
N_PREDICT = 40
TOP_K = 8

# mkmodel parameters per family: small, but with GQA, head_dim 64 or 128 (the AVX-512 decode paths),
# a context past each window (32) and past 64 positions (ggml's vec_dot chunk), and for Gemma 3 six
# layers so that one of them is global.
BASE = {"layers": 2, "dim": 256, "ff": 512, "heads": 4, "kv_heads": 2, "vocab": 512, "ctx": 4096,
        "type": "q4_1", "seed": 7}
FAMILIES = [
    {"arch": "llama"},
    # llama.cpp ignores the window of a "llama" model: 64 lets the first steps fit it
    {"arch": "mistral", "window": 64},
    {"arch": "qwen2"},
    {"arch": "qwen3", "head_dim": 128},
    # ctx 1024: its original context (512) is below llama.cpp's n_ctx, so the long factors apply
    {"arch": "phi3", "ctx": 1024},
    {"arch": "gemma2", "window": 32},
    {"arch": "gemma3", "window": 32, "layers": 6, "head_dim": 128, "rope_theta": 1000000},
]


def mkmodel_args(p):
    args = ["--arch", p["arch"], "--layers", p["layers"], "--dim", p["dim"], "--ff", p["ff"],
            "--heads", p["heads"], "--kv-heads", p["kv_heads"], "--vocab", p["vocab"], "--ctx", p["ctx"],
            "--type", p["type"], "--seed", p["seed"]]
    for k, flag in (("head_dim", "--head-dim"), ("window", "--window"), ("rope_theta", "--rope-theta")):
        if k in p:
            args += [flag, p[k]]
    return [str(a) for a in args]


def prompt_ids(vocab):
    # fixed ids, none of them special (0..2)
    return [3 + (i * 37 + 11) % (vocab - 3) for i in range(N_PROMPT)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mkmodel", required=True, help="path of folio-mkmodel")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--only", help="comma-separated archs")
    ap.add_argument("--type", help="weight type instead of " + BASE["type"] + " (for experiments)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in FAMILIES:
            if only and fam["arch"] not in only:
                continue
            p = dict(BASE, **fam)
            if args.type:
                p["type"] = args.type
            path = os.path.join(tmp, p["arch"] + ".gguf")
            subprocess.run([args.mkmodel, "-o", path] + mkmodel_args(p), check=True,
                           stderr=subprocess.DEVNULL)
            m = Model(path, use_extra_bufts=False)
            ptoks = prompt_ids(p["vocab"])
            m.clear()
            m._decode(ptoks, 0)
            pos = len(ptoks)
            toks, steps = [], []
            for step in range(N_PREDICT):
                lg = m.last_logits()
                order = np.argsort(-lg, kind="stable")[:TOP_K]
                t = int(order[0])
                toks.append(t)
                steps.append({"top_ids": [int(i) for i in order],
                              "top_logits": [float(np.float32(lg[i])) for i in order]})
                if step + 1 == N_PREDICT:
                    break
                m._decode([t], pos)
                pos += 1
            cases.append({"arch": p["arch"], "mkmodel": p, "model_sha256": sha256_file(path),
                          "prompt_tokens": ptoks, "tokens": toks, "steps": steps})
            print(f"{p['arch']:8s} tokens {toks[:12]}...")
            import llama_cpp.llama_cpp as L
            L.llama_batch_free(m.batch)
            L.llama_free(m.ctx)
            L.llama_model_free(m.model)

    out = {"generator": f"llama-cpp-python {llama_cpp.__version__}",
           "settings": {"n_ctx": N_CTX, "n_threads": 2, "flash_attn": False, "type_k": "f16",
                        "type_v": "f16", "device": "cpu"},
           "notes": "Per family: the folio-mkmodel parameters of the model (its sha256 as written), the "
                    "prompt (token ids, decoded as one batch), llama.cpp's greedy continuation (one token "
                    "per decode, argmax with the lowest id on ties, no stop) and per step the top-8 ids "
                    "and their logits as exact float32 values.",
           "n_predict": N_PREDICT, "top_k": TOP_K, "cases": cases}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} families")
    return 0


if __name__ == "__main__":
    sys.exit(main())
