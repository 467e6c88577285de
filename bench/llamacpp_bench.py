#!/usr/bin/env python3
"""llama.cpp side of `folio-bench engine`.

Run with the python printed by tools/llamacpp_env.sh (llama-cpp-python 0.3.16):

    $PY bench/llamacpp_bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --threads 2 --prompt-tokens 512 --decode-tokens 128 --batches 1,8,32 --json

Only the llama.cpp low-level C API is used (llama_cpp.llama_cpp) and the timed
loops do as little Python work as possible: batch arrays are numpy views on
the llama_batch buffers and argmax runs in numpy on the llama_get_logits
buffer.

Measurements (CPU only, flash_attn off, f16 KV cache, n_threads =
n_threads_batch = --threads):
  prefill  one llama_batch of --prompt-tokens pseudo-random token ids (fixed
           seed), n_batch = n_ubatch >= prompt length, logits for the last
           position only.  One warm-up run, then --repeat timed runs,
           each starting from a cleared KV cache (llama_memory_clear).
           prefill_tok_s is the fastest run (folio-bench reports the best of
           its runs too); prefill_tok_s_mean is the mean.
  decode   for each B in --batches: a context with n_seq_max = B, B sequences
           (seq ids 0..B-1) each prefilled with a --seq-prompt-tokens prompt
           (untimed), 2 untimed warm-up steps, then --decode-tokens steps,
           each one llama_batch of B tokens (one per sequence, logits for all)
           followed by a per-sequence argmax.  Repeated --repeat times in a
           fresh context; tok_s = B * steps / seconds of the fastest run.
  memory   peak_rss_mib = ru_maxrss after model load + prefill; rss_mib =
           current RSS at that point; peak_rss_end_mib = ru_maxrss at exit.

With --json the only thing written to stdout is one JSON object:
  {"impl": "llama.cpp", "version", "threads", "prompt_tokens", "prefill_tok_s",
   "prefill_tok_s_best", "decode": [{"batch", "tok_s", ...}], "peak_rss_mib",
   "rss_mib", "peak_rss_end_mib", ...}
"""
import argparse
import ctypes
import json
import os
import resource
import sys
import time

import numpy as np

try:
    import llama_cpp
    from llama_cpp import llama_cpp as L
except ImportError:  # pragma: no cover
    sys.exit("llamacpp_bench.py: llama_cpp not importable; run with the python "
             "printed by tools/llamacpp_env.sh")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from llamacpp_util import quiet_llama_logs  # noqa: E402

SEED = 1234


def rss_mib():
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return None


def peak_rss_mib():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes on macOS, KiB on Linux
        return kb / (1 << 20)
    return kb / 1024.0


def make_ctx(model, n_ctx, n_batch, n_seq_max, threads):
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_batch
    cp.n_seq_max = n_seq_max
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.flash_attn = False
    cp.type_k = L.GGML_TYPE_F16
    cp.type_v = L.GGML_TYPE_F16
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError(f"llama_init_from_model failed (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
    return ctx


class Batch:
    """llama_batch with numpy views on its token/pos/logits arrays."""

    def __init__(self, cap):
        self.cap = cap
        self.b = L.llama_batch_init(cap, 0, 1)
        self.token = np.ctypeslib.as_array(self.b.token, shape=(cap,))
        self.pos = np.ctypeslib.as_array(self.b.pos, shape=(cap,))
        self.n_seq_id = np.ctypeslib.as_array(self.b.n_seq_id, shape=(cap,))
        self.logits = np.ctypeslib.as_array(
            ctypes.cast(self.b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(cap,))
        self.n_seq_id[:] = 1

    def set_seq(self, i, seq):
        self.b.seq_id[i][0] = seq

    def free(self):
        L.llama_batch_free(self.b)


def clear_kv(ctx):
    mem = L.llama_get_memory(ctx)
    L.llama_memory_clear(mem, True)


def bench_prefill(model, n_vocab, n_prompt, threads, runs):
    n_ctx = max(512, n_prompt + 256)
    ctx = make_ctx(model, n_ctx, max(512, n_prompt), 1, threads)
    rng = np.random.default_rng(SEED)
    toks = rng.integers(256, n_vocab, size=n_prompt, dtype=np.int32)
    b = Batch(n_prompt)
    b.token[:] = toks
    b.pos[:] = np.arange(n_prompt, dtype=np.int32)
    for i in range(n_prompt):
        b.set_seq(i, 0)
    b.logits[:] = 0
    b.logits[n_prompt - 1] = 1
    b.b.n_tokens = n_prompt
    times = []
    for r in range(runs + 1):  # run 0 is the warm-up
        clear_kv(ctx)
        t0 = time.perf_counter()
        rc = L.llama_decode(ctx, b.b)
        L.llama_synchronize(ctx)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode (prefill) failed: {rc}")
        if r > 0:
            times.append(dt)
    b.free()
    L.llama_free(ctx)
    return times


def bench_decode(model, n_vocab, B, n_seq_prompt, n_steps, threads, warmup=2):
    per_seq = n_seq_prompt + n_steps + warmup + 16
    # KV cells are split per sequence (kv_unified is off by default): size the
    # context so every sequence gets per_seq cells.
    n_ctx = B * ((per_seq + 255) // 256 * 256)
    n_prefill = B * n_seq_prompt
    n_batch = max(512, n_prefill)  # all sequence prompts in one batch
    ctx = make_ctx(model, n_ctx, n_batch, B, threads)
    rng = np.random.default_rng(SEED + B)

    # prefill every sequence (untimed), logits at each sequence's last token
    pb = Batch(n_prefill)
    toks = rng.integers(256, n_vocab, size=(B, n_seq_prompt), dtype=np.int32)
    pb.token[:] = toks.reshape(-1)
    pb.pos[:] = np.tile(np.arange(n_seq_prompt, dtype=np.int32), B)
    pb.logits[:] = 0
    for s in range(B):
        for j in range(n_seq_prompt):
            pb.set_seq(s * n_seq_prompt + j, s)
        pb.logits[s * n_seq_prompt + n_seq_prompt - 1] = 1
    pb.b.n_tokens = n_prefill
    rc = L.llama_decode(ctx, pb.b)
    if rc != 0:
        raise RuntimeError(f"llama_decode (decode-bench prefill, B={B}) failed: {rc}")
    lg = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(B, n_vocab))
    nxt = lg.argmax(axis=1).astype(np.int32)
    pb.free()

    db = Batch(B)
    for s in range(B):
        db.set_seq(s, s)
    db.logits[:] = 1
    db.b.n_tokens = B
    pos = n_seq_prompt

    def step(nxt, pos):
        db.token[:] = nxt
        db.pos[:] = pos
        rc = L.llama_decode(ctx, db.b)
        if rc != 0:
            raise RuntimeError(f"llama_decode (decode, B={B}) failed: {rc}")
        lg = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(B, n_vocab))
        return lg.argmax(axis=1).astype(np.int32)

    for _ in range(warmup):
        nxt = step(nxt, pos)
        pos += 1
    t0 = time.perf_counter()
    for _ in range(n_steps):
        nxt = step(nxt, pos)
        pos += 1
    dt = time.perf_counter() - t0
    db.free()
    L.llama_free(ctx)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seq-prompt-tokens", type=int, default=16,
                    help="prompt length of each sequence in the decode benchmark")
    ap.add_argument("--repeat", type=int, default=3,
                    help="measured runs per figure after a warm-up; the best is reported (as folio-bench does)")
    ap.add_argument("--json", action="store_true", help="print only a JSON object on stdout")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",") if x.strip()]

    quiet_llama_logs()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        sys.exit(f"llamacpp_bench.py: failed to load {args.model}")
    load_s = time.perf_counter() - t0
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    times = bench_prefill(model, n_vocab, args.prompt_tokens, args.threads, args.repeat)
    peak_after_prefill = peak_rss_mib()
    rss_after_prefill = rss_mib()
    prefill = [args.prompt_tokens / t for t in times]

    decode = []
    for B in batches:
        dt = min(bench_decode(model, n_vocab, B, args.seq_prompt_tokens, args.decode_tokens, args.threads)
                 for _ in range(args.repeat))
        decode.append({"batch": B, "steps": args.decode_tokens,
                       "seconds": round(dt, 4),
                       "tok_s": round(B * args.decode_tokens / dt, 2),
                       "ms_per_step": round(1000 * dt / args.decode_tokens, 3)})
        if not args.json:
            print(f"decode B={B:3d}: {decode[-1]['tok_s']:9.2f} tok/s "
                  f"({decode[-1]['ms_per_step']:.2f} ms/step)", file=sys.stderr)

    out = {
        "impl": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "seq_prompt_tokens": args.seq_prompt_tokens,
        "prefill_tok_s": round(float(np.max(prefill)), 2),
        "prefill_tok_s_mean": round(float(np.mean(prefill)), 2),
        "prefill_runs_s": [round(t, 5) for t in times],
        "decode": decode,
        "peak_rss_mib": round(peak_after_prefill, 1),
        "rss_mib": round(rss_after_prefill, 1) if rss_after_prefill is not None else None,
        "peak_rss_end_mib": round(peak_rss_mib(), 1),
        "load_s": round(load_s, 3),
        "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
    }
    L.llama_model_free(model)
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
